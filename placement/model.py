"""Model description: the shapes that decide memory and speed, from a HF config.json, a GGUF file's
metadata, or the built-in catalog; and the inventory of tensor groups with their parameter counts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from offload.errors import ConfigError
from offload.gguf.reader import GGUFFile

from . import catalog

# Report order of the tensor classes.
CLASSES = ("embeddings", "attention", "norms", "router", "dense_ffn", "shared_experts", "routed_experts",
           "lm_head", "mtp", "kv_cache", "reserve")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str  # config.json model_type
    hidden: int
    n_layers: int
    vocab: int
    dense_layers: tuple[int, ...]  # layers with a dense FFN; every other layer is MoE
    n_experts: int
    top_k: int
    moe_inter: int
    dense_inter: int
    n_shared: int
    attention: str  # "mla" (DeepSeek latent attention) or "gqa"
    n_heads: int
    n_kv_heads: int = 0
    head_dim: int = 0
    attention_bias: bool = False
    qk_norm: bool = False
    q_lora_rank: int = 0  # 0: q_proj straight from the hidden state
    kv_lora_rank: int = 0
    qk_nope: int = 0
    qk_rope: int = 0
    v_head: int = 0
    index_heads: int = 0  # DSA indexer (0: none)
    index_head_dim: int = 0
    index_topk: int = 0
    indexer_layers: tuple[int, ...] = ()  # layers that run their own indexer ("full"); others share
    router_bias: bool = True
    mtp_layers: int = 0
    tie_embeddings: bool = False
    max_context: int = 0
    source: str = ""
    hf_repo: str = ""
    fp8_repo: str = ""
    published_total: float = 0.0
    published_active: float = 0.0
    native_dtype: str = "BF16"
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if i not in self.dense_layers)


def _need(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise ConfigError(f"{where}: missing key {key!r} in the model config")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {key} = {value!r}, expected a non-negative integer")
    return value


def from_hf_config(cfg: dict, name: str = "", where: str = "config.json", meta: dict | None = None) -> ModelSpec:
    """ModelSpec from a Hugging Face config.json dict (glm_moe_dsa, deepseek_v3, kimi_k2, glm4_moe, qwen3_moe; a
    config without routed experts (llama, qwen2, qwen3) is dense: every layer a dense FFN)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    arch = str(cfg.get("model_type", ""))
    n = lambda k: _need(cfg, k, where)  # noqa: E731
    hidden, n_layers = n("hidden_size"), n("num_hidden_layers")
    if hidden == 0 or n_layers == 0:
        raise ConfigError(f"{where}: hidden_size and num_hidden_layers must be positive")
    n_experts = cfg.get("n_routed_experts", cfg.get("num_experts", cfg.get("num_local_experts"))) or 0
    if not n_experts:  # a dense model (llama, qwen2, qwen3): every layer's MLP is a dense FFN
        dense = tuple(range(n_layers))
    elif "mlp_layer_types" in cfg and cfg["mlp_layer_types"]:
        dense = tuple(i for i, t in enumerate(cfg["mlp_layer_types"]) if t == "dense")
    elif arch == "qwen3_moe" or "decoder_sparse_step" in cfg:
        step = cfg.get("decoder_sparse_step", 1) or 1
        only = set(cfg.get("mlp_only_layers") or [])
        dense = tuple(i for i in range(n_layers) if i in only or (i + 1) % step != 0)
    else:
        k = cfg.get("first_k_dense_replace", 0) or 0
        freq = cfg.get("moe_layer_freq", 1) or 1
        dense = tuple(i for i in range(n_layers) if i < k or i % freq != 0)
    mla = "kv_lora_rank" in cfg and cfg.get("kv_lora_rank")
    heads = n("num_attention_heads")
    common = dict(
        name=name or cfg.get("_name_or_path", arch) or arch, arch=arch, hidden=hidden, n_layers=n_layers,
        vocab=n("vocab_size"), dense_layers=dense, n_experts=int(n_experts),
        top_k=n("num_experts_per_tok") if n_experts else 0, moe_inter=n("moe_intermediate_size") if n_experts else 0,
        dense_inter=n("intermediate_size") if not n_experts else int(cfg.get("intermediate_size") or 0),
        n_shared=int(cfg.get("n_shared_experts") or 0), n_heads=heads,
        router_bias=arch != "qwen3_moe",
        mtp_layers=int(cfg.get("num_nextn_predict_layers", cfg.get("num_mtp_layers", 0)) or 0),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_context=int(cfg.get("max_position_embeddings") or 0),
        native_dtype="FP8" if cfg.get("quantization_config", {}).get("quant_method") == "fp8" else "BF16",
    )
    if arch == "qwen3_moe":
        common["mtp_layers"] = 0
    if mla:
        idx_heads = int(cfg.get("index_n_heads") or 0)
        if idx_heads:
            types = cfg.get("indexer_types")
            if not types:
                freq = max(int(cfg.get("index_topk_freq", 1) or 1), 1)
                off = int(cfg.get("index_skip_topk_offset", 2))
                types = ["full" if max(i - off + 1, 0) % freq == 0 else "shared" for i in range(n_layers)]
            indexer_layers = tuple(i for i, t in enumerate(types) if t == "full")
        else:
            indexer_layers = ()
        spec = ModelSpec(
            **common, attention="mla", n_kv_heads=heads, q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            kv_lora_rank=n("kv_lora_rank"), qk_nope=n("qk_nope_head_dim"), qk_rope=n("qk_rope_head_dim"),
            v_head=n("v_head_dim"), index_heads=idx_heads, index_head_dim=int(cfg.get("index_head_dim") or 0),
            index_topk=int(cfg.get("index_topk") or 0), indexer_layers=indexer_layers, **(meta or {}))
    else:
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        spec = ModelSpec(
            **common, attention="gqa", n_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),  # qwen2's qkv bias has no key
            qk_norm=bool(cfg.get("use_qk_norm", arch in ("qwen3_moe", "qwen3"))), **(meta or {}))
    if spec.top_k > spec.n_experts:
        raise ConfigError(f"{where}: num_experts_per_tok {spec.top_k} > number of experts {spec.n_experts}")
    return spec


def from_catalog(name: str) -> ModelSpec:
    key, entry = catalog.lookup(name)
    meta = {k: entry[k] for k in ("source", "hf_repo", "fp8_repo", "published_total", "published_active")}
    spec = from_hf_config(entry["config"], name=key, where=f"catalog:{key}", meta=meta)
    if key in ("deepseek-v3", "kimi-k2"):
        spec = _replace(spec, native_dtype="FP8")
    return spec


def _gguf_magic(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:  # (the first 4 bytes, not the whole file)
        return f.read(4) == b"GGUF"


def _replace(spec: ModelSpec, **kw) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, **kw)


def load_model(ref: str | Path | GGUFFile) -> ModelSpec:
    """A catalog name, a config.json, a checkpoint directory holding one, or a .gguf file (or one already open:
    the loader's, whose header is then not parsed again)."""
    if isinstance(ref, GGUFFile) or str(ref).endswith(".gguf") or _gguf_magic(Path(ref)):
        from .gguf_meta import spec_from_gguf

        return spec_from_gguf(ref)
    path = Path(ref)
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{ref}: directory has no config.json")
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        name = path.parent.name if path.name == "config.json" else path.stem
        return from_hf_config(cfg, name=name, where=str(path))
    return from_catalog(str(ref))


# ---- parameter counts per tensor group ---------------------------------------------------------

def attention_params(s: ModelSpec) -> int:
    """Attention projections of one layer (without the DSA indexer and the layer norms)."""
    h = s.hidden
    if s.attention == "mla":
        qk = s.qk_nope + s.qk_rope
        q = h * s.q_lora_rank + s.q_lora_rank + s.q_lora_rank * s.n_heads * qk if s.q_lora_rank else h * s.n_heads * qk
        kv = h * (s.kv_lora_rank + s.qk_rope) + s.kv_lora_rank + s.kv_lora_rank * s.n_heads * (s.qk_nope + s.v_head)
        return q + kv + s.n_heads * s.v_head * h
    q, kv = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
    p = h * q + 2 * h * kv + q * h
    if s.attention_bias:
        p += q + 2 * kv
    if s.qk_norm:
        p += 2 * s.head_dim
    return p


def indexer_params(s: ModelSpec) -> int:
    if not s.index_heads:
        return 0
    d = s.index_head_dim
    return s.q_lora_rank * s.index_heads * d + s.hidden * d + 2 * d + s.hidden * s.index_heads


def expert_params(s: ModelSpec) -> int:
    """One routed expert: gate, up and down projections."""
    return 3 * s.hidden * s.moe_inter


def router_params(s: ModelSpec) -> int:
    return s.n_experts * s.hidden + (s.n_experts if s.router_bias else 0)


def mtp_extra_params(s: ModelSpec) -> int:
    """What an MTP module adds beyond one decoder layer: enorm, hnorm, eh_proj, head norm
    (embeddings and lm_head are shared with the main model)."""
    return 3 * s.hidden + 2 * s.hidden * s.hidden


def layer_params(s: ModelSpec, layer: int, with_indexer: bool | None = None) -> dict[str, int]:
    has_idx = (layer in s.indexer_layers) if with_indexer is None else with_indexer
    out = {"attention": attention_params(s) + (indexer_params(s) if has_idx else 0), "norms": 2 * s.hidden}
    if layer in s.dense_layers:
        out["dense_ffn"] = 3 * s.hidden * s.dense_inter
    else:
        out["router"] = router_params(s)
        out["shared_experts"] = s.n_shared * expert_params(s)
        out["routed_experts"] = s.n_experts * expert_params(s)
    return out


def param_counts(s: ModelSpec, with_mtp: bool = False) -> dict[str, int]:
    """Parameters per tensor class for the whole model."""
    out = {c: 0 for c in ("embeddings", "attention", "norms", "router", "dense_ffn", "shared_experts",
                          "routed_experts", "lm_head", "mtp")}
    out["embeddings"] = s.vocab * s.hidden
    out["lm_head"] = 0 if s.tie_embeddings else s.vocab * s.hidden
    out["norms"] = s.hidden  # final norm
    for i in range(s.n_layers):
        for k, v in layer_params(s, i).items():
            out[k] += v
    if with_mtp and s.mtp_layers:
        one = sum(layer_params(s, s.n_layers, with_indexer=bool(s.index_heads)).values()) + mtp_extra_params(s)
        out["mtp"] = s.mtp_layers * one
    return out


def total_params(s: ModelSpec, with_mtp: bool = False) -> int:
    return sum(param_counts(s, with_mtp).values())


def active_params(s: ModelSpec) -> int:
    """Parameters read per token: everything but the routed experts and the embedding table
    (one row per token), plus top_k routed experts per MoE layer."""
    c = param_counts(s)
    return (sum(c.values()) - c["routed_experts"] - c["embeddings"]
            + len(s.moe_layers) * s.top_k * expert_params(s))


# ---- KV cache ------------------------------------------------------------------------------------

def kv_bytes_per_token(s: ModelSpec, layer: int, kv_dtype_bytes: float = 2.0) -> float:
    """KV cache bytes one token adds in one layer: MLA latent + rope key, DSA indexer key on
    layers that run their own indexer, or GQA K and V."""
    if s.attention == "mla":
        b = (s.kv_lora_rank + s.qk_rope) * kv_dtype_bytes
        if s.index_heads and (layer in s.indexer_layers or layer >= s.n_layers):
            b += s.index_head_dim * kv_dtype_bytes
        return b
    return 2 * s.n_kv_heads * s.head_dim * kv_dtype_bytes


def index_key_bytes_per_token(s: ModelSpec, layer: int, kv_dtype_bytes: float = 2.0) -> float:
    """DSA indexer key bytes one token adds in one layer (0 on layers that share another's selection)."""
    if s.attention == "mla" and s.index_heads and (layer in s.indexer_layers or layer >= s.n_layers):
        return s.index_head_dim * kv_dtype_bytes
    return 0.0


def sparse_kv(s: ModelSpec) -> bool:
    """DSA: attention reads only index_topk selected rows of the latent cache, so that cache can live in RAM."""
    return s.attention == "mla" and s.index_heads > 0 and s.index_topk > 0


def latent_row_bytes(s: ModelSpec, kv_dtype_bytes: float = 2.0) -> float:
    """One cached position of the MLA latent + rope key."""
    return (s.kv_lora_rank + s.qk_rope) * kv_dtype_bytes


def kv_row_move_bytes(s: ModelSpec, position: int, kv_dtype_bytes: float = 2.0) -> float:
    """Bytes one decode step copies RAM -> GPU in one layer whose latent cache lives in RAM: the selected rows,
    min(position, index_topk) of them."""
    return min(position, s.index_topk) * latent_row_bytes(s, kv_dtype_bytes) if sparse_kv(s) else 0.0


def kv_read_bytes(s: ModelSpec, layer: int, position: int, kv_dtype_bytes: float = 2.0) -> float:
    """KV bytes one decode step reads in one layer at a context position: DSA attends to index_topk
    latents but its indexer scans every key."""
    if s.attention == "mla" and s.index_heads:
        b = min(position, s.index_topk) * (s.kv_lora_rank + s.qk_rope) * kv_dtype_bytes
        if layer in s.indexer_layers:
            b += position * s.index_head_dim * kv_dtype_bytes
        return b
    return position * kv_bytes_per_token(s, layer, kv_dtype_bytes)
