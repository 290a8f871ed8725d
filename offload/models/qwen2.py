"""Qwen2 / Qwen2.5 (dense): the Llama decoder with biases on q, k and v (none on o_proj)."""

from offload.models import llama
from offload.models.llama import build  # noqa: F401  (the architecture's build: offload.models.ARCHITECTURES)


class ModelArgs(llama.ModelArgs):
    @classmethod
    def from_config(cls, c: dict) -> "ModelArgs":
        return cls.read(c, "qwen2", qkv_bias=True, o_bias=False, qk_norm=False)
