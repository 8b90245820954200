/*
 * sample.cu — token selection on the device, so that only token ids cross
 * to the host: argmax, and temperature + top-p (nucleus) sampling. One
 * block of 1024 threads per row of logits.
 *
 * Nucleus without a sort (same rule as sampler.c): with p_i ∝
 * exp((l_i - max) / temperature), a token is kept when the tokens strictly
 * more probable than it hold at most top_p of the mass. With
 * G(τ) = Σ_{p_i > τ} p_i, which falls as τ rises, the kept set is
 * {p_i >= τ*}, τ* the least token probability with G(τ*) <= top_p·Z. A
 * radix select over the bits of p (positive floats order like their bit
 * patterns), 8 bits per pass, finds τ* exactly in four passes over the
 * logits. Masses are summed in 2^-40 fixed point, so every sum is exact
 * and the result does not depend on the order of atomic adds: the same
 * (seed, counter) gives the same token on every run. The draw walks the
 * kept tokens in a fixed order (thread, then index), which gives each its
 * probability; sampler.c walks in order of probability, so the same
 * uniform number may pick another token, from the same distribution.
 * Tokens tied exactly with τ* are all kept (sampler.c may keep only some).
 * Each pass recomputes exp() rather than caching V floats per row.
 */
#include "cuda_internal.cuh"

#define SMP_THREADS 1024
#define SMP_MAX_V 65536 /* fixed-point mass sums stay below 2^56 */

__global__ void __launch_bounds__(SMP_THREADS) argmax_kernel(int32_t *ids, const float *logits, int V, long ld) {
    pdl_trigger();
    pdl_wait();
    __shared__ float bv_s[32];
    __shared__ int bi_s[32];
    const float *lr = logits + blockIdx.x * ld;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float x = lr[i];
        if (x > bv) { /* NaN never compares greater */
            bv = x;
            bi = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        bv_s[warp] = bv;
        bi_s[warp] = bi;
    }
    __syncthreads();
    if (warp == 0) {
        const int nw = blockDim.x >> 5;
        bv = lane < nw ? bv_s[lane] : -INFINITY;
        bi = lane < nw ? bi_s[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) ids[blockIdx.x] = bi == 0x7fffffff ? 0 : bi; /* all -inf/NaN: 0, as sampler.c */
    }
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

typedef unsigned long long u64;

/* Unnormalised probability of token idx (0 outside [0, V), for -inf, NaN). */
__device__ __forceinline__ float prob_of(const float *lr, int idx, int V, float M, float inv_temp) {
    if (idx >= V) return 0.0f;
    const float x = lr[idx];
    if (!(x > -INFINITY)) return 0.0f;
    return expf((x - M) * inv_temp);
}

/* Probability mass in fixed point, 2^-40 units: integer sums are exact and
 * independent of summation order, so the kept set and the draw are the same
 * on every run (float atomics would not be). p <= 1, so 65536 tokens sum
 * below 2^56. */
__device__ __forceinline__ u64 fix_mass(float p) { return (u64)(p * 0x1.0p40f); }

__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__global__ void __launch_bounds__(SMP_THREADS)
    sample_kernel(int32_t *ids, const float *logits, int V, long ld, float inv_temp, float top_p, uint64_t seed,
                  uint64_t *counter) {
    pdl_trigger();
    pdl_wait();
    __shared__ float red[32];
    __shared__ u64 red64[32];
    __shared__ u64 hist[256];
    __shared__ unsigned prefix_s;
    __shared__ u64 above_s, r_s;
    __shared__ int owner, pick;
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int nw = SMP_THREADS / 32;
    const float *lr = logits + row * ld;

    float mx = -INFINITY;
    for (int i = tid; i < V; i += SMP_THREADS) {
        const float x = lr[i];
        if (x > mx) mx = x; /* NaN never compares greater */
    }
    const float M = block_max(mx, red);
    if (M == -INFINITY) { /* nothing drawable: token 0, as argmax */
        if (tid == 0) ids[row] = 0;
        return;
    }

    /* Z, then target = top_p·Z, in fixed point. */
    u64 zl = 0;
    for (int i = tid; i < V; i += SMP_THREADS) zl += fix_mass(prob_of(lr, i, V, M, inv_temp));
    zl = warp_sum_u64(zl);
    if (lane == 0) red64[warp] = zl;
    if (tid == 0) {
        prefix_s = 0u;
        above_s = 0ull;
        owner = -1;
        pick = -1;
    }
    __syncthreads();
    u64 Z = 0;
    for (int w = 0; w < nw; w++) Z += red64[w];
    const u64 target = top_p >= 1.0f ? Z : (u64)((double)Z * (double)top_p);

    /* Radix select of τ* over the bits of p, 8 at a time from the top: in
     * each pass, the mass per next-digit bucket among tokens matching the
     * prefix so far; τ* lies in the lowest bucket whose tokens above it
     * (above_s plus the higher buckets) hold <= target. */
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = tid; d < 256; d += SMP_THREADS) hist[d] = 0ull;
        __syncthreads();
        const unsigned hmask = shift == 24 ? 0u : 0xffffffffu << (shift + 8);
        const unsigned prefix = prefix_s;
        for (int i = tid; i < V; i += SMP_THREADS) {
            const float p = prob_of(lr, i, V, M, inv_temp);
            const u64 fm = fix_mass(p);
            const unsigned b = __float_as_uint(p);
            if (fm && (b & hmask) == (prefix & hmask)) atomicAdd(&hist[(b >> shift) & 255u], fm);
        }
        __syncthreads();
        if (warp == 0) {
            u64 hb[8], local = 0;
#pragma unroll
            for (int e = 0; e < 8; e++) {
                hb[e] = hist[lane * 8 + e];
                local += hb[e];
            }
            u64 suf = local; /* inclusive suffix sum over lanes */
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const u64 y = __shfl_down_sync(0xffffffffu, suf, o);
                if (lane + o < 32) suf += y;
            }
            u64 sh = above_s + (suf - local);
            int cand = 1 << 30;
            u64 cand_above = 0;
#pragma unroll
            for (int e = 7; e >= 0; e--) {
                if (hb[e] && sh <= target) {
                    cand = lane * 8 + e;
                    cand_above = sh;
                }
                sh += hb[e];
            }
            int best = cand;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) best = min(best, __shfl_xor_sync(0xffffffffu, best, o));
            __syncwarp(); /* every lane has read above_s */
            if (cand == best && best < (1 << 30)) {
                prefix_s = prefix | ((unsigned)best << shift);
                above_s = cand_above;
            }
        }
        __syncthreads();
    }
    const unsigned tau_bits = prefix_s;

    /* Kept mass per thread (tokens tid, tid + 1024, ...), its exclusive
     * prefix over threads, and a uniform integer r in [0, kept mass). */
    u64 local = 0;
    for (int i = tid; i < V; i += SMP_THREADS) {
        const float p = prob_of(lr, i, V, M, inv_temp);
        if (__float_as_uint(p) >= tau_bits) local += fix_mass(p);
    }
    u64 x = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) red64[warp] = x;
    __syncthreads();
    u64 woff = 0, total = 0;
    for (int w = 0; w < nw; w++) {
        if (w < warp) woff += red64[w];
        total += red64[w];
    }
    const u64 excl = woff + x - local;
    if (tid == 0) {
        const uint64_t ctr = counter ? counter[row] : 0;
        r_s = __umul64hi(mix64(mix64(mix64(seed) + (uint64_t)row) + ctr), total);
        if (counter) counter[row] = ctr + 1;
    }
    __syncthreads();
    const u64 r = r_s;
    if (local > 0 && excl <= r && r < excl + local) owner = tid;
    __syncthreads();
    if (tid == owner) {
        u64 acc = excl;
        for (int i = tid; i < V; i += SMP_THREADS) {
            const float p = prob_of(lr, i, V, M, inv_temp);
            if (__float_as_uint(p) < tau_bits) continue;
            acc += fix_mass(p);
            if (r < acc) {
                pick = i;
                break;
            }
        }
    }
    __syncthreads();
    /* total > 0 always (the most probable token has p = 1 and is kept), so
     * exactly one thread owns r; the fallback is for safety only. */
    if (tid == 0) ids[row] = pick >= 0 ? pick : 0;
}

albedo_status cuda_argmax(cuda_ctx *c, int32_t *ids, const float *logits, int n_rows, int V, long ld) {
    CU_ARG(c, n_rows >= 0 && V > 0 && ld >= 0);
    if (n_rows == 0) return ALBEDO_OK;
    CU_TRY(c, (launch_k(c, argmax_kernel, dim3(n_rows), dim3(SMP_THREADS), 0, ids, logits, V, ld)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}

albedo_status cuda_sample(cuda_ctx *c, int32_t *ids, const float *logits, int n_rows, int V, long ld, float temperature,
                          float top_p, uint64_t seed, uint64_t *counter) {
    if (!(temperature > 0.0f)) return cuda_argmax(c, ids, logits, n_rows, V, ld);
    CU_ARG(c, n_rows >= 0 && V > 0 && V <= SMP_MAX_V && ld >= 0);
    CU_ARG(c, top_p > 0.0f);
    if (n_rows == 0) return ALBEDO_OK;
    CU_TRY(c, (launch_k(c, sample_kernel, dim3(n_rows), dim3(SMP_THREADS), 0, ids, logits, V, ld, 1.0f / temperature,
                        top_p, seed, counter)));
    CU_LAUNCHED(c);
    return ALBEDO_OK;
}
