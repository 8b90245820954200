/*
 * ops_generic.c — the portable kernels of the "generic" table: plain C for
 * any CPU behind the same driver as the ISA files (ops_cpu.c runs the
 * threads, blocking and packing; cpu.h's cpu_kernels is the interface).
 * Written so that compilers vectorise the inner loops (a register tile of
 * 4 x 16 floats). It is the fallback where no ISA table applies, and a
 * kernel file like ops_avx2.c / ops_avx512.c / ops_neon.c in every other
 * respect (CMakeLists.txt: ALBEDO_KERNEL_SOURCES).
 */
#include <math.h>

#include "cpu.h"

static int imin(int a, int b) { return a < b ? a : b; }

#define GEN_MR 4
#define GEN_NR 16
#define GEN_KC 256

static inline float gen_w(const void *w, dtype dt, size_t i) { return cpu_ld(w, dt, i); }

static void pack_f32_generic(void *dstv, const void *w, dtype dt, size_t ldw, int nrows, int e0, int ec, int K) {
    (void)K;
    float *dst = dstv;
    for (int j = 0; j < GEN_NR; j++)
        for (int e = 0; e < ec; e++)
            dst[(size_t)e * GEN_NR + j] = j < nrows ? gen_w(w, dt, (size_t)j * ldw + e0 + e) : 0.0f;
}

static void gemm_f32_generic(int mr, int kc, const void *xv, size_t ldx, const void *wpv, float *y, size_t ldy,
                             int ncols, const float *bias, int accumulate) {
    const float *x = xv, *wp = wpv;
    for (int i = 0; i < mr; i++) {
        float acc[GEN_NR];
        for (int j = 0; j < GEN_NR; j++) acc[j] = 0.0f;
        const float *xi = x + (size_t)i * ldx;
        for (int e = 0; e < kc; e++) {
            const float xe = xi[e];
            for (int j = 0; j < GEN_NR; j++) acc[j] += xe * wp[(size_t)e * GEN_NR + j];
        }
        float *yi = y + (size_t)i * ldy;
        for (int j = 0; j < ncols; j++) yi[j] = acc[j] + (accumulate ? yi[j] : bias ? bias[j] : 0.0f);
    }
}

static const cpu_gemm gemm_f32_gen = {GEN_MR, GEN_NR, GEN_KC, 0, pack_f32_generic, gemm_f32_generic};

static void gemv_generic(int T, int K, const float *x, size_t ldx, const void *w, dtype dt, const void *b, dtype bdt,
                         int n0, int n1, float *y, size_t ldy) {
    float wb[256];
    for (int n = n0; n < n1; n++) {
        for (int t0 = 0; t0 < T; t0 += 4) {
            const int tn = imin(4, T - t0);
            float acc[4] = {0, 0, 0, 0};
            for (int k0 = 0; k0 < K; k0 += 256) {
                const int kn = imin(256, K - k0);
                for (int kk = 0; kk < kn; kk++) wb[kk] = gen_w(w, dt, (size_t)n * K + k0 + kk);
                for (int t = 0; t < tn; t++) {
                    const float *xt = x + (size_t)(t0 + t) * ldx + k0;
                    float s = 0.0f;
                    for (int kk = 0; kk < kn; kk++) s += xt[kk] * wb[kk];
                    acc[t] += s;
                }
            }
            const float bn = b ? cpu_ld(b, bdt, (size_t)n) : 0.0f;
            for (int t = 0; t < tn; t++) y[(size_t)(t0 + t) * ldy + n] = acc[t] + bn;
        }
    }
}

static void round_bf16_generic(float *dst, const float *src, int n) {
    for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(f32_to_bf16(src[i]));
}

static void to_pairs_generic(uint32_t *dst, const float *src, int n) {
    for (int i = 0; 2 * i < n; i++) {
        uint32_t lo = f32_to_bf16(src[2 * i]);
        uint32_t hi = 2 * i + 1 < n ? f32_to_bf16(src[2 * i + 1]) : 0;
        dst[i] = lo | hi << 16;
    }
}

static float softmax_generic(float *s, int n, float scale) {
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) {
        s[i] *= scale;
        if (s[i] > mx) mx = s[i];
    }
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        s[i] = expf(s[i] - mx);
        sum += s[i];
    }
    return sum;
}

static void dot_rows_generic(float *out, const float *q, const void *k, dtype kdt, size_t ldk, int n, int D) {
    const size_t es = kv_elem_bytes(kdt);
    for (int j = 0; j < n; j++) {
        const void *kj = (const char *)k + (size_t)j * ldk * es;
        float s = 0.0f;
        for (int d = 0; d < D; d++) s += q[d] * kv_get(kj, kdt, (size_t)d);
        out[j] = s;
    }
}

static void axpy_rows_generic(float *out, const float *p, const void *v, dtype vdt, size_t ldv, int n, int D, float s) {
    const size_t es = kv_elem_bytes(vdt);
    for (int d = 0; d < D; d++) out[d] = 0.0f;
    for (int j = 0; j < n; j++) {
        const void *vj = (const char *)v + (size_t)j * ldv * es;
        for (int d = 0; d < D; d++) out[d] += p[j] * kv_get(vj, vdt, (size_t)d);
    }
    for (int d = 0; d < D; d++) out[d] *= s;
}

static void layernorm_row_generic(float *y, const float *x, int C, const float *g, const float *b, float eps) {
    double mean = 0, var = 0;
    for (int i = 0; i < C; i++) mean += x[i];
    mean /= C;
    for (int i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
    var /= C;
    const float inv = (float)(1.0 / sqrt(var + eps)), m = (float)mean;
    for (int i = 0; i < C; i++) y[i] = ((x[i] - m) * inv) * g[i] + b[i];
}

static void gelu_tanh_generic(float *x, size_t n) {
    const float k = 0.7978845608028654f;
    for (size_t i = 0; i < n; i++) {
        float v = x[i];
        x[i] = 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
}

static void gelu_erf_generic(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.7071067811865476f));
}

static void add_generic(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

static void rope_row_generic(float *x, int H, int D, int half, const float *ct, const float *st) {
    for (int h = 0; h < H; h++) {
        float *v = x + (size_t)h * D;
        for (int i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * ct[i] - b * st[i];
            v[i + half] = a * st[i] + b * ct[i];
        }
    }
}

static const cpu_kernels generic_kernels = {
    .f32 = &gemm_f32_gen,
    .bf16 = NULL,
    .small_t = 8,
    .gemv = gemv_generic,
    .gemv_pairs = NULL,
    .round_bf16 = round_bf16_generic,
    .to_pairs = to_pairs_generic,
    .softmax = softmax_generic,
    .dot_rows = dot_rows_generic,
    .axpy_rows = axpy_rows_generic,
    .layernorm_row = layernorm_row_generic,
    .gelu_tanh = gelu_tanh_generic,
    .gelu_erf = gelu_erf_generic,
    .add = add_generic,
    .rope_row = rope_row_generic,
};

static const cpu_table generic_table = {CPU_DRIVER_OPS("generic"), &generic_kernels};

const ops *ops_generic_table(void) { return &generic_table.ops; }
