"""The placement options every command that loads a model takes (generate, chat, serve), defined once."""

from pathlib import Path
from typing import Annotated, Optional

import typer

Placement = Annotated[str, typer.Option(
    "--placement", help="auto (plan from the file and this machine, as `offload plan FILE` shows) | cpu | gpu "
                        "(every routed expert there) | PLAN.json (from `offload plan --format json`)")]
GpuMem = Annotated[Optional[list[str]], typer.Option(
    "--gpu-mem", help="memory budget per GPU, e.g. 20GiB; repeat for two GPUs")]
Ram = Annotated[Optional[str], typer.Option(
    "--ram", help="system RAM to plan for, e.g. 256GiB (default: this machine's); max(8 GiB, 5 %) stays free for the OS")]
Profile = Annotated[Optional[Path], typer.Option(
    "--profile", help="routing profile from `offload profile`: its hot experts go to the GPU")]
PageFromDisk = Annotated[bool, typer.Option(
    "--page-from-disk", help="load a model bigger than RAM anyway, reading what RAM cannot hold from disk (slow)")]


def load_options(placement: str, gpu_mem: list[str] | None, ram: str | None, profile: Path | None,
                 page_from_disk: bool) -> dict:
    """Keywords for offload.load."""
    return dict(placement=placement, gpu_mem=gpu_mem or None, ram=ram, profile=profile,
                page_from_disk=page_from_disk)
