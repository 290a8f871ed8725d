"""Plan outputs: the JSON contract the runtime consumes, and the table / markdown views of it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from offload.errors import ConfigError

from . import model as M
from .hardware import GB, fmt_bytes
from .kv_home import kv_summary
from .planner import Plan
from .recipe import llama_cpp_args

FORMAT = "offload.plan"
REQUIRED = ("model", "hardware", "devices", "placement", "prediction")


def to_json(p: Plan) -> dict:
    spec = p.spec
    counts = M.param_counts(spec, p.options.mtp)
    classes = {c: {"params": n, "quant": p.quant.label(c), "bytes": int(n * p.quant.bytes_per_weight(c))}
               for c, n in counts.items() if n}
    hw = p.hw.to_json()
    hw.pop("format", None)
    hw.pop("version", None)
    return {
        "format": FORMAT, "version": 1, "status": p.status, "error": p.error, "notes": list(p.notes),
        "model": {"name": spec.name, "arch": spec.arch, "source": spec.source, "hf_repo": spec.hf_repo,
                  "total_params": M.total_params(spec, p.options.mtp), "active_params": M.active_params(spec),
                  "n_layers": spec.n_layers, "moe_layers": len(spec.moe_layers), "n_experts": spec.n_experts,
                  "top_k": spec.top_k, "expert_params": M.expert_params(spec), "classes": classes},
        "quant": p.quant.to_json(),
        "options": {"context": p.options.context, "concurrency": p.options.concurrency, "mtp": p.options.mtp,
                    "decode_position": p.options.decode_position, "kv_home": p.options.kv_home},
        "kv": kv_summary(p) | ({"choice_decode_tok_s": p.kv_choice} if p.kv_choice else {}),
        "routing": {"uniform": p.profile.uniform, "source": p.profile.source, "n_tokens": p.profile.n_tokens},
        "hardware": hw,
        "devices": p.devices(),
        "placement": p.entries(),
        "prediction": p.prediction,
        "fallbacks": p.fallbacks,
        "sweep": p.sweep,
        "llama_cpp": llama_cpp_args(p),
        "distributed": p.recipe,
    }


def load_plan(path: str | Path) -> dict:
    """Read a plan JSON written by `offload plan --format json` and check the contract's keys."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read plan JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ConfigError(f"{path}: not an offload plan (expected \"format\": \"{FORMAT}\")")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ConfigError(f"{path}: plan is missing {', '.join(missing)}")
    return d


def placement_map(d: dict) -> dict[tuple, str]:
    """(tensor, layer, expert) -> device, from a plan dict."""
    return {(e["tensor"], e["layer"], e["expert"]): e["device"] for e in d["placement"]}


# ---- human views: a list of blocks rendered as rich tables or markdown ----------------------------

def _p(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f}"


def hardware_line(d: dict) -> str:
    hw = d["hardware"]
    gpus = ", ".join(f"{g['name']} {fmt_bytes(g['memory_bytes'])} ({g['mem_bw'] / GB:.0f} GB/s)"
                     for g in hw["gpus"])
    gpus = f"{len(hw['gpus'])}x GPU [{gpus}]" if gpus else "no GPU"
    return (f"{gpus}; RAM {fmt_bytes(hw['ram_bytes'])}; DRAM {hw['dram_bw'] / GB:.0f} GB/s; "
            f"PCIe {hw['pcie_bw'] / GB:.0f} GB/s; {hw['cpu_cores']} cores ({hw['cpu_model']})")


def blocks(d: dict) -> list[tuple]:
    """("title", text) paragraphs and ("table", title, headers, rows) tables."""
    m, pred = d["model"], d["prediction"]
    out: list[tuple] = []
    shape = f"{m['n_experts']} experts top-{m['top_k']}" if m["n_experts"] else "dense"
    out.append(("title", f"offload plan: {m['name']}  ({_p(m['total_params'])} params, {_p(m['active_params'])} "
                         f"active; {m['n_layers']} layers, {shape})"))
    src = d["hardware"]["source"]
    how = {"flags": "given by flags", "probe": "from `offload probe`", "detected": "detected on this machine",
           "probe+flags": "from `offload probe`, changed by flags",
           "detected+flags": "detected on this machine, changed by flags"}.get(src, src)
    out.append(("text", f"Hardware ({how}): {hardware_line(d)}. Change with --gpu 24GiB (repeat for two GPUs) "
                        "--ram 512GiB --dram-bw 300GB/s --pcie-bw 25GB/s, or measure with `offload probe`."))
    out.append(("text", f"Status: {d['status']}" + (f" — {d['error']}" if d["error"] else "")
                        + f". Context {d['options']['context']} tokens x {d['options']['concurrency']} sequence(s)."))
    if d.get("kv"):
        out.append(("text", kv_line(d)))
    devs = d["devices"]
    classes = [c for c in M.CLASSES if any(c in dv["by_class"] for dv in devs)]
    rows = [[c] + [_gb(dv["by_class"].get(c, 0)) for dv in devs] for c in classes]
    rows.append(["total used"] + [_gb(dv["used_bytes"]) for dv in devs])
    rows.append(["budget"] + [_gb(dv["budget_bytes"]) for dv in devs])
    out.append(("table", "Memory per device (GiB)", ["class"] + [dv["name"] for dv in devs], rows))
    crows = [[c, _p(v["params"]), v["quant"], _gb(v["bytes"])] for c, v in m["classes"].items()]
    out.append(("table", "Model tensor classes", ["class", "params", "quant", "GiB"], crows))
    pf, pc, ps = pred.get("prefill_tok_s", {}), pred.get("prefill_tok_s_cpu_only", {}), pred.get(
        "prefill_tok_s_stream_all") or {}
    prow = [
        ["decode tok/s (attention, then shared + GPU experts beside the CPU experts)", f"{pred['decode_tok_s']:.2f}"],
        ["decode tok/s (not overlapped)", f"{pred['decode_tok_s_serial']:.2f}"],
        ["decode tok/s if two sequences pipelined (max of GPU, CPU)", f"{pred.get('decode_tok_s_pipelined', 0):.2f}"],
        ["decode tok/s at llama.cpp's efficiency (63 %)", f"{pred['decode_tok_s_at_llama_cpp_efficiency']:.2f}"],
        ["roofline decode tok/s (fraction reached)",
         f"{pred['roofline_decode_tok_s']:.2f} ({pred['roofline_fraction']:.0%})"],
        ["CPU bytes read per token (experts, CPU layers)", fmt_bytes(pred["cpu_bytes_per_token"])],
        ["routed experts on GPU / in RAM", f"{pred['gpu_experts']} / {pred['cpu_experts']}"],
    ]
    for n in ("1024", "8192"):
        if n in pf:
            extra = f" (CPU only {pc[n]:.0f}" + (f", stream all {ps[n]:.0f})" if ps else ")")
            prow.append([f"prefill tok/s, {int(n) // 1024}k-token prompt", f"{pf[n]:.0f}{extra}"])
    if pred.get("prefill_crossover_tokens_per_expert"):
        prow.append(["prefill crossover: stream an expert over PCIe above",
                     f"{pred['prefill_crossover_tokens_per_expert']:.0f} tokens/expert "
                     f"(~{pred['prefill_crossover_prompt_tokens']} prompt tokens)"])
        by_layer = pred.get("prefill_crossover_prompt_tokens_by_layer") or {}
        if by_layer:
            prow.append(["prefill: CPU experts streamed to the GPU from (prompt tokens, per layer)",
                         _layer_runs(by_layer)])
    if "load_time_s" in pred:
        prow.append(["cold load time", f"{pred['load_time_s']:.0f} s"])
    out.append(("table", "Predictions", ["", "value"], prow))
    if d["sweep"]:
        best = d["sweep"][-1]
        have = sum(g["memory_bytes"] for g in d["hardware"]["gpus"])
        more = ""
        if have:
            xs = [s["gpu_bytes"] for s in d["sweep"]]
            ys = [s["decode_tok_s"] for s in d["sweep"]]
            more = (f"twice this GPU memory ({_gb(2 * have)} GiB) gives about "
                    f"{float(np.interp(2 * have, xs, ys)):.1f} tok/s; ")
        out.append(("text", f"What more GPU memory buys: {more}everything on one GPU of this kind "
                            f"({_gb(best['gpu_bytes'])} GiB) gives {best['decode_tok_s']:.1f} tok/s. "
                            "More RAM bandwidth helps every layer: decode scales with --dram-bw while the CPU "
                            "part dominates."))
    if d["notes"]:
        out.append(("list", "Notes", d["notes"]))
    if d["fallbacks"]:
        out.append(("list", "Fallbacks (always-GPU set does not fit)",
                    [("[applied] " if f["applied"] else "") + f["detail"] for f in d["fallbacks"]]))
    lc = d["llama_cpp"]
    simpler = (["# or, simpler: " + lc["n_cpu_moe_command"] + ("" if lc["n_cpu_moe_exact"] else "  (approximate)")]
               if lc["n_cpu_moe_command"] else [])  # (none for a CPU-only plan)
    out.append(("code", "Equivalent llama.cpp arguments", [lc["command"], *simpler, "# " + lc["note"]]))
    if d["distributed"]:
        r = d["distributed"]
        lines = [f"# {r['checkpoint']}: {r['weights']} of FP8 weights"]
        for o in r["options"]:
            lines += [f"# {o['tensor_parallel_size']}x {o['gpu']} ({o['nodes']} node(s))", o["vllm"], o["sglang"]]
        out.append(("code", "Beyond one machine: serve it on a multi-GPU server instead", lines))
    out.append(("list", "Assumptions", pred.get("assumptions", [])))
    return out


def _where(by: dict) -> str:
    return ", ".join(f"{'RAM' if dev == 'cpu' else dev} {fmt_bytes(n)}" for dev, n in sorted(by.items()) if n)


def kv_line(d: dict) -> str:
    """What the KV takes where, what decode copies, and which context keeps all attention on the GPUs."""
    kv, ctx = d["kv"], d["options"]["context"]
    index = kv.get("index_key_bytes") or {}
    if index:
        head = (f"KV ({ctx} tokens, {'latent in RAM' if kv['home'] == 'ram' else 'with each layer'}): latent + rope "
                f"keys {_where(kv['latent_bytes'])}; indexer keys {_where(index)}")
    else:
        head = f"KV ({ctx} tokens): with each layer's attention ({_where(kv['latent_bytes'])})"
    if kv.get("decode_row_move_bytes"):
        head += (f"; each decode step copies the selected rows RAM -> GPU: {fmt_bytes(kv['decode_row_move_bytes'])}"
                 f", {kv['decode_row_move_s'] * 1e3:.1f} ms (counted in the decode prediction)")
    fits = []
    if kv.get("max_context_kv_on_gpu") is not None:
        fits.append(f"up to {kv['max_context_kv_on_gpu']} tokens with the KV on the GPU")
    if kv.get("max_context_latent_in_ram") is not None:
        fits.append(f"up to {kv['max_context_latent_in_ram']} with the latent in RAM (RAM holds the latent of "
                    f"{kv['max_context_ram']})")
    if fits:
        head += ". All attention fits the GPU " + ", ".join(fits)
    return head + "."


def to_markdown(d: dict) -> str:
    lines = []
    for b in blocks(d):
        if b[0] == "title":
            lines += [f"## {b[1]}", ""]
        elif b[0] == "text":
            lines += [b[1], ""]
        elif b[0] == "table":
            _, title, headers, rows = b
            lines += [f"**{title}**", "", "| " + " | ".join(headers) + " |",
                      "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
            lines.append("")
        elif b[0] == "list":
            lines += [f"**{b[1]}**", ""] + [f"- {x}" for x in b[2]] + [""]
        elif b[0] == "code":
            lines += [f"**{b[1]}**", "", "```bash"] + b[2] + ["```", ""]
    return "\n".join(lines)


def print_table(d: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for b in blocks(d):
        if b[0] == "title":
            console.print(f"[bold]{b[1]}", highlight=False)
        elif b[0] == "text":
            console.print(b[1])
        elif b[0] == "table":
            _, title, headers, rows = b
            t = Table(title=title, title_justify="left")
            for i, h in enumerate(headers):
                t.add_column(h, justify="left" if i == 0 else "right")
            for r in rows:
                t.add_row(*[str(c) for c in r], style="bold" if r[0] in ("total used",) else None)
            console.print(t)
        elif b[0] == "list":
            console.print(f"[bold]{b[1]}")
            for x in b[2]:
                console.print(f"  • {x}", highlight=False, markup=False)
        elif b[0] == "code":
            console.print(f"[bold]{b[1]}")
            for x in b[2]:
                console.print(f"  {x}", highlight=False, markup=False, soft_wrap=True)


def _layer_runs(by_layer: dict) -> str:
    """{layer: tokens} as runs of layers with one value: "layers 1-3: 540, layer 4: 610"."""
    runs: list[list] = []
    for layer, n in sorted((int(k), v) for k, v in by_layer.items()):
        if runs and runs[-1][2] == n and runs[-1][1] == layer - 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer, n])
    return ", ".join(f"layer {a}: {n}" if a == b else f"layers {a}-{b}: {n}" for a, b, n in runs)
