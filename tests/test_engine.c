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
 *   cancel     cancelling a queued and a running request frees every block;
 *              a queued request's deadline fires while the running one is
 *              held up (not when it would be admitted)
 *   limits     max_queue → ALBEDO_ERR_LIMIT at submit; bad requests rejected
 *   fairness   equal requests at max_batch 1 end in submission order
 *   sessions   albedo_session_run goes through the model's engine: every case
 *              gives the same tokens, text, boxes and points as the loops run
 *              in place on a session's own cache (gen_run), logits within
 *              float rounding; three threads' sessions at once are batched
 *              and still match the reference; freeing the images frees
 *              their prefixes in the engine
 *   overlap    while the image worker encodes a new image, the running
 *              request keeps decoding (steps counted while it is busy)
 *   ahead      encode-ahead (ALBEDO_ENCODE_AHEAD): at max_batch 1 an image
 *              is built while the only slot decodes, never two sequences a
 *              step, a question whose prefix is cached takes the slot before
 *              a later one built ahead, answers as without it
 *   chunks     a prompt longer than token_budget runs in chunks over several
 *              steps and gives the same answer as in one piece
 *
 * Without ../shared: cases and images from tests/data, the model that
 * test_model regenerates in the build directory (md2-small-gen).
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
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
    return kv_block_bytes(c->n_layers, c->n_kv_heads * c->head_dim, kv_elem_bytes(m->kv_dt), block);
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
    printf("fixtures: %d jobs, %d reused a cached prefix, %d waited in the queue; prefix cache %llu hits, %llu misses, "
           "%llu evictions\n",
           n_jobs, n_cached, n_queued, (unsigned long long)hits, (unsigned long long)misses,
           (unsigned long long)evictions);
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

/* An engine that runs one request at a time (max_batch 1; max_queue when
 * > 0), 200 KV blocks, 2 threads; NULL (a failed check) if it cannot start. */
static albedo_engine *serial_engine(albedo_model *m, int max_queue) {
    albedo_engine_params ep = albedo_engine_params_default();
    ep.max_batch = 1;
    if (max_queue > 0) ep.max_queue = max_queue;
    ep.kv_bytes = block_bytes(m, ep.block_size) * 200;
    ep.n_threads = 2;
    albedo_engine *e = NULL;
    CHECK(albedo_engine_new(m, &ep, &e) == ALBEDO_OK, "engine: %s", albedo_last_error());
    return e;
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
    albedo_engine *e = serial_engine(m, 0);
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
    CHECK(albedo_ticket_wait(queued, NULL) == ALBEDO_ERR_CANCELLED, "queued request: %s", albedo_ticket_error(queued));
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

/* Tickets outlive their engine (albedo.h): freeing the engine cancels
 * them, and each is read and freed after it, or by another thread while the
 * engine is freed (the server's reaper does; ASan and TSan watch this). */
static void *free_ticket_thread(void *arg) {
    albedo_ticket_free(arg);
    return NULL;
}

static void test_outlive(albedo_model *m) {
    albedo_engine *e = serial_engine(m, 0);
    if (!e) return;
    albedo_request r = long_request(400);
    albedo_ticket *run = NULL, *queued = NULL, *other = NULL;
    CHECK(albedo_engine_submit(e, &r, NULL, 0, NULL, &run) == ALBEDO_OK, "submit");
    CHECK(albedo_engine_submit(e, &r, NULL, 0, NULL, &queued) == ALBEDO_OK, "submit");
    CHECK(albedo_engine_submit(e, &r, NULL, 0, NULL, &other) == ALBEDO_OK, "submit");
    pthread_t th;
    const int started = !pthread_create(&th, NULL, free_ticket_thread, other);
    CHECK(started, "cannot start a thread");
    if (!started) albedo_ticket_free(other);
    albedo_engine_free(e);
    if (started) pthread_join(th, NULL);
    CHECK(albedo_ticket_poll(run) && albedo_ticket_poll(queued), "a ticket had not ended when its engine was freed");
    CHECK(albedo_ticket_wait(run, NULL) == ALBEDO_ERR_CANCELLED, "running request: %s", albedo_ticket_error(run));
    CHECK(albedo_ticket_wait(queued, NULL) == ALBEDO_ERR_CANCELLED, "queued request: %s", albedo_ticket_error(queued));
    CHECK(albedo_ticket_json(run, 0) == NULL, "a cancelled ticket has a result");
    albedo_ticket_cancel(run); /* no effect once ended */
    albedo_ticket_free(queued);
    albedo_ticket_free(run); /* the last: the engine's struct goes with it */
}

static void test_limits(albedo_model *m) {
    albedo_engine *e = serial_engine(m, 2);
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
    albedo_engine *e = serial_engine(m, 0);
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

/* ---- a queued request's deadline while the running one is held up ------------- */

typedef struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int entered, open;
} gate;

/* Stream callback that holds its request (and so its batch slot) until the
 * gate opens. */
static int on_text_gate(void *user, const char *text, size_t len) {
    gate *g = user;
    (void)text;
    (void)len;
    pthread_mutex_lock(&g->mu);
    g->entered = 1;
    pthread_cond_broadcast(&g->cv);
    while (!g->open) pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
    return 0;
}

static void test_queued_deadline(albedo_model *m) {
    albedo_engine *e = serial_engine(m, 0);
    if (!e) return;
    gate g = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    albedo_submit_params held = {.on_text = on_text_gate, .user = &g};
    albedo_request r = long_request(200);
    albedo_ticket *head = NULL, *late = NULL;
    CHECK(albedo_engine_submit(e, &r, NULL, 0, &held, &head) == ALBEDO_OK, "submit");
    pthread_mutex_lock(&g.mu);
    while (!g.entered) pthread_cond_wait(&g.cv, &g.mu);
    pthread_mutex_unlock(&g.mu);
    /* The head sits in its stream callback: nothing frees the slot. */
    albedo_submit_params dl = {.deadline_ms = 50};
    const double t0 = now_ms();
    CHECK(albedo_engine_submit(e, &r, NULL, 0, &dl, &late) == ALBEDO_OK, "submit");
    albedo_status st = albedo_ticket_wait(late, NULL);
    const double waited = now_ms() - t0;
    printf("queued deadline of 50 ms: ended after %.1f ms, the running request still held\n", waited);
    CHECK(st == ALBEDO_ERR_CANCELLED && strstr(albedo_ticket_error(late), "deadline"), "queued deadline: %s",
          albedo_ticket_error(late));
    CHECK(!albedo_ticket_poll(head), "the held request ended");
    pthread_mutex_lock(&g.mu);
    g.open = 1;
    pthread_cond_broadcast(&g.cv);
    pthread_mutex_unlock(&g.mu);
    albedo_ticket_free(late);
    albedo_ticket_free(head);
    check_no_leak(e, "queued deadline");
    albedo_engine_free(e);
}

/* ---- blocking session runs ------------------------------------------------------- */

/* Every logits row of a run (on_logits), and the comparison of a second
 * run's rows with them. */
typedef struct logit_rows {
    float *rows; /* [n, vocab] */
    int n, cap, vocab;
    /* comparing */
    int cmp, k;
    double worst;  /* max |a - b| / max(1, max |a|) over compared rows */
    int diverged;  /* row of the first different argmax, or -1 */
    double margin; /* the in-place run's top-2 margin at that row */
} logit_rows;

static void record_rows(void *user, const float *logits, int n) {
    logit_rows *r = user;
    r->vocab = n;
    if (!r->cmp) {
        if (r->n == r->cap) {
            int nc = r->cap ? 2 * r->cap : 64;
            float *p = realloc(r->rows, (size_t)nc * n * sizeof(float));
            if (!p) return;
            r->rows = p;
            r->cap = nc;
        }
        memcpy(r->rows + (size_t)r->n++ * n, logits, (size_t)n * sizeof(float));
        return;
    }
    if (r->k >= r->n || r->diverged >= 0) return;
    const float *a = r->rows + (size_t)r->k * n;
    double big = 1, d = 0;
    int ia = 0, ib = 0, i2 = -1;
    for (int i = 0; i < n; i++) {
        if (fabs(a[i]) > big) big = fabs(a[i]);
        if (fabs((double)a[i] - logits[i]) > d) d = fabs((double)a[i] - logits[i]);
        if (a[i] > a[ia]) ia = i;
        if (logits[i] > logits[ib]) ib = i;
    }
    for (int i = 0; i < n; i++)
        if (i != ib && (i2 < 0 || logits[i] > logits[i2])) i2 = i;
    if (d / big > r->worst) r->worst = d / big;
    if (ia != ib) {
        r->diverged = r->k;
        r->margin = i2 >= 0 ? logits[ib] - logits[i2] : 0;
    }
    r->k++;
}

typedef struct session_job {
    albedo_model *m;
    json_t *cases;
    const char *image_dir;
    const char *images; /* the cases of these images ("-" for text-only), space-separated */
    pthread_mutex_t *check_mu;
} session_job;

static int listed(const char *list, const char *image) {
    const char *name = image ? image : "-";
    const size_t n = strlen(name);
    for (const char *p = strstr(list, name); p; p = strstr(p + 1, name))
        if ((p == list || p[-1] == ' ') && (p[n] == ' ' || !p[n])) return 1;
    return 0;
}

/* One thread: its own session, the cases of its images, each image encoded
 * once. The checks run under check_mu (CHECK's counters are shared). */
static void *session_thread(void *arg) {
    session_job *sj = arg;
    albedo_session *s = NULL;
    albedo_status st = albedo_session_new(sj->m, &s);
    const char *cur = NULL;
    albedo_image *img = NULL;
    for (int i = 0; s && i < (int)json_array_size(sj->cases); i++) {
        json_t *c = json_array_get(sj->cases, (size_t)i);
        const char *image = json_string_value(json_object_get(c, "image"));
        if (!listed(sj->images, image)) continue;
        char label[256], path[4096];
        snprintf(label, sizeof label, "concurrent session case %d (%s %s)", i, image ? image : "text-only",
                 json_string_value(json_object_get(c, "task")));
        if (image && (!cur || strcmp(cur, image))) {
            albedo_image_free(img);
            img = NULL;
            cur = image;
            snprintf(path, sizeof path, "%s/%s", sj->image_dir, image);
            st = albedo_image_encode_file(s, path, &img);
        }
        albedo_spatial_ref refs[16];
        albedo_request r = case_request(c, refs);
        r.image = image ? img : NULL;
        const albedo_result *res = NULL;
        if (!image || img) st = albedo_session_run(s, &r, &res);
        pthread_mutex_lock(sj->check_mu);
        CHECK(st == ALBEDO_OK && res, "%s: %s", label, albedo_session_error(s));
        if (res) check_case(label, c, res);
        pthread_mutex_unlock(sj->check_mu);
    }
    albedo_image_free(img);
    albedo_session_free(s);
    return NULL;
}

typedef struct long_job {
    albedo_model *m;
    pthread_barrier_t *go;
    albedo_status st;
} long_job;

static void *long_thread(void *arg) {
    long_job *lj = arg;
    albedo_session *s = NULL;
    lj->st = albedo_session_new(lj->m, &s);
    albedo_request r = long_request(200);
    const albedo_result *res = NULL;
    pthread_barrier_wait(lj->go);
    if (!lj->st) lj->st = albedo_session_run(s, &r, &res);
    albedo_session_free(s);
    return NULL;
}

static void test_sessions(albedo_model *m, json_t *cases, const char *image_dir) {
    /* 1. Through the engine and in place, case by case. */
    albedo_session *se = NULL, *sp = NULL;
    CHECK(albedo_session_new(m, &se) == ALBEDO_OK && albedo_session_new(m, &sp) == ALBEDO_OK, "sessions: %s",
          albedo_last_error());
    const char *cur = NULL;
    albedo_image *img = NULL;
    double worst = 0;
    int n_same = 0, n_cases = (int)json_array_size(cases);
    for (int i = 0; se && sp && i < n_cases; i++) {
        json_t *c = json_array_get(cases, (size_t)i);
        const char *image = json_string_value(json_object_get(c, "image"));
        char label[256], path[4096];
        snprintf(label, sizeof label, "session case %d (%s %s)", i, image ? image : "text-only",
                 json_string_value(json_object_get(c, "task")));
        if (image && (!cur || strcmp(cur, image))) {
            albedo_image_free(img);
            img = NULL;
            cur = image;
            snprintf(path, sizeof path, "%s/%s", image_dir, image);
            CHECK(albedo_image_encode_file(se, path, &img) == ALBEDO_OK, "%s: encode: %s", label,
                  albedo_session_error(se));
        }
        if (image && !img) continue;
        albedo_spatial_ref refs[16];
        albedo_request r = case_request(c, refs);
        r.image = image ? img : NULL;
        logit_rows lr = {.diverged = -1};
        se->on_logits = sp->on_logits = record_rows;
        se->on_logits_user = sp->on_logits_user = &lr;
        const albedo_result *res = NULL;
        CHECK(albedo_session_run(se, &r, &res) == ALBEDO_OK, "%s: %s", label, albedo_session_error(se));
        if (res) check_case(label, c, res);
        char *json_e = res ? strdup(albedo_result_json(se, res, 0)) : NULL;
        int32_t *tok_e = res ? malloc((size_t)res->n_tokens * sizeof *tok_e + 1) : NULL;
        const int n_tok_e = res ? res->n_tokens : 0;
        if (tok_e) memcpy(tok_e, res->tokens, (size_t)n_tok_e * sizeof *tok_e);
        CHECK(!res || res->metrics.cached_tokens == (image ? 730 : 0), "%s: cached_tokens %d", label,
              res ? res->metrics.cached_tokens : -1);
        lr.cmp = 1;
        errbuf e = {{0}};
        CHECK(gen_run(sp, &r, &e) == ALBEDO_OK, "%s: in place: %s", label, e.msg);
        se->on_logits = sp->on_logits = NULL;
        const albedo_result *rp = &sp->res.r;
        const char *json_p = albedo_result_json(sp, rp, 0);
        int same = json_e && json_p && !strcmp(json_e, json_p) && rp->n_tokens == n_tok_e &&
                   !memcmp(rp->tokens, tok_e, (size_t)n_tok_e * sizeof *tok_e);
        /* A different output must come from a near tie, where rounding
         * legitimately picks the other token. */
        CHECK(same || (lr.diverged >= 0 && lr.margin < 1e-4),
              "%s: engine and in-place runs differ\n  engine   %s\n  in place %s", label, json_e ? json_e : "?",
              json_p ? json_p : "?");
        CHECK(lr.worst < 1e-5, "%s: logits differ by %.3g (relative)", label, lr.worst);
        n_same += same;
        if (lr.worst > worst) worst = lr.worst;
        free(json_e);
        free(tok_e);
        free(lr.rows);
    }
    printf("sessions: %d of %d cases identical through the engine and in place; logits differ by at most %.3g "
           "(relative)\n",
           n_same, n_cases, worst);
    albedo_image_free(img);
    albedo_session_free(se);
    albedo_session_free(sp);

    /* 2. Three threads' sessions at once, on the cases of four images:
     * still the reference's results. */
    albedo_engine *eng = atomic_load(&m->engine);
    CHECK(eng != NULL, "albedo_session_run made no engine");
    if (!eng) return;
    pthread_mutex_t check_mu = PTHREAD_MUTEX_INITIALIZER;
    static const char *const shares[3] = {"astronaut.png", "chelsea.jpg -", "tiny.png"};
    session_job jobs[3];
    pthread_t th[3];
    int made[3];
    for (int k = 0; k < 3; k++) {
        jobs[k] = (session_job){m, cases, image_dir, shares[k], &check_mu};
        made[k] = pthread_create(&th[k], NULL, session_thread, &jobs[k]) == 0;
    }
    for (int k = 0; k < 3; k++)
        if (made[k]) pthread_join(th[k], NULL);
    for (int k = 0; k < 3; k++) CHECK(made[k], "thread %d", k);
    /* 3. Three long generations started together are batched. */
    albedo_engine_stats before = {0}, after = {0};
    albedo_engine_get_stats(eng, &before);
    pthread_barrier_t go;
    pthread_barrier_init(&go, NULL, 3);
    long_job lj[3];
    for (int k = 0; k < 3; k++) {
        lj[k] = (long_job){m, &go, ALBEDO_ERR_INTERNAL};
        CHECK(pthread_create(&th[k], NULL, long_thread, &lj[k]) == 0, "thread");
    }
    for (int k = 0; k < 3; k++) pthread_join(th[k], NULL);
    pthread_barrier_destroy(&go);
    albedo_engine_get_stats(eng, &after);
    for (int k = 0; k < 3; k++) CHECK(lj[k].st == ALBEDO_OK, "long session run %d: %s", k, albedo_status_str(lj[k].st));
    const double steps = (double)(after.steps - before.steps),
                 seqs = (double)(after.step_sequences - before.step_sequences);
    printf("sessions: 3 threads' 200-token runs in %.0f steps, %.2f sequences per step\n", steps,
           steps > 0 ? seqs / steps : 0);
    CHECK(seqs > 1.5 * steps, "three concurrent session runs were hardly batched (%.0f sequences in %.0f steps)", seqs,
          steps);
    /* 3. Every image was freed: their prefixes left the engine's cache. */
    int n_free = 0, n_total = 0;
    engine_debug_blocks(eng, 0, &n_free, &n_total);
    CHECK(n_free == n_total, "sessions: %d of %d KV blocks free after the images were freed", n_free, n_total);
}

/* ---- decoding goes on while an image is encoded ---------------------------------- */

static void test_overlap(albedo_model *m, const char *image_dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/astronaut.png", image_dir);
    blob b = read_all(path);
    CHECK(b.n > 0, "%s unreadable", path);
    albedo_engine_params ep = albedo_engine_params_default();
    ep.max_batch = 2;
    ep.kv_bytes = block_bytes(m, ep.block_size) * 400;
    ep.n_threads = 1;
    ep.vision_threads = 1;
    albedo_engine *e = NULL;
    CHECK(albedo_engine_new(m, &ep, &e) == ALBEDO_OK, "engine: %s", albedo_last_error());
    if (!e || !b.n) {
        albedo_engine_free(e);
        free(b.p);
        return;
    }
    albedo_request r = long_request(1900);
    albedo_ticket *runner = NULL, *img = NULL;
    CHECK(albedo_engine_submit(e, &r, NULL, 0, NULL, &runner) == ALBEDO_OK, "submit");
    albedo_engine_stats st0 = {0}, st1 = {0};
    for (int i = 0; i < 5000 && st0.steps < 5; i++) {
        nanosleep(&(struct timespec){0, 1000000}, NULL);
        albedo_engine_get_stats(e, &st0);
    }
    albedo_request q = albedo_request_default(ALBEDO_SKILL_QUERY);
    q.question = "What is this?";
    q.temperature = 0;
    q.max_tokens = 2;
    CHECK(albedo_engine_submit(e, &q, b.p, b.n, NULL, &img) == ALBEDO_OK, "submit");
    const albedo_result *res = NULL;
    CHECK(albedo_ticket_wait(img, &res) == ALBEDO_OK, "image request: %s", albedo_ticket_error(img));
    albedo_engine_get_stats(e, &st1);
    const int still = !albedo_ticket_poll(runner);
    printf("overlap: %llu steps of the running request while the image was encoded (prefill %.0f ms)%s\n",
           (unsigned long long)(st1.steps_while_encoding - st0.steps_while_encoding),
           res ? res->metrics.prefill_time_ms : 0, still ? "" : "; it ended meanwhile");
    CHECK(st1.steps_while_encoding > st0.steps_while_encoding, "no decode step ran while the image was encoded");
    CHECK(st1.prefix_misses == 1, "the image was not encoded by the worker (%llu misses)",
          (unsigned long long)st1.prefix_misses);
    albedo_ticket_free(img);
    albedo_ticket_free(runner);
    check_no_leak(e, "overlap");
    albedo_engine_free(e);
    free(b.p);
}

/* ---- encode-ahead: images built beyond max_batch ------------------------------------ */

/* One run at max_batch 1 with `ahead` images allowed beyond it
 * (ALBEDO_ENCODE_AHEAD): an imageless request that decodes for a while,
 * then two questions on one image and one on another. texts[4] get the
 * answers; returns the steps that ran while an image was encoded. */
static uint64_t run_ahead(albedo_model *m, const blob *x, const blob *y, int ahead, char *texts[4]) {
    char v[16];
    snprintf(v, sizeof v, "%d", ahead);
    setenv("ALBEDO_ENCODE_AHEAD", v, 1);
    albedo_engine_params ep = albedo_engine_params_default();
    ep.max_batch = 1;
    ep.kv_bytes = block_bytes(m, ep.block_size) * 400;
    ep.n_threads = 1;
    ep.vision_threads = 1;
    albedo_engine *e = NULL;
    CHECK(albedo_engine_new(m, &ep, &e) == ALBEDO_OK, "engine: %s", albedo_last_error());
    unsetenv("ALBEDO_ENCODE_AHEAD");
    if (!e) return 0;
    flag f = {.mu = PTHREAD_MUTEX_INITIALIZER};
    order_rec rec[4];
    albedo_ticket *t[4] = {0};
    /* Long enough that both images are built before it ends. */
    albedo_request r = long_request(1500);
    albedo_request q = albedo_request_default(ALBEDO_SKILL_QUERY);
    q.temperature = 0;
    q.max_tokens = 4;
    const char *questions[4] = {NULL, "What is this?", "What color is it?", "What is this?"};
    const blob *img[4] = {NULL, x, x, y};
    for (int i = 0; i < 4; i++) {
        rec[i] = (order_rec){&f, i};
        albedo_submit_params sp = {.on_done = on_done_idx, .user = &rec[i]};
        q.question = questions[i];
        CHECK(albedo_engine_submit(e, i ? &q : &r, img[i] ? img[i]->p : NULL, img[i] ? img[i]->n : 0, &sp, &t[i]) ==
                  ALBEDO_OK,
              "ahead %d: submit %d", ahead, i);
    }
    for (int i = 0; i < 4; i++) {
        const albedo_result *res = NULL;
        CHECK(albedo_ticket_wait(t[i], &res) == ALBEDO_OK, "ahead %d: request %d: %s", ahead, i,
              albedo_ticket_error(t[i]));
        texts[i] = res ? strdup(res->text) : NULL;
    }
    albedo_engine_stats st;
    albedo_engine_get_stats(e, &st);
    /* max_batch holds whatever was built ahead: never two sequences a step. */
    CHECK(st.step_sequences == st.steps, "ahead %d: %llu sequences in %llu steps at max_batch 1", ahead,
          (unsigned long long)st.step_sequences, (unsigned long long)st.steps);
    CHECK(st.prefix_misses == 2 && st.prefix_hits == 1, "ahead %d: prefix cache %llu hits, %llu misses", ahead,
          (unsigned long long)st.prefix_hits, (unsigned long long)st.prefix_misses);
    /* The second question on the first image was ready before the second
     * image's request: it takes the slot first. */
    int in_order = f.n_done == 4;
    for (int i = 0; i < 4 && in_order; i++) in_order = f.done_order[i] == i;
    CHECK(in_order, "ahead %d: completion order %d %d %d %d", ahead, f.done_order[0], f.done_order[1], f.done_order[2],
          f.done_order[3]);
    for (int i = 0; i < 4; i++) albedo_ticket_free(t[i]);
    check_no_leak(e, "ahead");
    albedo_engine_free(e);
    return st.steps_while_encoding;
}

static void test_ahead(albedo_model *m, const char *image_dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s/astronaut.png", image_dir);
    blob x = read_all(path);
    snprintf(path, sizeof path, "%s/rocket.jpg", image_dir);
    blob y = read_all(path);
    CHECK(x.n > 0 && y.n > 0, "ahead: images unreadable in %s", image_dir);
    if (x.n && y.n) {
        char *plain[4] = {0}, *ahead[4] = {0};
        char *wide[4] = {0};
        const uint64_t s0 = run_ahead(m, &x, &y, 0, plain), s1 = run_ahead(m, &x, &y, 1, ahead);
        run_ahead(m, &x, &y, 2, wide);
        printf("ahead: %llu steps ran while an image was encoded with encode-ahead, %llu without\n",
               (unsigned long long)s1, (unsigned long long)s0);
        /* Without it the only slot holds the decoding request, so nothing is
         * encoded meanwhile; with it the first image is. */
        CHECK(s0 == 0, "ahead 0: %llu steps while encoding at max_batch 1", (unsigned long long)s0);
        CHECK(s1 > 0, "ahead 1: the image was not built while the first request decoded");
        for (int i = 0; i < 4; i++) {
            CHECK(plain[i] && ahead[i] && !strcmp(plain[i], ahead[i]), "ahead: request %d '%s' vs '%s'", i,
                  plain[i] ? plain[i] : "?", ahead[i] ? ahead[i] : "?");
            CHECK(plain[i] && wide[i] && !strcmp(plain[i], wide[i]), "ahead 2: request %d '%s' vs '%s'", i,
                  plain[i] ? plain[i] : "?", wide[i] ? wide[i] : "?");
            free(plain[i]);
            free(ahead[i]);
            free(wide[i]);
        }
    }
    free(x.p);
    free(y.p);
}

/* ---- a prompt beyond the token budget ---------------------------------------------- */

static void test_chunks(albedo_model *m) {
    albedo_request r = albedo_request_default(ALBEDO_SKILL_QUERY);
    r.question = "Please describe, in a few words and with great care, every object that a small robot might find "
                 "on a kitchen table at breakfast time on a sunny Sunday morning.";
    r.temperature = 0;
    r.max_tokens = 12;
    char *text[2] = {0};
    uint64_t steps[2] = {0};
    for (int k = 0; k < 2; k++) {
        albedo_engine_params ep = albedo_engine_params_default();
        ep.max_batch = 1;
        ep.token_budget = k ? 5 : 512;
        ep.kv_bytes = block_bytes(m, ep.block_size) * 200;
        ep.n_threads = 2;
        albedo_engine *e = NULL;
        CHECK(albedo_engine_new(m, &ep, &e) == ALBEDO_OK, "engine: %s", albedo_last_error());
        if (!e) return;
        albedo_ticket *t = NULL;
        const albedo_result *res = NULL;
        CHECK(albedo_engine_submit(e, &r, NULL, 0, NULL, &t) == ALBEDO_OK, "submit");
        CHECK(albedo_ticket_wait(t, &res) == ALBEDO_OK, "wait: %s", albedo_ticket_error(t));
        if (res) text[k] = strdup(res->text);
        albedo_engine_stats st;
        albedo_engine_get_stats(e, &st);
        steps[k] = st.steps;
        albedo_ticket_free(t);
        check_no_leak(e, "chunks");
        albedo_engine_free(e);
    }
    printf("chunks: %llu steps with the prompt in one piece, %llu with 5 rows per step\n", (unsigned long long)steps[0],
           (unsigned long long)steps[1]);
    CHECK(steps[1] >= steps[0] + 5, "the prompt was not split (%llu and %llu steps)", (unsigned long long)steps[0],
          (unsigned long long)steps[1]);
    CHECK(text[0] && text[1] && !strcmp(text[0], text[1]), "chunked prompt: '%s' vs '%s'", text[0] ? text[0] : "?",
          text[1] ? text[1] : "?");
    free(text[0]);
    free(text[1]);
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
        /* fixtures, prefix, cancel, limits, fairness, sessions, overlap, ahead, chunks */
        const char *only = getenv("ALBEDO_TEST_ONLY");
        if (!only || !strcmp(only, "limits")) test_limits(m);
        if (!only || !strcmp(only, "fairness")) test_fairness(m);
        if (!only || !strcmp(only, "cancel")) test_cancel(m), test_queued_deadline(m), test_outlive(m);
        if (!only || !strcmp(only, "prefix")) test_prefix(m, image_dir);
        if (!only || !strcmp(only, "chunks")) test_chunks(m);
        if (!only || !strcmp(only, "overlap")) test_overlap(m, image_dir);
        if (!only || !strcmp(only, "ahead")) test_ahead(m, image_dir);
        if (!only || !strcmp(only, "sessions")) test_sessions(m, json_object_get(root, "cases"), image_dir);
        if (!only || !strcmp(only, "fixtures")) test_fixtures(m, json_object_get(root, "cases"), image_dir);
    }
    albedo_model_free(m);
    json_decref(root);
    TEST_MAIN_END();
}
