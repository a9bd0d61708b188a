/* deepport cpu: RMSNorm of a few rows in one call, fp32, with the fused residual add.

   r = x + residual (when given; written out: the residual stream the next layer carries), then
   y = r / sqrt(mean(r^2) + eps) * weight, row by row. The mean square sums in 8-lane partial sums (fp32, as a
   vectorised reduction sums). Why C: torch needs an add and four calls a norm (the layer_norm route, see
   backends/cpu/ops.py), and a decode step runs 25 norms of one to a few 256-7168-wide rows, where the calls cost
   more than the arithmetic. Single-threaded (a few rows); built by deepport/backends/cpu/native/__init__.py. */
#include "simd.h"

/* x, residual, r_out, y: [m, d] (residual and r_out both NULL, or both given); w [d]. Returns 0. */
int deepport_rms_norm(int64_t m, int64_t d, const float *x, const float *residual, const float *w, float eps,
                      float *y, float *r_out) {
    for (int64_t i = 0; i < m; i++) {
        const float *src = x + i * d;
        float *yi = y + i * d;
        if (residual) {
            const float *xi = x + i * d, *qi = residual + i * d;
            float *ri = r_out + i * d;
            int64_t j = 0;
            for (; j + VW <= d; j += VW) {
                vf v = ld(xi + j) + ld(qi + j);
                memcpy(ri + j, &v, sizeof v);
            }
            for (; j < d; j++) ri[j] = xi[j] + qi[j];
            src = ri;
        }
        vf acc = {0};
        int64_t j = 0;
        for (; j + VW <= d; j += VW) {
            vf v = ld(src + j);
            acc += v * v;
        }
        float ss = hsum(acc);
        for (; j < d; j++) ss += src[j] * src[j];
        float inv = 1.0f / sqrtf(ss / (float)d + eps);
        for (j = 0; j + VW <= d; j += VW) {
            vf v = ld(src + j) * inv * ld(w + j);
            memcpy(yi + j, &v, sizeof v);
        }
        for (; j < d; j++) yi[j] = src[j] * inv * w[j];
    }
    return 0;
}
