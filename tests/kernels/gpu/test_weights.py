"""Weights that know their matmul on the Triton kernels: a matrix (w(x), w.rows(ids)) against F.linear on the
reference dequantisation, an expert group against the loop over pairs and BlockExperts (the expand-per-matmul
group), and a GGUF loaded with its blocks on the Triton kernels against the same file on float-expanded
weights."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offload.gguf.types import GGMLType as G
from offload.kernels.gpu.formats import FP8_BLOCK
from offload.kernels.gpu.gemm import dequant_ref
from offload.kernels.gpu.moe import moe_ref
from offload.kernels.gpu.weights import TritonExperts, TritonQuantWeight
from tests.kernels.gpu.blocks import weight


@pytest.mark.parametrize("fmt", [int(G.Q4_K), FP8_BLOCK], ids=["Q4_K", "FP8_BLOCK"])
def test_quant_weight_is_a_linear(fmt, rng, device):
    w, scales = weight(fmt, 255, 512, rng)
    bias = torch.from_numpy(rng.standard_normal(255, dtype=np.float32))
    q = TritonQuantWeight.from_file(w.numpy(), fmt, 512, device, bias.to(device), torch.float32, scales)
    assert q.shape == (255, 512) and q.device.type == device.type
    x = torch.from_numpy(rng.standard_normal((2, 3, 512), dtype=np.float32))  # (B, T, K)
    dense = dequant_ref(w, fmt, 512, scales)
    ref = F.linear(x.double(), dense.double(), bias.double()).float()
    torch.testing.assert_close(q(x.to(device)).cpu(), ref, atol=1e-4, rtol=1e-5)
    ids = torch.tensor([[0, 254], [7, 7]])
    assert torch.equal(q.rows(ids.to(device)).cpu(), dense[ids])


def test_embedding_rows_out_of_range_is_one_error(rng):
    w, _ = weight(G.Q8_0, 7, 64, rng)
    q = TritonQuantWeight(w, G.Q8_0, 64, name="token_embd.weight")
    with pytest.raises(IndexError, match="token_embd.weight: token id out of range"):
        q.rows(torch.tensor([3, 7]))


def test_expert_group_matches_the_loop_and_block_experts(rng, device):
    from offload.models.experts import BlockExperts, ExpertBlocks

    n_experts, held = 8, [1, 4, 6]
    mats = {part: weight(fmt, rows, cols, rng, (3,))[0] for part, fmt, rows, cols in
            (("gate", G.Q4_K, 256, 512), ("up", G.Q4_K, 256, 512), ("down", G.Q6_K, 512, 256))}
    spec = {"gate": (G.Q4_K, 512), "up": (G.Q4_K, 512), "down": (G.Q6_K, 256)}
    group = TritonExperts.from_blocks(device, held, n_experts, *((mats[p], int(spec[p][0]), spec[p][1])
                                                                 for p in ("gate", "up", "down")))
    other = BlockExperts(torch.device("cpu"), held, *(ExpertBlocks(mats[p], int(spec[p][0]), spec[p][1])
                                                      for p in ("gate", "up", "down")))
    for t in (3, 17):  # the decode GEMV and the sorted tl.dot path
        x = torch.from_numpy(rng.standard_normal((t, 512), dtype=np.float32))
        ids = torch.from_numpy(np.stack([rng.permutation(n_experts)[:4] for _ in range(t)]))
        weights = torch.from_numpy(rng.uniform(0.1, 1, (t, 4)).astype(np.float32))
        with warnings.catch_warnings():  # sigmoid of a very negative gate overflows exp in the interpreter: -> 0
            warnings.simplefilter("ignore", RuntimeWarning)
            y = group.submit(x, ids, weights).wait()
        assert y.dtype == x.dtype and y.device == x.device
        ref = moe_ref(x, ids, weights, group.slots.cpu(), group.gate, group.up, group.down)
        scale = float(ref.abs().max())  # float32 sums of large products: errors relative to the largest output
        torch.testing.assert_close(y, ref, atol=1e-5 * scale, rtol=0)
        torch.testing.assert_close(y, other.submit(x, ids, weights).wait(), atol=1e-5 * scale, rtol=0)


def _build(path, triton: bool, device=torch.device("cpu")):
    from offload.gguf.names import hf_config
    from offload.gguf.reader import GGUFFile
    from offload.gguf.source import GGUFSource
    from offload.models import architecture
    from offload.models.loading import LoadContext

    gguf = GGUFFile(path)
    config = hf_config(gguf.metadata, gguf.tensors, str(path))
    arch = architecture(config["model_type"])
    ctx = LoadContext(GGUFSource(gguf), device, torch.float32, triton=triton)
    model = arch.build(ctx, arch.ModelArgs.from_config(config))
    model.gguf = gguf
    return model


def test_gguf_blocks_stay_blocks_on_the_triton_kernels(monkeypatch, device):
    """qwen3_moe Q4_K_M (Q4_K, Q6_K, Q8_0 tensors) loaded with every block on the Triton kernels (the path a GPU
    takes) against the same file on float-expanded weights (the native CPU kernels switched off): the same
    model to float32 summation order."""
    from offload.kernels.cpu import native
    from offload.models.weights import Linear
    from tests.gguf.fixtures_models import Fixtures

    pytest.importorskip("llama_cpp")
    path = Fixtures().path("qwen3_moe", "Q4_K_M")
    model = _build(path, triton=True, device=device)  # the GPU's own kernels there, else the interpreter
    assert isinstance(model.lm_head, TritonQuantWeight) and isinstance(model.embed, TritonQuantWeight)
    assert isinstance(model.layers[0].attn.wq, TritonQuantWeight)
    assert all(isinstance(g, TritonExperts) for moe in model.moe_layers() for g in moe.groups)
    monkeypatch.setattr(native, "SIMD_TYPES", set())
    ref_model = _build(path, triton=False)
    assert isinstance(ref_model.lm_head, Linear)
    if device.type == "cpu":
        # the 151936-row head alone would take the interpreter ~10 s a pass: both models share the float one here
        # (TritonQuantWeight's matmul is checked above and in test_gemm)
        model.lm_head = ref_model.lm_head
    ids = torch.randint(0, 1000, (18,), generator=torch.Generator().manual_seed(0))
    outs = []
    for m, dev in ((model, device), (ref_model, torch.device("cpu"))):
        cache, x = m.new_cache(18), ids.to(dev)
        outs.append(torch.cat([m.forward(x[:17], cache), m.forward(x[17:], cache)]).cpu())  # prefill, decode
    torch.testing.assert_close(outs[0], outs[1], atol=2e-4, rtol=1e-4)


def test_fp8_checkpoint_blocks_stay_fp8_on_the_triton_kernels(tmp_path, device):
    """A tiny deepseek_v3 whose projections are FP8 e4m3 with 128x128 scales (as DeepSeek-V3 / GLM-5-FP8 ship):
    with `triton` its dense projections stay FP8 bytes on the kernels; the logits equal the dequantise-on-read
    path's (offload.checkpoint) to float32 summation order."""
    import json

    from safetensors.torch import load_file, save_file

    from offload.checkpoint import Checkpoint
    from offload.models import architecture
    from offload.models.loading import LoadContext
    from offload.testing import make_tiny_checkpoint

    src = make_tiny_checkpoint("deepseek_v3", tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in state.items():
        if t.ndim == 2 and name.endswith("proj.weight") and "experts." not in name:
            n, k = t.shape
            bn, bk = -(-n // 128), -(-k // 128)
            padded = torch.zeros(bn * 128, bk * 128)
            padded[:n, :k] = t
            scale = padded.view(bn, 128, bk, 128).abs().amax(dim=(1, 3)) / 448.0  # (bn, bk)
            q = (padded.view(bn, 128, bk, 128) / scale[:, None, :, None]).to(torch.float8_e4m3fn)
            out[name] = q.view(bn * 128, bk * 128)[:n, :k].contiguous()
            out[name.removesuffix(".weight") + ".weight_scale_inv"] = scale
        else:
            out[name] = t
    save_file(out, str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(config))

    def build(triton, device):
        ckpt = Checkpoint(src)
        arch = architecture(ckpt.config["model_type"])
        return arch.build(LoadContext(ckpt, device, torch.float32, triton=triton),
                          arch.ModelArgs.from_config(ckpt.config))

    # the kernels where they run: the GPU's when there is one (compiled Triton takes no CPU tensors)
    model, ref_model = build(True, device), build(False, torch.device("cpu"))
    fp8 = [w for layer in model.layers for w in vars(layer.attn).values() if isinstance(w, TritonQuantWeight)]
    assert fp8 and all(w.qtype == FP8_BLOCK for w in fp8)
    ids = torch.randint(0, 200, (5,), generator=torch.Generator().manual_seed(1))
    outs = []
    for m in (model, ref_model):
        cache = m.new_cache(5)
        outs.append(torch.cat([m.forward(ids[:4], cache), m.forward(ids[4:], cache)]).cpu())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
