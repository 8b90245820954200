/*
 * attention.cu — softmax(mask(q·kᵀ·scale))·v for bf16 q/k/v (ops_cuda.h,
 * cuda_attention), in two kernels and, on sm_90a, two more:
 *
 *   flash_attn_kernel (T > 8: vision crops, prefill), FlashAttention-2
 *   style on mma.sync (m16n8k16, bf16 in, fp32 accumulate; sm_80+). One
 *   block = 128 query rows of one head of one sequence, 8 warps of 16 rows
 *   each (64 rows as 4 warps for T <= 64, heads wider than 80 and cards
 *   other than sm_90; fa_geom, cuda_ctx_set_flash). Key/value tiles of 64 rows
 *   are copied into shared memory with cp.async into a ring of three
 *   buffers, two tiles ahead, one barrier a tile (two buffers and two
 *   barriers for 64-row blocks). Each warp keeps its Q fragments, its
 *   16×64 score tile S, and its 16×DP output O in registers: S = Q·Kᵀ (K
 *   fragments by ldmatrix), masking and the online softmax on the
 *   accumulators (raw scores; p = 2^(s·scale·log2e − m·scale·log2e), one
 *   FMA and one ex2 each; O rescaled only when a row's max moved), P
 *   rounded to bf16 and reused in place as the A operand of O += P·V (V
 *   fragments by ldmatrix.trans) and of l += P·1 (the row sums on the
 *   tensor cores). Nothing goes back through shared memory. The head
 *   dimension is padded with zeros to DP, a multiple of 8 (72 has its own
 *   instance: k = 8 MMAs for its last 8 dims and 9 output tiles, no
 *   padding), the next of 64, 72, 80, 96, 128. Only key tiles that some
 *   row of the block can see are visited.
 *
 *     Qs [BQ][LDK] bf16   Ks, Vs [3 or 2][64][LDK]
 *   (LDK = DP or DP + 8, an odd number of 16-byte units: the 8 rows of an
 *   ldmatrix land in distinct banks).
 *
 *   flash_wg_kernel and flash_wgp_kernel (sm_90a, T > 64, D of 64 or 72,
 *   bf16 caches): the same attention on the warpgroup MMA (wgmma.cuh), Q
 *   and K read by the tensor cores straight from shared memory; vision's D
 *   = 72 in blocks of two warpgroups, two blocks an SM; the text model's D =
 *   64 (prefix, prompts, the engine's segments and block tables) in blocks
 *   of three warpgroups that overlap each tile's softmax with the next
 *   tile's Q·Kᵀ. docs/CUDA.md, *wgmma attention*.
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
#include "wgmma.cuh"

#include <type_traits>

#define LOG2E 1.4426950408889634f

/* Whether query position p sees key j (ops.h, op_attn). */
__device__ __forceinline__ bool visible(int p, int j, int n_prefix) { return j <= p || (p < n_prefix && j < n_prefix); }

/* One past the last key that query position p may see. */
__device__ __forceinline__ int key_end(int p, int n_prefix, int S) {
    const int e = p < n_prefix ? (n_prefix > p + 1 ? n_prefix : p + 1) : p + 1;
    return e < S ? e : S;
}

/* ---- flash attention (tensor cores) ------------------------------------------ */

#define FA_BK 64 /* keys a tile */

/* Shared-memory rows of DP bf16 (DP a multiple of 8): an odd number of
 * 16-byte units, so that the 8 rows one ldmatrix reads fall in distinct
 * banks (72 needs no padding, 64 and 80 take 8 more). */
template <int DP> struct fa_shape {
    static constexpr int LDK = (DP / 8) % 2 ? DP : DP + 8;
    /* K/V buffers: three for blocks of 128 rows and more (one barrier a
     * tile, loads two tiles ahead), two below (the 64-row blocks keep their
     * 4 blocks an SM). */
    static constexpr __host__ __device__ int stages(int bq) { return bq >= 128 ? 3 : 2; }
    /* Q [BQ][LDK], K and V [stages][64][LDK] */
    static constexpr size_t bytes(int bq) { return (size_t)(bq + 2 * stages(bq) * FA_BK) * LDK * 2; }
};

/* 16-byte asynchronous copy global -> shared (sm_80+); src_bytes 0 writes
 * zeros and reads nothing. */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes) {
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(sa), "l"(gmem), "r"(src_bytes) : "memory");
}
/* The same with a predicate: !in writes zeros and leaves gmem untouched
 * (ignore-src), so gmem may point past the matrix. */
__device__ __forceinline__ void cp_async16_if(void *smem, const void *gmem, bool in) {
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("{\n\t.reg .pred p;\n\tsetp.eq.u32 p, %2, 0;\n\t"
                 "cp.async.cg.shared.global [%0], [%1], 16, p;\n\t}" ::"r"(sa),
                 "l"(gmem), "r"((unsigned)in)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

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
    for (int idx = threadIdx.x; idx < FA_BK * CH; idx += blockDim.x) {
        const int r = idx / CH, ch = idx % CH;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < n_rows && ch * 8 < D)
            v = fp8x8_to_bf16x8(__ldg((const uint2 *)(src + key_row(bt, bs, r0 + r) * ld + ch * 8)));
        *(uint4 *)(dst + r * LDK + ch * 8) = v;
    }
}

/* A thread's part of the K/V tile copies in plain layouts (no block table),
 * tiles taken in order: CH 16-byte chunks a row, RP = THREADS / CH rows a
 * pass; thread t < RP·CH copies chunk t % CH of rows t / CH + RP·u, u <
 * PASSES, from pointers that step a tile at a time. A chunk costs a 64-bit
 * add, a compare and the copy (the per-chunk index arithmetic of
 * fa_load_tile_async was a third of the loop's instructions). */
template <int DP, int THREADS> struct fa_copier {
    static constexpr int LDK = fa_shape<DP>::LDK, CH = DP / 8, RP = THREADS / CH, PASSES = (FA_BK + RP - 1) / RP;
    int row, sm;         /* the first row (FA_BK: a spare thread, copies nothing); its smem offset */
    bool col_in;         /* the chunk holds data (else zeros: columns D..DP-1) */
    const bf16 *gk, *gv; /* the chunk in the next tile's first row of K and V */
    __device__ __forceinline__ fa_copier(const bf16 *k, long ldk, const bf16 *v, long ldv, int D) {
        const int t = threadIdx.x, col = t % CH;
        row = t < RP * CH ? t / CH : FA_BK;
        col_in = col * 8 < D;
        sm = row * LDK + col * 8;
        gk = k + (long)row * ldk + col * 8, gv = v + (long)row * ldv + col * 8;
    }
    /* Start copying the next tile's rows [r0, r0 + 64) of K and V (row
     * strides ldk, ldv) into dk, dv [64][LDK], zeros for columns D..DP-1
     * and rows >= n_rows. */
    __device__ __forceinline__ void next(bf16 *dk, bf16 *dv, long ldk, long ldv, int r0, int n_rows) {
        const bf16 *pk = gk, *pv = gv;
#pragma unroll
        for (int u = 0; u < PASSES; u++) {
            const int r = row + u * RP;
            if (r < FA_BK) {
                const bool in = col_in && r0 + r < n_rows;
                cp_async16_if(dk + sm + u * RP * LDK, pk, in);
                cp_async16_if(dv + sm + u * RP * LDK, pv, in);
            }
            pk += RP * ldk, pv += RP * ldv;
        }
        gk += FA_BK * ldk, gv += FA_BK * ldv;
    }
};

/* Start copying rows [r0, r0 + 64) of a [rows, D] bf16 matrix (row stride
 * ld; rows through the block table when paged) into smem [64][LDK],
 * zero-filling columns D..DP-1 and rows >= n_rows. */
template <int DP, int THREADS>
__device__ __forceinline__ void fa_load_tile_async(bf16 *dst, const bf16 *src, long ld, int r0, int n_rows, int D,
                                                   const int32_t *bt = nullptr, int bs = 1) {
    constexpr int LDK = fa_shape<DP>::LDK, CH = DP / 8, N = FA_BK * CH;
    const bf16 *tile = src + (long)r0 * ld; /* plain layout: the tile's first row */
#pragma unroll
    for (int u = 0; u < (N + THREADS - 1) / THREADS; u++) {
        const int idx = threadIdx.x + u * THREADS;
        if (N % THREADS == 0 || idx < N) {
            const int r = idx / CH, ch = idx % CH;
            const bool in = r0 + r < n_rows && ch * 8 < D;
            const bf16 *row = bt ? src + key_row(bt, bs, r0 + r) * ld : tile + r * ld;
            cp_async16(dst + r * LDK + ch * 8, in ? row + ch * 8 : src, in ? 16 : 0);
        }
    }
}

/* Copy rows [r0, r0 + ROWS) of a [rows, D] bf16 matrix (row stride ld) into
 * smem [ROWS][LDK], zero-filling columns D..DP-1 and rows >= n_rows. */
template <int DP, int ROWS>
__device__ __forceinline__ void fa_load_tile(bf16 *dst, const bf16 *src, long ld, int r0, int n_rows, int D) {
    constexpr int LDK = fa_shape<DP>::LDK, CH = DP / 8;
    for (int idx = threadIdx.x; idx < ROWS * CH; idx += blockDim.x) {
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
__device__ __forceinline__ void ldsm_x2(uint32_t r[2], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t r[2], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
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
/* The k = 8 form, for a head dimension's last 8 dims (72 = 4·16 + 8):
 * a 16×8: (g, 2t..2t+1), (g+8, ..); b 8×8: (2t..2t+1, g). */
__device__ __forceinline__ void mma1688(float c[4], const uint32_t a[2], uint32_t b) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5}, {%6}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&v;
}

/* 2^x on the special-function unit (exp2f adds a denormal fix-up that a
 * softmax weight below 2^-126 does not need; -inf gives 0). */
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* Block geometries: MS 16-row slabs a warp, NW warps, BQ = 16·MS·NW query
 * rows a block. The K/V tiles a block copies serve BQ queries, so 128 rows
 * halve the copies (L2 reads, cp.async work) of 64. Two slabs a warp (MS =
 * 2) let each K and V fragment loaded by ldmatrix feed two MMAs, but take
 * ~250 registers: 8 warps an SM instead of 16, and on the H100 that lost
 * more than the shared-memory reads gained (docs/CUDA.md); only MS = 1 is
 * instantiated now. */
/* The register bound below was measured on sm_90 only; other targets keep
 * the kernel's earlier unbounded form (ptxas then spills nothing at D = 72),
 * and their contexts default to the 64-row geometry (ctx.cu). */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ != 900
#define FA_MIN_BLOCKS(...) 1
#else
#define FA_MIN_BLOCKS(...) (__VA_ARGS__)
#endif

template <int MS, int NW, int DP> struct fa_geom {
    static constexpr int BQ = 16 * MS * NW, THREADS = 32 * NW;
    /* One slab: up to 128 registers, 16 warps an SM; two: 8. Heads wider
     * than 80 (one slab, 4 warps) get what they need, as before. */
    static constexpr int MIN_BLOCKS = DP > 80 ? 1 : (MS == 2 ? 8 : 16) / NW;
};

/* PG: the segment / paged forms (cuda_attn.seg, .blocks). A separate
 * instance, because their bookkeeping in registers cost the plain form its
 * occupancy (vision attention 4.5 → 5.4 ms on an H100 when they shared
 * one); without PG the shape comes from the kernel parameters. Under the
 * 128-register bound the PG forms spill a few bytes (4 to 40 at DP 64/72,
 * ptxas -v), the plain ones nothing. Scores stay raw (unscaled) until the
 * exponent: p = 2^(s·scale_log2 − m·scale_log2), one FMA and one ex2 a
 * score. */
template <int DP, bool PG, bool F8, int MS, int NW>
__global__ void __launch_bounds__(fa_geom<MS, NW, DP>::THREADS, FA_MIN_BLOCKS(fa_geom<MS, NW, DP>::MIN_BLOCKS))
    flash_attn_kernel(cuda_attn a, float scale_log2) {
    pdl_trigger();
    pdl_wait();
    constexpr int BQ = fa_geom<MS, NW, DP>::BQ;
    constexpr int LDK = fa_shape<DP>::LDK, KS = DP / 16, K8 = DP % 16 != 0, NT = FA_BK / 8, OT = DP / 8;
    constexpr int NB = fa_shape<DP>::stages(BQ);
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Qs = (bf16 *)smem;
    bf16 *Ks = Qs + BQ * LDK; /* NB buffers, a ring: later tiles load while tile i computes */
    bf16 *Vs = Ks + NB * FA_BK * LDK;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int q0 = blockIdx.x * BQ, h = blockIdx.y, s = blockIdx.z;
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
    const int last = (q0 + BQ < T ? q0 + BQ : T) - 1;
    const int kend = key_end(pos0 + last, n_prefix, S);
    const int n_tiles = (kend + FA_BK - 1) / FA_BK;

    /* Start copying K/V tile r0/64 into buffer b (bf16 caches; the
     * segment form, whose pool rows go through the block table, the
     * generic way). */
    fa_copier<DP, NW * 32> cp((const bf16 *)k, a.ldk, (const bf16 *)v, a.ldv, a.D);
    auto load_kv = [&](int b, int r0) {
        if constexpr (!F8) {
            if constexpr (PG) {
                fa_load_tile_async<DP, NW * 32>(Ks + b * FA_BK * LDK, k, a.ldk, r0, kend, a.D, bt, bs);
                fa_load_tile_async<DP, NW * 32>(Vs + b * FA_BK * LDK, v, a.ldv, r0, kend, a.D, bt, bs);
            } else {
                cp.next(Ks + b * FA_BK * LDK, Vs + b * FA_BK * LDK, a.ldk, a.ldv, r0, kend);
            }
            cp_async_commit();
        }
    };
    if constexpr (F8) {
        fa_load_tile_f8<DP>(Ks, k, a.ldk, 0, kend, a.D, bt, bs);
        fa_load_tile_f8<DP>(Vs, v, a.ldv, 0, kend, a.D, bt, bs);
    } else {
        load_kv(0, 0);
        if (NB == 3 && n_tiles > 1) load_kv(1, FA_BK);
    }
    fa_load_tile<DP, BQ>(Qs, q + (long)q0 * a.ldq, a.ldq, 0, T - q0, a.D);
    __syncthreads();

    /* This warp's Q fragments (slab ms: rows (warp·MS + ms)·16 .. +15),
     * kept for every tile; qh: the last 8 dims when DP is an odd multiple
     * of 8. */
    uint32_t qf[MS][KS][4], qh[MS][2];
#pragma unroll
    for (int ms = 0; ms < MS; ms++) {
        const bf16 *qrow = Qs + ((warp * MS + ms) * 16 + (lane & 15)) * LDK;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) ldsm_x4(qf[ms][kk], qrow + kk * 16 + (lane >> 4) * 8);
        if constexpr (K8) ldsm_x2(qh[ms], qrow + KS * 16);
    }

    /* This lane's rows: g and g + 8 of each slab, and their state: the
     * running max m in raw score units, the output O, and the row sums l
     * as one more 8-column tile of O, P times a tile of ones on the tensor
     * cores: every lane of a quad gets its rows' whole sum (of the bf16 P
     * that O sums too), with no adds or shuffles. */
    int p0[MS];
    float m0[MS], m1[MS];
    float o[MS][OT][4], l[MS][4];
#pragma unroll
    for (int ms = 0; ms < MS; ms++) {
        p0[ms] = pos0 + q0 + (warp * MS + ms) * 16 + g;
        m0[ms] = m1[ms] = -INFINITY;
        l[ms][0] = l[ms][1] = l[ms][2] = l[ms][3] = 0.0f;
#pragma unroll
        for (int i = 0; i < OT; i++) o[ms][i][0] = o[ms][i][1] = o[ms][i][2] = o[ms][i][3] = 0.0f;
    }
    const uint32_t ones = 0x3f803f80u; /* two bf16 1.0 */

    for (int it = 0, buf = 0; it < n_tiles; it++, buf = buf + 1 == NB ? 0 : buf + 1) {
        const int j0 = it * FA_BK;
        const bf16 *Kb = Ks + buf * FA_BK * LDK, *Vb = Vs + buf * FA_BK * LDK;
        if constexpr (F8) {
            /* Tile it was stored by the loop before (or the prologue); tile
             * it+1 goes into the next buffer after this tile's math. */
        } else if (NB == 2 && it + 1 < n_tiles) {
            /* The other buffer was released by the barrier ending the last tile. */
            load_kv(buf ^ 1, j0 + FA_BK);
            cp_async_wait<1>(); /* this thread's copies of tile it have landed */
        } else if (NB == 3 && it + 1 < n_tiles) {
            cp_async_wait<1>(); /* tile it+1 may still be in flight */
        } else {
            cp_async_wait<0>();
        }
        __syncthreads(); /* ... and every thread's; (NB = 3) every warp is done with tile it-1 */
        if constexpr (!F8 && NB == 3) {
            if (it + 2 < n_tiles) {
                /* Into tile it-1's buffer, released by the barrier above. */
                load_kv(buf == 0 ? 2 : buf - 1, j0 + 2 * FA_BK);
            }
        }

        /* S = Q·Kᵀ: per slab 16 rows × 64 keys, NT tiles of 8 keys. Each
         * ldmatrix.x4 brings two key tiles' fragments for 16 dims, used by
         * every slab. */
        float sc[MS][NT][4];
#pragma unroll
        for (int ms = 0; ms < MS; ms++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++) sc[ms][nt][0] = sc[ms][nt][1] = sc[ms][nt][2] = sc[ms][nt][3] = 0.0f;
#pragma unroll
        for (int np = 0; np < NT; np += 2)
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                uint32_t b[4];
                ldsm_x4(b, Kb + ((np + (lane >> 4)) * 8 + (lane & 7)) * LDK + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                for (int ms = 0; ms < MS; ms++) {
                    mma16816(sc[ms][np], qf[ms][kk], b[0], b[1]);
                    mma16816(sc[ms][np + 1], qf[ms][kk], b[2], b[3]);
                }
            }
        if constexpr (K8) {
            /* The last 8 dims: four key tiles an ldmatrix.x4, k = 8 MMAs. */
#pragma unroll
            for (int nq = 0; nq < NT; nq += 4) {
                uint32_t b[4];
                ldsm_x4(b, Kb + ((nq + (lane >> 3)) * 8 + (lane & 7)) * LDK + KS * 16);
#pragma unroll
                for (int ms = 0; ms < MS; ms++)
#pragma unroll
                    for (int i = 0; i < 4; i++) mma1688(sc[ms][nq + i], qh[ms], b[i]);
            }
        }

        /* Mask and the rows' maxima over the quad (raw scores: the scale
         * is positive, so the max commutes with it). A tile that every row
         * of the block sees whole (all of vision's but the last; a prefix's
         * below the diagonal) skips the mask. */
        const int jl = j0 + FA_BK - 1;
        const bool whole = jl < kend && (jl <= pos0 + q0 || (pos0 + last < n_prefix && jl < n_prefix));
        uint32_t pa[MS][NT / 2][4];
#pragma unroll
        for (int ms = 0; ms < MS; ms++) {
            float mx0 = -INFINITY, mx1 = -INFINITY;
            if (!whole) {
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int j = j0 + nt * 8 + 2 * t4 + e;
                        const bool in = j < kend;
                        if (!(in && visible(p0[ms], j, n_prefix))) sc[ms][nt][e] = -INFINITY;
                        if (!(in && visible(p0[ms] + 8, j, n_prefix))) sc[ms][nt][2 + e] = -INFINITY;
                    }
            }
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                mx0 = fmaxf(mx0, fmaxf(sc[ms][nt][0], sc[ms][nt][1]));
                mx1 = fmaxf(mx1, fmaxf(sc[ms][nt][2], sc[ms][nt][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float mn0 = fmaxf(m0[ms], mx0), mn1 = fmaxf(m1[ms], mx1);
            /* A row that has seen no key yet keeps m = -inf and o = l = 0. */
            const float b0s = mn0 == -INFINITY ? 0.0f : mn0 * scale_log2;
            const float b1s = mn1 == -INFINITY ? 0.0f : mn1 * scale_log2;
            /* The old sums' factor: exactly 1 while a row's max stands. */
            const float al0 = m0[ms] == mn0 ? 1.0f : ex2(fmaf(m0[ms], scale_log2, -b0s));
            const float al1 = m1[ms] == mn1 ? 1.0f : ex2(fmaf(m1[ms], scale_log2, -b1s));
            const bool rescale = __any_sync(0xffffffffu, m0[ms] != mn0 || m1[ms] != mn1);
            m0[ms] = mn0, m1[ms] = mn1;

            /* P = 2^(S·scale − m), rounded to bf16 straight into A
             * fragments: score tiles 2c and 2c+1 are the 16 keys of chunk c. */
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
                const float x0 = ex2(fmaf(sc[ms][nt][0], scale_log2, -b0s));
                const float x1 = ex2(fmaf(sc[ms][nt][1], scale_log2, -b0s));
                const float y0 = ex2(fmaf(sc[ms][nt][2], scale_log2, -b1s));
                const float y1 = ex2(fmaf(sc[ms][nt][3], scale_log2, -b1s));
                pa[ms][nt / 2][(nt & 1) * 2 + 0] = pack_bf16(x0, x1);
                pa[ms][nt / 2][(nt & 1) * 2 + 1] = pack_bf16(y0, y1);
            }
            if (rescale) { /* else no row of the warp found a new max: O and l stand */
#pragma unroll
                for (int i = 0; i < OT; i++) {
                    o[ms][i][0] *= al0, o[ms][i][1] *= al0;
                    o[ms][i][2] *= al1, o[ms][i][3] *= al1;
                }
                l[ms][0] *= al0, l[ms][1] *= al0;
                l[ms][2] *= al1, l[ms][3] *= al1;
            }
        }

        /* O += P·V: V fragments by transposing loads (two 8-dim tiles an
         * ldmatrix.x4; an odd last one by .x2), each used by every slab. */
#pragma unroll
        for (int c = 0; c < NT / 2; c++) {
            const bf16 *vrow = Vb + (c * 16 + (lane & 15)) * LDK;
#pragma unroll
            for (int ot = 0; ot + 1 < OT; ot += 2) {
                uint32_t vb[4];
                ldsm_x4_t(vb, vrow + (ot + (lane >> 4)) * 8);
#pragma unroll
                for (int ms = 0; ms < MS; ms++) {
                    mma16816(o[ms][ot], pa[ms][c], vb[0], vb[1]);
                    mma16816(o[ms][ot + 1], pa[ms][c], vb[2], vb[3]);
                }
            }
            if constexpr (OT % 2) {
                uint32_t vb[2];
                ldsm_x2_t(vb, vrow + (OT - 1) * 8);
#pragma unroll
                for (int ms = 0; ms < MS; ms++) mma16816(o[ms][OT - 1], pa[ms][c], vb[0], vb[1]);
            }
#pragma unroll
            for (int ms = 0; ms < MS; ms++) mma16816(l[ms], pa[ms][c], ones, ones);
        }
        if constexpr (F8) {
            /* The next buffer held tile it+1-NB, released by the barrier
             * that began this tile (or the last one's end barrier). */
            if (it + 1 < n_tiles) {
                const int nb = buf + 1 == NB ? 0 : buf + 1;
                fa_load_tile_f8<DP>(Ks + nb * FA_BK * LDK, k, a.ldk, j0 + FA_BK, kend, a.D, bt, bs);
                fa_load_tile_f8<DP>(Vs + nb * FA_BK * LDK, v, a.ldv, j0 + FA_BK, kend, a.D, bt, bs);
            }
        }
        if (NB == 2) __syncthreads(); /* every warp is done with this K/V buffer */
    }

    /* The two rows' outputs of each slab (every column of l holds the row's sum). */
    bf16 *out = (bf16 *)a.out + os + (long)h * a.D;
#pragma unroll
    for (int ms = 0; ms < MS; ms++) {
        float s0 = l[ms][0], s1 = l[ms][2];
        if constexpr (F8) { /* the values' scale, once per row */
            s0 /= a.v_scale;
            s1 /= a.v_scale;
        }
        const float r0 = 1.0f / s0, r1 = 1.0f / s1;
        const int t0 = q0 + (warp * MS + ms) * 16 + g, t1 = t0 + 8;
#pragma unroll
        for (int i = 0; i < OT; i++) {
            const int d = i * 8 + 2 * t4;
            if (d >= a.D) continue; /* D is a multiple of 8: both columns or neither */
            if (t0 < T)
                *(__nv_bfloat162 *)(out + (long)t0 * a.ldo + d) =
                    __floats2bfloat162_rn(o[ms][i][0] * r0, o[ms][i][1] * r0);
            if (t1 < T)
                *(__nv_bfloat162 *)(out + (long)t1 * a.ldo + d) =
                    __floats2bfloat162_rn(o[ms][i][2] * r1, o[ms][i][3] * r1);
        }
    }
}

/* ---- flash attention on wgmma (sm_90a) ------------------------------------------ */

/* The same attention as flash_attn_kernel (plain layout: no segments,
 * block tables or e4m3), on the warpgroup MMA of sm_90a (wgmma.cuh): one
 * block = 128 query rows of one head of one sequence, two warpgroups of 64
 * rows. Each warpgroup keeps its Q fragments in registers and takes K and V
 * straight from shared memory (no ldmatrix), so a warp issues far fewer
 * instructions a tile than with mma.sync: S = Q·Kᵀ as DK/16 wgmma of
 * m64n64k16 (D padded with zeros to DK, a multiple of 16: 72 → 80),
 * the online softmax on the accumulators as in flash_attn_kernel, then
 * O += P·V as 4 wgmma of m64n(D+8)k16, B the V tile in its transposed
 * (MN-major) form. V's 8 extra columns are ones, so the same MMAs leave
 * each row's sum of P (the bf16 P that O sums) in O's last 8 columns.
 *
 * K/V tiles of 64 keys in a ring of three buffers, loads two tiles ahead,
 * one barrier a tile (as flash_attn_kernel), stored as the core matrices
 * wgmma reads: K [key/8][DK/8][8][8], V [(D+8)/8][key/8][8][8], so that
 * chunk idx of a tile's copy lands at idx·8 elements and every 8 threads
 * write 128 contiguous bytes. V's ones columns are written once. */
template <int DP> struct wg_shape {
    static constexpr int DK = (DP + 15) / 16 * 16, KG = DK / 8; /* Q·Kᵀ's padded dims, 8-dim groups */
    static constexpr int NV = DP + 8, VG = NV / 8;              /* P·V's columns, ones included */
    static constexpr int KT = FA_BK * DK, VT = FA_BK * NV;      /* elements a K / V tile */
    static constexpr int ROWS = 128, THREADS = 256, NB = 3;     /* flash_wg_kernel's block */
    /* Q [ROWS][DK] (core matrices), K and V [NB] tiles. */
    static constexpr size_t bytes() { return ((size_t)ROWS * DK + NB * (KT + VT)) * 2; }
};

/* ---- the two wgmma kernels' common steps (inlined into each) ---- */

/* V's ones columns in all nb buffers (the copies never touch them), then Q
 * rows [q0, q0 + ROWS) as core matrices: chunk idx is row (idx/8/KG)·8 +
 * idx%8, dims ((idx/8)%KG)·8, zeros past T and D. */
template <int DP, int ROWS, int THREADS>
__device__ __forceinline__ void wg_prologue(bf16 *Qs, bf16 *Vs, int nb, const bf16 *q, long ldq, int q0, int T, int D) {
    typedef wg_shape<DP> W;
    for (int i = threadIdx.x; i < nb * FA_BK * 8; i += THREADS)
        Vs[(i / (FA_BK * 8)) * W::VT + (W::VG - 1) * FA_BK * 8 + i % (FA_BK * 8)] = __float2bfloat16(1.0f);
    for (int idx = threadIdx.x; idx < ROWS * W::KG; idx += THREADS) {
        const int r = (idx / 8 / W::KG) * 8 + idx % 8, c = (idx / 8) % W::KG;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (q0 + r < T && c * 8 < D) x = *(const uint4 *)(q + (long)(q0 + r) * ldq + c * 8);
        *(uint4 *)(Qs + idx * 8) = x;
    }
}

/* Start copying keys [r0, r0 + 64) of K and V (rows through the block table
 * bt when given) into dk, dv, one commit group: K chunk idx is key
 * (idx/8/KG)·8 + idx%8, dims ((idx/8)%KG)·8; V chunk idx is key idx%64,
 * dims (idx/64)·8; zeros past kend and D. */
template <int DP, int THREADS>
__device__ __forceinline__ void wg_load_kv(bf16 *dk, bf16 *dv, const bf16 *k, long ldk, const bf16 *v, long ldv, int r0,
                                           int kend, int D, const int32_t *bt, int bs) {
    typedef wg_shape<DP> W;
    constexpr int KCH = FA_BK * W::KG, VCH = FA_BK * (DP / 8);
#pragma unroll
    for (int u = 0; u < (KCH + THREADS - 1) / THREADS; u++) {
        const int idx = threadIdx.x + u * THREADS;
        if (KCH % THREADS == 0 || idx < KCH) {
            const int r = (idx / 8 / W::KG) * 8 + idx % 8, c = (idx / 8) % W::KG;
            const bool in = r0 + r < kend && c * 8 < D;
            const long row = bt ? (in ? key_row(bt, bs, r0 + r) : 0) : r0 + r;
            cp_async16_if(dk + idx * 8, k + row * ldk + c * 8, in);
        }
    }
#pragma unroll
    for (int u = 0; u < (VCH + THREADS - 1) / THREADS; u++) {
        const int idx = threadIdx.x + u * THREADS;
        if (VCH % THREADS == 0 || idx < VCH) {
            const int r = idx % FA_BK, c = idx / FA_BK;
            const bool in = r0 + r < kend && c * 8 < D;
            const long row = bt ? (in ? key_row(bt, bs, r0 + r) : 0) : r0 + r;
            cp_async16_if(dv + idx * 8, v + row * ldv + c * 8, in);
        }
    }
    cp_async_commit();
}

/* Issue S = Q·Kᵀ for the warpgroup's 64 rows (Qw) and the tile Kb (one commit group). */
template <int DP> __device__ __forceinline__ void wg_issue_s(float (&sc)[32], const bf16 *Qw, const bf16 *Kb) {
    typedef wg_shape<DP> W;
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < W::DK / 16; kk++)
        wgmma_m64n64k16_ss(sc, wg_desc(Qw + kk * 16 * 8, 128, W::KG * 128), wg_desc(Kb + kk * 16 * 8, 128, W::KG * 128),
                           kk > 0);
    wg_commit();
}

/* The online softmax of a tile's scores x (keys j0 + 8·nt + 2·t4 + e) for
 * the lane's rows at positions p0 and p0 + 8: the mask (unless whole), the
 * new maxima m0, m1 (raw score units), the old sums' factors al0, al1, and
 * P = 2^(S·scale − m) as bf16 A fragments (keys 16c..16c+15 are score tiles
 * 2c and 2c+1). Returns whether a row of the warp has a new max. */
__device__ __forceinline__ bool wg_softmax(float (&x)[32], int j0, bool whole, int kend, int p0, int n_prefix, int t4,
                                           float scale_log2, float &m0, float &m1, uint32_t (&pa)[4][4], float &al0,
                                           float &al1) {
    if (!whole) {
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int j = j0 + nt * 8 + 2 * t4 + e;
                const bool in = j < kend;
                if (!(in && visible(p0, j, n_prefix))) x[4 * nt + e] = -INFINITY;
                if (!(in && visible(p0 + 8, j, n_prefix))) x[4 * nt + 2 + e] = -INFINITY;
            }
    }
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        mx0 = fmaxf(mx0, fmaxf(x[4 * nt], x[4 * nt + 1]));
        mx1 = fmaxf(mx1, fmaxf(x[4 * nt + 2], x[4 * nt + 3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    /* A row that has seen no key yet keeps m = -inf. */
    const float b0s = mn0 == -INFINITY ? 0.0f : mn0 * scale_log2;
    const float b1s = mn1 == -INFINITY ? 0.0f : mn1 * scale_log2;
    al0 = m0 == mn0 ? 1.0f : ex2(fmaf(m0, scale_log2, -b0s));
    al1 = m1 == mn1 ? 1.0f : ex2(fmaf(m1, scale_log2, -b1s));
    const bool rescale = __any_sync(0xffffffffu, m0 != mn0 || m1 != mn1);
    m0 = mn0, m1 = mn1;
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        const float x0 = ex2(fmaf(x[4 * nt + 0], scale_log2, -b0s));
        const float x1 = ex2(fmaf(x[4 * nt + 1], scale_log2, -b0s));
        const float y0 = ex2(fmaf(x[4 * nt + 2], scale_log2, -b1s));
        const float y1 = ex2(fmaf(x[4 * nt + 3], scale_log2, -b1s));
        pa[nt / 2][(nt & 1) * 2 + 0] = pack_bf16(x0, x1);
        pa[nt / 2][(nt & 1) * 2 + 1] = pack_bf16(y0, y1);
    }
    return rescale;
}

template <int N> __device__ __forceinline__ void wg_scale_o(float (&o)[N], float al0, float al1) {
#pragma unroll
    for (int i = 0; i < N / 4; i++) {
        o[4 * i + 0] *= al0, o[4 * i + 1] *= al0;
        o[4 * i + 2] *= al1, o[4 * i + 3] *= al1;
    }
}

/* Issue O (and the row sums) += P·V of the tile Vb (one commit group). */
template <int DP>
__device__ __forceinline__ void wg_issue_pv(float (&o)[wg_shape<DP>::NV / 2], const uint32_t (&pa)[4][4],
                                            const bf16 *Vb) {
    wg_fence();
#pragma unroll
    for (int c = 0; c < 4; c++) {
        const uint64_t bd = wg_desc(Vb + c * 16 * 8, 128, FA_BK * 16);
        if constexpr (wg_shape<DP>::NV == 80)
            wgmma_m64n80k16<1>(o, pa[c], bd, 1);
        else
            wgmma_m64n72k16<1>(o, pa[c], bd, 1);
    }
    wg_commit();
}

/* The lane's rows t0 and t0 + 8 of O over their sums (O's last 8 columns). */
template <int DP>
__device__ __forceinline__ void wg_store(const float (&o)[wg_shape<DP>::NV / 2], bf16 *out, long ldo, int t0, int T,
                                         int D, int t4) {
    constexpr int VG = wg_shape<DP>::VG;
    const float r0 = 1.0f / o[4 * (VG - 1)], r1 = 1.0f / o[4 * (VG - 1) + 2];
#pragma unroll
    for (int i = 0; i < DP / 8; i++) {
        const int d = i * 8 + 2 * t4;
        if (d >= D) continue;
        if (t0 < T)
            *(__nv_bfloat162 *)(out + (long)t0 * ldo + d) = __floats2bfloat162_rn(o[4 * i] * r0, o[4 * i + 1] * r0);
        if (t0 + 8 < T)
            *(__nv_bfloat162 *)(out + (long)(t0 + 8) * ldo + d) =
                __floats2bfloat162_rn(o[4 * i + 2] * r1, o[4 * i + 3] * r1);
    }
}

template <int DP>
__global__ void __launch_bounds__(wg_shape<DP>::THREADS, 2) flash_wg_kernel(cuda_attn a, float scale_log2) {
    pdl_trigger();
    pdl_wait();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    typedef wg_shape<DP> W;
    constexpr int ROWS = W::ROWS, THREADS = W::THREADS, NB = W::NB;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Qs = (bf16 *)smem;
    bf16 *Ks = Qs + ROWS * W::DK; /* NB buffers of KT */
    bf16 *Vs = Ks + NB * W::KT;   /* NB buffers of VT */

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t4 = lane & 3;
    const int q0 = blockIdx.x * ROWS, h = blockIdx.y, s = blockIdx.z;
    const int hk = h / (a.H / a.Hkv);
    const int T = a.T, pos0 = a.pos0, n_prefix = a.n_prefix;
    const bf16 *q = (const bf16 *)a.q + s * a.q_seq + (long)h * a.D;
    const bf16 *k = (const bf16 *)a.k + s * a.k_seq + (long)hk * a.k_head;
    const bf16 *v = (const bf16 *)a.v + s * a.v_seq + (long)hk * a.v_head;
    const int last = (q0 + ROWS < T ? q0 + ROWS : T) - 1; /* it sees the furthest key */
    const int kend = key_end(pos0 + last, n_prefix, a.S);
    const int n_tiles = (kend + FA_BK - 1) / FA_BK;
    auto load = [&](int it) {
        wg_load_kv<DP, THREADS>(Ks + (it % NB) * W::KT, Vs + (it % NB) * W::VT, k, a.ldk, v, a.ldv, it * FA_BK, kend,
                                a.D, nullptr, 1);
    };
    load(0);
    if (n_tiles > 1) load(1);
    wg_prologue<DP, ROWS, THREADS>(Qs, Vs, NB, q, a.ldq, q0, T, a.D);
    const int row0 = warp * 16;                    /* this warp's rows: warpgroup·64 + (warp % 4)·16 */
    const bf16 *Qw = Qs + (warp / 4) * 64 * W::DK; /* its warpgroup's */
    const int p0 = pos0 + q0 + row0 + (lane >> 2); /* this lane's rows: p0 and p0 + 8 */
    float m0 = -INFINITY, m1 = -INFINITY;
    float o[W::NV / 2];
#pragma unroll
    for (int i = 0; i < W::NV / 2; i++) o[i] = 0.0f;

    for (int it = 0; it < n_tiles; it++) {
        const int j0 = it * FA_BK, jl = j0 + FA_BK - 1;
        if (it + 1 < n_tiles)
            cp_async_wait<1>();
        else
            cp_async_wait<0>();
        wg_fence_smem();
        __syncthreads(); /* tile it is in; every warpgroup is done with tile it-1 */
        if (it + 2 < n_tiles) load(it + 2);
        float sc[32], al0, al1;
        uint32_t pa[4][4];
        wg_issue_s<DP>(sc, Qw, Ks + (it % NB) * W::KT);
        wg_wait<0>();
        wg_hold(sc);
        /* Tiles every row of the block sees whole skip the mask. */
        const bool whole = jl < kend && (jl <= pos0 + q0 || (pos0 + last < n_prefix && jl < n_prefix));
        if (wg_softmax(sc, j0, whole, kend, p0, n_prefix, t4, scale_log2, m0, m1, pa, al0, al1))
            wg_scale_o(o, al0, al1);
        wg_issue_pv<DP>(o, pa, Vs + (it % NB) * W::VT);
        wg_wait<0>();
        wg_hold(o);
    }
    wg_store<DP>(o, (bf16 *)a.out + s * a.o_seq + (long)h * a.D, a.ldo, q0 + row0 + (lane >> 2), T, a.D, t4);
#endif
}

/* The pipelined form (FlashAttention-3's overlap within a warpgroup), the
 * text model's (D = 64): one block = three warpgroups of 64 rows, one block
 * an SM, Q in shared memory, four K/V buffers. Each tile it: issue S(it+1)
 * = Q·K(it+1)ᵀ, run the softmax of S(it) while it computes, wait for
 * P·V(it−1), rescale O, issue O += P(it)·V(it), wait for S(it+1) only (two
 * S register sets). Loads run one tile ahead: the buffer of tile it+2 held
 * tile it−2, whose P·V every warpgroup has waited for before the barrier.
 * A 730-row prefix of 32 heads is 128 blocks, one wave of an H100's or
 * H200's 132 SMs. PG: segments and block tables (the engine's prefix and
 * prompt steps), as flash_attn_kernel's PG form. */
template <int DP> struct wgp_shape {
    static constexpr int ROWS = 192, THREADS = 384, NBUF = 4;
    static constexpr size_t bytes() {
        return ((size_t)ROWS * wg_shape<DP>::DK + NBUF * (wg_shape<DP>::KT + wg_shape<DP>::VT)) * 2;
    }
};

template <int DP, bool PG>
__global__ void __launch_bounds__(wgp_shape<DP>::THREADS, 1) flash_wgp_kernel(cuda_attn a, float scale_log2) {
    pdl_trigger();
    pdl_wait();
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    typedef wg_shape<DP> W;
    typedef wgp_shape<DP> P;
    constexpr int ROWS = P::ROWS, THREADS = P::THREADS, NBUF = P::NBUF;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Qs = (bf16 *)smem;
    bf16 *Ks = Qs + ROWS * W::DK;
    bf16 *Vs = Ks + NBUF * W::KT;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t4 = lane & 3;
    const int q0 = blockIdx.x * ROWS, h = blockIdx.y, s = blockIdx.z;
    const int hk = h / (a.H / a.Hkv);
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
    const bf16 *k = (const bf16 *)a.k + ks + (long)hk * a.k_head;
    const bf16 *v = (const bf16 *)a.v + vs + (long)hk * a.v_head;
    const int last = (q0 + ROWS < T ? q0 + ROWS : T) - 1;
    const int kend = key_end(pos0 + last, n_prefix, S);
    const int n_tiles = (kend + FA_BK - 1) / FA_BK;
    auto load = [&](int it) {
        wg_load_kv<DP, THREADS>(Ks + (it % NBUF) * W::KT, Vs + (it % NBUF) * W::VT, k, a.ldk, v, a.ldv, it * FA_BK,
                                kend, a.D, bt, bs);
    };
    load(0);
    if (n_tiles > 1) load(1);
    wg_prologue<DP, ROWS, THREADS>(Qs, Vs, NBUF, q, a.ldq, q0, T, a.D);
    const int row0 = warp * 16;
    const bf16 *Qw = Qs + (warp / 4) * 64 * W::DK;
    const int p0 = pos0 + q0 + row0 + (lane >> 2);
    float m0 = -INFINITY, m1 = -INFINITY;
    float o[W::NV / 2];
#pragma unroll
    for (int i = 0; i < W::NV / 2; i++) o[i] = 0.0f;

    /* Tile 0's S; tile 1's copies are in flight. */
    float sa[32], sb[32];
    if (n_tiles > 1)
        cp_async_wait<1>();
    else
        cp_async_wait<0>();
    wg_fence_smem();
    __syncthreads();
    wg_issue_s<DP>(sa, Qw, Ks);
    wg_wait<0>();
    wg_hold(sa);

    /* Tile it: cur holds S(it), nxt receives S(it+1). The wait counts are
     * constants in each copy (ptxas serializes the wgmma when it cannot
     * tell which group a wait retires), hence the two forms. */
    auto tile = [&](float(&cur)[32], float(&nxt)[32], int it, auto more_t) {
        constexpr bool more = decltype(more_t)::value;
        const int j0 = it * FA_BK, jl = j0 + FA_BK - 1;
        if constexpr (more) {
            /* Tile it+1 is in (every thread's copies), and every warpgroup
             * is past P·V(it−2): its buffer takes tile it+2. */
            cp_async_wait<0>();
            wg_fence_smem();
            __syncthreads();
            if (it + 2 < n_tiles) load(it + 2);
            wg_issue_s<DP>(nxt, Qw, Ks + ((it + 1) % NBUF) * W::KT);
        }
        const bool whole = jl < kend && (jl <= pos0 + q0 || (pos0 + last < n_prefix && jl < n_prefix));
        float al0, al1;
        uint32_t pa[4][4];
        const bool rescale = wg_softmax(cur, j0, whole, kend, p0, n_prefix, t4, scale_log2, m0, m1, pa, al0, al1);
        /* P·V(it−1) is done (committed before S(it+1)). */
        if constexpr (more)
            wg_wait<1>();
        else
            wg_wait<0>();
        wg_hold(o);
        if (rescale) wg_scale_o(o, al0, al1);
        wg_issue_pv<DP>(o, pa, Vs + (it % NBUF) * W::VT);
        if constexpr (more) {
            wg_wait<1>(); /* S(it+1) */
            wg_hold(nxt);
        } else {
            wg_wait<0>();
            wg_hold(o);
        }
    };
    const std::true_type mid;
    const std::false_type end;
    int it = 0;
    for (; it + 2 < n_tiles; it += 2) {
        tile(sa, sb, it, mid);
        tile(sb, sa, it + 1, mid);
    }
    if (it + 1 < n_tiles) {
        tile(sa, sb, it, mid);
        tile(sb, sa, it + 1, end);
    } else {
        tile(sa, sb, it, end);
    }
    wg_store<DP>(o, (bf16 *)a.out + os + (long)h * a.D, a.ldo, q0 + row0 + (lane >> 2), T, a.D, t4);
#endif
}

/* Whether this build carries sm_90a code for the card: set by the one
 * thread of wg_probe_kernel. */
__global__ void wg_probe_kernel(int *out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    *out = 1;
#else
    *out = 0;
#endif
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

/* One flash instance: with a, launch it; without, raise its dynamic
 * shared-memory limit (at context creation). */
template <int DP, bool PG, bool F8, int MS, int NW>
static albedo_status fa_run(cuda_ctx *c, const cuda_attn *a, float sl2) {
    typedef fa_geom<MS, NW, DP> G;
    const size_t bytes = fa_shape<DP>::bytes(G::BQ);
    if (!a) {
        CU_TRY(c, cudaFuncSetAttribute(flash_attn_kernel<DP, PG, F8, MS, NW>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
        return ALBEDO_OK;
    }
    const dim3 grid((a->T + G::BQ - 1) / G::BQ, a->H, a->n_seq);
    CU_TRY(c, (launch_k(c, flash_attn_kernel<DP, PG, F8, MS, NW>, grid, dim3(G::THREADS), bytes, *a, sl2)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* The block geometry (cuda_ctx_set_flash): 128 rows as 8 warps of one
 * slab by default (up to 64 rows, or heads wider than 80: 64 rows as 4
 * warps, as before); CUDA_FLASH_64: 64 rows as 4 warps (the kernel
 * before) everywhere. Measured and dropped (docs/CUDA.md): 256 rows as 16
 * warps (MS = 1, NW = 16) and 128 as 4 warps of two slabs (MS = 2). */
template <int DP, bool PG, bool F8> static albedo_status fa_geometry(cuda_ctx *c, const cuda_attn *a, float sl2) {
    if (c->flash & CUDA_FLASH_64) return fa_run<DP, PG, F8, 1, 4>(c, a, sl2);
    /* A few rows (a short prompt) finish sooner in blocks of 4 warps. */
    if constexpr (DP > 80)
        return fa_run<DP, PG, F8, 1, 4>(c, a, sl2);
    else if (a && a->T <= 64)
        return fa_run<DP, PG, F8, 1, 4>(c, a, sl2);
    else
        return fa_run<DP, PG, F8, 1, 8>(c, a, sl2);
}

/* The wgmma kernels (sm_90a): with a, launch the one for this head width
 * and form; without, raise their shared-memory limits. The plain layout
 * runs flash_wg_kernel at D = 72 (vision) and flash_wgp_kernel at D = 64
 * (the text model), CUDA_FLASH_WGALT the other way round; segments and
 * block tables run flash_wgp_kernel's PG form (D = 64 only). */
template <int DP> static albedo_status wg_run(cuda_ctx *c, const cuda_attn *a, float sl2) {
    const int wb = (int)wg_shape<DP>::bytes(), pb = (int)wgp_shape<DP>::bytes();
    if (!a) {
        CU_TRY(c, cudaFuncSetAttribute(flash_wg_kernel<DP>, cudaFuncAttributeMaxDynamicSharedMemorySize, wb));
        CU_TRY(c, cudaFuncSetAttribute(flash_wgp_kernel<DP, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, pb));
        if constexpr (DP == 64)
            CU_TRY(c,
                   cudaFuncSetAttribute(flash_wgp_kernel<DP, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, pb));
        return ALBEDO_OK;
    }
    const bool pg = a->seg || a->blocks;
    if (pg || (DP == 64) != !!(c->flash & CUDA_FLASH_WGALT)) {
        const dim3 grid((a->T + wgp_shape<DP>::ROWS - 1) / wgp_shape<DP>::ROWS, a->H, a->n_seq);
        const dim3 block(wgp_shape<DP>::THREADS);
        if constexpr (DP == 64) {
            if (pg) {
                CU_TRY(c, (launch_k(c, flash_wgp_kernel<DP, true>, grid, block, (size_t)pb, *a, sl2)));
                CU_LAUNCHED(c);
                return ALBEDO_OK;
            }
        }
        CU_TRY(c, (launch_k(c, flash_wgp_kernel<DP, false>, grid, block, (size_t)pb, *a, sl2)));
    } else {
        const dim3 grid((a->T + wg_shape<DP>::ROWS - 1) / wg_shape<DP>::ROWS, a->H, a->n_seq);
        CU_TRY(c, (launch_k(c, flash_wg_kernel<DP>, grid, dim3(wg_shape<DP>::THREADS), (size_t)wb, *a, sl2)));
    }
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

/* The form: e4m3 caches (the segment form's instance covers the plain
 * layout too), segments or block tables, or the plain layout. On sm_90a,
 * more than 64 rows at D of 64 or 72 run the wgmma kernels (wg_run), bf16
 * caches only, segments and block tables at D = 64 only; CUDA_FLASH_MMA
 * and CUDA_FLASH_64 keep flash_attn_kernel. */
template <int DP> static albedo_status fa_form(cuda_ctx *c, const cuda_attn *a, float sl2) {
    if (a->kv_fp8) return fa_geometry<DP, true, true>(c, a, sl2);
    if constexpr (DP == 64 || DP == 72)
        if (c->wgmma && !(c->flash & (CUDA_FLASH_MMA | CUDA_FLASH_64)) && a->T > 64 &&
            (DP == 64 || !(a->seg || a->blocks)))
            return wg_run<DP>(c, a, sl2);
    if (a->seg || a->blocks) return fa_geometry<DP, true, false>(c, a, sl2);
    return fa_geometry<DP, false, false>(c, a, sl2);
}

template <int DP> static albedo_status fa_init(cuda_ctx *c) {
    const int keep = c->flash;
    albedo_status st = ALBEDO_OK;
    for (int geom = CUDA_FLASH_128; geom <= CUDA_FLASH_64 && st == ALBEDO_OK; geom++) {
        c->flash = geom;
        st = fa_geometry<DP, false, false>(c, nullptr, 0.0f);
        if (st == ALBEDO_OK) st = fa_geometry<DP, true, false>(c, nullptr, 0.0f);
        if (st == ALBEDO_OK) st = fa_geometry<DP, true, true>(c, nullptr, 0.0f);
    }
    c->flash = keep;
    return st;
}

/* Whether the card runs this build's sm_90a code (the wgmma kernel): a
 * compute capability 9.0 card, and wg_probe_kernel's answer. */
static albedo_status wg_detect(cuda_ctx *c) {
    int major = 0, minor = 0;
    c->wgmma = 0;
    CU_TRY(c, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, c->device));
    CU_TRY(c, cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, c->device));
    if (major != 9 || minor != 0) return ALBEDO_OK;
    int *flag = nullptr, got = 0;
    CU_TRY(c, cudaMalloc((void **)&flag, sizeof(int)));
    wg_probe_kernel<<<1, 1, 0, c->stream>>>(flag);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaMemcpyAsync(&got, flag, sizeof got, cudaMemcpyDeviceToHost, c->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(c->stream);
    cudaFree(flag);
    CU_TRY(c, e);
    c->wgmma = got == 1;
    return ALBEDO_OK;
}

albedo_status cuda_attention_init(cuda_ctx *c) {
    albedo_status st = wg_detect(c);
    if (st == ALBEDO_OK && c->wgmma) st = wg_run<64>(c, nullptr, 0.0f);
    if (st == ALBEDO_OK && c->wgmma) st = wg_run<72>(c, nullptr, 0.0f);
    if (st == ALBEDO_OK) st = fa_init<64>(c);
    if (st == ALBEDO_OK) st = fa_init<72>(c);
    if (st == ALBEDO_OK) st = fa_init<80>(c);
    if (st == ALBEDO_OK) st = fa_init<96>(c);
    if (st == ALBEDO_OK) st = fa_init<128>(c);
    return st;
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
        /* Head dims pad to the next instance; 72 (vision) has its own, with
         * k = 8 MMAs for its last 8 dims (CUDA_FLASH_PAD16: pad it to 80). */
        if (a->D <= 64) return fa_form<64>(c, a, sl2);
        if (a->D <= 72 && !(c->flash & CUDA_FLASH_PAD16)) return fa_form<72>(c, a, sl2);
        if (a->D <= 80) return fa_form<80>(c, a, sl2);
        if (a->D <= 96) return fa_form<96>(c, a, sl2);
        return fa_form<128>(c, a, sl2);
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
