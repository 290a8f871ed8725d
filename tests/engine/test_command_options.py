"""generate, chat and serve take the model, --demo, --device, --ctx and the placement options from one definition
(offload/commands/options.py): the same flags and help in each, only the defaults their own."""

import pytest
import typer

from offload.cli import app

SHARED = ("path", "demo", "device", "ctx", "placement", "gpu_mem", "ram", "profile", "page_from_disk", "graphs",
          "expert_quant")


def _params(name: str) -> dict:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[name].params}


@pytest.mark.parametrize("other", ["chat", "serve"])
def test_shared_options_are_one_definition(other):
    gen, cmd = _params("generate"), _params(other)
    if "model" in cmd:  # serve names its argument MODEL
        cmd["path"] = cmd.pop("model")
    for name in SHARED:
        assert getattr(cmd[name], "help", None) == getattr(gen[name], "help", None), name
        assert name == "path" or cmd[name].opts == gen[name].opts, name
    if other == "chat":
        for name in ("expert_quant", "max_tokens", "temperature"):
            assert cmd[name].opts == gen[name].opts and cmd[name].help == gen[name].help, name
    assert {n: p.default for n, p in cmd.items() if n in ("ctx", "device")} == \
        {"ctx": 8192 if other == "chat" else 4096, "device": "auto"}
