"""Anthropic Messages API: /v1/messages (plain and streamed) and /v1/messages/count_tokens."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from offload.server.runner import (
    APIError, Run, ServerState, make_parser, max_new_tokens, off_loop, parse_request, render_chat, thinking_kwargs,
)
from offload.server.sse import EventStream

router = APIRouter()

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


MAX_STOPS = 16  # each stop string is searched after every token: thousands of them slow every request


class _Base(BaseModel):
    # strict: "5" is not a number and "yes" not a boolean (lax mode would take both)
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[dict] = Field(min_length=1)
    system: str | list[dict] | None = None
    tools: list[dict] | None = None
    tool_choice: dict | None = None
    thinking: dict | None = None
    output_config: dict | None = None


class MessagesRequest(_Base):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    metadata: dict | None = None


def anthropic_error(e: APIError) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": e.kind, "message": e.message}}, status_code=e.status)


def _text_blocks(content: Any, where: str) -> str:
    """Text of a string or of a list of text blocks (system prompts, tool results)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}: expected a string or a list of text blocks")
    parts = []
    for i, b in enumerate(content):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise APIError(400, f"{where}[{i}]: block type {kind!r} is not supported here (text only)")
        parts.append(b["text"])
    return "\n".join(parts)


def to_chat_messages(system: Any, messages: list[dict]) -> list[dict]:
    """Anthropic conversation -> the OpenAI-style messages chat templates expect."""
    out: list[dict] = []
    sys_text = _text_blocks(system, "system")
    if sys_text:
        out.append({"role": "system", "content": sys_text})
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant"):
            raise APIError(400, f"{where}.role: expected 'user' or 'assistant', got {role!r}")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content: expected a string or a list of content blocks")
        texts, thinking, calls = [], [], []
        for j, b in enumerate(content):
            kind = b.get("type") if isinstance(b, dict) else None
            bw = f"{where}.content.{j}"
            if kind == "text":
                if not isinstance(b.get("text"), str):
                    raise APIError(400, f"{bw}.text: expected a string")
                texts.append(b["text"])
            elif kind == "tool_result" and role == "user":
                result = _text_blocks(b.get("content"), f"{bw}.content")
                if b.get("is_error"):
                    result = "Error: " + result
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": result})
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise APIError(400, f"{bw}: tool_use needs a 'name' string and an 'input' object")
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b["name"], "arguments": b.get("input", {})}})
            elif kind == "thinking" and role == "assistant":
                thinking.append(str(b.get("thinking", "")))
            elif kind == "redacted_thinking":
                continue
            else:
                raise APIError(400, f"{bw}.type: block type {kind!r} is not supported in a {role} message")
        if role == "user":
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
            continue
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if thinking:
            msg["reasoning_content"] = "".join(thinking)
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def to_openai_tools(tools: list[dict] | None, choice: dict | None) -> list[dict] | None:
    kind = (choice or {}).get("type", "auto")
    if kind not in ("auto", "none"):
        raise APIError(400, f"tool_choice.type: only 'auto' and 'none' are supported (no constrained decoding), "
                            f"got {kind!r}")
    if not tools or kind == "none":
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t.get("name"), str):
            raise APIError(400, f"tools.{i}.name: required string")
        if t.get("type") not in (None, "custom"):
            raise APIError(400, f"tools.{i}.type: server tool {t.get('type')!r} is not supported")
        for key, kind in (("input_schema", dict), ("description", str)):
            if t.get(key) is not None and not isinstance(t[key], kind):
                raise APIError(400, f"tools.{i}.{key}: expected {'an object' if kind is dict else 'a string'}")
        out.append({"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                     "parameters": t.get("input_schema") or {"type": "object"}}})
    return out


def _thinking(req: _Base) -> dict:
    kind = (req.thinking or {}).get("type")
    effort = (req.output_config or {}).get("effort")
    kw = {"reasoning_effort": effort} if isinstance(effort, str) else {}  # GLM-5.x templates read it
    if kind is None:
        return kw
    if kind not in ("enabled", "disabled", "adaptive"):
        raise APIError(400, f"thinking.type: expected 'enabled', 'adaptive' or 'disabled', got {kind!r}")
    return {**thinking_kwargs(kind != "disabled"), **kw}


def _prompt(state: ServerState, req: _Base) -> tuple[list[int], str, list[dict] | None]:
    tools = to_openai_tools(req.tools, req.tool_choice)
    ids, text = render_chat(state.llm, to_chat_messages(req.system, req.messages), tools, _thinking(req))
    return ids, text, tools


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request):
    state, req = await parse_request(request, _Base)
    ids, _, _ = await off_loop(_prompt, state, req)
    return {"input_tokens": len(ids)}


@router.post("/v1/messages")
async def messages(request: Request):
    state, req = await parse_request(request, MessagesRequest)
    if len(req.stop_sequences or ()) > MAX_STOPS:
        raise APIError(400, f"stop_sequences: at most {MAX_STOPS} stop sequences, got {len(req.stop_sequences)}")
    prompt, prompt_text, tools = await off_loop(_prompt, state, req)
    max_new = max_new_tokens(state.llm, len(prompt), req.max_tokens)
    kw: dict[str, Any] = {"max_new_tokens": max_new, "temperature": 1.0 if req.temperature is None else req.temperature}
    if req.top_p is not None:
        kw["top_p"] = req.top_p
    if req.top_k is not None:
        kw["top_k"] = req.top_k
    run = await Run.start(state, request, prompt, kw, req.stop_sequences, make_parser(state, prompt_text, tools))
    mid = "msg_" + uuid.uuid4().hex[:24]

    def stop_reason(has_calls: bool) -> tuple[str, str | None]:
        o = run.outcome
        if o.stop_sequence is not None:
            return "stop_sequence", o.stop_sequence
        if has_calls and o.finish_reason == "stop":
            return "tool_use", None
        return STOP_REASONS[o.finish_reason], None

    def message(content: list, reason: str | None, seq: str | None, out_tokens: int) -> dict:
        return {"id": mid, "type": "message", "role": "assistant", "model": state.model_name, "content": content,
                "stop_reason": reason, "stop_sequence": seq,
                "usage": usage(out_tokens)}

    def usage(out_tokens: int) -> dict:
        # Anthropic counts cache reads apart: input_tokens + cache_read_input_tokens is the whole prompt
        o = run.outcome
        return {"input_tokens": o.prompt_tokens - o.cached_tokens, "output_tokens": out_tokens,
                "cache_read_input_tokens": o.cached_tokens}

    if not req.stream:
        blocks: list[dict] = []
        async for kind, val in run.events():
            if kind == "tool_call":
                blocks.append({"type": "tool_use", "id": "toolu_" + val.id[5:], "name": val.name,
                               "input": val.input()})
                continue
            field = "thinking" if kind == "reasoning" else "text"
            if not blocks or blocks[-1]["type"] != field:
                blocks.append({"type": field, field: ""} | ({"signature": ""} if field == "thinking" else {}))
            blocks[-1][field] += val
        has_calls = any(b["type"] == "tool_use" for b in blocks)
        for b in blocks:
            if b["type"] == "thinking":
                b["thinking"] = b["thinking"].strip()
            elif b["type"] == "text" and has_calls:
                b["text"] = b["text"].strip()
        blocks = [b for b in blocks if b["type"] == "tool_use" or b[b["type"]]] or [{"type": "text", "text": ""}]
        reason, seq = stop_reason(has_calls)
        return message(blocks, reason, seq, run.outcome.completion_tokens)

    async def stream():
        yield _sse("message_start", {"type": "message_start", "message": message([], None, None, 0)})
        yield _sse("ping", {"type": "ping"})
        index, open_kind, has_calls = -1, None, False

        def close_block():
            return _sse("content_block_stop", {"type": "content_block_stop", "index": index})

        try:
            async for kind, val in run.events(poll_disconnect=False):
                if kind == "tool_call":
                    if open_kind:
                        yield close_block()
                    index, open_kind, has_calls = index + 1, None, True
                    block = {"type": "tool_use", "id": "toolu_" + val.id[5:], "name": val.name, "input": {}}
                    yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                                       "content_block": block})
                    yield _sse("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {
                        "type": "input_json_delta", "partial_json": val.arguments}})
                    yield close_block()
                    continue
                field = "thinking" if kind == "reasoning" else "text"
                if open_kind != field:
                    if open_kind:
                        yield close_block()
                    index, open_kind = index + 1, field
                    block = {"type": field, field: ""} | ({"signature": ""} if field == "thinking" else {})
                    yield _sse("content_block_start", {"type": "content_block_start", "index": index,
                                                       "content_block": block})
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                   "delta": {"type": f"{field}_delta", field: val}})
        except APIError as e:
            yield _sse("error", {"type": "error", "error": {"type": e.kind, "message": e.message}})
            return
        if open_kind:
            yield close_block()
        reason, seq = stop_reason(has_calls)
        yield _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
                                     "usage": usage(run.outcome.completion_tokens)})
        yield _sse("message_stop", {"type": "message_stop"})

    return EventStream(stream(), on_close=run.close)
