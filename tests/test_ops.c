/*
 * test_ops.c — every op of every CPU table this machine can run (generic,
 * avx2, avx512 with and without its bf16 dot products, neon) against the
 * scalar reference (ops_ref.c), with 1, 2 and 3 threads (3 gives uneven
 * splits on any machine).
 *
 * Inputs are seeded random, never zero, with sizes that are not multiples of
 * any vector width or tile, row strides wider than the rows, and NaN
 * poison in every byte an op must not touch: row padding, guards before and
 * after each buffer, and keys no query may see. A kernel that reads poison
 * produces NaN somewhere; one that writes it is caught by the guard check.
 *
 * Tolerances, relative to the sum of the magnitudes of the terms (what
 * reordering a float sum can change):
 *   linear (F32 and BF16 precision, any weight dtype): 1e-6 sqrt(K) + 1e-6;
 *     in BF16 precision both sides multiply bf16-rounded x, products of two
 *     bf16 values are exact in float, so only the summation order differs.
 *   attention: 2e-5 of max |v| + 1e-5 relative.
 *   linear over block formats (Q8, Q4): see test_linear_q.
 *   layernorm, rope: 2e-6 (1 + |ref|).  gelu: 1e-6 relative + 1e-6.  add: exact.
 *
 * Needs only the CPU backend: src/cpu/{ops_ref,ops_cpu,threadpool}.c, the
 * ISA files and src/error.c (scripts/test-arm64.sh builds it that way).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"
#include "test.h"

/* ---- inputs and poison ---------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi), never exactly zero. */
static float rnd(float lo, float hi) {
    float u = (float)(rng_next() >> 40) / 16777216.0f;
    float v = lo + (hi - lo) * u;
    return v == 0.0f ? 0.5f : v;
}

#define GUARD 64                           /* poisoned elements before and after buffers */
static const uint32_t POISON = 0x7fc0dead; /* a NaN with a recognisable payload */

static float poison_f(void) {
    float f;
    memcpy(&f, &POISON, 4);
    return f;
}

static int is_poison(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u == POISON;
}

/* n floats with GUARD poisoned floats either side, all poisoned. */
static float *fbuf(size_t n) {
    float *p = malloc((n + 2 * GUARD) * sizeof *p);
    if (!p) abort();
    for (size_t i = 0; i < n + 2 * GUARD; i++) p[i] = poison_f();
    return p + GUARD;
}

static void ffree(float *p) {
    if (p) free(p - GUARD);
}

/* Count poison bytes that were overwritten: the guards around a [rows, ld]
 * matrix and the columns cols..ld-1 of each row. */
static int guard_damage(const float *p, int rows, int cols, int ld) {
    int bad = 0;
    for (int i = 1; i <= GUARD; i++) bad += !is_poison(p[-i]);
    size_t n = (size_t)rows * ld;
    for (int i = 0; i < GUARD; i++) bad += !is_poison(p[n + i]);
    for (int r = 0; r < rows; r++)
        for (int c = cols; c < ld; c++) bad += !is_poison(p[(size_t)r * ld + c]);
    return bad;
}

/* A vector of dtype dt holding rounded copies of f[0..n), followed by
 * GUARD NaN elements (reading past the end poisons the result). */
static void *typed(const float *f, size_t n, dtype dt) {
    size_t es = dt == DT_F32 ? 4 : 2;
    unsigned char *p = malloc((n + GUARD) * es);
    if (!p) abort();
    for (size_t i = 0; i < n + GUARD; i++) {
        if (dt == DT_F32) {
            float v = i < n ? f[i] : poison_f();
            memcpy(p + 4 * i, &v, 4);
        } else {
            uint16_t h = dt == DT_BF16 ? (i < n ? f32_to_bf16(f[i]) : 0x7fc1) : (i < n ? f32_to_f16(f[i]) : 0x7e01);
            memcpy(p + 2 * i, &h, 2);
        }
    }
    return p;
}

static float typed_get(const void *p, dtype dt, size_t i) { return cpu_ld(p, dt, i); }

static const char *dt_str(int dt) { return dt < 0 ? "none" : dt == DT_BF16 ? "bf16" : dt == DT_F16 ? "f16" : "f32"; }

/* ---- contexts ------------------------------------------------------------------ */

#define MAX_CTX 24
static ops_ctx *ref_ctx;
static ops_ctx *ctxs[MAX_CTX];
static const char *ctx_label[MAX_CTX];
static int n_ctx;

static void add_tables(const ops *tab, const char *label) {
    static const int threads[] = {1, 2, 3};
    if (!tab) return;
    for (int i = 0; i < 3 && n_ctx < MAX_CTX; i++) {
        errbuf e;
        ops_ctx *c;
        if (ops_ctx_new("generic", threads[i], OPS_F32, &c, &e) != ALBEDO_OK) {
            CHECK(0, "ops_ctx_new: %s", e.msg);
            continue;
        }
        c->tab = tab; /* the table under test; the context is backend-neutral */
        ctxs[n_ctx] = c;
        ctx_label[n_ctx++] = label;
    }
}

/* ---- linear -------------------------------------------------------------------- */

static void test_linear(int T, int K, int N, dtype dt, int bdt, int xpad, int ypad) {
    const int ldx = K + xpad, ldy = N + ypad;
    float *wf = malloc((size_t)N * K * sizeof *wf), *bf = malloc((size_t)N * sizeof *bf);
    for (size_t i = 0; i < (size_t)N * K; i++) wf[i] = rnd(-1, 1);
    for (int i = 0; i < N; i++) bf[i] = rnd(-1, 1);
    void *w = typed(wf, (size_t)N * K, dt);
    void *b = bdt >= 0 ? typed(bf, (size_t)N, (dtype)bdt) : NULL;
    float *x = fbuf((size_t)T * ldx);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) x[(size_t)t * ldx + k] = rnd(-2, 2);
    op_linear L = {w, b, dt, bdt >= 0 ? (dtype)bdt : DT_F32, N, K};
    float *ref = fbuf((size_t)T * ldy), *y = fbuf((size_t)T * ldy);
    double *mag = malloc((size_t)T * N * sizeof *mag);
    const double tol = 1e-6 * sqrt((double)K) + 1e-6;

    for (int prec = OPS_F32; prec <= OPS_BF16; prec++) {
        ref_ctx->prec = (ops_precision)prec;
        ops_ref_table()->linear(ref_ctx, ref, ldy, x, ldx, T, &L);
        for (int t = 0; t < T; t++)
            for (int n = 0; n < N; n++) {
                double s = b ? fabs(typed_get(b, (dtype)bdt, (size_t)n)) : 0.0;
                for (int k = 0; k < K; k++) {
                    float xv = x[(size_t)t * ldx + k];
                    if (prec == OPS_BF16) xv = bf16_to_f32(f32_to_bf16(xv));
                    s += fabs((double)xv * typed_get(w, dt, (size_t)n * K + k));
                }
                mag[(size_t)t * N + n] = s;
            }
        for (int ci = 0; ci < n_ctx; ci++) {
            ops_ctx *c = ctxs[ci];
            c->prec = (ops_precision)prec;
            for (size_t i = 0; i < (size_t)T * ldy + GUARD; i++) y[i] = poison_f();
            ops_of(c)->linear(c, y, ldy, x, ldx, T, &L);
            double worst = 0;
            int wt = 0, wn = 0;
            for (int t = 0; t < T; t++)
                for (int n = 0; n < N; n++) {
                    size_t i = (size_t)t * ldy + n;
                    double e = fabs((double)y[i] - ref[i]) / (tol * mag[(size_t)t * N + n] + 1e-30);
                    if (!(e <= worst)) { /* NaN counts as worst */
                        worst = isnan(e) ? INFINITY : e;
                        wt = t, wn = n;
                    }
                }
            CHECK(worst <= 1.0 && !ops_failed(c),
                  "linear %s x%d %s T=%d K=%d N=%d w=%s b=%s ldx=%d ldy=%d: worst [%d,%d] got %.9g "
                  "want %.9g (err %.3g of tolerance)",
                  ctx_label[ci], ops_n_threads(c), prec ? "BF16" : "F32", T, K, N, dt_str(dt), dt_str(bdt), ldx, ldy,
                  wt, wn, y[(size_t)wt * ldy + wn], ref[(size_t)wt * ldy + wn], worst);
            int dmg = guard_damage(y, T, N, ldy);
            CHECK(dmg == 0, "linear %s x%d T=%d K=%d N=%d ldy=%d: %d poisoned floats written", ctx_label[ci],
                  ops_n_threads(c), T, K, N, ldy, dmg);
        }
    }
    ref_ctx->prec = OPS_F32;
    free(wf), free(bf), free(w), free(b), free(mag);
    ffree(x), ffree(ref), ffree(y);
}

static void test_linears(void) {
    static const int Ts[] = {1, 2, 3, 4, 5, 7, 13, 23, 24, 48, 64, 100};
    static const int Ks[] = {1, 15, 17, 144, 292, 588, 1000};
    static const int Ns[] = {1, 3, 31, 200, 432};
    static const dtype dts[] = {DT_BF16, DT_F16, DT_F32};
    int i = 0;
    for (int ik = 0; ik < 7; ik++)
        for (int in = 0; in < 5; in++)
            for (int id = 0; id < 3; id++, i++) {
                int T = Ts[(i * 5 + id) % 12];
                /* keep the reference's run time down on the largest shapes */
                if ((double)T * Ks[ik] * Ns[in] > 2e7) T = Ts[i % 5];
                test_linear(T, Ks[ik], Ns[in], dts[id], i % 4 == 3 ? -1 : (int)dts[(i / 3) % 3], i % 2 ? 0 : 1 + i % 7,
                            i % 3 ? 3 + i % 5 : 0);
            }
    /* rows split across tasks (few panels, many rows) */
    test_linear(300, 17, 40, DT_BF16, DT_F32, 1, 2);
    test_linear(260, 40, 3, DT_F16, -1, 0, 1);
    /* more rows than one conversion pass of BF16 precision */
    test_linear(1030, 9, 5, DT_BF16, DT_BF16, 2, 0);
    /* several K blocks (and an odd K for the bf16 pairs) on the packed path */
    test_linear(64, 1001, 70, DT_BF16, DT_BF16, 3, 1);
    test_linear(100, 600, 45, DT_F16, -1, 0, 2);
    test_linear(50, 777, 33, DT_F32, DT_F16, 1, 0);
    /* a Moondream-like layer, small T */
    test_linear(37, 1152, 100, DT_BF16, DT_BF16, 0, 0);
    test_linear(2, 2048, 64, DT_BF16, DT_BF16, 0, 0);
}

/* ---- linear over block formats (ops.h qformat) -------------------------------------
 * W quantised with q_quantize_row; the reference multiplies float x by the
 * dequantised rows (ref_weight_row), so the weights themselves agree
 * exactly and only the arithmetic differs:
 *   float paths (gemm with dequantising packs, the portable gemv):
 *     the float tolerance above, 1e-6 sqrt(K) + 1e-6 of sum |x w| + |b|;
 *   integer paths (cpu_kernels.gemv_q, T < small_t): x rounded to int8 per
 *     block moves each x[k] by at most max|x_block(k)| / 254, and BF16
 *     precision's rounding of x on the reference side by at most |x| / 512,
 *     so the error is within sum_k |w_k| max|x_block(k)| / 160 (plus the
 *     float tolerance);
 *   integer matrix product (cpu_kernels.qgemm, T >= small_t): x rounded
 *     to int8 per block as above, or per row (cpu_qgemm.xs_block 0), where
 *     max|x_block(k)| becomes the row's max|x|; its bytes are checked
 *     against cpu_quantize_u8, the portable quantiser (test_quantize_u8);
 *     Q4 W is packed with its two sub-block scales folded into one per
 *     block (cpu_q4_fold, cpu.h; bytes checked by test_qpack), which moves
 *     each weight of the smaller-scale sub-block by at most |s| / 32 (s the
 *     larger scale; |s| / 16 at the one clipped level), a rounding of the
 *     same order as x's, left inside the same bound (not widened), with
 *     the w_spread cases below as its hardest test;
 *   BF16 precision on the packed float path (T >= small_t): the dequantised
 *     weights are rounded to bf16 as well (ops.h), each by at most 2^-9 of
 *     itself, so the error is within sum_k |x_k w_k| / 256 (plus the above).
 * Guard blocks with a NaN scale (Q8; Q4's scale codes have no NaN, its
 * guard has large scales) follow the matrix: a kernel reading past the
 * last row produces NaN or a wrong sum.
 *
 * With w_spread set, each row and each half block (16 weights) gets its own
 * power-of-two magnitude, 2^-18 .. 2^4: Q4's two sub-block scales of a block
 * then differ by up to 2^22, so a kernel that applies one half's scale to
 * the other is far outside the tolerance, and the scale codes run from
 * subnormal halves to the largest code (weights beyond 15 clip to it, on
 * both sides alike: the reference reads the same blocks). */
static int w_spread;

static void test_linear_q(int T, int K, int N, dtype dt, int bdt, int xpad, int ypad) {
    const int ldx = K + xpad, ldy = N + ypad;
    const size_t rb = q_row_bytes(dt, K), bb = dt == DT_Q8 ? Q8_BLOCK_BYTES : Q4_BLOCK_BYTES;
    const size_t guard_bytes = 8 * bb;
    float *wf = malloc((size_t)N * K * sizeof *wf), *bf = malloc((size_t)N * sizeof *bf);
    float *wd = malloc((size_t)N * K * sizeof *wd);
    unsigned char *w = malloc((size_t)N * rb + guard_bytes);
    if (!wf || !bf || !wd || !w) abort();
    for (size_t i = 0; i < (size_t)N * K; i++) {
        const size_t n = i / (size_t)K, h = (i % (size_t)K) / 16;
        wf[i] = rnd(-1, 1) * (w_spread ? ldexpf(1.0f, (int)((n * 7 + h * 5) % 23) - 18) : 1.0f);
    }
    for (int i = 0; i < N; i++) bf[i] = rnd(-1, 1);
    for (int n = 0; n < N; n++) {
        q_quantize_row(dt, wf + (size_t)n * K, K, w + (size_t)n * rb);
        q_dequantize_row(dt, w + (size_t)n * rb, K, wd + (size_t)n * K);
    }
    for (size_t g = 0; g < guard_bytes; g += bb) {
        memset(w + (size_t)N * rb + g, 0x7f, bb);
        w[(size_t)N * rb + g] = 0x01, w[(size_t)N * rb + g + 1] = 0x7e; /* f16 NaN scale */
    }
    void *b = bdt >= 0 ? typed(bf, (size_t)N, (dtype)bdt) : NULL;
    float *x = fbuf((size_t)T * ldx);
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) x[(size_t)t * ldx + k] = rnd(-2, 2);
    op_linear L = {w, b, dt, bdt >= 0 ? (dtype)bdt : DT_F32, N, K};
    float *ref = fbuf((size_t)T * ldy), *y = fbuf((size_t)T * ldy);
    double *mag = malloc((size_t)T * N * sizeof *mag), *magq = malloc((size_t)T * N * sizeof *magq);
    double *magr = malloc((size_t)T * N * sizeof *magr);
    const double tol = 1e-6 * sqrt((double)K) + 1e-6;

    for (int prec = OPS_F32; prec <= OPS_BF16; prec++) {
        ref_ctx->prec = (ops_precision)prec;
        ops_ref_table()->linear(ref_ctx, ref, ldy, x, ldx, T, &L);
        for (int t = 0; t < T; t++)
            for (int n = 0; n < N; n++) {
                double s = b ? fabs(typed_get(b, (dtype)bdt, (size_t)n)) : 0.0, sq = 0.0, sr = 0.0, rmax = 0.0;
                for (int k = 0; k < K; k++) rmax = fmax(rmax, fabs(x[(size_t)t * ldx + k]));
                for (int k0 = 0; k0 < K; k0 += 32) {
                    double amax = 0.0;
                    for (int k = k0; k < K && k < k0 + 32; k++) amax = fmax(amax, fabs(x[(size_t)t * ldx + k]));
                    for (int k = k0; k < K && k < k0 + 32; k++) {
                        float xv = x[(size_t)t * ldx + k];
                        if (prec == OPS_BF16) xv = bf16_to_f32(f32_to_bf16(xv));
                        s += fabs((double)xv * wd[(size_t)n * K + k]);
                        sq += fabs(wd[(size_t)n * K + k]) * amax;
                        sr += fabs(wd[(size_t)n * K + k]) * rmax;
                    }
                }
                mag[(size_t)t * N + n] = s;
                magq[(size_t)t * N + n] = sq;
                magr[(size_t)t * N + n] = sr;
            }
        for (int ci = 0; ci < n_ctx; ci++) {
            ops_ctx *c = ctxs[ci];
            const cpu_kernels *kk = ((const cpu_table *)(const void *)c->tab)->k;
            const int qg = kk->qgemm != NULL && T >= kk->small_t;
            const int int8 = (kk->gemv_q != NULL && T < kk->small_t) || qg;
            const int perrow = qg && !kk->qgemm->xs_block;
            const int wround = prec == OPS_BF16 && T >= kk->small_t && kk->bf16 != NULL && !qg;
            c->prec = (ops_precision)prec;
            for (size_t i = 0; i < (size_t)T * ldy + GUARD; i++) y[i] = poison_f();
            ops_of(c)->linear(c, y, ldy, x, ldx, T, &L);
            double worst = 0;
            int wt = 0, wn = 0;
            for (int t = 0; t < T; t++)
                for (int n = 0; n < N; n++) {
                    size_t i = (size_t)t * ldy + n, m = (size_t)t * N + n;
                    double lim = tol * mag[m] + (int8 ? (perrow ? magr[m] : magq[m]) / 160.0 : 0.0) +
                                 (wround ? mag[m] / 256.0 : 0.0);
                    double e = fabs((double)y[i] - ref[i]) / (lim + 1e-30);
                    if (!(e <= worst)) {
                        worst = isnan(e) ? INFINITY : e;
                        wt = t, wn = n;
                    }
                }
            CHECK(worst <= 1.0 && !ops_failed(c),
                  "linear %s x%d %s T=%d K=%d N=%d w=%s b=%s ldx=%d ldy=%d: worst [%d,%d] got %.9g "
                  "want %.9g (err %.3g of tolerance)",
                  ctx_label[ci], ops_n_threads(c), prec ? "BF16" : "F32", T, K, N, dt == DT_Q8 ? "q8" : "q4",
                  dt_str(bdt), ldx, ldy, wt, wn, y[(size_t)wt * ldy + wn], ref[(size_t)wt * ldy + wn], worst);
            int dmg = guard_damage(y, T, N, ldy);
            CHECK(dmg == 0, "linear %s x%d T=%d K=%d N=%d ldy=%d: %d poisoned floats written", ctx_label[ci],
                  ops_n_threads(c), T, K, N, ldy, dmg);
        }
    }
    ref_ctx->prec = OPS_F32;
    free(wf), free(bf), free(wd), free(w), free(b), free(mag), free(magq), free(magr);
    ffree(x), ffree(ref), ffree(y);
}

/* The format itself: round trip within half a step, exact zeros, padding. */
static void test_qformat(void) {
    static const int Ks[] = {1, 31, 32, 33, 100};
    for (int di = 0; di < 2; di++) {
        const dtype dt = di ? DT_Q4 : DT_Q8;
        for (int ik = 0; ik < 5; ik++) {
            const int K = Ks[ik];
            float v[100], out[100];
            unsigned char buf[4 * Q8_BLOCK_BYTES];
            for (int k = 0; k < K; k++) v[k] = rnd(-3, 3);
            if (K > 2) v[1] = 0.0f;
            CHECK(q_row_bytes(dt, K) == (size_t)((K + 31) / 32) * (dt == DT_Q8 ? 34u : 18u), "q_row_bytes(%d)", K);
            q_quantize_row(dt, v, K, buf);
            q_dequantize_row(dt, buf, K, out);
            double worst = 0.0;
            for (int k0 = 0; k0 < K; k0 += 32) {
                float amax = 0.0f;
                for (int k = k0; k < K && k < k0 + 32; k++) amax = fmaxf(amax, fabsf(v[k]));
                /* Q8: half a step; Q4: half a step, except on the side
                 * opposite the largest weight, which tops out at 7 steps
                 * of amax/8 (one step short); plus the f16 rounding of
                 * the scale. */
                const double lim = dt == DT_Q8 ? 0.5 * amax / 127.0 : amax / 8.0;
                for (int k = k0; k < K && k < k0 + 32; k++)
                    worst = fmax(worst, fabs(out[k] - v[k]) / (lim * 1.01 + 1e-3 * fabs(v[k])));
            }
            CHECK(worst <= 1.0, "%s round trip K=%d: error %.3g of the bound", dt == DT_Q8 ? "q8" : "q4", K, worst);
            if (K > 2) CHECK(out[1] == 0.0f, "%s: zero not exact (%g)", dt == DT_Q8 ? "q8" : "q4", out[1]);
        }
    }
    /* Q4's halves have their own scales: a half 1000 times smaller than
     * the other keeps its own relative precision, from 2^-20 (subnormal
     * codes) to 8 (near the largest code). Bound: amax_half / 8, plus what
     * a subnormal code's step (2^-17) costs. */
    for (int e = -20; e <= 3; e++) {
        float v[64], out[64];
        unsigned char buf[2 * Q4_BLOCK_BYTES];
        for (int k = 0; k < 64; k++) v[k] = ldexpf(rnd(-1, 1), e) * ((k / 16) % 2 ? 1e-3f : 1.0f);
        q_quantize_row(DT_Q4, v, 64, buf);
        q_dequantize_row(DT_Q4, buf, 64, out);
        double worst = 0.0;
        for (int h = 0; h < 4; h++) {
            float amax = 0.0f;
            for (int k = 16 * h; k < 16 * h + 16; k++) amax = fmaxf(amax, fabsf(v[k]));
            for (int k = 16 * h; k < 16 * h + 16; k++)
                worst = fmax(worst, fabs(out[k] - v[k]) / (amax / 8.0 * 1.01 + 8 * ldexp(1.0, -17)));
        }
        CHECK(worst <= 1.0, "q4 halves of magnitudes 2^%d and 2^%d / 1000: error %.3g of the bound", e, e, worst);
    }
    /* weights beyond the largest code's reach (|w| > 15) clip to it, finite,
     * and leave the other half alone */
    {
        float v[32], out[32];
        unsigned char buf[Q4_BLOCK_BYTES];
        for (int k = 0; k < 32; k++) v[k] = k < 16 ? (k % 2 ? -1e30f : 3e9f) : rnd(-1, 1);
        q_quantize_row(DT_Q4, v, 32, buf);
        q_dequantize_row(DT_Q4, buf, 32, out);
        int ok = 1;
        for (int k = 0; k < 32; k++)
            ok &= isfinite(out[k]) && fabsf(out[k]) <= 15.0f && (k < 16 || fabsf(out[k] - v[k]) <= 1.0f / 8 + 1e-6f);
        CHECK(ok, "q4: weights of 3e9 and -1e30 clip to the largest code without harm");
    }
    CHECK(q4_code_scale(0x00) == 0.0f && q4_code_scale(0x80) == 0.0f && q4_code_scale(0x7F) == 1.875f &&
              q4_code_scale(0xFF) == -1.875f && q4_code_scale(0x78) == 1.0f &&
              q4_code_scale(0x08) == ldexpf(1.0f, -14) && q4_code_scale(0x01) == ldexpf(1.0f, -17),
          "q4 scale codes: the half of (c & 0x7f) << 7 with c's sign");
}

/* Every table's x quantiser of the integer matrix product against the
 * portable one (cpu_quantize_u8, cpu.h), byte for byte and scale for
 * scale: the linear tests above bound the product's error by the rounding
 * of x that this defines. Rows of odd lengths, one all zero, one with a
 * single nonzero, and values exactly halfway between two steps. */
/* Every Q4 scale search of this CPU picks the reference's codes, bit for
 * bit, through q_quantize_row_with: weights of many magnitudes and shapes
 * (normal-like, uniform, one outlier, equal values, which tie candidates,
 * subnormal and huge, zeros, infinities and NaN), rows that end mid-block. */
static void test_q4_search(void) {
    static const char *names[] = {"avx2", "avx512", "neon"};
    int n_tested = 0;
    for (int ni = 0; ni < 3; ni++) {
        q4_block_fn f = cpu_q4_search(names[ni]);
        if (!f) continue;
        n_tested++;
        int bad = 0, first = -1;
        enum { K = 100, ROWS = 4000 };
        static float v[K];
        static unsigned char want[4 * Q4_BLOCK_BYTES], got[4 * Q4_BLOCK_BYTES];
        for (int r = 0; r < ROWS && !bad; r++) {
            const int kind = r % 10;
            const float scale = ldexpf(1.0f, (int)(rng_next() % 60) - 40); /* 2^-40 .. 2^19 */
            for (int k = 0; k < K; k++) {
                float x = rnd(-1, 1);
                switch (kind) {
                case 0: x = (rnd(-1, 1) + rnd(-1, 1) + rnd(-1, 1)) * scale; break;
                case 1: x *= scale; break;
                case 2: x = k % 16 == 3 ? 50.0f * x : x; break;
                case 3: x = k % 7 ? 0.25f : -0.25f; break;
                case 4: x = ldexpf(x, -130); break; /* subnormal floats */
                case 5: x = k % 5 ? 0.0f : x; break;
                case 6: x = k % 11 ? x * 1e30f : x; break;
                case 7: x = k == r % K ? (r % 3 ? INFINITY : -INFINITY) : x; break;
                case 8: x = k == r % K ? NAN : x; break;
                default: x = rnd(-1, 1) * (float)(k % 16 + 1); break;
                }
                v[k] = x;
            }
            const int len = r % 4 == 0 ? K : 1 + (int)(rng_next() % K);
            q_quantize_row(DT_Q4, v, len, want);
            q_quantize_row_with(f, DT_Q4, v, len, got);
            if (memcmp(want, got, q_row_bytes(DT_Q4, len))) bad = 1, first = r;
        }
        CHECK(!bad, "q4 scale search %s: row %d (kind %d) differs from the reference's bytes", names[ni], first,
              first % 10);
    }
    printf("q4 scale search: %d SIMD form(s) match the reference\n", n_tested);
    /* NaN weights quantise to zero (in both formats), the rest of the block
     * as usual, finite */
    for (int di = 0; di < 2; di++) {
        const dtype dt = di ? DT_Q4 : DT_Q8;
        float v[32], out[32];
        unsigned char buf[Q8_BLOCK_BYTES];
        for (int k = 0; k < 32; k++) v[k] = k == 5 || k == 20 ? NAN : rnd(-1, 1);
        q_quantize_row(dt, v, 32, buf);
        q_dequantize_row(dt, buf, 32, out);
        int ok = out[5] == 0.0f && out[20] == 0.0f;
        for (int k = 0; k < 32; k++) ok &= isfinite(out[k]);
        CHECK(ok, "%s: NaN weights quantise to 0 (got %g, %g), the others finite", di ? "q4" : "q8", out[5], out[20]);
    }
    CHECK(cpu_q4_search(NULL) && cpu_q4_search("ref") && !cpu_q4_search("nonesuch"), "cpu_q4_search's choices");
}

static void test_quantize_u8(void) {
    static const int Ks[] = {1, 15, 17, 31, 32, 33, 64, 100, 1000};
    uint8_t qa[1024], qb[1024];
    float da[32], db[32], x[1000];
    for (int ci = 0; ci < n_ctx; ci++) {
        const cpu_kernels *kk = ((const cpu_table *)(const void *)ctxs[ci]->tab)->k;
        if (!kk->qgemm || ops_n_threads(ctxs[ci]) != 1) continue;
        for (int ik = 0; ik < 9; ik++)
            for (int kind = 0; kind < 4; kind++)
                for (int pb = 0; pb < 2; pb++) {
                    const int K = Ks[ik], nb = (K + 31) / 32;
                    for (int k = 0; k < K; k++)
                        x[k] = kind == 0   ? rnd(-3, 3)
                               : kind == 1 ? 0.0f
                               : kind == 2 ? (k == K / 2 ? -0.7f : 0.0f)
                                           : (float)(k % 9) - 4.0f + 0.5f;
                    if (kind == 3) x[0] = 127.0f; /* steps of 1: x + 0.5 lands halfway */
                    memset(qa, 0x55, sizeof qa), memset(qb, 0xaa, sizeof qb);
                    cpu_quantize_u8(x, K, pb, qa, da);
                    kk->qgemm->quantize(x, K, pb, qb, db);
                    CHECK(memcmp(qa, qb, (size_t)nb * 32) == 0 && memcmp(da, db, (size_t)nb * sizeof *da) == 0,
                          "quantize_u8 %s K=%d kind %d per_block %d: differs from cpu_quantize_u8", ctx_label[ci], K,
                          kind, pb);
                }
    }
}

/* Every table's W packer of the integer matrix product, byte for byte
 * against the layout of cpu.h (cpu_qgemm): Q8 levels and f16 scales as
 * stored, Q4 levels and scales folded as cpu_q4_fold says (the linear
 * tests above bound the product's error; this pins the fold itself).
 * Random raw blocks: every scale code of either sign, sub-block scales of
 * any ratio (levels rounding to nearest even at the halfway points), equal
 * magnitudes of opposite signs (the one level that clips, 128 -> 127),
 * zero codes; a partial panel and a block range starting past block 0. */
static void test_qpack(void) {
    enum { K = 100, NB = (K + 31) / 32 };
    for (int ci = 0; ci < n_ctx; ci++) {
        const cpu_kernels *kk = ((const cpu_table *)(const void *)ctxs[ci]->tab)->k;
        if (!kk->qgemm || ops_n_threads(ctxs[ci]) != 1) continue;
        const cpu_qgemm *g = kk->qgemm;
        for (int di = 0; di < 2; di++) {
            const dtype dt = di ? DT_Q4 : DT_Q8;
            const size_t rb = q_row_bytes(dt, K), bb = dt == DT_Q8 ? Q8_BLOCK_BYTES : Q4_BLOCK_BYTES;
            const int rows[3] = {1, g->nr - 3, g->nr};
            int clipped = 0;
            for (int ir = 0; ir < 3; ir++) {
                const int nrows = rows[ir];
                unsigned char *w = malloc((size_t)g->nr * rb);
                char *pk = malloc((size_t)NB * CPU_QBLK_BYTES(g->nr));
                if (!w || !pk) abort();
                for (size_t i = 0; i < (size_t)g->nr * rb; i++) w[i] = (unsigned char)rng_next();
                for (int r = 0; r < g->nr; r++)
                    for (int b = 0; b < NB; b++) {
                        unsigned char *blk = w + (size_t)r * rb + (size_t)b * bb;
                        if (dt == DT_Q8) {
                            const uint16_t dh = f32_to_f16(rnd(-2, 2));
                            memcpy(blk, &dh, 2);
                            for (int k = 0; k < 32; k++)
                                if (blk[2 + k] == 0x80) blk[2 + k] = 0x81; /* -127..127 */
                        } else if ((r + b) % 4 == 1) {
                            blk[1] = blk[0] ^ 0x80; /* |d0| = |d1|, opposite signs */
                        } else if ((r + b) % 4 == 2) {
                            blk[(r / 4) % 2] = (r / 8) % 2 ? 0x80 : 0x00; /* one sub-block's scale 0 */
                        }
                    }
                const int b0 = 1, nb = NB - 1;
                memset(pk, 0x5a, (size_t)NB * CPU_QBLK_BYTES(g->nr));
                g->pack(pk, w, dt, rb, nrows, b0, nb);
                int bad = 0;
                for (int b = 0; b < nb; b++) {
                    const char *pb = pk + (size_t)b * CPU_QBLK_BYTES(g->nr);
                    for (int r = 0; r < g->nr; r++) {
                        const unsigned char *blk = w + (size_t)r * rb + (size_t)(b0 + b) * bb;
                        float dw = 0.0f, got_d;
                        int8_t want[32];
                        int32_t corr = 0, got_c;
                        if (dt == DT_Q8) {
                            uint16_t dh;
                            memcpy(&dh, blk, 2);
                            dw = f16_to_f32(dh);
                            memcpy(want, blk + 2, 32);
                        } else {
                            const float d0 = q4_code_scale(blk[0]), d1 = q4_code_scale(blk[1]);
                            const float sc = cpu_q4_fold_big(d0, d1);
                            const int32_t f0 = cpu_q4_fold_factor(d0, sc), f1 = cpu_q4_fold_factor(d1, sc);
                            dw = sc / 16.0f;
                            for (int k = 0; k < 32; k++) {
                                const int nib = k < 16 ? blk[2 + k] & 15 : blk[2 + k - 16] >> 4;
                                want[k] = cpu_q4_fold(nib - 8, k < 16 ? f0 : f1);
                                clipped += r < nrows && nib == 0 && want[k] == 127;
                            }
                        }
                        if (r >= nrows) dw = 0.0f;
                        for (int k = 0; k < 32; k++) {
                            corr += want[k];
                            if (r < nrows && (int8_t)pb[(size_t)(k / 4) * g->nr * 4 + (size_t)r * 4 + k % 4] != want[k])
                                bad++;
                        }
                        memcpy(&got_d, pb + (size_t)g->nr * 32 + (size_t)r * 4, 4);
                        memcpy(&got_c, pb + (size_t)g->nr * 36 + (size_t)r * 4, 4);
                        bad += memcmp(&got_d, &dw, 4) != 0 && !(got_d == 0.0f && dw == 0.0f);
                        bad += r < nrows && got_c != -128 * corr;
                    }
                }
                CHECK(bad == 0, "qgemm pack %s %s nrows=%d: %d bytes, scales or corrections differ from cpu.h",
                      ctx_label[ci], dt == DT_Q8 ? "q8" : "q4", nrows, bad);
                free(w), free(pk);
            }
            if (dt == DT_Q4)
                CHECK(clipped > 0, "qgemm pack %s q4: no level clipped to 127 (case not reached)", ctx_label[ci]);
        }
    }
}

static void test_linears_q(void) {
    static const int Ts[] = {1, 2, 3, 4, 5, 7, 13, 23, 24, 47, 48, 100};
    static const int Ks[] = {1, 17, 32, 33, 100, 288, 1000, 2048};
    static const int Ns[] = {1, 3, 31, 200};
    test_qformat();
    test_q4_search();
    int i = 0;
    for (int ik = 0; ik < 8; ik++)
        for (int in = 0; in < 4; in++)
            for (int id = 0; id < 2; id++, i++) {
                int T = Ts[(i * 5 + id) % 12];
                if ((double)T * Ks[ik] * Ns[in] > 1e7) T = Ts[i % 5];
                test_linear_q(T, Ks[ik], Ns[in], id ? DT_Q4 : DT_Q8, i % 4 == 3 ? -1 : (int)(i % 3 ? DT_BF16 : DT_F32),
                              i % 2 ? 0 : 1 + i % 7, i % 3 ? 3 + i % 5 : 0);
            }
    /* every T through the small-T paths on one shape, both formats */
    for (int T = 1; T <= 50; T += 7) {
        test_linear_q(T, 300, 37, DT_Q8, DT_BF16, 1, 1);
        test_linear_q(T, 300, 37, DT_Q4, -1, 0, 2);
    }
    /* several K blocks on the packed path, and a Moondream-like decode row */
    test_linear_q(64, 1001, 70, DT_Q8, DT_BF16, 3, 1);
    test_linear_q(60, 600, 45, DT_Q4, DT_F32, 0, 2);
    test_linear_q(1, 2048, 256, DT_Q8, DT_BF16, 0, 0);
    test_linear_q(1, 8192, 64, DT_Q4, DT_BF16, 0, 0);
    /* decode rows over whole block pairs (the 512-bit T = 1 kernels), odd
     * pair counts and N, with and without bias; Q4 over block quads (K a
     * multiple of 128: two row streams a thread, and the odd row alone) */
    for (int d = 0; d < 2; d++) {
        test_linear_q(1, 64, 3, d ? DT_Q4 : DT_Q8, DT_F32, 0, 0);
        test_linear_q(1, 192, 31, d ? DT_Q4 : DT_Q8, -1, 1, 2);
        test_linear_q(1, 640, 33, d ? DT_Q4 : DT_Q8, DT_BF16, 0, 1);
    }
    test_linear_q(1, 128, 1, DT_Q4, DT_F32, 0, 0);
    test_linear_q(1, 384, 2, DT_Q4, -1, 1, 2);
    test_linear_q(1, 1024, 7, DT_Q4, DT_BF16, 0, 1);
    /* the integer matrix product: several K blocks of 16 blocks, a partial
     * block, partial panels, tiles of every height */
    test_linear_q(30, 2048 + 40, 70, DT_Q8, DT_BF16, 3, 1);
    test_linear_q(31, 1100, 45, DT_Q4, DT_F32, 0, 2);
    test_linear_q(130, 520, 97, DT_Q8, -1, 1, 0);
    /* weights of very different magnitudes per row and half block (Q4's
     * sub-block scales, every code range) through every path: decode pairs,
     * odd K, small T, the integer matrix product */
    w_spread = 1;
    for (int d = 0; d < 2; d++) {
        const dtype dt = d ? DT_Q4 : DT_Q8;
        test_linear_q(1, 640, 33, dt, DT_F32, 0, 0);
        test_linear_q(1, 100, 29, dt, -1, 1, 1);
        test_linear_q(3, 192, 31, dt, DT_BF16, 0, 2);
        test_linear_q(37, 1100, 45, dt, DT_F32, 2, 0);
    }
    w_spread = 0;
    test_quantize_u8();
    test_qpack();
}

/* ---- attention ---------------------------------------------------------------------- */

/* k and v [rows, ld] as a KV cache of dtype dt: the floats themselves, or
 * a bf16 or e4m3 copy (the caller's floats rounded to it, so that both
 * sides of a comparison see the same values). For e4m3 each value is first
 * scaled by a power of two in 2^-6 .. 2^2 picked by a hash of its bits
 * (equal floats, equal bytes: the paged test's pool and contiguous copy
 * agree), so that the cache holds bytes of nine exponents, subnormals
 * included (test_attention_e4m3_bytes covers every byte; NaN poison stays
 * NaN: byte 0x7f). Free with free(). */
static void *kv_copy(float *x, size_t n, dtype dt) {
    if (dt == DT_E4M3) {
        uint8_t *b = malloc(n + 64);
        for (size_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, &x[i], 4);
            b[i] = f32_to_e4m3(x[i] * ldexpf(1.0f, (int)((u ^ (u >> 13)) % 9) - 6));
            x[i] = e4m3_to_f32(b[i]);
        }
        return b;
    }
    if (dt != DT_BF16) return NULL;
    uint16_t *h = malloc(n * sizeof *h + 64);
    for (size_t i = 0; i < n; i++) {
        h[i] = f32_to_bf16(x[i]);
        x[i] = bf16_to_f32(h[i]);
    }
    return h;
}

static const char *kv_str(dtype dt) { return dt == DT_E4M3 ? "e4m3" : dt == DT_BF16 ? "bf16" : "f32"; }

static void test_attention_dt(int T, int S, int H, int Hkv, int D, int pos0, int n_prefix, int pad, dtype kvdt);
static void test_attention(int T, int S, int H, int Hkv, int D, int pos0, int n_prefix, int pad) {
    test_attention_dt(T, S, H, Hkv, D, pos0, n_prefix, pad, DT_F32);
    test_attention_dt(T, S, H, Hkv, D, pos0, n_prefix, pad, DT_BF16);
    test_attention_dt(T, S, H, Hkv, D, pos0, n_prefix, pad, DT_E4M3);
}

static void test_attention_dt(int T, int S, int H, int Hkv, int D, int pos0, int n_prefix, int pad, dtype kvdt) {
    const int ldq = H * D + pad, ldk = Hkv * D + pad, ldv = Hkv * D + 2 * pad, ldo = H * D + pad;
    float *q = fbuf((size_t)T * ldq), *k = fbuf((size_t)S * ldk), *v = fbuf((size_t)S * ldv);
    float *ref = fbuf((size_t)T * ldo), *o = fbuf((size_t)T * ldo);
    /* Keys no query sees stay poisoned: an op must skip them, not mask them. */
    int plast = pos0 + T - 1, seen = plast < n_prefix ? n_prefix : plast + 1;
    if (seen > S) seen = S;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < H * D; i++) q[(size_t)t * ldq + i] = rnd(-1, 1);
    for (int s = 0; s < seen; s++)
        for (int i = 0; i < Hkv * D; i++) {
            k[(size_t)s * ldk + i] = rnd(-1, 1);
            v[(size_t)s * ldv + i] = rnd(-1, 1);
        }
    /* Unseen keys keep a poison that is NaN in bf16 too. */
    void *kh = kv_copy(k, (size_t)S * ldk, kvdt), *vh = kv_copy(v, (size_t)S * ldv, kvdt);
    op_attn a = {T,   S,   H,   Hkv, D,    pos0, n_prefix, 1.0f / sqrtf((float)D), q, k, v, ref,
                 ldq, ldk, ldv, ldo, NULL, 0,    DT_F32};
    if (kvdt != DT_F32) a.k = kh, a.v = vh, a.kv_dt = kvdt;
    ops_ref_table()->attention(ref_ctx, &a);
    for (int ci = 0; ci < n_ctx; ci++) {
        ops_ctx *c = ctxs[ci];
        for (size_t i = 0; i < (size_t)T * ldo + GUARD; i++) o[i] = poison_f();
        a.out = o;
        ops_of(c)->attention(c, &a);
        double worst = 0;
        int wt = 0, wi = 0;
        for (int t = 0; t < T; t++)
            for (int i = 0; i < H * D; i++) {
                size_t j = (size_t)t * ldo + i;
                double e = fabs((double)o[j] - ref[j]) / (2e-5 + 1e-5 * fabs(ref[j]));
                if (!(e <= worst)) {
                    worst = isnan(e) ? INFINITY : e;
                    wt = t, wi = i;
                }
            }
        CHECK(worst <= 1.0 && !ops_failed(c),
              "attention %s x%d kv %s T=%d S=%d H=%d Hkv=%d D=%d pos0=%d n_prefix=%d: worst [%d,%d] got "
              "%.9g want %.9g",
              ctx_label[ci], ops_n_threads(c), kv_str(kvdt), T, S, H, Hkv, D, pos0, n_prefix, wt, wi,
              o[(size_t)wt * ldo + wi], ref[(size_t)wt * ldo + wi]);
        int dmg = guard_damage(o, T, H * D, ldo);
        CHECK(dmg == 0, "attention %s x%d T=%d S=%d H=%d D=%d: %d poisoned floats written", ctx_label[ci],
              ops_n_threads(c), T, S, H, D, dmg);
    }
    free(kh), free(vh);
    ffree(q), ffree(k), ffree(v), ffree(ref), ffree(o);
}

/* Paged keys and values: the sequence's blocks scattered over a pool in
 * reverse order with a spare block between them; every backend (and the
 * reference itself) must equal the reference on the contiguous layout. */
static void test_attention_paged_dt(int T, int S, int H, int Hkv, int D, int pos0, int n_prefix, int bs, dtype kvdt);
static void test_attention_paged(int T, int S, int H, int Hkv, int D, int pos0, int n_prefix, int bs) {
    test_attention_paged_dt(T, S, H, Hkv, D, pos0, n_prefix, bs, DT_F32);
    test_attention_paged_dt(T, S, H, Hkv, D, pos0, n_prefix, bs, DT_BF16);
    test_attention_paged_dt(T, S, H, Hkv, D, pos0, n_prefix, bs, DT_E4M3);
}

static void test_attention_paged_dt(int T, int S, int H, int Hkv, int D, int pos0, int n_prefix, int bs, dtype kvdt) {
    const int ldq = H * D, ldk = Hkv * D, ldo = H * D, nb = (S + bs - 1) / bs, pool_rows = 2 * nb * bs;
    float *q = fbuf((size_t)T * ldq), *k = fbuf((size_t)S * ldk), *v = fbuf((size_t)S * ldk);
    float *pk = fbuf((size_t)pool_rows * ldk), *pv = fbuf((size_t)pool_rows * ldk);
    float *ref = fbuf((size_t)T * ldo), *o = fbuf((size_t)T * ldo);
    int32_t *blocks = malloc((size_t)nb * sizeof *blocks);
    for (int b = 0; b < nb; b++) blocks[b] = 2 * (nb - 1 - b) + 1;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < H * D; i++) q[(size_t)t * ldq + i] = rnd(-1, 1);
    for (int j = 0; j < S; j++) {
        float *dk = pk + ((size_t)blocks[j / bs] * bs + j % bs) * ldk,
              *dv = pv + ((size_t)blocks[j / bs] * bs + j % bs) * ldk;
        for (int i = 0; i < ldk; i++) {
            k[(size_t)j * ldk + i] = dk[i] = rnd(-1, 1);
            v[(size_t)j * ldk + i] = dv[i] = rnd(-1, 1);
        }
    }
    /* The pool's rows outside the sequence stay poisoned (NaN in bf16 too). */
    void *kh = kv_copy(k, (size_t)S * ldk, kvdt), *vh = kv_copy(v, (size_t)S * ldk, kvdt);
    void *pkh = kv_copy(pk, (size_t)pool_rows * ldk, kvdt), *pvh = kv_copy(pv, (size_t)pool_rows * ldk, kvdt);
    op_attn a = {T,   S,   H,   Hkv, D,    pos0, n_prefix, 1.0f / sqrtf((float)D), q, k, v, ref,
                 ldq, ldk, ldk, ldo, NULL, 0,    DT_F32};
    if (kvdt != DT_F32) a.k = kh, a.v = vh, a.kv_dt = kvdt;
    ops_ref_table()->attention(ref_ctx, &a);
    op_attn p = a;
    p.k = kvdt != DT_F32 ? (const void *)pkh : (const void *)pk;
    p.v = kvdt != DT_F32 ? (const void *)pvh : (const void *)pv;
    p.blocks = blocks;
    p.block_size = bs;
    for (int ci = -1; ci < n_ctx; ci++) {
        ops_ctx *c = ci < 0 ? ref_ctx : ctxs[ci];
        for (size_t i = 0; i < (size_t)T * ldo + GUARD; i++) o[i] = poison_f();
        p.out = o;
        (ci < 0 ? ops_ref_table() : ops_of(c))->attention(c, &p);
        double worst = 0;
        for (size_t i = 0; i < (size_t)T * ldo; i++) {
            double e = fabs((double)o[i] - ref[i]) / (2e-5 + 1e-5 * fabs(ref[i]));
            if (!(e <= worst)) worst = isnan(e) ? INFINITY : e;
        }
        CHECK(worst <= 1.0, "paged attention %s kv %s T=%d S=%d bs=%d: worst %.3g", ci < 0 ? "ref" : ctx_label[ci],
              kv_str(kvdt), T, S, bs, worst);
    }
    free(kh), free(vh), free(pkh), free(pvh);
    free(blocks);
    ffree(q), ffree(k), ffree(v), ffree(pk), ffree(pv), ffree(ref), ffree(o);
}

/* The e4m3 conversions (common.h) against their definition: every byte's
 * value from its fields; narrowing every float of a dense sample equal to
 * the nearest e4m3 value (ties to the even byte, |x| > 448 to ±448, NaN
 * to 0x7f with its sign); every byte's value round trips. */
static void test_e4m3_convert(void) {
    float val[256];
    int bad = 0;
    for (int b = 0; b < 256; b++) {
        const int e = (b >> 3) & 15, m = b & 7;
        double want = e ? ldexp(1.0 + m / 8.0, e - 7) : ldexp(m / 8.0, -6);
        if (b & 0x80) want = -want;
        val[b] = e4m3_to_f32((uint8_t)b);
        if ((b & 0x7f) == 0x7f)
            bad += !isnan(val[b]);
        else
            bad += (double)val[b] != want || !!signbit(val[b]) != !!(b & 0x80);
        if ((b & 0x7f) != 0x7f) bad += f32_to_e4m3(val[b]) != b;
    }
    CHECK(bad == 0 && val[0x7e] == 448.0f && val[0x01] == 0x1p-9f, "e4m3 bytes: %d wrong", bad);
    bad = 0;
    for (uint64_t i = 0; i < (1ull << 32); i += 4099) {
        const uint32_t u = (uint32_t)i;
        float f;
        memcpy(&f, &u, 4);
        int want;
        if (isnan(f)) {
            want = 0x7f;
        } else {
            const double a = fabs((double)f);
            want = 0;
            for (int b = 1; b < 0x7f; b++) { /* positive bytes ascend; a tie keeps the even one */
                const double d = fabs(a - val[b]), dw = fabs(a - val[want]);
                if (d < dw || (d == dw && !(b & 1))) want = b;
            }
        }
        want |= (int)(u >> 24) & 0x80;
        if (f32_to_e4m3(f) != want && bad++ < 5)
            fprintf(stderr, "  e4m3 of %a: got 0x%02x want 0x%02x\n", (double)f, f32_to_e4m3(f), want);
    }
    CHECK(bad == 0, "e4m3 narrowing: %d wrong", bad);
}

/* Every e4m3 byte through every table's widening, exactly: one query row
 * over S identical keys of zero and identical value rows holding all 256
 * bytes (D = 256, so the tail masks see them too at D = 250), so every
 * softmax weight is 1/S and the output is the value row (NaN where the byte
 * is NaN) up to the rounding of S·v·(1/S). Then a NaN byte in a key must
 * make every output NaN. T = 1 (decode kernels) and T = 3 (the packed
 * prompt path), unpaged and paged. */
static void test_attention_e4m3_bytes(int T, int D, int paged) {
    const int S = T + 2, ld = D, rows = 16; /* paged: 8 blocks of 2 rows, used in reverse */
    uint8_t *k = calloc((size_t)rows * ld + 64, 1), *v = malloc((size_t)rows * ld + 64);
    float *q = fbuf((size_t)T * D), *o = fbuf((size_t)T * D);
    for (int j = 0; j < rows; j++)
        for (int d = 0; d < D; d++) v[(size_t)j * ld + d] = (uint8_t)(d * 37 + (256 - D));
    for (int i = 0; i < T * D; i++) q[i] = rnd(-1, 1);
    int32_t blocks[8];
    for (int b = 0; b < 8; b++) blocks[b] = 7 - b;
    op_attn a = {T,      S, 1, 1, D, S - T, S, 0.125f, q, k, v, o, D, ld, ld, D, paged ? blocks : NULL, paged ? 2 : 0,
                 DT_E4M3};
    for (int ci = -1; ci < n_ctx; ci++) {
        ops_ctx *c = ci < 0 ? ref_ctx : ctxs[ci];
        const char *label = ci < 0 ? "ref" : ctx_label[ci];
        for (int nanpass = 0; nanpass < 2; nanpass++) {
            for (int j = 0; j < rows; j++) k[(size_t)j * ld + D / 3] = nanpass ? 0x7f : 0;
            for (size_t i = 0; i < (size_t)T * D + GUARD; i++) o[i] = poison_f();
            (ci < 0 ? ops_ref_table() : ops_of(c))->attention(c, &a);
            int bad = 0, wi = -1;
            for (int t = 0; t < T; t++)
                for (int d = 0; d < D; d++) {
                    const float got = o[(size_t)t * D + d], want = e4m3_to_f32(v[d]);
                    const int ok = nanpass || isnan(want) ? isnan(got) : fabsf(got - want) <= 1e-6f * fabsf(want);
                    if (!ok && bad++ == 0) wi = t * D + d;
                }
            CHECK(bad == 0, "e4m3 bytes %s T=%d D=%d%s%s: %d wrong, first [%d] byte 0x%02x got %.9g", label, T, D,
                  paged ? " paged" : "", nanpass ? " (NaN key)" : "", bad, wi, wi < 0 ? 0 : v[wi % D],
                  wi < 0 ? 0.0 : (double)o[wi]);
            CHECK(guard_damage(o, T, D, D) == 0, "e4m3 bytes %s: guard written", label);
        }
    }
    free(k), free(v);
    ffree(q), ffree(o);
}

static void test_attentions(void) {
    test_e4m3_convert();
    for (int paged = 0; paged < 2; paged++) {
        test_attention_e4m3_bytes(1, 256, paged);
        test_attention_e4m3_bytes(1, 250, paged);
        test_attention_e4m3_bytes(3, 256, paged);
        test_attention_e4m3_bytes(3, 250, paged);
    }
    test_attention_paged(1, 200, 4, 2, 64, 199, 100, 64); /* decode over a paged cache */
    test_attention_paged(1, 150, 3, 3, 72, 149, 0, 16);
    test_attention_paged(40, 200, 4, 4, 64, 160, 130, 64); /* prompt after a paged prefix */
    test_attention_paged(37, 130, 2, 1, 64, 93, 0, 32);
    test_attention_paged(20, 90, 2, 2, 16, 70, 0, 48); /* block not a multiple of the tile */
    /*             T    S   H Hkv  D  pos0 n_prefix pad */
    test_attention(1, 1, 1, 1, 1, 0, 0, 0);
    test_attention(1, 300, 5, 5, 64, 299, 10, 3); /* decode */
    test_attention(1, 40, 4, 2, 72, 20, 0, 0);    /* decode, keys past pos0 unseen */
    test_attention(2, 50, 3, 1, 17, 48, 30, 1);
    test_attention(3, 7, 3, 1, 5, 4, 0, 0);
    test_attention(5, 5, 2, 2, 8, 0, 8, 0);    /* n_prefix > S */
    test_attention(7, 7, 2, 2, 72, 0, 7, 5);   /* fully bidirectional */
    test_attention(9, 9, 1, 1, 17, 0, 0, 0);   /* plain causal */
    test_attention(13, 20, 4, 2, 64, 5, 9, 2); /* prefix < S, pos0 > 0, unseen keys */
    test_attention(40, 40, 3, 3, 33, 0, 17, 0);
    test_attention(37, 90, 4, 4, 64, 53, 30, 1); /* a later prompt after an image */
    test_attention(70, 75, 6, 2, 16, 5, 0, 0);
    test_attention(100, 100, 2, 1, 72, 0, 100, 0); /* vision-like */
    test_attention(61, 61, 3, 3, 64, 0, 61, 0);
    test_attention(45, 45, 1, 1, 100, 0, 20, 3);
}

/* ---- layernorm, gelu, add, rope ----------------------------------------------------------- */

static void test_layernorm(int T, int C, dtype gdt, dtype bdt, float offset, int inplace) {
    float *gf = malloc((size_t)C * sizeof *gf), *bf = malloc((size_t)C * sizeof *bf);
    for (int i = 0; i < C; i++) gf[i] = rnd(0.5f, 1.5f), bf[i] = rnd(-0.5f, 0.5f);
    void *g = typed(gf, (size_t)C, gdt), *b = typed(bf, (size_t)C, bdt);
    float *x = fbuf((size_t)T * C), *ref = fbuf((size_t)T * C), *y = fbuf((size_t)T * C);
    for (size_t i = 0; i < (size_t)T * C; i++) x[i] = offset + rnd(-3, 3);
    op_vec G = {g, gdt}, B = {b, bdt};
    ops_ref_table()->layernorm(ref_ctx, ref, x, T, C, G, B, 1e-5f);
    for (int ci = 0; ci < n_ctx; ci++) {
        ops_ctx *c = ctxs[ci];
        if (inplace)
            memcpy(y, x, (size_t)T * C * sizeof *y);
        else
            for (size_t i = 0; i < (size_t)T * C; i++) y[i] = poison_f();
        ops_of(c)->layernorm(c, y, inplace ? y : x, T, C, G, B, 1e-5f);
        double worst = 0;
        size_t wi = 0;
        for (size_t i = 0; i < (size_t)T * C; i++) {
            double e = fabs((double)y[i] - ref[i]) / (2e-6 * (1 + fabs(ref[i])));
            if (!(e <= worst)) worst = isnan(e) ? INFINITY : e, wi = i;
        }
        CHECK(worst <= 1.0 && !ops_failed(c),
              "layernorm %s x%d T=%d C=%d g=%s b=%s offset=%g%s: worst %zu got %.9g want %.9g", ctx_label[ci],
              ops_n_threads(c), T, C, dt_str(gdt), dt_str(bdt), offset, inplace ? " in place" : "", wi, y[wi], ref[wi]);
        CHECK(guard_damage(y, 1, T * C, T * C) == 0, "layernorm %s: guard written", ctx_label[ci]);
    }
    free(gf), free(bf), free(g), free(b);
    ffree(x), ffree(ref), ffree(y);
}

/* kind 0: gelu_tanh, 1: gelu_erf, 2: add */
static void test_elementwise(int kind, size_t n) {
    static const char *names[] = {"gelu_tanh", "gelu_erf", "add"};
    static const float special[] = {1e-3f, -1e-3f, 1e-6f,  3.0f,  -3.0f,  5.5f,   -5.5f,   9.0f,
                                    -9.0f, 20.0f,  -20.0f, 50.0f, -50.0f, 100.0f, -100.0f, 1e-30f};
    float *x = fbuf(n), *x2 = fbuf(n), *ref = fbuf(n), *y = fbuf(n);
    for (size_t i = 0; i < n; i++) {
        x[i] = rnd(-8, 8);
        x2[i] = rnd(-8, 8);
        if (i % 97 == 5) x[i] = special[(i / 97) % 16];
    }
    memcpy(ref, x, n * sizeof *ref);
    const ops *r = ops_ref_table();
    if (kind == 0)
        r->gelu_tanh(ref_ctx, ref, n);
    else if (kind == 1)
        r->gelu_erf(ref_ctx, ref, n);
    else
        r->add(ref_ctx, ref, x2, n);
    for (int ci = 0; ci < n_ctx; ci++) {
        ops_ctx *c = ctxs[ci];
        memcpy(y, x, n * sizeof *y);
        if (kind == 0)
            ops_of(c)->gelu_tanh(c, y, n);
        else if (kind == 1)
            ops_of(c)->gelu_erf(c, y, n);
        else
            ops_of(c)->add(c, y, x2, n);
        double worst = 0;
        size_t wi = 0;
        for (size_t i = 0; i < n; i++) {
            double tol = kind == 2 ? 0.0 : 1e-6 * fabs(ref[i]) + 1e-6;
            double e = fabs((double)y[i] - ref[i]);
            e = tol > 0 ? e / tol : (e > 0 ? INFINITY : 0);
            if (!(e <= worst)) worst = isnan(e) ? INFINITY : e, wi = i;
        }
        CHECK(worst <= 1.0, "%s %s x%d n=%zu: worst %zu: x=%.9g got %.9g want %.9g", names[kind], ctx_label[ci],
              ops_n_threads(c), n, wi, x[wi], y[wi], ref[wi]);
        CHECK(guard_damage(y, 1, (int)n, (int)n) == 0, "%s %s: guard written", names[kind], ctx_label[ci]);
    }
    ffree(x), ffree(x2), ffree(ref), ffree(y);
}

static void test_rope(int T, int H, int D, int R, int pos0, int pad) {
    const int ldx = H * D + pad, half = R / 2, P = pos0 + T + 3;
    float *ct = malloc((size_t)P * half * sizeof *ct + 4), *st = malloc((size_t)P * half * sizeof *st + 4);
    for (int p = 0; p < P; p++)
        for (int i = 0; i < half; i++) {
            float ang = p * powf(10000.0f, -2.0f * i / R);
            ct[(size_t)p * half + i] = cosf(ang);
            st[(size_t)p * half + i] = sinf(ang);
        }
    float *x = fbuf((size_t)T * ldx), *ref = fbuf((size_t)T * ldx), *y = fbuf((size_t)T * ldx);
    for (int t = 0; t < T; t++)
        for (int i = 0; i < H * D; i++) x[(size_t)t * ldx + i] = rnd(-2, 2);
    memcpy(ref, x, (size_t)T * ldx * sizeof *ref);
    ops_ref_table()->rope(ref_ctx, ref, ldx, T, H, D, R, pos0, ct, st);
    for (int ci = 0; ci < n_ctx; ci++) {
        ops_ctx *c = ctxs[ci];
        memcpy(y, x, (size_t)T * ldx * sizeof *y);
        ops_of(c)->rope(c, y, ldx, T, H, D, R, pos0, ct, st);
        double worst = 0;
        size_t wi = 0;
        for (int t = 0; t < T; t++)
            for (int i = 0; i < H * D; i++) {
                size_t j = (size_t)t * ldx + i;
                double e = fabs((double)y[j] - ref[j]) / (2e-6 * (1 + fabs(ref[j])));
                if (!(e <= worst)) worst = isnan(e) ? INFINITY : e, wi = j;
            }
        CHECK(worst <= 1.0, "rope %s x%d T=%d H=%d D=%d R=%d pos0=%d: worst %zu got %.9g want %.9g", ctx_label[ci],
              ops_n_threads(c), T, H, D, R, pos0, wi, y[wi], ref[wi]);
        CHECK(guard_damage(y, T, H * D, ldx) == 0, "rope %s: guard written", ctx_label[ci]);
    }
    free(ct), free(st);
    ffree(x), ffree(ref), ffree(y);
}

int main(void) {
    errbuf e;
    if (ops_ctx_new("ref", 1, OPS_F32, &ref_ctx, &e) != ALBEDO_OK) {
        CHECK(0, "ref context: %s", e.msg);
        TEST_MAIN_END();
    }
    add_tables(ops_generic_table(), "generic");
    add_tables(ops_avx2_table(), "avx2");
    add_tables(ops_avx512_table(), "avx512");
    if (ops_avx512_table() && ops_avx512_nobf16_table() != ops_avx512_table())
        add_tables(ops_avx512_nobf16_table(), "avx512-nobf16");
    add_tables(ops_neon_table(), "neon");
    if (ops_neon_base_table() != ops_neon_table()) add_tables(ops_neon_base_table(), "neon-base");
    /* The automatic choice is one of the tables tested here. */
    ops_ctx *autoc = NULL;
    CHECK(ops_ctx_new(NULL, 1, OPS_F32, &autoc, &e) == ALBEDO_OK, "auto context: %s", e.msg);
    ops_ctx_free(autoc);

    test_linears();
    test_linears_q();
    test_attentions();
    static const dtype vdt[] = {DT_BF16, DT_F16, DT_F32};
    test_layernorm(1, 1, DT_F32, DT_F32, 0.0f, 0);
    test_layernorm(3, 17, DT_BF16, DT_F16, 0.0f, 0);
    test_layernorm(5, 144, DT_F16, DT_BF16, 100.0f, 1);
    test_layernorm(100, 1152, vdt[1], vdt[2], 0.0f, 0);
    test_layernorm(40, 2051, vdt[0], vdt[0], -30.0f, 1);
    for (int kind = 0; kind < 3; kind++) {
        static const size_t ns[] = {1, 15, 17, 1000, 100003};
        for (int i = 0; i < 5; i++) test_elementwise(kind, ns[i]);
    }
    test_rope(1, 1, 8, 8, 0, 0);
    test_rope(5, 3, 64, 32, 7, 3);
    test_rope(300, 4, 72, 72, 0, 1);
    test_rope(9, 32, 64, 64, 730, 0);
    test_rope(2, 3, 20, 14, 2, 5);

    for (int i = 0; i < n_ctx; i++) ops_ctx_free(ctxs[i]);
    ops_ctx_free(ref_ctx);
    TEST_MAIN_END();
}
