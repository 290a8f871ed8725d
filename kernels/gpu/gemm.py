"""y = x @ W.T with W kept in its storage format on the GPU (ggml blocks, bf16 bits, FP8 blocks): a GEMV for
decode (a tile of rows times one token, reduced once at the end) and a tl.dot GEMM from GEMM_MIN_TOKENS tokens
on, plus `dequant` (rows expanded to float32: embedding lookups, and the formats' own test). Each beside its
plain reference (`*_ref`: gguf-py's dequantize, then torch).

M tokens, N rows (outputs), K columns (inputs).
"""

import os

import numpy as np
import torch
import triton
import triton.language as tl

from offload.kernels.gpu.formats import (FP8_BLOCK, SLICE, check_format, codebook, dequant_slice, dot_acc, dot_slice,
                                        views)
from offload.gguf.types import GGMLType

GEMM_MIN_TOKENS = 16  # tl.dot needs 16 rows; below, the GEMV per token reads the weight once (from L2 after)
# From here on a weight is expanded once per call (chunks of EXPAND_CHUNK elements) for torch's matmul: the tl.dot
# kernel expands each tile again for every 32 tokens, which costs more than the matmul itself for long prompts
# (estimated, not yet measured on a GPU: ~20 instructions a weight x M/32 vs one expansion)
EXPAND_MM_TOKENS = 256
EXPAND_CHUNK = 1 << 24


def interpreting() -> bool:
    """True when the kernels run in Triton's interpreter (triton < 3.4 has no `knobs`: the variable decides)."""
    knobs = getattr(triton, "knobs", None)
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def _tiles(n: int) -> tuple[int, int, int]:
    """(GEMV rows, GEMM tokens, GEMM rows) per program for a weight of n rows: register-sized on a GPU; under the
    interpreter (numpy per op) as few programs as fit in memory."""
    if interpreting():
        big = min(2048, max(64, triton.next_power_of_2(n) // 4))
        return big, 32, big
    return 16, 32, 64  # GEMV: 6144 rows make 384 programs, ~3 per H100 SM (a guess until the bench runs)


@triton.jit
def _dequant_kernel(w_ptr, w16_ptr, aux_ptr, aux_stride, ids_ptr, out_ptr, n_ids, row_bytes, K,
                    FMT: tl.constexpr, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    kb = tl.program_id(1)
    rm = offs < n_ids
    rows = tl.load(ids_ptr + offs, mask=rm, other=0)
    w = dequant_slice(w_ptr, w16_ptr, aux_ptr, aux_stride, rows, rm, row_bytes, kb, K, FMT)  # (BN, 256)
    col = kb * 256 + tl.arange(0, 256)[None, :]
    tl.store(out_ptr + offs.to(tl.int64)[:, None] * K + col, w, mask=rm[:, None] & (col < K))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, w16_ptr, aux_ptr, aux_stride, y_ptr, N, K, row_bytes,
                 FMT: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    t = tl.program_id(1).to(tl.int64)  # token
    rm = rows < N
    acc = dot_acc(FMT, BLOCK_N)  # (BN, G, L)
    for kb in range(tl.cdiv(K, 256)):
        acc += dot_slice(w_ptr, w16_ptr, aux_ptr, aux_stride, rows, rm, row_bytes, kb, K, x_ptr + t * K, FMT,
                         BLOCK_N)
    tl.store(y_ptr + t * N + rows, tl.sum(tl.sum(acc, axis=2), axis=1), mask=rm)


@triton.jit
def _mm_kernel(x_ptr, w_ptr, w16_ptr, aux_ptr, aux_stride, y_ptr, M, N, K, row_bytes,
               FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    om = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) tokens
    on = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) rows
    mm, nm = om < M, on < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kb in range(tl.cdiv(K, 256)):
        col = kb * 256 + tl.arange(0, 256)[None, :]
        xs = tl.load(x_ptr + om.to(tl.int64)[:, None] * K + col, mask=mm[:, None] & (col < K), other=0)  # (BM, 256)
        w = dequant_slice(w_ptr, w16_ptr, aux_ptr, aux_stride, on, nm, row_bytes, kb, K, FMT)  # (BN, 256)
        if IEEE:  # float32 activations: exact products (the interpreter, and tests)
            acc += tl.dot(xs, tl.trans(w), input_precision="ieee")
        else:  # bf16 / fp16 activations: the tensor cores, weights rounded to the activations' type
            acc += tl.dot(xs, tl.trans(w.to(xs.dtype)))
    tl.store(y_ptr + om.to(tl.int64)[:, None] * N + on[None, :], acc, mask=mm[:, None] & nm[None, :])


class Packed:
    """A weight's storage as the kernels take it: bytes (N, row bytes) or a stack of them (S, N, row bytes), a
    16-bit view, the aux table (IQ4_XS codebook, FP8 block scales) and its row stride; per matrix of a stack,
    `mat_bytes` bytes and `aux_mat` aux elements."""

    def __init__(self, blocks: torch.Tensor, fmt: int, cols: int, scales: torch.Tensor | None = None,
                 name: str = "weight"):
        fmt = int(fmt)
        check_format(fmt, cols, name)
        self.fmt, self.cols, self.rows = fmt, cols, blocks.shape[-2]
        self.blocks, self.w16 = views(blocks, fmt)
        self.row_bytes = blocks.shape[-1]
        self.mat_bytes = self.rows * self.row_bytes
        self.w16_mat = self.mat_bytes if fmt == FP8_BLOCK else self.mat_bytes // 2  # in w16's elements
        if fmt == FP8_BLOCK:
            if scales is None or scales.dtype != torch.float32:
                raise ValueError(f"{name}: FP8 blocks need float32 scales (ceil(N/128), ceil(K/128))")
            self.aux, self.aux_stride = scales.contiguous(), scales.shape[-1]
            self.aux_mat = scales.shape[-2] * scales.shape[-1]
        elif fmt == GGMLType.IQ4_XS:
            self.aux, self.aux_stride, self.aux_mat = codebook(blocks.device), 0, 0
        else:
            self.aux, self.aux_stride, self.aux_mat = self.blocks, 0, 0  # unread


def dequant(p: Packed, ids: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` (T,) of the weight (all rows when None) as `dtype` (T, K)."""
    ids = torch.arange(p.rows, device=p.blocks.device) if ids is None else ids.to(p.blocks.device)
    ids = ids.to(torch.int32).contiguous()  # (T,)
    out = torch.empty(ids.shape[0], p.cols, dtype=dtype, device=p.blocks.device)
    bn = _tiles(ids.shape[0])[0]
    grid = (triton.cdiv(ids.shape[0], bn), triton.cdiv(p.cols, SLICE))
    _dequant_kernel[grid](p.blocks, p.w16, p.aux, p.aux_stride, ids, out, ids.shape[0], p.row_bytes, p.cols,
                          FMT=p.fmt, BLOCK_N=bn)
    return out


def qmatmul(x: torch.Tensor, p: Packed, block_n: int | None = None) -> torch.Tensor:
    """x (M, K) @ W.T -> (M, N) float32: the GEMV below GEMM_MIN_TOKENS tokens, tl.dot from there on, and from
    EXPAND_MM_TOKENS on the rows expanded once, a chunk at a time, for torch's matmul."""
    m, k = x.shape
    if k != p.cols:
        raise ValueError(f"input has {k} columns, the weight {p.cols}")
    x = x.contiguous()
    y = torch.empty(m, p.rows, dtype=torch.float32, device=x.device)  # (M, N)
    gemv_n, bm, bn = _tiles(p.rows)
    if m >= EXPAND_MM_TOKENS:
        step = max(1, EXPAND_CHUNK // p.cols)
        for r0 in range(0, p.rows, step):
            rows = torch.arange(r0, min(r0 + step, p.rows), device=x.device)
            y[:, r0:r0 + rows.shape[0]] = x @ dequant(p, rows, x.dtype).T  # (M, n) from a (n, K) chunk
    elif m < GEMM_MIN_TOKENS:
        bn = block_n or gemv_n
        _gemv_kernel[(triton.cdiv(p.rows, bn), m)](x, p.blocks, p.w16, p.aux, p.aux_stride, y, p.rows, k,
                                                   p.row_bytes, FMT=p.fmt, BLOCK_N=bn)
    else:
        bn = block_n or bn
        _mm_kernel[(triton.cdiv(m, bm), triton.cdiv(p.rows, bn))](
            x, p.blocks, p.w16, p.aux, p.aux_stride, y, m, p.rows, k, p.row_bytes, FMT=p.fmt, BLOCK_M=bm,
            BLOCK_N=bn, IEEE=x.dtype == torch.float32)
    return y


def dequant_ref(blocks: torch.Tensor, fmt: int, cols: int, scales: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (N, K) from the storage by others' code: gguf-py for ggml blocks, torch's own bf16 and
    float8_e4m3fn for the plain formats."""
    import gguf

    b = blocks.cpu()
    if fmt == GGMLType.BF16:
        return b.view(torch.bfloat16).float()
    if fmt == FP8_BLOCK:
        n, k = b.shape
        full = scales.cpu().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]  # (N, K)
        return b.view(torch.float8_e4m3fn).float() * full
    w = gguf.quants.dequantize(b.numpy(), gguf.GGMLQuantizationType(int(fmt)))
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(b.shape[0], cols)


def qmatmul_ref(x: torch.Tensor, blocks: torch.Tensor, fmt: int, cols: int,
                scales: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ W.T in float64 from the reference dequantisation, as float32 (M, N)."""
    w = dequant_ref(blocks, fmt, cols, scales).double()
    return (x.cpu().double() @ w.T).float()
