"""GGUF metadata -> the Hugging Face config each ModelArgs.from_config reads, and GGUF tensor names -> the
Hugging Face names the architecture files ask for. One table per llama.cpp architecture.

What llama.cpp's converter (convert_hf_to_gguf.py + conversion/*.py) does and what is undone here:
- routed experts are stacked per layer into `ffn_{gate,up,down}_exps` (ggml shape in, out, expert);
  they are not renamed to per-expert HF names but served as groups by GGUFSource.expert_group;
- DeepSeek2 / GLM-DSA store MLA's kv_b_proj split as `attn_k_b` (per head W_UK transposed: h, c, n)
  and `attn_v_b` (h, v, c); `kv_b_proj` is reassembled from them (GGUFSource.get);
- no q/k permutation for the MoE architectures (rope type NEOX for qwen3moe/glm4moe, NORM for
  deepseek2/glm-dsa matches transformers' interleaved rope); `llama`'s q/k rows are permuted per head for
  ggml's NORM rope, and read with an interleaved rope (`rope_interleave`, offload/models/llama.py);
- NextN / MTP blocks are appended after the trunk (`blk.{n_layer}…`) and are skipped.
"""

import math
import re
from typing import Any

import numpy as np

from offload.errors import GGUFError

# llama.cpp architecture -> our model_type (offload.models.ARCHITECTURES)
MODEL_TYPES = {"qwen3moe": "qwen3_moe", "glm4moe": "glm4_moe", "deepseek2": "deepseek_v3",
               "glm-dsa": "glm_moe_dsa", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
DENSE = ("llama", "qwen2", "qwen3")  # no experts: a dense FFN in every layer

# (HF suffix after `model.layers.{i}.`, GGUF suffix after `blk.{i}.`); shared by every architecture
_LAYER = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("post_attention_layernorm.weight", "post_attention_norm.weight"),  # glm4moe's name for it
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.bias", "attn_output.bias"),
    ("self_attn.q_norm.weight", "attn_q_norm.weight"),
    ("self_attn.k_norm.weight", "attn_k_norm.weight"),
    # MLA
    ("self_attn.q_a_proj.weight", "attn_q_a.weight"),
    ("self_attn.q_a_layernorm.weight", "attn_q_a_norm.weight"),
    ("self_attn.q_b_proj.weight", "attn_q_b.weight"),
    ("self_attn.kv_a_proj_with_mqa.weight", "attn_kv_a_mqa.weight"),
    ("self_attn.kv_a_layernorm.weight", "attn_kv_a_norm.weight"),
    ("self_attn.kv_b_proj.weight", "attn_kv_b.weight"),  # older files; else reassembled from k_b / v_b
    # DSA lightning indexer
    ("self_attn.indexer.wq_b.weight", "indexer.attn_q_b.weight"),
    ("self_attn.indexer.wk.weight", "indexer.attn_k.weight"),
    ("self_attn.indexer.k_norm.weight", "indexer.k_norm.weight"),
    ("self_attn.indexer.k_norm.bias", "indexer.k_norm.bias"),
    ("self_attn.indexer.weights_proj.weight", "indexer.proj.weight"),
    # dense FFN, router, shared experts
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("mlp.gate.weight", "ffn_gate_inp.weight"),
    ("mlp.gate.e_score_correction_bias", "exp_probs_b.bias"),
    ("mlp.shared_experts.gate_proj.weight", "ffn_gate_shexp.weight"),
    ("mlp.shared_experts.up_proj.weight", "ffn_up_shexp.weight"),
    ("mlp.shared_experts.down_proj.weight", "ffn_down_shexp.weight"),
]
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight",
           "model.rope_freqs.weight": "rope_freqs.weight"}  # GGUF only: Llama 3.1's rope divisors
EXPERTS = {"gate": "ffn_gate_exps.weight", "up": "ffn_up_exps.weight", "down": "ffn_down_exps.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_MAP: dict[str, list[str]] = {}
for _hf, _gg in _LAYER:
    _LAYER_MAP.setdefault(_hf, []).append(_gg)


def gguf_names(hf_name: str) -> list[str]:
    """The GGUF tensor names that may hold HF tensor `hf_name` as is (first present wins); [] if none."""
    if hf_name in _GLOBAL:
        return [_GLOBAL[hf_name]]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        return [f"blk.{m.group(1)}.{g}" for g in _LAYER_MAP[m.group(2)]]
    return []


def experts_layer(prefix: str) -> int | None:
    """`model.layers.{i}.mlp.experts` -> i."""
    m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts$", prefix)
    return int(m.group(1)) if m else None


_REQUIRED = object()


class _Meta:
    """`<arch>.*` metadata values, typed: a value of the wrong type or range is a GGUFError naming its key."""

    def __init__(self, metadata: dict, arch: str, where: str):
        self.m, self.arch, self.where = metadata, arch, where

    def get(self, key: str, default: Any = None) -> Any:
        v = self.m.get(f"{self.arch}.{key}", default)
        return v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v

    def req(self, key: str) -> Any:
        v = self.get(key)
        if v is None:
            raise GGUFError(f"{self.where}: metadata key '{self.arch}.{key}' missing")
        return v

    def _bad(self, key: str, v: Any, expected: str) -> GGUFError:
        return GGUFError(f"{self.where}: metadata key '{self.arch}.{key}' = {v!r:.60}, expected {expected}")

    def count(self, key: str, default: Any = _REQUIRED, minimum: int = 0) -> int:
        v = self.req(key) if default is _REQUIRED else self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise self._bad(key, v, f"an integer >= {minimum}")
        return int(v)

    def number(self, key: str, default: Any = _REQUIRED) -> float:
        v = self.req(key) if default is _REQUIRED else self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v):
            raise self._bad(key, v, "a finite number")
        return float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, (bool, int, np.bool_, np.integer)):
            raise self._bad(key, v, "a boolean")
        return bool(v)

    def text(self, key: str) -> str | None:
        v = self.get(key)
        if v is not None and not isinstance(v, str):
            raise self._bad(key, v, "a string")
        return v


def _rope(meta: _Meta) -> dict:
    rope = {"rope_theta": meta.number("rope.freq_base", 10000.0), "rope_type": "default"}
    kind = meta.text("rope.scaling.type")
    if kind == "yarn":
        rope.update(rope_type="yarn", factor=meta.number("rope.scaling.factor"),
                    original_max_position_embeddings=meta.count("rope.scaling.original_context_length", minimum=1))
        for key, hf in (("rope.scaling.yarn_beta_fast", "beta_fast"),
                        ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if meta.get(key) is not None:
                rope[hf] = meta.number(key)
        log_mul = meta.get("rope.scaling.yarn_log_multiplier")
        # deepseek2 writes 0.1 * mscale_all_dim; llama.cpp's rope takes mscale = mscale_all_dim
        if log_mul is not None:
            rope["mscale"] = rope["mscale_all_dim"] = meta.number("rope.scaling.yarn_log_multiplier") / 0.1
    elif kind not in (None, "none"):
        raise GGUFError(f"{meta.where}: rope.scaling.type '{kind}' is not supported (none, yarn)")
    return rope


def _layer_count(meta: _Meta, n_tensors: int) -> int:
    """block_count less the MTP blocks, bounded by the tensor table: per-layer lists are built from it."""
    blocks, nextn = meta.count("block_count", minimum=1), meta.count("nextn_predict_layers", 0)
    n = blocks - nextn  # MTP blocks are appended after the trunk
    if not 1 <= n <= n_tensors:
        raise GGUFError(f"{meta.where}: {meta.arch}.block_count = {blocks} less nextn_predict_layers = {nextn} "
                        f"gives {n} layers, expected 1 to the {n_tensors} tensors the file holds")
    return n


def _vocab(meta: _Meta, metadata: dict, tensors: dict) -> int:
    """The vocabulary is token_embd's rows; the tokenizer must not name a token past them."""
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{meta.where}: tensor 'token_embd.weight' missing")
    if len(embd.shape) != 2:
        raise GGUFError(f"{meta.where}: tensor 'token_embd.weight' has shape {list(embd.np_shape)}, expected "
                        "[vocab, hidden]")
    vocab = embd.shape[1]
    if meta.get("vocab_size") is not None and meta.count("vocab_size") != vocab:
        raise GGUFError(f"{meta.where}: {meta.arch}.vocab_size = {meta.get('vocab_size')}, but token_embd.weight "
                        f"has {vocab} rows")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and hasattr(tokens, "__len__") and len(tokens) > vocab:
        raise GGUFError(f"{meta.where}: tokenizer.ggml.tokens lists {len(tokens)} tokens, but token_embd.weight "
                        f"has only {vocab} rows")
    return vocab


def _indexer_types(meta: _Meta, tensors: dict, n_layers: int) -> list[str]:
    types = meta.get("attention.indexer.types")
    if types is None:
        return ["full" if f"blk.{i}.indexer.proj.weight" in tensors else "shared" for i in range(n_layers)]
    if not (isinstance(types, np.ndarray) and types.ndim == 1 and types.dtype.kind in "biu"):
        raise meta._bad("attention.indexer.types", types, "an array of integers (1 = full, 0 = shared)")
    return ["full" if t else "shared" for t in types.tolist()[:n_layers]]


def hf_config(metadata: dict, tensors: dict, where: str) -> dict:
    """The HF config.json dict (with `model_type`) for this GGUF's metadata and tensor table, checked against
    that table (offload.gguf.validate): every dimension a load allocates from agrees with the tensors."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in MODEL_TYPES:
        raise GGUFError(f"{where}: architecture {arch!r:.60} is not supported "
                        f"(supported: {', '.join(MODEL_TYPES)})")
    meta = _Meta(metadata, arch, where)
    vocab = _vocab(meta, metadata, tensors)
    n_layers = _layer_count(meta, len(tensors))
    heads = meta.count("attention.head_count", minimum=1)
    hidden = meta.count("embedding_length", minimum=1)
    if arch in DENSE:
        return _checked(_dense_config(meta, vocab, n_layers, heads, hidden, tensors), tensors, where)
    expert_ffn = meta.count("expert_feed_forward_length", minimum=1)
    c: dict[str, Any] = {
        "model_type": MODEL_TYPES[arch], "vocab_size": vocab,
        "hidden_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": heads,
        "intermediate_size": meta.count("feed_forward_length", 0) or expert_ffn,
        "moe_intermediate_size": expert_ffn,
        "num_experts_per_tok": meta.count("expert_used_count", minimum=1),
        "rms_norm_eps": meta.number("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_parameters": _rope(meta), "max_position_embeddings": meta.count("context_length", 4096, minimum=1),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors or "blk.0.attn_q_a.bias" in tensors,
        "num_nextn_predict_layers": 0,
    }
    n_experts = meta.count("expert_count", minimum=1)
    if arch == "qwen3moe":
        c.update(num_experts=n_experts, num_key_value_heads=meta.count("attention.head_count_kv", heads, minimum=1),
                 head_dim=meta.count("attention.key_length", hidden // heads, minimum=1),
                 # llama.cpp's qwen3moe graph always renormalises the top-k weights
                 norm_topk_prob=meta.flag("expert_weights_norm", True), mlp_only_layers=[],
                 decoder_sparse_step=1)
        return _checked(c, tensors, where)
    c.update(n_routed_experts=n_experts, n_shared_experts=meta.count("expert_shared_count", 0),
             n_group=meta.count("expert_group_count", 1) or 1,
             topk_group=meta.count("expert_group_used_count", 1) or 1,
             norm_topk_prob=meta.flag("expert_weights_norm", False),
             routed_scaling_factor=meta.number("expert_weights_scale", 1.0) or 1.0,
             first_k_dense_replace=meta.count("leading_dense_block_count", 0))
    # llama.cpp: glm4moe / glm-dsa default to sigmoid; deepseek2 without the key means softmax (DeepSeek-V2)
    gating = meta.get("expert_gating_func", None if arch == "deepseek2" else 2)
    if isinstance(gating, bool) or not isinstance(gating, int) or gating != 2:  # 2: ..._GATING_FUNC_TYPE_SIGMOID
        raise GGUFError(f"{where}: {arch}.expert_gating_func = {gating!r:.60}, only sigmoid (2) is supported")
    if arch == "glm4moe":
        head_dim = meta.count("attention.key_length", hidden // heads, minimum=1)
        c.update(num_key_value_heads=meta.count("attention.head_count_kv", heads, minimum=1), head_dim=head_dim,
                 partial_rotary_factor=meta.count("rope.dimension_count", head_dim // 2, minimum=1) / head_dim,
                 use_qk_norm="blk.0.attn_q_norm.weight" in tensors)
        c["rope_parameters"]["partial_rotary_factor"] = c["partial_rotary_factor"]
        return _checked(c, tensors, where)
    # deepseek2 / glm-dsa: MLA
    rope_dim, key_dim = meta.count("rope.dimension_count", minimum=1), meta.count("attention.key_length_mla")
    if key_dim < rope_dim:  # the key is its nope part followed by its rope part
        raise GGUFError(f"{where}: {arch}.attention.key_length_mla = {key_dim} is less than "
                        f"{arch}.rope.dimension_count = {rope_dim}")
    q_lora = meta.get("attention.q_lora_rank")
    c.update(num_key_value_heads=heads, q_lora_rank=None if q_lora is None else meta.count("attention.q_lora_rank"),
             kv_lora_rank=meta.count("attention.kv_lora_rank", minimum=1), qk_rope_head_dim=rope_dim,
             qk_nope_head_dim=key_dim - rope_dim, v_head_dim=meta.count("attention.value_length_mla", minimum=1),
             rope_interleave=True)
    if arch == "glm-dsa":
        c.update(index_n_heads=meta.count("attention.indexer.head_count", minimum=1),
                 index_head_dim=meta.count("attention.indexer.key_length", minimum=1),
                 index_topk=meta.count("attention.indexer.top_k", minimum=1),
                 indexer_types=_indexer_types(meta, tensors, n_layers))
    return _checked(c, tensors, where)


def _dense_config(meta: _Meta, vocab: int, n_layers: int, heads: int, hidden: int, tensors: dict) -> dict:
    """llama / qwen2 / qwen3. Only `llama` has its q / k rows permuted by the converter (for ggml's pairwise
    NORM rope): `rope_interleave` rotates those pairs, which gives transformers' q and k (models/llama.py).
    qwen2 / qwen3 are converted as they are and use the NEOX (half-split) rope, as transformers does."""
    return {
        "model_type": MODEL_TYPES[meta.arch], "vocab_size": vocab, "hidden_size": hidden,
        "num_hidden_layers": n_layers, "num_attention_heads": heads,
        "num_key_value_heads": meta.count("attention.head_count_kv", heads, minimum=1),
        "head_dim": meta.count("attention.key_length", hidden // heads, minimum=1),
        "intermediate_size": meta.count("feed_forward_length", minimum=1),
        "rms_norm_eps": meta.number("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_parameters": _rope(meta), "max_position_embeddings": meta.count("context_length", 4096, minimum=1),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors, "rope_interleave": meta.arch == "llama",
    }


def _checked(config: dict, tensors: dict, where: str) -> dict:
    from offload.gguf.validate import check_model  # it reads shapes through GGUFSource, which imports this module

    check_model(config, tensors, where)
    return config
