"""The bytes a loaded model really holds, per home (gpu:N, cpu) and tensor class: what the planner's
`Plan.usage()` predicts, measured on the objects the loader built.

How bytes are counted:
- Every torch tensor and numpy array reachable from the decoder's parts (embedding, layers, final norm, head) is
  one byte range; ranges are merged by address, so views, shared storages (a tied head, a shared expert inside a
  CPU expert group, torch.from_numpy over a numpy array) count once, for the range that starts lowest (the one
  visited first among ranges that start together: the embedding before a tied head).
- A torch tensor holds its whole storage (a view keeps the storage alive); a numpy view of an array that owns its
  memory holds the whole owner; a numpy view of a GGUF's memory map holds only the bytes it spans: those are the
  file's pages, shared with the page cache, counted in `mapped` as well as in the total of their home.
- Homes: a CUDA tensor's is its device; a numpy array's is "cpu"; a CPU torch tensor's is the home of the part
  that holds it (the layer's or expert group's device, named by `home_of`): tests put "GPU" layers on CPU
  stand-in devices whose tensors all report "cpu".
- Not counted: KV caches (made by `new_cache`), the runtime's workspaces and recorded steps, the file's unread
  pages. Rotary tables and other float buffers an attention keeps are class "buffers" (the plan has none).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

# attribute names -> tensor class (placement.model.CLASSES) inside a layer; the rest follows its parent
_LAYER_PARTS = {"attn": "attention", "attn_norm": "norms", "mlp_norm": "norms"}
_SKIP = {"runtime", "args", "gguf", "skipped", "cache", "caches", "workspace", "_workspace", "graph", "graphs"}


@dataclass
class Held:
    """home -> class -> bytes, and per home the part of it that is a file's mapped pages."""

    by_home: dict[str, dict[str, int]] = field(default_factory=dict)
    mapped: dict[str, int] = field(default_factory=dict)
    parts: list[tuple[str, str, str, int, bool]] = field(default_factory=list)  # (path, home, class, bytes, mapped)

    def total(self, home: str, exclude: tuple[str, ...] = ("buffers",)) -> int:
        return sum(n for c, n in self.by_home.get(home, {}).items() if c not in exclude)


def default_home(dev: torch.device) -> str:
    """cuda:N -> "gpu:N", anything else -> "cpu"."""
    return f"gpu:{dev.index or 0}" if dev.type == "cuda" else "cpu"


class _Walk:
    def __init__(self, home_of: Callable[[torch.device], str], maps: list[tuple[int, int]]):
        self.home_of, self.maps = home_of, maps
        self.seen: set[int] = set()
        self.ranges: list[tuple[int, int, str, str, bool]] = []  # (start, end, home, class, mapped)
        self.paths: list[str] = []  # the attribute path of each range (for reports)
        self.path = ""

    def _mapped(self, start: int, end: int) -> bool:
        return any(a <= start and end <= b for a, b in self.maps)

    def add_tensor(self, t: torch.Tensor, home: str, cls: str) -> None:
        if t.device.type == "meta":
            return
        s = t.untyped_storage()
        start, n = s.data_ptr(), s.nbytes()
        if t.device.type != "cpu":
            home = self.home_of(t.device)
        if n:
            self._add(start, start + n, home, cls, t.device.type == "cpu" and self._mapped(start, start + n))

    def _add(self, start: int, end: int, home: str, cls: str, mapped: bool) -> None:
        self.ranges.append((start, end, home, cls, mapped))
        self.paths.append(self.path)

    def add_array(self, a: np.ndarray, cls: str) -> None:
        base = a
        while isinstance(base, np.ndarray) and isinstance(base.base, np.ndarray):
            base = base.base
        if isinstance(base, np.ndarray) and (base.base is None or not isinstance(base.base, (mmap.mmap, memoryview))) \
                and base.flags.owndata:
            start = base.ctypes.data
            self._add(start, start + base.nbytes, "cpu", cls, False)
            return
        if a.size == 0:
            return
        # a view of foreign memory (a memory map): the bytes it spans
        lo = hi = a.ctypes.data
        for n, st in zip(a.shape, a.strides):
            lo, hi = (lo + (n - 1) * st, hi) if st < 0 else (lo, hi + (n - 1) * st)
        hi += a.itemsize
        self._add(lo, hi, "cpu", cls, self._mapped(lo, hi))

    def visit(self, obj, home: str, cls: str, path: str = "") -> None:
        self.path = path
        if obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.device, torch.dtype)):
            return
        if isinstance(obj, torch.Tensor):
            self.add_tensor(obj, home, cls)
            return
        if isinstance(obj, np.ndarray):
            self.add_array(obj, cls)
            return
        if id(obj) in self.seen:
            return
        self.seen.add(id(obj))
        if isinstance(obj, (list, tuple, set, frozenset)):
            for i, x in enumerate(obj):
                self.visit(x, home, cls, f"{path}[{i}]")
            return
        if isinstance(obj, dict):
            for k, x in obj.items():
                self.visit(x, home, cls, f"{path}[{k!r}]")
            return
        if hasattr(obj, "func") and hasattr(obj, "keywords"):  # functools.partial (a router's weights)
            self.visit(obj.args, home, cls, path)
            self.visit(obj.keywords, home, cls, path)
            return
        mod = type(obj).__module__ or ""
        if not mod.startswith("offload"):
            return
        if hasattr(obj, "submit") and hasattr(obj, "ids"):  # an expert group: its own home
            dev = getattr(obj, "device", None)
            home = self.home_of(dev) if isinstance(dev, torch.device) else home
            cls = "routed_experts"
        for name, x in _fields(obj):
            if name in _SKIP:
                continue
            sub = cls
            if cls == "routed_experts" and name in ("shared", "_shared_blocks"):
                sub = "shared_experts"  # a CPU group's fused shared expert
            elif cls == "attention" and name == "rope":
                sub = "buffers"
            elif cls == "attention" and "norm" in name:  # (a GGUF's attn_q_a_norm, indexer.k_norm: class norms)
                sub = "norms"
            self.visit(x, home, sub, f"{path}.{name}")


def _fields(obj):
    d = getattr(obj, "__dict__", None)
    if d is not None:
        yield from d.items()
    for k in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, k):
            yield k, getattr(obj, k)


def _mmaps(model) -> list[tuple[int, int]]:
    """Address ranges of the model's GGUF memory maps (model.gguf), if any."""
    out = []
    for shard in getattr(getattr(model, "gguf", None), "_shards", []):
        mm = getattr(shard, "mm", None)
        if isinstance(mm, mmap.mmap) and len(mm):
            a = np.frombuffer(mm, dtype=np.uint8)
            out.append((a.ctypes.data, a.ctypes.data + a.nbytes))
    return out


def held_bytes(model, home_of: Callable[[torch.device], str] | None = None, embed_home: str | None = None,
               head_home: str | None = None) -> Held:
    """Bytes the decoder `model` holds per home and class (see the module's docstring for how they are counted).
    home_of: torch.device -> home name (default cuda:N -> gpu:N, else cpu); embed_home / head_home: the homes of
    the embedding and of the final norm + head where their tensors cannot say (CPU stand-ins), else "cpu"."""
    home_of = home_of or default_home
    w = _Walk(home_of, _mmaps(model))
    w.visit(model.embed, embed_home or "cpu", "embeddings", "embed")
    w.visit(model.lm_head, head_home or "cpu", "lm_head", "lm_head")
    w.visit(model.norm, head_home or "cpu", "lm_head", "norm")  # the plan counts the final norm with the head
    for i, layer in enumerate(model.layers):
        home = home_of(layer.device)
        for name, x in _fields(layer):
            if name == "mlp":
                _visit_mlp(w, x, home, f"layers[{i}].mlp")
            elif name in _LAYER_PARTS:
                w.visit(x, home, _LAYER_PARTS[name], f"layers[{i}].{name}")
    return _merge(w.ranges, w.paths)


def _visit_mlp(w: _Walk, mlp, home: str, path: str) -> None:
    from offload.models.moe import MoE

    if not isinstance(mlp, MoE):
        w.visit(mlp, home, "dense_ffn", path)
        return
    w.visit(mlp.router, home, "router", f"{path}.router")
    w.visit(mlp.shared, home, "shared_experts", f"{path}.shared")
    for j, g in enumerate(mlp.groups):
        w.visit(g, home, "routed_experts", f"{path}.groups[{j}]")


def _merge(ranges: list[tuple[int, int, str, str, bool]], paths: list[str]) -> Held:
    """Union of the byte ranges: each byte counts once, for the range that starts lowest (the first visited
    among ranges that start together: a tied head counts as the embedding)."""
    held = Held()
    order = sorted(range(len(ranges)), key=lambda i: (ranges[i][0], i))
    end = -1  # bytes below `end` are counted
    for i in order:
        start, stop, home, cls, mapped = ranges[i]
        lo = max(start, end)
        if stop <= lo:
            continue
        n = stop - lo
        by = held.by_home.setdefault(home, {})
        by[cls] = by.get(cls, 0) + n
        if mapped:
            held.mapped[home] = held.mapped.get(home, 0) + n
        held.parts.append((paths[i], home, cls, n, mapped))
        end = stop
    return held
