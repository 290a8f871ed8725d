"""Triton kernels run in the interpreter on CPU tensors where there is no CUDA device (tests/conftest.py sets
TRITON_INTERPRET before anything imports triton)."""

import numpy as np
import pytest
import torch


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
