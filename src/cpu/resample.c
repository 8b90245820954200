/*
 * resample.c — the scalar kernels of the Lanczos resize (the reference the
 * SIMD ones are tested against) and the choice of kernels at run time.
 * resample.h states the arithmetic.
 */
#include "resample.h"

#include <string.h>

/* Horizontal: the block's rows are transposed into blk [x][row][channel],
 * so that each tap of an output column multiplies RS_LANES consecutive
 * samples (with a zero after each pixel, resample.h) by one weight (a loop compilers vectorise);
 * the column's results then go back to their rows. */
static void hblock_scalar(const uint8_t *const src[RS_ROWS], int sw, const rs_axis *a, int dw,
                          uint8_t *const dst[RS_ROWS], int32_t *blk) {
    for (int r = 0; r < RS_ROWS; r++) {
        const uint8_t *s = src[r];
        int32_t *b = blk + r * 4;
        for (int x = 0; x < sw; x++, s += 3, b += RS_LANES) {
            b[0] = s[0];
            b[1] = s[1];
            b[2] = s[2];
            b[3] = 0;
        }
    }
    for (int xx = 0; xx < dw; xx++) {
        int32_t acc[RS_LANES];
        for (int j = 0; j < RS_LANES; j++) acc[j] = 1 << (RS_BITS - 1);
        const int32_t *k = a->w + (size_t)xx * (size_t)a->ksize;
        const int32_t *b = blk + (size_t)a->first[xx] * RS_LANES;
        for (int t = 0; t < a->n[xx]; t++, b += RS_LANES)
            for (int j = 0; j < RS_LANES; j++) acc[j] += b[j] * k[t];
        for (int r = 0; r < RS_ROWS; r++)
            for (int c = 0; c < 3; c++) dst[r][3 * xx + c] = rs_clip(acc[4 * r + c]);
    }
}

/* Vertical: RS_CHUNK sums of one output row at a time, over all its taps. */
#define RS_CHUNK 32

static void vrow_scalar(const uint8_t *src, size_t stride, const int32_t *k, int taps, size_t n, uint8_t *d) {
    for (size_t i0 = 0; i0 < n; i0 += RS_CHUNK) {
        size_t m = n - i0 < RS_CHUNK ? n - i0 : RS_CHUNK;
        int32_t acc[RS_CHUNK];
        for (size_t j = 0; j < m; j++) acc[j] = 1 << (RS_BITS - 1);
        for (int t = 0; t < taps; t++) {
            const uint8_t *s = src + (size_t)t * stride + i0;
            for (size_t j = 0; j < m; j++) acc[j] += s[j] * k[t];
        }
        for (size_t j = 0; j < m; j++) d[i0 + j] = rs_clip(acc[j]);
    }
}

static const rs_kernels scalar = {"scalar", hblock_scalar, vrow_scalar};

const rs_kernels *rs_kernels_scalar(void) { return &scalar; }

#if !defined(ALBEDO_X86)
const rs_kernels *rs_kernels_avx2(void) { return NULL; }
const rs_kernels *rs_kernels_avx512(void) { return NULL; }
#endif
#if !defined(ALBEDO_ARM64)
const rs_kernels *rs_kernels_neon(void) { return NULL; }
#endif

const rs_kernels *rs_kernels_get(const char *name) {
    if (!name || !*name) {
        const rs_kernels *k = rs_kernels_avx512();
        if (!k) k = rs_kernels_avx2();
        if (!k) k = rs_kernels_neon();
        return k ? k : &scalar;
    }
    if (!strcmp(name, "scalar")) return &scalar;
    if (!strcmp(name, "avx2")) return rs_kernels_avx2();
    if (!strcmp(name, "avx512")) return rs_kernels_avx512();
    if (!strcmp(name, "neon")) return rs_kernels_neon();
    return NULL;
}
