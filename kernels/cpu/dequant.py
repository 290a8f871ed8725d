"""numba dequantisation of ggml blocks, one row at a time, on the GGUF layout as stored (no repack).

Each `_deq_*` writes one row of K floats from its K/block_size blocks with the same float ops, in the
same order, as ggml's dequantize_row_* (and gguf-py), so `dequant_rows` is bit-exact with gguf-py.
Integer temporaries are cast back to uint8 on purpose: numba widens integer arithmetic to int64,
which makes LLVM vectorise 8 lanes at a time; narrow casts let it use 16 x 32-bit lanes (4x faster).
"""

import numpy as np
from numba import njit, prange

from offload.gguf.types import GGMLType, block_sizes

# ggml type ids from the type table (offload.gguf.types), as plain ints: numba folds module-level ints
# into the kernels as constants
F32, F16, Q4_0, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, BF16 = (int(GGMLType[n]) for n in (
    "F32", "F16", "Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "BF16"))
# the types with a numba kernel (deq_row), and their (block_size, bytes_per_block) from the table
FAST_TYPES = block_sizes((Q4_0, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS))

_P2 = np.array([2.0**-24] + [2.0 ** (e - 25) for e in range(1, 32)], np.float32)  # fp16 exponent scale
_KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                          np.float32)
_u8 = np.uint8
_f32 = np.float32


@njit(inline="always", cache=True)
def _f16(row, o):
    """fp16 at row[o:o+2] (little endian) as float32; exact, numba has no float16 type."""
    h = np.int32(row[o]) | (np.int32(row[o + 1]) << 8)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    v = _f32(m + 1024 if e != 0 else m) * _P2[e]
    if e == 31:
        v = _f32(np.inf) if m == 0 else _f32(np.nan)
    return -v if h & 0x8000 else v


@njit(inline="always", cache=True)
def _deq_q8_0(row, out, nb):
    # four blocks per loop body: a 32-trip loop with one store gets fully unrolled by LLVM before the
    # loop vectoriser runs (and the SLP vectoriser then gives up); a bigger body stays a vector loop
    b = 0
    while b + 4 <= nb:
        o = b * 34
        d0 = _f16(row, o)
        d1 = _f16(row, o + 34)
        d2 = _f16(row, o + 68)
        d3 = _f16(row, o + 102)
        q = row[o:o + 136]
        y = out[b * 32:b * 32 + 128]
        for l in range(32):
            y[l] = d0 * _f32(np.int8(q[2 + l]))
            y[l + 32] = d1 * _f32(np.int8(q[36 + l]))
            y[l + 64] = d2 * _f32(np.int8(q[70 + l]))
            y[l + 96] = d3 * _f32(np.int8(q[104 + l]))
        b += 4
    for b in range(b, nb):
        o = b * 34
        d = _f16(row, o)
        for l in range(32):
            out[b * 32 + l] = d * _f32(np.int8(row[o + 2 + l]))


@njit(inline="always", cache=True)
def _deq_q4_0(row, out, nb):
    b = 0
    while b + 4 <= nb:  # four blocks per loop body, see _deq_q8_0
        o = b * 18
        d0 = _f16(row, o)
        d1 = _f16(row, o + 18)
        d2 = _f16(row, o + 36)
        d3 = _f16(row, o + 54)
        q = row[o:o + 72]
        y = out[b * 32:b * 32 + 128]
        for l in range(16):
            y[l] = d0 * (_f32(_u8(q[2 + l] & _u8(15))) - _f32(8.0))
            y[l + 16] = d0 * (_f32(_u8(q[2 + l] >> _u8(4))) - _f32(8.0))
            y[l + 32] = d1 * (_f32(_u8(q[20 + l] & _u8(15))) - _f32(8.0))
            y[l + 48] = d1 * (_f32(_u8(q[20 + l] >> _u8(4))) - _f32(8.0))
            y[l + 64] = d2 * (_f32(_u8(q[38 + l] & _u8(15))) - _f32(8.0))
            y[l + 80] = d2 * (_f32(_u8(q[38 + l] >> _u8(4))) - _f32(8.0))
            y[l + 96] = d3 * (_f32(_u8(q[56 + l] & _u8(15))) - _f32(8.0))
            y[l + 112] = d3 * (_f32(_u8(q[56 + l] >> _u8(4))) - _f32(8.0))
        b += 4
    for b in range(b, nb):
        o = b * 18
        d = _f16(row, o)
        for l in range(16):
            out[b * 32 + l] = d * (_f32(_u8(row[o + 2 + l] & _u8(15))) - _f32(8.0))
            out[b * 32 + l + 16] = d * (_f32(_u8(row[o + 2 + l] >> _u8(4))) - _f32(8.0))


@njit(inline="always", cache=True)
def _scale_min_k4(s, j):
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


@njit(inline="always", cache=True)
def _k4_scales(row, o, d, dmin, a, m):
    """The 8 (scale, min) pairs of a Q4_K / Q5_K block at row[o:], times d / dmin, into a / m."""
    for j in range(4):
        s0 = row[o + 4 + j]
        s4 = row[o + 8 + j]
        s8 = row[o + 12 + j]
        a[j] = d * _f32(s0 & 63)
        m[j] = dmin * _f32(s4 & 63)
        a[j + 4] = d * _f32((s8 & 15) | ((s0 >> 6) << 4))
        m[j + 4] = dmin * _f32((s8 >> 4) | ((s4 >> 6) << 4))


@njit(inline="always", cache=True)
def _deq_q4_k(row, out, nb):
    a = np.empty(8, np.float32)
    m = np.empty(8, np.float32)
    for b in range(nb):
        o = b * 144
        _k4_scales(row, o, _f16(row, o), _f16(row, o + 2), a, m)
        a0, a1, a2, a3, a4, a5, a6, a7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
        m0, m1, m2, m3, m4, m5, m6, m7 = m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]
        q = row[o + 16:o + 144]
        y = out[b * 256:b * 256 + 256]
        for l in range(32):  # one body for the whole block: no per-sub-block loop overhead
            v0 = q[l]
            v1 = q[l + 32]
            v2 = q[l + 64]
            v3 = q[l + 96]
            y[l] = a0 * _f32(_u8(v0 & _u8(15))) - m0
            y[l + 32] = a1 * _f32(_u8(v0 >> _u8(4))) - m1
            y[l + 64] = a2 * _f32(_u8(v1 & _u8(15))) - m2
            y[l + 96] = a3 * _f32(_u8(v1 >> _u8(4))) - m3
            y[l + 128] = a4 * _f32(_u8(v2 & _u8(15))) - m4
            y[l + 160] = a5 * _f32(_u8(v2 >> _u8(4))) - m5
            y[l + 192] = a6 * _f32(_u8(v3 & _u8(15))) - m6
            y[l + 224] = a7 * _f32(_u8(v3 >> _u8(4))) - m7


@njit(inline="always", cache=True)
def _deq_q5_k(row, out, nb):
    for b in range(nb):
        o = b * 176
        d = _f16(row, o)
        dmin = _f16(row, o + 2)
        s = row[o + 4:o + 16]
        qh = row[o + 16:o + 48]
        for j in range(4):
            sc0, m0 = _scale_min_k4(s, 2 * j)
            sc1, m1 = _scale_min_k4(s, 2 * j + 1)
            a0 = d * _f32(sc0)
            b0 = dmin * _f32(m0)
            a1 = d * _f32(sc1)
            b1 = dmin * _f32(m1)
            sh0 = _u8(2 * j)
            sh1 = _u8(2 * j + 1)
            q = row[o + 48 + 32 * j:o + 80 + 32 * j]
            y = out[b * 256 + 64 * j:b * 256 + 64 * j + 64]
            for l in range(32):
                h0 = _u8(_u8(_u8(qh[l] >> sh0) & _u8(1)) << _u8(4))
                h1 = _u8(_u8(_u8(qh[l] >> sh1) & _u8(1)) << _u8(4))
                y[l] = a0 * _f32(_u8(_u8(q[l] & _u8(15)) | h0)) - b0
                y[l + 32] = a1 * _f32(_u8(_u8(q[l] >> _u8(4)) | h1)) - b1


@njit(inline="always", cache=True)
def _deq_q6_k(row, out, nb):
    for b in range(nb):
        o = b * 210
        d = _f16(row, o + 208)
        for h in range(2):
            ql = row[o + 64 * h:o + 64 * h + 64]
            qh = row[o + 128 + 32 * h:o + 160 + 32 * h]
            sc = row[o + 192 + 8 * h:o + 200 + 8 * h]
            y = out[b * 256 + 128 * h:b * 256 + 128 * h + 128]
            for half in range(2):
                a1 = d * _f32(np.int8(sc[half]))
                a2 = d * _f32(np.int8(sc[half + 2]))
                a3 = d * _f32(np.int8(sc[half + 4]))
                a4 = d * _f32(np.int8(sc[half + 6]))
                for i in range(16):
                    l = 16 * half + i
                    u = qh[l]
                    q1 = _u8(_u8(ql[l] & _u8(15)) | _u8(_u8(u & _u8(3)) << _u8(4)))
                    q2 = _u8(_u8(ql[l + 32] & _u8(15)) | _u8(_u8(_u8(u >> _u8(2)) & _u8(3)) << _u8(4)))
                    q3 = _u8(_u8(ql[l] >> _u8(4)) | _u8(_u8(_u8(u >> _u8(4)) & _u8(3)) << _u8(4)))
                    q4 = _u8(_u8(ql[l + 32] >> _u8(4)) | _u8(_u8(u >> _u8(6)) << _u8(4)))
                    y[l] = a1 * (_f32(q1) - _f32(32.0))
                    y[l + 32] = a2 * (_f32(q2) - _f32(32.0))
                    y[l + 64] = a3 * (_f32(q3) - _f32(32.0))
                    y[l + 96] = a4 * (_f32(q4) - _f32(32.0))


@njit(inline="always", cache=True)
def _deq_q2_k(row, out, nb):
    dl = np.empty(8, np.float32)
    ml = np.empty(8, np.float32)
    for b in range(nb):
        o = b * 84
        d = _f16(row, o + 80)
        dmin = _f16(row, o + 82)
        for h in range(2):
            for i in range(8):  # scale i covers 16 outputs: shift i // 2, bytes 16 * (i % 2) ..
                sc = row[o + 8 * h + i]
                dl[i] = d * _f32(sc & 15)
                ml[i] = dmin * _f32(sc >> 4)
            q = row[o + 16 + 32 * h:o + 48 + 32 * h]
            y = out[b * 256 + 128 * h:b * 256 + 128 * h + 128]
            for l in range(16):  # one body writes all 8 runs: stays a vector loop (see _deq_q8_0)
                v0 = q[l]
                v1 = q[l + 16]
                y[l] = dl[0] * _f32(_u8(v0 & _u8(3))) - ml[0]
                y[l + 16] = dl[1] * _f32(_u8(v1 & _u8(3))) - ml[1]
                y[l + 32] = dl[2] * _f32(_u8(_u8(v0 >> _u8(2)) & _u8(3))) - ml[2]
                y[l + 48] = dl[3] * _f32(_u8(_u8(v1 >> _u8(2)) & _u8(3))) - ml[3]
                y[l + 64] = dl[4] * _f32(_u8(_u8(v0 >> _u8(4)) & _u8(3))) - ml[4]
                y[l + 80] = dl[5] * _f32(_u8(_u8(v1 >> _u8(4)) & _u8(3))) - ml[5]
                y[l + 96] = dl[6] * _f32(_u8(v0 >> _u8(6))) - ml[6]
                y[l + 112] = dl[7] * _f32(_u8(v1 >> _u8(6))) - ml[7]


@njit(inline="always", cache=True)
def _deq_q3_k(row, out, nb):
    dl = np.empty(8, np.float32)
    for b in range(nb):
        o = b * 110
        d = _f16(row, o + 108)
        s = row[o + 96:o + 108]
        hm = row[o:o + 32]
        for h in range(2):
            for i in range(8):  # scale k = 8h + i: low 4 bits and high 2 bits from the packed 12 bytes
                k = 8 * h + i
                lo = (s[k % 8] >> (4 * (k // 8))) & 15
                hi = (s[8 + k % 4] >> (2 * (k // 4))) & 3
                dl[i] = d * _f32((lo | (hi << 4)) - 32)
            q = row[o + 32 + 32 * h:o + 64 + 32 * h]
            y = out[b * 256 + 128 * h:b * 256 + 128 * h + 128]
            hb = _u8(4 * h)
            for l in range(16):  # one body writes all 8 runs: stays a vector loop (see _deq_q8_0)
                v0 = q[l]
                v1 = q[l + 16]
                h0 = _u8(hm[l] >> hb)
                h1 = _u8(hm[l + 16] >> hb)
                for j in range(4):  # constant trip count: unrolled inside the vector body
                    sj = _u8(2 * j)
                    hj = _u8(j)
                    # value = ((q >> 2j) & 3) - (0 if the hmask bit is set else 4), exact small integers
                    y[32 * j + l] = dl[2 * j] * (_f32(_u8(_u8(v0 >> sj) & _u8(3))) - _f32(4.0)
                                                 + _f32(4.0) * _f32(_u8(_u8(h0 >> hj) & _u8(1))))
                    y[32 * j + 16 + l] = dl[2 * j + 1] * (_f32(_u8(_u8(v1 >> sj) & _u8(3))) - _f32(4.0)
                                                          + _f32(4.0) * _f32(_u8(_u8(h1 >> hj) & _u8(1))))


@njit(inline="always", cache=True)
def _deq_iq4_xs(row, out, nb):
    for b in range(nb):
        o = b * 136
        d = _f16(row, o)
        sh = np.int32(row[o + 2]) | (np.int32(row[o + 3]) << 8)
        for ib in range(8):
            ls = ((row[o + 4 + ib // 2] >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
            dl = d * _f32(ls - 32)
            q = row[o + 8 + 16 * ib:o + 24 + 16 * ib]
            y = out[b * 256 + 32 * ib:b * 256 + 32 * ib + 32]
            for l in range(16):
                y[l] = dl * _KVALUES_IQ4NL[q[l] & 15]
                y[l + 16] = dl * _KVALUES_IQ4NL[q[l] >> 4]


@njit(cache=True)
def deq_row(qt, row, out):
    """Dequantise one row of ggml blocks (uint8) into out (K float32)."""
    if qt == Q4_K:
        _deq_q4_k(row, out, out.shape[0] // 256)
    elif qt == Q8_0:
        _deq_q8_0(row, out, out.shape[0] // 32)
    elif qt == Q6_K:
        _deq_q6_k(row, out, out.shape[0] // 256)
    elif qt == Q5_K:
        _deq_q5_k(row, out, out.shape[0] // 256)
    elif qt == Q4_0:
        _deq_q4_0(row, out, out.shape[0] // 32)
    elif qt == Q2_K:
        _deq_q2_k(row, out, out.shape[0] // 256)
    elif qt == Q3_K:
        _deq_q3_k(row, out, out.shape[0] // 256)
    elif qt == IQ4_XS:
        _deq_iq4_xs(row, out, out.shape[0] // 256)


@njit(parallel=True, cache=True)
def dequant_rows(w, qt, out):
    """w (N, K_bytes) uint8 -> out (N, K) float32, rows in parallel."""
    for n in prange(w.shape[0]):
        deq_row(qt, w[n], out[n])
    return out


@njit(inline="always", fastmath={"reassoc", "contract", "nsz", "arcp"}, cache=True)
def dot_row_q4_k(row, x, scratch):
    """One Q4_K row dotted with x (K float32) without materialising the row: the M=1 decode path.
    scratch: 32 float32 owned by the caller (no allocation per row)."""
    a = scratch[0:8]
    m = scratch[8:16]
    acc = scratch[16:32]
    acc[:] = 0
    for b in range(x.shape[0] // 256):
        o = b * 144
        _k4_scales(row, o, _f16(row, o), _f16(row, o + 2), a, m)
        q = row[o + 16:o + 144]
        xb = x[b * 256:b * 256 + 256]
        for c in range(4):
            a0 = a[2 * c]
            a1 = a[2 * c + 1]
            m0 = m[2 * c]
            m1 = m[2 * c + 1]
            for l in range(16):  # four 16-lane runs per body: low/high nibbles of two 16-byte halves
                v = q[32 * c + l]
                v2 = q[32 * c + 16 + l]
                acc[l] += ((a0 * _f32(_u8(v & _u8(15))) - m0) * xb[64 * c + l]
                           + (a0 * _f32(_u8(v2 & _u8(15))) - m0) * xb[64 * c + 16 + l]
                           + (a1 * _f32(_u8(v >> _u8(4))) - m1) * xb[64 * c + 32 + l]
                           + (a1 * _f32(_u8(v2 >> _u8(4))) - m1) * xb[64 * c + 48 + l])
    return acc.sum()


@njit(inline="always", fastmath={"reassoc", "contract", "nsz", "arcp"}, cache=True)
def dot_row_q8_0(row, x, scratch):
    """One Q8_0 row dotted with x without materialising it (the M=1 decode path)."""
    acc = scratch[0:32]
    acc[:] = 0
    nb = x.shape[0] // 32
    b = 0
    while b + 4 <= nb:  # four blocks per body, see _deq_q8_0
        o = b * 34
        d0 = _f16(row, o)
        d1 = _f16(row, o + 34)
        d2 = _f16(row, o + 68)
        d3 = _f16(row, o + 102)
        q = row[o:o + 136]
        xb = x[b * 32:b * 32 + 128]
        for l in range(32):
            acc[l] += (d0 * _f32(np.int8(q[2 + l])) * xb[l] + d1 * _f32(np.int8(q[36 + l])) * xb[32 + l]
                       + d2 * _f32(np.int8(q[70 + l])) * xb[64 + l] + d3 * _f32(np.int8(q[104 + l])) * xb[96 + l])
        b += 4
    s = acc.sum()
    for b in range(b, nb):
        o = b * 34
        d = _f16(row, o)
        for l in range(32):
            s += d * _f32(np.int8(row[o + 2 + l])) * x[b * 32 + l]
    return s


@njit(inline="always", cache=True)
def has_dot_row(qt):
    return qt == Q4_K or qt == Q8_0


@njit(fastmath={"reassoc", "contract", "nsz", "arcp"}, cache=True)
def dot_row(qt, row, x, scratch):
    """Fused dequantise-dot of one row for the types in has_dot_row; scratch: 32 float32."""
    if qt == Q4_K:
        return dot_row_q4_k(row, x, scratch)
    return dot_row_q8_0(row, x, scratch)
