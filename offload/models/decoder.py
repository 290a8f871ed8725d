"""The decoder skeleton every architecture fills in: embed -> [norm, attention, norm, MLP/MoE] x L -> norm -> head.

T new tokens, H hidden, V vocab.
"""

from dataclasses import dataclass, field

import torch

from offload.cache import Cache
from offload.models.base import embedding, linear, rms_norm
from offload.models.moe import MoE


@dataclass
class Layer:
    attn_norm: torch.Tensor  # (H,)
    attn: object  # attn(x (T, H), start_pos, layer_cache, state) -> (T, H); .new_cache(max_len)
    mlp_norm: torch.Tensor  # (H,)
    mlp: object  # MLP or MoE: (T, H) -> (T, H)


@dataclass
class Decoder:
    args: object  # the architecture's ModelArgs
    embed: object  # (V, H) float tensor, or a quantised matrix (GGUF on the CPU; see base.embedding)
    layers: list[Layer]
    norm: torch.Tensor  # (H,)
    lm_head: object  # (V, H) float tensor, or a quantised matrix (GGUF on the CPU; see base.linear)
    eps: float
    device: torch.device
    skipped: list[str] = field(default_factory=list)  # e.g. the MTP layer, recognised and not run

    def new_cache(self, max_len: int) -> Cache:
        return Cache([layer.attn.new_cache(max_len) for layer in self.layers], max_len)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: Cache, last_only: bool = False) -> torch.Tensor:
        """tokens (T,) appended at cache.length; returns logits (T, V) float32, or (1, V) for the last
        position only (generation: the head is a big matmul, as costly as a layer for a 512-token chunk)."""
        tokens = tokens.to(self.device)
        cache.check_room(tokens.shape[0])
        start = cache.length
        x = embedding(tokens, self.embed)  # (T, H)
        state: dict = {}  # per-forward values layers hand on (DSA top-k selections)
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = x + layer.attn(rms_norm(x, layer.attn_norm, self.eps), start, layer_cache, state)
            x = x + layer.mlp(rms_norm(x, layer.mlp_norm, self.eps))
        cache.length = start + tokens.shape[0]
        if last_only:
            x = x[-1:]  # (1, H)
        x = rms_norm(x, self.norm, self.eps)
        return linear(x, self.lm_head).float()  # (T, V)

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]
