/*
 * synth.c — model directories with seeded random weights.
 *
 * Real Moondream weights cannot be downloaded everywhere the engine is built
 * and tested, so the project makes its own: the full Moondream 2 shapes for
 * benchmarks, and the fixtures' md2-small, bit for bit, from the recipe in
 * shared/fixtures/README.md (every element offset + scale·r with r from
 * splitmix64 keyed by FNV-1a of the tensor name, rounded to bf16). Legacy
 * 2024-08-26 names in F16 are written from the same values to test that
 * loader path.
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
    char name[160];   /* canonical 2025 name without "model." */
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

static int build_specs(const md_config *c, spec_list *l) {
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
        snprintf(p, sizeof p, "text.blocks.%d.attn.proj", i), r |= add_linear(l, p, c->dim, c->n_heads * c->head_dim, 0);
        snprintf(p, sizeof p, "text.blocks.%d.mlp.fc1", i), r |= add_linear(l, p, c->ff_dim, c->dim, 0);
        snprintf(p, sizeof p, "text.blocks.%d.mlp.fc2", i), r |= add_linear(l, p, c->dim, c->ff_dim, 0);
    }
    r |= add_ln(l, "text.post_ln", c->dim);
    r |= add_linear(l, "text.lm_head", c->vocab, c->dim, (float)(3.0 / sqrt((double)c->dim)));
    r |= add(l, "region.coord_features", 2, 1, c->coord_feat / 2, 0, 0.0f, 3.0f);
    r |= add(l, "region.size_features", 2, 2, c->size_feat / 2, 0, 0.0f, 3.0f);
    r |= add_linear(l, "region.coord_encoder", c->r_dim, c->coord_feat, 0);
    r |= add_linear(l, "region.coord_decoder.fc1", c->r_inner, c->r_dim, 0);
    r |= add_linear(l, "region.coord_decoder.fc2", c->coord_out, c->r_inner, 0);
    r |= add_linear(l, "region.size_encoder", c->r_dim, c->size_feat, 0);
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
        if (!strncmp(r, "ln1.", 4)) snprintf(tmp, sizeof tmp, "norm1.%s", r + 4), r = tmp;
        else if (!strncmp(r, "ln2.", 4)) snprintf(tmp, sizeof tmp, "norm2.%s", r + 4), r = tmp;
        snprintf(out, cap, "vision_encoder.encoder.model.visual.blocks.%d.%s", blk, r);
        return;
    }
    if (sscanf(canon, "text.blocks.%d.%127s", &blk, rest) == 2) {
        const char *r = rest;
        char tmp[140];
        if (!strncmp(r, "attn.qkv.", 9)) snprintf(tmp, sizeof tmp, "mixer.Wqkv.%s", r + 9), r = tmp;
        else if (!strncmp(r, "attn.proj.", 10)) snprintf(tmp, sizeof tmp, "mixer.out_proj.%s", r + 10), r = tmp;
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

static const char *small_config_json =
    "{\n  \"architectures\": [\"HfMoondream\"],\n  \"model_type\": \"moondream1\",\n  \"torch_dtype\": \"bfloat16\",\n"
    "  \"config\": {\n"
    "    \"text\": {\"dim\": 128, \"ff_dim\": 264, \"n_layers\": 3, \"vocab_size\": 51200, \"max_context\": 2048,\n"
    "             \"n_heads\": 2, \"n_kv_heads\": 2, \"prefix_attn\": 730},\n"
    "    \"vision\": {\"enc_dim\": 144, \"enc_patch_size\": 14, \"enc_n_layers\": 27, \"enc_ff_dim\": 292,\n"
    "               \"enc_n_heads\": 2, \"proj_out_dim\": 128, \"crop_size\": 378, \"in_channels\": 3,\n"
    "               \"max_crops\": 12, \"overlap_margin\": 4, \"proj_inner_dim\": 200},\n"
    "    \"region\": {\"dim\": 128, \"coord_feat_dim\": 256, \"coord_out_dim\": 1024, \"size_feat_dim\": 512,\n"
    "               \"size_out_dim\": 2048, \"inner_dim\": 160}\n  }\n}\n";

static const char *full_config_json =
    "{\n  \"architectures\": [\"HfMoondream\"],\n  \"model_type\": \"moondream1\",\n  \"torch_dtype\": \"bfloat16\",\n"
    "  \"config\": {}\n}\n";

/* A byte-level BPE tokenizer with the 256 single-byte tokens and no merges:
 * enough to run synthetic models whose vocabulary is random anyway. */
static int write_byte_tokenizer(const char *path, int vocab) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    fprintf(f, "{\"version\": \"1.0\", \"added_tokens\": [], \"normalizer\": null,\n"
               " \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": true},\n"
               " \"post_processor\": null, \"decoder\": {\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true},\n"
               " \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, \"continuing_subword_prefix\": null,\n"
               "  \"end_of_word_suffix\": null, \"fuse_unk\": false, \"byte_fallback\": false, \"ignore_merges\": false, \"vocab\": {");
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
        if (c < 0x80) u[k++] = (char)c;
        else {
            u[k++] = (char)(0xC0 | (c >> 6));
            u[k++] = (char)(0x80 | (c & 0x3F));
        }
        u[k] = 0;
        if (c == '"' || c == '\\') fprintf(f, "%s\"\\%s\": %d", n ? ", " : "", u, b);
        else fprintf(f, "%s\"%s\": %d", n ? ", " : "", u, b);
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

albedo_status albedo_synth_write(const char *dir, const char *preset, uint64_t seed, int legacy_f16,
                                 const char *tokenizer_json) {
    errbuf e = {{0}};
    albedo_status st = ALBEDO_OK;
    const char *cfg_json = NULL;
    if (!dir || !preset) st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "synth: dir and preset are required");
    else if (!strcmp(preset, "md2")) cfg_json = full_config_json;
    else if (!strcmp(preset, "md2-small")) cfg_json = small_config_json;
    else st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "synth: unknown preset '%s' (md2, md2-small)", preset);
    if (st) {
        error_set_last(e.msg);
        return st;
    }
    md_config c;
    md_config_defaults(&c);
    if ((st = md_config_parse(&c, cfg_json, strlen(cfg_json), &e))) {
        error_set_last(e.msg);
        return st;
    }
    if (mkdir(dir, 0755) && errno != EEXIST) {
        errf(&e, ALBEDO_ERR_IO, "%s: %s", dir, strerror(errno));
        error_set_last(e.msg);
        return ALBEDO_ERR_IO;
    }
    char path[4096];
    spec_list l = {0};
    st_tensor *ts = NULL;
    uint16_t *data = NULL;
    if (build_specs(&c, &l)) {
        st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    size_t total = 0;
    for (int i = 0; i < l.n; i++) {
        int64_t n = 1;
        for (int d = 0; d < l.v[i].ndim; d++) n *= l.v[i].shape[d];
        total += (size_t)n;
    }
    ts = calloc(l.n > 0 ? (size_t)l.n : 1, sizeof *ts);
    data = malloc(total * sizeof *data);
    if (!ts || !data) {
        st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "synth: out of memory for %zu weights", total);
        goto done;
    }
    size_t off = 0;
    for (int i = 0; i < l.n; i++) {
        const spec *s = &l.v[i];
        char full[200], stored[220];
        snprintf(full, sizeof full, "model.%s", s->name);
        int64_t n = 1;
        for (int d = 0; d < s->ndim; d++) n *= s->shape[d];
        int transpose = legacy_f16 && !strncmp(s->name, "region.", 7) && strstr(s->name, "_features") ? (int)s->shape[0] : 0;
        fill_job j = {s, data + off, fnv1a64(full) ^ seed, (uint64_t)n, legacy_f16, transpose};
        int nt = n > (1 << 20) ? 4 : 1;
        pthread_t th[4];
        thread_arg ta[4];
        int started = 0;
        for (int t = 0; t < nt; t++) {
            ta[t] = (thread_arg){&j, (uint64_t)n * (uint64_t)t / (uint64_t)nt, (uint64_t)n * (uint64_t)(t + 1) / (uint64_t)nt};
            if (t == 0 || pthread_create(&th[t], NULL, fill_thread, &ta[t])) {
                if (t) fill(&j, ta[t].i0, ta[t].i1);
            } else {
                started |= 1 << t;
            }
        }
        fill(&j, ta[0].i0, ta[0].i1);
        for (int t = 1; t < nt; t++)
            if (started & (1 << t)) pthread_join(th[t], NULL);
        st_tensor *t = &ts[i];
        if (legacy_f16) {
            char lg[200];
            legacy_name(s->name, lg, sizeof lg);
            snprintf(stored, sizeof stored, "%s", lg);
        } else {
            snprintf(stored, sizeof stored, "%s", full);
        }
        t->name = strdup(stored);
        if (!t->name) {
            st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
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
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if ((st = st_write(path, ts, l.n, &e))) goto done;
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "wb");
    if (!f || fputs(cfg_json, f) < 0 || fclose(f)) {
        if (f) fclose(f);
        st = errf(&e, ALBEDO_ERR_IO, "%s: cannot write", path);
        goto done;
    }
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    if (tokenizer_json ? copy_file(tokenizer_json, path) : write_byte_tokenizer(path, c.vocab))
        st = errf(&e, ALBEDO_ERR_IO, "%s: cannot write the tokenizer", path);
done:
    if (ts)
        for (int i = 0; i < l.n; i++) free(ts[i].name);
    free(ts);
    free(data);
    free(l.v);
    if (st) error_set_last(e.msg);
    return st;
}
