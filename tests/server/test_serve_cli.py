"""`offload serve` as a user runs it: a subprocess on a free loopback port, then both SDKs against it."""

import socket
import subprocess

import anthropic
import httpx
import openai

from tests.commands import offload_command, wait_healthy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_subprocess(tiny_checkpoint, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([*offload_command(), "serve", str(tiny_checkpoint), "--port", str(port),
                             "--ctx", "256", "--api-key", "k3y", "--model-name", "tiny"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, tmp_path / "serve.log")
        oai = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=60)
        r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       temperature=0)
        assert r.usage.completion_tokens == 4  # greedy: sampling (the APIs' default) may pick an eos first
        ant = anthropic.Anthropic(base_url=url, api_key="k3y", max_retries=0, timeout=60)
        assert ant.messages.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"temperature": 0}).usage.output_tokens == 3
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert f"OpenAI API     {url}/v1" in text and f"curl {url}/v1/chat/completions" in text
    assert "Bearer $KEY" in text


def test_serve_bad_model_path(tmp_path):
    r = subprocess.run([*offload_command(), "serve", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "nope" in r.stderr


def test_serve_bad_cache_mem_and_max_body(tiny_checkpoint):
    for option, value in (("--cache-mem", "lots"), ("--max-body", "0")):
        r = subprocess.run([*offload_command(), "serve", str(tiny_checkpoint), option, value], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.strip().startswith("error:") and option in r.stderr, r.stderr
