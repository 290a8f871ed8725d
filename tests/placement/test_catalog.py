"""Catalog numbers against transformers' real model classes and the published parameter counts."""

import pytest

from offload.errors import ConfigError
from offload.placement import catalog
from offload.placement import model as M

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", sorted(catalog.CATALOG))
def test_total_within_one_percent_of_published(name):
    spec = M.from_catalog(name)
    assert abs(M.total_params(spec) / spec.published_total - 1) < 0.01
    # "active" is defined differently by each vendor (embeddings in or out); stay within 10 %
    assert abs(M.active_params(spec) / spec.published_active - 1) < 0.10


def _hf_count(cfg, cls) -> int:
    with torch.device("meta"):
        model = cls(cfg)
    return sum(v.numel() for v in model.state_dict().values())


def _hf(name):
    entry = catalog.CATALOG[name]["config"]
    keys = {k: v for k, v in entry.items() if k not in ("model_type", "num_nextn_predict_layers")}
    return keys


@pytest.mark.parametrize("name,config_cls,model_cls", [
    ("glm-5.2", "GlmMoeDsaConfig", "GlmMoeDsaForCausalLM"),
    ("glm-4.5", "Glm4MoeConfig", "Glm4MoeForCausalLM"),
    ("deepseek-v3", "DeepseekV3Config", "DeepseekV3ForCausalLM"),
    ("kimi-k2", "DeepseekV3Config", "DeepseekV3ForCausalLM"),
    ("qwen3-30b-a3b", "Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
])
def test_param_count_equals_transformers_model(name, config_cls, model_cls):
    """The whole model built by transformers on the meta device (no memory) has exactly our count."""
    cfg = getattr(transformers, config_cls)(**_hf(name))
    assert _hf_count(cfg, getattr(transformers, model_cls)) == M.total_params(M.from_catalog(name))


def test_glm5_catalog_equals_transformers_defaults():
    cfg = transformers.GlmMoeDsaConfig().to_dict()
    for key, value in catalog.CATALOG["glm-5"]["config"].items():
        if key not in ("model_type", "num_nextn_predict_layers"):
            assert cfg[key] == value, key
    spec = M.from_catalog("glm-5")
    assert spec.indexer_layers == tuple(i for i, t in enumerate(cfg["indexer_types"]) if t == "full")


def test_glm52_index_share_schedule_is_transformers():
    """GLM-5.2's IndexShare: transformers derives indexer_types from index_topk_freq / index_skip_topk_offset;
    ours is the same schedule, full at layers 0-2 and every 4th from 2 (21 of 78), and the shared layers hold no
    indexer weights (the parameter count against transformers' model, test above, checks that)."""
    cfg = transformers.GlmMoeDsaConfig(**_hf("glm-5.2")).to_dict()
    full = tuple(i for i, t in enumerate(cfg["indexer_types"]) if t == "full")
    assert M.from_catalog("glm-5.2").indexer_layers == full
    assert full == (0, 1, 2) + tuple(range(6, 78, 4)) and len(full) == 21


def test_glm45_air_equals_transformers_defaults():
    cfg = transformers.Glm4MoeConfig().to_dict()
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
                "first_k_dense_replace", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert cfg[key] == catalog.CATALOG["glm-4.5-air"]["config"][key], key


def test_every_entry_names_its_source():
    for name, entry in catalog.CATALOG.items():
        assert "/" in entry["hf_repo"] and entry["source"], name


def test_alias_and_case():
    assert M.from_catalog("DeepSeek-R1").name == "deepseek-v3"


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean.*glm-5"):
        M.load_model("glm-5.3")
    with pytest.raises(ConfigError, match="unknown model"):
        M.load_model("llama-70b-not-here")


def test_config_json_and_checkpoint_dir(tmp_path):
    import json

    cfg = transformers.Qwen3MoeConfig(num_hidden_layers=2, hidden_size=64, moe_intermediate_size=32,
                                      num_experts=4, num_experts_per_tok=2, vocab_size=100, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=64)
    cfg.save_pretrained(tmp_path)
    spec = M.load_model(tmp_path)
    assert spec.n_experts == 4 and spec.top_k == 2 and spec.n_layers == 2
    assert M.total_params(spec) == _hf_count(cfg, transformers.Qwen3MoeForCausalLM)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        M.load_model(bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        M.load_model(bad)
