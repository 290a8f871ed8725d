"""Every wrong input gets one clear line naming what is wrong (CLI: exit code 2, no traceback)."""

import json
import shutil
import subprocess

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import offload
from offload.errors import ConfigError, OffloadError, RequestError, WeightsError

from tests.commands import offload_command


@pytest.fixture
def broken(tiny_checkpoint, tmp_path):
    """A fresh copy of a tiny checkpoint to break."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("qwen3_moe"), dst)
    return dst


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, fn):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        offload.load(tmp_path / "nope", device="cpu")


def test_unknown_model_type(broken):
    edit_config(broken, model_type="llama_moe_9000")
    with pytest.raises(ConfigError, match="unknown model_type 'llama_moe_9000'.*qwen3_moe"):
        offload.load(broken, device="cpu", progress=False)


def test_missing_config_key(broken):
    edit_config(broken, hidden_size=None)
    with pytest.raises(ConfigError, match="missing required key 'hidden_size'"):
        offload.load(broken, device="cpu", progress=False)


def test_missing_tensor(broken):
    edit_tensors(broken, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight missing"):
        offload.load(broken, device="cpu", progress=False)


def test_misshaped_tensor(broken):
    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:10].clone()
    edit_tensors(broken, shrink)
    with pytest.raises(WeightsError, match=r"q_proj\.weight has shape \[10, 64\], expected \[64, 64\]"):
        offload.load(broken, device="cpu", progress=False)


def test_truncated_safetensors(broken):
    file = broken / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated"):
        offload.load(broken, device="cpu", progress=False)
    file.write_bytes(data[:5])
    with pytest.raises(WeightsError, match="truncated"):
        offload.load(broken, device="cpu", progress=False)


def test_bad_requests(tiny_checkpoint):
    llm = offload.load(tiny_checkpoint("qwen3_moe"), device="cpu", ctx=32, progress=False)
    with pytest.raises(RequestError, match="context length 32"):
        llm.generate(list(range(30)), max_new_tokens=8)
    with pytest.raises(RequestError, match="temperature"):
        llm.generate("hi", temperature=-1)
    with pytest.raises(RequestError, match="prompt token ids"):
        llm.generate([10**9])
    assert llm.generate("hi", max_new_tokens=2).token_ids  # still serves after the errors


@pytest.mark.parametrize("make_bad", ["missing", "unknown_type"])
def test_cli_prints_one_line_and_exits_2(make_bad, broken, tmp_path):
    path = tmp_path / "nope" if make_bad == "missing" else broken
    if make_bad == "unknown_type":
        edit_config(broken, model_type="bogus")
    proc = subprocess.run([*offload_command(), "generate", str(path), "--prompt", "hi",
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert issubclass(WeightsError, OffloadError)


def test_expert_quant_is_refused_for_gguf(tmp_path):
    with pytest.raises(ConfigError, match="already quantised"):
        offload.load(tmp_path / "model.gguf", expert_quant="q4_k")
