// Plain C++ dot products of one weight row's blocks with one quantised activation row (any CPU).
// Part of qdot.cpp (one translation unit): included there, in this order.

#pragma once

#include "common.h"

namespace {

inline void k4_scale_mins(const uint8_t* s, uint8_t* sc, uint8_t* mn) {  // 12 bytes -> 8 scales, 8 mins
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

float dot_q8_0_plain(const uint8_t* w, const void* act, int64_t nb) {
    const A80* a = (const A80*)act;
    float sum = 0;
    for (int64_t b = 0; b < nb; b++, w += 34) {
        const int8_t* q = (const int8_t*)(w + 2);
        int s = 0;
        for (int j = 0; j < 32; j++) s += q[j] * a[b].qs[j];
        sum += fp16(w) * a[b].d * (float)s;
    }
    return sum;
}

// The 32-value nibble family: value = nibble (+ 16 if its bit in qh) - offset, times d, plus m.
// (bytes, d at 0, m offset or -1, qh offset or -1, qs offset, value offset)
struct Q32 {
    int bytes, m, qh, qs, offset;
};
constexpr Q32 Q32_4_0{18, -1, -1, 2, 8}, Q32_4_1{20, 2, -1, 4, 0}, Q32_5_0{22, -1, 2, 6, 16},
    Q32_5_1{24, 2, 4, 8, 0};

template <const Q32& F>
float dot_q32_plain(const uint8_t* w, const void* act, int64_t nb) {
    const A80* a = (const A80*)act;
    float sum = 0;
    for (int64_t b = 0; b < nb; b++, w += F.bytes) {
        uint32_t qh = 0;
        if (F.qh >= 0) std::memcpy(&qh, w + F.qh, 4);
        const uint8_t* q = w + F.qs;
        int s = 0;
        for (int j = 0; j < 16; j++) {
            s += ((q[j] & 0xF) | (((qh >> j) & 1) << 4)) * a[b].qs[j];
            s += ((q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) * a[b].qs[j + 16];
        }
        sum += fp16(w) * a[b].d * (float)(s - F.offset * a[b].sum);
        if (F.m >= 0) sum += fp16(w + F.m) * a[b].d * (float)a[b].sum;
    }
    return sum;
}

// Q4_K / Q5_K: 64 values per 32 bytes of nibbles (low -> sub-block 2c, high -> 2c+1); Q5_K's fifth
// bit of sub-block s is bit s of qh[l]
template <bool Q5>
float dot_k4_plain(const uint8_t* w, const void* act, int64_t nb) {
    const A8K* a = (const A8K*)act;
    float sum = 0;
    for (int64_t b = 0; b < nb; b++, w += Q5 ? 176 : 144) {
        uint8_t sc[8], mn[8];
        k4_scale_mins(w + 4, sc, mn);
        const uint8_t* qh = w + 16;
        const uint8_t* qs = w + (Q5 ? 48 : 16);
        int sumi = 0, summ = 0;
        for (int c = 0; c < 4; c++) {
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                const int q_lo = (qs[32 * c + l] & 0xF) | (Q5 ? ((qh[l] >> (2 * c)) & 1) << 4 : 0);
                const int q_hi = (qs[32 * c + l] >> 4) | (Q5 ? ((qh[l] >> (2 * c + 1)) & 1) << 4 : 0);
                lo += q_lo * a[b].qs[64 * c + l];
                hi += q_hi * a[b].qs[64 * c + 32 + l];
            }
            sumi += sc[2 * c] * lo + sc[2 * c + 1] * hi;
        }
        for (int s = 0; s < 8; s++) summ += mn[s] * (a[b].bsums[2 * s] + a[b].bsums[2 * s + 1]);
        sum += fp16(w) * a[b].d * (float)sumi - fp16(w + 2) * a[b].d * (float)summ;
    }
    return sum;
}

float dot_q6_k_plain(const uint8_t* w, const void* act, int64_t nb) {
    const A8K* a = (const A8K*)act;
    float sum = 0;
    for (int64_t b = 0; b < nb; b++, w += 210) {
        const uint8_t* ql = w;
        const uint8_t* qh = w + 128;
        const int8_t* sc = (const int8_t*)(w + 192);
        int sub[16] = {0};
        for (int n = 0; n < 2; n++) {
            for (int l = 0; l < 32; l++) {
                const int8_t* y = a[b].qs + 128 * n;
                int q1 = ((ql[64 * n + l] & 0xF) | (((qh[32 * n + l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[64 * n + l + 32] & 0xF) | (((qh[32 * n + l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[64 * n + l] >> 4) | (((qh[32 * n + l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[64 * n + l + 32] >> 4) | (((qh[32 * n + l] >> 6) & 3) << 4)) - 32;
                sub[8 * n + l / 16 + 0] += q1 * y[l];
                sub[8 * n + l / 16 + 2] += q2 * y[l + 32];
                sub[8 * n + l / 16 + 4] += q3 * y[l + 64];
                sub[8 * n + l / 16 + 6] += q4 * y[l + 96];
            }
        }
        int sumi = 0;
        for (int s = 0; s < 16; s++) sumi += sc[s] * sub[s];
        sum += fp16(w + 208) * a[b].d * (float)sumi;
    }
    return sum;
}

// The low-bit types unpack a block to int8 values and 16 int16 scales (one per 16 values), then take
// the sub-block dot products in loops the compiler vectorises.
inline int dot16x16(const int8_t* q, const int8_t* a, const int16_t* sc) {
    int sumi = 0;
    for (int s = 0; s < 16; s++) {
        int d = 0;
        for (int l = 0; l < 16; l++) d += q[16 * s + l] * a[16 * s + l];
        sumi += sc[s] * d;
    }
    return sumi;
}

float dot_q2_k_plain(const uint8_t* w, const void* act, int64_t nb) {
    const A8K* a = (const A8K*)act;
    float sum = 0;
    alignas(64) int8_t q[QK];
    int16_t sc[16];
    for (int64_t b = 0; b < nb; b++, w += 84) {
        const uint8_t* qs = w + 16;  // w[0..15]: low nibble scale, high nibble min, per 16 values
        for (int n = 0; n < 2; n++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++) q[128 * n + 32 * j + l] = (int8_t)((qs[32 * n + l] >> (2 * j)) & 3);
        int summ = 0;
        for (int s = 0; s < 16; s++) {
            sc[s] = w[s] & 0xF;
            summ += (w[s] >> 4) * a[b].bsums[s];
        }
        sum += fp16(w + 80) * a[b].d * (float)dot16x16(q, a[b].qs, sc) - fp16(w + 82) * a[b].d * (float)summ;
    }
    return sum;
}

float dot_q3_k_plain(const uint8_t* w, const void* act, int64_t nb) {
    const A8K* a = (const A8K*)act;
    float sum = 0;
    alignas(64) int8_t q[QK];
    int16_t sc[16];
    for (int64_t b = 0; b < nb; b++, w += 110) {
        const uint8_t* hm = w;
        const uint8_t* qs = w + 32;
        const uint8_t* s = w + 96;  // 16 six-bit scales: low 4 bits in s[0..7], high 2 bits in s[8..11]
        for (int j = 0; j < 16; j++) {
            int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
            int hi = (s[8 + (j % 4)] >> (2 * (j / 4))) & 3;
            sc[j] = (int16_t)((lo | (hi << 4)) - 32);
        }
        for (int n = 0; n < 2; n++)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 32; l++)
                    q[128 * n + 32 * j + l] =
                        (int8_t)(((qs[32 * n + l] >> (2 * j)) & 3) - ((hm[l] >> (4 * n + j)) & 1 ? 0 : 4));
        sum += fp16(w + 108) * a[b].d * (float)dot16x16(q, a[b].qs, sc);
    }
    return sum;
}

const int8_t KVALUES_IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

float dot_iq4_xs_plain(const uint8_t* w, const void* act, int64_t nb) {
    const A8K* a = (const A8K*)act;
    float sum = 0;
    alignas(64) int8_t q[QK];
    int16_t sc[16];
    for (int64_t b = 0; b < nb; b++, w += 136) {
        uint16_t sh;
        std::memcpy(&sh, w + 2, 2);
        const uint8_t* sl = w + 4;
        const uint8_t* qs = w + 8;
        for (int ib = 0; ib < 8; ib++) {
            const int ls = ((sl[ib / 2] >> (4 * (ib % 2))) & 0xF) | (((sh >> (2 * ib)) & 3) << 4);
            sc[2 * ib] = sc[2 * ib + 1] = (int16_t)(ls - 32);
            for (int j = 0; j < 16; j++) {
                q[32 * ib + j] = KVALUES_IQ4NL[qs[16 * ib + j] & 0xF];
                q[32 * ib + 16 + j] = KVALUES_IQ4NL[qs[16 * ib + j] >> 4];
            }
        }
        sum += fp16(w) * a[b].d * (float)dot16x16(q, a[b].qs, sc);
    }
    return sum;
}

}  // namespace
