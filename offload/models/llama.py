"""Llama (SmolLM2, Llama 2 / 3.x) and the dense decoders that differ from it in a flag or two (qwen2.py: qkv
bias; qwen3.py: per-head q/k RMSNorm): GQA attention with RoPE, a SwiGLU MLP in every layer, no experts.

GGUF files of `llama` hold q_proj / k_proj with each head's rows permuted for ggml's rope, which rotates
adjacent pairs (convert_hf_to_gguf.py's LlamaModel.permute: halves (d/2, d/2) -> pairs (d/2, 2)); the GGUF
config says `rope_interleave` and the interleaved rope on those rows gives transformers' q and k exactly.

H hidden, h heads, kv KV heads, d head dim, I MLP width.
"""

import math
from dataclasses import dataclass

import torch

from offload.errors import ConfigError
from offload.models.base import Rope, build_rope, require, rope_parameters
from offload.models.decoder import Decoder
from offload.models.gqa import GQAAttention
from offload.models.loading import LoadContext, finish_decoder, load_layer


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q / k / v biases
    o_bias: bool  # o_proj bias (llama and qwen3 tie it to attention_bias; qwen2 has none)
    qk_norm: bool  # qwen3: RMSNorm per head on q and k before RoPE
    rope_interleave: bool  # GGUF llama: q / k rows permuted for ggml's pairwise rope

    @classmethod
    def from_config(cls, c: dict) -> "ModelArgs":
        bias = bool(c.get("attention_bias", False))
        return cls.read(c, "llama", qkv_bias=bias, o_bias=bias, qk_norm=False)

    @classmethod
    def read(cls, c: dict, model_type: str, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> "ModelArgs":
        where = f"config.json ({model_type})"
        if c.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported")
        if c.get("mlp_bias"):
            raise ConfigError(f"{where}: mlp_bias=true is not supported")
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act '{c['hidden_act']}' is not supported (silu)")
        hidden = require(c, "hidden_size", where)
        heads = require(c, "num_attention_heads", where)
        return cls(
            vocab_size=require(c, "vocab_size", where), hidden_size=hidden,
            num_hidden_layers=require(c, "num_hidden_layers", where), num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            intermediate_size=require(c, "intermediate_size", where),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope=rope_parameters(c),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm,
            rope_interleave=bool(c.get("rope_interleave", False)),
        )


def llama3_inv_freq(params: dict, dim: int) -> torch.Tensor:
    """Llama 3.1's rope: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between."""
    base = float(params["rope_theta"])
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)  # (d/2,)
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old = float(params.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def load_rope(ctx: LoadContext, a: ModelArgs, where: str) -> Rope:
    if a.rope.get("rope_type") == "llama3":
        rope = Rope(llama3_inv_freq(a.rope, a.head_dim), 1.0, a.rope_interleave)
    else:
        rope = build_rope(a.rope, a.head_dim, a.max_position_embeddings, a.rope_interleave, where)
    # a Llama 3.1 GGUF stores its rope scaling as divisors per frequency (rope_freqs.weight), not as metadata
    factors = ctx.maybe("model.rope_freqs.weight", (a.head_dim // 2,), device="cpu", dtype=torch.float32)
    if factors is not None:
        rope = Rope(rope.inv_freq / factors, rope.attention_factor, rope.interleaved)
    return rope


def load_attention(ctx: LoadContext, prefix: str, a: ModelArgs, rope: Rope) -> GQAAttention:
    h, kv, d, hid = a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.hidden_size

    def bias(name, on):
        return f"{prefix}.{name}.bias" if on else None

    return GQAAttention(
        wq=ctx.linear(f"{prefix}.q_proj.weight", (h * d, hid), bias("q_proj", a.attention_bias)),
        wk=ctx.linear(f"{prefix}.k_proj.weight", (kv * d, hid), bias("k_proj", a.attention_bias)),
        wv=ctx.linear(f"{prefix}.v_proj.weight", (kv * d, hid), bias("v_proj", a.attention_bias)),
        wo=ctx.linear(f"{prefix}.o_proj.weight", (hid, h * d), bias("o_proj", a.o_bias)),
        q_norm=ctx.get(f"{prefix}.q_norm.weight", (d,)) if a.qk_norm else None,
        k_norm=ctx.get(f"{prefix}.k_norm.weight", (d,)) if a.qk_norm else None,
        n_heads=h, n_kv_heads=kv, head_dim=d, rope=rope, eps=a.rms_norm_eps, device=ctx.device, dtype=ctx.dtype)


def build(ctx: LoadContext, a: ModelArgs) -> Decoder:
    rope = load_rope(ctx, a, type(a).__module__.rsplit(".", 1)[-1])  # llama, qwen2 or qwen3, for errors
    layers = []
    for i in range(a.num_hidden_layers):
        p, lc = f"model.layers.{i}", ctx.layer(i)
        attn = load_attention(lc, f"{p}.self_attn", a, rope)
        mlp = lc.mlp(f"{p}.mlp", a.hidden_size, a.intermediate_size)
        layers.append(load_layer(lc, p, a.hidden_size, attn, mlp))
    return finish_decoder(ctx, a, layers)
