/*
 * serve_queue.c — bounded FIFO queue and the worker pool of `albedo serve`
 * (see serve_queue.h). One mutex guards the queue; workers sleep on a
 * condition variable. A worker owns its session for its whole life, so no
 * session is ever touched by two threads.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "serve_queue.h"

typedef struct worker {
    executor *e;
    albedo_session *s;
    pthread_t th;
    int started;
} worker;

struct executor {
    pthread_mutex_t mu;
    pthread_cond_t work, idle;
    job *head, *tail;
    int queued, running, max_queue;
    int closed, quit;
    int n_workers;
    worker *w;
};

static void *worker_main(void *arg) {
    worker *w = arg;
    executor *e = w->e;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->head && !e->quit) pthread_cond_wait(&e->work, &e->mu);
        if (!e->head) { /* quit with nothing left */
            pthread_mutex_unlock(&e->mu);
            return NULL;
        }
        job *j = e->head;
        e->head = j->next;
        if (!e->head) e->tail = NULL;
        j->next = NULL;
        e->queued--;
        e->running++;
        pthread_mutex_unlock(&e->mu);

        job_execute(j, w->s);
        job_unref(j);

        pthread_mutex_lock(&e->mu);
        e->running--;
        if (!e->head && !e->running) pthread_cond_broadcast(&e->idle);
        pthread_mutex_unlock(&e->mu);
    }
}

static void free_executor(executor *e) {
    if (!e) return;
    for (int i = 0; i < e->n_workers; i++) albedo_session_free(e->w[i].s);
    free(e->w);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->work);
    pthread_cond_destroy(&e->idle);
    free(e);
}

albedo_status executor_start(albedo_model *m, int n_workers, int max_queue, executor **out) {
    *out = NULL;
    if (n_workers < 1 || max_queue < 0) return ALBEDO_ERR_INVALID_ARGUMENT;
    executor *e = calloc(1, sizeof *e);
    if (!e) return ALBEDO_ERR_OUT_OF_MEMORY;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->work, NULL);
    pthread_cond_init(&e->idle, NULL);
    e->max_queue = max_queue;
    e->w = calloc((size_t)n_workers, sizeof *e->w);
    if (!e->w) {
        free_executor(e);
        return ALBEDO_ERR_OUT_OF_MEMORY;
    }
    e->n_workers = n_workers;
    /* Sessions first: a failure here leaves no thread to join. */
    for (int i = 0; i < n_workers; i++) {
        albedo_status st = albedo_session_new(m, &e->w[i].s);
        if (st != ALBEDO_OK) {
            free_executor(e);
            return st;
        }
        e->w[i].e = e;
    }
    for (int i = 0; i < n_workers; i++) {
        if (pthread_create(&e->w[i].th, NULL, worker_main, &e->w[i]) != 0) {
            executor_stop(e, 0);
            return ALBEDO_ERR_INTERNAL;
        }
        e->w[i].started = 1;
    }
    *out = e;
    return ALBEDO_OK;
}

int executor_submit(executor *e, job *j) {
    pthread_mutex_lock(&e->mu);
    if (e->closed) {
        pthread_mutex_unlock(&e->mu);
        return EXEC_CLOSED;
    }
    if (e->queued >= e->max_queue) {
        pthread_mutex_unlock(&e->mu);
        return EXEC_FULL;
    }
    job_ref(j);
    j->next = NULL;
    if (e->tail) e->tail->next = j;
    else e->head = j;
    e->tail = j;
    e->queued++;
    pthread_cond_signal(&e->work);
    pthread_mutex_unlock(&e->mu);
    return EXEC_OK;
}

void executor_stats(executor *e, int *queued, int *running, int *workers) {
    pthread_mutex_lock(&e->mu);
    *queued = e->queued;
    *running = e->running;
    *workers = e->n_workers;
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
    while (e->head || e->running)
        if (pthread_cond_timedwait(&e->idle, &e->mu, &until) == ETIMEDOUT) {
            drained = 0;
            break;
        }
    /* Whatever still waits is answered now rather than dropped. */
    job *left = e->head;
    e->head = e->tail = NULL;
    e->queued = 0;
    e->quit = 1;
    pthread_cond_broadcast(&e->work);
    pthread_mutex_unlock(&e->mu);
    while (left) {
        job *n = left->next;
        job_fail(left, 503, api_error_body(503, "shutting_down", NULL, "the server is shutting down"));
        job_unref(left);
        left = n;
    }
    for (int i = 0; i < e->n_workers; i++)
        if (e->w[i].started) pthread_join(e->w[i].th, NULL);
    free_executor(e);
    return drained ? 0 : -1;
}
