"""GLM-4.5 / 4.6 / 4.7 / Air: GQA with qkv bias, partial rotary, optional qk-norm; sigmoid routing with
score-correction bias; one shared expert; leading dense layers.

H hidden, h heads, kv KV heads, d head dim, E routed experts.
"""

from dataclasses import dataclass

from offload.models.base import build_rope, require, rope_parameters
from offload.models.decoder import Decoder
from offload.models.gqa import load_gqa
from offload.models.loading import LoadContext, finish_decoder, load_layer, load_noaux_moe


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    partial_rotary_factor: float
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    use_qk_norm: bool
    attention_bias: bool
    rms_norm_eps: float
    rope: dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_nextn_predict_layers: int

    @classmethod
    def from_config(cls, c: dict) -> "ModelArgs":
        where = "config.json (glm4_moe)"
        hidden = require(c, "hidden_size", where)
        heads = require(c, "num_attention_heads", where)
        rope = rope_parameters(c)
        partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5))
        return cls(
            vocab_size=require(c, "vocab_size", where), hidden_size=hidden,
            num_hidden_layers=require(c, "num_hidden_layers", where), num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads, partial_rotary_factor=float(partial),
            intermediate_size=require(c, "intermediate_size", where),
            moe_intermediate_size=require(c, "moe_intermediate_size", where),
            n_routed_experts=require(c, "n_routed_experts", where), n_shared_experts=c.get("n_shared_experts", 1),
            num_experts_per_tok=require(c, "num_experts_per_tok", where),
            n_group=c.get("n_group", 1) or 1, topk_group=c.get("topk_group", 1) or 1,
            norm_topk_prob=bool(c.get("norm_topk_prob", True)),
            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=c.get("first_k_dense_replace", 1),
            use_qk_norm=bool(c.get("use_qk_norm", False)), attention_bias=bool(c.get("attention_bias", False)),
            rms_norm_eps=c.get("rms_norm_eps", 1e-5), rope=rope,
            max_position_embeddings=c.get("max_position_embeddings", 131072),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            num_nextn_predict_layers=c.get("num_nextn_predict_layers", c.get("num_mtp_layers", 0)) or 0,
        )


def build(ctx: LoadContext, a: ModelArgs) -> Decoder:
    rotary_dim = int(a.head_dim * a.partial_rotary_factor)
    rope = build_rope(a.rope, rotary_dim, a.max_position_embeddings, interleaved=False, where="glm4_moe")
    layers = []
    for i in range(a.num_hidden_layers):
        p, lc = f"model.layers.{i}", ctx.layer(i)
        attn = load_gqa(lc, f"{p}.self_attn", a, rope, qk_norm=a.use_qk_norm, bias=a.attention_bias)
        if i >= a.first_k_dense_replace:
            mlp = load_noaux_moe(lc, f"{p}.mlp", i, a)
        else:
            mlp = lc.mlp(f"{p}.mlp", a.hidden_size, a.intermediate_size)
        layers.append(load_layer(lc, p, a.hidden_size, attn, mlp))
    return finish_decoder(ctx, a, layers)
