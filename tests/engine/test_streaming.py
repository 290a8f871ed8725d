"""Long prompts on the GPU (offload.streaming): above the crossover a GPU layer's CPU experts are copied to the GPU
as stored and run by the Triton kernels; below it (and in decode) they stay on the CPU. On this CPU the layers live
on a stand-in GPU home (test_homes) whose blocks run on the Triton kernels in the interpreter; the threshold is
lowered so a short prompt crosses it."""

import pytest
import torch

from offload.kernels.cpu.experts import CpuExpertGroup
from offload.streaming import MIN_TOKENS, ExpertStream, StreamPolicy, pools_on
from tests.engine.test_homes import build, run
from tests.gguf.fixtures_models import gguf_models  # noqa: F401  (session fixture)


# the stand-in GPU home runs Triton's interpreter on CPU tensors, which a CUDA machine does not select
stand_in = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in (on CUDA the GPU tests run)")


def _float_head(model):
    """The head as float32 (expanded once by the reference dequantisation): the interpreter's GEMV over a
    151936-row head takes ~10 s a pass, and the head is not what is tested here."""
    from offload.gguf.dequant_torch import dequantize_torch
    from offload.models.weights import Linear

    h = model.lm_head
    model.lm_head = Linear(dequantize_torch(h.packed.blocks, h.qtype, h.shape, dtype=torch.float32), None)


@pytest.fixture(scope="module")
def streamed(gguf_models):  # noqa: F811
    """qwen3_moe Q4_K_M, every layer on the stand-in gpu:0, its experts half there (TritonExperts), half on the
    CPU (the fused native kernel), with a crossover of 0 tokens per expert: a long chunk copies every CPU expert
    it uses."""
    path = gguf_models.path("qwen3_moe", "Q4_K_M")
    model = build(path, triton=True, stream=StreamPolicy(tokens_per_expert=0.0), layer_home=lambda i: "gpu:0",
                  placement=lambda layer, n: [("gpu", "cpu")[e % 2] for e in range(n)])
    _float_head(model)
    resident = build(path, triton=True, layer_home=lambda i: "gpu:0")  # every expert resident on gpu:0
    resident.lm_head = model.lm_head
    return model, gguf_models.prompt_ids("qwen3_moe", "Q4_K_M"), resident


def _streams(model) -> list[ExpertStream]:
    groups = [g for moe in model.moe_layers() for g in moe.groups]
    return [g.stream for g in groups if isinstance(g, CpuExpertGroup) and g.stream is not None]


def _set(model, on: bool) -> None:
    for s in _streams(model):
        s.enabled = on
        s.chunks = s.experts_copied = s.experts_on_cpu = 0


@stand_in
def test_a_long_prompt_streams_and_gives_the_same_logits(streamed):
    model, prompt, resident = streamed
    streams = _streams(model)
    assert len(streams) == len(model.moe_layers()) and all(s.triton for s in streams)
    k = model.args.num_experts_per_tok
    n = max(s.min_tokens(k) for s in streams)
    assert n == MIN_TOKENS  # T*k/E > 0 tokens per expert from the floor on
    ids = prompt[:n + 2]
    _set(model, False)
    want = run(model, ids, n)  # a prefill of n tokens, two decode steps: all on the CPU experts
    _set(model, True)
    got = run(model, ids, n)
    assert all(s.chunks == 1 for s in streams)  # the prefill streamed in every layer, the decode steps did not
    held = len(model.moe_layers()[0].groups[1].ids)
    assert 0 < streams[0].experts_copied <= held and all(s.experts_on_cpu == 0 for s in streams)
    # every layer copies into the device's two pools: GPU memory for 2 x slots experts, not per layer
    pools = pools_on(streams[0].device)
    assert sum(b.numel() for pool in pools for b in pool.dev) <= 2 * max(s.n_slots * s.expert_bytes for s in streams)
    # the streamed experts compute what resident ones do (the same kernels on the same bytes)
    # (the prefill rows: the decode steps ran on the CPU experts)
    torch.testing.assert_close(got[:n], run(resident, ids, n)[:n], atol=1e-5, rtol=1e-5)
    # against the CPU experts: the native kernel rounds their activations to 8 bits (csrc/qdot.cpp), the GPU
    # kernels do not: measured 0.078 of logits up to 16.6 (0.5 %), as any split of these experts between homes
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, atol=1e-2 * scale, rtol=0)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


@stand_in
def test_experts_below_the_crossover_stay_on_the_cpu_beside_the_copies(streamed):
    """A crossover of 3 tokens per expert: in a 16-token chunk (4 per expert on average) the CPU experts with more
    tokens are copied, the others computed by the CPU group on its worker thread; every used expert is one or
    the other, and the logits are those of the CPU experts up to the GPU kernels' float activations."""
    model, prompt, _ = streamed
    streams = _streams(model)
    ids = prompt[:MIN_TOKENS]
    _set(model, False)
    want = run(model, ids, MIN_TOKENS)
    _set(model, True)
    for s in streams:
        s.per_expert = 3.0
    try:
        got = run(model, ids, MIN_TOKENS)
    finally:
        for s in streams:
            s.per_expert = 0.0
    copied, on_cpu = sum(s.experts_copied for s in streams), sum(s.experts_on_cpu for s in streams)
    assert copied > 0 and on_cpu > 0, (copied, on_cpu)
    torch.testing.assert_close(got, want, atol=1e-2 * float(want.abs().max()), rtol=0)


@stand_in
def test_the_float_path_where_the_gpu_experts_are_not_on_triton(gguf_models):  # noqa: F811
    """Without the Triton kernels (OFFLOAD_TRITON=0 on a GPU) the copied experts are expanded per matmul
    (BlockExperts). glm_moe_dsa Q8_0, every routed expert in the CPU group, which also runs the layer's shared
    expert in its call: the stream keeps it."""
    path = gguf_models.path("glm_moe_dsa", "Q8_0")
    model = build(path, stream=StreamPolicy(tokens_per_expert=0.0), layer_home=lambda i: "gpu:0",
                  placement=lambda layer, n: ["cpu"] * n)
    streams = [g.stream for moe in model.moe_layers() for g in moe.groups if getattr(g, "stream", None)]
    assert len(streams) == len(model.moe_layers()) and not any(s.triton for s in streams)
    assert all(s.shared is not None for s in streams)  # the shared expert in the CPU group's call
    ids = gguf_models.prompt_ids("glm_moe_dsa", "Q8_0")[:MIN_TOKENS + 1]
    _set(model, False)
    want = run(model, ids, MIN_TOKENS)
    _set(model, True)
    got = run(model, ids, MIN_TOKENS)
    assert all(s.chunks == 1 and s.experts_copied > 0 for s in streams)
    torch.testing.assert_close(got, want, atol=1e-2 * float(want.abs().max()), rtol=0)


@stand_in
def test_a_short_prompt_does_not_stream(streamed):
    model, prompt, _ = streamed
    _set(model, True)
    run(model, prompt[:6], 5)
    assert all(s.chunks == 0 for s in _streams(model))


@pytest.mark.parametrize("slots", [1, 16])
def test_a_stream_computes_what_resident_experts_do(slots):
    """ExpertStream over a layer's blocks (Q4_K gate / up, Q6_K down, fresh random) against TritonExperts holding
    the same experts: one slot a pool (a batch per expert through two pools, each reused once its batch has run),
    and all in one. On a GPU (CUDA
    when there is one: scripts/gpu_check.sh runs it) with pinned host buffers and the copies on a side stream."""
    import warnings

    import numpy as np

    from offload.gguf.types import GGMLType as G
    from offload.kernels.gpu.weights import TritonExperts
    from tests.kernels.gpu.blocks import weight

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed = int(np.random.SeedSequence().entropy % 2**32)  # fresh data every run, the seed printed to replay
    print(f"seed={seed}")
    rng = np.random.default_rng(seed)
    n_experts, held, t, k = 8, [0, 2, 3, 5, 7], 20, 4
    spec = {"gate": (G.Q4_K, 256, 512), "up": (G.Q4_K, 256, 512), "down": (G.Q6_K, 512, 256)}
    mats = {p: weight(fmt, rows, cols, rng, (n_experts,))[0].numpy() for p, (fmt, rows, cols) in spec.items()}
    parts = [(mats[p], int(fmt), cols) for p, (fmt, _, cols) in spec.items()]
    resident = TritonExperts.from_blocks(device, held, n_experts, *((m[held], qt, c) for m, qt, c in parts))
    stream = ExpertStream(device, held, n_experts, parts, StreamPolicy(tokens_per_expert=0.5, slots=slots))
    x = torch.from_numpy(rng.standard_normal((t, 512), dtype=np.float32)).to(device)
    ids = torch.from_numpy(np.stack([rng.permutation(n_experts)[:k] for _ in range(t)])).to(device)
    w = torch.from_numpy(rng.uniform(0.1, 1, (t, k)).astype(np.float32)).to(device)
    assert stream.takes(ids) and not stream.takes(ids[:MIN_TOKENS - 1])
    with warnings.catch_warnings():  # the interpreter's exp of a very negative gate overflows to 0
        warnings.simplefilter("ignore", RuntimeWarning)
        got = stream.submit(x, ids, w).wait()
        want = resident.submit(x, ids, w).wait()
    used = set(ids.flatten().tolist()) & set(held)
    assert stream.experts_copied == len(used) and stream.chunks == 1
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0)  # the batches' partials sum in another order
    if device.type == "cuda":
        assert all(h.is_pinned() for pool in pools_on(stream.device) for h in pool.host)


def test_the_crossover_is_the_cost_models(monkeypatch):
    from offload.placement import cost
    from offload.placement.hardware import Hardware

    hw = Hardware(gpus=[], ram_bytes=2**40, dram_bw=300e9, pcie_bw=25e9, cpu_cores=32, cpu_tflops=2.0)
    policy = StreamPolicy.from_plan({"hardware": {"gpus": [{}], "pcie_bw": 25e9, "cpu_tflops": 2.0}})
    assert policy.crossover(37.7e6, 21.2e6) == pytest.approx(cost.crossover_tokens(37.7e6, 21.2e6, hw))
    assert StreamPolicy.from_plan({"hardware": {"gpus": [], "pcie_bw": 25e9, "cpu_tflops": 2.0}}) is None
    plan = {"hardware": {"gpus": [{}], "pcie_bw": 25e9, "cpu_tflops": 2.0}}
    assert StreamPolicy.for_load(plan) == policy
    monkeypatch.setenv("OFFLOAD_STREAM", "0")
    assert StreamPolicy.for_load(plan) is None


@stand_in
def test_the_engine_streams_from_the_prompt_length_offload_plan_prints(gguf_models):  # noqa: F811
    """The plan's per-layer figure (`offload plan`: "CPU experts streamed to the GPU from") is the chunk length
    from which the loaded layers stream: both count each layer's own bytes per expert (its Q4_K_M mix of Q4_K and
    Q6_K; measured: 22501, 22501, 25938 loaded, as planned since the plan reads the file's bytes per layer)."""
    from offload.placement import report
    from offload.planning import make_plan

    path = gguf_models.path("qwen3_moe", "Q4_K_M")
    # a slow PCIe link puts the crossover above the 16-token floor, so the figure is the cost model's
    plan = report.to_json(make_plan(path, context=256, gpu=["24GiB"], pcie_bw="0.05GB/s", cpu_tflops=1.0))
    by_layer = plan["prediction"]["prefill_crossover_prompt_tokens_by_layer"]
    policy = StreamPolicy.from_plan(plan)
    model = build(path, triton=True, stream=policy, layer_home=lambda i: "gpu:0", placement=lambda layer, n: ["cpu"] * n)
    k = model.args.num_experts_per_tok
    got = {str(moe.layer_idx): moe.groups[0].stream.min_tokens(k) for moe in model.moe_layers()}
    assert got.keys() == by_layer.keys() and min(got.values()) > MIN_TOKENS
    assert got == by_layer
    md = report.to_markdown(plan)
    assert "CPU experts streamed to the GPU from" in md and all(f": {n}" in md for n in by_layer.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_long_prompt_on_a_gpu_streams(gguf_models):  # noqa: F811
    """For real: offload.load on CUDA, half the experts in the CPU group; a long prompt with every used CPU expert
    copied (crossover 0) against the same prompt with streaming off."""
    import offload

    path = gguf_models.path("qwen3_moe", "Q4_K_M")
    llm = offload.load(path, device="cuda", dtype="float32", progress=False,
                       placement=lambda layer, n: [("gpu", "cpu")[e % 2] for e in range(n)])
    streams = _streams(llm.model)
    assert streams and all(s is not None for s in streams)
    ids = gguf_models.prompt_ids("qwen3_moe", "Q4_K_M")[:40]
    _set(llm.model, False)
    want = llm.logits(ids)
    _set(llm.model, True)
    for s in streams:
        s.per_expert = 0.0
    got = llm.logits(ids)
    assert all(s.chunks == 1 and s.experts_copied > 0 for s in streams)
    torch.testing.assert_close(got, want, atol=1e-2 * float(want.abs().max()), rtol=0)
    assert all(h.is_pinned() for pool in pools_on(streams[0].device) for h in pool.host)
