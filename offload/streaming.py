"""Long prompts on the GPU: a prefill chunk's CPU experts copied over PCIe as the file stores them and run there.

A chunk of T tokens gives each of a layer's E experts about T*k/E tokens. Above the cost model's crossover
(placement.cost.crossover_tokens: n > bytes * F_cpu / (2 * params * B_pcie)) copying an expert's bytes to the GPU
takes less time than computing it on the CPU. `ExpertStream`, attached to a GGUF layer's CPU group at load when
the layer lives on a GPU, holds those experts as stored (Q4_K bytes, not bf16: 3.5x fewer PCIe bytes). For a chunk
above the crossover it copies the experts the chunk uses into a small pool of GPU slots, `slots` experts at a
time, through pinned host buffers, with two pools (double-buffered: batch b+1 is copied on a side stream while
batch b computes), and runs each batch with the resident experts' Triton kernels (kernels.gpu.moe.moe with a slot
map; or, where the layer's GPU experts are float, each expert expanded in its matmul). Within the chunk the split is per expert: those with no more tokens than the crossover run on the CPU
group's worker thread meanwhile. `submit` starts the first copies, so they run beside the shared expert and the
GPU-resident groups; `wait` computes. Below the crossover (and always in decode) the CPU group runs as before.

T tokens, k top-k, E experts of the layer, S slots of a pool, H hidden.
"""

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from offload.placement.cost import STREAM_MIN_TOKENS as MIN_TOKENS  # noqa: F401  (decode never streams)
from offload.placement.cost import crossover, stream_prompt_tokens


@dataclass
class StreamPolicy:
    """When to stream: the hardware figures of the plan (F_cpu FLOP/s, B_pcie bytes/s host to device), or a fixed
    crossover in tokens per expert (`tokens_per_expert`: tests, or a user's override)."""

    cpu_flops: float = 0.0
    pcie_bw: float = 0.0
    tokens_per_expert: float | None = None
    slots: int = 16  # experts per pool (two pools): 2 * 16 Q4_K experts of GLM-5 are ~0.7 GB

    @classmethod
    def from_plan(cls, plan: dict | None) -> "StreamPolicy | None":
        """From a plan's JSON `hardware` (None without one, or without a GPU in it)."""
        hw = (plan or {}).get("hardware") or {}
        if not hw.get("gpus") or not hw.get("pcie_bw") or not hw.get("cpu_tflops"):
            return None
        return cls(cpu_flops=float(hw["cpu_tflops"]) * 1e12, pcie_bw=float(hw["pcie_bw"]))

    @classmethod
    def for_load(cls, plan: dict | None, hardware=None) -> "StreamPolicy | None":
        """What offload.load streams with on a GPU: the plan's figures, or without a plan (an explicit placement)
        this machine's (offload.planning.find_hardware, `hardware` a saved profile); None with
        OFFLOAD_STREAM=0 in the environment."""
        import os

        if os.environ.get("OFFLOAD_STREAM", "1") == "0":
            return None
        if plan is not None and cls.from_plan(plan) is not None:
            return cls.from_plan(plan)
        from offload.planning import find_hardware  # no plan, or one without its hardware (a hand-written JSON)

        hw = find_hardware(hardware=hardware)
        return cls(cpu_flops=hw.cpu_tflops * 1e12, pcie_bw=hw.pcie_bw) if hw.cpu_tflops and hw.pcie_bw else None

    def crossover(self, expert_params: float, expert_bytes: float) -> float:
        """Tokens per expert above which streaming wins (placement.cost.crossover_tokens's formula)."""
        if self.tokens_per_expert is not None:
            return float(self.tokens_per_expert)
        return crossover(expert_params, expert_bytes, self.cpu_flops, self.pcie_bw)


class ExpertStream:
    """A CPU group's experts as stored in the file, streamed to `device` for long chunks.

    parts: three (raw (E, N, row bytes) numpy: the file's mmap of every expert of the layer, read in place, ggml
    type, cols) for gate, up, down; the group holds `expert_ids`; `shared`: the shared MLP the CPU group runs inside
    its own call (None when the layer runs it), run here on the CPU as that group would. `group`: that CPU group;
    within a streamed chunk the experts with no more tokens than the crossover run there, on its worker thread
    beside the GPU's work (without a group every used expert is copied)."""

    def __init__(self, device: torch.device, expert_ids: list[int], n_experts: int, parts: list, policy: StreamPolicy,
                 shared=None, group=None, triton: bool = True):
        self.device = torch.device(device)
        self.ids = list(expert_ids)
        self.n_experts = n_experts
        self.raw = [p[0] for p in parts]
        self.fmts = [(int(p[1]), int(p[2])) for p in parts]
        self.shared = shared
        self.group = group
        self.triton = triton  # the resident experts' Triton kernels, else each expert expanded to float (BlockExperts)
        self.expert_bytes = sum(r.shape[1] * r.shape[2] for r in self.raw)
        self.expert_params = sum(r.shape[1] * c for r, (_, c) in zip(self.raw, self.fmts))
        self.per_expert = policy.crossover(self.expert_params, self.expert_bytes)  # tokens per expert
        self.n_slots = max(1, min(policy.slots, len(self.ids)))
        self.held = np.zeros(n_experts, dtype=bool)
        self.held[self.ids] = True
        self.enabled = True
        self.chunks = 0  # chunks streamed (tests count it), and experts copied
        self.experts_copied = 0
        self.experts_on_cpu = 0  # of streamed chunks, the experts left to the CPU (too few tokens to pay the copy)
        self._packs: dict = {}  # id(pool) -> (its buffers' addresses, Packed views)

    def min_tokens(self, top_k: int) -> int:
        """The chunk length from which this layer streams: the crossover in tokens of prompt (T*k/E > n)."""
        return stream_prompt_tokens(self.per_expert, self.n_experts, top_k)

    def takes(self, ids: torch.Tensor) -> bool:
        """ids (T, k): stream this chunk? Decided from its shape alone (no host read in decode)."""
        return self.enabled and ids.shape[0] >= self.min_tokens(ids.shape[1])

    def packs(self, pool: "Pool") -> list:
        """(gate, up, down) Packed over the pool's first n_slots slots, shaped for this layer's experts."""
        from offload.kernels.gpu.gemm import Packed

        dev = pool.views([r.shape[1:] for r in self.raw], self.n_slots)[0]
        key = tuple(d.data_ptr() for d in dev)
        if self._packs.get(id(pool), (None,))[0] != key:
            self._packs[id(pool)] = (key, [Packed(d, fmt, cols, None, f"stream.{name}") for d, (fmt, cols), name in
                                           zip(dev, self.fmts, ("gate", "up", "down"))])
        return self._packs[id(pool)][1]

    def expanded(self, pool: "Pool", batch: np.ndarray):
        """The float path (the layer's GPU experts are float: no Triton): the batch's experts in the pool as a
        BlockExperts group, each expanded inside its matmul."""
        from offload.models.experts import BlockExperts, ExpertBlocks

        n = len(batch)
        dev = pool.views([r.shape[1:] for r in self.raw], self.n_slots)[0]
        return BlockExperts(self.device, [int(e) for e in batch], *(ExpertBlocks(d[:n], fmt, cols) for d, (fmt, cols)
                                                                   in zip(dev, self.fmts)))

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> "Streaming":
        """x (T, H), ids / weights (T, k) on the layer's device: the experts with more tokens than the crossover
        are copied (the first two batches start now), the others start on the CPU group's worker thread."""
        counts = torch.bincount(ids[ids >= 0], minlength=self.n_experts).cpu().numpy()  # the one host read
        mine = self.held & (counts > 0)
        hot = mine & (counts > self.per_expert) if self.group is not None else mine
        cold = mine & ~hot
        cpu = None
        if cold.any():  # the pairs of the cold experts only: the others are -1, which no group holds
            keep = torch.from_numpy(cold).to(ids.device)[ids.clamp(min=0)] & (ids >= 0)  # (T, k)
            cpu = self.group.submit(x, torch.where(keep, ids, -1), weights, background=True)
        used = np.nonzero(hot)[0]  # in id order
        batches = [used[i:i + self.n_slots] for i in range(0, len(used), self.n_slots)]
        self.chunks += 1
        self.experts_copied += len(used)
        self.experts_on_cpu += int(cold.sum())
        return Streaming(self, x, ids, weights, batches, cpu)

    def copy(self, pool: "Pool", batch: np.ndarray) -> None:
        """Experts `batch` (ids) into the pool's first slots: mmap -> (pinned) host -> device."""
        cuda = self.device.type == "cuda"
        if cuda and pool.copied is not None:
            pool.copied.synchronize()  # the previous copy out of this pool's pinned buffers has finished
        n = len(batch)
        dev, host = pool.views([r.shape[1:] for r in self.raw], self.n_slots)
        idx = torch.from_numpy(batch).long()
        with warnings.catch_warnings():  # read-only mmap views: only read
            warnings.simplefilter("ignore", UserWarning)
            for raw, h in zip(self.raw, host):  # torch's index_select copies with the intra-op threads
                torch.index_select(torch.from_numpy(raw), 0, idx, out=h[:n])
        if not cuda:
            return
        side = pool.side
        with torch.cuda.stream(side):
            if pool.done is not None:
                side.wait_event(pool.done)  # the batch computed from this pool before (any layer's) is done with it
            for d, h in zip(dev, host):
                d[:n].copy_(h[:n], non_blocking=True)
            pool.copied = torch.cuda.Event()
            pool.copied.record(side)


class Pool:
    """Slots for one batch of streamed experts on a device: the bytes of gate, up and down (each a flat buffer,
    viewed as (S, N, row bytes) by the layer using it), their pinned host staging (the device bytes themselves
    off CUDA), and the events that order its reuse. Two per device, shared by every streamed layer there: the
    plan reserves 2 x 16 experts of the largest size (placement.planner.gpu_reserve)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.dev: list[torch.Tensor] = []
        self.host: list[torch.Tensor] = []
        self.copied = self.done = None  # events: the last copy into it landed; the last batch run from it ended
        self.side = torch.cuda.Stream(device) if self.cuda else None  # the copies' stream

    def views(self, shapes: list, n_slots: int) -> tuple[list, list]:
        """(device, host) views (n_slots, N, row bytes) per part, the buffers grown to fit."""
        need = [n_slots * int(np.prod(sh)) for sh in shapes]
        if len(self.dev) != len(need) or any(b.numel() < n for b, n in zip(self.dev, need)):
            if self.cuda:
                torch.cuda.synchronize(self.device)  # nothing in flight reads or writes the old buffers
            size = [max(n, b.numel()) for n, b in zip(need, self.dev)] if len(self.dev) == len(need) else need
            self.dev = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in size]
            self.host = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in size] if self.cuda else self.dev
            self.copied = self.done = None
        dev = [b[:n].view(n_slots, *sh) for b, n, sh in zip(self.dev, need, shapes)]
        host = [b[:n].view(n_slots, *sh) for b, n, sh in zip(self.host, need, shapes)]
        return dev, host


_pools: dict[torch.device, list[Pool]] = {}


def pools_on(device: torch.device) -> list[Pool]:
    """The two pools of `device`."""
    if device not in _pools:
        _pools[device] = [Pool(device), Pool(device)]
    return _pools[device]


class Streaming:
    """The handle of a streamed chunk: `wait` runs batch b as soon as it has landed, starting the copy of b+2."""

    def __init__(self, stream: ExpertStream, x, ids, weights, batches: list, cpu=None):
        self.s, self.x, self.ids, self.weights, self.batches = stream, x, ids, weights, batches
        self.cpu = cpu  # the CPU group's handle for the cold experts (its partial includes its shared expert)
        self.pools = pools_on(stream.device)
        maps = torch.full((len(batches), stream.n_experts), -1, dtype=torch.int32)  # (B, E) expert -> slot
        for b, batch in enumerate(batches):
            maps[b, torch.as_tensor(batch)] = torch.arange(len(batch), dtype=torch.int32)
        self.maps = maps.to(x.device)  # one copy for the chunk (a pageable copy waits for the stream)
        for b in range(min(2, len(batches))):
            stream.copy(self.pools[b], batches[b])

    def wait(self) -> torch.Tensor:
        from offload.kernels.gpu.moe import moe

        s, x = self.s, self.x
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # (T, H)
        wf = self.weights.to(torch.float32)
        cuda = s.device.type == "cuda"
        for b in range(len(self.batches)):
            pool = self.pools[b % 2]
            if cuda:
                torch.cuda.current_stream(s.device).wait_event(pool.copied)
            if s.triton:
                with warnings.catch_warnings():  # (the interpreter's exp overflows to 0 in a very negative gate)
                    warnings.simplefilter("ignore", RuntimeWarning)
                    out += moe(x, self.ids, wf, self.maps[b], *s.packs(pool))  # this batch's experts' share
            else:
                out += s.expanded(pool, self.batches[b]).submit(x, self.ids, wf).wait().float()
            if cuda:
                pool.done = torch.cuda.Event()
                pool.done.record(torch.cuda.current_stream(s.device))
            if b + 2 < len(self.batches):
                s.copy(pool, self.batches[b + 2])
        y = out.to(x.dtype)
        if self.cpu is not None:
            y = y + self.cpu.wait()
        elif s.shared is not None:  # the CPU group ran it in its call: so does this one, on the host
            y = y + s.shared(x.cpu()).to(device=x.device, dtype=x.dtype)
        return y
