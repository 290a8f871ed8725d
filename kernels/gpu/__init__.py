"""Triton kernels for weights that stay in their storage format on the GPU (ggml blocks, bf16, FP8 blocks):
the dense GEMV / GEMM (gemm.py), the grouped MoE for GPU-resident experts (moe.py), and the weight that knows
its matmul (weights.py). Imported as offload.kernels.gpu.

Without a CUDA device the kernels run in Triton's interpreter on CPU tensors (tests, dry runs). The interpreter
is chosen when `@triton.jit` runs, so TRITON_INTERPRET is set here, before any kernel module is imported.
"""

import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    if "triton.language" in sys.modules:  # its library functions were made compiled: the interpreter would fail
        raise RuntimeError("the Triton kernels need TRITON_INTERPRET=1 without a CUDA device, set before triton is "
                           "first imported (torch's dynamo imports it): set it in the environment")
    os.environ["TRITON_INTERPRET"] = "1"
