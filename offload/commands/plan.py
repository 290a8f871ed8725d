"""`offload plan`, `offload probe`, `offload profile`: where every tensor goes and how fast it will run.
torch is imported only inside probe / profile (and for GPU detection when an NVIDIA driver is present)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from offload.errors import ConfigError

FORMATS = ("table", "md", "json", "html")


def plan_cmd(
    model: str = typer.Argument(..., help="catalog name (glm-5.2, deepseek-v3, ...), config.json, checkpoint dir "
                                          "or .gguf file"),
    gpu: Optional[list[str]] = typer.Option(None, "--gpu", help="plan for another rig's GPU, e.g. 24GiB; repeat for "
                                                                "2 GPUs; optionally NAME:SIZE (\"RTX 4090:24GiB\")"),
    gpu_mem: Optional[list[str]] = typer.Option(None, "--gpu-mem", help="budget per GPU found here (repeat for two); "
                                                                        "as `offload serve --gpu-mem`"),
    ram: Optional[str] = typer.Option(None, help="system RAM, e.g. 512GiB"),
    dram_bw: Optional[str] = typer.Option(None, "--dram-bw", help="DRAM read bandwidth, e.g. 300GB/s"),
    pcie_bw: Optional[str] = typer.Option(None, "--pcie-bw", help="PCIe host->device bandwidth, e.g. 25GB/s"),
    gpu_bw: Optional[str] = typer.Option(None, "--gpu-bw", help="GPU memory bandwidth, e.g. 1000GB/s"),
    cpu_cores: Optional[int] = typer.Option(None, "--cpu-cores", help="CPU cores used for experts"),
    cpu_tflops: Optional[float] = typer.Option(None, "--cpu-tflops", help="CPU matmul TFLOP/s for prefill"),
    disk_bw: Optional[str] = typer.Option(None, "--disk-bw", help="disk read bandwidth for the load time"),
    hardware: Optional[Path] = typer.Option(None, "--hardware", help="hardware profile from `offload probe`"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="routing profile from `offload profile`"),
    context: str = typer.Option("32k", "--ctx", "--context", help="KV cache tokens per sequence"),
    concurrency: int = typer.Option(1, help="sequences decoded together"),
    mtp: bool = typer.Option(False, "--mtp", help="also load the MTP layer (speculative decoding)"),
    experts: Optional[str] = typer.Option(None, help="routed experts quant (default Q4_K)"),
    attention: Optional[str] = typer.Option(None, help="attention quant (default Q8_0)"),
    dense: Optional[str] = typer.Option(None, help="dense FFN quant (default Q8_0)"),
    shared: Optional[str] = typer.Option(None, help="shared experts quant (default Q8_0)"),
    embeddings: Optional[str] = typer.Option(None, help="embeddings quant (default Q8_0)"),
    lm_head: Optional[str] = typer.Option(None, "--lm-head", help="lm_head quant (default Q8_0)"),
    fmt: str = typer.Option("table", "--format", "-f", help="table | md | json | html"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the report here"),
    export: Optional[str] = typer.Option(None, "--export", help="llama-cpp: print llama.cpp arguments for this plan"),
    strict: bool = typer.Option(False, "--strict", help="exit with code 2 when the model does not fit RAM"),
    page_from_disk: bool = typer.Option(False, "--page-from-disk", help="plan a model bigger than RAM as read from "
                                                                        "disk (mmap), at the disk's speed"),
    kv_home: str = typer.Option("auto", "--kv-home", help="DSA models: where the latent KV cache lives, gpu (with "
                                                          "each layer) | ram (indexer keys stay on the GPU) | auto "
                                                          "(the faster by the cost model)"),
) -> None:
    """Plan where every tensor of MODEL goes on this machine (or the one the flags describe) and predict speed."""
    from offload.placement import report
    from offload.planning import check_fits, make_plan, parse_context

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if export not in (None, "llama-cpp"):
        raise ConfigError(f"--export {export!r}: expected llama-cpp")
    overrides = {"routed_experts": experts, "attention": attention, "dense_ffn": dense, "shared_experts": shared,
                 "embeddings": embeddings, "lm_head": lm_head}
    p = make_plan(model, context=parse_context(context), concurrency=concurrency, mtp=mtp, profile=profile,
                  quant_overrides=overrides, page_from_disk=page_from_disk, gpu=gpu, gpu_mem=gpu_mem, ram=ram,
                  dram_bw=dram_bw, pcie_bw=pcie_bw, gpu_bw=gpu_bw, cpu_cores=cpu_cores, cpu_tflops=cpu_tflops,
                  disk_bw=disk_bw, hardware=hardware, kv_home=kv_home)
    d = report.to_json(p)
    if export == "llama-cpp":
        typer.echo(d["llama_cpp"]["command"])
        if d["llama_cpp"]["n_cpu_moe_command"]:  # (none for a CPU-only plan)
            typer.echo("# or: " + d["llama_cpp"]["n_cpu_moe_command"]
                       + ("" if d["llama_cpp"]["n_cpu_moe_exact"] else "  (approximate: other layers)"))
        typer.echo("# " + d["llama_cpp"]["note"])
    elif fmt == "table" and not output:
        report.print_table(d)
    else:
        if fmt == "json":
            text = json.dumps(d, indent=1)
        elif fmt == "html":
            from offload.placement.html import to_html

            text = to_html(d)
        else:
            text = report.to_markdown(d)
        if output:
            output.write_text(text)
            typer.echo(f"wrote {output} ({d['status']}, decode {d['prediction']['decode_tok_s']:.2f} tok/s)")
        else:
            typer.echo(text)
    if strict:
        check_fits(p)


def probe_cmd(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="where to save (default "
                                                                       "~/.cache/offload/hardware.json)"),
    quick: bool = typer.Option(False, help="measure nothing: detect only, defaults assumed"),
    model: Optional[Path] = typer.Option(None, "--model", help="also calibrate the quant types this GGUF holds"),
    short: bool = typer.Option(False, "--short", help="calibrate with smaller buffers (~4x faster, noisier)"),
) -> None:
    """Detect GPUs, RAM, CPU and NUMA; measure DRAM and PCIe bandwidth and what this engine's kernels reach
    here (GEMV GB/s and prefill TFLOP/s per quant type, the fixed cost of a decode layer); save a profile."""
    from offload.placement import hardware as H
    from offload.planning import detect_gpus

    hw = H.detect(detect_gpus())
    hw.notes = []
    if quick:
        hw.notes.append("nothing measured (--quick): defaults assumed")
    else:
        from offload.calibrate import DEFAULT_TYPES, calibrate

        types = list(DEFAULT_TYPES)
        if model is not None:
            from offload.placement.gguf_meta import read_header

            types += sorted({qtype for _, _, qtype in read_header(model)[1]} - set(types))
        typer.echo("calibrating (DRAM, CPU kernels per quant type, decode fixed costs) ...", err=True)
        hw.calibration = calibrate(types, quick=short, gpus=len(hw.gpus))
        hw.dram_bw = hw.calibration["dram_gbs"] * H.GB
        if hw.gpus:
            hw.pcie_bw = _measure_pcie()
        else:
            hw.notes.append("no CUDA GPU: PCIe bandwidth not measured, default assumed")
    hw.source = "probe"
    path = H.save_profile(hw, output)
    typer.echo(f"CPU: {hw.cpu_model}, {hw.cpu_cores} cores, flags {' '.join(hw.cpu_flags) or '-'}, "
               f"{hw.numa_nodes} NUMA node(s)")
    reads = hw.calibration.get("dram_reads_gbs")
    spread = f" (median of {len(reads)} reads, {min(reads):.0f}-{max(reads):.0f})" if reads else ""
    typer.echo(f"RAM: {H.fmt_bytes(hw.ram_bytes)}, DRAM read {hw.dram_bw / H.GB:.1f} GB/s{spread}")
    if hw.calibration.get("prefetch_gbs"):
        rates = ", ".join(f"{d} B ahead {r:.1f}" for d, r in hw.calibration["prefetch_gbs"].items())
        typer.echo(f"CPU prefetch: Q4_K one-token GB/s with {rates}: kernels keep "
                   f"{hw.calibration['prefetch_ahead']} B (OFFLOAD_PREFETCH_AHEAD overrides)")
    for name, k in hw.calibration.get("kernels", {}).items():
        fused = f", {k['moe_prefill_tflops']:.2f} as fused experts" if k.get("moe_prefill_tflops") else ""
        typer.echo(f"CPU {name:7} {k['gemv_gbs']:6.1f} GB/s at one token, {k['prefill_tflops']:.2f} TFLOP/s at "
                   f"512 tokens{fused} ({k['engine']})")
    if "prefill_s_per_token_hidden" in hw.calibration:
        typer.echo(f"prefill cost beside the matrices: {hw.calibration['prefill_s_per_token_hidden'] * 4096 * 1e6:.1f} "
                   "us per token per layer at hidden 4096")
    if "layer_s" in hw.calibration:
        typer.echo(f"decode fixed cost: {hw.calibration['layer_s'] * 1e6:.0f} us per layer, "
                   f"{hw.calibration['token_s'] * 1e6:.0f} us per token")
    for g, c in zip(hw.gpus, hw.calibration.get("gpus", [])):
        typer.echo(f"GPU: {g.name}, {H.fmt_bytes(g.memory_bytes)} free, {g.mem_bw / H.GB:.0f} GB/s (spec), "
                   f"bf16 GEMV {c['gemv_gbs']:.0f} GB/s, launch + sync {c['launch_sync_s'] * 1e6:.0f} us")
    typer.echo(f"PCIe host->device: {hw.pcie_bw / H.GB:.1f} GB/s" + (" (assumed)" if not hw.gpus or quick else ""))
    typer.echo(f"saved {path}")


def _measure_pcie() -> float:
    import torch

    src = torch.empty(1 << 28, dtype=torch.uint8).pin_memory()  # 256 MiB
    dst = torch.empty_like(src, device="cuda")
    best = 0.0
    for _ in range(4):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, src.numel() / (time.perf_counter() - t))
    return best


def profile_cmd(
    model: str = typer.Argument(..., help="checkpoint dir or .gguf file to run"),
    prompts: Path = typer.Option(..., "--prompts", help="text file, one prompt per line (or a JSON list)"),
    output: Path = typer.Option(Path("profile.json"), "--output", "-o"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
) -> None:
    """Record a routing profile: how often each expert is picked, from real runs of MODEL."""
    import offload
    from offload.placement.model import load_model
    from offload.placement.profile import ProfileRecorder

    try:
        text = prompts.read_text()
    except OSError as exc:
        raise ConfigError(f"{prompts}: cannot read prompts ({exc.strerror})") from None
    items = json.loads(text) if text.lstrip().startswith("[") else [ln for ln in text.splitlines() if ln.strip()]
    if not items:
        raise ConfigError(f"{prompts}: no prompts")
    spec = load_model(model)
    rec = ProfileRecorder(spec.n_experts, spec.top_k, spec.name)
    llm = offload.load(model)
    llm.add_routing_observer(lambda layer, ids: rec.observe(layer, ids.detach().cpu().numpy()))
    for prompt in items:
        llm.generate(prompt, max_new_tokens=max_new_tokens)
    prof = rec.profile(source=str(prompts))
    prof.save(output)
    typer.echo(f"wrote {output}: {len(prof.counts)} MoE layers, {prof.n_tokens} tokens")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)
    app.command("probe")(probe_cmd)
    app.command("profile")(profile_cmd)
