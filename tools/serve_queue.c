/*
 * serve_queue.c — the executor of `albedo serve` (see serve_queue.h): jobs
 * become tickets of one albedo_engine, whose scheduler batches them; the
 * engine's threads call back into serve_api.c (on_text streams, on_done
 * writes the response). A ticket may not be freed from its own callbacks,
 * so on_done hands the job to the reaper thread, which frees the ticket and
 * drops the engine's reference to the job.
 *
 * The reaper also watches the clients of suspended connections (which
 * microhttpd does not watch): every REAPER_TICK_MS it asks serve.c whether
 * each one closed its side, and cancels the ticket of those that did, so
 * that a client that gives up on a long non-streamed request frees its
 * batch slot within a fraction of a second. A stream's client is noticed
 * by the failed write of its next event already.
 *
 * One mutex (mu) guards the lists; a job's own mutex its fields. Lock order:
 * mu, then a job's mutex, then the engine's (albedo_ticket_cancel). The
 * engine calls on_done and on_text with its own lock released.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "serve_queue.h"

#define REAPER_TICK_MS 200

/* serve.c: whether the client of a suspended connection closed its side. */
int serve_connection_closed(struct MHD_Connection *c);

struct executor {
    albedo_engine *eng;
    int max_batch;
    pthread_mutex_t mu;
    pthread_cond_t cv;   /* wakes the reaper */
    pthread_cond_t idle; /* the last live job was freed */
    job *live;           /* submitted, ticket not yet freed */
    int n_live;
    job *ended, *ended_tail; /* ticket ended, to be freed by the reaper */
    int submitting;          /* in albedo_engine_submit with mu released */
    int closed, quit, shutting;
    pthread_t reaper;
    int reaper_started;
};

/* The ticket ended (on the engine's scheduler thread): write the response,
 * then queue the job for the reaper. */
static void on_done(void *user, albedo_ticket *t, albedo_status st, const albedo_result *res) {
    job *j = user;
    executor *e = j->ex;
    pthread_mutex_lock(&e->mu);
    const int shutting = e->shutting;
    pthread_mutex_unlock(&e->mu);
    job_finish(j, st, res, st == ALBEDO_OK ? albedo_ticket_json(t, 1) : NULL, albedo_ticket_error(t), shutting);
    pthread_mutex_lock(&j->mu);
    j->ended = t;
    j->over = 1;
    pthread_mutex_unlock(&j->mu);
    pthread_mutex_lock(&e->mu);
    j->ended_next = NULL;
    if (e->ended_tail)
        e->ended_tail->ended_next = j;
    else
        e->ended = j;
    e->ended_tail = j;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

static void live_remove(executor *e, job *j) {
    if (j->prev)
        j->prev->next = j->next;
    else
        e->live = j->next;
    if (j->next) j->next->prev = j->prev;
    j->prev = j->next = NULL;
    e->n_live--;
}

/* Cancel the tickets of suspended connections whose client hung up. Called
 * with mu held. */
static void watch_clients(executor *e) {
    for (job *j = e->live; j; j = j->next) {
        pthread_mutex_lock(&j->mu);
        if (j->suspended && !j->gone && !j->hung_up && !j->done && j->ticket && serve_connection_closed(j->conn)) {
            j->hung_up = 1;
            albedo_ticket_cancel(j->ticket);
        }
        pthread_mutex_unlock(&j->mu);
    }
}

static void *reaper_main(void *arg) {
    executor *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (e->ended) {
            job *j = e->ended;
            e->ended = j->ended_next;
            if (!e->ended) e->ended_tail = NULL;
            live_remove(e, j);
            pthread_mutex_unlock(&e->mu);
            pthread_mutex_lock(&j->mu);
            albedo_ticket *t = j->ended;
            j->ticket = j->ended = NULL;
            pthread_mutex_unlock(&j->mu);
            albedo_ticket_free(t); /* ended: returns at once */
            job_unref(j);
            pthread_mutex_lock(&e->mu);
            if (!e->n_live) pthread_cond_broadcast(&e->idle);
        }
        if (e->quit && !e->n_live) break;
        watch_clients(e);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += REAPER_TICK_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        if (!e->ended) pthread_cond_timedwait(&e->cv, &e->mu, &ts);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

void executor_free(executor *e) {
    if (!e) return;
    albedo_engine_free(e->eng);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    pthread_cond_destroy(&e->idle);
    free(e);
}

albedo_status executor_start(albedo_model *m, int max_batch, int max_queue, size_t kv_bytes, executor **out) {
    *out = NULL;
    executor *e = calloc(1, sizeof *e);
    if (!e) return ALBEDO_ERR_OUT_OF_MEMORY;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    pthread_cond_init(&e->idle, NULL);
    albedo_engine_params p = albedo_engine_params_default();
    p.max_batch = max_batch;
    p.max_queue = max_queue;
    p.kv_bytes = kv_bytes;
    e->max_batch = max_batch;
    albedo_status st = albedo_engine_new(m, &p, &e->eng);
    if (!st && pthread_create(&e->reaper, NULL, reaper_main, e)) st = ALBEDO_ERR_INTERNAL;
    if (st) {
        executor_free(e);
        return st;
    }
    e->reaper_started = 1;
    *out = e;
    return ALBEDO_OK;
}

int executor_submit(executor *e, job *j) {
    pthread_mutex_lock(&e->mu);
    if (e->closed) {
        pthread_mutex_unlock(&e->mu);
        return EXEC_CLOSED;
    }
    /* On the list before the ticket exists: on_done may come at once. */
    job_ref(j);
    j->ex = e;
    j->prev = NULL;
    j->next = e->live;
    if (e->live) e->live->prev = j;
    e->live = j;
    e->n_live++;
    e->submitting++; /* the engine stays until this submission returned */
    pthread_mutex_unlock(&e->mu);

    albedo_submit_params sp;
    job_submit_params(j, &sp);
    sp.on_done = on_done;
    albedo_ticket *t = NULL;
    albedo_status st = albedo_engine_submit(e->eng, &j->req, j->image, j->image_len, &sp, &t);
    pthread_mutex_lock(&e->mu);
    if (!--e->submitting) pthread_cond_broadcast(&e->idle);
    pthread_mutex_unlock(&e->mu);
    /* The engine keeps its own copy of the image. */
    free(j->image);
    j->image = NULL;
    if (st == ALBEDO_OK) {
        pthread_mutex_lock(&j->mu);
        if (!j->over) j->ticket = t; /* else it ended already: the reaper has it */
        const int gone = j->gone;
        pthread_mutex_unlock(&j->mu);
        if (gone) albedo_ticket_cancel(t); /* the client left while this ran */
        return EXEC_OK;
    }
    pthread_mutex_lock(&e->mu);
    live_remove(e, j);
    if (!e->n_live) pthread_cond_broadcast(&e->idle);
    pthread_mutex_unlock(&e->mu);
    /* ALBEDO_ERR_LIMIT is the full queue, unless the request itself was
     * over a limit (a question longer than the library takes). */
    const char *msg = albedo_last_error();
    int rc = EXEC_REJECTED;
    if (st == ALBEDO_ERR_LIMIT && strstr(msg, "queue is full"))
        rc = EXEC_FULL;
    else
        job_finish(j, st, NULL, NULL, msg, 0);
    job_unref(j);
    return rc;
}

void executor_stats(executor *e, albedo_engine_stats *st, int *max_batch) {
    pthread_mutex_lock(&e->mu);
    albedo_engine_get_stats(e->eng, st); /* zeros once stopped */
    *max_batch = e->max_batch;
    pthread_mutex_unlock(&e->mu);
}

void executor_close(executor *e) {
    pthread_mutex_lock(&e->mu);
    e->closed = 1;
    pthread_mutex_unlock(&e->mu);
}

int executor_stop(executor *e, int timeout_ms) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) until.tv_sec++, until.tv_nsec -= 1000000000L;
    int drained = 1;
    pthread_mutex_lock(&e->mu);
    e->closed = 1;
    while (e->n_live)
        if (pthread_cond_timedwait(&e->idle, &e->mu, &until) == ETIMEDOUT) {
            drained = 0;
            break;
        }
    /* Whatever is left is cancelled by freeing the engine, and answered 503. */
    e->shutting = 1;
    while (e->submitting) pthread_cond_wait(&e->idle, &e->mu);
    albedo_engine *eng = e->eng;
    e->eng = NULL;
    pthread_mutex_unlock(&e->mu);
    albedo_engine_free(eng); /* every ticket has ended after this */
    pthread_mutex_lock(&e->mu);
    e->quit = 1;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (e->reaper_started) pthread_join(e->reaper, NULL);
    e->reaper_started = 0;
    return drained ? 0 : -1;
}
