/*
 * bench_moe.cu — Moondream 3's expert MLP (cuda_moe_mlp, src/cuda/moe.cu) at
 * full shapes: 64 experts, top-8, dim 2048, inner 1024, random bf16 weights
 * (never zeros) and random distinct experts per token. For T = 1 and 4
 * (the GEMV path) and 16, 64 and 730 (the grouped path, with each of its tile
 * shapes), the median of 20 device-event-timed runs after warm-up, as
 * milliseconds, TFLOP/s (2·T·k·3·dim·inner) and the bandwidth over the
 * weights of the experts the tokens touch (each read once: the floor).
 * Each with the experts in bf16 and in fp8 (e4m3 with row scales,
 * cuda_quant_e4m3_rows of the same weights: half the bytes).
 * Also cuda_moe_route and the tau kernels at decode shapes.
 *
 *   bench_moe [runs=20 [T [gemm]]]     (T, gemm: only that size / tile shape, e.g. under ncu)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/ops_cuda.h"

#define CK(call)                                                        \
    do {                                                                \
        cudaError_t e_ = (call);                                        \
        if (e_ != cudaSuccess) {                                        \
            fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e_)); \
            exit(1);                                                    \
        }                                                               \
    } while (0)
#define OK(call)                                                   \
    do {                                                           \
        if ((call) != ALBEDO_OK) {                                 \
            fprintf(stderr, "%s: %s\n", #call, cuda_ctx_error(G)); \
            exit(1);                                               \
        }                                                          \
    } while (0)

static cuda_ctx *G;

/* bf16 values in [-a, a) from a hash of the index (no zeros in practice). */
__global__ void fill_kernel(__nv_bfloat16 *p, size_t n, float a, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned x = (unsigned)i * 2654435761u ^ seed;
        x ^= x >> 15;
        x *= 2246822519u;
        x ^= x >> 13;
        p[i] = __float2bfloat16_rn(a * ((float)(x & 0xffffff) / 8388608.0f - 1.0f));
    }
}

static void *dalloc_fill(size_t n, float a, unsigned seed) {
    void *p;
    CK(cudaMalloc(&p, n * 2));
    fill_kernel<<<1024, 256>>>((__nv_bfloat16 *)p, n, a, seed);
    CK(cudaGetLastError());
    return p;
}

static int cmp_f(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

static unsigned long long rng = 88172645463325252ull;
static unsigned rnd_u(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (unsigned)(rng >> 11);
}

int main(int argc, char **argv) {
    const int runs = argc > 1 ? atoi(argv[1]) : 20;
    const int only_t = argc > 2 ? atoi(argv[2]) : 0, only_g = argc > 3 ? atoi(argv[3]) : -1;
    const int E = 64, K = 8, D = 2048, I = 1024, TMAX = 730;
    errbuf e;
    if (cuda_ctx_new(0, &G, &e) != ALBEDO_OK) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    cudaStream_t st = (cudaStream_t)cuda_ctx_stream(G);
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    void *w1 = dalloc_fill((size_t)E * 2 * I * D, 0.03f, 1), *w2 = dalloc_fill((size_t)E * D * I, 0.04f, 2);
    void *h = dalloc_fill((size_t)TMAX * D, 1.0f, 3);
    uint8_t *q1, *q2;
    float *s1, *s2;
    CK(cudaMalloc((void **)&q1, (size_t)E * 2 * I * D));
    CK(cudaMalloc((void **)&q2, (size_t)E * D * I));
    CK(cudaMalloc((void **)&s1, (size_t)E * 2 * I * 4));
    CK(cudaMalloc((void **)&s2, (size_t)E * D * 4));
    OK(cuda_quant_e4m3_rows(G, q1, D, s1, (const uint16_t *)w1, D, (long)E * 2 * I, D));
    OK(cuda_quant_e4m3_rows(G, q2, I, s2, (const uint16_t *)w2, I, (long)E * D, I));
    float *x;
    int32_t *sel;
    float *wt;
    void *scr;
    CK(cudaMalloc((void **)&x, (size_t)TMAX * D * 4));
    CK(cudaMemset(x, 0, (size_t)TMAX * D * 4));
    CK(cudaMalloc((void **)&sel, (size_t)TMAX * K * 4));
    CK(cudaMalloc((void **)&wt, (size_t)TMAX * K * 4));
    CK(cudaMalloc(&scr, cuda_moe_scratch_bytes(TMAX, E, K, D, I)));
    int32_t *hs = (int32_t *)malloc((size_t)TMAX * K * 4);
    float *hw = (float *)malloc((size_t)TMAX * K * 4);
    for (int t = 0; t < TMAX; t++)
        for (int k = 0; k < K; k++) {
            int ex, dup;
            do {
                ex = (int)(rnd_u() % E);
                dup = 0;
                for (int j = 0; j < k; j++) dup |= hs[t * K + j] == ex;
            } while (dup);
            hs[t * K + k] = ex;
            hw[t * K + k] = 1.0f / K;
        }
    CK(cudaMemcpy(sel, hs, (size_t)TMAX * K * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(wt, hw, (size_t)TMAX * K * 4, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float *ms = (float *)malloc((size_t)runs * sizeof(float));
    printf("bench_moe: %s, %d SMs; experts %d top-%d, dim %d, inner %d; median of %d runs\n", prop.name,
           prop.multiProcessorCount, E, K, D, I, runs);
    printf("%-34s %10s %10s %12s\n", "cuda_moe_mlp", "ms", "TFLOP/s", "weights GB/s");
    const int Ts[] = {1, 4, 16, 64, 730};
    for (int ti = 0; ti < 5; ti++) {
        const int T = Ts[ti];
        if (only_t && T != only_t) continue;
        int used[64] = {0}, n_used = 0;
        for (int i = 0; i < T * K; i++)
            if (!used[hs[i]]++) n_used++;
        const double flop = 2.0 * T * K * 3.0 * D * I;
        for (int gf = 0; gf < 2 * (CUDA_MOE_GEMM_SHAPES + 1); gf++) {
            const int g = gf % (CUDA_MOE_GEMM_SHAPES + 1), f8 = gf > CUDA_MOE_GEMM_SHAPES;
            const double bytes = (double)n_used * 3.0 * D * I * (f8 ? 1 : 2);
            if (T <= CUDA_MOE_GEMV_MAX_T ? g > 0 : g == 0) continue;
            if (only_g >= 0 && g != only_g) continue;
            cuda_moe m;
            memset(&m, 0, sizeof m);
            m.T = T, m.E = E, m.K = K, m.dim = D, m.inner = I, m.w1 = (const uint16_t *)w1, m.ld1 = D;
            m.w2 = (const uint16_t *)w2, m.ld2 = I, m.h = (const uint16_t *)h, m.ldh = D, m.sel = sel, m.wt = wt;
            m.x = x, m.ldx = D, m.scratch = scr, m.path = 0, m.gemm = g;
            if (f8) m.q1 = q1, m.ldq1 = D, m.q2 = q2, m.ldq2 = I, m.s1 = s1, m.s2 = s2;
            for (int i = 0; i < 3; i++) OK(cuda_moe_mlp(G, &m));
            for (int r = 0; r < runs; r++) {
                CK(cudaEventRecord(e0, st));
                OK(cuda_moe_mlp(G, &m));
                CK(cudaEventRecord(e1, st));
                CK(cudaEventSynchronize(e1));
                CK(cudaEventElapsedTime(&ms[r], e0, e1));
            }
            qsort(ms, (size_t)runs, sizeof *ms, cmp_f);
            const float med = ms[runs / 2];
            char what[96];
            snprintf(what, sizeof what, "T=%d (%d experts) %s %s%d", T, n_used, f8 ? "fp8 " : "bf16",
                     g ? "grouped, tiles " : "GEMVs", g);
            printf("%-34s %10.4f %10.1f %12.0f\n", what, med, flop / (med * 1e-3) / 1e12, bytes / (med * 1e-3) / 1e9);
        }
    }
    if (only_t) {
        cuda_ctx_free(G);
        return 0;
    }
    /* routing and tau at decode shapes */
    float *lg, *scores, *alpha;
    CK(cudaMalloc((void **)&lg, (size_t)E * 4));
    CK(cudaMalloc((void **)&scores, 64 * 4));
    CK(cudaMalloc((void **)&alpha, 32 * 4));
    CK(cudaMemset(lg, 0x3c, (size_t)E * 4));
    CK(cudaMemset(scores, 0x3c, 64 * 4));
    CK(cudaMemset(alpha, 0x3c, 32 * 4));
    void *qkv = dalloc_fill(6144, 1.0f, 4), *tw = dalloc_fill((size_t)64 * 6144, 0.01f, 5);
    CK(cudaDeviceSynchronize());
    for (int which = 0; which < 3; which++) {
        for (int r = 0; r < runs + 3; r++) {
            CK(cudaEventRecord(e0, st));
            for (int i = 0; i < 10; i++) {
                if (which == 0) OK(cuda_moe_route(G, sel, wt, lg, E, 1, E, K));
                if (which == 1)
                    OK(cuda_tau_scores(G, scores, 64, (const uint16_t *)qkv, 6144, 1, 6144, (const uint16_t *)tw, 64));
                if (which == 2) {
                    cuda_tau a;
                    memset(&a, 0, sizeof a);
                    a.qkv = (uint16_t *)qkv, a.ldq = 6144, a.voff = 4096, a.T = 1, a.H = 32, a.D = 64;
                    a.scores = scores, a.lds = 64, a.alpha = alpha, a.pos0 = 740;
                    OK(cuda_tau_scale(G, &a));
                }
            }
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            if (r >= 3) CK(cudaEventElapsedTime(&ms[r - 3], e0, e1));
        }
        qsort(ms, (size_t)runs, sizeof *ms, cmp_f);
        static const char *names[] = {"cuda_moe_route T=1 E=64 k=8", "cuda_tau_scores T=1 6144x64",
                                      "cuda_tau_scale T=1 H=32"};
        printf("%-34s %10.4f ms each (10 back to back)\n", names[which], ms[runs / 2] / 10);
    }
    cuda_ctx_free(G);
    return 0;
}
