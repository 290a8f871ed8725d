// Group kernels of the interleaved ("R16") layouts of Q6_K, IQ4_XS, Q2_K, Q3_K and Q5_K (layouts in
// repack.h). Part of qdot.cpp (one translation unit): included there, after repack.h.
//
// As in repack.h, one vpdpbusd takes 4 weights of each of 16 rows (int32 lane j = row j) against 4
// broadcast activations, each group block is decoded once for up to 8 tokens, and every row's integer
// sum over a block is exactly the row kernel's (dots_vnni.h); only the float summation order differs.
// Unlike repack.h's Q4_K these issue no software prefetch. Q6_K's one-token GEMV from DRAM with one into L2
// 9 KB ahead, in turns on 2 Zen 4 cores: 1.30x, 0.89x, 0.90x, 1.00x, 0.99x, 1.02x in six runs; into L1 (t0)
// it once cut Q6_K to about half on a 2-core Zen 5 box (15 -> 8 GB/s; IQ4_XS 12 -> 7).

#pragma once

#include "repack.h"

namespace {

#if QDOT_VNNI
// Q6_K: the qh vector and the two ql vectors of u (chunk 2n + h, u = 4h + t) give the unsigned 6-bit
// values (q + 32) 128n + 32r + 4u.. for r = 0..3 (ql low nibbles: r = 0, 1; high: r = 2, 3; qh bit pair
// r). A 16-value sub-block 8n + 2r + h is u = 4h..4h+3: its four vpdpbusd start from -32 x its activation
// sum and reach |.| <= 16 * 32 * 127 (too wide for vpdpwssd), so the int8 scale multiplies by vpmulld.
template <int NT>
void r16_q6_k(const uint8_t* g, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30), zero = _mm512_setzero_si512();
    __m512 acc[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, g += 16 * 210) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)g));
        alignas(64) int32_t off[NT][16];  // -32 x each 16-value activation sum
        __m512i sumi[NT];
        for (int m = 0; m < NT; m++) {
            const A8K& a = ((const A8K*)(act + m * astride))[b];
            const __m512i bs = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)a.bsums));
            _mm512_store_si512(off[m], _mm512_sub_epi32(zero, _mm512_slli_epi32(bs, 5)));
            sumi[m] = zero;
        }
        for (int n = 0; n < 2; n++)
            for (int h = 0; h < 2; h++)
                for (int p = 0; p < 2; p++) {  // r = p (low nibbles) and r = p + 2 (high) share ql vectors
                    __m512i qlo[4], qhi[4];
                    for (int t = 0; t < 4; t++) {
                        const uint8_t* chunk = g + 288 + 768 * (2 * n + h) + 64 * t;
                        const __m512i H = _mm512_loadu_si512(chunk), L = _mm512_loadu_si512(chunk + 256 + 256 * p);
                        // qh pair r, then r + 2, to bits 4-5
                        const __m512i hl = p ? _mm512_slli_epi16(H, 2) : _mm512_slli_epi16(H, 4);
                        const __m512i hh = p ? _mm512_srli_epi16(H, 2) : H;
                        qlo[t] = _mm512_or_si512(_mm512_and_si512(L, m4), _mm512_and_si512(hl, m30));
                        qhi[t] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4), _mm512_and_si512(hh, m30));
                    }
                    const int slo = 8 * n + 2 * p + h, shi = slo + 4;  // the two sub-blocks
                    // int8 scale s of the 16 rows: byte s % 4 of scale vector s / 4, sign-extended
                    const __m512i vlo = _mm512_loadu_si512(g + 32 + 64 * (slo / 4));
                    const __m512i vhi = _mm512_loadu_si512(g + 32 + 64 * (shi / 4));
                    const __m512i sclo = _mm512_srai_epi32(_mm512_slli_epi32(vlo, 24 - 8 * (slo % 4)), 24);
                    const __m512i schi = _mm512_srai_epi32(_mm512_slli_epi32(vhi, 24 - 8 * (shi % 4)), 24);
                    for (int m = 0; m < NT; m++) {
                        const int8_t* av = ((const A8K*)(act + m * astride))[b].qs + 128 * n + 16 * h;
                        __m512i s0 = _mm512_set1_epi32(off[m][slo]), s1 = _mm512_set1_epi32(off[m][shi]);
                        for (int t = 0; t < 4; t++) {
                            s0 = _mm512_dpbusd_epi32(s0, qlo[t], bcast4(av + 32 * p + 4 * t));
                            s1 = _mm512_dpbusd_epi32(s1, qhi[t], bcast4(av + 32 * (p + 2) + 4 * t));
                        }
                        sumi[m] = _mm512_add_epi32(sumi[m], _mm512_add_epi32(_mm512_mullo_epi32(s0, sclo),
                                                                             _mm512_mullo_epi32(s1, schi)));
                    }
                }
        for (int m = 0; m < NT; m++) {
            const float ad = ((const A8K*)(act + m * astride))[b].d;
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[m]), _mm512_mul_ps(d, _mm512_set1_ps(ad)), acc[m]);
        }
    }
    for (int m = 0; m < NT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

// IQ4_XS: the grid by vpshufb into unsigned bytes (value + 128, as dots_vnni.h's unpack_iq4_xs); a
// 32-value sub-block ib is qs vectors 4ib..4ib+3, its eight vpdpbusd start from -128 x its activation
// sum, and the 6-bit scale (- 32) multiplies by vpmulld (the sums reach 32 * 127 * 127).
template <int NT>
void r16_iq4_xs(const uint8_t* g, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i grid = _mm512_broadcast_i32x4(_mm_setr_epi8((char)1, 24, 45, 63, 79, 93, 106, 118, (char)129,
                                                              (char)141, (char)153, (char)166, (char)181, (char)197,
                                                              (char)217, (char)241));
    const __m512i m4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    __m512 acc[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, g += 16 * 136) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)g));
        const __m512i sh = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(g + 32)));
        const __m512i sl = _mm512_loadu_si512(g + 64);
        alignas(64) int32_t off[NT][8];  // -128 x each 32-value activation sum
        __m512i sumi[NT];
        for (int m = 0; m < NT; m++) {
            const A8K& a = ((const A8K*)(act + m * astride))[b];
            const __m256i bs = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)a.bsums), _mm256_set1_epi16(1));
            _mm256_store_si256((__m256i*)off[m], _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(bs, 7)));
            sumi[m] = zero;
        }
        for (int ib = 0; ib < 8; ib++) {
            const __m512i sc = _mm512_sub_epi32(
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(sl, 4 * ib), _mm512_set1_epi32(0xF)),
                                _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(sh, 2 * ib), _mm512_set1_epi32(3)), 4)),
                _mm512_set1_epi32(32));
            __m512i lo[4], hi[4];  // values 32ib + 4t.. and 32ib + 16 + 4t.., + 128
            for (int t = 0; t < 4; t++) {
                const __m512i raw = _mm512_loadu_si512(g + 128 + 64 * (4 * ib + t));
                lo[t] = _mm512_shuffle_epi8(grid, _mm512_and_si512(raw, m4));
                hi[t] = _mm512_shuffle_epi8(grid, _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4));
            }
            for (int m = 0; m < NT; m++) {
                const int8_t* av = ((const A8K*)(act + m * astride))[b].qs + 32 * ib;
                __m512i s0 = _mm512_set1_epi32(off[m][ib]), s1 = zero;
                for (int t = 0; t < 4; t++) {
                    s0 = _mm512_dpbusd_epi32(s0, lo[t], bcast4(av + 4 * t));
                    s1 = _mm512_dpbusd_epi32(s1, hi[t], bcast4(av + 16 + 4 * t));
                }
                sumi[m] = _mm512_add_epi32(sumi[m], _mm512_mullo_epi32(_mm512_add_epi32(s0, s1), sc));
            }
        }
        for (int m = 0; m < NT; m++) {
            const float ad = ((const A8K*)(act + m * astride))[b].d;
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[m]), _mm512_mul_ps(d, _mm512_set1_ps(ad)), acc[m]);
        }
    }
    for (int m = 0; m < NT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

// Q2_K: qs vector 8n + 4h + t holds, at bit pair j, the values 128n + 32j + 16h + 4t..: sub-block
// s = 8n + 2j + h is four vectors' pair j. Its four vpdpbusd stay below 16 * 3 * 127 and take the 4-bit
// scale by vpdpwssd; the mins (high nibbles) meet the activation sums as int16 pairs (s, s + 2) by vpdpwssd.
template <int NT>
void r16_q2_k(const uint8_t* g, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i m3 = _mm512_set1_epi8(3), lo4 = _mm512_set1_epi32(0xF), n16 = _mm512_set1_epi16(0xF);
    const __m512i zero = _mm512_setzero_si512();
    const __m256i pairs = _mm256_setr_epi16(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
    __m512 acc[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, g += 16 * 84) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)g));
        const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g + 32)));
        __m512i sumi[NT], summ[NT];
        for (int m = 0; m < NT; m++) {
            const A8K& a = ((const A8K*)(act + m * astride))[b];
            alignas(32) int32_t bp[8];  // dword 2i: activation sums (4i, 4i + 2), 2i + 1: (4i + 1, 4i + 3)
            _mm256_store_si256((__m256i*)bp, _mm256_permutexvar_epi16(pairs, _mm256_loadu_si256((const __m256i*)a.bsums)));
            summ[m] = zero, sumi[m] = zero;
            for (int i = 0; i < 4; i++) {
                const __m512i v = _mm512_loadu_si512(g + 64 + 64 * i);
                summ[m] = _mm512_dpwssd_epi32(summ[m], _mm512_and_si512(_mm512_srli_epi16(v, 4), n16), _mm512_set1_epi32(bp[2 * i]));
                summ[m] = _mm512_dpwssd_epi32(summ[m], _mm512_srli_epi16(v, 12), _mm512_set1_epi32(bp[2 * i + 1]));
            }
        }
        for (int n = 0; n < 2; n++)
            for (int h = 0; h < 2; h++) {
                __m512i raw[4];
                for (int t = 0; t < 4; t++) raw[t] = _mm512_loadu_si512(g + 320 + 64 * (8 * n + 4 * h + t));
                for (int j = 0; j < 4; j++) {
                    const int s = 8 * n + 2 * j + h;
                    const __m512i sc = _mm512_and_si512(_mm512_srli_epi32(_mm512_loadu_si512(g + 64 + 64 * (s / 4)), 8 * (s % 4)), lo4);
                    __m512i q[4];
                    for (int t = 0; t < 4; t++) q[t] = _mm512_and_si512(_mm512_srli_epi16(raw[t], 2 * j), m3);
                    for (int m = 0; m < NT; m++) {
                        const int8_t* av = ((const A8K*)(act + m * astride))[b].qs + 128 * n + 32 * j + 16 * h;
                        __m512i s0 = zero;
                        for (int t = 0; t < 4; t++) s0 = _mm512_dpbusd_epi32(s0, q[t], bcast4(av + 4 * t));
                        sumi[m] = _mm512_dpwssd_epi32(sumi[m], s0, sc);
                    }
                }
            }
        for (int m = 0; m < NT; m++) {
            const __m512 ad = _mm512_set1_ps(((const A8K*)(act + m * astride))[b].d);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[m]), _mm512_mul_ps(d, ad), acc[m]);
            acc[m] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ[m]), _mm512_mul_ps(dmin, ad), acc[m]);
        }
    }
    for (int m = 0; m < NT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

// Q3_K: as Q2_K, the value + 4 being pair j | the hmask bit 4n + j at bit 2; a sub-block's four vpdpbusd
// start from -4 x its activation sum (|.| stays below 2^15) and take the 6-bit scale - 32 by vpdpwssd.
template <int NT>
void r16_q3_k(const uint8_t* g, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i m3 = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4), zero = _mm512_setzero_si512();
    const int qs_at[2][2] = {{480, 992}, {1248, 1504}}, hm_at[2] = {224, 736};  // repack.h's order
    __m512 acc[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, g += 16 * 110) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)g));
        alignas(64) int32_t off[NT][16];  // -4 x each 16-value activation sum
        __m512i sumi[NT];
        for (int m = 0; m < NT; m++) {
            const A8K& a = ((const A8K*)(act + m * astride))[b];
            const __m512i bs = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)a.bsums));
            _mm512_store_si512(off[m], _mm512_sub_epi32(zero, _mm512_slli_epi32(bs, 2)));
            sumi[m] = zero;
        }
        for (int n = 0; n < 2; n++)
            for (int h = 0; h < 2; h++) {
                __m512i raw[4], hm[4];
                for (int t = 0; t < 4; t++) {
                    raw[t] = _mm512_loadu_si512(g + qs_at[n][h] + 64 * t);
                    hm[t] = _mm512_loadu_si512(g + hm_at[h] + 64 * t);
                }
                for (int j = 0; j < 4; j++) {
                    const int s = 8 * n + 2 * j + h, sh = 4 * n + j - 2;  // hmask bit 4n + j to bit 2
                    // scale s: low 4 bits at bit 4 (s / 8) of byte s % 8, high 2 at bit 2 (s / 4) of byte 8 + s % 4
                    const __m512i lo = _mm512_srli_epi32(_mm512_loadu_si512(g + 32 + 64 * ((s % 8) / 4)), 8 * (s % 4) + 4 * (s / 8));
                    const __m512i hi = _mm512_srli_epi32(_mm512_loadu_si512(g + 160), 8 * (s % 4) + 2 * (s / 4));
                    const __m512i sc = _mm512_and_si512(
                        _mm512_sub_epi32(_mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi32(0xF)),
                                                         _mm512_slli_epi32(_mm512_and_si512(hi, _mm512_set1_epi32(3)), 4)),
                                         _mm512_set1_epi32(32)),
                        _mm512_set1_epi32(0xFFFF));  // int16, high half 0: vpdpwssd exact
                    __m512i q[4];
                    for (int t = 0; t < 4; t++) {
                        const __m512i hb = sh > 0 ? _mm512_srli_epi16(hm[t], sh) : sh < 0 ? _mm512_slli_epi16(hm[t], -sh) : hm[t];
                        q[t] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(raw[t], 2 * j), m3), _mm512_and_si512(hb, four));
                    }
                    for (int m = 0; m < NT; m++) {
                        const int8_t* av = ((const A8K*)(act + m * astride))[b].qs + 128 * n + 32 * j + 16 * h;
                        __m512i s0 = _mm512_set1_epi32(off[m][s]);
                        for (int t = 0; t < 4; t++) s0 = _mm512_dpbusd_epi32(s0, q[t], bcast4(av + 4 * t));
                        sumi[m] = _mm512_dpwssd_epi32(sumi[m], s0, sc);
                    }
                }
            }
        for (int m = 0; m < NT; m++) {
            const float ad = ((const A8K*)(act + m * astride))[b].d;
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[m]), _mm512_mul_ps(d, _mm512_set1_ps(ad)), acc[m]);
        }
    }
    for (int m = 0; m < NT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

// Q5_K: repack.h's Q4_K kernel with the fifth bits (qh vector t, bits 2c and 2c + 1 for chunk c) added
// as 16; values reach 31, so two vpdpbusd (8 values, < 2^15) before each vpdpwssd by the int16 scale.
template <int NT>
void r16_q5_k(const uint8_t* g, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m6 = _mm512_set1_epi32(63), lo4 = _mm512_set1_epi32(0xF);
    const __m512i three = _mm512_set1_epi32(3), zero = _mm512_setzero_si512(), sixteen = _mm512_set1_epi8(16);
    __m512 acc[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, g += 16 * 176) {
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
        __m512i sumi[NT], summ[NT];
        for (int m = 0; m < NT; m++) {
            const A8K& a = ((const A8K*)(act + m * astride))[b];
            summ[m] = zero, sumi[m] = zero;
            for (int s = 0; s < 8; s++)  // the 32-value sum in an int16 (|.| <= 4064) against int16 mins
                summ[m] = _mm512_dpwssd_epi32(summ[m], mn[s], _mm512_set1_epi32(a.bsums[2 * s] + a.bsums[2 * s + 1]));
        }
        const uint8_t* qh = g + 256;
        const uint8_t* qs = g + 768;
        for (int c = 0; c < 4; c++) {
            const __m512i blo = _mm512_set1_epi8((char)(1 << (2 * c))), bhi = _mm512_set1_epi8((char)(2 << (2 * c)));
            __m512i lo[8], hi[8];
            for (int t = 0; t < 8; t++) {
                const __m512i raw = _mm512_loadu_si512(qs + 64 * (8 * c + t)), h = _mm512_loadu_si512(qh + 64 * t);
                lo[t] = _mm512_and_si512(raw, m4);
                hi[t] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), m4);
                lo[t] = _mm512_mask_add_epi8(lo[t], _mm512_test_epi8_mask(h, blo), lo[t], sixteen);
                hi[t] = _mm512_mask_add_epi8(hi[t], _mm512_test_epi8_mask(h, bhi), hi[t], sixteen);
            }
            for (int m = 0; m < NT; m++) {
                const int8_t* av = ((const A8K*)(act + m * astride))[b].qs + 64 * c;  // sub-block 2c, then 2c + 1
                for (int p = 0; p < 4; p++) {  // values 8p..8p+7 of each sub-block
                    __m512i sl = _mm512_dpbusd_epi32(zero, lo[2 * p], bcast4(av + 8 * p));
                    __m512i sh = _mm512_dpbusd_epi32(zero, hi[2 * p], bcast4(av + 32 + 8 * p));
                    sl = _mm512_dpbusd_epi32(sl, lo[2 * p + 1], bcast4(av + 8 * p + 4));
                    sh = _mm512_dpbusd_epi32(sh, hi[2 * p + 1], bcast4(av + 32 + 8 * p + 4));
                    sumi[m] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(sumi[m], sl, sc[2 * c]), sh, sc[2 * c + 1]);
                }
            }
        }
        for (int m = 0; m < NT; m++) {
            const float ad = ((const A8K*)(act + m * astride))[b].d;
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[m]), _mm512_mul_ps(d, _mm512_set1_ps(ad)), acc[m]);
            acc[m] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(summ[m]), _mm512_mul_ps(dmin, _mm512_set1_ps(ad)), acc[m]);
        }
    }
    for (int m = 0; m < NT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

template <int NT> struct R6K { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_q6_k<NT>(w, a, s, nb, o); } };
template <int NT> struct RIQ4XS { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_iq4_xs<NT>(w, a, s, nb, o); } };
template <int NT> struct R2K { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_q2_k<NT>(w, a, s, nb, o); } };
template <int NT> struct R3K { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_q3_k<NT>(w, a, s, nb, o); } };
template <int NT> struct R5K { static void run(const uint8_t* w, const uint8_t* a, int64_t s, int64_t nb, float* o) { r16_q5_k<NT>(w, a, s, nb, o); } };
#endif

}  // namespace
