// Interleaved ("R16") layouts of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and of the K-quants and IQ4_XS, and their
// kernels (those of Q6_K and after in repack_k.h).
// Part of qdot.cpp (one translation unit): included there, in this order.
//
// A row-by-row dot product spends ~10 instructions on every 32 weights of the 32-value types (a 256-bit
// dot, a scalar scale, a broadcast, a horizontal sum at the end) and ~45 on Q4_K's 256 (the 6-bit scales
// unpacked per row): on a 2-core Zen 4 they ran at 14-28 GB/s where the same cores read 40+ GB/s. Here
// 16 rows are interleaved block by block, so that one vpdpbusd takes 4 weights of each of the 16 rows
// (int32 lane j = row j) against 4 broadcast activations, the 16 rows' scales are unpacked as vectors,
// and no horizontal sum is left.
//
// Layout of a matrix (N, row bytes): every full group of 16 rows (rows 16g..16g+15, the same bytes the
// plain rows took) holds, per block b, 16 * block-bytes bytes made of "fields": a field of w bytes (2 or
// 4) at offset p of a plain block sits at offset q + w * j of the group block for row j. The fields:
//   32-value types  d (16 fp16) at 0; Q4_1 / Q5_1 m at 32; then the quants, 4 bytes a row per 64-byte
//                   vector (Q8_0: 8 vectors, values 4k..4k+3, each XOR 0x80 = value + 128; 4-bit: 4
//                   vectors, plain bytes 4c..4c+3: low nibbles values 4c.., high nibbles 16 + 4c..);
//                   Q5_0 / Q5_1 qh: eight 64-bit masks, bit 4j + v of mask k the fifth bit of row j's
//                   value 4k + v (the one field moved bit by bit)
//   Q4_K            d at 0, dmin at 32, scale bytes 0-3 / 4-7 / 8-11 at 64 / 128 / 192, then 32 vectors
//                   of quants: vector 8c + t holds plain qs bytes 32c + 4t..+3 (low nibbles: values
//                   4t.. of sub-block 2c, high: of sub-block 2c + 1)
//   Q6_K            d at 0, scale bytes 4i..4i+3 at 32 + 64 i (i < 4), then 4 chunks of 12 vectors at
//                   288 + 768c (n = c / 2, u = 4 (c % 2) + t): at +64t qh bytes 32n + 4u..+3, at +256 + 64t
//                   ql bytes 64n + 4u..+3, at +512 + 64t ql bytes 64n + 32 + 4u..+3 (the order they are read)
//   IQ4_XS          d at 0, scales_h at 32, scales_l at 64, 32 vectors of qs at 128 (vector v: plain qs
//                   bytes 4v..4v+3: low nibbles values 32 (v / 4) + 4 (v % 4).., high nibbles 16 further)
//   Q2_K            d at 0, dmin at 32, scale bytes 4i..4i+3 at 64 + 64 i, 16 vectors of qs at 320 (vector v:
//                   plain qs bytes 4v..4v+3)
//   Q3_K            d at 0, scale bytes 4i..4i+3 at 32 + 64 i (i < 3), then in the order they are read
//                   (vector t < 4 of a run: bytes 4t..4t+3 of it): hmask bytes 0-15 at 224, qs bytes 0-15
//                   at 480, hmask 16-31 at 736, qs 16-31 at 992, qs 32-47 at 1248, qs 48-63 at 1504
//   Q5_K            as Q4_K up to 256, then 8 vectors of qh (vector t: qh bytes 4t..4t+3), then Q4_K's 32
//                   vectors of qs at 768
// The N % 16 tail rows stay plain. Repacking is lossless (unpack gives the file's bytes back, tested) and
// keeps the size: 16 * block bytes per group block in every type.

#pragma once

#include "common.h"
#include "dots_plain.h"

namespace {

constexpr Q32 Q32_8_0{34, -1, -1, 2, 128};  // Q8_0 in the Q32 terms: 8-bit values, stored + 128 here

constexpr bool eight_bit(const Q32& F) { return F.bytes == 34; }
constexpr int r16_qh(const Q32& F) { return F.m >= 0 ? 64 : 32; }
constexpr int r16_qs(const Q32& F) { return r16_qh(F) + (F.qh >= 0 ? 64 : 0); }

struct Field {
    int plain, packed, width;
    uint32_t flip;
};

struct R16Layout {
    int bytes = 0;  // of a plain block
    Field fields[64];
    int n = 0;
    int qh_plain = -1, qh_packed = -1;  // Q5_0 / Q5_1: the bit-moved field
    void add(int p, int q, int w, uint32_t flip = 0) { fields[n++] = {p, q, w, flip}; }
};

R16Layout q32_layout(const Q32& F) {
    R16Layout L;
    L.bytes = F.bytes;
    L.add(0, 0, 2);
    if (F.m >= 0) L.add(F.m, 32, 2);
    for (int v = 0; v < (eight_bit(F) ? 8 : 4); v++) L.add(F.qs + 4 * v, r16_qs(F) + 64 * v, 4, eight_bit(F) ? 0x80808080u : 0);
    if (F.qh >= 0) L.qh_plain = F.qh, L.qh_packed = r16_qh(F);
    return L;
}

R16Layout q4_k_layout() {
    R16Layout L;
    L.bytes = 144;
    L.add(0, 0, 2), L.add(2, 32, 2), L.add(4, 64, 4), L.add(8, 128, 4), L.add(12, 192, 4);
    for (int v = 0; v < 32; v++) L.add(16 + 4 * v, 256 + 64 * v, 4);
    return L;
}

R16Layout q6_k_layout() {
    R16Layout L;
    L.bytes = 210;
    L.add(208, 0, 2);
    for (int i = 0; i < 4; i++) L.add(192 + 4 * i, 32 + 64 * i, 4);
    for (int c = 0; c < 4; c++)  // chunk c = 2n + h: the 12 vectors the kernel reads together, in order
        for (int t = 0; t < 4; t++) {
            const int n = c / 2, u = 4 * (c % 2) + t, q = 288 + 768 * c + 64 * t;
            L.add(128 + 4 * (8 * n + u), q, 4);             // qh bytes of values 128n + 4u.. (+ 32r)
            L.add(4 * (16 * n + u), q + 256, 4);            // ql: values 128n + 4u.. and 64 further
            L.add(4 * (16 * n + 8 + u), q + 512, 4);        // ql: values 128n + 32 + 4u.. and 64 further
        }
    return L;
}

R16Layout iq4_xs_layout() {
    R16Layout L;
    L.bytes = 136;
    L.add(0, 0, 2), L.add(2, 32, 2), L.add(4, 64, 4);
    for (int v = 0; v < 32; v++) L.add(8 + 4 * v, 128 + 64 * v, 4);
    return L;
}

R16Layout q2_k_layout() {
    R16Layout L;
    L.bytes = 84;
    L.add(80, 0, 2), L.add(82, 32, 2);
    for (int i = 0; i < 4; i++) L.add(4 * i, 64 + 64 * i, 4);
    for (int v = 0; v < 16; v++) L.add(16 + 4 * v, 320 + 64 * v, 4);
    return L;
}

R16Layout q3_k_layout() {
    R16Layout L;
    L.bytes = 110;
    L.add(108, 0, 2);
    for (int i = 0; i < 3; i++) L.add(96 + 4 * i, 32 + 64 * i, 4);
    const int run[6][2] = {{0, 224}, {32, 480}, {16, 736}, {48, 992}, {64, 1248}, {80, 1504}};  // plain -> packed
    for (const auto& r : run)
        for (int t = 0; t < 4; t++) L.add(r[0] + 4 * t, r[1] + 64 * t, 4);
    return L;
}

R16Layout q5_k_layout() {
    R16Layout L;
    L.bytes = 176;
    L.add(0, 0, 2), L.add(2, 32, 2), L.add(4, 64, 4), L.add(8, 128, 4), L.add(12, 192, 4);
    for (int v = 0; v < 8; v++) L.add(16 + 4 * v, 256 + 64 * v, 4);
    for (int v = 0; v < 32; v++) L.add(48 + 4 * v, 768 + 64 * v, 4);
    return L;
}

// the layout of a plain type that has an interleaved form, else null
const R16Layout* r16_layout(int type) {
    static const R16Layout q80 = q32_layout(Q32_8_0), q40 = q32_layout(Q32_4_0), q41 = q32_layout(Q32_4_1),
                           q50 = q32_layout(Q32_5_0), q51 = q32_layout(Q32_5_1), q4k = q4_k_layout(),
                           q6k = q6_k_layout(), iq4xs = iq4_xs_layout(), q2k = q2_k_layout(), q3k = q3_k_layout(),
                           q5k = q5_k_layout();
    switch (type) {
        case Q8_0: return &q80;
        case Q4_0: return &q40;
        case Q4_1: return &q41;
        case Q5_0: return &q50;
        case Q5_1: return &q51;
        case Q4_K: return &q4k;
        case Q6_K: return &q6k;
        case IQ4_XS: return &iq4xs;
        case Q2_K: return &q2k;
        case Q3_K: return &q3k;
        case Q5_K: return &q5k;
        default: return nullptr;
    }
}

// One block of 16 rows between the plain layout (rows[j] = row j's block) and a group block g.
void r16_block(const R16Layout& L, uint8_t* const rows[16], uint8_t* g, bool unpack) {
    // fixed-size moves (a variable-size memcpy per field and row made a Q4_K load take 15 s for 1.7 GB)
    auto move = [&](const Field& F, auto word) {
        for (int j = 0; j < 16; j++) {
            uint8_t* plain = rows[j] + F.plain;
            uint8_t* packed = g + F.packed + (int)sizeof(word) * j;
            std::memcpy(&word, unpack ? packed : plain, sizeof(word));
            word ^= (decltype(word))F.flip;
            std::memcpy(unpack ? plain : packed, &word, sizeof(word));
        }
    };
    for (int f = 0; f < L.n; f++) {
        if (L.fields[f].width == 2)
            move(L.fields[f], (uint16_t)0);
        else
            move(L.fields[f], (uint32_t)0);
    }
    if (L.qh_plain >= 0) {  // mask k holds, at bits 4j..4j+3, bits 4k..4k+3 of row j's qh
        uint64_t mask[8] = {0};
        if (unpack) std::memcpy(mask, g + L.qh_packed, sizeof mask);
        for (int j = 0; j < 16; j++) {
            uint32_t qh = 0;
            if (!unpack) std::memcpy(&qh, rows[j] + L.qh_plain, 4);
            for (int k = 0; k < 8; k++) {
                if (unpack)
                    qh |= (uint32_t)((mask[k] >> (4 * j)) & 0xF) << (4 * k);
                else
                    mask[k] |= (uint64_t)((qh >> (4 * k)) & 0xF) << (4 * j);
            }
            if (unpack) std::memcpy(rows[j] + L.qh_plain, &qh, 4);
        }
        if (!unpack) std::memcpy(g + L.qh_packed, mask, sizeof mask);
    }
}

// Groups g0..g1 of a matrix of nb blocks a row: plain src -> interleaved dst, or back (unpack). The tail
// rows (N % 16) are the caller's.
void r16_groups(const R16Layout& L, const uint8_t* src, uint8_t* dst, int64_t nb, int64_t g0, int64_t g1, bool unpack) {
    const int64_t rb = nb * L.bytes;
    for (int64_t r0 = 16 * g0; r0 < 16 * g1; r0 += 16) {
        uint8_t* plain = unpack ? dst + r0 * rb : const_cast<uint8_t*>(src + r0 * rb);
        uint8_t* packed = unpack ? const_cast<uint8_t*>(src + r0 * rb) : dst + r0 * rb;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t* rows[16];
            for (int j = 0; j < 16; j++) rows[j] = plain + j * rb + b * L.bytes;
            r16_block(L, rows, packed + b * 16 * L.bytes, unpack);
        }
    }
}

// Bytes ahead the Q4_K group kernel prefetches each group block into L2 (0: none), set at load
// (native.prefetch_ahead: what `offload probe` measured best here, else 9 KB). A group block is a burst of
// loads then hundreds of cycles of dot products: with the hardware prefetchers alone 2 Zen 4 cores read it
// from DRAM at ~0.8x of a plain 2-thread read when the neighbours are busy. Into L2 (prefetcht1), every line
// 9 KB ahead, in turns: 1.15-1.36x in busy phases, 0.97-1.08x in quiet ones (15 runs; the fused expert call
// 0.93-1.24x), at 1.0-1.1x of the plain read; every 2nd line only: 0.91-0.98x. Into L1 (t0), as before, it cost
// 1.4x on the same VM (probably: each line held an L1 miss buffer until DRAM answered), though it once doubled
// Q4_K. The other kernels issue none: Q8_0 with it 0.88-0.96x, Q4_0 / Q5_0 1.05x, Q6_K 0.89-1.30x, mostly 1.0x.
inline int prefetch_ahead = 0;

#if QDOT_VNNI
// 4 activation bytes broadcast to every int32 lane, straight from memory (through a general register, as
// the compiler did for a copied int32 array, the broadcasts took more uops than the dot products)
inline __m512i bcast4(const int8_t* p) { return _mm512_broadcastd_epi32(_mm_loadu_si32(p)); }

// 32-value types: a group of 16 rows against NT token rows -> out[16 m + j]
template <const Q32& F, int NT>
void r16_q32(const uint8_t* g, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16), zero = _mm512_setzero_si512();
    __m512 acc[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, g += 16 * F.bytes) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)g));
        const __m512 mn = F.m >= 0 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g + 32))) : d;
        __m512i q[8];  // q[k]: values 4k..4k+3 of the 16 rows, unsigned
        if (eight_bit(F)) {
            for (int k = 0; k < 8; k++) q[k] = _mm512_loadu_si512(g + r16_qs(F) + 64 * k);
        } else {
            for (int c = 0; c < 4; c++) {
                const __m512i raw = _mm512_loadu_si512(g + r16_qs(F) + 64 * c);
                q[c] = _mm512_and_si512(raw, m4);
                q[c + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            }
            if (F.qh >= 0)
                for (int k = 0; k < 8; k++) {
                    uint64_t bits;
                    std::memcpy(&bits, g + r16_qh(F) + 8 * k, 8);
                    q[k] = _mm512_mask_add_epi8(q[k], _cvtu64_mask64(bits), q[k], sixteen);
                }
        }
        for (int m = 0; m < NT; m++) {
            const A80& a = ((const A80*)(act + m * astride))[b];
            // the value offset (Q8_0's +128, Q4_0's 8, Q5_0's 16) comes off through the activation sum
            __m512i s0 = _mm512_set1_epi32(-F.offset * a.sum), s1 = zero;
            for (int k = 0; k < 8; k += 2) {  // two chains: a vpdpbusd's latency is 4-5 cycles
                s0 = _mm512_dpbusd_epi32(s0, q[k], bcast4(a.qs + 4 * k));
                s1 = _mm512_dpbusd_epi32(s1, q[k + 1], bcast4(a.qs + 4 * k + 4));
            }
            const __m512i sumi = _mm512_add_epi32(s0, s1);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_mul_ps(d, _mm512_set1_ps(a.d)), acc[m]);
            if (F.m >= 0) acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.d * (float)a.sum), acc[m]);
        }
    }
    for (int m = 0; m < NT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

// Q4_K: per chunk c (sub-blocks 2c, 2c + 1) eight vectors give 16 operands; four vpdpbusd (16 values,
// |lane| <= 16 * 15 * 127 < 2^15) then one vpdpwssd by the rows' int16 scales, exact. Mins: the rows'
// mins times the activation's 32-value sums, through vpdpwssd as well.
template <int NT>
void r16_q4_k(const uint8_t* g, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m6 = _mm512_set1_epi32(63), lo4 = _mm512_set1_epi32(0xF);
    const __m512i three = _mm512_set1_epi32(3), zero = _mm512_setzero_si512();
    __m512 acc[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps();
    const int pf = prefetch_ahead;  // read once: the loop keeps it in a register
    for (int64_t b = 0; b < nb; b++, g += 16 * 144) {
        if (pf)
            for (int l = 0; l < 16 * 144; l += 64) _mm_prefetch((const char*)(g + pf + l), _MM_HINT_T1);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)g));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g + 32)));
        const __m512i u0 = _mm512_loadu_si512(g + 64), u1 = _mm512_loadu_si512(g + 128), u2 = _mm512_loadu_si512(g + 192);
        __m512i sc[8], mn[8];  // per sub-block, the 16 rows' 6-bit scale and min (int32 lanes, high half 0)
        for (int s = 0; s < 4; s++) {
            sc[s] = _mm512_and_si512(_mm512_srli_epi32(u0, 8 * s), m6);
            mn[s] = _mm512_and_si512(_mm512_srli_epi32(u1, 8 * s), m6);
            sc[s + 4] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u2, 8 * s), lo4),
                                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u0, 8 * s + 6), three), 4));
            mn[s + 4] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u2, 8 * s + 4), lo4),
                                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u1, 8 * s + 6), three), 4));
        }
        // few tokens: two accumulator chains (16 dependent vpdpwssd a block were the critical path)
        constexpr int CH = NT <= 4 ? 2 : 1;
        __m512i sumi[NT][CH], summ[NT];
        for (int m = 0; m < NT; m++) {
            const A8K& a = ((const A8K*)(act + m * astride))[b];
            summ[m] = zero;
            for (int s = 0; s < 8; s++)  // the 32-value sum in an int16 (|.| <= 4064) against int16 mins
                summ[m] = _mm512_dpwssd_epi32(summ[m], mn[s], _mm512_set1_epi32(a.bsums[2 * s] + a.bsums[2 * s + 1]));
            for (int h = 0; h < CH; h++) sumi[m][h] = zero;
        }
        const uint8_t* qs = g + 256;
        for (int c = 0; c < 4; c++) {
            __m512i lo[8], hi[8];
            for (int t = 0; t < 8; t++) {
                const __m512i raw = _mm512_loadu_si512(qs + 64 * (8 * c + t));
                lo[t] = _mm512_and_si512(raw, m4);
                hi[t] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
            }
            for (int m = 0; m < NT; m++) {
                const A8K& a = ((const A8K*)(act + m * astride))[b];
                const int8_t* av = a.qs + 64 * c;  // sub-block 2c's activations, then 2c + 1's
                __m512i s[4] = {zero, zero, zero, zero};  // lo first half, lo second, hi first, hi second
                for (int t = 0; t < 8; t++) {
                    s[t / 4] = _mm512_dpbusd_epi32(s[t / 4], lo[t], bcast4(av + 4 * t));
                    s[2 + t / 4] = _mm512_dpbusd_epi32(s[2 + t / 4], hi[t], bcast4(av + 32 + 4 * t));
                }
                sumi[m][0] = _mm512_dpwssd_epi32(sumi[m][0], s[0], sc[2 * c]);
                sumi[m][CH - 1] = _mm512_dpwssd_epi32(sumi[m][CH - 1], s[1], sc[2 * c]);
                sumi[m][0] = _mm512_dpwssd_epi32(sumi[m][0], s[2], sc[2 * c + 1]);
                sumi[m][CH - 1] = _mm512_dpwssd_epi32(sumi[m][CH - 1], s[3], sc[2 * c + 1]);
            }
        }
        for (int m = 0; m < NT; m++) {
            const float ad = ((const A8K*)(act + m * astride))[b].d;
            const __m512i si = CH == 2 ? _mm512_add_epi32(sumi[m][0], sumi[m][CH - 1]) : sumi[m][0];
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_mul_ps(d, _mm512_set1_ps(ad)), acc[m]);
            acc[m] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ[m]), _mm512_mul_ps(dmin, _mm512_set1_ps(ad)), acc[m]);
        }
    }
    for (int m = 0; m < NT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

template <int NT> struct R80 { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_q32<Q32_8_0, NT>(w, a, s, nb, o); } };
template <int NT> struct R40 { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_q32<Q32_4_0, NT>(w, a, s, nb, o); } };
template <int NT> struct R41 { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_q32<Q32_4_1, NT>(w, a, s, nb, o); } };
template <int NT> struct R50 { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_q32<Q32_5_0, NT>(w, a, s, nb, o); } };
template <int NT> struct R51 { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_q32<Q32_5_1, NT>(w, a, s, nb, o); } };
template <int NT> struct R4K { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_q4_k<NT>(w, a, s, nb, o); } };
#endif

}  // namespace
