"""The runtime owns a forward step: it walks the layers, moves the activations when the next layer lives on
another device, and orders each MoE layer's work (every expert group submitted, the shared expert computed
while they run, then their partials waited for and summed). The architecture files only say what the weights
are and what the math is.

T new tokens, H hidden, V vocab.
"""

import torch

from offload.cache import Cache
from offload.models.base import rms_norm
from offload.models.moe import MoE


class Runtime:
    """Runs steps of one Decoder. Layers split over devices contiguously: x crosses once per split."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cache: Cache, last_only: bool = False) -> torch.Tensor:
        """tokens (T,) appended at cache.length -> logits (T, V) float32 on the head's device, or (1, V) for the
        last position only (generation: the head is a big matmul, as costly as a layer for a 512-token chunk)."""
        m = self.model
        cache.check_room(tokens.shape[0])
        start = cache.length
        x = m.embed.rows(tokens.to(m.embed.device))  # (T, H)
        state: dict = {}  # per-forward values layers hand on (RoPE tables, DSA top-k selections)
        for layer, layer_cache in zip(m.layers, cache.layers):
            x = x.to(layer.device)  # a no-op unless the previous layer lived elsewhere
            x = x + layer.attn(rms_norm(x, layer.attn_norm, m.eps), start, layer_cache, state)
            h = rms_norm(x, layer.mlp_norm, m.eps)
            x = x + (self.moe(layer.mlp, h) if isinstance(layer.mlp, MoE) else layer.mlp(h))
        cache.length = start + tokens.shape[0]
        if last_only:
            x = x[-1:]  # (1, H)
        x = rms_norm(x.to(m.lm_head.device), m.norm, m.eps)  # the final norm lives with the head
        return m.lm_head(x).float()  # (T, V)

    def moe(self, moe: MoE, x: torch.Tensor) -> torch.Tensor:
        handles = moe.submit(x)  # the groups run (or ran) while the shared expert is computed here
        shared = moe.shared(x) if moe.shared is not None else None
        return moe.gather(handles, shared)
