/*
 * gpu_runs.h — what the GPU model tests share: a run with its logits rows
 * recorded (top-1, margin, the first row), a copy of a result, and the
 * comparison of a GPU run's fed tokens with the CPU float32 run's within the
 * bf16 tolerance rule of fixtures/README.md; the vision output and the image
 * prefix KV of one image on both; a reference run's tokens fed through
 * another session (teacher_force); every case on two models, first logits
 * and teacher forcing (compare_models); every case as an engine ticket on
 * the GPU (submit_cases, check_engine_cases). Included by one test file each; the includer
 * defines MARGIN and BF16_TOL and includes jansson.h, test.h, test_data.h,
 * session.h, cuda/model_cuda.h and its cases' checks (case_request,
 * check_case_thr: fixture_check.h or md3_cases.h) first.
 */
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a run's logits rows (top-1, margin, the first row) -------------------------- */

typedef struct rows {
    int n;
    float margin[4096];
    int top[4096]; /* each row's argmax */
    float *first;
    int vocab;
} rows;

static void record(void *user, const float *logits, int n) {
    rows *r = user;
    if (r->n == 0 && !r->first) {
        r->first = malloc((size_t)n * sizeof(float));
        if (r->first) memcpy(r->first, logits, (size_t)n * sizeof(float));
        r->vocab = n;
    }
    if (r->n < 4096) {
        float a = -INFINITY, b = -INFINITY;
        int top = 0;
        for (int i = 0; i < n; i++) {
            if (logits[i] > a) {
                b = a;
                a = logits[i];
                top = i;
            } else if (logits[i] > b) {
                b = logits[i];
            }
        }
        r->margin[r->n] = a - b;
        r->top[r->n] = top;
    }
    r->n++;
}

static const albedo_result *run(albedo_session *s, const albedo_request *r, rows *rw, const char *label) {
    const albedo_result *res = NULL;
    s->on_logits = rw ? record : NULL;
    s->on_logits_user = rw;
    albedo_status st = albedo_session_run(s, r, &res);
    s->on_logits = NULL;
    CHECK(st == ALBEDO_OK, "%s: run: %s", label, albedo_session_error(s));
    return st == ALBEDO_OK ? res : NULL;
}

/* Copy what a result holds that the next call on its session overwrites. */
typedef struct kept {
    int n_tokens;
    int32_t tokens[4096];
    char text[8192];
} kept;

static void keep(kept *k, const albedo_result *r) {
    k->n_tokens = r->n_tokens < 4096 ? r->n_tokens : 4096;
    memcpy(k->tokens, r->tokens, (size_t)k->n_tokens * sizeof(int32_t));
    snprintf(k->text, sizeof k->text, "%s", r->text ? r->text : "");
}

/* Caption / plain query: the fed tokens of the GPU run equal the CPU run's
 * up to the first CPU logits row with a margin below MARGIN (row j decides
 * fed token n_prompt + j), and the texts are equal when there is none. */
static void compare_text_runs(const char *label, const kept *cpu, const rows *cpu_rows, const albedo_result *gpu) {
    int lim = INT32_MAX;
    for (int j = 0; j < cpu_rows->n && j < 4096; j++)
        if (cpu_rows->margin[j] < MARGIN) {
            lim = j;
            break;
        }
    const int n_prompt = cpu->n_tokens - (cpu_rows->n - 1);
    int upto = lim == INT32_MAX ? cpu->n_tokens : n_prompt + lim;
    if (upto > cpu->n_tokens) upto = cpu->n_tokens;
    int bad = -1;
    for (int t = 0; t < upto && bad < 0; t++)
        if (t >= gpu->n_tokens || gpu->tokens[t] != cpu->tokens[t]) bad = t;
    CHECK(bad < 0, "%s: fed token %d: gpu %d, cpu f32 %d (compared up to %d of %d)", label, bad,
          bad >= 0 && bad < gpu->n_tokens ? gpu->tokens[bad] : -1, bad >= 0 ? cpu->tokens[bad] : -1, upto,
          cpu->n_tokens);
    if (lim == INT32_MAX) {
        CHECK(gpu->n_tokens == cpu->n_tokens, "%s: %d tokens fed, cpu f32 %d", label, gpu->n_tokens, cpu->n_tokens);
        CHECK(!strcmp(gpu->text, cpu->text), "%s: text\n  gpu '%s'\n  cpu '%s'", label, gpu->text, cpu->text);
    }
}

/* ---- the forked decode graph against one chain -------------------------------------- */

/* A session whose decode graph forks every layer's MLP (Moondream 3's
 * experts too) beside the attention (the default) against one captured with
 * ALBEDO_CUDA_FORK=0 (one chain): the same tokens and every logits row's
 * top-1 and margin equal bit for bit (the fork is designed bit-identical),
 * with n_layers layers forked in the first and none in the second. */
static void check_fork(albedo_model *gm, const char *image_path) {
    const int n_layers = gm->cfg.n_layers;
    albedo_session *sf = NULL, *s1 = NULL;
    CHECK(albedo_session_new(gm, &sf) == ALBEDO_OK, "session: %s", albedo_last_error());
    CHECK(albedo_session_new(gm, &s1) == ALBEDO_OK, "session: %s", albedo_last_error());
    albedo_image *a = NULL, *b = NULL;
    if (sf) CHECK(albedo_image_encode_file(sf, image_path, &a) == ALBEDO_OK, "%s", albedo_session_error(sf));
    if (s1) CHECK(albedo_image_encode_file(s1, image_path, &b) == ALBEDO_OK, "%s", albedo_session_error(s1));
    if (a && b) {
        albedo_request r = albedo_request_default(ALBEDO_SKILL_CAPTION);
        r.temperature = 0;
        r.max_tokens = 40;
        r.ignore_eos = 1;
        r.image = a;
        rows *ra = calloc(1, sizeof *ra), *rb = calloc(1, sizeof *rb);
        static kept kf;
        int used = 0, n_cap = 0;
        const albedo_result *x = run(sf, &r, ra, "forked graph");
        if (x) keep(&kf, x);
        mdc_graph_stats(sf->st.cu, &used, &n_cap);
        const int lf = mdc_fork_layers(sf->st.cu);
        CHECK(used == 1 && n_cap == 1, "forked: decode steps replay one graph (used %d, captured %d: %s)", used, n_cap,
              mdc_graph_error(sf->st.cu));
        CHECK(lf == n_layers, "the decode graph forks all %d layers (forked %d)", n_layers, lf);
        setenv("ALBEDO_CUDA_FORK", "0", 1);
        r.image = b;
        const albedo_result *y = run(s1, &r, rb, "one chain");
        unsetenv("ALBEDO_CUDA_FORK");
        mdc_graph_stats(s1->st.cu, &used, &n_cap);
        const int l1 = mdc_fork_layers(s1->st.cu);
        CHECK(used == 1 && n_cap == 1 && l1 == 0, "ALBEDO_CUDA_FORK=0: one chain (used %d, captured %d, forked %d)",
              used, n_cap, l1);
        if (x && y) {
            CHECK(y->n_tokens == kf.n_tokens && !memcmp(y->tokens, kf.tokens, (size_t)kf.n_tokens * 4),
                  "forked and one-chain graphs feed the same tokens (%d and %d)", kf.n_tokens, y->n_tokens);
            const int n = ra->n < 4096 ? ra->n : 4096;
            int bad = -1;
            for (int j = 0; j < n && bad < 0; j++)
                if (ra->top[j] != rb->top[j] || memcmp(&ra->margin[j], &rb->margin[j], sizeof(float))) bad = j;
            CHECK(ra->n == rb->n && ra->n > 30 && bad < 0,
                  "forked vs one chain: %d and %d logits rows, first differing row %d (margins %.9g, %.9g)", ra->n,
                  rb->n, bad, bad >= 0 ? ra->margin[bad] : 0.0, bad >= 0 ? rb->margin[bad] : 0.0);
            printf("  forked graph (%d layers) vs one chain: %d logits rows, %s\n", lf, ra->n,
                   bad < 0 && ra->n == rb->n ? "bit-identical" : "different");
        }
        free(ra->first), free(ra), free(rb->first), free(rb);
    }
    albedo_image_free(a);
    albedo_image_free(b);
    albedo_session_free(sf);
    albedo_session_free(s1);
}

/* ---- teacher forcing: a reference run's tokens through another session -------------- */

static int argmax_row(const float *v, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

typedef struct tf_count {
    int rows, agree, rows_m, agree_m; /* all rows; rows whose reference margin >= the threshold */
} tf_count;

/* The reference run's fed tokens (kr, its logits rows rr) fed through session
 * f after the prefix of img (f's own encoding of the image) or none; per row
 * whether f's top-1 is the reference's, which it must be wherever the
 * reference margin is >= min_margin. ref names the reference in messages. */
static void teacher_force(albedo_session *f, const albedo_image *img, const kept *kr, const rows *rr, double min_margin,
                          const char *ref, tf_count *tc, const char *label) {
    md_state *st = &f->st;
    const md_config *c = &f->m->cfg;
    const int n_rows = rr->n < 4096 ? rr->n : 4096, n_prompt = kr->n_tokens - (rr->n - 1);
    const int pos0 = img ? c->prefix_attn : 0, n_prefix = img ? c->prefix_attn : 0;
    if (n_prompt < 1 || pos0 + kr->n_tokens > st->max_ctx) return;
    float *emb = malloc((size_t)n_prompt * c->dim * sizeof(float));
    if (!emb) return;
    errbuf e;
    if (img) md_cuda_prefix_load(st, img->dev_kv);
    f->kv_image = 0; /* the session's next run reloads its prefix */
    for (int i = 0; i < n_prompt; i++) text_embed(f->m, kr->tokens[i], emb + (size_t)i * c->dim);
    albedo_status s0 = text_forward(st, emb, n_prompt, pos0, n_prefix, 1, &e);
    CHECK(s0 == ALBEDO_OK, "%s: forced prompt: %s", label, e.msg);
    for (int j = 0; j < n_rows && s0 == ALBEDO_OK; j++) {
        if (j > 0) {
            text_embed(f->m, kr->tokens[n_prompt + j - 1], emb);
            s0 = text_forward(st, emb, 1, pos0 + n_prompt + j - 1, n_prefix, 1, &e);
            CHECK(s0 == ALBEDO_OK, "%s: forced step %d: %s", label, j, e.msg);
            if (s0) break;
        }
        const int ok = argmax_row(st->logits, c->vocab) == rr->top[j];
        tc->rows++, tc->agree += ok;
        if (rr->margin[j] >= min_margin) {
            tc->rows_m++, tc->agree_m += ok;
            CHECK(ok, "%s: teacher-forced row %d: the fp8 top-1 differs where the %s margin is %.3f", label, j, ref,
                  rr->margin[j]);
        }
    }
    free(emb);
}

/* ---- one model against another, case by case ---------------------------------------- */

/* What compare_models asks: its tag in labels ("fp8 kv"), the reference's
 * name in messages ("bf16"), the bound on the first logits' relative L2,
 * the teacher-forcing margin, which cases to teacher-force, and where to
 * keep the other model's tokens and rows per case (NULL: not kept). */
typedef struct pair_spec {
    const char *tag, *ref;
    double logits_tol, margin;
    int (*forced)(json_t *c);
    kept **keep_k;
    rows **keep_r;
    size_t n_keep;
} pair_spec;

typedef struct pair_stats {
    int n_cases, n_ident, n_forced, n_forced_ident;
    double worst_rel, worst_abs, sum_rel;
    tf_count tc;
} pair_stats;

/* Every case on the reference session rs and on a session of model om (each
 * encodes the images itself): the first logits within ps->logits_tol
 * (relative L2), and the reference's tokens fed through om's session for
 * the cases ps->forced picks (teacher_force at ps->margin). The caller
 * asserts the agreement it needs from the returned counts. */
static pair_stats compare_models(albedo_session *rs, albedo_model *om, json_t *cases, const char *image_dir,
                                 const pair_spec *ps) {
    pair_stats st = {0};
    albedo_session *os = NULL;
    CHECK(albedo_session_new(om, &os) == ALBEDO_OK, "%s session: %s", ps->tag, albedo_last_error());
    if (!os) return st;
    const char *cur = NULL;
    albedo_image *ir = NULL, *io = NULL;
    static kept kr;
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        const char *image = json_string_value(json_object_get(c, "image"));
        char label[256], path[4096];
        snprintf(label, sizeof label, "case %zu (%s %s) [%s]", i, image ? image : "text-only",
                 json_string_value(json_object_get(c, "task")), ps->tag);
        if (image && (!cur || strcmp(cur, image))) {
            albedo_image_free(ir), albedo_image_free(io);
            ir = io = NULL;
            cur = image;
            snprintf(path, sizeof path, "%s/%s", image_dir, image);
            CHECK(albedo_image_encode_file(rs, path, &ir) == ALBEDO_OK, "%s: %s", label, albedo_session_error(rs));
            CHECK(albedo_image_encode_file(os, path, &io) == ALBEDO_OK, "%s: %s", label, albedo_session_error(os));
        }
        if (image && (!ir || !io)) continue;
        albedo_spatial_ref refs[16];
        albedo_request r = case_request(c, refs);
        r.image = image ? ir : NULL;
        rows *rr = calloc(1, sizeof *rr), *ro = calloc(1, sizeof *ro);
        const albedo_result *res = rr && ro ? run(rs, &r, rr, label) : NULL;
        if (res) keep(&kr, res);
        r.image = image ? io : NULL;
        const albedo_result *rt = res ? run(os, &r, ro, label) : NULL;
        if (rt && rr->first && ro->first) {
            st.n_cases++;
            const int same = rt->n_tokens == kr.n_tokens && !memcmp(rt->tokens, kr.tokens, (size_t)kr.n_tokens * 4);
            st.n_ident += same;
            double d = 0;
            for (int k = 0; k < rr->vocab; k++) {
                const double a = fabs((double)rr->first[k] - ro->first[k]);
                if (a > d) d = a;
            }
            const double rel = rel_l2(ro->first, rr->first, (size_t)rr->vocab);
            st.sum_rel += rel;
            if (rel > st.worst_rel) st.worst_rel = rel;
            if (d > st.worst_abs) st.worst_abs = d;
            printf("  %-48s first logits vs %s: rel L2 %.2e, max abs %.3f; %d/%d tokens%s\n", label, ps->ref, rel, d,
                   rt->n_tokens, kr.n_tokens, same ? " (identical)" : "");
            CHECK(rel <= ps->logits_tol, "%s: first logits rel L2 %.3g > %g", label, rel, ps->logits_tol);
            if (ps->keep_k && i < ps->n_keep && (ps->keep_k[i] = malloc(sizeof(kept)))) {
                keep(ps->keep_k[i], rt);
                ps->keep_r[i] = ro, ro = NULL;
            }
            if (ps->forced(c)) {
                st.n_forced++, st.n_forced_ident += same;
                teacher_force(os, image ? io : NULL, &kr, rr, ps->margin, ps->ref, &st.tc, label);
            }
        }
        if (rr) free(rr->first);
        if (ro) free(ro->first);
        free(rr), free(ro);
    }
    CHECK(st.n_cases == (int)json_array_size(cases), "%s: %d of %zu cases ran", ps->tag, st.n_cases,
          json_array_size(cases));
    albedo_image_free(ir), albedo_image_free(io);
    albedo_session_free(os);
    return st;
}

/* ---- stages of one image ------------------------------------------------------------- */

static void check_vision(albedo_session *cpu, albedo_session *gpu, const char *path, const char *label) {
    const albedo_model *m = cpu->m;
    const md_config *c = &m->cfg;
    const int np = c->prefix_attn - 1;
    img_rgb im = {0};
    img_crops cr = {0};
    errbuf e;
    CHECK(img_load_file(path, &m->limits, &im, &e) == ALBEDO_OK, "%s: %s", label, e.msg);
    if (!im.px) return;
    CHECK(img_make_crops(&im, c->crop_size, c->patch, c->overlap_margin, c->max_crops, &cr, &e) == ALBEDO_OK,
          "%s: crops: %s", label, e.msg);
    const size_t ne = (size_t)cr.n * np * c->enc_dim, nm = (size_t)np * c->dim;
    float *enc_c = malloc(ne * sizeof(float)), *enc_g = malloc(ne * sizeof(float));
    float *emb_c = malloc(nm * sizeof(float)), *emb_g = malloc(nm * sizeof(float));
    if (cr.px && enc_c && enc_g && emb_c && emb_g) {
        for (size_t i = 0; i < ne; i++) enc_g[i] = NAN;
        for (size_t i = 0; i < nm; i++) emb_g[i] = NAN;
        CHECK(vision_encode(&cpu->st, &cr, emb_c, enc_c, &e) == ALBEDO_OK, "%s: cpu vision: %s", label, e.msg);
        CHECK(vision_encode(&gpu->st, &cr, emb_g, enc_g, &e) == ALBEDO_OK, "%s: gpu vision: %s", label, e.msg);
        const double r_enc = rel_l2(enc_g, enc_c, ne), r_emb = rel_l2(emb_g, emb_c, nm);
        printf("  %-28s %2d crops: encoder out rel L2 %.2e, img_emb rel L2 %.2e\n", label, cr.n, r_enc, r_emb);
        CHECK(r_enc <= BF16_TOL, "%s: encoder output rel L2 %.3g > %g", label, r_enc, BF16_TOL);
        CHECK(r_emb <= BF16_TOL, "%s: img_emb rel L2 %.3g > %g", label, r_emb, BF16_TOL);
    }
    free(enc_c), free(enc_g), free(emb_c), free(emb_g);
    img_crops_free(&cr);
    img_free(&im);
}

/* The prefix KV the GPU session holds right after encoding against the CPU
 * image's: keys after rotary (and, in Moondream 3, values after tau). */
static void check_prefix(albedo_session *gpu, const albedo_image *img_c, const char *label) {
    const md_config *c = &gpu->m->cfg;
    const int n_pos = img_c->n_pos, kvd = c->n_kv_heads * c->head_dim;
    float *k = malloc((size_t)n_pos * kvd * sizeof(float)), *v = malloc((size_t)n_pos * kvd * sizeof(float));
    float *kc = malloc((size_t)n_pos * kvd * sizeof(float)), *vc = malloc((size_t)n_pos * kvd * sizeof(float));
    double worst = 0;
    errbuf e;
    for (int l = 0; l < c->n_layers && k && v && kc && vc; l++) {
        CHECK(mdc_kv_download(gpu->st.cu, l, n_pos, k, v, &e) == ALBEDO_OK, "%s: %s", label, e.msg);
        for (size_t i = 0; i < (size_t)n_pos * kvd; i++) {
            kc[i] = kv_get(img_c->k[l], img_c->m->kv_dt, i);
            vc[i] = kv_get(img_c->v[l], img_c->m->kv_dt, i);
        }
        const double rk = rel_l2(k, kc, (size_t)n_pos * kvd), rv = rel_l2(v, vc, (size_t)n_pos * kvd);
        CHECK(rk <= BF16_TOL && rv <= BF16_TOL, "%s: prefix layer %d: k rel L2 %.3g, v %.3g > %g", label, l, rk, rv,
              BF16_TOL);
        if (rk > worst) worst = rk;
        if (rv > worst) worst = rv;
    }
    printf("  %-28s prefix KV (%d positions) worst layer rel L2 %.2e\n", label, n_pos, worst);
    free(k), free(v), free(kc), free(vc);
}

/* ---- the engine on the GPU ----------------------------------------------------------------- */

static unsigned char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *b = len > 0 ? malloc((size_t)len) : NULL;
    if (b && fread(b, 1, (size_t)len, f) != (size_t)len) free(b), b = NULL;
    fclose(f);
    *n = b ? (size_t)len : 0;
    return b;
}

/* The first n cases submitted to E at once, image bytes in (tag marks the
 * messages); the tickets and the requests' spatial refs they point into. */
typedef struct engine_tickets {
    albedo_ticket **t;
    albedo_spatial_ref (*refs)[16];
    size_t n;
} engine_tickets;

static engine_tickets submit_cases(albedo_engine *E, json_t *cases, size_t n, const char *image_dir, const char *tag) {
    engine_tickets et = {calloc(n, sizeof(albedo_ticket *)), calloc(n, sizeof *et.refs), n};
    for (size_t i = 0; i < n && et.t && et.refs; i++) {
        json_t *c = json_array_get(cases, i);
        const char *image = json_string_value(json_object_get(c, "image"));
        albedo_request r = case_request(c, et.refs[i]);
        r.image = NULL;
        unsigned char *bytes = NULL;
        size_t len = 0;
        if (image) {
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", image_dir, image);
            bytes = read_all(path, &len);
            CHECK(bytes != NULL, "read %s", path);
        }
        CHECK(albedo_engine_submit(E, &r, bytes, len, NULL, &et.t[i]) == ALBEDO_OK, "%scase %zu: submit: %s", tag, i,
              albedo_last_error());
        free(bytes);
    }
    if (!et.t || !et.refs) {
        CHECK(0, "%sout of memory for %zu tickets", tag, n);
        free(et.t), free(et.refs);
        et.t = NULL, et.n = 0;
    }
    return et;
}

static void tickets_free(engine_tickets *et) {
    for (size_t i = 0; et->t && i < et->n; i++) albedo_ticket_free(et->t[i]);
    free(et->t), free(et->refs);
    et->t = NULL;
    et->refs = NULL;
}

/* Every case as an engine ticket (image bytes in, prefix built by the image
 * worker on the device, K/V in the device pool), all submitted at once so
 * that up to max_batch run together (prompt chunks beside decode rows) and
 * later cases of an image fork its cached prefix: each must pass the
 * reference check at MARGIN, and those text_task accepts must feed the CPU
 * float32 run's tokens (cpu_k[i], cpu_r[i], where not NULL) as the session
 * runs do. With graphs (ALBEDO_CUDA_GRAPH unset) some decode steps must
 * replay a graph; with ALBEDO_CUDA_GRAPH=0 none. Decode steps fork their
 * MLP beside the attention (eager or replayed) unless ALBEDO_CUDA_FORK=0.
 * keep_out (n entries, or NULL): each case's result kept, for
 * compare_engine_runs. */
static void check_engine_cases(albedo_model *gm, json_t *cases, const char *image_dir, int max_batch, size_t kv_bytes,
                               kept *const *cpu_k, rows *const *cpu_r, size_t n_cpu, int (*text_task)(json_t *),
                               kept **keep_out) {
    albedo_engine_params ep = albedo_engine_params_default();
    ep.max_batch = max_batch;
    ep.kv_bytes = kv_bytes;
    ep.max_queue = (int)json_array_size(cases) + 1;
    albedo_engine *E = NULL;
    CHECK(albedo_engine_new(gm, &ep, &E) == ALBEDO_OK, "engine: %s", albedo_last_error());
    if (!E) return;
    const size_t n = json_array_size(cases);
    engine_tickets et = submit_cases(E, cases, n, image_dir, "");
    albedo_ticket **t = et.t;
    int n_ok = 0, n_same = 0;
    const long picks0 = mdc_device_picks(), graphs0 = mdc_paged_graph_steps(), forks0 = mdc_paged_fork_steps();
    for (size_t i = 0; i < n && t; i++) {
        if (!t[i]) continue;
        json_t *c = json_array_get(cases, i);
        const char *image = json_string_value(json_object_get(c, "image"));
        char label[300];
        snprintf(label, sizeof label, "case %zu (%s %s) [cuda engine, batch %d]", i, image ? image : "text-only",
                 json_string_value(json_object_get(c, "task")), max_batch);
        const albedo_result *res = NULL;
        albedo_status st = albedo_ticket_wait(t[i], &res);
        CHECK(st == ALBEDO_OK, "%s: %s", label, albedo_ticket_error(t[i]));
        if (st || !res) continue;
        n_ok++;
        if (keep_out && (keep_out[i] = calloc(1, sizeof(kept)))) keep(keep_out[i], res);
        check_case_thr(label, c, res, MARGIN);
        const kept *k = i < n_cpu ? cpu_k[i] : NULL;
        const rows *rw = i < n_cpu ? cpu_r[i] : NULL;
        if (k && rw && text_task(c)) compare_text_runs(label, k, rw, res);
        n_same += k && res->n_tokens == k->n_tokens && !memcmp(res->tokens, k->tokens, (size_t)res->n_tokens * 4);
    }
    albedo_engine_stats es;
    albedo_engine_get_stats(E, &es);
    const long picks = mdc_device_picks() - picks0, graphs = mdc_paged_graph_steps() - graphs0;
    const long forks = mdc_paged_fork_steps() - forks0;
    const char *genv = getenv("ALBEDO_CUDA_GRAPH"), *fenv = getenv("ALBEDO_CUDA_FORK");
    const int want_graphs = !(genv && genv[0] == '0'), want_forks = !(fenv && fenv[0] == '0');
    printf("  engine batch %d: %d/%zu cases done, %d fed exactly the cpu f32 tokens; %llu steps, %.2f sequences a "
           "step; prefix hits %llu, misses %llu; %ld tokens picked on the device; %ld steps replayed a graph, %ld "
           "forked\n",
           max_batch, n_ok, n, n_same, (unsigned long long)es.steps,
           es.steps ? (double)es.step_sequences / es.steps : 0.0, (unsigned long long)es.prefix_hits,
           (unsigned long long)es.prefix_misses, picks, graphs, forks);
    CHECK(n_ok == (int)n, "engine batch %d: %d of %zu cases done", max_batch, n_ok, n);
    CHECK(picks > 0, "the engine's decode steps pick on the device");
    CHECK(want_graphs ? graphs > 0 : graphs == 0, "decode steps replay graphs only when allowed (%ld, graphs %s)",
          graphs, want_graphs ? "on" : "off");
    CHECK(want_forks ? forks > 0 : forks == 0, "decode steps fork only when allowed (%ld, ALBEDO_CUDA_FORK %s)", forks,
          fenv ? fenv : "unset");
    CHECK(es.prefix_hits > 0, "later cases of an image fork its cached prefix (hits %llu)",
          (unsigned long long)es.prefix_hits);
    if (max_batch > 1) CHECK(es.step_sequences > es.steps, "steps batch several sequences");
    int n_free = 0, n_total = 0;
    engine_debug_blocks(E, 1, &n_free, &n_total);
    CHECK(n_free == n_total, "every KV block is back in the device pool (%d of %d free)", n_free, n_total);
    tickets_free(&et);
    albedo_engine_free(E);
}

/* Two engine runs of the same n cases (check_engine_cases' keep_out) fed the
 * same tokens in every case: the forked decode steps against one chain at
 * batch 1, where each step's GEMVs make the fork bit-identical. Frees both. */
static void compare_engine_runs(const char *label, kept **a, kept **b, size_t n) {
    int n_same = 0, n_cmp = 0;
    for (size_t i = 0; i < n; i++) {
        if (a[i] && b[i]) {
            n_cmp++;
            const int same = a[i]->n_tokens == b[i]->n_tokens &&
                             !memcmp(a[i]->tokens, b[i]->tokens, (size_t)a[i]->n_tokens * sizeof(int32_t));
            CHECK(same, "%s: case %zu fed %d and %d tokens, not the same", label, i, a[i]->n_tokens, b[i]->n_tokens);
            n_same += same;
        }
        free(a[i]), free(b[i]);
        a[i] = b[i] = NULL;
    }
    CHECK(n_cmp == (int)n, "%s: %d of %zu cases in both runs", label, n_cmp, n);
    printf("  %s: %d of %d cases identical\n", label, n_same, n_cmp);
}
