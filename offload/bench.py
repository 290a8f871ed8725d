"""Benchmarks that print ratios against a baseline measured in the same run.

    offload bench cpu-moe [--threads N] [--mb 512] [--experts 32] [--quick]

cpu-moe: DRAM read bandwidth (torch.sum over a big buffer); each CPU kernel's GB/s at M=1 and
tokens/s at M=16 / 128 on a weight set larger than the caches; torch's int4pack kernel as a
baseline; the fused moe_cpu op on GLM-4.5-Air-shaped experts (H 4096, I 1408, top-8). Prints
markdown tables.
"""

import argparse
import platform
import time

import numpy as np


def _best(fn, reps: int = 5, min_time: float = 0.0) -> float:
    fn()  # warm-up (numba compile, page faults)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def dram_bandwidth(mb: int) -> float:
    """GB/s of torch.sum over a float32 buffer of `mb` MB (read-only stream, all threads)."""
    import torch

    buf = torch.ones(mb * 2**20 // 4)
    return buf.numel() * 4 / _best(lambda: buf.sum(), reps=7) / 1e9


def _random_weights(qt: int, n: int, k: int, rng) -> np.ndarray:
    """(n, k_bytes) random blocks with small fp16 scales (values do not change the speed)."""
    from offload.gguf.testing import random_blocks
    from offload.kernels.cpu.quantmm import block_info

    bs, bb = block_info(qt)
    raw = random_blocks(qt, n * k // bs, rng)
    return raw.reshape(n, k // bs * bb)


def bench_kernels(mb: int, k: int, dram: float, quick: bool) -> list[tuple]:
    import torch

    from offload.kernels.cpu import dequant as dq
    from offload.kernels.cpu import quantmm as qm

    from offload.kernels.cpu import native

    rng = np.random.default_rng(0)
    rows = []
    names = ["q4_k", "q8_0"] if quick else ["q4_k", "q8_0", "q6_k", "q5_k", "q4_0", "q2_k", "q3_k", "iq4_xs"]
    for name in names:
        qt = qm.FORMATS[name]
        bs, bb = dq.FAST_TYPES[qt]
        n = max(16, mb * 2**20 // (k // bs * bb))
        w = _random_weights(qt, n, k, rng)
        x1 = np.asarray(rng.standard_normal((1, k)), np.float32)
        out = np.empty((1, n), np.float32)
        has_native = native.supported(qt)
        r = {"name": name, "engine": "native" if native.fast(qt) else "numba",
             "numba": w.nbytes / _best(lambda: qm._gemv_kernel(w, qt, x1, out)) / 1e9,
             "native": w.nbytes / _best(lambda: native.gemv(x1, w, qt)) / 1e9 if has_native else None}
        r["gbs"] = r["native"] if native.fast(qt) else r["numba"]
        ws = w[: max(16, n // 8)]  # batches are compute-bound: an eighth of the rows is enough to time
        scale = ws.shape[0] / n  # tok/s reported for the whole weight set
        cross = None
        for m in (4, 8, 16, 32, 64, 128) if name in ("q4_k", "q8_0") else (16, 128):
            xm = torch.randn(m, k)
            tg = _best(lambda: qm.gemv(xm, ws, qt), reps=2)
            tn = _best(lambda: native.gemv(xm, ws, qt), reps=2) if has_native else None
            tm = _best(lambda: qm.gemm(xm, ws, qt), reps=2)
            r[m] = (m * scale / tn if tn else None, m * scale / tg, m * scale / tm)
            if cross is None and tm < (tn if native.fast(qt) else tg):
                cross = m
        r["cross"] = cross
        rows.append(r)
        if native.repacks(qt, n):  # the layout the engine loads these types into (csrc/repack.h)
            r["engine"] = "native, file layout"
            wr, qr = native.repack(w, qt)
            wsr = native.repack(ws, qt)[0]
            rr = {"name": f"{name} interleaved", "engine": "native (the engine's)",
                  "native": wr.nbytes / _best(lambda: native.gemv(x1, wr, qr)) / 1e9}
            rr["gbs"] = rr["native"]
            for m in (16, 128):
                xm = torch.randn(m, k)
                rr[m] = (m * scale / _best(lambda: native.gemv(xm, wsr, qr), reps=2), None, None)
            rows.append(rr)
            del wr, wsr
        del w, ws
    # Q4_K repacked into torch's int4 layout with bf16 scale + zero (kernels/cpu/int4pack.py)
    from offload.kernels.cpu import int4pack as i4

    n = max(16, mb * 2**20 // (k // 256 * 144)) // 16 * 16
    wk = _random_weights(dq.Q4_K, n, k, rng)
    chunks = [i4.repack(wk[i:i + 4096], dq.Q4_K) for i in range(0, n, 4096)]  # bounded temporaries
    del wk
    nbytes = sum(p.numel() + z.numel() * 2 for p, z in chunks)
    x1 = torch.randn(1, k)
    r = {"name": "q4_k repacked to int4pack (bf16)",
         "gbs": nbytes / _best(lambda: [i4.mm(x1, p, z) for p, z in chunks]) / 1e9}
    for m in (16, 128):
        xm = torch.randn(m, k)
        r[m] = (None, None, m / _best(lambda: [i4.mm(xm, p, z) for p, z in chunks], reps=2))
    rows.append(r)
    del chunks
    # bf16 weights through torch (oneDNN); the int4pack baseline
    n = max(16, mb * 2**20 // (k * 2))
    wb = torch.randn(n, k, dtype=torch.bfloat16)
    xb = torch.randn(1, k, dtype=torch.bfloat16)
    r = {"name": "bf16 (torch)", "gbs": wb.numel() * 2 / _best(lambda: xb @ wb.T) / 1e9}
    for m in (16, 128):
        xm = torch.randn(m, k, dtype=torch.bfloat16)
        r[m] = (None, None, m / _best(lambda: xm @ wb.T, reps=2))
    rows.append(r)
    del wb
    n = max(16, mb * 2**20 // (k // 2 + k // 32 * 4)) // 16 * 16
    wq = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    sz = torch.rand(k // 32, n, 2, dtype=torch.bfloat16)
    nbytes = wq.numel() + sz.numel() * 2
    x1 = torch.randn(1, k, dtype=torch.bfloat16)
    r = {"name": "torch int4pack (bf16, g32)", "gbs": nbytes / _best(
        lambda: torch._weight_int4pack_mm_for_cpu(x1, wq, 32, sz)) / 1e9}
    for m in (16, 128):
        xm = torch.randn(m, k, dtype=torch.bfloat16)
        r[m] = (None, None, m / _best(lambda: torch._weight_int4pack_mm_for_cpu(xm, wq, 32, sz), reps=2))
    rows.append(r)
    return rows


def bench_moe(n_experts: int, dram: float, quick: bool) -> list[tuple]:
    """moe_cpu on GLM-4.5-Air expert shapes (H 4096, I 1408), Q4_K gate/up + Q8_0 down, top-8.

    Q8_0 down because 1408 is not a multiple of 256, so llama.cpp's Q4_K_M cannot use a K-quant there
    either; it falls back to a 32-block type.
    """
    import torch

    from offload.kernels.cpu import dequant as dq
    from offload.kernels.cpu.moe import CpuExperts, moe_cpu

    H, I, top = 4096, 1408, 8
    if quick:
        H, I = 2048, 704
    rng = np.random.default_rng(1)
    g = np.stack([_random_weights(dq.Q4_K, I, H, rng) for _ in range(n_experts)])
    u = np.stack([_random_weights(dq.Q4_K, I, H, rng) for _ in range(n_experts)])
    d = np.stack([_random_weights(dq.Q8_0, H, I, rng) for _ in range(n_experts)])
    ex = CpuExperts(g, u, d, (dq.Q4_K, dq.Q4_K, dq.Q8_0))
    per_expert = (g[0].nbytes + u[0].nbytes + d[0].nbytes)
    from offload.kernels.cpu import native

    rows = []
    paths = (["native rows, interleaved (the engine's)", "native rows, file layout"]
             if native.fast(dq.Q4_K, dq.Q8_0) else []) + ["numba rows", "int4pack gate/up"]
    simd = native.SIMD_TYPES
    plain_ex = ex
    for path in paths:
        native.SIMD_TYPES = simd if path.startswith("native") else set()  # which row kernel moe_cpu takes
        ex = plain_ex
        if "interleaved" in path:
            (rg, qg), (ru, qu), (rd, qd) = (native.repack(m, q) for m, q in ((g, dq.Q4_K), (u, dq.Q4_K), (d, dq.Q8_0)))
            ex = CpuExperts(rg, ru, rd, (qg, qu, qd))
        if path == "int4pack gate/up":
            ex.repack_int4pack()
        for T in (1, 16, 128):
            x = torch.randn(T, H)
            ids = torch.stack([torch.randperm(n_experts)[:top] for _ in range(T)])
            w = torch.rand(T, top)
            touched = len(torch.unique(ids))
            t = _best(lambda: moe_cpu(x, ids, w, ex), reps=3)
            gbs = touched * per_expert / t / 1e9
            rows.append((path, T, touched, T / t, gbs, gbs / dram))
    native.SIMD_TYPES = simd
    return rows


def cpu_moe(argv=None) -> None:
    p = argparse.ArgumentParser(prog="offload bench cpu-moe")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--mb", type=int, default=512, help="MB of weights per kernel (well above L3)")
    p.add_argument("--k", type=int, default=4096, help="row length K")
    p.add_argument("--experts", type=int, default=32, help="experts in the fused-op layer")
    p.add_argument("--quick", action="store_true", help="small sizes, Q4_K and Q8_0 only")
    a = p.parse_args(argv)
    if a.quick:
        a.mb, a.experts, a.k = min(a.mb, 128), min(a.experts, 16), min(a.k, 2048)

    from offload.kernels.cpu.quantmm import GEMM_MIN_TOKENS, NATIVE_GEMM_MIN_TOKENS
    from offload.kernels.cpu import native
    from offload.kernels.cpu.threads import numa_nodes, set_threads

    n = set_threads(a.threads)
    import numba
    import torch

    dram = dram_bandwidth(max(a.mb, 256))
    print(f"## cpu-moe: {platform.processor() or platform.machine()}, {n} threads, torch {torch.__version__}, "
          f"numba {numba.__version__}, NUMA nodes {numa_nodes() or 'n/a'}\n")
    print(f"DRAM read bandwidth (torch.sum, {max(a.mb, 256)} MB): **{dram:.1f} GB/s**\n")
    rows = bench_kernels(a.mb, a.k, dram, a.quick)
    print(f"### Kernels ({a.mb} MB of weights, K={a.k}; tok/s = tokens through the whole weight set)\n")
    print("| format | engine kernel | M=1 GB/s | % of DRAM | vs int4pack | M=1 GB/s native / numba "
          "| M=16 tok/s native / numba / gemm | M=128 tok/s native / numba / gemm |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[-1]["gbs"]

    def f(v):
        return "-" if v is None else f"{v:.0f}"

    for r in rows:
        pair = f"{r['native']:.1f} / {r['numba']:.1f}" if r.get("numba") and r.get("native") else (
            f"- / {r['numba']:.1f}" if r.get("numba") else "-")
        print(f"| {r['name']} | {r.get('engine', 'torch')} | {r['gbs']:.1f} | {100 * r['gbs'] / dram:.0f} % | "
              f"{r['gbs'] / base:.2f} | {pair} | {' / '.join(f(v) for v in r[16])} | "
              f"{' / '.join(f(v) for v in r[128])} |")
    print(f"\n(native = kernels/cpu/csrc/qdot.cpp with 8-bit activations, numba = numba row kernel with float "
          f"activations, gemm = dequantise to fp32 + torch.mm; the engine takes the native kernel where the "
          f"type has a SIMD one (native VNNI: {native.has_vnni()}), and gemm from {NATIVE_GEMM_MIN_TOKENS} "
          f"tokens per expert for native types, {GEMM_MIN_TOKENS} for numba ones)\n")
    for r in rows:
        if 4 in r:
            print(f"- {r['name']}: gemm first beats the engine's row kernel at M = {r['cross'] or '> 128'} "
                  f"(tok/s native/numba/gemm: " + ", ".join(
                      f"M={m} {'/'.join(f(v) for v in r[m])}" for m in (4, 8, 16, 32, 64, 128)) + ")")
    print()
    moe = bench_moe(a.experts, dram, a.quick)
    print(f"### Fused moe_cpu ({a.experts} experts, {'H 2048 I 704' if a.quick else 'H 4096 I 1408'}, "
          f"Q4_K gate/up + Q8_0 down, top-8, random routing)\n")
    print("| small-batch path | tokens | experts touched | tok/s | expert GB/s (GGUF bytes) | % of DRAM |")
    print("|---|---|---|---|---|---|")
    for path, T, touched, tps, gbs, frac in moe:
        print(f"| {path} | {T} | {touched} | {tps:.1f} | {gbs:.1f} | {100 * frac:.0f} % |")


def main(argv=None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "cpu-moe":
        raise SystemExit("usage: offload bench cpu-moe [--threads N] [--mb MB] [--quick]")
    cpu_moe(argv[1:])


if __name__ == "__main__":
    main()
