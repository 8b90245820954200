/*
 * generate.c — Moondream's generation loops (spec/model.md §7–9), faithful
 * to the reference moondream/torch/moondream.py:
 *
 *   caption   prompt = template[length]               → answer loop
 *   query     prompt = prefix + refs + q + suffix ×2  → answer loop
 *             reasoning: prefix + refs + q + suffix + thinking → reasoning
 *             loop (grounded points) → feed suffix → answer loop
 *   detect    prompt = prefix + " "+object + suffix   → {x, y, size} × objects
 *   point     prompt = prefix + " "+object + suffix   → {x, y} × objects
 *
 * Moondream 3 (§10.6) differs in three rules, flagged in md_config: the query
 * suffix is fed once; the reasoning prompt is q + thinking (no suffix before
 * it); after each detected/pointed object the continue-or-stop choice is
 * between coord_id and EOS only (two rows of the LM head, not the full
 * vocabulary). Reasoning stays an explicit request flag for both (the HF
 * Moondream 3 code reasons by default; albedo's callers choose).
 *
 * The answer loop stops at EOS or max_tokens and masks answer_id on every
 * decode step after the first; the reasoning loop stops when answer_id is
 * sampled and masks EOS and size_id. Region steps feed coordinate and size
 * embeddings in place of token embeddings.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "session.h"

#define MAX_QUESTION_BYTES (1 << 20)

/* ---- small growable arrays --------------------------------------------- */

int buf_put(buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 256;
        while (nc < b->len + n + 1) nc *= 2;
        char *p = realloc(b->p, nc);
        if (!p) return -1;
        b->p = p;
        b->cap = nc;
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

int buf_printf(buf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return -1;
    if ((size_t)n < sizeof tmp) return buf_put(b, tmp, (size_t)n);
    char *big = malloc((size_t)n + 1);
    if (!big) return -1;
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    int r = buf_put(b, big, (size_t)n);
    free(big);
    return r;
}

#define GROW(arr, n, cap) (((n) < (cap)) ? 0 : (grow_array((void **)&(arr), &(cap), sizeof *(arr)) ? -1 : 0))

static int grow_array(void **p, int *cap, size_t elem) {
    int nc = *cap ? *cap * 2 : 16;
    void *q = realloc(*p, (size_t)nc * elem);
    if (!q) return -1;
    *p = q;
    *cap = nc;
    return 0;
}

static int push_token(result_store *rs, int32_t id) {
    if (GROW(rs->tokens, rs->n_tokens, rs->cap_tokens)) return -1;
    rs->tokens[rs->n_tokens++] = id;
    return 0;
}

/* ---- prompt construction --------------------------------------------------- */

typedef struct prompt {
    int32_t *ids;
    int n, cap;
} prompt;

static int pr_add(prompt *p, const int32_t *ids, int n) {
    while (p->n + n > p->cap) {
        int nc = p->cap ? p->cap * 2 : 64;
        int32_t *q = realloc(p->ids, (size_t)nc * sizeof *q);
        if (!q) return -1;
        p->ids = q;
        p->cap = nc;
    }
    memcpy(p->ids + p->n, ids, (size_t)n * sizeof *ids);
    p->n += n;
    return 0;
}

static int pr_tmpl(prompt *p, const md_tmpl *t) { return pr_add(p, t->ids, t->n); }

static albedo_status pr_text(prompt *p, const tokenizer *tok, const char *lead, const char *text, errbuf *e) {
    size_t ll = strlen(lead), tl = strlen(text);
    char *s = malloc(ll + tl + 1);
    if (!s) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    memcpy(s, lead, ll);
    memcpy(s + ll, text, tl + 1);
    int32_t *ids = NULL;
    int n = 0;
    albedo_status st = tok_encode(tok, s, ll + tl, &ids, &n, e);
    free(s);
    if (st) return st;
    int r = pr_add(p, ids, n);
    free(ids);
    return r ? errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory") : ALBEDO_OK;
}

/* ---- the model steps ------------------------------------------------------ */

typedef struct gen {
    albedo_session *s;
    const albedo_request *r;
    const md_config *c;
    int pos;      /* next position */
    int n_prefix; /* bidirectional prefix (image) or 0 */
    double t_start, t_first;
    int n_out;        /* generated tokens / region steps */
    const gen_io *io; /* engine: where forward passes run, or NULL */
    uint64_t n_pick;  /* device picks so far (their draws' counter) */
    errbuf *e;
} gen;

static albedo_status reserve_emb(albedo_session *s, int T, errbuf *e) {
    if (T <= s->emb_cap) return ALBEDO_OK;
    float *p = realloc(s->emb, (size_t)T * s->m->cfg.dim * sizeof(float));
    if (!p) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for a %d-token prompt", T);
    s->emb = p;
    s->emb_cap = T;
    return ALBEDO_OK;
}

/* Run embeddings [T, dim] at g->pos; logits/hidden land in the state. */
static albedo_status step(gen *g, const float *emb, int T, int want_logits) {
    if (g->pos + T > g->s->st.max_ctx)
        return errf(g->e, ALBEDO_ERR_LIMIT, "the request needs more than the %d-position context", g->s->st.max_ctx);
    albedo_status st = g->io ? g->io->forward(g->io->user, emb, T, g->pos, g->n_prefix, want_logits, g->e)
                             : text_forward(&g->s->st, emb, T, g->pos, g->n_prefix, want_logits, g->e);
    if (st) return st;
    if (want_logits && g->s->on_logits) g->s->on_logits(g->s->on_logits_user, g->s->st.logits, g->c->vocab);
    g->pos += T;
    return ALBEDO_OK;
}

/* Value fed back through the Fourier encoder: the reference casts the bin
 * value to the activation dtype first (bf16 in a bf16 run). */
static float feed_value(const albedo_session *s, float v) {
    if (s->m->params.precision == ALBEDO_PRECISION_BF16) return bf16_to_f32(f32_to_bf16(v));
    return v;
}

static albedo_status step_coord(gen *g, float v) {
    region_encode_coord(&g->s->st, feed_value(g->s, v), g->s->emb);
    return step(g, g->s->emb, 1, 1);
}

static int pick(gen *g, float *logits) {
    const albedo_request *r = g->r;
    return sampler_pick(&g->s->sp, logits, g->c->vocab, r->temperature, r->top_p);
}

/* A step of T rows and the pick of the next token from its logits, with
 * ids mask[0 .. n_mask) excluded: argmax when greedy, else the request's
 * temperature and top-p. Where the state allows it (an engine ticket of a
 * GPU model: every pick; a blocking session of one: argmax picks; neither
 * with an on_logits hook) the pick runs on the device and only the id
 * comes back (docs/CUDA.md): argmax as on the host, sampling with the
 * device's draws, a hash of (seed, pick number). Otherwise the logits come
 * back and the host masks them and picks. */
static albedo_status step_pick(gen *g, const float *emb, int T, const int32_t *mask, int n_mask, int greedy, int *tok) {
    albedo_session *s = g->s;
    const float temp = greedy ? 0.0f : g->r->temperature;
    if (s->st.dev_pick && !s->on_logits && n_mask <= 2 && (s->st.dev_pick == MD_PICK_ALL || temp <= 0.0f)) {
        md_pick pk = {.temperature = temp,
                      .top_p = g->r->top_p,
                      .seed = g->r->seed,
                      .counter = g->n_pick++,
                      .n_mask = n_mask,
                      .id = -1};
        for (int i = 0; i < n_mask; i++) pk.mask[i] = mask[i];
        s->st.pick = &pk;
        albedo_status st = step(g, emb, T, 1);
        s->st.pick = NULL;
        if (!st && (pk.id < 0 || pk.id >= g->c->vocab))
            st = errf(g->e, ALBEDO_ERR_INTERNAL, "the device picked token %d", (int)pk.id);
        if (!st) *tok = pk.id;
        return st;
    }
    albedo_status st = step(g, emb, T, 1);
    if (st) return st;
    for (int i = 0; i < n_mask; i++) s->st.logits[mask[i]] = -INFINITY;
    *tok = greedy ? sampler_argmax(s->st.logits, g->c->vocab, NULL) : pick(g, s->st.logits);
    return ALBEDO_OK;
}

/* ---- streaming text ------------------------------------------------------ */

/* Release rule of the reference's streaming (spec §9.5): flush after a
 * newline, after a CJK ideograph, else up to and including the last space. */
typedef struct streamer {
    tok_stream ts;
    char *pend;
    size_t n_pend, cap_pend;
    int cancelled;
} streamer;

static int is_cjk(uint32_t cp) {
    return (cp >= 0x4E00 && cp <= 0x9FFF) || (cp >= 0x3400 && cp <= 0x4DBF) || (cp >= 0x2F800 && cp <= 0x2FA1F);
}

static uint32_t last_cp(const char *s, size_t n) {
    if (!n) return 0;
    size_t i = n - 1;
    while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80) i--;
    const unsigned char *u = (const unsigned char *)s + i;
    if (u[0] < 0x80) return u[0];
    if ((u[0] & 0xE0) == 0xC0 && n - i >= 2) return ((uint32_t)(u[0] & 0x1F) << 6) | (u[1] & 0x3F);
    if ((u[0] & 0xF0) == 0xE0 && n - i >= 3)
        return ((uint32_t)(u[0] & 0x0F) << 12) | ((uint32_t)(u[1] & 0x3F) << 6) | (u[2] & 0x3F);
    if ((u[0] & 0xF8) == 0xF0 && n - i >= 4)
        return ((uint32_t)(u[0] & 0x07) << 18) | ((uint32_t)(u[1] & 0x3F) << 12) | ((uint32_t)(u[2] & 0x3F) << 6) |
               (u[3] & 0x3F);
    return 0;
}

static int emit(gen *g, streamer *sm, size_t n) {
    if (!n) return 0;
    albedo_session *s = g->s;
    if (buf_put(&s->res.text, sm->pend, n)) return -1;
    if (g->r->on_text && !sm->cancelled && g->r->on_text(g->r->user, sm->pend, n)) sm->cancelled = 1;
    memmove(sm->pend, sm->pend + n, sm->n_pend - n);
    sm->n_pend -= n;
    return 0;
}

/* Ids the tokenizer does not know (the model's vocabulary is padded past the
 * tokenizer's) decode to nothing, as in the tokenizers library. */
static int known(const tokenizer *t, int32_t id) {
    const uint8_t *b;
    size_t n;
    return tok_token_bytes(t, id, &b, &n) == 0;
}

static int stream_token(gen *g, streamer *sm, int32_t id) {
    if (!known(g->s->m->tok, id)) return 0;
    if (tok_stream_push(g->s->m->tok, &sm->ts, id, 1, &sm->pend, &sm->n_pend, &sm->cap_pend)) return -1;
    if (!sm->n_pend) return 0;
    if (sm->pend[sm->n_pend - 1] == '\n' || is_cjk(last_cp(sm->pend, sm->n_pend))) return emit(g, sm, sm->n_pend);
    size_t k = sm->n_pend;
    while (k > 0 && sm->pend[k - 1] != ' ') k--;
    return emit(g, sm, k);
}

static int stream_finish(gen *g, streamer *sm) {
    if (tok_stream_finish(&sm->ts, &sm->pend, &sm->n_pend, &sm->cap_pend)) return -1;
    int r = emit(g, sm, sm->n_pend);
    free(sm->pend);
    sm->pend = NULL;
    return r;
}

/* ---- the loops ------------------------------------------------------------ */

/* Answer loop: the first token is the prompt's pick (no mask), then decode
 * steps with answer_id masked, until EOS or max_tokens. */
static albedo_status answer_loop(gen *g, int first) {
    albedo_session *s = g->s;
    const md_config *c = g->c;
    streamer sm = {0};
    tok_stream_init(&sm.ts);
    int tok = first;
    if (g->t_first == 0) g->t_first = now_ms();
    int produced = 0;
    albedo_status st = ALBEDO_OK;
    s->res.r.finish = ALBEDO_FINISH_STOP;
    while (tok != c->eos || g->r->ignore_eos) {
        if (produced >= g->r->max_tokens) {
            s->res.r.finish = ALBEDO_FINISH_LENGTH;
            break;
        }
        if (stream_token(g, &sm, tok)) {
            st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
            break;
        }
        if (sm.cancelled) {
            st = errf(g->e, ALBEDO_ERR_CANCELLED, "generation cancelled by the stream callback");
            break;
        }
        produced++;
        g->n_out++;
        if (g->pos >= s->st.max_ctx) {
            s->res.r.finish = ALBEDO_FINISH_LENGTH;
            break;
        }
        text_embed(s->m, tok, s->emb);
        if (push_token(&s->res, tok)) {
            st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
            break;
        }
        const int32_t no_answer[1] = {c->answer_id};
        st = step_pick(g, s->emb, 1, no_answer, 1, 0, &tok);
        if (st) break;
    }
    if (!st && stream_finish(g, &sm)) st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    free(sm.pend);
    if (!st && sm.cancelled) st = errf(g->e, ALBEDO_ERR_CANCELLED, "generation cancelled by the stream callback");
    return st;
}

/* Number of code points in UTF-8 text (the reference's len() of a str). */
static int cp_len(const char *s, size_t n) {
    int k = 0;
    for (size_t i = 0; i < n; i++) k += ((unsigned char)s[i] & 0xC0) != 0x80;
    return k;
}

/* Reasoning loop (reference _generate_reasoning). */
static albedo_status reasoning_loop(gen *g, int first) {
    albedo_session *s = g->s;
    const md_config *c = g->c;
    result_store *rs = &s->res;
    int32_t *chunk = NULL;
    int n_chunk = 0, cap_chunk = 0;
    double *coords = NULL; /* of the current chunk */
    int n_coords = 0, cap_coords = 0;
    int start_idx = 0, produced = 0;
    albedo_status st = ALBEDO_OK;
    int tok = first;
    if (g->t_first == 0) g->t_first = now_ms();

        /* Close the current chunk: decode it, append to the reasoning text and
     * record its grounding. */
#define FLUSH_CHUNK()                                                                                     \
    do {                                                                                                  \
        char *txt = NULL;                                                                                 \
        size_t tl = 0;                                                                                    \
        st = tok_decode(s->m->tok, chunk, n_chunk, 1, &txt, &tl, g->e);                                   \
        if (st) break;                                                                                    \
        if (buf_put(&rs->reasoning, txt, tl)) st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory"); \
        int len = cp_len(txt, tl);                                                                        \
        free(txt);                                                                                        \
        if (st) break;                                                                                    \
        if (n_coords > 1) {                                                                               \
            if (GROW(rs->gr, rs->n_gr, rs->cap_gr)) {                                                     \
                st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");                               \
                break;                                                                                    \
            }                                                                                             \
            albedo_grounding *gd = &rs->gr[rs->n_gr++];                                                   \
            gd->start_idx = start_idx;                                                                    \
            gd->end_idx = start_idx + len;                                                                \
            gd->n_points = n_coords / 2;                                                                  \
            gd->points = (const albedo_point *)(intptr_t)rs->n_gpts; /* index, fixed up later */          \
            for (int q = 0; q + 1 < n_coords; q += 2) {                                                   \
                if (GROW(rs->gpts, rs->n_gpts, rs->cap_gpts)) {                                           \
                    st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");                           \
                    break;                                                                                \
                }                                                                                         \
                rs->gpts[rs->n_gpts++] = (albedo_point){coords[q], coords[q + 1]};                        \
            }                                                                                             \
        }                                                                                                 \
        start_idx += len;                                                                                 \
        n_chunk = 0;                                                                                      \
        n_coords = 0;                                                                                     \
    } while (0)

    while (tok != c->answer_id && produced < g->r->max_tokens) {
        if (tok == c->start_ground_id || tok == c->end_ground_id) {
            FLUSH_CHUNK();
            if (st) break;
        }
        if (n_chunk >= cap_chunk) {
            if (grow_array((void **)&chunk, &cap_chunk, sizeof *chunk)) {
                st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
                break;
            }
        }
        if (known(s->m->tok, tok)) chunk[n_chunk++] = tok;
        if (g->pos >= s->st.max_ctx) break;
        if (tok == c->coord_id) {
            int bin = region_decode_coord(&s->st, s->st.hidden, NULL);
            float v = (float)bin / (float)c->coord_out;
            if (n_coords >= cap_coords && grow_array((void **)&coords, &cap_coords, sizeof *coords)) {
                st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
                break;
            }
            coords[n_coords++] = v;
            if (push_token(rs, tok)) {
                st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
                break;
            }
            region_encode_coord(&s->st, feed_value(s, v), s->emb);
        } else {
            text_embed(s->m, tok, s->emb);
            if (push_token(rs, tok)) {
                st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
                break;
            }
        }
        const int32_t no_end[2] = {c->eos, c->size_id};
        st = step_pick(g, s->emb, 1, no_end, 2, 0, &tok);
        if (st) break;
        produced++;
        g->n_out++;
    }
    if (!st) FLUSH_CHUNK();
#undef FLUSH_CHUNK
    free(chunk);
    free(coords);
    return st;
}

/* The last step of an object. Moondream 2 computes the full logits and
 * continues unless their argmax is EOS; Moondream 3 computes only the
 * logits of coord_id and EOS and continues iff coord_id's is larger. */
static albedo_status step_last(gen *g, const float *emb, int *tok) {
    albedo_session *s = g->s;
    const md_config *c = g->c;
    if (!c->points_coord_or_eos) return step_pick(g, emb, 1, NULL, 0, 1, tok);
    albedo_status st = step(g, emb, 1, 0);
    if (st) return st;
    const int32_t ids[2] = {c->eos, c->coord_id};
    float two[2];
    text_logits_of(&s->st, s->st.hidden, ids, 2, two);
    *tok = two[1] > two[0] ? c->coord_id : c->eos;
    return ALBEDO_OK;
}

/* Detect / point loop (reference _generate_points). */
static albedo_status points_loop(gen *g, int with_size, int first) {
    albedo_session *s = g->s;
    const md_config *c = g->c;
    result_store *rs = &s->res;
    int tok = first;
    if (g->t_first == 0) g->t_first = now_ms();
    const int per_obj = with_size ? 3 : 2;
    int n_obj = 0;
    albedo_status st = ALBEDO_OK;
    rs->r.finish = ALBEDO_FINISH_STOP;
    while (tok != c->eos) {
        if (n_obj >= g->r->max_objects || g->pos + per_obj > s->st.max_ctx) {
            rs->r.finish = ALBEDO_FINISH_LENGTH;
            break;
        }
        float x = (float)region_decode_coord(&s->st, s->st.hidden, NULL) / (float)c->coord_out;
        if ((st = step_coord(g, x))) break;
        float y = (float)region_decode_coord(&s->st, s->st.hidden, NULL) / (float)c->coord_out;
        if (with_size) {
            if ((st = step_coord(g, y))) break;
            int wb, hb;
            region_decode_size(&s->st, s->st.hidden, &wb, &hb);
            /* size = 2^((bin / 1023) · 10 − 10), in float32 as the reference. */
            const float top = (float)(c->size_out / 2 - 1);
            float w = powf(2.0f, ((float)wb / top) * 10.0f - 10.0f);
            float h = powf(2.0f, ((float)hb / top) * 10.0f - 10.0f);
            region_encode_size(&s->st, feed_value(s, w), feed_value(s, h), s->emb);
            if ((st = step_last(g, s->emb, &tok))) break;
            if (GROW(rs->boxes, rs->n_boxes, rs->cap_boxes)) {
                st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
                break;
            }
            double xd = x, yd = y, wd = w, hd = h;
            rs->boxes[rs->n_boxes++] = (albedo_box){xd - wd / 2, yd - hd / 2, xd + wd / 2, yd + hd / 2};
        } else {
            region_encode_coord(&s->st, feed_value(s, y), s->emb);
            if ((st = step_last(g, s->emb, &tok))) break;
            if (GROW(rs->points, rs->n_points, rs->cap_points)) {
                st = errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
                break;
            }
            rs->points[rs->n_points++] = (albedo_point){x, y};
        }
        n_obj++;
        g->n_out += per_obj;
    }
    return st;
}

/* ---- request validation and dispatch --------------------------------------- */

static albedo_status check_text(const char *what, const char *t, errbuf *e) {
    if (!t) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "%s is missing", what);
    size_t n = strlen(t);
    if (n == 0) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "%s is empty", what);
    if (n > MAX_QUESTION_BYTES)
        return errf(e, ALBEDO_ERR_LIMIT, "%s is longer than %d bytes", what, MAX_QUESTION_BYTES);
    return ALBEDO_OK;
}

static albedo_status validate(const albedo_session *s, const albedo_request *r, int has_image, errbuf *e) {
    albedo_status st;
    if ((int)r->skill < ALBEDO_SKILL_CAPTION || r->skill > ALBEDO_SKILL_POINT)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "unknown skill %d", (int)r->skill);
    if (r->image && r->image->m != s->m)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "the image was encoded by another model");
    if (!has_image && r->skill != ALBEDO_SKILL_QUERY)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "%s needs an image",
                    r->skill == ALBEDO_SKILL_CAPTION  ? "caption"
                    : r->skill == ALBEDO_SKILL_DETECT ? "detect"
                                                      : "point");
    if (!(r->temperature >= 0.0f) || !isfinite(r->temperature))
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "temperature must be a finite number >= 0 (got %g)",
                    (double)r->temperature);
    if (!(r->top_p > 0.0f && r->top_p <= 1.0f))
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "top_p must be in (0, 1] (got %g)", (double)r->top_p);
    if (r->max_tokens <= 0)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "max_tokens must be > 0 (got %d)", r->max_tokens);
    if (r->max_objects <= 0)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "max_objects must be > 0 (got %d)", r->max_objects);
    switch (r->skill) {
    case ALBEDO_SKILL_CAPTION:
        if ((int)r->length < 0 || r->length > ALBEDO_LENGTH_LONG)
            return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "length must be short, normal or long");
        break;
    case ALBEDO_SKILL_QUERY:
        if ((st = check_text("question", r->question, e))) return st;
        if (r->n_spatial_refs < 0 || (r->n_spatial_refs > 0 && !r->spatial_refs))
            return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "spatial_refs: bad count");
        if (r->n_spatial_refs > 64) return errf(e, ALBEDO_ERR_LIMIT, "spatial_refs: at most 64 references");
        if (r->n_spatial_refs && !has_image)
            return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "spatial_refs can only be used with an image");
        for (int i = 0; i < r->n_spatial_refs; i++) {
            const albedo_spatial_ref *sr = &r->spatial_refs[i];
            if (sr->n != 2 && sr->n != 4)
                return errf(e, ALBEDO_ERR_INVALID_ARGUMENT,
                            "spatial_refs[%d]: expected [x, y] or [x_min, y_min, x_max, y_max]", i);
            for (int k = 0; k < sr->n; k++)
                if (!(sr->v[k] >= 0.0f && sr->v[k] <= 1.0f))
                    return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "spatial_refs[%d]: values must be in [0, 1]", i);
            if (sr->n == 4 && (sr->v[2] < sr->v[0] || sr->v[3] < sr->v[1]))
                return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "spatial_refs[%d]: x_max < x_min or y_max < y_min", i);
        }
        break;
    default:
        if ((st = check_text("object", r->object, e))) return st;
        break;
    }
    return ALBEDO_OK;
}

/* Load the image's prefix into the KV cache unless it is already there. */
static void load_prefix(albedo_session *s, const albedo_image *img) {
    if (s->kv_image == img->id) return;
    if (img->dev_kv) { /* backend_cuda.c: a device-to-device copy (errors surface at the next forward) */
        md_cuda_prefix_load(&s->st, img->dev_kv);
        s->kv_image = img->id;
        return;
    }
    const md_config *c = &s->m->cfg;
    const size_t rb = (size_t)c->n_kv_heads * c->head_dim * kv_elem_bytes(s->m->kv_dt); /* bytes per row */
    for (int l = 0; l < c->n_layers; l++) {
        memcpy(s->st.k_cache[l], img->k[l], (size_t)img->n_pos * rb);
        memcpy(s->st.v_cache[l], img->v[l], (size_t)img->n_pos * rb);
    }
    s->kv_image = img->id;
}

/* Embed the prompt. As the reference, every coord_id token of the prompt
 * takes the next coordinate of the spatial references (a point's x and y, a
 * box's centre) and every size_id token the next box size, in order; centres
 * and sizes are computed in double precision like the reference's Python. */
static albedo_status embed_prompt(gen *g, const prompt *p) {
    albedo_session *s = g->s;
    const md_config *c = g->c;
    const albedo_request *r = g->r;
    albedo_status st = reserve_emb(s, p->n, g->e);
    if (st) return st;
    int n_coords = 0, n_sizes = 0, ci = 0, si = 0;
    for (int i = 0; i < r->n_spatial_refs; i++) {
        n_coords += 2;
        n_sizes += r->spatial_refs[i].n == 4;
    }
    for (int i = 0; i < p->n; i++) {
        float *o = s->emb + (size_t)i * c->dim;
        int id = p->ids[i];
        if (id < 0 || id >= c->vocab)
            return errf(g->e, ALBEDO_ERR_TOKENIZER, "token id %d is outside the model's vocabulary of %d", id,
                        c->vocab);
        if (id == c->coord_id && ci < n_coords) {
            const albedo_spatial_ref *sr = &r->spatial_refs[ci / 2];
            int axis = ci % 2;
            double v = sr->n == 2 ? sr->v[axis] : (sr->v[axis] + sr->v[axis + 2]) / 2;
            region_encode_coord(&s->st, feed_value(s, (float)v), o);
            ci++;
        } else if (id == c->size_id && si < n_sizes) {
            /* the si-th box among the references */
            int k = -1;
            for (int b = 0; b <= si; k++)
                if (r->spatial_refs[k + 1].n == 4) b++;
            const albedo_spatial_ref *sr = &r->spatial_refs[k];
            region_encode_size(&s->st, feed_value(s, (float)(sr->v[2] - sr->v[0])),
                               feed_value(s, (float)(sr->v[3] - sr->v[1])), o);
            si++;
        } else {
            text_embed(s->m, id, o);
        }
    }
    return ALBEDO_OK;
}

/* The prompt's rows, and the first token picked from its logits (argmax
 * when greedy: the points loop's rule). */
static albedo_status prefill(gen *g, const prompt *p, int greedy, int *first) {
    albedo_status st = embed_prompt(g, p);
    if (st) return st;
    for (int i = 0; i < p->n; i++)
        if (push_token(&g->s->res, p->ids[i])) return errf(g->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    return step_pick(g, g->s->emb, p->n, NULL, 0, greedy, first);
}

static void reset_result(result_store *rs) {
    rs->text.len = rs->reasoning.len = 0;
    if (rs->text.p) rs->text.p[0] = 0;
    if (rs->reasoning.p) rs->reasoning.p[0] = 0;
    rs->n_gr = rs->n_gpts = rs->n_boxes = rs->n_points = rs->n_tokens = 0;
    memset(&rs->r, 0, sizeof rs->r);
}

albedo_status gen_check(const albedo_session *s, const albedo_request *r, int has_image, errbuf *e) {
    return validate(s, r, has_image, e);
}

albedo_status gen_run(albedo_session *s, const albedo_request *r, errbuf *e) { return gen_run_io(s, r, NULL, e); }

albedo_status gen_run_io(albedo_session *s, const albedo_request *r, const gen_io *io, errbuf *e) {
    result_store *rs = &s->res;
    reset_result(rs);
    albedo_status st = validate(s, r, r->image || (io && io->image_pos), e);
    if (st) return st;
    const md_config *c = &s->m->cfg;
    gen g = {.s = s, .r = r, .c = c, .e = e, .t_start = now_ms(), .io = io};
    sampler_seed(&s->sp, r->seed);
    if ((st = reserve_emb(s, 1, e))) return st;

    prompt p = {0};
    const tokenizer *tok = s->m->tok;
    int oom = 0;
    if (io && io->image_pos) {
        /* The engine placed the image prefix in the request's own cache. */
        g.pos = io->image_pos;
        g.n_prefix = c->prefix_attn;
    } else if (r->image) {
        load_prefix(s, r->image);
        g.pos = r->image->n_pos;
        g.n_prefix = c->prefix_attn;
        rs->r.metrics.cached_tokens = r->image->n_pos;
    } else {
        oom |= pr_add(&p, &(int32_t){c->bos}, 1);
        s->kv_image = 0; /* the cache is about to be overwritten from position 0 */
    }
    switch (r->skill) {
    case ALBEDO_SKILL_CAPTION: oom |= pr_tmpl(&p, &c->caption[r->length]); break;
    case ALBEDO_SKILL_QUERY:
        oom |= pr_tmpl(&p, &c->query_prefix);
        for (int i = 0; i < r->n_spatial_refs; i++) {
            int32_t refs[3] = {c->coord_id, c->coord_id, c->size_id};
            oom |= pr_add(&p, refs, r->spatial_refs[i].n == 2 ? 2 : 3);
        }
        if (!oom) st = pr_text(&p, tok, "", r->question, e);
        if (r->reasoning) {
            if (c->reasoning_after_suffix) oom |= pr_tmpl(&p, &c->query_suffix);
            oom |= pr_add(&p, &(int32_t){c->thinking_id}, 1);
        } else {
            oom |= pr_tmpl(&p, &c->query_suffix);
            if (c->query_suffix_twice) oom |= pr_tmpl(&p, &c->query_suffix);
        }
        break;
    case ALBEDO_SKILL_DETECT:
        oom |= pr_tmpl(&p, &c->detect_prefix);
        if (!oom) st = pr_text(&p, tok, " ", r->object, e);
        oom |= pr_tmpl(&p, &c->detect_suffix);
        break;
    case ALBEDO_SKILL_POINT:
        oom |= pr_tmpl(&p, &c->point_prefix);
        if (!oom) st = pr_text(&p, tok, " ", r->object, e);
        oom |= pr_tmpl(&p, &c->point_suffix);
        break;
    }
    if (!st && oom) st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    if (!st && g.pos + p.n + 1 > s->st.max_ctx)
        st = errf(e, ALBEDO_ERR_LIMIT,
                  "prompt of %d tokens does not fit the %d-position context (%d taken by the image)", p.n,
                  s->st.max_ctx, g.pos);
    rs->r.metrics.input_tokens = g.pos + p.n;
    /* Detect and point take the argmax of the prompt's logits; the text
     * loops the request's pick. */
    int first = 0;
    const int greedy_first = r->skill == ALBEDO_SKILL_DETECT || r->skill == ALBEDO_SKILL_POINT;
    if (!st) st = prefill(&g, &p, greedy_first, &first);
    double t_prefill = now_ms();
    rs->r.metrics.prefill_time_ms = t_prefill - g.t_start;
    free(p.ids);
    if (st) return st;

    rs->r.skill = r->skill;
    switch (r->skill) {
    case ALBEDO_SKILL_CAPTION: st = answer_loop(&g, first); break;
    case ALBEDO_SKILL_QUERY:
        if (r->reasoning) {
            st = reasoning_loop(&g, first);
            if (!st) {
                /* Feed the suffix (the sampled answer_id is not fed), then answer. */
                prompt q = {0};
                if (pr_tmpl(&q, &c->query_suffix)) st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
                if (!st) st = prefill(&g, &q, 0, &first);
                free(q.ids);
            }
            if (!st) st = answer_loop(&g, first);
        } else {
            st = answer_loop(&g, first);
        }
        break;
    case ALBEDO_SKILL_DETECT: st = points_loop(&g, 1, first); break;
    case ALBEDO_SKILL_POINT: st = points_loop(&g, 0, first); break;
    }
    double t_end = now_ms();
    rs->r.metrics.output_tokens = g.n_out;
    rs->r.metrics.decode_time_ms = t_end - t_prefill;
    rs->r.metrics.ttft_ms = (g.t_first ? g.t_first : t_end) - g.t_start;
    /* Fix up the pointers of the result now that the arrays stopped moving. */
    rs->r.text = rs->text.p ? rs->text.p : "";
    rs->r.reasoning = r->skill == ALBEDO_SKILL_QUERY && r->reasoning ? (rs->reasoning.p ? rs->reasoning.p : "") : NULL;
    rs->r.text_len = rs->text.p ? rs->text.len : 0;
    rs->r.reasoning_len = rs->r.reasoning && rs->reasoning.p ? rs->reasoning.len : 0;
    for (int i = 0; i < rs->n_gr; i++) rs->gr[i].points = rs->gpts + (intptr_t)rs->gr[i].points;
    rs->r.grounding = rs->gr;
    rs->r.n_grounding = rs->n_gr;
    rs->r.objects = rs->boxes;
    rs->r.n_objects = rs->n_boxes;
    rs->r.points = rs->points;
    rs->r.n_points = rs->n_points;
    rs->r.tokens = rs->tokens;
    rs->r.n_tokens = rs->n_tokens;
    return st;
}
