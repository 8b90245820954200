/*
 * test_image_kernels.c — the Lanczos resize kernels (src/cpu/resample*.c)
 * against the scalar ones, byte for byte, for every kernel set this CPU
 * runs: each kernel alone on seeded random rows and weights of odd sizes
 * (not multiples of any vector width), with guard bytes after every output
 * row; then whole resizes and crops through image.h at several thread
 * counts against the scalar kernels on one thread. (That the scalar path is
 * Pillow's is test_image's job.) Built with -DKERNELS_ONLY it needs only
 * src/cpu/resample*.c: scripts/test-arm64.sh runs it so under qemu for the
 * NEON kernels.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/resample.h"
#include "test.h"
#ifndef KERNELS_ONLY
#include "image.h"
#endif

#define GUARD 64
#define GUARD_BYTE 0xA5

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(rng_state >> 33);
}

/* Random samples, with runs of 0 and 255 so that clamping is exercised at
 * both ends. */
static void fill_px(uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t r = rnd() % 8;
        p[i] = r == 0 ? 0 : r == 1 ? 255 : (uint8_t)rnd();
    }
}

/* An axis of out outputs over in inputs with random windows and weights:
 * Σ|w| stays under 2^23 (resample.h's bound), and sums reach both clamps. */
static int make_axis(rs_axis *a, int in, int out, int ksize) {
    memset(a, 0, sizeof *a);
    a->ksize = ksize;
    a->first = malloc((size_t)out * sizeof *a->first);
    a->n = malloc((size_t)out * sizeof *a->n);
    a->w = calloc((size_t)out * (size_t)ksize, sizeof *a->w);
    if (!a->first || !a->n || !a->w) return 0;
    for (int i = 0; i < out; i++) {
        int n = 1 + (int)(rnd() % (uint32_t)(ksize < in ? ksize : in));
        a->first[i] = (int)(rnd() % (uint32_t)(in - n + 1));
        a->n[i] = n;
        int64_t left = (1 << 23) - 1;
        for (int t = 0; t < n; t++) {
            int32_t w = (int32_t)(rnd() % (3u << 21)) - (1 << 21); /* [-2^21, 2^22) */
            if ((w < 0 ? -w : w) > left) w = 0;
            left -= w < 0 ? -w : w;
            a->w[(size_t)i * ksize + t] = w;
        }
    }
    return 1;
}

static void free_axis(rs_axis *a) {
    free(a->first);
    free(a->n);
    free(a->w);
}

/* First differing byte of two buffers, or -1. */
static long first_diff(const uint8_t *a, const uint8_t *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) return (long)i;
    return -1;
}

static int guard_ok(const uint8_t *p) {
    for (int i = 0; i < GUARD; i++)
        if (p[i] != GUARD_BYTE) return 0;
    return 1;
}

static void test_hblock(const rs_kernels *k, const rs_kernels *ref) {
    static const int sws[] = {1, 2, 3, 5, 6, 7, 13, 31, 64, 97, 255};
    static const int dws[] = {1, 3, 7, 8, 9, 17, 33, 100, 257};
    static const int ks[] = {1, 7, 13, 41};
    for (size_t a = 0; a < sizeof sws / sizeof *sws; a++)
        for (size_t b = 0; b < sizeof dws / sizeof *dws; b++)
            for (size_t c = 0; c < sizeof ks / sizeof *ks; c++) {
                int sw = sws[a], dw = dws[b];
                rs_axis ax;
                size_t rb = (size_t)dw * 3 + GUARD;
                uint8_t *src = malloc((size_t)RS_ROWS * sw * 3);
                uint8_t *got = malloc(RS_ROWS * rb), *want = malloc(RS_ROWS * rb);
                int32_t *blk = aligned_alloc(64, ((size_t)sw * RS_LANES * 4 + 63) / 64 * 64);
                if (!make_axis(&ax, sw, dw, ks[c]) || !src || !got || !want || !blk) {
                    CHECK(0, "out of memory");
                    return;
                }
                fill_px(src, (size_t)RS_ROWS * sw * 3);
                memset(got, GUARD_BYTE, RS_ROWS * rb);
                memset(want, GUARD_BYTE, RS_ROWS * rb);
                const uint8_t *s[RS_ROWS];
                uint8_t *dg[RS_ROWS], *dr[RS_ROWS];
                /* the last two rows repeat row 5, as a short block's do */
                for (int r = 0; r < RS_ROWS; r++) {
                    s[r] = src + (size_t)(r < 6 ? r : 5) * sw * 3;
                    dg[r] = got + r * rb;
                    dr[r] = want + r * rb;
                }
                ref->hblock(s, sw, &ax, dw, dr, blk);
                k->hblock(s, sw, &ax, dw, dg, blk);
                for (int r = 0; r < RS_ROWS; r++) {
                    long d = first_diff(dg[r], dr[r], (size_t)dw * 3);
                    CHECK(d < 0,
                          "%s hblock sw %d dw %d ksize %d: row %d differs at byte %ld (got %d, "
                          "want %d)",
                          k->name, sw, dw, ks[c], r, d, d < 0 ? 0 : dg[r][d], d < 0 ? 0 : dr[r][d]);
                    CHECK(guard_ok(dg[r] + (size_t)dw * 3), "%s hblock sw %d dw %d: wrote past row %d", k->name, sw, dw,
                          r);
                }
                free_axis(&ax);
                free(src);
                free(got);
                free(want);
                free(blk);
            }
}

static void test_vrow(const rs_kernels *k, const rs_kernels *ref) {
    static const size_t ns[] = {1, 2, 3, 15, 16, 17, 31, 33, 63, 65, 100, 1134, 3531};
    for (size_t a = 0; a < sizeof ns / sizeof *ns; a++)
        for (int taps = 1; taps <= 13; taps += 3) {
            size_t n = ns[a], stride = n + rnd() % 5;
            uint8_t *src = malloc(stride * (size_t)taps);
            uint8_t *got = malloc(n + GUARD), *want = malloc(n + GUARD);
            int32_t w[13];
            int64_t left = (1 << 23) - 1;
            for (int t = 0; t < taps; t++) {
                int32_t v = (int32_t)(rnd() % (3u << 21)) - (1 << 21);
                if ((v < 0 ? -v : v) > left) v = 0;
                left -= v < 0 ? -v : v;
                w[t] = v;
            }
            if (!src || !got || !want) {
                CHECK(0, "out of memory");
                return;
            }
            fill_px(src, stride * (size_t)taps);
            memset(got, GUARD_BYTE, n + GUARD);
            memset(want, GUARD_BYTE, n + GUARD);
            ref->vrow(src, stride, w, taps, n, want);
            k->vrow(src, stride, w, taps, n, got);
            long d = first_diff(got, want, n);
            CHECK(d < 0, "%s vrow n %zu taps %d: differs at byte %ld (got %d, want %d)", k->name, n, taps, d,
                  d < 0 ? 0 : got[d], d < 0 ? 0 : want[d]);
            CHECK(guard_ok(got + n), "%s vrow n %zu taps %d: wrote past the row", k->name, n, taps);
            free(src);
            free(got);
            free(want);
        }
}

#ifndef KERNELS_ONLY
/* Whole resizes and crops: every kernel set and thread count against the
 * scalar kernels on one thread. */
static void test_images(const char *kname) {
    static const int sizes[][2] = {{1, 1},     {5, 3},     {37, 211},   {378, 378},
                                   {379, 377}, {640, 427}, {1003, 117}, {97, 1201}};
    static const int outs[][2] = {{378, 378}, {1, 1}, {7, 5}, {1177, 645}, {33, 900}};
    static const int threads[] = {1, 3, 16};
    const img_exec ref = {1, "scalar"};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        img_rgb im = {sizes[i][0], sizes[i][1], malloc((size_t)sizes[i][0] * sizes[i][1] * 3)};
        if (!im.px) {
            CHECK(0, "out of memory");
            return;
        }
        fill_px(im.px, (size_t)im.w * im.h * 3);
        for (size_t t = 0; t < sizeof threads / sizeof *threads; t++) {
            img_exec x = {threads[t], kname};
            errbuf e = {{0}};
            for (size_t o = 0; o < sizeof outs / sizeof *outs; o++) {
                img_rgb a = {0}, b = {0};
                albedo_status sa = img_resize_lanczos_x(&im, outs[o][0], outs[o][1], &a, &ref, &e);
                albedo_status sb = img_resize_lanczos_x(&im, outs[o][0], outs[o][1], &b, &x, &e);
                CHECK(sa == ALBEDO_OK && sb == ALBEDO_OK, "resize %dx%d -> %dx%d: %s", im.w, im.h, outs[o][0],
                      outs[o][1], e.msg);
                if (sa == ALBEDO_OK && sb == ALBEDO_OK) {
                    long d = first_diff(a.px, b.px, (size_t)a.w * a.h * 3);
                    CHECK(d < 0, "%s, %d threads: resize %dx%d -> %dx%d differs at byte %ld", kname, threads[t], im.w,
                          im.h, outs[o][0], outs[o][1], d);
                }
                img_free(&a);
                img_free(&b);
            }
            img_crops ca = {0}, cb = {0};
            albedo_status sa = img_make_crops_x(&im, 378, 14, 4, 12, &ref, &ca, &e);
            albedo_status sb = img_make_crops_x(&im, 378, 14, 4, 12, &x, &cb, &e);
            CHECK(sa == ALBEDO_OK && sb == ALBEDO_OK && ca.n == cb.n, "crops of %dx%d: %s", im.w, im.h, e.msg);
            if (sa == ALBEDO_OK && sb == ALBEDO_OK && ca.n == cb.n) {
                long d = first_diff(ca.px, cb.px, (size_t)ca.n * 378 * 378 * 3);
                CHECK(d < 0, "%s, %d threads: crops of %dx%d differ at byte %ld (crop %ld)", kname, threads[t], im.w,
                      im.h, d, d / (378 * 378 * 3));
            }
            img_crops_free(&ca);
            img_crops_free(&cb);
        }
        img_free(&im);
    }
}

#endif

int main(void) {
    static const char *names[] = {"scalar", "avx2", "avx512", "neon"};
    const rs_kernels *ref = rs_kernels_get("scalar");
    CHECK(ref != NULL, "no scalar kernels");
    CHECK(rs_kernels_get("nonesuch") == NULL, "an unknown kernel name is accepted");
#ifndef KERNELS_ONLY
    CHECK(img_kernels_name("nonesuch") == NULL, "an unknown kernel name is accepted");
#endif
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        const rs_kernels *k = rs_kernels_get(names[i]);
        if (!k) {
            printf("%-7s not on this CPU or build\n", names[i]);
            continue;
        }
        int before = test_failed;
        test_hblock(k, ref);
        test_vrow(k, ref);
#ifndef KERNELS_ONLY
        test_images(names[i]);
#endif
        printf("%-7s %s\n", names[i], test_failed == before ? "identical to scalar" : "DIFFERS");
    }
    TEST_MAIN_END();
}
