"""Scratch buffers kept between forwards, one per (name, device, dtype), grown when a bigger one is asked for.

On the CPU a fresh tensor of tens of MB is new pages from the kernel, and their faults can cost more than the
work done in them (measured on the 2-core box: gathering 134 MB into a fresh tensor 0.7 GB/s, into a reused
one 2.6 GB/s). One sequence runs at a time (offload.api.LLM), so one buffer per name is enough; a CUDA graph
will want the same fixed addresses.
"""

import torch

_buffers: dict = {}


def workspace(name: str, n: int, device, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor of `n` elements, contents undefined, reused by the next call with the same name."""
    key = (name, str(device), dtype)
    buf = _buffers.get(key)
    if buf is None or buf.numel() < n:
        # a normal tensor even when first asked for under inference_mode: writable by later calls outside it
        with torch.inference_mode(False):
            buf = _buffers[key] = torch.empty(n, device=device, dtype=dtype)
    return buf[:n]


def held() -> tuple:
    """The buffers kept now: a recorded step (offload.graphs.DecodeStep) holds on to those it was recorded with,
    since its CUDA graph reads their addresses and a bigger request would otherwise free them."""
    return tuple(_buffers.values())
