/*
 * fuzz_safetensors.c — st_open_memory on arbitrary bytes; on success every
 * tensor is walked (its data must lie inside the input and match its shape
 * and dtype; st_find must find it by name), then md_weights_bind runs twice:
 * with the Moondream 2 defaults (full-size shapes: exercises name mapping,
 * legacy renaming and the first shape checks) and with the tiny config of
 * tiny_model.h (a seed of a few KB binds completely, so every check is
 * reachable).
 */
#include <string.h>

#include "fuzz.h"
#include "model.h"
#include "tiny_model.h"

static md_config cfg_md2, cfg_tiny;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    errbuf e = {{0}};
    md_config_defaults(&cfg_md2);
    md_config_defaults(&cfg_tiny);
    if (md_config_parse(&cfg_tiny, tiny_config_json, strlen(tiny_config_json), &e) != ALBEDO_OK) {
        fprintf(stderr, "fuzz_safetensors: tiny config rejected: %s\n", e.msg);
        abort();
    }
    return 0;
}

static void bind(const md_config *c, const st_file *f) {
    md_weights w;
    errbuf e = {{0}};
    albedo_status st = md_weights_bind(&w, c, f, &e);
    FUZZ_CHECK(st == ALBEDO_OK || st == ALBEDO_ERR_MODEL_FORMAT || st == ALBEDO_ERR_OUT_OF_MEMORY,
               "md_weights_bind status %d (%s)", (int)st, e.msg);
    if (st == ALBEDO_OK) {
        FUZZ_CHECK(w.vb && w.tb && w.wte.p && w.lm_head.w, "bound model misses weights");
        md_weights_release(&w);
    } else {
        FUZZ_CHECK(e.msg[0] != 0, "bind error %d without a message", (int)st);
        FUZZ_CHECK(!w.vb && !w.tb, "failed bind left allocations");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    st_file *f = NULL;
    errbuf e = {{0}};
    albedo_status st = st_open_memory(data, size, &f, &e);
    if (st != ALBEDO_OK) {
        FUZZ_CHECK(st == ALBEDO_ERR_MODEL_FORMAT || st == ALBEDO_ERR_OUT_OF_MEMORY, "st_open_memory status %d (%s)",
                   (int)st, e.msg);
        FUZZ_CHECK(f == NULL && e.msg[0], "failed open: handle %p, message \"%s\"", (void *)f, e.msg);
        return 0;
    }
    const uint8_t *end = data + size;
    for (int i = 0; i < st_count(f); i++) {
        const st_tensor *t = st_at(f, i);
        FUZZ_CHECK(t && t->name, "tensor %d missing", i);
        FUZZ_CHECK(t->ndim >= 0 && t->ndim <= ST_MAX_DIMS && t->dt >= 0 && t->dt < DT_COUNT,
                   "tensor %s: ndim %d dtype %d", t->name, t->ndim, (int)t->dt);
        int64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            FUZZ_CHECK(t->shape[d] >= 0, "tensor %s: negative dim", t->name);
            numel *= t->shape[d];
        }
        FUZZ_CHECK(numel == t->numel && (uint64_t)t->nbytes == (uint64_t)numel * dtype_size(t->dt),
                   "tensor %s: numel %lld, nbytes %zu", t->name, (long long)t->numel, t->nbytes);
        const uint8_t *p = t->data;
        FUZZ_CHECK(p >= data + 8 && p <= end && t->nbytes <= (size_t)(end - p), "tensor %s: data outside the input",
                   t->name);
        fuzz_touch(p, t->nbytes);
        FUZZ_CHECK(st_find(f, t->name) == t, "st_find(%s) does not find it", t->name);
        if (i) FUZZ_CHECK(strcmp(st_at(f, i - 1)->name, t->name) < 0, "tensors not sorted by name");
    }
    FUZZ_CHECK(st_at(f, -1) == NULL && st_at(f, st_count(f)) == NULL, "st_at out of range");
    FUZZ_CHECK(st_find(f, "no such tensor\x01") == NULL, "st_find invents a tensor");
    bind(&cfg_md2, f);
    bind(&cfg_tiny, f);
    st_close(f);
    return 0;
}
