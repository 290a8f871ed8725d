"""Quantisers used by CpuExperts.from_dense: format validity (gguf-py reads them) and accuracy."""

import gguf
import numpy as np
import pytest

from offload.kernels.cpu import dequantize
from offload.kernels.cpu.quantize import quantize_q4_k, quantize_q8_0


def test_q8_0_matches_gguf_py(rng):
    w = rng.standard_normal((7, 96)).astype(np.float32) * rng.uniform(0.01, 3)
    assert np.array_equal(quantize_q8_0(w), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0))


@pytest.mark.parametrize("fn,qt,bound", [(quantize_q8_0, 8, 0.01), (quantize_q4_k, 12, 0.095)])
def test_quantiser_accuracy(fn, qt, bound, rng):
    """Relative RMS error on Gaussian weights (plus outliers and a constant row): q8_0 < 1 %, q4_k < 9.5 %."""
    w = (rng.standard_normal((9, 512)) * 0.02).astype(np.float32)
    w[3, 17] = 0.5  # an outlier
    w[5] = 0.01  # a constant row (scale 0 sub-blocks must not divide by zero)
    q = fn(w)
    r = gguf.quants.dequantize(q, gguf.GGMLQuantizationType(qt))
    assert np.array_equal(dequantize(q, qt).numpy(), r)
    err = np.sqrt(((r - w) ** 2).mean() / (w**2).mean())
    assert err < bound, err
    assert np.abs(r[5] - 0.01).max() < 0.01 * (0.01 if qt == 8 else 0.07)
