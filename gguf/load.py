"""`offload.load("model.gguf")`: a llama.cpp GGUF file (or split set) -> LLM, experts left quantised.

ModelArgs come from the GGUF metadata (offload.gguf.names.hf_config), tensors from GGUFSource under their
Hugging Face names, the tokenizer and chat template from `tokenizer.*` metadata.
"""

import time
import warnings
from pathlib import Path

from offload.errors import ConfigError, GGUFError


def load_gguf(path: str | Path, device: str = "auto", ctx: int = 4096, dtype=None, placement="auto",
              progress: bool = True, act_quant: bool = False, plan_options: dict | None = None):
    """Load a GGUF (any shard name of a split file opens every shard) as an offload.api.LLM.

    act_quant=True rounds every matmul input the way llama.cpp's CPU backend does for the weight's type
    (offload.gguf.numerics), to compare with llama.cpp like for like; the default keeps float activations."""
    from offload.api import LLM, _build_with_progress, _check_gpu_mem, report_plan, resolve_device, resolve_dtype
    from offload.api import resolve_homes
    from offload.gguf.names import hf_config
    from offload.gguf.reader import GGUFFile
    from offload.gguf.source import GGUFSource
    from offload.gguf_tokenizer import tokenizer_from_gguf_metadata
    from offload.models import architecture
    from offload.models.loading import LoadContext

    start = time.perf_counter()
    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    if ctx < 1:
        raise ConfigError(f"ctx must be >= 1, got {ctx}")
    dev = resolve_device(device)
    plan_options = plan_options or {}
    _check_gpu_mem(plan_options.get("gpu_mem"), dev)
    gguf = GGUFFile(path)
    config = hf_config(gguf.metadata, gguf.tensors, str(path))
    arch = architecture(config["model_type"])
    args = arch.ModelArgs.from_config(config)
    # llama.cpp computes in float32 on the CPU; bf16 is the GPU default
    dt = resolve_dtype(dtype or ("float32" if dev.type == "cpu" else "bfloat16"), config)
    tokenizer = tokenizer_from_gguf_metadata(gguf.metadata)
    source = GGUFSource(gguf, act_quant)
    # the plan, after the header and tokenizer are checked and before a byte of weights is read
    # (planned from this open file: its header is parsed once for the plan and the weights)
    homes, plan = resolve_homes(gguf, placement, dev, ctx, None, None, **plan_options)
    report_plan(plan, progress)
    # paged only where the plan found RAM too small (check_fits let it through for --page-from-disk): a model that
    # fits keeps the faster interleaved copies
    paged = bool(plan and plan.get("status") == "does_not_fit_ram")
    if paged and (copied := unpageable_experts(gguf.tensors)):
        warnings.warn(f"offload: --page-from-disk cannot page {copied}: the CPU kernels compute them as another "
                      "type, copied into RAM at load", RuntimeWarning, stacklevel=3)
    lctx = LoadContext(source, dev, dt, paged=paged)
    homes.apply(lctx)
    if dev.type == "cuda":  # long prompts stream a GPU layer's CPU experts above the crossover (offload.streaming)
        from offload.streaming import StreamPolicy

        lctx.stream = StreamPolicy.for_load(plan, plan_options.get("hardware"))
    model = _build_with_progress(arch, lctx, args, len(gguf.tensors), progress, path.name)
    model.gguf = gguf  # quantised expert groups read the mmap: keep the file open with the model
    return LLM(model, tokenizer, ctx, path.name, time.perf_counter() - start, plan)


def unpageable_experts(tensors: dict) -> str:
    """The routed-expert tensors (name -> TensorInfo) that a paged load still copies, as "12.3 MiB of IQ4_NL
    experts" per type: the types the native kernels compute only after a rewrite (offload.gguf.types
    CPU_COMPUTE_TYPE, kernels/cpu/weights.as_native); "" when every expert can stay the file's pages."""
    from offload.gguf.types import CPU_COMPUTE_TYPE
    from offload.placement.hardware import fmt_bytes

    by_type: dict[str, int] = {}
    for name, t in tensors.items():
        if "_exps." in name and int(t.type) in CPU_COMPUTE_TYPE:
            by_type[t.type.name] = by_type.get(t.type.name, 0) + t.nbytes
    return ", ".join(f"{fmt_bytes(n)} of {q} experts" for q, n in sorted(by_type.items()))
