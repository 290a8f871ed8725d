"""Tiny random GGUF models made by llama.cpp's own tools, for the GGUF cross-checks.

For each architecture: a random transformers model (offload.testing.tiny_hf_model, logits of order 1),
conditioned like a trained model on the test prompt (`condition`: peaked next-token logits, decisive
routing, so that the engines' rounding differences do not flip top-1 tokens or experts), saved with a real
~151k BPE tokenizer (llama.cpp's qwen2 vocab test GGUF + the GLM special tokens, so the converter
recognises its pre-tokenizer), converted by the llama-cpp-python sdist's convert_hf_to_gguf.py
to F32, then quantised by `llama_cpp.llama_model_quantize`. Outputs are cached outside the repo under
~/.cache/offload-tests/gguf-fixtures/<name>-<hash of the recipe>/.

    python scripts/make_gguf_fixtures.py [names, default all but bench_*] [formats: F32 F16 Q8_0 ... Q4_1]
"""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(os.environ.get("OFFLOAD_TEST_CACHE", Path.home() / ".cache" / "offload-tests"))

# hidden 256 so the K-quants (256-element blocks) apply to expert gate/up and down rows
SMALL = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, tie_word_embeddings=True)
FIXTURES = {
    "qwen3_moe": dict(SMALL, mlp_only_layers=[]),  # llama.cpp's qwen3moe has no dense layers
    "glm4_moe": dict(SMALL, num_nextn_predict_layers=0),
    "deepseek_v3": dict(SMALL),
    # llama.cpp's GLM-DSA graph needs the real head dims (DESIGN.md); index_topk 64 >= the 48-token prompt
    # keeps it dense, glm_moe_dsa_sparse (topk 8) exercises the selection
    "glm_moe_dsa": dict(hidden_size=512, intermediate_size=512, moe_intermediate_size=256,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=16, num_experts_per_tok=4,
                        q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=192, qk_rope_head_dim=64,
                        v_head_dim=256, index_n_heads=4, index_head_dim=128, index_topk=64,
                        indexer_types=["full", "shared", "full", "shared"], tie_word_embeddings=True,
                        num_nextn_predict_layers=0),
}
# 32 indexer heads as in GLM-5: with 4, a key whose heads are all ReLU-clamped scores exactly 0 and such
# ties at the index_topk boundary are broken differently by llama.cpp and torch (docs/gguf.md)
FIXTURES["glm_moe_dsa_sparse"] = dict(FIXTURES["glm_moe_dsa"], index_topk=8, index_n_heads=32)
# dense: llama (q/k rows permuted by the converter for ggml's pairwise rope), qwen2 (qkv bias),
# qwen3 (q/k norm)
FIXTURES["llama"] = dict(hidden_size=256, intermediate_size=256, tie_word_embeddings=True)
FIXTURES["qwen2"] = dict(hidden_size=256, intermediate_size=256, tie_word_embeddings=True)
FIXTURES["qwen3"] = dict(hidden_size=256, intermediate_size=256, tie_word_embeddings=True)
# Llama 3.1's rope scaling: the converter writes it as per-frequency divisors, tensor rope_freqs.weight
FIXTURES["llama3"] = dict(FIXTURES["llama"], rope_parameters={
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32})
# not built by default: a ~1.2 GB F32 GLM-DSA file for `python -m offload.bench_load`
FIXTURES["bench_glm_moe_dsa"] = dict(FIXTURES["glm_moe_dsa"], num_hidden_layers=8, n_routed_experts=64,
                                     indexer_types=["full", "shared"] * 4)
DEFAULT = ["qwen3_moe", "glm4_moe", "deepseek_v3", "glm_moe_dsa", "glm_moe_dsa_sparse", "llama", "qwen2",
           "qwen3"]
MODEL_TYPE = {"glm_moe_dsa_sparse": "glm_moe_dsa", "bench_glm_moe_dsa": "glm_moe_dsa", "llama3": "llama"}
RECIPE_VERSION = 2  # bump when this script changes what it writes
FORMATS = ("F32", "F16", "Q8_0", "Q4_K_M", "Q2_K", "IQ4_XS", "Q4_1")
# The prompt the fixtures are conditioned on and the tests compare on (tests/gguf/fixtures_models.py):
# >= 48 tokens after tokenisation, plain text so both tokenisers agree
PROMPT = ("The quick brown fox jumps over the lazy dog. Offload runs giant mixture of experts models on one "
          "workstation, keeping the experts quantised in memory while attention lives on the GPU. It agrees "
          "with llama.cpp and with transformers on every fixture we could build, in every format.")
N_TOKENS = 48
TRAIN_STEPS, TRAIN_LR = 20, 3e-3
# routing margins on the prompt, k-th vs (k+1)-th choice: softmax routers in logits, sigmoid routers in
# scores (slope <= 1/4, so >= 0.6 in logits). The engines' rounding moves router logits by ~5e-3, but the
# margins must also survive the quantised weights (Q2_K flipped an expert at 1 logit; docs/gguf.md)
MARGIN = {"softmax": 3.0, "sigmoid": 0.15}
GLM_SPECIAL = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]


def sdist_dir() -> Path:
    """The llama-cpp-python sdist (same version as the installed library), unpacked once into the cache."""
    out = CACHE / "llama-cpp-python-sdist"
    if (out / ".complete").is_file():
        return out / (out / ".complete").read_text().strip()
    from offload.tokenizer_fixture import llama_cpp_sdist

    tar_path = llama_cpp_sdist(CACHE)
    keep = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
            "vendor/llama.cpp/gguf-py/", "vendor/llama.cpp/models/ggml-vocab-qwen2.gguf")
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and any(k in m.name for k in keep)]
        tar.extractall(out, members=members, filter="data")
    top = members[0].name.split("/")[0]
    (out / ".complete").write_text(top)
    return out / top


def _hash(name: str) -> str:
    """Key of everything that makes the files: the recipe and the code that applies it, the random init,
    the llama.cpp and transformers versions."""
    import inspect
    from importlib.metadata import version

    from offload import testing

    recipe = [RECIPE_VERSION, GLM_SPECIAL, testing.TINY_CONFIGS[MODEL_TYPE.get(name, name)],
              FIXTURES[name], PROMPT, N_TOKENS, TRAIN_STEPS, TRAIN_LR, MARGIN,
              version("llama-cpp-python"), version("transformers")]
    h = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for fn in (testing.tiny_hf_model, make_hf, condition, _train, _gates, _margins):  # weight-making code
        h.update(inspect.getsource(fn).encode())
    return h.hexdigest()[:12]


def fixture_dir(name: str) -> Path:
    return CACHE / "gguf-fixtures" / f"{name}-{_hash(name)}"


def make_hf(name: str, sdist: Path) -> Path:
    out = fixture_dir(name) / "hf"
    if (out / ".complete").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from offload.gguf._ggufpy import gguf_py
    from offload.testing import tiny_hf_model

    gguf_py()  # transformers' GGUF tokenizer loader imports `gguf`
    vocab_dir = sdist / "vendor" / "llama.cpp" / "models"
    tok = AutoTokenizer.from_pretrained(str(vocab_dir), gguf_file="ggml-vocab-qwen2.gguf")
    tok.add_special_tokens({"additional_special_tokens": GLM_SPECIAL})
    tok.save_pretrained(out)
    model_type = MODEL_TYPE.get(name, name)
    model = tiny_hf_model(model_type, len(tok), seed=0, **FIXTURES[name])
    if not name.startswith("bench_"):  # a benchmark needs no margins (and 64 experts top-4 misses them)
        condition(model, tok.encode(PROMPT)[:N_TOKENS])
    model.save_pretrained(out)
    if model_type in ("deepseek_v3", "glm_moe_dsa"):
        # real DeepSeek-V3 configs say so; without it llama.cpp's deepseek2 falls back to softmax gating
        config = json.loads((out / "config.json").read_text())
        config.update(scoring_func="sigmoid", topk_method="noaux_tc")
        (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / ".complete").write_text("ok")
    return out


def condition(model, ids: list[int]) -> None:
    """Give the random model the two properties of a trained one that a like-for-like comparison needs
    (docs/gguf.md, "Fixture conditioning"): peaked next-token distributions (random logits over 151k tokens
    have top-1 gaps of ~0.01 at some position, below the engines' rounding differences) and decisive
    routing (random routers have k-th/(k+1)-th ties that rounding flips, swapping whole experts).
    1. a few Adam steps of next-token training on the prompt, embedding and routers frozen;
    2. each router in turn (layer order, inputs recomputed) nudged until every k-th/(k+1)-th choice on the
       prompt, groups included, is at least MARGIN apart."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on any machine: reductions depend on the thread count
    try:
        _train(model, torch.tensor([ids]))
    finally:
        torch.set_num_threads(threads)


def _train(model, x) -> None:
    import torch

    torch.manual_seed(0)
    # frozen: the embedding (no common logit offset) and the routers (trained, their logits grow and sigmoid
    # gates saturate, where a margin cannot be widened); step 2 sets the routers
    frozen = [model.get_input_embeddings().weight] + [m.weight for n, m in _gates(model)]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=TRAIN_LR)
    model.train()
    for _ in range(TRAIN_STEPS):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for _, gate in _gates(model):
        seen = []
        hook = gate.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
        with torch.no_grad():
            model(x)
        hook.remove()
        h = seen[0].reshape(-1, seen[0].shape[-1]).float()
        w = gate.weight.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=1e-2)
        for _ in range(500):
            short = [torch.relu(m0 - m) for m, m0 in _margins(gate, h, w)]
            if not any(bool((v > 0).any()) for v in short):
                break
            opt.zero_grad()
            sum(v.sum() for v in short).backward()
            opt.step()
        else:
            raise RuntimeError(f"routing margins not reached for {type(gate).__name__} after 500 steps")
        with torch.no_grad():
            gate.weight.copy_(w)


def _gates(model) -> list:
    return [(n, m) for n, m in model.named_modules() if n.endswith("mlp.gate")]


def _margins(gate, h, w):
    """[(margins (T,), target)]: gaps at the group and expert top-k boundaries of `gate`'s selection."""
    import torch

    logits = h @ w.T  # (T, E)
    k, out = gate.top_k, []
    if not hasattr(gate, "e_score_correction_bias"):  # softmax: top-k of the logits
        top = logits.sort(-1, descending=True).values
        return [(top[:, k - 1] - top[:, k], MARGIN["softmax"])]
    s = logits.sigmoid() + gate.e_score_correction_bias  # noaux_tc selection scores
    t, e = s.shape
    groups, keep = gate.num_group, gate.topk_group
    if groups > 1:
        g = s.view(t, groups, e // groups).topk(2, -1).values.sum(-1)  # (T, G)
        top = g.sort(-1, descending=True).values
        out.append((top[:, keep - 1] - top[:, keep], MARGIN["sigmoid"]))
        mask = torch.zeros_like(g, dtype=torch.bool).scatter(1, g.topk(keep, -1).indices, True)
        s = s.masked_fill(~mask.repeat_interleave(e // groups, 1), float("-inf"))
    top = s.sort(-1, descending=True).values
    margin = top[:, k - 1] - top[:, k]  # +inf where the kept groups hold only k experts
    out.append((torch.where(torch.isfinite(margin), margin, torch.ones_like(margin)), MARGIN["sigmoid"]))
    return out


def convert(name: str, sdist: Path, hf: Path, outtype: str) -> Path:
    dest = fixture_dir(name) / f"model-{outtype.upper()}.gguf"
    if dest.is_file():
        return dest
    lc = sdist / "vendor" / "llama.cpp"
    env = dict(os.environ, PYTHONPATH=str(lc / "gguf-py"), NO_LOCAL_GGUF="1")
    tmp = dest.with_suffix(".partial")
    cmd = [sys.executable, str(lc / "convert_hf_to_gguf.py"), str(hf), "--outtype", outtype.lower(),
           "--outfile", str(tmp)]
    r = subprocess.run(cmd, cwd=str(fixture_dir(name)), env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed for {name}: {r.stderr.strip()[-2000:]}")
    tmp.rename(dest)
    return dest


def quantize(src: Path, fmt: str) -> Path:
    dest = src.with_name(f"model-{fmt}.gguf")
    if dest.is_file():
        return dest
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{fmt}")
    params.nthread = 2
    tmp = dest.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {fmt} failed for {src} (rc {rc})")
    tmp.rename(dest)
    return dest


def make(name: str, formats=("F32", "Q8_0", "Q4_K_M")) -> dict[str, Path]:
    """Build (or reuse from the cache) fixture `name` in `formats`: {"hf": dir, fmt: gguf path}."""
    sdist = sdist_dir()
    hf = make_hf(name, sdist)
    out: dict[str, Path] = {"hf": hf}
    f32 = None
    for fmt in formats:
        if fmt in ("F32", "F16"):
            out[fmt] = convert(name, sdist, hf, fmt)
        else:
            f32 = f32 or convert(name, sdist, hf, "F32")
            out[fmt] = quantize(f32, fmt)
    return out


def main(argv: list[str]) -> None:
    names = [a for a in argv if not a.startswith("--") and a not in FORMATS] or DEFAULT
    formats = [a for a in argv if a in FORMATS] or list(FORMATS)
    for name in names:
        for fmt, path in make(name, formats).items():
            print(f"{name:20s} {fmt:8s} {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
