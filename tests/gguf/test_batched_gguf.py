"""Continuous batching on quantised GGUF files (native kernels, 8-bit activations): four sequences of different
lengths, prefilled together and then decoding one token each a step, give each sequence its solo run's logits.
Measured: at most 3e-6 apart (logits of magnitude 5-15). Each row's activations are quantised on their own, so
the batch does not change a row's integers; a rounding-tie flip of an 8-bit activation would show here as a
larger difference (none seen)."""

import pytest
import torch

from tests.gguf.fixtures_models import gguf_models  # noqa: F401  (session fixture)


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_batched_decode_matches_solo_runs(gguf_models, name):
    model = gguf_models.ours(name, "Q4_K_M").model
    g = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in (5, 12, 20, 9)]
    follow = torch.randint(0, vocab, (4, 6), generator=g)  # (sequence, step)
    solo = []
    for i, p in enumerate(prompts):
        cache = model.new_cache(64)
        out = [model.forward(p, cache, last_only=True)] + [model.forward(follow[i, s:s + 1], cache) for s in range(6)]
        solo.append(torch.cat(out))  # (7, V)
    caches = [model.new_cache(64) for _ in prompts]
    steps = [model.forward_segments(list(zip(prompts, caches)))]
    steps += [model.forward_segments([(follow[i, s:s + 1], c) for i, c in enumerate(caches)]) for s in range(6)]
    for i in range(len(prompts)):
        batched = torch.cat([step[i] for step in steps])  # (7, V)
        torch.testing.assert_close(batched, solo[i], rtol=0, atol=1e-4)
