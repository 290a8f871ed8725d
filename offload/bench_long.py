"""`offload bench long-context`: DeepSeek Sparse Attention at long context, on a GLM-DSA checkpoint with GLM-5.2's
attention and indexer head dims (hidden 512, 16 heads, q_lora 256, kv_lora 512, nope 192, rope 64, v 256,
indexer 32 x 128, index_topk 2048; 4 layers: 1 full + 3 shared; tiny experts), built once with
offload.testing.make_tiny_checkpoint (random weights, bf16 on the CPU).

Each context size S runs in its own process, so its peak RSS is its own: a random S-token prompt prefilled in
512-token chunks (tok/s over the whole prompt, and of its last chunk, the one at depth S - 512), then greedy
decode (ms / token at depth S). The baseline, in the same run at --baseline-sizes: the mask path the sparse one
replaced (the indexer scores all (T, i, S) at once, attention runs over all S with a (T, S) mask), still in the
code as the tests' reference.
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

DIMS = dict(hidden_size=512, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=256, kv_lora_rank=512,
            qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, index_n_heads=32, index_head_dim=128,
            index_topk=2048, num_hidden_layers=4, indexer_types=["full", "shared", "shared", "shared"],
            mlp_layer_types=["dense", "sparse", "sparse", "sparse"], max_position_embeddings=262144)
CHUNK = 512


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


def measure(path: str, s: int, decode_tokens: int, mask: bool) -> dict:
    """One context size, in this process."""
    import torch

    import offload

    if mask:
        use_mask_path()
    ctx = s + decode_tokens
    llm = offload.load(path, device="cpu", dtype="bfloat16", ctx=ctx, placement="cpu", progress=False)
    cache = llm._cache_for(ctx)  # checked against free RAM, then allocated
    ids = torch.randint(0, llm.model.args.vocab_size, (s,), generator=torch.Generator().manual_seed(0))
    chunk_s = []
    start = time.perf_counter()
    for i in range(0, s, CHUNK):
        t0 = time.perf_counter()
        logits = llm.model.forward(ids[i:i + CHUNK], cache, last_only=True)
        chunk_s.append((min(CHUNK, s - i), time.perf_counter() - t0))
    prefill = time.perf_counter() - start
    step_s = []
    for _ in range(decode_tokens):
        tok = logits[-1].argmax().view(1)
        t0 = time.perf_counter()
        logits = llm.model.forward(tok, cache, last_only=True)
        step_s.append(time.perf_counter() - t0)
    return {"S": s, "path": "mask" if mask else "sparse", "prefill_tok_s": s / prefill,
            "last_chunk_tok_s": chunk_s[-1][0] / chunk_s[-1][1], "prefill_s": prefill,
            "decode_ms": 1e3 * statistics.median(step_s), "peak_rss_gb": peak_rss_gb(),
            "threads": torch.get_num_threads()}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kB


def run_child(path: Path, s: int, decode_tokens: int, mask: bool, timeout: float) -> dict:
    code = ("import json, sys; from offload.bench_long import measure; "
            "print('RESULT ' + json.dumps(measure(*json.loads(sys.argv[1]))))")
    arg = json.dumps([str(path), s, decode_tokens, mask])
    try:
        out = subprocess.run([sys.executable, "-P", "-c", code, arg], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"S": s, "path": "mask" if mask else "sparse", "error": f"over {timeout:.0f} s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
    return {"S": s, "path": "mask" if mask else "sparse", "error": tail[:200]}


def label(s: int) -> str:
    return f"{s // 1024}k" if s % 1024 == 0 else str(s)


def row(r: dict) -> str:
    if "error" in r:
        return f"| {label(r['S'])} | {r['path']} | {r['error']} | | | |"
    return (f"| {label(r['S'])} | {r['path']} | {r['decode_ms']:.1f} | {r['prefill_tok_s']:.0f} | "
            f"{r['last_chunk_tok_s']:.0f} | {r['peak_rss_gb']:.2f} GB |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="offload bench long-context", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1k,4k,16k,64k", help="context sizes S (k = 1024)")
    p.add_argument("--baseline-sizes", default="1k,4k", help="sizes also run on the mask path ('' for none)")
    p.add_argument("--decode-tokens", type=int, default=16, help="greedy decode steps timed at each size")
    p.add_argument("--dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
                                                 "offload", "bench-long-context"),
                   help="where the checkpoint is built (once)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per size before it is reported as over")
    a = p.parse_args(argv)
    sizes = [size(x) for x in a.sizes.split(",") if x]
    base = [size(x) for x in a.baseline_sizes.split(",") if x]
    path = checkpoint(Path(a.dir))
    print("| S | path | decode ms/token | prefill tok/s (whole prompt) | last 512-chunk tok/s | peak RSS |")
    print("|---|---|---|---|---|---|")
    results = {}
    for s in sizes:
        for mask in ([True] if s in base else []) + [False]:
            r = run_child(path, s, a.decode_tokens, mask, a.timeout)
            results[(s, mask)] = r
            print(row(r), flush=True)
    ok = {s: r for (s, mask), r in results.items() if not mask and "error" not in r}
    for s in base:
        m, r = results.get((s, True)), ok.get(s)
        if m and r and "error" not in m:
            print(f"S {label(s)}: sparse / mask  decode {m['decode_ms'] / r['decode_ms']:.2f}x faster, "
                  f"prefill {r['prefill_tok_s'] / m['prefill_tok_s']:.2f}x")
    if 4096 in ok:
        for s in sorted(ok):
            if s > 4096:
                print(f"S {label(s)} against 4k: decode {ok[s]['decode_ms'] / ok[4096]['decode_ms']:.2f}x the time "
                      f"(goal <= 1.5x at 64k), prefill {ok[s]['prefill_tok_s'] / ok[4096]['prefill_tok_s']:.2f}x "
                      f"the tok/s (goal >= 0.33x at 64k)")


if __name__ == "__main__":
    main(sys.argv[1:])
