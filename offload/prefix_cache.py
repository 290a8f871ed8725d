"""Prefix cache: a prompt that begins with tokens already computed starts its prefill at the first new one.

Coding agents resend the whole conversation (system prompt, tools, history) every turn, so most of each prompt
was computed the turn before. Two places hold computed prefixes:
- the live cache: the last sequence, reused in place with no copy (the next turn of the same conversation);
- a store of snapshots of earlier sequences, within a memory budget, least recently used evicted first (other
  users, other conversations, a shared system prompt). The live sequence is saved there when a request for a
  different conversation is about to overwrite it.
The last prompt token is always computed (its logits start the generation). Positions restored from a snapshot
hold the same values as the cold run's, so logits after a hit equal a cold run's up to float rounding
(the later positions' attention sums in another order).

On a model: `enable(llm, mem_bytes)` sets `llm.model.prefix_cache`, which offload.generation uses."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from offload.cache import Cache

# Save the live sequence only when a new prompt shares less than this part of it: a prompt that continues
# it (the next turn, whose re-rendered reply differs from the generated one in a few tokens) needs no copy.
SAVE_BELOW = 0.5
MIN_TOKENS = 16  # shorter sequences are not worth a snapshot


def common_prefix(a, b) -> int:
    """Length of the common prefix of two token sequences."""
    m = min(len(a), len(b))
    if m == 0:
        return 0
    x, y = np.asarray(a[:m], dtype=np.int64), np.asarray(b[:m], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else m


@dataclass
class Entry:
    tokens: np.ndarray  # (n,) int64
    snap: list  # Cache.snapshot(n)
    nbytes: int


class PrefixCache:
    """The store and the policy; thread-safe (generation runs in a worker thread, /metrics reads)."""

    def __init__(self, mem_bytes: int, device: str | torch.device = "cpu"):
        self.budget, self.device = int(mem_bytes), device
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self._next = 0
        self._lock = threading.RLock()
        self.hits = self.misses = self.tokens_reused = self.evictions = 0

    @property
    def stored_bytes(self) -> int:
        with self._lock:  # /metrics reads it while a generation may be saving
            return sum(e.nbytes for e in self.entries.values())

    def prepare(self, cache: Cache, ids: list[int]) -> int:
        """Make `cache` hold the longest known prefix of `ids` (at most len(ids) - 1 tokens) and position it
        there; returns the number of prompt tokens that need no prefill."""
        limit = len(ids) - 1
        with self._lock:
            live = common_prefix(cache.tokens, ids)
            best_key, best = None, live
            for key, e in self.entries.items():
                n = common_prefix(e.tokens, ids)
                if n > best:
                    best_key, best = key, n
            n = min(best, limit)
            entry = self.entries.get(best_key) if n > min(live, limit) else None
            if entry is not None:
                self.entries.move_to_end(best_key)
            kept = min(live, n)  # live positions that keep their tokens, whichever source wins
            if len(cache.tokens) >= MIN_TOKENS and kept < SAVE_BELOW * len(cache.tokens):
                self._save(cache)  # another conversation: keep this one before it is overwritten
            if entry is not None:
                cache.restore(entry.snap, entry.tokens[:n].tolist())
            else:
                cache.resume(n)
            if n > 0:
                self.hits += 1
                self.tokens_reused += n
            else:
                self.misses += 1
            return n

    def _save(self, cache: Cache) -> None:
        tokens = np.asarray(cache.tokens, dtype=np.int64)
        for key, e in list(self.entries.items()):
            if common_prefix(e.tokens, tokens) == len(tokens):
                self.entries.move_to_end(key)  # already stored (as this or a longer sequence)
                return
        per_token = max(1, cache.position_bytes())
        n = min(len(tokens), self.budget // per_token)  # a prefix that fits: the system prompt matters most
        if n < MIN_TOKENS:
            return
        need = n * per_token
        while self.entries and self.stored_bytes + need > self.budget:
            self.entries.popitem(last=False)
            self.evictions += 1
        for key, e in list(self.entries.items()):  # subsumed by the new one
            if len(e.tokens) <= n and common_prefix(e.tokens, tokens) == len(e.tokens):
                del self.entries[key]
        self.entries[self._next] = Entry(tokens[:n].copy(), cache.snapshot(n, self.device), need)
        self._next += 1

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()


def enable(llm, mem_bytes: int) -> PrefixCache:
    """Turn the prefix cache on for `llm` (an offload.LLM) with a snapshot budget of mem_bytes (0: only the
    live sequence is reused). Returns the store, whose counters /metrics shows."""
    store = PrefixCache(mem_bytes)
    llm.model.prefix_cache = store
    return store
