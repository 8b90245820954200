/*
 * config.c — Moondream's configuration: the Moondream 2 defaults of
 * spec/model.md §2 and the overrides of a checkpoint's config.json.
 *
 * The Hugging Face checkpoint wraps the model config as
 * {"architectures": ["HfMoondream"], ..., "config": {"text": {...},
 * "vision": {...}, "region": {...}}}; an empty "config" means the real
 * Moondream 2. Unknown keys are ignored (newer files may add some); a known
 * key with the wrong type or an impossible value is an error naming it.
 *
 * Moondream 3 (spec/model.md §10) is recognised by "moe" nested under "text"
 * ({"num_experts", "experts_per_token", "expert_inner_dim", "start_layer"});
 * it switches the rotary θ and context defaults and the generation rules.
 * A checkpoint whose config has no "moe" but whose tensors are Moondream 3's
 * is switched later, from the tensors (weights.c, md_config_from_tensors).
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>

#include "model.h"

static void tmpl(md_tmpl *t, int n, const int32_t *ids) {
    t->n = n;
    for (int i = 0; i < n; i++) t->ids[i] = ids[i];
}

#define TMPL(t, ...)                                           \
    do {                                                       \
        static const int32_t ids_[] = {__VA_ARGS__};           \
        tmpl(&(t), (int)(sizeof ids_ / sizeof ids_[0]), ids_); \
    } while (0)

void md_config_defaults(md_config *c) {
    memset(c, 0, sizeof *c);
    c->crop_size = 378;
    c->patch = 14;
    c->in_ch = 3;
    c->enc_dim = 1152;
    c->enc_layers = 27;
    c->enc_heads = 16;
    c->enc_ff = 4304;
    c->max_crops = 12;
    c->overlap_margin = 4;
    c->proj_inner = 8192;
    c->proj_out = 2048;

    c->dim = 2048;
    c->ff_dim = 8192;
    c->n_layers = 24;
    c->vocab = 51200;
    c->max_context = 2048;
    c->n_heads = 32;
    c->n_kv_heads = 32;
    c->rope_theta = 10000.0f;

    c->r_dim = 2048;
    c->coord_feat = 256;
    c->coord_out = 1024;
    c->size_feat = 512;
    c->size_out = 2048;
    c->r_inner = 8192;

    c->bos = 0;
    c->eos = 0;
    c->answer_id = 3;
    c->thinking_id = 4;
    c->coord_id = 5;
    c->size_id = 6;
    c->start_ground_id = 7;
    c->end_ground_id = 9;

    TMPL(c->caption[ALBEDO_LENGTH_SHORT], 1, 32708, 2, 12492, 3);
    TMPL(c->caption[ALBEDO_LENGTH_NORMAL], 1, 32708, 2, 6382, 3);
    TMPL(c->caption[ALBEDO_LENGTH_LONG], 1, 32708, 2, 4059, 3);
    TMPL(c->query_prefix, 1, 15381, 2);
    TMPL(c->query_suffix, 3);
    TMPL(c->detect_prefix, 1, 7235, 476, 2);
    TMPL(c->detect_suffix, 3);
    TMPL(c->point_prefix, 1, 2581, 2);
    TMPL(c->point_suffix, 3);

    c->query_suffix_twice = 1;
    c->reasoning_after_suffix = 1;
    c->points_coord_or_eos = 0;

    c->default_temperature = 0.5f;
    c->default_top_p = 0.3f;
    c->default_max_tokens = 768;
    c->default_max_objects = 50;
}

void md_config_set_md3(md_config *c) {
    c->md3 = 1;
    /* The HF reference config: θ 1.5e6 and a 4096-position cache. */
    if (!c->set_rope_theta) c->rope_theta = 1500000.0f;
    if (!c->set_max_context) c->max_context = 4096;
    c->query_suffix_twice = 0;
    c->reasoning_after_suffix = 0;
    c->points_coord_or_eos = 1;
    /* §13.1. The HF code also reasons by default; albedo keeps reasoning an
     * explicit request flag (albedo_request.reasoning) for both generations. */
    c->default_temperature = 0.5f;
    c->default_top_p = 0.9f;
    c->default_max_tokens = 768;
    c->default_max_objects = 150;
}

/* text.moe: every key optional, defaulting to the real Moondream 3's. */
static albedo_status parse_moe(md_config *c, json_t *moe, errbuf *e) {
    if (!json_is_object(moe)) return errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: config.text.moe must be an object");
    static const struct {
        const char *key;
        size_t off;
        int def, min, max;
    } keys[] = {
        {"num_experts", offsetof(md_config, moe_experts), 64, 1, 4096},
        {"experts_per_token", offsetof(md_config, moe_topk), 8, 1, 4096},
        {"expert_inner_dim", offsetof(md_config, moe_inner), 1024, 1, 1 << 16},
        {"start_layer", offsetof(md_config, moe_start), 4, 0, 1 << 16},
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        int *dst = (int *)((char *)c + keys[i].off);
        json_t *v = json_object_get(moe, keys[i].key);
        if (!v || json_is_null(v)) {
            *dst = keys[i].def;
            continue;
        }
        if (!json_is_integer(v) || json_integer_value(v) < keys[i].min || json_integer_value(v) > keys[i].max)
            return errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: config.text.moe.%s: expected an integer in [%d, %d]",
                        keys[i].key, keys[i].min, keys[i].max);
        *dst = (int)json_integer_value(v);
    }
    return ALBEDO_OK;
}

typedef struct field {
    const char *section, *key;
    size_t off;
    int is_float;
} field;

#define F(sec, key, member) \
    { sec, key, offsetof(md_config, member), 0 }
static const field fields[] = {
    F("vision", "crop_size", crop_size),
    F("vision", "enc_patch_size", patch),
    F("vision", "in_channels", in_ch),
    F("vision", "enc_dim", enc_dim),
    F("vision", "enc_n_layers", enc_layers),
    F("vision", "enc_n_heads", enc_heads),
    F("vision", "enc_ff_dim", enc_ff),
    F("vision", "max_crops", max_crops),
    F("vision", "overlap_margin", overlap_margin),
    F("vision", "proj_inner_dim", proj_inner),
    F("vision", "proj_out_dim", proj_out),
    F("text", "dim", dim),
    F("text", "ff_dim", ff_dim),
    F("text", "n_layers", n_layers),
    F("text", "vocab_size", vocab),
    F("text", "max_context", max_context),
    F("text", "n_heads", n_heads),
    F("text", "n_kv_heads", n_kv_heads),
    F("region", "dim", r_dim),
    F("region", "coord_feat_dim", coord_feat),
    F("region", "coord_out_dim", coord_out),
    F("region", "size_feat_dim", size_feat),
    F("region", "size_out_dim", size_out),
    F("region", "inner_dim", r_inner),
    F("tokenizer", "bos_id", bos),
    F("tokenizer", "eos_id", eos),
    F("tokenizer", "answer_id", answer_id),
    F("tokenizer", "thinking_id", thinking_id),
    F("tokenizer", "coord_id", coord_id),
    F("tokenizer", "size_id", size_id),
    F("tokenizer", "start_ground_points_id", start_ground_id),
    F("tokenizer", "end_ground_id", end_ground_id),
};
#undef F

/* Upper bounds that keep every size computation far from overflow; real
 * models are orders of magnitude below them. */
#define MAX_DIM (1 << 16)
#define MAX_VOCAB (1 << 22)

static albedo_status parse_tmpl(json_t *v, const char *name, md_tmpl *t, errbuf *e) {
    if (!json_is_array(v) || json_array_size(v) > MD_MAX_TEMPLATE)
        return errf(e, ALBEDO_ERR_MODEL_FORMAT,
                    "config.json: tokenizer.templates.%s: expected a list of at most %d token ids", name,
                    MD_MAX_TEMPLATE);
    t->n = (int)json_array_size(v);
    for (int i = 0; i < t->n; i++) {
        json_t *x = json_array_get(v, (size_t)i);
        if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) >= MAX_VOCAB)
            return errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: tokenizer.templates.%s[%d]: not a token id", name, i);
        t->ids[i] = (int32_t)json_integer_value(x);
    }
    return ALBEDO_OK;
}

static albedo_status parse_templates(md_config *c, json_t *tp, errbuf *e) {
    if (!json_is_object(tp))
        return errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: tokenizer.templates: expected an object");
    albedo_status st = ALBEDO_OK;
    json_t *cap = json_object_get(tp, "caption");
    if (json_is_object(cap)) {
        static const char *const names[3] = {"normal", "short", "long"};
        for (int i = 0; i < 3 && !st; i++) {
            json_t *v = json_object_get(cap, names[i]);
            if (v) st = parse_tmpl(v, names[i], &c->caption[i], e);
        }
    }
    static const struct {
        const char *k;
        size_t pre, suf;
    } pairs[] = {{"query", offsetof(md_config, query_prefix), offsetof(md_config, query_suffix)},
                 {"detect", offsetof(md_config, detect_prefix), offsetof(md_config, detect_suffix)},
                 {"point", offsetof(md_config, point_prefix), offsetof(md_config, point_suffix)}};
    for (size_t i = 0; i < 3 && !st; i++) {
        json_t *o = json_object_get(tp, pairs[i].k);
        if (!json_is_object(o)) continue;
        json_t *p = json_object_get(o, "prefix"), *s = json_object_get(o, "suffix");
        if (p) st = parse_tmpl(p, pairs[i].k, (md_tmpl *)((char *)c + pairs[i].pre), e);
        if (!st && s) st = parse_tmpl(s, pairs[i].k, (md_tmpl *)((char *)c + pairs[i].suf), e);
    }
    return st;
}

albedo_status md_config_parse(md_config *c, const char *json, size_t len, errbuf *e) {
    json_error_t je;
    json_t *root = json_loadb(json, len, 0, &je);
    if (!root) return errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: invalid JSON at line %d: %s", je.line, je.text);
    albedo_status st = ALBEDO_OK;
    json_t *cfg = root;
    if (!json_is_object(root)) {
        st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: expected a JSON object");
        goto done;
    }
    if (json_object_get(root, "config")) {
        cfg = json_object_get(root, "config");
        if (!json_is_object(cfg)) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: \"config\" must be an object");
            goto done;
        }
    }
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        json_t *sec = json_object_get(cfg, fields[i].section);
        if (!sec) continue;
        if (!json_is_object(sec)) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: config.%s must be an object", fields[i].section);
            goto done;
        }
        json_t *v = json_object_get(sec, fields[i].key);
        if (!v || json_is_null(v)) continue;
        json_int_t lim = !strcmp(fields[i].key, "vocab_size") ? MAX_VOCAB : MAX_DIM;
        if (!strcmp(fields[i].section, "tokenizer")) lim = MAX_VOCAB;
        int zero_ok = !strcmp(fields[i].section, "tokenizer") || !strcmp(fields[i].key, "overlap_margin");
        if (!json_is_integer(v) || json_integer_value(v) < (zero_ok ? 0 : 1) || json_integer_value(v) > lim) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: config.%s.%s: expected an integer in [%d, %lld]",
                      fields[i].section, fields[i].key, zero_ok ? 0 : 1, (long long)lim);
            goto done;
        }
        *(int *)((char *)c + fields[i].off) = (int)json_integer_value(v);
    }
    json_t *tok = json_object_get(cfg, "tokenizer");
    if (json_is_object(tok) && json_object_get(tok, "templates")) {
        st = parse_templates(c, json_object_get(tok, "templates"), e);
        if (st) goto done;
    }
    json_t *text = json_object_get(cfg, "text");
    if (json_is_object(text)) {
        json_t *mc = json_object_get(text, "max_context");
        c->set_max_context = mc && !json_is_null(mc);
        json_t *th = json_object_get(text, "rope_theta");
        if (th && !json_is_null(th)) {
            double v = json_number_value(th);
            if (!json_is_number(th) || !(v > 1.0 && v < 1e12)) {
                st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: config.text.rope_theta: expected a number > 1");
                goto done;
            }
            c->rope_theta = (float)v;
            c->set_rope_theta = 1;
        }
    }
    /* Moondream 3 nests "moe" under "text". */
    if (json_is_object(text) && json_object_get(text, "moe") && !json_is_null(json_object_get(text, "moe"))) {
        if ((st = parse_moe(c, json_object_get(text, "moe"), e))) goto done;
        md_config_set_md3(c);
    }
    if (json_is_object(text) && json_object_get(text, "group_size") &&
        !json_is_null(json_object_get(text, "group_size"))) {
        st = errf(e, ALBEDO_ERR_UNSUPPORTED,
                  "config.json: config.text.group_size: int4 checkpoints are not supported yet");
        goto done;
    }

    /* Derived sizes and their consistency. */
    if (c->crop_size % c->patch) {
        st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: crop_size %d is not a multiple of enc_patch_size %d",
                  c->crop_size, c->patch);
        goto done;
    }
    if (c->enc_dim % c->enc_heads || c->dim % c->n_heads || c->n_heads % c->n_kv_heads) {
        st = errf(
            e, ALBEDO_ERR_MODEL_FORMAT,
            "config.json: widths not divisible by head counts (enc_dim %d / %d heads, dim %d / %d heads, %d kv heads)",
            c->enc_dim, c->enc_heads, c->dim, c->n_heads, c->n_kv_heads);
        goto done;
    }
    /* Products of configured sizes must stay far from overflow: bound the
     * patch vector and the number of patches per crop (real models: 588 and
     * 729). */
    if ((int64_t)c->in_ch * c->patch * c->patch > (1 << 20)) {
        st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: patches of %d x %d x %d values are too large", c->in_ch,
                  c->patch, c->patch);
        goto done;
    }
    if ((int64_t)(c->crop_size / c->patch) * (c->crop_size / c->patch) > (1 << 20)) {
        st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: crop_size %d / enc_patch_size %d gives too many patches",
                  c->crop_size, c->patch);
        goto done;
    }
    {
        int side = c->crop_size / c->patch;
        if (2 * c->overlap_margin >= side) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: overlap_margin %d too large for %d patches per side",
                      c->overlap_margin, side);
            goto done;
        }
        c->prefix_attn = 1 + side * side;
        c->head_dim = c->dim / c->n_heads;
        c->rot_dims = c->head_dim / 2; /* partial rotary factor 0.5 */
        if (c->rot_dims % 2) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: head dim %d leaves an odd rotary width", c->head_dim);
            goto done;
        }
        if (c->max_context <= c->prefix_attn + 2) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT,
                      "config.json: max_context %d leaves no room after the %d-position image prefix", c->max_context,
                      c->prefix_attn);
            goto done;
        }
        if (c->coord_feat % 2 || c->size_feat % 2 || c->size_out % 2) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "config.json: region feature and size widths must be even");
            goto done;
        }
        if (c->moe_experts) {
            if (c->moe_topk > c->moe_experts || c->moe_start > c->n_layers) {
                st = errf(e, ALBEDO_ERR_MODEL_FORMAT,
                          "config.json: config.text.moe: %d experts per token of %d, start layer %d of %d layers",
                          c->moe_topk, c->moe_experts, c->moe_start, c->n_layers);
                goto done;
            }
        }
        if (c->md3 && c->n_kv_heads != c->n_heads) {
            /* tau scales each value head by its query head's temperature */
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT,
                      "config.json: Moondream 3's tau attention needs n_kv_heads (%d) == n_heads (%d)", c->n_kv_heads,
                      c->n_heads);
            goto done;
        }
        if (c->proj_out != c->dim || c->r_dim != c->dim) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT,
                      "config.json: vision.proj_out_dim %d and region.dim %d must equal text.dim %d", c->proj_out,
                      c->r_dim, c->dim);
            goto done;
        }
    }
done:
    json_decref(root);
    return st;
}
