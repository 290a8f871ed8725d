"""The ASGI app: OpenAI and Anthropic routes over one model, /health, /metrics, errors in each API's shape."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from offload.server import anthropic_api, openai_api
from offload.server.limits import MAX_BODY, Front, is_anthropic
from offload.server.runner import APIError, ClientGone, ServerState


def _render_path(path: str, e: APIError) -> JSONResponse:
    return anthropic_api.anthropic_error(e) if is_anthropic(path) else openai_api.openai_error(e)


def _render(request: Request, e: APIError) -> JSONResponse:
    return _render_path(request.url.path, e)


def create_app(llm: Any = None, *, loader: Callable[[], Any] | None = None, model_name: str | None = None,
               api_key: str | None = None, max_concurrency: int = 1, max_queue: int = 256,
               timeout: float | None = None, max_body: int = MAX_BODY, cache_mem: int = 2 * 2**30,
               kv_budget: int | None = None, on_ready: Callable[[Any], None] | None = None) -> FastAPI:
    """An app serving `llm`, or the model `loader()` returns (loaded in a thread; /health is 503 until then).

    model_name: the name clients must send (default llm.model_name). timeout: seconds per request,
    queue wait included; a generation still running then stops with finish_reason "length". max_body: the
    largest request body accepted, in bytes (413 past it). cache_mem: bytes of prefix-cache snapshots kept
    (earlier conversations; the live one is always reused). kv_budget: KV positions all running sequences
    may hold together (default: what the free memory holds, at most max_concurrency contexts); a request
    waits until its prompt + max tokens fit."""
    if llm is None and loader is None:
        raise ValueError("create_app needs an llm or a loader")
    if model_name is None:
        if llm is None:
            raise ValueError("create_app(loader=...) needs model_name")
        model_name = llm.model_name
    state = ServerState(model_name=model_name, api_key=api_key, timeout=timeout,
                        max_concurrency=max_concurrency, max_queue=max_queue, cache_mem=cache_mem,
                        kv_budget=kv_budget)

    def load() -> None:
        try:
            model = loader()
            state.attach(model)
            if on_ready is not None:
                on_ready(model)
        except Exception as e:  # shown by /health and every API call
            state.load_error = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if llm is not None:
            state.attach(llm)
        else:
            threading.Thread(target=load, name="offload-load", daemon=True).start()
        yield
        if state.scheduler is not None:
            state.scheduler.shutdown()

    app = FastAPI(title="offload", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.include_router(openai_api.router)
    app.include_router(anthropic_api.router)
    app.add_middleware(Front, state=state, render=_render_path, max_body=max_body)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        response = _render(request, e)
        if e.kind == "overloaded_error":  # busy (queue full) or still loading: worth a retry
            response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "api_error")
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return _render(request, APIError(e.status_code, msg, kind))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return _render(request, APIError(400, str(e)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return _render(request, APIError(500, f"internal error: {type(e).__name__}: {e}", "api_error"))

    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": state.model_name}

    @app.get("/metrics")
    async def metrics():
        running = state.scheduler.running if state.scheduler else 0
        text = state.metrics.render(running, state.prefix)
        batcher = getattr(getattr(state.scheduler, "llm", None), "batcher", None)
        if batcher is not None:  # offload's engine: continuous batching and the KV budget
            from offload.server.batching import metrics as batching_metrics

            text = text.rstrip("\n") + "\n" + batching_metrics(state.scheduler, batcher)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app
