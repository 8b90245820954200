/*
 * model_cuda.cu — Moondream 2 on the GPU, whole stages at a time
 * (model_cuda.h): the weight upload, a session's device memory, and the
 * three stages the stage files hand over — vision, the image prefix, and
 * text forwards — composed from the kernels of ops_cuda.h plus the few
 * model-shaped kernels below (patchify, position embeddings, crop
 * stitching and pooling). Not a backend of ops.h: the stages run here
 * end to end so that activations never visit the host.
 *
 *   vision, n crops u8 [n, 378, 378, 3] (groups of max_crops + 1)
 *     patchify_kernel                 patches bf16 [n·729, 592] (588 + zeros)
 *     pos_kernel; linear(+=)          vx f32 [n·729, 1152] = pos + patch·Wᵀ + b
 *     27 × { layernorm → vh bf16; linear → vqkv bf16 [.., 3456];
 *            attention (n crops in one launch) → vatt bf16; linear(+=) → vx;
 *            layernorm → vh; linear+gelu → vf bf16 [.., 4304]; linear(+=) → vx }
 *     layernorm in place (post_ln)
 *     global_kernel (crop 0), pool_kernel (tiles stitched, margins trimmed,
 *       adaptive average 27×27, accumulated group by group) → cat bf16 [729, 2304]
 *     linear+gelu → mid bf16 [729, 8192]; linear → x rows 1..729 (f32)
 *   prefix: embed(BOS) → x row 0; text layers over T = 730, bidirectional
 *   text, T rows at pos0 (x f32 [T, 2048]):
 *     24 × { layernorm → h bf16; linear → qkv bf16 [T, 6144];
 *            rope + KV-cache write; attention over the cache → att bf16;
 *            linear(+=) → x; linear+gelu → f bf16 [T, 8192]; linear(+=) → x }
 *     layernorm(last row) → linear → logits f32 [51200]
 *   the engine's paged steps: the same over all segments' rows, then the
 *     logits rows down, or masked and picked on the device (pick_rows)
 *   decode steps (the session's graph, the engine's one-row-a-sequence
 *     steps): each layer's MLP (Moondream 3: router, top-k, experts) on a
 *     second stream beside qkv … proj, joined by x += y2 (mlp_branch)
 *   KV caches (session, prefix slots, pool): bf16, or e4m3 bytes with
 *     kv_fp8 (one scale per tensor: k_scale, v_scale; docs/CUDA.md)
 *   Moondream 3 (model_cuda_md3.cu): md3_tau after the qkv linear (q, v
 *     scaled before rope + cache write), md3_moe for fc1/fc2 from the first
 *     MoE layer on, in sessions and in the engine's paged steps (tau's
 *     positions per row from the step's metadata).
 *
 * Linears whose K is not a multiple of 8 (patch embedding 588; some test
 * widths) get weights padded with zero columns at upload and activations
 * whose padding columns hold zeros: the buffers are zeroed once when the
 * state is made and nothing writes their padding afterwards.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "cuda_internal.cuh"
#include "model_cuda.h"
#include "model_cuda_md3.h"

static int round8(int v) { return (v + 7) / 8 * 8; }

/* ---- model-shaped kernels ----------------------------------------------------- */

/* Row t = crop·np + py·ns + px of the patch matrix: element ch·P·P + dy·P + dx
 * (patch_emb's column order) is pixel (py·P + dy, px·P + dx) of channel ch,
 * scaled to [-1, 1] as the reference's (x/255 - 0.5)/0.5. Columns pd..ld-1
 * are zeros. */
__global__ void patchify_kernel(bf16 *out, int ld, const uint8_t *px, int cs, int P, int ns, int pd) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x, npp = ns * ns;
    const int crop = t / npp, pi = t % npp, py = pi / ns, pxi = pi % ns;
    const uint8_t *img = px + (size_t)crop * cs * cs * 3;
    for (int e = threadIdx.x; e < ld; e += blockDim.x) {
        float v = 0.0f;
        if (e < pd) {
            const int ch = e / (P * P), rem = e % (P * P), dy = rem / P, dx = rem % P;
            const uint8_t u = img[((size_t)(py * P + dy) * cs + (pxi * P + dx)) * 3 + ch];
            v = ((float)u / 255.0f - 0.5f) / 0.5f;
        }
        out[(size_t)t * ld + e] = __float2bfloat16_rn(v);
    }
}

/* x[t, :] = pos[t % np, :] for T rows of C: the position embeddings, which
 * the patch embedding then adds into (linear with accumulate). */
__global__ void pos_kernel(float *x, const float *pos, int np, int C, long n) {
    pdl_trigger();
    pdl_wait();
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long t = i / C;
        x[i] = pos[(t % np) * C + i % C];
    }
}

/* cat[p, 0:C] = feat[p, :] (the global crop) for np rows. */
__global__ void global_kernel(bf16 *cat, int ldc, const float *feat, int C) {
    pdl_trigger();
    pdl_wait();
    const int p = blockIdx.x;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
        cat[(size_t)p * ldc + c] = __float2bfloat16_rn(feat[(size_t)p * C + c]);
}

/* Grid row (or column) y of the stitched tiles: its tile i and the row in
 * that tile. Tile i contributes rows [mg, ns - mg) (the first from 0, the
 * last up to ns) placed at i·step + row, step = ns - 2·mg (vision.c's
 * pool_local). */
__device__ __forceinline__ int tile_of(int y, int mg, int step, int n_tiles) {
    int i = y < mg ? 0 : (y - mg) / step;
    return i < n_tiles - 1 ? i : n_tiles - 1;
}

/* The adaptive average pool of the stitched local tiles, output cell
 * blockIdx.x = r·ns + q covering grid rows [⌊r·Hg/ns⌋, ⌈(r+1)·Hg/ns⌉) and
 * the same for columns (torch adaptive_avg_pool2d): adds the mean's terms
 * of the tiles k0 <= k < k1 (local tile k's features at feat + (k - kofs)
 * crops) into pool [np, C]. Called once per group of crops. */
__global__ void pool_kernel(float *pool, const float *feat, int C, int ns, int mg, int th, int tw, int k0, int k1,
                            int kofs) {
    pdl_trigger();
    pdl_wait();
    const int cell = blockIdx.x, r = cell / ns, q = cell % ns;
    const int step = ns - 2 * mg, Hg = step * th + 2 * mg, Wg = step * tw + 2 * mg;
    const int y0 = (r * Hg) / ns, y1 = ((r + 1) * Hg + ns - 1) / ns;
    const int x0 = (q * Wg) / ns, x1 = ((q + 1) * Wg + ns - 1) / ns;
    const float inv = 1.0f / (float)((y1 - y0) * (x1 - x0));
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float s = 0.0f;
        for (int y = y0; y < y1; y++) {
            const int i = tile_of(y, mg, step, th), rr = y - i * step;
            for (int x = x0; x < x1; x++) {
                const int j = tile_of(x, mg, step, tw), cc = x - j * step, k = i * tw + j;
                if (k >= k0 && k < k1) s += feat[(((size_t)(k - kofs) * ns + rr) * ns + cc) * C + c];
            }
        }
        pool[(size_t)cell * C + c] += s * inv;
    }
}

/* cat[p, C:2C] = pool[p, :]; columns 2C..ldc-1 zeros. */
__global__ void local_kernel(bf16 *cat, int ldc, const float *pool, int C) {
    pdl_trigger();
    pdl_wait();
    const int p = blockIdx.x;
    for (int c = C + threadIdx.x; c < ldc; c += blockDim.x)
        cat[(size_t)p * ldc + c] = __float2bfloat16_rn(c < 2 * C ? pool[(size_t)p * C + c - C] : 0.0f);
}

/* ---- the device model ------------------------------------------------------------ */

typedef struct dlin {
    cuda_linear_w w; /* w.n_in: K padded to a multiple of 8 (the row stride of w) */
    int k;           /* the layer's own K */
} dlin;

typedef struct dvblock {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b; /* [enc_dim] */
    dlin qkv, proj, fc1, fc2;
} dvblock;

typedef struct dtblock {
    float *ln_w, *ln_b; /* [dim] */
    dlin qkv, proj, fc1, fc2;
} dtblock;

#define PREFIX_SLOTS_MAX 64

struct mdc_model {
    int device;
    mdc_desc d; /* shapes; its host pointers are not used after the upload */
    /* derived shapes */
    int ns, np, pd, vD, qkvw, H, Hkv, D;
    unsigned char *wmem; /* every weight, one allocation */
    size_t wbytes;
    dlin patch_emb, proj_fc1, proj_fc2, lm_head;
    float *pos_emb; /* [np, enc_dim] */
    dvblock vb[128];
    float *post_w, *post_b; /* [enc_dim] */
    uint16_t *wte;          /* [vocab, dim] bf16 */
    dtblock tb[128];
    float *tpost_w, *tpost_b; /* [dim] */
    float *cos_t, *sin_t;     /* [max_context, rot_dims/2] */
    /* image prefix KV slots: [n_layers][k|v][Hkv][prefix_attn][D] bf16 each */
    pthread_mutex_t mu;
    size_t prefix_bytes;
    unsigned char *slot_mem;
    int n_slots;
    unsigned char slot_used[PREFIX_SLOTS_MAX];
    md3_model *md3; /* Moondream 3's tau and experts (model_cuda_md3.cu), or NULL */
    /* KV cache element: bf16, or e4m3 (kv_fp8) storing x / scale */
    int kv_fp8;
    size_t kv_es; /* bytes of an element: 2 or 1 */
    float k_scale, v_scale;
    char describe[320];
};

struct mdc_prefix {
    mdc_model *m;
    unsigned char *p;
    int slot; /* -1: its own allocation */
};

struct mdc_state {
    mdc_model *m;
    cuda_ctx *ctx;
    cudaStream_t st;
    int max_ctx, vcap;     /* positions; crops per vision group (0: no vision memory) */
    int rows, seqs;        /* text rows of working memory; sequences of a paged step */
    int bt_ld, stage_rows; /* block-table entries per sequence (paged states); pinned rows up */
    int flags;             /* MDC_KV, MDC_VISION */
    unsigned char *mem;
    size_t mem_bytes;
    /* text */
    float *x;          /* [max_ctx, dim] */
    uint16_t *h;       /* [max_ctx, dimp] */
    uint16_t *qkv;     /* [max_ctx, qkvw] */
    uint16_t *att;     /* [max_ctx, H*D] */
    uint16_t *f;       /* [max_ctx, ffp] */
    float *logits;     /* [seqs, vocab] */
    float *xg;         /* [seqs, dim]: the last row of each sequence of a paged step */
    int32_t *meta;     /* paged steps: rows, segments, block tables, gathered rows (see paged_meta) */
    int32_t *ids;      /* [8]: ids[0] = bos */
    int *pos_dev;      /* [4]: the decode graph's position, then the two ids its pick masks (-1: none) */
    unsigned char *kv; /* [n_layers][2][Hkv][max_ctx][D] of kv_es bytes */
    /* vision */
    uint8_t *crops;    /* [vcap, cs, cs, 3] */
    uint16_t *patches; /* [vcap·np, pdp] */
    float *vx;         /* [vcap·np, C] */
    uint16_t *vh;      /* [vcap·np, Cp] */
    uint16_t *vqkv;    /* [vcap·np, 3C] */
    uint16_t *vatt;    /* [vcap·np, C] */
    uint16_t *vf;      /* [vcap·np, ffvp] */
    float *pool;       /* [np, C] */
    uint16_t *cat;     /* [np, catp] */
    uint16_t *mid;     /* [np, pip] */
    /* host */
    float *stage; /* pinned: [STAGE_ROWS, dim] rows up, one row (hidden) down, the position */
    float *stage_hidden;
    int *stage_pos;    /* [3]: position and masked ids, up in one copy */
    float *logits_pin; /* pinned [vocab], when logits_host could not be page-locked */
    float *logits_host, *hidden_host;
    int reg_logits;
    /* paged steps: pinned mirrors of meta and of xg (the hidden rows down) */
    int32_t *meta_h;
    size_t meta_cap; /* ints */
    float *down_hidden;
    cudaGraphExec_t *pgraph; /* [seqs + 1]: the decode step of n sequences */
    int *pseen;              /* [seqs + 1]: eager steps of n sequences so far */
    unsigned char *pfork;    /* [seqs + 1]: whether pgraph[n] was captured forked */
    int *gorder;             /* [seqs]: the segment of each gathered row */
    /* device picks (mdc_pick): per gathered row the picked id, the two
     * masked ids (-1: none) and the draw's counter; pinned mirrors */
    int32_t *pick_ids, *pick_mask;
    uint64_t *pick_ctr;
    unsigned char *pick_hmem;
    int32_t *pick_ids_h, *pick_mask_h;
    uint64_t *pick_ctr_h;
    /* decode graph */
    int graphs; /* allowed */
    cudaGraphExec_t graph;
    /* The decode steps' second branch (mlp_branch): the MLP (or the
     * experts) on ctx2's stream beside qkv, rotary and attention; made at
     * the first forked step (fork_ready) unless ALBEDO_CUDA_FORK=0. */
    cuda_ctx *ctx2;
    cudaEvent_t ev_fork, ev_join;
    int fork;        /* 0: one chain; 1: fc1 of dense layers on the branch; 2: the whole MLP (into y2) */
    int fork_layers; /* layers the last forked capture or paged step branched */
    float *y2;       /* [fork_rows, dim]: the branch's output, added into x after the join */
    int n_captured, last_graph;
    char graph_err[512];  /* why capturing failed, if it did */
    md3_state *md3;       /* Moondream 3's working memory, or NULL */
    albedo_status sticky; /* a failed asynchronous prefix load, reported by the next forward */
    char sticky_msg[256];
};

#define STAGE_ROWS 64

/* ---- errors ---------------------------------------------------------------------- */

#define CK(call)                                                                                                  \
    do {                                                                                                          \
        cudaError_t e_ = (call);                                                                                  \
        if (e_ != cudaSuccess) return errf(e, cuda_status_of(e_), "cuda: %s: %s", #call, cudaGetErrorString(e_)); \
    } while (0)

/* An op of ops_cuda.h: its detail is in the context. */
#define OPK(call)                                                                    \
    do {                                                                             \
        albedo_status s_ = (call);                                                   \
        if (s_ != ALBEDO_OK) return errf(e, s_, "cuda: %s", cuda_ctx_error(s->ctx)); \
    } while (0)

#define LAUNCH(kern, grid, block, ...)                                                                            \
    do {                                                                                                          \
        cudaError_t e_ = launch_k(s->ctx, kern, dim3(grid), dim3(block), 0, __VA_ARGS__);                         \
        if (e_ == cudaSuccess) e_ = cudaGetLastError();                                                           \
        if (e_ != cudaSuccess) return errf(e, cuda_status_of(e_), "cuda: %s: %s", #kern, cudaGetErrorString(e_)); \
    } while (0)

/* ---- weight upload ------------------------------------------------------------------- */

/* Two passes over the weights: the first sizes the allocation (pointers
 * stay NULL), the second places and copies. Conversions (F16/F32 to bf16,
 * K padding, float32 parameters) go through a host staging buffer. */
typedef struct upl {
    mdc_model *m;
    int pass;
    size_t off;
    albedo_status st;
    errbuf *e;
    void *stage;
    size_t stage_bytes;
} upl;

static void *take(upl *u, size_t bytes) {
    const size_t o = (u->off + 255) & ~(size_t)255;
    u->off = o + bytes;
    return u->pass ? u->m->wmem + o : NULL;
}

static float host_get(const void *p, dtype dt, size_t i) {
    if (dt == DT_F32) return ((const float *)p)[i];
    if (dt == DT_F16) return f16_to_f32(((const uint16_t *)p)[i]);
    return bf16_to_f32(((const uint16_t *)p)[i]);
}

static int plain_dt(dtype dt) { return dt == DT_F32 || dt == DT_F16 || dt == DT_BF16; }

static void upl_copy(upl *u, void *dst, const void *src, size_t bytes) {
    if (u->st) return;
    cudaError_t ce = cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
    if (ce != cudaSuccess)
        u->st = errf(u->e, cuda_status_of(ce), "cuda: uploading weights: %s", cudaGetErrorString(ce));
}

/* n elements of a host vector as float32 on the device. */
static float *put_f32(upl *u, const void *p, dtype dt, size_t n, const char *what) {
    float *d = (float *)take(u, n * 4);
    if (!u->pass || u->st) return d;
    if (!p || !plain_dt(dt)) {
        u->st = errf(u->e, ALBEDO_ERR_UNSUPPORTED, "cuda: %s: dtype %s", what, p ? dtype_name(dt) : "(missing)");
        return d;
    }
    const size_t chunk = u->stage_bytes / 4;
    float *tmp = (float *)u->stage;
    for (size_t i0 = 0; i0 < n && !u->st; i0 += chunk) {
        const size_t k = n - i0 < chunk ? n - i0 : chunk;
        for (size_t i = 0; i < k; i++) tmp[i] = host_get(p, dt, i0 + i);
        upl_copy(u, d + i0, tmp, k * 4);
    }
    return d;
}

/* A [rows, K] host matrix as bf16 [rows, Kp] on the device, zero padded. */
static uint16_t *put_bf16(upl *u, const void *p, dtype dt, int rows, int K, int Kp, const char *what) {
    uint16_t *d = (uint16_t *)take(u, (size_t)rows * Kp * 2);
    if (!u->pass || u->st) return d;
    if (!p || !plain_dt(dt)) {
        u->st =
            errf(u->e, ALBEDO_ERR_UNSUPPORTED, "cuda: %s: dtype %s (the CUDA backend takes F32, F16 or BF16 weights)",
                 what, p ? dtype_name(dt) : "(missing)");
        return d;
    }
    if (dt == DT_BF16 && K == Kp) {
        upl_copy(u, d, p, (size_t)rows * K * 2);
        return d;
    }
    const int per = (int)(u->stage_bytes / 2 / (size_t)Kp);
    uint16_t *tmp = (uint16_t *)u->stage;
    for (int r0 = 0; r0 < rows && !u->st; r0 += per) {
        const int k = rows - r0 < per ? rows - r0 : per;
        for (int r = 0; r < k; r++)
            for (int c = 0; c < Kp; c++)
                tmp[(size_t)r * Kp + c] = c < K ? f32_to_bf16(host_get(p, dt, (size_t)(r0 + r) * K + c)) : (uint16_t)0;
        upl_copy(u, d + (size_t)r0 * Kp, tmp, (size_t)k * Kp * 2);
    }
    return d;
}

/* A linear layer; its bias in float32 when the layer writes float32 (the
 * residual adds, the LM head), else bf16, so that cuBLASLt fuses it. */
static void put_lin(upl *u, dlin *dl, const op_linear *L, int bias_f32, const char *what) {
    const int N = L->n_out, K = L->n_in, Kp = round8(K);
    dl->k = K;
    dl->w.n_out = N;
    dl->w.n_in = Kp;
    dl->w.w = put_bf16(u, L->w, L->dt, N, K, Kp, what);
    dl->w.b = NULL;
    dl->w.bdt = bias_f32 ? DT_F32 : DT_BF16;
    if (!L->b) return;
    if (bias_f32) {
        dl->w.b = put_f32(u, L->b, L->bdt, (size_t)N, what);
    } else {
        dl->w.b = put_bf16(u, L->b, L->bdt, 1, N, N, what);
    }
}

static void upload(upl *u) {
    mdc_model *m = u->m;
    const mdc_desc *d = &m->d;
    char what[96];
    put_lin(u, &m->patch_emb, &d->patch_emb, 1, "vision patch embedding");
    m->pos_emb = put_f32(u, d->pos_emb.p, d->pos_emb.dt, (size_t)m->np * d->enc_dim, "vision pos_emb");
    for (int l = 0; l < d->enc_layers; l++) {
        const mdc_vblock *b = &d->vb[l];
        dvblock *o = &m->vb[l];
        snprintf(what, sizeof what, "vision block %d", l);
        o->ln1_w = put_f32(u, b->ln1_w.p, b->ln1_w.dt, (size_t)d->enc_dim, what);
        o->ln1_b = put_f32(u, b->ln1_b.p, b->ln1_b.dt, (size_t)d->enc_dim, what);
        o->ln2_w = put_f32(u, b->ln2_w.p, b->ln2_w.dt, (size_t)d->enc_dim, what);
        o->ln2_b = put_f32(u, b->ln2_b.p, b->ln2_b.dt, (size_t)d->enc_dim, what);
        put_lin(u, &o->qkv, &b->qkv, 0, what);
        put_lin(u, &o->proj, &b->proj, 1, what);
        put_lin(u, &o->fc1, &b->fc1, 0, what);
        put_lin(u, &o->fc2, &b->fc2, 1, what);
    }
    m->post_w = put_f32(u, d->post_ln_w.p, d->post_ln_w.dt, (size_t)d->enc_dim, "vision post_ln");
    m->post_b = put_f32(u, d->post_ln_b.p, d->post_ln_b.dt, (size_t)d->enc_dim, "vision post_ln");
    put_lin(u, &m->proj_fc1, &d->proj_fc1, 0, "vision projection fc1");
    put_lin(u, &m->proj_fc2, &d->proj_fc2, 1, "vision projection fc2");
    m->wte = put_bf16(u, d->wte.p, d->wte.dt, d->vocab, d->dim, d->dim, "text wte");
    for (int l = 0; l < d->n_layers; l++) {
        const mdc_tblock *b = &d->tb[l];
        dtblock *o = &m->tb[l];
        snprintf(what, sizeof what, "text block %d", l);
        o->ln_w = put_f32(u, b->ln_w.p, b->ln_w.dt, (size_t)d->dim, what);
        o->ln_b = put_f32(u, b->ln_b.p, b->ln_b.dt, (size_t)d->dim, what);
        put_lin(u, &o->qkv, &b->qkv, 0, what);
        put_lin(u, &o->proj, &b->proj, 1, what);
        if (d->md3 && !b->fc1.w) continue; /* Moondream 3's experts: model_cuda_md3.cu */
        put_lin(u, &o->fc1, &b->fc1, 0, what);
        put_lin(u, &o->fc2, &b->fc2, 1, what);
    }
    m->tpost_w = put_f32(u, d->tpost_w.p, d->tpost_w.dt, (size_t)d->dim, "text post_ln");
    m->tpost_b = put_f32(u, d->tpost_b.p, d->tpost_b.dt, (size_t)d->dim, "text post_ln");
    put_lin(u, &m->lm_head, &d->lm_head, 1, "text lm_head");
    const size_t rope_n = (size_t)d->max_context * (d->rot_dims / 2);
    m->cos_t = put_f32(u, d->rope_cos, DT_F32, rope_n, "rotary table");
    m->sin_t = put_f32(u, d->rope_sin, DT_F32, rope_n, "rotary table");
}

/* ---- a session's memory plan --------------------------------------------------------- */

/* Carve the state's buffers out of one allocation (base NULL: size only). */
/* Rows a linear runs over for T rows: T up to the GEMV's 2, else a bucket,
 * so that a context's 64 cuBLASLt plans cover every step size (the rows
 * past T hold stale, finite values and their outputs are never read). */
static int gemm_rows(int T, int cap) {
    static const int b[] = {4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512};
    int r = T;
    if (T > 2) {
        r = (T + 127) / 128 * 128;
        for (size_t i = 0; i < sizeof b / sizeof b[0]; i++)
            if (T <= b[i]) {
                r = b[i];
                break;
            }
    }
    return r < cap ? r : cap;
}

static size_t state_layout(mdc_state *s, const mdc_model *m, int max_ctx, unsigned char *base) {
    const mdc_desc *d = &m->d;
    size_t off = 0;
#define CARVE(field, type, n)                      \
    do {                                           \
        off = (off + 255) & ~(size_t)255;          \
        if (base) s->field = (type *)(base + off); \
        off += (size_t)(n) * sizeof(type);         \
    } while (0)
    const size_t R = (size_t)s->rows, vt = (size_t)s->vcap * m->np, np = (size_t)m->np;
    const size_t nseq = (size_t)s->seqs;
    const int C = d->enc_dim;
    CARVE(x, float, R * d->dim);
    CARVE(h, uint16_t, R * round8(d->dim));
    CARVE(qkv, uint16_t, R * m->qkvw);
    CARVE(att, uint16_t, R * m->H * m->D);
    CARVE(f, uint16_t, R * round8(d->ff_dim));
    CARVE(logits, float, nseq * d->vocab);
    CARVE(xg, float, nseq * d->dim);
    CARVE(meta, int32_t, s->meta_cap);
    CARVE(ids, int32_t, 8);
    CARVE(pick_ids, int32_t, nseq);
    CARVE(pick_mask, int32_t, 2 * nseq);
    CARVE(pick_ctr, uint64_t, nseq);
    CARVE(pos_dev, int, 4);
    /* a session's decode step has one row; a paged decode step one a sequence (the linears' bucket) */
    CARVE(y2, float, (size_t)(s->meta_cap ? gemm_rows(s->seqs, s->rows) : 1) * d->dim);
    CARVE(kv, unsigned char,
          (s->flags & MDC_KV) ? (size_t)d->n_layers * 2 * m->Hkv *(size_t)max_ctx * m->D * m->kv_es : 0);
    CARVE(crops, uint8_t, (size_t)s->vcap * d->crop_size * d->crop_size * 3);
    CARVE(patches, uint16_t, vt * round8(m->pd));
    CARVE(vx, float, vt *C);
    CARVE(vh, uint16_t, vt * round8(C));
    CARVE(vqkv, uint16_t, vt * 3 * C);
    CARVE(vatt, uint16_t, vt * C);
    CARVE(vf, uint16_t, vt * round8(d->enc_ff));
    CARVE(pool, float, np *C);
    CARVE(cat, uint16_t, np * round8(2 * C));
    CARVE(mid, uint16_t, np * round8(d->proj_inner));
#undef CARVE
    return off;
}

/* What one session needs besides the weights: its buffers, the context's
 * cuBLASLt workspace and attention scratch (ctx.cu) and some slack. */
static size_t session_bytes(const mdc_model *m, int max_ctx) {
    mdc_state tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.rows = max_ctx, tmp.seqs = 1, tmp.flags = MDC_KV | MDC_VISION, tmp.vcap = m->d.max_crops + 1;
    return state_layout(&tmp, m, max_ctx, NULL) + ((size_t)48 << 20);
}

/* Ints of a paged step's metadata for rows rows and seqs sequences. */
static size_t meta_ints(int rows, int seqs, int bt_ld) {
    return (size_t)2 * rows + (size_t)8 * seqs + (size_t)2 * seqs * bt_ld + (size_t)seqs + 64;
}

/* ---- model ------------------------------------------------------------------------------ */

int mdc_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky "no device" */
        return 0;
    }
    return n;
}

void mdc_model_free(mdc_model *m) {
    if (!m) return;
    cudaSetDevice(m->device);
    cudaFree(m->wmem);
    cudaFree(m->slot_mem);
    md3_model_free(m->md3);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

const char *mdc_model_describe(const mdc_model *m) { return m ? m->describe : ""; }

int mdc_kv_elem_bytes(const mdc_model *m) { return (int)m->kv_es; }

static albedo_status check_shapes(const mdc_desc *d, errbuf *e) {
    const char *why = NULL;
    if (d->enc_heads <= 0 || d->enc_dim % d->enc_heads)
        why = "the vision width is not a multiple of its heads";
    else if ((d->enc_dim / d->enc_heads) % 8 || d->enc_dim / d->enc_heads > 128)
        why = "the vision head dimension is not a multiple of 8 up to 128";
    else if (d->head_dim % 8 || d->head_dim > 128)
        why = "the text head dimension is not a multiple of 8 up to 128";
    else if (d->n_kv_heads <= 0 || d->n_heads % d->n_kv_heads)
        why = "the query heads are not a multiple of the KV heads";
    else if (d->rot_dims % 2 || d->rot_dims > d->head_dim)
        why = "the rotated dimensions are odd or exceed the head";
    else if (d->in_ch != 3)
        why = "the vision input has other than 3 channels";
    else if (d->proj_out != d->dim)
        why = "the projection's output is not the text width";
    else if (d->enc_layers > 128 || d->n_layers > 128)
        why = "more than 128 layers";
    if (why) return errf(e, ALBEDO_ERR_UNSUPPORTED, "cuda: %s", why);
    return ALBEDO_OK;
}

albedo_status mdc_model_new(const mdc_desc *d, int device, mdc_model **out, errbuf *e) {
    *out = NULL;
    albedo_status st = check_shapes(d, e);
    if (st) return st;
    int n_dev = mdc_device_count();
    if (n_dev <= 0) return errf(e, ALBEDO_ERR_UNSUPPORTED, "cuda: no CUDA device is available");
    if (device < 0 || device >= n_dev)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "cuda: device %d does not exist (%d found)", device, n_dev);
    CK(cudaSetDevice(device));
    mdc_model *m = (mdc_model *)calloc(1, sizeof *m);
    if (!m) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    pthread_mutex_init(&m->mu, NULL);
    m->device = device;
    m->d = *d;
    m->ns = d->crop_size / d->patch;
    m->np = m->ns * m->ns;
    m->pd = d->in_ch * d->patch * d->patch;
    m->vD = d->enc_dim / d->enc_heads;
    m->H = d->n_heads;
    m->Hkv = d->n_kv_heads;
    m->D = d->head_dim;
    m->qkvw = (m->H + 2 * m->Hkv) * m->D;
    m->kv_fp8 = d->kv_fp8 != 0;
    m->kv_es = m->kv_fp8 ? 1 : 2;
    m->k_scale = m->v_scale = 1.0f;
    if (m->kv_fp8) {
        /* e4m3 conversions are instructions from sm_89 (Ada, Hopper) on. */
        int major = 0, minor = 0;
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
        if (major * 10 + minor < 89) {
            mdc_model_free(m);
            return errf(e, ALBEDO_ERR_UNSUPPORTED,
                        "cuda: the fp8 KV cache needs a GPU of sm_89 or newer (device %d is sm_%d%d)", device, major,
                        minor);
        }
        /* One scale per tensor, 1 unless ALBEDO_CUDA_KV_SCALE="k,v" says
         * otherwise (e4m3 spans 2^-9 .. 448; docs/CUDA.md). */
        const char *env = getenv("ALBEDO_CUDA_KV_SCALE");
        if (env && *env) {
            float ks = 0.0f, vs = 0.0f;
            if (sscanf(env, "%f,%f", &ks, &vs) != 2 || !(ks > 0.0f) || !(vs > 0.0f) || !isfinite(ks) || !isfinite(vs)) {
                mdc_model_free(m);
                return errf(e, ALBEDO_ERR_INVALID_ARGUMENT,
                            "cuda: ALBEDO_CUDA_KV_SCALE='%s': expected two positive numbers \"k,v\"", env);
            }
            m->k_scale = ks, m->v_scale = vs;
        }
    }
    if (m->np + 1 != d->prefix_attn) {
        mdc_model_free(m);
        return errf(e, ALBEDO_ERR_UNSUPPORTED, "cuda: the prefix is not the image tokens plus BOS");
    }

    upl u;
    memset(&u, 0, sizeof u);
    u.m = m;
    u.e = e;
    upload(&u); /* pass 0: sizes */
    m->wbytes = u.off;
    size_t free_b = 0, total_b = 0;
    cudaError_t ce = cudaMemGetInfo(&free_b, &total_b);
    if (ce != cudaSuccess) {
        mdc_model_free(m);
        return errf(e, cuda_status_of(ce), "cuda: cudaMemGetInfo: %s", cudaGetErrorString(ce));
    }
    const size_t wbytes = m->wbytes;
    size_t need = wbytes + session_bytes(m, d->max_context);
    if (need > free_b) {
        mdc_model_free(m);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY,
                    "cuda: the model needs %.2f GiB of GPU memory (%.2f GiB of weights and %.2f GiB for one session), "
                    "device %d has %.2f GiB free of %.2f GiB",
                    need / 1073741824.0, wbytes / 1073741824.0, (need - wbytes) / 1073741824.0, device,
                    free_b / 1073741824.0, total_b / 1073741824.0);
    }
    ce = cudaMalloc((void **)&m->wmem, wbytes);
    if (ce != cudaSuccess) {
        mdc_model_free(m);
        return errf(e, cuda_status_of(ce), "cuda: %.2f GiB for the weights: %s", wbytes / 1073741824.0,
                    cudaGetErrorString(ce));
    }
    u.pass = 1;
    u.off = 0;
    u.stage_bytes = (size_t)16 << 20;
    u.stage = malloc(u.stage_bytes);
    if (!u.stage)
        u.st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    else
        upload(&u);
    free(u.stage);
    if (u.st) {
        mdc_model_free(m);
        return u.st;
    }
    if (d->md3) { /* Moondream 3: tau, routers and experts (model_cuda_md3.cu) */
        st = md3_model_new(d, session_bytes(m, d->max_context), &m->md3, e);
        if (st) {
            mdc_model_free(m);
            return st;
        }
        need += md3_model_bytes(m->md3) + md3_state_bytes(m->md3, d->max_context);
    }

    /* Image prefix slots: ALBEDO_CUDA_IMAGE_SLOTS (default 4), within a
     * quarter of what one session leaves free. */
    m->prefix_bytes = (size_t)d->n_layers * 2 * m->Hkv * d->prefix_attn * m->D * m->kv_es;
    const char *env = getenv("ALBEDO_CUDA_IMAGE_SLOTS");
    int slots = env && *env ? atoi(env) : 4;
    if (slots > PREFIX_SLOTS_MAX) slots = PREFIX_SLOTS_MAX;
    const size_t left = free_b > need ? free_b - need : 0;
    while (slots > 0 && (size_t)slots * m->prefix_bytes > left / 4) slots--;
    if (slots > 0 && cudaMalloc((void **)&m->slot_mem, (size_t)slots * m->prefix_bytes) != cudaSuccess) {
        cudaGetLastError();
        slots = 0;
        m->slot_mem = NULL;
    }
    m->n_slots = slots;
    /* The uploads went through the legacy stream, which sessions' streams do
     * not wait for, and a pageable cudaMemcpy may return before its DMA
     * lands: finish them here. */
    ce = cudaDeviceSynchronize();
    if (ce != cudaSuccess) {
        mdc_model_free(m);
        return errf(e, cuda_status_of(ce), "cuda: uploading the weights: %s", cudaGetErrorString(ce));
    }

    cudaDeviceProp prop;
    ce = cudaGetDeviceProperties(&prop, device);
    if (ce != cudaSuccess) {
        mdc_model_free(m);
        return errf(e, cuda_status_of(ce), "cuda: cudaGetDeviceProperties: %s", cudaGetErrorString(ce));
    }
    snprintf(m->describe, sizeof m->describe, "cuda (%s, sm_%d%d, %.2f GiB of weights%s%s)", prop.name, prop.major,
             prop.minor, (m->wbytes + md3_model_bytes(m->md3)) / 1073741824.0, m->kv_fp8 ? ", fp8 KV cache" : "",
             d->md3 && d->md3->exp_fp8 ? ", fp8 experts" : "");
    *out = m;
    return ALBEDO_OK;
}

/* ---- session state ------------------------------------------------------------------------ */

void mdc_state_free(mdc_state *s) {
    if (!s) return;
    cudaSetDevice(s->m->device);
    if (s->st) cudaStreamSynchronize(s->st);
    if (s->graph) cudaGraphExecDestroy(s->graph);
    for (int n = 0; s->pgraph && n <= s->seqs; n++)
        if (s->pgraph[n]) cudaGraphExecDestroy(s->pgraph[n]);
    free(s->pgraph);
    free(s->pseen);
    free(s->pfork);
    free(s->gorder);
    if (s->reg_logits) cudaHostUnregister(s->logits_host);
    cudaFreeHost(s->stage);
    cudaFreeHost(s->logits_pin);
    cudaFreeHost(s->meta_h);
    cudaFreeHost(s->down_hidden);
    cudaFreeHost(s->pick_hmem);
    md3_state_free(s->md3);
    cudaFree(s->mem);
    if (s->ev_fork) cudaEventDestroy(s->ev_fork);
    if (s->ev_join) cudaEventDestroy(s->ev_join);
    cuda_ctx_free(s->ctx2);
    cuda_ctx_free(s->ctx);
    free(s);
}

albedo_status mdc_state_new(mdc_model *m, int max_ctx, float *logits_host, float *hidden_host, mdc_state **out,
                            errbuf *e) {
    return mdc_state_new_ex(m, max_ctx, max_ctx, 1, 0, MDC_KV | MDC_VISION, logits_host, hidden_host, out, e);
}

albedo_status mdc_state_new_ex(mdc_model *m, int max_ctx, int rows, int seqs, int block_size, int flags,
                               float *logits_host, float *hidden_host, mdc_state **out, errbuf *e) {
    *out = NULL;
    if (max_ctx < m->d.prefix_attn || max_ctx > m->d.max_context)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "cuda: %d positions of context", max_ctx);
    if (rows < 1 || seqs < 1 || block_size < 0 || ((flags & MDC_KV) && rows < max_ctx) ||
        ((flags & MDC_VISION) && rows < m->d.prefix_attn))
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "cuda: a state of %d rows, %d sequences", rows, seqs);
    CK(cudaSetDevice(m->device));
    mdc_state *s = (mdc_state *)calloc(1, sizeof *s);
    if (!s) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    s->m = m;
    s->max_ctx = max_ctx;
    s->rows = rows;
    s->seqs = seqs;
    s->flags = flags;
    s->vcap = (flags & MDC_VISION) ? m->d.max_crops + 1 : 0;
    s->bt_ld = block_size > 0 ? (max_ctx + block_size - 1) / block_size : 0;
    s->meta_cap = block_size > 0 ? meta_ints(rows, seqs, s->bt_ld) : 0;
    const char *env = getenv("ALBEDO_CUDA_GRAPH");
    s->graphs = !(env && env[0] == '0');
    albedo_status st = cuda_ctx_new(m->device, &s->ctx, e);
    if (st) {
        mdc_state_free(s);
        return st;
    }
    s->st = (cudaStream_t)cuda_ctx_stream(s->ctx);
    /* Measured on an H100 (docs/CUDA.md): the GEMV wins up to 2 rows,
     * cuBLASLt from 4 on; ALBEDO_CUDA_GEMV_MAX_T overrides. */
    if (!getenv("ALBEDO_CUDA_GEMV_MAX_T")) cuda_ctx_set_gemv_max(s->ctx, 2);
    s->stage_rows = block_size > 0 && rows <= 1024 ? rows : STAGE_ROWS;
    s->mem_bytes = state_layout(s, m, max_ctx, NULL);
    cudaError_t ce = cudaMalloc((void **)&s->mem, s->mem_bytes);
    if (ce == cudaSuccess) ce = cudaMemset(s->mem, 0, s->mem_bytes);
    if (ce == cudaSuccess)
        ce = cudaHostAlloc((void **)&s->stage, (size_t)(s->stage_rows + 1) * m->d.dim * sizeof(float) + 64,
                           cudaHostAllocDefault);
    if (ce == cudaSuccess && s->meta_cap)
        ce = cudaHostAlloc((void **)&s->meta_h, s->meta_cap * sizeof(int32_t), cudaHostAllocDefault);
    if (ce == cudaSuccess && s->meta_cap)
        ce = cudaHostAlloc((void **)&s->down_hidden, (size_t)seqs * m->d.dim * sizeof(float), cudaHostAllocDefault);
    if (ce == cudaSuccess &&
        (ce = cudaHostAlloc((void **)&s->pick_hmem, (size_t)seqs * 20, cudaHostAllocDefault)) == cudaSuccess) {
        s->pick_ctr_h = (uint64_t *)s->pick_hmem;
        s->pick_ids_h = (int32_t *)(s->pick_hmem + (size_t)seqs * 8);
        s->pick_mask_h = s->pick_ids_h + seqs;
    }
    if (ce != cudaSuccess) {
        st = errf(e, cuda_status_of(ce), "cuda: %.2f GiB of session memory: %s", s->mem_bytes / 1073741824.0,
                  cudaGetErrorString(ce));
        mdc_state_free(s);
        return st;
    }
    if (s->meta_cap) {
        s->pgraph = (cudaGraphExec_t *)calloc((size_t)seqs + 1, sizeof *s->pgraph);
        s->pseen = (int *)calloc((size_t)seqs + 1, sizeof *s->pseen);
        s->pfork = (unsigned char *)calloc((size_t)seqs + 1, 1);
        s->gorder = (int *)calloc((size_t)seqs, sizeof *s->gorder);
        if (!s->pgraph || !s->pseen || !s->pfork || !s->gorder) {
            mdc_state_free(s);
            return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
        }
    }
    state_layout(s, m, max_ctx, s->mem);
    if (m->md3 && (st = md3_state_new(m->md3, rows, &s->md3, e))) {
        mdc_state_free(s);
        return st;
    }
    s->stage_hidden = s->stage + (size_t)s->stage_rows * m->d.dim;
    s->stage_pos = (int *)(s->stage_hidden + m->d.dim);
    /* The logits land straight in the session's host buffer, page-locked so
     * that the copy is DMA; where registering fails, through a pinned copy. */
    s->logits_host = logits_host;
    s->hidden_host = hidden_host;
    if (logits_host) {
        s->reg_logits =
            cudaHostRegister(logits_host, (size_t)m->d.vocab * sizeof(float), cudaHostRegisterDefault) == cudaSuccess;
        cudaGetLastError();
    }
    if (!s->reg_logits && (ce = cudaHostAlloc((void **)&s->logits_pin, (size_t)m->d.vocab * sizeof(float),
                                              cudaHostAllocDefault)) != cudaSuccess) {
        st = errf(e, cuda_status_of(ce), "cuda: pinned logits: %s", cudaGetErrorString(ce));
        mdc_state_free(s);
        return st;
    }
    const int32_t ids[8] = {m->d.bos, m->d.bos, m->d.bos, m->d.bos, m->d.bos, m->d.bos, m->d.bos, m->d.bos};
    ce = cudaMemcpy(s->ids, ids, sizeof ids, cudaMemcpyHostToDevice);
    /* The zeroing and the copy ran on the legacy stream, asynchronously:
     * finished before the session's own stream touches the memory. */
    if (ce == cudaSuccess) ce = cudaDeviceSynchronize();
    if (ce != cudaSuccess) {
        st = errf(e, cuda_status_of(ce), "cuda: %s", cudaGetErrorString(ce));
        mdc_state_free(s);
        return st;
    }
    *out = s;
    return ALBEDO_OK;
}

/* ---- vision ------------------------------------------------------------------------------ */

/* The encoder on n <= vcap crops already in s->crops: vx [n·np, C] after
 * post_ln. */
static albedo_status encode_group(mdc_state *s, int n, errbuf *e) {
    const mdc_model *m = s->m;
    const mdc_desc *d = &m->d;
    const int np = m->np, C = d->enc_dim, Cp = round8(C), T = n * np, H = d->enc_heads, D = m->vD;
    const int pdp = round8(m->pd), ffp = round8(d->enc_ff);
    LAUNCH(patchify_kernel, T, 128, (bf16 *)s->patches, pdp, (const uint8_t *)s->crops, d->crop_size, d->patch, m->ns,
           m->pd);
    const long nx = (long)T * C;
    LAUNCH(pos_kernel, (int)((nx + 255) / 256 < 4096 ? (nx + 255) / 256 : 4096), 256, s->vx, (const float *)m->pos_emb,
           np, C, nx);
    OPK(cuda_linear(s->ctx, s->vx, DT_F32, C, s->patches, pdp, T, &m->patch_emb.w, CUDA_ACT_NONE, 1));
    for (int l = 0; l < d->enc_layers; l++) {
        const dvblock *b = &m->vb[l];
        OPK(cuda_layernorm_ld(s->ctx, s->vh, DT_BF16, Cp, s->vx, DT_F32, C, T, C, b->ln1_w, b->ln1_b, DT_F32, 1e-5f));
        OPK(cuda_linear(s->ctx, s->vqkv, DT_BF16, 3 * C, s->vh, Cp, T, &b->qkv.w, CUDA_ACT_NONE, 0));
        cuda_attn a;
        memset(&a, 0, sizeof a);
        a.T = np, a.S = np, a.H = H, a.Hkv = H, a.D = D, a.pos0 = 0, a.n_prefix = np;
        a.scale = 1.0f / sqrtf((float)D), a.n_seq = n;
        a.q = s->vqkv, a.ldq = 3 * C, a.q_seq = (long)np * 3 * C;
        a.k = s->vqkv + C, a.ldk = 3 * C, a.k_head = D, a.k_seq = (long)np * 3 * C;
        a.v = s->vqkv + 2 * C, a.ldv = 3 * C, a.v_head = D, a.v_seq = (long)np * 3 * C;
        a.out = s->vatt, a.ldo = C, a.o_seq = (long)np * C;
        OPK(cuda_attention(s->ctx, &a));
        OPK(cuda_linear(s->ctx, s->vx, DT_F32, C, s->vatt, C, T, &b->proj.w, CUDA_ACT_NONE, 1));
        OPK(cuda_layernorm_ld(s->ctx, s->vh, DT_BF16, Cp, s->vx, DT_F32, C, T, C, b->ln2_w, b->ln2_b, DT_F32, 1e-5f));
        OPK(cuda_linear(s->ctx, s->vf, DT_BF16, ffp, s->vh, Cp, T, &b->fc1.w, CUDA_ACT_GELU_TANH, 0));
        OPK(cuda_linear(s->ctx, s->vx, DT_F32, C, s->vf, ffp, T, &b->fc2.w, CUDA_ACT_NONE, 1));
    }
    OPK(cuda_layernorm(s->ctx, s->vx, DT_F32, s->vx, DT_F32, T, C, m->post_w, m->post_b, DT_F32, 1e-5f));
    return ALBEDO_OK;
}

static albedo_status upload_crops(mdc_state *s, const uint8_t *crops_host, int n, errbuf *e) {
    const size_t bytes = (size_t)n * s->m->d.crop_size * s->m->d.crop_size * 3;
    CK(cudaMemcpyAsync(s->crops, crops_host, bytes, cudaMemcpyHostToDevice, s->st));
    return ALBEDO_OK;
}

/* Vision and projection on all n crops: img_emb into x rows 1..np (f32);
 * the encoder output of every crop to enc_out_host when not NULL. */
static albedo_status vision_all(mdc_state *s, const uint8_t *crops_host, int n, int th, int tw, float *enc_out_host,
                                errbuf *e) {
    const mdc_model *m = s->m;
    const mdc_desc *d = &m->d;
    const int np = m->np, C = d->enc_dim, catp = round8(2 * C), pip = round8(d->proj_inner);
    const size_t crop_bytes = (size_t)d->crop_size * d->crop_size * 3;
    if (n < 1 || n != th * tw + 1) return errf(e, ALBEDO_ERR_INTERNAL, "cuda: %d crops for a %dx%d tiling", n, th, tw);
    if (!s->vcap) return errf(e, ALBEDO_ERR_INTERNAL, "cuda: vision on a state without vision memory");
    CK(cudaMemsetAsync(s->pool, 0, (size_t)np * C * sizeof(float), s->st));
    for (int g0 = 0; g0 < n; g0 += s->vcap) {
        const int gn = n - g0 < s->vcap ? n - g0 : s->vcap;
        albedo_status st = upload_crops(s, crops_host + (size_t)g0 * crop_bytes, gn, e);
        if (!st) st = encode_group(s, gn, e);
        if (st) return st;
        if (enc_out_host)
            CK(cudaMemcpyAsync(enc_out_host + (size_t)g0 * np * C, s->vx, (size_t)gn * np * C * sizeof(float),
                               cudaMemcpyDeviceToHost, s->st));
        if (g0 == 0) LAUNCH(global_kernel, np, 256, (bf16 *)s->cat, catp, (const float *)s->vx, C);
        /* Local tile k is crop k + 1. */
        const int k0 = g0 > 0 ? g0 - 1 : 0, k1 = g0 + gn - 1;
        if (k1 > k0)
            LAUNCH(pool_kernel, np, 256, s->pool, (const float *)s->vx, C, m->ns, d->overlap_margin, th, tw, k0, k1,
                   g0 - 1);
    }
    LAUNCH(local_kernel, np, 256, (bf16 *)s->cat, catp, (const float *)s->pool, C);
    OPK(cuda_linear(s->ctx, s->mid, DT_BF16, pip, s->cat, catp, np, &m->proj_fc1.w, CUDA_ACT_GELU_TANH, 0));
    OPK(cuda_linear(s->ctx, s->x + d->dim, DT_F32, d->dim, s->mid, pip, np, &m->proj_fc2.w, CUDA_ACT_NONE, 0));
    return ALBEDO_OK;
}

static albedo_status finish(mdc_state *s, errbuf *e) {
    CK(cudaStreamSynchronize(s->st));
    return ALBEDO_OK;
}

albedo_status mdc_vision(mdc_state *s, const uint8_t *crops_host, int n, int th, int tw, float *img_emb_host,
                         float *enc_out_host, errbuf *e) {
    CK(cudaSetDevice(s->m->device));
    albedo_status st = vision_all(s, crops_host, n, th, tw, enc_out_host, e);
    if (st) return st;
    const mdc_desc *d = &s->m->d;
    CK(cudaMemcpyAsync(img_emb_host, s->x + d->dim, (size_t)s->m->np * d->dim * sizeof(float), cudaMemcpyDeviceToHost,
                       s->st));
    return finish(s, e);
}

albedo_status mdc_vision_crops(mdc_state *s, const uint8_t *crops_host, int n, float *out_host, errbuf *e) {
    CK(cudaSetDevice(s->m->device));
    if (!s->vcap) return errf(e, ALBEDO_ERR_INTERNAL, "cuda: vision on a state without vision memory");
    const mdc_desc *d = &s->m->d;
    const int np = s->m->np, C = d->enc_dim;
    const size_t crop_bytes = (size_t)d->crop_size * d->crop_size * 3;
    for (int g0 = 0; g0 < n; g0 += s->vcap) {
        const int gn = n - g0 < s->vcap ? n - g0 : s->vcap;
        albedo_status st = upload_crops(s, crops_host + (size_t)g0 * crop_bytes, gn, e);
        if (!st) st = encode_group(s, gn, e);
        if (st) return st;
        CK(cudaMemcpyAsync(out_host + (size_t)g0 * np * C, s->vx, (size_t)gn * np * C * sizeof(float),
                           cudaMemcpyDeviceToHost, s->st));
    }
    return finish(s, e);
}

/* ---- text ----------------------------------------------------------------------------------- */

/* The decode steps' second context and its fork / join events, made at the
 * first forked step; s->fork from ALBEDO_CUDA_FORK ("0": one chain; "1":
 * only dense layers' fc1 on the branch; else the whole MLP, the experts
 * included). Returns the fork mode to use: 0 without a second context. */
static int fork_ready(mdc_state *s) {
    const char *fenv = getenv("ALBEDO_CUDA_FORK");
    s->fork = fenv && fenv[0] == '0' ? 0 : fenv && fenv[0] == '1' ? 1 : 2;
    if (s->fork && !s->ctx2) {
        errbuf sub;
        if (cuda_ctx_new(s->m->device, &s->ctx2, &sub) == ALBEDO_OK) {
            if (!getenv("ALBEDO_CUDA_GEMV_MAX_T")) cuda_ctx_set_gemv_max(s->ctx2, 2);
            if (cudaEventCreateWithFlags(&s->ev_fork, cudaEventDisableTiming) != cudaSuccess ||
                cudaEventCreateWithFlags(&s->ev_join, cudaEventDisableTiming) != cudaSuccess ||
                cudaStreamSynchronize((cudaStream_t)cuda_ctx_stream(s->ctx2)) != cudaSuccess) {
                if (s->ev_fork) cudaEventDestroy(s->ev_fork);
                if (s->ev_join) cudaEventDestroy(s->ev_join);
                s->ev_fork = s->ev_join = NULL;
                cuda_ctx_free(s->ctx2);
                s->ctx2 = NULL;
            }
        }
        cudaGetLastError(); /* a failed allocation must not surface at the next launch */
    }
    return s->ctx2 ? s->fork : 0;
}

/* The branch of a forked layer, on ctx2's stream after the layernorm that
 * wrote h (rows 0..T-1; the linears over Tl >= T): dense layers fc1 and,
 * with fork 2, fc2 into y2 (not added); MoE layers (fork 2 only) the router,
 * the top-k and the experts, their sum stored into y2 (cuda_moe.store). The
 * join (ev_join) follows. Only h is read and only f, y2 and the experts'
 * own buffers (md3_state's rlog, sel, wt, scratch; tau on the main stream
 * uses f and scores there) are written, so it can run beside the
 * attention. */
static albedo_status mlp_branch(mdc_state *s, int l, int moe, int fork, int T, int Tl, errbuf *e) {
    const mdc_model *m = s->m;
    const dtblock *b = &m->tb[l];
    const int dim = m->d.dim, dimp = round8(dim), ffp = round8(m->d.ff_dim);
    cudaStream_t st2 = (cudaStream_t)cuda_ctx_stream(s->ctx2);
    CK(cudaEventRecord(s->ev_fork, s->st));
    CK(cudaStreamWaitEvent(st2, s->ev_fork, 0));
    if (moe) {
        albedo_status st = md3_moe(m->md3, s->md3, s->ctx2, l, s->h, dimp, s->y2, dim, T, Tl, 1, e);
        if (st) return st;
    } else {
        albedo_status st = cuda_linear(s->ctx2, s->f, DT_BF16, ffp, s->h, dimp, Tl, &b->fc1.w, CUDA_ACT_GELU_TANH, 0);
        if (!st && fork == 2) st = cuda_linear(s->ctx2, s->y2, DT_F32, dim, s->f, ffp, Tl, &b->fc2.w, CUDA_ACT_NONE, 0);
        if (st) return errf(e, st, "cuda: %s", cuda_ctx_error(s->ctx2));
    }
    CK(cudaEventRecord(s->ev_join, st2));
    return ALBEDO_OK;
}

/* The decoder over x rows 0..T-1 at positions pos0.. (or *pos_dev when not
 * NULL: the graph's form, T = 1), the last row's logits when want_logits. */
static albedo_status text_layers(mdc_state *s, int T, int pos0, const int *pos_dev, int n_prefix, int want_logits,
                                 errbuf *e) {
    const mdc_model *m = s->m;
    const mdc_desc *d = &m->d;
    const int dim = d->dim, dimp = round8(dim), ffp = round8(d->ff_dim), qd = m->H * m->D;
    const size_t head = (size_t)s->max_ctx * m->D, layer = 2 * (size_t)m->Hkv * head; /* elements */
    /* The decode graph (pos_dev) forks each layer: the MLP needs only h, so
     * it streams its weights on ctx2's stream while qkv, tau, rotary, the
     * attention and proj run on the main one, and the attention's latency
     * hides behind it. fork 2: the whole MLP into y2 (fc2 not added; the
     * experts' sum stored), and after proj and the join x += y2, so x gets
     * proj's sum then the MLP's as on the eager path (the GEMVs add their
     * finished sum into y), bit for bit. fork 1: dense layers' fc1 alone on
     * the branch, proj after the join, then fc2 += as before. */
    const int fork = pos_dev && s->ctx2 ? s->fork : 0;
    int n_forked = 0;
    for (int l = 0; l < d->n_layers; l++) {
        const dtblock *b = &m->tb[l];
        unsigned char *kc = s->kv + (size_t)l * layer * m->kv_es, *vc = kc + (size_t)m->Hkv * head * m->kv_es;
        const int moe = m->md3 && md3_layer_moe(m->md3, l), par = fork == 2 || (fork == 1 && !moe);
        OPK(cuda_layernorm_ld(s->ctx, s->h, DT_BF16, dimp, s->x, DT_F32, dim, T, dim, b->ln_w, b->ln_b, DT_F32, 1e-5f));
        if (par) {
            albedo_status st = mlp_branch(s, l, moe, fork, T, T, e);
            if (st) return st;
            n_forked++;
        }
        OPK(cuda_linear(s->ctx, s->qkv, DT_BF16, m->qkvw, s->h, dimp, T, &b->qkv.w, CUDA_ACT_NONE, 0));
        if (m->md3) { /* Moondream 3: tau scales q and v before rotary and the cache */
            albedo_status st = md3_tau(m->md3, s->md3, s->ctx, l, s->qkv, m->qkvw, T, T, pos0, pos_dev, NULL, 0, e);
            if (st) return st;
        }
        cuda_rope r;
        memset(&r, 0, sizeof r);
        r.x = s->qkv, r.ldx = m->qkvw, r.T = T, r.H = m->H, r.Hkv = m->Hkv, r.D = m->D, r.R = d->rot_dims;
        r.pos0 = pos0, r.pos_dev = pos_dev, r.cos_t = m->cos_t, r.sin_t = m->sin_t;
        r.k_cache = kc, r.v_cache = vc, r.n_ctx = s->max_ctx;
        r.kv_fp8 = m->kv_fp8, r.k_scale = m->k_scale, r.v_scale = m->v_scale;
        OPK(cuda_rope_kv(s->ctx, &r));
        cuda_attn a;
        memset(&a, 0, sizeof a);
        a.T = T, a.S = pos_dev ? s->max_ctx : pos0 + T, a.H = m->H, a.Hkv = m->Hkv, a.D = m->D;
        a.pos0 = pos0, a.pos_dev = pos_dev, a.n_prefix = n_prefix, a.scale = 1.0f / sqrtf((float)m->D), a.n_seq = 1;
        a.q = s->qkv, a.ldq = m->qkvw;
        a.k = kc, a.ldk = m->D, a.k_head = (long)head;
        a.v = vc, a.ldv = m->D, a.v_head = (long)head;
        a.out = s->att, a.ldo = qd;
        a.kv_fp8 = m->kv_fp8, a.k_scale = m->k_scale, a.v_scale = m->v_scale;
        OPK(cuda_attention(s->ctx, &a));
        if (fork == 1 && par) CK(cudaStreamWaitEvent(s->st, s->ev_join, 0));
        OPK(cuda_linear(s->ctx, s->x, DT_F32, dim, s->att, qd, T, &b->proj.w, CUDA_ACT_NONE, 1));
        if (fork == 2) {
            /* The join. A small kernel here keeps the next layernorm a plain
             * link of the PDL chain: with the join on the layernorm itself
             * (an add fused into the layernorm, one kernel fewer) the step took
             * 1.24 ms instead of 1.18 on an H100. */
            CK(cudaStreamWaitEvent(s->st, s->ev_join, 0));
            OPK(cuda_add(s->ctx, s->x, DT_F32, s->y2, DT_F32, (size_t)T * dim));
            continue;
        }
        if (moe) { /* Moondream 3's experts: x += moe(h) */
            albedo_status st = md3_moe(m->md3, s->md3, s->ctx, l, s->h, dimp, s->x, dim, T, T, 0, e);
            if (st) return st;
            continue;
        }
        if (!par) OPK(cuda_linear(s->ctx, s->f, DT_BF16, ffp, s->h, dimp, T, &b->fc1.w, CUDA_ACT_GELU_TANH, 0));
        OPK(cuda_linear(s->ctx, s->x, DT_F32, dim, s->f, ffp, T, &b->fc2.w, CUDA_ACT_NONE, 1));
    }
    if (pos_dev) s->fork_layers = n_forked;
    if (want_logits) {
        uint16_t *hl = s->h + (size_t)(T - 1) * dimp;
        OPK(cuda_layernorm(s->ctx, hl, DT_BF16, s->x + (size_t)(T - 1) * dim, DT_F32, 1, dim, m->tpost_w, m->tpost_b,
                           DT_F32, 1e-5f));
        OPK(cuda_linear(s->ctx, s->logits, DT_F32, d->vocab, hl, dimp, 1, &m->lm_head.w, CUDA_ACT_NONE, 0));
    }
    return ALBEDO_OK;
}

static std::atomic<long> g_device_picks(0);

long mdc_device_picks(void) { return g_device_picks.load(); }

/* logits row r: the ids mask[2r], mask[2r+1] (those >= 0) set to -inf. */
__global__ void mask_logits_kernel(float *logits, int V, const int32_t *mask) {
    pdl_trigger();
    pdl_wait();
    const int id = mask[2 * blockIdx.x + threadIdx.x];
    if (id >= 0 && id < V) logits[(size_t)blockIdx.x * V + id] = -INFINITY;
}

/* A session's greedy pick from its logits row: the ids mask[0..1] (those
 * >= 0, device memory) set to -inf, then the argmax into pick_ids[0] (the
 * first index on a tie, NaN never: sampler_argmax's rule). Part of the
 * decode graph, where mask is pos_dev + 1, uploaded with the position. */
static albedo_status greedy_pick(mdc_state *s, const int32_t *mask, errbuf *e) {
    const int V = s->m->d.vocab;
    LAUNCH(mask_logits_kernel, 1, 2, s->logits, V, mask);
    OPK(cuda_argmax(s->ctx, s->pick_ids, s->logits, 1, V, V));
    return ALBEDO_OK;
}

/* Capture the one-row decode step with the position read from pos_dev, and
 * the greedy pick of its token (greedy_pick). */
static albedo_status capture_decode(mdc_state *s, errbuf *e) {
    fork_ready(s); /* without a second context the graph is one chain */
    CK(cudaStreamBeginCapture(s->st, cudaStreamCaptureModeThreadLocal));
    errbuf sub;
    albedo_status st = text_layers(s, 1, 0, s->pos_dev, 0, 1, &sub);
    if (!st) st = greedy_pick(s, s->pos_dev + 1, &sub);
    cudaGraph_t g = NULL;
    cudaError_t ce = cudaStreamEndCapture(s->st, &g);
    if (st) {
        if (g) cudaGraphDestroy(g);
        return errf(e, st, "%s (while capturing the decode graph)", sub.msg);
    }
    if (ce == cudaSuccess) ce = cudaGraphInstantiate(&s->graph, g, 0);
    if (g) cudaGraphDestroy(g);
    if (ce != cudaSuccess) {
        s->graph = NULL;
        return errf(e, cuda_status_of(ce), "cuda: capturing the decode graph: %s", cudaGetErrorString(ce));
    }
    s->n_captured++;
    return ALBEDO_OK;
}

albedo_status mdc_text_forward(mdc_state *s, const float *emb_host, int T, int pos0, int n_prefix, int want_logits,
                               const int32_t *pick_mask, int n_mask, int32_t *pick_id, errbuf *e) {
    const mdc_desc *d = &s->m->d;
    if (s->sticky) {
        albedo_status st = s->sticky;
        s->sticky = ALBEDO_OK;
        return errf(e, st, "%s", s->sticky_msg);
    }
    if (!(s->flags & MDC_KV)) return errf(e, ALBEDO_ERR_INTERNAL, "cuda: a forward on a state without a KV cache");
    if (T < 1 || pos0 < 0 || pos0 + T > s->max_ctx)
        return errf(e, ALBEDO_ERR_LIMIT, "context length %d exceeds the maximum of %d positions", pos0 + T, s->max_ctx);
    if (pick_id && (!want_logits || n_mask < 0 || n_mask > 2))
        return errf(e, ALBEDO_ERR_INTERNAL, "cuda: a pick needs the logits and at most 2 masked ids");
    CK(cudaSetDevice(s->m->device));
    const size_t row = (size_t)d->dim * sizeof(float);
    const int use_graph = s->graphs && T == 1 && want_logits && pos0 >= n_prefix;
    /* The ids the pick masks, uploaded with the position (-1: none; a step
     * whose logits come down masks nothing). */
    s->stage_pos[1] = pick_id && n_mask > 0 ? pick_mask[0] : -1;
    s->stage_pos[2] = pick_id && n_mask > 1 ? pick_mask[1] : -1;
    if (use_graph && !s->graph) {
        /* Captured on an idle stream, before this step's uploads. A capture
         * that fails leaves the session on eager launches (the reason is kept
         * for mdc_graph_error). */
        errbuf sub;
        CK(cudaStreamSynchronize(s->st));
        if (capture_decode(s, &sub)) {
            s->graphs = 0;
            snprintf(s->graph_err, sizeof s->graph_err, "%s", sub.msg);
            cudaGetLastError();
        }
    }
    if (T <= s->stage_rows) {
        memcpy(s->stage, emb_host, (size_t)T * row);
        CK(cudaMemcpyAsync(s->x, s->stage, (size_t)T * row, cudaMemcpyHostToDevice, s->st));
    } else {
        CK(cudaMemcpyAsync(s->x, emb_host, (size_t)T * row, cudaMemcpyHostToDevice, s->st));
    }
    s->last_graph = 0;
    if (use_graph && s->graph) {
        s->stage_pos[0] = pos0;
        CK(cudaMemcpyAsync(s->pos_dev, s->stage_pos, 3 * sizeof(int), cudaMemcpyHostToDevice, s->st));
        CK(cudaGraphLaunch(s->graph, s->st));
        s->last_graph = 1;
    } else {
        albedo_status st = text_layers(s, T, pos0, NULL, n_prefix, want_logits, e);
        if (st) return st;
        if (pick_id) {
            CK(cudaMemcpyAsync(s->pos_dev + 1, s->stage_pos + 1, 2 * sizeof(int), cudaMemcpyHostToDevice, s->st));
            if ((st = greedy_pick(s, s->pos_dev + 1, e))) return st;
        }
    }
    CK(cudaMemcpyAsync(s->stage_hidden, s->x + (size_t)(T - 1) * d->dim, row, cudaMemcpyDeviceToHost, s->st));
    float *lg = s->reg_logits ? s->logits_host : s->logits_pin;
    if (pick_id)
        CK(cudaMemcpyAsync(s->pick_ids_h, s->pick_ids, sizeof(int32_t), cudaMemcpyDeviceToHost, s->st));
    else if (want_logits)
        CK(cudaMemcpyAsync(lg, s->logits, (size_t)d->vocab * sizeof(float), cudaMemcpyDeviceToHost, s->st));
    albedo_status st = finish(s, e);
    if (st) return st;
    memcpy(s->hidden_host, s->stage_hidden, row);
    if (pick_id) {
        *pick_id = s->pick_ids_h[0];
        g_device_picks++;
    } else if (want_logits && !s->reg_logits)
        memcpy(s->logits_host, s->logits_pin, (size_t)d->vocab * sizeof(float));
    return ALBEDO_OK;
}

/* ---- paged steps (the engine's pool) ------------------------------------------------------- */

/* dst row i = src row idx[i] (C floats): the last row of each sequence. */
__global__ void gather_rows_kernel(float *dst, const float *src, const int32_t *idx, int C) {
    pdl_trigger();
    pdl_wait();
    const float *r = src + (size_t)idx[blockIdx.x] * C;
    float *o = dst + (size_t)blockIdx.x * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x) o[i] = r[i];
}

static std::atomic<long> g_paged_graph_steps(0), g_paged_fork_steps(0);

long mdc_paged_graph_steps(void) { return g_paged_graph_steps.load(); }
long mdc_paged_fork_steps(void) { return g_paged_fork_steps.load(); }

/* The most sequences a forked paged decode step has: ALBEDO_CUDA_FORK_SEQS,
 * else FORK_SEQS_DEFAULT (docs/CUDA.md, The engine on the GPU: measured). */
#define FORK_SEQS_DEFAULT (1 << 30)
static int fork_seqs(const mdc_state *s) {
    const char *v = getenv("ALBEDO_CUDA_FORK_SEQS");
    const int n = v && *v ? atoi(v) : FORK_SEQS_DEFAULT;
    return n < s->seqs ? n : s->seqs;
}

/* The device picks of a step's gathered rows 0 .. n_logits-1 (those whose
 * segment has a pick and no host logits): masks, one argmax over the rows,
 * then cuda_sample for each row that samples; the ids come down pinned. */
static albedo_status pick_rows(mdc_state *s, const mdc_seg *segs, int n_logits, int *n_pick, errbuf *e) {
    const int V = s->m->d.vocab;
    int n = 0;
    for (int i = 0; i < n_logits; i++) {
        const mdc_seg *g = &segs[s->gorder[i]];
        const mdc_pick *pk = g->logits_host ? NULL : g->pick;
        s->pick_mask_h[2 * i] = pk && pk->n_mask > 0 ? pk->mask[0] : -1;
        s->pick_mask_h[2 * i + 1] = pk && pk->n_mask > 1 ? pk->mask[1] : -1;
        s->pick_ctr_h[i] = pk ? pk->counter : 0;
        n += pk != NULL;
    }
    *n_pick = n;
    if (!n) return ALBEDO_OK;
    CK(cudaMemcpyAsync(s->pick_mask, s->pick_mask_h, (size_t)n_logits * 2 * sizeof(int32_t), cudaMemcpyHostToDevice,
                       s->st));
    CK(cudaMemcpyAsync(s->pick_ctr, s->pick_ctr_h, (size_t)n_logits * sizeof(uint64_t), cudaMemcpyHostToDevice, s->st));
    LAUNCH(mask_logits_kernel, n_logits, 2, s->logits, V, (const int32_t *)s->pick_mask);
    OPK(cuda_argmax(s->ctx, s->pick_ids, s->logits, n_logits, V, V));
    for (int i = 0; i < n_logits; i++) {
        const mdc_seg *g = &segs[s->gorder[i]];
        const mdc_pick *pk = g->logits_host ? NULL : g->pick;
        if (pk && pk->temperature > 0.0f)
            OPK(cuda_sample(s->ctx, s->pick_ids + i, s->logits + (size_t)i * V, 1, V, V, pk->temperature, pk->top_p,
                            pk->seed, s->pick_ctr + i));
    }
    CK(cudaMemcpyAsync(s->pick_ids_h, s->pick_ids, (size_t)n_logits * sizeof(int32_t), cudaMemcpyDeviceToHost, s->st));
    return ALBEDO_OK;
}

/* A paged step's shape and where its metadata lies in meta (ints):
 *   rows  [T][2]        position and pool row of each input row
 *   segA  [nA][4]       {row0, T, pos0, n_prefix}: segments of <= 8 rows (decode kernel)
 *   segB  [nB][4]       the longer ones (flash kernel)
 *   btA   [nA][bt_ld]   block tables, btB [nB][bt_ld]
 *   lidx  [n_seg]       the last row of each segment, those that want logits first */
typedef struct paged_plan {
    int T, nA, nB, maxA, maxB, n_seg, n_logits;
    size_t o_segA, o_segB, o_btA, o_btB, o_lidx, n_ints;
} paged_plan;

static void plan_offsets(paged_plan *pl, int bt_ld) {
    pl->o_segA = (size_t)2 * pl->T;
    pl->o_segB = pl->o_segA + (size_t)4 * pl->nA;
    pl->o_btA = pl->o_segB + (size_t)4 * pl->nB;
    pl->o_btB = pl->o_btA + (size_t)pl->nA * bt_ld;
    pl->o_lidx = pl->o_btB + (size_t)pl->nB * bt_ld;
    pl->n_ints = pl->o_lidx + (size_t)pl->n_seg;
}

/* The decoder over the step's rows (x rows 0..T-1), K/V through the block
 * tables into the pool (kl, vl: per-layer device bases [rows, Hkv*D]);
 * then the last row of every segment gathered into xg and, for the first
 * n_logits of them, the logits. fork (decode steps; 0 for others): each
 * layer's MLP or experts on ctx2's stream beside the attention, as in
 * text_layers (mlp_branch; y2 holds a decode step's rows). */
static albedo_status text_layers_paged(mdc_state *s, const paged_plan *pl, void *const *kl, void *const *vl, int bs,
                                       int fork, errbuf *e) {
    const mdc_model *m = s->m;
    const mdc_desc *d = &m->d;
    const int dim = d->dim, dimp = round8(dim), ffp = round8(d->ff_dim), qd = m->H * m->D, kvd = m->Hkv * m->D;
    const int T = pl->T, Tl = gemm_rows(T, s->rows);
    if (fork && (!s->ctx2 || T > s->seqs)) return errf(e, ALBEDO_ERR_INTERNAL, "cuda: a forked step of %d rows", T);
    int n_forked = 0;
    for (int l = 0; l < d->n_layers; l++) {
        const dtblock *b = &m->tb[l];
        void *kc = kl[l], *vc = vl[l];
        const int moe = m->md3 && md3_layer_moe(m->md3, l), par = fork == 2 || (fork == 1 && !moe);
        OPK(cuda_layernorm_ld(s->ctx, s->h, DT_BF16, dimp, s->x, DT_F32, dim, T, dim, b->ln_w, b->ln_b, DT_F32, 1e-5f));
        if (par) {
            albedo_status st = mlp_branch(s, l, moe, fork, T, Tl, e);
            if (st) return st;
            n_forked++;
        }
        OPK(cuda_linear(s->ctx, s->qkv, DT_BF16, m->qkvw, s->h, dimp, Tl, &b->qkv.w, CUDA_ACT_NONE, 0));
        if (m->md3) { /* Moondream 3: tau, each row at its own position (meta's rows: position, pool row) */
            albedo_status st = md3_tau(m->md3, s->md3, s->ctx, l, s->qkv, m->qkvw, T, Tl, 0, NULL, s->meta, 2, e);
            if (st) return st;
        }
        cuda_rope r;
        memset(&r, 0, sizeof r);
        r.x = s->qkv, r.ldx = m->qkvw, r.T = T, r.H = m->H, r.Hkv = m->Hkv, r.D = m->D, r.R = d->rot_dims;
        r.cos_t = m->cos_t, r.sin_t = m->sin_t, r.k_cache = kc, r.v_cache = vc, r.rows = s->meta;
        r.kv_fp8 = m->kv_fp8, r.k_scale = m->k_scale, r.v_scale = m->v_scale;
        OPK(cuda_rope_kv(s->ctx, &r));
        for (int grp = 0; grp < 2; grp++) {
            const int n = grp ? pl->nB : pl->nA;
            /* The decode kernel's partial results hold ATTN_SLOTS/2 rows ×
             * heads a launch (paged_fill keeps a step within one launch up to
             * 8192 / H sequences; more go in several). */
            if (!n) continue;
            int per = grp ? n : (int)((ATTN_SLOTS / 2) / ((long)pl->maxA * m->H));
            if (per < 1) per = 1; /* then the launcher refuses it */
            for (int i0 = 0; i0 < n; i0 += per) {
                cuda_attn a;
                memset(&a, 0, sizeof a);
                a.T = grp ? pl->maxB : pl->maxA, a.S = s->max_ctx, a.H = m->H, a.Hkv = m->Hkv, a.D = m->D;
                a.scale = 1.0f / sqrtf((float)m->D), a.n_seq = n - i0 < per ? n - i0 : per;
                a.q = s->qkv, a.ldq = m->qkvw;
                a.k = kc, a.ldk = kvd, a.k_head = m->D;
                a.v = vc, a.ldv = kvd, a.v_head = m->D;
                a.out = s->att, a.ldo = qd;
                a.seg = s->meta + (grp ? pl->o_segB : pl->o_segA) + (size_t)4 * i0;
                a.blocks = s->meta + (grp ? pl->o_btB : pl->o_btA) + (size_t)i0 * s->bt_ld;
                a.block_size = bs, a.blocks_ld = s->bt_ld;
                a.kv_fp8 = m->kv_fp8, a.k_scale = m->k_scale, a.v_scale = m->v_scale;
                OPK(cuda_attention(s->ctx, &a));
            }
        }
        if (fork == 1 && par) CK(cudaStreamWaitEvent(s->st, s->ev_join, 0));
        OPK(cuda_linear(s->ctx, s->x, DT_F32, dim, s->att, qd, Tl, &b->proj.w, CUDA_ACT_NONE, 1));
        if (fork == 2) { /* the join: x += the branch's rows */
            CK(cudaStreamWaitEvent(s->st, s->ev_join, 0));
            OPK(cuda_add(s->ctx, s->x, DT_F32, s->y2, DT_F32, (size_t)T * dim));
            continue;
        }
        if (moe) { /* the experts over the step's T rows (not the bucket) */
            albedo_status st = md3_moe(m->md3, s->md3, s->ctx, l, s->h, dimp, s->x, dim, T, Tl, 0, e);
            if (st) return st;
            continue;
        }
        if (!par) OPK(cuda_linear(s->ctx, s->f, DT_BF16, ffp, s->h, dimp, Tl, &b->fc1.w, CUDA_ACT_GELU_TANH, 0));
        OPK(cuda_linear(s->ctx, s->x, DT_F32, dim, s->f, ffp, Tl, &b->fc2.w, CUDA_ACT_NONE, 1));
    }
    if (fork) s->fork_layers = n_forked;
    LAUNCH(gather_rows_kernel, pl->n_seg, 256, s->xg, (const float *)s->x, (const int32_t *)(s->meta + pl->o_lidx),
           dim);
    if (pl->n_logits) {
        OPK(cuda_layernorm_ld(s->ctx, s->h, DT_BF16, dimp, s->xg, DT_F32, dim, pl->n_logits, dim, m->tpost_w,
                              m->tpost_b, DT_F32, 1e-5f));
        OPK(cuda_linear(s->ctx, s->logits, DT_F32, d->vocab, s->h, dimp, gemm_rows(pl->n_logits, s->seqs),
                        &m->lm_head.w, CUDA_ACT_NONE, 0));
    }
    return ALBEDO_OK;
}

/* Fill meta_h for segs; order[i] = the segment of gathered row i. */
static albedo_status paged_fill(mdc_state *s, const mdc_seg *segs, int n_seg, int bs, paged_plan *pl, int *order,
                                errbuf *e) {
    memset(pl, 0, sizeof *pl);
    pl->n_seg = n_seg;
    int small = 8;
    for (int pass = 0; pass < 2; pass++) {
        pl->T = pl->nA = pl->nB = pl->maxA = pl->maxB = pl->n_logits = 0;
        for (int i = 0; i < n_seg; i++) {
            const mdc_seg *g = &segs[i];
            if (g->T < 1 || g->pos0 < 0 || g->pos0 + g->T > s->max_ctx || !g->blocks ||
                g->n_blocks * bs < g->pos0 + g->T)
                return errf(e, ALBEDO_ERR_INTERNAL, "cuda: segment %d: %d rows at %d, %d blocks", i, g->T, g->pos0,
                            g->n_blocks);
            pl->T += g->T;
            if (g->T <= small) {
                pl->nA++;
                if (g->T > pl->maxA) pl->maxA = g->T;
            } else {
                pl->nB++;
                if (g->T > pl->maxB) pl->maxB = g->T;
            }
            pl->n_logits += g->logits_host != NULL || g->pick != NULL;
        }
        /* The decode kernel's partial results hold ATTN_SLOTS rows × heads. */
        if ((long)pl->nA * pl->maxA * s->m->H <= ATTN_SLOTS / 2 || small == 1) break;
        small = 1;
    }
    if ((long)s->m->H > ATTN_SLOTS / 2) return errf(e, ALBEDO_ERR_UNSUPPORTED, "cuda: %d heads", s->m->H);
    if (pl->T > s->rows || n_seg > s->seqs)
        return errf(e, ALBEDO_ERR_LIMIT, "cuda: a step of %d rows and %d sequences (the state has %d and %d)", pl->T,
                    n_seg, s->rows, s->seqs);
    plan_offsets(pl, s->bt_ld);
    if (pl->n_ints > s->meta_cap) return errf(e, ALBEDO_ERR_INTERNAL, "cuda: step metadata overflows");
    int32_t *mh = s->meta_h;
    int iA = 0, iB = 0, r0 = 0, lo = 0, hi = pl->n_logits;
    for (int i = 0; i < n_seg; i++) {
        const mdc_seg *g = &segs[i];
        for (int t = 0; t < g->T; t++) {
            const int p = g->pos0 + t;
            mh[2 * (r0 + t)] = p;
            mh[2 * (r0 + t) + 1] = g->blocks[p / bs] * bs + p % bs;
        }
        const int A = g->T <= small;
        int32_t *sg = mh + (A ? pl->o_segA + 4 * (size_t)iA : pl->o_segB + 4 * (size_t)iB);
        int32_t *bt = mh + (A ? pl->o_btA + (size_t)iA * s->bt_ld : pl->o_btB + (size_t)iB * s->bt_ld);
        sg[0] = r0, sg[1] = g->T, sg[2] = g->pos0, sg[3] = g->n_prefix;
        const int nb = (g->pos0 + g->T + bs - 1) / bs;
        memcpy(bt, g->blocks, (size_t)nb * sizeof(int32_t));
        if (A)
            iA++;
        else
            iB++;
        const int at = g->logits_host || g->pick ? lo++ : hi++;
        mh[pl->o_lidx + at] = r0 + g->T - 1;
        order[at] = i;
        r0 += g->T;
    }
    return ALBEDO_OK;
}

static albedo_status upload_rows(mdc_state *s, const float *emb_host, int T, errbuf *e) {
    const size_t bytes = (size_t)T * s->m->d.dim * sizeof(float);
    if (T <= s->stage_rows) {
        memcpy(s->stage, emb_host, bytes);
        CK(cudaMemcpyAsync(s->x, s->stage, bytes, cudaMemcpyHostToDevice, s->st));
    } else {
        CK(cudaMemcpyAsync(s->x, emb_host, bytes, cudaMemcpyHostToDevice, s->st));
    }
    return ALBEDO_OK;
}

/* Capture the decode step of n one-row sequences (metadata at its fixed
 * offsets for that n). */
static albedo_status capture_paged(mdc_state *s, const paged_plan *pl, void *const *kl, void *const *vl, int bs,
                                   int fork, errbuf *e) {
    CK(cudaStreamBeginCapture(s->st, cudaStreamCaptureModeThreadLocal));
    errbuf sub;
    albedo_status st = text_layers_paged(s, pl, kl, vl, bs, fork, &sub);
    cudaGraph_t g = NULL;
    cudaError_t ce = cudaStreamEndCapture(s->st, &g);
    if (st) {
        if (g) cudaGraphDestroy(g);
        return errf(e, st, "%s (while capturing a paged decode graph)", sub.msg);
    }
    cudaGraphExec_t ex = NULL;
    if (ce == cudaSuccess) ce = cudaGraphInstantiate(&ex, g, 0);
    if (g) cudaGraphDestroy(g);
    if (ce != cudaSuccess)
        return errf(e, cuda_status_of(ce), "cuda: capturing a paged decode graph: %s", cudaGetErrorString(ce));
    s->pgraph[pl->n_seg] = ex;
    s->pfork[pl->n_seg] = fork != 0;
    s->n_captured++;
    return ALBEDO_OK;
}

albedo_status mdc_forward_paged(mdc_state *s, void *const *kl, void *const *vl, int bs, const float *emb_host,
                                const mdc_seg *segs, int n_seg, errbuf *e) {
    const mdc_desc *d = &s->m->d;
    if (!s->meta_cap || bs < 1 || (long)bs * s->bt_ld < s->max_ctx || n_seg < 1)
        return errf(e, ALBEDO_ERR_INTERNAL, "cuda: a paged step on a state not made for one");
    CK(cudaSetDevice(s->m->device));
    paged_plan pl;
    albedo_status st = paged_fill(s, segs, n_seg, bs, &pl, s->gorder, e);
    if (st) return st;
    /* Decode steps (every segment one row, all with logits) replay a graph
     * per number of sequences, captured at the second step of that size
     * (the first has run cuBLASLt's heuristics for its shapes). */
    const int decode = pl.T == n_seg && pl.n_logits == n_seg && pl.nB == 0;
    /* Decode steps of up to fork_seqs sequences fork each layer's MLP
     * (text_layers_paged), eager or captured alike, so the eager step before
     * a capture has run the branch's cuBLASLt heuristics too. A graph keeps
     * the fork it was captured with. */
    const int fork = decode && n_seg <= fork_seqs(s) ? fork_ready(s) : 0;
    s->last_graph = 0;
    if (decode && s->graphs && !s->pgraph[n_seg] && ++s->pseen[n_seg] >= 2) {
        errbuf sub;
        CK(cudaStreamSynchronize(s->st));
        if (capture_paged(s, &pl, kl, vl, bs, fork, &sub)) {
            s->graphs = 0;
            snprintf(s->graph_err, sizeof s->graph_err, "%s", sub.msg);
            cudaGetLastError();
        }
    }
    st = upload_rows(s, emb_host, pl.T, e);
    if (st) return st;
    CK(cudaMemcpyAsync(s->meta, s->meta_h, pl.n_ints * sizeof(int32_t), cudaMemcpyHostToDevice, s->st));
    if (decode && s->graphs && s->pgraph[n_seg]) {
        CK(cudaGraphLaunch(s->pgraph[n_seg], s->st));
        s->last_graph = 1;
        g_paged_graph_steps++;
        if (s->pfork[n_seg]) g_paged_fork_steps++;
    } else {
        st = text_layers_paged(s, &pl, kl, vl, bs, fork, e);
        if (st) return st;
        if (fork) g_paged_fork_steps++;
    }
    /* The hidden rows through pinned staging; each logits row straight into
     * its destination (the engine page-locks its requests' buffers), or,
     * picked on the device, only its id. */
    CK(cudaMemcpyAsync(s->down_hidden, s->xg, (size_t)n_seg * d->dim * sizeof(float), cudaMemcpyDeviceToHost, s->st));
    int n_pick = 0;
    st = pick_rows(s, segs, pl.n_logits, &n_pick, e);
    if (st) return st;
    for (int i = 0; i < pl.n_logits; i++)
        if (segs[s->gorder[i]].logits_host)
            CK(cudaMemcpyAsync(segs[s->gorder[i]].logits_host, s->logits + (size_t)i * d->vocab,
                               (size_t)d->vocab * sizeof(float), cudaMemcpyDeviceToHost, s->st));
    st = finish(s, e);
    if (st) return st;
    for (int i = 0; n_pick && i < pl.n_logits; i++) {
        const mdc_seg *g = &segs[s->gorder[i]];
        if (!g->logits_host && g->pick) *g->pick->id_host = s->pick_ids_h[i];
    }
    if (n_pick) g_device_picks += n_pick;
    for (int i = 0; i < n_seg; i++)
        memcpy(segs[s->gorder[i]].hidden_host, s->down_hidden + (size_t)i * d->dim, (size_t)d->dim * sizeof(float));
    return ALBEDO_OK;
}

albedo_status mdc_image_prefix_paged(mdc_state *s, const uint8_t *crops_host, int n, int th, int tw, void *const *kl,
                                     void *const *vl, int bs, const int32_t *blocks, int n_blocks, errbuf *e) {
    mdc_model *m = s->m;
    const mdc_desc *d = &m->d;
    if (!s->meta_cap || bs < 1 || (long)bs * s->bt_ld < s->max_ctx)
        return errf(e, ALBEDO_ERR_INTERNAL, "cuda: a paged prefix on a state not made for one");
    CK(cudaSetDevice(m->device));
    albedo_status st = vision_all(s, crops_host, n, th, tw, NULL, e);
    if (st) return st;
    OPK(cuda_embed(s->ctx, s->x, m->wte, d->vocab, d->dim, s->ids, 1));
    mdc_seg g;
    memset(&g, 0, sizeof g);
    g.pos0 = 0, g.T = d->prefix_attn, g.n_prefix = d->prefix_attn, g.blocks = blocks, g.n_blocks = n_blocks;
    g.hidden_host = s->down_hidden; /* not used */
    paged_plan pl;
    st = paged_fill(s, &g, 1, bs, &pl, s->gorder, e);
    if (st) return st;
    CK(cudaMemcpyAsync(s->meta, s->meta_h, pl.n_ints * sizeof(int32_t), cudaMemcpyHostToDevice, s->st));
    st = text_layers_paged(s, &pl, kl, vl, bs, 0, e);
    if (st) return st;
    /* The blocks are read by other streams (the engine's steps) next. */
    return finish(s, e);
}

/* ---- the engine's KV pool on the device --------------------------------------------------- */

struct mdc_pool {
    mdc_model *m;
    unsigned char *mem;
    size_t plane, row; /* bytes of one layer's K (or V) pool; of one row */
    cudaStream_t st;   /* copies */
};

void mdc_host_pin(void *p, size_t bytes, int on) {
    if (!p) return;
    if (on)
        cudaHostRegister(p, bytes, cudaHostRegisterDefault);
    else
        cudaHostUnregister(p);
    cudaGetLastError();
}

size_t mdc_free_memory(mdc_model *m) {
    size_t f = 0, t = 0;
    if (cudaSetDevice(m->device) != cudaSuccess || cudaMemGetInfo(&f, &t) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return f;
}

albedo_status mdc_pool_new(mdc_model *m, long n_rows, void **k, void **v, mdc_pool **out, errbuf *e) {
    *out = NULL;
    CK(cudaSetDevice(m->device));
    mdc_pool *p = (mdc_pool *)calloc(1, sizeof *p);
    if (!p) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    p->m = m;
    p->row = (size_t)m->Hkv * m->D * m->kv_es;
    p->plane = ((size_t)n_rows * p->row + 255) & ~(size_t)255;
    const size_t bytes = p->plane * 2 * m->d.n_layers;
    cudaError_t ce = cudaMalloc((void **)&p->mem, bytes);
    if (ce == cudaSuccess) ce = cudaStreamCreateWithFlags(&p->st, cudaStreamNonBlocking);
    if (ce != cudaSuccess) {
        mdc_pool_free(p);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "cuda: a KV cache of %.2f GiB: %s", bytes / 1073741824.0,
                    cudaGetErrorString(ce));
    }
    for (int l = 0; l < m->d.n_layers; l++) {
        k[l] = p->mem + (size_t)(2 * l) * p->plane;
        v[l] = p->mem + (size_t)(2 * l + 1) * p->plane;
    }
    *out = p;
    return ALBEDO_OK;
}

void mdc_pool_free(mdc_pool *p) {
    if (!p) return;
    cudaSetDevice(p->m->device);
    if (p->st) {
        cudaStreamSynchronize(p->st);
        cudaStreamDestroy(p->st);
    }
    cudaFree(p->mem);
    free(p);
}

albedo_status mdc_pool_copy(mdc_pool *p, long dst_row, long src_row, int n_rows, errbuf *e) {
    CK(cudaSetDevice(p->m->device));
    /* Every layer's K and V plane at once: 2·n_layers rows of a 2-D copy. */
    CK(cudaMemcpy2DAsync(p->mem + (size_t)dst_row * p->row, p->plane, p->mem + (size_t)src_row * p->row, p->plane,
                         (size_t)n_rows * p->row, (size_t)2 * p->m->d.n_layers, cudaMemcpyDeviceToDevice, p->st));
    CK(cudaStreamSynchronize(p->st));
    return ALBEDO_OK;
}

/* ---- image prefix ----------------------------------------------------------------------------- */

/* Rows (layer, k|v, kv head) of the cache: the first n_pos positions. */
static cudaError_t copy_prefix(mdc_state *s, unsigned char *dst, const unsigned char *src, int to_cache, int n_pos) {
    const mdc_model *m = s->m;
    const size_t w = (size_t)n_pos * m->D * m->kv_es, pitch = (size_t)s->max_ctx * m->D * m->kv_es;
    const size_t rows = (size_t)m->d.n_layers * 2 * m->Hkv;
    if (to_cache) return cudaMemcpy2DAsync(dst, pitch, src, w, w, rows, cudaMemcpyDeviceToDevice, s->st);
    return cudaMemcpy2DAsync(dst, w, src, pitch, w, rows, cudaMemcpyDeviceToDevice, s->st);
}

albedo_status mdc_image_prefix(mdc_state *s, const uint8_t *crops_host, int n, int th, int tw, mdc_prefix **out,
                               errbuf *e) {
    mdc_model *m = s->m;
    const mdc_desc *d = &m->d;
    if (out) *out = NULL;
    CK(cudaSetDevice(m->device));
    if (!(s->flags & MDC_KV))
        return errf(e, ALBEDO_ERR_INTERNAL, "cuda: an image prefix on a state without a KV cache");
    albedo_status st = vision_all(s, crops_host, n, th, tw, NULL, e);
    if (st) return st;
    OPK(cuda_embed(s->ctx, s->x, m->wte, d->vocab, d->dim, s->ids, 1));
    st = text_layers(s, d->prefix_attn, 0, NULL, d->prefix_attn, 0, e);
    if (st) return st;
    mdc_prefix *p = NULL;
    if (out) {
        p = (mdc_prefix *)calloc(1, sizeof *p);
        if (!p) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
        p->m = m;
        p->slot = -1;
        pthread_mutex_lock(&m->mu);
        for (int i = 0; i < m->n_slots && p->slot < 0; i++)
            if (!m->slot_used[i]) {
                m->slot_used[i] = 1;
                p->slot = i;
                p->p = m->slot_mem + (size_t)i * m->prefix_bytes;
            }
        pthread_mutex_unlock(&m->mu);
        cudaError_t ce = cudaSuccess;
        if (p->slot < 0) ce = cudaMalloc((void **)&p->p, m->prefix_bytes);
        if (ce == cudaSuccess) ce = copy_prefix(s, p->p, (const unsigned char *)s->kv, 0, d->prefix_attn);
        if (ce != cudaSuccess) {
            mdc_prefix_free(p);
            return errf(e, cuda_status_of(ce), "cuda: the image's prefix KV (%.0f MiB): %s",
                        m->prefix_bytes / 1048576.0, cudaGetErrorString(ce));
        }
    }
    /* Other sessions (other streams) may load the prefix next: it is
     * complete when this returns. */
    st = finish(s, e);
    if (st) {
        mdc_prefix_free(p);
        return st;
    }
    if (out) *out = p;
    return ALBEDO_OK;
}

albedo_status mdc_prefix_load(mdc_state *s, const mdc_prefix *p, errbuf *e) {
    CK(cudaSetDevice(s->m->device));
    if (!(s->flags & MDC_KV)) return errf(e, ALBEDO_ERR_INTERNAL, "cuda: a prefix load on a state without a KV cache");
    cudaError_t ce = copy_prefix(s, s->kv, p->p, 1, s->m->d.prefix_attn);
    if (ce != cudaSuccess) {
        s->sticky = cuda_status_of(ce);
        snprintf(s->sticky_msg, sizeof s->sticky_msg, "cuda: loading an image's prefix KV: %s", cudaGetErrorString(ce));
        return errf(e, s->sticky, "%s", s->sticky_msg);
    }
    return ALBEDO_OK;
}

void mdc_prefix_free(mdc_prefix *p) {
    if (!p) return;
    mdc_model *m = p->m;
    if (p->slot >= 0) {
        pthread_mutex_lock(&m->mu);
        m->slot_used[p->slot] = 0;
        pthread_mutex_unlock(&m->mu);
    } else if (p->p) {
        cudaSetDevice(m->device);
        cudaFree(p->p);
    }
    free(p);
}

/* ---- test hooks -------------------------------------------------------------------------------- */

albedo_status mdc_kv_download(mdc_state *s, int l, int n_pos, float *k_host, float *v_host, errbuf *e) {
    const mdc_model *m = s->m;
    if (!(s->flags & MDC_KV) || l < 0 || l >= m->d.n_layers || n_pos < 1 || n_pos > s->max_ctx)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "cuda: layer %d, %d positions", l, n_pos);
    CK(cudaSetDevice(m->device));
    const int Hkv = m->Hkv, D = m->D;
    const size_t head = (size_t)s->max_ctx * D, es = m->kv_es;
    unsigned char *tmp = (unsigned char *)malloc((size_t)2 * Hkv * n_pos * D * es);
    if (!tmp) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    const unsigned char *base = s->kv + (size_t)l * 2 * Hkv * head * es;
    cudaError_t ce = cudaStreamSynchronize(s->st);
    /* rows (k|v, head): n_pos·D elements each */
    if (ce == cudaSuccess)
        ce = cudaMemcpy2D(tmp, (size_t)n_pos * D * es, base, head * es, (size_t)n_pos * D * es, (size_t)2 * Hkv,
                          cudaMemcpyDeviceToHost);
    if (ce != cudaSuccess) {
        free(tmp);
        return errf(e, cuda_status_of(ce), "cuda: %s", cudaGetErrorString(ce));
    }
    for (int kind = 0; kind < 2; kind++)
        for (int g = 0; g < Hkv; g++)
            for (int p = 0; p < n_pos; p++)
                for (int dd = 0; dd < D; dd++) {
                    const size_t i = (((size_t)kind * Hkv + g) * n_pos + p) * D + dd;
                    uint16_t h;
                    if (es == 2) memcpy(&h, tmp + 2 * i, 2);
                    /* e4m3 → half is exact; decoded on the host and scaled */
                    const float v = es == 2 ? bf16_to_f32(h)
                                            : __half2float(__half(__nv_cvt_fp8_to_halfraw(tmp[i], __NV_E4M3))) *
                                                  (kind ? m->v_scale : m->k_scale);
                    (kind ? v_host : k_host)[(size_t)p * Hkv * D + (size_t)g * D + dd] = v;
                }
    free(tmp);
    return ALBEDO_OK;
}

void mdc_graph_stats(const mdc_state *s, int *last_used_graph, int *n_captured) {
    if (last_used_graph) *last_used_graph = s->last_graph;
    if (n_captured) *n_captured = s->n_captured;
}

const char *mdc_graph_error(const mdc_state *s) { return s->graph_err; }

int mdc_fork_layers(const mdc_state *s) { return s->fork_layers; }
