"""What an architecture file needs to build itself from a weight source: typed tensor reads straight onto
the right device, dense MLPs, and routed experts split by their home (placement).

Expert homes are logical names: "gpu" (the main device) and "cpu". Each home becomes one expert group, so
a half/half split is a real split even on a machine whose "gpu" home is a CPU device (tests).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from offload.models.base import MLP
from offload.models.decoder import Decoder, Layer
from offload.models.moe import MoE, TorchExperts, route_sigmoid_grouped

HOMES = ("gpu", "cpu")


@dataclass
class LoadContext:
    source: object  # Checkpoint (safetensors) or a GGUF source with the same get/has/shape API
    device: torch.device  # the main device: attention, norms, dense layers, shared experts, "gpu" experts
    dtype: torch.dtype
    # layer index -> home name per routed expert; None = every expert on the main device
    placement: Callable[[int, int], list[str]] | None = None
    home_devices: dict[str, torch.device] = field(default_factory=dict)
    # builds the group for CPU-resident experts (quantised kernels); None = plain torch tensors
    cpu_experts_factory: Callable | None = None
    on_tensor: Callable[[], None] | None = None

    def get(self, name: str, shape: tuple[int, ...] | None = None, device=None, dtype=None) -> torch.Tensor:
        t = self.source.get(name, device=device or self.device, dtype=dtype or self.dtype, shape=shape)
        if self.on_tensor is not None:
            self.on_tensor()
        return t

    def maybe(self, name: str, shape=None, device=None, dtype=None) -> torch.Tensor | None:
        return self.get(name, shape, device, dtype) if self.source.has(name) else None

    def mlp(self, prefix: str, hidden: int, inter: int) -> MLP:
        return MLP(self.get(f"{prefix}.gate_proj.weight", (inter, hidden)),
                   self.get(f"{prefix}.up_proj.weight", (inter, hidden)),
                   self.get(f"{prefix}.down_proj.weight", (hidden, inter)))

    def device_of(self, home: str) -> torch.device:
        if home in self.home_devices:
            return self.home_devices[home]
        return self.device if home == "gpu" else torch.device("cpu")

    def experts(self, prefix: str, layer: int, n_experts: int, hidden: int, inter: int):
        """Routed experts of one layer -> (groups, home index per expert (E,))."""
        homes = self.placement(layer, n_experts) if self.placement else ["gpu"] * n_experts
        names = sorted(set(homes), key=HOMES.index)
        home = torch.tensor([names.index(h) for h in homes], dtype=torch.int64)
        stacked = self.source.has(f"{prefix}.gate_up_proj")
        # sources with quantised experts (GGUF) hand out whole groups that stay quantised
        quantised = hasattr(self.source, "expert_group") and self.source.has_expert_groups(prefix)
        if stacked:  # transformers' fused layout, read once per layer: gate_up (E, 2I, H), down (E, H, I)
            gate_up_all = self.get(f"{prefix}.gate_up_proj", (n_experts, 2 * inter, hidden), device="cpu")
            down_all = self.get(f"{prefix}.down_proj", (n_experts, hidden, inter), device="cpu")
        groups = []
        for name in names:
            dev = self.device_of(name)
            ids = [e for e in range(n_experts) if homes[e] == name]
            if quantised:
                groups.append(self.source.expert_group(prefix, ids, dev, hidden, inter))
                if self.on_tensor is not None:
                    self.on_tensor()
                continue
            weights = {}
            for e in ids:
                if stacked:
                    gate_up = gate_up_all[e].to(dev)
                    gate, up = gate_up[:inter], gate_up[inter:]
                    down = down_all[e].to(dev)
                else:
                    p = f"{prefix}.{e}"
                    gate = self.get(f"{p}.gate_proj.weight", (inter, hidden), device=dev)
                    up = self.get(f"{p}.up_proj.weight", (inter, hidden), device=dev)
                    down = self.get(f"{p}.down_proj.weight", (hidden, inter), device=dev)
                weights[e] = (gate, up, down)
            if name == "cpu" and self.cpu_experts_factory is not None:
                groups.append(self.cpu_experts_factory(weights, dev))
            else:
                groups.append(TorchExperts(dev, weights))
        return groups, home


def load_embeddings(ctx: LoadContext, a) -> tuple[object, torch.Tensor, object]:
    """Embedding table, final norm, head. A GGUF on the CPU keeps the table and the head as their blocks
    (a tied head is the table itself): lookups dequantise only the rows asked for, and the head is read
    quantised each token (Q6_K: 5x fewer bytes than float32), as llama.cpp does."""
    shape = (a.vocab_size, a.hidden_size)
    quantised = getattr(ctx.source, "quant_linear", None) if ctx.device.type == "cpu" else None
    embed = quantised("model.embed_tokens.weight", shape) if quantised is not None else None
    if embed is None:
        embed = ctx.get("model.embed_tokens.weight", shape)
    norm = ctx.get("model.norm.weight", (a.hidden_size,))
    if a.tie_word_embeddings and not ctx.source.has("lm_head.weight"):
        return embed, norm, embed
    head = quantised("lm_head.weight", shape) if quantised is not None else None
    return embed, norm, head if head is not None else ctx.get("lm_head.weight", shape)


def load_noaux_moe(ctx: LoadContext, prefix: str, layer: int, a) -> "MoE":
    """DeepSeek-V3 / GLM MoE block: sigmoid `noaux_tc` router with score-correction bias, grouped top-k,
    routed experts by placement, shared experts."""
    e, hid, inter = a.n_routed_experts, a.hidden_size, a.moe_intermediate_size
    weight = ctx.get(f"{prefix}.gate.weight", (e, hid))
    bias = ctx.get(f"{prefix}.gate.e_score_correction_bias", (e,), dtype=torch.float32)
    router = partial(route_sigmoid_grouped, weight=weight, bias=bias, top_k=a.num_experts_per_tok,
                     n_group=a.n_group, topk_group=a.topk_group, norm_topk_prob=a.norm_topk_prob,
                     scaling=a.routed_scaling_factor)
    groups, home = ctx.experts(f"{prefix}.experts", layer, e, hid, inter)
    shared = ctx.mlp(f"{prefix}.shared_experts", hid, inter * a.n_shared_experts) if a.n_shared_experts else None
    moe = MoE(router, groups, home, shared)
    moe.layer_idx = layer
    return moe


def load_layer(ctx: LoadContext, prefix: str, hidden: int, attn, mlp) -> Layer:
    return Layer(ctx.get(f"{prefix}.input_layernorm.weight", (hidden,)), attn,
                 ctx.get(f"{prefix}.post_attention_layernorm.weight", (hidden,)), mlp)


def finish_decoder(ctx: LoadContext, a, layers: list[Layer]) -> Decoder:
    """Embeddings, final norm and head around the layers; MTP layers past the last are named, not run."""
    embed, norm, head = load_embeddings(ctx, a)
    n_mtp = getattr(a, "num_nextn_predict_layers", 0)
    skipped = [f"model.layers.{a.num_hidden_layers + j} (MTP)" for j in range(n_mtp)]
    return Decoder(a, embed, layers, norm, head, a.rms_norm_eps, ctx.device, skipped)
