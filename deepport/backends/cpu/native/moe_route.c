/* deepport cpu: DeepSeek-V3's expert selection for a few tokens in one call.

   From the biased scores [M, E] (sigmoid scores + e_score_correction_bias, fp32): per group of E / n_groups
   experts the sum of its two largest scores (one fp32 add, as torch's sum of two rounds), the topk_groups groups
   with the largest sums, then the topk experts with the largest biased scores among those groups; every order
   is largest first, ties to the lower index, as the torch path and cpu_ref pick. Why C: the torch path needs
   ~9 calls a layer (two topk, a scatter, a masked fill, ...), more than the selection costs. */
#include <stdint.h>

/* index of the largest v[i] over i in [0, n) with taken[i] == 0 (ties: the lower index); -1 if none. */
static int64_t best(const float *v, const unsigned char *taken, int64_t n) {
    int64_t b = -1;
    for (int64_t i = 0; i < n; i++)
        if (!taken[i] && (b < 0 || v[i] > v[b])) b = i;
    return b;
}

/* The selection of one token from its biased scores b [e] into ids [topk]. */
static void route_one(const float *b, int64_t e, int64_t n_groups, int64_t topk_groups, int64_t topk, int64_t *ids) {
    int64_t g = e / n_groups;
    unsigned char blocked[1024] = {0}; /* experts outside the kept groups, or already picked */
    if (n_groups > 1) {
        float sums[1024];
        unsigned char used[1024] = {0};
        for (int64_t i = 0; i < n_groups; i++) {
            unsigned char none[1024] = {0};
            int64_t a = best(b + i * g, none, g);
            none[a] = 1;
            int64_t c = g > 1 ? best(b + i * g, none, g) : -1;
            sums[i] = c < 0 ? b[i * g + a] : b[i * g + a] + b[i * g + c];
        }
        for (int64_t k = 0; k < topk_groups; k++) used[best(sums, used, n_groups)] = 1;
        for (int64_t i = 0; i < n_groups; i++)
            if (!used[i])
                for (int64_t j = 0; j < g; j++) blocked[i * g + j] = 1;
    }
    for (int64_t k = 0; k < topk; k++) {
        int64_t j = best(b, blocked, e);
        ids[k] = j;
        blocked[j] = 1;
    }
}

/* The gate after its scores, in one call: from sigmoid scores [m, e] and the correction bias [e], biased = scores +
   bias (one fp32 add, as torch's), the selection above into ids [m, topk], and the weights [m, topk]: the chosen
   experts' unbiased scores times route_scale, divided by their sum when norm (route_scale / sum in fp32, then one
   multiply, as the torch path computes them; the sum in top-k order). e % n_groups == 0, topk_groups <=
   n_groups, topk <= topk_groups * e / n_groups, e <= 1024 and n_groups <= 1024 (checked by the caller). Returns 0. */
int deepport_moe_gate_tail(int64_t m, int64_t e, int64_t n_groups, int64_t topk_groups, int64_t topk,
                           const float *scores, const float *bias, float route_scale, int64_t norm, int64_t *ids,
                           float *weights) {
    float biased[1024];
    for (int64_t t = 0; t < m; t++) {
        const float *st = scores + t * e;
        for (int64_t j = 0; j < e; j++) biased[j] = st[j] + bias[j];
        int64_t *it = ids + t * topk;
        route_one(biased, e, n_groups, topk_groups, topk, it);
        float *wt = weights + t * topk, sum = 0.0f;
        for (int64_t k = 0; k < topk; k++) sum += wt[k] = st[it[k]];
        float f = norm ? route_scale / sum : route_scale;
        for (int64_t k = 0; k < topk; k++) wt[k] *= f;
    }
    return 0;
}
