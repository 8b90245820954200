/*
 * ops_avx512.c — AVX-512 kernels of the CPU backend (cpu.h, cpu_kernels);
 * the drivers in ops_cpu.c do the blocking and threading around them.
 *
 * Compiled with -mavx512{f,bw,vl,dq,bf16,vnni} -mfma -mf16c; the rest of the
 * library is baseline x86-64, so nothing here runs before the getters below
 * have checked the CPU. Two tables: with AVX512-BF16 (bf16 x bf16 dot
 * products for OPS_BF16 on bf16 weights) and without (x rounded to bf16,
 * then the float kernels, which is the same function, slower).
 *
 *   linear, T >= 24: W packed per K block (256) into panels [256][32] of
 *                    floats (or [256][32] bf16 pairs); register tile 12 rows
 *                    of x x 32 columns = 24 zmm accumulators.
 *   linear, T < 24:  "gemv": W read once, in place, one weight row at a
 *                    time (one sequential stream per thread) against groups
 *                    of 4 rows of x (the row stays in L1 across the groups). Below T = 24 packing costs more
 *                    than it saves (measured on Zen 5, T = 16 and 32).
 *   attention:       q.k and p.v through the same tile (ops_cpu.c), exp here.
 *   Q8/Q4 weights:   T >= 24 integer products (vpdpbusd, cpu_qgemm): panels
 *                    of 32 rows of signed bytes (Q4's two sub-block scales
 *                    folded into one per block while packing), tile 6 x 32; T = 1 a 512-bit
 *                    GEMV over block pairs; other small T gemv_q_x86.h.
 *                    These need AVX512-VNNI (as the rest of the table's
 *                    block-format kernels do).
 *
 * The scalar reference of every kernel is its op in ops_ref.c.
 */
#include <immintrin.h>
#include <math.h>

#include "cpu.h"

#define MR 12  /* rows of x per register tile */
#define NR 32  /* weight rows per packed panel: two zmm */
#define KC 256 /* K block: a panel is 32 KiB, 12 rows of x 12 KiB, both in L1 */

#define INLINE static inline __attribute__((always_inline))

static int imin(int a, int b) { return a < b ? a : b; }

static __mmask16 mask16(int n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* 16 weights of dtype dt widened to float; lanes outside m are zero and
 * their memory is not read (AVX-512 masked loads do not fault). */
INLINE __m512 ld16(const void *p, dtype dt, __mmask16 m) {
    /* Masked loads only for partial vectors: masked 16-bit loads are slow
     * (measured on Zen 4: 2.3x slower decode attention). */
    const int full = m == 0xffff;
    switch (dt) {
    case DT_BF16: { /* bf16 is the top half of a float: widening is a shift */
        const __m256i h = full ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(m, p);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    case DT_F16: return _mm512_cvtph_ps(full ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(m, p));
    default: return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
    }
}

/* Transpose a 16x16 block of 32-bit elements held as 16 rows. */
INLINE void tr16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    /* r[4i+c], 128-bit lane l: column 4l+c of rows 4i..4i+3 */
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
        __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    /* gather lane l of the four row groups into row 4l+c */
    for (int c = 0; c < 4; c++) {
        __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
        __m512 u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xee);
        __m512 u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
        __m512 u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xee);
        t[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
        t[4 + c] = _mm512_shuffle_f32x4(u0, u2, 0xdd);
        t[8 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
        t[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* ---- packing ---------------------------------------------------------------- */

/* One 16x16 block: rows 0..rn-1 of src (row stride ldb bytes; each loaded
 * by LOAD under mask m), transposed, stored as kn rows of dst (stride NR).
 * The full block is the common case and is straight-line code, so that the
 * 16 rows stay in registers. The same columns of the next panel's rows are
 * prefetched: a panel reads only a short piece of each of 32 rows, which
 * the hardware prefetchers do not follow (measured: 8 GB/s from DRAM
 * without, for a kernel that streams 20+ GB/s in order). Prefetches never
 * fault, so running past the matrix is harmless. */
#define PACK_BLOCK(LOAD, PF)                                                                                   \
    do {                                                                                                       \
        __m512 r[16];                                                                                          \
        if (PF)                                                                                                \
            for (int i = 0; i < 16; i++) _mm_prefetch(src + (size_t)(i + NR) * ldb, _MM_HINT_T0);              \
        if (rn == 16)                                                                                          \
            for (int i = 0; i < 16; i++) r[i] = LOAD(src + (size_t)i * ldb, m);                                \
        else                                                                                                   \
            for (int i = 0; i < 16; i++) r[i] = i < rn ? LOAD(src + (size_t)i * ldb, m) : _mm512_setzero_ps(); \
        tr16(r);                                                                                               \
        if (kn == 16)                                                                                          \
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + (size_t)i * NR, r[i]);                         \
        else                                                                                                   \
            for (int i = 0; i < kn; i++) _mm512_storeu_ps(dst + (size_t)i * NR, r[i]);                         \
    } while (0)

INLINE __m512 ld_bf16(const char *p, __mmask16 m) { return ld16(p, DT_BF16, m); }
INLINE __m512 ld_f16(const char *p, __mmask16 m) { return ld16(p, DT_F16, m); }
INLINE __m512 ld_f32(const char *p, __mmask16 m) { return ld16(p, DT_F32, m); }
/* 16 bf16 pairs (32 bf16) under a 32-bit mask, as 16 32-bit lanes */
INLINE __m512 ld_pairs(const char *p, __mmask32 m) {
    return _mm512_castsi512_ps(m == 0xffffffffu ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(m, p));
}

/* Floats: dst[e][j] = w[j][e0 + e], 16x16 blocks through registers. */
INLINE void pack_f32_dt(const dtype DT, float *dst0, const void *w, size_t ldw, int nrows, int e0, int ec) {
    const size_t es = DT == DT_F32 ? 4 : 2, ldb = ldw * es;
    for (int r0 = 0; r0 < NR; r0 += 16) {
        const int rn = imin(16, nrows - r0);
        if (rn <= 0) {
            for (int e = 0; e < ec; e++) _mm512_storeu_ps(dst0 + (size_t)e * NR + r0, _mm512_setzero_ps());
            continue;
        }
        for (int k = 0; k < ec; k += 16) {
            const int kn = imin(16, ec - k);
            const __mmask16 m = mask16(kn);
            const char *src = (const char *)w + (size_t)r0 * ldb + (size_t)(e0 + k) * es;
            float *dst = dst0 + (size_t)k * NR + r0;
            /* one prefetch per 64-byte line */
            const int pf = DT == DT_F32 || !(k & 31);
            if (DT == DT_BF16)
                PACK_BLOCK(ld_bf16, pf);
            else if (DT == DT_F16)
                PACK_BLOCK(ld_f16, pf);
            else
                PACK_BLOCK(ld_f32, 1);
        }
    }
}

static void pack_f32_avx512(void *dst, const void *w, dtype dt, size_t ldw, int nrows, int e0, int ec, int K) {
    (void)K;
    switch (dt) {
    case DT_BF16: pack_f32_dt(DT_BF16, dst, w, ldw, nrows, e0, ec); break;
    case DT_F16: pack_f32_dt(DT_F16, dst, w, ldw, nrows, e0, ec); break;
    default: pack_f32_dt(DT_F32, dst, w, ldw, nrows, e0, ec); break;
    }
}

/* bf16 pairs: dst[e][j] = (w[j][2(e0+e)], w[j][2(e0+e)+1]) as one 32-bit
 * word, the half past K zero. The same transpose on 32-bit words. */
static void pack_pairs_avx512(void *dstv, const void *w, dtype dt, size_t ldw, int nrows, int e0, int ec, int K) {
    (void)dt;
    const size_t ldb = ldw * 2;
    for (int r0 = 0; r0 < NR; r0 += 16) {
        const int rn = imin(16, nrows - r0);
        if (rn <= 0) {
            for (int e = 0; e < ec; e++) _mm512_storeu_ps((float *)dstv + (size_t)e * NR + r0, _mm512_setzero_ps());
            continue;
        }
        for (int k = 0; k < ec; k += 16) {
            const int kn = imin(16, ec - k), b = 2 * (e0 + k), valid = K - b;
            const __mmask32 m = valid >= 32 ? 0xffffffffu : (1u << valid) - 1;
            const char *src = (const char *)w + (size_t)r0 * ldb + (size_t)b * 2;
            float *dst = (float *)dstv + (size_t)k * NR + r0;
            PACK_BLOCK(ld_pairs, 1);
        }
    }
}

/* ---- register tiles ------------------------------------------------------------
 * M rows of x x NV zmm of a panel (NV = 2: 32 columns; 1: the last <= 16).
 * Instantiated for constant M and NV, so the accumulator arrays live in
 * registers. PAIRS: x and the panel hold bf16 pairs, multiplied with
 * vdpbf16ps (two products per lane, added in float). */
INLINE void tile(const int M, const int NV, const int PAIRS, int kc, const void *xv, size_t ldx, const float *wp,
                 float *y, size_t ldy, __mmask16 m0, __mmask16 m1, const float *bias, int accumulate) {
    __m512 c[MR][2];
    const __mmask16 mk[2] = {m0, m1};
    for (int i = 0; i < M; i++)
        for (int v = 0; v < NV; v++)
            c[i][v] = accumulate ? _mm512_maskz_loadu_ps(mk[v], y + (size_t)i * ldy + 16 * v)
                      : bias     ? _mm512_maskz_loadu_ps(mk[v], bias + 16 * v)
                                 : _mm512_setzero_ps();
    const float *xf = xv;
    const int32_t *xi = xv;
    for (int e = 0; e < kc; e++) {
        __m512 w[2];
        for (int v = 0; v < NV; v++) w[v] = _mm512_loadu_ps(wp + (size_t)e * NR + 16 * v);
        for (int i = 0; i < M; i++) {
            if (PAIRS) {
#if defined(__AVX512BF16__)
                const __m512i xb = _mm512_set1_epi32(xi[(size_t)i * ldx + e]);
                for (int v = 0; v < NV; v++)
                    c[i][v] = _mm512_dpbf16_ps(c[i][v], (__m512bh)xb, (__m512bh)_mm512_castps_si512(w[v]));
#endif
            } else {
                const __m512 xb = _mm512_set1_ps(xf[(size_t)i * ldx + e]);
                for (int v = 0; v < NV; v++) c[i][v] = _mm512_fmadd_ps(xb, w[v], c[i][v]);
            }
        }
    }
    for (int i = 0; i < M; i++)
        for (int v = 0; v < NV; v++) _mm512_mask_storeu_ps(y + (size_t)i * ldy + 16 * v, mk[v], c[i][v]);
}

#define TILE_CASES(NV, PAIRS)                                                              \
    switch (mr) {                                                                          \
    case 1: tile(1, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;   \
    case 2: tile(2, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;   \
    case 3: tile(3, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;   \
    case 4: tile(4, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;   \
    case 5: tile(5, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;   \
    case 6: tile(6, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;   \
    case 7: tile(7, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;   \
    case 8: tile(8, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;   \
    case 9: tile(9, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break;   \
    case 10: tile(10, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break; \
    case 11: tile(11, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break; \
    default: tile(12, NV, PAIRS, kc, x, ldx, wp, y, ldy, m0, m1, bias, accumulate); break; \
    }

static void gemm_f32_avx512(int mr, int kc, const void *x, size_t ldx, const void *wpv, float *y, size_t ldy, int ncols,
                            const float *bias, int accumulate) {
    const float *wp = wpv;
    const __mmask16 m0 = mask16(ncols), m1 = mask16(ncols - 16 > 0 ? ncols - 16 : 0);
    if (ncols > 16) TILE_CASES(2, 0) else TILE_CASES(1, 0)
}

#if defined(__AVX512BF16__)
static void gemm_pairs_avx512(int mr, int kc, const void *x, size_t ldx, const void *wpv, float *y, size_t ldy,
                              int ncols, const float *bias, int accumulate) {
    const float *wp = wpv;
    const __mmask16 m0 = mask16(ncols), m1 = mask16(ncols - 16 > 0 ? ncols - 16 : 0);
    if (ncols > 16) TILE_CASES(2, 1) else TILE_CASES(1, 1)
}
#endif

static const cpu_gemm gemm_f32 = {MR, NR, KC, 0, pack_f32_avx512, gemm_f32_avx512};
#if defined(__AVX512BF16__)
static const cpu_gemm gemm_pairs = {MR, NR, KC, 1, pack_pairs_avx512, gemm_pairs_avx512};
#endif

/* ---- gemv ------------------------------------------------------------------------
 * Small T: every weight is used a few times, so the op is bound by reading
 * W. One weight row at a time, front to back, so that a thread's share of W
 * is one sequential stream (measured on Zen 4, 2 threads: 45 GB/s, against
 * 32 GB/s for four interleaved row streams, whose 4 KiB rows each end at a
 * page boundary where the hardware prefetcher stops). A software prefetch
 * runs PF_AHEAD bytes ahead of the stream, across rows and pages. The row
 * meets the rows of x in groups of 4; after the first group it comes from
 * L1. Four accumulators per row of x, one horizontal sum per row at the end. */

#define PF_AHEAD 2048 /* bytes ahead of the weight stream */

INLINE float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

INLINE void gemv_row(const int TN, const dtype DT, int K, const float *x, size_t ldx, const char *wr, float out[4]) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    __m512 acc[4][4];
    for (int t = 0; t < TN; t++)
        for (int u = 0; u < 4; u++) acc[t][u] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        const char *p = wr + (size_t)k * es;
        for (int l = 0; l < (int)(64 * es); l += 64) _mm_prefetch(p + PF_AHEAD + l, _MM_HINT_T0);
        __m512 w[4];
        for (int u = 0; u < 4; u++) w[u] = ld16(p + (size_t)u * 16 * es, DT, 0xffff);
        for (int t = 0; t < TN; t++)
            for (int u = 0; u < 4; u++)
                acc[t][u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (size_t)t * ldx + k + 16 * u), w[u], acc[t][u]);
    }
    for (; k < K; k += 16) {
        const __mmask16 m = mask16(K - k);
        const __m512 w = ld16(wr + (size_t)k * es, DT, m);
        for (int t = 0; t < TN; t++)
            acc[t][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + (size_t)t * ldx + k), w, acc[t][0]);
    }
    for (int t = 0; t < TN; t++)
        out[t] = hsum(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
}

INLINE void gemv_dt(const dtype DT, int T, int K, const float *x, size_t ldx, const void *w, const void *b, dtype bdt,
                    int n0, int n1, float *y, size_t ldy) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    for (int n = n0; n < n1; n++) {
        const char *wr = (const char *)w + (size_t)n * K * es;
        const float bn = b ? cpu_ld(b, bdt, (size_t)n) : 0.0f;
        for (int t0 = 0; t0 < T; t0 += 4) {
            float s[4];
            const float *xt = x + (size_t)t0 * ldx;
            const int tn = imin(4, T - t0);
            switch (tn) {
            case 1: gemv_row(1, DT, K, xt, ldx, wr, s); break;
            case 2: gemv_row(2, DT, K, xt, ldx, wr, s); break;
            case 3: gemv_row(3, DT, K, xt, ldx, wr, s); break;
            default: gemv_row(4, DT, K, xt, ldx, wr, s); break;
            }
            for (int t = 0; t < tn; t++) y[(size_t)(t0 + t) * ldy + n] = s[t] + bn;
        }
    }
}

static void gemv_avx512(int T, int K, const float *x, size_t ldx, const void *w, dtype dt, const void *b, dtype bdt,
                        int n0, int n1, float *y, size_t ldy) {
    switch (dt) {
    case DT_BF16: gemv_dt(DT_BF16, T, K, x, ldx, w, b, bdt, n0, n1, y, ldy); break;
    case DT_F16: gemv_dt(DT_F16, T, K, x, ldx, w, b, bdt, n0, n1, y, ldy); break;
    default: gemv_dt(DT_F32, T, K, x, ldx, w, b, bdt, n0, n1, y, ldy); break;
    }
}

#if defined(__AVX512BF16__)
/* The same with bf16 x bf16 dot products: x as bf16 pairs (Kp = ceil(K/2)
 * 32-bit lanes), 128 weights (256 bytes) per step. */
INLINE void gemv_pairs_row(const int TN, int Kp, int K, const uint32_t *x, size_t ldx, const uint16_t *wr,
                           float out[4]) {
    __m512 acc[4][4];
    for (int t = 0; t < TN; t++)
        for (int u = 0; u < 4; u++) acc[t][u] = _mm512_setzero_ps();
    int e = 0;
    for (; 2 * e + 128 <= K; e += 64) {
        const char *p = (const char *)(wr + 2 * e);
        for (int l = 0; l < 256; l += 64) _mm_prefetch(p + PF_AHEAD + l, _MM_HINT_T0);
        __m512i w[4];
        for (int u = 0; u < 4; u++) w[u] = _mm512_loadu_si512(p + 64 * u);
        for (int t = 0; t < TN; t++)
            for (int u = 0; u < 4; u++)
                acc[t][u] = _mm512_dpbf16_ps(acc[t][u], (__m512bh)_mm512_loadu_si512(x + (size_t)t * ldx + e + 16 * u),
                                             (__m512bh)w[u]);
    }
    for (; e < Kp; e += 16) {
        /* The last blocks: only the pairs (and bf16) that exist. */
        const int valid = K - 2 * e;
        const __mmask32 mw = valid >= 32 ? 0xffffffffu : (1u << valid) - 1;
        const __mmask16 mx = mask16(Kp - e);
        const __m512i w = _mm512_maskz_loadu_epi16(mw, wr + 2 * e);
        for (int t = 0; t < TN; t++)
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)_mm512_maskz_loadu_epi32(mx, x + (size_t)t * ldx + e),
                                         (__m512bh)w);
    }
    for (int t = 0; t < TN; t++)
        out[t] = hsum(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]), _mm512_add_ps(acc[t][2], acc[t][3])));
}

static void gemv_pairs_avx512(int T, int K, const uint32_t *x, size_t ldx, const uint16_t *w, const void *b, dtype bdt,
                              int n0, int n1, float *y, size_t ldy) {
    const int Kp = (K + 1) / 2;
    for (int n = n0; n < n1; n++) {
        const uint16_t *wr = w + (size_t)n * K;
        const float bn = b ? cpu_ld(b, bdt, (size_t)n) : 0.0f;
        for (int t0 = 0; t0 < T; t0 += 4) {
            float s[4];
            const uint32_t *xt = x + (size_t)t0 * ldx;
            const int tn = imin(4, T - t0);
            switch (tn) {
            case 1: gemv_pairs_row(1, Kp, K, xt, ldx, wr, s); break;
            case 2: gemv_pairs_row(2, Kp, K, xt, ldx, wr, s); break;
            case 3: gemv_pairs_row(3, Kp, K, xt, ldx, wr, s); break;
            default: gemv_pairs_row(4, Kp, K, xt, ldx, wr, s); break;
            }
            for (int t = 0; t < tn; t++) y[(size_t)(t0 + t) * ldy + n] = s[t] + bn;
        }
    }
}
#endif

/* ---- bf16 rounding of activations --------------------------------------------- */

/* Round to nearest even on the bit pattern, as f32_to_bf16 (common.h) does,
 * NaN kept a quiet NaN; the result in the top half of each 32-bit lane. */
INLINE __m512i round_bf16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
}

static void round_bf16_avx512(float *dst, const float *src, int n) {
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        _mm512_mask_storeu_ps(dst + i, m, _mm512_castsi512_ps(round_bf16_bits(_mm512_maskz_loadu_ps(m, src + i))));
    }
}

static void to_pairs_avx512(uint32_t *dst, const float *src, int n) {
    /* 16-bit lane o of the result is the top half (16-bit lane 2o+1) of
     * rounded float o of the 32 in (lo, hi). */
    static const int16_t idx[32] = {1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                    33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
    const __m512i perm = _mm512_loadu_si512(idx);
    for (int i = 0; i < n; i += 32) {
        const __m512i lo = round_bf16_bits(_mm512_maskz_loadu_ps(mask16(n - i), src + i));
        const __m512i hi =
            round_bf16_bits(_mm512_maskz_loadu_ps(mask16(n - i - 16 > 0 ? n - i - 16 : 0), src + i + 16));
        const int pairs = (imin(32, n - i) + 1) / 2;
        _mm512_mask_storeu_epi32(dst + i / 2, mask16(pairs), _mm512_permutex2var_epi16(lo, perm, hi));
    }
}

/* ---- exp and friends -------------------------------------------------------------
 * exp(x) = 2^n * e^r, n = round(x / ln 2), |r| <= ln2 / 2, e^r by the Cephes
 * expf polynomial (about 1 ulp); 2^n applied with vscalefps, which gives 0
 * and inf at the ends without special cases. */
INLINE __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(100.0f)), _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static float softmax_avx512(float *s, int n, float scale) {
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        mx = _mm512_mask_max_ps(mx, m, mx, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + i), sc));
    }
    const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 m = mask16(n - i);
        const __m512 p = exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + i), sc), vm));
        _mm512_mask_storeu_ps(s + i, m, p);
        sum = _mm512_mask_add_ps(sum, m, sum, p);
    }
    return _mm512_reduce_add_ps(sum);
}

/* Sums of four vectors: lane i of the result is the sum of vector i. */
INLINE __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
    __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
    __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
    __m256 ab = _mm256_hadd_ps(a8, b8), cd = _mm256_hadd_ps(c8, d8);
    __m256 abcd = _mm256_hadd_ps(ab, cd); /* per 128-bit half: a b c d */
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* Keys and values are rows of a wider matrix (all heads side by side), so
 * one head reads a few lines per row at a large stride, which the hardware
 * prefetchers do not follow across pages: prefetch ATTN_PF rows ahead. */
#define ATTN_PF 8

/* 16 e4m3 bytes widened to float in registers (exact, as e4m3_to_f32).
 * Sign-extended to 16 bits and shifted left by 7, a byte's exponent and
 * mantissa land in the low exponent bits and the top of the mantissa of an
 * IEEE half and its sign in the half's sign (bit 14, a copy of the sign, is
 * cleared): as a half that is the e4m3 value times 2^-8 for normals and
 * subnormals alike (e4m3 subnormals become half subnormals, which vcvtph2ps
 * widens exactly), so a multiply by 2^8 finishes it. Not the same trick on
 * float bits (shift by 20, times 2^120): e4m3 subnormals would be float
 * subnormals there, and a multiply with a subnormal operand is slow on this
 * core (decode attention 3x slower at ~1.5 % subnormal elements). S.1111.111
 * (NaN) is the one byte whose half bits are 0x3f80 (or 0xbf80); its lanes
 * become NaN. */
INLINE __m512 e4m3x16(__m128i b) {
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), _mm256_set1_epi16((short)0xbf80));
    const __mmask16 nan =
        _mm256_cmpeq_epi16_mask(_mm256_and_si256(h, _mm256_set1_epi16(0x3f80)), _mm256_set1_epi16(0x3f80));
    return _mm512_mask_mul_ps(_mm512_set1_ps(NAN), (__mmask16)~nan, _mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
}

/* 16 KV elements of dtype DT (DT_F32, DT_BF16 or DT_E4M3) at element i of row p. */
INLINE __m512 ldkv(const dtype DT, const void *p, size_t i, __mmask16 m) {
    if (DT == DT_E4M3) {
        const uint8_t *b = (const uint8_t *)p + i;
        return e4m3x16(m == 0xffff ? _mm_loadu_si128((const __m128i *)b) : _mm_maskz_loadu_epi8(m, b));
    }
    return DT == DT_BF16 ? ld16((const uint16_t *)p + i, DT_BF16, m) : ld16((const float *)p + i, DT_F32, m);
}

INLINE void dot_rows_dt(const dtype DT, float *out, const float *q, const void *k, size_t ldk, int n, int D) {
    const size_t ld = ldk * kv_elem_bytes(DT); /* bytes between keys */
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const char *k0 = (const char *)k + (size_t)j * ld;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int d = 0; d < D; d += 16) {
            const __mmask16 m = mask16(D - d);
            for (int r = 0; r < 4; r++) _mm_prefetch(k0 + (ATTN_PF + r) * ld + d * kv_elem_bytes(DT), _MM_HINT_T0);
            const __m512 qv = _mm512_maskz_loadu_ps(m, q + d);
            a0 = _mm512_fmadd_ps(qv, ldkv(DT, k0, (size_t)d, m), a0);
            a1 = _mm512_fmadd_ps(qv, ldkv(DT, k0 + ld, (size_t)d, m), a1);
            a2 = _mm512_fmadd_ps(qv, ldkv(DT, k0 + 2 * ld, (size_t)d, m), a2);
            a3 = _mm512_fmadd_ps(qv, ldkv(DT, k0 + 3 * ld, (size_t)d, m), a3);
        }
        _mm_storeu_ps(out + j, hsum4(a0, a1, a2, a3));
    }
    for (; j < n; j++) {
        const char *kj = (const char *)k + (size_t)j * ld;
        __m512 a = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) {
            const __mmask16 m = mask16(D - d);
            a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), ldkv(DT, kj, (size_t)d, m), a);
        }
        out[j] = _mm512_reduce_add_ps(a);
    }
}

static void dot_rows_avx512(float *out, const float *q, const void *k, dtype kdt, size_t ldk, int n, int D) {
    if (kdt == DT_BF16)
        dot_rows_dt(DT_BF16, out, q, k, ldk, n, D);
    else if (kdt == DT_E4M3)
        dot_rows_dt(DT_E4M3, out, q, k, ldk, n, D);
    else
        dot_rows_dt(DT_F32, out, q, k, ldk, n, D);
}

INLINE void axpy_rows_dt(const dtype DT, float *out, const float *p, const void *v, size_t ldv, int n, int D, float s) {
    const size_t es = kv_elem_bytes(DT), ld = ldv * es;
    /* 64 columns at a time, keys in pairs (two accumulator sets hide the
     * FMA latency). */
    for (int d0 = 0; d0 < D; d0 += 64) {
        __mmask16 m[4];
        __m512 a[4], b[4];
        for (int i = 0; i < 4; i++) {
            const int left = D - d0 - 16 * i;
            m[i] = mask16(left > 0 ? left : 0);
            a[i] = b[i] = _mm512_setzero_ps();
        }
        int j = 0;
        for (; j + 2 <= n; j += 2) {
            const char *v0 = (const char *)v + (size_t)j * ld + (size_t)d0 * es, *v1 = v0 + ld;
            const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
            for (int i = 0; i < 4; i++) {
                if (!m[i]) break;
                _mm_prefetch(v0 + ATTN_PF * ld + 16 * i * es, _MM_HINT_T0);
                _mm_prefetch(v1 + ATTN_PF * ld + 16 * i * es, _MM_HINT_T0);
                a[i] = _mm512_fmadd_ps(p0, ldkv(DT, v0, (size_t)(16 * i), m[i]), a[i]);
                b[i] = _mm512_fmadd_ps(p1, ldkv(DT, v1, (size_t)(16 * i), m[i]), b[i]);
            }
        }
        if (j < n) {
            const char *v0 = (const char *)v + (size_t)j * ld + (size_t)d0 * es;
            const __m512 p0 = _mm512_set1_ps(p[j]);
            for (int i = 0; i < 4 && m[i]; i++) a[i] = _mm512_fmadd_ps(p0, ldkv(DT, v0, (size_t)(16 * i), m[i]), a[i]);
        }
        const __m512 vs = _mm512_set1_ps(s);
        for (int i = 0; i < 4 && m[i]; i++)
            _mm512_mask_storeu_ps(out + d0 + 16 * i, m[i], _mm512_mul_ps(_mm512_add_ps(a[i], b[i]), vs));
    }
}

static void axpy_rows_avx512(float *out, const float *p, const void *v, dtype vdt, size_t ldv, int n, int D, float s) {
    if (vdt == DT_BF16)
        axpy_rows_dt(DT_BF16, out, p, v, ldv, n, D, s);
    else if (vdt == DT_E4M3)
        axpy_rows_dt(DT_E4M3, out, p, v, ldv, n, D, s);
    else
        axpy_rows_dt(DT_F32, out, p, v, ldv, n, D, s);
}

/* Per head h of the scaled scores sc [H][n]: m[h] = max, sc = exp(sc - m[h]),
 * l[h] = their sum (the partial softmax of attn_part). */
static void part_softmax(float *sc, int n, int H, float *m, float *l) {
    for (int h = 0; h < H; h++) {
        float *sh = sc + (size_t)h * n;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int i = 0; i < n; i += 16) {
            const __mmask16 mk = mask16(n - i);
            mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_maskz_loadu_ps(mk, sh + i));
        }
        const float mh = _mm512_reduce_max_ps(mx);
        const __m512 vm = _mm512_set1_ps(mh);
        __m512 sum = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) {
            const __mmask16 mk = mask16(n - i);
            const __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sh + i), vm));
            _mm512_mask_storeu_ps(sh + i, mk, p);
            sum = _mm512_mask_add_ps(sum, mk, sum, p);
        }
        m[h] = mh;
        l[h] = _mm512_reduce_add_ps(sum);
    }
}

/* ---- decode attention: a range of keys, every head ----------------------------------
 * Query row t of a against keys [j0, j1), all H heads (any D): each key row
 * is read once, front to back (the HW prefetchers follow it), instead of
 * one head's few lines at a stride of a whole row per key. Per head h:
 *   m[h] = max_j s_hj,  l[h] = sum_j exp(s_hj - m[h]),
 *   o[h*D + d] = sum_j exp(s_hj - m[h]) v_j[g*D + d]   (s = scale q_h . k_j)
 * which the caller merges over the ranges (flash-decoding). sc: [H][j1-j0]
 * floats of scratch; o: [H*D]. */
INLINE void attn_part_dt(const dtype DT, const op_attn *a, int t, int j0, int j1, float *sc, float *m, float *l,
                         float *o) {
    const int D = a->D, H = a->H, nd = (D + 15) / 16, group = a->H / a->Hkv, n = j1 - j0;
    const __m512 scale = _mm512_set1_ps(a->scale);
    const float *q = a->q + (size_t)t * a->ldq;
    for (int j = j0; j < j1; j++) {
        const char *kr = op_attn_row(a, a->k, a->ldk, j);
        for (int h0 = 0; h0 < H; h0 += 4) {
            __m512 acc[4];
            for (int i = 0; i < 4; i++) {
                acc[i] = _mm512_setzero_ps();
                const int h = h0 + i;
                if (h >= H) continue;
                const size_t col = (size_t)(h / group) * D;
                for (int c = 0; c < nd; c++) {
                    const __mmask16 mk = mask16(D - 16 * c);
                    acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + (size_t)h * D + 16 * c),
                                             ldkv(DT, kr, col + 16 * (size_t)c, mk), acc[i]);
                }
            }
            float s4[4];
            _mm_storeu_ps(s4, _mm_mul_ps(hsum4(acc[0], acc[1], acc[2], acc[3]), _mm512_castps512_ps128(scale)));
            for (int i = 0; i < 4 && h0 + i < H; i++) sc[(size_t)(h0 + i) * n + (j - j0)] = s4[i];
        }
    }
    part_softmax(sc, n, H, m, l);
    for (size_t i = 0; i < (size_t)H * D; i++) o[i] = 0.0f;
    for (int j = j0; j < j1; j++) {
        const char *vr = op_attn_row(a, a->v, a->ldv, j);
        for (int h = 0; h < H; h++) {
            const __m512 p = _mm512_set1_ps(sc[(size_t)h * n + (j - j0)]);
            const size_t col = (size_t)(h / group) * D;
            float *oh = o + (size_t)h * D;
            for (int c = 0; c < nd; c++) {
                const __mmask16 mk = mask16(D - 16 * c);
                _mm512_mask_storeu_ps(
                    oh + 16 * c, mk,
                    _mm512_fmadd_ps(p, ldkv(DT, vr, col + 16 * (size_t)c, mk), _mm512_maskz_loadu_ps(mk, oh + 16 * c)));
            }
        }
    }
}

/* The bf16 cache: 32 elements per 64-byte load, split without widening
 * into their even (x << 16) and odd (x & 0xffff0000) elements as floats;
 * q and the output accumulators live in the same even/odd order (qeo and
 * oeo: per head, per 32 elements, 16 evens then 16 odds), so every product
 * is the exact float product of ops_ref.c. qeo, oeo: [H][nc * 32] floats. */
INLINE __m512 bf_even(__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
/* 32 bf16; a masked 16-bit load only for a partial chunk (they are slow). */
INLINE __m512i bf_load32(const uint16_t *p, __mmask32 m) {
    return m == 0xffffffffu ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(m, p);
}
INLINE __m512 bf_odd(__m512i w) {
    return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xffff0000u)));
}

static void attn_part_bf16(const op_attn *a, int t, int j0, int j1, float *sc, float *m, float *l, float *o, float *qeo,
                           float *oeo) {
    const int D = a->D, H = a->H, nc = (D + 31) / 32, group = a->H / a->Hkv, n = j1 - j0;
    const size_t hs = (size_t)nc * 32; /* floats per head in qeo, oeo */
    const float *q = a->q + (size_t)t * a->ldq;
    for (int h = 0; h < H; h++)
        for (int c = 0; c < nc; c++)
            for (int i = 0; i < 16; i++) {
                const int d = 32 * c + 2 * i;
                qeo[h * hs + 32 * c + i] = d < D ? q[(size_t)h * D + d] : 0.0f;
                qeo[h * hs + 32 * c + 16 + i] = d + 1 < D ? q[(size_t)h * D + d + 1] : 0.0f;
            }
    __mmask32 mk[8];
    for (int c = 0; c < nc && c < 8; c++) {
        const int left = D - 32 * c;
        mk[c] = left >= 32 ? 0xffffffffu : (1u << left) - 1;
    }
    const __m128 scale = _mm_set1_ps(a->scale);
    for (int j = j0; j < j1; j++) {
        const uint16_t *kr = op_attn_row(a, a->k, a->ldk, j);
        for (int h0 = 0; h0 < H; h0 += 4) {
            __m512 acc[4];
            for (int i = 0; i < 4; i++) {
                acc[i] = _mm512_setzero_ps();
                const int h = h0 + i;
                if (h >= H) continue;
                const uint16_t *kh = kr + (size_t)(h / group) * D;
                const float *qh = qeo + h * hs;
                for (int c = 0; c < nc; c++) {
                    const __m512i w = bf_load32(kh + 32 * c, mk[c]);
                    acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 32 * c), bf_even(w), acc[i]);
                    acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 32 * c + 16), bf_odd(w), acc[i]);
                }
            }
            float s4[4];
            _mm_storeu_ps(s4, _mm_mul_ps(hsum4(acc[0], acc[1], acc[2], acc[3]), scale));
            for (int i = 0; i < 4 && h0 + i < H; i++) sc[(size_t)(h0 + i) * n + (j - j0)] = s4[i];
        }
    }
    part_softmax(sc, n, H, m, l);
    for (size_t i = 0; i < (size_t)H * hs; i++) oeo[i] = 0.0f;
    for (int j = j0; j < j1; j++) {
        const uint16_t *vr = op_attn_row(a, a->v, a->ldv, j);
        for (int h = 0; h < H; h++) {
            const __m512 p = _mm512_set1_ps(sc[(size_t)h * n + (j - j0)]);
            const uint16_t *vh = vr + (size_t)(h / group) * D;
            float *oh = oeo + h * hs;
            for (int c = 0; c < nc; c++) {
                const __m512i w = bf_load32(vh + 32 * c, mk[c]);
                _mm512_storeu_ps(oh + 32 * c, _mm512_fmadd_ps(p, bf_even(w), _mm512_loadu_ps(oh + 32 * c)));
                _mm512_storeu_ps(oh + 32 * c + 16, _mm512_fmadd_ps(p, bf_odd(w), _mm512_loadu_ps(oh + 32 * c + 16)));
            }
        }
    }
    for (int h = 0; h < H; h++)
        for (int c = 0; c < nc; c++)
            for (int i = 0; i < 16; i++) {
                const int d = 32 * c + 2 * i;
                if (d < D) o[(size_t)h * D + d] = oeo[h * hs + 32 * c + i];
                if (d + 1 < D) o[(size_t)h * D + d + 1] = oeo[h * hs + 32 * c + 16 + i];
            }
}

/* The e4m3 cache with AVX512-VBMI (decode, D a multiple of 64 up to 256):
 * 64 bytes per load, widened by table lookups instead of arithmetic. The
 * bf16 form of an e4m3 magnitude (exact: bf16 has e4m3's range and more
 * mantissa) is split into a high and a low byte table of 128 entries, each
 * two zmm; vpermt2b looks up 64 bytes at once from their low 7 bits, the
 * sign joins the high byte, and interleaving low and high bytes gives 64
 * bf16, widened to float as the bf16 path does (even words << 16, odd words
 * & 0xffff0000). Per 16 elements that is about 2 operations instead of the
 * 6 of e4m3x16: the float arithmetic path is bound by them, not by memory.
 * The four float vectors of a 64-byte chunk hold elements
 *   d(v, e) = 16 (e / 4) + 8 (v / 2) + 2 (e % 4) + v % 2    (vector v, lane e)
 * (unpack works within 128-bit lanes), so q and the output accumulators
 * live in that order (qp, op: per head D floats). Every product is the
 * exact float product of ops_ref.c. */
#define E4M3_SUB(i) ((i) == 0 ? 0 : (i) == 1 ? 0x3b00 : (i) < 4 ? 0x3b80 | ((i)&1) << 6 : 0x3c00 | ((i)&3) << 5)
#define E4M3_BF16(i) ((i) == 0x7f ? 0x7fc0 : (i) >= 8 ? (((i) >> 3) + 120) << 7 | ((i)&7) << 4 : E4M3_SUB(i))
#define E4M3_X4(i) E4M3_BF16(i), E4M3_BF16((i) + 1), E4M3_BF16((i) + 2), E4M3_BF16((i) + 3)
#define E4M3_X16(i) E4M3_X4(i), E4M3_X4((i) + 4), E4M3_X4((i) + 8), E4M3_X4((i) + 12)
static const uint16_t e4m3_bf16[128] = {E4M3_X16(0),  E4M3_X16(16), E4M3_X16(32), E4M3_X16(48),
                                        E4M3_X16(64), E4M3_X16(80), E4M3_X16(96), E4M3_X16(112)};

__attribute__((target("avx512vbmi"))) static void attn_part_e4m3_vbmi(const op_attn *a, int t, int j0, int j1,
                                                                      float *sc, float *m, float *l, float *o,
                                                                      float *qp, float *op) {
    const int D = a->D, H = a->H, nc = D / 64, group = a->H / a->Hkv, n = j1 - j0;
    __m512i hi0, hi1, lo0, lo1; /* the tables: entries 0..63 and 64..127 */
    {
        __m256i hb[4], lb[4];
        for (int i = 0; i < 4; i++) {
            const __m512i w = _mm512_loadu_si512(e4m3_bf16 + 32 * i);
            hb[i] = _mm512_cvtepi16_epi8(_mm512_srli_epi16(w, 8));
            lb[i] = _mm512_cvtepi16_epi8(w);
        }
        hi0 = _mm512_inserti64x4(_mm512_castsi256_si512(hb[0]), hb[1], 1);
        hi1 = _mm512_inserti64x4(_mm512_castsi256_si512(hb[2]), hb[3], 1);
        lo0 = _mm512_inserti64x4(_mm512_castsi256_si512(lb[0]), lb[1], 1);
        lo1 = _mm512_inserti64x4(_mm512_castsi256_si512(lb[2]), lb[3], 1);
    }
    const __m512i sign = _mm512_set1_epi8((char)0x80), oddm = _mm512_set1_epi32((int)0xffff0000u);
    /* 64 e4m3 bytes at p as four float vectors in the order above */
#define E4M3_WIDEN64(p, f)                                                                                           \
    do {                                                                                                             \
        const __m512i b_ = _mm512_loadu_si512(p);                                                                    \
        const __m512i h_ =                                                                                           \
            _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, b_, hi1), b_, sign, 0xf8); /* hi | (b & 0x80) */ \
        const __m512i l_ = _mm512_permutex2var_epi8(lo0, b_, lo1);                                                   \
        const __m512i w0_ = _mm512_unpacklo_epi8(l_, h_), w1_ = _mm512_unpackhi_epi8(l_, h_);                        \
        f[0] = _mm512_castsi512_ps(_mm512_slli_epi32(w0_, 16));                                                      \
        f[1] = _mm512_castsi512_ps(_mm512_and_si512(w0_, oddm));                                                     \
        f[2] = _mm512_castsi512_ps(_mm512_slli_epi32(w1_, 16));                                                      \
        f[3] = _mm512_castsi512_ps(_mm512_and_si512(w1_, oddm));                                                     \
    } while (0)
    const float *q = a->q + (size_t)t * a->ldq;
    for (int h = 0; h < H; h++)
        for (int c = 0; c < nc; c++)
            for (int v = 0; v < 4; v++)
                for (int e = 0; e < 16; e++)
                    qp[(size_t)h * D + 64 * c + 16 * v + e] =
                        q[(size_t)h * D + 64 * c + 16 * (e / 4) + 8 * (v / 2) + 2 * (e % 4) + v % 2];
    const __m128 scale = _mm_set1_ps(a->scale);
    for (int j = j0; j < j1; j++) {
        const uint8_t *kr = op_attn_row(a, a->k, a->ldk, j);
        for (int h0 = 0; h0 < H; h0 += 4) {
            __m512 acc[4];
            for (int i = 0; i < 4; i++) {
                acc[i] = _mm512_setzero_ps();
                const int h = h0 + i;
                if (h >= H) continue;
                const uint8_t *kh = kr + (size_t)(h / group) * D;
                const float *qh = qp + (size_t)h * D;
                for (int c = 0; c < nc; c++) {
                    __m512 f[4];
                    E4M3_WIDEN64(kh + 64 * c, f);
                    for (int v = 0; v < 4; v++)
                        acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 64 * c + 16 * v), f[v], acc[i]);
                }
            }
            float s4[4];
            _mm_storeu_ps(s4, _mm_mul_ps(hsum4(acc[0], acc[1], acc[2], acc[3]), scale));
            for (int i = 0; i < 4 && h0 + i < H; i++) sc[(size_t)(h0 + i) * n + (j - j0)] = s4[i];
        }
    }
    part_softmax(sc, n, H, m, l);
    for (size_t i = 0; i < (size_t)H * D; i++) op[i] = 0.0f;
    for (int j = j0; j < j1; j++) {
        const uint8_t *vr = op_attn_row(a, a->v, a->ldv, j);
        for (int h = 0; h < H; h++) {
            const __m512 p = _mm512_set1_ps(sc[(size_t)h * n + (j - j0)]);
            const uint8_t *vh = vr + (size_t)(h / group) * D;
            float *oh = op + (size_t)h * D;
            for (int c = 0; c < nc; c++) {
                __m512 f[4];
                E4M3_WIDEN64(vh + 64 * c, f);
                for (int v = 0; v < 4; v++)
                    _mm512_storeu_ps(oh + 64 * c + 16 * v,
                                     _mm512_fmadd_ps(p, f[v], _mm512_loadu_ps(oh + 64 * c + 16 * v)));
            }
        }
    }
#undef E4M3_WIDEN64
    for (int h = 0; h < H; h++)
        for (int c = 0; c < nc; c++)
            for (int v = 0; v < 4; v++)
                for (int e = 0; e < 16; e++)
                    o[(size_t)h * D + 64 * c + 16 * (e / 4) + 8 * (v / 2) + 2 * (e % 4) + v % 2] =
                        op[(size_t)h * D + 64 * c + 16 * v + e];
}

static void attn_part_avx512(const op_attn *a, int t, int j0, int j1, float *sc, float *m, float *l, float *o) {
    if (a->kv_dt == DT_BF16 && a->D <= 256) {
        /* scratch after the scores: qeo and oeo */
        float *qeo = sc + (((size_t)a->H * (size_t)(j1 - j0) + 15) & ~(size_t)15);
        attn_part_bf16(a, t, j0, j1, sc, m, l, o, qeo, qeo + (size_t)a->H * ((a->D + 31) / 32) * 32);
    } else if (a->kv_dt == DT_BF16) {
        attn_part_dt(DT_BF16, a, t, j0, j1, sc, m, l, o);
    } else if (a->kv_dt == DT_E4M3 && a->D % 64 == 0 && a->D <= 256 && __builtin_cpu_supports("avx512vbmi")) {
        /* scratch after the scores: qp and op (ATTN_PART_SCRATCH's room for qeo and oeo) */
        float *qp = sc + (((size_t)a->H * (size_t)(j1 - j0) + 15) & ~(size_t)15);
        attn_part_e4m3_vbmi(a, t, j0, j1, sc, m, l, o, qp, qp + (size_t)a->H * a->D);
    } else if (a->kv_dt == DT_E4M3) {
        attn_part_dt(DT_E4M3, a, t, j0, j1, sc, m, l, o);
    } else {
        attn_part_dt(DT_F32, a, t, j0, j1, sc, m, l, o);
    }
}

/* ---- LayerNorm, GELU, add, rope ------------------------------------------------- */

static void layernorm_row_avx512(float *y, const float *x, int C, const float *g, const float *b, float eps) {
    /* Statistics in double like the reference: a float sum of a few
     * thousand activations with a large mean would lose digits the
     * centring then exposes. */
    __m512d s0 = _mm512_setzero_pd(), s1 = s0;
    for (int i = 0; i < C; i += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(mask16(C - i), x + i);
        s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
        s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
    }
    const double mean = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1)) / C;
    const __m512d md = _mm512_set1_pd(mean);
    s0 = s1 = _mm512_setzero_pd();
    for (int i = 0; i < C; i += 16) {
        const __mmask16 m = mask16(C - i);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), md);
        __m512d d1 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)), md);
        d0 = _mm512_maskz_mov_pd((__mmask8)(m & 0xff), d0);
        d1 = _mm512_maskz_mov_pd((__mmask8)(m >> 8), d1);
        s0 = _mm512_fmadd_pd(d0, d0, s0);
        s1 = _mm512_fmadd_pd(d1, d1, s1);
    }
    const double var = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1)) / C;
    const __m512 inv = _mm512_set1_ps((float)(1.0 / sqrt(var + eps)));
    const __m512 mf = _mm512_set1_ps((float)mean);
    for (int i = 0; i < C; i += 16) {
        const __mmask16 m = mask16(C - i);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        const __m512 t = _mm512_mul_ps(_mm512_sub_ps(v, mf), inv);
        _mm512_mask_storeu_ps(
            y + i, m,
            _mm512_add_ps(_mm512_mul_ps(t, _mm512_maskz_loadu_ps(m, g + i)), _mm512_maskz_loadu_ps(m, b + i)));
    }
}

/* 0.5 v (1 + tanh u) = v / (1 + e^{-2u}): the same function without the
 * cancellation of 1 + tanh u for negative u. */
static void gelu_tanh_avx512(float *x, size_t n) {
    const __m512 k2 = _mm512_set1_ps(-2.0f * 0.7978845608028654f), c = _mm512_set1_ps(0.044715f);
    const __m512 one = _mm512_set1_ps(1.0f);
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 m = mask16((int)(n - i < 16 ? n - i : 16));
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        const __m512 u = _mm512_fmadd_ps(_mm512_mul_ps(c, v), _mm512_mul_ps(v, v), v);
        const __m512 e = exp512(_mm512_mul_ps(k2, u));
        _mm512_mask_storeu_ps(x + i, m, _mm512_div_ps(v, _mm512_add_ps(one, e)));
    }
}

/* 1 + erf z from erfc |z| = t exp(-z^2 + P(t)), t = 1/(1 + |z|/2)
 * (Numerical Recipes erfcc, relative error < 1.2e-7 everywhere): no
 * cancellation for negative z, where 1 + erf z is small. */
INLINE __m512 one_plus_erf(__m512 z) {
    const __m512 a = _mm512_abs_ps(z);
    const __m512 t =
        _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(_mm512_set1_ps(0.5f), a, _mm512_set1_ps(1.0f)));
    __m512 p = _mm512_set1_ps(0.17087277f);
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.82215223f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.48851587f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.13520398f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.27886807f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.18628806f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.09678418f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.37409196f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.00002368f));
    p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.26551223f));
    const __m512 r = _mm512_mul_ps(t, exp512(_mm512_fnmadd_ps(a, a, p)));
    const __mmask16 pos = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GE_OQ);
    return _mm512_mask_sub_ps(r, pos, _mm512_set1_ps(2.0f), r);
}

static void gelu_erf_avx512(float *x, size_t n) {
    for (size_t i = 0; i < n; i += 16) {
        const __mmask16 m = mask16((int)(n - i < 16 ? n - i : 16));
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        const __m512 e = one_plus_erf(_mm512_mul_ps(v, _mm512_set1_ps(0.7071067811865476f)));
        _mm512_mask_storeu_ps(x + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), e));
    }
}

static void add_avx512(float *y, const float *x, size_t n) {
    size_t i = 0;
    for (; i + 64 <= n; i += 64)
        for (int u = 0; u < 4; u++)
            _mm512_storeu_ps(y + i + 16 * u,
                             _mm512_add_ps(_mm512_loadu_ps(y + i + 16 * u), _mm512_loadu_ps(x + i + 16 * u)));
    for (; i < n; i += 16) {
        const __mmask16 m = mask16((int)(n - i < 16 ? n - i : 16));
        _mm512_mask_storeu_ps(y + i, m,
                              _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_maskz_loadu_ps(m, x + i)));
    }
}

static void rope_row_avx512(float *x, int H, int D, int half, const float *ct, const float *st) {
    for (int h = 0; h < H; h++) {
        float *v = x + (size_t)h * D;
        for (int i = 0; i < half; i += 16) {
            const __mmask16 m = mask16(half - i);
            const __m512 a = _mm512_maskz_loadu_ps(m, v + i), b = _mm512_maskz_loadu_ps(m, v + i + half);
            const __m512 c = _mm512_maskz_loadu_ps(m, ct + i), s = _mm512_maskz_loadu_ps(m, st + i);
            /* products rounded separately, as in the reference */
            _mm512_mask_storeu_ps(v + i, m, _mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s)));
            _mm512_mask_storeu_ps(v + i + half, m, _mm512_add_ps(_mm512_mul_ps(a, s), _mm512_mul_ps(b, c)));
        }
    }
}

/* ---- block formats: integer dot products (vpdpbusd) -------------------------------- */

#define QDOT(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (s))
#define QT_MAX 4
#include "gemv_q_x86.h"

/* Decode (T = 1) in 512-bit vectors, two blocks (64 weights) per step, for
 * K a multiple of 64 up to Q_PAIRS_MAX pairs; other shapes take gemv_q_x86.
 * vpdpbusd multiplies unsigned by signed bytes, so one side is offset and
 * the offset's share is subtracted through the start values of the sums,
 * made from x once per call:
 *   Q4: nibbles n in 0..15 (unsigned) against int8 x: sum (n - 8) x =
 *       sum n x - 8 sum x, per lane (each lane's own four bytes of x: the
 *       lanes of a block's two sub-blocks have different scales);
 *   Q8: q_w + 128 (a flip of the sign bit) against int8 x: sum q_w x =
 *       sum (q_w + 128) x - 128 sum x, in lane 0 of each block's lanes.
 * The scales of a pair come out of one load of its first bytes by vpermw
 * (a word per lane in the order of the sums' lanes; Q4's 8-bit codes then
 * made halves by a shift, a shift and a mask) and are widened by vcvtph2ps:
 * per pair about ten instructions (Q4 thirteen), few enough that the stream
 * of weights, not the arithmetic, sets the pace. Per row: y = sum over
 * lanes of d_w d_x s, as gemv_q_x86 computes it. */
#define Q_PAIRS_MAX 256
#define Q_PF_AHEAD 6144 /* bytes ahead of each of a thread's two streams */

/* Per pair p of x: the start values (corr) and the d_x of each lane (dxv);
 * for Q4 also x in the order of the nibble vector, [x0[0:16] x1[0:16]
 * x0[16:32] x1[16:32]] (xr); lanes of block 1 are 4..7 and 12..15 (Q4),
 * 8..15 (Q8). */
INLINE void q_t1_prep(const dtype DT, int np, const int8_t *xq, const float *dx, __m512i *corr, __m512 *dxv,
                      __m512i *xr) {
    for (int p = 0; p < np; p++) {
        const float d0 = dx[2 * p], d1 = dx[2 * p + 1];
        if (DT == DT_Q4) {
            const __m512i x =
                _mm512_loadu_si512((const void *)(xq + (size_t)p * 64)); /* [x0 lo, x0 hi, x1 lo, x1 hi] */
            xr[p] = _mm512_shuffle_i64x2(x, x, _MM_SHUFFLE(3, 1, 2, 0));
            /* each lane starts at -8 times the sum of its own four x bytes:
             * the sub-blocks' scales differ, so no lane may carry another's */
            const __m512i s4 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), xr[p]);
            corr[p] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(s4, 3));
            dxv[p] = _mm512_mask_blend_ps(0xf0f0, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
        } else {
            int sx[2];
            for (int h = 0; h < 2; h++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(const void *)(xq + (size_t)(2 * p + h) * 32));
                /* sum of 32 signed bytes: vpdpbusd with all-ones unsigned */
                const __m256i s8 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), xv);
                __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
                s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
                s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
                sx[h] = _mm_cvtsi128_si32(s4);
            }
            corr[p] = _mm512_mask_set1_epi32(_mm512_maskz_set1_epi32(0x0001, -128 * sx[0]), 0x0100, -128 * sx[1]);
            dxv[p] = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(d0), _mm512_set1_ps(d1));
        }
    }
}

/* acc + one pair of blocks (at b0) of a weight row against pair p of x. */
INLINE __m512 q_t1_pair(const dtype DT, const uint8_t *b0, size_t bb, int p, const __m512i *corr, const __m512 *dxv,
                        const __m512i *xr, const int8_t *xq, __m512i sidx, __m512i low4, __m512i sign, __m256i cshift,
                        __m512 acc) {
    const uint8_t *b1 = b0 + bb;
    _mm_prefetch((const char *)b0 + Q_PF_AHEAD, _MM_HINT_T0);
    __m512i v, xv;
    __m256i sc;
    if (DT == DT_Q4) {
        const __m256i q =
            _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)(b0 + 2))),
                                    _mm_loadu_si128((const __m128i *)(const void *)(b1 + 2)), 1);
        /* [n0 lo, n1 lo, n0 hi, n1 hi]: weights 0..15 of both blocks, then 16..31 */
        v = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1), low4);
        xv = xr[p];
        /* the code word c0 | c1 << 8 of each block, then the lane's code
         * (c0 for lanes 0..7, c1 for 8..15) in the high byte, then the
         * half q4_code_f16 makes of it: sign in bit 15, magnitude in 7..13 */
        const __m256i cw = _mm512_castsi512_si256(_mm512_permutexvar_epi16(
            sidx, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(const void *)b0))));
        sc = _mm256_and_si256(_mm256_srai_epi16(_mm256_sllv_epi16(cw, cshift), 1), _mm256_set1_epi16((short)0xBF80));
    } else {
        _mm_prefetch((const char *)b0 + Q_PF_AHEAD + 64, _MM_HINT_T0);
        v = _mm512_xor_si512(
            _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(const void *)(b0 + 2))),
                               _mm256_loadu_si256((const __m256i *)(const void *)(b1 + 2)), 1),
            sign);
        xv = _mm512_loadu_si512((const void *)(xq + (size_t)p * 64));
        /* the pair is 68 bytes: a 64-byte load from its start stays inside it */
        sc = _mm512_castsi512_si256(_mm512_permutexvar_epi16(sidx, _mm512_loadu_si512((const void *)b0)));
    }
    const __m512i s = _mm512_dpbusd_epi32(corr[p], v, xv);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(_mm512_cvtph_ps(sc), dxv[p]), acc);
}

/* One row (w0) or two (w0, w1: two streams, as gemv_q4_t1_quads reads
 * them) through the pairs: two accumulators a row, in registers (pairs in
 * twos: an array indexed by p & 1 would live in memory, a store-to-load
 * chain per pair). */
INLINE void q_t1_rows(const dtype DT, int two, int np, size_t bb, const uint8_t *w0, const uint8_t *w1,
                      const __m512i *corr, const __m512 *dxv, const __m512i *xr, const int8_t *xq, __m512i sidx,
                      __m512i low4, __m512i sign, __m256i cshift, float *y0, float *y1) {
    __m512 a00 = _mm512_setzero_ps(), a01 = _mm512_setzero_ps(), a10 = _mm512_setzero_ps(), a11 = _mm512_setzero_ps();
    int p = 0;
    for (; p + 2 <= np; p += 2) {
        const size_t o = (size_t)p * 2 * bb;
        a00 = q_t1_pair(DT, w0 + o, bb, p, corr, dxv, xr, xq, sidx, low4, sign, cshift, a00);
        if (two) a10 = q_t1_pair(DT, w1 + o, bb, p, corr, dxv, xr, xq, sidx, low4, sign, cshift, a10);
        a01 = q_t1_pair(DT, w0 + o + 2 * bb, bb, p + 1, corr, dxv, xr, xq, sidx, low4, sign, cshift, a01);
        if (two) a11 = q_t1_pair(DT, w1 + o + 2 * bb, bb, p + 1, corr, dxv, xr, xq, sidx, low4, sign, cshift, a11);
    }
    if (p < np) {
        const size_t o = (size_t)p * 2 * bb;
        a00 = q_t1_pair(DT, w0 + o, bb, p, corr, dxv, xr, xq, sidx, low4, sign, cshift, a00);
        if (two) a10 = q_t1_pair(DT, w1 + o, bb, p, corr, dxv, xr, xq, sidx, low4, sign, cshift, a10);
    }
    *y0 = _mm512_reduce_add_ps(_mm512_add_ps(a00, a01));
    if (two) *y1 = _mm512_reduce_add_ps(_mm512_add_ps(a10, a11));
}

INLINE void gemv_q_t1_dt(const dtype DT, int K, const int8_t *xq, const uint8_t *w, const void *b, dtype bdt, int n0,
                         int n1, float *y) {
    const int nb = K / 32, np = nb / 2;
    const size_t bb = DT == DT_Q4 ? Q4_BLOCK_BYTES : Q8_BLOCK_BYTES, rb = (size_t)nb * bb;
    __m512i corr[Q_PAIRS_MAX], xr[DT == DT_Q4 ? Q_PAIRS_MAX : 1];
    __m512 dxv[Q_PAIRS_MAX];
    q_t1_prep(DT, np, xq, (const float *)(const void *)(xq + (size_t)nb * 32), corr, dxv, xr);
    /* Words of the pair's first bytes holding the scales of block 0 and
     * block 1 (Q8: d; Q4: both sub-block codes), one per lane. */
    static const int16_t sidx4[32] = {0, 0, 0, 0, 9, 9, 9, 9, 0, 0, 0, 0, 9, 9, 9, 9};
    static const int16_t sidx8[32] = {0, 0, 0, 0, 0, 0, 0, 0, 17, 17, 17, 17, 17, 17, 17, 17};
    const __m512i sidx = _mm512_loadu_si512(DT == DT_Q4 ? sidx4 : sidx8);
    const __m512i low4 = _mm512_set1_epi8(15), sign = _mm512_set1_epi8((char)0x80);
    const __m256i cshift = _mm256_setr_epi16(8, 8, 8, 8, 8, 8, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0);
    /* two streams a thread: the first and the second half of its rows */
    const int h = (n1 - n0) / 2;
    for (int i = 0; i < h; i++) {
        const int r0 = n0 + i, r1 = r0 + h;
        q_t1_rows(DT, 1, np, bb, w + (size_t)r0 * rb, w + (size_t)r1 * rb, corr, dxv, xr, xq, sidx, low4, sign, cshift,
                  &y[r0], &y[r1]);
    }
    if ((n1 - n0) % 2)
        q_t1_rows(DT, 0, np, bb, w + (size_t)(n1 - 1) * rb, NULL, corr, dxv, xr, xq, sidx, low4, sign, cshift,
                  &y[n1 - 1], NULL);
    if (b)
        for (int n = n0; n < n1; n++) y[n] += cpu_ld(b, bdt, (size_t)n);
}

/* Q4 decode over four blocks (128 weights, 72 bytes) a step, for K a
 * multiple of 128, with fewer instructions per weight than the pairs above:
 *   - two loads, of bytes 0..63 and 8..71, and one two-table word permute
 *     (vpermt2w: the data of a block starts at byte 18 k + 2, a word
 *     boundary) gather the 64 data bytes; a mask makes the low nibbles
 *     (weights 0..15 of each block: lanes 4k..4k+3 of the sums) and a shift
 *     and a mask the high ones (weights 16..31);
 *   - one word permute of the first load puts each lane's code word
 *     (c0 | c1 << 8) in its lane, a variable shift moves c0 to the high
 *     byte for the low lanes, and q4_code_f16's shift and mask make the 32
 *     halves of both vectors, widened in two vcvtph2ps;
 *   - the two products are scaled and added before the per-block d_x:
 *     acc += (lo d_lo + hi d_hi) d_x.
 * x is rearranged once per call to match: xlo = [x_k[0:16]] and xhi =
 * [x_k[16:32]] over the four blocks, with each lane's -8 sum x start value
 * (nibbles are unsigned, as in q_t1_prep).
 * A thread reads its rows as two streams, the first and the second half of
 * its range, a row of each at a time: on Zen 5 one stream a core reads
 * 25-27 GB/s from memory whatever the kernel (the pairs above run 32 GB/s
 * from L2), two read ~38, as fast as this kernel computes from L2 (~41).
 * Each stream prefetches 6 KiB ahead (4 and 8 KiB measured slower). */
#define Q4_QUADS_MAX 128

typedef struct q4_t1_x {
    __m512i xlo, xhi;
    __m512 dx;
} q4_t1_x;

INLINE void q4_t1_prep(int nq, const int8_t *xq, const float *dx, q4_t1_x *x) {
    for (int q = 0; q < nq; q++) {
        const __m512i a = _mm512_loadu_si512((const void *)(xq + (size_t)q * 128));
        const __m512i b = _mm512_loadu_si512((const void *)(xq + (size_t)q * 128 + 64));
        x[q].xlo = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(2, 0, 2, 0));
        x[q].xhi = _mm512_shuffle_i64x2(a, b, _MM_SHUFFLE(3, 1, 3, 1));
        const float *d = dx + (size_t)q * 4;
        const __m256 d01 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(d[0])), _mm_set1_ps(d[1]), 1);
        const __m256 d23 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(d[2])), _mm_set1_ps(d[3]), 1);
        x[q].dx = _mm512_insertf32x8(_mm512_castps256_ps512(d01), d23, 1);
    }
}

typedef struct q4_t1_idx {
    __m512i data, code, shift, low4;
} q4_t1_idx;

/* Each lane's start value: -8 times the sum of its four x bytes (the
 * nibbles are unsigned), made per quad where it is used, for both streams:
 * kept in q4_t1_x it doubled x's footprint in L1 (20 KiB at K = 8192). */
INLINE __m512i q4_t1_corr(__m512i xv) {
    return _mm512_sub_epi32(_mm512_setzero_si512(),
                            _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), xv), 3));
}

/* acc + four blocks (at b) of one row against quad x. */
INLINE __m512 q4_t1_quad(const uint8_t *b, const q4_t1_x *x, __m512i clo, __m512i chi, const q4_t1_idx *ix,
                         __m512 acc) {
    _mm_prefetch((const char *)b + Q_PF_AHEAD, _MM_HINT_T0);
    _mm_prefetch((const char *)b + Q_PF_AHEAD + 64, _MM_HINT_T0);
    const __m512i a = _mm512_loadu_si512((const void *)b);
    const __m512i v = _mm512_permutex2var_epi16(a, ix->data, _mm512_loadu_si512((const void *)(b + 8)));
    const __m512i lo = _mm512_and_si512(v, ix->low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), ix->low4);
    const __m512i cw = _mm512_sllv_epi16(_mm512_permutexvar_epi16(ix->code, a), ix->shift);
    const __m512i sc = _mm512_and_si512(_mm512_srai_epi16(cw, 1), _mm512_set1_epi16((short)0xBF80));
    const __m512 slo = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(clo, lo, x->xlo));
    const __m512 shi = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(chi, hi, x->xhi));
    const __m512 t = _mm512_fmadd_ps(slo, _mm512_cvtph_ps(_mm512_castsi512_si256(sc)),
                                     _mm512_mul_ps(shi, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(sc, 1))));
    return _mm512_fmadd_ps(t, x->dx, acc);
}

static void gemv_q4_t1_quads(int K, const int8_t *xq, const uint8_t *w, const void *b, dtype bdt, int n0, int n1,
                             float *y) {
    const int nb = K / 32, nq = nb / 4;
    const size_t rb = (size_t)nb * Q4_BLOCK_BYTES;
    q4_t1_x x[Q4_QUADS_MAX];
    q4_t1_prep(nq, xq, (const float *)(const void *)(xq + (size_t)nb * 32), x);
    /* data words of block k: 9 k + 1 .. 9 k + 8; those past word 31 come
     * from the second load (word 4 of the quad is its word 0) */
    int16_t data[32], code[32], shift[32];
    for (int i = 0; i < 32; i++) {
        const int s = 9 * (i / 8) + 1 + i % 8;
        data[i] = (int16_t)(s < 32 ? s : 32 + s - 4);
        code[i] = (int16_t)(9 * ((i % 16) / 4));
        shift[i] = (int16_t)(i < 16 ? 8 : 0);
    }
    const q4_t1_idx ix = {_mm512_loadu_si512(data), _mm512_loadu_si512(code), _mm512_loadu_si512(shift),
                          _mm512_set1_epi8(15)};
    const int h = (n1 - n0) / 2;
    for (int i = 0; i < h; i++) {
        const int r0 = n0 + i, r1 = r0 + h;
        const uint8_t *w0 = w + (size_t)r0 * rb, *w1 = w + (size_t)r1 * rb;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int q = 0; q < nq; q++) {
            const __m512i clo = q4_t1_corr(x[q].xlo), chi = q4_t1_corr(x[q].xhi);
            a0 = q4_t1_quad(w0 + (size_t)q * 72, &x[q], clo, chi, &ix, a0);
            a1 = q4_t1_quad(w1 + (size_t)q * 72, &x[q], clo, chi, &ix, a1);
        }
        y[r0] = _mm512_reduce_add_ps(a0) + (b ? cpu_ld(b, bdt, (size_t)r0) : 0.0f);
        y[r1] = _mm512_reduce_add_ps(a1) + (b ? cpu_ld(b, bdt, (size_t)r1) : 0.0f);
    }
    if ((n1 - n0) % 2) {
        const int r = n1 - 1;
        __m512 a0 = _mm512_setzero_ps();
        for (int q = 0; q < nq; q++)
            a0 = q4_t1_quad(w + (size_t)r * rb + (size_t)q * 72, &x[q], q4_t1_corr(x[q].xlo), q4_t1_corr(x[q].xhi), &ix,
                            a0);
        y[r] = _mm512_reduce_add_ps(a0) + (b ? cpu_ld(b, bdt, (size_t)r) : 0.0f);
    }
}

static void gemv_q_avx512(int T, int K, const void *xq, size_t ldxq, const void *w, dtype dt, const void *b, dtype bdt,
                          int n0, int n1, float *y, size_t ldy) {
    if (T == 1 && dt == DT_Q4 && K % 128 == 0 && K / 128 <= Q4_QUADS_MAX)
        gemv_q4_t1_quads(K, xq, w, b, bdt, n0, n1, y);
    else if (T == 1 && K % 64 == 0 && K / 64 <= Q_PAIRS_MAX) {
        if (dt == DT_Q4)
            gemv_q_t1_dt(DT_Q4, K, xq, w, b, bdt, n0, n1, y);
        else
            gemv_q_t1_dt(DT_Q8, K, xq, w, b, bdt, n0, n1, y);
    } else
        gemv_q_x86(T, K, xq, ldxq, w, dt, b, bdt, n0, n1, y, ldy);
}

/* ---- block formats: the integer matrix product (cpu_qgemm) ----------------------------
 * Panels of QNR = 32 weight rows, K blocks of QKB blocks of 32 weights
 * (a panel block is 1280 bytes, QKB of them 20 KiB: in L1 while a tile of
 * x rows goes by). Register tile QMR = 6 rows of x x 32 columns: 12 int32
 * accumulators for the current block (started at the -128 sum q_w
 * correction), 12 float accumulators they are scaled into at the end of
 * each block, 2 weight vectors; x is broadcast 4 bytes at a time. Per
 * block of 32: 8 vpdpbusd per accumulator (64 products each) and one
 * convert and one FMA (two with per-block x scales). Q4 blocks take the
 * same kernel: their two sub-block scales are folded into one while
 * packing (cpu_q4_fold, cpu.h: ten instructions per 64 levels, vpmulhrsw
 * on 16-bit lanes), which makes a Q4 pack about 2.5x as long as a plain
 * nibble unpack and costs 4-5% of a Q4 linear at T = 730 (one thread, CPU
 * time; a float fold, four conversions per 64 levels, cost more). */
#ifndef QMR
#define QMR 6
#endif
#define QNR 32
#define QKB 16

/* Pack 16 rows (row r at w + r * rb, the first rn of them real) of blocks
 * [b0, b0+nb) into half h (columns 16h..16h+15) of each panel block: a
 * transpose of 32-bit quads through registers (unpacks within 128-bit
 * lanes, then a two-source permute across them), the scales by one gather. */
INLINE __m256i q_row8(const char *p, int ok) {
    return ok ? _mm256_loadu_si256((const __m256i *)(const void *)p) : _mm256_setzero_si256();
}
INLINE __m128i q_row4(const char *p, int ok) {
    return ok ? _mm_loadu_si128((const __m128i *)(const void *)p) : _mm_setzero_si128();
}

/* The Q4 scales of the codes in the low byte of each 32-bit lane of c
 * (q4_code_f16, then widened as f16). */
INLINE __m512 q4_codes_ps(__m512i c) {
    const __m512i m7 = _mm512_set1_epi32(0x7F), s8 = _mm512_set1_epi32(0x80);
    const __m512i h =
        _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(c, m7), 7), _mm512_slli_epi32(_mm512_and_si512(c, s8), 8));
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h));
}

/* The factors cpu_q4_fold_factor(d, s) of each lane, in both 16-bit
 * halves of it. */
INLINE __m512i q4_fold_factors(__m512 d, __m512 s, __mmask16 nz) {
    const __m512 f =
        _mm512_mul_ps(_mm512_maskz_div_ps(nz, _mm512_mul_ps(_mm512_set1_ps(16.0f), d), s), _mm512_set1_ps(1024.0f));
    const __m512i fi = _mm512_cvt_roundps_epi32(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_or_si512(_mm512_and_si512(fi, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(fi, 16));
}

/* cpu_q4_fold of the 64 int8 levels of v by the factors f (each 32-bit
 * lane a row, its factor in both 16-bit halves): the even and the odd
 * bytes as 16-bit 32 q (a shift of the byte to the top, an arithmetic
 * shift by 3), vpmulhrsw, clipped at 127, the two put back together. */
INLINE __m512i q4_fold_quads(__m512i v, __m512i f) {
    const __m512i top = _mm512_set1_epi16(127);
    const __m512i ev = _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 3);
    const __m512i od = _mm512_srai_epi16(_mm512_and_si512(v, _mm512_set1_epi16((short)0xFF00)), 3);
    const __m512i re = _mm512_min_epi16(_mm512_mulhrs_epi16(ev, f), top);
    const __m512i ro = _mm512_min_epi16(_mm512_mulhrs_epi16(od, f), top);
    return _mm512_mask_blend_epi8((__mmask64)0xAAAAAAAAAAAAAAAAull, re, _mm512_slli_epi16(ro, 8));
}

INLINE void qpack_half(const dtype DT, char *dst, const char *w, size_t rb, int rn, int b0, int nb, int h) {
    const size_t bb = DT == DT_Q8 ? Q8_BLOCK_BYTES : Q4_BLOCK_BYTES;
    const __mmask16 rm = mask16(rn);
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)rb));
    const __m512i ones = _mm512_set1_epi8(1), low4 = _mm512_set1_epi8(15), eight = _mm512_set1_epi8(8);
    const __m512i lo2 = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13),
                  hi2 = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int b = 0; b < nb; b++) {
        const char *src = w + (size_t)(b0 + b) * bb;
        char *pb = dst + (size_t)b * CPU_QBLK_BYTES(QNR) + 64 * h;
        __m512i sum = _mm512_setzero_si512();
        if (DT == DT_Q8) {
            /* z[r] = [row r | row r+8], 8 quads each */
            __m512i z[8], t[8], u[8];
            for (int r = 0; r < 8; r++)
                z[r] = _mm512_inserti64x4(_mm512_castsi256_si512(q_row8(src + 2 + (size_t)r * rb, r < rn)),
                                          q_row8(src + 2 + (size_t)(r + 8) * rb, r + 8 < rn), 1);
            for (int r = 0; r < 8; r += 2) {
                t[r] = _mm512_unpacklo_epi32(z[r], z[r + 1]);
                t[r + 1] = _mm512_unpackhi_epi32(z[r], z[r + 1]);
            }
            /* u[q] (rows 0-3 and 8-11), u[4+q] (rows 4-7 and 12-15): 128-bit
             * lanes [quad q, quad q+4] of the first four rows, then the same
             * of the second four */
            for (int g = 0; g < 2; g++) {
                const __m512i *tg = t + 4 * g;
                u[4 * g + 0] = _mm512_unpacklo_epi64(tg[0], tg[2]);
                u[4 * g + 1] = _mm512_unpackhi_epi64(tg[0], tg[2]);
                u[4 * g + 2] = _mm512_unpacklo_epi64(tg[1], tg[3]);
                u[4 * g + 3] = _mm512_unpackhi_epi64(tg[1], tg[3]);
            }
            for (int q = 0; q < 8; q++) {
                const __m512i v = _mm512_permutex2var_epi64(u[q & 3], q < 4 ? lo2 : hi2, u[4 + (q & 3)]);
                _mm512_storeu_si512(pb + (size_t)q * QNR * 4, v);
                sum = _mm512_dpbusd_epi32(sum, ones, v);
            }
        } else {
            /* z[r] = [row r | row r+4 | row r+8 | row r+12], 4 quads each */
            __m512i z[4];
            for (int r = 0; r < 4; r++) {
                __m512i v = _mm512_castsi128_si512(q_row4(src + 2 + (size_t)r * rb, r < rn));
                v = _mm512_inserti32x4(v, q_row4(src + 2 + (size_t)(r + 4) * rb, r + 4 < rn), 1);
                v = _mm512_inserti32x4(v, q_row4(src + 2 + (size_t)(r + 8) * rb, r + 8 < rn), 2);
                z[r] = _mm512_inserti32x4(v, q_row4(src + 2 + (size_t)(r + 12) * rb, r + 12 < rn), 3);
            }
            const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
            const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
            const __m512i u[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                                  _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
            /* the codes c0 | c1 << 8 of each row, widened as q4_code_f16 */
            const __m512i c = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rm, idx, src, 1);
            const __m512 d0 = q4_codes_ps(c), d1 = q4_codes_ps(_mm512_srli_epi32(c, 8));
            const __m512 s =
                _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_abs_ps(d1), _mm512_abs_ps(d0), _CMP_GT_OQ), d0, d1);
            const __mmask16 nz = _mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_NEQ_UQ);
            const __m512i f0 = q4_fold_factors(d0, s, nz), f1 = q4_fold_factors(d1, s, nz);
            for (int q = 0; q < 4; q++) {
                const __m512i lo = q4_fold_quads(_mm512_sub_epi8(_mm512_and_si512(u[q], low4), eight), f0);
                const __m512i hi =
                    q4_fold_quads(_mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi32(u[q], 4), low4), eight), f1);
                _mm512_storeu_si512(pb + (size_t)q * QNR * 4, lo);
                _mm512_storeu_si512(pb + (size_t)(q + 4) * QNR * 4, hi);
                sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum, ones, lo), ones, hi);
            }
            _mm512_storeu_ps(pb + QNR * 32, _mm512_div_ps(s, _mm512_set1_ps(16.0f)));
            _mm512_storeu_si512(pb + QNR * 36, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7)));
            continue;
        }
        const __m512i d = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rm, idx, src, 1);
        _mm512_storeu_ps(pb + QNR * 32, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d)));
        _mm512_storeu_si512(pb + QNR * 36, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, 7)));
    }
}

static void qpack_avx512(void *dst, const void *w, dtype dt, size_t rb, int nrows, int b0, int nb) {
    for (int h = 0; h < 2; h++) {
        const int rn = nrows - 16 * h < 0 ? 0 : imin(16, nrows - 16 * h);
        const char *src = (const char *)w + (size_t)16 * h * rb;
        if (dt == DT_Q8)
            qpack_half(DT_Q8, dst, src, rb, rn, b0, nb, h);
        else
            qpack_half(DT_Q4, dst, src, rb, rn, b0, nb, h);
    }
}

INLINE void qtile(const int M, const int NV, const int XS, int nb, const uint8_t *x, size_t ldx, const float *dx,
                  size_t lddx, const char *wp, float *y, size_t ldy, __mmask16 m0, __mmask16 m1, const float *bias,
                  int accumulate) {
    __m512 f[QMR][2];
    for (int i = 0; i < M; i++)
        for (int v = 0; v < NV; v++) f[i][v] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const char *pb = wp + (size_t)b * CPU_QBLK_BYTES(QNR);
        const uint8_t *xb = x + (size_t)b * 32;
        __m512i s[QMR][2];
        for (int v = 0; v < NV; v++) {
            const __m512i c = _mm512_loadu_si512(pb + QNR * 36 + 64 * v);
            for (int i = 0; i < M; i++) s[i][v] = c;
        }
        for (int u = 0; u < 8; u++) {
            __m512i w[2];
            for (int v = 0; v < NV; v++) w[v] = _mm512_loadu_si512(pb + (size_t)u * QNR * 4 + 64 * v);
            for (int i = 0; i < M; i++) {
                int32_t x4;
                memcpy(&x4, xb + (size_t)i * ldx + 4 * u, 4);
                const __m512i xv = _mm512_set1_epi32(x4);
                for (int v = 0; v < NV; v++) s[i][v] = _mm512_dpbusd_epi32(s[i][v], xv, w[v]);
            }
        }
        for (int v = 0; v < NV; v++) {
            const __m512 dw = _mm512_loadu_ps(pb + QNR * 32 + 64 * v);
            for (int i = 0; i < M; i++) {
                const __m512 sc = XS ? _mm512_mul_ps(dw, _mm512_set1_ps(dx[(size_t)i * lddx + b])) : dw;
                f[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i][v]), sc, f[i][v]);
            }
        }
    }
    const __mmask16 mk[2] = {m0, m1};
    for (int i = 0; i < M; i++)
        for (int v = 0; v < NV; v++) {
            __m512 r = XS ? f[i][v] : _mm512_mul_ps(f[i][v], _mm512_set1_ps(dx[(size_t)i * lddx]));
            float *yi = y + (size_t)i * ldy + 16 * v;
            if (accumulate)
                r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mk[v], yi));
            else if (bias)
                r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mk[v], bias + 16 * v));
            _mm512_mask_storeu_ps(yi, mk[v], r);
        }
}

/* Per-block x scales: an FMA and a multiply per accumulator and block
 * instead of one FMA, and each x block quantised on its own range. */
#ifndef QXS
#define QXS 0
#endif

#define QTILE_CASES(NV)                                                                              \
    switch (mr) {                                                                                    \
    case 1: qtile(1, NV, QXS, nb, x, ldx, dx, lddx, wp, y, ldy, m0, m1, bias, accumulate); break;    \
    case 2: qtile(2, NV, QXS, nb, x, ldx, dx, lddx, wp, y, ldy, m0, m1, bias, accumulate); break;    \
    case 3: qtile(3, NV, QXS, nb, x, ldx, dx, lddx, wp, y, ldy, m0, m1, bias, accumulate); break;    \
    case 4: qtile(4, NV, QXS, nb, x, ldx, dx, lddx, wp, y, ldy, m0, m1, bias, accumulate); break;    \
    case 5: qtile(5, NV, QXS, nb, x, ldx, dx, lddx, wp, y, ldy, m0, m1, bias, accumulate); break;    \
    default: qtile(QMR, NV, QXS, nb, x, ldx, dx, lddx, wp, y, ldy, m0, m1, bias, accumulate); break; \
    }

static void qgemm_avx512(int mr, int nb, const uint8_t *x, size_t ldx, const float *dx, size_t lddx, const void *wpv,
                         float *y, size_t ldy, int ncols, const float *bias, int accumulate) {
    const char *wp = wpv;
    const __mmask16 m0 = mask16(ncols), m1 = mask16(ncols - 16 > 0 ? ncols - 16 : 0);
    if (ncols > 16) QTILE_CASES(2) else QTILE_CASES(1)
}

/* cpu_quantize_u8 in vectors: the same d, the same products x * (127 / d')
 * rounded to nearest even by vcvtps2dq, so the bytes are identical. */
static void quantize_u8_avx512(const float *x, int K, int per_block, uint8_t *q, float *d) {
    const int nb = (K + 31) / 32;
    float rmax = 0.0f;
    if (!per_block) {
        __m512 m = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16)
            m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask16(K - k), x + k)));
        rmax = _mm512_reduce_max_ps(m);
    }
    const __m512i off = _mm512_set1_epi32(128);
    for (int b = 0; b < nb; b++) {
        const int k0 = b * 32;
        const __mmask16 ma = mask16(K - k0), mb = mask16(K - k0 - 16 > 0 ? K - k0 - 16 : 0);
        const __m512 va = _mm512_maskz_loadu_ps(ma, x + k0), vb = _mm512_maskz_loadu_ps(mb, x + k0 + 16);
        float amax = rmax;
        if (per_block) amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(va), _mm512_abs_ps(vb)));
        const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const __m512i qa = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(va, id)), off);
        const __m512i qb = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(vb, id)), off);
        _mm_storeu_si128((__m128i *)(void *)(q + k0), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(void *)(q + k0 + 16), _mm512_cvtepi32_epi8(qb));
        d[b] = amax / 127.0f;
    }
}

static const cpu_qgemm qgemm_vnni = {QMR, QNR, QKB, QXS, qpack_avx512, qgemm_avx512, quantize_u8_avx512};

/* ---- tables ------------------------------------------------------------------------ */

#define AVX512_KERNELS(BF16_GEMM, BF16_GEMV, GEMV_Q, QGEMM)                                                        \
    {                                                                                                              \
        .f32 = &gemm_f32, .bf16 = BF16_GEMM, .small_t = 24, .gemv = gemv_avx512, .gemv_q = GEMV_Q, .qgemm = QGEMM, \
        .gemv_pairs = BF16_GEMV, .round_bf16 = round_bf16_avx512, .to_pairs = to_pairs_avx512,                     \
        .softmax = softmax_avx512, .dot_rows = dot_rows_avx512, .axpy_rows = axpy_rows_avx512,                     \
        .attn_part = attn_part_avx512, .layernorm_row = layernorm_row_avx512, .gelu_tanh = gelu_tanh_avx512,       \
        .gelu_erf = gelu_erf_avx512, .add = add_avx512, .rope_row = rope_row_avx512,                               \
    }

#if defined(__AVX512BF16__)
static const cpu_kernels kernels_bf16 = AVX512_KERNELS(&gemm_pairs, gemv_pairs_avx512, gemv_q_avx512, &qgemm_vnni);
static const cpu_table table_bf16 = {CPU_DRIVER_OPS("avx512"), &kernels_bf16};
#endif
static const cpu_kernels kernels_f32 = AVX512_KERNELS(NULL, NULL, gemv_q_avx512, &qgemm_vnni);
static const cpu_table table_f32 = {CPU_DRIVER_OPS("avx512"), &kernels_f32};
/* AVX-512 without VNNI (Skylake-SP/X): the block-format kernels above use
 * vpdpbusd, so block formats take the drivers' float paths. */
static const cpu_kernels kernels_novnni = AVX512_KERNELS(NULL, NULL, NULL, NULL);
static const cpu_table table_novnni = {CPU_DRIVER_OPS("avx512"), &kernels_novnni};

/* ---- the Q4 block quantiser (cpu.h, q4_range) ------------------------------------
 *
 * Sixteen candidate scales a vector, the sub-block's weights broadcast one
 * after another: each lane sums its candidate's squared errors in weight
 * order with the reference's operations (q4_level: clamp to ±9, round half
 * away from zero by adding ±0.5 and truncating, clamp to -8..7; then
 * x - d·q, squared, added: separate roundings, as in ops_ref.c). A NaN t
 * rounds to 0 as in q_round (the conversion would give INT_MIN); the
 * max/min operand order is the reference's comparisons'. The
 * candidates' scales are made from their codes as q4_mag_scale makes them
 * (exact either way), their reciprocals by IEEE division, as 1.0f / d. */
INLINE __m512 q4_level16(__m512 t) {
    t = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(t, t, _CMP_ORD_Q), t);
    t = _mm512_min_ps(_mm512_set1_ps(9.0f), _mm512_max_ps(_mm512_set1_ps(-9.0f), t));
    const __mmask16 ge = _mm512_cmp_ps_mask(t, _mm512_setzero_ps(), _CMP_GE_OQ);
    const __m512 h = _mm512_mask_blend_ps(ge, _mm512_set1_ps(-0.5f), _mm512_set1_ps(0.5f));
    const __m512 q = _mm512_cvtepi32_ps(_mm512_cvttps_epi32(_mm512_add_ps(t, h)));
    return _mm512_min_ps(_mm512_set1_ps(7.0f), _mm512_max_ps(_mm512_set1_ps(-8.0f), q));
}

static uint8_t q4_code_avx512(const float *v) {
    const __m512 x16 = _mm512_loadu_ps(v);
    const __m512 ax = _mm512_abs_ps(x16);
    const __mmask16 num = _mm512_cmp_ps_mask(ax, ax, _CMP_ORD_Q);
    const float a = _mm512_mask_reduce_max_ps(num, ax); /* -inf when every weight is NaN */
    int c0 = 0;
    const int nc = q4_range(a > 0.0f ? a : 0.0f, &c0);
    if (!nc) return 0;
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    float best_e = INFINITY;
    int best = -1;
    for (int g = 0; g < nc; g += 16) {
        const __m512i j = _mm512_add_epi32(_mm512_set1_epi32(g), lane);
        const __m512i m = _mm512_add_epi32(_mm512_set1_epi32(c0), _mm512_srli_epi32(j, 1));
        const __m512i nrm =
            _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(_mm512_srli_epi32(m, 3), _mm512_set1_epi32(112)), 23),
                            _mm512_slli_epi32(_mm512_and_si512(m, _mm512_set1_epi32(7)), 20));
        const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(m), _mm512_set1_ps(0x1p-17f));
        __m512 mag =
            _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(m, _mm512_set1_epi32(8)), _mm512_castsi512_ps(nrm), sub);
        mag = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(mag),
                                                   _mm512_slli_epi32(_mm512_and_si512(j, _mm512_set1_epi32(1)), 31)));
        const __mmask16 live = _mm512_cmplt_epi32_mask(j, _mm512_set1_epi32(nc));
        const __m512 d = _mm512_maskz_mov_ps(live, mag), id = _mm512_maskz_div_ps(live, _mm512_set1_ps(1.0f), mag);
        __m512 e = _mm512_setzero_ps();
        for (int i = 0; i < Q_BLOCK / 2; i++) {
            const __m512 x = _mm512_set1_ps(v[i]);
            const __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(d, q4_level16(_mm512_mul_ps(x, id))));
            e = _mm512_add_ps(e, _mm512_mul_ps(r, r));
        }
        /* q4_pick over this group: the first lane of the least error below
         * the best so far (NaN and infinite errors never win) */
        const __mmask16 ok = live & _mm512_cmp_ps_mask(e, _mm512_set1_ps(best_e), _CMP_LT_OQ);
        if (ok) {
            best_e = _mm512_mask_reduce_min_ps(ok, e);
            best = g + __builtin_ctz(ok & _mm512_cmp_ps_mask(e, _mm512_set1_ps(best_e), _CMP_EQ_OQ));
        }
    }
    return best < 0 ? (uint8_t)(c0 + nc / 2 - 1) : (uint8_t)((c0 + best / 2) | (best % 2) << 7);
}

static void q4_block_avx512(const float *v, uint8_t *p) {
    p[0] = q4_code_avx512(v), p[1] = q4_code_avx512(v + 16);
    const float d0 = q4_code_scale(p[0]), d1 = q4_code_scale(p[1]);
    const float i0 = d0 != 0.0f ? 1.0f / d0 : 0.0f, i1 = d1 != 0.0f ? 1.0f / d1 : 0.0f;
    const __m512i eight = _mm512_set1_epi32(8);
    const __m512i lo =
        _mm512_add_epi32(_mm512_cvttps_epi32(q4_level16(_mm512_mul_ps(_mm512_loadu_ps(v), _mm512_set1_ps(i0)))), eight);
    const __m512i hi = _mm512_add_epi32(
        _mm512_cvttps_epi32(q4_level16(_mm512_mul_ps(_mm512_loadu_ps(v + 16), _mm512_set1_ps(i1)))), eight);
    _mm_storeu_si128((__m128i *)(p + 2), _mm512_cvtepi32_epi8(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4))));
}

/* F16C and FMA come with every AVX-512 CPU; checked anyway since this file
 * is compiled to use them. */
static int cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
}

q4_block_fn q4_search_avx512(void) { return cpu_has_avx512() ? q4_block_avx512 : NULL; }

const ops *ops_avx512_table(void) {
    if (!cpu_has_avx512()) return NULL;
    if (!__builtin_cpu_supports("avx512vnni")) return &table_novnni.ops;
#if defined(__AVX512BF16__)
    if (__builtin_cpu_supports("avx512bf16")) return &table_bf16.ops;
#endif
    return &table_f32.ops;
}

const ops *ops_avx512_nobf16_table(void) {
    if (!cpu_has_avx512()) return NULL;
    return __builtin_cpu_supports("avx512vnni") ? &table_f32.ops : &table_novnni.ops;
}
