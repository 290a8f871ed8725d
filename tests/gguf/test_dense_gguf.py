"""Dense GGUF models (llama: q/k rows permuted by llama.cpp's converter; qwen2: qkv bias; qwen3: q/k norm)
through our engine vs llama.cpp (llama-cpp-python, teacher-forced) and vs our own safetensors path, on tiny
random models made by llama.cpp's converter and quantiser (scripts/make_gguf_fixtures.py)."""

import pytest
import torch

import offload  # noqa: F401  before llama_cpp: its OMP_WAIT_POLICY=PASSIVE must precede libgomp's load

from tests.gguf.fixtures_models import agreement, gguf_models  # noqa: F401  (session fixture)

DENSE = ["llama", "qwen2", "qwen3", "llama3"]  # llama3: Llama 3.1 rope scaling (GGUF rope_freqs.weight)


def _report(name, fmt, m):
    print(f"\n{name} {fmt}: cos mean {m['cos_mean']:.6f} min {m['cos_min']:.6f} top-1 {m['top1']:.3f} "
          f"max diff {m['max_diff']:.4g} (max |logit| {m['max_abs']:.3g})")


@pytest.mark.parametrize("name", DENSE)
def test_f32_dense_gguf_matches_llama_cpp_and_safetensors(gguf_models, name):
    m = agreement(*gguf_models.compare(name, "F32"))
    _report(name, "F32", m)
    assert m["top1"] == 1.0 and m["cos_mean"] >= 0.9999
    ids = gguf_models.prompt_ids(name, "F32")
    ours = gguf_models.ours(name, "F32").logits(ids)
    hf = offload.load(gguf_models.paths[(name, "hf")], device="cpu", dtype="float32", progress=False)
    torch.testing.assert_close(ours, hf.logits(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,fmt", [("llama", "Q8_0"), ("llama", "Q4_1"), ("qwen2", "Q4_1")])
def test_quantised_dense_gguf_matches_llama_cpp(gguf_models, name, fmt):
    m = agreement(*gguf_models.compare(name, fmt))
    _report(name, fmt, m)
    assert m["cos_mean"] >= 0.999
    assert m["top1"] >= 0.9


def test_llama_gguf_keeps_its_matrices_quantised(gguf_models):
    """The Q4_1 projections and MLP stay the file's blocks on the native kernels (one fused call for the MLP
    and for q/k/v), and a tied head is the embedding table itself."""
    from offload.kernels.cpu import native
    from offload.kernels.cpu.weights import QuantLinears, QuantMLP, QuantWeight

    if not native.has_vnni():
        pytest.skip("no AVX-512 VNNI: the engine expands the blocks instead")
    llm = gguf_models.ours("llama", "Q4_1")
    layer = llm.model.layers[0]
    assert isinstance(layer.mlp, QuantMLP) and isinstance(layer.attn.wqkv, QuantLinears)
    assert layer.mlp.gate.ggml_type.name == "Q4_1"
    assert isinstance(llm.model.embed, QuantWeight) and llm.model.lm_head is llm.model.embed
