"""`offload bench long-context`: DeepSeek Sparse Attention at long context, on a GLM-DSA checkpoint with
GLM-5.2's attention and indexer head dims (hidden 512, 16 heads, q_lora 256, kv_lora 512, nope 192, rope 64,
v 256, indexer 32 x 128, index_topk 2048; 4 layers: 1 full + 3 shared; tiny experts), built once with
offload.testing.make_tiny_checkpoint (random weights, bf16 on the CPU).

Each context size S runs in its own process, so its peak RSS is its own: a random S-token prompt prefilled
in 512-token chunks, timed over its last two chunks (depth S - 1024 .. S; the first S - 1024 positions are a
real prefill of 2048 tokens tiled, since attention's cost depends on S, not on what the rows hold; --whole
times the whole prompt instead), then greedy decode (ms / token at depth S). The cache grows with the
sequence (offload.cache): the tiling grows it in one step and the timed chunks regrow it (both copies held a
moment, as in a real prefill's last regrowth), so the peak RSS is at least that of a real S-token prefill.
The baseline, in the same run at --baseline-sizes: the mask path the sparse one replaced (the indexer scores
all (T, i, S) at once, attention runs over all S with a (T, S) mask), still in the code as the tests'
reference.

--llama-cpp adds llama.cpp's GLM-DSA on the same checkpoint, converted once to a BF16 GGUF by the
llama-cpp-python sdist's convert_hf_to_gguf.py (scripts/make_gguf_fixtures.py fetches it), run through
llama-cpp-python in its own process at each size, in turn with offload's rows: a real prefill of all S tokens
in 512-token chunks (n_batch = n_ubatch = 512; no tiling, it has no API for it), timed the same way (best of
the last two chunks), then the same greedy decode. Its GLM-DSA selects index_topk keys with the indexer, then
attends over all S with a mask (llm_graph_context::build_attn_k_dsa): dense attention, unless flash attention
is on, whose CPU kernel skips masked keys one by one (--llama-cpp-fa picks off, on or both).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from offload.bench_child import in_child

DIMS = dict(hidden_size=512, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=256,
            kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, index_n_heads=32,
            index_head_dim=128,
            index_topk=2048, num_hidden_layers=4, indexer_types=["full", "shared", "shared", "shared"],
            mlp_layer_types=["dense", "sparse", "sparse", "sparse"], max_position_embeddings=262144)
CHUNK = 512
FILL = 2048  # tokens prefilled for real before the cache is tiled up to the timed chunks


def size(text: str) -> int:
    text = text.strip().lower()
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def checkpoint(folder: Path) -> Path:
    """The bench checkpoint, built once per folder (make_tiny_checkpoint needs transformers)."""
    marker = folder / "bench-dims.json"
    if marker.exists() and json.loads(marker.read_text()) == DIMS:
        return folder
    from offload.testing import make_tiny_checkpoint

    make_tiny_checkpoint("glm_moe_dsa", folder, **DIMS)
    marker.write_text(json.dumps(DIMS))
    return folder


def gguf_file(folder: Path) -> Path:
    """The bench checkpoint as a BF16 GGUF (offload runs it in bf16), converted once by llama.cpp's converter.
    Its tiny test tokenizer is no pre-tokenizer the converter knows by hash; the bench feeds token ids, so
    the converter is told 'glm4' (GLM-5's) instead of refusing."""
    dest = folder / "model-BF16.gguf"
    if dest.is_file() and dest.stat().st_mtime >= (folder / "bench-dims.json").stat().st_mtime:
        return dest
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_gguf_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_gguf_fixtures", script)
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    lc = fixtures.sdist_dir() / "vendor" / "llama.cpp"  # the sdist of the installed llama-cpp-python
    code = ("import runpy, sys; sys.path.insert(0, sys.argv[1]); from conversion import base; "
            "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'glm4'; "
            "sys.argv = [sys.argv[1] + '/convert_hf_to_gguf.py'] + sys.argv[2:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    tmp = dest.with_suffix(".partial")
    # cwd: the folder, not the repo root, whose gguf/ would shadow the sdist's gguf-py
    env = dict(os.environ, PYTHONPATH=str(lc / "gguf-py"), NO_LOCAL_GGUF="1")
    r = subprocess.run([sys.executable, "-c", code, str(lc), str(folder), "--outtype", "bf16", "--outfile",
                        str(tmp)], cwd=str(folder), env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {folder}: {r.stderr.strip()[-2000:]}")
    tmp.rename(dest)
    return dest


def measure_llama_cpp(path: str, s: int, decode_tokens: int, flash_attn: bool) -> dict:
    """One context size through llama-cpp-python, in this process: prefill all S tokens in 512-token chunks
    (the last two timed), then greedy decode at depth S."""
    import llama_cpp
    import numpy as np

    n = len(os.sched_getaffinity(0))  # torch's default thread count on Linux, as offload's rows use
    llm = llama_cpp.Llama(model_path=path, n_ctx=s + decode_tokens, n_batch=CHUNK, n_ubatch=CHUNK, n_threads=n,
                          n_threads_batch=n, flash_attn=flash_attn, verbose=False)
    ids = np.random.default_rng(0).integers(0, llm.n_vocab(), s).tolist()
    timed_from = max(0, s - 2 * CHUNK)
    chunk_s = []
    for i in range(0, s, CHUNK):
        t0 = time.perf_counter()
        llm.eval(ids[i:i + CHUNK])
        if i >= timed_from:
            chunk_s.append((min(CHUNK, s - i), time.perf_counter() - t0))
    step_s = []
    for _ in range(decode_tokens):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # the last token's
        tok = int(np.argmax(logits))
        t0 = time.perf_counter()
        llm.eval([tok])
        step_s.append(time.perf_counter() - t0)
    return {"S": s, "path": "llama.cpp FA" if flash_attn else "llama.cpp",
            "prefill_tok_s": max(k / dt for k, dt in chunk_s), "prefill_s": sum(dt for _, dt in chunk_s),
            "decode_ms": 1e3 * min(step_s), "decode_median_ms": 1e3 * statistics.median(step_s),
            "peak_rss_gb": peak_rss_gb(), "threads": n, "load": os.getloadavg()[0]}


def use_mask_path() -> None:
    """The reference the sparse path replaced: one (T, i, S) score tensor, attention over all S, masked."""
    from offload.models import glm_moe_dsa
    from offload.models.mla import MLAAttention

    glm_moe_dsa.index_chunk = lambda t, n_heads, k: 1 << 62  # one chunk of keys: all S at once

    def masked(self, q_nope, q_rot, latent_all, k_rot_all, idx, valid):
        t, s = q_nope.shape[0], latent_all.shape[0]
        start = s - t
        mask = glm_moe_dsa.selection_mask((idx, valid), t, s, start, q_nope.device)  # (T, S)
        return self.attend_causal(q_nope, q_rot, latent_all, k_rot_all, start, mask=mask)

    MLAAttention.attend_selected = masked


def tile_cache(cache, filled: int, upto: int) -> None:
    """Fill positions filled..upto of each layer's cache with copies of its first `filled` (real) ones."""
    for layer in cache.layers:
        layer.reserve(upto)  # caches grow on demand (offload.cache)
        for t in (layer.latent, layer.k_rope, layer.index_k):
            if t is None:
                continue
            for i in range(filled, upto, filled):
                n = min(filled, upto - i)
                t[i:i + n] = t[:n]
    cache.length = upto


def measure(path: str, s: int, decode_tokens: int, mask: bool, whole: bool = False) -> dict:
    """One context size, in this process. whole: time the prefill of all S tokens; else the last two chunks
    (positions S - 1024 .. S), after a real prefill of the first min(S - 1024, FILL) tokens tiled up to
    S - 1024 (attention's work depends on S, not on what the rows hold)."""
    import torch

    import offload

    if mask:
        use_mask_path()
    ctx = s + decode_tokens
    llm = offload.load(path, device="cpu", dtype="bfloat16", ctx=ctx, placement="cpu", progress=False)
    cache = llm._cache_for(ctx)  # checked against free RAM, then allocated
    ids = torch.randint(0, llm.model.args.vocab_size, (s,), generator=torch.Generator().manual_seed(0))
    timed_from = 0 if whole else max(0, s - 2 * CHUNK)
    real = timed_from if whole else min(timed_from, FILL)
    for i in range(0, real, CHUNK):
        llm.model.forward(ids[i:min(real, i + CHUNK)], cache, last_only=True)
    if real < timed_from:
        tile_cache(cache, real, timed_from)
    chunk_s = []
    for i in range(timed_from, s, CHUNK):
        t0 = time.perf_counter()
        logits = llm.model.forward(ids[i:i + CHUNK], cache, last_only=True)
        chunk_s.append((min(CHUNK, s - i), time.perf_counter() - t0))
    prefill = sum(dt for _, dt in chunk_s)
    step_s = []
    for _ in range(decode_tokens):
        tok = logits[-1].argmax().view(1)
        t0 = time.perf_counter()
        logits = llm.model.forward(tok, cache, last_only=True)
        step_s.append(time.perf_counter() - t0)
    # best of: the other programs on the box only ever add time; the median is kept beside it
    best = max(n / dt for n, dt in chunk_s)  # whole: the mean rate, as the first chunks are the cheapest
    return {"S": s, "path": "mask" if mask else "sparse", "prefill_tok_s": (s / prefill) if whole else best,
            "prefill_s": prefill, "decode_ms": 1e3 * min(step_s),
            "decode_median_ms": 1e3 * statistics.median(step_s),
            "peak_rss_gb": peak_rss_gb(),
            "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}


def peak_rss_gb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would
    report at least its parent's RSS at the fork (the parent that built the checkpoint: 0.58 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kB


def run_child(path: Path, s: int, decode_tokens: int, mask: bool, whole: bool, timeout: float,
              llama_cpp: str = "") -> dict:
    """One size in a fresh process: offload (mask or sparse path), or llama.cpp ('off' / 'on': flash attention)
    on the GGUF at `path`."""
    fn, args, name = "measure", [str(path), s, decode_tokens, mask, whole], "mask" if mask else "sparse"
    if llama_cpp:
        fn, args = "measure_llama_cpp", [str(path), s, decode_tokens, llama_cpp == "on"]
        name = "llama.cpp FA" if llama_cpp == "on" else "llama.cpp"
    r = in_child("offload.bench_long", fn, args, timeout)
    return {"S": s, "path": name, **r} if "error" in r else r


def label(s: int) -> str:
    return f"{s // 1024}k" if s % 1024 == 0 else str(s)


def row(r: dict) -> str:
    if "error" in r:
        return f"| {label(r['S'])} | {r['path']} | {r['error']} | | | |"
    return (f"| {label(r['S'])} | {r['path']} | {r['decode_ms']:.1f} ({r['decode_median_ms']:.0f}) | "
            f"{r['prefill_tok_s']:.0f} | "
            f"{r['peak_rss_gb']:.2f} GB | {r['load']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="offload bench long-context", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1k,4k,16k,64k", help="context sizes S (k = 1024)")
    p.add_argument("--baseline-sizes", default="1k,4k", help="sizes also run on the mask path ('' for none)")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps timed at each size")
    cache_home = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    p.add_argument("--dir", default=os.path.join(cache_home, "offload", "bench-long-context"),
                   help="where the checkpoint is built (once)")
    p.add_argument("--whole", action="store_true", help="time the prefill of the whole prompt (slow at 64k+ "
                   "on a few cores), not its last two chunks after a tiled cache")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per size before it is called over")
    p.add_argument("--llama-cpp", action="store_true", help="also run llama.cpp's GLM-DSA (llama-cpp-python) on "
                   "the checkpoint as a BF16 GGUF at each size, in turn with offload's rows")
    p.add_argument("--llama-cpp-fa", default="off", help="llama.cpp's flash attention at each size: off, on "
                   "or off,on")
    a = p.parse_args(argv)
    sizes = [size(x) for x in a.sizes.split(",") if x]
    base = [size(x) for x in a.baseline_sizes.split(",") if x]
    fa = [x for x in a.llama_cpp_fa.split(",") if x] if a.llama_cpp else []
    if any(x not in ("off", "on") for x in fa):
        p.error(f"--llama-cpp-fa takes off, on or off,on, not {a.llama_cpp_fa!r}")
    path = checkpoint(Path(a.dir))
    gguf = gguf_file(path) if fa else None
    # load: the machine's 1-minute load average at the end of the size (other programs share the cores)
    what = "over the whole prompt" if a.whole else "best of the last two 512-token chunks"
    print(f"| S | path | decode ms/token, best (median) | prefill tok/s, {what} | peak RSS | load |")
    print("|---|---|---|---|---|---|")
    results = {}
    for s in sizes:
        for mask in ([True] if s in base else []) + [False]:
            r = run_child(path, s, a.decode_tokens, mask, a.whole, a.timeout)
            results[(s, mask)] = r
            print(row(r), flush=True)
        for x in fa:
            r = run_child(gguf, s, a.decode_tokens, False, False, a.timeout, llama_cpp=x)
            results[(s, "llama.cpp " + x)] = r
            print(row(r), flush=True)
    ok = {s: r for (s, mask), r in results.items() if mask is False and "error" not in r}
    for s in base:
        m, r = results.get((s, True)), ok.get(s)
        if m and r and "error" not in m:
            print(f"S {label(s)}: sparse / mask  decode {m['decode_ms'] / r['decode_ms']:.2f}x faster, "
                  f"prefill {r['prefill_tok_s'] / m['prefill_tok_s']:.2f}x")
    pairs = [(s, m, ok[s]) for (s, key), m in results.items()
             if isinstance(key, str) and s in ok and "error" not in m]  # llama.cpp's rows beside offload's
    if pairs:
        print("\n| S | offload (sparse) / | decode ms/token (best) | prefill tok/s | peak RSS |")
        print("|---|---|---|---|---|")
        for s, m, r in pairs:
            print(f"| {label(s)} | {m['path']} | {r['decode_ms'] / m['decode_ms']:.2f}x | "
                  f"{r['prefill_tok_s'] / m['prefill_tok_s']:.2f}x | {r['peak_rss_gb'] / m['peak_rss_gb']:.2f}x |")
    if 4096 in ok:
        for s in sorted(ok):
            if s > 4096:
                d = ok[s]["decode_ms"] / ok[4096]["decode_ms"]
                pf = ok[s]["prefill_tok_s"] / ok[4096]["prefill_tok_s"]
                print(f"S {label(s)} against 4k: decode {d:.2f}x the time (goal <= 1.5x at 64k), "
                      f"prefill {pf:.2f}x the tok/s (goal >= 0.33x at 64k)")


if __name__ == "__main__":
    main(sys.argv[1:])
