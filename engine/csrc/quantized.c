/* Llama-family layers on 4-bit (Q4_1) and 8-bit (Q8_0) block-quantized weights, for the CPU.
 *
 * The weights stay in the GGUF block formats (32 weights a block: Q4_1 = fp16 scale d, fp16 minimum m,
 * 16 bytes of nibbles, w = d * q + m; Q8_0 = fp16 scale d, 32 int8, w = d * q), so a decode step reads a
 * quarter (Q4_1) of the float16 bytes. Activations and sums stay float32: a block's dot product is
 * d * sum(q * x) + m * sum(x), with q converted exactly to float.
 *
 * Batch invariance: every output element is computed by the same sequence of operations whatever the
 * batch size, the number of threads or the loop structure that reaches it (threads split output rows,
 * never a sum), so a request's result does not depend on what else is in the batch.
 *
 * `decode_layer` runs a whole decoder layer (norms, projections, RoPE, KV-cache write, paged attention,
 * MLP, residuals) in one call, so a decode step costs one call per layer instead of dozens of torch ops.
 * Built at first use by engine/quantized.py, with the paged attention kernel included from its file.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "paged_attention.c"

enum { Q4_1 = 1, Q8_0 = 2 };
#define BLOCK 32
#define TILE 4 /* output rows unpacked together */

typedef struct {
    const uint8_t *data; /* n rows of k / 32 blocks */
    const float *bias;   /* [n] or NULL */
    int64_t n, k, format;
} Matrix;

static inline int64_t block_bytes(int64_t format) { return format == Q4_1 ? 20 : 34; }

static inline float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* A block's 32 weights as exact floats q (without scale or minimum), in the order of the block. */
static inline void block_q(const uint8_t *block, int64_t format, __m256 q[4]) {
    if (format == Q4_1) {
        const __m128i bytes = _mm_loadu_si128((const __m128i *)(block + 4));
        const __m128i mask = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        q[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        q[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        q[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        q[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    } else {
        for (int j = 0; j < 4; j++)
            q[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(block + 2 + 8 * j))));
    }
}

/* One block of one output element: acc += d * sum(q * x); the sum in four lanes of eight, in order. */
static inline __m256 block_dot(const __m256 q[4], const __m256 x[4], float d, __m256 acc) {
    __m256 s = _mm256_mul_ps(q[0], x[0]);
    s = _mm256_fmadd_ps(q[1], x[1], s);
    s = _mm256_fmadd_ps(q[2], x[2], s);
    s = _mm256_fmadd_ps(q[3], x[3], s);
    return _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
}

static inline void load_block(const float *x, __m256 v[4]) {
    for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps(x + 8 * j);
}

/* The end of one output element: the lanes summed, the minimums' share, the bias, the residual. */
static inline float finish(__m256 acc, float mins, const Matrix *w, int64_t n, const float *residual) {
    float y = hsum(acc) + mins;
    if (w->bias) y += w->bias[n];
    return residual ? *residual + y : y;
}

/* Per-block sums of each activation row (the Q4_1 minimums multiply them), in a fixed order. */
static void block_sums(const float *x, int64_t rows, int64_t k, float *sums) {
    const int64_t blocks = k / BLOCK;
    for (int64_t b = 0; b < rows; b++)
        for (int64_t i = 0; i < blocks; i++) {
            const float *p = x + b * k + i * BLOCK;
            __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                                     _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
            sums[b * blocks + i] = hsum(s);
        }
}

/* y[b, n] = (residual y[b, n] +) x[b] . w[n] for every row b and output n in [n0, n0 + count). */
static void rows_direct(const float *x, const float *sums, int64_t rows, const Matrix *w, float *y, int64_t ldy,
                        int accumulate, int64_t n0, int64_t count) {
    const int64_t blocks = w->k / BLOCK, bytes = block_bytes(w->format);
    for (int64_t n = n0; n < n0 + count; n++) {
        const uint8_t *row = w->data + n * blocks * bytes;
        for (int64_t b = 0; b < rows; b++) {
            __m256 acc = _mm256_setzero_ps(), q[4];
            float mins = 0.0f;
            for (int64_t i = 0; i < blocks; i++) {
                const uint8_t *block = row + i * bytes;
                __m256 xv[4];
                block_q(block, w->format, q);
                load_block(x + b * w->k + i * BLOCK, xv);
                acc = block_dot(q, xv, half(block), acc);
                if (w->format == Q4_1) mins += half(block + 2) * sums[b * blocks + i];
            }
            float *out = y + b * ldy + n;
            *out = finish(acc, mins, w, n, accumulate ? out : NULL);
        }
    }
}

/* The same results as rows_direct, with TILE output rows converted to floats once and reused by every
 * activation row: the batched path. `qbuf` holds TILE * k floats. */
static void rows_tiled(const float *x, const float *sums, int64_t rows, const Matrix *w, float *y, int64_t ldy,
                       int accumulate, int64_t n0, int64_t count, float *qbuf) {
    const int64_t blocks = w->k / BLOCK, bytes = block_bytes(w->format), k = w->k;
    float d[TILE][blocks], m[TILE][blocks];
    for (int64_t r = 0; r < count; r++) {
        const uint8_t *row = w->data + (n0 + r) * blocks * bytes;
        for (int64_t i = 0; i < blocks; i++) {
            __m256 q[4];
            block_q(row + i * bytes, w->format, q);
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(qbuf + r * k + i * BLOCK + 8 * j, q[j]);
            d[r][i] = half(row + i * bytes);
            m[r][i] = w->format == Q4_1 ? half(row + i * bytes + 2) : 0.0f;
        }
    }
    for (int64_t b = 0; b < rows; b++) {
        /* The TILE outputs of row b side by side: each block's activations are loaded once for all of
         * them; each output's own sequence of operations is the one rows_direct runs. */
        const float *xb = x + b * k;
        __m256 acc[TILE];
        float mins[TILE];
        for (int64_t r = 0; r < TILE; r++) acc[r] = _mm256_setzero_ps(), mins[r] = 0.0f;
        for (int64_t i = 0; i < blocks; i++) {
            __m256 xv[4], q[4];
            load_block(xb + i * BLOCK, xv);
            for (int64_t r = 0; r < count; r++) {
                load_block(qbuf + r * k + i * BLOCK, q);
                acc[r] = block_dot(q, xv, d[r][i], acc[r]);
                if (w->format == Q4_1) mins[r] += m[r][i] * sums[b * blocks + i];
            }
        }
        for (int64_t r = 0; r < count; r++) {
            float *out = y + b * ldy + n0 + r;
            *out = finish(acc[r], mins[r], w, n0 + r, accumulate ? out : NULL);
        }
    }
}

/* y [rows, ldy] (+)= x [rows, k] @ w^T (+ bias). Returns 0, or -1 when out of memory. */
int quantized_matmul(const float *x, int64_t rows, const Matrix *w, float *y, int64_t ldy, int accumulate) {
    float *sums = malloc(sizeof(float) * (size_t)(rows * (w->k / BLOCK)) + 1);
    if (sums == NULL) return -1;
    block_sums(x, rows, w->k, sums);
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *qbuf = rows > 1 ? malloc(sizeof(float) * (size_t)(TILE * w->k)) : NULL;
        failed = rows > 1 && qbuf == NULL;
#pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < w->n; n0 += TILE) {
            const int64_t count = w->n - n0 < TILE ? w->n - n0 : TILE;
            if (rows == 1)
                rows_direct(x, sums, rows, w, y, ldy, accumulate, n0, count);
            else if (qbuf != NULL)
                rows_tiled(x, sums, rows, w, y, ldy, accumulate, n0, count, qbuf);
        }
        free(qbuf);
    }
    free(sums);
    return failed ? -1 : 0;
}

/* out[b] = weight * x[b] / sqrt(mean(x[b]^2) + eps), as transformers' LlamaRMSNorm in float32. */
static void rms_norm(const float *x, const float *weight, float eps, int64_t rows, int64_t h, float *out) {
    for (int64_t b = 0; b < rows; b++) {
        const float *xb = x + b * h;
        float sq = 0.0f;
        for (int64_t i = 0; i < h; i++) sq += xb[i] * xb[i];
        const float scale = 1.0f / sqrtf(sq / (float)h + eps);
        for (int64_t i = 0; i < h; i++) out[b * h + i] = weight[i] * (xb[i] * scale);
    }
}

/* RoPE on `heads` heads of one row, as transformers' rotate_half: x * cos + rotate_half(x) * sin. */
static void rope(float *x, int64_t heads, int64_t dim, const float *cos, const float *sin) {
    const int64_t half_dim = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * dim;
        for (int64_t i = 0; i < half_dim; i++) {
            const float a = v[i], b = v[i + half_dim];
            v[i] = a * cos[i] + (-b) * sin[i];
            v[i + half_dim] = b * cos[i + half_dim] + a * sin[i + half_dim];
        }
    }
}

typedef struct {
    const float *input_norm, *post_norm;
    Matrix qkv, o, gate_up, down;
} Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
} Shape;

typedef struct {
    float *k_cache, *v_cache;               /* this layer's [kv_heads, slots, head_dim] */
    const int64_t *slots, *tables, *lens;   /* [rows], [rows, width], [rows] */
    int64_t num_slots, width, block_size;
    const float *cos, *sin;                 /* [rows, head_dim] at each row's position */
} Step;

/* Scratch of the caller: h [rows, hidden], qkv [rows, (heads + 2 kv_heads) head_dim], q and attn [rows,
 * heads head_dim], gu [rows, 2 intermediate]. */
typedef struct {
    float *h, *qkv, *q, *attn, *gu;
} Scratch;

/* One decoder layer for `rows` decode tokens, one per sequence: x [rows, hidden] is updated in place. */
int decode_layer(float *x, int64_t rows, const Layer *layer, const Shape *s, const Step *step, Scratch *t) {
    const int64_t q_size = s->heads * s->head_dim, kv_size = s->kv_heads * s->head_dim;
    const int64_t qkv_size = q_size + 2 * kv_size;
    rms_norm(x, layer->input_norm, s->eps, rows, s->hidden, t->h);
    if (quantized_matmul(t->h, rows, &layer->qkv, t->qkv, qkv_size, 0)) return -1;
    for (int64_t b = 0; b < rows; b++) {
        float *q = t->qkv + b * qkv_size, *k = q + q_size, *v = k + kv_size;
        rope(q, s->heads, s->head_dim, step->cos + b * s->head_dim, step->sin + b * s->head_dim);
        rope(k, s->kv_heads, s->head_dim, step->cos + b * s->head_dim, step->sin + b * s->head_dim);
        for (int64_t kh = 0; kh < s->kv_heads; kh++) {
            const int64_t at = (kh * step->num_slots + step->slots[b]) * s->head_dim;
            memcpy(step->k_cache + at, k + kh * s->head_dim, sizeof(float) * (size_t)s->head_dim);
            memcpy(step->v_cache + at, v + kh * s->head_dim, sizeof(float) * (size_t)s->head_dim);
        }
        memcpy(t->q + b * q_size, q, sizeof(float) * (size_t)q_size);
    }
    float *out = t->attn;
    if (paged_decode_attention(t->q, step->k_cache, step->v_cache, step->tables, step->lens, out, s->heads,
                               s->kv_heads, s->head_dim, step->num_slots, step->width, step->block_size,
                               s->scale, 0, rows * s->kv_heads))
        return -1;
    if (quantized_matmul(out, rows, &layer->o, x, s->hidden, 1)) return -1;
    rms_norm(x, layer->post_norm, s->eps, rows, s->hidden, t->h);
    if (quantized_matmul(t->h, rows, &layer->gate_up, t->gu, 2 * s->intermediate, 0)) return -1;
#pragma omp parallel for schedule(static) if (rows > 1)
    for (int64_t b = 0; b < rows; b++) {
        float *g = t->gu + b * 2 * s->intermediate, *u = g + s->intermediate;
        for (int64_t i = 0; i < s->intermediate; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    /* down reads the activations with a row stride of 2 * intermediate: pack them first. */
    for (int64_t b = 1; b < rows; b++)
        memmove(t->gu + b * s->intermediate, t->gu + b * 2 * s->intermediate, sizeof(float) * (size_t)s->intermediate);
    return quantized_matmul(t->gu, rows, &layer->down, x, s->hidden, 1);
}
