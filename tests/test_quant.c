/*
 * test_quant.c — quality of the quantised text weights (docs/QUANT.md) on
 * md2-small and md3-small, against the engine's own float32 path.
 *
 * Teacher-forced: every fixture case runs through the generation loop of
 * the float32 session, whose forward passes (gen_io) also run the same
 * embeddings through a session of the q8 (q4) model at the same positions.
 * The float32 argmax decides every fed token, so both see the same inputs;
 * at each step with logits the two argmaxes are compared.
 *
 *   agreement  top-1 agreement over all steps of all cases: q8 >= 97%
 *              asserted (md2-small on the default backend; md3-small, its
 *              MoE experts quantised too, on the float-activation `generic`
 *              table, with the default backend's figure reported and held
 *              above 95%: see run_model); q4 >= 85% asserted on md2-small
 *              (default backend), reported on md3-small
 *   logits     relative L2 error of each case's first logits row (reported;
 *              q8 <= 5%, q4 <= 25% asserted as sanity bounds)
 *   prefix     relative L2 error of the image prefix's KV cache (reported)
 *   img_emb    the vision encoder keeps 16-bit weights in every format, so
 *              img_emb is the float32 path's exactly; checked through the
 *              bound weight pointers. The LM head is Q8 in both recipes
 *              (quant.c), and so is layer 0's attn.qkv, also when stored.
 *   experts    (md3-small) every expert slice that md_expert_linear makes of
 *              the block-format tensors — fc1 (as text.c runs it), its GELU
 *              and gate halves, fc2 — holds exactly the blocks q_quantize_row makes of the
 *              bf16 rows, and the op linear over it equals a float32 linear
 *              over the dequantised rows: bit for bit on the reference
 *              backend, within the op tolerance (tests/test_ops.c) on the
 *              default backend, for decode (T = 1) and prefill row counts.
 *   fp8        weights "fp8" (e4m3 experts, the CUDA backend's) is refused
 *              on the CPU backend and for Moondream 2
 *   store      `albedo quantize` (albedo_model_quantize) output loads with
 *              the linears (and experts) mapped as DT_Q8/DT_Q4 and gives
 *              bit-identical first logits to load-time quantisation.
 *
 * The fixtures' weights are seeded random: logits margins are often small
 * (fixture logit_margins: many below 0.1), which makes top-1 agreement a
 * harder test than on a trained model.
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <math.h>
#include <zlib.h>

#include "session.h"
#include "test.h"
#include "test_data.h"
#include "fixture_check.h"

typedef struct pair {
    albedo_session *ref, *q;
    int steps, agree, first_done;
    double first_rel; /* this case */
} pair;

static albedo_status fwd(void *user, const float *emb, int T, int pos0, int n_prefix, int want_logits, errbuf *e) {
    pair *p = user;
    albedo_status st = text_forward(&p->ref->st, emb, T, pos0, n_prefix, want_logits, e);
    if (!st) st = text_forward(&p->q->st, emb, T, pos0, n_prefix, want_logits, e);
    if (st || !want_logits) return st;
    const int V = p->ref->m->cfg.vocab;
    int a = sampler_argmax(p->ref->st.logits, V, NULL), b = sampler_argmax(p->q->st.logits, V, NULL);
    p->steps++;
    p->agree += a == b;
    if (!p->first_done) {
        p->first_rel = rel_l2(p->q->st.logits, p->ref->st.logits, (size_t)V);
        p->first_done = 1;
    }
    return ALBEDO_OK;
}

static void put_prefix(albedo_session *s, const albedo_image *img) {
    const md_config *c = &s->m->cfg;
    const size_t kvd = (size_t)c->n_kv_heads * c->head_dim * kv_elem_bytes(s->m->kv_dt); /* bytes per row */
    for (int l = 0; l < c->n_layers; l++) {
        memcpy(s->st.k_cache[l], img->k[l], (size_t)img->n_pos * kvd);
        memcpy(s->st.v_cache[l], img->v[l], (size_t)img->n_pos * kvd);
    }
    s->kv_image = 0;
}

static double prefix_rel(const albedo_model *m, const albedo_image *a, const albedo_image *b) {
    const md_config *c = &m->cfg;
    const size_t n = (size_t)a->n_pos * c->n_kv_heads * c->head_dim;
    double num = 0, den = 0;
    for (int l = 0; l < c->n_layers; l++)
        for (size_t i = 0; i < n; i++) {
            const double ak = kv_get(a->k[l], a->m->kv_dt, i), av = kv_get(a->v[l], a->m->kv_dt, i);
            const double dk = kv_get(b->k[l], b->m->kv_dt, i) - ak, dv = kv_get(b->v[l], b->m->kv_dt, i) - av;
            num += dk * dk + dv * dv;
            den += ak * ak + av * av;
        }
    return sqrt(num / (den > 0 ? den : 1));
}

static albedo_model *load_on(const char *dir, const char *weights, const char *backend) {
    albedo_model_params p = albedo_model_params_default();
    p.n_threads = 2;
    p.weights = weights;
    p.backend = backend;
    albedo_model *m = NULL;
    CHECK(albedo_model_load(dir, &p, &m) == ALBEDO_OK, "load %s (%s): %s", dir, weights ? weights : "bf16",
          albedo_last_error());
    return m;
}

static albedo_model *load(const char *dir, const char *weights) { return load_on(dir, weights, NULL); }

/* Run every case teacher-forced on (ref, q), the quantised model on backend
 * (NULL: the best for this CPU); returns the agreement in %. */
static double run_format(const char *label, const char *dir, const char *fmt, const char *backend, albedo_model *mref,
                         json_t *cases, const char *image_dir, double *worst_first, double *mean_first) {
    albedo_model *mq = load_on(dir, fmt, backend);
    if (!mq) return -1;
    dtype want = !strcmp(fmt, "q8") ? DT_Q8 : DT_Q4;
    const md_config *mc = &mq->cfg;
    for (int l = 0; l < mc->n_layers; l++) {
        const txt_block *t = &mq->w.tb[l], *tr = &mref->w.tb[l];
        /* the q4 recipe keeps layer 0's attn.qkv in Q8 (quant.c text_mats) */
        CHECK(t->qkv.dt == (l == 0 ? DT_Q8 : want) && t->proj.dt == want,
              "%s %s: layer %d attention linears not converted as the recipe says", label, fmt, l);
        if (t->moe)
            CHECK(t->exp_fc1_dt == want && t->exp_fc2_dt == want && t->router.dt == tr->router.dt,
                  "%s %s: layer %d experts not converted (or router changed)", label, fmt, l);
        else
            CHECK(t->fc1.dt == want && t->fc2.dt == want, "%s %s: layer %d MLP not converted", label, fmt, l);
    }
    int vis_same = mq->w.proj_fc1.dt == mref->w.proj_fc1.dt && mq->w.proj_fc2.dt == mref->w.proj_fc2.dt &&
                   mq->w.patch_emb.dt == mref->w.patch_emb.dt;
    for (int l = 0; l < mq->cfg.enc_layers; l++) {
        const vit_block *a = &mq->w.vb[l], *b = &mref->w.vb[l];
        vis_same &=
            a->qkv.dt == b->qkv.dt && a->proj.dt == b->proj.dt && a->fc1.dt == b->fc1.dt && a->fc2.dt == b->fc2.dt;
    }
    CHECK(vis_same, "%s: vision weights must stay as stored (img_emb identical)", fmt);
    CHECK(mq->w.lm_head.dt == DT_Q8, "%s: the LM head is Q8 in every recipe (quant.c), not %s", fmt,
          dtype_name(mq->w.lm_head.dt));
    char tag[8];
    snprintf(tag, sizeof tag, ", %s,", fmt); /* "(text 128x3, q4, vision ..." */
    CHECK(strstr(albedo_model_describe(mq), tag) != NULL, "%s: albedo_model_describe does not name the recipe: %s", fmt,
          albedo_model_describe(mq));
    albedo_session *sr = NULL, *sq = NULL;
    CHECK(albedo_session_new(mref, &sr) == ALBEDO_OK && albedo_session_new(mq, &sq) == ALBEDO_OK, "sessions: %s",
          albedo_last_error());
    pair p = {sr, sq, 0, 0, 0, 0};
    const char *cur = NULL;
    albedo_image *ir = NULL, *iq = NULL;
    double wf = 0, sf = 0, wp = 0;
    int nf = 0, n_case = 0;
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        if (!sr || !sq) break;
        const char *image = json_string_value(json_object_get(c, "image"));
        if (image && (!cur || strcmp(cur, image))) {
            albedo_image_free(ir), albedo_image_free(iq);
            ir = iq = NULL;
            cur = image;
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", image_dir, image);
            CHECK(albedo_image_encode_file(sr, path, &ir) == ALBEDO_OK, "encode %s: %s", image,
                  albedo_session_error(sr));
            CHECK(albedo_image_encode_file(sq, path, &iq) == ALBEDO_OK, "encode %s: %s", image,
                  albedo_session_error(sq));
            if (ir && iq) {
                double r = prefix_rel(mref, ir, iq);
                if (r > wp) wp = r;
            }
        }
        if (image && (!ir || !iq)) continue;
        albedo_spatial_ref refs[16];
        albedo_request r = case_request(c, refs);
        /* The Moondream 3 reference's text-only query reasoned by default
         * (tests/test_md3.c): its output shows it. */
        if (mc->md3 && json_object_get(json_object_get(c, "output"), "reasoning")) r.reasoning = 1;
        r.image = NULL;
        gen_io io = {fwd, &p, image ? ir->n_pos : 0};
        if (image) put_prefix(sr, ir), put_prefix(sq, iq);
        p.first_done = 0;
        errbuf e;
        albedo_status st = gen_run_io(sr, &r, &io, &e);
        CHECK(st == ALBEDO_OK, "%s case %zu: %s", fmt, i, e.msg);
        if (p.first_done) {
            if (p.first_rel > wf) wf = p.first_rel;
            sf += p.first_rel;
            nf++;
        }
        n_case++;
    }
    double pct = p.steps ? 100.0 * p.agree / p.steps : 0;
    *worst_first = wf;
    *mean_first = nf ? sf / nf : 0;
    printf("%s %s (%s backend): %d cases, top-1 agreement %d/%d steps = %.2f%%; first_logits rel L2 mean %.4f worst "
           "%.4f; image prefix KV rel L2 worst %.4f; img_emb rel L2 0 (vision weights shared)\n",
           label, fmt, backend ? backend : "default", n_case, p.agree, p.steps, pct, *mean_first, wf, wp);
    albedo_image_free(ir), albedo_image_free(iq);
    albedo_session_free(sr), albedo_session_free(sq);
    albedo_model_free(mq);
    return pct;
}

/* First logits of a text-only query on model m, captured from the forward
 * pass itself (albedo_session_run may run on the model's engine, whose
 * working memory is not the session's). */
typedef struct capture {
    albedo_session *s;
    float *out;
    int done;
} capture;

static albedo_status cap_fwd(void *user, const float *emb, int T, int pos0, int n_prefix, int want_logits, errbuf *e) {
    capture *c = user;
    albedo_status st = text_forward(&c->s->st, emb, T, pos0, n_prefix, want_logits, e);
    if (!st && want_logits && !c->done) {
        memcpy(c->out, c->s->st.logits, (size_t)c->s->m->cfg.vocab * sizeof(float));
        c->done = 1;
    }
    return st;
}

static int first_logits(albedo_model *m, float *out) {
    albedo_session *s = NULL;
    if (albedo_session_new(m, &s) != ALBEDO_OK) return -1;
    albedo_request r = albedo_request_default(ALBEDO_SKILL_QUERY);
    r.question = "What is this?";
    r.max_tokens = 1;
    r.temperature = 0;
    capture c = {s, out, 0};
    gen_io io = {cap_fwd, &c, 0};
    errbuf e;
    int rc = gen_run_io(s, &r, &io, &e) == ALBEDO_OK && c.done ? 0 : -1;
    double ss = 0;
    for (int i = 0; i < m->cfg.vocab; i++) ss += (double)out[i] * out[i];
    if (!(ss > 0)) rc = -1; /* a row of zeros (or NaN) would make any comparison pass */
    albedo_session_free(s);
    return rc;
}

/* A q4 file of format version 1 (one f16 scale per Q4 block, before the
 * sub-block codes) is refused with a message, not read as version 2: the
 * stored file's "albedo.version" is set to "1" in place, then restored. */
static void check_old_version(const char *dir) {
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *f = fopen(path, "r+b");
    CHECK(f != NULL, "open %s", path);
    if (!f) return;
    uint8_t len8[8];
    char *hdr = NULL, *at = NULL;
    long vpos = -1;
    if (fread(len8, 1, 8, f) == 8) {
        uint64_t n = 0;
        for (int i = 7; i >= 0; i--) n = n << 8 | len8[i];
        hdr = n < (1u << 26) ? calloc(n + 1, 1) : NULL;
        if (hdr && fread(hdr, 1, n, f) == n) at = strstr(hdr, "\"albedo.version\"");
        if (at) at = strchr(at + 16, '"'); /* the value's opening quote */
        if (at && at[1] == '2' && at[2] == '"') vpos = 8 + (long)(at + 1 - hdr);
    }
    CHECK(vpos > 0, "%s: no \"albedo.version\": \"2\" in the header", path);
    if (vpos > 0) {
        fseek(f, vpos, SEEK_SET), fputc('1', f), fflush(f);
        albedo_model_params p = albedo_model_params_default();
        albedo_model *m = NULL;
        albedo_status st = albedo_model_load(dir, &p, &m);
        CHECK(st == ALBEDO_ERR_MODEL_FORMAT && !m && strstr(albedo_last_error(), "albedo.version 1"),
              "q4 file of version 1: status %d: %s", (int)st, albedo_last_error());
        albedo_model_free(m);
        fseek(f, vpos, SEEK_SET), fputc('2', f);
    }
    fclose(f);
    free(hdr);
}

static void check_store(const char *label, const char *dir, const char *fmt, albedo_model *mload) {
    char out[4096];
    snprintf(out, sizeof out, "%s/%s-%s", ALBEDO_BINARY_DIR, label, fmt);
    albedo_model_params p = albedo_model_params_default();
    p.n_threads = 2;
    p.weights = fmt;
    CHECK(albedo_model_quantize(dir, &p, out) == ALBEDO_OK, "quantize %s: %s", fmt, albedo_last_error());
    albedo_model *ms = load(out, NULL); /* stored format, no conversion */
    if (!ms) return;
    dtype want = !strcmp(fmt, "q8") ? DT_Q8 : DT_Q4;
    CHECK(ms->w.tb[0].qkv.dt == DT_Q8 && ms->w.tb[ms->cfg.n_layers - 1].qkv.dt == want && ms->w.tb[0].proj.dt == want &&
              ms->w.lm_head.dt == DT_Q8 && ms->w.quant_mem == NULL,
          "%s: stored linears (and the Q8 LM head and layer 0 qkv) not mapped as blocks", fmt);
    for (int l = 0; l < ms->cfg.n_layers; l++)
        if (ms->w.tb[l].moe)
            CHECK(ms->w.tb[l].exp_fc1_dt == want && ms->w.tb[l].exp_fc2_dt == want,
                  "%s: stored experts of layer %d not "
                  "mapped as blocks",
                  fmt, l);
    const int V = ms->cfg.vocab;
    float *a = malloc((size_t)V * sizeof *a), *b = malloc((size_t)V * sizeof *b);
    CHECK(first_logits(ms, a) == 0 && first_logits(mload, b) == 0, "first logits: %s", albedo_last_error());
    CHECK(memcmp(a, b, (size_t)V * sizeof *a) == 0, "%s: stored and load-time quantisation differ (rel L2 %.3g)", fmt,
          rel_l2(a, b, (size_t)V));
    printf("%s %s: albedo quantize -> %s loads mapped, logits identical to load-time quantisation\n", label, fmt, out);
    free(a), free(b);
    albedo_model_free(ms);
    if (want == DT_Q4) check_old_version(out);
}

/* ---- expert slices in block format --------------------------------------------------- */

static double max_abs_diff(const float *a, const float *b, size_t n, size_t *at) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > worst || d != d) worst = d, *at = i;
    }
    return worst;
}

/* One slice (rows [row0, row0 + n_out) of expert e, K inputs) of the
 * block-format tensor wq against the 16-bit source ws. */
static void check_slice(const char *what, const void *ws, dtype sdt, const void *wq, dtype qdt, int e, int rows,
                        int row0, int n_out, int K, ops_ctx *ref, ops_ctx *fast) {
    const op_linear Lq = md_expert_linear(wq, qdt, e, rows, row0, n_out, K);
    const op_linear Ls = md_expert_linear(ws, sdt, e, rows, row0, n_out, K);
    const size_t rb = q_row_bytes(qdt, K);
    float *src = malloc((size_t)K * sizeof *src), *deq = malloc((size_t)n_out * K * sizeof *deq);
    uint8_t *blk = malloc(rb);
    int bytes_ok = 1;
    for (int r = 0; r < n_out && src && deq && blk; r++) {
        /* the slice's row r is q_quantize_row of source row e·rows + row0 + r */
        for (int k = 0; k < K; k++) src[k] = bf16_to_f32(((const uint16_t *)Ls.w)[(size_t)r * K + k]);
        q_quantize_row(qdt, src, K, blk);
        if (memcmp(blk, (const char *)Lq.w + (size_t)r * rb, rb)) bytes_ok = 0;
        q_dequantize_row(qdt, (const char *)Lq.w + (size_t)r * rb, K, deq + (size_t)r * K);
    }
    CHECK(bytes_ok, "%s %s expert %d rows %d+%d: blocks differ from q_quantize_row of the bf16 rows", what,
          dtype_name(qdt), e, row0, n_out);
    /* linear over the slice = float32 linear over its dequantised rows */
    const op_linear Lf = {deq, NULL, DT_F32, 0, n_out, K};
    static const int Ts[] = {1, 3, 37};
    for (size_t ti = 0; ti < sizeof Ts / sizeof Ts[0]; ti++) {
        const int T = Ts[ti];
        float *x = malloc((size_t)T * K * sizeof *x), *yq = malloc((size_t)T * n_out * sizeof *yq);
        float *yf = malloc((size_t)T * n_out * sizeof *yf);
        if (!x || !yq || !yf) break;
        uint64_t z = 0x2545F4914F6CDD1Dull ^ (uint64_t)(e * 131 + row0 + T);
        for (size_t i = 0; i < (size_t)T * K; i++) {
            z ^= z << 13, z ^= z >> 7, z ^= z << 17;
            x[i] = (float)((double)(z >> 11) / 9007199254740992.0 * 2.0 - 1.0);
        }
        O(ref)->linear(ref, yq, n_out, x, K, T, &Lq);
        O(ref)->linear(ref, yf, n_out, x, K, T, &Lf);
        size_t at = 0;
        double d = max_abs_diff(yq, yf, (size_t)T * n_out, &at);
        CHECK(d == 0, "%s %s expert %d T=%d: ref linear over blocks differs from the dequantised rows by %.3g at %zu",
              what, dtype_name(qdt), e, T, d, at);
        /* default backend: the op tolerance of tests/test_ops.c (int8 x on the
         * integer decode path) */
        O(fast)->linear(fast, yq, n_out, x, K, T, &Lq);
        int ok = 1;
        for (int t = 0; t < T && ok; t++)
            for (int n = 0; n < n_out && ok; n++) {
                double mag = 0, magq = 0;
                for (int k = 0; k < K; k++) {
                    const double w = fabs(deq[(size_t)n * K + k]);
                    mag += fabs((double)x[(size_t)t * K + k]) * w;
                    magq += w; /* |x| <= 1 here: max|x_block| <= 1 */
                }
                const double lim = 1e-6 * sqrt((double)K) * mag + 1e-6 + magq / 160.0;
                const size_t i = (size_t)t * n_out + n;
                if (!(fabs((double)yq[i] - yf[i]) <= lim)) {
                    ok = 0;
                    CHECK(0, "%s %s expert %d T=%d (%s): y[%d,%d] = %.6g, dequantised rows give %.6g (limit %.3g)",
                          what, dtype_name(qdt), e, T, ops_backend_name(fast), t, n, yq[i], yf[i], lim);
                }
            }
        if (ok) CHECK(1, "fast linear");
        free(x), free(yq), free(yf);
    }
    free(src), free(deq), free(blk);
}

static void check_experts(albedo_model *mref, albedo_model *mq) {
    const md_config *c = &mq->cfg;
    ops_ctx *ref = NULL, *fast = NULL;
    errbuf e;
    CHECK(ops_ctx_new("ref", 1, OPS_F32, &ref, &e) == ALBEDO_OK &&
              ops_ctx_new(NULL, 2, OPS_F32, &fast, &e) == ALBEDO_OK,
          "ops: %s", e.msg);
    int n_checked = 0;
    for (int l = c->moe_start; l < c->n_layers && ref && fast; l++) {
        const txt_block *tq = &mq->w.tb[l], *tr = &mref->w.tb[l];
        if (!tq->moe || tr->exp_fc1_dt != DT_BF16) continue;
        const int I = c->moe_inner;
        /* first, last and a middle expert: offsets grow with e */
        const int es[] = {0, c->moe_experts / 2 + 1, c->moe_experts - 1};
        for (int k = 0; k < 3; k++) {
            const int x = es[k];
            check_slice("fc1 gelu half", tr->exp_fc1, DT_BF16, tq->exp_fc1, tq->exp_fc1_dt, x, 2 * I, 0, I, c->dim, ref,
                        fast);
            check_slice("fc1 gate half", tr->exp_fc1, DT_BF16, tq->exp_fc1, tq->exp_fc1_dt, x, 2 * I, I, I, c->dim, ref,
                        fast);
            check_slice("fc1 (text.c's slice)", tr->exp_fc1, DT_BF16, tq->exp_fc1, tq->exp_fc1_dt, x, 2 * I, 0, 2 * I,
                        c->dim, ref, fast);
            check_slice("fc2", tr->exp_fc2, DT_BF16, tq->exp_fc2, tq->exp_fc2_dt, x, c->dim, 0, c->dim, I, ref, fast);
            n_checked += 4;
        }
    }
    CHECK(n_checked > 0, "no MoE layer to check");
    printf("%s experts: %d slices (fc1 and its halves, fc2; K = %d and %d) match q_quantize_row of the bf16 rows; "
           "linear over them = dequantised rows (ref exact, %s within the op tolerance)\n",
           dtype_name(mq->w.tb[c->n_layers - 1].exp_fc1_dt), n_checked, c->dim, c->moe_inner,
           fast ? ops_backend_name(fast) : "?");
    ops_ctx_free(ref);
    ops_ctx_free(fast);
}

/* Every format on one model: agreement, logits bounds, experts, store.
 *
 * Moondream 3 runs q8 twice. On the default backend (the product's path:
 * decode's gemv_q rounds x to int8 per block, tests/test_ops.c) md3-small
 * loses about one step in a hundred more than md2-small: its logits are
 * more sensitive (first_logits rel L2 of q8 ~3x md2-small's, most of it the
 * attention linears, which md2-small shares) and 10% of its steps have a
 * top-2 margin below 0.1 at a logit RMS of 3. That figure is reported and
 * guarded by a floor; the 97% target is asserted on the `generic` table,
 * whose float32 activations isolate what the block format itself (attention
 * linears, dense MLP and experts) costs. */
static void run_model(const char *label, const char *dir, const char *cases_path, const char *image_dir) {
    json_error_t je;
    json_t *root = json_load_file(cases_path, 0, &je);
    CHECK(root != NULL, "%s: %s", cases_path, je.text);
    if (!root) return;
    json_t *cases = json_object_get(root, "cases");
    albedo_model *mref = load(dir, NULL);
    const int md3 = mref && mref->cfg.md3;
    for (int f = 0; mref && f < 2; f++) {
        static const char *const fmts[] = {"q8", "q4"};
        static const double min_agree[] = {97.0, 85.0}, max_first[] = {0.05, 0.25};
        double wf = 0, mf = 0;
        double pct = run_format(label, dir, fmts[f], NULL, mref, cases, image_dir, &wf, &mf);
        printf("%s %s: teacher-forced top-1 agreement %.2f%% (issue #3 target %.0f%%), first_logits rel L2 worst "
               "%.4f\n",
               label, fmts[f], pct, min_agree[f], wf);
        /* Both targets are asserted on md2-small. md3-small's q4 is
         * reported (about 70%: expert inner width 40, many steps with
         * small margins; docs/QUANT.md). */
        if (!md3)
            CHECK(pct >= min_agree[f], "%s %s: top-1 agreement %.2f%% < %.0f%%", label, fmts[f], pct, min_agree[f]);
        if (f == 0 && md3) {
            CHECK(pct >= 95.0, "%s %s: top-1 agreement %.2f%% < 95%% (default backend floor)", label, fmts[f], pct);
            double wg = 0, mg = 0;
            double pg = run_format(label, dir, fmts[f], "generic", mref, cases, image_dir, &wg, &mg);
            CHECK(pg >= min_agree[f], "%s %s (generic): top-1 agreement %.2f%% < %.0f%%", label, fmts[f], pg,
                  min_agree[f]);
            CHECK(wg <= max_first[f], "%s %s (generic): first_logits rel L2 %.4f > %.2f", label, fmts[f], wg,
                  max_first[f]);
        }
        CHECK(wf <= max_first[f], "%s %s: first_logits rel L2 %.4f > %.2f", label, fmts[f], wf, max_first[f]);
        albedo_model *mq = load(dir, fmts[f]);
        if (mq && mq->cfg.moe_experts) check_experts(mref, mq);
        if (mq) check_store(label, dir, fmts[f], mq);
        albedo_model_free(mq);
    }
    albedo_model_free(mref);
    json_decref(root);
}

int main(void) {
    const char *shared = test_shared_dir();
    char data[2048], cases2[4096], cases3[4096], image_dir[4096], dir2[4096], dir3[4096], tok_path[4096];
    snprintf(data, sizeof data, "%s/tests/data", test_source_dir());
    if (shared) {
        snprintf(cases2, sizeof cases2, "%s/fixtures/reference/md2-small/cases.json", shared);
        snprintf(cases3, sizeof cases3, "%s/fixtures/reference/md3-small/cases.json", shared);
        snprintf(image_dir, sizeof image_dir, "%s/fixtures/images", shared);
        snprintf(dir2, sizeof dir2, "%s/fixtures/models/md2-small", shared);
        snprintf(dir3, sizeof dir3, "%s/fixtures/models/md3-small", shared);
    } else {
        printf(
            "note: ../shared is absent: md2-small and md3-small regenerated from their seeds, cases from tests/data\n");
        snprintf(cases2, sizeof cases2, "%s/md2-small/cases.json", data);
        snprintf(cases3, sizeof cases3, "%s/md3-small/cases.json", data);
        snprintf(image_dir, sizeof image_dir, "%s/images", data);
        snprintf(tok_path, sizeof tok_path, "%s/gpt2.tokenizer.json", ALBEDO_BINARY_DIR);
        char gz[4200];
        snprintf(gz, sizeof gz, "%s/tokenizer/gpt2.tokenizer.json.gz", data);
        CHECK(gunzip(gz, tok_path) == 0, "cannot decompress %s", gz);
        snprintf(dir2, sizeof dir2, "%s/md2-small-gen-q", ALBEDO_BINARY_DIR);
        snprintf(dir3, sizeof dir3, "%s/md3-small-gen-q", ALBEDO_BINARY_DIR);
        CHECK(albedo_synth_write(dir2, "md2-small", 20261127, 0, tok_path) == ALBEDO_OK, "synth: %s",
              albedo_last_error());
        CHECK(albedo_synth_write(dir3, "md3-small", 31337, 0, tok_path) == ALBEDO_OK, "synth: %s", albedo_last_error());
    }
    const char *only = getenv("ALBEDO_TEST_ONLY"); /* "md2" or "md3" while debugging */
    if (!only || !strcmp(only, "md2")) run_model("md2-small", dir2, cases2, image_dir);
    if (!only || !strcmp(only, "md3")) run_model("md3-small", dir3, cases3, image_dir);
    /* Bad names are errors, not silent bf16. */
    albedo_model_params p = albedo_model_params_default();
    p.weights = "q5";
    albedo_model *bad = NULL;
    CHECK(albedo_model_load(dir2, &p, &bad) == ALBEDO_ERR_INVALID_ARGUMENT && !bad, "weights q5 accepted");
    /* fp8 (Moondream 3's experts as e4m3) is the CUDA backend's alone, and
     * Moondream 2 has no experts (tests/cuda/test_md3_cuda.c runs it) */
    p.weights = "fp8";
    albedo_status st = albedo_model_load(dir3, &p, &bad);
    CHECK(st == ALBEDO_ERR_UNSUPPORTED && !bad && strstr(albedo_last_error(), "backend cuda"),
          "weights fp8 on the CPU: status %d: %s", (int)st, albedo_last_error());
    p.backend = "cuda";
    st = albedo_model_load(dir2, &p, &bad);
    CHECK(st == ALBEDO_ERR_UNSUPPORTED && !bad && strstr(albedo_last_error(), "Moondream 2"),
          "weights fp8 on Moondream 2: status %d: %s", (int)st, albedo_last_error());
    TEST_MAIN_END();
}
