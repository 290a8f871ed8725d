"""The runtime owns a forward step: it walks the layers, moves the activations when the next layer lives on
another device, and orders each MoE layer's work. With `overlap` (offload.load's, default on), a CPU expert
group of a layer that lives elsewhere (a GPU) is started first on the worker thread, its inputs staged in
pinned host buffers (offload.staging); the shared expert and the GPU-resident groups run meanwhile; then every
partial is waited for and summed in group order, the shared expert last. Without it the groups run one after
the other in group order. The order of the sums is the same either way, so are the logits. The architecture
files only say what the weights are and what the math is.

T new tokens, H hidden, V vocab.
"""

import torch

from offload.cache import Cache
from offload.models.base import rms_norm
from offload.models.moe import MoE
from offload.staging import Staged, Staging


class Runtime:
    """Runs steps of one Decoder. Layers split over devices contiguously: x crosses once per split."""

    def __init__(self, model, overlap: bool = True):
        self.model = model
        self.overlap = overlap
        self.staging: Staging | None = None  # made at the first overlapped layer (pinning needs CUDA set up)

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
            x = x + (self.moe(layer.mlp, h, layer.device) if isinstance(layer.mlp, MoE) else layer.mlp(h))
        cache.length = start + tokens.shape[0]
        if last_only:
            x = x[-1:]  # (1, H)
        x = rms_norm(x.to(m.lm_head.device), m.norm, m.eps)  # the final norm lives with the head
        return m.lm_head(x).float()  # (T, V)

    @torch.inference_mode()
    def step_static(self, tokens: torch.Tensor, pos: torch.Tensor, caches: list[Cache]) -> torch.Tensor:
        """B sequences' single-token decode step with static shapes (offload.graphs.DecodeStep, a CUDA graph's
        body): tokens (B,) and pos (B,) are device tensors, sequence i's caches[i] preallocated (growth and
        cache.length are the caller's) and written at pos[i]. Attention per sequence, the rest on the B rows
        (as step_segments). -> logits (B, V) float32."""
        m = self.model
        b = len(caches)
        x = m.embed.rows(tokens)  # (B, H)
        states: list[dict] = [{} for _ in caches]  # per sequence: RoPE tables, DSA selections
        positions: dict = {}  # pos on each layer's device
        for i, layer in enumerate(m.layers):
            x = x.to(layer.device)
            p = positions.setdefault(layer.device, pos.to(layer.device))
            h = rms_norm(x, layer.attn_norm, m.eps)
            x = x + torch.cat([layer.attn.decode_static(h[j:j + 1], p[j:j + 1], caches[j].layers[i], states[j])
                               for j in range(b)])
            h = rms_norm(x, layer.mlp_norm, m.eps)
            x = x + (self.moe(layer.mlp, h, layer.device) if isinstance(layer.mlp, MoE) else layer.mlp(h))
        x = rms_norm(x.to(m.lm_head.device), m.norm, m.eps)
        return m.lm_head(x).float()  # (B, V)

    @torch.inference_mode()
    def step_segments(self, segments: list, last_only: bool = True) -> list[torch.Tensor]:
        """Several sequences in one forward (continuous batching): segments [(tokens (T_i,), cache_i)], each
        appended at its cache's length. Attention runs per segment (its own cache and positions); norms, MLP /
        MoE and the head run on the concatenated rows, so each expert's weights are read once for every row
        routed to it. -> per segment logits (1, V) (last_only) or (T_i, V), float32."""
        m = self.model
        lens = [int(t.shape[0]) for t, _ in segments]
        for (_, cache), n in zip(segments, lens):
            cache.check_room(n)
        starts = [cache.length for _, cache in segments]
        x = m.embed.rows(torch.cat([t for t, _ in segments]).to(m.embed.device))  # (sum T_i, H)
        states: list[dict] = [{} for _ in segments]  # per segment: RoPE tables and DSA selections differ
        for i, layer in enumerate(m.layers):
            x = x.to(layer.device)
            h = rms_norm(x, layer.attn_norm, m.eps).split(lens)
            x = x + torch.cat([layer.attn(hs, start, cache.layers[i], st)
                               for hs, start, (_, cache), st in zip(h, starts, segments, states)])
            h = rms_norm(x, layer.mlp_norm, m.eps)
            x = x + (self.moe(layer.mlp, h, layer.device) if isinstance(layer.mlp, MoE) else layer.mlp(h))
        for (_, cache), start, n in zip(segments, starts, lens):
            cache.length = start + n
        if last_only:
            ends = torch.tensor(lens, device=x.device).cumsum(0) - 1
            x, lens = x[ends], [1] * len(lens)  # (B, H)
        x = rms_norm(x.to(m.lm_head.device), m.norm, m.eps)
        return list(m.lm_head(x).float().split(lens))  # [(T_i or 1, V)]

    def moe(self, moe: MoE, x: torch.Tensor, home: torch.device) -> torch.Tensor:
        """x (T, H) of a layer living on `home` -> the MoE output (T, H)."""
        ids, weights = moe.route(x)  # (T, K), (T, K)
        handles = [None] * len(moe.groups)
        staged = None
        for j, g in enumerate(moe.groups):  # the background groups first: they run while this thread works
            stream = getattr(g, "stream", None)  # a long chunk's CPU experts copied to the GPU (offload.streaming)
            if stream is not None and stream.takes(ids):
                handles[j] = stream.submit(x, ids, weights)  # the copies start now, the kernels at wait
            elif self.overlap and getattr(g, "runs_in_background", False) and g.device != home:
                if staged is None:
                    if self.staging is None:
                        self.staging = Staging()
                    staged = Staged(self.staging.slot(moe.layer_idx), x, ids, weights)
                handles[j] = g.submit(x, ids, weights, background=True, staged=staged, out=f"out{j}")
        shared = moe.shared(x) if moe.shared is not None else None
        for j, g in enumerate(moe.groups):
            if handles[j] is None:
                handles[j] = (g.submit(x, ids, weights, background=False) if not self.overlap
                              and getattr(g, "runs_in_background", False) else g.submit(x, ids, weights))
        return moe.gather(handles, shared)
