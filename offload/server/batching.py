"""Continuous batching for the server: up to N sequences decode together, one forward a step.

Each request still runs offload.generation.stream_chunks in its own worker thread (prefix cache, sampling,
stops, detokenising: all per request), but on a stand-in for the model whose forward() hands its segment
(tokens, its own cache) to the Batcher and waits. The Batcher's thread runs one Decoder.forward_segments
once every running sequence has its next segment in (or GATHER_WAIT passed: a decode token, or the next prefill chunk of a request
that just joined: prefill goes PREFILL_CHUNK tokens a step, so running streams keep flowing), so each CPU
expert's weights are read once a step for every sequence that routed to it. A sequence joins at its first
forward (tokenising and the prefix-cache restore do not hold the others up) and leaves when its generator
closes (finished, stopped, or its client gone: the next step runs without it).

With model.graphs (offload.load's graphs=), a step where every sequence brings one token (all decoding) goes
through a recorded static step (offload.graphs.DecodeStep) for exactly that set of caches, kept while the set
is unchanged (the last KEEP_STEPS sets); a step with a prompt chunk stays forward_segments.

Each sequence keeps a cache of its own from a pool of slots; a request takes the free slot whose tokens share
the longest prefix with its prompt (the prefix cache then resumes there or restores from the store), and a
finished slot gives its spare blocks back (offload.cache grows by need).

Exactness: a sequence's logits in a batch equal its solo run's to float rounding (tests/engine/
test_batched.py); greedy streams are token-identical unless two logits tie within that rounding. The 8-bit
activation path of the quantised CPU kernels quantises each row on its own, so batching does not change a
row's integers; a flip there needs an input already differing by rounding that lands on a rounding tie
(bounded by the kernel tests: one token in ~60 runs, tests/kernels test_native).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Iterator

import torch

from offload.prefix_cache import common_prefix


GATHER_WAIT = 0.05  # seconds a step waits for the running sequences' next segments
KEEP_STEPS = 4  # recorded decode steps kept, one per set of sequences (each may hold a CUDA graph's memory)


class _Call:
    __slots__ = ("tokens", "cache", "last_only", "logits", "error", "done")

    def __init__(self, tokens, cache, last_only):
        self.tokens, self.cache, self.last_only = tokens, cache, last_only
        self.logits = self.error = None
        self.done = False


class Batcher:
    """Runs the forwards of every running sequence together, in its own thread."""

    def __init__(self, model):
        self.model = model
        self.cv = threading.Condition()
        self.members = 0  # sequences that will call forward again (joined, not left)
        self.pending: list[_Call] = []
        self.steps = self.rows = 0  # forwards run, segments run: rows / steps is the mean batch
        self.graph_steps = self.graph_rows = 0  # of those, the steps (and their rows) run as a recorded step
        self.recorded: OrderedDict[frozenset, Any] = OrderedDict()  # the caches' ids -> their DecodeStep
        self._stop = False
        threading.Thread(target=self._loop, name="offload-batch", daemon=True).start()

    def join(self) -> None:
        with self.cv:
            self.members += 1

    def leave(self) -> None:
        with self.cv:
            self.members -= 1
            self.cv.notify_all()  # the others may all be waiting for this one

    def forward(self, tokens: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
        """As Decoder.forward, batched with the other members' forwards of this step."""
        cache.check_room(tokens.shape[0])  # a too-long sequence fails alone, not the whole step
        call = _Call(tokens, cache, last_only)
        with self.cv:
            self.pending.append(call)
            self.cv.notify_all()
            while not call.done:
                self.cv.wait()
        if call.error is not None:
            raise call.error
        return call.logits

    def close(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self._stop and not self.pending:
                    self.cv.wait()
                # the others are sampling their next token (well under a millisecond): wait for them, but not
                # for a member whose consumer stalls (an LLM-level caller that stops reading its generator)
                deadline = time.monotonic() + GATHER_WAIT
                while not self._stop and len(self.pending) < self.members and time.monotonic() < deadline:
                    self.cv.wait(max(0.0, deadline - time.monotonic()))
                if self._stop:
                    return
                batch, self.pending = self.pending, []
            full = not all(c.last_only for c in batch)  # only when a caller asked for every position
            try:
                if self._all_decoding(batch):
                    outs = self._decode(batch)
                else:
                    outs = self.model.forward_segments([(c.tokens, c.cache) for c in batch], last_only=not full)
                for c, out in zip(batch, outs):
                    c.logits = out[-1:] if c.last_only else out
            except BaseException as exc:  # every caller of this step gets it (a kernel failure, say)
                for c in batch:
                    c.error = exc
            with self.cv:
                self.steps += 1
                self.rows += len(batch)
                for c in batch:
                    c.done = True
                self.cv.notify_all()

    def _all_decoding(self, batch: list[_Call]) -> bool:
        return (getattr(self.model, "graphs", False) and all(c.tokens.shape[0] == 1 for c in batch)
                and len({id(c.cache) for c in batch}) == len(batch))

    def _decode(self, batch: list[_Call]) -> list[torch.Tensor]:
        """One token for each sequence through the recorded step for this set of caches (in any arrival
        order) -> [(1, V)] in batch order. The step records again when a cache's tensors moved (growth, a slot
        shrunk and regrown)."""
        from offload.graphs import DecodeStep

        key = frozenset(id(c.cache) for c in batch)
        step = self.recorded.pop(key, None) or DecodeStep(self.model, *[c.cache for c in batch])
        row = {id(cache): i for i, cache in enumerate(step.caches)}
        tokens = [0] * len(batch)
        for c in batch:
            tokens[row[id(c.cache)]] = int(c.tokens[0])
        logits = step(*tokens)  # (B, V) in the step's cache order
        self.recorded[key] = step  # kept only after a step that worked: a failed recording is not replayed
        while len(self.recorded) > KEEP_STEPS:
            self.recorded.popitem(last=False)
        self.graph_steps += 1
        self.graph_rows += len(batch)
        return [logits[row[id(c.cache)]:row[id(c.cache)] + 1] for c in batch]


class _Sequence:
    """What offload.generation sees as the model for one request: forward() goes through the Batcher."""

    graphs = False  # generation calls forward for every token; the Batcher decides how a step runs

    def __init__(self, batcher: Batcher, model):
        self.batcher, self.model, self.joined = batcher, model, False

    def forward(self, tokens: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
        if not self.joined:
            self.batcher.join()
            self.joined = True
        return self.batcher.forward(tokens, cache, last_only)

    def leave(self) -> None:
        if self.joined:
            self.joined = False
            self.batcher.leave()

    def __getattr__(self, name):  # prefix_cache, args, ...: the model's
        return getattr(self.model, name)


class BatchLLM:
    """An offload.LLM serving up to `slots` sequences at once (the Scheduler bounds how many run)."""

    def __init__(self, llm, slots: int):
        self.llm, self.slots = llm, slots
        self.batcher = Batcher(llm.model)
        self.free: list = []  # idle sequence caches, each holding its last tokens
        self.made = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):  # tokenizer, model, context_length, model_name
        return getattr(self.llm, name)

    def _take(self, ids: list[int]):
        with self._lock:
            if self.free:
                shared = [common_prefix(c.tokens, ids) for c in self.free]
                best = max(range(len(self.free)), key=shared.__getitem__)
                # a continuation of an idle sequence takes its slot; another conversation takes a new slot
                # while there are any (the idle one stays live for its next turn), else the best one
                if 2 * shared[best] >= len(self.free[best].tokens) or self.made >= self.slots:
                    return self.free.pop(best)
            if self.made >= self.slots:
                raise RuntimeError(f"all {self.slots} sequence slots are taken (the scheduler admits at most that)")
            self.made += 1
        return self.llm.model.new_cache(self.llm.context_length)

    def _give(self, cache) -> None:
        cache.shrink()  # an idle slot keeps its tokens (for the prefix cache), not its spare blocks
        with self._lock:
            self.free.append(cache)

    def stream_chunks(self, prompt, max_new_tokens: int | None = 256, temperature: float = 0.0, top_p: float = 1.0,
                      top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                      presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int | None = None,
                      stop=None, stop_token_ids: list[int] | None = None) -> Iterator[Any]:
        from offload.sampling import SamplingParams

        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, seed=seed).validate()
        ids = self.llm._ids(prompt)
        stop = [stop] if isinstance(stop, str) else stop
        return self._run(ids, max_new_tokens, params, stop, stop_token_ids)

    def _run(self, ids, max_new_tokens, params, stop, stop_token_ids):
        from offload.generation import stream_chunks

        cache = self._take(ids)
        seq = _Sequence(self.batcher, self.llm.model)
        try:
            yield from stream_chunks(seq, self.llm.tokenizer, cache, ids, max_new_tokens, params, stop,
                                     stop_token_ids)
        finally:  # finished, or closed by the scheduler (client gone): the next step runs without it
            seq.leave()
            self._give(cache)

    def close(self) -> None:
        self.batcher.close()


def metrics(scheduler, batcher: Batcher) -> str:
    """Prometheus lines: the KV budget and what the running sequences reserved, steps and sequences run."""
    lines = []
    for name, kind, help_, value in (
            ("offload_kv_budget_positions", "gauge", "KV positions all running sequences may hold.",
             scheduler.kv_budget or 0),
            ("offload_kv_reserved_positions", "gauge", "KV positions the running sequences reserved.",
             scheduler.kv_reserved),
            ("offload_batch_steps_total", "counter", "Batched forwards run.", batcher.steps),
            ("offload_batch_sequences_total", "counter", "Sequences in those forwards (over steps: the mean "
             "batch).", batcher.rows),
            ("offload_batch_graph_steps_total", "counter", "Of those forwards, the decode steps run as a recorded "
             "step (offload.load graphs=).", batcher.graph_steps)):
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def kv_budget(model, ctx: int, slots: int) -> int:
    """Positions the running sequences may hold together: `slots` full contexts, or what the memory free now
    on each cache device holds (after one prefill workspace, a tenth kept spare), whichever is less; never
    less than one context (the load checked that one fits)."""
    from offload.kv_memory import context_bytes, free_bytes

    per = context_bytes(model, 1)
    need = context_bytes(model, ctx)
    fits = min((int(0.9 * free_bytes(dev)) - need[dev][1]) // max(1, per[dev][0]) for dev in per)
    return int(max(ctx, min(slots * ctx, fits)))
