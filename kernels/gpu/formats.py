"""Weight formats decoded inside Triton kernels: `dequant_slice` turns one 256-column slice of a tile of rows
into float32, from ggml blocks (Q8_0, Q2_K..Q6_K, IQ4_XS), bf16 bits, or FP8 e4m3 with 128x128 block scales
(HF checkpoints' `weight_scale_inv`). Every kernel here (GEMV, tl.dot GEMM, grouped MoE) calls it, so a format is
written once. Layouts follow ggml-common.h / ggml-quants.c; gguf-py's dequantize is the oracle in the tests.

The bytes arrive as a uint8 matrix (rows, bytes per row) with a 16-bit view of the same storage (`w16`: float16
for the blocks' scales, int16 for bf16), as every scale field sits at an even byte offset. Each weight's bytes
are gathered per column: neighbouring columns read the same bytes, which the GPU's L1 serves.

BN rows in a tile, 256 columns in a slice.
"""

import torch
import triton
import triton.language as tl

from offload.gguf.quants import KVALUES_IQ4NL
from offload.gguf.types import GGMLType

FP8_BLOCK = 1000  # not a ggml type id: e4m3 bytes (N, K) with fp32 scales (ceil(N/128), ceil(K/128))
SLICE = 256  # columns decoded per step: one k-quant super-block

# bytes of one row per 256 columns, by format
SLICE_BYTES = {GGMLType.Q8_0: 272, GGMLType.Q2_K: 84, GGMLType.Q3_K: 110, GGMLType.Q4_K: 144,
               GGMLType.Q5_K: 176, GGMLType.Q6_K: 210, GGMLType.IQ4_XS: 136, GGMLType.BF16: 512, FP8_BLOCK: 256}
FORMATS = {int(k): v for k, v in SLICE_BYTES.items()}


def row_bytes(fmt: int, cols: int) -> int:
    """Bytes of one row of `cols` columns in format `fmt`."""
    if fmt == GGMLType.Q8_0:
        return cols // 32 * 34
    return cols * FORMATS[fmt] // SLICE


def check_format(fmt: int, cols: int, what: str = "weight") -> None:
    """One clear error for a format or width these kernels do not take."""
    if int(fmt) not in FORMATS:
        names = ", ".join(GGMLType(f).name if f != FP8_BLOCK else "FP8_BLOCK" for f in FORMATS)
        raise ValueError(f"{what}: format {fmt} has no Triton kernel (have {names})")
    unit = 32 if fmt == GGMLType.Q8_0 else 2 if fmt in (GGMLType.BF16, FP8_BLOCK) else SLICE
    if cols % unit:
        raise ValueError(f"{what}: {cols} columns is not a multiple of {unit} for format {fmt}")


def codebook(device) -> torch.Tensor:
    """IQ4_NL / IQ4_XS 4-bit codebook as float32 (16,), passed to kernels as `aux` for IQ4_XS."""
    return torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=device)


def views(blocks: torch.Tensor, fmt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(bytes, 16-bit view) of a weight's storage, as the kernels take them."""
    if blocks.dtype != torch.uint8 or not blocks.is_contiguous():
        raise ValueError(f"weight blocks must be a contiguous uint8 tensor, got {blocks.dtype}")
    if fmt == FP8_BLOCK:
        return blocks, blocks  # no 16-bit fields
    return blocks, blocks.view(torch.int16 if fmt == GGMLType.BF16 else torch.float16)


@triton.jit
def _b(p, m):
    """Bytes at pointers p as int32 (0 where masked)."""
    return tl.load(p, mask=m, other=0).to(tl.int32)


@triton.jit
def _k4_scale_min(w_ptr, base, s, m):
    """Q4_K / Q5_K: the 6-bit scale and min of sub-block s (0..7) from the 12 packed bytes at base + 4."""
    a = _b(w_ptr + base + 4 + s, m)
    c = _b(w_ptr + base + 8 + s, m)
    e = _b(w_ptr + base + 4 + (s & 3), m)
    sc = tl.where(s < 4, a & 63, (c & 0xF) | ((e >> 6) << 4))
    mn = tl.where(s < 4, c & 63, (c >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def dequant_slice(w_ptr, w16_ptr, aux_ptr, aux_stride, rows, rmask, row_bytes, kb, K, FMT: tl.constexpr):
    """float32 (BN, 256): rows `rows` (BN,), columns 256*kb .. 256*kb + 255 (0 where masked)."""
    j = tl.arange(0, 256)[None, :]  # (1, 256) column within the slice
    r = rows.to(tl.int64)[:, None]  # (BN, 1)
    rm = rmask[:, None]  # (BN, 1)
    m = rm & (kb * 256 + j < K)  # (BN, 256)
    h = j // 128  # k-quant half (128 columns)
    g = (j % 128) // 32  # 32-column group within the half
    l32 = j % 32
    if FMT == 8:  # Q8_0: 8 blocks of (fp16 d, 32 int8)
        off = r * row_bytes + kb * 272 + (j // 32) * 34
        d = tl.load(w16_ptr + off // 2, mask=m, other=0).to(tl.float32)
        q = tl.load(w_ptr + off + 2 + l32, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        w = d * q
    elif FMT == 10:  # Q2_K: scales[16] (4-bit scale | 4-bit min), qs[64], d, dmin
        base = r * row_bytes + kb * 84
        d = tl.load(w16_ptr + base // 2 + 40, mask=rm, other=0).to(tl.float32)
        dmin = tl.load(w16_ptr + base // 2 + 41, mask=rm, other=0).to(tl.float32)
        q = (_b(w_ptr + base + 16 + 32 * h + l32, m) >> (2 * g)) & 3
        sc = _b(w_ptr + base + j // 16, m)
        w = d * (sc & 0xF).to(tl.float32) * q.to(tl.float32) - dmin * (sc >> 4).to(tl.float32)
    elif FMT == 11:  # Q3_K: hmask[32], qs[64], scales[12] (16 packed 6-bit), d
        base = r * row_bytes + kb * 110
        d = tl.load(w16_ptr + base // 2 + 54, mask=rm, other=0).to(tl.float32)
        q = (_b(w_ptr + base + 32 + 32 * h + l32, m) >> (2 * g)) & 3
        hbit = (_b(w_ptr + base + l32, m) >> (4 * h + g)) & 1
        i = j // 16
        lo = (_b(w_ptr + base + 96 + i % 8, m) >> (4 * (i // 8))) & 0xF
        hi = (_b(w_ptr + base + 104 + i % 4, m) >> (2 * (i // 4))) & 3
        sc = (lo | (hi << 4)) - 32
        w = d * sc.to(tl.float32) * (q - 4 + 4 * hbit).to(tl.float32)
    elif FMT == 12:  # Q4_K: d, dmin, scales[12], qs[128]
        base = r * row_bytes + kb * 144
        d = tl.load(w16_ptr + base // 2, mask=rm, other=0).to(tl.float32)
        dmin = tl.load(w16_ptr + base // 2 + 1, mask=rm, other=0).to(tl.float32)
        s = j // 32
        q = (_b(w_ptr + base + 16 + (j // 64) * 32 + l32, m) >> (4 * (s & 1))) & 0xF
        sc, mn = _k4_scale_min(w_ptr, base, s, m)
        w = d * sc * q.to(tl.float32) - dmin * mn
    elif FMT == 13:  # Q5_K: d, dmin, scales[12], qh[32], qs[128]
        base = r * row_bytes + kb * 176
        d = tl.load(w16_ptr + base // 2, mask=rm, other=0).to(tl.float32)
        dmin = tl.load(w16_ptr + base // 2 + 1, mask=rm, other=0).to(tl.float32)
        s = j // 32
        q = (_b(w_ptr + base + 48 + (j // 64) * 32 + l32, m) >> (4 * (s & 1))) & 0xF
        q = q | (((_b(w_ptr + base + 16 + l32, m) >> s) & 1) << 4)
        sc, mn = _k4_scale_min(w_ptr, base, s, m)
        w = d * sc * q.to(tl.float32) - dmin * mn
    elif FMT == 14:  # Q6_K: ql[128], qh[64], scales[16] int8, d
        base = r * row_bytes + kb * 210
        d = tl.load(w16_ptr + base // 2 + 104, mask=rm, other=0).to(tl.float32)
        ql = (_b(w_ptr + base + 64 * h + l32 + 32 * (g & 1), m) >> (4 * (g >> 1))) & 0xF
        qh = (_b(w_ptr + base + 128 + 32 * h + l32, m) >> (2 * g)) & 3
        sc = tl.load(w_ptr + base + 192 + j // 16, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        w = d * sc * ((ql | (qh << 4)) - 32).to(tl.float32)
    elif FMT == 23:  # IQ4_XS: d, scales_h (u16), scales_l[4], qs[128] indices into the codebook (aux)
        base = r * row_bytes + kb * 136
        d = tl.load(w16_ptr + base // 2, mask=rm, other=0).to(tl.float32)
        ib = j // 32
        sh = _b(w_ptr + base + 2, rm) | (_b(w_ptr + base + 3, rm) << 8)  # (BN, 1)
        ls = ((_b(w_ptr + base + 4 + ib // 2, m) >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4)
        idx = (_b(w_ptr + base + 8 + 16 * ib + l32 % 16, m) >> (4 * (l32 // 16))) & 0xF
        w = d * (ls - 32).to(tl.float32) * tl.load(aux_ptr + idx)
    elif FMT == 30:  # BF16: the top half of a float32 (no bf16 arithmetic: the interpreter gets it wrong)
        bits = tl.load(w16_ptr + r * (row_bytes // 2) + kb * 256 + j, mask=m, other=0).to(tl.int32)
        w = ((bits & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:  # FP8_BLOCK: e4m3 (sign, 4-bit exponent bias 7, 3-bit mantissa) times its 128x128 block's scale
        col = kb * 256 + j
        b = _b(w_ptr + r * row_bytes + col, m)
        e = (b >> 3) & 0xF
        normal = ((b >> 7) << 31) | ((e + 120) << 23) | ((b & 7) << 20)
        sub = (b & 7).to(tl.float32) * 0.001953125 * (1 - 2 * (b >> 7)).to(tl.float32)  # m * 2^-9
        v = tl.where(e == 0, sub, normal.to(tl.float32, bitcast=True))
        w = v * tl.load(aux_ptr + (r // 128) * aux_stride + col // 128, mask=m, other=0)
    return w


@triton.jit
def dot_acc(FMT: tl.constexpr, BLOCK_N: tl.constexpr):
    """The GEMVs' accumulator (BN, G, L) for `dot_slice`: G groups of L columns a slice (one for plain formats)."""
    G: tl.constexpr = 1 if (FMT == 30 or FMT == 1000) else 4 if (FMT == 12 or FMT == 13) else 8 if (
        FMT == 8 or FMT == 23) else 16
    L: tl.constexpr = 32 if (FMT == 12 or FMT == 13) else 256 // G
    return tl.zeros((BLOCK_N, G, L), tl.float32)


@triton.jit
def _dot_k4(w_ptr, w16_ptr, rows, rmask, row_bytes, kb, x_ptr, FMT: tl.constexpr):
    """Q4_K / Q5_K products (BN, 4, 32): byte l of 64-column chunk c holds columns 64c + l (low nibble) and
    64c + 32 + l (high nibble), so one byte load serves two weights with fixed shifts."""
    r2 = rows.to(tl.int64)[:, None]  # (BN, 1)
    rm2 = rmask[:, None]
    c2 = tl.arange(0, 4)[None, :]  # (1, 4) chunk
    c3 = c2[:, :, None]
    l3 = tl.arange(0, 32)[None, None, :]
    m3 = rm2[:, :, None] & (l3 < 32)  # (BN, 4, 32)
    m2 = rm2 & (c2 < 4)
    base2 = r2 * row_bytes + kb * (144 if FMT == 12 else 176)
    base3 = base2[:, :, None]
    b = tl.load(w_ptr + base3 + (16 if FMT == 12 else 48) + c3 * 32 + l3, mask=m3, other=0)  # (BN, 4, 32) u8
    lo = (b & 0xF).to(tl.float32)
    hi = (b >> 4).to(tl.float32)
    if FMT == 13:  # the fifth bit of sub-block s is bit s of qh[l]
        qh = tl.load(w_ptr + base3 + 16 + l3, mask=rm2[:, :, None] & (l3 < 32), other=0).to(tl.int32)  # (BN, 1, 32)
        lo += (((qh >> (2 * c3)) & 1) * 16).to(tl.float32)
        hi += (((qh >> (2 * c3 + 1)) & 1) * 16).to(tl.float32)
    d = tl.load(w16_ptr + base2 // 2, mask=rm2, other=0).to(tl.float32)  # (BN, 1)
    dmin = tl.load(w16_ptr + base2 // 2 + 1, mask=rm2, other=0).to(tl.float32)
    sc_lo, mn_lo = _k4_scale_min(w_ptr, base2, 2 * c2, m2)  # (BN, 4)
    sc_hi, mn_hi = _k4_scale_min(w_ptr, base2, 2 * c2 + 1, m2)
    col3 = kb * 256 + c3 * 64 + l3  # (1, 4, 32)
    x_lo = tl.load(x_ptr + col3).to(tl.float32)
    x_hi = tl.load(x_ptr + col3 + 32).to(tl.float32)
    w_lo = (d * sc_lo)[:, :, None] * lo - (dmin * mn_lo)[:, :, None]
    w_hi = (d * sc_hi)[:, :, None] * hi - (dmin * mn_hi)[:, :, None]
    return w_lo * x_lo + w_hi * x_hi


@triton.jit
def dot_slice(w_ptr, w16_ptr, aux_ptr, aux_stride, rows, rmask, row_bytes, kb, K, x_ptr,
              FMT: tl.constexpr, BLOCK_N: tl.constexpr):
    """W[rows, 256*kb : 256*kb + 256] * x[same columns] -> (BN, G, L) float32 products for the GEMVs, which add
    them up lane by lane over the slices and reduce once at the end (a reduction per slice cost more than the
    products: warp shuffles). A slice of a block format is G groups of L columns sharing a scale A and an offset
    B (w = A*q - B), read with one vector load per row and group instead of a byte gather per weight."""
    # one branch per call site (FMT is constexpr) and one return: Triton compiles every return it sees
    if FMT == 30 or FMT == 1000:
        w = dequant_slice(w_ptr, w16_ptr, aux_ptr, aux_stride, rows, rmask, row_bytes, kb, K, FMT)  # (BN, 256)
        col = kb * 256 + tl.arange(0, 256)
        xv = tl.load(x_ptr + col, mask=col < K, other=0).to(tl.float32)  # (256,)
        res = (w * xv[None, :])[:, None, :]
    elif FMT == 12 or FMT == 13:
        res = _dot_k4(w_ptr, w16_ptr, rows, rmask, row_bytes, kb, x_ptr, FMT)
    else:
        res = _dot_groups(w_ptr, w16_ptr, aux_ptr, rows, rmask, row_bytes, kb, K, x_ptr, FMT, BLOCK_N)
    return res


@triton.jit
def _dot_groups(w_ptr, w16_ptr, aux_ptr, rows, rmask, row_bytes, kb, K, x_ptr, FMT: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Q8_0, IQ4_XS (8 groups of 32), Q2_K, Q3_K, Q6_K (16 groups of 16): products (BN, G, L)."""
    G: tl.constexpr = 8 if (FMT == 8 or FMT == 23) else 16
    L: tl.constexpr = 256 // G
    r2 = rows.to(tl.int64)[:, None]  # (BN, 1)
    rm2 = rmask[:, None]
    s2 = tl.arange(0, G)[None, :]  # (1, G) group
    s3 = s2[:, :, None]  # (1, G, 1)
    l3 = tl.arange(0, L)[None, None, :]  # (1, 1, L) column within the group
    col3 = kb * 256 + s3 * L + l3  # (1, G, L)
    m3 = rm2[:, :, None] & (col3 < K)  # (BN, G, L)
    m2 = rm2 & (kb * 256 + s2 * L < K)  # (BN, G)
    B = tl.zeros((BLOCK_N, G), tl.float32)
    if FMT == 8:  # Q8_0: groups are the blocks
        off2 = r2 * row_bytes + kb * 272 + s2 * 34
        q = tl.load(w_ptr + off2[:, :, None] + 2 + l3, mask=m3, other=0).to(tl.int8, bitcast=True)
        A = tl.load(w16_ptr + off2 // 2, mask=m2, other=0).to(tl.float32)
    elif FMT == 23:  # IQ4_XS: 8 blocks of 32, codebook values (aux) with 6-bit scales
        base2 = r2 * row_bytes + kb * 136
        idx = (_b(w_ptr + base2[:, :, None] + 8 + 16 * s3 + l3 % 16, m3) >> (4 * (l3 // 16))) & 0xF
        q = tl.load(aux_ptr + idx)
        sh = _b(w_ptr + base2 + 2, rm2) | (_b(w_ptr + base2 + 3, rm2) << 8)  # (BN, 1)
        ls = ((_b(w_ptr + base2 + 4 + s2 // 2, m2) >> (4 * (s2 % 2))) & 0xF) | (((sh >> (2 * s2)) & 3) << 4)
        A = tl.load(w16_ptr + base2 // 2, mask=rm2, other=0).to(tl.float32) * (ls - 32).to(tl.float32)
    else:  # Q2_K / Q3_K / Q6_K: 16 groups of 16; group s is half s // 8, 32-column group g, 16-column half
        h3 = s3 // 8
        g3 = (s3 % 8) // 2
        lf = (s3 % 2) * 16 + l3  # (1, G, L) column within the 32-column group
        if FMT == 10:
            base2 = r2 * row_bytes + kb * 84
            base3 = base2[:, :, None]
            q = (_b(w_ptr + base3 + 16 + 32 * h3 + lf, m3) >> (2 * g3)) & 3
            sc = _b(w_ptr + base2 + s2, m2)
            A = tl.load(w16_ptr + base2 // 2 + 40, mask=rm2, other=0).to(tl.float32) * (sc & 0xF).to(tl.float32)
            B = tl.load(w16_ptr + base2 // 2 + 41, mask=rm2, other=0).to(tl.float32) * (sc >> 4).to(tl.float32)
        elif FMT == 11:
            base2 = r2 * row_bytes + kb * 110
            base3 = base2[:, :, None]
            q = (_b(w_ptr + base3 + 32 + 32 * h3 + lf, m3) >> (2 * g3)) & 3
            q = q - 4 + 4 * ((_b(w_ptr + base3 + lf, m3) >> (4 * h3 + g3)) & 1)
            lo = (_b(w_ptr + base2 + 96 + s2 % 8, m2) >> (4 * (s2 // 8))) & 0xF
            hi = (_b(w_ptr + base2 + 104 + s2 % 4, m2) >> (2 * (s2 // 4))) & 3
            A = tl.load(w16_ptr + base2 // 2 + 54, mask=rm2, other=0).to(tl.float32) * \
                ((lo | (hi << 4)) - 32).to(tl.float32)
        else:  # Q6_K
            base2 = r2 * row_bytes + kb * 210
            base3 = base2[:, :, None]
            ql = (_b(w_ptr + base3 + 64 * h3 + lf + 32 * (g3 & 1), m3) >> (4 * (g3 >> 1))) & 0xF
            qh = (_b(w_ptr + base3 + 128 + 32 * h3 + lf, m3) >> (2 * g3)) & 3
            q = (ql | (qh << 4)) - 32
            sc = tl.load(w_ptr + base2 + 192 + s2, mask=m2, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            A = tl.load(w16_ptr + base2 // 2 + 104, mask=rm2, other=0).to(tl.float32) * sc
    xv = tl.load(x_ptr + col3, mask=col3 < K, other=0).to(tl.float32)  # (1, G, L)
    return (A[:, :, None] * q.to(tl.float32) - B[:, :, None]) * xv
