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


def test_kernel_type_tables_are_the_type_table():
    """The numba and native kernels list the types they handle; ids, names and block sizes are
    offload.gguf.types' (checked against gguf-py in tests/gguf/test_types.py), and so is the C++ enum."""
    import re
    from pathlib import Path

    from offload.gguf.types import GGMLType, block_format
    from offload.kernels.cpu import native
    from offload.kernels.cpu.quantmm import block_info

    def sizes(t):
        f = block_format(t)
        return f.block_size, f.type_size

    for qt, bb in dq.FAST_TYPES.items():
        assert bb == sizes(qt) == block_info(qt), GGMLType(qt).name
    for name in ("F32", "F16", "BF16", "Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"):
        assert getattr(dq, name) == int(GGMLType[name]) and type(getattr(dq, name)) is int
    for qt, name in native.TYPES.items():
        base = native.base_type(qt)
        assert name == GGMLType(base).name.lower() + ("_r16" if qt & native.R16 else "")
        assert native._BLOCK[qt] == sizes(base) == block_info(qt), name
    assert set(native.REPACKABLE) <= set(native.TYPES)
    enum = re.search(r"enum : int \{([^}]*)\}", (native.SOURCE.parent / "common.h").read_text()).group(1)
    cpp = {k.strip(): int(v) for k, v in (e.split("=") for e in enum.split(","))}
    assert cpp == {GGMLType(t).name: t for t in native.TYPES if not t & native.R16}
