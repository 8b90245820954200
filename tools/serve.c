/*
 * serve.c — `albedo serve`: an HTTP server speaking Moondream's REST dialect
 * (spec/api.md §2, §3.3) and OpenAI's /v1/chat/completions, built on
 * libmicrohttpd. This file is the HTTP side: options, routing, auth, body
 * limits, suspending connections while the engine runs their request, and
 * streaming its Server-Sent Events. Parsing requests and writing responses
 * is in serve_api.c, the engine and its tickets in serve_queue.c, counters
 * in serve_metrics.c. Like every tool it is a client of the library and
 * includes only albedo.h of it.
 *
 * Threads: microhttpd's internal pool (epoll where available) owns the
 * sockets and never blocks on the engine, so /health answers however busy
 * the engine is; the engine's threads (albedo_engine) run the requests,
 * batched; the main thread loads the model in the background and then
 * waits for SIGINT/SIGTERM to drain.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "albedo.h"
#include "serve.h"
#include "serve_internal.h"
#include "serve_queue.h"

typedef struct server {
    /* options */
    const char *host, *model_spec, *backend, *precision;
    int port, threads, queue, http_threads, max_connections, max_context, quiet;
    int workers;     /* requests the engine runs at once (--max-batch, or its old name --workers) */
    size_t kv_bytes; /* --kv-cache MB; 0 = the engine's default */
    size_t max_body;
    const char *api_key;
    double timeout_s;
    api_defaults defs; /* the --default-* flags; at load, completed with the model's own defaults */

    /* state */
    struct MHD_Daemon *d;
    pthread_t loader;
    albedo_model *m;
    executor *ex;     /* published before ready is set */
    atomic_int ready; /* 1 = serving, -1 = loading failed */
    atomic_int shutting_down;
    atomic_int active; /* requests between their first byte and their completion */
    char model_name[128];
    char model_desc[256];
    char load_error[512];
} server;

typedef struct conn_ctx {
    server *srv;
    endpoint ep;
    struct MHD_Connection *conn;
    int status;
    int too_large;
    int refuse;     /* 401, 404 or 405 decided from the headers, answered once the body is read */
    int route_post; /* the route's method (for the Allow header of a 405) */
    uint64_t received;
    sbuf body;
    job *j;
    double t0;
    char method[8];
    char path[128];
} conn_ctx;

/* serve_api.c wakes connections through this, so that only this file links
 * against microhttpd. */
void serve_resume_connection(struct MHD_Connection *c) { MHD_resume_connection(c); }

/* serve_queue.c asks this of suspended connections, which microhttpd does
 * not watch: 1 once the client closed its side (end of stream or a failed
 * socket). A peek consumes nothing; a pipelined next request reads as open.
 * Like most servers, a client that half-closes after its request counts as
 * gone. */
int serve_connection_closed(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return 0;
    char b;
    ssize_t n = recv(ci->connect_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- responses ---------------------------------------------------------------- */

static enum MHD_Result respond(conn_ctx *x, int status, const char *ctype, char *body, const char *extra_hdr,
                               const char *extra_val) {
    static const char oom[] = "{\"error\": {\"message\": \"out of memory\", \"type\": \"server_error\", "
                              "\"param\": null, \"code\": \"out_of_memory\"}}";
    struct MHD_Response *r;
    if (body) {
        r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
    } else { /* the body could not be built: out of memory */
        if (status < 400) status = 500;
        r = MHD_create_response_from_buffer(sizeof oom - 1, (void *)oom, MHD_RESPMEM_PERSISTENT);
    }
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (x->j && x->j->request_id[0]) MHD_add_response_header(r, "X-Request-Id", x->j->request_id);
    if (extra_hdr) MHD_add_response_header(r, extra_hdr, extra_val);
    x->status = status;
    enum MHD_Result ret = MHD_queue_response(x->conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result respond_json(conn_ctx *x, int status, char *body) {
    return respond(x, status, "application/json", body, NULL, NULL);
}

static enum MHD_Result respond_error(conn_ctx *x, int status, const char *code, const char *param, const char *msg) {
    return respond_json(x, status, api_error_body(status, code, param, "%s", msg));
}

static enum MHD_Result respond_too_large(conn_ctx *x) {
    char msg[128];
    snprintf(msg, sizeof msg, "the request body is larger than %zu bytes (--max-body)", x->srv->max_body);
    return respond_error(x, 413, "body_too_large", NULL, msg);
}

/* The answer to a request refused from its headers (conn_ctx.refuse). */
static enum MHD_Result refuse(conn_ctx *x) {
    switch (x->refuse) {
    case 404: return respond_error(x, 404, "not_found", NULL, "no such route");
    case 405:
        return respond(
            x, 405, "application/json",
            api_error_body(405, "method_not_allowed", NULL, "use %s for this route", x->route_post ? "POST" : "GET"),
            MHD_HTTP_HEADER_ALLOW, x->route_post ? "POST" : "GET, HEAD");
    default:
        return respond(x, 401, "application/json",
                       api_error_body(401, "invalid_api_key", NULL, "missing or invalid API key"),
                       MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    }
}

/* How much of an oversized body is read (and dropped) so that the client
 * gets to read its 413: four times the limit, at least 16 MB. */
static uint64_t drain_limit(const server *s) {
    uint64_t d = (uint64_t)s->max_body * 4;
    return d < (16u << 20) ? (16u << 20) : d;
}

/* The SSE body: whatever the worker has appended so far; suspends the
 * connection while there is nothing new, the worker resumes it. */
static ssize_t sse_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    conn_ctx *x = cls;
    job *j = x->j;
    ssize_t n = 0;
    pthread_mutex_lock(&j->mu);
    if (pos < j->sse.len) {
        size_t k = j->sse.len - (size_t)pos;
        if (k > max) k = max;
        memcpy(buf, j->sse.p + pos, k);
        n = (ssize_t)k;
    } else if (j->done) {
        n = MHD_CONTENT_READER_END_OF_STREAM;
    } else {
        j->suspended = 1;
        MHD_suspend_connection(x->conn);
    }
    pthread_mutex_unlock(&j->mu);
    return n;
}

/* Called with the job ready: stream started, or finished. */
static enum MHD_Result answer_job(conn_ctx *x) {
    job *j = x->j;
    pthread_mutex_lock(&j->mu);
    int streaming = j->stream && j->sse.len > 0;
    int status = j->status;
    const int hung_up = j->hung_up;
    char *body = j->body;
    j->body = NULL;
    pthread_mutex_unlock(&j->mu);
    if (!streaming && status == 499 && hung_up) { /* the client closed: nobody to answer, logged as 499 */
        free(body);
        return MHD_NO;
    }
    if (streaming) {
        free(body);
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, sse_reader, x, NULL);
        if (!r) return MHD_NO;
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        MHD_add_response_header(r, "X-Request-Id", j->request_id);
        x->status = 200;
        enum MHD_Result ret = MHD_queue_response(x->conn, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        return ret;
    }
    if (status == 0 || status == 499) { /* cancelled with nobody listening */
        status = 500;
        body = api_error_body(500, "cancelled", NULL, "the request was cancelled");
    }
    return respond_json(x, status, body);
}

/* ---- routes --------------------------------------------------------------------- */

static int route(const char *url, endpoint *ep, int *post) {
    static const struct {
        const char *path;
        endpoint ep;
        int post;
    } routes[] = {
        {"/v1/caption", EP_CAPTION, 1}, {"/v1/query", EP_QUERY, 1},           {"/v1/detect", EP_DETECT, 1},
        {"/v1/point", EP_POINT, 1},     {"/v1/chat/completions", EP_CHAT, 1}, {"/health", EP_HEALTH, 0},
        {"/v1/models", EP_MODELS, 0},   {"/metrics", EP_METRICS, 0},
    };
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++)
        if (!strcmp(url, routes[i].path)) {
            *ep = routes[i].ep;
            *post = routes[i].post;
            return 1;
        }
    *ep = EP_OTHER;
    return 0;
}

/* Constant-time in the key's content: every byte of the configured key is
 * compared whatever the header holds. */
static int key_matches(const char *given, const char *key) {
    size_t n = strlen(key), g = strlen(given);
    unsigned char d = (unsigned char)(g != n);
    for (size_t i = 0; i < n; i++) d |= (unsigned char)((i < g ? (unsigned char)given[i] : 0) ^ (unsigned char)key[i]);
    return d == 0;
}

static int authorized(const server *s, struct MHD_Connection *c) {
    if (!s->api_key || !s->api_key[0]) return 1;
    int ok = 0;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Moondream-Auth");
    if (h) ok |= key_matches(h, s->api_key);
    h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (h && !strncmp(h, "Bearer ", 7)) ok |= key_matches(h + 7, s->api_key);
    return ok;
}

static enum MHD_Result get_route(conn_ctx *x) {
    server *s = x->srv;
    char tmp[1024];
    if (x->ep == EP_HEALTH) {
        int ready = atomic_load(&s->ready);
        if (ready == 1 && !atomic_load(&s->shutting_down)) {
            snprintf(tmp, sizeof tmp,
                     "{\"status\": \"ok\", \"server\": \"albedo\", \"version\": \"%s\", \"model\": \"%s\"}",
                     albedo_version(), s->model_name);
            return respond_json(x, 200, strdup(tmp));
        }
        snprintf(tmp, sizeof tmp, "{\"status\": \"%s\", \"server\": \"albedo\", \"version\": \"%s\"}",
                 atomic_load(&s->shutting_down) ? "shutting_down"
                 : ready < 0                    ? "error"
                                                : "loading",
                 albedo_version());
        return respond_json(x, 503, strdup(tmp));
    }
    if (x->ep == EP_MODELS) {
        /* Once loaded: the settings a request that sends none gets. */
        char defs[256] = "";
        if (atomic_load(&s->ready) == 1)
            snprintf(defs, sizeof defs,
                     ", \"defaults\": {\"temperature\": %g, \"top_p\": %g, \"max_tokens\": %d, \"max_objects\": %d}",
                     (double)s->defs.temperature, (double)s->defs.top_p, s->defs.max_tokens, s->defs.max_objects);
        snprintf(tmp, sizeof tmp,
                 "{\"object\": \"list\", \"data\": [{\"id\": \"%s\", \"object\": \"model\", \"created\": 0, "
                 "\"owned_by\": \"albedo\", \"ready\": %s, \"description\": \"%s\"%s}]}",
                 s->model_name, atomic_load(&s->ready) == 1 ? "true" : "false", s->model_desc, defs);
        return respond_json(x, 200, strdup(tmp));
    }
    albedo_engine_stats es;
    int max_batch = s->workers, ready = atomic_load(&s->ready) == 1;
    if (ready) executor_stats(s->ex, &es, &max_batch);
    return respond(x, 200, "text/plain; version=0.0.4", metrics_render(ready ? &es : NULL, max_batch, ready), NULL,
                   NULL);
}

/* The whole body is in: parse it, queue the job, suspend until it is ready. */
static enum MHD_Result submit(conn_ctx *x) {
    server *s = x->srv;
    if (atomic_load(&s->shutting_down))
        return respond_error(x, 503, "shutting_down", NULL, "the server is shutting down");
    if (atomic_load(&s->ready) != 1)
        return respond_error(x, 503, "not_ready", NULL,
                             atomic_load(&s->ready) < 0 ? "the model failed to load" : "the model is still loading");
    job *j = job_new(x->ep);
    if (!j) return respond_json(x, 500, NULL);
    char *err = NULL;
    int st = api_parse(j, x->body.p ? x->body.p : "", x->body.len, &s->defs, &err);
    sbuf_free(&x->body);
    if (st) {
        job_unref(j);
        return respond_json(x, st, err);
    }
    if (s->timeout_s > 0) j->deadline_ms = j->t_accept_ms + s->timeout_s * 1e3;
    j->conn = x->conn;
    x->j = j;
    int rc = executor_submit(s->ex, j);
    if (rc == EXEC_REJECTED) return answer_job(x); /* the request's error, already written */
    if (rc != EXEC_OK) {
        x->j = NULL;
        job_unref(j);
        if (rc == EXEC_FULL) return respond_error(x, 429, "queue_full", NULL, "too many requests queued; retry later");
        return respond_error(x, 503, "shutting_down", NULL, "the server is shutting down");
    }
    pthread_mutex_lock(&j->mu);
    int ready = j->done || (j->stream && j->sse.len > 0);
    if (!ready) {
        j->suspended = 1;
        MHD_suspend_connection(x->conn);
    }
    pthread_mutex_unlock(&j->mu);
    return ready ? answer_job(x) : MHD_YES;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    server *s = cls;
    conn_ctx *x = *con_cls;
    (void)version;
    if (!x) {
        x = calloc(1, sizeof *x);
        if (!x) return MHD_NO;
        *con_cls = x;
        x->srv = s;
        x->conn = c;
        x->t0 = mono_s();
        snprintf(x->method, sizeof x->method, "%s", method);
        snprintf(x->path, sizeof x->path, "%s", url);
        for (char *p = x->path; *p; p++) /* the URL arrives %-decoded: no control bytes into the log */
            if ((unsigned char)*p < 0x20 || *p == 0x7f) *p = '?';
        atomic_fetch_add(&s->active, 1);
        int post = 0;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        const char *ex = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_EXPECT);
        const char *te = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
        unsigned long long len = cl ? strtoull(cl, NULL, 10) : 0;
        int is_post = !strcmp(method, MHD_HTTP_METHOD_POST);
        int is_get = !strcmp(method, MHD_HTTP_METHOD_GET) || !strcmp(method, MHD_HTTP_METHOD_HEAD);
        if (!route(url, &x->ep, &post))
            x->refuse = 404;
        else if (post ? !is_post : !is_get)
            x->refuse = 405;
        else if (x->ep != EP_HEALTH && !authorized(s, c))
            x->refuse = 401;
        x->route_post = post;
        if (x->refuse) {
            /* Answering while the client still sends its body makes TCP
             * reset the connection before the client reads the answer: a
             * body up to drain_limit is read and dropped first, as for 413.
             * A client waiting for "100 Continue" has sent nothing yet. */
            int body = (cl && len > 0) || te;
            if (!body || (ex && !strcasecmp(ex, "100-continue")) || len > drain_limit(s)) return refuse(x);
            x->too_large = 1; /* keep nothing */
            return MHD_YES;
        }
        if (!post) return get_route(x);
        if (cl && len > s->max_body) {
            /* A client waiting for "100 Continue" has sent nothing yet: refuse
             * now. Others are already sending; closing on them while their
             * body is in flight makes TCP reset the connection and the
             * client never reads the 413, so a body up to drain_limit is read
             * and dropped first (memory stays bounded: nothing is kept). */
            if ((ex && !strcasecmp(ex, "100-continue")) || len > drain_limit(s)) return respond_too_large(x);
            x->too_large = 1;
        }
        return MHD_YES; /* wait for the body */
    }
    if (*upload_size) {
        /* Bodies are checked as they arrive (chunked ones have no
         * Content-Length): past max-body nothing more is kept; past the
         * drain limit the connection is answered and closed at once. A
         * response may be queued on a suspended connection at any time
         * (microhttpd.h), which is how it is queued mid-upload. */
        x->received += *upload_size;
        if (!x->too_large && x->received > s->max_body) {
            x->too_large = 1;
            sbuf_free(&x->body);
        }
        if (x->too_large && x->received > drain_limit(s) && !x->status) {
            MHD_suspend_connection(c);
            enum MHD_Result r = x->refuse ? refuse(x) : respond_too_large(x);
            MHD_resume_connection(c);
            *upload_size = 0;
            return r;
        }
        if (!x->too_large && sbuf_put(&x->body, upload, *upload_size)) return MHD_NO;
        *upload_size = 0;
        return MHD_YES;
    }
    if (x->refuse && !x->status) return refuse(x);
    if (x->too_large && !x->status) return respond_too_large(x);
    if (!x->j) return submit(x);
    /* Resumed by the worker (or spuriously): answer if ready, else wait on. */
    job *j = x->j;
    pthread_mutex_lock(&j->mu);
    int ready = j->done || (j->stream && j->sse.len > 0);
    if (!ready) {
        j->suspended = 1;
        MHD_suspend_connection(c);
    }
    pthread_mutex_unlock(&j->mu);
    return ready ? answer_job(x) : MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    server *s = cls;
    conn_ctx *x = *con_cls;
    (void)c;
    if (!x) return;
    *con_cls = NULL;
    double lat = mono_s() - x->t0;
    int aborted = toe != MHD_REQUEST_TERMINATED_COMPLETED_OK;
    if (x->j) {
        /* A request still queued or running is cancelled: it leaves the
         * queue, or its batch slot at its next step. */
        pthread_mutex_lock(&x->j->mu);
        x->j->gone = 1;
        if (x->j->ticket) albedo_ticket_cancel(x->j->ticket);
        pthread_mutex_unlock(&x->j->mu);
    }
    int status = x->status ? x->status : 499;
    metrics_request(x->ep, status, lat);
    if (!s->quiet)
        fprintf(stderr, "albedo: %s %s %d %.1f ms%s%s%s\n", x->method, x->path, status, lat * 1e3, x->j ? " id=" : "",
                x->j ? x->j->request_id : "", aborted ? " (client gone)" : "");
    job_unref(x->j);
    sbuf_free(&x->body);
    free(x);
    atomic_fetch_sub(&s->active, 1);
}

/* ---- model loading and lifecycle ---------------------------------------------- */

static int tty_progress_last;

static void progress(void *user, const char *file, uint64_t done, uint64_t total) {
    (void)user;
    if (!isatty(2)) return;
    int pct = total ? (int)(done * 100 / total) : 0;
    if (pct == tty_progress_last && done != total) return;
    tty_progress_last = pct;
    fprintf(stderr, "\ralbedo: downloading %s %3d%% (%.1f / %.1f MB)", file, pct, (double)done / 1e6,
            (double)total / 1e6);
    if (done == total) fputc('\n', stderr);
}

static void *loader_main(void *arg) {
    server *s = arg;
    char dir[4096];
    albedo_fetch_params fp = albedo_fetch_params_default();
    fp.progress = progress;
    if (albedo_model_fetch(s->model_spec, &fp, dir, sizeof dir) != ALBEDO_OK) {
        snprintf(s->load_error, sizeof s->load_error, "%s", albedo_last_error());
        goto fail;
    }
    albedo_model_params mp = albedo_model_params_default();
    mp.n_threads = s->threads;
    mp.backend = s->backend;
    mp.max_context = s->max_context;
    if (s->precision && !strcmp(s->precision, "bf16")) mp.precision = ALBEDO_PRECISION_BF16;
    if (albedo_model_load(dir, &mp, &s->m) != ALBEDO_OK) {
        snprintf(s->load_error, sizeof s->load_error, "%s", albedo_last_error());
        goto fail;
    }
    snprintf(s->model_desc, sizeof s->model_desc, "%s", albedo_model_describe(s->m));
    for (char *p = s->model_desc; *p; p++)
        if (*p == '"' || *p == '\\') *p = '\'';
    /* Settings a request leaves out: the --default-* flags, else the
     * model's own (Moondream 3: top_p 0.9, max_objects 150). Written before
     * ready is published; requests read them only after. */
    albedo_request md = albedo_model_request_default(s->m, ALBEDO_SKILL_QUERY);
    api_defaults *d = &s->defs;
    if (!d->has_temperature) d->temperature = md.temperature, d->has_temperature = 1;
    if (!d->has_top_p) d->top_p = md.top_p, d->has_top_p = 1;
    if (!d->has_max_tokens) d->max_tokens = md.max_tokens, d->has_max_tokens = 1;
    if (!d->has_max_objects) d->max_objects = md.max_objects, d->has_max_objects = 1;
    albedo_status st = executor_start(s->m, s->workers, s->queue, s->kv_bytes, &s->ex);
    if (st != ALBEDO_OK) {
        snprintf(s->load_error, sizeof s->load_error, "cannot start the engine: %s", albedo_last_error());
        goto fail;
    }
    atomic_store(&s->ready, 1);
    if (!s->quiet)
        fprintf(stderr, "albedo: model ready: %s; batches of up to %d requests\n", s->model_desc, s->workers);
    return NULL;
fail:
    fprintf(stderr, "albedo: cannot load the model: %s\n", s->load_error);
    atomic_store(&s->ready, -1);
    kill(getpid(), SIGTERM);
    return NULL;
}

static void serve_usage(FILE *f) {
    fprintf(f, "usage: albedo serve [--model DIR|moondream2|owner/repo[@rev]] [options]\n\n"
               "  --host ADDR              address to bind (default 127.0.0.1)\n"
               "  --port N                 port (default 2020; 0 = any free port)\n"
               "  --model SPEC             model directory, moondream2, or a Hugging Face repo id\n"
               "                           (default $ALBEDO_MODEL)\n"
               "  --threads N              compute threads of the engine (default: all cores)\n"
               "  --max-batch N            requests running at once, batched (default 16; --workers N: the same)\n"
               "  --queue N                requests waiting for admission before 429 (default 64)\n"
               "  --kv-cache MB            KV cache size (default: a quarter of RAM, at most 8192)\n"
               "  --max-body BYTES         largest request body (default 10485760)\n"
               "  --api-key KEY            require this key (default $ALBEDO_API_KEY; none = open)\n"
               "  --timeout SECONDS        per-request deadline, queueing included (default 300; 0 = none)\n"
               "  --http-threads N         HTTP event-loop threads (default 4)\n"
               "  --max-connections N      concurrent connections (default 1024)\n"
               "  --default-temperature T  --default-top-p P  --default-max-tokens N  --default-max-objects N\n"
               "                           sampling defaults for requests that send no settings\n"
               "  --backend NAME  --precision f32|bf16  --max-context N   as for the other commands\n"
               "  --quiet                  no access log on stderr\n");
}

static int parse_serve_args(int argc, char **argv, server *s) {
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(a, "--quiet")) {
            s->quiet = 1;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return 1;
        if (!v) {
            fprintf(stderr, "albedo serve: %s needs a value\n", a);
            return -1;
        }
        i++;
        errno = 0;
        if (!strcmp(a, "--host"))
            s->host = v;
        else if (!strcmp(a, "--model"))
            s->model_spec = v;
        else if (!strcmp(a, "--api-key"))
            s->api_key = v;
        else if (!strcmp(a, "--backend"))
            s->backend = v;
        else if (!strcmp(a, "--precision"))
            s->precision = v;
        else if (!strcmp(a, "--port"))
            s->port = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--threads"))
            s->threads = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--workers") || !strcmp(a, "--max-batch"))
            s->workers = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--kv-cache"))
            s->kv_bytes = (size_t)strtoull(v, &end, 10) << 20;
        else if (!strcmp(a, "--queue"))
            s->queue = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--http-threads"))
            s->http_threads = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--max-connections"))
            s->max_connections = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--max-context"))
            s->max_context = (int)strtol(v, &end, 10);
        else if (!strcmp(a, "--max-body"))
            s->max_body = (size_t)strtoull(v, &end, 10);
        else if (!strcmp(a, "--timeout"))
            s->timeout_s = strtod(v, &end);
        else if (!strcmp(a, "--default-temperature"))
            s->defs.temperature = strtof(v, &end), s->defs.has_temperature = 1;
        else if (!strcmp(a, "--default-top-p"))
            s->defs.top_p = strtof(v, &end), s->defs.has_top_p = 1;
        else if (!strcmp(a, "--default-max-tokens"))
            s->defs.max_tokens = (int)strtol(v, &end, 10), s->defs.has_max_tokens = 1;
        else if (!strcmp(a, "--default-max-objects"))
            s->defs.max_objects = (int)strtol(v, &end, 10), s->defs.has_max_objects = 1;
        else {
            fprintf(stderr, "albedo serve: unknown option %s\n", a);
            return -1;
        }
        if (end && (*end || end == v || errno)) {
            fprintf(stderr, "albedo serve: %s: '%s' is not a number\n", a, v);
            return -1;
        }
    }
    if (s->port < 0 || s->port > 65535 || s->workers < 1 || s->workers > 4096 || s->queue < 0 || s->http_threads < 1 ||
        s->max_connections < 1 || s->max_body < 1 || s->timeout_s < 0 || s->threads < 0) {
        fprintf(stderr, "albedo serve: an option is out of range\n");
        return -1;
    }
    if ((s->defs.has_temperature && s->defs.temperature < 0) ||
        (s->defs.has_top_p && !(s->defs.top_p > 0 && s->defs.top_p <= 1)) ||
        (s->defs.has_max_tokens && s->defs.max_tokens < 1) || (s->defs.has_max_objects && s->defs.max_objects < 1)) {
        fprintf(stderr, "albedo serve: a --default-* value is out of range\n");
        return -1;
    }
    if (s->precision && strcmp(s->precision, "f32") && strcmp(s->precision, "bf16")) {
        fprintf(stderr, "albedo serve: --precision must be f32 or bf16\n");
        return -1;
    }
    return 0;
}

/* A short public name for /v1/models: the spec, or a directory's last part. */
static void set_model_name(server *s) {
    const char *n = s->model_spec;
    size_t len = strlen(n);
    while (len > 1 && n[len - 1] == '/') len--;
    const char *b = n;
    if (n[0] == '/' || n[0] == '.')
        for (size_t i = 0; i < len; i++)
            if (n[i] == '/' && i + 1 < len) b = n + i + 1;
    snprintf(s->model_name, sizeof s->model_name, "%.*s", (int)(len - (size_t)(b - n)), b);
    for (char *p = s->model_name; *p; p++)
        if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20) *p = '_';
}

int albedo_serve_main(int argc, char **argv) {
    server s;
    memset(&s, 0, sizeof s);
    s.host = "127.0.0.1";
    s.port = 2020;
    s.workers = 16;
    s.queue = 64;
    s.http_threads = 4;
    s.max_connections = 1024;
    s.max_body = 10u * 1024u * 1024u;
    s.timeout_s = 300;
    s.api_key = getenv("ALBEDO_API_KEY");
    s.model_spec = getenv("ALBEDO_MODEL");
    int pr = parse_serve_args(argc, argv, &s);
    if (pr) {
        serve_usage(pr > 0 ? stdout : stderr);
        return pr > 0 ? 0 : 2;
    }
    if (!s.model_spec) {
        fprintf(stderr, "albedo serve: no model: pass --model DIR|moondream2|owner/repo or set ALBEDO_MODEL\n");
        return 2;
    }
    set_model_name(&s);
    metrics_init();

    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char port[16];
    snprintf(port, sizeof port, "%d", s.port);
    int gai = getaddrinfo(s.host, port, &hints, &ai);
    if (gai) {
        fprintf(stderr, "albedo serve: cannot resolve %s: %s\n", s.host, gai_strerror(gai));
        return 1;
    }

    /* Signals are taken by sigwait below; block them before any thread. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME;
    if (ai->ai_family == AF_INET6) flags |= MHD_USE_IPv6;
    s.d = MHD_start_daemon(flags, (uint16_t)s.port, NULL, NULL, on_request, &s, MHD_OPTION_SOCK_ADDR, ai->ai_addr,
                           MHD_OPTION_THREAD_POOL_SIZE, (unsigned)s.http_threads, MHD_OPTION_CONNECTION_LIMIT,
                           (unsigned)s.max_connections, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120,
                           MHD_OPTION_NOTIFY_COMPLETED, on_completed, &s, MHD_OPTION_LISTENING_ADDRESS_REUSE,
                           (unsigned)1, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (!s.d) {
        fprintf(stderr, "albedo serve: cannot listen on %s:%d (%s)\n", s.host, s.port, strerror(errno));
        return 1;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s.d, MHD_DAEMON_INFO_BIND_PORT);
    int bound = di ? di->port : s.port;
    int v6 = strchr(s.host, ':') != NULL;
    fprintf(stderr, "albedo: listening on http://%s%s%s:%d/v1 (model %s loading)\n", v6 ? "[" : "", s.host,
            v6 ? "]" : "", bound, s.model_name);

    if (pthread_create(&s.loader, NULL, loader_main, &s)) {
        fprintf(stderr, "albedo serve: cannot start the loader thread\n");
        MHD_stop_daemon(s.d);
        return 1;
    }
    int sig = 0;
    sigwait(&sigs, &sig);
    atomic_store(&s.shutting_down, 1);
    pthread_join(s.loader, NULL);
    int failed = atomic_load(&s.ready) < 0;
    if (!failed && !s.quiet) fprintf(stderr, "albedo: shutting down: finishing accepted requests\n");
    /* Stop accepting, finish what was accepted, let streams flush, then stop. */
    MHD_socket lsock = MHD_quiesce_daemon(s.d);
    if (s.ex) executor_stop(s.ex, 60000);
    struct timespec tick = {0, 50000000L};
    for (int i = 0; i < 100 && atomic_load(&s.active) > 0; i++) nanosleep(&tick, NULL);
    MHD_stop_daemon(s.d);
    if (lsock != MHD_INVALID_SOCKET) close(lsock);
    executor_free(s.ex); /* after the last HTTP thread: /metrics may read it until then */
    albedo_model_free(s.m);
    return failed ? 1 : 0;
}
