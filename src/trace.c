/*
 * trace.c — the engine's optional timing trace (trace.h): the records kept
 * while the engine runs and the breakdown written when it is freed.
 */
#define _POSIX_C_SOURCE 200809L
#include "trace.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct eng_trace {
    char *path;
    tk_trace *tk;
    int n_tk, cap_tk;
    /* steps: all, and the one-row ones (every sequence decoding) */
    long steps, steps_req, steps_1;
    double prep_ms, dev_ms, dev1_ms;
    long wakes;
};

eng_trace *etr_new(void) {
    const char *p = getenv("ALBEDO_TRACE");
    if (!p || !*p) return NULL;
    eng_trace *tr = calloc(1, sizeof *tr);
    if (!tr) return NULL;
    size_t n = strlen(p) + 1;
    if (!(tr->path = malloc(n))) {
        free(tr);
        return NULL;
    }
    memcpy(tr->path, p, n);
    return tr;
}

void etr_ticket(eng_trace *tr, const tk_trace *t) {
    if (!tr) return;
    if (tr->n_tk == tr->cap_tk) {
        int nc = tr->cap_tk ? 2 * tr->cap_tk : 256;
        tk_trace *q = realloc(tr->tk, (size_t)nc * sizeof *q);
        if (!q) return; /* a record lost, nothing else */
        tr->tk = q;
        tr->cap_tk = nc;
    }
    tr->tk[tr->n_tk++] = *t;
}

void etr_step(eng_trace *tr, double t0, double d0, double d1, int n_seq, int rows, int by_request) {
    if (!tr) return;
    tr->steps++;
    tr->steps_req += by_request != 0;
    tr->prep_ms += d0 - t0;
    tr->dev_ms += d1 - d0;
    if (rows == n_seq) {
        tr->steps_1++;
        tr->dev1_ms += d1 - d0;
    }
}

void etr_wake(eng_trace *tr) {
    if (tr) tr->wakes++;
}

static int cmp_d(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int cmp_admit(const void *a, const void *b) {
    const tk_trace *x = a, *y = b;
    return x->admit < y->admit ? -1 : x->admit > y->admit;
}

/* Interval b - a of ticket t (both passed), else NAN-free "skip": -1. */
typedef double (*span_fn)(const tk_trace *t);

static double d_of(double a, double b) { return a > 0 && b > 0 ? b - a : -1; }
static double sp_queue(const tk_trace *t) { return d_of(t->submit, t->admit); }
static double sp_sess(const tk_trace *t) { return d_of(t->admit, t->sess); }
static double sp_to_worker(const tk_trace *t) { return d_of(t->sess, t->b_start); }
static double sp_decode(const tk_trace *t) { return d_of(t->b_start, t->b_decode); }
static double sp_crops(const tk_trace *t) { return d_of(t->b_decode, t->b_crops); }
static double sp_dev(const tk_trace *t) { return d_of(t->b_crops, t->b_dev); }
static double sp_collect(const tk_trace *t) { return d_of(t->b_dev, t->collect); }
static double sp_running(const tk_trace *t) { return d_of(t->collect > 0 ? t->collect : t->sess, t->run); }
static double sp_thread(const tk_trace *t) { return d_of(t->run, t->gen0); }
static double sp_prep(const tk_trace *t) { return d_of(t->gen0, t->first_post); }
static double sp_prompt(const tk_trace *t) { return d_of(t->first_post, t->first_served); }
static double sp_loops(const tk_trace *t) { return d_of(t->first_served, t->gen1); }
static double sp_wait(const tk_trace *t) {
    return t->first_served > 0 ? t->wait_ms - (t->first_served - t->first_post) : -1;
}
static double sp_stepdev(const tk_trace *t) { return t->n_post ? t->step_ms : -1; }
static double sp_host(const tk_trace *t) { return t->n_post ? t->host_ms : -1; }
static double sp_reap(const tk_trace *t) { return d_of(t->gen1, t->reap); }
static double sp_end(const tk_trace *t) { return d_of(t->reap, t->done); }
static double sp_lat(const tk_trace *t) { return d_of(t->admit, t->gen1); }
static double sp_total(const tk_trace *t) { return d_of(t->admit, t->done); }
static double sp_posts(const tk_trace *t) { return t->n_post; }

typedef struct span {
    const char *name;
    span_fn f;
} span;

static const span SPANS[] = {
    {"queue (submit -> admit)", sp_queue},
    {"light session (admit -> made)", sp_sess},
    {"to the image worker (-> picked up)", sp_to_worker},
    {"image decode (host)", sp_decode},
    {"crops (host)", sp_crops},
    {"vision + prefix (device, synced)", sp_dev},
    {"built -> collected by the scheduler", sp_collect},
    {"-> running (go_running returned)", sp_running},
    {"thread start (-> loops start)", sp_thread},
    {"prompt built (-> first post)", sp_prep},
    {"prompt step (post -> served)", sp_prompt},
    {"loops after the prompt (-> end)", sp_loops},
    {"  of which waiting for steps", sp_wait},
    {"  of which host between posts", sp_host},
    {"  device calls of its steps (all)", sp_stepdev},
    {"end of loops -> reaped (joined)", sp_reap},
    {"reaped -> ended", sp_end},
    {"latency as reported (admit -> end)", sp_lat},
    {"admit -> ended", sp_total},
    {"posts", sp_posts},
};

/* Median and mean of span f over the tickets with cached == which. */
static void stats(const eng_trace *tr, span_fn f, int which, double *tmp, double *med, double *mean, int *n) {
    int k = 0;
    double sum = 0;
    for (int i = 0; i < tr->n_tk; i++) {
        const tk_trace *t = &tr->tk[i];
        if (t->cached != which) continue;
        const double v = f(t);
        if (v < 0) continue;
        tmp[k++] = v;
        sum += v;
    }
    qsort(tmp, (size_t)k, sizeof *tmp, cmp_d);
    *n = k;
    *med = k ? tmp[k / 2] : 0;
    *mean = k ? sum / k : 0;
}

void etr_free(eng_trace *tr) {
    if (!tr) return;
    FILE *f = tr->n_tk ? fopen(tr->path, "a") : NULL;
    double *tmp = malloc((size_t)(tr->n_tk ? tr->n_tk : 1) * sizeof *tmp);
    if (f && tmp) {
        qsort(tr->tk, (size_t)tr->n_tk, sizeof *tr->tk, cmp_admit);
        double t_first = tr->tk[0].submit, t_last = 0, lat_sum = 0, idle = 0, held = 0;
        int n_cold = 0;
        for (int i = 0; i < tr->n_tk; i++) {
            const tk_trace *t = &tr->tk[i];
            if (t->submit < t_first) t_first = t->submit;
            if (t->done > t_last) t_last = t->done;
            n_cold += !t->cached;
            if (sp_lat(t) > 0) lat_sum += sp_lat(t);
            /* Time with no ticket admitted: before this admission, since
             * every earlier-admitted ticket ended. */
            if (i && t->admit > held) idle += t->admit - held;
            if (t->done > held) held = t->done;
        }
        fprintf(f, "albedo engine trace: %d tickets (%d building their image, %d from a cached prefix), wall %.1f ms\n",
                tr->n_tk, n_cold, tr->n_tk - n_cold, t_last - t_first);
        fprintf(f, "  sum of reported latencies %.1f ms; no ticket admitted for %.1f ms (%.2f ms a ticket)\n", lat_sum,
                idle, tr->n_tk > 1 ? idle / (tr->n_tk - 1) : 0);
        fprintf(f,
                "  steps %ld (%ld run by request threads), preparation %.3f ms, device call %.3f ms a step;"
                " one-row steps %ld, device call %.3f ms\n",
                tr->steps, tr->steps_req, tr->steps ? tr->prep_ms / tr->steps : 0,
                tr->steps ? tr->dev_ms / tr->steps : 0, tr->steps_1, tr->steps_1 ? tr->dev1_ms / tr->steps_1 : 0);
        fprintf(f, "  scheduler passes %ld (%.1f a ticket)\n", tr->wakes, (double)tr->wakes / tr->n_tk);
        fprintf(f, "%-38s %9s %9s %5s | %9s %9s %5s\n", "phase (ms)", "cold P50", "mean", "n", "cached P50", "mean",
                "n");
        for (size_t s = 0; s < sizeof SPANS / sizeof SPANS[0]; s++) {
            double m0, a0, m1, a1;
            int n0, n1;
            stats(tr, SPANS[s].f, 0, tmp, &m0, &a0, &n0);
            stats(tr, SPANS[s].f, 1, tmp, &m1, &a1, &n1);
            fprintf(f, "%-38s %9.3f %9.3f %5d | %9.3f %9.3f %5d\n", SPANS[s].name, m0, a0, n0, m1, a1, n1);
        }
        fprintf(f, "id,cached,crops,submit,admit,sess,b_start,b_decode,b_crops,b_dev,collect,run,gen0,first_post,"
                   "first_served,gen1,reap,done,wait_ms,host_ms,step_ms,n_post,own_steps\n");
        for (int i = 0; i < tr->n_tk; i++) {
            const tk_trace *t = &tr->tk[i];
#define R(x) ((x) > 0 ? (x)-t_first : -1.0)
            fprintf(f,
                    "%d,%d,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%."
                    "3f,%d,%d\n",
                    t->id, t->cached, t->crops, R(t->submit), R(t->admit), R(t->sess), R(t->b_start), R(t->b_decode),
                    R(t->b_crops), R(t->b_dev), R(t->collect), R(t->run), R(t->gen0), R(t->first_post),
                    R(t->first_served), R(t->gen1), R(t->reap), R(t->done), t->wait_ms, t->host_ms, t->step_ms,
                    t->n_post, t->own_steps);
#undef R
        }
    }
    if (f) fclose(f);
    free(tmp);
    free(tr->tk);
    free(tr->path);
    free(tr);
}
