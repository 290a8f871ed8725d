"""Time to first token of a second turn that shares a long prefix with the first, against the same prompt cold.

    offload bench prefix FILE.gguf [--threads N] [--prefix 4096] [--new 64] [--repeat 3]

An agent's next turn resends the whole conversation: `--prefix` tokens computed last turn, then `--new` tokens.
Three ways to its first token, timed in turns (a shared machine's noise falls on all three), median of
`--repeat`:
  cold      the whole prompt prefilled from token 0 (what every turn cost before the prefix cache);
  live      the prefix is still in the sequence's cache (the same conversation's next turn): only the new tokens;
  snapshot  the prefix comes back from the store (another conversation ran in between): a copy, then the new tokens.
Each ends with the logits of the last prompt token, which is what the first token is sampled from.
"""

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="offload bench prefix", description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prefix", type=int, default=4096, help="tokens the second turn shares with the first")
    ap.add_argument("--new", type=int, default=64, help="tokens the second turn adds")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    import psutil

    import offload
    from offload.generation import prefill
    from offload.kernels.cpu.threads import set_threads
    from offload.prefix_cache import PrefixCache

    threads = a.threads or psutil.cpu_count(logical=False) or 1
    set_threads(threads)
    n_ctx = a.prefix + a.new + 8
    llm = offload.load(a.gguf, device="cpu", ctx=n_ctx, progress=False)
    model = llm.model
    g = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    first = torch.randint(100, min(vocab, 5000), (a.prefix + 1,), generator=g).tolist()  # turn 1's prompt
    second = first[:a.prefix] + torch.randint(100, min(vocab, 5000), (a.new,), generator=g).tolist()
    other = torch.randint(100, min(vocab, 5000), (64,), generator=g).tolist()  # another user's short turn
    cache = model.new_cache(n_ctx)
    store = PrefixCache(mem_bytes=cache.position_bytes() * n_ctx)

    def fill(ids):
        skip = store.prepare(cache, ids)
        logits = prefill(model, cache, ids[skip:])
        cache.tokens.extend(ids[skip:])
        return skip, logits

    def cold():
        cache.resume(0)
        t0 = time.perf_counter()
        logits = prefill(model, cache, second)
        dt = time.perf_counter() - t0
        cache.tokens.extend(second)
        return dt, logits

    def live():
        fill(first)  # untimed: turn 1 (its prompt is already cached after the first round)
        t0 = time.perf_counter()
        skip, logits = fill(second)
        dt = time.perf_counter() - t0
        assert skip == a.prefix, skip
        return dt, logits

    def snapshot():
        fill(first)
        fill(other)  # saves turn 1's sequence to the store, then overwrites the cache
        t0 = time.perf_counter()
        skip, logits = fill(second)
        dt = time.perf_counter() - t0
        assert skip == a.prefix, skip
        return dt, logits

    ways = {"cold": cold, "live": live, "snapshot": snapshot}
    print(f"{a.gguf}: prefix {a.prefix} + new {a.new} tokens, {threads} threads, cache "
          f"{cache.position_bytes() / 1024:.1f} KiB/token", flush=True)
    fill(first)  # warm-up: page cache, buffers, kernels
    times: dict[str, list[float]] = {name: [] for name in ways}
    ref = None
    for r in range(a.repeat):
        for name, fn in ways.items():
            dt, logits = fn()
            times[name].append(dt)
            ref = logits if ref is None else ref
            diff = (logits - ref).abs().max().item()
            print(f"  round {r + 1} {name:8s} {dt * 1000:9.1f} ms   max |logits - cold| {diff:.2e}", flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"time to first token, median of {a.repeat}: cold {med['cold'] * 1000:.1f} ms, live {med['live'] * 1000:.1f}"
          f" ms ({med['cold'] / med['live']:.1f}x faster), snapshot {med['snapshot'] * 1000:.1f} ms "
          f"({med['cold'] / med['snapshot']:.1f}x faster)")
