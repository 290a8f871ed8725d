"""The KV home a plan gives a DSA layer: its latent + rope-key cache in RAM, its indexer keys with the layer (a
stand-in GPU here, as in test_homes), the selected rows copied to the layer each step. Same logits as the KV
with the layer, with contexts below and above index_topk (8 in the tiny checkpoint)."""

import json

import pytest
import torch

from offload.planning import homes_from_plan
from tests.engine.test_homes import STAND_INS, build, run

N_LAYERS = 4


def _model(path, kv_in_ram: bool):
    return build(path, layer_home=lambda i: "gpu:0", kv_home=(lambda i: "cpu") if kv_in_ram else None,
                 embed_home="gpu:0", head_home="gpu:0")


@pytest.mark.parametrize("n_tokens,n_prefill", [(7, 5), (30, 20), (40, 3)])
def test_kv_in_ram_gives_the_same_logits(tiny_checkpoint, n_tokens, n_prefill):
    path = tiny_checkpoint("glm_moe_dsa")
    ref_model, model = _model(path, False), _model(path, True)
    ids = torch.randint(0, ref_model.args.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(4)).tolist()
    ref = run(ref_model, ids, n_prefill)
    cache = model.new_cache(n_tokens)
    for layer, ref_layer in zip(model.layers, ref_model.layers):
        assert layer.attn.device == STAND_INS["gpu:0"] and layer.attn.kv_device == torch.device("cpu")
        assert ref_layer.attn.kv_device == STAND_INS["gpu:0"]
    del cache
    out = run(model, ids, n_prefill)
    assert torch.equal(out, ref)  # the same rows, the same arithmetic: bit for bit
    moved = sum(layer.attn.rows_moved for layer in model.layers)
    assert moved > 0 and all(layer.attn.rows_moved == 0 for layer in ref_model.layers)
    if n_tokens > 8:  # decode past index_topk copies at most index_topk rows a layer a step
        decode = model.layers[0].attn
        before = decode.rows_moved
        c = model.new_cache(n_tokens + 1)
        model.forward(torch.tensor(ids), c)
        mid = decode.rows_moved
        model.forward(torch.tensor([1]), c)
        assert 0 < decode.rows_moved - mid <= 8 and mid - before <= n_tokens


def test_attention_without_dsa_keeps_its_kv_with_the_layer(tiny_checkpoint):
    """DeepSeek-V3's MLA reads every cached row: a KV home in RAM would copy the whole cache each step."""
    model = _model(tiny_checkpoint("deepseek_v3"), True)
    assert all(layer.attn.kv_device == STAND_INS["gpu:0"] for layer in model.layers)


def test_the_plan_gives_the_kv_its_home():
    entries = [{"tensor": "attn", "class": "attention", "layer": 0, "expert": None, "device": "gpu:0"},
               {"tensor": "kv_cache", "class": "kv_cache", "layer": 0, "expert": None, "device": "cpu"},
               {"tensor": "index_keys", "class": "kv_cache", "layer": 0, "expert": None, "device": "gpu:0"},
               {"tensor": "attn", "class": "attention", "layer": 1, "expert": None, "device": "gpu:0"},
               {"tensor": "kv_cache", "class": "kv_cache", "layer": 1, "expert": None, "device": "gpu:0"}]
    homes = homes_from_plan(json.loads(json.dumps({"placement": entries})))
    assert [homes.layer(i) for i in (0, 1)] == ["gpu:0", "gpu:0"]
    assert [homes.kv(i) for i in (0, 1, 2)] == ["cpu", "gpu:0", "gpu:0"]


def test_the_memory_check_counts_the_latent_in_ram(tiny_checkpoint):
    from offload.kv_memory import context_bytes

    model = _model(tiny_checkpoint("glm_moe_dsa"), True)
    need = context_bytes(model, 100)
    a = model.layers[0].attn
    full = sum(1 for layer in model.layers if layer.attn.index_dim)  # layers with indexer keys
    assert need["cpu"][0] == N_LAYERS * 100 * (a.c + a.r) * 4  # float32 latent + rope key, in RAM
    assert need["cpu:0"][0] == full * 100 * a.index_dim * 4  # the indexer keys, on the (stand-in) GPU


def test_index_share_layers_reuse_the_host_read(tiny_checkpoint, monkeypatch):
    """The indices are read on the host once per full indexer layer: an IndexShare layer (same selection, its
    own latent cache) reuses the distinct rows and renumbering; the logits stay those of the KV with the layer."""
    path = tiny_checkpoint("glm_moe_dsa")
    ref_model, model = _model(path, False), _model(path, True)
    ids = torch.randint(0, ref_model.args.vocab_size, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    reads = []
    unique = torch.unique

    def counted(*args, **kwargs):
        if kwargs.get("return_inverse"):  # fetch_rows' (the MoE groups call unique too)
            reads.append(1)
        return unique(*args, **kwargs)

    monkeypatch.setattr(torch, "unique", counted)
    assert torch.equal(run(model, ids, 20), run(ref_model, ids, 20))
    full = model.args.indexer_types.count("full")
    assert 0 < full < N_LAYERS
    reads.clear()
    cache = model.new_cache(31)
    model.forward(torch.tensor(ids), cache)
    reads.clear()
    model.forward(torch.tensor([1]), cache)  # a decode step past index_topk: every layer gathers
    assert len(reads) == full
