"""A single-token decode step on static buffers, recorded once and replayed (CUDA graphs, llama.cpp / gpt-fast's
way of taking the per-op launch cost off decode).

The step's inputs, token id and position, live in device tensors of fixed address updated in place before
each replay; the caches are preallocated to a capacity outside the step (Runtime.step_static writes at the
device position and masks attention by it), so nothing in the recorded step depends on a Python position.
On a GPU whose model has no host work in the step (every layer and expert group on that GPU, the groups
sync-free, the KV with the layers) the step is captured as one torch.cuda.CUDAGraph per capacity; anywhere
else `record` keeps the step function itself and replay calls it on the same buffers (the CPU emulation the
tests check, and the path a model with CPU experts takes: capturing the GPU segments between CPU expert calls
is not done yet).
"""

import torch

from offload.cache import Cache
from offload.models.moe import MoE


def capture_blocker(model) -> str | None:
    """Why the decode step of `model` cannot be one CUDA graph, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA"
    device = model.embed.device
    if device.type != "cuda":
        return "the embedding is not on a GPU"
    for i, layer in enumerate(model.layers):
        if layer.device != device or model.lm_head.device != device:
            return f"layer {i} or the head is not on {device} (one graph per device is not done)"
        if getattr(layer.attn, "kv_device", device) != device:
            return f"layer {i} keeps its KV in RAM (the indices are read on the host)"
        if isinstance(layer.mlp, MoE):
            for g in layer.mlp.groups:
                if g.device != device or not getattr(g, "sync_free", False):
                    return f"layer {i}: an expert group on {g.device} or not sync-free (host work in the step)"
    return None


class DecodeStep:
    """B sequences' decode step on static buffers (one recording per batch size): step(*tokens) appends one
    token to each cache -> logits (B, V)."""

    def __init__(self, model, *caches: Cache):
        self.model, self.caches = model, list(caches)
        device, b = model.embed.device, len(caches)
        self.tokens = torch.zeros(b, dtype=torch.long, device=device)  # (B,) the token ids, updated in place
        self.pos = torch.zeros(b, dtype=torch.long, device=device)  # (B,) their positions, updated in place
        self.recorded = None  # the replayable step: a CUDA graph's replay, or the step function (emulation)
        self.capacities: tuple = ()  # the caches' capacities (tensor addresses) the recording was made for
        self.logits: torch.Tensor | None = None  # the graph's output buffer

    def run(self) -> torch.Tensor:
        """The step's body: reads only the buffers and the caches."""
        return self.model.runtime.step_static(self.tokens, self.pos, self.caches)

    def record(self):
        """Record the step for the current caches; -> the replay function (call after updating the buffers)."""
        self.capacities = self.held()
        if capture_blocker(self.model) is not None:
            self.recorded = self.run
            return self.recorded
        # warm-up on a side stream (lazy allocations, kernels' first-call setup), then capture; both write
        # the current token's cache entries, which the replay writes again with the same values
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.run()  # (B, V) in the graph's pool, rewritten by each replay

        def replay() -> torch.Tensor:
            graph.replay()
            return self.logits.clone()

        self.recorded = replay
        return replay

    def held(self) -> tuple:
        return tuple(layer.capacity for cache in self.caches for layer in cache.layers)

    def set_inputs(self, tokens: list[int], positions: list[int]) -> None:
        """Update the buffers in place (their addresses are what the recording reads)."""
        self.tokens.copy_(torch.tensor(tokens))
        self.pos.copy_(torch.tensor(positions))

    def __call__(self, *tokens: int) -> torch.Tensor:
        if len(tokens) != len(self.caches):
            raise ValueError(f"{len(tokens)} tokens for a step of {len(self.caches)} sequences")
        lengths = []
        for cache in self.caches:
            cache.check_room(1)
            lengths.append(cache.length)
            for layer in cache.layers:  # growth happens here, outside the step; it moves the tensors: re-record
                layer.reserve(cache.length + 1)
        self.set_inputs(list(tokens), lengths)
        if self.recorded is None or self.capacities != self.held():
            self.record()
        logits = self.recorded()  # (B, V)
        for cache, n in zip(self.caches, lengths):
            cache.length = n + 1
        return logits
