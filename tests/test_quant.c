/*
 * test_quant.c — quality of the quantised text weights (docs/QUANT.md) on
 * md2-small, against the engine's own float32 path.
 *
 * Teacher-forced: every fixture case runs through the generation loop of
 * the float32 session, whose forward passes (gen_io) also run the same
 * embeddings through a session of the q8 (q4) model at the same positions.
 * The float32 argmax decides every fed token, so both see the same inputs;
 * at each step with logits the two argmaxes are compared.
 *
 *   agreement  top-1 agreement over all steps of all cases:
 *              q8 >= 97% asserted; q4 reported (target 85%, not met yet)
 *   logits     relative L2 error of each case's first logits row (reported;
 *              q8 <= 5%, q4 <= 25% asserted as sanity bounds)
 *   prefix     relative L2 error of the image prefix's KV cache (reported)
 *   img_emb    the vision encoder keeps 16-bit weights in every format, so
 *              img_emb is the float32 path's exactly; checked through the
 *              bound weight pointers.
 *   store      `albedo quantize` (albedo_model_quantize) output loads with
 *              the linears mapped as DT_Q8/DT_Q4 and gives bit-identical
 *              first logits to load-time quantisation.
 *
 * md2-small's weights are seeded random: logits margins are often small
 * (fixture logit_margins: many below 0.1), which makes top-1 agreement a
 * harder test than on a trained model.
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <math.h>
#include <zlib.h>

#include "session.h"
#include "test.h"
#include "fixture_check.h"

static double rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

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
    const size_t kvd = (size_t)c->n_kv_heads * c->head_dim;
    for (int l = 0; l < c->n_layers; l++) {
        memcpy(s->st.k_cache[l], img->k[l], (size_t)img->n_pos * kvd * sizeof(float));
        memcpy(s->st.v_cache[l], img->v[l], (size_t)img->n_pos * kvd * sizeof(float));
    }
    s->kv_image = 0;
}

static double prefix_rel(const albedo_model *m, const albedo_image *a, const albedo_image *b) {
    const md_config *c = &m->cfg;
    const size_t n = (size_t)a->n_pos * c->n_kv_heads * c->head_dim;
    double num = 0, den = 0;
    for (int l = 0; l < c->n_layers; l++)
        for (size_t i = 0; i < n; i++) {
            double dk = (double)b->k[l][i] - a->k[l][i], dv = (double)b->v[l][i] - a->v[l][i];
            num += dk * dk + dv * dv;
            den += (double)a->k[l][i] * a->k[l][i] + (double)a->v[l][i] * a->v[l][i];
        }
    return sqrt(num / (den > 0 ? den : 1));
}

static albedo_model *load(const char *dir, const char *weights) {
    albedo_model_params p = albedo_model_params_default();
    p.n_threads = 2;
    p.weights = weights;
    albedo_model *m = NULL;
    CHECK(albedo_model_load(dir, &p, &m) == ALBEDO_OK, "load %s (%s): %s", dir, weights ? weights : "bf16",
          albedo_last_error());
    return m;
}

/* Run every case teacher-forced on (ref, q); returns the agreement in %. */
static double run_format(const char *dir, const char *fmt, albedo_model *mref, json_t *cases, const char *image_dir,
                         double *worst_first, double *mean_first) {
    albedo_model *mq = load(dir, fmt);
    if (!mq) return -1;
    dtype want = !strcmp(fmt, "q8") ? DT_Q8 : DT_Q4;
    CHECK(mq->w.tb[0].qkv.dt == want && mq->w.tb[0].fc2.dt == want, "%s: text linears not converted", fmt);
    int vis_same = mq->w.proj_fc1.dt == mref->w.proj_fc1.dt && mq->w.proj_fc2.dt == mref->w.proj_fc2.dt &&
                   mq->w.patch_emb.dt == mref->w.patch_emb.dt;
    for (int l = 0; l < mq->cfg.enc_layers; l++) {
        const vit_block *a = &mq->w.vb[l], *b = &mref->w.vb[l];
        vis_same &= a->qkv.dt == b->qkv.dt && a->proj.dt == b->proj.dt && a->fc1.dt == b->fc1.dt && a->fc2.dt == b->fc2.dt;
    }
    CHECK(vis_same && mq->w.lm_head.dt == mref->w.lm_head.dt,
          "%s: vision and LM head weights must stay as stored (img_emb identical)", fmt);
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
            CHECK(albedo_image_encode_file(sr, path, &ir) == ALBEDO_OK, "encode %s: %s", image, albedo_session_error(sr));
            CHECK(albedo_image_encode_file(sq, path, &iq) == ALBEDO_OK, "encode %s: %s", image, albedo_session_error(sq));
            if (ir && iq) {
                double r = prefix_rel(mref, ir, iq);
                if (r > wp) wp = r;
            }
        }
        if (image && (!ir || !iq)) continue;
        albedo_spatial_ref refs[16];
        albedo_request r = case_request(c, refs);
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
    printf("%s: %d cases, top-1 agreement %d/%d steps = %.2f%%; first_logits rel L2 mean %.4f worst %.4f; "
           "image prefix KV rel L2 worst %.4f; img_emb rel L2 0 (vision weights shared)\n",
           fmt, n_case, p.agree, p.steps, pct, *mean_first, wf, wp);
    albedo_image_free(ir), albedo_image_free(iq);
    albedo_session_free(sr), albedo_session_free(sq);
    albedo_model_free(mq);
    return pct;
}

/* First logits of a text-only query on model m. */
static int first_logits(albedo_model *m, float *out) {
    albedo_session *s = NULL;
    if (albedo_session_new(m, &s) != ALBEDO_OK) return -1;
    albedo_request r = albedo_request_default(ALBEDO_SKILL_QUERY);
    r.question = "What is this?";
    r.max_tokens = 1;
    r.temperature = 0;
    const albedo_result *res = NULL;
    int rc = albedo_session_run(s, &r, &res) == ALBEDO_OK ? 0 : -1;
    /* The state's logits after a one-token answer are the last row run:
     * the prompt's last position. */
    memcpy(out, s->st.logits, (size_t)m->cfg.vocab * sizeof(float));
    albedo_session_free(s);
    return rc;
}

static void check_store(const char *dir, const char *fmt, albedo_model *mload) {
    char out[4096];
    snprintf(out, sizeof out, "%s/md2-small-%s", ALBEDO_BINARY_DIR, fmt);
    albedo_model_params p = albedo_model_params_default();
    p.n_threads = 2;
    p.weights = fmt;
    CHECK(albedo_model_quantize(dir, &p, out) == ALBEDO_OK, "quantize %s: %s", fmt, albedo_last_error());
    albedo_model *ms = load(out, NULL); /* stored format, no conversion */
    if (!ms) return;
    dtype want = !strcmp(fmt, "q8") ? DT_Q8 : DT_Q4;
    CHECK(ms->w.tb[0].qkv.dt == want && ms->w.quant_mem == NULL, "%s: stored linears not mapped as blocks", fmt);
    const int V = ms->cfg.vocab;
    float *a = malloc((size_t)V * sizeof *a), *b = malloc((size_t)V * sizeof *b);
    CHECK(first_logits(ms, a) == 0 && first_logits(mload, b) == 0, "first logits: %s", albedo_last_error());
    CHECK(memcmp(a, b, (size_t)V * sizeof *a) == 0, "%s: stored and load-time quantisation differ (rel L2 %.3g)", fmt,
          rel_l2(a, b, (size_t)V));
    printf("%s: albedo quantize -> %s loads mapped, logits identical to load-time quantisation\n", fmt, out);
    free(a), free(b);
    albedo_model_free(ms);
}

static int gunzip(const char *src, const char *dst) {
    gzFile in = gzopen(src, "rb");
    FILE *out = fopen(dst, "wb");
    int ok = in && out;
    char chunk[65536];
    int n;
    while (ok && (n = gzread(in, chunk, sizeof chunk)) > 0) ok = fwrite(chunk, 1, (size_t)n, out) == (size_t)n;
    if (in) gzclose(in);
    if (out && fclose(out)) ok = 0;
    return ok ? 0 : -1;
}

int main(void) {
    const char *shared = test_shared_dir();
    char data[2048], cases_path[4096], image_dir[4096], dir[4096], tok_path[4096];
    snprintf(data, sizeof data, "%s/tests/data", test_source_dir());
    if (shared) {
        snprintf(cases_path, sizeof cases_path, "%s/fixtures/reference/md2-small/cases.json", shared);
        snprintf(image_dir, sizeof image_dir, "%s/fixtures/images", shared);
        snprintf(dir, sizeof dir, "%s/fixtures/models/md2-small", shared);
    } else {
        printf("note: ../shared is absent: md2-small regenerated from its seed, cases from tests/data\n");
        snprintf(cases_path, sizeof cases_path, "%s/md2-small/cases.json", data);
        snprintf(image_dir, sizeof image_dir, "%s/images", data);
        snprintf(tok_path, sizeof tok_path, "%s/gpt2.tokenizer.json", ALBEDO_BINARY_DIR);
        char gz[4200];
        snprintf(gz, sizeof gz, "%s/tokenizer/gpt2.tokenizer.json.gz", data);
        CHECK(gunzip(gz, tok_path) == 0, "cannot decompress %s", gz);
        snprintf(dir, sizeof dir, "%s/md2-small-gen-q", ALBEDO_BINARY_DIR);
        CHECK(albedo_synth_write(dir, "md2-small", 20261127, 0, tok_path) == ALBEDO_OK, "synth: %s", albedo_last_error());
    }
    json_error_t je;
    json_t *root = json_load_file(cases_path, 0, &je);
    CHECK(root != NULL, "%s: %s", cases_path, je.text);
    if (!root) TEST_MAIN_END();
    json_t *cases = json_object_get(root, "cases");
    albedo_model *mref = load(dir, NULL);
    if (mref) {
        static const char *const fmts[] = {"q8", "q4"};
        static const double min_agree[] = {97.0, 85.0}, max_first[] = {0.05, 0.25};
        for (int f = 0; f < 2; f++) {
            double wf = 0, mf = 0;
            double pct = run_format(dir, fmts[f], mref, cases, image_dir, &wf, &mf);
            printf("%s: teacher-forced top-1 agreement %.2f%% (issue #3 target %.0f%%), first_logits rel L2 worst %.4f\n",
                   fmts[f], pct, min_agree[f], wf);
            /* Q8 meets its target and is asserted. Q4 does not yet reach 85%
             * on md2-small (83.2%: uniform random weights, 32-weight blocks;
             * docs/QUANT.md): its quality is reported, not claimed, until a
             * richer 4-bit format lands (issue #3 stays open for it). */
            if (f == 0) CHECK(pct >= min_agree[f], "%s: top-1 agreement %.2f%% < %.0f%%", fmts[f], pct, min_agree[f]);
            CHECK(wf <= max_first[f], "%s: first_logits rel L2 %.4f > %.2f", fmts[f], wf, max_first[f]);
            albedo_model *mq = load(dir, fmts[f]);
            if (mq) check_store(dir, fmts[f], mq);
            albedo_model_free(mq);
        }
        /* Bad names are errors, not silent bf16. */
        albedo_model_params p = albedo_model_params_default();
        p.weights = "q5";
        albedo_model *bad = NULL;
        CHECK(albedo_model_load(dir, &p, &bad) == ALBEDO_ERR_INVALID_ARGUMENT && !bad, "weights q5 accepted");
    }
    albedo_model_free(mref);
    json_decref(root);
    TEST_MAIN_END();
}
