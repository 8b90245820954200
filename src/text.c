/*
 * text.c — the text decoder (spec/model.md §6): Phi-style parallel blocks
 * with partial rotary attention and a KV cache; the LM head.
 *
 *   emb [T, dim] at positions pos0 .. pos0+T-1
 *   n_layers × {
 *       h   = ln(x)                                       [T, dim]
 *       qkv = h·Wqkvᵀ + b                                 [T, (H+2·Hkv)·D]
 *       rope(q, k) on the first D/2 dims of each head; K, V → cache rows
 *       att = softmax(q·kᵀ/√D, mask)·v over keys 0 .. pos0+T-1
 *       x   = x + proj(att) + fc2(gelu_tanh(fc1(h)))
 *   }
 *   logits = lm_head(post_ln(x_last))                     [vocab]
 *
 * The mask is causal, except that positions inside the image prefix (BOS +
 * 729 image tokens) see each other bidirectionally.
 */
#include <math.h>
#include <stdlib.h>

#include "model.h"

void text_embed(const albedo_model *m, int32_t id, float *out) {
    const int dim = m->cfg.dim;
    for (int i = 0; i < dim; i++) out[i] = op_vec_get(m->w.wte, (size_t)id * dim + i);
}

void text_logits(md_state *s, const float *h, float *logits) {
    const albedo_model *m = s->m;
    const int dim = m->cfg.dim;
    const ops *o = O(s->ops);
    /* s->h has room for at least one row */
    o->layernorm(s->ops, s->h, h, 1, dim, m->w.tpost_w, m->w.tpost_b, 1e-5f);
    o->linear(s->ops, logits, m->cfg.vocab, s->h, dim, 1, &m->w.lm_head);
}

albedo_status text_forward(md_state *s, const float *emb, int T, int pos0, int n_prefix, int want_logits,
                           errbuf *e) {
    const albedo_model *m = s->m;
    const md_config *c = &m->cfg;
    const md_weights *w = &m->w;
    ops_ctx *oc = s->ops;
    const ops *o = O(oc);
    if (T <= 0) return errf(e, ALBEDO_ERR_INTERNAL, "text: empty input");
    if (pos0 + T > s->max_ctx)
        return errf(e, ALBEDO_ERR_LIMIT, "context length %d exceeds the maximum of %d positions", pos0 + T, s->max_ctx);
    albedo_status st = md_state_reserve(s, T, e);
    if (st) return st;
    const int dim = c->dim, H = c->n_heads, Hkv = c->n_kv_heads, D = c->head_dim;
    const int qd = H * D, kvd = Hkv * D, ld = qd + 2 * kvd;
    float *x = s->x, *h = s->h, *qkv = s->qkv, *att = s->att, *mlp = s->mlp, *pr = s->proj;
    memcpy(x, emb, (size_t)T * dim * sizeof(float));

    for (int l = 0; l < c->n_layers; l++) {
        const txt_block *b = &w->tb[l];
        o->layernorm(oc, h, x, T, dim, b->ln_w, b->ln_b, 1e-5f);
        o->linear(oc, qkv, ld, h, dim, T, &b->qkv);
        o->rope(oc, qkv, ld, T, H, D, c->rot_dims, pos0, m->rope_cos, m->rope_sin);
        o->rope(oc, qkv + qd, ld, T, Hkv, D, c->rot_dims, pos0, m->rope_cos, m->rope_sin);
        float *kc = s->k_cache[l], *vc = s->v_cache[l];
        for (int t = 0; t < T; t++) {
            memcpy(kc + (size_t)(pos0 + t) * kvd, qkv + (size_t)t * ld + qd, (size_t)kvd * sizeof(float));
            memcpy(vc + (size_t)(pos0 + t) * kvd, qkv + (size_t)t * ld + qd + kvd, (size_t)kvd * sizeof(float));
        }
        op_attn at = {.T = T, .S = pos0 + T, .H = H, .Hkv = Hkv, .D = D, .pos0 = pos0, .n_prefix = n_prefix,
                      .scale = 1.0f / sqrtf((float)D), .q = qkv, .k = kc, .v = vc, .out = att,
                      .ldq = ld, .ldk = kvd, .ldv = kvd, .ldo = qd};
        o->attention(oc, &at);
        o->linear(oc, pr, dim, att, qd, T, &b->proj);
        o->linear(oc, mlp, c->ff_dim, h, dim, T, &b->fc1);
        o->gelu_tanh(oc, mlp, (size_t)T * c->ff_dim);
        o->add(oc, x, pr, (size_t)T * dim);
        o->linear(oc, pr, dim, mlp, c->ff_dim, T, &b->fc2);
        o->add(oc, x, pr, (size_t)T * dim);
    }
    memcpy(s->hidden, x + (size_t)(T - 1) * dim, (size_t)dim * sizeof(float));
    if (want_logits) text_logits(s, s->hidden, s->logits);
    if (ops_failed(oc)) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "text: out of working memory");
    return ALBEDO_OK;
}

/* ---- session state -------------------------------------------------------- */

albedo_status md_state_init(md_state *s, const albedo_model *m, errbuf *e) {
    memset(s, 0, sizeof *s);
    s->m = m;
    const md_config *c = &m->cfg;
    s->max_ctx = m->params.max_context > 0 && m->params.max_context < c->max_context ? m->params.max_context
                                                                                        : c->max_context;
    albedo_status st = ops_ctx_new(m->params.backend, m->params.n_threads,
                                   m->params.precision == ALBEDO_PRECISION_BF16 ? OPS_BF16 : OPS_F32, &s->ops, e);
    if (st) return st;
    const size_t kvd = (size_t)c->n_kv_heads * c->head_dim;
    s->k_cache = calloc((size_t)c->n_layers, sizeof *s->k_cache);
    s->v_cache = calloc((size_t)c->n_layers, sizeof *s->v_cache);
    size_t nl = (size_t)c->vocab;
    if ((size_t)c->coord_out > nl) nl = (size_t)c->coord_out;
    if ((size_t)c->size_out > nl) nl = (size_t)c->size_out;
    s->logits = malloc(nl * sizeof(float));
    s->hidden = malloc((size_t)c->dim * sizeof(float));
    s->feat = malloc((size_t)(c->coord_feat > c->size_feat ? c->coord_feat : c->size_feat) * sizeof(float));
    if (!s->k_cache || !s->v_cache || !s->logits || !s->hidden || !s->feat) goto oom;
    for (int l = 0; l < c->n_layers; l++) {
        /* Untouched pages of the cache are never faulted in, so a short
         * conversation costs only the positions it uses. */
        s->k_cache[l] = malloc((size_t)s->max_ctx * kvd * sizeof(float));
        s->v_cache[l] = malloc((size_t)s->max_ctx * kvd * sizeof(float));
        if (!s->k_cache[l] || !s->v_cache[l]) goto oom;
    }
    return md_state_reserve(s, 64, e);
oom:
    md_state_free(s);
    return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for the KV cache (%d positions)", s->max_ctx);
}

void md_state_free(md_state *s) {
    if (!s->m) return;
    const md_config *c = &s->m->cfg;
    for (int l = 0; l < c->n_layers; l++) {
        if (s->k_cache) free(s->k_cache[l]);
        if (s->v_cache) free(s->v_cache[l]);
    }
    free(s->k_cache);
    free(s->v_cache);
    free(s->x);
    free(s->h);
    free(s->qkv);
    free(s->att);
    free(s->mlp);
    free(s->proj);
    free(s->logits);
    free(s->hidden);
    free(s->feat);
    ops_ctx_free(s->ops);
    memset(s, 0, sizeof *s);
}

albedo_status md_state_reserve(md_state *s, int T, errbuf *e) {
    if (T <= s->t_cap) return ALBEDO_OK;
    const md_config *c = &s->m->cfg;
    const size_t D = (size_t)c->head_dim, qkv = (size_t)(c->n_heads + 2 * c->n_kv_heads) * D;
    float *p[6];
    /* mlp also serves the region decoders' hidden layer (1 row). */
    size_t mlp = (size_t)(c->ff_dim > c->r_inner ? c->ff_dim : c->r_inner);
    size_t widths[6] = {(size_t)c->dim, (size_t)c->dim, qkv, (size_t)c->n_heads * D, mlp, (size_t)c->dim};
    float **dst[6] = {&s->x, &s->h, &s->qkv, &s->att, &s->mlp, &s->proj};
    for (int i = 0; i < 6; i++) {
        p[i] = realloc(*dst[i], (size_t)T * widths[i] * sizeof(float));
        if (!p[i]) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for %d tokens", T);
        *dst[i] = p[i];
    }
    s->t_cap = T;
    return ALBEDO_OK;
}
