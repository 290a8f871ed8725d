"""placement="auto": the engine plans itself with the same code path as `offload plan FILE`, keeps the plan as
`llm.plan`, and a model that does not fit stops before a byte of weights is read."""

import json
import subprocess

import pytest
import torch
from typer.testing import CliRunner

import offload
from offload.cli import app
from offload.errors import ConfigError, PlacementError
from offload.models.loading import LoadContext
from offload.planning import check_fits, make_plan
from tests.commands import offload_command
from tests.gguf.fixtures_models import gguf_models  # noqa: F401  (session fixture)


@pytest.fixture(autouse=True)
def no_saved_probe(tmp_path, monkeypatch):
    """Plans read `offload probe`'s saved profile when there is one: keep the user's out of the tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _cli_plan(model, *flags) -> dict:
    r = CliRunner().invoke(app, ["plan", str(model), "--format", "json", *flags])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_load_plan_is_offload_plan(tiny_checkpoint):
    """The plan offload.load places and the plan `offload plan FILE` prints for the same options are equal."""
    path = tiny_checkpoint("glm_moe_dsa")
    llm = offload.load(path, device="cpu", ctx=2048, progress=False)
    assert llm.plan == _cli_plan(path, "--ctx", "2048")
    assert llm.plan["status"] == "cpu_only" and llm.plan["options"]["context"] == 2048
    # a checkpoint is planned as loaded: every class in its dtype, not the default GGUF-like quant scheme
    assert llm.plan["model"]["classes"]["routed_experts"]["quant"] in ("F32", "BF16")
    llm = offload.load(path, device="cpu", ctx=1024, ram="16GiB", progress=False)
    assert llm.plan == _cli_plan(path, "--ctx", "1024", "--ram", "16GiB")


def test_gguf_load_plan_is_offload_plan(gguf_models):  # noqa: F811
    path = gguf_models.path("qwen3_moe", "Q4_K_M")
    llm = offload.load(path, device="cpu", progress=False)
    assert llm.plan == _cli_plan(path, "--ctx", "4096")
    assert llm.plan["quant"]["types"]["routed_experts"] in ("Q4_K", "Q5_K", "Q6_K")  # the file's own types


def test_auto_on_a_cpu_machine_changes_nothing(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    ids = list(range(3, 25))
    auto = offload.load(path, device="cpu", progress=False)
    explicit = offload.load(path, device="cpu", progress=False, placement=None)
    assert explicit.plan is None
    assert torch.equal(auto.logits(ids), explicit.logits(ids))


def test_does_not_fit_stops_before_the_weights(tiny_checkpoint, monkeypatch):
    path = tiny_checkpoint("glm4_moe")

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(LoadContext, "get", no_reads)
    with pytest.raises(PlacementError) as err:
        offload.load(path, device="cpu", ram="64MiB", progress=False)
    msg = str(err.value)
    assert "does not fit" in msg and "64.0 MiB RAM" in msg and "would fit with" in msg and "--page-from-disk" in msg


def test_does_not_fit_gguf_stops_before_the_weights(gguf_models, monkeypatch):  # noqa: F811
    from offload.gguf.source import GGUFSource

    def no_reads(*args, **kwargs):
        raise AssertionError("a weight was read")

    for reader in ("get", "blocks", "expert_blocks"):  # every way a weight's bytes are read
        monkeypatch.setattr(GGUFSource, reader, no_reads)
    with pytest.raises(PlacementError, match="does not fit"):
        offload.load(gguf_models.path("qwen3_moe", "Q8_0"), device="cpu", ram="64MiB", progress=False)


def test_page_from_disk_loads_and_says_so(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    ram = "8194MiB"  # 2 MiB beside the 8 GiB OS margin: the attention and the KV cache fit, the experts do not
    llm = offload.load(path, device="cpu", ram=ram, page_from_disk=True, progress=False)
    assert llm.plan["status"] == "does_not_fit_ram"
    assert any("from disk" in n for n in llm.plan["notes"])
    fits = offload.load(path, device="cpu", progress=False).plan
    assert llm.plan["prediction"]["decode_tok_s"] < fits["prediction"]["decode_tok_s"]  # at the disk's speed
    assert llm.plan == _cli_plan(path, "--ctx", "4096", "--ram", ram, "--page-from-disk")
    assert llm.generate([1, 2, 3], max_new_tokens=2).token_ids


def test_page_from_disk_refuses_when_the_copies_do_not_fit():
    """A paged load still copies attention, shared / dense MLPs and the KV cache into RAM: GLM-5.2 CPU-only on
    24 GiB (16 GiB beside the OS margin) cannot page, and says why before anything is read."""
    p = make_plan("glm-5.2", context=32768, page_from_disk=True, ram="24GiB")
    assert p.status == "does_not_fit_ram" and not getattr(p, "paged_from_disk", False)
    assert "--page-from-disk cannot help" in p.error and "attention" in p.error
    with pytest.raises(PlacementError, match="cannot help"):
        check_fits(p)
    q = make_plan("glm-5.2", context=32768, page_from_disk=True, ram="128GiB")  # the copies fit: it pages
    assert q.paged_from_disk and "cannot help" not in q.error
    on_gpu = make_plan("glm-5.2", context=32768, page_from_disk=True, ram="128GiB", gpu_mem=["24GiB"])
    # with attention on the GPU fewer bytes a token come from RAM at DRAM speed: the mixed rate is lower
    rate = [float(n.split("predicted at ")[1].split(" GB/s")[0]) for n in (q.notes[-1], on_gpu.notes[-1])]
    assert rate[1] < rate[0]


def test_cli_does_not_fit_exit_code_2(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    r = subprocess.run([*offload_command(), "generate", str(path), "--prompt", "hi", "--ram", "64MiB"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "does not fit" in lines[0], r.stderr
    assert r.stdout == ""


def test_cli_placement_flags(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("glm4_moe")
    plan = tmp_path / "plan.json"
    assert CliRunner().invoke(app, ["plan", str(path), "--ctx", "512", "-f", "json", "-o", str(plan)]).exit_code == 0
    for flags in (["--placement", str(plan)], ["--placement", "cpu"], ["--ctx", "512", "--ram", "16GiB"]):
        r = subprocess.run([*offload_command(), "generate", str(path), "--prompt", "hi", "-n", "3", "--device", "cpu",
                            *flags], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (flags, r.stderr)
    r = subprocess.run([*offload_command(), "generate", str(path), "--prompt", "hi", "--device", "cpu",
                        "--gpu-mem", "8GiB"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr


def test_load_prints_the_plan_summary(tiny_checkpoint, capsys):
    offload.load(tiny_checkpoint("glm4_moe"), device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "plan (cpu_only)" in err and "predicted decode" in err and "cpu" in err


def test_a_plan_that_does_not_fit_is_refused(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("glm4_moe")
    plan = tmp_path / "plan.json"
    r = CliRunner().invoke(app, ["plan", str(path), "--ram", "64MiB", "-f", "json", "-o", str(plan)])
    assert r.exit_code == 0
    with pytest.raises(PlacementError, match="does not fit"):
        offload.load(path, device="cpu", placement=str(plan), progress=False)
    with pytest.raises(ConfigError, match="gpu_mem"):
        offload.load(path, device="cpu", gpu_mem="8GiB", progress=False)
