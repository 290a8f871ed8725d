"""`offload generate` and `offload chat`: run a checkpoint directory or GGUF file from the terminal."""

import sys
import time
from pathlib import Path

import typer

from offload.commands.options import GpuMem, PageFromDisk, Placement, Profile, Ram, load_options


def _load(path: Path, device: str, ctx: int, expert_quant: str | None, **placement):
    import offload

    return offload.load(path, device=device, ctx=ctx, expert_quant=expert_quant, **load_options(**placement))


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        path: Path = typer.Argument(..., help="checkpoint directory (config.json + safetensors) or .gguf file"),
        prompt: str = typer.Option(..., "--prompt", "-p", help="prompt text (raw, no chat template)"),
        max_tokens: int = typer.Option(128, "--max-tokens", "-n"),
        temperature: float = typer.Option(0.0, "--temperature", "-t"),
        top_p: float = typer.Option(1.0, "--top-p"),
        top_k: int = typer.Option(0, "--top-k"),
        seed: int | None = typer.Option(None, "--seed"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
        ctx: int = typer.Option(4096, "--ctx", help="context length (prompt + generated tokens)"),
        expert_quant: str | None = typer.Option(None, "--expert-quant", help="quantise CPU experts at load, e.g. q4_k"),
        placement: Placement = "auto",
        gpu_mem: GpuMem = None,
        ram: Ram = None,
        profile: Profile = None,
        page_from_disk: PageFromDisk = False,
    ):
        """Generate a continuation of PROMPT, streamed to stdout."""
        llm = _load(path, device, ctx, expert_quant, placement=placement, gpu_mem=gpu_mem, ram=ram, profile=profile,
                    page_from_disk=page_from_disk)
        start, first, n = time.perf_counter(), None, 0
        for chunk in llm.stream_chunks(prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                       top_k=top_k, seed=seed):
            if first is None:
                first = time.perf_counter()
            n = chunk.completion_tokens
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        end = time.perf_counter()
        decode = f", {(n - 1) / (end - first):.1f} tok/s decode" if n > 1 and end > first else ""
        typer.secho(f"\n[{n} tokens, first after {first - start:.2f} s{decode}]", err=True, dim=True)

    @app.command()
    def chat(
        path: Path = typer.Argument(..., help="checkpoint directory or .gguf file"),
        system: str | None = typer.Option(None, "--system", help="system prompt"),
        max_tokens: int = typer.Option(1024, "--max-tokens", "-n"),
        temperature: float = typer.Option(0.7, "--temperature", "-t"),
        device: str = typer.Option("auto", "--device"),
        ctx: int = typer.Option(8192, "--ctx"),
        expert_quant: str | None = typer.Option(None, "--expert-quant"),
        placement: Placement = "auto",
        gpu_mem: GpuMem = None,
        ram: Ram = None,
        profile: Profile = None,
        page_from_disk: PageFromDisk = False,
    ):
        """Interactive multi-turn chat (/reset, /system, /save, /load, /exit; Ctrl-C stops a reply)."""
        from offload.chat_ui import run_chat

        llm = _load(path, device, ctx, expert_quant, placement=placement, gpu_mem=gpu_mem, ram=ram, profile=profile,
                    page_from_disk=page_from_disk)
        run_chat(llm, system=system, max_new_tokens=max_tokens, temperature=temperature)
