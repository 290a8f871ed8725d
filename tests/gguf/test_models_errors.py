"""Bad GGUF models give one-line offload errors naming the file and what was expected (no llama.cpp needed)."""

import gguf
import numpy as np
import pytest

import offload
from offload.errors import GGUFError, OffloadError


def _write(path, arch: str, kv: dict, tensors: dict) -> str:
    w = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in kv.items():
        if isinstance(value, bool):
            w.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, int):
            w.add_uint32(f"{arch}.{key}", value)
        else:
            w.add_float32(f"{arch}.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(["a", "b", "c", "ab"])
    w.add_token_merges(["a b"])
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_unsupported_architecture(tmp_path):
    path = _write(tmp_path / "m.gguf", "mamba", {"block_count": 1},
                  {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(GGUFError, match=r"m\.gguf: architecture 'mamba' is not supported"):
        offload.load(path, device="cpu", progress=False)


def test_missing_metadata_key_is_named(tmp_path):
    path = _write(tmp_path / "m.gguf", "qwen3moe", {"block_count": 1},
                  {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(GGUFError, match=r"m\.gguf: metadata key 'qwen3moe\.[a-z_.]+' missing"):
        offload.load(path, device="cpu", progress=False)


def test_deepseek2_softmax_gating_is_refused(tmp_path):
    kv = {"block_count": 1, "embedding_length": 8, "attention.head_count": 1, "expert_feed_forward_length": 8,
          "expert_used_count": 1, "expert_count": 2}
    path = _write(tmp_path / "m.gguf", "deepseek2", kv, {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(GGUFError, match="expert_gating_func"):
        offload.load(path, device="cpu", progress=False)


def test_missing_tensor_is_named(tmp_path):
    kv = {"block_count": 1, "embedding_length": 8, "attention.head_count": 2, "attention.head_count_kv": 1,
          "attention.key_length": 4, "expert_feed_forward_length": 8, "expert_used_count": 1, "expert_count": 2,
          "feed_forward_length": 8}
    path = _write(tmp_path / "m.gguf", "qwen3moe", kv, {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(OffloadError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight \(GGUF blk\.0\.attn_q"):
        offload.load(path, device="cpu", progress=False)
