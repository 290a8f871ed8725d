"""Tiny random checkpoints for tests, benchmarks and examples, built with transformers' own config
classes and `save_pretrained` (transformers is a test dependency; imported lazily)."""

from pathlib import Path

import torch

from offload.tokenizer_fixture import make_test_tokenizer_dir

# Small but real: every code path of each architecture (dense leading layers, shared experts, groups,
# IndexShare with full and shared layers, YaRN) is exercised.
TINY_CONFIGS = {
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
                      max_position_embeddings=512),
    "glm4_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
                     num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                     topk_group=1, partial_rotary_factor=0.5, use_qk_norm=True, attention_bias=True,
                     routed_scaling_factor=1.5, max_position_embeddings=512),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, q_lora_rank=48,
                        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        routed_scaling_factor=2.5, max_position_embeddings=512,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 128, "beta_fast": 32,
                                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "glm_moe_dsa": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, mlp_layer_types=None, n_group=1,
                        topk_group=1, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, index_n_heads=16, index_head_dim=16, index_topk=8,
                        indexer_types=["full", "shared", "full", "shared"], routed_scaling_factor=2.5,
                        max_position_embeddings=512),
    # dense: GQA 4 / 2, head_dim 16 (llama's q/k permutation in GGUF is per head)
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_theta=100000.0),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    "qwen3": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
}

CONFIG_CLASSES = {"qwen3_moe": "Qwen3MoeConfig", "glm4_moe": "Glm4MoeConfig", "deepseek_v3": "DeepseekV3Config",
                  "glm_moe_dsa": "GlmMoeDsaConfig", "llama": "LlamaConfig", "qwen2": "Qwen2Config",
                  "qwen3": "Qwen3Config"}
MODEL_CLASSES = {"qwen3_moe": "Qwen3MoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                 "deepseek_v3": "DeepseekV3ForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM",
                 "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def tiny_hf_model(model_type: str, vocab_size: int, seed: int = 0, **overrides):
    """A random transformers model whose logits are of order 1 (default init makes them ~0)."""
    import transformers

    kwargs = dict(TINY_CONFIGS[model_type], vocab_size=vocab_size, **overrides)
    config = getattr(transformers, CONFIG_CLASSES[model_type])(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[model_type])(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def make_tiny_checkpoint(model_type: str, path: str | Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random `model_type` checkpoint (config, safetensors, tokenizer) to `path`."""
    path = Path(path)
    make_test_tokenizer_dir(path)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    generation_config = (path / "generation_config.json").read_text()
    model = tiny_hf_model(model_type, vocab, seed, **overrides)
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(generation_config)  # keep the tokenizer's eos ids
    return path
