"""CPU+GPU decode and prefill of a GGUF, offload against llama.cpp on the same file and threads, with the time
per layer split into its parts and the plan's prediction beside each measurement.

    offload bench hybrid FILE.gguf [--llama-bench PATH] [--threads N] [--tokens 32] [--prefill 512,2048]
                                   [--repeat 3] [--device auto] [--placement cpu] [--json OUT.json]

offload loads FILE with every routed expert on the CPU (`--placement cpu`, as llama.cpp's `-ot exps=CPU`;
`auto` for the plan's own placement), the rest on the device. llama.cpp: `llama-bench -ngl 99 -ot exps=CPU
-fa on` when --llama-bench names the binary, else (a CPU-only machine) llama-cpp-python on the CPU. Measured:
prefill tok/s of each --prefill prompt (last position's logits only) and decode tok/s (--tokens steps after a
64-token prompt; offload's also with overlap off), median of --repeat; on a GPU the fraction of a decode step
the GPU is idle (torch profiler: 1 - kernel time / wall time); the time per MoE layer split into attention,
GPU experts (shared + GPU-resident), CPU experts (on the worker) and sync (the MoE part's wall time beyond
max(GPU, CPU): router, transfers, hand-offs), from a separate pass that synchronises around each part. Predictions come from the plan for
this machine (offload.planning.make_plan, the saved `offload probe` profile or --hardware) with the same
placement (placement.cost.layer_decode_parts, decode_step, prefill).
"""

import argparse
import json
import statistics
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch

PROMPT = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Offload:
    def __init__(self, path: str, device: str, n_ctx: int, placement: str):
        import offload

        self.llm = offload.load(path, device=device, ctx=n_ctx, placement=placement, progress=False)
        self.model = self.llm.model
        self.device = self.llm.device
        self.n_ctx = n_ctx

    def streams(self) -> list:
        """The layers' streamed CPU expert groups (offload.streaming: long prompts' CPU experts run on the GPU)."""
        return [g.stream for layer in self.model.layers for g in getattr(layer.mlp, "groups", [])
                if g.stream is not None]

    def stream_from(self) -> int | None:
        """The shortest prompt from which some layer streams its CPU experts (None: none does)."""
        k = self.model.args.num_experts_per_tok if self.streams() else 0
        return min((s.min_tokens(k) for s in self.streams()), default=None)

    def prefill(self, ids: list[int]) -> float:
        cache = self.model.new_cache(self.n_ctx)
        _sync(self.device)
        t = time.perf_counter()
        self.model.forward(torch.tensor(ids), cache, last_only=True)
        _sync(self.device)
        return len(ids) / (time.perf_counter() - t)

    def decode(self, ids: list[int], steps: int, after_prompt=None) -> float:
        """tok/s of `steps` single-token steps after a PROMPT-token prompt (then `after_prompt()` is called)."""
        cache = self.model.new_cache(self.n_ctx)
        self.model.forward(torch.tensor(ids[:PROMPT]), cache, last_only=True)
        _sync(self.device)
        if after_prompt is not None:
            after_prompt()
        t = time.perf_counter()
        for tok in ids[PROMPT:PROMPT + steps]:
            self.model.forward(torch.tensor([tok]), cache, last_only=True)
        _sync(self.device)
        return steps / (time.perf_counter() - t)

    def decode_recorded(self, ids: list[int], steps: int) -> tuple[float, str]:
        """decode() through a recorded step (offload.graphs.DecodeStep: CUDA graph segments cut at the CPU expert
        calls), recorded at the first step, outside the timing -> (tok/s, what was recorded)."""
        from offload.graphs import DecodeStep

        cache = self.model.new_cache(self.n_ctx)
        self.model.forward(torch.tensor(ids[:PROMPT]), cache, last_only=True)
        step = DecodeStep(self.model, cache)
        for layer in cache.layers:  # the capacity fixed up front: one recording
            layer.reserve(PROMPT + steps + 1)
        step(ids[PROMPT])
        _sync(self.device)
        t = time.perf_counter()
        for tok in ids[PROMPT + 1:PROMPT + 1 + steps]:
            step(tok)
        _sync(self.device)
        what = f"{step.segments} segments" if step.blocker is None else f"not recorded: {step.blocker}"
        return steps / (time.perf_counter() - t), what

    def gpu_idle(self, ids: list[int], steps: int) -> float | None:
        """1 - (GPU kernel time / wall time) over `steps` decode steps; None off a GPU."""
        if self.device.type != "cuda":
            return None
        from torch.profiler import ProfilerActivity, profile

        cache = self.model.new_cache(self.n_ctx)
        self.model.forward(torch.tensor(ids[:PROMPT]), cache, last_only=True)
        _sync(self.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for tok in ids[PROMPT:PROMPT + steps]:
                self.model.forward(torch.tensor([tok]), cache, last_only=True)
            _sync(self.device)
            wall = time.perf_counter() - t
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6  # one stream: kernels in a row
        return max(0.0, 1.0 - busy / wall)


class LayerTimer:
    """Wraps one model's parts to time each MoE layer's attention, GPU experts (shared + GPU-resident groups),
    CPU experts (the CPU groups' own call, on whichever thread) and the MoE part's wall time, synchronising the
    device around each part. `remove()` puts the parts back."""

    def __init__(self, model):
        self.model, self.device = model, model.device
        self.parts: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.undo: list = []
        self.lock = threading.Lock()

    def install(self) -> None:
        from offload.models.moe import MoE

        model = self.model
        for i, layer in enumerate(model.layers):
            if not isinstance(layer.mlp, MoE):
                continue
            self._set(layer, "attn", _Timed(layer.attn, self, i, "attention"))
            moe = layer.mlp
            if moe.shared is not None:
                self._set(moe, "shared", _Timed(moe.shared, self, i, "gpu_experts"))
            for g in moe.groups:
                if g.runs_in_background:  # its call, without the hand-off
                    self._set(g, "_run", _Timed(g._run, self, i, "cpu_experts"))
                else:
                    self._set(g, "submit", _Timed(g.submit, self, i, "gpu_experts"))
        rt = model.runtime
        self._set(rt, "moe", _Timed(rt.moe, self, None, "moe"))

    def _set(self, obj, name: str, value) -> None:
        had = name in vars(obj)
        self.undo.append((obj, name, vars(obj).get(name), had))
        setattr(obj, name, value)

    def remove(self) -> None:
        for obj, name, old, had in reversed(self.undo):
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

    def add(self, layer: int, part: str, seconds: float) -> None:
        with self.lock:
            self.parts[layer][part].append(seconds)

    def summary(self) -> dict:
        """Mean seconds per MoE layer and step: attention, gpu_experts, cpu_experts, sync, total."""
        rows = []
        for d in self.parts.values():
            steps = max(len(d["attention"]), 1)
            part = {k: sum(d[k]) / steps for k in ("attention", "gpu_experts", "cpu_experts", "moe")}
            part["sync"] = max(0.0, part["moe"] - max(part["gpu_experts"], part["cpu_experts"]))
            part["total"] = part["attention"] + part["moe"]
            rows.append(part)
        return {k: float(np.mean([r[k] for r in rows])) for k in
                ("attention", "gpu_experts", "cpu_experts", "sync", "total")} if rows else {}


class _Timed:
    """fn timed into timer's (layer, part); the layer of the runtime's `moe` is the MoE's own."""

    def __init__(self, fn, timer: LayerTimer, layer: int | None, part: str):
        self.fn, self.timer, self.layer, self.part = fn, timer, layer, part

    def __getattr__(self, name):  # attention objects are also asked for new_cache, device, ...
        return getattr(self.fn, name)

    def __call__(self, *args, **kwargs):
        on_worker = threading.current_thread() is not threading.main_thread()
        if not on_worker:
            _sync(self.timer.device)
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if not on_worker:
            _sync(self.timer.device)
        layer = self.layer if self.layer is not None else args[0].layer_idx
        self.timer.add(layer, self.part, time.perf_counter() - t)
        return out


def layer_split(engine: Offload, ids: list[int], steps: int) -> dict:
    timer = LayerTimer(engine.model)
    try:
        engine.decode(ids, steps, after_prompt=timer.install)  # the decode steps only
    finally:
        timer.remove()
    return timer.summary()


class LlamaCppPython:
    """The CPU-only baseline: llama-cpp-python (bench decode's), prefill and decode timed like offload's."""

    def __init__(self, path: str, n_ctx: int, n_batch: int, threads: int):
        from offload.bench_decode import LlamaCpp

        self.engine = LlamaCpp(path, n_ctx, n_batch, threads)
        self.name = "llama.cpp (llama-cpp-python, CPU)"

    def prefill(self, ids: list[int]) -> float:
        return self.engine.run(ids + ids[:1], len(ids))[0]

    def decode(self, ids: list[int], steps: int) -> float:
        return self.engine.run(ids[:PROMPT + steps], PROMPT)[1]


def llama_bench(binary: str, path: str, threads: int, prefills: list[int], steps: int, repeat: int) -> dict:
    """{"prefill": {n: tok/s}, "decode": tok/s, "cmd": [...]} from llama-bench's JSON output."""
    cmd = [binary, "-m", path, "-ngl", "99", "-ot", "exps=CPU", "-fa", "on", "-t", str(threads),
           "-p", ",".join(map(str, prefills)), "-n", str(steps), "-r", str(repeat), "-o", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    out = {"prefill": {}, "decode": None, "cmd": cmd}
    for r in json.loads(done.stdout):
        if r["n_gen"] == 0:
            out["prefill"][int(r["n_prompt"])] = float(r["avg_ts"])
        elif r["n_prompt"] == 0:
            out["decode"] = float(r["avg_ts"])
    return out


def predictions(path: str, engine: Offload, n_ctx: int, prefills: list[int], hardware: str | None,
                calibrate: bool = False) -> dict:
    """The plan's decode tok/s, prefill tok/s per prompt and mean per-MoE-layer parts, for the placement the
    engine was loaded with (routed experts on the CPU where its groups are); `calibrate`: with this machine's
    figures measured now (bench plan-check's quick calibration of the file's own types)."""
    from offload.placement import cost
    from offload.placement.planner import decode_step
    from offload.planning import make_plan

    p = make_plan(path, context=n_ctx, hardware=hardware, use_gpus=engine.device.type == "cuda")
    stream_from = engine.stream_from()
    if calibrate:
        from offload.bench_plan import calibrated

        p = calibrated(p, sorted({t for shares in p.quant.mix.values() for t in shares} | set(p.quant.types.values())))
    p = replace(p, options=replace(p.options, decode_position=PROMPT))
    lays = p.layouts()
    on_gpu = {i: [e for g in layer.mlp.groups if g.device.type != "cpu" for e in g.ids]
              for i, layer in enumerate(engine.model.layers) if hasattr(layer.mlp, "groups")}
    lays = [replace(lay, on_gpu=np.isin(np.arange(len(lay.on_gpu)), on_gpu.get(lay.index, [])))
            if lay.moe else lay for lay in lays]
    moe = [lay for lay in lays if lay.moe]
    parts = [cost.layer_decode_parts(lay, p.hw, 1, None, cost.GPU_EFFICIENCY) for lay in moe]
    first, beside, cpu, sync = (float(v) for v in (np.mean(parts, axis=0) if parts else np.zeros(4)))
    if moe and not moe[0].device.startswith("gpu"):  # a CPU layer: the plan has its total only
        layer = {"attention": None, "gpu_experts": None, "cpu_experts": None, "sync": None, "total": first}
    else:
        layer = {"attention": first, "gpu_experts": beside, "cpu_experts": cpu, "sync": sync,
                 "total": first + max(beside, cpu) + sync}
    # the plan's bytes for the engine's own expert homes (its placement may not be the plan's)
    p.gpu_experts = {lay.index: lay.on_gpu for lay in lays if lay.moe}
    usage = p.usage()
    return {"decode": decode_step(p, lays)["tok_s"],
            # the runtime streams a chunk's CPU experts to the GPU from `stream_from` tokens (offload.streaming)
            "prefill": {n: cost.prefill(lays, p.hw, n, "stream" if stream_from is not None and n >= stream_from
                                        else "cpu") for n in prefills},
            "layer": layer, "hardware": p.hw.source + (", calibrated now" if calibrate else ""),
            "gpu_bytes": sum(sum(v.values()) for k, v in usage.items() if k != "cpu") or None,
            "gpu_weight_bytes": sum(n for k, v in usage.items() if k != "cpu" for c, n in v.items()
                                    if c != "kv_cache") or None}


def _log(msg: str) -> None:
    """Progress on stderr (a run cut short by a time limit still says how far it got)."""
    import sys

    print(f"bench hybrid [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _try(fn, *args):
    """A figure the profiler gives, or None with the reason on stderr (the rest of the run still counts)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001
        import sys

        print(f"bench hybrid: {getattr(fn, '__name__', fn)} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def _fmt(v, spec=".1f") -> str:
    return "n/a" if v is None else format(v, spec)


def report(r: dict) -> str:
    lines = [f"## hybrid, {r['file']}, device {r['device']}, {r['threads']} threads, median of {r['repeat']}", "",
             f"offload placement: {r['placement']}; baseline: {r['baseline_name']}; plan hardware: "
             f"{r['plan']['hardware']}" + (f" ({r['gpu']})" if r.get("gpu") else ""), "",
             "| | offload | llama.cpp | offload / llama.cpp | plan | offload / plan |", "|---|---|---|---|---|---|"]
    rows = [("decode tok/s", r["offload"]["decode"], r["baseline"]["decode"], r["plan"]["decode"])]
    rows += [(f"prefill tok/s, {n} tokens", r["offload"]["prefill"][n], r["baseline"]["prefill"].get(n),
              r["plan"]["prefill"][n]) for n in r["prefills"]]
    for label, ours, base, plan in rows:
        ratio = None if base is None else ours / base
        lines.append(f"| {label} | {ours:.1f} | {_fmt(base)} | {_fmt(ratio, '.2f')} | {_fmt(plan)} | "
                     f"{_fmt(None if plan is None else ours / plan, '.2f')} |")
    serial = r["offload"]["decode_serial"]
    lines += ["", f"offload decode with overlap off: {serial:.1f} tok/s (overlap on / off: "
              f"{r['offload']['decode'] / serial:.2f})"]
    rec = r["offload"].get("decode_recorded")
    if rec:
        lines += [f"offload decode through the recorded step ({r['offload']['recorded']}): {rec:.1f} tok/s "
                  f"(recorded / eager: {rec / r['offload']['decode']:.2f})"]
    if r["offload"].get("prefill_cpu_experts"):
        n = max(r["prefills"])
        off = r["offload"]["prefill_cpu_experts"]
        lines += ["", f"offload prefill, {n} tokens, CPU experts kept on the CPU: {off:.1f} tok/s (streamed to the "
                  f"GPU from {r['offload']['stream_from']} tokens / kept: {r['offload']['prefill'][n] / off:.2f})"]
    idle = r["gpu_idle"]
    lines += ["", f"GPU idle during decode: {_fmt(None if idle is None else 100 * idle)} %"]
    if r.get("gpu_mem_peak_bytes"):
        plan_mem = r["plan"]["gpu_bytes"]
        lines.append(f"GPU memory: peak allocated {r['gpu_mem_peak_bytes'] / 2**30:.2f} GiB; the plan's GPU part "
                     f"{_fmt(None if plan_mem is None else plan_mem / 2**30, '.2f')} GiB (weights and KV cache)")
    held, planned = r.get("gpu_held_bytes"), r["plan"].get("gpu_weight_bytes")
    if held:  # weights only, counted on the loaded model (offload.held_bytes) against the plan's count
        lines.append(f"GPU weights: held {held / 2**30:.3f} GiB, planned {_fmt(planned and planned / 2**30, '.3f')} "
                     f"GiB, held / planned {_fmt(planned and held / planned, '.3f')}")
    lines += ["", "| per MoE layer and decode step (a pass synchronised around each part) | measured µs | plan µs |",
              "|---|---|---|"]
    us = lambda v: _fmt(None if v is None else v * 1e6, ".0f")  # noqa: E731
    for k in ("attention", "gpu_experts", "cpu_experts", "sync", "total"):
        lines.append(f"| {k} | {us(r['layers'].get(k))} | {us(r['plan']['layer'][k])} |")
    if r.get("baseline_cmd"):
        lines += ["", "llama.cpp: `" + " ".join(r["baseline_cmd"]) + "`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="offload bench hybrid", description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--llama-bench", default=None, help="llama-bench binary (GPU build) for the baseline")
    ap.add_argument("--no-baseline", action="store_true", help="offload and the plan only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per run")
    ap.add_argument("--prefill", default="512,2048", help="prompt lengths, comma-separated")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--placement", default="cpu", help="cpu: every routed expert on the CPU (-ot exps=CPU); auto")
    ap.add_argument("--hardware", default=None, help="hardware profile for the plan (default: the saved one)")
    ap.add_argument("--calibrate", action="store_true", help="calibrate the plan's CPU figures first (~10 s)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    prefills = [int(n) for n in a.prefill.split(",") if n]
    if not prefills or min(prefills) < 1 or a.tokens < 1 or a.repeat < 1:
        ap.error("--prefill lengths, --tokens and --repeat must be positive")
    import psutil

    from offload.kernels.cpu.threads import set_threads

    threads = a.threads or psutil.cpu_count(logical=False) or 1
    set_threads(threads)
    n_ctx = max(max(prefills), PROMPT + a.tokens) + 8
    engine = Offload(a.gguf, a.device, n_ctx, a.placement)
    _log(f"offload loaded on {engine.device}")
    vocab = engine.model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(0, vocab, (n,), generator=g).tolist() for n in prefills}
    ids = torch.randint(0, vocab, (PROMPT + a.tokens + 1,), generator=g).tolist()

    baseline, base_name, base_cmd = {"prefill": {}, "decode": None}, "none", None
    if a.llama_bench:
        _log("llama-bench")
        base_name = "llama-bench (failed: see stderr)"
        found = _try(llama_bench, a.llama_bench, a.gguf, threads, prefills, a.tokens, a.repeat)
        if found is not None:
            baseline, base_name, base_cmd = found, "llama-bench", found["cmd"]
    elif not a.no_baseline and engine.device.type == "cpu":
        lcpp = LlamaCppPython(a.gguf, n_ctx, max(prefills), threads)
        base_name = lcpp.name
    else:
        lcpp = None
    engines = {"offload": engine} if a.llama_bench or base_name == "none" else {"offload": engine, "base": lcpp}

    for e in engines.values():  # warm-up: page cache, the native library, CUDA kernels
        e.prefill(prompts[min(prefills)])
        e.decode(ids, min(4, a.tokens))
    runs: dict = {name: defaultdict(list) for name in engines}
    for i in range(a.repeat):  # in turns: a shared machine's noise falls on both
        for name, e in engines.items():
            for n in prefills:
                runs[name][n].append(e.prefill(prompts[n]))
            runs[name]["decode"].append(e.decode(ids, a.tokens))
            if name == "offload":  # the same steps with the CPU experts run after the GPU's work, not beside it
                e.model.runtime.overlap = False
                runs[name]["decode_serial"].append(e.decode(ids, a.tokens))
                e.model.runtime.overlap = True
                tok_s, recorded = e.decode_recorded(ids, a.tokens)
                runs[name]["decode_recorded"].append(tok_s)
                if e.streams():  # the longest prompt again with its CPU experts computed on the CPU
                    for st in e.streams():
                        st.enabled = False
                    runs[name]["prefill_cpu_experts"].append(e.prefill(prompts[max(prefills)]))
                    for st in e.streams():
                        st.enabled = True
            _log(f"round {i + 1}, {name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs[name].items()))
    med = {name: {k: statistics.median(v) for k, v in rs.items()} for name, rs in runs.items()}
    if "base" in med:
        baseline = {"prefill": {n: med["base"][n] for n in prefills}, "decode": med["base"]["decode"]}
    r = {"file": a.gguf, "device": str(engine.device), "threads": threads, "repeat": a.repeat,
         "placement": a.placement, "prefills": prefills, "baseline_name": base_name, "baseline_cmd": base_cmd,
         "offload": {"decode": med["offload"]["decode"], "prefill": {n: med["offload"][n] for n in prefills},
                     "decode_serial": med["offload"]["decode_serial"],
                     "decode_recorded": med["offload"]["decode_recorded"], "recorded": recorded,
                     "prefill_cpu_experts": med["offload"].get("prefill_cpu_experts"),
                     "stream_from": engine.stream_from()},
         "baseline": baseline, "gpu_idle": _try(engine.gpu_idle, ids, a.tokens),
         "layers": _try(layer_split, engine, ids, a.tokens) or {},
         "plan": _try(predictions, a.gguf, engine, n_ctx, prefills, a.hardware, a.calibrate) or {
             "decode": None, "prefill": dict.fromkeys(prefills), "hardware": "none (the plan failed: see stderr)",
             "gpu_bytes": None, "layer": dict.fromkeys(("attention", "gpu_experts", "cpu_experts", "sync", "total"))}}
    if torch.cuda.is_available() and engine.device.type == "cuda":
        r["gpu"] = torch.cuda.get_device_name(engine.device)
        r["gpu_mem_peak_bytes"] = torch.cuda.max_memory_allocated(engine.device)
        from offload.held_bytes import held_bytes

        held = held_bytes(engine.model)
        r["gpu_held_bytes"] = sum(held.total(h) for h in held.by_home if h != "cpu")
    if a.json:  # first: the numbers survive a failing report
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1, default=str)
    print(report(r))


if __name__ == "__main__":
    main()
