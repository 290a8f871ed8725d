"""A live uvicorn server on 127.0.0.1 (free port) in a thread, serving a scripted or a real tiny model."""

from __future__ import annotations

import socket
import threading
import time

import anthropic
import openai
import pytest
import uvicorn

from offload.server.app import create_app
from tests.server.fake_llm import make_scripted_llm


class LiveServer:
    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit it: without it each keep-alive response waited ~40 ms for a delayed ACK
        # (uvicorn sets it when it binds the port itself, as `offload serve` does)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        for _ in range(200):  # bounded: 10 s
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    @property
    def state(self):
        return self.app.state.server


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random qwen3_moe checkpoint (transformers' save_pretrained + the test tokenizer)."""
    pytest.importorskip("transformers")
    from offload.testing import make_tiny_checkpoint

    return make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe") / "tiny-qwen3-moe")


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    return make_scripted_llm(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def live(scripted):
    with LiveServer(create_app(scripted, max_queue=64)) as srv:
        yield srv


@pytest.fixture
def oai(live):
    """The official OpenAI SDK against the live test server."""
    return openai.OpenAI(base_url=live.url + "/v1", api_key="k", max_retries=0, timeout=30)


@pytest.fixture
def ant(live):
    """The official Anthropic SDK against the live test server."""
    return anthropic.Anthropic(base_url=live.url, api_key="k", max_retries=0, timeout=30)


@pytest.fixture(autouse=True)
def _reset_script(scripted):
    scripted.script.clear()
    scripted.token_delay = 0.0
    yield
    scripted.script.clear()
    scripted.token_delay = 0.0
