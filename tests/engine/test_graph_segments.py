"""The decode step of a model with CPU experts recorded as segments cut at the CPU expert calls (offload.graphs):
per MoE layer [.. attention, router, copies to the pinned buffers], start the CPU group, [shared + GPU experts],
wait for it. On this CPU the layers, embedding and head live on a stand-in GPU home and the recording is the
dispatch-level emulation (Emulated): replays run the recorded ops on the same tensors, so a position baked in at
record time stays baked, as in a CUDA graph. Replays on updated buffers must equal the eager decode."""

import threading

import pytest
import torch

from offload.graphs import DecodeStep, Emulated, capture_blocker
from offload.kernels.cpu.experts import CpuExpertGroup, cpu_experts_factory
from offload.models.moe import ExpertGroupError
from tests.engine.conftest import ARCHS
from tests.engine.test_graph_step import NEXT, PROMPT, BakedStep, eager_logits, max_error, replayed_logits
from tests.engine.test_homes import build
from tests.engine.test_sync_free import mixed_sync_free
from tests.gguf.fixtures_models import gguf_models  # noqa: F401  (session fixture)


def stand_in_gpu(path, **kw):
    """Everything on the stand-in GPU gpu:0 (the embedding and head too) but half of each layer's routed experts
    (a q8_0 CPU group on the native kernels); the GPU groups on their sync-free path."""
    return mixed_sync_free(path, embed_home="gpu:0", head_home="gpu:0", **kw)


class Unrecorded(DecodeStep):
    """The static step function itself at every call (what a model the recording cannot hold runs)."""

    def record(self):
        self.capacities = self.held()
        self.recorded = self.run
        return self.recorded


@pytest.mark.parametrize("arch", ARCHS)
def test_segmented_replays_equal_eager(arch, tiny_checkpoint):
    """Replays equal the static step run op by op exactly, and the eager decode: to 1e-5, but for one token of
    the DSA model (8e-3): the CPU group rounds its input to 8 bits (q8_0), and the static step's attention over
    the masked capacity differs from eager's by ~1e-7, enough to move a value across a rounding edge."""
    model = stand_in_gpu(tiny_checkpoint(arch))
    assert capture_blocker(model) is None, capture_blocker(model)
    want = eager_logits(model, NEXT)
    unrecorded = replayed_logits(model, Unrecorded, NEXT)
    assert max_error(replayed_logits(model, DecodeStep, NEXT), unrecorded) == 0
    assert max_error(unrecorded, want) < (1e-2 if arch == "glm_moe_dsa" else 1e-5)
    assert max_error(replayed_logits(model, BakedStep, NEXT), unrecorded) > 1e-3


class LengthStep(DecodeStep):
    """A broken step body: the position taken from the cache's Python length (no device read, so nothing refuses
    it); recorded, it stays the record-time position."""

    def run(self, host=None):
        pos = torch.tensor([c.length for c in self.caches])
        kw = {} if host is None else {"host": host}
        return self.model.runtime.step_static(self.tokens, pos, self.caches, **kw)


def test_the_emulation_keeps_a_python_position_baked(tiny_checkpoint):
    """Run op by op that body is right; recorded, its replays are wrong (as a CUDA graph's would be)."""
    model = stand_in_gpu(tiny_checkpoint("qwen3_moe"))
    unrecorded = replayed_logits(model, Unrecorded, NEXT)
    assert max_error(eager_step_of(model, LengthStep), unrecorded) < 1e-6
    assert max_error(replayed_logits(model, LengthStep, NEXT), unrecorded) > 1e-3


def eager_step_of(model, cls) -> list:
    """cls's step body run at each position without recording."""
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = cls(model, cache)
    out = []
    for t in NEXT:
        for layer in cache.layers:
            layer.reserve(cache.length + 1)
        step.set_inputs([t], [cache.length])
        out.append(step.run())
        cache.length += 1
    return out


def test_the_recording_is_cut_at_each_cpu_group(tiny_checkpoint):
    """Two host calls per MoE layer (start, wait), made on the worker thread at every replay; the ops between
    are replayed, not re-run in Python (a replay adds no recorded op)."""
    model = stand_in_gpu(tiny_checkpoint("glm4_moe"))
    threads = []
    run_ = CpuExpertGroup._run

    def spy(self, x, ids, weights):
        threads.append(threading.current_thread().name)
        return run_(self, x, ids, weights)

    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = DecodeStep(model, cache)
    CpuExpertGroup._run = spy
    try:
        step(NEXT[0])
        assert step.segments == 1 + 2 * len(model.moe_layers())
        threads.clear()
        step(NEXT[1])  # a replay
    finally:
        CpuExpertGroup._run = run_
    assert len(threads) == len(model.moe_layers())
    assert all(t.startswith("offload-cpu-experts") for t in threads)


def test_overlap_off_replays_the_same(tiny_checkpoint):
    model = stand_in_gpu(tiny_checkpoint("deepseek_v3"))
    want = replayed_logits(model, DecodeStep, NEXT)
    model.runtime.overlap = False
    assert max_error(replayed_logits(model, DecodeStep, NEXT), want) == 0


def test_a_failure_in_a_replayed_host_call_names_the_layer(tiny_checkpoint):
    model = stand_in_gpu(tiny_checkpoint("qwen3_moe"))
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = DecodeStep(model, cache)
    step(NEXT[0])  # recorded
    moe = model.moe_layers()[-1]
    group = next(g for g in moe.groups if isinstance(g, CpuExpertGroup))

    def boom(x, ids, weights):
        raise ValueError("no such expert")

    group._run = boom
    with pytest.raises(ExpertGroupError, match=f"layer {moe.layer_idx}: expert group CpuExpertGroup on cpu failed"):
        step(NEXT[1])


def test_the_emulation_refuses_a_host_read():
    """What a CUDA graph capture cannot hold, the emulation refuses at record time."""
    x = torch.arange(4.0)
    with pytest.raises(RuntimeError, match="reads the device from the host"):
        Emulated().record(lambda host: x[x > 1].sum() + int(x.sum()))


def test_the_emulation_replays_ops_not_python():
    """A value read into Python at record time is replayed as it was then; tensor ops see the new inputs."""
    buf = torch.zeros(2)
    rec = Emulated()
    baked = float(1.0 + 2.0)
    out = rec.record(lambda host: buf * 2 + torch.tensor([baked, 0.0]))
    buf.copy_(torch.tensor([5.0, 7.0]))
    assert torch.equal(rec.replay(out), torch.tensor([13.0, 14.0]))


def test_native_weights_block_the_recording(gguf_models):  # noqa: F811
    """A GGUF on the CPU: its attention weights are native kernels (host work a recording would miss): the step
    runs as it is, and says why."""
    model = build(gguf_models.path("qwen3_moe", "Q8_0"))
    blocker = capture_blocker(model)
    assert blocker is not None and ("QuantWeight" in blocker or "QuantLinears" in blocker or "QuantMLP" in blocker
                                    or "not sync-free" in blocker), blocker


@pytest.mark.skipif(torch.cuda.is_available(), reason="the stand-in's Triton interpreter, which CUDA does not select")
def test_triton_weights_decode_without_host_reads_and_block_the_emulation(gguf_models):  # noqa: F811
    """A GGUF on the stand-in GPU with its blocks on the Triton kernels (the interpreter here): its decode step
    reads nothing back (what a CUDA graph needs), but the emulation cannot see kernels the interpreter runs in
    Python, so off a GPU they block the recording."""
    from tests.engine.test_sync_free import HostReads

    model = build(gguf_models.path("qwen3_moe", "Q4_K_M"), triton=True, layer_home=lambda i: "gpu:0",
                  embed_home="gpu:0", head_home="gpu:0")
    assert "TritonQuantWeight" in capture_blocker(model)
    cache = model.new_cache(16)
    model.forward(torch.tensor([3, 1, 4]), cache)
    with HostReads() as mode:
        model.forward(torch.tensor([9]), cache)
    # the embedding's token-id range check reads ids on the host only where they are CPU tensors (this stand-in);
    # on a GPU that branch clamps instead
    import inspect

    from offload.kernels.gpu.weights import TritonQuantWeight

    src, first = inspect.getsourcelines(TritonQuantWeight.rows)
    check = f"kernels/gpu/weights.py:{first + next(i for i, line in enumerate(src) if 'int(ids.min())' in line)}"
    assert [f for f in mode.found if f[1] != check] == [], mode.found


def test_a_layer_whose_experts_all_live_on_the_cpu_is_cut_once(tiny_checkpoint):
    """Qwen3-MoE (no shared expert) with every routed expert on the CPU: nothing runs beside the CPU group, so
    one host call starts and finishes it (no empty segment between two), and replays equal the step run op by op."""
    model = build(tiny_checkpoint("qwen3_moe"), cpu_experts_factory=cpu_experts_factory("q8_0"),
                  layer_home=lambda i: "gpu:0", embed_home="gpu:0", head_home="gpu:0",
                  placement=lambda layer, n: ["cpu"] * n)
    assert capture_blocker(model) is None, capture_blocker(model)
    unrecorded = replayed_logits(model, Unrecorded, NEXT)
    assert max_error(replayed_logits(model, DecodeStep, NEXT), unrecorded) == 0
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = DecodeStep(model, cache)
    step(NEXT[0])
    assert step.segments == 1 + len(model.moe_layers())
