"""A validating GGUF v2/v3 reader: metadata, tensor table, zero-copy mmapped tensor bytes, split files.

Layout (gguf.md): magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata
key/values, the tensor infos (name, u32 n_dims, u64 dims in ggml order, u32 type, u64 offset), then
the data section at the next multiple of `general.alignment`. Every length and count is checked
against the bytes left in the file before anything is allocated for it, so a forged length fails fast.
"""

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from offload.errors import GGUFError
from offload.gguf.types import BLOCK_FORMATS, GGMLType, ValueType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 8

_SCALAR = {  # value type -> (struct format, size)
    ValueType.UINT8: ("<B", 1), ValueType.INT8: ("<b", 1), ValueType.UINT16: ("<H", 2),
    ValueType.INT16: ("<h", 2), ValueType.UINT32: ("<I", 4), ValueType.INT32: ("<i", 4),
    ValueType.FLOAT32: ("<f", 4), ValueType.BOOL: ("<?", 1), ValueType.UINT64: ("<Q", 8),
    ValueType.INT64: ("<q", 8), ValueType.FLOAT64: ("<d", 8),
}
_NUMPY = {
    ValueType.UINT8: "<u1", ValueType.INT8: "<i1", ValueType.UINT16: "<u2", ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4", ValueType.INT32: "<i4", ValueType.FLOAT32: "<f4", ValueType.UINT64: "<u8",
    ValueType.INT64: "<i8", ValueType.FLOAT64: "<f8",
}
_U64 = struct.Struct("<Q")
_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. `shape` is in ggml order: shape[0] (ne0) is the contiguous dim."""

    name: str
    shape: tuple[int, ...]
    type: GGMLType
    file_index: int
    offset: int  # absolute byte offset in its file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.type.name

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def np_shape(self) -> tuple[int, ...]:
        """Row-major (numpy / torch) shape: the ggml shape reversed."""
        return tuple(reversed(self.shape))


class _Cursor:
    """Reads little-endian values from a buffer, checking every read against the end first."""

    def __init__(self, buf: Any, size: int, path: Path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, "
                            f"only {self.size - self.pos} left (truncated or corrupt)")

    def unpack(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR:
            fmt, size = _SCALAR[ValueType(vtype)]
            return self.unpack(fmt, size, what)
        if vtype == ValueType.STRING:
            return self.string(what)
        if vtype == ValueType.ARRAY:
            return self.array(what, depth)
        raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> Any:
        if depth >= MAX_ARRAY_NESTING:
            raise self.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING}")
        etype = self.u32(f"element type of {what}")
        n = self.u64(f"length of {what}")
        if etype in _SCALAR:
            size = _SCALAR[ValueType(etype)][1]
            self.need(n * size, f"{what} ({n} elements)")
            arr = np.frombuffer(self.buf, dtype=np.uint8, count=n * size, offset=self.pos).copy()
            self.pos += n * size
            if etype == ValueType.BOOL:
                return arr != 0
            dtype = np.dtype(_NUMPY[ValueType(etype)])
            return arr.view(dtype).astype(dtype.newbyteorder("="), copy=False)
        # a string is at least its 8-byte length, a nested array its 12-byte header
        min_size = {ValueType.STRING: 8, ValueType.ARRAY: 12}.get(etype)
        if min_size is None:
            raise self.fail(f"{what} has unknown element type {etype}")
        self.need(n * min_size, f"{what} ({n} elements)")
        if etype == ValueType.STRING:
            return self._strings(n, what)
        return [self.array(f"{what}[{i}]", depth + 1) for i in range(n)]

    def _strings(self, n: int, what: str) -> list[str]:
        """n length-prefixed strings (a 150k-token vocabulary, its merges): one Python step per string to
        find the lengths, then one UTF-8 decode and one split for all of them (5x faster than a decode per
        string). Anything odd (a length past the end, bad UTF-8) goes to _strings_checked, which finds and
        names the culprit."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        if n == 0:
            return []
        starts = [0] * n  # bounded: the caller checked n * 8 against the bytes left
        try:
            for i in range(n):
                pos += 8
                starts[i] = pos
                pos += unpack(buf, pos - 8)[0]
        except (struct.error, OverflowError):  # a length field past the end of the buffer
            return self._strings_checked(n, what)
        if pos > size:
            return self._strings_checked(n, what)
        # every 8-byte length field but the first becomes one NUL separator: decode all the text at once
        # and split it (a string holding a NUL itself takes the slow path)
        region = np.frombuffer(buf, dtype=np.uint8, count=pos - self.pos, offset=self.pos).copy()
        st = np.array(starts, dtype=np.int64) - self.pos  # where each string's text starts, in region
        region[st[1:] - 1] = 0
        keep = np.ones(len(region), dtype=bool)
        keep[(st[:, None] - np.arange(8, 0, -1)).ravel()] = False
        keep[st[1:] - 1] = True
        joined = region[keep]
        if len(joined) - np.count_nonzero(joined) != n - 1:
            return self._strings_checked(n, what)
        try:
            out = joined.tobytes().decode("utf-8").split("\x00")
        except UnicodeDecodeError:  # bad bytes, or a character cut between two strings
            return self._strings_checked(n, what)
        self.pos = pos
        return out

    def _strings_checked(self, n: int, what: str) -> list[str]:
        # one bounds check per length and per string: the slow path that names the bad element
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        try:
            for i in range(n):
                if pos + 8 > size:
                    raise self.fail(f"{what}[{i}]: length at offset {pos} runs past the end (truncated)")
                (length,) = unpack(buf, pos)
                pos += 8
                if length > size - pos:
                    raise self.fail(f"{what}[{i}] needs {length} bytes at offset {pos}, only {size - pos} left")
                out.append(buf[pos:pos + length].decode("utf-8"))
                pos += length
        except UnicodeDecodeError:
            raise self.fail(f"{what}[{len(out)}] is not valid UTF-8") from None
        self.pos = pos
        return out


@dataclass
class _Shard:
    path: Path
    size: int
    mm: Any
    metadata: dict[str, Any]
    value_types: dict[str, int]
    tensors: list[TensorInfo]
    alignment: int
    data_offset: int
    version: int


def _open_mmap(path: Path) -> tuple[Any, int]:
    try:
        size = path.stat().st_size
        if size == 0:
            raise GGUFError(f"{path}: empty file, expected a GGUF file")
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, expected a GGUF file") from None
    except (PermissionError, OSError) as exc:
        raise GGUFError(f"{path}: cannot open ({exc.strerror or exc})") from None


def _parse(path: Path, file_index: int) -> _Shard:
    mm, size = _open_mmap(path)
    c = _Cursor(mm, size, path)
    c.need(4, "magic")
    magic = bytes(mm[0:4])
    if magic != GGUF_MAGIC:
        raise c.fail(f"bad magic {magic!r}, expected b'GGUF' (not a GGUF file)")
    c.pos = 4
    version = c.u32("version")
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in (2, 3):
            raise c.fail("big-endian GGUF files are not supported")
        raise c.fail(f"unsupported GGUF version {version}, expected 2 or 3")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata count")
    # smallest possible records: a tensor info is 24 bytes, a key/value 13 bytes
    if n_tensors * 24 + n_kv * 13 > size - c.pos:
        raise c.fail(f"header claims {n_tensors} tensors and {n_kv} metadata keys, "
                     f"more than {size} bytes can hold (truncated or corrupt)")

    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        if key in metadata:
            raise c.fail(f"duplicate metadata key {key!r}")
        vtype = c.u32(f"value type of {key!r}")
        metadata[key] = c.value(vtype, f"metadata {key!r}")
        value_types[key] = vtype

    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        alignment = metadata["general.alignment"]
        if value_types["general.alignment"] != ValueType.UINT32 or alignment <= 0 or alignment & (alignment - 1):
            raise c.fail(f"general.alignment = {alignment!r}, expected a power of two (uint32)")

    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"name of tensor #{i}")
        if name in names:
            raise c.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = c.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dims, expected 1..{MAX_DIMS}")
        shape = tuple(c.u64(f"dim {j} of tensor {name!r}") for j in range(n_dims))
        type_id = c.u32(f"type of tensor {name!r}")
        rel_offset = c.u64(f"offset of tensor {name!r}")
        infos.append((name, shape, type_id, rel_offset))
    data_offset = -(-c.pos // alignment) * alignment

    tensors = []
    for name, shape, type_id, rel_offset in infos:
        fmt = BLOCK_FORMATS.get(type_id)
        if fmt is None:
            raise c.fail(f"tensor {name!r} has unknown ggml type id {type_id}")
        if 0 in shape:  # ggml has no empty tensors (llama.cpp divides by every dim when checking)
            raise c.fail(f"tensor {name!r} has a zero dim in shape {list(shape)}")
        n_el = 1
        for d in shape:
            n_el *= d
        if n_el >= 1 << 62:
            raise c.fail(f"tensor {name!r} shape {list(shape)} has too many elements")
        if shape[0] % fmt.block_size:
            raise c.fail(f"tensor {name!r}: ne0 = {shape[0]} is not a multiple of "
                         f"{fmt.name}'s block size {fmt.block_size}")
        nbytes = n_el // fmt.block_size * fmt.type_size
        if rel_offset % alignment:
            raise c.fail(f"tensor {name!r} offset {rel_offset} is not aligned to {alignment}")
        start = data_offset + rel_offset
        if start + nbytes > size:
            raise c.fail(f"tensor {name!r} ({fmt.name} {list(shape)}, {nbytes} bytes at offset {start}) "
                         f"runs past the end of the file ({size} bytes; truncated or corrupt)")
        tensors.append(TensorInfo(name, shape, fmt.type, file_index, start, nbytes))
    # tensors must not overlap (llama.cpp even requires them packed in order)
    prev = None
    for t in sorted(tensors, key=lambda t: t.offset):
        if prev is not None and t.offset < prev.offset + prev.nbytes:
            raise c.fail(f"tensor {t.name!r} at offset {t.offset} overlaps tensor {prev.name!r}")
        if t.nbytes:
            prev = t
    return _Shard(path, size, mm, metadata, value_types, tensors, alignment, data_offset, version)


def shard_paths(path: str | Path) -> list[Path]:
    """All shard paths of a split GGUF given any of its `*-0000k-of-0000N.gguf` names, else [path]."""
    path = Path(path)
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    if count < 1:
        raise GGUFError(f"{path}: split file name says 0 shards")
    return [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


class GGUFFile:
    """A GGUF model: one file or every shard of a split file, validated on open.

    `metadata` holds the first shard's key/values (numeric arrays as numpy arrays, string arrays as
    lists of str); `tensors` maps names to TensorInfo across all shards.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        paths = shard_paths(self.path)
        first = _parse(paths[0], 0)
        self._shards = [first]
        self.metadata: dict[str, Any] = first.metadata
        self.value_types: dict[str, int] = first.value_types
        count = self.metadata.get("split.count")
        if len(paths) > 1 or count is not None:
            if count != len(paths):
                raise GGUFError(f"{paths[0]}: split.count = {count!r}, but the file name says {len(paths)} shards")
            for i, p in enumerate(paths[1:], start=1):
                self._shards.append(_parse(p, i))
            for i, s in enumerate(self._shards):
                if s.metadata.get("split.no") != i:
                    raise GGUFError(f"{s.path}: split.no = {s.metadata.get('split.no')!r}, expected {i}")
        self.tensors: dict[str, TensorInfo] = {}
        for s in self._shards:
            for t in s.tensors:
                if t.name in self.tensors:
                    raise GGUFError(f"{s.path}: tensor {t.name!r} is also in "
                                    f"{self._shards[self.tensors[t.name].file_index].path}")
                self.tensors[t.name] = t
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and expected != len(self.tensors):
            raise GGUFError(f"{paths[0]}: split.tensors.count = {expected}, "
                            f"but the shards hold {len(self.tensors)} tensors")

    @property
    def paths(self) -> list[Path]:
        return [s.path for s in self._shards]

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata key 'general.architecture' missing or not a string")
        return arch

    @property
    def alignment(self) -> int:
        return self._shards[0].alignment

    @property
    def version(self) -> int:
        return self._shards[0].version

    @property
    def file_size(self) -> int:
        """Bytes on disk over all shards."""
        return sum(s.size for s in self._shards)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mmapped file (zero-copy)."""
        t = self._info(name)
        return np.frombuffer(self._shards[t.file_index].mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 with the numpy shape (ggml shape reversed), via the reference dequant."""
        from offload.gguf.quants import dequantize

        t = self._info(name)
        try:
            return dequantize(self.raw(name), t.type, t.np_shape)
        except GGUFError as exc:
            raise GGUFError(f"{self.path}: tensor {name!r}: {exc}") from None

    def dequantize_torch(self, name: str, dtype: Any = None, device: Any = "cpu") -> Any:
        """The tensor as a torch tensor (numpy shape) via the vectorised torch dequant; the quantised
        bytes move to `device` first, so a GPU does the expansion. dtype: float32 (default) or bfloat16."""
        import warnings

        import torch

        from offload.gguf.dequant_torch import dequantize_torch

        t = self._info(name)
        with warnings.catch_warnings():  # the mmap is read-only; nothing writes through this view
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(self.raw(name))
        try:
            return dequantize_torch(raw.to(device), t.type, t.np_shape, dtype=dtype or torch.float32)
        except GGUFError as exc:
            raise GGUFError(f"{self.path}: tensor {name!r}: {exc}") from None

    def close(self) -> None:
        """Unmap the files; fails with BufferError while views from raw() are still alive."""
        for s in self._shards:
            s.mm.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except BufferError:  # a raw() view outlives the `with`: leave the map to the GC
            pass

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.tensors)} tensors, {len(self._shards)} file(s))"
