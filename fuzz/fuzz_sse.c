/*
 * fuzz_sse.c — the response writers of `albedo serve` (tools/serve_api.c):
 * the Server-Sent Events of caption, query and chat streams (on_text, the
 * terminal event of finish_ok, the error event of finish_error), and the
 * plain JSON bodies of the same requests, fed with arbitrary text, model
 * names and error messages.
 *
 * What flows in: the generated text (UTF-8 by the library's contract, never
 * NUL-free by it: see docs/FUZZING.md, so NUL bytes are mapped to spaces
 * here), the response object of albedo_result_json (the real writer, over a
 * zeroed session: it only uses the session's output buffer), the request id,
 * and the client's own "model" string, echoed by chat responses.
 *
 * Checks: a stream is nothing but "data: <payload>\n\n" events; every payload
 * is valid UTF-8 JSON (or the chat's final [DONE]); the chunks concatenate to
 * exactly the text; the terminal event carries request_id, finish_reason,
 * metrics and the reasoning; chat events carry the model and id; an error
 * after the first chunk is an event of the documented shape; plain bodies
 * parse and hold the same text. serve_api.c is compiled in, as in
 * fuzz_api.c.
 *
 * Input: byte 0: bits 0-1 route (caption, query, chat, chat), bit 2 stream,
 * bit 3 reasoning (query), bit 4 finish "length", bit 5 fail after the text
 * (with the last part as the error message); then NUL-separated parts: the
 * model name, the reasoning text when bit 3 is set, the text chunks.
 */
#include "serve_api.c"

#include "fuzz.h"
#include "session.h"

void serve_resume_connection(struct MHD_Connection *c) {
    (void)c;
    abort();
}

/* Invalid UTF-8 bytes become '?', NUL becomes ' ' (what the library hands
 * the server is UTF-8; its NUL problem is a known, separate issue). */
static char *sanitize(const uint8_t *p, size_t n) {
    char *s = malloc(n + 1);
    if (!s) return NULL;
    for (size_t i = 0; i < n;) {
        size_t k = 1;
        while (k <= 4 && i + k <= n && !fuzz_utf8_ok(p + i, k)) k++;
        if (k > 4 || i + k > n) {
            s[i] = p[i] ? '?' : ' ';
            i++;
        } else {
            memcpy(s + i, p + i, k);
            if (k == 1 && !p[i]) s[i] = ' ';
            i += k;
        }
    }
    s[n] = 0;
    return s;
}

static json_t *parse_payload(const char *p, size_t n) {
    FUZZ_CHECK(fuzz_utf8_ok((const uint8_t *)p, n), "payload is not UTF-8: %.*s", (int)n, p);
    json_error_t je;
    json_t *v = json_loadb(p, n, 0, &je);
    FUZZ_CHECK(v && json_is_object(v), "payload is not a JSON object: %.*s (%s)", (int)n, p, je.text);
    return v;
}

static void check_error_object(json_t *e) {
    FUZZ_CHECK(json_is_object(e) && json_is_string(json_object_get(e, "message")) &&
                   json_is_string(json_object_get(e, "type")) && json_is_string(json_object_get(e, "code")),
               "malformed error object");
}

/* Split a stream into its payloads. */
static size_t split_events(const sbuf *sse, const char **pl, size_t *pn, size_t cap) {
    size_t k = 0, i = 0;
    while (i < sse->len) {
        FUZZ_CHECK(sse->len - i > 6 && !memcmp(sse->p + i, "data: ", 6), "an event without 'data: ' at %zu", i);
        const char *start = sse->p + i + 6;
        const char *end = memchr(start, '\n', sse->len - (size_t)(start - sse->p));
        FUZZ_CHECK(end && (size_t)(end - sse->p) + 1 < sse->len && end[1] == '\n',
                   "an event not ended by a blank line");
        FUZZ_CHECK(k < cap, "too many events");
        pl[k] = start;
        pn[k] = (size_t)(end - start);
        k++;
        i = (size_t)(end - sse->p) + 2;
    }
    return k;
}

static const char *str_at(json_t *o, const char *path1, const char *path2) {
    json_t *v = json_object_get(o, path1);
    if (path2) v = json_object_get(v, path2);
    return json_string_value(v);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int route = data[0] & 3, stream = (data[0] >> 2) & 1, reasoning = (data[0] >> 3) & 1 && route == 1;
    int length = (data[0] >> 4) & 1, fail = (data[0] >> 5) & 1;
    endpoint ep = route == 0 ? EP_CAPTION : route == 1 ? EP_QUERY : EP_CHAT;

    /* Parts. */
    enum { MAX_PARTS = 64 };
    char *part[MAX_PARTS];
    int np = 0;
    for (size_t i = 1; i <= size && np < MAX_PARTS;) {
        const uint8_t *z = memchr(data + i, 0, size - i);
        size_t n = z ? (size_t)(z - (data + i)) : size - i;
        if (!(part[np] = sanitize(data + i, n))) goto out;
        np++;
        i += n + 1;
    }
    int pi = 0;
    const char *model = pi < np ? part[pi++] : "";
    const char *reason_text = reasoning ? (pi < np ? part[pi++] : "") : NULL;
    const char *errmsg = fail && np > pi ? part[np - 1] : "the engine failed";
    int n_chunks = np - pi - (fail && np > pi);

    /* The request, through api_parse as the server builds it. */
    json_t *body = ep == EP_CAPTION ? json_pack("{ss sb}", "image_url", "iVBORw0KGgo=", "stream", stream)
                   : ep == EP_QUERY
                       ? json_pack("{ss sb sb}", "question", "hi", "stream", stream, "reasoning", reasoning)
                       : json_pack("{s[{ss ss}] ss sb}", "messages", "role", "user", "content", "hi", "model", model,
                                   "stream", stream);
    char *text = body ? json_dumps(body, 0) : NULL;
    json_decref(body);
    if (!text) goto out;
    job *j = job_new(ep);
    char *err = NULL;
    api_defaults d = {0};
    int st = api_parse(j, text, strlen(text), &d, &err);
    free(text);
    FUZZ_CHECK(st == 0, "api_parse refused a valid body: %s", err ? err : "");

    /* Generate: the chunks through on_text, then the end. */
    sbuf full = {0};
    for (int c = 0; c < n_chunks; c++) {
        const char *t = part[pi + c];
        if (!t[0]) continue; /* the library never reports empty pieces */
        FUZZ_CHECK(on_text(j, t, strlen(t)) == 0, "on_text asked to stop");
        sbuf_puts(&full, t);
    }
    albedo_session *fake = calloc(1, sizeof *fake);
    albedo_result res = {0};
    res.skill = ep == EP_CAPTION ? ALBEDO_SKILL_CAPTION : ALBEDO_SKILL_QUERY;
    res.text = full.p ? full.p : "";
    res.reasoning = reason_text;
    res.text_len = full.p ? full.len : 0;
    res.reasoning_len = reason_text ? strlen(reason_text) : 0;
    res.finish = length ? ALBEDO_FINISH_LENGTH : ALBEDO_FINISH_STOP;
    res.metrics.input_tokens = 741;
    res.metrics.output_tokens = n_chunks;
    const char *rjson = fake ? albedo_result_json(fake, &res, 1) : NULL;
    if (!rjson) { /* out of memory */
        if (fake) free(fake->res.json.p);
        free(fake);
        sbuf_free(&full);
        job_unref(j);
        goto out;
    }
    if (fail)
        finish_error(j, 500, api_error_body(500, "processing_error", NULL, "%s", errmsg));
    else
        finish_ok(j, &res, rjson);

    /* Read back. */
    const char *want_reason = reason_text;
    const char *fin = length ? "length" : "stop";
    if (stream && j->sse.len) {
        FUZZ_CHECK(j->status == 200 || fail, "stream ended with status %d", j->status);
        enum { MAX_EV = 1024 };
        static const char *pl[MAX_EV];
        static size_t pn[MAX_EV];
        size_t ne = split_events(&j->sse, pl, pn, MAX_EV);
        sbuf got = {0};
        size_t k = 0;
        if (ep == EP_CHAT) {
            char id[128];
            snprintf(id, sizeof id, "chatcmpl-%s", j->request_id);
            int done = 0, finished = 0;
            for (; k < ne; k++) {
                FUZZ_CHECK(!done, "events after [DONE]");
                if (pn[k] == 6 && !memcmp(pl[k], "[DONE]", 6)) {
                    done = 1;
                    continue;
                }
                json_t *ev = parse_payload(pl[k], pn[k]);
                if (json_object_get(ev, "error")) {
                    FUZZ_CHECK(fail, "an error event in a stream that did not fail");
                    check_error_object(json_object_get(ev, "error"));
                    finished = 1;
                } else {
                    FUZZ_CHECK(!finished, "a chunk after the finish");
                    const char *m = str_at(ev, "model", NULL);
                    FUZZ_CHECK(m && (!strcmp(m, j->model_name) ||
                                     !fuzz_utf8_ok((const uint8_t *)j->model_name, strlen(j->model_name))),
                               "model %s, sent %s", m ? m : "(none)", j->model_name);
                    FUZZ_CHECK(!strcmp(str_at(ev, "id", NULL), id), "id");
                    json_t *ch = json_array_get(json_object_get(ev, "choices"), 0);
                    json_t *delta = json_object_get(ch, "delta");
                    FUZZ_CHECK(json_is_object(delta), "no delta");
                    if (k == 0)
                        FUZZ_CHECK(!strcmp(str_at(delta, "role", NULL), "assistant"), "first chunk without role");
                    const char *c = str_at(delta, "content", NULL);
                    if (c) sbuf_put(&got, c, strlen(c));
                    const char *f = str_at(ch, "finish_reason", NULL);
                    if (f) {
                        FUZZ_CHECK(!fail && !strcmp(f, fin), "finish_reason %s", f);
                        finished = 1;
                    }
                }
                json_decref(ev);
            }
            FUZZ_CHECK(done && finished, "chat stream without its end");
        } else {
            int ended = 0;
            for (; k < ne; k++) {
                FUZZ_CHECK(!ended, "events after the terminal one");
                json_t *ev = parse_payload(pl[k], pn[k]);
                json_t *completed = json_object_get(ev, "completed");
                FUZZ_CHECK(json_is_boolean(completed), "event without completed");
                const char *c = str_at(ev, "chunk", NULL);
                FUZZ_CHECK(c, "event without chunk");
                if (json_is_false(completed)) {
                    sbuf_put(&got, c, strlen(c));
                } else {
                    ended = 1;
                    FUZZ_CHECK(!c[0], "terminal event with text");
                    if (fail) {
                        check_error_object(json_object_get(ev, "error"));
                    } else {
                        FUZZ_CHECK(!strcmp(str_at(ev, "request_id", NULL), j->request_id), "request_id");
                        FUZZ_CHECK(!strcmp(str_at(ev, "finish_reason", NULL), fin), "finish_reason");
                        FUZZ_CHECK(json_is_object(json_object_get(ev, "metrics")), "metrics");
                        const char *r = str_at(ev, "reasoning", "text");
                        FUZZ_CHECK(want_reason ? r && !strcmp(r, want_reason) : !json_object_get(ev, "reasoning"),
                                   "reasoning");
                    }
                }
                json_decref(ev);
            }
            FUZZ_CHECK(ended, "stream without its terminal event");
        }
        FUZZ_CHECK(got.len == full.len && (!got.len || !memcmp(got.p, full.p, got.len)),
                   "the chunks make %zu bytes, the text %zu", got.len, full.len);
        sbuf_free(&got);
    } else {
        /* A plain body: the response, or the error (also a stream's error
         * before its first chunk). */
        FUZZ_CHECK(j->done && j->body && (fail || !stream), "no body, or a stream without events");
        FUZZ_CHECK(j->status == (fail ? 500 : 200), "status %d", j->status);
        json_t *b = parse_payload(j->body, strlen(j->body));
        if (fail) {
            FUZZ_CHECK(j->status == 500, "status %d", j->status);
            check_error_object(json_object_get(b, "error"));
        } else if (ep == EP_CHAT) {
            json_t *ch = json_array_get(json_object_get(b, "choices"), 0);
            const char *c = str_at(ch, "message", "content");
            FUZZ_CHECK(c && !strcmp(c, res.text), "chat content");
            FUZZ_CHECK(!strcmp(str_at(b, "model", NULL), j->model_name) ||
                           !fuzz_utf8_ok((const uint8_t *)j->model_name, strlen(j->model_name)),
                       "chat model");
            FUZZ_CHECK(!strcmp(str_at(ch, "finish_reason", NULL), fin), "chat finish_reason");
        } else {
            const char *c = str_at(b, ep == EP_CAPTION ? "caption" : "answer", NULL);
            FUZZ_CHECK(c && !strcmp(c, res.text), "text");
            FUZZ_CHECK(!strcmp(str_at(b, "request_id", NULL), j->request_id), "request_id");
            const char *r = str_at(b, "reasoning", "text");
            FUZZ_CHECK(want_reason ? r && !strcmp(r, want_reason) : !json_object_get(b, "reasoning"), "reasoning");
        }
        json_decref(b);
    }
    free(fake->res.json.p);
    free(fake);
    sbuf_free(&full);
    job_unref(j);
out:
    for (int i = 0; i < np; i++) free(part[i]);
    return 0;
}
