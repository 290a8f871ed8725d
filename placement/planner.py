"""The planner: a home for every tensor group, then the predictions of the cost model.

Order: always-GPU groups (attention, norms, routers, shared experts, dense layers, lm_head, KV cache,
a reserve for activations / CUDA graphs), layers split across GPUs by contiguous ranges; then hot
routed experts, greedily by decode time saved per byte; the rest lives in RAM.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace

import numpy as np

from offload.errors import PlacementError

from . import cost, kv_home
from .fits import check_ram, fallbacks
from .hardware import GPU, GiB, Hardware, fmt_bytes
from .inventory import Group, LayerItems, global_items, layer_items
from .model import ModelSpec, active_params, kv_read_bytes, kv_row_move_bytes, latent_row_bytes, total_params
from .profile import RoutingProfile
from .quant import QuantScheme, default_scheme

@dataclass
class PlanOptions:
    context: int = 32768  # tokens of KV cache reserved per sequence
    concurrency: int = 1  # sequences decoded together
    mtp: bool = False  # also load the MTP layer (speculative decoding)
    decode_position: int = 4096  # context position the decode prediction is made at
    kv_dtype_bytes: float = 2.0
    cuda_overhead: int = GiB  # CUDA context, cuBLAS workspace, CUDA graphs
    safety_fraction: float = 0.05  # of each GPU's memory, for fragmentation
    os_margin: int | None = None  # RAM kept free for the OS; default max(8 GiB, 5 % of RAM)
    strict: bool = True  # raise PlacementError when the CPU weights do not fit RAM
    full: bool = True  # prefill, load time and the GPU-budget sweep; False: decode only (a sweep point)
    # where a DSA model's latent + rope-key cache lives: gpu | ram | auto (placement/kv_home.py)
    kv_home: str = "auto"


@dataclass
class Plan:
    spec: ModelSpec
    hw: Hardware
    quant: QuantScheme
    options: PlanOptions
    profile: RoutingProfile
    items: list[LayerItems]
    homes: dict[int, str]  # layer -> device of its fixed groups
    gpu_experts: dict[int, np.ndarray]  # layer -> bool mask of GPU-resident experts
    emb: Group
    head: Group
    emb_device: str
    head_device: str
    reserves: list[float]
    status: str = "ok"  # ok | cpu_only | gpu_fallback | does_not_fit_ram
    notes: list[str] = field(default_factory=list)
    fallbacks: list[dict] = field(default_factory=list)
    error: str | None = None
    prediction: dict = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)
    recipe: dict | None = None
    kv_ram: bool = False  # the DSA latent cache of GPU layers lives in RAM
    kv_choice: dict = field(default_factory=dict)  # kv_home "auto": the decode predicted for each home

    # -- derived views ---------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """Every tensor group with its home: the `placement` list of the JSON contract."""
        def row(g: Group, layer, expert, device):
            return {"tensor": g.tensor, "class": g.cls, "layer": layer, "expert": expert, "device": device,
                    "bytes": int(round(g.bytes)), "params": int(g.params), "quant": g.quant}

        out = [row(self.emb, None, None, self.emb_device)]
        for it in self.items:
            home = self.homes[it.index]
            out += [row(g, it.index, None, g.device or home) for g in it.fixed]
            if len(it.freq):
                mask = self.gpu_experts.get(it.index, np.zeros(len(it.freq), bool))
                eg = Group("experts", "routed_experts", it.expert_params, it.expert_bytes, self.quant.label(
                    "routed_experts"))
                out += [row(eg, it.index, e, home if mask[e] else "cpu") for e in range(len(it.freq))]
        out.append(row(self.head, None, None, self.head_device))
        return out

    def usage(self, held: bool = True) -> dict[str, dict[str, int]]:
        """device -> tensor class -> bytes (weights and KV cache; GPU reserves not included); held: as the loader
        holds them, on a GPU (placement.held: float kv_b, norms, expanded matrices) and in RAM (an IQ4_NL part as
        Q8_0: quant.held_on_cpu), else as stored in the file."""
        by: dict[str, dict[str, int]] = {f"gpu:{i}": {} for i in range(len(self.hw.gpus))}
        by["cpu"] = {}

        def add(dev: str, cls: str, n: float) -> None:
            n *= self.quant.cpu_growth(cls) if held and dev == "cpu" else 1.0
            by[dev][cls] = by[dev].get(cls, 0) + int(round(n))

        float_bytes = 2 if self.hw.gpus else self.quant.cpu_float  # a GPU load keeps floats in bf16 everywhere

        def size(g: Group, dev: str) -> float:
            if not held:
                return g.bytes
            return g.gpu_bytes if dev != "cpu" else g.cpu_bytes(float_bytes)

        add(self.emb_device, "embeddings", size(self.emb, self.emb_device))
        add(self.head_device, "lm_head", size(self.head, self.head_device))
        for it in self.items:
            home = self.homes[it.index]
            for g in it.fixed:
                add(g.device or home, g.cls, size(g, g.device or home))
            if len(it.freq):
                n_gpu = int(self.gpu_experts[it.index].sum())
                if n_gpu:
                    add(home, "routed_experts", n_gpu * round(it.expert_bytes))
                if len(it.freq) - n_gpu:
                    add("cpu", "routed_experts", (len(it.freq) - n_gpu) * round(it.expert_bytes))
        return by

    def devices(self) -> list[dict]:
        by = self.usage()
        out = []
        for i, g in enumerate(self.hw.gpus):
            cls = by[f"gpu:{i}"]
            if cls:  # an unused GPU reserves nothing
                cls["reserve"] = int(self.reserves[i])
            out.append({"name": f"gpu:{i}", "model": g.name, "budget_bytes": int(g.memory_bytes),
                        "used_bytes": int(sum(cls.values())), "by_class": cls})
        cls = by["cpu"]
        margin = os_margin(self.hw, self.options)
        out.append({"name": "cpu", "model": self.hw.cpu_model, "budget_bytes": int(max(self.hw.ram_bytes - margin, 0)),
                    "used_bytes": int(sum(cls.values())), "os_margin_bytes": int(margin), "by_class": cls})
        return out

    def layouts(self) -> list[cost.LayerLayout]:
        return _layouts(self)


def os_margin(hw: Hardware, opts: PlanOptions) -> float:
    return opts.os_margin if opts.os_margin is not None else max(8 * GiB, 0.05 * hw.ram_bytes)


def gpu_reserve(spec: ModelSpec, gpu: GPU, opts: PlanOptions, expert_bytes: float) -> float:
    """CUDA context + activations of a 2048-token prefill chunk + two 16-expert staging buffers for
    streaming experts in prefill + a safety fraction."""
    chunk = 2048
    act = chunk * spec.hidden * 2 * 24 + chunk * spec.top_k * spec.moe_inter * 2 * 3
    logits = opts.concurrency * spec.vocab * 4 * 2
    staging = 2 * 16 * expert_bytes
    return opts.cuda_overhead + act + logits + staging + opts.safety_fraction * gpu.memory_bytes


def _split_layers(sizes: list[float], head: float, usable: list[float]) -> list[int] | None:
    """Contiguous split of layers over GPUs (the head goes on the last): GPU index per layer, or None
    when it does not fit. Shares proportional to each GPU's usable memory."""
    n_gpu = len(usable)
    if n_gpu == 0:
        return None if sizes or head else []
    total = sum(sizes) + head
    bounds = np.cumsum(usable) / sum(usable) * total
    out, cum, g = [], 0.0, 0
    for s in sizes:
        while g < n_gpu - 1 and cum + s / 2 > bounds[g]:
            g += 1
        out.append(g)
        cum += s
    used = [0.0] * n_gpu
    for s, gi in zip(sizes, out):
        used[gi] += s
    used[-1] += head
    if all(u <= cap for u, cap in zip(used, usable)):
        return out
    # fill greedily from the first GPU when the proportional split is off by a layer
    out, g, used = [], 0, [0.0] * n_gpu
    for s in sizes:
        while g < n_gpu and used[g] + s + (head if g == n_gpu - 1 else 0) > usable[g]:
            g += 1
        if g == n_gpu:
            return None
        out.append(g)
        used[g] += s
    return out if used[-1] + head <= usable[-1] else None


def _fit(items: list[LayerItems], head: float, usable: list[float]) -> tuple[int, list[int], bool]:
    """Fewest leading layers to run wholly on the CPU so the rest's always-GPU groups fit.
    Returns (n_cpu_layers, gpu of each GPU layer, head_on_gpu)."""
    main = [it for it in items if not it.mtp]
    mtp = [it for it in items if it.mtp]
    for k in range(len(main) + 1):
        layers = main[k:] + mtp
        split = _split_layers([it.fixed_bytes for it in layers], head, usable)
        if split is not None:
            return k, split, bool(usable)
    return len(main), [], False


def _place_hot(plan: Plan, usable_left: list[float]) -> None:
    """Greedy: the next expert to the GPU is the one that saves the most decode time per byte. Within a
    layer experts share a size, so each layer offers its most frequent CPU expert; a layer stops
    offering once the GPU work beside the CPU experts is the longer (its time is attention + max(beside, CPU))."""
    hw, batch = plan.hw, plan.options.concurrency
    layouts = {lay.index: lay for lay in _layouts(plan)}
    for g in range(len(hw.gpus)):
        heap, state, order, nxt = [], {}, {}, {}
        gbw = cost.gpu_read_bw(hw, f"gpu:{g}", None)
        cbw = cost.cpu_read_bw(hw, plan.quant.shares("routed_experts"), None)
        for it in plan.items:
            if it.mtp or not len(it.freq) or plan.homes[it.index] != f"gpu:{g}":
                continue
            lay = layouts[it.index]
            _, gt, ct, _ = cost.layer_decode_parts(lay, hw, batch, None)
            reads = cost.step_reads(it.freq, batch) * it.expert_bytes
            state[it.index] = [gt, ct, reads, 0]
            order[it.index] = np.argsort(-it.freq, kind="stable")
            nxt[it.index] = 0
            _push(heap, it.index, state, order, nxt, gbw, cbw, it.expert_bytes)
        left = usable_left[g]
        while heap:
            _, _, layer = heapq.heappop(heap)
            it = plan.items[layer]
            if it.expert_bytes > left:
                continue
            st = state[layer]
            e = order[layer][nxt[layer]]
            plan.gpu_experts[layer][e] = True
            left -= it.expert_bytes
            st[0] += st[2][e] / gbw
            st[1] -= st[2][e] / cbw
            st[3] += 1
            nxt[layer] += 1
            _push(heap, layer, state, order, nxt, gbw, cbw, it.expert_bytes)
        # A layer whose GPU part got longer takes no single expert more, but moving *all* of its CPU
        # experts also drops the CPU call and its sync: take whole layers where that wins.
        for layer in sorted(state, key=lambda i: (len(order[i]) - nxt[i], -i)):
            it, st = plan.items[layer], state[layer]
            rest = ~plan.gpu_experts[layer]
            need = int(rest.sum()) * it.expert_bytes
            if not rest.any() or need > left:
                continue
            moved = float(st[2][rest].sum())
            if st[0] + moved / gbw < max(st[0], st[1]) + cost.sync_s(hw):
                plan.gpu_experts[layer][:] = True
                left -= need
                st[0], st[1] = st[0] + moved / gbw, 0.0
        usable_left[g] = left


def _push(heap, layer, state, order, nxt, gbw, cbw, nbytes) -> None:
    if nxt[layer] >= len(order[layer]):
        return
    gt, ct, reads, count = state[layer]
    r = reads[order[layer][nxt[layer]]]
    gain = max(gt, ct) - max(gt + r / gbw, ct - r / cbw)
    if gain > 0:
        heapq.heappush(heap, (-gain / nbytes, count, layer))


def _layouts(plan: Plan) -> list[cost.LayerLayout]:
    spec, opts = plan.spec, plan.options
    pos = min(opts.decode_position, opts.context)
    out = []
    for it in plan.items:
        if it.mtp:
            continue
        out.append(cost.LayerLayout(
            index=it.index, device=plan.homes[it.index], fixed_bytes=it.weight_bytes, fixed_params=it.weight_params,
            overlap_bytes=sum(g.bytes for g in it.fixed if g.cls == "shared_experts"),
            expert_quant=plan.quant.shares("routed_experts"),
            fixed_quant=plan.quant.shares("dense_ffn" if any(g.cls == "dense_ffn" for g in it.fixed) else "attention"),
            kv_read=kv_read_bytes(spec, it.index, pos, opts.kv_dtype_bytes),
            kv_ram_row=latent_row_bytes(spec, opts.kv_dtype_bytes) if plan.kv_ram else 0.0,
            kv_move=kv_row_move_bytes(spec, pos, opts.kv_dtype_bytes) if plan.kv_ram else 0.0,
            **_attn_costs(spec, it.index),
            expert_bytes=it.expert_bytes, expert_params=it.expert_params, freq=it.freq,
            on_gpu=plan.gpu_experts.get(it.index, np.zeros(len(it.freq), bool)), hidden=spec.hidden))
    return out


def _attn_costs(spec: ModelSpec, layer: int) -> dict:
    """Attention score + value FLOPs per (query, key) pair; DSA caps the keys at index_topk and its
    indexer scores every key on layers that run their own indexer."""
    if spec.attention == "mla":
        per_key = 2 * spec.n_heads * (spec.qk_nope + spec.qk_rope + spec.v_head)
        index = 2 * spec.index_heads * spec.index_head_dim if layer in spec.indexer_layers else 0
        return {"attn_flops_per_key": per_key, "attn_key_limit": spec.index_topk, "index_flops_per_key": index}
    return {"attn_flops_per_key": 4 * spec.n_heads * spec.head_dim}


def plan(spec: ModelSpec, hw: Hardware, quant: QuantScheme | None = None, profile: RoutingProfile | None = None,
         options: PlanOptions | None = None) -> Plan:
    """Place every tensor group of `spec` on `hw` and predict speed. Raises PlacementError for bad
    options, and (strict) when the CPU-resident weights do not fit RAM."""
    opts = options or PlanOptions()
    if opts.context <= 0 or opts.concurrency <= 0:
        raise PlacementError(f"context ({opts.context}) and concurrency ({opts.concurrency}) must be positive")
    kv_home.check(opts.kv_home)
    quant = quant or default_scheme()
    profile = profile or RoutingProfile.make_uniform(spec)
    if opts.kv_home == "auto":
        return kv_home.choose(spec, hw, quant, profile, opts)
    notes = profile.check(spec)
    if profile.uniform:
        notes.append("no routing profile: uniform routing assumed, so every expert is equally hot (record one "
                     "with `offload profile`)")
    if spec.max_context and opts.context > spec.max_context:
        notes.append(f"context {opts.context} exceeds the model's max_position_embeddings {spec.max_context}")
    if opts.mtp and not spec.mtp_layers:
        notes.append(f"{spec.name} has no MTP layer: --mtp ignored")
    kv_ram = kv_home.latent_in_ram(spec, hw, opts, notes)
    items = layer_items(spec, quant, profile, opts.context, opts.concurrency, opts.mtp, opts.kv_dtype_bytes, kv_ram)
    emb, head = global_items(spec, quant)
    expert_b = max((it.expert_bytes for it in items), default=0.0)
    reserves = [gpu_reserve(spec, g, opts, expert_b) for g in hw.gpus]
    usable = [max(g.memory_bytes - r, 0.0) for g, r in zip(hw.gpus, reserves)]
    if hw.gpus and not any(usable):
        notes.append("the GPU budget is smaller than the reserve for CUDA context and activations: "
                     "nothing is placed on the GPU")
        usable = []
    k, split, head_gpu = _fit(items, head_gpu_bytes(spec, emb, head), usable)
    if k and spec.tie_embeddings:  # a tied head takes the embedding table along: layers first if that saves some
        k2, split2, _ = _fit(items, 0.0, usable)
        if k2 < k:
            k, split, head_gpu = k2, split2, False
    main = [it for it in items if not it.mtp]
    homes = {it.index: "cpu" for it in items}
    for it, g in zip(main[k:] + [it for it in items if it.mtp], split):
        homes[it.index] = f"gpu:{g}"
    if not head_gpu and usable and not split:  # not even the head plus zero layers: try the head alone
        head_gpu = head_gpu_bytes(spec, emb, head) <= usable[-1]
    head_device = f"gpu:{len(usable) - 1}" if head_gpu and usable else "cpu"
    p = Plan(spec, hw, quant, opts, profile, items, homes, {it.index: np.zeros(len(it.freq), bool) for it in items},
             emb, head, "cpu", head_device, reserves, notes=notes, kv_ram=kv_ram)
    if not usable:
        p.status = "cpu_only"
        p.notes.append("no GPU: every tensor lives in RAM and runs on the CPU")
    elif k:
        p.status = "gpu_fallback"
        p.notes.append(f"the always-GPU set does not fit: the first {k} of {len(main)} layers run wholly on the "
                       "CPU (see fallbacks)")
    used = [0.0] * len(usable)
    for it in items:
        if homes[it.index] != "cpu":
            used[int(homes[it.index][4:])] += it.fixed_bytes
    if head_device != "cpu":
        used[-1] += head_gpu_bytes(spec, emb, head)
    left = [u - x for u, x in zip(usable, used)]
    if usable:
        _place_hot(p, left)
    all_hot = all(m.all() for i, m in p.gpu_experts.items() if len(m) and not items[i].mtp)
    if usable and all_hot and k == 0 and emb.gpu_bytes <= left[0]:
        p.emb_device = "gpu:0"
    elif usable or spec.tie_embeddings:
        if spec.tie_embeddings:
            p.emb_device = head_device
        else:
            p.notes.append(f"embeddings ({fmt_bytes(emb.bytes)}) stay in RAM: a token reads one row of "
                           f"{fmt_bytes(emb.bytes / spec.vocab)}, while the same GPU memory holds hot experts "
                           "that every token reads")
    if k and usable and opts.full:
        p.fallbacks = fallbacks(spec, hw, quant, profile, opts, usable, k)
    check_ram(p)
    _predict(p)
    return p


def head_gpu_bytes(spec: ModelSpec, emb: Group, head: Group) -> float:
    """What the head takes on a GPU: with tied embeddings the table itself goes with it (load_embeddings)."""
    return head.gpu_bytes + (emb.gpu_bytes if spec.tie_embeddings else 0.0)


def head_read_bytes(p: Plan) -> float:
    """Bytes of the output head read every token: the whole head (a tied head is the embedding table, whose
    memory the plan counts once, under embeddings) and the final norm."""
    return p.head.bytes + (p.emb.bytes if p.spec.tie_embeddings else 0.0)


def decode_step(p: Plan, layouts: list[cost.LayerLayout], **eff) -> dict:
    """cost.decode for this plan's layouts, head included (its bytes, device and storage types)."""
    head_q = p.quant.shares("embeddings" if p.spec.tie_embeddings else "lm_head")
    return cost.decode(layouts, p.hw, head_read_bytes(p), p.head_device, p.options.concurrency, head_quant=head_q,
                       **eff)


def cpu_resident_bytes(p: Plan) -> float:
    return sum(p.usage()["cpu"].values())


def _predict(p: Plan) -> None:
    from .recipe import distributed_recipe

    hw, opts, spec = p.hw, p.options, p.spec
    lays = p.layouts()
    head_b = head_read_bytes(p)
    d = decode_step(p, lays)
    roof = cost.decode(lays, hw, head_b, p.head_device, opts.concurrency, cpu_eff=1.0, gpu_eff=1.0)
    roof_tok = roof["step_s"] - sum(cost.sync_s(hw) for lay in lays if lay.moe and (~lay.on_gpu).any()
                                    and lay.device.startswith("gpu"))
    roof_tok_s = opts.concurrency / roof_tok
    llama = cost.decode(lays, hw, head_b, p.head_device, opts.concurrency, cpu_eff=cost.LLAMA_CPP_EFFICIENCY,
                        gpu_eff=cost.GPU_EFFICIENCY)
    moe = [lay for lay in lays if lay.moe]
    ex = moe[0] if moe else None
    usage = p.usage(held=False)  # the load reads the file's bytes
    weights = sum(n for by in usage.values() for c, n in by.items() if c != "kv_cache")  # (index keys included)
    gpu_bytes = weights - sum(n for c, n in usage["cpu"].items() if c != "kv_cache")
    n_gpu_exp = sum(int(m.sum()) for m in p.gpu_experts.values())
    p.prediction = {
        "decode_tok_s": round(d["tok_s"], 3),
        "decode_tok_s_serial": round(d["tok_s_serial"], 3),
        "decode_tok_s_pipelined": round(d["tok_s_pipelined"], 3),
        "decode_tok_s_at_llama_cpp_efficiency": round(llama["tok_s"], 3),
        "roofline_decode_tok_s": round(roof_tok_s, 3),
        "roofline_fraction": round(d["tok_s"] / roof_tok_s, 3),
        "cpu_bytes_per_token": int(cost.cpu_bytes_per_token(lays)),
        "gpu_experts": n_gpu_exp,
        "cpu_experts": sum(len(lay.freq) for lay in moe) - sum(int(lay.on_gpu.sum()) for lay in moe),
    }
    slow = p.prediction["decode_tok_s"] < 1.0
    if p.status == "does_not_fit_ram" or slow:
        p.recipe = distributed_recipe(spec, opts.context)
        if slow:
            p.notes.append(f"predicted decode {p.prediction['decode_tok_s']:.2f} tok/s is below 1 tok/s: this rig "
                           "cannot run the model usefully (see the distributed recipe)")
    if not opts.full:  # a point of another plan's sweep: decode only
        return
    p.prediction |= {
        "prefill_tok_s": {str(n): round(cost.prefill(lays, hw, n, "best"), 1) for n in (1024, 8192)},
        "prefill_tok_s_cpu_only": {str(n): round(cost.prefill(lays, hw, n, "cpu"), 1) for n in (1024, 8192)},
        "prefill_tok_s_stream_all": ({str(n): round(cost.prefill(lays, hw, n, "stream"), 1) for n in (1024, 8192)}
                                     if hw.gpus else None),
        "prefill_crossover_tokens_per_expert": (round(cost.crossover_tokens(ex.expert_params, ex.expert_bytes, hw), 1)
                                                if ex and hw.gpus else None),
        "load_time_s": round(cost.load_time(weights, gpu_bytes, hw), 1),
        "assumptions": cost.assumptions(hw, opts.concurrency, min(opts.decode_position, opts.context))
        + list(hw.notes) + [f"routing: {'uniform' if p.profile.uniform else 'profile ' + p.profile.source}"],
    }
    if ex:
        cross = p.prediction["prefill_crossover_tokens_per_expert"]
        if cross is not None:
            prompt = cross * spec.n_experts / spec.top_k
            p.prediction["prefill_crossover_prompt_tokens"] = round(prompt)
            # per MoE layer (a GGUF's expert types vary by layer): the prompt length from which that layer's CPU
            # experts are streamed to the GPU (offload.streaming), T * top_k / E above its crossover
            p.prediction["prefill_crossover_prompt_tokens_by_layer"] = {
                str(lay.index): cost.stream_prompt_tokens(cost.crossover_tokens(lay.expert_params, lay.expert_bytes,
                                                                                 hw), spec.n_experts, spec.top_k)
                for lay in moe}
    p.prediction["model_total_params"] = total_params(spec, opts.mtp)
    p.prediction["model_active_params"] = active_params(spec)
    if p.status != "does_not_fit_ram":
        p.sweep = budget_sweep(p)


def budget_sweep(p: Plan, steps: int = 24) -> list[dict]:
    """Decode tok/s of the same model on one GPU of this kind (or a 4090-class one) from 0 to all-fits."""
    base = p.hw.gpus[0] if p.hw.gpus else GPU("RTX 4090-class", 24 * GiB)
    total = sum(n for by in p.usage(held=False).values() for c, n in by.items()  # (as a GPU holds it)
                if c != "embeddings")
    reserve = gpu_reserve(p.spec, base, p.options, max((it.expert_bytes for it in p.items), default=0))
    top = (total + reserve) / (1 - p.options.safety_fraction) * 1.02
    out = []
    opts = replace(p.options, strict=False, full=False)
    for b in np.linspace(0, top, steps + 1):
        gpus = [replace(base, memory_bytes=int(b))] if b > 0 else []
        hw = replace(p.hw, gpus=gpus, notes=[])
        q = plan(p.spec, hw, p.quant, p.profile, opts)
        out.append({"gpu_bytes": int(b), "decode_tok_s": q.prediction["decode_tok_s"],
                    "roofline_decode_tok_s": q.prediction["roofline_decode_tok_s"]})
    return out
