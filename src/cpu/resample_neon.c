/*
 * resample_neon.c — the Lanczos resize kernels with NEON (resample.h): 32-bit
 * multiply-adds of widened 8-bit samples (vmlaq), exact like the scalar
 * kernels, four sums an instruction. NEON is part of every AArch64 CPU, so
 * there is nothing to detect.
 */
#include <arm_neon.h>
#include <string.h>

#include "resample.h"

/* rs_clip on 8 sums: shift, saturate to int16, then to u8. */
static inline uint8x8_t clip8(int32x4_t a, int32x4_t b) {
    return vqmovun_s16(vcombine_s16(vqmovn_s32(vshrq_n_s32(a, RS_BITS)), vqmovn_s32(vshrq_n_s32(b, RS_BITS))));
}

static void hblock_neon(const uint8_t *const src[RS_ROWS], int sw, const rs_axis *a, int dw,
                        uint8_t *const dst[RS_ROWS], int32_t *blk) {
    for (int x = 0; x < sw; x++)
        for (int r = 0; r < RS_ROWS; r++) {
            int32_t *b = blk + (size_t)x * RS_LANES + 4 * r;
            b[0] = src[r][3 * x];
            b[1] = src[r][3 * x + 1];
            b[2] = src[r][3 * x + 2];
            b[3] = 0;
        }
    const int32x4_t half = vdupq_n_s32(1 << (RS_BITS - 1));
    for (int xx = 0; xx < dw; xx++) {
        int32x4_t acc[RS_ROWS];
        for (int r = 0; r < RS_ROWS; r++) acc[r] = half;
        const int32_t *k = a->w + (size_t)xx * (size_t)a->ksize;
        const int32_t *b = blk + (size_t)a->first[xx] * RS_LANES;
        for (int t = 0; t < a->n[xx]; t++, b += RS_LANES)
            for (int r = 0; r < RS_ROWS; r++) acc[r] = vmlaq_n_s32(acc[r], vld1q_s32(b + 4 * r), k[t]);
        uint8_t out[32];
        for (int r = 0; r < RS_ROWS; r += 2) vst1_u8(out + 4 * r, clip8(acc[r], acc[r + 1]));
        for (int r = 0; r < RS_ROWS; r++) memcpy(dst[r] + 3 * (size_t)xx, out + 4 * r, 3);
    }
}

/* 16 sums of one output row over all taps. */
static inline uint8x16_t vchunk(const uint8_t *s, size_t stride, const int32_t *k, int taps) {
    const int32x4_t half = vdupq_n_s32(1 << (RS_BITS - 1));
    int32x4_t a0 = half, a1 = half, a2 = half, a3 = half;
    for (int t = 0; t < taps; t++, s += stride) {
        uint8x16_t v = vld1q_u8(s);
        uint16x8_t lo = vmovl_u8(vget_low_u8(v)), hi = vmovl_u8(vget_high_u8(v));
        a0 = vmlaq_n_s32(a0, vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(lo))), k[t]);
        a1 = vmlaq_n_s32(a1, vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(lo))), k[t]);
        a2 = vmlaq_n_s32(a2, vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(hi))), k[t]);
        a3 = vmlaq_n_s32(a3, vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(hi))), k[t]);
    }
    return vcombine_u8(clip8(a0, a1), clip8(a2, a3));
}

static void vrow_neon(const uint8_t *src, size_t stride, const int32_t *k, int taps, size_t n, uint8_t *d) {
    if (n < 16) { /* shorter than one chunk: one sum at a time */
        for (size_t i = 0; i < n; i++) {
            int32_t acc = 1 << (RS_BITS - 1);
            for (int t = 0; t < taps; t++) acc += src[(size_t)t * stride + i] * k[t];
            d[i] = rs_clip(acc);
        }
        return;
    }
    size_t i = 0;
    for (; i + 16 <= n; i += 16) vst1q_u8(d + i, vchunk(src + i, stride, k, taps));
    /* The tail: the last 16 samples again (the overlap is rewritten with
     * the same values). */
    if (i < n) vst1q_u8(d + n - 16, vchunk(src + n - 16, stride, k, taps));
}

static const rs_kernels kernels = {"neon", hblock_neon, vrow_neon};

const rs_kernels *rs_kernels_neon(void) { return &kernels; }
