"""gemv / gemm / qmatmul vs the plain reference (gguf-py dequant + torch.matmul in float32).

Tolerance: no activation quantisation happens, so the only difference is float32 summation order
(vector lanes vs torch's blocking). Both are within K·eps·Σ|x_k w_k| of the exact sum; in practice
~sqrt(K)·eps. We allow 2e-6 · Σ|x||w| (K <= 768 here: K·eps = 4.6e-5 is the hard bound, √K·eps
≈ 1.7e-6 the expected one).
"""

import numpy as np
import pytest
import torch

from offload.errors import WeightsError
from offload.kernels.cpu import dequant as dq
from offload.kernels.cpu import native
from offload.kernels.cpu import quantmm as qm

from tests.kernels.cpu.blocks import close_but_for_rounding_ties, sane_blocks


def _close(y, yr, x, w, qt):
    bound = torch.from_numpy(np.abs(x)) @ qm.dequantize(w, qt).abs().T  # (M, N) Σ|x||w|
    assert torch.isfinite(y).all()
    assert ((y - yr).abs() <= 2e-6 * bound + 1e-30).all(), float(((y - yr).abs() / bound).max())


@pytest.mark.parametrize("qt", sorted(dq.FAST_TYPES))
@pytest.mark.parametrize("rows,m", [(1, 1), (7, 3), (255, 1), (371, 16)])
def test_gemv_gemm_vs_ref(qt, rows, m, rng):
    bs = dq.FAST_TYPES[qt][0]
    k = bs * (3 if bs == 256 else (7 if rows in (1, 255) else 24))  # 7 blocks: not a multiple of 4
    w = sane_blocks(qt, rows, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    yr = qm.qmatmul_ref(x, w, qt)
    for fn in (qm.gemv, qm.gemm, qm.qmatmul):
        y = fn(torch.from_numpy(x), w, qt)
        assert y.shape == (m, rows) and y.dtype == torch.float32
        # qmatmul takes the native kernel (8-bit activations, as ggml) where the type has a SIMD one
        if fn is qm.qmatmul and native.fast(qt):
            bound = torch.from_numpy(np.abs(x)) @ qm.dequantize(w, qt).abs().T  # (M, N) Σ|x||w|
            close_but_for_rounding_ties(y, native.gemv_ref(x, w, qt), 2e-6 * bound + 1e-30,
                                        torch.from_numpy(x), w, qt, "qmatmul")
        else:
            _close(y, yr, x, w, qt)


def test_per_format_names(rng):
    w = sane_blocks(dq.Q4_K, 7, 256, rng)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    _close(qm.gemv_q4_k(x, w), qm.gemv_q4_k_ref(x, w), x, w, dq.Q4_K)
    _close(qm.gemm_q4_k(x, w), qm.gemv_q4_k_ref(x, w), x, w, dq.Q4_K)


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ1_S", "IQ3_S", "Q5_0"])
def test_fallback_types_correct(name, rng):
    """Types without a numba kernel: dequantise per call (offload.gguf) + torch.mm, vs gguf-py; Q5_0 has a
    native kernel that qmatmul takes."""
    from offload.gguf.testing import random_blocks

    qt = qm.qtype_id(name)
    bs, bb = qm.block_info(qt)
    w = random_blocks(qt, 7 * 256 // bs, rng).reshape(7, 256 // bs * bb)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    yr = qm.qmatmul_ref(x, w, qt)
    for fn in (qm.gemv, qm.qmatmul):
        y = fn(x, w, qt)
        # qmatmul takes the native kernel (8-bit activations, as ggml) where the type has one (Q5_0)
        _close(y, native.gemv_ref(x, w, qt) if fn is qm.qmatmul and native.fast(qt) else yr, x, w, qt)


def test_bad_input(rng):
    w = sane_blocks(dq.Q8_0, 3, 64, rng)
    with pytest.raises(WeightsError, match="64 elements"):
        qm.gemv(np.ones((1, 96), np.float32), w, dq.Q8_0)
    with pytest.raises(WeightsError, match="whole number"):
        qm.gemv(np.ones((1, 64), np.float32), w[:, :-1], dq.Q8_0)
    with pytest.raises(WeightsError, match="unknown"):
        qm.qtype_id("q9_z")
