"""The expert-group protocol (offload.models.experts) on every group kind: `submit(x, ids, weights).wait()`
gives the partial sum of the pairs whose expert the group holds, the same as the call each kind had before
(a per-pair loop for torch tensors and per-matmul expansion, `moe_cpu` for the fused CPU kernel); groups that
split a layer's experts sum to the group holding all of them; the CPU group on its worker thread gives the
same numbers as at submit; a shared expert taken into the CPU group's call adds exactly its own output."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offload.kernels.cpu import native
from offload.kernels.cpu.experts import CpuExpertGroup, cpu_experts_factory, from_file_blocks
from offload.kernels.cpu.moe import CpuExperts, moe_cpu
from offload.kernels.cpu.quantize import quantize_q8_0
from offload.kernels.cpu.weights import QuantMLP, QuantWeight
from offload.models.experts import BlockExperts, ExpertBlocks, TorchExperts

E, H, I, T, K = 6, 128, 64, 5, 3  # experts, hidden, expert width, tokens, top-k
Q8_0 = 8


@pytest.fixture
def case(rng):
    dense = {e: (torch.from_numpy(rng.normal(0, H ** -0.5, (I, H)).astype(np.float32)),
                 torch.from_numpy(rng.normal(0, H ** -0.5, (I, H)).astype(np.float32)),
                 torch.from_numpy(rng.normal(0, I ** -0.5, (H, I)).astype(np.float32))) for e in range(E)}
    x = torch.from_numpy(rng.normal(0, 1, (T, H)).astype(np.float32))
    ids = torch.from_numpy(rng.integers(0, E, (T, K)))
    w = torch.from_numpy(rng.uniform(0.1, 1, (T, K)).astype(np.float32))
    return dense, x, ids, w


def reference(x, ids, w, dense, held) -> torch.Tensor:
    """The pairs of the held experts, one at a time, in float64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e in held:
                g, u, d = (m.double() for m in dense[e])
                xt = x[t].double()
                out[t] += float(w[t, k]) * (d @ (F.silu(g @ xt) * (u @ xt)))
    return out.float()


def q8(dense, held) -> list[np.ndarray]:
    """gate, up, down of the held experts as stacked Q8_0 blocks (E, N, row bytes)."""
    return [np.stack([quantize_q8_0(dense[e][j].numpy()) for e in held]) for j in range(3)]


def test_torch_experts_and_float_blocks(case):
    dense, x, ids, w = case
    held = [1, 2, 4]
    ref = reference(x, ids, w, dense, held)
    group = TorchExperts(torch.device("cpu"), {e: dense[e] for e in held})
    torch.testing.assert_close(group.submit(x, ids, w).wait(), ref, atol=1e-5, rtol=1e-5)
    mats = [ExpertBlocks(np.stack([dense[e][j].numpy() for e in held]).view(np.uint8), 0, (H, H, I)[j])
            for j in range(3)]  # float32 "blocks": ggml F32
    blocks = BlockExperts(torch.device("cpu"), held, *mats)
    torch.testing.assert_close(blocks.submit(x, ids, w).wait(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not native.fast(Q8_0), reason="no native SIMD kernels on this CPU")
def test_quantised_groups_match_moe_cpu(case):
    """Every quantised kind against the fused kernel's own call over the same blocks (the CPU group's old call)."""
    dense, x, ids, w = case
    held = [0, 3, 5]
    g, u, d = q8(dense, held)
    experts = CpuExperts(g, u, d, (Q8_0,) * 3, held)
    old = moe_cpu(x, ids, w, experts)
    group = CpuExpertGroup(experts)
    assert torch.equal(group.submit(x, ids, w).wait(), old)
    group.background = True  # on the worker thread, as for a caller on a GPU
    handle = group.submit(x, ids, w)
    assert torch.equal(handle.wait(), old)
    # the same sums in another order: an 8-bit activation within float error of a rounding boundary may move
    # one quantum (tests/gguf/test_models.py, interleaved experts), hence 1e-3 of the scale
    scale = float(old.abs().max())
    stacks = q8(dense, range(E))  # a file's stacks hold every expert of the layer
    from_file = from_file_blocks(*stacks, (Q8_0,) * 3, held)  # maybe interleaved: the same rows
    assert (from_file.submit(x, ids, w).wait() - old).abs().max() <= 1e-3 * scale
    # blocks expanded per matmul (the GPU kind, run here on the CPU): 8-bit activations per matmul as well
    blocks = BlockExperts(torch.device("cpu"), held, *(ExpertBlocks(m, Q8_0, c) for m, c in zip((g, u, d), (H, H, I))))
    assert (blocks.submit(x, ids, w).wait() - old).abs().max() <= 1e-3 * scale
    # and all of them are the model's experts, to Q8_0's rounding of weights and activations (~1 % RMS)
    ref = reference(x, ids, w, dense, held)
    assert (old - ref).norm() <= 0.05 * ref.norm()


def test_split_groups_sum_to_the_whole(case):
    """The router's ids go to every group unchanged: each computes only the experts it holds."""
    dense, x, ids, w = case
    whole = TorchExperts(torch.device("cpu"), dense).submit(x, ids, w).wait()
    make = cpu_experts_factory(None)  # float experts on the fused kernel's dense path
    parts = [TorchExperts(torch.device("cpu"), {e: dense[e] for e in (0, 1)}),
             make({e: dense[e] for e in (2, 5)}, torch.device("cpu")),
             TorchExperts(torch.device("cpu"), {e: dense[e] for e in (3, 4)})]
    handles = [p.submit(x, ids, w) for p in parts]  # all submitted, then waited for
    torch.testing.assert_close(sum(h.wait() for h in handles), whole, atol=1e-5, rtol=1e-5)
    assert sorted(e for p in parts for e in p.ids) == list(range(E))


@pytest.mark.skipif(not native.fast(Q8_0), reason="no native SIMD kernels on this CPU")
def test_shared_expert_taken_at_build(case, rng):
    """A shared expert of the experts' types and shapes runs in their native call: the partial is the routed
    sum plus exactly the shared MLP's output; one of other shapes is refused when the group is built."""
    dense, x, ids, w = case
    held = list(range(E))
    g, u, d = q8(dense, held)
    shared_w = [quantize_q8_0(rng.normal(0, 0.1, s).astype(np.float32)) for s in ((I, H), (I, H), (H, I))]
    shared = QuantMLP(*(QuantWeight.from_file(b, Q8_0, c) for b, c in zip(shared_w, (H, H, I))))  # as loaded
    group = from_file_blocks(g, u, d, (Q8_0,) * 3, held, shared)
    plain = from_file_blocks(g, u, d, (Q8_0,) * 3, held)
    assert group.shared is not None  # the layer no longer runs it
    got = group.submit(x, ids, w).wait()
    torch.testing.assert_close(got, plain.submit(x, ids, w).wait() + shared(x), atol=1e-5, rtol=1e-5)
    group.background = True
    assert torch.equal(group.submit(x, ids, w).wait(), got)
    wide = QuantMLP(*(QuantWeight.from_file(quantize_q8_0(rng.normal(0, 0.1, s).astype(np.float32)), Q8_0, c)
                      for s, c in (((2 * I, H), H), ((2 * I, H), H), ((H, 2 * I), 2 * I))))
    assert from_file_blocks(g, u, d, (Q8_0,) * 3, held, wide).shared is None


def test_pending_result_lands_on_the_callers_device(case):
    """A background CPU group hands back a handle at once; wait() returns the partial in x's dtype."""
    dense, x, ids, w = case
    group = cpu_experts_factory(None)(dense, torch.device("cpu"))
    group.background = True
    xb = x.to(torch.bfloat16)
    handle = group.submit(xb, ids, w)
    out = handle.wait()
    assert out.dtype == torch.bfloat16 and out.device == xb.device and out.shape == x.shape
