/*
 * attention.cu — softmax(mask(q·kᵀ·scale))·v for bf16 q/k/v (ops_cuda.h,
 * cuda_attention), in two kernels:
 *
 *   flash_attn_kernel (T > 8: vision crops, prefill), FlashAttention-2
 *   style on mma.sync (m16n8k16, bf16 in, fp32 accumulate; sm_80+). One
 *   block = 64 query rows of one head of one sequence, 4 warps of 16 rows
 *   each. Key/value tiles of 64 rows are copied into shared memory with
 *   cp.async, tile i+1 while tile i is computed. Each warp keeps its Q
 *   fragments, its 16×64 score tile S, and its 16×DP output O in
 *   registers: S = Q·Kᵀ (K fragments by ldmatrix), masking and the online
 *   softmax on the accumulators (a row's running max m and sum l; a quad
 *   of lanes shares a row), P rounded to bf16 and reused in place as the A
 *   operand of O += P·V (V fragments by ldmatrix.trans). Nothing goes back
 *   through shared memory. The head dimension is padded with zeros to DP,
 *   a multiple of 16 (72 -> 80). Only key tiles that some row of the block
 *   can see are visited.
 *
 *     Qs [64][DP+8] bf16   Ks, Vs [2][64][DP+8]
 *   (rows padded by 16 bytes: ldmatrix rows land in distinct banks).
 *
 *   attn_decode_kernel (T <= 8: decode). Flash-decoding: the visible keys
 *   are cut into chunks (128 keys, a 32-key tile per warp, while that
 *   leaves at most ~8 blocks per SM; at least ~2 blocks per SM); each warp
 *   scores its tiles (one key per lane, 16-byte loads), keeps its own
 *   online softmax with shuffles and sums P·V with 8 dims per lane, with no
 *   block barrier; one barrier merges the warps, and the block writes
 *   (m, l, o) to scratch. The last block of a (row, head) to finish — an
 *   arrival counter — merges the chunks and resets the counter, so the
 *   whole op is one launch and graph replays need no memset. Keys before
 *   the step's first position are loaded before the PDL wait.
 */
#include "cuda_internal.cuh"

#define LOG2E 1.4426950408889634f

/* Whether query position p sees key j (ops.h, op_attn). */
__device__ __forceinline__ bool visible(int p, int j, int n_prefix) { return j <= p || (p < n_prefix && j < n_prefix); }

/* One past the last key that query position p may see. */
__device__ __forceinline__ int key_end(int p, int n_prefix, int S) {
    const int e = p < n_prefix ? (n_prefix > p + 1 ? n_prefix : p + 1) : p + 1;
    return e < S ? e : S;
}

/* ---- flash attention (tensor cores) ------------------------------------------ */

#define FA_BQ 64
#define FA_BK 64
#define FA_WARPS 4

template <int DP> struct fa_shape {
    static constexpr int LDK = DP + 8; /* Q/K/V smem row, bf16 */
    static constexpr size_t bytes = (size_t)5 * 64 * LDK * 2;
};

/* 16-byte asynchronous copy global -> shared (sm_80+); src_bytes 0 writes
 * zeros and reads nothing. */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes) {
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(sa), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/* Start copying rows [r0, r0 + 64) of a [rows, D] bf16 matrix (row stride
 * ld) into smem [64][LDK], zero-filling columns D..DP-1 and rows >= n_rows. */
/* Cache row of key j: through the block table bt when paged. */
__device__ __forceinline__ long key_row(const int32_t *bt, int bs, int j) {
    return bt ? (long)bt[j / bs] * bs + j % bs : (long)j;
}

/* A cache's element type: bf16, or e4m3 bytes (F8); C is 8 elements'
 * worth of bits, ld loads them through the read-only path, cvt widens
 * them to floats. */
template <bool F8> struct kvt;
template <> struct kvt<false> {
    typedef bf16 T;
    typedef uint4 C;
    static __device__ __forceinline__ C ld(const T *p) { return __ldg((const uint4 *)p); }
    static __device__ __forceinline__ C zero() { return make_uint4(0, 0, 0, 0); }
    static __device__ __forceinline__ void cvt(const C c, float f[8]) { bf16x8_to_f(c, f); }
};
template <> struct kvt<true> {
    typedef uint8_t T;
    typedef uint2 C;
    static __device__ __forceinline__ C ld(const T *p) { return __ldg((const uint2 *)p); }
    static __device__ __forceinline__ C zero() { return make_uint2(0, 0); }
    static __device__ __forceinline__ void cvt(const C c, float f[8]) { fp8x8_to_f(c, f); }
};

/* The e4m3 form of fa_load_tile_async: 8 bytes a load, widened to bf16
 * (exactly) into the tile. Synchronous: the conversion needs the data in
 * registers, so the next tile's loads no longer overlap this tile's math
 * (docs/CUDA.md, FP8 KV cache). */
template <int DP>
__device__ __forceinline__ void fa_load_tile_f8(bf16 *dst, const uint8_t *src, long ld, int r0, int n_rows, int D,
                                                const int32_t *bt, int bs) {
    constexpr int LDK = fa_shape<DP>::LDK, CH = DP / 8;
    for (int idx = threadIdx.x; idx < 64 * CH; idx += blockDim.x) {
        const int r = idx / CH, ch = idx % CH;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < n_rows && ch * 8 < D)
            v = fp8x8_to_bf16x8(__ldg((const uint2 *)(src + key_row(bt, bs, r0 + r) * ld + ch * 8)));
        *(uint4 *)(dst + r * LDK + ch * 8) = v;
    }
}

template <int DP>
__device__ __forceinline__ void fa_load_tile_async(bf16 *dst, const bf16 *src, long ld, int r0, int n_rows, int D,
                                                   const int32_t *bt = nullptr, int bs = 1) {
    constexpr int LDK = fa_shape<DP>::LDK, CH = DP / 8;
    for (int idx = threadIdx.x; idx < 64 * CH; idx += blockDim.x) {
        const int r = idx / CH, ch = idx % CH;
        const bool in = r0 + r < n_rows && ch * 8 < D;
        cp_async16(dst + r * LDK + ch * 8, in ? src + key_row(bt, bs, r0 + r) * ld + ch * 8 : src, in ? 16 : 0);
    }
}

/* Copy rows [r0, r0 + 64) of a [rows, D] bf16 matrix (row stride ld) into
 * smem [64][LDK], zero-filling columns D..DP-1 and rows >= n_rows. */
template <int DP>
__device__ __forceinline__ void fa_load_tile(bf16 *dst, const bf16 *src, long ld, int r0, int n_rows, int D) {
    constexpr int LDK = fa_shape<DP>::LDK, CH = DP / 8;
    for (int idx = threadIdx.x; idx < 64 * CH; idx += blockDim.x) {
        const int r = idx / CH, ch = idx % CH;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < n_rows && ch * 8 < D) v = *(const uint4 *)(src + (long)(r0 + r) * ld + ch * 8);
        *(uint4 *)(dst + r * LDK + ch * 8) = v;
    }
}

__device__ __forceinline__ unsigned smem_u32(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x2(uint32_t &r0, uint32_t &r1, const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

/* c += a·b on the tensor cores: a 16×16 (row), b 16×8 (col), c 16×8 f32.
 * Lane (g = lane/4, t = lane%4) holds a: (g, 2t..2t+1), (g+8, ..),
 * (g, 2t+8..), (g+8, 2t+8..); b: (2t..2t+1, g), (2t+8.., g); c: (g, 2t),
 * (g, 2t+1), (g+8, 2t), (g+8, 2t+1). */
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&v;
}

/* PG: the segment / paged forms (cuda_attn.seg, .blocks). A separate
 * instance, because their bookkeeping in registers took the plain form
 * from 127 to 130 registers, 3 blocks an SM instead of 4 (vision attention
 * 4.5 → 5.4 ms on an H100); without PG the shape comes from the kernel
 * parameters as before. */
template <int DP, bool PG, bool F8 = false>
__global__ void __launch_bounds__(FA_WARPS * 32) flash_attn_kernel(cuda_attn a, float scale_log2) {
    pdl_trigger();
    pdl_wait();
    constexpr int LDK = fa_shape<DP>::LDK, KS = DP / 16, NT = FA_BK / 8, OT = DP / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Qs = (bf16 *)smem;
    bf16 *Ks = Qs + 64 * LDK; /* two buffers: tile i+1 loads while tile i computes */
    bf16 *Vs = Ks + 2 * 64 * LDK;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int q0 = blockIdx.x * FA_BQ, h = blockIdx.y, s = blockIdx.z;
    const int hk = h / (a.H / a.Hkv);
    /* This sequence's rows, positions and keys (segments: its own). */
    int T = a.T, pos0 = a.pos0, n_prefix = a.n_prefix, S = a.S;
    long qs = s * a.q_seq, os = s * a.o_seq, ks = s * a.k_seq, vs = s * a.v_seq;
    if (PG && a.seg) {
        const int *sg = a.seg + 4 * s;
        T = sg[1], pos0 = sg[2], n_prefix = sg[3], S = pos0 + T;
        qs = (long)sg[0] * a.ldq, os = (long)sg[0] * a.ldo;
    }
    if (PG && a.blocks) ks = vs = 0;
    if (PG && q0 >= T) return; /* a shorter segment than the launch's longest */
    const int32_t *bt = PG && a.blocks ? a.blocks + (long)s * a.blocks_ld : nullptr;
    const int bs = PG && a.blocks ? a.block_size : 1;
    const bf16 *q = (const bf16 *)a.q + qs + (long)h * a.D;
    typedef typename kvt<F8>::T KT;
    const KT *k = (const KT *)a.k + ks + (long)hk * a.k_head;
    const KT *v = (const KT *)a.v + vs + (long)hk * a.v_head;

    /* The last row of the block sees the furthest key. */
    const int last = (q0 + FA_BQ < T ? q0 + FA_BQ : T) - 1;
    const int kend = key_end(pos0 + last, n_prefix, S);
    const int n_tiles = (kend + FA_BK - 1) / FA_BK;

    if constexpr (F8) {
        fa_load_tile_f8<DP>(Ks, k, a.ldk, 0, kend, a.D, bt, bs);
        fa_load_tile_f8<DP>(Vs, v, a.ldv, 0, kend, a.D, bt, bs);
    } else {
        fa_load_tile_async<DP>(Ks, k, a.ldk, 0, kend, a.D, bt, bs);
        fa_load_tile_async<DP>(Vs, v, a.ldv, 0, kend, a.D, bt, bs);
        cp_async_commit();
    }
    fa_load_tile<DP>(Qs, q + (long)q0 * a.ldq, a.ldq, 0, T - q0, a.D);
    __syncthreads();

    /* This warp's Q fragments (rows warp·16 .. +15), kept for every tile. */
    uint32_t qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) ldsm_x4(qf[kk], Qs + (warp * 16 + (lane & 15)) * LDK + kk * 16 + (lane >> 4) * 8);

    /* This lane's two rows (g and g + 8 of the warp's 16) and their state. */
    const int p0 = pos0 + q0 + warp * 16 + g, p1 = p0 + 8;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    float o[OT][4];
#pragma unroll
    for (int i = 0; i < OT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

    for (int it = 0; it < n_tiles; it++) {
        const int j0 = it * FA_BK;
        const bf16 *Kb = Ks + (it & 1) * 64 * LDK, *Vb = Vs + (it & 1) * 64 * LDK;
        if constexpr (F8) {
            /* Tile it was stored by the loop before (or the prologue); tile
             * it+1 goes into the other buffer after this tile's math. */
        } else if (it + 1 < n_tiles) {
            /* The other buffer was released by the barrier ending the last tile. */
            fa_load_tile_async<DP>(Ks + ((it + 1) & 1) * 64 * LDK, k, a.ldk, j0 + FA_BK, kend, a.D, bt, bs);
            fa_load_tile_async<DP>(Vs + ((it + 1) & 1) * 64 * LDK, v, a.ldv, j0 + FA_BK, kend, a.D, bt, bs);
            cp_async_commit();
            cp_async_wait<1>(); /* this thread's copies of tile it have landed */
        } else {
            cp_async_wait<0>();
        }
        __syncthreads(); /* ... and every thread's */

        /* S = Q·Kᵀ: 16 rows × 64 keys, NT tiles of 8 keys. */
        float sc[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                uint32_t b0, b1;
                ldsm_x2(b0, b1, Kb + (nt * 8 + (lane & 7)) * LDK + kk * 16 + ((lane >> 3) & 1) * 8);
                mma16816(sc[nt], qf[kk], b0, b1);
            }
        }

        /* Mask, scale (log2 domain), row maxima over the quad. A tile that
         * every row of the block sees whole (all of vision's but the last;
         * a prefix's below the diagonal) skips the mask. */
        float mx0 = -INFINITY, mx1 = -INFINITY;
        const int jl = j0 + FA_BK - 1;
        const bool whole = jl < kend && (jl <= pos0 + q0 || (pos0 + last < n_prefix && jl < n_prefix));
        if (whole) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    sc[nt][e] *= scale_log2;
                    sc[nt][2 + e] *= scale_log2;
                    mx0 = fmaxf(mx0, sc[nt][e]);
                    mx1 = fmaxf(mx1, sc[nt][2 + e]);
                }
        } else {
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int j = j0 + nt * 8 + 2 * t4 + e;
                    const bool in = j < kend;
                    sc[nt][e] = in && visible(p0, j, n_prefix) ? sc[nt][e] * scale_log2 : -INFINITY;
                    sc[nt][2 + e] = in && visible(p1, j, n_prefix) ? sc[nt][2 + e] * scale_log2 : -INFINITY;
                    mx0 = fmaxf(mx0, sc[nt][e]);
                    mx1 = fmaxf(mx1, sc[nt][2 + e]);
                }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        /* A row that has seen no key yet keeps m = -inf and o = l = 0. */
        const float b0s = mn0 == -INFINITY ? 0.0f : mn0, b1s = mn1 == -INFINITY ? 0.0f : mn1;
        const float al0 = exp2f(m0 - b0s), al1 = exp2f(m1 - b1s);
        m0 = mn0, m1 = mn1;

        /* P = 2^(S - m), rounded to bf16 straight into A fragments: score
         * tiles 2c and 2c+1 are the 16 keys of chunk c. */
        uint32_t pa[NT / 2][4];
        float ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const float x0 = exp2f(sc[nt][0] - b0s), x1 = exp2f(sc[nt][1] - b0s);
            const float y0 = exp2f(sc[nt][2] - b1s), y1 = exp2f(sc[nt][3] - b1s);
            ls0 += x0 + x1;
            ls1 += y0 + y1;
            pa[nt / 2][(nt & 1) * 2 + 0] = pack_bf16(x0, x1);
            pa[nt / 2][(nt & 1) * 2 + 1] = pack_bf16(y0, y1);
        }
        l0 = l0 * al0 + ls0;
        l1 = l1 * al1 + ls1;
#pragma unroll
        for (int i = 0; i < OT; i++) {
            o[i][0] *= al0, o[i][1] *= al0;
            o[i][2] *= al1, o[i][3] *= al1;
        }

        /* O += P·V: V fragments by transposing loads, two 8-dim tiles at once. */
#pragma unroll
        for (int c = 0; c < NT / 2; c++)
#pragma unroll
            for (int ot = 0; ot < OT; ot += 2) {
                uint32_t vb[4];
                ldsm_x4_t(vb, Vb + (c * 16 + (lane & 15)) * LDK + (ot + (lane >> 4)) * 8);
                mma16816(o[ot], pa[c], vb[0], vb[1]);
                mma16816(o[ot + 1], pa[c], vb[2], vb[3]);
            }
        if constexpr (F8) {
            /* The other buffer was released by the barrier that began this tile. */
            if (it + 1 < n_tiles) {
                fa_load_tile_f8<DP>(Ks + ((it + 1) & 1) * 64 * LDK, k, a.ldk, j0 + FA_BK, kend, a.D, bt, bs);
                fa_load_tile_f8<DP>(Vs + ((it + 1) & 1) * 64 * LDK, v, a.ldv, j0 + FA_BK, kend, a.D, bt, bs);
            }
        }
        __syncthreads(); /* every warp is done with this K/V buffer */
    }

    /* Row sums over the quad, then the two rows' outputs. */
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const int t0 = q0 + warp * 16 + g, t1 = t0 + 8;
    bf16 *out = (bf16 *)a.out + os + (long)h * a.D;
    if constexpr (F8) { /* the values' scale, once per row */
        l0 /= a.v_scale;
        l1 /= a.v_scale;
    }
#pragma unroll
    for (int i = 0; i < OT; i++) {
        const int d = i * 8 + 2 * t4;
        if (d >= a.D) continue; /* D is a multiple of 8: both columns or neither */
        if (t0 < T) *(__nv_bfloat162 *)(out + (long)t0 * a.ldo + d) = __floats2bfloat162_rn(o[i][0] / l0, o[i][1] / l0);
        if (t1 < T) *(__nv_bfloat162 *)(out + (long)t1 * a.ldo + d) = __floats2bfloat162_rn(o[i][2] / l1, o[i][3] / l1);
    }
}

/* ---- split-key decode attention ------------------------------------------------- */

#define DEC_WARPS 4
#define DEC_THREADS (DEC_WARPS * 32)
#define DEC_TILE 32       /* keys a warp takes at once: one per lane for the scores */
#define DEC_KP 8          /* K pieces (8 dims each) a lane holds at once: 64 dims */
#define DEC_VP 8          /* V pieces a lane holds at once */
#define DEC_MERGE 8       /* chunk partials the merging block loads at once */
#define DEC_KEYS_PREF 128 /* keys a block prefers: one tile per warp */

__device__ __forceinline__ void prefetch_l2(const void *p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

/* One block = one chunk of keys of one (query row, head); each warp walks
 * its 32-key tiles with its own online softmax, so no block barrier sits
 * between the scores, the softmax and P·V:
 *
 *   scores   lane = key: its whole K row (up to 64 dims a batch), dot with
 *            q from this warp's shared copy; the tile's max by shuffles.
 *   P·V      lane = (8-dim group dg, key slot ks): ng = D/8 groups and
 *            32/ng slots; a lane sums the keys ks, ks + slots, ... of the
 *            tile over its 8 dims, each key's weight shuffled from the lane
 *            that scored it.
 *
 * Before the PDL wait, each warp loads its first tile's K and V rows into
 * registers and asks L2 for the rest: every key before pos0 (the step's
 * first position) was written by an earlier step, so the loads overlap
 * the kernels still running ahead (rope_kv, the qkv GEMV). Keys from pos0
 * on (this step's rope writes) and q are read after the wait. Then one
 * barrier merges the warps (m, l, o) in shared memory; with several
 * chunks each block writes its partial and the last to arrive (an
 * arrival counter, reset by that block) merges them, one load of all
 * chunks per output dim. Scores are in log2 units (scale_log2). */
template <bool F8>
__global__ void __launch_bounds__(DEC_THREADS, 4)
    attn_decode_kernel(cuda_attn a, float scale_log2, int chunk, int n_chunks, float *part, int *count) {
    typedef kvt<F8> K8;
    typedef typename K8::T KT;
    typedef typename K8::C KC;
    __shared__ __align__(16) float qs[DEC_WARPS][128];
    __shared__ float acc_s[DEC_WARPS][256]; /* [warp][slot * D + d] */
    __shared__ float ml_s[DEC_WARPS][2];
    __shared__ int is_last;
    pdl_trigger();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
    const int ci = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    const int s = z / a.T, t = z % a.T;
    const int g = h / (a.H / a.Hkv);
    const int D = a.D;
    /* Positions, segments and block tables were uploaded before the step's
     * first kernel, so they may be read before the wait. With a device
     * position (graph replay) or segments, the keys visible now are spread
     * over the launch's n_chunks blocks: chunks of at most the launch's
     * chunk (sized from the capacity a.S). */
    int pos0 = a.pos_dev ? *a.pos_dev : a.pos0, n_prefix = a.n_prefix, T = a.T;
    long qo = s * a.q_seq, os = s * a.o_seq, ks = s * a.k_seq, vs = s * a.v_seq;
    if (a.seg) {
        const int *sg = a.seg + 4 * s;
        T = sg[1], pos0 = sg[2], n_prefix = sg[3];
        qo = (long)sg[0] * a.ldq, os = (long)sg[0] * a.ldo;
    }
    /* Rows past a segment's own: every chunk of this (row, head) leaves
     * together, so the arrival count stays whole. */
    if (t >= T) return;
    if (a.blocks) ks = vs = 0;
    const int32_t *bt = a.blocks ? a.blocks + (long)s * a.blocks_ld : nullptr;
    const int bs = a.blocks ? a.block_size : 1;
    const int S = a.pos_dev || a.seg ? pos0 + T : a.S;
    if (a.pos_dev || a.seg) chunk = ((S + n_chunks - 1) / n_chunks + 31) / 32 * 32;
    const int p = pos0 + t;
    const int kend = key_end(p, n_prefix, S);
    const int j0 = ci * chunk, j1 = j0 + chunk < kend ? j0 + chunk : kend;
    const KT *k = (const KT *)a.k + ks + (long)g * a.k_head;
    const KT *v = (const KT *)a.v + vs + (long)g * a.v_head;

    const int ng = D / 8, nslot = 32 / ng, kpl = (32 + nslot - 1) / nslot;
    const int dg = lane % ng, ksl = lane / ng;
    const bool vlane = ksl < nslot;
    const int nk = ng < DEC_KP ? ng : DEC_KP;

    /* Before the wait: the first tile's old keys and values into registers,
     * the later tiles' old rows into L2. */
    const int jt0 = j0 + warp * DEC_TILE;
    KC kr[DEC_KP], vr[DEC_VP];
    {
        const int j = jt0 + lane;
        const bool ok = j < j1 && j < pos0;
        const KT *row = ok ? k + key_row(bt, bs, j) * a.ldk : k;
#pragma unroll
        for (int c = 0; c < DEC_KP; c++) kr[c] = ok && c < nk ? K8::ld(row + c * 8) : K8::zero();
#pragma unroll
        for (int u = 0; u < DEC_VP; u++) {
            const int jj = jt0 + ksl + u * nslot;
            vr[u] = vlane && u < kpl && jj < j1 && jj < pos0 ? K8::ld(v + key_row(bt, bs, jj) * a.ldv + dg * 8)
                                                             : K8::zero();
        }
        for (int jt = jt0 + DEC_WARPS * DEC_TILE; jt < j1; jt += DEC_WARPS * DEC_TILE) {
            const int jl = jt + lane;
            if (jl < j1 && jl < pos0) {
                const long r = key_row(bt, bs, jl);
                for (int b = 0; b < D * (int)sizeof(KT); b += 128) {
                    prefetch_l2((const char *)(k + r * a.ldk) + b);
                    prefetch_l2((const char *)(v + r * a.ldv) + b);
                }
            }
        }
    }
    pdl_wait();

    /* q (rotated by the step's rope) into this warp's copy. */
    const bf16 *q = (const bf16 *)a.q + qo + (long)t * a.ldq + (long)h * D;
    for (int d = 2 * lane; d < D; d += 64) {
        const float2 f = __bfloat1622float2(*(const __nv_bfloat162 *)(q + d));
        qs[warp][d] = f.x, qs[warp][d + 1] = f.y;
    }
    __syncwarp();

    /* The first tile's new keys and values (from pos0 on: this step's). */
    {
        const int j = jt0 + lane;
        if (j < j1 && j >= pos0) {
            const KT *row = k + key_row(bt, bs, j) * a.ldk;
#pragma unroll
            for (int c = 0; c < DEC_KP; c++)
                if (c < nk) kr[c] = K8::ld(row + c * 8);
        }
#pragma unroll
        for (int u = 0; u < DEC_VP; u++) {
            const int jj = jt0 + ksl + u * nslot;
            if (vlane && u < kpl && jj < j1 && jj >= pos0) vr[u] = K8::ld(v + key_row(bt, bs, jj) * a.ldv + dg * 8);
        }
    }

    float m = -INFINITY, l = 0.0f, acc[8];
#pragma unroll
    for (int e = 0; e < 8; e++) acc[e] = 0.0f;
    for (int jt = jt0; jt < j1; jt += DEC_WARPS * DEC_TILE) {
        const int j = jt + lane;
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < DEC_KP; c++) {
            if (c >= nk) break;
            float kf[8];
            K8::cvt(kr[c], kf);
            const float4 q0 = *(const float4 *)&qs[warp][c * 8], q1 = *(const float4 *)&qs[warp][c * 8 + 4];
            dot = fmaf(q0.x, kf[0], dot), dot = fmaf(q0.y, kf[1], dot), dot = fmaf(q0.z, kf[2], dot);
            dot = fmaf(q0.w, kf[3], dot), dot = fmaf(q1.x, kf[4], dot), dot = fmaf(q1.y, kf[5], dot);
            dot = fmaf(q1.z, kf[6], dot), dot = fmaf(q1.w, kf[7], dot);
        }
        /* Heads wider than 64: the rest of the row, 64 dims at a time. */
        for (int b8 = DEC_KP; b8 < ng; b8 += DEC_KP) {
            KC kx[DEC_KP];
            const KT *row = k + (j < j1 ? key_row(bt, bs, j) : 0) * a.ldk;
#pragma unroll
            for (int c = 0; c < DEC_KP; c++) kx[c] = j < j1 && b8 + c < ng ? K8::ld(row + (b8 + c) * 8) : K8::zero();
#pragma unroll
            for (int c = 0; c < DEC_KP; c++) {
                if (b8 + c >= ng) break;
                float kf[8];
                K8::cvt(kx[c], kf);
#pragma unroll
                for (int e = 0; e < 8; e++) dot = fmaf(qs[warp][(b8 + c) * 8 + e], kf[e], dot);
            }
        }
        /* Inside [0, kend) every key but a non-prefix future one is visible. */
        const float x = j < j1 && visible(p, j, n_prefix) ? dot * scale_log2 : -INFINITY;
        /* Online softmax over the warp's tiles: the tile's first key is
         * visible, so mn is finite. */
        const float mn = fmaxf(m, warp_max(x));
        const float alpha = exp2f(m - mn), pj = exp2f(x - mn);
        l = fmaf(l, alpha, pj);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] *= alpha;
        m = mn;
        /* P·V: the slot's keys in batches of DEC_VP values. */
#pragma unroll
        for (int u = 0; u < DEC_VP; u++) {
            if (u >= kpl) break;
            const int kk = ksl + u * nslot;
            const float w = __shfl_sync(0xffffffffu, pj, kk & 31);
            float vf[8];
            K8::cvt(vr[u], vf);
            if (vlane && kk < 32 && jt + kk < j1) {
#pragma unroll
                for (int e = 0; e < 8; e++) acc[e] = fmaf(w, vf[e], acc[e]);
            }
        }
        for (int u0 = DEC_VP; u0 < kpl; u0 += DEC_VP) { /* few dims a lane: more keys a slot */
            KC vx[DEC_VP];
#pragma unroll
            for (int u = 0; u < DEC_VP; u++) {
                const int kk = ksl + (u0 + u) * nslot;
                vx[u] = vlane && u0 + u < kpl && kk < 32 && jt + kk < j1
                            ? K8::ld(v + key_row(bt, bs, jt + kk) * a.ldv + dg * 8)
                            : K8::zero();
            }
#pragma unroll
            for (int u = 0; u < DEC_VP; u++) {
                if (u0 + u >= kpl) break;
                const int kk = ksl + (u0 + u) * nslot;
                const float w = __shfl_sync(0xffffffffu, pj, kk & 31);
                float vf[8];
                K8::cvt(vx[u], vf);
                if (vlane && kk < 32 && jt + kk < j1) {
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[e] = fmaf(w, vf[e], acc[e]);
                }
            }
        }
        /* The warp's next tile (long chunks: wide batches, deep contexts),
         * its rows already asked into L2 before the wait. */
        const int jt2 = jt + DEC_WARPS * DEC_TILE, jn = jt2 + lane;
        const KT *row = k + (jn < j1 ? key_row(bt, bs, jn) : 0) * a.ldk;
#pragma unroll
        for (int c = 0; c < DEC_KP; c++) kr[c] = jn < j1 && c < nk ? K8::ld(row + c * 8) : K8::zero();
#pragma unroll
        for (int u = 0; u < DEC_VP; u++) {
            const int jj = jt2 + ksl + u * nslot;
            vr[u] = vlane && u < kpl && jj < j1 ? K8::ld(v + key_row(bt, bs, jj) * a.ldv + dg * 8) : K8::zero();
        }
    }
    l = warp_sum(l);
    if (vlane) {
#pragma unroll
        for (int e = 0; e < 8; e++) acc_s[warp][ksl * D + dg * 8 + e] = acc[e];
    }
    if (lane == 0) ml_s[warp][0] = m, ml_s[warp][1] = l;
    __syncthreads();

    /* The block's (M, L, o): its warps' partials rescaled to the block max. */
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; w++) M = fmaxf(M, ml_s[w][0]);
    float L = 0.0f, o = 0.0f;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; w++) {
        const float mw = ml_s[w][0];
        if (mw == -INFINITY) continue;
        const float wt = exp2f(mw - M);
        L = fmaf(wt, ml_s[w][1], L);
        if (tid < D) {
            float ow = 0.0f;
            for (int sl = 0; sl < nslot; sl++) ow += acc_s[w][sl * D + tid];
            o = fmaf(wt, ow, o);
        }
    }
    const float vsc = F8 ? a.v_scale : 1.0f; /* the values' scale, applied once */
    bf16 *out = (bf16 *)a.out + os + (long)t * a.ldo + (long)h * D;
    if (n_chunks == 1) {
        if (tid < D) out[tid] = __float2bfloat16_rn(o / L * vsc);
        return;
    }
    const long base = ((long)z * a.H + h) * n_chunks;
    float *mine = part + (base + ci) * ATTN_DSTRIDE;
    if (tid < D) mine[tid] = o;
    if (tid == 0) mine[128] = M, mine[129] = L;

    /* The last block of this (row, head) merges the chunks. */
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(&count[z * a.H + h], 1) == n_chunks - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    if (tid < D) {
        const float *pp = part + base * ATTN_DSTRIDE;
        float Mx = -INFINITY, num = 0.0f, den = 0.0f;
        for (int c0 = 0; c0 < n_chunks; c0 += DEC_MERGE) {
            float mc[DEC_MERGE], lc[DEC_MERGE], oc[DEC_MERGE];
#pragma unroll
            for (int u = 0; u < DEC_MERGE; u++) {
                const float *pc = pp + (long)(c0 + u) * ATTN_DSTRIDE;
                const bool in = c0 + u < n_chunks;
                mc[u] = in ? __ldcg(pc + 128) : -INFINITY;
                lc[u] = in ? __ldcg(pc + 129) : 0.0f;
                oc[u] = in ? __ldcg(pc + tid) : 0.0f;
            }
            float bm = Mx;
#pragma unroll
            for (int u = 0; u < DEC_MERGE; u++) bm = fmaxf(bm, mc[u]);
            if (bm == -INFINITY) continue;
            const float r = exp2f(Mx - bm);
            num *= r, den *= r;
#pragma unroll
            for (int u = 0; u < DEC_MERGE; u++) {
                const float wt = exp2f(mc[u] - bm); /* 0 for an empty chunk (-inf) */
                num = fmaf(wt, oc[u], num);
                den = fmaf(wt, lc[u], den);
            }
            Mx = bm;
        }
        out[tid] = __float2bfloat16_rn(num / den * vsc);
    }
    if (tid == 0) count[z * a.H + h] = 0;
}

/* ---- launcher ---------------------------------------------------------------------- */

#define FA_INSTANCES(X) X(64) X(80) X(96) X(128)

albedo_status cuda_attention_init(cuda_ctx *c) {
#define FA_ATTR(DP)                                                                                                \
    CU_TRY(c, cudaFuncSetAttribute(flash_attn_kernel<DP, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,      \
                                   (int)fa_shape<DP>::bytes));                                                     \
    CU_TRY(c, cudaFuncSetAttribute(flash_attn_kernel<DP, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,       \
                                   (int)fa_shape<DP>::bytes));                                                     \
    CU_TRY(c, cudaFuncSetAttribute(flash_attn_kernel<DP, true, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                   (int)fa_shape<DP>::bytes));
    FA_INSTANCES(FA_ATTR)
#undef FA_ATTR
    return ALBEDO_OK;
}

static int aligned8(long v) { return v % 8 == 0; }

albedo_status cuda_attention(cuda_ctx *c, const cuda_attn *a) {
    CU_ARG(c, a->T >= 0 && a->S >= 1 && a->n_seq >= 0 && a->pos0 >= 0);
    CU_ARG(c, a->H > 0 && a->Hkv > 0 && a->H % a->Hkv == 0);
    CU_ARG(c, a->D > 0 && a->D % 8 == 0 && a->D <= 128);
    CU_ARG(c, is_aligned(a->q, 16) && is_aligned(a->k, 16) && is_aligned(a->v, 16));
    CU_ARG(c, aligned8(a->ldq) && aligned8(a->q_seq) && aligned8(a->ldk) && aligned8(a->k_head) && aligned8(a->k_seq) &&
                  aligned8(a->ldv) && aligned8(a->v_head) && aligned8(a->v_seq));
    CU_ARG(c, !a->blocks || (a->block_size > 0 && a->blocks_ld > 0));
    CU_ARG(c, !(a->seg && a->pos_dev));
    CU_ARG(c, !a->kv_fp8 || (a->k_scale > 0.0f && a->v_scale > 0.0f && isfinite(a->k_scale) && isfinite(a->v_scale)));
    if (a->T == 0 || a->n_seq == 0) return ALBEDO_OK;
    /* e4m3 keys: their scale joins the softmax's. */
    const float sl2 = a->scale * LOG2E * (a->kv_fp8 ? a->k_scale : 1.0f);

    if (a->T > 8) {
        CU_ARG(c, !a->pos_dev);
        CU_ARG(c, is_aligned(a->out, 4) && a->ldo % 2 == 0 && a->o_seq % 2 == 0); /* bf16 pairs are stored */
        CU_ARG(c, a->n_seq <= 65535 && a->H <= 65535);
        const dim3 grid((a->T + FA_BQ - 1) / FA_BQ, a->H, a->n_seq), block(FA_WARPS * 32);
#define FA_CASE(DP)                                                                                                    \
    if (a->D <= DP) {                                                                                                  \
        if (a->kv_fp8) /* the segment form's instance covers the plain layout too */                                   \
            CU_TRY(c, (launch_k(c, flash_attn_kernel<DP, true, true>, dim3(grid), dim3(block), fa_shape<DP>::bytes,    \
                                *a, sl2)));                                                                            \
        else if (a->seg || a->blocks)                                                                                  \
            CU_TRY(c,                                                                                                  \
                   (launch_k(c, flash_attn_kernel<DP, true>, dim3(grid), dim3(block), fa_shape<DP>::bytes, *a, sl2))); \
        else                                                                                                           \
            CU_TRY(c, (launch_k(c, flash_attn_kernel<DP, false>, dim3(grid), dim3(block), fa_shape<DP>::bytes, *a,     \
                                sl2)));                                                                                \
        CU_LAUNCHED(c);                                                                                                \
        return ALBEDO_OK;                                                                                              \
    }
        FA_INSTANCES(FA_CASE)
#undef FA_CASE
        return cuda_fail(c, ALBEDO_ERR_INTERNAL, "cuda_attention: no kernel for D=%d", a->D);
    }

    /* Decode: chunks of DEC_KEYS_PREF keys (a tile per warp) while that
     * makes at most ~8 blocks per SM; at least ~2 blocks per SM; multiples
     * of 32 keys; within the partial-result scratch. */
    const long rows = (long)a->n_seq * a->T * a->H;
    CU_ARG(c, (long)a->n_seq * a->T <= 65535);
    const int kmax = a->S; /* no row sees past key S-1 (with pos_dev: the capacity) */
    const long fill = (2L * c->n_sm + rows - 1) / rows, most = (8L * c->n_sm + rows - 1) / rows;
    long n = (kmax + DEC_KEYS_PREF - 1) / DEC_KEYS_PREF;
    if (n > most) n = most;
    if (n < fill) n = fill;
    if (n > ATTN_SLOTS / rows) n = ATTN_SLOTS / rows;
    if (n > (kmax + 31) / 32) n = (kmax + 31) / 32;
    if (n < 1) n = 1;
    const int chunk = (int)((kmax + n - 1) / n + 31) / 32 * 32;
    const int n_chunks = (kmax + chunk - 1) / chunk;
    if (rows * n_chunks > ATTN_SLOTS)
        return cuda_fail(c, ALBEDO_ERR_LIMIT, "cuda_attention: %ld query rows × heads × %d key chunks exceed %d slots",
                         rows, n_chunks, ATTN_SLOTS);
    const dim3 grid(n_chunks, a->H, a->n_seq * a->T);
    if (a->kv_fp8)
        CU_TRY(c, (launch_k(c, attn_decode_kernel<true>, dim3(grid), dim3(DEC_THREADS), 0, *a, sl2, chunk, n_chunks,
                            c->attn_part, c->attn_count)));
    else
        CU_TRY(c, (launch_k(c, attn_decode_kernel<false>, dim3(grid), dim3(DEC_THREADS), 0, *a, sl2, chunk, n_chunks,
                            c->attn_part, c->attn_count)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}
