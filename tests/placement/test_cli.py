"""`offload plan / probe / profile` from the command line."""

import json
import os
import subprocess

import pytest
from typer.testing import CliRunner

from offload.cli import app

from tests.commands import offload_command

runner = CliRunner()
RIG = ["--gpu", "24GiB", "--ram", "512GiB", "--dram-bw", "300GB/s", "--cpu-cores", "32"]


@pytest.fixture(autouse=True)
def _no_saved_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _offload(*args, env_cache):
    env = {**os.environ, "XDG_CACHE_HOME": env_cache}
    return subprocess.run([*offload_command(), *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_plan_with_no_flags_runs(tmp_path):
    """The README's main job on a machine with no weights and maybe no GPU."""
    r = _offload("plan", "glm-5.2", env_cache=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "offload plan: glm-5.2" in r.stdout and "Hardware (detected on this machine)" in r.stdout
    assert "--gpu 24GiB" in r.stdout  # tells how to describe other hardware


def test_bad_input_is_one_line_exit_2(tmp_path):
    r = _offload("plan", "glm-5.3", env_cache=str(tmp_path))
    assert r.returncode == 2 and "did you mean" in r.stderr and "glm-5.2" in r.stderr
    assert "Traceback" not in r.stderr
    r = _offload("plan", "glm-5.2", "--gpu", "0", env_cache=str(tmp_path))
    assert r.returncode == 2 and "--gpu" in r.stderr and "Traceback" not in r.stderr
    r = _offload("plan", "glm-5.2", "--gpu", "24GiB", "--ram", "128GiB", "--strict", env_cache=str(tmp_path))
    assert r.returncode == 2 and "RAM too small" in r.stderr and "Beyond one machine" in r.stdout
    bad = tmp_path / "bad_profile.json"
    bad.write_text('{"format": "offload.routing_profile", "n_experts": 3, "top_k": 1, "layers": {}}')
    r = _offload("plan", "glm-5.2", "--profile", str(bad), *RIG, env_cache=str(tmp_path))
    assert r.returncode == 2 and "experts per layer" in r.stderr


def test_json_output_is_the_contract(tmp_path):
    out = tmp_path / "plan.json"
    r = runner.invoke(app, ["plan", "glm-4.5-air", *RIG, "--gpu", "24GiB", "--format", "json", "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert [dv["name"] for dv in d["devices"]] == ["gpu:0", "gpu:1", "cpu"]
    assert d["model"]["total_params"] > 100e9 and d["prediction"]["decode_tok_s"] > 0
    assert all(e["expert"] is None for e in d["placement"] if e["tensor"] != "experts")


def test_markdown_and_quant_flags():
    r = runner.invoke(app, ["plan", "glm-5.2", *RIG, "--format", "md", "--attention", "q4_k", "--experts", "iq2_xxs"])
    assert r.exit_code == 0, r.output
    assert "| routed_experts |" in r.output and "IQ2_XXS" in r.output and "| attention |" in r.output
    assert "Q4_K" in r.output


def test_html_is_self_contained(tmp_path):
    out = tmp_path / "plan.html"
    r = runner.invoke(app, ["plan", "deepseek-v3", *RIG, "--format", "html", "-o", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    assert html.count("<svg") == 3
    assert "src=\"http" not in html and "<script" not in html and "<link" not in html


def test_export_llama_cpp():
    r = runner.invoke(app, ["plan", "qwen3-30b-a3b", "--gpu", "12GiB", "--ram", "64GiB", "--export", "llama-cpp"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("llama-server -m MODEL.gguf -ngl ")
    assert "--n-cpu-moe" in r.output and "_exps" in r.output


def test_probe_quick(tmp_path):
    out = tmp_path / "hw.json"
    r = runner.invoke(app, ["probe", "--quick", "-o", str(out)])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["format"] == "offload.hardware" and d["ram_bytes"] > 0
    r = runner.invoke(app, ["plan", "qwen3-30b-a3b", "--hardware", str(out), "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.output)["hardware"]["source"] == "probe"


def test_probe_calibrates_this_engine(tmp_path):
    """`offload probe` measures the engine's own kernels, its decode fixed costs and DRAM (a median of
    reads); the plan reads them back, uses them, and says what was measured and what is assumed."""
    out = tmp_path / "hw.json"
    r = runner.invoke(app, ["probe", "--short", "-o", str(out)])
    assert r.exit_code == 0, r.output
    cal = json.loads(out.read_text())["calibration"]
    assert {"Q4_K", "Q8_0"} <= set(cal["kernels"]) and all(k["gemv_gbs"] > 0 for k in cal["kernels"].values())
    assert all(k["moe_prefill_tflops"] > 0 for k in cal["kernels"].values())
    assert "as fused experts" in r.output and "prefill cost beside the matrices" in r.output
    assert cal["prefill_s_per_token_hidden"] >= 0
    assert cal["layer_s"] >= 0 and cal["token_s"] >= 0 and len(cal["dram_reads_gbs"]) >= 3
    assert "GB/s at one token" in r.output and "per layer" in r.output
    rates = cal["prefetch_gbs"]  # the kernels' prefetch distance: the fastest of those measured in turns
    assert cal["prefetch_ahead"] in (0, 2304, 9216) and rates[str(cal["prefetch_ahead"])] == max(rates.values())
    assert "CPU prefetch" in r.output
    r = runner.invoke(app, ["plan", "qwen3-30b-a3b", "--hardware", str(out), "--format", "json"])
    d = json.loads(r.output)
    assert d["hardware"]["calibration"] == cal
    notes = " ".join(d["prediction"]["assumptions"])
    assert "measured by offload probe" in notes and "per CPU layer" in notes and "assumed" in notes


def test_profile_records_routing(tmp_path):
    """`offload profile` on a tiny real checkpoint, then `offload plan --profile` with the result."""
    from offload.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint("glm4_moe", tmp_path / "tiny")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe quick brown fox\n")
    out = tmp_path / "profile.json"
    r = runner.invoke(app, ["profile", str(ckpt), "--prompts", str(prompts), "-o", str(out),
                            "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["format"] == "offload.routing_profile" and d["n_experts"] == 8 and d["top_k"] == 2
    assert sorted(d["layers"]) == ["1", "2"]  # layer 0 is dense
    totals = {k: sum(v) for k, v in d["layers"].items()}
    assert totals["1"] == totals["2"] == 2 * d["n_tokens"] > 0
    r = runner.invoke(app, ["plan", str(ckpt), "--profile", str(out), "--gpu", "1GiB", "--ram", "8GiB",
                            "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["routing"]["uniform"] is False


def test_a_bad_gpu_budget_names_the_flag_given(monkeypatch):
    """--gpu-mem on a machine with no GPU plans for GPUs of that budget: a bad size is still a --gpu-mem error."""
    monkeypatch.setattr("offload.planning.detect_gpus", lambda: [])
    r = runner.invoke(app, ["plan", "glm-4.5-air", "--gpu-mem", "0"])
    assert r.exit_code != 0 and "--gpu-mem" in str(r.exception) and "'0' must be positive" in str(r.exception)
