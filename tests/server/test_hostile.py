"""The probes that could stall or crash the server as it stood (issue 15, item 4), kept as tests: big bodies,
deep JSON, the key on every path, metrics labels, loose types, lone surrogates, huge stop lists, and a plain
request whose client leaves. Each gets one clear error in the API's own shape, and the server keeps serving."""

import json
import socket
import threading
import uuid

import anthropic
import httpx
import openai
import pytest

from offload.server.app import create_app
from tests.server.conftest import LiveServer
from tests.server.test_errors import openai_shape, still_serving
from tests.server.test_operations import wait_for

USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": "tiny-test", "messages": USER, "max_tokens": 2}
MSG = {"model": "tiny-test", "messages": USER, "max_tokens": 2}


def post(url, path, body, **kw):
    return httpx.post(url + path, timeout=30, **({"content": body} if isinstance(body, bytes) else {"json": body}),
                      **kw)


# --- bodies -------------------------------------------------------------------------------------------------

def test_body_cap_by_content_length_and_while_streaming(scripted):
    with LiveServer(create_app(scripted, max_body=4096)) as srv:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        r = post(srv.url, "/v1/chat/completions", big)
        assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "invalid_request_error"
        r = post(srv.url, "/v1/messages", {**big, "max_tokens": 2})
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

        def chunks():  # no Content-Length: the cap applies to the bytes as they arrive
            for _ in range(100):
                yield b" " * 1000
        r = httpx.post(srv.url + "/v1/chat/completions", content=chunks(), timeout=30)
        assert r.status_code == 413 and "--max-body" in r.json()["error"]["message"]
        # Refused from the header alone: the 413 comes back though not one byte of the body is sent.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 10000000\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 413")
        small = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 2


def test_health_answers_while_a_big_prompt_is_tokenised(live, scripted, monkeypatch):
    """Tokenising a big prompt takes seconds; here it blocks until /health has answered, which it can only
    do if that work runs off the event loop (on the loop, /health would wait and time out)."""
    from offload.server import runner

    entered, gate = threading.Event(), threading.Event()
    encode = runner.encode

    def slow_encode(tok, text, **kw):
        if len(text) > 100_000:
            entered.set()
            gate.wait(30)
        return encode(tok, text, **kw)

    monkeypatch.setattr(runner, "encode", slow_encode)
    body = {**CHAT, "messages": [{"role": "user", "content": "word salad " * 30_000}]}
    result = {}
    big = threading.Thread(target=lambda: result.update(r=post(live.url, "/v1/chat/completions", body)))
    big.start()
    try:
        assert entered.wait(30)
        assert httpx.get(live.url + "/health", timeout=5).status_code == 200
    finally:
        gate.set()
        big.join(60)
    assert result["r"].status_code == 400 and "context length" in result["r"].json()["error"]["message"]


# --- JSON shape ---------------------------------------------------------------------------------------------

def nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_json_is_a_400_in_each_shape(live, oai, ant, depth):
    body = json.dumps(CHAT)[:-1] + f', "metadata": {nested(depth)}}}'
    r = post(live.url, "/v1/chat/completions", body.encode())
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "nests deeper than" in r.json()["error"]["message"]
    r = post(live.url, "/v1/messages", (json.dumps(MSG)[:-1] + f', "metadata": {nested(depth)}}}').encode())
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error" and "nests deeper" in r.json()["error"]["message"]
    # deep inside a field the API reads
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny-test", max_tokens=2,
                                    messages=[{"role": "user", "content": json.loads(nested(900))}])
    assert "nests deeper than" in openai_shape(e.value, 400)
    still_serving(oai, ant)


def test_lone_surrogate_is_named(live, oai, ant):
    # the SDKs cannot even encode one; JSON's \ud800 escape carries it (json.dumps writes it so)
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "a\ud800b"}]}).encode()
    r = post(live.url, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"
    assert "lone UTF-16 surrogate (\\ud800)" in r.json()["error"]["message"]
    r = post(live.url, "/v1/messages", json.dumps({**MSG, "system": "\udfff"}).encode())
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    still_serving(oai, ant)


# --- the key, paths and metrics labels ------------------------------------------------------------------------

def test_key_guards_everything_but_health(scripted):
    with LiveServer(create_app(scripted, api_key="sesame")) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        for path in ("/metrics", "/v1/models", "/nope", "/v1/nope"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        r = httpx.post(srv.url + "/v1/messages", json=MSG)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        key = {"Authorization": "Bearer sesame"}
        assert httpx.get(srv.url + "/nope", headers=key).status_code == 404
        assert httpx.get(srv.url + "/metrics", headers={"x-api-key": "sesame"}).status_code == 200
        # the SDKs send the key their own way
        ant = anthropic.Anthropic(base_url=srv.url, api_key="sesame", max_retries=0, timeout=30)
        assert ant.messages.create(model="tiny-test", max_tokens=2, messages=USER).usage.output_tokens == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics_labels_are_known_routes_only(live):
    with httpx.Client(base_url=live.url, timeout=30) as client:  # one connection: 400 requests in ~1 s
        for _ in range(200):
            client.get(f"/v1/{uuid.uuid4().hex}")
            client.get(f"/{uuid.uuid4().hex}")
        text = client.get("/metrics").text
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in text.splitlines()
                 if line.startswith("offload_requests_total{")}
    assert endpoints <= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages",
                         "/v1/messages/count_tokens", "/health", "/metrics", "other"}
    line = next(x for x in text.splitlines() if x.startswith('offload_requests_total{endpoint="other",status="404"}'))
    assert float(line.rpartition(" ")[2]) >= 400
    assert len(text) < 20_000


# --- types --------------------------------------------------------------------------------------------------

OPENAI_BAD = {  # name: (changes to a chat request, the field the error names)
    "max_tokens string": ({"max_tokens": "5"}, "max_tokens"),
    "max_tokens bool": ({"max_tokens": True}, "max_tokens"),
    "stream string": ({"stream": "yes"}, "stream"),
    "temperature string": ({"temperature": "0.5"}, "temperature"),
    "text part not a string": ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
                               "messages[0].content[0].text"),
    "user without content": ({"messages": [{"role": "user"}]}, "messages[0].content"),
    "user null content": ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    "tool parameters string": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
                               "tools[0].function.parameters"),
    "tool without function": ({"tools": [{"type": "function"}]}, "tools[0].function"),
    "tool name not a string": ({"tools": [{"type": "function", "function": {"name": 5}}]},
                               "tools[0].function.name"),
}


@pytest.mark.parametrize("name", list(OPENAI_BAD))
def test_openai_types(live, oai, scripted, name):
    change, param = OPENAI_BAD[name]
    n_calls = len(scripted.calls)
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**{**CHAT, **change})
    assert openai_shape(e.value, 400, param=param)
    assert len(scripted.calls) == n_calls  # refused before generating


ANTHROPIC_BAD = {  # name: (changes to a messages request, a fragment of the message)
    "max_tokens string": ({"max_tokens": "5"}, "max_tokens"),
    "max_tokens bool": ({"max_tokens": True}, "max_tokens"),
    "stream string": ({"stream": "yes"}, "stream"),
    "text block not a string": ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
                                "messages.0.content.0.text"),
    "user null content": ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    "input_schema string": ({"tools": [{"name": "f", "input_schema": "x"}]}, "tools.0.input_schema"),
    "too many stop sequences": ({"stop_sequences": [f"s{i}" for i in range(10_000)]}, "stop_sequences"),
}


@pytest.mark.parametrize("name", list(ANTHROPIC_BAD))
def test_anthropic_types(live, scripted, name):
    change, fragment = ANTHROPIC_BAD[name]
    n_calls = len(scripted.calls)
    r = post(live.url, "/v1/messages", {**MSG, **change})
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert fragment in r.json()["error"]["message"]
    assert len(scripted.calls) == n_calls


def test_openai_stop_list_capped(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(**CHAT, stop=[f"s{i}" for i in range(10_000)])
    assert "at most 4" in openai_shape(e.value, 400, param="stop")


# --- a plain request whose client leaves ---------------------------------------------------------------------

def test_non_stream_disconnect_stops_within_one_step(live, scripted):
    scripted.token_delay = 0.05  # 400 tokens would take 20 s
    before = scripted.closed_early
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", timeout=0.6,
                   json={"model": "tiny-test", "messages": USER, "max_tokens": 400})
    at_leave = scripted.calls[-1].get("emitted", 0)
    assert wait_for(lambda: scripted.closed_early == before + 1)
    # the token being computed when the client left may still finish; no other
    assert scripted.calls[-1]["emitted"] <= at_leave + 2
    assert wait_for(lambda: live.state.scheduler.running == 0)
