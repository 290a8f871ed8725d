// Quantised dot products of ggml weight blocks with 8-bit activations, the GEMV over weight rows and
// the fused MoE expert FFN, on a small thread pool of our own. Loaded with ctypes by
// kernels/cpu/native.py, which compiles this file once per machine with -march=native.
//
// Activations are quantised the way ggml's CPU backend does before a dot product (its vec_dot_type):
// K-quants and IQ4_XS against "A8K" rows (Q8_K: per 256 values a float scale, int8 values and the sums
// of each 16), Q8_0 / Q4_0 against "A80" rows (Q8_0: per 32 values an fp16-rounded scale, int8 values,
// and their int sum). Integer sums per sub-block are exact, so results equal
// dequant(W) . dequant(quant(x)) up to float summation order -- the same numbers llama.cpp computes.
//
// With AVX-512 VNNI (Ice Lake, Sapphire Rapids and later) every type uses vpdpbusd (u8 x s8 -> s32) on
// 64 weights at a time, decoding each weight block once for up to 8 tokens; without it, plain C++.
//
// The parts, in one translation unit: common.h (types, blocks), act_quant.h, dots_plain.h, dots_vnni.h,
// pool.h, repack.h, repack_k.h; this file holds the type table, the GEMV and fused-MoE drivers and the
// exported C API.

#include <memory>

#include "common.h"
#include "act_quant.h"
#include "dots_plain.h"
#include "dots_vnni.h"
#include "pool.h"
#include "repack.h"
#include "repack_k.h"

namespace {

constexpr int64_t ROWS_PER_ITEM = 16;  // rows a thread takes at a time

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// ---------------------------------------------------------------- type table

typedef float (*DotFn)(const uint8_t*, const void*, int64_t);
// one weight row against nt token rows at act + m * astride -> out[0..nt)
typedef void (*MultiFn)(const uint8_t*, const uint8_t*, int64_t, int, int64_t, float*);

template <DotFn F>
void one_by_one(const uint8_t* w, const uint8_t* act, int64_t astride, int nt, int64_t nb, float* out) {
    for (int m = 0; m < nt; m++) out[m] = F(w, act + m * astride, nb);
}

// a full 16-row group of an interleaved (R16) matrix against nt token rows -> out[16 m + j]
typedef MultiFn GroupFn;

constexpr int R16 = 0x100;  // type id flag: the matrix's full 16-row groups are interleaved (repack.h)

struct Type {
    int id, block, bytes;
    bool k_act;     // activations as A8K (else A80)
    MultiFn fast;   // SIMD where this CPU has it, else the plain one
    MultiFn plain;
    GroupFn group = nullptr;  // R16 types: a full group (SIMD); null: unpacked, then the plain row dots
    bool r16 = false;         // R16 types: fast / plain are the plain type's, for the tail rows
};

const Type TYPES[] = {
#if QDOT_VNNI
    {Q8_0, 32, 34, false, multi<Q80K>, one_by_one<dot_q8_0_plain>},
    {Q4_0, 32, 18, false, multi<Q40K>, one_by_one<dot_q32_plain<Q32_4_0>>},
    {Q4_1, 32, 20, false, multi<Q41K>, one_by_one<dot_q32_plain<Q32_4_1>>},
    {Q5_0, 32, 22, false, multi<Q50K>, one_by_one<dot_q32_plain<Q32_5_0>>},
    {Q5_1, 32, 24, false, multi<Q51K>, one_by_one<dot_q32_plain<Q32_5_1>>},
    {Q4_K, QK, 144, true, multi<Q4KK>, one_by_one<dot_k4_plain<false>>},
    {Q5_K, QK, 176, true, multi<Q5KK>, one_by_one<dot_k4_plain<true>>},
    {Q6_K, QK, 210, true, multi<Q6KK>, one_by_one<dot_q6_k_plain>},
    {Q2_K, QK, 84, true, multi<Q2KK>, one_by_one<dot_q2_k_plain>},
    {Q3_K, QK, 110, true, multi<Q3KK>, one_by_one<dot_q3_k_plain>},
    {IQ4_XS, QK, 136, true, multi<IQ4XSK>, one_by_one<dot_iq4_xs_plain>},
    {R16 | Q8_0, 32, 34, false, multi<Q80K>, one_by_one<dot_q8_0_plain>, multi<R80, 16>, true},
    {R16 | Q4_0, 32, 18, false, multi<Q40K>, one_by_one<dot_q32_plain<Q32_4_0>>, multi<R40, 16>, true},
    {R16 | Q4_1, 32, 20, false, multi<Q41K>, one_by_one<dot_q32_plain<Q32_4_1>>, multi<R41, 16>, true},
    {R16 | Q5_0, 32, 22, false, multi<Q50K>, one_by_one<dot_q32_plain<Q32_5_0>>, multi<R50, 16>, true},
    {R16 | Q5_1, 32, 24, false, multi<Q51K>, one_by_one<dot_q32_plain<Q32_5_1>>, multi<R51, 16>, true},
    {R16 | Q4_K, QK, 144, true, multi<Q4KK>, one_by_one<dot_k4_plain<false>>, multi<R4K, 16>, true},
    {R16 | Q6_K, QK, 210, true, multi<Q6KK>, one_by_one<dot_q6_k_plain>, multi<R6K, 16>, true},
    {R16 | IQ4_XS, QK, 136, true, multi<IQ4XSK>, one_by_one<dot_iq4_xs_plain>, multi<RIQ4XS, 16>, true},
    {R16 | Q2_K, QK, 84, true, multi<Q2KK>, one_by_one<dot_q2_k_plain>, multi<R2K, 16>, true},
    {R16 | Q3_K, QK, 110, true, multi<Q3KK>, one_by_one<dot_q3_k_plain>, multi<R3K, 16>, true},
    {R16 | Q5_K, QK, 176, true, multi<Q5KK>, one_by_one<dot_k4_plain<true>>, multi<R5K, 16>, true},
#else
    {Q8_0, 32, 34, false, one_by_one<dot_q8_0_plain>, one_by_one<dot_q8_0_plain>},
    {Q4_0, 32, 18, false, one_by_one<dot_q32_plain<Q32_4_0>>, one_by_one<dot_q32_plain<Q32_4_0>>},
    {Q4_1, 32, 20, false, one_by_one<dot_q32_plain<Q32_4_1>>, one_by_one<dot_q32_plain<Q32_4_1>>},
    {Q5_0, 32, 22, false, one_by_one<dot_q32_plain<Q32_5_0>>, one_by_one<dot_q32_plain<Q32_5_0>>},
    {Q5_1, 32, 24, false, one_by_one<dot_q32_plain<Q32_5_1>>, one_by_one<dot_q32_plain<Q32_5_1>>},
    {Q4_K, QK, 144, true, one_by_one<dot_k4_plain<false>>, one_by_one<dot_k4_plain<false>>},
    {Q5_K, QK, 176, true, one_by_one<dot_k4_plain<true>>, one_by_one<dot_k4_plain<true>>},
    {Q6_K, QK, 210, true, one_by_one<dot_q6_k_plain>, one_by_one<dot_q6_k_plain>},
    {Q2_K, QK, 84, true, one_by_one<dot_q2_k_plain>, one_by_one<dot_q2_k_plain>},
    {Q3_K, QK, 110, true, one_by_one<dot_q3_k_plain>, one_by_one<dot_q3_k_plain>},
    {IQ4_XS, QK, 136, true, one_by_one<dot_iq4_xs_plain>, one_by_one<dot_iq4_xs_plain>},
    {R16 | Q8_0, 32, 34, false, one_by_one<dot_q8_0_plain>, one_by_one<dot_q8_0_plain>, nullptr, true},
    {R16 | Q4_0, 32, 18, false, one_by_one<dot_q32_plain<Q32_4_0>>, one_by_one<dot_q32_plain<Q32_4_0>>, nullptr, true},
    {R16 | Q4_1, 32, 20, false, one_by_one<dot_q32_plain<Q32_4_1>>, one_by_one<dot_q32_plain<Q32_4_1>>, nullptr, true},
    {R16 | Q5_0, 32, 22, false, one_by_one<dot_q32_plain<Q32_5_0>>, one_by_one<dot_q32_plain<Q32_5_0>>, nullptr, true},
    {R16 | Q5_1, 32, 24, false, one_by_one<dot_q32_plain<Q32_5_1>>, one_by_one<dot_q32_plain<Q32_5_1>>, nullptr, true},
    {R16 | Q4_K, QK, 144, true, one_by_one<dot_k4_plain<false>>, one_by_one<dot_k4_plain<false>>, nullptr, true},
    {R16 | Q6_K, QK, 210, true, one_by_one<dot_q6_k_plain>, one_by_one<dot_q6_k_plain>, nullptr, true},
    {R16 | IQ4_XS, QK, 136, true, one_by_one<dot_iq4_xs_plain>, one_by_one<dot_iq4_xs_plain>, nullptr, true},
    {R16 | Q2_K, QK, 84, true, one_by_one<dot_q2_k_plain>, one_by_one<dot_q2_k_plain>, nullptr, true},
    {R16 | Q3_K, QK, 110, true, one_by_one<dot_q3_k_plain>, one_by_one<dot_q3_k_plain>, nullptr, true},
    {R16 | Q5_K, QK, 176, true, one_by_one<dot_k4_plain<true>>, one_by_one<dot_k4_plain<true>>, nullptr, true},
#endif
};

const Type* find_type(int id) {
    for (const Type& t : TYPES)
        if (t.id == id) return &t;
    return nullptr;
}

int64_t act_row_bytes(const Type* t, int64_t K) {
    return t->k_act ? K / QK * (int64_t)sizeof(A8K) : K / 32 * (int64_t)sizeof(A80);
}

void quantize_row(const Type* t, const float* x, int64_t K, uint8_t* out) {
    if (t->k_act)
        quantize_a8k(x, (A8K*)out, K / QK);
    else
        quantize_a80(x, (A80*)out, K / 32);
}

}  // namespace

extern "C" {

int qdot_version() { return 1; }
int qdot_has_vnni() { return QDOT_VNNI; }

void qdot_set_threads(int n) {
    std::lock_guard<std::mutex> lk(call_mutex);
    if (n != pool().threads()) pool().resize(n);
}

int qdot_get_threads() { return pool().threads(); }

// bytes ahead the Q4_K group kernel prefetches each group block into L2 (0: none; native.prefetch_ahead chooses)
void qdot_set_prefetch(int bytes) { prefetch_ahead = bytes < 0 ? 0 : bytes; }
int qdot_get_prefetch() { return prefetch_ahead; }

// 1 if the type has a kernel here
int qdot_supported(int qtype) { return find_type(qtype) != nullptr; }

// bytes of one quantised activation row of K values for weights of `qtype` (-1: unsupported / bad K)
int64_t qdot_act_row_bytes(int qtype, int64_t K) {
    const Type* t = find_type(qtype);
    if (!t || K % t->block) return -1;
    return act_row_bytes(t, K);
}

// x (M, K) -> out (M, act_row_bytes): the activation rows as the dot products consume them
int qdot_quantize(int qtype, const float* x, int64_t M, int64_t K, uint8_t* out) {
    const Type* t = find_type(qtype);
    if (!t || K % t->block) return -1;
    const int64_t ab = act_row_bytes(t, K);
    for (int64_t m = 0; m < M; m++) quantize_row(t, x + m * K, K, out + m * ab);
    return 0;
}

// Pool check for tests: `jobs` two-phase jobs of 1..max_items items; phase 2 reads what phase 1 wrote,
// as qdot_gemv's dots read its quantised activations. Returns the number of wrong values seen.
int64_t qdot_pool_selftest(int64_t jobs, int64_t max_items) {
    std::vector<int64_t> a(max_items), b(max_items);
    std::vector<std::atomic<int>> hits(max_items);
    int64_t bad = 0;
    for (int64_t j = 0; j < jobs; j++) {
        const int64_t n = 1 + (j * 7919) % max_items;
        for (int64_t i = 0; i < n; i++) hits[i].store(0);
        Call call;
        pool().run(n, [&](int64_t i) { a[i] = j * 1000003 + i; hits[i].fetch_add(1, std::memory_order_relaxed); });
        pool().run(n, [&](int64_t i) {
            int64_t s = 0;
            for (int64_t k = 0; k < n; k++) s += a[k] - j * 1000003;
            b[i] = s;
        });
        for (int64_t i = 0; i < n; i++) bad += (hits[i].load() != 1) + (b[i] != n * (n - 1) / 2);
    }
    return bad;
}

}  // extern "C"

namespace {
// Rows r0..r1 of w (row bytes rb, nb blocks) against token rows p0..p1 of xa (stride ab): out[p * ostride + r].
// Token tiles of 8 outside (a tile's activations stay in L1); an interleaved type takes a full 16-row
// group (r0 a multiple of 16) in one group call, the plain tail rows one by one.
void rows_times_tokens(const Type* t, bool plain, const uint8_t* w, int64_t rb, int64_t nb, int64_t r0, int64_t r1,
                       const uint8_t* xa, int64_t ab, int64_t p0, int64_t p1, float* out, int64_t ostride) {
    float o[16 * 8];
    const bool group = t->r16 && r1 - r0 == 16 && r0 % 16 == 0;
    std::vector<uint8_t> rows;
    if (group && (plain || !t->group)) {  // the reference way: the 16 plain rows back, then row by row
        rows.resize(16 * rb);
        r16_groups(*r16_layout(t->id & ~R16), w + r0 * rb, rows.data(), nb, 0, 1, true);
    }
    for (int64_t p = p0; p < p1; p += 8) {
        const int nt = (int)std::min<int64_t>(8, p1 - p);
        if (group && rows.empty()) {
            t->group(w + r0 * rb, xa + p * ab, ab, nt, nb, o);
            for (int m = 0; m < nt; m++) std::memcpy(out + (p + m) * ostride + r0, o + 16 * m, 16 * sizeof(float));
            continue;
        }
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t* wr = rows.empty() ? w + r * rb : rows.data() + (r - r0) * rb;
            (plain ? t->plain : t->fast)(wr, xa + p * ab, ab, nt, nb, o);
            for (int m = 0; m < nt; m++) out[(p + m) * ostride + r] = o[m];
        }
    }
}

// out_j (M, N_j) = x (M, K) . W_j^T for n matrices that share one input: the activations quantised once
// per activation kind, one parallel region over every matrix's row blocks; plain: the plain C++ dots
int gemv_many(int n, const int* qtypes, const uint8_t* const* ws, const int64_t* Ns, const float* x, int64_t M,
              int64_t K, float* const* outs, bool plain) {
    if (n < 1 || n > 16) return -1;
    const Type* t[16];
    int64_t first_item[17] = {0};
    const Type* act[2] = {nullptr, nullptr};  // one type of each activation kind: A80, A8K
    for (int j = 0; j < n; j++) {
        t[j] = find_type(qtypes[j]);
        if (!t[j] || K % t[j]->block) return -1;
        act[t[j]->k_act] = t[j];
        first_item[j + 1] = first_item[j] + (Ns[j] + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    }
    const int64_t ab[2] = {act[0] ? act_row_bytes(act[0], K) : 0, act[1] ? act_row_bytes(act[1], K) : 0};
    std::vector<uint8_t> xq0(ab[0] * M), xq1(ab[1] * M);
    uint8_t* xq[2] = {xq0.data(), xq1.data()};
    Call call;
    pool().run(2 * M, [&](int64_t i) {
        const int kind = (int)(i / M);
        if (act[kind]) quantize_row(act[kind], x + (i % M) * K, K, xq[kind] + (i % M) * ab[kind]);
    });
    pool().run(first_item[n], [&](int64_t it) {
        int j = 0;
        while (it >= first_item[j + 1]) j++;
        const Type* tj = t[j];
        const int64_t N = Ns[j], rb = K / tj->block * tj->bytes, kind = tj->k_act, nb = K / tj->block;
        const int64_t r0 = (it - first_item[j]) * ROWS_PER_ITEM, r1 = std::min(N, r0 + ROWS_PER_ITEM);
        rows_times_tokens(tj, plain, ws[j], rb, nb, r0, r1, xq[kind], ab[kind], 0, M, outs[j], N);
    });
    return 0;
}
}  // namespace

extern "C" {

// out (M, N) = x (M, K) . W (N, row_bytes)^T; plain = 1 uses the plain C++ dots (for tests)
int qdot_gemv(int qtype, const uint8_t* w, int64_t N, int64_t row_bytes, const float* x, int64_t M, int64_t K,
              float* out, int plain) {
    const Type* t = find_type(qtype);
    if (!t || K % t->block || row_bytes != K / t->block * t->bytes) return -1;
    return gemv_many(1, &qtype, &w, &N, x, M, K, &out, plain != 0);
}

// The interleaved (R16) form of a plain matrix (N, row bytes), or back (unpack = 1): dst
// has src's size and must not overlap it. Returns the interleaved type id (qtype | 0x100), -1 when the type
// has no interleaved form or row_bytes is not whole blocks.
int qdot_repack(int qtype, const uint8_t* src, int64_t N, int64_t row_bytes, uint8_t* dst, int unpack) {
    const R16Layout* L = (qtype & R16) ? nullptr : r16_layout(qtype);
    if (!L || row_bytes % L->bytes) return -1;
    const int64_t nb = row_bytes / L->bytes, full = N / 16 * 16, per_item = 64;  // groups a thread takes
    std::memcpy(dst + full * row_bytes, src + full * row_bytes, (N - full) * row_bytes);  // plain tail
    Call call;
    pool().run((N / 16 + per_item - 1) / per_item, [&](int64_t it) {
        r16_groups(*L, src, dst, nb, it * per_item, std::min(N / 16, (it + 1) * per_item), unpack != 0);
    });
    return qtype | R16;
}

// gemv over n matrices that share one input (q / k / v, q_a / kv_a) in one call: per-call costs matter,
// a decode step calls dozens of 1-10 MB GEMVs
int qdot_gemv_multi(int n, const int* qtypes, const uint8_t* const* ws, const int64_t* Ns, const float* x, int64_t M,
                    int64_t K, float* const* outs) {
    return gemv_many(n, qtypes, ws, Ns, x, M, K, outs, false);
}

// Batched GEMV, one matrix per batch entry (MLA's per-head W_UK / W_UV, llama.cpp's attn_k_b / attn_v_b):
// out[b] (M, N) = x[b] (M, K) . W[b]^T for b < B, W (B, N, row_bytes) contiguous; an interleaved type needs
// N % 16 == 0 (each head's rows are whole 16-row groups). One call: the activations quantised once, one
// parallel region over every head's row blocks.
int qdot_gemv_batched(int qtype, const uint8_t* w, int64_t B, int64_t N, int64_t row_bytes, const float* x,
                      int64_t M, int64_t K, float* out) {
    const Type* t = find_type(qtype);
    if (!t || K % t->block || row_bytes != K / t->block * t->bytes || (t->r16 && N % 16)) return -1;
    const int64_t ab = act_row_bytes(t, K), nb = K / t->block, per_head = (N + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    std::vector<uint8_t> xq(ab * B * M);
    Call call;
    pool().run(B * M, [&](int64_t i) { quantize_row(t, x + i * K, K, xq.data() + i * ab); });
    pool().run(B * per_head, [&](int64_t it) {
        const int64_t b = it / per_head, r0 = (it % per_head) * ROWS_PER_ITEM, r1 = std::min(N, r0 + ROWS_PER_ITEM);
        rows_times_tokens(t, false, w + b * N * row_bytes, row_bytes, nb, r0, r1, xq.data() + b * M * ab, ab, 0, M,
                          out + b * M * N, N);
    });
    return 0;
}

// Expert FFNs of P (token, expert) rows grouped by expert: rows starts[g]..starts[g+1] of x (P, H) go
// through local expert eids[g]: y[p] = down(silu(gate x_p) * up x_p). gate / up are (E, I, H-row bytes)
// and down (E, H, I-row bytes), contiguous. Each expert's rows are read once for all its tokens.
}  // extern "C"

namespace {
// An expert FFN's types and row bytes: gate / up rows of H values, down rows of I; false when a type has
// no kernel here or a row is not a whole number of its blocks.
bool ffn_types(int qg, int qu, int qd, int64_t H, int64_t I, const Type*& tg, const Type*& tu, const Type*& td,
               int64_t& gb, int64_t& ub, int64_t& db) {
    tg = find_type(qg), tu = find_type(qu), td = find_type(qd);
    if (!tg || !tu || !td || H % tg->block || H % tu->block || I % td->block) return false;
    gb = H / tg->block * tg->bytes, ub = H / tu->block * tu->bytes, db = I / td->block * td->bytes;
    return true;
}

// qdot_moe over groups given by their matrices' addresses: gate[g], up[g] (I, H-row bytes), down[g]
// (H, I-row bytes), all of the same types and shapes (the routed experts, and a shared expert with them)
// Scratch that is written before it is read: no zero-fill (a prefill chunk's buffers are hundreds of MB).
template <class T>
std::unique_ptr<T[]> scratch(int64_t n) { return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]); }

// Rows of P (token, expert) pairs: pair p reads row src[p] of x (X rows), or row p when src is null. Each
// x row is quantised once and its quantised bytes gathered per pair (a token reaches K experts: gathering
// floats and quantising each copy cost ~20 % of a prefill chunk).
int moe_groups(const float* x, int64_t X, const int64_t* src, int64_t P, int64_t H, int64_t I, const int64_t* starts,
               int64_t G, const uint8_t* const* gate, int qg, const uint8_t* const* up, int qu,
               const uint8_t* const* down, int qd, float* h, float* y) {
    const Type *tg, *tu, *td;
    int64_t gb, ub, db;
    if (!ffn_types(qg, qu, qd, H, I, tg, tu, td, gb, ub, db)) return -1;
    const int64_t agb = act_row_bytes(tg, H), aub = act_row_bytes(tu, H), adb = act_row_bytes(td, I);
    const bool same = tg->k_act == tu->k_act;
    const int64_t R = src ? X : P;  // rows quantised
    auto qg_rows = scratch<uint8_t>(agb * R), qu_rows = scratch<uint8_t>(same ? 0 : aub * R);
    auto hq = scratch<uint8_t>(adb * P);
    Call call;
    pool().run(R, [&](int64_t r) {
        quantize_row(tg, x + r * H, H, qg_rows.get() + r * agb);
        if (!same) quantize_row(tu, x + r * H, H, qu_rows.get() + r * aub);
    });
    std::unique_ptr<uint8_t[]> xg_pairs, xu_pairs;
    if (src) {
        xg_pairs = scratch<uint8_t>(agb * P), xu_pairs = scratch<uint8_t>(same ? 0 : aub * P);
        pool().run((P + 63) / 64, [&](int64_t it) {
            for (int64_t p = it * 64; p < std::min(P, it * 64 + 64); p++) {
                std::memcpy(xg_pairs.get() + p * agb, qg_rows.get() + src[p] * agb, agb);
                if (!same) std::memcpy(xu_pairs.get() + p * aub, qu_rows.get() + src[p] * aub, aub);
            }
        });
    }
    const uint8_t* xg = src ? xg_pairs.get() : qg_rows.get();
    const uint8_t* xup = same ? xg : (src ? xu_pairs.get() : qu_rows.get());
    const int64_t ni = (I + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, nh = (H + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    // gate and up rows are separate items, each one weight stream (two interleaved streams per thread
    // were ~25 % slower at one token per expert, measured against the same rows through gemv_multi)
    auto hu_buf = scratch<float>(P * I);
    float* hu = hu_buf.get();
    pool().run(2 * G * ni, [&](int64_t it) {
        const bool is_up = it >= G * ni;
        const int64_t jt = is_up ? it - G * ni : it;
        const int64_t g = jt / ni, r0 = jt % ni * ROWS_PER_ITEM, r1 = std::min(I, r0 + ROWS_PER_ITEM);
        const Type* t = is_up ? tu : tg;
        const int64_t rb = is_up ? ub : gb, ab = is_up ? aub : agb;
        const uint8_t* w = (is_up ? up : gate)[g];
        const uint8_t* xa = is_up ? xup : xg;
        rows_times_tokens(t, false, w, rb, H / t->block, r0, r1, xa, ab, starts[g], starts[g + 1], is_up ? hu : h, I);
    });
    pool().run(P, [&](int64_t p) {
        float* hp = h + p * I;
        const float* up_p = hu + p * I;
        for (int64_t i = 0; i < I; i++) hp[i] = silu(hp[i]) * up_p[i];
        quantize_row(td, hp, I, hq.get() + p * adb);
    });
    pool().run(G * nh, [&](int64_t it) {
        const int64_t g = it / nh, r0 = it % nh * ROWS_PER_ITEM, r1 = std::min(H, r0 + ROWS_PER_ITEM);
        rows_times_tokens(td, false, down[g], db, I / td->block, r0, r1, hq.get(), adb, starts[g], starts[g + 1], y, H);
    });
    return 0;
}
}  // namespace

extern "C" {

int qdot_moe(const float* x, int64_t P, int64_t H, int64_t I, const int64_t* starts, const int64_t* eids, int64_t G,
             const uint8_t* gate, int qg, const uint8_t* up, int qu, const uint8_t* down, int qd, float* h, float* y) {
    const Type *tg, *tu, *td;
    int64_t gb, ub, db;
    if (!ffn_types(qg, qu, qd, H, I, tg, tu, td, gb, ub, db)) return -1;
    std::vector<const uint8_t*> gp(G), upp(G), dp(G);
    for (int64_t g = 0; g < G; g++)
        gp[g] = gate + eids[g] * I * gb, upp[g] = up + eids[g] * I * ub, dp[g] = down + eids[g] * H * db;
    return moe_groups(x, P, nullptr, P, H, I, starts, G, gp.data(), qg, upp.data(), qu, dp.data(), qd, h, y);
}

// out (T, H) = sum over k of w[t, k] * FFN_e(x_t), e = loc[t, k] a local expert index (-1: held elsewhere,
// skipped). The grouping by expert, the gather of x rows and the weighted sum happen here, so a decode
// step's MoE layer is one call from Python (each torch op there costs microseconds). Sums run in k order.
// shared_gate / shared_up / shared_down (I, row bytes) of the experts' types, or null: a shared expert
// every token goes through with weight 1, run inside the same parallel regions as the routed ones.
int qdot_moe_topk(const float* x, int64_t T, int64_t K, const int64_t* loc, const float* wts, int64_t E, int64_t H,
                  int64_t I, const uint8_t* gate, int qg, const uint8_t* up, int qu, const uint8_t* down, int qd,
                  const uint8_t* shared_gate, const uint8_t* shared_up, const uint8_t* shared_down, float* out) {
    const Type *tg, *tu, *td;
    int64_t gb, ub, db;
    if (!ffn_types(qg, qu, qd, H, I, tg, tu, td, gb, ub, db)) return -1;
    const bool shared = shared_gate && shared_up && shared_down;
    std::vector<int64_t> count(E + 1, 0);
    for (int64_t i = 0; i < T * K; i++) {
        if (loc[i] >= E) return -2;
        if (loc[i] >= 0) count[loc[i] + 1]++;
    }
    std::vector<int64_t> first(E + 1, 0), starts, eids;  // pairs of expert e at first[e]..first[e+1]
    for (int64_t e = 0; e < E; e++) {
        first[e + 1] = first[e] + count[e + 1];
        if (count[e + 1]) starts.push_back(first[e]), eids.push_back(e);
    }
    const int64_t P = first[E], Pall = P + (shared ? T : 0);  // the shared expert's rows come last
    std::vector<const uint8_t*> gp, upp, dp;
    for (int64_t e : eids) gp.push_back(gate + e * I * gb), upp.push_back(up + e * I * ub), dp.push_back(down + e * H * db);
    if (shared) starts.push_back(P), gp.push_back(shared_gate), upp.push_back(shared_up), dp.push_back(shared_down);
    starts.push_back(Pall);
    // pair rows in expert order (the shared expert's last); src: the token each pair row reads
    std::vector<int64_t> slot(T * K, -1), fill(first.begin(), first.end() - 1), src(Pall);
    for (int64_t i = 0; i < T * K; i++)
        if (loc[i] >= 0) slot[i] = fill[loc[i]]++, src[slot[i]] = i / K;
    for (int64_t t = 0; shared && t < T; t++) src[P + t] = t;
    auto h = scratch<float>(Pall * I), y = scratch<float>(Pall * H);
    if (Pall) {
        const int rc = moe_groups(x, T, src.data(), Pall, H, I, starts.data(), (int64_t)gp.size(), gp.data(), qg,
                                  upp.data(), qu, dp.data(), qd, h.get(), y.get());
        if (rc) return rc;
    }
    Call call;
    pool().run(T, [&](int64_t t) {
        float* o = out + t * H;
        std::memset(o, 0, H * sizeof(float));
        for (int64_t k = 0; k < K; k++) {
            const int64_t p = slot[t * K + k];
            if (p < 0) continue;
            const float w = wts[t * K + k];
            const float* yp = y.get() + p * H;
            for (int64_t j = 0; j < H; j++) o[j] += w * yp[j];
        }
        if (shared) {  // added last, as routed + shared(x) would be: the same sums in the same order
            const float* ys = y.get() + (P + t) * H;
            for (int64_t j = 0; j < H; j++) o[j] += ys[j];
        }
    });
    return 0;
}

}  // extern "C"
