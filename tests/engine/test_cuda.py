"""The same models on a CUDA GPU, and experts split between the GPU and the CPU for real.
Skipped where torch sees no GPU (CI); run on the lent GPU machine."""

import pytest
import torch

import offload
from tests.engine.conftest import ARCHS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_logits_match_cpu(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    ids = list(range(5, 37))
    cpu = offload.load(path, device="cpu", progress=False).logits(ids)
    gpu = offload.load(path, device="cuda", dtype="float32", progress=False)
    assert gpu.model.embed.device.type == "cuda"
    # TF32 matmuls are off by default in torch, so fp32 on the GPU is close to the CPU result
    assert (gpu.logits(ids) - cpu).abs().max().item() <= 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_split_between_gpu_and_cpu(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    ids = list(range(7, 40))
    ref = offload.load(path, device="cuda", dtype="float32", progress=False).logits(ids)
    half = {i: ["gpu", "cpu"] * 4 for i in range(8)}
    llm = offload.load(path, device="cuda", dtype="float32", progress=False, placement=half)
    devices = {str(g.device) for g in llm.model.moe_layers()[0].groups}
    assert devices == {"cuda:0", "cpu"} or devices == {"cuda", "cpu"}
    assert (llm.logits(ids) - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_split_between_gpu_and_cpu(arch, tiny_checkpoint):
    """Layers 0..1 on the GPU, the rest on the CPU, experts on both, the embedding on the CPU and the head on the
    GPU: activations cross for real, and each layer's "gpu" experts follow it or go to the main device."""
    from tests.engine.test_homes import build, run

    path = tiny_checkpoint(arch)
    ids = list(range(7, 40))
    ref = run(build(path), ids, 28)
    model = build(path, "cuda", layer_home=lambda i: "gpu" if i < 2 else "cpu", embed_home="cpu",
                  head_home="gpu", placement=lambda layer, n: ["gpu", "cpu"] * (n // 2))
    assert [layer.device.type for layer in model.layers][:3] == ["cuda", "cuda", "cpu"]
    assert model.lm_head.device.type == "cuda" and model.embed.device.type == "cpu"
    assert (run(model, ids, 28).cpu() - ref).abs().max().item() <= 1e-3


def test_bf16_generation_on_gpu(tiny_checkpoint):
    llm = offload.load(tiny_checkpoint("glm_moe_dsa"), device="cuda", dtype="bfloat16", progress=False)
    out = llm.generate("The quick brown fox", max_new_tokens=12)
    assert 1 <= len(out.token_ids) <= 12
