"""The default CPU path for quantised GGUF files: routed experts, attention / dense / shared projections, the
output head and the embedding stay in their blocks and run on the native kernels (8-bit activations, as
llama.cpp). Checked against llama.cpp and against the dequantise-per-call path (float activations)."""

import numpy as np
import pytest
import torch

from offload.kernels.cpu import native
from tests.gguf.fixtures_models import agreement, gguf_models  # noqa: F401  (session fixture)

pytestmark = pytest.mark.skipif(not native.fast(12, 14, 8), reason="no native SIMD kernels on this CPU")
CASES = [("qwen3_moe", "Q4_K_M"), ("deepseek_v3", "Q4_K_M")]


@pytest.mark.parametrize("name,fmt", CASES)
def test_default_path_keeps_weights_quantised_and_matches_llama_cpp(gguf_models, name, fmt):
    from offload.kernels.cpu.weights import QuantWeight

    llm = gguf_models.ours(name, fmt)  # plain offload.load: no numerics emulation asked for
    model = llm.model
    assert isinstance(model.embed, QuantWeight) and isinstance(model.lm_head, QuantWeight)
    attn = model.layers[0].attn
    proj = attn.wq if hasattr(attn, "wq") else attn.kv_a
    assert isinstance(proj, QuantWeight)
    ids = gguf_models.prompt_ids(name, fmt)
    ours = llm.logits(ids).numpy()
    _, ref = gguf_models.compare(name, fmt)
    m = agreement(ours, ref)
    print(f"\n{name} {fmt} default path vs llama.cpp: cos mean {m['cos_mean']:.6f} min {m['cos_min']:.6f} "
          f"top-1 {m['top1']:.3f}")
    assert m["cos_mean"] >= 0.999 and m["top1"] >= 0.9


@pytest.mark.parametrize("name,fmt", CASES)
def test_native_path_vs_dequantise_per_call(gguf_models, name, fmt, monkeypatch):
    """Without the native kernels the same file runs on float-expanded weights and numba's float-activation
    expert kernels: the two paths must agree like two implementations of one model (they are not equal:
    8-bit activations vs float ones)."""
    import offload

    ids = gguf_models.prompt_ids(name, fmt)
    fast = gguf_models.ours(name, fmt).logits(ids)
    monkeypatch.setattr(native, "SIMD_TYPES", set())
    slow_llm = offload.load(gguf_models.path(name, fmt), device="cpu", progress=False)
    from offload.models.weights import Linear

    assert isinstance(slow_llm.model.lm_head, Linear)  # the float path really ran
    slow = slow_llm.logits(ids)
    m = agreement(fast.numpy(), slow.numpy())
    print(f"\n{name} {fmt} native vs dequantise-per-call: cos mean {m['cos_mean']:.6f} top-1 {m['top1']:.3f} "
          f"max diff {m['max_diff']:.3g}")
    assert not torch.equal(fast, slow)
    assert m["cos_mean"] >= 0.999 and m["top1"] >= 0.9
    assert np.isfinite(fast.numpy()).all()


def test_shared_expert_in_the_routed_call_changes_nothing(gguf_models, monkeypatch):
    """A shared expert whose blocks match the routed experts' runs inside their native call (decided when the
    CPU group is built): the logits are bit-identical to running it as its own MLP after them (same sums,
    same order)."""
    import offload
    from offload.kernels.cpu import moe as moe_mod
    from offload.kernels.cpu.experts import CpuExpertGroup

    llm = gguf_models.ours("glm_moe_dsa", "Q4_K_M")
    ids = gguf_models.prompt_ids("glm_moe_dsa", "Q4_K_M")[:12]
    assert any(moe.shared is None for moe in llm.model.moe_layers())  # some group took its shared expert
    fused = []
    topk = moe_mod.native.moe_topk

    def counting(*a, **k):
        fused.append(len(a) > 7 and a[7] is not None)
        return topk(*a, **k)

    monkeypatch.setattr(moe_mod.native, "moe_topk", counting)
    together = llm.logits(ids)
    assert any(fused), "no layer of this fixture ran its shared expert in the routed call"
    monkeypatch.setattr(CpuExpertGroup, "takes_shared", staticmethod(lambda *a: False))
    apart_llm = offload.load(gguf_models.path("glm_moe_dsa", "Q4_K_M"), device="cpu", progress=False)
    assert all(moe.shared is not None for moe in apart_llm.model.moe_layers())
    apart = apart_llm.logits(ids)
    assert torch.equal(together, apart)


def test_mla_absorbed_products_read_the_files_blocks(gguf_models, monkeypatch):
    """GLM-DSA's attn_k_b / attn_v_b (Q5_0 / Q4_K in Q4_K_M) stay in their blocks for the absorbed attention
    (a prompt under the expanded form's 16 tokens runs it, as decode does): the logits agree with llama.cpp's
    at the same positions and with the float kv_b path."""
    import offload
    from offload.kernels.cpu.weights import HeadsQuantWeight
    from offload.models import loading

    name, fmt = "glm_moe_dsa", "Q4_K_M"
    llm = gguf_models.ours(name, fmt)
    attn = llm.model.layers[0].attn
    assert isinstance(attn.uk_q, HeadsQuantWeight) and isinstance(attn.uv_q, HeadsQuantWeight)
    ids = gguf_models.prompt_ids(name, fmt)[:12]
    ours = llm.logits(ids)
    _, ref = gguf_models.compare(name, fmt)  # teacher-forced: its first 12 rows are this prefix's
    m = agreement(ours.numpy(), ref[:12])
    print(f"\n{name} {fmt} absorbed, blocks vs llama.cpp: cos mean {m['cos_mean']:.6f} top-1 {m['top1']:.3f}")
    assert m["cos_mean"] >= 0.999 and m["top1"] >= 0.9
    monkeypatch.setattr(loading.LoadContext, "heads", lambda self, name: None)
    float_llm = offload.load(gguf_models.path(name, fmt), device="cpu", progress=False)
    assert float_llm.model.layers[0].attn.uk_q is None
    m = agreement(ours.numpy(), float_llm.logits(ids).numpy())
    print(f"{name} {fmt} absorbed, blocks vs float kv_b: cos mean {m['cos_mean']:.6f} top-1 {m['top1']:.3f}")
    assert m["cos_mean"] >= 0.999 and m["top1"] >= 0.9
