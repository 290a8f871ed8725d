"""Dense decoders (llama, qwen2, qwen3) against transformers on tiny random models (fp32), and their plans:
every layer a dense FFN in the always-GPU class, a tied head read whole every token."""

import json

import pytest
import torch

import offload
from tests.engine.test_models import prompt

DENSE = ["llama", "qwen2", "qwen3"]


@pytest.mark.parametrize("arch", DENSE)
def test_logits_match_transformers(arch, tiny_checkpoint, hf_model):
    path = tiny_checkpoint(arch)
    llm = offload.load(path, device="cpu", progress=False)
    hf = hf_model(path)
    ids = prompt(llm.model.args.vocab_size)
    ours = llm.logits(ids)  # (T, V)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert ref.abs().max() > 1.0
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", DENSE)
def test_cached_decode_and_greedy_match_transformers(arch, tiny_checkpoint, hf_model):
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
    eos = llm.tokenizer.eos_token_ids
    ours = llm.generate(ids[:24], max_new_tokens=16, temperature=0.0).token_ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids[:24]]), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos[0])[0, 24:].tolist()
    ref_ids = [t for t in out if t not in eos]
    assert ours == ref_ids[: len(ours)] and len(ours) == len(ref_ids)


def test_llama_variants_match_transformers(hf_model, tmp_path):
    """Llama 3.1 rope scaling, attention biases on q/k/v and o, a tied head."""
    from offload.testing import make_tiny_checkpoint

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path = make_tiny_checkpoint("llama", tmp_path, rope_parameters=rope, attention_bias=True,
                                tie_word_embeddings=True)
    llm = offload.load(path, device="cpu", progress=False)
    hf = hf_model(path)
    ids = prompt(llm.model.args.vocab_size, 48, seed=3)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert llm.model.lm_head is llm.model.embed
    assert (llm.logits(ids) - ref).abs().max().item() <= 1e-4


def test_dense_plan_reads_every_weight_and_the_tied_head(tiny_checkpoint, tmp_path):
    """A dense model plans: every layer's FFN is `dense_ffn` (always-GPU class, no experts), and the decode
    prediction reads every weight each token, the tied head (the embedding table) whole."""
    from offload.planning import make_plan
    from offload.placement import report
    from offload.placement.planner import head_read_bytes

    path = tiny_checkpoint("llama", tie_word_embeddings=True)
    p = make_plan(path, context=256, ram="8GiB", dram_bw="10GB/s")
    plan = report.to_json(p)
    assert p.spec.n_experts == 0 and p.spec.dense_layers == tuple(range(3))
    classes = {e["class"] for e in plan["placement"]}
    assert "routed_experts" not in classes and "dense_ffn" in classes
    assert head_read_bytes(p) == p.head.bytes + p.emb.bytes  # tied: the table is the head
    cfg = json.loads((path / "config.json").read_text())
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    weights = layers * (3 * h * inter + 2 * h * 4 * 16 + 2 * h * 2 * 16) * 2  # bf16 MLP + attention
    assert plan["prediction"]["cpu_bytes_per_token"] >= weights
    llm = offload.load(path, device="cpu", progress=False, ctx=256)  # the load plans the same way
    assert llm.plan["prediction"]["gpu_experts"] == 0 and llm.plan["prediction"]["cpu_experts"] == 0
