/*
 * albedo.c — the public API (include/albedo.h): model loading, sessions,
 * image encoding and request execution, glued from the stage files. Every
 * failure is turned into a status plus a message for albedo_last_error()
 * and, where there is a session, albedo_session_error().
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "session.h"

#define CONFIG_MAX_BYTES (1u << 20)

static _Atomic uint64_t next_image_id = 1; /* unique ids for KV-cache reuse */

static albedo_status fail(errbuf *e, albedo_status st) {
    error_set_last(e->msg);
    return st;
}

albedo_model_params albedo_model_params_default(void) {
    albedo_model_params p;
    memset(&p, 0, sizeof p);
    p.n_threads = 0;
    p.precision = ALBEDO_PRECISION_F32;
    p.backend = NULL;
    p.max_context = 0;
    p.max_image_side = 16384;
    p.max_image_pixels = 100000000;
    return p;
}

static albedo_status path_join(char *out, size_t cap, const char *dir, const char *file, errbuf *e) {
    int n = snprintf(out, cap, "%s/%s", dir, file);
    if (n < 0 || (size_t)n >= cap) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "model path too long");
    return ALBEDO_OK;
}

/* Open the checkpoint: model.safetensors, or the shards listed by
 * model.safetensors.index.json ({"weight_map": {tensor: file}}). Every shard
 * is memory-mapped; nothing is copied. Shard names must be plain file names
 * in the model directory, and every tensor the index names must be in its
 * shard. */
#define INDEX_MAX_BYTES (64u << 20)
#define MAX_SHARDS 4096

static albedo_status open_shards(albedo_model *m, const char *dir, errbuf *e) {
    char path[4096];
    albedo_status st = path_join(path, sizeof path, dir, "model.safetensors", e);
    if (st) return st;
    m->st = calloc(1, sizeof *m->st);
    if (!m->st) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    char ipath[4096];
    if (access(path, F_OK) == 0 || path_join(ipath, sizeof ipath, dir, "model.safetensors.index.json", e) ||
        access(ipath, F_OK) != 0) {
        st = st_open(path, &m->st[0], e);
        if (!st) m->n_st = 1;
        return st;
    }
    uint8_t *txt = NULL;
    size_t len = 0;
    if ((st = read_file(ipath, INDEX_MAX_BYTES, &txt, &len, e))) return st;
    json_error_t je;
    json_t *root = json_loadb((const char *)txt, len, 0, &je);
    free(txt);
    json_t *map = root ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(map)) {
        json_decref(root);
        return errf(e, ALBEDO_ERR_MODEL_FORMAT, "%s: expected {\"weight_map\": {tensor: file, ...}}", ipath);
    }
    /* The distinct shard names, in order of first appearance. */
    const char **names = calloc(json_object_size(map) + 1, sizeof *names);
    int n = 0;
    const char *key;
    json_t *v;
    if (!names) st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    json_object_foreach(map, key, v) {
        if (st) break;
        const char *f = json_string_value(v);
        if (!f || !*f || strchr(f, '/') || strchr(f, '\\') || !strcmp(f, ".") || !strcmp(f, "..")) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT,
                      "%s: tensor %s: shard name must be a file name in the model directory", ipath, key);
            break;
        }
        int seen = 0;
        for (int i = 0; i < n && !seen; i++) seen = !strcmp(names[i], f);
        if (!seen) names[n++] = f;
    }
    if (!st && (n == 0 || n > MAX_SHARDS)) st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "%s: %d shards", ipath, n);
    if (!st) {
        st_file **p = realloc(m->st, (size_t)n * sizeof *p);
        if (!p)
            st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
        else
            m->st = p;
    }
    for (int i = 0; i < n && !st; i++) {
        m->st[i] = NULL;
        if (!(st = path_join(path, sizeof path, dir, names[i], e)) && !(st = st_open(path, &m->st[i], e)))
            m->n_st = i + 1;
    }
    /* Every tensor of the index is where the index says. */
    json_object_foreach(map, key, v) {
        if (st) break;
        const char *f = json_string_value(v);
        for (int i = 0; i < n; i++)
            if (!strcmp(names[i], f) && !st_find(m->st[i], key)) {
                st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "%s: tensor %s is not in shard %s", ipath, key, f);
                break;
            }
    }
    free(names);
    json_decref(root);
    return st;
}

static albedo_status build_rope(albedo_model *m, errbuf *e) {
    const md_config *c = &m->cfg;
    const int half = c->rot_dims / 2, P = c->max_context;
    m->rope_cos = malloc((size_t)P * half * sizeof(float));
    m->rope_sin = malloc((size_t)P * half * sizeof(float));
    if (!m->rope_cos || !m->rope_sin) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for rotary tables");
    /* As the reference: inv_freq = 1 / θ^(2i/R) and angles p·inv_freq in float32. */
    for (int i = 0; i < half; i++) {
        float inv = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)c->rot_dims);
        for (int p = 0; p < P; p++) {
            float a = (float)p * inv;
            m->rope_cos[(size_t)p * half + i] = cosf(a);
            m->rope_sin[(size_t)p * half + i] = sinf(a);
        }
    }
    return ALBEDO_OK;
}

albedo_status albedo_model_load(const char *dir, const albedo_model_params *params, albedo_model **out) {
    errbuf e = {{0}};
    if (!out) return fail(&e, errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "out is NULL"));
    *out = NULL;
    if (!dir || !*dir) return fail(&e, errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "model directory is empty"));
    albedo_model *m = calloc(1, sizeof *m);
    if (!m) return fail(&e, errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory"));
    m->params = params ? *params : albedo_model_params_default();
    if (m->params.max_image_side <= 0) m->params.max_image_side = 16384;
    if (m->params.max_image_pixels <= 0) m->params.max_image_pixels = 100000000;
    m->limits = (img_limits){m->params.max_image_side, m->params.max_image_pixels};

    char path[4096];
    uint8_t *cfg_json = NULL;
    size_t cfg_len = 0;
    albedo_status st = path_join(path, sizeof path, dir, "config.json", &e);
    if (!st) st = read_file(path, CONFIG_MAX_BYTES, &cfg_json, &cfg_len, &e);
    md_config_defaults(&m->cfg);
    if (!st) {
        errbuf sub;
        st = md_config_parse(&m->cfg, (const char *)cfg_json, cfg_len, &sub);
        if (st) errf(&e, st, "%s: %s", path, sub.msg);
    }
    free(cfg_json);
    if (!st) st = open_shards(m, dir, &e);
    if (!st) {
        errbuf sub;
        const st_file *const *files = (const st_file *const *)m->st;
        st = md_config_from_tensors(&m->cfg, files, m->n_st, &sub);
        if (!st) st = md_weights_bind_files(&m->w, &m->cfg, files, m->n_st, &sub);
        dtype wdt;
        /* "fp8": Moondream 3's experts as e4m3 on the GPU (checked below);
         * nothing changes in the mapping */
        const char *wn = m->params.weights;
        if (!st && !(st = md_weights_format(wn && !strcmp(wn, "fp8") ? NULL : wn, &wdt, &sub)))
            st = md_weights_quantize(&m->w, &m->cfg, wdt, &sub);
        if (st)
            errf(&e, st, "%s/%s: %s", dir, m->n_st > 1 ? "model.safetensors.index.json" : "model.safetensors", sub.msg);
    }
    m->cfg.tau_pos_bf16 = m->params.precision == ALBEDO_PRECISION_BF16;
    m->kv_dt = m->params.precision == ALBEDO_PRECISION_BF16 ? DT_BF16 : DT_F32;
    if (!st) st = path_join(path, sizeof path, dir, "tokenizer.json", &e);
    if (!st) {
        errbuf sub;
        st = tok_load_file(path, &m->tok, &sub);
        if (st) errf(&e, st, "%s: %s", path, sub.msg);
    }
    if (!st) st = build_rope(m, &e);
    if (!st && m->params.max_context < 0) st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "max_context must be >= 0");
    if (!st && m->params.max_context > 0 && m->params.max_context <= m->cfg.prefix_attn + 2)
        st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "max_context %d leaves no room after the %d-position image prefix",
                  m->params.max_context, m->cfg.prefix_attn);
    if (!st) {
        /* The KV cache's dtype: the string is the caller's, so keep a literal. */
        const char *kd = m->params.kv_dtype;
        const int fp8 = kd && !strcmp(kd, "fp8");
        if (kd && *kd && !fp8 && strcmp(kd, "auto") && strcmp(kd, "bf16"))
            st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "kv_dtype '%s': expected auto, bf16 or fp8", kd);
        /* fp8 on the CPU backends: every cache element is one e4m3 byte
         * (ops.h op_attn.kv_dt), written by text.c from the float32 row in
         * both precisions; on cuda the device caches (backend_cuda.c). */
        else if (fp8 && !md_cuda_requested(m->params.backend))
            m->kv_dt = DT_E4M3;
        m->params.kv_dtype = fp8 ? "fp8" : NULL;
    }
    if (!st && m->params.weights && !strcmp(m->params.weights, "fp8")) {
        if (!md_cuda_requested(m->params.backend))
            st = errf(&e, ALBEDO_ERR_UNSUPPORTED,
                      "weights fp8 (Moondream 3's experts as e4m3) needs backend cuda on an sm_89 or newer GPU; the "
                      "CPU takes q8 or q4");
        else if (!m->cfg.md3)
            st = errf(&e, ALBEDO_ERR_UNSUPPORTED,
                      "weights fp8 stores Moondream 3's experts as e4m3; Moondream 2 has no experts (use bf16)");
        m->params.weights = "fp8"; /* the caller's string: keep a literal */
    }
    if (!st && md_cuda_requested(m->params.backend)) st = md_cuda_model_load(m, &e); /* backend_cuda.c */
    if (!st) {
        /* Probe the backend now so that a bad name fails at load, not later. */
        ops_ctx *probe = NULL;
        st = ops_ctx_new(m->cuda ? NULL : m->params.backend, 1, OPS_F32, &probe, &e);
        if (!st) {
            const md_config *c = &m->cfg;
            char moe[96] = "";
            if (c->moe_experts)
                snprintf(moe, sizeof moe, ", moe %d experts top-%d from layer %d", c->moe_experts, c->moe_topk,
                         c->moe_start);
            /* the recipe from layer 0's proj: the q4 recipe keeps its qkv in Q8 (quant.c) */
            snprintf(m->describe, sizeof m->describe,
                     "%s (text %dx%d%s%s, vision %dx%d, vocab %d), backend %s, %s, %d threads%s",
                     c->md3 ? "moondream3" : "moondream2", c->dim, c->n_layers, moe,
                     m->w.tb[0].proj.dt == DT_Q8   ? ", q8"
                     : m->w.tb[0].proj.dt == DT_Q4 ? ", q4"
                                                   : "",
                     c->enc_dim, c->enc_layers, c->vocab, m->cuda ? md_cuda_describe(m) : ops_backend_name(probe),
                     m->params.precision == ALBEDO_PRECISION_BF16 ? "bf16" : "f32",
                     m->params.n_threads > 0 ? m->params.n_threads : ops_default_threads(),
                     !m->cuda && m->kv_dt == DT_E4M3 ? ", fp8 KV cache" : "");
        }
        ops_ctx_free(probe);
    }
    if (st) {
        albedo_model_free(m);
        return fail(&e, st);
    }
    *out = m;
    return ALBEDO_OK;
}

void albedo_model_free(albedo_model *m) {
    if (!m) return;
    albedo_engine_free(atomic_load(&m->engine));
    md_cuda_model_free(m);
    md_weights_release(&m->w);
    for (int i = 0; i < m->n_st; i++) st_close(m->st[i]);
    free(m->st);
    tok_free(m->tok);
    free(m->rope_cos);
    free(m->rope_sin);
    free(m);
}

const char *albedo_model_describe(const albedo_model *m) { return m ? m->describe : ""; }

/* ---- sessions ---------------------------------------------------------------- */

albedo_status albedo_session_new(albedo_model *m, albedo_session **out) {
    errbuf e = {{0}};
    if (!m || !out) return fail(&e, errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "model or out is NULL"));
    *out = NULL;
    albedo_session *s = calloc(1, sizeof *s);
    if (!s) return fail(&e, errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory"));
    s->m = m;
    albedo_status st = md_state_init(&s->st, m, &e);
    if (!st && sampler_init(&s->sp, m->cfg.vocab)) st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    if (st) {
        albedo_session_free(s);
        return fail(&e, st);
    }
    /* A GPU session picks its greedy tokens on the device: only the id
     * comes down, not the logits row (generate.c, step_pick; docs/CUDA.md).
     * ALBEDO_CUDA_DEVICE_PICK=0 keeps every pick on the host. */
    const char *dp = getenv("ALBEDO_CUDA_DEVICE_PICK");
    s->st.dev_pick = m->cuda && !(dp && dp[0] == '0') ? MD_PICK_GREEDY : 0;
    *out = s;
    return ALBEDO_OK;
}

void albedo_session_free(albedo_session *s) {
    if (!s) return;
    md_state_free(&s->st);
    sampler_free(&s->sp);
    result_store *rs = &s->res;
    free(rs->text.p);
    free(rs->reasoning.p);
    free(rs->json.p);
    free(rs->gr);
    free(rs->gpts);
    free(rs->boxes);
    free(rs->points);
    free(rs->tokens);
    free(s->emb);
    free(s);
}

const char *albedo_session_error(const albedo_session *s) { return s ? s->err.msg : ""; }

static albedo_status session_fail(albedo_session *s, albedo_status st) {
    error_set_last(s->err.msg);
    return st;
}

/* ---- images ------------------------------------------------------------------- */

void albedo_image_free(albedo_image *img) {
    if (!img) return;
    albedo_engine *eng = img->m ? atomic_load(&img->m->engine) : NULL;
    if (eng && img->id) engine_forget_image(eng, img->id);
    md_cuda_prefix_free(img->dev_kv);
    if (img->m) {
        for (int l = 0; l < img->m->cfg.n_layers; l++) {
            if (img->k) free(img->k[l]);
            if (img->v) free(img->v[l]);
        }
    }
    free(img->k);
    free(img->v);
    free(img);
}

void albedo_image_size(const albedo_image *img, int *width, int *height) {
    if (width) *width = img ? img->w : 0;
    if (height) *height = img ? img->h : 0;
}

albedo_status image_encode(albedo_session *s, const img_rgb *im, albedo_image **out, errbuf *e) {
    const albedo_model *m = s->m;
    const md_config *c = &m->cfg;
    img_crops crops = {0};
    albedo_status st = img_make_crops(im, c->crop_size, c->patch, c->overlap_margin, c->max_crops, &crops, e);
    if (st) return st;
    const int np = c->prefix_attn - 1, n_pos = c->prefix_attn, dim = c->dim;
    float *emb = malloc((size_t)n_pos * dim * sizeof(float));
    albedo_image *img = calloc(1, sizeof *img);
    if (!emb || !img) {
        st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory encoding an image");
        goto done;
    }
    img->m = m;
    img->w = im->w;
    img->h = im->h;
    img->n_pos = n_pos;
    /* [BOS embedding, 729 image embeddings] through the text model with the
     * bidirectional prefix mask; only the K/V cache is kept. */
    if (s->st.cu) { /* backend_cuda.c: vision, prefix and the prefix KV stay on the GPU */
        st = md_cuda_image_prefix(&s->st, &crops, &img->dev_kv, e);
        if (st) goto done;
        goto keep;
    }
    text_embed(m, c->bos, emb);
    st = vision_encode(&s->st, &crops, emb + dim, NULL, e);
    if (!st) st = text_forward(&s->st, emb, n_pos, 0, c->prefix_attn, 0, e);
    if (st) goto done;
    const size_t kvd = (size_t)c->n_kv_heads * c->head_dim * kv_elem_bytes(m->kv_dt); /* bytes per row */
    img->k = calloc((size_t)c->n_layers, sizeof *img->k);
    img->v = calloc((size_t)c->n_layers, sizeof *img->v);
    if (!img->k || !img->v) {
        st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for the image's KV prefix");
        goto done;
    }
    for (int l = 0; l < c->n_layers; l++) {
        img->k[l] = malloc((size_t)n_pos * kvd);
        img->v[l] = malloc((size_t)n_pos * kvd);
        if (!img->k[l] || !img->v[l]) {
            st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for the image's KV prefix");
            goto done;
        }
        memcpy(img->k[l], s->st.k_cache[l], (size_t)n_pos * kvd);
        memcpy(img->v[l], s->st.v_cache[l], (size_t)n_pos * kvd);
    }
keep:
    img->id = atomic_fetch_add(&next_image_id, 1);
    s->kv_image = img->id;
    (void)np;
done:
    free(emb);
    img_crops_free(&crops);
    if (st) {
        albedo_image_free(img);
        s->kv_image = 0;
        return st;
    }
    *out = img;
    return ALBEDO_OK;
}

static albedo_status encode_checked(albedo_session *s, albedo_image **out) {
    if (!out) return errf(&s->err, ALBEDO_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = NULL;
    return ALBEDO_OK;
}

albedo_status albedo_image_encode_bytes(albedo_session *s, const void *data, size_t len, albedo_image **out) {
    if (!s) return ALBEDO_ERR_INVALID_ARGUMENT;
    albedo_status st = encode_checked(s, out);
    if (st) return session_fail(s, st);
    if (!data || !len) return session_fail(s, errf(&s->err, ALBEDO_ERR_IMAGE, "image data is empty"));
    img_rgb im = {0};
    st = img_decode(data, len, &s->m->limits, &im, &s->err);
    if (!st) st = image_encode(s, &im, out, &s->err);
    img_free(&im);
    return st ? session_fail(s, st) : ALBEDO_OK;
}

albedo_status albedo_image_encode_file(albedo_session *s, const char *path, albedo_image **out) {
    if (!s) return ALBEDO_ERR_INVALID_ARGUMENT;
    albedo_status st = encode_checked(s, out);
    if (st) return session_fail(s, st);
    if (!path) return session_fail(s, errf(&s->err, ALBEDO_ERR_INVALID_ARGUMENT, "image path is NULL"));
    img_rgb im = {0};
    st = img_load_file(path, &s->m->limits, &im, &s->err);
    if (!st) st = image_encode(s, &im, out, &s->err);
    img_free(&im);
    return st ? session_fail(s, st) : ALBEDO_OK;
}

albedo_status albedo_image_encode_rgb(albedo_session *s, const uint8_t *rgb, int width, int height,
                                      albedo_image **out) {
    if (!s) return ALBEDO_ERR_INVALID_ARGUMENT;
    albedo_status st = encode_checked(s, out);
    if (st) return session_fail(s, st);
    if (!rgb || width <= 0 || height <= 0)
        return session_fail(s, errf(&s->err, ALBEDO_ERR_INVALID_ARGUMENT, "image is empty (%dx%d)", width, height));
    if (width > s->m->limits.max_side || height > s->m->limits.max_side ||
        (int64_t)width * height > s->m->limits.max_pixels)
        return session_fail(s, errf(&s->err, ALBEDO_ERR_LIMIT, "image %dx%d exceeds the limits (side %d, %lld pixels)",
                                    width, height, s->m->limits.max_side, (long long)s->m->limits.max_pixels));
    img_rgb im = {width, height, (uint8_t *)rgb};
    st = image_encode(s, &im, out, &s->err);
    return st ? session_fail(s, st) : ALBEDO_OK;
}

/* ---- requests ------------------------------------------------------------------ */

albedo_request albedo_request_default(albedo_skill skill) {
    albedo_request r;
    memset(&r, 0, sizeof r);
    r.skill = skill;
    r.length = ALBEDO_LENGTH_NORMAL;
    r.temperature = 0.5f;
    r.top_p = 0.3f;
    r.max_tokens = 768;
    r.max_objects = 50;
    return r;
}

albedo_request albedo_model_request_default(const albedo_model *m, albedo_skill skill) {
    albedo_request r = albedo_request_default(skill);
    if (m) {
        r.temperature = m->cfg.default_temperature;
        r.top_p = m->cfg.default_top_p;
        r.max_tokens = m->cfg.default_max_tokens;
        r.max_objects = m->cfg.default_max_objects;
    }
    return r;
}

/* The model's engine for blocking runs, made at the first: the default
 * parameters with the model's threads and an unbounded queue (each waiting
 * caller holds one entry). Concurrent first calls may both make one; the
 * loser frees its own. */
static albedo_status model_engine(albedo_model *m, albedo_engine **out, errbuf *e) {
    albedo_engine *eng = atomic_load(&m->engine);
    if (!eng) {
        albedo_engine_params p = albedo_engine_params_default();
        p.max_queue = INT_MAX;
        albedo_status st = albedo_engine_new(m, &p, &eng);
        if (st) return errf(e, st, "%s", albedo_last_error());
        albedo_engine *none = NULL;
        if (!atomic_compare_exchange_strong(&m->engine, &none, eng)) {
            albedo_engine_free(eng);
            eng = none;
        }
    }
    *out = eng;
    return ALBEDO_OK;
}

albedo_status albedo_session_run(albedo_session *s, const albedo_request *r, const albedo_result **out) {
    if (!s) return ALBEDO_ERR_INVALID_ARGUMENT;
    s->err.msg[0] = 0;
    if (!r || !out) return session_fail(s, errf(&s->err, ALBEDO_ERR_INVALID_ARGUMENT, "request or out is NULL"));
    *out = NULL;
    albedo_status st;
    if (s->m->cuda) {
        /* A GPU model's session runs in place on the device (its KV cache
         * and image prefixes live there; the engine's pool is in host
         * memory). */
        st = gen_run(s, r, &s->err);
    } else {
        albedo_engine *eng = NULL;
        st = gen_check(s, r, r->image != NULL, &s->err);
        if (!st) st = model_engine(s->m, &eng, &s->err);
        if (!st) st = engine_run_session(eng, s, r, &s->err);
    }
    if (st) return session_fail(s, st);
    *out = &s->res.r;
    return ALBEDO_OK;
}

const char *albedo_result_json(albedo_session *s, const albedo_result *res, int metrics) {
    const char *out = NULL;
    if (!s || !res) return NULL;
    if (result_to_json(s, res, metrics, &out)) return NULL;
    return out;
}

int albedo_tokenize(const albedo_model *m, const char *text, int32_t *ids, int cap) {
    errbuf e = {{0}};
    if (!m || !text) return -1;
    int32_t *v = NULL;
    int n = 0;
    if (tok_encode(m->tok, text, strlen(text), &v, &n, &e)) {
        error_set_last(e.msg);
        return -1;
    }
    for (int i = 0; i < n && i < cap; i++) ids[i] = v[i];
    free(v);
    return n;
}
