// Activation quantisation: float rows to the 8-bit blocks ggml's CPU backend dots against.
// Part of qdot.cpp (one translation unit): included there, in this order.

#pragma once

#include "common.h"

namespace {

void quantize_a8k(const float* x, A8K* y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += QK) {
        float amax = 0;
#if QDOT_VNNI
        __m512 vmax = _mm512_setzero_ps();
        for (int j = 0; j < QK; j += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
        amax = _mm512_reduce_max_ps(vmax);
#else
        for (int j = 0; j < QK; j++) amax = std::fmax(amax, std::fabs(x[j]));
#endif
        if (!(amax > 0)) {  // zero block (or NaN: the scale below stays NaN, as in ggml)
            if (amax == 0) {
                std::memset(&y[i], 0, sizeof(A8K));
                continue;
            }
        }
        float mx = amax;  // the value of largest magnitude, its first occurrence (ggml's rule)
        for (int j = 0; j < QK; j++)
            if (std::fabs(x[j]) == amax) {
                mx = x[j];
                break;
            }
        const float iscale = -127.f / mx;
#if QDOT_VNNI
        const __m512 vs = _mm512_set1_ps(iscale);
        for (int j = 0; j < QK; j += 16) {  // cvtps rounds half to even, as ggml's nearest_int
            __m512i v = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(vs, _mm512_loadu_ps(x + j))),
                                         _mm512_set1_epi32(127));
            _mm_storeu_si128((__m128i*)(y[i].qs + j), _mm512_cvtepi32_epi8(v));
        }
#else
        for (int j = 0; j < QK; j++) {
            int v = (int)std::nearbyint(iscale * x[j]);  // round half to even, as ggml's nearest_int
            y[i].qs[j] = (int8_t)(v > 127 ? 127 : v);
        }
#endif
        for (int j = 0; j < QK / 16; j++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += y[i].qs[16 * j + l];
            y[i].bsums[j] = (int16_t)s;
        }
        y[i].d = 1.f / iscale;
    }
}

void quantize_a80(const float* x, A80* y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += 32) {
#if QDOT_VNNI
        const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const __m512 id = _mm512_set1_ps(amax != 0 ? 127.f / amax : 0.f);
        const __m512i v0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id)), v1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
        _mm_storeu_si128((__m128i*)y[i].qs, _mm512_cvtepi32_epi8(v0));
        _mm_storeu_si128((__m128i*)(y[i].qs + 16), _mm512_cvtepi32_epi8(v1));
        y[i].sum = _mm512_reduce_add_epi32(_mm512_add_epi32(v0, v1));
#else
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = std::fmax(amax, std::fabs(x[j]));
        const float id = amax != 0 ? 127.f / amax : 0.f;
        int s = 0;
        for (int j = 0; j < 32; j++) {
            int v = (int)std::nearbyint(x[j] * id);
            y[i].qs[j] = (int8_t)v;
            s += v;
        }
        y[i].sum = s;
#endif
        y[i].d = round_fp16(amax / 127.f);
    }
}

}  // namespace
