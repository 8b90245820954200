/*
 * test_badinput.c — every kind of bad input through the public API gets its
 * own status and a message naming what was wrong, and nothing crashes:
 * model directories with missing, truncated or corrupt files, missing
 * tensors, wrong shapes and dtypes, bad config.json and tokenizer.json;
 * corrupt, truncated, empty and oversized images, unreadable paths; empty
 * and over-long prompts; invalid settings; cancellation. After each failure
 * the session still answers a valid request.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"
#include "test.h"

static char g_good[4096]; /* a valid md2-small directory */
static char g_tmp[4096];  /* scratch model directory */
static char g_img[4096];  /* tiny.png */

static int copy(const char *from, const char *to, long max_bytes) {
    FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
    int ok = a && b;
    char buf[65536];
    long total = 0;
    size_t n;
    while (ok && (n = fread(buf, 1, sizeof buf, a)) > 0) {
        if (max_bytes >= 0 && total + (long)n > max_bytes) n = (size_t)(max_bytes - total);
        ok = fwrite(buf, 1, n, b) == n;
        total += (long)n;
        if (max_bytes >= 0 && total >= max_bytes) break;
    }
    if (a) fclose(a);
    if (b && fclose(b)) ok = 0;
    return ok ? 0 : -1;
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

/* Fresh copy of the good model in g_tmp. */
static void reset_tmp(void) {
    const char *files[] = {"config.json", "model.safetensors", "tokenizer.json"};
    mkdir(g_tmp, 0755);
    for (int i = 0; i < 3; i++) {
        char a[4200], b[4200];
        snprintf(a, sizeof a, "%s/%s", g_good, files[i]);
        snprintf(b, sizeof b, "%s/%s", g_tmp, files[i]);
        copy(a, b, -1);
    }
}

static void expect_load(const char *what, albedo_status want, const char *fragment) {
    albedo_model *m = (albedo_model *)1;
    albedo_status st = albedo_model_load(g_tmp, NULL, &m);
    CHECK(st == want && m == NULL && strstr(albedo_last_error(), fragment),
          "%s: status %d (%s), message '%s', want %d with '%s'", what, st, albedo_status_str(st), albedo_last_error(),
          want, fragment);
    if (st == ALBEDO_OK) albedo_model_free(m);
}

/* Rewrite model.safetensors with tensor `drop` removed and/or `retype`
 * stored as I32 of the same byte size, or `reshape` given a wrong shape. */
static void rewrite_weights(const char *drop, const char *retype, const char *reshape) {
    char src[4200], dst[4200];
    snprintf(src, sizeof src, "%s/model.safetensors", g_good);
    snprintf(dst, sizeof dst, "%s/model.safetensors", g_tmp);
    st_file *f = NULL;
    errbuf e;
    if (st_open(src, &f, &e)) return;
    int n = st_count(f), k = 0;
    st_tensor *ts = calloc((size_t)n, sizeof *ts);
    for (int i = 0; i < n; i++) {
        const st_tensor *t = st_at(f, i);
        if (drop && !strcmp(t->name, drop)) continue;
        ts[k] = *t;
        if (retype && !strcmp(t->name, retype)) { /* BF16 [a, b] → I32 [a, b/2] */
            ts[k].dt = DT_I32;
            ts[k].shape[ts[k].ndim - 1] /= 2;
        }
        if (reshape && !strcmp(t->name, reshape)) { /* [a, b] → [b, a] */
            int64_t x = ts[k].shape[0];
            ts[k].shape[0] = ts[k].shape[1];
            ts[k].shape[1] = x;
        }
        k++;
    }
    st_write(dst, ts, k, &e);
    free(ts);
    st_close(f);
}

static void model_files(void) {
    char p[4200];
    reset_tmp();
    snprintf(p, sizeof p, "%s/config.json", g_tmp);
    unlink(p);
    expect_load("missing config.json", ALBEDO_ERR_IO, "config.json");
    reset_tmp();
    snprintf(p, sizeof p, "%s/model.safetensors", g_tmp);
    unlink(p);
    expect_load("missing weights", ALBEDO_ERR_IO, "model.safetensors");
    reset_tmp();
    snprintf(p, sizeof p, "%s/tokenizer.json", g_tmp);
    unlink(p);
    expect_load("missing tokenizer", ALBEDO_ERR_IO, "tokenizer.json");

    /* config.json */
    reset_tmp();
    snprintf(p, sizeof p, "%s/config.json", g_tmp);
    write_text(p, "{\"config\": {\"text\": ");
    expect_load("truncated config.json", ALBEDO_ERR_MODEL_FORMAT, "invalid JSON");
    write_text(p, "{\"config\": {\"text\": {\"dim\": \"wide\"}}}");
    expect_load("config type", ALBEDO_ERR_MODEL_FORMAT, "config.text.dim");
    write_text(p, "{\"config\": {\"text\": {\"dim\": 130, \"n_heads\": 4}}}");
    expect_load("config heads", ALBEDO_ERR_MODEL_FORMAT, "divisible");
    write_text(p, "{\"config\": {\"vision\": {\"enc_patch_size\": 0}}}");
    expect_load("config zero", ALBEDO_ERR_MODEL_FORMAT, "enc_patch_size");
    write_text(p, "[]");
    expect_load("config array", ALBEDO_ERR_MODEL_FORMAT, "object");
    write_text(p, "{\"config\": {}}"); /* the real Moondream 2: shapes then mismatch */
    expect_load("config vs weights", ALBEDO_ERR_MODEL_FORMAT, "expected [1152, 588], file has [144, 588]");

    /* weights: truncated, corrupt, missing tensor, wrong dtype, wrong shape */
    reset_tmp();
    char src[4200];
    snprintf(src, sizeof src, "%s/model.safetensors", g_good);
    snprintf(p, sizeof p, "%s/model.safetensors", g_tmp);
    copy(src, p, 1 << 20);
    expect_load("truncated weights", ALBEDO_ERR_MODEL_FORMAT, "outside the file");
    copy(src, p, 5);
    expect_load("tiny weights", ALBEDO_ERR_MODEL_FORMAT, "too short");
    FILE *hf = fopen(p, "wb");
    if (hf) {
        fwrite("\x10\0\0\0\0\0\0\0{{{{{{{{{{{{{{{{", 1, 24, hf);
        fclose(hf);
    }
    expect_load("corrupt header", ALBEDO_ERR_MODEL_FORMAT, "not valid JSON");
    reset_tmp();
    rewrite_weights("model.text.blocks.1.mlp.fc2.weight", NULL, NULL);
    expect_load("missing tensor", ALBEDO_ERR_MODEL_FORMAT, "text.blocks.1.mlp.fc2.weight");
    rewrite_weights(NULL, "model.vision.blocks.0.attn.qkv.weight", NULL);
    expect_load("wrong dtype", ALBEDO_ERR_MODEL_FORMAT, "dtype I32");
    rewrite_weights(NULL, NULL, "model.text.blocks.0.mlp.fc1.weight");
    expect_load("wrong shape", ALBEDO_ERR_MODEL_FORMAT,
                "model.text.blocks.0.mlp.fc1.weight: expected [264, 128], file has [128, 264]");

    /* tokenizer.json */
    reset_tmp();
    snprintf(p, sizeof p, "%s/tokenizer.json", g_tmp);
    write_text(p, "{\"model\": {\"type\": \"BPE\", \"vocab\": ");
    expect_load("truncated tokenizer", ALBEDO_ERR_TOKENIZER, "tokenizer.json");
    write_text(p, "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}");
    expect_load("unsupported tokenizer", ALBEDO_ERR_TOKENIZER, "WordPiece");

    /* not a directory, empty path, bad params */
    albedo_model *m = NULL;
    CHECK(albedo_model_load("/nonexistent/model", NULL, &m) == ALBEDO_ERR_IO && !m, "nonexistent dir: %s",
          albedo_last_error());
    CHECK(albedo_model_load("", NULL, &m) == ALBEDO_ERR_INVALID_ARGUMENT, "empty dir");
    CHECK(albedo_model_load(g_good, NULL, NULL) == ALBEDO_ERR_INVALID_ARGUMENT, "NULL out");
    albedo_model_params mp = albedo_model_params_default();
    mp.backend = "quantum";
    CHECK(albedo_model_load(g_good, &mp, &m) == ALBEDO_ERR_INVALID_ARGUMENT && strstr(albedo_last_error(), "quantum"),
          "bad backend: %s", albedo_last_error());
    mp = albedo_model_params_default();
    mp.max_context = 100;
    CHECK(albedo_model_load(g_good, &mp, &m) == ALBEDO_ERR_INVALID_ARGUMENT &&
              strstr(albedo_last_error(), "max_context"),
          "small context: %s", albedo_last_error());
    /* the KV cache's dtype: fp8 (e4m3) on every backend (test_kv_fp8.c),
     * anything unknown refused */
    mp = albedo_model_params_default();
    mp.kv_dtype = "fp8";
    CHECK(albedo_model_load(g_good, &mp, &m) == ALBEDO_OK && m, "fp8 KV cache on the CPU: %s", albedo_last_error());
    albedo_model_free(m);
    m = NULL;
    mp.kv_dtype = "int3";
    CHECK(albedo_model_load(g_good, &mp, &m) == ALBEDO_ERR_INVALID_ARGUMENT && !m &&
              strstr(albedo_last_error(), "int3"),
          "bad kv_dtype: %s", albedo_last_error());
    mp.kv_dtype = "bf16";
    CHECK(albedo_model_load(g_good, &mp, &m) == ALBEDO_OK && m, "kv_dtype bf16: %s", albedo_last_error());
    albedo_model_free(m);
    m = NULL;
}

typedef struct bad_req {
    const char *name;
    albedo_request r;
    albedo_status want;
    const char *frag;
} bad_req;

/* A valid request still works after a failure. */
static void still_works(albedo_session *s, albedo_image *img, const char *after) {
    albedo_request r = albedo_request_default(ALBEDO_SKILL_CAPTION);
    r.image = img;
    r.temperature = 0;
    r.max_tokens = 3;
    const albedo_result *res = NULL;
    albedo_status st = albedo_session_run(s, &r, &res);
    CHECK(st == ALBEDO_OK && res && res->n_tokens > 0, "after %s: %s", after, albedo_session_error(s));
}

static int stop_now(void *user, const char *t, size_t n) {
    (void)t;
    (void)n;
    (*(int *)user)++;
    return 1;
}

static void requests(void) {
    albedo_model *m = NULL;
    albedo_model_params mp = albedo_model_params_default();
    mp.n_threads = 2;
    mp.max_image_side = 1000;
    mp.max_image_pixels = 400000;
    CHECK(albedo_model_load(g_good, &mp, &m) == ALBEDO_OK, "load: %s", albedo_last_error());
    if (!m) return;
    albedo_session *s = NULL;
    CHECK(albedo_session_new(m, &s) == ALBEDO_OK, "session");
    albedo_image *img = NULL, *bad = NULL;
    CHECK(albedo_image_encode_file(s, g_img, &img) == ALBEDO_OK, "encode: %s", albedo_session_error(s));

    /* images */
    struct {
        const char *name;
        const void *data;
        size_t len;
        albedo_status want;
    } imgs[] = {
        {"empty", "", 0, ALBEDO_ERR_IMAGE},
        {"garbage", "this is not an image at all", 27, ALBEDO_ERR_IMAGE},
        {"png magic only", "\x89PNG\r\n\x1a\n", 8, ALBEDO_ERR_IMAGE},
        {"jpeg magic only", "\xff\xd8\xff\xe0", 4, ALBEDO_ERR_IMAGE},
    };
    for (size_t i = 0; i < sizeof imgs / sizeof imgs[0]; i++) {
        albedo_status st = albedo_image_encode_bytes(s, imgs[i].data, imgs[i].len, &bad);
        CHECK(st == imgs[i].want && bad == NULL && albedo_session_error(s)[0], "image %s: status %d '%s'", imgs[i].name,
              st, albedo_session_error(s));
    }
    /* truncated file bytes */
    FILE *f = fopen(g_img, "rb");
    unsigned char buf[1 << 16];
    size_t n = f ? fread(buf, 1, sizeof buf, f) : 0;
    if (f) fclose(f);
    CHECK(albedo_image_encode_bytes(s, buf, n / 2, &bad) == ALBEDO_ERR_IMAGE, "truncated png: %s",
          albedo_session_error(s));
    /* oversized: limits of 1000 px / 400k pixels */
    uint8_t *big = calloc((size_t)1200 * 10 * 3, 1);
    CHECK(albedo_image_encode_rgb(s, big, 1200, 10, &bad) == ALBEDO_ERR_LIMIT, "wide rgb: %s", albedo_session_error(s));
    CHECK(albedo_image_encode_rgb(s, big, 0, 10, &bad) == ALBEDO_ERR_INVALID_ARGUMENT, "zero-sized rgb");
    free(big);
    CHECK(albedo_image_encode_file(s, "/nonexistent/photo.jpg", &bad) == ALBEDO_ERR_IO &&
              strstr(albedo_session_error(s), "/nonexistent/photo.jpg"),
          "unreadable: %s", albedo_session_error(s));
    CHECK(albedo_image_encode_file(s, test_source_dir(), &bad) != ALBEDO_OK, "directory as image");
    still_works(s, img, "bad images");

    /* prompts and settings */
    albedo_request base = albedo_request_default(ALBEDO_SKILL_QUERY);
    base.image = img;
    base.question = "What is this?";
    base.max_tokens = 2;
    bad_req cases[16];
    int nc = 0;
#define CASE(nm, want_, frag_, ...)                    \
    do {                                               \
        albedo_request r_ = base;                      \
        __VA_ARGS__;                                   \
        cases[nc++] = (bad_req){nm, r_, want_, frag_}; \
    } while (0)
    CASE("empty question", ALBEDO_ERR_INVALID_ARGUMENT, "question is empty", r_.question = "");
    CASE("no question", ALBEDO_ERR_INVALID_ARGUMENT, "question is missing", r_.question = NULL);
    CASE("negative temperature", ALBEDO_ERR_INVALID_ARGUMENT, "temperature", r_.temperature = -1);
    CASE("NaN temperature", ALBEDO_ERR_INVALID_ARGUMENT, "temperature", r_.temperature = NAN);
    CASE("top_p 0", ALBEDO_ERR_INVALID_ARGUMENT, "top_p", r_.top_p = 0);
    CASE("top_p 1.5", ALBEDO_ERR_INVALID_ARGUMENT, "top_p", r_.top_p = 1.5f);
    CASE("max_tokens 0", ALBEDO_ERR_INVALID_ARGUMENT, "max_tokens", r_.max_tokens = 0);
    CASE("max_objects -3", ALBEDO_ERR_INVALID_ARGUMENT, "max_objects", r_.max_objects = -3);
    CASE("caption without image", ALBEDO_ERR_INVALID_ARGUMENT, "needs an image", r_.skill = ALBEDO_SKILL_CAPTION;
         r_.image = NULL);
    CASE("bad length", ALBEDO_ERR_INVALID_ARGUMENT, "length", r_.skill = ALBEDO_SKILL_CAPTION;
         r_.length = (albedo_length)9);
    CASE("bad skill", ALBEDO_ERR_INVALID_ARGUMENT, "skill", r_.skill = (albedo_skill)42);
    CASE("empty object", ALBEDO_ERR_INVALID_ARGUMENT, "object is empty", r_.skill = ALBEDO_SKILL_DETECT;
         r_.object = "");
    static const albedo_spatial_ref bad_ref = {3, {0.1, 0.2, 0.3, 0}}, out_ref = {2, {1.5, 0.2, 0, 0}};
    CASE("spatial ref of 3", ALBEDO_ERR_INVALID_ARGUMENT, "spatial_refs[0]", r_.spatial_refs = &bad_ref;
         r_.n_spatial_refs = 1);
    CASE("spatial ref out of range", ALBEDO_ERR_INVALID_ARGUMENT, "[0, 1]", r_.spatial_refs = &out_ref;
         r_.n_spatial_refs = 1);
    CASE("spatial refs text-only", ALBEDO_ERR_INVALID_ARGUMENT, "only be used with an image",
         r_.spatial_refs = &out_ref;
         r_.n_spatial_refs = 1; r_.image = NULL);
#undef CASE
    for (int i = 0; i < nc; i++) {
        const albedo_result *res = (const albedo_result *)1;
        albedo_status st = albedo_session_run(s, &cases[i].r, &res);
        CHECK(st == cases[i].want && res == NULL && strstr(albedo_session_error(s), cases[i].frag) &&
                  !strcmp(albedo_last_error(), albedo_session_error(s)),
              "%s: status %d '%s'", cases[i].name, st, albedo_session_error(s));
    }
    /* over-long prompt: more tokens than the context holds */
    size_t L = 20000;
    char *longq = malloc(L + 1);
    for (size_t i = 0; i < L; i++) longq[i] = "abcdefgh "[i % 9];
    longq[L] = 0;
    albedo_request r = base;
    r.question = longq;
    const albedo_result *res = NULL;
    CHECK(albedo_session_run(s, &r, &res) == ALBEDO_ERR_LIMIT && strstr(albedo_session_error(s), "context"),
          "long prompt: %s", albedo_session_error(s));
    free(longq);
    /* invalid UTF-8 in the question */
    r = base;
    r.question = "bad \xff\xfe utf-8";
    CHECK(albedo_session_run(s, &r, &res) == ALBEDO_ERR_INVALID_ARGUMENT, "invalid utf-8: %s", albedo_session_error(s));
    still_works(s, img, "bad prompts");

    /* cancellation from the stream callback */
    int calls = 0;
    r = base;
    r.max_tokens = 24;
    r.temperature = 0;
    r.on_text = stop_now;
    r.user = &calls;
    CHECK(albedo_session_run(s, &r, &res) == ALBEDO_ERR_CANCELLED && calls == 1, "cancel: %d calls, '%s'", calls,
          albedo_session_error(s));
    still_works(s, img, "cancellation");

    /* NULL handling */
    CHECK(albedo_session_run(NULL, &base, &res) == ALBEDO_ERR_INVALID_ARGUMENT, "NULL session");
    CHECK(albedo_session_run(s, NULL, &res) == ALBEDO_ERR_INVALID_ARGUMENT, "NULL request");
    CHECK(albedo_image_encode_file(s, g_img, NULL) == ALBEDO_ERR_INVALID_ARGUMENT, "NULL out");
    albedo_image_free(NULL);
    albedo_session_free(NULL);
    albedo_model_free(NULL);
    CHECK(strcmp(albedo_status_str((albedo_status)999), "unknown status") == 0, "status_str range");

    /* A token can decode to a NUL byte: the response JSON carries the whole text. */
    albedo_result nul = {0};
    nul.skill = ALBEDO_SKILL_QUERY;
    nul.text = "a\0b";
    nul.text_len = 3;
    nul.reasoning = "r\0";
    nul.reasoning_len = 2;
    const char *js = albedo_result_json(s, &nul, 0);
    CHECK(js && strstr(js, "\"answer\": \"a\\u0000b\"") && strstr(js, "\"text\": \"r\\u0000\""), "NUL in text: %s",
          js ? js : "(null)");

    albedo_image_free(img);
    albedo_session_free(s);
    albedo_model_free(m);
}

int main(void) {
    const char *shared = test_shared_dir();
    /* the fixture model, or the one test_model regenerated from its seed */
    if (shared)
        snprintf(g_good, sizeof g_good, "%s/fixtures/models/md2-small", shared);
    else
        snprintf(g_good, sizeof g_good, "%s/md2-small-gen", ALBEDO_BINARY_DIR);
    snprintf(g_tmp, sizeof g_tmp, "%s/badinput-model", ALBEDO_BINARY_DIR);
    if (shared)
        snprintf(g_img, sizeof g_img, "%s/fixtures/images/tiny.png", shared);
    else
        snprintf(g_img, sizeof g_img, "%s/tests/data/images/tiny.png", test_source_dir());
    char probe[4200];
    struct stat sb;
    snprintf(probe, sizeof probe, "%s/tokenizer.json", g_good);
    CHECK(stat(probe, &sb) == 0, "%s is missing: test_model makes it", g_good);
    model_files();
    requests();
    TEST_MAIN_END();
}
