/*
 * session.h — the objects behind albedo_session and albedo_image, shared by
 * the API glue (albedo.c), the generation loops (generate.c) and the JSON
 * writer (json_out.c).
 */
#ifndef ALBEDO_SESSION_H
#define ALBEDO_SESSION_H

#include "model.h"
#include "sampler.h"

struct albedo_image {
    const albedo_model *m;
    uint64_t id; /* unique per model: lets a session skip reloading its own KV */
    int w, h;
    int n_pos;     /* prefix positions: BOS + image tokens */
    void **k, **v; /* per layer [n_pos, Hkv*D] of m->kv_dt */
    void *dev_kv;  /* backend_cuda.c: the prefix KV on the GPU (k, v are NULL then) */
};

/* Growable arrays holding the last result; reused across calls. */
typedef struct buf {
    char *p;
    size_t len, cap;
} buf;

int buf_put(buf *b, const char *s, size_t n); /* 0, or -1 on OOM */
int buf_printf(buf *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

typedef struct result_store {
    albedo_result r;
    buf text, reasoning, json;
    albedo_grounding *gr;
    int n_gr, cap_gr;
    albedo_point *gpts; /* all grounding points, referenced by gr */
    int n_gpts, cap_gpts;
    albedo_box *boxes;
    int n_boxes, cap_boxes;
    albedo_point *points;
    int n_points, cap_points;
    int32_t *tokens;
    int n_tokens, cap_tokens;
} result_store;

struct albedo_session {
    albedo_model *m;
    md_state st;
    sampler sp;
    errbuf err;
    uint64_t kv_image; /* id of the image whose prefix the KV cache holds, 0 if none */
    result_store res;
    float *emb; /* [emb_cap, dim] prompt embeddings */
    int emb_cap;
    /* Test hook: every full-vocabulary logits row, before any masking. */
    void (*on_logits)(void *user, const float *logits, int n);
    void *on_logits_user;
};

/* generate.c */
albedo_status gen_run(albedo_session *s, const albedo_request *r, errbuf *e);

/* Where a request's forward passes run. The blocking session runs them
 * itself (text_forward on its own cache); the engine (scheduler.c) hands
 * them to its scheduler thread, which batches them with other requests'
 * over the paged cache. forward runs emb [T, dim] at positions pos0.. and
 * leaves the last row's hidden state in s->st.hidden and, if want_logits,
 * its logits in s->st.logits, like text_forward. image_pos > 0: the image
 * prefix (that many positions) is already in the request's cache, so the
 * request needs no albedo_image. */
typedef struct gen_io {
    albedo_status (*forward)(void *user, const float *emb, int T, int pos0, int n_prefix, int want_logits, errbuf *e);
    void *user;
    int image_pos;
} gen_io;

/* The generation loops over io (NULL: the session itself). */
albedo_status gen_run_io(albedo_session *s, const albedo_request *r, const gen_io *io, errbuf *e);
/* Validate a request up front (the engine checks at submit time). */
albedo_status gen_check(const albedo_session *s, const albedo_request *r, int has_image, errbuf *e);
/* scheduler.c: a blocking run of r on session s as a ticket of engine e
 * (the model's own): the calling thread runs the generation loops in s, the
 * forward passes are batched with the engine's other requests, and an
 * encoded image's prefix is copied into the engine's cache at its first use.
 * The result is in s->res as after gen_run. */
albedo_status engine_run_session(albedo_engine *e, albedo_session *s, const albedo_request *r, errbuf *err);
/* Drop the cached prefix of the albedo_image with this id (it was freed). */
void engine_forget_image(albedo_engine *e, uint64_t id);
/* scheduler.c, for tests: once the engine is idle, its free and total KV
 * blocks (after dropping every cached prefix if drop_prefixes), and the
 * prefix cache's counters. */
void engine_debug_blocks(albedo_engine *e, int drop_prefixes, int *n_free, int *n_total);
void engine_debug_prefix_stats(albedo_engine *e, uint64_t *hits, uint64_t *misses, uint64_t *evictions);
/* albedo.c: the image-encoding core shared by the three entry points. */
albedo_status image_encode(albedo_session *s, const img_rgb *im, albedo_image **out, errbuf *e);
/* json_out.c */
albedo_status result_to_json(albedo_session *s, const albedo_result *res, int metrics, const char **out);

#endif
