/* deepport cpu: the routed experts of one MoE layer in one call, fp32 arithmetic.

   y[t] = sum_j wts[t,j] * w2[e](silu(w1[e] x[t]) * w3[e] x[t]),  e = ids[t,j] (ids < 0 contribute nothing).

   Why C: on a small model a torch call costs more than its arithmetic (a batch-1 step of the embedded model
   issued ~45 torch calls per MoE layer for ~1.5 MB of weights), and a decode step is bound by reading the
   expert weights: the fp8 entry point reads an FP8 checkpoint's codes (1 byte a weight) and their 128x128
   block scales instead of the dequantised fp32 copy (4 bytes), converting in registers. The (token, expert)
   pairs are sorted by expert once; each expert's rows are read once per block of up to four tokens: first w1[e]
   and w3[e] [I, D] (gate and up of a row together) for every block, then w2[e] [D, I] output by output, each
   output summed over the experts in order. Both phases split across threads in an OpenMP build (simd.h).

   Built at first use by deepport/backends/cpu/native/__init__.py with the system C compiler (-O3
   -march=native); no Python or torch headers. Plain IEEE fp32 (no -ffast-math): dot products in 8-lane
   partial sums (as a vectorised BLAS GEMV sums) and, for fp8, one scale multiply per 128-wide block of a row
   (sum_b s_b * sum_j code_j x_j: the dequantised weights' products up to rounding). Each output is summed in the
   same order on any number of threads. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define TOKENS 4 /* tokens an expert's rows are read for at once */

int deepport_threads = 1; /* see simd.h: threads() */

/* torch's thread count, for the parallel loops (an OpenMP build; a serial build keeps 1). Returns the count used. */
int deepport_set_threads(int64_t n) {
#ifdef _OPENMP
    deepport_threads = n > 1 ? (int)n : 1;
#else
    (void)n;
#endif
    return deepport_threads;
}

/* Weight formats (q): fp32 values, e4m3fn codes with 128x128 block scales, or bf16 values (exact in fp32). */
enum { F32 = 0, E4M3 = 1, BF16 = 2 };

/* A weight matrix row: fp32 or bf16 values, or e4m3 codes with the scales of its row block (one per 128 columns). */
typedef struct {
    const void *p;
    const float *s; /* fp8: scale of each K block of this row */
} row_t;

INLINE vf wv(row_t r, int64_t j, int q) {
    return q == E4M3 ? ld_e4m3((const uint8_t *)r.p + j)
                     : q == BF16 ? ld_bf16((const uint16_t *)r.p + j) : ld((const float *)r.p + j);
}
INLINE float w1s(row_t r, int64_t j, int q) {
    return q == E4M3 ? e4m3(((const uint8_t *)r.p)[j])
                     : q == BF16 ? bf16(((const uint16_t *)r.p)[j]) : ((const float *)r.p)[j];
}

/* out[r * TOKENS + t] = rows[r] . xs[t] for NR rows and NT tokens, NR * NT <= 8 (accumulators in registers).
   Per 8 columns a lane partial sum; for fp8 each 128-column block's partial sums are scaled by the rows' block
   scale into running totals (a vector multiply-add, no reduction per block). The lanes are summed once per row at
   the end (hsum4, four sums at a time). */
INLINE void dots_nr_nt(const row_t *r, int nr, const float *const *xs, int nt, int64_t k, int q, float *out) {
    vf tot[8] = {{0}};
    float tail[8] = {0};
    int64_t step = q == E4M3 ? 128 : k;
    for (int64_t j0 = 0, kb = 0; j0 < k; j0 += step, kb++) {
        int64_t j1 = j0 + step < k ? j0 + step : k, j = j0;
        vf a[8] = {{0}};
        for (; j + VW <= j1; j += VW) {
            vf x[4];
            for (int t = 0; t < nt; t++) x[t] = ld(xs[t] + j);
            for (int i = 0; i < nr; i++) {
                vf w = wv(r[i], j, q);
                for (int t = 0; t < nt; t++) a[i * nt + t] += w * x[t];
            }
        }
        for (int i = 0; i < nr; i++) {
            float sc = q == E4M3 ? r[i].s[kb] : 1.0f;
            for (int t = 0; t < nt; t++) {
                if (q == E4M3) tot[i * nt + t] += a[i * nt + t] * sc;
                else tot[i * nt + t] = a[i * nt + t];
                if (j < j1) {
                    float s = 0.0f;
                    for (int64_t jj = j; jj < j1; jj++) s += w1s(r[i], jj, q) * xs[t][jj];
                    tail[i * nt + t] += s * sc;
                }
            }
        }
    }
    float o[8];
    for (int g = 0; g < nr * nt; g += 4) /* nr * nt is 4 or 8 here (any count works) */
        hsum4(tot[g], tot[g + 1 < nr * nt ? g + 1 : g], tot[g + 2 < nr * nt ? g + 2 : g],
              tot[g + 3 < nr * nt ? g + 3 : g], o + g);
    for (int i = 0; i < nr; i++)
        for (int t = 0; t < nt; t++) out[i * TOKENS + t] = o[i * nt + t] + tail[i * nt + t];
}

/* Dot products of 4 rows with nt (<= TOKENS) tokens: out[r * TOKENS + t] (rows past nr are copies, unwritten). */
static void dots(const row_t r[4], int nr, const float *const xs[TOKENS], int nt, int64_t k, int q, float *out) {
    if (nt <= 2) { /* each (format, tokens) pair its own inlined loop: constants the compiler unrolls */
        if (q == E4M3) {
            if (nt == 1) dots_nr_nt(r, 4, xs, 1, k, E4M3, out); else dots_nr_nt(r, 4, xs, 2, k, E4M3, out);
        } else if (q == BF16) {
            if (nt == 1) dots_nr_nt(r, 4, xs, 1, k, BF16, out); else dots_nr_nt(r, 4, xs, 2, k, BF16, out);
        } else {
            if (nt == 1) dots_nr_nt(r, 4, xs, 1, k, F32, out); else dots_nr_nt(r, 4, xs, 2, k, F32, out);
        }
        return;
    }
    const float *x4[4];
    for (int t = 0; t < 4; t++) x4[t] = xs[t < nt ? t : nt - 1];
    for (int h = 0; h < nr; h += 2) {
        row_t r2[2] = {r[h], r[h + 1 < nr ? h + 1 : h]};
        float o[2 * TOKENS] = {0};
        if (q == E4M3) dots_nr_nt(r2, 2, x4, 4, k, E4M3, o);
        else if (q == BF16) dots_nr_nt(r2, 2, x4, 4, k, BF16, o);
        else dots_nr_nt(r2, 2, x4, 4, k, F32, o);
        memcpy(out + h * TOKENS, o, (h + 1 < nr ? 2 : 1) * TOKENS * sizeof(float));
    }
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* A stacked weight [E, N, K] (a linear layer's: E = 1): fp32, bf16, or e4m3 codes with scales
   [E, ceil(N/128), ceil(K/128)]. */
typedef struct {
    const void *w;
    const float *s;
    int64_t n, k;
    int q;
} mat_t;

static row_t row(mat_t m, int64_t e, int64_t n) {
    row_t r;
    size_t esz = m.q == E4M3 ? 1 : m.q == BF16 ? 2 : sizeof(float);
    r.p = (const char *)m.w + ((size_t)(e * m.n + n) * (size_t)m.k) * esz;
    int64_t nb = (m.n + 127) / 128, kb = (m.k + 127) / 128;
    r.s = m.q == E4M3 ? m.s + (e * nb + n / 128) * kb : NULL;
    return r;
}

#define ROWS 64 /* w1 / w3 rows a unit of the first phase computes (its SwiGLU values for a block's tokens), and
                   w2 rows (outputs) a unit of the second phase computes: slabs the prefetcher streams */

/* A block: up to TOKENS (token, expert) pairs of one expert, pairs pair[q .. q + nt). */
typedef struct {
    int64_t e, q;
    int nt;
} blk_t;

/* Phase 1, one unit: rows [i0, i1) of w1[e] and w3[e] for the block's tokens, then SwiGLU:
   hp[pair q + t][i] = silu(w1[e] x_t)[i] * (w3[e] x_t)[i] (the gate values first, in hp; the up values in up). */
static void gate_up(mat_t w1, mat_t w3, blk_t b, const float *x, const int64_t *pair, int64_t k, int64_t i0,
                    int64_t i1, float *hp, float *up) {
    int64_t d = w1.k, inter = w1.n;
    const float *xs[TOKENS];
    for (int t = 0; t < TOKENS; t++) xs[t] = x + (pair[b.q + (t < b.nt ? t : b.nt - 1)] / k) * d;
    float o[4 * TOKENS];
    for (int64_t i = i0; i < i1; i += 2) {
        int64_t i1r = i + 1 < i1 ? i + 1 : i; /* an odd last row is computed twice, written once */
        row_t r[4] = {row(w1, b.e, i), row(w3, b.e, i), row(w1, b.e, i1r), row(w3, b.e, i1r)};
        dots(r, 4, xs, b.nt, d, w1.q, o);
        for (int t = 0; t < b.nt; t++) {
            float *ht = hp + (b.q + t) * inter, *ut = up + (b.q + t) * inter;
            ht[i] = o[t], ut[i] = o[TOKENS + t];
            if (i1r != i) ht[i1r] = o[2 * TOKENS + t], ut[i1r] = o[3 * TOKENS + t];
        }
    }
    for (int t = 0; t < b.nt; t++) { /* h = silu(gate) * up = gate / (1 + exp(-gate)) * up */
        float *ht = hp + (b.q + t) * inter, *ut = up + (b.q + t) * inter;
        int64_t i = i0;
        for (; i + VW <= i1; i += VW) {
            vf g = ld(ht + i), v = g / (1.0f + vexp(-g)) * ld(ut + i);
            memcpy(ht + i, &v, sizeof v);
        }
        for (; i < i1; i++) ht[i] = silu(ht[i]) * ut[i];
    }
}

/* Phase 2, one unit: outputs [c0, c1) of every token: y[t][c] += wt * (w2[e] row c . h), over the blocks in
   order (each output's sum runs over the experts in the same order on any number of threads). */
static void down(mat_t w2, const blk_t *blks, int64_t nb, const float *hp, const int64_t *pair, const float *wts,
                 int64_t k, int64_t c0, int64_t c1, float *y) {
    int64_t d = w2.n, inter = w2.k;
    float o[4 * TOKENS];
    for (int64_t bi = 0; bi < nb; bi++) {
        blk_t b = blks[bi];
        const float *hs[TOKENS];
        for (int t = 0; t < TOKENS; t++) hs[t] = hp + (b.q + (t < b.nt ? t : 0)) * inter;
        for (int64_t c = c0; c < c1; c += 4) {
            int nr = c1 - c < 4 ? (int)(c1 - c) : 4;
            row_t r[4];
            for (int i = 0; i < 4; i++) r[i] = row(w2, b.e, c + (i < nr ? i : nr - 1));
            dots(r, nr, hs, b.nt, inter, w2.q, o);
            for (int t = 0; t < b.nt; t++) {
                int64_t pr = pair[b.q + t];
                float *yt = y + (pr / k) * d, wt = wts[pr];
                for (int i = 0; i < nr; i++) yt[c + i] += wt * o[i * TOKENS + t];
            }
        }
    }
}

static void gate_up_unit(mat_t w1, mat_t w3, const blk_t *blks, const float *x, const int64_t *pair, int64_t k,
                         int64_t u, int64_t chunks, float *hp, float *up) {
    int64_t i0 = (u % chunks) * ROWS;
    gate_up(w1, w3, blks[u / chunks], x, pair, k, i0, min64(i0 + ROWS, w1.n), hp, up);
}

static int run(int64_t m, int64_t d, int64_t inter, int64_t k, int64_t e, const float *x, const int64_t *ids,
               const float *wts, mat_t w1, mat_t w3, mat_t w2, float *y) {
    memset(y, 0, (size_t)(m * d) * sizeof(float));
    int64_t p = m * k;
    for (int64_t i = 0; i < p; i++)
        if (ids[i] >= e) return -1;
    int64_t *start = calloc((size_t)e + 1, sizeof(int64_t));
    int64_t *fill = malloc((size_t)(e > 0 ? e : 1) * sizeof(int64_t));
    int64_t *pair = malloc((size_t)(p > 0 ? p : 1) * sizeof(int64_t));
    blk_t *blks = malloc((size_t)(p > 0 ? p : 1) * sizeof(blk_t));
    float *hp = malloc((size_t)(2 * (p > 0 ? p : 1) * inter) * sizeof(float)); /* per pair: SwiGLU, then up */
    int rc = 0;
    if (!start || !fill || !pair || !blks || !hp) {
        rc = -2;
        goto done;
    }
    for (int64_t i = 0; i < p; i++) /* counting sort of the pairs by expert, stable: token order within one */
        if (ids[i] >= 0) start[ids[i] + 1]++;
    for (int64_t j = 0; j < e; j++) start[j + 1] += start[j];
    memcpy(fill, start, (size_t)e * sizeof(int64_t));
    for (int64_t i = 0; i < p; i++)
        if (ids[i] >= 0) pair[fill[ids[i]]++] = i;
    int64_t nb = 0;
    for (int64_t j = 0; j < e; j++)
        for (int64_t q = start[j]; q < start[j + 1]; q += TOKENS)
            blks[nb++] = (blk_t){j, q, start[j + 1] - q < TOKENS ? (int)(start[j + 1] - q) : TOKENS};
    float *up = hp + p * inter;
    int64_t chunks = (inter + ROWS - 1) / ROWS, units = nb * chunks, outs = (d + ROWS - 1) / ROWS;
    if (threads() > 1 && nb * 3 * inter * d >= PARALLEL_MIN_WEIGHTS) {
#pragma omp parallel for schedule(static) num_threads(deepport_threads)
        for (int64_t u = 0; u < units; u++) gate_up_unit(w1, w3, blks, x, pair, k, u, chunks, hp, up);
#pragma omp parallel for schedule(static) num_threads(deepport_threads)
        for (int64_t u = 0; u < outs; u++) down(w2, blks, nb, hp, pair, wts, k, u * ROWS, min64(u * ROWS + ROWS, d), y);
    } else {
        for (int64_t u = 0; u < units; u++) gate_up_unit(w1, w3, blks, x, pair, k, u, chunks, hp, up);
        down(w2, blks, nb, hp, pair, wts, k, 0, d, y);
    }
done:
    free(start); free(fill); free(pair); free(blks); free(hp);
    return rc;
}

/* x [m, d]; ids, wts [m, k]; w1, w3 [e, inter, d]; w2 [e, d, inter]; y [m, d] (written). All contiguous.
   Returns 0; -1 where an id is >= e (y then holds zeros); -2 where memory ran out. */
int deepport_moe_experts_f32(int64_t m, int64_t d, int64_t inter, int64_t k, int64_t e, const float *x,
                             const int64_t *ids, const float *wts, const float *w1, const float *w3,
                             const float *w2, float *y) {
    mat_t a = {w1, NULL, inter, d, F32}, b = {w3, NULL, inter, d, F32}, c = {w2, NULL, d, inter, F32};
    return run(m, d, inter, k, e, x, ids, wts, a, b, c, y);
}

/* As deepport_moe_experts_f32, the weights as e4m3fn codes (same shapes, 1 byte each) with fp32 scales
   s1, s3 [e, ceil(inter/128), ceil(d/128)] and s2 [e, ceil(d/128), ceil(inter/128)]. */
int deepport_moe_experts_e4m3(int64_t m, int64_t d, int64_t inter, int64_t k, int64_t e, const float *x,
                              const int64_t *ids, const float *wts, const uint8_t *w1, const float *s1,
                              const uint8_t *w3, const float *s3, const uint8_t *w2, const float *s2, float *y) {
    mat_t a = {w1, s1, inter, d, E4M3}, b = {w3, s3, inter, d, E4M3}, c = {w2, s2, d, inter, E4M3};
    return run(m, d, inter, k, e, x, ids, wts, a, b, c, y);
}

/* Rows [c0, c0 + 4) of y for tokens t0 .. t0 + nt. */
static void linear_rows(mat_t a, const float *const xs[TOKENS], int nt, int64_t t0, int64_t c, float *y) {
    int64_t n = a.n;
    float o[4 * TOKENS];
    int nr = n - c < 4 ? (int)(n - c) : 4;
    row_t r[4];
    for (int i = 0; i < 4; i++) r[i] = row(a, 0, c + (i < nr ? i : nr - 1));
    dots(r, nr, xs, nt, a.k, a.q, o);
    for (int i = 0; i < nr; i++)
        for (int t = 0; t < nt; t++) y[(t0 + t) * n + c + i] = o[i * TOKENS + t];
}

static int linear(int64_t m, mat_t a, const float *x, float *y) {
    int64_t n = a.n, k = a.k;
    int wide = threads() > 1 && n * k >= PARALLEL_MIN_WEIGHTS;
    for (int64_t t0 = 0; t0 < m; t0 += TOKENS) {
        int nt = m - t0 < TOKENS ? (int)(m - t0) : TOKENS;
        const float *xs[TOKENS];
        for (int t = 0; t < TOKENS; t++) xs[t] = x + (t0 + (t < nt ? t : nt - 1)) * k;
        if (wide) {
#pragma omp parallel for schedule(static) num_threads(deepport_threads)
            for (int64_t c = 0; c < n; c += 4) linear_rows(a, xs, nt, t0, c, y);
        } else {
            for (int64_t c = 0; c < n; c += 4) linear_rows(a, xs, nt, t0, c, y);
        }
    }
    return 0;
}

/* y [m, n] = x [m, k] w^T for w given as e4m3fn codes [n, k] with fp32 scales [ceil(n/128), ceil(k/128)]: a
   linear layer of an FP8 checkpoint read as its codes (a quarter of the fp32 bytes), rows in fours, tokens in
   blocks of up to TOKENS. Returns 0. */
int deepport_linear_e4m3(int64_t m, int64_t n, int64_t k, const float *x, const uint8_t *w, const float *s, float *y) {
    mat_t a = {w, s, n, k, E4M3};
    return linear(m, a, x, y);
}

/* As deepport_linear_e4m3 for w given as bf16 values [n, k] (a bf16 checkpoint's weight served as fp32: half the
   bytes, and each value exact in fp32). Returns 0. */
int deepport_linear_bf16(int64_t m, int64_t n, int64_t k, const float *x, const uint16_t *w, float *y) {
    mat_t a = {w, NULL, n, k, BF16};
    return linear(m, a, x, y);
}
