"""A single-token decode step on static buffers, recorded once and replayed (CUDA graphs: llama.cpp / gpt-fast's
way of taking the per-op launch cost off decode).

The step's inputs, token id and position, live in device tensors of fixed address updated in place before
each replay; the caches are preallocated to a capacity outside the step (Runtime.step_static writes at the
device position and masks attention by it), so nothing in the recorded step depends on a Python position.
A layer's CPU expert group is host work inside the step: the recording is cut there (llama.cpp's graph
splits), so it is a program of recorded segments and host calls. Per MoE layer with CPU experts: segment
[.. attention, router, copies of x / ids / weights into pinned buffers], host call (start the CPU group on the
worker), segment [shared expert, GPU experts], host call (wait for it), then the next segment starts with the
copy of its partial from its pinned buffer. On a GPU each segment is a torch.cuda.CUDAGraph (one memory pool,
replayed in order); on the CPU `Emulated` records the segments' tensor ops at the dispatch level and replays
them on the same tensors, so whatever Python computed at record time stays baked in, as in a CUDA graph (the
tests' check). A model the recording cannot hold (capture_blocker says why) runs the step function itself, as
does a step whose recording failed (a warning says why; OFFLOAD_GRAPHS=1 makes it an error instead).
"""

import os
import warnings
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map

from offload.cache import Cache
from offload.models import workspace
from offload.models.experts import STATIC_PAIRS
from offload.models.moe import ExpertGroupError, MoE
from offload.runtime import run_now

RECORD_FAILURES: list[str] = []  # why recordings failed in this process (tests check it stays empty)

# ops that make the host wait for the device: a recorded step cannot hold them (a CUDA graph capture fails);
# bincount and equal read a value back inside their CUDA kernels, unseen on the CPU; under inference mode a
# scalar read reaches the dispatcher as item, not _local_scalar_dense
HOST_READS = {"_local_scalar_dense", "item", "nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
              "masked_select", "bincount", "equal"}
# ops that read the host on CUDA when an index is a boolean mask (its nonzero runs inside the op)
MASK_INDEXED = {"index", "index_put", "index_put_", "_index_put_impl_"}


def host_read(func, args) -> bool:
    """Whether op `func` on `args` makes the host wait for a CUDA device (seen at the dispatch level)."""
    name = func._schema.name.split("::")[-1]
    if name in HOST_READS:
        return True
    if name in MASK_INDEXED and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


def capture_blocker(model) -> str | None:
    """Why the decode step of `model` cannot be recorded, or None when it can: every layer, the embedding and
    the head on one device, their weights device ops (not the native CPU kernels), KV with the layers, GPU
    expert groups sync-free; CPU expert groups are host calls between segments."""
    device = model.embed.device
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA"
    unseen = _unseen_kinds(device)
    for name, obj in (("the embedding", model.embed), ("the head", model.lm_head)):
        if (found := _host_weight(obj, unseen)) is not None:
            return f"{name} is {found} (host work)"
    if not _same(model.lm_head.device, device):
        return f"the head is not on {device}"
    for i, layer in enumerate(model.layers):
        if not _same(layer.device, device):
            return f"layer {i} is not on {device} (one recording per device is not done)"
        if not _same(getattr(layer.attn, "kv_device", device), device):
            return f"layer {i} keeps its KV in RAM (the indices are read on the host)"
        for part in (layer.attn, layer.mlp):
            if (found := _host_weight(part, unseen)) is not None:
                return f"layer {i}: {found} runs outside the recording inside the step"
        if isinstance(layer.mlp, MoE):
            if layer.mlp.observer is not None:
                return f"layer {i}: a routing observer reads the ids on the host"
            for g in layer.mlp.groups:
                if g.device != layer.device and g.runs_in_background:
                    continue  # handed off between two segments
                if isinstance(g, unseen):
                    return f"layer {i}: {type(g).__name__} runs outside the recording inside the step"
                if not _same(g.device, device) or not getattr(g, "sync_free", False):  # host groups have none
                    return f"layer {i}: an expert group on {g.device} that is not sync-free (host reads)"
    return None


def _same(a: torch.device, b: torch.device) -> bool:
    """One device (cuda and cuda:0 alike; a test's stand-in GPU cpu:0 holds tensors that say cpu)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _unseen_kinds(device: torch.device) -> tuple:
    """The weight and group kinds whose work a recording on `device` would miss: the native CPU kernels (host
    calls), and off a GPU the Triton kernels too (the interpreter runs them in Python, where the emulation's
    dispatch-level recording does not see them; on a GPU a CUDA graph captures their launches)."""
    import sys

    from offload.kernels.cpu.weights import HOST_WEIGHTS

    triton = sys.modules.get("offload.kernels.gpu.weights")  # imported where such weights exist
    if device.type == "cuda" or triton is None:
        return HOST_WEIGHTS
    return HOST_WEIGHTS + (triton.TritonQuantWeight, triton.TritonExperts)


def _host_weight(obj, kinds: tuple, depth: int = 3) -> str | None:
    """The type name of a weight of `kinds` (work the recording would miss) among obj's attributes."""
    if isinstance(obj, kinds):
        return type(obj).__name__
    if depth == 0 or isinstance(obj, (torch.Tensor, Cache)):
        return None
    if isinstance(obj, MoE):  # its groups are checked as groups
        return _host_weight(obj.shared, kinds, depth - 1)
    items = obj if isinstance(obj, (list, tuple)) else getattr(obj, "__dict__", {}).values()
    for v in items:
        if (found := _host_weight(v, kinds, depth - 1)) is not None:
            return found
    return None


def _rows_blocker(model, rows: int) -> str | None:
    """Why a step of `rows` sequences cannot be recorded where one of fewer can (top-k <= 4 lets 16 rows pass
    STATIC_PAIRS): from STREAM_MIN_TOKENS rows a layer's long-prompt stream takes them (a host read of the pairs),
    from GEMM_MIN_TOKENS the GPU experts' Triton kernels sort their pairs by expert (a host read of the count)."""
    import sys

    from offload.placement.cost import STREAM_MIN_TOKENS

    triton = sys.modules.get("offload.kernels.gpu.weights")  # imported where such groups exist
    gemm_rows = sys.modules["offload.kernels.gpu.gemm"].GEMM_MIN_TOKENS if triton is not None else None
    for i, moe in enumerate(model.moe_layers()):
        for g in moe.groups:
            if g.stream is not None and rows >= STREAM_MIN_TOKENS:
                return f"{rows} sequences: MoE layer {i} streams its CPU experts from {STREAM_MIN_TOKENS} rows"
            if triton is not None and isinstance(g, triton.TritonExperts) and rows >= gemm_rows:
                return f"{rows} sequences: MoE layer {i}'s GPU experts sort their pairs from {gemm_rows} rows"
    return None


class CudaSegments:
    """The step captured as CUDA graphs cut at each host call, one memory pool, replayed in capture order."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.program: list[Callable] = []  # graph replays and host calls, in order
        self.host_calls = 0
        self.graph = None
        self.capturing = False  # a capture begun and not yet ended

    def record(self, step: Callable) -> torch.Tensor:
        """step(host) run once under capture (nothing computes; host calls are noted, not made) -> its output,
        a buffer of the pool each replay rewrites."""
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._begin()
            try:
                out = step(self.host)
                self._cut()
            except BaseException:
                # a capture left open keeps this thread from syncing or allocating on the GPU ever after (CUDA's
                # thread-local capture mode): end it, and let the step's own error be the one raised
                if self.capturing:
                    self.capturing = False
                    try:
                        self.graph.capture_end()
                    except Exception:
                        pass  # the capture was invalidated by that error
                raise
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _begin(self):
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads (sampling, a prefix-cache restore) may use the GPU meanwhile
        self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.capturing = True

    def _cut(self):
        self.capturing = False  # capture_end ends it even when it raises (an invalidated capture)
        self.graph.capture_end()
        self.program.append(self.graph.replay)

    def host(self, fn: Callable[[], None]) -> None:
        self._cut()
        self.program.append(fn)
        self.host_calls += 1
        self._begin()

    def replay(self, out: torch.Tensor) -> torch.Tensor:
        for f in self.program:
            f()
        return out.clone()  # the pool's buffer is rewritten by the next replay


class Emulated:
    """The CPU's stand-in for CudaSegments: the step's tensor ops recorded at the dispatch level (executed as
    they are recorded) and replayed on the same tensors, outputs renamed to the replay's; host calls made and
    kept. Python values and host reads are not replayed, as in a graph: a host read is refused."""

    def __init__(self):
        self.program: list = []  # (op, args, kwargs, recorded output) or a host call
        self.host_calls = 0

    def record(self, step: Callable) -> torch.Tensor:
        with _Recorder(self.program):
            return step(self.host)

    def host(self, fn: Callable[[], None]) -> None:
        with _disable_current_modes():  # the host work itself is not part of a segment
            fn()
        self.program.append(fn)
        self.host_calls += 1

    @torch.inference_mode()
    def replay(self, out: torch.Tensor) -> torch.Tensor:
        made: dict[int, torch.Tensor] = {}  # id of a recorded output -> this replay's tensor

        def now(a):
            return made.get(id(a), a) if isinstance(a, torch.Tensor) else a

        for entry in self.program:
            if not isinstance(entry, tuple):
                entry()
                continue
            op, args, kwargs, recorded = entry
            res = op(*tree_map(now, args), **tree_map(now, kwargs))
            for r, o in zip(tree_leaves(res), tree_leaves(recorded)):
                if isinstance(o, torch.Tensor):
                    made[id(o)] = r
        return now(out)


class _Recorder(TorchDispatchMode):
    def __init__(self, program: list):
        super().__init__()
        self.program = program

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if host_read(func, args):
            raise RuntimeError(f"{func} reads the device from the host inside a recorded step")
        out = func(*args, **kwargs)
        self.program.append((func, args, kwargs, out))  # keeps every recorded tensor alive: ids stay unique
        return out


class DecodeStep:
    """B sequences' decode step on static buffers (one recording per batch size): step(*tokens) appends one
    token to each cache -> logits (B, V)."""

    def __init__(self, model, *caches: Cache):
        self.model, self.caches = model, list(caches)
        device, b = model.embed.device, len(caches)
        self.tokens = torch.zeros(b, dtype=torch.long, device=device)  # (B,) the token ids, updated in place
        self.pos = torch.zeros(b, dtype=torch.long, device=device)  # (B,) their positions, updated in place
        self.recorded = None  # the replayable step: a recording's replay, or the step function itself
        self.capacities: tuple = ()  # the caches' tensors (held()) the recording was made for
        self.blocker: str | None = None  # why the last record() could not record (the step function runs)
        self.segments = 0  # recorded segments (host calls + 1)
        self.recording = None  # the CudaSegments / Emulated recording
        self.scratch: tuple = ()  # the scratch buffers the recording reads (offload.models.workspace)

    def run(self, host: Callable = run_now) -> torch.Tensor:
        """The step's body: reads only the buffers and the caches."""
        return self.model.runtime.step_static(self.tokens, self.pos, self.caches, host=host)

    def record(self):
        """Record the step for the current caches; -> the replay function (call after updating the buffers)."""
        self.recorded, self.capacities, self.recording, self.scratch = None, (), None, ()  # nothing stale stays
        self.blocker = capture_blocker(self.model)
        pairs = len(self.caches) * getattr(self.model.args, "num_experts_per_tok", 0)
        if self.blocker is None and pairs > STATIC_PAIRS:
            self.blocker = f"{pairs} (token, expert) pairs: more than the groups' static path takes ({STATIC_PAIRS})"
        if self.blocker is None:
            self.blocker = _rows_blocker(self.model, len(self.caches))
        if self.blocker is not None:
            self.recorded, self.segments, self.capacities = self.run, 0, self.held()
            return self.recorded
        if self.model.embed.device.type == "cuda":
            # warm-up first (lazy allocations, the staging buffers at their size, kernels' first-call setup);
            # it and the recording write the current token's cache entries, which a replay writes again
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.run()
            torch.cuda.current_stream().wait_stream(stream)
            recording = CudaSegments()
        else:
            recording = Emulated()
        try:
            logits = recording.record(self.run)  # (B, V)
        except ExpertGroupError:
            raise  # the model's own failure: the step function would fail the same way
        except Exception as exc:
            if os.environ.get("OFFLOAD_GRAPHS", "").strip() == "1":
                raise
            # unforeseen (a new op that syncs, a CUDA capture rule): decode goes on op by op, and says why
            self.blocker = f"recording failed: {type(exc).__name__}: {exc}"
            RECORD_FAILURES.append(self.blocker)
            warnings.warn(f"offload: the decode step runs op by op, not recorded ({self.blocker}); "
                          "OFFLOAD_GRAPHS=0 turns recording off", RuntimeWarning, stacklevel=2)
            self.recorded, self.segments, self.capacities = self.run, 0, self.held()
            return self.recorded
        self.segments = 1 + recording.host_calls
        # a CUDA graph keeps addresses, not tensors: a later longer forward that regrows a scratch buffer would
        # free memory the replays still read and write
        self.scratch, self.recording = workspace.held(), recording

        def replay() -> torch.Tensor:
            return recording.replay(logits)

        self.recorded, self.capacities = replay, self.held()
        return replay

    def held(self) -> tuple:
        """Where the caches' tensors are now (address, size): the recording reads them there. Growth moves them,
        and so does a shrink and regrowth to the same capacity between two requests."""
        return tuple((t.data_ptr(), t.numel()) for cache in self.caches for layer in cache.layers
                     for t in vars(layer).values() if isinstance(t, torch.Tensor))

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

