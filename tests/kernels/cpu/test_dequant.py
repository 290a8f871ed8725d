"""numba dequantisation vs gguf-py's numpy dequantisation: bit-exact for every type with a kernel."""

import gguf
import numpy as np
import pytest

from offload.kernels.cpu import dequant as dq
from offload.kernels.cpu import dequantize

from tests.kernels.cpu.blocks import sane_blocks

FAST = sorted(dq.FAST_TYPES)


@pytest.mark.parametrize("qt", FAST)
@pytest.mark.parametrize("rows", [1, 7, 255, 371])
def test_dequant_bit_exact(qt, rows, rng):
    bs, _ = dq.FAST_TYPES[qt]
    k = bs * (1 if rows > 100 else 3)
    w = sane_blocks(qt, rows, k, rng)
    ref = gguf.quants.dequantize(w, gguf.GGMLQuantizationType(qt))
    ours = dequantize(w, qt).numpy()
    assert ours.shape == (rows, k)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("qt", FAST)
def test_dequant_any_fp16_scale(qt, rng):
    """Unconstrained random blocks (subnormal / huge fp16 scales) still match bit for bit."""
    w = sane_blocks(qt, 5, dq.FAST_TYPES[qt][0] * 2, rng)
    from offload.gguf.testing import random_blocks

    w = random_blocks(qt, w.size // dq.FAST_TYPES[qt][1], rng).reshape(w.shape)
    ref = gguf.quants.dequantize(w, gguf.GGMLQuantizationType(qt))
    np.testing.assert_array_equal(dequantize(w, qt).numpy(), ref)


def test_dequant_stacked_experts(rng):
    w = sane_blocks(dq.Q4_K, 7, 512, rng, lead=(3,))  # (E, N, K_bytes)
    ref = gguf.quants.dequantize(w, gguf.GGMLQuantizationType.Q4_K)
    assert np.array_equal(dequantize(w, dq.Q4_K).numpy(), ref)
