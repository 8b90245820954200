/*
 * ops_cuda.h — the CUDA backend: kernels and their launchers, exposed to C.
 * Every pointer an op takes is a DEVICE pointer; every op is asynchronous
 * on the context's stream and returns an albedo_status (the detail of a
 * failure is in cuda_ctx_error). Nothing here exits, aborts or prints.
 * Ops know shapes and dtypes, never models (the dimension legend is
 * ops.h's: T tokens, K inputs, N outputs, C channels, H/Hkv heads, D head
 * dim, R rotated dims, S keys, V vocabulary).
 *
 * Activations (docs/CUDA.md has the reasoning):
 *   * matrix operands are bf16 (the tensor cores' input type), every sum and
 *     every softmax is float32: linear reads a bf16 x and bf16 W with fp32
 *     accumulation; attention reads bf16 q/k/v and writes bf16;
 *   * the residual stream may stay float32: linear can write float32 and
 *     add into its output (accumulate), so x += proj(attn) and
 *     x += fc2(mlp) need no separate add, and layernorm reads float32 or
 *     bf16 and writes either.
 * A "void *" activation carries its dtype beside it (DT_F32 or DT_BF16).
 * Weights are bf16 (DT_BF16); biases and LayerNorm parameters bf16 or f32.
 *
 * A context is not thread-safe: use one per host thread (and stream). All
 * of an op's work is enqueued on the stream, so a sequence of ops can be
 * captured into a CUDA graph (the ops allocate nothing after
 * cuda_ctx_new; cuda_linear's first call for a new shape queries cuBLASLt's
 * heuristics on the host, so run a shape once before capturing it).
 */
#ifndef ALBEDO_OPS_CUDA_H
#define ALBEDO_OPS_CUDA_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "../common.h"

typedef struct cuda_ctx cuda_ctx;

/* ---- context and memory ------------------------------------------------- */

/* A context on device ordinal `device`: a stream, a cuBLASLt handle with its
 * workspace, and the scratch of split attention. */
albedo_status cuda_ctx_new(int device, cuda_ctx **out, errbuf *e);
void cuda_ctx_free(cuda_ctx *c); /* NULL is a no-op */
/* Detail of the last failure of an op on c ("" if none). */
const char *cuda_ctx_error(const cuda_ctx *c);
/* The context's cudaStream_t, as void * so that C callers need no CUDA header. */
void *cuda_ctx_stream(cuda_ctx *c);
/* Counters of cuda_linear's paths since the context was made: cuBLASLt with
 * the epilogue fused, cuBLASLt followed by a bias/activation kernel, and the
 * hand-written GEMV. */
void cuda_ctx_counters(const cuda_ctx *c, long *lt_fused, long *lt_unfused, long *gemv);

/* Programmatic dependent launch of the backend's kernels (on by default on
 * sm_90 and newer, where it overlaps each small kernel's launch with the end
 * of the one before; off elsewhere). For measuring its effect. */
void cuda_ctx_set_pdl(cuda_ctx *c, int on);
/* cuda_linear runs the GEMV for T <= t rows (1..8; default 8, or
 * ALBEDO_CUDA_GEMV_MAX_T) and cuBLASLt above. */
void cuda_ctx_set_gemv_max(cuda_ctx *c, int t);
/* The flash attention kernel's block geometry (cuda_attention, T > 8), for
 * measuring and testing both: CUDA_FLASH_128 (default, or
 * ALBEDO_CUDA_FLASH=N) is 128 query rows a block, 8 warps of 16 (64 rows,
 * 4 warps, for T <= 64 or D > 80); CUDA_FLASH_64 the earlier 64 rows, 4
 * warps of 16, everywhere. Or'ed with CUDA_FLASH_PAD16, D = 72 runs padded
 * to 80 instead of with k = 8 MMAs for its last 8 dims. On a card that
 * runs this build's sm_90a code, more than 64 rows at D of 64 or 72 with
 * bf16 caches run the wgmma kernels instead (segments and block tables at
 * D = 64 only), unless CUDA_FLASH_MMA or CUDA_FLASH_64 is or'ed in;
 * CUDA_FLASH_WGALT swaps which of the two runs the plain layout at each
 * width (attention.cu). */
enum { CUDA_FLASH_128 = 0, CUDA_FLASH_64 = 1, CUDA_FLASH_PAD16 = 4, CUDA_FLASH_MMA = 8, CUDA_FLASH_WGALT = 16 };
void cuda_ctx_set_flash(cuda_ctx *c, int variant);

albedo_status cuda_alloc(cuda_ctx *c, void **p, size_t bytes);
void cuda_free(void *p); /* NULL is a no-op */
/* Synchronous copies (they wait for the context's stream first). */
albedo_status cuda_upload(cuda_ctx *c, void *dst, const void *src, size_t bytes);
albedo_status cuda_download(cuda_ctx *c, void *dst, const void *src, size_t bytes);
/* Upload n elements of a host tensor of dtype dt (F32, F16 or BF16) as bf16:
 * the weight upload step (round to nearest even, as torch). */
albedo_status cuda_upload_bf16(cuda_ctx *c, uint16_t *dst, const void *src, dtype dt, size_t n);
albedo_status cuda_sync(cuda_ctx *c);

/* ---- linear --------------------------------------------------------------- */

typedef enum cuda_act {
    CUDA_ACT_NONE = 0,
    CUDA_ACT_GELU_TANH = 1, /* y = gelu_tanh(x·Wᵀ + b), fused into the GEMM */
} cuda_act;

typedef struct cuda_linear_w {
    const uint16_t *w; /* [N, K] bf16 */
    const void *b;     /* [N] of bdt (DT_BF16 or DT_F32), or NULL */
    dtype bdt;
    int n_out, n_in; /* N, K */
} cuda_linear_w;

/* y[T, N] (row stride ldy, dtype ydt F32 or BF16) = act(x[T, K]·Wᵀ + b)
 * (+ y when accumulate; accumulate and an activation do not combine).
 * x is bf16 with row stride ldx. T <= 8 (cuda_ctx_set_gemv_max) runs the
 * GEMV kernel (W streamed once, 16-byte loads); larger T runs cuBLASLt (bf16 × bf16, fp32
 * accumulation, bias and GELU in its epilogue where cuBLASLt offers them).
 * Needs K % 8 == 0, ldx % 8 == 0 and x, W 16-byte aligned. */
albedo_status cuda_linear(cuda_ctx *c, void *y, dtype ydt, int ldy, const uint16_t *x, int ldx, int T,
                          const cuda_linear_w *L, cuda_act act, int accumulate);

/* ---- normalisation, activations, elementwise ------------------------------ */

/* y[T, C] = (x - mean) / sqrt(var + eps) * g + b per row (biased variance);
 * x and y of dtypes xdt, ydt (F32 or BF16), g and b [C] of pdt. y may be x
 * when xdt == ydt. */
albedo_status cuda_layernorm(cuda_ctx *c, void *y, dtype ydt, const void *x, dtype xdt, int T, int C, const void *g,
                             const void *b, dtype pdt, float eps);
/* The same with row strides: x [T, ldx], y [T, ldy] (ldx, ldy >= C; the
 * columns C..ld-1 of y are not written). cuda_layernorm is ldx = ldy = C. */
albedo_status cuda_layernorm_ld(cuda_ctx *c, void *y, dtype ydt, int ldy, const void *x, dtype xdt, int ldx, int T,
                                int C, const void *g, const void *b, dtype pdt, float eps);
/* In place on n elements of dtype dt. */
albedo_status cuda_gelu_tanh(cuda_ctx *c, void *x, dtype dt, size_t n);
albedo_status cuda_gelu_erf(cuda_ctx *c, void *x, dtype dt, size_t n);

/* y[i] += x[i], each of its own dtype. */
albedo_status cuda_add(cuda_ctx *c, void *y, dtype ydt, const void *x, dtype xdt, size_t n);

/* x[t, :] = table[ids[t], :] as float32, for t < T; table [V, C] bf16, ids
 * int32 on the device (so a sampled token never visits the host). An id
 * outside [0, V) writes NaN. */
albedo_status cuda_embed(cuda_ctx *c, float *x, const uint16_t *table, int V, int C, const int32_t *ids, int T);

/* ---- rotary embedding fused with the KV-cache write ----------------------- */

typedef struct cuda_rope {
    /* x [T, ldx] bf16: H query heads of D dims at columns h*D, then Hkv key
     * heads at (H + g)*D, then Hkv value heads at (H + Hkv + g)*D (a fused
     * qkv projection's output). */
    uint16_t *x;
    int ldx;
    int T, H, Hkv, D, R;        /* R rotated dims (even, <= D) of each head */
    int pos0;                   /* absolute position of row 0 */
    const float *cos_t, *sin_t; /* [P, R/2], P > pos0 + T - 1 */
    /* Caches [Hkv, n_ctx, D] bf16 (kv head g, position p at (g*n_ctx + p)*D),
     * or NULL: then the key heads are rotated in place and values left.
     * With kv_fp8 they hold e4m3 bytes at the same element offsets (below). */
    void *k_cache, *v_cache;
    int n_ctx;
    /* When not NULL, the position of row 0 is read from this device int at
     * run time instead of pos0 (so that a captured graph replays at every
     * position); the caller guarantees *pos_dev + T <= n_ctx. */
    const int *pos_dev;
    /* Paged form (the engine's pool), when not NULL: device int32 [T][2],
     * row t's position and its row in the caches, which are then
     * token-major, [rows, Hkv*D] (kv head g of cache row r at
     * (r*Hkv + g)*D); pos0, pos_dev and n_ctx are not used. */
    const int32_t *rows;
    /* FP8 cache (sm_89+ in the model; the kernels run on any sm_80+): each
     * cached element is e4m3(x / scale), saturated to ±448, with one scale
     * per tensor: k_scale for keys, v_scale for values (cuda_attn reads
     * them back as e4m3 · scale). 0: bf16 caches, the scales unused. */
    int kv_fp8;
    float k_scale, v_scale;
} cuda_rope;

/* Half-split (NeoX) rotation of ops.h's rope on the first R dims of each
 * query and key head; queries rotated in place; rotated keys and the values
 * written to the caches at positions pos0 .. pos0+T-1. Hkv = 0 rotates the
 * H heads of x only (ops.h's rope). */
albedo_status cuda_rope_kv(cuda_ctx *c, const cuda_rope *r);

/* ---- attention ------------------------------------------------------------ */

/* out = softmax(mask(q·kᵀ·scale))·v per head and sequence, with ops.h's
 * mask: query row t (position pos0 + t) sees key j when j <= pos0 + t, or
 * when both are < n_prefix. All n_seq sequences (the crops of an image, or
 * a batch) run in one launch. bf16 in and out, float32 softmax. Element
 * addresses (in elements):
 *   q:   q + s*q_seq + t*ldq + h*D            (t < T, h < H)
 *   k,v: k + s*k_seq + g*k_head + j*ldk + d   (j < S, g < Hkv; g = h / (H/Hkv))
 *   out: out + s*o_seq + t*ldo + h*D
 * so k/v may be token-major (k_head = D) or a head-major cache (ldk = D,
 * k_head = n_ctx*D). T <= 8 runs split-key decode attention (key chunks
 * spread over the SMs, merged by the last block); larger T runs the
 * tensor-core flash kernel (64 queries × 64 keys per tile, online softmax).
 * Needs D % 8 == 0, D <= 128, H % Hkv == 0, and q, k, v 16-byte aligned
 * with every stride a multiple of 8 elements.
 * The decode kernel (T <= 8) reads the keys and values before position
 * pos0 (a segment's pos0_s) before its PDL wait, that is possibly while the
 * kernels issued ahead of it still run: those must have been written by
 * earlier steps (rope_kv writes only from pos0 on). q and the keys from
 * pos0 on are read after the wait. */
typedef struct cuda_attn {
    int T, S, H, Hkv, D;
    int pos0, n_prefix;
    float scale;
    int n_seq;
    const uint16_t *q;
    long ldq, q_seq;
    const void *k; /* bf16, or e4m3 bytes with kv_fp8 (strides in elements either way) */
    long ldk, k_head, k_seq;
    const void *v;
    long ldv, v_head, v_seq;
    uint16_t *out;
    long ldo, o_seq;
    /* Decode (T <= 8) only: when not NULL, pos0 is read from this device int
     * at run time and the visible keys are S = *pos_dev + T; the S field is
     * then the capacity (the most keys any replay may see), which sizes the
     * launch. For CUDA graphs replayed at every position. */
    const int *pos_dev;
    /* Segments (the engine's batched steps), when not NULL: device int32
     * [n_seq][4] = {row0, T_s, pos0_s, n_prefix_s}: sequence s has T_s
     * query rows at q/out rows row0 .. row0+T_s-1 (q_seq, o_seq unused) at
     * positions pos0_s.., seeing keys 0 .. pos0_s+T_s-1 with its own
     * bidirectional prefix. T is then the largest T_s (it sizes the launch
     * and picks the kernel), S the most keys any sequence may see, and
     * pos0, n_prefix, pos_dev are not used. */
    const int32_t *seg;
    /* Paged keys, when not NULL: key j of sequence s is cache row
     * blocks[s*blocks_ld + j/block_size]*block_size + j%block_size, i.e.
     * at k + g*k_head + row*ldk (k_seq, v_seq unused). */
    const int32_t *blocks;
    int block_size, blocks_ld;
    /* K and V are e4m3 caches (cuda_rope's kv_fp8): key = e4m3 · k_scale,
     * value = e4m3 · v_scale, widened in registers (decode) or to bf16 in
     * shared memory (flash: e4m3 is exact in bf16; k_scale joins the
     * softmax scale and v_scale the output). 8-element alignment as for
     * bf16. */
    int kv_fp8;
    float k_scale, v_scale;
} cuda_attn;

albedo_status cuda_attention(cuda_ctx *c, const cuda_attn *a);

/* ---- sampling --------------------------------------------------------------- */

/* ids[r] = argmax of row r of logits [n_rows, ld] (float32, V columns);
 * the first index wins a tie, NaN never wins. */
albedo_status cuda_argmax(cuda_ctx *c, int32_t *ids, const float *logits, int n_rows, int V, long ld);

/* Nucleus sampling with temperature, per row: p ∝ exp(logit / temperature),
 * the kept set is the tokens whose strictly more probable tokens hold at
 * most top_p of the mass (sampler.c's rule), and one of them is drawn with
 * its probability. The draw is a hash of (seed, row, counter[row]), and
 * counter[row] is incremented, so a replayed graph draws fresh numbers;
 * counter may be NULL (then the counter is 0). temperature <= 0 is argmax.
 * V <= 65536. ld may be 0 (every row reads the same logits). */
albedo_status cuda_sample(cuda_ctx *c, int32_t *ids, const float *logits, int n_rows, int V, long ld, float temperature,
                          float top_p, uint64_t seed, uint64_t *counter);

/* ==== Moondream 3: tau attention and the mixture of experts (moe.cu) ======== */

/* y[t, c] = gelu_erf(x[t, c]) for t < T, c < C; x and y bf16 with row
 * strides ldx, ldy (tau's features f = gelu_erf(qkv)). */
albedo_status cuda_gelu_erf_rows(cuda_ctx *c, uint16_t *y, int ldy, const uint16_t *x, int ldx, int T, int C);

/* Tau's scaling of Q and V (spec/model.md §10.3), in place, before rotary
 * and the cache write: for row t at position p = pos0 + t (pos0 read from
 * *pos_dev when not NULL; p = pos_rows[t · pos_stride] when pos_rows is not
 * NULL: the engine's paged steps, whose rows belong to several sequences)
 * and head h,
 *   τ(p) = 1 + (sigmoid(alpha[h]·ln(p + 1)) − 0.5)   (ln of bf16-rounded
 *          positions when pos_bf16, as text.c),
 *   q[t, h·D + d]        *= tanh(scores[t, h])     + τ(p)
 *   q[t, voff + h·D + d] *= tanh(scores[t, H + h]) + τ(p)
 * with scores [T, lds] float32 (the H query scores, then the H value
 * scores: f·wqᵀ and f·wvᵀ) and alpha [H] float32. */
/* Tau's scores for few rows (decode): scores[t, r] = Σ_c gelu_erf(qkv[t, c])
 * · w[r, c] for t < T <= CUDA_TAU_SCORES_MAX_T, r < n_rows, with the GELU
 * rounded to bf16 as cuda_gelu_erf_rows stores it (so that it matches
 * cuda_gelu_erf_rows followed by cuda_linear); w [n_rows, C] bf16, C and ldq
 * multiples of 8; scores float32 with row stride lds. One launch. */
#define CUDA_TAU_SCORES_MAX_T 4
albedo_status cuda_tau_scores(cuda_ctx *c, float *scores, int lds, const uint16_t *qkv, int ldq, int T, int C,
                              const uint16_t *w, int n_rows);

typedef struct cuda_tau {
    uint16_t *qkv;
    int ldq, voff;
    int T, H, D;
    const float *scores;
    int lds;
    const float *alpha;
    int pos0;
    const int *pos_dev;
    const int *pos_rows; /* device [T, pos_stride]: each row's position, or NULL */
    int pos_stride;
    int pos_bf16;
} cuda_tau;
albedo_status cuda_tau_scale(cuda_ctx *c, const cuda_tau *a);

#define CUDA_MOE_MAX_K 16             /* experts per token */
#define CUDA_MOE_GEMV_MAX_T 4         /* cuda_moe_mlp: GEMVs up to this many tokens */
#define CUDA_MOE_MAX_ASSIGN (1 << 20) /* T·K */

/* Routing: for each of T rows of logits [T, ldl] (float32, E columns), the
 * K largest (ties to the lower index; NaN ranks below every number) into
 * sel [T, K] in descending order, and their softmax over those K alone into
 * wt [T, K] (float32, text.c's order of operations). K <= CUDA_MOE_MAX_K. */
albedo_status cuda_moe_route(cuda_ctx *c, int32_t *sel, float *wt, const float *logits, long ldl, int T, int E, int K);

/* The mixture-of-experts MLP of T tokens, added into x (or stored: .store):
 *   x[t] += Σ_k wt[t,k] · (gelu_erf(a) · (g + 1)) · W2[e]ᵀ,  e = sel[t,k],
 *   a = h[t]·W1[e][0:I]ᵀ, g = h[t]·W1[e][I:2I]ᵀ.
 * W1 [E, 2I, ld1] and W2 [E, dim, ld2] bf16 (ld1 >= dim, ld2 >= I, both
 * multiples of 8, the padding columns zeros); h [T, ldh] bf16 (ldh >= ld1,
 * a multiple of 8, columns dim..ld1-1 zeros); x [T, ldx] float32. Only the
 * selected experts' weights are read. T <= CUDA_MOE_GEMV_MAX_T (or path 1)
 * runs two GEMV launches; more tokens (or path 2) are grouped by expert on
 * the device and run a grouped GEMM per weight matrix. scratch: device
 * memory of cuda_moe_scratch_bytes(T, E, K, dim, I) bytes (or more, for a
 * larger T). Graph-capturable. */
typedef struct cuda_moe {
    int T, E, K, dim, inner;
    const uint16_t *w1;
    int ld1;
    const uint16_t *w2;
    int ld2;
    const uint16_t *h;
    int ldh;
    const int32_t *sel;
    const float *wt;
    float *x;
    int ldx;
    void *scratch;
    /* FP8 experts (docs/CUDA.md, FP8 experts): when q1 is set, W1 and W2
     * are e4m3 bytes q1 [E, 2I, ldq1] and q2 [E, dim, ldq2] (ldq1 >= dim,
     * ldq2 >= I, both multiples of 16, padding zeros) with one float scale
     * per row, s1 [E, 2I] and s2 [E, dim]: W[r][c] = e4m3(q[r][c])·s[r]
     * (cuda_quant_e4m3_rows); w1, w2, ld1 and ld2 are then unused, and h
     * needs ldh >= dim rounded up to 8. Needs sm_89+ for speed (older
     * cards convert in software). */
    const uint8_t *q1, *q2;
    int ldq1, ldq2;
    const float *s1, *s2;
    int path;  /* 0: by T; 1: the GEMVs; 2: grouped (for tests) */
    int store; /* 1: x[t] = Σ (x only written: the decode graph's branch, whose
                * sum joins x later); 0: x[t] += Σ. The same float sum either
                * way, so x + (stored Σ) equals the added form bit for bit. */
    int gemm;  /* grouped GEMM tiles (rows, K step, stages): WMMA 1: 64, 32, 2; 2: 64, 64, 3;
               * 3: 128, 32, 2; 4: 128, 64, 3; mma.sync 5: 128, 64, 3; 6: 128, 32, 4;
               * 7: 64, 64, 3; the same on 8 warps 8: 128, 64, 3; 9: 128, 32, 4;
               * 0: by T·K (below) */
} cuda_moe;
/* The tiles measured best on an H100 (bench/cuda/bench_moe.cu, one lease;
 * docs/CUDA.md, Moondream 3): for fewer than CUDA_MOE_GEMM_LARGE_TK
 * assignments (decode steps of 5 or more rows, prompts: bound by reading the
 * touched experts) the mma.sync kernel on 4 warps, 128-row tiles (64 rows
 * of 2048 × 8 experts: 0.342 ms against the WMMA tiles' 0.352; fp8 0.310
 * against 0.329); from there on (an image prefix: 730 rows × 8) the same on
 * 8 warps (0.451 ms against 0.627; fp8 0.463 against 0.682). (The WMMA
 * kernel kept 64-row tiles for the model's uneven routing; the mma.sync
 * kernel skips the 16-row slabs past a group's last row.) */
#define CUDA_MOE_GEMM_SMALL 5
#define CUDA_MOE_GEMM_LARGE 8
#define CUDA_MOE_GEMM_LARGE_TK 1024
#define CUDA_MOE_GEMM_SHAPES 9
size_t cuda_moe_scratch_bytes(int T, int E, int K, int dim, int inner);

/* Per-row e4m3 quantisation (FP8 experts): for each of the rows rows of w
 * (bf16 [rows, ldw], cols values), scale[r] = max|w[r]| / 448 (1 for a row
 * of zeros) and q[r][c] = e4m3(w[r][c] · (448 / max|w[r]|)), rounded to
 * nearest even and saturated; q [rows, ldq] bytes, columns cols..ldq-1
 * zeros. ldq >= cols. The result decodes as q·scale. */
albedo_status cuda_quant_e4m3_rows(cuda_ctx *c, uint8_t *q, int ldq, float *scale, const uint16_t *w, int ldw,
                                   long rows, int cols);
albedo_status cuda_moe_mlp(cuda_ctx *c, const cuda_moe *m);

#ifdef __cplusplus
}
#endif
#endif
