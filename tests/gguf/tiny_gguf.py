"""Tiny complete GGUF models (F32, a 16-token BPE vocabulary) that `offload.load` runs, written with gguf-py's
GGUFWriter, and byte-level edits of their metadata values: the raw material of the load fuzz tests."""

import struct
from pathlib import Path

import gguf
import numpy as np

H, V, E, K, I, LAYERS = 16, 16, 4, 2, 8, 2  # hidden, vocab, experts, experts per token, expert inter, layers
TOKENS = list("abcdefghijklmno") + ["ab"]

# arch -> metadata (without the `<arch>.` prefix)
METADATA = {
    "qwen3moe": {"block_count": LAYERS, "embedding_length": H, "attention.head_count": 2,
                 "attention.head_count_kv": 1, "attention.key_length": 8, "attention.value_length": 8,
                 "expert_count": E, "expert_used_count": K, "expert_feed_forward_length": I,
                 "context_length": 64, "vocab_size": V, "rope.freq_base": 10000.0,
                 "attention.layer_norm_rms_epsilon": 1e-6},
    "deepseek2": {"block_count": LAYERS, "embedding_length": H, "attention.head_count": 2,
                  "attention.q_lora_rank": 8, "attention.kv_lora_rank": 8, "attention.key_length_mla": 8,
                  "attention.value_length_mla": 4, "rope.dimension_count": 4, "expert_count": E,
                  "expert_used_count": K, "expert_feed_forward_length": I, "feed_forward_length": 16,
                  "expert_shared_count": 1, "leading_dense_block_count": 1, "expert_gating_func": 2,
                  "expert_group_count": 2, "expert_group_used_count": 1, "expert_weights_scale": 2.0,
                  "context_length": 64, "vocab_size": V, "rope.scaling.type": "yarn",
                  "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 16},
}
METADATA["glm-dsa"] = dict(METADATA["deepseek2"], **{
    "attention.indexer.head_count": 2, "attention.indexer.key_length": 8, "attention.indexer.top_k": 4,
    "expert_group_count": 1, "expert_group_used_count": 1})


def _mla_layer(i: int, arch: str) -> dict:
    t = {"attn_q_a.weight": (8, H), "attn_q_a_norm.weight": (8,), "attn_q_b.weight": (2 * 8, 8),
         "attn_kv_a_mqa.weight": (8 + 4, H), "attn_kv_a_norm.weight": (8,), "attn_k_b.weight": (2, 8, 4),
         "attn_v_b.weight": (2, 4, 8), "attn_output.weight": (H, 2 * 4)}
    if arch == "glm-dsa" and i == 0:  # layer 0 runs the lightning indexer, layer 1 shares its selection
        t.update({"indexer.attn_q_b.weight": (2 * 8, 8), "indexer.attn_k.weight": (8, H),
                  "indexer.k_norm.weight": (8,), "indexer.k_norm.bias": (8,), "indexer.proj.weight": (2, H)})
    if i == 0:  # the leading dense layer
        return dict(t, **{"ffn_gate.weight": (16, H), "ffn_up.weight": (16, H), "ffn_down.weight": (H, 16)})
    return dict(t, **{"ffn_gate_inp.weight": (E, H), "exp_probs_b.bias": (E,), "ffn_gate_shexp.weight": (I, H),
                      "ffn_up_shexp.weight": (I, H), "ffn_down_shexp.weight": (H, I)})


def tensor_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> numpy shape (the ggml shape reversed)."""
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H)}
    for i in range(LAYERS):
        if arch == "qwen3moe":
            layer = {"attn_q.weight": (16, H), "attn_k.weight": (8, H), "attn_v.weight": (8, H),
                     "attn_output.weight": (H, 16), "attn_q_norm.weight": (8,), "attn_k_norm.weight": (8,),
                     "ffn_gate_inp.weight": (E, H)}
        else:
            layer = _mla_layer(i, arch)
        layer.update({"attn_norm.weight": (H,), "ffn_norm.weight": (H,)})
        if "ffn_gate_inp.weight" in layer:
            layer.update({"ffn_gate_exps.weight": (E, I, H), "ffn_up_exps.weight": (E, I, H),
                          "ffn_down_exps.weight": (E, H, I)})
        shapes.update({f"blk.{i}.{k}": v for k, v in layer.items()})
    return shapes


def write_tiny_model(path: Path, arch: str = "qwen3moe", seed: int = 0, tokens: list[str] = TOKENS) -> Path:
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in METADATA[arch].items():
        if isinstance(value, str):
            w.add_string(f"{arch}.{key}", value)
        elif isinstance(value, int):
            w.add_uint32(f"{arch}.{key}", value)
        else:
            w.add_float32(f"{arch}.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(1)
    for name, shape in tensor_shapes(arch).items():
        scale = 1.0 if name.endswith("norm.weight") else shape[-1] ** -0.5
        w.add_tensor(name, (scale * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def value_offset(blob: bytes, key: str) -> tuple[int, int]:
    """(offset of the value, its GGUF value type) of metadata key `key` in a GGUF file's bytes."""
    raw = key.encode()
    pos = blob.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
    return pos + 4, struct.unpack_from("<I", blob, pos)[0]


def set_u32(blob: bytes, key: str, value: int) -> bytes:
    """The file with metadata key `key` (a UINT32) set to `value`, the type and everything else unchanged."""
    pos, vtype = value_offset(blob, key)
    assert vtype == gguf.GGUFValueType.UINT32, f"{key} is not a UINT32"
    buf = bytearray(blob)
    struct.pack_into("<I", buf, pos, value)
    return bytes(buf)


def model_metadata_span(blob: bytes) -> tuple[int, int]:
    """[start, end) of the model's metadata: after the 24-byte header, before the tokenizer's keys (which
    write_tiny_model adds after the `<arch>.*` ones)."""
    key = b"tokenizer.ggml.model"
    return 24, blob.index(struct.pack("<Q", len(key)) + key)
