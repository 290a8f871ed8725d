// Shared by the parts of qdot.cpp: ggml type ids, the quantised activation blocks, fp16 helpers.

#pragma once

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

}  // namespace
