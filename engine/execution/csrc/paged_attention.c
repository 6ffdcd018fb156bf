/* Paged decode attention for the CPU: one query token per sequence against its cached context.
 *
 * The keys and values stay where they are in the paged cache (head-major: [kv_heads, slots, head_dim]
 * per layer); each (sequence, kv head) pair walks its block table once, so a step reads every cached key
 * and value once and copies nothing. Each pair's result depends only on its own sequence, so the
 * output cannot depend on the rest of the batch. Built at first use by engine/execution/attention/cpu_backend.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Every sum below runs in an order that C fixes: LANES running sums (lane l takes elements l, l + LANES,
 * ...), combined by `lanes_total`, then the tail in order. A compiler may vectorize such code at any width
 * (SSE, AVX2, AVX-512) but may not reorder it, so every build computes the same bits on any x86-64 CPU; an
 * `omp simd reduction` instead splits the sum by the vector width the compiler picks. */
#define LANES 8

static inline float lanes_total(const float *acc) {
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* a . b over n floats, in the order above. */
static float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] = fmaf(a[i + l], b[i + l], acc[l]);
    float total = lanes_total(acc);
    for (; i < n; i++) total = fmaf(a[i], b[i], total);
    return total;
}

/* q . k0, ..., q . k3: four of `dot` (the same bits each), with q read once for the four. */
static inline void dot4(const float *q, const float *k0, const float *k1, const float *k2, const float *k3,
                        int64_t n, float *out) {
    float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            a0[l] = fmaf(q[i + l], k0[i + l], a0[l]);
            a1[l] = fmaf(q[i + l], k1[i + l], a1[l]);
            a2[l] = fmaf(q[i + l], k2[i + l], a2[l]);
            a3[l] = fmaf(q[i + l], k3[i + l], a3[l]);
        }
    out[0] = lanes_total(a0), out[1] = lanes_total(a1), out[2] = lanes_total(a2), out[3] = lanes_total(a3);
    for (; i < n; i++) {
        out[0] = fmaf(q[i], k0[i], out[0]);
        out[1] = fmaf(q[i], k1[i], out[1]);
        out[2] = fmaf(q[i], k2[i], out[2]);
        out[3] = fmaf(q[i], k3[i], out[3]);
    }
}

/* One (sequence, kv head) pair: its `group` query heads against the sequence's cached context. */
static void attend(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                   const int64_t *lens, float *out, int64_t heads, int64_t kv_heads, int64_t head_dim,
                   int64_t slots, int64_t width, int64_t block_size, float scale, int64_t item,
                   int64_t group, float *scores) {
    const int64_t b = item / kv_heads, kh = item % kv_heads, len = lens[b];
    const int64_t *table = tables + b * width;
    const float *qs = q + (b * heads + kh * group) * head_dim;
    float *os = out + (b * heads + kh * group) * head_dim;
    const float *ks = k_cache + kh * slots * head_dim, *vs = v_cache + kh * slots * head_dim;
#define SLOT(t) (table[(t) / block_size] * block_size + (t) % block_size)
    /* Scores, four keys at a time: four independent sums per query row instead of one dependent chain. */
    int64_t t = 0;
    for (; t + 4 <= len; t += 4) {
        const float *k0 = ks + SLOT(t) * head_dim, *k1 = ks + SLOT(t + 1) * head_dim;
        const float *k2 = ks + SLOT(t + 2) * head_dim, *k3 = ks + SLOT(t + 3) * head_dim;
        for (int64_t g = 0; g < group; g++) {
            float *s = scores + g * len + t;
            dot4(qs + g * head_dim, k0, k1, k2, k3, head_dim, s);
            s[0] *= scale, s[1] *= scale, s[2] *= scale, s[3] *= scale;
        }
    }
    for (; t < len; t++) {
        const float *key = ks + SLOT(t) * head_dim;
        for (int64_t g = 0; g < group; g++) scores[g * len + t] = dot(qs + g * head_dim, key, head_dim) * scale;
    }
    for (int64_t g = 0; g < group; g++) {
        float *s = scores + g * len, max = -INFINITY, sum = 0.0f;
        for (int64_t i = 0; i < len; i++) max = s[i] > max ? s[i] : max;
        for (int64_t i = 0; i < len; i++) sum += (s[i] = expf(s[i] - max));
        for (int64_t i = 0; i < len; i++) s[i] /= sum;
    }
    /* Weighted values, four at a time: each output row is loaded and stored once per four keys. */
    memset(os, 0, sizeof(float) * (size_t)(group * head_dim));
    for (t = 0; t + 4 <= len; t += 4) {
        const float *v0 = vs + SLOT(t) * head_dim, *v1 = vs + SLOT(t + 1) * head_dim;
        const float *v2 = vs + SLOT(t + 2) * head_dim, *v3 = vs + SLOT(t + 3) * head_dim;
        for (int64_t g = 0; g < group; g++) {
            const float *p = scores + g * len + t;
            float *o = os + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) o[d] += p[0] * v0[d] + p[1] * v1[d] + p[2] * v2[d] + p[3] * v3[d];
        }
    }
    for (; t < len; t++) {
        const float *value = vs + SLOT(t) * head_dim;
        for (int64_t g = 0; g < group; g++) {
            const float p = scores[g * len + t];
            float *o = os + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; d++) o[d] += p * value[d];
        }
    }
#undef SLOT
}

/* Work items [begin, end) of batch * kv_heads; q and out are [batch, heads, head_dim], tables is
 * [batch, width] block ids, lens is [batch] context lengths (the new token included). Returns 0, or -1
 * when out of memory. */
int paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                           const int64_t *tables, const int64_t *lens, float *out, int64_t heads,
                           int64_t kv_heads, int64_t head_dim, int64_t slots, int64_t width,
                           int64_t block_size, float scale, int64_t begin, int64_t end) {
    const int64_t group = heads / kv_heads;
    int64_t max_len = 1;
    for (int64_t item = begin; item < end; item++) {
        int64_t len = lens[item / kv_heads];
        if (len > max_len) max_len = len;
    }
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)(group * max_len));
        failed = scores == NULL;
#pragma omp for schedule(dynamic)
        for (int64_t item = begin; item < end; item++) {
            if (scores != NULL) attend(q, k_cache, v_cache, tables, lens, out, heads, kv_heads, head_dim,
                                       slots, width, block_size, scale, item, group, scores);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}
