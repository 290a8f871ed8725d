"""Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be set
before triton is first imported in the process, by anyone: torch imports it too (a TorchDispatchMode pulls in
torch._dynamo, which imports triton), and triton's own library functions (tl.zeros, tl.sum, ...) are fixed as
compiled or interpreted then. So it is set here, before any test runs."""

import os

import offload  # noqa: F401  before torch, as the CLI runs: OMP_WAIT_POLICY=PASSIVE must precede libgomp's load
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
