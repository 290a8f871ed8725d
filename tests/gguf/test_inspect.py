"""`offload inspect`: tensor classes, counts and bytes checked against gguf-py's reader; exit codes."""

import json
import os
import subprocess

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType as V
from tests.gguf.gguf_forge import write_model

from offload.gguf.summary import classify

from tests.commands import offload_command

# a tiny GLM-4.5-style model: dense layer 0, MoE layer 1, MTP layer 2 (block_count 3, 1 nextn layer)
EXPECTED = {
    "token_embd.weight": ("embeddings", "Q4_K", (32, 256)),
    "output.weight": ("output", "Q6_K", (32, 256)),
    "output_norm.weight": ("norms", "F32", (256,)),
    "blk.0.attn_norm.weight": ("norms", "F32", (256,)),
    "blk.0.attn_q.weight": ("attention", "Q8_0", (64, 256)),
    "blk.0.attn_output.weight": ("attention", "Q4_K", (256, 256)),
    "blk.0.ffn_gate.weight": ("dense FFN", "Q4_K", (64, 256)),
    "blk.0.ffn_down.weight": ("dense FFN", "Q6_K", (256, 256)),
    "blk.1.attn_kv_a_mqa.weight": ("attention", "Q8_0", (96, 256)),
    "blk.1.attn_k_b.weight": ("attention", "Q8_0", (4, 64, 32)),
    "blk.1.indexer.attn_q_b.weight": ("indexer", "Q8_0", (64, 256)),
    "blk.1.indexer.k_norm.weight": ("indexer", "F32", (64,)),
    "blk.1.ffn_gate_inp.weight": ("router", "F32", (8, 256)),
    "blk.1.exp_probs_b.bias": ("router", "F32", (8,)),
    "blk.1.ffn_gate_exps.weight": ("routed experts", "IQ2_XXS", (8, 64, 256)),
    "blk.1.ffn_down_exps.weight": ("routed experts", "Q2_K", (8, 256, 256)),
    "blk.1.ffn_up_shexp.weight": ("shared experts", "Q4_K", (64, 256)),
    "blk.2.nextn.eh_proj.weight": ("MTP / nextn", "Q8_0", (256, 512)),
    "blk.2.ffn_up_exps.weight": ("MTP / nextn", "Q4_K", (8, 64, 256)),
    "rope_freqs.weight": ("other", "F32", (32,)),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "glm.gguf"
    write_model(path, {k: (t, s) for k, (_, t, s) in EXPECTED.items()}, np.random.default_rng(0),
                arch="glm4moe", metadata={"glm4moe.nextn_predict_layers": (1, V.UINT32),
                                          "glm4moe.expert_count": (8, V.UINT32)}, n_layers=3)
    return path


def _offload(*args, cwd):
    env = {**os.environ, "COLUMNS": "200"}  # keep rich's table on one line per row
    return subprocess.run([*offload_command(), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env=env)


def test_classify_without_mtp_metadata():
    assert classify("blk.2.ffn_up_exps.weight") == "routed experts"
    assert classify("blk.2.ffn_up_exps.weight", mtp_first_block=2) == "MTP / nextn"
    assert classify("blk.0.ffn_gate_inp_shexp.weight") == "shared experts"
    assert classify("token_embd_norm.weight") == "norms"


def test_inspect_json(model, tmp_path):
    r = _offload("inspect", str(model), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["architecture"], s["block_count"], s["nextn_predict_layers"], s["expert_count"]) == ("glm4moe", 3, 1, 8)
    ref = {t.name: t for t in GGUFReader(model).tensors}
    want: dict[str, dict] = {}
    for name, (cls, tname, _) in EXPECTED.items():
        c = want.setdefault(cls, {"tensors": 0, "params": 0, "bytes": 0, "types": {}})
        c["tensors"] += 1
        c["params"] += int(ref[name].n_elements)
        c["bytes"] += int(ref[name].n_bytes)
        assert ref[name].tensor_type.name == tname
        c["types"].setdefault(tname, {"tensors": 0, "bytes": 0})
        c["types"][tname]["tensors"] += 1
        c["types"][tname]["bytes"] += int(ref[name].n_bytes)
    assert set(s["classes"]) == set(want)
    for cls, c in want.items():
        got = s["classes"][cls]
        assert (got["tensors"], got["params"], got["bytes"], got["types"]) == \
            (c["tensors"], c["params"], c["bytes"], c["types"]), cls
    assert s["params"] == sum(int(t.n_elements) for t in ref.values())
    assert s["params_without_mtp"] == s["params"] - want["MTP / nextn"]["params"]
    assert s["tensor_bytes"] == sum(int(t.n_bytes) for t in ref.values())


def test_inspect_table(model, tmp_path):
    r = _offload("inspect", str(model), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for word in ["glm4moe", "routed experts", "IQ2_XXS", "MTP / nextn", "indexer", "total"]:
        assert word in r.stdout


def test_inspect_errors(tmp_path):
    r = _offload("inspect", str(tmp_path / "missing.gguf"), cwd=tmp_path)
    assert r.returncode == 2 and "missing.gguf: no such file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x07\0\0\0" + b"\0" * 16)
    r = _offload("inspect", str(bad), cwd=tmp_path)
    assert r.returncode == 2 and "unsupported GGUF version 7" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
