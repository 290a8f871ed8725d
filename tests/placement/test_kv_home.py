"""Where a DSA model's KV lives: the latent + rope-key cache with each layer or in RAM (the indexer keys stay
with the layer), what a decode step then copies over PCIe, by hand; and GLM-5.2 at 1M tokens on one 24 GB GPU."""

import pytest

from offload.placement import model as M
from offload.placement import report
from offload.placement.hardware import GPU, GiB, Hardware
from offload.placement.planner import PlanOptions, decode_step, plan

from tests.placement.test_planner import BF16, TINY

# a tiny GLM-DSA: 2 layers, one runs its indexer, the other shares its pick; kv_lora 64 + rope 16, topk 32
DSA = {"model_type": "glm_moe_dsa", "hidden_size": 256, "num_hidden_layers": 2, "vocab_size": 1000,
       "intermediate_size": 512, "moe_intermediate_size": 128, "n_routed_experts": 4, "num_experts_per_tok": 2,
       "n_shared_experts": 1, "first_k_dense_replace": 0, "num_attention_heads": 4, "q_lora_rank": 64,
       "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
       "index_n_heads": 2, "index_head_dim": 32, "index_topk": 32, "indexer_types": ["full", "shared"]}
ROW = (64 + 16) * 2  # bytes of one cached latent + rope-key row


def _hw(gpu_gib=8):
    return Hardware(gpus=[GPU("g", int(gpu_gib * GiB), 1000e9, 100)], ram_bytes=64 * GiB, dram_bw=100e9,
                    pcie_bw=25e9, cpu_cores=8)


def _plan(home, pos=512, spec=None, hw=None, ctx=1024):
    spec = spec or M.from_hf_config(DSA, name="tiny-dsa")
    return plan(spec, hw or _hw(), BF16, options=PlanOptions(context=ctx, decode_position=pos, kv_home=home,
                                                              full=False))


@pytest.mark.parametrize("pos", [8, 32, 512])
def test_row_moves_by_hand(pos):
    """Latent in RAM adds exactly min(pos, topk) rows x row bytes / PCIe per GPU layer to a decode step."""
    on_gpu, in_ram = _plan("gpu", pos), _plan("ram", pos)
    assert all(h == "gpu:0" for h in in_ram.homes.values())
    extra = decode_step(in_ram, in_ram.layouts())["step_s"] - decode_step(on_gpu, on_gpu.layouts())["step_s"]
    assert extra == pytest.approx(2 * min(pos, 32) * ROW / 25e9, rel=1e-9)
    kv = report.to_json(in_ram)["kv"]
    assert kv["decode_row_move_bytes"] == 2 * min(pos, 32) * ROW


def test_latent_in_ram_index_keys_with_the_layer():
    p = _plan("ram", ctx=1000)
    rows = {(e["tensor"], e["layer"]): e for e in report.to_json(p)["placement"] if e["class"] == "kv_cache"}
    assert rows[("kv_cache", 0)]["device"] == rows[("kv_cache", 1)]["device"] == "cpu"
    assert rows[("kv_cache", 0)]["bytes"] == 1000 * ROW
    assert rows[("index_keys", 0)] == {**rows[("index_keys", 0)], "device": "gpu:0", "bytes": 1000 * 32 * 2}
    assert ("index_keys", 1) not in rows  # the shared layer holds no indexer keys
    use = p.usage()
    assert use["gpu:0"]["kv_cache"] == 1000 * 32 * 2 and use["cpu"]["kv_cache"] == 2 * 1000 * ROW
    line = report.kv_line(report.to_json(p))
    assert "latent in RAM" in line and "RAM 312.5 KiB" in line  # 2 layers x 1000 x 160 B
    with_layer = _plan("gpu", ctx=1000).usage()
    assert with_layer["gpu:0"]["kv_cache"] == 2 * 1000 * ROW + 1000 * 32 * 2 and "kv_cache" not in with_layer["cpu"]


def test_auto_keeps_the_kv_on_the_gpu_when_it_fits():
    p = _plan("auto")
    assert not p.kv_ram and p.kv_choice["gpu"] > p.kv_choice["ram"]


def test_models_without_dsa_keep_their_kv_with_the_attention():
    spec = M.from_hf_config(TINY, name="tiny")
    p = _plan("ram", spec=spec)
    assert not p.kv_ram and any("DSA models" in n for n in p.notes)
    assert all(e["device"] == "gpu:0" for e in report.to_json(p)["placement"] if e["class"] == "kv_cache")
    assert not _plan("auto", spec=spec).kv_choice


def test_bad_kv_home():
    from offload.errors import PlacementError

    with pytest.raises(PlacementError, match="kv_home"):
        _plan("disk")


def test_glm52_at_1m_tokens_on_one_24gb_gpu():
    """The latent (84 GiB at 1M) goes to RAM: more attention layers stay on the GPU than with the KV there, and
    the decode prediction, higher, counts the copied rows."""
    spec = M.from_catalog("glm-5.2")
    hw = Hardware(gpus=[GPU("4090", 24 * GiB, 1000e9, 165)], ram_bytes=768 * GiB, dram_bw=60e9, pcie_bw=25e9,
                  cpu_cores=32)
    opts = PlanOptions(context=1_000_000, strict=False, full=False)
    p = plan(spec, hw, options=opts)
    kv_gpu = plan(spec, hw, options=PlanOptions(context=1_000_000, strict=False, full=False, kv_home="gpu"))
    assert p.kv_ram and p.status != "does_not_fit_ram"
    n_gpu = sum(h == "gpu:0" for h in p.homes.values())
    assert n_gpu > 2 * sum(h == "gpu:0" for h in kv_gpu.homes.values())
    d = report.to_json(p)
    gpu = d["devices"][0]
    assert gpu["used_bytes"] <= gpu["budget_bytes"]
    # as many as fit: the next layer's weights + indexer keys would not
    cpu_layers = [it for it in p.items if p.homes[it.index] == "cpu"]
    if cpu_layers:
        assert cpu_layers[-1].fixed_bytes > gpu["budget_bytes"] - gpu["used_bytes"]
    moved = n_gpu * 2048 * (512 + 64) * 2
    assert d["kv"]["decode_row_move_bytes"] == moved
    assert d["kv"]["decode_row_move_s"] == pytest.approx(moved / 25e9)
    assert d["kv"]["latent_bytes"] == {"cpu": 78 * 1_000_000 * (512 + 64) * 2}
    assert p.prediction["decode_tok_s"] > kv_gpu.prediction["decode_tok_s"]


def test_offload_plan_kv_home_flag(tmp_path, monkeypatch):
    """`offload plan --kv-home ram` on the tiny DSA config: the JSON and the report line say where the KV is."""
    import json

    from typer.testing import CliRunner

    from offload.cli import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no saved probe
    (tmp_path / "config.json").write_text(json.dumps(DSA))
    rig = ["--gpu", "8GiB", "--ram", "64GiB", "--ctx", "1000"]
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(app, ["plan", str(tmp_path), *rig, "--kv-home", "ram", "-f", "json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["options"]["kv_home"] == "ram" and d["kv"]["latent_bytes"] == {"cpu": 2 * 1000 * ROW}
    r = CliRunner().invoke(app, ["plan", str(tmp_path), *rig, "-f", "md"])
    assert r.exit_code == 0 and "KV (1000 tokens, with each layer)" in r.output  # auto: it fits, stays on the GPU
    r = CliRunner().invoke(app, ["plan", str(tmp_path), *rig, "--kv-home", "disk"])
    assert r.exit_code != 0 and "kv_home must be auto, gpu or ram" in str(r.exception)
