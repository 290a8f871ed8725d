"""DeepSeek-V3 / R1 and Kimi-K2: MLA, YaRN RoPE with mscale, sigmoid `noaux_tc` routing with grouped
top-k (n_group / topk_group, masked groups at -inf), shared experts, leading dense layers.

H hidden, h heads, E routed experts.
"""

from dataclasses import dataclass

from offload.models.base import build_rope, require, rope_parameters, yarn_softmax_scale
from offload.models.decoder import Decoder
from offload.models.loading import LoadContext, finish_decoder, load_layer, load_noaux_moe
from offload.models.mla import load_mla


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
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
    attention_bias: bool
    rope_interleave: bool
    rms_norm_eps: float
    rope: dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_nextn_predict_layers: int

    @classmethod
    def from_config(cls, c: dict, where: str = "config.json (deepseek_v3)") -> "ModelArgs":
        r = require
        return cls(
            vocab_size=r(c, "vocab_size", where), hidden_size=r(c, "hidden_size", where),
            num_hidden_layers=r(c, "num_hidden_layers", where), num_attention_heads=r(c, "num_attention_heads", where),
            q_lora_rank=c.get("q_lora_rank"), kv_lora_rank=r(c, "kv_lora_rank", where),
            qk_nope_head_dim=r(c, "qk_nope_head_dim", where), qk_rope_head_dim=r(c, "qk_rope_head_dim", where),
            v_head_dim=r(c, "v_head_dim", where), intermediate_size=r(c, "intermediate_size", where),
            moe_intermediate_size=r(c, "moe_intermediate_size", where),
            n_routed_experts=r(c, "n_routed_experts", where), n_shared_experts=c.get("n_shared_experts", 1) or 0,
            num_experts_per_tok=r(c, "num_experts_per_tok", where),
            n_group=c.get("n_group", 1) or 1, topk_group=c.get("topk_group", 1) or 1,
            norm_topk_prob=bool(c.get("norm_topk_prob", True)),
            routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
            first_k_dense_replace=c.get("first_k_dense_replace", 0) or 0,
            attention_bias=bool(c.get("attention_bias", False)),
            rope_interleave=bool(c.get("rope_interleave", True)),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope=rope_parameters(c),
            max_position_embeddings=c.get("max_position_embeddings", 163840),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            num_nextn_predict_layers=c.get("num_nextn_predict_layers", c.get("num_mtp_layers", 0)) or 0,
        )


def build(ctx: LoadContext, a: ModelArgs) -> Decoder:
    rope = build_rope(a.rope, a.qk_rope_head_dim, a.max_position_embeddings, a.rope_interleave, "deepseek_v3")
    scale = yarn_softmax_scale(a.rope, (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5)
    layers = []
    for i in range(a.num_hidden_layers):
        p, lc = f"model.layers.{i}", ctx.layer(i)
        attn = load_mla(lc, f"{p}.self_attn", a, rope, scale)
        if i >= a.first_k_dense_replace:
            mlp = load_noaux_moe(lc, f"{p}.mlp", i, a)
        else:
            mlp = lc.mlp(f"{p}.mlp", a.hidden_size, a.intermediate_size)
        layers.append(load_layer(lc, p, a.hidden_size, attn, mlp))
    return finish_decoder(ctx, a, layers)
