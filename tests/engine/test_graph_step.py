"""The static decode step (offload.graphs.DecodeStep, Runtime.step_static): positions and lengths in device
tensors, caches preallocated and written at the device position, recorded once and replayed on buffers
updated in place. On the CPU, replay calls the recorded step function on the same buffers; it must equal the
eager decode at every position, and a recording that bakes the position in as a Python value must not."""

import pytest
import torch

import offload
from offload.graphs import DecodeStep, capture_blocker
from tests.engine.conftest import ARCHS
from tests.engine.test_homes import build

ALL = ARCHS + ["llama", "qwen2", "qwen3"]
PROMPT = [3, 1, 4, 1, 5]
NEXT = [9, 2, 6, 5, 3, 5, 8]  # past the tiny DSA checkpoint's index_topk (8): its selection is active


def eager_logits(model, tokens):
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    return [model.forward(torch.tensor([t]), cache) for t in tokens]


def replayed_logits(model, step_cls, tokens):
    """Record once (at the first decode position), then for each token update the buffers in place and replay."""
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = step_cls(model, cache)
    for layer in cache.layers:
        layer.reserve(cache.length + len(tokens))  # the capacity fixed before recording
    step.set_inputs(tokens[:1], [cache.length])
    replay = step.record()
    out = []
    for t in tokens:
        step.set_inputs([t], [cache.length])
        out.append(replay())
        cache.length += 1
    return out


class BakedStep(DecodeStep):
    """A broken recording: the position read once at record time, as a captured Python int would be."""

    def record(self):
        baked = [int(p) for p in self.pos]
        self.recorded = lambda: self.model.runtime.step_static(self.tokens, torch.tensor(baked), self.caches)
        return self.recorded


def max_error(got, want) -> float:
    return max((g - w).abs().max().item() for g, w in zip(got, want))


@pytest.mark.parametrize("arch", ALL)
def test_decode_step_equals_eager(arch, tiny_checkpoint):
    """DecodeStep(token) step by step, growing its cache outside the step, equals model.forward's decode."""
    model = build(tiny_checkpoint(arch))
    want = eager_logits(model, NEXT)
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = DecodeStep(model, cache)
    got = [step(t) for t in NEXT]
    assert cache.length == len(PROMPT) + len(NEXT)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "glm_moe_dsa"])
def test_a_batch_of_sequences_equals_each_alone(arch, tiny_checkpoint):
    """Three sequences at different lengths in one static step (one recording for B = 3; a cache that grows
    mid-way, moving its tensors, makes it record again): each row equals that sequence's own eager decode."""
    model = build(tiny_checkpoint(arch))
    prompts = [PROMPT, PROMPT[:2], PROMPT + [7, 7, 7, 7]]
    want, caches = [], []
    for p in prompts:
        cache = model.new_cache(512)
        model.forward(torch.tensor(p), cache)
        want.append([model.forward(torch.tensor([t]), cache) for t in NEXT[:4]])
        caches.append(model.new_cache(512))
        model.forward(torch.tensor(p), caches[-1])
    step = DecodeStep(model, *caches)
    for i, t in enumerate(NEXT[:4]):
        if i == 2:
            for layer in caches[1].layers:
                layer.reserve(300)  # past one block: new tensors, so a new recording
        got = step(t, t, t)  # (3, V)
        for j in range(3):
            torch.testing.assert_close(got[j:j + 1], want[j][i], atol=1e-5, rtol=1e-5)
    assert all(layer.capacity > 256 for layer in caches[1].layers) and step.capacities == step.held()


@pytest.mark.parametrize("arch", ALL)
def test_replay_on_updated_buffers_equals_eager(arch, tiny_checkpoint):
    """Replays of one recording at later positions equal eager; a recording that baked its position does not
    (the test catches a position baked in at capture)."""
    model = build(tiny_checkpoint(arch))
    want = eager_logits(model, NEXT)
    assert max_error(replayed_logits(model, DecodeStep, NEXT), want) < 1e-5
    assert max_error(replayed_logits(model, BakedStep, NEXT), want) > 1e-3


def test_dsa_with_its_kv_in_ram(tiny_checkpoint):
    """The DSA latent cache in RAM (layers on the stand-in GPU): the static step gathers the selected rows on
    the host (by design, so no graph: capture_blocker says why) and equals eager."""
    model = build(tiny_checkpoint("glm_moe_dsa"), layer_home=lambda i: "gpu:0", kv_home=lambda i: "cpu")
    assert any(layer.attn.kv_device != layer.attn.device for layer in model.layers)
    want = eager_logits(model, NEXT)
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = DecodeStep(model, cache)
    for t, w in zip(NEXT, want):
        torch.testing.assert_close(step(t), w, atol=1e-5, rtol=1e-5)


def gpu_model(arch, tiny_checkpoint, homes):
    placement = {i: homes * (8 // len(homes)) for i in range(8)}
    # CPU experts as a CPU group the runtime hands off (q8_0 on the native kernels); without expert_quant they
    # would be float TorchExperts on the CPU, which a recording on the GPU cannot hold
    model = offload.load(tiny_checkpoint(arch), device="cuda", dtype="float32", progress=False, ctx=64,
                         placement=placement, expert_quant="q8_0" if "cpu" in homes else None).model
    for moe in model.moe_layers():
        for g in moe.groups:
            if hasattr(g, "sync_free"):
                g.sync_free = True
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", ALL)
def test_cuda_graph_equals_eager(arch, tiny_checkpoint):
    """On a GPU, every layer and expert there (sync-free groups): the step is one captured CUDA graph, and
    its replays on updated buffers equal the eager decode. Not yet run on a GPU (none lent to the session
    that wrote it)."""
    model = gpu_model(arch, tiny_checkpoint, ["gpu"])
    assert capture_blocker(model) is None, capture_blocker(model)
    want = eager_logits(model, NEXT)
    for g, w in zip(replayed_logits(model, DecodeStep, NEXT), want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert max_error(replayed_logits(model, BakedStep, NEXT), want) > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_step_with_cpu_experts_equals_eager(arch, tiny_checkpoint):
    """Half the experts on the CPU: the step is recorded as CUDA graph segments cut at each CPU expert call
    (offload.graphs.CudaSegments), its replays equal eager."""
    model = gpu_model(arch, tiny_checkpoint, ["gpu", "cpu"])
    assert capture_blocker(model) is None, capture_blocker(model)
    want = eager_logits(model, NEXT)
    # the CPU group rounds its input to 8 bits: the static step's masked attention differs from eager's by ~1e-7,
    # which can move a value across a rounding edge (the DSA model's 8e-3 in test_graph_segments)
    atol = 1e-2 if arch == "glm_moe_dsa" else 1e-4
    for g, w in zip(replayed_logits(model, DecodeStep, NEXT), want):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-4)
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = DecodeStep(model, cache)
    step(NEXT[0])
    assert step.segments == 1 + 2 * len(model.moe_layers())


def test_a_failed_recording_falls_back_to_the_step_function(tiny_checkpoint, monkeypatch):
    """A step the recording cannot hold though capture_blocker saw nothing (here: a norm that reads a value back
    into Python, as an op new to the runtime might) decodes op by op with a warning naming the failure, and
    equals eager; OFFLOAD_GRAPHS=1 (recording demanded) makes it an error instead."""
    import offload.graphs as graphs
    from offload.models import base

    model = build(tiny_checkpoint("qwen3_moe"))
    want = eager_logits(model, NEXT[:3])
    real_norm = base.rms_norm

    def norm_with_a_host_read(x, w, eps):
        float(x.abs().max())  # a host read: the recording refuses it
        return real_norm(x, w, eps)

    for moe in model.moe_layers():  # the static path (as test_graph_decode): nothing else blocks the recording
        for g in moe.groups:
            if hasattr(g, "sync_free"):
                g.sync_free = True
    monkeypatch.setattr("offload.runtime.rms_norm", norm_with_a_host_read)
    monkeypatch.setattr(graphs, "RECORD_FAILURES", [])
    monkeypatch.delenv("OFFLOAD_GRAPHS", raising=False)
    assert capture_blocker(model) is None
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    step = DecodeStep(model, cache)
    with pytest.warns(RuntimeWarning, match="runs op by op, not recorded .recording failed: RuntimeError"):
        got = [step(t) for t in NEXT[:3]]
    assert step.segments == 0 and step.blocker.startswith("recording failed") and graphs.RECORD_FAILURES
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("OFFLOAD_GRAPHS", "1")
    cache = model.new_cache(64)
    model.forward(torch.tensor(PROMPT), cache)
    with pytest.raises(RuntimeError, match="reads the device from the host"):
        DecodeStep(model, cache)(NEXT[0])
