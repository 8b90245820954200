/*
 * scheduler.c — the asynchronous engine (albedo.h, "Asynchronous engine"):
 * a FIFO queue, admission bounded by batch slots and KV blocks, one
 * scheduler thread that batches the forward passes of the running requests
 * over the paged KV cache (kvcache.c) with text_forward_batch, and an image
 * worker thread that builds new image prefixes meanwhile.
 *
 *   submit ──► queue (FIFO) ──admit──► running ≤ max_batch ──────────► done
 *                  │                     │ new image: image worker      ▲
 *                  │                     │ (decode, vision, prefix      │
 *                  │                     │  prefill into its blocks) ───┤
 *                  │                     │ each step: decode rows, then │
 *                  │                     │ prompt chunks, ≤ token_budget│
 *                  └─ cancel/deadline    └─ cancel/deadline frees blocks┘
 *
 * How a request runs. The generation loops of generate.c are written as
 * straight-line code (prompt, answer loop, reasoning loop, region steps);
 * rather than keep a second, hand-synced copy of them as a state machine,
 * each running request executes gen_run_io on a thread of its own whose
 * forward passes are handed to the engine (gen_io.forward): the request
 * thread posts its input rows and sleeps until a step has run them in a
 * batch with the other requests' rows and written the hidden state and
 * logits into the request's session. So the request threads only sample,
 * stream and decode regions (engine tickets with a one-thread ops context
 * each), one step at a time in lock step, and the decoder's math runs on
 * the engine's ops threads. A step starts when every running request has
 * posted, or when the first post has waited as long as the last step took
 * (a slow stream callback delays the others by at most one step).
 *
 * Blocking session runs (albedo_session_run, through engine_run_session)
 * are tickets too, of the model's own engine: the caller's thread is the
 * request thread and the caller's session the request's session, so
 * results, on_logits and the logits rows land where the session API puts
 * them. Their image is an albedo_image: its prefix K/V is copied into the
 * ticket's blocks by the caller's thread at the first use and then cached
 * under the image's id until the image is freed (engine_forget_image).
 *
 * Images of engine tickets: submit computes the 128-bit key of the image
 * bytes; at admission the scheduler either forks the cached prefix (shared
 * blocks, copy on write of the partial last block) or reserves the blocks
 * and hands the ticket to the image worker, which decodes the image, runs
 * the vision encoder and prefills the 730-position prefix straight into
 * those blocks on its own ops threads (the prefix attends bidirectionally,
 * so it cannot be split into chunks of the scheduler's steps). Running
 * requests keep decoding meanwhile; the finished prefix enters the prefix
 * cache and the ticket starts.
 *
 * Encode-ahead: when every batch slot is taken, up to `ahead` more tickets
 * with an image to build are admitted (on a GPU model as many as the image
 * worker has threads, at most max_batch; none on the CPU; the environment's
 * ALBEDO_ENCODE_AHEAD sets it), each once it would have a slot by the time
 * its build ends (slot_in_time: the running requests' bounds on their
 * remaining steps times the last step's duration, and the runs queued
 * before it, against the builds' moving average; at max_batch 1 against
 * that of their host part, decode and crops, alone), so that it neither
 * waits long for a slot nor slows the builds of requests that hold one
 * (nor, at batch 1, the only running request's steps).
 * Their prefix is built while the running
 * requests decode, enters the prefix cache at once, and the ticket takes a
 * slot when one frees, after any ticket queued before it that could start
 * at once (promote_ahead). Such tickets never step beyond max_batch; their
 * latency runs from their admission, the build included.
 *
 * Who runs a step: the request thread whose post completes it (every
 * running request has posted), else the scheduler thread once the grace has
 * passed; one at a time (stepping). The scheduler thread admits, starts,
 * reaps and times out requests.
 *
 * On a GPU model (backend_cuda.c, docs/CUDA.md) the pool is device memory
 * (kv_pool_init_mem), the engine's md_state is a device step state, so
 * text_forward_batch runs each step's segments on the device with paged
 * attention, several image workers build prefixes straight into device
 * blocks, and forks copy the partial block on the device. The bookkeeping
 * below is the same for both.
 *
 * Timing: with ALBEDO_TRACE=FILE (trace.h) each ticket records when it
 * passes each point above (admission, its light session, the image
 * worker's decode, crops and device work, its thread's start, each post and
 * the step that served it, the end of its loops, its reaping) and the
 * engine its steps; albedo_engine_free writes a breakdown per phase to FILE.
 *
 * Locking: one mutex (mu) guards the queues, the states and the rendezvous
 * fields of every ticket, the counters, the pool's bookkeeping (block
 * tables, free list) and the prefix cache. A step's math runs with mu
 * released, on the step's rows and blocks and the engine's md_state, which
 * only the stepping thread touches. The image worker and a caller that
 * imports a prefix write only into the blocks reserved for their ticket,
 * which nothing else touches until they report back.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "kvcache.h"
#include "session.h"
#include "trace.h"

/* Second half of the prefix key of an albedo_image (the first is its id):
 * content keys of image bytes are hashes and never meet it in practice. */
#define IMAGE_KEY_TAG 0x616c6265646f2d69ull /* "albedo-i" */

typedef enum { TK_QUEUED, TK_ENCODE, TK_RUNNING, TK_ENDING, TK_DONE } tk_state;

struct albedo_ticket {
    albedo_engine *eng;
    albedo_ticket *next; /* link in the engine's queue, then in the worker's */
    albedo_request req;  /* engine tickets: an owned copy (image NULL, on_text from the
                              submit params); session tickets: the caller's request */
    char *question, *object;
    albedo_spatial_ref *refs;
    uint8_t *image; /* engine tickets: the image bytes until the worker decoded them */
    size_t image_len;
    const albedo_image *img; /* session tickets: the encoded image, or NULL */
    int has_image;
    int caller;      /* a session ticket: the caller's thread runs the loops */
    uint64_t key[2]; /* prefix cache key */
    albedo_submit_params cb;
    int est_pos; /* positions reserved: prefix + prompt + outputs */
    double t_submit;
    /* under eng->mu */
    tk_state state;
    int cancel;
    int posted, served, finished;
    int built; /* TK_ENCODE: the prefix is in the blocks (or build_st says why not) */
    int put;   /* the built prefix went into the prefix cache */
    albedo_status build_st;
    const float *emb; /* posted rows [T, dim] at positions pos0.. */
    int T, pos0, n_prefix, want_logits;
    int done_rows; /* of the posted rows, run by earlier steps (a long prompt) */
    double t_post;
    albedo_status step_st;
    char step_err[sizeof(((errbuf *)0)->msg)];
    pthread_cond_t cv; /* served, state changes */
    double t_admit, t_gen_start;
    /* scheduler-owned */
    albedo_session *sess; /* engine tickets: a light session of their own */
    float *own_logits;    /* GPU: the session's own logits buffer while it holds a pinned row */
    int lrow;             /* GPU: 1 + its row of the engine's pinned logits rows, 0: none */
    kv_seq seq;
    int cached;        /* prefix from the cache */
    int ahead;         /* admitted beyond max_batch to build its image early */
    int decode_budget; /* decode steps its loops may take (upper bound) */
    int decode_steps;  /* one-row steps served so far */
    pthread_t th;
    int th_started;
    albedo_status status;
    errbuf err;
    tk_trace tr; /* ALBEDO_TRACE (trace.h): timestamps, when the engine traces */
};

/* One thread of the image worker, with its own state (ops threads, or on a
 * GPU model its own stream and device working memory). */
typedef struct img_thread {
    struct albedo_engine *E;
    md_state st;
    float *emb;    /* [prefix_attn, dim] BOS + image embeddings */
    float *hidden; /* [dim] discarded */
    pthread_t th;
} img_thread;

/* The image worker: builds image prefixes. One thread on the CPU (its ops
 * threads take the cores); on a GPU model several (ALBEDO_IMAGE_WORKERS,
 * default half the cores, 2 to 8), so that the images' decoding and crops,
 * which run on the host, overlap each other and the device's vision work. */
typedef struct img_worker {
    img_thread *th;
    int n_th; /* threads running */
    int started, quit;
    pthread_cond_t cv;
    albedo_ticket *head, *tail; /* waiting tickets, under mu */
    int n_busy;                 /* prefixes being built, under mu */
} img_worker;

struct albedo_engine {
    albedo_model *m;
    albedo_engine_params p;
    md_state st;
    kv_pool pool;
    kv_prefix_cache pc;
    float *emb; /* [emb_cap, dim] the step's input rows */
    int emb_cap;
    float *logits;        /* [max_batch, vocab] */
    txt_seg *segs;        /* [max_batch] */
    albedo_ticket **step; /* [max_batch] tickets of the step */
    int *take;            /* [max_batch] their rows in the step */
    double last_step_ms;  /* under mu: the last step's duration, the grace of the next */
    int stepping;         /* a thread (the scheduler or a request's) runs a step */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* wakes the scheduler (monotonic clock) */
    pthread_t th;
    int th_started, stop;
    int refs; /* under mu: the owner's, and one per submitted ticket not yet freed */
    albedo_ticket *q_head, *q_tail;
    int n_queued;
    albedo_ticket **run; /* [max_batch + ahead] admitted: encoding, waiting or running */
    int n_run;
    int ahead;       /* images built beyond max_batch (encode_ahead) */
    double build_ms; /* under mu: moving average of the image worker's builds */
    double host_ms;  /* under mu: the same of their host part (decode, crops) */
    img_worker w;
    uint64_t *forget; /* [n_forget][2] keys of freed albedo_images */
    int n_forget, cap_forget;
    /* Counts every event that can give the scheduler work (submit, post,
     * finish, cancel, a built prefix, stop): it sleeps only while the count
     * is unchanged since it last looked, so no wake-up is lost while it
     * works unlocked. */
    unsigned long events;
    int in_admit; /* setting a request up with mu released */
    /* GPU: page-locked logits rows, one per running ticket (a step copies
     * a logits row straight into its ticket's row), registered once at
     * engine start; lpin_free holds the free rows' indices. dev_pick:
     * ALBEDO_CUDA_DEVICE_PICK, read at engine start. */
    float *lpin;
    size_t lpin_row; /* floats a row */
    int *lpin_free, n_lpin_free;
    int dev_pick;
    albedo_engine_stats stats; /* counters, under mu */
    eng_trace *tr;             /* ALBEDO_TRACE (trace.h), or NULL: set before the threads start */
    int n_submitted;           /* under mu: the trace's ticket ids */
    errbuf err;
};

/* Timestamp field x of a ticket's trace when engine E traces. */
#define TR_AT(E, x)                  \
    do {                             \
        if ((E)->tr) (x) = now_ms(); \
    } while (0)

albedo_engine_params albedo_engine_params_default(void) {
    albedo_engine_params p = {.max_batch = 16,
                              .kv_bytes = 0,
                              .block_size = 16,
                              .max_queue = 1024,
                              .token_budget = 512,
                              .n_threads = 0,
                              .vision_threads = 0};
    return p;
}

static int expired(const albedo_ticket *t, double now) {
    return t->cb.deadline_ms > 0 && now - t->t_submit > t->cb.deadline_ms;
}

static albedo_status cancel_status(albedo_ticket *t, double now, const char *where) {
    if (!t->cancel && expired(t, now))
        return errf(&t->err, ALBEDO_ERR_CANCELLED, "the request's deadline of %.0f ms passed%s", t->cb.deadline_ms,
                    where);
    return errf(&t->err, ALBEDO_ERR_CANCELLED, "the request was cancelled");
}

/* ---- the request side ------------------------------------------------------ */

static int step_due(const albedo_engine *E, double now, double *wake);
static int run_step(albedo_engine *E, albedo_ticket *self);

/* gen_io.forward: post the rows, sleep until a step served them. The post
 * that completes a step runs it on this thread: a request alone in the
 * engine (a blocking session run, most often) never waits for another
 * thread to wake up. */
static albedo_status tk_forward(void *user, const float *emb, int T, int pos0, int n_prefix, int want_logits,
                                errbuf *e) {
    albedo_ticket *t = user;
    albedo_engine *E = t->eng;
    pthread_mutex_lock(&E->mu);
    albedo_status st = ALBEDO_OK;
    const double now = now_ms();
    if (t->cancel) {
        st = errf(e, ALBEDO_ERR_CANCELLED, "the request was cancelled");
    } else if (expired(t, now)) {
        st = errf(e, ALBEDO_ERR_CANCELLED, "the request's deadline of %.0f ms passed", t->cb.deadline_ms);
    } else {
        t->emb = emb;
        t->T = T;
        t->pos0 = pos0;
        t->n_prefix = n_prefix;
        t->want_logits = want_logits;
        t->done_rows = 0;
        t->t_post = now;
        t->served = 0;
        t->posted = 1;
        E->events++;
        if (E->tr) {
            if (!t->tr.n_post++)
                t->tr.first_post = now;
            else
                t->tr.host_ms += now - t->tr.last_served;
        }
        double wake = INFINITY;
        if (E->stepping || !step_due(E, now, &wake) || !run_step(E, t)) pthread_cond_signal(&E->cv);
        while (!t->served) pthread_cond_wait(&t->cv, &E->mu);
        if (E->tr) {
            const double served = now_ms();
            if (!t->tr.first_served) t->tr.first_served = served;
            t->tr.wait_ms += served - now;
            t->tr.last_served = served;
        }
        st = t->step_st;
        if (st) errf(e, st, "%s", t->step_err);
    }
    pthread_mutex_unlock(&E->mu);
    return st;
}

/* The generation loops of a running ticket, then tell the scheduler. */
static void tk_run(albedo_ticket *t) {
    albedo_engine *E = t->eng;
    t->t_gen_start = now_ms();
    t->tr.gen0 = t->t_gen_start;
    gen_io io = {.forward = tk_forward, .user = t, .image_pos = t->has_image ? E->m->cfg.prefix_attn : 0};
    albedo_status st = gen_run_io(t->sess, &t->req, &io, &t->err);
    TR_AT(E, t->tr.gen1);
    pthread_mutex_lock(&E->mu);
    t->status = st;
    t->finished = 1;
    E->events++;
    pthread_cond_signal(&E->cv);
    pthread_mutex_unlock(&E->mu);
}

static void *tk_main(void *arg) {
    tk_run(arg);
    return NULL;
}

/* ---- the image worker ------------------------------------------------------- */

/* Decode t's image, run the vision encoder and prefill the prefix into t's
 * blocks. Runs on the worker thread with mu released. */
static albedo_status build_prefix(albedo_engine *E, img_thread *W, albedo_ticket *t, double *host_end) {
    const md_config *c = &E->m->cfg;
    img_rgb im = {0};
    img_crops crops = {0};
    errbuf sub = {{0}};
    albedo_status st = img_decode(t->image, t->image_len, &E->m->limits, &im, &sub);
    free(t->image); /* the bytes are not needed past this point */
    t->image = NULL;
    TR_AT(E, t->tr.b_decode);
    if (!st) st = img_make_crops(&im, c->crop_size, c->patch, c->overlap_margin, c->max_crops, &crops, &sub);
    img_free(&im);
    *host_end = now_ms();
    t->tr.b_crops = *host_end;
    t->tr.crops = crops.n;
    if (st) {
        img_crops_free(&crops);
        return errf(&t->err, st, "image: %s", sub.msg);
    }
    if (W->st.cu) { /* backend_cuda.c: vision and the prefix on the GPU, K/V into the device pool */
        st = md_cuda_prefix_paged(&W->st, &crops, E->pool.k, E->pool.v, E->pool.block, t->seq.blocks, t->seq.n_blocks,
                                  &t->err);
        TR_AT(E, t->tr.b_dev);
        img_crops_free(&crops);
        return st;
    }
    text_embed(E->m, c->bos, W->emb);
    st = vision_encode(&W->st, &crops, W->emb + c->dim, NULL, &t->err);
    img_crops_free(&crops);
    if (st) return st;
    txt_seg g = {.k = E->pool.k,
                 .v = E->pool.v,
                 .blocks = t->seq.blocks,
                 .block_size = E->pool.block,
                 .pos0 = 0,
                 .T = c->prefix_attn,
                 .n_prefix = c->prefix_attn,
                 .hidden = W->hidden};
    st = text_forward_batch(&W->st, W->emb, &g, 1, NULL, &t->err);
    TR_AT(E, t->tr.b_dev);
    return st;
}

static void *worker_main(void *arg) {
    img_thread *wt = arg;
    albedo_engine *E = wt->E;
    img_worker *W = &E->w;
    pthread_mutex_lock(&E->mu);
    for (;;) {
        while (!W->head && !W->quit) pthread_cond_wait(&W->cv, &E->mu);
        albedo_ticket *t = W->head;
        if (!t) break;
        W->head = t->next;
        if (!W->head) W->tail = NULL;
        t->next = NULL;
        W->n_busy++;
        pthread_mutex_unlock(&E->mu);
        const double b0 = now_ms();
        t->tr.b_start = b0;
        double host_end = b0;
        albedo_status st = build_prefix(E, wt, t, &host_end);
        const double took = now_ms() - b0, host = host_end - b0;
        pthread_mutex_lock(&E->mu);
        W->n_busy--;
        if (!st) {
            E->build_ms = E->build_ms > 0 ? 0.75 * E->build_ms + 0.25 * took : took;
            E->host_ms = E->host_ms > 0 ? 0.75 * E->host_ms + 0.25 * host : host;
        }
        t->built = 1;
        t->build_st = st;
        E->events++;
        pthread_cond_signal(&E->cv);
    }
    pthread_mutex_unlock(&E->mu);
    return NULL;
}

static void worker_thread_free(img_thread *wt) {
    md_state_free(&wt->st);
    free(wt->emb);
    free(wt->hidden);
    wt->emb = wt->hidden = NULL;
}

/* Threads of the image worker: on a GPU model half the host's cores, 2 to 8
 * (the host work per image is the decode and the crops, ~20-40 ms; the
 * device's is ~15-20 ms), or ALBEDO_IMAGE_WORKERS; one on the CPU. */
static int image_threads_wanted(const albedo_model *m) {
    const char *env = getenv("ALBEDO_IMAGE_WORKERS");
    const long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int want = m->cuda ? (int)(ncpu / 2 < 2 ? 2 : ncpu / 2 > 8 ? 8 : ncpu / 2) : 1;
    if (env && *env && atoi(env) > 0) want = atoi(env) < 64 ? atoi(env) : 64;
    return want;
}

/* Made at the first image that needs it; called by the scheduler. Threads
 * past the first that cannot be made are done without. */
static albedo_status worker_start(albedo_engine *E, errbuf *e) {
    img_worker *W = &E->w;
    const md_config *c = &E->m->cfg;
    const int want = image_threads_wanted(E->m);
    /* On the GPU the ops threads only serve the region decoders: one each. */
    const int n = E->m->cuda            ? 1
                  : E->p.vision_threads ? E->p.vision_threads
                  : E->p.n_threads      ? E->p.n_threads
                                        : E->m->params.n_threads;
    if (!W->th && !(W->th = calloc((size_t)want, sizeof *W->th)))
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for the image worker");
    albedo_status st = ALBEDO_OK;
    int k = 0;
    for (; k < want; k++) {
        img_thread *wt = &W->th[k];
        wt->E = E;
        st = md_state_init_ex(&wt->st, E->m, n, 0, e);
        if (!st && E->m->cuda) st = md_cuda_engine_state_init(&wt->st, c->prefix_attn, 1, E->pool.block, 1, e);
        if (!st) {
            wt->emb = malloc((size_t)c->prefix_attn * c->dim * sizeof(float));
            wt->hidden = malloc((size_t)c->dim * sizeof(float));
            if (!wt->emb || !wt->hidden) st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for the image worker");
        }
        if (!st && pthread_create(&wt->th, NULL, worker_main, wt))
            st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "cannot start the image worker");
        if (st) {
            worker_thread_free(wt);
            break;
        }
    }
    W->n_th = k;
    if (!k) { /* a later image tries again */
        free(W->th);
        W->th = NULL;
        return st;
    }
    W->started = 1;
    return ALBEDO_OK;
}

static void worker_push(albedo_engine *E, albedo_ticket *t) {
    img_worker *W = &E->w;
    t->next = NULL;
    if (W->tail)
        W->tail->next = t;
    else
        W->head = t;
    W->tail = t;
    pthread_cond_signal(&W->cv);
}

/* Take t off the worker's queue; 0 if it is not there (being built). */
static int worker_unqueue(albedo_engine *E, albedo_ticket *t) {
    img_worker *W = &E->w;
    albedo_ticket *prev = NULL;
    for (albedo_ticket *x = W->head; x; prev = x, x = x->next) {
        if (x != t) continue;
        if (prev)
            prev->next = t->next;
        else
            W->head = t->next;
        if (W->tail == t) W->tail = prev;
        t->next = NULL;
        return 1;
    }
    return 0;
}

/* ---- the scheduler side ---------------------------------------------------- */

/* Positions a request may need: its prefix, prompt and outputs. */
static int estimate_positions(const albedo_engine *E, const albedo_ticket *t) {
    const md_config *c = &E->m->cfg;
    const albedo_request *r = &t->req;
    int n = t->has_image ? c->prefix_attn : 1;
    n += 3 * MD_MAX_TEMPLATE + 3 * r->n_spatial_refs + 2;
    const char *txt = r->skill == ALBEDO_SKILL_QUERY ? r->question : r->object;
    if (txt) {
        int k = albedo_tokenize(E->m, txt, NULL, 0);
        n += k > 0 ? k + 1 : (int)strlen(txt) + 1;
    }
    switch (r->skill) {
    case ALBEDO_SKILL_DETECT: n += 3 * r->max_objects + 2; break;
    case ALBEDO_SKILL_POINT: n += 2 * r->max_objects + 2; break;
    default: n += (r->reasoning ? 2 : 1) * r->max_tokens + MD_MAX_TEMPLATE + 2; break;
    }
    return n < E->st.max_ctx ? n : E->st.max_ctx;
}

/* One-row steps a request's loops may take: its outputs (and reasoning). */
static int estimate_decode_steps(const albedo_request *r) {
    switch (r->skill) {
    case ALBEDO_SKILL_DETECT: return 3 * r->max_objects + 2;
    case ALBEDO_SKILL_POINT: return 2 * r->max_objects + 2;
    default: return (r->reasoning ? 2 : 1) * r->max_tokens + 2;
    }
}

static void lpin_give(albedo_engine *E, albedo_ticket *t);

/* End t (any state but DONE) with status st. Called with mu held; drops it
 * around on_done. */
static void tk_end(albedo_engine *E, albedo_ticket *t, albedo_status st) {
    t->status = st;
    kv_seq_release(&E->pool, &t->seq);
    lpin_give(E, t); /* its thread has ended (reap) or never started */
    const albedo_result *res = NULL;
    if (!st && t->sess) {
        albedo_metrics *mt = &t->sess->res.r.metrics;
        /* Prefill covers the image's prefix (built or copied in) from
         * admission on. */
        const double lead = t->t_gen_start - t->t_admit;
        mt->queue_time_ms = t->t_admit - t->t_submit;
        mt->prefill_time_ms += lead;
        mt->ttft_ms += lead;
        /* A session's image was encoded before the run: all of it is reused. */
        mt->cached_tokens = t->img ? t->img->n_pos : t->cached ? E->m->cfg.prefix_attn : 0;
        res = &t->sess->res.r;
    }
    t->state = TK_ENDING;
    if (t->cb.on_done) {
        pthread_mutex_unlock(&E->mu);
        t->cb.on_done(t->cb.user, t, st, res);
        pthread_mutex_lock(&E->mu);
    }
    if (E->tr) {
        t->tr.submit = t->t_submit;
        t->tr.admit = t->t_admit;
        t->tr.done = now_ms();
        etr_ticket(E->tr, &t->tr);
    }
    t->state = TK_DONE;
    pthread_cond_broadcast(&t->cv);
}

static void run_remove(albedo_engine *E, const albedo_ticket *t) {
    for (int i = 0; i < E->n_run; i++)
        if (E->run[i] == t) {
            E->run[i] = E->run[--E->n_run];
            return;
        }
}

static albedo_session *light_session(albedo_engine *E, errbuf *e) {
    albedo_model *m = E->m;
    albedo_session *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->m = m;
    if (md_state_init_ex(&s->st, m, 1, 0, e) || sampler_init(&s->sp, m->cfg.vocab)) {
        albedo_session_free(s);
        return NULL;
    }
    /* A GPU step picks the next token on the device (generate.c's
     * step_pick), or copies the logits row into the ticket's pinned row
     * (lpin_take). */
    s->st.dev_pick = E->dev_pick ? MD_PICK_ALL : 0;
    return s;
}

/* Give t's light session one of the engine's page-locked logits rows in
 * place of its own buffer (none left: it keeps its own, pageable: slower
 * copies, the same result). Called with mu held. */
static void lpin_take(albedo_engine *E, albedo_ticket *t) {
    if (!E->lpin || !t->sess || t->lrow || !E->n_lpin_free) return;
    const int r = E->lpin_free[--E->n_lpin_free];
    t->lrow = 1 + r;
    t->own_logits = t->sess->st.logits;
    t->sess->st.logits = E->lpin + (size_t)r * E->lpin_row;
}

/* Its row back, once nothing runs t's loops. Called with mu held. */
static void lpin_give(albedo_engine *E, albedo_ticket *t) {
    if (!t->lrow) return;
    t->sess->st.logits = t->own_logits;
    E->lpin_free[E->n_lpin_free++] = t->lrow - 1;
    t->lrow = 0;
}

static kv_prefix *prefix_lookup(kv_prefix_cache *c, const uint64_t key[2]) {
    for (int i = 0; i < c->n; i++)
        if (c->e[i].key[0] == key[0] && c->e[i].key[1] == key[1]) return &c->e[i];
    return NULL;
}

static int prefix_building(const albedo_engine *E, const uint64_t key[2]) {
    for (int i = 0; i < E->n_run; i++) {
        const albedo_ticket *r = E->run[i];
        if (r->state == TK_ENCODE && !r->put && r->key[0] == key[0] && r->key[1] == key[1]) return 1;
    }
    return 0;
}

static albedo_status start_thread(albedo_ticket *t) {
    if (pthread_create(&t->th, NULL, tk_main, t))
        return errf(&t->err, ALBEDO_ERR_OUT_OF_MEMORY, "cannot start the request's thread");
    t->th_started = 1;
    return ALBEDO_OK;
}

/* Let an admitted ticket generate: its thread, or its waiting caller. */
static albedo_status go_running(albedo_ticket *t) {
    t->state = TK_RUNNING;
    if (t->caller) {
        pthread_cond_broadcast(&t->cv);
        return ALBEDO_OK;
    }
    albedo_status st = start_thread(t);
    TR_AT(t->eng, t->tr.run);
    return st;
}

/* End every queued ticket that was cancelled or whose deadline passed,
 * wherever it stands in the queue. Called with mu held. */
static void sweep_queue(albedo_engine *E, double now) {
    albedo_ticket *dead = NULL, *dead_tail = NULL, *last = NULL;
    for (albedo_ticket **pp = &E->q_head; *pp;) {
        albedo_ticket *t = *pp;
        if (!t->cancel && !expired(t, now)) {
            last = t;
            pp = &t->next;
            continue;
        }
        *pp = t->next;
        E->n_queued--;
        t->next = NULL;
        if (dead_tail)
            dead_tail->next = t;
        else
            dead = t;
        dead_tail = t;
    }
    E->q_tail = last;
    while (dead) {
        albedo_ticket *t = dead;
        dead = t->next;
        t->next = NULL;
        t->t_admit = now;
        tk_end(E, t, cancel_status(t, now, " while queued"));
    }
}

/* Admitted tickets holding one of the max_batch slots (the others were
 * admitted ahead to build their image). Called with mu held. */
static int slots_used(const albedo_engine *E, int *ahead) {
    int n = 0, a = 0;
    for (int i = 0; i < E->n_run; i++) {
        if (E->run[i]->ahead)
            a++;
        else
            n++;
    }
    if (ahead) *ahead = a;
    return n;
}

/* Whether a ticket queued before t could start at once (no image to build:
 * none, its prefix cached, or a caller's albedo_image), so that a free slot
 * goes to it before t. Called with mu held. */
static int queued_ready(const albedo_engine *E, const albedo_ticket *q) {
    if (!q->has_image || q->caller) return 1;
    return !prefix_building(E, q->key) && prefix_lookup((kv_prefix_cache *)&E->pc, q->key);
}

static int earlier_ready(const albedo_engine *E, const albedo_ticket *t) {
    for (const albedo_ticket *q = E->q_head; q && q->t_submit <= t->t_submit; q = q->next) {
        if (q == t) break;
        if (queued_ready(E, q)) return 1;
    }
    return 0;
}

/* Give tickets admitted ahead a slot as slots free, in admission order,
 * unless a ticket queued before them is ready to run. Called with mu held. */
static void promote_ahead(albedo_engine *E) {
    int used = slots_used(E, NULL);
    while (used < E->p.max_batch) {
        albedo_ticket *t = NULL; /* the earliest submitted */
        for (int i = 0; i < E->n_run; i++)
            if (E->run[i]->ahead && (!t || E->run[i]->t_submit < t->t_submit)) t = E->run[i];
        if (!t || earlier_ready(E, t)) return;
        t->ahead = 0;
        used++;
        if (t->built) E->events++; /* collect starts it: the scheduler goes round again */
    }
}

/* Whether queued ticket t, if its image were built ahead now, would have a
 * slot by the time the build ends (the builds' moving average): the
 * soonest slot to free (its holder's bound on remaining steps times the
 * last step's duration; a holder still building does not count: two
 * builds at once slow each other),
 * then the runs that take slots before t (tickets built ahead already, and
 * those queued before it that could start at once) spread over the slots.
 * So an image built ahead waits little for its slot and does not slow the
 * builds of the requests that hold one.
 *
 * With one slot (max_batch 1), only the build's host part (decode, crops)
 * is to end by then: there a step is the device's only work, and a build's
 * vision and prefix beside it slow both (ALBEDO_TRACE on an H100, Moondream
 * 2: the cached-image request beside a build 9.4 → 20 ms, the build 27 →
 * 33 ms, so the cold request's latency 36 → 44 ms), while the decode and
 * crops on the host cost the device nothing. Called with mu held. */
static int slot_in_time(const albedo_engine *E, const albedo_ticket *t) {
    if (E->build_ms <= 0) return 1; /* no build timed yet */
    const double step = E->last_step_ms > 0.5 ? E->last_step_ms : 0.5;
    double soonest = INFINITY, before = 0;
    for (int i = 0; i < E->n_run; i++) {
        const albedo_ticket *r = E->run[i];
        const int left = r->decode_budget - r->decode_steps > 0 ? r->decode_budget - r->decode_steps : 0;
        if (r->ahead) {
            before += left * step;
            continue;
        }
        if (r->state == TK_ENCODE && !r->built) continue; /* building: not soon, and builds compete */
        if (left * step < soonest) soonest = left * step;
    }
    for (const albedo_ticket *q = E->q_head; q && q != t && q->t_submit <= t->t_submit; q = q->next)
        if (queued_ready(E, q)) before += q->decode_budget * step;
    const double lead = E->p.max_batch == 1 && E->host_ms > 0 ? E->host_ms : E->build_ms;
    return soonest + before / E->p.max_batch <= lead;
}

/* Admit queue heads while a slot and their blocks are free. FIFO: a head
 * that has too few blocks yet blocks the ones behind it; one whose image's
 * prefix is being built lets them pass (it starts from the cached prefix
 * once built), so that the image worker builds other images meanwhile.
 * With every slot taken, up to E->ahead tickets with an image to build are
 * admitted ahead (encode-ahead): their prefix is built while the running
 * requests decode, and they take a slot as one frees (promote_ahead).
 * Called with mu held. */
static void admit(albedo_engine *E) {
    const md_config *c = &E->m->cfg;
    sweep_queue(E, now_ms());
    promote_ahead(E);
    albedo_ticket *prev = NULL; /* the last ticket passed over (it stays queued) */
    int passed = 0;
    for (;;) {
        int n_ahead;
        const int used = slots_used(E, &n_ahead);
        if (used >= E->p.max_batch && n_ahead >= E->ahead) break;
        albedo_ticket *t = prev ? prev->next : E->q_head;
        if (!t) break;
        albedo_status st = ALBEDO_OK;
        if (t->has_image && prefix_building(E, t->key)) { /* wait for that prefix */
            prev = t;
            continue;
        }
        kv_prefix *hit = t->has_image ? prefix_lookup(&E->pc, t->key) : NULL;
        /* Every slot taken: only an image to build may go ahead. */
        const int ahead = used >= E->p.max_batch;
        if (ahead && (hit || !t->image)) {
            if (++passed > 256) break; /* look that far down the queue for images */
            prev = t;
            continue;
        }
        if (ahead && !slot_in_time(E, t)) break; /* nor will a later one */
        const int total = kv_blocks_for(&E->pool, t->est_pos);
        const int need = total - (hit ? c->prefix_attn / E->pool.block : 0);
        if (total > E->pool.n_blocks)
            st = errf(&t->err, ALBEDO_ERR_LIMIT, "the request needs %d KV blocks, the cache has %d", total,
                      E->pool.n_blocks);
        if (!st && E->pool.n_free < need) {
            if (hit) hit->pinned = 1;
            kv_prefix_evict(&E->pool, &E->pc, need);
            hit = t->has_image ? prefix_lookup(&E->pc, t->key) : NULL;
            if (hit) hit->pinned = 0;
            if (E->pool.n_free < need) {
                if (E->n_run > 0) return; /* wait for running requests to free blocks */
                /* Nothing runs and the pinned hit holds the rest: drop it too. */
                if (hit) {
                    kv_prefix_evict(&E->pool, &E->pc, need + 1);
                    continue;
                }
                st = errf(&t->err, ALBEDO_ERR_LIMIT, "not enough KV blocks for the request");
            }
        }
        /* Dequeue. */
        if (prev)
            prev->next = t->next;
        else
            E->q_head = t->next;
        if (E->q_tail == t) E->q_tail = prev;
        t->next = NULL;
        E->n_queued--;
        t->t_admit = now_ms();
        if (st) {
            tk_end(E, t, st);
            continue;
        }
        if (t->has_image) {
            if (hit)
                E->pc.hits++;
            else
                E->pc.misses++;
        }
        if (hit) hit->last_use = ++E->pc.clock;
        if (hit && kv_seq_fork(&E->pool, &t->seq, &hit->seq, hit->n_pos))
            st = errf(&t->err, ALBEDO_ERR_LIMIT, "no KV block free for the request");
        if (!st && kv_seq_reserve(&E->pool, &t->seq, t->est_pos))
            st = errf(&t->err, ALBEDO_ERR_LIMIT, "no KV blocks free for the request");
        const int need_worker = !st && t->image && !hit && !E->w.started;
        /* The setup below runs with mu released (only this thread starts
         * the worker). */
        E->in_admit = 1;
        pthread_mutex_unlock(&E->mu);
        if (!st && !t->caller && !(t->sess = light_session(E, &t->err)))
            st = errf(&t->err, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for a request");
        TR_AT(E, t->tr.sess);
        if (!st && need_worker) st = worker_start(E, &t->err);
        pthread_mutex_lock(&E->mu);
        E->in_admit = 0;
        if (st) {
            tk_end(E, t, st);
            continue;
        }
        lpin_take(E, t);
        t->cached = hit != NULL;
        t->tr.cached = hit || !t->has_image;
        t->ahead = ahead;
        E->run[E->n_run++] = t;
        if (t->has_image && !hit) {
            /* The prefix is built off this thread: by the image worker, or
             * copied in by the waiting caller from its albedo_image. */
            t->state = TK_ENCODE;
            if (t->caller)
                pthread_cond_broadcast(&t->cv);
            else
                worker_push(E, t);
        } else if ((st = go_running(t))) {
            run_remove(E, t);
            tk_end(E, t, st);
        }
    }
}

/* Start the tickets whose prefix is built, caching the prefix. Called with
 * mu held. */
static void collect(albedo_engine *E) {
    const md_config *c = &E->m->cfg;
    promote_ahead(E);
    for (int i = 0; i < E->n_run;) {
        albedo_ticket *t = E->run[i];
        if (t->state != TK_ENCODE || !t->built) {
            i++;
            continue;
        }
        albedo_status st = t->build_st;
        if (!t->tr.collect) TR_AT(E, t->tr.collect);
        /* A finished prefix is kept even if its request was cancelled
         * meanwhile: the work is done. On OOM it is just not cached. A
         * ticket admitted ahead caches it at once and waits for a slot. */
        if (!st && !t->put) kv_prefix_put(&E->pool, &E->pc, t->key, &t->seq, c->prefix_attn);
        t->put = 1;
        const double now = now_ms();
        if (!st && (t->cancel || expired(t, now))) st = cancel_status(t, now, "");
        if (!st && t->ahead) {
            i++;
            continue;
        }
        if (!st && !(st = go_running(t))) {
            i++;
            continue;
        }
        run_remove(E, t);
        tk_end(E, t, st);
    }
}

/* End the requests whose loops returned (joining their thread), and the
 * cancelled or expired ones still waiting for the image worker. Called with
 * mu held. */
static void reap(albedo_engine *E) {
    const double now = now_ms();
    for (int i = 0; i < E->n_run;) {
        albedo_ticket *t = E->run[i];
        albedo_status st = t->status;
        int end = t->finished;
        if (!end && t->state == TK_ENCODE && !t->built && !t->caller && (t->cancel || expired(t, now)) &&
            worker_unqueue(E, t)) {
            end = 1;
            st = cancel_status(t, now, " while its image waited");
        }
        if (!end) {
            i++;
            continue;
        }
        E->run[i] = E->run[--E->n_run];
        if (t->th_started) {
            pthread_mutex_unlock(&E->mu);
            pthread_join(t->th, NULL);
            pthread_mutex_lock(&E->mu);
            t->th_started = 0;
        }
        TR_AT(E, t->tr.reap);
        tk_end(E, t, st);
    }
}

/* Drop the prefixes of freed albedo_images. Called with mu held. */
static void forget(albedo_engine *E) {
    for (int k = 0; k < E->n_forget; k++) {
        kv_prefix_cache *c = &E->pc;
        for (int i = 0; i < c->n; i++)
            if (c->e[i].key[0] == E->forget[2 * k] && c->e[i].key[1] == E->forget[2 * k + 1]) {
                kv_seq_release(&E->pool, &c->e[i].seq);
                c->e[i] = c->e[--c->n];
                break;
            }
    }
    E->n_forget = 0;
}

/* Whether to run a step now: every running request has posted its rows, or
 * the first post has waited as long as the last step took (at least 2 ms).
 * Otherwise *wake gets the time to look again. */
static int step_due(const albedo_engine *E, double now, double *wake) {
    int any = 0, all = 1;
    double first = 0;
    for (int i = 0; i < E->n_run; i++) {
        const albedo_ticket *t = E->run[i];
        if (t->state != TK_RUNNING || t->finished) continue;
        if (!t->posted) {
            all = 0;
        } else if (!any || t->t_post < first) {
            first = t->t_post;
            any = 1;
        }
    }
    if (!any) return 0;
    if (all) return 1;
    const double grace = E->last_step_ms > 2.0 ? E->last_step_ms : 2.0;
    if (now - first >= grace) return 1;
    if (first + grace < *wake) *wake = first + grace;
    return 0;
}

static int reserve_rows(albedo_engine *E, int T) {
    if (T <= E->emb_cap) return 0;
    float *p = realloc(E->emb, (size_t)T * E->m->cfg.dim * sizeof(float));
    if (!p) return -1;
    E->emb = p;
    E->emb_cap = T;
    return 0;
}

/* Serve t with status st (a step failed for it). Called with mu held. */
static void serve_error(albedo_ticket *t, albedo_status st, const char *msg) {
    t->step_st = st;
    snprintf(t->step_err, sizeof t->step_err, "%s", msg);
    t->posted = 0;
    t->served = 1;
    pthread_cond_broadcast(&t->cv);
}

/* One forward step over the posted rows: decode rows first, then prompts,
 * a prompt beyond the token budget split over steps (its rows are causal).
 * Called with mu held and no step running; runs the math with mu released.
 * Returns 0 if there was nothing to run. */
static int run_step(albedo_engine *E, albedo_ticket *self) {
    const md_config *c = &E->m->cfg;
    int n = 0, rows = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < E->n_run; i++) {
            albedo_ticket *t = E->run[i];
            if (t->state != TK_RUNNING || !t->posted || t->finished) continue;
            const int left = t->T - t->done_rows;
            if ((left == 1) != (pass == 0)) continue;
            const int take = left < E->p.token_budget - rows ? left : E->p.token_budget - rows;
            if (take <= 0) continue;
            /* The estimate covers every request the loops can make; grow
             * the table all the same if one goes past it. */
            if (kv_seq_reserve(&E->pool, &t->seq, t->pos0 + t->done_rows + take)) {
                serve_error(t, ALBEDO_ERR_LIMIT, "a request outgrew its KV reservation");
                continue;
            }
            E->step[n] = t;
            E->take[n++] = take;
            rows += take;
        }
    if (!n) return 0;
    E->stats.steps++;
    E->stats.step_sequences += (uint64_t)n;
    E->stats.step_rows += (uint64_t)rows;
    if (E->w.n_busy) E->stats.steps_while_encoding++;
    E->stepping = 1;
    pthread_mutex_unlock(&E->mu);
    const double t0 = now_ms();
    albedo_status st = ALBEDO_OK;
    if (reserve_rows(E, rows))
        st = errf(&E->err, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for a step of %d rows", rows);
    for (int i = 0, r0 = 0; i < n && !st; i++) {
        const albedo_ticket *t = E->step[i];
        const int last = t->done_rows + E->take[i] == t->T;
        md_pick *pk = last && t->want_logits && t->sess->st.dev_pick ? t->sess->st.pick : NULL;
        E->segs[i] = (txt_seg){.k = E->pool.k,
                               .v = E->pool.v,
                               .blocks = t->seq.blocks,
                               .block_size = E->pool.block,
                               .pos0 = t->pos0 + t->done_rows,
                               .T = E->take[i],
                               .n_prefix = t->n_prefix,
                               .hidden = t->sess->st.hidden,
                               .logits = last && t->want_logits && !pk ? t->sess->st.logits : NULL,
                               .pick = pk};
        memcpy(E->emb + (size_t)r0 * c->dim, t->emb + (size_t)t->done_rows * c->dim,
               (size_t)E->take[i] * c->dim * sizeof(float));
        r0 += E->take[i];
    }
    const double d0 = E->tr ? now_ms() : 0;
    if (!st) st = text_forward_batch(&E->st, E->emb, E->segs, n, E->logits, &E->err);
    const double t1 = now_ms(), took = t1 - t0;
    pthread_mutex_lock(&E->mu);
    E->stepping = 0;
    E->last_step_ms = took;
    if (E->tr) {
        etr_step(E->tr, t0, d0, t1, n, rows, self != NULL);
        if (self) self->tr.own_steps++;
    }
    for (int i = 0; i < n; i++) {
        albedo_ticket *t = E->step[i];
        if (E->tr) t->tr.step_ms += t1 - d0;
        t->done_rows += E->take[i];
        if (t->T == 1) t->decode_steps++;
        if (st) {
            serve_error(t, st, E->err.msg);
        } else if (t->done_rows == t->T) {
            t->step_st = ALBEDO_OK;
            t->posted = 0;
            t->served = 1;
            pthread_cond_broadcast(&t->cv); /* the request thread; ticket_wait ignores it */
        }
    }
    /* With room to build ahead and requests queued, the scheduler looks
     * again whether an image built now would have its slot in time
     * (slot_in_time). */
    if (E->ahead && E->q_head) {
        int n_ahead;
        slots_used(E, &n_ahead);
        if (n_ahead < E->ahead) {
            E->events++;
            pthread_cond_signal(&E->cv);
        }
    }
    /* Rows left over (a prompt's next chunk, a post during the step): the
     * scheduler decides when they run. */
    for (int i = 0; i < E->n_run; i++)
        if (E->run[i]->posted) {
            E->events++;
            pthread_cond_signal(&E->cv);
            break;
        }
    return 1;
}

/* The earliest deadline of a ticket that is waiting (queued, or for the
 * image worker), or INFINITY. Called with mu held. */
static double next_deadline(const albedo_engine *E) {
    double d = INFINITY;
    for (const albedo_ticket *t = E->q_head; t; t = t->next)
        if (t->cb.deadline_ms > 0 && t->t_submit + t->cb.deadline_ms < d) d = t->t_submit + t->cb.deadline_ms;
    for (const albedo_ticket *t = E->w.head; t; t = t->next)
        if (t->cb.deadline_ms > 0 && t->t_submit + t->cb.deadline_ms < d) d = t->t_submit + t->cb.deadline_ms;
    for (int i = 0; i < E->n_run; i++) { /* built ahead, waiting for a slot */
        const albedo_ticket *t = E->run[i];
        if (t->ahead && t->cb.deadline_ms > 0 && t->t_submit + t->cb.deadline_ms < d)
            d = t->t_submit + t->cb.deadline_ms;
    }
    return d;
}

static void *sched_main(void *arg) {
    albedo_engine *E = arg;
    pthread_mutex_lock(&E->mu);
    for (;;) {
        const unsigned long seen = E->events;
        etr_wake(E->tr);
        forget(E);
        collect(E);
        reap(E);
        if (E->stop) {
            /* Cancel everything; running requests end at their next step,
             * prefixes being built when they are. */
            for (albedo_ticket *t = E->q_head; t; t = t->next) t->cancel = 1;
            for (int i = 0; i < E->n_run; i++) E->run[i]->cancel = 1;
            reap(E);
        }
        admit(E);
        E->stats.kv_blocks_used = E->pool.n_blocks - E->pool.n_free;
        if (E->stop && !E->q_head && !E->n_run) break;
        double wake = next_deadline(E);
        if (!E->stepping && step_due(E, now_ms(), &wake) && run_step(E, NULL)) continue;
        if (E->events != seen) continue;
        if (wake == INFINITY) {
            while (E->events == seen) pthread_cond_wait(&E->cv, &E->mu);
            continue;
        }
        /* 1 ms late at most: a deadline is then past for certain. */
        const double at = wake + 1.0;
        struct timespec ts = {(time_t)(at / 1e3), (long)(fmod(at, 1e3) * 1e6)};
        while (E->events == seen && now_ms() < wake)
            if (pthread_cond_timedwait(&E->cv, &E->mu, &ts) == ETIMEDOUT) break;
    }
    pthread_mutex_unlock(&E->mu);
    return NULL;
}

/* ---- public API ---------------------------------------------------------------- */

static size_t default_kv_bytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    size_t ram = pages > 0 && psz > 0 ? (size_t)pages * (size_t)psz : (size_t)4 << 30;
    size_t b = ram / 4, cap = (size_t)8 << 30;
    return b < cap ? b : cap;
}

albedo_status albedo_engine_new(albedo_model *m, const albedo_engine_params *params, albedo_engine **out) {
    errbuf e = {{0}};
    if (!m || !out) {
        errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "model or out is NULL");
        error_set_last(e.msg);
        return ALBEDO_ERR_INVALID_ARGUMENT;
    }
    *out = NULL;
    albedo_engine_params p = params ? *params : albedo_engine_params_default();
    albedo_status st = ALBEDO_OK;
    if (p.max_batch < 1 || p.max_batch > 4096 || p.block_size < 1 || p.block_size > 4096 || p.max_queue < 0 ||
        p.token_budget < 1 || p.n_threads < 0 || p.vision_threads < 0)
        st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "engine parameters out of range");
    albedo_engine *E = st ? NULL : calloc(1, sizeof *E);
    if (!st && !E) st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    if (st) {
        error_set_last(e.msg);
        return st;
    }
    E->refs = 1;
    E->m = m;
    E->tr = etr_new();
    if (!p.kv_bytes && !m->cuda) p.kv_bytes = default_kv_bytes();
    E->p = p;
    const md_config *c = &m->cfg;
    pthread_mutex_init(&E->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* now_ms's clock, for deadlines */
    pthread_cond_init(&E->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&E->w.cv, NULL);
    kv_prefix_init(&E->pc);
    st = md_state_init_ex(&E->st, m, p.n_threads ? p.n_threads : m->params.n_threads, 0, &e);
    /* A GPU model's engine steps on the device (backend_cuda.c): a state for
     * a step's rows and sequences, and the pool in device memory, by
     * default half of what the card has free then. */
    kv_mem km;
    if (!st && m->cuda) {
        st = md_cuda_engine_state_init(&E->st, p.token_budget > p.max_batch ? p.token_budget : p.max_batch, p.max_batch,
                                       p.block_size, 0, &e);
        md_cuda_kv_mem(m, &km);
        if (!p.kv_bytes) E->p.kv_bytes = p.kv_bytes = md_cuda_kv_default_bytes(m);
    }
    if (!st) {
        /* At least one request of the full context always fits. */
        const int min_blocks = (E->st.max_ctx + p.block_size - 1) / p.block_size + 1;
        /* A device pool's element is the device cache's (bf16 or e4m3). */
        st = kv_pool_init_mem(&E->pool, c->n_layers, c->n_kv_heads * c->head_dim,
                              m->cuda ? md_cuda_kv_elem_bytes(m) : kv_elem_bytes(m->kv_dt), p.block_size, p.kv_bytes,
                              min_blocks, m->cuda ? &km : NULL, &e);
    }
    if (!st) {
        E->stats.kv_blocks_total = E->pool.n_blocks;
        E->logits = malloc((size_t)p.max_batch * c->vocab * sizeof(float));
        E->segs = calloc((size_t)p.max_batch, sizeof *E->segs);
        E->step = calloc((size_t)p.max_batch, sizeof *E->step);
        E->take = calloc((size_t)p.max_batch, sizeof *E->take);
        /* Encode-ahead: on a GPU model as many images as the worker has
         * threads (at most max_batch) are built beyond max_batch, so that
         * the host's decode and crops and the device's vision overlap the
         * running requests' steps; none on the CPU, whose cores the steps
         * already use. ALBEDO_ENCODE_AHEAD overrides it. */
        const char *env = getenv("ALBEDO_ENCODE_AHEAD");
        const int workers = image_threads_wanted(m);
        E->ahead = m->cuda ? (workers < p.max_batch ? workers : p.max_batch) : 0;
        if (env && *env) E->ahead = atoi(env) < 0 ? 0 : atoi(env) > 64 ? 64 : atoi(env);
        E->run = calloc((size_t)p.max_batch + (size_t)E->ahead, sizeof *E->run);
        if (!E->logits || !E->segs || !E->step || !E->take || !E->run)
            st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for the engine");
    }
    if (!st && m->cuda) {
        /* A ticket runs only from E->run, so max_batch + ahead rows serve
         * them all; a light session's logits buffer holds the largest
         * head's row. */
        const int n_rows = p.max_batch + E->ahead;
        const char *dp = getenv("ALBEDO_CUDA_DEVICE_PICK"); /* "0": pick on the host, for comparison */
        E->dev_pick = !(dp && dp[0] == '0');
        size_t nl = (size_t)c->vocab;
        if ((size_t)c->coord_out > nl) nl = (size_t)c->coord_out;
        if ((size_t)c->size_out > nl) nl = (size_t)c->size_out;
        E->lpin_row = (nl + 15) / 16 * 16;
        E->lpin = malloc((size_t)n_rows * E->lpin_row * sizeof(float));
        E->lpin_free = malloc((size_t)n_rows * sizeof *E->lpin_free);
        if (!E->lpin || !E->lpin_free) {
            st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for the engine's logits rows");
        } else {
            md_cuda_host_pin(E->lpin, (size_t)n_rows * E->lpin_row * sizeof(float), 1);
            for (int i = n_rows - 1; i >= 0; i--) E->lpin_free[E->n_lpin_free++] = i;
        }
    }
    if (!st && pthread_create(&E->th, NULL, sched_main, E))
        st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "cannot start the scheduler thread");
    if (st) {
        albedo_engine_free(E);
        error_set_last(e.msg);
        return st;
    }
    E->th_started = 1;
    *out = E;
    return ALBEDO_OK;
}

/* The engine's struct (its lock, which tickets take) outlives
 * albedo_engine_free until the last ticket is freed: a ticket may be freed
 * after the engine, or while another thread frees it. */
static void engine_unref(albedo_engine *E) {
    pthread_mutex_lock(&E->mu);
    const int last = --E->refs == 0;
    pthread_mutex_unlock(&E->mu);
    if (!last) return;
    pthread_cond_destroy(&E->w.cv);
    pthread_cond_destroy(&E->cv);
    pthread_mutex_destroy(&E->mu);
    free(E);
}

void albedo_engine_free(albedo_engine *E) {
    if (!E) return;
    if (E->th_started) {
        pthread_mutex_lock(&E->mu);
        E->stop = 1;
        E->events++;
        pthread_cond_signal(&E->cv);
        pthread_mutex_unlock(&E->mu);
        pthread_join(E->th, NULL);
    }
    img_worker *W = &E->w;
    if (W->started) {
        pthread_mutex_lock(&E->mu);
        W->quit = 1;
        pthread_cond_broadcast(&W->cv);
        pthread_mutex_unlock(&E->mu);
        for (int i = 0; i < W->n_th; i++) pthread_join(W->th[i].th, NULL);
    }
    for (int i = 0; i < W->n_th; i++) worker_thread_free(&W->th[i]);
    free(W->th);
    etr_free(E->tr);
    kv_prefix_free(&E->pool, &E->pc);
    kv_pool_free(&E->pool);
    md_state_free(&E->st);
    free(E->emb);
    free(E->logits);
    free(E->segs);
    free(E->step);
    free(E->take);
    free(E->run);
    free(E->forget);
    if (E->lpin) md_cuda_host_pin(E->lpin, 0, 0);
    free(E->lpin);
    free(E->lpin_free);
    engine_unref(E);
}

static char *dup_str(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static void tk_destroy(albedo_ticket *t) {
    free(t->question);
    free(t->object);
    free(t->refs);
    free(t->image);
    if (!t->caller) albedo_session_free(t->sess);
    pthread_cond_destroy(&t->cv);
    free(t);
}

static void enqueue(albedo_engine *E, albedo_ticket *t) {
    t->state = TK_QUEUED;
    if (E->q_tail)
        E->q_tail->next = t;
    else
        E->q_head = t;
    E->q_tail = t;
    E->n_queued++;
    E->events++;
    pthread_cond_signal(&E->cv);
}

albedo_status albedo_engine_submit(albedo_engine *E, const albedo_request *r, const void *image, size_t image_len,
                                   const albedo_submit_params *params, albedo_ticket **out) {
    errbuf e = {{0}};
    albedo_status st = ALBEDO_OK;
    if (!E || !r || !out)
        st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "engine, request or out is NULL");
    else if (r->image)
        st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "engine requests carry image bytes, not an albedo_image");
    else if (image && !image_len)
        st = errf(&e, ALBEDO_ERR_IMAGE, "image data is empty");
    if (!st) st = gen_check(NULL, r, image != NULL, &e);
    if (st) {
        error_set_last(e.msg);
        return st;
    }
    *out = NULL;
    albedo_ticket *t = calloc(1, sizeof *t);
    if (!t) return errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory"), error_set_last(e.msg), ALBEDO_ERR_OUT_OF_MEMORY;
    pthread_cond_init(&t->cv, NULL);
    t->eng = E;
    t->req = *r;
    if (params) t->cb = *params;
    t->req.on_text = t->cb.on_text;
    t->req.user = t->cb.user;
    int oom = 0;
    if (r->question) oom |= !(t->req.question = t->question = dup_str(r->question));
    if (r->object) oom |= !(t->req.object = t->object = dup_str(r->object));
    if (r->n_spatial_refs > 0) {
        t->refs = malloc((size_t)r->n_spatial_refs * sizeof *t->refs);
        if (t->refs) memcpy(t->refs, r->spatial_refs, (size_t)r->n_spatial_refs * sizeof *t->refs);
        oom |= !t->refs;
        t->req.spatial_refs = t->refs;
    }
    if (image) {
        t->image = malloc(image_len);
        if (t->image) memcpy(t->image, image, image_len);
        oom |= !t->image;
        t->image_len = image_len;
        t->has_image = 1;
        kv_hash(image, image_len, 0, t->key);
    }
    if (oom) {
        tk_destroy(t);
        errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory copying the request");
        error_set_last(e.msg);
        return ALBEDO_ERR_OUT_OF_MEMORY;
    }
    t->est_pos = estimate_positions(E, t);
    t->decode_budget = estimate_decode_steps(&t->req);
    t->t_submit = now_ms();
    pthread_mutex_lock(&E->mu);
    if (E->stop || E->n_queued >= E->p.max_queue) {
        pthread_mutex_unlock(&E->mu);
        tk_destroy(t);
        errf(&e, ALBEDO_ERR_LIMIT, "the engine's queue is full (%d requests)", E->p.max_queue);
        error_set_last(e.msg);
        return ALBEDO_ERR_LIMIT;
    }
    t->tr.id = E->n_submitted++;
    E->refs++;
    enqueue(E, t);
    pthread_mutex_unlock(&E->mu);
    *out = t;
    return ALBEDO_OK;
}

albedo_status albedo_ticket_wait(albedo_ticket *t, const albedo_result **res) {
    if (res) *res = NULL;
    if (!t) return ALBEDO_ERR_INVALID_ARGUMENT;
    albedo_engine *E = t->eng;
    pthread_mutex_lock(&E->mu);
    while (t->state != TK_DONE) pthread_cond_wait(&t->cv, &E->mu);
    pthread_mutex_unlock(&E->mu);
    if (t->status) {
        error_set_last(t->err.msg);
        return t->status;
    }
    if (res) *res = &t->sess->res.r;
    return ALBEDO_OK;
}

int albedo_ticket_poll(const albedo_ticket *t) {
    if (!t) return 1;
    albedo_engine *E = t->eng;
    pthread_mutex_lock(&E->mu);
    int done = t->state == TK_DONE;
    pthread_mutex_unlock(&E->mu);
    return done;
}

void albedo_ticket_cancel(albedo_ticket *t) {
    if (!t) return;
    albedo_engine *E = t->eng;
    pthread_mutex_lock(&E->mu);
    if (t->state != TK_DONE) {
        t->cancel = 1;
        E->events++;
        pthread_cond_signal(&E->cv);
    }
    pthread_mutex_unlock(&E->mu);
}

const char *albedo_ticket_error(const albedo_ticket *t) { return t && t->status ? t->err.msg : ""; }

const char *albedo_ticket_json(albedo_ticket *t, int metrics) {
    if (!t) return NULL;
    pthread_mutex_lock(&t->eng->mu);
    const int ok = t->state >= TK_ENDING && !t->status && t->sess;
    pthread_mutex_unlock(&t->eng->mu);
    const char *out = NULL;
    if (!ok || result_to_json(t->sess, &t->sess->res.r, metrics, &out)) return NULL;
    return out;
}

void albedo_ticket_free(albedo_ticket *t) {
    if (!t) return;
    albedo_ticket_cancel(t);
    albedo_ticket_wait(t, NULL);
    albedo_engine *E = t->eng;
    tk_destroy(t);
    engine_unref(E);
}

void albedo_engine_get_stats(albedo_engine *E, albedo_engine_stats *out) {
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!E) return;
    pthread_mutex_lock(&E->mu);
    *out = E->stats;
    out->queued = E->n_queued;
    out->running = E->n_run;
    for (int i = 0; i < E->n_run; i++) out->encoding += E->run[i]->state == TK_ENCODE;
    out->prefix_hits = E->pc.hits;
    out->prefix_misses = E->pc.misses;
    out->prefix_evictions = E->pc.evictions;
    pthread_mutex_unlock(&E->mu);
}

/* ---- blocking session runs (albedo.c) -------------------------------------------- */

/* Copy the image's prefix K/V into the ticket's blocks (caller's thread). */
static void import_prefix(albedo_engine *E, const albedo_ticket *t) {
    const kv_pool *p = &E->pool;
    const albedo_image *img = t->img;
    const size_t row = (size_t)p->kvd * p->elem;
    for (int l = 0; l < p->n_layers; l++)
        for (int pos = 0; pos < img->n_pos; pos += p->block) {
            const int n = img->n_pos - pos < p->block ? img->n_pos - pos : p->block;
            memcpy(kv_row(p, p->k, l, &t->seq, pos), (const char *)img->k[l] + (size_t)pos * row, (size_t)n * row);
            memcpy(kv_row(p, p->v, l, &t->seq, pos), (const char *)img->v[l] + (size_t)pos * row, (size_t)n * row);
        }
}

albedo_status engine_run_session(albedo_engine *E, albedo_session *s, const albedo_request *r, errbuf *e) {
    /* A GPU model's sessions run in place (albedo.c); its pool is device memory. */
    if (E->pool.dev && r->image)
        return errf(e, ALBEDO_ERR_UNSUPPORTED, "an albedo_image cannot be imported into a device KV pool");
    albedo_ticket *t = calloc(1, sizeof *t);
    if (!t) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    pthread_cond_init(&t->cv, NULL);
    t->eng = E;
    t->req = *r;
    t->caller = 1;
    t->sess = s;
    t->img = r->image;
    t->has_image = r->image != NULL;
    if (t->img) {
        t->key[0] = t->img->id;
        t->key[1] = IMAGE_KEY_TAG;
    }
    t->est_pos = estimate_positions(E, t);
    t->decode_budget = estimate_decode_steps(&t->req);
    t->t_submit = now_ms();
    pthread_mutex_lock(&E->mu);
    enqueue(E, t);
    while (t->state == TK_QUEUED) pthread_cond_wait(&t->cv, &E->mu);
    if (t->state == TK_ENCODE) {
        pthread_mutex_unlock(&E->mu);
        import_prefix(E, t);
        pthread_mutex_lock(&E->mu);
        t->built = 1;
        t->build_st = ALBEDO_OK;
        E->events++;
        pthread_cond_signal(&E->cv);
        while (t->state == TK_ENCODE) pthread_cond_wait(&t->cv, &E->mu);
    }
    if (t->state == TK_RUNNING) {
        pthread_mutex_unlock(&E->mu);
        tk_run(t);
        pthread_mutex_lock(&E->mu);
    }
    while (t->state != TK_DONE) pthread_cond_wait(&t->cv, &E->mu);
    pthread_mutex_unlock(&E->mu);
    albedo_status st = t->status;
    if (st) errf(e, st, "%s", t->err.msg);
    tk_destroy(t);
    return st;
}

void engine_forget_image(albedo_engine *E, uint64_t id) {
    pthread_mutex_lock(&E->mu);
    if (E->n_forget == E->cap_forget) {
        int nc = E->cap_forget ? 2 * E->cap_forget : 16;
        uint64_t *p = realloc(E->forget, (size_t)nc * 2 * sizeof *p);
        if (p) {
            E->forget = p;
            E->cap_forget = nc;
        }
    }
    /* Out of memory: the entry just stays until evicted. */
    if (E->n_forget < E->cap_forget) {
        E->forget[2 * E->n_forget] = id;
        E->forget[2 * E->n_forget + 1] = IMAGE_KEY_TAG;
        E->n_forget++;
        E->events++;
        pthread_cond_signal(&E->cv);
    }
    pthread_mutex_unlock(&E->mu);
}

/* ---- internal accessors for tests -------------------------------------------------- */

/* Free and total KV blocks once every prefix entry is dropped (test hook:
 * all blocks free means no request leaked any). Waits for an idle engine. */
void engine_debug_blocks(albedo_engine *E, int drop_prefixes, int *n_free, int *n_total) {
    pthread_mutex_lock(&E->mu);
    while (E->q_head || E->n_run || E->in_admit || E->n_forget || E->stepping) {
        pthread_mutex_unlock(&E->mu);
        nanosleep(&(struct timespec){0, 1000000}, NULL);
        pthread_mutex_lock(&E->mu);
    }
    /* The scheduler sleeps while idle: the pool is ours to read. */
    if (drop_prefixes) kv_prefix_evict(&E->pool, &E->pc, E->pool.n_blocks + 1);
    *n_free = E->pool.n_free;
    *n_total = E->pool.n_blocks;
    pthread_mutex_unlock(&E->mu);
}

void engine_debug_prefix_stats(albedo_engine *E, uint64_t *hits, uint64_t *misses, uint64_t *evictions) {
    pthread_mutex_lock(&E->mu);
    *hits = E->pc.hits;
    *misses = E->pc.misses;
    *evictions = E->pc.evictions;
    pthread_mutex_unlock(&E->mu);
}
