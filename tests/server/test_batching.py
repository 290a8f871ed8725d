"""Continuous batching and the KV budget in the server, over a real tiny qwen3_moe model: concurrent streams
(different max_tokens / stop / temperature) each equal their solo run while decoding in shared steps, a client
that leaves frees its sequence for the queued request, and requests past the KV budget queue, then get 503
with Retry-After past --max-queue.

The batch is made certain, not left to timing: the test holds the Batcher's lock while the requests arrive
(every sequence then waits for its first forward), then lets them all go."""

import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

import offload
from offload.server.app import create_app
from tests.server.conftest import LiveServer

PROMPTS = ["The weather today is", "Mixture of experts models route", "A cache holds"]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return offload.load(tiny_checkpoint, device="cpu", ctx=512, progress=False)


def wait_for(cond, what: str) -> None:
    for _ in range(1000):  # bounded: 10 s
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def held(srv):
    """Steps wait while inside: admitted sequences pile up at their first forward."""
    batcher = srv.state.scheduler.llm.batcher
    batcher.cv.acquire()
    try:
        yield batcher
    finally:
        batcher.cv.release()


def stream_text(client, model, out, i, **kw):
    text = "".join(c.choices[0].text for c in client.completions.create(model=model, stream=True, **kw))
    out[i] = text


def test_concurrent_streams_equal_their_solo_runs(llm):
    solo_free = llm.generate(PROMPTS[1], max_new_tokens=40, temperature=0.0).text
    stop = solo_free[len(solo_free) // 2: len(solo_free) // 2 + 3]  # a piece of its greedy text: it stops there
    asks = [dict(prompt=PROMPTS[0], max_tokens=12, temperature=0.0),
            dict(prompt=PROMPTS[1], max_tokens=40, temperature=0.0, stop=[stop]),
            dict(prompt=PROMPTS[2], max_tokens=30, temperature=0.8, seed=7)]
    refs = [llm.generate(a["prompt"], max_new_tokens=a["max_tokens"], temperature=a["temperature"],
                         stop=a.get("stop"), seed=a.get("seed")).text for a in asks]
    assert refs[1] == solo_free[: solo_free.index(stop)]
    with LiveServer(create_app(llm, max_concurrency=4)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=60)
        got = [None] * len(asks)
        threads = [threading.Thread(target=stream_text, args=(client, llm.model_name, got, i), kwargs=a)
                   for i, a in enumerate(asks)]
        with held(srv) as batcher:
            for t in threads:
                t.start()
            wait_for(lambda: srv.state.scheduler.running == len(asks), "all three admitted")
            time.sleep(0.2)  # each worker reaches its first forward (waiting on the held lock)
        for t in threads:
            t.join(60)
        assert got == refs
        assert batcher.rows > batcher.steps  # steps ran several sequences
        # a stream's last chunk reaches the client before its worker leaves the batch and frees its slot
        wait_for(lambda: batcher.members == 0 and srv.state.scheduler.running == 0, "every slot freed")
        text = httpx.get(srv.url + "/metrics").text
        assert f"offload_batch_steps_total {batcher.steps}" in text
        assert f"offload_batch_sequences_total {batcher.rows}" in text and "offload_kv_reserved_positions 0" in text


def test_client_leaving_frees_its_sequence_for_the_queued_request(llm):
    with LiveServer(create_app(llm, max_concurrency=2)) as srv:
        sched = srv.state.scheduler
        body = {"model": llm.model_name, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "stream": True}
        url = srv.url + "/v1/completions"
        with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b, \
                a.stream("POST", url, json=body) as stream_a, b.stream("POST", url, json=body) as stream_b:
            lines_a, lines_b = stream_a.iter_lines(), stream_b.iter_lines()
            next(lines_a), next(lines_b)  # both are generating
            done: dict = {}
            third = threading.Thread(target=lambda: done.update(r=httpx.post(url, timeout=60, json={
                **body, "prompt": PROMPTS[2], "max_tokens": 8, "stream": False})))
            third.start()
            wait_for(lambda: sched.waiting == 1, "the third request queued")
            stream_a.close()  # client A leaves mid-stream
            third.join(60)
            assert done["r"].status_code == 200 and done["r"].json()["usage"]["completion_tokens"] == 8
            # B still streams: the third ran in A's freed slot, beside it
            wait_for(lambda: sched.running == 1, "the third's slot given back")
            line = next(x for x in lines_b if x)
            assert line.startswith("data: {") and '"finish_reason":null' in line.replace(" ", "")
            stream_b.close()
        wait_for(lambda: sched.running == 0, "B's sequence freed")


def test_kv_budget_queues_then_503_with_retry_after(llm):
    with LiveServer(create_app(llm, max_concurrency=4, kv_budget=100, max_queue=1)) as srv:
        sched = srv.state.scheduler
        url = srv.url + "/v1/completions"
        body = {"model": llm.model_name, "prompt": PROMPTS[0], "max_tokens": 80, "temperature": 0}
        n_prompt = len(llm.tokenizer.encode(PROMPTS[0], add_special_tokens=True))
        results: dict = {}

        def post(key):
            results[key] = httpx.post(url, json=body, timeout=60)

        first, second = threading.Thread(target=post, args=("a",)), threading.Thread(target=post, args=("b",))
        with held(srv):
            first.start()
            wait_for(lambda: sched.running == 1, "the first admitted")
            assert sched.kv_reserved == n_prompt + 80
            second.start()  # a free slot, but its 80 + prompt positions do not fit beside the first's
            wait_for(lambda: sched.waiting == 1, "the second queued")
            assert sched.running == 1
            r = httpx.post(url, json=body, timeout=60)  # the queue (1) is full
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "max-queue" in r.json()["error"]["message"]
        first.join(60)
        second.join(60)
        assert results["a"].status_code == results["b"].status_code == 200
        assert results["a"].json()["choices"][0]["text"] == results["b"].json()["choices"][0]["text"]
        wait_for(lambda: sched.kv_reserved == 0 and sched.running == 0, "both reservations given back")


def test_prefix_cache_with_several_live_sequences(llm):
    """Two conversations, each in its own slot: their next turns, arriving together, both resume."""
    a1, b1 = "Experts in a mixture are chosen by a router " * 3, "The quick brown fox jumps over the dog " * 3
    with LiveServer(create_app(llm, max_concurrency=2)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=60)
        for p in (a1, b1):
            client.completions.create(model=llm.model_name, prompt=p, max_tokens=4, temperature=0)
        got = [None, None]

        def turn(i, p):
            got[i] = client.completions.create(model=llm.model_name, prompt=p, max_tokens=4, temperature=0)

        threads = [threading.Thread(target=turn, args=(i, p + " and then more")) for i, p in enumerate((a1, b1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for r, p in zip(got, (a1, b1)):
            n = len(llm.tokenizer.encode(p, add_special_tokens=True))
            assert r.usage.prompt_tokens_details.cached_tokens >= n - 2  # (the last token may re-tokenise)
            ref = llm.generate(p + " and then more", max_new_tokens=4, temperature=0.0).text
            assert r.choices[0].text == ref


def test_a_stalled_reader_does_not_stop_the_others(llm):
    """A caller that stops reading its stream (its sequence still running) holds the others' steps up at most
    GATHER_WAIT each, not forever."""
    from offload.server.batching import BatchLLM

    engine = BatchLLM(llm, 2)
    try:
        stalled = engine.stream_chunks(PROMPTS[0], max_new_tokens=50, temperature=0.0)
        next(stalled)  # joined the batch, then not read again
        text = "".join(c.text for c in engine.stream_chunks(PROMPTS[1], max_new_tokens=8, temperature=0.0))
        assert text == llm.generate(PROMPTS[1], max_new_tokens=8, temperature=0.0).text
        stalled.close()
        assert engine.batcher.members == 0
    finally:
        engine.close()


def test_max_queue_zero_still_serves_a_free_slot(llm):
    with LiveServer(create_app(llm, max_queue=0)) as srv:
        r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "model": llm.model_name, "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200
