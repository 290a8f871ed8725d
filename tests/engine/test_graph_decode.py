"""Generation through the recorded decode step (offload.load's graphs=, offload.generation.decode): with graphs
forced on for the CPU models, every decode token runs offload.graphs.DecodeStep (on the CPU: the static step
function replayed on its buffers) and greedy generation is token-identical to the eager decode (graphs off),
for every architecture of the tiny checkpoints and for GGUF files; a chat's next turn, resumed by the prefix
cache, reuses the recording; a cache whose tensors moved at the same capacity gets a new one."""

import pytest
import torch

import offload
from offload.errors import ConfigError
from offload.generation import decode, prefill
from offload.graphs import capture_blocker
from offload.prefix_cache import enable
from tests.engine.conftest import ARCHS
from tests.gguf.fixtures_models import gguf_models  # noqa: F401  (session fixture)

ALL = ARCHS + ["llama", "qwen2", "qwen3"]
CTX = 320


def load(path, sync_free: bool = False, **kw):
    """sync_free: the expert groups take their GPU-home static path, so on this CPU the step is recorded
    (offload.graphs.Emulated, replayed on the same tensors as a CUDA graph is) rather than run as a function."""
    llm = offload.load(path, device="cpu", ctx=CTX, dtype="float32", progress=False, **kw)
    for moe in llm.model.moe_layers() if sync_free else ():
        for g in moe.groups:
            if hasattr(g, "sync_free"):
                g.sync_free = True
    if sync_free:
        assert capture_blocker(llm.model) is None, capture_blocker(llm.model)
    return llm


def prompt(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.fixture
def static_steps(monkeypatch):
    """Counts the recorded decode steps run (DecodeStep calls) on any model."""
    from offload.graphs import DecodeStep

    calls = []
    original = DecodeStep.__call__

    def counted(self, *tokens):
        calls.append(len(tokens))
        return original(self, *tokens)

    monkeypatch.setattr(DecodeStep, "__call__", counted)
    return calls


def decode_count(out) -> int:
    """Tokens fed back for one generation: all but the last, unless a stop token ended it."""
    return len(out.token_ids) - (out.finish_reason == "length")


@pytest.mark.parametrize("arch", ALL)
def test_greedy_generation_equals_eager(arch, tiny_checkpoint, static_steps):
    """A 250-token prompt and 12 new tokens: the cache passes its first block (256) during decode, so the step
    records again mid-way. Greedy tokens equal the eager decode's."""
    llm = load(tiny_checkpoint(arch), sync_free=True, graphs=True)
    assert llm.model.graphs is True
    ids = prompt(llm.model.args.vocab_size, 250, seed=1)
    got = llm.generate(ids, max_new_tokens=12, temperature=0.0)
    assert len(static_steps) == decode_count(got) > 0  # every decode token went through the step
    assert all(layer.capacity > 256 for layer in llm._cache.layers)  # it crossed a block
    llm.model.graphs = False
    static_steps.clear()
    want = llm.generate(ids, max_new_tokens=12, temperature=0.0)
    assert not static_steps
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason


@pytest.mark.parametrize("name, fmt", [("qwen3_moe", "Q4_K_M"), ("glm_moe_dsa", "Q8_0")])
def test_gguf_greedy_generation_equals_eager(name, fmt, gguf_models, static_steps):  # noqa: F811
    """Quantised experts on the native CPU kernels inside the static step."""
    llm = offload.load(gguf_models.path(name, fmt), device="cpu", placement="cpu", progress=False, ctx=128,
                       graphs=True)
    ids = gguf_models.prompt_ids(name, fmt)[:20]
    got = llm.generate(ids, max_new_tokens=10, temperature=0.0)
    assert len(static_steps) == decode_count(got) > 0
    llm.model.graphs = False
    want = llm.generate(ids, max_new_tokens=10, temperature=0.0)
    assert got.token_ids == want.token_ids


def two_turn_chat(llm, kept: list) -> list[list[int]]:
    """Turn 1, another conversation (which moves turn 1 into the snapshot store), turn 1's next turn (restored
    from the store), then that conversation's next turn (resumed live). -> each reply's tokens."""
    first = [{"role": "user", "content": "Tell me about mixtures of experts and their routers, briefly."}]
    other = [{"role": "user", "content": "What is the weather like on the moon tonight?"}]
    replies, cached = [], []

    def turn(messages):
        chunks = list(llm.stream_chunks(llm.tokenizer.encode_chat(messages, add_generation_prompt=True),
                                        max_new_tokens=6, temperature=0.0))
        cached.append(chunks[-1].cached_tokens)
        kept.append(getattr(llm._cache, "decode_step", None))
        replies.append([t for c in chunks for t in c.token_ids])
        return llm.tokenizer.decode(replies[-1])

    a = turn(first)
    turn(other)
    second = first + [{"role": "assistant", "content": a}, {"role": "user", "content": "And the shared expert?"}]
    b = turn(second)
    turn(second + [{"role": "assistant", "content": b}, {"role": "user", "content": "Thanks."}])
    # the other conversation shares only the template's first tokens; the next turn more (from the store)
    assert cached[0] == 0 and cached[2] > 4 * cached[1] and cached[3] > cached[2], cached
    return replies


@pytest.mark.parametrize("arch, sync_free", [("qwen3_moe", True), ("glm_moe_dsa", False)])
def test_chat_turns_through_the_prefix_cache(arch, sync_free, tiny_checkpoint):
    """Two turns sharing a prefix, with another conversation between them (the prefix cache saves and restores
    it) and a live continuation: the same replies as eager, and the live turn replays the kept recording."""
    llm = load(tiny_checkpoint(arch), sync_free=sync_free, graphs=True)
    enable(llm, 1 << 26)
    steps: list = []
    got = two_turn_chat(llm, steps)
    assert all(s is not None for s in steps)
    assert steps[3] is steps[2]  # the next turn of the live conversation: the same recording, replayed
    eager = load(tiny_checkpoint(arch), graphs=False)
    enable(eager, 1 << 26)
    assert got == two_turn_chat(eager, [])


def test_a_cache_moved_at_the_same_capacity(tiny_checkpoint):
    """A cache shrunk and regrown to the same capacity holds new tensors (an idle server slot gives back its
    spare blocks, then a request regrows it): the step kept on it must not replay on the old ones (a check on
    capacities alone did); the same step object, recorded again, equals eager."""
    model = load(tiny_checkpoint("qwen3_moe"), sync_free=True, graphs=True).model
    ids = prompt(model.args.vocab_size, 300, seed=2)
    cache, eager = model.new_cache(1024), model.new_cache(1024)
    for c in (cache, eager):
        prefill(model, c, ids)
    for t in (5, 6):
        decode(model, cache, t)
        model.forward(torch.tensor([t]), eager)
    step, capacity, before = cache.decode_step, cache.layers[0].capacity, cache.layers[0].k
    cache.length = 100
    cache.shrink()
    assert cache.layers[0].capacity < capacity
    for c in (cache, eager):
        c.length = 100
        prefill(model, c, ids[:250])  # regrown to the capacity recorded before, in new tensors
    assert cache.layers[0].capacity == capacity and cache.layers[0].k is not before
    got = decode(model, cache, 7)
    assert cache.decode_step is step
    torch.testing.assert_close(got, model.forward(torch.tensor([7]), eager)[-1], atol=1e-5, rtol=1e-5)


def test_the_load_option_and_its_environment_variable(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("qwen3")
    monkeypatch.delenv("OFFLOAD_GRAPHS", raising=False)
    assert load(path).model.graphs is False  # auto on a CPU model: off
    monkeypatch.setenv("OFFLOAD_GRAPHS", "1")
    assert load(path).model.graphs is True
    assert load(path, graphs=False).model.graphs is False  # the argument wins over the variable
    monkeypatch.setenv("OFFLOAD_GRAPHS", "0")
    assert load(path).model.graphs is False
    monkeypatch.setenv("OFFLOAD_GRAPHS", "yes")
    with pytest.raises(ConfigError, match="OFFLOAD_GRAPHS='yes': expected 0 or 1"):
        load(path)
    with pytest.raises(ConfigError, match="graphs must be True, False or None"):
        load(path, graphs="on")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ALL)
def test_cuda_graph_generation_equals_eager(arch, tiny_checkpoint):
    """On a GPU, graphs are on by default; every layer and expert there (sync-free groups, as in
    test_graph_step): the decode tokens replay one captured CUDA graph, re-captured when the cache passes its
    first block, and greedy tokens equal the eager decode's. Not yet run on a GPU (none lent so far)."""
    llm = offload.load(tiny_checkpoint(arch), device="cuda", ctx=CTX, dtype="float32", progress=False,
                       placement="gpu")
    assert llm.model.graphs is True
    for moe in llm.model.moe_layers():
        for g in moe.groups:
            if hasattr(g, "sync_free"):
                g.sync_free = True
    assert capture_blocker(llm.model) is None, capture_blocker(llm.model)
    ids = prompt(llm.model.args.vocab_size, 250, seed=1)
    got = llm.generate(ids, max_new_tokens=12, temperature=0.0)
    llm.model.graphs = False
    want = llm.generate(ids, max_new_tokens=12, temperature=0.0)
    assert got.token_ids == want.token_ids
