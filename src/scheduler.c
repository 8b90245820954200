/*
 * scheduler.c — the asynchronous engine (albedo.h, "Asynchronous engine"):
 * a FIFO queue, admission bounded by batch slots and KV blocks, and one
 * scheduler thread that batches the forward passes of the running requests
 * over the paged KV cache (kvcache.c) with text_forward_batch.
 *
 *   submit ──► queue (FIFO) ──admit──► running ≤ max_batch ──► done
 *                  │                     │  each step: decode rows, then
 *                  │                     │  prompt chunks, then image
 *                  │                     │  prefixes (730 rows, one piece),
 *                  │                     │  up to token_budget rows
 *                  └─ cancel/deadline    └─ cancel/deadline frees blocks
 *
 * How a request runs. The generation loops of generate.c are written as
 * straight-line code (prompt, answer loop, reasoning loop, region steps);
 * rather than keep a second, hand-synced copy of them as a state machine,
 * each running request executes gen_run_io on a thread of its own whose
 * forward passes are handed to the scheduler (gen_io.forward): the request
 * thread posts its input rows and sleeps until the scheduler has run them in
 * a batch with the other requests' rows and written the hidden state and
 * logits into the request's session. So the request threads only sample,
 * stream and decode regions (with a one-thread ops context each), one step
 * at a time in lock step with the scheduler, and all heavy math runs on the
 * scheduler thread's ops threads. The blocking albedo_session_run runs the
 * very same loops with the forward passes done in place.
 *
 * Images: the scheduler hashes nothing itself (submit computes the 128-bit
 * key of the image bytes); at admission it either forks the cached prefix
 * (shared blocks, copy on write of the partial last block) or decodes the
 * image and runs the vision encoder — on the scheduler thread for now, so a
 * new image stalls the running requests for one encoder pass (TODO(engine):
 * move vision to a worker thread) — and prefills the prefix as a segment of
 * the next step, after which it enters the prefix cache.
 *
 * Locking: one mutex guards the queue, the states and the rendezvous fields
 * of every ticket; the pool, the prefix cache and md_state are touched by
 * the scheduler thread only.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "kvcache.h"
#include "session.h"

typedef enum { TK_QUEUED, TK_PREFIX, TK_RUNNING, TK_ENDING, TK_DONE } tk_state;

struct albedo_ticket {
    albedo_engine *eng;
    albedo_ticket *next; /* queue link */
    albedo_request req;  /* owned copy; image NULL, on_text from the submit params */
    char *question, *object;
    albedo_spatial_ref *refs;
    uint8_t *image;
    size_t image_len;
    uint64_t key[2];
    albedo_submit_params cb;
    int est_pos; /* positions reserved: prefix + prompt + outputs */
    /* under eng->mu */
    tk_state state;
    int cancel;
    int posted, served, finished;
    const float *emb;
    int T, pos0, n_prefix, want_logits;
    albedo_status step_st;
    char step_err[sizeof(((errbuf *)0)->msg)];
    pthread_cond_t cv; /* served, done */
    /* scheduler-owned */
    albedo_session *sess;
    kv_seq seq;
    int cached;         /* prefix from the cache */
    float *prefix_emb;  /* [prefix_attn, dim] while TK_PREFIX */
    pthread_t th;
    int th_started;
    albedo_status status;
    errbuf err;
    double t_submit, t_admit, t_gen_start;
    int seq_no;
};

struct albedo_engine {
    albedo_model *m;
    albedo_engine_params p;
    md_state st;
    kv_pool pool;
    kv_prefix_cache pc;
    float *prefix_hidden; /* [dim]: discarded output of prefix segments */
    float *emb;           /* [emb_cap, dim] the step's input rows */
    int emb_cap;
    float *logits;        /* [max_batch, vocab] */
    txt_seg *segs;        /* [max_batch] */
    albedo_ticket **step; /* [max_batch] tickets of the step */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* wakes the scheduler */
    pthread_t th;
    int th_started, stop;
    albedo_ticket *q_head, *q_tail;
    int n_queued;
    albedo_ticket **run; /* [max_batch] */
    int n_run;
    int next_seq;
    /* Counts every event that can give the scheduler work (submit, post,
     * finish, cancel, stop): it sleeps only while the count is unchanged
     * since it last looked, so no wake-up is lost while it works unlocked. */
    unsigned long events;
    int in_admit; /* setting a request up with mu released */
    errbuf err;
};

albedo_engine_params albedo_engine_params_default(void) {
    albedo_engine_params p = {.max_batch = 16, .kv_bytes = 0, .block_size = 16, .max_queue = 1024,
                              .token_budget = 512, .n_threads = 0};
    return p;
}

/* ---- the request side ------------------------------------------------------ */

static int expired(const albedo_ticket *t, double now) {
    return t->cb.deadline_ms > 0 && now - t->t_submit > t->cb.deadline_ms;
}

/* gen_io.forward: post the rows, sleep until the scheduler served them. */
static albedo_status tk_forward(void *user, const float *emb, int T, int pos0, int n_prefix, int want_logits,
                                errbuf *e) {
    albedo_ticket *t = user;
    albedo_engine *E = t->eng;
    pthread_mutex_lock(&E->mu);
    albedo_status st = ALBEDO_OK;
    if (t->cancel) {
        st = errf(e, ALBEDO_ERR_CANCELLED, "the request was cancelled");
    } else if (expired(t, now_ms())) {
        st = errf(e, ALBEDO_ERR_CANCELLED, "the request's deadline of %.0f ms passed", t->cb.deadline_ms);
    } else {
        t->emb = emb;
        t->T = T;
        t->pos0 = pos0;
        t->n_prefix = n_prefix;
        t->want_logits = want_logits;
        t->served = 0;
        t->posted = 1;
        E->events++;
        pthread_cond_signal(&E->cv);
        while (!t->served) pthread_cond_wait(&t->cv, &E->mu);
        st = t->step_st;
        if (st) errf(e, st, "%s", t->step_err);
    }
    pthread_mutex_unlock(&E->mu);
    return st;
}

static void *tk_main(void *arg) {
    albedo_ticket *t = arg;
    albedo_engine *E = t->eng;
    t->t_gen_start = now_ms();
    gen_io io = {.forward = tk_forward, .user = t, .image_pos = t->image ? E->m->cfg.prefix_attn : 0};
    albedo_status st = gen_run_io(t->sess, &t->req, &io, &t->err);
    pthread_mutex_lock(&E->mu);
    t->status = st;
    t->finished = 1;
    E->events++;
    pthread_cond_signal(&E->cv);
    pthread_mutex_unlock(&E->mu);
    return NULL;
}

/* ---- the scheduler side ---------------------------------------------------- */

/* Positions a request may need: its prefix, prompt and outputs. */
static int estimate_positions(const albedo_engine *E, const albedo_ticket *t) {
    const md_config *c = &E->m->cfg;
    int n = t->image ? c->prefix_attn : 1;
    n += 3 * MD_MAX_TEMPLATE + 3 * t->req.n_spatial_refs + 2;
    const char *txt = t->req.skill == ALBEDO_SKILL_QUERY ? t->question : t->object;
    if (txt) {
        int k = albedo_tokenize(E->m, txt, NULL, 0);
        n += k > 0 ? k + 1 : (int)strlen(txt) + 1;
    }
    switch (t->req.skill) {
    case ALBEDO_SKILL_DETECT: n += 3 * t->req.max_objects + 2; break;
    case ALBEDO_SKILL_POINT: n += 2 * t->req.max_objects + 2; break;
    default: n += (t->req.reasoning ? 2 : 1) * t->req.max_tokens + MD_MAX_TEMPLATE + 2; break;
    }
    return n < E->st.max_ctx ? n : E->st.max_ctx;
}

static void tk_release(albedo_engine *E, albedo_ticket *t) {
    kv_seq_release(&E->pool, &t->seq);
    free(t->prefix_emb);
    t->prefix_emb = NULL;
}

/* End t (any state but DONE) with status st. Called with mu held; drops it
 * around on_done. */
static void tk_end(albedo_engine *E, albedo_ticket *t, albedo_status st) {
    t->status = st;
    tk_release(E, t);
    const albedo_result *res = NULL;
    if (!st && t->sess) {
        albedo_metrics *mt = &t->sess->res.r.metrics;
        /* Prefill covers the vision encoder and the prefix from admission on. */
        const double lead = t->t_gen_start - t->t_admit;
        mt->queue_time_ms = t->t_admit - t->t_submit;
        mt->prefill_time_ms += lead;
        mt->ttft_ms += lead;
        mt->cached_tokens = t->cached ? E->m->cfg.prefix_attn : 0;
        res = &t->sess->res.r;
    }
    t->state = TK_ENDING;
    if (t->cb.on_done) {
        pthread_mutex_unlock(&E->mu);
        t->cb.on_done(t->cb.user, t, st, res);
        pthread_mutex_lock(&E->mu);
    }
    t->state = TK_DONE;
    pthread_cond_broadcast(&t->cv);
}

static void run_remove(albedo_engine *E, int i) {
    E->run[i] = E->run[--E->n_run];
}

static albedo_session *light_session(albedo_model *m, errbuf *e) {
    albedo_session *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->m = m;
    if (md_state_init_ex(&s->st, m, 1, 0, e) || sampler_init(&s->sp, m->cfg.vocab)) {
        albedo_session_free(s);
        return NULL;
    }
    return s;
}

static kv_prefix *prefix_lookup(kv_prefix_cache *c, const uint64_t key[2]) {
    for (int i = 0; i < c->n; i++)
        if (c->e[i].key[0] == key[0] && c->e[i].key[1] == key[1]) return &c->e[i];
    return NULL;
}

static int prefix_building(const albedo_engine *E, const uint64_t key[2]) {
    for (int i = 0; i < E->n_run; i++) {
        const albedo_ticket *r = E->run[i];
        if (r->state == TK_PREFIX && r->key[0] == key[0] && r->key[1] == key[1]) return 1;
    }
    return 0;
}

/* Decode the image and run the vision encoder into t->prefix_emb. */
static albedo_status encode_image(albedo_engine *E, albedo_ticket *t) {
    const md_config *c = &E->m->cfg;
    img_rgb im = {0};
    img_crops crops = {0};
    albedo_status st = img_decode(t->image, t->image_len, &E->m->limits, &im, &t->err);
    if (!st) st = img_make_crops(&im, c->crop_size, c->patch, c->overlap_margin, c->max_crops, &crops, &t->err);
    if (!st && !(t->prefix_emb = malloc((size_t)c->prefix_attn * c->dim * sizeof(float))))
        st = errf(&t->err, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory encoding an image");
    if (!st) {
        text_embed(E->m, c->bos, t->prefix_emb);
        st = vision_encode(&E->st, &crops, t->prefix_emb + c->dim, NULL, &t->err);
    }
    img_crops_free(&crops);
    img_free(&im);
    return st;
}

static albedo_status start_thread(albedo_ticket *t) {
    if (pthread_create(&t->th, NULL, tk_main, t))
        return errf(&t->err, ALBEDO_ERR_OUT_OF_MEMORY, "cannot start the request's thread");
    t->th_started = 1;
    return ALBEDO_OK;
}

/* Admit queue heads while a slot and their blocks are free. FIFO: a head
 * that cannot start yet blocks the ones behind it. Called with mu held. */
static void admit(albedo_engine *E) {
    const md_config *c = &E->m->cfg;
    while (E->q_head && E->n_run < E->p.max_batch) {
        albedo_ticket *t = E->q_head;
        double now = now_ms();
        albedo_status st = ALBEDO_OK;
        if (t->cancel) st = errf(&t->err, ALBEDO_ERR_CANCELLED, "the request was cancelled");
        else if (expired(t, now))
            st = errf(&t->err, ALBEDO_ERR_CANCELLED, "the request's deadline of %.0f ms passed while queued",
                      t->cb.deadline_ms);
        if (!st && t->image && prefix_building(E, t->key)) return; /* wait for that prefix */
        int need = 0;
        kv_prefix *hit = NULL;
        if (!st) {
            hit = t->image ? prefix_lookup(&E->pc, t->key) : NULL;
            need = kv_blocks_for(&E->pool, t->est_pos) - (hit ? c->prefix_attn / E->pool.block : 0);
            if (kv_blocks_for(&E->pool, t->est_pos) > E->pool.n_blocks)
                st = errf(&t->err, ALBEDO_ERR_LIMIT, "the request needs %d KV blocks, the cache has %d",
                          kv_blocks_for(&E->pool, t->est_pos), E->pool.n_blocks);
        }
        if (!st && E->pool.n_free < need) {
            if (hit) hit->pinned = 1;
            kv_prefix_evict(&E->pool, &E->pc, need);
            hit = t->image ? prefix_lookup(&E->pc, t->key) : NULL;
            if (hit) hit->pinned = 0;
            if (E->pool.n_free < need) {
                if (E->n_run > 0) return; /* wait for running requests to free blocks */
                /* Nothing runs and the pinned hit holds the rest: drop it too. */
                if (hit) {
                    kv_prefix_evict(&E->pool, &E->pc, need + 1);
                    hit = NULL;
                    continue;
                }
                st = errf(&t->err, ALBEDO_ERR_LIMIT, "not enough KV blocks for the request");
            }
        }
        /* Dequeue. */
        E->q_head = t->next;
        if (!E->q_head) E->q_tail = NULL;
        E->n_queued--;
        t->t_admit = now;
        if (st) {
            tk_end(E, t, st);
            continue;
        }
        /* The setup below runs with mu released: only this thread touches
         * the pool, the prefix cache and md_state. */
        E->in_admit = 1;
        pthread_mutex_unlock(&E->mu);
        if (!(t->sess = light_session(E->m, &t->err)))
            st = errf(&t->err, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for a request");
        if (!st && hit) {
            E->pc.hits++;
            hit->last_use = ++E->pc.clock;
            if (kv_seq_fork(&E->pool, &t->seq, &hit->seq, hit->n_pos))
                st = errf(&t->err, ALBEDO_ERR_LIMIT, "no KV block free for the request");
            t->cached = 1;
        } else if (!st && t->image) {
            E->pc.misses++;
            st = encode_image(E, t);
        }
        if (!st && kv_seq_reserve(&E->pool, &t->seq, t->est_pos))
            st = errf(&t->err, ALBEDO_ERR_LIMIT, "no KV blocks free for the request");
        if (!st) {
            t->state = t->image && !hit ? TK_PREFIX : TK_RUNNING;
            if (t->state == TK_RUNNING) st = start_thread(t);
        }
        pthread_mutex_lock(&E->mu);
        E->in_admit = 0;
        if (st) {
            tk_end(E, t, st);
            continue;
        }
        E->run[E->n_run++] = t;
    }
}

/* Join and end the requests whose thread returned. Called with mu held. */
static void reap(albedo_engine *E) {
    for (int i = 0; i < E->n_run;) {
        albedo_ticket *t = E->run[i];
        if (!t->finished && !(t->state == TK_PREFIX && t->cancel)) {
            i++;
            continue;
        }
        run_remove(E, i);
        if (t->th_started) {
            pthread_mutex_unlock(&E->mu);
            pthread_join(t->th, NULL);
            pthread_mutex_lock(&E->mu);
            t->th_started = 0;
            tk_end(E, t, t->status);
        } else {
            tk_end(E, t, errf(&t->err, ALBEDO_ERR_CANCELLED, "the request was cancelled"));
        }
    }
}

/* Every running request has posted its rows or finished. */
static int all_ready(const albedo_engine *E) {
    for (int i = 0; i < E->n_run; i++) {
        const albedo_ticket *t = E->run[i];
        if (t->state == TK_RUNNING && !t->posted && !t->finished) return 0;
    }
    return 1;
}

static int reserve_rows(albedo_engine *E, int T) {
    if (T <= E->emb_cap) return 0;
    float *p = realloc(E->emb, (size_t)T * E->m->cfg.dim * sizeof(float));
    if (!p) return -1;
    E->emb = p;
    E->emb_cap = T;
    return 0;
}

/* One forward step over the posted rows. Called with mu held; runs the
 * math with it released. Returns 0 if there was nothing to run. */
static int run_step(albedo_engine *E) {
    const md_config *c = &E->m->cfg;
    int n = 0, rows = 0;
    /* Pass 0: decode rows; pass 1: prompt chunks; pass 2: image prefixes. */
    for (int pass = 0; pass < 3; pass++)
        for (int i = 0; i < E->n_run; i++) {
            albedo_ticket *t = E->run[i];
            int T;
            if (pass < 2) {
                if (t->state != TK_RUNNING || !t->posted || (t->T == 1) != (pass == 0)) continue;
                T = t->T;
            } else {
                if (t->state != TK_PREFIX || t->cancel) continue;
                T = c->prefix_attn;
            }
            if (n > 0 && rows + T > E->p.token_budget) continue;
            E->step[n++] = t;
            rows += T;
        }
    if (!n) return 0;
    for (int i = 0; i < n; i++) E->step[i]->posted = 0;
    pthread_mutex_unlock(&E->mu);
    albedo_status st = ALBEDO_OK;
    if (reserve_rows(E, rows)) st = errf(&E->err, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for a step of %d rows", rows);
    for (int i = 0, r0 = 0; i < n && !st; i++) {
        albedo_ticket *t = E->step[i];
        txt_seg *g = &E->segs[i];
        const int prefix = t->state == TK_PREFIX;
        *g = (txt_seg){.k = E->pool.k, .v = E->pool.v, .block_size = E->pool.block,
                       .pos0 = prefix ? 0 : t->pos0, .T = prefix ? c->prefix_attn : t->T,
                       .n_prefix = prefix ? c->prefix_attn : t->n_prefix,
                       .hidden = prefix ? E->prefix_hidden : t->sess->st.hidden,
                       .logits = !prefix && t->want_logits ? t->sess->st.logits : NULL};
        /* The estimate covers every request the loops can make; grow the
         * table all the same if one goes past it. */
        if (kv_seq_reserve(&E->pool, &t->seq, g->pos0 + g->T)) {
            st = errf(&E->err, ALBEDO_ERR_LIMIT, "a request outgrew its KV reservation");
            break;
        }
        g->blocks = t->seq.blocks;
        memcpy(E->emb + (size_t)r0 * c->dim, prefix ? t->prefix_emb : t->emb, (size_t)g->T * c->dim * sizeof(float));
        r0 += g->T;
    }
    if (!st) st = text_forward_batch(&E->st, E->emb, E->segs, n, E->logits, &E->err);
    /* Finished prefixes enter the prefix cache. */
    for (int i = 0; i < n && !st; i++) {
        albedo_ticket *t = E->step[i];
        if (t->state != TK_PREFIX) continue;
        free(t->prefix_emb);
        t->prefix_emb = NULL;
        kv_prefix_put(&E->pool, &E->pc, t->key, &t->seq, c->prefix_attn); /* on OOM: just not cached */
    }
    pthread_mutex_lock(&E->mu);
    for (int i = 0; i < n; i++) {
        albedo_ticket *t = E->step[i];
        if (t->state == TK_PREFIX) {
            albedo_status s2 = st;
            if (!s2 && t->cancel) s2 = errf(&t->err, ALBEDO_ERR_CANCELLED, "the request was cancelled");
            if (!s2) {
                t->state = TK_RUNNING;
                s2 = start_thread(t);
            }
            if (s2) {
                if (st) errf(&t->err, st, "%s", E->err.msg);
                for (int k = 0; k < E->n_run; k++)
                    if (E->run[k] == t) run_remove(E, k);
                tk_end(E, t, s2);
            }
            continue;
        }
        t->step_st = st;
        if (st) snprintf(t->step_err, sizeof t->step_err, "%s", E->err.msg);
        t->served = 1;
        pthread_cond_broadcast(&t->cv); /* the request thread; ticket_wait ignores it */
    }
    return 1;
}

static void *sched_main(void *arg) {
    albedo_engine *E = arg;
    pthread_mutex_lock(&E->mu);
    for (;;) {
        const unsigned long seen = E->events;
        reap(E);
        if (E->stop) {
            /* Cancel everything; running requests end at their next step. */
            for (albedo_ticket *t = E->q_head; t; t = t->next) t->cancel = 1;
            for (int i = 0; i < E->n_run; i++) E->run[i]->cancel = 1;
        }
        admit(E);
        if (E->stop && !E->q_head && !E->n_run) break;
        if (all_ready(E) && run_step(E)) continue;
        while (E->events == seen) pthread_cond_wait(&E->cv, &E->mu);
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
        p.token_budget < 1 || p.n_threads < 0)
        st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "engine parameters out of range");
    albedo_engine *E = st ? NULL : calloc(1, sizeof *E);
    if (!st && !E) st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    if (st) {
        error_set_last(e.msg);
        return st;
    }
    E->m = m;
    if (!p.kv_bytes) p.kv_bytes = default_kv_bytes();
    E->p = p;
    const md_config *c = &m->cfg;
    pthread_mutex_init(&E->mu, NULL);
    pthread_cond_init(&E->cv, NULL);
    kv_prefix_init(&E->pc);
    st = md_state_init_ex(&E->st, m, p.n_threads ? p.n_threads : m->params.n_threads, 0, &e);
    if (!st)
        st = kv_pool_init(&E->pool, c->n_layers, c->n_kv_heads * c->head_dim, p.block_size, p.kv_bytes,
                          (c->prefix_attn + 64 + p.block_size - 1) / p.block_size + 1, &e);
    if (!st) {
        E->prefix_hidden = malloc((size_t)c->dim * sizeof(float));
        E->logits = malloc((size_t)p.max_batch * c->vocab * sizeof(float));
        E->segs = calloc((size_t)p.max_batch, sizeof *E->segs);
        E->step = calloc((size_t)p.max_batch, sizeof *E->step);
        E->run = calloc((size_t)p.max_batch, sizeof *E->run);
        if (!E->prefix_hidden || !E->logits || !E->segs || !E->step || !E->run)
            st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for the engine");
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
    kv_prefix_free(&E->pool, &E->pc);
    kv_pool_free(&E->pool);
    md_state_free(&E->st);
    free(E->prefix_hidden);
    free(E->emb);
    free(E->logits);
    free(E->segs);
    free(E->step);
    free(E->run);
    pthread_cond_destroy(&E->cv);
    pthread_mutex_destroy(&E->mu);
    free(E);
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
    free(t->prefix_emb);
    albedo_session_free(t->sess);
    pthread_cond_destroy(&t->cv);
    free(t);
}

albedo_status albedo_engine_submit(albedo_engine *E, const albedo_request *r, const void *image, size_t image_len,
                                   const albedo_submit_params *params, albedo_ticket **out) {
    errbuf e = {{0}};
    albedo_status st = ALBEDO_OK;
    if (!E || !r || !out) st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "engine, request or out is NULL");
    else if (r->image) st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "engine requests carry image bytes, not an albedo_image");
    else if (image && !image_len) st = errf(&e, ALBEDO_ERR_IMAGE, "image data is empty");
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
        kv_hash(image, image_len, 0, t->key);
    }
    if (oom) {
        tk_destroy(t);
        errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory copying the request");
        error_set_last(e.msg);
        return ALBEDO_ERR_OUT_OF_MEMORY;
    }
    t->est_pos = estimate_positions(E, t);
    t->t_submit = now_ms();
    pthread_mutex_lock(&E->mu);
    if (E->stop || E->n_queued >= E->p.max_queue) {
        pthread_mutex_unlock(&E->mu);
        tk_destroy(t);
        errf(&e, ALBEDO_ERR_LIMIT, "the engine's queue is full (%d requests)", E->p.max_queue);
        error_set_last(e.msg);
        return ALBEDO_ERR_LIMIT;
    }
    t->state = TK_QUEUED;
    t->seq_no = E->next_seq++;
    if (E->q_tail) E->q_tail->next = t;
    else E->q_head = t;
    E->q_tail = t;
    E->n_queued++;
    E->events++;
    pthread_cond_signal(&E->cv);
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

void albedo_ticket_free(albedo_ticket *t) {
    if (!t) return;
    albedo_ticket_cancel(t);
    albedo_ticket_wait(t, NULL);
    tk_destroy(t);
}

/* ---- internal accessors for tests -------------------------------------------------- */

/* Free and total KV blocks once every prefix entry is dropped (test hook:
 * all blocks free means no request leaked any). Waits for an idle engine. */
void engine_debug_blocks(albedo_engine *E, int drop_prefixes, int *n_free, int *n_total) {
    pthread_mutex_lock(&E->mu);
    while (E->q_head || E->n_run || E->in_admit) {
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
