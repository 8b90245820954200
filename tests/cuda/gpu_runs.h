/*
 * gpu_runs.h — what the GPU model tests share: a run with its logits rows
 * recorded (top-1, margin, the first row), a copy of a result, and the
 * comparison of a GPU run's fed tokens with the CPU float32 run's within the
 * bf16 tolerance rule of fixtures/README.md; the vision output and the image
 * prefix KV of one image on both. Included by one test file each; the
 * includer defines MARGIN and BF16_TOL and includes test.h, test_data.h,
 * session.h and cuda/model_cuda.h first.
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
