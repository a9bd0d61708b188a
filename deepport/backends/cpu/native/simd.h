/* deepport cpu: the vector helpers the C kernels share (GCC/Clang vector extensions; x86 intrinsics where the
   generic form compiles lane by lane). VW = 8 floats a vector: AVX2 (also on AVX-512 CPUs: 16-wide vectors were
   slower on the AMX Xeon with caches flushed, 340 vs 288 us for a batch-8 embedded MoE layer), NEON as 2 x 4. */
#ifndef DEEPPORT_SIMD_H
#define DEEPPORT_SIMD_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define VW 8
_Static_assert(VW == 8, "hsum, hsum4 and the AVX2 paths are written for 8 lanes");
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));
typedef int8_t vc __attribute__((vector_size(VW)));
typedef uint16_t vh __attribute__((vector_size(VW * 2)));

#define INLINE static inline __attribute__((always_inline))

/* Built with OpenMP (deepport/backends/cpu/native/__init__.py adds -fopenmp where torch itself runs on GNU OpenMP, so
   the kernels share torch's thread pool and its thread count), a kernel splits its work across the threads where
   it reads at least this many weights; smaller work stays on the calling thread (waking the pool costs more). */
#define PARALLEL_MIN_WEIGHTS (1 << 18)
/* The threads a parallel loop uses: torch's count (torch.get_num_threads()), which the Python side sets through
   deepport_set_threads before a call whenever it changed. Not OpenMP's per-thread default: a kernel called from
   another Python thread would see the machine's core count there, not what torch.set_num_threads said. */
extern int deepport_threads;
INLINE int threads(void) { return deepport_threads; }

INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

INLINE vf ld(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* VW e4m3fn codes as fp32. A code sign-extended to 32 bits and shifted left by 20 puts its 7 exponent/mantissa
   bits under fp32's (bits 20-26) and its sign in bit 31 (bits 27-30, copies of the sign, are masked off): a
   float 2^-120 times the code's value, exact also for subnormal codes; times 2^120 gives the value. NaN codes
   (0x7f, 0xff) are refused at load (core/weight_checks.py). */
INLINE vf ld_e4m3(const uint8_t *p) {
#if defined(__AVX2__)
    __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i bits = _mm256_and_si256(_mm256_slli_epi32(w, 20), _mm256_set1_epi32((int)0x87F00000u));
    return (vf)_mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0x1p120f));
#else
    vc c;
    memcpy(&c, p, sizeof c);
    vu bits = ((vu)__builtin_convertvector(c, vi) << 20) & 0x87F00000u;
    vf f;
    memcpy(&f, &bits, sizeof f);
    return f * 0x1p120f;
#endif
}

/* VW bf16 values as fp32: each the upper half of its fp32 (exact). */
INLINE vf ld_bf16(const uint16_t *p) {
#if defined(__AVX2__)
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
#else
    vh h;
    memcpy(&h, p, sizeof h);
    vu bits = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

INLINE float bf16(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

INLINE float e4m3(uint8_t c) {
    uint32_t bits = ((uint32_t)(int32_t)(int8_t)c << 20) & 0x87F00000u;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f * 0x1p120f;
}

/* exp of VW floats (Cephes' expf: n = round(x log2 e), r = x - n ln 2 in two parts, a degree-6 polynomial,
   times 2^n; within 2 ulp of libm's expf over [-87, 88]). Below -87 (and -inf, masked scores) it gives 0.
   AVX2 only; elsewhere libm's expf lane by lane. */
INLINE vf vexp(vf x) {
#if defined(__AVX2__)
    __m256 v = _mm256_min_ps((__m256)x, _mm256_set1_ps(88.0f));
    __m256 under = _mm256_cmp_ps(v, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    v = _mm256_max_ps(v, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return (vf)_mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
#else
    vf y;
    for (int i = 0; i < VW; i++) y[i] = x[i] < -87.0f ? 0.0f : expf(x[i]);
    return y;
#endif
}

/* The lane sums of four vectors: o[i] = the sum of v[i]'s lanes, adjacent lanes first ((0+1) + (2+3)) + ((4+5) +
   (6+7)), as hsum sums them. AVX2: three horizontal adds and one 128-bit add for the four, instead of four
   separate reductions through memory (with the once-a-row sums of moe_experts.c, on the development Xeon: its kernel
   -4 to -6% at batch 8 on the embedded shapes, -3 to -10% at 1024x512 experts; batch 1 unchanged). */
INLINE void hsum4(vf v0, vf v1, vf v2, vf v3, float o[4]) {
#if defined(__AVX2__)
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps((__m256)v0, (__m256)v1), _mm256_hadd_ps((__m256)v2, (__m256)v3));
    _mm_storeu_ps(o, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
    vf v[4] = {v0, v1, v2, v3};
    for (int i = 0; i < 4; i++) {
        float s[VW];
        memcpy(s, &v[i], sizeof s);
        o[i] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
#endif
}

INLINE float hsum(vf v) { /* adjacent lanes first, as hsum4 */
    float s[VW];
    memcpy(s, &v, sizeof s);
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

#endif
