/*
 * vision.c — the vision encoder (a SigLIP-style ViT) and the projection into
 * the text model's embedding space (spec/model.md §5).
 *
 *   crops u8 [n, 378, 378, 3]
 *     │ patchify, normalise          [n·729, 588]   (channel-major patches)
 *     │ patch_emb + pos_emb          [n·729, 1152]
 *     │ 27 × { x += attn(ln1(x)); x += mlp(ln2(x)) }   attention within a crop
 *     │ post_ln                      [n, 729, 1152]
 *     ├─ global = crop 0             [729, 1152]
 *     └─ local  = stitch crops 1.. (margins trimmed) → adaptive avg pool 27×27
 *   [global ‖ local] [729, 2304] → fc1 → gelu_tanh → fc2 → img_emb [729, 2048]
 *
 * Crops are encoded in groups so that working memory stays bounded for the
 * 13-crop case while each matrix product still has thousands of rows.
 */
#include <math.h>
#include <stdlib.h>

#include "model.h"

#define VISION_GROUP 4 /* crops per encoder batch */

typedef struct patch_job {
    const md_config *c;
    const uint8_t *crops;
    float *out;
    int n_side;
} patch_job;

/* One crop's patches: element c·P·P + dy·P + dx of patch (py, px), in the
 * column order of patch_emb.weight; pixels scaled to [-1, 1] as the
 * reference's (x/255 - 0.5)/0.5. */
static void patchify_task(void *arg, int crop) {
    patch_job *j = arg;
    const int P = j->c->patch, cs = j->c->crop_size, C = j->c->in_ch, ns = j->n_side;
    const int pd = C * P * P;
    const uint8_t *px = j->crops + (size_t)crop * cs * cs * 3;
    float *out = j->out + (size_t)crop * ns * ns * pd;
    for (int py = 0; py < ns; py++)
        for (int pxi = 0; pxi < ns; pxi++) {
            float *o = out + ((size_t)py * ns + pxi) * pd;
            for (int ch = 0; ch < C; ch++)
                for (int dy = 0; dy < P; dy++)
                    for (int dx = 0; dx < P; dx++) {
                        uint8_t v = px[((size_t)(py * P + dy) * cs + (pxi * P + dx)) * 3 + ch];
                        o[ch * P * P + dy * P + dx] = ((float)v / 255.0f - 0.5f) / 0.5f;
                    }
        }
}

/* Encode n crops (≤ VISION_GROUP) into out [n, np, enc_dim]. */
static albedo_status encode_group(md_state *s, const uint8_t *crops, int n, float *out, errbuf *e) {
    const albedo_model *m = s->m;
    const md_config *c = &m->cfg;
    const md_weights *w = &m->w;
    ops_ctx *oc = s->ops;
    const ops *o = O(oc);
    const int ns = c->crop_size / c->patch, np = ns * ns, C = c->enc_dim, T = n * np;
    const int pd = c->in_ch * c->patch * c->patch, H = c->enc_heads, D = C / H;
    size_t big = (size_t)T * (size_t)(pd > 3 * C ? pd : 3 * C);
    if ((size_t)T * c->enc_ff > big) big = (size_t)T * c->enc_ff;
    float *x = out;
    float *h = malloc((size_t)T * C * sizeof(float));
    float *a = malloc((size_t)T * C * sizeof(float));
    float *buf = malloc(big * sizeof(float));
    if (!h || !a || !buf) {
        free(h);
        free(a);
        free(buf);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "vision: out of memory for %d crops", n);
    }

    patch_job pj = {c, crops, buf, ns};
    ops_parallel_for(oc, n, patchify_task, &pj);
    o->linear(oc, x, C, buf, pd, T, &w->patch_emb);
    for (int k = 0; k < n; k++) {
        float *xk = x + (size_t)k * np * C;
        for (int i = 0; i < np * C; i++) xk[i] += op_vec_get(w->pos_emb, (size_t)i);
    }

    for (int l = 0; l < c->enc_layers; l++) {
        const vit_block *b = &w->vb[l];
        o->layernorm(oc, h, x, T, C, b->ln1_w, b->ln1_b, 1e-5f);
        o->linear(oc, buf, 3 * C, h, C, T, &b->qkv);
        for (int k = 0; k < n; k++) {
            const float *q = buf + (size_t)k * np * 3 * C;
            op_attn at = {.T = np,
                          .S = np,
                          .H = H,
                          .Hkv = H,
                          .D = D,
                          .pos0 = 0,
                          .n_prefix = np,
                          .scale = 1.0f / sqrtf((float)D),
                          .q = q,
                          .k = q + C,
                          .v = q + 2 * C,
                          .out = a + (size_t)k * np * C,
                          .ldq = 3 * C,
                          .ldk = 3 * C,
                          .ldv = 3 * C,
                          .ldo = C};
            o->attention(oc, &at);
        }
        o->linear(oc, h, C, a, C, T, &b->proj);
        o->add(oc, x, h, (size_t)T * C);
        o->layernorm(oc, h, x, T, C, b->ln2_w, b->ln2_b, 1e-5f);
        o->linear(oc, buf, c->enc_ff, h, C, T, &b->fc1);
        o->gelu_tanh(oc, buf, (size_t)T * c->enc_ff);
        o->linear(oc, h, C, buf, c->enc_ff, T, &b->fc2);
        o->add(oc, x, h, (size_t)T * C);
    }
    o->layernorm(oc, x, x, T, C, w->post_ln_w, w->post_ln_b, 1e-5f);
    free(h);
    free(a);
    free(buf);
    if (ops_failed(oc)) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "vision: out of working memory");
    return ALBEDO_OK;
}

/* Stitch the local crops' features into one grid, trimming the overlap
 * margins, and average-pool it to ns×ns (torch adaptive_avg_pool2d:
 * output cell r covers rows [floor(r·Hg/ns), ceil((r+1)·Hg/ns))). */
static albedo_status pool_local(const md_config *c, const float *tiles, int th, int tw, float *out, errbuf *e) {
    const int ns = c->crop_size / c->patch, C = c->enc_dim, mg = c->overlap_margin;
    const int step = ns - 2 * mg, Hg = step * th + 2 * mg, Wg = step * tw + 2 * mg;
    float *grid = malloc((size_t)Hg * Wg * C * sizeof(float));
    if (!grid) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "vision: out of memory stitching %dx%d tiles", th, tw);
    for (int i = 0; i < th; i++)
        for (int j = 0; j < tw; j++) {
            const float *t = tiles + ((size_t)i * tw + j) * ns * ns * C;
            int r0 = i == 0 ? 0 : mg, r1 = i == th - 1 ? ns : ns - mg;
            int c0 = j == 0 ? 0 : mg, c1 = j == tw - 1 ? ns : ns - mg;
            for (int r = r0; r < r1; r++)
                for (int cc = c0; cc < c1; cc++)
                    memcpy(grid + ((size_t)(i * step + r) * Wg + (j * step + cc)) * C, t + ((size_t)r * ns + cc) * C,
                           (size_t)C * sizeof(float));
        }
    for (int r = 0; r < ns; r++) {
        int y0 = (r * Hg) / ns, y1 = ((r + 1) * Hg + ns - 1) / ns;
        for (int q = 0; q < ns; q++) {
            int x0 = (q * Wg) / ns, x1 = ((q + 1) * Wg + ns - 1) / ns;
            float *o = out + ((size_t)r * ns + q) * C;
            float inv = 1.0f / (float)((y1 - y0) * (x1 - x0));
            for (int k = 0; k < C; k++) {
                float s = 0.0f;
                for (int y = y0; y < y1; y++)
                    for (int x = x0; x < x1; x++) s += grid[((size_t)y * Wg + x) * C + k];
                o[k] = s * inv;
            }
        }
    }
    free(grid);
    return ALBEDO_OK;
}

albedo_status vision_encode_crops(md_state *s, const uint8_t *crops, int n, float *out, errbuf *e) {
    if (s->cu) return md_cuda_vision_crops(s, crops, n, out, e); /* backend_cuda.c: on the GPU */
    const md_config *c = &s->m->cfg;
    const size_t crop_bytes = (size_t)c->crop_size * c->crop_size * 3;
    const size_t per = (size_t)(c->crop_size / c->patch) * (c->crop_size / c->patch) * c->enc_dim;
    albedo_status st = ALBEDO_OK;
    for (int k = 0; k < n && !st; k += VISION_GROUP) {
        int g = n - k < VISION_GROUP ? n - k : VISION_GROUP;
        st = encode_group(s, crops + k * crop_bytes, g, out + k * per, e);
    }
    return st;
}

albedo_status vision_encode(md_state *s, const img_crops *crops, float *img_emb, float *enc_out, errbuf *e) {
    const albedo_model *m = s->m;
    const md_config *c = &m->cfg;
    const int ns = c->crop_size / c->patch, np = ns * ns, C = c->enc_dim;
    if (crops->size != c->crop_size || crops->n != crops->th * crops->tw + 1)
        return errf(e, ALBEDO_ERR_INTERNAL, "vision: crops do not match the model");
    if (s->cu) return md_cuda_vision(s, crops, img_emb, enc_out, e); /* backend_cuda.c: on the GPU */
    float *feat = malloc((size_t)crops->n * np * C * sizeof(float));
    if (!feat) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "vision: out of memory for %d crops", crops->n);
    albedo_status st = vision_encode_crops(s, crops->px, crops->n, feat, e);
    float *cat = NULL, *mid = NULL;
    if (st) goto done;
    if (enc_out) memcpy(enc_out, feat, (size_t)crops->n * np * C * sizeof(float));

    cat = malloc((size_t)np * 2 * C * sizeof(float));
    float *local = malloc((size_t)np * C * sizeof(float));
    mid = malloc((size_t)np * c->proj_inner * sizeof(float));
    if (!cat || !local || !mid) {
        free(local);
        st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "vision: out of memory in the projection");
        goto done;
    }
    st = pool_local(c, feat + (size_t)np * C, crops->th, crops->tw, local, e);
    if (!st) {
        for (int p = 0; p < np; p++) {
            memcpy(cat + (size_t)p * 2 * C, feat + (size_t)p * C, (size_t)C * sizeof(float));
            memcpy(cat + (size_t)p * 2 * C + C, local + (size_t)p * C, (size_t)C * sizeof(float));
        }
        const ops *o = O(s->ops);
        o->linear(s->ops, mid, c->proj_inner, cat, 2 * C, np, &m->w.proj_fc1);
        o->gelu_tanh(s->ops, mid, (size_t)np * c->proj_inner);
        o->linear(s->ops, img_emb, c->dim, mid, c->proj_inner, np, &m->w.proj_fc2);
        if (ops_failed(s->ops)) st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "vision: out of working memory");
    }
    free(local);
done:
    free(feat);
    free(cat);
    free(mid);
    return st;
}
