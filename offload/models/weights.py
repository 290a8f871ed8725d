"""A weight is an object that knows its matmul, chosen once at load (as mlx-lm's nn.quantize swaps a layer's
matmul): the models call `w(x)` (F.linear with the weight's bias) and, for an embedding table, `w.rows(ids)`,
and never ask what the weight is. Every weight also has `.device` (where its input must be).

Kinds: `Linear`, a float tensor on a device, offload.kernels.cpu.weights.QuantWeight, ggml blocks on the native
CPU kernels, and offload.kernels.gpu.weights.TritonQuantWeight, ggml blocks on a GPU's Triton kernels.
`linears` and `mlp` pick, also at load, the fused forms for weights that share an input.

M rows, K inputs, N outputs.
"""

import sys

import torch
import torch.nn.functional as F

from offload.models.base import MLP


class Linear:
    """A float matrix (N, K) and optional bias (N,) on one device."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.device = weight.device

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., K) -> (..., N)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)  # (T,) -> (T, K)


class Linears:
    """[w(x) for w in ws]: matrices that share their input (q / k / v), one call each."""

    def __init__(self, ws: list):
        self.ws = ws

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [w(x) for w in self.ws]


def _quant_kernels():
    """offload.kernels.cpu.weights where a QuantWeight exists (its module is imported then), else None: a model
    of float weights never imports the CPU kernels (numba)."""
    return sys.modules.get("offload.kernels.cpu.weights")


def linears(ws: list):
    """The call for matrices that share their input: one native call when all are quantised CPU matrices."""
    k = _quant_kernels()
    return k.QuantLinears(ws) if k is not None and k.native_rows(ws) else Linears(ws)


def mlp(gate, up, down):
    """A SwiGLU MLP over these weights: one native call when all three are quantised CPU matrices."""
    k = _quant_kernels()
    return k.QuantMLP(gate, up, down) if k is not None and k.native_rows((gate, up, down)) else MLP(gate, up, down)
