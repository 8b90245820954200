/*
 * ctx.cu — the CUDA backend's context (stream, cuBLASLt handle and
 * workspace, attention scratch), device memory and host<->device copies,
 * and error reporting. No kernels here.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "cuda_internal.cuh"

albedo_status cuda_fail(cuda_ctx *c, albedo_status st, const char *fmt, ...) {
    if (c) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, sizeof c->err, fmt, ap);
        va_end(ap);
    }
    return st;
}

albedo_status cuda_status_of(cudaError_t e) {
    return e == cudaErrorMemoryAllocation ? ALBEDO_ERR_OUT_OF_MEMORY : ALBEDO_ERR_INTERNAL;
}

const char *cuda_ctx_error(const cuda_ctx *c) { return c ? c->err : "no context"; }

void *cuda_ctx_stream(cuda_ctx *c) { return (void *)c->stream; }

void cuda_ctx_counters(const cuda_ctx *c, long *lt_fused, long *lt_unfused, long *gemv) {
    if (lt_fused) *lt_fused = c->n_lt_fused;
    if (lt_unfused) *lt_unfused = c->n_lt_unfused;
    if (gemv) *gemv = c->n_gemv;
}

void cuda_ctx_set_gemv_max(cuda_ctx *c, int t) { c->gemv_max_t = t < 1 ? 1 : t > 8 ? 8 : t; }

void cuda_ctx_set_flash(cuda_ctx *c, int variant) {
    c->flash = variant & (CUDA_FLASH_64 | CUDA_FLASH_PAD16 | CUDA_FLASH_MMA | CUDA_FLASH_WGALT);
}

void cuda_ctx_set_pdl(cuda_ctx *c, int on) {
    int major = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->device);
    c->pdl = on && major >= 9;
}

void cuda_ctx_free(cuda_ctx *c) {
    if (!c) return;
    if (c->stream) cudaStreamSynchronize(c->stream);
    for (int i = 0; i < LT_PLANS; i++) {
        lt_plan *p = &c->plans[i];
        if (!p->used) continue;
        if (p->desc) cublasLtMatmulDescDestroy(p->desc);
        if (p->a) cublasLtMatrixLayoutDestroy(p->a);
        if (p->b) cublasLtMatrixLayoutDestroy(p->b);
        if (p->cd) cublasLtMatrixLayoutDestroy(p->cd);
    }
    if (c->lt) cublasLtDestroy(c->lt);
    cudaFree(c->lt_ws);
    cudaFree(c->attn_part);
    cudaFree(c->attn_count);
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c);
}

/* On failure inside cuda_ctx_new: copy the detail to e, free, return st. */
static albedo_status new_fail(cuda_ctx *c, errbuf *e, albedo_status st) {
    errf(e, st, "cuda: %s", c->err);
    cuda_ctx_free(c);
    return st;
}

albedo_status cuda_ctx_new(int device, cuda_ctx **out, errbuf *e) {
    *out = NULL;
    cuda_ctx *c = (cuda_ctx *)calloc(1, sizeof *c);
    if (!c) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "cuda: no memory for a context");
    c->device = device;
    albedo_status st = ALBEDO_OK;
#define NEW_TRY(call)                                                                       \
    do {                                                                                    \
        cudaError_t e_ = (call);                                                            \
        if (e_ != cudaSuccess) {                                                            \
            st = cuda_fail(c, cuda_status_of(e_), "%s: %s", #call, cudaGetErrorString(e_)); \
            return new_fail(c, e, st);                                                      \
        }                                                                                   \
    } while (0)
    NEW_TRY(cudaSetDevice(device));
    NEW_TRY(cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount, device));
    NEW_TRY(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    cublasStatus_t bs = cublasLtCreate(&c->lt);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        cuda_fail(c, ALBEDO_ERR_INTERNAL, "cublasLtCreate: status %d", (int)bs);
        return new_fail(c, e, ALBEDO_ERR_INTERNAL);
    }
    /* 32 MiB: what cuBLAS itself reserves on Hopper for its best kernels. */
    c->lt_ws_size = (size_t)32 << 20;
    NEW_TRY(cudaMalloc(&c->lt_ws, c->lt_ws_size));
    NEW_TRY(cudaMalloc((void **)&c->attn_part, (size_t)ATTN_SLOTS * ATTN_DSTRIDE * sizeof(float)));
    NEW_TRY(cudaMalloc((void **)&c->attn_count, (size_t)ATTN_SLOTS * sizeof(int)));
    NEW_TRY(cudaMemsetAsync(c->attn_count, 0, (size_t)ATTN_SLOTS * sizeof(int), c->stream));
    NEW_TRY(cudaStreamSynchronize(c->stream));
#undef NEW_TRY
    const char *env = getenv("ALBEDO_CUDA_PDL");
    cuda_ctx_set_pdl(c, !(env && env[0] == '0'));
    /* ALBEDO_CUDA_GEMV_MAX_T (1..8) moves the GEMV/cuBLASLt switch, for measuring it. */
    env = getenv("ALBEDO_CUDA_GEMV_MAX_T");
    c->gemv_max_t = env && atoi(env) >= 1 && atoi(env) <= 8 ? atoi(env) : 8;
    /* ALBEDO_CUDA_FLASH=N picks the flash kernel's geometry, for measuring
     * it; the 128-row default was measured on sm_90 (H100), other cards keep
     * the 64-row blocks they had. */
    env = getenv("ALBEDO_CUDA_FLASH");
    int cc_major = 0;
    cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, c->device);
    cuda_ctx_set_flash(c, env ? atoi(env) : cc_major == 9 ? CUDA_FLASH_128 : CUDA_FLASH_64);
    st = cuda_attention_init(c);
    if (st != ALBEDO_OK) return new_fail(c, e, st);
    *out = c;
    return ALBEDO_OK;
}

albedo_status cuda_alloc(cuda_ctx *c, void **p, size_t bytes) {
    *p = NULL;
    CU_TRY(c, cudaMalloc(p, bytes ? bytes : 1));
    return ALBEDO_OK;
}

void cuda_free(void *p) {
    if (p) cudaFree(p);
}

albedo_status cuda_sync(cuda_ctx *c) {
    CU_TRY(c, cudaStreamSynchronize(c->stream));
    return ALBEDO_OK;
}

albedo_status cuda_upload(cuda_ctx *c, void *dst, const void *src, size_t bytes) {
    CU_TRY(c, cudaStreamSynchronize(c->stream));
    CU_TRY(c, cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    return ALBEDO_OK;
}

albedo_status cuda_download(cuda_ctx *c, void *dst, const void *src, size_t bytes) {
    CU_TRY(c, cudaStreamSynchronize(c->stream));
    CU_TRY(c, cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    return ALBEDO_OK;
}

albedo_status cuda_upload_bf16(cuda_ctx *c, uint16_t *dst, const void *src, dtype dt, size_t n) {
    if (dt == DT_BF16) return cuda_upload(c, dst, src, n * 2);
    if (dt != DT_F32 && dt != DT_F16)
        return cuda_fail(c, ALBEDO_ERR_UNSUPPORTED, "cuda_upload_bf16: dtype %s", dtype_name(dt));
    /* Convert on the host through a staging buffer of 1 Mi elements. */
    const size_t chunk = (size_t)1 << 20;
    uint16_t *tmp = (uint16_t *)malloc((n < chunk ? n : chunk) * 2 + 2);
    if (!tmp) return cuda_fail(c, ALBEDO_ERR_OUT_OF_MEMORY, "cuda_upload_bf16: staging buffer");
    albedo_status st = ALBEDO_OK;
    for (size_t i0 = 0; i0 < n && st == ALBEDO_OK; i0 += chunk) {
        size_t m = n - i0 < chunk ? n - i0 : chunk;
        for (size_t i = 0; i < m; i++) {
            float f = dt == DT_F32 ? ((const float *)src)[i0 + i] : f16_to_f32(((const uint16_t *)src)[i0 + i]);
            tmp[i] = f32_to_bf16(f);
        }
        st = cuda_upload(c, dst + i0, tmp, m * 2);
    }
    free(tmp);
    return st;
}
