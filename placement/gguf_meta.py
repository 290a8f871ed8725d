"""Model description from a GGUF file's header: metadata and tensor table, never the tensor data.

The header is parsed and validated by offload.gguf.reader (the engine's one GGUF reader, pure Python +
numpy); block sizes come from its type table (via placement.quant). tests check the result against
gguf-py's GGUFReader.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from offload.errors import GGUFError
from offload.gguf.reader import GGUFFile

from .held import cpu_bytes, gpu_bytes
from .model import ModelSpec, from_hf_config
from .quant import QUANT_BLOCKS, QuantScheme, default_scheme

ARCHS = {"deepseek2": "deepseek_v3", "glm4moe": "glm4_moe", "glm-dsa": "glm_moe_dsa", "qwen3moe": "qwen3_moe",
         "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # the last three dense


def _plain(v):
    """A metadata value as plain Python: the reader keeps numeric arrays as numpy arrays, the planner
    (and read_header's callers) take lists of ints / floats / bools."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list) and v and not isinstance(v[0], str):  # nested arrays
        return [_plain(x) for x in v]
    return v


def header_of(gguf: GGUFFile) -> tuple[dict, list[tuple[str, list[int], str]]]:
    """read_header's result for a GGUF file that is already open."""
    meta = {key: _plain(v) for key, v in gguf.metadata.items()}
    tensors = [(t.name, list(t.shape), t.type_name) for t in gguf.tensors.values()]
    return meta, tensors


def read_header(path: str | Path | GGUFFile) -> tuple[dict, list[tuple[str, list[int], str]]]:
    """(metadata dict, [(tensor name, dims in ggml order, type name)]) of a GGUF file (every shard of a
    split file); numeric arrays in the metadata are lists. GGUFError for anything malformed."""
    if isinstance(path, GGUFFile):
        return header_of(path)
    with GGUFFile(path) as gguf:
        return header_of(gguf)


def _class_of(name: str, n_layers: int) -> str:
    m = re.match(r"blk\.(\d+)\.(.+)", name)
    if not m:
        return {"token_embd.weight": "embeddings", "output.weight": "lm_head"}.get(name, "norms")
    layer, rest = int(m.group(1)), m.group(2)
    if layer >= n_layers or rest.startswith("nextn."):
        return "mtp"
    if "_exps" in rest:
        return "routed_experts"
    if "_shexp" in rest:
        return "shared_experts"
    if rest.startswith(("ffn_gate_inp", "exp_probs_b")):
        return "router"
    if rest.startswith(("ffn_gate", "ffn_up", "ffn_down")):
        return "dense_ffn"
    if "norm" in rest and not rest.startswith("indexer.attn"):
        return "norms"
    return "attention"


def _bytes(dims: list[int], qtype: str) -> tuple[int, int]:
    n = 1
    for d in dims:
        n *= d
    block, size = QUANT_BLOCKS[qtype]
    return n, (n // block) * size


def spec_from_gguf(path: str | Path | GGUFFile) -> ModelSpec:
    """ModelSpec from GGUF metadata; spec.extra["quant"] holds the file's bytes per weight per class.
    `path` may be a GGUFFile already open (the loader's): its header is not parsed again."""
    meta, tensors = read_header(path)
    path = path.path if isinstance(path, GGUFFile) else Path(path)
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise GGUFError(f"{path}: architecture {arch!r} is not one the planner knows ({', '.join(ARCHS)})")

    def k(key: str, default=None):
        v = meta.get(f"{arch}.{key}", default)
        return max(v) if isinstance(v, list) and v else v

    names = {t[0]: t for t in tensors}
    nextn = int(k("nextn_predict_layers", 0) or 0)
    n_layers = int(k("block_count", 0)) - nextn
    if "token_embd.weight" in names:
        vocab = names["token_embd.weight"][1][1]
    else:
        vocab = k("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    cfg = {
        "model_type": ARCHS[arch], "hidden_size": k("embedding_length"), "num_hidden_layers": n_layers,
        "vocab_size": vocab, "intermediate_size": k("feed_forward_length", 0),
        "moe_intermediate_size": k("expert_feed_forward_length"), "n_routed_experts": k("expert_count"),
        "num_experts_per_tok": k("expert_used_count"), "n_shared_experts": k("expert_shared_count", 0),
        "first_k_dense_replace": k("leading_dense_block_count", 0), "num_attention_heads": k("attention.head_count"),
        "num_key_value_heads": k("attention.head_count_kv"), "num_nextn_predict_layers": nextn,
        "max_position_embeddings": k("context_length", 0), "tie_word_embeddings": "output.weight" not in names,
    }
    if arch in ("deepseek2", "glm-dsa"):
        rope = k("rope.dimension_count")
        qk = k("attention.key_length_mla") or k("attention.key_length")
        cfg |= {"q_lora_rank": k("attention.q_lora_rank", 0), "kv_lora_rank": k("attention.kv_lora_rank"),
                "qk_rope_head_dim": rope, "qk_nope_head_dim": qk - rope if qk and rope else None,
                "v_head_dim": k("attention.value_length_mla") or k("attention.value_length")}
        if arch == "glm-dsa":
            cfg |= {"index_n_heads": k("attention.indexer.head_count"),
                    "index_head_dim": k("attention.indexer.key_length"), "index_topk": k("attention.indexer.top_k"),
                    "indexer_types": ["full" if f"blk.{i}.indexer.attn_k.weight" in names else "shared"
                                      for i in range(n_layers)]}
    else:
        heads = k("attention.head_count")
        head_dim = k("attention.key_length") or (k("embedding_length") // heads if heads else None)
        cfg |= {"head_dim": head_dim, "attention_bias": "blk.0.attn_q.bias" in names,
                "use_qk_norm": "blk.0.attn_q_norm.weight" in names}
        if arch == "qwen3moe":
            cfg["decoder_sparse_step"] = 1
    cfg = {key: v for key, v in cfg.items() if v is not None}
    spec = from_hf_config(cfg, name=path.stem, where=str(path), meta={"source": f"GGUF metadata of {path.name}"})
    spec.extra["quant"] = scheme_from_tensors(tensors, n_layers)
    return spec


def scheme_from_tensors(tensors: list[tuple[str, list[int], str]], n_layers: int) -> QuantScheme:
    """Bytes per weight of each class as stored, and its most used type as the label."""
    params: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    by_type: dict[str, dict[str, int]] = {}
    layers: dict[str, dict[int, list[int]]] = {}
    cpu: dict[str, dict[int, list[int]]] = {}
    # layers whose MLA kv_b parts include a float one: no per-head blocks there (LoadContext.heads)
    float_kv_b = {name.split(".")[1] for name, _, qtype in tensors
                  if re.search(r"\.attn_[kv]_b\.", name) and qtype in ("F32", "F16", "BF16")}
    for name, dims, qtype in tensors:
        cls = _class_of(name, n_layers)
        n, b = _bytes(dims, qtype)
        m = re.match(r"blk\.(\d+)\.", name)
        layer = int(m.group(1)) if m else -1
        key = "lm_head" if name == "output_norm.weight" else cls  # the plan counts the final norm with the head
        if cls != "mtp" and (layer >= 0 or key in ("embeddings", "lm_head")):
            row = layers.setdefault(key, {}).setdefault(layer, [0, 0])
            row[0] += b
            row[1] += gpu_bytes(name, dims, qtype, b)
            c_row = cpu.setdefault(key, {}).setdefault(layer, [0, 0])
            c_b, c_n = cpu_bytes(name, dims, qtype, b, heads=str(layer) not in float_kv_b)
            c_row[0] += c_b
            c_row[1] += c_n
        params[cls] = params.get(cls, 0) + n
        nbytes[cls] = nbytes.get(cls, 0) + b
        by_type.setdefault(cls, {})[qtype] = by_type.setdefault(cls, {}).get(qtype, 0) + b
    scheme = default_scheme()
    for cls, n in params.items():
        if n and cls not in ("norms", "router"):
            scheme.measured[cls] = nbytes[cls] / n
            scheme.types[cls] = max(by_type[cls], key=by_type[cls].get)
            scheme.mix[cls] = {t: round(b / nbytes[cls], 4) for t, b in sorted(by_type[cls].items()) if b}
    scheme.layers = {c: {i: (s, g) for i, (s, g) in by.items()} for c, by in layers.items()}
    scheme.cpu_layers = {c: {i: (b, n) for i, (b, n) in by.items()} for c, by in cpu.items()}
    scheme.cpu_float = 4
    return scheme
