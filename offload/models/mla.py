"""Multi-head latent attention (DeepSeek-V3, Kimi-K2, GLM-5), computed in the absorbed form.

The cache holds only the normalised KV latent and the rotated rope key. kv_b_proj is split into W_UK and
W_UV, and queries are multiplied into the latent space, so no per-head K/V is ever materialised (the same
split llama.cpp stores as attn_k_b / attn_v_b). With DSA (GLM-5), past index_topk cached tokens each query
reads only the K rows its indexer picked, gathered from the cache (attend_selected): the cost stops growing
with S.

T new tokens, S cached + new tokens, H hidden, h heads, n nope dim, r rope dim, v value dim, c kv_lora_rank,
K keys selected per query.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from offload.cache import MLACache
from offload.models.base import Rope, causal_attention, causal_mask, length_mask, rms_norm
from offload.models.loading import LoadContext
from offload.models.workspace import workspace
from offload.models.weights import linears

# Query chunks of at least this many tokens use the expanded form (keys and values per head): per
# (query, key) pair it costs n + r + v multiply-adds against the absorbed form's 2c + r (DeepSeek-V3:
# 320 vs 1088), plus S·c·(n + v) per head to expand, which a long chunk amortises; decode stays absorbed.
EXPANDED_MIN_TOKENS = 16
# DSA sparse attention gathers the selected rows for a block of queries at a time (into a kept workspace):
# about this many bytes
SELECTED_WORKSPACE_BYTES = 32 << 20


class MLAAttention:
    def __init__(self, *, q_a, q_a_norm, q_b, q_proj, kv_a, kv_a_norm, kv_b, wo, n_heads, nope, rope_dim, v_dim,
                 kv_lora, rope: Rope, scale: float, eps: float, device, dtype, selector: Callable | None = None,
                 index_dim: int = 0, heads=None, kv_device=None):
        # q_a, q_b, q_proj, kv_a, wo: weights (offload.models.weights), biases inside; kv_b a float tensor
        # heads: (W_UK^T (h, c, n), W_UV (h, v, c)) quantised per head (a GGUF on the CPU) or None: the absorbed
        # products then read the file's blocks, not kv_b's float32 (4-7x the bytes, every decode step)
        self.uk_q, self.uv_q = heads if heads is not None else (None, None)
        self.q_a, self.q_a_norm, self.q_b, self.q_proj = q_a, q_a_norm, q_b, q_proj
        self.kv_a, self.kv_a_norm = kv_a, kv_a_norm
        # the projections of x, one call where the weights allow: (q, kv_a) or (q_a, kv_a)
        self.x_proj = linears([q_proj if q_proj is not None else q_a, kv_a])
        w = kv_b.view(n_heads, nope + v_dim, kv_lora)
        # contiguous copies (kv_b itself is then dropped): einsums over the strided halves copied them every call
        # (bf16 on the CPU: 2.4x the time of a decode step's absorb + expand at 128 heads)
        self.w_uk = w[:, :nope].contiguous()  # (h, n, c)
        self.w_uv = w[:, nope:].contiguous()  # (h, v, c)
        self.wo = wo
        self.h, self.nope, self.r, self.v, self.c = n_heads, nope, rope_dim, v_dim, kv_lora
        self.rope, self.scale, self.eps = rope, scale, eps
        self.device, self.dtype = device, dtype
        self.selector = selector  # DSA: picks the keys each query reads (see __call__)
        self.index_dim = index_dim
        # DSA: the latent + rope-key cache may live in RAM (the plan's KV home) while the indexer keys stay here
        self.kv_device = device if kv_device is None else kv_device
        self.rows_moved = 0  # latent rows copied from that home (fetch_rows)

    def new_cache(self, max_len: int) -> MLACache:
        return MLACache(max_len, self.c, self.r, self.device, self.dtype, self.index_dim, kv_device=self.kv_device)

    def project(self, x: torch.Tensor):
        """x (T, H) -> q_nope (T, h, n), q_rot (T, h, r), latent (T, c), k_rot (T, 1, r) before RoPE, and
        q_resid (T, q_lora) (the DSA indexer's input; None without a q LoRA)."""
        t = x.shape[0]
        if self.q_proj is not None:
            q_resid = None
            q, kv = self.x_proj(x)  # (T, h*(n + r)), (T, c + r)
        else:
            q_a, kv = self.x_proj(x)  # (T, q_lora), (T, c + r)
            q_resid = rms_norm(q_a, self.q_a_norm, self.eps)  # (T, q_lora)
            q = self.q_b(q_resid)
        q = q.view(t, self.h, self.nope + self.r)  # (T, h, n + r)
        latent = rms_norm(kv[:, : self.c], self.kv_a_norm, self.eps)  # (T, c)
        return q[..., : self.nope], q[..., self.nope:], latent, kv[:, self.c:].view(t, 1, self.r), q_resid

    def decode_static(self, x: torch.Tensor, pos: torch.Tensor, cache: MLACache, state: dict) -> torch.Tensor:
        """One token x (1, H) at device position pos (1,), static shapes: the latent and rope key written at pos
        (index_copy_), the absorbed attention over the whole preallocated cache masked by pos; DSA: the
        indexer's top-k over the whole key cache with future keys invalid (glm_moe_dsa.Indexer.static)."""
        q_nope, q_rot, latent, k_rot, q_resid = self.project(x)
        cos, sin = self.rope.cos_sin_of(pos, x.dtype, state)
        q_rot, k_rot = self.rope.apply(q_rot, cos, sin), self.rope.apply(k_rot, cos, sin)
        kv_pos = pos.to(self.kv_device)
        cache.latent.index_copy_(0, kv_pos, latent.to(self.kv_device))  # (C, c)
        cache.k_rope.index_copy_(0, kv_pos, k_rot[:, 0].to(self.kv_device))  # (C, r)
        sel = None
        if self.selector is not None:  # an Indexer (its static form) or a shared layer's reuse
            static = getattr(self.selector, "static", self.selector)
            sel = static(x, q_resid, pos, cache, state)
        latent_all, k_rot_all = cache.latent, cache.k_rope
        if self.kv_device != self.device:  # the KV home in RAM: a host read of the indices, by design
            latent_all, k_rot_all, sel = self.fetch_rows(latent_all, k_rot_all, sel, x.device, state)
        if sel is None:
            out = self.attend_causal(q_nope, q_rot, latent_all, k_rot_all, 0, length_mask(pos, cache.capacity))
        else:
            out = self.attend_selected(q_nope, q_rot, latent_all, k_rot_all, *sel)
        return self.wo(out.reshape(1, self.h * self.v))

    def __call__(self, x: torch.Tensor, start: int, cache: MLACache, state: dict) -> torch.Tensor:
        t = x.shape[0]
        q_nope, q_rot, latent, k_rot, q_resid = self.project(x)
        cos, sin = self.rope.cos_sin_at(start, t, x.device, x.dtype, state)
        q_rot, k_rot = self.rope.apply(q_rot, cos, sin), self.rope.apply(k_rot, cos, sin)
        latent_all, k_rot_all = cache.update(latent, k_rot[:, 0], start)  # (S, c), (S, r)
        # DSA: selector(x, q_resid, start, cache, state) -> None (every causal key) or (indices, valid), each
        # (T, K): the keys each query reads, gathered instead of masking a (T, S) score matrix
        sel = self.selector(x, q_resid, start, cache, state) if self.selector is not None else None
        if self.kv_device != self.device:
            latent_all, k_rot_all, sel = self.fetch_rows(latent_all, k_rot_all, sel, x.device, state)
        if sel is None:
            out = self.attend_causal(q_nope, q_rot, latent_all, k_rot_all, start)
        else:
            out = self.attend_selected(q_nope, q_rot, latent_all, k_rot_all, *sel)
        return self.wo(out.reshape(t, self.h * self.v))

    def fetch_rows(self, latent_all, k_rot_all, sel, device, state: dict):
        """The latent cache lives in RAM: copy to `device` only the rows attention reads, all S while no
        selection is made (S <= index_topk), else the distinct selected rows (decode: <= K; a prefill chunk:
        <= min(S, T * K)), gathered on the host, with the indices renumbered into them. The price: the indices
        are read on the host, one small device -> host copy (and sync) per full indexer layer; IndexShare layers
        reuse that layer's distinct rows and renumbering (kept in `state` for this forward)."""
        if sel is None:
            self.rows_moved += latent_all.shape[0]
            return latent_all.to(device), k_rot_all.to(device), None
        idx, valid = sel
        kept = state.get("dsa_rows")
        if kept is not None and kept[0] is idx:  # a shared layer: the same selection, its own latent cache
            rows, inv = kept[1], kept[2]
        else:
            rows, inv = torch.unique(idx.cpu(), return_inverse=True)  # (U,), (T, K)
            inv = inv.to(device, non_blocking=True)
            state["dsa_rows"] = (idx, rows, inv)
        n = rows.shape[0]
        buf = _host_rows.take(n * (self.c + self.r), latent_all.dtype, device.type == "cuda")
        lat = torch.index_select(latent_all, 0, rows, out=buf[: n * self.c].view(n, self.c))  # (U, c)
        rot = torch.index_select(k_rot_all, 0, rows, out=buf[n * self.c:].view(n, self.r))  # (U, r)
        self.rows_moved += n
        lat, rot = lat.to(device, non_blocking=True), rot.to(device, non_blocking=True)
        _host_rows.copied()  # the buffer is written again only once these copies are done
        return lat, rot, (inv, valid)

    def attend_causal(self, q_nope, q_rot, latent_all, k_rot_all, start: int, mask=None) -> torch.Tensor:
        """Every key up to each query's position (or `mask` (T, S), the DSA test reference) -> (T, h, v)."""
        t, s = q_nope.shape[0], latent_all.shape[0]
        if t >= EXPANDED_MIN_TOKENS:  # prefill: keys and values per head, (n + r + v) per score instead of (2c + r)
            return self.attend_expanded(q_nope, q_rot, latent_all, k_rot_all, start, mask)
        # decode: W_UK absorbed into the query, which attends over the cached latents directly
        q_lat = self.absorb_q(q_nope)  # (h, T, c)
        if mask is None:
            mask = causal_mask(t, s, start, q_nope.device)  # (T, S)
        bias = rope_bias(q_rot.transpose(0, 1), k_rot_all, mask, self.scale)  # (h, T, S)
        out_lat = latent_attention(q_lat.reshape(1, self.h * t, self.c), latent_all[None],
                                   bias.view(1, self.h * t, s), self.scale)  # (1, h*T, c)
        return self.expand_out(out_lat.view(self.h, t, self.c))  # (T, h, v)

    def attend_expanded(self, q_nope, q_rot, latent_all, k_rot_all, start: int, mask=None) -> torch.Tensor:
        """attend_causal for a long chunk: keys [W_UK latent, k_rot] and values W_UV latent per head, through
        torch's fused attention (no (h, T, S) scores held) -> (T, h, v)."""
        t, s = q_nope.shape[0], latent_all.shape[0]
        h, d = self.h, max(self.nope + self.r, self.v)
        q = _pad(torch.cat([q_nope, q_rot], -1).transpose(0, 1), d)  # (h, T, d)
        k_nope = torch.einsum("sc,hnc->hsn", latent_all, self.w_uk)  # (h, S, n)
        k = _pad(torch.cat([k_nope, k_rot_all.expand(h, s, self.r)], -1), d)  # (h, S, d)
        v = _pad(torch.einsum("sc,hvc->hsv", latent_all, self.w_uv), d)  # (h, S, d)
        # is_causal aligns the diagonal top-left: right only for a whole prompt; a chunk after a cached prefix
        # needs the offset mask
        if mask is None and t != s:
            mask = causal_mask(t, s, start, q.device)  # (T, S)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, is_causal=mask is None,
                                             scale=self.scale)  # (1, h, T, d)
        return out[0, :, :, : self.v].transpose(0, 1)  # (T, h, v)

    def absorb_q(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (T, h, n) -> the queries in latent space (h, T, c). Few tokens (decode) read the blocks; a
        long chunk (DSA prefill) multiplies the float matrix, whose read it amortises, as before."""
        if self.uk_q is not None and q_nope.shape[0] < EXPANDED_MIN_TOKENS:
            return self.uk_q(q_nope.transpose(0, 1))  # (h, T, n) -> (h, T, c)
        return torch.einsum("thn,hnc->htc", q_nope, self.w_uk)

    def expand_out(self, out_lat: torch.Tensor) -> torch.Tensor:
        """out_lat (h, T, c) -> the values per head (T, h, v)."""
        if self.uv_q is not None and out_lat.shape[1] < EXPANDED_MIN_TOKENS:
            return self.uv_q(out_lat).transpose(0, 1)  # (h, T, v) -> (T, h, v)
        return torch.einsum("htc,hvc->thv", out_lat, self.w_uv)

    def attend_selected(self, q_nope, q_rot, latent_all, k_rot_all, idx, valid) -> torch.Tensor:
        """DSA: each query reads only its K selected rows (idx (T, K), valid (T, K) False where a slot holds
        no key), gathered from the latent and rope-key cache, in the absorbed form: per (query, key) it costs
        2c + r, but only K keys, whatever S is -> (T, h, v)."""
        t, k = idx.shape
        q_lat = self.absorb_q(q_nope).transpose(0, 1).contiguous()  # (T, h, c)
        out_lat = torch.empty_like(q_lat)  # (T, h, c)
        # query blocks bound the gathered rows: tq * K * (c + r) values (bf16, K 2048: tq 12, 28 MB)
        row = k * ((self.c + self.r) * latent_all.element_size() + 2 * 4 * self.h)
        tq = min(t, max(1, SELECTED_WORKSPACE_BYTES // row))
        buf = workspace("mla.gathered", tq * k * (self.c + self.r), latent_all.device, latent_all.dtype)
        for q0 in range(0, t, tq):
            i = idx[q0:q0 + tq].reshape(-1)  # (tq * K,)
            n = i.shape[0]
            lat_out, rot_out = buf[: n * self.c].view(n, self.c), buf[n * self.c: n * (self.c + self.r)]
            lat = torch.index_select(latent_all, 0, i, out=lat_out).view(-1, k, self.c)  # (tq, K, c)
            k_rot = torch.index_select(k_rot_all, 0, i, out=rot_out.view(n, self.r))
            k_rot = k_rot.view(-1, k, self.r)  # (tq, K, r)
            bias = rope_bias(q_rot[q0:q0 + tq], k_rot, valid[q0:q0 + tq, None], self.scale)  # (tq, h, K)
            out_lat[q0:q0 + tq] = latent_attention(q_lat[q0:q0 + tq], lat, bias, self.scale)  # (tq, h, c)
        return self.expand_out(out_lat.transpose(0, 1))  # (T, h, v)


def mla_attention_reference(q_nope, q_rot, latent, k_rot, w_uk, w_uv, start: int, scale: float,
                            mask=None) -> torch.Tensor:
    """MLA by its definition, the plain reference of attend_causal / attend_selected: keys [W_UK latent, k_rot]
    and values W_UV latent expanded per head, explicit scores and softmax (base.causal_attention).
    q_nope (T, h, n), q_rot (T, h, r), latent (S, c), k_rot (S, r), w_uk (h, n, c), w_uv (h, v, c),
    mask (T, S) or None (causal from start) -> (T, h, v)."""
    h, s = w_uk.shape[0], latent.shape[0]
    q = torch.cat([q_nope, q_rot], -1).transpose(0, 1)  # (h, T, n + r)
    k = torch.cat([torch.einsum("sc,hnc->hsn", latent, w_uk), k_rot.expand(h, s, -1)], -1)  # (h, S, n + r)
    v = torch.einsum("sc,hvc->hsv", latent, w_uv)  # (h, S, v)
    return causal_attention(q, k, v, start, scale, mask).transpose(0, 1)  # (T, h, v)


def rope_bias(q_rot: torch.Tensor, k_rot: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """The rope half of the absorbed scores, scaled, the float minimum where `keep` is False (as the reference's
    masked_fill, so a row with no key averages rather than NaNs): q_rot (B, M, r) with k_rot (B, S, r), or
    q_rot (..., r) with one k_rot (S, r) for all; keep broadcast to the result (B, M, S) / (..., S)."""
    if k_rot.dim() == 2:  # one (rows, r) x (r, S) product: matmul of a batch with a matrix would copy k_rot per batch
        bias = (q_rot.reshape(-1, q_rot.shape[-1]) @ k_rot.T).view(*q_rot.shape[:-1], -1)
    else:
        bias = torch.bmm(q_rot, k_rot.transpose(1, 2))  # (B, M, S)
    return (bias * scale).masked_fill_(~keep, torch.finfo(bias.dtype).min)


def fused_latent(q: torch.Tensor) -> bool:
    """Whether latent_attention goes through torch's fused attention. Not for bf16 / fp16 on the CPU: there
    oneDNN's half-precision GEMMs (AVX512-BF16 / AMX) run the explicit form 1.35-1.7x faster than torch's CPU
    flash kernel; in float32 SDPA is 1.0-1.5x faster (`offload bench mla-attention --forms`,
    docs/benchmarks.md)."""
    return q.device.type != "cpu" or q.dtype == torch.float32


def latent_attention(q_lat: torch.Tensor, latent: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q_lat latent^T + bias) latent: q_lat (B, M, c), latent (B, S, c), bias (B, M, S) (rope_bias)
    -> (B, M, c). Fused: the latent is one KV head read once as both keys and values, and the M rows (heads x
    tokens) are that head's queries (FlashMLA's layout): SDPA's GQA form (h heads over one KV head) ran slower on
    the CPU in every shape tried, and a [latent, k_rot] key would copy the cache every step to concatenate."""
    if fused_latent(q_lat):
        return F.scaled_dot_product_attention(q_lat[:, None], latent[:, None], latent[:, None],
                                              attn_mask=bias[:, None], scale=scale)[:, 0]  # (B, M, c)
    scores = torch.baddbmm(bias, q_lat, latent.transpose(1, 2), alpha=scale)  # (B, M, S)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_lat.dtype)
    return torch.bmm(probs, latent)  # (B, M, c)


def _pad(x: torch.Tensor, d: int) -> torch.Tensor:
    """Zeros appended to the last dim up to d: torch's flash attention (CPU and CUDA) wants one head dim for
    q, k and v; zero columns change no score, and the output's extra columns are dropped."""
    return F.pad(x, (0, d - x.shape[-1])) if x.shape[-1] < d else x


class _HostRows:
    """Two kept host buffers for gathered latent rows (page-locked when a GPU reads them), alternated, grown on
    demand: a layer gathers into one while the previous layer's rows may still be on their way to the GPU from
    the other; before a buffer is written again its last copies out are waited for (an event)."""

    def __init__(self):
        self.slots: dict = {}  # (dtype, pin) -> two [buffer, event or None]
        self.turn = 0
        self.taken: list | None = None  # the slot take() handed out last

    def take(self, n: int, dtype, pin: bool) -> torch.Tensor:
        self.turn ^= 1
        slot = self.slots.setdefault((dtype, pin), [[None, None], [None, None]])[self.turn]
        if slot[1] is not None:
            slot[1].synchronize()
            slot[1] = None
        if slot[0] is None or slot[0].numel() < n:
            with torch.inference_mode(False):  # writable outside inference_mode too (see workspace)
                slot[0] = torch.empty(n, dtype=dtype, pin_memory=pin)
        self.taken = slot
        return slot[0][:n]

    def copied(self) -> None:
        """The copies out of the buffer take() handed out are enqueued (on a GPU: an event after them)."""
        if self.taken[0].is_pinned():
            self.taken[1] = torch.cuda.Event()
            self.taken[1].record()


_host_rows = _HostRows()


def load_mla(ctx: LoadContext, prefix: str, a, rope: Rope, scale: float, selector=None,
             index_dim: int = 0) -> MLAAttention:
    h, hid, n, r, v, c = (a.num_attention_heads, a.hidden_size, a.qk_nope_head_dim, a.qk_rope_head_dim,
                          a.v_head_dim, a.kv_lora_rank)
    g, lin = ctx.get, ctx.linear
    lora = a.q_lora_rank

    def b(name):
        return f"{prefix}.{name}.bias" if a.attention_bias else None

    return MLAAttention(
        q_a=lin(f"{prefix}.q_a_proj.weight", (lora, hid), b("q_a_proj")) if lora else None,
        q_a_norm=g(f"{prefix}.q_a_layernorm.weight", (lora,)) if lora else None,
        q_b=lin(f"{prefix}.q_b_proj.weight", (h * (n + r), lora)) if lora else None,
        q_proj=None if lora else lin(f"{prefix}.q_proj.weight", (h * (n + r), hid)),
        kv_a=lin(f"{prefix}.kv_a_proj_with_mqa.weight", (c + r, hid), b("kv_a_proj_with_mqa")),
        kv_a_norm=g(f"{prefix}.kv_a_layernorm.weight", (c,)),
        kv_b=g(f"{prefix}.kv_b_proj.weight", (h * (n + v), c)),
        wo=lin(f"{prefix}.o_proj.weight", (hid, h * v), b("o_proj")),
        n_heads=h, nope=n, rope_dim=r, v_dim=v, kv_lora=c, rope=rope, scale=scale, eps=1e-6,
        device=ctx.device, dtype=ctx.dtype, selector=selector, index_dim=index_dim,
        heads=ctx.heads(f"{prefix}.kv_b_proj.weight"),
        # only DSA attention reads a few rows a step: other MLA keeps its KV with the layer whatever the plan says
        kv_device=ctx.kv_device() if selector is not None else None)
