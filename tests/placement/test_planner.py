"""Planner properties over every catalog model x a grid of budgets, and hand-computed predictions."""

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.errors import PlacementError
from offload.placement import catalog, cost, report
from offload.placement import model as M
from offload.placement.hardware import GPU, GiB, Hardware, load_profile, save_profile
from offload.placement.planner import PlanOptions, plan
from offload.placement.profile import RoutingProfile
from offload.placement.quant import QuantScheme

from tests.placement.helpers import rig

ALWAYS_GPU = ("attn", "norms", "router", "shared_experts", "ffn", "kv_cache")


def _profile(spec, seed):
    if seed is None:
        return None
    rng = np.random.default_rng(seed)
    counts = {i: rng.zipf(1.5, spec.n_experts).astype(float) for i in spec.moe_layers}
    return RoutingProfile(counts, spec.n_experts, spec.top_k, spec.name, source="random")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(catalog.CATALOG)), n_gpu=st.integers(0, 2), gpu_gib=st.integers(4, 160),
       ram_gib=st.sampled_from([64, 256, 512, 768, 1536]), context=st.sampled_from([4096, 32768, 131072]),
       concurrency=st.integers(1, 4), seed=st.one_of(st.none(), st.integers(0, 1000)), mtp=st.booleans())
def test_plan_properties(name, n_gpu, gpu_gib, ram_gib, context, concurrency, seed, mtp):
    spec = M.from_catalog(name)
    hw = rig(gpus=(gpu_gib,) * n_gpu, ram=ram_gib)
    opts = PlanOptions(context=context, concurrency=concurrency, strict=False, full=False, mtp=mtp)
    p = plan(spec, hw, profile=_profile(spec, seed), options=opts)
    d = report.to_json(p)
    devs = {dv["name"]: dv for dv in d["devices"]}
    # budgets respected
    for i in range(n_gpu):
        assert devs[f"gpu:{i}"]["used_bytes"] <= devs[f"gpu:{i}"]["budget_bytes"]
    if p.status != "does_not_fit_ram":
        assert devs["cpu"]["used_bytes"] <= devs["cpu"]["budget_bytes"]
    else:
        assert "would fit with" in p.error
    # every group has exactly one home
    n_groups = 2 + sum(len(it.fixed) + len(it.freq) for it in p.items)
    assert len(d["placement"]) == n_groups
    assert {e["device"] for e in d["placement"]} <= set(devs)
    # always-GPU classes first: routed experts on a GPU only use memory that could not hold one more
    # layer's always-GPU groups (those groups move to the GPU as a whole layer)
    cpu_layers = [it.fixed_bytes for it in p.items if p.homes[it.index] == "cpu"]
    for i in range(n_gpu):
        hot = sum(e["bytes"] for e in d["placement"] if e["expert"] is not None and e["device"] == f"gpu:{i}")
        if hot:
            assert p.head_device != "cpu"
            if cpu_layers:
                assert hot < min(cpu_layers)
    # hot experts are the most frequent ones of their layer
    for it in p.items:
        mask = p.gpu_experts[it.index]
        if mask.any() and (~mask).any():
            assert it.freq[mask].min() >= it.freq[~mask].max() - 1e-12
    # two GPUs split the layers into contiguous ranges
    homes = [p.homes[it.index] for it in p.items if not it.mtp and p.homes[it.index] != "cpu"]
    assert homes == sorted(homes)
    assert d["prediction"]["decode_tok_s"] > 0
    assert d["prediction"]["decode_tok_s"] <= d["prediction"]["roofline_decode_tok_s"] * 1.0001


def test_json_round_trip(tmp_path):
    p = plan(M.from_catalog("glm-4.5-air"), rig(gpus=(24, 24)))
    d = report.to_json(p)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    back = report.load_plan(path)
    assert back == d
    assert report.placement_map(back)[("experts", 1, 0)] in ("gpu:0", "cpu")
    for key in ("model", "hardware", "devices", "placement", "prediction"):
        assert key in back
    assert {"name", "budget_bytes", "used_bytes"} <= set(back["devices"][0])
    assert {"tensor", "layer", "expert", "device", "bytes"} <= set(back["placement"][0])
    assert {"decode_tok_s", "prefill_tok_s", "roofline_decode_tok_s", "assumptions"} <= set(back["prediction"])


# ---- hand-computed small case -----------------------------------------------------------------------

TINY = {"model_type": "qwen3_moe", "hidden_size": 256, "num_hidden_layers": 2, "vocab_size": 1000,
        "intermediate_size": 512, "moe_intermediate_size": 128, "num_experts": 4, "num_experts_per_tok": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "decoder_sparse_step": 1,
        "mlp_only_layers": []}
BF16 = QuantScheme({c: "BF16" for c in ("embeddings", "attention", "dense_ffn", "shared_experts",
                                         "routed_experts", "lm_head", "mtp")})
# bytes one token reads, by hand:
#   attention 256*256 + 2*256*128 + 256*256 + qk norms 2*64 = 196736 params * 2 B     = 393472
#   layer norms 2*256 fp32 = 2048; router 4*256 fp32 = 4096                             ->   6144
#   KV at position 512: 512 tokens * (K+V) 2 * 2 heads * 64 * 2 B                      = 262144
#   two experts: 2 * 3*256*128 * 2 B                                                    = 393216
#   per layer 1054976, two layers 2109952; lm_head 1000*256*2 + final norm 256*4         = 513024
TOKEN_BYTES = 2 * (393472 + 6144 + 262144 + 393216) + 513024


def _tiny_plan(gpus):
    spec = M.from_hf_config(TINY, name="tiny")
    hw = Hardware(gpus=gpus, ram_bytes=64 * GiB, dram_bw=100e9, pcie_bw=25e9, cpu_cores=8)
    return plan(spec, hw, BF16, options=PlanOptions(context=1024, decode_position=512))


def test_decode_cpu_only_equals_hand_computed():
    p = _tiny_plan([])
    assert p.status == "cpu_only"
    assert p.prediction["decode_tok_s"] == pytest.approx(100e9 * cost.CPU_EFFICIENCY / TOKEN_BYTES, rel=1e-3)
    assert p.prediction["roofline_decode_tok_s"] == pytest.approx(100e9 / TOKEN_BYTES, rel=1e-3)


def test_decode_all_on_gpu_equals_hand_computed():
    p = _tiny_plan([GPU("big", 8 * GiB, 1000e9, 100)])
    assert p.prediction["cpu_experts"] == 0 and p.emb_device == "gpu:0"
    assert p.prediction["decode_tok_s"] == pytest.approx(1000e9 * cost.GPU_EFFICIENCY / TOKEN_BYTES, rel=1e-3)


def test_decode_overlap_and_serial_by_hand():
    hw = Hardware(gpus=[GPU("g", 8 * GiB, 1e12, 100)], ram_bytes=64 * GiB, dram_bw=1e11, pcie_bw=25e9, cpu_cores=8)
    lay = cost.LayerLayout(index=0, device="gpu:0", fixed_bytes=1e6, fixed_params=5e5, kv_read=0.0,
                           expert_bytes=1e5, expert_params=5e4, freq=np.array([1.0, 1.0, 0, 0]),
                           on_gpu=np.array([True, False, False, False]))
    d = cost.decode([lay], hw, head_bytes=0.0, head_device="gpu:0", cpu_eff=0.5, gpu_eff=0.5)
    attn_s = 1e6 / 0.5e12  # 2.0 us: before the experts (the next layer needs this layer's output)
    gpu_e_s = 1e5 / 0.5e12  # 0.2 us: the GPU expert, beside the CPU expert
    cpu_s = 1e5 / 0.5e11  # 2.0 us
    assert d["tok_s"] == pytest.approx(1 / (attn_s + max(gpu_e_s, cpu_s) + cost.SYNC_S))
    assert d["tok_s_pipelined"] == pytest.approx(1 / (max(attn_s + gpu_e_s, cpu_s) + cost.SYNC_S))
    assert d["tok_s_serial"] == pytest.approx(1 / (attn_s + gpu_e_s + cpu_s + cost.SYNC_S))


def test_decode_shared_expert_runs_beside_the_cpu_experts():
    """attention + max(shared + GPU experts, CPU experts) + sync: a shared expert shorter than the CPU experts
    costs nothing, a longer one shows."""
    hw = Hardware(gpus=[GPU("g", 8 * GiB, 1e12, 100)], ram_bytes=64 * GiB, dram_bw=1e11, pcie_bw=25e9, cpu_cores=8)
    for shared in (5e5, 5e6):
        lay = cost.LayerLayout(index=0, device="gpu:0", fixed_bytes=1e6 + shared, overlap_bytes=shared,
                               expert_bytes=1e5, freq=np.array([1.0, 1.0, 0, 0]),
                               on_gpu=np.array([False, False, False, False]))
        d = cost.decode([lay], hw, head_bytes=0.0, head_device="gpu:0", cpu_eff=1.0, gpu_eff=1.0)
        attn, beside, cpu = 1e6 / 1e12, shared / 1e12, 2e5 / 1e11
        assert d["tok_s"] == pytest.approx(1 / (attn + max(beside, cpu) + cost.SYNC_S))
    # with no CPU experts there is nothing to run beside: the layer is all GPU, no sync
    lay.on_gpu[:] = True
    d = cost.decode([lay], hw, head_bytes=0.0, head_device="gpu:0", cpu_eff=1.0, gpu_eff=1.0)
    assert d["tok_s"] == pytest.approx(1 / ((1e6 + 5e6 + 2e5) / 1e12))


def test_crossover_formula():
    hw = Hardware(gpus=[], ram_bytes=GiB, dram_bw=1e11, pcie_bw=50e9, cpu_cores=4, cpu_tflops=2.0)
    # b * F / (2 * P * B_pcie) = 1e6 * 2e12 / (2 * 1e6 * 5e10) = 20 tokens
    assert cost.crossover_tokens(1e6, 1e6, hw) == pytest.approx(20.0)


# ---- situations the report must describe ---------------------------------------------------------

def test_ram_too_small_is_a_clear_error():
    with pytest.raises(PlacementError, match=r"RAM too small.*would fit with .*(routed experts at|RAM)"):
        plan(M.from_catalog("glm-5.2"), rig(gpus=(24,), ram=128))


def test_not_strict_gives_distributed_recipe():
    p = plan(M.from_catalog("glm-5.2"), rig(gpus=(24,), ram=128),
             options=PlanOptions(strict=False, full=False))
    assert p.status == "does_not_fit_ram" and p.recipe is not None
    h200 = next(o for o in p.recipe["options"] if "H200" in o["gpu"])
    assert h200["tensor_parallel_size"] == 8 and "--tensor-parallel-size 8" in h200["vllm"]
    assert "GLM-5.2-FP8" in h200["vllm"]


def test_always_gpu_set_too_big_proposes_fallbacks():
    p = plan(M.from_catalog("glm-5.2"), rig(gpus=(16,)))
    assert p.status == "gpu_fallback"
    kinds = {f["option"] for f in p.fallbacks}
    assert kinds == {"layers_on_cpu", "harder_attention_quant", "shorter_context"}
    assert any(p.homes[i] == "cpu" for i in range(3))


def test_small_model_fits_entirely():
    p = plan(M.from_catalog("qwen3-30b-a3b"), rig(gpus=(80,)), options=PlanOptions(full=False))
    assert p.prediction["cpu_experts"] == 0 and p.emb_device == "gpu:0"


def test_hot_experts_follow_the_profile():
    spec = M.from_catalog("qwen3-30b-a3b")
    counts = {i: np.arange(spec.n_experts, dtype=float) for i in spec.moe_layers}  # expert 127 hottest
    prof = RoutingProfile(counts, spec.n_experts, spec.top_k, source="test")
    p = plan(spec, rig(gpus=(12,)), profile=prof, options=PlanOptions(full=False))
    mask = p.gpu_experts[spec.moe_layers[0]]
    assert mask.any() and mask[-1] and not mask[0]
    uniform = plan(spec, rig(gpus=(12,)), options=PlanOptions(full=False))
    assert p.prediction["decode_tok_s"] > uniform.prediction["decode_tok_s"]


def test_bad_options():
    with pytest.raises(PlacementError, match="context"):
        plan(M.from_catalog("qwen3-30b-a3b"), rig(), options=PlanOptions(context=0))


def test_a_tied_head_is_read_whole_every_token():
    """Every byte class a token reads is counted: a tied head reads the embedding table each token."""
    spec = M.from_hf_config({**TINY, "tie_word_embeddings": True}, name="tiny-tied")
    hw = Hardware(gpus=[], ram_bytes=64 * GiB, dram_bw=100e9, pcie_bw=25e9, cpu_cores=8)
    p = plan(spec, hw, BF16, options=PlanOptions(context=1024, decode_position=512))
    assert p.prediction["decode_tok_s"] == pytest.approx(100e9 * cost.CPU_EFFICIENCY / TOKEN_BYTES, rel=1e-3)


CALIBRATION = {"kernels": {"BF16": {"gemv_gbs": 40.0, "prefill_tflops": 0.5, "engine": "test"}},
               "layer_s": 100e-6, "token_s": 300e-6, "dram_gbs": 100.0, "dram_reads_gbs": [90.0, 100.0, 110.0],
               "threads": 8, "source": "a test"}


def test_calibrated_rates_and_fixed_costs_by_hand(tmp_path):
    """Measured kernel rates replace 80 % of DRAM for their types; the fixed costs per layer and token add;
    the KV cache is still read at 80 % of DRAM; the calibration survives the profile's round trip."""
    hw = Hardware(gpus=[], ram_bytes=64 * GiB, dram_bw=100e9, pcie_bw=25e9, cpu_cores=8, calibration=CALIBRATION)
    back = load_profile(save_profile(hw, tmp_path / "hw.json"))
    assert back.calibration == CALIBRATION
    p = plan(M.from_hf_config(TINY, name="tiny"), back, BF16, options=PlanOptions(context=1024, decode_position=512))
    kv = 2 * 262144
    weights = TOKEN_BYTES - kv
    step = weights / 40e9 + kv / (100e9 * cost.CPU_EFFICIENCY) + 2 * 100e-6 + 300e-6
    assert p.prediction["decode_tok_s"] == pytest.approx(1 / step, rel=1e-3)
    assert p.prediction["roofline_decode_tok_s"] == pytest.approx(100e9 / TOKEN_BYTES, rel=1e-3)  # DRAM bound
    notes = " ".join(p.prediction["assumptions"])
    assert "measured by a test" in notes and "BF16 40 GB/s" in notes and "100 us per CPU layer" in notes


def test_prefill_uses_the_fused_expert_rate_for_experts():
    """Experts in prefill go at the measured fused-expert rate (`moe_prefill_tflops`: the expert call's gathers
    and sums included), the attention and dense matrices at the single-matrix rate; without the figure the
    experts fall back to the single-matrix rate."""
    spec = M.from_hf_config(TINY, name="tiny")
    kernels = {"BF16": {"gemv_gbs": 40.0, "prefill_tflops": 0.5, "engine": "test"}}
    times = {}
    for moe_rate in (None, 0.5, 0.25):
        k = {"BF16": {**kernels["BF16"], **({"moe_prefill_tflops": moe_rate} if moe_rate else {})}}
        hw = Hardware(gpus=[], ram_bytes=64 * GiB, dram_bw=1e15, pcie_bw=25e9, cpu_cores=8,
                      calibration={**CALIBRATION, "kernels": k})  # DRAM so fast that every part is compute-bound
        lays = plan(spec, hw, BF16, options=PlanOptions(context=1024)).layouts()
        times[moe_rate] = 512 / cost.prefill(lays, hw, 512, "cpu")
    expert_flops = sum(float((2 * lay.expert_params * lay.freq * 512).sum()) for lay in lays if lay.moe)
    assert expert_flops > 0
    assert times[0.5] == pytest.approx(times[None], rel=1e-9)
    assert times[0.25] - times[0.5] == pytest.approx(expert_flops / 0.25e12 - expert_flops / 0.5e12, rel=1e-6)
    assert cost.cpu_flops(hw, "BF16", experts=True) == 0.25e12 and cost.cpu_flops(hw, "BF16") == 0.5e12


def test_prefill_adds_the_measured_per_token_cost_of_each_cpu_layer():
    """`prefill_s_per_token_hidden` (norms, rotations, copies: what the matrices and scores leave out) adds
    tokens x hidden x it per CPU layer to a prefill chunk."""
    spec = M.from_hf_config(TINY, name="tiny")
    chunk = {}
    for c in (0.0, 1e-9):
        hw = Hardware(gpus=[], ram_bytes=64 * GiB, dram_bw=100e9, pcie_bw=25e9, cpu_cores=8,
                      calibration={**CALIBRATION, "prefill_s_per_token_hidden": c})
        lays = plan(spec, hw, BF16, options=PlanOptions(context=1024)).layouts()
        chunk[c] = 512 / cost.prefill(lays, hw, 512, "cpu")
    assert chunk[1e-9] - chunk[0.0] == pytest.approx(len(lays) * 512 * spec.hidden * 1e-9, rel=1e-6)


def test_a_type_the_cpu_computes_in_another_is_rated_as_that_type():
    """IQ4_NL is rewritten as Q8_0 at load (1.89x the bytes): its stored bytes are read at Q8_0's measured
    GB/s over 34/18 and computed at Q8_0's measured prefill rate."""
    hw = Hardware(gpus=[], ram_bytes=64 * GiB, dram_bw=100e9, pcie_bw=25e9, cpu_cores=8,
                  calibration={"kernels": {"Q8_0": {"gemv_gbs": 34.0, "prefill_tflops": 0.4,
                                                    "moe_prefill_tflops": 0.3, "engine": "test"}}})
    assert cost.cpu_read_bw(hw, "IQ4_NL", None) == pytest.approx(34e9 * 18 / 34)
    assert cost.cpu_flops(hw, "IQ4_NL") == pytest.approx(0.4e12)
    assert cost.cpu_flops(hw, {"IQ4_NL": 0.5, "Q8_0": 0.5}, experts=True) == pytest.approx(0.3e12)


def test_measured_gpu_figures_replace_the_assumed_ones():
    """A GPU's measured GEMV rate replaces GPU_EFFICIENCY of its bandwidth for the weights it reads, and the
    measured launch + sync replaces SYNC_S; the notes say which GPU figures were measured."""
    spec = M.from_catalog("qwen3-30b-a3b")
    parts = {}
    for cal in ({}, {"gpus": [{"gemv_gbs": 350.0, "launch_sync_s": 50e-6}]}):
        hw = replace(rig(gpus=(8,)), calibration=cal)  # too small for every expert: CPU experts on GPU layers
        p = plan(spec, hw, options=PlanOptions(context=4096))
        lay = next(lay for lay in p.layouts() if lay.moe and lay.device == "gpu:0" and (~lay.on_gpu).any())
        parts[bool(cal)] = cost.layer_decode_parts(lay, hw, 1, None)
        notes = " ".join(p.prediction["assumptions"])
    (first0, beside0, cpu0, sync0), (first1, beside1, cpu1, sync1) = parts[False], parts[True]
    assert first1 == pytest.approx(first0 * 1000e9 * cost.GPU_EFFICIENCY / 350e9, rel=1e-9)
    assert beside1 == pytest.approx(beside0 * 1000e9 * cost.GPU_EFFICIENCY / 350e9, rel=1e-9)
    assert cpu1 == cpu0 and sync0 == cost.SYNC_S and sync1 == 50e-6
    assert "gpu:0 weight reads at 350 GB/s (measured" in notes and "sync measured at 50 us" in notes


def test_uncalibrated_plan_says_its_cpu_rates_are_assumed():
    p = _tiny_plan([])
    notes = " ".join(p.prediction["assumptions"])
    assert "not measured here" in notes and "offload probe" in notes
