/*
 * serve_api.c — the REST dialect of `albedo serve` (spec/api.md §2): request
 * bodies to albedo_requests, the callbacks of a job's engine ticket (stream,
 * end) with the response bodies and SSE events they write, and the HTTP
 * status of each failure. The HTTP plumbing is in serve.c; this file
 * never touches a socket.
 *
 * Response objects come from the library's albedo_result_json(), so the CLI,
 * the server and the Python package print the same numbers; the server only
 * splices "request_id" in (re-serialising through jansson would reformat the
 * floats).
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "serve_internal.h"

/* Set by serve.c (microhttpd is only linked there). */
void serve_resume_connection(struct MHD_Connection *c);

static double mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ---- sbuf ------------------------------------------------------------------ */

int sbuf_put(sbuf *b, const void *data, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

int sbuf_puts(sbuf *b, const char *s) { return sbuf_put(b, s, strlen(s)); }

void sbuf_free(sbuf *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* Length of the well-formed UTF-8 sequence at s (1 to 4 bytes), or 0. */
static size_t utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t k = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : (c & 0xf0) == 0xe0 ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (!k || k > n) return 0;
    for (size_t i = 1; i < k; i++)
        if ((s[i] & 0xc0) != 0x80) return 0;
    if (k == 3 && ((c == 0xe0 && s[1] < 0xa0) || (c == 0xed && s[1] > 0x9f))) return 0; /* overlong, surrogate */
    if (k == 4 && ((c == 0xf0 && s[1] < 0x90) || (c == 0xf4 && s[1] > 0x8f))) return 0; /* overlong, > U+10FFFF */
    return k;
}

/* A JSON string literal. The library's text is always UTF-8, but error
 * messages quote the client (jansson's "near '...'", truncated strings) and
 * the chat model name is cut to fit: a byte that is not part of a UTF-8
 * sequence becomes U+FFFD, so that every body is valid JSON (fuzz_api). */
static int sbuf_json_str(sbuf *b, const char *s, size_t n) {
    int bad = sbuf_put(b, "\"", 1);
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        const char *e = NULL;
        if (c == '"')
            e = "\\\"";
        else if (c == '\\')
            e = "\\\\";
        else if (c == '\n')
            e = "\\n";
        else if (c == '\r')
            e = "\\r";
        else if (c == '\t')
            e = "\\t";
        else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            e = esc;
        } else if (c >= 0x80) {
            size_t k = utf8_seq((const unsigned char *)s + i, n - i);
            if (k) {
                run += k;
                i += k - 1;
                continue;
            }
            e = "\\ufffd";
        }
        if (e) {
            bad |= sbuf_put(b, s + i - run, run) | sbuf_puts(b, e);
            run = 0;
        } else {
            run++;
        }
    }
    bad |= sbuf_put(b, s + n - run, run) | sbuf_put(b, "\"", 1);
    return bad;
}

/* ---- names, ids, errors ----------------------------------------------------------- */

const char *endpoint_name(endpoint ep) {
    static const char *const names[EP_COUNT] = {"caption", "query",  "detect",  "point", "chat_completions",
                                                "health",  "models", "metrics", "other"};
    return (unsigned)ep < EP_COUNT ? names[ep] : "other";
}

void make_request_id(char *out, size_t cap, const char *skill) {
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    static uint64_t state;
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    pthread_mutex_lock(&mu);
    if (!state) state = (uint64_t)t * 0x9E3779B97F4A7C15ull ^ (uint64_t)(mono_ms() * 1000.0);
    /* splitmix64: distinct ids without a global random source */
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    pthread_mutex_unlock(&mu);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    char day[16], stamp[32];
    strftime(day, sizeof day, "%Y-%m-%d", &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%d-%H:%M:%S", &tm);
    snprintf(out, cap, "%s_%s_%s-%06llx", day, skill, stamp, (unsigned long long)(z & 0xffffff));
}

static const char *error_type(int status) {
    switch (status) {
    case 400: return "invalid_request_error";
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 405: return "invalid_request_error";
    case 413: return "request_too_large";
    case 429: return "rate_limit_error";
    case 503: return "service_unavailable";
    case 504: return "timeout_error";
    default: return "server_error";
    }
}

char *api_error_body(int status, const char *code, const char *param, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    metrics_error(code);
    sbuf b = {0};
    int bad = sbuf_puts(&b, "{\"error\": {\"message\": ") | sbuf_json_str(&b, msg, strlen(msg));
    bad |= sbuf_puts(&b, ", \"type\": ") | sbuf_json_str(&b, error_type(status), strlen(error_type(status)));
    bad |= sbuf_puts(&b, ", \"param\": ");
    bad |= param ? sbuf_json_str(&b, param, strlen(param)) : sbuf_puts(&b, "null");
    bad |= sbuf_puts(&b, ", \"code\": ") | sbuf_json_str(&b, code, strlen(code)) | sbuf_puts(&b, "}}");
    if (bad) {
        sbuf_free(&b);
        return NULL; /* serve.c answers a static body then */
    }
    return b.p;
}

/* ---- base64 ---------------------------------------------------------------- */

/* Value of a base64 digit (either alphabet), or -1. A function rather than a
 * lazily built table, so that HTTP threads share no mutable state. */
static int b64_digit(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
}

int base64_decode(const char *s, size_t n, unsigned char **out, size_t *out_len) {
    unsigned char *o = malloc(n / 4 * 3 + 3);
    if (!o) return -1;
    size_t k = 0;
    uint32_t acc = 0;
    int bits = 0, pad = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
        if (c == '=') {
            pad++;
            continue;
        }
        int v = b64_digit(c);
        if (pad || v < 0) goto bad; /* data after padding, or not base64 */
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            o[k++] = (unsigned char)(acc >> bits);
        }
    }
    /* A single leftover character (6 bits) cannot encode a byte. */
    if (bits >= 6 || pad > 2) goto bad;
    *out = o;
    *out_len = k;
    return 0;
bad:
    free(o);
    return -1;
}

/* ---- jobs ------------------------------------------------------------------ */

job *job_new(endpoint ep) {
    job *j = calloc(1, sizeof *j);
    if (!j) return NULL;
    pthread_mutex_init(&j->mu, NULL);
    j->refs = 1;
    j->ep = ep;
    j->t_accept_ms = mono_ms();
    return j;
}

void job_ref(job *j) {
    pthread_mutex_lock(&j->mu);
    j->refs++;
    pthread_mutex_unlock(&j->mu);
}

void job_unref(job *j) {
    if (!j) return;
    pthread_mutex_lock(&j->mu);
    int left = --j->refs;
    pthread_mutex_unlock(&j->mu);
    if (left) return;
    free(j->question);
    free(j->object);
    free(j->srefs);
    free(j->image);
    free(j->body);
    sbuf_free(&j->sse);
    pthread_mutex_destroy(&j->mu);
    free(j);
}

void job_wake_locked(job *j) {
    if (j->suspended && !j->gone) {
        j->suspended = 0;
        serve_resume_connection(j->conn);
    }
}

void job_fail(job *j, int status, char *body) {
    pthread_mutex_lock(&j->mu);
    free(j->body);
    j->status = status;
    j->body = body;
    j->done = 1;
    job_wake_locked(j);
    pthread_mutex_unlock(&j->mu);
}

/* ---- parsing ----------------------------------------------------------------- */

#define FAIL(code, param, ...)                                \
    do {                                                      \
        *err = api_error_body(400, code, param, __VA_ARGS__); \
        return 400;                                           \
    } while (0)

static int is_image(const unsigned char *p, size_t n) {
    if (n >= 3 && p[0] == 0xFF && p[1] == 0xD8 && p[2] == 0xFF) return 1;         /* JPEG */
    if (n >= 8 && !memcmp(p, "\x89PNG\r\n\x1a\n", 8)) return 1;                   /* PNG */
    if (n >= 6 && (!memcmp(p, "GIF87a", 6) || !memcmp(p, "GIF89a", 6))) return 1; /* GIF */
    if (n >= 12 && !memcmp(p, "RIFF", 4) && !memcmp(p + 8, "WEBP", 4)) return 1;  /* WebP */
    return 0;
}

/* image_url: a data URL (data:image/...;base64,...) or bare base64. Only the
 * container is checked here; the pixels are decoded by the worker. */
static int parse_image(job *j, const char *url, size_t n, const char *param, char **err) {
    const char *b64 = url;
    size_t bn = n;
    if (n >= 5 && !strncmp(url, "data:", 5)) {
        const char *comma = memchr(url, ',', n);
        if (!comma) FAIL("invalid_image_url", param, "%s: a data URL needs a comma before its data", param);
        size_t hn = (size_t)(comma - url);
        if (hn < 7 || strncmp(comma - 7, ";base64", 7))
            FAIL("invalid_image_url", param, "%s: only base64 data URLs are supported", param);
        b64 = comma + 1;
        bn = n - hn - 1;
    } else if ((n >= 7 && !strncmp(url, "http://", 7)) || (n >= 8 && !strncmp(url, "https://", 8))) {
        FAIL("invalid_image_url", param, "%s: remote URLs are not fetched; send a base64 data URL", param);
    }
    if (base64_decode(b64, bn, &j->image, &j->image_len))
        FAIL("invalid_base64", param, "%s: invalid base64 data", param);
    if (!is_image(j->image, j->image_len))
        FAIL("image_decode_failed", param, "%s: not a JPEG, PNG, WebP or GIF image", param);
    return 0;
}

static int get_string(json_t *o, const char *key, const char **out, size_t *len, int required, char **err) {
    json_t *v = json_object_get(o, key);
    *out = NULL;
    if (!v || json_is_null(v)) {
        if (required) FAIL("missing_field", key, "missing required field '%s'", key);
        return 0;
    }
    if (!json_is_string(v)) FAIL("invalid_type", key, "'%s' must be a string", key);
    *out = json_string_value(v);
    if (len) *len = json_string_length(v);
    return 0;
}

static int get_bool(json_t *o, const char *key, int *out, char **err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) FAIL("invalid_type", key, "'%s' must be true or false", key);
    *out = json_is_true(v);
    return 0;
}

static int get_number(json_t *o, const char *key, const char *param, double *out, int *has, char **err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) FAIL("invalid_type", param, "'%s' must be a number", param);
    *out = json_number_value(v);
    *has = 1;
    return 0;
}

static int get_posint(json_t *o, const char *key, const char *param, int *out, int *has, char **err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    double d = json_is_number(v) ? json_number_value(v) : NAN;
    if (!json_is_number(v) || d != floor(d)) FAIL("invalid_type", param, "'%s' must be an integer", param);
    if (d < 1 || d > 1e6) FAIL("invalid_value", param, "'%s' must be between 1 and 1000000", param);
    *out = (int)d;
    *has = 1;
    return 0;
}

static char *dupn(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

/* temperature, top_p, max_tokens, max_objects (and seed) from an object: the
 * REST "settings" or the top level of a chat request. */
static int parse_sampling(job *j, json_t *o, const char *prefix, const char *max_key, char **err) {
    char pt[64], pp[64], pm[64], po[64];
    snprintf(pt, sizeof pt, "%stemperature", prefix);
    snprintf(pp, sizeof pp, "%stop_p", prefix);
    snprintf(pm, sizeof pm, "%s%s", prefix, max_key);
    snprintf(po, sizeof po, "%smax_objects", prefix);
    double t = 0, p = 0;
    int ht = 0, hp = 0, hm = 0, ho = 0, mt = 0, mo = 0, rc;
    if ((rc = get_number(o, "temperature", pt, &t, &ht, err))) return rc;
    if ((rc = get_number(o, "top_p", pp, &p, &hp, err))) return rc;
    if ((rc = get_posint(o, max_key, pm, &mt, &hm, err))) return rc;
    if ((rc = get_posint(o, "max_objects", po, &mo, &ho, err))) return rc;
    if (ht && !(t >= 0 && t <= 100)) FAIL("invalid_value", pt, "'%s' must be >= 0", pt);
    if (hp && !(p > 0 && p <= 1)) FAIL("invalid_value", pp, "'%s' must be in (0, 1]", pp);
    if (ht) j->req.temperature = (float)t;
    if (hp) j->req.top_p = (float)p;
    if (hm) j->req.max_tokens = mt;
    if (ho) j->req.max_objects = mo;
    json_t *seed = json_object_get(o, "seed");
    if (seed && !json_is_null(seed)) {
        if (!json_is_integer(seed) || json_integer_value(seed) < 0)
            FAIL("invalid_type", "seed", "'seed' must be a non-negative integer");
        j->req.seed = (uint64_t)json_integer_value(seed);
    }
    return 0;
}

static int parse_refs(job *j, json_t *a, char **err) {
    if (!a || json_is_null(a)) return 0;
    if (!json_is_array(a))
        FAIL("invalid_type", "spatial_refs", "'spatial_refs' must be a list of [x, y] or [x1, y1, x2, y2]");
    size_t n = json_array_size(a);
    if (n > 64) FAIL("invalid_value", "spatial_refs", "at most 64 spatial_refs");
    if (!n) return 0;
    j->srefs = calloc(n, sizeof *j->srefs);
    if (!j->srefs) FAIL("out_of_memory", "spatial_refs", "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *r = json_array_get(a, i);
        size_t k = json_is_array(r) ? json_array_size(r) : 0;
        if (k != 2 && k != 4)
            FAIL("invalid_type", "spatial_refs", "spatial_refs[%zu] must be [x, y] or [x1, y1, x2, y2]", i);
        j->srefs[i].n = (int)k;
        for (size_t q = 0; q < k; q++) {
            json_t *v = json_array_get(r, q);
            if (!json_is_number(v)) FAIL("invalid_type", "spatial_refs", "spatial_refs[%zu] must hold numbers", i);
            double d = json_number_value(v);
            if (!(d >= 0 && d <= 1))
                FAIL("invalid_value", "spatial_refs", "spatial_refs[%zu] must be normalised to [0, 1]", i);
            j->srefs[i].v[q] = d;
        }
    }
    j->req.spatial_refs = j->srefs;
    j->req.n_spatial_refs = (int)n;
    return 0;
}

static void apply_defaults(job *j, const api_defaults *d) {
    if (d->has_temperature) j->req.temperature = d->temperature;
    if (d->has_top_p) j->req.top_p = d->top_p;
    if (d->has_max_tokens) j->req.max_tokens = d->max_tokens;
    if (d->has_max_objects) j->req.max_objects = d->max_objects;
}

static int parse_skill(job *j, json_t *root, char **err) {
    const char *s;
    size_t n;
    int rc;
    if ((rc = get_string(root, "image_url", &s, &n, j->ep != EP_QUERY, err))) return rc;
    if (s && (rc = parse_image(j, s, n, "image_url", err))) return rc;
    if (j->ep == EP_CAPTION) {
        if ((rc = get_string(root, "length", &s, NULL, 0, err))) return rc;
        if (s) {
            if (!strcmp(s, "normal"))
                j->req.length = ALBEDO_LENGTH_NORMAL;
            else if (!strcmp(s, "short"))
                j->req.length = ALBEDO_LENGTH_SHORT;
            else if (!strcmp(s, "long"))
                j->req.length = ALBEDO_LENGTH_LONG;
            else
                FAIL("invalid_value", "length", "'length' must be \"short\", \"normal\" or \"long\"");
        }
    }
    if (j->ep == EP_QUERY) {
        if ((rc = get_string(root, "question", &s, &n, 1, err))) return rc;
        if (!(j->question = dupn(s, n))) FAIL("out_of_memory", NULL, "out of memory");
        if (strlen(j->question) != n) FAIL("invalid_value", "question", "'question' contains a NUL character");
        j->req.question = j->question;
        if ((rc = get_bool(root, "reasoning", &j->req.reasoning, err))) return rc;
        if ((rc = parse_refs(j, json_object_get(root, "spatial_refs"), err))) return rc;
    }
    if (j->ep == EP_DETECT || j->ep == EP_POINT) {
        if ((rc = get_string(root, "object", &s, &n, 1, err))) return rc;
        if (!(j->object = dupn(s, n))) FAIL("out_of_memory", NULL, "out of memory");
        if (strlen(j->object) != n) FAIL("invalid_value", "object", "'object' contains a NUL character");
        j->req.object = j->object;
    }
    /* detect and point never stream (spec/api.md §1.3); a stream flag there
     * is ignored rather than refused, as the cloud does. */
    if ((rc = get_bool(root, "stream", &j->stream, err))) return rc;
    if (j->ep == EP_DETECT || j->ep == EP_POINT) j->stream = 0;
    json_t *st = json_object_get(root, "settings");
    if (st && !json_is_null(st)) {
        if (!json_is_object(st)) FAIL("invalid_type", "settings", "'settings' must be an object");
        if ((rc = parse_sampling(j, st, "settings.", "max_tokens", err))) return rc;
    }
    const char *model;
    if ((rc = get_string(root, "model", &model, NULL, 0, err))) return rc;
    return 0;
}

/* The text of a chat message's content: a string, or the "text" parts of a
 * list joined by newlines. Images found on the way are remembered (the last
 * one wins). */
static int chat_content(job *j, json_t *content, sbuf *text, const char **img, size_t *img_n, char **err) {
    if (json_is_string(content))
        return sbuf_put(text, json_string_value(content), json_string_length(content)) ? -1 : 0;
    if (!content || json_is_null(content)) return 0;
    if (!json_is_array(content))
        FAIL("invalid_type", "messages", "message content must be a string or a list of parts");
    size_t i;
    json_t *part;
    json_array_foreach(content, i, part) {
        json_t *type = json_object_get(part, "type");
        if (!json_is_object(part) || !json_is_string(type))
            FAIL("invalid_type", "messages", "each content part needs a \"type\"");
        const char *t = json_string_value(type);
        if (!strcmp(t, "text")) {
            json_t *tx = json_object_get(part, "text");
            if (!json_is_string(tx)) FAIL("invalid_type", "messages", "a text part needs a string \"text\"");
            if (text->len && sbuf_put(text, "\n", 1)) return -1;
            if (sbuf_put(text, json_string_value(tx), json_string_length(tx))) return -1;
        } else if (!strcmp(t, "image_url")) {
            json_t *iu = json_object_get(part, "image_url");
            json_t *url = json_is_object(iu) ? json_object_get(iu, "url") : iu;
            if (!json_is_string(url)) FAIL("invalid_type", "messages", "an image_url part needs image_url.url");
            *img = json_string_value(url);
            *img_n = json_string_length(url);
        } else {
            FAIL("invalid_value", "messages", "unsupported content part type '%s'", t);
        }
    }
    (void)j;
    return 0;
}

/* OpenAI chat: answered like query with the last user message's text and
 * the last image of any user message. Moondream has no multi-turn prompt,
 * so earlier turns only contribute their images. */
static int parse_chat(job *j, json_t *root, char **err) {
    json_t *msgs = json_object_get(root, "messages");
    if (!msgs || json_is_null(msgs)) FAIL("missing_field", "messages", "missing required field 'messages'");
    if (!json_is_array(msgs) || !json_array_size(msgs))
        FAIL("invalid_type", "messages", "'messages' must be a non-empty list");
    const char *img = NULL;
    size_t img_n = 0;
    sbuf last = {0};
    int have_user = 0, rc;
    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m) {
        json_t *role = json_object_get(m, "role");
        if (!json_is_object(m) || !json_is_string(role)) {
            sbuf_free(&last);
            FAIL("invalid_type", "messages", "messages[%zu] needs a string \"role\"", i);
        }
        if (strcmp(json_string_value(role), "user")) continue;
        sbuf t = {0};
        if ((rc = chat_content(j, json_object_get(m, "content"), &t, &img, &img_n, err))) {
            sbuf_free(&t);
            sbuf_free(&last);
            if (rc < 0) FAIL("out_of_memory", NULL, "out of memory");
            return rc;
        }
        sbuf_free(&last);
        last = t;
        have_user = 1;
    }
    if (!have_user || !last.len) {
        sbuf_free(&last);
        FAIL("missing_field", "messages", "no user message with text");
    }
    j->question = last.p;
    if (strlen(j->question) != last.len) FAIL("invalid_value", "messages", "message text contains a NUL character");
    j->req.question = j->question;
    if (img && (rc = parse_image(j, img, img_n, "messages", err))) return rc;
    const char *model;
    if ((rc = get_string(root, "model", &model, NULL, 0, err))) return rc;
    snprintf(j->model_name, sizeof j->model_name, "%s", model ? model : "moondream2");
    if ((rc = get_bool(root, "stream", &j->stream, err))) return rc;
    if ((rc = get_bool(root, "reasoning", &j->req.reasoning, err))) return rc;
    /* max_completion_tokens is what the official client sends (cloud_vl.py). */
    if ((rc = parse_sampling(j, root, "", "max_tokens", err))) return rc;
    int mt = 0, hm = 0;
    if ((rc = get_posint(root, "max_completion_tokens", "max_completion_tokens", &mt, &hm, err))) return rc;
    if (hm) j->req.max_tokens = mt;
    return 0;
}

int api_parse(job *j, const char *body, size_t len, const api_defaults *d, char **err) {
    static const albedo_skill skills[] = {ALBEDO_SKILL_CAPTION, ALBEDO_SKILL_QUERY, ALBEDO_SKILL_DETECT,
                                          ALBEDO_SKILL_POINT, ALBEDO_SKILL_QUERY};
    *err = NULL;
    j->req = albedo_request_default(skills[j->ep]);
    apply_defaults(j, d);
    json_error_t je;
    json_t *root = json_loadb(body, len, 0, &je);
    if (!root) FAIL("invalid_json", NULL, "malformed JSON: %s (line %d, column %d)", je.text, je.line, je.column);
    int rc;
    if (!json_is_object(root)) {
        json_decref(root);
        FAIL("invalid_json", NULL, "the request body must be a JSON object");
    }
    rc = j->ep == EP_CHAT ? parse_chat(j, root, err) : parse_skill(j, root, err);
    json_decref(root);
    make_request_id(j->request_id, sizeof j->request_id, endpoint_name(j->ep == EP_CHAT ? EP_QUERY : j->ep));
    return rc;
}

/* ---- running ------------------------------------------------------------------ */

static void chat_chunk(job *j, sbuf *b, const char *content, size_t n, const char *finish, int role) {
    char head[512];
    snprintf(head, sizeof head,
             "data: {\"id\": \"chatcmpl-%s\", \"object\": \"chat.completion.chunk\", \"created\": %lld, \"model\": ",
             j->request_id, (long long)time(NULL));
    sbuf_puts(b, head);
    sbuf_json_str(b, j->model_name, strlen(j->model_name));
    sbuf_puts(b, ", \"choices\": [{\"index\": 0, \"delta\": {");
    if (role) sbuf_puts(b, "\"role\": \"assistant\"");
    if (content) {
        if (role) sbuf_puts(b, ", ");
        sbuf_puts(b, "\"content\": ");
        sbuf_json_str(b, content, n);
    }
    sbuf_puts(b, "}, \"finish_reason\": ");
    if (finish) {
        sbuf_json_str(b, finish, strlen(finish));
    } else {
        sbuf_puts(b, "null");
    }
    sbuf_puts(b, "}]}\n\n");
}

/* The ticket's stream callback, on the request's engine thread. The
 * deadline is the engine's (albedo_submit_params.deadline_ms). */
static int on_text(void *user, const char *text, size_t len) {
    job *j = user;
    pthread_mutex_lock(&j->mu);
    int stop = j->gone || j->hung_up;
    if (!stop && j->stream) {
        if (j->ep == EP_CHAT) {
            chat_chunk(j, &j->sse, text, len, NULL, !j->stream_started);
            j->stream_started = 1;
        } else {
            sbuf_puts(&j->sse, "data: {\"chunk\": ");
            sbuf_json_str(&j->sse, text, len);
            sbuf_puts(&j->sse, ", \"completed\": false}\n\n");
        }
        job_wake_locked(j);
    }
    pthread_mutex_unlock(&j->mu);
    return stop;
}

/* The tail of the library's response object from ", \"reasoning\"" or
 * ", \"finish_reason\"" on. Inside a JSON string every quote is escaped, so
 * ', "key": ' can only match at the top level. */
static const char *tail_from(const char *json, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, ", \"%s\": ", key);
    return strstr(json, pat);
}

static char *chat_response(job *j, const albedo_result *res, const char *json) {
    sbuf b = {0};
    char head[512];
    snprintf(head, sizeof head,
             "{\"id\": \"chatcmpl-%s\", \"object\": \"chat.completion\", \"created\": %lld, \"model\": ", j->request_id,
             (long long)time(NULL));
    int bad = sbuf_puts(&b, head) | sbuf_json_str(&b, j->model_name, strlen(j->model_name));
    bad |= sbuf_puts(&b, ", \"choices\": [{\"index\": 0, \"message\": {\"role\": \"assistant\", \"content\": ");
    bad |= sbuf_json_str(&b, res->text ? res->text : "", res->text ? res->text_len : 0);
    const char *r = tail_from(json, "reasoning"), *f = tail_from(json, "finish_reason");
    if (r && f && f > r) bad |= sbuf_put(&b, r, (size_t)(f - r));
    snprintf(head, sizeof head,
             "}, \"finish_reason\": \"%s\"}], \"usage\": {\"prompt_tokens\": %d, \"completion_tokens\": %d, "
             "\"total_tokens\": %d}}",
             res->finish == ALBEDO_FINISH_LENGTH ? "length" : "stop", res->metrics.input_tokens,
             res->metrics.output_tokens, res->metrics.input_tokens + res->metrics.output_tokens);
    bad |= sbuf_puts(&b, head);
    if (bad) {
        sbuf_free(&b);
        return NULL;
    }
    return b.p;
}

static void finish_ok(job *j, const albedo_result *res, const char *json) {
    /* Counted before the response is released, so that a client that reads
     * /metrics after its answer finds the request in it. */
    metrics_tokens(res->metrics.input_tokens, res->metrics.output_tokens, res->metrics.cached_tokens);
    pthread_mutex_lock(&j->mu);
    j->in_tokens = res->metrics.input_tokens;
    j->out_tokens = res->metrics.output_tokens;
    j->status = 200;
    if (!j->stream) {
        if (j->ep == EP_CHAT) {
            j->body = chat_response(j, res, json);
        } else {
            sbuf b = {0};
            int bad = sbuf_puts(&b, "{\"request_id\": ") | sbuf_json_str(&b, j->request_id, strlen(j->request_id));
            bad |= sbuf_puts(&b, ", ") | sbuf_puts(&b, json + 1);
            if (bad) sbuf_free(&b);
            j->body = b.p;
        }
        if (!j->body) {
            j->status = 500;
            j->body = api_error_body(500, "out_of_memory", NULL, "out of memory");
        }
    } else if (j->ep == EP_CHAT) {
        if (!j->stream_started) chat_chunk(j, &j->sse, NULL, 0, NULL, 1);
        chat_chunk(j, &j->sse, NULL, 0, res->finish == ALBEDO_FINISH_LENGTH ? "length" : "stop", 0);
        sbuf_puts(&j->sse, "data: [DONE]\n\n");
    } else {
        /* Terminal event: what the official clients stop on, plus what the
         * non-streamed response carries besides the text. */
        const char *t = tail_from(json, "reasoning");
        if (!t) t = tail_from(json, "finish_reason");
        sbuf_puts(&j->sse, "data: {\"completed\": true, \"chunk\": \"\", \"request_id\": ");
        sbuf_json_str(&j->sse, j->request_id, strlen(j->request_id));
        sbuf_puts(&j->sse, t ? t : "}");
        sbuf_puts(&j->sse, "\n\n");
    }
    j->done = 1;
    job_wake_locked(j);
    pthread_mutex_unlock(&j->mu);
}

/* An error after the stream started can only be told in the stream. */
static void finish_error(job *j, int status, char *body) {
    pthread_mutex_lock(&j->mu);
    if (j->stream && j->sse.len && body) {
        if (j->ep == EP_CHAT) {
            sbuf_puts(&j->sse, "data: ");
            sbuf_puts(&j->sse, body);
            sbuf_puts(&j->sse, "\n\ndata: [DONE]\n\n");
        } else {
            sbuf_puts(&j->sse, "data: {\"completed\": true, \"chunk\": \"\", ");
            sbuf_puts(&j->sse, body + 1);
            sbuf_puts(&j->sse, "\n\n");
        }
        free(body);
        body = NULL;
    }
    free(j->body);
    j->status = status;
    j->body = body;
    j->done = 1;
    job_wake_locked(j);
    pthread_mutex_unlock(&j->mu);
}

void job_submit_params(job *j, albedo_submit_params *sp) {
    memset(sp, 0, sizeof *sp);
    /* Every text-producing skill gets the callback (it also notices a
     * vanished client); detect and point have no text to stream. */
    if (j->ep == EP_CAPTION || j->ep == EP_QUERY || j->ep == EP_CHAT) sp->on_text = on_text;
    sp->user = j;
    if (j->deadline_ms > 0) {
        const double left = j->deadline_ms - mono_ms();
        sp->deadline_ms = left > 0.001 ? left : 0.001; /* already late: ends at admission */
    }
}

void job_finish(job *j, albedo_status st, const albedo_result *res, const char *json, const char *errmsg,
                int shutting) {
    if (!errmsg) errmsg = "";
    if (st == ALBEDO_OK) {
        if (res && json)
            finish_ok(j, res, json);
        else
            finish_error(j, 500, api_error_body(500, "processing_error", NULL, "the result has no response object"));
        return;
    }
    if (st == ALBEDO_ERR_CANCELLED) {
        pthread_mutex_lock(&j->mu);
        const int gone = j->gone || j->hung_up;
        pthread_mutex_unlock(&j->mu);
        if (gone) { /* nobody to answer */
            metrics_cancelled();
            finish_error(j, 499, NULL);
        } else if (shutting) {
            finish_error(j, 503, api_error_body(503, "shutting_down", NULL, "the server is shutting down"));
        } else if (strstr(errmsg, "queued")) {
            finish_error(j, 504,
                         api_error_body(504, "timeout", NULL, "the request waited past its deadline in the queue"));
        } else {
            finish_error(j, 504, api_error_body(504, "timeout", NULL, "the request ran past its deadline"));
        }
        return;
    }
    /* The engine's image failures say so first ("image: PNG: ..."). */
    if (!strncmp(errmsg, "image: ", 7)) {
        const char *msg = errmsg + 7;
        if (st == ALBEDO_ERR_IMAGE || st == ALBEDO_ERR_INVALID_ARGUMENT || st == ALBEDO_ERR_UNSUPPORTED)
            finish_error(
                j, 400, api_error_body(400, "image_decode_failed", "image_url", "image could not be decoded: %s", msg));
        else if (st == ALBEDO_ERR_LIMIT)
            finish_error(j, 413, api_error_body(413, "image_too_large", "image_url", "%s", msg));
        else
            finish_error(j, 500, api_error_body(500, "processing_error", NULL, "image encoding failed: %s", msg));
        return;
    }
    if (st == ALBEDO_ERR_INVALID_ARGUMENT)
        finish_error(j, 400, api_error_body(400, "invalid_value", NULL, "%s", errmsg));
    else if (st == ALBEDO_ERR_LIMIT)
        finish_error(j, 400, api_error_body(400, "context_length_exceeded", NULL, "%s", errmsg));
    else
        finish_error(j, 500, api_error_body(500, "processing_error", NULL, "%s: %s", albedo_status_str(st), errmsg));
}
