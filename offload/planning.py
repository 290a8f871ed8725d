"""One plan from load to serve: the plan `offload plan FILE` prints is the plan `offload.load(FILE)` places.

Both call `make_plan` with the same options: the model's own tensors (a GGUF's types, a checkpoint's dtype as
loaded), the hardware found (GPUs' free memory via torch.cuda, RAM, cores; `offload probe`'s saved profile when
there is one; flags override), the context and a routing profile. `homes_from_plan` turns the plan's JSON
document into the engine's homes: experts, layers, embedding and head.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from offload.errors import ConfigError, PlacementError


def detect_gpus() -> list:
    """GPUs from torch.cuda with their free memory; [] without torch, CUDA or an NVIDIA driver."""
    from offload.placement.hardware import GPU, gpu_specs

    if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0")):
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(i)
        free, _total = torch.cuda.mem_get_info(i)
        bw, tf = gpu_specs(name)
        out.append(GPU(name, int(free), bw, tf))
    return out


def find_hardware(gpu: list[str] | None = None, gpu_mem: list[str] | None = None, ram: str | None = None,
                  dram_bw: str | None = None, pcie_bw: str | None = None, gpu_bw: str | None = None,
                  cpu_cores: int | None = None, cpu_tflops: float | None = None, disk_bw: str | None = None,
                  hardware: str | Path | None = None, use_gpus: bool = True):
    """This machine (saved probe profile, else detected) with the flags applied.

    gpu: hypothetical GPUs ("24GiB", "RTX 4090:24GiB") replacing the detected ones (planning for another rig);
    gpu_mem: a budget per detected GPU (the smaller of it and the GPU's free memory); use_gpus=False plans
    CPU-only whatever is installed (device="cpu")."""
    from offload.placement import hardware as H

    if hardware:
        hw = H.load_profile(hardware)
    elif H.profile_path().exists():
        hw = H.load_profile(H.profile_path())
    else:
        hw = H.detect([] if gpu or not use_gpus else detect_gpus())
    if not use_gpus:
        hw = replace(hw, gpus=[])
    flags: dict = {}
    if gpu:
        gpus = []
        for i, g in enumerate(gpu):
            name, _, size = g.rpartition(":") if ":" in g else ("", "", g)
            bw, tf = H.gpu_specs(name) if name else (H.DEFAULT_GPU[0] * H.GB, H.DEFAULT_GPU[1])
            gpus.append(H.GPU(name or f"GPU{i} (4090-class)", H.parse_size(size, "--gpu"), bw, tf))
        flags["gpus"] = gpus
    elif gpu_mem:
        budgets = [H.parse_size(s, "--gpu-mem") for s in gpu_mem]  # (an error names the flag given)
        if not hw.gpus:  # nothing detected: plan for GPUs of these budgets (offload.load refuses before this)
            return find_hardware(list(gpu_mem), None, ram, dram_bw, pcie_bw, gpu_bw, cpu_cores, cpu_tflops,
                                 disk_bw, hardware, use_gpus)
        if len(gpu_mem) > len(hw.gpus):
            raise ConfigError(f"--gpu-mem given {len(gpu_mem)} times but {len(hw.gpus)} GPU(s) found")
        flags["gpus"] = [replace(g, memory_bytes=min(g.memory_bytes, budgets[i])) if i < len(budgets) else g
                         for i, g in enumerate(hw.gpus)]
    if ram:
        flags["ram_bytes"] = H.parse_size(ram, "--ram")
    if dram_bw:
        flags["dram_bw"] = H.parse_bandwidth(dram_bw, "--dram-bw")
    if pcie_bw:
        flags["pcie_bw"] = H.parse_bandwidth(pcie_bw, "--pcie-bw")
    if disk_bw:
        flags["disk_bw"] = H.parse_bandwidth(disk_bw, "--disk-bw")
    if cpu_cores is not None:
        flags["cpu_cores"] = cpu_cores
    if cpu_tflops is not None:
        flags["cpu_tflops"] = cpu_tflops
    if flags:
        notes = [n for n in hw.notes if not (("DRAM" in n and "dram_bw" in flags) or ("PCIe" in n and "pcie_bw" in flags))]
        if "cpu_cores" in flags and "cpu_tflops" not in flags:
            flags["cpu_tflops"] = H.estimate_cpu_tflops(flags["cpu_cores"], hw.cpu_flags)
        hw = replace(hw, **flags, notes=notes, source="flags" if "gpus" in flags and "ram_bytes" in flags
                     else f"{hw.source}+flags")
    if gpu_bw:
        bw = H.parse_bandwidth(gpu_bw, "--gpu-bw")
        hw.gpus = [replace(g, mem_bw=bw) for g in hw.gpus]
    if not hw.gpus and not gpu:
        hw.notes.append("no CUDA GPU in this plan: CPU-only; pass --gpu 24GiB to `offload plan` to plan for a GPU")
    return hw


def parse_context(text: str | int) -> int:
    """Tokens like 32768, 32k or 1m."""
    t = str(text).strip().lower()
    mult = 1024 if t.endswith("k") else 1024 * 1024 if t.endswith("m") else 1
    try:
        value = int(float(t.rstrip("km")) * mult)
    except ValueError:
        raise ConfigError(f"--ctx: cannot read {text!r}, expected tokens like 32768 or 32k") from None
    if value <= 0:
        raise PlacementError(f"--ctx must be positive, got {text!r}")
    return value


def _checkpoint_scheme(spec, ckpt: Path, dtype: str | None):
    """A Hugging Face checkpoint as offload.load holds it: every class in the load dtype (FP8 blocks are
    dequantised on read), norms and routers in fp32."""
    from offload.placement.quant import QuantScheme, default_scheme

    name = str(dtype or "").lower()
    if not name:
        import json

        try:
            cfg = json.loads((ckpt / "config.json").read_text())
        except (OSError, ValueError):
            cfg = {}
        name = str((cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16") if isinstance(cfg, dict) else "")
    stored = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16"}.get(name, "BF16")
    types = {cls: stored for cls in default_scheme().types}
    return QuantScheme(types)


def model_spec(model, dtype: str | None = None, overrides: dict[str, str] | None = None):
    """(ModelSpec, QuantScheme) of a catalog name, config.json, checkpoint directory or GGUF file (a path, or the
    loader's open GGUFFile: its header is not parsed again); a checkpoint directory with weights is planned in its
    load dtype, a GGUF with its own tensors' types."""
    from offload.placement.model import load_model
    from offload.placement.quant import default_scheme

    spec = load_model(model)
    if "quant" in spec.extra:  # (every GGUF)
        quant = spec.extra["quant"]
    elif Path(model).is_dir() and any(Path(model).glob("*.safetensors")):
        quant = _checkpoint_scheme(spec, Path(model), dtype)
    else:
        quant = default_scheme()
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    if overrides:  # flags win over the defaults and over what the file stores
        base = quant
        quant = default_scheme({**base.types, **overrides})
        quant.measured = {k: v for k, v in base.measured.items() if k not in overrides}
        quant.mix = {k: v for k, v in base.mix.items() if k not in overrides}
        quant.layers = {k: v for k, v in base.layers.items() if k not in overrides}
        quant.cpu_layers = {k: v for k, v in base.cpu_layers.items() if k not in overrides}
        quant.cpu_float = base.cpu_float
    return spec, quant


def make_plan(model, *, context: int, concurrency: int = 1, mtp: bool = False,
              profile: str | Path | None = None, dtype: str | None = None,
              quant_overrides: dict[str, str] | None = None, page_from_disk: bool = False, kv_home: str = "auto",
              **hardware_flags):
    """The plan for `model` (as model_spec takes it) on this machine (or the one the flags describe): planner.Plan,
    not raising when the model does not fit RAM (its status says so; `check_fits` raises)."""
    from offload.placement import planner
    from offload.placement.profile import load_profile

    if concurrency <= 0:
        raise PlacementError(f"--concurrency must be positive, got {concurrency}")
    spec, quant = model_spec(model, dtype, quant_overrides)
    hw = find_hardware(**hardware_flags)
    routing = load_profile(profile) if profile else None
    opts = planner.PlanOptions(context=context, concurrency=concurrency, mtp=mtp, strict=False, kv_home=kv_home)
    p = planner.plan(spec, hw, quant, routing, opts)
    if p.status == "does_not_fit_ram":
        p.error = _what_would_fit(p)
        if page_from_disk:
            p = _paged(p, spec, quant, routing, opts)
    return p


PAGEABLE = ("routed_experts", "embeddings", "lm_head")  # what a paged load leaves as the file's pages


def _what_would_fit(p) -> str:
    """The planner's RAM error, plus the context that would fit and whether paging from disk would."""
    from offload.placement import planner
    from offload.placement.hardware import fmt_bytes

    msg = p.error
    ctx = p.options.context
    while ctx > 256:
        ctx //= 2
        q = planner.plan(p.spec, p.hw, p.quant, p.profile, replace(p.options, context=ctx, full=False))
        if q.status != "does_not_fit_ram":
            msg += f", or a context of {ctx} tokens (--ctx {ctx})"
            break
    copied, room = _paged_copies(p)
    if copied > room:
        return msg + (f"; --page-from-disk cannot help: it pages only the routed experts and the embedding / head "
                      f"tables, and the rest held in RAM (attention, shared and dense MLPs, KV cache) is "
                      f"{fmt_bytes(copied)} > {fmt_bytes(room)}")
    return msg + "; --page-from-disk loads it anyway and reads what RAM cannot hold from disk (slow)"


def _paged_copies(p) -> tuple[float, float]:
    """(bytes a paged load still copies into RAM, the RAM there is for weights)."""
    from offload.placement import planner

    cpu = p.usage()["cpu"]
    copied = planner.cpu_resident_bytes(p) - sum(cpu.get(c, 0.0) for c in PAGEABLE)
    return copied, max(p.hw.ram_bytes - planner.os_margin(p.hw, p.options), 1.0)


def _paged(p, spec, quant, routing, opts):
    """Weights beyond RAM are read from disk (mmap, as llama.cpp allows). A paged load keeps only the routed
    experts and the embedding / head tables as the file's pages; attention, norms, router, dense and shared MLPs
    and the KV cache are copied into RAM as usual and must fit it. Each token reads the non-pageable CPU bytes
    at DRAM speed and the pageable ones partly from disk (the share RAM cannot hold), so decode is predicted at
    that mixed rate; a plan whose copies alone exceed RAM stays `does_not_fit_ram`."""
    from offload.placement import planner
    from offload.placement.hardware import GB, fmt_bytes

    cpu = p.usage()["cpu"]
    need = sum(cpu.values())
    copied, room = _paged_copies(p)
    if copied > room:  # the error says so (_what_would_fit)
        return p
    pageable = need - copied
    on_disk = min(max(need - room, 0.0) / max(pageable, 1.0), 1.0)  # of the pageable bytes
    # per token: the CPU layers' own weights and their routed experts' (cpu_bytes_per_token), and the head
    total = p.prediction["cpu_bytes_per_token"] + cpu.get("lm_head", 0.0)  # (the embedding: a row)
    other_read = min(copied - cpu.get("kv_cache", 0.0), total)  # the copies are read from RAM
    paged_read = total - other_read
    bw = total / ((other_read + paged_read * (1 - on_disk)) / p.hw.dram_bw + paged_read * on_disk / p.hw.disk_bw)
    note = (f"--page-from-disk: {fmt_bytes(need - room)} of the {fmt_bytes(pageable)} of routed experts and "
            f"tables do not fit RAM beside the {fmt_bytes(copied)} copied into it, and are read from disk at "
            f"{p.hw.disk_bw / GB:.1f} GB/s: CPU reads predicted at {bw / GB:.2f} GB/s")
    q = planner.plan(spec, replace(p.hw, dram_bw=bw), quant, routing, opts)
    q.error, q.paged_from_disk = p.error, True
    q.notes.append(note)
    return q


def check_fits(p) -> None:
    """Raise PlacementError (before any weight is read) when the plan does not fit."""
    if p.status == "does_not_fit_ram" and not getattr(p, "paged_from_disk", False):
        raise PlacementError(f"{p.spec.name}: does not fit this machine: {p.error}")


@dataclass
class Homes:
    """Where the engine puts things: routed experts per layer, each layer's other weights, embedding, head.
    Home names: "cpu", "gpu" (the main device), "gpu:N"."""

    experts: Callable[[int, int], list[str]] | None = None  # (layer, n_experts) -> home per expert
    layer: Callable[[int], str] | None = None  # layer -> home of attention, norms, router, shared / dense MLP
    embed: str | None = None
    head: str | None = None
    kv: Callable[[int], str] | None = None  # layer -> home of its KV cache (a DSA latent in RAM); None: the layer's

    def apply(self, ctx) -> None:
        """Set these homes on a models.loading.LoadContext."""
        ctx.placement = self.experts
        ctx.layer_home = self.layer
        ctx.kv_home = self.kv
        ctx.embed_home = self.embed
        ctx.head_home = self.head


def homes_from_plan(plan: dict, where: str = "plan") -> Homes:
    """Homes from a plan's JSON document (`offload plan --format json`, or `llm.plan`)."""
    try:
        entries = plan["placement"]
        experts: dict[int, dict[int, str]] = {}
        layers: dict[int, str] = {}
        kv: dict[int, str] = {}  # the latent + rope-key cache's home where the plan gives it one
        embed = head = None
        for p in entries:
            dev = str(p["device"])
            if p.get("expert") is not None:
                experts.setdefault(int(p["layer"]), {})[int(p["expert"])] = dev
            elif p.get("layer") is not None:
                if p.get("class") != "kv_cache":
                    layers[int(p["layer"])] = dev
                elif p.get("tensor") == "kv_cache":
                    kv[int(p["layer"])] = dev
            elif p.get("class") == "embeddings":
                embed = dev
            elif p.get("class") == "lm_head":
                head = dev
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: not a placement plan ({type(exc).__name__}: {exc})") from None
    bad = {d for d in [*layers.values(), *kv.values(), embed, head, *(h for e in experts.values() for h in e.values())]
           if d is not None and d != "cpu" and not (d.startswith("gpu:") and d[4:].isdigit())}
    if bad:
        raise ConfigError(f"{where}: unknown device(s) {sorted(bad)}: expected cpu or gpu:N")
    return Homes(experts=lambda layer, n: [experts.get(layer, {}).get(e, "cpu") for e in range(n)],
                 layer=lambda layer: layers.get(layer, "gpu:0"), embed=embed, head=head,
                 kv=lambda layer: kv.get(layer, layers.get(layer, "gpu:0")))


def summary(plan: dict) -> str:
    """A few lines for the load: bytes per device by class, hot experts on the GPU, predicted decode."""
    from offload.placement.hardware import fmt_bytes

    lines = []
    names = {"routed_experts": "experts", "attention": "attention", "shared_experts": "shared",
             "dense_ffn": "dense", "kv_cache": "KV", "embeddings": "embed", "lm_head": "head", "norms": "norms"}
    for d in plan["devices"]:
        if not d["used_bytes"] and d["name"] != "cpu":
            continue
        parts = ", ".join(f"{names.get(c, c)} {fmt_bytes(n)}" for c, n in
                          sorted(d["by_class"].items(), key=lambda kv: -kv[1]) if n and c != "reserve")
        lines.append(f"  {d['name']:6} {fmt_bytes(d['used_bytes']):>10} of {fmt_bytes(d['budget_bytes'])}"
                     f" ({d['model']}): {parts or 'nothing'}")
    pred = plan["prediction"]
    gpu_exp = pred.get("gpu_experts", 0)
    n_exp = gpu_exp + pred.get("cpu_experts", 0)
    head = (f"plan ({plan['status']}): {gpu_exp} of {n_exp} routed experts on the GPU, "
            f"predicted decode {pred['decode_tok_s']:.1f} tok/s") if n_exp else \
        f"plan ({plan['status']}): predicted decode {pred['decode_tok_s']:.1f} tok/s"
    return "\n".join([head, *lines])
