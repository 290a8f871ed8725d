"""Every error case in each API's own JSON shape, raised through the official clients (raw HTTP only where
a client cannot send the fault, e.g. malformed JSON), and the server still serves after each one."""

import threading

import anthropic
import httpx
import openai
import pytest

from offload.errors import RequestError
from offload.server.app import create_app
from tests.server.conftest import LiveServer

LONG = "word " * 2000  # ~2000 tokens, past the 1024-token test context
USER = [{"role": "user", "content": "hi"}]


def still_serving(oai, ant):
    assert oai.chat.completions.create(model="tiny-test", messages=USER, max_tokens=2).usage.completion_tokens == 2
    assert ant.messages.create(model="tiny-test", messages=USER, max_tokens=2).usage.output_tokens == 2


def openai_shape(exc, status, param=None, code=None):
    assert exc.status_code == status
    err = exc.response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err["message"]


def anthropic_shape(exc, status, kind="invalid_request_error"):
    assert exc.status_code == status
    body = exc.response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    return body["error"]["message"]


OPENAI_CASES = {  # name: (kwargs for chat.completions.create, status, param, message fragment)
    "missing messages": (dict(model="tiny-test"), 400, "messages", "Field required"),
    "messages wrong type": (dict(model="tiny-test", messages="hi"), 400, "messages", "list"),
    "temperature wrong type": (dict(model="tiny-test", messages=USER, temperature="hot"), 400, "temperature", ""),
    "unknown model": (dict(model="gpt-9", messages=USER), 404, "model", "gpt-9"),
    "prompt too long": (dict(model="tiny-test", messages=[{"role": "user", "content": LONG}]), 400, "messages",
                        "context length is 1024"),
    "prompt + max_tokens too long": (dict(model="tiny-test", messages=USER, max_tokens=1020), 400, "max_tokens",
                                     "context length is 1024"),
    "temperature out of range": (dict(model="tiny-test", messages=USER, temperature=5), 400, "temperature", "2"),
    "n > 1": (dict(model="tiny-test", messages=USER, n=3), 400, "n", "n"),
    "logprobs": (dict(model="tiny-test", messages=USER, logprobs=True), 400, "logprobs", "logprobs"),
    "tool_choice required": (dict(model="tiny-test", messages=USER, tool_choice="required"), 400, "tool_choice", ""),
    "bad role": (dict(model="tiny-test", messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", ""),
    "image part": (dict(model="tiny-test", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]), 400, "messages[0].content", "image_url"),
}


@pytest.mark.parametrize("case", sorted(OPENAI_CASES))
def test_openai_errors(oai, ant, case):
    kwargs, status, param, fragment = OPENAI_CASES[case]
    model = kwargs.pop("model")
    messages = kwargs.pop("messages", openai.omit)
    with pytest.raises(openai.APIStatusError) as ei:
        oai.chat.completions.create(model=model, messages=messages, **kwargs)
    msg = openai_shape(ei.value, status, param)
    assert fragment in msg
    still_serving(oai, ant)


def test_openai_context_error_code(oai):
    with pytest.raises(openai.BadRequestError) as ei:
        oai.completions.create(model="tiny-test", prompt=LONG, max_tokens=5)
    openai_shape(ei.value, 400, code="context_length_exceeded")


ANTHROPIC_CASES = {  # name: (kwargs for messages.create, status, error type, message fragment)
    "missing max_tokens": (dict(model="tiny-test", messages=USER, max_tokens=openai.omit), 400,
                           "invalid_request_error", "max_tokens"),
    "messages wrong type": (dict(model="tiny-test", messages="hi", max_tokens=5), 400, "invalid_request_error",
                            "messages"),
    "unknown model": (dict(model="claude-x", messages=USER, max_tokens=5), 404, "not_found_error", "claude-x"),
    "prompt too long": (dict(model="tiny-test", messages=[{"role": "user", "content": LONG}], max_tokens=5), 400,
                        "invalid_request_error", "context length is 1024"),
    "max_tokens too big": (dict(model="tiny-test", messages=USER, max_tokens=5000), 400, "invalid_request_error",
                           "context length is 1024"),
    "temperature out of range": (dict(model="tiny-test", messages=USER, max_tokens=5,
                                      extra_body={"temperature": 1.5}), 400, "invalid_request_error", "temperature"),
    "bad role": (dict(model="tiny-test", messages=[{"role": "system", "content": "x"}], max_tokens=5), 400,
                 "invalid_request_error", "role"),
    "image block": (dict(model="tiny-test", max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]), 400,
                    "invalid_request_error", "image"),
    "tool_choice any": (dict(model="tiny-test", messages=USER, max_tokens=5, tool_choice={"type": "any"}), 400,
                        "invalid_request_error", "tool_choice"),
}


@pytest.mark.parametrize("case", sorted(ANTHROPIC_CASES))
def test_anthropic_errors(oai, ant, case):
    kwargs, status, kind, fragment = ANTHROPIC_CASES[case]
    kwargs = {k: v for k, v in kwargs.items() if v is not openai.omit}
    if "max_tokens" not in kwargs:  # the client refuses to send it: raw HTTP
        r = httpx.post(ant.base_url.__str__().rstrip("/") + "/v1/messages", json=kwargs)
        exc = anthropic.APIStatusError("", response=r, body=r.json())
    else:
        with pytest.raises(anthropic.APIStatusError) as ei:
            ant.messages.create(**kwargs)
        exc = ei.value
    assert fragment in anthropic_shape(exc, status, kind)
    still_serving(oai, ant)


def test_malformed_json_and_unknown_routes(live, oai, ant):
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(live.url + path, content=b'{"model": "tiny-test", "messages": [', headers={
            "content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = httpx.post(live.url + path, content=b"{nope", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(live.url + "/v1/messages", json=["a list"])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(live.url + "/v1/nothing").json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(live.url + "/v1/messages").status_code == 405
    still_serving(oai, ant)


def test_engine_refusal_becomes_400(live, oai, ant, scripted):
    # A value only the engine checks: its RequestError becomes a 400 before any token, or an error event
    # in a stream whose 200 headers are already out.
    scripted.raise_next = RequestError("repetition_penalty: the engine wants something else")
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model="tiny-test", messages=USER, max_tokens=2)
    assert "repetition_penalty" in openai_shape(ei.value, 400)
    scripted.raise_next = RequestError("repetition_penalty: the engine wants something else")
    with pytest.raises(anthropic.BadRequestError) as ei:
        ant.messages.create(model="tiny-test", messages=USER, max_tokens=2)
    assert "repetition_penalty" in anthropic_shape(ei.value, 400)

    scripted.raise_next = RequestError("top_k: nope")
    with pytest.raises(openai.APIError) as ei:
        list(oai.chat.completions.create(model="tiny-test", messages=USER, max_tokens=2, stream=True))
    assert "top_k: nope" in str(ei.value)
    scripted.raise_next = RuntimeError("kernel exploded")
    with pytest.raises(anthropic.APIStatusError) as ei:
        list(ant.messages.create(model="tiny-test", messages=USER, max_tokens=2, stream=True))
    assert "kernel exploded" in str(ei.value)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="tiny-test", prompt=[5, 10**9], max_tokens=2)
    still_serving(oai, ant)


def test_api_key(scripted):
    with LiveServer(create_app(scripted, api_key="s3cret")) as srv:
        bad_o = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        bad_a = anthropic.Anthropic(base_url=srv.url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as ei:
            bad_o.chat.completions.create(model="tiny-test", messages=USER, max_tokens=2)
        openai_shape(ei.value, 401, code="invalid_api_key")
        with pytest.raises(anthropic.AuthenticationError) as ei:
            bad_a.messages.create(model="tiny-test", messages=USER, max_tokens=2)
        anthropic_shape(ei.value, 401, "authentication_error")
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # health stays open for probes
        good_o = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        good_a = anthropic.Anthropic(base_url=srv.url, api_key="s3cret", max_retries=0)  # sends x-api-key
        still_serving(good_o, good_a)


def test_health_while_loading(scripted):
    release = threading.Event()

    def loader():
        assert release.wait(30)
        return scripted

    with LiveServer(create_app(loader=loader, model_name="tiny-test")) as srv:
        assert httpx.get(srv.url + "/health").status_code == 503
        r = httpx.post(srv.url + "/v1/messages", json={"model": "tiny-test", "max_tokens": 2, "messages": USER})
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny-test", "messages": USER})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        release.set()
        for _ in range(100):  # bounded: 5 s
            if httpx.get(srv.url + "/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "model": "tiny-test"}
        still_serving(openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0),
                      anthropic.Anthropic(base_url=srv.url, api_key="k", max_retries=0))
