/*
 * cuda_internal.cuh — shared by the backend's .cu files only: the context
 * behind cuda_ctx, error plumbing, and bf16/float helpers for kernels.
 * Nothing outside src/cuda/ includes it; C sees ops_cuda.h alone.
 */
#ifndef ALBEDO_CUDA_INTERNAL_CUH
#define ALBEDO_CUDA_INTERNAL_CUH

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "ops_cuda.h"

typedef __nv_bfloat16 bf16;

/* One cached cuBLASLt configuration: the descriptors and the algorithm the
 * heuristic chose for one shape/dtype/epilogue/alignment combination. The
 * heuristic query costs tens of microseconds, too much per call. */
typedef struct lt_key {
    int N, K, T, ldx, ldy;
    int ydt, bdt, epilogue, accumulate;
    int align_x, align_w, align_y, align_b;
} lt_key;

typedef struct lt_plan {
    lt_key key;
    int used; /* slot holds a plan */
    int ok;   /* the heuristic returned an algorithm */
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, cd;
    cublasLtMatmulAlgo_t algo;
} lt_plan;

#define LT_PLANS 64
/* Split attention keeps one partial result per (query row, head, chunk):
 * ATTN_DSTRIDE floats (o[0..127], m, l, padding). */
#define ATTN_SLOTS 16384
#define ATTN_DSTRIDE 132

struct cuda_ctx {
    int device, n_sm;
    cudaStream_t stream;
    cublasLtHandle_t lt;
    void *lt_ws;
    size_t lt_ws_size;
    lt_plan plans[LT_PLANS];
    int next_plan;    /* round-robin victim once all slots are used */
    float *attn_part; /* [ATTN_SLOTS][ATTN_DSTRIDE] */
    int *attn_count;  /* [ATTN_SLOTS] arrival counters, zero between launches */
    int pdl;          /* launch our kernels with programmatic dependent launch (sm_90+) */
    int gemv_max_t;   /* cuda_linear runs the GEMV up to this many rows, cuBLASLt above */
    int flash;        /* the flash attention kernel's block geometry (cuda_ctx_set_flash) */
    int wgmma;        /* the card runs this build's sm_90a code: the wgmma attention kernel */
    long n_lt_fused, n_lt_unfused, n_gemv;
    char err[512];
};

/* Record a failure's detail on c and return st. */
albedo_status cuda_fail(cuda_ctx *c, albedo_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

albedo_status cuda_status_of(cudaError_t e);

/* Check a CUDA runtime call; on failure record it and return from the
 * calling launcher. */
#define CU_TRY(c, call)                                                                                          \
    do {                                                                                                         \
        cudaError_t e_ = (call);                                                                                 \
        if (e_ != cudaSuccess)                                                                                   \
            return cuda_fail((c), cuda_status_of(e_), "%s: %s (%s:%d)", #call, cudaGetErrorString(e_), __FILE__, \
                             __LINE__);                                                                          \
    } while (0)

/* After a launch: a bad configuration shows up here. */
#define CU_LAUNCHED(c) CU_TRY(c, cudaGetLastError())

#define CU_ARG(c, cond)                                                                                   \
    do {                                                                                                  \
        if (!(cond)) return cuda_fail((c), ALBEDO_ERR_INVALID_ARGUMENT, "%s: needs %s", __func__, #cond); \
    } while (0)

/* Launchers shared between files. */
albedo_status cuda_bias_act(cuda_ctx *c, void *y, dtype ydt, int ldy, int T, int N, const void *b, dtype bdt,
                            cuda_act act);
/* Called once from cuda_ctx_new: raises the shared-memory limits of the
 * attention kernels (so that no attribute changes during graph capture). */
albedo_status cuda_attention_init(cuda_ctx *c);

static inline int is_aligned(const void *p, size_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

/* Launch kern<<<grid, block, smem, c->stream>>>(args...), with programmatic
 * dependent launch when c->pdl: the next kernel may start while this one
 * finishes, and waits in pdl_wait() for it to complete (and its writes to
 * be visible) before touching memory. Every kernel of this backend calls
 * pdl_trigger(); pdl_wait(); before its first access to an activation, so
 * chains of small decode kernels overlap their launch and ramp-up. */
template <typename... KArgs, typename... Args>
static inline cudaError_t launch_k(cuda_ctx *c, void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem,
                                   Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = c->stream;
    cudaLaunchAttribute attr[1] = {};
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = c->pdl;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kern, ((KArgs)args)...);
}

/* ---- device helpers ------------------------------------------------------ */

/* Programmatic dependent launch (no-ops before sm_90, or when the kernel
 * was launched without the attribute). */
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16_rn(v); }

/* Element i of a bf16 or f32 parameter vector (is_f32 says which). */
__device__ __forceinline__ float ld_param(const void *p, int is_f32, long i) {
    return is_f32 ? ((const float *)p)[i] : __bfloat162float(((const bf16 *)p)[i]);
}

/* The 8 bf16 of a 16-byte word as floats. */
__device__ __forceinline__ void bf16x8_to_f(const uint4 u, float f[8]) {
    const __nv_bfloat162 *h = (const __nv_bfloat162 *)&u;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __bfloat1622float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

/* The 8 e4m3 bytes of an 8-byte word as floats (exact: through half pairs;
 * one conversion instruction per pair on sm_89+). */
__device__ __forceinline__ void fp8x8_to_f(const uint2 u, float f[8]) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const unsigned w = i < 2 ? u.x : u.y;
        const __half2_raw hr =
            __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)((w >> (16 * (i & 1))) & 0xffffu), __NV_E4M3);
        const float2 v = __half22float2(__half2(hr));
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

/* The same as 8 bf16 in a 16-byte word (exact: e4m3 fits bf16). */
__device__ __forceinline__ uint4 fp8x8_to_bf16x8(const uint2 u) {
    float f[8];
    fp8x8_to_f(u, f);
    uint4 r;
    __nv_bfloat162 *h = (__nv_bfloat162 *)&r;
#pragma unroll
    for (int i = 0; i < 4; i++) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return r;
}

__device__ __forceinline__ float gelu_tanh_f(float v) {
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * v * (1.0f + tanhf(k * (v + 0.044715f * v * v * v)));
}

__device__ __forceinline__ float gelu_erf_f(float v) { return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Block-wide sum / max for blockDim.x a multiple of 32 (<= 1024); every
 * thread gets the result. red is __shared__ float[32]; the function
 * synchronises before reusing it, so back-to-back calls are safe. */
__device__ __forceinline__ float block_sum(float v, float *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); /* red may still be read by a previous call */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : -INFINITY;
    return warp_max(v);
}

#endif
