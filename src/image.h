/*
 * image.h — image decoding, Pillow-compatible Lanczos resizing, and
 * Moondream's overlapping crops (spec/model.md §4).
 *
 * Decoding reproduces what the reference gets from Pillow's
 * Image.open(...).convert("RGB"): libjpeg-turbo with its defaults (accurate
 * integer IDCT, fancy upsampling), CMYK/YCCK handled, greyscale replicated,
 * alpha and palette transparency dropped, 16-bit samples reduced as Pillow
 * does; GIF gives its first frame; WebP through libwebp.
 */
#ifndef ALBEDO_IMAGE_H
#define ALBEDO_IMAGE_H

#include "common.h"

typedef struct img_rgb {
    int w, h;
    uint8_t *px; /* [h, w, 3], malloc'ed */
} img_rgb;

typedef struct img_limits {
    int max_side;       /* largest width or height accepted */
    int64_t max_pixels; /* largest w*h accepted */
} img_limits;

/* The limits used when lim is NULL: 65535 pixels a side and 178,956,970
 * pixels in all (Pillow's decompression-bomb error threshold). */
img_limits img_limits_default(void);

/* Decode bytes (format sniffed from the magic numbers). Dimensions are
 * checked against lim (NULL: img_limits_default()) before any pixel memory is
 * allocated. Errors: ALBEDO_ERR_IMAGE (empty, truncated, corrupt or
 * unrecognised data), ALBEDO_ERR_LIMIT (too large), ALBEDO_ERR_UNSUPPORTED
 * (a recognised format this build does not decode), ALBEDO_ERR_OUT_OF_MEMORY.
 * On failure *out is zeroed. */
albedo_status img_decode(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out, errbuf *e);
albedo_status img_load_file(const char *path, const img_limits *lim, img_rgb *out, errbuf *e);
void img_free(img_rgb *im);

/* Pillow's Image.resize(size, Image.LANCZOS) on an 8-bit RGB image, bit for
 * bit: separable Lanczos-3 scaled by the reduction factor, fixed-point
 * coefficients, horizontal pass first, each pass rounded and clamped. */
albedo_status img_resize_lanczos(const img_rgb *src, int out_w, int out_h, img_rgb *dst, errbuf *e);

/* spec §4.2 select_tiling(h, w, c, max). */
void img_select_tiling(int h, int w, int c, int max_crops, int *th, int *tw);

/* spec §4.1: the global crop then th*tw overlapping local crops, each
 * crop_size x crop_size x 3 u8, in *crops (malloc'ed, [n, cs, cs, 3]). The
 * two resizes run together on up to 16 threads (as many as the work pays
 * for, one per CPU at most); the bytes do not depend on the count. */
typedef struct img_crops {
    int n;      /* th*tw + 1 */
    int th, tw; /* tiling */
    int size;   /* crop side, 378 */
    uint8_t *px;
} img_crops;

albedo_status img_make_crops(const img_rgb *im, int crop_size, int patch_size, int margin_patches, int max_crops,
                             img_crops *out, errbuf *e);
void img_crops_free(img_crops *c);

/* How the resizer runs, for tests and benchmarks (the library passes NULL,
 * meaning the defaults); the output never depends on it. */
typedef struct img_exec {
    int threads;         /* 0: as many as the work pays for, one per CPU at most, up to 16;
                            else exactly this many, up to 16 */
    const char *kernels; /* NULL: the best this CPU has; else "scalar", "avx2", "avx512", "neon" */
} img_exec;

albedo_status img_resize_lanczos_x(const img_rgb *src, int out_w, int out_h, img_rgb *dst, const img_exec *x,
                                   errbuf *e);
albedo_status img_make_crops_x(const img_rgb *im, int crop_size, int patch_size, int margin_patches, int max_crops,
                               const img_exec *x, img_crops *out, errbuf *e);
/* The name of the kernels that name selects (NULL: the best this CPU has),
 * or NULL where this CPU or build lacks them (the _x functions then fail
 * with ALBEDO_ERR_UNSUPPORTED). */
const char *img_kernels_name(const char *name);

#endif
