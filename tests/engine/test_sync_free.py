"""A decode step reads nothing back from the device except the CPU experts' own transfer: run under a
TorchDispatchMode that notes every op that makes the host wait for the device (offload.graphs.host_read: .item(),
bool(), .tolist(); nonzero, unique, masked_select, bincount, boolean-mask indexing; device-to-host copies) and
where in offload it was called. On this CPU the layers live on a stand-in GPU home with the GPU-home code path
(sync_free groups); the MoE part (router, GPU-resident groups, the CPU group's hand-off, the sums) must be clean for
every architecture."""

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import offload
from offload.graphs import DecodeStep, host_read
from offload.kernels.cpu.experts import cpu_experts_factory
from offload.models.experts import STATIC_PAIRS, BlockExperts, ExpertBlocks, TorchExperts
from tests.engine.conftest import ARCHS
from tests.engine.test_homes import build

# where offload's files are: this checkout, or wherever the package was installed or copied (gpu_check.sh)
ROOTS = (Path(__file__).resolve().parents[2], Path(offload.__file__).resolve().parent.parent)
MOE_FILES = ("offload/models/moe.py", "offload/models/experts.py", "offload/runtime.py", "offload/staging.py",
             "kernels/cpu/experts.py")


class HostReads(TorchDispatchMode):
    """Notes (op, the innermost offload file:line that called it) for every host read."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        d2h = name in ("_to_copy", "copy_") and _d2h(func, args, kwargs)
        if host_read(func, args) or d2h:
            where = next((f"{w}:{f.lineno}" for f in reversed(traceback.extract_stack())
                          if (w := _offload_file(f.filename))), "?")
            self.found.append((name, where))
        return func(*args, **kwargs)


def _offload_file(filename: str) -> str | None:
    """"offload/models/moe.py", "kernels/cpu/experts.py", ... for a file of offload's; None for torch's, tests'."""
    for root in ROOTS:
        try:
            rel = Path(filename).relative_to(root)
        except ValueError:
            continue
        if rel.parts and rel.parts[0] in ("offload", "kernels", "gguf", "placement"):
            return str(rel).replace("offload/kernels/", "kernels/")
    return None


def _d2h(func, args, kwargs) -> bool:
    name = func._schema.name.split("::")[-1]
    if name == "copy_":
        dst, src = args[0], args[1]
        return src.device.type != "cpu" and dst.device.type == "cpu"
    dev = kwargs.get("device")
    return args[0].device.type != "cpu" and dev is not None and torch.device(dev).type == "cpu"


def mixed_sync_free(path, **kw):
    """Layers on the stand-in GPU gpu:0, experts alternating GPU / CPU (q8_0 on the native kernels), the GPU
    groups on their sync-free path."""
    model = build(path, cpu_experts_factory=cpu_experts_factory("q8_0"), layer_home=lambda i: "gpu:0",
                  placement=lambda layer, n: [("gpu", "cpu")[e % 2] for e in range(n)], **kw)
    for moe in model.moe_layers():
        for g in moe.groups:
            if hasattr(g, "sync_free"):
                g.sync_free = True
    return model


def decode_step_reads(model) -> list[tuple[str, str]]:
    cache = model.new_cache(16)
    model.forward(torch.tensor([3, 1, 4, 1, 5]), cache)  # prefill: may read the host
    with HostReads() as mode:
        model.forward(torch.tensor([9]), cache)
    return mode.found


@pytest.mark.parametrize("arch", ARCHS + ["llama", "qwen2", "qwen3"])
def test_a_decode_step_reads_nothing_back(arch, tiny_checkpoint):
    """The MoE part first (this issue's), then the whole step: attention, norms, embedding and head too
    (positions are still Python ints: no read, but not yet device tensors, so a captured graph would bake
    them in)."""
    found = decode_step_reads(mixed_sync_free(tiny_checkpoint(arch)))
    assert [f for f in found if f[1].startswith(MOE_FILES)] == []
    assert found == []


def static_step_reads(model) -> list[tuple[str, str]]:
    """The static decode step's body (offload.graphs.DecodeStep.run, what a CUDA graph captures) at two
    positions, the second past the tiny DSA checkpoint's index_topk (its selection active)."""
    cache = model.new_cache(16)
    model.forward(torch.tensor([3, 1, 4, 1, 5, 9, 2, 6]), cache)
    step = DecodeStep(model, cache)
    step(5)  # grows nothing, records (the CPU emulation: the step function itself)
    found = []
    for token in (3, 5):
        step.set_inputs([token], [cache.length])
        with HostReads() as mode:
            step.run()
        found += mode.found
        cache.length += 1
    return found


@pytest.mark.parametrize("arch", ARCHS + ["llama", "qwen2", "qwen3"])
def test_the_static_decode_step_reads_nothing_back(arch, tiny_checkpoint):
    """The whole static step (positions and lengths as device tensors, the cache written at the device
    position, attention masked by it; DSA's top-k over the whole key cache) reads nothing back."""
    assert static_step_reads(mixed_sync_free(tiny_checkpoint(arch))) == []


def test_the_mode_sees_the_old_grouped_path(tiny_checkpoint):
    """The grouped path (a prefill chunk's) does read the host: the mode notes it, in experts.py."""
    model = mixed_sync_free(tiny_checkpoint("qwen3_moe"))
    for moe in model.moe_layers():
        for g in moe.groups:
            if hasattr(g, "sync_free"):
                g.sync_free = False
    found = decode_step_reads(model)
    assert any(op in ("_unique2", "_local_scalar_dense", "nonzero") and where.startswith("offload/models/experts.py")
               for op, where in found), found


@pytest.mark.parametrize("t", [1, 3, STATIC_PAIRS // 2])
def test_sync_free_groups_equal_the_grouped_path(t):
    """The pair path (weights gathered by slot) against the per-expert path: float tensors and float32 blocks,
    some pairs on experts held elsewhere or marked -1."""
    g = torch.Generator().manual_seed(t)
    e, h, i, k = 6, 64, 32, 2
    dense = {j: tuple(torch.randn(*s, generator=g) / s[1] ** 0.5 for s in ((i, h), (i, h), (h, i))) for j in range(e)}
    x, ids, w = torch.randn(t, h, generator=g), torch.randint(-1, e, (t, k), generator=g), torch.rand(t, k, generator=g)
    held = [1, 2, 4]
    torch_group = TorchExperts(torch.device("cpu"), {j: dense[j] for j in held})
    mats = [ExpertBlocks(torch.stack([dense[j][m] for j in held]).numpy().view("uint8"), 0, (h, h, i)[m])
            for m in range(3)]
    block_group = BlockExperts(torch.device("cpu"), held, *mats)
    for group in (torch_group, block_group):
        want = group.submit(x, ids, w).wait()
        group.sync_free = True
        with HostReads() as mode:
            got = group.submit(x, ids, w).wait()
        assert mode.found == []
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
