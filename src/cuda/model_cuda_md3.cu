/*
 * model_cuda_md3.cu — Moondream 3's tau attention and experts in the GPU
 * model runner (model_cuda_md3.h): the upload of its extra tensors, a
 * session's working memory for them, and the two per-layer stages, composed
 * from moe.cu's kernels and cuda_linear.
 *
 *   tau, per layer, T rows (qkv bf16 [T, (H + 2·Hkv)·D] with its bias):
 *     cuda_gelu_erf_rows       f bf16 [T, qkvw]
 *     cuda_linear              scores f32 [T, 2H] = f·[wq ‖ wv]ᵀ
 *       (T <= 4: cuda_tau_scores, both in one launch)
 *     cuda_tau_scale           q, v *= tanh(score) + τ(position)
 *   experts, layers >= moe.start_layer (h = LN(x) bf16 [T, dimp]):
 *     cuda_linear              router logits f32 [T, E] (+ bias)
 *     cuda_moe_route           sel, wt [T, k]
 *     cuda_moe_mlp             x += Σ_k wt·expert(h): GEMVs over the selected
 *                              experts for T <= 4, grouped GEMMs above
 *
 * Weights: tau [2H, qkvw] bf16 (wq's rows, then wv's), alpha [H] f32, router
 * [E, dimp] bf16 with an f32 bias, fc1 [E, 2I, dimp] and fc2 [E, dim, Ip]
 * bf16 (dimp, Ip: dim and I rounded up to multiples of 8, zero columns).
 * BF16 tensors without padding are copied straight from the mapping; others
 * are converted through a host staging buffer.
 *
 * FP8 experts (mdc_md3_desc.exp_fp8; docs/CUDA.md, FP8 experts): fc1 and
 * fc2 as e4m3 [E, 2I, dimq] and [E, dim, Iq] (dimq, Iq: multiples of 16,
 * zero columns) with a float32 scale per row; each chunk of rows goes to a
 * device staging buffer as bf16 and cuda_quant_e4m3_rows writes its e4m3
 * rows and scales in place, so no bf16 copy of the experts stays.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_internal.cuh"
#include "model_cuda_md3.h"

static int r8(int v) { return (v + 7) / 8 * 8; }
static int r16(int v) { return (v + 15) / 16 * 16; }

typedef struct md3_layer {
    cuda_linear_w tau; /* [2H, qkvw] */
    float *alpha;      /* [H] */
    int moe;
    cuda_linear_w router; /* [E, dimp], f32 bias */
    uint16_t *w1, *w2;    /* [E, 2I, dimp], [E, dim, Ip] */
    uint8_t *q1, *q2;     /* fp8: e4m3 [E, 2I, dimq], [E, dim, Iq] */
    float *s1, *s2;       /* fp8: row scales [E, 2I], [E, dim] */
} md3_layer;

struct md3_model {
    int n_layers, dim, dimp, H, Hkv, D, qkvw, E, K, I, Ip, pos_bf16;
    int fp8, dimq, Iq; /* experts as e4m3 with row scales; their rows' strides (multiples of 16) */
    unsigned char *mem;
    size_t bytes;
    md3_layer L[128];
};

struct md3_state {
    const md3_model *m;
    int max_ctx;
    unsigned char *mem;
    size_t bytes;
    uint16_t *f;                /* [max_ctx, qkvw] */
    float *scores;              /* [max_ctx, 2H] */
    float *rlog;                /* [max_ctx, E] */
    int32_t *sel;               /* [max_ctx, K] */
    float *wt;                  /* [max_ctx, K] */
    void *scratch;              /* cuda_moe_scratch_bytes(max_ctx, ...) */
    int gemm_small, gemm_large; /* cuda_moe.gemm below / from CUDA_MOE_GEMM_LARGE_TK assignments (0: default) */
};

#define CK3(call)                                                                                                 \
    do {                                                                                                          \
        cudaError_t e_ = (call);                                                                                  \
        if (e_ != cudaSuccess) return errf(e, cuda_status_of(e_), "cuda: %s: %s", #call, cudaGetErrorString(e_)); \
    } while (0)

#define OPK3(call)                                                                \
    do {                                                                          \
        albedo_status s_ = (call);                                                \
        if (s_ != ALBEDO_OK) return errf(e, s_, "cuda: %s", cuda_ctx_error(ctx)); \
    } while (0)

/* ---- upload ---------------------------------------------------------------------------- */

typedef struct up3 {
    md3_model *m;
    int pass; /* 0: sizes only */
    size_t off;
    albedo_status st;
    errbuf *e;
    uint16_t *stage;
    size_t stage_elems;
    uint16_t *dstage; /* fp8: device staging of stage_elems bf16 */
    cuda_ctx *ctx;    /* fp8: the quantising kernel's stream */
} up3;

static void *take3(up3 *u, size_t bytes) {
    const size_t o = (u->off + 255) & ~(size_t)255;
    u->off = o + bytes;
    return u->pass ? u->m->mem + o : NULL;
}

static float get3(const void *p, dtype dt, size_t i) {
    if (dt == DT_F32) return ((const float *)p)[i];
    if (dt == DT_F16) return f16_to_f32(((const uint16_t *)p)[i]);
    return bf16_to_f32(((const uint16_t *)p)[i]);
}

static int plain3(dtype dt) { return dt == DT_F32 || dt == DT_F16 || dt == DT_BF16; }

static void copy3(up3 *u, void *dst, const void *src, size_t bytes) {
    if (u->st) return;
    cudaError_t ce = cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
    if (ce != cudaSuccess)
        u->st = errf(u->e, cuda_status_of(ce), "cuda: uploading Moondream 3 weights: %s", cudaGetErrorString(ce));
}

static int bad3(up3 *u, const void *p, dtype dt, const char *what) {
    if (u->st) return 1;
    if (p && plain3(dt)) return 0;
    u->st = errf(u->e, ALBEDO_ERR_UNSUPPORTED, "cuda: %s: dtype %s (the CUDA backend takes F32, F16 or BF16 weights)",
                 what, p ? dtype_name(dt) : "(missing)");
    return 1;
}

/* rows × K of a host matrix → bf16 rows × Kp at dst (device), zero padded. */
static void put_rows3(up3 *u, uint16_t *dst, const void *p, dtype dt, size_t rows, int K, int Kp, const char *what) {
    if (!u->pass || bad3(u, p, dt, what)) return;
    if (dt == DT_BF16 && K == Kp) {
        copy3(u, dst, p, rows * (size_t)K * 2);
        return;
    }
    const size_t per = u->stage_elems / (size_t)Kp;
    for (size_t r0 = 0; r0 < rows && !u->st; r0 += per) {
        const size_t k = rows - r0 < per ? rows - r0 : per;
        for (size_t r = 0; r < k; r++)
            for (int c = 0; c < Kp; c++)
                u->stage[r * Kp + c] = c < K ? f32_to_bf16(get3(p, dt, (r0 + r) * (size_t)K + c)) : (uint16_t)0;
        copy3(u, dst + r0 * Kp, u->stage, k * (size_t)Kp * 2);
    }
}

/* rows × K of a host matrix → e4m3 rows × ldq at q with a scale per row
 * (device), through bf16 in the device staging buffer. */
static void put_f8_3(up3 *u, uint8_t *q, int ldq, float *scale, const void *p, dtype dt, size_t rows, int K,
                     const char *what) {
    if (!u->pass || bad3(u, p, dt, what)) return;
    cudaStream_t str = (cudaStream_t)cuda_ctx_stream(u->ctx);
    const size_t per = u->stage_elems / (size_t)K;
    for (size_t r0 = 0; r0 < rows && !u->st; r0 += per) {
        const size_t k = rows - r0 < per ? rows - r0 : per;
        const void *src = (const uint16_t *)p + r0 * K;
        if (dt != DT_BF16) {
            for (size_t i = 0; i < k * (size_t)K; i++) u->stage[i] = f32_to_bf16(get3(p, dt, r0 * (size_t)K + i));
            src = u->stage;
        }
        cudaError_t ce = cudaMemcpyAsync(u->dstage, src, k * (size_t)K * 2, cudaMemcpyHostToDevice, str);
        if (ce != cudaSuccess) {
            u->st = errf(u->e, cuda_status_of(ce), "cuda: uploading Moondream 3 experts: %s", cudaGetErrorString(ce));
            return;
        }
        if (cuda_quant_e4m3_rows(u->ctx, q + r0 * ldq, ldq, scale + r0, u->dstage, K, (long)k, K)) {
            u->st = errf(u->e, ALBEDO_ERR_INTERNAL, "cuda: %s: %s", what, cuda_ctx_error(u->ctx));
            return;
        }
        ce = cudaStreamSynchronize(str); /* the staging buffers are reused */
        if (ce != cudaSuccess)
            u->st = errf(u->e, cuda_status_of(ce), "cuda: quantising Moondream 3 experts: %s", cudaGetErrorString(ce));
    }
}

static float *put_f32_3(up3 *u, const void *p, dtype dt, size_t n, const char *what) {
    float *d = (float *)take3(u, n * 4);
    if (!u->pass || bad3(u, p, dt, what)) return d;
    float *tmp = (float *)u->stage;
    const size_t chunk = u->stage_elems / 2;
    for (size_t i0 = 0; i0 < n && !u->st; i0 += chunk) {
        const size_t k = n - i0 < chunk ? n - i0 : chunk;
        for (size_t i = 0; i < k; i++) tmp[i] = get3(p, dt, i0 + i);
        copy3(u, d + i0, tmp, k * 4);
    }
    return d;
}

static void upload3(up3 *u, const mdc_desc *d) {
    md3_model *m = u->m;
    const mdc_md3_desc *x = d->md3;
    char what[96];
    for (int l = 0; l < m->n_layers; l++) {
        const mdc_md3_block *b = &x->b[l];
        md3_layer *L = &m->L[l];
        snprintf(what, sizeof what, "text block %d tau", l);
        uint16_t *tw = (uint16_t *)take3(u, (size_t)2 * m->H * m->qkvw * 2);
        if (b->tau_wq.n_out != m->H || b->tau_wv.n_out != m->H || b->tau_wq.n_in != m->qkvw ||
            b->tau_wv.n_in != m->qkvw) {
            if (!u->st) u->st = errf(u->e, ALBEDO_ERR_UNSUPPORTED, "cuda: %s: unexpected shape", what);
            return;
        }
        put_rows3(u, tw, b->tau_wq.w, b->tau_wq.dt, (size_t)m->H, m->qkvw, m->qkvw, what);
        put_rows3(u, tw ? tw + (size_t)m->H * m->qkvw : NULL, b->tau_wv.w, b->tau_wv.dt, (size_t)m->H, m->qkvw, m->qkvw,
                  what);
        L->tau = (cuda_linear_w){tw, NULL, DT_F32, 2 * m->H, m->qkvw};
        L->alpha = put_f32_3(u, b->tau_alpha.p, b->tau_alpha.dt, (size_t)m->H, what);
        L->moe = b->moe;
        if (!b->moe) continue;
        snprintf(what, sizeof what, "text block %d experts", l);
        uint16_t *rw = (uint16_t *)take3(u, (size_t)m->E * m->dimp * 2);
        put_rows3(u, rw, b->router.w, b->router.dt, (size_t)m->E, m->dim, m->dimp, what);
        float *rb = b->router.b ? put_f32_3(u, b->router.b, b->router.bdt, (size_t)m->E, what) : NULL;
        L->router = (cuda_linear_w){rw, rb, DT_F32, m->E, m->dimp};
        if (m->fp8) {
            const size_t r1 = (size_t)m->E * 2 * m->I, r2 = (size_t)m->E * m->dim;
            L->q1 = (uint8_t *)take3(u, r1 * m->dimq);
            L->s1 = (float *)take3(u, r1 * 4);
            put_f8_3(u, L->q1, m->dimq, L->s1, b->exp_fc1, b->exp_fc1_dt, r1, m->dim, what);
            L->q2 = (uint8_t *)take3(u, r2 * m->Iq);
            L->s2 = (float *)take3(u, r2 * 4);
            put_f8_3(u, L->q2, m->Iq, L->s2, b->exp_fc2, b->exp_fc2_dt, r2, m->I, what);
            continue;
        }
        L->w1 = (uint16_t *)take3(u, (size_t)m->E * 2 * m->I * m->dimp * 2);
        put_rows3(u, L->w1, b->exp_fc1, b->exp_fc1_dt, (size_t)m->E * 2 * m->I, m->dim, m->dimp, what);
        L->w2 = (uint16_t *)take3(u, (size_t)m->E * m->dim * m->Ip * 2);
        put_rows3(u, L->w2, b->exp_fc2, b->exp_fc2_dt, (size_t)m->E * m->dim, m->I, m->Ip, what);
    }
}

void md3_model_free(md3_model *m) {
    if (!m) return;
    cudaFree(m->mem);
    free(m);
}

size_t md3_model_bytes(const md3_model *m) { return m ? m->bytes : 0; }

int md3_layer_moe(const md3_model *m, int l) { return m->L[l].moe; }

/* The state's buffers (base NULL: sizes only). */
static size_t state3_layout(md3_state *s, const md3_model *m, int max_ctx, unsigned char *base) {
    size_t off = 0;
#define CARVE3(field, type, n)                     \
    do {                                           \
        off = (off + 255) & ~(size_t)255;          \
        if (base) s->field = (type *)(base + off); \
        off += (size_t)(n) * sizeof(type);         \
    } while (0)
    const size_t R = (size_t)max_ctx;
    CARVE3(f, uint16_t, R * m->qkvw);
    CARVE3(scores, float, R * 2 * m->H);
    CARVE3(rlog, float, R * m->E);
    CARVE3(sel, int32_t, R * m->K);
    CARVE3(wt, float, R * m->K);
    CARVE3(scratch, unsigned char, cuda_moe_scratch_bytes(max_ctx, m->E, m->K, m->dim, m->I));
#undef CARVE3
    return off;
}

size_t md3_state_bytes(const md3_model *m, int max_ctx) {
    md3_state tmp;
    return state3_layout(&tmp, m, max_ctx, NULL);
}

albedo_status md3_model_new(const mdc_desc *d, size_t session_extra, md3_model **out, errbuf *e) {
    *out = NULL;
    const mdc_md3_desc *x = d->md3;
    const char *why = NULL;
    if (d->n_kv_heads != d->n_heads)
        why = "tau attention needs as many KV heads as query heads";
    else if (x->experts < 1 || x->topk < 1 || x->topk > CUDA_MOE_MAX_K || x->topk > x->experts || x->experts > 4096)
        why = "the expert counts are out of the kernels' range (top-k <= 16, experts <= 4096)";
    else if (((d->n_heads + 2 * d->n_kv_heads) * d->head_dim) % 8)
        why = "the qkv width is not a multiple of 8";
    else if (d->n_layers > 128)
        why = "more than 128 layers";
    else if ((long)d->max_context * x->topk > CUDA_MOE_MAX_ASSIGN)
        why = "max_context × top-k is too large";
    if (why) return errf(e, ALBEDO_ERR_UNSUPPORTED, "cuda: Moondream 3: %s", why);
    md3_model *m = (md3_model *)calloc(1, sizeof *m);
    if (!m) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    m->n_layers = d->n_layers, m->dim = d->dim, m->dimp = r8(d->dim), m->H = d->n_heads, m->Hkv = d->n_kv_heads;
    m->D = d->head_dim, m->qkvw = (m->H + 2 * m->Hkv) * m->D, m->E = x->experts, m->K = x->topk, m->I = x->inner;
    m->Ip = r8(x->inner), m->pos_bf16 = x->tau_pos_bf16;
    m->fp8 = x->exp_fp8 != 0, m->dimq = r16(d->dim), m->Iq = r16(x->inner);
    if (m->fp8) { /* e4m3 conversions are instructions from sm_89 (Ada, Hopper) on */
        int dev = 0, major = 0, minor = 0;
        cudaGetDevice(&dev);
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
        if (major * 10 + minor < 89) {
            free(m);
            return errf(e, ALBEDO_ERR_UNSUPPORTED,
                        "cuda: fp8 experts need a GPU of sm_89 or newer (device %d is sm_%d%d)", dev, major, minor);
        }
    }
    up3 u;
    memset(&u, 0, sizeof u);
    u.m = m;
    u.e = e;
    upload3(&u, d);
    m->bytes = u.off;
    size_t free_b = 0, total_b = 0;
    cudaError_t ce = cudaMemGetInfo(&free_b, &total_b);
    if (ce != cudaSuccess) {
        md3_model_free(m);
        return errf(e, cuda_status_of(ce), "cuda: cudaMemGetInfo: %s", cudaGetErrorString(ce));
    }
    const size_t need = m->bytes + md3_state_bytes(m, d->max_context) + session_extra;
    if (need > free_b) {
        const size_t b = m->bytes;
        md3_model_free(m);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY,
                    "cuda: Moondream 3's experts and tau need %.2f GiB of GPU memory more (%.2f GiB of weights, the "
                    "rest for one session), %.2f GiB are free of %.2f GiB",
                    need / 1073741824.0, b / 1073741824.0, free_b / 1073741824.0, total_b / 1073741824.0);
    }
    ce = cudaMalloc((void **)&m->mem, m->bytes);
    if (ce != cudaSuccess) {
        md3_model_free(m);
        return errf(e, cuda_status_of(ce), "cuda: %.2f GiB for Moondream 3's experts: %s", u.off / 1073741824.0,
                    cudaGetErrorString(ce));
    }
    u.pass = 1;
    u.off = 0;
    u.stage_elems = (size_t)8 << 20;
    u.stage = (uint16_t *)malloc(u.stage_elems * 2);
    if (!u.stage) u.st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    if (!u.st && m->fp8) {
        int dev = 0;
        cudaGetDevice(&dev);
        ce = cudaMalloc((void **)&u.dstage, u.stage_elems * 2);
        if (ce != cudaSuccess)
            u.st = errf(e, cuda_status_of(ce), "cuda: staging Moondream 3's experts: %s", cudaGetErrorString(ce));
        else
            u.st = cuda_ctx_new(dev, &u.ctx, e);
    }
    if (!u.st) upload3(&u, d);
    free(u.stage);
    cuda_ctx_free(u.ctx);
    cudaFree(u.dstage);
    if (u.st) {
        md3_model_free(m);
        return u.st;
    }
    *out = m;
    return ALBEDO_OK;
}

/* ---- session ------------------------------------------------------------------------------- */

void md3_state_free(md3_state *s) {
    if (!s) return;
    cudaFree(s->mem);
    free(s);
}

albedo_status md3_state_new(const md3_model *m, int max_ctx, md3_state **out, errbuf *e) {
    *out = NULL;
    md3_state *s = (md3_state *)calloc(1, sizeof *s);
    if (!s) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    s->m = m;
    s->max_ctx = max_ctx;
    /* ALBEDO_CUDA_MOE_GEMM=small,large: the grouped GEMM's tile shapes (cuda_moe.gemm), for measuring */
    const char *g = getenv("ALBEDO_CUDA_MOE_GEMM");
    if (g && *g && sscanf(g, "%d,%d", &s->gemm_small, &s->gemm_large) == 1) s->gemm_large = s->gemm_small;
    s->bytes = state3_layout(s, m, max_ctx, NULL);
    cudaError_t ce = cudaMalloc((void **)&s->mem, s->bytes);
    /* zeroed once: the padding columns the kernels read stay zero */
    if (ce == cudaSuccess) ce = cudaMemset(s->mem, 0, s->bytes);
    if (ce != cudaSuccess) {
        const double gib = s->bytes / 1073741824.0;
        md3_state_free(s);
        return errf(e, cuda_status_of(ce), "cuda: %.2f GiB of Moondream 3 session memory: %s", gib,
                    cudaGetErrorString(ce));
    }
    state3_layout(s, m, max_ctx, s->mem);
    *out = s;
    return ALBEDO_OK;
}

/* ---- the stages ----------------------------------------------------------------------------- */

albedo_status md3_tau(const md3_model *m, md3_state *s, cuda_ctx *ctx, int l, uint16_t *qkv, int ldq, int T, int Tg,
                      int pos0, const int *pos_dev, const int *pos_rows, int pos_stride, errbuf *e) {
    const md3_layer *L = &m->L[l];
    if (T > Tg || Tg > s->max_ctx) return errf(e, ALBEDO_ERR_INTERNAL, "cuda: %d (%d) rows for tau", T, Tg);
    if (T <= CUDA_TAU_SCORES_MAX_T) { /* decode: one launch, the features on the fly */
        OPK3(cuda_tau_scores(ctx, s->scores, 2 * m->H, qkv, ldq, T, m->qkvw, L->tau.w, 2 * m->H));
    } else {
        OPK3(cuda_gelu_erf_rows(ctx, s->f, m->qkvw, qkv, ldq, T, m->qkvw));
        OPK3(cuda_linear(ctx, s->scores, DT_F32, 2 * m->H, s->f, m->qkvw, Tg, &L->tau, CUDA_ACT_NONE, 0));
    }
    cuda_tau t;
    memset(&t, 0, sizeof t);
    t.qkv = qkv, t.ldq = ldq, t.voff = (m->H + m->Hkv) * m->D, t.T = T, t.H = m->H, t.D = m->D;
    t.scores = s->scores, t.lds = 2 * m->H, t.alpha = L->alpha, t.pos0 = pos0, t.pos_dev = pos_dev;
    t.pos_rows = pos_rows, t.pos_stride = pos_stride, t.pos_bf16 = m->pos_bf16;
    OPK3(cuda_tau_scale(ctx, &t));
    return ALBEDO_OK;
}

albedo_status md3_moe(const md3_model *m, md3_state *s, cuda_ctx *ctx, int l, const uint16_t *h, int ldh, float *x,
                      int ldx, int T, int Tg, int store, errbuf *e) {
    const md3_layer *L = &m->L[l];
    if (T > Tg || Tg > s->max_ctx) return errf(e, ALBEDO_ERR_INTERNAL, "cuda: %d (%d) rows for the experts", T, Tg);
    OPK3(cuda_linear(ctx, s->rlog, DT_F32, m->E, h, ldh, Tg, &L->router, CUDA_ACT_NONE, 0));
    OPK3(cuda_moe_route(ctx, s->sel, s->wt, s->rlog, m->E, T, m->E, m->K));
    cuda_moe mm;
    memset(&mm, 0, sizeof mm);
    mm.T = T, mm.E = m->E, mm.K = m->K, mm.dim = m->dim, mm.inner = m->I;
    mm.w1 = L->w1, mm.ld1 = m->dimp, mm.w2 = L->w2, mm.ld2 = m->Ip;
    mm.q1 = L->q1, mm.ldq1 = m->dimq, mm.q2 = L->q2, mm.ldq2 = m->Iq, mm.s1 = L->s1, mm.s2 = L->s2;
    mm.h = h, mm.ldh = ldh, mm.sel = s->sel, mm.wt = s->wt, mm.x = x, mm.ldx = ldx, mm.scratch = s->scratch;
    mm.store = store;
    mm.gemm = (long)T * m->K >= CUDA_MOE_GEMM_LARGE_TK ? s->gemm_large : s->gemm_small;
    OPK3(cuda_moe_mlp(ctx, &mm));
    return ALBEDO_OK;
}
