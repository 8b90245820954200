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
 * like the reference, over a row that stays in L1; then the write. */
template <typename XT, typename YT>
__global__ void __launch_bounds__(256) layernorm_kernel(YT *y, const XT *x, int C, const void *g,
                                                        const void *b, int p_f32, float eps) {
    pdl_trigger();
    pdl_wait();
    __shared__ float red[32];
    const XT *xr = x + (size_t)blockIdx.x * C;
    YT *yr = y + (size_t)blockIdx.x * C;
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
        yr[i] = from_f<YT>((to_f(xr[i]) - mean) * inv * ld_param(g, p_f32, i) +
                           ld_param(b, p_f32, i));
}

albedo_status cuda_layernorm(cuda_ctx *c, void *y, dtype ydt, const void *x, dtype xdt, int T,
                             int C, const void *g, const void *b, dtype pdt, float eps) {
    CU_ARG(c, T >= 0 && C > 0 && is_act_dt(xdt) && is_act_dt(ydt) && is_act_dt(pdt));
    CU_ARG(c, y != x || xdt == ydt);
    if (T == 0) return ALBEDO_OK;
    const int pf = pdt == DT_F32;
    const dim3 grid(T), block(256);
    if (xdt == DT_F32 && ydt == DT_F32)
        CU_TRY(c, (launch_k(c, layernorm_kernel<float, float>, dim3(grid), dim3(block), 0, (float *)y, (const float *)x, C, g, b, pf, eps)));
    else if (xdt == DT_F32)
        CU_TRY(c, (launch_k(c, layernorm_kernel<float, bf16>, dim3(grid), dim3(block), 0, (bf16 *)y, (const float *)x, C, g, b, pf, eps)));
    else if (ydt == DT_F32)
        CU_TRY(c, (launch_k(c, layernorm_kernel<bf16, float>, dim3(grid), dim3(block), 0, (float *)y, (const bf16 *)x, C, g, b, pf, eps)));
    else
        CU_TRY(c, (launch_k(c, layernorm_kernel<bf16, bf16>, dim3(grid), dim3(block), 0, (bf16 *)y, (const bf16 *)x, C, g, b, pf, eps)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* ---- gelu, add ------------------------------------------------------------ */

template <typename T, int ERF> __global__ void gelu_kernel(T *x, size_t n) {
    pdl_trigger();
    pdl_wait();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
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
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
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

albedo_status cuda_embed(cuda_ctx *c, float *x, const uint16_t *table, int V, int C,
                         const int32_t *ids, int T) {
    CU_ARG(c, T >= 0 && V > 0 && C > 0);
    if (T == 0) return ALBEDO_OK;
    CU_TRY(c, (launch_k(c, embed_kernel, dim3(T), dim3(256), 0, x, (const bf16 *)table, V, C, ids)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* ---- rotary embedding + KV-cache write ------------------------------------------ */

/* Block (t, head) over the concatenated heads [H queries | Hkv keys | Hkv
 * values] of row t. Queries rotate in place; keys rotate into the cache (or
 * in place without one); values are copied into the cache. */
__global__ void rope_kv_kernel(cuda_rope r) {
    pdl_trigger();
    pdl_wait();
    const int t = blockIdx.x, hh = blockIdx.y;
    const int half = r.R / 2, pos = r.pos0 + t;
    bf16 *xr = (bf16 *)r.x + (size_t)t * r.ldx + (size_t)hh * r.D;
    const float *ct = r.cos_t + (size_t)pos * half, *st = r.sin_t + (size_t)pos * half;
    if (hh >= r.H + r.Hkv) { /* a value head: copy */
        const int g = hh - r.H - r.Hkv;
        bf16 *dst = (bf16 *)r.v_cache + ((size_t)g * r.n_ctx + pos) * r.D;
        for (int d = threadIdx.x; d < r.D; d += blockDim.x) dst[d] = xr[d];
        return;
    }
    bf16 *dst = xr;
    if (hh >= r.H && r.k_cache) {
        const int g = hh - r.H;
        dst = (bf16 *)r.k_cache + ((size_t)g * r.n_ctx + pos) * r.D;
        for (int d = r.R + threadIdx.x; d < r.D; d += blockDim.x) dst[d] = xr[d];
    }
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float a = __bfloat162float(xr[i]), b = __bfloat162float(xr[i + half]);
        const float cs = ct[i], sn = st[i];
        /* Both reads happen before either write: dst may be xr. */
        const float lo = a * cs - b * sn, hi = a * sn + b * cs;
        dst[i] = __float2bfloat16_rn(lo);
        dst[i + half] = __float2bfloat16_rn(hi);
    }
}

albedo_status cuda_rope_kv(cuda_ctx *c, const cuda_rope *r) {
    CU_ARG(c, r->T >= 0 && r->H >= 0 && r->Hkv >= 0 && r->D > 0);
    CU_ARG(c, r->R >= 0 && r->R % 2 == 0 && r->R <= r->D && r->pos0 >= 0);
    CU_ARG(c, (r->k_cache == NULL) == (r->v_cache == NULL));
    CU_ARG(c, !r->k_cache || r->pos0 + r->T <= r->n_ctx);
    CU_ARG(c, r->ldx >= (r->H + (r->k_cache ? 2 : 1) * r->Hkv) * r->D);
    const int heads = r->H + (r->k_cache ? 2 * r->Hkv : r->Hkv);
    if (r->T == 0 || heads == 0) return ALBEDO_OK;
    const int threads = r->D >= 64 ? 64 : 32;
    CU_TRY(c, (launch_k(c, rope_kv_kernel, dim3(dim3(r->T, heads)), dim3(threads), 0, *r)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}
