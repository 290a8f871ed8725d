"""The Python API: `offload.load(path)` -> `LLM` with tokenizer, logits, generate, stream and chat."""

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from offload.checkpoint import Checkpoint
from offload.errors import ConfigError, PlacementError, RequestError
from offload.generation import Chunk, GenerationResult, forget_step, stream_chunks
from offload.kv_memory import check_context_fits
from offload.models import architecture
from offload.models.loading import LoadContext
from offload.planning import Homes, check_fits, homes_from_plan, make_plan, summary
from offload.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device '{device}' is not one of auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no CUDA GPU (use device='cpu' or 'auto')")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device '{device}' is not one of auto, cpu, cuda, cuda:N")
    return dev


def resolve_dtype(dtype, config: dict) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    if name not in DTYPES:
        raise ConfigError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def placement_fn(placement) -> Callable[[int, int], list[str]] | None:
    """None / "gpu" / "cpu": every routed expert on one home; a callable(layer, n_experts) -> homes;
    or a dict {layer: [home per expert]} (layers not listed stay on "gpu")."""
    if placement is None:
        return None
    if isinstance(placement, str):
        if placement not in ("gpu", "cpu"):
            raise ConfigError(f"placement '{placement}' is not auto, cpu, gpu, a plan .json, a dict or a callable")
        return lambda layer, n: [placement] * n
    if isinstance(placement, dict):
        return lambda layer, n: list(placement.get(layer, ["gpu"] * n))
    return placement


def _read_plan(path: Path) -> dict:
    """A plan written by `offload plan --format json` (docs/placement.md); only `placement` is required."""
    import json

    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a placement plan ({exc})") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("placement"), list):
        raise ConfigError(f"{path}: not a placement plan (no \"placement\" list)")
    if plan.get("status") == "does_not_fit_ram":
        raise PlacementError(f"{path}: this plan does not fit: {plan.get('error')}")
    return plan


def _on_main_device(homes: Homes) -> Homes:
    """A plan's gpu:N homes on a machine that computes on the CPU: every home is the main device, but the
    expert split stays (two groups), so the plan still decides which experts share a call."""
    experts = homes.experts
    return Homes(experts=lambda layer, n: ["cpu" if h == "cpu" else "gpu" for h in experts(layer, n)])


def resolve_homes(path: Path, placement, dev: torch.device, ctx: int, dtype: str | None, expert_quant: str | None,
                  gpu_mem=None, ram=None, profile=None, hardware=None, page_from_disk: bool = False
                  ) -> tuple[Homes, dict | None]:
    """Where everything goes, and the plan it came from (None for an explicit placement). Called after the
    file's header is checked and before a byte of weights is read: a model that does not fit stops here."""
    from offload.placement import report

    if isinstance(placement, (str, Path)) and str(placement).endswith(".json"):
        plan = _read_plan(Path(placement))
        homes = homes_from_plan(plan, str(placement))
        return (homes if dev.type == "cuda" else _on_main_device(homes)), plan
    if not (isinstance(placement, str) and placement == "auto"):
        return Homes(experts=placement_fn(placement)), None
    p = make_plan(path, context=ctx, profile=profile, dtype=dtype, page_from_disk=page_from_disk,
                  quant_overrides={"routed_experts": expert_quant}, gpu_mem=gpu_mem, ram=ram,
                  hardware=hardware, use_gpus=dev.type == "cuda")
    check_fits(p)
    plan = report.to_json(p)
    if dev.type != "cuda":  # all-CPU: every weight on the main device, as before plans existed
        return Homes(experts=placement_fn("cpu") if expert_quant else None), plan
    return homes_from_plan(plan, "plan"), plan


class LLM:
    """A loaded model with its tokenizer. Single sequence at a time, not thread-safe."""

    def __init__(self, model, tokenizer, ctx: int, name: str, load_seconds: float = 0.0, plan: dict | None = None):
        self.model = model
        self.plan = plan  # the placement plan it was loaded with (`offload plan --format json`), or None
        self.tokenizer = tokenizer
        self.context_length = ctx
        self.model_name = name
        self.load_seconds = load_seconds
        self._cache = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _cache_for(self, n: int):
        if self._cache is None or self._cache.max_len < n:
            if self._cache is not None:
                forget_step(self._cache)  # the step refers to the cache: dropped with it, not at the next gc
            self._cache = None  # freed first: the check below counts what is free without it
            check_context_fits(self.model, max(n, self.context_length))  # the numbers, before allocating
            self._cache = self.model.new_cache(max(n, self.context_length))
        self._cache.length = 0
        return self._cache

    def _ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not all(isinstance(t, int) and 0 <= t < self.model.args.vocab_size for t in prompt):
            raise RequestError(f"prompt token ids must be ints in [0, {self.model.args.vocab_size})")
        return list(prompt)

    def logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Logits (T, V) float32 for the whole sequence, computed in one pass with a fresh cache."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        cache = self._cache_for(len(ids))
        return self.model.forward(torch.tensor(ids, dtype=torch.long), cache).cpu()

    def stream_chunks(self, prompt: str | list[int], max_new_tokens: int | None = 256, temperature: float = 0.0,
                      top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                      presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int | None = None,
                      stop: list[str] | str | None = None, stop_token_ids: list[int] | None = None) -> Iterator[Chunk]:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, seed=seed)
        params.validate()
        ids = self._ids(prompt)
        stop = [stop] if isinstance(stop, str) else stop
        cache = self._cache_for(self.context_length)
        return stream_chunks(self.model, self.tokenizer, cache, ids, max_new_tokens, params, stop, stop_token_ids)

    def stream(self, prompt: str | list[int], **kwargs) -> Iterator[str]:
        """Text deltas as they are generated (never a split UTF-8 character, stop strings withheld)."""
        for chunk in self.stream_chunks(prompt, **kwargs):
            if chunk.text:
                yield chunk.text

    def generate(self, prompt: str | list[int], **kwargs) -> GenerationResult:
        text, ids, chunk = [], [], None
        for chunk in self.stream_chunks(prompt, **kwargs):
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
        return GenerationResult("".join(text), ids, chunk.prompt_tokens, chunk.finish_reason)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, template_kwargs: dict | None = None,
             **kwargs) -> GenerationResult:
        """Apply the chat template to `messages` and generate the assistant's reply."""
        ids = self.tokenizer.encode_chat(messages, tools=tools, add_generation_prompt=True, **(template_kwargs or {}))
        return self.generate(ids, **kwargs)

    def add_routing_observer(self, fn: Callable[[int, torch.Tensor], None]) -> None:
        """fn(layer_idx, expert_ids (T, K)) is called by every MoE layer forward (routing profiles)."""
        for moe in self.model.moe_layers():
            moe.observer = fn

    def remove_routing_observers(self) -> None:
        for moe in self.model.moe_layers():
            moe.observer = None


def load(path: str | Path, device: str = "auto", ctx: int = 4096, dtype=None, placement="auto",
         gpu_mem: str | list[str] | None = None, ram: str | None = None, profile: str | Path | None = None,
         hardware: str | Path | None = None, page_from_disk: bool = False, expert_quant: str | None = None,
         progress: bool = True, act_quant: bool = False, overlap: bool = True, graphs: bool | None = None) -> LLM:
    """Load a checkpoint directory or GGUF file, placed by `placement`:
    "auto" (the plan `offload plan` prints for the same options: hardware found, `gpu_mem` budget per GPU,
    `ram`, routing `profile`, `ctx`); "cpu" / "gpu" (every routed expert there); a plan .json; a dict
    {layer: [home per expert]} or a callable(layer, n_experts) -> homes. A model that does not fit stops before
    its weights are read (PlacementError) unless page_from_disk. act_quant (GGUF only): round matmul inputs as
    llama.cpp's CPU backend does, to compare like for like. overlap: a GPU layer's CPU experts run on a worker
    thread while the GPU computes the shared and GPU-resident experts (the same logits either way). graphs: decode
    tokens go through a recorded static step (offload.graphs.DecodeStep: a CUDA graph where the whole step is on
    one GPU); None: on when the embedding is on a GPU, or as the OFFLOAD_GRAPHS=0/1 environment variable says."""
    path = Path(path)
    start = time.perf_counter()
    graphs = graphs_option(graphs)  # checked before a byte is read
    if isinstance(gpu_mem, str):
        gpu_mem = [gpu_mem]
    plan_options = dict(gpu_mem=gpu_mem, ram=ram, profile=profile, hardware=hardware, page_from_disk=page_from_disk)
    if path.suffix == ".gguf":
        from offload.gguf.load import load_gguf  # the GGUF path has its own name maps

        if expert_quant is not None:
            raise ConfigError("expert_quant applies to Hugging Face checkpoints; a GGUF file's experts are "
                              "already quantised")
        llm = load_gguf(path, device=device, ctx=ctx, dtype=dtype, placement=placement, progress=progress,
                        act_quant=act_quant, plan_options=plan_options)
        llm.model.runtime.overlap = overlap
        llm.model.graphs = use_graphs(graphs, llm.model)
        return llm
    dev = resolve_device(device)
    _check_gpu_mem(gpu_mem, dev)
    ckpt = Checkpoint(path)
    config = ckpt.config
    arch = architecture(config.get("model_type"))
    args = arch.ModelArgs.from_config(config)
    if ctx < 1:
        raise ConfigError(f"ctx must be >= 1, got {ctx}")
    from offload.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(path)
    torch_dtype = resolve_dtype(dtype, config)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    factory = None
    if expert_quant is not None:
        from offload.kernels.cpu.experts import cpu_experts_factory

        from offload.kernels.cpu.moe import QUANTIZERS

        if expert_quant not in QUANTIZERS:  # before the plan reads the name
            raise ConfigError(f"expert_quant must be one of {sorted(QUANTIZERS)} or None, got {expert_quant!r}")
        factory = cpu_experts_factory(expert_quant)
    homes, plan = resolve_homes(path, placement, dev, ctx, dtype_name, expert_quant, **plan_options)
    report_plan(plan, progress)
    ctx_obj = LoadContext(ckpt, dev, torch_dtype)
    homes.apply(ctx_obj)
    if factory is not None:
        # quantised experts are CPU experts: with no placement given, every routed expert goes there
        ctx_obj.cpu_experts_factory = factory
        if ctx_obj.placement is None:
            ctx_obj.placement = placement_fn("cpu")
    model = _build_with_progress(arch, ctx_obj, args, len(ckpt.names()), progress, path.name)
    ckpt.close()
    check_context_fits(model, ctx)  # a ctx whose cache cannot fit stops here, not in the middle of a prompt
    model.runtime.overlap = overlap
    model.graphs = use_graphs(graphs, model)
    return LLM(model, tokenizer, ctx, path.name, time.perf_counter() - start, plan)


def graphs_option(graphs: bool | None) -> bool | None:
    """load's graphs=, or when None (auto) the OFFLOAD_GRAPHS=0/1 environment variable's; None: still auto."""
    if graphs is not None:
        if not isinstance(graphs, bool):
            raise ConfigError(f"graphs must be True, False or None (auto), got {graphs!r}")
        return graphs
    env = os.environ.get("OFFLOAD_GRAPHS", "").strip()
    if env and env not in ("0", "1"):
        raise ConfigError(f"OFFLOAD_GRAPHS={env!r}: expected 0 or 1 (or unset: on when the model is on a GPU)")
    return env == "1" if env else None


def use_graphs(graphs: bool | None, model) -> bool:
    """Whether decode goes through offload.graphs.DecodeStep. Auto: on when the embedding lives on a CUDA
    device; off on a CPU-only model, where the static step is slower (it attends over the cache's capacity)."""
    return model.embed.device.type == "cuda" if graphs is None else graphs


def _check_gpu_mem(gpu_mem, dev: torch.device) -> None:
    if gpu_mem and dev.type != "cuda":
        raise ConfigError("--gpu-mem / gpu_mem: a GPU budget needs a CUDA GPU, and this load runs on the CPU")


def report_plan(plan: dict | None, progress: bool) -> None:
    """The plan's summary on stderr (what went where, the speed to expect) when loading shows progress."""
    if plan is not None and progress:
        import sys

        import psutil

        print(summary(plan), file=sys.stderr)
        cpu = next((d for d in plan["devices"] if d["name"] == "cpu"), None)
        free = psutil.virtual_memory().available
        if cpu is not None and cpu["used_bytes"] > free:  # the plan counts all RAM; other programs hold some now
            print(f"  warning: the CPU part needs {cpu['used_bytes'] / 2**30:.1f} GiB and {free / 2**30:.1f} GiB of "
                  "RAM is available now: the system will page", file=sys.stderr)


def _build_with_progress(arch, ctx: LoadContext, args, n_tensors: int, progress: bool, name: str):
    if not progress:
        return arch.build(ctx, args)
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("loading {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(name, total=n_tensors)
        ctx.on_tensor = lambda: bar.advance(task)
        return arch.build(ctx, args)
