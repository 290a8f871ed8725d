"""What --page-from-disk costs beyond the disk: decode / prefill tok/s of one GGUF loaded twice in one run, the
normal load (CPU experts interleaved into RAM, native.repack) and the paged one (experts left as views of the
file's mmap in its own layout), with the file in the page cache so the disk itself is out of the comparison.

    offload bench paging FILE.gguf [--threads N] [--prompt 64] [--tokens 32] [--repeat 3] [--memory]

The paged load is made as a user's is: a plan for RAM smaller than the model (`--ram`, default: the OS margin,
what a paged load still copies, and a quarter of what it pages) with page_from_disk=True. Both are fed the same token ids (teacher-forced), warmed once, then timed in turns
`--repeat` times; prints the medians, the ratio paged / normal, and each load's bytes held as file pages
(offload.held_bytes' "mapped"). --memory instead loads each alone in a fresh process and prints what the
kernel counts after the prompt and a few steps: RssAnon (RAM only swap can free) and RssFile (evictable pages).
"""

import argparse

import torch

from offload.bench_decode import Offload, in_turns


def _rss(path: str, threads: int, ids: list[int], n_prompt: int, kwargs: dict, out) -> None:
    """In a fresh process: load, run, and send back /proc/self/status' RssAnon and RssFile (kB)."""
    import warnings

    warnings.simplefilter("ignore")  # a paged IQ4_NL file's warning is not the measurement
    Offload(path, len(ids) + 8, threads, **kwargs).run(ids, n_prompt)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    out.put({k: int(status[k].split()[0]) for k in ("RssAnon", "RssFile")})


def default_ram(path: str, n_ctx: int) -> str:
    """RAM for a paged plan: the OS margin, the copies a paged load makes (attention, dense / shared MLPs, KV
    cache) and a quarter of what it pages (routed experts, embedding, head)."""
    from offload.placement.planner import os_margin
    from offload.planning import PAGEABLE, make_plan

    p = make_plan(path, context=n_ctx)
    cpu = p.usage()["cpu"]
    paged = sum(cpu.get(c, 0.0) for c in PAGEABLE)
    return f"{int(os_margin(p.hw, p.options) + sum(cpu.values()) - paged + paged / 4)}B"


def memory(path: str, threads: int, ids: list[int], n_prompt: int, ram: str) -> None:
    import multiprocessing as mp

    print(f"## --page-from-disk memory, {path}, paged plan for {ram} of RAM, {len(ids)} tokens run\n")
    print("| load | RssAnon MiB | RssFile MiB |")
    print("|---|---|---|")
    ctx = mp.get_context("spawn")
    for name, kw in (("interleaved (normal)", {}), ("file layout (paged)", dict(ram=ram, page_from_disk=True))):
        q = ctx.Queue()
        p = ctx.Process(target=_rss, args=(path, threads, ids, n_prompt, kw, q))
        p.start()
        r = q.get()
        p.join()
        print(f"| {name} | {r['RssAnon'] / 1024:.0f} | {r['RssFile'] / 1024:.0f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="offload bench paging", description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per load, taking turns (median)")
    ap.add_argument("--ram", default=None, help="the RAM the paged load's plan is made for (default: the OS margin, "
                    "what a paged load copies, and a quarter of what it pages)")
    ap.add_argument("--memory", action="store_true", help="each load alone in a fresh process: RssAnon / RssFile")
    a = ap.parse_args(argv)
    import psutil

    from offload.held_bytes import held_bytes
    from offload.placement.hardware import fmt_bytes

    threads = a.threads or psutil.cpu_count(logical=False) or 1
    ram = a.ram or default_ram(a.gguf, a.prompt + a.tokens + 8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 5000, (a.prompt + a.tokens,), generator=g).tolist()
    if a.memory:
        return memory(a.gguf, threads, ids, a.prompt, ram)
    n_ctx = len(ids) + 8
    loads = {"interleaved (normal)": Offload(a.gguf, n_ctx, threads),
             "file layout (paged)": Offload(a.gguf, n_ctx, threads, ram=ram, page_from_disk=True)}
    runs, med = in_turns(loads, ids, a.prompt, a.repeat)
    print(f"## --page-from-disk, {a.gguf}, {threads} threads, CPU only, paged plan for {ram} of RAM, "
          f"median of {a.repeat}\n")
    print("| load | held / of it file pages | prefill tok/s (%d tokens) | decode tok/s (%d steps) | runs |"
          % (a.prompt, a.tokens))
    print("|---|---|---|---|---|")
    for name, e in loads.items():
        h = held_bytes(e.model)
        each = ", ".join(f"{p:.1f}/{d:.2f}" for p, d in runs[name])
        print(f"| {name} | {fmt_bytes(sum(h.by_home['cpu'].values()))} / {fmt_bytes(h.mapped.get('cpu', 0))} | "
              f"{med[name][0]:.1f} | {med[name][1]:.2f} | {each} |")
    (np_, nd), (pp, pd) = med.values()
    print(f"| ratio paged / normal | | {pp / np_:.2f} | {pd / nd:.2f} | |")


if __name__ == "__main__":
    main()
