"""The routed experts resident on a GPU, all (token, expert) pairs of a layer at once, weights in their storage
format: gate and up fused with SiLU * mul, then down weighted by the router and summed per token in a fixed
order (no atomics: the same bits every run). A slot map (expert id -> resident slot, -1 where not resident)
lets an expert cache swap experts in without touching the kernels; pairs whose expert is -1 or not resident
are skipped (another group computes them).

- decode (`moe_gemv`): one program per (pair, tile of rows) for gate/up and for down, each pair's output row
  written once and a token's k rows summed by torch in order;
- prefill (`moe_dot`): pairs sorted by slot into blocks of BLOCK_M that share one expert, multiplied with tl.dot;
  each pair's output row is written once and the k rows of a token summed by torch in order.
`moe_ref` is the plain loop over pairs on gguf-py's dequantisation.

T tokens, k experts per token, P = T*k pairs, S resident slots, H hidden, I expert width.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from offload.kernels.gpu import gemm
from offload.kernels.gpu.formats import FP8_BLOCK, dequant_slice, dot_acc, dot_slice
from offload.kernels.gpu.gemm import GEMM_MIN_TOKENS, Packed, dequant, dequant_ref, interpreting

BLOCK_M = 16  # pairs per tl.dot block: tl.dot's minimum, so an expert with few tokens pads little


@triton.jit
def _rows_dot_vec(w_ptr, w16_ptr, aux_ptr, aux_stride, rows, rm, row_bytes, K, v_ptr,
                  FMT: tl.constexpr, BLOCK_N: tl.constexpr):
    """W[rows] (BN, K) @ v (K,) -> (BN,) float32."""
    acc = dot_acc(FMT, BLOCK_N)  # (BN, G, L)
    for kb in range(tl.cdiv(K, 256)):
        acc += dot_slice(w_ptr, w16_ptr, aux_ptr, aux_stride, rows, rm, row_bytes, kb, K, v_ptr, FMT, BLOCK_N)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _rows_dot_mat(a_ptr, arow, am, w_ptr, w16_ptr, aux_ptr, aux_stride, rows, rm, row_bytes, K,
                  FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """A[arow] (BM, K) @ W[rows].T -> (BM, BN) float32 with tl.dot."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kb in range(tl.cdiv(K, 256)):
        col = kb * 256 + tl.arange(0, 256)[None, :]
        a = tl.load(a_ptr + arow[:, None] * K + col, mask=am[:, None] & (col < K), other=0)  # (BM, 256)
        w = dequant_slice(w_ptr, w16_ptr, aux_ptr, aux_stride, rows, rm, row_bytes, kb, K, FMT)  # (BN, 256)
        if IEEE:
            acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))
    return acc


@triton.jit
def _gate_up_gemv(x_ptr, ids_ptr, slot_ptr, h_ptr, H, I, TOPK,
                  g_ptr, g16, g_aux, g_as, g_rb, g_mb, g_m16, g_am,
                  u_ptr, u16, u_aux, u_as, u_rb, u_mb, u_m16, u_am,
                  FMT_G: tl.constexpr, FMT_U: tl.constexpr, BLOCK_N: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)  # pair = token * TOPK + j
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) of I
    rm = rows < I
    e = tl.load(ids_ptr + p)
    s = tl.load(slot_ptr + tl.maximum(e, 0)).to(tl.int64)
    if (e >= 0) & (s >= 0):
        xr = x_ptr + (p // TOPK) * H
        g = _rows_dot_vec(g_ptr + s * g_mb, g16 + s * g_m16, g_aux + s * g_am, g_as, rows, rm, g_rb, H, xr,
                          FMT_G, BLOCK_N)
        u = _rows_dot_vec(u_ptr + s * u_mb, u16 + s * u_m16, u_aux + s * u_am, u_as, rows, rm, u_rb, H, xr,
                          FMT_U, BLOCK_N)
        tl.store(h_ptr + p * I + rows, g * tl.sigmoid(g) * u, mask=rm)


@triton.jit
def _down_gemv(h_ptr, ids_ptr, wt_ptr, slot_ptr, out_ptr, H, I,
               d_ptr, d16, d_aux, d_as, d_rb, d_mb, d_m16, d_am,
               FMT_D: tl.constexpr, BLOCK_N: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)  # one pair per program (a token's k pairs in one would leave a GPU idle)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) of H
    rm = rows < H
    e = tl.load(ids_ptr + p)
    s = tl.load(slot_ptr + tl.maximum(e, 0)).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), tl.float32)  # skipped pairs write zeros
    if (e >= 0) & (s >= 0):
        acc = tl.load(wt_ptr + p).to(tl.float32) * _rows_dot_vec(
            d_ptr + s * d_mb, d16 + s * d_m16, d_aux + s * d_am, d_as, rows, rm, d_rb, I, h_ptr + p * I, FMT_D,
            BLOCK_N)
    tl.store(out_ptr + p * H + rows, acc, mask=rm)


@triton.jit
def _gate_up_dot(x_ptr, pairs_ptr, bslot_ptr, h_ptr, H, I, TOPK,
                 g_ptr, g16, g_aux, g_as, g_rb, g_mb, g_m16, g_am,
                 u_ptr, u16, u_aux, u_as, u_rb, u_mb, u_m16, u_am,
                 FMT_G: tl.constexpr, FMT_U: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IEEE: tl.constexpr):
    b = tl.program_id(0)
    pairs = tl.load(pairs_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # (BM,), -1 = padding
    pm = pairs >= 0
    tok = tl.where(pm, pairs // TOPK, 0)
    s = tl.load(bslot_ptr + b).to(tl.int64)  # every pair of a block has this slot
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < I
    g = _rows_dot_mat(x_ptr, tok, pm, g_ptr + s * g_mb, g16 + s * g_m16, g_aux + s * g_am, g_as, rows, rm, g_rb,
                      H, FMT_G, BLOCK_M, BLOCK_N, IEEE)  # (BM, BN)
    u = _rows_dot_mat(x_ptr, tok, pm, u_ptr + s * u_mb, u16 + s * u_m16, u_aux + s * u_am, u_as, rows, rm, u_rb,
                      H, FMT_U, BLOCK_M, BLOCK_N, IEEE)
    tl.store(h_ptr + tl.where(pm, pairs, 0)[:, None] * I + rows[None, :], g * tl.sigmoid(g) * u,
             mask=pm[:, None] & rm[None, :])


@triton.jit
def _down_dot(h_ptr, pairs_ptr, bslot_ptr, wt_ptr, out_ptr, H, I,
              d_ptr, d16, d_aux, d_as, d_rb, d_mb, d_m16, d_am,
              FMT_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    pairs = tl.load(pairs_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    pm = pairs >= 0
    pr = tl.where(pm, pairs, 0)
    s = tl.load(bslot_ptr + b).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < H
    acc = _rows_dot_mat(h_ptr, pr, pm, d_ptr + s * d_mb, d16 + s * d_m16, d_aux + s * d_am, d_as, rows, rm, d_rb,
                        I, FMT_D, BLOCK_M, BLOCK_N, IEEE)  # (BM, BN)
    wt = tl.load(wt_ptr + pr, mask=pm, other=0).to(tl.float32)
    tl.store(out_ptr + pr[:, None] * H + rows[None, :], acc * wt[:, None], mask=pm[:, None] & rm[None, :])


def _block_n(n: int, gpu: int) -> int:
    """Rows per program: `gpu` on a GPU; under the interpreter (numpy per op) one tile of up to 1024 rows."""
    return min(1024, triton.next_power_of_2(n)) if interpreting() else gpu


def _args(p: Packed) -> tuple:
    return (p.blocks, p.w16, p.aux, p.aux_stride, p.row_bytes, p.mat_bytes, p.w16_mat, p.aux_mat)


def _check(x, ids, weights, slots, gate: Packed, up: Packed, down: Packed) -> None:
    t, h = x.shape
    i = gate.rows
    if (gate.cols, up.cols, up.rows, down.rows, down.cols) != (h, h, i, h, i):
        raise ValueError(f"expert shapes gate {gate.rows}x{gate.cols}, up {up.rows}x{up.cols}, down "
                         f"{down.rows}x{down.cols} do not fit hidden {h}")
    if ids.shape != weights.shape or ids.shape[0] != t:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be ({t}, k)")
    n = gate.blocks.shape[0] if gate.blocks.dim() == 3 else 1
    for name, p in (("gate", gate), ("up", up), ("down", down)):
        if p.blocks.dim() != 3 or p.blocks.shape[0] != n:
            raise ValueError(f"{name}: expected stacked blocks (slots, rows, row bytes) for {n} slots, got "
                             f"{tuple(p.blocks.shape)}")
    if slots.dtype not in (torch.int32, torch.int64) or slots.dim() != 1:
        raise ValueError(f"slot map must be a 1-d integer tensor (expert id -> slot or -1), got {slots.dtype}")


def moe_gemv(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
             gate: Packed, up: Packed, down: Packed, block_n: int | None = None) -> torch.Tensor:
    """x (T, H), ids (T, k) expert ids (-1 = none), weights (T, k), slots (E,) -> (T, H) float32: the sum over
    each token's resident experts of weight * down(silu(gate x) * up x). Two kernel launches and torch's sum
    over k, no host sync."""
    _check(x, ids, weights, slots, gate, up, down)
    (t, h), k, i = x.shape, ids.shape[1], gate.rows
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    bn = block_n or _block_n(i, 32)
    hbuf = torch.empty(t * k, i, dtype=torch.float32, device=x.device)  # (P, I)
    _gate_up_gemv[(t * k, triton.cdiv(i, bn))](x, ids, slots, hbuf, h, i, k, *_args(gate), *_args(up),
                                               FMT_G=gate.fmt, FMT_U=up.fmt, BLOCK_N=bn)
    out = torch.empty(t * k, h, dtype=torch.float32, device=x.device)  # (P, H) weighted pair outputs
    bn = block_n or _block_n(h, 32)
    _down_gemv[(t * k, triton.cdiv(h, bn))](hbuf, ids, weights, slots, out, h, i, *_args(down), FMT_D=down.fmt,
                                            BLOCK_N=bn)
    return out.view(t, k, h).sum(1)  # (T, H): each token's k rows summed in order


def sort_pairs(ids: torch.Tensor, slots: torch.Tensor, n_slots: int, block_m: int = BLOCK_M):
    """Pairs (flat index token * k + j) grouped by resident slot into blocks of block_m that share one slot:
    (pairs (B * block_m,) int32 with -1 padding, slot per block (B,) int32). One host sync (the block count)."""
    s = torch.where(ids >= 0, slots[ids.clamp(min=0)], -1).flatten()  # (P,) slot per pair, -1 skipped
    valid = s >= 0
    order = torch.argsort(torch.where(valid, s, n_slots), stable=True)  # pairs by slot, skipped last
    counts = torch.bincount(s[valid], minlength=n_slots)  # (S,)
    nb = (counts + block_m - 1) // block_m  # blocks per slot
    n_blocks, n_valid = int(nb.sum()), int(counts.sum())
    sv = s[order[:n_valid]]  # (V,) sorted slots
    pos = torch.arange(n_valid, device=ids.device) - (torch.cumsum(counts, 0) - counts)[sv]  # rank within slot
    dest = ((torch.cumsum(nb, 0) - nb)[sv] + pos // block_m) * block_m + pos % block_m
    pairs = torch.full((n_blocks * block_m,), -1, dtype=torch.int32, device=ids.device)
    pairs[dest] = order[:n_valid].to(torch.int32)
    bslot = torch.repeat_interleave(torch.arange(n_slots, device=ids.device, dtype=torch.int32), nb)
    return pairs, bslot


def moe_dot(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
            gate: Packed, up: Packed, down: Packed, block_n: int | None = None) -> torch.Tensor:
    """As moe_gemv, for prefill: pairs sorted by expert, each block of BLOCK_M pairs one tl.dot per tile."""
    _check(x, ids, weights, slots, gate, up, down)
    (t, h), k, i = x.shape, ids.shape[1], gate.rows
    x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
    pairs, bslot = sort_pairs(ids, slots, gate.blocks.shape[0])
    nb = bslot.shape[0]
    ieee = x.dtype == torch.float32
    hbuf = torch.empty(t * k, i, dtype=x.dtype, device=x.device)  # (P, I) in the activations' type for tl.dot
    out = torch.zeros(t * k, h, dtype=torch.float32, device=x.device)  # (P, H); skipped pairs stay 0
    if nb:
        bn = block_n or _block_n(i, 64)
        _gate_up_dot[(nb, triton.cdiv(i, bn))](x, pairs, bslot, hbuf, h, i, k, *_args(gate), *_args(up),
                                               FMT_G=gate.fmt, FMT_U=up.fmt, BLOCK_M=BLOCK_M, BLOCK_N=bn,
                                               IEEE=ieee)
        bn = block_n or _block_n(h, 64)
        _down_dot[(nb, triton.cdiv(h, bn))](hbuf, pairs, bslot, weights, out, h, i, *_args(down),
                                            FMT_D=down.fmt, BLOCK_M=BLOCK_M, BLOCK_N=bn, IEEE=ieee)
    return out.view(t, k, h).sum(1)  # (T, H): each token's k rows summed in order


def _expanded(p: Packed, s: int, dtype: torch.dtype) -> torch.Tensor:
    """Slot s's matrix (N, K) as `dtype`: the stack's rows s*N .. s*N + N-1 expanded by the dequant kernel."""
    if p.fmt == FP8_BLOCK and p.rows % 128:
        raise ValueError(f"FP8 experts of {p.rows} rows: 128-row scale blocks must not straddle two experts")
    rows = torch.arange(s * p.rows, (s + 1) * p.rows, device=p.blocks.device)
    return dequant(p, rows, dtype)


def moe_expand(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, slots: torch.Tensor,
               gate: Packed, up: Packed, down: Packed) -> torch.Tensor:
    """As moe_gemv, for long prompts: the pairs grouped by expert (host reads), each used expert's three matrices
    expanded once to x's dtype and multiplied by torch (tl.dot would expand each tile again for every 16 pairs);
    each pair's output row written once and a token's k rows summed in order."""
    _check(x, ids, weights, slots, gate, up, down)
    (t, h), k = x.shape, ids.shape[1]
    s = torch.where(ids >= 0, slots[ids.clamp(min=0)], -1).flatten()  # (P,) slot per pair, -1 skipped
    out = torch.zeros(t * k, h, dtype=torch.float32, device=x.device)  # (P, H)
    wf = weights.reshape(-1, 1).float()  # (P, 1)
    for slot in torch.unique(s[s >= 0]).tolist():
        pairs = torch.nonzero(s == slot).flatten()  # (n,)
        xe = x[pairs // k]  # (n, H)
        hid = F.silu(xe @ _expanded(gate, slot, x.dtype).T) * (xe @ _expanded(up, slot, x.dtype).T)  # (n, I)
        out[pairs] = (hid @ _expanded(down, slot, x.dtype).T).float() * wf[pairs]
    return out.view(t, k, h).sum(1)  # (T, H)


def moe(x, ids, weights, slots, gate: Packed, up: Packed, down: Packed) -> torch.Tensor:
    """moe_gemv for decode-sized batches, moe_dot from GEMM_MIN_TOKENS tokens on, moe_expand from
    EXPAND_MM_TOKENS on (as the dense matmul)."""
    t = x.shape[0]
    f = moe_gemv if t < GEMM_MIN_TOKENS else moe_dot if t < gemm.EXPAND_MM_TOKENS else moe_expand
    return f(x, ids, weights, slots, gate, up, down)


def _expert(p: Packed, s: int) -> torch.Tensor:
    scales = p.aux[s] if p.aux_mat else None
    return dequant_ref(p.blocks[s], p.fmt, p.cols, scales).double()


def moe_ref(x, ids, weights, slots, gate: Packed, up: Packed, down: Packed) -> torch.Tensor:
    """The plain loop over (token, expert) pairs on gguf-py's dequantisation, in float64 -> float32 (T, H)."""
    x64 = x.cpu().double()
    y = torch.zeros(x64.shape, dtype=torch.float64)
    for t, j in ((t, j) for t in range(ids.shape[0]) for j in range(ids.shape[1])):
        e = int(ids[t, j])
        s = int(slots[e]) if e >= 0 else -1
        if s < 0:
            continue
        g, u, d = _expert(gate, s), _expert(up, s), _expert(down, s)
        hid = torch.nn.functional.silu(g @ x64[t]) * (u @ x64[t])
        y[t] += float(weights[t, j]) * (d @ hid)
    return y.float()
