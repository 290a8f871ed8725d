"""Dequant throughput, torch vs the numpy reference, in MB/s of quantised input bytes.

    offload bench dequant [--mb 16] [--types Q4_K,Q6_K] [--device cpu|cuda]
"""

import argparse
import time

import numpy as np
import torch

from offload.gguf.dequant_torch import dequantize_torch
from offload.gguf.quants import DEQUANTIZERS, dequantize
from offload.gguf.testing import random_blocks
from offload.gguf.types import GGMLType, block_format


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="offload bench dequant", description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=16, help="quantised bytes per tensor, MB")
    ap.add_argument("--types", default=",".join(GGMLType(t).name for t in DEQUANTIZERS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--np-mb", type=float, default=16, help="smaller input for the (slow) numpy path")
    ap.add_argument("--chunks", default="", help="comma-separated chunk sizes (blocks) to compare")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    print(f"torch threads {torch.get_num_threads()}, device {args.device}, {args.mb} MB per type")
    chunks = [int(c) for c in args.chunks.split(",") if c] or [None]
    print(f"{'type':8} {'numpy MB/s':>11} " + " ".join(f"{'torch/' + str(c or 'def'):>12}" for c in chunks)
          + f" {'ratio':>6}")
    for name in args.types.split(","):
        fmt = block_format(name)
        n_blocks = int(args.mb * 1e6) // fmt.type_size
        rows = max(1, n_blocks // 64)
        n_blocks = rows * (n_blocks // rows)
        raw = random_blocks(name, n_blocks, rng)
        shape = (rows, n_blocks // rows * fmt.block_size)
        traw = torch.from_numpy(raw).to(args.device)
        n_np = max(1, min(rows, int(rows * args.np_mb / args.mb)))  # a prefix of the rows
        raw_np = raw.reshape(rows, -1)[:n_np]
        np_rate = raw_np.nbytes / 1e6 / _best(lambda: dequantize(raw_np, name, (n_np, shape[1])), args.repeat)
        rates = []
        for c in chunks:
            dequantize_torch(traw, name, shape, chunk_blocks=c)
            sync()
            t = _best(lambda: (dequantize_torch(traw, name, shape, chunk_blocks=c), sync()), args.repeat)
            rates.append(raw.nbytes / 1e6 / t)
        print(f"{name:8} {np_rate:11.0f} " + " ".join(f"{r:12.0f}" for r in rates) + f" {max(rates) / np_rate:6.1f}")


if __name__ == "__main__":
    main()
