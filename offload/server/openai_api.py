"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from offload.server.runner import (
    APIError, Run, ServerState, encode, make_parser, max_new_tokens, off_loop, parse_request, render_chat,
    thinking_kwargs,
)
from offload.server.sse import EventStream

router = APIRouter()
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


class _Sampling(BaseModel):
    # strict: "5" is not a number and "yes" not a boolean (lax mode would take both)
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # extension (vLLM / llama.cpp)
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # extension
    repetition_penalty: float | None = Field(None, gt=0.0)  # extension
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int | None = Field(None, ge=1)
    logprobs: Any = None
    user: str | None = None


class ChatRequest(_Sampling):
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict | None = None
    reasoning_effort: str | None = None
    response_format: dict | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def openai_error(e: APIError) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
            503: "server_error"}.get(e.status, "server_error" if e.status >= 500 else "invalid_request_error")
    body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status)


def _gen_kwargs(req: _Sampling, max_new: int) -> dict:
    kw: dict[str, Any] = {"max_new_tokens": max_new,
                          "temperature": 1.0 if req.temperature is None else req.temperature}
    for name in ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed"):
        if getattr(req, name) is not None:
            kw[name] = getattr(req, name)
    return kw


def _common_checks(req: _Sampling) -> list[str]:
    if req.n not in (None, 1):
        raise APIError(400, "n: only 1 choice per request is supported", param="n")
    if req.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs: not supported by this server", param="logprobs")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise APIError(400, "stop: at most 4 stop sequences", param="stop")
    return stops


def _text_of(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") not in ("text", "input_text"):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise APIError(400, f"{where}[{i}]: content part type {kind!r} is not supported (text only)",
                               param=where)
            if not isinstance(p.get("text"), str):
                raise APIError(400, f"{where}[{i}].text: expected a string", param=f"{where}[{i}].text")
            parts.append(p["text"])
        return "".join(parts)
    raise APIError(400, f"{where}: expected a string or a list of content parts", param=where)


def chat_messages(messages: list[dict]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        where = f"messages[{i}]"
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"{where}.role: expected system, user, assistant or tool, got {role!r}",
                           param=f"{where}.role")
        if m.get("content") is None and role != "assistant":  # an assistant turn may be tool calls only
            raise APIError(400, f"{where}.content: a {role} message needs content", param=f"{where}.content")
        msg: dict[str, Any] = {"role": role, "content": _text_of(m.get("content"), f"{where}.content")}
        if role == "assistant":
            if m.get("tool_calls") is not None:
                if not isinstance(m["tool_calls"], list):
                    raise APIError(400, f"{where}.tool_calls: expected a list", param=f"{where}.tool_calls")
                msg["tool_calls"] = m["tool_calls"]
            rc = m.get("reasoning_content")
            if isinstance(rc, str) and rc:
                msg["reasoning_content"] = rc
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
            if m.get("name"):
                msg["name"] = m["name"]
        out.append(msg)
    return out


def _thinking(req: ChatRequest) -> dict:
    kw = dict(req.chat_template_kwargs or {})
    if req.reasoning_effort is not None:
        if req.reasoning_effort not in EFFORTS:
            raise APIError(400, f"reasoning_effort: expected one of {', '.join(EFFORTS)}", param="reasoning_effort")
        kw.setdefault("enable_thinking", req.reasoning_effort not in ("none", "minimal"))
        kw.setdefault("reasoning_effort", req.reasoning_effort)  # GLM-5.x templates read it
    if "enable_thinking" in kw:
        kw = {**thinking_kwargs(bool(kw["enable_thinking"])), **kw}
    return kw


def check_tools(tools: list[dict] | None) -> None:
    """Each tool {"type": "function", "function": {"name": str, "description"?: str, "parameters"?: object}}."""
    for i, t in enumerate(tools or []):
        where = f"tools[{i}]"
        if t.get("type", "function") != "function":
            raise APIError(400, f"{where}.type: only 'function' tools are supported, got {t.get('type')!r}",
                           param=f"{where}.type")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise APIError(400, f"{where}.function: required object", param=f"{where}.function")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"{where}.function.name: required non-empty string", param=f"{where}.function.name")
        for key, kind in (("parameters", dict), ("description", str)):
            if fn.get(key) is not None and not isinstance(fn[key], kind):
                raise APIError(400, f"{where}.function.{key}: expected {'an object' if kind is dict else 'a string'}",
                               param=f"{where}.function.{key}")


def _tools(req: ChatRequest) -> list[dict] | None:
    check_tools(req.tools)
    choice = req.tool_choice
    if choice in (None, "auto", "none"):
        return None if choice == "none" else req.tools
    raise APIError(400, f"tool_choice: only 'auto' and 'none' are supported (no constrained decoding), got {choice!r}",
                   param="tool_choice")


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def _usage(o) -> dict:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "total_tokens": o.prompt_tokens + o.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": o.cached_tokens}}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    state, req = await parse_request(request, ChatRequest)
    stops = _common_checks(req)
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise APIError(400, "response_format: only {'type': 'text'} is supported", param="response_format")
    tools = _tools(req)
    llm = state.llm
    prompt, prompt_text = await off_loop(render_chat, llm, chat_messages(req.messages), tools, _thinking(req))
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_new = max_new_tokens(llm, len(prompt), limit)
    run = await Run.start(state, request, prompt, _gen_kwargs(req, max_new), stops,
                          make_parser(state, prompt_text, tools))
    cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())

    if not req.stream:
        reasoning, content, calls = [], [], []
        async for kind, val in run.events():
            {"reasoning": reasoning, "content": content}.get(kind, calls).append(val)
        o = run.outcome
        text = "".join(content)
        message: dict[str, Any] = {"role": "assistant", "content": (text.strip() if calls else text) or None}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning).strip()
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        if message["content"] is None and not calls:
            message["content"] = ""
        finish = "tool_calls" if calls and o.finish_reason == "stop" else o.finish_reason
        return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                "usage": _usage(o)}

    include_usage = bool((req.stream_options or {}).get("include_usage"))

    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    async def stream():
        yield chunk({"role": "assistant", "content": ""})
        n_calls = 0
        try:
            async for kind, val in run.events(poll_disconnect=False):
                if kind == "content":
                    yield chunk({"content": val})
                elif kind == "reasoning":
                    yield chunk({"reasoning_content": val})
                else:
                    yield chunk({"tool_calls": [{"index": n_calls, "id": val.id, "type": "function",
                                                 "function": {"name": val.name, "arguments": val.arguments}}]})
                    n_calls += 1
        except APIError as e:
            yield _sse({"error": {"message": e.message, "type": "server_error" if e.status >= 500
                                  else "invalid_request_error", "param": e.param, "code": e.code}})
            yield "data: [DONE]\n\n"
            return
        o = run.outcome
        yield chunk({}, "tool_calls" if n_calls and o.finish_reason == "stop" else o.finish_reason)
        if include_usage:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": state.model_name, "choices": [], "usage": _usage(o)})
        yield "data: [DONE]\n\n"

    return EventStream(stream(), on_close=run.close)


@router.post("/v1/completions")
async def completions(request: Request):
    state, req = await parse_request(request, CompletionRequest)
    stops = _common_checks(req)
    if req.echo or req.suffix or (req.best_of or 1) > 1:
        raise APIError(400, "echo, suffix and best_of are not supported", param="echo")
    llm = state.llm
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], str):
        if len(p) != 1:
            raise APIError(400, "prompt: only one prompt per request is supported", param="prompt")
        p = p[0]
    if isinstance(p, str):
        prompt = await off_loop(encode, llm.tokenizer, p, add_special_tokens=True)
    else:
        vocab = getattr(llm.tokenizer, "vocab_size", None)
        if any(t < 0 or (vocab is not None and t >= vocab) for t in p):
            raise APIError(400, f"prompt: token ids must lie in [0, {vocab})", param="prompt")
        prompt = list(p)
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    max_new = max_new_tokens(llm, len(prompt), 16 if req.max_tokens is None else req.max_tokens)
    run = await Run.start(state, request, prompt, _gen_kwargs(req, max_new), stops)
    cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())

    def obj(text: str, finish: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    if not req.stream:
        text = "".join([val async for _, val in run.events()])
        return {**obj(text, run.outcome.finish_reason), "usage": _usage(run.outcome)}

    include_usage = bool((req.stream_options or {}).get("include_usage"))

    async def stream():
        try:
            async for _, val in run.events(poll_disconnect=False):
                yield _sse(obj(val, None))
        except APIError as e:
            yield _sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": e.code}})
            yield "data: [DONE]\n\n"
            return
        yield _sse(obj("", run.outcome.finish_reason))
        if include_usage:
            yield _sse({**obj("", None), "choices": [], "usage": _usage(run.outcome)})
        yield "data: [DONE]\n\n"

    return EventStream(stream(), on_close=run.close)


def _model_card(state: ServerState) -> dict:
    ctx = getattr(state.llm, "context_length", None)
    return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "offload",
            "context_length": ctx}


@router.get("/v1/models")
async def list_models(request: Request):
    state: ServerState = request.app.state.server
    state.guard(request)
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state: ServerState = request.app.state.server
    state.guard(request, model_id)
    return _model_card(state)

