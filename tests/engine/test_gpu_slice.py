"""The GLM-5.2 slice `offload bench hybrid` runs (scripts/make_slice_gguf.py --small: the same tensors and types,
small shapes; gguf-py only, no llama.cpp, so it also runs on the GPU machine, where the llama.cpp-made fixtures
are skipped) loaded as a GPU loads it: attention, shared experts, head and half the routed experts as ggml blocks
on the Triton kernels, the other half in a CPU group handed off each layer. Decode through the recorded step
(on a GPU: CUDA graph segments cut at the CPU expert calls, sparse DSA attention inside) equals the eager decode,
also after a longer prompt regrew the scratch buffers the recording reads. On the CPU the same test runs the
native kernels and the unrecorded step function (the dry run of this test itself)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import offload
from offload.graphs import DecodeStep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def slice_path(tmp_path_factory):
    pytest.importorskip("gguf")
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_slice_gguf.py"
    spec = importlib.util.spec_from_file_location("make_slice_gguf", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_slice(tmp_path_factory.mktemp("slice") / "slice.gguf", layers=2, experts=16, small=True)


def test_recorded_decode_equals_eager_after_a_longer_prompt(slice_path):
    llm = offload.load(slice_path, device=DEVICE, ctx=256, dtype="float32", progress=False,
                       placement=lambda layer, n: [("gpu", "cpu")[e % 2] for e in range(n)])
    model = llm.model
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.args.vocab_size, (n,), generator=g) for n in (80, 200)]  # past index_topk
    nexts = torch.randint(3, model.args.vocab_size, (3,), generator=g).tolist()
    cache = model.new_cache(256)  # one capacity for both prompts: the second replays the first's recording
    step = DecodeStep(model, cache)
    for prompt in prompts:
        cache.length = 0
        model.forward(prompt, cache, last_only=True)
        eager = model.new_cache(256)
        model.forward(prompt, eager, last_only=True)
        for t in nexts:
            want = model.forward(torch.tensor([t]), eager)  # (1, V)
            got = step(t)
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, atol=1e-3 * scale, rtol=0)
    if DEVICE == "cuda":
        assert step.blocker is None, step.blocker
        assert step.segments == 1 + 2 * len(model.moe_layers())  # start and wait of each layer's CPU group
