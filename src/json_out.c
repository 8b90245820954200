/*
 * json_out.c — the REST API's response objects (spec/api.md §2), written by
 * the library so that the CLI, the server and the Python package print
 * exactly the same thing. Numbers use the shortest form that reads back to
 * the same double, as Python's json module does.
 */
#include <stdio.h>
#include <stdlib.h>

#include "session.h"

int json_put_string(buf *b, const char *s, size_t n);
int json_put_double(buf *b, double v);

int json_put_string(buf *b, const char *s, size_t n) {
    if (buf_put(b, "\"", 1)) return -1;
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        const char *esc = NULL;
        char tmp[8];
        switch (ch) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default:
            if (ch < 0x20 || ch == 0x7f) {
                snprintf(tmp, sizeof tmp, "\\u%04x", ch);
                esc = tmp;
            }
        }
        if (esc) {
            if (buf_put(b, s + i - run, run) || buf_put(b, esc, strlen(esc))) return -1;
            run = 0;
        } else {
            run++;
        }
    }
    if (buf_put(b, s + n - run, run)) return -1;
    return buf_put(b, "\"", 1);
}

int json_put_double(buf *b, double v) {
    char tmp[40];
    if (v != v || v > 1e308 || v < -1e308) return buf_put(b, "null", 4);
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*g", prec, v);
        if (strtod(tmp, NULL) == v) break;
    }
    /* "1" → "1.0" so that the value stays a float for typed readers */
    if (!strpbrk(tmp, ".eEn")) strcat(tmp, ".0");
    return buf_put(b, tmp, strlen(tmp));
}

albedo_status result_to_json(albedo_session *s, const albedo_result *res, int metrics, const char **out) {
    buf *b = &s->res.json;
    b->len = 0;
    int bad = 0;
    const char *text = res->text ? res->text : "";
    switch (res->skill) {
    case ALBEDO_SKILL_CAPTION:
        bad |= buf_put(b, "{\"caption\": ", 12) | json_put_string(b, text, res->text ? res->text_len : 0);
        break;
    case ALBEDO_SKILL_QUERY:
        bad |= buf_put(b, "{\"answer\": ", 11) | json_put_string(b, text, res->text ? res->text_len : 0);
        if (res->reasoning) {
            bad |=
                buf_put(b, ", \"reasoning\": {\"text\": ", 24) | json_put_string(b, res->reasoning, res->reasoning_len);
            bad |= buf_put(b, ", \"grounding\": [", 16);
            for (int i = 0; i < res->n_grounding; i++) {
                const albedo_grounding *g = &res->grounding[i];
                bad |= buf_printf(b, "%s{\"start_idx\": %d, \"end_idx\": %d, \"points\": [", i ? ", " : "",
                                  g->start_idx, g->end_idx);
                for (int k = 0; k < g->n_points; k++) {
                    bad |= buf_put(b, k ? ", [" : "[", k ? 3 : 1) | json_put_double(b, g->points[k].x);
                    bad |= buf_put(b, ", ", 2) | json_put_double(b, g->points[k].y) | buf_put(b, "]", 1);
                }
                bad |= buf_put(b, "]}", 2);
            }
            bad |= buf_put(b, "]}", 2);
        }
        break;
    case ALBEDO_SKILL_DETECT:
        bad |= buf_put(b, "{\"objects\": [", 13);
        for (int i = 0; i < res->n_objects; i++) {
            const albedo_box *o = &res->objects[i];
            bad |= buf_put(b, i ? ", {\"x_min\": " : "{\"x_min\": ", i ? 12 : 10) | json_put_double(b, o->x_min);
            bad |= buf_put(b, ", \"y_min\": ", 11) | json_put_double(b, o->y_min);
            bad |= buf_put(b, ", \"x_max\": ", 11) | json_put_double(b, o->x_max);
            bad |= buf_put(b, ", \"y_max\": ", 11) | json_put_double(b, o->y_max) | buf_put(b, "}", 1);
        }
        bad |= buf_put(b, "]", 1);
        break;
    case ALBEDO_SKILL_POINT:
        bad |= buf_put(b, "{\"points\": [", 12);
        for (int i = 0; i < res->n_points; i++) {
            bad |= buf_put(b, i ? ", {\"x\": " : "{\"x\": ", i ? 8 : 6) | json_put_double(b, res->points[i].x);
            bad |= buf_put(b, ", \"y\": ", 7) | json_put_double(b, res->points[i].y) | buf_put(b, "}", 1);
        }
        bad |= buf_put(b, "]", 1);
        break;
    }
    if (metrics) {
        const albedo_metrics *m = &res->metrics;
        bad |=
            buf_printf(b,
                       ", \"finish_reason\": \"%s\", \"metrics\": {\"input_tokens\": %d, \"output_tokens\": %d, "
                       "\"cached_tokens\": %d, \"prefill_time_ms\": %.3f, \"decode_time_ms\": %.3f, \"ttft_ms\": %.3f, "
                       "\"queue_time_ms\": %.3f}",
                       res->finish == ALBEDO_FINISH_LENGTH ? "length" : "stop", m->input_tokens, m->output_tokens,
                       m->cached_tokens, m->prefill_time_ms, m->decode_time_ms, m->ttft_ms, m->queue_time_ms);
    }
    bad |= buf_put(b, "}", 1);
    if (bad) return ALBEDO_ERR_OUT_OF_MEMORY;
    *out = b->p;
    return ALBEDO_OK;
}
