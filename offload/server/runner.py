"""What both APIs share: server state, API errors, prompt rendering, the context check, stop strings,
and one generation turned into a stream of ('reasoning' | 'content' | 'tool_call', value) events."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from offload.errors import OffloadError, RequestError
from offload.server.metrics import Metrics
from offload.server.parsers import (
    OutputParser, _find_first, _safe_cut, detect_tool_family, prompt_opens_reasoning, template_has_reasoning,
)
from offload.server.scheduler import QueueFull, QueueTimeout, Scheduler


class APIError(Exception):
    """An error reply; each API renders it in its own JSON shape. kind is Anthropic's error type name."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


class ClientGone(Exception):
    pass


@dataclass
class ServerState:
    model_name: str
    api_key: str | None = None
    timeout: float | None = None  # seconds per request, queue wait included
    max_concurrency: int = 1
    max_queue: int = 256
    llm: Any = None
    load_error: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    scheduler: Scheduler | None = None
    template: str | None = None  # the default chat template's source, for format detection
    cache_mem: int = 2 * 2**30  # prefix-cache snapshot budget in bytes (0: the live sequence only)
    prefix: Any = None  # the model's offload.prefix_cache.PrefixCache (None for an engine without one)
    kv_budget: int | None = None  # KV positions all running sequences may hold (None: from free memory)

    @property
    def ready(self) -> bool:
        return self.llm is not None and self.scheduler is not None

    def attach(self, llm: Any) -> None:
        """The model is loaded: start serving it."""
        try:
            self.template = llm.tokenizer.chat_template()
        except Exception:  # no template: /v1/chat/completions answers 400, /v1/completions still works
            self.template = None
        engine, budget = llm, None
        if hasattr(getattr(llm, "model", None), "forward_segments"):  # offload's: sequences decode together
            from offload.server.batching import BatchLLM, kv_budget

            engine = BatchLLM(llm, self.max_concurrency)
            budget = self.kv_budget or kv_budget(llm.model, llm.context_length, self.max_concurrency)
            self.kv_budget = budget
        else:  # another engine says how many sequences it can run (max_sequences), 1 if it does not
            self.max_concurrency = max(1, min(self.max_concurrency, int(getattr(llm, "max_sequences", 1))))
        self.scheduler = Scheduler(engine, self.max_concurrency, self.max_queue, self.metrics, budget)
        if hasattr(llm, "model"):  # one store for both APIs: a conversation's turns may come through either
            from offload.prefix_cache import enable

            self.prefix = getattr(llm.model, "prefix_cache", None) or enable(llm, self.cache_mem)
        self.llm = llm

    def guard(self, request, model: Any = None) -> None:
        """API key, then loaded, then the model name (when the request names one)."""
        if self.api_key:
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key")
            if given != self.api_key:
                raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                               "authentication_error", code="invalid_api_key")
        if not self.ready:
            msg = f"model failed to load: {self.load_error}" if self.load_error else "model is still loading"
            raise APIError(503, msg, "overloaded_error" if not self.load_error else "api_error")
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} not found; this server serves {self.model_name!r}",
                           "not_found_error", param="model", code="model_not_found")


# Parsing, template rendering and tokenising run here, never on the event loop: a megabyte prompt takes
# seconds to tokenise, and /health and every stream must keep answering meanwhile. Two workers: a flood of
# big requests queues here instead of taking every core.
_PREP = ThreadPoolExecutor(max_workers=2, thread_name_prefix="offload-prep")


async def off_loop(fn, *args, **kwargs):
    """fn(*args, **kwargs) in the preparation pool."""
    return await asyncio.get_running_loop().run_in_executor(_PREP, lambda: fn(*args, **kwargs))


async def read_json(request) -> dict:
    from offload.server.limits import parse_body

    return await off_loop(parse_body, await request.body())


async def parse_request(request, model_cls) -> tuple["ServerState", Any]:
    """Every API route's opening: key check before any parsing, JSON body, field validation, model name."""
    state: ServerState = request.app.state.server
    state.guard(request)  # the key first: no parsing for strangers
    req = await off_loop(validate, model_cls, await read_json(request))
    state.guard(request, req.model)
    return state, req


def validate(model_cls, data: dict):
    """pydantic model from the body; the first problem becomes a 400 naming the field."""
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        raise APIError(400, f"{loc}: {err['msg']}", param=loc) from None


def _args_as(messages: list[dict], as_text: bool) -> list[dict]:
    """Tool-call arguments as dicts (GLM's template iterates them) or JSON text (DeepSeek's concatenates)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                fn = dict(tc.get("function") or {})
                a = fn.get("arguments")
                if as_text and not isinstance(a, str):
                    fn["arguments"] = json.dumps(a if a is not None else {}, ensure_ascii=False)
                elif not as_text and isinstance(a, str):
                    try:
                        fn["arguments"] = json.loads(a) if a.strip() else {}
                    except ValueError:
                        pass
                calls.append({**tc, "function": fn})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def encode(tok, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of `text` (offload's Tokenizer lets other threads run meanwhile: it releases the GIL)."""
    return tok.encode(text, add_special_tokens=add_special_tokens)


def render_chat(llm, messages: list[dict], tools: list | None, template_kwargs: dict) -> tuple[list[int], str]:
    """Prompt ids and text from the model's chat template (the template writes any BOS itself, as
    Tokenizer.encode_chat has it)."""
    tok = llm.tokenizer
    error: Exception | None = None
    for as_text in (False, True):
        msgs = _args_as(messages, as_text)
        try:
            text = tok.apply_chat_template(msgs, tools=tools or None, add_generation_prompt=True, **template_kwargs)
        except Exception as e:  # a template error: try the other argument form, then report the first
            error = error or e
            continue
        try:
            return encode(tok, text, add_special_tokens=False), text
        except Exception as e:
            raise APIError(400, f"messages: cannot tokenise the rendered prompt: {e}", param="messages") from None
    raise APIError(400, f"messages: the model's chat template rejected them: {error}", param="messages")


def max_new_tokens(llm, n_prompt: int, requested: int | None) -> int:
    """The context limit, enforced with a message that states it."""
    ctx = llm.context_length
    if requested is None:
        if n_prompt >= ctx:
            raise APIError(400, f"prompt is {n_prompt} tokens; this model's context length is {ctx} tokens",
                           param="messages", code="context_length_exceeded")
        return ctx - n_prompt
    if n_prompt + requested > ctx:
        raise APIError(400, f"this model's context length is {ctx} tokens, but {n_prompt + requested} were "
                            f"requested ({n_prompt} in the prompt, {requested} to generate); shorten the "
                            f"prompt or lower the max tokens", param="max_tokens", code="context_length_exceeded")
    return requested


def thinking_kwargs(enable: bool | None) -> dict:
    # Qwen3 / GLM templates read enable_thinking, DeepSeek-V3.1's reads thinking.
    return {} if enable is None else {"enable_thinking": enable, "thinking": enable}


class StopMatcher:
    """Withholds text that may be the start of a stop string; reports the first one found."""

    def __init__(self, stops: list[str] | None):
        self.stops = tuple(s for s in (stops or []) if s)
        self.buf, self.hit = "", None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.buf += text
        i, which = _find_first(self.buf, self.stops)
        if i >= 0:
            out, self.buf, self.hit = self.buf[:i], "", which
            return out
        cut = _safe_cut(self.buf, self.stops)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def finish(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass
class Outcome:
    finish_reason: str = "stop"  # "stop" | "length" (tool calls are decided by the caller)
    stop_sequence: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, those the prefix cache held


def make_parser(state: ServerState, prompt_text: str | None, tools: list | None) -> OutputParser:
    reasoning = template_has_reasoning(state.template)
    family = detect_tool_family(state.template) or "qwen"  # Hermes-style JSON is the common fallback
    return OutputParser(reasoning=reasoning, in_reasoning=reasoning and prompt_opens_reasoning(prompt_text or ""),
                        tool_family=family, tools=tools)


def _close_started(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class Run:
    """One request's generation: `await Run.start(...)`, then `async for kind, value in run.events()`."""

    def __init__(self, state: ServerState, request, gen, prompt: list[int], stops, parser: OutputParser | None):
        self.state, self.request, self.gen = state, request, gen
        self.stopper, self.parser = StopMatcher(stops), parser
        self.outcome = Outcome(prompt_tokens=len(prompt))
        self._closed = False
        self.gone = False

    @classmethod
    async def start(cls, state: ServerState, request, prompt: list[int], gen_kwargs: dict,
                    stops: list[str] | None = None, parser: OutputParser | None = None) -> "Run":
        deadline = time.monotonic() + state.timeout if state.timeout else None
        waiter = asyncio.ensure_future(state.scheduler.start(prompt, gen_kwargs, deadline))
        try:
            while True:  # poll for the client leaving while it waits in the queue
                done, _ = await asyncio.wait({waiter}, timeout=0.5)
                if done:
                    break
                if await request.is_disconnected():
                    raise ClientGone()
            gen = waiter.result()
        except QueueFull as e:
            raise APIError(503, f"server busy: {e}", "overloaded_error") from None
        except QueueTimeout as e:
            raise APIError(503, f"{e} within the {state.timeout:g} s request timeout", "overloaded_error") from None
        except BaseException:
            waiter.cancel()
            waiter.add_done_callback(_close_started)
            raise
        return cls(state, request, gen, prompt, stops, parser)

    def _parse(self, text: str) -> list:
        if self.parser is None:
            return [("content", text)] if text else []
        return self.parser.feed(text)

    async def _watch(self) -> None:
        """Wait for the client to leave; then stop the generation before its next token."""
        while True:
            message = await self.request.receive()
            if message["type"] == "http.disconnect":
                self.gone = True
                self.gen.close()
                return

    async def events(self, poll_disconnect: bool = True) -> AsyncIterator[tuple[str, Any]]:
        """poll_disconnect: watch for the client leaving (a stream's EventStream does it itself)."""
        gen, finish = self.gen, None
        watcher = asyncio.ensure_future(self._watch()) if poll_disconnect else None
        try:
            while True:
                try:
                    chunk = await gen.__anext__()
                except StopAsyncIteration:
                    break
                if self.gone:
                    raise ClientGone() from None
                self.outcome.cached_tokens = getattr(chunk, "cached_tokens", 0)
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                for ev in self._parse(self.stopper.feed(chunk.text)):
                    yield ev
                if self.stopper.hit:
                    finish, self.outcome.stop_sequence = "stop", self.stopper.hit
                    break
            for ev in self._parse(self.stopper.finish()):
                yield ev
            if self.parser is not None:
                for ev in self.parser.finish():
                    yield ev
        except RequestError as e:  # the engine refused the request (a sampling value, the context)
            raise APIError(400, str(e)) from None
        except OffloadError as e:
            raise APIError(400, str(e)) from None
        except (APIError, ClientGone, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", "api_error") from None
        finally:
            if watcher is not None:
                watcher.cancel()
            self.close()
        if self.gone:
            raise ClientGone()
        self.outcome.finish_reason = "length" if gen.timed_out else (finish or "stop")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        gen = self.gen
        gen.close()
        self.outcome.completion_tokens = gen.completion_tokens
        now = time.monotonic()
        ttft = None if gen.first_token_at is None else gen.first_token_at - gen.started
        decode = 0.0 if gen.first_token_at is None else now - gen.first_token_at
        self.state.metrics.generation(self.outcome.prompt_tokens, gen.completion_tokens, ttft, decode)
