/*
 * fuzz_http.c — raw HTTP requests through the HTTP side of `albedo serve`
 * (tools/serve.c): routing, methods, the API key headers, Content-Length and
 * Expect, chunked bodies, body limits, suspending and resuming connections,
 * plain and streamed answers, the access-log path — everything before and
 * after api_parse, which fuzz_api covers.
 *
 * serve.c is compiled into this target (included below) and its own request
 * handlers run in a microhttpd daemon on 127.0.0.1, started once, exactly as
 * albedo_serve_main configures it (auto internal threads, suspend/resume, a
 * thread pool); each input is sent over a fresh TCP connection. There is no
 * model: the executor (serve_queue.c) is replaced by a stub that answers a
 * job in one of five ways picked by the input — queue full, closed, refused
 * by the engine, finished at once, or finished from another thread a moment
 * later in several steps, the way the engine resumes a suspended connection.
 * (When serve.c changes how it hands jobs over, this stub changes with it.)
 *
 * Checks, besides the sanitizers:
 *   - the server answers, and every connection is completed (on_completed)
 *     within 5 s of the client closing: nothing hangs or leaks a connection;
 *   - the first response is HTTP/1.x; a JSON body is valid UTF-8 JSON, with
 *     the documented error object when the status is >= 400 (but for
 *     /health's 503 {"status": ...}); a stream is
 *     "data: ...\n\n" events;
 *   - with a key configured, a request that does not contain the key gets
 *     no 200 except from /health.
 *
 * Input: byte 0: bits 0-1 model state (ready, ready, loading, failed), bit 2
 * shutting down, bit 3 API key "fuzz-key" set, bits 4-5 executor behaviour
 * (full, closed or refused, at once, later), bit 6 add "Connection: close"
 * after the request line, bit 7 refused rather than closed; the rest is sent
 * as it is. --max-body is 1024 so that the limits are reached by small inputs.
 */
#include "serve.c"

#include <arpa/inet.h>
#include <jansson.h>
#include <netinet/in.h>
#include <poll.h>

#include "fuzz.h"

#define FUZZ_KEY "fuzz-key"

static server S;
static int port;
static atomic_int exec_mode;
static atomic_int async_jobs; /* stub workers still running */

/* ---- the executor stub ---------------------------------------------------------- */

struct executor {
    int unused;
};
static executor the_executor;

static void put_result(job *j, int last) {
    if (j->stream) {
        sbuf_puts(&j->sse, last ? "data: {\"completed\": true, \"chunk\": \"\", \"finish_reason\": \"stop\"}\n\n"
                                : "data: {\"chunk\": \"fuzz \", \"completed\": false}\n\n");
        if (last) j->done = 1;
    } else if (last) {
        free(j->body);
        j->body = strdup("{\"answer\": \"fuzz\", \"finish_reason\": \"stop\"}");
        j->status = j->body ? 200 : 500;
        j->done = 1;
    }
}

static void *stub_worker(void *arg) {
    job *j = arg;
    struct timespec t = {0, 200000};
    for (int step = 0; step < 3; step++) {
        nanosleep(&t, NULL);
        pthread_mutex_lock(&j->mu);
        put_result(j, step == 2);
        job_wake_locked(j);
        pthread_mutex_unlock(&j->mu);
    }
    job_unref(j);
    atomic_fetch_sub(&async_jobs, 1);
    return NULL;
}

albedo_status executor_start(albedo_model *m, int max_batch, int max_queue, size_t kv_bytes, executor **out) {
    (void)m, (void)max_batch, (void)max_queue, (void)kv_bytes;
    *out = &the_executor;
    return ALBEDO_OK;
}

int executor_submit(executor *e, job *j) {
    (void)e;
    int mode = atomic_load(&exec_mode);
    switch (mode & 3) {
    case 0: return EXEC_FULL;
    case 1:
        if (!(mode & 4)) return EXEC_CLOSED;
        /* Refused by the engine: the job holds its error response. */
        pthread_mutex_lock(&j->mu);
        free(j->body);
        j->body = api_error_body(400, "invalid_value", NULL, "refused by the stub engine");
        j->status = 400;
        j->done = 1;
        pthread_mutex_unlock(&j->mu);
        return EXEC_REJECTED;
    case 2:
        pthread_mutex_lock(&j->mu);
        put_result(j, 0);
        put_result(j, 1);
        pthread_mutex_unlock(&j->mu);
        return EXEC_OK;
    default: {
        pthread_t t;
        job_ref(j);
        atomic_fetch_add(&async_jobs, 1);
        if (pthread_create(&t, NULL, stub_worker, j)) {
            atomic_fetch_sub(&async_jobs, 1);
            job_unref(j);
            return EXEC_FULL;
        }
        pthread_detach(t);
        return EXEC_OK;
    }
    }
}

void executor_stats(executor *e, albedo_engine_stats *st, int *max_batch) {
    (void)e;
    memset(st, 0, sizeof *st);
    *max_batch = 1;
}

void executor_close(executor *e) { (void)e; }

int executor_stop(executor *e, int timeout_ms) {
    (void)e, (void)timeout_ms;
    return 0;
}

void executor_free(executor *e) { (void)e; }

/* ---- the daemon ------------------------------------------------------------------------ */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    signal(SIGPIPE, SIG_IGN);
    S.host = "127.0.0.1";
    S.model_spec = "fuzz";
    S.workers = 1;
    S.queue = 1;
    S.http_threads = 2;
    S.max_connections = 64;
    S.max_body = 1024;
    S.quiet = 1;
    S.ex = &the_executor;
    snprintf(S.model_name, sizeof S.model_name, "fuzz");
    snprintf(S.model_desc, sizeof S.model_desc, "a stub");
    metrics_init();
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    S.d = MHD_start_daemon(MHD_USE_AUTO_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME, 0, NULL, NULL, on_request, &S,
                           MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa, MHD_OPTION_THREAD_POOL_SIZE,
                           (unsigned)S.http_threads, MHD_OPTION_CONNECTION_LIMIT, (unsigned)S.max_connections,
                           MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10, MHD_OPTION_NOTIFY_COMPLETED, on_completed, &S,
                           MHD_OPTION_END);
    const union MHD_DaemonInfo *di = S.d ? MHD_get_daemon_info(S.d, MHD_DAEMON_INFO_BIND_PORT) : NULL;
    if (!di || !di->port) {
        fprintf(stderr, "fuzz_http: cannot start the daemon\n");
        abort();
    }
    port = di->port;
    return 0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Seconds of waiting allowed, checked every few milliseconds. A gap of more
 * than half a second between two checks is not counted: on a shared machine
 * the process may be stopped for a while (SIGSTOP), which is no hang. */
typedef struct wait_budget {
    double left, last;
} wait_budget;

static wait_budget budget(double seconds) {
    wait_budget b = {seconds, now_s()};
    return b;
}

static int budget_spent(wait_budget *b) {
    double t = now_s(), gap = t - b->last;
    b->last = t;
    if (gap < 0.5) b->left -= gap;
    return b->left <= 0;
}

/* Send the request, close the writing side (microhttpd still answers a
 * complete request, and gives up on an incomplete one), and read until the
 * server closes. microhttpd keeps a connection whose last request is
 * incomplete (a short body, a partial request line) open until its timeout
 * even after the client's FIN, so after 10 ms of silence while no stub
 * worker runs the client resets the connection, which ends it at once. */
static size_t exchange(const uint8_t *req, size_t n, uint8_t *out, size_t cap) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    FUZZ_CHECK(fd >= 0, "socket");
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    FUZZ_CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0, "connect: %s", strerror(errno));
    size_t sent = 0, got = 0;
    int half_closed = 0;
    wait_budget wb = budget(5);
    while (1) {
        if (sent == n && !half_closed) {
            shutdown(fd, SHUT_WR);
            half_closed = 1;
        }
        struct pollfd p = {fd, (short)(POLLIN | (sent < n ? POLLOUT : 0)), 0};
        int r = poll(&p, 1, 10);
        if (r < 0 && errno == EINTR) continue;
        if (r == 0 && atomic_load(&async_jobs) > 0) {
            FUZZ_CHECK(!budget_spent(&wb), "a request still in progress after 5 s");
            continue;
        }
        if (r == 0) {
            struct linger lg = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            break;
        }
        FUZZ_CHECK(!budget_spent(&wb), "an answer still coming after 5 s");
        if (p.revents & POLLOUT) {
            ssize_t w = send(fd, req + sent, n - sent, MSG_NOSIGNAL);
            if (w > 0)
                sent += (size_t)w;
            else
                sent = n; /* the server closed on us: stop sending */
        }
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            uint8_t tmp[4096];
            ssize_t k = recv(fd, tmp, sizeof tmp, 0);
            if (k <= 0) break;
            size_t c = (size_t)k < cap - got ? (size_t)k : cap - got;
            memcpy(out + got, tmp, c);
            got += c;
        }
    }
    close(fd);
    return got;
}

static const uint8_t *find(const uint8_t *h, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (!strncasecmp((const char *)h + i, needle, k)) return h + i;
    return NULL;
}

/* The first response: status line, headers, body (de-chunked). */
static void check_response(const uint8_t *r, size_t n, int key_sent) {
    if (n == 0) return; /* closed without an answer: microhttpd's choice for garbage */
    FUZZ_CHECK(n >= 12 && !memcmp(r, "HTTP/1.", 7), "not an HTTP response: %.*s", (int)(n < 80 ? n : 80), r);
    int status = atoi((const char *)r + 9);
    const uint8_t *he = find(r, n, "\r\n\r\n");
    if (!he) return; /* cut short */
    size_t hn = (size_t)(he - r) + 4;
    const uint8_t *body = he + 4;
    size_t bn = n - hn;
    int json = find(r, hn, "Content-Type: application/json") != NULL;
    int sse = find(r, hn, "Content-Type: text/event-stream") != NULL;
    static uint8_t dechunked[1 << 16];
    if (find(r, hn, "Transfer-Encoding: chunked")) {
        size_t i = 0, k = 0;
        while (i < bn) {
            unsigned long len = strtoul((const char *)body + i, NULL, 16);
            const uint8_t *crlf = find(body + i, bn - i, "\r\n");
            if (!crlf || len == 0) break;
            i = (size_t)(crlf - body) + 2;
            if (len > bn - i || len > sizeof dechunked - k) return; /* cut short */
            memcpy(dechunked + k, body + i, len);
            k += len;
            i += len + 2;
        }
        body = dechunked;
        bn = k;
    } else {
        const uint8_t *cl = find(r, hn, "\r\nContent-Length:");
        if (!cl) return;
        size_t len = strtoul((const char *)cl + 17, NULL, 10);
        if (len > bn) return; /* cut short */
        bn = len;
    }
    if (json) {
        FUZZ_CHECK(fuzz_utf8_ok(body, bn), "JSON body is not UTF-8");
        json_error_t je;
        json_t *v = json_loadb((const char *)body, bn, 0, &je);
        FUZZ_CHECK(v && json_is_object(v), "status %d: body is not a JSON object: %.*s", status, (int)bn, body);
        if (status >= 400 && !json_object_get(v, "server")) { /* /health answers 503 with its status */
            json_t *e = json_object_get(v, "error");
            FUZZ_CHECK(json_is_object(e) && json_is_string(json_object_get(e, "message")) &&
                           json_is_string(json_object_get(e, "code")),
                       "status %d without an error object", status);
        }
        if (status == 200 && S.api_key && !key_sent)
            FUZZ_CHECK(json_object_get(v, "server") != NULL, "a 200 without the API key, not from /health");
        json_decref(v);
    } else if (sse) {
        FUZZ_CHECK(!S.api_key || key_sent, "a stream without the API key");
        for (size_t i = 0; i < bn;) {
            FUZZ_CHECK(bn - i > 6 && !memcmp(body + i, "data: ", 6), "SSE event without data:");
            const uint8_t *e = find(body + i, bn - i, "\n\n");
            FUZZ_CHECK(e != NULL, "SSE event without its blank line");
            i = (size_t)(e - body) + 2;
        }
    } else if (status == 200 && S.api_key && !key_sent) {
        FUZZ_CHECK(0, "a 200 (%.*s) without the API key", (int)(hn < 200 ? hn : 200), r);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    static const int ready[4] = {1, 1, 0, -1};
    atomic_store(&S.ready, ready[data[0] & 3]);
    atomic_store(&S.shutting_down, (data[0] >> 2) & 1);
    S.api_key = (data[0] >> 3) & 1 ? FUZZ_KEY : NULL;
    atomic_store(&exec_mode, ((data[0] >> 4) & 3) | (data[0] >> 7) << 2);
    const uint8_t *req = data + 1;
    size_t n = size - 1;
    uint8_t *buf = NULL;
    if ((data[0] >> 6) & 1) { /* "Connection: close" after the request line */
        const uint8_t *eol = memchr(req, '\n', n);
        if (eol) {
            static const char cc[] = "Connection: close\r\n";
            size_t at = (size_t)(eol - req) + 1;
            buf = malloc(n + sizeof cc);
            if (!buf) return 0;
            memcpy(buf, req, at);
            memcpy(buf + at, cc, sizeof cc - 1);
            memcpy(buf + at + sizeof cc - 1, req + at, n - at);
            req = buf;
            n += sizeof cc - 1;
        }
    }
    int key_sent = find(req, n, FUZZ_KEY) != NULL;
    static uint8_t out[(1 << 18) + 1];
    size_t got = exchange(req, n, out, sizeof out - 1);
    out[got] = 0; /* strtoul stops here at the latest */
    free(buf);
    check_response(out, got, key_sent);
    /* Every connection completed, every stub worker done. */
    wait_budget wb = budget(5);
    while (atomic_load(&S.active) > 0 || atomic_load(&async_jobs) > 0) {
        FUZZ_CHECK(!budget_spent(&wb), "%d connection(s) not completed, %d job(s) running 5 s after the client left",
                   atomic_load(&S.active), atomic_load(&async_jobs));
        struct timespec t = {0, 100000};
        nanosleep(&t, NULL);
    }
    return 0;
}
