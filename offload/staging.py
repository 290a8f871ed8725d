"""Host staging for the CPU experts' transfer: the activations, ids and weights a CPU expert group reads, and
the partial it writes back, in host buffers the runtime owns. Page-locked (pinned) where CUDA is there, so the
copies are asynchronous: the caller enqueues the device-to-host copy, records an event and goes on with the GPU
work; the worker thread waits for the event. Two slots, chosen by layer parity: layer L's buffers are written
again only by layer L + 2, after layer L's partial was waited for and its copy back enqueued before that.
"""

from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None


def worker() -> ThreadPoolExecutor:
    """The one thread CPU expert groups run on while the caller works: the native pool runs one call at a time
    anyway (kernels/cpu/csrc/pool.h)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(1, thread_name_prefix="offload-cpu-experts")
    return _pool


class Slot:
    """One parity's buffers, each grown to the largest batch seen (a 2048-token prefill chunk at most)."""

    def __init__(self, pin: bool):
        self.pin = pin
        self.bufs: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor of `shape` and `dtype`: a view of the buffer `name`, reallocated only to grow."""
        n = 1
        for s in shape:
            n *= s
        buf = self.bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, pin_memory=self.pin)
            self.bufs[name] = buf
        return buf[:n].view(shape)

    def to_host(self, name: str, src: torch.Tensor) -> torch.Tensor:
        """src copied into the buffer `name` (asynchronously from a GPU into pinned memory: wait for `ready`)."""
        dst = self.buffer(name, tuple(src.shape), src.dtype)
        dst.copy_(src, non_blocking=self.pin and src.device.type == "cuda")
        return dst


class Staging:
    """The runtime's two slots. `pin` defaults to whether CUDA is there (pinning needs a CUDA context)."""

    def __init__(self, pin: bool | None = None):
        pin = torch.cuda.is_available() if pin is None else pin
        self.slots = (Slot(pin), Slot(pin))

    def slot(self, layer_idx: int) -> Slot:
        return self.slots[layer_idx % 2]


class Staged:
    """A group's inputs in one slot, and what the worker waits for before it reads them."""

    __slots__ = ("slot", "x", "ids", "weights", "device", "event")

    def __init__(self, slot: Slot, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        self.slot = slot
        self.x = slot.to_host("x", x)  # (T, H)
        self.ids = slot.to_host("ids", ids)  # (T, K)
        self.weights = slot.to_host("weights", weights)  # (T, K)
        self.device = x.device
        self.event = None

    def mark(self) -> None:
        """Called on the caller's thread once the copies are enqueued (on a GPU: an event after them on the
        current stream; a recorded step calls it after replaying the segment that holds them)."""
        if self.device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self) -> None:
        """Blocks (the worker thread) until the inputs are on the host."""
        if self.event is not None:
            self.event.synchronize()
