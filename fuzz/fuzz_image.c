/*
 * fuzz_image.c — img_decode on arbitrary bytes (JPEG, PNG, GIF, WebP sniffed
 * from the magic numbers), then, on success, img_make_crops (which resizes
 * with Lanczos twice) on the decoded image.
 *
 * The limits are small (512 a side, 64 Ki pixels) so that a header claiming a
 * huge image is refused before any allocation and one execution stays fast.
 * The crop geometry comes from the input's size: mostly small crops (a few
 * to 64 pixels, up to 6 crops), sometimes Moondream's own 378/14/4 with at
 * most 2 local crops, and now and then a geometry that must be refused.
 */
#include <string.h>

#include "fuzz.h"
#include "image.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const img_limits lim = {.max_side = 512, .max_pixels = 1 << 16};
    img_rgb im;
    errbuf e = {{0}};
    albedo_status st = img_decode(data, size, &lim, &im, &e);
    FUZZ_CHECK(st == ALBEDO_OK || st == ALBEDO_ERR_IMAGE || st == ALBEDO_ERR_LIMIT || st == ALBEDO_ERR_UNSUPPORTED ||
                   st == ALBEDO_ERR_OUT_OF_MEMORY,
               "img_decode status %d (%s)", (int)st, e.msg);
    if (st != ALBEDO_OK) {
        FUZZ_CHECK(im.px == NULL && im.w == 0 && im.h == 0, "failed decode left *out set");
        FUZZ_CHECK(e.msg[0] != 0, "error %d without a message", (int)st);
        return 0;
    }
    FUZZ_CHECK(im.px && im.w > 0 && im.h > 0 && im.w <= lim.max_side && im.h <= lim.max_side &&
                   (int64_t)im.w * im.h <= lim.max_pixels,
               "decoded %dx%d outside the limits", im.w, im.h);
    fuzz_touch(im.px, (size_t)im.w * (size_t)im.h * 3);

    /* Geometry from a hash of the size: stable for a given input. */
    uint32_t g = (uint32_t)size * 2654435761u;
    int crop, patch, margin, max_crops, bad = 0;
    switch (g >> 29) {
    case 0: /* Moondream 2's crops */ crop = 378, patch = 14, margin = 4, max_crops = 1 + (int)(g >> 8 & 1); break;
    case 1: /* a geometry that must be refused */
        crop = (int)(g >> 8 & 15) - 2, patch = (int)(g >> 12 & 7) - 1, margin = (int)(g >> 16 & 7) - 1;
        max_crops = (int)(g >> 20 & 3) - 1;
        bad = crop <= 0 || patch <= 0 || margin < 0 || max_crops < 1 || crop - 2 * margin * patch <= 0;
        break;
    default:
        patch = 1 + (int)(g >> 8 & 7);
        margin = (int)(g >> 12 & 3);
        crop = 2 * margin * patch + 1 + (int)(g >> 14 & 31);
        max_crops = 1 + (int)(g >> 20 & 3) + (int)(g >> 22 & 1);
    }
    img_crops c;
    st = img_make_crops(&im, crop, patch, margin, max_crops, &c, &e);
    if (bad) {
        FUZZ_CHECK(st == ALBEDO_ERR_INVALID_ARGUMENT, "bad geometry %d/%d/%d/%d gave %d", crop, patch, margin,
                   max_crops, (int)st);
    } else if (st == ALBEDO_OK) {
        FUZZ_CHECK(c.n == c.th * c.tw + 1 && c.th >= 1 && c.tw >= 1 && c.size == crop, "crops n=%d th=%d tw=%d size=%d",
                   c.n, c.th, c.tw, c.size);
        fuzz_touch(c.px, (size_t)c.n * (size_t)crop * (size_t)crop * 3);
        img_crops_free(&c);
    } else {
        FUZZ_CHECK(st == ALBEDO_ERR_OUT_OF_MEMORY || st == ALBEDO_ERR_LIMIT || st == ALBEDO_ERR_INVALID_ARGUMENT,
                   "img_make_crops status %d (%s)", (int)st, e.msg);
    }
    img_free(&im);
    return 0;
}
