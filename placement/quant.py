"""Bytes per weight for every storage type the planner knows, and the per-class quant scheme.

Every ggml type's block size and bytes per block come from the one type table (offload.gguf.types, pure
Python); this module adds only the storage types ggml does not have (FP8 checkpoints).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from offload.errors import ConfigError
from offload.gguf.types import BLOCK_FORMATS, CPU_COMPUTE_TYPE, GGMLType

# name -> (weights per block, bytes per block): every ggml type of the table, then the non-ggml ones
QUANT_BLOCKS: dict[str, tuple[int, int]] = {
    f.name: (f.block_size, f.type_size) for f in BLOCK_FORMATS.values()}
# FP8 checkpoints (DeepSeek-V3 style): 1 byte per weight + one fp32 scale per 128x128 block.
QUANT_BLOCKS["FP8"] = (128 * 128, 128 * 128 + 4)

# The types the CLI offers for a tensor class (the list); others are accepted too.
CHOICES = ("BF16", "FP8", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ2_XXS", "IQ1_S")

# Tensor classes of the inventory (placement/model.py) that take a quant choice.
QUANT_CLASSES = ("embeddings", "attention", "dense_ffn", "shared_experts", "routed_experts", "lm_head")


def normalize(name: str) -> str:
    """'q4_k' / 'Q4_K_M' / 'fp8' -> canonical table key; raises ConfigError for unknown types."""
    key = name.strip().upper().replace("-", "_")
    if re.fullmatch(r"Q\d_K_[SML]", key):  # llama.cpp's file-type names: Q4_K_M -> Q4_K
        key = key[:4]
    if key in ("FP8_E4M3", "F8_E4M3", "FP8_E4M3FN"):
        key = "FP8"
    if key not in QUANT_BLOCKS:
        raise ConfigError(f"unknown quant type {name!r}: expected one of {', '.join(CHOICES)}")
    return key


def bytes_per_weight(qtype: str) -> float:
    """Average bytes per weight of a storage type (4.5 bits -> 0.5625)."""
    block, size = QUANT_BLOCKS[normalize(qtype)]
    return size / block


def tensor_bytes(n_params: int, qtype: str) -> int:
    """Bytes of n_params weights stored as qtype (whole blocks)."""
    block, size = QUANT_BLOCKS[normalize(qtype)]
    return -(-n_params // block) * size


def held_on_cpu(qtype: str) -> tuple[str, float]:
    """The type the CPU holds and computes a stored type in (gguf.types.CPU_COMPUTE_TYPE: IQ4_NL rewritten as Q8_0
    at load) and its bytes per stored byte (1.89 for IQ4_NL, 1.0 for every type the kernels take as stored)."""
    if qtype not in GGMLType.__members__ or int(GGMLType[qtype]) not in CPU_COMPUTE_TYPE:
        return qtype, 1.0
    src = BLOCK_FORMATS[int(GGMLType[qtype])]
    dst = BLOCK_FORMATS[CPU_COMPUTE_TYPE[int(GGMLType[qtype])]]
    return dst.name, (dst.type_size / dst.block_size) / (src.type_size / src.block_size)


@dataclass
class QuantScheme:
    """Storage type per tensor class. `measured` holds bytes per weight read from a GGUF file's
    tensor table, which wins over the named type (GGUF mixes types inside one class)."""

    types: dict[str, str]
    measured: dict[str, float] = field(default_factory=dict)
    mix: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> {type: share of its bytes} (GGUF)
    # class -> layer -> (bytes stored, bytes a GPU home holds: placement.held) from a GGUF's tensor table;
    # layer -1 holds the embedding table and the head (+ final norm)
    layers: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    # class -> layer -> (bytes, float elements) a CPU home holds (placement.held.cpu_bytes), same keys
    cpu_layers: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    cpu_float: int = 2  # bytes of a float on a CPU-only load: 4 for a GGUF (float32, as llama.cpp computes)

    def layer_bytes(self, cls: str, layer: int) -> tuple[int, int] | None:
        """(stored, held on a GPU) bytes of class `cls` in `layer` as the file has them, or None (no file)."""
        return self.layers.get(cls, {}).get(layer)

    def cpu_layer_bytes(self, cls: str, layer: int) -> tuple[int, int] | None:
        """(bytes, float elements) a CPU home holds of class `cls` in `layer`, or None (no file)."""
        return self.cpu_layers.get(cls, {}).get(layer)

    def shares(self, cls: str) -> dict[str, float]:
        """The storage types of a class and their shares of its bytes (a GGUF mixes types inside a class)."""
        return self.mix.get(cls) or {self.label(cls): 1.0}

    def bytes_per_weight(self, cls: str) -> float:
        if cls in self.measured:
            return self.measured[cls]
        if cls in ("norms", "router"):  # kept in fp32 by every loader (routers need fp32 logits)
            return 4.0
        return bytes_per_weight(self.types.get(cls, "BF16"))

    def cpu_growth(self, cls: str) -> float:
        """Bytes the CPU holds per stored byte of a class: its IQ4_NL share is held as Q8_0 (held_on_cpu)."""
        return sum(f * held_on_cpu(t)[1] for t, f in self.shares(cls).items())

    def label(self, cls: str) -> str:
        if cls in ("norms", "router"):
            return "F32"
        return self.types.get(cls, "BF16")

    def to_json(self) -> dict:
        return {"types": dict(self.types), "measured_bytes_per_weight": dict(self.measured),
                "bytes_by_type": {c: dict(m) for c, m in self.mix.items()}}


def default_scheme(overrides: dict[str, str] | None = None) -> QuantScheme:
    """The default for a workstation: routed experts Q4_K (the size people run these models at),
    everything read per token on the GPU at Q8_0 (near-lossless, half of BF16)."""
    types = {
        "embeddings": "Q8_0",
        "attention": "Q8_0",
        "dense_ffn": "Q8_0",
        "shared_experts": "Q8_0",
        "routed_experts": "Q4_K",
        "lm_head": "Q8_0",
        "mtp": "Q8_0",
    }
    for cls, q in (overrides or {}).items():
        if cls not in types:
            raise ConfigError(f"unknown tensor class {cls!r} for a quant choice: expected one of {', '.join(types)}")
        types[cls] = normalize(q)
    return QuantScheme(types)
