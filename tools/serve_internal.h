/*
 * serve_internal.h — what the files of `albedo serve` share: the job (one
 * accepted request on its way through the engine), the growable byte
 * buffer, the metrics counters and the REST helpers. Not a public API: only
 * tools/serve*.c include it.
 *
 * How a request travels:
 *
 *   MHD thread                     executor (serve_queue.c)    engine threads
 *   ----------                     ------------------------    --------------
 *   headers → route, auth, 413
 *   body    → buffer (≤ max-body)
 *   complete→ parse JSON, base64 ──► albedo_engine_submit ───► queue, admit, batch
 *             suspend connection                               on_text: append SSE
 *                                                              on_done: body / last event
 *   resumed ◄───────────────────────────────────────────────── resume connection
 *   → queue response (or stream SSE through a content reader that suspends
 *     itself while the engine has produced nothing new)
 *   closed  → cancel the ticket          reaper: free ended tickets; cancel the
 *                                        tickets of clients that hung up
 *
 * A job is shared by the connection and the engine; a mutex guards its state
 * and a reference count its lifetime. The connection is resumed only while it
 * is suspended, under the job's mutex, so the engine never touches a
 * connection that MHD has already closed.
 */
#ifndef ALBEDO_SERVE_INTERNAL_H
#define ALBEDO_SERVE_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "albedo.h"

struct MHD_Connection;

/* ---- growable byte buffer ---------------------------------------------- */

typedef struct sbuf {
    char *p;
    size_t len, cap;
} sbuf;

int sbuf_put(sbuf *b, const void *data, size_t n); /* 0 or -1 (out of memory) */
int sbuf_puts(sbuf *b, const char *s);
void sbuf_free(sbuf *b);

/* ---- endpoints ------------------------------------------------------------ */

typedef enum endpoint {
    EP_CAPTION = 0,
    EP_QUERY,
    EP_DETECT,
    EP_POINT,
    EP_CHAT,
    EP_HEALTH,
    EP_MODELS,
    EP_METRICS,
    EP_OTHER,
    EP_COUNT
} endpoint;

const char *endpoint_name(endpoint ep);

/* ---- jobs ----------------------------------------------------------------- */

typedef struct job {
    /* The request, owned by the job; req's pointers point into these. */
    endpoint ep;
    albedo_request req;
    char *question, *object;
    albedo_spatial_ref *srefs;
    unsigned char *image; /* decoded image bytes, NULL for a text-only query */
    size_t image_len;
    int stream;
    char request_id[80];
    char model_name[128]; /* echoed by /v1/chat/completions */
    double t_accept_ms;   /* monotonic clock when the request was accepted */
    double deadline_ms;   /* monotonic; 0 = none */

    pthread_mutex_t mu;
    int refs;                    /* the connection and the engine each hold one */
    struct MHD_Connection *conn; /* valid while !gone */
    int suspended;               /* the connection is suspended waiting for this job */
    int gone;                    /* the connection was closed: stop generating */
    int hung_up;                 /* the client closed its side while suspended */
    int done;
    albedo_ticket *ticket; /* the engine's, while it may run (for cancelling) */

    /* Output. Non-stream: status + body. Stream: sse holds every event so
     * far (the content reader remembers how much it sent); status/body hold
     * an error if the job failed before its first event. */
    int status;
    char *body;
    sbuf sse;
    int in_tokens, out_tokens;
    int stream_started; /* chat: the role chunk was sent */

    struct executor *ex;     /* serve_queue.c: the executor it was submitted to */
    struct job *prev, *next; /* the executor's list of submitted jobs */
    struct job *ended_next;  /* the executor's list of ended ones */
    albedo_ticket *ended;    /* set by on_done: the ticket for the reaper to free */
    int over;                /* on_done ran (stays set) */
} job;

job *job_new(endpoint ep);
void job_ref(job *j);
void job_unref(job *j);
/* Under j->mu: wake the connection if it waits for this job. */
void job_wake_locked(job *j);

/* The submit parameters of a job's ticket (serve_api.c): the stream
 * callback (SSE events; it stops a generation whose client is gone), the
 * job as user, the deadline. on_done is the caller's. */
void job_submit_params(job *j, albedo_submit_params *sp);
/* The end of a job's ticket (serve_api.c): its response for status st —
 * res and json (albedo_ticket_json) when st is ALBEDO_OK, else the error
 * message — sets done and wakes the connection. shutting: the server is
 * stopping (a cancelled ticket is answered 503). */
void job_finish(job *j, albedo_status st, const albedo_result *res, const char *json, const char *errmsg, int shutting);
/* Finish a job with an error response (takes body) and wake its connection. */
void job_fail(job *j, int status, char *body);

/* ---- REST helpers (serve_api.c) ------------------------------------------- */

typedef struct api_defaults {
    float temperature, top_p;
    int max_tokens, max_objects;
    int has_temperature, has_top_p, has_max_tokens, has_max_objects;
} api_defaults;

/* The OpenAI-style error body {"error": {"message", "type", "param", "code"}}
 * for an HTTP status; malloc'ed. */
char *api_error_body(int status, const char *code, const char *param, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* Parse and validate a request body into j. On failure returns the HTTP
 * status (400) and sets *err_body (malloc'ed); 0 on success. */
int api_parse(job *j, const char *body, size_t len, const api_defaults *d, char **err_body);

/* Decode base64 (standard or URL-safe alphabet, padding optional, ASCII
 * whitespace ignored). Returns 0 and a malloc'ed buffer, or -1. */
int base64_decode(const char *s, size_t n, unsigned char **out, size_t *out_len);

/* A request id like "2025-03-25_query_2025-03-25-21:00:39-715d03". */
void make_request_id(char *out, size_t cap, const char *skill);

/* ---- metrics (serve_metrics.c) --------------------------------------------- */

void metrics_init(void);
void metrics_request(endpoint ep, int status, double latency_s);
void metrics_error(const char *code);
void metrics_tokens(int in_tokens, int out_tokens, int cached_tokens);
void metrics_cancelled(void);
/* Prometheus text exposition, with the engine's gauges and counters (es
 * NULL before the model is ready); malloc'ed. */
char *metrics_render(const albedo_engine_stats *es, int max_batch, int ready);

#endif
