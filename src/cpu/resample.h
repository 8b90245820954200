/*
 * resample.h — the kernels of image.c's Lanczos resize (Pillow's fixed-point
 * arithmetic, see image.c), one set per ISA behind a small table. They see
 * pixel rows and coefficient tables only: image.c owns the geometry, the
 * buffers and the threads.
 *
 * Exactness: a sample is (2^21 + Σ_t w_t · s_t) >> 22 clamped to [0, 255],
 * with 8-bit samples s_t and 32-bit weights w_t whose sum of magnitudes stays
 * under 2^23, so every partial sum fits in 32 bits and any order of the
 * additions gives the same integer. Every kernel therefore equals the scalar
 * one byte for byte (tests/test_image_kernels.c checks it on odd sizes).
 */
#ifndef ALBEDO_CPU_RESAMPLE_H
#define ALBEDO_CPU_RESAMPLE_H

#include <stddef.h>
#include <stdint.h>

#define RS_BITS 22
/* Rows the horizontal pass handles at once, transposed so that one tap of
 * one output column is RS_LANES consecutive 32-bit samples: blk [x][row][4],
 * a row's R, G, B and a zero. */
#define RS_ROWS 8
#define RS_LANES (RS_ROWS * 4)

/* Coefficients of one axis: output i reads n[i] inputs from first[i] with
 * weights w[i·ksize ...] (RS_BITS fractional bits). */
typedef struct rs_axis {
    int ksize;
    int *first, *n;
    int32_t *w; /* [n_out, ksize] */
    /* how image.c computes w (the kernels never look) */
    int n_out; /* 0: w is already set */
    double scale, filterscale, support;
} rs_axis;

typedef struct rs_kernels {
    const char *name;
    /* Horizontal pass of RS_ROWS rows: src[r] (sw pixels) -> dst[r] (dw
     * pixels, 8-bit), for r < RS_ROWS. Rows may repeat (a short block
     * repeats its last row; equal inputs give equal outputs). blk is scratch
     * of sw·RS_LANES int32, 64-byte aligned. */
    void (*hblock)(const uint8_t *const src[RS_ROWS], int sw, const rs_axis *a, int dw, uint8_t *const dst[RS_ROWS],
                   int32_t *blk);
    /* Vertical pass, one output row: d[i] = clip(Σ_t k[t] · src[t·stride + i])
     * for i < n, rows t < taps. */
    void (*vrow)(const uint8_t *src, size_t stride, const int32_t *k, int taps, size_t n, uint8_t *d);
} rs_kernels;

/* The kernels by name ("scalar", "avx2", "avx512", "neon"; NULL or "" the
 * best this CPU has), or NULL where this CPU or build lacks them. */
const rs_kernels *rs_kernels_get(const char *name);

/* Per-ISA tables (NULL where unsupported); the scalar one always exists. */
const rs_kernels *rs_kernels_scalar(void);
const rs_kernels *rs_kernels_avx2(void);
const rs_kernels *rs_kernels_avx512(void);
const rs_kernels *rs_kernels_neon(void);

/* Shared by the kernels: the rounding and clamping of one sample. */
static inline uint8_t rs_clip(int32_t v) { return v <= 0 ? 0 : v >= (256 << RS_BITS) ? 255 : (uint8_t)(v >> RS_BITS); }

#endif
