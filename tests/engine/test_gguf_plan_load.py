"""The plan a GGUF load makes: its RAM count is what the loader really holds (IQ4_NL experts are rewritten as
Q8_0 on the CPU, 1.89x the file's bytes), and the file's header is parsed once for the plan and the weights."""

import numpy as np
import pytest
from gguf import GGUFValueType

import offload
from offload.gguf.reader import GGUFFile
from offload.planning import make_plan

from tests.gguf.gguf_forge import write_model
from tests.gguf.tiny_gguf import METADATA, TOKENS

H, I, E, LAYERS, V = 64, 32, 4, 2, len(TOKENS)  # rows of 32 and 64: whole IQ4_NL blocks


def _write(path, expert_type: str):
    meta = {f"qwen3moe.{k}": (v, GGUFValueType.FLOAT32 if isinstance(v, float) else GGUFValueType.UINT32)
            for k, v in METADATA["qwen3moe"].items() if k != "block_count"}
    meta |= {"qwen3moe.embedding_length": (H, GGUFValueType.UINT32),
             "qwen3moe.attention.key_length": (32, GGUFValueType.UINT32),
             "qwen3moe.attention.value_length": (32, GGUFValueType.UINT32),
             "qwen3moe.expert_feed_forward_length": (I, GGUFValueType.UINT32),
             "qwen3moe.vocab_size": (V, GGUFValueType.UINT32),
             "tokenizer.ggml.model": ("gpt2", GGUFValueType.STRING),
             "tokenizer.ggml.pre": ("qwen2", GGUFValueType.STRING),
             "tokenizer.ggml.tokens": (TOKENS, GGUFValueType.ARRAY, GGUFValueType.STRING),
             "tokenizer.ggml.merges": (["a b"], GGUFValueType.ARRAY, GGUFValueType.STRING),
             "tokenizer.ggml.eos_token_id": (1, GGUFValueType.UINT32)}
    tensors = {"token_embd.weight": ("F32", (V, H)), "output_norm.weight": ("F32", (H,)),
               "output.weight": ("F32", (V, H))}
    for i in range(LAYERS):
        b = f"blk.{i}."
        tensors |= {b + "attn_q.weight": ("F32", (2 * 32, H)), b + "attn_k.weight": ("F32", (32, H)),
                    b + "attn_v.weight": ("F32", (32, H)), b + "attn_output.weight": ("F32", (H, 2 * 32)),
                    b + "attn_q_norm.weight": ("F32", (32,)), b + "attn_k_norm.weight": ("F32", (32,)),
                    b + "attn_norm.weight": ("F32", (H,)), b + "ffn_norm.weight": ("F32", (H,)),
                    b + "ffn_gate_inp.weight": ("F32", (E, H)),
                    b + "ffn_gate_exps.weight": (expert_type, (E, I, H)),
                    b + "ffn_up_exps.weight": (expert_type, (E, I, H)),
                    b + "ffn_down_exps.weight": (expert_type, (E, H, I))}
    write_model(path, tensors, np.random.default_rng(0), metadata=meta, n_layers=LAYERS)
    return path


@pytest.fixture(scope="module")
def iq4_nl(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("iq4nl") / "tiny-iq4nl.gguf", "IQ4_NL")


def _cpu_expert_bytes(llm) -> int:
    from offload.kernels.cpu.experts import CpuExpertGroup

    groups = [g for moe in llm.model.moe_layers() for g in moe.groups]
    assert groups and all(isinstance(g, CpuExpertGroup) for g in groups)
    return sum(g.nbytes for g in groups)


@pytest.mark.parametrize("expert_type", ["IQ4_NL", "Q8_0"])
def test_planned_ram_of_cpu_experts_is_what_the_loader_holds(tmp_path, iq4_nl, expert_type):
    path = iq4_nl if expert_type == "IQ4_NL" else _write(tmp_path / "tiny-q8.gguf", "Q8_0")
    stored = LAYERS * E * 3 * I * H // 32 * {"IQ4_NL": 18, "Q8_0": 34}[expert_type]  # the file's expert bytes
    p = make_plan(path, context=64, ram="64GiB", use_gpus=False)
    planned = p.usage()["cpu"]["routed_experts"]
    held = _cpu_expert_bytes(offload.load(path, device="cpu", ctx=64, progress=False))
    assert held == (stored * 34 // 18 if expert_type == "IQ4_NL" else stored)  # as_native: 34-byte Q8_0 blocks
    assert planned == held
    cpu = next(d for d in p.devices() if d["name"] == "cpu")
    assert cpu["by_class"]["routed_experts"] == held  # the report (and fits.check_ram) count the same bytes


def test_a_gguf_load_parses_the_header_once(iq4_nl, monkeypatch):
    """The plan (placement="auto") and the weights read one GGUFFile: the reader parses each shard once."""
    from offload.gguf import reader

    parses = []
    parse = reader._parse
    monkeypatch.setattr(reader, "_parse", lambda path, i: parses.append(path) or parse(path, i))
    llm = offload.load(iq4_nl, device="cpu", ctx=64, progress=False)
    assert llm.plan is not None  # the plan was made
    assert parses == [iq4_nl]


def test_load_time_reads_the_file_bytes(iq4_nl):
    """Only RAM grows: the load reads the file as stored, so the RAM count and the bytes loaded differ by the
    IQ4_NL experts' growth."""
    p = make_plan(iq4_nl, context=64, ram="64GiB", use_gpus=False)
    held, stored = p.usage()["cpu"], p.usage(held=False)["cpu"]
    assert held["routed_experts"] == stored["routed_experts"] * 34 // 18
    assert {c: n for c, n in held.items() if c != "routed_experts"} == \
        {c: n for c, n in stored.items() if c != "routed_experts"}
    with GGUFFile(iq4_nl) as f:
        file_bytes = sum(t.nbytes for t in f.tensors.values())
    assert sum(n for c, n in stored.items() if c != "kv_cache") == file_bytes
