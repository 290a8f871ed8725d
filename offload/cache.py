"""Per-sequence caches that grow with the sequence, up to the context length.

GQA layers cache K and V per KV head; MLA layers cache the compressed latent and the rope key (never
the expanded K/V); DSA full layers also cache the indexer key. Each layer's tensors are allocated for
`capacity` positions, a multiple of BLOCK, and regrown (copied) when a write passes it: by a quarter of
what they hold at least, so a long sequence copies its cache a bounded number of times (about 4 S in all)
while a short one holds one block. S = positions held.
"""

import torch

from offload.errors import RequestError

BLOCK = 256  # positions: the unit caches grow by


def capacity_for(n: int, have: int, max_len: int) -> int:
    """Positions to hold so that n fit: whole blocks, at least a quarter more than `have`, at most max_len."""
    want = max(n, have + have // 4)
    return min(max_len, -(-want // BLOCK) * BLOCK)


class Growing:
    """A layer cache whose per-position tensors (every tensor attribute, indexed on POS_AXIS) grow on demand."""
    POS_AXIS = 0

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.capacity = min(max_len, BLOCK)

    def alloc(self, *shape, device, dtype, pin: bool = False) -> torch.Tensor:
        """A tensor of `capacity` positions (the position axis given as None in shape); pin: in page-locked host
        memory (a KV cache in RAM that a GPU reads rows of)."""
        return torch.zeros(*[self.capacity if d is None else d for d in shape], device=device, dtype=dtype,
                           pin_memory=pin)

    def reserve(self, n: int) -> None:
        """Hold at least n positions (the filled ones copied over)."""
        if n <= self.capacity:
            return
        if n > self.max_len:
            raise RequestError(f"a cache of {self.max_len} positions cannot hold {n}")
        cap, axis = capacity_for(n, self.capacity, self.max_len), self.POS_AXIS
        for name, t in list(vars(self).items()):
            if isinstance(t, torch.Tensor):
                shape = list(t.shape)
                shape[axis] = cap
                grown = torch.zeros(shape, dtype=t.dtype, device=t.device, pin_memory=_pinned(t))
                grown.narrow(axis, 0, self.capacity).copy_(t)
                setattr(self, name, grown)
        self.capacity = cap


class GQACache(Growing):
    # head-major, so attention reads each KV head's keys as one contiguous (S, d) matrix
    POS_AXIS = 1  # the position axis of every tensor here (prefix snapshots copy along it)
    def __init__(self, max_len: int, n_kv_heads: int, head_dim: int, device, dtype):
        super().__init__(max_len)
        self.k = self.alloc(n_kv_heads, None, head_dim, device=device, dtype=dtype)  # (kv, S, d)
        self.v = self.alloc(n_kv_heads, None, head_dim, device=device, dtype=dtype)  # (kv, S, d)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (T, kv, d) written at start..start+T; returns all cached (kv, S, d) so far."""
        end = start + k.shape[0]
        self.reserve(end)
        self.k[:, start:end] = k.transpose(0, 1)
        self.v[:, start:end] = v.transpose(0, 1)
        return self.k[:, :end], self.v[:, :end]


def _pinned(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and torch.cuda.is_available() and t.is_pinned()


class MLACache(Growing):
    POS_AXIS = 0
    def __init__(self, max_len: int, kv_lora_rank: int, rope_dim: int, device, dtype, index_dim: int = 0,
                 kv_device=None):
        # kv_device: where the latent + rope key live when not with the layer (DSA: in RAM, pinned when a GPU
        # reads their selected rows); the indexer keys stay on `device`
        super().__init__(max_len)
        kv_device = torch.device(device if kv_device is None else kv_device)
        pin = kv_device.type == "cpu" and torch.device(device).type == "cuda"
        self.latent = self.alloc(None, kv_lora_rank, device=kv_device, dtype=dtype, pin=pin)  # (S, kv_lora)
        self.k_rope = self.alloc(None, rope_dim, device=kv_device, dtype=dtype, pin=pin)  # (S, rope)
        # DSA lightning-indexer keys, on layers that run their own indexer only.
        self.index_k = self.alloc(None, index_dim, device=device, dtype=dtype) if index_dim else None

    def update(self, latent: torch.Tensor, k_rope: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + latent.shape[0]
        self.reserve(end)
        self.latent[start:end] = latent
        self.k_rope[start:end] = k_rope
        return self.latent[:end], self.k_rope[:end]

    def update_index(self, k: torch.Tensor, start: int) -> torch.Tensor:
        end = start + k.shape[0]
        self.reserve(end)
        self.index_k[start:end] = k
        return self.index_k[:end]


def _position_tensors(layer) -> dict[str, torch.Tensor]:
    """Every tensor of a layer's cache (K/V, latent, rope key, indexer key, ...): each must hold one entry per
    position along POS_AXIS, or a prefix snapshot would silently miss it."""
    axis = layer.POS_AXIS
    out = {name: t for name, t in vars(layer).items() if isinstance(t, torch.Tensor)}
    for name, t in out.items():
        if t.dim() <= axis or t.shape[axis] != layer.capacity:
            raise NotImplementedError(f"{type(layer).__name__}.{name} {tuple(t.shape)} is not indexed by position "
                                      f"on axis {axis}: teach Cache.snapshot / restore about it")
    return out


class Cache:
    """One sequence's cache: a per-layer store plus the number of positions filled.

    tokens: the ids whose keys the first len(tokens) positions hold (kept by offload.generation), so a
    prompt that begins with them can resume there (offload.prefix_cache)."""

    def __init__(self, layers: list, max_len: int):
        self.layers = layers
        self.max_len = max_len
        self.length = 0
        self.tokens: list[int] = []

    def resume(self, n: int) -> None:
        """Continue after the first n cached positions (n <= len(tokens)): the next forward writes at n."""
        if n > len(self.tokens):
            raise ValueError(f"resume({n}): the cache holds {len(self.tokens)} known tokens")
        del self.tokens[n:]
        self.length = n

    def snapshot(self, n: int, device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
        """Copies of the first n positions of every layer's tensors."""
        out = []
        for layer in self.layers:
            axis = layer.POS_AXIS
            out.append({name: t.narrow(axis, 0, n).to(device, copy=True)
                        for name, t in _position_tensors(layer).items()})
        return out

    def restore(self, snap: list[dict[str, torch.Tensor]], tokens: list[int]) -> None:
        """Write a snapshot's first len(tokens) positions back; the cache then holds exactly `tokens`."""
        n = len(tokens)
        for layer, saved in zip(self.layers, snap):
            layer.reserve(n)
            axis = layer.POS_AXIS
            for name, t in saved.items():
                getattr(layer, name).narrow(axis, 0, n).copy_(t.narrow(axis, 0, n))
        self.tokens = list(tokens)
        self.length = n

    def check_room(self, n_new: int) -> None:
        """Called by the runtime before every forward, which overwrites positions from `length` on."""
        del self.tokens[self.length:]
        if self.length + n_new > self.max_len:
            raise RequestError(f"sequence of {self.length + n_new} tokens exceeds the context length "
                               f"{self.max_len} (load with a larger ctx=)")

    def nbytes(self) -> int:
        """Bytes allocated now (the cache grows with the sequence)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in vars(layer).values()
                   if isinstance(t, torch.Tensor))

    def position_bytes(self) -> int:
        """Bytes one position takes over all layers."""
        return sum(t.numel() * t.element_size() // t.shape[layer.POS_AXIS] for layer in self.layers
                   for t in vars(layer).values() if isinstance(t, torch.Tensor))

    def shrink(self) -> None:
        """Give back the blocks past the filled positions (an idle sequence keeps only what it holds)."""
        for layer in self.layers:
            cap = capacity_for(max(self.length, 1), 0, self.max_len)
            if cap < layer.capacity:
                for name, t in list(vars(layer).items()):
                    if isinstance(t, torch.Tensor):
                        kept = t.narrow(layer.POS_AXIS, 0, cap)
                        setattr(layer, name, kept.pin_memory() if _pinned(t) else kept.clone())
                layer.capacity = cap
