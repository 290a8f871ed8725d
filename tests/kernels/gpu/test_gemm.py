"""The Triton dense kernels against gguf-py's dequantize (torch's own bf16 / float8_e4m3fn for the plain
formats) and a float64 matmul: every format, awkward row counts, the GEMV and the tl.dot path."""

import numpy as np
import pytest
import torch

from offload.kernels.gpu.formats import FP8_BLOCK
from offload.kernels.gpu import gemm
from offload.kernels.gpu.gemm import GEMM_MIN_TOKENS, Packed, dequant, dequant_ref, qmatmul, qmatmul_ref
from offload.gguf.testing import random_blocks
from offload.gguf.types import GGMLType, block_format
from tests.kernels.gpu.blocks import ALL, GGML, fmt_name, weight


def assert_matmul_close(y, x, w, fmt, k, scales):
    """Within float32 summation error of the float64 reference: a bound from the products' magnitudes."""
    ref = qmatmul_ref(x, w, fmt, k, scales)
    mag = (x.cpu().double().abs() @ dequant_ref(w, fmt, k, scales).double().abs().T).float()  # (M, N)
    err = (y.cpu() - ref).abs()
    assert bool((err <= 1e-5 * mag + 1e-30).all()), f"{fmt_name(fmt)}: worst {float((err / mag).max()):.2e} of |x||W|"


@pytest.mark.parametrize("fmt", [int(t) for t in GGML], ids=lambda f: fmt_name(f))
def test_dequant_bit_exact_on_raw_blocks(fmt, rng, device):
    """Any valid block (random bytes, any finite fp16 scale, subnormals included) decodes as gguf-py does."""
    t = block_format(fmt)
    raw = torch.from_numpy(random_blocks(fmt, 7 * 512 // t.block_size, rng).reshape(7, -1))
    got = dequant(Packed(raw.to(device), fmt, 512)).cpu()
    ref = dequant_ref(raw, fmt, 512)
    assert torch.equal(got.nan_to_num(), ref.nan_to_num()), f"{(got - ref).abs().nan_to_num().max()}"


@pytest.mark.parametrize("fmt", [int(GGMLType.BF16), FP8_BLOCK], ids=fmt_name)
def test_dequant_plain_formats(fmt, rng, device):
    w, scales = weight(fmt, 255, 384, rng)
    got = dequant(Packed(w.to(device), fmt, 384, None if scales is None else scales.to(device))).cpu()
    assert torch.equal(got, dequant_ref(w, fmt, 384, scales))


def test_dequant_selected_rows(rng, device):
    w, _ = weight(GGMLType.Q6_K, 255, 256, rng)
    ids = torch.from_numpy(rng.integers(0, 255, 9))
    got = dequant(Packed(w.to(device), GGMLType.Q6_K, 256), ids.to(device)).cpu()
    assert torch.equal(got, dequant_ref(w, GGMLType.Q6_K, 256)[ids])


@pytest.mark.parametrize("fmt", ALL, ids=fmt_name)
def test_gemv_and_gemm_every_format(fmt, rng, device):
    gemv_k = 512 if fmt != FP8_BLOCK else 384  # FP8: a partial 256-column slice
    for rows, m, k in ((371, 2, gemv_k), (255, GEMM_MIN_TOKENS + 1, 256)):
        w, scales = weight(fmt, rows, k, rng)
        x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32))
        p = Packed(w.to(device), fmt, k, None if scales is None else scales.to(device))
        assert_matmul_close(qmatmul(x.to(device), p), x, w, fmt, k, scales)


@pytest.mark.parametrize("rows", [1, 7, 255, 371])
def test_q4_k_gemv_awkward_rows(rows, rng, device):
    w, _ = weight(GGMLType.Q4_K, rows, 768, rng)
    x = torch.from_numpy(rng.standard_normal((1, 768), dtype=np.float32))
    assert_matmul_close(qmatmul(x.to(device), Packed(w.to(device), GGMLType.Q4_K, 768)), x, w, GGMLType.Q4_K,
                        768, None)


def test_long_prompts_expand_chunks_for_torch_matmul(rng, device, monkeypatch):
    """From EXPAND_MM_TOKENS tokens the rows are expanded a chunk at a time (3 chunks of 128 rows here)."""
    monkeypatch.setattr(gemm, "EXPAND_CHUNK", 128 * 512)
    w, _ = weight(GGMLType.Q5_K, 371, 512, rng)
    x = torch.from_numpy(rng.standard_normal((gemm.EXPAND_MM_TOKENS, 512), dtype=np.float32))
    assert_matmul_close(qmatmul(x.to(device), Packed(w.to(device), GGMLType.Q5_K, 512)), x, w, GGMLType.Q5_K, 512, None)


def test_q8_0_width_not_a_multiple_of_256(rng, device):
    """Q8_0 rows of 288 columns (9 blocks): the last slice is partly masked."""
    w, _ = weight(GGMLType.Q8_0, 7, 288, rng)
    x = torch.from_numpy(rng.standard_normal((3, 288), dtype=np.float32))
    assert_matmul_close(qmatmul(x.to(device), Packed(w.to(device), GGMLType.Q8_0, 288)), x, w, GGMLType.Q8_0,
                        288, None)


def test_bad_inputs_name_the_problem():
    w = torch.zeros(4, 144, dtype=torch.uint8)
    with pytest.raises(ValueError, match="Q4_0|format 2"):
        Packed(w, GGMLType.Q4_0, 256, name="blk.0.attn_q")
    with pytest.raises(ValueError, match="not a multiple of 256"):
        Packed(w, GGMLType.Q4_K, 200)
    with pytest.raises(ValueError, match="float32 scales"):
        Packed(w, FP8_BLOCK, 144)
    with pytest.raises(ValueError, match="columns"):
        qmatmul(torch.zeros(1, 128), Packed(w, GGMLType.Q4_K, 256))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 runs wrong in the interpreter (triton#11584): "
                                                          "checked on a GPU only")
@pytest.mark.parametrize("fmt", ALL, ids=fmt_name)
def test_bf16_activations_on_a_gpu(fmt, rng):
    """The GPU's own dtype: the GEMV multiplies bf16 inputs by float32 weights (products exact), the tl.dot path
    rounds the weights to bf16 for the tensor cores (2^-9 relative per product)."""
    k = 1024
    for m, tol in ((1, 1e-5), (GEMM_MIN_TOKENS + 17, 4e-3)):
        w, scales = weight(fmt, 371, k, rng)
        x = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).bfloat16()
        p = Packed(w.cuda(), fmt, k, None if scales is None else scales.cuda())
        y = qmatmul(x.cuda(), p).cpu()
        ref = qmatmul_ref(x.float(), w, fmt, k, scales)
        mag = (x.double().abs() @ dequant_ref(w, fmt, k, scales).double().abs().T).float()
        err = (y - ref).abs()
        assert bool((err <= tol * mag + 1e-30).all()), f"{fmt_name(fmt)} M={m}: worst {float((err / mag).max()):.2e}"
