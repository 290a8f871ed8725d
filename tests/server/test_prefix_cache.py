"""The prefix cache (offload.prefix_cache) on every architecture: a prompt that begins with a cached prefix
prefills only its new tokens, from the live cache or from a snapshot, and the logits equal a cold run's."""

import pytest
import torch

import offload
from offload.generation import prefill
from offload.prefix_cache import PrefixCache, enable
from offload.testing import make_tiny_checkpoint

ARCHS = ["qwen3_moe", "glm4_moe", "deepseek_v3", "glm_moe_dsa", "llama", "qwen2", "qwen3"]
CTX = 96


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    pytest.importorskip("transformers")
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch) / arch)
        return made[arch]

    return get


def tokens(vocab, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


class Counting:
    """Counts the tokens each forward computes."""

    def __init__(self, model):
        self.model, self.computed = model, 0
        self._forward = model.forward

    def __call__(self, toks, cache, last_only=False):
        self.computed += toks.shape[0]
        return self._forward(toks, cache, last_only)


def run(model, cache, ids, steps=3):
    """Prefill from wherever the cache stands, then `steps` greedy decode steps: logits (1 + steps, V)."""
    out = [prefill(model, cache, ids)]
    cache.tokens.extend(ids)
    for _ in range(steps):
        tok = int(out[-1].argmax())
        out.append(model.forward(torch.tensor([tok]), cache)[-1])
        cache.tokens.append(tok)
    return torch.stack(out)


def cold(model, ids, steps=3):
    cache = model.new_cache(CTX)
    return run(model, cache, ids, steps)


@pytest.mark.parametrize("arch", ARCHS)
def test_hit_logits_equal_a_cold_run(arch, checkpoints, monkeypatch):
    llm = offload.load(checkpoints(arch), device="cpu", progress=False, ctx=CTX, dtype="float32")
    model, vocab = llm.model, llm.model.args.vocab_size
    system = tokens(vocab, 40, seed=1)  # a shared system prompt, longer than DSA's index_topk
    turn1 = system + tokens(vocab, 10, seed=2)
    other = tokens(vocab, 30, seed=3)  # another user's conversation
    turn2 = turn1 + tokens(vocab, 12, seed=4)
    store = PrefixCache(mem_bytes=1 << 30)
    cache = model.new_cache(CTX)
    counter = Counting(model)
    monkeypatch.setattr(model, "forward", counter)

    def hot(ids):
        skip = store.prepare(cache, ids)
        before = counter.computed
        logits = run(model, cache, ids[skip:])
        assert counter.computed - before == len(ids) - skip + 3  # only the new tokens, then 3 steps
        return skip, logits

    assert hot(turn1)[0] == 0 and store.misses == 1
    # the live cache: turn 2 resumes after turn 1's prompt and its 3 decoded tokens' common part
    skip, logits = hot(turn2)
    assert skip == len(turn1)
    torch.testing.assert_close(logits, cold(model, turn2), rtol=0, atol=1e-4)
    # another conversation: turn 2's sequence is saved before it is overwritten
    skip, logits = hot(other)
    assert skip == 0 and len(store.entries) == 1
    torch.testing.assert_close(logits, cold(model, other), rtol=0, atol=1e-4)
    # back to the first conversation's system prompt: restored from the snapshot (DSA indexer keys too)
    branch = system + tokens(vocab, 9, seed=5)
    skip, logits = hot(branch)
    assert skip == len(system)
    torch.testing.assert_close(logits, cold(model, branch), rtol=0, atol=1e-4)
    assert store.hits == 2 and store.tokens_reused == len(turn1) + len(system)
    # the same prompt again: everything but its last token is reused
    skip, logits = hot(branch)
    assert skip == len(branch) - 1
    torch.testing.assert_close(logits, cold(model, branch), rtol=0, atol=1e-4)


def test_budget_evicts_least_recently_used(checkpoints):
    llm = offload.load(checkpoints("qwen3"), device="cpu", progress=False, ctx=CTX, dtype="float32")
    model, vocab = llm.model, llm.model.args.vocab_size
    cache = model.new_cache(CTX)
    per_token = cache.nbytes() // CTX
    store = PrefixCache(mem_bytes=per_token * 70)  # room for two 30-token sequences, not three
    convs = [tokens(vocab, 30, seed=10 + i) for i in range(4)]
    for ids in convs:
        skip = store.prepare(cache, ids)
        prefill(model, cache, ids[skip:])
        cache.tokens.extend(ids[skip:])
    # convs 0, 1, 2 were saved as the next one arrived; 0 was evicted to make room for 2
    assert store.evictions == 1 and len(store.entries) == 2 and store.stored_bytes <= per_token * 70
    assert store.prepare(cache, convs[1] + [5]) == 30  # restored (and conv 3 saved: conv 2 evicted)
    assert store.evictions == 2
    assert store.prepare(cache, convs[0] + [5]) == 0


def test_generation_uses_it_and_greedy_text_is_unchanged(checkpoints):
    llm = offload.load(checkpoints("glm_moe_dsa"), device="cpu", progress=False, ctx=256, dtype="float32")
    msgs = [{"role": "system", "content": "You are terse. " * 8}, {"role": "user", "content": "Say something."}]
    first = llm.chat(msgs, max_new_tokens=8, temperature=0.0)
    store = enable(llm, 1 << 30)
    again = [llm.chat(msgs, max_new_tokens=8, temperature=0.0) for _ in range(2)]
    assert all(r.token_ids == first.token_ids for r in again)
    assert store.hits == 2 and store.tokens_reused == 2 * (first.prompt_tokens - 1)


def test_a_cancelled_prefill_stops_between_chunks_and_leaves_the_cache_consistent(checkpoints, monkeypatch):
    import threading

    from offload import generation

    llm = offload.load(checkpoints("qwen3_moe"), device="cpu", progress=False, ctx=CTX, dtype="float32")
    model, vocab = llm.model, llm.model.args.vocab_size
    store = enable(llm, 1 << 30)
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 8)
    ids = tokens(vocab, 60, seed=7)
    llm.generate(ids[:20], max_new_tokens=2, temperature=0.0)  # the cache now holds these 20 (+1) tokens
    event, counter = threading.Event(), Counting(model)

    def forward(toks, cache, last_only=False):
        event.set()  # the client leaves during the first chunk
        return counter(toks, cache, last_only)

    monkeypatch.setattr(model, "forward", forward)
    with generation.cancel_on(event), pytest.raises(generation.Cancelled):
        next(llm.stream_chunks(ids, max_new_tokens=2, temperature=0.0))
    assert counter.computed == 8  # one chunk of the 40 new tokens, then it stopped
    monkeypatch.setattr(model, "forward", counter)
    # the positions written before the stop are not claimed: the next request reuses only the 20 known tokens
    first = next(llm.stream_chunks(ids, max_new_tokens=1, temperature=0.0))
    assert first.cached_tokens == 20 and store.tokens_reused == 20 + 20  # the cancelled request's, this one's
    assert first.token_ids == [int(cold(model, ids, 0)[0].argmax())]
