"""The decoder skeleton every architecture fills in: embed -> [norm, attention, norm, MLP/MoE] x L -> norm -> head.
The step itself is offload.runtime's: the layers here are only what it walks.

T new tokens, H hidden, V vocab.
"""

from dataclasses import dataclass, field

import torch

from offload.cache import Cache
from offload.models.moe import MoE


@dataclass
class Layer:
    attn_norm: torch.Tensor  # (H,)
    attn: object  # attn(x (T, H), start_pos, layer_cache, state) -> (T, H); .new_cache(max_len)
    mlp_norm: torch.Tensor  # (H,)
    mlp: object  # MLP (T, H) -> (T, H), or MoE (run by the runtime: submit / shared / gather)
    device: torch.device  # the layer's home: its weights (but not its routed experts'), its cache


@dataclass
class Decoder:
    args: object  # the architecture's ModelArgs
    embed: object  # (V, H) weight (offload.models.weights): embed.rows(tokens)
    layers: list[Layer]
    norm: torch.Tensor  # (H,) on the head's device
    lm_head: object  # (V, H) weight: lm_head(x)
    eps: float
    device: torch.device  # the main device
    skipped: list[str] = field(default_factory=list)  # e.g. the MTP layer, recognised and not run

    def __post_init__(self):
        from offload.runtime import Runtime

        self.runtime = Runtime(self)

    def new_cache(self, max_len: int) -> Cache:
        return Cache([layer.attn.new_cache(max_len) for layer in self.layers], max_len)

    def forward(self, tokens: torch.Tensor, cache: Cache, last_only: bool = False) -> torch.Tensor:
        """tokens (T,) appended at cache.length; returns logits (T, V) float32, or (1, V) for the last
        position only."""
        return self.runtime.step(tokens, cache, last_only)

    def forward_segments(self, segments: list, last_only: bool = True) -> list[torch.Tensor]:
        """Several sequences in one step: [(tokens (T_i,), cache_i)] -> per segment logits (see
        Runtime.step_segments)."""
        return self.runtime.step_segments(segments, last_only)

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]
