/* deepport cpu: the vector helpers the C kernels share (GCC/Clang vector extensions; x86 intrinsics where the
   generic form compiles lane by lane). */
#ifndef DEEPPORT_SIMD_H
#define DEEPPORT_SIMD_H
#include <math.h>
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));
typedef uint8_t b8v __attribute__((vector_size(8)));

#define INLINE static inline __attribute__((always_inline))

INLINE v8 ld(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* 8 e4m3fn codes as fp32: sign and the 7 exponent/mantissa bits placed under fp32's, times 2^120 (exact, also
   for subnormal codes). NaN codes (0x7f, 0xff) are refused at load (core/weight_checks.py). */
INLINE v8 ld_e4m3(const uint8_t *p) {
#if defined(__AVX2__) /* one zero-extending load: GCC's generic widening of 8 bytes goes lane by lane */
    __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i bits = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi32(w, 24), _mm256_set1_epi32((int)0x80000000u)),
                                   _mm256_and_si256(_mm256_slli_epi32(w, 20), _mm256_set1_epi32(0x07F00000)));
    return (v8)_mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p120f));
#else
    b8v c;
    memcpy(&c, p, sizeof c);
    u8v w = __builtin_convertvector(c, u8v);
    u8v bits = ((w << 24) & 0x80000000u) | ((w << 20) & 0x07F00000u);
    v8 f;
    memcpy(&f, &bits, sizeof f);
    return f * 0x1p120f;
#endif
}

INLINE float e4m3(uint8_t c) {
    uint32_t bits = ((uint32_t)(c & 0x80) << 24) | ((uint32_t)(c & 0x7F) << 20);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f * 0x1p120f;
}

INLINE float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

#endif
