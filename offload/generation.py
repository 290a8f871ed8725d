"""Prefill, then decode one token at a time with the cache; text streamed in complete UTF-8 pieces.

The loop is a generator: closing it (`gen.close()`) stops generation between two tokens, which is how
the server cancels a request whose client went away. A long prefill cannot be closed from outside while it
runs, so inside `cancel_on(event)` it also stops between two chunks once the event is set.

With `model.graphs` (offload.load's graphs=) the decode tokens go through a recorded static step
(offload.graphs.DecodeStep) kept on the cache, so the next turn of a conversation replays the same recording;
the prefill stays model.forward.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from offload.cache import Cache
from offload.errors import RequestError
from offload.sampling import Sampler, SamplingParams

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds the (T, S) attention scores in memory
_cancel = threading.local()


class Cancelled(Exception):
    """A prefill stopped by its cancel_on event."""


@contextmanager
def cancel_on(event: threading.Event):
    """In this thread, a prefill running inside the block stops between chunks once `event` is set."""
    before = getattr(_cancel, "event", None)
    _cancel.event = event
    try:
        yield
    finally:
        _cancel.event = before


@dataclass
class Chunk:
    text: str  # new text (may be empty while a UTF-8 character or a possible stop string is held back)
    token_ids: list[int]  # tokens generated in this step
    finish_reason: str | None  # None until the last chunk: "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str


def prefill(model, cache: Cache, ids: list[int]) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns the last position's logits (V,)."""
    logits = None
    event = getattr(_cancel, "event", None)
    for i in range(0, len(ids), PREFILL_CHUNK):
        if event is not None and event.is_set():
            raise Cancelled(f"prefill cancelled after {i} of {len(ids)} tokens")
        chunk = torch.tensor(ids[i:i + PREFILL_CHUNK], dtype=torch.long)
        logits = model.forward(chunk, cache, last_only=True)[-1]
    return logits


def decode(model, cache: Cache, token: int) -> torch.Tensor:
    """One decode token appended to `cache` -> logits (V,): with model.graphs through the recorded step kept on
    the cache (it lives as long as the cache; a dict keyed by the cache would keep the cache alive through the
    step; the step records again when the cache's tensors move), else model.forward."""
    if not getattr(model, "graphs", False):
        return model.forward(torch.tensor([token], dtype=torch.long), cache)[-1]
    from offload.graphs import DecodeStep

    step = cache.__dict__.pop("decode_step", None) or DecodeStep(model, cache)
    logits = step(token)[-1]  # (V,)
    cache.decode_step = step  # kept only after a step that worked: a failed recording is not replayed
    return logits


def forget_step(cache: Cache) -> None:
    """Drop the recording kept on `cache` (before dropping the cache: the step and the cache refer to each
    other, so without this the memory waits for the cyclic garbage collector)."""
    cache.__dict__.pop("decode_step", None)


def stream_chunks(model, tokenizer, cache: Cache, prompt_ids: list[int], max_new_tokens: int | None,
                  params: SamplingParams, stop: list[str] | None = None,
                  stop_token_ids: list[int] | None = None) -> Iterator[Chunk]:
    from offload.detokenize import IncrementalDecoder, StopMatcher

    if not prompt_ids:
        raise RequestError("prompt is empty: give at least one token")
    params.validate()
    room = cache.max_len - len(prompt_ids)
    if room <= 0:
        raise RequestError(f"prompt of {len(prompt_ids)} tokens does not fit the context length {cache.max_len}")
    if max_new_tokens is None:
        max_new_tokens = room
    if max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens > room:
        raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                           f"context length {cache.max_len}")
    stop_ids = set(tokenizer.eos_token_ids) | set(stop_token_ids or ())
    sampler = Sampler(params, prompt_len=len(prompt_ids))
    decoder = IncrementalDecoder(tokenizer)
    matcher = StopMatcher(stop or [])
    prefix = getattr(model, "prefix_cache", None)  # offload.prefix_cache.enable
    skip = prefix.prepare(cache, prompt_ids) if prefix is not None else 0
    if prefix is None:
        cache.resume(0)
    logits = prefill(model, cache, prompt_ids[skip:])
    cache.tokens.extend(prompt_ids[skip:])
    history = list(prompt_ids)
    generated: list[int] = []
    n_prompt = len(prompt_ids)
    while True:
        token = sampler.sample(logits, history)
        if token in stop_ids:
            tail, _ = matcher.push(decoder.flush())
            yield Chunk(tail + matcher.flush(), [], "stop", n_prompt, len(generated), skip)
            return
        generated.append(token)
        history.append(token)
        text, stopped = matcher.push(decoder.push(token))
        if stopped:
            yield Chunk(text, [token], "stop", n_prompt, len(generated), skip)
            return
        if len(generated) >= max_new_tokens:
            tail, stopped = matcher.push(decoder.flush())
            tail += "" if stopped else matcher.flush()
            yield Chunk(text + tail, [token], "stop" if stopped else "length", n_prompt, len(generated), skip)
            return
        yield Chunk(text, [token], None, n_prompt, len(generated), skip)
        logits = decode(model, cache, token)
        cache.tokens.append(token)
