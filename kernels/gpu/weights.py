"""Weights kept in their storage format on a GPU, multiplied by the Triton kernels: `TritonQuantWeight`, a matrix
with the `w(x)` / `w.rows(ids)` interface of offload.models.weights (attention, shared experts, dense layers,
head, embeddings of a GGUF; BF16 / FP8-block matrices of HF checkpoints), and `TritonExperts`, the routed
experts of one layer on a GPU behind the expert-group protocol of offload.models.experts (one grouped launch for
all pairs instead of a loop over experts that expands each one).

M rows, K inputs, N outputs; T tokens, k top-k, H hidden.
"""

import warnings

import numpy as np
import torch

from offload.kernels.gpu.formats import check_format
from offload.kernels.gpu.gemm import Packed, dequant, qmatmul
from offload.kernels.gpu.moe import moe


def takes(qtype: int, cols: int) -> bool:
    """True when the Triton kernels multiply this format at this width."""
    try:
        check_format(int(qtype), cols)
    except ValueError:
        return False
    return True


def _to_device(raw, device) -> torch.Tensor:
    """A contiguous copy on `device` (a file's read-only mmap is only read, never kept)."""
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # read-only mmap view: copied below, never written
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(raw))
        return t.clone() if torch.device(device).type == "cpu" else t.to(device)
    return raw.to(device).contiguous()


class TritonQuantWeight:
    """A matrix (N, K) as its storage bytes (N, row bytes) on a device."""

    def __init__(self, blocks: torch.Tensor, qtype: int, cols: int, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16, scales: torch.Tensor | None = None, name: str = "weight"):
        self.packed = Packed(blocks, qtype, cols, scales, name)
        self.qtype, self.cols, self.name = int(qtype), cols, name
        self.bias = bias  # (N,)
        self.dtype = dtype  # of embedding rows (matmul outputs take the input's dtype)
        self.device = blocks.device

    @classmethod
    def from_file(cls, raw, qtype: int, cols: int, device, bias=None, dtype=torch.bfloat16, scales=None,
                  name: str = "weight") -> "TritonQuantWeight":
        """Over a file's blocks (N, row bytes) (numpy, e.g. an mmap view), copied to `device` as they are."""
        return cls(_to_device(raw, device), qtype, cols, bias, dtype,
                   None if scales is None else scales.to(device, torch.float32), name)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.packed.blocks.numel() + (self.packed.aux.numel() * 4 if self.packed.aux_mat else 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """As F.linear(x (..., K), W, bias) -> (..., N) in x's dtype."""
        x2 = x.reshape(-1, self.cols)  # (M, K)
        y = qmatmul(x2, self.packed)  # (M, N) float32
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (T,) as (T, K): an embedding lookup that expands only the rows asked for."""
        n = self.packed.rows
        if ids.device.type == "cpu":
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
                raise IndexError(f"{self.name}: token id out of range [0, {n})")
        else:  # no host sync inside a GPU step: ids were checked where they entered, kept in bounds here
            ids = ids.clamp(0, n - 1)
        return dequant(self.packed, ids.reshape(-1)).reshape(*ids.shape, self.cols).to(self.dtype)


class TritonExperts:
    """Routed experts held on one device in their storage format: gate / up (S, I, H-row bytes) and down
    (S, H, I-row bytes) for the experts `expert_ids`, slot i holding expert_ids[i]."""

    runs_in_background = False  # its kernels run on the caller's stream
    stream = None
    sync_free = True  # decode-sized batches (< moe.GEMM_MIN_TOKENS tokens) run moe_gemv: no host read

    def __init__(self, device: torch.device, expert_ids: list[int], n_experts: int, gate: Packed, up: Packed,
                 down: Packed):
        self.device = device
        self.ids = list(expert_ids)
        slots = torch.full((n_experts,), -1, dtype=torch.int32)
        slots[torch.tensor(self.ids, dtype=torch.long)] = torch.arange(len(self.ids), dtype=torch.int32)
        self.slots = slots.to(device)  # (E,) expert id -> slot, -1 where held elsewhere
        self.gate, self.up, self.down = gate, up, down

    @classmethod
    def from_blocks(cls, device, expert_ids: list[int], n_experts: int, gate, up, down, name: str = "experts"):
        """From three (blocks (S, N, row bytes), qtype, cols) of this group's experts, numpy or torch."""
        packs = [Packed(_to_device(b, device), qt, cols, None, f"{name}.{part}")
                 for part, (b, qt, cols) in zip(("gate", "up", "down"), (gate, up, down))]
        return cls(torch.device(device), expert_ids, n_experts, *packs)

    @property
    def nbytes(self) -> int:
        return sum(p.blocks.numel() for p in (self.gate, self.up, self.down))

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        """x (T, H), ids / weights (T, k) -> a Ready handle of the partial (T, H) in x's dtype."""
        from offload.models.experts import Ready

        xd = x.to(self.device)
        y = moe(xd, ids.to(self.device), weights.to(self.device, torch.float32), self.slots, self.gate, self.up,
                self.down)  # (T, H) float32
        return Ready(y.to(device=x.device, dtype=x.dtype))
