"""Lazy access to a Hugging Face checkpoint directory: config.json + safetensors shards.

Tensors are read one at a time through safetensors' mmap and put straight onto their device, so the
model is never held twice. FP8 e4m3 block-quantised weights (`weight_scale_inv`) are dequantised on read.
"""

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from offload.errors import ConfigError, WeightsError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U64": 8, "U32": 4, "U16": 2, "F8_E8M0": 1}


def read_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ConfigError(f"{path}: expected a checkpoint directory (config.json + *.safetensors) or a .gguf file")
    if not config_path.exists():
        raise ConfigError(f"{config_path}: missing (a checkpoint directory needs config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{config_path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: expected a JSON object, got a {type(config).__name__}")
    return config


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entry(file: Path, name: str, info, data_size: int) -> tuple[int, int]:
    """One tensor's header entry -> its (start, end) in the data section, or a WeightsError naming it."""
    if not isinstance(info, dict):
        raise WeightsError(f"{file}: tensor {name}: header entry is a {type(info).__name__}, expected an object "
                           "with dtype, shape and data_offsets")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise WeightsError(f"{file}: tensor {name}: header entry has no '{key}'")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise WeightsError(f"{file}: tensor {name} has unknown dtype {dtype!r} "
                           f"(known: {', '.join(_DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise WeightsError(f"{file}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise WeightsError(f"{file}: tensor {name}: data_offsets {offsets!r} is not [start, end] with "
                           "start <= end")
    start, end = offsets
    if end > data_size:
        raise WeightsError(f"{file}: tensor {name} lies outside the file (ends at byte {end} of a "
                           f"{data_size}-byte data section: file truncated?)")
    n = 1
    for d in shape:
        n *= d
    if end - start != n * _DTYPE_BYTES[dtype]:
        raise WeightsError(f"{file}: tensor {name}: data_offsets [{start}, {end}] hold {end - start} bytes, "
                           f"its {dtype} shape {shape} needs {n * _DTYPE_BYTES[dtype]}")
    return start, end


def _check_safetensors_file(file: Path) -> dict[str, dict]:
    """Parse and check the header ourselves, as the safetensors format defines it, so every broken file is
    one WeightsError naming it (and the tensor or key), not a SIGBUS from the mmap or a library error later."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{file}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise WeightsError(f"{file}: truncated or corrupt safetensors header (claims {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError):  # JSON / UTF-8 errors; deep nesting exhausts the parser
            raise WeightsError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{file}: safetensors header is a JSON {type(header).__name__}, expected an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise WeightsError(f"{file}: safetensors __metadata__ must map strings to strings, got {meta!r:.80}")
    data_size = size - 8 - header_len
    spans = sorted((*_check_entry(file, name, info, data_size), name) for name, info in header.items())
    # the format packs tensors back to back: an overlap or a hole is a corrupt (or hand-edited) file
    pos, prev = 0, None
    for start, end, name in spans:
        if start < pos:
            raise WeightsError(f"{file}: tensor {name} overlaps tensor {prev} (data_offsets start at {start}, "
                               f"{prev} ends at {pos})")
        if start > pos:
            raise WeightsError(f"{file}: {start - pos} unused bytes before tensor {name} (at {pos}..{start}): "
                               "the data section must hold the tensors back to back")
        pos, prev = end, name
    if pos != data_size:
        raise WeightsError(f"{file}: {data_size - pos} bytes after the last tensor: the data section must end "
                           "with the last tensor")
    return header


class Checkpoint:
    """A checkpoint directory: `get(name)` reads one tensor onto a device, dequantising FP8 blocks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = read_config(self.path)
        self._where: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        for file in self._shard_files():
            for tensor, info in _check_safetensors_file(file).items():
                if tensor in self._where:
                    raise WeightsError(f"{file}: tensor {tensor} is also in {self._where[tensor]}")
                self._where[tensor] = file
                self._info[tensor] = info
        self._handles: dict[Path, object] = {}
        self._check_model()
        quant = self.config.get("quantization_config") or {}
        block = quant.get("weight_block_size") or (128, 128)
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(_is_count(b) and b for b in block)):
            raise ConfigError(f"{self.path / 'config.json'}: quantization_config.weight_block_size = {block!r}, "
                              "expected two positive integers")
        self.fp8_block = tuple(block)

    def _shard_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if not index.exists():
            files = [self._inside(p.name, self.path) for p in sorted(self.path.glob("*.safetensors"))]
            if not files:
                raise WeightsError(f"{self.path}: no *.safetensors files")
            return files
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, RecursionError, OSError) as exc:
            raise WeightsError(f"{index}: not a valid JSON file ({type(exc).__name__})") from None
        except AttributeError:  # valid JSON, but not an object
            weight_map = None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index}: expected a non-empty 'weight_map' object (tensor name -> shard file)")
        for tensor, name in weight_map.items():
            if not isinstance(name, str) or not name or "\0" in name:
                raise WeightsError(f"{index}: weight_map[{tensor!r}] = {name!r} is not a shard file name")
        files = []
        for name in sorted(set(weight_map.values())):
            file = self._inside(name, index)
            if not file.is_file():
                raise WeightsError(f"{file}: listed in {index.name} but missing (or not a file)")
            files.append(file)
        return files

    def _inside(self, name: str, listed_in: Path) -> Path:
        """Shard `name` under the checkpoint folder, refused if it (or a symlink) leads outside it. Hugging
        Face's hub cache links snapshots/<rev>/<file> to ../../blobs/<hash>: that folder is allowed too."""
        root = self.path.resolve()
        roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
        real = (self.path / name).resolve()
        if not any(real.is_relative_to(r) for r in roots):
            raise WeightsError(f"{listed_in}: shard {name!r} resolves to {real}, outside the checkpoint "
                               f"folder {root}")
        return self.path / name

    def _check_model(self) -> None:
        """config.json against the tensors, before a load allocates anything from it (offload.models.validate)."""
        from offload.models import architecture
        from offload.models.validate import check_args, check_config, check_tensors, model_args

        where = str(self.path / "config.json")
        check_config(self.config, len(self._where), where)
        arch = architecture(self.config.get("model_type"))
        args = model_args(arch, self.config, where)
        check_args(args, where)
        check_tensors(args, self, str(self.path))

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return tuple(self._info[name]["shape"])

    def _require(self, name: str) -> None:
        if name not in self._where:
            raise WeightsError(f"{self.path}: tensor {name} missing from the checkpoint")

    def _raw(self, name: str) -> torch.Tensor:
        file = self._where[name]
        try:
            if file not in self._handles:
                self._handles[file] = safe_open(str(file), framework="pt")
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError) as exc:  # what the header check cannot see (e.g. a dtype torch lacks)
            raise WeightsError(f"{file}: tensor {name}: {exc}") from None

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
            shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read tensor `name`, check its shape, dequantise FP8, cast to `dtype`, and place it on `device`."""
        self._require(name)
        if shape is not None and self.shape(name) != tuple(shape):
            raise WeightsError(f"{self.path}: tensor {name} has shape {list(self.shape(name))}, "
                               f"expected {list(shape)}")
        t = self._raw(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t = self._dequant_fp8(name, t, device)
        t = t.to(device=device, dtype=dtype or t.dtype)
        return t

    def _dequant_fp8(self, name: str, w: torch.Tensor, device) -> torch.Tensor:
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
        if scale_name not in self._where:
            raise WeightsError(f"{self.path}: FP8 tensor {name} has no {scale_name}")
        scale = self._raw(scale_name).to(device=device, dtype=torch.float32)  # (ceil(N/bn), ceil(K/bk))
        bn, bk = self.fp8_block
        n, k = w.shape
        expected = (-(-n // bn), -(-k // bk))
        if tuple(scale.shape) != expected:
            raise WeightsError(f"{self.path}: {scale_name} has shape {list(scale.shape)}, expected "
                               f"{list(expected)} for {bn}x{bk} blocks of {name} {list(w.shape)}")
        w = w.to(device).to(torch.float32)  # (N, K)
        full = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return w * full

    def close(self) -> None:
        self._handles.clear()
