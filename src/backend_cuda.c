/*
 * backend_cuda.c — the glue between the stage files and the GPU model
 * runner (cuda/model_cuda.h, docs/CUDA.md). A model loaded with backend
 * "cuda" (device 0) or "cuda:N" gets its weights uploaded once; each
 * session's md_state then owns an mdc_state (device working memory and KV
 * cache), and the stage files hand whole stages to it through the md_cuda_*
 * hooks declared in model.h: vision_encode, text_forward(_batch), the
 * image prefix and its KV. Region decoders, sampling and the generation
 * loops stay on the host; a forward returns the last hidden state and the
 * logits row to the host buffers the loops read.
 *
 * Built without ALBEDO_CUDA, asking for "cuda" fails at load with
 * ALBEDO_ERR_UNSUPPORTED and every other hook is unreachable (m->cuda and
 * s->cu stay NULL). Not on the GPU yet: Moondream 3, block-quantised
 * weights, and the engine's batched forwards over the paged cache (states
 * made without a KV cache run on the CPU).
 */
#include <stdlib.h>

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
    return ALBEDO_OK;
}

albedo_status md_cuda_model_load(albedo_model *m, errbuf *e) {
    const md_config *c = &m->cfg;
    if (c->md3 || c->moe_experts)
        return errf(e, ALBEDO_ERR_UNSUPPORTED,
                    "the CUDA backend runs Moondream 2 only (Moondream 3's tau attention and experts have no kernels yet)");
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
    albedo_status st = make_desc(m, &d, &vb, &tb, e);
    if (!st) st = mdc_model_new(&d, device, &m->cuda, e);
    free(vb);
    free(tb);
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
    if (n_seg != 1 || segs[0].blocks || segs[0].k != s->k_cache)
        return errf(e, ALBEDO_ERR_UNSUPPORTED, "the CUDA backend runs one sequence on the session's own cache");
    const txt_seg *g = &segs[0];
    albedo_status st = mdc_text_forward(s->cu, emb, g->T, g->pos0, g->n_prefix, g->logits != NULL, e);
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

#endif
