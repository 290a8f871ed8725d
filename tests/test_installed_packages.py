"""Our top-level kernels/ and gguf/ folders must never stand in for the installed packages of the same names
(Hugging Face's `kernels`, which transformers imports, and llama.cpp's gguf-py). This runs in the suite's own
process, so it fails if the way the suite is started puts the repository root on sys.path."""

import importlib.metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _installed_file(distribution: str, module) -> Path:
    """The module's file, checked to be one the named distribution installed."""
    dist = importlib.metadata.distribution(distribution)
    files = {Path(dist.locate_file(f)).resolve() for f in dist.files or []}
    path = Path(module.__file__).resolve()
    assert path in files, f"`import {module.__name__}` gave {path}, not a file of the {distribution} distribution"
    ours = REPO / module.__name__
    assert ours not in path.parents, f"`import {module.__name__}` gave the repository's own {path}"
    return path


def test_repository_root_is_not_on_sys_path():
    import sys

    entries = [Path(p or ".").resolve() for p in sys.path]
    assert REPO not in entries, f"{REPO} is on sys.path: {sys.path}"


def test_import_kernels_is_hugging_face_kernels():
    import kernels

    _installed_file("kernels", kernels)


def test_import_gguf_is_gguf_py():
    import gguf

    _installed_file("gguf", gguf)
    assert hasattr(gguf, "GGUFReader") and hasattr(gguf, "GGMLQuantizationType")


def test_our_packages_are_the_mapped_ones():
    import offload.gguf
    import offload.kernels

    assert Path(offload.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"
    assert Path(offload.gguf.__file__).resolve() == REPO / "gguf" / "__init__.py"


def test_a_transformers_model_builds_and_runs():
    torch = pytest.importorskip("torch")
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            num_experts=4, num_experts_per_tok=2)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()
