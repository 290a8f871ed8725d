"""The planner's GPU count as held (placement/held.py): a tied head takes its embedding table to the GPU and the
budget counts it; a catalog MLA model counts kv_b in bf16 on a GPU. (The loaded bytes themselves are checked
against the plan in tests/engine/test_held_bytes.py.)"""

from dataclasses import replace

import pytest

from offload.placement import model as M
from offload.placement.hardware import GPU, GiB, Hardware
from offload.placement.held import GPU_FLOAT, kv_b_params
from offload.placement.planner import PlanOptions, plan


def _hw(gpu_gib: float) -> Hardware:
    return Hardware(gpus=[GPU("test", int(gpu_gib * GiB), 1000e9, 165)], ram_bytes=512 * GiB, dram_bw=100e9,
                    pcie_bw=25e9, cpu_cores=16)


@pytest.mark.parametrize("gpu_gib", [1.5, 2, 3, 3.5, 8])
def test_a_tied_head_budgets_its_table(gpu_gib):
    """qwen3-30b-a3b with tied embeddings: the head on the GPU holds the table (load_embeddings), so the GPU's
    planned bytes stay within its budget; where the table does not fit beside the layers, the layers go first."""
    spec = replace(M.from_catalog("qwen3-30b-a3b"), tie_embeddings=True)
    p = plan(spec, _hw(gpu_gib), options=PlanOptions(context=4096, strict=False, full=False))
    used = sum(p.usage()["gpu:0"].values()) + p.reserves[0]
    assert used <= p.hw.gpus[0].memory_bytes
    assert (p.emb_device == "gpu:0") == (p.head_device == "gpu:0")  # one table for both
    if p.head_device == "cpu":
        assert any(h == "gpu:0" for h in p.homes.values())


def test_catalog_mla_counts_kv_b_in_bf16_on_a_gpu():
    spec = M.from_catalog("glm-5.2")
    p = plan(spec, _hw(80), options=PlanOptions(context=4096, strict=False, full=False))
    layer = next(it for it in p.items if p.homes[it.index] == "gpu:0")
    attn = next(g for g in layer.fixed if g.cls == "attention")
    bpw = attn.bytes / attn.params  # Q8_0
    proj = spec.hidden * spec.index_heads if layer.index in spec.indexer_layers else 0  # DSA weights_proj, float32
    assert attn.gpu_bytes == pytest.approx(attn.bytes + kv_b_params(spec) * (GPU_FLOAT - bpw) + proj * (4 - bpw))
    assert kv_b_params(spec) == 512 * 64 * (192 + 256)
