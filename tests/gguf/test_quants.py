"""Reference dequantisers vs gguf-py's (written by llama.cpp's authors): bit-exact on random blocks."""

import gguf
import numpy as np
import pytest
from gguf import quants as gq

from offload.errors import GGUFError, OffloadError
from offload.gguf import quants_iq
from offload.gguf.quants import DEQUANTIZERS, dequantize
from offload.gguf.testing import random_blocks
from offload.gguf.types import GGMLType, block_format

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
         "Q6_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]


def test_every_issue_type_has_a_dequantiser():
    assert {GGMLType[t] for t in TYPES} <= set(DEQUANTIZERS)


@pytest.mark.parametrize("rows", [1, 7, 255, 371])
@pytest.mark.parametrize("name", TYPES)
def test_bit_exact_vs_gguf_py(name, rows):
    fmt = block_format(name)
    rng = np.random.default_rng(hash((name, rows)) % 2**32)
    blocks_per_row = 2 if fmt.block_size > 1 else 96
    raw = random_blocks(name, rows * blocks_per_row, rng).reshape(rows, -1)
    cols = blocks_per_row * fmt.block_size
    ours = dequantize(raw, name, (rows, cols))
    ref = gq.dequantize(raw, gguf.GGMLQuantizationType[name])
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (rows, cols)
    assert np.isfinite(ours).all()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.abs(ours).max() > 0  # random blocks are not all zero


def test_3d_shape_and_bytes_input():
    rng = np.random.default_rng(1)
    raw = random_blocks("Q4_K", 3 * 5 * 2, rng)
    out = dequantize(raw.tobytes(), GGMLType.Q4_K, (3, 5, 512))
    ref = gq.dequantize(raw.reshape(15, -1), gguf.GGMLQuantizationType.Q4_K).reshape(3, 5, 512)
    assert np.array_equal(out, ref)


def test_grids_and_signs_match_gguf_py():
    assert bytes(quants_iq.KSIGNS) == gq.IQ2_XXS.ksigns
    for ours, cls in [(quants_iq.GRID_IQ2XXS, gq.IQ2_XXS), (quants_iq.GRID_IQ2XS, gq.IQ2_XS),
                      (quants_iq.GRID_IQ2S, gq.IQ2_S), (quants_iq.GRID_IQ3XXS, gq.IQ3_XXS),
                      (quants_iq.GRID_IQ3S, gq.IQ3_S), (quants_iq.GRID_IQ1S, gq.IQ1_S)]:
        cls.init_grid()
        assert np.array_equal(ours, cls.grid.reshape(cls.grid_shape))


def test_errors():
    with pytest.raises(GGUFError, match="unknown ggml type 99"):
        dequantize(b"\0" * 18, 99, (32,))
    with pytest.raises(GGUFError, match="Q8_1"):
        dequantize(b"\0" * 40, GGMLType.Q8_1, (32,))
    with pytest.raises(GGUFError, match="needs 36 bytes, got 18"):
        dequantize(b"\0" * 18, "Q4_0", (2, 32))
    with pytest.raises(GGUFError, match="block size 256"):
        dequantize(b"\0" * 144, "Q4_K", (1, 128))
    assert issubclass(GGUFError, OffloadError)
