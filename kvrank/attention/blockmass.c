/* Attention of a few query rows over many stored blocks, with each block's attention mass, in one pass.
 *
 * The `attn` scoring pass needs, per layer and KV head, the attention output of ~75 query rows (3 query heads x 25
 * new tokens) over ~20,000 stored keys, and the probability mass each row puts on each stored block. Done with ATen
 * operators that is a cast of every fp16 block to fp32, a score matmul, an exp2 pass, a reshaped sum and a matmul
 * into the output, each one a trip through memory. Here each block is converted once into a small fp32 buffer that
 * stays in cache, and the two matmuls, the exponentials and the block's sums run over it before the next block.
 *
 * Layout: query rows are padded to a multiple of 16 and kept transposed ([D][rows]), so both matmuls run one register
 * tile shape: 6 broadcast scalars (keys, or head dims) against 16 rows (two 8-float vectors), 12 accumulators.
 * Scores are in log2 units (the caller folds log2 e into the query scale), so a probability is one exp2.
 * Softmax statistics are FlashAttention's: a running maximum per row, the output rescaled when it grows, and each
 * block's sum kept relative to the maximum at its time and brought to the final one at the end.
 *
 * Built by kvrank/attention/native.py with -O3 -mavx2 -mfma -mf16c (-fopenmp); used only where the CPU has them.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 16 /* query rows per register tile */
#define MR 6  /* broadcast scalars per register tile */

static inline __m256 exp2_ps(__m256 x) {
    /* 2^x for x <= 0 (every exponent here is a score less a maximum), relative error ~2e-7; x below -126.5 gives
     * 0 (also -inf): clamped to -127 and rounded, its exponent field comes out 0. NaN also gives 0 (max_ps returns
     * its second operand); the caller checks the maxima instead. Round to nearest, degree-6 polynomial on
     * [-0.5, 0.5], exponent added by integer arithmetic. */
    x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
    __m256 xi = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(x, xi);
    __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(xi), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* C[i][0:16] (+)= sum_k A[i * ai + k * ak] * B[k * ldb + 0:16] for i < M, k < n; with `top`, top[0:16] becomes
 * the maximum of itself and every C[i][0:16] written. The accumulators are named variables, not an array: GCC
 * keeps an array of vectors in memory and stores it back on every iteration. */
#define ROW(i)                                                                                                        \
    __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();                                           \
    if (M > i && add) {                                                                                            \
        c##i##0 = _mm256_loadu_ps(C + i * ldc);                                                                    \
        c##i##1 = _mm256_loadu_ps(C + i * ldc + 8);                                                                \
    }
#define FMA(i)                                                                                                        \
    if (M > i) {                                                                                                   \
        __m256 a = _mm256_broadcast_ss(A + i * ai + k * ak);                                                       \
        c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                                                                 \
        c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                                                                 \
    }
#define STORE(i)                                                                                                      \
    if (M > i) {                                                                                                   \
        _mm256_storeu_ps(C + i * ldc, c##i##0);                                                                    \
        _mm256_storeu_ps(C + i * ldc + 8, c##i##1);                                                                \
        if (top) {                                                                                                 \
            t0 = _mm256_max_ps(t0, c##i##0);                                                                       \
            t1 = _mm256_max_ps(t1, c##i##1);                                                                       \
        }                                                                                                          \
    }

static inline __attribute__((always_inline)) void tile(int M, const float *A, long ai, long ak, const float *B,
                                                       long ldb, long n, float *C, long ldc, int add, float *top) {
    ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
    for (long k = 0; k < n; k++) {
        __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
        FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5)
    }
    __m256 t0 = _mm256_setzero_ps(), t1 = t0;
    if (top) {
        t0 = _mm256_loadu_ps(top);
        t1 = _mm256_loadu_ps(top + 8);
    }
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
    if (top) {
        _mm256_storeu_ps(top, t0);
        _mm256_storeu_ps(top + 8, t1);
    }
}

/* The same for any M <= MR, each M its own unrolled copy. */
static void tile_m(int M, const float *A, long ai, long ak, const float *B, long ldb, long n, float *C, long ldc,
                   int add, float *top) {
    switch (M) {
    case 6: tile(6, A, ai, ak, B, ldb, n, C, ldc, add, top); break;
    case 5: tile(5, A, ai, ak, B, ldb, n, C, ldc, add, top); break;
    case 4: tile(4, A, ai, ak, B, ldb, n, C, ldc, add, top); break;
    case 3: tile(3, A, ai, ak, B, ldb, n, C, ldc, add, top); break;
    case 2: tile(2, A, ai, ak, B, ldb, n, C, ldc, add, top); break;
    default: tile(1, A, ai, ak, B, ldb, n, C, ldc, add, top); break;
    }
}

enum { F32 = 0, F16 = 1, I8 = 2 }; /* how stored blocks are kept */

/* The stored blocks of one call. Block b of head h: keys at keys[b] + h * k_stride[b] elements, values likewise,
 * [len[b]][d] rows. I8: int8 codes with fp16 scales, per channel for keys ([d] at k_scales[b] + h * ks_stride[b]) and
 * per token for values ([len[b]] at v_scales[b] + h * vs_stride[b]), as kvrank's int8 format stores them. */
typedef struct {
    int kind;
    const void *const *keys, *const *values, *const *k_scales, *const *v_scales;
    const int64_t *k_stride, *v_stride, *ks_stride, *vs_stride;
    const int32_t *len;
} blocks_t;

/* Block b of head h as fp32 in kf and vf, buffers that stay in cache for the block's two matmuls (fp32 blocks are
 * copied too: read from there, not from the scattered stored tensors, the matmuls run faster); d is a multiple of 8.
 * sbuf holds d floats (the keys' scales). */
static void load_block(const blocks_t *src, int b, int h, int d, float *kf, float *vf, float *sbuf) {
    long n = (long)src->len[b] * d;
    if (src->kind == F32) {
        memcpy(kf, (const float *)src->keys[b] + h * src->k_stride[b], (size_t)n * sizeof(float));
        memcpy(vf, (const float *)src->values[b] + h * src->v_stride[b], (size_t)n * sizeof(float));
    } else if (src->kind == F16) {
        const uint16_t *k = (const uint16_t *)src->keys[b] + h * src->k_stride[b];
        const uint16_t *v = (const uint16_t *)src->values[b] + h * src->v_stride[b];
        for (long i = 0; i < n; i += 8) {
            _mm256_storeu_ps(kf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + i))));
            _mm256_storeu_ps(vf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + i))));
        }
    } else {
        const int8_t *k = (const int8_t *)src->keys[b] + h * src->k_stride[b];
        const int8_t *v = (const int8_t *)src->values[b] + h * src->v_stride[b];
        const uint16_t *ks = (const uint16_t *)src->k_scales[b] + h * src->ks_stride[b];
        const uint16_t *vs = (const uint16_t *)src->v_scales[b] + h * src->vs_stride[b];
        for (int j = 0; j < d; j += 8)
            _mm256_storeu_ps(sbuf + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ks + j))));
        for (long t = 0; t < src->len[b]; t++) {
            __m256 scale = _mm256_set1_ps(_cvtsh_ss(vs[t]));
            for (int j = 0; j < d; j += 8) {
                long i = t * d + j;
                __m256 kc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(k + i))));
                __m256 vc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(v + i))));
                _mm256_storeu_ps(kf + i, _mm256_mul_ps(kc, _mm256_loadu_ps(sbuf + j)));
                _mm256_storeu_ps(vf + i, _mm256_mul_ps(vc, scale));
            }
        }
    }
}

static void *buffer(size_t floats) {
    void *p = NULL;
    return posix_memalign(&p, 64, floats * sizeof(float) + 64) ? NULL : p;
}

/* Blocks b0..b1-1 of KV head h. q: [rows][d]. Writes out [rows][d] and ref [rows] for these blocks, and their
 * sums into columns b0..b1-1 of sums [rows][nb]. */
static int one_part(const float *q, int rows, int d, int nb, int b0, int b1, const blocks_t *src, int h, float *out,
                    float *sums, float *ref) {
    const int32_t *len = src->len;
    long rp = (rows + NR - 1) / NR * NR, width = 1;
    for (int b = b0; b < b1; b++)
        width = len[b] > width ? len[b] : width;
    float *qt = buffer(d * rp), *ot = buffer(d * rp), *top = buffer(rp), *alpha = buffer(rp), *tmp = buffer(rp),
          *bmax = buffer(rp);
    float *bref = buffer((b1 - b0 + 1) * rp), *bsum = buffer((b1 - b0 + 1) * rp);
    float *kf = buffer(width * d + 8), *vf = buffer(width * d + 8), *sbuf = buffer(d);
    float *st = buffer(width * rp + 8);
    int ok = qt && ot && top && alpha && tmp && bmax && bref && bsum && kf && vf && sbuf && st;
    if (ok) {
        memset(qt, 0, sizeof(float) * d * rp);
        memset(ot, 0, sizeof(float) * d * rp);
        for (int r = 0; r < rows; r++)
            for (int k = 0; k < d; k++)
                qt[k * rp + r] = q[(long)r * d + k];
        for (long r = 0; r < rp; r++)
            top[r] = -INFINITY;
        for (int b = b0; b < b1; b++) {
            long t_len = len[b];
            load_block(src, b, h, d, kf, vf, sbuf);
            const float *k32 = kf, *v32 = vf;
            for (long r = 0; r < rp; r++)
                bmax[r] = -INFINITY;
            for (long t = 0; t < t_len; t += MR) /* scores, transposed: st[t][r] = sum_k k32[t][k] qt[k][r] */
                for (long r = 0; r < rp; r += NR)
                    tile_m((int)(t_len - t < MR ? t_len - t : MR), k32 + t * d, d, 1, qt + r, rp, d, st + t * rp + r,
                           rp, 0, bmax + r);
            int grew = 0;
            for (long r = 0; r < rp; r += 8) { /* the running maximum per row */
                __m256 old = _mm256_loadu_ps(top + r), now = _mm256_max_ps(old, _mm256_loadu_ps(bmax + r));
                grew |= _mm256_movemask_ps(_mm256_cmp_ps(now, old, _CMP_GT_OQ));
                _mm256_storeu_ps(alpha + r, exp2_ps(_mm256_sub_ps(old, now)));
                _mm256_storeu_ps(top + r, now);
            }
            if (grew && b > b0)
                for (long k = 0; k < d; k++)
                    for (long r = 0; r < rp; r += 8)
                        _mm256_storeu_ps(ot + k * rp + r,
                                         _mm256_mul_ps(_mm256_loadu_ps(ot + k * rp + r), _mm256_loadu_ps(alpha + r)));
            for (long r = 0; r < rp; r += 8) { /* probabilities relative to the running maximum, and their sum */
                __m256 m = _mm256_loadu_ps(top + r), s = _mm256_setzero_ps();
                for (long t = 0; t < t_len; t++) {
                    __m256 p = exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(st + t * rp + r), m));
                    _mm256_storeu_ps(st + t * rp + r, p);
                    s = _mm256_add_ps(s, p);
                }
                _mm256_storeu_ps(bsum + (b - b0) * rp + r, s);
                _mm256_storeu_ps(bref + (b - b0) * rp + r, m);
            }
            for (long r = 0; r < rp; r += NR) /* output, transposed: ot[k][r] += sum_t v32[t][k] st[t][r] */
                for (long k = 0; k < d; k += MR)
                    tile_m((int)(d - k < MR ? d - k : MR), v32 + k, 1, d, st + r, rp, t_len, ot + k * rp + r, rp, 1,
                           NULL);
        }
        for (int r = 0; r < rows; r++) {
            for (int k = 0; k < d; k++)
                out[(long)r * d + k] = ot[k * rp + r];
            ref[r] = top[r];
        }
        for (int b = b0; b < b1; b++) { /* each block's sum relative to the final maximum */
            const float *bs = bsum + (b - b0) * rp, *br = bref + (b - b0) * rp;
            for (long r = 0; r < rp; r += 8)
                _mm256_storeu_ps(tmp + r, _mm256_mul_ps(_mm256_loadu_ps(bs + r),
                                                        exp2_ps(_mm256_sub_ps(_mm256_loadu_ps(br + r),
                                                                              _mm256_loadu_ps(top + r)))));
            for (int r = 0; r < rows; r++)
                sums[(long)r * nb + b] = tmp[r];
        }
    }
    free(qt), free(ot), free(top), free(alpha), free(tmp), free(bmax);
    free(bref), free(bsum), free(kf), free(vf), free(sbuf), free(st);
    return ok ? 0 : 1;
}

/* Joins the parts of one head: parts x [rows][d] outputs and [rows] maxima into out and ref, and each part's
 * block sums (columns bounds[p]..bounds[p+1]-1 of sums) brought to the joint maximum. */
static void join(int parts, const int *bounds, int rows, int d, int nb, const float *pout, const float *pref,
                 float *out, float *sums, float *ref) {
    for (int r = 0; r < rows; r++) {
        float top = -INFINITY;
        for (int p = 0; p < parts; p++)
            top = pref[(long)p * rows + r] > top ? pref[(long)p * rows + r] : top;
        ref[r] = top;
        for (int k = 0; k < d; k++)
            out[(long)r * d + k] = 0.0f;
        for (int p = 0; p < parts; p++) {
            float scale = exp2f(pref[(long)p * rows + r] - top); /* 0 for a part that saw nothing (-inf) */
            for (int k = 0; k < d; k++)
                out[(long)r * d + k] += scale * pout[((long)p * rows + r) * d + k];
            for (int b = bounds[p]; b < bounds[p + 1]; b++)
                sums[(long)r * nb + b] *= scale;
        }
    }
}

/* q: [hkv][rows][d] fp32 in log2 units; the blocks as `blocks_t` describes them (kind F32, F16 or I8; the scale
 * arrays are read for I8 only). Writes out [hkv][rows][d] (unnormalised), sums [hkv][rows][nb] and ref [hkv][rows]
 * (the final maximum both are relative to). d must be a multiple of 8. With several threads each head's blocks are
 * split into `threads` parts of about equal tokens, run as separate softmaxes and joined, so threads share the work
 * whatever the number of KV heads. Returns 0, or 1 if memory ran out. */
int kvrank_block_mass(const float *q, int hkv, int rows, int d, int nb, int kind, const void *const *keys,
                      const void *const *values, const int64_t *k_stride, const int64_t *v_stride,
                      const void *const *k_scales, const void *const *v_scales, const int64_t *ks_stride,
                      const int64_t *vs_stride, const int32_t *len, int threads, float *out, float *sums,
                      float *ref) {
    blocks_t src = {kind, keys, values, k_scales, v_scales, k_stride, v_stride, ks_stride, vs_stride, len};
    int failed = 0, parts = threads > 1 ? (threads < nb ? threads : nb) : 1;
    parts = parts > 0 ? parts : 1;
    int *bounds = malloc(sizeof(int) * (size_t)(parts + 1));
    float *pout = parts > 1 ? buffer((size_t)hkv * parts * rows * d) : out;
    float *pref = parts > 1 ? buffer((size_t)hkv * parts * rows) : ref;
    if (!bounds || !pout || !pref) {
        failed = 1;
        goto done;
    }
    long tokens = 0, seen = 0;
    for (int b = 0; b < nb; b++)
        tokens += len[b];
    bounds[0] = 0, bounds[parts] = nb;
    for (int p = 1, b = 0; p < parts; p++) { /* part p starts at the first block with p / parts of the tokens behind */
        while (b < nb && seen * parts < tokens * p)
            seen += len[b++];
        bounds[p] = b;
    }
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed)
    for (int u = 0; u < hkv * parts; u++) {
        int h = u / parts, p = u % parts;
        failed |= one_part(q + (long)h * rows * d, rows, d, nb, bounds[p], bounds[p + 1], &src, h,
                           pout + (long)u * rows * d, sums + (long)h * rows * nb, pref + (long)u * rows);
    }
    if (parts > 1 && !failed)
        for (int h = 0; h < hkv; h++)
            join(parts, bounds, rows, d, nb, pout + (long)h * parts * rows * d, pref + (long)h * parts * rows,
                 out + (long)h * rows * d, sums + (long)h * rows * nb, ref + (long)h * rows);
done:
    free(bounds);
    if (parts > 1)
        free(pout), free(pref);
    return failed;
}
