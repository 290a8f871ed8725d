"""GGUF metadata: the planner's header (offload.gguf.reader underneath) against gguf-py's GGUFReader on a
file gguf-py's writer made."""

import gguf
import numpy as np
import pytest

from offload.errors import GGUFError
from offload.placement import model as M
from offload.gguf.reader import GGUFFile
from offload.placement.gguf_meta import read_header, spec_from_gguf
from offload.placement.quant import QUANT_BLOCKS


H, V, E, FF, L = 256, 64, 4, 256, 2


def _write(path, kv_heads=2):
    T = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(L)
    w.add_embedding_length(H)
    w.add_context_length(4096)
    w.add_feed_forward_length(512)
    w.add_expert_feed_forward_length(FF)
    w.add_expert_count(E)
    w.add_expert_used_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(64)
    w.add_value_length(64)
    w.add_token_list([f"t{i}" for i in range(V)])

    def add(name, shape, qtype):  # shape in numpy order (rows, cols); bytes of the right size
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape))
        if qtype in (T.F32, T.F16):
            data = np.zeros(shape, dtype=np.float32 if qtype == T.F32 else np.float16)
            w.add_tensor(name, data)
        else:
            raw = np.zeros((*shape[:-1], shape[-1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
        return n

    add("token_embd.weight", (V, H), T.F16)
    add("output_norm.weight", (H,), T.F32)
    add("output.weight", (V, H), T.Q8_0)
    for i in range(L):
        add(f"blk.{i}.attn_norm.weight", (H,), T.F32)
        add(f"blk.{i}.ffn_norm.weight", (H,), T.F32)
        add(f"blk.{i}.attn_q.weight", (256, H), T.Q8_0)
        add(f"blk.{i}.attn_k.weight", (128, H), T.Q8_0)
        add(f"blk.{i}.attn_v.weight", (128, H), T.Q8_0)
        add(f"blk.{i}.attn_output.weight", (H, 256), T.Q8_0)
        add(f"blk.{i}.attn_q_norm.weight", (64,), T.F32)
        add(f"blk.{i}.attn_k_norm.weight", (64,), T.F32)
        add(f"blk.{i}.ffn_gate_inp.weight", (E, H), T.F32)
        add(f"blk.{i}.ffn_gate_exps.weight", (E, FF, H), T.Q4_K)
        add(f"blk.{i}.ffn_up_exps.weight", (E, FF, H), T.Q4_K)
        add(f"blk.{i}.ffn_down_exps.weight", (E, H, FF), T.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_header_matches_gguf_py(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path)
    meta, tensors = read_header(path)
    ref = gguf.GGUFReader(str(path))
    assert meta["qwen3moe.expert_count"] == E
    assert meta["general.architecture"] == "qwen3moe"
    assert len(meta["tokenizer.ggml.tokens"]) == V
    assert [t[0] for t in tensors] == [t.name for t in ref.tensors]
    for (name, dims, qtype), t in zip(tensors, ref.tensors):
        assert dims == [int(x) for x in t.shape], name
        assert qtype == t.tensor_type.name, name
        block, size = QUANT_BLOCKS.get(qtype, (1, 4))
        assert int(np.prod(dims)) // block * size == t.n_bytes, name


def test_spec_and_bytes_from_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path)
    spec = M.load_model(path)
    assert (spec.arch, spec.n_layers, spec.hidden, spec.n_experts, spec.top_k, spec.vocab) == (
        "qwen3_moe", L, H, E, 2, V)
    assert spec.qk_norm and spec.head_dim == 64 and spec.n_kv_heads == 2
    q = spec.extra["quant"]
    assert q.bytes_per_weight("routed_experts") == pytest.approx((144 + 144 + 210) / (3 * 256))
    assert q.bytes_per_weight("attention") == pytest.approx(34 / 32)
    assert q.label("routed_experts") == "Q4_K"
    assert spec_from_gguf(path).n_experts == E


def test_bad_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(GGUFError, match="bad magic"):
        read_header(bad)
    path = tmp_path / "tiny.gguf"
    _write(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(GGUFError, match="truncated"):
        read_header(cut)


def test_header_values_are_plain_python(tmp_path):
    """Numeric arrays come back as lists (per-layer values: the planner takes their max), the same
    whether the file is named or already open (the loader's GGUFFile)."""
    path = tmp_path / "tiny.gguf"
    _write(path, kv_heads=[2, 1])
    meta, tensors = read_header(path)
    assert meta["qwen3moe.attention.head_count_kv"] == [2, 1]
    assert type(meta["qwen3moe.attention.head_count_kv"][0]) is int
    assert type(meta["qwen3moe.expert_count"]) is int and type(meta["tokenizer.ggml.tokens"]) is list
    assert M.load_model(path).n_kv_heads == 2
    with GGUFFile(path) as g:
        assert read_header(g) == (meta, tensors)
        spec = spec_from_gguf(g)
    assert spec == spec_from_gguf(path) and spec.name == "tiny"


def test_header_rejects_data_past_the_end(tmp_path):
    """The tensor table is validated against the file: a file cut inside its data is not a model."""
    path = tmp_path / "tiny.gguf"
    _write(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GGUFError, match="cut.gguf: tensor 'blk.1.ffn_down_exps.weight' .* truncated"):
        spec_from_gguf(cut)


def test_glm_dsa_metadata_equals_hf_config(tmp_path):
    """A GLM-5-style (MLA + DSA IndexShare + MTP) header gives the same description as its config.json."""
    transformers = pytest.importorskip("transformers")
    from offload.testing import TINY_CONFIGS

    hf = transformers.GlmMoeDsaConfig(**TINY_CONFIGS["glm_moe_dsa"], vocab_size=100, num_nextn_predict_layers=1)
    path = tmp_path / "dsa.gguf"
    w = gguf.GGUFWriter(str(path), "glm-dsa")
    w.add_block_count(hf.num_hidden_layers + 1)  # llama.cpp counts the MTP layer as a block
    w.add_nextn_predict_layers(1)
    w.add_embedding_length(hf.hidden_size)
    w.add_context_length(hf.max_position_embeddings)
    w.add_feed_forward_length(hf.intermediate_size)
    w.add_expert_feed_forward_length(hf.moe_intermediate_size)
    w.add_expert_count(hf.n_routed_experts)
    w.add_expert_used_count(hf.num_experts_per_tok)
    w.add_expert_shared_count(hf.n_shared_experts)
    w.add_leading_dense_block_count(hf.first_k_dense_replace)
    w.add_head_count(hf.num_attention_heads)
    w.add_head_count_kv(1)
    w.add_q_lora_rank(hf.q_lora_rank)
    w.add_kv_lora_rank(hf.kv_lora_rank)
    w.add_key_length(hf.kv_lora_rank + hf.qk_rope_head_dim)
    w.add_value_length(hf.kv_lora_rank)
    w.add_key_length_mla(hf.qk_nope_head_dim + hf.qk_rope_head_dim)
    w.add_value_length_mla(hf.v_head_dim)
    w.add_rope_dimension_count(hf.qk_rope_head_dim)
    w.add_indexer_head_count(hf.index_n_heads)
    w.add_indexer_key_length(hf.index_head_dim)
    w.add_indexer_top_k(hf.index_topk)
    w.add_tensor("token_embd.weight", np.zeros((100, hf.hidden_size), dtype=np.float32))
    w.add_tensor("output.weight", np.zeros((100, hf.hidden_size), dtype=np.float32))
    for i, t in enumerate(hf.indexer_types):
        if t == "full":
            w.add_tensor(f"blk.{i}.indexer.attn_k.weight", np.zeros((hf.index_head_dim, hf.hidden_size), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    spec = M.load_model(path)
    ref = M.from_hf_config(hf.to_dict(), name="ref")
    for field in ("n_layers", "hidden", "n_experts", "top_k", "n_shared", "dense_layers", "q_lora_rank",
                  "kv_lora_rank", "qk_nope", "qk_rope", "v_head", "index_heads", "index_head_dim", "index_topk",
                  "indexer_layers", "mtp_layers", "vocab", "moe_inter", "dense_inter"):
        assert getattr(spec, field) == getattr(ref, field), field
    assert spec.indexer_layers == (0, 2) and spec.mtp_layers == 1
    assert M.total_params(spec, with_mtp=True) == M.total_params(ref, with_mtp=True)
