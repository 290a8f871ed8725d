"""offload.graphs.CudaSegments' use of torch's CUDA graph API, with that API stood in so it runs on the CPU: the
step is cut into one capture per segment, host calls between them, and every capture begun is ended, also
when the step fails mid-capture (a capture left open in CUDA's thread-local mode forbids this thread any later
sync or allocation: every GPU test after the first failed recording would fail too)."""

import contextlib

import pytest
import torch

from offload.graphs import CudaSegments


class FakeGraph:
    log: list = []
    invalid = False  # capture_end raises, as for a capture invalidated by a host sync inside it

    def capture_begin(self, pool=None, capture_error_mode="global"):
        assert capture_error_mode == "thread_local"
        self.log.append("begin")

    def capture_end(self):
        self.log.append("end")
        if self.invalid:
            raise RuntimeError("operation not permitted when stream is capturing")

    def replay(self):
        self.log.append("replay")


class FakeStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    FakeGraph.log, FakeGraph.invalid = [], False
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (0, 1))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    return FakeGraph.log


def test_segments_and_host_calls_in_order(fake_cuda):
    calls = []
    out = torch.zeros(2)

    def step(host):
        host(lambda: calls.append("start"))
        host(lambda: calls.append("finish"))
        return out

    seg = CudaSegments()
    assert seg.record(step) is out and calls == []  # host calls are noted at capture, not made
    assert fake_cuda == ["begin", "end"] * 3 and seg.host_calls == 2
    fake_cuda.clear()
    got = seg.replay(out)
    assert calls == ["start", "finish"] and fake_cuda == ["replay"] * 3
    assert torch.equal(got, out) and got is not out  # a copy: the pool's buffer is rewritten by the next replay


def test_a_step_failing_mid_capture_ends_its_capture(fake_cuda):
    def step(host):
        host(lambda: None)
        raise ValueError("a host read inside the step")

    with pytest.raises(ValueError, match="a host read"):  # the step's error, not the invalidated capture's
        CudaSegments().record(step)
    assert fake_cuda == ["begin", "end", "begin", "end"]


def test_an_invalidated_capture_is_ended_once(fake_cuda):
    FakeGraph.invalid = True
    with pytest.raises(RuntimeError, match="not permitted"):
        CudaSegments().record(lambda host: torch.zeros(1))
    assert fake_cuda == ["begin", "end"]
