"""Pieces every architecture shares: RMSNorm, RoPE (default / YaRN, half-split / interleaved), the
dense SwiGLU MLP and causal attention over a cache.

Dimension letters: T new tokens, S cached + new tokens, H hidden, h heads, d head dim, V vocab.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offload.errors import ConfigError


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order as transformers: normalise in fp32, cast back, then scale.
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def require(config: dict, key: str, where: str):
    if key not in config or config[key] is None:
        raise ConfigError(f"{where}: missing required key '{key}'")
    return config[key]


# ---------------------------------------------------------------- RoPE

@dataclass(frozen=True)
class Rope:
    """Rotary embedding: inverse frequencies for `dim` rotary dims and the cos/sin scale (YaRN)."""
    inv_freq: torch.Tensor  # (dim/2,)
    attention_factor: float
    interleaved: bool  # DeepSeek / GLM-DSA rotate (x0, x1), (x2, x3)...; others rotate halves

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)  # (T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, dim)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)

    def cos_sin_at(self, start: int, t: int, device, dtype: torch.dtype, state: dict):
        """cos_sin for positions start..start+t, computed once per forward (`state`) for all layers."""
        key = ("rope", id(self), start, t, device, dtype)  # layers on several devices each get their copy
        if key not in state:
            state[key] = self.cos_sin(torch.arange(start, start + t, device=device), dtype)
        return state[key]

    def cos_sin_of(self, positions: torch.Tensor, dtype: torch.dtype, state: dict):
        """cos_sin for a device tensor of positions (T,) (the static decode step: no Python position to bake
        into a captured graph), once per forward and device."""
        key = ("rope_at", id(self), positions.device, dtype)
        if key not in state:
            inv = _inv_freq_on(self, positions.device)  # kept per device: no host copy inside a capture
            freqs = positions[:, None].float() * inv  # (T, dim/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (T, dim)
            state[key] = ((emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype))
        return state[key]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (T, h, d_rot) -> rotated (T, h, d_rot); cos/sin (T, d_rot)."""
        cos, sin = cos[:, None, :], sin[:, None, :]
        if self.interleaved:
            # Output in (evens', odds') order, as transformers does; q and k share it, so scores are unchanged.
            half = cos.shape[-1] // 2
            c, s = cos[..., :half], sin[..., :half]
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        rot = cos.shape[-1]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        h1, h2 = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
        rotated = x_rot * cos + torch.cat((-h2, h1), dim=-1) * sin
        return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


_inv_freqs: dict = {}


def _inv_freq_on(rope: Rope, device) -> torch.Tensor:
    key = (id(rope), device)
    if key not in _inv_freqs:
        _inv_freqs[key] = (rope, rope.inv_freq.to(device))  # the rope kept alive so its id is not reused
    return _inv_freqs[key][1]


def rope_parameters(config: dict) -> dict:
    """transformers 5 writes `rope_parameters`; older configs (and real checkpoints) `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    for k, v in scaling.items():
        params.setdefault(k, v)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def build_rope(params: dict, dim: int, max_position_embeddings: int, interleaved: bool, where: str) -> Rope:
    base = float(params["rope_theta"])
    kind = params.get("rope_type", "default")
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if kind == "default":
        return Rope(1.0 / pos_freqs, 1.0, interleaved)
    if kind != "yarn":
        raise ConfigError(f"{where}: rope_type '{kind}' is not supported (default, yarn)")
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError(f"{where}: yarn RoPE needs 'original_max_position_embeddings'")
    factor = params.get("factor") or max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return Rope(inv_freq, float(attention_factor), interleaved)


def yarn_softmax_scale(params: dict, scale: float) -> float:
    """DeepSeek's YaRN also sharpens the softmax by mscale(factor, mscale_all_dim)^2."""
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        m = yarn_get_mscale(params["factor"], params["mscale_all_dim"])
        scale = scale * m * m
    return scale


# ---------------------------------------------------------------- dense pieces

class MLP:
    """SwiGLU feed-forward: down(silu(gate x) * up x), over weights that know their matmul
    (offload.models.weights; quantised CPU weights get kernels.cpu.weights.QuantMLP, one native call)."""

    def __init__(self, gate, up, down):
        self.gate, self.up, self.down = gate, up, down  # (I, H), (I, H), (H, I)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, scale: float,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (h, T, d) attends to k (h, S, d), v (h, S, dv); query i sits at position start_pos + i.

    The plain reference the fused paths (grouped_attention, models.mla) are tested against: explicit
    (h, T, S) scores, as transformers' eager attention computes them, softmax in fp32.
    `mask` (T, S) bool, True = may attend, replaces the plain causal mask (sparse attention)."""
    t, s = q.shape[1], k.shape[1]
    if mask is None:
        mask = causal_mask(t, s, start_pos, q.device)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # (h, T, S)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)  # (h, T, dv)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
                      scale: float) -> torch.Tensor:
    """causal_attention for grouped-query heads without repeating the cache per query head: q (h, T, d),
    k (kv, S, d), v (kv, S, dv), query head i reading KV head i // (h / kv), as repeat_interleave would."""
    t, s = q.shape[1], k.shape[1]
    # torch's fused attention: 2-5x the explicit scores + softmax on the CPU (56-83 vs 15-27 GFLOP/s for
    # 32 heads of 128 at 512-2048 tokens, same results to 1e-6 in float32); a whole prompt is plain causal,
    # one new token sees every cached key, a chunk after a cached prefix needs the offset mask
    mask = None if t == 1 or t == s else causal_mask(t, s, start_pos, q.device)  # (T, S)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=t == s > 1,
                                         scale=scale, enable_gqa=True)  # (1, h, T, dv)
    return out[0]


def causal_mask(t: int, s: int, start_pos: int, device) -> torch.Tensor:
    rows = torch.arange(t, device=device)[:, None] + start_pos
    cols = torch.arange(s, device=device)[None, :]
    return cols <= rows  # (T, S)


def length_mask(pos: torch.Tensor, capacity: int) -> torch.Tensor:
    """(1, capacity) bool: the cached positions a decode query at device position pos (1,) may read (the static
    step: attention reads the whole preallocated cache, the length lives on the device)."""
    return torch.arange(capacity, device=pos.device)[None, :] <= pos[:, None]  # (1, capacity)
