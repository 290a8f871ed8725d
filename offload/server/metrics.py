"""Prometheus text-format metrics (exposition format 0.0.4), kept by hand: a few counters, gauges and
two histograms do not need a client library."""

from __future__ import annotations

import threading
from collections import defaultdict

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


class _Histogram:
    def __init__(self, buckets: tuple):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.n += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.generation_seconds = 0.0
        self.waiting = 0
        self.running = 0
        self.last_tps = 0.0
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.tps = _Histogram(TPS_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def queue_depth(self, n: int) -> None:
        self.waiting = n

    def generation(self, prompt_tokens: int, generated: int, ttft: float | None, decode_s: float) -> None:
        """One finished generation: ttft = seconds to the first token, decode_s = seconds after it."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated
            if ttft is not None:
                self.ttft.observe(ttft)
                self.generation_seconds += ttft + decode_s
            if generated > 1 and decode_s > 0:
                self.last_tps = (generated - 1) / decode_s
                self.tps.observe(self.last_tps)

    def render(self, running: int, prefix=None) -> str:
        """prefix: the model's offload.prefix_cache.PrefixCache, if any."""
        with self._lock:
            lines = ["# HELP offload_requests_total Requests answered, by endpoint and HTTP status.",
                     "# TYPE offload_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'offload_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            lines += [
                "# HELP offload_prompt_tokens_total Prompt tokens processed.",
                "# TYPE offload_prompt_tokens_total counter",
                f"offload_prompt_tokens_total {self.prompt_tokens}",
                "# HELP offload_generated_tokens_total Tokens generated.",
                "# TYPE offload_generated_tokens_total counter",
                f"offload_generated_tokens_total {self.generated_tokens}",
                "# HELP offload_generation_seconds_total Wall time spent generating (prefill + decode).",
                "# TYPE offload_generation_seconds_total counter",
                f"offload_generation_seconds_total {self.generation_seconds:.6f}",
                "# HELP offload_queue_depth Requests waiting for a generation slot.",
                "# TYPE offload_queue_depth gauge",
                f"offload_queue_depth {self.waiting}",
                "# HELP offload_requests_running Generations running now.",
                "# TYPE offload_requests_running gauge",
                f"offload_requests_running {running}",
                "# HELP offload_decode_tokens_per_second Decode speed of the last finished generation.",
                "# TYPE offload_decode_tokens_per_second gauge",
                f"offload_decode_tokens_per_second {self.last_tps:.3f}",
                "# HELP offload_time_to_first_token_seconds Time from slot start to the first token.",
                "# TYPE offload_time_to_first_token_seconds histogram",
                *self.ttft.lines("offload_time_to_first_token_seconds"),
                "# HELP offload_decode_tokens_per_second_hist Decode speed per generation.",
                "# TYPE offload_decode_tokens_per_second_hist histogram",
                *self.tps.lines("offload_decode_tokens_per_second_hist"),
            ]
            if prefix is not None:
                lines += [
                    "# HELP offload_prefix_cache_hits_total Prompts that resumed after a cached prefix.",
                    "# TYPE offload_prefix_cache_hits_total counter",
                    f"offload_prefix_cache_hits_total {prefix.hits}",
                    "# HELP offload_prefix_cache_misses_total Prompts prefilled from their first token.",
                    "# TYPE offload_prefix_cache_misses_total counter",
                    f"offload_prefix_cache_misses_total {prefix.misses}",
                    "# HELP offload_prefix_cache_tokens_reused_total Prompt tokens taken from the cache, not computed.",
                    "# TYPE offload_prefix_cache_tokens_reused_total counter",
                    f"offload_prefix_cache_tokens_reused_total {prefix.tokens_reused}",
                    "# HELP offload_prefix_cache_evictions_total Stored prefixes evicted to stay within --cache-mem.",
                    "# TYPE offload_prefix_cache_evictions_total counter",
                    f"offload_prefix_cache_evictions_total {prefix.evictions}",
                    "# HELP offload_prefix_cache_bytes Bytes of stored prefix snapshots.",
                    "# TYPE offload_prefix_cache_bytes gauge",
                    f"offload_prefix_cache_bytes {prefix.stored_bytes}",
                ]
        return "\n".join(lines) + "\n"
