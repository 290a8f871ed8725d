"""The MoE layer's math must not depend on where each routed expert lives."""

import random

import pytest
import torch

import offload
from tests.engine.conftest import ARCHS


def random_placement(n_layers: int, n_experts: int, seed: int) -> dict[int, list[str]]:
    rng = random.Random(seed)
    return {i: [rng.choice(["gpu", "cpu"]) for _ in range(n_experts)] for i in range(n_layers)}


@pytest.mark.parametrize("arch", ARCHS)
def test_any_placement_gives_the_same_logits(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    base = offload.load(path, device="cpu", progress=False)
    n_layers, n_experts = len(base.model.layers), 8
    ids = torch.randint(0, base.model.args.vocab_size, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = base.logits(ids)
    half = {i: ["gpu"] * (n_experts // 2) + ["cpu"] * (n_experts // 2) for i in range(n_layers)}
    for placement in ("cpu", half, random_placement(n_layers, n_experts, 7)):
        llm = offload.load(path, device="cpu", progress=False, placement=placement)
        moe = llm.model.moe_layers()[0]
        if placement != "cpu":
            assert len(moe.groups) == 2  # the split is real: two expert groups
        assert (llm.logits(ids) - ref).abs().max().item() <= 1e-5


def test_routing_observer_sees_every_moe_layer(tiny_checkpoint):
    llm = offload.load(tiny_checkpoint("glm4_moe"), device="cpu", progress=False)
    seen = []
    llm.add_routing_observer(lambda layer, ids: seen.append((layer, tuple(ids.shape))))
    llm.logits([1, 2, 3])
    assert seen == [(1, (3, 2)), (2, (3, 2))]  # layer 0 is dense
    llm.remove_routing_observers()
    llm.logits([1, 2, 3])
    assert len(seen) == 2


def test_placement_from_a_plan_json(tiny_checkpoint, tmp_path):
    """The planner's JSON (docs/placement.md) drives where each routed expert lives."""
    import json

    path = tiny_checkpoint("glm4_moe")
    entries = [{"tensor": "attn", "layer": 0, "expert": None, "device": "gpu:0", "bytes": 1}]
    for layer in (1, 2):
        for e in range(8):
            entries.append({"tensor": "ffn_exps", "layer": layer, "expert": e,
                            "device": "gpu:0" if e in (1, 5) else "cpu", "bytes": 1})
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"placement": entries}))
    llm = offload.load(path, device="cpu", progress=False, placement=str(plan))
    moe = llm.model.moe_layers()[0]
    assert sorted(moe.groups[0].experts) == [1, 5] and len(moe.groups[1].experts) == 6
    ids = list(range(3, 30))
    ref = offload.load(path, device="cpu", progress=False).logits(ids)
    assert (llm.logits(ids) - ref).abs().max().item() <= 1e-5
    plan.write_text("{not json")
    with pytest.raises(offload.OffloadError, match="not a placement plan"):
        offload.load(path, device="cpu", progress=False, placement=str(plan))


def test_expert_quant_runs_cpu_experts_on_the_fused_kernel(tiny_checkpoint):
    """expert_quant="q8_0": HF experts quantised at load, computed by offload.kernels.cpu.moe_cpu."""
    from offload.kernels.cpu.experts import CpuExpertGroup

    path = tiny_checkpoint("glm4_moe")
    ids = list(range(3, 35))
    ref = offload.load(path, device="cpu", progress=False).logits(ids)
    llm = offload.load(path, device="cpu", progress=False, expert_quant="q8_0")
    groups = llm.model.moe_layers()[0].groups
    assert len(groups) == 1 and isinstance(groups[0], CpuExpertGroup) and groups[0].experts.quantised
    ours = llm.logits(ids)
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() > 0.999  # Q8_0 weights: ~0.5 % weight error
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (ours - ref).abs().max() > 0  # the quantisation is really there
    with pytest.raises(offload.OffloadError, match="expert_quant"):
        offload.load(path, device="cpu", progress=False, expert_quant="q3_weird")
