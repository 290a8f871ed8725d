"""IQ4_NL blocks rewritten as Q8_0 at load (kernels.cpu.weights.as_native): the same values, bit for bit
(gguf-py dequantises both), and the native kernels then multiply them as llama.cpp's IQ4_NL dot does."""

import gguf
import numpy as np
import torch

from offload.gguf.testing import random_blocks
from offload.gguf.types import GGMLType
from offload.kernels.cpu import native
from offload.kernels.cpu import quantmm as qm
from offload.kernels.cpu.weights import as_native


def test_iq4_nl_as_q8_0_is_lossless(rng):
    for rows, cols in ((1, 32), (7, 96), (255, 1408), (371, 64)):
        raw = random_blocks(GGMLType.IQ4_NL, rows * cols // 32, rng).reshape(rows, -1)
        wide, qt = as_native(raw, int(GGMLType.IQ4_NL))
        assert qt == GGMLType.Q8_0 and wide.shape == (rows, cols // 32 * 34)
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.IQ4_NL)
        ours = gguf.quants.dequantize(wide, gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(ref, ours)
    stacked = random_blocks(GGMLType.IQ4_NL, 3 * 16 * 64 // 32, rng).reshape(3, 16, -1)  # (E, N, row bytes)
    wide, _ = as_native(stacked, int(GGMLType.IQ4_NL))
    assert wide.shape == (3, 16, 2 * 34)
    assert as_native(stacked, int(GGMLType.Q4_K))[0] is stacked  # other types are left as they are


def test_iq4_nl_matmul_on_the_native_kernels(rng):
    if not native.fast(int(GGMLType.Q8_0)):
        return
    raw = random_blocks(GGMLType.IQ4_NL, 64 * 1408 // 32, rng).reshape(64, -1)
    wide, qt = as_native(raw, int(GGMLType.IQ4_NL))
    x = torch.randn(3, 1408)
    w = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.IQ4_NL))
    ours = qm.qmatmul(x, wide, qt)
    ref = x @ w.T
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-2  # 8-bit activations, as llama.cpp rounds them
