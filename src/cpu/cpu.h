/*
 * cpu.h — internals of the CPU backend, shared by its files only: the
 * context behind ops_ctx, the thread pool, and the per-ISA op tables.
 * Stage code never includes this; it sees ops.h alone.
 */
#ifndef ALBEDO_CPU_H
#define ALBEDO_CPU_H

#include <math.h>

#include "../ops.h"

/* A fixed pool of threads; the calling thread works too. */
typedef struct threadpool threadpool;
typedef void (*tp_fn)(void *arg, int task, int thread);

threadpool *tp_new(int n_threads);
void tp_free(threadpool *tp);
int tp_size(const threadpool *tp);
/* Run fn(arg, task, thread) for task in [0, n_tasks); thread in [0, size). */
void tp_run(threadpool *tp, int n_tasks, tp_fn fn, void *arg);

struct ops_ctx {
    const ops *tab;
    threadpool *tp;
    int n_threads;
    ops_precision prec;
    /* Per-thread scratch, grown on demand by cpu_scratch; after the first
     * step of a given shape no further allocation happens. */
    void **scratch;
    size_t *scratch_len;
    int failed; /* set when scratch could not be allocated; see ops_failed */
};

/* Per-thread scratch of at least bytes (64-byte aligned), or NULL on OOM
 * (then c->failed is set and the op returns without writing). */
void *cpu_scratch(ops_ctx *c, int thread, size_t bytes);

/* Element i of a 16/32-bit float vector of dtype dt (bias and LayerNorm
 * parameters; never used in inner loops). */
static inline float cpu_ld(const void *p, dtype dt, size_t i) {
    switch (dt) {
    case DT_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    case DT_F16: return f16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

/* ---- Kernels and drivers ----------------------------------------------------
 * Every fast table is the same set of drivers (ops_cpu.c: blocking, threading,
 * masks, scratch) over one set of kernels per ISA (ops_avx512.c, ops_avx2.c,
 * ops_neon.c, and portable C in ops_cpu.c). The kernels see plain pointers and
 * counts; they never allocate and never start threads. */

/* A packed-panel matrix product, the BLIS scheme: W is packed, a block of K
 * at a time, into panels of nr weight rows laid out [kc][nr] (so one k of a
 * panel is a contiguous vector), and a register tile of mr rows of x times
 * one panel accumulates in registers. An element is one float, or, for the
 * bf16 dot-product flavour, a pair of bf16 along K in one 32-bit word (x and
 * W both; the hardware multiplies pairs and adds them into float lanes). */
typedef struct cpu_gemm {
    int mr, nr, kc; /* register tile rows, panel width, K block (elements) */
    int pairs;      /* 1: elements are bf16 pairs, 0: floats */
    /* dst [ec][nr] = elements [e0, e0+ec) of rows 0..nrows-1 of w (row
     * stride ldw elements of dt, rows of K elements of dt), transposed;
     * rows nrows..nr-1 are zero. Pairs read bf16 w and zero the half past K. */
    void (*pack)(void *dst, const void *w, dtype dt, size_t ldw, int nrows, int e0, int ec, int K);
    /* y[i][j] = init + sum_e x[i][e] * wp[e][j] for i < mr, j < ncols (the
     * other columns of y are not touched); init is y itself when accumulate,
     * else bias[j] when bias, else 0. x has row stride ldx elements. */
    void (*kernel)(int mr, int kc, const void *x, size_t ldx, const void *wp, float *y, size_t ldy, int ncols,
                   const float *bias, int accumulate);
} cpu_gemm;

/* The integer matrix product for block-format W (ops.h qformat) at T >=
 * small_t: x quantised to u8 with a +128 offset (cpu_quantize_u8), W packed
 * into panels of nr rows of signed bytes, and the int32 sums of each
 * 32-weight block scaled into float accumulators:
 *
 *   y[i][j] = sum_b d_x[i][b] d_w[j][b] (sum_{k in b} (q_x[i][k] + 128) q_w[j][k] - 128 sum_k q_w[j][k])
 *
 * (vpdpbusd multiplies unsigned by signed bytes; the column sums of the
 * weights undo the offset). A packed panel is kb blocks of CPU_QBLK_BYTES(nr)
 * bytes, each: the weights as [8][nr][4] bytes (quad u of column j holds
 * weights 4u..4u+3 of the block, the layout whose 32-bit lanes vpdpbusd
 * reads), nr float scales d_w, and nr int32 corrections -128 sum q_w.
 * Q4's two sub-block scales are folded into one per block while packing
 * (cpu_q4_fold), so both formats share the kernel and its one scale per
 * block. */
#define CPU_QBLK_BYTES(nr) ((size_t)(nr)*40)

/* The Q4 fold of cpu_qgemm.pack, per row and block: with d0, d1 the
 * sub-block scales (q4_code_scale), s is the one of larger magnitude (d0
 * on ties) and d_w = s / 16; sub-block i gets the 16-bit factor
 * F_i = rint(16 d_i / s * 1024) (float arithmetic as written, to nearest
 * even; 0 when s = 0), |F_i| <= 16384, and its level q = nibble - 8
 * becomes the int8 min(floor((32 q F_i + 2^14) / 2^15), 127) — the
 * rounding multiply vpmulhrsw does on 32 q and F_i. The larger
 * sub-block's levels stay exact (F = 16384: 16 q); the other's move by at
 * most half a unit plus 1/256 (|s| / 32 in weight terms), and 128
 * (q = -8, d_i = -s) clips to 127 (|s| / 16). Exactly this, bit for bit:
 * tests/test_ops.c checks the packed bytes. */
static inline float cpu_q4_fold_big(float d0, float d1) { return fabsf(d1) > fabsf(d0) ? d1 : d0; }
static inline int32_t cpu_q4_fold_factor(float di, float s) {
    return s == 0.0f ? 0 : (int32_t)rintf(16.0f * di / s * 1024.0f);
}
static inline int8_t cpu_q4_fold(int q, int32_t f) {
    /* floor((32 q f + 2^14) / 2^15) without shifting a negative number:
     * 32 q f >= -2^22, so the offset 2^23 keeps it nonnegative */
    const int32_t v = ((32 * q * f + (1 << 14) + (1 << 23)) >> 15) - (1 << 8);
    return (int8_t)(v > 127 ? 127 : v);
}

typedef struct cpu_qgemm {
    int mr, nr, kb; /* register tile rows, panel width, K block in 32-weight blocks */
    int xs_block;   /* 1: x scaled per block of 32 (d_x[i][b]); 0: one scale per row */
    /* dst = blocks [b0, b0+nb) of rows 0..nrows-1 of w (rows row_bytes
     * apart, format dt), packed as above; rows nrows..nr-1 get scale 0. */
    void (*pack)(void *dst, const void *w, dtype dt, size_t row_bytes, int nrows, int b0, int nb);
    /* y[i][j] = init + sum over the nb blocks of wp, for i < mr, j < ncols;
     * x: rows of u8 (ldx bytes apart) starting at the first block of wp;
     * dx: d_x per block (lddx floats a row, first block at dx[0]; with
     * xs_block 0 only dx[i * lddx] is read). init as cpu_gemm.kernel. */
    void (*kernel)(int mr, int nb, const uint8_t *x, size_t ldx, const float *dx, size_t lddx, const void *wp, float *y,
                   size_t ldy, int ncols, const float *bias, int accumulate);
    /* x[0..K) to q[0..32 nb) (u8, q_x + 128; 128 past K) and d[0..nb),
     * nb = ceil(K/32): as cpu_quantize_u8 (bit for bit). */
    void (*quantize)(const float *x, int K, int per_block, uint8_t *q, float *d);
} cpu_qgemm;

/* The portable x quantiser of cpu_qgemm (the specification of .quantize):
 * per block (per_block) or per row, d = max|x| / 127, q_x = round(x / d)
 * to nearest even (as lrintf), stored q_x + 128; d = 0 and q = 128 for an
 * all-zero block (row). Every d[b] is written (with the row's d when not
 * per_block). */
void cpu_quantize_u8(const float *x, int K, int per_block, uint8_t *q, float *d);

#define ATTN_PART_SCRATCH(H, D, n) \
    ((((size_t)(H) * (size_t)(n) + 15) & ~(size_t)15) + 2 * (size_t)(H) * (((size_t)(D) + 31) / 32) * 32)

typedef struct cpu_kernels {
    const cpu_gemm *f32;  /* float elements, W widened from bf16/f16/f32 */
    const cpu_gemm *bf16; /* bf16-pair dot products, or NULL */
    int small_t;          /* linear with T < small_t uses gemv, which streams W once */
    /* y[t][n] = b[n] + sum_k x[t][k] W[n][k] for t < T, n in [n0, n1); W [N, K]
     * of dt, read in place (no packing); b of bdt or NULL. Any T works; it
     * is meant for the small T that make a linear bound by reading W. */
    void (*gemv)(int T, int K, const float *x, size_t ldx, const void *w, dtype dt, const void *b, dtype bdt, int n0,
                 int n1, float *y, size_t ldy);
    /* The same with x as bf16 pairs (ldx in pairs) and bf16 W, or NULL. */
    void (*gemv_pairs)(int T, int K, const uint32_t *x, size_t ldx, const uint16_t *w, const void *b, dtype bdt, int n0,
                       int n1, float *y, size_t ldy);
    /* Block-format W (DT_Q8, DT_Q4; ops.h qformat), small T: the same sum
     * with x given quantised per block of 32 (cpu_quantize_x; row stride
     * ldxq bytes), integer dot products per block. NULL: the driver's
     * portable path, which dequantises W rows and multiplies float x. */
    void (*gemv_q)(int T, int K, const void *xq, size_t ldxq, const void *w, dtype dt, const void *b, dtype bdt, int n0,
                   int n1, float *y, size_t ldy);
    /* Block-format W, T >= small_t: integer products (cpu_qgemm), or NULL:
     * the packed float path, dequantising W while packing. */
    const cpu_qgemm *qgemm;
    /* dst[i] = src[i] rounded to bf16 (as f32_to_bf16), widened back. */
    void (*round_bf16)(float *dst, const float *src, int n);
    /* dst[i] = bf16 pair (src[2i], src[2i+1]) for i < ceil(n/2), zero-padded
     * (rounded as f32_to_bf16); NULL when bf16 and gemv_pairs are. */
    void (*to_pairs)(uint32_t *dst, const float *src, int n);
    /* s[i] = exp(s[i]*scale - max_j s[j]*scale) for i < n; returns the sum. */
    float (*softmax)(float *s, int n, float scale);
    /* out[j] = q . k[j] (D elements of dtype kdt, DT_F32 or DT_BF16; key
     * rows of stride ldk elements) for j < n. */
    void (*dot_rows)(float *out, const float *q, const void *k, dtype kdt, size_t ldk, int n, int D);
    /* out[0..D) = s * sum_j p[j] v[j] (value rows of dtype vdt, stride ldv
     * elements) for j < n. */
    void (*axpy_rows)(float *out, const float *p, const void *v, dtype vdt, size_t ldv, int n, int D, float s);
    /* Optional (NULL: per-head dot_rows/axpy_rows): the part of query row
     * t's attention over keys [j0, j1) (all visible), for every head h:
     * m[h] = max of the scaled scores, l[h] = sum of exp(score - m[h]),
     * o[h*D..] = that exp-weighted sum of value rows; sc is
     * ATTN_PART_SCRATCH(H, D, j1 - j0) floats of scratch. Ranges are merged by the caller (ops_cpu.c). */
    void (*attn_part)(const op_attn *a, int t, int j0, int j1, float *sc, float *m, float *l, float *o);
    /* One LayerNorm row with float g and b. */
    void (*layernorm_row)(float *y, const float *x, int C, const float *g, const float *b, float eps);
    void (*gelu_tanh)(float *x, size_t n);
    void (*gelu_erf)(float *x, size_t n);
    void (*add)(float *y, const float *x, size_t n);
    /* Rotate H heads of D dims of one row; ct/st [half]. */
    void (*rope_row)(float *x, int H, int D, int half, const float *ct, const float *st);
} cpu_kernels;

/* x quantised for gemv_q: per row, nb = ceil(K/32) blocks of 32 int8
 * (q = round(x/d), d = max|x|/127 per block, zero past K), then nb float
 * scales d; rows cpu_qx_row_bytes(K) apart (a multiple of 64). */
static inline size_t cpu_qx_row_bytes(int K) {
    const size_t nb = (size_t)(K + 31) / 32;
    return (nb * 36 + 63) & ~(size_t)63;
}
void cpu_quantize_x(const float *x, int K, void *dst);

/* The Q4 scale search's pieces (ops_ref.c, q4_block_ref), shared by its
 * SIMD forms so that they weigh the same candidates in the same order.
 * q4_absmax: max |v[i]| of a sub-block v[16] (NaNs ignored). q4_range: the
 * number nc of candidates for that maximum a (0 when a = 0: code 0),
 * candidate j being magnitude code c0 + j / 2 (*c0 set) with sign j % 2, of
 * scale d_j = ±q4_code_scale(c0 + j / 2). The error of candidate j is the
 * sum over i = 0..15, in that order, of (v[i] - d_j·q)^2 with q =
 * q4_level(v[i]·(1 / d_j)), each operation rounded to float (no fused
 * multiply-adds). q4_pick: the code of least error e[j] (the first of
 * equals; NaN errors never win). */
#define Q4_CAND_MAX 64
float q4_absmax(const float *v);
int q4_range(float a, int *c0);
/* d[j] = d_j and id[j] = 1 / d_j (as 1.0f / d[j]) for j < nc, zeros for
 * nc <= j < n. */
void q4_scales(int c0, int nc, int n, float *d, float *id);
uint8_t q4_pick(const float *e, int nc, int c0);
void q4_block_ref(const float *v, uint8_t *dst);
/* The SIMD quantisers; NULL where not compiled in or not supported here. */
q4_block_fn q4_search_avx512(void);
q4_block_fn q4_search_avx2(void);
q4_block_fn q4_search_neon(void);

/* The drivers (ops_cpu.c), the entries of every table but the reference. */
void cpu_linear(ops_ctx *c, float *y, int ldy, const float *x, int ldx, int T, const op_linear *L);
void cpu_layernorm(ops_ctx *c, float *y, const float *x, int T, int C, op_vec g, op_vec b, float eps);
void cpu_gelu_tanh(ops_ctx *c, float *x, size_t n);
void cpu_gelu_erf(ops_ctx *c, float *x, size_t n);
void cpu_add(ops_ctx *c, float *y, const float *x, size_t n);
void cpu_rope(ops_ctx *c, float *x, int ldx, int T, int H, int D, int R, int pos0, const float *cos_t,
              const float *sin_t);
void cpu_attention(ops_ctx *c, const op_attn *a);

/* A driver-based table: the ops (first member, so that ctx->tab leads back
 * here) and the kernels the drivers run. */
typedef struct cpu_table {
    ops ops;
    const cpu_kernels *k;
} cpu_table;

#define CPU_DRIVER_OPS(NAME)                                                                        \
    {                                                                                               \
        .name = NAME, .linear = cpu_linear, .layernorm = cpu_layernorm, .gelu_tanh = cpu_gelu_tanh, \
        .gelu_erf = cpu_gelu_erf, .add = cpu_add, .rope = cpu_rope, .attention = cpu_attention,     \
    }

/* The scalar reference: the specification of every op (single-threaded). */
const ops *ops_ref_table(void);

/* Fast tables; each returns NULL when not compiled in or not supported by
 * this CPU. */
const ops *ops_avx512_table(void);
const ops *ops_avx2_table(void);
const ops *ops_neon_table(void);
/* Portable multithreaded C, the fallback when no ISA table applies. */
const ops *ops_generic_table(void);
/* The AVX-512 table without AVX512-BF16 dot products (what CPUs lacking
 * them get); NULL where AVX-512 itself is missing. For tests. */
const ops *ops_avx512_nobf16_table(void);
/* The NEON table without the optional DotProd and BF16 kernels (what plain
 * ARMv8.0 CPUs get); NULL off AArch64. ops_neon_table() adds what this
 * CPU has. For tests. */
const ops *ops_neon_base_table(void);

/* Number of online CPUs. */
int cpu_count(void);

#endif
