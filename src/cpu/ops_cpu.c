/*
 * ops_cpu.c — the CPU backend's front: context creation, run-time choice of
 * the op table for this CPU, per-thread scratch; the drivers every fast
 * table shares (blocking, threading, masks: cpu.h, cpu_kernels); and the
 * portable kernels of the generic table used when no ISA-specific one
 * applies.
 *
 *   linear      T < small_t: W streamed once, N split in contiguous chunks
 *               per task (gemv); else W packed per task (at most 8 panels x
 *               one K block, in L2) and register tiles of x rows over the
 *               panels; tasks over N chunks (and row chunks when N is small).
 *               BF16 precision converts x once per call (bf16 pairs for
 *               dot-product kernels, else bf16-rounded floats). Block-format
 *               W: T < small_t, x quantised to int8 blocks for gemv_q; else,
 *               where the table has cpu_qgemm, x quantised to u8 per row
 *               and integer products over W packed as signed bytes
 *               (lin_qgemm), otherwise W dequantised while packing.
 *   attention   T = 1: one head per task, keys in place. T > 1: per (kv
 *               head, row chunk) Kᵀ and V packed once, q·Kᵀ and p·V through
 *               the gemm kernel, masked keys skipped panel by panel.
 *   others      rows or chunks split over threads above ~64 Ki elements.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdlib.h>

#include "cpu.h"

void *cpu_scratch(ops_ctx *c, int thread, size_t bytes) {
    if (bytes == 0) bytes = 64;
    if (c->scratch_len[thread] < bytes) {
        size_t want = (bytes + 4095) & ~(size_t)4095;
        void *p = NULL;
        if (posix_memalign(&p, 64, want)) {
            c->failed = 1;
            return NULL;
        }
        free(c->scratch[thread]);
        c->scratch[thread] = p;
        c->scratch_len[thread] = want;
    }
    return c->scratch[thread];
}

int ops_failed(ops_ctx *c) {
    int f = c->failed;
    c->failed = 0;
    return f;
}

const ops *ops_of(const ops_ctx *c) { return c->tab; }
int ops_n_threads(const ops_ctx *c) { return c->n_threads; }
int ops_default_threads(void) { return cpu_count(); }
const char *ops_backend_name(const ops_ctx *c) { return c->tab->name; }

typedef struct pf_arg {
    ops_task_fn fn;
    void *arg;
} pf_arg;

static void pf_tramp(void *p, int task, int thread) {
    (void)thread;
    pf_arg *a = p;
    a->fn(a->arg, task);
}

void ops_parallel_for(ops_ctx *c, int n, ops_task_fn fn, void *arg) {
    pf_arg a = {fn, arg};
    tp_run(c->tp, n, pf_tramp, &a);
}

albedo_status ops_ctx_new(const char *name, int n_threads, ops_precision prec, ops_ctx **out, errbuf *e) {
    *out = NULL;
    const ops *tab = NULL;
    if (!name || !*name || !strcmp(name, "auto")) {
        tab = ops_avx512_table();
        if (!tab) tab = ops_avx2_table();
        if (!tab) tab = ops_neon_table();
        if (!tab) tab = ops_generic_table();
    } else if (!strcmp(name, "ref")) {
        tab = ops_ref_table();
    } else if (!strcmp(name, "generic")) {
        tab = ops_generic_table();
    } else if (!strcmp(name, "avx512")) {
        tab = ops_avx512_table();
    } else if (!strcmp(name, "avx2")) {
        tab = ops_avx2_table();
    } else if (!strcmp(name, "neon")) {
        tab = ops_neon_table();
    } else {
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT,
                    "unknown backend '%s' (expected auto, ref, generic, avx2, avx512, neon)", name);
    }
    if (!tab) return errf(e, ALBEDO_ERR_UNSUPPORTED, "backend '%s' is not supported by this CPU or build", name);
    if (n_threads <= 0) n_threads = cpu_count();
    if (n_threads > 256) n_threads = 256;
    ops_ctx *c = calloc(1, sizeof *c);
    if (!c) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    c->tab = tab;
    c->prec = prec;
    c->tp = tp_new(n_threads);
    c->n_threads = c->tp ? tp_size(c->tp) : 0;
    c->scratch = calloc((size_t)(c->n_threads ? c->n_threads : 1), sizeof *c->scratch);
    c->scratch_len = calloc((size_t)(c->n_threads ? c->n_threads : 1), sizeof *c->scratch_len);
    if (!c->tp || !c->scratch || !c->scratch_len) {
        ops_ctx_free(c);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory creating %d threads", n_threads);
    }
    *out = c;
    return ALBEDO_OK;
}

void ops_ctx_free(ops_ctx *c) {
    if (!c) return;
    if (c->tp) tp_free(c->tp);
    for (int i = 0; c->scratch && i < c->n_threads; i++) free(c->scratch[i]);
    free(c->scratch);
    free(c->scratch_len);
    free(c);
}

/* ---- Drivers ------------------------------------------------------------------
 * Blocking, threading, masks and scratch for every driver-based table; the
 * arithmetic is in the table's kernels (cpu.h, cpu_kernels). */

static const cpu_kernels *kern_of(const ops_ctx *c) { return ((const cpu_table *)(const void *)c->tab)->k; }

#define MAX_THREADS 256 /* ops_ctx_new caps n_threads here */

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }
static int imin(int a, int b) { return a < b ? a : b; }
static int imax(int a, int b) { return a > b ? a : b; }
static int cdiv(int a, int b) { return (a + b - 1) / b; }

/* Scratch for a parallel op: `each` bytes per thread, and `shared` bytes that
 * all threads read, in front of thread 0's block. Taken by the calling thread
 * before the workers start, because cpu_scratch may free and replace a
 * buffer. Returns the shared block (or thread 0's when shared is 0), NULL on
 * out-of-memory (then c->failed is set). */
static char *scratch_all(ops_ctx *c, size_t shared, size_t each, char **sp) {
    shared = align64(shared);
    each = align64(each);
    char *base = cpu_scratch(c, 0, shared + each);
    if (!base) return NULL;
    sp[0] = base + shared;
    for (int i = 1; i < c->n_threads; i++) {
        sp[i] = each ? cpu_scratch(c, i, each) : NULL;
        if (each && !sp[i]) return NULL;
    }
    return base;
}

/* -- linear -- */

/* W is packed at most this many panels at a time per task, so that a task's
 * packed block (8 x 32 x kc floats = 256 KiB at kc 256) stays in L2 while the
 * rows of x go by. */
#define LIN_MAX_PANELS 8
/* Rows of x converted (to bf16 pairs or bf16-rounded floats) per pass, which
 * bounds the shared scratch: 1024 x 8192 x 4 bytes at most. */
#define LIN_T_PASS 1024
/* Below this many multiply-adds a linear runs on the calling thread alone:
 * waking the pool costs more. */
#define LIN_SERIAL_MACS 32768
/* Floats of a block-format row dequantised at a time (a multiple of 32). */
#define LIN_PACK_TMP 256

typedef struct lin_job {
    const cpu_kernels *k;
    const cpu_gemm *g;
    const op_linear *L;
    float *y;
    size_t ldy;
    const char *x; /* f32 elements or bf16 pairs, 4 bytes each */
    size_t ldx;    /* in elements */
    int T, K, Ke;  /* rows, K, elements along K (K or ceil(K/2)) */
    int pairs;
    int q;  /* W in a block format (ops.h qformat) */
    int qx; /* x quantised for k->gemv_q (ldx then counts 4-byte units) */
    /* gemm split */
    int n_panels, n_chunks, t_per, max_panels;
    /* gemv split */
    int n_per;
    char **sp;
    /* conversion of x */
    const float *xsrc;
    size_t ldxsrc;
    int rows_per;
} lin_job;

static size_t dt_bytes(dtype dt) { return dt == DT_F32 ? 4 : 2; }

/* ---- block formats (ops.h qformat): the portable pieces ------------------------ */

void cpu_quantize_x(const float *x, int K, void *dst) {
    const int nb = (K + 31) / 32;
    int8_t *q = dst;
    float *d = (float *)(void *)((char *)dst + (size_t)nb * 32);
    for (int b = 0; b < nb; b++) {
        const int k0 = b * 32, kn = imin(32, K - k0);
        float amax = 0.0f;
        for (int i = 0; i < kn; i++) amax = fmaxf(amax, fabsf(x[k0 + i]));
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < 32; i++) q[k0 + i] = i < kn ? (int8_t)lrintf(x[k0 + i] * id) : 0;
        d[b] = amax / 127.0f;
    }
}

void cpu_quantize_u8(const float *x, int K, int per_block, uint8_t *q, float *d) {
    const int nb = (K + 31) / 32;
    float rmax = 0.0f;
    if (!per_block)
        for (int k = 0; k < K; k++) rmax = fmaxf(rmax, fabsf(x[k]));
    for (int b = 0; b < nb; b++) {
        const int k0 = b * 32, kn = imin(32, K - k0);
        float amax = rmax;
        if (per_block) {
            amax = 0.0f;
            for (int i = 0; i < kn; i++) amax = fmaxf(amax, fabsf(x[k0 + i]));
        }
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < 32; i++) q[k0 + i] = (uint8_t)(128 + (i < kn ? (int)lrintf(x[k0 + i] * id) : 0));
        d[b] = amax / 127.0f;
    }
}

/* Panel of block-format rows for the float gemm kernels: dst[e][j] =
 * W[j][e0 + e] dequantised, for e < ec, j < nr (rows nrows..nr-1 zero). */
static void pack_q(float *dst, const char *w, dtype dt, size_t row_bytes, int nrows, int nr, int e0, int ec, int K) {
    const size_t bb = dt == DT_Q8 ? Q8_BLOCK_BYTES : Q4_BLOCK_BYTES;
    const int b0 = e0 / 32, b1 = (e0 + ec + 31) / 32, off = e0 - b0 * 32;
    float tmp[LIN_PACK_TMP];
    for (int j = 0; j < nr; j++) {
        if (j >= nrows) {
            for (int e = 0; e < ec; e++) dst[(size_t)e * nr + j] = 0.0f;
            continue;
        }
        /* blocks b0..b1-1 cover [e0, e0 + ec); dequantised in pieces */
        for (int bs = b0; bs < b1; bs += LIN_PACK_TMP / 32) {
            const int be = imin(b1, bs + LIN_PACK_TMP / 32);
            const int kn = imin(K, be * 32) - bs * 32;
            q_dequantize_row(dt, w + (size_t)j * row_bytes + (size_t)bs * bb, kn, tmp);
            for (int i = 0; i < kn; i++) {
                const int e = bs * 32 + i - b0 * 32 - off;
                if (e >= 0 && e < ec) dst[(size_t)e * nr + j] = tmp[i];
            }
        }
    }
}

/* The same into bf16 pairs (BF16 precision, cpu_gemm.pairs): dst[e][j] =
 * (w[j][2(e0+e)], w[j][2(e0+e)+1]), each dequantised value rounded to bf16
 * (ops.h: BF16 precision may round block-format weights), the half past K
 * zero. e0 is a multiple of 16 pairs, so element 2·e0 starts a block. */
static void pack_q_pairs(uint32_t *dst, const char *w, dtype dt, size_t row_bytes, int nrows, int nr, int e0, int ec,
                         int K) {
    const size_t bb = dt == DT_Q8 ? Q8_BLOCK_BYTES : Q4_BLOCK_BYTES;
    const int k0 = 2 * e0, k1 = imin(K, 2 * (e0 + ec));
    float tmp[LIN_PACK_TMP];
    for (int j = 0; j < nr; j++) {
        if (j >= nrows) {
            for (int e = 0; e < ec; e++) dst[(size_t)e * nr + j] = 0;
            continue;
        }
        for (int ks = k0; ks < k1; ks += LIN_PACK_TMP) {
            const int kn = imin(LIN_PACK_TMP, k1 - ks);
            q_dequantize_row(dt, w + (size_t)j * row_bytes + (size_t)(ks / 32) * bb, kn, tmp);
            for (int i = 0; i < kn; i += 2) {
                const uint32_t lo = f32_to_bf16(tmp[i]), hi = i + 1 < kn ? f32_to_bf16(tmp[i + 1]) : 0;
                dst[(size_t)((ks + i) / 2 - e0) * nr + j] = lo | hi << 16;
            }
        }
        for (int e = (k1 + 1) / 2 - e0; e < ec; e++) dst[(size_t)e * nr + j] = 0;
    }
}

/* Portable small-T path for block formats: W rows dequantised a piece at a
 * time (in L1), dotted with float x. */
static void gemv_q_float(int T, int K, const float *x, size_t ldx, const void *w, dtype dt, const void *b, dtype bdt,
                         int n0, int n1, float *y, size_t ldy) {
    const size_t rb = q_row_bytes(dt, K), bb = dt == DT_Q8 ? Q8_BLOCK_BYTES : Q4_BLOCK_BYTES;
    float wb[LIN_PACK_TMP];
    for (int n = n0; n < n1; n++) {
        const char *wr = (const char *)w + (size_t)n * rb;
        for (int t0 = 0; t0 < T; t0 += 4) {
            const int tn = imin(4, T - t0);
            float acc[4] = {0, 0, 0, 0};
            for (int k0 = 0; k0 < K; k0 += LIN_PACK_TMP) {
                const int kn = imin(LIN_PACK_TMP, K - k0);
                q_dequantize_row(dt, wr + (size_t)(k0 / 32) * bb, kn, wb);
                for (int t = 0; t < tn; t++) {
                    const float *xt = x + (size_t)(t0 + t) * ldx + k0;
                    float s = 0.0f;
                    for (int kk = 0; kk < kn; kk++) s += xt[kk] * wb[kk];
                    acc[t] += s;
                }
            }
            const float bn = b ? cpu_ld(b, bdt, (size_t)n) : 0.0f;
            for (int t = 0; t < tn; t++) y[(size_t)(t0 + t) * ldy + n] = acc[t] + bn;
        }
    }
}

/* The share of one task of a packed-panel product (lin_gemm_task,
 * qlin_task): task = chunk + n_chunks · group, where chunk c of n_chunks
 * takes panels [p0, p1) of n_panels (nr outputs each) and group g takes rows
 * [t0, t1), t_per rows a group. Returns 0 when the share is empty;
 * otherwise L's bias for those panels' outputs is staged as floats at bias
 * (kernels read one dtype), bias[0] being output p0·nr. */
static int gemm_task_share(int task, int n_chunks, int n_panels, int t_per, int T, const op_linear *L, int nr,
                           float *bias, int *p0, int *p1, int *t0, int *t1) {
    const int nc = task % n_chunks, tc = task / n_chunks;
    *p0 = (int)((long long)nc * n_panels / n_chunks);
    *p1 = (int)((long long)(nc + 1) * n_panels / n_chunks);
    *t0 = tc * t_per;
    *t1 = imin(T, *t0 + t_per);
    if (*p0 >= *p1 || *t0 >= *t1) return 0;
    if (L->b)
        for (int n = *p0 * nr; n < imin(*p1 * nr, L->n_out); n++) bias[n - *p0 * nr] = cpu_ld(L->b, L->bdt, (size_t)n);
    return 1;
}

static void lin_gemm_task(void *arg, int task, int thread) {
    const lin_job *j = arg;
    const cpu_gemm *g = j->g;
    const op_linear *L = j->L;
    const int nr = g->nr, N = L->n_out;
    char *wp = j->sp[thread];
    float *bias = (float *)(wp + (size_t)j->max_panels * nr * g->kc * 4);
    int p0, p1, t0, t1;
    if (!gemm_task_share(task, j->n_chunks, j->n_panels, j->t_per, j->T, L, nr, bias, &p0, &p1, &t0, &t1)) return;
    const size_t esz = j->q ? 0 : dt_bytes(L->dt), rb = j->q ? q_row_bytes(L->dt, j->K) : 0;
    for (int e0 = 0; e0 < j->Ke; e0 += g->kc) {
        const int ec = imin(g->kc, j->Ke - e0);
        const size_t panel_bytes = (size_t)ec * nr * 4;
        for (int p = p0; p < p1; p++) {
            const int n0 = p * nr;
            if (j->q && j->pairs)
                pack_q_pairs((uint32_t *)(void *)(wp + (p - p0) * panel_bytes), (const char *)L->w + (size_t)n0 * rb,
                             L->dt, rb, imin(nr, N - n0), nr, e0, ec, j->K);
            else if (j->q)
                pack_q((float *)(void *)(wp + (p - p0) * panel_bytes), (const char *)L->w + (size_t)n0 * rb, L->dt, rb,
                       imin(nr, N - n0), nr, e0, ec, j->K);
            else
                g->pack(wp + (p - p0) * panel_bytes, (const char *)L->w + (size_t)n0 * j->K * esz, L->dt, (size_t)j->K,
                        imin(nr, N - n0), e0, ec, j->K);
        }
        /* One register tile of x rows stays in L1 while it meets every panel
         * of the block, which streams from L2. */
        for (int t = t0; t < t1; t += g->mr) {
            const int m = imin(g->mr, t1 - t);
            const char *xt = j->x + ((size_t)t * j->ldx + (size_t)e0) * 4;
            for (int p = p0; p < p1; p++) {
                const int n0 = p * nr;
                g->kernel(m, ec, xt, j->ldx, wp + (p - p0) * panel_bytes, j->y + (size_t)t * j->ldy + n0, j->ldy,
                          imin(nr, N - n0), (e0 == 0 && L->b) ? bias + (n0 - p0 * nr) : NULL, e0 > 0);
            }
        }
    }
}

static void lin_gemv_task(void *arg, int task, int thread) {
    (void)thread;
    const lin_job *j = arg;
    const op_linear *L = j->L;
    const int n0 = task * j->n_per, n1 = imin(L->n_out, n0 + j->n_per);
    if (n0 >= n1) return;
    if (j->qx)
        j->k->gemv_q(j->T, j->K, j->x, j->ldx * 4, L->w, L->dt, L->b, L->bdt, n0, n1, j->y, j->ldy);
    else if (j->q)
        gemv_q_float(j->T, j->K, (const float *)(const void *)j->x, j->ldx, L->w, L->dt, L->b, L->bdt, n0, n1, j->y,
                     j->ldy);
    else if (j->pairs)
        j->k->gemv_pairs(j->T, j->K, (const uint32_t *)(const void *)j->x, j->ldx, L->w, L->b, L->bdt, n0, n1, j->y,
                         j->ldy);
    else
        j->k->gemv(j->T, j->K, (const float *)(const void *)j->x, j->ldx, L->w, L->dt, L->b, L->bdt, n0, n1, j->y,
                   j->ldy);
}

static void lin_convert_task(void *arg, int task, int thread) {
    (void)thread;
    const lin_job *j = arg;
    const int t0 = task * j->rows_per, t1 = imin(j->T, t0 + j->rows_per);
    for (int t = t0; t < t1; t++) {
        const float *src = j->xsrc + (size_t)t * j->ldxsrc;
        void *dst = (void *)(j->x + (size_t)t * j->ldx * 4);
        if (j->qx)
            cpu_quantize_x(src, j->K, dst);
        else if (j->pairs)
            j->k->to_pairs(dst, src, j->K);
        else
            j->k->round_bf16(dst, src, j->K);
    }
}

/* -- linear over block formats, integer products (cpu_qgemm) --
 * The same split as the float gemm (tasks over chunks of panels, and row
 * chunks when the panels are few); x is quantised once per pass into
 * shared scratch: rows of u8 (ldxq bytes) and their block scales (lddx
 * floats a row). */
typedef struct qlin_job {
    const cpu_qgemm *g;
    const op_linear *L;
    float *y;
    size_t ldy;
    uint8_t *xq;
    float *dx;
    size_t ldxq, lddx;
    const float *xsrc;
    size_t ldxsrc;
    int T, K, nb, rows_per;
    int n_panels, n_chunks, t_per, max_panels;
    char **sp;
} qlin_job;

static void qlin_convert_task(void *arg, int task, int thread) {
    (void)thread;
    const qlin_job *j = arg;
    const int t0 = task * j->rows_per, t1 = imin(j->T, t0 + j->rows_per);
    for (int t = t0; t < t1; t++)
        j->g->quantize(j->xsrc + (size_t)t * j->ldxsrc, j->K, j->g->xs_block, j->xq + (size_t)t * j->ldxq,
                       j->dx + (size_t)t * j->lddx);
}

static void qlin_task(void *arg, int task, int thread) {
    const qlin_job *j = arg;
    const cpu_qgemm *g = j->g;
    const op_linear *L = j->L;
    const int nr = g->nr, N = L->n_out;
    char *wp = j->sp[thread];
    float *bias = (float *)(void *)(wp + (size_t)j->max_panels * g->kb * CPU_QBLK_BYTES(nr));
    int p0, p1, t0, t1;
    if (!gemm_task_share(task, j->n_chunks, j->n_panels, j->t_per, j->T, L, nr, bias, &p0, &p1, &t0, &t1)) return;
    const size_t rb = q_row_bytes(L->dt, j->K);
    for (int b0 = 0; b0 < j->nb; b0 += g->kb) {
        const int bn = imin(g->kb, j->nb - b0);
        const size_t panel_bytes = (size_t)bn * CPU_QBLK_BYTES(nr);
        for (int p = p0; p < p1; p++)
            g->pack(wp + (size_t)(p - p0) * panel_bytes, (const char *)L->w + (size_t)p * nr * rb, L->dt, rb,
                    imin(nr, N - p * nr), b0, bn);
        for (int t = t0; t < t1; t += g->mr) {
            const int m = imin(g->mr, t1 - t);
            const uint8_t *xt = j->xq + (size_t)t * j->ldxq + (size_t)b0 * 32;
            const float *dxt = j->dx + (size_t)t * j->lddx + b0;
            for (int p = p0; p < p1; p++) {
                const int n0 = p * nr;
                g->kernel(m, bn, xt, j->ldxq, dxt, j->lddx, wp + (size_t)(p - p0) * panel_bytes,
                          j->y + (size_t)t * j->ldy + n0, j->ldy, imin(nr, N - n0),
                          (b0 == 0 && L->b) ? bias + (n0 - p0 * nr) : NULL, b0 > 0);
            }
        }
    }
}

static void lin_qgemm(ops_ctx *c, const cpu_qgemm *g, float *y, int ldy, const float *x, int ldx, int T,
                      const op_linear *L) {
    const int K = L->n_in, N = L->n_out, nb = (K + 31) / 32, nt = c->n_threads;
    const size_t ldxq = align64((size_t)nb * 32), lddx = ((size_t)nb + 15) & ~(size_t)15;
    char *sp[MAX_THREADS];
    for (int ts = 0; ts < T; ts += LIN_T_PASS) {
        const int tn = imin(LIN_T_PASS, T - ts);
        const double macs = (double)tn * N * K;
        qlin_job j = {.g = g,
                      .L = L,
                      .y = y + (size_t)ts * ldy,
                      .ldy = (size_t)ldy,
                      .ldxq = ldxq,
                      .lddx = lddx,
                      .xsrc = x + (size_t)ts * ldx,
                      .ldxsrc = (size_t)ldx,
                      .T = tn,
                      .K = K,
                      .nb = nb,
                      .sp = sp};
        const int P = cdiv(N, g->nr);
        int nch = cdiv(P, LIN_MAX_PANELS);
        if (nch % nt) nch += nt - nch % nt;
        nch = imin(nch, P);
        int tch = 1;
        if (nch < 2 * nt) tch = imax(1, imin(cdiv(2 * nt, nch), tn / 128));
        if (macs < LIN_SERIAL_MACS) nch = tch = 1;
        j.n_panels = P;
        j.n_chunks = nch;
        j.t_per = cdiv(cdiv(tn, tch), g->mr) * g->mr;
        j.max_panels = cdiv(P, nch);
        const size_t each = (size_t)j.max_panels * g->kb * CPU_QBLK_BYTES(g->nr) + (size_t)j.max_panels * g->nr * 4;
        char *shared = scratch_all(c, (size_t)tn * (ldxq + lddx * 4), each, sp);
        if (!shared) return;
        j.xq = (uint8_t *)shared;
        j.dx = (float *)(void *)(shared + (size_t)tn * ldxq);
        const int ctasks = (double)tn * K < 65536 ? 1 : imin(tn, nt * 2);
        j.rows_per = cdiv(tn, ctasks);
        tp_run(c->tp, cdiv(tn, j.rows_per), qlin_convert_task, &j);
        tp_run(c->tp, nch * cdiv(tn, j.t_per), qlin_task, &j);
    }
}

/* Reference for what the fast paths do not cover (block formats), on the
 * calling thread. */
static void lin_fallback(ops_ctx *c, float *y, int ldy, const float *x, int ldx, int T, const op_linear *L) {
    ops_ref_table()->linear(c, y, ldy, x, ldx, T, L);
}

void cpu_linear(ops_ctx *c, float *y, int ldy, const float *x, int ldx, int T, const op_linear *L) {
    const cpu_kernels *k = kern_of(c);
    const int K = L->n_in, N = L->n_out;
    if (T <= 0 || N <= 0) return;
    const int q = L->dt == DT_Q8 || L->dt == DT_Q4;
    if ((L->dt != DT_BF16 && L->dt != DT_F16 && L->dt != DT_F32 && !q) || K <= 0) {
        lin_fallback(c, y, ldy, x, ldx, T, L);
        return;
    }
    const int small = T < k->small_t;
    if (q && !small && k->qgemm) {
        lin_qgemm(c, k->qgemm, y, ldy, x, ldx, T, L);
        return;
    }
    const int bf = c->prec == OPS_BF16;
    /* bf16 pairs: bf16 weights, and block formats on the packed path (their
     * dequantised values rounded to bf16 as they are packed). */
    const int pairs =
        bf && (small ? L->dt == DT_BF16 && k->gemv_pairs != NULL : (L->dt == DT_BF16 || q) && k->bf16 != NULL);
    /* Block formats at small T: x quantised to int8 blocks when the table
     * has integer dot products (then BF16 rounding is moot). */
    const int qx = q && small && k->gemv_q != NULL;
    const int convert = bf || qx; /* pairs, int8 blocks, or x rounded to bf16 */
    const cpu_gemm *g = pairs ? k->bf16 : k->f32;
    const int Ke = pairs ? (K + 1) / 2 : K;
    const size_t ldxc = qx ? cpu_qx_row_bytes(K) / 4 : convert ? (size_t)((Ke + 15) & ~15) : (size_t)ldx;
    const int nt = c->n_threads;
    const int pass = convert ? LIN_T_PASS : T;
    char *sp[MAX_THREADS];

    for (int ts = 0; ts < T; ts += pass) {
        const int tn = imin(pass, T - ts);
        const double macs = (double)tn * N * K;
        lin_job j = {.k = k,
                     .g = g,
                     .L = L,
                     .y = y + (size_t)ts * ldy,
                     .ldy = (size_t)ldy,
                     .T = tn,
                     .K = K,
                     .Ke = Ke,
                     .pairs = pairs,
                     .q = q,
                     .qx = qx,
                     .sp = sp};
        size_t each = 0;
        int n_tasks;
        if (small) {
            /* Contiguous row ranges, a few per thread: each streams its part
             * of W once; several per thread even out a busy core. */
            int tasks = macs < LIN_SERIAL_MACS ? 1 : imin(nt * 4, cdiv(N, 16));
            j.n_per = cdiv(N, tasks);
            n_tasks = cdiv(N, j.n_per);
        } else {
            const int P = cdiv(N, g->nr);
            int nch = cdiv(P, LIN_MAX_PANELS);
            if (nch % nt) nch += nt - nch % nt; /* equal shares per thread */
            nch = imin(nch, P);
            int tch = 1;
            /* Too few panels for the threads: split the rows too (each row
             * chunk repacks W, so not below 128 rows). */
            if (nch < 2 * nt) tch = imax(1, imin(cdiv(2 * nt, nch), tn / 128));
            if (macs < LIN_SERIAL_MACS) nch = tch = 1;
            j.n_panels = P;
            j.n_chunks = nch;
            j.t_per = cdiv(cdiv(tn, tch), g->mr) * g->mr;
            j.max_panels = cdiv(P, nch);
            n_tasks = nch * cdiv(tn, j.t_per);
            each = (size_t)j.max_panels * g->nr * ((size_t)g->kc + 1) * 4;
        }
        char *shared = scratch_all(c, convert ? (size_t)tn * ldxc * 4 : 0, each, sp);
        if (!shared) return;
        if (convert) {
            j.x = shared;
            j.ldx = ldxc;
            j.xsrc = x + (size_t)ts * ldx;
            j.ldxsrc = (size_t)ldx;
            int ctasks = (double)tn * K < 65536 ? 1 : imin(tn, nt * 2);
            j.rows_per = cdiv(tn, ctasks);
            tp_run(c->tp, cdiv(tn, j.rows_per), lin_convert_task, &j);
        } else {
            j.x = (const char *)(x + (size_t)ts * ldx);
            j.ldx = (size_t)ldx;
        }
        tp_run(c->tp, n_tasks, small ? lin_gemv_task : lin_gemm_task, &j);
    }
}

/* -- attention -- */

/* Keys visible to the query at absolute position p: always a prefix [0, lim)
 * of the keys (ops.h: causal, widened to the whole bidirectional prefix for
 * queries inside it). */
static int attn_lim(const op_attn *a, int p) {
    int lim = p < a->n_prefix ? a->n_prefix : p + 1;
    return imin(lim, a->S);
}

/* Below this many query rows, keys are read in place (dot products per key)
 * instead of being packed for the matrix kernels. Only a single row gains:
 * one head's keys are rows of the wide K matrix at a stride that maps them
 * onto a few cache sets, so a second row finds them evicted; packing makes
 * them contiguous (measured on Zen 5, S = 740: T = 2 packed 0.72 ms vs
 * 0.81 ms in place, T = 7 1.0 ms vs 2.7 ms). */
#define ATTN_PACK_ROWS 2

typedef struct attn_job {
    const cpu_kernels *k;
    const op_attn *a;
    int group, q_per, n_qchunks, Spad, ldsc;
    int n_parts;  /* attn_part: key ranges per row */
    float *parts; /* attn_part: [T][n_parts][H * (D + 2)]: m, l, o */
    char **sp;
} attn_job;

static void attn_zero_row(float *o, int D) {
    for (int d = 0; d < D; d++) o[d] = 0.0f;
}

/* Small T (decode, short prompts): keys read in place, one head per task
 * with its rows one after another, so that rows after the first find the
 * head's keys and values in L2. */
static void attn_row_task(void *arg, int task, int thread) {
    const attn_job *j = arg;
    const op_attn *a = j->a;
    const cpu_kernels *k = j->k;
    const int h = task, g = h / j->group;
    float *sc = (float *)(void *)j->sp[thread];
    for (int t = 0; t < a->T; t++) {
        float *o = a->out + (size_t)t * a->ldo + (size_t)h * a->D;
        const int L = attn_lim(a, a->pos0 + t);
        if (L <= 0) {
            attn_zero_row(o, a->D);
            continue;
        }
        const float *q = a->q + (size_t)t * a->ldq + (size_t)h * a->D;
        const size_t off = (size_t)g * a->D * kv_elem_bytes(a->kv_dt); /* head g's columns */
        /* Keys are contiguous within a block (or in all of k when unpaged). */
        const int bs = a->blocks ? a->block_size : L;
        for (int j0 = 0; j0 < L; j0 += bs)
            k->dot_rows(sc + j0, q, (const char *)op_attn_row(a, a->k, a->ldk, j0) + off, a->kv_dt, (size_t)a->ldk,
                        imin(bs, L - j0), a->D);
        const float sum = k->softmax(sc, L, a->scale);
        if (!a->blocks) {
            k->axpy_rows(o, sc, (const char *)a->v + off, a->kv_dt, (size_t)a->ldv, L, a->D, 1.0f / sum);
            continue;
        }
        /* axpy_rows writes its sum; add up one block at a time. */
        float *tmp = sc + ((a->S + 15) & ~15);
        attn_zero_row(o, a->D);
        for (int j0 = 0; j0 < L; j0 += bs) {
            k->axpy_rows(tmp, sc + j0, (const char *)op_attn_row(a, a->v, a->ldv, j0) + off, a->kv_dt, (size_t)a->ldv,
                         imin(bs, L - j0), a->D, 1.0f / sum);
            for (int d = 0; d < a->D; d++) o[d] += tmp[d];
        }
    }
}

/* Small T with the ISA's attn_part kernel (flash-decoding): each row's
 * visible keys are cut into n_parts ranges, one task per (row, range)
 * reads its key and value rows front to back for every head and leaves a
 * partial (m, l, o) in parts; attn_merge then combines the ranges. */
static float *attn_part_at(const attn_job *j, int t, int r) {
    const op_attn *a = j->a;
    return j->parts + ((size_t)t * j->n_parts + (size_t)r) * ((size_t)a->H * (a->D + 2));
}

static void attn_part_task(void *arg, int task, int thread) {
    const attn_job *j = arg;
    const op_attn *a = j->a;
    const int t = task / j->n_parts, r = task % j->n_parts, L = attn_lim(a, a->pos0 + t);
    const int j0 = (int)((long long)L * r / j->n_parts), j1 = (int)((long long)L * (r + 1) / j->n_parts);
    float *p = attn_part_at(j, t, r), *m = p, *l = p + a->H, *o = p + 2 * a->H;
    if (j0 >= j1) { /* an empty range: nothing to add */
        for (int h = 0; h < a->H; h++) m[h] = -INFINITY, l[h] = 0.0f;
        return;
    }
    j->k->attn_part(a, t, j0, j1, (float *)(void *)j->sp[thread], m, l, o);
}

static void attn_merge(const attn_job *j) {
    const op_attn *a = j->a;
    for (int t = 0; t < a->T; t++)
        for (int h = 0; h < a->H; h++) {
            float *out = a->out + (size_t)t * a->ldo + (size_t)h * a->D;
            if (attn_lim(a, a->pos0 + t) <= 0) {
                attn_zero_row(out, a->D);
                continue;
            }
            float mx = -INFINITY, sum = 0.0f;
            for (int r = 0; r < j->n_parts; r++) mx = fmaxf(mx, attn_part_at(j, t, r)[h]);
            attn_zero_row(out, a->D);
            for (int r = 0; r < j->n_parts; r++) {
                const float *p = attn_part_at(j, t, r);
                if (p[a->H + h] == 0.0f) continue; /* empty range */
                const float w = expf(p[h] - mx);
                sum += w * p[a->H + h];
                const float *o = p + 2 * a->H + (size_t)h * a->D;
                for (int d = 0; d < a->D; d++) out[d] += w * o[d];
            }
            const float inv = 1.0f / sum;
            for (int d = 0; d < a->D; d++) out[d] *= inv;
        }
}

/* Larger T: per (kv head, chunk of rows), pack Kᵀ and V of the visible keys
 * once, then for each head of the group and each register tile of rows:
 * scores = q·Kᵀ (gemm kernel), softmax per row over its own visible keys,
 * out = p·V (gemm kernel), scaled by 1/sum. */
static void attn_block_task(void *arg, int task, int thread) {
    const attn_job *j = arg;
    const op_attn *a = j->a;
    const cpu_kernels *k = j->k;
    const cpu_gemm *gm = k->f32;
    const int nr = gm->nr, D = a->D;
    const int g = task % a->Hkv, qc = task / a->Hkv;
    const int t0 = qc * j->q_per, t1 = imin(a->T, t0 + j->q_per);
    if (t0 >= t1) return;
    const int Lmax = attn_lim(a, a->pos0 + t1 - 1); /* lim grows with the position */
    const int nkp = cdiv(imax(Lmax, 1), nr), ndp = cdiv(D, nr);
    float *kt = (float *)(void *)j->sp[thread];  /* [nkp][D][nr] */
    float *vp = kt + (size_t)j->Spad * D;        /* [ndp][Spad][nr] */
    float *sc = vp + (size_t)ndp * j->Spad * nr; /* [mr][ldsc] */
    /* With paged keys the block size is a multiple of nr (checked by the
     * caller), so a panel never straddles two blocks. */
    const size_t es = kv_elem_bytes(a->kv_dt);
    /* e4m3 caches: widened through a table of the 256 bytes' values (the
     * packs know float, bf16 and f16 only); the panel layout is the pack's,
     * [D][nr] with rows past the keys zero. */
    float f8[256];
    if (a->kv_dt == DT_E4M3)
        for (int b = 0; b < 256; b++) f8[b] = e4m3_to_f32((uint8_t)b);
    for (int p = 0; p < nkp; p++) {
        float *dst = kt + (size_t)p * D * nr;
        const int rows = imin(nr, Lmax - p * nr);
        if (a->kv_dt != DT_E4M3) {
            gm->pack(dst, (const char *)op_attn_row(a, a->k, a->ldk, p * nr) + (size_t)g * D * es, a->kv_dt,
                     (size_t)a->ldk, rows, 0, D, D);
            continue;
        }
        for (int i = 0; i < nr; i++) {
            const uint8_t *src =
                i < rows ? (const uint8_t *)op_attn_row(a, a->k, a->ldk, p * nr + i) + (size_t)g * D : NULL;
            for (int d = 0; d < D; d++) dst[(size_t)d * nr + i] = src ? f8[src[d]] : 0.0f;
        }
    }
    for (int dp = 0; dp < ndp; dp++) {
        const int nc = imin(nr, D - dp * nr);
        float *dst = vp + (size_t)dp * j->Spad * nr;
        for (int s = 0; s < Lmax; s++) {
            const void *src = op_attn_row(a, a->v, a->ldv, s);
            const size_t c0 = (size_t)g * D + (size_t)dp * nr;
            if (a->kv_dt == DT_F32)
                memcpy(dst + (size_t)s * nr, (const float *)src + c0, (size_t)nc * 4);
            else if (a->kv_dt == DT_E4M3)
                for (int i = 0; i < nc; i++) dst[(size_t)s * nr + i] = f8[((const uint8_t *)src)[c0 + (size_t)i]];
            else
                for (int i = 0; i < nc; i++) dst[(size_t)s * nr + i] = kv_get(src, a->kv_dt, c0 + (size_t)i);
            memset(dst + (size_t)s * nr + nc, 0, (size_t)(nr - nc) * 4);
        }
    }
    float inv[64];
    for (int hi = 0; hi < j->group; hi++) {
        const int h = g * j->group + hi;
        for (int t = t0; t < t1; t += gm->mr) {
            const int m = imin(gm->mr, t1 - t);
            const int L = attn_lim(a, a->pos0 + t + m - 1);
            const float *q = a->q + (size_t)t * a->ldq + (size_t)h * D;
            float *o = a->out + (size_t)t * a->ldo + (size_t)h * D;
            if (L <= 0) {
                for (int i = 0; i < m; i++) attn_zero_row(o + (size_t)i * a->ldo, D);
                continue;
            }
            /* Only the key panels some row of the tile sees. */
            for (int p = 0; p < cdiv(L, nr); p++)
                gm->kernel(m, D, q, (size_t)a->ldq, kt + (size_t)p * D * nr, sc + p * nr, (size_t)j->ldsc, nr, NULL, 0);
            for (int i = 0; i < m; i++) {
                float *s = sc + (size_t)i * j->ldsc;
                const int Li = attn_lim(a, a->pos0 + t + i);
                inv[i] = 1.0f / k->softmax(s, Li, a->scale);
                for (int s2 = Li; s2 < L; s2++) s[s2] = 0.0f; /* masked for this row */
            }
            for (int dp = 0; dp < ndp; dp++)
                gm->kernel(m, L, sc, (size_t)j->ldsc, vp + (size_t)dp * j->Spad * nr, o + dp * nr, (size_t)a->ldo,
                           imin(nr, D - dp * nr), NULL, 0);
            for (int i = 0; i < m; i++) {
                float *oi = o + (size_t)i * a->ldo;
                for (int d = 0; d < D; d++) oi[d] *= inv[i];
            }
        }
    }
}

void cpu_attention(ops_ctx *c, const op_attn *a) {
    const cpu_kernels *k = kern_of(c);
    if (a->T <= 0 || a->H <= 0 || a->D <= 0) return;
    const int nt = c->n_threads, group = a->H / a->Hkv;
    char *sp[MAX_THREADS];
    attn_job j = {.k = k, .a = a, .group = group, .sp = sp};
    if (a->T < ATTN_PACK_ROWS && k->attn_part) {
        const int Lmax = imax(attn_lim(a, a->pos0 + a->T - 1), 1);
        j.n_parts = imax(1, imin(2 * nt, Lmax / 64));
        const int per = cdiv(Lmax, j.n_parts) + 1;
        float *parts = (float *)(void *)scratch_all(c, (size_t)a->T * j.n_parts * (size_t)a->H * (a->D + 2) * 4,
                                                    ATTN_PART_SCRATCH(a->H, a->D, per) * 4 + 64, sp);
        if (!parts) return;
        j.parts = parts;
        tp_run(c->tp, a->T * j.n_parts, attn_part_task, &j);
        attn_merge(&j);
        return;
    }
    if (a->T < ATTN_PACK_ROWS || k->f32->mr > 64 || (a->blocks && a->block_size % k->f32->nr)) {
        if (!scratch_all(c, 0, ((size_t)((a->S + 15) & ~15) + (size_t)a->D) * 4 + 64, sp)) return;
        tp_run(c->tp, a->H, attn_row_task, &j);
        return;
    }
    const int nr = k->f32->nr, mr = k->f32->mr;
    /* Enough (kv head, row chunk) tasks to keep the threads busy; each chunk
     * packs K and V again, so chunks stay at 32 rows or more. */
    int qch = 1;
    if (a->Hkv < 4 * nt) qch = imax(1, imin(cdiv(4 * nt, a->Hkv), a->T / 32));
    j.q_per = cdiv(cdiv(a->T, qch), mr) * mr;
    j.n_qchunks = cdiv(a->T, j.q_per);
    const int Smax = imax(attn_lim(a, a->pos0 + a->T - 1), 1);
    j.Spad = cdiv(Smax, nr) * nr;
    j.ldsc = j.Spad;
    size_t each = ((size_t)j.Spad * a->D + (size_t)cdiv(a->D, nr) * j.Spad * nr + (size_t)mr * j.ldsc) * 4;
    if (!scratch_all(c, 0, each, sp)) return;
    tp_run(c->tp, a->Hkv * j.n_qchunks, attn_block_task, &j);
}

/* -- layernorm, elementwise, rope -- */

typedef struct rows_job {
    const cpu_kernels *k;
    float *y;
    const float *x;
    int T, C, rows_per;
    const float *g, *b;
    float eps;
    /* rope */
    int ldx, H, D, half, pos0;
    const float *cos_t, *sin_t;
} rows_job;

static void ln_task(void *arg, int task, int thread) {
    (void)thread;
    const rows_job *j = arg;
    const int t0 = task * j->rows_per, t1 = imin(j->T, t0 + j->rows_per);
    for (int t = t0; t < t1; t++)
        j->k->layernorm_row(j->y + (size_t)t * j->C, j->x + (size_t)t * j->C, j->C, j->g, j->b, j->eps);
}

/* Tasks for n elements of work spread over rows: serial when small. */
static int row_tasks(const ops_ctx *c, int rows, double work) {
    if (work < 65536 || c->n_threads == 1) return 1;
    return imin(rows, c->n_threads * 4);
}

void cpu_layernorm(ops_ctx *c, float *y, const float *x, int T, int C, op_vec g, op_vec b, float eps) {
    if (T <= 0 || C <= 0) return;
    char *sp[MAX_THREADS];
    float *gb = (float *)(void *)scratch_all(c, (size_t)2 * C * 4, 0, sp);
    if (!gb) return;
    for (int i = 0; i < C; i++) {
        gb[i] = cpu_ld(g.p, g.dt, (size_t)i);
        gb[C + i] = cpu_ld(b.p, b.dt, (size_t)i);
    }
    rows_job j = {.k = kern_of(c), .y = y, .x = x, .T = T, .C = C, .g = gb, .b = gb + C, .eps = eps};
    int tasks = row_tasks(c, T, (double)T * C);
    j.rows_per = cdiv(T, tasks);
    tp_run(c->tp, cdiv(T, j.rows_per), ln_task, &j);
}

typedef struct ew_job {
    const cpu_kernels *k;
    float *y;
    const float *x;
    size_t n, per;
    int kind;
} ew_job;

static void ew_task(void *arg, int task, int thread) {
    (void)thread;
    const ew_job *j = arg;
    const size_t i0 = (size_t)task * j->per;
    const size_t n = j->n - i0 < j->per ? j->n - i0 : j->per;
    if (j->kind == 0)
        j->k->gelu_tanh(j->y + i0, n);
    else if (j->kind == 1)
        j->k->gelu_erf(j->y + i0, n);
    else
        j->k->add(j->y + i0, j->x + i0, n);
}

/* Elementwise ops are memory- or exp-bound and cheap: below 64 Ki elements
 * waking the pool costs more than it saves. Chunks are multiples of 16
 * floats so that threads never share a cache line. */
static void ew_run(ops_ctx *c, float *y, const float *x, size_t n, int kind) {
    ew_job j = {kern_of(c), y, x, n, n, kind};
    if (n == 0) return;
    if (n < 65536 || c->n_threads == 1) {
        ew_task(&j, 0, 0);
        return;
    }
    size_t tasks = (size_t)c->n_threads * 4;
    j.per = ((n + tasks - 1) / tasks + 15) & ~(size_t)15;
    tp_run(c->tp, (int)((n + j.per - 1) / j.per), ew_task, &j);
}

void cpu_gelu_tanh(ops_ctx *c, float *x, size_t n) { ew_run(c, x, NULL, n, 0); }
void cpu_gelu_erf(ops_ctx *c, float *x, size_t n) { ew_run(c, x, NULL, n, 1); }
void cpu_add(ops_ctx *c, float *y, const float *x, size_t n) { ew_run(c, y, x, n, 2); }

static void rope_task(void *arg, int task, int thread) {
    (void)thread;
    const rows_job *j = arg;
    const int t0 = task * j->rows_per, t1 = imin(j->T, t0 + j->rows_per);
    for (int t = t0; t < t1; t++) {
        const size_t p = (size_t)(j->pos0 + t) * j->half;
        j->k->rope_row(j->y + (size_t)t * j->ldx, j->H, j->D, j->half, j->cos_t + p, j->sin_t + p);
    }
}

void cpu_rope(ops_ctx *c, float *x, int ldx, int T, int H, int D, int R, int pos0, const float *cos_t,
              const float *sin_t) {
    if (T <= 0 || H <= 0 || R < 2) return;
    rows_job j = {.k = kern_of(c),
                  .y = x,
                  .T = T,
                  .ldx = ldx,
                  .H = H,
                  .D = D,
                  .half = R / 2,
                  .pos0 = pos0,
                  .cos_t = cos_t,
                  .sin_t = sin_t};
    int tasks = row_tasks(c, T, (double)T * H * R);
    j.rows_per = cdiv(T, tasks);
    tp_run(c->tp, cdiv(T, j.rows_per), rope_task, &j);
}

q4_block_fn cpu_q4_search(const char *name) {
    if (!name || !strcmp(name, "auto")) {
        q4_block_fn f = q4_search_avx512();
        if (!f) f = q4_search_avx2();
        if (!f) f = q4_search_neon();
        return f ? f : q4_block_ref;
    }
    if (!strcmp(name, "ref")) return q4_block_ref;
    if (!strcmp(name, "avx512")) return q4_search_avx512();
    if (!strcmp(name, "avx2")) return q4_search_avx2();
    if (!strcmp(name, "neon")) return q4_search_neon();
    return NULL;
}

/* ISA tables not compiled into this build. */
#if !defined(ALBEDO_X86)
const ops *ops_avx512_table(void) { return NULL; }
const ops *ops_avx512_nobf16_table(void) { return NULL; }
const ops *ops_avx2_table(void) { return NULL; }
q4_block_fn q4_search_avx512(void) { return NULL; }
q4_block_fn q4_search_avx2(void) { return NULL; }
#endif
#if !defined(ALBEDO_ARM64)
const ops *ops_neon_table(void) { return NULL; }
q4_block_fn q4_search_neon(void) { return NULL; }
const ops *ops_neon_base_table(void) { return NULL; }
#endif
