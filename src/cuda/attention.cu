/*
 * attention.cu — softmax(mask(q·kᵀ·scale))·v for bf16 q/k/v (ops_cuda.h,
 * cuda_attention), in two kernels:
 *
 *   flash_attn_kernel (T > 8: vision crops, prefill). One block = 64 query
 *   rows of one head of one sequence, 4 warps of 16 rows each. Key/value
 *   tiles of 64 rows go through shared memory; the warp computes its
 *   16×64 score tile with bf16 tensor-core MMAs (WMMA 16×16×16, fp32
 *   accumulate), then each lane pair owns one query row: masking, the
 *   online softmax (running max m, running sum l, rescale of the output
 *   by 2^(m_old - m_new)), P rounded to bf16, and O += P·V again on the
 *   tensor cores. O lives in registers (DP/2 floats per lane). The head
 *   dimension is padded with zeros to DP, a multiple of 16 (72 -> 80).
 *   Only key tiles that some row of the block can see are visited.
 *
 *     Qs [64][DP+8] bf16   Ks, Vs [2][64][DP+8] (cp.async double buffer)
 *     Sc [4 warps][16][max(64,DP)+4] f32   Ps [4][16][72] bf16
 *   (rows padded against bank conflicts). Tile i+1 is copied with cp.async
 *   while tile i is computed.
 *
 *   attn_decode_kernel (T <= 8: decode). Flash-decoding: the visible keys
 *   are cut into chunks so that about two blocks per SM run even for one
 *   query; a block scores its chunk (one key per thread, 16-byte loads),
 *   takes the chunk's softmax, sums P·V with 8 dims per thread, and writes
 *   (m, l, o) to scratch. The last block of a (row, head) to finish — an
 *   arrival counter — merges the chunks and resets the counter, so the
 *   whole op is one launch and graph replays need no memset.
 */
#include <mma.h>

#include "cuda_internal.cuh"

using namespace nvcuda;

#define LOG2E 1.4426950408889634f

/* Whether query position p sees key j (ops.h, op_attn). */
__device__ __forceinline__ bool visible(int p, int j, int n_prefix) {
    return j <= p || (p < n_prefix && j < n_prefix);
}

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
    static constexpr int LDK = DP + 8;                          /* Q/K/V smem row, bf16 */
    static constexpr int LDS = (DP > FA_BK ? DP : FA_BK) + 4;   /* score/PV scratch row, f32 */
    static constexpr int LDP = FA_BK + 8;                       /* P row, bf16 */
    static constexpr size_t bytes = (size_t)5 * 64 * LDK * 2 + (size_t)FA_WARPS * 16 * LDS * 4 +
                                    (size_t)FA_WARPS * 16 * LDP * 2;
};

/* 16-byte asynchronous copy global -> shared (sm_80+); src_bytes 0 writes
 * zeros and reads nothing. */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes) {
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(sa), "l"(gmem), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/* Start copying rows [r0, r0 + 64) of a [rows, D] bf16 matrix (row stride
 * ld) into smem [64][LDK], zero-filling columns D..DP-1 and rows >= n_rows. */
template <int DP>
__device__ __forceinline__ void fa_load_tile_async(bf16 *dst, const bf16 *src, long ld, int r0,
                                                   int n_rows, int D) {
    constexpr int LDK = fa_shape<DP>::LDK, CH = DP / 8;
    for (int idx = threadIdx.x; idx < 64 * CH; idx += blockDim.x) {
        const int r = idx / CH, ch = idx % CH;
        const bool in = r0 + r < n_rows && ch * 8 < D;
        cp_async16(dst + r * LDK + ch * 8, in ? src + (long)(r0 + r) * ld + ch * 8 : src, in ? 16 : 0);
    }
}

/* Copy rows [r0, r0 + 64) of a [rows, D] bf16 matrix (row stride ld) into
 * smem [64][LDK], zero-filling columns D..DP-1 and rows >= n_rows. */
template <int DP>
__device__ __forceinline__ void fa_load_tile(bf16 *dst, const bf16 *src, long ld, int r0, int n_rows,
                                             int D) {
    constexpr int LDK = fa_shape<DP>::LDK, CH = DP / 8;
    for (int idx = threadIdx.x; idx < 64 * CH; idx += blockDim.x) {
        const int r = idx / CH, ch = idx % CH;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < n_rows && ch * 8 < D) v = *(const uint4 *)(src + (long)(r0 + r) * ld + ch * 8);
        *(uint4 *)(dst + r * LDK + ch * 8) = v;
    }
}

template <int DP>
__global__ void __launch_bounds__(FA_WARPS * 32) flash_attn_kernel(cuda_attn a, float scale_log2) {
    pdl_trigger();
    pdl_wait();
    typedef fa_shape<DP> sh;
    constexpr int LDK = sh::LDK, LDS = sh::LDS, LDP = sh::LDP, NO = DP / 2;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *Qs = (bf16 *)smem;
    bf16 *Ks = Qs + 64 * LDK;      /* two buffers: tile i+1 loads while tile i computes */
    bf16 *Vs = Ks + 2 * 64 * LDK;
    float *Sc = (float *)(Vs + 2 * 64 * LDK);
    bf16 *Ps = (bf16 *)(Sc + FA_WARPS * 16 * LDS);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q0 = blockIdx.x * FA_BQ, h = blockIdx.y, s = blockIdx.z;
    const int g = h / (a.H / a.Hkv);
    const bf16 *q = (const bf16 *)a.q + s * a.q_seq + (long)h * a.D;
    const bf16 *k = (const bf16 *)a.k + s * a.k_seq + (long)g * a.k_head;
    const bf16 *v = (const bf16 *)a.v + s * a.v_seq + (long)g * a.v_head;

    /* The last row of the block sees the furthest key. */
    const int last = (q0 + FA_BQ < a.T ? q0 + FA_BQ : a.T) - 1;
    const int kend = key_end(a.pos0 + last, a.n_prefix, a.S);
    const int n_tiles = (kend + FA_BK - 1) / FA_BK;

    fa_load_tile_async<DP>(Ks, k, a.ldk, 0, kend, a.D);
    fa_load_tile_async<DP>(Vs, v, a.ldv, 0, kend, a.D);
    cp_async_commit();
    fa_load_tile<DP>(Qs, q + (long)q0 * a.ldq, a.ldq, 0, a.T - q0, a.D);

    /* This lane's query row (within the warp's 16) and column parity. */
    const int r = lane >> 1, hf = lane & 1;
    const int p = a.pos0 + q0 + warp * 16 + r;
    float m = -INFINITY, l = 0.0f, o[NO];
#pragma unroll
    for (int i = 0; i < NO; i++) o[i] = 0.0f;

    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> qf[DP / 16];
#pragma unroll
    for (int kk = 0; kk < DP / 16; kk++) wmma::load_matrix_sync(qf[kk], Qs + warp * 16 * LDK + kk * 16, LDK);

    float *sc = Sc + warp * 16 * LDS;
    bf16 *ps = Ps + warp * 16 * LDP;
    for (int it = 0; it < n_tiles; it++) {
        const int j0 = it * FA_BK;
        const bf16 *Kb = Ks + (it & 1) * 64 * LDK, *Vb = Vs + (it & 1) * 64 * LDK;
        if (it + 1 < n_tiles) {
            /* The other buffer was released by the barrier ending the last tile. */
            fa_load_tile_async<DP>(Ks + ((it + 1) & 1) * 64 * LDK, k, a.ldk, j0 + FA_BK, kend, a.D);
            fa_load_tile_async<DP>(Vs + ((it + 1) & 1) * 64 * LDK, v, a.ldv, j0 + FA_BK, kend, a.D);
            cp_async_commit();
            cp_async_wait<1>(); /* this thread's copies of tile it have landed */
        } else {
            cp_async_wait<0>();
        }
        __syncthreads(); /* ... and every thread's */

        /* S = Q Kᵀ for this warp's 16 rows × 64 keys. */
#pragma unroll
        for (int nt = 0; nt < FA_BK / 16; nt++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf;
            wmma::fill_fragment(sf, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DP / 16; kk++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, Kb + nt * 16 * LDK + kk * 16, LDK);
                wmma::mma_sync(sf, qf[kk], kf, sf);
            }
            wmma::store_matrix_sync(sc + nt * 16, sf, LDS, wmma::mem_row_major);
        }
        __syncwarp();

        /* Online softmax on row r; the lane pair splits the 64 keys by
         * parity, which spreads the scratch reads over the banks. */
        float sv[32], mt = -INFINITY;
#pragma unroll
        for (int i = 0; i < 32; i++) {
            const int j = j0 + 2 * i + hf;
            const float x = sc[r * LDS + 2 * i + hf] * scale_log2;
            sv[i] = (j < kend && visible(p, j, a.n_prefix)) ? x : -INFINITY;
            mt = fmaxf(mt, sv[i]);
        }
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
        const float mn = fmaxf(m, mt);
        /* A row that has seen no key yet keeps m = -inf and o = l = 0. */
        const float base = mn == -INFINITY ? 0.0f : mn;
        const float alpha = exp2f(m - base);
        float ls = 0.0f;
#pragma unroll
        for (int i = 0; i < 32; i++) {
            const float pv = exp2f(sv[i] - base);
            ls += pv;
            ps[r * LDP + 2 * i + hf] = __float2bfloat16_rn(pv);
        }
        ls += __shfl_xor_sync(0xffffffffu, ls, 1);
        l = l * alpha + ls;
        m = mn;
#pragma unroll
        for (int i = 0; i < NO; i++) o[i] *= alpha;
        __syncwarp();

        /* O += P V: 16 rows × DP, through the scratch tile. */
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> pf[FA_BK / 16];
#pragma unroll
        for (int kk = 0; kk < FA_BK / 16; kk++) wmma::load_matrix_sync(pf[kk], ps + kk * 16, LDP);
#pragma unroll
        for (int nt = 0; nt < DP / 16; nt++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> of;
            wmma::fill_fragment(of, 0.0f);
#pragma unroll
            for (int kk = 0; kk < FA_BK / 16; kk++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> vf;
                wmma::load_matrix_sync(vf, Vb + kk * 16 * LDK + nt * 16, LDK);
                wmma::mma_sync(of, pf[kk], vf, of);
            }
            wmma::store_matrix_sync(sc + nt * 16, of, LDS, wmma::mem_row_major);
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < NO; i++) o[i] += sc[r * LDS + 2 * i + hf];
        __syncthreads(); /* all warps are done with this K/V buffer and their scratch */
    }

    const int t = q0 + warp * 16 + r;
    if (t < a.T) {
        const float inv = 1.0f / l;
        bf16 *out = (bf16 *)a.out + s * a.o_seq + (long)t * a.ldo + (long)h * a.D;
#pragma unroll
        for (int i = 0; i < NO; i++) {
            const int d = 2 * i + hf;
            if (d < a.D) out[d] = __float2bfloat16_rn(o[i] * inv);
        }
    }
}

/* ---- split-key decode attention ------------------------------------------------- */

#define DEC_THREADS 128
#define DEC_MAX_CHUNK 2048

__global__ void __launch_bounds__(DEC_THREADS)
    attn_decode_kernel(cuda_attn a, float scale_log2, int chunk, int n_chunks, float *part,
                       int *count) {
    pdl_trigger();
    pdl_wait();
    __shared__ float qs[128];
    __shared__ float red[32];
    __shared__ float acc_s[DEC_THREADS * 8];
    __shared__ int is_last;
    extern __shared__ float sc[]; /* [chunk] */

    const int tid = threadIdx.x;
    const int ci = blockIdx.x, h = blockIdx.y, z = blockIdx.z;
    const int s = z / a.T, t = z % a.T;
    const int g = h / (a.H / a.Hkv);
    const int D = a.D;
    const int p = a.pos0 + t;
    const int kend = key_end(p, a.n_prefix, a.S);
    const int j0 = ci * chunk, j1 = j0 + chunk < kend ? j0 + chunk : kend;
    const bf16 *q = (const bf16 *)a.q + s * a.q_seq + (long)t * a.ldq + (long)h * D;
    const bf16 *k = (const bf16 *)a.k + s * a.k_seq + (long)g * a.k_head;
    const bf16 *v = (const bf16 *)a.v + s * a.v_seq + (long)g * a.v_head;

    for (int d = tid; d < D; d += DEC_THREADS) qs[d] = __bfloat162float(q[d]);
    __syncthreads();

    /* Scores: one key per thread. */
    float mx = -INFINITY;
    for (int j = j0 + tid; j < j1; j += DEC_THREADS) {
        const uint4 *kr = (const uint4 *)(k + (long)j * a.ldk);
        float dot = 0.0f;
        for (int c8 = 0; c8 < D / 8; c8++) {
            float kf[8];
            bf16x8_to_f(kr[c8], kf);
#pragma unroll
            for (int e = 0; e < 8; e++) dot = fmaf(qs[c8 * 8 + e], kf[e], dot);
        }
        /* Inside [0, kend) every key but a non-prefix future one is visible. */
        const float x = visible(p, j, a.n_prefix) ? dot * scale_log2 : -INFINITY;
        sc[j - j0] = x;
        mx = fmaxf(mx, x);
    }
    const float M = block_max(mx, red);
    float ls = 0.0f;
    for (int j = j0 + tid; j < j1; j += DEC_THREADS) {
        const float pv = M == -INFINITY ? 0.0f : exp2f(sc[j - j0] - M);
        sc[j - j0] = pv;
        ls += pv;
    }
    const float L = block_sum(ls, red); /* its barriers also publish sc */

    /* P·V: thread = (8-dim group dg, key slot). */
    const int ng = D / 8, nslots = DEC_THREADS / ng;
    const int dg = tid % ng, slot = tid / ng;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; e++) acc[e] = 0.0f;
    if (slot < nslots) {
        for (int j = j0 + slot; j < j1; j += nslots) {
            const float w = sc[j - j0];
            float vf[8];
            bf16x8_to_f(*(const uint4 *)(v + (long)j * a.ldv + dg * 8), vf);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[e] = fmaf(w, vf[e], acc[e]);
        }
#pragma unroll
        for (int e = 0; e < 8; e++) acc_s[slot * D + dg * 8 + e] = acc[e];
    }
    __syncthreads();
    const long base = ((long)z * a.H + h) * n_chunks;
    float *mine = part + (base + ci) * ATTN_DSTRIDE;
    for (int d = tid; d < D; d += DEC_THREADS) {
        float o = 0.0f;
        for (int sl = 0; sl < nslots; sl++) o += acc_s[sl * D + d];
        mine[d] = o;
    }
    if (tid == 0) {
        mine[128] = M;
        mine[129] = L;
    }

    /* The last block of this (row, head) merges the chunks. */
    __threadfence();
    __syncthreads();
    if (tid == 0) is_last = atomicAdd(&count[z * a.H + h], 1) == n_chunks - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const float *pp = part + base * ATTN_DSTRIDE;
    float Mx = -INFINITY;
    for (int c = 0; c < n_chunks; c++) Mx = fmaxf(Mx, __ldcg(pp + (long)c * ATTN_DSTRIDE + 128));
    bf16 *out = (bf16 *)a.out + s * a.o_seq + (long)t * a.ldo + (long)h * D;
    for (int d = tid; d < D; d += DEC_THREADS) {
        float num = 0.0f, den = 0.0f;
        for (int c = 0; c < n_chunks; c++) {
            const float *pc = pp + (long)c * ATTN_DSTRIDE;
            const float mc = __ldcg(pc + 128);
            if (mc == -INFINITY) continue;
            const float w = exp2f(mc - Mx);
            num += w * __ldcg(pc + d);
            den += w * __ldcg(pc + 129);
        }
        out[d] = __float2bfloat16_rn(num / den);
    }
    if (tid == 0) count[z * a.H + h] = 0;
}

/* ---- launcher ---------------------------------------------------------------------- */

#define FA_INSTANCES(X) X(64) X(80) X(96) X(128)

albedo_status cuda_attention_init(cuda_ctx *c) {
#define FA_ATTR(DP)                                                                               \
    CU_TRY(c, cudaFuncSetAttribute(flash_attn_kernel<DP>,                                          \
                                   cudaFuncAttributeMaxDynamicSharedMemorySize,                    \
                                   (int)fa_shape<DP>::bytes));
    FA_INSTANCES(FA_ATTR)
#undef FA_ATTR
    CU_TRY(c, cudaFuncSetAttribute(attn_decode_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   DEC_MAX_CHUNK * (int)sizeof(float)));
    return ALBEDO_OK;
}

static int aligned8(long v) { return v % 8 == 0; }

albedo_status cuda_attention(cuda_ctx *c, const cuda_attn *a) {
    CU_ARG(c, a->T >= 0 && a->S >= 1 && a->n_seq >= 0 && a->pos0 >= 0);
    CU_ARG(c, a->H > 0 && a->Hkv > 0 && a->H % a->Hkv == 0);
    CU_ARG(c, a->D > 0 && a->D % 8 == 0 && a->D <= 128);
    CU_ARG(c, is_aligned(a->q, 16) && is_aligned(a->k, 16) && is_aligned(a->v, 16));
    CU_ARG(c, aligned8(a->ldq) && aligned8(a->q_seq) && aligned8(a->ldk) && aligned8(a->k_head) &&
                  aligned8(a->k_seq) && aligned8(a->ldv) && aligned8(a->v_head) && aligned8(a->v_seq));
    if (a->T == 0 || a->n_seq == 0) return ALBEDO_OK;
    const float sl2 = a->scale * LOG2E;

    if (a->T > 8) {
        CU_ARG(c, a->n_seq <= 65535 && a->H <= 65535);
        const dim3 grid((a->T + FA_BQ - 1) / FA_BQ, a->H, a->n_seq), block(FA_WARPS * 32);
#define FA_CASE(DP)                                                                               \
    if (a->D <= DP) {                                                                             \
        CU_TRY(c, (launch_k(c, flash_attn_kernel<DP>, dim3(grid), dim3(block), fa_shape<DP>::bytes, *a, sl2)));          \
        CU_LAUNCHED(c);                                                                           \
        return ALBEDO_OK;                                                                         \
    }
        FA_INSTANCES(FA_CASE)
#undef FA_CASE
        return cuda_fail(c, ALBEDO_ERR_INTERNAL, "cuda_attention: no kernel for D=%d", a->D);
    }

    /* Decode: enough chunks for ~2 blocks per SM, each at most DEC_MAX_CHUNK
     * keys and a multiple of 32, within the partial-result scratch. */
    const long rows = (long)a->n_seq * a->T * a->H;
    CU_ARG(c, (long)a->n_seq * a->T <= 65535);
    const int kmax = a->S; /* no row sees past key S-1 */
    int n_chunks = (int)((2L * c->n_sm + rows - 1) / rows);
    const int min_chunks = (kmax + DEC_MAX_CHUNK - 1) / DEC_MAX_CHUNK;
    if (n_chunks < min_chunks) n_chunks = min_chunks;
    if (n_chunks > (kmax + 31) / 32) n_chunks = (kmax + 31) / 32;
    if (n_chunks < 1) n_chunks = 1;
    int chunk = (kmax + n_chunks - 1) / n_chunks;
    chunk = (chunk + 31) / 32 * 32;
    if (chunk > DEC_MAX_CHUNK) chunk = DEC_MAX_CHUNK;
    n_chunks = (kmax + chunk - 1) / chunk;
    if (rows * n_chunks > ATTN_SLOTS)
        return cuda_fail(c, ALBEDO_ERR_LIMIT,
                         "cuda_attention: %ld query rows × heads × %d key chunks exceed %d slots",
                         rows, n_chunks, ATTN_SLOTS);
    const dim3 grid(n_chunks, a->H, a->n_seq * a->T);
    CU_TRY(c, (launch_k(c, attn_decode_kernel, dim3(grid), dim3(DEC_THREADS), chunk * sizeof(float), *a, sl2, chunk, n_chunks, c->attn_part, c->attn_count)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}
