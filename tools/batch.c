/*
 * batch.c — `albedo batch`: many requests in one process, one JSON line in,
 * one JSON line out, in the spirit of Moondream's Batch API. The model loads
 * once and an image is encoded once for all consecutive lines that name it,
 * so captioning a folder or asking several questions per image costs one
 * vision pass per image.
 *
 *   {"id": "a", "skill": "query", "image": "photo.jpg", "question": "...",
 *    "reasoning": false, "spatial_refs": [[0.5, 0.5]], "settings": {...}}
 *   → {"id": "a", "status": "ok", "result": {"answer": ...}}
 *   → {"id": "b", "status": "error", "error": {"code": ..., "message": ...}}
 */
#define _POSIX_C_SOURCE 200809L
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "albedo.h"
#include "batch.h"

static void print_error(json_t *id, const char *code, const char *msg) {
    json_t *o =
        json_pack("{s:O?, s:s, s:{s:s, s:s}}", "id", id, "status", "error", "error", "code", code, "message", msg);
    char *s = json_dumps(o, JSON_COMPACT);
    if (s) puts(s);
    free(s);
    json_decref(o);
    fflush(stdout);
}

/* Fill r from one line; returns an error message or NULL. */
static const char *parse_line(const albedo_model *m, json_t *o, albedo_request *r, albedo_spatial_ref *refs, int cap) {
    const char *skill = json_string_value(json_object_get(o, "skill"));
    if (!skill) return "\"skill\" is missing (caption, query, detect or point)";
    if (!strcmp(skill, "caption"))
        *r = albedo_model_request_default(m, ALBEDO_SKILL_CAPTION);
    else if (!strcmp(skill, "query"))
        *r = albedo_model_request_default(m, ALBEDO_SKILL_QUERY);
    else if (!strcmp(skill, "detect"))
        *r = albedo_model_request_default(m, ALBEDO_SKILL_DETECT);
    else if (!strcmp(skill, "point"))
        *r = albedo_model_request_default(m, ALBEDO_SKILL_POINT);
    else
        return "unknown skill (caption, query, detect or point)";
    json_t *v;
    if ((v = json_object_get(o, "length"))) {
        const char *l = json_string_value(v);
        if (!l) return "\"length\" must be a string";
        if (!strcmp(l, "short"))
            r->length = ALBEDO_LENGTH_SHORT;
        else if (!strcmp(l, "normal"))
            r->length = ALBEDO_LENGTH_NORMAL;
        else if (!strcmp(l, "long"))
            r->length = ALBEDO_LENGTH_LONG;
        else
            return "\"length\" must be short, normal or long";
    }
    if ((v = json_object_get(o, "question")) && !(r->question = json_string_value(v)))
        return "\"question\" must be a string";
    if ((v = json_object_get(o, "object")) && !(r->object = json_string_value(v))) return "\"object\" must be a string";
    if ((v = json_object_get(o, "reasoning"))) {
        if (!json_is_boolean(v)) return "\"reasoning\" must be true or false";
        r->reasoning = json_is_true(v);
    }
    if ((v = json_object_get(o, "spatial_refs"))) {
        if (!json_is_array(v) || (int)json_array_size(v) > cap)
            return "\"spatial_refs\" must be a list of [x, y] or [x1, y1, x2, y2]";
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) {
            size_t n = json_array_size(x);
            if (!json_is_array(x) || (n != 2 && n != 4))
                return "\"spatial_refs\" must be a list of [x, y] or [x1, y1, x2, y2]";
            refs[i].n = (int)n;
            for (size_t k = 0; k < n; k++) {
                json_t *num = json_array_get(x, k);
                if (!json_is_number(num)) return "\"spatial_refs\" values must be numbers";
                refs[i].v[k] = json_number_value(num);
            }
        }
        r->spatial_refs = refs;
        r->n_spatial_refs = (int)json_array_size(v);
    }
    json_t *st = json_object_get(o, "settings");
    if (st && !json_is_object(st)) return "\"settings\" must be an object";
    if ((v = json_object_get(st, "temperature"))) {
        if (!json_is_number(v)) return "settings.temperature must be a number";
        r->temperature = (float)json_number_value(v);
    }
    if ((v = json_object_get(st, "top_p"))) {
        if (!json_is_number(v)) return "settings.top_p must be a number";
        r->top_p = (float)json_number_value(v);
    }
    if ((v = json_object_get(st, "max_tokens"))) {
        if (!json_is_integer(v)) return "settings.max_tokens must be an integer";
        r->max_tokens = (int)json_integer_value(v);
    }
    if ((v = json_object_get(st, "max_objects"))) {
        if (!json_is_integer(v)) return "settings.max_objects must be an integer";
        r->max_objects = (int)json_integer_value(v);
    }
    if ((v = json_object_get(st, "seed"))) {
        if (!json_is_integer(v)) return "settings.seed must be an integer";
        r->seed = (uint64_t)json_integer_value(v);
    }
    return NULL;
}

int albedo_batch_run(albedo_model *m, FILE *in) {
    albedo_session *s = NULL;
    if (albedo_session_new(m, &s) != ALBEDO_OK) {
        fprintf(stderr, "albedo: %s\n", albedo_last_error());
        return 1;
    }
    char *line = NULL, *cur_path = NULL;
    size_t cap = 0;
    albedo_image *img = NULL;
    int failures = 0;
    for (;;) {
        ssize_t n = getline(&line, &cap, in);
        if (n < 0) break;
        if (n == 0 || strspn(line, " \t\r\n") == (size_t)n) continue;
        json_error_t je;
        json_t *o = json_loadb(line, (size_t)n, 0, &je);
        if (!json_is_object(o)) {
            print_error(NULL, "invalid_request", "line is not a JSON object");
            json_decref(o);
            failures++;
            continue;
        }
        json_t *id = json_object_get(o, "id");
        albedo_request r;
        albedo_spatial_ref refs[64];
        const char *err = parse_line(m, o, &r, refs, 64);
        const char *path = json_string_value(json_object_get(o, "image"));
        if (!err && path && (!cur_path || strcmp(cur_path, path))) {
            albedo_image_free(img);
            img = NULL;
            free(cur_path);
            cur_path = NULL;
            if (albedo_image_encode_file(s, path, &img) != ALBEDO_OK) {
                print_error(id, "image_decode_failed", albedo_session_error(s));
                json_decref(o);
                failures++;
                continue;
            }
            cur_path = strdup(path);
        }
        if (err) {
            print_error(id, "invalid_request", err);
            failures++;
        } else {
            r.image = path ? img : NULL;
            const albedo_result *res;
            if (albedo_session_run(s, &r, &res) != ALBEDO_OK) {
                print_error(id, "processing_error", albedo_session_error(s));
                failures++;
            } else {
                json_error_t je2;
                json_t *result = json_loads(albedo_result_json(s, res, 1), 0, &je2);
                json_t *out = json_pack("{s:O?, s:s, s:o}", "id", id, "status", "ok", "result", result);
                char *txt = json_dumps(out, JSON_COMPACT | JSON_REAL_PRECISION(17));
                if (txt) puts(txt);
                free(txt);
                json_decref(out);
                fflush(stdout);
            }
        }
        json_decref(o);
    }
    free(line);
    free(cur_path);
    albedo_image_free(img);
    albedo_session_free(s);
    return failures ? 1 : 0;
}
