"""A GLM-5.2 slice as a GGUF, written directly as random valid ggml blocks (no model, no converter, no
quantiser): the real per-layer shapes (hidden 6144, 64 MLA heads of 192 + 64 / 256, q_lora 2048, kv_lora 512,
indexer 32 x 128, expert FFN 2048, vocab 154880) with fewer layers and experts, for benchmarks on a GPU machine
(`offload bench hybrid`, llama-bench). Types as llama.cpp's Q4_K_M gives them: Q4_K matrices, Q6_K for the head
and for ffn_down in llama.cpp's "more bits" layers, Q5_0 where rows are not a multiple of 256 (attn_k_b),
float32 norms, router and biases. The layers stand for GLM-5.2's MoE layers: a full indexer every 4th layer
(the others reuse it, `attention.indexer.types`), as GLM-5.2's own pattern.

    python -P scripts/make_slice_gguf.py OUT.gguf [--layers 8] [--experts 16] [--top-k 8] [--dense 0] [--small]

--small writes the same structure with small shapes (hidden 256, 4 heads, ...), for tests. Weights are
~N(0, 1/fan_in)-sized so activations stay O(1) through the layers; the vocabulary is byte-level BPE (the 256
byte tokens, one merge, fillers), enough for llama.cpp and offload to load it. About 10 s for 8 layers.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

GLM52 = dict(hidden=6144, heads=64, q_lora=2048, kv_lora=512, nope=192, rope=64, v_head=256, index_heads=32,
             index_dim=128, index_topk=2048, expert_ffn=2048, dense_ffn=12288, vocab=154880, ctx=202752)
SMALL = dict(hidden=256, heads=4, q_lora=256, kv_lora=512, nope=192, rope=64, v_head=256, index_heads=4,
             index_dim=128, index_topk=64, expert_ffn=256, dense_ffn=512, vocab=1024, ctx=4096)

# ggml type -> (block elements, block bytes); the f16 scale fields set so the weights are ~N(0, s) sized
F32, Q5_0, Q4_K, Q6_K = 0, 6, 12, 14
BLOCK = {Q5_0: (32, 22), Q4_K: (256, 144), Q6_K: (256, 210)}


def random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: int, std: float) -> np.ndarray:
    """(rows, row bytes) uint8: random quants, scales set so the values have about this std and mean ~0."""
    n, size = BLOCK[qtype]
    if cols % n:
        raise ValueError(f"{cols} columns are not a multiple of the {n}-element blocks of type {qtype}")
    b = np.frombuffer(rng.bytes(rows * cols // n * size), dtype=np.uint8).reshape(-1, size).copy()
    f16 = lambda v: np.frombuffer(np.float16(v).tobytes(), dtype=np.uint8)  # noqa: E731
    if qtype == Q4_K:  # d * sc * q - dmin * m, sc / m / q uniform: dmin = 7.5 d centres it, std ~ 263 d
        d = std / 263
        b[:, 0:2], b[:, 2:4] = f16(d), f16(7.5 * d)
    elif qtype == Q6_K:  # d * scale * (q - 32), scale int8 uniform, q 6-bit uniform: std ~ 1360 d
        b[:, 208:210] = f16(std / 1360)
    else:  # Q5_0: d * (q - 16), q 5-bit uniform: std ~ 9.2 d
        b[:, 0:2] = f16(std / 9.2)
    return b.reshape(rows, -1)


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose ffn_down gets Q6_K in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensors(s: dict, layers: int, experts: int, dense: int):
    """(name, numpy-order shape of the values, ggml type, std) for every tensor, in file order."""
    h, heads, e_ffn = s["hidden"], s["heads"], s["expert_ffn"]
    yield "token_embd.weight", (s["vocab"], h), Q4_K, 1.0
    yield "output_norm.weight", (h,), F32, None
    yield "output.weight", (s["vocab"], h), Q6_K, h ** -0.5
    for i in range(layers):
        p = f"blk.{i}."
        down = Q6_K if more_bits(i, layers) else Q4_K
        yield p + "attn_norm.weight", (h,), F32, None
        yield p + "attn_q_a.weight", (s["q_lora"], h), Q4_K, h ** -0.5
        yield p + "attn_q_a_norm.weight", (s["q_lora"],), F32, None
        yield p + "attn_q_b.weight", (heads * (s["nope"] + s["rope"]), s["q_lora"]), Q4_K, s["q_lora"] ** -0.5
        yield p + "attn_kv_a_mqa.weight", (s["kv_lora"] + s["rope"], h), Q4_K, h ** -0.5
        yield p + "attn_kv_a_norm.weight", (s["kv_lora"],), F32, None
        yield p + "attn_k_b.weight", (heads, s["kv_lora"], s["nope"]), Q5_0, s["nope"] ** -0.5
        yield p + "attn_v_b.weight", (heads, s["v_head"], s["kv_lora"]), Q4_K, s["kv_lora"] ** -0.5
        yield p + "attn_output.weight", (h, heads * s["v_head"]), Q4_K, (heads * s["v_head"]) ** -0.5
        yield p + "ffn_norm.weight", (h,), F32, None
        if i % 4 == 0:  # a full indexer; the next three layers reuse its pick
            yield p + "indexer.attn_q_b.weight", (s["index_heads"] * s["index_dim"], s["q_lora"]), Q4_K, \
                s["q_lora"] ** -0.5
            yield p + "indexer.attn_k.weight", (s["index_dim"], h), Q4_K, h ** -0.5
            yield p + "indexer.k_norm.weight", (s["index_dim"],), F32, None
            yield p + "indexer.k_norm.bias", (s["index_dim"],), F32, 0.0
            yield p + "indexer.proj.weight", (s["index_heads"], h), Q4_K, h ** -0.5
        if i < dense:
            yield p + "ffn_gate.weight", (s["dense_ffn"], h), Q4_K, h ** -0.5
            yield p + "ffn_up.weight", (s["dense_ffn"], h), Q4_K, h ** -0.5
            yield p + "ffn_down.weight", (h, s["dense_ffn"]), down, s["dense_ffn"] ** -0.5
            continue
        yield p + "ffn_gate_inp.weight", (experts, h), F32, h ** -0.5
        yield p + "exp_probs_b.bias", (experts,), F32, 0.1
        yield p + "ffn_gate_exps.weight", (experts, e_ffn, h), Q4_K, h ** -0.5
        yield p + "ffn_up_exps.weight", (experts, e_ffn, h), Q4_K, h ** -0.5
        yield p + "ffn_down_exps.weight", (experts, h, e_ffn), down, e_ffn ** -0.5
        yield p + "ffn_gate_shexp.weight", (e_ffn, h), Q4_K, h ** -0.5
        yield p + "ffn_up_shexp.weight", (e_ffn, h), Q4_K, h ** -0.5
        yield p + "ffn_down_shexp.weight", (h, e_ffn), down, e_ffn ** -0.5


def data(rng: np.random.Generator, name: str, shape: tuple, qtype: int, std) -> np.ndarray:
    if qtype != F32:
        rows = int(np.prod(shape[:-1]))
        return random_blocks(rng, rows, shape[-1], qtype, std).reshape(*shape[:-1], -1)
    if std is None:  # a norm's weight: ~1
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    return (std * rng.standard_normal(shape)).astype(np.float32)


def vocabulary(n: int) -> tuple[list[str], list[int], list[str]]:
    """GPT-2 byte-level tokens (all 256 bytes), one merge, fillers up to n, an end-of-text control token."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, k = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    tokens = [chr(c) for c in cs] + ["ĠĠ"]
    tokens += [f"<filler_{i}>" for i in range(len(tokens), n - 1)] + ["<|endoftext|>"]
    types = [1] * (n - 1) + [3]  # NORMAL, the last CONTROL
    return tokens, types, ["Ġ Ġ"]


def write_slice(path: str | Path, layers: int = 8, experts: int = 16, top_k: int = 8, dense: int = 0,
                small: bool = False, seed: int = 0) -> Path:
    import gguf

    s = SMALL if small else GLM52
    if not 0 <= dense <= layers or layers < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"need 0 <= dense <= layers, layers >= 1 and 1 <= top_k <= experts "
                         f"(got layers {layers}, dense {dense}, experts {experts}, top_k {top_k})")
    path = Path(path)
    arch = "glm-dsa"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string("general.type", "model")
    w.add_string("general.name", f"GLM-5.2 slice {layers}x{experts}" + (" small" if small else ""))
    u32 = {"block_count": layers, "context_length": s["ctx"], "embedding_length": s["hidden"],
           "feed_forward_length": s["dense_ffn"], "attention.head_count": s["heads"],
           "attention.head_count_kv": 1, "expert_count": experts, "expert_used_count": top_k,
           "expert_group_count": 1, "expert_group_used_count": 1, "expert_gating_func": 2,
           "attention.key_length": s["kv_lora"] + s["rope"], "attention.value_length": s["kv_lora"],
           "leading_dense_block_count": dense, "vocab_size": s["vocab"], "attention.q_lora_rank": s["q_lora"],
           "attention.kv_lora_rank": s["kv_lora"], "attention.key_length_mla": s["nope"] + s["rope"],
           "attention.value_length_mla": s["v_head"], "expert_feed_forward_length": s["expert_ffn"],
           "expert_shared_count": 1, "rope.dimension_count": s["rope"], "nextn_predict_layers": 0,
           "attention.indexer.head_count": s["index_heads"], "attention.indexer.key_length": s["index_dim"],
           "attention.indexer.top_k": s["index_topk"]}
    for k, v in u32.items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.rope.freq_base", 1000000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{arch}.expert_weights_scale", 2.5)
    w.add_bool(f"{arch}.expert_weights_norm", True)
    w.add_array(f"{arch}.attention.indexer.types", [i % 4 == 0 for i in range(layers)])
    tokens, types, merges = vocabulary(s["vocab"])
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "qwen2")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    for key in ("bos", "eos", "padding"):
        w.add_uint32(f"tokenizer.ggml.{key}_token_id", s["vocab"] - 1)
    w.add_uint32("general.quantization_version", 2)
    w.add_uint32("general.file_type", 15)  # MOSTLY_Q4_K_M
    plan = list(tensors(s, layers, experts, dense))
    for name, shape, qt, _ in plan:
        if qt == F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        else:
            n, size = BLOCK[qt]
            byte_shape = (*shape[:-1], shape[-1] // n * size)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                              raw_dtype=gguf.GGMLQuantizationType(qt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, qt, std in plan:
        w.write_tensor_data(data(rng, name, shape, qt, std))
    w.close()
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--dense", type=int, default=0, help="leading dense layers (GLM-5.2 has 3)")
    ap.add_argument("--small", action="store_true", help="small shapes, for tests")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        out = write_slice(a.out, a.layers, a.experts, a.top_k, a.dense, a.small, a.seed)
    except ValueError as exc:
        sys.exit(f"make_slice_gguf: {exc}")
    print(f"{out} {out.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
