"""Homes on devices: layers split over two stand-in GPUs ("gpu:0", "gpu:1" mapped to CPU devices), routed
experts mixed over gpu / gpu:N / cpu, the embedding and head on homes of their own: the same logits as all
on one device. And every weight built at load is an object that knows its matmul (w(x), w.rows(ids))."""

import pytest
import torch

from offload.checkpoint import Checkpoint
from offload.errors import ConfigError
from offload.kernels.cpu.experts import CpuExpertGroup
from offload.models import architecture
from offload.models.loading import LoadContext
from offload.models.moe import MoE
from tests.engine.conftest import ARCHS
from tests.gguf.fixtures_models import gguf_models  # noqa: F401  (session fixture)

# distinct device objects (tensors on both report "cpu"): each layer's and group's home is visible
STAND_INS = {"gpu:0": torch.device("cpu", 0), "gpu:1": torch.device("cpu", 1)}
EXPERT_HOMES = ["gpu", "gpu:0", "gpu:1", "cpu"]


def build(path, device: str = "cpu", **homes):
    """The model at `path` (checkpoint dir or .gguf), float32, main device `device`, these LoadContext homes."""
    gguf = None
    if str(path).endswith(".gguf"):
        from offload.gguf.names import hf_config
        from offload.gguf.reader import GGUFFile
        from offload.gguf.source import GGUFSource

        gguf = GGUFFile(path)
        config = hf_config(gguf.metadata, gguf.tensors, str(path))
        source = GGUFSource(gguf)
    else:
        source = Checkpoint(path)
        config = source.config
    arch = architecture(config["model_type"])
    stand_ins = dict(STAND_INS) if device == "cpu" else {}
    ctx = LoadContext(source, torch.device(device), torch.float32, home_devices=stand_ins, **homes)
    model = arch.build(ctx, arch.ModelArgs.from_config(config))
    model.gguf = gguf  # GGUF groups read the mmap
    return model


def split_homes(n_layers: int) -> dict:
    """Layers 0..1 on gpu:0, the rest on gpu:1; each layer's experts cycle over every home."""
    return dict(layer_home=lambda i: "gpu:0" if i < 2 else "gpu:1",
                placement=lambda layer, n: [EXPERT_HOMES[(e + layer) % 4] for e in range(n)],
                embed_home="gpu:0", head_home="gpu:1")


def run(model, ids: list[int], n_prefill: int) -> torch.Tensor:
    """Logits of a prefill of n_prefill tokens, then one decode step per remaining token: (T, V)."""
    cache = model.new_cache(len(ids))
    out = [model.forward(torch.tensor(ids[:n_prefill]), cache)]
    out += [model.forward(torch.tensor([t]), cache) for t in ids[n_prefill:]]
    return torch.cat(out)


def check_split(model, n_layers: int):
    """Where things landed: each layer (its attention, hence its cache) and its experts' groups."""
    for i, layer in enumerate(model.layers):
        want = STAND_INS["gpu:0" if i < 2 else "gpu:1"]
        assert layer.device == want and layer.attn.device == want
        if isinstance(layer.mlp, MoE):
            # "gpu" experts live on their layer's GPU: one group per home name, in home order (a CPU kernel
            # group, as a GGUF's on a CPU stand-in, says "cpu" whichever stand-in it is)
            homes = [want, STAND_INS["gpu:0"], STAND_INS["gpu:1"], torch.device("cpu")]
            assert len(layer.mlp.groups) == len(homes)
            for g, home in zip(layer.mlp.groups, homes):
                assert g.device == home or (isinstance(g, CpuExpertGroup) and home.type == "cpu")
            held = sorted(e for g in layer.mlp.groups for e in g.ids)
            assert held == list(range(len(held)))  # every expert in exactly one group


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_split_over_two_gpus_gives_the_same_logits(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    ref_model = build(path)
    ids = torch.randint(0, ref_model.args.vocab_size, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = run(ref_model, ids, 20)
    model = build(path, **split_homes(len(ref_model.layers)))
    check_split(model, len(model.layers))
    assert (run(model, ids, 20) - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("fmt,tol", [("F32", 1e-5), ("Q8_0", 1e-4)])
def test_layer_split_of_a_gguf_gives_the_same_logits(gguf_models, fmt, tol):  # noqa: F811
    """A GGUF's expert groups on CPU homes run the fused kernel; Q8_0 also keeps the projections in blocks.
    A CPU group takes the layer's shared expert into its call, so the split changes the order of the sums:
    Q8_0 allows what tests/gguf's split test allows (8-bit activations: a rounding tie may move a quantum)."""
    path = gguf_models.path("glm_moe_dsa", fmt)
    ids = gguf_models.prompt_ids("glm_moe_dsa", fmt)[:20]
    ref = run(build(path), ids, 16)
    model = build(path, **split_homes(0))
    check_split(model, len(model.layers))
    groups = [g for moe in model.moe_layers() for g in moe.groups]
    assert all(isinstance(g, CpuExpertGroup) for g in groups) and len(groups) == 4 * len(model.moe_layers())
    for g in groups[::2]:
        g.background = True  # half of them on the worker thread, as for a caller on a GPU
    torch.testing.assert_close(run(model, ids, 16), ref, atol=tol, rtol=tol)


def test_home_names_map_to_devices():
    ctx = LoadContext(None, torch.device("cpu"), torch.float32, home_devices={"gpu:1": torch.device("cpu", 1)})
    assert ctx.device_of("gpu") == torch.device("cpu") and ctx.device_of("cpu") == torch.device("cpu")
    assert ctx.device_of("gpu:1") == torch.device("cpu", 1)  # overridden
    want = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert ctx.device_of("gpu:0") == want
    layer = ctx.at("gpu:1")
    assert layer.device == torch.device("cpu", 1) and layer.main == torch.device("cpu")
    assert layer.expert_device("gpu") == torch.device("cpu", 1)  # the layer's GPU
    assert ctx.at("cpu").expert_device("gpu") == ctx.main  # a CPU layer's "gpu" experts: the main device
    with pytest.raises(ConfigError, match="unknown home 'disk'"):
        ctx.device_of("disk")


def _weights_of(model):
    """(where, object) for every attribute of the model's parts that is a weight or a 2-D tensor."""
    from offload.kernels.cpu.weights import QuantWeight
    from offload.models.glm_moe_dsa import Indexer
    from offload.models.weights import Linear

    found = [("embed", model.embed), ("lm_head", model.lm_head)]
    for i, layer in enumerate(model.layers):
        objs = [("attn", layer.attn), ("mlp", layer.mlp)]
        if isinstance(getattr(layer.attn, "selector", None), Indexer):
            objs.append(("indexer", layer.attn.selector))
        if isinstance(layer.mlp, MoE) and layer.mlp.shared is not None:
            objs.append(("shared", layer.mlp.shared))
        for kind, obj in objs:
            for name, v in vars(obj).items():
                if isinstance(v, (Linear, QuantWeight)) or (isinstance(v, torch.Tensor) and v.dim() == 2):
                    found.append((f"layer {i} {kind}.{name}", v))
    return found


@pytest.mark.parametrize("arch", ARCHS)
def test_every_weight_knows_its_matmul(arch, tiny_checkpoint):
    """No projection is a bare tensor for a forward to branch on: each is an object with w(x), w.rows(ids),
    .device and .shape (offload.models.weights)."""
    from offload.kernels.cpu.weights import QuantWeight
    from offload.models.weights import Linear

    model = build(tiny_checkpoint(arch), **split_homes(0))
    found = _weights_of(model)
    assert len(found) > 4 * len(model.layers)
    for where, w in found:
        assert isinstance(w, (Linear, QuantWeight)), where
        x = torch.randn(3, w.shape[1])
        assert w(x.to(w.device)).shape == (3, w.shape[0]), where
        assert w.rows(torch.tensor([0, 2])).shape == (2, w.shape[1]), where


def test_every_gguf_weight_knows_its_matmul(gguf_models):  # noqa: F811
    """The same for a quantised GGUF on the CPU, where projections, embedding and head stay ggml blocks, and
    the fused forms (q / k / v in one native call, the SwiGLU MLP in one) are chosen at load."""
    from offload.kernels.cpu.weights import QuantLinears, QuantMLP, QuantWeight
    from offload.models.base import MLP
    from offload.models.weights import Linear, Linears

    model = build(gguf_models.path("glm4_moe", "Q8_0"))
    found = _weights_of(model)
    for where, w in found:
        assert isinstance(w, (Linear, QuantWeight)), where
        assert w(torch.randn(2, w.shape[1])).shape == (2, w.shape[0]), where
        assert w.rows(torch.tensor([1])).shape == (1, w.shape[1]), where
    quant = [w for _, w in found if isinstance(w, QuantWeight)]
    assert quant or not native_fast()
    for layer in model.layers:
        a = layer.attn
        fused = all(isinstance(w, QuantWeight) for w in (a.wq, a.wk, a.wv))
        assert isinstance(a.wqkv, QuantLinears if fused else Linears)
        mlp = layer.mlp.shared if isinstance(layer.mlp, MoE) else layer.mlp
        if mlp is not None:
            fused = all(isinstance(w, QuantWeight) for w in (mlp.gate, mlp.up, mlp.down))
            assert isinstance(mlp, QuantMLP if fused else MLP)


def native_fast() -> bool:
    from offload.kernels.cpu import native

    return native.fast(8)


def test_cpu_blocks_run_natively_in_bfloat16_too(gguf_models):  # noqa: F811
    """Where the model computes in bfloat16, CPU-resident ggml blocks still run on the native kernels (a CPU
    layer of a GPU model): outputs in the activations' dtype, the embedding's rows too."""
    import offload
    from offload.kernels.cpu import native
    from offload.kernels.cpu.weights import QuantWeight

    path = gguf_models.path("qwen3_moe", "Q8_0")
    ids = gguf_models.prompt_ids("qwen3_moe", "Q8_0")
    llm = offload.load(path, device="cpu", dtype="bfloat16", progress=False)
    if native.fast(8):
        assert isinstance(llm.model.layers[0].attn.wq, QuantWeight)
    got = llm.logits(ids)
    ref = gguf_models.ours("qwen3_moe", "Q8_0").logits(ids)
    assert torch.nn.functional.cosine_similarity(got, ref, dim=-1).min() > 0.99
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
