"""Overlap, exact: a GPU layer's CPU expert group runs on the worker thread while the runtime computes the shared
expert and the GPU-resident groups, and the partials are summed in the same order as without overlap, so the
logits are bit-identical (torch.equal) for every architecture, with random delays injected into the worker.
On this CPU the layers live on a stand-in GPU home (a distinct CPU device, as in test_homes): the runtime
thread stands in for the GPU stream, the experts' worker thread is the real one."""

import random
import threading
import time

import pytest
import torch

from offload.kernels.cpu.experts import CpuExpertGroup, cpu_experts_factory
from offload.models.moe import ExpertGroupError
from offload.staging import Staging
from tests.engine.conftest import ARCHS
from tests.engine.test_homes import build, run
from tests.gguf.fixtures_models import gguf_models  # noqa: F401  (session fixture)

DENSE = ["llama", "qwen2", "qwen3"]


def mixed() -> dict:
    """Every layer on the stand-in GPU gpu:0, its routed experts alternating between that GPU and the CPU."""
    return dict(layer_home=lambda i: "gpu:0", placement=lambda layer, n: [("gpu", "cpu")[e % 2] for e in range(n)])


@pytest.fixture
def record_runs(monkeypatch):
    """Wraps CpuExpertGroup._run: which thread ran each call, after a random delay of 0-3 ms on the worker (the
    order in which things finish must not matter)."""
    threads = []
    original = CpuExpertGroup._run
    rng = random.Random(0)

    def run_(self, x, ids, weights):
        threads.append(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            time.sleep(rng.uniform(0, 0.003))
        return original(self, x, ids, weights)

    monkeypatch.setattr(CpuExpertGroup, "_run", run_)
    return threads


def overlapped_and_serial(model, ids: list[int], n_prefill: int, threads: list) -> tuple:
    """(logits with overlap, logits without, the threads each ran the CPU groups on)."""
    model.runtime.overlap = False
    serial = run(model, ids, n_prefill)
    serial_threads = set(threads)
    threads.clear()
    model.runtime.overlap = True
    overlapped = run(model, ids, n_prefill)
    return overlapped, serial, serial_threads, set(threads)


@pytest.mark.parametrize("arch", ARCHS + DENSE)
def test_overlap_gives_identical_logits(arch, tiny_checkpoint, record_runs):
    model = build(tiny_checkpoint(arch), cpu_experts_factory=cpu_experts_factory("q8_0"), **mixed())
    ids = torch.randint(0, model.args.vocab_size, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    got, want, serial_threads, overlap_threads = overlapped_and_serial(model, ids, 8, record_runs)
    assert torch.equal(got, want)
    moes = model.moe_layers()
    assert (arch in DENSE) == (not moes)
    if moes:
        kinds = [type(g).__name__ for g in moes[0].groups]
        assert kinds == ["TorchExperts", "CpuExpertGroup"], kinds  # one GPU-resident group, one CPU group
        assert serial_threads == {"MainThread"}
        assert overlap_threads and all(t.startswith("offload-cpu-experts") for t in overlap_threads)
        if len(moes) > 1:  # both parities' staging buffers in use
            assert all(slot.bufs for slot in model.runtime.staging.slots)


def test_overlap_of_a_gguf_with_the_shared_expert_in_the_cpu_call(gguf_models, record_runs):  # noqa: F811
    """GGUF expert blocks: the CPU group is the fused native kernel, which also takes the shared expert."""
    path = gguf_models.path("glm_moe_dsa", "Q8_0")
    ids = gguf_models.prompt_ids("glm_moe_dsa", "Q8_0")[:14]
    model = build(path, **mixed())
    got, want, _, overlap_threads = overlapped_and_serial(model, ids, 10, record_runs)
    assert torch.equal(got, want)
    assert overlap_threads and all(t.startswith("offload-cpu-experts") for t in overlap_threads)


def test_the_shared_expert_runs_while_the_cpu_group_is_in_flight(tiny_checkpoint):
    """A handshake, no clock: the CPU group (worker) waits until the shared expert (runtime thread) has
    started, and the shared expert until the CPU group has; run one after the other, either would time out."""
    model = build(tiny_checkpoint("glm4_moe"), cpu_experts_factory=cpu_experts_factory("q8_0"), **mixed())
    moe = model.moe_layers()[0]
    group = next(g for g in moe.groups if isinstance(g, CpuExpertGroup))
    worker_in, shared_in = threading.Event(), threading.Event()
    run_, shared = group._run, moe.shared

    def cpu_part(x, ids, weights):
        worker_in.set()
        assert shared_in.wait(10), "the shared expert did not start while the CPU group ran"
        return run_(x, ids, weights)

    def shared_part(x):
        shared_in.set()
        assert worker_in.wait(10), "the CPU group was not running while the shared expert ran"
        return shared(x)

    want = run(model, [1, 2, 3], 2)
    group._run, moe.shared = cpu_part, shared_part
    assert torch.equal(run(model, [1, 2, 3], 2), want)


def test_a_failure_on_the_worker_surfaces_at_wait_naming_the_layer(tiny_checkpoint):
    model = build(tiny_checkpoint("glm4_moe"), cpu_experts_factory=cpu_experts_factory("q8_0"), **mixed())
    moe = model.moe_layers()[-1]
    group = next(g for g in moe.groups if isinstance(g, CpuExpertGroup))

    def boom(x, ids, weights):
        assert threading.current_thread() is not threading.main_thread()
        raise ValueError("no such expert")

    group._run = boom
    with pytest.raises(ExpertGroupError, match=f"layer {moe.layer_idx}: expert group CpuExpertGroup on cpu failed: "
                                               "ValueError: no such expert"):
        run(model, [1, 2, 3], 3)
    del group._run  # the same model runs again once the group is well
    model.runtime.overlap = False
    want = run(model, [1, 2, 3], 3)
    model.runtime.overlap = True
    assert torch.equal(run(model, [1, 2, 3], 3), want)


def test_staging_slots_alternate_and_grow():
    staging = Staging()
    assert staging.slot(4) is staging.slot(0) and staging.slot(3) is staging.slot(1)
    assert staging.slot(0) is not staging.slot(1)
    slot = staging.slot(0)
    a = slot.to_host("x", torch.arange(6.0).view(2, 3))
    assert torch.equal(a, torch.arange(6.0).view(2, 3))
    b = slot.to_host("x", torch.ones(1, 3))  # smaller: the same storage
    assert b.data_ptr() == a.data_ptr() and torch.equal(b, torch.ones(1, 3))
    c = slot.to_host("x", torch.zeros(4, 3))  # larger: grown
    assert c.shape == (4, 3) and slot.bufs["x"].numel() == 12
    assert slot.pin == torch.cuda.is_available()


def test_load_takes_overlap(gguf_models):  # noqa: F811
    import offload

    path = gguf_models.path("qwen3_moe", "Q8_0")
    for flag in (True, False):
        llm = offload.load(path, device="cpu", placement="cpu", progress=False, overlap=flag)
        assert llm.model.runtime.overlap is flag


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_overlap_on_a_gpu_is_exact(arch, tiny_checkpoint, record_runs):
    """For real: layers on the GPU, half the experts in a CPU group (q8_0 on the native kernels) started on the
    worker thread, its inputs copied into pinned buffers behind an event."""
    import offload

    half = {i: ["gpu", "cpu"] * 4 for i in range(8)}
    llm = offload.load(tiny_checkpoint(arch), device="cuda", dtype="float32", progress=False, placement=half,
                       expert_quant="q8_0", overlap=False)
    ids = list(range(5, 30))
    want = llm.logits(ids)
    assert set(record_runs) == {"MainThread"}
    record_runs.clear()
    llm.model.runtime.overlap = True
    got = llm.logits(ids)
    assert torch.equal(got, want)
    assert record_runs and all(t.startswith("offload-cpu-experts") for t in record_runs)
    slot = llm.model.runtime.staging.slot(0)
    assert slot.pin and all(b.is_pinned() for b in slot.bufs.values())
