/*
 * fuzz_api.c — the REST request bodies of `albedo serve`: api_parse
 * (tools/serve_api.c) on arbitrary bytes for every skill route and the chat
 * route, exactly as an HTTP thread calls it once a body is complete.
 *
 * serve_api.c is compiled into this target (included below) rather than
 * linked, so that its static helpers are instrumented and reachable as they
 * are in the server; it needs only the library, the metrics counters
 * (serve_metrics.c) and a stub for the one microhttpd call it makes.
 *
 * Checks, besides the sanitizers:
 *   - the status is 0 or 400, nothing else;
 *   - a refusal has an error body that is valid UTF-8 JSON of exactly the
 *     documented shape {"error": {"message", "type", "param", "code"}} with a
 *     known code, and a body that is not a JSON object is refused as
 *     invalid_json (and only such a body);
 *   - an accepted body gives a request within the bounds the library
 *     validates (temperature, top_p, max_tokens, max_objects, spatial
 *     references), a question or object without NUL bytes that equals the
 *     body's, an image whose bytes start with a known signature, a stream flag
 *     only where streams exist, and a request id.
 *
 * Input: byte 0 picks the route (low 3 bits, modulo 5) and which server
 * defaults (--default-*) are set (bits 3-6); the rest is the body.
 */
#include "serve_api.c"

#include "fuzz.h"

/* serve_api.c wakes suspended connections through serve.c; no connection is
 * ever suspended here. */
void serve_resume_connection(struct MHD_Connection *c) {
    (void)c;
    abort();
}

static const char *const known_codes[] = {"invalid_json",        "missing_field",     "invalid_type",
                                          "invalid_value",       "invalid_image_url", "invalid_base64",
                                          "image_decode_failed", "out_of_memory"};

/* The error body of a refusal: valid UTF-8 JSON of the documented shape.
 * Returns its code (owned by the caller: free). */
static char *check_error_body(const char *body, int status) {
    FUZZ_CHECK(body != NULL, "status %d without an error body", status);
    FUZZ_CHECK(fuzz_utf8_ok((const uint8_t *)body, strlen(body)), "error body is not UTF-8: %s", body);
    json_error_t je;
    json_t *root = json_loads(body, 0, &je);
    FUZZ_CHECK(root && json_is_object(root) && json_object_size(root) == 1, "error body is not an object: %s (%s)",
               body, je.text);
    json_t *e = json_object_get(root, "error");
    FUZZ_CHECK(json_is_object(e) && json_object_size(e) == 4, "no error object: %s", body);
    json_t *msg = json_object_get(e, "message"), *type = json_object_get(e, "type");
    json_t *param = json_object_get(e, "param"), *code = json_object_get(e, "code");
    FUZZ_CHECK(json_is_string(msg) && json_string_length(msg) > 0, "error without a message: %s", body);
    FUZZ_CHECK(json_is_string(type) && !strcmp(json_string_value(type), "invalid_request_error"), "type of a %d: %s",
               status, body);
    FUZZ_CHECK(json_is_null(param) || json_is_string(param), "param: %s", body);
    FUZZ_CHECK(json_is_string(code), "code: %s", body);
    int known = 0;
    for (size_t i = 0; i < sizeof known_codes / sizeof known_codes[0]; i++)
        known |= !strcmp(json_string_value(code), known_codes[i]);
    FUZZ_CHECK(known, "unknown error code %s", json_string_value(code));
    char *out = strdup(json_string_value(code));
    json_decref(root);
    return out;
}

static void check_request(const job *j, json_t *root) {
    const albedo_request *r = &j->req;
    FUZZ_CHECK(j->request_id[0] != 0, "no request id");
    FUZZ_CHECK(r->temperature >= 0 && r->temperature <= 100, "temperature %g", (double)r->temperature);
    FUZZ_CHECK(r->top_p > 0 && r->top_p <= 1, "top_p %g", (double)r->top_p);
    FUZZ_CHECK(r->max_tokens >= 1 && r->max_tokens <= 1000000, "max_tokens %d", r->max_tokens);
    FUZZ_CHECK(r->max_objects >= 1 && r->max_objects <= 1000000, "max_objects %d", r->max_objects);
    FUZZ_CHECK(r->n_spatial_refs >= 0 && r->n_spatial_refs <= 64, "%d spatial refs", r->n_spatial_refs);
    for (int i = 0; i < r->n_spatial_refs; i++) {
        const albedo_spatial_ref *s = &r->spatial_refs[i];
        FUZZ_CHECK(s->n == 2 || s->n == 4, "spatial ref %d has %d values", i, s->n);
        for (int k = 0; k < s->n; k++) FUZZ_CHECK(s->v[k] >= 0 && s->v[k] <= 1, "spatial ref value %g", s->v[k]);
    }
    /* The image, if any: decoded base64 with a known signature. */
    if (j->image) {
        fuzz_touch(j->image, j->image_len);
        FUZZ_CHECK(is_image(j->image, j->image_len), "accepted an image without a signature");
    }
    switch (j->ep) {
    case EP_CAPTION:
    case EP_DETECT:
    case EP_POINT:
        FUZZ_CHECK(j->image != NULL, "%s accepted without an image", endpoint_name(j->ep));
        FUZZ_CHECK(!j->stream || j->ep == EP_CAPTION, "a stream flag on %s", endpoint_name(j->ep));
        break;
    default: break;
    }
    if (j->ep == EP_DETECT || j->ep == EP_POINT) {
        json_t *o = json_object_get(root, "object");
        FUZZ_CHECK(r->object && json_is_string(o) && strlen(r->object) == json_string_length(o) &&
                       !memcmp(r->object, json_string_value(o), json_string_length(o)),
                   "object differs from the body's");
    }
    if (j->ep == EP_QUERY) {
        json_t *q = json_object_get(root, "question");
        FUZZ_CHECK(r->question && json_is_string(q) && strlen(r->question) == json_string_length(q) &&
                       !memcmp(r->question, json_string_value(q), json_string_length(q)),
                   "question differs from the body's");
    }
    if (j->ep == EP_CHAT) {
        FUZZ_CHECK(r->question && r->question[0], "chat accepted without text");
    }
    if (j->ep != EP_DETECT && j->ep != EP_POINT) {
        json_t *s = json_object_get(root, "stream");
        FUZZ_CHECK(j->stream == (s && json_is_true(s)), "stream flag %d", j->stream);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    static const endpoint eps[5] = {EP_CAPTION, EP_QUERY, EP_DETECT, EP_POINT, EP_CHAT};
    endpoint ep = eps[(data[0] & 7) % 5];
    api_defaults d = {0};
    d.has_temperature = (data[0] >> 3) & 1, d.temperature = 0;
    d.has_max_tokens = (data[0] >> 4) & 1, d.max_tokens = 24;
    d.has_max_objects = (data[0] >> 5) & 1, d.max_objects = 4;
    d.has_top_p = (data[0] >> 6) & 1, d.top_p = 0.9f;
    const char *body = (const char *)data + 1;
    size_t len = size - 1;

    job *j = job_new(ep);
    FUZZ_CHECK(j != NULL, "job_new");
    char *err = (char *)1;
    int st = api_parse(j, body, len, &d, &err);
    FUZZ_CHECK(st == 0 || st == 400, "api_parse status %d", st);

    /* The same body read on its own: only a non-object is invalid_json. */
    json_error_t je;
    json_t *root = json_loadb(body, len, 0, &je);
    int is_object = root && json_is_object(root);
    if (st) {
        char *code = check_error_body(err, st);
        FUZZ_CHECK(!strcmp(code, "invalid_json") == !is_object, "code %s for a body that is%s a JSON object", code,
                   is_object ? "" : " not");
        free(code);
        free(err);
    } else {
        FUZZ_CHECK(err == NULL, "an accepted body with an error");
        FUZZ_CHECK(is_object, "accepted a body that is not a JSON object");
        check_request(j, root);
    }
    json_decref(root);
    job_unref(j);
    return 0;
}
