"""Weights kept as ggml blocks on the CPU, multiplied by the native kernels (the `w(x)` / `w.rows(ids)`
interface of offload.models.weights): one matrix, matrices sharing an input (q / k / v) in one call, and a
SwiGLU MLP in one call (the fused expert kernel with a single expert).

The native row kernels quantise activations to 8 bits per row as llama.cpp does; from NATIVE_GEMM_MIN_TOKENS
rows on, the blocks are expanded once per call and multiplied with torch.mm (quantmm.qmatmul).

M rows, K inputs, N outputs, I MLP width.
"""

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from offload.kernels.cpu import native
from offload.kernels.cpu import quantmm as qm


def as_native(raw: np.ndarray, qtype: int) -> tuple[np.ndarray, int]:
    """Blocks (..., row bytes) of a type the native kernels lack, rewritten losslessly as one they have, once at
    load: IQ4_NL (fp16 d + 32 4-bit indices into a signed 8-bit codebook) is exactly Q8_0 (fp16 d + 32 int8)
    with the codebook looked up, 1.9x the bytes but read at the Q8_0 kernels' speed (the numpy fallback took
    ~0.01 GB/s: IQ4_XS files keep IQ4_NL where a row is not a multiple of 256). Integer dot products are the
    same as llama.cpp's (it multiplies IQ4_NL by 8-bit activations too). Other types are returned as given."""
    from offload.gguf.quants import KVALUES_IQ4NL, nibbles
    from offload.gguf.types import CPU_COMPUTE_TYPE, GGMLType

    if qtype not in CPU_COMPUTE_TYPE:
        return raw, qtype
    assert qtype == GGMLType.IQ4_NL and CPU_COMPUTE_TYPE[qtype] == GGMLType.Q8_0  # the one rewrite written below
    blocks = raw.reshape(-1, 18)  # (B, 18): d, then 16 bytes of nibble pairs
    out = np.empty((blocks.shape[0], 34), np.uint8)  # (B, 34): d, then 32 int8
    out[:, :2] = blocks[:, :2]
    out[:, 2:] = KVALUES_IQ4NL.astype(np.int8)[nibbles(blocks[:, 2:18])].view(np.uint8)
    return out.reshape(*raw.shape[:-1], raw.shape[-1] // 18 * 34), int(GGMLType.Q8_0)


class QuantWeight:
    """A matrix (N, K) as ggml blocks (N, row bytes): the file's mmapped bytes or their interleaved copy
    (native.repack, lossless) when `qtype` carries native.R16. Only for types with a native SIMD kernel."""

    device = torch.device("cpu")

    def __init__(self, blocks: np.ndarray, qtype: int, cols: int, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, act_quant: bool = False, name: str = ""):
        self.blocks, self.qtype, self.cols = blocks, int(qtype), cols  # (N, row bytes), kernel type id, K
        self.bias = bias  # (N,)
        self.dtype = dtype  # of embedding rows (matmul outputs take the input's dtype)
        self.act_quant = act_quant  # round inputs like llama.cpp first (offload.gguf.numerics)
        self.name = name

    @classmethod
    def from_file(cls, raw: np.ndarray, qtype: int, cols: int, bias=None, dtype=torch.float32,
                  act_quant: bool = False, name: str = "", repack: bool = True) -> "QuantWeight":
        """Over a file's blocks (N, row bytes), interleaved once here where the native kernels read that faster
        (the file's bytes then stay only as evictable page cache); repack=False keeps the file's layout (a
        model paged from disk: the blocks stay views of its pages)."""
        qtype = int(qtype)
        if repack and not act_quant and native.repacks(qtype, raw.shape[0]):
            raw, qtype = native.repack(raw, qtype)
        return cls(raw, qtype, cols, bias, dtype, act_quant, name)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.blocks.shape[0], self.cols)

    @property
    def ggml_type(self):
        """The file's block type (the same for an interleaved matrix)."""
        from offload.gguf.types import GGMLType

        return GGMLType(native.base_type(self.qtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """As F.linear(x (..., K), W, bias) -> (..., N) in x's dtype."""
        x2 = x.reshape(-1, self.cols)  # (M, K)
        if self.act_quant:
            from offload.gguf.numerics import round_activations

            x2 = round_activations(x2, self.ggml_type)
        if x2.shape[0] < qm.NATIVE_GEMM_MIN_TOKENS:
            y = native.gemv(x2, self.blocks, self.qtype)  # (M, N) float32
        else:
            with warnings.catch_warnings():  # read-only mmap views: the kernels only read them
                warnings.simplefilter("ignore", UserWarning)
                y = qm.qmatmul(x2.float().contiguous(), self.blocks, self.qtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (T,) as (T, K): an embedding lookup that expands only the rows asked for."""
        ids = ids.cpu()
        n = self.blocks.shape[0]
        if bool(((ids < 0) | (ids >= n)).any()):
            raise IndexError(f"{self.name}: token id out of range [0, {n})")
        b = self._rows_plain(ids.numpy())  # (T, row bytes) in ggml's layout
        return qm.dequantize(b, native.base_type(self.qtype)).to(self.dtype)

    def _rows_plain(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of the blocks in ggml's layout: an interleaved matrix unpacks only the 16-row groups
        holding them."""
        w = self.blocks
        if not self.qtype & native.R16:
            return np.ascontiguousarray(w[ids])
        full = w.shape[0] // 16 * 16  # rows from here on are plain (the tail)
        groups = {int(g): native.unpack(w[16 * g:16 * g + 16], self.qtype) for g in np.unique(ids[ids < full] // 16)}
        return np.stack([groups[r // 16][r % 16] if r < full else w[r] for r in ids.tolist()])


class HeadsQuantWeight:
    """One matrix (N, K) per head as ggml blocks (B, N, row bytes): MLA's absorbed W_UK / W_UV as the file stores
    them (llama.cpp's attn_k_b / attn_v_b), multiplied head by head in one native call, so a decode step reads
    them in their quantised form (their float expansion is 4-7x the bytes)."""

    def __init__(self, blocks: np.ndarray, qtype: int, cols: int):
        self.blocks, self.qtype, self.cols = blocks, int(qtype), cols  # (B, N, row bytes), kernel type id, K

    @classmethod
    def from_file(cls, raw: np.ndarray, qtype: int, cols: int) -> "HeadsQuantWeight":
        b, n, _ = raw.shape
        qtype = int(qtype)
        if n % 16 == 0 and native.repacks(qtype, n):  # whole 16-row groups per head: interleave them all at once
            flat, qtype = native.repack(raw.reshape(b * n, -1), qtype)
            raw = flat.reshape(b, n, -1)
        return cls(raw, qtype, cols)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, M, K) -> (B, M, N) in x's dtype: head b's rows times matrix b."""
        return native.gemv_batched(x, self.blocks, self.qtype).to(x.dtype)


def native_rows(ws) -> bool:
    """True when these weights can share native calls: quantised CPU matrices without numerics emulation."""
    return all(isinstance(w, QuantWeight) and not w.act_quant for w in ws)


class QuantLinears:
    """[w(x)] for matrices that share their input (q / k / v): x quantised once, one native call."""

    def __init__(self, ws: list[QuantWeight]):
        self.ws = ws
        self.blocks = [w.blocks for w in ws]
        self.qtypes = [w.qtype for w in ws]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        if x2.shape[0] >= qm.NATIVE_GEMM_MIN_TOKENS:
            return [w(x) for w in self.ws]
        ys = native.gemv_multi(x2, self.blocks, self.qtypes)  # [(M, N_j)] float32
        return [(y if w.bias is None else y + w.bias).reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
                for y, w in zip(ys, self.ws)]


class QuantMLP:
    """down(silu(gate x) * up x) over quantised CPU matrices, as one native call below NATIVE_GEMM_MIN_TOKENS
    rows (the fused expert kernel with a single expert)."""

    def __init__(self, gate: QuantWeight, up: QuantWeight, down: QuantWeight):
        self.gate, self.up, self.down = gate, up, down  # (I, H), (I, H), (H, I)
        self.qtypes = (gate.qtype, up.qtype, down.qtype)
        self._stacked = [w.blocks[None] for w in (gate, up, down)]  # (1, N, row bytes) views: one expert

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (M, H)
        m = x2.shape[0]
        if m >= qm.NATIVE_GEMM_MIN_TOKENS:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        y = native.moe_rows(x2, np.array([0, m], np.int64), np.zeros(1, np.int64), *self._stacked, self.qtypes)
        return torch.from_numpy(y).reshape(x.shape).to(x.dtype)


# weights whose matmul is a native call on the host: a recorded decode step (offload.graphs) cannot hold them
HOST_WEIGHTS = (QuantWeight, HeadsQuantWeight, QuantLinears, QuantMLP)
