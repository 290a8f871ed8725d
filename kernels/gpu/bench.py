"""`offload bench triton-gemv`: the Triton GEMV on ggml blocks in GB/s against torch.sum over the same bytes
(the GPU's read bandwidth as torch reaches it), measured in the same run, with the ratio; then the grouped MoE
decode kernel (8 of 16 resident experts, one token) the same way. Without CUDA it runs in Triton's interpreter
on a tiny size (a dry run of the command: its numbers are not GPU numbers). `--compile-only` compiles every
kernel for a CUDA target without a GPU (kernels/gpu/aot.py).
"""

import argparse
import time
import warnings

import numpy as np
import torch

from offload.gguf.testing import F16_SCALE_OFFSETS, random_blocks
from offload.gguf.types import GGMLType, block_format


def _blocks(fmt: int, rows: int, cols: int, rng, lead: tuple = ()) -> torch.Tensor:
    """Random valid blocks with small fp16 scales (finite sums), uint8 (*lead, rows, row bytes)."""
    t = block_format(fmt)
    n = int(np.prod(lead, dtype=np.int64)) * rows * cols // t.block_size
    raw = random_blocks(fmt, n, rng)
    for off in F16_SCALE_OFFSETS.get(t.type, ()):
        raw[:, off:off + 2] = rng.uniform(0.002, 0.02, (n, 1)).astype(np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(*lead, rows, -1))


def _time(fn, reps: int, cuda: bool) -> float:
    """Median seconds of fn() over reps calls, after one warm-up call (compilation)."""
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _row(what: str, nbytes: int, sec: float, base_gbs: float) -> None:
    gbs = nbytes / sec / 1e9
    print(f"{what:34s} {nbytes / 2**20:9.1f} MiB  {sec * 1e6:9.1f} us  {gbs:8.1f} GB/s  {gbs / base_gbs:6.2f}x")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="offload bench triton-gemv", description=__doc__)
    ap.add_argument("--rows", type=int, default=None, help="weight rows N (default 6144 on a GPU, 256 dry)")
    ap.add_argument("--cols", type=int, default=None, help="weight columns K (default 6144 on a GPU, 512 dry)")
    ap.add_argument("--formats", default="Q4_K,Q8_0,Q6_K", help="ggml types, comma-separated")
    ap.add_argument("--block-n", default="8,16,32,64", help="rows per program to try on a GPU")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--compile-only", action="store_true", help="compile every kernel for sm_90 and stop")
    a = ap.parse_args(argv)
    if a.compile_only:
        from offload.kernels.gpu.aot import compile_all

        compile_all()
        return
    formats = [GGMLType[f.strip().upper()] for f in a.formats.split(",")]
    from offload.kernels.gpu.gemm import Packed, interpreting, qmatmul
    from offload.kernels.gpu.moe import moe_gemv

    cuda = torch.cuda.is_available() and not interpreting()
    dev = torch.device("cuda" if cuda else "cpu")
    rows, cols = a.rows or (6144 if cuda else 256), a.cols or (6144 if cuda else 512)
    reps = a.reps if cuda else 1
    block_ns = [int(b) for b in a.block_n.split(",")] if cuda else [None]
    where = torch.cuda.get_device_name() if cuda else "Triton interpreter on the CPU: a dry run, not GPU speed"
    print(f"triton-gemv on {where}; weight {rows} x {cols}, one token")
    rng = np.random.default_rng(0)
    for fmt in formats:
        w = _blocks(int(fmt), rows, cols, rng).to(dev)
        p = Packed(w, int(fmt), cols)
        x = torch.randn(1, cols, device=dev, dtype=torch.bfloat16 if cuda else torch.float32)
        flat = w.view(-1)[: w.numel() // 4 * 4].view(torch.float32)  # the same bytes, as torch reads them
        base = _time(lambda: flat.sum(), reps, cuda)
        base_gbs = flat.numel() * 4 / base / 1e9
        _row(f"torch.sum (baseline) {fmt.name}", flat.numel() * 4, base, base_gbs)
        for bn in block_ns:
            sec = _time(lambda: qmatmul(x, p, block_n=bn), reps, cuda)
            _row(f"{fmt.name} GEMV" + (f" BLOCK_N {bn}" if bn else ""), w.numel(), sec, base_gbs)
    # the grouped MoE decode kernel: one token, top-8 of 16 resident experts, GLM-5.2's expert shapes on a GPU
    h, i, n_exp = (6144, 2048, 16) if cuda else (256, 256, 4)
    k = min(8, n_exp)
    fmt = formats[0]
    gate, up, down = (Packed(_blocks(int(fmt), r, c, rng, (n_exp,)).to(dev), int(fmt), c)
                      for r, c in ((i, h), (i, h), (h, i)))
    x = torch.randn(1, h, device=dev, dtype=torch.bfloat16 if cuda else torch.float32)
    ids = torch.randperm(n_exp, device=dev)[:k].view(1, k)
    weights = torch.rand(1, k, device=dev)
    slots = torch.arange(n_exp, device=dev, dtype=torch.int32)
    read = k * (gate.mat_bytes + up.mat_bytes + down.mat_bytes)  # the bytes of the experts the token uses
    used = torch.cat([m.blocks[:k].reshape(-1) for m in (gate, up, down)])  # a copy of as many bytes
    flat = used[: used.numel() // 4 * 4].view(torch.float32)
    base = _time(lambda: flat.sum(), reps, cuda)
    base_gbs = flat.numel() * 4 / base / 1e9
    _row(f"torch.sum (baseline) {fmt.name} experts", flat.numel() * 4, base, base_gbs)
    with warnings.catch_warnings():  # the interpreter's exp overflows for very negative gates (sigmoid -> 0)
        warnings.simplefilter("ignore", RuntimeWarning)
        sec = _time(lambda: moe_gemv(x, ids, weights, slots, gate, up, down), reps, cuda)
    _row(f"{fmt.name} MoE decode, {k} of {n_exp} experts", read, sec, base_gbs)
    if not cuda:
        print("(interpreter: these times measure numpy, not a GPU; run on a CUDA machine for GB/s)")
