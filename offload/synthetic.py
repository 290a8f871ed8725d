"""A small random Qwen3-MoE GGUF written with gguf-py, for measurements that need a whole model and no download:
`offload probe` times its decode steps at two depths to find the fixed cost of a layer (attention, router,
norms, Python and kernel launches) apart from the bytes it reads."""

from pathlib import Path

import numpy as np

TOKENS = list("abcdefghijklmno") + ["ab"]  # a 16-token byte-level BPE vocabulary; callers pass token ids


def write_qwen3moe(path: str | Path, layers: int, hidden: int = 256, heads: int = 4, kv_heads: int = 2,
                   experts: int = 8, top_k: int = 2, inter: int = 256, seed: int = 0) -> Path:
    """Every matrix Q8_0 (the attention type of a Q4_K_M file), norms F32."""
    import gguf

    head_dim = hidden // heads
    vocab = len(TOKENS)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch="qwen3moe")
    meta = {"block_count": layers, "embedding_length": hidden, "attention.head_count": heads,
            "attention.head_count_kv": kv_heads, "attention.key_length": head_dim,
            "attention.value_length": head_dim, "expert_count": experts, "expert_used_count": top_k,
            "expert_feed_forward_length": inter, "context_length": 4096, "vocab_size": vocab}
    for key, value in meta.items():
        w.add_uint32(f"qwen3moe.{key}", value)
    w.add_float32("qwen3moe.rope.freq_base", 10000.0)
    w.add_float32("qwen3moe.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(1)

    def matrix(name: str, shape: tuple[int, ...]) -> None:
        data = (rng.standard_normal(shape) * shape[-1] ** -0.5).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, np.float32))

    w.add_tensor("token_embd.weight", (rng.standard_normal((vocab, hidden)) * 0.1).astype(np.float32))
    norm("output_norm.weight", hidden)
    matrix("output.weight", (vocab, hidden))
    for i in range(layers):
        p = f"blk.{i}."
        matrix(p + "attn_q.weight", (heads * head_dim, hidden))
        matrix(p + "attn_k.weight", (kv_heads * head_dim, hidden))
        matrix(p + "attn_v.weight", (kv_heads * head_dim, hidden))
        matrix(p + "attn_output.weight", (hidden, heads * head_dim))
        norm(p + "attn_q_norm.weight", head_dim)
        norm(p + "attn_k_norm.weight", head_dim)
        norm(p + "attn_norm.weight", hidden)
        norm(p + "ffn_norm.weight", hidden)
        w.add_tensor(p + "ffn_gate_inp.weight", (rng.standard_normal((experts, hidden)) * 0.1).astype(np.float32))
        matrix(p + "ffn_gate_exps.weight", (experts, inter, hidden))
        matrix(p + "ffn_up_exps.weight", (experts, inter, hidden))
        matrix(p + "ffn_down_exps.weight", (experts, hidden, inter))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
