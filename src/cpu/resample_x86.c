/*
 * resample_x86.c — the Lanczos resize kernels for x86 (resample.h): 32-bit
 * multiplies of widened 8-bit samples, exact like the scalar kernels, with
 * AVX2 (eight sums an instruction) and AVX-512 (sixteen). The file is built
 * with -mavx2; the AVX-512 functions carry their own target attribute, so
 * that both share the AVX2 helpers below.
 *
 * Horizontal pass, the block of RS_ROWS rows (see resample.h for blk):
 *   rows u8 [8][sw][3] --widen, transpose--> blk i32 [sw][8][4]
 *   per output column: Σ_t w_t · blk[first + t]   (32 lanes: 8 rows x RGB·)
 *   8 columns of 8 rows --8x8 transpose of RGB· words--> 8 rows of 8 pixels
 */
#include <immintrin.h>
#include <string.h>

#include "resample.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2")))

/* 32 sums (a: lanes 0-7 ... d: 24-31) -> 32 bytes in lane order, rounded
 * as rs_clip: an arithmetic shift, then saturation to int16 and to u8
 * (which clamps below 0 and above 255); pack interleaves 128-bit halves,
 * which the permutation undoes. */
static inline __m256i clip32(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_packs_epi32(_mm256_srai_epi32(a, RS_BITS), _mm256_srai_epi32(b, RS_BITS));
    __m256i cd = _mm256_packs_epi32(_mm256_srai_epi32(c, RS_BITS), _mm256_srai_epi32(d, RS_BITS));
    return _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* The block's rows into blk: pixel x of row r as R, G, B, 0 in 32-bit
 * lanes at blk[x·RS_LANES + 4r]. Four pixels of every row per step (a
 * 16-byte load that stays inside the row), so that each 128-byte column of
 * blk is written whole while in cache; the last few pixels one at a time. */
static inline void widen_block(const uint8_t *const src[RS_ROWS], int sw, int32_t *blk) {
    const __m128i shuf = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    int x = 0;
    for (; x + 6 <= sw; x += 4) {
        int32_t *b = blk + (size_t)x * RS_LANES;
        for (int r = 0; r < RS_ROWS; r++, b += 4) {
            __m128i p = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(src[r] + 3 * x)), shuf);
            __m256i lo = _mm256_cvtepu8_epi32(p), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(p, 8));
            _mm_store_si128((__m128i *)b, _mm256_castsi256_si128(lo));
            _mm_store_si128((__m128i *)(b + RS_LANES), _mm256_extracti128_si256(lo, 1));
            _mm_store_si128((__m128i *)(b + 2 * RS_LANES), _mm256_castsi256_si128(hi));
            _mm_store_si128((__m128i *)(b + 3 * RS_LANES), _mm256_extracti128_si256(hi, 1));
        }
    }
    for (; x < sw; x++)
        for (int r = 0; r < RS_ROWS; r++) {
            int32_t *b = blk + (size_t)x * RS_LANES + 4 * r;
            b[0] = src[r][3 * x];
            b[1] = src[r][3 * x + 1];
            b[2] = src[r][3 * x + 2];
            b[3] = 0;
        }
}

/* Eight pixels as R, G, B, pad words -> their 24 bytes at d. */
static inline void store_row24(__m256i row, uint8_t *d) {
    const __m256i squeeze = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1, 0, 1, 2, 4, 5, 6,
                                             8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    row = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(row, squeeze), _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 3, 7));
    _mm_storeu_si128((__m128i *)d, _mm256_castsi256_si128(row));
    _mm_storel_epi64((__m128i *)(d + 16), _mm256_extracti128_si256(row, 1));
}

/* Eight output columns xx..xx+7, each 32 bytes (row r's R, G, B, pad at
 * 4r), to the eight rows: transposed as an 8x8 matrix of 32-bit words,
 * then each row's pads squeezed out, 24 bytes stored. */
static inline void store_cols8(__m256i c0, __m256i c1, __m256i c2, __m256i c3, __m256i c4, __m256i c5, __m256i c6,
                               __m256i c7, uint8_t *const dst[RS_ROWS], int xx) {
    __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    __m256i t4 = _mm256_unpacklo_epi32(c4, c5), t5 = _mm256_unpackhi_epi32(c4, c5);
    __m256i t6 = _mm256_unpacklo_epi32(c6, c7), t7 = _mm256_unpackhi_epi32(c6, c7);
    __m256i u[8] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2), _mm256_unpacklo_epi64(t1, t3),
                    _mm256_unpackhi_epi64(t1, t3), _mm256_unpacklo_epi64(t4, t6), _mm256_unpackhi_epi64(t4, t6),
                    _mm256_unpacklo_epi64(t5, t7), _mm256_unpackhi_epi64(t5, t7)};
    /* row r: columns 0-3 in half r / 4 of u[r % 4], columns 4-7 in that of u[4 + r % 4] */
    for (int r = 0; r < 4; r++) {
        store_row24(_mm256_permute2x128_si256(u[r], u[4 + r], 0x20), dst[r] + 3 * (size_t)xx);
        store_row24(_mm256_permute2x128_si256(u[r], u[4 + r], 0x31), dst[4 + r] + 3 * (size_t)xx);
    }
}

/* Fewer than eight last columns: through memory, three bytes at a time. */
static inline void store_cols_tail(const __m256i *c, int n, uint8_t *const dst[RS_ROWS], int xx) {
    uint8_t tmp[8][32];
    for (int i = 0; i < n; i++) _mm256_storeu_si256((__m256i *)tmp[i], c[i]);
    for (int r = 0; r < RS_ROWS; r++)
        for (int i = 0; i < n; i++) memcpy(dst[r] + 3 * (size_t)(xx + i), tmp[i] + 4 * r, 3);
}

static inline __m256i hcol_avx2(const int32_t *blk, const rs_axis *a, int xx) {
    const __m256i half = _mm256_set1_epi32(1 << (RS_BITS - 1));
    __m256i a0 = half, a1 = half, a2 = half, a3 = half;
    const int32_t *k = a->w + (size_t)xx * (size_t)a->ksize;
    const int32_t *b = blk + (size_t)a->first[xx] * RS_LANES;
    for (int t = 0; t < a->n[xx]; t++, b += RS_LANES) {
        __m256i kt = _mm256_set1_epi32(k[t]);
        a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_load_si256((const __m256i *)b), kt));
        a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_load_si256((const __m256i *)(b + 8)), kt));
        a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(_mm256_load_si256((const __m256i *)(b + 16)), kt));
        a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(_mm256_load_si256((const __m256i *)(b + 24)), kt));
    }
    return clip32(a0, a1, a2, a3);
}

/* rs_clip on 16 sums: shift, clamp below at 0, saturate to u8. */
AVX512 static inline __m128i clip16(__m512i a) {
    return _mm512_cvtusepi32_epi8(_mm512_max_epi32(_mm512_srai_epi32(a, RS_BITS), _mm512_setzero_si512()));
}

AVX512 static inline __m256i hcol_avx512(const int32_t *blk, const rs_axis *a, int xx) {
    const __m512i half = _mm512_set1_epi32(1 << (RS_BITS - 1));
    __m512i a0 = half, a1 = half;
    const int32_t *k = a->w + (size_t)xx * (size_t)a->ksize;
    const int32_t *b = blk + (size_t)a->first[xx] * RS_LANES;
    for (int t = 0; t < a->n[xx]; t++, b += RS_LANES) {
        __m512i kt = _mm512_set1_epi32(k[t]);
        a0 = _mm512_add_epi32(a0, _mm512_mullo_epi32(_mm512_load_si512(b), kt));
        a1 = _mm512_add_epi32(a1, _mm512_mullo_epi32(_mm512_load_si512(b + 16), kt));
    }
    return _mm256_set_m128i(clip16(a1), clip16(a0));
}

/* The horizontal pass of one block, for either column function. */
#define HBLOCK_BODY(hcol)                                                                                             \
    widen_block(src, sw, blk);                                                                                        \
    int xx = 0;                                                                                                       \
    for (; xx + 8 <= dw; xx += 8)                                                                                     \
        store_cols8(hcol(blk, a, xx), hcol(blk, a, xx + 1), hcol(blk, a, xx + 2), hcol(blk, a, xx + 3),               \
                    hcol(blk, a, xx + 4), hcol(blk, a, xx + 5), hcol(blk, a, xx + 6), hcol(blk, a, xx + 7), dst, xx); \
    __m256i c[8];                                                                                                     \
    for (int i = 0; xx + i < dw; i++) c[i] = hcol(blk, a, xx + i);                                                    \
    store_cols_tail(c, dw - xx, dst, xx)

static void hblock_avx2(const uint8_t *const src[RS_ROWS], int sw, const rs_axis *a, int dw,
                        uint8_t *const dst[RS_ROWS], int32_t *blk) {
    HBLOCK_BODY(hcol_avx2);
}

AVX512 static void hblock_avx512(const uint8_t *const src[RS_ROWS], int sw, const rs_axis *a, int dw,
                                 uint8_t *const dst[RS_ROWS], int32_t *blk) {
    HBLOCK_BODY(hcol_avx512);
}

static inline __m256i vchunk(const uint8_t *s, size_t stride, const int32_t *k, int taps) {
    const __m256i half = _mm256_set1_epi32(1 << (RS_BITS - 1));
    __m256i a0 = half, a1 = half, a2 = half, a3 = half;
    for (int t = 0; t < taps; t++, s += stride) {
        __m256i kt = _mm256_set1_epi32(k[t]);
        __m256i x0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)s));
        __m256i x1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(s + 8)));
        __m256i x2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(s + 16)));
        __m256i x3 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(s + 24)));
        a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(x0, kt));
        a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(x1, kt));
        a2 = _mm256_add_epi32(a2, _mm256_mullo_epi32(x2, kt));
        a3 = _mm256_add_epi32(a3, _mm256_mullo_epi32(x3, kt));
    }
    return clip32(a0, a1, a2, a3);
}

static void vrow_avx2(const uint8_t *src, size_t stride, const int32_t *k, int taps, size_t n, uint8_t *d) {
    if (n < 32) { /* shorter than one chunk: one sum at a time */
        for (size_t i = 0; i < n; i++) {
            int32_t acc = 1 << (RS_BITS - 1);
            for (int t = 0; t < taps; t++) acc += src[(size_t)t * stride + i] * k[t];
            d[i] = rs_clip(acc);
        }
        return;
    }
    size_t i = 0;
    for (; i + 32 <= n; i += 32) _mm256_storeu_si256((__m256i *)(d + i), vchunk(src + i, stride, k, taps));
    /* The tail: the last 32 samples again (the overlap is rewritten with
     * the same values). */
    if (i < n) _mm256_storeu_si256((__m256i *)(d + n - 32), vchunk(src + n - 32, stride, k, taps));
}

AVX512 static void vrow_avx512(const uint8_t *src, size_t stride, const int32_t *k, int taps, size_t n, uint8_t *d) {
    const __m512i half = _mm512_set1_epi32(1 << (RS_BITS - 1));
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512i a0 = half, a1 = half, a2 = half, a3 = half;
        const uint8_t *s = src + i;
        for (int t = 0; t < taps; t++, s += stride) {
            __m512i kt = _mm512_set1_epi32(k[t]);
            a0 =
                _mm512_add_epi32(a0, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)s)), kt));
            a1 = _mm512_add_epi32(
                a1, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s + 16))), kt));
            a2 = _mm512_add_epi32(
                a2, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s + 32))), kt));
            a3 = _mm512_add_epi32(
                a3, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s + 48))), kt));
        }
        _mm_storeu_si128((__m128i *)(d + i), clip16(a0));
        _mm_storeu_si128((__m128i *)(d + i + 16), clip16(a1));
        _mm_storeu_si128((__m128i *)(d + i + 32), clip16(a2));
        _mm_storeu_si128((__m128i *)(d + i + 48), clip16(a3));
    }
    /* The rest, 16 at a time; the last group masked so that nothing past
     * the row is read or written. */
    for (; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512i a0 = half;
        const uint8_t *s = src + i;
        for (int t = 0; t < taps; t++, s += stride)
            a0 = _mm512_add_epi32(
                a0, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, s)), _mm512_set1_epi32(k[t])));
        _mm_mask_storeu_epi8(d + i, m, clip16(a0));
    }
}

static const rs_kernels kernels_avx2 = {"avx2", hblock_avx2, vrow_avx2};
static const rs_kernels kernels_avx512 = {"avx512", hblock_avx512, vrow_avx512};

const rs_kernels *rs_kernels_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? &kernels_avx2 : NULL;
}

const rs_kernels *rs_kernels_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2")
               ? &kernels_avx512
               : NULL;
}
