"""The MoE layer's CPU expert group (offload.models.experts protocol) on the fused kernel `moe_cpu`: a GGUF
file's expert blocks (zero-copy, or interleaved once at load), HF experts quantised at load
(`offload.load(..., expert_quant="q4_k")`), or float experts.

A caller on another device (a GPU) gets a handle at once: the experts run on a worker thread while it works,
the native call releasing the GIL (the runtime decides: `offload.load(..., overlap=...)`, inputs staged in its
pinned buffers, offload.staging). A caller on the CPU has nothing to overlap with (the native pool has the
cores), so the group computes at submit there.

T tokens, K top-k, H hidden, I expert intermediate, E experts of the group.
"""

import warnings
import numpy as np
import torch

from offload.gguf.types import CPU_COMPUTE_TYPE, GGMLType
from offload.kernels.cpu import native
from offload.kernels.cpu.moe import CpuExperts, moe_cpu, one_native_call, shares_call
from offload.kernels.cpu.weights import QuantMLP, as_native

from offload.models.experts import Pending, Ready
from offload.staging import worker


class CpuExpertGroup:
    """Routed experts on the CPU. `shared`, decided when the group is built (`takes_shared`): a shared expert
    whose blocks match the experts' and so runs inside their native call; the group's partial then includes it."""

    device = torch.device("cpu")
    runs_in_background = True  # the runtime hands it off (offload.runtime: staged, on the worker with overlap)
    stream = None  # a GPU layer's group of a GGUF: set at load (offload.streaming)

    def __init__(self, experts: CpuExperts, shared: QuantMLP | None = None, background: bool | None = None):
        self.experts = experts
        self.ids = experts.ids.tolist()
        self.shared = shared
        self._shared_blocks = None if shared is None else tuple(w.blocks for w in (shared.gate, shared.up, shared.down))
        self.background = background  # None: on the worker thread when the caller is on another device

    @staticmethod
    def takes_shared(experts: CpuExperts, shared) -> bool:
        """True when this shared MLP can run in the experts' native call: quantised CPU blocks of their types
        and shapes."""
        return isinstance(shared, QuantMLP) and shares_call(experts, tuple(w.blocks for w in (
            shared.gate, shared.up, shared.down)), shared.qtypes)

    @property
    def nbytes(self) -> int:
        held = len(self.ids) / len(self.experts.ids)  # a paged split layer's view spans the others' experts too
        return int(sum(int(m.nbytes) for m in (self.experts.gate, self.experts.up, self.experts.down)) * held)

    def submit(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, background: bool | None = None):
        """background (else this group's own `background`; None: when x is not on the CPU): on the worker thread
        (the runtime's hand-off stages the inputs itself and calls this with background=False on the host
        copies). Otherwise computed now, on the host."""
        bg = self.background if background is None else background
        if bg or (bg is None and x.device.type != "cpu"):
            args = x.to("cpu"), ids.to("cpu"), weights.to("cpu")  # (T, H), (T, K), (T, K)
            return Pending(worker().submit(self._run_inference, *args), x.device)
        if x.device.type != "cpu":  # serial (overlap off), as llama.cpp: to the host and back
            return Ready(self._run(x.cpu(), ids.cpu(), weights.cpu()).to(x.device))
        return Ready(self._run(x, ids, weights))

    def _run_inference(self, x, ids, weights) -> torch.Tensor:
        with torch.inference_mode():  # grad mode is per thread
            return self._run(x, ids, weights)

    def _run(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        fuse = self.shared is not None and one_native_call(self.experts, x.shape[0])
        with warnings.catch_warnings():  # read-only mmap views: the kernels only read them
            warnings.simplefilter("ignore", UserWarning)
            out = moe_cpu(x.float(), ids, weights.float(), self.experts, self._shared_blocks if fuse else None)
        out = out.to(x.dtype)  # (T, H)
        return out if self.shared is None or fuse else out + self.shared(x)


def from_file_blocks(gate: np.ndarray, up: np.ndarray, down: np.ndarray, qtypes: tuple, expert_ids: list[int],
                     shared=None, views: bool = False) -> CpuExpertGroup:
    """A group over a file's stacked expert tensors (E, N, row bytes) of ggml `qtypes`: zero-copy views of the
    mmap when it holds every expert of the layer; block types the native kernels read faster interleaved are
    copied once into that layout (lossless, the same size); float32 experts as float views of the same bytes
    (each matmul reads the mmap directly). `shared` is taken where `takes_shared` allows.

    views=True (a model paged from disk, LoadContext.paged): no interleaved copy, the kernels read the
    file's own layout, so the experts stay evictable file pages instead of anonymous RAM; a home holding some of
    the layer's experts (a split with a GPU) keeps the whole file tensor and masks the others, instead of
    gathering its own. A type computed only after a rewrite (as_native: IQ4_NL) is still a copy (the load warns,
    gguf/load.unpageable_experts)."""
    ids = list(expert_ids)
    every = list(range(gate.shape[0]))
    masked = views and ids != every and not any(int(q) in CPU_COMPUTE_TYPE for q in qtypes)
    mats, qts = [], []
    for raw, qt in zip((gate, up, down), qtypes):
        qt = int(qt)
        if ids != every and not masked:
            raw = raw[np.asarray(ids, dtype=np.int64)]  # this home's experts only (a copy, still quantised)
        raw, qt = as_native(raw, qt)
        if not views and native.repacks(qt, raw.shape[1]):
            raw, qt = native.repack(raw, qt)
        mats.append(raw)
        qts.append(qt)
    held = every if masked else ids  # the storage order of `mats`
    if all(qt == GGMLType.F32 for qt in qts):
        with warnings.catch_warnings():  # read-only mmap: the kernel only reads it
            warnings.simplefilter("ignore", UserWarning)
            experts = CpuExperts(*(torch.from_numpy(m).view(torch.float32) for m in mats), None, held)
    else:
        experts = CpuExperts(*mats, tuple(qts), held)
    group = CpuExpertGroup(experts, shared if CpuExpertGroup.takes_shared(experts, shared) else None)
    if masked:  # pairs of the experts held elsewhere map to no local expert: the kernels skip them
        others = torch.tensor(sorted(set(every) - set(ids)), dtype=torch.int64)
        experts._local[others] = -1
        group.ids = ids
    return group


def cpu_experts_factory(quant: str):
    """-> make(weights {expert id: (gate (I, H), up (I, H), down (H, I))}, device) for LoadContext."""

    def make(weights: dict, device) -> CpuExpertGroup:
        ids = sorted(weights)
        gate, up, down = (torch.stack([weights[e][j].cpu() for e in ids]) for j in range(3))  # (E, ., .)
        return CpuExpertGroup(CpuExperts.from_dense(gate, up, down, quant=quant, ids=ids))

    return make
