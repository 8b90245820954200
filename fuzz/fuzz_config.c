/*
 * fuzz_config.c — md_config_parse on arbitrary bytes (config.json is part of
 * a model directory a user may download from anywhere). An accepted config
 * must be self-consistent as model.h promises, and md_weights_bind must cope
 * with it: the sizes it derives from the config (patch dims, head widths,
 * region widths) are computed before any tensor is looked up, so binding the
 * tiny checkpoint of fuzz/data with a hostile config exercises exactly the
 * arithmetic an attacker controls.
 */
#include <string.h>

#include "fuzz.h"
#include "model.h"

static uint8_t *tiny_st;
static size_t tiny_len;
static st_file *tiny;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    errbuf e = {{0}};
    const char *path = ALBEDO_SOURCE_DIR "/fuzz/data/tiny.safetensors";
    if (read_file(path, 1 << 20, &tiny_st, &tiny_len, &e) != ALBEDO_OK ||
        st_open_memory(tiny_st, tiny_len, &tiny, &e) != ALBEDO_OK) {
        fprintf(stderr, "fuzz_config: %s: %s\n", path, e.msg);
        abort();
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    md_config c;
    errbuf e = {{0}};
    md_config_defaults(&c);
    albedo_status st = md_config_parse(&c, (const char *)data, size, &e);
    if (st != ALBEDO_OK) {
        FUZZ_CHECK(st == ALBEDO_ERR_MODEL_FORMAT || st == ALBEDO_ERR_UNSUPPORTED || st == ALBEDO_ERR_OUT_OF_MEMORY,
                   "md_config_parse status %d (%s)", (int)st, e.msg);
        FUZZ_CHECK(e.msg[0] != 0, "error %d without a message", (int)st);
        return 0;
    }
    /* What model.h and the stage files rely on. */
    int side = c.crop_size / c.patch;
    FUZZ_CHECK(c.crop_size > 0 && c.patch > 0 && c.crop_size % c.patch == 0 && c.in_ch > 0, "vision geometry %d/%d/%d",
               c.crop_size, c.patch, c.in_ch);
    FUZZ_CHECK(c.enc_dim > 0 && c.enc_heads > 0 && c.enc_dim % c.enc_heads == 0 && c.enc_layers > 0 && c.enc_ff > 0 &&
                   c.max_crops > 0 && c.overlap_margin >= 0 && 2 * c.overlap_margin < side,
               "vision sizes");
    FUZZ_CHECK(c.dim > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.dim % c.n_heads == 0 &&
                   c.n_heads % c.n_kv_heads == 0 && c.head_dim * c.n_heads == c.dim && c.rot_dims == c.head_dim / 2 &&
                   c.rot_dims % 2 == 0,
               "text heads: dim %d, %d heads, %d kv heads, head dim %d, rot %d", c.dim, c.n_heads, c.n_kv_heads,
               c.head_dim, c.rot_dims);
    FUZZ_CHECK((int64_t)c.prefix_attn == 1 + (int64_t)side * side && c.max_context > c.prefix_attn + 2,
               "prefix %d, context %d", c.prefix_attn, c.max_context);
    FUZZ_CHECK(c.vocab > 0 && c.ff_dim > 0 && c.n_layers > 0 && c.proj_out == c.dim && c.r_dim == c.dim, "text sizes");
    FUZZ_CHECK(c.coord_feat > 0 && c.coord_feat % 2 == 0 && c.size_feat > 0 && c.size_feat % 2 == 0 && c.size_out > 0 &&
                   c.size_out % 2 == 0 && c.coord_out > 0 && c.r_inner > 0,
               "region sizes");
    const md_tmpl *tm[] = {&c.caption[0],    &c.caption[1],    &c.caption[2],   &c.query_prefix, &c.query_suffix,
                           &c.detect_prefix, &c.detect_suffix, &c.point_prefix, &c.point_suffix};
    for (size_t i = 0; i < sizeof tm / sizeof tm[0]; i++) {
        FUZZ_CHECK(tm[i]->n >= 0 && tm[i]->n <= MD_MAX_TEMPLATE, "template %zu has %d ids", i, tm[i]->n);
        for (int k = 0; k < tm[i]->n; k++) FUZZ_CHECK(tm[i]->ids[k] >= 0, "negative template id");
    }

    md_weights w;
    st = md_weights_bind(&w, &c, tiny, &e);
    FUZZ_CHECK(st == ALBEDO_OK || st == ALBEDO_ERR_MODEL_FORMAT || st == ALBEDO_ERR_OUT_OF_MEMORY,
               "md_weights_bind status %d (%s)", (int)st, e.msg);
    if (st == ALBEDO_OK) md_weights_release(&w);
    return 0;
}
