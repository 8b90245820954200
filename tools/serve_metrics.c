/*
 * serve_metrics.c — the counters behind GET /metrics, in the Prometheus text
 * format (version 0.0.4): requests by endpoint and status, errors by code,
 * tokens in, out and reused from cached image prefixes, a latency histogram
 * per endpoint, and the engine's gauges and counters (queue, batch, KV
 * blocks, prefix cache, steps), read at scrape time. One mutex; updates are
 * a few adds.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "serve_internal.h"

#define N_BUCKETS 12
static const double bucket_le[N_BUCKETS] = {0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120};

/* Statuses seen are few; a small table per endpoint suffices. */
#define MAX_STATUSES 16
typedef struct ep_stats {
    int status[MAX_STATUSES];
    unsigned long long count[MAX_STATUSES];
    unsigned long long bucket[N_BUCKETS + 1]; /* last: +Inf */
    double sum_s;
    unsigned long long n;
} ep_stats;

#define MAX_CODES 32
static struct {
    pthread_mutex_t mu;
    ep_stats ep[EP_COUNT];
    char code[MAX_CODES][32];
    unsigned long long code_n[MAX_CODES];
    unsigned long long in_tokens, out_tokens, cached_tokens, cancelled;
} M = {.mu = PTHREAD_MUTEX_INITIALIZER};

void metrics_init(void) {
    pthread_mutex_lock(&M.mu);
    memset(M.ep, 0, sizeof M.ep);
    memset(M.code, 0, sizeof M.code);
    memset(M.code_n, 0, sizeof M.code_n);
    M.in_tokens = M.out_tokens = M.cached_tokens = M.cancelled = 0;
    pthread_mutex_unlock(&M.mu);
}

void metrics_request(endpoint ep, int status, double latency_s) {
    if ((unsigned)ep >= EP_COUNT) ep = EP_OTHER;
    pthread_mutex_lock(&M.mu);
    ep_stats *e = &M.ep[ep];
    for (int i = 0; i < MAX_STATUSES; i++) {
        if (e->status[i] == status || e->status[i] == 0) {
            e->status[i] = status;
            e->count[i]++;
            break;
        }
    }
    int b = 0;
    while (b < N_BUCKETS && latency_s > bucket_le[b]) b++;
    e->bucket[b]++;
    e->sum_s += latency_s;
    e->n++;
    pthread_mutex_unlock(&M.mu);
}

void metrics_error(const char *code) {
    pthread_mutex_lock(&M.mu);
    for (int i = 0; i < MAX_CODES; i++) {
        if (!M.code[i][0] || !strcmp(M.code[i], code)) {
            if (!M.code[i][0]) snprintf(M.code[i], sizeof M.code[i], "%s", code);
            M.code_n[i]++;
            break;
        }
    }
    pthread_mutex_unlock(&M.mu);
}

void metrics_tokens(int in_tokens, int out_tokens, int cached_tokens) {
    pthread_mutex_lock(&M.mu);
    M.in_tokens += (unsigned long long)in_tokens;
    M.out_tokens += (unsigned long long)out_tokens;
    M.cached_tokens += (unsigned long long)cached_tokens;
    pthread_mutex_unlock(&M.mu);
}

void metrics_cancelled(void) {
    pthread_mutex_lock(&M.mu);
    M.cancelled++;
    pthread_mutex_unlock(&M.mu);
}

char *metrics_render(const albedo_engine_stats *es, int max_batch, int ready) {
    const albedo_engine_stats zero = {0};
    if (!es) es = &zero;
    sbuf b = {0};
    char line[256];
#define OUT(...) (snprintf(line, sizeof line, __VA_ARGS__), sbuf_puts(&b, line))
    pthread_mutex_lock(&M.mu);
    OUT("# HELP albedo_requests_total HTTP requests answered, by endpoint and status.\n");
    OUT("# TYPE albedo_requests_total counter\n");
    for (int e = 0; e < EP_COUNT; e++)
        for (int i = 0; i < MAX_STATUSES && M.ep[e].status[i]; i++)
            OUT("albedo_requests_total{endpoint=\"%s\",status=\"%d\"} %llu\n", endpoint_name((endpoint)e),
                M.ep[e].status[i], M.ep[e].count[i]);
    OUT("# HELP albedo_errors_total Error responses, by error code.\n");
    OUT("# TYPE albedo_errors_total counter\n");
    for (int i = 0; i < MAX_CODES && M.code[i][0]; i++)
        OUT("albedo_errors_total{code=\"%s\"} %llu\n", M.code[i], M.code_n[i]);
    OUT("# HELP albedo_cancelled_total Generations stopped because the client went away.\n");
    OUT("# TYPE albedo_cancelled_total counter\n");
    OUT("albedo_cancelled_total %llu\n", M.cancelled);
    OUT("# HELP albedo_input_tokens_total Prompt tokens processed, image positions included.\n");
    OUT("# TYPE albedo_input_tokens_total counter\n");
    OUT("albedo_input_tokens_total %llu\n", M.in_tokens);
    OUT("# HELP albedo_output_tokens_total Tokens generated.\n");
    OUT("# TYPE albedo_output_tokens_total counter\n");
    OUT("albedo_output_tokens_total %llu\n", M.out_tokens);
    OUT("# HELP albedo_cached_tokens_total Input positions reused from a cached image prefix.\n");
    OUT("# TYPE albedo_cached_tokens_total counter\n");
    OUT("albedo_cached_tokens_total %llu\n", M.cached_tokens);
    OUT("# HELP albedo_request_duration_seconds Time from request start to the last byte queued.\n");
    OUT("# TYPE albedo_request_duration_seconds histogram\n");
    for (int e = 0; e < EP_COUNT; e++) {
        const ep_stats *s = &M.ep[e];
        if (!s->n) continue;
        unsigned long long cum = 0;
        for (int k = 0; k < N_BUCKETS; k++) {
            cum += s->bucket[k];
            OUT("albedo_request_duration_seconds_bucket{endpoint=\"%s\",le=\"%g\"} %llu\n", endpoint_name((endpoint)e),
                bucket_le[k], cum);
        }
        cum += s->bucket[N_BUCKETS];
        OUT("albedo_request_duration_seconds_bucket{endpoint=\"%s\",le=\"+Inf\"} %llu\n", endpoint_name((endpoint)e),
            cum);
        OUT("albedo_request_duration_seconds_sum{endpoint=\"%s\"} %.6f\n", endpoint_name((endpoint)e), s->sum_s);
        OUT("albedo_request_duration_seconds_count{endpoint=\"%s\"} %llu\n", endpoint_name((endpoint)e), s->n);
    }
    pthread_mutex_unlock(&M.mu);
    OUT("# HELP albedo_queue_depth Requests waiting for admission to the engine.\n");
    OUT("# TYPE albedo_queue_depth gauge\n");
    OUT("albedo_queue_depth %d\n", es->queued);
    OUT("# HELP albedo_in_flight Requests admitted and running (image encoding included).\n");
    OUT("# TYPE albedo_in_flight gauge\n");
    OUT("albedo_in_flight %d\n", es->running);
    OUT("# HELP albedo_encoding Running requests whose new image is being encoded.\n");
    OUT("# TYPE albedo_encoding gauge\n");
    OUT("albedo_encoding %d\n", es->encoding);
    OUT("# HELP albedo_workers Requests the engine runs at once (--max-batch).\n");
    OUT("# TYPE albedo_workers gauge\n");
    OUT("albedo_workers %d\n", max_batch);
    OUT("# HELP albedo_kv_blocks_used KV cache blocks held by requests and cached image prefixes.\n");
    OUT("# TYPE albedo_kv_blocks_used gauge\n");
    OUT("albedo_kv_blocks_used %d\n", es->kv_blocks_used);
    OUT("# HELP albedo_kv_blocks_total KV cache blocks.\n");
    OUT("# TYPE albedo_kv_blocks_total gauge\n");
    OUT("albedo_kv_blocks_total %d\n", es->kv_blocks_total);
    OUT("# HELP albedo_prefix_cache_hits_total Requests whose image prefix was cached.\n");
    OUT("# TYPE albedo_prefix_cache_hits_total counter\n");
    OUT("albedo_prefix_cache_hits_total %llu\n", (unsigned long long)es->prefix_hits);
    OUT("# HELP albedo_prefix_cache_misses_total Requests whose image was encoded.\n");
    OUT("# TYPE albedo_prefix_cache_misses_total counter\n");
    OUT("albedo_prefix_cache_misses_total %llu\n", (unsigned long long)es->prefix_misses);
    OUT("# HELP albedo_prefix_cache_evictions_total Cached image prefixes evicted for room.\n");
    OUT("# TYPE albedo_prefix_cache_evictions_total counter\n");
    OUT("albedo_prefix_cache_evictions_total %llu\n", (unsigned long long)es->prefix_evictions);
    OUT("# HELP albedo_engine_steps_total Batched forward steps.\n");
    OUT("# TYPE albedo_engine_steps_total counter\n");
    OUT("albedo_engine_steps_total %llu\n", (unsigned long long)es->steps);
    OUT("# HELP albedo_engine_step_sequences_total Requests over all steps (divided by steps: the mean batch).\n");
    OUT("# TYPE albedo_engine_step_sequences_total counter\n");
    OUT("albedo_engine_step_sequences_total %llu\n", (unsigned long long)es->step_sequences);
    OUT("# HELP albedo_engine_step_rows_total Token rows over all steps.\n");
    OUT("# TYPE albedo_engine_step_rows_total counter\n");
    OUT("albedo_engine_step_rows_total %llu\n", (unsigned long long)es->step_rows);
    OUT("# HELP albedo_engine_steps_while_encoding_total Steps run while an image was being encoded.\n");
    OUT("# TYPE albedo_engine_steps_while_encoding_total counter\n");
    OUT("albedo_engine_steps_while_encoding_total %llu\n", (unsigned long long)es->steps_while_encoding);
    OUT("# HELP albedo_model_ready 1 once the model is loaded.\n");
    OUT("# TYPE albedo_model_ready gauge\n");
    OUT("albedo_model_ready %d\n", ready);
#undef OUT
    return b.p;
}
