/*
 * test_image.c — image decoding, Pillow-exact Lanczos resizing, tiling and
 * crops (src/image.c) against what Pillow produced.
 *
 * Two sources of truth:
 *   - tests/data/image/expect.txt (every clone): hashes of Pillow's decode of
 *     small images in each format and mode, of Pillow resizes, and of the
 *     crops of a few images, made by tests/data/image/make_data.py;
 *   - ../shared/fixtures (when present): the reference's crops_u8 for every
 *     fixture image, which must be byte-identical.
 * Then the spec's tiling table and every kind of bad input, each with the
 * status it must give.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "safetensors.h"
#include "test.h"

#include <jansson.h>

/* FNV-1a 64, the hash make_data.py records. */
static uint64_t fnv1a64(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static const char *data_path(const char *name) {
    static char path[4096];
    snprintf(path, sizeof path, "%s/tests/data/image/%s", test_source_dir(), name);
    return path;
}

/* Loads a test image; NULL-safe failure reporting through CHECK. */
static int load(const char *name, img_rgb *im) {
    errbuf e = {{0}};
    albedo_status st = img_load_file(data_path(name), NULL, im, &e);
    CHECK(st == ALBEDO_OK, "%s: %s", name, e.msg);
    return st == ALBEDO_OK;
}

/* Names the first differing byte of two same-sized crops and how many
 * differ. */
static void report_diff(const char *what, int idx, const uint8_t *got, const uint8_t *want, int size) {
    size_t n = (size_t)size * size * 3, ndiff = 0, first = 0;
    for (size_t i = 0; i < n; i++)
        if (got[i] != want[i] && ndiff++ == 0) first = i;
    if (ndiff)
        fprintf(stderr, "  %s crop %d: %zu of %zu bytes differ, first at y=%zu x=%zu c=%zu (got %d, want %d)\n", what,
                idx, ndiff, n, first / 3 / size, first / 3 % size, first % 3, got[first], want[first]);
}

/* ---- expect.txt ------------------------------------------------------------ */

typedef struct crops_cache {
    char name[128];
    img_crops c;
} crops_cache;

static void test_expectations(void) {
    uint8_t *txt;
    size_t len;
    errbuf e = {{0}};
    albedo_status st = read_file(data_path("expect.txt"), 1 << 20, &txt, &len, &e);
    CHECK(st == ALBEDO_OK, "expect.txt: %s", e.msg);
    if (st != ALBEDO_OK) return;

    int n_decode = 0, n_resize = 0, n_crop = 0;
    crops_cache cc = {{0}, {0}};
    for (char *line = (char *)txt; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        char name[128];
        int a, b, c;
        unsigned long long h;
        if (line[0] == '#' || line[0] == 0) {
            /* comment */
        } else if (sscanf(line, "decode %127s %d %d %llx", name, &a, &b, &h) == 4) {
            img_rgb im;
            if (load(name, &im)) {
                uint64_t got = fnv1a64(im.px, (size_t)im.w * im.h * 3);
                CHECK(im.w == a && im.h == b, "%s: decoded %dx%d, Pillow %dx%d", name, im.w, im.h, a, b);
                CHECK(got == h, "%s: decode differs from Pillow (hash %016llx, want %016llx)", name,
                      (unsigned long long)got, h);
                img_free(&im);
            }
            n_decode++;
        } else if (sscanf(line, "resize %127s %d %d %llx", name, &a, &b, &h) == 4) {
            img_rgb im, out;
            if (load(name, &im)) {
                st = img_resize_lanczos(&im, a, b, &out, &e);
                CHECK(st == ALBEDO_OK, "resize %s to %dx%d: %s", name, a, b, e.msg);
                if (st == ALBEDO_OK) {
                    uint64_t got = fnv1a64(out.px, (size_t)a * b * 3);
                    CHECK(got == h, "resize %s %dx%d -> %dx%d differs from Pillow", name, im.w, im.h, a, b);
                    img_free(&out);
                }
                img_free(&im);
            }
            n_resize++;
        } else if (sscanf(line, "crops %127s %d %d %d", name, &a, &b, &c) == 4) {
            img_crops_free(&cc.c);
            snprintf(cc.name, sizeof cc.name, "%s", name);
            img_rgb im;
            if (load(name, &im)) {
                st = img_make_crops(&im, 378, 14, 4, 12, &cc.c, &e);
                CHECK(st == ALBEDO_OK, "crops %s: %s", name, e.msg);
                CHECK(cc.c.th == a && cc.c.tw == b && cc.c.n == c,
                      "crops %s: tiling %dx%d (%d crops), Pillow %dx%d (%d)", name, cc.c.th, cc.c.tw, cc.c.n, a, b, c);
                img_free(&im);
            }
        } else if (sscanf(line, "crop %127s %d %llx", name, &a, &h) == 3) {
            int have = strcmp(name, cc.name) == 0 && cc.c.px && a >= 0 && a < cc.c.n;
            CHECK(have, "crop %s %d: no such crop was made", name, a);
            if (have) {
                size_t cb = (size_t)cc.c.size * cc.c.size * 3;
                uint64_t got = fnv1a64(cc.c.px + cb * (size_t)a, cb);
                CHECK(got == h, "crops %s: crop %d differs from Pillow's", name, a);
            }
            n_crop++;
        } else if (sscanf(line, "fixture %127s %d %d %d %llx", name, &a, &b, &c, &h) == 5) {
            /* Checked in test_fixtures when ../shared is present. */
        } else {
            CHECK(0, "expect.txt: cannot parse line \"%s\"", line);
        }
        line = nl ? nl + 1 : NULL;
    }
    img_crops_free(&cc.c);
    free(txt);
    /* Guard against a truncated or emptied expect.txt passing vacuously. */
    CHECK(n_decode >= 16 && n_resize >= 8 && n_crop >= 20,
          "expect.txt holds too few cases (%d decode, %d resize, %d crop)", n_decode, n_resize, n_crop);
}

/* ---- ../shared fixtures ------------------------------------------------------ */

/* Hash recorded in expect.txt for a fixture stem, or 0. */
static uint64_t fixture_hash(const char *stem) {
    uint8_t *txt;
    size_t len;
    errbuf e;
    uint64_t found = 0;
    if (read_file(data_path("expect.txt"), 1 << 20, &txt, &len, &e) != ALBEDO_OK) return 0;
    char pat[160];
    snprintf(pat, sizeof pat, "fixture %s ", stem);
    char *p = strstr((char *)txt, pat);
    unsigned long long h;
    int a, b, c;
    if (p && sscanf(p + strlen(pat), "%d %d %d %llx", &a, &b, &c, &h) == 4) found = h;
    free(txt);
    return found;
}

static void test_fixtures(const char *shared) {
    char path[4096];
    snprintf(path, sizeof path, "%s/fixtures/reference/md2-small/cases.json", shared);
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    CHECK(root != NULL, "%s: %s", path, jerr.text);
    if (!root) return;
    json_t *cases = json_object_get(root, "cases");
    size_t i;
    json_t *cs;
    int n_images = 0;
    char done[64][128];
    int n_done = 0;
    json_array_foreach(cases, i, cs) {
        const char *image = json_string_value(json_object_get(cs, "image"));
        if (!image) continue;
        int seen = 0;
        for (int k = 0; k < n_done; k++) seen |= strcmp(done[k], image) == 0;
        if (seen || n_done == 64) continue;
        snprintf(done[n_done++], sizeof done[0], "%s", image);

        char stem[128];
        snprintf(stem, sizeof stem, "%s", image);
        char *dot = strrchr(stem, '.');
        if (dot) *dot = 0;
        char st_path[4096], img_path[4096];
        snprintf(st_path, sizeof st_path, "%s/fixtures/reference/md2-small/cases/%s.safetensors", shared, stem);
        snprintf(img_path, sizeof img_path, "%s/fixtures/images/%s", shared, image);
        errbuf e = {{0}};
        st_file *f = NULL;
        if (st_open(st_path, &f, &e) != ALBEDO_OK) continue; /* no case file: nothing to compare */
        const st_tensor *t = st_find(f, "crops_u8");
        json_t *tiling = json_object_get(cs, "tiling");
        int want_th = (int)json_integer_value(json_array_get(tiling, 0));
        int want_tw = (int)json_integer_value(json_array_get(tiling, 1));
        int want_n = (int)json_integer_value(json_object_get(cs, "n_crops"));
        CHECK(t && t->dt == DT_U8 && t->ndim == 4 && t->shape[0] == want_n && t->shape[1] == 378 &&
                  t->shape[2] == 378 && t->shape[3] == 3,
              "%s: crops_u8 missing or not [%d, 378, 378, 3] U8", st_path, want_n);

        img_rgb im;
        img_crops c = {0};
        albedo_status st = img_load_file(img_path, NULL, &im, &e);
        CHECK(st == ALBEDO_OK, "%s: %s", image, e.msg);
        if (st == ALBEDO_OK) {
            double t0 = now_ms();
            st = img_make_crops(&im, 378, 14, 4, 12, &c, &e);
            double ms = now_ms() - t0;
            CHECK(st == ALBEDO_OK, "%s: crops: %s", image, e.msg);
            CHECK(c.th == want_th && c.tw == want_tw && c.n == want_n,
                  "%s: tiling %dx%d (%d crops), reference %dx%d (%d)", image, c.th, c.tw, c.n, want_th, want_tw,
                  want_n);
            if (st == ALBEDO_OK && t && (int64_t)c.n == t->shape[0] && t->dt == DT_U8) {
                size_t cb = (size_t)378 * 378 * 3;
                int bad = 0;
                for (int k = 0; k < c.n; k++) {
                    const uint8_t *want = (const uint8_t *)t->data + cb * (size_t)k;
                    if (memcmp(c.px + cb * (size_t)k, want, cb) != 0) {
                        bad++;
                        report_diff(image, k, c.px + cb * (size_t)k, want, 378);
                    }
                }
                CHECK(bad == 0, "%s: %d of %d crops differ from crops_u8", image, bad, c.n);
                /* The compact copy used without ../shared must describe
                 * these very fixtures. */
                uint64_t h = fnv1a64(t->data, t->nbytes), rec = fixture_hash(stem);
                CHECK(h == rec, "%s: crops_u8 hash %016llx, expect.txt records %016llx", stem, (unsigned long long)h,
                      (unsigned long long)rec);
                printf("fixture %-24s %4dx%-4d tiling %dx%d: %d crops identical (%.1f ms)\n", image, im.w, im.h, c.th,
                       c.tw, c.n - bad, ms);
            }
            img_crops_free(&c);
            img_free(&im);
        }
        st_close(f);
        n_images++;
    }
    json_decref(root);
    CHECK(n_images >= 9, "only %d fixture images with case files were found", n_images);
}

/* ---- tiling ------------------------------------------------------------------ */

static void test_tiling(void) {
    /* spec §4.2's table: image W x H -> (th, tw) and the resized size. */
    static const struct {
        int w, h, th, tw;
    } table[] = {
        {378, 378, 1, 1},   {500, 500, 3, 3},   {640, 480, 2, 4},   {800, 600, 2, 4},
        {1024, 1024, 3, 3}, {1920, 1080, 2, 4}, {3000, 4000, 4, 2}, {4000, 500, 1, 9},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        int th, tw;
        img_select_tiling(table[i].h - 112, table[i].w - 112, 266, 12, &th, &tw);
        CHECK(th == table[i].th && tw == table[i].tw, "%dx%d: tiling (%d,%d), spec (%d,%d)", table[i].w, table[i].h, th,
              tw, table[i].th, table[i].tw);
    }
    /* Step 5 of the algorithm, both branches, and the guards. */
    int th, tw;
    img_select_tiling(266, 10000, 266, 12, &th, &tw);
    CHECK(th == 1 && tw == 1, "h <= c gives (1,1), got (%d,%d)", th, tw);
    img_select_tiling(-50, -50, 266, 12, &th, &tw);
    CHECK(th == 1 && tw == 1, "negative sizes give (1,1), got (%d,%d)", th, tw);
    img_select_tiling(1000, 1000, 266, 1, &th, &tw);
    CHECK(th == 1 && tw == 1, "max 1 crop gives (1,1), got (%d,%d)", th, tw);
    for (int h = 1; h < 3000; h += 37)
        for (int w = 1; w < 3000; w += 41) {
            img_select_tiling(h, w, 266, 12, &th, &tw);
            if (th < 1 || tw < 1 || th * tw > 12) {
                CHECK(0, "select_tiling(%d, %d) = (%d, %d) out of range", h, w, th, tw);
                return;
            }
        }
}

/* Crops from other geometry: sizes come from the arguments, and the local
 * crops are windows of the resized image. */
static void test_geometry(void) {
    img_rgb im, big, g;
    if (!load("tiles.jpg", &im)) return; /* 640x480 */
    errbuf e = {{0}};
    img_crops c;
    /* crop 224, patch 16, margin 2 patches: window 160, max 6 crops. */
    albedo_status st = img_make_crops(&im, 224, 16, 2, 6, &c, &e);
    CHECK(st == ALBEDO_OK, "crops 224/16/2/6: %s", e.msg);
    if (st == ALBEDO_OK) {
        int th, tw;
        img_select_tiling(480 - 64, 640 - 64, 160, 6, &th, &tw);
        CHECK(c.th == th && c.tw == tw && c.n == th * tw + 1 && c.size == 224,
              "crops 224: %dx%d n=%d size=%d, want %dx%d", c.th, c.tw, c.n, c.size, th, tw);
        CHECK(th * tw > 1, "geometry test should tile (got %dx%d)", th, tw);
        size_t cb = (size_t)224 * 224 * 3;
        if (img_resize_lanczos(&im, 224, 224, &g, &e) == ALBEDO_OK) {
            CHECK(memcmp(c.px, g.px, cb) == 0, "crop 0 is not the image resized to 224x224");
            img_free(&g);
        }
        if (img_resize_lanczos(&im, tw * 160 + 64, th * 160 + 64, &big, &e) == ALBEDO_OK) {
            int bad = 0;
            for (int i = 0; i < th; i++)
                for (int j = 0; j < tw; j++)
                    for (int y = 0; y < 224; y++)
                        bad += memcmp(c.px + cb * (size_t)(1 + i * tw + j) + (size_t)y * 224 * 3,
                                      big.px + ((size_t)(160 * i + y) * big.w + 160 * j) * 3, 224 * 3) != 0;
            CHECK(bad == 0, "%d local crop rows are not windows of the resized image", bad);
            img_free(&big);
        }
        img_crops_free(&c);
    }
    /* 1x1 tiling: the local crop equals the global one. */
    st = img_make_crops(&im, 378, 14, 4, 1, &c, &e);
    CHECK(st == ALBEDO_OK && c.n == 2 && memcmp(c.px, c.px + 378 * 378 * 3, 378 * 378 * 3) == 0,
          "max_crops 1: two identical crops expected");
    img_crops_free(&c);

    /* Bad geometry. */
    st = img_make_crops(&im, 100, 14, 4, 12, &c, &e); /* window 100 - 112 < 0 */
    CHECK(st == ALBEDO_ERR_INVALID_ARGUMENT && c.px == NULL, "negative window: status %d", st);
    st = img_make_crops(&im, 378, 14, 4, 1000000, &c, &e); /* tiles of a 318k-wide resize */
    CHECK(st == ALBEDO_ERR_LIMIT && c.px == NULL, "absurd max_crops: status %d", st);
    st = img_make_crops(&im, 378, 0, 4, 12, &c, &e);
    CHECK(st == ALBEDO_ERR_INVALID_ARGUMENT, "patch 0: status %d", st);
    st = img_make_crops(&im, 378, 14, 4, 0, &c, &e);
    CHECK(st == ALBEDO_ERR_INVALID_ARGUMENT, "max_crops 0: status %d", st);
    img_rgb empty = {0};
    st = img_make_crops(&empty, 378, 14, 4, 12, &c, &e);
    CHECK(st == ALBEDO_ERR_INVALID_ARGUMENT, "empty image: status %d", st);
    img_free(&im);
}

/* Resize properties that need no reference: identity, and a constant image
 * staying constant (weights sum to one in fixed point, up or down). */
static void test_resize_props(void) {
    img_rgb im = {7, 5, malloc(7 * 5 * 3)}, out;
    errbuf e = {{0}};
    for (int i = 0; i < 7 * 5 * 3; i++) im.px[i] = (uint8_t)(i * 37);
    CHECK(img_resize_lanczos(&im, 7, 5, &out, &e) == ALBEDO_OK && memcmp(out.px, im.px, 7 * 5 * 3) == 0,
          "same-size resize must copy");
    img_free(&out);
    for (int i = 0; i < 7 * 5 * 3; i++) im.px[i] = (uint8_t)(i % 3 == 0 ? 200 : i % 3 == 1 ? 0 : 255);
    int sizes[][2] = {{1, 1}, {3, 9}, {40, 2}, {500, 377}, {7, 300}, {300, 5}};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        int w = sizes[s][0], h = sizes[s][1], bad = 0;
        if (img_resize_lanczos(&im, w, h, &out, &e) != ALBEDO_OK) {
            CHECK(0, "resize to %dx%d: %s", w, h, e.msg);
            continue;
        }
        for (int i = 0; i < w * h; i++)
            bad += out.px[3 * i] != 200 || out.px[3 * i + 1] != 0 || out.px[3 * i + 2] != 255;
        CHECK(bad == 0, "constant image resized to %dx%d: %d pixels changed", w, h, bad);
        img_free(&out);
    }
    CHECK(img_resize_lanczos(&im, 0, 5, &out, &e) == ALBEDO_ERR_INVALID_ARGUMENT && !out.px,
          "zero width must be rejected");
    CHECK(img_resize_lanczos(&im, 5, -1, &out, &e) == ALBEDO_ERR_INVALID_ARGUMENT, "negative height must be rejected");
    img_rgb empty = {0};
    CHECK(img_resize_lanczos(&empty, 5, 5, &out, &e) == ALBEDO_ERR_INVALID_ARGUMENT, "empty source must be rejected");
    img_free(&im);
}

/* ---- bad input ----------------------------------------------------------------- */

static uint8_t *read_data(const char *name, size_t *len) {
    uint8_t *buf = NULL;
    errbuf e;
    if (read_file(data_path(name), 1 << 24, &buf, len, &e) != ALBEDO_OK) {
        CHECK(0, "%s: %s", name, e.msg);
        return NULL;
    }
    return buf;
}

/* Decodes and expects status want, and that *out was left empty. */
static void expect_status(const char *what, const uint8_t *buf, size_t len, const img_limits *lim, albedo_status want,
                          const char *needle) {
    img_rgb im = {1, 1, (uint8_t *)1}; /* garbage in, must be zeroed */
    errbuf e = {{0}};
    albedo_status st = img_decode(buf, len, lim, &im, &e);
    CHECK(st == want, "%s: status %d (%s), want %d: %s", what, st, albedo_status_str(st), want, e.msg);
    if (st == ALBEDO_OK) {
        img_free(&im);
        return;
    }
    CHECK(im.px == NULL && im.w == 0 && im.h == 0, "%s: output not cleared on failure", what);
    CHECK(e.msg[0] != 0, "%s: no message", what);
    if (needle) CHECK(strstr(e.msg, needle) != NULL, "%s: message \"%s\" lacks \"%s\"", what, e.msg, needle);
}

static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static void test_bad_input(void) {
    errbuf e = {{0}};
    uint8_t junk[512];
    uint32_t s = 12345;
    for (size_t i = 0; i < sizeof junk; i++) {
        s = s * 1103515245u + 12345u;
        junk[i] = (uint8_t)(s >> 16);
    }
    junk[0] = 0x42; /* not a magic number of any format */
    junk[1] = 0x00;
    expect_status("zero bytes", junk, 0, NULL, ALBEDO_ERR_IMAGE, "empty");
    expect_status("NULL buffer", NULL, 10, NULL, ALBEDO_ERR_IMAGE, NULL);
    expect_status("random bytes", junk, sizeof junk, NULL, ALBEDO_ERR_IMAGE, "unrecognised image format");
    expect_status("one byte", junk, 1, NULL, ALBEDO_ERR_IMAGE, "unrecognised");
    /* Each format's magic followed by junk. */
    static const uint8_t jpg_magic[] = {0xff, 0xd8, 0xff, 0xe0};
    static const uint8_t png_magic[] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    uint8_t tmp[sizeof junk];
    memcpy(tmp, junk, sizeof tmp);
    memcpy(tmp, jpg_magic, sizeof jpg_magic);
    expect_status("JPEG magic + junk", tmp, sizeof tmp, NULL, ALBEDO_ERR_IMAGE, "JPEG");
    memcpy(tmp, junk, sizeof tmp);
    memcpy(tmp, png_magic, sizeof png_magic);
    expect_status("PNG magic + junk", tmp, sizeof tmp, NULL, ALBEDO_ERR_IMAGE, "PNG");
    memcpy(tmp, junk, sizeof tmp);
    memcpy(tmp, "GIF89a", 6);
    expect_status("GIF magic + junk", tmp, sizeof tmp, NULL, ALBEDO_ERR_IMAGE, "GIF");
    memcpy(tmp, junk, sizeof tmp);
    memcpy(tmp, "RIFF\x10\0\0\0WEBPVP8 ", 16);
    expect_status("WebP magic + junk", tmp, sizeof tmp, NULL, ALBEDO_ERR_IMAGE, "WebP");
    memcpy(tmp, junk, sizeof tmp);
    memcpy(tmp, "BM", 2);
    expect_status("BMP", tmp, sizeof tmp, NULL, ALBEDO_ERR_UNSUPPORTED, "BMP");

    /* Every test file cut in half, and cut just short of its end. */
    static const char *files[] = {
        "baseline.jpg", "progressive.jpg",        "cmyk.jpg",         "grey.png",   "interlaced.png",   "rgb16.png",
        "lossy.webp",   "lossless_alpha.webp",    "anim_offset.webp", "pillow.gif", "offset_trans.gif", "grey_trns.png",
        "rgba16.png",   "pal_trns_interlaced.png"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        size_t len;
        uint8_t *buf = read_data(files[i], &len);
        if (!buf) continue;
        char what[160];
        snprintf(what, sizeof what, "%s cut in half", files[i]);
        expect_status(what, buf, len / 2, NULL, ALBEDO_ERR_IMAGE, NULL);
        snprintf(what, sizeof what, "%s cut to 40 bytes", files[i]);
        expect_status(what, buf, 40, NULL, ALBEDO_ERR_IMAGE, NULL);
        free(buf);
    }
    size_t len;
    uint8_t *buf = read_data("baseline.jpg", &len);
    if (buf) {
        /* A JPEG missing its last 100 bytes of scan data: Pillow calls it
         * truncated, and so must we (libjpeg itself would only warn). */
        expect_status("JPEG missing its tail", buf, len - 100, NULL, ALBEDO_ERR_IMAGE, "truncated");
        /* Corrupt: an unsupported sample precision in the frame header. */
        for (size_t i = 2; i + 4 < len; i++)
            if (buf[i] == 0xff && (buf[i + 1] == 0xc0 || buf[i + 1] == 0xc2)) {
                buf[i + 4] = 7;
                break;
            }
        expect_status("JPEG with a corrupt frame header", buf, len, NULL, ALBEDO_ERR_IMAGE, "JPEG");
        free(buf);
    }
    buf = read_data("baseline.jpg", &len);
    if (buf) {
        /* Frame header claiming 60000x60000: refused from the header alone. */
        for (size_t i = 2; i + 8 < len; i++)
            if (buf[i] == 0xff && buf[i + 1] == 0xc0) {
                buf[i + 5] = 0xea, buf[i + 6] = 0x60, buf[i + 7] = 0xea, buf[i + 8] = 0x60;
                break;
            }
        expect_status("JPEG 60000x60000", buf, len, NULL, ALBEDO_ERR_LIMIT, "60000x60000");
        free(buf);
    }
    buf = read_data("grey.png", &len);
    if (buf) {
        uint8_t *copy = malloc(len);
        memcpy(copy, buf, len);
        copy[29] ^= 0xff; /* IHDR's CRC */
        expect_status("PNG with a bad IHDR CRC", copy, len, NULL, ALBEDO_ERR_IMAGE, "PNG");
        memcpy(copy, buf, len);
        copy[len / 2] ^= 0x55; /* inside IDAT: its CRC no longer matches */
        expect_status("PNG with a bad IDAT CRC", copy, len, NULL, ALBEDO_ERR_IMAGE, "PNG");
        free(copy);
        free(buf);
    }
    /* Chunks that image.c takes out before decoding (a greyscale file's
     * tRNS, an APNG's acTL) must still have their checksum checked. Each
     * follows the 33 bytes of signature and IHDR; a byte of its CRC flipped. */
    static const struct {
        const char *file, *chunk, *what;
        size_t crc_byte;
    } taken_out[] = {{"grey_trns.png", "tRNS", "PNG with a bad tRNS CRC", 45},
                     {"apng_default.png", "acTL", "APNG with a bad acTL CRC", 52}};
    for (size_t i = 0; i < sizeof taken_out / sizeof taken_out[0]; i++) {
        buf = read_data(taken_out[i].file, &len);
        if (!buf) continue;
        CHECK(len > taken_out[i].crc_byte + 1 && !memcmp(buf + 37, taken_out[i].chunk, 4), "%s: %s right after IHDR",
              taken_out[i].file, taken_out[i].chunk);
        buf[taken_out[i].crc_byte] ^= 0x01;
        expect_status(taken_out[i].what, buf, len, NULL, ALBEDO_ERR_IMAGE, taken_out[i].chunk);
        free(buf);
    }

    /* A PNG header claiming 100000x100000 (no image data at all): refused
     * with the limits before anything is decoded or allocated. */
    uint8_t hdr[57] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
    put_be32(hdr + 16, 100000);
    put_be32(hdr + 20, 100000);
    hdr[24] = 8; /* depth */
    hdr[25] = 2; /* RGB */
    expect_status("PNG 100000x100000", hdr, sizeof hdr, NULL, ALBEDO_ERR_LIMIT, "100000x100000");
    put_be32(hdr + 16, 0);
    expect_status("PNG 0x100000", hdr, sizeof hdr, NULL, ALBEDO_ERR_IMAGE, "zero size");
    /* Custom limits: by side and by pixel count. */
    buf = read_data("baseline.jpg", &len); /* 97x61 */
    if (buf) {
        img_limits side = {96, 1 << 20}, pixels = {4096, 97 * 61 - 1}, ok = {97, 97 * 61}, bad = {0, 5};
        expect_status("97x61 over a 96-pixel side", buf, len, &side, ALBEDO_ERR_LIMIT, "96");
        expect_status("97x61 over 5916 pixels", buf, len, &pixels, ALBEDO_ERR_LIMIT, "5916");
        expect_status("97x61 at the limits", buf, len, &ok, ALBEDO_OK, NULL);
        expect_status("non-positive limits", buf, len, &bad, ALBEDO_ERR_INVALID_ARGUMENT, NULL);
        free(buf);
    }
    buf = read_data("pillow.gif", &len);
    if (buf) {
        buf[6] = 0xff, buf[7] = 0xff, buf[8] = 0xff, buf[9] = 0xff; /* screen 65535x65535 */
        img_limits lim = {8192, 1 << 24};
        expect_status("GIF screen 65535x65535", buf, len, &lim, ALBEDO_ERR_LIMIT, "65535");
        free(buf);
    }
    buf = read_data("lossy.webp", &len);
    if (buf) {
        img_limits lim = {64, 1 << 24}; /* the image is 97x61 */
        expect_status("WebP over the side limit", buf, len, &lim, ALBEDO_ERR_LIMIT, "97x61");
        free(buf);
    }

    /* Files. */
    img_rgb im;
    albedo_status st = img_load_file("/nonexistent/dir/image.png", NULL, &im, &e);
    CHECK(st == ALBEDO_ERR_IO && strstr(e.msg, "No such file") != NULL && im.px == NULL, "missing file: status %d: %s",
          st, e.msg);
    st = img_load_file(test_source_dir(), NULL, &im, &e);
    CHECK(st == ALBEDO_ERR_IO, "a directory: status %d: %s", st, e.msg);
    st = img_load_file(data_path("expect.txt"), NULL, &im, &e);
    CHECK(st == ALBEDO_ERR_IMAGE && strstr(e.msg, "expect.txt") != NULL, "a text file: status %d: %s", st, e.msg);

    /* Freeing what is empty or already freed. */
    img_rgb zero = {0};
    img_free(&zero);
    img_free(&zero);
    img_free(NULL);
    img_crops zc = {0};
    img_crops_free(&zc);
    img_crops_free(NULL);
    CHECK(zero.px == NULL && zc.px == NULL, "free of empty objects");
}

int main(void) {
    test_expectations();
    test_tiling();
    test_geometry();
    test_resize_props();
    test_bad_input();
    const char *shared = test_shared_dir();
    if (shared)
        test_fixtures(shared);
    else
        printf("../shared not found: fixture crops checked through tests/data/image only\n");
    TEST_MAIN_END();
}
