"""Qwen3 (dense): the Llama decoder with a per-head RMSNorm on q and k before RoPE."""

from offload.models import llama
from offload.models.llama import build  # noqa: F401  (the architecture's build: offload.models.ARCHITECTURES)


class ModelArgs(llama.ModelArgs):
    @classmethod
    def from_config(cls, c: dict) -> "ModelArgs":
        bias = bool(c.get("attention_bias", False))
        return cls.read(c, "qwen3", qkv_bias=bias, o_bias=bias, qk_norm=True)
