/*
 * ops_avx2.c — AVX2 + FMA + F16C kernels of the CPU backend (cpu.h,
 * cpu_kernels), for x86-64 CPUs without AVX-512; the drivers in ops_cpu.c do
 * the blocking and threading around them.
 *
 * Compiled with -mavx2 -mfma -mf16c; the getter checks the CPU first. The
 * same scheme as ops_avx512.c at half the width and with 16 registers:
 *   linear, T >= 48: panels [256][16] of floats, register tile 6 x 16 (12 ymm);
 *   linear, T < 48:  "gemv": W read once, in place, 4 weight rows x 2 rows of
 *                    x at a time (crossover measured on Zen 5 with AVX2);
 *   OPS_BF16:       x rounded to bf16, then the float kernels (no bf16 dot
 *                   products in AVX2).
 * AVX2 has no masked 16-bit loads, so tails go through a small zeroed copy.
 * The scalar reference of every kernel is its op in ops_ref.c.
 */
#include <immintrin.h>
#include <math.h>

#include "cpu.h"

#define MR 6
#define NR 16
#define KC 256

#define INLINE static inline __attribute__((always_inline))

static int imin(int a, int b) { return a < b ? a : b; }

/* Lane mask for the first n (0..8) floats of a vector. */
INLINE __m256i mask8(int n) {
    static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(const void *)(m + 8 - (n < 0 ? 0 : n > 8 ? 8 : n)));
}

/* 8 weights of dtype dt widened to float. */
INLINE __m256 ld8(const void *p, dtype dt) {
    switch (dt) {
    case DT_BF16: /* bf16 is the top half of a float: widening is a shift */
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    case DT_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    default: return _mm256_loadu_ps(p);
    }
}

/* The first n (< 8) weights, the rest zero, reading only those n. */
INLINE __m256 ld8_part(const void *p, dtype dt, int n) {
    if (dt == DT_F32) return _mm256_maskload_ps(p, mask8(n));
    uint16_t tmp[8] = {0};
    memcpy(tmp, p, (size_t)n * 2);
    const __m128i h = _mm_loadu_si128((const __m128i *)(const void *)tmp);
    return dt == DT_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

INLINE void tr8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
        r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
}

/* ---- packing and the register tile ------------------------------------------------ */

static void pack_f32_avx2(void *dstv, const void *w, dtype dt, size_t ldw, int nrows, int e0, int ec, int K) {
    (void)K;
    float *dst = dstv;
    const size_t es = dt == DT_F32 ? 4 : 2;
    for (int r0 = 0; r0 < NR; r0 += 8) {
        const int rn = imin(8, nrows - r0);
        for (int k = 0; k < ec; k += 8) {
            const int kn = imin(8, ec - k);
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                const char *p = (const char *)w + ((size_t)(r0 + i) * ldw + e0 + k) * es;
                r[i] = i >= rn ? _mm256_setzero_ps() : kn == 8 ? ld8(p, dt) : ld8_part(p, dt, kn);
            }
            tr8(r);
            for (int i = 0; i < kn; i++) _mm256_storeu_ps(dst + (size_t)(k + i) * NR + r0, r[i]);
        }
    }
}

/* M rows of x x NV ymm of a panel, for constant M and NV. The two halves
 * are spelled out rather than indexed through an array of masks: with the
 * array GCC 12 kept the accumulators on the stack inside the loop (a store
 * per multiply-add, about half the speed). */
INLINE void tile(const int M, const int NV, int kc, const float *x, size_t ldx, const float *wp, float *y, size_t ldy,
                 __m256i m0, __m256i m1, const float *bias, int accumulate) {
    __m256 c[MR][2];
    for (int i = 0; i < M; i++) {
        c[i][0] = accumulate ? _mm256_maskload_ps(y + (size_t)i * ldy, m0)
                  : bias     ? _mm256_maskload_ps(bias, m0)
                             : _mm256_setzero_ps();
        if (NV == 2)
            c[i][1] = accumulate ? _mm256_maskload_ps(y + (size_t)i * ldy + 8, m1)
                      : bias     ? _mm256_maskload_ps(bias + 8, m1)
                                 : _mm256_setzero_ps();
    }
    for (int e = 0; e < kc; e++) {
        const __m256 w0 = _mm256_loadu_ps(wp + (size_t)e * NR);
        const __m256 w1 = NV == 2 ? _mm256_loadu_ps(wp + (size_t)e * NR + 8) : w0;
        for (int i = 0; i < M; i++) {
            const __m256 xb = _mm256_set1_ps(x[(size_t)i * ldx + e]);
            c[i][0] = _mm256_fmadd_ps(xb, w0, c[i][0]);
            if (NV == 2) c[i][1] = _mm256_fmadd_ps(xb, w1, c[i][1]);
        }
    }
    for (int i = 0; i < M; i++) {
        _mm256_maskstore_ps(y + (size_t)i * ldy, m0, c[i][0]);
        if (NV == 2) _mm256_maskstore_ps(y + (size_t)i * ldy + 8, m1, c[i][1]);
    }
}

#define TILE_CASES(NV)                                                             \
    switch (mr) {                                                                  \
    case 1: tile(1, NV, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;  \
    case 2: tile(2, NV, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;  \
    case 3: tile(3, NV, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;  \
    case 4: tile(4, NV, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;  \
    case 5: tile(5, NV, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;  \
    default: tile(6, NV, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break; \
    }

static void gemm_f32_avx2(int mr, int kc, const void *xv, size_t ldx, const void *wpv, float *y, size_t ldy, int ncols,
                          const float *bias, int accumulate) {
    const float *x = xv, *wp = wpv;
    const __m256i m0 = mask8(ncols), m1 = mask8(ncols - 8);
    if (ncols > 8) TILE_CASES(2) else TILE_CASES(1)
}

static const cpu_gemm gemm_f32 = {MR, NR, KC, 0, pack_f32_avx2, gemm_f32_avx2};

/* ---- gemv -------------------------------------------------------------------------
 * One weight row at a time, front to back: a thread's share of W is one
 * sequential stream, prefetched PF_AHEAD bytes ahead across rows and pages
 * (as ops_avx512.c, where it measured 45 GB/s against 32 for four
 * interleaved rows). The row meets the rows of x two at a time, from L1
 * after the first pair; four accumulators per row of x. */

#define PF_AHEAD 2048

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE void gemv_row(const int TN, const dtype DT, int K, const float *x, size_t ldx, const char *wr, float out[2]) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    __m256 acc[2][4];
    for (int t = 0; t < TN; t++)
        for (int u = 0; u < 4; u++) acc[t][u] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        const char *p = wr + (size_t)k * es;
        for (int l = 0; l < (int)(32 * es); l += 64) _mm_prefetch(p + PF_AHEAD + l, _MM_HINT_T0);
        __m256 w[4];
        for (int u = 0; u < 4; u++) w[u] = ld8(p + (size_t)u * 8 * es, DT);
        for (int t = 0; t < TN; t++)
            for (int u = 0; u < 4; u++)
                acc[t][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (size_t)t * ldx + k + 8 * u), w[u], acc[t][u]);
    }
    for (; k + 8 <= K; k += 8) {
        const __m256 w = ld8(wr + (size_t)k * es, DT);
        for (int t = 0; t < TN; t++)
            acc[t][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (size_t)t * ldx + k), w, acc[t][0]);
    }
    if (k < K) {
        const __m256 w = ld8_part(wr + (size_t)k * es, DT, K - k);
        for (int t = 0; t < TN; t++)
            acc[t][0] = _mm256_fmadd_ps(_mm256_maskload_ps(x + (size_t)t * ldx + k, mask8(K - k)), w, acc[t][0]);
    }
    for (int t = 0; t < TN; t++)
        out[t] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
}

INLINE void gemv_dt(const dtype DT, int T, int K, const float *x, size_t ldx, const void *w, const void *b, dtype bdt,
                    int n0, int n1, float *y, size_t ldy) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    for (int n = n0; n < n1; n++) {
        const char *wr = (const char *)w + (size_t)n * K * es;
        const float bn = b ? cpu_ld(b, bdt, (size_t)n) : 0.0f;
        for (int t0 = 0; t0 < T; t0 += 2) {
            float s[2];
            const int tn = imin(2, T - t0);
            if (tn == 2)
                gemv_row(2, DT, K, x + (size_t)t0 * ldx, ldx, wr, s);
            else
                gemv_row(1, DT, K, x + (size_t)t0 * ldx, ldx, wr, s);
            for (int t = 0; t < tn; t++) y[(size_t)(t0 + t) * ldy + n] = s[t] + bn;
        }
    }
}

static void gemv_avx2(int T, int K, const float *x, size_t ldx, const void *w, dtype dt, const void *b, dtype bdt,
                      int n0, int n1, float *y, size_t ldy) {
    switch (dt) {
    case DT_BF16: gemv_dt(DT_BF16, T, K, x, ldx, w, b, bdt, n0, n1, y, ldy); break;
    case DT_F16: gemv_dt(DT_F16, T, K, x, ldx, w, b, bdt, n0, n1, y, ldy); break;
    default: gemv_dt(DT_F32, T, K, x, ldx, w, b, bdt, n0, n1, y, ldy); break;
    }
}

/* ---- bf16 rounding ------------------------------------------------------------------ */

/* Round to nearest even on the bit pattern, as f32_to_bf16 (common.h). */
INLINE __m256 round_bf16_8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
    return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
}

static void round_bf16_avx2(float *dst, const float *src, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, round_bf16_8(_mm256_loadu_ps(src + i)));
    if (i < n) {
        const __m256i m = mask8(n - i);
        _mm256_maskstore_ps(dst + i, m, round_bf16_8(_mm256_maskload_ps(src + i, m)));
    }
}

/* ---- exp and friends ------------------------------------------------------------------
 * exp(x) = 2^n e^r with the Cephes expf polynomial (about 1 ulp). 2^n is
 * built in the exponent field in two halves, so that n from -150 to 145
 * gives the right denormal, 0 or inf after the two multiplies. */
INLINE __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(100.0f)), _mm256_set1_ps(-104.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

static float softmax_avx2(float *s, int n, float scale) {
    const __m256 sc = _mm256_set1_ps(scale);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) mx = _mm256_max_ps(mx, _mm256_mul_ps(_mm256_loadu_ps(s + i), sc));
    float m = -INFINITY, tail[8];
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    m = _mm_cvtss_f32(h);
    for (int j = i; j < n; j++) m = fmaxf(m, s[j] * scale);
    const __m256 vm = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        const __m256 p = exp256(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(s + i), sc), vm));
        _mm256_storeu_ps(s + i, p);
        sum = _mm256_add_ps(sum, p);
    }
    float total = hsum8(sum);
    if (i < n) {
        const __m256i mk = mask8(n - i);
        const __m256 p = exp256(_mm256_sub_ps(_mm256_mul_ps(_mm256_maskload_ps(s + i, mk), sc), vm));
        _mm256_storeu_ps(tail, p);
        for (int j = 0; j < n - i; j++) {
            s[i + j] = tail[j];
            total += tail[j];
        }
    }
    return total;
}

/* 8 e4m3 bytes (the low 8 of b) widened to float in registers, exactly:
 * the half trick of ops_avx512.c's e4m3x16 (sign-extend to 16 bits, shift
 * the exponent and mantissa into a half's, vcvtph2ps, times 2^8; never a
 * float subnormal operand), NaN for S.1111.111. */
static inline __m256 e4m3x8(__m128i b) {
    const __m128i h = _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(b), 7), _mm_set1_epi16((short)0xbf80));
    const __m128i nan16 = _mm_cmpeq_epi16(_mm_and_si128(h, _mm_set1_epi16(0x3f80)), _mm_set1_epi16(0x3f80));
    const __m256 nan = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(nan16));
    return _mm256_blendv_ps(_mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f)), _mm256_set1_ps(NAN), nan);
}

/* 8 KV elements of dtype dt (DT_F32, DT_BF16 or DT_E4M3) at element i of
 * row p; left (< 8: a tail) of them exist, the rest read as zero and are
 * not touched. */
static inline __m256 ldkv8(const void *p, dtype dt, size_t i, int left, __m256i m) {
    if (dt == DT_E4M3) {
        const uint8_t *b = (const uint8_t *)p + i;
        uint64_t u = 0;
        memcpy(&u, b, left >= 8 ? 8 : (size_t)left);
        return e4m3x8(_mm_cvtsi64_si128((long long)u));
    }
    if (dt != DT_BF16) return _mm256_maskload_ps((const float *)p + i, m);
    const uint16_t *h = (const uint16_t *)p + i;
    __m128i u;
    if (left >= 8) {
        u = _mm_loadu_si128((const __m128i *)(const void *)h);
    } else {
        uint16_t tmp[8] = {0};
        for (int l = 0; l < left; l++) tmp[l] = h[l];
        u = _mm_loadu_si128((const __m128i *)(const void *)tmp);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(u), 16));
}

static void dot_rows_avx2(float *out, const float *q, const void *k, dtype kdt, size_t ldk, int n, int D) {
    const size_t ld = ldk * kv_elem_bytes(kdt);
    for (int j = 0; j < n; j += 4) {
        const int kn = imin(4, n - j);
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int d = 0; d < D; d += 8) {
            const __m256i m = mask8(D - d);
            const __m256 qv = _mm256_maskload_ps(q + d, m);
            for (int r = 0; r < kn; r++)
                a[r] =
                    _mm256_fmadd_ps(qv, ldkv8((const char *)k + (size_t)(j + r) * ld, kdt, (size_t)d, D - d, m), a[r]);
        }
        /* four sums at once: lane r of the result is the sum of a[r] */
        const __m256 ab = _mm256_hadd_ps(a[0], a[1]), cd = _mm256_hadd_ps(a[2], a[3]);
        const __m256 abcd = _mm256_hadd_ps(ab, cd);
        float s[4];
        _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
        for (int r = 0; r < kn; r++) out[j + r] = s[r];
    }
}

static void axpy_rows_avx2(float *out, const float *p, const void *v, dtype vdt, size_t ldv, int n, int D, float s) {
    const size_t ld = ldv * kv_elem_bytes(vdt);
    for (int d0 = 0; d0 < D; d0 += 32) {
        __m256i m[4];
        __m256 a[4], b[4];
        for (int i = 0; i < 4; i++) {
            m[i] = mask8(D - d0 - 8 * i);
            a[i] = b[i] = _mm256_setzero_ps();
        }
        const int nv = imin(4, (D - d0 + 7) / 8);
        int j = 0;
        for (; j + 2 <= n; j += 2) {
            const char *v0 = (const char *)v + (size_t)j * ld, *v1 = v0 + ld;
            const __m256 p0 = _mm256_set1_ps(p[j]), p1 = _mm256_set1_ps(p[j + 1]);
            for (int i = 0; i < nv; i++) {
                const int c = d0 + 8 * i;
                a[i] = _mm256_fmadd_ps(p0, ldkv8(v0, vdt, (size_t)c, D - c, m[i]), a[i]);
                b[i] = _mm256_fmadd_ps(p1, ldkv8(v1, vdt, (size_t)c, D - c, m[i]), b[i]);
            }
        }
        if (j < n) {
            const __m256 p0 = _mm256_set1_ps(p[j]);
            for (int i = 0; i < nv; i++) {
                const int c = d0 + 8 * i;
                a[i] = _mm256_fmadd_ps(p0, ldkv8((const char *)v + (size_t)j * ld, vdt, (size_t)c, D - c, m[i]), a[i]);
            }
        }
        for (int i = 0; i < nv; i++)
            _mm256_maskstore_ps(out + d0 + 8 * i, m[i], _mm256_mul_ps(_mm256_add_ps(a[i], b[i]), _mm256_set1_ps(s)));
    }
}

/* ---- LayerNorm, GELU, add, rope ----------------------------------------------------- */

static void layernorm_row_avx2(float *y, const float *x, int C, const float *g, const float *b, float eps) {
    /* statistics in double, like the reference */
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    int i = 0;
    for (; i + 8 <= C; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    double sum = 0, buf[4];
    _mm256_storeu_pd(buf, _mm256_add_pd(s0, s1));
    sum = (buf[0] + buf[1]) + (buf[2] + buf[3]);
    for (int j = i; j < C; j++) sum += x[j];
    const double mean = sum / C;
    const __m256d md = _mm256_set1_pd(mean);
    s0 = s1 = _mm256_setzero_pd();
    for (i = 0; i + 8 <= C; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), md);
        const __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), md);
        s0 = _mm256_fmadd_pd(d0, d0, s0);
        s1 = _mm256_fmadd_pd(d1, d1, s1);
    }
    _mm256_storeu_pd(buf, _mm256_add_pd(s0, s1));
    double var = (buf[0] + buf[1]) + (buf[2] + buf[3]);
    for (int j = i; j < C; j++) var += (x[j] - mean) * (x[j] - mean);
    var /= C;
    const float inv = (float)(1.0 / sqrt(var + eps)), mf = (float)mean;
    const __m256 vi = _mm256_set1_ps(inv), vm = _mm256_set1_ps(mf);
    for (i = 0; i + 8 <= C; i += 8) {
        const __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vi);
        _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_mul_ps(t, _mm256_loadu_ps(g + i)), _mm256_loadu_ps(b + i)));
    }
    for (; i < C; i++) y[i] = ((x[i] - mf) * inv) * g[i] + b[i];
}

/* 0.5 v (1 + tanh u) = v / (1 + e^{-2u}): no cancellation for negative u. */
INLINE __m256 gelu_tanh8(__m256 v) {
    const __m256 u = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v);
    const __m256 e = exp256(_mm256_mul_ps(_mm256_set1_ps(-2.0f * 0.7978845608028654f), u));
    return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

/* 0.5 v (1 + erf z), 1 + erf z from erfc |z| (Numerical Recipes erfcc,
 * relative error < 1.2e-7): no cancellation for negative z. */
INLINE __m256 gelu_erf8(__m256 v) {
    const __m256 z = _mm256_mul_ps(v, _mm256_set1_ps(0.7071067811865476f));
    const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
    const __m256 t =
        _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.5f), a, _mm256_set1_ps(1.0f)));
    static const float c[10] = {0.17087277f,  -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                                -0.18628806f, 0.09678418f,  0.37409196f, 1.00002368f,  -1.26551223f};
    __m256 p = _mm256_set1_ps(c[0]);
    for (int i = 1; i < 10; i++) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(c[i]));
    const __m256 r = _mm256_mul_ps(t, exp256(_mm256_fnmadd_ps(a, a, p)));
    const __m256 pos = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GE_OQ);
    const __m256 e = _mm256_blendv_ps(r, _mm256_sub_ps(_mm256_set1_ps(2.0f), r), pos);
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), e);
}

static void gelu_tanh_avx2(float *x, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu_tanh8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        const __m256i m = mask8((int)(n - i));
        _mm256_maskstore_ps(x + i, m, gelu_tanh8(_mm256_maskload_ps(x + i, m)));
    }
}

static void gelu_erf_avx2(float *x, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, gelu_erf8(_mm256_loadu_ps(x + i)));
    if (i < n) {
        const __m256i m = mask8((int)(n - i));
        _mm256_maskstore_ps(x + i, m, gelu_erf8(_mm256_maskload_ps(x + i, m)));
    }
}

static void add_avx2(float *y, const float *x, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(y + i), _mm256_loadu_ps(x + i)));
    for (; i < n; i++) y[i] += x[i];
}

static void rope_row_avx2(float *x, int H, int D, int half, const float *ct, const float *st) {
    for (int h = 0; h < H; h++) {
        float *v = x + (size_t)h * D;
        int i = 0;
        for (; i + 8 <= half; i += 8) {
            const __m256 a = _mm256_loadu_ps(v + i), b = _mm256_loadu_ps(v + i + half);
            const __m256 c = _mm256_loadu_ps(ct + i), s = _mm256_loadu_ps(st + i);
            /* products rounded separately, as in the reference */
            _mm256_storeu_ps(v + i, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
            _mm256_storeu_ps(v + i + half, _mm256_add_ps(_mm256_mul_ps(a, s), _mm256_mul_ps(b, c)));
        }
        for (; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * ct[i] - b * st[i];
            v[i + half] = a * st[i] + b * ct[i];
        }
    }
}

/* ---- block formats: integer dot products (vpmaddubsw + vpmaddwd) ------------------ */

INLINE __m256i qdot_avx2(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
#define QDOT(u, s) qdot_avx2((u), (s))
#define QT_MAX 2 /* 16 ymm registers: 8 accumulators */
#include "gemv_q_x86.h"

/* ---- the Q4 block quantiser (cpu.h, q4_range; ops_avx512.c has the
 * reasoning): eight candidates a vector, two vectors at a time. */
static inline __m256 q4_level8(__m256 t) {
    t = _mm256_and_ps(t, _mm256_cmp_ps(t, t, _CMP_ORD_Q)); /* NaN: 0, as q_round */
    t = _mm256_min_ps(_mm256_set1_ps(9.0f), _mm256_max_ps(_mm256_set1_ps(-9.0f), t));
    const __m256 ge = _mm256_cmp_ps(t, _mm256_setzero_ps(), _CMP_GE_OQ);
    const __m256 h = _mm256_blendv_ps(_mm256_set1_ps(-0.5f), _mm256_set1_ps(0.5f), ge);
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvttps_epi32(_mm256_add_ps(t, h)));
    return _mm256_min_ps(_mm256_set1_ps(7.0f), _mm256_max_ps(_mm256_set1_ps(-8.0f), q));
}

static uint8_t q4_code_avx2(const float *v) {
    int c0 = 0;
    const int nc = q4_range(q4_absmax(v), &c0);
    if (!nc) return 0;
    float d[Q4_CAND_MAX], id[Q4_CAND_MAX], e[Q4_CAND_MAX];
    q4_scales(c0, nc, (nc + 15) / 16 * 16, d, id);
    for (int g = 0; g < nc; g += 16) {
        __m256 dv[2], iv[2], ev[2];
        for (int u = 0; u < 2; u++) {
            dv[u] = _mm256_loadu_ps(d + g + 8 * u);
            iv[u] = _mm256_loadu_ps(id + g + 8 * u);
            ev[u] = _mm256_setzero_ps();
        }
        for (int i = 0; i < Q_BLOCK / 2; i++) {
            const __m256 x = _mm256_set1_ps(v[i]);
            for (int u = 0; u < 2; u++) {
                const __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(dv[u], q4_level8(_mm256_mul_ps(x, iv[u]))));
                ev[u] = _mm256_add_ps(ev[u], _mm256_mul_ps(r, r));
            }
        }
        _mm256_storeu_ps(e + g, ev[0]);
        _mm256_storeu_ps(e + g + 8, ev[1]);
    }
    return q4_pick(e, nc, c0);
}

static void q4_block_avx2(const float *v, uint8_t *p) {
    p[0] = q4_code_avx2(v), p[1] = q4_code_avx2(v + 16);
    const float d0 = q4_code_scale(p[0]), d1 = q4_code_scale(p[1]);
    const __m256 i0 = _mm256_set1_ps(d0 != 0.0f ? 1.0f / d0 : 0.0f), i1 = _mm256_set1_ps(d1 != 0.0f ? 1.0f / d1 : 0.0f);
    int32_t n[16];
    for (int u = 0; u < 2; u++) {
        const __m256i lo = _mm256_cvttps_epi32(q4_level8(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * u), i0)));
        const __m256i hi = _mm256_cvttps_epi32(q4_level8(_mm256_mul_ps(_mm256_loadu_ps(v + 16 + 8 * u), i1)));
        const __m256i b = _mm256_or_si256(_mm256_add_epi32(lo, _mm256_set1_epi32(8)),
                                          _mm256_slli_epi32(_mm256_add_epi32(hi, _mm256_set1_epi32(8)), 4));
        _mm256_storeu_si256((__m256i *)(n + 8 * u), b);
    }
    for (int i = 0; i < 16; i++) p[2 + i] = (uint8_t)n[i];
}

static const cpu_kernels kernels = {
    .f32 = &gemm_f32,
    .bf16 = NULL,
    .small_t = 48,
    .gemv = gemv_avx2,
    .gemv_pairs = NULL,
    .gemv_q = gemv_q_x86,
    .round_bf16 = round_bf16_avx2,
    .to_pairs = NULL, /* only used with bf16 dot products */
    .softmax = softmax_avx2,
    .dot_rows = dot_rows_avx2,
    .axpy_rows = axpy_rows_avx2,
    .layernorm_row = layernorm_row_avx2,
    .gelu_tanh = gelu_tanh_avx2,
    .gelu_erf = gelu_erf_avx2,
    .add = add_avx2,
    .rope_row = rope_row_avx2,
};

static const cpu_table table = {CPU_DRIVER_OPS("avx2"), &kernels};

const ops *ops_avx2_table(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return NULL;
    /* F16C: every AVX2 CPU with FMA has it; the check needs a newer
     * __builtin_cpu_supports than some compilers offer. */
    return &table.ops;
}

q4_block_fn q4_search_avx2(void) { return ops_avx2_table() ? q4_block_avx2 : NULL; }
