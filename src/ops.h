/*
 * ops.h — the backend interface: every piece of math the model stages do
 * goes through this small table of ops. The scalar reference of each op
 * (cpu/ops_ref.c) is its specification; fast versions (cpu/ops_cpu.c with
 * cpu/ops_avx2.c, cpu/ops_avx512.c, cpu/ops_neon.c) must compute the same
 * function within the per-dtype tolerance of tests/test_ops.c.
 *
 * Dimension legend:
 *   T  tokens (rows of an activation matrix)
 *   K  input channels of a linear layer      N  output channels
 *   C  channels of a normalised row          H  query heads, Hkv key/value heads
 *   D  head dimension                        R  rotated dims of a head
 *   S  key positions visible to attention    P  positions of a rotary table
 * Activations are float32, row-major, with an explicit row stride (ld*) in
 * elements where a matrix may be a view into a wider one. Weights keep the
 * dtype of the file (BF16, F16 or F32) or an albedo block format (Q8, Q4).
 * Ops know shapes and dtypes, never models.
 */
#ifndef ALBEDO_OPS_H
#define ALBEDO_OPS_H

#include "common.h"

/* A linear layer y = x·Wᵀ + b: W [N, K] of dtype dt, b [N] (dtype bdt) or NULL.
 * For DT_Q8 / DT_Q4, w points at a block-format matrix (see qformat below). */
typedef struct op_linear {
    const void *w; /* [N, K] */
    const void *b; /* [N] or NULL */
    dtype dt, bdt;
    int n_out, n_in; /* N, K */
} op_linear;

/* ---- qformat: albedo's block formats (docs/QUANT.md) -------------------------
 * A [N, K] matrix is stored row-major, row n at n * q_row_bytes(dt, K) bytes;
 * a row is ceil(K/32) blocks of 32 consecutive weights along K, in order.
 * The last block of a row is zero-padded when K is not a multiple of 32.
 * Every block is symmetric: scaled integers with no offset.
 *
 *   DT_Q8, 34 bytes: d (f16, little-endian), q[32] int8 in [-127, 127];
 *     w[i] = d * q[i], d = max|w| / 127, q = round(w / d).
 *   DT_Q4, 18 bytes: c[2] scale codes, qs[16] bytes; weight i < 16 is the
 *     low nibble of qs[i] and has scale d0 = q4_code_scale(c[0]); weight
 *     i + 16 is the high nibble and has scale d1 = q4_code_scale(c[1]):
 *     w[i] = d_(i/16) * (nibble - 8). Two sub-blocks of 16 weights, each
 *     with its own 8-bit scale (sign, 4-bit exponent, 3-bit mantissa), in
 *     the two bytes a single f16 scale took before (format version 2,
 *     docs/QUANT.md): nibble = clamp(round(w / d) + 8, 0, 15), d the code
 *     of least squared error for the sub-block (q_quantize_row). Readers
 *     need only the codes and the nibbles.
 *
 * Bytes per weight: Q8 1.0625, Q4 0.5625. Scales are unaligned (a block is
 * not a multiple of 4 bytes); kernels read them with memcpy or unaligned
 * loads. The reference (ops_ref.c) dequantises a row with q_dequantize_row
 * and multiplies in float32; fast backends may also quantise x to int8 per
 * block of 32 (d_x = max|x|/127) for integer dot products, and the integer
 * prefill folds Q4's two scales into one per block (cpu/cpu.h,
 * cpu_q4_fold), which the op tests allow for (tests/test_ops.c). */
#define Q_BLOCK 32
#define Q8_BLOCK_BYTES 34
#define Q4_BLOCK_BYTES 18

/* The scale of a Q4 sub-block code c: bit 7 the sign, bits 0..6 the
 * magnitude m read as the IEEE half whose bits are m << 7 (exponent field
 * m >> 3 in 0..15, mantissa m & 7 in its top three bits): 0 for m = 0,
 * 2^-17 .. 2^-14 * 0.875 (subnormal) for m < 8, else
 * 2^((m >> 3) - 15) * (1 + (m & 7) / 8), at most 1.875 (|w| <= 15).
 * Fast kernels make the same half from the code with shifts and masks and
 * widen it as they widen f16 (vcvtph2ps, fcvt). */
static inline uint16_t q4_code_f16(uint8_t c) { return (uint16_t)((c & 0x7Fu) << 7 | (c & 0x80u) << 8); }
static inline float q4_code_scale(uint8_t c) { return f16_to_f32(q4_code_f16(c)); }

/* Bytes of one row of K weights in block format dt (0 for other dtypes). */
size_t q_row_bytes(dtype dt, int K);
/* Quantise K floats into one row of dt (q_row_bytes(dt, K) bytes at dst). */
void q_quantize_row(dtype dt, const float *x, int K, void *dst);
/* One Q4 block: the 32 weights v (zero-padded) into its 18 bytes. */
typedef void (*q4_block_fn)(const float *v, uint8_t *dst);
/* q_quantize_row with the Q4 blocks made by q4_block: the same bytes when
 * q4_block is one of cpu_q4_search's. */
void q_quantize_row_with(q4_block_fn q4_block, dtype dt, const float *x, int K, void *dst);
/* The Q4 block quantiser of kernel set `name` ("ref", "avx2", "avx512", "neon";
 * NULL or "auto": the fastest this CPU has), NULL where that set is missing
 * here. Each makes the reference's bytes, bit for bit (tests/test_ops.c):
 * only the speed of the scale search differs. */
q4_block_fn cpu_q4_search(const char *name);
/* Dequantise one row of K weights of dt into out[0..K). */
void q_dequantize_row(dtype dt, const void *src, int K, float *out);

/* A vector parameter (LayerNorm weight/bias): [C] of dtype dt. */
typedef struct op_vec {
    const void *p;
    dtype dt;
} op_vec;

/* Attention masks. Query row i sits at absolute position pos0 + i and sees
 * key j when j <= pos0 + i, or when both pos0 + i and j are < n_prefix (the
 * bidirectional image prefix). n_prefix = S makes it fully bidirectional. */
typedef struct op_attn {
    int T, S;               /* queries, visible keys (keys 0..S-1) */
    int H, Hkv, D;          /* heads; query head h reads kv head h / (H / Hkv) */
    int pos0;               /* absolute position of query row 0 */
    int n_prefix;           /* bidirectional prefix length (0: plain causal) */
    float scale;            /* usually 1/sqrt(D) */
    const float *q;         /* [T, ldq], head h at column h*D */
    const void *k;          /* [S, ldk] of kv_dt, kv head g at column g*D */
    const void *v;          /* [S, ldv] of kv_dt */
    float *out;             /* [T, ldo], head h at column h*D */
    int ldq, ldk, ldv, ldo; /* row strides in elements */
    /* Paged keys and values (optional): when blocks is not NULL, key j is row
     * blocks[j / block_size]·block_size + j % block_size of k and v, so a
     * sequence's cache can live in fixed-size blocks of a shared pool. */
    const int32_t *blocks;
    int block_size;
    /* Element type of k and v: DT_F32 (the zero value), DT_BF16 (the KV
     * cache of BF16 precision) or DT_E4M3 (the fp8 cache, kv_dtype "fp8":
     * a byte e4m3(x), one per-tensor scale of 1, as the CUDA backend's
     * default; common.h). Every kind is widened exactly to float when read
     * and the attention's arithmetic stays float32. */
    dtype kv_dt;
} op_attn;

/* Bytes of one element of a KV cache of dtype dt (DT_F32, DT_BF16, DT_E4M3). */
static inline size_t kv_elem_bytes(dtype dt) { return dt == DT_E4M3 ? 1 : dt == DT_BF16 ? 2 : 4; }

/* Row j of the keys (or values, with ld = ldv and base = v) of a. */
static inline const void *op_attn_row(const op_attn *a, const void *base, int ld, int j) {
    size_t r = a->blocks ? (size_t)a->blocks[j / a->block_size] * (size_t)a->block_size + (size_t)(j % a->block_size)
                         : (size_t)j;
    return (const char *)base + r * (size_t)ld * kv_elem_bytes(a->kv_dt);
}
/* Element i of a KV row of dtype dt. */
static inline float kv_get(const void *row, dtype dt, size_t i) {
    if (dt == DT_E4M3) return e4m3_to_f32(((const uint8_t *)row)[i]);
    return dt == DT_BF16 ? bf16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

typedef struct ops_ctx ops_ctx; /* backend state: thread pool, scratch */

typedef struct ops {
    const char *name;

    /* y[T, N] (row stride ldy) = x[T, K] (row stride ldx) · Wᵀ + b.
     * With ctx precision BF16 the backend may round x to bf16 first, and the
     * dequantised values of block-format weights too (on the packed path,
     * where they meet bf16 x bf16 dot products). */
    void (*linear)(ops_ctx *c, float *y, int ldy, const float *x, int ldx, int T, const op_linear *L);

    /* y[T, C] = (x - mean) / sqrt(var + eps) * g + b, per row (biased var). y may be x. */
    void (*layernorm)(ops_ctx *c, float *y, const float *x, int T, int C, op_vec g, op_vec b, float eps);

    /* In place on n contiguous floats. */
    void (*gelu_tanh)(ops_ctx *c, float *x, size_t n);
    void (*gelu_erf)(ops_ctx *c, float *x, size_t n);

    /* y[i] += x[i] */
    void (*add)(ops_ctx *c, float *y, const float *x, size_t n);

    /* Rotary embedding, half-split (NeoX) pairing on the first R dims of each
     * of H heads of D dims, for rows at positions pos0 .. pos0+T-1:
     *   a = x[i], b = x[i + R/2] (i < R/2), angle = pos * inv_freq[i],
     *   x[i] = a cos - b sin, x[i + R/2] = a sin + b cos.
     * cos/sin tables are [P, R/2] (P > pos0 + T - 1). x is [T, ldx]. */
    void (*rope)(ops_ctx *c, float *x, int ldx, int T, int H, int D, int R, int pos0, const float *cos_t,
                 const float *sin_t);

    /* out = softmax(mask(q·kᵀ·scale))·v, per head. */
    void (*attention)(ops_ctx *c, const op_attn *a);
} ops;

/* Backends. ops_ctx_new picks the best backend for this CPU unless name
 * selects one ("ref", "avx2", "avx512", "neon"; NULL or "auto" = best). */
typedef enum ops_precision { OPS_F32 = 0, OPS_BF16 = 1 } ops_precision;

albedo_status ops_ctx_new(const char *name, int n_threads, ops_precision prec, ops_ctx **out, errbuf *e);
void ops_ctx_free(ops_ctx *c);
const ops *ops_of(const ops_ctx *c);
int ops_n_threads(const ops_ctx *c);
/* Threads used when the caller asks for 0: the online CPUs. */
int ops_default_threads(void);
const char *ops_backend_name(const ops_ctx *c);
/* Nonzero if an op could not get working memory since the last call; the
 * flag is cleared by the call. Stage code checks it once per forward pass. */
int ops_failed(ops_ctx *c);

/* Run fn(arg, i) for i in [0, n) on the context's threads; returns when all
 * are done. Stage code uses it for embarrassingly parallel loops. */
typedef void (*ops_task_fn)(void *arg, int i);
void ops_parallel_for(ops_ctx *c, int n, ops_task_fn fn, void *arg);

/* Convenience for stage code. */
static inline const ops *O(ops_ctx *c) { return ops_of(c); }

/* Element read of a 16/32-bit vector parameter (for stage code that needs a
 * scalar of a weight, e.g. Fourier frequencies). */
float op_vec_get(op_vec v, size_t i);

#endif
