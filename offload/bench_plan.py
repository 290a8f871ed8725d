"""The planner's prediction beside the engine's measurement, in one run.

    offload bench plan-check FILE [--threads N] [--tokens 32] [--repeat 3] [--hardware hw.json] [--device auto]

Plans FILE for this machine (the saved `offload probe` profile, or --hardware), loads it with exactly that plan
(placement="auto"), then in each round calibrates (`offload probe`'s measurements, quick, for the file's own
quant types) and measures decode (tokens after a 64-token prompt) and prefill of 512- and 2048-token prompts,
in turns, so the prediction and the measurement see the same machine (this one's bandwidth moves with its
neighbours). Prints predicted, measured and measured / predicted. The decode prediction is made at the
position decode runs at here.
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
    from offload.placement.planner import decode_step

    lays = replace(p, options=replace(p.options, decode_position=decode_position)).layouts()
    return {"decode": decode_step(p, lays)["tok_s"], **{n: cost.prefill(lays, p.hw, n, "best") for n in PREFILLS}}


def measure_once(llm, tokens: int, g: torch.Generator) -> dict:
    """One round: prefill of each PREFILLS prompt, then `tokens` decode steps after a PROMPT-token prompt."""
    model, ctx = llm.model, llm.context_length
    vocab = model.args.vocab_size
    out = {}
    for n in PREFILLS:
        ids = torch.randint(0, vocab, (n,), generator=g)
        cache = model.new_cache(ctx)
        t = time.perf_counter()
        model.forward(ids, cache, last_only=True)
        out[n] = n / (time.perf_counter() - t)
    ids = torch.randint(0, vocab, (PROMPT + tokens,), generator=g).tolist()
    cache = model.new_cache(ctx)
    model.forward(torch.tensor(ids[:PROMPT]), cache, last_only=True)
    t = time.perf_counter()
    for tok in ids[PROMPT:]:
        model.forward(torch.tensor([tok]), cache, last_only=True)
    out["decode"] = tokens / (time.perf_counter() - t)
    return out


def calibrated(p, types):
    """The plan with this machine's figures measured now (quick calibration of the file's own types)."""
    from offload.calibrate import calibrate
    from offload.placement.hardware import GB

    cal = calibrate(types, quick=True)
    return replace(p, hw=replace(p.hw, calibration=cal, dram_bw=cal["dram_gbs"] * GB))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="offload bench plan-check", description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--hardware", default=None, help="hardware profile (default: the saved `offload probe` one)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                    help="predict with the saved profile instead of calibrating in each round")
    a = ap.parse_args(argv)
    import offload
    from offload.kernels.cpu.threads import set_threads
    from offload.planning import make_plan

    if a.threads:
        set_threads(a.threads)
    ctx = max(PREFILLS) + 8
    llm = offload.load(a.path, device=a.device, ctx=ctx, hardware=a.hardware, progress=False)
    p = make_plan(a.path, context=ctx, hardware=a.hardware, use_gpus=llm.device.type == "cuda")
    types = sorted({t for shares in p.quant.mix.values() for t in shares} | set(p.quant.types.values()))
    g = torch.Generator().manual_seed(0)
    measure_once(llm, a.tokens, g)  # warm-up: page cache, the native library, numba
    preds, meas = [], []
    for _ in range(a.repeat):  # calibrate and measure in turns: the neighbours' load falls on both
        q = calibrated(p, types) if a.calibrate else p
        preds.append(predicted(q, PROMPT + a.tokens // 2))
        meas.append(measure_once(llm, a.tokens, g))
    cal = q.hw.calibration
    print(f"## plan-check, {a.path}, {torch.get_num_threads()} threads, device {llm.device}, "
          f"median of {a.repeat} rounds\n")
    how = ("calibrated in each round (DRAM, the file's types " + ", ".join(sorted(cal.get("kernels", {})))
           + ", decode fixed costs), then measured" if a.calibrate else
           f"hardware {p.hw.source}" + (f", calibration {cal.get('source')}" if cal else ", not calibrated"))
    print(how + "\n")
    print("| | predicted | measured | measured / predicted | rounds (predicted / measured) |")
    print("|---|---|---|---|---|")
    rows = [("decode tok/s", "decode")] + [(f"prefill tok/s, {n}-token prompt", n) for n in PREFILLS]
    for label, key in rows:
        pm, mm = statistics.median(r[key] for r in preds), statistics.median(r[key] for r in meas)
        each = ", ".join(f"{r[key]:.1f} / {m[key]:.1f}" for r, m in zip(preds, meas))
        print(f"| {label} | {pm:.1f} | {mm:.1f} | {mm / pm:.2f} | {each} |")


if __name__ == "__main__":
    main()
