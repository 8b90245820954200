/*
 * serve_queue.h — the executor of `albedo serve`: one albedo_engine per model
 * (continuous batching over a paged KV cache, image prefix cache), jobs
 * submitted to it as tickets, and a reaper thread that frees the tickets
 * that ended and cancels those whose client hung up.
 *
 * The HTTP side sees only these calls: start, submit, stats, close, stop.
 */
#ifndef ALBEDO_SERVE_QUEUE_H
#define ALBEDO_SERVE_QUEUE_H

#include "albedo.h"
#include "serve_internal.h"

typedef struct executor executor;

enum { EXEC_OK = 0, EXEC_FULL = 1, EXEC_CLOSED = 2, EXEC_REJECTED = 3 };

/* Start the engine on m: max_batch requests run at once, max_queue wait
 * for admission (more get EXEC_FULL), kv_bytes of KV cache (0 = the
 * engine's default). */
albedo_status executor_start(albedo_model *m, int max_batch, int max_queue, size_t kv_bytes, executor **out);

/* Submit a job (the executor takes a reference until its ticket ended and
 * was freed). EXEC_FULL when max_queue requests already wait, EXEC_CLOSED
 * after executor_close, EXEC_REJECTED when the engine refused the request
 * (the job then holds its error response, as after job_finish). */
int executor_submit(executor *e, job *j);

/* The engine's counters and gauges, and its batch size. */
void executor_stats(executor *e, albedo_engine_stats *st, int *max_batch);

/* Refuse new jobs; the queued and running ones still finish. */
void executor_close(executor *e);

/* Wait up to timeout_ms for every submitted job to end (returns 0 if they
 * did), then free the engine (cancelling the rest: answered 503) and stop
 * the reaper. Submissions after it are refused, stats read zeros. */
int executor_stop(executor *e, int timeout_ms);

/* Free what executor_stop left (NULL is a no-op): once no HTTP thread can
 * call the executor any more. */
void executor_free(executor *e);

#endif
