"""Per-sequence caches, preallocated for the requested context length.

GQA layers cache K and V per KV head; MLA layers cache the compressed latent and the rope key (never
the expanded K/V); DSA full layers also cache the indexer key. S = context length.
"""

import torch

from offload.errors import RequestError


class GQACache:
    # head-major, so attention reads each KV head's keys as one contiguous (S, d) matrix
    def __init__(self, max_len: int, n_kv_heads: int, head_dim: int, device, dtype):
        self.k = torch.zeros(n_kv_heads, max_len, head_dim, device=device, dtype=dtype)  # (kv, S, d)
        self.v = torch.zeros(n_kv_heads, max_len, head_dim, device=device, dtype=dtype)  # (kv, S, d)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (T, kv, d) written at start..start+T; returns all cached (kv, S, d) so far."""
        end = start + k.shape[0]
        self.k[:, start:end] = k.transpose(0, 1)
        self.v[:, start:end] = v.transpose(0, 1)
        return self.k[:, :end], self.v[:, :end]


class MLACache:
    def __init__(self, max_len: int, kv_lora_rank: int, rope_dim: int, device, dtype, index_dim: int = 0):
        self.latent = torch.zeros(max_len, kv_lora_rank, device=device, dtype=dtype)  # (S, kv_lora)
        self.k_rope = torch.zeros(max_len, rope_dim, device=device, dtype=dtype)  # (S, rope)
        # DSA lightning-indexer keys, on layers that run their own indexer only.
        self.index_k = torch.zeros(max_len, index_dim, device=device, dtype=dtype) if index_dim else None

    def update(self, latent: torch.Tensor, k_rope: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + latent.shape[0]
        self.latent[start:end] = latent
        self.k_rope[start:end] = k_rope
        return self.latent[:end], self.k_rope[:end]

    def update_index(self, k: torch.Tensor, start: int) -> torch.Tensor:
        end = start + k.shape[0]
        self.index_k[start:end] = k
        return self.index_k[:end]


class Cache:
    """One sequence's cache: a per-layer store plus the number of positions filled."""

    def __init__(self, layers: list, max_len: int):
        self.layers = layers
        self.max_len = max_len
        self.length = 0

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.max_len:
            raise RequestError(f"sequence of {self.length + n_new} tokens exceeds the context length "
                               f"{self.max_len} (load with a larger ctx=)")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in vars(layer).values()
                   if isinstance(t, torch.Tensor))
