"""`offload generate` and `offload chat`: run a checkpoint directory or GGUF file from the terminal."""

import sys
import time
from pathlib import Path

import typer

from offload.commands.options import (Ctx, Demo, Device, ExpertQuant, GpuMem, Graphs, MaxTokens, ModelPath,
                                      PageFromDisk, Placement, Profile, Ram, Temperature, load_options, model_or_demo)


def _load(path: Path | None, demo: bool, device: str, ctx: int, expert_quant: str | None, **placement):
    import offload

    return offload.load(model_or_demo(path, demo), device=device, ctx=ctx, expert_quant=expert_quant,
                        **load_options(**placement))


def write_stream(chunks) -> tuple[int, float, float]:
    """Write each chunk's text to stdout as it comes; (tokens, seconds to the first chunk, seconds of the rest)."""
    start, first, n = time.perf_counter(), None, 0
    for chunk in chunks:
        if first is None:
            first = time.perf_counter()
        n = chunk.completion_tokens
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    end = time.perf_counter()
    first = end if first is None else first
    return n, first - start, end - first


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        path: ModelPath = None,
        prompt: str = typer.Option(..., "--prompt", "-p", help="prompt text (raw, no chat template)"),
        max_tokens: MaxTokens = 128,
        temperature: Temperature = 0.0,
        top_p: float = typer.Option(1.0, "--top-p"),
        top_k: int = typer.Option(0, "--top-k"),
        seed: int | None = typer.Option(None, "--seed"),
        device: Device = "auto",
        ctx: Ctx = 4096,
        expert_quant: ExpertQuant = None,
        placement: Placement = "auto",
        gpu_mem: GpuMem = None,
        ram: Ram = None,
        profile: Profile = None,
        page_from_disk: PageFromDisk = False,
        graphs: Graphs = None,
        demo: Demo = False,
    ):
        """Generate a continuation of PROMPT, streamed to stdout."""
        llm = _load(path, demo, device, ctx, expert_quant, placement=placement, gpu_mem=gpu_mem, ram=ram,
                    profile=profile, page_from_disk=page_from_disk, graphs=graphs)
        n, to_first, rest = write_stream(llm.stream_chunks(prompt, max_new_tokens=max_tokens, temperature=temperature,
                                                         top_p=top_p, top_k=top_k, seed=seed))
        decode = f", {(n - 1) / rest:.1f} tok/s decode" if n > 1 and rest > 0 else ""
        typer.secho(f"\n[{n} tokens, first after {to_first:.2f} s{decode}]", err=True, dim=True)

    @app.command()
    def chat(
        path: ModelPath = None,
        system: str | None = typer.Option(None, "--system", help="system prompt"),
        max_tokens: MaxTokens = 1024,
        temperature: Temperature = 0.7,
        device: Device = "auto",
        ctx: Ctx = 8192,
        expert_quant: ExpertQuant = None,
        placement: Placement = "auto",
        gpu_mem: GpuMem = None,
        ram: Ram = None,
        profile: Profile = None,
        page_from_disk: PageFromDisk = False,
        graphs: Graphs = None,
        demo: Demo = False,
    ):
        """Interactive multi-turn chat (/reset, /system, /save, /load, /exit; Ctrl-C stops a reply)."""
        from offload.chat_ui import run_chat

        llm = _load(path, demo, device, ctx, expert_quant, placement=placement, gpu_mem=gpu_mem, ram=ram,
                    profile=profile, page_from_disk=page_from_disk, graphs=graphs)
        run_chat(llm, system=system, max_new_tokens=max_tokens, temperature=temperature)
