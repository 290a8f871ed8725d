"""`offload serve`: the OpenAI- and Anthropic-compatible HTTP server."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import typer

from offload.commands.options import (Ctx, Demo, Device, ExpertQuant, GpuMem, Graphs, ModelPath, PageFromDisk,
                                      Placement, Profile, Ram, load_options, model_or_demo)
from offload.errors import ConfigError


def default_model_name(path: Path) -> str:
    from offload import demo

    if path.name == Path(demo.MEMBER).name:
        return demo.NAME
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def banner(url: str, name: str, ctx: int, device: str, api_key: bool) -> str:
    auth = " -H 'Authorization: Bearer $KEY'" if api_key else ""
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hello!"}]})
    return (f"offload: serving {name!r} (context {ctx} tokens, {device})\n"
            f"  OpenAI API     {url}/v1            (chat/completions, completions, models)\n"
            f"  Anthropic API  {url}               (v1/messages, v1/messages/count_tokens)\n"
            f"  health {url}/health   metrics {url}/metrics\n"
            f"  try:  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
            f"  Claude Code:  ANTHROPIC_BASE_URL={url} ANTHROPIC_MODEL={name} ANTHROPIC_SMALL_FAST_MODEL={name} "
            f"ANTHROPIC_AUTH_TOKEN={'$KEY' if api_key else 'none'} "
            # Claude Code asks for 32k output tokens by default: more than a small context holds.
            f"CLAUDE_CODE_MAX_OUTPUT_TOKENS={max(256, min(8192, ctx // 4))} claude")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: ModelPath = None,
        host: str = typer.Option("127.0.0.1", "--host", help="address to bind (loopback by default)"),
        port: int = typer.Option(8000, "--port"),
        api_key: str | None = typer.Option(None, "--api-key", envvar="OFFLOAD_API_KEY",
                                           help="require 'Authorization: Bearer KEY' or 'x-api-key: KEY'"),
        model_name: str | None = typer.Option(None, "--model-name", help="the name clients send (default: dir name)"),
        ctx: Ctx = 4096,
        device: Device = "auto",
        expert_quant: ExpertQuant = None,
        max_concurrency: int = typer.Option(4, "--max-concurrency", help="sequences decoded together (continuous batching)"),
        kv_budget: int | None = typer.Option(None, "--kv-budget", help="KV positions all running sequences may hold "
                                             "(default: what free memory holds, at most --max-concurrency x --ctx); "
                                             "a request waits until its prompt + max tokens fit"),
        max_queue: int = typer.Option(256, "--max-queue", help="requests waiting beyond this get a 503"),
        timeout: float | None = typer.Option(None, "--timeout", help="seconds per request, queue wait included"),
        cache_mem: str = typer.Option("2GiB", "--cache-mem", help="prefix cache: memory for earlier conversations' "
                                      "computed prompts (e.g. 8GiB; 0 keeps only the last one, which costs nothing)"),
        max_body: int = typer.Option(8 * 2**20, "--max-body", help="largest request body in bytes (413 past it)"),
        log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level"),
        placement: Placement = "auto",
        gpu_mem: GpuMem = None,
        ram: Ram = None,
        profile: Profile = None,
        page_from_disk: PageFromDisk = False,
        graphs: Graphs = None,
        demo: Demo = False,
    ):
        """Serve MODEL over the OpenAI and Anthropic APIs (loads in the background; /health is 503 until ready)."""
        model = model_or_demo(model, demo)
        if not model.exists():
            raise ConfigError(f"{model}: no such checkpoint directory or GGUF file")
        if ctx < 1 or max_concurrency < 1 or max_queue < 0 or (timeout is not None and timeout <= 0) or max_body < 1:
            raise ConfigError("--ctx, --max-concurrency and --max-body must be >= 1, --max-queue >= 0, --timeout > 0")
        if kv_budget is not None and kv_budget < 1:
            raise ConfigError(f"--kv-budget must be >= 1 positions, got {kv_budget}")
        import uvicorn

        from offload.placement.hardware import parse_size

        cache_bytes = 0 if cache_mem.strip() == "0" else parse_size(cache_mem, "--cache-mem")

        import offload
        from offload.server.app import create_app

        name = model_name or default_model_name(model)
        options = load_options(placement, gpu_mem, ram, profile, page_from_disk, graphs)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        server: uvicorn.Server | None = None

        def loader():
            try:
                return offload.load(model, device=device, ctx=ctx, expert_quant=expert_quant, **options)
            except Exception as e:
                typer.secho(f"error: {e}", fg="red", err=True)
                if server is not None:
                    server.should_exit = True
                raise

        def ready(llm) -> None:
            dev = str(getattr(llm, "device", device))
            typer.secho(banner(url, name, llm.context_length, dev, bool(api_key)), fg="green", err=True)
            allowed = application.state.server.max_concurrency
            if application.state.server.kv_budget:
                typer.secho(f"{allowed} sequences at once, KV budget {application.state.server.kv_budget} positions",
                            err=True)
            if allowed < max_concurrency:
                typer.secho(f"note: the engine runs {allowed} sequence(s) at a time; --max-concurrency "
                            f"{max_concurrency} lowered to {allowed}, other requests queue", fg="yellow", err=True)

        if not _is_loopback(host) and not api_key:
            typer.secho(f"warning: listening on {host} without --api-key: anyone who can reach it can use it",
                        fg="yellow", err=True)
        typer.secho(f"offload: listening on {url}, loading {model} ...", err=True)
        application = create_app(loader=loader, model_name=name, api_key=api_key, max_concurrency=max_concurrency,
                                 max_queue=max_queue, timeout=timeout, max_body=max_body, cache_mem=cache_bytes,
                                 kv_budget=kv_budget, on_ready=ready)
        server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level=log_level,
                                               timeout_graceful_shutdown=3))
        server.run()
        state = application.state.server
        if state.load_error or not server.started:
            sys.exit(2 if state.load_error else 1)
