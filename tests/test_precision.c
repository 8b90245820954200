/*
 * test_precision.c — the BF16 path (--precision bf16: bf16 products, bf16 KV
 * cache) against the tolerances fixtures/README.md states for it, on
 * md2-small and md3-small:
 *
 *   img_emb   relative L2 error against the engine's float32 path <= 2e-2,
 *             for every fixture image (own decode, resize and crops);
 *   cases     every fixture case, greedy, gives the reference output up to
 *             the first step whose reference margin is below 0.1
 *             (fixture_check.h; the float32 path meets 1e-3 in test_model).
 *
 * Without ../shared the models are regenerated from their seeds and the
 * cases come from tests/data (as test_model.c and test_md3.c do).
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <math.h>
#include <zlib.h>

#include "session.h"
#include "test.h"
#include "test_data.h"
#include "fixture_check.h"

static albedo_model *load(const char *dir, albedo_precision prec) {
    albedo_model_params p = albedo_model_params_default();
    p.n_threads = 2;
    p.precision = prec;
    albedo_model *m = NULL;
    CHECK(albedo_model_load(dir, &p, &m) == ALBEDO_OK, "load %s: %s", dir, albedo_last_error());
    return m;
}

/* img_emb of an image file through model m's own decode, crops and vision. */
static float *img_emb(albedo_model *m, const char *path) {
    const md_config *c = &m->cfg;
    errbuf e = {{0}};
    img_rgb im = {0};
    img_crops cr = {0};
    md_state s;
    float *emb = NULL;
    if (md_state_init(&s, m, &e)) {
        CHECK(0, "state: %s", e.msg);
        return NULL;
    }
    if (img_load_file(path, &m->limits, &im, &e) ||
        img_make_crops(&im, c->crop_size, c->patch, c->overlap_margin, c->max_crops, &cr, &e)) {
        CHECK(0, "%s: %s", path, e.msg);
    } else if ((emb = malloc((size_t)(c->prefix_attn - 1) * c->dim * sizeof(float)))) {
        CHECK(vision_encode(&s, &cr, emb, NULL, &e) == ALBEDO_OK, "%s: vision: %s", path, e.msg);
    }
    img_crops_free(&cr);
    free(im.px);
    md_state_free(&s);
    return emb;
}

static void run_model(const char *label, const char *dir, json_t *cases, const char *image_dir) {
    albedo_model *mf = load(dir, ALBEDO_PRECISION_F32), *mb = load(dir, ALBEDO_PRECISION_BF16);
    albedo_session *s = NULL;
    if (!mf || !mb || albedo_session_new(mb, &s) != ALBEDO_OK) {
        CHECK(0, "%s: models or session: %s", label, albedo_last_error());
        albedo_model_free(mf), albedo_model_free(mb);
        return;
    }
    CHECK(mb->kv_dt == DT_BF16 && mf->kv_dt == DT_F32, "%s: KV cache dtypes", label);
    const md_config *c = &mf->cfg;
    const size_t n_emb = (size_t)(c->prefix_attn - 1) * c->dim;
    double worst_emb = 0;
    const char *cur = NULL;
    albedo_image *img = NULL;
    int n_case = 0;
    size_t i;
    json_t *cs;
    json_array_foreach(cases, i, cs) {
        const char *image = json_string_value(json_object_get(cs, "image"));
        char path[4096];
        if (image && (!cur || strcmp(cur, image))) {
            albedo_image_free(img);
            img = NULL;
            cur = image;
            snprintf(path, sizeof path, "%s/%s", image_dir, image);
            float *ef = img_emb(mf, path), *eb = img_emb(mb, path);
            if (ef && eb) {
                const double r = rel_l2(eb, ef, n_emb);
                CHECK(r <= 2e-2, "%s %s: bf16 img_emb relative L2 %.3g > 2e-2", label, image, r);
                if (r > worst_emb) worst_emb = r;
            }
            free(ef), free(eb);
            CHECK(albedo_image_encode_file(s, path, &img) == ALBEDO_OK, "%s: encode %s: %s", label, image,
                  albedo_session_error(s));
        }
        if (image && !img) continue;
        albedo_spatial_ref refs[16];
        albedo_request r = case_request(cs, refs);
        /* The Moondream 3 reference's text-only query reasoned by default
         * (tests/test_md3.c): its output shows it. */
        if (c->md3 && json_object_get(json_object_get(cs, "output"), "reasoning")) r.reasoning = 1;
        r.image = image ? img : NULL;
        const albedo_result *res = NULL;
        albedo_status st = albedo_session_run(s, &r, &res);
        char what[256];
        snprintf(what, sizeof what, "%s bf16 case %zu", label, i);
        CHECK(st == ALBEDO_OK, "%s: %s", what, albedo_session_error(s));
        if (st == ALBEDO_OK) check_case_thr(what, cs, res, 0.1);
        n_case++;
    }
    printf("%s bf16: %d cases checked to margin 0.1; img_emb relative L2 worst %.4f (limit 2e-2)\n", label, n_case,
           worst_emb);
    albedo_image_free(img);
    albedo_session_free(s);
    albedo_model_free(mf), albedo_model_free(mb);
}

int main(void) {
    small_models sm;
    if (small_models_make(&sm, "precision")) TEST_MAIN_END();
    const char *image_dir = sm.image_dir, *gen2 = sm.model2, *gen3 = sm.model3;
    json_t *r2 = load_cases(sm.cases2), *r3 = load_cases(sm.cases3);
    if (r2) run_model("md2-small", gen2, json_object_get(r2, "cases"), image_dir);
    if (r3) run_model("md3-small", gen3, json_object_get(r3, "cases"), image_dir);
    json_decref(r2), json_decref(r3);
    TEST_MAIN_END();
}
