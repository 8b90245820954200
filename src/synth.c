/*
 * synth.c — model directories with seeded random weights.
 *
 * Real Moondream weights cannot be downloaded everywhere the engine is built
 * and tested, so the project makes its own: the full Moondream 2 and 3
 * shapes for benchmarks, and the fixtures' md2-small and md3-small, bit for
 * bit, from the recipe in shared/fixtures/README.md (every element offset +
 * scale·r with r from splitmix64 keyed by FNV-1a of the tensor name, rounded
 * to bf16). Legacy 2024-08-26 names in F16 are written from the same values
 * to test that loader path.
 *
 * Presets:
 *   md2        Moondream 2, 1.93 B parameters (3.9 GB), one file
 *   md2-small  the fixture's md2-small (seed 20261127)
 *   md3        Moondream 3 preview, 9.27 B parameters (18.5 GB) with the
 *              region LayerNorm of the current checkpoint, in 5 GB shards
 *              (model-0000k-of-0000N.safetensors + index), written one shard
 *              at a time so that memory stays at one shard
 *   md3-small  the fixture's md3-small (seed 31337): tau in every layer, 64
 *              experts from layer 1, single-layer region decoders, no region LN
 *   md3-alt    a small Moondream 3 of other shapes (tests): 12 experts, 3 a
 *              token, from layer 2 of 4, width 56, 3 heads, region LN
 *
 * This file must be compiled without floating-point contraction: the recipe
 * is defined in separate float multiply and add.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <pthread.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "model.h"

static uint64_t fnv1a64(const char *s) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001B3ull;
    }
    return h;
}

/* Element i of tensor `name`: the fixture recipe, as a float before rounding. */
static float synth_value(uint64_t key, uint64_t i, float offset, float scale) {
    uint64_t z = key + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    double u = (double)(z >> 11) * 0x1.0p-53;
    float r = (float)((2.0 * u - 1.0) * sqrt(3.0));
    volatile float prod = scale * r; /* no fused multiply-add */
    return offset + prod;
}

typedef struct spec {
    char name[160]; /* canonical 2025 name without "model." */
    int ndim;
    int64_t shape[3];
    float offset, scale;
} spec;

typedef struct spec_list {
    spec *v;
    int n, cap;
} spec_list;

static int add(spec_list *l, const char *name, int ndim, int64_t a, int64_t b, int64_t c, float offset, float scale) {
    if (l->n == l->cap) {
        int nc = l->cap ? l->cap * 2 : 256;
        spec *p = realloc(l->v, (size_t)nc * sizeof *p);
        if (!p) return -1;
        l->v = p;
        l->cap = nc;
    }
    spec *s = &l->v[l->n++];
    snprintf(s->name, sizeof s->name, "%s", name);
    s->ndim = ndim;
    s->shape[0] = a;
    s->shape[1] = b;
    s->shape[2] = c;
    s->offset = offset;
    s->scale = scale;
    return 0;
}

static int add_linear(spec_list *l, const char *prefix, int out, int in, float wscale) {
    char n[160];
    snprintf(n, sizeof n, "%s.weight", prefix);
    if (add(l, n, 2, out, in, 0, 0.0f, wscale > 0 ? wscale : (float)(1.0 / sqrt((double)in)))) return -1;
    snprintf(n, sizeof n, "%s.bias", prefix);
    return add(l, n, 1, out, 0, 0, 0.0f, 0.05f);
}

static int add_ln(spec_list *l, const char *prefix, int dim) {
    char n[160];
    snprintf(n, sizeof n, "%s.weight", prefix);
    if (add(l, n, 1, dim, 0, 0, 1.0f, 0.1f)) return -1;
    snprintf(n, sizeof n, "%s.bias", prefix);
    return add(l, n, 1, dim, 0, 0, 0.0f, 0.1f);
}

/* Moondream 3 extras of a text block (tau; experts instead of the dense MLP). */
static int add_md3_block(spec_list *l, const md_config *c, int i, int qkv) {
    char p[160];
    int r = 0;
    const float tau_scale = (float)(1.0 / sqrt((double)qkv));
    snprintf(p, sizeof p, "text.blocks.%d.attn.tau.wq", i), r |= add(l, p, 2, c->n_heads, qkv, 0, 0.0f, tau_scale);
    snprintf(p, sizeof p, "text.blocks.%d.attn.tau.wv", i), r |= add(l, p, 2, c->n_heads, qkv, 0, 0.0f, tau_scale);
    snprintf(p, sizeof p, "text.blocks.%d.attn.tau.alpha", i), r |= add(l, p, 1, c->n_heads, 0, 0, 0.0f, 1.0f);
    return r;
}

static int add_experts(spec_list *l, const md_config *c, int i) {
    char p[160];
    int r = 0;
    snprintf(p, sizeof p, "text.blocks.%d.mlp.router", i), r |= add_linear(l, p, c->moe_experts, c->dim, 0);
    snprintf(p, sizeof p, "text.blocks.%d.mlp.fc1.weight", i);
    r |= add(l, p, 3, c->moe_experts, 2 * c->moe_inner, c->dim, 0.0f, (float)(1.0 / sqrt((double)c->dim)));
    snprintf(p, sizeof p, "text.blocks.%d.mlp.fc2.weight", i);
    r |= add(l, p, 3, c->moe_experts, c->dim, c->moe_inner, 0.0f, (float)(1.0 / sqrt((double)c->moe_inner)));
    return r;
}

static int build_specs(const md_config *c, int region_ln, spec_list *l) {
    char p[160];
    const int np = (c->crop_size / c->patch) * (c->crop_size / c->patch);
    int r = 0;
    r |= add_linear(l, "vision.patch_emb", c->enc_dim, c->in_ch * c->patch * c->patch, 0);
    r |= add(l, "vision.pos_emb", 3, 1, np, c->enc_dim, 0.0f, 0.5f);
    for (int i = 0; i < c->enc_layers; i++) {
        snprintf(p, sizeof p, "vision.blocks.%d.ln1", i), r |= add_ln(l, p, c->enc_dim);
        snprintf(p, sizeof p, "vision.blocks.%d.attn.qkv", i), r |= add_linear(l, p, 3 * c->enc_dim, c->enc_dim, 0);
        snprintf(p, sizeof p, "vision.blocks.%d.attn.proj", i), r |= add_linear(l, p, c->enc_dim, c->enc_dim, 0);
        snprintf(p, sizeof p, "vision.blocks.%d.ln2", i), r |= add_ln(l, p, c->enc_dim);
        snprintf(p, sizeof p, "vision.blocks.%d.mlp.fc1", i), r |= add_linear(l, p, c->enc_ff, c->enc_dim, 0);
        snprintf(p, sizeof p, "vision.blocks.%d.mlp.fc2", i), r |= add_linear(l, p, c->enc_dim, c->enc_ff, 0);
    }
    r |= add_ln(l, "vision.post_ln", c->enc_dim);
    r |= add_linear(l, "vision.proj_mlp.fc1", c->proj_inner, 2 * c->enc_dim, 0);
    r |= add_linear(l, "vision.proj_mlp.fc2", c->proj_out, c->proj_inner, 0);
    r |= add(l, "text.wte", 2, c->vocab, c->dim, 0, 0.0f, 1.0f);
    const int qkv = (c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
    for (int i = 0; i < c->n_layers; i++) {
        snprintf(p, sizeof p, "text.blocks.%d.ln", i), r |= add_ln(l, p, c->dim);
        snprintf(p, sizeof p, "text.blocks.%d.attn.qkv", i), r |= add_linear(l, p, qkv, c->dim, 0);
        snprintf(p, sizeof p, "text.blocks.%d.attn.proj", i),
            r |= add_linear(l, p, c->dim, c->n_heads * c->head_dim, 0);
        if (c->md3) r |= add_md3_block(l, c, i, qkv);
        if (c->moe_experts && i >= c->moe_start) {
            r |= add_experts(l, c, i);
            continue;
        }
        snprintf(p, sizeof p, "text.blocks.%d.mlp.fc1", i), r |= add_linear(l, p, c->ff_dim, c->dim, 0);
        snprintf(p, sizeof p, "text.blocks.%d.mlp.fc2", i), r |= add_linear(l, p, c->dim, c->ff_dim, 0);
    }
    r |= add_ln(l, "text.post_ln", c->dim);
    r |= add_linear(l, "text.lm_head", c->vocab, c->dim, (float)(3.0 / sqrt((double)c->dim)));
    r |= add(l, "region.coord_features", 2, 1, c->coord_feat / 2, 0, 0.0f, 3.0f);
    r |= add(l, "region.size_features", 2, 2, c->size_feat / 2, 0, 0.0f, 3.0f);
    r |= add_linear(l, "region.coord_encoder", c->r_dim, c->coord_feat, 0);
    r |= add_linear(l, "region.size_encoder", c->r_dim, c->size_feat, 0);
    if (c->md3) {
        /* single linear decoders (+ the LayerNorm of the current checkpoint) */
        r |= add_linear(l, "region.coord_decoder", c->coord_out, c->r_dim, 0);
        r |= add_linear(l, "region.size_decoder", c->size_out, c->r_dim, 0);
        if (region_ln) r |= add_ln(l, "region.ln", c->r_dim);
        return r;
    }
    r |= add_linear(l, "region.coord_decoder.fc1", c->r_inner, c->r_dim, 0);
    r |= add_linear(l, "region.coord_decoder.fc2", c->coord_out, c->r_inner, 0);
    r |= add_linear(l, "region.size_decoder.fc1", c->r_inner, c->r_dim, 0);
    r |= add_linear(l, "region.size_decoder.fc2", c->size_out, c->r_inner, 0);
    return r;
}

/* The 2024-08-26 name of a canonical name (inverse of weights.c's map). */
static void legacy_name(const char *canon, char *out, size_t cap) {
    static const struct {
        const char *to, *from;
    } flat[] = {
        {"vision_encoder.encoder.model.visual.patch_embed.linear.", "vision.patch_emb."},
        {"vision_encoder.encoder.model.visual.pos_embed", "vision.pos_emb"},
        {"vision_encoder.encoder.model.visual.norm.", "vision.post_ln."},
        {"vision_encoder.projection.mlp.", "vision.proj_mlp."},
        {"text_model.transformer.embd.wte.weight", "text.wte"},
        {"text_model.lm_head.ln.", "text.post_ln."},
        {"text_model.lm_head.linear.", "text.lm_head."},
        {"region_model.coordinate_features.weight", "region.coord_features"},
        {"region_model.size_features.weight", "region.size_features"},
        {"region_model.coordinate_encoder.", "region.coord_encoder."},
        {"region_model.coordinate_decoder.", "region.coord_decoder."},
        {"region_model.size_encoder.", "region.size_encoder."},
        {"region_model.size_decoder.", "region.size_decoder."},
    };
    for (size_t i = 0; i < sizeof flat / sizeof flat[0]; i++) {
        size_t k = strlen(flat[i].from);
        if (!strncmp(canon, flat[i].from, k)) {
            snprintf(out, cap, "%s%s", flat[i].to, canon + k);
            return;
        }
    }
    int blk;
    char rest[128];
    if (sscanf(canon, "vision.blocks.%d.%127s", &blk, rest) == 2) {
        const char *r = rest;
        char tmp[140];
        if (!strncmp(r, "ln1.", 4))
            snprintf(tmp, sizeof tmp, "norm1.%s", r + 4), r = tmp;
        else if (!strncmp(r, "ln2.", 4))
            snprintf(tmp, sizeof tmp, "norm2.%s", r + 4), r = tmp;
        snprintf(out, cap, "vision_encoder.encoder.model.visual.blocks.%d.%s", blk, r);
        return;
    }
    if (sscanf(canon, "text.blocks.%d.%127s", &blk, rest) == 2) {
        const char *r = rest;
        char tmp[140];
        if (!strncmp(r, "attn.qkv.", 9))
            snprintf(tmp, sizeof tmp, "mixer.Wqkv.%s", r + 9), r = tmp;
        else if (!strncmp(r, "attn.proj.", 10))
            snprintf(tmp, sizeof tmp, "mixer.out_proj.%s", r + 10), r = tmp;
        snprintf(out, cap, "text_model.transformer.h.%d.%s", blk, r);
        return;
    }
    snprintf(out, cap, "%s", canon);
}

typedef struct fill_job {
    const spec *s;
    uint16_t *dst;
    uint64_t key, n;
    int f16, transpose_rows; /* transpose [rows, n/rows] → [n/rows, rows] */
} fill_job;

static void fill(const fill_job *j, uint64_t i0, uint64_t i1) {
    const uint64_t cols = j->transpose_rows ? j->n / (uint64_t)j->transpose_rows : 0;
    for (uint64_t i = i0; i < i1; i++) {
        float v = bf16_to_f32(f32_to_bf16(synth_value(j->key, i, j->s->offset, j->s->scale)));
        uint64_t at = i;
        if (j->transpose_rows) at = (i % cols) * (uint64_t)j->transpose_rows + i / cols;
        j->dst[at] = j->f16 ? f32_to_f16(v) : f32_to_bf16(v);
    }
}

typedef struct thread_arg {
    const fill_job *j;
    uint64_t i0, i1;
} thread_arg;

static void *fill_thread(void *p) {
    thread_arg *a = p;
    fill(a->j, a->i0, a->i1);
    return NULL;
}

static const char small_config_json[] =
    "{\n  \"architectures\": [\"HfMoondream\"],\n  \"model_type\": \"moondream1\",\n  \"torch_dtype\": \"bfloat16\",\n"
    "  \"config\": {\n"
    "    \"text\": {\"dim\": 128, \"ff_dim\": 264, \"n_layers\": 3, \"vocab_size\": 51200, \"max_context\": 2048,\n"
    "             \"n_heads\": 2, \"n_kv_heads\": 2, \"prefix_attn\": 730},\n"
    "    \"vision\": {\"enc_dim\": 144, \"enc_patch_size\": 14, \"enc_n_layers\": 27, \"enc_ff_dim\": 292,\n"
    "               \"enc_n_heads\": 2, \"proj_out_dim\": 128, \"crop_size\": 378, \"in_channels\": 3,\n"
    "               \"max_crops\": 12, \"overlap_margin\": 4, \"proj_inner_dim\": 200},\n"
    "    \"region\": {\"dim\": 128, \"coord_feat_dim\": 256, \"coord_out_dim\": 1024, \"size_feat_dim\": 512,\n"
    "               \"size_out_dim\": 2048, \"inner_dim\": 160}\n  }\n}\n";

static const char full_config_json[] =
    "{\n  \"architectures\": [\"HfMoondream\"],\n  \"model_type\": \"moondream1\",\n  \"torch_dtype\": \"bfloat16\",\n"
    "  \"config\": {}\n}\n";

/* Byte for byte the fixture's md3-small/config.json. */
static const char md3_small_config_json[] =
    "{\n  \"architectures\": [\n    \"HfMoondream\"\n  ],\n  \"model_type\": \"moondream1\",\n"
    "  \"torch_dtype\": \"bfloat16\",\n  \"config\": {\n    \"text\": {\n      \"dim\": 128,\n      \"ff_dim\": 264,\n"
    "      \"n_layers\": 3,\n      \"vocab_size\": 51200,\n      \"max_context\": 4096,\n      \"n_heads\": 2,\n"
    "      \"n_kv_heads\": 2,\n      \"prefix_attn\": 730,\n      \"moe\": {\n        \"num_experts\": 64,\n"
    "        \"start_layer\": 1,\n        \"experts_per_token\": 8,\n        \"expert_inner_dim\": 40\n      }\n    "
    "},\n"
    "    \"vision\": {\n      \"enc_dim\": 144,\n      \"enc_patch_size\": 14,\n      \"enc_n_layers\": 27,\n"
    "      \"enc_ff_dim\": 292,\n      \"enc_n_heads\": 2,\n      \"proj_out_dim\": 128,\n      \"crop_size\": 378,\n"
    "      \"in_channels\": 3,\n      \"max_crops\": 12,\n      \"overlap_margin\": 4,\n      \"proj_inner_dim\": 200\n"
    "    },\n    \"region\": {\n      \"dim\": 128,\n      \"coord_feat_dim\": 256,\n      \"coord_out_dim\": 1024,\n"
    "      \"size_feat_dim\": 512,\n      \"size_out_dim\": 2048\n    }\n  }\n}";

/* Moondream 3 preview: the Moondream 2 shapes plus the experts; θ and the
 * 4096-position context are Moondream 3's defaults. */
static const char md3_config_json[] =
    "{\n  \"architectures\": [\"HfMoondream\"],\n  \"model_type\": \"moondream1\",\n  \"torch_dtype\": \"bfloat16\",\n"
    "  \"config\": {\n    \"text\": {\"moe\": {\"num_experts\": 64, \"start_layer\": 4, \"experts_per_token\": 8,\n"
    "                      \"expert_inner_dim\": 1024}}\n  }\n}\n";

/* A Moondream 3 of other shapes than md3-small's, for the tests: 12 experts,
 * 3 a token, from layer 2 of 4, expert width 56, 3 heads of 64, and the
 * region decoders' LayerNorm; widths that are not multiples of the SIMD
 * widths or the GPU tiles. */
static const char md3_alt_config_json[] =
    "{\n  \"architectures\": [\"HfMoondream\"],\n  \"model_type\": \"moondream1\",\n  \"torch_dtype\": \"bfloat16\",\n"
    "  \"config\": {\n    \"text\": {\"dim\": 192, \"ff_dim\": 200, \"n_layers\": 4, \"vocab_size\": 51200,\n"
    "      \"max_context\": 4096, \"n_heads\": 3, \"n_kv_heads\": 3, \"prefix_attn\": 730,\n"
    "      \"moe\": {\"num_experts\": 12, \"start_layer\": 2, \"experts_per_token\": 3, \"expert_inner_dim\": 56}},\n"
    "    \"vision\": {\"enc_dim\": 144, \"enc_patch_size\": 14, \"enc_n_layers\": 3, \"enc_ff_dim\": 292,\n"
    "      \"enc_n_heads\": 2, \"proj_out_dim\": 192, \"crop_size\": 378, \"in_channels\": 3, \"max_crops\": 12,\n"
    "      \"overlap_margin\": 4, \"proj_inner_dim\": 200},\n"
    "    \"region\": {\"dim\": 192, \"coord_feat_dim\": 256, \"coord_out_dim\": 1024, \"size_feat_dim\": 512,\n"
    "      \"size_out_dim\": 2048}\n  }\n}\n";

typedef struct preset {
    const char *name, *config_json;
    int region_ln;
    uint64_t shard_bytes; /* default shard size; 0: one file */
} preset;

static const preset presets[] = {
    {"md2", full_config_json, 0, 0},
    {"md2-small", small_config_json, 0, 0},
    {"md3", md3_config_json, 1, 5000000000ull},
    {"md3-small", md3_small_config_json, 0, 0},
    {"md3-alt", md3_alt_config_json, 1, 0},
};

/* A byte-level BPE tokenizer with the 256 single-byte tokens and no merges:
 * enough to run synthetic models whose vocabulary is random anyway. */
static int write_byte_tokenizer(const char *path, int vocab) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    fprintf(
        f,
        "{\"version\": \"1.0\", \"added_tokens\": [], \"normalizer\": null,\n"
        " \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, "
        "\"use_regex\": true},\n"
        " \"post_processor\": null, \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, "
        "\"trim_offsets\": true, \"use_regex\": true},\n"
        " \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, \"continuing_subword_prefix\": null,\n"
        "  \"end_of_word_suffix\": null, \"fuse_unk\": false, \"byte_fallback\": false, \"ignore_merges\": false, "
        "\"vocab\": {");
    /* GPT-2's byte-to-unicode alphabet: printable Latin-1 bytes map to
     * themselves, the others to U+0100 onwards. */
    int n = 0, cp[256], extra = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        cp[b] = printable ? b : 256 + extra++;
    }
    for (int b = 0; b < 256 && b < vocab; b++) {
        char u[8];
        int c = cp[b], k = 0;
        if (c < 0x80)
            u[k++] = (char)c;
        else {
            u[k++] = (char)(0xC0 | (c >> 6));
            u[k++] = (char)(0x80 | (c & 0x3F));
        }
        u[k] = 0;
        if (c == '"' || c == '\\')
            fprintf(f, "%s\"\\%s\": %d", n ? ", " : "", u, b);
        else
            fprintf(f, "%s\"%s\": %d", n ? ", " : "", u, b);
        n++;
    }
    fprintf(f, "}, \"merges\": []}}\n");
    return fclose(f) ? -1 : 0;
}

static int copy_file(const char *from, const char *to) {
    FILE *a = fopen(from, "rb");
    if (!a) return -1;
    FILE *b = fopen(to, "wb");
    if (!b) {
        fclose(a);
        return -1;
    }
    char buf[65536];
    size_t n;
    int ok = 1;
    while ((n = fread(buf, 1, sizeof buf, a)) > 0) ok &= fwrite(buf, 1, n, b) == n;
    fclose(a);
    if (fclose(b)) ok = 0;
    return ok ? 0 : -1;
}

/* The preset's config and tensor list. */
static albedo_status plan(const char *name, const preset **out, md_config *c, spec_list *l, errbuf *e) {
    const preset *p = NULL;
    for (size_t i = 0; name && i < sizeof presets / sizeof presets[0]; i++)
        if (!strcmp(presets[i].name, name)) p = &presets[i];
    if (!p)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT,
                    "synth: unknown preset '%s' (md2, md2-small, md3, md3-small, md3-alt)", name ? name : "");
    md_config_defaults(c);
    albedo_status st = md_config_parse(c, p->config_json, strlen(p->config_json), e);
    if (st) return st;
    if (build_specs(c, p->region_ln, l)) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    *out = p;
    return ALBEDO_OK;
}

static int64_t numel(const spec *s) {
    int64_t n = 1;
    for (int d = 0; d < s->ndim; d++) n *= s->shape[d];
    return n;
}

albedo_status synth_plan(const char *name, int *n_tensors, int64_t *n_params) {
    errbuf e = {{0}};
    const preset *p;
    md_config c;
    spec_list l = {0};
    albedo_status st = plan(name, &p, &c, &l, &e);
    if (!st) {
        int64_t total = 0;
        for (int i = 0; i < l.n; i++) total += numel(&l.v[i]);
        *n_tensors = l.n;
        *n_params = total;
    } else {
        error_set_last(e.msg);
    }
    free(l.v);
    return st;
}

/* Fill tensors [i0, i1) of l into one safetensors file at path. */
static albedo_status write_shard(const char *path, const spec_list *l, int i0, int i1, uint64_t seed, int legacy_f16,
                                 errbuf *e) {
    albedo_status st = ALBEDO_OK;
    size_t total = 0;
    for (int i = i0; i < i1; i++) total += (size_t)numel(&l->v[i]);
    st_tensor *ts = calloc((size_t)(i1 - i0) + 1, sizeof *ts);
    uint16_t *data = malloc((total ? total : 1) * sizeof *data);
    if (!ts || !data) {
        st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "synth: out of memory for %zu weights", total);
        goto done;
    }
    size_t off = 0;
    for (int i = i0; i < i1; i++) {
        const spec *s = &l->v[i];
        char full[200], stored[220];
        snprintf(full, sizeof full, "model.%s", s->name);
        int64_t n = numel(s);
        int transpose =
            legacy_f16 && !strncmp(s->name, "region.", 7) && strstr(s->name, "_features") ? (int)s->shape[0] : 0;
        fill_job j = {s, data + off, fnv1a64(full) ^ seed, (uint64_t)n, legacy_f16, transpose};
        int nt = n > (1 << 20) ? 4 : 1;
        pthread_t th[4];
        thread_arg ta[4];
        int started = 0;
        for (int t = 0; t < nt; t++) {
            ta[t] = (thread_arg){&j, (uint64_t)n * (uint64_t)t / (uint64_t)nt,
                                 (uint64_t)n * (uint64_t)(t + 1) / (uint64_t)nt};
            if (t == 0 || pthread_create(&th[t], NULL, fill_thread, &ta[t])) {
                if (t) fill(&j, ta[t].i0, ta[t].i1);
            } else {
                started |= 1 << t;
            }
        }
        fill(&j, ta[0].i0, ta[0].i1);
        for (int t = 1; t < nt; t++)
            if (started & (1 << t)) pthread_join(th[t], NULL);
        st_tensor *t = &ts[i - i0];
        if (legacy_f16) {
            char lg[200];
            legacy_name(s->name, lg, sizeof lg);
            snprintf(stored, sizeof stored, "%s", lg);
        } else {
            snprintf(stored, sizeof stored, "%s", full);
        }
        t->name = strdup(stored);
        if (!t->name) {
            st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
            goto done;
        }
        t->dt = legacy_f16 ? DT_F16 : DT_BF16;
        t->ndim = s->ndim;
        for (int d = 0; d < s->ndim; d++) t->shape[d] = s->shape[d];
        if (transpose) {
            t->shape[0] = s->shape[1];
            t->shape[1] = s->shape[0];
        }
        t->numel = n;
        t->data = data + off;
        t->nbytes = (size_t)n * 2;
        off += (size_t)n;
    }
    st = st_write(path, ts, i1 - i0, e);
done:
    if (ts)
        for (int i = 0; i < i1 - i0; i++) free(ts[i].name);
    free(ts);
    free(data);
    return st;
}

/* model.safetensors.index.json of the Hugging Face sharded layout. */
static albedo_status write_index(const char *path, const spec_list *l, const int *shard_of, int n_shards, errbuf *e) {
    json_t *root = json_object(), *meta = json_object(), *map = json_object();
    int64_t bytes = 0;
    char file[64], name[200];
    for (int i = 0; i < l->n; i++) {
        bytes += 2 * numel(&l->v[i]);
        snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", shard_of[i] + 1, n_shards);
        snprintf(name, sizeof name, "model.%s", l->v[i].name);
        json_object_set_new(map, name, json_string(file));
    }
    json_object_set_new(meta, "total_size", json_integer((json_int_t)bytes));
    json_object_set_new(root, "metadata", meta);
    json_object_set_new(root, "weight_map", map);
    int r = json_dump_file(root, path, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(root);
    return r ? errf(e, ALBEDO_ERR_IO, "%s: cannot write", path) : ALBEDO_OK;
}

albedo_status synth_write_sharded(const char *dir, const char *preset_name, uint64_t seed, int legacy_f16,
                                  const char *tokenizer_json, uint64_t shard_bytes) {
    errbuf e = {{0}};
    albedo_status st = ALBEDO_OK;
    const preset *p = NULL;
    md_config c;
    spec_list l = {0};
    int *shard_of = NULL;
    char path[4096];
    if (!dir || !preset_name) {
        st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "synth: dir and preset are required");
        goto done;
    }
    if ((st = plan(preset_name, &p, &c, &l, &e))) goto done;
    if (legacy_f16 && c.md3) {
        st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "synth: legacy 2024-08-26 names exist for Moondream 2 presets only");
        goto done;
    }
    if (mkdir(dir, 0755) && errno != EEXIST) {
        st = errf(&e, ALBEDO_ERR_IO, "%s: %s", dir, strerror(errno));
        goto done;
    }
    /* Consecutive tensors fill a shard up to shard_bytes (a larger tensor
     * gets a shard of its own). */
    shard_of = malloc((size_t)(l.n > 0 ? l.n : 1) * sizeof *shard_of);
    if (!shard_of) {
        st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    int n_shards = 1;
    uint64_t cur = 0;
    for (int i = 0; i < l.n; i++) {
        uint64_t b = 2 * (uint64_t)numel(&l.v[i]);
        if (shard_bytes && cur > 0 && cur + b > shard_bytes) {
            n_shards++;
            cur = 0;
        }
        cur += b;
        shard_of[i] = n_shards - 1;
    }
    /* Drop the other layout's files so that the loader cannot pick a stale one. */
    snprintf(path, sizeof path, "%s/%s", dir, n_shards > 1 ? "model.safetensors" : "model.safetensors.index.json");
    unlink(path);
    for (int k = 0, i0 = 0; k < n_shards && !st; k++) {
        int i1 = i0;
        while (i1 < l.n && shard_of[i1] == k) i1++;
        if (n_shards > 1)
            snprintf(path, sizeof path, "%s/model-%05d-of-%05d.safetensors", dir, k + 1, n_shards);
        else
            snprintf(path, sizeof path, "%s/model.safetensors", dir);
        st = write_shard(path, &l, i0, i1, seed, legacy_f16, &e);
        i0 = i1;
    }
    if (!st && n_shards > 1) {
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        st = write_index(path, &l, shard_of, n_shards, &e);
    }
    if (st) goto done;
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "wb");
    if (!f || fputs(p->config_json, f) < 0 || fclose(f)) {
        if (f) fclose(f);
        st = errf(&e, ALBEDO_ERR_IO, "%s: cannot write", path);
        goto done;
    }
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    if (tokenizer_json ? copy_file(tokenizer_json, path) : write_byte_tokenizer(path, c.vocab))
        st = errf(&e, ALBEDO_ERR_IO, "%s: cannot write the tokenizer", path);
done:
    free(shard_of);
    free(l.v);
    if (st) error_set_last(e.msg);
    return st;
}

albedo_status albedo_synth_write(const char *dir, const char *preset_name, uint64_t seed, int legacy_f16,
                                 const char *tokenizer_json) {
    uint64_t shard = 0;
    for (size_t i = 0; preset_name && i < sizeof presets / sizeof presets[0]; i++)
        if (!strcmp(presets[i].name, preset_name)) shard = presets[i].shard_bytes;
    return synth_write_sharded(dir, preset_name, seed, legacy_f16, tokenizer_json, shard);
}

albedo_status albedo_synth_write_shards(const char *dir, const char *preset_name, uint64_t seed,
                                        const char *tokenizer_json, uint64_t shard_bytes) {
    return synth_write_sharded(dir, preset_name, seed, 0, tokenizer_json, shard_bytes);
}
