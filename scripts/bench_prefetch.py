"""The interleaved kernels' software prefetch distance (kernels/cpu/csrc/repack.h), compared in turns.

One interleaved random matrix per type (K 4096, --mb each) multiplied by 1 token with each distance in turn,
rep by rep (the library's distance set between calls), so that the neighbours' bandwidth moves every distance
alike; prints GB/s of weights read (medians) and each distance's ratio to the first. A distance given twice
shows the noise. With --moe, also the fused expert call (native.moe_topk, one token, 8 of 16 random Q4_K experts
of H 6144 x I 2048 plus a shared one: GLM-5.2's shapes); with --gguf, whole-model decode (teacher-forced tokens)
of that file in turns. Usage:
    python -P scripts/bench_prefetch.py [--ahead 9216,0] [--types Q4_K,Q8_0] [--mb 256] [--reps 41] [--moe]
                                        [--gguf FILE --tokens 8]
"""

import argparse

import offload  # before torch: offload makes torch's OpenMP workers sleep, not spin, only if imported first
import numpy as np
import torch

from offload.calibrate import prefetch_turns as turns
from offload.gguf.testing import random_blocks
from offload.gguf.types import GGMLType, block_format
from offload.kernels.cpu import native


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ahead", default="9216,0")
    ap.add_argument("--types", default="Q4_K,Q8_0")
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--moe", action="store_true")
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--tokens", type=int, default=8)
    a = ap.parse_args()
    dists = [int(v) for v in a.ahead.split(",")]
    print(f"this CPU's default: {native.prefetch_ahead()} B ahead\n")
    head = " | ".join(f"{d} B ahead" for d in dists)
    ratios = " | ".join(f"{d} / {dists[0]}" for d in dists[1:])
    print(f"| what | {head} | {ratios} |\n|---|" + "---|" * (2 * len(dists) - 1))
    rng = np.random.default_rng(0)
    for name in a.types.split(","):
        fmt = block_format(name)
        qt = int(GGMLType[fmt.name])
        n = a.mb * 2**20 // (a.k // fmt.block_size * fmt.type_size) // 16 * 16
        w = random_blocks(qt, n * a.k // fmt.block_size, rng).reshape(n, -1)
        p, pt = native.repack(w, qt)
        del w
        x = torch.randn(1, a.k)
        rates = [p.nbytes / s / 1e9 for s in turns(dists, a.reps, lambda: native.gemv(x, p, pt))]
        print(f"| {name} GEMV GB/s | {' | '.join(f'{r:.1f}' for r in rates)} | "
              f"{' | '.join(f'{r / rates[0]:.2f}x' for r in rates[1:])} |", flush=True)
        del p
    if a.moe:
        H, inter, E, qt = 6144, 2048, 16, int(GGMLType.Q4_K)

        def experts(n, k, count):  # (count, n, k-row bytes) interleaved
            return np.stack([native.repack(random_blocks(qt, n * k // 256, rng).reshape(n, -1), qt)[0]
                             for _ in range(count)])

        gate, up, down = experts(inter, H, E + 1), experts(inter, H, E + 1), experts(H, inter, E + 1)
        shared = (gate[E], up[E], down[E])
        gate, up, down, rt = gate[:E], up[:E], down[:E], qt | 0x100
        x, w8 = rng.standard_normal((1, H)).astype(np.float32), np.full((1, 8), 0.125, np.float32)
        locs = iter([rng.permutation(E)[:8].reshape(1, 8) for _ in range(len(dists) * (a.reps + 1))])
        read = 9 * 3 * gate[0].nbytes  # bytes of the 9 experts a call reads
        rates = [read / s / 1e9 for s in turns(dists, a.reps, lambda: native.moe_topk(
            x, next(locs), w8, gate, up, down, (rt, rt, rt), shared=shared))]
        print(f"| moe_topk GB/s (8 + 1 experts, {read / 1e6:.0f} MB a call) | {' | '.join(f'{r:.1f}' for r in rates)} | "
              f"{' | '.join(f'{r / rates[0]:.2f}x' for r in rates[1:])} |", flush=True)
        del gate, up, down, shared
    if a.gguf:
        llm = offload.load(a.gguf, device="cpu", progress=False)
        ids = torch.randint(100, 5000, (16 + a.tokens,), generator=torch.Generator().manual_seed(0))

        def decode():
            cache = llm.model.new_cache(len(ids) + 8)
            llm.model.forward(ids[:16], cache, last_only=True)
            for tok in ids[16:]:
                llm.model.forward(tok.view(1), cache, last_only=True)

        rates = [a.tokens / s for s in turns(dists, max(3, a.reps // 8), decode)]  # (a 16-token prefill in each)
        print(f"| decode tok/s (16-token prefill counted), {a.gguf.rsplit('/', 1)[-1]} | {' | '.join(f'{r:.2f}' for r in rates)} | "
              f"{' | '.join(f'{r / rates[0]:.2f}x' for r in rates[1:])} |")


if __name__ == "__main__":
    main()
