"""Check a model's config against the tensors its file holds before anything is allocated from it.

Every size a load allocates (RoPE tables, caches, per-layer lists, expert lists) comes from ModelArgs, and a
corrupt config.json or GGUF metadata could otherwise ask for gigabytes before the first tensor read fails.
So: raw config values are typed and the layer count bounded (check_config, before ModelArgs.from_config),
the relations the forward pass relies on hold (check_args), and every tensor the architecture reads is in
the file with exactly the shape the args imply (check_tensors), in the order the model reads them.
"""

import math
from collections.abc import Callable

from offload.errors import ConfigError, WeightsError

# config.json keys the architectures read as counts / sizes; None means "not set" throughout
_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts",
         "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "n_group", "topk_group",
         "first_k_dense_replace", "decoder_sparse_step", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
         "qk_rope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk", "index_topk_freq",
         "index_skip_topk_offset", "max_position_embeddings", "num_nextn_predict_layers", "num_mtp_layers")
_FLOATS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor", "routed_scaling_factor")
_LISTS = ("mlp_only_layers", "indexer_types", "mlp_layer_types")
_DICTS = ("rope_parameters", "rope_scaling", "quantization_config")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_config(config: dict, n_tensors: int, where: str) -> None:
    """Types of the raw config values, and a layer count no larger than the file's tensor count: from_config
    builds per-layer lists, so a forged num_hidden_layers must stop here."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(config).__name__}")
    for key in _INTS:
        v = config.get(key)
        if v is not None and not (_is_int(v) and v >= 0):
            raise ConfigError(f"{where}: {key} = {v!r}, expected a non-negative integer")
    for key in _FLOATS:
        v = config.get(key)
        if v is not None and not _is_number(v):
            raise ConfigError(f"{where}: {key} = {v!r}, expected a finite number")
    for key, kind in [(k, list) for k in _LISTS] + [(k, dict) for k in _DICTS]:
        v = config.get(key)
        if v is not None and not isinstance(v, kind):
            raise ConfigError(f"{where}: {key} = {v!r}, expected a JSON {'array' if kind is list else 'object'}")
    if config.get("num_attention_heads") == 0:  # a divisor in from_config
        raise ConfigError(f"{where}: num_attention_heads = 0, expected at least 1")
    layers = config.get("num_hidden_layers")
    if layers is not None and layers > n_tensors:
        raise ConfigError(f"{where}: num_hidden_layers = {layers}, but the weights hold only {n_tensors} tensors")


def model_args(arch, config: dict, where: str):
    """arch.ModelArgs.from_config, with a bad value in a key check_config does not know as a ConfigError."""
    try:
        return arch.ModelArgs.from_config(config)
    except (TypeError, ValueError, ArithmeticError, KeyError, AttributeError, IndexError) as exc:
        raise ConfigError(f"{where}: {type(exc).__name__}: {exc}") from None


def _at_least(where: str, a, minimum: int, *names: str) -> None:
    for name in names:
        v = getattr(a, name)
        if not _is_int(v) or v < minimum:
            raise ConfigError(f"{where}: {name} = {v!r}, expected an integer >= {minimum}")


def _check_rope(where: str, a) -> None:
    params = a.rope
    theta = params.get("rope_theta")
    if not _is_number(theta) or theta <= 0:
        raise ConfigError(f"{where}: rope_theta = {theta!r}, expected a positive number")
    if params.get("rope_type", "default") != "yarn":
        return  # build_rope names any other unsupported type itself
    original = params.get("original_max_position_embeddings")
    if not _is_int(original) or original < 1:
        raise ConfigError(f"{where}: yarn original_max_position_embeddings = {original!r}, expected an integer >= 1")
    for key in ("factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
        v = params.get(key)
        if v is not None and not (_is_number(v) and (v > 0 or key.startswith("mscale") and v >= 0)):
            raise ConfigError(f"{where}: yarn {key} = {v!r}, expected a positive number")
    if params.get("mscale_all_dim") and params.get("factor") is None:
        raise ConfigError(f"{where}: yarn with mscale_all_dim needs 'factor'")


def _check_routing(where: str, a, n_experts: int) -> None:
    k = a.num_experts_per_tok
    if k > n_experts:
        raise ConfigError(f"{where}: num_experts_per_tok = {k} is more than the {n_experts} experts")
    if not hasattr(a, "n_group"):  # softmax routing over all experts
        return
    groups = a.n_group
    _at_least(where, a, 1, "n_group", "topk_group")
    if n_experts % groups or a.topk_group > groups:
        raise ConfigError(f"{where}: {n_experts} experts in n_group = {groups} groups, topk_group = "
                          f"{a.topk_group}: expected groups that divide the experts and topk_group <= n_group")
    if a.topk_group < groups and n_experts // groups < 2:  # groups are scored by their best two experts
        raise ConfigError(f"{where}: n_group = {groups} leaves fewer than 2 experts per group")


def check_args(args, where: str) -> None:
    """Sizes are positive and consistent with each other where no tensor shape pins them (RoPE dims, head
    groups, routing): what the forward pass would otherwise fail on deep inside torch."""
    a = args
    moe = hasattr(a, "num_experts") or hasattr(a, "n_routed_experts")  # else dense: an MLP in every layer
    _at_least(where, a, 1, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "max_position_embeddings", *(("moe_intermediate_size", "num_experts_per_tok") if moe else ()))
    _at_least(where, a, 0 if moe else 1, "intermediate_size")
    if not _is_number(a.rms_norm_eps) or a.rms_norm_eps < 0:
        raise ConfigError(f"{where}: rms_norm_eps = {a.rms_norm_eps!r}, expected a non-negative number")
    _check_rope(where, a)
    if hasattr(a, "kv_lora_rank"):  # MLA
        _at_least(where, a, 1, "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
        _at_least(where, a, 0, "qk_nope_head_dim")
        if a.q_lora_rank is not None:
            _at_least(where, a, 0, "q_lora_rank")
        rotary = a.qk_rope_head_dim
    else:  # GQA
        _at_least(where, a, 1, "num_key_value_heads", "head_dim")
        if a.num_attention_heads % a.num_key_value_heads:
            raise ConfigError(f"{where}: num_attention_heads = {a.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads = {a.num_key_value_heads}")
        partial = getattr(a, "partial_rotary_factor", 1.0)
        if not _is_number(partial) or not 0 < partial <= 1:
            raise ConfigError(f"{where}: partial_rotary_factor = {partial!r}, expected a number in (0, 1]")
        rotary = int(a.head_dim * partial)
    if rotary < 2 or rotary % 2:
        raise ConfigError(f"{where}: {rotary} rotary dims per head, expected an even number >= 2")
    if hasattr(a, "indexer_types"):  # DSA: the indexer reads the q LoRA residual and rotates its first dims
        _at_least(where, a, 1, "q_lora_rank", "index_n_heads", "index_head_dim", "index_topk")
        if a.index_head_dim < a.qk_rope_head_dim:
            raise ConfigError(f"{where}: index_head_dim = {a.index_head_dim} is smaller than qk_rope_head_dim "
                              f"= {a.qk_rope_head_dim}")
    if moe:
        n_experts = a.num_experts if hasattr(a, "num_experts") else a.n_routed_experts
        _at_least(where, a, 1, "num_experts" if hasattr(a, "num_experts") else "n_routed_experts")
        _check_routing(where, a, n_experts)
    if hasattr(a, "first_k_dense_replace"):
        _at_least(where, a, 0, "first_k_dense_replace", *(["n_shared_experts"] if a.n_shared_experts else []))
    mtp = getattr(a, "num_nextn_predict_layers", 0)
    if not _is_int(mtp) or not 0 <= mtp <= a.num_hidden_layers:  # each is named in the loaded model
        raise ConfigError(f"{where}: num_nextn_predict_layers = {mtp!r}, expected 0..{a.num_hidden_layers}")


# -- the tensors each architecture reads ---------------------------------------------------------------------

def _gqa(p: str, a, qk_norm: bool) -> list:
    h, kv, d, hid = a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.hidden_size
    out = [(f"{p}.q_proj.weight", (h * d, hid)), (f"{p}.k_proj.weight", (kv * d, hid)),
           (f"{p}.v_proj.weight", (kv * d, hid)), (f"{p}.o_proj.weight", (hid, h * d))]
    if a.attention_bias:
        out += [(f"{p}.q_proj.bias", (h * d,)), (f"{p}.k_proj.bias", (kv * d,)), (f"{p}.v_proj.bias", (kv * d,))]
    if getattr(a, "o_bias", False):  # llama / qwen3 with attention_bias
        out += [(f"{p}.o_proj.bias", (hid,))]
    if qk_norm:
        out += [(f"{p}.q_norm.weight", (d,)), (f"{p}.k_norm.weight", (d,))]
    return out


def _mla(p: str, a) -> list:
    h, hid, n, r, v, c = (a.num_attention_heads, a.hidden_size, a.qk_nope_head_dim, a.qk_rope_head_dim,
                          a.v_head_dim, a.kv_lora_rank)
    lora, bias = a.q_lora_rank, a.attention_bias
    out = []
    if lora:
        out += [(f"{p}.q_a_proj.weight", (lora, hid))] + ([(f"{p}.q_a_proj.bias", (lora,))] if bias else [])
        out += [(f"{p}.q_a_layernorm.weight", (lora,)), (f"{p}.q_b_proj.weight", (h * (n + r), lora))]
    else:
        out += [(f"{p}.q_proj.weight", (h * (n + r), hid))]
    out += [(f"{p}.kv_a_proj_with_mqa.weight", (c + r, hid))] + ([(f"{p}.kv_a_proj_with_mqa.bias", (c + r,))]
                                                                  if bias else [])
    out += [(f"{p}.kv_a_layernorm.weight", (c,)), (f"{p}.kv_b_proj.weight", (h * (n + v), c)),
            (f"{p}.o_proj.weight", (hid, h * v))] + ([(f"{p}.o_proj.bias", (hid,))] if bias else [])
    return out


def _indexer(p: str, a) -> list:
    i, d, hid = a.index_n_heads, a.index_head_dim, a.hidden_size
    return [(f"{p}.wq_b.weight", (i * d, a.q_lora_rank)), (f"{p}.wk.weight", (d, hid)),
            (f"{p}.k_norm.weight", (d,)), (f"{p}.k_norm.bias", (d,)), (f"{p}.weights_proj.weight", (i, hid))]


def _mlp(p: str, hid: int, inter: int) -> list:
    return [(f"{p}.gate_proj.weight", (inter, hid)), (f"{p}.up_proj.weight", (inter, hid)),
            (f"{p}.down_proj.weight", (hid, inter))]


def _layer(a, i: int) -> tuple[list, list, list, tuple | None]:
    """Layer i's tensors read before its routed experts, after them, its two norms (read last), and the
    experts (prefix, layer, E, H, I) or None for a dense layer: the order the model reads them in."""
    p, hid = f"model.layers.{i}", a.hidden_size
    if hasattr(a, "indexer_types"):  # glm_moe_dsa
        attn = (_indexer(f"{p}.self_attn.indexer", a) if a.indexer_types[i] == "full" else []) + \
            _mla(f"{p}.self_attn", a)
        sparse = a.mlp_layer_types[i] == "sparse"
    elif hasattr(a, "kv_lora_rank"):  # deepseek_v3
        attn, sparse = _mla(f"{p}.self_attn", a), i >= a.first_k_dense_replace
    elif hasattr(a, "use_qk_norm"):  # glm4_moe
        attn, sparse = _gqa(f"{p}.self_attn", a, a.use_qk_norm), i >= a.first_k_dense_replace
    elif not hasattr(a, "num_experts"):  # dense: llama, qwen2, qwen3
        attn, sparse = _gqa(f"{p}.self_attn", a, a.qk_norm), False
    else:  # qwen3_moe
        attn, sparse = _gqa(f"{p}.self_attn", a, True), a.is_moe_layer(i)
    norms = [(f"{p}.input_layernorm.weight", (hid,)), (f"{p}.post_attention_layernorm.weight", (hid,))]
    if not sparse:
        return attn + _mlp(f"{p}.mlp", hid, a.intermediate_size), [], norms, None
    e = a.num_experts if hasattr(a, "num_experts") else a.n_routed_experts
    router = [(f"{p}.mlp.gate.weight", (e, hid))]
    after = []
    if not hasattr(a, "num_experts"):  # noaux_tc router bias, shared experts
        router.append((f"{p}.mlp.gate.e_score_correction_bias", (e,)))
        if a.n_shared_experts:
            after = _mlp(f"{p}.mlp.shared_experts", hid, a.moe_intermediate_size * a.n_shared_experts)
    return attn + router, after, norms, (f"{p}.mlp.experts", i, e, hid, a.moe_intermediate_size)


def _hf_experts(source, where: str, label: Callable[[str], str]) -> Callable:
    """Experts as a Hugging Face checkpoint stores them: stacked per layer, or one set of matrices each."""
    def check(prefix: str, layer: int, e: int, hid: int, inter: int) -> None:
        if source.has(f"{prefix}.gate_up_proj"):
            want = [(f"{prefix}.gate_up_proj", (e, 2 * inter, hid)), (f"{prefix}.down_proj", (e, hid, inter))]
        else:
            want = [t for j in range(e) for t in _mlp(f"{prefix}.{j}", hid, inter)]
        _check_shapes(source, want, where, label)
    return check


def _check_shapes(source, want: list, where: str, label: Callable[[str], str]) -> None:
    for name, shape in want:
        if not source.has(name):
            raise WeightsError(f"{where}: tensor {label(name)} missing (expected shape {list(shape)})")
        got = tuple(source.shape(name))
        if got != tuple(shape):
            raise WeightsError(f"{where}: tensor {label(name)} has shape {list(got)}, expected {list(shape)}")


def check_tensors(args, source, where: str, label: Callable[[str], str] = str,
                  experts: Callable | None = None) -> None:
    """Every tensor the architecture reads is in `source` (has / shape by HF name) with exactly the shape
    `args` implies. `experts(prefix, layer, E, H, I)` checks one layer's routed experts (default: HF names)."""
    experts = experts or _hf_experts(source, where, label)
    for i in range(args.num_hidden_layers):
        before, after, norms, moe = _layer(args, i)
        _check_shapes(source, before, where, label)
        if moe is not None:
            experts(*moe)
        _check_shapes(source, after + norms, where, label)
    v, hid = args.vocab_size, args.hidden_size
    head = [("lm_head.weight", (v, hid))] if not args.tie_word_embeddings or source.has("lm_head.weight") else []
    _check_shapes(source, [("model.embed_tokens.weight", (v, hid)), ("model.norm.weight", (hid,))] + head,
                  where, label)
