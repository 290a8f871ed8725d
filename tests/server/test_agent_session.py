"""A coding agent's conversation, driven the way Claude Code drives the Anthropic endpoint: system prompt + tool
definitions, streamed replies, tool_use -> tool_result, five turns, against `offload serve` in its own process
over a tiny real model. Each turn resends the whole conversation; turns 2-5 must resume after the previous
turn's prompt (the prefix cache, read from /metrics) and compute only the tokens that are new.

A random tiny model cannot decide to call a tool, so each turn's tool call is written into the history as the
harness would have received it; the server sees exactly what an agent sends."""

import json
import subprocess

import anthropic
import httpx
import pytest

from tests.commands import offload_command, wait_healthy
from tests.server.test_serve_cli import free_port

SYSTEM = ("You are a coding agent working in a git repository. Read files before you change them, keep "
          "changes small, run the tests after every change and report what you did. " * 6)
TOOLS = [
    {"name": "read_file", "description": "Read a file of the repository.",
     "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}},
    {"name": "run", "description": "Run a shell command in the repository and return its output.",
     "input_schema": {"type": "object", "properties": {"command": {"type": "string"},
                                                       "timeout": {"type": "integer"}}, "required": ["command"]}},
]


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("offload_prefix_cache"):
            name, _, v = line.rpartition(" ")
            out[name] = float(v)
    return out


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("agent") / "serve.log"
    log = open(log_path, "w+")
    proc = subprocess.Popen([*offload_command(), "serve", str(tiny_checkpoint), "--port", str(port), "--ctx", "4096",
                             "--model-name", "tiny"], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_five_turns_resume_after_the_last(server):
    client = anthropic.Anthropic(base_url=server, api_key="none", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "The tests in tests/server fail since this morning. Find out why."}]
    before = metrics(server)
    prompts, reused, computed = [], [], []
    for turn in range(5):
        n_prompt = client.messages.count_tokens(model="tiny", system=SYSTEM, tools=TOOLS,
                                                messages=messages).input_tokens
        with client.messages.stream(model="tiny", system=SYSTEM, tools=TOOLS, messages=messages, max_tokens=12,
                                    extra_body={"temperature": 0}) as stream:
            deltas = [e for e in stream if e.type == "content_block_delta"]
            reply = stream.get_final_message()
        assert deltas and reply.usage.output_tokens >= 1
        usage = reply.usage
        assert usage.input_tokens + usage.cache_read_input_tokens == n_prompt
        after = metrics(server)
        prompts.append(n_prompt)
        reused.append(after["offload_prefix_cache_tokens_reused_total"] - before["offload_prefix_cache_tokens_reused_total"])
        computed.append(n_prompt - reused[-1])
        assert usage.cache_read_input_tokens == reused[-1]
        if turn:
            assert after["offload_prefix_cache_hits_total"] == before["offload_prefix_cache_hits_total"] + 1
        before = after
        # the agent's side: the reply, the tool call it carried, and the tool's result
        call = {"type": "tool_use", "id": f"toolu_{turn:02d}", "name": "run",
                "input": {"command": f"pytest -q tests/server -k case{turn}"}}
        text = [{"type": "text", "text": b.text} for b in reply.content if b.type == "text" and b.text.strip()]
        messages.append({"role": "assistant", "content": text + [call]})
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": call["id"],
                                                      "content": f"{turn + 3} passed, 1 failed: case{turn} "
                                                                 f"(AssertionError: expected {turn}, got {turn + 1})"}]})
    print(json.dumps({"prompt": prompts, "reused": reused, "computed": computed}))
    assert reused[0] == 0 and computed[0] == prompts[0]
    for k in range(1, 5):
        # all of the previous prompt is reused; only what the last turn added is computed
        assert reused[k] >= prompts[k - 1] - 1
        assert computed[k] <= prompts[k] - prompts[k - 1] + 1


def test_openai_and_anthropic_share_the_cache(server):
    import openai

    question = "Which file defines the server's routes?"
    oai = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)
    r = oai.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "system", "content": SYSTEM + " (shared)"}, {"role": "user", "content": question}])
    before = metrics(server)
    ant = anthropic.Anthropic(base_url=server, api_key="none", max_retries=0, timeout=120)
    m = ant.messages.create(model="tiny", max_tokens=4, system=SYSTEM + " (shared)",
                            messages=[{"role": "user", "content": question}])
    # the same conversation rendered by the same template: all of it but the last token comes from the cache
    assert m.usage.cache_read_input_tokens >= r.usage.prompt_tokens - 1 and m.usage.input_tokens <= 1
    assert metrics(server)["offload_prefix_cache_hits_total"] == before["offload_prefix_cache_hits_total"] + 1
