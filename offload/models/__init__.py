"""One module per architecture, named after the checkpoint's `model_type`. Each exports `ModelArgs`
(with `from_config(dict)`) and `build(ctx, args) -> Decoder`."""

import importlib

from offload.errors import ConfigError

# model_type -> module name. kimi_k2 is the DeepSeek-V3 architecture.
ARCHITECTURES = {
    "qwen3_moe": "qwen3_moe",
    "glm4_moe": "glm4_moe",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
    "glm_moe_dsa": "glm_moe_dsa",
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}


def architecture(model_type: str | None):
    if model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ConfigError(f"config.json: unknown model_type '{model_type}' (supported: {known})")
    return importlib.import_module(f"offload.models.{ARCHITECTURES[model_type]}")
