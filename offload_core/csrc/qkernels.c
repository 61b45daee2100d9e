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
 * Kernel order: where g % 16 == 0 and K % g == 0, each row's codes are stored in the order the fast path reads
 * them. A row is cut into blocks of m groups (m = 8 while 8 remain, then 4, 2, 1); in a block, vector j holds
 * in its 16-bit lanes 2p, 2p + 1 the weights at 2j, 2j + 1 of slice p / m of group p % m (a group is cut into
 * 8 / m slices of g m / 8). After vpmaddwd each 32-bit lane belongs to one group, so a block's 8 groups are
 * scaled by one lane-wise multiply-add instead of one per group (which cost more than the products at g = 16).
 *
 * The fast path (AVX2) quantizes each token's activations to int16 per group of g (a scale per token and
 * group: relative error below 2^-16 of the group's largest value, a hundred times finer than bfloat16) and
 * multiplies them with the codes in integers (vpmaddwd: 16 multiply-adds an instruction), applying the
 * weights' scale and zero once per group: y = sum_g s_g (sum q x' - z_g sum x'). Shapes it does not cover
 * (K % W, g % 16, groups that span rows) and CPUs without AVX2 are left to the caller (which dequantizes in
 * torch: tiny test models and the demo's odd shapes).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MS_AVX2 1
#else
#define MS_AVX2 0
#endif

/* T = token rows of one expert, R = weight rows of a tile, N = output features, K = input features,
 * G = groups per row (K / g) */

#define MS_CHUNK 16  /* bytes per chunk of codes */

int ms_version(void) { return 10; }
int ms_has_avx2(void) { return MS_AVX2; }

/* The code of flat index i in a tensor packed at `bits`. */
static inline uint8_t code_at(const uint8_t *packed, int64_t i, int bits) {
    const int64_t w = 128 / bits, r = i % w;
    return (packed[(i / w) * MS_CHUNK + (r & 15)] >> ((r >> 4) * bits)) & ((1u << bits) - 1);
}

/* Whether a [N, K] tensor in groups of g is stored in kernel order (a property of the shape alone). */
static inline int ordered(int64_t K, int64_t g) { return g % 16 == 0 && K % g == 0; }

/* The block of m groups that holds group ga of a row of G groups: its first group. */
static inline int64_t block_of(int64_t ga, int64_t G, int64_t *m) {
    const int64_t full = G / 8 * 8;
    if (ga < full) {
        *m = 8;
        return ga - ga % 8;
    }
    int64_t gb = full;
    for (int64_t size = 4; size >= 1; size /= 2) {
        if ((G - full) & size) {
            if (ga < gb + size) {
                *m = size;
                return gb;
            }
            gb += size;
        }
    }
    *m = 1;  /* unreachable for ga < G */
    return ga;
}

/* Kernel-order position of the weight at natural position k of a row (K, g ordered). */
static inline int64_t kernel_pos(int64_t k, int64_t K, int64_t g) {
    int64_t m;
    const int64_t ga = k / g, gb = block_of(ga, K / g, &m), slice = g * m / 8, off = k - ga * g;
    const int64_t sub = off / slice, w = off % slice, p = sub * m + (ga - gb);
    return gb * g + (w / 2) * 16 + 2 * p + (w & 1);
}

/* codes [N, K] one per byte, natural order -> kernel order (or a copy where the shape is not ordered). */
void ms_order(const uint8_t *codes, int64_t N, int64_t K, int64_t g, uint8_t *out) {
    const int o = ordered(K, g);
#pragma omp parallel for schedule(static) if (N * K > 1 << 18)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) out[n * K + (o ? kernel_pos(k, K, g) : k)] = codes[n * K + k];
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

/* ---------------------------------------------------------------------------------------------------------
 * The multiply. A tile is R weight rows times T token rows.
 * ------------------------------------------------------------------------------------------------------- */

#if MS_AVX2
/* The 8 lanes of a vector reduced to one float by `op` (add, min, max): hsum256, hmin256, hmax256. */
#define MS_HREDUCE(name, op)                                                                                 \
    static inline float name(__m256 v) {                                                                     \
        __m128 s = _mm_##op##_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));                    \
        s = _mm_##op##_ps(s, _mm_movehl_ps(s, s));                                                           \
        return _mm_cvtss_f32(_mm_##op##_ss(s, _mm_movehdup_ps(s)));                                          \
    }
MS_HREDUCE(hsum256, add)
MS_HREDUCE(hmin256, min)
MS_HREDUCE(hmax256, max)
#undef MS_HREDUCE

/* A mask of the lanes below n (0 < n < 8). */
static inline __m256 lanes_below(int64_t n) {
    static const int32_t window[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_ps((const float *)(window + 8 - n));
}

/* Rows n0 .. n0 + R of one expert against T tokens given as int16 `xq` [T, K] (in kernel order) with
 * per-(token, group) scales `xs` [T, Gp] and sums of the dequantized activations `xsum` [T, Gp] (Gp = G rounded
 * up to 8, zero-padded). Needs ordered(K, g) and K % W == 0, and 8 readable float16s after the last scale and
 * zero of the tensor (the formats pad them). */
static inline __attribute__((always_inline)) void tile_i16(
    const int bits, const int R, const int T, const uint8_t *codes, const uint16_t *scale, const uint16_t *zero,
    int64_t K, int64_t g, int64_t n0, const int16_t *xq, const float *xs, const float *xsum, float *y, int64_t ldy) {
    const int P = 8 / bits;                  /* vectors of 16 weights per chunk */
    const int64_t W = 16 * P, G = K / g, Gp = (G + 7) / 8 * 8, chunks = K / W, gv = g / 16;
    const __m256i mask = _mm256_set1_epi16((short)((1 << bits) - 1));
    __m256 tot[4][4];
    __m256i acc[4][4];
    const uint8_t *cp[4];
    const uint16_t *sp[4], *zp[4];
    for (int r = 0; r < R; r++) {
        cp[r] = codes + (n0 + r) * chunks * MS_CHUNK;
        sp[r] = scale + (n0 + r) * G;
        zp[r] = zero + (n0 + r) * G;
        for (int t = 0; t < T; t++) {
            tot[r][t] = _mm256_setzero_ps();
            acc[r][t] = _mm256_setzero_si256();
        }
    }
    int64_t u = 0;  /* vectors of the row done */
    __m256i raw[4];
    for (int64_t gb = 0, m = 8; gb < G; gb += m) {
        m = G - gb >= 8 ? 8 : (G - gb >= 4 ? 4 : (G - gb >= 2 ? 2 : 1));
        const int64_t nvec = m * gv;
        if (u % P == 0 && nvec % P == 0) {  /* whole chunks: planes known at compile time */
            for (int64_t c = u / P; c < (u + nvec) / P; c++) {
                if ((c & 3) == 0)  /* the next tile's rows, a cache line ahead per row: short row streams train
                                      the hardware prefetcher too late */
                    for (int r = 0; r < R; r++)
                        _mm_prefetch((const char *)(cp[r] + R * chunks * MS_CHUNK + c * MS_CHUNK), _MM_HINT_T0);
                for (int r = 0; r < R; r++)
                    raw[r] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(cp[r] + c * MS_CHUNK)));
                for (int v = 0; v < P; v++) {
                    __m256i xv[4];
                    for (int t = 0; t < T; t++)
                        xv[t] = _mm256_loadu_si256((const __m256i *)(xq + t * K + c * W + 16 * v));
                    for (int r = 0; r < R; r++) {
                        const __m256i q = bits == 8 ? raw[r]
                                          : v == 0 ? _mm256_and_si256(raw[r], mask)
                                          : v == P - 1 ? _mm256_srli_epi16(raw[r], v * bits)
                                          : _mm256_and_si256(_mm256_srli_epi16(raw[r], v * bits), mask);
                        for (int t = 0; t < T; t++)
                            acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(q, xv[t]));
                    }
                }
            }
        } else {  /* a chunk straddles blocks (the row's last groups): planes chosen at run time */
            for (int64_t uu = u; uu < u + nvec; uu++) {
                const int64_t c = uu / P;
                const __m128i shift = _mm_cvtsi32_si128((int)(uu % P) * bits);
                __m256i xv[4];
                for (int t = 0; t < T; t++) xv[t] = _mm256_loadu_si256((const __m256i *)(xq + t * K + uu * 16));
                for (int r = 0; r < R; r++) {
                    const __m256i q = _mm256_and_si256(
                        _mm256_srl_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(cp[r] + c * MS_CHUNK))),
                                         shift), mask);
                    for (int t = 0; t < T; t++) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(q, xv[t]));
                }
            }
        }
        u += nvec;
        /* end of a block: lane p of the sums belongs to group gb + p % m */
        const __m256i lanes = _mm256_setr_epi32(0, 1 % m, 2 % m, 3 % m, 4 % m, 5 % m, 6 % m, 7 % m);
        for (int r = 0; r < R; r++) {
            /* eight scales, whatever is left in the row: lanes past its end (the next row's, or the tensor's
               padding) are masked off */
            __m256 s8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sp[r] + gb)));
            if (G - gb < 8) s8 = _mm256_and_ps(s8, lanes_below(G - gb));
            for (int t = 0; t < T; t++) {
                __m256 f = _mm256_mul_ps(s8, _mm256_loadu_ps(xs + t * Gp + gb));
                if (m != 8) f = _mm256_permutevar8x32_ps(f, lanes);
                tot[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][t]), f, tot[r][t]);
                acc[r][t] = _mm256_setzero_si256();
            }
        }
    }
    /* the zeros' term, sum over the row's groups of s z sum x', eight groups at a time */
    for (int r = 0; r < R; r++) {
        __m256 zacc[4];
        for (int t = 0; t < T; t++) zacc[t] = _mm256_setzero_ps();
        for (int64_t gi = 0; gi < G; gi += 8) {
            __m256 sz8 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sp[r] + gi))),
                                       _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zp[r] + gi))));
            if (G - gi < 8) sz8 = _mm256_and_ps(sz8, lanes_below(G - gi));
            for (int t = 0; t < T; t++) zacc[t] = _mm256_fmadd_ps(sz8, _mm256_loadu_ps(xsum + t * Gp + gi), zacc[t]);
        }
        for (int t = 0; t < T; t++) y[t * ldy + n0 + r] = hsum256(tot[r][t]) - hsum256(zacc[t]);
    }
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
    const int64_t Gp = (K / g + 7) / 8 * 8;
    for (int64_t t0 = 0; t0 < T; t0 += 4) {
        const int64_t tb = T - t0 < 4 ? T - t0 : 4;
        const int16_t *xq_t = xq + t0 * K;
        const float *xs_t = xs + t0 * Gp, *xsum_t = xsum + t0 * Gp;
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

/* x [S, K] float32 -> xq [S, K] int16 in kernel order, xs [S, Gp] its scales, xsum [S, Gp] the sums of
 * xq * xs per group (rows padded with zeros to Gp, a multiple of 8 groups). `tmp` holds K int16 per thread. */
static void quantize_activations(const float *x, int64_t S, int64_t K, int64_t g, int16_t *xq, float *xs,
                                 float *xsum, int16_t *tmp, int threads) {
    const int64_t G = K / g, Gp = (G + 7) / 8 * 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (S * K > 1 << 17)
    for (int64_t row = 0; row < S; row++) {
        const float *xr = x + row * K;
#ifdef _OPENMP
        int16_t *nat = tmp + (int64_t)omp_get_thread_num() * K;
#else
        int16_t *nat = tmp;
#endif
        for (int64_t gi = 0; gi < Gp; gi++) {
            if (gi >= G) {
                xs[row * Gp + gi] = 0.f;
                xsum[row * Gp + gi] = 0.f;
                continue;
            }
            const float *xg = xr + gi * g;
            __m256 vmax = _mm256_setzero_ps();
            const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
            for (int64_t k = 0; k < g; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xg + k), absmask));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
            const float scale = amax > 0.f ? amax / 32767.f : 1.f;
            const __m256 inv = _mm256_set1_ps(1.f / scale);
            __m256i vsum = _mm256_setzero_si256();
            for (int64_t k = 0; k < g; k += 16) {  /* round to nearest even, as nearbyintf */
                const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k), inv));
                const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xg + k + 8), inv));
                vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(a, b));
                const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
                _mm256_storeu_si256((__m256i *)(nat + gi * g + k), packed);
            }
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(vsum), _mm256_extracti128_si256(vsum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            xs[row * Gp + gi] = scale;
            xsum[row * Gp + gi] = (float)_mm_cvtsi128_si32(s4) * scale;
        }
        /* natural order -> kernel order: pairs of int16 move as 32-bit words, block by block */
        const uint32_t *src = (const uint32_t *)nat;
        uint32_t *dst = (uint32_t *)(xq + row * K);
        for (int64_t gb = 0, m; gb < G; gb += m) {
            m = G - gb >= 8 ? 8 : (G - gb >= 4 ? 4 : (G - gb >= 2 ? 2 : 1));
            const int64_t half = g / 2, slice = half * m / 8, base = gb * half;  /* in pairs */
            for (int64_t p = 0; p < 8; p++) {
                const uint32_t *from = src + base + (p % m) * half + (p / m) * slice;
                for (int64_t j = 0; j < slice; j++) dst[base + j * 8 + p] = from[j];
            }
        }
    }
}
#endif

/* Whether ms_qmm_grouped takes the fast path for this shape (the Python side sizes its scratch by it). */
int ms_fast_path(int bits, int64_t K, int64_t g) {
#if MS_AVX2
    const int64_t w = 128 / bits;
    const double maxq = (double)((1 << bits) - 1);
    /* a 32-bit lane sums g / 2 products of pairs in a block of 8 groups: it must not overflow */
    return (bits == 2 || bits == 4 || bits == 8) && ordered(K, g) && K % w == 0 &&
           (double)(g / 2) * 2.0 * maxq * 32767.0 < 2147483647.0;
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
 *   scratch: S * K int16, 2 * S * Gp float32 (Gp = K / g rounded up to 8) and K int16 per OpenMP thread;
 *   `threads` OpenMP threads at most (torch's count: scratch is sized by it).
 * Work is split over (expert, block of `row_block` output rows) across the threads. Returns 0, or -1 where
 * ms_fast_path(bits, K, g) is false (the caller dequantizes those shapes itself). */
int ms_qmm_grouped(int bits, int64_t N, int64_t K, int64_t g, const float *x, float *y, const uint8_t *base,
                   int64_t stride, int64_t codes_off, int64_t scale_off, int64_t zero_off, const int64_t *slot,
                   const int64_t *row_start, int64_t n_experts, int64_t row_block, void *scratch, int threads) {
#if MS_AVX2
    if (!ms_fast_path(bits, K, g)) return -1;
    const int64_t blocks = (N + row_block - 1) / row_block, items = n_experts * blocks;
    const int64_t S = row_start[n_experts], Gp = (K / g + 7) / 8 * 8;
    int16_t *xq = (int16_t *)scratch;
    float *xs = (float *)(xq + S * K), *xsum = xs + S * Gp;
    quantize_activations(x, S, K, g, xq, xs, xsum, (int16_t *)(xsum + S * Gp), threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (items > 1)
    for (int64_t it = 0; it < items; it++) {
        const int64_t e = it / blocks, b = it % blocks;
        const int64_t t0 = row_start[e], T = row_start[e + 1] - t0;
        if (T <= 0) continue;
        const uint8_t *buf = base + slot[e] * stride;
        const int64_t n0 = b * row_block, n1 = n0 + row_block < N ? n0 + row_block : N;
        rows_i16(bits, buf + codes_off, (const uint16_t *)(buf + scale_off), (const uint16_t *)(buf + zero_off), N,
                 K, g, n0, n1, xq + t0 * K, xs + t0 * Gp, xsum + t0 * Gp, T, y + t0 * N);
    }
    return 0;
#else
    (void)bits; (void)N; (void)K; (void)g; (void)x; (void)y; (void)base; (void)stride; (void)codes_off;
    (void)scale_off; (void)zero_off; (void)slot; (void)row_start; (void)n_experts; (void)row_block; (void)scratch;
    (void)threads;
    return -1;
#endif
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
