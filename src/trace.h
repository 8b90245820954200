/*
 * trace.h — the engine's optional timing trace (scheduler.c): with the
 * environment's ALBEDO_TRACE set to a file name when an engine starts, each
 * ticket records monotonic timestamps of the points it passes (submit,
 * admission, its light session, the image worker's decode, crops and device
 * work, the start of its generation loops, each post of rows and the step
 * that served it, the end of its loops, its reaping), the engine records
 * each step (its rows, who ran it, the device call) and the scheduler's
 * wake-ups, and albedo_engine_free writes a breakdown per phase (cold and
 * cached-image tickets apart), the idle time between tickets, and one CSV
 * row per ticket to that file. Unset, nothing is recorded and the cost is a
 * NULL test per point.
 *
 * It is a measuring tool, not an interface: the file's layout may change.
 */
#ifndef ALBEDO_TRACE_H
#define ALBEDO_TRACE_H

#include <stdint.h>

/* A ticket's timestamps (ms on now_ms's clock; 0: not passed) and counts.
 * Each field is written by one thread at a time and read when the ticket
 * ends (under the engine's mutex, after its thread was joined). */
typedef struct tk_trace {
    double submit, admit, sess;               /* light session made */
    double b_start, b_decode, b_crops, b_dev; /* image worker: picked up, decoded, cropped, device done */
    double collect;                           /* the scheduler saw the built prefix (put in the cache) */
    double run;                               /* go_running returned (its thread created) */
    double gen0, gen1;                        /* its loops: start and end (on its thread) */
    double first_post, first_served;          /* the prompt's rows */
    double last_served;                       /* the last post's */
    double reap, done;                        /* joined by the scheduler; ended (after on_done) */
    double wait_ms;                           /* sum over posts: post → served */
    double host_ms;                           /* sum over posts after the first: served → next post */
    double step_ms;                           /* sum of the device calls of the steps it was in */
    int n_post, own_steps;                    /* posts; steps its own thread ran */
    int cached, crops, id;
} tk_trace;

typedef struct eng_trace eng_trace;

/* NULL unless ALBEDO_TRACE names a file. */
eng_trace *etr_new(void);
/* A ticket's record, at its end. Called with the engine's mutex held. */
void etr_ticket(eng_trace *tr, const tk_trace *t);
/* A step: when it started, the device call's start and end, sequences and
 * rows, whether a request thread ran it (else the scheduler). Called with
 * the engine's mutex held. */
void etr_step(eng_trace *tr, double t0, double d0, double d1, int n_seq, int rows, int by_request);
/* One more pass of the scheduler's loop. Called with the mutex held. */
void etr_wake(eng_trace *tr);
/* Write the breakdown and the rows to the file, then free. */
void etr_free(eng_trace *tr);

#endif
