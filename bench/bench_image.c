/*
 * bench_image.c — the host's part of a cold image: JPEG/PNG bytes to the
 * crops the vision encoder reads (src/image.c), step by step, median of N
 * runs, at 1, 2 and all threads. Prints a table per image:
 *
 *   decode            img_decode (libjpeg-turbo / Wuffs)
 *   global resize     the image to crop x crop (Lanczos, Pillow-exact)
 *   tiled resize      the image to the tiling's size
 *   crops             img_make_crops (both resizes and the crop copies)
 *   decode + crops    what a cold request pays on the host
 *
 *   bench_image [--repeats N] [--kernels NAME] [FILE...]
 *
 * Without files: tests/data/images/rocket.jpg (640x427, 9 crops; the source
 * tree's, else the working directory's), a chart
 * rendered here and PNG-encoded in memory (800x600, the size of
 * `albedo bench chartqa`'s first chart), and tests/data/images/big.jpg
 * (2400x1800). --kernels picks the resize kernels (scalar, avx2, avx512,
 * neon; default the best this CPU has).
 */
#define _POSIX_C_SOURCE 200809L
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench_util.h"
#include "image.h"

static void die(const char *what, const char *msg) {
    fprintf(stderr, "bench_image: %s: %s\n", what, msg);
    exit(1);
}

/* tests/data/images/NAME of the source tree, or of the working directory
 * (a copy of the tree on another machine, as scripts/gpu-check.sh runs it). */
static uint8_t *read_data(const char *name, size_t *len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/data/images/%s", ALBEDO_SOURCE_DIR, name);
    FILE *f = fopen(path, "rb");
    if (!f) snprintf(path, sizeof path, "tests/data/images/%s", name);
    if (f) fclose(f);
    return bench_read_file("bench_image", path, len);
}

/* A bar chart (white ground, grid, bars, text-like blocks), as PNG bytes
 * with libpng's default compression. */
typedef struct membuf {
    uint8_t *p;
    size_t n, cap;
} membuf;

static void png_put(png_structp png, png_bytep d, size_t n) {
    membuf *b = png_get_io_ptr(png);
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p) die("chart", "out of memory");
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}

static void png_flush_none(png_structp png) { (void)png; }

static void fill(uint8_t *im, int w, int x0, int y0, int x1, int y1, int r, int g, int b) {
    for (int y = y0; y < y1; y++)
        for (int x = x0; x < x1; x++) {
            uint8_t *p = im + ((size_t)y * w + x) * 3;
            p[0] = (uint8_t)r, p[1] = (uint8_t)g, p[2] = (uint8_t)b;
        }
}

static uint8_t *chart_png(int w, int h, size_t *len) {
    uint8_t *im = malloc((size_t)w * h * 3);
    if (!im) die("chart", "out of memory");
    memset(im, 255, (size_t)w * h * 3);
    uint32_t s = 12345;
    const int L = w / 10, R = w - w / 20, T = h / 8, B = h - h / 8;
    for (int k = 0; k < 5; k++) fill(im, w, L, T + k * (B - T) / 5, R, T + k * (B - T) / 5 + 1, 225, 225, 225);
    fill(im, w, L, T, L + 2, B, 40, 40, 40);
    fill(im, w, L, B, R, B + 2, 40, 40, 40);
    for (int x = w / 4; x < 3 * w / 4;) {
        s = s * 1664525u + 1013904223u;
        int ww = 8 + (int)(s >> 27);
        fill(im, w, x, T / 3, x + ww, T / 3 + 12, 40, 40, 40);
        x += ww + 8;
    }
    for (int i = 0; i < 9; i++) {
        s = s * 1664525u + 1013904223u;
        int slot = (R - L) / 9, x0 = L + i * slot + slot / 5, x1 = x0 + slot * 3 / 5;
        int y0 = B - (int)((s >> 8) % (uint32_t)(B - T - 20)) - 5;
        fill(im, w, x0, y0, x1, B, 60, 110, 190);
        fill(im, w, x0 + 2, y0 - 14, x0 + 20, y0 - 4, 40, 40, 40);
        fill(im, w, x0, B + 8, x0 + 30, B + 18, 40, 40, 40);
    }
    membuf b = {0};
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png ? png_create_info_struct(png) : NULL;
    if (!info || setjmp(png_jmpbuf(png))) die("chart", "libpng failed");
    png_set_write_fn(png, &b, png_put, png_flush_none);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int y = 0; y < h; y++) png_write_row(png, im + (size_t)y * w * 3);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    free(im);
    *len = b.n;
    return b.p;
}

enum { CROP = 378, PATCH = 14, MARGIN = 4, MAX_CROPS = 12 };

static void bench_one(const char *name, const uint8_t *buf, size_t len, int reps, const char *kernels) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int threads[3] = {1, 2, (int)cpus};
    int n_cols = cpus > 2 ? 3 : 2;
    double t[5][3];
    img_rgb im;
    img_crops cr;
    errbuf e;
    double *v = malloc((size_t)reps * sizeof *v);
    if (!v) die("bench", "out of memory");
    int th = 0, tw = 0, w = 0, h = 0;
    for (int c = 0; c < n_cols; c++) {
        img_exec x = {threads[c], kernels};
        /* decode */
        for (int r = 0; r < reps; r++) {
            double t0 = bench_now_ms();
            if (img_decode(buf, len, NULL, &im, &e)) die(name, e.msg);
            v[r] = bench_now_ms() - t0;
            w = im.w, h = im.h;
            img_free(&im);
        }
        t[0][c] = bench_median(v, reps);
        if (img_decode(buf, len, NULL, &im, &e)) die(name, e.msg);
        img_select_tiling(im.h - 2 * MARGIN * PATCH, im.w - 2 * MARGIN * PATCH, CROP - 2 * MARGIN * PATCH, MAX_CROPS,
                          &th, &tw);
        const int win = CROP - 2 * MARGIN * PATCH;
        const int sizes[2][2] = {{CROP, CROP}, {tw * win + 2 * MARGIN * PATCH, th * win + 2 * MARGIN * PATCH}};
        for (int k = 0; k < 2; k++) {
            for (int r = 0; r < reps; r++) {
                img_rgb out;
                double t0 = bench_now_ms();
                if (img_resize_lanczos_x(&im, sizes[k][0], sizes[k][1], &out, &x, &e)) die(name, e.msg);
                v[r] = bench_now_ms() - t0;
                img_free(&out);
            }
            t[1 + k][c] = bench_median(v, reps);
        }
        for (int r = 0; r < reps; r++) {
            double t0 = bench_now_ms();
            if (img_make_crops_x(&im, CROP, PATCH, MARGIN, MAX_CROPS, &x, &cr, &e)) die(name, e.msg);
            v[r] = bench_now_ms() - t0;
            img_crops_free(&cr);
        }
        t[3][c] = bench_median(v, reps);
        img_free(&im);
        for (int r = 0; r < reps; r++) {
            double t0 = bench_now_ms();
            if (img_decode(buf, len, NULL, &im, &e) ||
                img_make_crops_x(&im, CROP, PATCH, MARGIN, MAX_CROPS, &x, &cr, &e))
                die(name, e.msg);
            v[r] = bench_now_ms() - t0;
            img_free(&im);
            img_crops_free(&cr);
        }
        t[4][c] = bench_median(v, reps);
    }
    printf("\n%s: %dx%d, tiling %dx%d (%d crops), kernels %s, median of %d\n", name, w, h, th, tw, th * tw + 1,
           img_kernels_name(kernels), reps);
    printf("%-28s", "ms");
    for (int c = 0; c < n_cols; c++) printf(" %7d thr", threads[c]);
    printf("\n");
    static const char *rows[5] = {"decode", "global resize", "tiled resize", "crops (both resizes, copies)",
                                  "decode + crops"};
    for (int k = 0; k < 5; k++) {
        printf("%-28s", rows[k]);
        for (int c = 0; c < n_cols; c++) printf(" %11.2f", t[k][c]);
        printf("\n");
    }
    free(v);
}

int main(int argc, char **argv) {
    int reps = 21, i = 1;
    const char *kernels = NULL;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--repeats") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--kernels") && i + 1 < argc)
            kernels = argv[++i];
        else
            die(argv[i], "usage: bench_image [--repeats N] [--kernels NAME] [FILE...]");
    }
    if (reps < 1) reps = 1;
    if (i < argc) {
        for (; i < argc; i++) {
            size_t len;
            uint8_t *b = bench_read_file("bench_image", argv[i], &len);
            bench_one(argv[i], b, len, reps, kernels);
            free(b);
        }
        return 0;
    }
    size_t len;
    uint8_t *b = read_data("rocket.jpg", &len);
    bench_one("rocket.jpg", b, len, reps, kernels);
    free(b);
    b = chart_png(800, 600, &len);
    bench_one("chart 800x600 PNG", b, len, reps, kernels);
    free(b);
    b = read_data("big.jpg", &len);
    bench_one("big.jpg", b, len, reps > 5 ? reps / 3 : reps, kernels);
    free(b);
    return 0;
}
