"""Routed-expert groups: the experts of one MoE layer that share a home, behind one protocol for every home.

    handle = group.submit(x, ids, weights)  # x (T, H), ids / weights (T, K) on the caller's device
    partial = handle.wait()                 # (T, H) on the caller's device, in x's dtype

A group computes the (token, expert) pairs whose expert it holds (`group.ids`); pairs of experts held
elsewhere contribute nothing, so every group of a layer takes the router's ids as they are. A group may
compute at submit (`Ready`) or in the background (`Pending`), so the caller can work meanwhile.

Every group also says, as class attributes, how the runtime treats it: `runs_in_background` (a host group the
runtime hands off when its layer lives elsewhere: staged, on the worker thread) and `stream` (None, or the
offload.streaming.ExpertStream that copies a long chunk's experts to the GPU). Groups whose decode path can run
without host reads carry `sync_free` (offload.graphs records a step only over such groups).

Kinds: TorchExperts (float tensors on a device), BlockExperts (ggml blocks on a device, expanded per
matmul) here; offload.kernels.cpu.experts.CpuExpertGroup (the fused CPU kernel);
offload.kernels.gpu.weights.TritonExperts (ggml blocks on the Triton kernels).

T tokens, K top-k, H hidden, I expert intermediate, n tokens routed to one expert.
"""

import warnings
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from offload.gguf.types import GGMLType

_FLOAT = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


class Ready:
    """The handle of a partial computed at submit."""

    __slots__ = ("out",)

    def __init__(self, out: torch.Tensor):
        self.out = out

    def wait(self) -> torch.Tensor:
        return self.out


class Pending:
    """The handle of a partial computed on a worker thread, moved to the caller's device on wait."""

    __slots__ = ("device", "future")

    def __init__(self, future: Future, device: torch.device):
        self.future, self.device = future, device

    def wait(self) -> torch.Tensor:
        # from the runtime's pinned staging buffer the copy to a GPU is asynchronous (offload.staging)
        return self.future.result().to(self.device, non_blocking=True)


# With `sync_free`, a batch of at most this many (token, expert) pairs (decode, small batches) runs without host
# reads: every pair computed with its expert's weights gathered by slot, pairs of experts held elsewhere weighted
# 0. Otherwise, and above it, the pairs are grouped by expert (a host read of which experts were picked).
STATIC_PAIRS = 64


def pair_slots(ids: torch.Tensor, held: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (T, K), held (E_g,) expert ids of a group -> slot (P,) of each pair's expert in `held` (0 where it is
    not held) and mine (P,) bool; P = T * K, pair p = (p // K, p % K). Static shapes, no host read."""
    hit = ids.reshape(-1, 1) == held.view(1, -1)  # (P, E_g)
    return hit.to(torch.int32).argmax(dim=1), hit.any(dim=1)


def _sum_pairs(y: torch.Tensor, weights: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """y (P, H) float32 pair outputs -> (T, H): weighted, pairs held elsewhere 0, summed over k in order."""
    t, k = weights.shape
    w = weights.reshape(-1).float() * mine  # (P,)
    return (y * w[:, None]).view(t, k, -1).sum(dim=1)


class TorchExperts:
    """Experts held as float tensors on one device (a GPU, or the CPU for unquantised experts)."""

    runs_in_background = False
    stream = None

    def __init__(self, device: torch.device, experts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.device = device
        self.experts = experts  # expert id -> (gate (I, H), up (I, H), down (H, I))
        self.ids = sorted(experts)
        # small batches without host reads (None: off the CPU): off by default, since gathering float matrices by
        # slot moves 3x the bytes of reading the picked experts in place (kernels/gpu's grouped GEMV does
        # neither); tests turn it on
        self.sync_free: bool | None = False
        self._stacked = None

    def stacked(self) -> tuple:
        """(held ids (E_g,), gate (E_g, I, H), up (E_g, I, H), down (E_g, H, I)), made once; the dict's
        matrices become views of them (one copy in memory)."""
        if self._stacked is None:
            mats = tuple(torch.stack([self.experts[e][j] for e in self.ids]) for j in range(3))
            self.experts = {e: tuple(m[i] for m in mats) for i, e in enumerate(self.ids)}
            self._stacked = (torch.tensor(self.ids, device=self.device), *mats)
        return self._stacked

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Ready:
        xd, ids, weights = x.to(self.device), ids.to(self.device), weights.to(self.device)
        if _static(self, ids) and self.ids:
            held, gate, up, down = self.stacked()
            slot, mine = pair_slots(ids, held)  # (P,), (P,)
            xp = xd.repeat_interleave(ids.shape[1], dim=0).unsqueeze(-1)  # (P, H, 1)
            h = F.silu(torch.bmm(gate[slot], xp)) * torch.bmm(up[slot], xp)  # (P, I, 1)
            y = torch.bmm(down[slot], h).squeeze(-1).float()  # (P, H)
            return Ready(_sum_pairs(y, weights, mine).to(device=x.device, dtype=x.dtype))
        out = torch.zeros_like(xd)
        for e in torch.unique(ids[ids >= 0]).tolist():
            if e not in self.experts:
                continue
            tok, kpos = torch.where(ids == e)
            gate, up, down = self.experts[e]
            xe = xd[tok]  # (n, H)
            h = F.linear(F.silu(F.linear(xe, gate)) * F.linear(xe, up), down)  # (n, H)
            out.index_add_(0, tok, (h * weights[tok, kpos, None]).to(out.dtype))
        return Ready(out.to(x.device))


@dataclass
class ExpertBlocks:
    """One weight kind (gate, up or down) of a group's experts as ggml blocks (E_group, N, row bytes)."""

    blocks: "np.ndarray | torch.Tensor"  # numpy uint8 on the CPU (an mmap view), torch uint8 on a GPU
    qtype: int  # ggml type id
    cols: int  # K, elements per row
    act_quant: bool = False  # round inputs like llama.cpp (offload.gguf.numerics)

    def weight(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert i's matrix (N, K) as `dtype` (float types are a view, block types are expanded)."""
        from offload.gguf.dequant_torch import dequantize_torch

        b = self.blocks[i]
        if isinstance(b, np.ndarray):
            b = torch.from_numpy(b)
        if self.qtype in _FLOAT:
            return b.view(_FLOAT[self.qtype]).view(b.shape[0], self.cols).to(dtype)
        return dequantize_torch(b, self.qtype, (b.shape[0], self.cols), dtype=torch.float32).to(dtype)

    def pairs_matmul(self, x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """x (P, K), slot (P,) -> (P, N) float32: row p times the matrix of expert slot[p] (each gathered
        and expanded: static shapes, no host read)."""
        b = self.blocks
        if isinstance(b, np.ndarray):
            with warnings.catch_warnings():  # a read-only mmap: only read
                warnings.simplefilter("ignore", UserWarning)
                b = torch.from_numpy(b)
        b = b[slot.to(b.device)]  # (P, N, row bytes)
        p, n = b.shape[0], b.shape[1]
        if self.qtype in _FLOAT:
            w = b.view(_FLOAT[self.qtype]).view(p, n, self.cols).float()
        else:
            from offload.gguf.dequant_torch import dequantize_torch

            w = dequantize_torch(b, self.qtype, (p, n, self.cols), dtype=torch.float32)  # (P, N, K)
        return torch.bmm(w, x.float().unsqueeze(-1)).squeeze(-1)

    def matmul(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """x (n, K) @ W_i.T -> (n, N) float32."""
        if self.act_quant:
            from offload.gguf.numerics import round_activations

            x = round_activations(x, GGMLType(self.qtype))
        if isinstance(self.blocks, np.ndarray) and self.qtype not in _FLOAT:
            from offload.kernels.cpu.quantmm import qmatmul

            return qmatmul(x.float().contiguous(), self.blocks[i], self.qtype)
        return F.linear(x.float(), self.weight(i, torch.float32))


class BlockExperts:
    """Experts kept as ggml blocks on a device, each expert's matrices expanded inside its matmul: GGUF experts
    on a GPU (copied over once at load), and on the CPU the emulation of llama.cpp's numerics (act_quant)."""

    runs_in_background = False
    stream = None

    def __init__(self, device: torch.device, expert_ids: list[int], gate: ExpertBlocks, up: ExpertBlocks,
                 down: ExpertBlocks):
        self.device = device
        self.ids = list(expert_ids)
        self.local = {e: i for i, e in enumerate(expert_ids)}
        self.gate, self.up, self.down = gate, up, down
        # small batches without host reads: off by default, since the pair path expands every pair's expert,
        # those held elsewhere too (weighted 0): with few of a layer's experts here that is several times the
        # work (kernels/gpu's grouped GEMV skips them); tests turn it on
        self.sync_free: bool | None = False
        self._held = torch.tensor(self.ids, dtype=torch.long, device=device)

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> Ready:
        xd, ids, weights = x.to(self.device), ids.to(self.device), weights.to(self.device)
        if _static(self, ids) and self.ids and not self.gate.act_quant:
            slot, mine = pair_slots(ids, self._held)  # (P,), (P,)
            xp = xd.repeat_interleave(ids.shape[1], dim=0)  # (P, H)
            h = F.silu(self.gate.pairs_matmul(xp, slot)) * self.up.pairs_matmul(xp, slot)  # (P, I)
            y = self.down.pairs_matmul(h, slot)  # (P, H)
            return Ready(_sum_pairs(y, weights, mine).to(device=x.device, dtype=x.dtype))
        out = torch.zeros(xd.shape, dtype=torch.float32, device=self.device)
        for e in torch.unique(ids[ids >= 0]).tolist():
            i = self.local.get(e)
            if i is None:
                continue
            tok, kpos = torch.where(ids == e)
            xe = xd[tok]  # (n, H)
            h = F.silu(self.gate.matmul(xe, i)) * self.up.matmul(xe, i)  # (n, I)
            y = self.down.matmul(h, i)  # (n, H)
            out.index_add_(0, tok, y * weights[tok, kpos, None].float())
        return Ready(out.to(device=x.device, dtype=x.dtype))


def _static(group, ids: torch.Tensor) -> bool:
    on = group.sync_free if group.sync_free is not None else group.device.type != "cpu"
    return on and ids.numel() <= STATIC_PAIRS


def expert_blocks(raw: np.ndarray, qtype: int, cols: int, expert_ids: list[int], device: torch.device,
                  act_quant: bool) -> ExpertBlocks:
    """The experts `expert_ids` of a stacked file tensor raw (E, N, row bytes): a zero-copy view when they are
    all of them on the CPU, else a copy (still quantised), moved to `device`."""
    ids = list(expert_ids)
    if ids != list(range(raw.shape[0])):
        raw = raw[np.asarray(ids, dtype=np.int64)]
    if device.type != "cpu":
        raw = torch.from_numpy(np.ascontiguousarray(raw)).to(device)
    return ExpertBlocks(raw, int(qtype), cols, act_quant)
