"""The `offload` command. Each command group lives in offload/commands/<group>.py and registers itself;
heavy imports (torch) stay inside the commands so `offload plan` starts fast."""

import importlib
import sys

import typer

from offload.errors import OffloadError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="offload: giant MoE models on one workstation (GPU + CPU experts).")

COMMAND_GROUPS = ("demo", "engine", "plan", "gguf", "serve", "bench")

for _group in COMMAND_GROUPS:
    try:
        _module = importlib.import_module(f"offload.commands.{_group}")
    except ModuleNotFoundError as exc:  # a group not written yet
        if exc.name != f"offload.commands.{_group}":
            raise
        continue
    _module.register(app)


def main() -> None:
    try:
        app()
    except OffloadError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
