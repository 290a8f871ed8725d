"""Whole-model CPU decode and prefill: offload against llama.cpp on the same GGUF, in one run.

    offload bench decode FILE.gguf [--threads N] [--prompt 512] [--tokens 64] [--repeat 3]

Both engines are fed the same token ids (teacher-forced), so the work is identical: a `--prompt`-token
prefill, then `--tokens` single-token decode steps. Both are loaded once and warmed on the prompt, then
timed `--repeat` times, taking turns (a shared machine's noise falls on both); prints the median tok/s
of each and the ratio ours / llama.cpp.
"""

import argparse
import statistics
import time

import torch


class LlamaCpp:
    def __init__(self, path: str, n_ctx: int, n_prompt: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                         n_gpu_layers=0, n_batch=n_prompt, verbose=False)

    def run(self, ids: list[int], n_prompt: int) -> tuple[float, float]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids[:n_prompt])
        t1 = time.perf_counter()
        for tok in ids[n_prompt:]:
            self.llm.eval([tok])
        t2 = time.perf_counter()
        return n_prompt / (t1 - t0), (len(ids) - n_prompt) / (t2 - t1)


class Offload:
    def __init__(self, path: str, n_ctx: int, threads: int, **load_kwargs):
        import offload
        from offload.kernels.cpu.threads import set_threads

        set_threads(threads)
        self.model = offload.load(path, device="cpu", ctx=n_ctx, progress=False, **load_kwargs).model
        self.n_ctx = n_ctx

    def run(self, ids: list[int], n_prompt: int) -> tuple[float, float]:
        cache = self.model.new_cache(self.n_ctx)
        t0 = time.perf_counter()
        # the last position's logits only, as llama.cpp's eval computes (logits_all=False)
        self.model.forward(torch.tensor(ids[:n_prompt]), cache, last_only=True)
        t1 = time.perf_counter()
        for tok in ids[n_prompt:]:
            self.model.forward(torch.tensor([tok]), cache, last_only=True)
        t2 = time.perf_counter()
        return n_prompt / (t1 - t0), (len(ids) - n_prompt) / (t2 - t1)


def in_turns(engines: dict, ids: list[int], n_prompt: int, repeat: int) -> tuple[dict, dict]:
    """Each engine warmed once, then run `repeat` times taking turns (a shared machine's noise falls on all)
    -> (name -> [(prefill, decode) tok/s per run], name -> (median prefill, median decode))."""
    for e in engines.values():  # warm-up: page cache, buffers, the native library, numba's cached kernels
        e.run(ids[: n_prompt + 2], n_prompt)
    runs: dict[str, list] = {name: [] for name in engines}
    for _ in range(repeat):
        for name, e in engines.items():
            runs[name].append(e.run(ids, n_prompt))
    med = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
           for name, rs in runs.items()}
    return runs, med


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="offload bench decode", description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per engine, taking turns (median)")
    a = ap.parse_args(argv)
    import llama_cpp
    import psutil

    threads = a.threads or psutil.cpu_count(logical=False) or 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 5000, (a.prompt + a.tokens,), generator=g).tolist()
    n_ctx = len(ids) + 8
    engines = {"llama.cpp": LlamaCpp(a.gguf, n_ctx, a.prompt, threads), "offload": Offload(a.gguf, n_ctx, threads)}
    runs, med = in_turns(engines, ids, a.prompt, a.repeat)
    print(f"## decode / prefill, {a.gguf}, {threads} threads, CPU only, median of {a.repeat}\n")
    print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, "
          f"{llama_cpp.llama_print_system_info().decode().strip()}\n")
    print("| engine | prefill tok/s (%d tokens) | decode tok/s (%d steps) | runs prefill / decode |"
          % (a.prompt, a.tokens))
    print("|---|---|---|---|")
    for name in engines:
        each = ", ".join(f"{p:.1f}/{d:.2f}" for p, d in runs[name])
        print(f"| {name} | {med[name][0]:.1f} | {med[name][1]:.2f} | {each} |")
    (lp, ld), (op, od) = med["llama.cpp"], med["offload"]
    print(f"| ratio offload / llama.cpp | {op / lp:.2f} | {od / ld:.2f} | |")


if __name__ == "__main__":
    main()
