"""GGML tensor types and GGUF metadata value types: ids, names and block sizes (facts from ggml.h).

The one table of ggml types: the GGUF reader, the numpy reference quants, the CPU kernels
(offload.kernels.cpu.dequant / .native) and the planner (offload.placement.quant) all read their block
sizes and type ids from here; tests/gguf/test_types.py checks it against gguf-py's GGML_QUANT_SIZES.
Standard library only (never torch): offload.placement imports it.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

QK_K = 256  # super-block size of the k-quants and i-quants


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


@dataclass(frozen=True)
class BlockFormat:
    """How one ggml type packs elements: `block_size` elements in `type_size` bytes."""

    type: GGMLType
    block_size: int
    type_size: int  # bytes per block

    @property
    def id(self) -> int:
        return int(self.type)

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def bytes_per_weight(self) -> float:
        return self.type_size / self.block_size

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 4 + 4 + 32),
    GGMLType.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    GGMLType.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    GGMLType.Q8_K: (QK_K, 4 + QK_K + QK_K // 8),
    GGMLType.IQ2_XXS: (QK_K, 2 + QK_K // 4),
    GGMLType.IQ2_XS: (QK_K, 2 + QK_K // 4 + QK_K // 32),
    GGMLType.IQ2_S: (QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 32),
    GGMLType.IQ3_XXS: (QK_K, 2 + QK_K // 4 + QK_K // 8),
    GGMLType.IQ3_S: (QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + QK_K // 64),
    GGMLType.IQ1_S: (QK_K, 2 + QK_K // 8 + QK_K // 16),
    GGMLType.IQ1_M: (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    GGMLType.IQ4_NL: (32, 2 + 16),
    GGMLType.IQ4_XS: (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),
    GGMLType.TQ1_0: (QK_K, 2 + 4 * 13),
    GGMLType.TQ2_0: (QK_K, 2 + 64),
    GGMLType.MXFP4: (32, 1 + 16),
}

BLOCK_FORMATS: dict[int, BlockFormat] = {int(t): BlockFormat(t, *s) for t, s in _SIZES.items()}

# Types the native CPU kernels lack, rewritten losslessly once at load as one they have (kernels/cpu/weights.py
# as_native): the CPU computes and reads them in that type, with its block size (IQ4_NL as Q8_0: 34 / 18 bytes).
CPU_COMPUTE_TYPE: dict[int, int] = {int(GGMLType.IQ4_NL): int(GGMLType.Q8_0)}


def block_format(qtype: "int | str | GGMLType") -> BlockFormat:
    """The block layout of a ggml type given by id, enum or name ("Q4_K"); KeyError if unknown."""
    if isinstance(qtype, str):
        qtype = GGMLType[qtype.upper()]
    return BLOCK_FORMATS[int(qtype)]


def block_sizes(qtypes: "Iterable[int | str | GGMLType]") -> dict[int, tuple[int, int]]:
    """{type id: (block_size, type_size)} of the given types: how a kernel keys its own list of the types it
    handles without restating their sizes."""
    return {f.id: (f.block_size, f.type_size) for f in map(block_format, qtypes)}


class ValueType(IntEnum):
    """GGUF metadata value types (gguf.md)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12
