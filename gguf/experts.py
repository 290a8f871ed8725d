"""Routed experts that stay in their GGUF quantisation: an expert group (the MoE group contract of
offload.models.moe) whose weights are the file's quantised blocks, dequantised only inside each matmul.

On the CPU the blocks are the mmapped file bytes themselves (zero-copy when the group holds every expert of
the layer) and the layer runs on offload.kernels.cpu.moe's fused kernel (moe_cpu over CpuExperts built on
the same arrays); on a GPU the bytes are copied over once and dequantised per call
(offload.gguf.dequant_torch).
With act_quant (llama.cpp numerics emulation) the per-expert path below rounds each matmul input.

T tokens, K top-k, H hidden, I expert intermediate, n tokens routed to one expert.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from offload.gguf.dequant_torch import dequantize_torch
from offload.gguf.numerics import round_activations
from offload.gguf.types import GGMLType

_FLOAT = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


@dataclass
class QuantMatrix:
    """One weight kind (gate, up or down) of a group's experts: (E_group, N, row bytes) ggml blocks."""

    blocks: object  # numpy uint8 (CPU: the mmap view, or its interleaved copy) or torch uint8 (GPU)
    qtype: "GGMLType | int"  # the file's type, or the native kernels' interleaved type (qtype | native.R16)
    cols: int  # K, elements per row
    device: torch.device
    name: str
    act_quant: bool = False  # round inputs like llama.cpp (offload.gguf.numerics)

    @classmethod
    def from_raw(cls, raw: np.ndarray, qtype: GGMLType, cols: int, expert_ids: list[int],
                 device: torch.device, name: str, act_quant: bool = False) -> "QuantMatrix":
        ids = list(expert_ids)
        if ids != list(range(raw.shape[0])):
            raw = raw[np.asarray(ids, dtype=np.int64)]  # this home's experts only (a copy, still quantised)
        if device.type != "cpu":
            blocks = torch.from_numpy(np.ascontiguousarray(raw)).to(device)
            return cls(blocks, qtype, cols, device, name, act_quant)
        from offload.kernels.cpu import native

        if not act_quant and native.repacks(int(qtype), raw.shape[1]):
            # interleaved once at load for the native kernels (lossless, same size); the copy replaces the
            # file's blocks here, which stay only as evictable page cache
            raw, qtype = native.repack(raw, int(qtype))
        return cls(raw, qtype, cols, device, name, act_quant)

    @property
    def ggml_type(self) -> GGMLType:
        """The file's block type (the same for an interleaved matrix)."""
        from offload.kernels.cpu.native import base_type

        return GGMLType(base_type(int(self.qtype)))

    def _plain(self, b: np.ndarray) -> np.ndarray:
        """Rows b (..., N, row bytes) of this matrix in ggml's layout (unpacked when interleaved)."""
        from offload.kernels.cpu.quantmm import plain_blocks

        return plain_blocks(b, int(self.qtype))[0] if isinstance(b, np.ndarray) else b

    def weight(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert i's matrix (N, K) as `dtype` (float types are a view, block types are dequantised)."""
        b = self._plain(self.blocks[i])
        if isinstance(b, np.ndarray):
            b = torch.from_numpy(b)
        if self.qtype in _FLOAT:
            return b.view(_FLOAT[self.qtype]).view(b.shape[0], self.cols).to(dtype)
        return dequantize_torch(b, self.ggml_type, (b.shape[0], self.cols), dtype=torch.float32).to(dtype)

    def matmul(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x (n, K) @ W_i.T -> (n, N) float32."""
        if self.act_quant:
            x = round_activations(x, self.qtype)
        if self.device.type == "cpu" and self.qtype not in _FLOAT:
            from offload.kernels.cpu.quantmm import qmatmul

            with warnings.catch_warnings():  # read-only mmap views: the kernels only read them
                warnings.simplefilter("ignore", UserWarning)
                return qmatmul(x.float().contiguous(), self.blocks[i], int(self.qtype))
        return F.linear(x.float(), self.weight(i, torch.float32))


    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (T,) of a one-matrix group as float32 (T, K): an embedding lookup."""
        from offload.kernels.cpu.quantmm import dequantize

        ids = ids.cpu()
        if bool(((ids < 0) | (ids >= self.blocks.shape[1])).any()):
            raise IndexError(f"{self.name}: token id out of range [0, {self.blocks.shape[1]})")
        b = self._rows_plain(ids.numpy())  # (T, row bytes)
        if self.qtype in _FLOAT:
            return torch.from_numpy(b).view(_FLOAT[self.qtype]).float()
        return dequantize(b, int(self.ggml_type))

    def _rows_plain(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a one-matrix group's blocks, in ggml's layout: an interleaved matrix unpacks only
        the 16-row groups holding them."""
        from offload.kernels.cpu import native

        w = self.blocks[0]
        if not int(self.qtype) & native.R16:
            return np.ascontiguousarray(w[ids])
        full = w.shape[0] // 16 * 16  # rows from here on are plain (the tail)
        groups = {int(g): native.unpack(w[16 * g:16 * g + 16], int(self.qtype)) for g in np.unique(ids[ids < full] // 16)}
        return np.stack([groups[r // 16][r % 16] if r < full else w[r] for r in ids.tolist()])

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """As F.linear(x (..., K), W_0, bias) for a one-matrix group (a projection kept quantised)."""
        y = self.matmul(x.reshape(-1, x.shape[-1]), 0)  # (M, N) float32
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def _cpu_projection(w) -> bool:
    """w is a quantised one-matrix group on the CPU without numerics emulation: native kernels may take it."""
    return isinstance(w, QuantMatrix) and w.device.type == "cpu" and not w.act_quant and w.blocks.shape[0] == 1


def _native_rows(mats, m: int) -> bool:
    """True when m-row inputs to every matrix (one-matrix CPU groups) go through the native row kernels."""
    from offload.kernels.cpu import native, quantmm

    return (m < quantmm.NATIVE_GEMM_MIN_TOKENS and all(_cpu_projection(w) for w in mats)
            and native.fast(*(int(w.qtype) for w in mats)))


def linear_many(x: torch.Tensor, mats: list, biases: list) -> "list[torch.Tensor] | None":
    """[F.linear(x, W, b)] for projections that share their input (q / k / v), as one native call; None
    where the native row kernels do not take them all (the caller multiplies one by one)."""
    x2 = x.reshape(-1, x.shape[-1])
    if not _native_rows(mats, x2.shape[0]) or any(w.cols != x2.shape[1] for w in mats):
        return None
    from offload.kernels.cpu import native

    with warnings.catch_warnings():  # read-only mmap views: the kernels only read them
        warnings.simplefilter("ignore", UserWarning)
        ys = native.gemv_multi(x2, [w.blocks[0] for w in mats], [int(w.qtype) for w in mats])
    return [(y if b is None else y + b).reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype) for y, b in zip(ys, biases)]


def swiglu(x: torch.Tensor, gate, up, down) -> "torch.Tensor | None":
    """down(silu(gate x) * up x) for a dense or shared-expert MLP kept quantised, as one native call (the
    fused expert kernel with a single expert); None where the native row kernels do not take it."""
    x2 = x.reshape(-1, x.shape[-1])
    if not _native_rows((gate, up, down), x2.shape[0]) or gate.cols != x2.shape[1]:
        return None
    from offload.kernels.cpu import native

    m = x2.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        y = native.moe_rows(x2, np.array([0, m], np.int64), np.zeros(1, np.int64), gate.blocks, up.blocks,
                            down.blocks, (int(gate.qtype), int(up.qtype), int(down.qtype)))
    return torch.from_numpy(y).reshape(x.shape).to(x.dtype)


def _shared_blocks(mlp, qtypes) -> "tuple | None":
    """A shared MLP's (gate, up, down) 2-D blocks when all three are quantised CPU matrices (one-matrix
    groups, no act_quant) of the experts' ggml types `qtypes`, else None."""
    mats = (getattr(mlp, "gate", None), getattr(mlp, "up", None), getattr(mlp, "down", None))
    if not all(_cpu_projection(m) for m in mats) or tuple(int(m.qtype) for m in mats) != tuple(qtypes):
        return None
    return tuple(m.blocks[0] for m in mats)


class QuantExperts:
    """Expert group over quantised GGUF blocks: `group(x (T, H), ids (T, K), weights (T, K)) -> (T, H)`,
    ids of -1 being pairs computed by another group."""

    def __init__(self, device: torch.device, expert_ids: list[int], gate: QuantMatrix, up: QuantMatrix,
                 down: QuantMatrix):
        self.device = device
        self.local = {e: i for i, e in enumerate(expert_ids)}
        self.gate, self.up, self.down = gate, up, down
        self.fused = None  # the fused CPU MoE kernel over the same blocks (no copy), when it applies
        if device.type == "cpu" and not gate.act_quant:
            try:
                from offload.kernels.cpu.moe import CpuExperts
            except ImportError:  # kernels not available: the per-expert path below
                CpuExperts = None
            if CpuExperts is not None:
                self.fused = CpuExperts(gate.blocks, up.blocks, down.blocks,
                                        (int(gate.qtype), int(up.qtype), int(down.qtype)), list(expert_ids))

    @property
    def nbytes(self) -> int:
        return sum(int(m.blocks.nbytes) for m in (self.gate, self.up, self.down))

    takes_shared = True  # MoE hands it the shared expert: see __call__

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, shared=None) -> torch.Tensor:
        """The routed pairs this group holds; plus `shared(x)` when a shared MLP is given, computed in the
        same native call as the routed experts where its blocks match theirs (a decode step)."""
        if self.fused is not None:
            from offload.kernels.cpu.moe import moe_cpu, takes_shared

            blocks = _shared_blocks(shared, self.fused.qtypes)
            fuse = blocks is not None and takes_shared(self.fused, x.shape[0], blocks)
            with warnings.catch_warnings():  # read-only mmap views: the kernels only read them
                warnings.simplefilter("ignore", UserWarning)
                out = moe_cpu(x.float(), ids, weights.float(), self.fused, blocks if fuse else None).to(x.dtype)
            return out if shared is None or fuse else out + shared(x)
        if shared is not None:
            return self(x, ids, weights) + shared(x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(ids[ids >= 0]).tolist():
            tok, kpos = torch.where(ids == e)
            i = self.local[e]
            xe = x[tok]  # (n, H)
            h = F.silu(self.gate.matmul(xe, i)) * self.up.matmul(xe, i)  # (n, I)
            y = self.down.matmul(h, i)  # (n, H)
            out.index_add_(0, tok, y * weights[tok, kpos, None].float())
        return out.to(x.dtype)
