"""What a plan does when the model does not fit: RAM too small (the status, the error and what would fit) and
the alternatives when the always-GPU set does not fit the GPUs (layers on the CPU, a harder attention quant, a
shorter context), each with its predicted decode speed."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from offload.errors import PlacementError

from . import kv_home
from .hardware import GiB, fmt_bytes
from .inventory import global_items, layer_items
from .model import expert_params

if TYPE_CHECKING:
    from .planner import Plan

HARDER_EXPERT_QUANTS = ("Q4_K", "IQ4_XS", "Q3_K", "Q2_K", "IQ2_XXS", "IQ1_S")


def check_ram(p: Plan) -> None:
    """Status and error when the CPU-resident weights do not fit RAM, with what would fit."""
    from .planner import cpu_resident_bytes, os_margin

    need = cpu_resident_bytes(p)
    margin = os_margin(p.hw, p.options)
    if need + margin <= p.hw.ram_bytes:
        return
    gpu_part = sum(sum(v.values()) for k, v in p.usage().items() if k != "cpu")
    fits = []
    for q in HARDER_EXPERT_QUANTS:
        if q == p.quant.types.get("routed_experts"):
            continue
        alt = replace(p.quant, types={**p.quant.types, "routed_experts": q}, measured={
            k: v for k, v in p.quant.measured.items() if k != "routed_experts"},
            mix={k: v for k, v in p.quant.mix.items() if k != "routed_experts"})
        n_exp = sum(len(it.freq) for it in p.items) * expert_params(p.spec)
        delta = n_exp * (alt.bytes_per_weight("routed_experts") * alt.cpu_growth("routed_experts")
                         - p.quant.bytes_per_weight("routed_experts") * p.quant.cpu_growth("routed_experts"))
        if delta < 0 and need + delta + margin <= p.hw.ram_bytes:
            fits.append(f"routed experts at {q} ({fmt_bytes(need + delta)} in RAM)")
            break
    step = 64 * GiB if need + margin > 64 * GiB else GiB  # a size people buy or can free
    ram_needed = int(np.ceil((need + margin) / step) * step)
    msg = (f"RAM too small: {fmt_bytes(need)} of CPU-resident weights + {fmt_bytes(margin)} OS margin > "
           f"{fmt_bytes(p.hw.ram_bytes)} RAM ({fmt_bytes(gpu_part)} already on GPU); would fit with "
           + " or ".join(fits + [f"{fmt_bytes(ram_needed)} RAM"]))
    p.status, p.error = "does_not_fit_ram", msg
    if p.options.strict:
        raise PlacementError(msg)


def fallbacks(spec, hw, quant, profile, opts, usable, k) -> list[dict]:
    """Alternatives when the always-GPU set does not fit, with numbers."""
    from .planner import _fit, head_gpu_bytes, plan  # (the planner calls this module from plan())

    out = [{"option": "layers_on_cpu", "applied": True, "layers": k,
            "detail": f"run the first {k} layers wholly on the CPU (attention too): the decode prediction above"}]
    changed = ("attention", "dense_ffn", "shared_experts", "lm_head")
    harder = replace(quant, types={**quant.types, **{c: "Q4_K" for c in changed}},
                     measured={c: v for c, v in quant.measured.items() if c not in changed},
                     mix={c: m for c, m in quant.mix.items() if c not in changed},
                     layers={c: m for c, m in quant.layers.items() if c not in changed},
                     cpu_layers={c: m for c, m in quant.cpu_layers.items() if c not in changed})
    kv_ram = kv_home.latent_in_ram(spec, hw, opts)
    items = layer_items(spec, harder, profile, opts.context, opts.concurrency, opts.mtp, opts.kv_dtype_bytes, kv_ram)
    emb, head = global_items(spec, harder)
    k2, _, _ = _fit(items, head_gpu_bytes(spec, emb, head), usable)
    quick = replace(opts, full=False, strict=False)
    tok = plan(spec, hw, harder, profile, quick).prediction["decode_tok_s"]
    out.append({"option": "harder_attention_quant", "applied": False,
                "always_gpu_bytes": int(sum(it.fixed_bytes for it in items) + head_gpu_bytes(spec, emb, head)),
                "decode_tok_s": tok,
                "detail": "attention, dense, shared experts and lm_head at Q4_K: "
                          + ("the always-GPU set fits" if k2 == 0 else f"still {k2} layers on the CPU")
                          + f", decode {tok:.2f} tok/s"})
    ctx = opts.context
    while ctx > 1024:
        ctx //= 2
        items = layer_items(spec, quant, profile, ctx, opts.concurrency, opts.mtp, opts.kv_dtype_bytes, kv_ram)
        emb, head = global_items(spec, quant)
        if _fit(items, head_gpu_bytes(spec, emb, head), usable)[0] == 0:
            tok = plan(spec, hw, quant, profile, replace(quick, context=ctx)).prediction["decode_tok_s"]
            out.append({"option": "shorter_context", "applied": False, "context": ctx, "decode_tok_s": tok,
                        "detail": f"context {ctx} tokens: the always-GPU set fits, decode {tok:.2f} tok/s"})
            break
    else:
        out.append({"option": "shorter_context", "applied": False, "context": None,
                    "detail": "even a 1k-token context leaves the always-GPU set too big"})
    return out
