"""The cost model: decode and prefill speed, load time, from a layer-by-layer layout.

Every constant is listed in `assumptions()` and in docs/placement.md. Decode is memory-bound and runs as the
runtime runs it: per layer attention + router first (the next layer needs this layer's output), then the shared
expert and the GPU experts while the CPU computes its experts, then a sync: attention + max(shared + GPU experts,
CPU experts) + sync. max(whole GPU part, CPU part) is only what pipelining two sequences could reach. Prefill
compares computing a CPU expert on the CPU with streaming its weights over PCIe to the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import numpy as np

from .hardware import GB, Hardware
from .quant import held_on_cpu

CPU_EFFICIENCY = 0.80  # fraction of DRAM bandwidth offload's CPU expert kernels reach in decode
GPU_EFFICIENCY = 0.70  # fraction of GPU memory bandwidth small-batch GEMV reaches
GPU_PREFILL_EFFICIENCY = 0.50  # fraction of dense bf16 TFLOP/s big-batch GEMM reaches
LLAMA_CPP_EFFICIENCY = 0.63  # llama.cpp on the lent rig (DESIGN.md)
KTRANSFORMERS_EFFICIENCY = 0.33  # KTransformers' published DeepSeek-V3 number
SYNC_S = 30e-6
PREFILL_TOKENS_MEASURED = 512  # the chunk offload/calibrate.py times the CPU kernels at
PREFILL_CHUNK = 2048  # tokens per prefill chunk (the GPU activation reserve is sized for it)  # per MoE layer with CPU experts: one fused CPU call + event sync + activation copies


@dataclass
class LayerLayout:
    """What one decoder layer reads and where it lives."""

    index: int
    device: str  # home of attention / norms / router / shared / dense ("gpu:0", "gpu:1", "cpu")
    fixed_bytes: float  # weights read by every token (attention, norms, router, shared or dense FFN)
    overlap_bytes: float = 0.0  # the part of fixed_bytes that runs beside the CPU experts (shared experts)
    fixed_params: float = 0.0  # parameters of those weights (prefill FLOPs)
    kv_read: float = 0.0  # KV bytes one decode step reads per sequence at the decode position
    attn_flops_per_key: float = 0.0  # score + value FLOPs of one query against one key
    attn_key_limit: int = 0  # DSA: a query attends to at most this many keys (0: all)
    index_flops_per_key: float = 0.0  # DSA indexer: scores every key
    expert_bytes: float = 0.0  # one routed expert
    expert_params: float = 0.0
    freq: np.ndarray = field(default_factory=lambda: np.zeros(0))  # expected reads per token (sums to top_k)
    on_gpu: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    expert_quant: dict[str, float] = field(default_factory=dict)  # storage type -> share of the bytes, for the
    fixed_quant: dict[str, float] = field(default_factory=dict)  # calibrated CPU kernel rates
    hidden: int = 0  # activation width: the norms, rotations, residual adds and copies of prefill scale with it
    # DSA with the latent cache in RAM on a GPU layer: one cached row's bytes, and the selected rows one decode
    # step copies over PCIe per sequence (min(position, index_topk) rows); 0 when the KV lives with the layer
    kv_ram_row: float = 0.0
    kv_move: float = 0.0

    @property
    def moe(self) -> bool:
        return len(self.freq) > 0


def step_reads(freq: np.ndarray, batch: int) -> np.ndarray:
    """Expected number of times an expert's weights are read in one decode step of `batch` sequences:
    once if any of them picks it."""
    p = np.clip(freq, 0.0, 1.0)
    return 1.0 - (1.0 - p) ** batch


def _mixed(shares: dict[str, float] | str, rate) -> float:
    """The rate of weights stored in several types, by their shares of the bytes: 1 / sum(share / rate)."""
    if isinstance(shares, str):
        shares = {shares: 1.0}
    if not shares:
        return rate("")
    return 1.0 / sum(f / rate(t) for t, f in shares.items() if f > 0)


def cpu_read_bw(hw: Hardware, shares: dict[str, float] | str, cpu_eff: float | None) -> float:
    """bytes/s the CPU reads weights stored in these types at in decode: with cpu_eff None, what the engine's
    own kernels measured here (`offload probe`), else CPU_EFFICIENCY of DRAM; a given cpu_eff scales DRAM
    (roofline, llama.cpp's efficiency)."""
    if cpu_eff is not None:
        return hw.dram_bw * cpu_eff
    kernels = hw.calibration.get("kernels", {})

    def rate(t: str) -> float:  # stored bytes per second
        name, grow = held_on_cpu(t)
        return (kernels[name]["gemv_gbs"] * GB if name in kernels else hw.dram_bw * CPU_EFFICIENCY) / grow

    return _mixed(shares, rate)


def cpu_flops(hw: Hardware, shares: dict[str, float] | str, experts: bool = False) -> float:
    """FLOP/s of the CPU on a prefill chunk of weights in these types: measured by `offload probe` (experts:
    the fused expert call's rate, which includes its per-pair gathers and sums), else estimated (the time
    splits by bytes, as the FLOPs do for types of one layer's matrices)."""
    kernels = hw.calibration.get("kernels", {})

    def rate(t: str) -> float:
        k = kernels.get(held_on_cpu(t)[0], {})
        return (k.get("moe_prefill_tflops") if experts else None) or k.get("prefill_tflops") or hw.cpu_tflops

    return _mixed(shares, lambda t: rate(t) * 1e12)


def gpu_read_bw(hw: Hardware, device: str, gpu_eff: float | None) -> float:
    """bytes/s a GPU reads weights at in decode: with gpu_eff None, the GEMV rate `offload probe` measured on
    that GPU when there is one, else GPU_EFFICIENCY of its memory bandwidth; a given gpu_eff scales it."""
    g = int(device[4:])
    measured = hw.calibration.get("gpus") or []
    if gpu_eff is None and g < len(measured) and measured[g].get("gemv_gbs"):
        return measured[g]["gemv_gbs"] * GB
    return hw.gpus[g].mem_bw * (GPU_EFFICIENCY if gpu_eff is None else gpu_eff)


def sync_s(hw: Hardware) -> float:
    """Seconds a layer with CPU experts waits on their result: a launch + host sync, measured by `offload probe`
    on the first GPU, else SYNC_S."""
    measured = hw.calibration.get("gpus") or []
    return measured[0].get("launch_sync_s", SYNC_S) if measured else SYNC_S


def kv_move_s(lay: LayerLayout, hw: Hardware, batch: int = 1) -> float:
    """Seconds a decode step spends copying the selected latent rows RAM -> GPU in one layer (0 when its KV lives
    with it). The host gather of those rows (a DRAM read of the same bytes) is not counted: DRAM is faster."""
    return lay.kv_move * batch / hw.pcie_bw if lay.device.startswith("gpu") else 0.0


def layer_decode_parts(lay: LayerLayout, hw: Hardware, batch: int, cpu_eff: float | None,
                       gpu_eff: float | None = None):
    """(first, beside, cpu, sync) seconds of one decode step in one layer: `first` runs before the experts
    (attention, norms, router: on the GPU, or the whole layer when it lives on the CPU), `beside` on the GPU
    while the CPU computes its experts (shared expert + GPU-resident experts), `cpu` the CPU experts.
    cpu_eff None: the engine's calibrated rates and fixed costs (cpu_read_bw)."""
    gpu_bw = gpu_read_bw(hw, lay.device, gpu_eff) if lay.device.startswith("gpu") else 0.0
    cpu_bw = cpu_read_bw(hw, lay.expert_quant, cpu_eff)
    fixed = lay.fixed_bytes + lay.kv_read * batch
    if lay.moe:
        reads = step_reads(lay.freq, batch) * lay.expert_bytes
        gpu_e, cpu_e = float(reads[lay.on_gpu].sum()), float(reads[~lay.on_gpu].sum())
    else:
        gpu_e = cpu_e = 0.0
    if not gpu_bw:  # a layer on the CPU: every part one after the other, plus its fixed cost when calibrated
        fixed_bw = cpu_read_bw(hw, lay.fixed_quant, cpu_eff)
        kv_bw = hw.dram_bw * (CPU_EFFICIENCY if cpu_eff is None else cpu_eff)
        overhead = hw.calibration.get("layer_s", 0.0) if cpu_eff is None else 0.0
        return (lay.fixed_bytes / fixed_bw + lay.kv_read * batch / kv_bw + (gpu_e + cpu_e) / cpu_bw
                + overhead), 0.0, 0.0, 0.0
    overlap = lay.overlap_bytes if cpu_e > 0 else 0.0  # with no CPU experts nothing runs beside
    sync = sync_s(hw) if cpu_e > 0 else 0.0
    # the selected rows must reach the GPU before attention: the copy runs before everything else of the layer
    return (fixed - overlap) / gpu_bw + kv_move_s(lay, hw, batch), (overlap + gpu_e) / gpu_bw, cpu_e / cpu_bw, sync


def decode(layers: list[LayerLayout], hw: Hardware, head_bytes: float, head_device: str, batch: int = 1,
           cpu_eff: float | None = None, gpu_eff: float | None = None,
           head_quant: dict[str, float] | str = "") -> dict:
    """Decode tokens/s (all sequences together): as the runtime runs a step (exact overlap), with two
    sequences pipelined (max of the GPU and CPU totals per layer), and serial; plus the per-layer parts."""
    exact = pipelined = serial = 0.0
    gpu_total = cpu_total = 0.0
    for lay in layers:
        first, beside, c, s = layer_decode_parts(lay, hw, batch, cpu_eff, gpu_eff)
        exact += first + max(beside, c) + s
        pipelined += max(first + beside, c) + s
        serial += first + beside + c + s
        gpu_total, cpu_total = gpu_total + first + beside, cpu_total + c
    if head_device.startswith("gpu"):
        head = head_bytes / gpu_read_bw(hw, head_device, gpu_eff)
    else:
        head = head_bytes / cpu_read_bw(hw, head_quant, cpu_eff)
    if cpu_eff is None:
        head += hw.calibration.get("token_s", 0.0)
    exact, pipelined, serial = exact + head, pipelined + head, serial + head
    return {"tok_s": batch / exact, "tok_s_pipelined": batch / pipelined, "tok_s_serial": batch / serial,
            "step_s": exact, "gpu_s": gpu_total, "cpu_s": cpu_total}


def cpu_bytes_per_token(layers: list[LayerLayout]) -> float:
    """Bytes the CPU reads per token (batch 1): its routed experts', and the whole of each layer living there."""
    total = 0.0
    for lay in layers:
        if lay.moe:
            total += float((lay.freq[~lay.on_gpu] * lay.expert_bytes).sum())
        if not lay.device.startswith("gpu"):
            total += lay.fixed_bytes
    return total


def attention_flops(lay: LayerLayout, n: int) -> float:
    """Causal attention FLOPs over an n-token prompt: sum over queries t of min(t, limit) keys."""
    k = lay.attn_key_limit or n
    keys = n * (n + 1) / 2 if n <= k else k * (k + 1) / 2 + (n - k) * k
    return lay.attn_flops_per_key * keys + lay.index_flops_per_key * n * (n + 1) / 2


def prefill(layers: list[LayerLayout], hw: Hardware, n_tokens: int, mode: str = "best",
            chunk: int = PREFILL_CHUNK) -> float:
    """Prefill tokens/s for one prompt of n_tokens, run in chunks of `chunk` tokens (each chunk reads or
    streams the experts again). mode: "cpu" computes every CPU expert on the CPU, "stream" copies every
    touched CPU expert to the GPU, "best" splits them to minimise the layer time (the CPU and the PCIe
    copies run concurrently)."""
    n_chunks = -(-n_tokens // chunk)
    m = min(n_tokens, chunk)
    return n_tokens / (n_chunks * _prefill_chunk(layers, hw, m, mode)
                       + sum(_attn_time(lay, hw, n_tokens) + kv_prefill_moves(lay, n_tokens, chunk) / hw.pcie_bw
                             for lay in layers))


def kv_prefill_moves(lay: LayerLayout, n_tokens: int, chunk: int = PREFILL_CHUNK) -> float:
    """Bytes a prefill copies over PCIe for a GPU layer whose latent cache lives in RAM: each chunk's rows written
    to RAM, and the distinct rows its queries selected read back, at most min(positions so far, chunk x K)."""
    if not lay.kv_ram_row or not lay.device.startswith("gpu"):
        return 0.0
    k = lay.attn_key_limit or n_tokens
    rows = sum(min(end, (end - c0) * k) for c0 in range(0, n_tokens, chunk) for end in [min(n_tokens, c0 + chunk)])
    return (n_tokens + rows) * lay.kv_ram_row


def _attn_time(lay: LayerLayout, hw: Hardware, n: int) -> float:
    if lay.device.startswith("gpu"):
        return attention_flops(lay, n) / (hw.gpus[int(lay.device[4:])].tflops * 1e12 * GPU_PREFILL_EFFICIENCY)
    return attention_flops(lay, n) / (hw.calibration.get("attention_tflops", hw.cpu_tflops) * 1e12)


def _prefill_chunk(layers: list[LayerLayout], hw: Hardware, n_tokens: int, mode: str) -> float:
    """Seconds for one chunk of n_tokens, without the attention score FLOPs."""
    total = 0.0
    for lay in layers:
        dense_flops = 2 * lay.fixed_params * n_tokens
        if lay.device.startswith("gpu"):
            gpu = hw.gpus[int(lay.device[4:])]
            f_gpu = gpu.tflops * 1e12 * GPU_PREFILL_EFFICIENCY
            t = dense_flops / f_gpu + lay.fixed_bytes / gpu.mem_bw
        else:
            f_gpu, gpu = 0.0, None
            t = max(dense_flops / cpu_flops(hw, lay.fixed_quant), lay.fixed_bytes / hw.dram_bw)
            t += n_tokens * lay.hidden * hw.calibration.get("prefill_s_per_token_hidden", 0.0)
        if lay.moe:
            n_e = lay.freq * n_tokens  # expected tokens per expert
            touched = 1.0 - (1.0 - np.clip(lay.freq, 0, 1)) ** n_tokens
            flops = 2 * lay.expert_params * n_e
            f_cpu = cpu_flops(hw, lay.expert_quant, experts=True)
            if gpu is not None:
                t += float(flops[lay.on_gpu].sum()) / f_gpu
            cpu_n = n_e[~lay.on_gpu]
            cpu_c = np.maximum(2 * lay.expert_params * cpu_n / f_cpu, lay.expert_bytes * touched[~lay.on_gpu]
                               / hw.dram_bw)
            stream = lay.expert_bytes * touched[~lay.on_gpu] / hw.pcie_bw + 2 * lay.expert_params * cpu_n / max(
                f_gpu, 1.0)
            if gpu is None or mode == "cpu" or len(cpu_c) == 0:
                t += float(cpu_c.sum())
            elif mode == "stream":
                t += float(stream.sum())
            else:
                order = np.argsort(-cpu_c / np.maximum(stream, 1e-12))  # stream where the CPU is slowest
                s_cum = np.concatenate([[0.0], np.cumsum(stream[order])])
                c_rest = np.concatenate([np.cumsum(cpu_c[order][::-1])[::-1], [0.0]])
                t += float(np.min(np.maximum(s_cum, c_rest)))
        total += t
    return total


def crossover_tokens(expert_params: float, expert_bytes: float, hw: Hardware) -> float:
    """Tokens routed to one expert above which copying it over PCIe beats computing it on the CPU:
    n > b * F_cpu / (2 * P * B_pcie)."""
    return crossover(expert_params, expert_bytes, hw.cpu_tflops * 1e12, hw.pcie_bw)


def crossover(expert_params: float, expert_bytes: float, cpu_flops: float, pcie_bw: float) -> float:
    """crossover_tokens from the figures themselves (FLOP/s, bytes/s): the engine's (offload.streaming)."""
    return expert_bytes * cpu_flops / (2 * expert_params * pcie_bw)


STREAM_MIN_TOKENS = 16  # a tl.dot block: decode steps and small batches never stream


def stream_prompt_tokens(tokens_per_expert: float, n_experts: int, top_k: int) -> int:
    """The chunk length from which a layer's CPU experts are streamed to the GPU (offload.streaming): a chunk of T
    tokens gives an expert T * top_k / E of them on average, streamed above the crossover; STREAM_MIN_TOKENS at
    least."""
    return max(STREAM_MIN_TOKENS, math.floor(tokens_per_expert * n_experts / top_k) + 1)


def load_time(total_bytes: float, gpu_bytes: float, hw: Hardware) -> float:
    """Cold start: read every weight from disk; GPU weights cross PCIe while the disk reads."""
    return max(total_bytes / hw.disk_bw, gpu_bytes / hw.pcie_bw)


def calibration_notes(hw: Hardware) -> list[str]:
    """Which CPU figures are measured (by `offload probe`, and when) and which are assumed."""
    cal = hw.calibration
    kernels = cal.get("kernels", {})
    assumed = (f"CPU weights of other types assumed read at {CPU_EFFICIENCY:.0%} of DRAM bandwidth (offload's "
               f"target; llama.cpp reaches {LLAMA_CPP_EFFICIENCY:.0%}, KTransformers {KTRANSFORMERS_EFFICIENCY:.0%})")
    if not kernels:
        return [assumed.replace("of other types ", "") + ", and no fixed cost per layer: not measured here "
                "(run `offload probe` to calibrate)"]
    rates = ", ".join(f"{t} {k['gemv_gbs']:.0f} GB/s / {k['prefill_tflops']:.2f} TFLOP/s"
                      + (f" / {k['moe_prefill_tflops']:.2f}" if k.get("moe_prefill_tflops") else "")
                      for t, k in sorted(kernels.items()))
    out = [f"measured by {cal.get('source', 'offload probe')} with {cal.get('threads', '?')} threads: CPU "
           f"kernels at one token / at a {PREFILL_TOKENS_MEASURED}-token chunk (/ as fused experts): {rates}",
           f"measured fixed cost of a decode step: {cal.get('layer_s', 0) * 1e6:.0f} us per CPU layer, "
           f"{cal.get('token_s', 0) * 1e6:.0f} us per token", assumed]
    if cal.get("attention_tflops"):
        out.append(f"measured CPU prefill attention: {cal['attention_tflops']:.3f} TFLOP/s")
    if "prefill_s_per_token_hidden" in cal:
        out.append(f"measured prefill cost of a CPU layer beside its matrices and scores (norms, rotations, "
                   f"copies): {cal['prefill_s_per_token_hidden'] * 4096 * 1e6:.1f} us per token at hidden 4096")
    if cal.get("dram_reads_gbs"):
        out.append(f"DRAM: median of {len(cal['dram_reads_gbs'])} reads, {min(cal['dram_reads_gbs']):.0f}-"
                   f"{max(cal['dram_reads_gbs']):.0f} GB/s")
    return out


def gpu_notes(hw: Hardware) -> list[str]:
    """Which GPU figures are measured (`offload probe` on a machine with GPUs) and which are assumed."""
    measured = hw.calibration.get("gpus") or []
    out = []
    for i, g in enumerate(hw.gpus):
        m = measured[i] if i < len(measured) else {}
        if m.get("gemv_gbs"):
            out.append(f"gpu:{i} weight reads at {m['gemv_gbs']:.0f} GB/s (measured: a bf16 GEMV, "
                       f"{m['gemv_gbs'] * GB / g.mem_bw:.0%} of its memory bandwidth)")
        else:
            out.append(f"gpu:{i} weight reads assumed at {GPU_EFFICIENCY:.0%} of its memory bandwidth")
    if hw.gpus:
        sync = "measured" if measured and "launch_sync_s" in measured[0] else "assumed"
        out.append(f"a launch + host sync {sync} at {sync_s(hw) * 1e6:.0f} us; prefill GEMMs assumed at "
                   f"{GPU_PREFILL_EFFICIENCY:.0%} of dense bf16 TFLOP/s")
    return out


def assumptions(hw: Hardware, batch: int, position: int) -> list[str]:
    out = [
        "decode: each layer's time = attention + router, then max(shared expert + GPU experts, CPU experts), "
        f"+ {sync_s(hw) * 1e6:.0f} us sync when the layer has CPU experts (the runtime's exact overlap: the next "
        "layer needs this one's output); the pipelined figure (max of the whole GPU and CPU parts, two sequences "
        "alternating) is an upper bound, the serial figure adds every part",
        *calibration_notes(hw),
        *gpu_notes(hw),
        f"decode predicted for {batch} concurrent sequence(s) at context position {position}; an expert's weights "
        "are read once per step if any sequence picks it",
        "the embedding table is read one row per token (its bytes do not count toward decode)",
        f"DRAM {hw.dram_bw / GB:.0f} GB/s, PCIe {hw.pcie_bw / GB:.0f} GB/s, CPU {hw.cpu_tflops:.1f} TFLOP/s "
        f"for prefill matmuls, disk {hw.disk_bw / GB:.1f} GB/s for the cold load",
        f"prefill: one prompt in {PREFILL_CHUNK}-token chunks; attention, dense and shared parts on the GPU; in "
        "each chunk each CPU expert is either computed on the CPU (max of FLOPs and weight reads) or copied "
        "over PCIe to the GPU, the two paths run concurrently, and the split minimises each layer's time",
        "prefill streaming assumes pinned host memory at the PCIe bandwidth; calibration: on the lent rig's "
        "15-layer GLM-5 slice llama.cpp measured 788 tok/s (512-token prompt) where this model, given "
        "llama.cpp's way (pageable memory at 10 GB/s, 512-token ubatches), predicts 972; pinned 55 GB/s with "
        "2048-token chunks predicts ~4700",
        "roofline: the same placement at 100 % of every bandwidth with no sync cost",
    ]
    return out
