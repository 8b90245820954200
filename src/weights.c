/*
 * weights.c — binds the model's weights to the tensors of a checkpoint.
 *
 * Every tensor name is first brought to its canonical 2025 form
 * (spec/model.md §3): the "model." prefix and torch.compile's "._orig_mod"
 * are dropped, and 2024-08-26 legacy names (§3.4) are renamed. Then each
 * weight the config calls for is looked up, and its dtype (F16, BF16 or F32)
 * and shape are checked; a mismatch is an error naming the tensor and both
 * shapes. Nothing is copied: the weights stay in the mapped file, 16-bit.
 *
 * A checkpoint may be split into several files (model-0000k-of-0000N, as the
 * real Moondream 3 is): the name index spans all of them, and a tensor found
 * in two shards is an error.
 *
 * Moondream 3 (§10.5) adds per layer attn.tau.{wq, wv, alpha}; from
 * moe.start_layer on, mlp.router.{weight, bias} and the 3-D expert tensors
 * mlp.fc1.weight [E, 2·inner, dim] and mlp.fc2.weight [E, dim, inner] (no
 * expert biases) replace the dense MLP; the region decoders are single
 * linear layers, with region.ln in front when the checkpoint has it.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>

#include "model.h"

typedef struct named {
    char *canon;
    const st_tensor *t;
    int legacy;
    dtype qdt; /* DT_Q8 / DT_Q4 when the file says its U8 tensors are albedo blocks (quant.c) */
} named;

typedef struct name_index {
    named *v;
    int n;
} name_index;

static int cmp_named(const void *a, const void *b) {
    return strcmp(((const named *)a)->canon, ((const named *)b)->canon);
}

static int starts(const char *s, const char *p) { return !strncmp(s, p, strlen(p)); }

/* Rewrite a legacy name into out; returns 1 if it was a legacy name. */
static int legacy_rename(const char *n, char *out, size_t cap) {
    static const struct {
        const char *from, *to;
    } flat[] = {
        {"vision_encoder.encoder.model.visual.patch_embed.linear.", "vision.patch_emb."},
        {"vision_encoder.encoder.model.visual.pos_embed", "vision.pos_emb"},
        {"vision_encoder.encoder.model.visual.norm.", "vision.post_ln."},
        {"vision_encoder.projection.mlp.", "vision.proj_mlp."},
        {"text_model.transformer.embd.wte.weight", "text.wte"},
        {"text_model.lm_head.ln.", "text.post_ln."},
        {"text_model.lm_head.linear.", "text.lm_head."},
        {"region_model.coordinate_features.weight", "region.coord_features"},
        {"region_model.size_features.weight", "region.size_features"},
        {"region_model.coordinate_encoder.", "region.coord_encoder."},
        {"region_model.coordinate_decoder.", "region.coord_decoder."},
        {"region_model.size_encoder.", "region.size_encoder."},
        {"region_model.size_decoder.", "region.size_decoder."},
    };
    for (size_t i = 0; i < sizeof flat / sizeof flat[0]; i++) {
        if (starts(n, flat[i].from)) {
            snprintf(out, cap, "%s%s", flat[i].to, n + strlen(flat[i].from));
            return 1;
        }
    }
    static const struct {
        const char *from, *to;
    } rest_vision[] = {{"norm1.", "ln1."}, {"norm2.", "ln2."}},
      rest_text[] = {{"mixer.Wqkv.", "attn.qkv."}, {"mixer.out_proj.", "attn.proj."}};
    const char *vp = "vision_encoder.encoder.model.visual.blocks.", *tp = "text_model.transformer.h.";
    int is_v = starts(n, vp), is_t = starts(n, tp);
    if (!is_v && !is_t) return 0;
    const char *p = n + strlen(is_v ? vp : tp);
    char *end;
    long blk = strtol(p, &end, 10);
    if (end == p || *end != '.') return 0;
    const char *rest = end + 1;
    const char *mapped = rest, *tail = "";
    size_t nr = is_v ? 2 : 2;
    for (size_t i = 0; i < nr; i++) {
        const char *from = is_v ? rest_vision[i].from : rest_text[i].from;
        if (starts(rest, from)) {
            mapped = is_v ? rest_vision[i].to : rest_text[i].to;
            tail = rest + strlen(from);
            break;
        }
    }
    snprintf(out, cap, "%s.blocks.%ld.%s%s", is_v ? "vision" : "text", blk, mapped, tail);
    return 1;
}

/* Add the tensors of one file to the index under their canonical names. */
static albedo_status index_file(name_index *ix, const st_file *f, errbuf *e) {
    const char *fmt = st_meta(f, "albedo.format"), *ver = st_meta(f, "albedo.version");
    const dtype qdt = !fmt ? DT_U8 : !strcmp(fmt, "q8") ? DT_Q8 : !strcmp(fmt, "q4") ? DT_Q4 : DT_U8;
    /* Q4 blocks changed in version 2 (one f16 scale became two 8-bit
     * codes, ops.h qformat); read as version 2 they would be garbage. */
    if (qdt == DT_Q4 && (!ver || strcmp(ver, QUANT_FORMAT_VERSION)))
        return errf(e, ALBEDO_ERR_MODEL_FORMAT,
                    "q4 weights of albedo.version %s, this build reads version %s: run albedo quantize again",
                    ver ? ver : "(none)", QUANT_FORMAT_VERSION);
    for (int i = 0; i < st_count(f); i++) {
        const st_tensor *t = st_at(f, i);
        char buf[512], out[600];
        /* drop every "._orig_mod" */
        size_t k = 0;
        for (const char *p = t->name; *p && k + 1 < sizeof buf;) {
            if (starts(p, "._orig_mod")) {
                p += 10;
                continue;
            }
            buf[k++] = *p++;
        }
        buf[k] = 0;
        const char *n = starts(buf, "model.") ? buf + 6 : buf;
        int legacy = legacy_rename(n, out, sizeof out);
        if (!legacy) snprintf(out, sizeof out, "%s", n);
        ix->v[ix->n].canon = strdup(out);
        if (!ix->v[ix->n].canon) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
        ix->v[ix->n].t = t;
        ix->v[ix->n].legacy = legacy;
        ix->v[ix->n].qdt = qdt;
        ix->n++;
    }
    return ALBEDO_OK;
}

static albedo_status build_index(name_index *ix, const st_file *const *files, int n_files, errbuf *e) {
    ix->n = 0;
    size_t total = 0;
    for (int fi = 0; fi < n_files; fi++) total += (size_t)st_count(files[fi]);
    ix->v = calloc(total + 1, sizeof *ix->v);
    if (!ix->v) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    for (int fi = 0; fi < n_files; fi++) {
        albedo_status st = index_file(ix, files[fi], e);
        if (st) return st;
    }
    qsort(ix->v, (size_t)ix->n, sizeof *ix->v, cmp_named);
    for (int i = 1; i < ix->n; i++) {
        if (!strcmp(ix->v[i].canon, ix->v[i - 1].canon))
            return errf(e, ALBEDO_ERR_MODEL_FORMAT, "tensors %s and %s both stand for %s", ix->v[i - 1].t->name,
                        ix->v[i].t->name, ix->v[i].canon);
    }
    return ALBEDO_OK;
}

static void free_index(name_index *ix) {
    for (int i = 0; i < ix->n; i++) free(ix->v[i].canon);
    free(ix->v);
}

static const named *lookup(const name_index *ix, const char *canon) {
    named key = {.canon = (char *)canon};
    return bsearch(&key, ix->v, (size_t)ix->n, sizeof *ix->v, cmp_named);
}

static void shape_str(char *out, size_t cap, int nd, const int64_t *d) {
    size_t k = (size_t)snprintf(out, cap, "[");
    for (int i = 0; i < nd && k < cap; i++)
        k += (size_t)snprintf(out + k, cap - k, "%s%lld", i ? ", " : "", (long long)d[i]);
    if (k < cap) snprintf(out + k, cap - k, "]");
}

typedef struct binder {
    const name_index *ix;
    errbuf *e;
    albedo_status st;
    int used;
} binder;

/* Find canon with the given shape; on mismatch record an error. */
static const named *need(binder *b, const char *canon, int nd, const int64_t *dims) {
    if (b->st) return NULL;
    const named *n = lookup(b->ix, canon);
    char want[96], have[96];
    shape_str(want, sizeof want, nd, dims);
    if (!n) {
        b->st = errf(b->e, ALBEDO_ERR_MODEL_FORMAT, "tensor model.%s %s is missing from the checkpoint", canon, want);
        return NULL;
    }
    const st_tensor *t = n->t;
    if (t->dt != DT_BF16 && t->dt != DT_F16 && t->dt != DT_F32) {
        b->st = errf(b->e, ALBEDO_ERR_MODEL_FORMAT, "tensor %s: dtype %s (expected BF16, F16 or F32)", t->name,
                     dtype_name(t->dt));
        return NULL;
    }
    int ok = t->ndim == nd;
    for (int i = 0; ok && i < nd; i++) ok = t->shape[i] == dims[i];
    if (!ok) {
        shape_str(have, sizeof have, t->ndim, t->shape);
        b->st = errf(b->e, ALBEDO_ERR_MODEL_FORMAT, "tensor %s: expected %s, file has %s", t->name, want, have);
        return NULL;
    }
    b->used++;
    return n;
}

static op_vec vec(binder *b, const char *canon, int64_t n) {
    const named *x = need(b, canon, 1, (int64_t[]){n});
    return x ? (op_vec){x->t->data, x->t->dt} : (op_vec){0};
}

/* A 3-D expert tensor [E, rows, cols]: its data and dtype. Stored by
 * `albedo quantize` it is U8 [E, rows, q_row_bytes(cols)] in block format. */
static const void *experts(binder *b, const char *canon, int64_t E, int64_t rows, int64_t cols, dtype *dt) {
    const named *q = b->st ? NULL : lookup(b->ix, canon);
    if (q && q->t->dt == DT_U8 && q->qdt != DT_U8) {
        const int64_t rb = (int64_t)q_row_bytes(q->qdt, (int)cols);
        if (q->t->ndim != 3 || q->t->shape[0] != E || q->t->shape[1] != rows || q->t->shape[2] != rb) {
            char have[96];
            shape_str(have, sizeof have, q->t->ndim, q->t->shape);
            b->st = errf(b->e, ALBEDO_ERR_MODEL_FORMAT,
                         "tensor %s: %s blocks of [%lld, %lld, %lld] are [%lld, %lld, %lld] bytes, file has %s",
                         q->t->name, dtype_name(q->qdt), (long long)E, (long long)rows, (long long)cols, (long long)E,
                         (long long)rows, (long long)rb, have);
            return NULL;
        }
        b->used++;
        *dt = q->qdt;
        return q->t->data;
    }
    const named *x = need(b, canon, 3, (int64_t[]){E, rows, cols});
    if (!x) return NULL;
    *dt = x->t->dt;
    return x->t->data;
}

op_linear md_expert_linear(const void *w, dtype dt, int e, int rows_per_expert, int row0, int n_out, int n_in) {
    const size_t row = (size_t)e * (size_t)rows_per_expert + (size_t)row0;
    /* Block formats have no element size: a row is q_row_bytes long. */
    const size_t row_bytes = q_row_bytes(dt, n_in) ? q_row_bytes(dt, n_in) : (size_t)n_in * dtype_size(dt);
    op_linear L = {0};
    L.w = (const char *)w + row * row_bytes;
    L.dt = dt;
    L.n_out = n_out;
    L.n_in = n_in;
    return L;
}

/* A bare 2-D tensor (no ".weight" suffix, no bias) used as a linear layer. */
static op_linear mat(binder *b, const char *canon, int n_out, int n_in) {
    const named *x = need(b, canon, 2, (int64_t[]){n_out, n_in});
    op_linear L = {0};
    if (!x) return L;
    L.w = x->t->data;
    L.dt = x->t->dt;
    L.n_out = n_out;
    L.n_in = n_in;
    return L;
}

static op_linear lin(binder *b, const char *prefix, int n_out, int n_in, int bias) {
    char nw[256], nb[256];
    snprintf(nw, sizeof nw, "%s.weight", prefix);
    snprintf(nb, sizeof nb, "%s.bias", prefix);
    op_linear L = {0};
    /* A linear stored quantised by `albedo quantize`: U8 [n_out, row bytes]
     * in a file whose metadata names the block format (ops.h qformat). */
    const named *q = b->st ? NULL : lookup(b->ix, nw);
    if (q && q->t->dt == DT_U8 && q->qdt != DT_U8) {
        /* The q4 recipe keeps the LM head in Q8 (quant.c): a q4 file's
         * linear whose rows have Q8's length is Q8. */
        const dtype qdt =
            q->qdt == DT_Q4 && q->t->ndim == 2 && q->t->shape[1] == (int64_t)q_row_bytes(DT_Q8, n_in) ? DT_Q8 : q->qdt;
        const int64_t rb = (int64_t)q_row_bytes(qdt, n_in);
        if (q->t->ndim != 2 || q->t->shape[0] != n_out || q->t->shape[1] != rb) {
            char have[96];
            shape_str(have, sizeof have, q->t->ndim, q->t->shape);
            b->st = errf(b->e, ALBEDO_ERR_MODEL_FORMAT,
                         "tensor %s: %s blocks of [%d, %d] are [%d, %lld] bytes, file has %s", q->t->name,
                         dtype_name(qdt), n_out, n_in, n_out, (long long)rb, have);
            return L;
        }
        b->used++;
        L.w = q->t->data;
        L.dt = qdt;
    }
    const named *w = L.w ? q : need(b, nw, 2, (int64_t[]){n_out, n_in});
    if (!w) return L;
    L.w = w->t->data;
    L.dt = L.dt == DT_Q8 || L.dt == DT_Q4 ? L.dt : w->t->dt;
    L.n_out = n_out;
    L.n_in = n_in;
    if (bias) {
        const named *bb = need(b, nb, 1, (int64_t[]){n_out});
        if (!bb) return L;
        L.b = bb->t->data;
        L.bdt = bb->t->dt;
    }
    return L;
}

albedo_status md_weights_bind(md_weights *w, const md_config *c, const st_file *f, errbuf *e) {
    return md_weights_bind_files(w, c, &f, 1, e);
}

/* First MoE layer of the tensors, or -1: the lowest N with text.blocks.N.mlp.router.weight. */
static int first_router(const name_index *ix, const md_config *c) {
    char nm[96];
    for (int i = 0; i < c->n_layers; i++) {
        snprintf(nm, sizeof nm, "text.blocks.%d.mlp.router.weight", i);
        if (lookup(ix, nm)) return i;
    }
    return -1;
}

albedo_status md_config_from_tensors(md_config *c, const st_file *const *files, int n_files, errbuf *e) {
    if (c->md3) return ALBEDO_OK;
    name_index ix = {0};
    albedo_status st = build_index(&ix, files, n_files, e);
    if (st) {
        free_index(&ix);
        return st;
    }
    int tau = lookup(&ix, "text.blocks.0.attn.tau.wq") != NULL, r0 = first_router(&ix, c);
    if (tau || r0 >= 0) {
        if (r0 >= 0) {
            /* Expert geometry from the tensors; the top-k is not in them:
             * Moondream 3's 8 (capped by the expert count). */
            char nm[96];
            snprintf(nm, sizeof nm, "text.blocks.%d.mlp.fc1.weight", r0);
            const named *r = NULL, *f1 = lookup(&ix, nm);
            snprintf(nm, sizeof nm, "text.blocks.%d.mlp.router.weight", r0);
            r = lookup(&ix, nm);
            if (!f1 || f1->t->ndim != 3 || r->t->ndim != 2 || f1->t->shape[0] != r->t->shape[0] ||
                f1->t->shape[1] % 2 || f1->t->shape[0] < 1 || f1->t->shape[0] > 4096 || f1->t->shape[1] < 2 ||
                f1->t->shape[1] > (2 << 16)) {
                st = errf(
                    e, ALBEDO_ERR_MODEL_FORMAT,
                    "tensor model.text.blocks.%d.mlp.fc1.weight: expected [experts, 2*inner, dim] beside the router",
                    r0);
            } else {
                c->moe_experts = (int)f1->t->shape[0];
                c->moe_inner = (int)(f1->t->shape[1] / 2);
                c->moe_start = r0;
                c->moe_topk = c->moe_experts < 8 ? c->moe_experts : 8;
            }
        }
        if (!st && c->n_kv_heads != c->n_heads)
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "Moondream 3 tensors with n_kv_heads %d != n_heads %d", c->n_kv_heads,
                      c->n_heads);
        if (!st) md_config_set_md3(c);
    }
    free_index(&ix);
    return st;
}

albedo_status md_weights_bind_files(md_weights *w, const md_config *c, const st_file *const *files, int n_files,
                                    errbuf *e) {
    memset(w, 0, sizeof *w);
    name_index ix = {0};
    albedo_status st = build_index(&ix, files, n_files, e);
    if (st) {
        free_index(&ix);
        return st;
    }
    binder b = {&ix, e, ALBEDO_OK, 0};
    char nm[128];
    const int pd = c->in_ch * c->patch * c->patch, np = (c->crop_size / c->patch) * (c->crop_size / c->patch);

    /* vision */
    w->patch_emb = lin(&b, "vision.patch_emb", c->enc_dim, pd, 1);
    const named *pe = need(&b, "vision.pos_emb", 3, (int64_t[]){1, np, c->enc_dim});
    if (pe) w->pos_emb = (op_vec){pe->t->data, pe->t->dt};
    w->vb = calloc((size_t)c->enc_layers, sizeof *w->vb);
    w->tb = calloc((size_t)c->n_layers, sizeof *w->tb);
    if (!w->vb || !w->tb) {
        free_index(&ix);
        md_weights_release(w);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int i = 0; i < c->enc_layers && !b.st; i++) {
        vit_block *v = &w->vb[i];
#define NM(fmt) (snprintf(nm, sizeof nm, fmt, i), nm)
        v->ln1_w = vec(&b, NM("vision.blocks.%d.ln1.weight"), c->enc_dim);
        v->ln1_b = vec(&b, NM("vision.blocks.%d.ln1.bias"), c->enc_dim);
        v->ln2_w = vec(&b, NM("vision.blocks.%d.ln2.weight"), c->enc_dim);
        v->ln2_b = vec(&b, NM("vision.blocks.%d.ln2.bias"), c->enc_dim);
        v->qkv = lin(&b, NM("vision.blocks.%d.attn.qkv"), 3 * c->enc_dim, c->enc_dim, 1);
        v->proj = lin(&b, NM("vision.blocks.%d.attn.proj"), c->enc_dim, c->enc_dim, 1);
        v->fc1 = lin(&b, NM("vision.blocks.%d.mlp.fc1"), c->enc_ff, c->enc_dim, 1);
        v->fc2 = lin(&b, NM("vision.blocks.%d.mlp.fc2"), c->enc_dim, c->enc_ff, 1);
    }
    w->post_ln_w = vec(&b, "vision.post_ln.weight", c->enc_dim);
    w->post_ln_b = vec(&b, "vision.post_ln.bias", c->enc_dim);
    w->proj_fc1 = lin(&b, "vision.proj_mlp.fc1", c->proj_inner, 2 * c->enc_dim, 1);
    w->proj_fc2 = lin(&b, "vision.proj_mlp.fc2", c->proj_out, c->proj_inner, 1);

    /* text */
    const named *wte = need(&b, "text.wte", 2, (int64_t[]){c->vocab, c->dim});
    if (wte) w->wte = (op_vec){wte->t->data, wte->t->dt};
    const int qkv_out = (c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
    for (int i = 0; i < c->n_layers && !b.st; i++) {
        txt_block *t = &w->tb[i];
        t->ln_w = vec(&b, NM("text.blocks.%d.ln.weight"), c->dim);
        t->ln_b = vec(&b, NM("text.blocks.%d.ln.bias"), c->dim);
        t->qkv = lin(&b, NM("text.blocks.%d.attn.qkv"), qkv_out, c->dim, 1);
        t->proj = lin(&b, NM("text.blocks.%d.attn.proj"), c->dim, c->n_heads * c->head_dim, 1);
        if (c->md3) {
            t->tau_wq = mat(&b, NM("text.blocks.%d.attn.tau.wq"), c->n_heads, qkv_out);
            t->tau_wv = mat(&b, NM("text.blocks.%d.attn.tau.wv"), c->n_heads, qkv_out);
            t->tau_alpha = vec(&b, NM("text.blocks.%d.attn.tau.alpha"), c->n_heads);
        }
        if (c->moe_experts && i >= c->moe_start) {
            t->moe = 1;
            t->router = lin(&b, NM("text.blocks.%d.mlp.router"), c->moe_experts, c->dim, 1);
            t->exp_fc1 = experts(&b, NM("text.blocks.%d.mlp.fc1.weight"), c->moe_experts, 2 * c->moe_inner, c->dim,
                                 &t->exp_fc1_dt);
            t->exp_fc2 =
                experts(&b, NM("text.blocks.%d.mlp.fc2.weight"), c->moe_experts, c->dim, c->moe_inner, &t->exp_fc2_dt);
        } else {
            t->fc1 = lin(&b, NM("text.blocks.%d.mlp.fc1"), c->ff_dim, c->dim, 1);
            t->fc2 = lin(&b, NM("text.blocks.%d.mlp.fc2"), c->dim, c->ff_dim, 1);
        }
#undef NM
    }
    w->tpost_w = vec(&b, "text.post_ln.weight", c->dim);
    w->tpost_b = vec(&b, "text.post_ln.bias", c->dim);
    w->lm_head = lin(&b, "text.lm_head", c->vocab, c->dim, 1);

    /* region: Fourier matrices are [1, F/2] and [2, F/2], stored transposed
     * ([F/2, 1], [F/2, 2]) under the legacy names. */
    const named *cf = lookup(&ix, "region.coord_features");
    int legacy = cf && cf->legacy;
    w->features_transposed = legacy;
    const named *cfn = need(&b, "region.coord_features", 2,
                            legacy ? (int64_t[]){c->coord_feat / 2, 1} : (int64_t[]){1, c->coord_feat / 2});
    const named *sfn = need(&b, "region.size_features", 2,
                            legacy ? (int64_t[]){c->size_feat / 2, 2} : (int64_t[]){2, c->size_feat / 2});
    if (cfn) w->coord_features = (op_vec){cfn->t->data, cfn->t->dt};
    if (sfn) w->size_features = (op_vec){sfn->t->data, sfn->t->dt};
    w->coord_enc = lin(&b, "region.coord_encoder", c->r_dim, c->coord_feat, 1);
    w->size_enc = lin(&b, "region.size_encoder", c->r_dim, c->size_feat, 1);
    /* Decoders: MLPs (Moondream 2) or, when the checkpoint has
     * region.coord_decoder.weight itself, single linear layers (Moondream 3). */
    if (lookup(&ix, "region.coord_decoder.weight")) {
        w->region_linear = 1;
        w->coord_dec = lin(&b, "region.coord_decoder", c->coord_out, c->r_dim, 1);
        w->size_dec = lin(&b, "region.size_decoder", c->size_out, c->r_dim, 1);
        if (lookup(&ix, "region.ln.weight")) {
            w->region_ln = 1;
            w->region_ln_w = vec(&b, "region.ln.weight", c->r_dim);
            w->region_ln_b = vec(&b, "region.ln.bias", c->r_dim);
        }
    } else {
        w->coord_fc1 = lin(&b, "region.coord_decoder.fc1", c->r_inner, c->r_dim, 1);
        w->coord_fc2 = lin(&b, "region.coord_decoder.fc2", c->coord_out, c->r_inner, 1);
        w->size_fc1 = lin(&b, "region.size_decoder.fc1", c->r_inner, c->r_dim, 1);
        w->size_fc2 = lin(&b, "region.size_decoder.fc2", c->size_out, c->r_inner, 1);
    }

    free_index(&ix);
    if (b.st) {
        md_weights_release(w);
        return b.st;
    }
    return ALBEDO_OK;
}

void md_weights_release(md_weights *w) {
    md_weights_quant_free(w);
    free(w->vb);
    free(w->tb);
    w->vb = NULL;
    w->tb = NULL;
}
