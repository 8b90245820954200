/*
 * bench_ceilings.cu — what cuBLASLt itself reaches at Moondream 2's large
 * shapes, for judging the backend's linears against the library rather
 * than against the datasheet (docs/CUDA.md, "Ceilings"):
 *
 *   1. bf16 × bf16 → bf16/f32 with bias (and GELU) in the epilogue, as
 *      cuda_linear calls it: the heuristic's first algorithm (what
 *      cuda_linear runs) against the fastest of its first 16, timed here;
 *   2. e4m3 × e4m3 with a float scale per output channel and per row
 *      (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F, the accurate way to run
 *      FP8 activations), with and without the bias epilogue and fast
 *      accumulation, and with one scale per tensor; each result checked
 *      against a bf16 GEMM of the dequantised values (power-of-two scales,
 *      so the two see the same numbers).
 *
 * Shapes: vision T = 6561 (9 crops) and 13122 (two images), the image
 * prefix at its 730 rows (a session's), at 768 (the engine's row bucket)
 * and 1536 (two images), and a 32-row prompt.
 * Medians of 20 timed runs (50 below 4096 rows) after 3 warm-up runs,
 * CUDA events, random data.
 *
 *   bench_ceilings [candidates=16]
 * Build: part of -DALBEDO_CUDA=ON (target bench_ceilings).
 */
#include <algorithm>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#define CK(x)                                                                       \
    do {                                                                            \
        int r_ = (int)(x);                                                          \
        if (r_ != 0) {                                                              \
            fprintf(stderr, "%s:%d: %s failed (%d)\n", __FILE__, __LINE__, #x, r_); \
            exit(1);                                                                \
        }                                                                           \
    } while (0)

/* Hash-random values in (-a, a) as bf16; q (when not NULL) gets e4m3 codes
 * and then d = float(q) · rs[row] (exact in bf16 for power-of-two rs). */
__global__ void fill_kernel(__nv_bfloat16 *d, __nv_fp8_e4m3 *q, const float *rs, size_t rows, size_t cols, float a,
                            unsigned seed) {
    const size_t n = rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        h ^= h >> 13;
        h *= 0x5bd1e995u;
        h ^= h >> 15;
        const float v = ((h & 0xffff) / 65536.0f - 0.5f) * 2.0f * a;
        if (q) {
            q[i] = __nv_fp8_e4m3(v);
            d[i] = __float2bfloat16(float(q[i]) * rs[i / cols]);
        } else {
            d[i] = __float2bfloat16(v);
        }
    }
}

__global__ void pow2_kernel(float *s, int n, int seed) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) s[i] = ldexpf(1.0f, -8 - (i * 7 + seed) % 5);
}

typedef struct shape {
    const char *name;
    int T, N, K;
    int f32out; /* float32 output accumulated into (beta = 1), else bf16 */
    int gelu;
} shape;

static const shape SHAPES[] = {
    {"vision qkv", 6561, 3456, 1152, 0, 0},    {"vision proj", 6561, 1152, 1152, 1, 0},
    {"vision fc1", 6561, 4304, 1152, 0, 1},    {"vision fc2", 6561, 1152, 4304, 1, 0},
    {"vision×2 qkv", 13122, 3456, 1152, 0, 0}, {"vision×2 proj", 13122, 1152, 1152, 1, 0},
    {"vision×2 fc1", 13122, 4304, 1152, 0, 1}, {"vision×2 fc2", 13122, 1152, 4304, 1, 0},
    {"prefix730 qkv", 730, 6144, 2048, 0, 0},  {"prefix730 proj", 730, 2048, 2048, 1, 0},
    {"prefix730 fc1", 730, 8192, 2048, 0, 1},  {"prefix730 fc2", 730, 2048, 8192, 1, 0},
    {"prefix qkv", 768, 6144, 2048, 0, 0},     {"prefix proj", 768, 2048, 2048, 1, 0},
    {"prefix fc1", 768, 8192, 2048, 0, 1},     {"prefix fc2", 768, 2048, 8192, 1, 0},
    {"prefix×2 qkv", 1536, 6144, 2048, 0, 0},  {"prefix×2 proj", 1536, 2048, 2048, 1, 0},
    {"prefix×2 fc1", 1536, 8192, 2048, 0, 1},  {"prefix×2 fc2", 1536, 2048, 8192, 1, 0},
    {"prompt qkv", 32, 6144, 2048, 0, 0},      {"prompt fc1", 32, 8192, 2048, 0, 1},
    {"prompt fc2", 32, 2048, 8192, 1, 0},
};

static cublasLtHandle_t LT;
static cudaStream_t ST;
static void *WS;
static const size_t WSZ = (size_t)32 << 20;

typedef struct gemm {
    cublasLtMatmulDesc_t d;
    cublasLtMatrixLayout_t a, b, c;
} gemm;

/* y[T, N] = x[T, K]·W[N, K]ᵀ as cuda_linear lays it out (column-major
 * yᵀ = W·xᵀ: A = W transposed, B = x, C = D = y). */
static void gemm_make(gemm *g, const shape *s, cudaDataType_t in, int epilogue, const void *bias) {
    CK(cublasLtMatmulDescCreate(&g->d, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CK(cublasLtMatmulDescSetAttribute(g->d, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    CK(cublasLtMatmulDescSetAttribute(g->d, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    if (epilogue) {
        const cublasLtEpilogue_t epi = s->gelu ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
        CK(cublasLtMatmulDescSetAttribute(g->d, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
        const int32_t bt = s->f32out ? CUDA_R_32F : CUDA_R_16BF; /* the model's biases: the output's type */
        CK(cublasLtMatmulDescSetAttribute(g->d, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt));
        CK(cublasLtMatmulDescSetAttribute(g->d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    CK(cublasLtMatrixLayoutCreate(&g->a, in, s->K, s->N, s->K));
    CK(cublasLtMatrixLayoutCreate(&g->b, in, s->K, s->T, s->K));
    CK(cublasLtMatrixLayoutCreate(&g->c, s->f32out ? CUDA_R_32F : CUDA_R_16BF, s->N, s->T, s->N));
}

static void gemm_free(gemm *g) {
    cublasLtMatrixLayoutDestroy(g->a);
    cublasLtMatrixLayoutDestroy(g->b);
    cublasLtMatrixLayoutDestroy(g->c);
    cublasLtMatmulDescDestroy(g->d);
}

/* Up to n algorithms from the heuristic, best first; returns how many. */
static int gemm_algos(const gemm *g, cublasLtMatmulHeuristicResult_t *r, int n) {
    cublasLtMatmulPreference_t pref;
    CK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t w = WSZ;
    CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &w, sizeof w));
    int got = 0;
    if (cublasLtMatmulAlgoGetHeuristic(LT, g->d, g->a, g->b, g->c, g->c, pref, n, r, &got) != CUBLAS_STATUS_SUCCESS)
        got = 0;
    cublasLtMatmulPreferenceDestroy(pref);
    int k = 0;
    for (int i = 0; i < got; i++)
        if (r[i].state == CUBLAS_STATUS_SUCCESS) r[k++] = r[i];
    return k;
}

/* Median microseconds of one run (or -1 when it does not run). */
static float gemm_time(const gemm *g, const cublasLtMatmulAlgo_t *algo, const void *w, const void *x, void *y,
                       float beta, int reps) {
    const float alpha = 1.0f;
    for (int i = 0; i < 3; i++)
        if (cublasLtMatmul(LT, g->d, &alpha, w, g->a, x, g->b, &beta, y, g->c, y, g->c, algo, WS, WSZ, ST) !=
            CUBLAS_STATUS_SUCCESS)
            return -1.0f;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> t((size_t)reps);
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(e0, ST));
        cublasLtMatmul(LT, g->d, &alpha, w, g->a, x, g->b, &beta, y, g->c, y, g->c, algo, WS, WSZ, ST);
        CK(cudaEventRecord(e1, ST));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&t[(size_t)i], e0, e1));
    }
    std::sort(t.begin(), t.end());
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return t[(size_t)reps / 2] * 1e3f;
}

static double tflops(const shape *s, float us) { return 2.0 * s->T * s->N * s->K / (us * 1e-6) / 1e12; }

/* Relative L2 difference of two device outputs of s. */
static double rel_l2(const shape *s, const void *y, const void *ref) {
    const size_t n = (size_t)s->T * s->N;
    std::vector<float> a(n), b(n);
    if (s->f32out) {
        CK(cudaMemcpy(a.data(), y, n * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(b.data(), ref, n * 4, cudaMemcpyDeviceToHost));
    } else {
        std::vector<__nv_bfloat16> ah(n), bh(n);
        CK(cudaMemcpy(ah.data(), y, n * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(bh.data(), ref, n * 2, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < n; i++) a[i] = __bfloat162float(ah[i]), b[i] = __bfloat162float(bh[i]);
    }
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]), den += (double)b[i] * b[i];
    return sqrt(num / (den > 0 ? den : 1));
}

int main(int argc, char **argv) {
    const int cands = argc > 1 && atoi(argv[1]) > 0 ? atoi(argv[1]) : 16;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("bench_ceilings: %s, %d SMs; cuBLASLt %zu; medians, microseconds (TFLOP/s)\n\n", prop.name,
           prop.multiProcessorCount, cublasLtGetVersion());
    CK(cublasLtCreate(&LT));
    CK(cudaStreamCreate(&ST));
    CK(cudaMalloc(&WS, WSZ));
    size_t mw = 0, mx = 0, my = 0;
    for (const shape &s : SHAPES) {
        mw = std::max(mw, (size_t)s.N * s.K);
        mx = std::max(mx, (size_t)s.T * s.K);
        my = std::max(my, (size_t)s.T * s.N);
    }
    __nv_bfloat16 *w, *x, *wd, *xd;
    __nv_fp8_e4m3 *w8, *x8;
    void *y, *yref, *bias;
    float *sw, *sx;
    CK(cudaMalloc(&w, mw * 2));
    CK(cudaMalloc(&x, mx * 2));
    CK(cudaMalloc(&wd, mw * 2));
    CK(cudaMalloc(&xd, mx * 2));
    CK(cudaMalloc(&w8, mw));
    CK(cudaMalloc(&x8, mx));
    CK(cudaMalloc(&y, my * 4));
    CK(cudaMalloc(&yref, my * 4));
    CK(cudaMalloc(&bias, 8192 * 4));
    CK(cudaMalloc(&sw, 16384 * 4));
    CK(cudaMalloc(&sx, 16384 * 4));
    CK(cudaMemset(bias, 0, 8192 * 4));
    CK(cudaMemset(y, 0, my * 4));
    pow2_kernel<<<128, 128>>>(sw, 16384, 1);
    pow2_kernel<<<128, 128>>>(sx, 16384, 3);
    CK(cudaGetLastError());

    printf("1. bf16, the epilogue cuda_linear uses: heuristic's first / fastest of its first %d\n", cands);
    printf("%-15s %6s %6s %6s %20s %20s %6s\n", "shape", "T", "N", "K", "first", "fastest", "gain");
    std::vector<cublasLtMatmulHeuristicResult_t> res((size_t)cands);
    for (const shape &s : SHAPES) {
        fill_kernel<<<1024, 256>>>(w, NULL, NULL, s.N, s.K, sqrtf(3.0f / s.K), 11);
        fill_kernel<<<1024, 256>>>(x, NULL, NULL, s.T, s.K, 1.0f, 12);
        gemm g;
        gemm_make(&g, &s, CUDA_R_16BF, 1, bias);
        const int n = gemm_algos(&g, res.data(), cands);
        const int reps = s.T >= 4096 ? 20 : 50;
        float first = -1, best = -1;
        for (int i = 0; i < n; i++) {
            const float t = gemm_time(&g, &res[(size_t)i].algo, w, x, y, s.f32out ? 1.0f : 0.0f, reps);
            if (i == 0) first = t;
            if (t > 0 && (best < 0 || t < best)) best = t;
        }
        if (first > 0)
            printf("%-15s %6d %6d %6d %9.1f (%7.0f) %9.1f (%7.0f) %5.1f%%\n", s.name, s.T, s.N, s.K, first,
                   tflops(&s, first), best, tflops(&s, best), 100.0 * (first - best) / first);
        else
            printf("%-15s %6d %6d %6d   no algorithm\n", s.name, s.T, s.N, s.K);
        gemm_free(&g);
    }

    printf("\n2. e4m3 (fastest of the heuristic's first %d) against bf16 (its first, no epilogue); rel L2 of the "
           "e4m3 result against bf16 on the dequantised values\n",
           cands);
    static const char *cfgs[] = {"channel × row scales", "  + bias/GELU epilogue", "  + fast accumulation",
                                 "one scale a tensor"};
    printf("%-15s %6s %-24s %20s %20s %9s\n", "shape", "T", "e4m3 form", "e4m3", "bf16", "rel L2");
    for (const shape &s : SHAPES) {
        if (s.T < 768) continue;
        fill_kernel<<<1024, 256>>>(wd, w8, sw, s.N, s.K, 400.0f, 21);
        fill_kernel<<<1024, 256>>>(xd, x8, sx, s.T, s.K, 400.0f, 22);
        const int reps = s.T >= 4096 ? 20 : 50;
        gemm r;
        gemm_make(&r, &s, CUDA_R_16BF, 0, NULL);
        cublasLtMatmulHeuristicResult_t h1;
        const float tb = gemm_algos(&r, &h1, 1) == 1 ? gemm_time(&r, &h1.algo, wd, xd, yref, 0.0f, reps) : -1.0f;
        gemm_free(&r);
        if (tb < 0) { /* no reference: nothing to compare the e4m3 forms with */
            printf("%-15s %6d   no bf16 algorithm\n", s.name, s.T);
            continue;
        }
        for (int cfg = 0; cfg < 4; cfg++) {
            gemm g;
            gemm_make(&g, &s, CUDA_R_8F_E4M3, cfg == 1, bias);
            if (cfg != 3) {
                const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
                CK(cublasLtMatmulDescSetAttribute(g.d, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof mode));
                CK(cublasLtMatmulDescSetAttribute(g.d, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof mode));
            }
            const void *pa = sw, *pb = sx;
            CK(cublasLtMatmulDescSetAttribute(g.d, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &pa, sizeof pa));
            CK(cublasLtMatmulDescSetAttribute(g.d, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &pb, sizeof pb));
            if (cfg == 2) {
                const int8_t fast = 1;
                CK(cublasLtMatmulDescSetAttribute(g.d, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast));
            }
            const int n = gemm_algos(&g, res.data(), cands);
            float best = -1;
            int bi = -1;
            for (int i = 0; i < n; i++) {
                const float t = gemm_time(&g, &res[(size_t)i].algo, w8, x8, y, 0.0f, reps);
                if (t > 0 && (best < 0 || t < best)) best = t, bi = i;
            }
            if (bi < 0) {
                printf("%-15s %6d %-24s   no algorithm\n", s.name, s.T, cfgs[cfg]);
            } else {
                const float alpha = 1.0f, beta = 0.0f;
                CK(cublasLtMatmul(LT, g.d, &alpha, w8, g.a, x8, g.b, &beta, y, g.c, y, g.c, &res[(size_t)bi].algo, WS,
                                  WSZ, ST));
                CK(cudaStreamSynchronize(ST));
                /* with one scale a tensor the vectors' first elements scale everything, and the GELU'd
                 * output is not the plain product: not comparable */
                char rl[32];
                if (cfg == 3 || (cfg == 1 && s.gelu))
                    snprintf(rl, sizeof rl, "-");
                else
                    snprintf(rl, sizeof rl, "%.1e", rel_l2(&s, y, yref));
                printf("%-15s %6d %-24s %9.1f (%7.0f) %9.1f (%7.0f) %9s\n", s.name, s.T, cfgs[cfg], best,
                       tflops(&s, best), tb, tflops(&s, tb), rl);
            }
            gemm_free(&g);
        }
    }
    return 0;
}
