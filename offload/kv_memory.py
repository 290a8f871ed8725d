"""Memory a context needs, known before it is allocated: each device's KV cache (MLA latent + rope key, the
DSA indexer keys, GQA K/V) and the largest attention workspace of a prefill chunk, checked against what the
device has free, so a context that does not fit stops with the numbers instead of failing mid-prompt.

S context length, T prefill chunk, h heads.
"""

import torch

from offload.cache import MLACache
from offload.errors import PlacementError
from offload.generation import PREFILL_CHUNK
from offload.models import glm_moe_dsa, mla
from offload.models.gqa import GQAAttention

GB = 1e9


def _item(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def cache_bytes(attn, s: int) -> int:
    """Bytes of one layer's cache for `s` positions (as offload.cache allocates it)."""
    if isinstance(attn, mla.MLAAttention):
        return s * (attn.c + attn.r + attn.index_dim) * _item(attn.dtype)
    if isinstance(attn, GQAAttention):
        return 2 * s * attn.n_kv_heads * attn.head_dim * _item(attn.dtype)
    raise TypeError(f"no cache size known for {type(attn).__name__}")


def workspace_bytes(attn, s: int, indexer=None, t: int = PREFILL_CHUNK) -> int:
    """Peak temporary bytes of one layer's attention for a chunk of `t` tokens with `s` positions cached
    (indexer: the model's DSA Indexer, None without DSA)."""
    t = min(t, s)
    if isinstance(attn, mla.MLAAttention):
        item = _item(attn.dtype)
        dense_s = s if indexer is None else min(s, indexer.topk)  # DSA: causal only while S <= index_topk
        # scores, masked scores, float32 probabilities (h, T, S) and the expanded keys / values (h, S, n + v)
        dense = 3 * attn.h * t * dense_s * 4 + attn.h * dense_s * (attn.nope + attn.v) * item
        if indexer is None or s <= indexer.topk:
            return dense
        k, i = indexer.topk, indexer.n_heads
        chunk = min(s, glm_moe_dsa.index_chunk(t, i, k))
        index = 2 * t * i * chunk * 4 + 3 * t * (k + chunk) * 8  # (T, i, C) scores, running top-k, ids
        row = k * ((attn.c + attn.r) * item + 2 * 4 * attn.h)  # mla.attend_selected's gathered rows per query
        gathered = min(t, max(1, mla.SELECTED_WORKSPACE_BYTES // row)) * row + 2 * t * attn.h * attn.c * 4
        return max(dense, index + gathered)
    if isinstance(attn, GQAAttention):
        return 2 * attn.n_heads * t * s * 4  # fused attention keeps less; this is a ceiling
    raise TypeError(f"no workspace size known for {type(attn).__name__}")


def context_bytes(model, s: int) -> dict[str, tuple[int, int]]:
    """device -> (cache bytes, prefill workspace bytes) for a context of `s` tokens."""
    indexer = next((layer.attn.selector for layer in model.layers
                    if isinstance(getattr(layer.attn, "selector", None), glm_moe_dsa.Indexer)), None)
    need: dict[str, list[int]] = {}
    for layer in model.layers:
        attn = layer.attn
        dev = str(torch.device(attn.device))
        kv, ws = need.setdefault(dev, [0, 0])
        need[dev] = [kv + cache_bytes(attn, s), max(ws, workspace_bytes(attn, s, indexer))]
        home = getattr(attn, "kv_device", attn.device)
        if str(torch.device(home)) != dev:  # a DSA latent cache in RAM: only the indexer keys stay on `dev`
            latent = s * (attn.c + attn.r) * _item(attn.dtype)
            need[dev][0] -= latent
            need.setdefault(str(torch.device(home)), [0, 0])[0] += latent
    return {dev: (kv, ws) for dev, (kv, ws) in need.items()}


def free_bytes(device: str) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    import psutil

    return psutil.virtual_memory().available


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def check_context_fits(model, s: int) -> None:
    """Raise PlacementError naming the numbers when a context of `s` tokens does not fit in what is free now
    (call it before allocating the cache; an allocated cache already counts as used)."""
    # caches that grow with the sequence (offload.cache) copy what they hold into the bigger tensors: the last
    # regrowth holds both, up to twice the cache
    copies = 2 if hasattr(MLACache, "reserve") else 1
    for dev, (kv, ws) in context_bytes(model, s).items():
        have = free_bytes(dev)
        if copies * kv + ws > have:
            fits = max(0, int((have - ws) * s // (copies * kv))) if kv else 0
            grow = f" + {_size(kv)} while it regrows" if copies > 1 else ""
            need = copies * kv + ws
            raise PlacementError(
                f"a context of {s} tokens needs {_size(need)} on {dev} (KV cache {_size(kv)}{grow}, "
                f"prefill workspace {_size(ws)}) but {_size(have)} is free there; "
                f"about {fits} tokens fit (ctx=)")
