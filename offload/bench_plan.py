"""The planner's prediction beside the engine's measurement, in one run.

    offload bench plan-check FILE [--threads N] [--tokens 32] [--repeat 3] [--hardware hw.json] [--device auto]

Plans FILE for this machine (the saved `offload probe` profile, or --hardware), loads it with exactly that plan
(placement="auto"), then measures decode (tokens after a 64-token prompt) and prefill of 512- and 2048-token
prompts, and prints predicted, measured and measured / predicted. The decode prediction is made at the position
decode runs at here; run `offload probe` first so the plan uses this machine's measured kernel rates.
"""

import argparse
import statistics
import time
from dataclasses import replace

import torch

PROMPT = 64
PREFILLS = (512, 2048)


def predicted(p, decode_position: int) -> dict:
    from offload.placement import cost
    from offload.placement.planner import head_read_bytes

    lays = replace(p, options=replace(p.options, decode_position=decode_position)).layouts()
    head_q = p.quant.shares("embeddings" if p.spec.tie_embeddings else "lm_head")
    decode = cost.decode(lays, p.hw, head_read_bytes(p), p.head_device, p.options.concurrency, head_quant=head_q)
    return {"decode": decode["tok_s"], **{n: cost.prefill(lays, p.hw, n, "best") for n in PREFILLS}}


def measure(llm, tokens: int, repeat: int) -> dict:
    model, ctx = llm.model, llm.context_length
    g = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    runs: dict = {"decode": [], **{n: [] for n in PREFILLS}}
    for _ in range(repeat + 1):  # the first round warms caches, the native library and numba
        for n in PREFILLS:
            ids = torch.randint(0, vocab, (n,), generator=g)
            cache = model.new_cache(ctx)
            t = time.perf_counter()
            model.forward(ids, cache, last_only=True)
            runs[n].append(n / (time.perf_counter() - t))
        ids = torch.randint(0, vocab, (PROMPT + tokens,), generator=g).tolist()
        cache = model.new_cache(ctx)
        model.forward(torch.tensor(ids[:PROMPT]), cache, last_only=True)
        t = time.perf_counter()
        for tok in ids[PROMPT:]:
            model.forward(torch.tensor([tok]), cache, last_only=True)
        runs["decode"].append(tokens / (time.perf_counter() - t))
    return {k: statistics.median(v[1:]) for k, v in runs.items()} | {"runs": {k: v[1:] for k, v in runs.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="offload bench plan-check", description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hardware", default=None, help="hardware profile (default: the saved `offload probe` one)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    import offload
    from offload.kernels.cpu.threads import set_threads
    from offload.planning import make_plan

    if a.threads:
        set_threads(a.threads)
    ctx = max(PREFILLS) + 8
    llm = offload.load(a.path, device=a.device, ctx=ctx, hardware=a.hardware, progress=False)
    p = make_plan(a.path, context=ctx, hardware=a.hardware, use_gpus=llm.device.type == "cuda")
    pred = predicted(p, PROMPT + a.tokens // 2)
    meas = measure(llm, a.tokens, a.repeat)
    cal = p.hw.calibration
    print(f"## plan-check, {a.path}, {torch.get_num_threads()} threads, device {llm.device}, "
          f"median of {a.repeat}\n")
    print(f"hardware: {p.hw.source}" + (f"; calibration: {cal.get('source')}" if cal else
                                       "; not calibrated (run `offload probe`): CPU rates assumed") + "\n")
    print("| | predicted | measured | measured / predicted | runs |")
    print("|---|---|---|---|---|")
    rows = [("decode tok/s", "decode")] + [(f"prefill tok/s, {n}-token prompt", n) for n in PREFILLS]
    for label, key in rows:
        runs = ", ".join(f"{r:.1f}" for r in meas["runs"][key])
        print(f"| {label} | {pred[key]:.1f} | {meas[key]:.1f} | {meas[key] / pred[key]:.2f} | {runs} |")


if __name__ == "__main__":
    main()
