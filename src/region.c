/*
 * region.c — the region module (spec/model.md §8): Fourier-feature encoders
 * that turn a coordinate or a (width, height) pair into an input embedding,
 * and the MLP decoders that turn a hidden state into coordinate and size
 * bins.
 *
 *   coord c ∈ [0,1] → [cos 2π·c·B ‖ sin 2π·c·B] (B [1, 128]) → coord_encoder → [dim]
 *   (w, h)          → [cos 2π·(w,h)·B ‖ sin …] (B [2, 256])   → size_encoder  → [dim]
 *   hidden [dim] (before post_ln) → fc1 → gelu_tanh → fc2 → 1024 coord bins
 *                                                         → 2×1024 size bins
 *
 * Moondream 3 (§10.4) decodes with single linear layers, behind the region
 * LayerNorm when the checkpoint has one (the September 2025 HF code has
 * none; the current checkpoint does):
 *   hidden [dim] (before post_ln) → [ln] → coord_decoder → 1024 coord bins
 *                                        → size_decoder  → 2×1024 size bins
 */
#include <math.h>
#include <stdlib.h>

#include "model.h"

#define PI_F 3.14159265358979323846f

/* Element (r, j) of a Fourier matrix stored [rows, F] or transposed [F, rows]. */
static float feat(op_vec v, int transposed, int rows, int F, int r, int j) {
    return op_vec_get(v, transposed ? (size_t)j * rows + r : (size_t)r * F + j);
}

void region_encode_coord(md_state *s, float v, float *out) {
    const albedo_model *m = s->m;
    const int F = m->cfg.coord_feat / 2;
    float *ff = s->feat;
    /* As the reference: (2π · v) in float32, then times each frequency. */
    const float x = 2.0f * PI_F * v;
    for (int j = 0; j < F; j++) {
        float f = x * feat(m->w.coord_features, m->w.features_transposed, 1, F, 0, j);
        ff[j] = cosf(f);
        ff[F + j] = sinf(f);
    }
    O(s->ops)->linear(s->ops, out, m->cfg.dim, ff, 2 * F, 1, &m->w.coord_enc);
}

void region_encode_size(md_state *s, float w, float h, float *out) {
    const albedo_model *m = s->m;
    const int F = m->cfg.size_feat / 2;
    float *ff = s->feat;
    const float a = 2.0f * PI_F * w, b = 2.0f * PI_F * h;
    for (int j = 0; j < F; j++) {
        float f = a * feat(m->w.size_features, m->w.features_transposed, 2, F, 0, j) +
                  b * feat(m->w.size_features, m->w.features_transposed, 2, F, 1, j);
        ff[j] = cosf(f);
        ff[F + j] = sinf(f);
    }
    O(s->ops)->linear(s->ops, out, m->cfg.dim, ff, 2 * F, 1, &m->w.size_enc);
}

static int argmax(const float *v, int n, float *margin) {
    int best = 0;
    float b1 = -INFINITY, b2 = -INFINITY;
    for (int i = 0; i < n; i++) {
        if (v[i] > b1) {
            b2 = b1;
            b1 = v[i];
            best = i;
        } else if (v[i] > b2) {
            b2 = v[i];
        }
    }
    if (margin) *margin = b1 - b2;
    return best;
}

/* out = fc2(gelu_tanh(fc1(h))); md_state sizes s->mlp for r_inner and
 * s->logits for the decoders' outputs. Moondream 3: out = lin([ln](h)). */
static void decoder(md_state *s, const float *h, const op_linear *fc1, const op_linear *fc2, const op_linear *lin,
                    float *out) {
    const ops *o = O(s->ops);
    const md_weights *w = &s->m->w;
    const int dim = s->m->cfg.dim;
    if (w->region_linear) {
        if (w->region_ln) {
            o->layernorm(s->ops, s->rln, h, 1, dim, w->region_ln_w, w->region_ln_b, 1e-5f);
            h = s->rln;
        }
        o->linear(s->ops, out, lin->n_out, h, dim, 1, lin);
        return;
    }
    float *mid = s->mlp;
    o->linear(s->ops, mid, fc1->n_out, h, dim, 1, fc1);
    o->gelu_tanh(s->ops, mid, (size_t)fc1->n_out);
    o->linear(s->ops, out, fc2->n_out, mid, fc1->n_out, 1, fc2);
}

int region_decode_coord(md_state *s, const float *h, float *margin) {
    const albedo_model *m = s->m;
    float *out = s->logits;
    decoder(s, h, &m->w.coord_fc1, &m->w.coord_fc2, &m->w.coord_dec, out);
    return argmax(out, m->cfg.coord_out, margin);
}

void region_decode_size(md_state *s, const float *h, int *w_bin, int *h_bin) {
    const albedo_model *m = s->m;
    float *out = s->logits;
    decoder(s, h, &m->w.size_fc1, &m->w.size_fc2, &m->w.size_dec, out);
    const int half = m->cfg.size_out / 2;
    *w_bin = argmax(out, half, NULL);
    *h_bin = argmax(out + half, half, NULL);
}
