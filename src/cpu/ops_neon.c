/*
 * ops_neon.c — AArch64 NEON kernels of the CPU backend (cpu.h,
 * cpu_kernels); the drivers in ops_cpu.c do the blocking and threading.
 * Compiled only for aarch64, where NEON (and the f16 <-> f32 conversions)
 * are part of the base ISA, so the table needs no run-time check.
 *
 *   linear, T >= 16: panels [256][16] of floats, register tile 5 x 16 (20 q
 *                    registers of accumulators);
 *   linear, T < 16:  "gemv": W read once, in place, one weight row at a time
 *                    x up to 4 rows of x (not tuned on hardware: qemu-tested);
 *   bf16 weights:   widened by a 16-bit shift (vshll); OPS_BF16 rounds x to
 *                   bf16 and uses the float kernels, or with the BF16
 *                   extension BFDOT at small T (gemv_pairs_bf);
 *   Q8/Q4 weights:  with the DotProd extension, SDOT against int8 x at small
 *                   T (gemv_q_dot); without it the portable path.
 * The extension kernels are picked at run time from getauxval(AT_HWCAP*).
 * The scalar reference of every kernel is its op in ops_ref.c.
 */
#include <arm_neon.h>
#include <math.h>

#include "cpu.h"

#define MR 5
#define NR 16
#define KC 256

#define INLINE static inline __attribute__((always_inline))

static int imin(int a, int b) { return a < b ? a : b; }

/* 4 weights of dtype dt widened to float. */
INLINE float32x4_t ld4w(const void *p, dtype dt) {
    switch (dt) {
    case DT_BF16: return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
    case DT_F16: return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
    default: return vld1q_f32(p);
    }
}

/* The first n (< 4) weights, zeros after, reading only those n. */
INLINE float32x4_t ld4w_part(const void *p, dtype dt, int n) {
    uint32_t tmp[4] = {0, 0, 0, 0};
    memcpy(tmp, p, (size_t)n * (dt == DT_F32 ? 4 : 2));
    return ld4w(tmp, dt);
}

/* The first n (0..4) floats, zeros after. */
INLINE float32x4_t ld4_part(const float *p, int n) {
    float tmp[4] = {0, 0, 0, 0};
    memcpy(tmp, p, (size_t)(n < 0 ? 0 : n > 4 ? 4 : n) * 4);
    return vld1q_f32(tmp);
}

INLINE void st4_part(float *p, float32x4_t v, int n) {
    float tmp[4];
    vst1q_f32(tmp, v);
    memcpy(p, tmp, (size_t)(n < 0 ? 0 : n > 4 ? 4 : n) * 4);
}

/* ---- packing and the register tile --------------------------------------------------- */

static void pack_f32_neon(void *dstv, const void *w, dtype dt, size_t ldw, int nrows, int e0, int ec, int K) {
    (void)K;
    float *dst = dstv;
    const size_t es = dt == DT_F32 ? 4 : 2;
    for (int r0 = 0; r0 < NR; r0 += 4) {
        const int rn = imin(4, nrows - r0);
        for (int k = 0; k < ec; k += 4) {
            const int kn = imin(4, ec - k);
            float32x4_t r[4];
            for (int i = 0; i < 4; i++) {
                const char *p = (const char *)w + ((size_t)(r0 + i) * ldw + e0 + k) * es;
                r[i] = i >= rn ? vdupq_n_f32(0.0f) : kn == 4 ? ld4w(p, dt) : ld4w_part(p, dt, kn);
            }
            /* 4x4 transpose */
            const float32x4_t t0 = vtrn1q_f32(r[0], r[1]), t1 = vtrn2q_f32(r[0], r[1]);
            const float32x4_t t2 = vtrn1q_f32(r[2], r[3]), t3 = vtrn2q_f32(r[2], r[3]);
            float32x4_t c[4];
            c[0] = vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
            c[1] = vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
            c[2] = vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
            c[3] = vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
            for (int i = 0; i < kn; i++) vst1q_f32(dst + (size_t)(k + i) * NR + r0, c[i]);
        }
    }
}

/* A 5 x 16 register tile: 20 accumulators, 4 weight vectors and 5 values of
 * x fit the 32 registers (6 rows spilled). Named variables, because with an
 * array of accumulators GCC 12 kept them on the stack inside the loop (a
 * store per multiply-add). Rows past mr repeat the last row of x and are
 * not stored; initial values and partial stores go through a small buffer. */
#define ACC_ROW(i) float32x4_t c##i##0, c##i##1, c##i##2, c##i##3
#define INIT_ROW(i)                                                                                    \
    c##i##0 = vld1q_f32(&buf[i][0]), c##i##1 = vld1q_f32(&buf[i][4]), c##i##2 = vld1q_f32(&buf[i][8]), \
    c##i##3 = vld1q_f32(&buf[i][12])
#define FMA_ROW(i)                                                                      \
    do {                                                                                \
        const float xe = xr[i][e];                                                      \
        c##i##0 = vfmaq_n_f32(c##i##0, w0, xe), c##i##1 = vfmaq_n_f32(c##i##1, w1, xe); \
        c##i##2 = vfmaq_n_f32(c##i##2, w2, xe), c##i##3 = vfmaq_n_f32(c##i##3, w3, xe); \
    } while (0)
#define SAVE_ROW(i)                                                                                 \
    vst1q_f32(&buf[i][0], c##i##0), vst1q_f32(&buf[i][4], c##i##1), vst1q_f32(&buf[i][8], c##i##2), \
        vst1q_f32(&buf[i][12], c##i##3)

static void gemm_f32_neon(int mr, int kc, const void *xv, size_t ldx, const void *wpv, float *y, size_t ldy, int ncols,
                          const float *bias, int accumulate) {
    const float *x = xv, *wp = wpv;
    const float *xr[MR];
    float buf[MR][NR];
    for (int i = 0; i < MR; i++) xr[i] = x + (size_t)imin(i, mr - 1) * ldx;
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            buf[i][j] = j >= ncols || i >= mr ? 0.0f : accumulate ? y[(size_t)i * ldy + j] : bias ? bias[j] : 0.0f;
    ACC_ROW(0);
    ACC_ROW(1);
    ACC_ROW(2);
    ACC_ROW(3);
    ACC_ROW(4);
    INIT_ROW(0);
    INIT_ROW(1);
    INIT_ROW(2);
    INIT_ROW(3);
    INIT_ROW(4);
    for (int e = 0; e < kc; e++) {
        const float *we = wp + (size_t)e * NR;
        const float32x4_t w0 = vld1q_f32(we), w1 = vld1q_f32(we + 4);
        const float32x4_t w2 = vld1q_f32(we + 8), w3 = vld1q_f32(we + 12);
        FMA_ROW(0);
        FMA_ROW(1);
        FMA_ROW(2);
        FMA_ROW(3);
        FMA_ROW(4);
    }
    SAVE_ROW(0);
    SAVE_ROW(1);
    SAVE_ROW(2);
    SAVE_ROW(3);
    SAVE_ROW(4);
    for (int i = 0; i < mr; i++) memcpy(y + (size_t)i * ldy, buf[i], (size_t)ncols * 4);
}

static const cpu_gemm gemm_f32 = {MR, NR, KC, 0, pack_f32_neon, gemm_f32_neon};

/* ---- gemv ------------------------------------------------------------------------------
 * One weight row at a time, front to back: a thread's share of W is one
 * sequential stream (as on x86, where it streams 45 GB/s against 32 GB/s for
 * four interleaved rows), meeting up to 4 rows of x from L1. */

INLINE void gemv_row(const int TN, const dtype DT, int K, const float *x, size_t ldx, const char *wr, float out[4]) {
    const size_t es = DT == DT_F32 ? 4 : 2;
    float32x4_t acc[4][2];
    for (int t = 0; t < TN; t++) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        if (!(k & 31)) __builtin_prefetch(wr + k * es + 2048);
        const float32x4_t w0 = ld4w(wr + k * es, DT), w1 = ld4w(wr + (k + 4) * es, DT);
        for (int t = 0; t < TN; t++) {
            acc[t][0] = vfmaq_f32(acc[t][0], vld1q_f32(x + (size_t)t * ldx + k), w0);
            acc[t][1] = vfmaq_f32(acc[t][1], vld1q_f32(x + (size_t)t * ldx + k + 4), w1);
        }
    }
    for (int t = 0; t < TN; t++) out[t] = vaddvq_f32(vaddq_f32(acc[t][0], acc[t][1]));
    /* The last K % 8 in scalar code (partial vector loads in the loop above
     * made GCC 12 keep the accumulators on the stack). */
    for (; k < K; k++) {
        const float wv = cpu_ld(wr, DT, (size_t)k);
        for (int t = 0; t < TN; t++) out[t] += x[(size_t)t * ldx + k] * wv;
    }
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

static void gemv_neon(int T, int K, const float *x, size_t ldx, const void *w, dtype dt, const void *b, dtype bdt,
                      int n0, int n1, float *y, size_t ldy) {
    switch (dt) {
    case DT_BF16: gemv_dt(DT_BF16, T, K, x, ldx, w, b, bdt, n0, n1, y, ldy); break;
    case DT_F16: gemv_dt(DT_F16, T, K, x, ldx, w, b, bdt, n0, n1, y, ldy); break;
    default: gemv_dt(DT_F32, T, K, x, ldx, w, b, bdt, n0, n1, y, ldy); break;
    }
}

/* ---- bf16 rounding ------------------------------------------------------------------- */

/* Round to nearest even on the bit pattern, as f32_to_bf16 (common.h). */
INLINE float32x4_t round_bf16_4(float32x4_t v) {
    const uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    uint32x4_t r = vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7fff)), lsb);
    const uint32x4_t num = vceqq_f32(v, v); /* all ones unless NaN */
    r = vbslq_u32(num, r, vorrq_u32(u, vdupq_n_u32(0x400000)));
    return vreinterpretq_f32_u32(vandq_u32(r, vdupq_n_u32(0xffff0000u)));
}

static void round_bf16_neon(float *dst, const float *src, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, round_bf16_4(vld1q_f32(src + i)));
    if (i < n) st4_part(dst + i, round_bf16_4(ld4_part(src + i, n - i)), n - i);
}

/* ---- exp and friends --------------------------------------------------------------------
 * exp(x) = 2^n e^r with the Cephes expf polynomial (about 1 ulp); 2^n built
 * in the exponent field in two halves, so that the two multiplies give the
 * right denormal, 0 or inf. */
INLINE float32x4_t exp4(float32x4_t x) {
    x = vmaxq_f32(vminq_f32(x, vdupq_n_f32(100.0f)), vdupq_n_f32(-104.0f));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t ni = vcvtq_s32_f32(n);
    const int32x4_t h1 = vshrq_n_s32(ni, 1), h2 = vsubq_s32(ni, h1);
    const float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(h1, vdupq_n_s32(127)), 23));
    const float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(h2, vdupq_n_s32(127)), 23));
    return vmulq_f32(vmulq_f32(p, s1), s2);
}

static float softmax_neon(float *s, int n, float scale) {
    float32x4_t mx = vdupq_n_f32(-INFINITY);
    int i = 0;
    for (; i + 4 <= n; i += 4) mx = vmaxq_f32(mx, vmulq_n_f32(vld1q_f32(s + i), scale));
    float m = vmaxvq_f32(mx);
    for (int j = i; j < n; j++) m = fmaxf(m, s[j] * scale);
    const float32x4_t vm = vdupq_n_f32(m);
    float32x4_t sum = vdupq_n_f32(0.0f);
    for (i = 0; i + 4 <= n; i += 4) {
        const float32x4_t p = exp4(vsubq_f32(vmulq_n_f32(vld1q_f32(s + i), scale), vm));
        vst1q_f32(s + i, p);
        sum = vaddq_f32(sum, p);
    }
    float total = vaddvq_f32(sum);
    if (i < n) {
        float tail[4];
        vst1q_f32(tail, exp4(vsubq_f32(vmulq_n_f32(ld4_part(s + i, n - i), scale), vm)));
        for (int j = 0; j < n - i; j++) {
            s[i + j] = tail[j];
            total += tail[j];
        }
    }
    return total;
}

/* Column tails in scalar code here and below: partial vector loads inside
 * these loops made GCC 12 keep the accumulators on the stack. */
/* 4 KV elements of dtype dt (DT_F32, DT_BF16 or DT_E4M3) at element i of
 * row p. e4m3 is widened in registers with the bit trick of ops_avx512.c's
 * e4m3x16 (sign-extend, shift the exponent and mantissa into a float's,
 * times 2^120; NaN for S.1111.111): exact. */
static inline float32x4_t ldkv4(const void *p, dtype dt, size_t i) {
    if (dt == DT_E4M3) {
        uint32_t w;
        memcpy(&w, (const uint8_t *)p + i, 4);
        const int32x4_t x = vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_u32(vdup_n_u32(w)))));
        const uint32x4_t t = vshlq_n_u32(vreinterpretq_u32_s32(x), 20), em = vdupq_n_u32(0x07f00000u);
        const uint32x4_t nan = vceqq_u32(vandq_u32(t, em), em);
        const float32x4_t f = vmulq_n_f32(vreinterpretq_f32_u32(vandq_u32(t, vdupq_n_u32(0x87f00000u))), 0x1p120f);
        return vbslq_f32(nan, vdupq_n_f32(NAN), f);
    }
    if (dt == DT_BF16) return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t *)p + i), 16));
    return vld1q_f32((const float *)p + i);
}

static void dot_rows_neon(float *out, const float *q, const void *k, dtype kdt, size_t ldk, int n, int D) {
    const int D8 = D & ~7, D4 = D & ~3;
    const size_t ld = ldk * kv_elem_bytes(kdt);
    for (int j = 0; j < n; j++) {
        const void *kj = (const char *)k + (size_t)j * ld;
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;
        int d = 0;
        for (; d < D8; d += 8) {
            a0 = vfmaq_f32(a0, vld1q_f32(q + d), ldkv4(kj, kdt, (size_t)d));
            a1 = vfmaq_f32(a1, vld1q_f32(q + d + 4), ldkv4(kj, kdt, (size_t)d + 4));
        }
        if (d < D4) a0 = vfmaq_f32(a0, vld1q_f32(q + d), ldkv4(kj, kdt, (size_t)d));
        float sum = vaddvq_f32(vaddq_f32(a0, a1));
        for (d = D4; d < D; d++) sum += q[d] * kv_get(kj, kdt, (size_t)d);
        out[j] = sum;
    }
}

static void axpy_rows_neon(float *out, const float *p, const void *v, dtype vdt, size_t ldv, int n, int D, float s) {
    const size_t ld = ldv * kv_elem_bytes(vdt);
    int d0 = 0;
    for (; d0 + 16 <= D; d0 += 16) {
        float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
        for (int j = 0; j < n; j++) {
            const void *vj = (const char *)v + (size_t)j * ld;
            a0 = vfmaq_n_f32(a0, ldkv4(vj, vdt, (size_t)d0), p[j]);
            a1 = vfmaq_n_f32(a1, ldkv4(vj, vdt, (size_t)d0 + 4), p[j]);
            a2 = vfmaq_n_f32(a2, ldkv4(vj, vdt, (size_t)d0 + 8), p[j]);
            a3 = vfmaq_n_f32(a3, ldkv4(vj, vdt, (size_t)d0 + 12), p[j]);
        }
        vst1q_f32(out + d0, vmulq_n_f32(a0, s));
        vst1q_f32(out + d0 + 4, vmulq_n_f32(a1, s));
        vst1q_f32(out + d0 + 8, vmulq_n_f32(a2, s));
        vst1q_f32(out + d0 + 12, vmulq_n_f32(a3, s));
    }
    for (; d0 + 4 <= D; d0 += 4) {
        float32x4_t a0 = vdupq_n_f32(0.0f);
        for (int j = 0; j < n; j++)
            a0 = vfmaq_n_f32(a0, ldkv4((const char *)v + (size_t)j * ld, vdt, (size_t)d0), p[j]);
        vst1q_f32(out + d0, vmulq_n_f32(a0, s));
    }
    for (; d0 < D; d0++) {
        float a = 0.0f;
        for (int j = 0; j < n; j++) a += p[j] * kv_get((const char *)v + (size_t)j * ld, vdt, (size_t)d0);
        out[d0] = a * s;
    }
}

/* ---- LayerNorm, GELU, add, rope ------------------------------------------------------- */

static void layernorm_row_neon(float *y, const float *x, int C, const float *g, const float *b, float eps) {
    /* statistics in double, like the reference */
    float64x2_t s0 = vdupq_n_f64(0.0), s1 = s0;
    int i = 0;
    for (; i + 4 <= C; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        s0 = vaddq_f64(s0, vcvt_f64_f32(vget_low_f32(v)));
        s1 = vaddq_f64(s1, vcvt_high_f64_f32(v));
    }
    double sum = vaddvq_f64(vaddq_f64(s0, s1));
    for (int j = i; j < C; j++) sum += x[j];
    const double mean = sum / C;
    const float64x2_t md = vdupq_n_f64(mean);
    s0 = s1 = vdupq_n_f64(0.0);
    for (i = 0; i + 4 <= C; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        const float64x2_t d0 = vsubq_f64(vcvt_f64_f32(vget_low_f32(v)), md);
        const float64x2_t d1 = vsubq_f64(vcvt_high_f64_f32(v), md);
        s0 = vfmaq_f64(s0, d0, d0);
        s1 = vfmaq_f64(s1, d1, d1);
    }
    double var = vaddvq_f64(vaddq_f64(s0, s1));
    for (int j = i; j < C; j++) var += (x[j] - mean) * (x[j] - mean);
    var /= C;
    const float inv = (float)(1.0 / sqrt(var + eps)), mf = (float)mean;
    for (i = 0; i + 4 <= C; i += 4) {
        const float32x4_t t = vmulq_n_f32(vsubq_f32(vld1q_f32(x + i), vdupq_n_f32(mf)), inv);
        vst1q_f32(y + i, vaddq_f32(vmulq_f32(t, vld1q_f32(g + i)), vld1q_f32(b + i)));
    }
    for (; i < C; i++) y[i] = ((x[i] - mf) * inv) * g[i] + b[i];
}

/* 0.5 v (1 + tanh u) = v / (1 + e^{-2u}): no cancellation for negative u. */
INLINE float32x4_t gelu_tanh4(float32x4_t v) {
    const float32x4_t u = vfmaq_f32(v, vmulq_n_f32(v, 0.044715f), vmulq_f32(v, v));
    const float32x4_t e = exp4(vmulq_n_f32(u, -2.0f * 0.7978845608028654f));
    return vdivq_f32(v, vaddq_f32(vdupq_n_f32(1.0f), e));
}

/* 0.5 v (1 + erf z), 1 + erf z from erfc |z| (Numerical Recipes erfcc,
 * relative error < 1.2e-7): no cancellation for negative z. */
INLINE float32x4_t gelu_erf4(float32x4_t v) {
    static const float c[10] = {0.17087277f,  -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                                -0.18628806f, 0.09678418f,  0.37409196f, 1.00002368f,  -1.26551223f};
    const float32x4_t z = vmulq_n_f32(v, 0.7071067811865476f), a = vabsq_f32(z);
    const float32x4_t t = vdivq_f32(vdupq_n_f32(1.0f), vfmaq_n_f32(vdupq_n_f32(1.0f), a, 0.5f));
    float32x4_t p = vdupq_n_f32(c[0]);
    for (int i = 1; i < 10; i++) p = vfmaq_f32(vdupq_n_f32(c[i]), p, t);
    const float32x4_t r = vmulq_f32(t, exp4(vfmsq_f32(p, a, a)));
    const uint32x4_t pos = vcgeq_f32(z, vdupq_n_f32(0.0f));
    const float32x4_t e = vbslq_f32(pos, vsubq_f32(vdupq_n_f32(2.0f), r), r);
    return vmulq_f32(vmulq_n_f32(v, 0.5f), e);
}

static void gelu_tanh_neon(float *x, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, gelu_tanh4(vld1q_f32(x + i)));
    if (i < n) st4_part(x + i, gelu_tanh4(ld4_part(x + i, (int)(n - i))), (int)(n - i));
}

static void gelu_erf_neon(float *x, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, gelu_erf4(vld1q_f32(x + i)));
    if (i < n) st4_part(x + i, gelu_erf4(ld4_part(x + i, (int)(n - i))), (int)(n - i));
}

static void add_neon(float *y, const float *x, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vaddq_f32(vld1q_f32(y + i), vld1q_f32(x + i)));
    for (; i < n; i++) y[i] += x[i];
}

static void rope_row_neon(float *x, int H, int D, int half, const float *ct, const float *st) {
    for (int h = 0; h < H; h++) {
        float *v = x + (size_t)h * D;
        int i = 0;
        for (; i + 4 <= half; i += 4) {
            const float32x4_t a = vld1q_f32(v + i), b = vld1q_f32(v + i + half);
            const float32x4_t c = vld1q_f32(ct + i), s = vld1q_f32(st + i);
            /* products rounded separately, as in the reference */
            vst1q_f32(v + i, vsubq_f32(vmulq_f32(a, c), vmulq_f32(b, s)));
            vst1q_f32(v + i + half, vaddq_f32(vmulq_f32(a, s), vmulq_f32(b, c)));
        }
        for (; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * ct[i] - b * st[i];
            v[i + half] = a * st[i] + b * ct[i];
        }
    }
}

/* ---- optional extensions: dot products (ARMv8.2 DotProd) and bf16 (ARMv8.6 BF16) --------
 * Compiled for their architecture level by function attribute and reached
 * only through the table that getauxval() selects at run time, so the base
 * table still runs on any ARMv8-A. */

#define QT_MAX 4

/* Q8/Q4 weights against x quantised per block of 32 (cpu_quantize_x):
 * per block (Q4: per half block, whose scales differ), sum_i q_w[i] q_x[i]
 * by SDOT (exact in int32), scaled by d_w d_x in float, as gemv_q_x86.h
 * does; one weight row at a time. */
__attribute__((target("arch=armv8.2-a+dotprod"))) static void gemv_q_dot(int T, int K, const void *xqv, size_t ldxq,
                                                                         const void *w, dtype dt, const void *b,
                                                                         dtype bdt, int n0, int n1, float *y,
                                                                         size_t ldy) {
    const int nb = (K + 31) / 32;
    const size_t rb = q_row_bytes(dt, K), bb = dt == DT_Q8 ? Q8_BLOCK_BYTES : Q4_BLOCK_BYTES;
    const int8_t *xq = xqv;
    const uint8x16_t low4 = vdupq_n_u8(15);
    const int8x16_t eight = vdupq_n_s8(8);
    for (int n = n0; n < n1; n++) {
        const uint8_t *wr = (const uint8_t *)w + (size_t)n * rb;
        const float bn = b ? cpu_ld(b, bdt, (size_t)n) : 0.0f;
        for (int t0 = 0; t0 < T; t0 += QT_MAX) {
            const int tn = imin(QT_MAX, T - t0);
            float32x4_t acc[QT_MAX];
            for (int t = 0; t < tn; t++) acc[t] = vdupq_n_f32(0.0f);
            for (int k = 0; k < nb; k++) {
                const uint8_t *blk = wr + (size_t)k * bb;
                if (!(k & 1)) __builtin_prefetch(blk + 2048);
                int8x16_t w0, w1;
                if (dt == DT_Q8) {
                    w0 = vld1q_s8((const int8_t *)(blk + 2));
                    w1 = vld1q_s8((const int8_t *)(blk + 18));
                } else {
                    const uint8x16_t qs = vld1q_u8(blk + 2);
                    w0 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(qs, low4)), eight);
                    w1 = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(qs, 4)), eight);
                }
                /* Q8: one d for the block; Q4: d0 for weights 0..15 (w0), d1
                 * for 16..31 (w1), from their codes (ops.h q4_code_f16) */
                uint16_t h[2];
                if (dt == DT_Q8) {
                    memcpy(&h[0], blk, 2);
                    h[1] = h[0];
                } else {
                    h[0] = q4_code_f16(blk[0]), h[1] = q4_code_f16(blk[1]);
                }
                const float32x4_t dwv =
                    vcvt_f32_f16(vreinterpret_f16_u16(vld1_lane_u16(&h[1], vld1_lane_u16(&h[0], vdup_n_u16(0), 0), 1)));
                const float dw0 = vgetq_lane_f32(dwv, 0), dw1 = vgetq_lane_f32(dwv, 1);
                for (int t = 0; t < tn; t++) {
                    const int8_t *xb = xq + (size_t)(t0 + t) * ldxq + (size_t)k * 32;
                    const float dx = ((const float *)(const void *)(xq + (size_t)(t0 + t) * ldxq + (size_t)nb * 32))[k];
                    if (dt == DT_Q8) {
                        int32x4_t s = vdotq_s32(vdupq_n_s32(0), w0, vld1q_s8(xb));
                        s = vdotq_s32(s, w1, vld1q_s8(xb + 16));
                        acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(s), dw0 * dx);
                    } else {
                        const int32x4_t s0 = vdotq_s32(vdupq_n_s32(0), w0, vld1q_s8(xb));
                        const int32x4_t s1 = vdotq_s32(vdupq_n_s32(0), w1, vld1q_s8(xb + 16));
                        acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(s0), dw0 * dx);
                        acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(s1), dw1 * dx);
                    }
                }
            }
            for (int t = 0; t < tn; t++) y[(size_t)(t0 + t) * ldy + n] = vaddvq_f32(acc[t]) + bn;
        }
    }
}

/* bf16 x bf16 dot products (BFDOT) on bf16 weights against x as bf16 pairs
 * (to_pairs): 8 weights per instruction, one weight row at a time. */
__attribute__((target("arch=armv8.6-a+bf16"))) static void gemv_pairs_bf(int T, int K, const uint32_t *x, size_t ldx,
                                                                         const uint16_t *w, const void *b, dtype bdt,
                                                                         int n0, int n1, float *y, size_t ldy) {
    const int K8 = K & ~7;
    for (int n = n0; n < n1; n++) {
        const uint16_t *wr = w + (size_t)n * K;
        const float bn = b ? cpu_ld(b, bdt, (size_t)n) : 0.0f;
        for (int t0 = 0; t0 < T; t0 += 4) {
            const int tn = imin(4, T - t0);
            float32x4_t acc[4];
            for (int t = 0; t < tn; t++) acc[t] = vdupq_n_f32(0.0f);
            for (int k = 0; k < K8; k += 8) {
                if (!(k & 31)) __builtin_prefetch(wr + k + 1024);
                const bfloat16x8_t wv = vreinterpretq_bf16_u16(vld1q_u16(wr + k));
                for (int t = 0; t < tn; t++)
                    acc[t] =
                        vbfdotq_f32(acc[t], wv, vreinterpretq_bf16_u32(vld1q_u32(x + (size_t)(t0 + t) * ldx + k / 2)));
            }
            for (int t = 0; t < tn; t++) {
                float sum = vaddvq_f32(acc[t]);
                const uint32_t *xt = x + (size_t)(t0 + t) * ldx;
                for (int k = K8; k < K; k++) {
                    const uint16_t xh = (uint16_t)(k & 1 ? xt[k / 2] >> 16 : xt[k / 2] & 0xffff);
                    sum += bf16_to_f32(xh) * bf16_to_f32(wr[k]);
                }
                y[(size_t)(t0 + t) * ldy + n] = sum + bn;
            }
        }
    }
}

static void to_pairs_neon(uint32_t *dst, const float *src, int n) {
    for (int i = 0; 2 * i < n; i++) {
        const uint32_t lo = f32_to_bf16(src[2 * i]), hi = 2 * i + 1 < n ? f32_to_bf16(src[2 * i + 1]) : 0;
        dst[i] = lo | hi << 16;
    }
}

static const cpu_kernels kernels = {
    .f32 = &gemm_f32,
    .bf16 = NULL,
    .small_t = 16,
    .gemv = gemv_neon,
    .gemv_pairs = NULL,
    .round_bf16 = round_bf16_neon,
    .to_pairs = NULL, /* only used with bf16 dot products */
    .softmax = softmax_neon,
    .dot_rows = dot_rows_neon,
    .axpy_rows = axpy_rows_neon,
    .layernorm_row = layernorm_row_neon,
    .gelu_tanh = gelu_tanh_neon,
    .gelu_erf = gelu_erf_neon,
    .add = add_neon,
    .rope_row = rope_row_neon,
};

/* ---- the Q4 block quantiser (cpu.h, q4_range; ops_avx512.c has the
 * reasoning): sixteen candidates in four vectors. NEON's fmax/fmin would
 * pass a NaN through differently from the reference's comparisons, so the
 * clamps are comparisons and selects, as written there; a NaN t rounds to
 * 0, as in q_round. */
INLINE float32x4_t q4_level4(float32x4_t t) {
    t = vbslq_f32(vceqq_f32(t, t), t, vdupq_n_f32(0.0f));
    const float32x4_t lo9 = vdupq_n_f32(-9.0f), hi9 = vdupq_n_f32(9.0f);
    t = vbslq_f32(vcltq_f32(t, lo9), lo9, t);
    t = vbslq_f32(vcgtq_f32(t, hi9), hi9, t);
    const float32x4_t h = vbslq_f32(vcgeq_f32(t, vdupq_n_f32(0.0f)), vdupq_n_f32(0.5f), vdupq_n_f32(-0.5f));
    float32x4_t q = vcvtq_f32_s32(vcvtq_s32_f32(vaddq_f32(t, h)));
    const float32x4_t lo8 = vdupq_n_f32(-8.0f), hi7 = vdupq_n_f32(7.0f);
    q = vbslq_f32(vcltq_f32(q, lo8), lo8, q);
    return vbslq_f32(vcgtq_f32(q, hi7), hi7, q);
}

static uint8_t q4_code_neon(const float *v) {
    int c0 = 0;
    const int nc = q4_range(q4_absmax(v), &c0);
    if (!nc) return 0;
    float d[Q4_CAND_MAX], id[Q4_CAND_MAX], e[Q4_CAND_MAX];
    q4_scales(c0, nc, (nc + 15) / 16 * 16, d, id);
    for (int g = 0; g < nc; g += 16) {
        float32x4_t dv[4], iv[4], ev[4];
        for (int u = 0; u < 4; u++) {
            dv[u] = vld1q_f32(d + g + 4 * u);
            iv[u] = vld1q_f32(id + g + 4 * u);
            ev[u] = vdupq_n_f32(0.0f);
        }
        for (int i = 0; i < Q_BLOCK / 2; i++) {
            const float32x4_t x = vdupq_n_f32(v[i]);
            for (int u = 0; u < 4; u++) {
                const float32x4_t r = vsubq_f32(x, vmulq_f32(dv[u], q4_level4(vmulq_f32(x, iv[u]))));
                ev[u] = vaddq_f32(ev[u], vmulq_f32(r, r));
            }
        }
        for (int u = 0; u < 4; u++) vst1q_f32(e + g + 4 * u, ev[u]);
    }
    return q4_pick(e, nc, c0);
}

static void q4_block_neon(const float *v, uint8_t *p) {
    p[0] = q4_code_neon(v), p[1] = q4_code_neon(v + 16);
    const float d0 = q4_code_scale(p[0]), d1 = q4_code_scale(p[1]);
    const float32x4_t i0 = vdupq_n_f32(d0 != 0.0f ? 1.0f / d0 : 0.0f), i1 = vdupq_n_f32(d1 != 0.0f ? 1.0f / d1 : 0.0f);
    for (int u = 0; u < 4; u++) {
        const int32x4_t lo = vcvtq_s32_f32(q4_level4(vmulq_f32(vld1q_f32(v + 4 * u), i0)));
        const int32x4_t hi = vcvtq_s32_f32(q4_level4(vmulq_f32(vld1q_f32(v + 16 + 4 * u), i1)));
        const int32x4_t b = vorrq_s32(vaddq_s32(lo, vdupq_n_s32(8)), vshlq_n_s32(vaddq_s32(hi, vdupq_n_s32(8)), 4));
        int32_t n[4];
        vst1q_s32(n, b);
        for (int k = 0; k < 4; k++) p[2 + 4 * u + k] = (uint8_t)n[k];
    }
}

q4_block_fn q4_search_neon(void) { return q4_block_neon; }

static const cpu_table table = {CPU_DRIVER_OPS("neon"), &kernels};

/* The table with the extensions this CPU has, made once. */
#include <pthread.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP2_BF16
#define HWCAP2_BF16 (1UL << 14)
#endif
static cpu_kernels kernels_ext;
static cpu_table table_ext;
static int have_ext;
static pthread_once_t ext_once = PTHREAD_ONCE_INIT;

static void make_ext(void) {
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    kernels_ext = kernels;
    if (hw & HWCAP_ASIMDDP) kernels_ext.gemv_q = gemv_q_dot, have_ext = 1;
    if (hw2 & HWCAP2_BF16) kernels_ext.gemv_pairs = gemv_pairs_bf, kernels_ext.to_pairs = to_pairs_neon, have_ext = 1;
    table_ext = (cpu_table){CPU_DRIVER_OPS("neon"), &kernels_ext};
}

const ops *ops_neon_table(void) {
    pthread_once(&ext_once, make_ext);
    return have_ext ? &table_ext.ops : &table.ops;
}

const ops *ops_neon_base_table(void) { return &table.ops; }
