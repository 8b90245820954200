/*
 * serve_queue.h — the executor of `albedo serve`: a bounded FIFO queue in
 * front of a fixed pool of worker threads, each owning one albedo_session
 * (sessions are single-threaded; the model is shared).
 *
 * This is the piece a batching scheduler will replace, so the HTTP side sees
 * only these five calls: start, submit, stats, close, stop.
 */
#ifndef ALBEDO_SERVE_QUEUE_H
#define ALBEDO_SERVE_QUEUE_H

#include "albedo.h"
#include "serve_internal.h"

typedef struct executor executor;

enum { EXEC_OK = 0, EXEC_FULL = 1, EXEC_CLOSED = 2 };

/* Create n_workers sessions on m and start their threads. max_queue bounds
 * the requests waiting for a worker (running ones do not count). */
albedo_status executor_start(albedo_model *m, int n_workers, int max_queue, executor **out);

/* Queue a job (the executor takes a reference). EXEC_FULL when max_queue
 * requests already wait, EXEC_CLOSED after executor_close. */
int executor_submit(executor *e, job *j);

void executor_stats(executor *e, int *queued, int *running, int *workers);

/* Refuse new jobs; the queued and running ones still finish. */
void executor_close(executor *e);

/* Wait up to timeout_ms for the queue to drain (returns 0 if it did),
 * then join the workers after their current job and free everything.
 * Jobs still queued then are answered 503. */
int executor_stop(executor *e, int timeout_ms);

#endif
