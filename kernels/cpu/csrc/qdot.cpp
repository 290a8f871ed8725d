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

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QDOT_VNNI 1
#else
#define QDOT_VNNI 0
#endif

namespace {

// ggml type ids
enum : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_XS = 23 };

constexpr int QK = 256;  // K-quant super-block

struct A8K {  // 256 activations (ggml block_q8_K)
    float d;
    int8_t qs[QK];
    int16_t bsums[QK / 16];
};
struct A80 {  // 32 activations (ggml block_q8_0 plus the sum of its values, for Q4_0's -8 offset)
    float d;
    int32_t sum;
    int8_t qs[32];
};
static_assert(sizeof(A8K) == 292, "A8K layout");
static_assert(sizeof(A80) == 40, "A80 layout");

inline float fp16(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        float f = std::ldexp((float)man, -24);
        return sign ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

inline float round_fp16(float x) {  // x rounded to the nearest fp16, as a float
#if defined(__F16C__)
    return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
#else
    return x;  // without F16C: scales stay float32 (differs from ggml in the last bits only)
#endif
}

// ---------------------------------------------------------------- activation quantisation

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

// ---------------------------------------------------------------- plain dot products (any CPU)

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

// ---------------------------------------------------------------- AVX-512 VNNI dot products

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

// nt tokens in groups of up to 8 through the NT-templated kernel
template <template <int> class K>
void multi(const uint8_t* w, const uint8_t* act, int64_t astride, int nt, int64_t nb, float* out) {
    for (; nt >= 8; nt -= 8, act += 8 * astride, out += 8) K<8>::run(w, act, astride, nb, out);
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

// ---------------------------------------------------------------- type table

typedef float (*DotFn)(const uint8_t*, const void*, int64_t);
// one weight row against nt token rows at act + m * astride -> out[0..nt)
typedef void (*MultiFn)(const uint8_t*, const uint8_t*, int64_t, int, int64_t, float*);

template <DotFn F>
void one_by_one(const uint8_t* w, const uint8_t* act, int64_t astride, int nt, int64_t nb, float* out) {
    for (int m = 0; m < nt; m++) out[m] = F(w, act + m * astride, nb);
}

struct Type {
    int id, block, bytes;
    bool k_act;     // activations as A8K (else A80)
    MultiFn fast;   // SIMD where this CPU has it, else the plain one
    MultiFn plain;
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

// ---------------------------------------------------------------- thread pool

// Workers spin for the next job only while a call with several parallel regions is running (the next
// region comes within microseconds), at most OFFLOAD_SPIN_US (default 50) at a time; between calls they
// sleep on a condition variable at once. Spinning past the end of a call took the cores from torch's
// threads: 5x slower decode on a 2-core machine (679 vs 134 ms a token, measured).
int spin_us() {
    static const int us = [] {
        const char* e = std::getenv("OFFLOAD_SPIN_US");
        return e ? std::atoi(e) : 50;
    }();
    return us;
}

class Pool {
   public:
    ~Pool() { resize(1); }

    void resize(int n) {
        {
            std::lock_guard<std::mutex> lk(m_);
            quit_.store(true);
            gen_.fetch_add(1);
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
        quit_.store(false);
        nthreads_ = n < 1 ? 1 : n;
        const uint64_t start = gen_.load();  // a worker that starts late must still see the next job
        chunks_ = std::vector<Chunk>(nthreads_);
        for (int i = 1; i < nthreads_; i++) workers_.emplace_back([this, start, i] { loop(start, i); });
    }

    int threads() const { return nthreads_; }

    // hot: more parallel regions of the same call follow, workers may spin for them
    void hot(bool on) { hot_.store(on, std::memory_order_relaxed); }

    // Runs fn(0..n_items-1) on the caller and whichever workers arrive in time. The caller does not wait
    // for a worker that has not woken (a futex wake-up costs ~0.1-1 ms on a VM, more than a small job):
    // workers join the job through gate_, the caller closes the gate once every item is claimed and
    // then waits only for the workers that joined, each of which finishes the items it claimed.
    void run(int64_t n_items, const std::function<void(int64_t)>& fn) {
        if (nthreads_ == 1 || n_items <= 1) {
            for (int64_t i = 0; i < n_items; i++) fn(i);
            return;
        }
        job_ = &fn;
        for (int c = 0; c < nthreads_; c++) {  // thread c starts on the c-th contiguous share of the items
            chunks_[c].next.store(n_items * c / nthreads_, std::memory_order_relaxed);
            chunks_[c].end = n_items * (c + 1) / nthreads_;
        }
        left_.store(0, std::memory_order_relaxed);
        gate_.store(0, std::memory_order_release);  // open, nobody joined: publishes the job above
        gen_.fetch_add(1);  // seq_cst with sleepers_: a worker going to sleep either sees it or is woken
        if (sleepers_.load() > 0) {
            std::lock_guard<std::mutex> lk(m_);
            cv_.notify_all();
        }
        work(0);
        const uint64_t joined = gate_.fetch_or(CLOSED, std::memory_order_acq_rel) & ~CLOSED;
        for (int spins = 1; (uint64_t)left_.load(std::memory_order_acquire) < joined; spins++) {
            _mm_pause();
            if (spins % 1024 == 0) std::this_thread::yield();  // a joined worker lost its core
        }
    }

   private:
    static constexpr uint64_t CLOSED = 1ull << 62;

    // Each thread walks its own contiguous share of the items in order (one sequential stream of weight
    // rows per core, which the hardware prefetchers follow), then takes what is left of the others'.
    void work(int self) {
        for (int k = 0; k < nthreads_; k++) {
            Chunk& c = chunks_[(self + k) % nthreads_];
            for (int64_t i; (i = c.next.fetch_add(1, std::memory_order_relaxed)) < c.end;) (*job_)(i);
        }
    }

    // join the open job, if any; the job seen then is the one published before the gate opened
    bool join() {
        uint64_t g = gate_.load(std::memory_order_acquire);
        while (!(g & CLOSED))
            if (gate_.compare_exchange_weak(g, g + 1, std::memory_order_acq_rel, std::memory_order_acquire))
                return true;
        return false;
    }

    void loop(uint64_t seen, int self) {
        for (;;) {
            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
            int spins = 0;
            while (gen_.load(std::memory_order_acquire) == seen) {
                _mm_pause();
                if (!hot_.load(std::memory_order_relaxed) ||
                    (++spins % 64 == 0 && std::chrono::steady_clock::now() > until)) {
                    std::unique_lock<std::mutex> lk(m_);
                    sleepers_.fetch_add(1);
                    cv_.wait(lk, [&] { return gen_.load() != seen; });
                    sleepers_.fetch_sub(1);
                }
            }
            seen = gen_.load(std::memory_order_acquire);
            if (quit_.load()) return;
            if (join()) {
                work(self);
                left_.fetch_add(1, std::memory_order_release);  // publishes this worker's results
            }
        }
    }

    std::vector<std::thread> workers_;
    int nthreads_ = 1;
    std::mutex m_;
    std::condition_variable cv_;
    std::atomic<uint64_t> gen_{0};
    struct alignas(64) Chunk {
        std::atomic<int64_t> next{0};
        int64_t end = 0;
    };
    std::vector<Chunk> chunks_ = std::vector<Chunk>(1);
    alignas(64) std::atomic<uint64_t> gate_{CLOSED};  // CLOSED bit | workers joined
    alignas(64) std::atomic<int64_t> left_{0};        // joined workers that finished
    std::atomic<int> sleepers_{0};
    const std::function<void(int64_t)>* job_ = nullptr;
    std::atomic<bool> quit_{false};
    std::atomic<bool> hot_{false};
};

Pool& pool() {
    static Pool p;
    return p;
}
std::mutex call_mutex;  // one caller at a time: the pool runs one job

struct Call {  // holds the pool for one exported call; workers may spin between its regions
    std::lock_guard<std::mutex> lk{call_mutex};
    Call() { pool().hot(true); }
    ~Call() { pool().hot(false); }
};

constexpr int64_t ROWS_PER_ITEM = 16;  // rows a thread takes at a time

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

}  // namespace

extern "C" {

int qdot_version() { return 1; }
int qdot_has_vnni() { return QDOT_VNNI; }

void qdot_set_threads(int n) {
    std::lock_guard<std::mutex> lk(call_mutex);
    if (n != pool().threads()) pool().resize(n);
}

int qdot_get_threads() { return pool().threads(); }

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
        const MultiFn dot = plain ? tj->plain : tj->fast;
        const int64_t N = Ns[j], rb = K / tj->block * tj->bytes, kind = tj->k_act, nb = K / tj->block;
        const int64_t r0 = (it - first_item[j]) * ROWS_PER_ITEM, r1 = std::min(N, r0 + ROWS_PER_ITEM);
        float o[8];
        for (int64_t m0 = 0; m0 < M; m0 += 8)  // token tiles outside: a tile's activations stay in L1
            for (int64_t r = r0; r < r1; r++) {
                const int nt = (int)std::min<int64_t>(8, M - m0);
                dot(ws[j] + r * rb, xq[kind] + m0 * ab[kind], ab[kind], nt, nb, o);
                for (int m = 0; m < nt; m++) outs[j][(m0 + m) * N + r] = o[m];
            }
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

// gemv over n matrices that share one input (q / k / v, q_a / kv_a) in one call: per-call costs matter,
// a decode step calls dozens of 1-10 MB GEMVs
int qdot_gemv_multi(int n, const int* qtypes, const uint8_t* const* ws, const int64_t* Ns, const float* x, int64_t M,
                    int64_t K, float* const* outs) {
    return gemv_many(n, qtypes, ws, Ns, x, M, K, outs, false);
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
int moe_groups(const float* x, int64_t P, int64_t H, int64_t I, const int64_t* starts, int64_t G,
               const uint8_t* const* gate, int qg, const uint8_t* const* up, int qu, const uint8_t* const* down, int qd,
               float* h, float* y) {
    const Type *tg, *tu, *td;
    int64_t gb, ub, db;
    if (!ffn_types(qg, qu, qd, H, I, tg, tu, td, gb, ub, db)) return -1;
    const int64_t agb = act_row_bytes(tg, H), aub = act_row_bytes(tu, H), adb = act_row_bytes(td, I);
    const bool same = tg->k_act == tu->k_act;
    std::vector<uint8_t> xg(agb * P), xu(same ? 0 : aub * P), hq(adb * P);
    Call call;
    pool().run(P, [&](int64_t p) {
        quantize_row(tg, x + p * H, H, xg.data() + p * agb);
        if (!same) quantize_row(tu, x + p * H, H, xu.data() + p * aub);
    });
    const uint8_t* xup = same ? xg.data() : xu.data();
    const int64_t ni = (I + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, nh = (H + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    // gate and up rows are separate items, each one weight stream (two interleaved streams per thread
    // were ~25 % slower at one token per expert, measured against the same rows through gemv_multi)
    std::vector<float> hu(P * I);
    pool().run(2 * G * ni, [&](int64_t it) {
        const bool is_up = it >= G * ni;
        const int64_t jt = is_up ? it - G * ni : it;
        const int64_t g = jt / ni, r0 = jt % ni * ROWS_PER_ITEM, r1 = std::min(I, r0 + ROWS_PER_ITEM);
        const Type* t = is_up ? tu : tg;
        const int64_t rb = is_up ? ub : gb, ab = is_up ? aub : agb;
        const uint8_t* w = (is_up ? up : gate)[g];
        const uint8_t* xa = is_up ? xup : xg.data();
        float* o_rows = is_up ? hu.data() : h;
        float o[8];
        for (int64_t p0 = starts[g]; p0 < starts[g + 1]; p0 += 8)
            for (int64_t r = r0; r < r1; r++) {
                const int nt = (int)std::min<int64_t>(8, starts[g + 1] - p0);
                t->fast(w + r * rb, xa + p0 * ab, ab, nt, H / t->block, o);
                for (int m = 0; m < nt; m++) o_rows[(p0 + m) * I + r] = o[m];
            }
    });
    pool().run(P, [&](int64_t p) {
        float* hp = h + p * I;
        const float* up_p = hu.data() + p * I;
        for (int64_t i = 0; i < I; i++) hp[i] = silu(hp[i]) * up_p[i];
        quantize_row(td, hp, I, hq.data() + p * adb);
    });
    pool().run(G * nh, [&](int64_t it) {
        const int64_t g = it / nh, r0 = it % nh * ROWS_PER_ITEM, r1 = std::min(H, r0 + ROWS_PER_ITEM);
        const uint8_t* wd = down[g];
        float o[8];
        for (int64_t p0 = starts[g]; p0 < starts[g + 1]; p0 += 8)
            for (int64_t r = r0; r < r1; r++) {
                const int nt = (int)std::min<int64_t>(8, starts[g + 1] - p0);
                td->fast(wd + r * db, hq.data() + p0 * adb, adb, nt, I / td->block, o);
                for (int m = 0; m < nt; m++) y[(p0 + m) * H + r] = o[m];
            }
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
    return moe_groups(x, P, H, I, starts, G, gp.data(), qg, upp.data(), qu, dp.data(), qd, h, y);
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
    std::vector<int64_t> slot(T * K, -1), fill(first.begin(), first.end() - 1);
    std::vector<float> xs(Pall * H), h(Pall * I), y(Pall * H);
    for (int64_t i = 0; i < T * K; i++)
        if (loc[i] >= 0) {
            slot[i] = fill[loc[i]]++;
            std::memcpy(xs.data() + slot[i] * H, x + (i / K) * H, H * sizeof(float));
        }
    if (shared) std::memcpy(xs.data() + P * H, x, T * H * sizeof(float));
    if (Pall) {
        const int rc = moe_groups(xs.data(), Pall, H, I, starts.data(), (int64_t)gp.size(), gp.data(), qg, upp.data(),
                                  qu, dp.data(), qd, h.data(), y.data());
        if (rc) return rc;
    }
    for (int64_t t = 0; t < T; t++) {
        float* o = out + t * H;
        std::memset(o, 0, H * sizeof(float));
        for (int64_t k = 0; k < K; k++) {
            const int64_t p = slot[t * K + k];
            if (p < 0) continue;
            const float w = wts[t * K + k];
            const float* yp = y.data() + p * H;
            for (int64_t j = 0; j < H; j++) o[j] += w * yp[j];
        }
        if (shared) {  // added last, as routed + shared(x) would be: the same sums in the same order
            const float* ys = y.data() + (P + t) * H;
            for (int64_t j = 0; j < H; j++) o[j] += ys[j];
        }
    }
    return 0;
}

}  // extern "C"
