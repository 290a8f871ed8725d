"""A decode step of many sequences that the recording cannot hold though a smaller one it can: with top-k <= 4,
16 sequences still pass the groups' static pair limit, but from 16 rows a GPU layer's long-prompt stream
(offload.streaming) takes the step and reads the pairs on the host, as do the GPU experts' Triton kernels (they
sort the pairs by expert): inside a CUDA graph capture that read fails. DecodeStep runs such a step as the
step function instead (DecodeStep.blocker says why)."""

import torch

from offload.graphs import DecodeStep
from offload.streaming import MIN_TOKENS
from tests.engine.test_graph_segments import stand_in_gpu
from tests.engine.test_graph_step import NEXT, PROMPT


class HostReadingStream:
    """A stand-in for ExpertStream: takes chunks from MIN_TOKENS rows and reads their expert counts on the host
    (ExpertStream.submit's bincount) before its group computes them."""

    def __init__(self, group):
        self.group, self.calls = group, 0

    def takes(self, ids: torch.Tensor) -> bool:
        return ids.shape[0] >= MIN_TOKENS

    def submit(self, x, ids, weights):
        self.calls += 1
        torch.bincount(ids[ids >= 0]).cpu()
        return self.group.submit(x, ids, weights)


def test_sixteen_sequences_with_a_stream_run_unrecorded(tiny_checkpoint):
    model = stand_in_gpu(tiny_checkpoint("qwen3_moe"))  # top-2: 16 sequences are 32 pairs
    streams = []
    for moe in model.moe_layers():
        for g in moe.groups:
            if g.runs_in_background:
                g.stream = HostReadingStream(g)
                streams.append(g.stream)
    caches, want = [], []
    for i in range(MIN_TOKENS):
        prompt = PROMPT[: 1 + i % len(PROMPT)]
        alone = model.new_cache(64)
        model.forward(torch.tensor(prompt), alone)
        want.append(model.forward(torch.tensor([NEXT[0]]), alone))
        caches.append(model.new_cache(64))
        model.forward(torch.tensor(prompt), caches[-1])
    step = DecodeStep(model, *caches)
    got = step(*[NEXT[0]] * MIN_TOKENS)  # (16, V)
    assert step.blocker is not None and "streams its CPU experts" in step.blocker, step.blocker
    assert all(s.calls > 0 for s in streams)
    for j, w in enumerate(want):
        torch.testing.assert_close(got[j:j + 1], w, atol=1e-4, rtol=1e-4)
