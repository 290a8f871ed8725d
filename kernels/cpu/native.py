"""The native quantised kernels (csrc/qdot.cpp) through ctypes, and their plain reference.

The C++ file is compiled once per machine and source version with the system compiler and
-march=native (AVX-512 VNNI where the CPU has it), into ~/.cache/offload/native/<hash>/ (or
$OFFLOAD_CACHE/native). About 4 s; later imports load the cached library. Where no compiler works,
`lib()` is None and callers use the numba kernels. OFFLOAD_NATIVE=0 turns the native path off.

Numerics: activations are quantised per row like ggml's CPU backend (Q8_K blocks for K-quants and
IQ4_XS, Q8_0 for the 32-value types; Q4_1 / Q5_1's Q8_1 is Q8_0 with its sum), so results are dequant(W) . dequant(quant(x)), what llama.cpp computes;
`gemv_ref` is that in plain torch: gguf-py's dequantisation times offload.gguf.numerics' rounding.

M tokens, K inputs, N output rows, P (token, expert) pairs, H hidden, I expert FFN width.
"""

import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from offload.errors import WeightsError
from offload.gguf.types import GGMLType, block_sizes

SOURCE = Path(__file__).parent / "csrc" / "qdot.cpp"  # includes the csrc/*.h parts: one translation unit
# the ggml types with a kernel in csrc (its enum in csrc/common.h holds the same ids), by id -> lower-case
# name; ids and block sizes come from the type table (offload.gguf.types)
TYPES = {int(t): t.name.lower() for t in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
                                          GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K,
                                          GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_XS)}
_BLOCK = block_sizes(TYPES)  # id -> (block_size, bytes_per_block)

R16 = 0x100  # type id flag: the matrix's full 16-row groups are interleaved (csrc/repack.h)
REPACKABLE = tuple(int(t) for t in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1,
                                    GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.IQ4_XS, GGMLType.Q2_K,
                                    GGMLType.Q3_K, GGMLType.Q5_K))  # every type here (csrc/repack.h)
TYPES.update({R16 | q: TYPES[q] + "_r16" for q in REPACKABLE})
_BLOCK.update({R16 | q: _BLOCK[q] for q in REPACKABLE})

_lib = None
_tried = False
_vp = ctypes.c_void_p  # arrays go over as raw addresses: ndarray.ctypes.data_as costs microseconds


def _cache_dir() -> Path:
    base = os.environ.get("OFFLOAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "offload")
    return Path(base) / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> "str | None":
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def build(force: bool = False) -> Path:
    """Compile qdot.cpp (and the headers it includes) for this machine (cached); returns the shared library's path."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    sources = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.[ch]*")))
    key = hashlib.sha256(sources + " ".join([cxx, *flags, version, _cpu_flags()]).encode())
    out_dir = _cache_dir() / key.hexdigest()[:16]
    lib_path = out_dir / "libqdot.so"
    if lib_path.exists() and not force:
        return lib_path
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "build.lock", "w") as lock:  # another process may be building the same key
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib_path.exists() and not force:
            return lib_path
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        r = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, lib_path)
    return lib_path


def lib():
    """The loaded library, or None (no compiler, a failed build, or OFFLOAD_NATIVE=0)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("OFFLOAD_NATIVE", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        L = ctypes.CDLL(str(build()))
    except Exception as e:  # the numba kernels still work, only slower
        warnings.warn(f"offload: native CPU kernels unavailable, using numba ({e})", RuntimeWarning, stacklevel=2)
        return None
    i64, i32 = ctypes.c_int64, ctypes.c_int
    L.qdot_act_row_bytes.restype = i64
    L.qdot_act_row_bytes.argtypes = [i32, i64]
    L.qdot_quantize.argtypes = [i32, _vp, i64, i64, _vp]
    L.qdot_gemv.argtypes = [i32, _vp, i64, i64, _vp, i64, i64, _vp, i32]
    L.qdot_moe.argtypes = [_vp, i64, i64, i64, _vp, _vp, i64, _vp, i32, _vp, i32, _vp, i32, _vp, _vp]
    L.qdot_moe_topk.argtypes = [_vp, i64, i64, _vp, _vp, i64, i64, i64, _vp, i32, _vp, i32, _vp, i32,
                                _vp, _vp, _vp, _vp]
    L.qdot_gemv_multi.argtypes = [i32, _vp, _vp, _vp, _vp, i64, i64, _vp]
    L.qdot_gemv_batched.argtypes = [i32, _vp, i64, i64, i64, _vp, i64, i64, _vp]
    L.qdot_repack.argtypes = [i32, _vp, i64, i64, _vp, i32]
    L.qdot_set_threads.argtypes = [i32]
    L.qdot_pool_selftest.restype = i64
    L.qdot_pool_selftest.argtypes = [i64, i64]
    from offload.kernels.cpu.threads import get_threads

    L.qdot_set_threads(get_threads())
    L.qdot_set_prefetch.argtypes = [i32]
    L.qdot_set_prefetch(prefetch_ahead())
    _lib = L
    return _lib


# Bytes the Q4_K interleaved kernel prefetches ahead into L2 when nothing says otherwise: 9 KB (four group blocks).
# On the 2-core EPYC (Zen 4) dev VM the hardware prefetchers alone read Q4_K from DRAM at ~0.8x of a plain read;
# with it the one-token GEMV read 1.15-1.36x faster in busy phases, 0.97-1.08x in quiet ones (in turns, 15 runs,
# 2026-12-06; csrc/repack.h).
# `offload probe` measures this machine and saves its choice.
DEFAULT_PREFETCH_AHEAD = 9216


def prefetch_ahead() -> int:
    """The interleaved kernels' software prefetch distance in bytes (0 = none): OFFLOAD_PREFETCH_AHEAD, else the
    one `offload probe` measured best here (the hardware profile's calibration.prefetch_ahead), else the default."""
    env = os.environ.get("OFFLOAD_PREFETCH_AHEAD")
    if env is not None:
        if not env.isdigit() or int(env) > 1 << 20:
            raise ValueError(f"OFFLOAD_PREFETCH_AHEAD: expected bytes from 0 to 1048576, got {env!r}")
        return int(env)
    from offload.placement.hardware import profile_path

    try:
        saved = json.loads(profile_path().read_text()).get("calibration", {}).get("prefetch_ahead")
    except (OSError, ValueError, AttributeError):
        saved = None
    return saved if type(saved) is int and 0 <= saved <= 1 << 20 else DEFAULT_PREFETCH_AHEAD


# types whose native kernel is SIMD (AVX-512 VNNI) and beats the numba one: all of them
SIMD_TYPES = set(TYPES)


def supported(qtype: int) -> bool:
    """True when the native library is loaded and has a kernel for this ggml type id."""
    return int(qtype) in TYPES and lib() is not None


def fast(*qtypes: int) -> bool:
    """True when every type has a SIMD native kernel on this CPU: the engine's path for them."""
    return all(int(q) in SIMD_TYPES for q in qtypes) and lib() is not None and bool(lib().qdot_has_vnni())


def set_threads(n: int) -> None:
    if _lib is not None:
        _lib.qdot_set_threads(int(n))


def has_vnni() -> bool:
    return lib() is not None and bool(lib().qdot_has_vnni())


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            x = x.detach().to("cpu", torch.float32).contiguous()
        return x.detach().numpy()
    if x.dtype == np.float32 and x.flags.c_contiguous:
        return x
    return np.ascontiguousarray(x, dtype=np.float32)


def _u8(w) -> np.ndarray:
    if isinstance(w, torch.Tensor):
        w = w.detach().contiguous().numpy()
    if w.dtype != np.uint8:
        raise WeightsError(f"quantised weight must be uint8 ggml blocks, got {w.dtype}")
    return w if w.flags.c_contiguous else np.ascontiguousarray(w)


def base_type(qtype: int) -> int:
    """The ggml type of a kernel type id (an interleaved type's plain one)."""
    return int(qtype) & ~R16


def repacks(qtype: int, rows: int) -> bool:
    """True when matrices of this type with `rows` rows are worth interleaving here (the SIMD kernels run
    and at least one full 16-row group exists). OFFLOAD_REPACK=0 keeps the file's layout."""
    return (int(qtype) in REPACKABLE and rows >= 16 and os.environ.get("OFFLOAD_REPACK", "1") != "0"
            and has_vnni())


def _repack(blocks, qtype: int, unpack: bool) -> np.ndarray:
    w = _u8(blocks)
    if w.ndim < 2:
        raise WeightsError(f"repack: blocks must be (..., N, row bytes), got shape {w.shape}")
    out = np.empty_like(w)  # fresh memory: on a VM its first touch costs more than the repacking itself
    N, rb = w.shape[-2:]
    src, dst = w.reshape(-1, N, rb), out.reshape(-1, N, rb)
    if N % 16 == 0:  # no tail rows: the experts' rows form one matrix of whole groups, one call
        src, dst, N = src.reshape(1, -1, rb), dst.reshape(1, -1, rb), src.shape[0] * N
    for e in range(src.shape[0]):  # else one matrix at a time: a 16-row group never spans two experts
        if lib().qdot_repack(base_type(qtype), _ptr(src[e]), N, rb, _ptr(dst[e]), int(unpack)) < 0:
            raise WeightsError(f"repack: no interleaved form of {TYPES.get(int(qtype), qtype)} rows of {rb} bytes")
    return out


def repack(blocks, qtype: int) -> tuple[np.ndarray, int]:
    """Plain ggml rows (..., N, row bytes) of a REPACKABLE type -> (interleaved copy, its type id qtype | R16).
    Lossless and the same size; the N % 16 tail rows stay plain. The copy is new (anonymous) memory: a
    memory-mapped original stays evictable page cache."""
    return _repack(blocks, qtype, False), R16 | int(qtype)


def unpack(blocks, qtype: int) -> np.ndarray:
    """The plain ggml rows of an interleaved matrix (`repack`'s inverse, bit-exact)."""
    if not int(qtype) & R16:
        raise WeightsError(f"unpack: type {TYPES.get(int(qtype), qtype)} is not an interleaved type")
    return _repack(blocks, qtype, True)


def _row_elems(row_bytes: int, qtype: int) -> int:
    bs, bb = _BLOCK[qtype]
    if row_bytes % bb:
        raise WeightsError(f"row of {row_bytes} bytes is not a whole number of {TYPES[qtype]} blocks")
    return row_bytes // bb * bs


def quantize_act(x, qtype: int) -> np.ndarray:
    """x (M, K) -> (M, act row bytes) uint8: the activation rows the dot products consume (for tests)."""
    x = _f32(x)
    M, K = x.shape
    rb = lib().qdot_act_row_bytes(int(qtype), K)
    if rb < 0:
        raise WeightsError(f"no native kernel for ggml type {qtype} with K={K}")
    out = np.empty((M, rb), np.uint8)
    lib().qdot_quantize(int(qtype), _ptr(x), M, K, _ptr(out))
    return out


def gemv(x, qweight, qtype: int, plain: bool = False) -> torch.Tensor:
    """x (M, K) float @ W.T, W (N, row bytes) ggml blocks -> (M, N) float32; plain=True uses the plain
    C++ dot products instead of the SIMD ones (both exist to be tested against each other)."""
    qtype = int(qtype)
    x, w = _f32(x), _u8(qweight)
    if w.ndim != 2:
        raise WeightsError(f"quantised weight must be (N, row bytes), got shape {w.shape}")
    K = _row_elems(w.shape[1], qtype)
    if x.ndim != 2 or x.shape[1] != K:
        raise WeightsError(f"activations of shape {x.shape} do not match weight rows of {K} elements")
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    if x.shape[0] and w.shape[0]:
        rc = lib().qdot_gemv(qtype, _ptr(w), w.shape[0], w.shape[1], _ptr(x), x.shape[0], K,
                             _ptr(out), int(plain))
        if rc:
            raise WeightsError(f"native gemv: unsupported ggml type {qtype} or K={K}")
    return torch.from_numpy(out)


def gemv_multi(x, qweights: list, qtypes: list[int]) -> list[torch.Tensor]:
    """[gemv(x, W_j, qtype_j)] in one native call: x (M, K) quantised once, one parallel region over every
    matrix's rows. Each W_j is (N_j, row bytes) ggml blocks over K elements."""
    x = _f32(x)
    M, K = x.shape
    ws = [_u8(w) for w in qweights]
    for w, qt in zip(ws, qtypes):
        if w.ndim != 2 or _row_elems(w.shape[1], int(qt)) != K:
            raise WeightsError(f"gemv_multi: weight {w.shape} of type {TYPES.get(int(qt), qt)} does not take "
                               f"rows of {K} elements")
    outs = [np.empty((M, w.shape[0]), np.float32) for w in ws]
    if M:
        qts = np.array([int(q) for q in qtypes], np.int32)
        wp = np.array([_ptr(w) for w in ws], np.uint64)
        ns = np.array([w.shape[0] for w in ws], np.int64)
        op = np.array([_ptr(o) for o in outs], np.uint64)
        if lib().qdot_gemv_multi(len(ws), _ptr(qts), _ptr(wp), _ptr(ns), _ptr(x), M, K, _ptr(op)):
            raise WeightsError(f"native gemv_multi: unsupported ggml types {list(qtypes)} or K={K}")
    return [torch.from_numpy(o) for o in outs]


def gemv_batched(x, qweights, qtype: int) -> torch.Tensor:
    """out[b] = x[b] (M, K) @ W[b].T for every b in one native call: x (B, M, K) float, W (B, N, row bytes) ggml
    blocks (an interleaved type: N % 16 == 0) -> (B, M, N) float32. MLA's per-head absorbed matrices."""
    qtype = int(qtype)
    x, w = _f32(x), _u8(qweights)
    if w.ndim != 3 or x.ndim != 3 or x.shape[0] != w.shape[0]:
        raise WeightsError(f"gemv_batched: activations {x.shape} and weights {w.shape} are not (B, M, K) / (B, N, row bytes)")
    B, M, K = x.shape
    if _row_elems(w.shape[2], qtype) != K:
        raise WeightsError(f"gemv_batched: activations of shape {x.shape} do not match weight rows of "
                           f"{_row_elems(w.shape[2], qtype)} elements")
    out = np.empty((B, M, w.shape[1]), np.float32)
    if out.size and lib().qdot_gemv_batched(qtype, _ptr(w), B, w.shape[1], w.shape[2], _ptr(x), M, K, _ptr(out)):
        raise WeightsError(f"native gemv_batched: unsupported ggml type {qtype}, K={K} or N={w.shape[1]}")
    return torch.from_numpy(out)


def moe_rows(x: np.ndarray, starts: np.ndarray, eids: np.ndarray, gate: np.ndarray, up: np.ndarray,
             down: np.ndarray, qtypes: tuple[int, int, int]) -> np.ndarray:
    """Expert FFN outputs (P, H) of rows x (P, H) grouped by expert (rows starts[g]:starts[g+1] through
    local expert eids[g]); gate / up (E, I, H bytes), down (E, H, I bytes) ggml blocks, C-contiguous."""
    x = _f32(x)
    P, H = x.shape
    gate, up, down = _u8(gate), _u8(up), _u8(down)
    inter = gate.shape[1]
    starts = np.ascontiguousarray(starts, np.int64)
    eids = np.ascontiguousarray(eids, np.int64)
    h = np.empty((P, inter), np.float32)
    y = np.empty((P, H), np.float32)
    rc = lib().qdot_moe(_ptr(x), P, H, inter, _ptr(starts), _ptr(eids), len(eids),
                        _ptr(gate), qtypes[0], _ptr(up), qtypes[1], _ptr(down), qtypes[2],
                        _ptr(h), _ptr(y))
    if rc:
        raise WeightsError(f"native moe: unsupported ggml types {qtypes} for H={H}, I={inter}")
    return y


def moe_topk(x: np.ndarray, loc: np.ndarray, weights: np.ndarray, gate: np.ndarray, up: np.ndarray,
             down: np.ndarray, qtypes: tuple[int, int, int], shared: tuple | None = None) -> np.ndarray:
    """out (T, H) = sum_k weights[t, k] * FFN_loc[t, k](x_t) for x (T, H), loc (T, K) local expert indices
    (-1: not held here, skipped), weights (T, K); gate / up (E, I, H bytes), down (E, H, I bytes). The
    grouping by expert and the weighted sum run in C++: one call per MoE layer. `shared`: a shared
    expert's (gate, up, down) of the same types and shapes, (I, H bytes) / (H, I bytes), added to every
    token's output within the same call."""
    x = _f32(x)
    T, H = x.shape
    loc = np.ascontiguousarray(loc, np.int64)
    weights = np.ascontiguousarray(weights, np.float32)
    out = np.empty((T, H), np.float32)
    sp = [0, 0, 0]
    if shared is not None:
        mats = [_u8(m) for m in shared]
        if [m.shape for m in mats] != [gate.shape[1:], up.shape[1:], down.shape[1:]]:
            raise WeightsError(f"native moe_topk: shared expert of shapes {[m.shape for m in mats]} does not match "
                               f"the routed experts' {[gate.shape[1:], up.shape[1:], down.shape[1:]]}")
        sp = [_ptr(m) for m in mats]
    rc = lib().qdot_moe_topk(_ptr(x), T, loc.shape[1], _ptr(loc), _ptr(weights), gate.shape[0], H, gate.shape[1],
                             _ptr(gate), qtypes[0], _ptr(up), qtypes[1], _ptr(down), qtypes[2], *sp, _ptr(out))
    if rc == -2:
        raise WeightsError(f"native moe_topk: a local expert index is >= {gate.shape[0]}")
    if rc:
        raise WeightsError(f"native moe: unsupported ggml types {qtypes} for H={H}, I={gate.shape[1]}")
    return out


def gemv_ref(x, qweight, qtype: int) -> torch.Tensor:
    """Plain reference of `gemv`: x rounded as ggml quantises activations for this weight type
    (offload.gguf.numerics), times gguf-py's dequantisation of W, in float64."""
    from offload.gguf._ggufpy import gguf_py
    from offload.gguf.numerics import round_activations
    from offload.gguf.types import GGMLType

    g = gguf_py()
    w = unpack(qweight, qtype) if int(qtype) & R16 else _u8(qweight)
    W = np.asarray(g.quants.dequantize(w, g.GGMLQuantizationType(base_type(qtype))), np.float64)
    xr = round_activations(torch.from_numpy(_f32(x)), GGMLType(base_type(qtype))).double()
    return (xr @ torch.from_numpy(W).T).float()
