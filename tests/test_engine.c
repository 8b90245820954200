/*
 * test_engine.c — the asynchronous engine (scheduler.c) against the same
 * reference outputs as test_model.c, plus its scheduling contracts:
 *
 *   fixtures   every md2-small case, twice, submitted at once in shuffled
 *              order, max_batch 4, a KV budget small enough to force queueing
 *              and prefix eviction: every result equals the reference (same
 *              margin rules as test_model.c), no KV block leaks
 *   prefix     a second request on the same image bytes reuses the prefix
 *              (cached_tokens = 730)
 *   cancel     cancelling a queued and a running request frees every block
 *   limits     max_queue → ALBEDO_ERR_LIMIT at submit; bad requests rejected
 *   fairness   equal requests at max_batch 1 end in submission order
 *
 * Without ../shared: cases and images from tests/data, the model that
 * test_model regenerates in the build directory (md2-small-gen).
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <pthread.h>
#include <time.h>

#include "kvcache.h"
#include "session.h"
#include "test.h"
#include "fixture_check.h"

typedef struct blob {
    uint8_t *p;
    size_t n;
} blob;

static blob read_all(const char *path) {
    blob b = {0};
    FILE *f = fopen(path, "rb");
    if (!f) return b;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (n > 0 && (b.p = malloc((size_t)n)) && fread(b.p, 1, (size_t)n, f) == (size_t)n) b.n = (size_t)n;
    fclose(f);
    return b;
}

static size_t block_bytes(const albedo_model *m, int block) {
    const md_config *c = &m->cfg;
    return kv_block_bytes(c->n_layers, c->n_kv_heads * c->head_dim, block);
}

static void check_no_leak(albedo_engine *e, const char *what) {
    int n_free = 0, n_total = 0;
    engine_debug_blocks(e, 1, &n_free, &n_total);
    CHECK(n_free == n_total, "%s: %d of %d KV blocks free after every request ended", what, n_free, n_total);
}

/* ---- every fixture case, twice, shuffled, under memory pressure ------------------- */

#define MAX_JOBS 256

static void test_fixtures(albedo_model *m, json_t *cases, const char *image_dir) {
    const int n_cases = (int)json_array_size(cases);
    blob images[64] = {{0}};
    const char *names[64];
    int n_images = 0;
    albedo_engine_params ep = albedo_engine_params_default();
    ep.max_batch = 4;
    ep.block_size = 16;
    /* About two and a half requests' worth of blocks (each needs ~52 with
     * its 730-position prefix): requests queue and prefixes are evicted. */
    ep.kv_bytes = block_bytes(m, ep.block_size) * 130;
    ep.n_threads = 2;
    albedo_engine *e = NULL;
    CHECK(albedo_engine_new(m, &ep, &e) == ALBEDO_OK, "engine: %s", albedo_last_error());
    if (!e) return;

    int order[MAX_JOBS], n_jobs = 0;
    for (int rep = 0; rep < 2; rep++)
        for (int i = 0; i < n_cases && n_jobs < MAX_JOBS; i++) order[n_jobs++] = i;
    uint64_t rng = 20261127;
    for (int i = n_jobs - 1; i > 0; i--) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        int j = (int)((rng >> 33) % (uint64_t)(i + 1));
        int t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    albedo_ticket *tk[MAX_JOBS] = {0};
    albedo_spatial_ref refs[MAX_JOBS][16];
    for (int k = 0; k < n_jobs; k++) {
        json_t *c = json_array_get(cases, (size_t)order[k]);
        const char *image = json_string_value(json_object_get(c, "image"));
        blob *b = NULL;
        if (image) {
            int i = 0;
            while (i < n_images && strcmp(names[i], image)) i++;
            if (i == n_images && n_images < 64) {
                char path[4096];
                snprintf(path, sizeof path, "%s/%s", image_dir, image);
                names[n_images] = image;
                images[n_images++] = read_all(path);
            }
            b = &images[i];
            CHECK(b->n > 0, "image %s unreadable", image);
        }
        albedo_request r = case_request(c, refs[k]);
        albedo_status st = albedo_engine_submit(e, &r, b ? b->p : NULL, b ? b->n : 0, NULL, &tk[k]);
        CHECK(st == ALBEDO_OK, "submit case %d: %s", order[k], albedo_last_error());
    }
    int n_cached = 0, n_queued = 0;
    for (int k = 0; k < n_jobs; k++) {
        if (!tk[k]) continue;
        json_t *c = json_array_get(cases, (size_t)order[k]);
        const char *image = json_string_value(json_object_get(c, "image"));
        char label[256];
        snprintf(label, sizeof label, "engine job %d: case %d (%s %s)", k, order[k], image ? image : "text-only",
                 json_string_value(json_object_get(c, "task")));
        const albedo_result *res = NULL;
        albedo_status st = albedo_ticket_wait(tk[k], &res);
        CHECK(st == ALBEDO_OK, "%s: %s", label, albedo_ticket_error(tk[k]));
        if (res) {
            check_case(label, c, res);
            CHECK(res->metrics.cached_tokens == 0 || res->metrics.cached_tokens == 730, "%s: cached_tokens %d", label,
                  res->metrics.cached_tokens);
            n_cached += res->metrics.cached_tokens == 730;
            n_queued += res->metrics.queue_time_ms > 0;
        }
        albedo_ticket_free(tk[k]);
    }
    uint64_t hits, misses, evictions;
    engine_debug_prefix_stats(e, &hits, &misses, &evictions);
    printf("fixtures: %d jobs, %d reused a cached prefix; prefix cache %llu hits, %llu misses, %llu evictions\n",
           n_jobs, n_cached, (unsigned long long)hits, (unsigned long long)misses, (unsigned long long)evictions);
    CHECK(n_cached > 0, "no request reused a cached image prefix");
    CHECK(evictions > 0, "the small KV budget evicted no prefix");
    check_no_leak(e, "fixtures");
    albedo_engine_free(e);
    for (int i = 0; i < n_images; i++) free(images[i].p);
}

/* ---- prefix reuse ------------------------------------------------------------------ */

static void test_prefix(albedo_model *m, const char *image_dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/astronaut.png", image_dir);
    blob b = read_all(path);
    CHECK(b.n > 0, "%s unreadable", path);
    albedo_engine_params ep = albedo_engine_params_default();
    ep.max_batch = 2;
    ep.kv_bytes = block_bytes(m, ep.block_size) * 400;
    ep.n_threads = 2;
    albedo_engine *e = NULL;
    CHECK(albedo_engine_new(m, &ep, &e) == ALBEDO_OK, "engine: %s", albedo_last_error());
    if (!e || !b.n) {
        albedo_engine_free(e);
        free(b.p);
        return;
    }
    albedo_request r = albedo_request_default(ALBEDO_SKILL_QUERY);
    r.question = "What is this?";
    r.temperature = 0;
    r.max_tokens = 4;
    double ttft[2] = {0};
    int cached[2] = {-1, -1};
    for (int k = 0; k < 2; k++) {
        albedo_ticket *t = NULL;
        const albedo_result *res = NULL;
        CHECK(albedo_engine_submit(e, &r, b.p, b.n, NULL, &t) == ALBEDO_OK, "submit: %s", albedo_last_error());
        CHECK(albedo_ticket_wait(t, &res) == ALBEDO_OK, "wait: %s", albedo_ticket_error(t));
        if (res) {
            ttft[k] = res->metrics.ttft_ms;
            cached[k] = res->metrics.cached_tokens;
        }
        albedo_ticket_free(t);
    }
    printf("prefix: TTFT %.1f ms on a new image, %.1f ms with its prefix cached\n", ttft[0], ttft[1]);
    CHECK(cached[0] == 0 && cached[1] == 730, "cached_tokens %d then %d, want 0 then 730", cached[0], cached[1]);
    check_no_leak(e, "prefix");
    albedo_engine_free(e);
    free(b.p);
}

/* ---- cancellation, limits, fairness ----------------------------------------------- */

typedef struct flag {
    pthread_mutex_t mu;
    int n_text;
    albedo_ticket *cancel_at_2; /* cancelled from its own stream */
    int done_order[16];
    int n_done;
} flag;

static int on_text_count(void *user, const char *text, size_t len) {
    flag *f = user;
    (void)text;
    (void)len;
    pthread_mutex_lock(&f->mu);
    if (++f->n_text == 2 && f->cancel_at_2) albedo_ticket_cancel(f->cancel_at_2);
    pthread_mutex_unlock(&f->mu);
    return 0;
}

static albedo_request long_request(int max_tokens) {
    albedo_request r = albedo_request_default(ALBEDO_SKILL_QUERY);
    r.question = "Tell me a long story about the sea.";
    r.temperature = 0;
    r.max_tokens = max_tokens;
    r.ignore_eos = 1;
    return r;
}

static void test_cancel(albedo_model *m) {
    albedo_engine_params ep = albedo_engine_params_default();
    ep.max_batch = 1;
    ep.kv_bytes = block_bytes(m, ep.block_size) * 200;
    ep.n_threads = 2;
    albedo_engine *e = NULL;
    CHECK(albedo_engine_new(m, &ep, &e) == ALBEDO_OK, "engine: %s", albedo_last_error());
    if (!e) return;
    flag f = {.mu = PTHREAD_MUTEX_INITIALIZER};
    albedo_submit_params sp = {.on_text = on_text_count, .user = &f};
    albedo_request r = long_request(400);
    albedo_ticket *run = NULL, *queued = NULL;
    /* The first request cancels itself (through the API, from its stream
     * callback) once it streamed twice: mid-generation, deterministically. */
    pthread_mutex_lock(&f.mu);
    CHECK(albedo_engine_submit(e, &r, NULL, 0, &sp, &run) == ALBEDO_OK, "submit");
    f.cancel_at_2 = run;
    pthread_mutex_unlock(&f.mu);
    CHECK(albedo_engine_submit(e, &r, NULL, 0, NULL, &queued) == ALBEDO_OK, "submit");
    albedo_ticket_cancel(queued);
    CHECK(albedo_ticket_wait(queued, NULL) == ALBEDO_ERR_CANCELLED, "queued request: %s",
          albedo_ticket_error(queued));
    CHECK(albedo_ticket_wait(run, NULL) == ALBEDO_ERR_CANCELLED, "running request: %s", albedo_ticket_error(run));
    CHECK(f.n_text >= 2, "the running request streamed %d pieces before its cancellation", f.n_text);
    albedo_ticket_free(run);
    albedo_ticket_free(queued);
    int n_free = 0, n_total = 0;
    engine_debug_blocks(e, 0, &n_free, &n_total);
    CHECK(n_free == n_total, "cancel: %d of %d KV blocks free", n_free, n_total);
    /* A deadline that passes in the queue. */
    albedo_ticket *t1 = NULL, *t2 = NULL;
    albedo_submit_params dl = {.deadline_ms = 1};
    CHECK(albedo_engine_submit(e, &r, NULL, 0, NULL, &t1) == ALBEDO_OK, "submit");
    CHECK(albedo_engine_submit(e, &r, NULL, 0, &dl, &t2) == ALBEDO_OK, "submit");
    CHECK(albedo_ticket_wait(t2, NULL) == ALBEDO_ERR_CANCELLED, "deadline: %s", albedo_ticket_error(t2));
    albedo_ticket_free(t1); /* cancels the running one */
    albedo_ticket_free(t2);
    check_no_leak(e, "deadline");
    albedo_engine_free(e);
}

static void test_limits(albedo_model *m) {
    albedo_engine_params ep = albedo_engine_params_default();
    ep.max_batch = 1;
    ep.max_queue = 2;
    ep.kv_bytes = block_bytes(m, ep.block_size) * 200;
    ep.n_threads = 2;
    albedo_engine *e = NULL;
    CHECK(albedo_engine_new(m, &ep, &e) == ALBEDO_OK, "engine: %s", albedo_last_error());
    if (!e) return;
    albedo_request r = long_request(300);
    albedo_ticket *t[8] = {0};
    int n_limit = 0, n_ok = 0;
    for (int i = 0; i < 8; i++) {
        albedo_status st = albedo_engine_submit(e, &r, NULL, 0, NULL, &t[i]);
        n_limit += st == ALBEDO_ERR_LIMIT;
        n_ok += st == ALBEDO_OK;
        CHECK(st == ALBEDO_OK || st == ALBEDO_ERR_LIMIT, "submit %d: %s", i, albedo_status_str(st));
    }
    CHECK(n_limit > 0 && n_ok <= 4, "max_queue 2, max_batch 1: %d of 8 accepted", n_ok);
    /* Bad requests fail at submit. */
    albedo_ticket *bad = NULL;
    albedo_request d = albedo_request_default(ALBEDO_SKILL_DETECT);
    d.object = "cat";
    CHECK(albedo_engine_submit(e, &d, NULL, 0, NULL, &bad) == ALBEDO_ERR_INVALID_ARGUMENT && !bad,
          "detect without an image accepted");
    albedo_request q = albedo_request_default(ALBEDO_SKILL_QUERY);
    CHECK(albedo_engine_submit(e, &q, NULL, 0, NULL, &bad) == ALBEDO_ERR_INVALID_ARGUMENT, "query without a question");
    for (int i = 0; i < 8; i++) albedo_ticket_free(t[i]);
    check_no_leak(e, "limits");
    albedo_engine_free(e);
}

typedef struct order_rec {
    flag *f;
    int idx;
} order_rec;

static void on_done_idx(void *user, albedo_ticket *t, albedo_status st, const albedo_result *res) {
    order_rec *o = user;
    (void)t;
    (void)res;
    (void)st;
    pthread_mutex_lock(&o->f->mu);
    if (o->f->n_done < 16) o->f->done_order[o->f->n_done] = o->idx;
    o->f->n_done++;
    pthread_mutex_unlock(&o->f->mu);
}

static void test_fairness(albedo_model *m) {
    albedo_engine_params ep = albedo_engine_params_default();
    ep.max_batch = 1;
    ep.kv_bytes = block_bytes(m, ep.block_size) * 200;
    ep.n_threads = 2;
    albedo_engine *e = NULL;
    CHECK(albedo_engine_new(m, &ep, &e) == ALBEDO_OK, "engine: %s", albedo_last_error());
    if (!e) return;
    flag f = {.mu = PTHREAD_MUTEX_INITIALIZER};
    order_rec rec[6];
    albedo_ticket *t[6] = {0};
    albedo_request r = long_request(6);
    for (int i = 0; i < 6; i++) {
        rec[i] = (order_rec){&f, i};
        albedo_submit_params sp = {.on_done = on_done_idx, .user = &rec[i]};
        CHECK(albedo_engine_submit(e, &r, NULL, 0, &sp, &t[i]) == ALBEDO_OK, "submit %d", i);
    }
    for (int i = 0; i < 6; i++) CHECK(albedo_ticket_wait(t[i], NULL) == ALBEDO_OK, "wait %d", i);
    int in_order = f.n_done == 6;
    for (int i = 0; i < 6 && in_order; i++) in_order = f.done_order[i] == i;
    CHECK(in_order, "completion order is not the submission order");
    for (int i = 0; i < 6; i++) albedo_ticket_free(t[i]);
    albedo_engine_free(e);
}

int main(void) {
    const char *shared = test_shared_dir();
    char cases_path[4096], image_dir[4096], model_dir[4096];
    if (shared) {
        snprintf(cases_path, sizeof cases_path, "%s/fixtures/reference/md2-small/cases.json", shared);
        snprintf(image_dir, sizeof image_dir, "%s/fixtures/images", shared);
        snprintf(model_dir, sizeof model_dir, "%s/fixtures/models/md2-small", shared);
    } else {
        printf("note: ../shared is absent: cases from tests/data on the model test_model regenerates\n");
        snprintf(cases_path, sizeof cases_path, "%s/tests/data/md2-small/cases.json", test_source_dir());
        snprintf(image_dir, sizeof image_dir, "%s/tests/data/images", test_source_dir());
        snprintf(model_dir, sizeof model_dir, "%s/md2-small-gen", ALBEDO_BINARY_DIR);
    }
    json_error_t je;
    json_t *root = json_load_file(cases_path, 0, &je);
    CHECK(root != NULL, "%s: %s", cases_path, je.text);
    if (!root) TEST_MAIN_END();
    albedo_model *m = NULL;
    albedo_model_params mp = albedo_model_params_default();
    mp.n_threads = 2;
    CHECK(albedo_model_load(model_dir, &mp, &m) == ALBEDO_OK, "load %s: %s", model_dir, albedo_last_error());
    if (m) {
        const char *only = getenv("ALBEDO_TEST_ONLY"); /* fixtures, prefix, cancel, limits, fairness */
        if (!only || !strcmp(only, "limits")) test_limits(m);
        if (!only || !strcmp(only, "fairness")) test_fairness(m);
        if (!only || !strcmp(only, "cancel")) test_cancel(m);
        if (!only || !strcmp(only, "prefix")) test_prefix(m, image_dir);
        if (!only || !strcmp(only, "fixtures")) test_fixtures(m, json_object_get(root, "cases"), image_dir);
    }
    albedo_model_free(m);
    json_decref(root);
    TEST_MAIN_END();
}
