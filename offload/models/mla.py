"""Multi-head latent attention (DeepSeek-V3, Kimi-K2, GLM-5), computed in the absorbed form.

The cache holds only the normalised KV latent and the rotated rope key. kv_b_proj is split into W_UK and
W_UV, and queries are multiplied into the latent space, so no per-head K/V is ever materialised (the same
split llama.cpp stores as attn_k_b / attn_v_b).

T new tokens, S cached + new tokens, H hidden, h heads, n nope dim, r rope dim, v value dim, c kv_lora_rank.
"""

from collections.abc import Callable

import torch

from offload.cache import MLACache
from offload.models.base import Rope, causal_mask, rms_norm
from offload.models.loading import LoadContext
from offload.models.weights import linears

# Query chunks of at least this many tokens use the expanded form (keys and values per head): per
# (query, key) pair it costs n + r + v multiply-adds against the absorbed form's 2c + r (DeepSeek-V3:
# 320 vs 1088), plus S·c·(n + v) per head to expand, which a long chunk amortises; decode stays absorbed.
EXPANDED_MIN_TOKENS = 16


class MLAAttention:
    def __init__(self, *, q_a, q_a_norm, q_b, q_proj, kv_a, kv_a_norm, kv_b, wo, n_heads, nope, rope_dim, v_dim,
                 kv_lora, rope: Rope, scale: float, eps: float, device, dtype, selector: Callable | None = None,
                 index_dim: int = 0):
        # q_a, q_b, q_proj, kv_a, wo: weights (offload.models.weights), biases inside; kv_b a float tensor
        self.q_a, self.q_a_norm, self.q_b, self.q_proj = q_a, q_a_norm, q_b, q_proj
        self.kv_a, self.kv_a_norm = kv_a, kv_a_norm
        # the projections of x, one call where the weights allow: (q, kv_a) or (q_a, kv_a)
        self.x_proj = linears([q_proj if q_proj is not None else q_a, kv_a])
        w = kv_b.view(n_heads, nope + v_dim, kv_lora)
        self.w_uk = w[:, :nope]  # (h, n, c)
        self.w_uv = w[:, nope:]  # (h, v, c)
        self.wo = wo
        self.h, self.nope, self.r, self.v, self.c = n_heads, nope, rope_dim, v_dim, kv_lora
        self.rope, self.scale, self.eps = rope, scale, eps
        self.device, self.dtype = device, dtype
        # DSA: selector(x, q_resid, start, cache, state) -> (T, S) bool mask of keys each query may read
        self.selector = selector
        self.index_dim = index_dim

    def new_cache(self, max_len: int) -> MLACache:
        return MLACache(max_len, self.c, self.r, self.device, self.dtype, self.index_dim)

    def __call__(self, x: torch.Tensor, start: int, cache: MLACache, state: dict) -> torch.Tensor:
        t = x.shape[0]
        if self.q_proj is not None:
            q_resid = None
            q, kv = self.x_proj(x)  # (T, h*(n + r)), (T, c + r)
        else:
            q_a, kv = self.x_proj(x)  # (T, q_lora), (T, c + r)
            q_resid = rms_norm(q_a, self.q_a_norm, self.eps)  # (T, q_lora)
            q = self.q_b(q_resid)
        q = q.view(t, self.h, self.nope + self.r)  # (T, h, n + r)
        q_nope, q_rot = q[..., : self.nope], q[..., self.nope:]
        latent = rms_norm(kv[:, : self.c], self.kv_a_norm, self.eps)  # (T, c)
        k_rot = kv[:, self.c:].view(t, 1, self.r)  # (T, 1, r)
        cos, sin = self.rope.cos_sin_at(start, t, x.device, x.dtype, state)
        q_rot, k_rot = self.rope.apply(q_rot, cos, sin), self.rope.apply(k_rot, cos, sin)
        latent_all, k_rot_all = cache.update(latent, k_rot[:, 0], start)  # (S, c), (S, r)

        expanded = t >= EXPANDED_MIN_TOKENS
        if expanded:  # prefill: expand keys and values per head, (n + r + v) per score instead of (2c + r)
            k_nope = torch.einsum("sc,hnc->hsn", latent_all, self.w_uk)  # (h, S, n)
            scores = torch.matmul(q_nope.transpose(0, 1), k_nope.transpose(1, 2))  # (h, T, S)
        else:  # decode: absorb W_UK into the query, attend over the cached latents directly
            q_lat = torch.einsum("thn,hnc->htc", q_nope, self.w_uk)  # (h, T, c)
            scores = torch.matmul(q_lat, latent_all.T)  # (h, T, S)
        scores = scores + torch.matmul(q_rot.transpose(0, 1), k_rot_all.T)  # (h, T, S)
        scores = scores * self.scale
        s = latent_all.shape[0]
        if self.selector is not None:
            mask = self.selector(x, q_resid, start, cache, state)  # (T, S)
        else:
            mask = causal_mask(t, s, start, x.device)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)  # (h, T, S)
        if expanded:
            v_all = torch.einsum("sc,hvc->hsv", latent_all, self.w_uv)  # (h, S, v)
            out = torch.matmul(probs, v_all).transpose(0, 1).reshape(t, self.h * self.v)  # (T, h*v)
        else:
            out_lat = torch.matmul(probs, latent_all)  # (h, T, c)
            out = torch.einsum("htc,hvc->thv", out_lat, self.w_uv).reshape(t, self.h * self.v)  # (T, h*v)
        return self.wo(out)


def load_mla(ctx: LoadContext, prefix: str, a, rope: Rope, scale: float, selector=None,
             index_dim: int = 0) -> MLAAttention:
    h, hid, n, r, v, c = (a.num_attention_heads, a.hidden_size, a.qk_nope_head_dim, a.qk_rope_head_dim,
                          a.v_head_dim, a.kv_lora_rank)
    g, lin = ctx.get, ctx.linear
    lora = a.q_lora_rank

    def b(name):
        return f"{prefix}.{name}.bias" if a.attention_bias else None

    return MLAAttention(
        q_a=lin(f"{prefix}.q_a_proj.weight", (lora, hid), b("q_a_proj")) if lora else None,
        q_a_norm=g(f"{prefix}.q_a_layernorm.weight", (lora,)) if lora else None,
        q_b=lin(f"{prefix}.q_b_proj.weight", (h * (n + r), lora)) if lora else None,
        q_proj=None if lora else lin(f"{prefix}.q_proj.weight", (h * (n + r), hid)),
        kv_a=lin(f"{prefix}.kv_a_proj_with_mqa.weight", (c + r, hid), b("kv_a_proj_with_mqa")),
        kv_a_norm=g(f"{prefix}.kv_a_layernorm.weight", (c,)),
        kv_b=g(f"{prefix}.kv_b_proj.weight", (h * (n + v), c)),
        wo=lin(f"{prefix}.o_proj.weight", (hid, h * v), b("o_proj")),
        n_heads=h, nope=n, rope_dim=r, v_dim=v, kv_lora=c, rope=rope, scale=scale, eps=1e-6,
        device=ctx.device, dtype=ctx.dtype, selector=selector, index_dim=index_dim)
