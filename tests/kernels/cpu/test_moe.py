"""moe_cpu vs moe_cpu_ref (a plain per-pair float32 loop over gguf-py-dequantised weights).

Tolerance: where the native kernels run (`native.fast`), moe_cpu rounds each matmul's input to 8 bits
as llama.cpp does and the reference is asked to do the same (act_quant); otherwise both compute in
float32. Either way they differ by summation order in three chained matmuls: 1e-4 of the output's scale.
"""

import numpy as np
import pytest
import torch

from offload.errors import WeightsError
from offload.kernels.cpu import dequant as dq
from offload.kernels.cpu import native
from offload.kernels.cpu import quantmm as qm
from offload.kernels.cpu.moe import CpuExperts, moe_cpu, moe_cpu_ref

from tests.kernels.cpu.blocks import sane_blocks

E, H, I = 6, 512, 256
IDS = [3, 5, 7, 8, 10, 11]  # global ids held here; 0..13 are routed, the rest live elsewhere


def _experts(qts, rng):
    g, u, d = qts
    ws = [sane_blocks(g, I, H, rng, (E,)), sane_blocks(u, I, H, rng, (E,)), sane_blocks(d, H, I, rng, (E,))]
    for a in ws:
        a.setflags(write=False)  # like the read-only memory map of a GGUF file
    return CpuExperts(*ws, qts, ids=IDS)


def _route(T, K, rng, crowd=None):
    ids = torch.from_numpy(rng.integers(0, 14, (T, K)))
    ids[0, -1] = 7  # at least one pair on a held expert
    if crowd is not None:
        ids[:, 0] = crowd  # one expert chosen by every token: the batch (dequant + torch.mm) path
    w = torch.from_numpy(rng.uniform(0.05, 1.0, (T, K)).astype(np.float32))
    return ids, w


def _rel(y, yr):
    assert yr.abs().max() > 0
    return float((y - yr).abs().max() / yr.abs().max())


def _close_act_quant(y, yr):
    """moe_cpu vs the reference when both round activations to 8 bits: the expert hidden state h is
    computed in another float order, so an element of h on a rounding boundary can land one quantum
    apart (measured: 2 of 60 seeds, 8e-4 and 1.5e-3 of the output's scale; the rest ~3e-7). Allow that
    in a few tokens, and require every other token to agree to float rounding."""
    scale = yr.abs().max()
    assert _rel(y, yr) < 1e-2
    # a flip moves one token's whole output row: allow it in a quarter of the tokens (at least one)
    per_token = (y - yr).abs().amax(-1) / scale  # (T,)
    assert int((per_token > 1e-5).sum()) <= max(1, y.shape[0] // 4), per_token.tolist()


@pytest.mark.parametrize("qts", [(dq.Q4_K, dq.Q4_K, dq.Q6_K), (dq.Q8_0,) * 3, (dq.Q5_K, dq.Q5_K, dq.Q8_0),
                                 (dq.Q2_K, dq.Q3_K, dq.IQ4_XS), (dq.Q4_0,) * 3])
@pytest.mark.parametrize("T,K,crowd", [(1, 4, None), (7, 3, None), (13, 2, 5)])
def test_moe_cpu_vs_ref(qts, T, K, crowd, rng, monkeypatch):
    if crowd is not None:  # 13 tokens on one expert: take the batch path (dequant + torch.mm) for it
        monkeypatch.setattr(qm, "GEMM_MIN_TOKENS", 8)
    monkeypatch.setattr(qm, "NATIVE_GEMM_MIN_TOKENS", 8)
    ex = _experts(qts, rng)
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32))
    ids, w = _route(T, K, rng, crowd)
    y, yr = moe_cpu(x, ids, w, ex), moe_cpu_ref(x, ids, w, ex, act_quant=native.fast(*qts))
    assert y.shape == (T, H) and y.dtype == torch.float32
    if native.fast(*qts):
        _close_act_quant(y, yr)
    else:
        assert _rel(y, yr) < 1e-4


def test_moe_cpu_fallback_type(rng):
    """An IQ2 type has no numba kernel: every expert goes through dequantise-per-call + torch.mm."""
    from offload.gguf.testing import random_blocks

    qt = qm.qtype_id("IQ2_XXS")
    bs, bb = qm.block_info(qt)

    def blocks(n, k):
        return random_blocks(qt, E * n * k // bs, rng).reshape(E, n, k // bs * bb)

    ex = CpuExperts(blocks(I, H), blocks(I, H), blocks(H, I), (qt,) * 3, ids=IDS)
    x = torch.from_numpy(rng.standard_normal((5, H)).astype(np.float32)) * 0.01
    ids, w = _route(5, 2, rng)
    assert _rel(moe_cpu(x, ids, w, ex), moe_cpu_ref(x, ids, w, ex)) < 1e-4


def test_torch_uint8_and_type_names(rng):
    """GGUF readers may hand over torch uint8 tensors and type names; same result as numpy + ids."""
    ex = _experts((dq.Q4_K, dq.Q4_K, dq.Q6_K), rng)
    ex2 = CpuExperts(torch.from_numpy(ex.gate.copy()), torch.from_numpy(ex.up.copy()),
                     torch.from_numpy(ex.down.copy()), ("q4_k", "Q4_K", "q6_k"), ids=IDS)
    x = torch.from_numpy(rng.standard_normal((3, H)).astype(np.float32))
    ids, w = _route(3, 2, rng)
    assert torch.equal(moe_cpu(x, ids, w, ex), moe_cpu(x, ids, w, ex2))


def test_only_held_experts_count(rng):
    ex = _experts((dq.Q4_K, dq.Q4_K, dq.Q6_K), rng)
    x = torch.from_numpy(rng.standard_normal((4, H)).astype(np.float32))
    ids = torch.tensor([[0, 1], [2, 4], [99, 13], [1000, 6]])  # none held here
    assert torch.equal(moe_cpu(x, ids, torch.ones(4, 2), ex), torch.zeros(4, H))
    ids[1, 0] = 7  # token 1 now has one CPU expert
    y = moe_cpu(x, ids, torch.ones(4, 2), ex)
    assert y[[0, 2, 3]].abs().max() == 0 and y[1].abs().max() > 0


def test_batch_path_is_used(rng, monkeypatch):
    """With a low threshold the crowded expert goes through gemm; without, through the row kernel."""
    calls = []
    orig = qm.dequantize
    monkeypatch.setattr(qm, "dequantize", lambda *a: calls.append(1) or orig(*a))
    ex = _experts((dq.Q4_K, dq.Q4_K, dq.Q6_K), rng)
    x = torch.from_numpy(rng.standard_normal((9, H)).astype(np.float32))
    ids, w = _route(9, 2, rng, crowd=10)
    y_rows = moe_cpu(x, ids, w, ex)
    assert not calls
    monkeypatch.setattr(qm, "GEMM_MIN_TOKENS", 9)
    monkeypatch.setattr(qm, "NATIVE_GEMM_MIN_TOKENS", 9)
    y_gemm = moe_cpu(x, ids, w, ex)
    assert len(calls) == 3  # gate, up, down of expert 10, dequantised once each
    if native.fast(*ex.qtypes):
        _close_act_quant(y_gemm, y_rows)
    else:
        assert _rel(y_gemm, y_rows) < 1e-4


def test_dense_bf16_experts(rng):
    g = torch.randn(E, I, H, dtype=torch.bfloat16) * 0.05
    u = torch.randn(E, I, H, dtype=torch.bfloat16) * 0.05
    d = torch.randn(E, H, I, dtype=torch.bfloat16) * 0.05
    x = torch.from_numpy(rng.standard_normal((7, H)).astype(np.float32))
    ids, w = _route(7, 3, rng, crowd=3)
    ref = moe_cpu_ref(x, ids, w, CpuExperts.from_dense(g.float(), u.float(), d.float(), None, IDS))
    # bf16 activations (8-bit mantissa) in each matmul: ~1e-2 relative per element at worst
    assert _rel(moe_cpu(x, ids, w, CpuExperts.from_dense(g, u, d, None, IDS)), ref) < 3e-2


@pytest.mark.parametrize("quant,bound", [("q8_0", 0.03), ("q4_k", 0.3)])
def test_from_dense_quantised_accuracy(quant, bound, rng, monkeypatch):
    """expert_quant at load: output error vs the unquantised experts, relative Frobenius norm.

    Measured ~1 % (q8_0) and ~15 % (q4_k, min/max quantiser; weight RMS error ~8 % per matrix,
    compounded over gate, up and down).
    """
    g = torch.randn(E, I, H) * 0.05
    u = torch.randn(E, I, H) * 0.05
    d = torch.randn(E, H, I) * 0.05
    x = torch.from_numpy(rng.standard_normal((7, H)).astype(np.float32))
    ids, w = _route(7, 3, rng, crowd=8)
    monkeypatch.setattr(qm, "GEMM_MIN_TOKENS", 4)
    monkeypatch.setattr(qm, "NATIVE_GEMM_MIN_TOKENS", 4)  # expert 8 (7 tokens) takes the batch path
    ex = CpuExperts.from_dense(g.bfloat16(), u.bfloat16(), d.bfloat16(), quant, IDS)
    assert ex.qtypes == ((8,) * 3 if quant == "q8_0" else (12,) * 3)
    y = moe_cpu(x, ids, w, ex)
    if native.fast(*ex.qtypes):  # the kernels are exact on these blocks (up to rounding flips)
        _close_act_quant(y, moe_cpu_ref(x, ids, w, ex, act_quant=True))
    else:
        assert _rel(y, moe_cpu_ref(x, ids, w, ex)) < 1e-4
    ref = moe_cpu_ref(x, ids, w, CpuExperts.from_dense(g, u, d, None, IDS))
    assert float((y - ref).norm() / ref.norm()) < bound


def test_bad_experts(rng):
    a = sane_blocks(dq.Q4_K, I, H, rng, (E,))
    with pytest.raises(WeightsError, match="CpuExperts"):
        CpuExperts(a, a, a, (dq.Q4_K,) * 3)  # down must be (E, H, I)
    with pytest.raises(WeightsError, match="uint8"):
        CpuExperts(a.astype(np.int8), a, a, (dq.Q4_K,) * 3)
    with pytest.raises(WeightsError, match="expert_quant"):
        CpuExperts.from_dense(torch.zeros(1, 256, 256), torch.zeros(1, 256, 256), torch.zeros(1, 256, 256), "q3")
    ex = _experts((dq.Q8_0,) * 3, rng)
    with pytest.raises(WeightsError, match="width"):
        moe_cpu(torch.zeros(2, H + 32), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), ex)


@pytest.mark.parametrize("qts", [(dq.Q4_K, dq.Q4_K, dq.Q6_K), (dq.Q4_0,) * 3])
def test_int4pack_repacked_experts(qts, rng):
    """Repacked into torch's int4 layout (bf16 scale + zero per 32, bf16 activations): outputs within
    2 % of the blocks' exact result (measured ~0.3 %; bf16 rounds to 8 mantissa bits)."""
    ex = _experts(qts, rng)
    assert ex.repack_int4pack() == (["gate", "up"] if qts[2] == dq.Q6_K else ["gate", "up", "down"])
    x = torch.from_numpy(rng.standard_normal((7, H)).astype(np.float32))
    ids, w = _route(7, 3, rng)
    assert _rel(moe_cpu(x, ids, w, ex), moe_cpu_ref(x, ids, w, ex)) < 2e-2


def test_int4pack_dequant_matches_blocks(rng):
    from offload.kernels.cpu import int4pack as i4

    for qt in (dq.Q4_K, dq.Q4_0):
        wb = sane_blocks(qt, 32, 512, rng)
        W = qm.dequantize(wb, qt)  # (32, 512) bit-exact with gguf-py (test_dequant)
        Wp = i4.mm(torch.eye(512), *i4.repack(wb, qt)).T  # the packed weights (eye is exact in bf16)
        # bf16 scale and zero: each off by <= 2^-9 relative; |zero| <= 8 scale + min
        bound = 2.0**-8 * (W.abs().amax(1, keepdim=True) * 2)
        assert ((Wp - W).abs() <= bound).all()
    with pytest.raises(WeightsError, match="repack"):
        i4.repack(sane_blocks(dq.Q8_0, 32, 64, rng), dq.Q8_0)
