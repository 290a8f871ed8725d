"""A GGUF file as a weight source for LoadContext: tensors by their Hugging Face names, expanded on read, or
as their ggml blocks straight from the mmapped bytes (`blocks`, the stacked routed experts `expert_blocks`),
for the loader to keep quantised where a kernel multiplies them (offload.models.loading).

E experts, I expert intermediate, H hidden, h heads, n nope dim, v value dim, c kv_lora_rank.
"""

import warnings

import numpy as np
import torch

from offload.errors import GGUFError, WeightsError
from offload.gguf.dequant_torch import dequantize_torch
from offload.kernels.cpu.dequant import FAST_TYPES
from offload.kernels.cpu.quantmm import dequantize as cpu_dequantize
from offload.gguf.names import EXPERTS, experts_layer, gguf_names
from offload.gguf.numerics import GGMLWeight
from offload.gguf.reader import GGUFFile
from offload.gguf.types import GGMLType


class GGUFSource:
    """`get/has/shape` by HF name (like offload.checkpoint.Checkpoint) over one GGUF (all its shards)."""

    def __init__(self, gguf: GGUFFile, act_quant: bool = False):
        self.gguf = gguf
        self.where = str(gguf.path)
        self.act_quant = act_quant  # round matmul inputs like llama.cpp (offload.gguf.numerics)

    # -- name resolution -------------------------------------------------------------------------------
    def _find(self, name: str) -> str | None:
        return next((g for g in gguf_names(name) if g in self.gguf.tensors), None)

    def _kv_b_parts(self, name: str) -> tuple[str, str] | None:
        if not name.endswith("self_attn.kv_b_proj.weight"):
            return None
        blk = gguf_names(name)[0].removesuffix("attn_kv_b.weight")
        k, v = blk + "attn_k_b.weight", blk + "attn_v_b.weight"
        return (k, v) if k in self.gguf.tensors and v in self.gguf.tensors else None

    def has(self, name: str) -> bool:
        return self._find(name) is not None or self._kv_b_parts(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        g = self._find(name)
        if g is not None:
            return self.gguf.tensors[g].np_shape
        parts = self._kv_b_parts(name)
        if parts is None:
            raise self._missing(name)
        kh, kc, kn = self.gguf.tensors[parts[0]].np_shape  # (h, c, n)
        vh, vv, vc = self.gguf.tensors[parts[1]].np_shape  # (h, v, c)
        return (kh * (kn + vv), kc)

    def _missing(self, name: str) -> WeightsError:
        return WeightsError(f"{self.where}: tensor {name} (GGUF {' or '.join(gguf_names(name)) or '-'}) "
                            "missing from the file")

    def _read(self, gname: str, device, dtype) -> torch.Tensor:
        info = self.gguf.tensors[gname]
        with warnings.catch_warnings():  # read-only mmap: nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(self.gguf.raw(gname))  # zero-copy view of the mmap
        try:
            if device.type == "cpu" and info.type == GGMLType.F32 and dtype == torch.float32:
                t = raw.view(torch.float32).view(info.np_shape)  # zero-copy: weights are only read
                return GGMLWeight.wrap(t, info.type) if self.act_quant and len(info.shape) >= 2 else t
            if device.type == "cpu" and len(info.shape) >= 2 and int(info.type) in FAST_TYPES:
                # numba, parallel over rows: ~4x faster than the torch path for the big embedding
                rows = info.n_elements // info.shape[0]
                t = cpu_dequantize(raw.numpy().reshape(rows, -1), int(info.type)).reshape(info.np_shape)
                t = t.to(dtype=dtype)
                return GGMLWeight.wrap(t, info.type) if self.act_quant else t
            if device.type == "cuda":  # expand on the GPU: copy the (small) quantised bytes over first
                raw = raw.to(device)
            t = dequantize_torch(raw, info.type, info.np_shape)
        except GGUFError as exc:
            raise GGUFError(f"{self.where}: tensor {gname!r}: {exc}") from None
        t = t.to(device=device, dtype=dtype)
        if self.act_quant and len(info.shape) >= 2:
            t = GGMLWeight.wrap(t, info.type)
        return t

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
            shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor `name` (HF naming) dequantised to `dtype` (default float32) on `device`."""
        device, dtype = torch.device(device), dtype or torch.float32
        if shape is not None and self.shape(name) != tuple(shape):
            raise WeightsError(f"{self.where}: tensor {name} (GGUF {self._find(name)}) has shape "
                               f"{list(self.shape(name))}, expected {list(shape)}")
        g = self._find(name)
        if g is not None:
            return self._read(g, device, dtype)
        parts = self._kv_b_parts(name)
        if parts is None:
            raise self._missing(name)
        # the converter split kv_b (h*(n+v), c) into k_b = W_UK^T (h, c, n) and v_b = W_UV (h, v, c)
        k_b = self._read(parts[0], device, torch.float32).transpose(1, 2)  # (h, n, c)
        v_b = self._read(parts[1], device, torch.float32)  # (h, v, c)
        if device.type == "cpu":  # numpy's transposing copy is ~15x faster than torch's here
            kv_b = torch.from_numpy(np.concatenate([k_b.numpy(), v_b.numpy()], axis=1))  # (h, n + v, c)
        else:
            kv_b = torch.cat([k_b, v_b], dim=1)  # (h, n + v, c)
        return kv_b.reshape(-1, kv_b.shape[-1]).to(dtype)

    def blocks(self, name: str, shape: tuple[int, int]) -> "tuple[np.ndarray, GGMLType] | None":
        """Matrix `name` (N, K) as its ggml blocks (N, row bytes), a zero-copy view of the mmap, and their type;
        None where the file does not hold it as one tensor of that shape (the caller reads it expanded)."""
        g = self._find(name)
        if g is None or self.shape(name) != tuple(shape):
            return None
        info = self.gguf.tensors[g]
        return self.gguf.raw(g).reshape(shape[0], -1), info.type

    def head_blocks(self, name: str) -> "tuple[tuple[np.ndarray, GGMLType], tuple[np.ndarray, GGMLType]] | None":
        """MLA's kv_b_proj `name` as the file's per-head blocks: W_UK^T (h, c, n bytes) and W_UV (h, v, c bytes),
        zero-copy views, and their types; None where the file holds no attn_k_b / attn_v_b."""
        parts = self._kv_b_parts(name)
        if parts is None:
            return None
        out = []
        for g in parts:
            info = self.gguf.tensors[g]
            out.append((self.gguf.raw(g).reshape(*info.np_shape[:2], -1), info.type))
        return tuple(out)

    # -- routed experts --------------------------------------------------------------------------------
    def has_expert_blocks(self, prefix: str) -> bool:
        layer = experts_layer(prefix)
        return layer is not None and f"blk.{layer}.{EXPERTS['gate']}" in self.gguf.tensors

    def expert_blocks(self, prefix: str, part: str, n_experts: int, rows: int, cols: int
                      ) -> tuple[np.ndarray, GGMLType]:
        """The `part` ("gate", "up", "down") matrices of layer `prefix`'s routed experts, stacked as the file
        stores them: (E, rows, row bytes) ggml blocks, mmapped, and their type."""
        gname = f"blk.{experts_layer(prefix)}.{EXPERTS[part]}"
        info = self.gguf.tensors.get(gname)
        if info is None:
            raise WeightsError(f"{self.where}: tensor {gname} missing from the file")
        e = info.np_shape[0]
        if len(info.shape) != 3 or info.np_shape[1:] != (rows, cols) or n_experts > e:
            raise WeightsError(f"{self.where}: tensor {gname} has shape {list(info.np_shape)}, "
                               f"expected [n_experts, {rows}, {cols}]")
        return self.gguf.raw(gname).reshape(e, rows, -1), info.type

    def close(self) -> None:
        pass  # the mmap stays alive while expert groups read from it
