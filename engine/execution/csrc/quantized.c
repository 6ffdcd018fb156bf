/* Llama-family layers on 4-bit (Q4_1) and 8-bit (Q8_0) block-quantized weights, for the CPU.
 *
 * The weights are GGUF's blocks (32 weights a block: Q4_1 = fp16 scale d, fp16 minimum m, 16 bytes of
 * nibbles, w = d * q + m; Q8_0 = fp16 scale d, 32 int8, w = d * q), so a decode step reads a quarter (Q4_1)
 * of the float16 bytes. Each row's blocks are re-laid as three runs (engine/execution/quantized.py, `pack`): the
 * blocks' quantized values, then their scales, then (Q4_1) their minimums; the same bytes, but eight
 * scales convert in one instruction. Activations are quantized per row to int8 blocks of 32 (x ~ d_x q_x,
 * as llama.cpp does for these formats), so a block's dot product is integer arithmetic (VNNI, or AVX2):
 * d_w d_x sum(q_w q_x) + m_w d_x sum(q_x), summed over blocks in float32.
 *
 * Batch invariance: every output element is computed by the same sequence of operations whatever the
 * batch size, the number of threads or the loop structure that reaches it (threads split output rows,
 * never a sum), so a request's result does not depend on what else is in the batch.
 *
 * `decode_layer` runs a whole decoder layer (norms, projections, RoPE, KV-cache write, paged attention,
 * MLP, residuals) in one call, so a decode step costs one call per layer instead of dozens of torch ops.
 * Built at first use by engine/execution/quantized.py, with the paged attention kernel included from its file.
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
    const uint8_t *data; /* n packed rows of k / 32 blocks, then SLACK bytes */
    const float *bias;   /* [n] or NULL */
    int64_t n, k, format;
} Matrix;

#define GROUP 8    /* blocks whose scales convert together */
#define PREFETCH 4 /* tiles ahead that rows_dot asks the memory for, reading weights from the matrix */

static inline int64_t block_bytes(int64_t format) { return format == Q4_1 ? 20 : 34; }
static inline int64_t value_bytes(int64_t format) { return format == Q4_1 ? 16 : 32; }

/* Row n of a packed matrix: its blocks' quantized values, scales and (Q4_1; else NULL) minimums. */
typedef struct {
    const uint8_t *q;
    const uint16_t *d, *m;
} Row;

static inline Row matrix_row(const Matrix *w, int64_t n) {
    const int64_t blocks = w->k / BLOCK;
    const uint8_t *q = w->data + n * blocks * block_bytes(w->format);
    const uint16_t *d = (const uint16_t *)(q + blocks * value_bytes(w->format));
    return (Row){q, d, w->format == Q4_1 ? d + blocks : NULL};
}

/* Activation rows quantized to int8 blocks (as llama.cpp's Q8_1): x ~ d q, and s = d sum(q), which Q4_1's
 * minimums multiply; row b's blocks start at b * (k / 32) in each array. Each row is quantized on its own,
 * so a row's blocks do not depend on the batch. d and s have GROUP floats of slack (zeros) at their end. */
typedef struct {
    float *d, *s;
    int8_t *q;
} Activations;

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* x [count blocks of 32 floats] -> int8 blocks, rounding to nearest (even) at scale max|x| / 127. */
static void quantize_blocks(const float *x, int64_t count, const Activations *out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t i = 0; i < count; i++) {
        const float *p = x + i * BLOCK;
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(p + 8 * j);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        }
        const float d = hmax(amax) / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int j = 0; j < 4; j++)
            q[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], _mm256_set1_ps(id)),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
        /* packs interleave the four vectors by 128-bit lanes; the permutation puts q back in order. */
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(out->q + i * BLOCK), _mm256_permutevar8x32_epi32(packed, order));
        out->d[i] = d;
        out->s[i] = d * (float)_mm_cvtsi128_si32(s);
    }
}

/* A weight block's 32 quantized values as bytes, in the order of the block: Q4_1's nibbles (0..15,
 * unsigned) or Q8_0's int8. */
static inline __m256i weight_values(const uint8_t *q, int64_t format) {
    if (format == Q8_0) return _mm256_loadu_si256((const __m256i *)q);
    const __m128i bytes = _mm_loadu_si128((const __m128i *)q);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* Eight float16 values (scales or minimums of a group of blocks) as floats. */
static inline __m256 halves(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* sum(u * x) of unsigned bytes u and signed bytes x, in eight int32 lanes of four products each: one VNNI
 * instruction where the CPU has it, else maddubs (no overflow here: |u * x| <= 128 * 127 per pair) and madd. */
static inline __m256i dot_bytes(__m256i u, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}

/* sum(w * x) over a block, exactly (in integers), as eight float lanes. Q8_0's signed weights go in as |w|,
 * with their signs moved onto x. */
static inline __m256 block_isum(__m256i w, __m256i x, int64_t format) {
    const __m256i sums = format == Q4_1 ? dot_bytes(w, x) : dot_bytes(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_cvtepi32_ps(sums);
}

/* The lanes of a group that hold blocks: all ones in the first `count`, zeros after. */
static inline __m256 group_mask(int64_t count) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

/* A group's share of the minimums: mins += m_w s_x in each lane that holds a block. */
static inline __m256 add_mins(__m256 mins, __m256 wm, __m256 xs, __m256 mask) {
    return _mm256_add_ps(mins, _mm256_and_ps(_mm256_mul_ps(wm, xs), mask));
}

/* One block's share: acc += (d_w d_x of the block, lane j of the group's scales) * sum(q_w q_x). */
static inline __m256 add_block(__m256 acc, __m256 dot, __m256 scales, int64_t j) {
    return _mm256_fmadd_ps(dot, _mm256_permutevar8x32_ps(scales, _mm256_set1_epi32((int)j)), acc);
}

/* The end of one output element: the lanes summed, the minimums' share, the bias, the residual. */
static inline float finish(__m256 acc, __m256 mins, const Matrix *w, int64_t n, const float *residual) {
    float y = hsum(acc) + hsum(mins);
    if (w->bias) y += w->bias[n];
    return residual ? *residual + y : y;
}

/* y[b, n] = (residual y[b, n] +) x[b] . w[n] for every row b and output n in [n0, n0 + count), the count
 * (at most TILE) outputs side by side, block group by block group. The weights come from the tile unpacked
 * beforehand (q: each row's blocks' values; wd, wm: each row's groups' scales and minimums as floats), or
 * when q is NULL from the matrix as the loop goes (each weight read once, from memory: one activation row);
 * an output's own sequence of operations is the same either way. */
static inline __attribute__((always_inline)) void
rows_dot(const Activations *x, int64_t rows, const Matrix *w, float *y, int64_t ldy, int accumulate, int64_t n0,
         int64_t count, int64_t format, const __m256i (*q)[w->k / BLOCK],
         const __m256 (*wd)[(w->k / BLOCK + GROUP - 1) / GROUP],
         const __m256 (*wm)[(w->k / BLOCK + GROUP - 1) / GROUP]) {
    const int64_t blocks = w->k / BLOCK, vb = value_bytes(format), tile_bytes = TILE * blocks * block_bytes(format);
    Row row[TILE];
    for (int64_t r = 0; r < count; r++) row[r] = matrix_row(w, n0 + r);
    /* Each block's share of a tile PREFETCH tiles ahead is asked for now: the weights are read once, from
     * memory, and the hardware prefetcher alone starts too late in these short runs. */
    const char *ahead = (const char *)row[0].q + PREFETCH * tile_bytes;
    const int64_t share = tile_bytes / blocks;
    for (int64_t b = 0; b < rows; b++) {
        const float *xd = x->d + b * blocks, *xs = x->s + b * blocks;
        const int8_t *xq = x->q + b * blocks * BLOCK;
        __m256 acc[TILE], mins[TILE], scales[TILE];
        for (int64_t r = 0; r < TILE; r++) acc[r] = mins[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < blocks; g += GROUP) {
            const int64_t size = blocks - g < GROUP ? blocks - g : GROUP;
            const __m256 gd = _mm256_loadu_ps(xd + g), gs = _mm256_loadu_ps(xs + g), mask = group_mask(size);
            for (int64_t r = 0; r < count; r++) {
                scales[r] = _mm256_mul_ps(q ? wd[r][g / GROUP] : halves(row[r].d + g), gd);
                if (format == Q4_1) mins[r] = add_mins(mins[r], q ? wm[r][g / GROUP] : halves(row[r].m + g), gs, mask);
            }
            for (int64_t j = 0; j < size; j++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (g + j) * BLOCK));
                if (!q) {
                    _mm_prefetch(ahead + (g + j) * share, _MM_HINT_T0);
                    _mm_prefetch(ahead + (g + j) * share + 64, _MM_HINT_T0);
                }
                for (int64_t r = 0; r < count; r++) {
                    const __m256i wv = q ? q[r][g + j] : weight_values(row[r].q + (g + j) * vb, format);
                    acc[r] = add_block(acc[r], block_isum(wv, xv, format), scales[r], j);
                }
            }
        }
        for (int64_t r = 0; r < count; r++) {
            float *out = y + b * ldy + n0 + r;
            *out = finish(acc[r], mins[r], w, n0 + r, accumulate ? out : NULL);
        }
    }
}

/* rows_dot from the matrix: one activation row reads each weight once, so unpacking the tile first is
 * only more work. */
static inline __attribute__((always_inline)) void rows_direct(const Activations *x, int64_t rows, const Matrix *w,
                                                             float *y, int64_t ldy, int accumulate, int64_t n0,
                                                             int64_t count, int64_t format) {
    rows_dot(x, rows, w, y, ldy, accumulate, n0, count, format, NULL, NULL, NULL);
}

/* rows_dot with the tile's weights unpacked and its scales converted once and reused by every activation
 * row (the batched path). */
static inline __attribute__((always_inline)) void rows_tiled(const Activations *x, int64_t rows, const Matrix *w,
                                                            float *y, int64_t ldy, int accumulate, int64_t n0,
                                                            int64_t count, int64_t format) {
    const int64_t blocks = w->k / BLOCK, vb = value_bytes(format), groups = (blocks + GROUP - 1) / GROUP;
    const int64_t tile_bytes = TILE * blocks * block_bytes(format);
    const char *ahead = (const char *)matrix_row(w, n0).q + PREFETCH * tile_bytes;
    for (int64_t at = 0; at < tile_bytes; at += 64) _mm_prefetch(ahead + at, _MM_HINT_T0); /* as rows_dot */
    __m256i q[TILE][blocks];
    __m256 wd[TILE][groups], wm[TILE][groups];
    for (int64_t r = 0; r < count; r++) {
        const Row row = matrix_row(w, n0 + r);
        for (int64_t i = 0; i < blocks; i++) q[r][i] = weight_values(row.q + i * vb, format);
        for (int64_t g = 0; g < groups; g++) {
            wd[r][g] = halves(row.d + g * GROUP);
            wm[r][g] = format == Q4_1 ? halves(row.m + g * GROUP) : _mm256_setzero_ps();
        }
    }
    rows_dot(x, rows, w, y, ldy, accumulate, n0, count, format, q, wd, wm);
}

/* rows_direct for one activation row, else rows_tiled; compiled apart for full tiles of each format (the
 * same operations, with the tile size and the format known to the compiler). */
static void tile_rows(const Activations *x, int64_t rows, const Matrix *w, float *y, int64_t ldy, int accumulate,
                      int64_t n0, int64_t count) {
    if (rows == 1 && count == TILE && w->format == Q4_1)
        rows_direct(x, rows, w, y, ldy, accumulate, n0, TILE, Q4_1);
    else if (rows == 1 && count == TILE && w->format == Q8_0)
        rows_direct(x, rows, w, y, ldy, accumulate, n0, TILE, Q8_0);
    else if (rows == 1)
        rows_direct(x, rows, w, y, ldy, accumulate, n0, count, w->format);
    else if (count == TILE && w->format == Q4_1)
        rows_tiled(x, rows, w, y, ldy, accumulate, n0, TILE, Q4_1);
    else if (count == TILE && w->format == Q8_0)
        rows_tiled(x, rows, w, y, ldy, accumulate, n0, TILE, Q8_0);
    else
        rows_tiled(x, rows, w, y, ldy, accumulate, n0, count, w->format);
}

/* y [rows, ldy] (+)= x [rows, k] @ w^T (+ bias), x quantized to int8 blocks first. Returns 0, or -1 when
 * out of memory. */
int quantized_matmul(const float *x, int64_t rows, const Matrix *w, float *y, int64_t ldy, int accumulate) {
    const int64_t count = rows * (w->k / BLOCK);
    /* One buffer: d and s (each with GROUP zeros of slack: a row's last group loads past its end), then q. */
    float *buffer = calloc((size_t)(2 * (count + GROUP)) * sizeof(float) + (size_t)(count * BLOCK), 1);
    if (buffer == NULL) return -1;
    const Activations xq = {buffer, buffer + count + GROUP, (int8_t *)(buffer + 2 * (count + GROUP))};
    quantize_blocks(x, count, &xq);
#pragma omp parallel for schedule(static)
    for (int64_t n0 = 0; n0 < w->n; n0 += TILE) {
        const int64_t tile = w->n - n0 < TILE ? w->n - n0 : TILE;
        tile_rows(&xq, rows, w, y, ldy, accumulate, n0, tile);
    }
    free(buffer);
    return 0;
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
