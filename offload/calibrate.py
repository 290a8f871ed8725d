"""What this engine reaches on this machine, measured by `offload probe` and saved in the hardware profile
(`calibration`), so plans predict with the engine's own numbers instead of a fraction of a DRAM figure:

- DRAM read bandwidth: the median of several torch.sum reads (one read swings with the neighbours);
- per quant type, the native CPU kernels' GEMV GB/s at one token (decode reads experts and projections this
  way) and their throughput in TFLOP/s at a prefill chunk, both in the layout the loader uses (interleaved);
- the throughput of the engine's prefill attention (float32 scores over a causal chunk);
- the fixed cost of a decode step apart from its bytes: per layer (attention, router, norms, Python and kernel
  calls) and per token (embedding, head call, the step's own overhead), from a small synthetic model timed at
  two depths;
- on a GPU (when there is one): its GEMV GB/s and the cost of a launch + sync.
"""

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# types a plan may use for CPU weights; the file being planned adds its own
DEFAULT_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS", "Q4_0")
PREFILL_TOKENS = 512


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up: page faults, the native library, numba's cache
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def dram_reads(mb: int = 1024, reads: int = 7) -> list[float]:
    """bytes/s of each torch.sum over an `mb` MB float32 buffer (all threads)."""
    import torch

    buf = torch.ones(mb * 2**20 // 4)
    buf.sum()
    out = []
    for _ in range(reads):
        t = time.perf_counter()
        buf.sum()
        out.append(buf.numel() * 4 / (time.perf_counter() - t))
    return out


def kernel_rates(types, mb: int = 256, k: int = 4096, reps: int = 5) -> dict[str, dict]:
    """type -> {"gemv_gbs": GB/s at one token, "prefill_tflops": TFLOP/s at PREFILL_TOKENS tokens, "engine"}
    for each type the native kernels take (others are skipped: the plan keeps its assumption for them)."""
    import torch

    from offload.gguf.testing import random_blocks
    from offload.gguf.types import GGMLType, block_format
    from offload.kernels.cpu import native
    from offload.kernels.cpu import quantmm as qm

    rng = np.random.default_rng(0)
    out = {}
    for name in types:
        try:
            fmt = block_format(name)
        except (KeyError, ValueError):
            continue
        qt = int(GGMLType[fmt.name])
        if not native.fast(qt) or k % fmt.block_size:
            continue
        n = max(16, mb * 2**20 // (k // fmt.block_size * fmt.type_size)) // 16 * 16
        raw = random_blocks(qt, n * k // fmt.block_size, rng).reshape(n, -1)
        w, wt = native.repack(raw, qt) if native.repacks(qt, n) else (raw, qt)  # as the loader lays it out
        del raw
        x1 = torch.randn(1, k)
        gemv = w.nbytes / _median_time(lambda: qm.qmatmul(x1, w, wt), reps)
        part = w[: max(16, n // 8) // 16 * 16]  # a prefill chunk is compute-bound: part of the rows suffices
        xm = torch.randn(PREFILL_TOKENS, k)
        t = _median_time(lambda: qm.qmatmul(xm, part, wt), max(2, reps // 2))
        out[fmt.name] = {"gemv_gbs": round(gemv / 1e9, 2),
                         "prefill_tflops": round(2 * PREFILL_TOKENS * part.shape[0] * k / t / 1e12, 3),
                         "moe_prefill_tflops": moe_prefill_tflops(qt, rng, k, 1536, reps),
                         "engine": "native interleaved" if wt != qt else "native"}
        del w, part
    return out


PREFETCH_CANDIDATES = (0, 2304, 9216)  # bytes ahead (csrc/repack.h): none, one Q4_K group block, four


def prefetch_turns(dists, reps: int, fn) -> list[float]:
    """Median seconds of fn() under each prefetch distance (bytes), taking turns rep by rep so the neighbours'
    bandwidth moves every distance alike; the first round warms. The library's own distance is set back after."""
    from offload.kernels.cpu import native

    lib = native.lib()
    times = [[] for _ in dists]
    for rep in range(reps + 1):
        for i, d in enumerate(dists):
            lib.qdot_set_prefetch(d)
            t = time.perf_counter()
            fn()
            if rep:
                times[i].append(time.perf_counter() - t)
    lib.qdot_set_prefetch(native.prefetch_ahead())
    return [statistics.median(t) for t in times]


def prefetch_choice(mb: int = 256, k: int = 4096, reps: int = 15) -> dict:
    """The interleaved kernels' software prefetch distance that reads fastest here: Q4_K (the routed experts'
    usual type) at one token from DRAM, each distance in turn rep by rep; the library keeps the choice (saved in
    the profile, native.prefetch_ahead reads it back). -> {"prefetch_ahead": bytes, "prefetch_gbs": {bytes: GB/s}}"""
    import torch

    from offload.gguf.testing import random_blocks
    from offload.gguf.types import GGMLType
    from offload.kernels.cpu import native

    qt = int(GGMLType.Q4_K)
    if not native.fast(qt):
        return {}
    n = max(16, mb * 2**20 // (k // 256 * 144)) // 16 * 16
    w, wt = native.repack(random_blocks(qt, n * k // 256, np.random.default_rng(0)).reshape(n, -1), qt)
    x = torch.randn(1, k)
    secs = prefetch_turns(PREFETCH_CANDIDATES, reps, lambda: native.gemv(x, w, wt))
    rates = {d: w.nbytes / t / 1e9 for d, t in zip(PREFETCH_CANDIDATES, secs)}
    best = max(rates, key=rates.get)
    native.lib().qdot_set_prefetch(best)
    return {"prefetch_ahead": best, "prefetch_gbs": {str(d): round(r, 2) for d, r in rates.items()}}


def moe_prefill_tflops(qt: int, rng, hidden: int, inter: int, reps: int, experts: int = 4, top_k: int = 2) -> float:
    """TFLOP/s of the engine's fused expert call (native.moe_topk) on a PREFILL_TOKENS-token chunk of one
    quant type, counted as expert FLOPs: it also gathers each (token, expert) pair's activations, quantises
    the hidden activations and sums the outputs, which a single-matrix rate misses (~1.4x in prefill)."""
    from offload.gguf.testing import random_blocks
    from offload.gguf.types import block_format
    from offload.kernels.cpu import native

    fmt = block_format(qt)
    if hidden % fmt.block_size or inter % fmt.block_size:
        return 0.0

    def stack(rows: int, cols: int) -> tuple[np.ndarray, int]:
        raw = random_blocks(qt, experts * rows * cols // fmt.block_size, rng).reshape(experts * rows, -1)
        w, wt = native.repack(raw, qt) if native.repacks(qt, rows) else (raw, qt)
        return w.reshape(experts, rows, -1), wt  # a repacked stack keeps each expert's 16-row groups

    (gate, t), (up, _), (down, td) = stack(inter, hidden), stack(inter, hidden), stack(hidden, inter)
    x = rng.standard_normal((PREFILL_TOKENS, hidden), dtype=np.float32) * 0.01
    loc = np.argsort(rng.random((PREFILL_TOKENS, experts)), axis=1)[:, :top_k]  # (T, K) distinct experts
    wts = np.full((PREFILL_TOKENS, top_k), 1.0 / top_k, np.float32)
    secs = _median_time(lambda: native.moe_topk(x, loc, wts, gate, up, down, (t, t, td)), max(2, reps // 2))
    return round(2 * 3 * hidden * inter * PREFILL_TOKENS * top_k / secs / 1e12, 3)


def step_overheads(tokens: int = 48) -> dict[str, float]:
    """Seconds of a decode step that do not scale with bytes: per layer and per token. A small Q8_0 model
    (hidden 256) is timed at 2 and 8 layers; its bytes take microseconds, so the time is the fixed cost."""
    import torch

    import offload
    from offload.synthetic import write_qwen3moe

    step = {}
    with tempfile.TemporaryDirectory(prefix="offload-probe.") as d:
        for layers in (2, 8):
            path = write_qwen3moe(Path(d) / f"probe-{layers}.gguf", layers)
            llm = offload.load(path, device="cpu", ctx=tokens + 8, placement="cpu", progress=False)
            cache = llm.model.new_cache(tokens + 8)
            llm.model.forward(torch.tensor([1, 2, 3, 4]), cache)
            times = []
            for i in range(tokens):
                t = time.perf_counter()
                llm.model.forward(torch.tensor([(5 + i) % 16]), cache, last_only=True)
                times.append(time.perf_counter() - t)
            step[layers] = statistics.median(times)
    per_layer = max((step[8] - step[2]) / 6, 0.0)
    return {"layer_s": per_layer, "token_s": max(step[2] - 2 * per_layer, 0.0)}


def prefill_overheads(cal: dict, tokens: int = 256, hidden: int = 1024, reps: int = 3) -> float:
    """Seconds per token per unit of hidden width that a CPU layer's prefill spends outside what the planner
    counts (matrices at the measured kernel rates, attention scores at the measured rate): norms, rotations,
    the router, residual adds, copies, Python. A small Q8_0 model is timed at two depths on a `tokens`-token
    prompt and the planner's own prediction for the same file, with `cal`'s rates, is taken off."""
    import torch

    import offload
    from offload.placement import cost, planner
    from offload.placement.hardware import GB, Hardware
    from offload.planning import model_spec
    from offload.synthetic import write_qwen3moe

    measured, predicted = {}, {}
    with tempfile.TemporaryDirectory(prefix="offload-probe.") as d:
        for layers in (2, 8):
            path = write_qwen3moe(Path(d) / f"prefill-{layers}.gguf", layers, hidden=hidden, heads=8, kv_heads=2)
            llm = offload.load(path, device="cpu", ctx=tokens + 8, placement="cpu", progress=False)
            ids = torch.arange(tokens) % 16

            def prefill():
                llm.model.forward(ids, llm.model.new_cache(tokens + 8), last_only=True)

            measured[layers] = _median_time(prefill, reps)
            spec, quant = model_spec(str(path))
            hw = Hardware(gpus=[], ram_bytes=2**40, dram_bw=cal["dram_gbs"] * GB, pcie_bw=GB, cpu_cores=1,
                          calibration=cal)
            lays = planner.plan(spec, hw, quant, None, planner.PlanOptions(context=tokens + 8)).layouts()
            predicted[layers] = tokens / cost.prefill(lays, hw, tokens, "cpu")
            del llm
    per_layer = (measured[8] - measured[2] - predicted[8] + predicted[2]) / 6
    return max(per_layer, 0.0) / (tokens * hidden)


def attention_tflops(tokens: int = 1024, heads: int = 32, kv_heads: int = 4, head_dim: int = 128) -> float:
    """TFLOP/s of the engine's CPU prefill attention (models.base.grouped_attention, float32) on a causal
    `tokens`-token chunk, counted as the planner counts it: 4 * heads * head_dim per (query, key) pair kept."""
    import torch

    from offload.models.base import grouped_attention

    q = torch.randn(heads, tokens, head_dim)
    k, v = torch.randn(kv_heads, tokens, head_dim), torch.randn(kv_heads, tokens, head_dim)
    t = _median_time(lambda: grouped_attention(q, k, v, 0, head_dim ** -0.5), 3)
    return round(4 * heads * head_dim * tokens * (tokens + 1) / 2 / t / 1e12, 4)


def gpu_rates(device: int = 0) -> dict[str, float]:
    """GEMV GB/s of a bf16 weight on the GPU (torch), and the cost of one kernel launch + host sync."""
    import torch

    dev = torch.device("cuda", device)
    w = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    x = torch.randn(1, 8192, device=dev, dtype=torch.bfloat16)

    def gemv():
        for _ in range(10):
            x @ w.T
        torch.cuda.synchronize(dev)

    gbs = 10 * w.numel() * 2 / _median_time(gemv, 5)
    y = torch.zeros(1, device=dev)

    def launch_sync():
        y.add_(1)
        torch.cuda.synchronize(dev)

    return {"gemv_gbs": round(gbs / 1e9, 1), "launch_sync_s": _median_time(launch_sync, 50)}


def calibrate(types=DEFAULT_TYPES, quick: bool = False, gpus: int = 0) -> dict:
    """Everything above, as the hardware profile's `calibration` block (figures and where they came from)."""
    import os

    import torch

    reads = dram_reads(256 if quick else 1024, 5 if quick else 9)
    prefetch = prefetch_choice(mb=64 if quick else 256)  # first: the kernel rates below are measured with it
    cal = {
        **prefetch,
        "threads": torch.get_num_threads(),
        "dram_reads_gbs": [round(r / 1e9, 2) for r in reads],
        "dram_gbs": round(statistics.median(reads) / 1e9, 2),
        "kernels": kernel_rates(sorted(set(types) | {"Q8_0"}), mb=64 if quick else 256),  # Q8_0: the probe models
        **step_overheads(24 if quick else 48),
        "attention_tflops": attention_tflops(512 if quick else 1024),
        "gpus": [gpu_rates(i) for i in range(gpus)],
    }
    cal["prefill_s_per_token_hidden"] = prefill_overheads(cal, reps=2 if quick else 3)
    cal["source"] = f"offload probe, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} logical CPUs"
    return cal
