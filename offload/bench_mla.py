"""`offload bench mla-attention`: MLA attention through torch's fused attention (models.mla) against the
explicit scores + softmax it replaced (kept here as the baseline), time and peak memory of one attention call.

Cases (random data, DeepSeek-V3's head dims n 128, r 64, v 128, c 512; DSA cases GLM-5's n 192, r 64,
v 256, c 512, 64 heads, 2048 keys selected):
  prefill-T   a T-token prompt from 0 (the expanded form)
  decode-S    one token over S cached positions (the absorbed form)
  dsa-decode-S, dsa-prefill-T   DSA's gathered keys (attend_selected), S cached
The peak memory of each (case, path) is measured in its own process: VmHWM after one call less VmRSS before it
(the high-water mark reset through /proc/self/clear_refs). The time is the best of --reps calls after a warm-up,
old and new called in turn in one process.
"""

import argparse
import time
from pathlib import Path

import torch

from offload.bench_child import in_child
from offload.models import mla
from offload.models.base import causal_mask
from offload.models.weights import Linear
from offload.models.workspace import workspace

MLA_DIMS = dict(nope=128, rope_dim=64, v_dim=128, kv_lora=512)  # DeepSeek-V3
DSA_DIMS = dict(nope=192, rope_dim=64, v_dim=256, kv_lora=512)  # GLM-5
DSA_HEADS, DSA_TOPK = 64, 2048


def old_causal(self, q_nope, q_rot, latent_all, k_rot_all, start: int) -> torch.Tensor:
    """MLAAttention.attend_causal before torch's fused attention: explicit (h, T, S) scores."""
    t, s = q_nope.shape[0], latent_all.shape[0]
    expanded = t >= mla.EXPANDED_MIN_TOKENS
    if expanded:
        k_nope = torch.einsum("sc,hnc->hsn", latent_all, self.w_uk)  # (h, S, n)
        scores = torch.matmul(q_nope.transpose(0, 1), k_nope.transpose(1, 2))  # (h, T, S)
    else:
        q_lat = self.absorb_q(q_nope)  # (h, T, c)
        scores = torch.matmul(q_lat, latent_all.T)  # (h, T, S)
    scores = scores + torch.matmul(q_rot.transpose(0, 1), k_rot_all.T)  # (h, T, S)
    scores = scores * self.scale
    mask = causal_mask(t, s, start, q_nope.device)  # (T, S)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)  # (h, T, S)
    if expanded:
        v_all = torch.einsum("sc,hvc->hsv", latent_all, self.w_uv)  # (h, S, v)
        return torch.matmul(probs, v_all).transpose(0, 1)  # (T, h, v)
    return self.expand_out(torch.matmul(probs, latent_all))  # (T, h, v)


def old_selected(self, q_nope, q_rot, latent_all, k_rot_all, idx, valid) -> torch.Tensor:
    """MLAAttention.attend_selected before torch's fused attention: explicit (tq, h, K) scores per block."""
    t, k = idx.shape
    q_lat = self.absorb_q(q_nope).transpose(0, 1).contiguous()  # (T, h, c)
    out_lat = torch.empty_like(q_lat)  # (T, h, c)
    row = k * ((self.c + self.r) * latent_all.element_size() + 2 * 4 * self.h)
    tq = min(t, max(1, mla.SELECTED_WORKSPACE_BYTES // row))
    buf = workspace("mla.gathered", tq * k * (self.c + self.r), latent_all.device, latent_all.dtype)
    for q0 in range(0, t, tq):
        i = idx[q0:q0 + tq].reshape(-1)  # (tq * K,)
        n = i.shape[0]
        lat_out, rot_out = buf[: n * self.c].view(n, self.c), buf[n * self.c: n * (self.c + self.r)]
        lat = torch.index_select(latent_all, 0, i, out=lat_out).view(-1, k, self.c)  # (tq, K, c)
        k_rot = torch.index_select(k_rot_all, 0, i, out=rot_out.view(n, self.r)).view(-1, k, self.r)
        scores = torch.bmm(q_lat[q0:q0 + tq], lat.transpose(1, 2))  # (tq, h, K)
        scores = scores + torch.bmm(q_rot[q0:q0 + tq], k_rot.transpose(1, 2))
        scores = (scores * self.scale).masked_fill_(~valid[q0:q0 + tq, None], torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_lat.dtype)  # (tq, h, K)
        out_lat[q0:q0 + tq] = torch.bmm(probs, lat)  # (tq, h, c)
    return self.expand_out(out_lat.transpose(0, 1))  # (T, h, v)


def build(heads: int, dims: dict, dtype) -> mla.MLAAttention:
    n, r, v, c = dims["nope"], dims["rope_dim"], dims["v_dim"], dims["kv_lora"]
    g = torch.Generator().manual_seed(0)
    lin = Linear(torch.zeros(1, 1, dtype=dtype))  # the projections are not timed
    kv_b = (torch.randn(heads * (n + v), c, generator=g) * c ** -0.5).to(dtype)
    return mla.MLAAttention(q_a=None, q_a_norm=None, q_b=None, q_proj=lin, kv_a=lin, kv_a_norm=None, kv_b=kv_b,
                            wo=lin, n_heads=heads, rope=None, scale=(n + r) ** -0.5, eps=1e-6, device="cpu",
                            dtype=dtype, **dims)


def case_calls(case: str, heads: int, dtype) -> dict:
    """The attention call of one case, its inputs made: {"old": f, "new": f}, no-argument functions."""
    kind, size = case.rsplit("-", 1)
    size = int(size[:-1]) * 1024 if size.endswith("k") else int(size)
    dsa = kind.startswith("dsa")
    attn = build(DSA_HEADS if dsa else heads, DSA_DIMS if dsa else MLA_DIMS, dtype)
    # W_UK / W_UV as their own tensors: the engine's strided views of kv_b cost bf16 absorb_q / expand_out 3-8x
    # here (a copy per call), the same on both paths, which would hide the attention itself
    attn.w_uk, attn.w_uv = attn.w_uk.contiguous(), attn.w_uv.contiguous()
    t = 1 if kind.endswith("decode") else size
    s = size if kind.endswith("decode") else (max(2 * DSA_TOPK, t) if dsa else t)
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q_nope, q_rot = rand(t, attn.h, attn.nope), rand(t, attn.h, attn.r)  # (T, h, n), (T, h, r)
    latent, k_rot = rand(s, attn.c), rand(s, attn.r)  # (S, c), (S, r)
    start = s - t
    if not dsa:
        return {"old": lambda: old_causal(attn, q_nope, q_rot, latent, k_rot, start),
                "new": lambda: attn.attend_causal(q_nope, q_rot, latent, k_rot, start)}
    idx = torch.randint(0, s, (t, DSA_TOPK), generator=g) % (torch.arange(start, s)[:, None] + 1)  # (T, K) causal
    valid = torch.ones(t, DSA_TOPK, dtype=torch.bool)
    return {"old": lambda: old_selected(attn, q_nope, q_rot, latent, k_rot, idx, valid),
            "new": lambda: attn.attend_selected(q_nope, q_rot, latent, k_rot, idx, valid)}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak(case: str, heads: int, path: str, dtype_name: str) -> dict:
    """In this process: MB above the inputs at the high-water mark of one call of `path`."""
    call = case_calls(case, heads, getattr(torch, dtype_name))[path]
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        return {"peak_mb": float("nan")}
    call()
    return {"peak_mb": (_status_kb("VmHWM") - before) / 1024}


def forced(fused: bool, call):
    """call with mla.fused_latent answering `fused` (the absorbed forms' SDPA / explicit choice)."""
    def run():
        saved, mla.fused_latent = mla.fused_latent, lambda q: fused
        try:
            return call()
        finally:
            mla.fused_latent = saved
    return run


def times(case: str, heads: int, dtype_name: str, reps: int, forms: bool = False) -> dict:
    """In this process: old and new called in turn (so a busy box slows both alike), best ms of each; forms:
    instead new's absorbed form both ways, "sdpa" and "explicit"."""
    calls = case_calls(case, heads, getattr(torch, dtype_name))
    if forms:
        calls = {"sdpa": forced(True, calls["new"]), "explicit": forced(False, calls["new"])}
    out = {path: [] for path in calls}
    for path, call in calls.items():
        call()  # warm-up
    for _ in range(reps):
        for path, call in calls.items():
            t0 = time.perf_counter()
            call()
            out[path].append(1e3 * (time.perf_counter() - t0))
    return {path: min(ms) for path, ms in out.items()}


def run_child(fn: str, args: list, timeout: float) -> dict:
    return in_child("offload.bench_mla", fn, args, timeout)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="offload bench mla-attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="prefill-512,prefill-2048,decode-4k,decode-16k,dsa-decode-16k,dsa-prefill-128",
                   help="comma-separated cases (k = 1024)")
    p.add_argument("--heads", default="16", help="comma-separated head counts for the MLA cases (DSA: 64)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=5, help="timed calls per case and path (best reported)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per case and path")
    p.add_argument("--forms", action="store_true",
                   help="time only the absorbed form (decode / dsa cases) both ways: SDPA against explicit scores")
    a = p.parse_args(argv)
    if a.forms:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}; models.mla's absorbed form "
              f"through SDPA and through explicit scores + softmax (mla.fused_latent forced); ratio explicit / sdpa")
        print("| case | h | sdpa ms | explicit ms | explicit / sdpa |")
        print("|---|---|---|---|---|")
        for case in a.cases.split(","):
            for heads in [DSA_HEADS] if case.startswith("dsa") else [int(h) for h in a.heads.split(",")]:
                ms = run_child("times", [case, heads, a.dtype, a.reps, True], a.timeout)
                if "error" in ms:
                    print(f"| {case} | {heads} | {ms['error']} | | |", flush=True)
                    continue
                print(f"| {case} | {heads} | {ms['sdpa']:.2f} | {ms['explicit']:.2f} | "
                      f"{ms['explicit'] / ms['sdpa']:.2f}x |", flush=True)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.dtype}; old: the explicit scores + "
          f"softmax models.mla had (kept here), new: models.mla now (torch SDPA; bf16 decode / DSA on the CPU: "
          f"explicit scores, see mla.fused_latent); ratios old / new")
    print("| case | h | old ms | new ms | speed-up | old peak MB | new peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for case in a.cases.split(","):
        for heads in [DSA_HEADS] if case.startswith("dsa") else [int(h) for h in a.heads.split(",")]:
            mem = [run_child("peak", [case, heads, path, a.dtype], a.timeout) for path in ("old", "new")]
            ms = run_child("times", [case, heads, a.dtype, a.reps], a.timeout)
            errors = [r["error"] for r in (*mem, ms) if "error" in r]
            if errors:
                print(f"| {case} | {heads} | {'; '.join(errors)} | | | | | |", flush=True)
                continue
            (old_mb, new_mb), ratio = [m["peak_mb"] for m in mem], mem[0]["peak_mb"] / max(mem[1]["peak_mb"], 1)
            print(f"| {case} | {heads} | {ms['old']:.2f} | {ms['new']:.2f} | {ms['old'] / ms['new']:.2f}x | "
                  f"{old_mb:.0f} | {new_mb:.0f} | {ratio:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
