/*
 * bench.c — stage timings behind `albedo bench`: one crop through the vision
 * encoder, the 730-position image prefix through the text model, and decode
 * steps at depth 740. Inputs are seeded random crops and token embeddings;
 * the medians of several runs are reported.
 */
#include <stdlib.h>

#include "session.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

albedo_status albedo_model_bench(albedo_model *m, int repeats, albedo_bench_result *out) {
    errbuf e = {{0}};
    if (!m || !out) return ALBEDO_ERR_INVALID_ARGUMENT;
    if (repeats < 1) repeats = 1;
    memset(out, 0, sizeof *out);
    const md_config *c = &m->cfg;
    md_state s;
    albedo_status st = md_state_init(&s, m, &e);
    if (st) {
        error_set_last(e.msg);
        return st;
    }
    const int np = c->prefix_attn - 1, n_pos = c->prefix_attn, depth = n_pos + 10;
    const size_t crop_bytes = (size_t)c->crop_size * c->crop_size * 3;
    uint8_t *crop = malloc(crop_bytes);
    float *feat = malloc((size_t)np * c->enc_dim * sizeof(float));
    float *emb = malloc((size_t)n_pos * c->dim * sizeof(float));
    double *t = malloc((size_t)(repeats > 16 ? repeats : 16) * sizeof(double));
    if (!crop || !feat || !emb || !t) {
        st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "bench: out of memory");
        goto done;
    }
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < crop_bytes; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        crop[i] = (uint8_t)x;
    }
    for (int i = 0; i < n_pos; i++) text_embed(m, (int32_t)((i * 7919) % c->vocab), emb + (size_t)i * c->dim);

    /* warm-up: touches the weights and grows the scratch buffers */
    if ((st = vision_encode_crops(&s, crop, 1, feat, &e))) goto done;
    for (int r = 0; r < repeats; r++) {
        double t0 = now_ms();
        if ((st = vision_encode_crops(&s, crop, 1, feat, &e))) goto done;
        t[r] = now_ms() - t0;
    }
    out->vision_crop_ms = median(t, repeats);

    if ((st = text_forward(&s, emb, n_pos, 0, n_pos, 0, &e))) goto done;
    for (int r = 0; r < repeats; r++) {
        double t0 = now_ms();
        if ((st = text_forward(&s, emb, n_pos, 0, n_pos, 0, &e))) goto done;
        t[r] = now_ms() - t0;
    }
    out->prefill730_tok_s = n_pos / (median(t, repeats) / 1000.0);

    /* fill positions 730 .. depth-1, then time single steps at depth */
    if ((st = text_forward(&s, emb, depth - n_pos, n_pos, n_pos, 1, &e))) goto done;
    int steps = repeats < 8 ? 8 : repeats;
    if (steps > 16) steps = 16;
    for (int r = 0; r < steps; r++) {
        double t0 = now_ms();
        if ((st = text_forward(&s, emb + (size_t)r * c->dim, 1, depth, n_pos, 1, &e))) goto done;
        t[r] = now_ms() - t0;
    }
    out->decode_d740_tok_s = 1000.0 / median(t, steps);
done:
    free(crop);
    free(feat);
    free(emb);
    free(t);
    md_state_free(&s);
    if (st) error_set_last(e.msg);
    return st;
}
