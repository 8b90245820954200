/*
 * albedo.c — the command-line tool. A client of the library: it includes
 * only albedo.h.
 *
 *   albedo caption IMAGE [--length short|normal|long]
 *   albedo query   [IMAGE] QUESTION [--reasoning] [--spatial-refs JSON]
 *   albedo detect  IMAGE OBJECT [--max-objects N]
 *   albedo point   IMAGE OBJECT
 *   albedo bench   (--synthetic md2|md3 | --model DIR) [--threads N] [--weights bf16|q8|q4|fp8] [--kv-dtype fp8] [--json]
 *   albedo synth   --preset md2|md2-small|md3|md3-small --out DIR [--seed N] [--legacy-f16] [--shard-mb N]
 *   albedo tokenize --model DIR TEXT
 *   albedo quantize --model DIR --weights q8|q4 --out DIR2
 *
 * Options are named after the REST API's fields (spec/api.md §2).
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "albedo.h"
#include "batch.h"
#include "bench_chartqa.h"
#include "serve.h"

typedef struct opts {
    const char *cmd;
    const char *model, *image, *question, *object, *length, *spatial_refs;
    const char *backend, *precision, *synthetic, *preset, *out, *tokenizer, *weights, *kv_dtype;
    int reasoning, stream, json, threads, legacy_f16, repeats, max_context, shard_mb;
    float temperature, top_p;
    int max_tokens, max_objects;
    int has_temperature, has_top_p, has_max_tokens, has_max_objects;
    unsigned long long seed;
    int n_pos;
    const char *pos[4];
} opts;

static void usage(FILE *f) {
    fprintf(f,
            "albedo %s — Moondream inference\n\n"
            "usage:\n"
            "  albedo caption IMAGE [--length short|normal|long]\n"
            "  albedo query [IMAGE] QUESTION [--reasoning] [--spatial-refs '[[x,y],[x1,y1,x2,y2]]']\n"
            "  albedo detect IMAGE OBJECT\n"
            "  albedo point IMAGE OBJECT\n"
            "  albedo bench (--synthetic md2|md3 | --model DIR) [--threads N] [--repeats N] [--weights W]\n"
            "        [--kv-dtype D] [--json]\n"
            "                       stage timings and peak resident memory\n"
            "  albedo bench chartqa (--synthetic md2|md3 | --model DIR) [--batch 1,4,16,64] [--mode direct,cot]\n"
            "        [--images N] [--threads N] [--backend NAME] [--weights W] [--kv-dtype D] [--warmup N] [--json]\n"
            "        [--tokenizer FILE]   (with --synthetic: that tokenizer instead of the byte-level one)\n"
            "  albedo synth --preset md2|md2-small|md3|md3-small --out DIR [--seed N] [--legacy-f16]\n"
            "        [--tokenizer FILE] [--shard-mb N]\n"
            "  albedo batch [FILE.jsonl|-] --model DIR   one JSON request per line, one result per line\n"
            "  albedo serve [--host H] [--port 2020] [--model DIR]   Moondream REST API (docs/SERVER.md)\n"
            "  albedo pull moondream2|moondream3|moondream3.1|owner/repo@revision\n"
            "                       download into the Hugging Face cache\n"
            "  albedo tokenize --model DIR TEXT\n"
            "  albedo quantize --model DIR --weights q8|q4 --out DIR2   store quantised weights\n\n"
            "options:\n"
            "  --model DIR          model directory (config.json, model.safetensors or its shards,\n"
            "                       tokenizer.json), or moondream2, moondream3, moondream3.1,\n"
            "                       owner/repo[@rev] (downloaded as by pull); default $ALBEDO_MODEL\n"
            "  --image PATH         image file (JPEG, PNG, WebP, GIF); or the first positional argument\n"
            "  --question TEXT      --object TEXT      --length short|normal|long\n"
            "  --reasoning          think before answering (query), with grounded points\n"
            "  --spatial-refs JSON  points [x,y] and boxes [x_min,y_min,x_max,y_max] for query\n"
            "  --temperature T      --top-p P      --max-tokens N      --max-objects N      --seed N\n"
            "  --threads N          CPU threads (default: all cores)\n"
            "  --backend NAME       auto, ref, generic, avx2, avx512, neon; cuda[:N] (GPU build)\n"
            "  --precision f32|bf16 activation precision of matrix products (default f32)\n"
            "  --weights bf16|q8|q4|fp8  text decoder weights, MoE experts included (default bf16: as\n"
            "                       stored; q8/q4 on the CPU, docs/QUANT.md); fp8: Moondream 3's experts as\n"
            "                       e4m3 (--backend cuda on an sm_89+ GPU; docs/CUDA.md)\n"
            "  --max-context N      KV-cache positions (default: the model's)\n"
            "  --kv-dtype auto|fp8  KV cache: the backend's own (default), or e4m3 with half the bytes of\n"
            "                       bf16 (CPU backends, docs/QUANT.md; cuda on sm_89+ GPUs, docs/CUDA.md)\n"
            "  --stream             print text as it is generated\n"
            "  --json               print the REST API's response object\n",
            albedo_version());
}

static int parse_int(const char *s, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < -2147483647L || v > 2147483647L) return -1;
    *out = (int)v;
    return 0;
}

static int parse_float(const char *s, float *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s) return -1;
    *out = (float)v;
    return 0;
}

static int parse_args(int argc, char **argv, opts *o) {
    memset(o, 0, sizeof *o);
    o->repeats = 3;
    if (argc < 2) return -1;
    o->cmd = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define STR(name, field)                                                        \
    if (!strcmp(a, name)) {                                                     \
        if (!v) return fprintf(stderr, "albedo: %s needs a value\n", name), -1; \
        o->field = v;                                                           \
        i++;                                                                    \
        continue;                                                               \
    }
#define INT(name, field, flag)                                                                                \
    if (!strcmp(a, name)) {                                                                                   \
        if (!v || parse_int(v, &o->field)) return fprintf(stderr, "albedo: %s needs an integer\n", name), -1; \
        flag;                                                                                                 \
        i++;                                                                                                  \
        continue;                                                                                             \
    }
#define FLT(name, field, flag)                                                                                \
    if (!strcmp(a, name)) {                                                                                   \
        if (!v || parse_float(v, &o->field)) return fprintf(stderr, "albedo: %s needs a number\n", name), -1; \
        flag;                                                                                                 \
        i++;                                                                                                  \
        continue;                                                                                             \
    }
        STR("--model", model)
        STR("--image", image)
        STR("--question", question)
        STR("--object", object)
        STR("--length", length)
        STR("--spatial-refs", spatial_refs)
        STR("--backend", backend)
        STR("--precision", precision)
        STR("--synthetic", synthetic)
        STR("--preset", preset)
        STR("--out", out)
        STR("--tokenizer", tokenizer)
        STR("--weights", weights)
        STR("--kv-dtype", kv_dtype)
        INT("--threads", threads, (void)0)
        INT("--repeats", repeats, (void)0)
        INT("--shard-mb", shard_mb, (void)0)
        INT("--max-context", max_context, (void)0)
        INT("--max-tokens", max_tokens, o->has_max_tokens = 1)
        INT("--max-objects", max_objects, o->has_max_objects = 1)
        FLT("--temperature", temperature, o->has_temperature = 1)
        FLT("--top-p", top_p, o->has_top_p = 1)
#undef STR
#undef INT
#undef FLT
        if (!strcmp(a, "--seed")) {
            char *end;
            if (!v) return fprintf(stderr, "albedo: --seed needs a value\n"), -1;
            errno = 0;
            o->seed = strtoull(v, &end, 10);
            if (errno || *end) return fprintf(stderr, "albedo: --seed needs an integer\n"), -1;
            i++;
            continue;
        }
        if (!strcmp(a, "--reasoning")) {
            o->reasoning = 1;
            continue;
        }
        if (!strcmp(a, "--stream")) {
            o->stream = 1;
            continue;
        }
        if (!strcmp(a, "--json")) {
            o->json = 1;
            continue;
        }
        if (!strcmp(a, "--legacy-f16")) {
            o->legacy_f16 = 1;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) return -1;
        if (a[0] == '-' && a[1] == '-') return fprintf(stderr, "albedo: unknown option %s\n", a), -1;
        if (o->n_pos == 4) return fprintf(stderr, "albedo: too many arguments\n"), -1;
        o->pos[o->n_pos++] = a;
    }
    return 0;
}

/* "[[0.25,0.5],[0.1,0.2,0.6,0.7]]" → refs; returns count or -1. */
static int parse_refs(const char *s, albedo_spatial_ref *refs, int cap) {
    const char *p = s;
    int n = 0;
    while (*p == ' ') p++;
    if (*p++ != '[') return -1;
    while (*p == ' ') p++;
    if (*p == ']') return 0;
    for (;;) {
        while (*p == ' ') p++;
        if (*p++ != '[' || n == cap) return -1;
        albedo_spatial_ref *r = &refs[n++];
        r->n = 0;
        for (;;) {
            char *end;
            double v = strtod(p, &end);
            if (end == p || r->n == 4) return -1;
            r->v[r->n++] = v;
            p = end;
            while (*p == ' ') p++;
            if (*p == ',') {
                p++;
                continue;
            }
            if (*p == ']') {
                p++;
                break;
            }
            return -1;
        }
        while (*p == ' ') p++;
        if (*p == ',') {
            p++;
            continue;
        }
        if (*p == ']') {
            p++;
            break;
        }
        return -1;
    }
    while (*p == ' ') p++;
    return *p ? -1 : n;
}

static int on_text(void *user, const char *text, size_t len) {
    (void)user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;
}

static int on_text_json(void *user, const char *text, size_t len) {
    (void)user;
    /* one {"chunk": ...} line per piece, as the REST stream's data lines */
    fputs("{\"chunk\": \"", stdout);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c == '\n')
            fputs("\\n", stdout);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    fputs("\"}\n", stdout);
    fflush(stdout);
    return 0;
}

static albedo_model_params model_params(const opts *o) {
    albedo_model_params p = albedo_model_params_default();
    p.n_threads = o->threads;
    p.backend = o->backend;
    p.max_context = o->max_context;
    if (o->precision && !strcmp(o->precision, "bf16")) p.precision = ALBEDO_PRECISION_BF16;
    p.weights = o->weights;
    p.kv_dtype = o->kv_dtype;
    return p;
}

static int check_precision(const opts *o) {
    if (o->precision && strcmp(o->precision, "f32") && strcmp(o->precision, "bf16")) {
        fprintf(stderr, "albedo: --precision must be f32 or bf16\n");
        return -1;
    }
    return 0;
}

/* --model takes a directory, an alias (moondream2, moondream3, moondream3.1)
 * or a Hugging Face owner/repo[@rev]; the last two are found in (or
 * downloaded to) the Hugging Face cache. */
static void fetch_progress(void *user, const char *file, uint64_t done, uint64_t total) {
    (void)user;
    if (!isatty(2) || !total) return;
    fprintf(stderr, "\ralbedo: downloading %s %3d%%", file, (int)(done * 100 / total));
    if (done >= total) fputc('\n', stderr);
}

static int load_model(const opts *o, albedo_model **m) {
    const char *spec = o->model ? o->model : getenv("ALBEDO_MODEL");
    if (!spec) {
        fprintf(stderr,
                "albedo: no model: pass --model DIR|moondream2|moondream3|owner/repo[@rev] or set ALBEDO_MODEL\n");
        return 2;
    }
    char dir[4096];
    albedo_fetch_params fp = albedo_fetch_params_default();
    fp.progress = fetch_progress;
    if (albedo_model_fetch(spec, &fp, dir, sizeof dir) != ALBEDO_OK) {
        fprintf(stderr, "albedo: %s\n", albedo_last_error());
        return 1;
    }
    albedo_model_params p = model_params(o);
    if (albedo_model_load(dir, &p, m) != ALBEDO_OK) {
        fprintf(stderr, "albedo: %s\n", albedo_last_error());
        return 1;
    }
    return 0;
}

static int cmd_skill(opts *o) {
    albedo_request r;
    int need_image = 1, pi = 0;
    if (!strcmp(o->cmd, "caption"))
        r = albedo_request_default(ALBEDO_SKILL_CAPTION);
    else if (!strcmp(o->cmd, "query"))
        r = albedo_request_default(ALBEDO_SKILL_QUERY), need_image = 0;
    else if (!strcmp(o->cmd, "detect"))
        r = albedo_request_default(ALBEDO_SKILL_DETECT);
    else
        r = albedo_request_default(ALBEDO_SKILL_POINT);

    /* Positional shortcuts: IMAGE first (for query only if it names a file),
     * then the question or object. */
    struct stat sb;
    if (!o->image && pi < o->n_pos && (need_image || o->n_pos >= 2 || stat(o->pos[pi], &sb) == 0))
        o->image = o->pos[pi++];
    if (r.skill == ALBEDO_SKILL_QUERY && !o->question && pi < o->n_pos) o->question = o->pos[pi++];
    if ((r.skill == ALBEDO_SKILL_DETECT || r.skill == ALBEDO_SKILL_POINT) && !o->object && pi < o->n_pos)
        o->object = o->pos[pi++];
    if (pi < o->n_pos) return fprintf(stderr, "albedo: unexpected argument '%s'\n", o->pos[pi]), 2;
    if (need_image && !o->image) return fprintf(stderr, "albedo: %s needs an image (--image PATH)\n", o->cmd), 2;
    if (r.skill == ALBEDO_SKILL_QUERY && !o->question) return fprintf(stderr, "albedo: query needs a question\n"), 2;
    if ((r.skill == ALBEDO_SKILL_DETECT || r.skill == ALBEDO_SKILL_POINT) && !o->object)
        return fprintf(stderr, "albedo: %s needs an object\n", o->cmd), 2;
    if (o->length) {
        if (!strcmp(o->length, "short"))
            r.length = ALBEDO_LENGTH_SHORT;
        else if (!strcmp(o->length, "normal"))
            r.length = ALBEDO_LENGTH_NORMAL;
        else if (!strcmp(o->length, "long"))
            r.length = ALBEDO_LENGTH_LONG;
        else
            return fprintf(stderr, "albedo: --length must be short, normal or long\n"), 2;
    }
    albedo_spatial_ref refs[64];
    if (o->spatial_refs) {
        int n = parse_refs(o->spatial_refs, refs, 64);
        if (n < 0)
            return fprintf(stderr, "albedo: --spatial-refs: expected JSON like [[0.25,0.5],[0.1,0.2,0.6,0.7]]\n"), 2;
        r.spatial_refs = refs;
        r.n_spatial_refs = n;
    }
    if (check_precision(o)) return 2;
    r.question = o->question;
    r.object = o->object;
    r.reasoning = o->reasoning;
    if (o->has_temperature) r.temperature = o->temperature;
    if (o->has_top_p) r.top_p = o->top_p;
    if (o->has_max_tokens) r.max_tokens = o->max_tokens;
    if (o->has_max_objects) r.max_objects = o->max_objects;
    r.seed = o->seed;
    if (o->stream) r.on_text = o->json ? on_text_json : on_text;

    albedo_model *m = NULL;
    albedo_session *s = NULL;
    albedo_image *img = NULL;
    int rc = load_model(o, &m);
    if (rc) return rc;
    /* The model's own defaults for what the command line left unset. */
    albedo_request md = albedo_model_request_default(m, r.skill);
    if (!o->has_temperature) r.temperature = md.temperature;
    if (!o->has_top_p) r.top_p = md.top_p;
    if (!o->has_max_tokens) r.max_tokens = md.max_tokens;
    if (!o->has_max_objects) r.max_objects = md.max_objects;
    if (albedo_session_new(m, &s) != ALBEDO_OK) {
        fprintf(stderr, "albedo: %s\n", albedo_last_error());
        albedo_model_free(m);
        return 1;
    }
    if (o->image && albedo_image_encode_file(s, o->image, &img) != ALBEDO_OK) {
        fprintf(stderr, "albedo: %s\n", albedo_session_error(s));
        rc = 1;
        goto done;
    }
    r.image = img;
    const albedo_result *res;
    if (albedo_session_run(s, &r, &res) != ALBEDO_OK) {
        if (o->stream) putchar('\n');
        fprintf(stderr, "albedo: %s\n", albedo_session_error(s));
        rc = 1;
        goto done;
    }
    if (o->json) {
        printf("%s\n", albedo_result_json(s, res, 1));
    } else if (o->stream) {
        putchar('\n');
    } else {
        switch (res->skill) {
        case ALBEDO_SKILL_CAPTION:
        case ALBEDO_SKILL_QUERY:
            if (res->reasoning) {
                fputs("reasoning: ", stdout);
                fwrite(res->reasoning, 1, res->reasoning_len, stdout);
                fputs("\nanswer: ", stdout);
            }
            fwrite(res->text, 1, res->text_len, stdout);
            putchar('\n');
            break;
        case ALBEDO_SKILL_DETECT:
            for (int i = 0; i < res->n_objects; i++)
                printf("%.4f %.4f %.4f %.4f\n", res->objects[i].x_min, res->objects[i].y_min, res->objects[i].x_max,
                       res->objects[i].y_max);
            break;
        case ALBEDO_SKILL_POINT:
            for (int i = 0; i < res->n_points; i++) printf("%.4f %.4f\n", res->points[i].x, res->points[i].y);
            break;
        }
    }
done:
    albedo_image_free(img);
    albedo_session_free(s);
    albedo_model_free(m);
    return rc;
}

static int cmd_synth(opts *o) {
    if (!o->preset || !o->out) return fprintf(stderr, "albedo: synth needs --preset and --out\n"), 2;
    unsigned long long seed = o->seed ? o->seed : 20261127ull;
    if (o->shard_mb < 0 || (o->shard_mb && o->legacy_f16))
        return fprintf(stderr, "albedo: --shard-mb needs a positive size and no --legacy-f16\n"), 2;
    if ((o->shard_mb ? albedo_synth_write_shards(o->out, o->preset, seed, o->tokenizer, (uint64_t)o->shard_mb << 20)
                     : albedo_synth_write(o->out, o->preset, seed, o->legacy_f16, o->tokenizer)) != ALBEDO_OK) {
        fprintf(stderr, "albedo: %s\n", albedo_last_error());
        return 1;
    }
    return 0;
}

/* The synthetic full-size model lives in a cache directory, written once. */
static int synthetic_dir_base(const char *preset, char *out, size_t cap) {
    const char *base = getenv("ALBEDO_CACHE");
    char tmp[4096];
    if (!base) {
        const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
        if (xdg)
            snprintf(tmp, sizeof tmp, "%s/albedo", xdg);
        else
            snprintf(tmp, sizeof tmp, "%s/.cache/albedo", home ? home : "/tmp");
        base = tmp;
    }
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", base);
    for (char *p = parent + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            mkdir(parent, 0755);
            *p = '/';
        }
    mkdir(parent, 0755);
    if (snprintf(out, cap, "%s/synthetic-%s", base, preset) >= (int)cap)
        return fprintf(stderr, "albedo: the cache path %s is too long\n", base), -1;
    char probe[8192];
    struct stat sb;
    /* tokenizer.json is written last: its presence means the model (one file
     * or md3's shards) is complete. */
    snprintf(probe, sizeof probe, "%s/tokenizer.json", out);
    if (stat(probe, &sb) == 0) return 0;
    fprintf(stderr, "albedo: writing the synthetic %s model to %s (once)\n", preset, out);
    if (albedo_synth_write(out, preset, 1, 0, NULL) != ALBEDO_OK) {
        fprintf(stderr, "albedo: %s\n", albedo_last_error());
        return -1;
    }
    return 0;
}

static int copy_file(const char *from, const char *to) {
    FILE *a = fopen(from, "rb"), *b = a ? fopen(to, "wb") : NULL;
    char buf[1 << 16];
    size_t n;
    int rc = !a || !b;
    while (!rc && (n = fread(buf, 1, sizeof buf, a)) > 0) rc = fwrite(buf, 1, n, b) != n;
    if (a && ferror(a)) rc = 1;
    if (a) fclose(a);
    if (b && fclose(b)) rc = 1;
    if (rc && b) remove(to);
    return rc;
}

/* The synthetic model with another tokenizer (--tokenizer FILE): a sibling
 * directory named after the file's contents, whose weights and config are
 * links to the cached model's and whose tokenizer.json is a copy of FILE. A
 * real BPE vocabulary (tests/data/tokenizer/gpt2.tokenizer.json.gz, like
 * Moondream's) makes prompts as long as the real model's; the synthetic
 * byte-level one makes them about three times longer. */
static int synthetic_dir(const char *preset, const char *tokenizer, char *out, size_t cap) {
    char base[4300];
    if (synthetic_dir_base(preset, base, sizeof base)) return -1;
    if (!tokenizer) return snprintf(out, cap, "%s", base) >= (int)cap ? -1 : 0;
    FILE *f = fopen(tokenizer, "rb");
    if (!f) return fprintf(stderr, "albedo: --tokenizer %s: cannot open it\n", tokenizer), -1;
    uint64_t h = 1469598103934665603ull; /* FNV-1a of the contents */
    for (int c; (c = getc(f)) != EOF;) h = (h ^ (uint64_t)c) * 1099511628211ull;
    fclose(f);
    if (snprintf(out, cap, "%s-tok%016llx", base, (unsigned long long)h) >= (int)cap) return -1;
    char probe[8192];
    struct stat sb;
    snprintf(probe, sizeof probe, "%s/tokenizer.json", out);
    if (stat(probe, &sb) == 0) return 0;
    mkdir(out, 0755);
    DIR *d = opendir(base);
    if (!d) return fprintf(stderr, "albedo: %s: cannot list it\n", base), -1;
    int rc = 0;
    for (struct dirent *de; !rc && (de = readdir(d));) {
        if (de->d_name[0] == '.' || !strcmp(de->d_name, "tokenizer.json")) continue;
        char from[8192], to[8192];
        snprintf(from, sizeof from, "%s/%s", base, de->d_name);
        snprintf(to, sizeof to, "%s/%s", out, de->d_name);
        if (symlink(from, to) && errno != EEXIST)
            rc = fprintf(stderr, "albedo: cannot link %s: %s\n", to, strerror(errno));
    }
    closedir(d);
    /* The tokenizer last: its presence means the directory is complete. */
    if (!rc && copy_file(tokenizer, probe)) rc = fprintf(stderr, "albedo: cannot write %s\n", probe);
    return rc ? -1 : 0;
}

/* albedo bench chartqa (--synthetic md2|md3 | --model DIR) [--batch 1,4,16,64]
 *   [--mode direct,cot] [--images N] [--threads N] [--weights W] [--kv-dtype D] [--warmup N] [--json] */
static int cmd_bench_chartqa(int argc, char **argv) {
    albedo_chartqa_opts co = {.batches = {1, 4, 16, 64}, .n_batches = 4, .modes = 3, .n_images = 4, .warmup = -1};
    opts o;
    memset(&o, 0, sizeof o);
    for (int i = 3; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--json")) {
            co.json = 1;
            continue;
        }
        if (!v) return fprintf(stderr, "albedo: %s needs a value\n", a), 2;
        i++;
        if (!strcmp(a, "--synthetic"))
            o.synthetic = v;
        else if (!strcmp(a, "--model"))
            o.model = v;
        else if (!strcmp(a, "--backend"))
            o.backend = v;
        else if (!strcmp(a, "--weights"))
            o.weights = v;
        else if (!strcmp(a, "--kv-dtype"))
            o.kv_dtype = v;
        else if (!strcmp(a, "--tokenizer"))
            o.tokenizer = v;
        else if (!strcmp(a, "--threads") && !parse_int(v, &o.threads))
            co.n_threads = o.threads;
        else if (!strcmp(a, "--images") && !parse_int(v, &co.n_images) && co.n_images > 0)
            continue;
        else if (!strcmp(a, "--warmup") && !parse_int(v, &co.warmup) && co.warmup >= 0)
            continue;
        else if (!strcmp(a, "--mode"))
            co.modes = (strstr(v, "direct") ? 1 : 0) | (strstr(v, "cot") ? 2 : 0);
        else if (!strcmp(a, "--batch")) {
            co.n_batches = 0;
            for (const char *p = v; *p && co.n_batches < 8;) {
                char *end;
                long b = strtol(p, &end, 10);
                if (end == p || b < 1 || b > 4096) return fprintf(stderr, "albedo: bad --batch %s\n", v), 2;
                co.batches[co.n_batches++] = (int)b;
                p = *end == ',' ? end + 1 : end;
            }
        } else
            return fprintf(stderr, "albedo: bench chartqa: unknown or bad option %s %s\n", a, v), 2;
    }
    if (!co.modes || !co.n_batches) return fprintf(stderr, "albedo: bench chartqa: nothing to run\n"), 2;
    /* Warm-up by default on a GPU (what a process does once: lazy kernel
     * loading, the image worker's start), none on the CPU. */
    if (co.warmup < 0) co.warmup = o.backend && !strncmp(o.backend, "cuda", 4) ? 8 : 0;
    char dir[4300];
    if (o.synthetic) {
        if (synthetic_dir(o.synthetic, o.tokenizer, dir, sizeof dir)) return 1;
        o.model = dir;
    }
    if (!o.model) return fprintf(stderr, "albedo: bench chartqa needs --synthetic md2|md3 or --model DIR\n"), 2;
    albedo_model *m = NULL;
    int rc = load_model(&o, &m);
    if (rc) return rc;
    rc = albedo_bench_chartqa(m, &co);
    albedo_model_free(m);
    return rc;
}

/* The process's peak resident set in MB: VmHWM of /proc/self/status (mapped
 * weight pages that were touched count, as they occupy RAM), else
 * getrusage's ru_maxrss; -1 when neither is available. */
static double peak_rss_mb(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6)) kb = atoll(line + 6);
    if (f) fclose(f);
    if (kb < 0) {
        struct rusage ru;
        if (getrusage(RUSAGE_SELF, &ru) == 0) kb = ru.ru_maxrss;
    }
    return kb < 0 ? -1.0 : (double)kb / 1024.0;
}

static double wall_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp_ms(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* The 10-word question of the end-to-end figure and of the first request. */
#define BENCH_QUESTION "What is the highest value shown in this chart today?"

/* The end-to-end figure of issue #3: a 640x480 image (RGB pixels in: the
 * crops, every crop through the vision encoder, the 730-position prefix), a
 * 10-word question and 32 answer tokens (greedy, end of sequence ignored),
 * through the public API; median of `repeats` runs, each on an image of
 * its own (pixels differ, so no cached prefix is reused). Also the median
 * time to the first token (encoding plus the request's ttft) and the
 * number of tokens the last run produced. */
static int bench_e2e(albedo_model *m, int repeats, double *e2e_ms, double *ttft_ms, int *out_tokens) {
    enum { W = 640, H = 480 };
    albedo_session *s = NULL;
    uint8_t *rgb = malloc((size_t)W * H * 3);
    double t[16], tt[16];
    int rc = 0;
    if (repeats > 16) repeats = 16;
    if (!rgb || albedo_session_new(m, &s) != ALBEDO_OK) rc = 1;
    for (int r = 0; r < repeats && !rc; r++) {
        uint64_t x = 0x2545F4914F6CDD1Dull + (uint64_t)r;
        for (size_t i = 0; i < (size_t)W * H * 3; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            rgb[i] = (uint8_t)(((i / 3) % W) / 3 + (x & 31)); /* a gradient with noise */
        }
        albedo_request q = albedo_model_request_default(m, ALBEDO_SKILL_QUERY);
        q.question = BENCH_QUESTION;
        q.max_tokens = 32;
        q.ignore_eos = 1;
        q.temperature = 0.0f;
        albedo_image *img = NULL;
        const albedo_result *res = NULL;
        const double t0 = wall_ms();
        if (albedo_image_encode_rgb(s, rgb, W, H, &img) != ALBEDO_OK) rc = 1;
        const double t_enc = wall_ms() - t0;
        q.image = img;
        if (!rc && albedo_session_run(s, &q, &res) != ALBEDO_OK) rc = 1;
        t[r] = wall_ms() - t0;
        if (!rc) {
            tt[r] = t_enc + res->metrics.ttft_ms; /* the image, then the request's own time to first token */
            *out_tokens = res->metrics.output_tokens;
        }
        albedo_image_free(img);
    }
    if (rc) fprintf(stderr, "albedo: bench e2e: %s\n", s ? albedo_session_error(s) : albedo_last_error());
    if (!rc) {
        qsort(t, (size_t)repeats, sizeof *t, cmp_ms);
        qsort(tt, (size_t)repeats, sizeof *tt, cmp_ms);
        *e2e_ms = repeats % 2 ? t[repeats / 2] : 0.5 * (t[repeats / 2 - 1] + t[repeats / 2]);
        *ttft_ms = repeats % 2 ? tt[repeats / 2] : 0.5 * (tt[repeats / 2 - 1] + tt[repeats / 2]);
    }
    albedo_session_free(s);
    free(rgb);
    return rc;
}

static int cmd_bench(opts *o) {
    char dir[4300];
    if (check_precision(o)) return 2;
    if (o->synthetic) {
        if (synthetic_dir(o->synthetic, o->tokenizer, dir, sizeof dir)) return 1;
        o->model = dir;
    }
    albedo_model *m = NULL;
    const double t_load = wall_ms();
    int rc = load_model(o, &m);
    if (rc) return rc;
    const double load_ms = wall_ms() - t_load;
    /* Start-up (spec §4): the load above, then a first request on the fresh
     * model, text only (an image's first request adds its vision encode). */
    double first_ms = 0;
    {
        albedo_session *s = NULL;
        albedo_request q = albedo_model_request_default(m, ALBEDO_SKILL_QUERY);
        q.question = BENCH_QUESTION;
        q.max_tokens = 1;
        q.temperature = 0.0f;
        const albedo_result *res = NULL;
        const double t0 = wall_ms();
        if (albedo_session_new(m, &s) != ALBEDO_OK || albedo_session_run(s, &q, &res) != ALBEDO_OK) {
            fprintf(stderr, "albedo: bench first request: %s\n", s ? albedo_session_error(s) : albedo_last_error());
            albedo_session_free(s);
            albedo_model_free(m);
            return 1;
        }
        first_ms = wall_ms() - t0;
        albedo_session_free(s);
    }
    albedo_bench_result b;
    if (albedo_model_bench(m, o->repeats, &b) != ALBEDO_OK) {
        fprintf(stderr, "albedo: %s\n", albedo_last_error());
        albedo_model_free(m);
        return 1;
    }
    double e2e = 0, ttft = 0;
    int n_out = 0;
    if (bench_e2e(m, o->repeats, &e2e, &ttft, &n_out)) {
        albedo_model_free(m);
        return 1;
    }
    const double rss = peak_rss_mb();
    if (o->json) {
        printf("{\"vision_crop_ms\": %.1f, \"prefill730_tok_s\": %.1f, \"decode_d740_tok_s\": %.2f, "
               "\"e2e_ms\": %.0f, \"e2e_ttft_ms\": %.0f, \"e2e_output_tokens\": %d, \"peak_rss_mb\": %.0f, "
               "\"load_ms\": %.1f, \"first_request_ms\": %.1f}\n",
               b.vision_crop_ms, b.prefill730_tok_s, b.decode_d740_tok_s, e2e, ttft, n_out, rss, load_ms, first_ms);
    } else {
        printf("model: %s\n", albedo_model_describe(m));
        printf("| stage | albedo |\n|---|---:|\n");
        printf("| vision encoder, one 378x378 crop | %.1f ms |\n", b.vision_crop_ms);
        printf("| prefill, 730 positions | %.1f tok/s |\n", b.prefill730_tok_s);
        printf("| decode at depth 740 | %.2f tok/s |\n", b.decode_d740_tok_s);
        printf("| end to end: 640x480 image, 10-word question, %d tokens | %.0f ms (first token %.0f ms) |\n", n_out,
               e2e, ttft);
        printf("| peak resident memory (VmHWM) | %.0f MB |\n", rss);
        printf("| start-up: model load / first request (text, 1 token) | %.0f ms / %.0f ms |\n", load_ms, first_ms);
    }
    albedo_model_free(m);
    return 0;
}

static int cmd_quantize(opts *o) {
    if (!o->model || !o->out || !o->weights) {
        fprintf(stderr, "albedo: quantize needs --model DIR --weights q8|q4 --out DIR2\n");
        return 2;
    }
    albedo_model_params p = model_params(o);
    if (albedo_model_quantize(o->model, &p, o->out) != ALBEDO_OK) {
        fprintf(stderr, "albedo: %s\n", albedo_last_error());
        return 1;
    }
    return 0;
}

static int cmd_batch(opts *o) {
    FILE *in = stdin;
    const char *path = o->n_pos ? o->pos[0] : NULL;
    if (check_precision(o)) return 2;
    if (path && strcmp(path, "-") && !(in = fopen(path, "r"))) {
        fprintf(stderr, "albedo: %s: %s\n", path, strerror(errno));
        return 1;
    }
    albedo_model *m = NULL;
    int rc = load_model(o, &m);
    if (!rc) rc = albedo_batch_run(m, in);
    albedo_model_free(m);
    if (in != stdin) fclose(in);
    return rc;
}

static int cmd_tokenize(opts *o) {
    if (o->n_pos != 1) return fprintf(stderr, "albedo: tokenize needs one TEXT argument\n"), 2;
    albedo_model *m = NULL;
    int rc = load_model(o, &m);
    if (rc) return rc;
    int n = albedo_tokenize(m, o->pos[0], NULL, 0);
    if (n < 0) {
        fprintf(stderr, "albedo: %s\n", albedo_last_error());
        albedo_model_free(m);
        return 1;
    }
    int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
    if (!ids) {
        albedo_model_free(m);
        return 1;
    }
    albedo_tokenize(m, o->pos[0], ids, n);
    printf("[");
    for (int i = 0; i < n; i++) printf("%s%d", i ? ", " : "", ids[i]);
    printf("]\n");
    free(ids);
    albedo_model_free(m);
    return 0;
}

int main(int argc, char **argv) {
    opts o;
    if (argc >= 3 && !strcmp(argv[1], "bench") && !strcmp(argv[2], "chartqa")) return cmd_bench_chartqa(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "serve")) return albedo_serve_main(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "pull")) return albedo_pull_main(argc, argv);
    if (parse_args(argc, argv, &o)) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(o.cmd, "caption") || !strcmp(o.cmd, "query") || !strcmp(o.cmd, "detect") || !strcmp(o.cmd, "point"))
        return cmd_skill(&o);
    if (!strcmp(o.cmd, "bench")) return cmd_bench(&o);
    if (!strcmp(o.cmd, "synth")) return cmd_synth(&o);
    if (!strcmp(o.cmd, "tokenize")) return cmd_tokenize(&o);
    if (!strcmp(o.cmd, "quantize")) return cmd_quantize(&o);
    if (!strcmp(o.cmd, "batch")) return cmd_batch(&o);
    if (!strcmp(o.cmd, "version") || !strcmp(o.cmd, "--version")) {
        printf("albedo %s\n", albedo_version());
        return 0;
    }
    if (!strcmp(o.cmd, "help") || !strcmp(o.cmd, "--help") || !strcmp(o.cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "albedo: unknown command '%s'\n", o.cmd);
    usage(stderr);
    return 2;
}
