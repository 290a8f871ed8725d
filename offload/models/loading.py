"""What an architecture file needs to build itself from a weight source: typed tensor reads straight onto
the right device, weights that know their matmul (offload.models.weights), dense MLPs, and routed experts
split by their home (placement) into expert groups (offload.models.experts).

Homes are names: "gpu" (the main device), "gpu:N" (CUDA device N), "cpu". Each layer has one for its
attention, norms, router, dense MLP, shared experts and KV cache (`layer_home`), each routed expert its own
(`placement`), and the embedding and the head theirs. Each expert home becomes one expert group, so a
half/half split is a real split even where two homes are one device (tests map them with `home_devices`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from offload.errors import ConfigError
from offload.models.decoder import Decoder, Layer
from offload.models.experts import BlockExperts, TorchExperts, expert_blocks
from offload.models.moe import MoE, route_sigmoid_grouped
from offload.models.weights import Linear, mlp


def _home_order(home: str) -> tuple:
    """Expert groups sum in this order: "gpu", then "gpu:0", "gpu:1", ..., then "cpu"."""
    return (0, 0) if home == "gpu" else (2, 0) if home == "cpu" else (1, int(home[4:]))


@dataclass
class LoadContext:
    source: object  # Checkpoint (safetensors) or a GGUF source with the same get/has/shape API
    device: torch.device  # where reads go: the main device, or in `at(home)`'s copy that home's device
    dtype: torch.dtype
    # layer index -> home name per routed expert; None = every expert on the main device
    placement: Callable[[int, int], list[str]] | None = None
    home_devices: dict[str, torch.device] = field(default_factory=dict)  # home name -> device, overriding
    layer_home: Callable[[int], str] | None = None  # None: every layer on the main device
    # layer -> home of its KV cache where it differs from the layer's (a DSA latent cache in RAM); None: the layer's
    kv_home: Callable[[int], str] | None = None
    embed_home: str | None = None  # None: the main device
    head_home: str | None = None  # None: the main device (the final norm goes with the head)
    # builds the group for CPU-resident experts (quantised kernels); None = plain torch tensors
    cpu_experts_factory: Callable | None = None
    on_tensor: Callable[[], None] | None = None
    # a GGUF's blocks off the CPU stay blocks on the Triton kernels (offload.kernels.gpu): None = on CUDA
    # devices (OFFLOAD_TRITON=0 in the environment: expanded), True = on every device (Triton's interpreter on
    # the CPU: tests), False = expanded to float at load
    triton: bool | None = None
    # long prompts: a GPU layer's CPU experts of a GGUF streamed to the GPU above the crossover
    # (offload.streaming.StreamPolicy; None: never)
    stream: object = None
    # a model paged from disk (the plan: RAM cannot hold it): CPU expert groups and the embedding / head tables stay
    # views of the file's mmap in its own layout (kernels.cpu.experts.from_file_blocks views=True), evictable
    # pages instead of anonymous RAM; the matrices every token reads (attention, dense, shared) stay interleaved
    paged: bool = False
    home: str = "gpu"  # the home this context reads to
    kv: str | None = None  # in a layer's context: its KV cache's home (None: this context's)
    main: torch.device | None = None  # the main device, the "gpu" home (set from `device`)

    def __post_init__(self):
        if self.main is None:
            dev = torch.device(self.device)
            if dev.type == "cuda" and dev.index is None:  # "cuda" -> "cuda:<current>": comparable with gpu:N
                dev = torch.device("cuda", torch.cuda.current_device())
            self.main = self.device = dev

    def device_of(self, home: str) -> torch.device:
        if home in self.home_devices:
            return self.home_devices[home]
        if home == "gpu":
            return self.main
        if home == "cpu":
            return torch.device("cpu")
        if home.startswith("gpu:") and home[4:].isdigit():
            # without CUDA (a CPU run of a GPU plan) every GPU home is the main device
            return torch.device("cuda", int(home[4:])) if torch.cuda.is_available() else self.main
        raise ConfigError(f"unknown home '{home}': expected cpu, gpu or gpu:N")

    def at(self, home: str) -> "LoadContext":
        """This context reading onto `home`'s device."""
        return replace(self, device=self.device_of(home), home=home)

    def layer(self, i: int) -> "LoadContext":
        """The context for layer i's own weights (not its routed experts'): on the layer's home."""
        ctx = self.at(self.layer_home(i) if self.layer_home is not None else "gpu")
        return replace(ctx, kv=self.kv_home(i) if self.kv_home is not None else None)

    def kv_device(self) -> torch.device:
        """Where this layer's KV cache lives: its own device unless the plan gave the KV a home of its own."""
        return self.device if self.kv is None else self.device_of(self.kv)

    def get(self, name: str, shape: tuple[int, ...] | None = None, device=None, dtype=None) -> torch.Tensor:
        t = self.source.get(name, device=device or self.device, dtype=dtype or self.dtype, shape=shape)
        if self.on_tensor is not None:
            self.on_tensor()
        return t

    def maybe(self, name: str, shape=None, device=None, dtype=None) -> torch.Tensor | None:
        return self.get(name, shape, device, dtype) if self.source.has(name) else None

    def linear(self, name: str, shape: tuple[int, int], bias: str | None = None, plain: bool = False):
        """Matrix `name` (N, K) and optional bias `bias` (N,) as a weight that knows its matmul: a file's ggml
        blocks stay blocks on the CPU where the native kernels multiply their type (as llama.cpp) and on a GPU
        where the Triton kernels do (`triton`), as do an HF checkpoint's FP8 blocks on a GPU; anything else is a
        float tensor on this context's device. plain: CPU blocks stay in the file's layout (a view of its pages)."""
        w = self._blocks(name, shape, plain)
        if w is None:
            w = self._fp8_triton(name, shape)
        b = self.get(bias, (shape[0],)) if bias else None
        if w is None:
            return Linear(self.get(name, shape), b)
        w.bias = b
        return w

    def _triton(self, dev: torch.device, blocks: bool = True) -> bool:
        if getattr(self.source, "act_quant", False) or (blocks and not hasattr(self.source, "blocks")):
            return False
        if self.triton is None:
            import importlib.util
            import os

            return (dev.type == "cuda" and os.environ.get("OFFLOAD_TRITON", "1") != "0"
                    and importlib.util.find_spec("triton") is not None)
        return self.triton

    def _triton_blocks(self, name: str, shape: tuple[int, int]):
        """Matrix `name` as its ggml blocks on this device (bf16 and float types stay torch tensors)."""
        from offload.kernels.gpu.weights import TritonQuantWeight, takes

        found = self.source.blocks(name, shape)
        if found is None or int(found[1]) == 30 or not takes(found[1], shape[1]):
            return None
        w = TritonQuantWeight.from_file(found[0], found[1], shape[1], self.device, dtype=self.dtype, name=name)
        if self.on_tensor is not None:
            self.on_tensor()
        return w

    def _fp8_triton(self, name: str, shape: tuple[int, int]):
        """An HF checkpoint's FP8 matrix (e4m3 with 128x128 float32 `weight_scale_inv`) kept as its bytes on the
        Triton kernels; None where it is not one (or its scales do not fit: `get` names what is wrong)."""
        src, scale = self.source, name.removesuffix(".weight") + ".weight_scale_inv"
        if getattr(src, "fp8_block", None) != (128, 128) or not (src.has(name) and src.has(scale)) or \
                not self._triton(self.device, blocks=False) or src.shape(name) != tuple(shape):
            return None
        raw, s = src._raw(name), src._raw(scale)  # as stored: e4m3 (N, K), float32 (ceil(N/128), ceil(K/128))
        if raw.dtype != torch.float8_e4m3fn or tuple(s.shape) != (-(-shape[0] // 128), -(-shape[1] // 128)):
            return None
        from offload.kernels.gpu.formats import FP8_BLOCK
        from offload.kernels.gpu.weights import TritonQuantWeight

        w = TritonQuantWeight.from_file(raw.view(torch.uint8), FP8_BLOCK, shape[1], self.device, dtype=self.dtype,
                                        scales=s.float(), name=name)
        if self.on_tensor is not None:
            self.on_tensor()
        return w

    def _blocks(self, name: str, shape: tuple[int, int], plain: bool = False):
        if self._triton(self.device):
            return self._triton_blocks(name, shape)
        if self.device.type != "cpu" or not hasattr(self.source, "blocks"):
            return None
        found = self.source.blocks(name, shape)  # (N, row bytes) mmapped, and the ggml type; or None
        if found is None:
            return None
        from offload.kernels.cpu import native

        from offload.kernels.cpu.weights import QuantWeight, as_native

        raw, qtype = found
        if not self.source.act_quant:  # (the llama.cpp emulation keeps the file's type)
            raw, qtype = as_native(raw, int(qtype))
        if not native.fast(int(qtype)):
            return None

        w = QuantWeight.from_file(raw, qtype, shape[1], None, self.dtype, self.source.act_quant, name,
                                  repack=not plain)
        if self.on_tensor is not None:
            self.on_tensor()
        return w

    def heads(self, name: str):
        """MLA's kv_b_proj `name` as (W_UK^T, W_UV) per-head quantised matrices (kernels.cpu.weights.HeadsQuantWeight,
        (h, c, n) and (h, v, c)) where a GGUF stores them split and the native kernels multiply their types on the
        CPU, else None (the model multiplies the float kv_b)."""
        if self.device.type != "cpu" or getattr(self.source, "act_quant", True) or not hasattr(self.source, "head_blocks"):
            return None
        found = self.source.head_blocks(name)
        from offload.kernels.cpu import native

        if found is None or not native.fast(*(int(t) for _, t in found)):
            return None
        from offload.kernels.cpu.weights import HeadsQuantWeight

        return tuple(HeadsQuantWeight.from_file(raw, t, native._row_elems(raw.shape[2], int(t))) for raw, t in found)

    def mlp(self, prefix: str, hidden: int, inter: int):
        return mlp(self.linear(f"{prefix}.gate_proj.weight", (inter, hidden)),
                   self.linear(f"{prefix}.up_proj.weight", (inter, hidden)),
                   self.linear(f"{prefix}.down_proj.weight", (hidden, inter)))

    def expert_device(self, home: str) -> torch.device:
        """"gpu" experts live on their layer's GPU when the layer has one, else on the main device."""
        return self.device if home == "gpu" and self.home != "cpu" else self.device_of(home)

    def experts(self, prefix: str, layer: int, n_experts: int, hidden: int, inter: int, shared=None):
        """Routed experts of one layer -> (expert groups in home order, the shared MLP the layer still runs:
        None where a CPU group took it into its own native call)."""
        homes = self.placement(layer, n_experts) if self.placement else ["gpu"] * n_experts
        for name in set(homes):
            self.device_of(name)  # unknown names fail here, before any read
        names = sorted(set(homes), key=_home_order)
        if hasattr(self.source, "expert_blocks") and self.source.has_expert_blocks(prefix):
            return self._block_groups(prefix, homes, names, n_experts, hidden, inter, shared)
        stacked = self.source.has(f"{prefix}.gate_up_proj")
        if stacked:  # transformers' fused layout, read once per layer: gate_up (E, 2I, H), down (E, H, I)
            gate_up_all = self.get(f"{prefix}.gate_up_proj", (n_experts, 2 * inter, hidden), device="cpu")
            down_all = self.get(f"{prefix}.down_proj", (n_experts, hidden, inter), device="cpu")
        groups = []
        for name in names:
            dev = self.expert_device(name)
            weights = {}
            for e in (e for e in range(n_experts) if homes[e] == name):
                if stacked:
                    gate_up = gate_up_all[e].to(dev)
                    gate, up = gate_up[:inter], gate_up[inter:]
                    down = down_all[e].to(dev)
                else:
                    p = f"{prefix}.{e}"
                    gate = self.get(f"{p}.gate_proj.weight", (inter, hidden), device=dev)
                    up = self.get(f"{p}.up_proj.weight", (inter, hidden), device=dev)
                    down = self.get(f"{p}.down_proj.weight", (hidden, inter), device=dev)
                weights[e] = (gate, up, down)
            if name == "cpu" and self.cpu_experts_factory is not None:
                groups.append(self.cpu_experts_factory(weights, dev))
            else:
                groups.append(TorchExperts(dev, weights))
        return groups, shared

    def _block_groups(self, prefix, homes, names, n_experts, hidden, inter, shared):
        """Groups over a GGUF's stacked expert blocks, which stay quantised: the fused CPU kernel on the CPU,
        blocks expanded per matmul elsewhere (and for the llama.cpp numerics emulation, act_quant)."""
        dims = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        files = {part: self.source.expert_blocks(prefix, part, n_experts, rows, cols)
                 for part, (rows, cols) in dims.items()}  # part -> ((E, rows, row bytes), ggml type)
        act_quant = self.source.act_quant
        groups = []
        for name in names:
            dev = self.expert_device(name)
            ids = [e for e in range(n_experts) if homes[e] == name]
            # the "cpu" home is the native kernels' even where `triton` puts every other block on Triton (tests)
            if name != "cpu" and self._triton(dev) and self._triton_takes(files, dims):
                from offload.kernels.gpu.weights import TritonExperts

                eb = [expert_blocks(files[p][0], files[p][1], dims[p][1], ids, dev, False) for p in dims]
                group = TritonExperts.from_blocks(dev, ids, n_experts, *((b.blocks, b.qtype, b.cols) for b in eb),
                                                  name=prefix)
            elif dev.type == "cpu" and not act_quant:
                from offload.kernels.cpu.experts import from_file_blocks

                group = from_file_blocks(*(files[p][0] for p in dims), tuple(files[p][1] for p in dims), ids,
                                         shared, views=self.paged)
                if group.shared is not None:
                    shared = None  # runs inside this group's native call from now on
                group.stream = self._expert_stream(files, dims, ids, n_experts, group) if name == "cpu" else None
            else:
                group = BlockExperts(dev, ids, *(expert_blocks(files[p][0], files[p][1], dims[p][1], ids, dev,
                                                               act_quant) for p in dims))
            groups.append(group)
            if self.on_tensor is not None:
                self.on_tensor()
        return groups, shared

    def _expert_stream(self, files, dims, ids, n_experts, group):
        """The streamed path of a GPU layer's CPU experts (offload.streaming): on the Triton kernels where the
        layer's device runs them on these formats, else expanded to float per expert; None on a CPU layer."""
        if self.stream is None or self.home == "cpu" or self.device == torch.device("cpu"):
            return None
        from offload.streaming import ExpertStream

        triton = self._triton(self.device) and self._triton_takes(files, dims)
        return ExpertStream(self.device, ids, n_experts, [(files[p][0], files[p][1], dims[p][1]) for p in dims],
                            self.stream, group.shared, group, triton)

    @staticmethod
    def _triton_takes(files, dims) -> bool:
        from offload.kernels.gpu.weights import takes

        return all(int(files[p][1]) != 30 and takes(files[p][1], dims[p][1]) for p in dims)

def load_embeddings(ctx: LoadContext, a) -> tuple[object, torch.Tensor, object]:
    """Embedding table, final norm, head, each on its home. A GGUF on the CPU keeps the table and the head as
    their blocks (a tied head is the table itself where both share a device): lookups expand only the rows
    asked for, and the head is read quantised each token (Q6_K: 5x fewer bytes than float32), as llama.cpp."""
    shape = (a.vocab_size, a.hidden_size)
    ectx, hctx = ctx.at(ctx.embed_home or "gpu"), ctx.at(ctx.head_home or "gpu")
    # paged from disk: the tables stay the file's pages (a lookup reads a few rows of the embedding)
    embed = ectx.linear("model.embed_tokens.weight", shape, plain=ctx.paged)
    norm = hctx.get("model.norm.weight", (a.hidden_size,))
    head = "lm_head.weight"
    if a.tie_word_embeddings and not ctx.source.has(head):
        if hctx.device == ectx.device:
            return embed, norm, embed
        head = "model.embed_tokens.weight"
    return embed, norm, hctx.linear(head, shape, plain=ctx.paged)


def load_noaux_moe(ctx: LoadContext, prefix: str, layer: int, a) -> "MoE":
    """DeepSeek-V3 / GLM MoE block: sigmoid `noaux_tc` router with score-correction bias, grouped top-k,
    routed experts by placement, shared experts."""
    e, hid, inter = a.n_routed_experts, a.hidden_size, a.moe_intermediate_size
    weight = ctx.get(f"{prefix}.gate.weight", (e, hid))
    bias = ctx.get(f"{prefix}.gate.e_score_correction_bias", (e,), dtype=torch.float32)
    router = partial(route_sigmoid_grouped, weight=weight, bias=bias, top_k=a.num_experts_per_tok,
                     n_group=a.n_group, topk_group=a.topk_group, norm_topk_prob=a.norm_topk_prob,
                     scaling=a.routed_scaling_factor)
    shared = ctx.mlp(f"{prefix}.shared_experts", hid, inter * a.n_shared_experts) if a.n_shared_experts else None
    groups, shared = ctx.experts(f"{prefix}.experts", layer, e, hid, inter, shared)
    return MoE(router, groups, shared, layer)


def load_layer(ctx: LoadContext, prefix: str, hidden: int, attn, mlp) -> Layer:
    """`ctx` is the layer's own (LoadContext.layer): the layer lives on its device."""
    return Layer(ctx.get(f"{prefix}.input_layernorm.weight", (hidden,)), attn,
                 ctx.get(f"{prefix}.post_attention_layernorm.weight", (hidden,)), mlp, ctx.device)


def finish_decoder(ctx: LoadContext, a, layers: list[Layer]) -> Decoder:
    """Embeddings, final norm and head around the layers; MTP layers past the last are named, not run."""
    embed, norm, head = load_embeddings(ctx, a)
    n_mtp = getattr(a, "num_nextn_predict_layers", 0)
    skipped = [f"model.layers.{a.num_hidden_layers + j} (MTP)" for j in range(n_mtp)]
    return Decoder(a, embed, layers, norm, head, a.rms_norm_eps, ctx.main, skipped)
