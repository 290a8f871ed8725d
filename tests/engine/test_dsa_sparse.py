"""DSA sparse attention: the bounded indexer's running top-k against one full top-k over (T, i, S) scores
(the reference it replaced, written as transformers' indexer computes it), the gathered attention against
the masked one, a long prompt prefilled in chunks against transformers (fp32), and the context's memory
checked before the cache is allocated."""

import pytest
import torch
import torch.nn.functional as F

import offload
from offload.models import glm_moe_dsa
from offload.models.base import causal_mask
from offload.models.glm_moe_dsa import selection_mask, top_keys
from offload.models.mla import MLAAttention


def full_topk(q, w, k_all, start, topk, scale):
    """transformers' GlmMoeDsaIndexer: all (T, i, S) scores, -inf on the future, one top-k -> the mask it
    makes and the scores (T, S)."""
    t, s = q.shape[0], k_all.shape[0]
    scores = F.relu(torch.matmul(q, k_all.T) * scale)  # (T, i, S)
    index_scores = torch.matmul(w.unsqueeze(1), scores).squeeze(1)  # (T, S)
    causal = causal_mask(t, s, start, q.device)
    index_scores = index_scores.masked_fill(~causal, float("-inf"))
    top = index_scores.topk(min(topk, s), dim=-1).indices
    return causal & torch.zeros(t, s, dtype=torch.bool).scatter_(1, top, True), index_scores


@pytest.mark.parametrize("t,start", [(1, 0), (1, 300), (7, 40), (37, 200), (64, 0)])
@pytest.mark.parametrize("chunk", [5, 24, 1 << 30])  # key chunks smaller than top-k, equal, all at once
def test_running_topk_equals_full_topk(t, start, chunk):
    g = torch.Generator().manual_seed(t * 1000 + start)
    n_heads, d, topk = 4, 16, 24
    s = start + t
    q = torch.randn(t, n_heads, d, generator=g)
    w = torch.randn(t, n_heads, generator=g)
    k_all = torch.randn(s, d, generator=g)
    idx, valid = top_keys(q, w, k_all, start, topk, d ** -0.5, chunk=chunk)
    assert idx.shape == valid.shape == (t, min(topk, s))
    ours = selection_mask((idx, valid), t, s, start, "cpu")
    ref, scores = full_topk(q, w, k_all, start, topk, d ** -0.5)
    assert torch.equal(valid.sum(1), ours.sum(1))  # no key picked twice
    assert torch.equal(ours.sum(1), ref.sum(1))
    # the same keys, but where several tie at the last place (relu makes exact zeros) either may be kept
    last = scores.masked_fill(~ref, float("inf")).min(dim=1, keepdim=True).values  # (T, 1) the K-th score
    clear = (scores - last).abs() > 1e-5
    assert torch.equal(ours & clear, ref & clear)


@pytest.mark.parametrize("t", [1, 5, 40])  # 40: the reference takes the expanded (prefill) form
def test_gathered_attention_equals_masked(tiny_checkpoint, t):
    llm = offload.load(tiny_checkpoint("glm_moe_dsa"), device="cpu", progress=False)
    attn: MLAAttention = llm.model.layers[0].attn
    g = torch.Generator().manual_seed(t)
    start, topk = 60, 8
    s = start + t
    q_nope = torch.randn(t, attn.h, attn.nope, generator=g)
    q_rot = torch.randn(t, attn.h, attn.r, generator=g)
    latent, k_rot = torch.randn(s, attn.c, generator=g), torch.randn(s, attn.r, generator=g)
    sel = top_keys(torch.randn(t, 4, 16, generator=g), torch.randn(t, 4, generator=g),
                   torch.randn(s, 16, generator=g), start, topk, 0.25)
    ours = attn.attend_selected(q_nope, q_rot, latent, k_rot, *sel)
    mask = selection_mask(sel, t, s, start, "cpu")  # (T, S)
    ref = attn.attend_causal(q_nope, q_rot, latent, k_rot, start, mask=mask)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_long_prompt_in_chunks_matches_transformers(tiny_checkpoint, hf_model, monkeypatch):
    """96 tokens, index_topk 8, prefilled 32 at a time with the indexer scoring 8-key chunks; the shared
    layers read the full layers' indices (never a (T, S) mask)."""
    monkeypatch.setattr(glm_moe_dsa, "INDEX_SCORE_BYTES", 1)  # chunk = index_topk keys
    assert glm_moe_dsa.index_chunk(32, 16, 8) == 8
    path = tiny_checkpoint("glm_moe_dsa")
    llm = offload.load(path, device="cpu", progress=False, ctx=128)
    ids = torch.randint(0, llm.model.args.vocab_size, (96,), generator=torch.Generator().manual_seed(7))
    seen = []
    selected = MLAAttention.attend_selected

    def spy(self, q_nope, q_rot, latent_all, k_rot_all, idx, valid):
        seen.append(tuple(idx.shape))
        return selected(self, q_nope, q_rot, latent_all, k_rot_all, idx, valid)

    monkeypatch.setattr(MLAAttention, "attend_selected", spy)
    cache = llm.model.new_cache(128)
    ours = torch.cat([llm.model.forward(ids[i:i + 32], cache) for i in range(0, 96, 32)])  # (96, V)
    with torch.no_grad():
        ref = hf_model(path)(ids[None]).logits[0]
    assert seen == [(32, 8)] * 12  # every layer of every chunk attends over 8 gathered keys
    assert (ours - ref).abs().max().item() <= 1e-4


def test_context_memory_is_checked_before_allocating(tiny_checkpoint, monkeypatch):
    """The cache and workspace a ctx needs are computed without allocating; too big a ctx is one error that
    names the numbers."""
    from offload import kv_memory
    from offload.errors import PlacementError

    llm = offload.load(tiny_checkpoint("glm_moe_dsa"), device="cpu", progress=False, ctx=100)
    (kv, ws), = kv_memory.context_bytes(llm.model, 100).values()
    assert kv == llm.model.new_cache(100).nbytes()  # what offload.cache allocates, to the byte
    assert ws > 0
    monkeypatch.setattr(kv_memory, "free_bytes", lambda dev: ws + 2 * kv)  # 100 positions, and a regrowth
    kv_memory.check_context_fits(llm.model, 100)
    with pytest.raises(PlacementError, match=r"a context of 100000 tokens needs .* on cpu \(KV cache"):
        kv_memory.check_context_fits(llm.model, 100_000)
    with pytest.raises(PlacementError, match="a context of 120 tokens"):
        llm.logits(list(range(120)))  # more than ctx: a new cache, checked first
