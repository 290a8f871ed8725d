"""The plan's bytes per home against what the loaded model really holds (offload.held_bytes), for the GGUF
fixtures of every architecture under a plan made for a GPU of a chosen size and placed as offload.load places
it, GPU homes on a CPU stand-in (test_homes) whose matrices are Triton blocks as on a real GPU, bf16 as a GPU
load. Weights only: the KV cache is counted by the plan, not held by the model until a cache is made.

Stand-in artefacts kept out of the comparison (on CUDA they do not happen): a stand-in device is of type "cpu",
so a GPU layer's MLA attention also builds the CPU's quantised per-head W_UK / W_UV copies (LoadContext.heads),
and F32 vectors (a router's bias) are read as zero-copy views of the file."""

import pytest
import torch

from offload.held_bytes import held_bytes
from offload.placement import report
from offload.planning import homes_from_plan, make_plan
from tests.gguf.fixtures_models import gguf_models  # noqa: F401  (session fixture)

ARCHS = ["qwen3_moe", "glm4_moe", "deepseek_v3", "glm_moe_dsa"]
STAND_IN = torch.device("cpu", 0)  # the "gpu:0" home


def _plan(path, gpu_bytes: int):
    return make_plan(path, context=64, gpu=[f"{gpu_bytes}B"], ram="64GiB")


def mixed_plan(path, want: str = "experts"):
    """The plan for a GPU sized so that about half the routed experts are on it (want="experts"), or so that
    the first layer runs on the CPU (want="layers"): bisected on the GPU's size with decode-only plans (the
    GPU-budget sweep of a full plan is 24 more), then made as `offload plan` makes it."""
    from dataclasses import replace

    from offload.placement import planner
    from offload.planning import find_hardware, model_spec

    spec, quant = model_spec(path)
    hw = find_hardware(gpu=["1GiB"], ram="64GiB")
    opts = planner.PlanOptions(context=64, strict=False, full=False)
    lo, hi = 2**29, 2**32
    for _ in range(28):
        mid = (lo + hi) // 2
        p = planner.plan(spec, replace(hw, gpus=[replace(hw.gpus[0], memory_bytes=mid)]), quant, None, opts)
        if want == "experts":
            n = sum(int(m.sum()) for m in p.gpu_experts.values())
            low = n < sum(len(m) for m in p.gpu_experts.values()) / 2
        else:
            low = sum(h == "gpu:0" for h in p.homes.values()) < len(p.homes) - 1
        lo, hi = (mid, hi) if low else (lo, mid)
    return _plan(path, hi)


def load(path, plan):
    """The model as offload.load places `plan` on a GPU, with gpu:0 on the stand-in."""
    from offload.gguf.names import hf_config
    from offload.gguf.reader import GGUFFile
    from offload.gguf.source import GGUFSource
    from offload.models import architecture
    from offload.models.loading import LoadContext

    gguf = GGUFFile(path)
    config = hf_config(gguf.metadata, gguf.tensors, str(path))
    arch = architecture(config["model_type"])
    ctx = LoadContext(GGUFSource(gguf), torch.device("cpu"), torch.bfloat16, home_devices={"gpu:0": STAND_IN},
                      triton=True)
    homes = homes_from_plan(report.to_json(plan))
    homes.apply(ctx)
    model = arch.build(ctx, arch.ModelArgs.from_config(config))
    model.gguf = gguf
    return model, homes


def measured(model, homes):
    held = held_bytes(model, lambda d: "gpu:0" if d == STAND_IN else "cpu", homes.embed, homes.head)
    for path, home, cls, n, _ in held.parts:  # the stand-in's per-head copies (see the module docstring)
        if home == "cpu" and (".uk_q." in path or ".uv_q." in path):
            layer = int(path.split("[")[1].split("]")[0])
            if model.layers[layer].device == STAND_IN:
                held.by_home["cpu"][cls] -= n
    return held


def compare(plan, held) -> list[str]:
    """Per home and class, planned vs held bytes (weights), as lines; also checks both name the same classes."""
    usage = plan.usage()
    lines = []
    for home in sorted(set(usage) | set(held.by_home)):
        want = {c: n for c, n in usage.get(home, {}).items() if c != "kv_cache" and n}
        got = {c: n for c, n in held.by_home.get(home, {}).items() if c != "buffers" and n}
        for c in sorted(set(want) | set(got)):
            lines.append(f"{home} {c}: plan {want.get(c, 0)} held {got.get(c, 0)}")
    return lines


def check(plan, held, rel: float):
    """Each class of each home within `rel` of the plan (or 4 KiB: a CPU home's float vectors are held in the load
    dtype, bf16, where the plan counts the file's float32: the head's final norm), each home's total within 5 %."""
    usage = plan.usage()
    report_lines = "\n".join(compare(plan, held))
    for home in sorted(set(usage) | set(held.by_home)):
        want = {c: n for c, n in usage.get(home, {}).items() if c != "kv_cache" and n}
        got = {c: n for c, n in held.by_home.get(home, {}).items() if c != "buffers" and n}
        assert set(want) == set(got), f"{home}: classes differ\n{report_lines}"
        for c in want:
            assert got[c] == pytest.approx(want[c], rel=rel, abs=4096), f"{home} {c}\n{report_lines}"
        assert sum(got.values()) == pytest.approx(sum(want.values()), rel=0.05), f"{home}\n{report_lines}"


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("arch", ARCHS)
def test_plan_counts_what_a_mixed_gpu_placement_holds(gguf_models, arch, fmt):  # noqa: F811
    """Half the routed experts on the (stand-in) GPU, every layer there: the planned bytes per home and class
    are what the loader holds (float kv_b, bf16 norms and router, matrices the Triton kernels do not take
    expanded, a tied embedding with the head) to within a few hundred bytes a class."""
    path = gguf_models.path(arch, fmt)
    plan = mixed_plan(path)
    on_gpu = sum(int(m.sum()) for m in plan.gpu_experts.values())
    assert 0 < on_gpu < sum(len(m) for m in plan.gpu_experts.values())  # mixed
    model, homes = load(path, plan)
    check(plan, measured(model, homes), rel=0.01)


@pytest.mark.parametrize("arch", ["glm_moe_dsa", "deepseek_v3"])
def test_a_cpu_layer_of_a_gpu_plan(gguf_models, arch):  # noqa: F811
    """The first layer on the CPU (the plan's fallback): both homes as planned, class by class; a CPU MLA layer's
    attention holds kv_b twice (float W_UK / W_UV in the load dtype, and the per-head quantised copies of
    LoadContext.heads where both parts are quantised) and the plan counts both. (triton=True puts the CPU
    layer's matrices on Triton blocks too: the same bytes as the native kernels' blocks.)"""
    path = gguf_models.path(arch, "Q8_0")
    plan = mixed_plan(path, want="layers")
    assert plan.homes[0] == "cpu" and plan.homes[len(plan.homes) - 1] == "gpu:0"
    model, homes = load(path, plan)
    check(plan, measured(model, homes), rel=0.01)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_cpu_load_holds_what_its_plan_counts(gguf_models, arch, fmt):  # noqa: F811
    """offload.load on the CPU (float32, the native kernels' blocks, the plan it made kept as llm.plan): RAM holds
    what the plan's CPU device counts, class by class."""
    import offload

    llm = offload.load(gguf_models.path(arch, fmt), device="cpu", ctx=64, progress=False)
    cpu = next(d for d in llm.plan["devices"] if d["name"] == "cpu")
    held = held_bytes(llm.model)
    assert set(held.by_home) == {"cpu"}
    want = {c: n for c, n in cpu["by_class"].items() if c != "kv_cache" and n}
    got = {c: n for c, n in held.by_home["cpu"].items() if c != "buffers" and n}
    lines = "\n".join(f"{c}: plan {want.get(c, 0)} held {got.get(c, 0)}" for c in sorted(set(want) | set(got)))
    assert set(want) == set(got), lines
    for c in want:
        assert got[c] == pytest.approx(want[c], rel=0.01, abs=4096), f"{c}\n{lines}"


def test_counting_rules(tmp_path):
    """Storages count once whoever shares them (a tied head, a view); a view of a memory-mapped file counts the
    bytes it spans, as mapped; a numpy view of an array that owns its memory holds the whole array."""
    import mmap
    from types import SimpleNamespace

    import numpy as np

    from offload.models.decoder import Layer
    from offload.models.weights import Linear

    table = torch.zeros(100, 8)  # 3200 bytes
    f = tmp_path / "blob"
    f.write_bytes(bytes(4096))
    with open(f, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    owned = np.zeros(1000, np.uint8)
    foreign = SimpleNamespace(t=torch.zeros(1000))  # not an offload object: not walked
    layer = Layer(torch.ones(8), Linear(table[:10]), torch.ones(8), Linear(torch.zeros(4, 4)), STAND_IN)
    layer.attn = Linear(torch.zeros(2, 2))
    layer.attn.extra = [np.frombuffer(mm, np.uint8, count=512, offset=1024), owned[:10], foreign]
    model = SimpleNamespace(embed=Linear(table), lm_head=Linear(table), norm=torch.ones(8), layers=[layer],
                            gguf=SimpleNamespace(_shards=[SimpleNamespace(mm=mm)]))
    held = held_bytes(model, lambda d: "gpu:0" if d == STAND_IN else "cpu", embed_home="cpu", head_home="cpu")
    assert held.by_home["cpu"] == {"embeddings": 3200, "lm_head": 32, "attention": 512 + 1000}
    assert held.by_home["gpu:0"] == {"norms": 64, "attention": 16, "dense_ffn": 64}
    assert held.mapped == {"cpu": 512}


def test_triton_formats_table_matches_the_kernels():
    """placement.held's table (pure Python) is the Triton kernels' own list of formats and column multiples."""
    from offload.gguf.types import GGMLType
    from offload.kernels.gpu.formats import FORMATS, check_format
    from offload.placement.held import TRITON_COLS

    names = {GGMLType(f).name for f in FORMATS if f in GGMLType._value2member_map_}
    assert names == set(TRITON_COLS)
    for name, unit in TRITON_COLS.items():
        check_format(int(GGMLType[name]), unit)
        if unit > 2:
            with pytest.raises(ValueError):
                check_format(int(GGMLType[name]), unit // 2)
