"""MLA through torch's fused attention (models.mla: attend_expanded, latent_attention) against the plain
reference (mla_attention_reference: keys and values expanded per head, explicit scores + softmax), float32,
fresh random data, awkward sizes: a prompt from 0, a chunk after a cached prefix, decode, the static step's
length-masked decode over a whole preallocated cache, and DSA's gathered keys. The absorbed forms run both ways
(`fused`): torch's fused attention (GPUs, float32 on the CPU) and the explicit scores (bf16 on the CPU).

T new tokens, S keys, h heads, n nope dim, r rope dim, v value dim, c latent dim, K selected keys.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from offload.models import mla
from offload.models.base import causal_attention, grouped_attention, length_mask
from offload.models.glm_moe_dsa import selection_mask
from offload.models.mla import MLAAttention, mla_attention_reference
from offload.models.weights import Linear

# (n, r, v): DeepSeek-like v < n + r (v padded), GLM-5-like v == n + r, and v > n + r (q and k padded)
DIMS = [(16, 8, 12), (12, 4, 16), (8, 4, 24)]
H, C = 3, 32


def make_attn(n: int, r: int, v: int, g: torch.Generator) -> MLAAttention:
    """An MLAAttention with random float weights; the tests call its attention on given q / latent / k_rot."""
    def lin(rows, cols):
        return Linear(torch.randn(rows, cols, generator=g) * 0.1)

    hid = 20
    return MLAAttention(q_a=None, q_a_norm=None, q_b=None, q_proj=lin(H * (n + r), hid), kv_a=lin(C + r, hid),
                        kv_a_norm=torch.ones(C), kv_b=torch.randn(H * (n + v), C, generator=g) * 0.3,
                        wo=lin(hid, H * v), n_heads=H, nope=n, rope_dim=r, v_dim=v, kv_lora=C, rope=None,
                        scale=(n + r) ** -0.5, eps=1e-6, device="cpu", dtype=torch.float32)


def inputs(attn: MLAAttention, t: int, s: int, g: torch.Generator, dtype=torch.float32):
    q_nope = torch.randn(t, attn.h, attn.nope, generator=g)  # (T, h, n)
    q_rot = torch.randn(t, attn.h, attn.r, generator=g)  # (T, h, r)
    latent, k_rot = torch.randn(s, attn.c, generator=g), torch.randn(s, attn.r, generator=g)  # (S, c), (S, r)
    return [x.to(dtype) for x in (q_nope, q_rot, latent, k_rot)]


def reference(attn, q_nope, q_rot, latent, k_rot, start, mask=None):
    return mla_attention_reference(q_nope, q_rot, latent, k_rot, attn.w_uk, attn.w_uv, start, attn.scale, mask)


@pytest.fixture(params=[True, False], ids=["fused", "explicit"])
def fused(request, monkeypatch):
    monkeypatch.setattr(mla, "fused_latent", lambda q: request.param)
    return request.param


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("t,start", [(1, 0), (7, 0), (17, 0), (255, 0),  # a prompt from 0
                                     (1, 599), (7, 300), (17, 300), (255, 300)])  # after a cached prefix
def test_causal_matches_reference(dims, t, start, fused):
    g = torch.Generator().manual_seed(t * 1000 + start + dims[2])
    attn = make_attn(*dims, g)
    q_nope, q_rot, latent, k_rot = inputs(attn, t, start + t, g)
    ours = attn.attend_causal(q_nope, q_rot, latent, k_rot, start)
    ref = reference(attn, q_nope, q_rot, latent, k_rot, start)
    assert ours.shape == (t, H, dims[2])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("pos", [0, 1, 255, 570])
def test_static_length_mask_decode(dims, pos, fused):
    """decode_static's attention: the whole preallocated cache (capacity 600; the rows past pos hold stale
    values, which must get no weight), masked by the device position."""
    g = torch.Generator().manual_seed(pos + dims[2])
    attn = make_attn(*dims, g)
    q_nope, q_rot, latent, k_rot = inputs(attn, 1, 600, g)
    mask = length_mask(torch.tensor([pos]), 600)  # (1, C)
    ours = attn.attend_causal(q_nope, q_rot, latent, k_rot, 0, mask)
    ref = reference(attn, q_nope, q_rot, latent[: pos + 1], k_rot[: pos + 1], pos)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def selection(t: int, start: int, k: int, g: torch.Generator):
    """Per query k distinct key ids, its own position first (so every query reads at least one key), some
    slots invalid (as the indexer marks slots it could not fill) -> idx, valid (T, K)."""
    s = start + t
    idx = torch.stack([torch.randperm(s, generator=g)[:k] for _ in range(t)])  # (T, K)
    own = torch.arange(start, s)
    idx = torch.where(idx == own[:, None], idx[:, :1], idx)  # own position moved to slot 0
    idx[:, 0] = own
    valid = (idx <= own[:, None]) & (torch.rand(t, k, generator=g) > 0.2)
    valid[:, 0] = True
    return idx, valid


@pytest.mark.parametrize("dims", DIMS[:2])
@pytest.mark.parametrize("t,start,k", [(1, 599, 40), (7, 300, 40), (17, 200, 64), (255, 100, 33)])
def test_selected_matches_reference(dims, t, start, k, fused, monkeypatch):
    monkeypatch.setattr(mla, "SELECTED_WORKSPACE_BYTES", 5000)  # several query blocks
    g = torch.Generator().manual_seed(t + start + k)
    attn = make_attn(*dims, g)
    q_nope, q_rot, latent, k_rot = inputs(attn, t, start + t, g)
    idx, valid = selection(t, start, k, g)
    ours = attn.attend_selected(q_nope, q_rot, latent, k_rot, idx, valid)
    mask = selection_mask((idx, valid), t, start + t, start, "cpu")  # (T, S)
    ref = reference(attn, q_nope, q_rot, latent, k_rot, start, mask)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("t,start", [(7, 40), (40, 0), (40, 30)])
def test_bf16_within_rounding(t, start, fused):
    """bf16 inputs: the fused paths stay within bf16 rounding of the float32 reference."""
    g = torch.Generator().manual_seed(t + start)
    attn = make_attn(16, 8, 12, g)
    x32 = inputs(attn, t, start + t, g)
    ref = reference(attn, *x32, start)
    w_uk, w_uv = attn.w_uk, attn.w_uv
    attn.w_uk, attn.w_uv = w_uk.bfloat16(), w_uv.bfloat16()
    ours = attn.attend_causal(*[x.bfloat16() for x in x32], start).float()
    torch.testing.assert_close(ours, ref, rtol=0, atol=3e-2)


@pytest.mark.parametrize("t,start", [(1, 0), (7, 300), (17, 0), (255, 300)])
def test_grouped_attention_matches_reference(t, start):
    """GQA's fused path (base.grouped_attention) against the same reference: 6 query heads over 2 KV heads."""
    g = torch.Generator().manual_seed(t + start)
    s = start + t
    q = torch.randn(6, t, 16, generator=g)  # (h, T, d)
    k, v = torch.randn(2, s, 16, generator=g), torch.randn(2, s, 16, generator=g)  # (kv, S, d)
    ours = grouped_attention(q, k, v, start, 0.25)
    ref = causal_attention(q, k.repeat_interleave(3, 0), v.repeat_interleave(3, 0), start, 0.25)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


class Largest(TorchDispatchMode):
    """The most elements any op's output held (ops inside a fused kernel are not seen; a decomposed fallback's
    are)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


@pytest.mark.parametrize("t,start", [(255, 0), (64, 300)])
def test_prefill_holds_no_scores(t, start):
    """The expanded prefill never holds an (h, T, S) score tensor: torch's fused kernel runs (a fallback to
    SDPA's math form, e.g. for 3-d inputs or unequal head dims on the CPU, would show its scores here)."""
    g = torch.Generator().manual_seed(t)
    attn = make_attn(16, 8, 12, g)
    x = inputs(attn, t, start + t, g)
    with Largest() as seen:
        attn.attend_causal(*x, start)
    assert seen.numel < H * t * (start + t) // 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_matches_reference(dtype, atol):
    """On a GPU (whichever SDPA backend torch picks): a prompt, a chunk after a prefix, decode, the static
    length mask and DSA's gathered keys against the float32 reference computed on the CPU."""
    g = torch.Generator().manual_seed(5)
    attn = make_attn(16, 8, 12, g)
    w_uk, w_uv = attn.w_uk, attn.w_uv
    attn.w_uk, attn.w_uv = w_uk.to("cuda", dtype), w_uv.to("cuda", dtype)
    for t, start in [(255, 0), (17, 300), (1, 599), (7, 300)]:
        x = inputs(attn, t, start + t, g)
        ours = attn.attend_causal(*[a.to("cuda", dtype) for a in x], start).float().cpu()
        ref = mla_attention_reference(*x, w_uk, w_uv, start, attn.scale)
        torch.testing.assert_close(ours, ref, rtol=0, atol=atol)
    x = inputs(attn, 1, 600, g)
    mask = length_mask(torch.tensor([300], device="cuda"), 600)  # (1, C)
    ours = attn.attend_causal(*[a.to("cuda", dtype) for a in x], 0, mask).float().cpu()
    ref = mla_attention_reference(*[a[:301] if i >= 2 else a for i, a in enumerate(x)], w_uk, w_uv, 300, attn.scale)
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol)
    idx, valid = selection(17, 200, 40, g)
    x = inputs(attn, 17, 217, g)
    ours = attn.attend_selected(*[a.to("cuda", dtype) for a in x], idx.cuda(), valid.cuda()).float().cpu()
    mask = selection_mask((idx, valid), 17, 217, 200, "cpu")  # (T, S)
    ref = mla_attention_reference(*x, w_uk, w_uv, 200, attn.scale, mask)
    torch.testing.assert_close(ours, ref, rtol=0, atol=atol)


@pytest.mark.parametrize("t,start", [(1, 300), (17, 40)])
def test_bench_baseline_is_the_reference(t, start):
    """`offload bench mla-attention`'s baseline (the code the fused paths replaced) computes the same attention."""
    from offload.bench_mla import old_causal, old_selected

    g = torch.Generator().manual_seed(t)
    attn = make_attn(16, 8, 12, g)
    x = inputs(attn, t, start + t, g)
    torch.testing.assert_close(old_causal(attn, *x, start), reference(attn, *x, start), rtol=0, atol=1e-5)
    idx, valid = selection(t, start, 20, g)
    mask = selection_mask((idx, valid), t, start + t, start, "cpu")  # (T, S)
    torch.testing.assert_close(old_selected(attn, *x, idx, valid), reference(attn, *x, start, mask), rtol=0, atol=1e-5)
