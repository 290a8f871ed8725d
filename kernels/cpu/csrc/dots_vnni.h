// AVX-512 VNNI dot products: one weight row against up to 8 token rows, each block decoded once.
// Part of qdot.cpp (one translation unit): included there, in this order.

#pragma once

#include "common.h"

namespace {

#if QDOT_VNNI
// Each kernel takes NT token rows at once (act + m * astride, m < NT) and decodes every weight block
// once for all of them: at NT = 8 the per-block decoding costs an eighth per token.

inline __m512i idx16(int a, int b) {  // lanes 0-7 = a, 8-15 = b (which scale each int32 lane takes)
    return _mm512_inserti64x4(_mm512_set1_epi32(a), _mm256_set1_epi32(b), 1);
}

inline float hsum256(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

// Two accumulators per token, even and odd blocks (the loop body is written twice so they stay in
// registers): with one token a single fmadd chain (4 cycles a block) was the limit.
template <int NT>
inline void q8_0_block(const uint8_t* w, const uint8_t* act, int64_t astride, int64_t b, __m256* acc) {
    const __m256i zero = _mm256_setzero_si256();
    const __m256i qw = _mm256_loadu_si256((const __m256i*)(w + 2));
    const __m256i aw = _mm256_abs_epi8(qw);  // s8 x s8 through u8 x s8: |w| times a with w's sign
    const __mmask32 neg = _mm256_movepi8_mask(qw);
    const float dw = fp16(w);
    for (int m = 0; m < NT; m++) {
        const A80& a = ((const A80*)(act + m * astride))[b];
        const __m256i qa = _mm256_loadu_si256((const __m256i*)a.qs);
        const __m256i s = _mm256_dpbusd_epi32(zero, aw, _mm256_mask_sub_epi8(qa, neg, zero, qa));
        acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d), _mm256_cvtepi32_ps(s), acc[m]);
    }
}

template <int NT>
void dot_q8_0_vnni(const uint8_t* w, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    __m256 acc0[NT], acc1[NT];
    for (int m = 0; m < NT; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        q8_0_block<NT>(w + b * 34, act, astride, b, acc0);
        q8_0_block<NT>(w + (b + 1) * 34, act, astride, b + 1, acc1);
    }
    if (b < nb) q8_0_block<NT>(w + b * 34, act, astride, b, acc0);
    for (int m = 0; m < NT; m++) out[m] = hsum256(_mm256_add_ps(acc0[m], acc1[m]));
}

template <const Q32& F, int NT>
inline void q32_block(const uint8_t* w, const uint8_t* act, int64_t astride, int64_t b, __m256* acc, float* corr) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i q = _mm_loadu_si128((const __m128i*)(w + F.qs));
    __m256i qw = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
    if (F.qh >= 0) {  // bit e of qh is the fifth bit of value e: the 32-bit word is a byte mask
        uint32_t qh;
        std::memcpy(&qh, w + F.qh, 4);
        qw = _mm256_mask_add_epi8(qw, (__mmask32)qh, qw, _mm256_set1_epi8(16));
    }
    const float dw = fp16(w), mw = F.m >= 0 ? fp16(w + F.m) : 0.f;
    for (int m = 0; m < NT; m++) {
        const A80& a = ((const A80*)(act + m * astride))[b];
        // the value offset (Q4_0: 8, Q5_0: 16) comes off in integers, through the activation sum
        const __m256i s0 = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-F.offset * a.sum));
        const __m256i s = _mm256_dpbusd_epi32(s0, qw, _mm256_loadu_si256((const __m256i*)a.qs));
        acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d), _mm256_cvtepi32_ps(s), acc[m]);
        if (F.m >= 0) corr[m] += mw * a.d * (float)a.sum;  // the min (Q4_1, Q5_1)
    }
}

template <const Q32& F, int NT>
void dot_q32_vnni(const uint8_t* w, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    __m256 acc0[NT], acc1[NT];
    float corr[NT];
    for (int m = 0; m < NT; m++) acc0[m] = acc1[m] = _mm256_setzero_ps(), corr[m] = 0;
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        q32_block<F, NT>(w + b * F.bytes, act, astride, b, acc0, corr);
        q32_block<F, NT>(w + (b + 1) * F.bytes, act, astride, b + 1, acc1, corr);
    }
    if (b < nb) q32_block<F, NT>(w + b * F.bytes, act, astride, b, acc0, corr);
    for (int m = 0; m < NT; m++) out[m] = hsum256(_mm256_add_ps(acc0[m], acc1[m])) + corr[m];
}

// Q4_K / Q5_K: 64 bytes of nibbles hold sub-blocks (4t, 4t+1) in bytes 0-31 (low, high nibbles) and
// (4t+2, 4t+3) in bytes 32-63, so the low nibbles pair with activations [4t ; 4t+2], the high with
// [4t+1 ; 4t+3]; each int32 lane of vpdpbusd then belongs to one sub-block (lanes 0-7 / 8-15).
template <bool Q5, int NT>
void dot_k4_vnni(const uint8_t* w, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512(), sixteen = _mm512_set1_epi8(16);
    const __m512i ilo[2] = {idx16(0, 2), idx16(4, 6)}, ihi[2] = {idx16(1, 3), idx16(5, 7)};
    // Q5_K: the fifth bit of sub-block s is bit s of qh[l]
    const __m512i blo[2] = {_mm512_inserti64x4(_mm512_set1_epi8(1 << 0), _mm256_set1_epi8(1 << 2), 1),
                            _mm512_inserti64x4(_mm512_set1_epi8(1 << 4), _mm256_set1_epi8((char)(1 << 6)), 1)};
    const __m512i bhi[2] = {_mm512_inserti64x4(_mm512_set1_epi8(1 << 1), _mm256_set1_epi8(1 << 3), 1),
                            _mm512_inserti64x4(_mm512_set1_epi8(1 << 5), _mm256_set1_epi8((char)(1 << 7)), 1)};
    const int bytes = Q5 ? 176 : 144;
    __m512 acc[NT];
    __m256 accm[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps(), accm[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += bytes) {
        uint32_t u[3];
        std::memcpy(u, w + 4, 12);
        const uint64_t sc8 = (uint64_t)(u[0] & 0x3f3f3f3fu) |
                             (uint64_t)((u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4)) << 32;
        const uint64_t mn8 = (uint64_t)(u[1] & 0x3f3f3f3fu) |
                             (uint64_t)(((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4)) << 32;
        const __m512i sc = _mm512_cvtepu8_epi32(_mm_cvtsi64_si128((long long)sc8));
        const __m256i mn = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mn8));
        const uint8_t* qs = w + (Q5 ? 48 : 16);
        __m512i lo[2], hi[2], slo[2], shi[2];
        for (int t = 0; t < 2; t++) {
            const __m512i q = _mm512_loadu_si512(qs + 64 * t);
            lo[t] = _mm512_and_si512(q, m4);
            hi[t] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
            if (Q5) {
                const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(w + 16)));
                lo[t] = _mm512_mask_add_epi8(lo[t], _mm512_test_epi8_mask(qh, blo[t]), lo[t], sixteen);
                hi[t] = _mm512_mask_add_epi8(hi[t], _mm512_test_epi8_mask(qh, bhi[t]), hi[t], sixteen);
            }
            slo[t] = _mm512_permutexvar_epi32(ilo[t], sc);
            shi[t] = _mm512_permutexvar_epi32(ihi[t], sc);
        }
        const float d = fp16(w), dmin = fp16(w + 2);
        for (int m = 0; m < NT; m++) {
            const A8K& a = ((const A8K*)(act + m * astride))[b];
            const __m256i bsp = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)a.bsums), _mm256_set1_epi16(1));
            __m512i sumi = zero;
            for (int t = 0; t < 2; t++) {
                const __m512i ya = _mm512_loadu_si512(a.qs + 128 * t), yb = _mm512_loadu_si512(a.qs + 128 * t + 64);
                const __m512i dlo = _mm512_dpbusd_epi32(zero, lo[t], _mm512_shuffle_i64x2(ya, yb, _MM_SHUFFLE(1, 0, 1, 0)));
                const __m512i dhi = _mm512_dpbusd_epi32(zero, hi[t], _mm512_shuffle_i64x2(ya, yb, _MM_SHUFFLE(3, 2, 3, 2)));
                // a lane's sum is at most 4 * 31 * 127 < 2^15 and the scale's high half is 0: vpdpwssd
                // (int16 pairs) multiplies and accumulates exactly, cheaper than vpmulld + add
                sumi = _mm512_dpwssd_epi32(sumi, dlo, slo[t]);
                sumi = _mm512_dpwssd_epi32(sumi, dhi, shi[t]);
            }
            acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(d * a.d), _mm512_cvtepi32_ps(sumi), acc[m]);
            accm[m] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * a.d), _mm256_cvtepi32_ps(_mm256_mullo_epi32(bsp, mn)), accm[m]);
        }
    }
    for (int m = 0; m < NT; m++) out[m] = _mm512_reduce_add_ps(acc[m]) - hsum256(accm[m]);
}

// Q6_K: per 128 values, 64 bytes of low nibbles (values l and 32+l low, 64+l and 96+l high) and 32
// bytes of 2-bit highs (bit pairs 0, 2, 4, 6 for the four runs). Values are q - 32: the 32 x sum term
// comes from the activation's 16-value sums.
template <int NT>
void dot_q6_k_vnni(const uint8_t* w, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m3 = _mm512_set1_epi8(3), zero = _mm512_setzero_si512();
    const __m512i lo16 = _mm512_set1_epi32(0xFFFF);
    const __m512i sh_a = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    const __m512i sh_b = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(6), 1);
    // lane j of a vpdpbusd over values 4j..4j+3 of a 64-run belongs to the 16-value sub-block j/4
    const __m512i ia[2] = {_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                           _mm512_set_epi32(11, 11, 11, 11, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8)};
    const __m512i ib[2] = {_mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4),
                           _mm512_set_epi32(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12)};
    __m512 acc[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, w += 210) {
        const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + 192)));
        const __m512i sc16 = _mm512_and_si512(sc, lo16);  // int16 scale, high half 0, for vpdpwssd
        __m512i qa[2], qb[2], sa[2], sb[2];
        for (int n = 0; n < 2; n++) {
            const __m512i L = _mm512_loadu_si512(w + 64 * n);
            const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(w + 128 + 32 * n)));
            qa[n] = _mm512_or_si512(_mm512_and_si512(L, m4),
                                    _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(H, sh_a), m3), 4));
            qb[n] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4),
                                    _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(H, sh_b), m3), 4));
            sa[n] = _mm512_permutexvar_epi32(ia[n], sc16);
            sb[n] = _mm512_permutexvar_epi32(ib[n], sc16);
        }
        const float d = fp16(w + 208);
        for (int m = 0; m < NT; m++) {
            const A8K& a = ((const A8K*)(act + m * astride))[b];
            const __m512i bs = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)a.bsums));
            __m512i sumi = _mm512_sub_epi32(zero, _mm512_slli_epi32(_mm512_mullo_epi32(sc, bs), 5));
            for (int n = 0; n < 2; n++) {
                // |lane sum| <= 4 * 63 * 127 < 2^15: vpdpwssd is exact
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_dpbusd_epi32(zero, qa[n], _mm512_loadu_si512(a.qs + 128 * n)), sa[n]);
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_dpbusd_epi32(zero, qb[n], _mm512_loadu_si512(a.qs + 128 * n + 64)), sb[n]);
            }
            acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(d * a.d), _mm512_cvtepi32_ps(sumi), acc[m]);
        }
    }
    for (int m = 0; m < NT; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}

// The low-bit types: a block is unpacked, in registers, to 256 unsigned bytes u = value + offset (four
// zmm, values 64c..64c+63 in u[c]) and 16 int32 scales (one per 16 values), then dotted with vpdpbusd;
// offset * scale * (sum of the 16 activations) comes off through the activation's bsums. Q2_K also has
// per-16 mins (its values are u - min/scale). Unpacking through a memory buffer instead (256-bit stores,
// 512-bit reloads: no store forwarding) and scalar scale loops made these types 3-5x slower than Q4_K.
struct LowBits {
    __m512i u[4];
    __m512i sc;  // int32 scales
    __m512i mn;  // Q2_K mins (else 0)
    float d, dmin;
};

inline __m512i halves(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }

inline void unpack_q2_k(const uint8_t* w, LowBits& L) {
    // u[128n + 32j + l] = (q_n[l] >> 2j) & 3, q_n the 32 bytes at w + 16 + 32n: u[c] is j = 2(c%2), +1
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i shift[2] = {halves(_mm256_set1_epi16(0), _mm256_set1_epi16(2)),
                              halves(_mm256_set1_epi16(4), _mm256_set1_epi16(6))};
    for (int c = 0; c < 4; c++) {
        const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(w + 16 + 32 * (c / 2))));
        L.u[c] = _mm512_and_si512(_mm512_srlv_epi16(q, shift[c % 2]), m3);
    }
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w));
    L.sc = _mm512_and_si512(b, _mm512_set1_epi32(0xF));
    L.mn = _mm512_srli_epi32(b, 4);
    L.d = fp16(w + 80), L.dmin = fp16(w + 82);
}

inline void unpack_q3_k(const uint8_t* w, LowBits& L) {
    // value = ((q >> 2j) & 3) - (high bit ? 0 : 4), so value + 4 = ((q >> 2j) & 3) | high bit << 2,
    // the high bit of value 128n + 32j + l being bit 4n + j of hm[l]
    const __m512i m3 = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4);
    const __m512i shift[2] = {halves(_mm256_set1_epi16(0), _mm256_set1_epi16(2)),
                              halves(_mm256_set1_epi16(4), _mm256_set1_epi16(6))};
    const __m512i hm = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)w));
    for (int c = 0; c < 4; c++) {
        const int n = c / 2, j = 2 * (c % 2);
        const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(w + 32 + 32 * n)));
        const __m512i bit = halves(_mm256_set1_epi8((char)(1 << (4 * n + j))), _mm256_set1_epi8((char)(1 << (4 * n + j + 1))));
        const __m512i v = _mm512_and_si512(_mm512_srlv_epi16(q, shift[c % 2]), m3);
        L.u[c] = _mm512_or_si512(v, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(hm, bit), four));
    }
    // 16 six-bit scales: low 4 bits in s[0..7] (j < 8: low nibble, else high nibble of s[j - 8]),
    // high 2 bits in s[8 + j % 4] at bit 2 (j / 4)
    const uint8_t* sp = w + 96;
    uint64_t s8;
    uint32_t s4;
    std::memcpy(&s8, sp, 8);
    std::memcpy(&s4, sp + 8, 4);
    const __m512i lo_b = _mm512_cvtepu8_epi32(_mm_set_epi64x((long long)s8, (long long)s8));
    const __m512i lo = _mm512_and_si512(_mm512_srlv_epi32(lo_b, _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0)),
                                        _mm512_set1_epi32(0xF));
    const __m512i hsh = _mm512_set_epi32(30, 22, 14, 6, 28, 20, 12, 4, 26, 18, 10, 2, 24, 16, 8, 0);  // 8 (j%4) + 2 (j/4)
    const __m512i hi = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)s4), hsh), _mm512_set1_epi32(3));
    L.sc = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
    L.mn = _mm512_setzero_si512();
    L.d = fp16(w + 108), L.dmin = 0;
}

inline void unpack_iq4_xs(const uint8_t* w, LowBits& L) {
    // the 16-entry non-linear grid by pshufb, shifted by 128 into unsigned bytes; sub-block ib (32 values)
    // is the low nibbles then the high nibbles of its 16 bytes at w + 8 + 16 ib
    const __m512i grid = _mm512_broadcast_i32x4(_mm_setr_epi8((char)1, 24, 45, 63, 79, 93, 106, 118, (char)129,
                                                              (char)141, (char)153, (char)166, (char)181, (char)197,
                                                              (char)217, (char)241));
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i nib = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);  // 128-bit lanes: low, high, low, high
    for (int c = 0; c < 4; c++) {
        const __m512i q2 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(w + 8 + 32 * c)));
        const __m512i q = _mm512_shuffle_i64x2(q2, q2, _MM_SHUFFLE(1, 1, 0, 0));  // [ib, ib, ib+1, ib+1]
        L.u[c] = _mm512_shuffle_epi8(grid, _mm512_and_si512(_mm512_srlv_epi64(q, nib), m4));
    }
    uint16_t sh;
    uint32_t sl;
    std::memcpy(&sh, w + 2, 2);
    std::memcpy(&sl, w + 4, 4);
    const __m512i ib = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);  // scale j's sub-block
    const __m512i lo = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)sl), _mm512_slli_epi32(ib, 2)),
                                        _mm512_set1_epi32(0xF));
    const __m512i hi = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(sh), _mm512_slli_epi32(ib, 1)),
                                        _mm512_set1_epi32(3));
    L.sc = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
    L.mn = _mm512_setzero_si512();
    L.d = fp16(w), L.dmin = 0;
}

// OFFSET: u = value + OFFSET. SMALL: |a lane's vpdpbusd sum| < 2^15 (Q2_K, Q3_K), so the int16 scale
// multiplies it by vpdpwssd exactly; IQ4_XS's bytes reach 241 and take vpmulld.
template <void (*UNPACK)(const uint8_t*, LowBits&), int BYTES, int OFFSET, bool SMALL, int NT>
void dot_lowbits_vnni(const uint8_t* w, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i zero = _mm512_setzero_si512(), lo16 = _mm512_set1_epi32(0xFFFF);
    const __m512i idx[4] = {_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                            _mm512_set_epi32(7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4),
                            _mm512_set_epi32(11, 11, 11, 11, 10, 10, 10, 10, 9, 9, 9, 9, 8, 8, 8, 8),
                            _mm512_set_epi32(15, 15, 15, 15, 14, 14, 14, 14, 13, 13, 13, 13, 12, 12, 12, 12)};
    __m512 acc[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps();
    LowBits L;
    for (int64_t b = 0; b < nb; b++, w += BYTES) {
        UNPACK(w, L);
        // int16 halves with a zero high half: vpdpwssd against sign-extended int16 sums is then exact
        const __m512i sc16 = _mm512_and_si512(L.sc, lo16);
        const __m512i off16 = _mm512_and_si512(_mm512_mullo_epi32(L.sc, _mm512_set1_epi32(OFFSET)), lo16);
        __m512i s[4];
        for (int c = 0; c < 4; c++) s[c] = _mm512_permutexvar_epi32(idx[c], SMALL ? sc16 : L.sc);
        for (int m = 0; m < NT; m++) {
            const A8K& a = ((const A8K*)(act + m * astride))[b];
            const __m512i bs = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)a.bsums));
            __m512i sumi = OFFSET ? _mm512_sub_epi32(zero, _mm512_dpwssd_epi32(zero, bs, off16)) : zero;
            for (int c = 0; c < 4; c++) {
                const __m512i d = _mm512_dpbusd_epi32(zero, L.u[c], _mm512_loadu_si512(a.qs + 64 * c));
                sumi = SMALL ? _mm512_dpwssd_epi32(sumi, d, s[c]) : _mm512_add_epi32(sumi, _mm512_mullo_epi32(d, s[c]));
            }
            acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(L.d * a.d), _mm512_cvtepi32_ps(sumi), acc[m]);
            if (L.dmin != 0)  // Q2_K: mins 0..15, exact through vpdpwssd too
                acc[m] = _mm512_fnmadd_ps(_mm512_set1_ps(L.dmin * a.d),
                                          _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(zero, bs, L.mn)), acc[m]);
        }
    }
    for (int m = 0; m < NT; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}

// nt tokens in groups of up to 8 through the NT-templated kernel; OUT outputs a token (16: a row group)
template <template <int> class K, int OUT = 1>
void multi(const uint8_t* w, const uint8_t* act, int64_t astride, int nt, int64_t nb, float* out) {
    for (; nt >= 8; nt -= 8, act += 8 * astride, out += 8 * OUT) K<8>::run(w, act, astride, nb, out);
    switch (nt) {
        case 7: K<7>::run(w, act, astride, nb, out); break;
        case 6: K<6>::run(w, act, astride, nb, out); break;
        case 5: K<5>::run(w, act, astride, nb, out); break;
        case 4: K<4>::run(w, act, astride, nb, out); break;
        case 3: K<3>::run(w, act, astride, nb, out); break;
        case 2: K<2>::run(w, act, astride, nb, out); break;
        case 1: K<1>::run(w, act, astride, nb, out); break;
        default: break;
    }
}
template <int NT> struct Q80K { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_q8_0_vnni<NT>(w, a, s, nb, o); } };
template <int NT> struct Q40K { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_q32_vnni<Q32_4_0, NT>(w, a, s, nb, o); } };
template <int NT> struct Q41K { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_q32_vnni<Q32_4_1, NT>(w, a, s, nb, o); } };
template <int NT> struct Q50K { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_q32_vnni<Q32_5_0, NT>(w, a, s, nb, o); } };
template <int NT> struct Q51K { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_q32_vnni<Q32_5_1, NT>(w, a, s, nb, o); } };
template <int NT> struct Q4KK { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_k4_vnni<false, NT>(w, a, s, nb, o); } };
template <int NT> struct Q5KK { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_k4_vnni<true, NT>(w, a, s, nb, o); } };
template <int NT> struct Q6KK { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_q6_k_vnni<NT>(w, a, s, nb, o); } };
template <int NT> struct Q2KK { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_lowbits_vnni<unpack_q2_k, 84, 0, true, NT>(w, a, s, nb, o); } };
template <int NT> struct Q3KK { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_lowbits_vnni<unpack_q3_k, 110, 4, true, NT>(w, a, s, nb, o); } };
template <int NT> struct IQ4XSK { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { dot_lowbits_vnni<unpack_iq4_xs, 136, 128, false, NT>(w, a, s, nb, o); } };
#endif

}  // namespace
