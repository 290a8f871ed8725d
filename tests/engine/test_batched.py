"""Continuous batching in the engine: several sequences, each with its own cache and position, in one forward
(Decoder.forward_segments) give each sequence the logits of its solo run (fp32, to float rounding: BLAS may sum
a row differently when the matmul has more rows)."""

import pytest
import torch

import offload
from tests.engine.conftest import ARCHS

LENGTHS = [5, 12, 20, 9]  # prompt lengths (DSA's tiny index_topk is 8: the sparse path runs too)
DECODE = 4


def tokens(vocab: int, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def solo(model, prompt: list[int], follow: list[int]) -> list[torch.Tensor]:
    """Logits of the prompt (T, V), then of each following token (1, V), one sequence alone."""
    cache = model.new_cache(64)
    out = [model.forward(torch.tensor(prompt), cache)]
    out += [model.forward(torch.tensor([t]), cache) for t in follow]
    return out


@pytest.mark.parametrize("arch", ARCHS + ["llama"])
def test_batched_segments_match_solo_runs(arch, tiny_checkpoint):
    check_batched(offload.load(tiny_checkpoint(arch), device="cpu", progress=False, ctx=64).model, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_batched_segments_on_a_gpu_with_cpu_experts(arch, tiny_checkpoint):
    """Layers on the GPU, half the experts on the CPU (overlapped on the worker thread): B rows cross too.
    Not yet run on a GPU (none lent to the session that wrote it)."""
    half = {i: ["gpu", "cpu"] * 4 for i in range(8)}
    model = offload.load(tiny_checkpoint(arch), device="cuda", dtype="float32", progress=False, ctx=64,
                         placement=half).model
    check_batched(model, 1e-4)


def check_batched(model, atol: float) -> None:
    vocab = model.args.vocab_size
    prompts = [tokens(vocab, n, seed=i) for i, n in enumerate(LENGTHS)]
    follows = [tokens(vocab, DECODE, seed=10 + i) for i in range(len(LENGTHS))]
    refs = [solo(model, p, f) for p, f in zip(prompts, follows)]
    for b in range(1, len(LENGTHS) + 1):
        # sequence j joins at step j (its whole prompt as one segment) while the earlier ones decode
        caches = [model.new_cache(64) for _ in range(b)]
        done = [0] * b  # forwards each sequence has had
        for step in range(b + DECODE):
            segs, who = [], []
            for j in range(b):
                if j > step or done[j] > DECODE:
                    continue
                ids = prompts[j] if done[j] == 0 else [follows[j][done[j] - 1]]
                segs.append((torch.tensor(ids), caches[j]))
                who.append(j)
            if not segs:
                break
            outs = model.forward_segments(segs, last_only=False)
            for j, out in zip(who, outs):
                ref = refs[j][done[j]]
                assert out.shape == ref.shape
                torch.testing.assert_close(out, ref, rtol=0, atol=atol, msg=f"B={b} seq {j} forward {done[j]}")
                done[j] += 1
        assert done == [DECODE + 1] * b


def test_last_only_picks_each_segments_last_row(tiny_checkpoint):
    model = offload.load(tiny_checkpoint("glm4_moe"), device="cpu", progress=False, ctx=64).model
    prompts = [tokens(model.args.vocab_size, n, seed=i) for i, n in enumerate(LENGTHS)]
    full = model.forward_segments([(torch.tensor(p), model.new_cache(64)) for p in prompts], last_only=False)
    last = model.forward_segments([(torch.tensor(p), model.new_cache(64)) for p in prompts], last_only=True)
    for f, lst in zip(full, last):
        assert lst.shape == (1, f.shape[1])
        torch.testing.assert_close(lst, f[-1:], rtol=0, atol=1e-5)
