"""Start-to-first-token on a GGUF: offload vs llama-cpp-python on the same file, in the same run.

    offload bench load FILE.gguf [--device cpu] [--repeat 2] [--threads N]

Each measurement is a fresh Python process (imports included), timed from its launch until the first
generated token of a short greedy prompt is out. The file is read once first so both engines start from a
warm page cache, and each engine runs once untimed first, with Python's bytecode cache on (the state of an
installed package: a shell with PYTHONDONTWRITEBYTECODE=1 would otherwise recompile offload's modules on
every run). Both engines get --threads threads and otherwise their own defaults (offload makes torch's
OpenMP workers sleep between parallel regions, llama.cpp's spin a while first; export OMP_WAIT_POLICY to
set both). Prints each time and the ratio offload / llama.cpp (the issue's goal: <= 2x).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import offload

_OURS = """
import sys, time, json
t0 = float(sys.argv[1])
import offload
llm = offload.load(sys.argv[2], device=sys.argv[3], progress=False, ctx=256)
t1 = time.time()
for chunk in llm.stream_chunks("Hello, my name is", max_new_tokens=1):
    break
t2 = time.time()
print(json.dumps({"load": t1 - t0, "first": t2 - t0}))
"""

_LLAMA = """
import sys, time, json
t0 = float(sys.argv[1])
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[2], n_ctx=256, n_threads=int(sys.argv[4]), verbose=False,
                      n_gpu_layers=-1 if sys.argv[3] != "cpu" else 0)
t1 = time.time()
for out in llm.create_completion("Hello, my name is", max_tokens=1, temperature=0.0, stream=True):
    break
t2 = time.time()
print(json.dumps({"load": t1 - t0, "first": t2 - t0}))
"""


def _run(code: str, path: str, device: str, threads: int) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if offload._OMP_WAIT_POLICY_SET_HERE:  # offload's own default, not the user's: llama.cpp runs with its own
        env.pop("OMP_WAIT_POLICY", None)
    t0 = time.time()
    cmd = [sys.executable, "-P", "-c", code,  # -P: never the working directory on sys.path
           repr(t0), path, device, str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.expanduser("~"))
    if r.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="offload bench load", description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    size = os.path.getsize(a.path)
    with open(a.path, "rb") as f:  # warm the page cache for both engines
        while f.read(1 << 24):
            pass
    rows = {"llama.cpp": [], "offload": []}
    _run(_LLAMA, a.path, a.device, a.threads)  # untimed: bytecode caches written, shared libraries paged in
    _run(_OURS, a.path, a.device, a.threads)
    for _ in range(a.repeat):
        rows["llama.cpp"].append(_run(_LLAMA, a.path, a.device, a.threads))
        rows["offload"].append(_run(_OURS, a.path, a.device, a.threads))
    print(f"{os.path.basename(a.path)}: {size / 2**30:.2f} GiB, device {a.device}, "
          f"{a.repeat} runs each (median)")
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("load", "first")} for k, v in rows.items()}
    for k, v in med.items():
        print(f"  {k:10s} load {v['load']:7.2f} s   start-to-first-token {v['first']:7.2f} s")
    ratio = med["offload"]["first"] / med["llama.cpp"]["first"]
    print(f"  ratio offload / llama.cpp (start-to-first-token): {ratio:.2f}x")


if __name__ == "__main__":
    main()
