"""The runtime owns a forward step: it walks the layers, moves the activations when the next layer lives on
another device, and orders each MoE layer's work. A CPU expert group of a layer that lives elsewhere (a GPU)
is handed off: its inputs copied into host buffers the runtime owns (offload.staging, pinned where CUDA is),
then started on the worker thread with `overlap` (offload.load's, default on) while the shared expert and the
GPU-resident groups run, or computed on this thread without it; its partial comes back through a host buffer
too. Every partial is summed in group order, the shared expert last, either way: the logits are the same.

The hand-off's host work (start the group, wait for it) goes through `host(fn)`: called at once in an eager
step; a recorded decode step (offload.graphs) cuts its graph there and calls fn between two replayed segments,
so the copies to and from the host buffers are part of the recorded segments and only the host work is not.
The architecture files only say what the weights are and what the math is.

T new tokens, H hidden, V vocab, B sequences.
"""

from collections.abc import Callable
from concurrent.futures import Future

import torch

from offload.cache import Cache
from offload.models.base import rms_norm
from offload.models.moe import ExpertGroupError, MoE
from offload.staging import Staged, Staging, worker


def run_now(fn: Callable[[], None]) -> None:
    fn()


class Runtime:
    """Runs steps of one Decoder. Layers split over devices contiguously: x crosses once per split."""

    def __init__(self, model, overlap: bool = True):
        self.model = model
        self.overlap = overlap
        self.staging: Staging | None = None  # made at the first hand-off (pinning needs CUDA set up)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, cache: Cache, last_only: bool = False) -> torch.Tensor:
        """tokens (T,) appended at cache.length -> logits (T, V) float32 on the head's device, or (1, V) for the
        last position only (generation: the head is a big matmul, as costly as a layer for a 512-token chunk)."""
        cache.check_room(tokens.shape[0])
        start = cache.length
        state: dict = {}  # per-forward values layers hand on (RoPE tables, DSA top-k selections)
        x = self.walk(tokens, lambda i, attn, h: attn(h, start, cache.layers[i], state))  # (T, H)
        cache.length = start + tokens.shape[0]
        return self.head(x[-1:] if last_only else x)

    @torch.inference_mode()
    def step_segments(self, segments: list, last_only: bool = True) -> list[torch.Tensor]:
        """Several sequences in one forward (continuous batching): segments [(tokens (T_i,), cache_i)], each
        appended at its cache's length. Attention runs per segment (its own cache and positions); norms, MLP /
        MoE and the head run on the concatenated rows, so each expert's weights are read once for every row
        routed to it. -> per segment logits (1, V) (last_only) or (T_i, V), float32."""
        lens = [int(t.shape[0]) for t, _ in segments]
        for (_, cache), n in zip(segments, lens):
            cache.check_room(n)
        starts = [cache.length for _, cache in segments]
        states: list[dict] = [{} for _ in segments]  # per segment: RoPE tables and DSA selections differ

        def attend(i, attn, h):
            return torch.cat([attn(hs, start, cache.layers[i], st)
                              for hs, start, (_, cache), st in zip(h.split(lens), starts, segments, states)])

        x = self.walk(torch.cat([t for t, _ in segments]), attend)  # (sum T_i, H)
        for (_, cache), start, n in zip(segments, starts, lens):
            cache.length = start + n
        if last_only:
            ends = torch.tensor(lens, device=x.device).cumsum(0) - 1
            x, lens = x[ends], [1] * len(lens)  # (B, H)
        return list(self.head(x).split(lens))  # [(T_i or 1, V)]

    @torch.inference_mode()
    def step_static(self, tokens: torch.Tensor, pos: torch.Tensor, caches: list[Cache],
                    host: Callable = run_now) -> torch.Tensor:
        """B sequences' single-token decode step with static shapes (offload.graphs.DecodeStep's body): tokens
        (B,) and pos (B,) are device tensors, sequence i's caches[i] preallocated (growth and cache.length are
        the caller's) and written at pos[i]. Attention per sequence, the rest on the B rows (as step_segments).
        `host`: where the CPU expert hand-offs' host work goes (see the module). -> logits (B, V) float32."""
        states: list[dict] = [{} for _ in caches]  # per sequence: RoPE tables, DSA selections
        positions: dict = {}  # pos on each layer's device

        def attend(i, attn, h):
            p = positions.setdefault(h.device, pos.to(h.device))
            return torch.cat([attn.decode_static(h[j:j + 1], p[j:j + 1], caches[j].layers[i], states[j])
                              for j in range(len(caches))])

        return self.head(self.walk(tokens, attend, host))

    def walk(self, tokens: torch.Tensor, attend: Callable, host: Callable = run_now) -> torch.Tensor:
        """Every layer over the rows of `tokens` (T,): attend(layer index, attention, normed x (T, H)) -> (T, H)
        is the step's attention (its caches, positions); -> the last hidden state (T, H)."""
        m = self.model
        x = m.embed.rows(tokens.to(m.embed.device))  # (T, H)
        for i, layer in enumerate(m.layers):
            x = x.to(layer.device)  # a no-op unless the previous layer lived elsewhere
            x = x + attend(i, layer.attn, rms_norm(x, layer.attn_norm, m.eps))
            h = rms_norm(x, layer.mlp_norm, m.eps)
            x = x + (self.moe(layer.mlp, h, layer.device, host) if isinstance(layer.mlp, MoE) else layer.mlp(h))
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm (it lives with the head) and the head: x (T, H) -> logits (T, V) float32."""
        m = self.model
        return m.lm_head(rms_norm(x.to(m.lm_head.device), m.norm, m.eps)).float()

    def moe(self, moe: MoE, x: torch.Tensor, home: torch.device, host: Callable = run_now) -> torch.Tensor:
        """x (T, H) of a layer living on `home` -> the MoE output (T, H)."""
        ids, weights = moe.route(x)  # (T, K), (T, K)
        handles = [None] * len(moe.groups)
        for j, g in enumerate(moe.groups):  # a long chunk's CPU experts copied to the GPU (offload.streaming)
            if g.stream is not None and g.stream.takes(ids):
                handles[j] = g.stream.submit(x, ids, weights)  # the copies start now, the kernels at wait
        off = [j for j, g in enumerate(moe.groups) if handles[j] is None and g.runs_in_background and g.device != home]
        if off:
            alone = moe.shared is None and all(h is not None or j in off for j, h in enumerate(handles))
            for j, h in zip(off, self.hand_off(moe, off, x, ids, weights, host, alone)):
                handles[j] = h
        shared = moe.shared(x) if moe.shared is not None else None
        for j, g in enumerate(moe.groups):
            if handles[j] is None:
                handles[j] = g.submit(x, ids, weights)
        return moe.gather(handles, shared)

    def hand_off(self, moe: MoE, off: list[int], x, ids, weights, host: Callable, alone: bool = False) -> list:
        """The groups `off` (host groups of a layer living elsewhere) started on their inputs copied into this
        layer's staging slot; -> their handles. With overlap the groups run on the worker until the handles are
        waited for; without, they run here at once (llama.cpp's order: to the host and back). `alone`: nothing
        runs beside them (no shared expert, no other group), so one host call starts and finishes them (a
        recording gets no empty segment between the two)."""
        if self.staging is None:
            self.staging = Staging()
        staged = Staged(self.staging.slot(moe.layer_idx), x, ids, weights)  # device -> host copies, enqueued
        outs = [staged.slot.buffer(f"out{j}", tuple(x.shape), x.dtype) for j in off]  # (T, H) host partials
        groups = [moe.groups[j] for j in off]
        pending: list = []

        def compute():  # on the worker (overlap) or here: each group's partial into its host buffer
            staged.ready()
            with torch.inference_mode():  # grad mode is per thread
                for g, out in zip(groups, outs):
                    out.copy_(g.submit(staged.x, staged.ids, staged.weights, background=False).wait())

        def start():
            staged.mark()  # the copies were enqueued (or a recorded segment replayed): the worker waits for them
            if self.overlap:
                pending[:] = [worker().submit(compute)]
                return
            done = Future()  # computed here, its failure kept for finish, as the worker's would be
            try:
                compute()
                done.set_result(None)
            except Exception as exc:
                done.set_exception(exc)
            pending[:] = [done]

        def finish():
            if pending:
                future = pending.pop()
                try:
                    future.result()
                except Exception as exc:
                    names = ", ".join(f"{type(g).__name__} on {g.device}" for g in groups)
                    raise ExpertGroupError(f"layer {moe.layer_idx}: expert group {names} failed: "
                                           f"{type(exc).__name__}: {exc}") from exc

        if alone:
            host(lambda: (start(), finish()))
            return [HandedOff(out, x.device, host, None) for out in outs]
        host(start)
        # the first handle waited for finishes the host work for all (one cut in a recorded step)
        return [HandedOff(out, x.device, host, finish if n == 0 else None) for n, out in enumerate(outs)]


class HandedOff:
    """The handle of a handed-off group: wait() finishes the host work (once for the layer's groups), then
    copies the partial from its host buffer to the caller's device (asynchronously from pinned memory)."""

    __slots__ = ("out", "device", "host", "finish")

    def __init__(self, out: torch.Tensor, device: torch.device, host: Callable, finish: Callable):
        self.out, self.device, self.host, self.finish = out, device, host, finish

    def wait(self) -> torch.Tensor:
        if self.finish is not None:
            self.host(self.finish)
        return self.out.to(self.device, non_blocking=True)  # (T, H)
