/*
 * backend_cuda.c — the glue between the stage files and the GPU model
 * runner (cuda/model_cuda.h, docs/CUDA.md). A model loaded with backend
 * "cuda" (device 0) or "cuda:N" gets its weights uploaded once; each
 * session's md_state then owns an mdc_state (device working memory and KV
 * cache), and the stage files hand whole stages to it through the md_cuda_*
 * hooks declared in model.h: vision_encode, text_forward(_batch), the
 * image prefix and its KV. Region decoders and the generation loops stay
 * on the host; a forward returns the last hidden state and the logits row
 * to the host buffers the loops read, or, for the engine's segments with an
 * md_pick, the token picked on the device (model_cuda.cu, pick_rows). kv_dtype "fp8" (checked by
 * albedo_model_load) makes every device KV cache e4m3 (model_cuda.cu).
 *
 * Built without ALBEDO_CUDA, asking for "cuda" fails at load with
 * ALBEDO_ERR_UNSUPPORTED and every other hook is unreachable (m->cuda and
 * s->cu stay NULL). Moondream 3 runs in blocking sessions and in the
 * engine's batched steps (its tau and experts: cuda/model_cuda_md3.cu).
 * Not on the GPU yet: block-quantised weights.
 */
#include <stdlib.h>

#include "kvcache.h"
#include "session.h"

#ifdef ALBEDO_CUDA
#include "cuda/model_cuda.h"
#endif

int md_cuda_requested(const char *backend) {
    return backend && !strncmp(backend, "cuda", 4) && (backend[4] == 0 || backend[4] == ':');
}

#ifndef ALBEDO_CUDA

albedo_status md_cuda_model_load(albedo_model *m, errbuf *e) {
    (void)m;
    return errf(e, ALBEDO_ERR_UNSUPPORTED, "this build has no CUDA backend (configure with -DALBEDO_CUDA=ON)");
}
void md_cuda_model_free(albedo_model *m) { (void)m; }
const char *md_cuda_describe(const albedo_model *m) {
    (void)m;
    return "";
}
albedo_status md_cuda_state_init(md_state *s, errbuf *e) {
    (void)s;
    return errf(e, ALBEDO_ERR_UNSUPPORTED, "this build has no CUDA backend");
}
void md_cuda_state_free(md_state *s) { (void)s; }
albedo_status md_cuda_vision(md_state *s, const img_crops *crops, float *img_emb, float *enc_out, errbuf *e) {
    (void)s, (void)crops, (void)img_emb, (void)enc_out;
    return errf(e, ALBEDO_ERR_UNSUPPORTED, "this build has no CUDA backend");
}
albedo_status md_cuda_vision_crops(md_state *s, const uint8_t *crops, int n, float *out, errbuf *e) {
    (void)s, (void)crops, (void)n, (void)out;
    return errf(e, ALBEDO_ERR_UNSUPPORTED, "this build has no CUDA backend");
}
albedo_status md_cuda_forward_batch(md_state *s, const float *emb, txt_seg *segs, int n_seg, errbuf *e) {
    (void)s, (void)emb, (void)segs, (void)n_seg;
    return errf(e, ALBEDO_ERR_UNSUPPORTED, "this build has no CUDA backend");
}
albedo_status md_cuda_image_prefix(md_state *s, const img_crops *crops, void **prefix, errbuf *e) {
    (void)s, (void)crops, (void)prefix;
    return errf(e, ALBEDO_ERR_UNSUPPORTED, "this build has no CUDA backend");
}
void md_cuda_prefix_load(md_state *s, const void *prefix) { (void)s, (void)prefix; }
void md_cuda_prefix_free(void *prefix) { (void)prefix; }
albedo_status md_cuda_engine_state_init(md_state *s, int rows, int seqs, int block_size, int vision, errbuf *e) {
    (void)s, (void)rows, (void)seqs, (void)block_size, (void)vision;
    return errf(e, ALBEDO_ERR_UNSUPPORTED, "this build has no CUDA backend");
}
void md_cuda_kv_mem(const albedo_model *m, struct kv_mem *out) {
    (void)m;
    memset(out, 0, sizeof *out);
}
size_t md_cuda_kv_default_bytes(const albedo_model *m) {
    (void)m;
    return 0;
}
size_t md_cuda_kv_elem_bytes(const albedo_model *m) {
    (void)m;
    return 2;
}
albedo_status md_cuda_prefix_paged(md_state *s, const img_crops *crops, void *const *k, void *const *v, int block_size,
                                   const int32_t *blocks, int n_blocks, errbuf *e) {
    (void)s, (void)crops, (void)k, (void)v, (void)block_size, (void)blocks, (void)n_blocks;
    return errf(e, ALBEDO_ERR_UNSUPPORTED, "this build has no CUDA backend");
}
void md_cuda_host_pin(void *p, size_t bytes, int on) { (void)p, (void)bytes, (void)on; }

#else

/* The description of m's weights for the runner: views into the mapping. */
static albedo_status make_desc(const albedo_model *m, mdc_desc *d, mdc_vblock **vb, mdc_tblock **tb, errbuf *e) {
    const md_config *c = &m->cfg;
    const md_weights *w = &m->w;
    memset(d, 0, sizeof *d);
    *vb = calloc((size_t)c->enc_layers, sizeof **vb);
    *tb = calloc((size_t)c->n_layers, sizeof **tb);
    if (!*vb || !*tb) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    d->crop_size = c->crop_size, d->patch = c->patch, d->in_ch = c->in_ch, d->enc_dim = c->enc_dim;
    d->enc_layers = c->enc_layers, d->enc_heads = c->enc_heads, d->enc_ff = c->enc_ff;
    d->max_crops = c->max_crops, d->overlap_margin = c->overlap_margin, d->proj_inner = c->proj_inner;
    d->proj_out = c->proj_out;
    d->patch_emb = w->patch_emb, d->pos_emb = w->pos_emb;
    for (int l = 0; l < c->enc_layers; l++) {
        const vit_block *b = &w->vb[l];
        (*vb)[l] = (mdc_vblock){b->ln1_w, b->ln1_b, b->ln2_w, b->ln2_b, b->qkv, b->proj, b->fc1, b->fc2};
    }
    d->vb = *vb;
    d->post_ln_w = w->post_ln_w, d->post_ln_b = w->post_ln_b;
    d->proj_fc1 = w->proj_fc1, d->proj_fc2 = w->proj_fc2;
    d->dim = c->dim, d->ff_dim = c->ff_dim, d->n_layers = c->n_layers, d->vocab = c->vocab;
    d->n_heads = c->n_heads, d->n_kv_heads = c->n_kv_heads, d->head_dim = c->head_dim, d->rot_dims = c->rot_dims;
    d->prefix_attn = c->prefix_attn, d->max_context = c->max_context, d->bos = c->bos;
    d->wte = w->wte;
    for (int l = 0; l < c->n_layers; l++) {
        const txt_block *b = &w->tb[l];
        (*tb)[l] = (mdc_tblock){b->ln_w, b->ln_b, b->qkv, b->proj, b->fc1, b->fc2};
    }
    d->tb = *tb;
    d->tpost_w = w->tpost_w, d->tpost_b = w->tpost_b, d->lm_head = w->lm_head;
    d->rope_cos = m->rope_cos, d->rope_sin = m->rope_sin;
    d->kv_fp8 = m->params.kv_dtype && !strcmp(m->params.kv_dtype, "fp8"); /* checked by the loader */
    return ALBEDO_OK;
}

/* Moondream 3's tau and expert tensors for the runner (model_cuda_md3.cu). */
static albedo_status make_md3_desc(const albedo_model *m, mdc_desc *d, mdc_md3_desc *d3, mdc_md3_block **b3,
                                   errbuf *e) {
    const md_config *c = &m->cfg;
    *b3 = calloc((size_t)c->n_layers, sizeof **b3);
    if (!*b3) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    for (int l = 0; l < c->n_layers; l++) {
        const txt_block *b = &m->w.tb[l];
        (*b3)[l] = (mdc_md3_block){b->tau_wq,  b->tau_wv,  b->tau_alpha,  b->moe,       b->router,
                                   b->exp_fc1, b->exp_fc2, b->exp_fc1_dt, b->exp_fc2_dt};
    }
    *d3 = (mdc_md3_desc){.experts = c->moe_experts,
                         .topk = c->moe_topk,
                         .inner = c->moe_inner,
                         .tau_pos_bf16 = c->tau_pos_bf16,
                         .b = *b3,
                         /* checked by the loader: Moondream 3 on cuda */
                         .exp_fp8 = m->params.weights && !strcmp(m->params.weights, "fp8")};
    d->md3 = d3;
    return ALBEDO_OK;
}

albedo_status md_cuda_model_load(albedo_model *m, errbuf *e) {
    const md_config *c = &m->cfg;
    if (m->w.quant_dt)
        return errf(e, ALBEDO_ERR_UNSUPPORTED, "the CUDA backend takes 16-bit weights (--weights q8/q4 are CPU only)");
    int device = 0;
    const char *b = m->params.backend;
    if (b[4] == ':') {
        char *end = NULL;
        long v = strtol(b + 5, &end, 10);
        if (!b[5] || *end || v < 0 || v > 1024)
            return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "backend '%s': expected cuda or cuda:N", b);
        device = (int)v;
    }
    mdc_desc d;
    mdc_vblock *vb = NULL;
    mdc_tblock *tb = NULL;
    mdc_md3_block *b3 = NULL;
    mdc_md3_desc d3;
    albedo_status st = make_desc(m, &d, &vb, &tb, e);
    if (!st && c->md3) st = make_md3_desc(m, &d, &d3, &b3, e);
    if (!st) st = mdc_model_new(&d, device, &m->cuda, e);
    free(vb);
    free(tb);
    free(b3);
    /* The GPU computes with bf16 activations: say so, and let the loops feed
     * region values rounded to bf16 as the reference's bf16 run does. */
    if (!st) m->params.precision = ALBEDO_PRECISION_BF16;
    return st;
}

void md_cuda_model_free(albedo_model *m) {
    mdc_model_free(m->cuda);
    m->cuda = NULL;
}

const char *md_cuda_describe(const albedo_model *m) { return mdc_model_describe(m->cuda); }

albedo_status md_cuda_state_init(md_state *s, errbuf *e) {
    return mdc_state_new(s->m->cuda, s->max_ctx, s->logits, s->hidden, &s->cu, e);
}

void md_cuda_state_free(md_state *s) {
    mdc_state_free(s->cu);
    s->cu = NULL;
}

albedo_status md_cuda_vision(md_state *s, const img_crops *crops, float *img_emb, float *enc_out, errbuf *e) {
    return mdc_vision(s->cu, crops->px, crops->n, crops->th, crops->tw, img_emb, enc_out, e);
}

albedo_status md_cuda_vision_crops(md_state *s, const uint8_t *crops, int n, float *out, errbuf *e) {
    return mdc_vision_crops(s->cu, crops, n, out, e);
}

albedo_status md_cuda_forward_batch(md_state *s, const float *emb, txt_seg *segs, int n_seg, errbuf *e) {
    if (n_seg >= 1 && segs[0].blocks) {
        /* The engine's step over its device pool. */
        mdc_seg stack[16], *g = n_seg <= 16 ? stack : malloc((size_t)n_seg * sizeof *g);
        mdc_pick pstack[16], *pk = n_seg <= 16 ? pstack : malloc((size_t)n_seg * sizeof *pk);
        if (!g || !pk) {
            if (g != stack) free(g);
            if (pk != pstack) free(pk);
            return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
        }
        const int bs = segs[0].block_size;
        albedo_status st = ALBEDO_OK;
        for (int i = 0; i < n_seg && !st; i++) {
            const txt_seg *t = &segs[i];
            if (!t->blocks || t->block_size != bs || t->k != segs[0].k)
                st = errf(e, ALBEDO_ERR_UNSUPPORTED, "the CUDA backend runs paged segments of one pool");
            g[i] = (mdc_seg){.pos0 = t->pos0,
                             .T = t->T,
                             .n_prefix = t->n_prefix,
                             .blocks = t->blocks,
                             .n_blocks = (t->pos0 + t->T + bs - 1) / bs,
                             .hidden_host = t->hidden,
                             .logits_host = t->logits};
            if (t->pick && !t->logits) { /* the next token picked on the device (generate.c, step_pick) */
                const md_pick *p = t->pick;
                pk[i] = (mdc_pick){.temperature = p->temperature,
                                   .top_p = p->top_p,
                                   .seed = p->seed,
                                   .counter = p->counter,
                                   .mask = {p->mask[0], p->mask[1]},
                                   .n_mask = p->n_mask,
                                   .id_host = &t->pick->id};
                g[i].pick = &pk[i];
            }
        }
        if (!st) st = mdc_forward_paged(s->cu, segs[0].k, segs[0].v, bs, emb, g, n_seg, e);
        if (g != stack) free(g);
        if (pk != pstack) free(pk);
        return st;
    }
    if (n_seg != 1 || segs[0].blocks || segs[0].k != s->k_cache)
        return errf(e, ALBEDO_ERR_UNSUPPORTED, "the CUDA backend runs one sequence on the session's own cache");
    const txt_seg *g = &segs[0];
    /* A blocking session's greedy pick (generate.c, step_pick): the argmax
     * on the device, only the id down. */
    md_pick *pk = g->pick && !g->logits ? g->pick : NULL;
    if (pk && pk->temperature > 0.0f) return errf(e, ALBEDO_ERR_INTERNAL, "a session's device pick must be greedy");
    albedo_status st = mdc_text_forward(s->cu, emb, g->T, g->pos0, g->n_prefix, g->logits != NULL || pk,
                                        pk ? pk->mask : NULL, pk ? pk->n_mask : 0, pk ? &pk->id : NULL, e);
    if (st) return st;
    const md_config *c = &s->m->cfg;
    if (g->hidden != s->hidden) memcpy(g->hidden, s->hidden, (size_t)c->dim * sizeof(float));
    if (g->logits && g->logits != s->logits) memcpy(g->logits, s->logits, (size_t)c->vocab * sizeof(float));
    return ALBEDO_OK;
}

albedo_status md_cuda_image_prefix(md_state *s, const img_crops *crops, void **prefix, errbuf *e) {
    mdc_prefix *p = NULL;
    albedo_status st = mdc_image_prefix(s->cu, crops->px, crops->n, crops->th, crops->tw, &p, e);
    *prefix = p;
    return st;
}

void md_cuda_prefix_load(md_state *s, const void *prefix) {
    errbuf e;
    /* A failure is kept by the state and reported by the next forward. */
    (void)mdc_prefix_load(s->cu, (const mdc_prefix *)prefix, &e);
}

void md_cuda_prefix_free(void *prefix) { mdc_prefix_free((mdc_prefix *)prefix); }

albedo_status md_cuda_engine_state_init(md_state *s, int rows, int seqs, int block_size, int vision, errbuf *e) {
    const albedo_model *m = s->m;
    if (vision && rows < m->cfg.prefix_attn) rows = m->cfg.prefix_attn;
    return mdc_state_new_ex(m->cuda, s->max_ctx, rows, seqs, block_size, vision ? MDC_VISION : 0, NULL, s->hidden,
                            &s->cu, e);
}

static albedo_status pool_alloc(void *user, long n_rows, void **k, void **v, void **handle, errbuf *e) {
    mdc_pool *p = NULL;
    albedo_status st = mdc_pool_new((mdc_model *)user, n_rows, k, v, &p, e);
    *handle = p;
    return st;
}

static int pool_copy(void *handle, long dst_row, long src_row, int n_rows) {
    errbuf e;
    return mdc_pool_copy((mdc_pool *)handle, dst_row, src_row, n_rows, &e) ? -1 : 0;
}

static void pool_free(void *handle) { mdc_pool_free((mdc_pool *)handle); }

void md_cuda_kv_mem(const albedo_model *m, struct kv_mem *out) {
    *out = (kv_mem){.user = m->cuda, .alloc = pool_alloc, .copy = pool_copy, .free = pool_free};
}

size_t md_cuda_kv_elem_bytes(const albedo_model *m) { return (size_t)mdc_kv_elem_bytes(m->cuda); }

size_t md_cuda_kv_default_bytes(const albedo_model *m) {
    /* Half of what the card has free once the engine's states exist,
     * leaving room for the image worker, sessions and the prefix slots. */
    const size_t f = mdc_free_memory(m->cuda), keep = (size_t)2 << 30;
    return f > keep ? (f - keep) / 2 : 0;
}

albedo_status md_cuda_prefix_paged(md_state *s, const img_crops *crops, void *const *k, void *const *v, int block_size,
                                   const int32_t *blocks, int n_blocks, errbuf *e) {
    return mdc_image_prefix_paged(s->cu, crops->px, crops->n, crops->th, crops->tw, k, v, block_size, blocks, n_blocks,
                                  e);
}

void md_cuda_host_pin(void *p, size_t bytes, int on) { mdc_host_pin(p, bytes, on); }

#endif
