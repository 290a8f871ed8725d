"""The batched native GEMV (one matrix per head: MLA's attn_k_b / attn_v_b) against the plain reference of
each head's own product: gguf-py's dequantisation times activations rounded as ggml rounds them, in
float64 (native.gemv_ref); the file layout and the interleaved one."""

import numpy as np
import pytest
import torch

from offload.errors import WeightsError
from offload.kernels.cpu import native
from tests.kernels.cpu.blocks import close_but_for_rounding_ties, sane_blocks
from tests.kernels.cpu.test_native import _scale

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler: native kernels not built")

# (type, heads, rows per head, K): GLM-5.2's attn_k_b (Q5_0, c 512 x n 192) and attn_v_b (Q4_K, v 256 x c 512)
# cut to 3 heads, Q8_0, and rows that are not whole 16-row groups (no interleaving then)
CASES = [(6, 3, 512, 192), (12, 3, 256, 512), (8, 2, 48, 64), (8, 4, 7, 32)]


@pytest.mark.parametrize("qt,heads,rows,k", CASES)
def test_each_head_times_its_own_matrix(qt, heads, rows, k, rng):
    from offload.kernels.cpu.weights import HeadsQuantWeight

    w = sane_blocks(qt, rows, k, rng, lead=(heads,)).reshape(heads, rows, -1)  # (B, N, row bytes)
    m = int(rng.choice([1, 3, 9]))
    x = torch.from_numpy(rng.standard_normal((heads, m, k)).astype(np.float32))  # (B, M, K)
    got = native.gemv_batched(x, w, qt)
    assert got.shape == (heads, m, rows)
    hw = HeadsQuantWeight.from_file(w, qt, k)
    assert bool(hw.qtype & native.R16) == (rows % 16 == 0 and native.repacks(qt, rows))
    inter = hw(x)
    for b in range(heads):
        ref = native.gemv_ref(x[b], w[b], qt)
        tol = 2e-6 * _scale(x[b], qt, w[b]) + 1e-6
        close_but_for_rounding_ties(got[b], ref, tol, x[b], w[b], qt, f"head {b}")
        close_but_for_rounding_ties(inter[b], ref, tol, x[b], w[b], qt, f"head {b}, interleaved")


def test_mismatched_shapes_are_refused(rng):
    w = sane_blocks(8, 16, 64, rng, lead=(2,)).reshape(2, 16, -1)
    with pytest.raises(WeightsError, match="do not match weight rows"):
        native.gemv_batched(torch.zeros(2, 1, 32), w, 8)
    with pytest.raises(WeightsError, match="not \\(B, M, K\\)"):
        native.gemv_batched(torch.zeros(3, 1, 64), w, 8)
