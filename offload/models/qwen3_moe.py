"""Qwen3-MoE: GQA with per-head q/k RMSNorm, softmax top-k routing, no shared expert.

T tokens, H hidden, h query heads, kv KV heads, d head dim, E experts, I expert intermediate.
"""

from dataclasses import dataclass
from functools import partial

from offload.errors import ConfigError
from offload.models.base import build_rope, require, rope_parameters
from offload.models.decoder import Decoder
from offload.models.gqa import load_gqa
from offload.models.loading import LoadContext, finish_decoder, load_layer
from offload.models.moe import MoE, route_softmax


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    rms_norm_eps: float
    rope: dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool

    @classmethod
    def from_config(cls, c: dict) -> "ModelArgs":
        where = "config.json (qwen3_moe)"
        if c.get("use_sliding_window"):
            raise ConfigError(f"{where}: use_sliding_window=true is not supported")
        hidden = require(c, "hidden_size", where)
        heads = require(c, "num_attention_heads", where)
        experts = c.get("num_experts", c.get("num_local_experts"))
        if experts is None:
            raise ConfigError(f"{where}: missing required key 'num_experts'")
        return cls(
            vocab_size=require(c, "vocab_size", where), hidden_size=hidden,
            num_hidden_layers=require(c, "num_hidden_layers", where), num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            intermediate_size=require(c, "intermediate_size", where),
            moe_intermediate_size=require(c, "moe_intermediate_size", where),
            num_experts=experts, num_experts_per_tok=require(c, "num_experts_per_tok", where),
            norm_topk_prob=bool(c.get("norm_topk_prob", False)),
            decoder_sparse_step=c.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=tuple(c.get("mlp_only_layers") or ()),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope=rope_parameters(c),
            max_position_embeddings=c.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", False)),
        )

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0


def build(ctx: LoadContext, a: ModelArgs) -> Decoder:
    rope = build_rope(a.rope, a.head_dim, a.max_position_embeddings, interleaved=False, where="qwen3_moe")
    layers = []
    for i in range(a.num_hidden_layers):
        p, lc = f"model.layers.{i}", ctx.layer(i)
        attn = load_gqa(lc, f"{p}.self_attn", a, rope, qk_norm=True, bias=a.attention_bias)
        if a.is_moe_layer(i):
            gate = lc.get(f"{p}.mlp.gate.weight", (a.num_experts, a.hidden_size))
            router = partial(route_softmax, weight=gate, top_k=a.num_experts_per_tok, norm_topk_prob=a.norm_topk_prob)
            groups, _ = lc.experts(f"{p}.mlp.experts", i, a.num_experts, a.hidden_size, a.moe_intermediate_size)
            mlp = MoE(router, groups, None, i)
        else:
            mlp = lc.mlp(f"{p}.mlp", a.hidden_size, a.intermediate_size)
        layers.append(load_layer(lc, p, a.hidden_size, attn, mlp))
    return finish_decoder(ctx, a, layers)
