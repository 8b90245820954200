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
 *
 * Moondream 3 (§10.2, §10.3) changes two things per block:
 *
 *   tau attention: f = gelu_erf(qkv) over the whole biased row; per head hd,
 *       τ = tanh(f·w[hd]) + 1 + (sigmoid(α[hd]·ln(p + 1)) − 0.5) with w = wq
 *       for the query, wv for the value; Q and V of head hd are multiplied by
 *       their τ before RoPE and caching (K is not scaled, V is cached scaled).
 *   mixture of experts from moe_start on, in place of fc1/fc2:
 *       r = router(h) [E]; the top k logits, softmax over those k only;
 *       expert e: u = h·W1[e]ᵀ [2·inner], a = u[:inner], g = u[inner:],
 *       y_e = (gelu_erf(a)·(g + 1))·W2[e]ᵀ; mlp = Σ w_k·y_{e_k}.
 *   Tokens are grouped by expert: each expert's rows are gathered, go through
 *   one linear per weight matrix (only the selected experts' weights are
 *   read; bf16 or, with --weights q8|q4, albedo's block formats), and are
 *   scattered back with their weights.
 */
#include <math.h>
#include <stdlib.h>

#include "model.h"

void text_embed(const albedo_model *m, int32_t id, float *out) {
    const int dim = m->cfg.dim;
    const op_vec w = m->w.wte;
    const size_t o = (size_t)id * dim;
    /* A row at a time in the common dtypes: a prompt embeds ~100 rows of
     * 2048, and a call of op_vec_get per element took ~1 ms of each
     * request's time to first token (ALBEDO_TRACE, H100 host). The values
     * are the same. */
    if (w.dt == DT_BF16) {
        const uint16_t *r = (const uint16_t *)w.p + o;
        for (int i = 0; i < dim; i++) out[i] = bf16_to_f32(r[i]);
    } else if (w.dt == DT_F32) {
        memcpy(out, (const float *)w.p + o, (size_t)dim * sizeof(float));
    } else {
        for (int i = 0; i < dim; i++) out[i] = op_vec_get(w, o + i);
    }
}

void text_logits(md_state *s, const float *h, float *logits) {
    const albedo_model *m = s->m;
    const int dim = m->cfg.dim;
    const ops *o = O(s->ops);
    /* s->h has room for at least one row */
    o->layernorm(s->ops, s->h, h, 1, dim, m->w.tpost_w, m->w.tpost_b, 1e-5f);
    o->linear(s->ops, logits, m->cfg.vocab, s->h, dim, 1, &m->w.lm_head);
}

void text_logits_of(md_state *s, const float *h, const int32_t *ids, int n, float *out) {
    const albedo_model *m = s->m;
    const int dim = m->cfg.dim;
    const ops *o = O(s->ops);
    const op_linear *L = &m->w.lm_head;
    o->layernorm(s->ops, s->h, h, 1, dim, m->w.tpost_w, m->w.tpost_b, 1e-5f);
    for (int i = 0; i < n; i++) {
        /* one row of the LM head (block formats: rows of q_row_bytes) */
        op_linear row = *L;
        const size_t rb = q_row_bytes(L->dt, dim) ? q_row_bytes(L->dt, dim) : (size_t)dim * dtype_size(L->dt);
        row.w = (const char *)L->w + (size_t)ids[i] * rb;
        row.b = L->b ? (const char *)L->b + (size_t)ids[i] * dtype_size(L->bdt) : NULL;
        row.n_out = 1;
        o->linear(s->ops, out + i, 1, s->h, dim, 1, &row);
    }
}

/* ---- Moondream 3: tau attention ------------------------------------------------ */

/* ln(p + 1) of a position. With tau_pos_bf16 the position and p + 1 are
 * rounded to bf16 as the reference does with bf16 activations (730 → 728). */
static float log_pos(const md_config *c, int p) {
    float x = (float)p;
    if (c->tau_pos_bf16) {
        x = bf16_to_f32(f32_to_bf16(x));
        x = bf16_to_f32(f32_to_bf16(x + 1.0f));
        return bf16_to_f32(f32_to_bf16(logf(x)));
    }
    return logf(x + 1.0f);
}

/* Tau's two head scores of Ttot rows of qkv [Ttot, ld] into s->tau_q and
 * s->tau_v [Ttot, H]: position-independent, so computed for all rows of a
 * batch at once. */
static void tau_scores(md_state *s, const txt_block *b, const float *qkv, int ld, int Ttot) {
    ops_ctx *oc = s->ops;
    const ops *o = O(oc);
    const int H = s->m->cfg.n_heads;
    float *f = s->tau_f;
    memcpy(f, qkv, (size_t)Ttot * ld * sizeof(float));
    o->gelu_erf(oc, f, (size_t)Ttot * ld);
    o->linear(oc, s->tau_q, H, f, ld, Ttot, &b->tau_wq);
    o->linear(oc, s->tau_v, H, f, ld, Ttot, &b->tau_wv);
}

/* Scale Q and V of T rows of qkv [T, ld] (rows r0.. of the batch, scores in
 * tau_q/tau_v at the same rows) at positions pos0.. in place. */
static void tau_scale(md_state *s, const txt_block *b, float *qkv, int ld, int r0, int T, int pos0) {
    const md_config *c = &s->m->cfg;
    const int H = c->n_heads, D = c->head_dim, qd = H * D, kvd = c->n_kv_heads * D;
    const float *tq = s->tau_q + (size_t)r0 * H, *tv = s->tau_v + (size_t)r0 * H;
    for (int t = 0; t < T; t++) {
        const float lp = log_pos(c, pos0 + t);
        float *q = qkv + (size_t)(r0 + t) * ld, *v = q + qd + kvd;
        for (int hd = 0; hd < H; hd++) {
            const float a = op_vec_get(b->tau_alpha, (size_t)hd);
            const float sig = 1.0f / (1.0f + expf(-(a * lp)));
            const float tau_pos = 1.0f + (sig - 0.5f);
            const float sq = tanhf(tq[(size_t)t * H + hd]) + tau_pos;
            const float sv = tanhf(tv[(size_t)t * H + hd]) + tau_pos;
            for (int d = 0; d < D; d++) {
                q[hd * D + d] *= sq;
                v[hd * D + d] *= sv;
            }
        }
    }
}

/* ---- Moondream 3: mixture of experts ---------------------------------------------- */

/* out [T, dim] = the MoE MLP of h [T, dim]. */
static void moe_forward(md_state *s, const txt_block *b, const float *h, int T, float *out) {
    const md_config *c = &s->m->cfg;
    ops_ctx *oc = s->ops;
    const ops *o = O(oc);
    const int E = c->moe_experts, K = c->moe_topk, I = c->moe_inner, dim = c->dim;
    float *lg = s->moe_logits;
    int32_t *sel = s->moe_sel, *cnt = s->moe_count, *rows = s->moe_rows;
    float *wt = s->moe_w, *roww = s->moe_roww;

    /* Route: top-k of the E router logits per token (ties to the lower
     * index), softmax over those k in float32 as the reference. */
    o->linear(oc, lg, E, h, dim, T, &b->router);
    memset(cnt, 0, (size_t)(E + 1) * sizeof *cnt);
    for (int t = 0; t < T; t++) {
        const float *l = lg + (size_t)t * E;
        int32_t *st = sel + (size_t)t * K;
        float *wk = wt + (size_t)t * K;
        int n = 0;
        for (int e = 0; e < E; e++) {
            /* insertion into the sorted top list (descending) */
            if (n == K && !(l[e] > l[st[K - 1]])) continue;
            int j = n < K ? n++ : K - 1;
            while (j > 0 && l[e] > l[st[j - 1]]) {
                st[j] = st[j - 1];
                j--;
            }
            st[j] = e;
        }
        const float mx = l[st[0]];
        float sum = 0.0f;
        for (int k = 0; k < K; k++) sum += wk[k] = expf(l[st[k]] - mx);
        for (int k = 0; k < K; k++) {
            wk[k] /= sum;
            cnt[st[k] + 1]++;
        }
    }
    /* Group the T·K assignments by expert: offsets, then (token, weight) lists. */
    for (int e = 0; e < E; e++) cnt[e + 1] += cnt[e];
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int e = sel[(size_t)t * K + k], at = cnt[e]++;
            rows[at] = t;
            roww[at] = wt[(size_t)t * K + k];
        }
    /* cnt[e] is now the end of expert e's run (= start of e + 1) */
    memset(out, 0, (size_t)T * dim * sizeof(float));
    for (int e = 0, start = 0; e < E; start = cnt[e++]) {
        const int n = cnt[e] - start;
        if (n == 0) continue;
        const float *x = h;
        if (T > 1) {
            for (int i = 0; i < n; i++)
                memcpy(s->moe_x + (size_t)i * dim, h + (size_t)rows[start + i] * dim, (size_t)dim * sizeof(float));
            x = s->moe_x;
        }
        /* Slices of the expert tensors as stored (bf16) or converted by
         * quant.c (Q8/Q4, rows of q_row_bytes): the op picks the kernel.
         * Both halves of fc1 in one linear: one pass over 2·inner
         * consecutive rows (for a decode token one weight stream, one
         * parallel region fewer per expert). */
        const op_linear up = md_expert_linear(b->exp_fc1, b->exp_fc1_dt, e, 2 * I, 0, 2 * I, dim);
        const op_linear down = md_expert_linear(b->exp_fc2, b->exp_fc2_dt, e, dim, 0, dim, I);
        float *u = s->moe_a, *a = s->moe_g, *y = s->moe_y; /* u [n, 2I], a [n, I] */
        o->linear(oc, u, 2 * I, x, dim, n, &up);
        for (int i = 0; i < n; i++) memcpy(a + (size_t)i * I, u + (size_t)i * 2 * I, (size_t)I * sizeof(float));
        o->gelu_erf(oc, a, (size_t)n * I);
        for (int i = 0; i < n; i++) {
            float *ai = a + (size_t)i * I;
            const float *gi = u + (size_t)i * 2 * I + I;
            for (int j = 0; j < I; j++) ai[j] *= gi[j] + 1.0f;
        }
        o->linear(oc, y, dim, a, I, n, &down);
        for (int i = 0; i < n; i++) {
            float *dst = out + (size_t)rows[start + i] * dim;
            const float w = roww[start + i], *src = y + (size_t)i * dim;
            for (int d = 0; d < dim; d++) dst[d] += w * src[d];
        }
    }
}

/* Row of a segment's cache for position pos: through its block table when
 * paged, else the position itself. */
static void *seg_row(const txt_seg *g, void *base, size_t row_bytes, int pos) {
    size_t r = g->blocks
                   ? (size_t)g->blocks[pos / g->block_size] * (size_t)g->block_size + (size_t)(pos % g->block_size)
                   : (size_t)pos;
    return (char *)base + r * row_bytes;
}

/* A row of n floats into the cache's element type: one rounding from
 * float32 for bf16 and for e4m3 (the fp8 cache, scale 1; common.h). */
static void kv_store(void *dst, const float *src, int n, dtype dt) {
    if (dt == DT_E4M3) {
        uint8_t *b = dst;
        for (int i = 0; i < n; i++) b[i] = f32_to_e4m3(src[i]);
    } else if (dt == DT_BF16) {
        uint16_t *h = dst;
        for (int i = 0; i < n; i++) h[i] = f32_to_bf16(src[i]);
    } else {
        memcpy(dst, src, (size_t)n * sizeof(float));
    }
}

albedo_status text_forward_batch(md_state *s, const float *emb, txt_seg *segs, int n_seg, float *logits_scratch,
                                 errbuf *e) {
    const albedo_model *m = s->m;
    const md_config *c = &m->cfg;
    const md_weights *w = &m->w;
    ops_ctx *oc = s->ops;
    const ops *o = O(oc);
    int T = 0, n_logits = 0;
    for (int i = 0; i < n_seg; i++) {
        const txt_seg *g = &segs[i];
        if (g->T <= 0) return errf(e, ALBEDO_ERR_INTERNAL, "text: empty segment");
        if (g->pos0 + g->T > s->max_ctx)
            return errf(e, ALBEDO_ERR_LIMIT, "context length %d exceeds the maximum of %d positions", g->pos0 + g->T,
                        s->max_ctx);
        T += g->T;
        n_logits += g->logits != NULL;
    }
    if (T <= 0) return errf(e, ALBEDO_ERR_INTERNAL, "text: empty input");
    if (n_logits > 1 && !logits_scratch) return errf(e, ALBEDO_ERR_INTERNAL, "text: no logits scratch");
    if (s->cu) return md_cuda_forward_batch(s, emb, segs, n_seg, e); /* backend_cuda.c: on the GPU */
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
        if (c->md3) tau_scores(s, b, qkv, ld, T);
        /* Position-dependent work, per segment: tau's position term, rotary,
         * the cache writes and attention over the segment's own keys. */
        for (int i = 0, r0 = 0; i < n_seg; r0 += segs[i++].T) {
            const txt_seg *g = &segs[i];
            float *q = qkv + (size_t)r0 * ld;
            if (c->md3) tau_scale(s, b, qkv, ld, r0, g->T, g->pos0);
            o->rope(oc, q, ld, g->T, H, D, c->rot_dims, g->pos0, m->rope_cos, m->rope_sin);
            o->rope(oc, q + qd, ld, g->T, Hkv, D, c->rot_dims, g->pos0, m->rope_cos, m->rope_sin);
            void *kc = g->k[l], *vc = g->v[l];
            const size_t rb = (size_t)kvd * kv_elem_bytes(m->kv_dt);
            for (int t = 0; t < g->T; t++) {
                kv_store(seg_row(g, kc, rb, g->pos0 + t), q + (size_t)t * ld + qd, kvd, m->kv_dt);
                kv_store(seg_row(g, vc, rb, g->pos0 + t), q + (size_t)t * ld + qd + kvd, kvd, m->kv_dt);
            }
            op_attn at = {.T = g->T,
                          .S = g->pos0 + g->T,
                          .H = H,
                          .Hkv = Hkv,
                          .D = D,
                          .pos0 = g->pos0,
                          .n_prefix = g->n_prefix,
                          .scale = 1.0f / sqrtf((float)D),
                          .q = q,
                          .k = kc,
                          .v = vc,
                          .out = att + (size_t)r0 * qd,
                          .ldq = ld,
                          .ldk = kvd,
                          .ldv = kvd,
                          .ldo = qd,
                          .blocks = g->blocks,
                          .block_size = g->block_size,
                          .kv_dt = m->kv_dt};
            o->attention(oc, &at);
        }
        o->linear(oc, pr, dim, att, qd, T, &b->proj);
        if (b->moe) {
            o->add(oc, x, pr, (size_t)T * dim);
            moe_forward(s, b, h, T, pr);
            o->add(oc, x, pr, (size_t)T * dim);
            continue;
        }
        o->linear(oc, mlp, c->ff_dim, h, dim, T, &b->fc1);
        o->gelu_tanh(oc, mlp, (size_t)T * c->ff_dim);
        o->add(oc, x, pr, (size_t)T * dim);
        o->linear(oc, pr, dim, mlp, c->ff_dim, T, &b->fc2);
        o->add(oc, x, pr, (size_t)T * dim);
    }
    for (int i = 0, r0 = 0; i < n_seg; r0 += segs[i++].T)
        memcpy(segs[i].hidden, x + (size_t)(r0 + segs[i].T - 1) * dim, (size_t)dim * sizeof(float));
    if (n_logits == 1) {
        /* One row: the same single-row LM head as the blocking session. */
        for (int i = 0; i < n_seg; i++)
            if (segs[i].logits) text_logits(s, segs[i].hidden, segs[i].logits);
    } else if (n_logits > 1) {
        /* post_ln + lm_head over just the rows that want logits, one linear. */
        for (int i = 0, k = 0; i < n_seg; i++)
            if (segs[i].logits) memcpy(x + (size_t)k++ * dim, segs[i].hidden, (size_t)dim * sizeof(float));
        o->layernorm(oc, h, x, n_logits, dim, w->tpost_w, w->tpost_b, 1e-5f);
        o->linear(oc, logits_scratch, c->vocab, h, dim, n_logits, &w->lm_head);
        for (int i = 0, k = 0; i < n_seg; i++)
            if (segs[i].logits)
                memcpy(segs[i].logits, logits_scratch + (size_t)k++ * c->vocab, (size_t)c->vocab * sizeof(float));
    }
    if (ops_failed(oc)) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "text: out of working memory");
    return ALBEDO_OK;
}

albedo_status text_forward(md_state *s, const float *emb, int T, int pos0, int n_prefix, int want_logits, errbuf *e) {
    /* A GPU session's device pick (generate.c, step_pick) replaces the
     * logits row. */
    md_pick *pk = want_logits && s->cu ? s->pick : NULL;
    txt_seg g = {.k = s->k_cache,
                 .v = s->v_cache,
                 .pos0 = pos0,
                 .T = T,
                 .n_prefix = n_prefix,
                 .hidden = s->hidden,
                 .logits = want_logits && !pk ? s->logits : NULL,
                 .pick = pk};
    return text_forward_batch(s, emb, &g, 1, NULL, e);
}

/* ---- session state -------------------------------------------------------- */

albedo_status md_state_init(md_state *s, const albedo_model *m, errbuf *e) {
    return md_state_init_ex(s, m, m->params.n_threads, 1, e);
}

albedo_status md_state_init_ex(md_state *s, const albedo_model *m, int n_threads, int with_kv, errbuf *e) {
    memset(s, 0, sizeof *s);
    s->m = m;
    const md_config *c = &m->cfg;
    s->max_ctx =
        m->params.max_context > 0 && m->params.max_context < c->max_context ? m->params.max_context : c->max_context;
    /* A GPU model's sessions keep CPU ops for the region decoders. */
    albedo_status st = ops_ctx_new(m->cuda ? NULL : m->params.backend, n_threads,
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
    s->rln = malloc((size_t)c->dim * sizeof(float));
    if (!s->k_cache || !s->v_cache || !s->logits || !s->hidden || !s->feat || !s->rln) goto oom;
    if (c->moe_experts && !(s->moe_count = malloc((size_t)(c->moe_experts + 1) * sizeof *s->moe_count))) goto oom;
    if (with_kv && m->cuda) { /* backend_cuda.c: the KV cache and working memory on the GPU */
        if ((st = md_cuda_state_init(s, e))) {
            md_state_free(s);
            return st;
        }
        with_kv = 0;
    }
    for (int l = 0; l < c->n_layers && with_kv; l++) {
        /* Untouched pages of the cache are never faulted in, so a short
         * conversation costs only the positions it uses. */
        s->k_cache[l] = big_alloc((size_t)s->max_ctx * kvd * kv_elem_bytes(m->kv_dt));
        s->v_cache[l] = big_alloc((size_t)s->max_ctx * kvd * kv_elem_bytes(m->kv_dt));
        if (!s->k_cache[l] || !s->v_cache[l]) goto oom;
    }
    return md_state_reserve(s, 64, e);
oom:
    md_state_free(s);
    return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for the KV cache (%d positions)", s->max_ctx);
}

void md_state_free(md_state *s) {
    if (!s->m) return;
    md_cuda_state_free(s);
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
    free(s->rln);
    free(s->tau_f);
    free(s->tau_q);
    free(s->tau_v);
    free(s->moe_logits);
    free(s->moe_x);
    free(s->moe_y);
    free(s->moe_a);
    free(s->moe_g);
    free(s->moe_sel);
    free(s->moe_w);
    free(s->moe_rows);
    free(s->moe_roww);
    free(s->moe_count);
    ops_ctx_free(s->ops);
    memset(s, 0, sizeof *s);
}

albedo_status md_state_reserve(md_state *s, int T, errbuf *e) {
    if (T <= s->t_cap) return ALBEDO_OK;
    const md_config *c = &s->m->cfg;
    const size_t D = (size_t)c->head_dim, qkv = (size_t)(c->n_heads + 2 * c->n_kv_heads) * D;
    /* mlp also serves the region decoders' hidden layer (1 row). */
    const int r_inner = s->m->w.region_linear ? 0 : c->r_inner;
    size_t mlp = (size_t)(c->ff_dim > r_inner ? c->ff_dim : r_inner);
    /* Moondream 3's buffers have width 0 (stay NULL) for Moondream 2. */
    const size_t H = (size_t)c->n_heads, E = (size_t)c->moe_experts, K = E ? (size_t)c->moe_topk : 0;
    const size_t I = (size_t)c->moe_inner, dim = (size_t)c->dim, tau = c->md3 ? 1 : 0, moe = E ? 1 : 0;
    size_t widths[] = {dim,     dim, qkv,       H * D,     mlp,   dim, tau * qkv, tau * H,
                       tau * H, E,   moe * dim, moe * dim, 2 * I, I,   K,         K};
    float **dst[] = {&s->x,     &s->h,          &s->qkv,   &s->att,   &s->mlp,   &s->proj,  &s->tau_f, &s->tau_q,
                     &s->tau_v, &s->moe_logits, &s->moe_x, &s->moe_y, &s->moe_a, &s->moe_g, &s->moe_w, &s->moe_roww};
    for (size_t i = 0; i < sizeof widths / sizeof widths[0]; i++) {
        if (!widths[i]) continue;
        float *p = realloc(*dst[i], (size_t)T * widths[i] * sizeof(float));
        if (!p) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for %d tokens", T);
        *dst[i] = p;
    }
    int32_t **idst[] = {&s->moe_sel, &s->moe_rows};
    for (int i = 0; i < 2 && K; i++) {
        int32_t *p = realloc(*idst[i], (size_t)T * K * sizeof(int32_t));
        if (!p) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for %d tokens", T);
        *idst[i] = p;
    }
    s->t_cap = T;
    return ALBEDO_OK;
}
