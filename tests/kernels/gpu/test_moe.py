"""The grouped MoE kernels against the plain loop over (token, expert) pairs on gguf-py's dequantisation:
decode (GEMV per pair) and prefill (pairs sorted by expert, tl.dot), skipped pairs, the slot map."""

import warnings

import numpy as np
import pytest
import torch

from offload.gguf.types import GGMLType as G
from offload.kernels.gpu.formats import FP8_BLOCK
from offload.kernels.gpu.gemm import GEMM_MIN_TOKENS, Packed
from offload.kernels.gpu.moe import BLOCK_M, moe, moe_gemv, moe_ref, sort_pairs
from tests.kernels.gpu.blocks import fmt_name, weight

E, K_TOP = 8, 4  # experts, experts per token


def experts(rng, device, fmt_gu, fmt_d, n_slots=3, hidden=256, inter=256):
    def one(fmt, rows, cols):
        w, sc = weight(fmt, rows, cols, rng, (n_slots,))
        return Packed(w.to(device), fmt, cols, None if sc is None else sc.to(device))
    return one(fmt_gu, inter, hidden), one(fmt_gu, inter, hidden), one(fmt_d, hidden, inter)


def routing(rng, t):
    """ids (T, k) of distinct experts with some -1, weights (T, k), slots: 3 of 8 experts resident."""
    ids = torch.from_numpy(np.stack([rng.permutation(E)[:K_TOP] for _ in range(t)]))
    ids[0, 1] = -1
    weights = torch.from_numpy(rng.uniform(0.1, 1, (t, K_TOP)).astype(np.float32))
    slots = torch.full((E,), -1)
    slots[torch.from_numpy(rng.permutation(E)[:3])] = torch.tensor([0, 1, 2])
    return ids, weights, slots


def assert_close(y, ref, what):
    err = float((y.cpu() - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, f"{what}: max error {err:.2e} of the largest output"


def run(f, x, ids, weights, slots, device, *w):
    with warnings.catch_warnings():  # sigmoid of a very negative gate overflows exp in the interpreter: -> 0
        warnings.simplefilter("ignore", RuntimeWarning)
        return f(x.to(device), ids.to(device), weights.to(device), slots.to(device), *w)


@pytest.mark.parametrize("fmts", [(G.Q4_K, G.Q6_K), (G.Q5_K, G.Q8_0), (G.Q2_K, G.Q3_K), (G.IQ4_XS, G.BF16),
                                  (FP8_BLOCK, FP8_BLOCK)], ids=lambda f: "-".join(map(fmt_name, f)))
def test_decode_matches_the_loop(fmts, rng, device):
    w = experts(rng, device, *map(int, fmts))
    x = torch.from_numpy(rng.standard_normal((7, 256), dtype=np.float32))
    ids, weights, slots = routing(rng, 7)
    ref = moe_ref(x, ids, weights, slots, *w)
    assert_close(run(moe_gemv, x, ids, weights, slots, device, *w), ref, "moe_gemv")


@pytest.mark.parametrize("fmts", [(G.Q4_K, G.Q6_K), (FP8_BLOCK, G.IQ4_XS)], ids=lambda f: "-".join(map(fmt_name, f)))
def test_prefill_matches_the_loop(fmts, rng, device):
    t = GEMM_MIN_TOKENS + 1
    w = experts(rng, device, *map(int, fmts), hidden=512)
    x = torch.from_numpy(rng.standard_normal((t, 512), dtype=np.float32))
    ids, weights, slots = routing(rng, t)
    ref = moe_ref(x, ids, weights, slots, *w)
    assert_close(run(moe, x, ids, weights, slots, device, *w), ref, "moe (tl.dot)")


def test_long_prompt_expands_each_used_expert(rng, device, monkeypatch):
    """From EXPAND_MM_TOKENS tokens (lowered here) each used expert is expanded once for torch's matmuls."""
    from offload.kernels.gpu import gemm

    monkeypatch.setattr(gemm, "EXPAND_MM_TOKENS", 20)
    w = experts(rng, device, int(G.Q6_K), int(FP8_BLOCK))
    x = torch.from_numpy(rng.standard_normal((21, 256), dtype=np.float32))
    ids, weights, slots = routing(rng, 21)
    assert_close(run(moe, x, ids, weights, slots, device, *w), moe_ref(x, ids, weights, slots, *w), "moe_expand")


def test_one_token_skips_and_slot_map(rng, device):
    """One token: pairs of non-resident experts and -1 add nothing; moving experts to other slots (the blocks
    and the map together) gives the same bits; a token with nothing resident gives zeros."""
    gate, up, down = experts(rng, device, int(G.Q4_K), int(G.Q4_K))
    x = torch.from_numpy(rng.standard_normal((2, 256), dtype=np.float32))
    ids = torch.tensor([[3, -1, 5, 0], [1, 2, 4, -1]])
    weights = torch.from_numpy(rng.uniform(0.1, 1, (2, K_TOP)).astype(np.float32))
    slots = torch.tensor([2, -1, -1, 0, -1, 1, -1, -1])  # token 1 has no resident expert
    y = run(moe_gemv, x, ids, weights, slots, device, gate, up, down)
    assert_close(y[:1], moe_ref(x, ids, weights, slots, gate, up, down)[:1], "one token")
    assert torch.equal(y[1].cpu(), torch.zeros(256))
    perm = [1, 2, 0]  # new slot i holds old slot perm[i]
    moved = [Packed(p.blocks[perm].contiguous(), p.fmt, p.cols) for p in (gate, up, down)]
    new_slots = torch.tensor([1, -1, -1, 2, -1, 0, -1, -1])
    assert torch.equal(run(moe_gemv, x, ids, weights, new_slots, device, *moved).cpu(), y.cpu())
    assert torch.equal(run(moe_gemv, x, ids, weights, slots, device, gate, up, down).cpu(), y.cpu())


def test_sort_pairs_blocks_share_one_slot(rng):
    ids, _, slots = routing(rng, 40)
    pairs, bslot = sort_pairs(ids, slots, 3)
    s = torch.where(ids >= 0, slots[ids.clamp(min=0)], -1).flatten()
    real = pairs[pairs >= 0].long()
    assert sorted(real.tolist()) == torch.nonzero(s >= 0).flatten().tolist()  # each resident pair once
    blocks = pairs.view(-1, BLOCK_M)
    for b, slot in zip(blocks, bslot):
        assert bool((s[b[b >= 0].long()] == slot).all())


def test_bad_shapes_name_the_problem(rng):
    gate, up, down = experts(rng, "cpu", int(G.Q8_0), int(G.Q8_0))
    ids, weights, slots = routing(rng, 2)
    with pytest.raises(ValueError, match="hidden 512"):
        moe_gemv(torch.zeros(2, 512), ids, weights, slots, gate, up, down)
    with pytest.raises(ValueError, match="must both be"):
        moe_gemv(torch.zeros(2, 256), ids, weights[:, :2], slots, gate, up, down)
    with pytest.raises(ValueError, match="slot map"):
        moe_gemv(torch.zeros(2, 256), ids, weights, slots.float(), gate, up, down)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 runs wrong in the interpreter (triton#11584): "
                                                          "checked on a GPU only")
def test_bf16_activations_on_a_gpu(rng):
    """Decode and prefill with bf16 activations (the prefill's tl.dot rounds weights and the gate/up output to
    bf16): within bf16 rounding of the float64 loop."""
    device = torch.device("cuda")
    w = experts(rng, device, int(G.Q4_K), int(G.Q6_K), hidden=512)
    for t, tol in ((3, 1e-4), (GEMM_MIN_TOKENS + 9, 2e-2)):
        x = torch.from_numpy(rng.standard_normal((t, 512), dtype=np.float32)).bfloat16()
        ids, weights, slots = routing(rng, t)
        ref = moe_ref(x.float(), ids, weights, slots, *w)
        y = run(moe, x, ids, weights, slots, device, *w)
        assert y.dtype == torch.float32
        err = float((y.cpu() - ref).abs().max() / ref.abs().max())
        assert err < tol, f"T={t}: max error {err:.2e} of the largest output"
