"""Built-in model catalog: the architecture keys of each model's public config.json.

Each entry is the subset of the Hugging Face config.json the planner reads, plus where the numbers
come from and the published parameter counts the tests check our arithmetic against.
"""

from __future__ import annotations

import difflib

from offload.errors import ConfigError

# GLM-5.x: `GlmMoeDsaConfig()` defaults in transformers equal zai-org/GLM-5's config.json;
# GLM-5.1 and GLM-5.2 ship the same shapes (hidden size, layers, experts, MLA + DSA); GLM-5.2 shares indexers.
_GLM5 = {
    "model_type": "glm_moe_dsa",
    "hidden_size": 6144, "num_hidden_layers": 78, "vocab_size": 154880,
    "intermediate_size": 12288, "moe_intermediate_size": 2048,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 3,
    "num_attention_heads": 64, "num_key_value_heads": 64,
    "q_lora_rank": 2048, "kv_lora_rank": 512, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
    "index_n_heads": 32, "index_head_dim": 128, "index_topk": 2048,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 202752, "tie_word_embeddings": False,
}

# GLM-5.2 adds IndexShare (an indexer every 4th layer from layer 2, plus layers 0-2; the others reuse the last
# full layer's pick) and a 1M context: `index_topk_freq` 4, `index_skip_topk_offset` 3 (transformers derives
# `indexer_types` from them), as its config.json reads where public code quotes it (inference engines' GLM-5.2
# config tests and checks; the checkpoint itself was not at hand offline).
_GLM52 = {**_GLM5, "index_topk_freq": 4, "index_skip_topk_offset": 3, "max_position_embeddings": 1048576}

_DEEPSEEK_V3 = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168, "num_hidden_layers": 61, "vocab_size": 129280,
    "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "n_routed_experts": 256, "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 3,
    "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 163840, "tie_word_embeddings": False,
}

_GLM45 = {
    "model_type": "glm4_moe",
    "hidden_size": 5120, "num_hidden_layers": 92, "vocab_size": 151552,
    "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "n_routed_experts": 160, "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 3,
    "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
    "attention_bias": True, "use_qk_norm": True,
    "num_nextn_predict_layers": 1, "max_position_embeddings": 131072, "tie_word_embeddings": False,
}

_QWEN3_MOE = {"model_type": "qwen3_moe", "decoder_sparse_step": 1, "mlp_only_layers": [], "head_dim": 128,
              "tie_word_embeddings": False, "max_position_embeddings": 40960}

CATALOG: dict[str, dict] = {
    "glm-5.2": {"config": _GLM52, "hf_repo": "zai-org/GLM-5.2", "fp8_repo": "zai-org/GLM-5.2-FP8",
                "source": "zai-org/GLM-5.2 config.json (GLM-5's shapes + IndexShare every 4 layers, 1M context)",
                "published_total": 744e9, "published_active": 40e9},
    "glm-5.1": {"config": _GLM5, "hf_repo": "zai-org/GLM-5.1", "fp8_repo": "zai-org/GLM-5.1-FP8",
                "source": "zai-org/GLM-5.1 config.json (same architecture as GLM-5)",
                "published_total": 744e9, "published_active": 40e9},
    "glm-5": {"config": _GLM5, "hf_repo": "zai-org/GLM-5", "fp8_repo": "zai-org/GLM-5-FP8",
              "source": "zai-org/GLM-5 config.json", "published_total": 744e9, "published_active": 40e9},
    "glm-4.7": {"config": {**_GLM45, "max_position_embeddings": 202752}, "hf_repo": "zai-org/GLM-4.7",
                "fp8_repo": "zai-org/GLM-4.7-FP8", "source": "zai-org/GLM-4.7 config.json (GLM-4.5 architecture)",
                "published_total": 355e9, "published_active": 32e9},
    "glm-4.6": {"config": {**_GLM45, "max_position_embeddings": 202752}, "hf_repo": "zai-org/GLM-4.6",
                "fp8_repo": "zai-org/GLM-4.6-FP8", "source": "zai-org/GLM-4.6 config.json (GLM-4.5 architecture)",
                "published_total": 355e9, "published_active": 32e9},
    "glm-4.5": {"config": _GLM45, "hf_repo": "zai-org/GLM-4.5", "fp8_repo": "zai-org/GLM-4.5-FP8",
                "source": "zai-org/GLM-4.5 config.json", "published_total": 355e9, "published_active": 32e9},
    "glm-4.5-air": {
        "config": {**_GLM45, "hidden_size": 4096, "num_hidden_layers": 46, "intermediate_size": 10944,
                   "moe_intermediate_size": 1408, "n_routed_experts": 128, "first_k_dense_replace": 1,
                   "use_qk_norm": False},
        "hf_repo": "zai-org/GLM-4.5-Air", "fp8_repo": "zai-org/GLM-4.5-Air-FP8",
        "source": "zai-org/GLM-4.5-Air config.json (= transformers Glm4MoeConfig() defaults)",
        "published_total": 106e9, "published_active": 12e9},
    "deepseek-v3": {"config": _DEEPSEEK_V3, "hf_repo": "deepseek-ai/DeepSeek-V3", "fp8_repo": "deepseek-ai/DeepSeek-V3",
                    "source": "deepseek-ai/DeepSeek-V3 config.json (FP8 checkpoint; 671B main + 14B MTP module)",
                    "published_total": 671e9, "published_active": 37e9},
    "kimi-k2": {
        "config": {**_DEEPSEEK_V3, "model_type": "kimi_k2", "vocab_size": 163840, "n_routed_experts": 384,
                   "first_k_dense_replace": 1, "num_attention_heads": 64, "num_key_value_heads": 64,
                   "num_nextn_predict_layers": 0, "max_position_embeddings": 131072},
        "hf_repo": "moonshotai/Kimi-K2-Instruct", "fp8_repo": "moonshotai/Kimi-K2-Instruct",
        # The model card rounds to "1T"; 1026.5B is the Hub's count of the safetensors parameters.
        "source": "moonshotai/Kimi-K2-Instruct config.json (DeepSeek-V3 architecture)",
        "published_total": 1026.5e9, "published_active": 32e9},
    "qwen3-235b-a22b": {
        "config": {**_QWEN3_MOE, "hidden_size": 4096, "num_hidden_layers": 94, "vocab_size": 151936,
                   "intermediate_size": 12288, "moe_intermediate_size": 1536, "num_experts": 128,
                   "num_experts_per_tok": 8, "num_attention_heads": 64, "num_key_value_heads": 4},
        "hf_repo": "Qwen/Qwen3-235B-A22B", "fp8_repo": "Qwen/Qwen3-235B-A22B-FP8",
        "source": "Qwen/Qwen3-235B-A22B config.json", "published_total": 235e9, "published_active": 22e9},
    "qwen3-30b-a3b": {
        "config": {**_QWEN3_MOE, "hidden_size": 2048, "num_hidden_layers": 48, "vocab_size": 151936,
                   "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                   "num_experts_per_tok": 8, "num_attention_heads": 32, "num_key_value_heads": 4},
        "hf_repo": "Qwen/Qwen3-30B-A3B", "fp8_repo": "Qwen/Qwen3-30B-A3B-FP8",
        "source": "Qwen/Qwen3-30B-A3B config.json", "published_total": 30.5e9, "published_active": 3.3e9},
}

ALIASES = {"deepseek-r1": "deepseek-v3", "glm5.2": "glm-5.2", "glm5": "glm-5", "kimi-k2-instruct": "kimi-k2"}


def lookup(name: str) -> tuple[str, dict]:
    """Catalog entry by name (case-insensitive, aliases allowed); unknown names suggest close ones."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in CATALOG:
        return key, CATALOG[key]
    names = sorted(CATALOG) + sorted(ALIASES)
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown model {name!r}: not a catalog name, config.json, checkpoint dir or .gguf file"
                      f"{hint} (catalog: {', '.join(sorted(CATALOG))})")
