"""Interleaved (R16) against file-layout native kernels, one process, measured in turns.

For each type: one random matrix (K = 4096) in the file's layout and its native.repack copy, multiplied by
1 token (GEMV, GB/s of weights read) and by 512 tokens (prefill chunk, TFLOP/s), alternating the two
layouts rep by rep so that neighbours' bandwidth moves both alike; medians. Usage:
    python -P scripts/bench_r16.py [TYPE ...] [--mb 128] [--reps 9]
"""

import argparse
import statistics
import time

import numpy as np
import torch

from offload.gguf.testing import random_blocks
from offload.gguf.types import GGMLType, block_format
from offload.kernels.cpu import native


def _turns(fns, reps):
    times = [[] for _ in fns]
    for f in fns:
        f()  # warm: first touch, caches
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("types", nargs="*", default=["Q4_K", "Q6_K", "IQ4_XS", "Q2_K", "Q3_K", "Q5_K"])
    ap.add_argument("--mb", type=int, default=128)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=9)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"| type | layout | 1 token GB/s | {a.tokens} tokens TFLOP/s |")
    print("|---|---|---|---|")
    for name in a.types:
        fmt = block_format(name)
        qt = int(GGMLType[fmt.name])
        row_bytes = a.k // fmt.block_size * fmt.type_size
        n = a.mb * 2**20 // row_bytes // 16 * 16
        w = random_blocks(qt, n * a.k // fmt.block_size, rng).reshape(n, -1)
        if qt not in native.REPACKABLE:
            print(f"| {name} | no interleaved form | | |")
            continue
        p, pt = native.repack(w, qt)
        x1 = torch.randn(1, a.k)
        g_file, g_r16 = _turns([lambda: native.gemv(x1, w, qt), lambda: native.gemv(x1, p, pt)], a.reps)
        rows = 1024  # a prefill chunk is compute-bound: a slice of the rows suffices
        xm = torch.randn(a.tokens, a.k)
        f_file, f_r16 = _turns([lambda: native.gemv(xm, w[:rows], qt), lambda: native.gemv(xm, p[:rows], pt)],
                               max(3, a.reps // 3))
        flop = 2 * a.tokens * rows * a.k
        for layout, g, f in (("file", g_file, f_file), ("interleaved", g_r16, f_r16)):
            print(f"| {name} | {layout} | {w.nbytes / g / 1e9:.1f} | {flop / f / 1e12:.3f} |")
        print(f"| {name} | ratio | {g_file / g_r16:.2f}x | {f_file / f_r16:.2f}x |", flush=True)
        del w, p


if __name__ == "__main__":
    main()
