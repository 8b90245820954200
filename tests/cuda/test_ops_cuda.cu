/*
 * test_ops_cuda.cu — every CUDA kernel (src/cuda/ops_cuda.h) against the
 * scalar CPU reference (src/cpu/ops_ref.c, through ops_ctx_new("ref")).
 *
 * Inputs are seeded random, never zero, at sizes that are not multiples of
 * any tile (64- and 128-row attention tiles, 8-element vectors, 4-warp GEMV blocks),
 * with row strides wider than the rows. Every device buffer has GUARD
 * poisoned elements on both sides, and outputs (and their row padding, and
 * the KV-cache slots no op may touch) are poisoned before each run: after
 * it, every element that should be written must differ from the poison and
 * every element that should not must still hold it. Poison is a NaN, so an
 * op that reads it also shows up as a NaN in its result.
 *
 * The reference gets the same bf16-rounded inputs the GPU gets, in float32.
 * Tolerances are relative L2 errors ‖gpu − ref‖ / ‖ref‖:
 *   float32 outputs: 1e-5 (only the summation order differs: bf16 × bf16
 *     products are exact in fp32; ~2e-6 measured on an H100, cuBLASLt's GELU
 *     epilogue included, so an erf GELU, ~1e-4 off, would fail); 1e-5 for
 *     layernorm and gelu, 1e-6 for add;
 *   bf16 outputs (one rounding, ~2^-9 relative, plus bf16 P in attention):
 *     1e-2, the bound the issue sets for bf16 activations;
 *   argmax and embedding: exact; sampling: kept set exact, frequencies
 *     within 5 standard deviations.
 *
 *   test_ops_cuda [--small] [--attn]   (--small: sanitizer-sized cases only;
 *                                       --attn: the attention kernels alone,
 *                                       plain and paged, and the T = 20 chain)
 * Prints "N passed, N failed"; exit status 1 on failure, 77 without a GPU.
 *
 * FP8 KV caches (cuda_rope / cuda_attention with kv_fp8; buffers of dtype
 * DT_U8 hold e4m3 bytes, poison 0x7f = NaN): the cache writes must equal
 * the host's own e4m3 rounding of the reference (values exactly; keys up to
 * a few ties flipped by fp32 rounding, rel 5e-3), with scales other than 1;
 * attention over e4m3 caches against the float reference fed the decoded
 * keys and values times their scales, at the bf16 tolerance.
 *
 * The Moondream 3 section (moe.cu: tau's features, scores and scaling;
 * routing with ties and NaN; the expert MLP's GEMV and grouped paths at odd
 * widths, with several 128-row tiles for one expert) compares against
 * double-precision references written here. FP8 experts: the per-row e4m3
 * quantiser byte for byte against the host's, and the expert MLP (GEMVs and
 * every grouped tile shape) on e4m3 weights against the reference on the
 * same quantised values.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "cuda/ops_cuda.h"
extern "C" {
#include "ops.h"
}
#include "test.h"

static int g_small = 0;

/* ---- random inputs ---------------------------------------------------------- */

static uint64_t rng_state = 0x5eed0fa1bed0ull;

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
    return v == 0.0f ? 0.25f : v;
}

/* ---- poisoned host images of device buffers --------------------------------- */

#define GUARD 256
static const uint32_t POISON32 = 0x7fc0deadu; /* NaNs with recognisable payloads */
static const uint16_t POISON16 = 0x7fadu;
static const uint8_t POISON8 = 0x7fu; /* e4m3 NaN: never a saturated conversion's result */

/* e4m3 on the host, with the conversions the kernels use (cuda_fp8.h). */
static uint8_t f_to_e4m3(float v) { return (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3); }
static float e4m3_to_f(uint8_t b) { return __half2float(__half(__nv_cvt_fp8_to_halfraw(b, __NV_E4M3))); }

/* A buffer of n elements of dtype dt (F32 or BF16) with GUARD elements either
 * side, as a host image and a device copy. Element i (may be negative or
 * >= n to address the guards) is at image offset (i + GUARD) * es. */
typedef struct buf {
    dtype dt;
    size_t n, es;
    unsigned char *h; /* host image */
    unsigned char *d; /* device base (guard start) */
} buf;

static buf buf_new(dtype dt, size_t n) {
    buf b;
    b.dt = dt;
    b.n = n;
    b.es = dt == DT_F32 ? 4 : dt == DT_U8 ? 1 : 2;
    size_t total = (n + 2 * GUARD) * b.es;
    b.h = (unsigned char *)malloc(total);
    if (!b.h) abort();
    for (size_t i = 0; i < n + 2 * GUARD; i++) {
        if (b.es == 4)
            memcpy(b.h + 4 * i, &POISON32, 4);
        else if (b.es == 1)
            b.h[i] = POISON8;
        else
            memcpy(b.h + 2 * i, &POISON16, 2);
    }
    if (cudaMalloc((void **)&b.d, total) != cudaSuccess) {
        fprintf(stderr, "cudaMalloc of %zu bytes failed\n", total);
        exit(2);
    }
    return b;
}

static void buf_free(buf *b) {
    free(b->h);
    cudaFree(b->d);
}

static void *dp(const buf *b) { return b->d + GUARD * b->es; }

static void bset(buf *b, long i, float v) {
    unsigned char *p = b->h + (size_t)(i + GUARD) * b->es;
    if (b->es == 4) {
        memcpy(p, &v, 4);
    } else if (b->es == 1) {
        *p = f_to_e4m3(v);
    } else {
        uint16_t h = f32_to_bf16(v);
        memcpy(p, &h, 2);
    }
}

static float bget(const buf *b, long i) {
    const unsigned char *p = b->h + (size_t)(i + GUARD) * b->es;
    if (b->es == 4) {
        float f;
        memcpy(&f, p, 4);
        return f;
    }
    if (b->es == 1) return e4m3_to_f(*p);
    uint16_t h;
    memcpy(&h, p, 2);
    return bf16_to_f32(h);
}

static int bpoison(const buf *b, long i) {
    const unsigned char *p = b->h + (size_t)(i + GUARD) * b->es;
    if (b->es == 4) return memcmp(p, &POISON32, 4) == 0;
    if (b->es == 1) return *p == POISON8;
    return memcmp(p, &POISON16, 2) == 0;
}

/* The copy goes through the legacy stream, which the context's non-blocking
 * stream does not wait for, and a pageable cudaMemcpy may return before its
 * DMA lands: synchronise, or an op can run before its inputs arrive (seen:
 * the poison upload landing after a rope's cache write). */
static void up(buf *b) {
    if (cudaMemcpy(b->d, b->h, (b->n + 2 * GUARD) * b->es, cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaDeviceSynchronize() != cudaSuccess) {
        fprintf(stderr, "upload failed\n");
        exit(2);
    }
}

static int down(buf *b) {
    cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) {
        fprintf(stderr, "kernel failure: %s\n", cudaGetErrorString(e));
        return -1;
    }
    e = cudaMemcpy(b->h, b->d, (b->n + 2 * GUARD) * b->es, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        fprintf(stderr, "download failed: %s\n", cudaGetErrorString(e));
        return -1;
    }
    return 0;
}

/* Random values (rounded to the buffer's dtype) into [rows, cols] of a
 * [rows, ld] buffer; the row padding stays poisoned. Returns the values as
 * the device sees them, in float, [rows, ld] (padding NaN). */
static float *fill(buf *b, int rows, int cols, int ld, float lo, float hi) {
    float *f = (float *)malloc((size_t)rows * ld * sizeof *f);
    if (!f) abort();
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < ld; c++) {
            long i = (long)r * ld + c;
            if (c < cols) {
                bset(b, i, rnd(lo, hi));
                f[i] = bget(b, i);
            } else {
                f[i] = NAN;
            }
        }
    return f;
}

/* Comparison of rows × cols of a [rows, ld] output (already downloaded) with
 * ref ([rows, ldr]): relative L2 error, unwritten elements, and poison that
 * was overwritten (guards, row padding). */
typedef struct cmp {
    double rel;
    long unwritten, damaged, nan;
    long worst;
    float worst_got, worst_ref;
} cmp;

static cmp compare(const buf *b, int rows, int cols, int ld, const float *ref, int ldr) {
    cmp c;
    memset(&c, 0, sizeof c);
    c.worst = -1;
    double num = 0, den = 0, wd = -1;
    for (int r = 0; r < rows; r++)
        for (int k = 0; k < ld; k++) {
            long i = (long)r * ld + k;
            if (k >= cols) {
                c.damaged += !bpoison(b, i);
                continue;
            }
            if (bpoison(b, i)) {
                c.unwritten++;
                continue;
            }
            float g = bget(b, i), e = ref[(size_t)r * ldr + k];
            if (g != g) {
                c.nan++;
                continue;
            }
            double d = (double)g - e;
            num += d * d;
            den += (double)e * e;
            if (fabs(d) > wd) {
                wd = fabs(d);
                c.worst = i;
                c.worst_got = g;
                c.worst_ref = e;
            }
        }
    for (long i = 1; i <= GUARD; i++) c.damaged += !bpoison(b, -i);
    for (long i = 0; i < GUARD; i++) c.damaged += !bpoison(b, (long)rows * ld + i);
    c.rel = den > 0 ? sqrt(num / den) : sqrt(num);
    return c;
}

static void report(const char *what, const cmp *c, double tol) {
    int ok = c->rel <= tol && c->unwritten == 0 && c->damaged == 0 && c->nan == 0;
    printf("%-4s %-58s rel %.2e (tol %.0e)", ok ? "ok" : "FAIL", what, c->rel, tol);
    if (c->unwritten || c->damaged || c->nan)
        printf(" unwritten %ld damaged %ld nan %ld", c->unwritten, c->damaged, c->nan);
    if (!ok && c->worst >= 0) printf(" worst at %ld: %g vs %g", c->worst, c->worst_got, c->worst_ref);
    printf("\n");
    CHECK(ok, "%s", what);
}

static cuda_ctx *G;
static ops_ctx *REF;

static void check_st(albedo_status st, const char *what) {
    if (st != ALBEDO_OK) fprintf(stderr, "%s: %s\n", what, cuda_ctx_error(G));
    CHECK(st == ALBEDO_OK, "%s", what);
}

static const char *dts(int dt) { return dt < 0 ? "none" : dt == DT_F32 ? "f32" : "bf16"; }

/* ---- linear ------------------------------------------------------------------- */

static void test_linear(int T, int K, int N, int pad_y, dtype ydt, int bdt, cuda_act act, int acc) {
    const int ldx = K + 8, ldy = N + pad_y;
    buf x = buf_new(DT_BF16, (size_t)T * ldx), w = buf_new(DT_BF16, (size_t)N * K);
    buf b = buf_new(bdt == DT_F32 ? DT_F32 : DT_BF16, (size_t)N);
    buf y = buf_new(ydt, (size_t)T * ldy);
    float *xf = fill(&x, T, K, ldx, -1, 1);
    float *wf = fill(&w, N, K, K, -1, 1);
    float *bf = fill(&b, 1, N, N, -2, 2);
    float *y0 = acc ? fill(&y, T, N, ldy, -3, 3) : NULL;
    up(&x), up(&w), up(&b), up(&y);

    cuda_linear_w L = {(const uint16_t *)dp(&w), bdt >= 0 ? dp(&b) : NULL, (dtype)(bdt >= 0 ? bdt : DT_BF16), N, K};
    char what[160];
    snprintf(what, sizeof what, "linear T=%d K=%d N=%d ldy=%d y=%s b=%s %s%s", T, K, N, ldy, dts(ydt), dts(bdt),
             act ? "gelu" : "", acc ? "acc" : "");
    albedo_status st = cuda_linear(G, dp(&y), ydt, ldy, (const uint16_t *)dp(&x), ldx, T, &L, act, acc);
    check_st(st, what);
    if (down(&y) == 0 && st == ALBEDO_OK) {
        /* Reference: float32 linear over the same bf16 values. */
        uint16_t *wh = (uint16_t *)malloc((size_t)N * K * 2);
        for (size_t i = 0; i < (size_t)N * K; i++) wh[i] = f32_to_bf16(wf[i]);
        op_linear RL = {wh, bdt >= 0 ? (const void *)bf : NULL, DT_BF16, DT_F32, N, K};
        float *ref = (float *)malloc((size_t)T * N * sizeof *ref);
        O(REF)->linear(REF, ref, N, xf, ldx, T, &RL);
        if (act) O(REF)->gelu_tanh(REF, ref, (size_t)T * N);
        if (acc)
            for (int t = 0; t < T; t++)
                for (int n = 0; n < N; n++) ref[(size_t)t * N + n] += y0[(size_t)t * ldy + n];
        cmp c = compare(&y, T, N, ldy, ref, N);
        double tol = ydt == DT_BF16 ? 1e-2 : 1e-5;
        report(what, &c, tol);
        free(ref);
        free(wh);
    }
    free(xf), free(wf), free(bf), free(y0);
    buf_free(&x), buf_free(&w), buf_free(&b), buf_free(&y);
}

static void test_linears(void) {
    struct {
        int T, K, N, pad;
    } shapes[] = {{1, 2048, 997, 3},  {3, 1160, 515, 0},  {8, 264, 1001, 5}, {5, 8, 33, 1},
                  {37, 1160, 997, 3}, {200, 584, 333, 0}, {9, 128, 77, 7},   {130, 2048, 1024, 0}};
    struct {
        dtype y;
        int b;
        cuda_act act;
        int acc;
    } modes[] = {{DT_F32, DT_BF16, CUDA_ACT_NONE, 0},       {DT_F32, DT_F32, CUDA_ACT_NONE, 1},
                 {DT_BF16, DT_BF16, CUDA_ACT_GELU_TANH, 0}, {DT_BF16, -1, CUDA_ACT_NONE, 0},
                 {DT_F32, -1, CUDA_ACT_GELU_TANH, 0},       {DT_BF16, DT_F32, CUDA_ACT_NONE, 1}};
    int n_shapes = (int)(sizeof shapes / sizeof shapes[0]);
    for (int s = 0; s < n_shapes; s++) {
        if (g_small && shapes[s].T * shapes[s].N > 50000) continue;
        for (size_t m = 0; m < sizeof modes / sizeof modes[0]; m++)
            test_linear(shapes[s].T, shapes[s].K, shapes[s].N, shapes[s].pad, modes[m].y, modes[m].b, modes[m].act,
                        modes[m].acc);
    }
    long fused, unfused, gemv;
    cuda_ctx_counters(G, &fused, &unfused, &gemv);
    printf("     linear paths so far: cuBLASLt+epilogue %ld, cuBLASLt+bias kernel %ld, GEMV %ld\n", fused, unfused,
           gemv);
    CHECK(fused > 0 && gemv > 0, "both cuBLASLt and the GEMV ran");

    /* Bad arguments come back as statuses. */
    buf x = buf_new(DT_BF16, 64), w = buf_new(DT_BF16, 64), y = buf_new(DT_F32, 64);
    cuda_linear_w L = {(const uint16_t *)dp(&x), NULL, DT_BF16, 4, 7};
    CHECK(cuda_linear(G, dp(&y), DT_F32, 4, (const uint16_t *)dp(&w), 8, 2, &L, CUDA_ACT_NONE, 0) ==
              ALBEDO_ERR_INVALID_ARGUMENT,
          "K %% 8 != 0 is refused");
    L.n_in = 8;
    CHECK(cuda_linear(G, dp(&y), DT_F32, 4, (const uint16_t *)dp(&w), 8, 2, &L, CUDA_ACT_GELU_TANH, 1) ==
              ALBEDO_ERR_INVALID_ARGUMENT,
          "gelu with accumulate is refused");
    buf_free(&x), buf_free(&w), buf_free(&y);
}

/* ---- layernorm, gelu, add, embed ------------------------------------------------ */

static void test_layernorm(int T, int C, dtype xdt, dtype ydt, dtype pdt, int inplace) {
    buf x = buf_new(xdt, (size_t)T * C), g = buf_new(pdt, C), bb = buf_new(pdt, C);
    buf y = inplace ? x : buf_new(ydt, (size_t)T * C);
    float *xf = fill(&x, T, C, C, -1.5f, 2.5f); /* mean ~0.5: centring matters */
    float *gf = fill(&g, 1, C, C, 0.5f, 1.5f);
    float *bf = fill(&bb, 1, C, C, -0.5f, 0.5f);
    up(&x), up(&g), up(&bb);
    if (!inplace) up(&y);
    char what[160];
    snprintf(what, sizeof what, "layernorm T=%d C=%d x=%s y=%s p=%s%s", T, C, dts(xdt), dts(ydt), dts(pdt),
             inplace ? " in place" : "");
    albedo_status st = cuda_layernorm(G, dp(&y), ydt, dp(&x), xdt, T, C, dp(&g), dp(&bb), pdt, 1e-5f);
    check_st(st, what);
    if (down(&y) == 0 && st == ALBEDO_OK) {
        float *ref = (float *)malloc((size_t)T * C * sizeof *ref);
        op_vec G2 = {gf, DT_F32}, B2 = {bf, DT_F32};
        O(REF)->layernorm(REF, ref, xf, T, C, G2, B2, 1e-5f);
        cmp c = compare(&y, T, C, C, ref, C);
        report(what, &c, ydt == DT_BF16 ? 1e-2 : 1e-5);
        free(ref);
    }
    free(xf), free(gf), free(bf);
    buf_free(&x), buf_free(&g), buf_free(&bb);
    if (!inplace) buf_free(&y);
}

/* Row strides: x [T, C + 5], y [T, round8(C) + 8]; y's padding must stay
 * poisoned (the model runner keeps zeros there for K-padded linears). */
static void test_layernorm_ld(int T, int C, dtype xdt, dtype ydt) {
    const int ldx = C + 5, ldy = (C + 7) / 8 * 8 + 8;
    buf x = buf_new(xdt, (size_t)T * ldx), g = buf_new(DT_F32, C), bb = buf_new(DT_F32, C);
    buf y = buf_new(ydt, (size_t)T * ldy);
    float *xf = fill(&x, T, C, ldx, -1.5f, 2.5f);
    float *gf = fill(&g, 1, C, C, 0.5f, 1.5f);
    float *bf = fill(&bb, 1, C, C, -0.5f, 0.5f);
    up(&x), up(&g), up(&bb), up(&y);
    char what[160];
    snprintf(what, sizeof what, "layernorm_ld T=%d C=%d ldx=%d ldy=%d x=%s y=%s", T, C, ldx, ldy, dts(xdt), dts(ydt));
    albedo_status st = cuda_layernorm_ld(G, dp(&y), ydt, ldy, dp(&x), xdt, ldx, T, C, dp(&g), dp(&bb), DT_F32, 1e-5f);
    check_st(st, what);
    if (down(&y) == 0 && st == ALBEDO_OK) {
        float *ref = (float *)malloc((size_t)T * C * sizeof *ref), *xc = (float *)malloc((size_t)T * C * sizeof *xc);
        for (int t = 0; t < T; t++) memcpy(xc + (size_t)t * C, xf + (size_t)t * ldx, (size_t)C * sizeof(float));
        op_vec G2 = {gf, DT_F32}, B2 = {bf, DT_F32};
        O(REF)->layernorm(REF, ref, xc, T, C, G2, B2, 1e-5f);
        cmp c = compare(&y, T, C, ldy, ref, C);
        report(what, &c, ydt == DT_BF16 ? 1e-2 : 1e-5);
        free(ref), free(xc);
    }
    /* A shorter stride than the row is refused. */
    CHECK(cuda_layernorm_ld(G, dp(&y), ydt, C - 1, dp(&x), xdt, ldx, T, C, dp(&g), dp(&bb), DT_F32, 1e-5f) ==
              ALBEDO_ERR_INVALID_ARGUMENT,
          "layernorm_ld: ldy < C is refused");
    free(xf), free(gf), free(bf);
    buf_free(&x), buf_free(&g), buf_free(&bb), buf_free(&y);
}

static void test_gelu(dtype dt, int erf_kind, size_t n) {
    buf x = buf_new(dt, n);
    float *xf = fill(&x, 1, (int)n, (int)n, -5, 5);
    up(&x);
    char what[160];
    snprintf(what, sizeof what, "gelu_%s n=%zu %s", erf_kind ? "erf" : "tanh", n, dts(dt));
    albedo_status st = erf_kind ? cuda_gelu_erf(G, dp(&x), dt, n) : cuda_gelu_tanh(G, dp(&x), dt, n);
    check_st(st, what);
    if (down(&x) == 0 && st == ALBEDO_OK) {
        if (erf_kind)
            O(REF)->gelu_erf(REF, xf, n);
        else
            O(REF)->gelu_tanh(REF, xf, n);
        cmp c = compare(&x, 1, (int)n, (int)n, xf, (int)n);
        report(what, &c, dt == DT_BF16 ? 1e-2 : 1e-5);
    }
    free(xf);
    buf_free(&x);
}

static void test_add(dtype ydt, dtype xdt, size_t n) {
    buf y = buf_new(ydt, n), x = buf_new(xdt, n);
    float *yf = fill(&y, 1, (int)n, (int)n, -3, 3), *xf = fill(&x, 1, (int)n, (int)n, -3, 3);
    up(&y), up(&x);
    char what[160];
    snprintf(what, sizeof what, "add n=%zu y=%s x=%s", n, dts(ydt), dts(xdt));
    albedo_status st = cuda_add(G, dp(&y), ydt, dp(&x), xdt, n);
    check_st(st, what);
    if (down(&y) == 0 && st == ALBEDO_OK) {
        O(REF)->add(REF, yf, xf, n);
        cmp c = compare(&y, 1, (int)n, (int)n, yf, (int)n);
        report(what, &c, ydt == DT_BF16 ? 1e-2 : 1e-6);
    }
    free(yf), free(xf);
    buf_free(&y), buf_free(&x);
}

static void test_embed(void) {
    const int V = 1001, C = 1151, T = 5;
    buf tab = buf_new(DT_BF16, (size_t)V * C), x = buf_new(DT_F32, (size_t)T * C);
    float *tf = fill(&tab, V, C, C, -1, 1);
    up(&tab), up(&x);
    int32_t ids[T] = {7, 1000, 0, 513, 7};
    int32_t *dids;
    cudaMalloc((void **)&dids, sizeof ids);
    cudaMemcpy(dids, ids, sizeof ids, cudaMemcpyHostToDevice);
    albedo_status st = cuda_embed(G, (float *)dp(&x), (const uint16_t *)dp(&tab), V, C, dids, T);
    check_st(st, "embed");
    if (down(&x) == 0 && st == ALBEDO_OK) {
        float *ref = (float *)malloc((size_t)T * C * sizeof *ref);
        for (int t = 0; t < T; t++) memcpy(ref + (size_t)t * C, tf + (size_t)ids[t] * C, C * sizeof *ref);
        cmp c = compare(&x, T, C, C, ref, C);
        report("embed V=1001 C=1151 T=5 (exact)", &c, 0.0);
        free(ref);
    }
    /* An id out of range writes NaN, never reads outside the table. */
    int32_t bad = V;
    cudaMemcpy(dids, &bad, sizeof bad, cudaMemcpyHostToDevice);
    st = cuda_embed(G, (float *)dp(&x), (const uint16_t *)dp(&tab), V, C, dids, 1);
    if (down(&x) == 0 && st == ALBEDO_OK) {
        float v = bget(&x, 3);
        CHECK(v != v && !bpoison(&x, 3), "embed of an id >= V writes NaN");
    }
    cudaFree(dids);
    free(tf);
    buf_free(&tab), buf_free(&x);
}

/* ---- rope + KV-cache write ------------------------------------------------------- */

static void rope_tables(int P, int R, float **cs, float **sn) {
    const int half = R / 2;
    *cs = (float *)malloc((size_t)P * half * sizeof(float));
    *sn = (float *)malloc((size_t)P * half * sizeof(float));
    for (int p = 0; p < P; p++)
        for (int i = 0; i < half; i++) {
            double f = pow(10000.0, -2.0 * i / R), a = p * f;
            (*cs)[(size_t)p * half + i] = (float)cos(a);
            (*sn)[(size_t)p * half + i] = (float)sin(a);
        }
}

/* A device int holding v (for the graph forms of rope and attention). */
static int *dev_int(int v) {
    int *d = NULL;
    if (cudaMalloc((void **)&d, sizeof(int)) != cudaSuccess ||
        cudaMemcpy(d, &v, sizeof v, cudaMemcpyHostToDevice) != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
        fprintf(stderr, "dev_int failed\n");
        exit(2);
    }
    return d;
}

/* The scales of the e4m3 tests (not 1, one not a power of two). */
#define KS8 0.75f
#define VS8 0.25f

/* dyn: the position comes from device memory (r.pos_dev), r.pos0 is 0.
 * f8: e4m3 caches with scales KS8, VS8. */
static void test_rope(int T, int H, int Hkv, int D, int R, int pos0, int with_cache, int dyn = 0, int f8 = 0) {
    const int n_ctx = pos0 + T + 9, P = n_ctx;
    const int width = (H + 2 * Hkv) * D, ldx = width + 8;
    buf x = buf_new(DT_BF16, (size_t)T * ldx);
    float *xf = fill(&x, T, width, ldx, -2, 2);
    float *cs, *sn;
    rope_tables(P, R, &cs, &sn);
    float *dcs, *dsn;
    cudaMalloc((void **)&dcs, (size_t)P * (R / 2) * 4);
    cudaMalloc((void **)&dsn, (size_t)P * (R / 2) * 4);
    cudaMemcpy(dcs, cs, (size_t)P * (R / 2) * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dsn, sn, (size_t)P * (R / 2) * 4, cudaMemcpyHostToDevice);
    size_t cache_n = (size_t)(Hkv ? Hkv : 1) * n_ctx * D;
    buf kc = buf_new(f8 ? DT_U8 : DT_BF16, cache_n), vc = buf_new(f8 ? DT_U8 : DT_BF16, cache_n);
    up(&x), up(&kc), up(&vc);
    cuda_rope r;
    memset(&r, 0, sizeof r);
    r.x = (uint16_t *)dp(&x);
    r.ldx = ldx;
    r.T = T, r.H = H, r.Hkv = Hkv, r.D = D, r.R = R, r.pos0 = pos0;
    int *dpos = NULL;
    if (dyn) r.pos0 = 0, r.pos_dev = dpos = dev_int(pos0);
    r.cos_t = dcs, r.sin_t = dsn;
    if (with_cache) {
        r.k_cache = dp(&kc);
        r.v_cache = dp(&vc);
        r.n_ctx = n_ctx;
        r.kv_fp8 = f8, r.k_scale = KS8, r.v_scale = VS8;
    }
    char what[160];
    snprintf(what, sizeof what, "rope T=%d H=%d Hkv=%d D=%d R=%d pos0=%d%s %s%s", T, H, Hkv, D, R, pos0,
             dyn ? " (device)" : "", with_cache ? "kv-cache" : "in place", f8 ? " e4m3" : "");
    albedo_status st = cuda_rope_kv(G, &r);
    check_st(st, what);
    int ok_dl = down(&x) == 0 && down(&kc) == 0 && down(&vc) == 0;
    if (ok_dl && st == ALBEDO_OK) {
        /* Reference: rope on a float copy of x; rotating H + Hkv heads of the
         * row covers queries and keys (they are adjacent). */
        float *ref = (float *)malloc((size_t)T * ldx * sizeof *ref);
        memcpy(ref, xf, (size_t)T * ldx * sizeof *ref);
        O(REF)->rope(REF, ref, ldx, T, H + Hkv, D, R, pos0, cs, sn);
        if (!with_cache) {
            /* x: queries and keys rotated, values untouched; padding poisoned. */
            cmp c = compare(&x, T, width, ldx, ref, ldx);
            report(what, &c, 1e-2);
        } else {
            /* x: queries rotated, keys and values untouched. */
            float *refx = (float *)malloc((size_t)T * ldx * sizeof *refx);
            for (int t = 0; t < T; t++)
                for (int c = 0; c < ldx; c++)
                    refx[(size_t)t * ldx + c] = c < H * D ? ref[(size_t)t * ldx + c] : xf[(size_t)t * ldx + c];
            cmp c = compare(&x, T, width, ldx, refx, ldx);
            report(what, &c, 1e-2);
            /* Caches: [Hkv, n_ctx, D]; positions pos0..pos0+T-1 written, the
             * others still poison. */
            float *refk = (float *)malloc(cache_n * sizeof(float)), *refv = (float *)malloc(cache_n * sizeof(float));
            long wrong_poison = 0;
            for (int g = 0; g < Hkv; g++)
                for (int p = 0; p < n_ctx; p++)
                    for (int d = 0; d < D; d++) {
                        size_t i = ((size_t)g * n_ctx + p) * D + d;
                        int t = p - pos0;
                        if (t >= 0 && t < T) {
                            refk[i] = ref[(size_t)t * ldx + (H + g) * D + d];
                            refv[i] = xf[(size_t)t * ldx + (H + Hkv + g) * D + d];
                            if (f8) { /* the stored bytes, decoded without their scale */
                                refk[i] = e4m3_to_f(f_to_e4m3(refk[i] / KS8));
                                refv[i] = e4m3_to_f(f_to_e4m3(refv[i] / VS8));
                            }
                        } else {
                            refk[i] = refv[i] = 0.0f;
                            wrong_poison += !bpoison(&kc, (long)i) + !bpoison(&vc, (long)i);
                            /* Make compare() skip these: mark them as written zeros. */
                            bset(&kc, (long)i, 0.0f);
                            bset(&vc, (long)i, 0.0f);
                        }
                    }
            cmp ck = compare(&kc, 1, (int)cache_n, (int)cache_n, refk, (int)cache_n);
            cmp cv = compare(&vc, 1, (int)cache_n, (int)cache_n, refv, (int)cache_n);
            char w2[200];
            snprintf(w2, sizeof w2, "  k cache (rotated keys)%s", f8 ? ", e4m3 = host rounding" : "");
            report(w2, &ck, f8 ? 5e-3 : 1e-2);
            snprintf(w2, sizeof w2, "  v cache (exact copy)%s", f8 ? ", e4m3 = host rounding" : "");
            report(w2, &cv, 0.0);
            CHECK(wrong_poison == 0, "rope writes only positions pos0..pos0+T-1 (%ld touched)", wrong_poison);
            free(refk), free(refv), free(refx);
        }
        free(ref);
    }
    free(xf), free(cs), free(sn);
    cudaFree(dcs), cudaFree(dsn), cudaFree(dpos);
    buf_free(&x), buf_free(&kc), buf_free(&vc);
}

/* ---- attention ----------------------------------------------------------------------- */

static int g_flash; /* the flash geometry set last (set_flash), named in flash cases */

/* layout 0: packed qkv rows [n_seq*T, 3*H*D (+pad)] with S == T (vision);
 * layout 1: q [n_seq*T, H*D + 8], k/v head-major caches [n_seq][Hkv][n_ctx][D]. */
/* dyn (decode, layout 1, S == pos0 + T): the position comes from device
 * memory and a.S is the capacity, larger than the keys seen (the graph
 * form); the keys past S are poison, so reading one shows. */
static void test_attention(int n_seq, int T, int S, int H, int Hkv, int D, int pos0, int n_prefix, int layout,
                           int dyn = 0, int f8 = 0) {
    const float scale = 1.0f / sqrtf((float)D);
    const int n_ctx = S + (dyn ? 700 : 13);
    cuda_attn a;
    memset(&a, 0, sizeof a);
    a.T = T, a.S = S, a.H = H, a.Hkv = Hkv, a.D = D, a.pos0 = pos0, a.n_prefix = n_prefix;
    a.scale = scale, a.n_seq = n_seq;
    int *dpos = NULL;
    if (dyn) a.S = n_ctx, a.pos0 = 0, a.pos_dev = dpos = dev_int(pos0);
    buf qkv = buf_new(DT_BF16, 8), q = buf_new(DT_BF16, 8), kc = buf_new(DT_BF16, 8), vc = buf_new(DT_BF16, 8);
    const int ldo = H * D + 8;
    buf out = buf_new(DT_BF16, (size_t)n_seq * T * ldo);
    /* Float copies for the reference: per sequence q [T, H*D], k/v [S, Hkv*D]. */
    float *qr = (float *)malloc((size_t)n_seq * T * H * D * sizeof(float));
    float *kr = (float *)malloc((size_t)n_seq * S * Hkv * D * sizeof(float));
    float *vr = (float *)malloc((size_t)n_seq * S * Hkv * D * sizeof(float));
    if (layout == 0) {
        const int ld = 3 * H * D + 8;
        buf_free(&qkv);
        qkv = buf_new(DT_BF16, (size_t)n_seq * T * ld);
        for (int s = 0; s < n_seq; s++)
            for (int t = 0; t < T; t++)
                for (int c = 0; c < 3 * H * D; c++) {
                    long i = ((long)s * T + t) * ld + c;
                    bset(&qkv, i, c < H * D ? rnd(-2, 2) : rnd(-1, 1));
                    float v = bget(&qkv, i);
                    if (c < H * D)
                        qr[((size_t)s * T + t) * H * D + c] = v;
                    else if (c < 2 * H * D)
                        kr[((size_t)s * S + t) * Hkv * D + (c - H * D)] = v;
                    else
                        vr[((size_t)s * S + t) * Hkv * D + (c - 2 * H * D)] = v;
                }
        up(&qkv);
        const uint16_t *base = (const uint16_t *)dp(&qkv);
        a.q = base, a.ldq = ld, a.q_seq = (long)T * ld;
        a.k = base + H * D, a.ldk = ld, a.k_head = D, a.k_seq = (long)T * ld;
        a.v = base + 2 * H * D, a.ldv = ld, a.v_head = D, a.v_seq = (long)T * ld;
    } else {
        const int ldq = H * D + 8;
        buf_free(&q), buf_free(&kc), buf_free(&vc);
        q = buf_new(DT_BF16, (size_t)n_seq * T * ldq);
        kc = buf_new(f8 ? DT_U8 : DT_BF16, (size_t)n_seq * Hkv * n_ctx * D);
        vc = buf_new(f8 ? DT_U8 : DT_BF16, (size_t)n_seq * Hkv * n_ctx * D);
        const float ks = f8 ? KS8 : 1.0f, vs = f8 ? VS8 : 1.0f; /* e4m3 holds x / scale */
        for (int s = 0; s < n_seq; s++) {
            for (int t = 0; t < T; t++)
                for (int c = 0; c < H * D; c++) {
                    long i = ((long)s * T + t) * ldq + c;
                    bset(&q, i, rnd(-2, 2));
                    qr[((size_t)s * T + t) * H * D + c] = bget(&q, i);
                }
            /* Keys 0..S-1 hold data; slots S..n_ctx-1 stay poison (unreadable). */
            for (int g = 0; g < Hkv; g++)
                for (int j = 0; j < S; j++)
                    for (int d = 0; d < D; d++) {
                        long i = (((long)s * Hkv + g) * n_ctx + j) * D + d;
                        bset(&kc, i, rnd(-1, 1) / ks);
                        bset(&vc, i, rnd(-1, 1) / vs);
                        kr[((size_t)s * S + j) * Hkv * D + g * D + d] = bget(&kc, i) * ks;
                        vr[((size_t)s * S + j) * Hkv * D + g * D + d] = bget(&vc, i) * vs;
                    }
        }
        up(&q), up(&kc), up(&vc);
        a.q = (const uint16_t *)dp(&q), a.ldq = ldq, a.q_seq = (long)T * ldq;
        a.k = dp(&kc), a.ldk = D, a.k_head = (long)n_ctx * D, a.k_seq = (long)Hkv * n_ctx * D;
        a.v = dp(&vc), a.ldv = D, a.v_head = (long)n_ctx * D, a.v_seq = (long)Hkv * n_ctx * D;
        a.kv_fp8 = f8, a.k_scale = ks, a.v_scale = vs;
    }
    up(&out);
    a.out = (uint16_t *)dp(&out), a.ldo = ldo, a.o_seq = (long)T * ldo;
    char what[200];
    char geom[24] = "";
    if (T > 8) snprintf(geom, sizeof geom, " flash=%d", g_flash);
    snprintf(what, sizeof what, "attention seq=%d T=%d S=%d H=%d/%d D=%d pos0=%d prefix=%d %s%s%s%s", n_seq, T, S, H,
             Hkv, D, pos0, n_prefix, layout == 0 ? "qkv" : "cache", dyn ? " (device pos, capacity S+700)" : "",
             f8 ? " e4m3" : "", geom);
    albedo_status st = cuda_attention(G, &a);
    check_st(st, what);
    if (down(&out) == 0 && st == ALBEDO_OK) {
        float *ref = (float *)malloc((size_t)n_seq * T * H * D * sizeof(float));
        for (int s = 0; s < n_seq; s++) {
            op_attn ra;
            memset(&ra, 0, sizeof ra);
            ra.T = T, ra.S = S, ra.H = H, ra.Hkv = Hkv, ra.D = D, ra.pos0 = pos0, ra.n_prefix = n_prefix;
            ra.scale = scale;
            ra.q = qr + (size_t)s * T * H * D, ra.ldq = H * D;
            ra.k = kr + (size_t)s * S * Hkv * D, ra.ldk = Hkv * D;
            ra.v = vr + (size_t)s * S * Hkv * D, ra.ldv = Hkv * D;
            ra.out = ref + (size_t)s * T * H * D, ra.ldo = H * D;
            O(REF)->attention(REF, &ra);
        }
        cmp c = compare(&out, n_seq * T, H * D, ldo, ref, H * D);
        report(what, &c, 1e-2);
        free(ref);
    }
    free(qr), free(kr), free(vr);
    cudaFree(dpos);
    buf_free(&qkv), buf_free(&q), buf_free(&kc), buf_free(&vc), buf_free(&out);
}

/* The flash kernel's cases (T > 8), run under every block geometry
 * (cuda_ctx_set_flash). */
static void test_flash_cases(void) {
    /* Vision-like: bidirectional, packed qkv, several crops in one launch. */
    test_attention(2, 129, 129, 3, 3, 72, 0, 129, 0);
    if (!g_small) test_attention(2, 729, 729, 2, 2, 72, 0, 729, 0);
    /* Prefill: causal with a bidirectional prefix that ends mid-block, GQA. */
    test_attention(1, 77, 107, 4, 2, 64, 30, 50, 1);
    test_attention(1, 77, 107, 3, 3, 72, 30, 50, 1);
    /* A prefix ending inside the second 128-row block, rows in three. */
    test_attention(1, 300, 300, 2, 2, 64, 0, 150, 1);
    /* Plain causal, queries 0.., S not a multiple of 64. */
    test_attention(1, 130, 130, 2, 1, 64, 0, 0, 1);
    test_attention(2, 9, 9, 2, 2, 64, 0, 0, 1);
    if (!g_small) test_attention(1, 730, 730, 2, 2, 64, 0, 730, 1);
    /* Other head widths: each instance (40 runs padded to 64; 80, 96, 128). */
    test_attention(1, 45, 45, 2, 2, 40, 0, 20, 1);
    test_attention(1, 100, 100, 2, 2, 40, 0, 20, 1);
    test_attention(3, 70, 70, 2, 2, 56, 0, 70, 0);
    test_attention(2, 100, 100, 2, 2, 80, 0, 100, 0);
    test_attention(1, 70, 90, 2, 1, 96, 20, 30, 1);
    test_attention(1, 140, 140, 2, 2, 128, 0, 60, 1);
    /* e4m3 caches (kv_fp8): prefill with a prefix (flash, the segment
     * instance over the plain layout), causal. */
    test_attention(1, 77, 107, 4, 2, 64, 30, 50, 1, 0, 1);
    test_attention(1, 130, 130, 2, 1, 64, 0, 0, 1, 0, 1);
    test_attention(1, 40, 60, 3, 3, 72, 20, 30, 1, 0, 1);
    if (!g_small) test_attention(1, 730, 730, 2, 2, 64, 0, 730, 1, 0, 1);
}

/* Every block geometry of the flash kernel (ops_cuda.h), the default first. */
/* (On sm_90a the default runs the wgmma kernels where they apply: T > 64,
 * D <= 72, bf16 caches; CUDA_FLASH_WGALT swaps which of the two runs the
 * plain layout at D = 64 and 72; CUDA_FLASH_MMA and CUDA_FLASH_64 keep the
 * mma.sync kernel.) */
static const int FLASH_VARIANTS[] = {CUDA_FLASH_128, CUDA_FLASH_128 | CUDA_FLASH_WGALT, CUDA_FLASH_128 | CUDA_FLASH_MMA,
                                     CUDA_FLASH_64, CUDA_FLASH_128 | CUDA_FLASH_PAD16};

static void set_flash(int v) {
    g_flash = v;
    cuda_ctx_set_flash(G, v);
}

static void test_attentions(void) {
    for (size_t i = 0; i < sizeof FLASH_VARIANTS / sizeof FLASH_VARIANTS[0]; i++) {
        set_flash(FLASH_VARIANTS[i]);
        test_flash_cases();
    }
    set_flash(CUDA_FLASH_128);
    /* Decode over the cache. */
    test_attention(1, 1, 741, 4, 4, 64, 740, 730, 1);
    test_attention(3, 1, 100, 4, 4, 64, 99, 0, 1);
    test_attention(1, 3, 103, 4, 2, 64, 100, 0, 1);
    test_attention(1, 2, 57, 3, 3, 72, 55, 0, 1);
    test_attention(1, 1, 5, 2, 2, 64, 4, 0, 1); /* fewer keys than one chunk */
    test_attention(1, 1, 2048, 2, 2, 64, 2047, 730, 1);
    if (!g_small) test_attention(1, 1, 4100, 2, 2, 64, 4099, 0, 1); /* chunks capped at 2048 keys */
    /* The graph form: position from device memory, launch sized by a capacity. */
    test_attention(1, 1, 741, 32, 32, 64, 740, 730, 1, 1);
    test_attention(3, 1, 100, 4, 4, 64, 99, 0, 1, 1);
    test_attention(1, 3, 103, 4, 2, 64, 100, 0, 1, 1);
    test_attention(1, 1, 5, 2, 2, 64, 4, 0, 1, 1);
    test_attention(1, 1, 2048, 2, 2, 64, 2047, 730, 1, 1);
    /* e4m3 caches (kv_fp8), the decode kernel: decode, the graph form. */
    test_attention(1, 1, 741, 4, 4, 64, 740, 730, 1, 0, 1);
    test_attention(1, 3, 103, 4, 2, 64, 100, 0, 1, 0, 1);
    test_attention(1, 2, 57, 3, 3, 72, 55, 0, 1, 0, 1);
    if (!g_small) test_attention(1, 1, 4100, 2, 2, 64, 4099, 0, 1, 0, 1);
    test_attention(1, 1, 741, 32, 32, 64, 740, 730, 1, 1, 1);
    test_attention(3, 1, 100, 4, 4, 64, 99, 0, 1, 1, 1);
    /* The decode kernel's other lane layouts: D/8 = 1, 5, 12, 16 groups of
     * 8 dims, so 32, 6, 2, 2 key slots a tile (D > 64: the key rows in two
     * loads, the values in two batches). */
    test_attention(1, 1, 300, 3, 3, 8, 299, 0, 1);
    test_attention(1, 2, 333, 4, 2, 40, 331, 0, 1);
    test_attention(1, 1, 741, 4, 4, 96, 740, 730, 1);
    test_attention(2, 1, 517, 4, 4, 128, 516, 0, 1, 1);
    test_attention(1, 3, 203, 2, 1, 128, 200, 0, 1, 0, 1);
    /* Many rows × heads: one chunk a row, so each warp walks several tiles
     * (the later ones loaded at the end of the one before). */
    test_attention(4, 2, 700, 160, 32, 64, 698, 0, 1);
    test_attention(1, 2, 1100, 600, 100, 64, 1098, 730, 1, 1, 1);

    /* Bad arguments come back as statuses. */
    cuda_attn a;
    memset(&a, 0, sizeof a);
    a.T = 1, a.S = 4, a.H = 2, a.Hkv = 2, a.D = 12, a.n_seq = 1;
    CHECK(cuda_attention(G, &a) == ALBEDO_ERR_INVALID_ARGUMENT, "D %% 8 != 0 is refused");
    int *dpos = dev_int(0);
    a.D = 64, a.T = 9, a.S = 9, a.pos_dev = dpos;
    CHECK(cuda_attention(G, &a) == ALBEDO_ERR_INVALID_ARGUMENT, "a device position with T > 8 is refused");
    a.pos_dev = NULL, a.kv_fp8 = 1, a.k_scale = 0.0f, a.v_scale = 1.0f;
    CHECK(cuda_attention(G, &a) == ALBEDO_ERR_INVALID_ARGUMENT, "an e4m3 cache with scale 0 is refused");
    cudaFree(dpos);
}

/* ---- paged forms (the engine's pool) ------------------------------------------------- */

static int32_t *dev_ints(const int32_t *v, size_t n) {
    int32_t *d = NULL;
    if (cudaMalloc((void **)&d, n * sizeof(int32_t) + 16) != cudaSuccess ||
        cudaMemcpy(d, v, n * sizeof(int32_t), cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaDeviceSynchronize() != cudaSuccess) {
        fprintf(stderr, "dev_ints failed\n");
        exit(2);
    }
    return d;
}

/* Block tables: n_seq sequences of nb[s] blocks each, drawn without
 * repetition from a shuffled pool of n_blocks (so that neighbours in a
 * sequence are far apart in the pool), [n_seq][ld]. */
static int32_t *block_tables(int n_seq, const int *nb, int ld, int n_blocks) {
    int32_t *perm = (int32_t *)malloc((size_t)n_blocks * sizeof *perm), *bt = (int32_t *)calloc((size_t)n_seq * ld, 4);
    for (int i = 0; i < n_blocks; i++) perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
        int j = (int)(rng_next() % (uint64_t)(i + 1)), t = perm[i];
        perm[i] = perm[j], perm[j] = t;
    }
    int k = 0;
    for (int s = 0; s < n_seq; s++)
        for (int b = 0; b < nb[s]; b++) bt[(size_t)s * ld + b] = perm[k++];
    free(perm);
    return bt;
}

/* Segments of Ts[s] query rows at positions pos0s[s] over a token-major
 * paged pool [n_blocks·bs, Hkv·D] through block tables, all in one launch
 * (the engine's step). Pool rows nobody may read are poison. */
static void test_paged_attention(int n_seq, const int *Ts, const int *pos0s, const int *prefixes, int H, int Hkv, int D,
                                 int bs, int f8 = 0) {
    const float scale = 1.0f / sqrtf((float)D);
    const int kvd = Hkv * D, ldq = H * D + 8, ldo = H * D + 8;
    int Tsum = 0, maxT = 0, maxS = 0, tot_blocks = 0;
    int nb[64];
    for (int s = 0; s < n_seq; s++) {
        Tsum += Ts[s];
        if (Ts[s] > maxT) maxT = Ts[s];
        if (pos0s[s] + Ts[s] > maxS) maxS = pos0s[s] + Ts[s];
        nb[s] = (pos0s[s] + Ts[s] + bs - 1) / bs;
        tot_blocks += nb[s];
    }
    const int n_blocks = tot_blocks + 5, ld = (maxS + 40 + bs - 1) / bs; /* capacity past every sequence */
    int32_t *bt = block_tables(n_seq, nb, ld, n_blocks);
    buf q = buf_new(DT_BF16, (size_t)Tsum * ldq), out = buf_new(DT_BF16, (size_t)Tsum * ldo);
    const dtype kdt = f8 ? DT_U8 : DT_BF16;
    const float ks = f8 ? KS8 : 1.0f, vs = f8 ? VS8 : 1.0f; /* e4m3 holds x / scale */
    buf kc = buf_new(kdt, (size_t)n_blocks * bs * kvd), vc = buf_new(kdt, (size_t)n_blocks * bs * kvd);
    float *qr = fill(&q, Tsum, H * D, ldq, -2, 2);
    int32_t *seg = (int32_t *)malloc((size_t)n_seq * 4 * sizeof *seg);
    float *ref = (float *)malloc((size_t)Tsum * H * D * sizeof(float));
    float *kr = (float *)malloc((size_t)maxS * kvd * sizeof(float)),
          *vr = (float *)malloc((size_t)maxS * kvd * sizeof(float));
    /* Fill each sequence's keys through its table (the reference gets them contiguous). */
    for (int s = 0, r0 = 0; s < n_seq; r0 += Ts[s++]) {
        seg[4 * s] = r0, seg[4 * s + 1] = Ts[s], seg[4 * s + 2] = pos0s[s], seg[4 * s + 3] = prefixes[s];
        const int S = pos0s[s] + Ts[s];
        for (int j = 0; j < S; j++) {
            const long row = (long)bt[(size_t)s * ld + j / bs] * bs + j % bs;
            for (int c = 0; c < kvd; c++) {
                bset(&kc, row * kvd + c, rnd(-1, 1) / ks);
                bset(&vc, row * kvd + c, rnd(-1, 1) / vs);
                kr[(size_t)j * kvd + c] = bget(&kc, row * kvd + c) * ks;
                vr[(size_t)j * kvd + c] = bget(&vc, row * kvd + c) * vs;
            }
        }
        op_attn ra;
        memset(&ra, 0, sizeof ra);
        ra.T = Ts[s], ra.S = S, ra.H = H, ra.Hkv = Hkv, ra.D = D, ra.pos0 = pos0s[s], ra.n_prefix = prefixes[s];
        ra.scale = scale;
        ra.q = qr + (size_t)r0 * ldq, ra.ldq = ldq;
        ra.k = kr, ra.ldk = kvd, ra.v = vr, ra.ldv = kvd;
        ra.out = ref + (size_t)r0 * H * D, ra.ldo = H * D;
        O(REF)->attention(REF, &ra);
    }
    up(&q), up(&out), up(&kc), up(&vc);
    int32_t *dseg = dev_ints(seg, (size_t)n_seq * 4), *dbt = dev_ints(bt, (size_t)n_seq * ld);
    cuda_attn a;
    memset(&a, 0, sizeof a);
    a.T = maxT, a.S = ld * bs, a.H = H, a.Hkv = Hkv, a.D = D, a.scale = scale, a.n_seq = n_seq;
    a.q = (const uint16_t *)dp(&q), a.ldq = ldq;
    a.k = dp(&kc), a.ldk = kvd, a.k_head = D;
    a.v = dp(&vc), a.ldv = kvd, a.v_head = D;
    a.out = (uint16_t *)dp(&out), a.ldo = ldo;
    a.seg = dseg, a.blocks = dbt, a.block_size = bs, a.blocks_ld = ld;
    a.kv_fp8 = f8, a.k_scale = ks, a.v_scale = vs;
    char what[200];
    const char *kernel = maxT <= 8 ? "decode" : g_flash == CUDA_FLASH_64 ? "flash 64" : "flash";
    snprintf(what, sizeof what, "paged attention %d seqs, T<=%d, S<=%d, H=%d/%d D=%d block %d (%s%s)", n_seq, maxT,
             maxS, H, Hkv, D, bs, kernel, f8 ? ", e4m3" : "");
    albedo_status st = cuda_attention(G, &a);
    check_st(st, what);
    if (down(&out) == 0 && st == ALBEDO_OK) {
        cmp c = compare(&out, Tsum, H * D, ldo, ref, H * D);
        report(what, &c, 1e-2);
    }
    /* Twice more with the same inputs (graph replays see the counters reset). */
    if (st == ALBEDO_OK) {
        up(&out);
        st = cuda_attention(G, &a);
        if (down(&out) == 0 && st == ALBEDO_OK) {
            cmp c = compare(&out, Tsum, H * D, ldo, ref, H * D);
            snprintf(what + strlen(what), sizeof what - strlen(what), " again");
            report(what, &c, 1e-2);
        }
    }
    free(bt), free(seg), free(ref), free(kr), free(vr), free(qr);
    cudaFree(dseg), cudaFree(dbt);
    buf_free(&q), buf_free(&out), buf_free(&kc), buf_free(&vc);
}

/* Paged rope: rows at arbitrary positions written to arbitrary pool rows. */
static void test_paged_rope(int T, int H, int Hkv, int D, int R, int f8 = 0) {
    const int P = 900, width = (H + 2 * Hkv) * D, ldx = width + 8, kvd = Hkv * D, n_rows = 3 * T + 11;
    buf x = buf_new(DT_BF16, (size_t)T * ldx);
    float *xf = fill(&x, T, width, ldx, -2, 2);
    float *cs, *sn;
    rope_tables(P, R, &cs, &sn);
    float *dcs, *dsn;
    cudaMalloc((void **)&dcs, (size_t)P * (R / 2) * 4);
    cudaMalloc((void **)&dsn, (size_t)P * (R / 2) * 4);
    cudaMemcpy(dcs, cs, (size_t)P * (R / 2) * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dsn, sn, (size_t)P * (R / 2) * 4, cudaMemcpyHostToDevice);
    buf kc = buf_new(f8 ? DT_U8 : DT_BF16, (size_t)n_rows * kvd),
        vc = buf_new(f8 ? DT_U8 : DT_BF16, (size_t)n_rows * kvd);
    int32_t *rows = (int32_t *)malloc((size_t)T * 2 * sizeof *rows);
    for (int t = 0; t < T; t++) rows[2 * t] = (int)(rng_next() % P), rows[2 * t + 1] = 3 * t + 1 + (t % 3);
    up(&x), up(&kc), up(&vc);
    int32_t *drows = dev_ints(rows, (size_t)T * 2);
    cuda_rope r;
    memset(&r, 0, sizeof r);
    r.x = (uint16_t *)dp(&x), r.ldx = ldx, r.T = T, r.H = H, r.Hkv = Hkv, r.D = D, r.R = R;
    r.cos_t = dcs, r.sin_t = dsn, r.k_cache = dp(&kc), r.v_cache = dp(&vc), r.rows = drows;
    r.kv_fp8 = f8, r.k_scale = KS8, r.v_scale = VS8;
    char what[160];
    snprintf(what, sizeof what, "paged rope T=%d H=%d Hkv=%d D=%d R=%d%s", T, H, Hkv, D, R, f8 ? " e4m3" : "");
    albedo_status st = cuda_rope_kv(G, &r);
    check_st(st, what);
    if (down(&x) == 0 && down(&kc) == 0 && down(&vc) == 0 && st == ALBEDO_OK) {
        float *ref = (float *)malloc((size_t)T * ldx * sizeof *ref);
        memcpy(ref, xf, (size_t)T * ldx * sizeof *ref);
        for (int t = 0; t < T; t++) /* each row at its own position */
            O(REF)->rope(REF, ref + (size_t)t * ldx, ldx, 1, H + Hkv, D, R, rows[2 * t], cs, sn);
        float *refx = (float *)malloc((size_t)T * ldx * sizeof *refx);
        for (int t = 0; t < T; t++)
            for (int c = 0; c < ldx; c++)
                refx[(size_t)t * ldx + c] = c < H * D ? ref[(size_t)t * ldx + c] : xf[(size_t)t * ldx + c];
        cmp c = compare(&x, T, width, ldx, refx, ldx);
        report(what, &c, 1e-2);
        float *rk = (float *)calloc((size_t)n_rows * kvd, sizeof(float)),
              *rv = (float *)calloc((size_t)n_rows * kvd, sizeof(float));
        char *used = (char *)calloc((size_t)n_rows, 1);
        for (int t = 0; t < T; t++) {
            const int row = rows[2 * t + 1];
            used[row] = 1;
            for (int cc = 0; cc < kvd; cc++) {
                rk[(size_t)row * kvd + cc] = ref[(size_t)t * ldx + H * D + cc];
                rv[(size_t)row * kvd + cc] = xf[(size_t)t * ldx + (H + Hkv) * D + cc];
                if (f8) { /* the stored bytes, decoded without their scale */
                    rk[(size_t)row * kvd + cc] = e4m3_to_f(f_to_e4m3(rk[(size_t)row * kvd + cc] / KS8));
                    rv[(size_t)row * kvd + cc] = e4m3_to_f(f_to_e4m3(rv[(size_t)row * kvd + cc] / VS8));
                }
            }
        }
        long touched = 0;
        for (int row = 0; row < n_rows; row++)
            if (!used[row])
                for (int cc = 0; cc < kvd; cc++) {
                    touched += !bpoison(&kc, (long)row * kvd + cc) + !bpoison(&vc, (long)row * kvd + cc);
                    bset(&kc, (long)row * kvd + cc, 0.0f), bset(&vc, (long)row * kvd + cc, 0.0f);
                }
        cmp ck = compare(&kc, n_rows, kvd, kvd, rk, kvd), cv = compare(&vc, n_rows, kvd, kvd, rv, kvd);
        report(f8 ? "  paged k rows (rotated keys), e4m3 = host rounding" : "  paged k rows (rotated keys)", &ck,
               f8 ? 5e-3 : 1e-2);
        report(f8 ? "  paged v rows (exact copy), e4m3 = host rounding" : "  paged v rows (exact copy)", &cv, 0.0);
        CHECK(touched == 0, "paged rope writes only its rows (%ld touched)", touched);
        free(ref), free(refx), free(rk), free(rv), free(used);
    }
    free(xf), free(cs), free(sn), free(rows);
    cudaFree(dcs), cudaFree(dsn), cudaFree(drows);
    buf_free(&x), buf_free(&kc), buf_free(&vc);
}

/* Prompt chunks through the flash kernel's segment form: varied lengths, a
 * bidirectional prefix, a chunk starting mid-block, GQA, odd blocks and
 * D = 72. */
static void test_paged_flash(int f8) {
    {
        int T[] = {77, 9, 130}, p[] = {730, 5, 0}, pf[] = {730, 0, 50};
        test_paged_attention(3, T, p, pf, 4, 2, 64, 16, f8);
    }
    {
        int T[] = {730}, p[] = {0}, pf[] = {730};
        if (!g_small) test_paged_attention(1, T, p, pf, 4, 4, 64, 16, f8);
    }
    {
        int T[] = {20, 65}, p[] = {11, 100}, pf[] = {0, 0};
        test_paged_attention(2, T, p, pf, 3, 3, 72, 5, f8);
    }
    {
        int T[] = {100, 70, 3}, p[] = {0, 33, 7}, pf[] = {60, 0, 9};
        test_paged_attention(3, T, p, pf, 4, 2, 64, 5, f8);
    }
    {
        int T[] = {200, 12}, p[] = {0, 40}, pf[] = {150, 0};
        test_paged_attention(2, T, p, pf, 3, 3, 72, 7, f8);
    }
}

static void test_paged(void) {
    test_paged_rope(5, 4, 2, 64, 32);
    test_paged_rope(13, 3, 3, 72, 40);
    /* Decode rows of several sequences at different depths, odd block sizes. */
    {
        int T[] = {1, 1, 1}, p[] = {740, 99, 3}, pf[] = {730, 0, 0};
        test_paged_attention(3, T, p, pf, 4, 4, 64, 16);
    }
    {
        int T[] = {1, 1}, p[] = {40, 300}, pf[] = {0, 0};
        test_paged_attention(2, T, p, pf, 4, 2, 64, 7);
    }
    /* Short prompts mixed with decode rows (the decode kernel, rows past a segment skipped). */
    {
        int T[] = {1, 5, 3, 1}, p[] = {200, 31, 0, 77}, pf[] = {0, 0, 2, 0};
        test_paged_attention(4, T, p, pf, 3, 3, 72, 16);
    }
    /* Prompt chunks (flash), in its default geometry (on sm_90a the wgmma
     * kernel at D = 64), the mma.sync one's and the 64-row one. */
    test_paged_flash(0);
    set_flash(CUDA_FLASH_128 | CUDA_FLASH_MMA);
    test_paged_flash(0);
    set_flash(CUDA_FLASH_64);
    test_paged_flash(0);
    set_flash(CUDA_FLASH_128);
    /* Many sequences (a full batch), one row each. */
    {
        int T[40], p[40], pf[40];
        for (int i = 0; i < 40; i++) T[i] = 1, p[i] = 730 + 13 * i, pf[i] = 730;
        test_paged_attention(40, T, p, pf, 4, 4, 64, 16);
    }

    /* The e4m3 pool (kv_fp8): writes, decode rows, mixed short prompts,
     * prompt chunks with a prefix (flash), odd blocks and D = 72. */
    test_paged_rope(5, 4, 2, 64, 32, 1);
    test_paged_rope(13, 3, 3, 72, 40, 1);
    {
        int T[] = {1, 1, 1}, p[] = {740, 99, 3}, pf[] = {730, 0, 0};
        test_paged_attention(3, T, p, pf, 4, 4, 64, 16, 1);
    }
    {
        int T[] = {1, 5, 3, 1}, p[] = {200, 31, 0, 77}, pf[] = {0, 0, 2, 0};
        test_paged_attention(4, T, p, pf, 3, 3, 72, 16, 1);
    }
    test_paged_flash(1);
    set_flash(CUDA_FLASH_64);
    test_paged_flash(1);
    set_flash(CUDA_FLASH_128);
}

/* ---- sampling -------------------------------------------------------------------------- */

static int host_argmax(const float *v, int n) {
    int best = 0;
    float b = -INFINITY;
    for (int i = 0; i < n; i++)
        if (v[i] > b) {
            b = v[i];
            best = i;
        }
    return best;
}

static void test_argmax(void) {
    const int rows = 4, V = 51200;
    const long ld = V + 5;
    float *lg = (float *)malloc((size_t)rows * ld * sizeof(float));
    for (size_t i = 0; i < (size_t)rows * ld; i++) lg[i] = rnd(-10, 10);
    lg[1 * ld + 17] = 50.0f; /* a tie: the first index wins */
    lg[1 * ld + 40000] = 50.0f;
    lg[2 * ld + 3] = NAN; /* NaN never wins */
    lg[2 * ld + 9] = 60.0f;
    lg[3 * ld + V] = 1e9f; /* beyond V: never read as a candidate */
    float *dl;
    int32_t *dids, ids[rows];
    cudaMalloc((void **)&dl, (size_t)rows * ld * sizeof(float));
    cudaMalloc((void **)&dids, sizeof ids);
    cudaMemcpy(dl, lg, (size_t)rows * ld * sizeof(float), cudaMemcpyHostToDevice);
    check_st(cuda_argmax(G, dids, dl, rows, V, ld), "argmax");
    cudaDeviceSynchronize();
    cudaMemcpy(ids, dids, sizeof ids, cudaMemcpyDeviceToHost);
    int bad = 0;
    for (int r = 0; r < rows; r++) bad += ids[r] != host_argmax(lg + r * ld, V);
    printf("%-4s argmax rows=%d V=%d (ties, NaN, stride)\n", bad ? "FAIL" : "ok", rows, V);
    CHECK(bad == 0, "argmax matches the host (%d rows differ)", bad);
    /* temperature 0 is argmax */
    check_st(cuda_sample(G, dids, dl, rows, V, ld, 0.0f, 0.9f, 1, NULL), "sample t=0");
    cudaDeviceSynchronize();
    cudaMemcpy(ids, dids, sizeof ids, cudaMemcpyDeviceToHost);
    bad = 0;
    for (int r = 0; r < rows; r++) bad += ids[r] != host_argmax(lg + r * ld, V);
    CHECK(bad == 0, "sample with temperature 0 is argmax");
    cudaFree(dl), cudaFree(dids);
    free(lg);
}

/* sampler.c's nucleus: tokens sorted by probability (ties by index), kept
 * while the mass before them is <= top_p; returns the kept count and fills
 * q[] with the renormalised probabilities (0 for dropped tokens). */
static int host_nucleus(const float *lg, int V, float temp, float top_p, double *q) {
    double mx = -INFINITY, z = 0;
    for (int i = 0; i < V; i++) mx = fmax(mx, lg[i] / temp);
    double *p = (double *)malloc(V * sizeof(double));
    int *idx = (int *)malloc(V * sizeof(int));
    for (int i = 0; i < V; i++) {
        p[i] = exp(lg[i] / temp - mx);
        z += p[i];
        idx[i] = i;
    }
    for (int i = 0; i < V; i++) p[i] /= z;
    /* selection sort of the top part is enough: V is small here */
    double cum = 0, kept = 0;
    int k = 0;
    for (; k < V; k++) {
        int b = k;
        for (int j = k + 1; j < V; j++)
            if (p[idx[j]] > p[idx[b]] || (p[idx[j]] == p[idx[b]] && idx[j] < idx[b])) b = j;
        int t = idx[k];
        idx[k] = idx[b];
        idx[b] = t;
        if (cum > top_p) break;
        cum += p[idx[k]];
        kept += p[idx[k]];
    }
    for (int i = 0; i < V; i++) q[i] = 0;
    for (int i = 0; i < k; i++) q[idx[i]] = p[idx[i]] / kept;
    free(p), free(idx);
    return k;
}

static void test_sample(int V, int rows, float temp, float top_p) {
    float *lg = (float *)malloc(V * sizeof(float));
    for (int i = 0; i < V; i++) lg[i] = rnd(-4, 4) * (i % 7 == 0 ? 1.5f : 1.0f);
    double *q = (double *)malloc(V * sizeof(double));
    int kept = host_nucleus(lg, V, temp, top_p, q);
    float *dl;
    int32_t *dids;
    uint64_t *dctr;
    cudaMalloc((void **)&dl, V * sizeof(float));
    cudaMalloc((void **)&dids, rows * sizeof(int32_t));
    cudaMalloc((void **)&dctr, rows * sizeof(uint64_t));
    cudaMemset(dctr, 0, rows * sizeof(uint64_t));
    cudaMemcpy(dl, lg, V * sizeof(float), cudaMemcpyHostToDevice);
    int32_t *a = (int32_t *)malloc(rows * sizeof(int32_t)), *b = (int32_t *)malloc(rows * sizeof(int32_t));
    int32_t *c2 = (int32_t *)malloc(rows * sizeof(int32_t));
    char what[160];
    snprintf(what, sizeof what, "sample V=%d rows=%d t=%.2f top_p=%.2f (kept %d)", V, rows, temp, top_p, kept);
    /* ld = 0: every row samples the same logits with its own random number. */
    albedo_status st = cuda_sample(G, dids, dl, rows, V, 0, temp, top_p, 42, NULL);
    check_st(st, what);
    cudaDeviceSynchronize();
    cudaMemcpy(a, dids, rows * sizeof(int32_t), cudaMemcpyDeviceToHost);
    st = cuda_sample(G, dids, dl, rows, V, 0, temp, top_p, 42, NULL);
    cudaDeviceSynchronize();
    cudaMemcpy(b, dids, rows * sizeof(int32_t), cudaMemcpyDeviceToHost);
    /* With a counter: two calls draw differently, and the counter advances. */
    cuda_sample(G, dids, dl, rows, V, 0, temp, top_p, 42, dctr);
    cuda_sample(G, dids, dl, rows, V, 0, temp, top_p, 42, dctr);
    cudaDeviceSynchronize();
    cudaMemcpy(c2, dids, rows * sizeof(int32_t), cudaMemcpyDeviceToHost);
    uint64_t ctr0 = 0;
    cudaMemcpy(&ctr0, dctr, sizeof ctr0, cudaMemcpyDeviceToHost);

    long outside = 0, same = 0, diff_ctr = 0, viol = 0;
    long *cnt = (long *)calloc(V, sizeof(long));
    for (int r = 0; r < rows; r++) {
        if (a[r] < 0 || a[r] >= V || q[a[r]] == 0.0) {
            outside++;
            continue;
        }
        cnt[a[r]]++;
        same += a[r] == b[r];
        diff_ctr += a[r] != c2[r];
    }
    double worst_z = 0;
    for (int i = 0; i < V; i++) {
        if (q[i] == 0.0) continue;
        double e = rows * q[i], sd = sqrt(rows * q[i] * (1 - q[i]));
        double zsc = fabs(cnt[i] - e) / (sd + 1e-9);
        if (fabs(cnt[i] - e) > 5 * sd + 3) viol++;
        if (zsc > worst_z) worst_z = zsc;
    }
    int ok = outside == 0 && viol == 0 && same == rows && ctr0 == 2;
    printf("%-4s %-58s outside %ld, freq violations %ld (worst %.1f sd), repeat-equal %ld/%d, "
           "counter-differs %ld\n",
           ok ? "ok" : "FAIL", what, outside, viol, worst_z, same, rows, diff_ctr);
    CHECK(outside == 0, "%s: every draw is in the nucleus", what);
    CHECK(viol == 0, "%s: frequencies match the renormalised nucleus", what);
    CHECK(same == rows, "%s: same seed and counter give the same tokens", what);
    CHECK(ctr0 == 2, "%s: counter advanced twice (%llu)", what, (unsigned long long)ctr0);
    if (kept > 3) CHECK(diff_ctr > rows / 4, "%s: the counter changes the draws", what);
    free(cnt), free(a), free(b), free(c2), free(lg), free(q);
    cudaFree(dl), cudaFree(dids), cudaFree(dctr);
}

static void test_samples(void) {
    test_sample(1000, g_small ? 2048 : 16384, 0.7f, 0.8f);
    test_sample(997, g_small ? 1024 : 8192, 1.0f, 1.0f);
    test_sample(500, 256, 1.0f, 1e-6f); /* only the most probable token */
    if (!g_small) test_sample(51200, 4096, 1.0f, 0.9f);
}

/* ---- chains: programmatic dependent launch ----------------------------------------------- */

/* A decoder-like chain of ops issued back to back with no host sync (LN,
 * qkv, rope + cache write, attention, proj += , fc1 + gelu, fc2 +=, for
 * several layers), run with programmatic dependent launch and without: the
 * results must agree bit for bit (every kernel is deterministic), so a
 * kernel touching memory before its predecessor finished would show. T = 1
 * runs the GEMV and decode attention; T = 20 mixes cuBLASLt and flash. */
static void test_chain(int T) {
    const int C = 256, H = 4, D = 64, R = 32, F = 512, NL = 3, n_ctx = 96, pos0 = 40;
    float *hx = (float *)malloc((size_t)T * C * 4);
    for (int i = 0; i < T * C; i++) hx[i] = rnd(-1, 1);
    size_t cache_n = (size_t)NL * H * n_ctx * D;
    uint16_t *hkv = (uint16_t *)malloc(cache_n * 2);
    for (size_t i = 0; i < cache_n; i++) hkv[i] = f32_to_bf16(rnd(-1, 1));
    /* weights: per layer ln g/b, qkv, proj, fc1, fc2 (bf16), biases f32 */
    size_t wn = (size_t)NL * (3 * C * C + C * C + F * C + C * F);
    uint16_t *hw = (uint16_t *)malloc(wn * 2);
    for (size_t i = 0; i < wn; i++) hw[i] = f32_to_bf16(rnd(-0.1f, 0.1f));
    const int BL = 7 * C + F; /* per layer: qkv, proj, fc1, fc2 biases, LN g, LN b */
    float *hb = (float *)malloc((size_t)NL * BL * 4);
    for (int i = 0; i < NL * BL; i++) hb[i] = rnd(-0.2f, 0.2f);
    float *cs, *sn;
    rope_tables(n_ctx, R, &cs, &sn);
    void *dx, *dh, *dqkv, *datt, *df, *dk, *dv, *dw, *db, *dcs, *dsn;
    cudaMalloc(&dx, (size_t)T * C * 4), cudaMalloc(&dh, (size_t)T * C * 2);
    cudaMalloc(&dqkv, (size_t)T * 3 * C * 2), cudaMalloc(&datt, (size_t)T * C * 2);
    cudaMalloc(&df, (size_t)T * F * 2), cudaMalloc(&dk, cache_n * 2), cudaMalloc(&dv, cache_n * 2);
    cudaMalloc(&dw, wn * 2), cudaMalloc(&db, (size_t)NL * BL * 4);
    cudaMalloc(&dcs, (size_t)n_ctx * R / 2 * 4), cudaMalloc(&dsn, (size_t)n_ctx * R / 2 * 4);
    cudaMemcpy(dw, hw, wn * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(db, hb, (size_t)NL * BL * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dcs, cs, (size_t)n_ctx * R / 2 * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dsn, sn, (size_t)n_ctx * R / 2 * 4, cudaMemcpyHostToDevice);
    float *out[2];
    uint16_t *kout[2];
    albedo_status st = ALBEDO_OK;
    for (int run = 0; run < 2; run++) {
        cuda_ctx_set_pdl(G, run == 0);
        cudaMemcpy(dx, hx, (size_t)T * C * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(dk, hkv, cache_n * 2, cudaMemcpyHostToDevice);
        cudaMemcpy(dv, hkv, cache_n * 2, cudaMemcpyHostToDevice);
        for (int rep = 0; rep < 4 && st == ALBEDO_OK; rep++) /* the cache rows are rewritten alike */
            for (int l = 0; l < NL && st == ALBEDO_OK; l++) {
                const uint16_t *wl = (const uint16_t *)dw + (size_t)l * (3 * C * C + C * C + F * C + C * F);
                const float *bl = (const float *)db + (size_t)l * BL;
                cuda_linear_w qkv = {wl, bl, DT_F32, 3 * C, C};
                cuda_linear_w proj = {wl + 3 * C * C, bl + 3 * C, DT_F32, C, C};
                cuda_linear_w fc1 = {wl + 4 * C * C, bl + 4 * C, DT_F32, F, C};
                cuda_linear_w fc2 = {wl + 4 * C * C + F * C, bl + 4 * C + F, DT_F32, C, F};
                const float *lng = bl + 5 * C + F, *lnb = bl + 6 * C + F;
                uint16_t *kl = (uint16_t *)dk + (size_t)l * H * n_ctx * D,
                         *vl = (uint16_t *)dv + (size_t)l * H * n_ctx * D;
                st = cuda_layernorm(G, dh, DT_BF16, dx, DT_F32, T, C, lng, lnb, DT_F32, 1e-5f);
                if (st == ALBEDO_OK)
                    st = cuda_linear(G, dqkv, DT_BF16, 3 * C, (const uint16_t *)dh, C, T, &qkv, CUDA_ACT_NONE, 0);
                cuda_rope r;
                memset(&r, 0, sizeof r);
                r.x = (uint16_t *)dqkv, r.ldx = 3 * C, r.T = T, r.H = H, r.Hkv = H, r.D = D, r.R = R, r.pos0 = pos0;
                r.cos_t = (const float *)dcs, r.sin_t = (const float *)dsn, r.k_cache = kl, r.v_cache = vl,
                r.n_ctx = n_ctx;
                if (st == ALBEDO_OK) st = cuda_rope_kv(G, &r);
                cuda_attn a;
                memset(&a, 0, sizeof a);
                a.T = T, a.S = pos0 + T, a.H = H, a.Hkv = H, a.D = D, a.pos0 = pos0, a.n_prefix = 30;
                a.scale = 0.125f, a.n_seq = 1, a.q = (const uint16_t *)dqkv, a.ldq = 3 * C;
                a.k = kl, a.ldk = D, a.k_head = (long)n_ctx * D, a.v = vl, a.ldv = D, a.v_head = (long)n_ctx * D;
                a.out = (uint16_t *)datt, a.ldo = C;
                if (st == ALBEDO_OK) st = cuda_attention(G, &a);
                if (st == ALBEDO_OK)
                    st = cuda_linear(G, dx, DT_F32, C, (const uint16_t *)datt, C, T, &proj, CUDA_ACT_NONE, 1);
                if (st == ALBEDO_OK)
                    st = cuda_linear(G, df, DT_BF16, F, (const uint16_t *)dh, C, T, &fc1, CUDA_ACT_GELU_TANH, 0);
                if (st == ALBEDO_OK)
                    st = cuda_linear(G, dx, DT_F32, C, (const uint16_t *)df, F, T, &fc2, CUDA_ACT_NONE, 1);
            }
        out[run] = (float *)malloc((size_t)T * C * 4);
        kout[run] = (uint16_t *)malloc(cache_n * 2);
        cudaDeviceSynchronize();
        cudaMemcpy(out[run], dx, (size_t)T * C * 4, cudaMemcpyDeviceToHost);
        cudaMemcpy(kout[run], dk, cache_n * 2, cudaMemcpyDeviceToHost);
    }
    cuda_ctx_set_pdl(G, 1);
    check_st(st, "chain");
    long nonfinite = 0;
    for (int i = 0; i < T * C; i++) nonfinite += !isfinite(out[0][i]);
    int same = memcmp(out[0], out[1], (size_t)T * C * 4) == 0 && memcmp(kout[0], kout[1], cache_n * 2) == 0;
    printf("%-4s chain of %d layers x 4, T=%d: PDL on == PDL off bit for bit: %s, non-finite %ld\n",
           same && !nonfinite ? "ok" : "FAIL", NL, T, same ? "yes" : "NO", nonfinite);
    CHECK(same, "chain T=%d: PDL on and off agree bit for bit", T);
    CHECK(nonfinite == 0, "chain T=%d: finite", T);
    for (int r = 0; r < 2; r++) free(out[r]), free(kout[r]);
    free(hx), free(hkv), free(hw), free(hb), free(cs), free(sn);
    cudaFree(dx), cudaFree(dh), cudaFree(dqkv), cudaFree(datt), cudaFree(df), cudaFree(dk), cudaFree(dv);
    cudaFree(dw), cudaFree(db), cudaFree(dcs), cudaFree(dsn);
}

/* ------------------------------------------------------------------------------------------- */

/* ==== Moondream 3: tau attention and the experts (moe.cu) ===================================== */

static int pad8i(int v) { return (v + 7) / 8 * 8; }

/* gelu_erf over strided bf16 rows (tau's features). */
static void test_gelu_rows(int T, int C) {
    const int ldx = C + 5, ldy = C + 3;
    buf x = buf_new(DT_BF16, (size_t)T * ldx), y = buf_new(DT_BF16, (size_t)T * ldy);
    float *xf = fill(&x, T, C, ldx, -4, 4);
    up(&x), up(&y);
    char what[160];
    snprintf(what, sizeof what, "md3 gelu_erf rows T=%d C=%d ldx=%d ldy=%d", T, C, ldx, ldy);
    albedo_status st = cuda_gelu_erf_rows(G, (uint16_t *)dp(&y), ldy, (const uint16_t *)dp(&x), ldx, T, C);
    check_st(st, what);
    if (down(&y) == 0 && st == ALBEDO_OK) {
        float *ref = (float *)malloc((size_t)T * C * sizeof *ref);
        for (int t = 0; t < T; t++)
            for (int c = 0; c < C; c++) {
                const double v = xf[(size_t)t * ldx + c];
                ref[(size_t)t * C + c] = (float)(0.5 * v * (1.0 + erf(v / sqrt(2.0))));
            }
        cmp cm = compare(&y, T, C, ldy, ref, C);
        report(what, &cm, 1e-2);
        free(ref);
    }
    free(xf);
    buf_free(&x), buf_free(&y);
}

/* Tau's scores for decode rows, the features on the fly: against float32
 * sums of bf16(gelu_erf(x))·w in double. */
static void test_tau_scores(int T, int C, int R) {
    const int ldq = C + 8, lds = R + 3;
    buf q = buf_new(DT_BF16, (size_t)T * ldq), w = buf_new(DT_BF16, (size_t)R * C),
        sc = buf_new(DT_F32, (size_t)T * lds);
    float *qf = fill(&q, T, C, ldq, -3, 3);
    const float a = 1.7f / sqrtf((float)C);
    float *wf = fill(&w, R, C, C, -a, a);
    up(&q), up(&w), up(&sc);
    char what[160];
    snprintf(what, sizeof what, "md3 tau scores T=%d C=%d rows=%d", T, C, R);
    albedo_status st =
        cuda_tau_scores(G, (float *)dp(&sc), lds, (const uint16_t *)dp(&q), ldq, T, C, (const uint16_t *)dp(&w), R);
    check_st(st, what);
    if (down(&sc) == 0 && st == ALBEDO_OK) {
        float *ref = (float *)malloc((size_t)T * R * sizeof *ref);
        for (int t = 0; t < T; t++)
            for (int r = 0; r < R; r++) {
                double acc = 0;
                for (int c = 0; c < C; c++) {
                    const float v = qf[(size_t)t * ldq + c];
                    const float g = bf16_to_f32(f32_to_bf16(0.5f * v * (1.0f + erff(v * 0.7071067811865476f))));
                    acc += (double)g * wf[(size_t)r * C + c];
                }
                ref[(size_t)t * R + r] = (float)acc;
            }
        cmp cm = compare(&sc, T, R, lds, ref, R);
        report(what, &cm, 1e-4);
        free(ref);
    }
    free(qf), free(wf);
    buf_free(&q), buf_free(&w), buf_free(&sc);
}

/* Tau's scaling of q and v in a fused qkv row (keys untouched), with the
 * position from the host or the device (dyn 1), or each row's own from a
 * device array of (position, pool row) pairs (dyn 2: the engine's paged
 * steps, random positions below pos0), exact or bf16-rounded positions. */
static void test_tau(int T, int H, int D, int pos0, int dyn, int pos_bf16) {
    const int W = 3 * H * D, ldq = W + 8, lds = 2 * H + 3;
    buf q = buf_new(DT_BF16, (size_t)T * ldq), sc = buf_new(DT_F32, (size_t)T * lds), al = buf_new(DT_F32, H);
    float *qf = fill(&q, T, W, ldq, -2, 2);
    float *sf = fill(&sc, T, 2 * H, lds, -3, 3);
    float *af = fill(&al, 1, H, H, -1.5f, 1.5f);
    up(&q), up(&sc), up(&al);
    int *pd = dyn == 1 ? dev_int(pos0) : NULL;
    int32_t *prow = (int32_t *)malloc((size_t)T * 2 * sizeof *prow);
    for (int t = 0; t < T; t++) {
        prow[2 * t] = dyn == 2 ? (int)(rng_next() % (uint64_t)pos0) : pos0 + t;
        prow[2 * t + 1] = -7; /* the pool row: not a position */
    }
    int32_t *drow = dyn == 2 ? dev_ints(prow, (size_t)T * 2) : NULL;
    cuda_tau a;
    memset(&a, 0, sizeof a);
    a.qkv = (uint16_t *)dp(&q), a.ldq = ldq, a.voff = 2 * H * D, a.T = T, a.H = H, a.D = D;
    a.scores = (const float *)dp(&sc), a.lds = lds, a.alpha = (const float *)dp(&al);
    a.pos0 = dyn ? 0 : pos0, a.pos_dev = pd, a.pos_bf16 = pos_bf16;
    a.pos_rows = drow, a.pos_stride = 2;
    char what[160];
    snprintf(what, sizeof what, "md3 tau T=%d H=%d D=%d pos0=%d%s%s", T, H, D, pos0,
             dyn == 1   ? " (device pos)"
             : dyn == 2 ? " (positions per row)"
                        : "",
             pos_bf16 ? " bf16 pos" : "");
    albedo_status st = cuda_tau_scale(G, &a);
    check_st(st, what);
    if (down(&q) == 0 && st == ALBEDO_OK) {
        float *ref = (float *)malloc((size_t)T * W * sizeof *ref);
        long kdiff = 0;
        for (int t = 0; t < T; t++) {
            double p = prow[2 * t], lp;
            if (pos_bf16) {
                float x = bf16_to_f32(f32_to_bf16((float)p));
                x = bf16_to_f32(f32_to_bf16(x + 1.0f));
                lp = bf16_to_f32(f32_to_bf16(logf(x)));
            } else {
                lp = log(p + 1.0);
            }
            for (int c = 0; c < W; c++) {
                const double v = qf[(size_t)t * ldq + c];
                const int part = c / (H * D), h = (c % (H * D)) / D;
                double s = 1.0;
                if (part != 1) {
                    const double tp = 1.0 + (1.0 / (1.0 + exp(-(af[h] * lp))) - 0.5);
                    s = tanh(sf[(size_t)t * lds + (part == 0 ? h : H + h)]) + tp;
                } else {
                    kdiff += bget(&q, (long)t * ldq + c) != (float)v;
                }
                ref[(size_t)t * W + c] = (float)(v * s);
            }
        }
        cmp cm = compare(&q, T, W, ldq, ref, W);
        report(what, &cm, 1e-2);
        CHECK(kdiff == 0, "%s: %ld key elements changed", what, kdiff);
        free(ref);
    }
    cudaFree(pd);
    cudaFree(drow);
    free(prow);
    free(qf), free(sf), free(af);
    buf_free(&q), buf_free(&sc), buf_free(&al);
}

/* text.c's rule: the k largest by value, ties to the lower index, in
 * descending order; softmax over them in float32. */
static void host_route(const float *l, int E, int K, int32_t *sel, float *w) {
    int n = 0;
    for (int e = 0; e < E; e++) {
        int j;
        if (n < K) {
            j = n++;
        } else {
            if (!(l[e] > l[sel[K - 1]])) continue;
            j = K - 1;
        }
        while (j > 0 && l[e] > l[sel[j - 1]]) {
            sel[j] = sel[j - 1];
            j--;
        }
        sel[j] = e;
    }
    float sum = 0.0f;
    for (int k = 0; k < K; k++) sum += w[k] = expf(l[sel[k]] - l[sel[0]]);
    for (int k = 0; k < K; k++) w[k] /= sum;
}

/* ties: logits from a handful of values (many equal ones); nan: some NaN
 * logits, which must never be chosen while K numbers remain. */
static void test_route(int T, int E, int K, int ties, int nan) {
    const long ldl = E + 3;
    float *lg = (float *)malloc((size_t)T * ldl * sizeof *lg);
    for (long i = 0; i < (long)T * ldl; i++) {
        float v = rnd(-4, 4);
        if (ties) v = floorf(v) * 0.5f;
        if (nan && (i % 7) == 3) v = NAN;
        lg[i] = v;
    }
    float *dl, *dw;
    int32_t *ds;
    cudaMalloc((void **)&dl, (size_t)T * ldl * 4), cudaMalloc((void **)&ds, (size_t)T * K * 4);
    cudaMalloc((void **)&dw, (size_t)T * K * 4);
    cudaMemcpy(dl, lg, (size_t)T * ldl * 4, cudaMemcpyHostToDevice);
    cudaMemset(ds, 0xff, (size_t)T * K * 4), cudaMemset(dw, 0xff, (size_t)T * K * 4);
    cudaDeviceSynchronize();
    char what[160];
    snprintf(what, sizeof what, "md3 route T=%d E=%d K=%d%s%s", T, E, K, ties ? " ties" : "", nan ? " NaN" : "");
    albedo_status st = cuda_moe_route(G, ds, dw, dl, ldl, T, E, K);
    check_st(st, what);
    cudaDeviceSynchronize();
    int32_t *gs = (int32_t *)malloc((size_t)T * K * 4), rs[CUDA_MOE_MAX_K];
    float *gw = (float *)malloc((size_t)T * K * 4), rw[CUDA_MOE_MAX_K];
    cudaMemcpy(gs, ds, (size_t)T * K * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(gw, dw, (size_t)T * K * 4, cudaMemcpyDeviceToHost);
    long bad_sel = 0, bad_nan = 0;
    double worst_w = 0;
    for (int t = 0; t < T; t++) {
        const float *l = lg + (size_t)t * ldl;
        if (nan) {
            for (int k = 0; k < K; k++)
                bad_nan += gs[t * K + k] < 0 || gs[t * K + k] >= E || l[gs[t * K + k]] != l[gs[t * K + k]];
            /* the numbers among the logits, by the same rule */
            float *l2 = (float *)malloc((size_t)E * sizeof *l2);
            for (int e = 0; e < E; e++) l2[e] = l[e] == l[e] ? l[e] : -INFINITY;
            host_route(l2, E, K, rs, rw);
            free(l2);
        } else {
            host_route(l, E, K, rs, rw);
        }
        for (int k = 0; k < K; k++) {
            bad_sel += gs[t * K + k] != rs[k];
            const double d = fabs((double)gw[t * K + k] - rw[k]);
            if (!(d <= worst_w)) worst_w = d;
        }
    }
    const int ok = st == ALBEDO_OK && bad_sel == 0 && bad_nan == 0 && worst_w <= 1e-6;
    printf("%-4s %-58s selections off %ld, NaN chosen %ld, weights max abs %.1e\n", ok ? "ok" : "FAIL", what, bad_sel,
           bad_nan, worst_w);
    CHECK(ok, "%s", what);
    free(lg), free(gs), free(gw);
    cudaFree(dl), cudaFree(ds), cudaFree(dw);
}

/* The expert MLP (x += Σ_k w·expert(h)) against a double-precision
 * reference on the same bf16 values, with act rounded to bf16 as the GPU
 * keeps it. Distinct random experts per token (or skewed towards expert 0
 * so that one expert gets several 64-row tiles); path 0 auto, 1 GEMVs, 2
 * grouped. */
/* Per-row e4m3 quantisation on the host, as cuda_quant_e4m3_rows defines it
 * (the same float operations): row r of w [n_rows, ld] (cols values) → q
 * [n_rows, ldq] bytes (padding zeros) and scale [n_rows]. */
static void host_quant_rows(const float *w, int ld, long n_rows, int cols, uint8_t *q, int ldq, float *scale) {
    for (long r = 0; r < n_rows; r++) {
        float m = 0.0f;
        for (int c = 0; c < cols; c++) m = fmaxf(m, fabsf(w[r * ld + c]));
        const float inv = m > 0.0f ? 448.0f / m : 1.0f;
        scale[r] = m > 0.0f ? m / 448.0f : 1.0f;
        for (int c = 0; c < ldq; c++) q[r * ldq + c] = c < cols ? f_to_e4m3(w[r * ld + c] * inv) : 0;
    }
}

/* cuda_quant_e4m3_rows against the host's: every byte and scale equal, the
 * padding zeros, the guards intact; and the round trip q·scale within e4m3's
 * rounding of each weight (2^-4 relative, 2^-10·scale absolute near zero). */
static void test_quant_e4m3(long n_rows, int cols, int ldw, int ldq) {
    buf w = buf_new(DT_BF16, (size_t)n_rows * ldw), q = buf_new(DT_U8, (size_t)n_rows * ldq);
    buf sc = buf_new(DT_F32, (size_t)n_rows);
    float *wf = fill(&w, (int)n_rows, cols, ldw, -3, 3);
    for (int c = 0; c < cols; c++) { /* a row of zeros, a row of tiny values, a row with one large value */
        bset(&w, c, 0.0f), wf[c] = 0.0f;
        if (n_rows > 2) {
            bset(&w, (long)ldw + c, rnd(-1e-6f, 1e-6f)), wf[ldw + c] = bget(&w, (long)ldw + c);
            bset(&w, 2L * ldw + c, c == cols / 2 ? 900.0f : rnd(-0.01f, 0.01f));
            wf[2 * ldw + c] = bget(&w, 2L * ldw + c);
        }
    }
    up(&w), up(&q), up(&sc);
    albedo_status st =
        cuda_quant_e4m3_rows(G, (uint8_t *)dp(&q), ldq, (float *)dp(&sc), (const uint16_t *)dp(&w), ldw, n_rows, cols);
    char what[128];
    snprintf(what, sizeof what, "e4m3 rows %ld x %d (ldw %d, ldq %d)", n_rows, cols, ldw, ldq);
    check_st(st, what);
    if (st == ALBEDO_OK && down(&q) == 0 && down(&sc) == 0) {
        uint8_t *hq = (uint8_t *)malloc((size_t)n_rows * ldq);
        float *hs = (float *)malloc((size_t)n_rows * sizeof(float));
        host_quant_rows(wf, ldw, n_rows, cols, hq, ldq, hs);
        long bad_q = 0, bad_s = 0, bad_rt = 0, damaged = 0;
        for (long r = 0; r < n_rows; r++) {
            float gs;
            memcpy(&gs, sc.h + (size_t)(r + GUARD) * 4, 4);
            bad_s += memcmp(&gs, &hs[r], 4) != 0;
            for (int c = 0; c < ldq; c++) {
                const uint8_t g = q.h[(size_t)(r * ldq + c + GUARD)];
                bad_q += g != hq[r * ldq + c];
                if (c < cols) {
                    const double v = (double)e4m3_to_f(g) * gs, x = wf[r * ldw + c];
                    bad_rt += fabs(v - x) > fmax(fabs(x) * 0.0625, 0.0009765625 * gs * 1.0001);
                }
            }
        }
        for (long i = 1; i <= GUARD; i++) damaged += !bpoison(&q, -i) + !bpoison(&sc, -i);
        for (long i = 0; i < GUARD; i++) damaged += !bpoison(&q, n_rows * ldq + i) + !bpoison(&sc, n_rows + i);
        const int ok = !bad_q && !bad_s && !bad_rt && !damaged;
        printf("%-4s %-58s bytes %ld, scales %ld, round trip %ld off; damaged %ld\n", ok ? "ok" : "FAIL", what, bad_q,
               bad_s, bad_rt, damaged);
        CHECK(ok, "%s", what);
        free(hq), free(hs);
    }
    free(wf);
    buf_free(&w), buf_free(&q), buf_free(&sc);
}

/* A float array on the device. */
static float *dev_floats(const float *v, size_t n) {
    float *d = NULL;
    if (cudaMalloc((void **)&d, n * sizeof(float)) != cudaSuccess ||
        cudaMemcpy(d, v, n * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess)
        abort();
    return d;
}

/* f8: the experts as e4m3 with row scales (cuda_moe.q1/q2, quantised on the
 * host as cuda_quant_e4m3_rows does), the reference on the same quantised
 * values (e4m3 · scale, in double). */
static void test_moe(int T, int E, int K, int dim, int I, int path, int skew, int gemm = 0, int f8 = 0) {
    const int ld1 = pad8i(dim), Ip = pad8i(I), ld2 = Ip + 8, ldh = ld1 + 8, ldx = dim + 3;
    buf h = buf_new(DT_BF16, (size_t)T * ldh), w1 = buf_new(DT_BF16, (size_t)E * 2 * I * ld1);
    buf w2 = buf_new(DT_BF16, (size_t)E * dim * ld2), x = buf_new(DT_F32, (size_t)T * ldx);
    const float s1 = 1.0f / sqrtf((float)dim), s2 = 1.0f / sqrtf((float)I);
    float *hf = fill(&h, T, dim, ldh, -2, 2);
    float *w1f = fill(&w1, E * 2 * I, dim, ld1, -s1 * 1.7f, s1 * 1.7f);
    float *w2f = fill(&w2, E * dim, I, ld2, -s2 * 1.7f, s2 * 1.7f);
    float *x0 = fill(&x, T, dim, ldx, -1, 1);
    /* the zero columns the contract asks for (h and W1 up to ld1, W2 up to Ip) */
    for (int t = 0; t < T; t++)
        for (int c = dim; c < ld1; c++) bset(&h, (long)t * ldh + c, 0.0f);
    for (long r = 0; r < (long)E * 2 * I; r++)
        for (int c = dim; c < ld1; c++) bset(&w1, r * ld1 + c, 0.0f);
    for (long r = 0; r < (long)E * dim; r++)
        for (int c = I; c < Ip; c++) bset(&w2, r * ld2 + c, 0.0f);
    up(&h), up(&w1), up(&w2), up(&x);
    /* f8: ldq's a multiple of 16 past the padding (a stride wider than the rows) */
    const int ldq1 = (dim + 15) / 16 * 16 + 16, ldq2 = (I + 15) / 16 * 16;
    const long r1 = (long)E * 2 * I, r2 = (long)E * dim;
    buf q1 = buf_new(DT_U8, f8 ? (size_t)r1 * ldq1 : 1), q2 = buf_new(DT_U8, f8 ? (size_t)r2 * ldq2 : 1);
    float *sc1 = NULL, *sc2 = NULL, *dsc1 = NULL, *dsc2 = NULL;
    if (f8) {
        sc1 = (float *)malloc((size_t)r1 * sizeof(float)), sc2 = (float *)malloc((size_t)r2 * sizeof(float));
        uint8_t *hq1 = (uint8_t *)malloc((size_t)r1 * ldq1), *hq2 = (uint8_t *)malloc((size_t)r2 * ldq2);
        host_quant_rows(w1f, ld1, r1, dim, hq1, ldq1, sc1);
        host_quant_rows(w2f, ld2, r2, I, hq2, ldq2, sc2);
        memcpy(q1.h + GUARD, hq1, (size_t)r1 * ldq1), memcpy(q2.h + GUARD, hq2, (size_t)r2 * ldq2);
        for (long r = 0; r < r1; r++) /* the reference reads the quantised weights */
            for (int c = 0; c < dim; c++) w1f[r * ld1 + c] = (float)((double)e4m3_to_f(hq1[r * ldq1 + c]) * sc1[r]);
        for (long r = 0; r < r2; r++)
            for (int c = 0; c < I; c++) w2f[r * ld2 + c] = (float)((double)e4m3_to_f(hq2[r * ldq2 + c]) * sc2[r]);
        up(&q1), up(&q2);
        dsc1 = dev_floats(sc1, (size_t)r1), dsc2 = dev_floats(sc2, (size_t)r2);
        free(hq1), free(hq2);
    }
    int32_t *sel = (int32_t *)malloc((size_t)T * K * 4);
    float *wt = (float *)malloc((size_t)T * K * 4);
    for (int t = 0; t < T; t++) {
        float sum = 0;
        for (int k = 0; k < K; k++) {
            int e, dup;
            do {
                e = skew && rnd(0, 1) < 0.7f ? (int)(rnd(0, 1) * 2) % E : (int)(rnd(0, 1) * E) % E;
                dup = 0;
                for (int j = 0; j < k; j++) dup |= sel[t * K + j] == e;
            } while (dup);
            sel[t * K + k] = e;
            sum += wt[t * K + k] = rnd(0.1f, 1.0f);
        }
        for (int k = 0; k < K; k++) wt[t * K + k] /= sum;
    }
    int32_t *dsel;
    float *dwt;
    void *scr;
    const size_t sb = cuda_moe_scratch_bytes(T, E, K, dim, I);
    cudaMalloc((void **)&dsel, (size_t)T * K * 4), cudaMalloc((void **)&dwt, (size_t)T * K * 4);
    cudaMalloc(&scr, sb);
    cudaMemset(scr, 0xff, sb); /* the op must not rely on zeroed scratch */
    cudaMemcpy(dsel, sel, (size_t)T * K * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(dwt, wt, (size_t)T * K * 4, cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
    cuda_moe m;
    memset(&m, 0, sizeof m);
    m.T = T, m.E = E, m.K = K, m.dim = dim, m.inner = I;
    m.w1 = (const uint16_t *)dp(&w1), m.ld1 = ld1, m.w2 = (const uint16_t *)dp(&w2), m.ld2 = ld2;
    m.h = (const uint16_t *)dp(&h), m.ldh = ldh, m.sel = dsel, m.wt = dwt, m.x = (float *)dp(&x), m.ldx = ldx;
    m.scratch = scr, m.path = path, m.gemm = gemm;
    if (f8) {
        m.w1 = m.w2 = NULL, m.ld1 = m.ld2 = 0;
        m.q1 = (const uint8_t *)dp(&q1), m.ldq1 = ldq1, m.q2 = (const uint8_t *)dp(&q2), m.ldq2 = ldq2;
        m.s1 = dsc1, m.s2 = dsc2;
    }
    char what[160];
    snprintf(what, sizeof what, "md3 experts%s T=%d E=%d K=%d dim=%d I=%d %s%s gemm %d", f8 ? " fp8" : "", T, E, K, dim,
             I,
             path == 1   ? "gemv"
             : path == 2 ? "grouped"
                         : "auto",
             skew ? " skewed" : "", gemm);
    albedo_status st = cuda_moe_mlp(G, &m);
    check_st(st, what);
    if (down(&x) == 0 && st == ALBEDO_OK) {
        float *ref = (float *)malloc((size_t)T * dim * sizeof *ref);
        double *y = (double *)malloc((size_t)dim * sizeof *y);
        float *act = (float *)malloc((size_t)I * sizeof *act);
        for (int t = 0; t < T; t++) {
            for (int n = 0; n < dim; n++) y[n] = x0[(size_t)t * ldx + n];
            for (int k = 0; k < K; k++) {
                const int e = sel[t * K + k];
                for (int j = 0; j < I; j++) {
                    double a = 0, g = 0;
                    const float *ra = w1f + ((size_t)e * 2 * I + j) * ld1, *rg = ra + (size_t)I * ld1;
                    for (int c = 0; c < dim; c++) {
                        a += (double)hf[(size_t)t * ldh + c] * ra[c];
                        g += (double)hf[(size_t)t * ldh + c] * rg[c];
                    }
                    act[j] = bf16_to_f32(f32_to_bf16((float)(0.5 * a * (1.0 + erf(a / sqrt(2.0))) * (g + 1.0))));
                }
                for (int n = 0; n < dim; n++) {
                    const float *r2 = w2f + ((size_t)e * dim + n) * ld2;
                    double s = 0;
                    for (int j = 0; j < I; j++) s += (double)act[j] * r2[j];
                    y[n] += wt[t * K + k] * s;
                }
            }
            for (int n = 0; n < dim; n++) ref[(size_t)t * dim + n] = (float)y[n];
        }
        cmp cm = compare(&x, T, dim, ldx, ref, dim);
        report(what, &cm, 1e-3);
        free(ref), free(y), free(act);
        /* .store (the decode steps' branch): x = Σ into a poisoned buffer,
         * every element written, the padding and guards left alone, and
         * x0 + Σ equal to the added form bit for bit. That needs the op to
         * give the same sums on every run: the added form is run again
         * first, and a second run that differs fails as such. */
        buf xr = buf_new(DT_F32, (size_t)T * ldx), xs = buf_new(DT_F32, (size_t)T * ldx);
        for (size_t i = 0; i < xr.n; i++) bset(&xr, (long)i, x0[i]);
        up(&xr), up(&xs);
        m.x = (float *)dp(&xr);
        albedo_status st2 = cuda_moe_mlp(G, &m);
        m.x = (float *)dp(&xs), m.store = 1;
        if (!st2) st2 = cuda_moe_mlp(G, &m);
        m.store = 0;
        char what_s[200];
        snprintf(what_s, sizeof what_s, "%s, stored", what);
        check_st(st2, what_s);
        if (down(&xr) == 0 && down(&xs) == 0 && st2 == ALBEDO_OK) {
            long diff = -1, bad = -1, damaged = 0;
            for (int t = 0; t < T; t++)
                for (int n = 0; n < dim; n++) {
                    const long i = (long)t * ldx + n;
                    const float a = bget(&x, i), a2 = bget(&xr, i), sum = x0[i] + bget(&xs, i);
                    if (diff < 0 && memcmp(&a, &a2, 4)) diff = i;
                    if (bad < 0 && memcmp(&sum, &a, 4)) bad = i;
                }
            for (int t = 0; t < T; t++)
                for (int n = dim; n < ldx; n++) damaged += !bpoison(&xs, (long)t * ldx + n);
            for (long g = 0; g < GUARD; g++) damaged += !bpoison(&xs, -1 - g) + !bpoison(&xs, (long)xs.n + g);
            /* Every path gives the same bits on every run, and x0 + the
             * stored sum equals the added form. (The e4m3 grouped GEMM on
             * mma.sync once moved in the last bits from run to run: the sort
             * placed an expert's rows in the order of atomics; it places them
             * in the assignments' order now. docs/CUDA.md, Open items
             * (Moondream 3), item 5.) */
            CHECK(diff < 0, "%s: two runs of the added form differ at %ld (%.9g, %.9g): not deterministic", what, diff,
                  diff >= 0 ? bget(&x, diff) : 0.0, diff >= 0 ? bget(&xr, diff) : 0.0);
            CHECK(diff >= 0 || bad < 0, "%s: x0 + the stored sum differs from the added form at %ld", what_s, bad);
            CHECK(damaged == 0, "%s: %ld padding or guard elements written", what_s, damaged);
        }
        buf_free(&xr);
        buf_free(&xs);
    }
    free(hf), free(w1f), free(w2f), free(x0), free(sel), free(wt), free(sc1), free(sc2);
    cudaFree(dsel), cudaFree(dwt), cudaFree(scr), cudaFree(dsc1), cudaFree(dsc2);
    buf_free(&h), buf_free(&w1), buf_free(&w2), buf_free(&x), buf_free(&q1), buf_free(&q2);
}

static void test_md3_ops(void) {
    test_gelu_rows(3, 384);
    test_gelu_rows(37, 6144);
    test_tau_scores(1, 6144, 64); /* Moondream 3's decode shape */
    test_tau_scores(4, 384, 4);
    test_tau_scores(3, 200, 7);
    test_tau(1, 32, 64, 740, 1, 0); /* the decode graph's form */
    test_tau(1, 32, 64, 740, 1, 1);
    test_tau(7, 2, 64, 0, 0, 1);
    test_tau(37, 3, 24, 300, 0, 0);
    test_tau(5, 3, 20, 9, 0, 1);     /* D % 8 != 0: element by element */
    test_tau(37, 4, 64, 5000, 2, 0); /* paged steps: every row its own position */
    test_tau(9, 3, 20, 3000, 2, 1);
    test_route(1, 64, 8, 0, 0);
    test_route(77, 64, 8, 1, 0);
    test_route(33, 13, 5, 1, 0);
    test_route(20, 64, 8, 0, 1);
    test_route(9, 16, 16, 1, 0); /* K = E */
    test_route(5, 300, 8, 1, 0); /* E > 256: the kernel that reads the logits each round */
    test_route(3, 300, 16, 0, 1);
    test_moe(1, 13, 3, 131, 40, 0, 0);
    test_moe(3, 13, 3, 131, 40, 1, 0);
    test_moe(3, 13, 3, 131, 40, 2, 0);
    test_moe(37, 13, 3, 131, 40, 0, 0);
    test_moe(37, 13, 3, 131, 40, 1, 0);
    for (int g = 1; g <= CUDA_MOE_GEMM_SHAPES; g++) { /* every tile shape; one expert with several tiles */
        test_moe(37, 13, 3, 131, 40, 2, 0, g);
        test_moe(300, 5, 2, 200, 72, 2, 1, g);
    }
    test_moe(5, 64, 8, 128, 40, 0, 0);    /* md3-small's shape */
    test_moe(1, 64, 8, 2048, 1024, 0, 0); /* Moondream 3's decode shape */
    if (!g_small) {
        test_moe(2, 64, 8, 2048, 1024, 2, 0);
        test_moe(30, 64, 8, 2048, 1024, 0, 1);
        test_moe(64, 64, 8, 2048, 1024, 2, 0, 4);
        test_moe(64, 64, 8, 2048, 1024, 2, 0, 5); /* the mma.sync tiles at full shape */
        test_moe(64, 64, 8, 2048, 1024, 2, 0, 7);
        test_moe(64, 64, 8, 2048, 1024, 2, 0, 8);
    }
    /* FP8 experts: the quantiser, then the GEMVs and every grouped tile shape
     * on the same odd sizes and several E/K, md3-small's and Moondream 3's
     * shapes */
    test_quant_e4m3(5, 131, 136, 144);
    test_quant_e4m3(300, 40, 40, 48);
    test_quant_e4m3(64 * 2 * 8, 2048, 2048, 2048);
    test_moe(1, 13, 3, 131, 40, 0, 0, 0, 1);
    test_moe(3, 13, 3, 131, 40, 1, 0, 0, 1);
    test_moe(4, 7, 7, 72, 24, 0, 0, 0, 1); /* K = E */
    for (int g = 1; g <= CUDA_MOE_GEMM_SHAPES; g++) {
        test_moe(37, 13, 3, 131, 40, 2, 0, g, 1);
        test_moe(300, 5, 2, 200, 72, 2, 1, g, 1);
        test_moe(90, 16, 16, 40, 136, 2, 0, g, 1); /* K = 16 */
    }
    test_moe(5, 64, 8, 128, 40, 0, 0, 0, 1);    /* md3-small's shape */
    test_moe(1, 64, 8, 2048, 1024, 0, 0, 0, 1); /* Moondream 3's decode shape */
    if (!g_small) {
        test_moe(4, 64, 8, 2048, 1024, 1, 0, 0, 1);
        test_moe(30, 64, 8, 2048, 1024, 0, 1, 0, 1);
        test_moe(64, 64, 8, 2048, 1024, 2, 0, 2, 1);
        test_moe(64, 64, 8, 2048, 1024, 2, 0, 4, 1);
        test_moe(64, 64, 8, 2048, 1024, 2, 0, 5, 1);
        test_moe(64, 64, 8, 2048, 1024, 2, 0, 7, 1);
        test_moe(64, 64, 8, 2048, 1024, 2, 0, 8, 1);
    }
    /* Bad arguments come back as statuses. */
    cuda_moe m;
    memset(&m, 0, sizeof m);
    m.T = 1, m.E = 20, m.K = 17, m.dim = 8, m.inner = 8, m.ld1 = 8, m.ld2 = 8, m.ldh = 8, m.ldx = 8;
    CHECK(cuda_moe_mlp(G, &m) == ALBEDO_ERR_INVALID_ARGUMENT, "md3 experts: K > 16 is refused");
    uint8_t *q8 = NULL;
    float *s8 = NULL;
    cudaMalloc((void **)&q8, 4096), cudaMalloc((void **)&s8, 4096);
    m.K = 2, m.q1 = m.q2 = q8, m.s1 = m.s2 = s8, m.ldq1 = 24, m.ldq2 = 16, m.scratch = s8, m.h = (const uint16_t *)q8;
    CHECK(cuda_moe_mlp(G, &m) == ALBEDO_ERR_INVALID_ARGUMENT, "md3 fp8 experts: ldq1 not a multiple of 16 is refused");
    m.ldq1 = 16, m.s2 = NULL;
    CHECK(cuda_moe_mlp(G, &m) == ALBEDO_ERR_INVALID_ARGUMENT, "md3 fp8 experts: no scales is refused");
    CHECK(cuda_quant_e4m3_rows(G, q8, 8, s8, (const uint16_t *)q8, 16, 4, 12) == ALBEDO_ERR_INVALID_ARGUMENT,
          "e4m3 rows: ldq < cols is refused");
    cudaFree(q8), cudaFree(s8);
    CHECK(cuda_moe_route(G, NULL, NULL, NULL, 4, 1, 4, 5) == ALBEDO_ERR_INVALID_ARGUMENT,
          "md3 route: K > E is refused");
}

/* Every kernel but Moondream 3's. */
static void test_kernels(void) {
    test_linears();

    const int lnC[] = {2048, 1151, 77, 4304};
    for (int i = 0; i < 4; i++) {
        if (g_small && lnC[i] > 2048) continue;
        test_layernorm(5, lnC[i], DT_F32, DT_BF16, DT_BF16, 0);
        test_layernorm(3, lnC[i], DT_F32, DT_F32, DT_F32, 0);
        test_layernorm(2, lnC[i], DT_BF16, DT_BF16, DT_F32, 0);
        test_layernorm(4, lnC[i], DT_BF16, DT_F32, DT_BF16, 0);
    }
    test_layernorm(3, 1151, DT_F32, DT_F32, DT_BF16, 1);
    /* Many rows: the warp-per-row kernel (from 2048 rows). */
    test_layernorm(2048, 1151, DT_F32, DT_BF16, DT_F32, 0);
    test_layernorm(2061, 77, DT_BF16, DT_BF16, DT_F32, 0);
    test_layernorm(2100, 1151, DT_F32, DT_F32, DT_F32, 1);
    test_layernorm(730, 2048, DT_F32, DT_F32, DT_BF16, 0); /* a prefix: still a block per row */
    test_layernorm_ld(2050, 588, DT_F32, DT_BF16);
    test_layernorm_ld(6, 588, DT_F32, DT_BF16);
    test_layernorm_ld(3, 1151, DT_F32, DT_F32);
    test_layernorm_ld(2, 77, DT_BF16, DT_BF16);

    const size_t n = g_small ? 10007 : 100003;
    for (int k = 0; k < 2; k++) {
        test_gelu(DT_F32, k, n);
        test_gelu(DT_BF16, k, n);
    }
    test_add(DT_F32, DT_F32, n);
    test_add(DT_F32, DT_BF16, n);
    test_add(DT_BF16, DT_F32, n);
    test_add(DT_BF16, DT_BF16, n);
    test_embed();

    test_rope(7, 4, 2, 64, 32, 11, 1);       /* prefill rows into the cache, GQA */
    test_rope(1, 32, 32, 64, 32, 740, 1);    /* Moondream decode shape */
    test_rope(5, 3, 1, 72, 32, 0, 0);        /* in place, keys too */
    test_rope(4, 5, 0, 64, 64, 3, 0);        /* ops.h rope: R = D */
    test_rope(1, 32, 32, 64, 32, 740, 1, 1); /* the decode graph's form: position on the device */
    test_rope(3, 4, 2, 64, 32, 11, 1, 1);
    test_rope(37, 32, 32, 64, 32, 0, 1); /* many rows: a prefix's shape */
    test_rope(9, 3, 3, 72, 40, 5, 1);    /* D - R unrotated dims copied into the cache */
    /* e4m3 caches */
    test_rope(7, 4, 2, 64, 32, 11, 1, 0, 1);
    test_rope(1, 32, 32, 64, 32, 740, 1, 1, 1);
    test_rope(37, 32, 32, 64, 32, 0, 1, 0, 1);
    test_rope(9, 3, 3, 72, 40, 5, 1, 0, 1);

    test_attentions();
    test_paged();
    test_argmax();
    test_samples();
    test_chain(1);
    test_chain(20);
}

int main(int argc, char **argv) {
    int only_md3 = 0;  /* --md3: Moondream 3's kernels alone (a quick sanitizer run) */
    int only_attn = 0; /* --attn: the attention kernels alone (likewise) */
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--small")) g_small = 1;
        if (!strcmp(argv[i], "--md3")) only_md3 = 1;
        if (!strcmp(argv[i], "--attn")) only_attn = 1;
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        printf("no CUDA device: skipped\n");
        return 77;
    }
    errbuf e;
    if (cuda_ctx_new(0, &G, &e) != ALBEDO_OK) {
        fprintf(stderr, "cuda_ctx_new: %s\n", e.msg);
        return 1;
    }
    if (ops_ctx_new("ref", 1, OPS_F32, &REF, &e) != ALBEDO_OK) {
        fprintf(stderr, "ops_ctx_new: %s\n", e.msg);
        return 1;
    }
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, 0);
    printf("device: %s (sm_%d%d, %d SMs)%s\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
           g_small ? ", small sizes" : "");

    if (only_attn) {
        test_attentions();
        test_paged();
        test_chain(20);
    } else {
        if (!only_md3) test_kernels();
        test_md3_ops();
    }

    cudaError_t le = cudaDeviceSynchronize();
    CHECK(le == cudaSuccess, "no asynchronous CUDA error (%s)", cudaGetErrorString(le));
    cuda_ctx_free(G);
    ops_ctx_free(REF);
    TEST_MAIN_END();
}
