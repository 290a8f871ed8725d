"""Our forward against transformers' on tiny random models of every architecture (fp32)."""

import pytest
import torch

import offload
from tests.engine.conftest import ARCHS

PROMPT_LEN = 32


def prompt(vocab: int, n: int = PROMPT_LEN, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tiny_checkpoint, hf_model):
    path = tiny_checkpoint(arch)
    llm = offload.load(path, device="cpu", progress=False)
    hf = hf_model(path)
    ids = prompt(llm.model.args.vocab_size)
    ours = llm.logits(ids)  # (T, V)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ref.abs().max() > 1.0  # logits of order 1, so the bound below means something
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decode_matches_full_forward(arch, tiny_checkpoint, hf_model):
    path = tiny_checkpoint(arch)
    llm = offload.load(path, device="cpu", progress=False, ctx=64)
    hf = hf_model(path)
    ids = prompt(llm.model.args.vocab_size, 24 + 8, seed=1)
    cache = llm.model.new_cache(64)
    llm.model.forward(torch.tensor(ids[:24]), cache)
    steps = torch.stack([llm.model.forward(torch.tensor([tok]), cache)[-1] for tok in ids[24:]])  # (8, V)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, 24:]
    assert (steps - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_is_token_identical(arch, tiny_checkpoint, hf_model):
    path = tiny_checkpoint(arch)
    llm = offload.load(path, device="cpu", progress=False)
    hf = hf_model(path)
    ids = prompt(llm.model.args.vocab_size, 24, seed=2)
    eos = llm.tokenizer.eos_token_ids
    ours = llm.generate(ids, max_new_tokens=16, temperature=0.0).token_ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos[0])[0, 24:].tolist()
    ref = [t for t in out if t not in eos]  # HF includes the eos token and pads after it
    assert len(ours) >= 1
    assert ours == ref[: len(ours)] and len(ours) == len(ref)


def test_dsa_selection_really_prunes(tiny_checkpoint):
    """With index_topk below the prompt length the indexer must change the result."""
    ids = prompt(1000, PROMPT_LEN, seed=3)
    sparse = offload.load(tiny_checkpoint("glm_moe_dsa"), device="cpu", progress=False).logits(ids)
    dense = offload.load(tiny_checkpoint("glm_moe_dsa", index_topk=64), device="cpu", progress=False).logits(ids)
    assert torch.allclose(sparse[:8], dense[:8], atol=1e-5)  # first 8 positions: topk covers everything
    assert (sparse[8:] - dense[8:]).abs().max() > 1e-3


def test_index_share_layers_have_no_indexer(tiny_checkpoint):
    llm = offload.load(tiny_checkpoint("glm_moe_dsa"), device="cpu", progress=False)
    kinds = [type(layer.attn.selector).__name__ for layer in llm.model.layers]
    assert kinds == ["Indexer", "function", "Indexer", "function"]
    cache = llm.model.new_cache(16)
    assert [c.index_k is not None for c in cache.layers] == [True, False, True, False]


def test_sharded_checkpoint_with_index(tiny_checkpoint, hf_model, tmp_path):
    """model-0000N-of-0000M.safetensors + model.safetensors.index.json, as big checkpoints ship."""
    import shutil

    src = tiny_checkpoint("glm4_moe")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    hf_model(src).save_pretrained(dst, max_shard_size="100KB")
    assert len(list(dst.glob("model-*.safetensors"))) > 3 and (dst / "model.safetensors.index.json").exists()
    ids = prompt(1000, 16, seed=4)
    ours = offload.load(dst, device="cpu", progress=False).logits(ids)
    ref = offload.load(src, device="cpu", progress=False).logits(ids)
    # the same weights at other file offsets: BLAS may take another code path for differently aligned
    # operands (measured on an AMD EPYC: 1e-6 apart), so equal to float rounding, not bit for bit
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_stacked_expert_layout(tiny_checkpoint, tmp_path):
    """Checkpoints with transformers' fused experts (gate_up_proj (E, 2I, H), down_proj (E, H, I))."""
    import re
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    src = tiny_checkpoint("glm4_moe")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    stacked, experts = {}, {}
    for name, t in tensors.items():
        m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight$", name)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
        else:
            stacked[name] = t
    for prefix, kinds in experts.items():
        n = len(kinds["gate_proj"])
        stacked[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([kinds["gate_proj"][e], kinds["up_proj"][e]]) for e in range(n)])
        stacked[f"{prefix}.down_proj"] = torch.stack([kinds["down_proj"][e] for e in range(n)])
    dst = tmp_path / "stacked"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    save_file(stacked, str(dst / "model.safetensors"))
    ids = prompt(1000, 16, seed=6)
    ref = offload.load(src, device="cpu", progress=False).logits(ids)
    half = {i: ["gpu", "cpu"] * 4 for i in range(3)}
    ours = offload.load(dst, device="cpu", progress=False, placement=half).logits(ids)
    assert (ours - ref).abs().max().item() <= 1e-5
