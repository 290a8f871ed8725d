"""A GGUF's metadata dims against its tensor table, before a load allocates anything from them.

hf_config (offload.gguf.names) turns the metadata into a Hugging Face config; here its ModelArgs are checked
(offload.models.validate) and every tensor the architecture reads must have exactly the shape they imply,
looked up the way GGUFSource will serve it, plus the two GGUF-only layouts: routed experts stacked per layer
(`ffn_*_exps`) and MLA's kv_b split into `attn_k_b` / `attn_v_b`.
"""

from functools import partial
from types import SimpleNamespace

from offload.errors import WeightsError
from offload.gguf.names import EXPERTS, gguf_names
from offload.gguf.source import GGUFSource
from offload.models import architecture
from offload.models.validate import check_args, check_tensors, model_args


def _label(name: str) -> str:
    return f"{name} (GGUF {' or '.join(gguf_names(name)) or '-'})"


def _shape_error(where: str, name: str, got: tuple, want: tuple, what: str) -> WeightsError:
    return WeightsError(f"{where}: tensor {name} has shape {list(got)}, expected {list(want)} ({what}; "
                        "the metadata disagrees with the tensor)")


def _check_expert_groups(tensors: dict, where: str, prefix: str, layer: int, e: int, hid: int, inter: int) -> None:
    for part, rows, cols in (("gate", inter, hid), ("up", inter, hid), ("down", hid, inter)):
        name = f"blk.{layer}.{EXPERTS[part]}"
        info = tensors.get(name)
        if info is None:
            raise WeightsError(f"{where}: tensor {name} (routed experts of {prefix}) missing from the file")
        if info.np_shape != (e, rows, cols):
            raise _shape_error(where, name, info.np_shape, (e, rows, cols), "experts, rows, columns")


def _check_kv_b_parts(args, tensors: dict, where: str) -> None:
    """attn_k_b (h, c, n) and attn_v_b (h, v, c), which GGUFSource joins into kv_b_proj."""
    h, c, n, v = args.num_attention_heads, args.kv_lora_rank, args.qk_nope_head_dim, args.v_head_dim
    for i in range(args.num_hidden_layers):
        if f"blk.{i}.attn_kv_b.weight" in tensors:
            continue
        for name, want in ((f"blk.{i}.attn_k_b.weight", (h, c, n)), (f"blk.{i}.attn_v_b.weight", (h, v, c))):
            info = tensors.get(name)
            if info is not None and info.np_shape != want:
                raise _shape_error(where, name, info.np_shape, want, "heads, rows, columns")


def check_model(config: dict, tensors: dict, where: str) -> None:
    """ModelArgs from `config` are sane, and every tensor they imply is in `tensors` with that shape."""
    args = model_args(architecture(config["model_type"]), config, where)
    check_args(args, where)
    if hasattr(args, "kv_lora_rank"):
        _check_kv_b_parts(args, tensors, where)
    # a GGUFSource over the tensor table alone: has / shape resolve HF names exactly as the loader's will
    source = GGUFSource(SimpleNamespace(tensors=tensors, path=where))
    check_tensors(args, source, where, _label, partial(_check_expert_groups, tensors, where))
