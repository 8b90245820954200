/*
 * threadpool.c — a fixed pool of worker threads for the CPU backend.
 *
 * Work is handed out as task indices from an atomic counter, so uneven tasks
 * balance themselves. Workers spin for a short while before sleeping on a
 * condition variable: the decode loop issues a few hundred small parallel
 * regions per token, and a futex wake-up for each would cost more than the
 * work. The calling thread takes tasks too, so a pool of n threads has n-1
 * workers.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define SPIN_ITERS 200000

/* Synchronisation, in short: the caller publishes a job by making the
 * generation odd (setup), waiting until no worker is inside the previous job,
 * writing the job, and making the generation even again. A worker joins by
 * counting itself inside and then re-reading the generation; if it changed,
 * it leaves again. Both sides use sequentially consistent atomics, so either
 * the caller sees the worker inside, or the worker sees the new generation
 * (the Dekker pattern). The caller returns as soon as every task is done —
 * it never waits for a worker that has not woken up, which matters when the
 * machine is oversubscribed and a worker's time slice is far away. */
struct threadpool {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint generation; /* even: a job is published; odd: being set up */
    atomic_int next_task;
    atomic_int done_tasks;
    atomic_int inside;   /* workers between joining and leaving a job */
    atomic_int sleepers; /* workers blocked on cv */
    atomic_int quit;
    /* The current job: written only while the generation is odd and no
     * worker is inside. */
    tp_fn fn;
    void *arg;
    int n_tasks;
};

typedef struct worker_arg {
    threadpool *tp;
    int id;
} worker_arg;

static void run_tasks(threadpool *tp, int thread) {
    for (;;) {
        int t = atomic_fetch_add(&tp->next_task, 1);
        if (t >= tp->n_tasks) break;
        tp->fn(tp->arg, t, thread);
        atomic_fetch_add(&tp->done_tasks, 1);
    }
}

static void *worker_main(void *p) {
    worker_arg *wa = p;
    threadpool *tp = wa->tp;
    int id = wa->id;
    free(wa);
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        int spins = 0;
        while (((g = atomic_load(&tp->generation)) == seen || (g & 1u)) && !atomic_load(&tp->quit)) {
            if (++spins < SPIN_ITERS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&tp->mu);
            atomic_fetch_add(&tp->sleepers, 1);
            while (((g = atomic_load(&tp->generation)) == seen || (g & 1u)) && !atomic_load(&tp->quit))
                pthread_cond_wait(&tp->cv, &tp->mu);
            atomic_fetch_sub(&tp->sleepers, 1);
            pthread_mutex_unlock(&tp->mu);
            spins = 0;
        }
        if (atomic_load(&tp->quit)) break;
        seen = g;
        atomic_fetch_add(&tp->inside, 1);
        if (atomic_load(&tp->generation) == g) run_tasks(tp, id);
        atomic_fetch_sub(&tp->inside, 1);
    }
    return NULL;
}

threadpool *tp_new(int n_threads) {
    if (n_threads < 1) n_threads = 1;
    threadpool *tp = calloc(1, sizeof *tp);
    if (!tp) return NULL;
    tp->n = n_threads;
    pthread_mutex_init(&tp->mu, NULL);
    pthread_cond_init(&tp->cv, NULL);
    tp->threads = calloc((size_t)n_threads, sizeof *tp->threads);
    if (!tp->threads) {
        free(tp);
        return NULL;
    }
    for (int i = 1; i < n_threads; i++) {
        worker_arg *wa = malloc(sizeof *wa);
        if (wa) {
            wa->tp = tp;
            wa->id = i;
        }
        if (!wa || pthread_create(&tp->threads[i], NULL, worker_main, wa)) {
            free(wa);
            tp->n = i; /* run with the threads we got */
            break;
        }
    }
    return tp;
}

void tp_free(threadpool *tp) {
    if (!tp) return;
    pthread_mutex_lock(&tp->mu);
    atomic_store(&tp->quit, 1);
    pthread_cond_broadcast(&tp->cv);
    pthread_mutex_unlock(&tp->mu);
    for (int i = 1; i < tp->n; i++) pthread_join(tp->threads[i], NULL);
    pthread_mutex_destroy(&tp->mu);
    pthread_cond_destroy(&tp->cv);
    free(tp->threads);
    free(tp);
}

int tp_size(const threadpool *tp) { return tp->n; }

void tp_run(threadpool *tp, int n_tasks, tp_fn fn, void *arg) {
    if (n_tasks <= 0) return;
    if (tp->n == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++) fn(arg, t, 0);
        return;
    }
    atomic_fetch_add(&tp->generation, 1); /* odd: setting up */
    while (atomic_load(&tp->inside) != 0) cpu_relax();
    tp->fn = fn;
    tp->arg = arg;
    tp->n_tasks = n_tasks;
    atomic_store(&tp->next_task, 0);
    atomic_store(&tp->done_tasks, 0);
    atomic_fetch_add(&tp->generation, 1); /* even: published */
    if (atomic_load(&tp->sleepers) > 0) {
        pthread_mutex_lock(&tp->mu);
        pthread_cond_broadcast(&tp->cv);
        pthread_mutex_unlock(&tp->mu);
    }
    run_tasks(tp, 0);
    while (atomic_load(&tp->done_tasks) < n_tasks) cpu_relax();
}

int cpu_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
