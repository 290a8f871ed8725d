"""The server's front door, before any route runs: the API key, the body cap, request counting by known
route, and the checks a parsed JSON body passes before validation (nesting depth, lone surrogates).

A pure ASGI middleware, so streams pass through untouched and a too-large body is refused from its
Content-Length header alone, or as soon as the bytes read pass the cap, never after reading all of it."""

from __future__ import annotations

import json
from typing import Any

from offload.server.runner import APIError

MAX_BODY = 8 * 2**20  # bytes; --max-body. 8 MiB of JSON is ~2M tokens of text, more than any context here
MAX_DEPTH = 64  # JSON nesting levels; tool schemas nest a handful deep, recursion errors start near 1,000
OPEN_PATHS = ("/health",)  # what answers without the API key
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages", "/v1/messages/count_tokens",
          "/health", "/metrics")


def route_label(path: str) -> str:
    """The metrics label: a known route, or 'other' (labels must not grow with what strangers send)."""
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ROUTES else "other"


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def _key_of(headers: dict[bytes, bytes]) -> str | None:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1") if key is not None else None


class Front:
    """ASGI middleware: key check (all but /health), body cap, then the app; counts every request."""

    def __init__(self, app, state, render, max_body: int = MAX_BODY):
        self.app, self.state, self.render, self.max_body = app, state, render, max_body

    async def _refuse(self, scope, receive, send, e: APIError) -> None:
        await self.render(scope["path"], e)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            key = self.state.api_key
            if key and path not in OPEN_PATHS and _key_of(headers) != key:
                return await self._refuse(scope, receive, send_wrapper, APIError(
                    401, "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                    "authentication_error", code="invalid_api_key"))
            cap = self.max_body
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > cap):
                return await self._refuse(scope, receive, send_wrapper, too_large(cap))
            seen = 0

            async def capped_receive():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > cap:  # a chunked body without Content-Length: stop reading here
                        raise too_large(cap)
                return message

            await self.app(scope, capped_receive, send_wrapper)
        finally:
            self.state.metrics.request(route_label(path), status["code"])


def too_large(cap: int) -> APIError:
    return APIError(413, f"request body is larger than the server's limit of {cap} bytes (--max-body)",
                    "request_too_large", code="request_too_large")


def parse_body(body: bytes) -> dict:
    """JSON object from the body, refused with a 400 that names the problem: not JSON, not an object, nested
    deeper than MAX_DEPTH, or holding a lone UTF-16 surrogate (no tokenizer can encode one)."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise APIError(400, f"request body nests deeper than {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    check_tree(data)
    return data


def check_tree(data: Any) -> None:
    """Walk the parsed body without recursion: depth and strings (keys included)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise APIError(400, f"request body nests deeper than {MAX_DEPTH} levels (at {where or 'body'})",
                           param=where or None)
        if isinstance(node, dict):
            for k, v in node.items():
                _check_str(k, where or "body")
                stack.append((v, f"{where}.{k}" if where else k, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{where}.{i}", depth + 1) for i, v in enumerate(node))
        elif isinstance(node, str):
            _check_str(node, where)


def _check_str(s: str, where: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = s[e.start]
        raise APIError(400, f"{where}: contains a lone UTF-16 surrogate (\\u{ord(bad):04x}) at character "
                            f"{e.start}: not valid Unicode text", param=where or None) from None
