"""Random valid weights in every format the Triton kernels take, with scales that keep products far from
overflow (ggml blocks: random bytes, fp16 scales ~U(0.002, 0.02) with random sign)."""

import numpy as np
import torch

from offload.gguf.testing import F16_SCALE_OFFSETS, random_blocks
from offload.gguf.types import GGMLType, block_format
from offload.kernels.gpu.formats import FP8_BLOCK

GGML = [GGMLType.Q8_0, GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
        GGMLType.IQ4_XS]
ALL = [*map(int, GGML), int(GGMLType.BF16), FP8_BLOCK]


def fmt_name(fmt: int) -> str:
    return "FP8_BLOCK" if fmt == FP8_BLOCK else GGMLType(fmt).name


def weight(fmt: int, rows: int, k: int, rng: np.random.Generator, lead: tuple = ()):
    """(bytes (*lead, rows, row bytes) uint8, FP8 scales (*lead, ceil(rows/128), ceil(k/128)) or None)."""
    n_mat = int(np.prod(lead, dtype=np.int64))
    if fmt == FP8_BLOCK:
        raw = rng.integers(0, 256, (*lead, rows, k), dtype=np.uint8)
        raw[(raw & 0x7F) == 0x7F] ^= 1  # e4m3's NaN patterns -> the neighbouring finite value
        scales = rng.uniform(2e-4, 2e-3, (*lead, -(-rows // 128), -(-k // 128))).astype(np.float32)
        return torch.from_numpy(raw), torch.from_numpy(scales)
    if fmt == GGMLType.BF16:
        w = torch.from_numpy(rng.standard_normal((*lead, rows, k), dtype=np.float32)).bfloat16()
        return w.view(torch.uint8).contiguous(), None
    t = block_format(fmt)
    n = n_mat * rows * k // t.block_size
    raw = random_blocks(fmt, n, rng)
    for off in F16_SCALE_OFFSETS.get(t.type, ()):
        d = (rng.uniform(0.002, 0.02, n) * rng.choice([-1, 1], n)).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(n, 2)
    return torch.from_numpy(raw.reshape(*lead, rows, -1)), None
