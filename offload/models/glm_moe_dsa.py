"""GLM-5 / 5.1 / 5.2: DeepSeek-V3-style MLA + MoE with DeepSeek Sparse Attention (DSA).

A lightning indexer scores every cached token for each query and keeps the `index_topk` best; attention
then reads only those. IndexShare: "shared" layers hold no indexer and reuse the top-k of the last
"full" layer in the same forward. RoPE is interleaved in both attention and indexer.

T new tokens, S cached + new tokens, H hidden, i indexer heads, D indexer head dim, r rope dim.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offload.cache import MLACache
from offload.errors import ConfigError
from offload.models import deepseek_v3
from offload.models.base import Rope, build_rope, causal_mask, yarn_softmax_scale
from offload.models.decoder import Decoder
from offload.models.loading import LoadContext, finish_decoder, load_layer, load_noaux_moe
from offload.models.mla import load_mla
from offload.models.workspace import workspace
from offload.models.weights import Linear


@dataclass(frozen=True)
class ModelArgs(deepseek_v3.ModelArgs):
    index_n_heads: int = 32
    index_head_dim: int = 128
    index_topk: int = 2048
    indexer_types: tuple[str, ...] = ()
    mlp_layer_types: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, c: dict) -> "ModelArgs":
        where = "config.json (glm_moe_dsa)"
        c = dict(c)
        if c.get("n_routed_experts") is None and c.get("num_experts") is not None:
            c["n_routed_experts"] = c["num_experts"]
        base = deepseek_v3.ModelArgs.from_config(c, where)
        n = base.num_hidden_layers
        types = c.get("indexer_types")
        if types is None:
            pattern = c.get("index_topk_pattern")
            if pattern is not None:
                types = [{"F": "full", "S": "shared"}.get(ch, ch) for ch in pattern]
            else:  # the freq/offset schedule, as transformers derives it
                freq = max(c.get("index_topk_freq", 1), 1)
                offset = c.get("index_skip_topk_offset", 2)
                types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
        types = tuple(types)
        if len(types) != n or any(t not in ("full", "shared") for t in types):
            raise ConfigError(f"{where}: indexer_types must list 'full'/'shared' for each of {n} layers")
        if types and types[0] != "full":
            raise ConfigError(f"{where}: layer 0 must be a 'full' indexer layer (shared layers reuse an earlier one)")
        mlp_types = c.get("mlp_layer_types")
        if mlp_types is None:
            k = min(base.first_k_dense_replace, n)
            mlp_types = ["dense"] * k + ["sparse"] * (n - k)
        if len(mlp_types) != n:
            raise ConfigError(f"{where}: mlp_layer_types must have {n} entries")
        fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
        fields["rope_interleave"] = True
        return cls(**fields, index_n_heads=c.get("index_n_heads", 32), index_head_dim=c.get("index_head_dim", 128),
                   index_topk=c.get("index_topk", 2048), indexer_types=types, mlp_layer_types=tuple(mlp_types))


# Bound on one chunk of indexer scores, (T, i, C) float32: a 512-token chunk with 32 heads scores 2048 keys
# at a time (the running top-k then sorts at most 2 * index_topk per row); decode scores up to
# INDEX_MAX_CHUNK keys at a time (small temporaries: a fresh 32 MB one costs its page faults every token).
INDEX_SCORE_BYTES = 128 << 20
INDEX_MAX_CHUNK = 16384


class Indexer:
    """DSA lightning indexer: relu(q_i . k) weighted per head, summed, top-k per query."""

    def __init__(self, wq_b, wk, k_norm_w, k_norm_b, weights_proj, n_heads, head_dim, topk, rope: Rope):
        self.wq_b, self.wk, self.k_norm_w, self.k_norm_b = wq_b, wk, k_norm_w, k_norm_b  # wq_b, wk: weights
        self.weights_proj = weights_proj  # (i, H) float32 weight, as transformers keeps it
        self.n_heads, self.head_dim, self.topk, self.rope = n_heads, head_dim, topk, rope

    def queries_and_keys(self, x, q_resid, start: int, cache: MLACache, state: dict):
        """-> q (T, i, D) float32, head weights (T, i) float32, all cached keys (S, D)."""
        t = x.shape[0]
        r = self.rope.inv_freq.shape[0] * 2
        q = self.wq_b(q_resid).view(t, self.n_heads, self.head_dim)  # (T, i, D)
        k = F.layer_norm(self.wk(x), (self.head_dim,), self.k_norm_w, self.k_norm_b, 1e-6)  # (T, D)
        cos, sin = self.rope.cos_sin_at(start, t, x.device, x.dtype, state)
        q = torch.cat([self.rope.apply(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        k = torch.cat([self.rope.apply(k[:, None, :r], cos, sin)[:, 0], k[:, r:]], dim=-1)
        # The key cache holds the keys in the model's dtype (bf16 for GLM-5), as transformers' indexer cache
        # does (it concatenates k_norm's output); the scores are float32 from those values, as there.
        # DeepSeek's reference kernels keep FP8 keys with block scales: a GPU kernel's choice; it moves picks.
        k_all = cache.update_index(k, start)  # (S, D)
        weights = self.weights_proj(x.float()) * self.n_heads ** -0.5  # (T, i) float32
        return q.float(), weights, k_all

    def static(self, x: torch.Tensor, q_resid: torch.Tensor, pos: torch.Tensor, cache: MLACache, state: dict):
        """The decode step's static form, pos (1,) a device tensor: the key written at pos, the top
        min(index_topk, capacity) over the whole key cache with future keys invalid -> (indices, valid), always
        (while S <= index_topk it holds every causal key: the same attention as no selection)."""
        t, r = x.shape[0], self.rope.inv_freq.shape[0] * 2
        q = self.wq_b(q_resid).view(t, self.n_heads, self.head_dim)  # (1, i, D)
        k = F.layer_norm(self.wk(x), (self.head_dim,), self.k_norm_w, self.k_norm_b, 1e-6)  # (1, D)
        cos, sin = self.rope.cos_sin_of(pos, x.dtype, state)
        q = torch.cat([self.rope.apply(q[..., :r], cos, sin), q[..., r:]], dim=-1)
        k = torch.cat([self.rope.apply(k[:, None, :r], cos, sin)[:, 0], k[:, r:]], dim=-1)
        cache.index_k.index_copy_(0, pos, k)  # (C, D)
        weights = self.weights_proj(x.float()) * self.n_heads ** -0.5  # (1, i) float32
        sel = top_keys(q.float(), weights, cache.index_k, 0, self.topk, self.head_dim ** -0.5, positions=pos)
        state["dsa_selection"] = sel
        return sel

    def __call__(self, x: torch.Tensor, q_resid: torch.Tensor, start: int, cache: MLACache, state: dict):
        """-> None when all causal keys fit in index_topk (plain causal attention), else (indices, valid)."""
        q, weights, k_all = self.queries_and_keys(x, q_resid, start, cache, state)
        sel = None
        if k_all.shape[0] > self.topk:
            sel = top_keys(q, weights, k_all, start, self.topk, self.head_dim ** -0.5)
        state["dsa_selection"] = sel
        return sel


def index_chunk(t: int, n_heads: int, k: int) -> int:
    """Keys scored at a time for `t` queries (see INDEX_SCORE_BYTES)."""
    return max(k, min(INDEX_MAX_CHUNK, INDEX_SCORE_BYTES // (4 * t * n_heads)))


def top_keys(q, weights, k_all, start: int, topk: int, scale: float, chunk: int | None = None,
             positions: torch.Tensor | None = None):
    """The `topk` best keys of each query, scored a chunk of keys at a time with a running top-k, so the
    scores take O(T * chunk) memory, not O(T * i * S). q (T, i, D) float32, weights (T, i), k_all (S, D) ->
    indices (T, K) int64 and valid (T, K) bool, K = min(topk, S); a slot is invalid when it holds a future key
    (a query with fewer than K keys before it). Exact ties may pick a different one of the tied keys than one
    full top-k. positions (T,): the queries' positions as a device tensor instead of start.. (the static
    decode step: every chunk masked, no Python comparison with a position)."""
    t, n_heads, d = q.shape
    s = k_all.shape[0]
    k = min(topk, s)
    chunk = min(s, chunk or index_chunk(t, n_heads, k))
    # kept buffers for the float32 keys and the scores of one chunk (fresh ones fault their pages in each time)
    k_buf = workspace("dsa.keys", chunk * d, q.device, torch.float32)
    s_buf = workspace("dsa.scores", t * n_heads * chunk, q.device, torch.float32)
    if positions is None:
        pos = torch.arange(start, start + t, device=q.device)[:, None]  # (T, 1) absolute query positions
    else:
        pos = positions[:, None]  # (T, 1)
    w = weights.unsqueeze(1)  # (T, 1, i)
    best_v = best_i = None
    for c0 in range(0, s, chunk):
        c1 = min(s, c0 + chunk)
        n = c1 - c0
        keys = k_buf[: n * d].view(n, d).copy_(k_all[c0:c1])  # (C, D) float32, exactly the cached values
        scores = torch.matmul(q, keys.T, out=s_buf[: t * n_heads * n].view(t, n_heads, n))  # (T, i, C)
        scores = scores.mul_(scale).relu_()
        v = torch.matmul(w, scores).squeeze(1)  # (T, C)
        ids = torch.arange(c0, c1, device=q.device).expand(t, -1)  # (T, C)
        if positions is not None or c1 - 1 > start:  # keys after the first query: hide each query's future
            v = v.masked_fill(ids > pos, float("-inf"))
        if best_v is not None:
            v, ids = torch.cat([best_v, v], dim=1), torch.cat([best_i, ids], dim=1)  # (T, K + C)
        best_v, j = v.topk(min(k, v.shape[1]), dim=-1)  # (T, K)
        best_i = ids.gather(1, j)
    return best_i, best_v > float("-inf")


def selection_mask(sel, t: int, s: int, start: int, device) -> torch.Tensor:
    """The (T, S) bool mask of a selection (None: causal), for the mask-path test reference."""
    mask = causal_mask(t, s, start, device)
    if sel is None:
        return mask
    idx, valid = sel
    picked = torch.zeros(t, s, dtype=torch.bool, device=device).scatter_(1, idx, valid)
    return mask & picked


def reuse_selection(x, q_resid, start, cache, state):
    """IndexShare: a shared layer reads the keys the last full layer selected in this forward (which may have
    lived on another device)."""
    sel = state["dsa_selection"]
    return None if sel is None else (sel[0].to(x.device), sel[1].to(x.device))


def build(ctx: LoadContext, a: ModelArgs) -> Decoder:
    rope = build_rope(a.rope, a.qk_rope_head_dim, a.max_position_embeddings, True, "glm_moe_dsa")
    scale = yarn_softmax_scale(a.rope, (a.qk_nope_head_dim + a.qk_rope_head_dim) ** -0.5)
    layers = []
    for i in range(a.num_hidden_layers):
        p, lc = f"model.layers.{i}", ctx.layer(i)
        if a.indexer_types[i] == "full":
            ip, d = f"{p}.self_attn.indexer", a.index_head_dim
            selector = Indexer(
                lc.linear(f"{ip}.wq_b.weight", (a.index_n_heads * d, a.q_lora_rank)),
                lc.linear(f"{ip}.wk.weight", (d, a.hidden_size)),
                lc.get(f"{ip}.k_norm.weight", (d,)), lc.get(f"{ip}.k_norm.bias", (d,)),
                Linear(lc.get(f"{ip}.weights_proj.weight", (a.index_n_heads, a.hidden_size), dtype=torch.float32)),
                a.index_n_heads, d, a.index_topk, rope)
            attn = load_mla(lc, f"{p}.self_attn", a, rope, scale, selector, index_dim=d)
        else:
            attn = load_mla(lc, f"{p}.self_attn", a, rope, scale, reuse_selection)
        if a.mlp_layer_types[i] == "sparse":
            mlp = load_noaux_moe(lc, f"{p}.mlp", i, a)
        else:
            mlp = lc.mlp(f"{p}.mlp", a.hidden_size, a.intermediate_size)
        layers.append(load_layer(lc, p, a.hidden_size, attn, mlp))
    return finish_decoder(ctx, a, layers)
