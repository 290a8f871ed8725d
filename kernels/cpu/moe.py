"""Fused CPU MoE: out[t] = sum_k w[t,k] * down_e(silu(gate_e x_t) * up_e x_t) over CPU-resident experts.

Letters: T tokens, K top-k, H hidden, I expert FFN width, E experts held here, P (token, expert) pairs.
Pairs are sorted by expert so each expert's weights are read once per call however many tokens chose
it. Experts with few tokens go through the native kernel (csrc/qdot.cpp: activations quantised to 8 bits
once per call as llama.cpp does, AVX-512 VNNI dot products, one fused call for gate, up, silu and down)
or, for types without a SIMD native kernel, the numba grouped row kernel; either splits work over
threads by (expert, row block). Experts with >= gemm_min_tokens tokens are dequantised once to float32
and multiplied with torch.mm (MKL / oneDNN), the prefill path.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from offload.errors import WeightsError
from offload.kernels.cpu import dequant as dq
from offload.kernels.cpu import int4pack as i4
from offload.kernels.cpu import native
from offload.kernels.cpu import quantmm as qm
from offload.kernels.cpu.quantize import QUANTIZERS


@dataclass
class CpuExperts:
    """gate/up (E, I, *) and down (E, H, *) of the experts held on the CPU.

    Quantised: uint8 numpy arrays or CPU tensors (E, N, K_bytes) of ggml blocks (a GGUF stacked expert
    tensor's raw bytes, e.g. a read-only memory map) with their ggml types in `qtypes` (gate, up, down:
    ids, gguf-py enums or names like "q4_k"). Dense: torch tensors (E, N, K) in
    bfloat16 / float32 with `qtypes` None. `ids` are the global expert ids held, in storage order.
    """

    gate: "np.ndarray | torch.Tensor"
    up: "np.ndarray | torch.Tensor"
    down: "np.ndarray | torch.Tensor"
    qtypes: "tuple[int, int, int] | None" = None
    ids: "np.ndarray | None" = None

    def __post_init__(self):
        E = self.gate.shape[0]
        self.ids = np.arange(E, dtype=np.int64) if self.ids is None else np.asarray(self.ids, np.int64)
        if self.qtypes is not None:
            self.qtypes = tuple(qm.qtype_id(q) for q in self.qtypes)
            for name in ("gate", "up", "down"):  # torch uint8 tensors (e.g. from a GGUF reader) share memory
                if isinstance(getattr(self, name), torch.Tensor):
                    setattr(self, name, getattr(self, name).numpy())
            for name, t in (("gate", self.gate), ("up", self.up), ("down", self.down)):
                if not isinstance(t, np.ndarray) or t.dtype != np.uint8 or t.ndim != 3:
                    raise WeightsError(f"CpuExperts.{name}: quantised experts must be uint8 (E, N, K_bytes)")
            self.hidden = qm.row_elems(self.gate.shape[2], self.qtypes[0])
            self.inter = self.gate.shape[1]
            k_down = qm.row_elems(self.down.shape[2], self.qtypes[2])
            k_up = qm.row_elems(self.up.shape[2], self.qtypes[1])
        else:
            self.hidden, self.inter = self.gate.shape[2], self.gate.shape[1]
            k_down, k_up = self.down.shape[2], self.up.shape[2]
        shapes_ok = (self.up.shape[:2] == self.gate.shape[:2] and k_up == self.hidden
                     and tuple(self.down.shape[:2]) == (E, self.hidden) and k_down == self.inter
                     and len(self.ids) == E and len(set(self.ids.tolist())) == E and (self.ids >= 0).all())
        if not shapes_ok:
            raise WeightsError(f"CpuExperts: gate {tuple(self.gate.shape)}, up {tuple(self.up.shape)}, down "
                               f"{tuple(self.down.shape)}, {len(self.ids)} ids do not form E experts of "
                               f"(I, H), (I, H), (H, I) with unique ids")
        self._local = torch.full((int(self.ids.max()) + 2,), -1, dtype=torch.int64)
        self._local[torch.from_numpy(self.ids)] = torch.arange(E)
        self.packed: dict[str, list] = {}  # which -> per-expert (packed, scales_zeros), see repack_int4pack

    def repack_int4pack(self) -> list[str]:
        """Repack the Q4_K / Q4_0 matrices into torch's int4 layout for the small-batch path.

        One expert at a time (no full temporary). The GGUF blocks stay referenced for the batch path:
        when they are a read-only memory map of the file they are evictable page cache, not a second
        resident copy. The packed form costs 0.75 bytes per weight (float32 scale + zero per 32).
        Returns the matrices repacked.
        """
        if not self.quantised:
            return []
        for which, qt in zip(("gate", "up", "down"), self.qtypes):
            t = getattr(self, which)
            if which not in self.packed and i4.can_repack(qt, t.shape[1]):
                self.packed[which] = [i4.repack(t[e], qt) for e in range(t.shape[0])]
        return list(self.packed)

    @classmethod
    def from_dense(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, quant: "str | None" = None,
                   ids=None) -> "CpuExperts":
        """From HF experts gate (E, I, H), up (E, I, H), down (E, H, I); quant "q4_k" / "q8_0" / None.

        None keeps bf16 / fp32 tensors as they are. Quantising costs accuracy: relative RMS weight error
        ~8 % for q4_k (needs H and I multiples of 256), ~0.55 % for q8_0 (multiples of 32); measured on
        a whole expert FFN output ~15 % and ~1 % (tests/kernels/cpu/test_moe.py). FP8 checkpoints:
        apply their block scales first (bf16, one expert at a time) and pass the result here.
        """
        if quant is None:
            return cls(gate, up, down, None, ids)
        if quant not in QUANTIZERS:
            raise WeightsError(f"expert_quant must be one of {sorted(QUANTIZERS)} or None, got {quant!r}")
        qt, fn = QUANTIZERS[quant]
        # one expert at a time: never a float32 copy of the whole stack next to the bf16 one
        packed = [np.stack([fn(t[e].float().numpy()) for e in range(t.shape[0])]) for t in (gate, up, down)]
        return cls(*packed, (qt, qt, qt), ids)

    @property
    def quantised(self) -> bool:
        return self.qtypes is not None

    def local_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Local storage index of global expert ids; -1 where this object does not hold the expert."""
        ids = ids.clamp(-1, len(self._local) - 1)  # unknown big ids -> the sentinel slot (-1)
        return self._local[ids]

    def dense(self, which: str, e: int) -> torch.Tensor:
        """One expert matrix as float32 (N, K)."""
        t = getattr(self, which)
        if not self.quantised:
            return t[e].float()
        return qm.dequantize(t[e], self.qtypes[("gate", "up", "down").index(which)])


def _pairs(expert_ids, expert_weights, experts: CpuExperts):
    T, K = expert_ids.shape
    if expert_weights.shape != expert_ids.shape:
        raise WeightsError(f"expert_weights {tuple(expert_weights.shape)} != expert_ids {tuple(expert_ids.shape)}")
    tok = torch.arange(T).repeat_interleave(K)  # (T*K,)
    loc = experts.local_index(expert_ids.reshape(-1).long())
    keep = loc >= 0
    tok, loc, w = tok[keep], loc[keep], expert_weights.reshape(-1).float()[keep]
    order = torch.argsort(loc, stable=True)
    return tok[order], loc[order], w[order]


def _ffn_rows(x: np.ndarray, ex: CpuExperts, starts: np.ndarray, eids: np.ndarray) -> np.ndarray:
    """x (P, H) rows grouped by expert -> (P, H) expert FFN outputs: the native kernel (8-bit
    activations, as llama.cpp) where every type has one, else the numba row kernels (float activations)."""
    if native.fast(*ex.qtypes):
        return native.moe_rows(x, starts, eids, ex.gate, ex.up, ex.down, ex.qtypes)
    h = qm.grouped_gate_up(x, ex.gate, ex.qtypes[0], ex.up, ex.qtypes[1], starts, eids)  # (P, I)
    return qm.grouped_gemv(h, ex.down, ex.qtypes[2], starts, eids)  # (P, H)


def _ffn_packed(xs: torch.Tensor, y: torch.Tensor, ex: CpuExperts, groups: list) -> None:
    """Small groups with int4pack-repacked matrices: torch's int4 kernel per expert and matrix; the
    matrices that could not be repacked (e.g. a Q6_K down) go through the numba grouped kernel."""
    P_rows = [torch.arange(a, b) for _, a, b in groups]
    h = torch.empty(xs.shape[0], ex.inter)  # (P, I), only the small groups' rows are filled

    def one(which, e, x):
        if which in ex.packed:
            return i4.mm(x, *ex.packed[which][e])
        qt = ex.qtypes[("gate", "up", "down").index(which)]
        return qm.gemv(x, getattr(ex, which)[e], qt)

    for e, a, b in groups:
        x = xs[a:b]
        h[a:b] = F.silu(one("gate", e, x)) * one("up", e, x)
    if "down" in ex.packed:
        for e, a, b in groups:
            y[a:b] = i4.mm(h[a:b], *ex.packed["down"][e])
        return
    rows = torch.cat(P_rows)
    st = np.zeros(len(groups) + 1, np.int64)
    st[1:] = np.cumsum([b - a for _, a, b in groups])
    eids = np.array([e for e, _, _ in groups], np.int64)
    y[rows] = torch.from_numpy(qm.grouped_gemv(h[rows].contiguous().numpy(), ex.down, ex.qtypes[2], st, eids))


def _ffn_dense(x: torch.Tensor, ex: CpuExperts, e: int) -> torch.Tensor:
    """x (n, H) through one expert with torch matmuls (dequantised once for quantised experts)."""
    if not ex.quantised:
        dt = ex.gate.dtype
        xd = x.to(dt)
        h = F.silu(xd @ ex.gate[e].T) * (xd @ ex.up[e].T)  # (n, I)
        return (h @ ex.down[e].T).float()  # (n, H)
    if native.fast(*ex.qtypes):  # the row path rounds activations to 8 bits: same numbers here
        x = _round(x, ex.qtypes[0])
    h = F.silu(x @ ex.dense("gate", e).T) * (x @ ex.dense("up", e).T)
    if native.fast(*ex.qtypes):
        h = _round(h, ex.qtypes[2])
    return h @ ex.dense("down", e).T


def _round(x: torch.Tensor, qtype: int) -> torch.Tensor:
    """x rounded as ggml quantises activations for a dot product with a `qtype` weight."""
    from offload.gguf.numerics import round_activations
    from offload.gguf.types import GGMLType

    return round_activations(x, GGMLType(native.base_type(qtype)))


def one_native_call(experts: CpuExperts, T: int) -> bool:
    """T tokens can reach no expert's batch path: the whole layer is one native call (`native.moe_topk`)."""
    return (experts.quantised and not experts.packed and native.fast(*experts.qtypes)
            and T < qm.NATIVE_GEMM_MIN_TOKENS)


def shares_call(experts: CpuExperts, shared: tuple, qtypes: tuple) -> bool:
    """True when a shared expert's (gate, up, down) 2-D blocks of ggml types `qtypes` can run in the routed
    experts' native call (moe_cpu's `shared`): the experts' types and per-expert shapes, native kernels."""
    return (experts.quantised and native.fast(*experts.qtypes) and tuple(int(q) for q in qtypes) == experts.qtypes
            and [tuple(m.shape) for m in shared] == [experts.gate.shape[1:], experts.up.shape[1:],
                                                     experts.down.shape[1:]])


def takes_shared(experts: CpuExperts, T: int, shared) -> bool:
    """True when moe_cpu runs this shared expert (gate, up, down ggml blocks, 2-D) in the same native call as
    T tokens' routed experts: that call's path, and the routed experts' shapes."""
    return one_native_call(experts, T) and [tuple(m.shape) for m in shared] == [
        experts.gate.shape[1:], experts.up.shape[1:], experts.down.shape[1:]]


def moe_cpu(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
            experts: CpuExperts, shared: tuple | None = None) -> torch.Tensor:
    """x (T, H) float32, expert_ids / expert_weights (T, K) -> (T, H) float32 over the experts held here.

    Pairs whose expert id this `experts` does not hold contribute nothing (the GPU handles them).
    Inputs on another device are copied to the CPU; the result is a CPU tensor. `shared`: a shared
    expert's (gate, up, down) blocks that `takes_shared` accepts, added to every token in the same call.
    """
    x = x.detach().to("cpu", torch.float32)
    expert_ids, expert_weights = expert_ids.cpu(), expert_weights.cpu()
    T, H = x.shape
    if H != experts.hidden:
        raise WeightsError(f"moe_cpu: hidden states of width {H}, experts expect {experts.hidden}")
    if shared is not None and not takes_shared(experts, T, shared):
        raise WeightsError("moe_cpu: this shared expert cannot run in the routed experts' call (takes_shared)")
    if one_native_call(experts, T) and expert_weights.shape == expert_ids.shape:
        # no expert can reach the batch path: the row kernels only, grouping and sum in one native call
        loc = experts.local_index(expert_ids.long())  # (T, K)
        return torch.from_numpy(native.moe_topk(x.numpy(), loc.numpy(), expert_weights.float().numpy(),
                                                experts.gate, experts.up, experts.down, experts.qtypes, shared))
    out = torch.zeros(T, H, dtype=torch.float32)
    tok, loc, w = _pairs(expert_ids, expert_weights, experts)
    if tok.numel() == 0:
        return out
    xs = x[tok].contiguous()  # (P, H) rows grouped by expert
    uniq, counts = torch.unique_consecutive(loc, return_counts=True)
    starts = torch.zeros(len(uniq) + 1, dtype=torch.int64)
    starts[1:] = counts.cumsum(0)
    y = torch.empty_like(xs)  # (P, H)
    fast = experts.quantised and (native.fast(*experts.qtypes) or all(q in dq.FAST_TYPES for q in experts.qtypes))
    small = counts < qm.gemm_min_tokens(*experts.qtypes) if fast else torch.zeros(len(uniq), dtype=torch.bool)
    if small.any() and experts.packed:
        _ffn_packed(xs, y, experts, [(int(uniq[i]), int(starts[i]), int(starts[i + 1]))
                                     for i in torch.nonzero(small)[:, 0].tolist()])
    elif small.any():
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in torch.nonzero(small)[:, 0].tolist()])
        sc = counts[small]
        s_starts = np.zeros(len(sc) + 1, np.int64)
        s_starts[1:] = sc.cumsum(0).numpy()
        y[rows] = torch.from_numpy(_ffn_rows(xs[rows].contiguous().numpy(), experts, s_starts,
                                             uniq[small].numpy().astype(np.int64)))
    for i in torch.nonzero(~small)[:, 0].tolist():
        a, b = int(starts[i]), int(starts[i + 1])
        y[a:b] = _ffn_dense(xs[a:b], experts, int(uniq[i]))
    out.index_add_(0, tok, y * w[:, None])
    return out


def moe_cpu_ref(x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor,
                experts: CpuExperts, act_quant: bool = False) -> torch.Tensor:
    """Plain reference: a loop over (token, expert) pairs in float32, weights dequantised by gguf-py;
    act_quant rounds each matmul's input as ggml does (offload.gguf.numerics), which is what moe_cpu
    computes where `native.fast(*experts.qtypes)`."""
    from offload.gguf._ggufpy import gguf_py

    cache: dict = {}

    def W(which: str, e: int) -> torch.Tensor:
        if (which, e) not in cache:
            t = getattr(experts, which)[e]
            if experts.quantised:
                g = gguf_py()
                t, qt = qm.plain_blocks(t, experts.qtypes[("gate", "up", "down").index(which)])
                cache[which, e] = torch.from_numpy(np.asarray(g.quants.dequantize(t, g.GGMLQuantizationType(qt)),
                                                              np.float32))
            else:
                cache[which, e] = t.float()
        return cache[which, e]

    out = torch.zeros(x.shape, dtype=torch.float32)
    held = {int(g): i for i, g in enumerate(experts.ids)}
    for t in range(x.shape[0]):
        for k in range(expert_ids.shape[1]):
            e = held.get(int(expert_ids[t, k]))
            if e is None:
                continue
            xt = x[t].float()
            if act_quant:
                xt = _round(xt, experts.qtypes[0])
            h = F.silu(W("gate", e) @ xt) * (W("up", e) @ xt)
            if act_quant:
                h = _round(h, experts.qtypes[2])
            out[t] += float(expert_weights[t, k]) * (W("down", e) @ h)
    return out
