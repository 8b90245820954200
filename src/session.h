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
    int n_pos;        /* prefix positions: BOS + image tokens */
    float **k, **v;   /* per layer [n_pos, Hkv*D] */
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
/* albedo.c: the image-encoding core shared by the three entry points. */
albedo_status image_encode(albedo_session *s, const img_rgb *im, albedo_image **out, errbuf *e);
/* json_out.c */
albedo_status result_to_json(albedo_session *s, const albedo_result *res, int metrics, const char **out);

#endif
