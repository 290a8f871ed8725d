"""The request queue: at most `max_concurrency` generations run at once (offload's engine batches them,
offload.server.batching), each in a worker thread, bridged to asyncio one chunk at a time. With a KV budget
(positions all running sequences may hold), a request is admitted only when its prompt + max tokens fit
beside what the running ones reserved; requests start in arrival order; past `max_queue` waiting, QueueFull.

Cancelling (client gone, stop string seen, timeout) sets an event the worker checks between tokens;
the worker then closes the engine's generator, which frees the sequence, and only then gives the
slot back, so the next request never overlaps with a generation that is still winding down."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from offload.server.metrics import Metrics


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


_DONE = object()


class Scheduler:
    def __init__(self, llm: Any, max_concurrency: int = 1, max_queue: int = 256,
                 metrics: Metrics | None = None, kv_budget: int | None = None):
        self.llm = llm
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.kv_budget = kv_budget  # positions; None: no limit beyond max_concurrency
        self.kv_reserved = 0
        self.metrics = metrics or Metrics()
        self._queue: deque = deque()  # (positions needed, future) in arrival order
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="offload-gen")
        self.waiting = 0
        self.running = 0

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.llm, "close", None)
        if close is not None:
            close()

    def positions(self, prompt: list[int], gen_kwargs: dict) -> int:
        """KV positions a request may fill: its prompt and every token it may generate."""
        ctx = getattr(self.llm, "context_length", None) or 1 << 62
        return min(ctx, len(prompt) + (gen_kwargs.get("max_new_tokens") or ctx))

    def _fits(self, need: int) -> bool:
        if self.running >= self.max_concurrency:
            return False
        return self.kv_budget is None or self.running == 0 or self.kv_reserved + need <= self.kv_budget

    def _admit(self) -> None:
        """Start queued requests in order while the head fits (on the event loop)."""
        while self._queue:
            need, fut = self._queue[0]
            if not fut.done() and not self._fits(need):  # (a done one was abandoned while queued)
                return
            self._queue.popleft()
            if fut.done():
                continue
            self.running += 1
            self.kv_reserved += need
            fut.set_result(need)

    async def start(self, prompt: list[int], gen_kwargs: dict, deadline: float | None) -> "Generation":
        """Wait for a free slot and KV room (until `deadline`, a time.monotonic() value) and start generating."""
        need = self.positions(prompt, gen_kwargs)
        if (self._queue or not self._fits(need)) and self.waiting >= self.max_queue:  # it would have to wait
            raise QueueFull(f"{self.waiting} requests already waiting (--max-queue {self.max_queue})")
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((need, fut))
        self.waiting += 1
        self.metrics.queue_depth(self.waiting)
        self._admit()
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait({fut}, timeout=timeout)
            if not done:
                raise QueueTimeout("timed out waiting for a free generation slot")
        except BaseException:
            if fut.done() and not fut.cancelled():  # admitted just as the wait was abandoned: give it back
                self._release(need)
            else:
                fut.cancel()
            raise
        finally:
            self.waiting -= 1
            self.metrics.queue_depth(self.waiting)
        gen = Generation(self, prompt, gen_kwargs, deadline)
        gen._launch(need)
        return gen

    def _release(self, need: int = 0) -> None:
        self.running -= 1
        self.kv_reserved -= need
        self._admit()


class Generation:
    """One running generation: `async for chunk in gen`, then always `gen.close()`."""

    def __init__(self, sched: Scheduler, prompt: list[int], gen_kwargs: dict, deadline: float | None):
        self.sched, self.prompt, self.kwargs, self.deadline = sched, prompt, gen_kwargs, deadline
        self.cancel_event = threading.Event()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.timed_out = False
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.completion_tokens = 0
        self._finished = False

    def _launch(self, need: int = 0) -> None:
        loop = asyncio.get_running_loop()
        put = self.queue.put_nowait

        def work() -> None:
            from offload.generation import Cancelled, cancel_on

            try:
                # cancel_on: a long prefill stops between chunks too, not only decode between tokens
                with cancel_on(self.cancel_event):
                    stream = self.sched.llm.stream_chunks(self.prompt, **self.kwargs)
                    try:
                        for chunk in stream:
                            loop.call_soon_threadsafe(put, chunk)
                            if self.cancel_event.is_set():
                                break
                    except Cancelled:
                        pass
                    finally:
                        stream.close()  # frees the engine's sequence at once
                loop.call_soon_threadsafe(put, _DONE)
            except BaseException as exc:  # handed to the request, which turns it into an error reply
                loop.call_soon_threadsafe(put, exc)

        fut = loop.run_in_executor(self.sched._pool, work)
        fut.add_done_callback(lambda _f: self.sched._release(need))

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self):
        if self._finished:
            raise StopAsyncIteration
        timeout = None if self.deadline is None else self.deadline - time.monotonic()
        try:
            if timeout is not None and timeout <= 0:
                raise asyncio.TimeoutError
            item = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            self.timed_out = True
            self.close()
            raise StopAsyncIteration from None
        if item is _DONE:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if self.first_token_at is None and item.token_ids:
            self.first_token_at = time.monotonic()
        self.completion_tokens = item.completion_tokens
        return item

    def close(self) -> None:
        """Stop generating (the worker stops before its next token); idempotent."""
        self._finished = True
        self.cancel_event.set()
