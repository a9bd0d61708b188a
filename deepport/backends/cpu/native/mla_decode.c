/* deepport cpu: MLA decode over the paged latent cache in one call, fp32.

   For each row b and each of its S new queries (query i at position L - S + i, L = lens[b]) and head: scores over
   the keys 0 .. that position, scale * (q_latent . kv + q_pe . pe), softmax, then the probability-weighted sum of
   the latent kv rows. Queries go in blocks of four: each cached kv / pe vector is loaded once for the four (the
   scores), and each output lane block is summed over the tokens in registers (the weighted sum). Why C: torch
   needs ~20 calls a layer for this (gathers, batched GEMMs, softmax, views), more than the arithmetic costs on
   a small model. (row, query block) items split across threads in an OpenMP build (simd.h); built by
   deepport/backends/cpu/native/__init__.py. */
#include "simd.h"

#define QB 4 /* queries a block */

/* scores of QB queries (q[i]: latent [c], pe [r]) against one key (kv [c], pe [r]) into out[i]. */
INLINE void score4(const float *const ql[QB], const float *const qp[QB], const float *kv, const float *pe, int64_t c,
                   int64_t r, float out[QB]) {
    vf a[QB] = {{0}};
    int64_t j = 0;
    for (; j + VW <= c; j += VW) {
        vf k = ld(kv + j);
        for (int i = 0; i < QB; i++) a[i] += ld(ql[i] + j) * k;
    }
    int64_t t = 0;
    for (; t + VW <= r; t += VW) {
        vf k = ld(pe + t);
        for (int i = 0; i < QB; i++) a[i] += ld(qp[i] + t) * k;
    }
    for (int i = 0; i < QB; i++) {
        float s = hsum(a[i]);
        for (int64_t jj = j; jj < c; jj++) s += ql[i][jj] * kv[jj];
        for (int64_t tt = t; tt < r; tt++) s += qp[i][tt] * pe[tt];
        out[i] = s;
    }
}

/* The shapes and pointers of one call, for its (row, query block) items. */
typedef struct {
    int64_t s, h, c, r, nq, most, blocks;
    int64_t qs[3], ps[3], os[3]; /* element strides of (row, position, head) in ql, qp and out */
    const float *ql, *qp, *kv, *pe;
    const int32_t *lens;
    const int64_t *row;
    float scale, *out;
} job_t;

/* One item: queries q0 .. q0 + QB of row bi (their scores in sc, QB * most floats). */
static void item(const job_t *jb, int64_t it, float *sc) {
    int64_t s = jb->s, h = jb->h, c = jb->c, r = jb->r, nq = jb->nq, most = jb->most;
    const float *ql = jb->ql, *qp = jb->qp, *kv = jb->kv, *pe = jb->pe;
    float scale = jb->scale, *out = jb->out;
    int64_t bi = it / jb->blocks, q0 = (it % jb->blocks) * QB, len = jb->lens[bi];
    const int64_t *rows = jb->row + bi * most;
    int nqb = nq - q0 < QB ? (int)(nq - q0) : QB;
    const float *qls[QB], *qps[QB];
    int64_t pos[QB];
    for (int i = 0; i < QB; i++) {
        int64_t q = q0 + (i < nqb ? i : nqb - 1);
        qls[i] = ql + bi * jb->qs[0] + (q / h) * jb->qs[1] + (q % h) * jb->qs[2];
        qps[i] = qp + bi * jb->ps[0] + (q / h) * jb->ps[1] + (q % h) * jb->ps[2];
        pos[i] = len - s + q / h; /* this query sees keys 0 .. pos */
    }
    float m[QB], sum[QB];
    for (int i = 0; i < QB; i++) m[i] = -INFINITY, sum[i] = 0.0f;
    for (int64_t j = 0; j < len; j++) {
        float o[QB];
        score4(qls, qps, kv + rows[j] * c, pe + rows[j] * r, c, r, o);
        for (int i = 0; i < QB; i++) {
            float v = j > pos[i] ? -INFINITY : scale * o[i];
            sc[i * most + j] = v;
            m[i] = v > m[i] ? v : m[i];
        }
    }
    for (int i = 0; i < QB; i++) { /* softmax as torch computes it: exp(x - max) / sum */
        float *si = sc + i * most;
        vf acc = {0};
        int64_t j = 0;
        for (; j + VW <= len; j += VW) {
            vf e = vexp(ld(si + j) - m[i]);
            memcpy(si + j, &e, sizeof e);
            acc += e;
        }
        for (; j < len; j++) {
            si[j] = expf(si[j] - m[i]);
            sum[i] += si[j];
        }
        sum[i] += hsum(acc);
        for (j = 0; j + VW <= len; j += VW) {
            vf q = ld(si + j) / sum[i];
            memcpy(si + j, &q, sizeof q);
        }
        for (; j < len; j++) si[j] /= sum[i];
    }
    for (int64_t cc = 0; cc < c; cc += VW) {
        int64_t w = c - cc < VW ? c - cc : VW;
        vf acc[QB] = {{0}};
        if (w == VW) {
            for (int64_t j = 0; j < len; j++) {
                vf k = ld(kv + rows[j] * c + cc);
                for (int i = 0; i < QB; i++) acc[i] += sc[i * most + j] * k;
            }
        } else {
            for (int64_t j = 0; j < len; j++)
                for (int64_t l = 0; l < w; l++)
                    for (int i = 0; i < QB; i++) acc[i][l] += sc[i * most + j] * kv[rows[j] * c + cc + l];
        }
        for (int i = 0; i < nqb; i++) {
            int64_t q = q0 + i;
            memcpy(out + bi * jb->os[0] + (q / h) * jb->os[1] + (q % h) * jb->os[2] + cc, &acc[i],
                   (size_t)w * sizeof(float));
        }
    }
}

/* q_latent [B, S, H, C]; q_pe [B, S, H, R]; kv [NB, P, C]; pe [NB, P, R]; table [B, T] int32 block ids;
   lens [B] int32 (S <= lens[b] <= T * P, checked by the caller); out [B, S, H, C] (written). q_latent, q_pe and out
   may be strided views (their last dim contiguous): strides [3] holds each one's element strides of B, S and H, in
   that order (e.g. heads-first [H, B*S, C] memory, as the batched products before and after use it).
   Returns 0; -1 where a block id in use is outside [0, NB); -2: out of memory. */
int deepport_mla_decode_f32(int64_t b, int64_t s, int64_t h, int64_t c, int64_t r, int64_t nb, int64_t p, int64_t t,
                            const float *ql, const float *qp, const float *kv, const float *pe, const int32_t *table,
                            const int32_t *lens, float scale, float *out, const int64_t *strides) {
    int64_t nq = s * h, most = 1, blocks = (nq + QB - 1) / QB, work = 0;
    for (int64_t bi = 0; bi < b; bi++) most = lens[bi] > most ? lens[bi] : most;
    int64_t *row = malloc((size_t)(b * most) * sizeof(int64_t)); /* token j of row bi: row[bi * most + j] in the pools */
    if (!row) return -2;
    int rc = 0;
    for (int64_t bi = 0; bi < b; bi++) {
        int64_t len = lens[bi];
        work += len * nq * (c + r);
        for (int64_t j = 0; j < len; j++) {
            int32_t blk = table[bi * t + j / p];
            if (blk < 0 || blk >= nb) rc = -1;
            row[bi * most + j] = ((int64_t)(blk < 0 || blk >= nb ? 0 : blk)) * p + j % p;
        }
    }
    if (rc) {
        free(row);
        return rc;
    }
    job_t jb = {s, h, c, r, nq, most, blocks, {0}, {0}, {0}, ql, qp, kv, pe, lens, row, scale, out};
    for (int i = 0; i < 3; i++) jb.qs[i] = strides[i], jb.ps[i] = strides[3 + i], jb.os[i] = strides[6 + i];
    if (threads() > 1 && b * blocks > 1 && 2 * work >= PARALLEL_MIN_WEIGHTS) {
#pragma omp parallel num_threads(deepport_threads)
        {
            float *sc = malloc((size_t)(QB * most) * sizeof(float));
#pragma omp for schedule(static)
            for (int64_t it = 0; it < b * blocks; it++) {
                if (sc) item(&jb, it, sc);
                else {
#pragma omp atomic write
                    rc = -2;
                }
            }
            free(sc);
        }
    } else {
        float *sc = malloc((size_t)(QB * most) * sizeof(float));
        if (!sc) rc = -2;
        for (int64_t it = 0; sc && it < b * blocks; it++) item(&jb, it, sc);
        free(sc);
    }
    free(row);
    return rc;
}
