"""A GGUF whose per-token bytes are dominated by routed experts, for whole-model CPU benchmarks
(`offload bench decode`): GLM-4.5-Air expert shapes (hidden 4096, expert FFN 1408, top-8 of
n experts, one shared expert) with fewer layers and experts, random weights, converted and quantised by
llama.cpp's own tools (the converter and `llama_model_quantize` of the installed llama-cpp-python).

    python scripts/make_bench_gguf.py [--layers 8] [--experts 32] [Q4_K_M ...]

Prints the file paths. Files go to ~/.cache/offload-tests/gguf-fixtures/bench_glm4_moe_air-<L>x<E>/
(a few GB: 8 layers x 32 experts is 4.4B parameters, 8.9 GB as F16, 2.7 GB as Q4_K_M). The model is
built in bfloat16 and converted to F16 (F32 would not fit in RAM next to it); routing is random, so
decode touches 8 experts per layer like the real model.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import make_gguf_fixtures as fx  # noqa: E402  (sdist, converter and quantiser helpers)

# GLM-4.5-Air: hidden 4096, 128 experts of FFN 1408, top-8, 1 shared, 96 heads of 128 (8 KV), 46 layers.
# Attention is cut to 32 heads so the experts dominate the bytes a token reads.
AIR = dict(hidden_size=4096, moe_intermediate_size=1408, intermediate_size=1408, num_experts_per_tok=8,
           n_shared_experts=1, num_attention_heads=32, num_key_value_heads=4, head_dim=128, n_group=1,
           topk_group=1, first_k_dense_replace=1, partial_rotary_factor=0.5, use_qk_norm=False,
           attention_bias=True, tie_word_embeddings=True, num_nextn_predict_layers=0,
           max_position_embeddings=4096)


def _random_bf16_model(vocab: int, layers: int, experts: int):
    """A random Glm4MoeForCausalLM born in bfloat16 (offload.testing.tiny_hf_model's float32 copy of 4B
    weights would not fit in RAM): matrices ~N(0, 1/fan_in), norms ~1, random router biases."""
    import torch
    import transformers

    from offload.testing import TINY_CONFIGS

    config = transformers.Glm4MoeConfig(**dict(TINY_CONFIGS["glm4_moe"], vocab_size=vocab,
                                                num_hidden_layers=layers + 1, n_routed_experts=experts, **AIR))
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.Glm4MoeForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def make(layers: int, experts: int, formats: list[str]) -> dict[str, Path]:
    import torch
    from transformers import AutoTokenizer

    from offload.gguf._ggufpy import gguf_py

    name = f"bench_glm4_moe_air-{layers}x{experts}"
    root = fx.CACHE / "gguf-fixtures" / name
    hf = root / "hf"
    sdist = fx.sdist_dir()
    if not (hf / ".complete").is_file():
        hf.mkdir(parents=True, exist_ok=True)
        gguf_py()  # transformers' GGUF tokenizer loader imports `gguf`
        vocab_dir = sdist / "vendor" / "llama.cpp" / "models"
        tok = AutoTokenizer.from_pretrained(str(vocab_dir), gguf_file="ggml-vocab-qwen2.gguf")
        tok.add_special_tokens({"additional_special_tokens": fx.GLM_SPECIAL})  # the GLM converter needs them
        tok.save_pretrained(hf)
        model = _random_bf16_model(len(tok), layers, experts)
        model.save_pretrained(hf)
        del model
        (hf / ".complete").write_text("ok")
    out = {"hf": hf}
    f16 = root / "model-F16.gguf"
    if not f16.is_file():
        import os
        import subprocess

        lc = sdist / "vendor" / "llama.cpp"
        env = dict(os.environ, PYTHONPATH=str(lc / "gguf-py"), NO_LOCAL_GGUF="1")
        tmp = f16.with_suffix(".partial")
        r = subprocess.run([sys.executable, str(lc / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16",
                            "--outfile", str(tmp)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed: {r.stderr.strip()[-2000:]}")
        tmp.rename(f16)
    out["F16"] = f16
    for fmt in formats:
        if fmt != "F16":
            out[fmt] = fx.quantize(f16, fmt)
    (root / "shape.json").write_text(json.dumps(dict(AIR, layers=layers, experts=experts)))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("formats", nargs="*", default=["Q4_K_M"], help="llama.cpp quant types (default Q4_K_M)")
    p.add_argument("--layers", type=int, default=8, help="MoE layers (one dense layer comes first)")
    p.add_argument("--experts", type=int, default=32, help="routed experts per layer (top-8)")
    a = p.parse_args(argv)
    for fmt, path in make(a.layers, a.experts, a.formats).items():
        print(f"{fmt:8s} {path}")


if __name__ == "__main__":
    main()
