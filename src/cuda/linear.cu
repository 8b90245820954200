/*
 * linear.cu — y = act(x·Wᵀ + b) (+ y) with bf16 x and W, float32 sums.
 *
 *   T <= 8 (decode): gemv_kernel, one warp per output channel. Reading W is
 *     the whole cost (2 bytes per weight, each read once), so each lane
 *     streams 16-byte words of its row, the next batch of up to four
 *     issued before the current one is used, bypassing L1 (W is never
 *     reused within a step), and keeps T float accumulators. x is tiny and
 *     re-read through L1. The first batch is issued before the programmatic
 *     dependent launch wait, so the stream starts while the kernel before
 *     finishes.
 *   T > 8 (prefill, vision): cuBLASLt, bf16 × bf16 with fp32 accumulation
 *     (CUBLAS_COMPUTE_32F), bias and GELU fused in its epilogue. Row-major
 *     y[T,N] = x[T,K]·W[N,K]ᵀ is, column-major, yᵀ[N,T] = W·xᵀ: A = W read
 *     transposed (K×N, ld K), B = x (K×T, ld ldx), C = D = y (N×T, ld ldy).
 *     When cuBLASLt offers no algorithm with the epilogue, the GEMM runs
 *     without it and bias_act_kernel follows; with no algorithm at all, the
 *     GEMV kernel runs over 8-row slices (slow, but right).
 */
#include <string.h>

#include "cuda_internal.cuh"

/* ---- bias + activation (cuBLASLt without its epilogue) -------------------- */

template <typename YT>
__global__ void bias_act_kernel(YT *y, int ldy, int T, int N, const void *b, int b_f32, int act) {
    pdl_trigger();
    pdl_wait();
    const long n_all = (long)T * N;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n_all; i += (long)gridDim.x * blockDim.x) {
        const int t = (int)(i / N), n = (int)(i % N);
        YT *p = y + (long)t * ldy + n;
        float v = to_f(*p);
        if (b) v += ld_param(b, b_f32, n);
        if (act == CUDA_ACT_GELU_TANH) v = gelu_tanh_f(v);
        *p = from_f<YT>(v);
    }
}

albedo_status cuda_bias_act(cuda_ctx *c, void *y, dtype ydt, int ldy, int T, int N, const void *b, dtype bdt,
                            cuda_act act) {
    if (!b && act == CUDA_ACT_NONE) return ALBEDO_OK;
    const long n = (long)T * N;
    const int threads = 256;
    const int blocks = (int)((n + threads - 1) / threads < 4096 ? (n + threads - 1) / threads : 4096);
    if (ydt == DT_F32)
        CU_TRY(c, (launch_k(c, bias_act_kernel<float>, dim3(blocks), dim3(threads), 0, (float *)y, ldy, T, N, b,
                            bdt == DT_F32, (int)act)));
    else
        CU_TRY(c, (launch_k(c, bias_act_kernel<bf16>, dim3(blocks), dim3(threads), 0, (bf16 *)y, ldy, T, N, b,
                            bdt == DT_F32, (int)act)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* ---- GEMV ------------------------------------------------------------------ */

/* A 16-byte load through the non-coherent path that does not allocate in
 * L1: weights are read once per step. */
__device__ __forceinline__ uint4 ld_stream(const uint4 *p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

#define GEMV_WARPS 4

/* One warp per output channel n: acc[t] = Σ_k x[t][k] W[n][k] over the
 * lanes' 8-element slices, then a butterfly sum. TT rows of x (1..8). U
 * independent 16-byte weight loads per lane are in flight per step; fewer
 * for larger TT, whose x slices take the registers. */
template <int TT, typename YT>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(YT *__restrict__ y, int ldy, const bf16 *__restrict__ x, int ldx, const bf16 *__restrict__ w,
                const void *__restrict__ b, int b_f32, int N, int K, int act, int accumulate) {
    constexpr int U = TT <= 2 ? 4 : (TT <= 4 ? 2 : 1);
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (n >= N) return;
    const uint4 *wr = (const uint4 *)(w + (size_t)n * K);
    const int K8 = K >> 3;
    float acc[TT];
#pragma unroll
    for (int t = 0; t < TT; t++) acc[t] = 0.0f;
    int i = lane;
    /* The weights depend on no earlier kernel: the first batch of loads is
     * issued before waiting for the kernel that writes x (with programmatic
     * dependent launch that wait overlaps the previous kernel's tail). */
    uint4 wv[U];
    bool more = i + 32 * (U - 1) < K8;
    if (more) {
#pragma unroll
        for (int u = 0; u < U; u++) wv[u] = ld_stream(wr + i + 32 * u);
    }
    pdl_trigger();
    pdl_wait();
    while (more) {
        /* Issue the next batch before using this one: 2U loads in flight. */
        const bool next = i + 32 * U + 32 * (U - 1) < K8;
        uint4 nv[U];
        if (next) {
#pragma unroll
            for (int u = 0; u < U; u++) nv[u] = ld_stream(wr + i + 32 * U + 32 * u);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            float wf[8];
            bf16x8_to_f(wv[u], wf);
#pragma unroll
            for (int t = 0; t < TT; t++) {
                const uint4 xv = __ldg((const uint4 *)(x + (size_t)t * ldx) + i + 32 * u);
                float xf[8];
                bf16x8_to_f(xv, xf);
#pragma unroll
                for (int e = 0; e < 8; e++) acc[t] = fmaf(wf[e], xf[e], acc[t]);
            }
        }
        i += 32 * U;
        more = next;
#pragma unroll
        for (int u = 0; u < U; u++) wv[u] = nv[u];
    }
    for (; i < K8; i += 32) {
        float wf[8];
        bf16x8_to_f(ld_stream(wr + i), wf);
#pragma unroll
        for (int t = 0; t < TT; t++) {
            float xf[8];
            bf16x8_to_f(__ldg((const uint4 *)(x + (size_t)t * ldx) + i), xf);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[t] = fmaf(wf[e], xf[e], acc[t]);
        }
    }
#pragma unroll
    for (int t = 0; t < TT; t++) acc[t] = warp_sum(acc[t]);
    if (lane == 0) {
        const float bias = b ? ld_param(b, b_f32, n) : 0.0f;
#pragma unroll
        for (int t = 0; t < TT; t++) {
            YT *p = y + (size_t)t * ldy + n;
            float v = acc[t] + bias;
            if (act == CUDA_ACT_GELU_TANH) v = gelu_tanh_f(v);
            if (accumulate) v += to_f(*p);
            *p = from_f<YT>(v);
        }
    }
}

template <typename YT>
static albedo_status gemv_launch(cuda_ctx *c, int T, YT *y, int ldy, const bf16 *x, int ldx, const cuda_linear_w *L,
                                 cuda_act act, int accumulate) {
    const int N = L->n_out, K = L->n_in;
    const dim3 grid((N + GEMV_WARPS - 1) / GEMV_WARPS), block(GEMV_WARPS * 32);
    const bf16 *w = (const bf16 *)L->w;
    const int bf = L->bdt == DT_F32;
#define GEMV_CASE(TT)                                                                                            \
    case TT:                                                                                                     \
        CU_TRY(c, (launch_k(c, gemv_kernel<TT, YT>, grid, block, 0, y, ldy, x, ldx, w, L->b, bf, N, K, (int)act, \
                            accumulate)));                                                                       \
        break;
    switch (T) {
        GEMV_CASE(1)
        GEMV_CASE(2)
        GEMV_CASE(3)
        GEMV_CASE(4)
        GEMV_CASE(5)
        GEMV_CASE(6)
        GEMV_CASE(7)
        GEMV_CASE(8)
    default: break;
    }
#undef GEMV_CASE
    return ALBEDO_OK;
}

static albedo_status gemv(cuda_ctx *c, void *y, dtype ydt, int ldy, const uint16_t *x, int ldx, int T,
                          const cuda_linear_w *L, cuda_act act, int accumulate) {
    const size_t es = ydt == DT_F32 ? 4 : 2;
    for (int t0 = 0; t0 < T; t0 += 8) {
        const int tt = T - t0 < 8 ? T - t0 : 8;
        const bf16 *xs = (const bf16 *)x + (size_t)t0 * ldx;
        char *ys = (char *)y + (size_t)t0 * ldy * es;
        albedo_status st = ydt == DT_F32 ? gemv_launch<float>(c, tt, (float *)ys, ldy, xs, ldx, L, act, accumulate)
                                         : gemv_launch<bf16>(c, tt, (bf16 *)ys, ldy, xs, ldx, L, act, accumulate);
        if (st != ALBEDO_OK) return st;
    }
    c->n_gemv++;
    return ALBEDO_OK;
}

/* ---- cuBLASLt ---------------------------------------------------------------- */

#define LT_TRY(c, call)                                                                                          \
    do {                                                                                                         \
        cublasStatus_t s_ = (call);                                                                              \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                                         \
            return cuda_fail((c), ALBEDO_ERR_INTERNAL, "%s: cuBLAS status %d (%s:%d)", #call, (int)s_, __FILE__, \
                             __LINE__);                                                                          \
    } while (0)

/* Alignment in bytes (<= 256) that every row start of a matrix at p with
 * rows ld_bytes apart has. */
static int align_of(const void *p, size_t ld_bytes) {
    uintptr_t a = (uintptr_t)p | 256u | (uintptr_t)ld_bytes;
    return (int)(a & (~a + 1));
}

static void plan_destroy(lt_plan *p) {
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    if (p->a) cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) cublasLtMatrixLayoutDestroy(p->b);
    if (p->cd) cublasLtMatrixLayoutDestroy(p->cd);
    memset(p, 0, sizeof *p);
}

/* Descriptors and heuristic for key k in slot p (p->ok says whether
 * cuBLASLt has an algorithm for it). */
static albedo_status plan_make(cuda_ctx *c, lt_plan *p, const lt_key *k) {
    memset(p, 0, sizeof *p);
    p->key = *k;
    p->used = 1;
    LT_TRY(c, cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    LT_TRY(c, cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    LT_TRY(c, cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    const cublasLtEpilogue_t epi = (cublasLtEpilogue_t)k->epilogue;
    LT_TRY(c, cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    if (k->epilogue == CUBLASLT_EPILOGUE_BIAS || k->epilogue == CUBLASLT_EPILOGUE_GELU_BIAS) {
        const int32_t bt = k->bdt == DT_F32 ? CUDA_R_32F : CUDA_R_16BF;
        LT_TRY(c, cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt));
    }
    const cudaDataType_t yt = k->ydt == DT_F32 ? CUDA_R_32F : CUDA_R_16BF;
    LT_TRY(c, cublasLtMatrixLayoutCreate(&p->a, CUDA_R_16BF, k->K, k->N, k->K));
    LT_TRY(c, cublasLtMatrixLayoutCreate(&p->b, CUDA_R_16BF, k->K, k->T, k->ldx));
    LT_TRY(c, cublasLtMatrixLayoutCreate(&p->cd, yt, k->N, k->T, k->ldy));

    cublasLtMatmulPreference_t pref = NULL;
    LT_TRY(c, cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = c->lt_ws_size;
    const uint32_t al[4] = {(uint32_t)k->align_w, (uint32_t)k->align_x, (uint32_t)k->align_y, (uint32_t)k->align_b};
    cublasStatus_t s =
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0],
                                                 sizeof al[0]);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1],
                                                 sizeof al[1]);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2],
                                                 sizeof al[2]);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[2],
                                                 sizeof al[2]);
    if (s != CUBLAS_STATUS_SUCCESS) {
        cublasLtMatmulPreferenceDestroy(pref);
        return cuda_fail(c, ALBEDO_ERR_INTERNAL, "cuBLASLt preference: status %d", (int)s);
    }
    cublasLtMatmulHeuristicResult_t res;
    int n_res = 0;
    s = cublasLtMatmulAlgoGetHeuristic(c->lt, p->desc, p->a, p->b, p->cd, p->cd, pref, 1, &res, &n_res);
    cublasLtMatmulPreferenceDestroy(pref);
    p->ok = s == CUBLAS_STATUS_SUCCESS && n_res > 0 && res.state == CUBLAS_STATUS_SUCCESS;
    if (p->ok) p->algo = res.algo;
    return ALBEDO_OK;
}

static albedo_status plan_get(cuda_ctx *c, const lt_key *k, lt_plan **out) {
    for (int i = 0; i < LT_PLANS; i++)
        if (c->plans[i].used && memcmp(&c->plans[i].key, k, sizeof *k) == 0) {
            *out = &c->plans[i];
            return ALBEDO_OK;
        }
    int slot = -1;
    for (int i = 0; i < LT_PLANS && slot < 0; i++)
        if (!c->plans[i].used) slot = i;
    if (slot < 0) {
        slot = c->next_plan;
        c->next_plan = (c->next_plan + 1) % LT_PLANS;
        plan_destroy(&c->plans[slot]);
    }
    albedo_status st = plan_make(c, &c->plans[slot], k);
    if (st != ALBEDO_OK) {
        plan_destroy(&c->plans[slot]);
        return st;
    }
    *out = &c->plans[slot];
    return ALBEDO_OK;
}

static albedo_status lt_run(cuda_ctx *c, const lt_plan *p, void *y, const uint16_t *x, const cuda_linear_w *L,
                            int accumulate) {
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    if (p->key.epilogue == CUBLASLT_EPILOGUE_BIAS || p->key.epilogue == CUBLASLT_EPILOGUE_GELU_BIAS) {
        const void *bp = L->b;
        LT_TRY(c, cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof bp));
    }
    LT_TRY(c, cublasLtMatmul(c->lt, p->desc, &alpha, L->w, p->a, x, p->b, &beta, y, p->cd, y, p->cd, &p->algo, c->lt_ws,
                             c->lt_ws_size, c->stream));
    return ALBEDO_OK;
}

albedo_status cuda_linear(cuda_ctx *c, void *y, dtype ydt, int ldy, const uint16_t *x, int ldx, int T,
                          const cuda_linear_w *L, cuda_act act, int accumulate) {
    const int N = L->n_out, K = L->n_in;
    CU_ARG(c, T >= 0 && N > 0 && K > 0);
    if (T == 0) return ALBEDO_OK;
    CU_ARG(c, ydt == DT_F32 || ydt == DT_BF16);
    CU_ARG(c, !L->b || L->bdt == DT_F32 || L->bdt == DT_BF16);
    CU_ARG(c, act == CUDA_ACT_NONE || act == CUDA_ACT_GELU_TANH);
    CU_ARG(c, !(accumulate && act != CUDA_ACT_NONE));
    CU_ARG(c, K % 8 == 0 && ldx % 8 == 0 && ldx >= K && ldy >= N);
    CU_ARG(c, is_aligned(x, 16) && is_aligned(L->w, 16));
    if (T <= c->gemv_max_t) return gemv(c, y, ydt, ldy, x, ldx, T, L, act, accumulate);

    lt_key k;
    memset(&k, 0, sizeof k); /* padding too: keys are compared with memcmp */
    k.N = N;
    k.K = K;
    k.T = T;
    k.ldx = ldx;
    k.ldy = ldy;
    k.ydt = ydt;
    k.bdt = L->b ? L->bdt : -1;
    k.accumulate = accumulate;
    k.align_x = align_of(x, (size_t)ldx * 2);
    k.align_w = align_of(L->w, (size_t)K * 2);
    k.align_y = align_of(y, (size_t)ldy * (ydt == DT_F32 ? 4 : 2));
    k.align_b = L->b ? align_of(L->b, 0) : 0;
    const int gelu = act == CUDA_ACT_GELU_TANH;
    k.epilogue = L->b ? (gelu ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_BIAS)
                      : (gelu ? CUBLASLT_EPILOGUE_GELU : CUBLASLT_EPILOGUE_DEFAULT);
    lt_plan *p = NULL;
    albedo_status st = plan_get(c, &k, &p);
    if (st != ALBEDO_OK) return st;
    if (p->ok) {
        c->n_lt_fused++;
        return lt_run(c, p, y, x, L, accumulate);
    }
    if (k.epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
        k.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
        k.bdt = -1;
        k.align_b = 0;
        st = plan_get(c, &k, &p);
        if (st != ALBEDO_OK) return st;
        if (p->ok) {
            c->n_lt_unfused++;
            st = lt_run(c, p, y, x, L, accumulate);
            if (st != ALBEDO_OK) return st;
            return cuda_bias_act(c, y, ydt, ldy, T, N, L->b, L->bdt, act);
        }
    }
    return gemv(c, y, ydt, ldy, x, ldx, T, L, act, accumulate);
}
