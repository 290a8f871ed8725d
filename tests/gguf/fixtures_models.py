"""Session fixtures for the GGUF model cross-checks: tiny random models converted and quantised by llama.cpp's
own tools (scripts/make_gguf_fixtures.py, cached under ~/.cache/offload-tests), llama.cpp's logits for them
through llama-cpp-python, and the agreement measures the issue asks for."""

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script():
    script = ROOT / "scripts" / "make_gguf_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_gguf_fixtures", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# the prompt the fixtures were conditioned on (make_gguf_fixtures.condition): plain text, 48 tokens
_recipe = _script()
PROMPT, N_TOKENS = _recipe.PROMPT, _recipe.N_TOKENS


class Fixtures:
    """Lazily built fixture files and cached results (ours / llama.cpp's logits) per (name, format)."""

    def __init__(self):
        self.script = _script()
        self.paths: dict[tuple[str, str], Path] = {}
        self.llms: dict[tuple[str, str], object] = {}
        self.results: dict[tuple[str, str], tuple] = {}

    def path(self, name: str, fmt: str) -> Path:
        if (name, fmt) not in self.paths:
            try:
                built = self.script.make(name, [fmt])
            except RuntimeError as exc:  # no PyPI and nothing cached: cannot build llama.cpp fixtures
                if "pip download" in str(exc):
                    pytest.skip(str(exc))
                raise
            self.paths[(name, "hf")] = built["hf"]
            self.paths[(name, fmt)] = built[fmt]
        return self.paths[(name, fmt)]

    def ours(self, name: str, fmt: str, **kwargs):
        import offload

        key = (name, fmt) if not kwargs else None
        if key in self.llms:
            return self.llms[key]
        llm = offload.load(self.path(name, fmt), device="cpu", progress=False, **kwargs)
        if key is not None:
            self.llms[key] = llm
            while len(self.llms) > 2:  # keep memory bounded: each model holds its float embedding
                self.llms.pop(next(iter(self.llms)))
        return llm

    def prompt_ids(self, name: str, fmt: str) -> list[int]:
        ids = self.ours(name, fmt).tokenizer.encode(PROMPT)[:N_TOKENS]
        assert len(ids) == N_TOKENS
        return ids

    def llama_cpp(self, name: str, fmt: str, ids: list[int]) -> np.ndarray:
        import llama_cpp

        ref = llama_cpp.Llama(model_path=str(self.path(name, fmt)), logits_all=True, n_ctx=128, n_batch=128,
                              n_ubatch=128, n_threads=min(2, os.cpu_count() or 1), verbose=False)
        ref.eval(ids)
        scores = np.array(ref.scores[: len(ids)], dtype=np.float32)  # (T, V)
        ref.close()
        return scores

    def compare(self, name: str, fmt: str) -> tuple[np.ndarray, np.ndarray]:
        """(ours, llama.cpp's) logits (T, V) for the prompt, teacher-forced in one pass. Quantised files are
        loaded with act_quant=True: matmul inputs rounded the way llama.cpp's CPU backend rounds them."""
        if (name, fmt) not in self.results:
            from offload.gguf.load import load_gguf

            ids = self.prompt_ids(name, fmt)
            llm = self.ours(name, fmt) if fmt == "F32" else \
                load_gguf(self.path(name, fmt), device="cpu", progress=False, act_quant=True)
            ours = llm.logits(ids).numpy()
            self.results[(name, fmt)] = (ours, self.llama_cpp(name, fmt, ids))
        return self.results[(name, fmt)]


def agreement(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Mean / min cosine similarity per position, top-1 agreement, max abs difference."""
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "top1": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
            "max_diff": float(np.abs(ours - ref).max()),
            "max_abs": float(np.abs(ref).max())}


@pytest.fixture(scope="session")
def gguf_models() -> Fixtures:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("transformers")
    return Fixtures()
