"""Whole-model CPU decode and prefill: offload against llama.cpp on the same GGUF, in one run.

    python -m offload.bench_decode FILE.gguf [--threads N] [--prompt 512] [--tokens 64]

Both engines are fed the same token ids (teacher-forced), so the work is identical: a `--prompt`-token
prefill, then `--tokens` single-token decode steps. Prints tok/s and the ratio ours / llama.cpp.
"""

import argparse
import time

import torch


def bench_llama_cpp(path: str, ids: list[int], n_prompt: int, threads: int) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(ids) + 8, n_threads=threads, n_threads_batch=threads,
                n_gpu_layers=0, n_batch=n_prompt, verbose=False)
    llm.eval(ids[:n_prompt])  # warm-up: the same prompt once (page cache, buffers)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids[:n_prompt])
    t1 = time.perf_counter()
    for tok in ids[n_prompt:]:
        llm.eval([tok])
    t2 = time.perf_counter()
    return n_prompt / (t1 - t0), (len(ids) - n_prompt) / (t2 - t1)


def bench_offload(path: str, ids: list[int], n_prompt: int, threads: int) -> tuple[float, float]:
    import offload
    from offload.kernels.cpu.threads import set_threads

    set_threads(threads)
    llm = offload.load(path, device="cpu", ctx=len(ids) + 8, progress=False)
    model = llm.model
    # warm-up: the same prompt once (page cache, numba's cached kernels, the native library), as for llama.cpp
    model.forward(torch.tensor(ids[:n_prompt]), model.new_cache(n_prompt), last_only=True)
    cache = model.new_cache(len(ids) + 8)
    t0 = time.perf_counter()
    # the last position's logits only, as llama.cpp's eval computes (logits_all=False)
    model.forward(torch.tensor(ids[:n_prompt]), cache, last_only=True)
    t1 = time.perf_counter()
    for tok in ids[n_prompt:]:
        model.forward(torch.tensor([tok]), cache, last_only=True)
    t2 = time.perf_counter()
    return n_prompt / (t1 - t0), (len(ids) - n_prompt) / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    import psutil

    threads = a.threads or psutil.cpu_count(logical=False) or 1
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 5000, (a.prompt + a.tokens,), generator=g).tolist()
    lp, ld = bench_llama_cpp(a.gguf, ids, a.prompt, threads)
    op, od = bench_offload(a.gguf, ids, a.prompt, threads)
    import llama_cpp

    print(f"## decode / prefill, {a.gguf}, {threads} threads, CPU only\n")
    print(f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, {llama_cpp.llama_print_system_info().decode().strip()}\n")
    print("| engine | prefill tok/s (%d tokens) | decode tok/s (%d steps) |" % (a.prompt, a.tokens))
    print("|---|---|---|")
    print(f"| llama.cpp (llama-cpp-python) | {lp:.1f} | {ld:.2f} |")
    print(f"| offload | {op:.1f} | {od:.2f} |")
    print(f"| ratio offload / llama.cpp | {op / lp:.2f} | {od / ld:.2f} |")


if __name__ == "__main__":
    main()
