/*
 * elementwise.cu — the memory-bound ops: layernorm, gelu (tanh and erf),
 * residual add, embedding gather, and the rotary embedding fused with the
 * KV-cache write. Each reads and writes its operands once; all arithmetic
 * is float32 whatever the storage dtype.
 */
#include "cuda_internal.cuh"

static int is_act_dt(dtype d) { return d == DT_F32 || d == DT_BF16; }

static int grid_for(size_t n, int threads) {
    size_t b = (n + threads - 1) / threads;
    return (int)(b < 8192 ? (b ? b : 1) : 8192);
}

/* ---- layernorm: one block per row ----------------------------------------- */

/* Two passes for the statistics (mean, then the squared deviations from it),
 * like the reference, then the write. Rows of up to 256·LN_REG elements
 * are read once into registers (all loads in flight at once), and the
 * parameters, which no earlier kernel writes, are loaded before the wait
 * for the previous kernel (PDL); longer rows stay in L1 over three reads.
 * Both forms sum in the same order. */
#define LN_REG 16
template <typename XT, typename YT>
__global__ void __launch_bounds__(256)
    layernorm_kernel(YT *y, int ldy, const XT *x, int ldx, int C, const void *g, const void *b, int p_f32, float eps) {
    pdl_trigger();
    __shared__ float red[32];
    const XT *xr = x + (size_t)blockIdx.x * ldx;
    YT *yr = y + (size_t)blockIdx.x * ldy;
    if (C <= (int)blockDim.x * LN_REG) {
        float gv[LN_REG], bv[LN_REG], xv[LN_REG];
#pragma unroll
        for (int u = 0; u < LN_REG; u++) {
            const int i = threadIdx.x + u * blockDim.x;
            gv[u] = i < C ? ld_param(g, p_f32, i) : 0.0f;
            bv[u] = i < C ? ld_param(b, p_f32, i) : 0.0f;
        }
        pdl_wait();
#pragma unroll
        for (int u = 0; u < LN_REG; u++) {
            const int i = threadIdx.x + u * blockDim.x;
            xv[u] = i < C ? to_f(xr[i]) : 0.0f;
        }
        float s = 0.0f;
#pragma unroll
        for (int u = 0; u < LN_REG; u++)
            if (threadIdx.x + u * blockDim.x < (unsigned)C) s += xv[u];
        const float mean = block_sum(s, red) / C;
        float v = 0.0f;
#pragma unroll
        for (int u = 0; u < LN_REG; u++)
            if (threadIdx.x + u * blockDim.x < (unsigned)C) {
                const float d = xv[u] - mean;
                v += d * d;
            }
        const float var = block_sum(v, red) / C;
        const float inv = 1.0f / sqrtf(var + eps);
#pragma unroll
        for (int u = 0; u < LN_REG; u++) {
            const int i = threadIdx.x + u * blockDim.x;
            if (i < C) yr[i] = from_f<YT>((xv[u] - mean) * inv * gv[u] + bv[u]);
        }
        return;
    }
    pdl_wait();
    float s = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) s += to_f(xr[i]);
    const float mean = block_sum(s, red) / C;
    float v = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float d = to_f(xr[i]) - mean;
        v += d * d;
    }
    const float var = block_sum(v, red) / C;
    const float inv = 1.0f / sqrtf(var + eps);
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        yr[i] = from_f<YT>((to_f(xr[i]) - mean) * inv * ld_param(g, p_f32, i) + ld_param(b, p_f32, i));
}

/* The same with one warp per row, 8 rows per block: no block barriers, so
 * many rows (vision's 6561, a prefix's 730) stream at memory speed. */
template <typename XT, typename YT>
__global__ void __launch_bounds__(256) layernorm_rows_kernel(YT *y, int ldy, const XT *x, int ldx, int T, int C,
                                                             const void *g, const void *b, int p_f32, float eps) {
    pdl_trigger();
    pdl_wait();
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= T) return;
    const XT *xr = x + (size_t)row * ldx;
    YT *yr = y + (size_t)row * ldy;
    float s = 0.0f;
    for (int i = lane; i < C; i += 32) s += to_f(xr[i]);
    const float mean = warp_sum(s) / C;
    float v = 0.0f;
    for (int i = lane; i < C; i += 32) {
        const float d = to_f(xr[i]) - mean;
        v += d * d;
    }
    const float var = warp_sum(v) / C;
    const float inv = 1.0f / sqrtf(var + eps);
    for (int i = lane; i < C; i += 32)
        yr[i] = from_f<YT>((to_f(xr[i]) - mean) * inv * ld_param(g, p_f32, i) + ld_param(b, p_f32, i));
}

/* Rows from which the warp-per-row form runs. Below, a block per row keeps
 * more warps busy per row: on an H100 the warp form took 27 µs instead of 37
 * for vision's 6561 rows of 1152, but 33 µs instead of 11 for a prefix's
 * 730 rows of 2048 (docs/CUDA.md). */
#define LN_ROWS_MIN 2048

albedo_status cuda_layernorm_ld(cuda_ctx *c, void *y, dtype ydt, int ldy, const void *x, dtype xdt, int ldx, int T,
                                int C, const void *g, const void *b, dtype pdt, float eps) {
    CU_ARG(c, T >= 0 && C > 0 && is_act_dt(xdt) && is_act_dt(ydt) && is_act_dt(pdt));
    CU_ARG(c, ldx >= C && ldy >= C);
    CU_ARG(c, y != x || (xdt == ydt && ldx == ldy));
    if (T == 0) return ALBEDO_OK;
    const int pf = pdt == DT_F32;
    if (T >= LN_ROWS_MIN) {
        const dim3 grid((T + 7) / 8), block(256);
        if (xdt == DT_F32 && ydt == DT_F32)
            CU_TRY(c, (launch_k(c, layernorm_rows_kernel<float, float>, grid, block, 0, (float *)y, ldy,
                                (const float *)x, ldx, T, C, g, b, pf, eps)));
        else if (xdt == DT_F32)
            CU_TRY(c, (launch_k(c, layernorm_rows_kernel<float, bf16>, grid, block, 0, (bf16 *)y, ldy, (const float *)x,
                                ldx, T, C, g, b, pf, eps)));
        else if (ydt == DT_F32)
            CU_TRY(c, (launch_k(c, layernorm_rows_kernel<bf16, float>, grid, block, 0, (float *)y, ldy, (const bf16 *)x,
                                ldx, T, C, g, b, pf, eps)));
        else
            CU_TRY(c, (launch_k(c, layernorm_rows_kernel<bf16, bf16>, grid, block, 0, (bf16 *)y, ldy, (const bf16 *)x,
                                ldx, T, C, g, b, pf, eps)));
        CU_LAUNCHED(c);
        return ALBEDO_OK;
    }
    const dim3 grid(T), block(256);
    if (xdt == DT_F32 && ydt == DT_F32)
        CU_TRY(c, (launch_k(c, layernorm_kernel<float, float>, dim3(grid), dim3(block), 0, (float *)y, ldy,
                            (const float *)x, ldx, C, g, b, pf, eps)));
    else if (xdt == DT_F32)
        CU_TRY(c, (launch_k(c, layernorm_kernel<float, bf16>, dim3(grid), dim3(block), 0, (bf16 *)y, ldy,
                            (const float *)x, ldx, C, g, b, pf, eps)));
    else if (ydt == DT_F32)
        CU_TRY(c, (launch_k(c, layernorm_kernel<bf16, float>, dim3(grid), dim3(block), 0, (float *)y, ldy,
                            (const bf16 *)x, ldx, C, g, b, pf, eps)));
    else
        CU_TRY(c, (launch_k(c, layernorm_kernel<bf16, bf16>, dim3(grid), dim3(block), 0, (bf16 *)y, ldy,
                            (const bf16 *)x, ldx, C, g, b, pf, eps)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

albedo_status cuda_layernorm(cuda_ctx *c, void *y, dtype ydt, const void *x, dtype xdt, int T, int C, const void *g,
                             const void *b, dtype pdt, float eps) {
    return cuda_layernorm_ld(c, y, ydt, C, x, xdt, C, T, C, g, b, pdt, eps);
}

/* ---- gelu, add ------------------------------------------------------------ */

template <typename T, int ERF> __global__ void gelu_kernel(T *x, size_t n) {
    pdl_trigger();
    pdl_wait();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = to_f(x[i]);
        x[i] = from_f<T>(ERF ? gelu_erf_f(v) : gelu_tanh_f(v));
    }
}

template <int ERF> static albedo_status gelu(cuda_ctx *c, void *x, dtype dt, size_t n) {
    CU_ARG(c, is_act_dt(dt));
    if (n == 0) return ALBEDO_OK;
    if (dt == DT_F32)
        CU_TRY(c, (launch_k(c, gelu_kernel<float, ERF>, dim3(grid_for(n, 256)), dim3(256), 0, (float *)x, n)));
    else
        CU_TRY(c, (launch_k(c, gelu_kernel<bf16, ERF>, dim3(grid_for(n, 256)), dim3(256), 0, (bf16 *)x, n)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

albedo_status cuda_gelu_tanh(cuda_ctx *c, void *x, dtype dt, size_t n) { return gelu<0>(c, x, dt, n); }
albedo_status cuda_gelu_erf(cuda_ctx *c, void *x, dtype dt, size_t n) { return gelu<1>(c, x, dt, n); }

template <typename YT, typename XT> __global__ void add_kernel(YT *y, const XT *x, size_t n) {
    pdl_trigger();
    pdl_wait();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = from_f<YT>(to_f(y[i]) + to_f(x[i]));
}

albedo_status cuda_add(cuda_ctx *c, void *y, dtype ydt, const void *x, dtype xdt, size_t n) {
    CU_ARG(c, is_act_dt(ydt) && is_act_dt(xdt));
    if (n == 0) return ALBEDO_OK;
    const int g = grid_for(n, 256);
    if (ydt == DT_F32 && xdt == DT_F32)
        CU_TRY(c, (launch_k(c, add_kernel<float, float>, dim3(g), dim3(256), 0, (float *)y, (const float *)x, n)));
    else if (ydt == DT_F32)
        CU_TRY(c, (launch_k(c, add_kernel<float, bf16>, dim3(g), dim3(256), 0, (float *)y, (const bf16 *)x, n)));
    else if (xdt == DT_F32)
        CU_TRY(c, (launch_k(c, add_kernel<bf16, float>, dim3(g), dim3(256), 0, (bf16 *)y, (const float *)x, n)));
    else
        CU_TRY(c, (launch_k(c, add_kernel<bf16, bf16>, dim3(g), dim3(256), 0, (bf16 *)y, (const bf16 *)x, n)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* ---- embedding gather --------------------------------------------------------- */

__global__ void embed_kernel(float *x, const bf16 *table, int V, int C, const int32_t *ids) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    const int id = ids[t];
    float *xr = x + (size_t)t * C;
    if (id < 0 || id >= V) {
        for (int i = threadIdx.x; i < C; i += blockDim.x) xr[i] = __int_as_float(0x7fc00000);
        return;
    }
    const bf16 *row = table + (size_t)id * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x) xr[i] = __bfloat162float(row[i]);
}

albedo_status cuda_embed(cuda_ctx *c, float *x, const uint16_t *table, int V, int C, const int32_t *ids, int T) {
    CU_ARG(c, T >= 0 && V > 0 && C > 0);
    if (T == 0) return ALBEDO_OK;
    CU_TRY(c, (launch_k(c, embed_kernel, dim3(T), dim3(256), 0, x, (const bf16 *)table, V, C, ids)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* ---- rotary embedding + KV-cache write ------------------------------------------ */

/* Work items of row t = blockIdx.x, in order: H·R/2 query pairs (rotated in
 * place), Hkv·R/2 key pairs (rotated into the cache, or in place without
 * one), and with a cache Hkv·(D - R) unrotated key elements and Hkv·D
 * value elements copied into it. Block (t, c) takes items [c·per, (c+1)·per)
 * with 256 threads: a prefix's 730 rows make 730 × 4 blocks instead of one
 * block per head (70,080 blocks of 64 threads took 87 µs a layer on an
 * H100, this 17 µs). */
/* A cache element: bf16, or with F8 e4m3(x · inv) (inv = 1 / the tensor's
 * scale; saturated to ±448, round to nearest even). */
template <bool F8> __device__ __forceinline__ void kv_put(void *cache, size_t i, float x, float inv) {
    if (F8)
        ((uint8_t *)cache)[i] = (uint8_t)__nv_cvt_float_to_fp8(x * inv, __NV_SATFINITE, __NV_E4M3);
    else
        ((bf16 *)cache)[i] = __float2bfloat16_rn(x);
}

template <bool F8> __global__ void rope_kv_kernel(cuda_rope r, int per) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x;
    const int half = r.R / 2;
    const int pos = r.rows ? r.rows[2 * t] : (r.pos_dev ? *r.pos_dev : r.pos0) + t;
    /* Cache element (head, d) of this row: head-major [Hkv, n_ctx, D], or
     * the paged pool's token-major [rows, Hkv*D]. */
    const size_t crow = r.rows ? (size_t)r.rows[2 * t + 1] * r.Hkv : (size_t)pos;
    const size_t hstride = r.rows ? 1 : (size_t)r.n_ctx;
    const bf16 *xr = (const bf16 *)r.x + (size_t)t * r.ldx;
    const float *ct = r.cos_t + (size_t)pos * half, *st = r.sin_t + (size_t)pos * half;
    const bool cache = r.k_cache != NULL;
    const float kin = F8 ? 1.0f / r.k_scale : 1.0f, vin = F8 ? 1.0f / r.v_scale : 1.0f;
    const int nq = r.H * half, nk = r.Hkv * half, nkc = cache ? r.Hkv * (r.D - r.R) : 0;
    const int nv = cache ? r.Hkv * r.D : 0, total = nq + nk + nkc + nv;
    const int i1 = (blockIdx.y + 1) * per < total ? (blockIdx.y + 1) * per : total;
    for (int i = blockIdx.y * per + threadIdx.x; i < i1; i += blockDim.x) {
        if (i < nq + nk) {
            const bool is_q = i < nq;
            const int ii = is_q ? i : i - nq, head = ii / half, j = ii % half;
            const bf16 *src = xr + (size_t)((is_q ? 0 : r.H) + head) * r.D;
            /* Both reads happen before either write: dst may be src. */
            const float a = __bfloat162float(src[j]), b = __bfloat162float(src[j + half]);
            const float cs = ct[j], sn = st[j];
            const float y0 = a * cs - b * sn, y1 = a * sn + b * cs;
            if (is_q || !cache) {
                bf16 *dst = (bf16 *)src;
                dst[j] = __float2bfloat16_rn(y0);
                dst[j + half] = __float2bfloat16_rn(y1);
            } else {
                const size_t o = ((size_t)head * hstride + crow) * r.D;
                kv_put<F8>(r.k_cache, o + j, y0, kin);
                kv_put<F8>(r.k_cache, o + j + half, y1, kin);
            }
        } else if (i < nq + nk + nkc) {
            const int ii = i - nq - nk, w = r.D - r.R, head = ii / w, d = r.R + ii % w;
            kv_put<F8>(r.k_cache, ((size_t)head * hstride + crow) * r.D + d,
                       __bfloat162float(xr[(size_t)(r.H + head) * r.D + d]), kin);
        } else {
            const int ii = i - nq - nk - nkc, head = ii / r.D, d = ii % r.D;
            kv_put<F8>(r.v_cache, ((size_t)head * hstride + crow) * r.D + d,
                       __bfloat162float(xr[(size_t)(r.H + r.Hkv + head) * r.D + d]), vin);
        }
    }
}

albedo_status cuda_rope_kv(cuda_ctx *c, const cuda_rope *r) {
    CU_ARG(c, r->T >= 0 && r->H >= 0 && r->Hkv >= 0 && r->D > 0);
    CU_ARG(c, r->R >= 0 && r->R % 2 == 0 && r->R <= r->D && r->pos0 >= 0);
    CU_ARG(c, (r->k_cache == NULL) == (r->v_cache == NULL));
    CU_ARG(c, !r->k_cache || r->pos_dev || r->rows || r->pos0 + r->T <= r->n_ctx);
    CU_ARG(c, !r->rows || r->k_cache);
    CU_ARG(c, r->ldx >= (r->H + (r->k_cache ? 2 : 1) * r->Hkv) * r->D);
    const int half = r->R / 2;
    const long total = (long)(r->H + r->Hkv) * half + (r->k_cache ? (long)r->Hkv * (2 * r->D - r->R) : 0);
    if (r->T == 0 || total == 0) return ALBEDO_OK;
    /* Many rows: 4 items per thread; few (decode): one, over more blocks. */
    const int per = r->T >= 64 ? 1024 : 256, chunks = (int)((total + per - 1) / per);
    CU_ARG(c, chunks <= 65535);
    if (r->kv_fp8 && r->k_cache) {
        CU_ARG(c, r->k_scale > 0.0f && r->v_scale > 0.0f && isfinite(r->k_scale) && isfinite(r->v_scale));
        CU_TRY(c, (launch_k(c, rope_kv_kernel<true>, dim3(r->T, chunks), dim3(256), 0, *r, per)));
    } else {
        CU_TRY(c, (launch_k(c, rope_kv_kernel<false>, dim3(r->T, chunks), dim3(256), 0, *r, per)));
    }
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}
