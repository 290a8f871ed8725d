"""Quantised matmul on the CPU: y (M, N) = x (M, K) @ dequant(W (N, K_bytes)).T for ggml block formats.

Three paths, same result to float32 rounding:
- `gemv`: numba, rows in parallel; each weight row is dequantised once into an L1-resident buffer and
  dotted with every token's activations (fp32, no activation quantisation). For small M (decode).
- `gemm`: dequantise W to float32 once (numba, parallel) and call torch.mm (MKL / oneDNN). For large M.
- `qmatmul_ref`: gguf-py's numpy dequant + torch.matmul, the plain reference.
`qmatmul` picks gemv or gemm by M (threshold `GEMM_MIN_TOKENS`, measured by `python -m offload.bench`).
"""

import os
import threading

import numpy as np
import torch
from numba import njit, prange

from offload.errors import WeightsError
from offload.kernels.cpu import dequant as dq
from offload.kernels.cpu import native

# tokens per expert (rows of x) from which dequant + torch.mm beats the row kernels (env overrides; AMX
# machines likely want less). numba's float row kernel: 64, measured by `python -m offload.bench cpu-moe`
# on a 2-core Ice Lake. The native 8-bit kernels: 1024; on a 2-core AMD EPYC (Zen 4) they ran one expert
# 1.7-2x faster than dequant + torch.mm at 64-256 tokens (a 512-token prefill of the Air-shaped bench file:
# 38 -> 54 tok/s), on the Ice Lake box 0.92x at 128 tokens.
# Without AMX the native kernels stay ahead at any batch: on the 2-core Zen 5 box (2026-12-06) at 1024-4096 tokens
# Q4_K 0.43-0.46 vs 0.20 TFLOP/s, Q8_0 0.57-0.62 vs 0.20, Q2_K 0.22-0.26 vs 0.20 (float32 torch.mm after dequant;
# a 2048-token prefill of the Air-shaped file ran 2.5x slower past the old 1024 switch). With AMX 1024 is kept.
GEMM_MIN_TOKENS = int(os.environ.get("OFFLOAD_CPU_GEMM_MIN_TOKENS", "64"))
_NATIVE_GEMM_DEFAULT = "1024" if " amx_tile" in native._cpu_flags() else str(1 << 30)
NATIVE_GEMM_MIN_TOKENS = int(os.environ.get("OFFLOAD_NATIVE_GEMM_MIN_TOKENS", _NATIVE_GEMM_DEFAULT))
_ROWS_PER_ITEM = 16  # rows a thread takes at a time: small enough to balance, big enough to amortise
_FM = {"reassoc", "contract", "nsz", "arcp"}  # vectorised sums; not nnan/ninf, so overflow stays visible
# numba's workqueue pool (see __init__) must not be entered from two Python threads at once
POOL_LOCK = threading.Lock()


def qtype_id(qtype) -> int:
    """ggml type id from an int, an enum (gguf-py / offload.gguf) or a name like "q4_k"."""
    if isinstance(qtype, str):
        from offload.gguf.types import block_format

        try:
            return int(block_format(qtype.upper()).type)
        except (KeyError, ValueError):
            raise WeightsError(f"unknown ggml quantisation type {qtype!r}") from None
    return int(qtype)


def block_info(qtype) -> tuple[int, int]:
    """(block_size, bytes_per_block) of a ggml type (or of an interleaved one: the same blocks)."""
    from offload.kernels.cpu.native import base_type

    qt = base_type(qtype_id(qtype))
    if qt in dq.FAST_TYPES:
        return dq.FAST_TYPES[qt]
    from offload.gguf.types import block_format

    try:
        fmt = block_format(qt)
    except (KeyError, ValueError):
        raise WeightsError(f"unknown ggml quantisation type id {qt}") from None
    return fmt.block_size, fmt.type_size


def plain_blocks(w: np.ndarray, qt: int) -> tuple[np.ndarray, int]:
    """(blocks, type) in ggml's own layout: an interleaved matrix (native.R16) unpacked, else as given."""
    from offload.kernels.cpu import native

    return (native.unpack(w, qt), native.base_type(qt)) if qt & native.R16 else (w, qt)


def row_elems(qweight_bytes: int, qtype) -> int:
    """K (elements per row) from the bytes per row; raises if it is not a whole number of blocks."""
    bs, bb = block_info(qtype)
    if qweight_bytes % bb:
        raise WeightsError(f"row of {qweight_bytes} bytes is not a whole number of {bb}-byte blocks "
                           f"(ggml type {qtype_id(qtype)})")
    return qweight_bytes // bb * bs


@njit(inline="always", fastmath=_FM, cache=True)
def _dot(a, b):
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@njit(parallel=True, fastmath=_FM, cache=True)
def _gemv_kernel(w, qt, x, out):
    # w (N, Kb) uint8, x (M, K) f32, out (M, N) f32
    N = w.shape[0]
    K = x.shape[1]
    nitems = (N + _ROWS_PER_ITEM - 1) // _ROWS_PER_ITEM
    for it in prange(nitems):
        buf = np.empty(K, np.float32)
        scratch = np.empty(32, np.float32)
        for n in range(it * _ROWS_PER_ITEM, min(N, it * _ROWS_PER_ITEM + _ROWS_PER_ITEM)):
            if x.shape[0] == 1 and dq.has_dot_row(qt):  # one token: fused dequantise-dot, no buffer
                out[0, n] = dq.dot_row(qt, w[n], x[0], scratch)
                continue
            dq.deq_row(qt, w[n], buf)
            for t in range(x.shape[0]):
                out[t, n] = _dot(buf, x[t])
    return out


@njit(parallel=True, fastmath=_FM, cache=True)
def _grouped_kernel(w, qt, x, starts, eids, out):
    # w (E, N, Kb) uint8; x (P, K) f32 rows sorted by expert; group g = rows starts[g]:starts[g+1]
    # of expert eids[g]; out (P, N). Work items are (group, row block): each weight row is read once.
    N = w.shape[1]
    K = x.shape[1]
    nrb = (N + _ROWS_PER_ITEM - 1) // _ROWS_PER_ITEM
    for it in prange(eids.shape[0] * nrb):
        g = it // nrb
        r0 = (it % nrb) * _ROWS_PER_ITEM
        e = eids[g]
        buf = np.empty(K, np.float32)
        scratch = np.empty(32, np.float32)
        p0 = starts[g]
        for n in range(r0, min(N, r0 + _ROWS_PER_ITEM)):
            if starts[g + 1] - p0 == 1 and dq.has_dot_row(qt):  # one token: fused dequantise-dot
                out[p0, n] = dq.dot_row(qt, w[e, n], x[p0], scratch)
                continue
            dq.deq_row(qt, w[e, n], buf)
            for p in range(starts[g], starts[g + 1]):
                out[p, n] = _dot(buf, x[p])
    return out


@njit(inline="always", cache=True)
def _silu(a):
    ea = np.exp(-np.abs(a))  # a * sigmoid(a) without overflow
    return a * (np.float32(1.0) / (np.float32(1.0) + ea) if a >= 0 else ea / (np.float32(1.0) + ea))


@njit(parallel=True, fastmath=_FM, cache=True)
def _grouped_gate_up_kernel(wg, qg, wu, qu, x, starts, eids, out):
    # out (P, I) = silu(x @ gate_e.T) * (x @ up_e.T) per group: gate and up in one parallel region
    # (each region costs a thread wake-up and waits for its slowest thread)
    N = wg.shape[1]
    K = x.shape[1]
    nrb = (N + _ROWS_PER_ITEM - 1) // _ROWS_PER_ITEM
    for it in prange(eids.shape[0] * nrb):
        g = it // nrb
        r0 = (it % nrb) * _ROWS_PER_ITEM
        e = eids[g]
        buf = np.empty(K, np.float32)
        scratch = np.empty(32, np.float32)
        p0 = starts[g]
        one = starts[g + 1] - p0 == 1
        for n in range(r0, min(N, r0 + _ROWS_PER_ITEM)):
            if one and dq.has_dot_row(qg):  # one token: fused dequantise-dot
                out[p0, n] = dq.dot_row(qg, wg[e, n], x[p0], scratch)
            else:
                dq.deq_row(qg, wg[e, n], buf)
                for p in range(starts[g], starts[g + 1]):
                    out[p, n] = _dot(buf, x[p])
            if one and dq.has_dot_row(qu):
                out[p0, n] = _silu(out[p0, n]) * dq.dot_row(qu, wu[e, n], x[p0], scratch)
                continue
            dq.deq_row(qu, wu[e, n], buf)
            for p in range(starts[g], starts[g + 1]):
                out[p, n] = _silu(out[p, n]) * _dot(buf, x[p])
    return out


def grouped_gate_up(x: np.ndarray, wg: np.ndarray, qg: int, wu: np.ndarray, qu: int, starts: np.ndarray,
                    eids: np.ndarray) -> np.ndarray:
    """silu(x @ gate.T) * (x @ up.T) for rows of x (P, K) sorted by expert: (P, I) float32."""
    out = np.empty((x.shape[0], wg.shape[1]), np.float32)
    with POOL_LOCK:
        _grouped_gate_up_kernel(wg, qg, wu, qu, x, starts, eids, out)
    return out


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().contiguous().numpy()
    return np.ascontiguousarray(t)


def _check(x: np.ndarray, w: np.ndarray, qt: int) -> int:
    if w.dtype != np.uint8 or w.ndim < 2:
        raise WeightsError(f"quantised weight must be uint8 (..., N, K_bytes), got {w.dtype} {w.shape}")
    K = row_elems(w.shape[-1], qt)
    if x.ndim != 2 or x.shape[1] != K:
        raise WeightsError(f"activations of shape {tuple(x.shape)} do not match weight rows of {K} elements")
    return K


def dequantize(qweight, qtype) -> torch.Tensor:
    """(..., N, K_bytes) uint8 -> (..., N, K) float32; numba for FAST_TYPES, offload.gguf otherwise."""
    w, qt = plain_blocks(_np(qweight), qtype_id(qtype))
    K = row_elems(w.shape[-1], qt)
    lead = w.shape[:-1]
    if qt in dq.FAST_TYPES:
        out = np.empty((int(np.prod(lead)), K), np.float32)
        with POOL_LOCK:
            dq.dequant_rows(w.reshape(-1, w.shape[-1]), qt, out)
        return torch.from_numpy(out).reshape(*lead, K)
    from offload.gguf.dequant_torch import dequantize_torch

    return dequantize_torch(torch.from_numpy(w), qt, (*lead, K))


def gemv(x, qweight, qtype) -> torch.Tensor:
    """x (M, K) float32 @ W.T with W (N, K_bytes) ggml blocks -> (M, N) float32; numba row kernel."""
    xn = _np(x).astype(np.float32, copy=False)
    w = _np(qweight)
    qt = qtype_id(qtype)
    _check(xn, w, qt)
    if qt not in dq.FAST_TYPES:
        return gemm(x, qweight, qtype)
    out = np.empty((xn.shape[0], w.shape[0]), np.float32)
    with POOL_LOCK:
        _gemv_kernel(w, qt, xn, out)
    return torch.from_numpy(out)


def gemm(x, qweight, qtype) -> torch.Tensor:
    """Same as gemv by dequantising W to float32 once and calling torch.mm (for many tokens)."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    w = _np(qweight)
    _check(xt.numpy() if xt.dim() == 2 else np.empty((0,)), w, qtype_id(qtype))
    return torch.mm(xt, dequantize(w, qtype).T)


def gemm_min_tokens(*qtypes) -> int:
    """Rows from which the batch path (dequant + torch.mm) takes over, for weights of these types."""
    from offload.kernels.cpu import native

    return NATIVE_GEMM_MIN_TOKENS if native.fast(*qtypes) else GEMM_MIN_TOKENS


def qmatmul(x, qweight, qtype) -> torch.Tensor:
    """x (M, K) @ W.T choosing the row kernel for M < gemm_min_tokens(qtype) (the native one with 8-bit
    activations where the type has a SIMD kernel, else numba), dequant + torch.mm above."""
    from offload.kernels.cpu import native

    qt = qtype_id(qtype)
    if x.shape[0] < NATIVE_GEMM_MIN_TOKENS and native.fast(qt):
        return native.gemv(x, qweight, qt)
    if x.shape[0] < GEMM_MIN_TOKENS and qt in dq.FAST_TYPES:
        return gemv(x, qweight, qtype)
    return gemm(x, qweight, qtype)


def grouped_gemv(x: np.ndarray, w: np.ndarray, qt: int, starts: np.ndarray, eids: np.ndarray) -> np.ndarray:
    """Rows of x (P, K) sorted by expert times their expert's W (E, N, K_bytes): (P, N) float32."""
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    with POOL_LOCK:
        _grouped_kernel(w, qt, x, starts, eids, out)
    return out


def qmatmul_ref(x, qweight, qtype) -> torch.Tensor:
    """Plain reference: gguf-py dequantisation (numpy) + torch.matmul in float32."""
    from offload.gguf._ggufpy import gguf_py

    g = gguf_py()
    w, qt = plain_blocks(_np(qweight), qtype_id(qtype))
    W = torch.from_numpy(np.asarray(g.quants.dequantize(w, g.GGMLQuantizationType(qt)),
                                    dtype=np.float32))
    return torch.as_tensor(x, dtype=torch.float32) @ W.T


# the per-format names the spec asks for: gemv_q4_k(x, w) etc.
def _bind(fn, qt):
    def f(x, qweight):
        return fn(x, qweight, qt)

    f.__name__ = fn.__name__
    return f


FORMATS = {"q4_0": dq.Q4_0, "q8_0": dq.Q8_0, "q2_k": dq.Q2_K, "q3_k": dq.Q3_K, "q4_k": dq.Q4_K,
           "q5_k": dq.Q5_K, "q6_k": dq.Q6_K, "iq4_xs": dq.IQ4_XS}
for _name, _qt in FORMATS.items():
    globals()[f"gemv_{_name}"] = _bind(gemv, _qt)
    globals()[f"gemm_{_name}"] = _bind(gemm, _qt)
    globals()[f"gemv_{_name}_ref"] = _bind(qmatmul_ref, _qt)
