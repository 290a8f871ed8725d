"""Triton kernels run in the interpreter on CPU tensors where there is no CUDA device. The interpreter is chosen
when a kernel's `@triton.jit` runs, so the variable is set before any test module imports offload.kernels.gpu
(which sets it too, for imports from elsewhere)."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng(request):
    # fresh data every run; the seed is printed so a failure can be replayed
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed={seed}")
    return np.random.default_rng(seed)


@pytest.fixture
def device():
    """Where the kernels' tensors live: the GPU when there is one, else the interpreter's CPU tensors."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
