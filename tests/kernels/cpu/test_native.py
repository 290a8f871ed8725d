"""Native (C++) quantised kernels against their plain reference: gguf-py's dequantisation of the weights
times activations rounded as ggml rounds them (offload.gguf.numerics), in float64.

Integer sums per block are exact, so the only difference is float summation order: the tolerance is
relative to the size of the terms (sum of |x_i w_i|), not to the result."""

import gguf
import numpy as np
import pytest
import torch

from offload.errors import WeightsError
from offload.kernels.cpu import native
from tests.kernels.cpu.blocks import close_but_for_rounding_ties, sane_blocks

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler: native kernels not built")


def test_library_builds():
    """With a compiler present the library must build: a failed build would silently send the engine
    to the slower numba kernels."""
    native.build()  # raises with the compiler's message
    assert native.lib() is not None

TYPES = sorted(t for t in native.TYPES if not t & native.R16)  # the file's types (interleaved ones below)
ROWS = [1, 7, 255, 371]


def _scale(x, qt, w):
    """sum_i |x_i w_i| per output: the size of the terms a float summation-order error scales with."""
    W = np.abs(np.asarray(gguf.quants.dequantize(w, gguf.GGMLQuantizationType(qt)), np.float64))
    return torch.from_numpy(np.abs(x.numpy().astype(np.float64)) @ W.T).float()


@pytest.mark.parametrize("qt", TYPES, ids=[native.TYPES[t] for t in TYPES])
@pytest.mark.parametrize("rows", ROWS)
def test_gemv_matches_reference(qt, rows, rng):
    bs = native._BLOCK[qt][0]
    k = bs * int(rng.integers(1, 4)) * (256 // bs if bs == 32 else 1)  # any multiple of 256
    m = int(rng.choice([1, 2, 5, 8, 19]))  # the kernels take tokens in groups of up to 8
    w = sane_blocks(qt, rows, k, rng)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    ref = native.gemv_ref(x, w, qt)
    tol = 2e-6 * _scale(x, qt, w) + 1e-6
    for plain in (False, True):
        got = native.gemv(x, w, qt, plain=plain)
        assert got.shape == (m, rows)
        close_but_for_rounding_ties(got, ref, tol, x, w, qt, f"plain={plain}")


@pytest.mark.parametrize("qt", native.REPACKABLE, ids=[native.TYPES[t] for t in native.REPACKABLE])
@pytest.mark.parametrize("rows", [1, 7, 16, 48, 255, 371])
def test_interleaved_rows_are_lossless_and_multiply_the_same(qt, rows, rng):
    """repack -> unpack gives the file's bytes back; the interleaved kernels (SIMD and plain) match the
    reference of the plain blocks, full 16-row groups and plain tail rows alike."""
    bs = native._BLOCK[qt][0]
    k = bs * int(rng.integers(1, 20 if bs == 32 else 4))  # any multiple of the block
    m = int(rng.choice([1, 2, 5, 8, 19]))
    w = sane_blocks(qt, rows, k, rng)
    packed, pqt = native.repack(w, qt)
    assert pqt == qt | native.R16 and packed.shape == w.shape
    assert np.array_equal(native.unpack(packed, pqt), w)
    full = rows // 16 * 16
    assert np.array_equal(packed[full:], w[full:])  # the tail stays plain
    if full:
        assert not np.array_equal(packed[:full], w[:full])
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    ref = native.gemv_ref(x, w, qt)
    tol = 2e-6 * _scale(x, qt, w) + 1e-6
    for plain in (False, True):
        got = native.gemv(x, packed, pqt, plain=plain)
        close_but_for_rounding_ties(got, ref, tol, x, w, qt, f"interleaved, plain={plain}")
    torch.testing.assert_close(native.gemv_ref(x, packed, pqt), ref, rtol=0, atol=0)


# (gate / up, down) as files mix them: Q4_0 with Q8_0, Q4_K_M's Q4_K with Q6_K, Q2_K's Q2_K with Q3_K,
# IQ4_XS, Q5_K_M's Q5_K with Q6_K
@pytest.mark.parametrize("qgu,qd", [(2, 8), (12, 14), (10, 11), (23, 23), (13, 14)])
def test_interleaved_experts_in_the_fused_moe_call(qgu, qd, rng):
    """moe_topk over interleaved experts (with a shared expert) equals it over the file's blocks, and the
    batch path's dequantisation unpacks them."""
    from offload.kernels.cpu import quantmm

    E, H, I, T = 4, 256, 256 if qd in (14, 11, 23) else 96, 11  # 11 tokens: a group of 8 and one of 3
    gate, up, down = (sane_blocks(qgu, I, H, rng, (E,)), sane_blocks(qgu, I, H, rng, (E,)),
                      sane_blocks(qd, H, I, rng, (E,)))
    shared = (sane_blocks(qgu, I, H, rng), sane_blocks(qgu, I, H, rng), sane_blocks(qd, H, I, rng))
    x = rng.standard_normal((T, H)).astype(np.float32)
    loc = rng.integers(-1, E, (T, 2))
    wts = rng.random((T, 2)).astype(np.float32)
    qts = (qgu, qgu, qd)
    plain = native.moe_topk(x, loc, wts, gate, up, down, qts, shared)
    (pg, qg), (pu, qu), (pd, pqd) = native.repack(gate, qgu), native.repack(up, qgu), native.repack(down, qd)
    ps = tuple(native.repack(m, q)[0] for m, q in zip(shared, qts))
    got = native.moe_topk(x, loc, wts, pg, pu, pd, (qg, qu, pqd), ps)
    # The layouts sum the gate / up products in other float orders; where a hidden value sits on a rounding
    # boundary of the down matrix's 8-bit activations it may flip one quantum and move that token's outputs
    # (measured: 1 run in ~60 per type pair, one token, <= 5e-3 of the largest output; never two tokens)
    err, scale = np.abs(got - plain), float(np.abs(plain).max())
    off = (err > 1e-5 * np.abs(plain) + 1e-5 * scale).any(1)  # (T,) tokens beyond float-order error
    assert off.sum() <= 2 and err.max() <= 2e-2 * scale, (off.sum(), err.max() / scale)
    torch.testing.assert_close(quantmm.dequantize(pd, pqd), quantmm.dequantize(down, qd), rtol=0, atol=0)


@pytest.mark.parametrize("qt", [8, 2], ids=["q8_0", "q4_0"])
def test_q8_0_activations_with_k_of_32(qt, rng):
    """32-block types take K = any multiple of 32, not only of 256."""
    w = sane_blocks(qt, 9, 32 * 5, rng)
    x = torch.from_numpy(rng.standard_normal((3, 160)).astype(np.float32))
    tol = 2e-6 * _scale(x, qt, w) + 1e-6
    assert bool(((native.gemv(x, w, qt) - native.gemv_ref(x, w, qt)).abs() <= tol).all())


def test_activation_quantisation_is_ggml_q8_k(rng):
    """Q8_K rows: scale from the value of largest magnitude (-127 / max), round half to even, and the
    sums of each 16 values; dequantised they equal offload.gguf.numerics' rounding."""
    from offload.gguf.numerics import round_activations
    from offload.gguf.types import GGMLType

    x = rng.standard_normal((2, 512)).astype(np.float32)
    x[1, :256] = 0  # an all-zero block
    q = native.quantize_act(x, 12)  # Q4_K weights -> Q8_K activations
    blocks = q.reshape(2, 2, 292)
    d = blocks[..., :4].copy().view(np.float32)[..., 0]  # (2, 2)
    qs = blocks[..., 4:260].view(np.int8).astype(np.int32)  # (2, 2, 256)
    bsums = blocks[..., 260:].copy().view(np.int16)  # (2, 2, 16)
    np.testing.assert_array_equal(bsums, qs.reshape(2, 2, 16, 16).sum(-1))
    assert d[1, 0] == 0 and not qs[1, 0].any()
    assert np.abs(qs).max() == 127
    deq = (qs * d[..., None]).reshape(2, 512)
    ref = round_activations(torch.from_numpy(x), GGMLType.Q4_K).numpy()
    np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=1e-7)


def test_moe_rows_match_per_expert_gemv(rng):
    """The fused gate/up/silu/down over expert groups equals the same math through single gemv calls."""
    E, H, inter = 5, 512, 96
    gate = sane_blocks(12, inter, H, rng, lead=(E,))
    up = sane_blocks(12, inter, H, rng, lead=(E,))
    down = sane_blocks(8, H, inter, rng, lead=(E,))
    x = rng.standard_normal((17, H)).astype(np.float32)
    starts = np.array([0, 1, 4, 17])  # 13 tokens on the last expert: a group of 8 and one of 5
    eids = np.array([3, 0, 4])
    y = native.moe_rows(x, starts, eids, gate, up, down, (12, 12, 8))
    for g, e in enumerate(eids):
        xs = torch.from_numpy(x[starts[g]:starts[g + 1]])
        h = torch.nn.functional.silu(native.gemv(xs, gate[e], 12)) * native.gemv(xs, up[e], 12)
        torch.testing.assert_close(torch.from_numpy(y[starts[g]:starts[g + 1]]), native.gemv(h, down[e], 8),
                                   rtol=1e-5, atol=1e-6)


def test_gemv_multi_equals_one_gemv_per_matrix(rng):
    """One call over matrices of several types (both activation kinds, row counts not multiples of the
    16-row work item) gives each matrix exactly what its own gemv gives."""
    K = 512
    mats = [(12, 37), (8, 5), (14, 300), (23, 16), (2, 1)]  # (ggml type, rows)
    ws = [sane_blocks(qt, n, K, rng) for qt, n in mats]
    for m in (1, 3, 11):
        x = torch.from_numpy(rng.standard_normal((m, K)).astype(np.float32))
        got = native.gemv_multi(x, ws, [qt for qt, _ in mats])
        for (qt, n), w, y in zip(mats, ws, got):
            assert y.shape == (m, n)
            torch.testing.assert_close(y, native.gemv(x, w, qt), rtol=0, atol=0)
    with pytest.raises(WeightsError, match="does not take rows of 256"):
        native.gemv_multi(torch.zeros(1, 256), ws[:1], [12])


def test_moe_topk_with_shared_expert_equals_separate_calls(rng):
    """The shared expert run inside the routed experts' call adds what its own fused call gives; pairs held
    elsewhere (-1) are skipped."""
    E, H, inter, T, K = 6, 512, 96, 5, 3
    gate = sane_blocks(12, inter, H, rng, lead=(E + 1,))  # the last one is the shared expert
    up = sane_blocks(12, inter, H, rng, lead=(E + 1,))
    down = sane_blocks(8, H, inter, rng, lead=(E + 1,))
    x = rng.standard_normal((T, H)).astype(np.float32)
    loc = rng.integers(-1, E, (T, K))
    w = rng.uniform(0.1, 1.0, (T, K)).astype(np.float32)
    qts = (12, 12, 8)
    routed = native.moe_topk(x, loc, w, gate[:E], up[:E], down[:E], qts)
    both = native.moe_topk(x, loc, w, gate[:E], up[:E], down[:E], qts, shared=(gate[E], up[E], down[E]))
    alone = native.moe_rows(x, np.array([0, T]), np.array([E]), gate, up, down, qts)
    scale = float(np.abs(alone).max() + np.abs(routed).max())  # random blocks: outputs ~1e5, sums in other orders
    torch.testing.assert_close(torch.from_numpy(both), torch.from_numpy(routed + alone), rtol=0, atol=2e-6 * scale)
    with pytest.raises(WeightsError, match="does not match"):
        native.moe_topk(x, loc, w, gate[:E], up[:E], down[:E], qts, shared=(gate[E], up[E], down[E][:10]))


def test_bad_input(rng):
    from offload.errors import WeightsError

    w = sane_blocks(12, 4, 256, rng)
    with pytest.raises(WeightsError, match="256 elements"):
        native.gemv(torch.zeros(1, 512), w, 12)
    with pytest.raises(WeightsError, match="whole number"):
        native.gemv(torch.zeros(1, 256), w[:, :100], 12)
    with pytest.raises(WeightsError, match="uint8"):
        native.gemv(torch.zeros(1, 256), w.astype(np.int16), 12)


def test_threads_change_nothing(rng):
    w = sane_blocks(14, 300, 512, rng)
    x = torch.from_numpy(rng.standard_normal((2, 512)).astype(np.float32))
    from offload.kernels.cpu.threads import get_threads

    n = get_threads()
    try:
        native.set_threads(1)
        one = native.gemv(x, w, 14)
        native.set_threads(3)
        three = native.gemv(x, w, 14)
    finally:
        native.set_threads(n)
    torch.testing.assert_close(one, three, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_pool_runs_every_item_once_and_publishes_results(threads):
    """The pool's caller does not wait for workers that have not woken: every item must still run once,
    and a region must see what the region before it wrote (1..40-item jobs, workers asleep or spinning,
    more threads than cores)."""
    from offload.kernels.cpu.threads import get_threads

    n = get_threads()
    try:
        native.set_threads(threads)
        for max_items in (2, 3, 7, 40):
            assert native.lib().qdot_pool_selftest(3000, max_items) == 0
    finally:
        native.set_threads(n)


_F16_ONE_OFFSETS = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 10: (80, 82), 11: (108,), 12: (0, 2),
                    13: (0, 2), 14: (208,), 23: (0,)}  # every fp16 d / dmin field (ggml block structs)
# byte ranges of scale fields made small below, and the values they take (so no sum passes 2^24)
_SMALL_SCALES = {12: (4, 16, 0, 4), 13: (4, 16, 0, 4), 14: (192, 208, -4, 5)}


def _integer_blocks(qt, rows, k, rng):
    """Random blocks whose fp16 scales are all 1 and whose sub-block scales are small, so that every
    product and sum the kernels form is an integer below 2^24: exact in float32 in any order."""
    w = sane_blocks(qt, rows, k, rng)
    blocks = w.reshape(-1, native._BLOCK[qt][1])  # a view: (rows * k / block size, block bytes)
    for off in _F16_ONE_OFFSETS.get(qt, ()):
        blocks[:, off:off + 2] = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    if qt in _SMALL_SCALES:
        a, b, lo, hi = _SMALL_SCALES[qt]
        blocks[:, a:b] = rng.integers(lo, hi, (blocks.shape[0], b - a)).astype(np.int8).view(np.uint8)
    if qt == 23:  # IQ4_XS: 6-bit scale = (2 << 4 | 0..3) - 32 = 0..3
        blocks[:, 2:4] = 0xAA
        blocks[:, 4:8] = rng.integers(0, 4, (blocks.shape[0], 4)) * 17
    return w



@pytest.mark.parametrize("qt", TYPES, ids=[native.TYPES[t] for t in TYPES])
def test_integer_sums_are_exact_in_every_layout(qt, rng):
    """With fp16 scales of 1, small sub-block scales and integer activations whose blocks peak at 127 (so
    the activation scale is 1 too), every output is an integer below 2^24: the file-layout and interleaved
    kernels, SIMD and plain, must give x . dequant(W) exactly, rows 7 / 255 / 371 (tail rows included)."""
    k, m = 512, 11  # 11 tokens: a group of 8 and one of 3
    x = rng.integers(-126, 127, (m, k)).astype(np.float32)
    x[:, ::32] = 127  # each 32 / 256-value block's largest magnitude, first: activation scale exactly 1
    for rows in (7, 255, 371):
        w = _integer_blocks(qt, rows, k, rng)
        W = np.asarray(gguf.quants.dequantize(w, gguf.GGMLQuantizationType(qt)), np.float64)
        ref = torch.from_numpy(x.astype(np.float64) @ W.T)
        assert float(ref.abs().max()) < 2**24
        mats = [(w, qt)] + ([native.repack(w, qt)] if qt in native.REPACKABLE else [])
        for wm, qm in mats:
            for plain in (False, True):
                got = native.gemv(torch.from_numpy(x), wm, qm, plain=plain).double()
                torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"{native.TYPES[qm]} plain={plain} rows={rows}")
