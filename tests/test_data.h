/*
 * test_data.h — small helpers the model-level tests share: the relative L2
 * error of two float arrays, unpacking tests/data's gzipped files, and the
 * two small models regenerated from their seeds with their cases, and
 * loading a cases file. Include after test.h and albedo.h; link zlib and
 * jansson.
 */
#ifndef ALBEDO_TEST_DATA_H
#define ALBEDO_TEST_DATA_H

#include <math.h>
#include <stdio.h>
#include <jansson.h>
#include <zlib.h>

/* ||a - b|| / ||b|| (1 when b is all zeros). */
static inline double rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* Decompress the gzip file src into dst; 0 or -1. */
static inline int gunzip(const char *src, const char *dst) {
    gzFile in = gzopen(src, "rb");
    FILE *out = fopen(dst, "wb");
    int ok = in && out;
    char chunk[65536];
    int n;
    while (ok && (n = gzread(in, chunk, sizeof chunk)) > 0) ok = fwrite(chunk, 1, (size_t)n, out) == (size_t)n;
    if (in) gzclose(in);
    if (out && fclose(out)) ok = 0;
    return ok ? 0 : -1;
}

/* md2-small and md3-small regenerated from their seeds into
 * ALBEDO_BINARY_DIR/<prefix>-md2-small and -md3-small, with the fixture
 * tokenizers, cases and images of ../shared when it is present, else the
 * copies in tests/data (the GPT-2 tokenizer unpacked beside the models).
 * Returns 0, or -1 after a failed CHECK. */
typedef struct small_models {
    char image_dir[4096], cases2[4096], cases3[4096], model2[4096], model3[4096];
} small_models;

static inline int small_models_make(small_models *sm, const char *prefix) {
    const char *shared = test_shared_dir();
    char data[2048], tok2[4096], tok3[4096];
    snprintf(data, sizeof data, "%s/tests/data", test_source_dir());
    if (shared) {
        snprintf(sm->image_dir, sizeof sm->image_dir, "%s/fixtures/images", shared);
        snprintf(sm->cases2, sizeof sm->cases2, "%s/fixtures/reference/md2-small/cases.json", shared);
        snprintf(sm->cases3, sizeof sm->cases3, "%s/fixtures/reference/md3-small/cases.json", shared);
        snprintf(tok2, sizeof tok2, "%s/fixtures/models/md2-small/tokenizer.json", shared);
        snprintf(tok3, sizeof tok3, "%s/fixtures/models/md3-small/tokenizer.json", shared);
    } else {
        printf("note: ../shared is absent: models regenerated from their seeds, cases from tests/data\n");
        snprintf(sm->image_dir, sizeof sm->image_dir, "%s/images", data);
        snprintf(sm->cases2, sizeof sm->cases2, "%s/md2-small/cases.json", data);
        snprintf(sm->cases3, sizeof sm->cases3, "%s/md3-small/cases.json", data);
        snprintf(tok2, sizeof tok2, "%s/%s-gpt2.tokenizer.json", ALBEDO_BINARY_DIR, prefix);
        snprintf(tok3, sizeof tok3, "%s", tok2);
        char gz[4200];
        snprintf(gz, sizeof gz, "%s/tokenizer/gpt2.tokenizer.json.gz", data);
        const int unzipped = gunzip(gz, tok2) == 0;
        CHECK(unzipped, "cannot decompress %s", gz);
        if (!unzipped) return -1;
    }
    snprintf(sm->model2, sizeof sm->model2, "%s/%s-md2-small", ALBEDO_BINARY_DIR, prefix);
    snprintf(sm->model3, sizeof sm->model3, "%s/%s-md3-small", ALBEDO_BINARY_DIR, prefix);
    const int ok2 = albedo_synth_write(sm->model2, "md2-small", 20261127, 0, tok2) == ALBEDO_OK;
    CHECK(ok2, "synth md2-small: %s", albedo_last_error());
    const int ok3 = albedo_synth_write(sm->model3, "md3-small", 31337, 0, tok3) == ALBEDO_OK;
    CHECK(ok3, "synth md3-small: %s", albedo_last_error());
    return ok2 && ok3 ? 0 : -1;
}

/* A fixture's cases file as JSON, or NULL after a failed CHECK. */
static inline json_t *load_cases(const char *path) {
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    CHECK(root != NULL, "%s: %s", path, je.text);
    return root;
}

#endif
