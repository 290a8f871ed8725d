"""The tensor groups of a model under a quant scheme: what the planner places, one layer at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import model as M
from .held import cpu_group_bytes, gpu_group_bytes
from .model import ModelSpec
from .profile import RoutingProfile
from .quant import QuantScheme


@dataclass
class Group:
    tensor: str  # attn / indexer / norms / ffn / router / shared_experts / kv_cache / embeddings / lm_head
    cls: str  # report class (model.CLASSES)
    params: int
    bytes: float
    quant: str
    device: str | None = None  # a home of its own (a DSA latent cache in RAM), None: the layer's
    held: float | None = None  # bytes on a GPU home where they differ from `bytes` (placement.held)
    cpu: tuple[float, float] | None = None  # (bytes, float elements) on a CPU home (placement.held), None: `bytes`

    def cpu_bytes(self, float_bytes: int) -> float:
        """What a CPU home holds of this group where the load keeps floats in `float_bytes` bytes."""
        return self.bytes if self.cpu is None else self.cpu[0] + self.cpu[1] * float_bytes

    @property
    def gpu_bytes(self) -> float:
        """What a GPU home holds of this group (`bytes` is what the file stores and a load reads)."""
        return self.bytes if self.held is None else self.held


KV_TENSORS = ("kv_cache", "index_keys")


@dataclass
class LayerItems:
    index: int
    fixed: list[Group]  # read by every token: the always-GPU candidates (kv_cache / index_keys included)
    expert_params: int = 0
    expert_bytes: float = 0.0
    freq: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mtp: bool = False

    @property
    def fixed_bytes(self) -> float:
        """What lives on the layer's home when it is a GPU (a latent cache with a home of its own not counted)."""
        return sum(g.gpu_bytes for g in self.fixed if g.device is None)

    @property
    def weight_bytes(self) -> float:
        return sum(g.bytes for g in self.fixed if g.tensor not in KV_TENSORS)

    @property
    def weight_params(self) -> float:
        return sum(g.params for g in self.fixed)


def _group(tensor: str, cls: str, kind: str, params: int, q: QuantScheme, spec: ModelSpec | None = None,
           layer: int | None = None) -> Group:
    """A group's bytes from its parameters and storage type; for a layer (or the embedding / head, layer -1) the
    file's own bytes where the scheme has them, and what a GPU home holds of it (placement.held)."""
    g = Group(tensor, cls, params, params * q.bytes_per_weight(kind), q.label(kind))
    if layer is None:
        return g
    found = q.layer_bytes(kind, layer)
    if found is not None:
        g.bytes, g.held = found
        g.cpu = q.cpu_layer_bytes(kind, layer)
    elif spec is not None and layer >= 0:
        g.held = gpu_group_bytes(spec, layer, kind, params, g.bytes)
        g.cpu = cpu_group_bytes(spec, layer, kind, params, g.bytes)
    return g


def layer_items(spec: ModelSpec, q: QuantScheme, profile: RoutingProfile, context: int, concurrency: int,
                with_mtp: bool, kv_dtype_bytes: float = 2.0, kv_ram: bool = False) -> list[LayerItems]:
    """kv_ram: a DSA model's latent + rope-key cache lives in RAM ("cpu") whatever the layer's home; its indexer
    keys stay with the layer. A DSA layer's KV is two groups, kv_cache (latent + rope key) and index_keys."""
    out = []
    sparse = M.sparse_kv(spec)
    n_mtp = spec.mtp_layers if with_mtp else 0
    for i in range(spec.n_layers + n_mtp):
        is_mtp = i >= spec.n_layers
        parts = M.layer_params(spec, i, with_indexer=bool(spec.index_heads) if is_mtp else None)

        def cls(c: str) -> str:
            return "mtp" if is_mtp else c

        at = None if is_mtp else i  # (the MTP layer: from its parameters)
        fixed = [_group("attn", cls("attention"), "mtp" if is_mtp else "attention", parts["attention"], q, spec, at),
                 _group("norms", cls("norms"), "norms", parts["norms"], q, spec, at)]
        if "dense_ffn" in parts:
            fixed.append(_group("ffn", cls("dense_ffn"), "mtp" if is_mtp else "dense_ffn", parts["dense_ffn"], q,
                                spec, at))
        else:
            fixed.append(_group("router", cls("router"), "router", parts["router"], q, spec, at))
            if parts["shared_experts"]:
                fixed.append(_group("shared_experts", cls("shared_experts"), "mtp" if is_mtp else "shared_experts",
                                    parts["shared_experts"], q, spec, at))
        if is_mtp:
            fixed.append(_group("mtp_proj", "mtp", "mtp", M.mtp_extra_params(spec), q))
        n, bits = context * concurrency, f"{kv_dtype_bytes * 8:.0f}-bit"
        index = M.index_key_bytes_per_token(spec, i, kv_dtype_bytes) if sparse else 0.0
        kv = n * (M.kv_bytes_per_token(spec, i, kv_dtype_bytes) - index)
        fixed.append(Group("kv_cache", "kv_cache", 0, kv, bits, device="cpu" if sparse and kv_ram else None))
        if index:
            fixed.append(Group("index_keys", "kv_cache", 0, n * index, bits))
        item = LayerItems(i, fixed, mtp=is_mtp)
        if "routed_experts" in parts:
            item.expert_params = M.expert_params(spec)
            item.expert_bytes = item.expert_params * q.bytes_per_weight("routed_experts")
            found = None if is_mtp else q.layer_bytes("routed_experts", i)
            if found is not None:  # the file's own bytes: a GGUF mixes types from layer to layer
                item.expert_bytes = found[0] / spec.n_experts
            item.freq = profile.freq(i)
        out.append(item)
    return out


def global_items(spec: ModelSpec, q: QuantScheme) -> tuple[Group, Group]:
    """(embeddings, lm_head incl. the final norm)."""
    emb = _group("embeddings", "embeddings", "embeddings", spec.vocab * spec.hidden, q, layer=-1)
    head_params = 0 if spec.tie_embeddings else spec.vocab * spec.hidden
    head = _group("lm_head", "lm_head", "lm_head", head_params, q, layer=-1)
    if q.layer_bytes("lm_head", -1) is None:
        head.bytes += spec.hidden * 4  # final norm, fp32 in the file
        head.held = head.bytes - spec.hidden * 2  # (held in the load dtype, bf16 on a GPU)
        head.cpu = (head.bytes - spec.hidden * 4, spec.hidden)
    head.params += spec.hidden
    return emb, head
