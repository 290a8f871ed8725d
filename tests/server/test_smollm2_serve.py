"""`offload serve --demo` as a user runs it: the real demo model (SmolLM2-135M-Instruct) answers the capital
question through the OpenAI and the Anthropic SDKs, greedy, with the file's own chat template."""

import os
import subprocess

import anthropic
import openai

from offload.demo import NAME, PROMPT
from tests.commands import offload_command, wait_healthy
from tests.gguf.smollm2 import smollm2_path
from tests.server.test_serve_cli import free_port


def test_serve_demo_answers_through_both_sdks(tmp_path):
    src = smollm2_path()
    (tmp_path / "offload" / "demo").mkdir(parents=True)
    os.symlink(src, tmp_path / "offload" / "demo" / src.name)
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([*offload_command(), "serve", "--demo", "--port", str(port), "--ctx", "1024"],
                            stdout=log, stderr=log, env=dict(os.environ, XDG_CACHE_HOME=str(tmp_path)))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, tmp_path / "serve.log")
        msgs = [{"role": "user", "content": PROMPT}]
        oai = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in oai.models.list().data] == [NAME]
        r = oai.chat.completions.create(model=NAME, messages=msgs, max_tokens=32, temperature=0)
        assert "Paris" in r.choices[0].message.content, r.choices[0].message.content
        ant = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=120)
        m = ant.messages.create(model=NAME, max_tokens=32, messages=msgs, extra_body={"temperature": 0})
        text = "".join(b.text for b in m.content if b.type == "text")
        assert "Paris" in text, text
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
