"""The server's continuous batching with graphs on (offload.server.batching.Batcher): a step where every
sequence decodes one token runs one recorded static step (offload.graphs.DecodeStep) for exactly that set of
sequences; steps with a prompt chunk stay forward_segments. Three concurrent requests (different prompt lengths,
so the prefill chunks and decode tokens mix; different lengths, so the set changes as they finish) each equal
their solo run; a second round in the same slots (shrunk when given back) too, and a third repeating the
second's prompts (the prefix cache resumes each slot one token short of its prompt: that 1-token prefill chunk
joins the recorded steps)."""

import threading
from types import SimpleNamespace

import pytest
import torch

import offload
from offload.graphs import capture_blocker
from offload.prefix_cache import enable
from offload.server import batching
from offload.server.batching import BatchLLM
from offload.testing import make_tiny_checkpoint

MAX_NEW = [5, 9, 13]


@pytest.fixture(scope="module", params=[("qwen3_moe", True), ("glm_moe_dsa", False)],
                ids=["qwen3_moe-recorded", "glm_moe_dsa-function"])
def llm(request, tmp_path_factory):
    """sync_free: the expert groups on their GPU-home static path, so the step is recorded (offload.graphs'
    CPU emulation, replayed on the same tensors as a CUDA graph is); else the step function runs."""
    pytest.importorskip("transformers")
    arch, sync_free = request.param
    path = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch) / arch)
    llm = offload.load(path, device="cpu", ctx=320, dtype="float32", progress=False, graphs=True)
    for moe in llm.model.moe_layers() if sync_free else ():
        for g in moe.groups:
            g.sync_free = True
    assert (capture_blocker(llm.model) is None) == sync_free
    return llm


def prompts(vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 30, 270)]


def concurrent(engine: BatchLLM, asks: list[list[int]]) -> list[list[int]]:
    """Each prompt in its own thread, started together: the tokens each generated."""
    out: list = [None] * len(asks)

    def run(i):
        chunks = engine.stream_chunks(asks[i], max_new_tokens=MAX_NEW[i], temperature=0.0, stop_token_ids=[])
        out[i] = [t for c in chunks for t in c.token_ids]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(asks))]
    with engine.batcher.cv:  # steps wait until all three are in
        for t in threads:
            t.start()
    for t in threads:
        t.join(60)
    return out


def test_batched_decode_steps_equal_solo_runs(llm, monkeypatch):
    monkeypatch.setattr(batching, "GATHER_WAIT", 2.0)  # each step waits for every running sequence
    vocab = llm.model.args.vocab_size
    engine = BatchLLM(llm, 3)
    enable(llm, 0)  # only the live sequences are reused
    try:
        for seed in (1, 2, 2):  # the later rounds take the slots the first gave back (shrunk)
            asks = prompts(vocab, seed)
            solo = [llm.generate(a, max_new_tokens=n, temperature=0.0, stop_token_ids=[]).token_ids
                    for a, n in zip(asks, MAX_NEW)]
            before, steps = engine.batcher.graph_steps, engine.batcher.steps
            assert concurrent(engine, asks) == solo
            assert engine.batcher.graph_steps > before
        # the third round brought one token a step, its 1-token prefill included: every step was a recorded one
        assert engine.batcher.graph_steps - before == engine.batcher.steps - steps
        assert llm.model.prefix_cache.tokens_reused >= sum(len(a) - 1 for a in asks)
        b = engine.batcher
        assert b.graph_rows > b.graph_steps  # recorded steps of several sequences ran
        assert b.steps > b.graph_steps  # and the prefill steps ran as forward_segments
        assert 0 < len(b.recorded) <= batching.KEEP_STEPS
        assert b.members == 0
        text = batching.metrics(SimpleNamespace(kv_budget=0, kv_reserved=0), b)
        assert f"offload_batch_graph_steps_total {b.graph_steps}\n" in text
    finally:
        engine.close()


def test_one_recording_per_set_of_sequences(llm):
    """The Batcher's recordings, driven directly (its thread idles: no calls are queued): a set of sequences in
    any arrival order replays its one recording; a subset gets its own; a cache shrunk and regrown to the same
    capacity (new tensors) is read there. Every row equals its eager decode."""
    from offload.generation import prefill
    from offload.server.batching import Batcher, _Call

    model = llm.model
    asks = prompts(model.args.vocab_size, seed=3)
    caches = [model.new_cache(1024) for _ in asks]
    refs = [model.new_cache(1024) for _ in asks]
    for a, c, r in zip(asks, caches, refs):
        prefill(model, c, a)
        prefill(model, r, a)
    batcher = Batcher(model)
    try:
        def step(order: list[int], token: int):
            got = batcher._decode([_Call(torch.tensor([token]), caches[i], False) for i in order])
            for i, g in zip(order, got):
                want = model.forward(torch.tensor([token]), refs[i])  # (1, V)
                torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-5)

        step([0, 1, 2], 5)
        first = next(iter(batcher.recorded.values()))
        step([2, 0, 1], 6)  # another arrival order: the same set, the same recording
        step([2, 0], 7)  # a subset: a recording of its own
        assert len(batcher.recorded) == 2 and batcher.recorded[frozenset(map(id, caches))] is first
        assert caches[2].layers[0].capacity == 512
        for c in (caches[2], refs[2]):  # sequence 2 continues from position 20 with 250 new tokens
            c.length = 20
        caches[2].shrink()  # its slot given back (256 positions), then taken again and regrown to 512
        for c in (caches[2], refs[2]):
            prefill(model, c, asks[1][:25] * 10)
        assert caches[2].layers[0].capacity == 512
        step([2, 0], 8)  # the steps of {0, 2} and {0, 1, 2} record again: sequence 2's tensors moved
        step([0, 1, 2], 9)
        assert len(batcher.recorded) == 2 and batcher.recorded[frozenset(map(id, caches))] is first
    finally:
        batcher.close()
