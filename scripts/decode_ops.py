"""Where one CPU decode step of a GGUF goes: each native call's CPU time and the bytes of weight blocks it reads
(a step should read each weight once, in its file's form), and what is left for torch and Python.

    python -P scripts/decode_ops.py FILE.gguf [--threads 1] [--steps 6] [--float-kv-b]

CPU time (time.process_time) rather than wall time: on a shared box it is what the step itself costs; with
--threads 1 it is also each call's time. --float-kv-b: MLA's absorbed W_UK / W_UV as the float32 kv_b
(the path before the per-head blocks), for comparison.
"""

import argparse
import collections
import time

import offload  # noqa: F401  (first: its OpenMP wait policy applies before torch loads OpenMP)
import numpy as np
import torch

from offload.kernels.cpu import native
from offload.kernels.cpu.threads import set_threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--float-kv-b", action="store_true")
    a = ap.parse_args()
    set_threads(a.threads)
    if a.float_kv_b:
        from offload.models import loading

        loading.LoadContext.heads = lambda self, name: None
    stats = collections.defaultdict(lambda: [0, 0.0, 0])  # (call, shape) -> calls, CPU s, bytes

    def wrap(name, fn, what):
        def timed(*args, **kw):
            t = time.process_time()
            out = fn(*args, **kw)
            dt = time.process_time() - t
            nbytes, shape = what(*args, **kw)
            s = stats[(name, shape)]
            s[0], s[1], s[2] = s[0] + 1, s[1] + dt, s[2] + nbytes
            return out
        return timed

    def moe_bytes(x, loc, weights, gate, up, down, qtypes, shared=None):
        experts = len(np.unique(loc[loc >= 0])) + (shared is not None)  # each expert's blocks read once
        return (gate[0].nbytes + up[0].nbytes + down[0].nbytes) * experts, f"{gate.shape} experts (+shared)"

    native.gemv = wrap("gemv", native.gemv, lambda x, w, qt, **k: (w.nbytes, f"{w.shape} type {qt}"))
    native.gemv_multi = wrap("gemv_multi", native.gemv_multi,
                             lambda x, ws, qts: (sum(w.nbytes for w in ws), str([w.shape for w in ws])))
    native.gemv_batched = wrap("gemv_batched", native.gemv_batched, lambda x, w, qt: (w.nbytes, f"{w.shape} type {qt}"))
    native.moe_topk = wrap("moe_topk", native.moe_topk, moe_bytes)

    model = offload.load(a.gguf, device="cpu", ctx=512, progress=False).model
    ids = list(range(100, 100 + 64 + 2 + a.steps))
    cache = model.new_cache(512)
    model.forward(torch.tensor(ids[:64]), cache, last_only=True)
    for tok in ids[64:66]:  # warm
        model.forward(torch.tensor([tok]), cache, last_only=True)
    stats.clear()
    t = time.process_time()
    for tok in ids[66:]:
        model.forward(torch.tensor([tok]), cache, last_only=True)
    step, n = (time.process_time() - t) / a.steps, a.steps
    in_native = 0.0
    print("| call | weight blocks | calls / step | CPU ms / step | MB / step | GB/s |\n|---|---|---|---|---|---|")
    for (name, shape), (c, s, b) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        in_native += s / n
        print(f"| {name} | {shape} | {c / n:.0f} | {s / n * 1e3:.2f} | {b / n / 1e6:.1f} | {b / max(s, 1e-9) / 1e9:.1f} |")
    print(f"\nstep: {step * 1e3:.1f} CPU ms, native calls {in_native * 1e3:.1f}, the rest (torch, Python) "
          f"{(step - in_native) * 1e3:.1f}")


if __name__ == "__main__":
    main()
