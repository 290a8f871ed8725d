"""Where a DSA model's KV cache lives (PlanOptions.kv_home): "gpu" with each layer's attention, "ram" for the
latent + rope-key cache of every GPU layer (its indexer keys stay on the GPU; decode copies the selected rows), or
"auto", the home the cost model predicts faster. Models without DSA keep their KV with the attention."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from offload.errors import PlacementError

from . import cost
from .hardware import Hardware
from .inventory import KV_TENSORS
from .model import ModelSpec, index_key_bytes_per_token, kv_bytes_per_token, latent_row_bytes, sparse_kv

if TYPE_CHECKING:
    from .planner import Plan, PlanOptions

HOMES = ("auto", "gpu", "ram")


def check(home: str) -> None:
    if home not in HOMES:
        raise PlacementError(f"kv_home must be auto, gpu or ram, got {home!r}")


def latent_in_ram(spec: ModelSpec, hw: Hardware, opts: PlanOptions, notes: list[str] | None = None) -> bool:
    """kv_home "ram" moves the latent only for a DSA model on a GPU (a note says so otherwise)."""
    in_ram = opts.kv_home == "ram" and sparse_kv(spec) and bool(hw.gpus)
    if opts.kv_home == "ram" and not in_ram and notes is not None:
        notes.append("KV in RAM applies to DSA models on a GPU only: the KV stays with each layer's attention")
    return in_ram


def choose(spec: ModelSpec, hw: Hardware, quant, profile, opts: PlanOptions) -> Plan:
    """kv_home "auto": a DSA model on a GPU is planned both ways (decode only) and the faster home kept; ties keep
    the KV on the GPU. Everything else keeps its KV with the attention."""
    from .planner import plan  # (the planner calls this module from plan())

    if not (sparse_kv(spec) and hw.gpus):
        return plan(spec, hw, quant, profile, replace(opts, kv_home="gpu"))
    quick = replace(opts, full=False, strict=False)
    tok = {home: plan(spec, hw, quant, profile, replace(quick, kv_home=home)).prediction["decode_tok_s"]
           for home in ("gpu", "ram")}
    home = "ram" if tok["ram"] > tok["gpu"] else "gpu"
    p = plan(spec, hw, quant, profile, replace(opts, kv_home=home))
    p.kv_choice = tok
    p.notes.append(f"KV home chosen by the cost model: decode {tok['gpu']:.2f} tok/s with each layer's KV on its "
                   f"GPU, {tok['ram']:.2f} with the DSA latent cache in RAM (the selected rows copied each step): "
                   + ("latent in RAM" if home == "ram" else "KV on the GPU"))
    return p


def kv_summary(p: Plan) -> dict:
    """Where the KV lives and what that costs: bytes per device of the latent (+ rope key) cache and of the DSA
    indexer keys, the rows a decode step copies, and the longest context each home keeps all attention on the
    GPUs for (one pool of the GPUs' usable memory: contiguous layer splits may fit a little less)."""
    from .planner import os_margin

    spec, opts = p.spec, p.options
    latent: dict[str, int] = {}
    index: dict[str, int] = {}
    for it in p.items:
        for g in it.fixed:
            if g.tensor in KV_TENSORS:
                by = latent if g.tensor == "kv_cache" else index
                dev = g.device or p.homes[it.index]
                by[dev] = by.get(dev, 0) + int(round(g.bytes))
    lays = p.layouts()
    move = sum(lay.kv_move for lay in lays if lay.device.startswith("gpu")) * opts.concurrency
    out = {"home": "ram" if p.kv_ram else "gpu", "latent_bytes": latent, "index_key_bytes": index,
           "decode_row_move_bytes": int(move), "decode_row_move_s": sum(cost.kv_move_s(lay, p.hw, opts.concurrency)
                                                                        for lay in lays)}
    if not p.hw.gpus:
        return out
    usable = sum(max(g.memory_bytes - r, 0.0) for g, r in zip(p.hw.gpus, p.reserves))
    from .planner import head_gpu_bytes

    weights = sum(g.gpu_bytes for it in p.items for g in it.fixed if g.tensor not in KV_TENSORS) + \
        head_gpu_bytes(spec, p.emb, p.head)
    main = [it.index for it in p.items]
    seq = opts.concurrency
    per_tok = sum(kv_bytes_per_token(spec, i, opts.kv_dtype_bytes) for i in main) * seq
    out["max_context_kv_on_gpu"] = max(int((usable - weights) / per_tok), 0) if per_tok else None
    if sparse_kv(spec):
        idx_tok = sum(index_key_bytes_per_token(spec, i, opts.kv_dtype_bytes) for i in main) * seq
        out["max_context_latent_in_ram"] = max(int((usable - weights) / idx_tok), 0) if idx_tok else None
        ram_left = p.hw.ram_bytes - os_margin(p.hw, opts) - sum(
            n for c, n in p.usage()["cpu"].items() if c != "kv_cache")
        out["max_context_ram"] = max(int(ram_left / (len(main) * latent_row_bytes(spec, opts.kv_dtype_bytes) * seq)),
                                     0)
    return out
