"""Grouped-query attention with optional qkv bias and per-head q/k RMSNorm (Qwen3-MoE, GLM-4.5).

T tokens, H hidden, h query heads, kv KV heads, d head dim, S cached + new tokens.
"""

import torch
import torch.nn.functional as F

from offload.cache import GQACache
from offload.models.base import Rope, grouped_attention, length_mask, rms_norm
from offload.models.loading import LoadContext
from offload.models.weights import linears


class GQAAttention:
    """Grouped-query attention with optional qkv bias and per-head q/k norm (Qwen3, GLM-4.5)."""

    def __init__(self, *, wq, wk, wv, wo, q_norm, k_norm, n_heads, n_kv_heads, head_dim, rope: Rope, eps: float,
                 device, dtype):
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo  # weights (offload.models.weights), biases inside
        self.wqkv = linears([wq, wk, wv])  # one call where the weights allow (quantised CPU matrices)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope, self.eps = rope, eps
        self.scale = head_dim ** -0.5
        self.device, self.dtype = device, dtype

    def new_cache(self, max_len: int) -> GQACache:
        return GQACache(max_len, self.n_kv_heads, self.head_dim, self.device, self.dtype)

    def __call__(self, x: torch.Tensor, start: int, cache: GQACache, state: dict) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x)
        cos, sin = self.rope.cos_sin_at(start, t, x.device, x.dtype, state)
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        k_all, v_all = cache.update(k, v, start)  # (kv, S, d)
        out = grouped_attention(q.transpose(0, 1), k_all, v_all, start, self.scale)  # (h, T, d)
        return self.wo(out.transpose(0, 1).reshape(t, -1))

    def decode_static(self, x: torch.Tensor, pos: torch.Tensor, cache: GQACache, state: dict) -> torch.Tensor:
        """One token x (1, H) at device position pos (1,): written into the preallocated cache at pos, attending
        over all of it with a mask from pos (static shapes, nothing read back: a CUDA graph's step)."""
        q, k, v = self.qkv(x)  # (1, h, d), (1, kv, d), (1, kv, d)
        cos, sin = self.rope.cos_sin_of(pos, x.dtype, state)
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        cache.k.index_copy_(1, pos, k.transpose(0, 1))  # (kv, C, d)
        cache.v.index_copy_(1, pos, v.transpose(0, 1))
        mask = length_mask(pos, cache.capacity)  # (1, C)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], cache.k[None], cache.v[None], attn_mask=mask,
                                             scale=self.scale, enable_gqa=True)  # (1, h, 1, d)
        return self.wo(out[0].transpose(0, 1).reshape(1, -1))

    def qkv(self, x: torch.Tensor):
        """x (T, H) -> q (T, h, d), k and v (T, kv, d), normed where the model norms them (before RoPE)."""
        t = x.shape[0]
        q, k, v = self.wqkv(x)
        q = q.view(t, self.n_heads, self.head_dim)  # (T, h, d)
        k = k.view(t, self.n_kv_heads, self.head_dim)  # (T, kv, d)
        v = v.view(t, self.n_kv_heads, self.head_dim)  # (T, kv, d)
        if self.q_norm is not None:
            q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
        return q, k, v


def load_gqa(ctx: LoadContext, prefix: str, a, rope: Rope, qk_norm: bool, bias: bool) -> GQAAttention:
    h, kv, d, hid = a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.hidden_size
    g, lin = ctx.get, ctx.linear

    def b(name):
        return f"{prefix}.{name}.bias" if bias else None

    return GQAAttention(
        wq=lin(f"{prefix}.q_proj.weight", (h * d, hid), b("q_proj")),
        wk=lin(f"{prefix}.k_proj.weight", (kv * d, hid), b("k_proj")),
        wv=lin(f"{prefix}.v_proj.weight", (kv * d, hid), b("v_proj")),
        wo=lin(f"{prefix}.o_proj.weight", (hid, h * d)),
        q_norm=g(f"{prefix}.q_norm.weight", (d,)) if qk_norm else None,
        k_norm=g(f"{prefix}.k_norm.weight", (d,)) if qk_norm else None,
        n_heads=h, n_kv_heads=kv, head_dim=d, rope=rope, eps=a.rms_norm_eps, device=ctx.device, dtype=ctx.dtype)
