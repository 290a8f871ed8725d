// Interleaved ("R16") layouts of the 32-value types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and their kernels.
// Part of qdot.cpp (one translation unit): included there, in this order.
//
// A row-by-row dot product spends ~10 instructions on every 32 weights (a 256-bit dot, a scalar scale,
// a broadcast, a horizontal sum at the end): on a 2-core Zen 4 the 32-value types ran at 14-24 GB/s
// where the same cores read 40+ GB/s. Here 16 rows are interleaved block by block, so that one
// vpdpbusd takes 4 weights of each of the 16 rows (int32 lane j = row j) against 4 broadcast
// activations, the 16 rows' scales are one fp16 vector, and no horizontal sum is left.
//
// Layout of a matrix (N, row bytes): every full group of 16 rows (rows 16g..16g+15, the same bytes the
// plain rows took) holds, per block b of 32 values, 16 * block-bytes bytes:
//   d    16 fp16 scales (row j at 2j)
//   m    16 fp16 mins (Q4_1, Q5_1)
//   qh   eight 64-bit masks (Q5_0, Q5_1): bit 4j + v of mask k is the fifth bit of row j's value 4k + v
//   qs   Q8_0: 8 chunks of 64 bytes, chunk k lane j = row j's values 4k..4k+3, each XOR 0x80 (value + 128)
//        4-bit: 4 chunks of 64 bytes, chunk c lane j = row j's plain bytes 4c..4c+3 (low nibbles are values
//        4c.., high nibbles values 16 + 4c..)
// The N % 16 tail rows stay plain. Repacking is lossless (unpack gives the file's bytes back, tested) and
// keeps the size: 16 * block bytes per group block in every type.

#pragma once

#include "common.h"
#include "dots_plain.h"

namespace {

constexpr Q32 Q32_8_0{34, -1, -1, 2, 128};  // Q8_0 in the Q32 terms: 8-bit values, stored + 128 here

constexpr bool eight_bit(const Q32& F) { return F.bytes == 34; }
constexpr int r16_m(const Q32&) { return 32; }
constexpr int r16_qh(const Q32& F) { return F.m >= 0 ? 64 : 32; }
constexpr int r16_qs(const Q32& F) { return r16_qh(F) + (F.qh >= 0 ? 64 : 0); }

// One block of 16 rows between the plain layout (rows[j] = row j's block) and a group block g.
template <const Q32& F, bool UNPACK>
void r16_block(uint8_t* const rows[16], uint8_t* g) {
    // 2- and 4-byte fields move whole; Q8_0's values flip their sign bit (value + 128 as a byte)
    auto move = [](uint8_t* plain, uint8_t* packed, int n, uint32_t flip) {
        uint32_t v = 0;
        std::memcpy(&v, UNPACK ? packed : plain, n);
        v ^= flip;
        std::memcpy(UNPACK ? plain : packed, &v, n);
    };
    constexpr int chunks = eight_bit(F) ? 8 : 4;
    constexpr uint32_t flip = eight_bit(F) ? 0x80808080u : 0;
    for (int j = 0; j < 16; j++) {
        move(rows[j], g + 2 * j, 2, 0);
        if (F.m >= 0) move(rows[j] + F.m, g + r16_m(F) + 2 * j, 2, 0);
        for (int c = 0; c < chunks; c++) move(rows[j] + F.qs + 4 * c, g + r16_qs(F) + 64 * c + 4 * j, 4, flip);
    }
    if (F.qh >= 0) {  // mask k holds, at bits 4j..4j+3, bits 4k..4k+3 of row j's qh
        uint64_t mask[8] = {0};
        uint32_t qh[16] = {0};
        if (UNPACK) std::memcpy(mask, g + r16_qh(F), sizeof mask);
        for (int j = 0; j < 16; j++) {
            if (!UNPACK) std::memcpy(&qh[j], rows[j] + F.qh, 4);
            for (int k = 0; k < 8; k++) {
                if (UNPACK)
                    qh[j] |= (uint32_t)((mask[k] >> (4 * j)) & 0xF) << (4 * k);
                else
                    mask[k] |= (uint64_t)((qh[j] >> (4 * k)) & 0xF) << (4 * j);
            }
            if (UNPACK) std::memcpy(rows[j] + F.qh, &qh[j], 4);
        }
        if (!UNPACK) std::memcpy(g + r16_qh(F), mask, sizeof mask);
    }
}

// Groups g0..g1 of a matrix: src (N, nb blocks) -> dst, same size; UNPACK goes back. The tail rows
// (N % 16) are copied as they are by the caller.
template <const Q32& F, bool UNPACK>
void r16_groups(const uint8_t* src, uint8_t* dst, int64_t nb, int64_t g0, int64_t g1) {
    const int64_t rb = nb * F.bytes;
    for (int64_t r0 = 16 * g0; r0 < 16 * g1; r0 += 16) {
        uint8_t* plain = UNPACK ? dst + r0 * rb : const_cast<uint8_t*>(src + r0 * rb);
        uint8_t* packed = UNPACK ? const_cast<uint8_t*>(src + r0 * rb) : dst + r0 * rb;
        for (int64_t b = 0; b < nb; b++) {
            uint8_t* rows[16];
            for (int j = 0; j < 16; j++) rows[j] = plain + j * rb + b * F.bytes;
            r16_block<F, UNPACK>(rows, packed + b * 16 * F.bytes);
        }
    }
}

template <const Q32& F, bool UNPACK>
void r16_matrix(const uint8_t* src, uint8_t* dst, int64_t N, int64_t nb) {
    const int64_t full = N / 16 * 16, rb = nb * F.bytes;
    std::memcpy(dst + full * rb, src + full * rb, (N - full) * rb);
    r16_groups<F, UNPACK>(src, dst, nb, 0, N / 16);
}

// A group's 16 rows against nt token rows -> out[16 m + j], through the plain dot of each row (any CPU;
// the tests' reference for the SIMD kernel below)
template <const Q32& F>
void r16_plain(const uint8_t* g, const uint8_t* act, int64_t astride, int nt, int64_t nb, float* out) {
    std::vector<uint8_t> rows(16 * nb * F.bytes);
    r16_matrix<F, true>(g, rows.data(), 16, nb);
    for (int j = 0; j < 16; j++)
        for (int m = 0; m < nt; m++) {
            const uint8_t* w = rows.data() + j * nb * F.bytes;
            if constexpr (eight_bit(F))
                out[16 * m + j] = dot_q8_0_plain(w, act + m * astride, nb);
            else
                out[16 * m + j] = dot_q32_plain<F>(w, act + m * astride, nb);
        }
}

#if QDOT_VNNI
template <const Q32& F, int NT>
void r16_vnni(const uint8_t* g, const uint8_t* act, int64_t astride, int64_t nb, float* out) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16), zero = _mm512_setzero_si512();
    __m512 acc[NT];
    for (int m = 0; m < NT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++, g += 16 * F.bytes) {
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)g));
        const __m512 mn = F.m >= 0 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(g + r16_m(F)))) : d;
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
            int32_t av[8];
            std::memcpy(av, a.qs, 32);
            // the value offset (Q8_0's +128, Q4_0's 8, Q5_0's 16) comes off through the activation sum
            __m512i s0 = _mm512_set1_epi32(-F.offset * a.sum), s1 = zero;
            for (int k = 0; k < 8; k += 2) {  // two chains: a vpdpbusd's latency is 4-5 cycles
                s0 = _mm512_dpbusd_epi32(s0, q[k], _mm512_set1_epi32(av[k]));
                s1 = _mm512_dpbusd_epi32(s1, q[k + 1], _mm512_set1_epi32(av[k + 1]));
            }
            const __m512i sumi = _mm512_add_epi32(s0, s1);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_mul_ps(d, _mm512_set1_ps(a.d)), acc[m]);
            if (F.m >= 0) acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.d * (float)a.sum), acc[m]);
        }
    }
    for (int m = 0; m < NT; m++) _mm512_storeu_ps(out + 16 * m, acc[m]);
}

// nt tokens in groups of up to 8
template <const Q32& F>
void r16_fast(const uint8_t* g, const uint8_t* act, int64_t astride, int nt, int64_t nb, float* out) {
    for (; nt >= 8; nt -= 8, act += 8 * astride, out += 16 * 8) r16_vnni<F, 8>(g, act, astride, nb, out);
    switch (nt) {
        case 7: r16_vnni<F, 7>(g, act, astride, nb, out); break;
        case 6: r16_vnni<F, 6>(g, act, astride, nb, out); break;
        case 5: r16_vnni<F, 5>(g, act, astride, nb, out); break;
        case 4: r16_vnni<F, 4>(g, act, astride, nb, out); break;
        case 3: r16_vnni<F, 3>(g, act, astride, nb, out); break;
        case 2: r16_vnni<F, 2>(g, act, astride, nb, out); break;
        case 1: r16_vnni<F, 1>(g, act, astride, nb, out); break;
        default: break;
    }
}
#else
template <const Q32& F>
void r16_fast(const uint8_t* g, const uint8_t* act, int64_t astride, int nt, int64_t nb, float* out) {
    r16_plain<F>(g, act, astride, nt, nb, out);
}
#endif

// groups g0..g1 of a matrix of nb blocks a row, either way
template <const Q32& F>
void r16_repack(const uint8_t* src, uint8_t* dst, int64_t nb, int64_t g0, int64_t g1, bool unpack) {
    unpack ? r16_groups<F, true>(src, dst, nb, g0, g1) : r16_groups<F, false>(src, dst, nb, g0, g1);
}

}  // namespace
