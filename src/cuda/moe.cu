/*
 * moe.cu — Moondream 3's own kernels (spec/model.md §10.2, §10.3): tau
 * attention's scaling of Q and V, and the mixture-of-experts MLP.
 *
 *   tau     cuda_gelu_erf_rows: f = gelu_erf(qkv) as bf16 (the scores then
 *           come from cuda_linear with the [2H, qkv] matrix wq ‖ wv), or for
 *           T <= 4 cuda_tau_scores: both in one launch, a block per score;
 *           cuda_tau_scale: per row and head, q *= tanh(sq) + τ(p) and
 *           v *= tanh(sv) + τ(p), τ(p) = sigmoid(α·ln(p + 1)) + 0.5, the
 *           position from the host or from device memory (graphs).
 *   route   moe_route_kernel: one warp per token; the top k of E logits by
 *           k rounds of a warp arg-max (ties to the lower index, NaN never
 *           beats a number), softmax over those k in float32.
 *   MLP     T <= 4 (decode): two GEMV launches that read only the selected
 *           experts' rows: moe_up_gemv_kernel (one warp per (assignment,
 *           j): both halves of fc1, gelu_erf(a)·(g + 1) → act bf16) and
 *           moe_down_gemv_kernel (a block per (token, n), a warp per
 *           expert: Σ_k w_k·act_k·W2[e_k][n], added into x in rank order).
 *           T > 4 (prefill): the T·k assignments grouped by expert on the
 *           device — moe_sort_kernel (one block: a histogram, offsets, a
 *           list of 64- or 128-row tiles per expert, each assignment's
 *           place) — then a grouped GEMM over the tiles for each weight
 *           matrix (moe_mma_kernel: bf16 mma.sync.m16n8k16 with ldmatrix
 *           fragments, fp32 accumulators in registers, a cp.async multi-stage
 *           pipeline, 16-row slabs past a tile's end skipped; rows of A
 *           gathered by token for fc1; the GeGLU epilogue fused into fc1's,
 *           from the registers; moe_gemm_kernel, the earlier WMMA form, stays
 *           selectable for comparison: cuda_moe.gemm 1-4), and
 *           moe_combine_kernel: x[t] += Σ_k w_k·y[place(t, k)], in a fixed
 *           order, so the result does not depend on the order of atomics.
 *   FP8     the same with e4m3 experts and a float scale per row
 *           (cuda_moe.q1/q2, s1/s2; docs/CUDA.md, FP8 experts):
 *           moe_up_gemv_f8_kernel / moe_down_gemv_f8_kernel (8-byte weight
 *           loads, each input piece shared by several rows), and
 *           moe_mma_kernel<..., F8 = 1> (e4m3 W stages widened to a bf16
 *           tile in shared memory each K step, the scale in the epilogue);
 *           quant_e4m3_rows_kernel makes them at upload.
 * Nothing here synchronises with the host or allocates: both paths can be
 * captured into a CUDA graph.
 */
#include <limits.h>
#include <mma.h>
#include <stdio.h>

#include "cuda_internal.cuh"

/* A 16-byte load of weights through the non-coherent path, not allocating
 * in L1 (each weight is read once per step). */
__device__ __forceinline__ uint4 moe_ld_stream(const bf16 *p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

/* The same for 8 bytes (8 e4m3 weights). */
__device__ __forceinline__ uint2 moe_ld_stream8(const uint8_t *p) {
    uint2 r;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    return r;
}

/* ---- tau ------------------------------------------------------------------------------ */

__global__ void gelu_erf_rows_kernel(bf16 *y, int ldy, const bf16 *x, int ldx, int T, int C) {
    pdl_trigger();
    pdl_wait();
    const long n = (long)T * C;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long t = i / C, c = i % C;
        y[t * ldy + c] = __float2bfloat16_rn(gelu_erf_f(__bfloat162float(x[t * ldx + c])));
    }
}

albedo_status cuda_gelu_erf_rows(cuda_ctx *c, uint16_t *y, int ldy, const uint16_t *x, int ldx, int T, int C) {
    CU_ARG(c, T >= 0 && C >= 0 && ldy >= C && ldx >= C);
    if (!T || !C) return ALBEDO_OK;
    const long n = (long)T * C;
    const int blocks = (int)((n + 255) / 256 < 4 * 1024 ? (n + 255) / 256 : 4 * 1024);
    CU_TRY(c,
           launch_k(c, gelu_erf_rows_kernel, dim3(blocks), dim3(256), 0, (bf16 *)y, ldy, (const bf16 *)x, ldx, T, C));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* Decode form of tau's scores: block r computes sc[t][r] = Σ_c f[t][c]·w[r][c]
 * for the T <= 4 rows, f = gelu_erf(qkv) rounded to bf16 as
 * cuda_gelu_erf_rows stores it, on the fly; the block's 256 threads split
 * the C columns (16-byte pieces) and sum through shared memory. */
__global__ void __launch_bounds__(256)
    tau_scores_kernel(float *sc, int lds, const bf16 *qkv, int ldq, int T, int C, const bf16 *w) {
    __shared__ float red[32];
    pdl_trigger();
    pdl_wait();
    const int r = blockIdx.x;
    const bf16 *wr = w + (long)r * C;
    float acc[CUDA_TAU_SCORES_MAX_T];
#pragma unroll
    for (int t = 0; t < CUDA_TAU_SCORES_MAX_T; t++) acc[t] = 0.0f;
    for (int c = threadIdx.x * 8; c < C; c += blockDim.x * 8) {
        float wf[8];
        bf16x8_to_f(moe_ld_stream(wr + c), wf);
#pragma unroll
        for (int t = 0; t < CUDA_TAU_SCORES_MAX_T; t++) {
            if (t >= T) break;
            float xf[8];
            bf16x8_to_f(__ldg((const uint4 *)(qkv + (long)t * ldq + c)), xf);
#pragma unroll
            for (int i = 0; i < 8; i++)
                acc[t] = fmaf(wf[i], __bfloat162float(__float2bfloat16_rn(gelu_erf_f(xf[i]))), acc[t]);
        }
    }
#pragma unroll
    for (int t = 0; t < CUDA_TAU_SCORES_MAX_T; t++) {
        if (t >= T) break;
        const float v = block_sum(acc[t], red);
        if (threadIdx.x == 0) sc[(long)t * lds + r] = v;
    }
}

albedo_status cuda_tau_scores(cuda_ctx *c, float *scores, int lds, const uint16_t *qkv, int ldq, int T, int C,
                              const uint16_t *w, int n_rows) {
    CU_ARG(c, T >= 0 && T <= CUDA_TAU_SCORES_MAX_T && n_rows >= 0 && lds >= n_rows && C % 8 == 0 && ldq % 8 == 0);
    CU_ARG(c, ldq >= C && is_aligned(qkv, 16) && is_aligned(w, 16));
    if (!T || !n_rows) return ALBEDO_OK;
    CU_TRY(c, launch_k(c, tau_scores_kernel, dim3(n_rows), dim3(256), 0, scores, lds, (const bf16 *)qkv, ldq, T, C,
                       (const bf16 *)w));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* ln(p + 1), with p and p + 1 rounded to bf16 first when pos_bf16 (text.c's
 * log_pos). */
__device__ __forceinline__ float tau_log_pos(int p, int pos_bf16) {
    float x = (float)p;
    if (pos_bf16) {
        x = __bfloat162float(__float2bfloat16_rn(x));
        x = __bfloat162float(__float2bfloat16_rn(x + 1.0f));
        return __bfloat162float(__float2bfloat16_rn(logf(x)));
    }
    return logf(x + 1.0f);
}

/* Block t: the 2H factors of row t into shared memory, then q and v
 * scaled 8 elements (16 bytes) at a time when vec (D, ldq and voff
 * multiples of 8), else one at a time. */
__global__ void tau_scale_kernel(bf16 *qkv, int ldq, int voff, const float *sc, int lds, const float *alpha, int H,
                                 int D, int pos0, const int *pos_dev, const int *pos_rows, int pos_stride, int pos_bf16,
                                 int vec) {
    extern __shared__ float fac[]; /* [2H]: q factors, then v factors */
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    const int p = pos_rows ? pos_rows[(long)t * pos_stride] : (pos_dev ? *pos_dev : pos0) + t;
    const float lp = tau_log_pos(p, pos_bf16);
    const float *s = sc + (long)t * lds;
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
        const float sig = 1.0f / (1.0f + expf(-(alpha[h] * lp)));
        const float tp = 1.0f + (sig - 0.5f);
        fac[h] = tanhf(s[h]) + tp;
        fac[H + h] = tanhf(s[H + h]) + tp;
    }
    __syncthreads();
    bf16 *q = qkv + (long)t * ldq;
    const int n = H * D;
    if (vec) {
        for (int i = threadIdx.x; i < 2 * (n / 8); i += blockDim.x) {
            const int part = i >= n / 8, e = (i - part * (n / 8)) * 8;
            uint4 *p = (uint4 *)(q + part * voff + e);
            uint4 u = *p;
            const float f = fac[part * H + e / D];
            __nv_bfloat162 *h2 = (__nv_bfloat162 *)&u;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 v = __bfloat1622float2(h2[j]);
                h2[j] = __floats2bfloat162_rn(v.x * f, v.y * f);
            }
            *p = u;
        }
    } else {
        for (int i = threadIdx.x; i < 2 * n; i += blockDim.x) {
            const int part = i >= n, e = i - part * n;
            bf16 *p = q + part * voff + e;
            *p = __float2bfloat16_rn(__bfloat162float(*p) * fac[part * H + e / D]);
        }
    }
}

albedo_status cuda_tau_scale(cuda_ctx *c, const cuda_tau *a) {
    CU_ARG(c, a->T >= 0 && a->H > 0 && a->H <= 4096 && a->D > 0 && a->lds >= 2 * a->H);
    CU_ARG(c, a->ldq >= a->voff + a->H * a->D && a->voff >= a->H * a->D);
    CU_ARG(c, !a->pos_rows || a->pos_stride >= 1);
    if (!a->T) return ALBEDO_OK;
    const int vec = a->D % 8 == 0 && a->ldq % 8 == 0 && a->voff % 8 == 0 && is_aligned(a->qkv, 16);
    CU_TRY(c, launch_k(c, tau_scale_kernel, dim3(a->T), dim3(256), (size_t)2 * a->H * sizeof(float), (bf16 *)a->qkv,
                       a->ldq, a->voff, a->scores, a->lds, a->alpha, a->H, a->D, a->pos0, a->pos_dev, a->pos_rows,
                       a->pos_stride, a->pos_bf16, vec));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* ---- routing --------------------------------------------------------------------------- */

#define ROUTE_WARPS 8

__global__ void __launch_bounds__(ROUTE_WARPS * 32)
    moe_route_kernel(int32_t *sel, float *wt, const float *lg, long ldl, int T, int E, int K) {
    pdl_trigger();
    pdl_wait();
    __shared__ int ch[ROUTE_WARPS][CUDA_MOE_MAX_K];
    __shared__ float cv[ROUTE_WARPS][CUDA_MOE_MAX_K];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= T) return;
    const float *l = lg + (long)t * ldl;
    for (int k = 0; k < K; k++) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
        for (int e = lane; e < E; e += 32) {
            int taken = 0;
            for (int j = 0; j < k; j++) taken |= ch[warp][j] == e;
            if (taken) continue;
            float v = l[e];
            if (v != v) v = -INFINITY;
            if (v > bv || (v == bv && e < bi)) bv = v, bi = e;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
        }
        /* Every lane's reads of ch (the scan above) before lane 0's write:
         * the shuffles converge the warp but do not order shared memory. */
        __syncwarp();
        if (lane == 0) ch[warp][k] = bi, cv[warp][k] = l[bi];
        __syncwarp();
    }
    if (lane == 0) {
        /* text.c's order: exp(l_k - l_0) in rank order, then the sum's quotient */
        const float mx = cv[warp][0];
        float w[CUDA_MOE_MAX_K], sum = 0.0f;
        for (int k = 0; k < K; k++) sum += w[k] = expf(cv[warp][k] - mx);
        for (int k = 0; k < K; k++) {
            sel[(long)t * K + k] = ch[warp][k];
            wt[(long)t * K + k] = w[k] / sum;
        }
    }
}

/* The same for E <= 256: each lane keeps its logits e = lane + 32·i in
 * registers (NaN as -inf) with a mask of those taken, so a round reads no
 * memory: the lane's best untaken, then a warp arg-max. */
__global__ void __launch_bounds__(ROUTE_WARPS * 32)
    moe_route_reg_kernel(int32_t *sel, float *wt, const float *lg, long ldl, int T, int E, int K) {
    pdl_trigger();
    pdl_wait();
    const int lane = threadIdx.x & 31, t = blockIdx.x * ROUTE_WARPS + (threadIdx.x >> 5);
    if (t >= T) return;
    const float *l = lg + (long)t * ldl;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int e = lane + 32 * i;
        v[i] = e < E ? l[e] : -INFINITY;
        if (v[i] != v[i]) v[i] = -INFINITY;
    }
    unsigned taken = 0;
    for (int i = 0; i < 8; i++)
        if (lane + 32 * i >= E) taken |= 1u << i;
    float mx = 0.0f, sum = 0.0f, mine = 0.0f;
    int my_e = 0;
    for (int k = 0; k < K; k++) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < 8; i++) /* ascending e: the first of equal values wins */
            if (!(taken >> i & 1u) && (v[i] > bv || bi == 0x7fffffff)) bv = v[i], bi = lane + 32 * i;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
        }
        if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        /* text.c's order: exp(l_k - l_0) in rank order, summed in rank order */
        const float lk = l[bi];
        if (k == 0) mx = lk;
        const float w = expf(lk - mx);
        sum += w;
        if (lane == k) mine = w, my_e = bi;
    }
    if (lane < K) {
        sel[(long)t * K + lane] = my_e;
        wt[(long)t * K + lane] = mine / sum;
    }
}

albedo_status cuda_moe_route(cuda_ctx *c, int32_t *sel, float *wt, const float *logits, long ldl, int T, int E, int K) {
    CU_ARG(c, T >= 0 && K >= 1 && K <= CUDA_MOE_MAX_K && E >= K && ldl >= E);
    if (!T) return ALBEDO_OK;
    if (E <= 256)
        CU_TRY(c, launch_k(c, moe_route_reg_kernel, dim3((T + ROUTE_WARPS - 1) / ROUTE_WARPS), dim3(ROUTE_WARPS * 32),
                           0, sel, wt, logits, ldl, T, E, K));
    else
        CU_TRY(c, launch_k(c, moe_route_kernel, dim3((T + ROUTE_WARPS - 1) / ROUTE_WARPS), dim3(ROUTE_WARPS * 32), 0,
                           sel, wt, logits, ldl, T, E, K));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* ---- decode: GEMVs over the selected experts ------------------------------------------------ */

__device__ __forceinline__ float dot8(const uint4 a, const uint4 b) {
    float fa[8], fb[8];
    bf16x8_to_f(a, fa);
    bf16x8_to_f(b, fb);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) s = fmaf(fa[i], fb[i], s);
    return s;
}

#define MOE_GEMV_WARPS 8

/* Block (x: 8 columns j, y: assignment a = t·K + k): act[a][j] =
 * gelu_erf(h[t]·W1[e][j]) · (h[t]·W1[e][I + j] + 1), e = sel[a]. */
__global__ void __launch_bounds__(MOE_GEMV_WARPS * 32)
    moe_up_gemv_kernel(bf16 *act, int ldact, const bf16 *h, int ldh, const int32_t *sel, const bf16 *w1, long w_exp,
                       int ldw, int Kd, int I, int K) {
    pdl_trigger();
    pdl_wait(); /* sel comes from the kernel before */
    const int lane = threadIdx.x & 31, a = blockIdx.y, j = blockIdx.x * MOE_GEMV_WARPS + (threadIdx.x >> 5);
    if (j >= I) return;
    const int t = a / K, e = sel[a];
    const bf16 *wa = w1 + (long)e * w_exp + (long)j * ldw, *wg = wa + (long)I * ldw, *x = h + (long)t * ldh;
    float sa = 0.0f, sg = 0.0f;
    int c = lane * 8;
    for (; c + 3 * 256 < Kd; c += 4 * 256) {
        uint4 va[4], vg[4], vx[4];
#pragma unroll
        for (int u = 0; u < 4; u++) va[u] = moe_ld_stream(wa + c + u * 256), vg[u] = moe_ld_stream(wg + c + u * 256);
#pragma unroll
        for (int u = 0; u < 4; u++) vx[u] = __ldg((const uint4 *)(x + c + u * 256));
#pragma unroll
        for (int u = 0; u < 4; u++) sa += dot8(va[u], vx[u]), sg += dot8(vg[u], vx[u]);
    }
    for (; c < Kd; c += 256) {
        const uint4 vx = __ldg((const uint4 *)(x + c));
        sa += dot8(moe_ld_stream(wa + c), vx);
        sg += dot8(moe_ld_stream(wg + c), vx);
    }
    sa = warp_sum(sa);
    sg = warp_sum(sg);
    if (lane == 0) act[(long)a * ldact + j] = __float2bfloat16_rn(gelu_erf_f(sa) * (sg + 1.0f));
}

/* Block (x: output n, y: token t), K warps: warp k computes
 * act[t·K+k]·W2[e_k][n] (16-byte pieces, up to 4 loads in flight per lane),
 * and warp 0 sums w_k times those in rank order into x[t][n]. */
__global__ void __launch_bounds__(CUDA_MOE_MAX_K * 32)
    moe_down_gemv_kernel(float *xo, int ldx, const bf16 *act, int ldact, const int32_t *sel, const float *wt,
                         const bf16 *w2, long w_exp, int ldw, int N, int I, int K, int store) {
    __shared__ float part[CUDA_MOE_MAX_K];
    pdl_trigger();
    pdl_wait();
    const int lane = threadIdx.x & 31, k = threadIdx.x >> 5, n = blockIdx.x, t = blockIdx.y, a = t * K + k;
    const bf16 *w = w2 + (long)sel[a] * w_exp + (long)n * ldw, *x = act + (long)a * ldact;
    const int ch = I / 8;
    float s = 0.0f;
    int q = lane;
    for (; q + 3 * 32 < ch; q += 4 * 32) {
        uint4 wv[4], xv[4];
#pragma unroll
        for (int u = 0; u < 4; u++) wv[u] = moe_ld_stream(w + (q + 32 * u) * 8);
#pragma unroll
        for (int u = 0; u < 4; u++) xv[u] = __ldg((const uint4 *)(x + (q + 32 * u) * 8));
#pragma unroll
        for (int u = 0; u < 4; u++) s += dot8(wv[u], xv[u]);
    }
    for (; q < ch; q += 32) s += dot8(moe_ld_stream(w + q * 8), __ldg((const uint4 *)(x + q * 8)));
    s = warp_sum(s);
    if (lane == 0) part[k] = wt[a] * s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float acc = 0.0f;
        for (int j = 0; j < K; j++) acc += part[j];
        float *o = xo + (long)t * ldx + n;
        *o = store ? acc : *o + acc;
    }
}

/* ---- decode with FP8 experts: the same GEMVs over e4m3 rows ---------------------------------- */

/* 8 e4m3 weights · 8 bf16 inputs. */
__device__ __forceinline__ float dot8_f8(const uint2 w, const uint4 x) {
    float fw[8], fx[8];
    fp8x8_to_f(w, fw);
    bf16x8_to_f(x, fx);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i++) s = fmaf(fw[i], fx[i], s);
    return s;
}

#define MOE_F8_UP_J 2   /* fc1 columns j per warp (4 weight rows: both halves) */
#define MOE_F8_DOWN_N 4 /* fc2 outputs n per block */

/* moe_up_gemv_kernel over q1 [E, 2I, ldq] e4m3 with row scales s1 [E, 2I]:
 * a warp computes MOE_F8_UP_J columns j (rows j and I + j of each), so each
 * 16-byte piece of h feeds 4 rows of 8 weights (8-byte loads); 4 steps of
 * 256 columns in flight; the row scales multiply the finished dots. */
__global__ void __launch_bounds__(MOE_GEMV_WARPS * 32)
    moe_up_gemv_f8_kernel(bf16 *act, int ldact, const bf16 *h, int ldh, const int32_t *sel, const uint8_t *q1,
                          const float *s1, int ldq, int Kd, int I, int K) {
    pdl_trigger();
    pdl_wait();
    const int lane = threadIdx.x & 31, a = blockIdx.y;
    const int j0 = (blockIdx.x * MOE_GEMV_WARPS + (threadIdx.x >> 5)) * MOE_F8_UP_J;
    if (j0 >= I) return;
    const int t = a / K, e = sel[a];
    const uint8_t *w[2 * MOE_F8_UP_J]; /* a rows, then g rows (clamped past I: computed, not written) */
#pragma unroll
    for (int i = 0; i < MOE_F8_UP_J; i++) {
        const long r = (long)e * 2 * I + min(j0 + i, I - 1);
        w[i] = q1 + r * ldq;
        w[MOE_F8_UP_J + i] = q1 + (r + I) * ldq;
    }
    const bf16 *x = h + (long)t * ldh;
    float acc[2 * MOE_F8_UP_J];
#pragma unroll
    for (int i = 0; i < 2 * MOE_F8_UP_J; i++) acc[i] = 0.0f;
    int c = lane * 8;
    for (; c + 3 * 256 < Kd; c += 4 * 256) {
        uint2 v[4][2 * MOE_F8_UP_J];
        uint4 vx[4];
#pragma unroll
        for (int u = 0; u < 4; u++)
#pragma unroll
            for (int i = 0; i < 2 * MOE_F8_UP_J; i++) v[u][i] = moe_ld_stream8(w[i] + c + u * 256);
#pragma unroll
        for (int u = 0; u < 4; u++) vx[u] = __ldg((const uint4 *)(x + c + u * 256));
#pragma unroll
        for (int u = 0; u < 4; u++)
#pragma unroll
            for (int i = 0; i < 2 * MOE_F8_UP_J; i++) acc[i] += dot8_f8(v[u][i], vx[u]);
    }
    for (; c < Kd; c += 256) {
        const uint4 vx = __ldg((const uint4 *)(x + c));
#pragma unroll
        for (int i = 0; i < 2 * MOE_F8_UP_J; i++) acc[i] += dot8_f8(moe_ld_stream8(w[i] + c), vx);
    }
#pragma unroll
    for (int i = 0; i < 2 * MOE_F8_UP_J; i++) acc[i] = warp_sum(acc[i]);
    if (lane < MOE_F8_UP_J && j0 + lane < I) {
        float sa = acc[0], sg = acc[MOE_F8_UP_J];
#pragma unroll
        for (int i = 1; i < MOE_F8_UP_J; i++)
            if (lane == i) sa = acc[i], sg = acc[MOE_F8_UP_J + i];
        const long r = (long)e * 2 * I + j0 + lane;
        act[(long)a * ldact + j0 + lane] = __float2bfloat16_rn(gelu_erf_f(sa * s1[r]) * (sg * s1[r + I] + 1.0f));
    }
}

/* moe_down_gemv_kernel over q2 [E, N, ldq] e4m3 with row scales s2 [E, N]:
 * block (x: MOE_F8_DOWN_N outputs n0.., y: token t), K warps; warp k reads
 * each 16-byte piece of act[t·K+k] once for the block's rows of expert
 * e_k, and thread r < MOE_F8_DOWN_N sums w_k times those in rank order
 * into x[t][n0 + r]. */
__global__ void moe_down_gemv_f8_kernel(float *xo, int ldx, const bf16 *act, int ldact, const int32_t *sel,
                                        const float *wt, const uint8_t *q2, const float *s2, int ldq, int N, int I,
                                        int K, int store) {
    __shared__ float part[CUDA_MOE_MAX_K][MOE_F8_DOWN_N];
    pdl_trigger();
    pdl_wait();
    const int lane = threadIdx.x & 31, k = threadIdx.x >> 5, n0 = blockIdx.x * MOE_F8_DOWN_N, t = blockIdx.y;
    const int a = t * K + k;
    const long r0 = (long)sel[a] * N;
    const uint8_t *w[MOE_F8_DOWN_N];
#pragma unroll
    for (int i = 0; i < MOE_F8_DOWN_N; i++) w[i] = q2 + (r0 + min(n0 + i, N - 1)) * ldq;
    const bf16 *x = act + (long)a * ldact;
    const int ch = I / 8;
    float acc[MOE_F8_DOWN_N];
#pragma unroll
    for (int i = 0; i < MOE_F8_DOWN_N; i++) acc[i] = 0.0f;
    int q = lane;
    for (; q + 3 * 32 < ch; q += 4 * 32) {
        uint2 wv[4][MOE_F8_DOWN_N];
        uint4 xv[4];
#pragma unroll
        for (int u = 0; u < 4; u++)
#pragma unroll
            for (int i = 0; i < MOE_F8_DOWN_N; i++) wv[u][i] = moe_ld_stream8(w[i] + (q + 32 * u) * 8);
#pragma unroll
        for (int u = 0; u < 4; u++) xv[u] = __ldg((const uint4 *)(x + (q + 32 * u) * 8));
#pragma unroll
        for (int u = 0; u < 4; u++)
#pragma unroll
            for (int i = 0; i < MOE_F8_DOWN_N; i++) acc[i] += dot8_f8(wv[u][i], xv[u]);
    }
    for (; q < ch; q += 32) {
        const uint4 xv = __ldg((const uint4 *)(x + q * 8));
#pragma unroll
        for (int i = 0; i < MOE_F8_DOWN_N; i++) acc[i] += dot8_f8(moe_ld_stream8(w[i] + q * 8), xv);
    }
#pragma unroll
    for (int i = 0; i < MOE_F8_DOWN_N; i++) {
        const float v = warp_sum(acc[i]);
        if (lane == 0) part[k][i] = wt[a] * (v * s2[r0 + min(n0 + i, N - 1)]);
    }
    __syncthreads();
    if (threadIdx.x < MOE_F8_DOWN_N && n0 + (int)threadIdx.x < N) {
        float sum = 0.0f;
        for (int j = 0; j < K; j++) sum += part[j][threadIdx.x];
        float *o = xo + (long)t * ldx + n0 + threadIdx.x;
        *o = store ? sum : *o + sum;
    }
}

/* ---- FP8 experts: per-row e4m3 quantisation (at upload) ------------------------------------- */

/* Block per row (grid-stride): the row's max |w|, then q = e4m3(w · inv). */
__global__ void quant_e4m3_rows_kernel(uint8_t *q, int ldq, float *scale, const bf16 *w, int ldw, long rows, int cols) {
    __shared__ float red[32];
    for (long r = blockIdx.x; r < rows; r += gridDim.x) {
        const bf16 *wr = w + r * ldw;
        float m = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, fabsf(__bfloat162float(wr[c])));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
        __syncthreads();
        m = 0.0f;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) m = fmaxf(m, red[i]);
        __syncthreads(); /* red is rewritten by the next row */
        const float inv = m > 0.0f ? __fdiv_rn(448.0f, m) : 1.0f;
        if (threadIdx.x == 0) scale[r] = m > 0.0f ? __fdiv_rn(m, 448.0f) : 1.0f;
        uint8_t *qr = q + r * ldq;
        for (int c = threadIdx.x; c < ldq; c += blockDim.x)
            qr[c] = c < cols ? (uint8_t)__nv_cvt_float_to_fp8(__fmul_rn(__bfloat162float(wr[c]), inv), __NV_SATFINITE,
                                                              __NV_E4M3)
                             : (uint8_t)0;
    }
}

albedo_status cuda_quant_e4m3_rows(cuda_ctx *c, uint8_t *q, int ldq, float *scale, const uint16_t *w, int ldw,
                                   long rows, int cols) {
    CU_ARG(c, rows >= 0 && cols >= 0 && ldq >= cols && ldw >= cols);
    if (!rows) return ALBEDO_OK;
    const int blocks = (int)(rows < 8192 ? rows : 8192);
    quant_e4m3_rows_kernel<<<blocks, 256, 0, c->stream>>>(q, ldq, scale, (const bf16 *)w, ldw, rows, cols);
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* ---- prefill: grouping by expert ------------------------------------------------------------ */

#define MOE_MB_MIN 64       /* the smallest tile (sizes the tile list) */
#define MOE_NB 64           /* output columns of a tile */
#define MOE_CP (MOE_NB + 4) /* float epilogue row */

/* One block. Counts, offsets off[E + 1], tiles (expert, first place) of up
 * to mb rows, and each assignment's place: rows[place] = its token,
 * slot[a] = place. Places within an expert follow the assignments' order
 * (one warp walks them 32 at a time; lanes of the same expert take
 * consecutive places in lane order, __match_any_sync), so that every run
 * puts the same rows in the same tiles. Places taken in the order of
 * atomics made the e4m3 grouped GEMM on mma.sync differ in the last bits
 * from run to run (docs/CUDA.md, Open items (Moondream 3), item 5). */
__global__ void moe_sort_kernel(const int32_t *sel, int TK, int K, int E, int mb, int *off, int2 *tiles, int *n_tiles,
                                int32_t *rows, int32_t *slot) {
    pdl_trigger();
    pdl_wait();
    extern __shared__ int sh[]; /* cnt[E], cur[E] */
    int *cnt = sh, *cur = sh + E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < TK; i += blockDim.x) atomicAdd(&cnt[sel[i]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int o = 0, nt = 0;
        for (int e = 0; e < E; e++) {
            off[e] = o;
            cur[e] = o;
            for (int r = 0; r < cnt[e]; r += mb) tiles[nt++] = make_int2(e, o + r);
            o += cnt[e];
        }
        off[E] = o;
        *n_tiles = nt;
    }
    __syncthreads();
    if (threadIdx.x >= 32) return;
    const int lane = threadIdx.x;
    const unsigned below = (1u << lane) - 1;
    for (int b = 0; b < TK; b += 32) {
        const int i = b + lane;
        const unsigned on = __ballot_sync(0xffffffffu, i < TK);
        if (i < TK) {
            const int e = sel[i];
            const unsigned same = __match_any_sync(on, e);
            const int p = cur[e] + __popc(same & below);
            rows[p] = i / K;
            slot[i] = p;
            __syncwarp(on);
            if ((same & below) == 0) cur[e] += __popc(same); /* the lowest lane of the group */
        }
        __syncwarp();
    }
}

__device__ __forceinline__ void cp16(void *smem, const void *g, int valid) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(g), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

/* Shared memory of moe_gemm_kernel<UP, MB, BK, ST, F8>: ST stages of the A
 * tile (bf16) and the W tile (bf16, or e4m3 bytes with F8, then one bf16
 * W tile they are widened into), reused for the float32 tile(s) of the
 * epilogue. */
static constexpr int moe_gemm_pipe(int up, int mb, int bk, int st, int f8) {
    return st * (mb * (bk + 8) * 2 + (up ? 2 : 1) * MOE_NB * (f8 ? bk + 16 : (bk + 8) * 2)) +
           (f8 ? (up ? 2 : 1) * MOE_NB * (bk + 8) * 2 : 0);
}
static constexpr int moe_gemm_smem(int up, int mb, int bk, int st, int f8) {
    return moe_gemm_pipe(up, mb, bk, st, f8) > (up ? 2 : 1) * mb * MOE_CP * 4 ? moe_gemm_pipe(up, mb, bk, st, f8)
                                                                              : (up ? 2 : 1) * mb * MOE_CP * 4;
}

/* Grouped GEMM over the tiles of moe_sort_kernel. Block (x: tile, y: 64
 * output columns n0..): the tile's rows p (up to MB places of expert e)
 * times W[e]ᵀ. UP: A row p is h[rows[p]]; the block computes columns n of
 * both halves (W rows n and I + n) and writes act[p][n] = gelu_erf(a)·(g + 1)
 * as bf16. Down: A row p is act[p]; writes y[p][n] (float32). K % 8 == 0 (A
 * and W rows are read in 16-byte pieces, zero-filled past K or the tile).
 * MB/32 × 2 warps, each 32 rows × 32 columns (of both halves for UP);
 * K steps of BK through an ST-stage cp.async pipeline; bf16 tensor cores
 * through WMMA (16×16×16), float32 accumulators.
 * F8: W is e4m3 bytes (rows of ldw bytes, a multiple of 16; 16-byte pieces
 * of 16 weights) with row scales sc [E, sc_exp]; each K step widens its W
 * stage into one bf16 tile (exact) before the products, and the epilogue
 * multiplies column n's sums by its row's scale. */
template <int UP, int MB, int BK, int ST, int F8>
__global__ void __launch_bounds__(MB * 2)
    moe_gemm_kernel(const int2 *tiles, const int *n_tiles, const int *off, const int32_t *rows, const bf16 *A, int lda,
                    const void *W, long w_exp, int ldw, const float *sc, long sc_exp, int N, int Kd, int I, bf16 *act,
                    int ldact, float *y, int ldy) {
    using namespace nvcuda;
    constexpr int NT = MB * 2;                   /* threads */
    constexpr int KP = BK + 8;                   /* smem row (elements), 16-byte multiple */
    constexpr int PC = BK / 8;                   /* 16-byte pieces per row per stage */
    constexpr int WR = UP ? 2 * MOE_NB : MOE_NB; /* W rows per stage */
    constexpr int KB = BK + 16;                  /* F8: smem W row (bytes) */
    constexpr int A_BYTES = MB * KP * 2, W_BYTES = F8 ? WR * KB : WR * KP * 2, STAGE = A_BYTES + W_BYTES;
    extern __shared__ __align__(128) unsigned char smem[];
    pdl_trigger();
    pdl_wait();
    if ((int)blockIdx.x >= *n_tiles) return;
    const int2 tl = tiles[blockIdx.x];
    const int e = tl.x, r0 = tl.y, r1 = min(r0 + MB, off[e + 1]), n0 = blockIdx.y * MOE_NB;
    const int tid = threadIdx.x, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
    bf16 *wide = (bf16 *)(smem + ST * STAGE); /* F8: the widened W tile [WR][KP] */

    auto load = [&](int stage, int k0) {
        bf16 *sa = (bf16 *)(smem + stage * STAGE);
        unsigned char *sb = smem + stage * STAGE + A_BYTES;
#pragma unroll
        for (int i = 0; i < MB * PC / NT; i++) {
            const int idx = tid + i * NT, r = idx / PC, kc = (idx % PC) * 8, p = r0 + r, k = k0 + kc;
            const int ok = p < r1 && k < Kd;
            const bf16 *src = A;
            if (ok) src = A + (long)(UP ? rows[p] : p) * lda + k;
            cp16(sa + r * KP + kc, src, ok);
        }
        constexpr int WPC = F8 ? BK / 16 : PC, WE = F8 ? 16 : 8; /* pieces per row, elements per piece */
        constexpr int WN = WR * WPC;
#pragma unroll
        for (int i = 0; i < (WN + NT - 1) / NT; i++) {
            const int idx = tid + i * NT;
            if (WN % NT != 0 && idx >= WN) break;
            const int r = idx / WPC, kc = (idx % WPC) * WE, k = k0 + kc;
            const int n = n0 + (r < MOE_NB ? r : r - MOE_NB), wrow = r < MOE_NB ? n : I + n;
            const int ok = n < N && k < Kd;
            if constexpr (F8) {
                const uint8_t *We = (const uint8_t *)W + e * w_exp;
                cp16(sb + r * KB + kc, ok ? We + (long)wrow * ldw + k : (const uint8_t *)W, ok);
            } else {
                const bf16 *We = (const bf16 *)W + e * w_exp;
                cp16((bf16 *)sb + r * KP + kc, ok ? We + (long)wrow * ldw + k : (const bf16 *)W, ok);
            }
        }
    };

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> ca[2][2], cg[UP ? 2 : 1][UP ? 2 : 1];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::fill_fragment(ca[i][j], 0.0f);
#pragma unroll
    for (int i = 0; i < (UP ? 2 : 1); i++)
#pragma unroll
        for (int j = 0; j < (UP ? 2 : 1); j++) wmma::fill_fragment(cg[i][j], 0.0f);
    const int nk = (Kd + BK - 1) / BK;
#pragma unroll
    for (int s0 = 0; s0 < ST - 1; s0++) {
        if (s0 < nk) load(s0, s0 * BK);
        cp_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        cp_wait<ST - 2>(); /* stage kt has landed (this thread's pieces) */
        __syncthreads();   /* ... everyone's; and stage kt - 1 (and the widened tile) is free again */
        if (kt + ST - 1 < nk) load((kt + ST - 1) % ST, (kt + ST - 1) * BK);
        cp_commit();
        const bf16 *sa = (const bf16 *)(smem + (kt % ST) * STAGE), *sb;
        if constexpr (F8) {
            const unsigned char *s8 = smem + (kt % ST) * STAGE + A_BYTES;
#pragma unroll
            for (int i = 0; i < WR * (BK / 8) / NT; i++) {
                const int idx = tid + i * NT, r = idx / (BK / 8), c8 = (idx % (BK / 8)) * 8;
                *(uint4 *)(wide + r * KP + c8) = fp8x8_to_bf16x8(*(const uint2 *)(s8 + r * KB + c8));
            }
            __syncthreads();
            sb = wide;
        } else {
            sb = (const bf16 *)(smem + (kt % ST) * STAGE + A_BYTES);
        }
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
#pragma unroll
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], sa + (wm * 32 + i * 16) * KP + kk, KP);
#pragma unroll
            for (int j = 0; j < 2; j++) {
                wmma::load_matrix_sync(fb, sb + (wn * 32 + j * 16) * KP + kk, KP);
#pragma unroll
                for (int i = 0; i < 2; i++) wmma::mma_sync(ca[i][j], fa[i], fb, ca[i][j]);
                if (UP) {
                    wmma::load_matrix_sync(fb, sb + (MOE_NB + wn * 32 + j * 16) * KP + kk, KP);
#pragma unroll
                    for (int i = 0; i < 2; i++)
                        wmma::mma_sync(cg[UP ? i : 0][UP ? j : 0], fa[i], fb, cg[UP ? i : 0][UP ? j : 0]);
                }
            }
        }
    }
    cp_wait<0>();
    __syncthreads(); /* the stages become the epilogue's tile */
    float *cs = (float *)smem, *gs = cs + MB * MOE_CP;
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const int off_c = (wm * 32 + i * 16) * MOE_CP + wn * 32 + j * 16;
            wmma::store_matrix_sync(cs + off_c, ca[i][j], MOE_CP, wmma::mem_row_major);
            if (UP) wmma::store_matrix_sync(gs + off_c, cg[UP ? i : 0][UP ? j : 0], MOE_CP, wmma::mem_row_major);
        }
    __syncthreads();
    const float *se = F8 ? sc + e * sc_exp : NULL;
    for (int idx = tid; idx < MB * MOE_NB; idx += NT) {
        const int r = idx / MOE_NB, cc = idx % MOE_NB, p = r0 + r, n = n0 + cc;
        if (p >= r1 || n >= N) continue;
        float v = cs[r * MOE_CP + cc];
        if (F8) v *= se[n];
        if (UP) {
            float g = gs[r * MOE_CP + cc];
            if (F8) g *= se[I + n];
            act[(long)p * ldact + n] = __float2bfloat16_rn(gelu_erf_f(v) * (g + 1.0f));
        } else {
            y[(long)p * ldy + n] = v;
        }
    }
}

/* ---- prefill: the grouped GEMM on mma.sync ------------------------------------------------- */

/* ldmatrix / mma.sync helpers (attention.cu keeps its own copies). */
__device__ __forceinline__ void moe_ldsm_x4(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((unsigned)__cvta_generic_to_shared(p)));
}

/* c += a·b: a 16×16 bf16 (row), b 16×8 bf16 (col), c 16×8 f32. Lane (g =
 * lane/4, t = lane%4) holds c: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1). */
__device__ __forceinline__ void moe_mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#define MOE_MMA_WR 128 /* W rows of a block: 64 columns of both fc1 halves, or 128 of fc2 */

/* Shared memory of moe_mma_kernel<MB, BK, ST, F8>: ST stages of the A tile
 * [MB][BK + 8] bf16 and the W tile [128][BK + 8] bf16 (F8: [128][BK + 16]
 * e4m3 bytes, then one bf16 tile they are widened into), and MB source
 * rows of A. */
static constexpr int moe_mma_smem(int mb, int bk, int st, int f8) {
    return st * (mb * (bk + 8) * 2 + MOE_MMA_WR * (f8 ? bk + 16 : (bk + 8) * 2)) +
           (f8 ? MOE_MMA_WR * (bk + 8) * 2 : 0) + mb * 4;
}

/* The grouped GEMM of moe_gemm_kernel on mma.sync.m16n8k16 with ldmatrix
 * fragments. Block (x: tile, y: output columns): the tile's rows (up to MB
 * places of expert e) times 128 rows of W[e]ᵀ: UP, columns n0..n0+63 of
 * both halves (W rows n and I + n), act[p][n] = gelu_erf(a)·(g + 1) as bf16
 * straight from the accumulators (the a and g sums of a column sit in the
 * same lane); down, columns n0..n0+127, y[p][n] float32. WM × 2 warps
 * (WM = 2: 255 registers, 2 blocks an SM, fragments double-buffered; WM =
 * 4: at most 128 registers, 16 warps an SM, which hides mma.sync's latency
 * better: ncu showed the 4-warp form at 2 warps a scheduler, the tensor pipe
 * 36 % busy, stalled on fixed-latency dependencies): warp (wm, wn) owns the
 * 16-row slabs wm, wm + WM, ... of the tile (the slabs interleaved, so that
 * a part-filled tile splits its rows evenly between the warps of a column
 * half) and 64 W rows (UP: 32 of each half): 8 n8 tiles per slab, fp32
 * accumulators in registers. Slabs past the tile's last row issue no
 * ldmatrix and no mma. K steps of BK through
 * an ST-stage cp.async pipeline, rows padded by 16 bytes (the 8 rows of an
 * ldmatrix land in distinct banks). K % 8 == 0 as for moe_gemm_kernel.
 * F8: e4m3 W stages widened into one bf16 tile each K step (exact), the row
 * scales applied in the epilogue. */
template <int UP, int MB, int BK, int ST, int F8, int WM>
__global__ void __launch_bounds__(WM * 64, WM == 4 ? 2 : 1)
    moe_mma_kernel(const int2 *tiles, const int *n_tiles, const int *off, const int32_t *rows, const bf16 *A, int lda,
                   const void *W, long w_exp, int ldw, const float *sc, long sc_exp, int N, int Kd, int I, bf16 *act,
                   int ldact, float *y, int ldy) {
    constexpr int NT = WM * 64, KP = BK + 8, PC = BK / 8, KB = BK + 16, WR = MOE_MMA_WR;
    constexpr int A_BYTES = MB * KP * 2, W_BYTES = F8 ? WR * KB : WR * KP * 2, STAGE = A_BYTES + W_BYTES;
    constexpr int MS = MB / (16 * WM); /* 16-row slabs per warp */
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *wide = (bf16 *)(smem + ST * STAGE);                        /* F8: [WR][KP] */
    int *arow = (int *)(smem + ST * STAGE + (F8 ? WR * KP * 2 : 0)); /* [MB]: A's source row, -1 past the tile */
    pdl_trigger();
    pdl_wait();
    if ((int)blockIdx.x >= *n_tiles) return;
    const int2 tl = tiles[blockIdx.x];
    const int e = tl.x, r0 = tl.y, nr = min(MB, off[e + 1] - r0);
    const int n0 = blockIdx.y * (UP ? WR / 2 : WR);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp % WM, wn = warp / WM;
    const int mr = (nr + 15) & ~15; /* rows loaded: whole slabs */
    for (int r = tid; r < MB; r += NT) arow[r] = r < nr ? (UP ? rows[r0 + r] : r0 + r) : -1;
    __syncthreads();

    /* Each thread copies the same pieces every K step: A rows ar + i·(NT/PC)
     * at column kc, W rows wr0 + i·(NT/WPC) at column wc. Their sources and
     * validity are fixed here; a step adds k0. (With 8 warps, 128 registers
     * a thread: A's sources are read from arow at each step instead, and the
     * fragments are single-buffered; 16 warps an SM hide the latency.) */
    constexpr int NB = WM == 2 ? 2 : 1;                      /* fragment buffers */
    constexpr int WPC = F8 ? BK / 16 : PC, WE = F8 ? 16 : 8; /* W pieces per row, elements per piece */
    constexpr int AI = MB * PC / NT, WI = WR * WPC / NT;     /* pieces per thread */
    constexpr int ARS = NT / PC, WRS = NT / WPC;             /* row step between a thread's pieces */
    const int ar = tid / PC, kc = (tid % PC) * 8, wr0 = tid / WPC, wc = (tid % WPC) * WE;
    const bf16 *asrc[NB == 2 ? AI : 1];
    unsigned aok = 0, wok = 0;
    if constexpr (NB == 2) {
#pragma unroll
        for (int i = 0; i < AI; i++) {
            const int r = ar + i * ARS, src = r < mr ? arow[r] : -1;
            asrc[i] = A + (src >= 0 ? (long)src * lda + kc : 0);
            if (src >= 0) aok |= 1u << i;
        }
    }
    const unsigned char *wsrc = (const unsigned char *)W + (F8 ? e * w_exp : e * w_exp * 2);
    int woff[WI]; /* bytes within the expert (cuda_moe_mlp checks they fit an int) */
#pragma unroll
    for (int i = 0; i < WI; i++) {
        const int r = wr0 + i * WRS, n = n0 + (UP && r >= WR / 2 ? r - WR / 2 : r);
        const int wrow = UP && r >= WR / 2 ? I + n : n;
        woff[i] = n < N ? (wrow * ldw + wc) * (F8 ? 1 : 2) : 0;
        if (n < N) wok |= 1u << i;
    }

    auto load = [&](int stage, int k0) {
        bf16 *sa = (bf16 *)(smem + stage * STAGE);
        unsigned char *sb = smem + stage * STAGE + A_BYTES;
        const int ka = k0 + kc < Kd, kw = k0 + wc < Kd;
#pragma unroll
        for (int i = 0; i < AI; i++) {
            if (ar + i * ARS >= mr) break; /* rows grow with i: the rest are past the slabs too */
            if constexpr (NB == 2) {
                const int ok = (aok >> i & 1u) && ka;
                cp16(sa + (ar + i * ARS) * KP + kc, ok ? asrc[i] + k0 : A, ok);
            } else {
                const int src = arow[ar + i * ARS], ok = src >= 0 && ka;
                cp16(sa + (ar + i * ARS) * KP + kc, ok ? A + (long)src * lda + kc + k0 : A, ok);
            }
        }
#pragma unroll
        for (int i = 0; i < WI; i++) {
            const int ok = (wok >> i & 1u) && kw;
            const unsigned char *src = ok ? wsrc + woff[i] + (long)k0 * (F8 ? 1 : 2) : (const unsigned char *)W;
            if constexpr (F8)
                cp16(sb + (wr0 + i * WRS) * KB + wc, src, ok);
            else
                cp16((bf16 *)sb + (wr0 + i * WRS) * KP + wc, src, ok);
        }
    };

    float acc[MS][8][4];
#pragma unroll
    for (int i = 0; i < MS; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;
    /* the warp's W rows: n8 tiles j and j + 1 from one ldmatrix.x4 (j even) */
    const int wbase = UP ? wn * 32 : wn * 64;
    /* ldmatrix lane addressing: A, rows lane % 16 at k + 8·(lane / 16);
     * W, rows (lane % 8) + 8·(lane / 16) at k + 8·((lane / 8) % 2) */
    const int a_r = lane & 15, a_k = (lane >> 4) * 8;
    const int b_r = (lane & 7) + ((lane >> 4) << 3), b_k = ((lane >> 3) & 1) * 8;
    const int nk = (Kd + BK - 1) / BK;
#pragma unroll
    for (int s0 = 0; s0 < ST - 1; s0++) {
        if (s0 < nk) load(s0, s0 * BK);
        cp_commit();
    }
    /* fragments of one k16 step: every ldmatrix of the step is issued before
     * its first mma, and the next step's before this step's mmas */
    uint32_t fa[NB][MS][4], fb[NB][8][2];
    auto frags = [&](int buf, const bf16 *sa, const bf16 *sb, int kk) {
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
            /* UP: j < 4 the a half, j >= 4 the g half (W rows 64..) */
            const int wr = UP ? (j < 4 ? wbase + j * 8 : WR / 2 + wbase + (j - 4) * 8) : wbase + j * 8;
            uint32_t r[4];
            moe_ldsm_x4(r, sb + (wr + b_r) * KP + kk + b_k);
            fb[buf][j][0] = r[0], fb[buf][j][1] = r[1], fb[buf][j + 1][0] = r[2], fb[buf][j + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < MS; i++) {
            const int m0 = (wm + WM * i) * 16;
            if (m0 >= nr) break; /* slabs grow with i */
            moe_ldsm_x4(fa[buf][i], sa + (m0 + a_r) * KP + kk + a_k);
        }
    };
    for (int kt = 0; kt < nk; kt++) {
        cp_wait<ST - 2>(); /* stage kt has landed (this thread's pieces) */
        __syncthreads();   /* ... everyone's; and stage kt - 1 (and the widened tile) is free again */
        if (kt + ST - 1 < nk) load((kt + ST - 1) % ST, (kt + ST - 1) * BK);
        cp_commit();
        const bf16 *sa = (const bf16 *)(smem + (kt % ST) * STAGE), *sb;
        if constexpr (F8) {
            const unsigned char *s8 = smem + (kt % ST) * STAGE + A_BYTES;
#pragma unroll
            for (int i = 0; i < WR * (BK / 8) / NT; i++) {
                const int idx = tid + i * NT, r = idx / (BK / 8), c8 = (idx % (BK / 8)) * 8;
                *(uint4 *)(wide + r * KP + c8) = fp8x8_to_bf16x8(*(const uint2 *)(s8 + r * KB + c8));
            }
            __syncthreads();
            sb = wide;
        } else {
            sb = (const bf16 *)(smem + (kt % ST) * STAGE + A_BYTES);
        }
        if (NB == 2) frags(0, sa, sb, 0);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            const int cur = NB == 2 ? (kk / 16) & 1 : 0;
            if (NB == 1)
                frags(0, sa, sb, kk);
            else if (kk + 16 < BK)
                frags(cur ^ 1, sa, sb, kk + 16);
#pragma unroll
            for (int i = 0; i < MS; i++) {
                if ((wm + WM * i) * 16 >= nr) break;
#pragma unroll
                for (int j = 0; j < 8; j++) moe_mma16816(acc[i][j], fa[cur][i], fb[cur][j][0], fb[cur][j][1]);
            }
        }
    }
    cp_wait<0>();
    /* epilogue from the accumulators: lane (g, t) holds rows g, g + 8 of
     * the slab, columns 2t, 2t + 1 of each n8 tile */
    const float *se = F8 ? sc + e * sc_exp : NULL;
    const int g = lane >> 2, t2 = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < MS; i++) {
        const int m0 = (wm + WM * i) * 16;
        if (m0 >= nr) break;
#pragma unroll
        for (int j = 0; j < (UP ? 4 : 8); j++) {
            const int n = n0 + wbase + j * 8 + t2;
            if (n >= N) continue;
            const int two = n + 1 < N;
            float s0 = 1.0f, s1 = 1.0f, u0 = 1.0f, u1 = 1.0f;
            if (F8) {
                s0 = se[n], s1 = two ? se[n + 1] : 0.0f;
                if (UP) u0 = se[I + n], u1 = two ? se[I + n + 1] : 0.0f;
            }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = m0 + g + 8 * h;
                if (r >= nr) continue;
                const long p = r0 + r;
                const float v0 = acc[i][j][2 * h] * s0, v1 = acc[i][j][2 * h + 1] * s1;
                if (UP) {
                    const float g0 = acc[i][j + 4][2 * h] * u0, g1 = acc[i][j + 4][2 * h + 1] * u1;
                    const float o0 = gelu_erf_f(v0) * (g0 + 1.0f), o1 = gelu_erf_f(v1) * (g1 + 1.0f);
                    bf16 *dst = act + p * ldact + n;
                    if (two)
                        *(__nv_bfloat162 *)dst = __floats2bfloat162_rn(o0, o1);
                    else
                        *dst = __float2bfloat16_rn(o0);
                } else {
                    float *dst = y + p * ldy + n;
                    if (two && (ldy & 1) == 0)
                        *(float2 *)dst = make_float2(v0, v1);
                    else {
                        dst[0] = v0;
                        if (two) dst[1] = v1;
                    }
                }
            }
        }
    }
}

/* x[t][n] += Σ_k w[t,k]·y[slot[t,k]][n], k in rank order (store: x[t][n] = Σ). */
__global__ void moe_combine_kernel(float *x, int ldx, const float *y, int ldy, const int32_t *slot, const float *wt,
                                   int T, int N, int K, int store) {
    pdl_trigger();
    pdl_wait();
    const long n_all = (long)T * N;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n_all; i += (long)gridDim.x * blockDim.x) {
        const int t = (int)(i / N), n = (int)(i % N);
        float acc = 0.0f;
        for (int k = 0; k < K; k++) acc = fmaf(wt[(long)t * K + k], y[(long)slot[(long)t * K + k] * ldy + n], acc);
        float *o = x + (long)t * ldx + n;
        *o = store ? acc : *o + acc;
    }
}

/* ---- the MLP ------------------------------------------------------------------------------- */

static size_t up256(size_t v) { return (v + 255) & ~(size_t)255; }

static int moe_pad8(int v) { return (v + 7) / 8 * 8; }

/* Scratch layout for T tokens (see cuda_moe_scratch_bytes). */
typedef struct moe_scr {
    int *off, *n_tiles;
    int2 *tiles;
    int32_t *rows, *slot;
    bf16 *act; /* [T·K, ldact] */
    float *y;  /* [T·K, N] */
    int ldact;
    size_t bytes;
} moe_scr;

static moe_scr moe_layout(unsigned char *base, int T, int E, int K, int dim, int inner) {
    moe_scr s;
    memset(&s, 0, sizeof s);
    const size_t TK = (size_t)T * K, max_tiles = TK / MOE_MB_MIN + (size_t)E + 1;
    size_t o = 0;
#define MOE_TAKE(field, type, n)                    \
    do {                                            \
        s.field = (type *)(base ? base + o : NULL); \
        o += up256((size_t)(n) * sizeof(type));     \
    } while (0)
    MOE_TAKE(off, int, E + 1);
    MOE_TAKE(n_tiles, int, 1);
    MOE_TAKE(tiles, int2, max_tiles);
    MOE_TAKE(rows, int32_t, TK);
    MOE_TAKE(slot, int32_t, TK);
    s.ldact = moe_pad8(inner);
    MOE_TAKE(act, bf16, TK * s.ldact);
    MOE_TAKE(y, float, TK *dim);
#undef MOE_TAKE
    s.bytes = o;
    return s;
}

size_t cuda_moe_scratch_bytes(int T, int E, int K, int dim, int inner) {
    return moe_layout(NULL, T, E, K, dim, inner).bytes;
}

/* The two grouped GEMMs (fc1 with the GeGLU epilogue, fc2) in one tile shape. */
template <int MB, int BK, int ST, int F8>
static albedo_status moe_gemms(cuda_ctx *c, const cuda_moe *m, const moe_scr *s, int max_tiles) {
    const int D = m->dim, I = m->inner;
    /* W1's and W2's rows, their strides, and the K extents read: bf16 rows
     * up to ld1 and ldact; e4m3 rows up to dim and I rounded up to 8 (h's
     * and act's padding; the weights' padding to 16 is zeros) */
    const void *w1 = F8 ? (const void *)m->q1 : (const void *)m->w1;
    const void *w2 = F8 ? (const void *)m->q2 : (const void *)m->w2;
    const int ldw1 = F8 ? m->ldq1 : m->ld1, ldw2 = F8 ? m->ldq2 : m->ld2, k1 = F8 ? moe_pad8(D) : m->ld1;
    const long w1e = (long)2 * I * ldw1, w2e = (long)D * ldw2;
    constexpr int s1 = moe_gemm_smem(1, MB, BK, ST, F8), s0 = moe_gemm_smem(0, MB, BK, ST, F8);
    /* above 48 KiB only once raised (not a stream operation: allowed while capturing) */
    CU_TRY(c,
           cudaFuncSetAttribute(moe_gemm_kernel<1, MB, BK, ST, F8>, cudaFuncAttributeMaxDynamicSharedMemorySize, s1));
    CU_TRY(c,
           cudaFuncSetAttribute(moe_gemm_kernel<0, MB, BK, ST, F8>, cudaFuncAttributeMaxDynamicSharedMemorySize, s0));
    CU_TRY(c, launch_k(c, moe_gemm_kernel<1, MB, BK, ST, F8>, dim3(max_tiles, (I + MOE_NB - 1) / MOE_NB), dim3(MB * 2),
                       s1, (const int2 *)s->tiles, (const int *)s->n_tiles, (const int *)s->off,
                       (const int32_t *)s->rows, (const bf16 *)m->h, m->ldh, w1, w1e, ldw1, m->s1, (long)2 * I, I, k1,
                       I, s->act, s->ldact, (float *)NULL, 0));
    CU_LAUNCHED(c);
    CU_TRY(c, launch_k(c, moe_gemm_kernel<0, MB, BK, ST, F8>, dim3(max_tiles, (D + MOE_NB - 1) / MOE_NB), dim3(MB * 2),
                       s0, (const int2 *)s->tiles, (const int *)s->n_tiles, (const int *)s->off,
                       (const int32_t *)s->rows, (const bf16 *)s->act, s->ldact, w2, w2e, ldw2, m->s2, (long)D, D,
                       s->ldact, 0, (bf16 *)NULL, 0, s->y, D));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* The same on moe_mma_kernel: fc1 in blocks of 64 columns (both halves),
 * fc2 in blocks of 128. */
template <int MB, int BK, int ST, int F8, int WM>
static albedo_status moe_mmas(cuda_ctx *c, const cuda_moe *m, const moe_scr *s, int max_tiles) {
    const int D = m->dim, I = m->inner;
    const void *w1 = F8 ? (const void *)m->q1 : (const void *)m->w1;
    const void *w2 = F8 ? (const void *)m->q2 : (const void *)m->w2;
    const int ldw1 = F8 ? m->ldq1 : m->ld1, ldw2 = F8 ? m->ldq2 : m->ld2, k1 = F8 ? moe_pad8(D) : m->ld1;
    const long w1e = (long)2 * I * ldw1, w2e = (long)D * ldw2;
    constexpr int sm = moe_mma_smem(MB, BK, ST, F8);
    CU_TRY(c, cudaFuncSetAttribute(moe_mma_kernel<1, MB, BK, ST, F8, WM>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   sm));
    CU_TRY(c, cudaFuncSetAttribute(moe_mma_kernel<0, MB, BK, ST, F8, WM>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   sm));
    CU_TRY(c, launch_k(c, moe_mma_kernel<1, MB, BK, ST, F8, WM>,
                       dim3(max_tiles, (I + MOE_MMA_WR / 2 - 1) / (MOE_MMA_WR / 2)), dim3(WM * 64), sm,
                       (const int2 *)s->tiles, (const int *)s->n_tiles, (const int *)s->off, (const int32_t *)s->rows,
                       (const bf16 *)m->h, m->ldh, w1, w1e, ldw1, m->s1, (long)2 * I, I, k1, I, s->act, s->ldact,
                       (float *)NULL, 0));
    CU_LAUNCHED(c);
    CU_TRY(c, launch_k(c, moe_mma_kernel<0, MB, BK, ST, F8, WM>, dim3(max_tiles, (D + MOE_MMA_WR - 1) / MOE_MMA_WR),
                       dim3(WM * 64), sm, (const int2 *)s->tiles, (const int *)s->n_tiles, (const int *)s->off,
                       (const int32_t *)s->rows, (const bf16 *)s->act, s->ldact, w2, w2e, ldw2, m->s2, (long)D, D,
                       s->ldact, 0, (bf16 *)NULL, 0, s->y, D));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* Grouped GEMM shapes (cuda_moe.gemm): 1-4 moe_gemm_kernel (WMMA), 5-7
 * moe_mma_kernel: tile rows, K step, stages. */
static int moe_tile_rows(int g) { return g == 1 || g == 2 || g == 7 ? 64 : 128; }

template <int F8> static albedo_status moe_grouped(cuda_ctx *c, const cuda_moe *m, const moe_scr *s, int g, int mt) {
    switch (g) {
    case 1: return moe_gemms<64, 32, 2, F8>(c, m, s, mt);
    case 2: return moe_gemms<64, 64, 3, F8>(c, m, s, mt);
    case 3: return moe_gemms<128, 32, 2, F8>(c, m, s, mt);
    case 4: return moe_gemms<128, 64, 3, F8>(c, m, s, mt);
    case 5: return moe_mmas<128, 64, 3, F8, 2>(c, m, s, mt);
    case 6: return moe_mmas<128, 32, 4, F8, 2>(c, m, s, mt);
    case 7: return moe_mmas<64, 64, 3, F8, 2>(c, m, s, mt);
    case 8: return moe_mmas<128, 64, 3, F8, 4>(c, m, s, mt);
    default: return moe_mmas<128, 32, 4, F8, 4>(c, m, s, mt);
    }
}

albedo_status cuda_moe_mlp(cuda_ctx *c, const cuda_moe *m) {
    const int T = m->T, E = m->E, K = m->K, D = m->dim, I = m->inner;
    CU_ARG(c, T >= 0 && E >= 1 && K >= 1 && K <= CUDA_MOE_MAX_K && K <= E && E <= 4096);
    const int f8 = m->q1 != NULL;
    if (f8) {
        CU_ARG(c, D >= 1 && I >= 1 && m->ldq1 % 16 == 0 && m->ldq1 >= D && m->ldq2 % 16 == 0 && m->ldq2 >= I);
        CU_ARG(c, m->ldh % 8 == 0 && m->ldh >= moe_pad8(D) && m->ldx >= D && m->s1 && m->s2);
        CU_ARG(c, is_aligned(m->q1, 16) && is_aligned(m->q2, 16) && is_aligned(m->h, 16) && m->scratch);
    } else {
        CU_ARG(c, D >= 1 && I >= 1 && m->ld1 % 8 == 0 && m->ld1 >= D && m->ld2 % 8 == 0 && m->ld2 >= I);
        CU_ARG(c, m->ldh % 8 == 0 && m->ldh >= m->ld1 && m->ldx >= D);
        CU_ARG(c, is_aligned(m->w1, 16) && is_aligned(m->w2, 16) && is_aligned(m->h, 16) && m->scratch);
    }
    CU_ARG(c, (long)T * K <= CUDA_MOE_MAX_ASSIGN);
    /* moe_mma_kernel addresses an expert's weights with int byte offsets */
    CU_ARG(c,
           (long)2 * I * (f8 ? m->ldq1 : 2L * m->ld1) <= INT_MAX && (long)D * (f8 ? m->ldq2 : 2L * m->ld2) <= INT_MAX);
    if (!T) return ALBEDO_OK;
    /* The padding columns D..ld1 of h and of W1, and I..ld2 of act and W2,
     * are zeros (the caller's h and weights; act's are written here). */
    const moe_scr s = moe_layout((unsigned char *)m->scratch, T, E, K, D, I);
    const long w1e = (long)2 * I * m->ld1, w2e = (long)D * m->ld2;
    const int gemv = m->path == 1 || (m->path == 0 && T <= CUDA_MOE_GEMV_MAX_T);
    if (s.ldact != I) /* keep act's padding columns zero for the 16-byte reads of the down pass */
        CU_TRY(c, cudaMemsetAsync(s.act, 0, (size_t)T * K * s.ldact * sizeof(bf16), c->stream));
    if (gemv && f8) {
        const int jb = MOE_GEMV_WARPS * MOE_F8_UP_J;
        CU_TRY(c,
               launch_k(c, moe_up_gemv_f8_kernel, dim3((I + jb - 1) / jb, T * K), dim3(MOE_GEMV_WARPS * 32), 0, s.act,
                        s.ldact, (const bf16 *)m->h, m->ldh, m->sel, m->q1, m->s1, m->ldq1, moe_pad8(D), I, K));
        CU_LAUNCHED(c);
        CU_TRY(c, launch_k(c, moe_down_gemv_f8_kernel, dim3((D + MOE_F8_DOWN_N - 1) / MOE_F8_DOWN_N, T), dim3(32 * K),
                           0, m->x, m->ldx, (const bf16 *)s.act, s.ldact, m->sel, m->wt, m->q2, m->s2, m->ldq2, D,
                           s.ldact, K, m->store != 0));
        CU_LAUNCHED(c);
        return ALBEDO_OK;
    }
    if (gemv) {
        CU_TRY(c, launch_k(c, moe_up_gemv_kernel, dim3((I + MOE_GEMV_WARPS - 1) / MOE_GEMV_WARPS, T * K),
                           dim3(MOE_GEMV_WARPS * 32), 0, s.act, s.ldact, (const bf16 *)m->h, m->ldh, m->sel,
                           (const bf16 *)m->w1, w1e, m->ld1, m->ld1, I, K));
        CU_LAUNCHED(c);
        CU_TRY(c, launch_k(c, moe_down_gemv_kernel, dim3(D, T), dim3(32 * K), 0, m->x, m->ldx, (const bf16 *)s.act,
                           s.ldact, m->sel, m->wt, (const bf16 *)m->w2, w2e, m->ld2, D, s.ldact, K, m->store != 0));
        CU_LAUNCHED(c);
        return ALBEDO_OK;
    }
    const int TK = T * K;
    const int g = m->gemm >= 1 && m->gemm <= CUDA_MOE_GEMM_SHAPES ? m->gemm
                  : TK >= CUDA_MOE_GEMM_LARGE_TK                  ? CUDA_MOE_GEMM_LARGE
                                                                  : CUDA_MOE_GEMM_SMALL;
    const int mb = moe_tile_rows(g);
    const int max_tiles = TK / mb + E + 1;
    CU_TRY(c, launch_k(c, moe_sort_kernel, dim3(1), dim3(1024), (size_t)2 * E * sizeof(int), m->sel, TK, K, E, mb,
                       s.off, s.tiles, s.n_tiles, s.rows, s.slot));
    CU_LAUNCHED(c);
    const albedo_status st = f8 ? moe_grouped<1>(c, m, &s, g, max_tiles) : moe_grouped<0>(c, m, &s, g, max_tiles);
    if (st) return st;
    const long n = (long)T * D;
    const int blocks = (int)((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
    CU_TRY(c, launch_k(c, moe_combine_kernel, dim3(blocks), dim3(256), 0, m->x, m->ldx, (const float *)s.y, D,
                       (const int32_t *)s.slot, m->wt, T, D, K, m->store != 0));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}
