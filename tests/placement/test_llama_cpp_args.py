"""The llama.cpp arguments `offload plan` suggests: a CPU-only plan offloads nothing, so it gets no -ot /
--n-cpu-moe (they move tensors of offloaded layers back to the CPU) and -ngl only where a GPU was seen."""

from typer.testing import CliRunner

from offload.cli import app
from offload.placement import model as M
from offload.placement.planner import PlanOptions, plan
from offload.placement.recipe import llama_cpp_args

from tests.placement.helpers import rig

GPU_ONLY_FLAGS = ("-ot", "--override-tensor", "--n-cpu-moe", "--tensor-split")


def _args(gpus):
    p = plan(M.from_catalog("glm-4.5-air"), rig(gpus=gpus, ram=512), options=PlanOptions(context=8192, full=False))
    return p, llama_cpp_args(p)


def test_no_gpu_gets_neither_ngl_nor_ot():
    p, lc = _args(())
    assert p.status == "cpu_only"
    assert lc["args"] == ["-c", "8192", "-t", "32", "-fa", "on"]
    assert lc["command"] == "llama-server -m MODEL.gguf -c 8192 -t 32 -fa on"
    assert lc["n_cpu_moe_command"] is None and lc["gpu_expert_layers"] == []


def test_a_gpu_too_small_to_use_gets_ngl_0_and_no_ot():
    """llama.cpp's -ngl defaults to offloading (auto) in a CUDA build: a plan that uses no GPU says -ngl 0."""
    p, lc = _args((0.5,))
    assert p.status == "cpu_only" and p.hw.gpus
    assert lc["args"][:2] == ["-ngl", "0"] and not set(GPU_ONLY_FLAGS) & set(lc["args"])


def test_a_gpu_plan_still_keeps_the_experts_on_the_cpu():
    p, lc = _args((24,))
    assert p.status == "ok" and lc["args"][0] == "-ngl" and int(lc["args"][1]) > 0
    assert "-ot" in lc["args"] and "--n-cpu-moe" in lc["n_cpu_moe_command"]


def test_plan_export_on_a_machine_without_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no saved probe profile
    monkeypatch.setattr("offload.planning.detect_gpus", lambda: [])
    r = CliRunner().invoke(app, ["plan", "glm-4.5-air", "--ram", "512GiB", "--ctx", "8192", "--cpu-cores", "16",
                                 "--export", "llama-cpp"])
    assert r.exit_code == 0, r.output
    commands = [ln for ln in r.output.splitlines() if not ln.startswith("#")]
    assert commands == ["llama-server -m MODEL.gguf -c 8192 -t 16 -fa on"]  # (no "# or: ... --n-cpu-moe")
    r = CliRunner().invoke(app, ["plan", "glm-4.5-air", "--ram", "512GiB", "--format", "md"])
    assert r.exit_code == 0 and "exps=CPU" not in r.output and "-ngl" not in r.output
