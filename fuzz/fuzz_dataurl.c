/*
 * fuzz_dataurl.c — base64 and data URLs, the way every image reaches
 * `albedo serve` (tools/serve_api.c): base64_decode on arbitrary bytes, then
 * the same bytes as the image_url of a caption request and as the image part
 * of a chat request, through api_parse.
 *
 * Both are compared with an independent model written from the documented
 * rules (docs/SERVER.md, "Fields"), not from the code:
 *
 *   base64   ASCII whitespace (space, tab, CR, LF) anywhere is skipped; the
 *            digits may come from the standard (+ /) or URL-safe (- _)
 *            alphabet, mixed; '=' may follow the last digit, at most twice,
 *            whatever the length; n digits give floor(6n / 8) bytes, and
 *            n = 4k + 1 digits are refused (6 bits cannot make a byte).
 *   URL      "data:" ... "," with ";base64" right before the comma: the part
 *            after the comma is base64; "http://" or "https://": refused
 *            (invalid_image_url: the server fetches nothing); anything else is
 *            bare base64. Other data URLs are invalid_image_url, undecodable
 *            base64 is invalid_base64, and decoded bytes without a JPEG, PNG,
 *            GIF or WebP signature are image_decode_failed.
 *
 * The outcome (accepted, or the error code and its param) and the decoded
 * bytes must agree exactly. serve_api.c is compiled in, as in fuzz_api.c.
 */
#include "serve_api.c"

#include "fuzz.h"

void serve_resume_connection(struct MHD_Connection *c) {
    (void)c;
    abort();
}

/* The model decoder: collect the digits, then four digits make three bytes. */
static int model_b64(const uint8_t *s, size_t n, uint8_t **out, size_t *out_len) {
    uint8_t *dig = malloc(n + 1);
    uint8_t *o = malloc(n + 1);
    size_t nd = 0, npad = 0, k = 0;
    int ok = dig && o;
    for (size_t i = 0; ok && i < n; i++) {
        uint8_t c = s[i];
        if (c == ' ' || c == '\t' || c == '\r' || c == '\n') continue;
        if (c == '=') {
            npad++;
            continue;
        }
        const char *std = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        const char *url = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        const char *p = c ? strchr(std, c) : NULL;
        const char *q = c ? strchr(url, c) : NULL;
        if (npad || (!p && !q))
            ok = 0; /* a digit after padding, or not a digit */
        else
            dig[nd++] = (uint8_t)(p ? p - std : q - url);
    }
    if (ok && (npad > 2 || nd % 4 == 1)) ok = 0;
    for (size_t i = 0; ok && i < nd; i += 4) {
        size_t m = nd - i < 4 ? nd - i : 4;
        uint32_t v = 0;
        for (size_t t = 0; t < 4; t++) v = v << 6 | (t < m ? dig[i + t] : 0);
        for (size_t t = 0; t + 1 < m; t++) o[k++] = (uint8_t)(v >> (16 - 8 * t));
    }
    free(dig);
    if (!ok) {
        free(o);
        return -1;
    }
    *out = o;
    *out_len = k;
    return 0;
}

static int has_signature(const uint8_t *p, size_t n) {
    return (n >= 3 && !memcmp(p, "\xff\xd8\xff", 3)) || (n >= 8 && !memcmp(p, "\x89PNG\r\n\x1a\n", 8)) ||
           (n >= 6 && (!memcmp(p, "GIF87a", 6) || !memcmp(p, "GIF89a", 6))) ||
           (n >= 12 && !memcmp(p, "RIFF", 4) && !memcmp(p + 8, "WEBP", 4));
}

static int starts(const uint8_t *s, size_t n, const char *prefix) {
    size_t k = strlen(prefix);
    return n >= k && !memcmp(s, prefix, k);
}

/* The documented outcome for an image_url: NULL (accepted, *img holds the
 * bytes) or the error code. */
static const char *model_url(const uint8_t *u, size_t n, uint8_t **img, size_t *img_len) {
    *img = NULL;
    if (starts(u, n, "data:")) {
        const uint8_t *comma = memchr(u, ',', n);
        if (!comma) return "invalid_image_url";
        size_t hn = (size_t)(comma - u);
        if (hn < 7 || memcmp(comma - 7, ";base64", 7)) return "invalid_image_url";
        u = comma + 1;
        n -= hn + 1;
    } else if (starts(u, n, "http://") || starts(u, n, "https://")) {
        return "invalid_image_url";
    }
    if (model_b64(u, n, img, img_len)) return "invalid_base64";
    if (!has_signature(*img, *img_len)) {
        free(*img);
        *img = NULL;
        return "image_decode_failed";
    }
    return NULL;
}

/* Run a body through api_parse and compare with the model's outcome. */
static void check_body(endpoint ep, json_t *body, const char *want, const char *param, const uint8_t *img,
                       size_t img_len) {
    char *text = json_dumps(body, 0);
    if (!text) return; /* out of memory */
    job *j = job_new(ep);
    FUZZ_CHECK(j != NULL, "job_new");
    api_defaults d = {0};
    char *err = NULL;
    int st = api_parse(j, text, strlen(text), &d, &err);
    if (!want) {
        FUZZ_CHECK(st == 0, "%s: refused what the rules accept: %s", endpoint_name(ep), err ? err : "(no body)");
        FUZZ_CHECK(j->image && j->image_len == img_len && !memcmp(j->image, img, img_len),
                   "%s: decoded %zu bytes, the model %zu", endpoint_name(ep), j->image_len, img_len);
    } else {
        FUZZ_CHECK(st == 400 && err, "%s: status %d where the rules say %s", endpoint_name(ep), st, want);
        json_t *e = json_loads(err, 0, NULL);
        json_t *eo = json_object_get(e, "error");
        const char *code = json_string_value(json_object_get(eo, "code"));
        const char *par = json_string_value(json_object_get(eo, "param"));
        FUZZ_CHECK(code && !strcmp(code, want), "%s: %s where the rules say %s", endpoint_name(ep), err, want);
        FUZZ_CHECK(par && !strcmp(par, param), "%s: param in %s", endpoint_name(ep), err);
        json_decref(e);
    }
    free(err);
    job_unref(j);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* 1. base64_decode against the model decoder. */
    unsigned char *got = NULL;
    size_t got_len = 0;
    uint8_t *want = NULL;
    size_t want_len = 0;
    int rc = base64_decode((const char *)data, size, &got, &got_len);
    int mrc = model_b64(data, size, &want, &want_len);
    FUZZ_CHECK(rc == mrc, "base64_decode returned %d, the model %d", rc, mrc);
    if (!rc) {
        FUZZ_CHECK(got_len == want_len && !memcmp(got, want, got_len), "base64: %zu bytes, the model %zu bytes",
                   got_len, want_len);
        free(got);
        free(want);
    }

    /* 2. The same bytes as an image URL, in a caption and in a chat request.
     * JSON strings are UTF-8 without NUL (api_parse reads bodies strictly), so
     * other inputs stop here. */
    if (memchr(data, 0, size) || !fuzz_utf8_ok(data, size)) return 0;
    json_t *url = json_stringn((const char *)data, size);
    if (!url) return 0;
    uint8_t *img = NULL;
    size_t img_len = 0;
    const char *outcome = model_url(data, size, &img, &img_len);

    json_t *cap = json_pack("{sO}", "image_url", url);
    if (cap) check_body(EP_CAPTION, cap, outcome, "image_url", img, img_len);
    json_decref(cap);

    json_t *chat = json_pack("{s[{ss s[{ssss}{ss s{sO}}]}]}", "messages", "role", "user", "content", "type", "text",
                             "text", "What is this?", "type", "image_url", "image_url", "url", url);
    if (chat) check_body(EP_CHAT, chat, outcome, "messages", img, img_len);
    json_decref(chat);

    json_decref(url);
    free(img);
    return 0;
}
