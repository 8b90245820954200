/*
 * wgmma.cuh — the sm_90a warpgroup MMA (wgmma.mma_async) as the attention
 * kernels use it: S = Q·Kᵀ with A (64 rows × 16) and B both from shared
 * memory (m64n64k16), O += P·V with A from registers and B (V, transposed)
 * from shared memory (m64n72k16, m64n80k16); bf16 in, f32 accumulators. Only
 * code compiled for sm_90a may call these (__CUDA_ARCH_FEAT_SM90_ALL); see
 * attention.cu.
 *
 * Shared-memory layout, no swizzle: B is stored as "core matrices" of 8
 * rows × 16 bytes (8 bf16), each 128 contiguous bytes. The descriptor names
 * the first core matrix of the 16-wide K slice and two strides: LBO, from
 * one core matrix to the next along K, and SBO, from one to the next along
 * N. That holds for both B forms (checked on an H200 with a probe of every
 * shape used here): K-major (a core matrix's 16 bytes run along K; TB = 0)
 * and MN-major (they run along N; TB = 1, the transposed form).
 *
 * Accumulator layout (per warp w of the warpgroup, lane = 4g + t): d[4j],
 * d[4j+1] are row 16w + g, columns 8j + 2t, +1; d[4j+2], d[4j+3] the same
 * columns of row 16w + g + 8: mma.sync's m16n8 C layout, one 8-column
 * tile after another. A's four registers are mma.sync m16n8k16's A
 * fragment of the warp's 16 rows.
 */
#pragma once

#include <stdint.h>

/* A shared-memory matrix descriptor (no swizzle): start address, LBO (K
 * direction) and SBO (N direction) in bytes, all multiples of 16. */
__device__ __forceinline__ uint64_t wg_desc(const void *smem, unsigned lbo, unsigned sbo) {
    const uint64_t a = (uint64_t)(unsigned)__cvta_generic_to_shared(smem);
    return ((a & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}

/* Before the first wgmma of a batch whose registers other instructions wrote. */
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
/* Generic-proxy writes to shared memory (cp.async, stores) made visible to
 * the wgmma's async proxy: by the writing threads, before the barrier. */
__device__ __forceinline__ void wg_fence_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

/* Keeps the compiler from moving reads or writes of accumulator registers
 * across a wgmma's issue and wait (it sees the asm of the issue as the
 * writer; the wait is what makes the values real). */
template <int N> __device__ __forceinline__ void wg_hold(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}

/* d[36] (+)= a·b, m64n72k16, bf16 in, f32 accumulate; scale_d 0 overwrites d. */
template <int TB>
__device__ __forceinline__ void wgmma_m64n72k16(float (&d)[36], const uint32_t (&a)[4], uint64_t b, int scale_d) {
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %41, 0;\n\t"
                 "wgmma.mma_async.sync.aligned.m64n72k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, "
                 "%11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, "
                 "%31, %32, %33, %34, %35}, "
                 "{%36, %37, %38, %39}, %40, p, 1, 1, %42;\n\t}"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
                   "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
                   "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
}

/* d[40] (+)= a·b, m64n80k16, bf16 in, f32 accumulate; scale_d 0 overwrites d. */
template <int TB>
__device__ __forceinline__ void wgmma_m64n80k16(float (&d)[40], const uint32_t (&a)[4], uint64_t b, int scale_d) {
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %45, 0;\n\t"
                 "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, "
                 "%11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, "
                 "%31, %32, %33, %34, %35, %36, %37, %38, %39}, "
                 "{%40, %41, %42, %43}, %44, p, 1, 1, %46;\n\t}"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]),
                   "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),
                   "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),
                   "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TB));
}

/* d[32] (+)= a·b, m64n64k16, A and B both from shared memory (K-major, the
 * descriptors as above, SBO along M for A). */
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[32], uint64_t a, uint64_t b, int scale_d) {
    asm volatile(
        "{\n\t.reg .pred p;\n\tsetp.ne.b32 p, %34, 0;\n\t"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
        "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 0, 0;\n\t}"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(a), "l"(b), "r"(scale_d));
}
