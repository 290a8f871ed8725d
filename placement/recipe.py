"""Commands for other engines: llama.cpp arguments equivalent to a plan, and the multi-GPU serving
recipe (vLLM / SGLang) for a model this rig cannot run usefully."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .hardware import GB, fmt_bytes
from .model import ModelSpec, total_params
from .quant import bytes_per_weight

if TYPE_CHECKING:
    from .planner import Plan

SERVER_GPUS = (("H100 80GB", 80 * GB), ("H200 141GB", 141 * GB))


def distributed_recipe(spec: ModelSpec, context: int) -> dict:
    """Tensor-parallel size and command lines for vLLM and SGLang serving the FP8 checkpoint."""
    weights = total_params(spec, with_mtp=True) * bytes_per_weight("FP8")
    need = weights * 1.15  # KV cache, activations, CUDA graphs: vLLM's default uses 90 % of memory
    repo = spec.fp8_repo or spec.hf_repo or spec.name
    ctx = min(context, spec.max_context or context)
    options = []
    for gpu, mem in SERVER_GPUS:
        tp = 2 ** math.ceil(math.log2(max(need / (0.9 * mem), 1)))
        if tp <= 8:
            vllm = f"vllm serve {repo} --tensor-parallel-size {tp} --max-model-len {ctx}"
            sglang = f"python -m sglang.launch_server --model-path {repo} --tp {tp} --context-length {ctx}"
        else:
            nodes = tp // 8
            vllm = (f"vllm serve {repo} --tensor-parallel-size 8 --pipeline-parallel-size {nodes} "
                    f"--max-model-len {ctx}  # on a Ray cluster of {nodes} nodes")
            sglang = (f"python -m sglang.launch_server --model-path {repo} --tp {tp} --nnodes {nodes} "
                      f"--node-rank 0 --dist-init-addr HEAD_IP:5000 --context-length {ctx}  # --node-rank 1.. on "
                      "the others")
        options.append({"gpu": gpu, "tensor_parallel_size": tp, "nodes": max(1, tp // 8), "vllm": vllm,
                        "sglang": sglang})
    return {"checkpoint": repo, "weights_bytes": int(weights), "weights": fmt_bytes(weights),
            "options": options}


def _alternation(layers: list[int]) -> str:
    return "|".join(str(i) for i in layers)


def llama_cpp_args(p: Plan) -> dict:
    """llama.cpp arguments for the same plan. llama.cpp stores a layer's experts as one stacked tensor,
    so hot experts become whole layers: as many layers' experts stay on the GPU as the plan's GPU
    expert bytes pay for, choosing the layers where the plan put the most experts."""
    spec = p.spec
    if not any(h != "cpu" for h in p.homes.values()) and p.head_device == "cpu":
        return _cpu_only_args(p)
    moe_gpu = [it for it in p.items if not it.mtp and len(it.freq) and p.homes[it.index] != "cpu"]
    per_gpu: dict[str, list] = {}
    for it in moe_gpu:
        per_gpu.setdefault(p.homes[it.index], []).append(it)
    gpu_layers: list[int] = []
    for _, its in per_gpu.items():
        hot_bytes = sum(float(p.gpu_experts[it.index].sum()) * it.expert_bytes for it in its)
        layer_bytes = its[0].expert_bytes * len(its[0].freq)
        n = int(hot_bytes // layer_bytes) if layer_bytes else 0
        ranked = sorted(its, key=lambda it: (-int(p.gpu_experts[it.index].sum()), -it.index))
        gpu_layers += [it.index for it in ranked[:n]]
    cpu_moe = sorted(i for i in spec.moe_layers if i not in gpu_layers)
    n_cpu_layers = sum(1 for it in p.items if not it.mtp and p.homes[it.index] == "cpu")
    ngl = spec.n_layers - n_cpu_layers + (1 if p.head_device != "cpu" else 0)
    args = ["-ngl", str(ngl), "-c", str(p.options.context), "-t", str(p.hw.cpu_cores), "-fa", "on"]
    if len(p.hw.gpus) > 1:
        counts = [sum(1 for it in p.items if p.homes[it.index] == f"gpu:{g}") for g in range(len(p.hw.gpus))]
        args += ["--tensor-split", ",".join(str(c) for c in counts)]
    if cpu_moe == list(spec.moe_layers):
        ot = "exps=CPU"  # every layer's experts in RAM
    else:
        ot = f"blk\\.({_alternation(cpu_moe)})\\.ffn_(up|down|gate)_exps\\.=CPU" if cpu_moe else None
    if ot:
        args += ["-ot", ot]
    # --n-cpu-moe N keeps the experts of the first N layers in RAM: equal to -ot when the GPU layers are last
    n_cpu_moe = spec.n_layers - len(gpu_layers)  # the same number of GPU expert layers, taken last
    exact = cpu_moe == [i for i in spec.moe_layers if i < n_cpu_moe]
    simple = ["-ngl", str(ngl), "-c", str(p.options.context), "--n-cpu-moe", str(n_cpu_moe)]
    return {"args": args, "command": "llama-server -m MODEL.gguf " + " ".join(_quote(a) for a in args),
            "n_cpu_moe_command": "llama-server -m MODEL.gguf " + " ".join(simple),
            "n_cpu_moe_exact": exact, "gpu_expert_layers": sorted(gpu_layers),
            "note": "llama.cpp cannot split a layer's stacked experts: the plan's per-expert hot set is rounded to "
                    f"{len(gpu_layers)} whole layers of experts on the GPU"}


def _cpu_only_args(p: Plan) -> dict:
    """Nothing on a GPU: -ot and --n-cpu-moe mean nothing without offloaded layers. A CPU build needs no -ngl;
    where the plan saw a GPU (too small to use), -ngl 0 keeps a CUDA build from offloading layers by default."""
    args = (["-ngl", "0"] if p.hw.gpus else []) + ["-c", str(p.options.context), "-t", str(p.hw.cpu_cores),
                                                   "-fa", "on"]
    return {"args": args, "command": "llama-server -m MODEL.gguf " + " ".join(args), "n_cpu_moe_command": None,
            "n_cpu_moe_exact": True, "gpu_expert_layers": [], "note": "CPU-only plan: every layer runs on the CPU, so no -ot or --n-cpu-moe "
                                             "(they only split layers between a GPU and the CPU)"}


def _quote(a: str) -> str:
    return f'"{a}"' if any(c in a for c in "|()\\") else a
