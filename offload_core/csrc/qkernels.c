/* moeshard CPU kernels for packed low-bit weights: a fused dequantize-and-multiply for many experts at once,
 * the HQQ proximal quantizer fused per group, and the bit packing they share.
 *
 * Loaded with ctypes (offload_core/kernels.py compiles this file once per machine with the system C compiler;
 * no torch headers, so it builds in about a second). OpenMP resolves to the libgomp that torch already loaded,
 * so these kernels share torch's thread pool and its thread count.
 *
 * Weights are quantized as HQQ does on axis 1: a tensor [N, K] (out, in) is read flat, row-major, and every
 * `g` consecutive weights share a (scale, zero) pair, w = (q - zero) * scale. Codes are packed in 16-byte
 * chunks of W = 128 / bits weights: byte j of a chunk holds the codes j + 16 v (v = 0 .. 8 / bits - 1) at bit
 * offset v * bits, so one 16-byte load widened to sixteen 16-bit lanes yields 8 / bits vectors of 16
 * consecutive weights with a shift and a mask. 3-bit codes are kept as a 2-bit plane (low bits) and a 1-bit
 * plane (bit 2); a slot widens them to 4-bit chunks. Scales and zeros are float16, one per group.
 *
 * The fast path (AVX2) quantizes each token's activations to int16 per group of g (a scale per token and
 * group: relative error below 2^-16 of the group's largest value, a hundred times finer than bfloat16) and
 * multiplies them with the codes in integers (vpmaddwd: 16 multiply-adds an instruction), applying the
 * weights' scale and zero once per group: y = sum_g s_g (sum q x' - z_g sum x'). Shapes it does not cover
 * (K % W, g % 16, groups that span rows) take the plain float32 path, as does a CPU without AVX2.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MS_AVX2 1
#else
#define MS_AVX2 0
#endif

/* T = token rows of one expert, R = weight rows of a tile, N = output features, K = input features,
 * G = groups per row (K / g) */

#define MS_CHUNK 16  /* bytes per chunk of codes */

int ms_version(void) { return 4; }
int ms_has_avx2(void) { return MS_AVX2; }

static inline float h2f(uint16_t h) {
#if MS_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* The code of flat index i in a tensor packed at `bits`. */
static inline uint8_t code_at(const uint8_t *packed, int64_t i, int bits) {
    const int64_t w = 128 / bits, r = i % w;
    return (packed[(i / w) * MS_CHUNK + (r & 15)] >> ((r >> 4) * bits)) & ((1u << bits) - 1);
}

/* ---------------------------------------------------------------------------------------------------------
 * Packing: codes (one per byte, flat) <-> chunks.
 * ------------------------------------------------------------------------------------------------------- */

/* Bytes of `numel` codes packed at `bits` (2, 4, 8; 1 for the high plane of 3-bit), whole chunks. */
int64_t ms_packed_bytes(int64_t numel, int bits) {
    const int64_t w = 128 / bits;
    return (numel + w - 1) / w * MS_CHUNK;
}

/* codes [numel] (values < 2^bits) -> out [ms_packed_bytes]; bits in {1, 2, 4, 8}. Padding codes are 0. */
void ms_pack(const uint8_t *codes, int64_t numel, int bits, uint8_t *out) {
    const int64_t w = 128 / bits, planes = 8 / bits, chunks = (numel + w - 1) / w;
    const uint8_t mask = (uint8_t)((1u << bits) - 1);
#pragma omp parallel for schedule(static) if (chunks > 4096)
    for (int64_t c = 0; c < chunks; c++) {
        for (int j = 0; j < MS_CHUNK; j++) {
            uint8_t b = 0;
            for (int v = 0; v < planes; v++) {
                const int64_t i = c * w + j + 16 * v;
                if (i < numel) b |= (uint8_t)((codes[i] & mask) << (v * bits));
            }
            out[c * MS_CHUNK + j] = b;
        }
    }
}

/* The inverse of ms_pack. */
void ms_unpack(const uint8_t *packed, int64_t numel, int bits, uint8_t *codes) {
#pragma omp parallel for schedule(static) if (numel > 1 << 18)
    for (int64_t i = 0; i < numel; i++) codes[i] = code_at(packed, i, bits);
}

/* 3-bit planes (2-bit low plane, 1-bit high plane) -> 4-bit chunks: what a slot computes from. */
void ms_widen3(const uint8_t *lo2, const uint8_t *hi1, int64_t numel, uint8_t *out4) {
    const int64_t chunks = (numel + 31) / 32;
#pragma omp parallel for schedule(static) if (chunks > 4096)
    for (int64_t c = 0; c < chunks; c++) {
        for (int j = 0; j < MS_CHUNK; j++) {
            uint8_t b = 0;
            for (int v = 0; v < 2; v++) {
                const int64_t i = c * 32 + j + 16 * v;
                if (i < numel) b |= (uint8_t)((code_at(lo2, i, 2) | (code_at(hi1, i, 1) << 2)) << (4 * v));
            }
            out4[c * MS_CHUNK + j] = b;
        }
    }
}

/* One packed tensor to float32 (the large-batch path: dequantize once, then a BLAS matmul). */
void ms_dequant(int bits, int64_t numel, int64_t g, const uint8_t *codes, const uint16_t *scale,
                const uint16_t *zero, float *out) {
    const int64_t groups = numel / g;
#pragma omp parallel for schedule(static) if (numel > 1 << 18)
    for (int64_t gi = 0; gi < groups; gi++) {
        const float s = h2f(scale[gi]), z = h2f(zero[gi]);
        for (int64_t i = gi * g; i < (gi + 1) * g; i++) out[i] = ((float)code_at(codes, i, bits) - z) * s;
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * The multiply. A tile is R weight rows times T token rows.
 * ------------------------------------------------------------------------------------------------------- */

/* Any shape, float32 activations, w = (q - z) * s as the reference computes it. */
static void rows_scalar(int bits, const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, int64_t N,
                        int64_t K, int64_t g, int64_t n0, int64_t n1, const float *x, int64_t T, float *y) {
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t t0 = 0; t0 < T; t0 += 4) {
            const int64_t tb = T - t0 < 4 ? T - t0 : 4;
            float acc[4][8] = {{0}};
            for (int64_t k = 0; k < K; k++) {
                const int64_t i = n * K + k, gi = i / g;
                const float w = ((float)code_at(codes, i, bits) - h2f(zero[gi])) * h2f(scale[gi]);
                for (int64_t t = 0; t < tb; t++) acc[t][k & 7] = fmaf(w, x[(t0 + t) * K + k], acc[t][k & 7]);
            }
            for (int64_t t = 0; t < tb; t++) {
                float sum = 0.f;
                for (int l = 0; l < 8; l++) sum += acc[t][l];
                y[(t0 + t) * N + n] = sum;
            }
        }
    }
}

#if MS_AVX2
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rows n0 .. n0 + R of one expert against T tokens given as int16 `xq` [T, K] with per-(token, group) scales
 * `xs` [T, G] and sums of the dequantized activations `xsum` [T, G]. Needs K % W == 0, g % 16 == 0, K % g == 0. */
static inline __attribute__((always_inline)) void tile_i16(
    const int bits, const int R, const int T, const uint8_t *codes, const uint16_t *scale, const uint16_t *zero,
    int64_t K, int64_t g, int64_t n0, const int16_t *xq, const float *xs, const float *xsum, float *y, int64_t ldy) {
    const int P = 8 / bits;                  /* vectors of 16 weights per chunk */
    const int64_t W = 16 * P, gvec = g / 16, G = K / g, chunks = K / W;
    const __m256i mask = _mm256_set1_epi16((short)((1 << bits) - 1));
    __m256 tot[4][4];
    __m256i acc[4][4];
    float zt[4][4];
    const uint8_t *cp[4];
    const uint16_t *sp[4], *zp[4];
    for (int r = 0; r < R; r++) {
        cp[r] = codes + (n0 + r) * chunks * MS_CHUNK;
        sp[r] = scale + (n0 + r) * G;
        zp[r] = zero + (n0 + r) * G;
        for (int t = 0; t < T; t++) {
            tot[r][t] = _mm256_setzero_ps();
            acc[r][t] = _mm256_setzero_si256();
            zt[r][t] = 0.f;
        }
    }
    int64_t gi = 0, left = gvec;
    for (int64_t c = 0; c < chunks; c++) {
        __m256i raw[4];
        if ((c & 3) == 0)  /* the next tile's rows, a cache line ahead per row: short row streams train the
                              hardware prefetcher too late */
            for (int r = 0; r < R; r++) _mm_prefetch((const char *)(cp[r] + (R + 0) * chunks * MS_CHUNK + c * MS_CHUNK), _MM_HINT_T0);
        for (int r = 0; r < R; r++)
            raw[r] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(cp[r] + c * MS_CHUNK)));
        for (int v = 0; v < P; v++) {
            __m256i xv[4];
            for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_si256((const __m256i *)(xq + t * K + c * W + 16 * v));
            for (int r = 0; r < R; r++) {
                const __m256i q = bits == 8 ? raw[r]
                                  : v == 0 ? _mm256_and_si256(raw[r], mask)
                                  : v == P - 1 ? _mm256_srli_epi16(raw[r], v * bits)
                                  : _mm256_and_si256(_mm256_srli_epi16(raw[r], v * bits), mask);
                for (int t = 0; t < T; t++) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(q, xv[t]));
            }
            if (--left == 0) {  /* end of a group: its scales and zero */
                for (int r = 0; r < R; r++) {
                    const float s = h2f(sp[r][gi]), sz = s * h2f(zp[r][gi]);
                    for (int t = 0; t < T; t++) {
                        tot[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][t]), _mm256_set1_ps(s * xs[t * G + gi]),
                                                    tot[r][t]);
                        acc[r][t] = _mm256_setzero_si256();
                        zt[r][t] = fmaf(sz, xsum[t * G + gi], zt[r][t]);
                    }
                }
                gi++;
                left = gvec;
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) y[t * ldy + n0 + r] = hsum256(tot[r][t]) - zt[r][t];
}

#define MS_CASES(R, T)                                                                                       \
    switch (bits) {                                                                                          \
    case 2: tile_i16(2, R, T, codes, scale, zero, K, g, n, xq_t, xs_t, xsum_t, y_t, N); break;               \
    case 4: tile_i16(4, R, T, codes, scale, zero, K, g, n, xq_t, xs_t, xsum_t, y_t, N); break;               \
    default: tile_i16(8, R, T, codes, scale, zero, K, g, n, xq_t, xs_t, xsum_t, y_t, N); break;              \
    }

/* Rows [n0, n1) of one expert for its T tokens: tokens in blocks of up to 4, rows in tiles of 4, 2 or 1 so
 * that the accumulators stay in registers. */
static void rows_i16(int bits, const uint8_t *codes, const uint16_t *scale, const uint16_t *zero, int64_t N,
                     int64_t K, int64_t g, int64_t n0, int64_t n1, const int16_t *xq, const float *xs,
                     const float *xsum, int64_t T, float *y) {
    const int64_t G = K / g;
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const int64_t tb = T - t0 < 4 ? T - t0 : 4;
        const int16_t *xq_t = xq + t0 * K;
        const float *xs_t = xs + t0 * G, *xsum_t = xsum + t0 * G;
        float *y_t = y + t0 * N;
        int64_t n = n0;
        if (tb == 1) {
            for (; n + 4 <= n1; n += 4) MS_CASES(4, 1)
            for (; n < n1; n++) MS_CASES(1, 1)
        } else if (tb == 2) {
            for (; n + 2 <= n1; n += 2) MS_CASES(2, 2)
            for (; n < n1; n++) MS_CASES(1, 2)
        } else if (tb == 3) {
            for (; n < n1; n++) MS_CASES(1, 3)
        } else {
            for (; n < n1; n++) MS_CASES(1, 4)
        }
    }
}
#undef MS_CASES

/* x [S, K] float32 -> xq [S, K] int16, xs [S, G] its scales, xsum [S, G] the sums of xq * xs per group. */
static void quantize_activations(const float *x, int64_t S, int64_t K, int64_t g, int16_t *xq, float *xs,
                                 float *xsum) {
    const int64_t G = K / g;
#pragma omp parallel for schedule(static) if (S * K > 1 << 16)
    for (int64_t sg = 0; sg < S * G; sg++) {
        const float *xg = x + sg * g;
        int16_t *qg = xq + sg * g;
        float amax = 0.f;
        for (int64_t k = 0; k < g; k++) amax = fmaxf(amax, fabsf(xg[k]));
        const float scale = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / scale;
        int32_t sum = 0;
        for (int64_t k = 0; k < g; k++) {
            const int32_t q = (int32_t)nearbyintf(xg[k] * inv);
            qg[k] = (int16_t)q;
            sum += q;
        }
        xs[sg] = scale;
        xsum[sg] = (float)sum * scale;
    }
}
#endif

/* Whether ms_qmm_grouped takes the fast path for this shape (the Python side sizes its scratch by it). */
int ms_fast_path(int bits, int64_t K, int64_t g) {
#if MS_AVX2
    const int64_t w = 128 / bits;
    const double maxq = (double)((1 << bits) - 1);
    /* int32 accumulators of one group must not overflow: g / 16 sums of two products per lane */
    return (bits == 2 || bits == 4 || bits == 8) && K % w == 0 && g % 16 == 0 && K % g == 0 &&
           (double)(g / 16) * 2.0 * maxq * 32767.0 < 2147483647.0;
#else
    (void)bits; (void)K; (void)g;
    return 0;
#endif
}

/* Several experts' packed [N, K] weights applied to their own token rows in one call.
 *   x [S, K] float32, rows grouped by expert: expert i owns rows [row_start[i], row_start[i + 1]).
 *   y [S, N] float32, written row for row.
 *   Expert i's codes, scales and zeros start at base + slot[i] * stride + {codes,scale,zero}_off (a layer's
 *   slab of slots, or one buffer with stride 0).
 *   scratch: S * K int16 and 2 * S * (K / g) float32 when ms_fast_path(bits, K, g), else unused.
 * Work is split over (expert, block of `row_block` output rows) across the OpenMP threads. */
void ms_qmm_grouped(int bits, int64_t N, int64_t K, int64_t g, const float *x, float *y, const uint8_t *base,
                    int64_t stride, int64_t codes_off, int64_t scale_off, int64_t zero_off, const int64_t *slot,
                    const int64_t *row_start, int64_t n_experts, int64_t row_block, void *scratch) {
    const int64_t blocks = (N + row_block - 1) / row_block, items = n_experts * blocks;
#if MS_AVX2
    const int fast = ms_fast_path(bits, K, g);
    const int64_t S = row_start[n_experts], G = K / g;
    int16_t *xq = (int16_t *)scratch;
    float *xs = (float *)(xq + S * K), *xsum = xs + S * G;
    if (fast) quantize_activations(x, S, K, g, xq, xs, xsum);
#else
    (void)scratch;
#endif
#pragma omp parallel for schedule(dynamic, 1) if (items > 1)
    for (int64_t it = 0; it < items; it++) {
        const int64_t e = it / blocks, b = it % blocks;
        const int64_t t0 = row_start[e], T = row_start[e + 1] - t0;
        if (T <= 0) continue;
        const uint8_t *buf = base + slot[e] * stride;
        const int64_t n0 = b * row_block, n1 = n0 + row_block < N ? n0 + row_block : N;
        const uint8_t *codes = buf + codes_off;
        const uint16_t *scale = (const uint16_t *)(buf + scale_off), *zero = (const uint16_t *)(buf + zero_off);
#if MS_AVX2
        if (fast) {
            rows_i16(bits, codes, scale, zero, N, K, g, n0, n1, xq + t0 * K, xs + t0 * G, xsum + t0 * G, T,
                     y + t0 * N);
            continue;
        }
#endif
        rows_scalar(bits, codes, scale, zero, N, K, g, n0, n1, x + t0 * K, T, y + t0 * N);
    }
}

/* ---------------------------------------------------------------------------------------------------------
 * The HQQ proximal quantizer (hqq.core.optimize.optimize_weights_proximal_legacy: lp-norm shrinkage of the
 * error, zero-point updates, scale fixed) run group by group with the group in registers, instead of ~15
 * passes over the whole tensor per iteration. Each group keeps the zero with its lowest mean error (hqq stops
 * all groups at the first iteration whose error over the whole tensor rises, and keeps the zero computed in
 * that iteration). Outputs: codes one per byte, scale = 1 / hqq's internal scale, zero, float32 per group.
 * ------------------------------------------------------------------------------------------------------- */
#if MS_AVX2
/* x^p for x > 0 (p < 0 here), about 1e-4 relative: exp2(p * log2(x)) with short polynomials. */
static inline __m256 pow_pos(__m256 x, float p) {
    const __m256i xi = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127)));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007fffff)),
                                                   _mm256_set1_epi32(0x3f800000)));  /* [1, 2) */
    /* log2(m) on [1, 2) = t * poly(t), t = m - 1: least-squares fit, |error| < 3e-5 */
    __m256 t = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
    __m256 l = _mm256_set1_ps(0.04588553f);
    l = _mm256_fmadd_ps(l, t, _mm256_set1_ps(-0.19442267f));
    l = _mm256_fmadd_ps(l, t, _mm256_set1_ps(0.41542195f));
    l = _mm256_fmadd_ps(l, t, _mm256_set1_ps(-0.7086821f));
    l = _mm256_fmadd_ps(l, t, _mm256_set1_ps(1.4418258f));
    l = _mm256_mul_ps(l, t);
    __m256 y = _mm256_mul_ps(_mm256_add_ps(e, l), _mm256_set1_ps(p));
    y = _mm256_max_ps(y, _mm256_set1_ps(-126.0f));
    y = _mm256_min_ps(y, _mm256_set1_ps(126.0f));
    __m256 yi = _mm256_floor_ps(y), yf = _mm256_sub_ps(y, yi);
    /* exp2 on [0, 1): least-squares fit, relative error < 1e-5 */
    __m256 q = _mm256_set1_ps(0.01367653f);
    q = _mm256_fmadd_ps(q, yf, _mm256_set1_ps(0.05166688f));
    q = _mm256_fmadd_ps(q, yf, _mm256_set1_ps(0.24171026f));
    q = _mm256_fmadd_ps(q, yf, _mm256_set1_ps(0.69293129f));
    q = _mm256_fmadd_ps(q, yf, _mm256_set1_ps(1.00000728f));
    __m256i ex = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(yi), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(q, _mm256_castsi256_ps(ex));
}

static inline float hmin256(__m256 v) {
    __m128 s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    s = _mm_min_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float pow_pos_scalar(float x, float p) { return powf(x, p); }

static void quantize_group(const float *w, int64_t g, float maxq, int iters, float lp, float beta, uint8_t *q_out,
                           float *scale_out, float *zero_out) {
    float lo = w[0], hi = w[0];
    int64_t i = 0;
#if MS_AVX2
    if (g % 8 == 0) {
        __m256 vlo = _mm256_loadu_ps(w), vhi = vlo;
        for (i = 8; i < g; i += 8) {
            __m256 v = _mm256_loadu_ps(w + i);
            vlo = _mm256_min_ps(vlo, v);
            vhi = _mm256_max_ps(vhi, v);
        }
        lo = hmin256(vlo);
        hi = hmax256(vhi);
    }
#endif
    for (; i < g; i++) {
        lo = w[i] < lo ? w[i] : lo;
        hi = w[i] > hi ? w[i] : hi;
    }
    const float denom = hi - lo;
    float s = fabsf(denom) <= 1e-4f ? 1.0f : maxq / denom;
    s = s > 2e4f ? 2e4f : s;
    float z = -lo * s, best_z = z, best_err = INFINITY;
    const float inv_beta = 1.0f / beta, p = lp - 1.0f;
    for (int it = 0; it < iters; it++) {
        float err = 0.f, acc = 0.f;
        i = 0;
#if MS_AVX2
        if (g % 8 == 0) {
            const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), vmax = _mm256_set1_ps(maxq);
            const __m256 zero8 = _mm256_setzero_ps(), absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
            __m256 verr = zero8, vacc = zero8;
            for (; i < g; i += 8) {
                __m256 wf = _mm256_loadu_ps(w + i);
                __m256 q = _mm256_round_ps(_mm256_fmadd_ps(wf, vs, vz), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q = _mm256_min_ps(_mm256_max_ps(q, zero8), vmax);
                __m256 r = _mm256_div_ps(_mm256_sub_ps(q, vz), vs);
                __m256 e = _mm256_sub_ps(wf, r);
                __m256 a = _mm256_and_ps(e, absmask);
                verr = _mm256_add_ps(verr, a);
                /* shrink: sign(e) * max(|e| - |e|^(p) / beta, 0); |e| = 0 gives 0 */
                __m256 pw = pow_pos(_mm256_max_ps(a, _mm256_set1_ps(1e-30f)), p);
                __m256 sh = _mm256_max_ps(_mm256_fnmadd_ps(pw, _mm256_set1_ps(inv_beta), a), zero8);
                sh = _mm256_and_ps(sh, _mm256_cmp_ps(a, zero8, _CMP_GT_OQ));
                sh = _mm256_or_ps(sh, _mm256_andnot_ps(absmask, e));  /* copy the sign of e */
                /* zero update: mean(q - (w - shrunk) * s) */
                vacc = _mm256_add_ps(vacc, _mm256_fnmadd_ps(_mm256_sub_ps(wf, sh), vs, q));
            }
            err = hsum256(verr);
            acc = hsum256(vacc);
        }
#endif
        for (; i < g; i++) {
            float q = nearbyintf(fmaf(w[i], s, z));
            q = q < 0.f ? 0.f : (q > maxq ? maxq : q);
            const float e = w[i] - (q - z) / s, a = fabsf(e);
            err += a;
            float sh = a > 0.f ? a - pow_pos_scalar(a, p) * inv_beta : 0.f;
            sh = sh > 0.f ? copysignf(sh, e) : 0.f;
            acc += q - (w[i] - sh) * s;
        }
        if (err < best_err) {
            best_err = err;
            best_z = z;
        } else {
            break;
        }
        z = acc / (float)g;
    }
    for (i = 0; i < g; i++) {
        float q = nearbyintf(fmaf(w[i], s, best_z));
        q = q < 0.f ? 0.f : (q > maxq ? maxq : q);
        q_out[i] = (uint8_t)q;
    }
    *scale_out = 1.0f / s;
    *zero_out = best_z;
}

/* w [groups * g] float32 -> codes [groups * g] (one per byte), scale [groups], zero [groups]. */
void ms_quantize(const float *w, int64_t groups, int64_t g, int bits, int iters, float lp, float beta,
                 uint8_t *codes, float *scale, float *zero) {
    const float maxq = (float)((1 << bits) - 1);
#pragma omp parallel for schedule(static, 64)
    for (int64_t gi = 0; gi < groups; gi++)
        quantize_group(w + gi * g, g, maxq, iters, lp, beta, codes + gi * g, scale + gi, zero + gi);
}
