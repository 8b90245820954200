/*
 * ops_ref.c — the scalar reference of every op in ops.h. It is the
 * specification: plain loops, float32 arithmetic with double where a sum is
 * long (LayerNorm statistics), no threads, no SIMD. Fast backends are tested
 * against it (tests/test_ops.c), and `--backend ref` runs the whole model on
 * it.
 */
#include <math.h>
#include <stdlib.h>

#include "cpu.h"

/* Read element i of a 16/32-bit float vector. */
static inline float ld(const void *p, dtype dt, size_t i) {
    switch (dt) {
    case DT_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    case DT_F16: return f16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

float op_vec_get(op_vec v, size_t i) { return ld(v.p, v.dt, i); }

/* ---- block formats (ops.h, qformat) ------------------------------------------ */

size_t q_row_bytes(dtype dt, int K) {
    const size_t nb = (size_t)(K + Q_BLOCK - 1) / Q_BLOCK;
    return dt == DT_Q8 ? nb * Q8_BLOCK_BYTES : dt == DT_Q4 ? nb * Q4_BLOCK_BYTES : 0;
}

/* Round half away from zero; |v| stays far below 2^31 here (at most 128 plus
 * rounding), and the truncating conversion is one instruction where floorf
 * is a library call on baseline x86-64. NaN (a NaN weight, or an infinite
 * one times a zero or infinite reciprocal) rounds to 0: converting it to
 * int is undefined, and the hardware disagrees (x86 INT_MIN, AArch64 0). */
static float q_round(float v) {
    if (v != v) return 0.0f;
    return (float)(int32_t)(v + (v >= 0.0f ? 0.5f : -0.5f));
}

/* The Q4 level (-8..7) nearest to t = w / d. t is clamped first: a weight
 * far beyond the largest scale (|w| > 15, clipped) must not overflow the
 * integer conversion of q_round. */
static float q4_level(float t) {
    t = t < -9.0f ? -9.0f : t;
    t = t > 9.0f ? 9.0f : t;
    float q = q_round(t);
    q = q < -8.0f ? -8.0f : q;
    return q > 7.0f ? 7.0f : q;
}

/* The magnitude code (0..127) nearest to |d|: the f16 of d rounded to three
 * mantissa bits, clamped to the largest code. */
static int q4_mag_code(float d) {
    const int c = (f32_to_f16(fabsf(d)) + 64) >> 7;
    return c > 0x7F ? 0x7F : c;
}

/* q4_code_scale of magnitude code m (0..127), without the call to
 * f16_to_f32: m * 2^-17 for the subnormal halves (m < 8), else the float
 * of exponent (m >> 3) - 15 and mantissa (m & 7) / 8. Exact, the same
 * value. */
static float q4_mag_scale(int m) {
    if (m < 8) return (float)m * 0x1p-17f;
    const uint32_t u = (uint32_t)((m >> 3) - 15 + 127) << 23 | (uint32_t)(m & 7) << 20;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The scale code of a Q4 sub-block: the code of least squared error among
 * all codes whose magnitude lies between a / 10 and a / 5.5 (a = max|w|),
 * with either sign. The best scale maps the largest weight near -8 or +7
 * (a / 8 or a / 7 give it no rounding error); the codes are a few
 * percent apart (three mantissa bits), so the range holds about eight
 * magnitudes and the search is exhaustive over what can win. The sign
 * chooses which side of the asymmetric grid -8..7 the largest weight takes.
 *
 * The squared error of candidate j (code c0 + j / 2, sign j % 2) is
 * sum_i (v[i] - d_j q4_level(v[i] / d_j))^2, summed in the order of i; the
 * first candidate of least error wins. All candidates are evaluated side by
 * side (the loop over j innermost, in groups of Q4_CAND_GROUP with unused
 * slots at scale 0), which compilers vectorise: the same sums, in the same
 * order, as one candidate after another, a few times faster. The SIMD
 * searches (cpu_q4_search) share q4_range and q4_pick and keep that
 * order, so they pick the same codes. */
#define Q4_CAND_GROUP 8

float q4_absmax(const float *v) {
    float a = 0.0f;
    for (int i = 0; i < Q_BLOCK / 2; i++)
        if (fabsf(v[i]) > a) a = fabsf(v[i]);
    return a;
}

int q4_range(float a, int *c0_out) {
    if (a == 0.0f) return 0;
    int c1 = q4_mag_code(a / 5.5f), c0 = q4_mag_code(a / 10.0f);
    if (c0 < 1) c0 = 1;
    if (c1 < c0) c1 = c0;
    if (c1 - c0 + 1 > Q4_CAND_MAX / 2) c0 = c1 + 1 - Q4_CAND_MAX / 2; /* never: a / 5.5 is < 2 a / 10 */
    *c0_out = c0;
    return 2 * (c1 - c0 + 1);
}

uint8_t q4_pick(const float *e, int nc, int c0) {
    uint8_t best = (uint8_t)(c0 + nc / 2 - 1); /* c1: kept only when no error is below infinity */
    float best_e = INFINITY;
    for (int j = 0; j < nc; j++)
        if (e[j] < best_e) best_e = e[j], best = (uint8_t)((c0 + j / 2) | (j % 2) << 7);
    return best;
}

void q4_scales(int c0, int nc, int n, float *d, float *id) {
    for (int j = 0; j < n; j++) {
        const float m = j < nc ? q4_mag_scale(c0 + j / 2) : 0.0f;
        d[j] = j % 2 ? -m : m;
        id[j] = d[j] != 0.0f ? 1.0f / d[j] : 0.0f;
    }
}

static uint8_t q4_code(const float *v) {
    int c0 = 0;
    const int nc = q4_range(q4_absmax(v), &c0);
    if (!nc) return 0;
    const int ng = (nc + Q4_CAND_GROUP - 1) / Q4_CAND_GROUP;
    float d[Q4_CAND_MAX], id[Q4_CAND_MAX], e[Q4_CAND_MAX];
    q4_scales(c0, nc, ng * Q4_CAND_GROUP, d, id);
    for (int j = 0; j < ng * Q4_CAND_GROUP; j++) e[j] = 0.0f;
    for (int g = 0; g < ng; g++) {
        float *eg = e + g * Q4_CAND_GROUP;
        const float *dg = d + g * Q4_CAND_GROUP, *ig = id + g * Q4_CAND_GROUP;
        for (int i = 0; i < Q_BLOCK / 2; i++) {
            const float x = v[i];
            for (int j = 0; j < Q4_CAND_GROUP; j++) {
                const float q = q4_level(x * ig[j]);
                eg[j] += (x - dg[j] * q) * (x - dg[j] * q);
            }
        }
    }
    return q4_pick(e, nc, c0);
}

void q4_block_ref(const float *v, uint8_t *p) {
    p[0] = q4_code(v), p[1] = q4_code(v + 16);
    const float d0 = q4_code_scale(p[0]), d1 = q4_code_scale(p[1]);
    const float i0 = d0 != 0.0f ? 1.0f / d0 : 0.0f, i1 = d1 != 0.0f ? 1.0f / d1 : 0.0f;
    uint8_t *qs = p + 2;
    for (int i = 0; i < Q_BLOCK / 2; i++) {
        const int lo = (int)q4_level(v[i] * i0) + 8, hi = (int)q4_level(v[i + 16] * i1) + 8;
        qs[i] = (uint8_t)(lo | hi << 4);
    }
}

void q_quantize_row(dtype dt, const float *x, int K, void *dst) { q_quantize_row_with(q4_block_ref, dt, x, K, dst); }

void q_quantize_row_with(q4_block_fn q4_block, dtype dt, const float *x, int K, void *dst) {
    uint8_t *p = dst;
    for (int k0 = 0; k0 < K; k0 += Q_BLOCK) {
        float v[Q_BLOCK];
        const int kn = K - k0 < Q_BLOCK ? K - k0 : Q_BLOCK;
        for (int i = 0; i < Q_BLOCK; i++) v[i] = i < kn ? x[k0 + i] : 0.0f;
        if (dt == DT_Q8) {
            float amax = 0.0f;
            for (int i = 0; i < Q_BLOCK; i++)
                if (fabsf(v[i]) > amax) amax = fabsf(v[i]);
            /* The scale is stored as f16; quantise with the stored value so
             * that d * q reproduces the weights as closely as the format
             * allows. */
            const uint16_t dh = f32_to_f16(amax / 127.0f);
            const float d = f16_to_f32(dh), id = d != 0.0f ? 1.0f / d : 0.0f;
            memcpy(p, &dh, 2);
            int8_t *q = (int8_t *)(p + 2);
            for (int i = 0; i < Q_BLOCK; i++) {
                float r = q_round(v[i] * id);
                q[i] = (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : r);
            }
            p += Q8_BLOCK_BYTES;
        } else {
            q4_block(v, p);
            p += Q4_BLOCK_BYTES;
        }
    }
}

void q_dequantize_row(dtype dt, const void *src, int K, float *out) {
    const uint8_t *p = src;
    for (int k0 = 0; k0 < K; k0 += Q_BLOCK) {
        const int kn = K - k0 < Q_BLOCK ? K - k0 : Q_BLOCK;
        if (dt == DT_Q8) {
            uint16_t dh;
            memcpy(&dh, p, 2);
            const float d = f16_to_f32(dh);
            const int8_t *q = (const int8_t *)(p + 2);
            for (int i = 0; i < kn; i++) out[k0 + i] = d * (float)q[i];
            p += Q8_BLOCK_BYTES;
        } else {
            const float d[2] = {q4_code_scale(p[0]), q4_code_scale(p[1])};
            const uint8_t *qs = p + 2;
            for (int i = 0; i < kn; i++) {
                const int nib = i < 16 ? qs[i] & 15 : qs[i - 16] >> 4;
                out[k0 + i] = d[i >> 4] * (float)(nib - 8);
            }
            p += Q4_BLOCK_BYTES;
        }
    }
}

/* Dequantise one row of a linear layer's weight to float32. */
void ref_weight_row(const op_linear *L, int n, float *out);

void ref_weight_row(const op_linear *L, int n, float *out) {
    const int K = L->n_in;
    switch (L->dt) {
    case DT_BF16:
    case DT_F16:
    case DT_F32:
        for (int k = 0; k < K; k++) out[k] = ld(L->w, L->dt, (size_t)n * K + k);
        break;
    case DT_Q8:
    case DT_Q4: q_dequantize_row(L->dt, (const char *)L->w + (size_t)n * q_row_bytes(L->dt, K), K, out); break;
    default:
        for (int k = 0; k < K; k++) out[k] = 0.0f;
        break;
    }
}

static void ref_linear(ops_ctx *c, float *y, int ldy, const float *x, int ldx, int T, const op_linear *L) {
    const int K = L->n_in, N = L->n_out;
    float *wrow = cpu_scratch(c, 0, (size_t)K * sizeof(float));
    if (!wrow) return;
    for (int n = 0; n < N; n++) {
        ref_weight_row(L, n, wrow);
        float b = L->b ? ld(L->b, L->bdt, (size_t)n) : 0.0f;
        for (int t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * ldx;
            float s = 0.0f;
            if (c->prec == OPS_BF16) {
                for (int k = 0; k < K; k++) s += bf16_to_f32(f32_to_bf16(xt[k])) * wrow[k];
            } else {
                for (int k = 0; k < K; k++) s += xt[k] * wrow[k];
            }
            y[(size_t)t * ldy + n] = s + b;
        }
    }
}

static void ref_layernorm(ops_ctx *c, float *y, const float *x, int T, int C, op_vec g, op_vec b, float eps) {
    (void)c;
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * C;
        float *yt = y + (size_t)t * C;
        double mean = 0, var = 0;
        for (int i = 0; i < C; i++) mean += xt[i];
        mean /= C;
        for (int i = 0; i < C; i++) var += (xt[i] - mean) * (xt[i] - mean);
        var /= C;
        float inv = (float)(1.0 / sqrt(var + eps));
        for (int i = 0; i < C; i++) yt[i] = ((xt[i] - (float)mean) * inv) * ld(g.p, g.dt, i) + ld(b.p, b.dt, i);
    }
}

static void ref_gelu_tanh(ops_ctx *c, float *x, size_t n) {
    (void)c;
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
}

static void ref_gelu_erf(ops_ctx *c, float *x, size_t n) {
    (void)c;
    for (size_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.7071067811865476f));
}

static void ref_add(ops_ctx *c, float *y, const float *x, size_t n) {
    (void)c;
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

static void ref_rope(ops_ctx *c, float *x, int ldx, int T, int H, int D, int R, int pos0, const float *cos_t,
                     const float *sin_t) {
    (void)c;
    const int half = R / 2;
    for (int t = 0; t < T; t++) {
        const float *ct = cos_t + (size_t)(pos0 + t) * half, *st = sin_t + (size_t)(pos0 + t) * half;
        for (int h = 0; h < H; h++) {
            float *v = x + (size_t)t * ldx + (size_t)h * D;
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * ct[i] - b * st[i];
                v[i + half] = a * st[i] + b * ct[i];
            }
        }
    }
}

/* Whether query at absolute position p sees key j (ops.h, op_attn). */
static inline int visible(int p, int j, int n_prefix) { return j <= p || (p < n_prefix && j < n_prefix); }

static void ref_attention(ops_ctx *c, const op_attn *a) {
    float *sc = cpu_scratch(c, 0, (size_t)a->S * sizeof(float));
    if (!sc) return;
    const int group = a->H / a->Hkv;
    for (int t = 0; t < a->T; t++) {
        const int p = a->pos0 + t;
        for (int h = 0; h < a->H; h++) {
            const float *q = a->q + (size_t)t * a->ldq + (size_t)h * a->D;
            const int g = h / group;
            float mx = -INFINITY;
            for (int j = 0; j < a->S; j++) {
                if (!visible(p, j, a->n_prefix)) {
                    sc[j] = -INFINITY;
                    continue;
                }
                const void *k = op_attn_row(a, a->k, a->ldk, j);
                float s = 0.0f;
                for (int d = 0; d < a->D; d++) s += q[d] * kv_get(k, a->kv_dt, (size_t)g * a->D + d);
                sc[j] = s * a->scale;
                if (sc[j] > mx) mx = sc[j];
            }
            double sum = 0;
            for (int j = 0; j < a->S; j++) {
                sc[j] = sc[j] == -INFINITY ? 0.0f : expf(sc[j] - mx);
                sum += sc[j];
            }
            float inv = (float)(1.0 / sum);
            float *o = a->out + (size_t)t * a->ldo + (size_t)h * a->D;
            for (int d = 0; d < a->D; d++) o[d] = 0.0f;
            for (int j = 0; j < a->S; j++) {
                if (sc[j] == 0.0f) continue;
                const void *v = op_attn_row(a, a->v, a->ldv, j);
                float w = sc[j] * inv;
                for (int d = 0; d < a->D; d++) o[d] += w * kv_get(v, a->kv_dt, (size_t)g * a->D + d);
            }
        }
    }
}

static const ops ref_ops = {
    .name = "ref",
    .linear = ref_linear,
    .layernorm = ref_layernorm,
    .gelu_tanh = ref_gelu_tanh,
    .gelu_erf = ref_gelu_erf,
    .add = ref_add,
    .rope = ref_rope,
    .attention = ref_attention,
};

const ops *ops_ref_table(void) { return &ref_ops; }
