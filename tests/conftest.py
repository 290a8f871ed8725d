"""Without a CUDA device the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be set
before triton is first imported in the process, by anyone: torch imports it too (a TorchDispatchMode pulls in
torch._dynamo, which imports triton), and triton's own library functions (tl.zeros, tl.sum, ...) are fixed as
compiled or interpreted then. So it is set here, before any test runs."""

import os

import pytest

import offload  # noqa: F401  before torch, as the CLI runs: OMP_WAIT_POLICY=PASSIVE must precede libgomp's load
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _no_quietly_unrecorded_steps():
    """A decode step whose recording fails runs op by op with a warning (offload.graphs): in a test that is a
    failure, never a quiet pass of the step function against itself."""
    import sys

    graphs = sys.modules.get("offload.graphs")
    before = len(graphs.RECORD_FAILURES) if graphs else 0
    yield
    graphs = sys.modules.get("offload.graphs")
    if graphs is not None:
        failed = graphs.RECORD_FAILURES[before:]
        assert not failed, f"a decode step was not recorded: {failed}"
