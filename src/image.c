/*
 * image.c — turning image bytes into Moondream's crops (spec/model.md §4):
 * decoding (JPEG, PNG, WebP, GIF) to 8-bit RGB, a Lanczos resize that is bit
 * for bit Pillow's, and the global + overlapping local crops.
 *
 * It is not the vision encoder: crops leave here as u8 [n, 378, 378, 3];
 * normalisation to [-1, 1] and patchification belong to vision.c.
 *
 *     bytes --sniff--> jpeg | png | webp | gif --> img_rgb [H, W, 3] u8
 *                                                      |
 *              +-------------------------+-------------+
 *              | resize to 378x378       | resize to (th*266+112) x (tw*266+112)
 *              v                         v
 *       crop 0 (global)        th x tw windows of 378x378 at 266-px steps
 *                              = crops 1 .. th*tw (row-major)
 *
 * Why so much care about exactness: the reference decoded with Pillow and
 * resized with Pillow's Lanczos, and the fixtures require identical crops, so
 * every step below reproduces what Pillow's Image.open(f).convert("RGB") and
 * Image.resize((w, h), LANCZOS) produce, including Pillow's quirks (16-bit
 * greyscale PNG is clipped, not scaled; CMYK JPEG is read with Adobe's inverted
 * polarity; a GIF's first frame is not composited onto a background colour).
 * Decoding itself is left to libjpeg(-turbo), libpng, libwebp and giflib: every
 * library error is caught (setjmp or return codes) and becomes a status.
 */
#include "image.h"

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h> /* jpeglib.h needs FILE and size_t declared first */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gif_lib.h>
#include <jpeglib.h>
#include <png.h>
#include <webp/decode.h>

#include <jerror.h> /* after jpeglib.h: message codes (JWRN_JPEG_EOF) */

/* The Lanczos coefficients below must round exactly as Pillow's do. A fused
 * multiply-add rounds once where Pillow's C rounds twice, which can move a
 * coefficient by one unit in the last place and, rarely, a pixel by one
 * level; so contraction is off for this file. (GCC in ISO C mode, as the
 * build uses, already does not contract; clang contracts unless told.) */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* Files larger than this are refused before reading: no supported image
 * within img_limits needs more. */
#define IMG_MAX_FILE_BYTES ((size_t)256 << 20)

img_limits img_limits_default(void) {
    /* Pillow's decompression-bomb error threshold (2 * MAX_IMAGE_PIXELS). */
    img_limits l = {65535, 178956970};
    return l;
}

/* ---- Dimension checks and small helpers ---------------------------------- */

/* Checks decoded dimensions before any pixel memory exists. */
static albedo_status check_dims(const char *fmt, int64_t w, int64_t h, const img_limits *lim,
                                errbuf *e) {
    img_limits def = img_limits_default();
    if (!lim) lim = &def;
    if (w <= 0 || h <= 0)
        return errf(e, ALBEDO_ERR_IMAGE, "%s: image has zero size (%lldx%lld)", fmt, (long long)w,
                    (long long)h);
    if (w > lim->max_side || h > lim->max_side)
        return errf(e, ALBEDO_ERR_LIMIT,
                    "%s: image is %lldx%lld, larger than the %d-pixel side limit", fmt,
                    (long long)w, (long long)h, lim->max_side);
    if (w * h > lim->max_pixels)
        return errf(e, ALBEDO_ERR_LIMIT,
                    "%s: image is %lldx%lld = %lld pixels, more than the limit of %lld", fmt,
                    (long long)w, (long long)h, (long long)(w * h), (long long)lim->max_pixels);
    return ALBEDO_OK;
}

static albedo_status alloc_rgb(img_rgb *im, int w, int h, errbuf *e) {
    im->w = w;
    im->h = h;
    im->px = malloc((size_t)w * (size_t)h * 3);
    if (!im->px) {
        im->w = im->h = 0;
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "image: out of memory for %dx%d pixels", w, h);
    }
    return ALBEDO_OK;
}

void img_free(img_rgb *im) {
    if (!im) return;
    free(im->px);
    im->px = NULL;
    im->w = im->h = 0;
}

/* ---- JPEG (libjpeg-turbo) ------------------------------------------------- */

/* libjpeg reports fatal errors through error_exit, which must not return: we
 * jump back to decode_jpeg. Warnings are ignored, as Pillow ignores them
 * (corrupt entropy data decodes to something, as it does there), except
 * "premature end of file": Pillow refuses truncated files unless
 * LOAD_TRUNCATED_IMAGES is set, so we refuse them too. A missing EOI marker
 * after the last scanline is accepted, as Pillow accepts it. */
typedef struct jpg_err {
    struct jpeg_error_mgr pub;
    jmp_buf jb;
    int eof_ok; /* set once every scanline has been read */
    int truncated;
    char msg[JMSG_LENGTH_MAX];
} jpg_err;

static void jpg_error_exit(j_common_ptr cinfo) {
    jpg_err *je = (jpg_err *)cinfo->err;
    cinfo->err->format_message(cinfo, je->msg);
    longjmp(je->jb, 1);
}

static void jpg_emit_message(j_common_ptr cinfo, int level) {
    jpg_err *je = (jpg_err *)cinfo->err;
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF && !je->eof_ok) {
        je->truncated = 1;
        longjmp(je->jb, 1);
    }
}

static void jpg_output_message(j_common_ptr cinfo) { (void)cinfo; }

/* Pillow reads CMYK JPEGs as "CMYK;I" (Adobe's inverted polarity, which
 * Photoshop writes and libjpeg hands back unchanged) and converts CMYK to RGB
 * as r = (255 - k) - round((255 - k) * c / 255) with c and k the un-inverted
 * values, rounding the product as its MULDIV255 macro does. */
static inline uint8_t cmyk_channel(uint8_t raw_c, uint8_t raw_k) {
    int c = 255 - raw_c, nk = raw_k; /* nk = 255 - (255 - raw_k) */
    int t = c * nk + 128;
    int v = nk - (((t >> 8) + t) >> 8);
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

static albedo_status decode_jpeg(const uint8_t *buf, size_t len, const img_limits *lim,
                                 img_rgb *out, errbuf *e) {
    struct jpeg_decompress_struct cinfo;
    jpg_err je;
    /* Written after setjmp and read after longjmp, hence volatile. */
    uint8_t *volatile px = NULL;
    uint8_t *volatile row = NULL;
    volatile albedo_status st = ALBEDO_OK;

    memset(&je, 0, sizeof je);
    cinfo.err = jpeg_std_error(&je.pub);
    je.pub.error_exit = jpg_error_exit;
    je.pub.emit_message = jpg_emit_message;
    je.pub.output_message = jpg_output_message;
    if (setjmp(je.jb)) {
        if (st == ALBEDO_OK) {
            if (je.truncated)
                st = errf(e, ALBEDO_ERR_IMAGE, "JPEG: file is truncated (%zu bytes)", len);
            else
                st = errf(e, ALBEDO_ERR_IMAGE, "JPEG: corrupt data: %s", je.msg);
        }
        jpeg_destroy_decompress(&cinfo);
        free(px);
        free(row);
        return st;
    }
    jpeg_create_decompress(&cinfo);
    /* jpeg_mem_src takes an unsigned long length. */
    if ((unsigned long)len != len) {
        st = errf(e, ALBEDO_ERR_LIMIT, "JPEG: %zu bytes is too large", len);
        longjmp(je.jb, 1);
    }
    jpeg_mem_src(&cinfo, buf, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);

    st = check_dims("JPEG", cinfo.image_width, cinfo.image_height, lim, e);
    if (st != ALBEDO_OK) longjmp(je.jb, 1);

    /* Pillow's modes: 1 component "L", 3 "RGB", 4 "CMYK"; libjpeg decides
     * the colour transform (YCbCr, Adobe RGB, YCCK) from the markers, as it
     * does for Pillow, which leaves jpeg_color_space alone. */
    int nc = cinfo.num_components;
    if (nc == 1)
        cinfo.out_color_space = JCS_GRAYSCALE;
    else if (nc == 3)
        cinfo.out_color_space = JCS_RGB;
    else if (nc == 4)
        cinfo.out_color_space = JCS_CMYK;
    else {
        st = errf(e, ALBEDO_ERR_UNSUPPORTED, "JPEG: %d colour components are not supported", nc);
        longjmp(je.jb, 1);
    }
    /* Pillow's (and libjpeg's) defaults, set explicitly because the output
     * depends on them: accurate integer IDCT, smooth chroma upsampling. */
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_start_decompress(&cinfo);

    int w = (int)cinfo.output_width, h = (int)cinfo.output_height;
    px = malloc((size_t)w * (size_t)h * 3);
    if (nc != 3) row = malloc((size_t)w * (size_t)cinfo.output_components);
    if (!px || (nc != 3 && !row)) {
        st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "JPEG: out of memory for %dx%d pixels", w, h);
        longjmp(je.jb, 1);
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        int y = (int)cinfo.output_scanline;
        uint8_t *dst = px + (size_t)y * (size_t)w * 3;
        JSAMPROW rp = nc == 3 ? dst : row;
        if (jpeg_read_scanlines(&cinfo, &rp, 1) != 1) {
            st = errf(e, ALBEDO_ERR_IMAGE, "JPEG: decoding stopped at row %d of %d", y, h);
            longjmp(je.jb, 1);
        }
        if (nc == 1) {
            for (int x = 0; x < w; x++) dst[3 * x] = dst[3 * x + 1] = dst[3 * x + 2] = row[x];
        } else if (nc == 4) {
            for (int x = 0; x < w; x++) {
                const uint8_t *s = row + 4 * x;
                dst[3 * x + 0] = cmyk_channel(s[0], s[3]);
                dst[3 * x + 1] = cmyk_channel(s[1], s[3]);
                dst[3 * x + 2] = cmyk_channel(s[2], s[3]);
            }
        }
    }
    je.eof_ok = 1;
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    free(row);
    out->w = w;
    out->h = h;
    out->px = px;
    return ALBEDO_OK;
}

/* ---- PNG (libpng) ---------------------------------------------------------- */

typedef struct png_ctx {
    const uint8_t *buf;
    size_t len, pos;
    char msg[256];
} png_ctx;

static void png_read_mem(png_structp png, png_bytep dst, size_t n) {
    png_ctx *c = png_get_io_ptr(png);
    if (n > c->len - c->pos) png_error(png, "file is truncated");
    memcpy(dst, c->buf + c->pos, n);
    c->pos += n;
}

static void png_on_error(png_structp png, png_const_charp msg) {
    png_ctx *c = png_get_error_ptr(png);
    snprintf(c->msg, sizeof c->msg, "%s", msg);
    png_longjmp(png, 1);
}

/* libpng's warnings (bad ancillary chunks, unknown profiles) do not stop
 * Pillow either; the default handler would print them. */
static void png_on_warning(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg;
}

/* One row of libpng's output (after the transforms chosen in decode_png) to
 * RGB. 16-bit greyscale arrives as big-endian 16-bit samples: Pillow opens it
 * as mode "I;16", whose conversion to RGB clips at 255 instead of scaling, so
 * the same is done here. Every other 16-bit type was reduced by libpng to its
 * most significant byte, as Pillow's "RGB;16B"/"RGBA;16B"/"LA;16B" do. */
static void png_row_to_rgb(const uint8_t *s, uint8_t *d, int w, int channels, int depth) {
    if (depth == 16) { /* greyscale only */
        for (int x = 0; x < w; x++) {
            uint8_t v = s[2 * x] ? 255 : s[2 * x + 1];
            d[3 * x] = d[3 * x + 1] = d[3 * x + 2] = v;
        }
        return;
    }
    switch (channels) {
    case 1:
        for (int x = 0; x < w; x++) d[3 * x] = d[3 * x + 1] = d[3 * x + 2] = s[x];
        break;
    case 2:
        for (int x = 0; x < w; x++) d[3 * x] = d[3 * x + 1] = d[3 * x + 2] = s[2 * x];
        break;
    case 3:
        memcpy(d, s, (size_t)w * 3);
        break;
    default:
        for (int x = 0; x < w; x++) {
            d[3 * x + 0] = s[4 * x + 0];
            d[3 * x + 1] = s[4 * x + 1];
            d[3 * x + 2] = s[4 * x + 2];
        }
        break;
    }
}

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static albedo_status decode_png(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out,
                                errbuf *e) {
    /* IHDR must be the first chunk; its size is checked against the limits
     * before libpng sees the file, so an absurd header costs nothing. */
    if (len < 33 || memcmp(buf + 12, "IHDR", 4) != 0)
        return errf(e, ALBEDO_ERR_IMAGE, "PNG: file is truncated or does not start with IHDR");
    albedo_status st0 = check_dims("PNG", be32(buf + 16), be32(buf + 20), lim, e);
    if (st0 != ALBEDO_OK) return st0;

    png_ctx ctx = {buf, len, 0, {0}};
    png_structp png =
        png_create_read_struct(PNG_LIBPNG_VER_STRING, &ctx, png_on_error, png_on_warning);
    if (!png) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "PNG: out of memory");
    png_infop info = png_create_info_struct(png);
    if (!info) {
        png_destroy_read_struct(&png, NULL, NULL);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "PNG: out of memory");
    }
    uint8_t *volatile px = NULL;
    uint8_t *volatile raw = NULL;
    volatile albedo_status st = ALBEDO_OK;
    if (setjmp(png_jmpbuf(png))) {
        if (st == ALBEDO_OK) st = errf(e, ALBEDO_ERR_IMAGE, "PNG: %s", ctx.msg);
        png_destroy_read_struct(&png, &info, NULL);
        free(px);
        free(raw);
        return st;
    }
    png_set_read_fn(png, &ctx, png_read_mem);
    png_read_info(png, info);

    png_uint_32 w32, h32;
    int depth, ctype, interlace;
    png_get_IHDR(png, info, &w32, &h32, &depth, &ctype, &interlace, NULL, NULL);
    st = check_dims("PNG", w32, h32, lim, e);
    if (st != ALBEDO_OK) png_longjmp(png, 1);
    int w = (int)w32, h = (int)h32;

    /* Transforms to at most 8 bits per sample (16-bit grey excepted, see
     * png_row_to_rgb). Palette transparency may become an alpha channel; it
     * is dropped with every other alpha, as convert("RGB") drops it. */
    if (ctype == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
    if (ctype == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(png);
    if (depth == 16 && ctype != PNG_COLOR_TYPE_GRAY) png_set_strip_16(png);
    int passes = png_set_interlace_handling(png);
    png_read_update_info(png, info);
    int channels = png_get_channels(png, info);
    int odepth = png_get_bit_depth(png, info);
    size_t rowbytes = png_get_rowbytes(png, info);
    if (channels < 1 || channels > 4 || (odepth != 8 && !(odepth == 16 && channels == 1)) ||
        rowbytes < (size_t)w * (size_t)channels * (size_t)(odepth / 8)) {
        st = errf(e, ALBEDO_ERR_INTERNAL, "PNG: unexpected layout after transforms (%d x %d-bit)",
                  channels, odepth);
        png_longjmp(png, 1);
    }

    px = malloc((size_t)w * (size_t)h * 3);
    /* Interlaced images arrive in passes that each touch every row, so they
     * need the whole raw image; others go one row at a time. */
    raw = passes > 1 ? calloc((size_t)h, rowbytes) : malloc(rowbytes);
    if (!px || !raw) {
        st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "PNG: out of memory for %dx%d pixels", w, h);
        png_longjmp(png, 1);
    }
    if (passes > 1) {
        for (int p = 0; p < passes; p++)
            for (int y = 0; y < h; y++) png_read_row(png, raw + rowbytes * (size_t)y, NULL);
        for (int y = 0; y < h; y++)
            png_row_to_rgb(raw + rowbytes * (size_t)y, px + (size_t)y * (size_t)w * 3, w, channels,
                           odepth);
    } else {
        for (int y = 0; y < h; y++) {
            png_read_row(png, raw, NULL);
            png_row_to_rgb(raw, px + (size_t)y * (size_t)w * 3, w, channels, odepth);
        }
    }
    /* Chunks after the image data are not read: Pillow ignores them too, and
     * a missing IEND does not stop it. */
    png_destroy_read_struct(&png, &info, NULL);
    free(raw);
    out->w = w;
    out->h = h;
    out->px = px;
    return ALBEDO_OK;
}

/* ---- WebP (libwebp) -------------------------------------------------------- */

static uint32_t le24(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
}
static uint32_t le32(const uint8_t *p) { return le24(p) | (uint32_t)p[3] << 24; }

/* An animated WebP's first frame, as Pillow (libwebp's WebPAnimDecoder) gives
 * it: the canvas starts transparent black and the frame's own pixels are
 * written at its offset without blending (the first frame has nothing to
 * blend with), so after dropping alpha the area outside the frame is black.
 * The frame's bitstream (VP8 or VP8L chunk) decodes like a still image; its
 * ALPH chunk, if any, only carries alpha and is skipped. */
static albedo_status decode_webp_anim(const uint8_t *buf, size_t len, const img_limits *lim,
                                      img_rgb *out, errbuf *e) {
    /* RIFF header (12) + VP8X chunk header (8) + payload (10). */
    if (len < 30) return errf(e, ALBEDO_ERR_IMAGE, "WebP: file is truncated");
    /* Pillow's demuxer refuses an animation with any frame cut off, even
     * though only the first is shown: check that every chunk is whole. */
    for (size_t p = 12; p < len;) {
        if (len - p < 8) return errf(e, ALBEDO_ERR_IMAGE, "WebP: file is truncated");
        uint32_t n = le32(buf + p + 4);
        if (n > len - p - 8) return errf(e, ALBEDO_ERR_IMAGE, "WebP: file is truncated");
        p += 8 + (size_t)n + (n & 1);
    }
    int64_t cw = (int64_t)le24(buf + 24) + 1, ch = (int64_t)le24(buf + 27) + 1;
    albedo_status st = check_dims("WebP", cw, ch, lim, e);
    if (st != ALBEDO_OK) return st;
    size_t pos = 12;
    while (pos + 8 <= len) {
        uint32_t csize = le32(buf + pos + 4);
        size_t body = pos + 8;
        if (csize > len - body) return errf(e, ALBEDO_ERR_IMAGE, "WebP: file is truncated");
        if (memcmp(buf + pos, "ANMF", 4) == 0) {
            if (csize < 16) return errf(e, ALBEDO_ERR_IMAGE, "WebP: ANMF chunk too short");
            int64_t fx = 2 * (int64_t)le24(buf + body), fy = 2 * (int64_t)le24(buf + body + 3);
            int64_t fw = (int64_t)le24(buf + body + 6) + 1, fh = (int64_t)le24(buf + body + 9) + 1;
            if (fx + fw > cw || fy + fh > ch)
                return errf(e, ALBEDO_ERR_IMAGE, "WebP: first frame lies outside the canvas");
            /* Find the frame's image chunk, skipping ALPH and unknown ones. */
            size_t q = body + 16, end = body + csize;
            while (q + 8 <= end) {
                uint32_t qs = le32(buf + q + 4);
                if (qs > end - q - 8) break;
                if (memcmp(buf + q, "VP8 ", 4) == 0 || memcmp(buf + q, "VP8L", 4) == 0) {
                    int iw, ih;
                    if (!WebPGetInfo(buf + q, qs + 8, &iw, &ih) || iw != fw || ih != fh)
                        return errf(e, ALBEDO_ERR_IMAGE, "WebP: first frame is corrupt");
                    uint8_t *frame = WebPDecodeRGB(buf + q, qs + 8, &iw, &ih);
                    if (!frame) return errf(e, ALBEDO_ERR_IMAGE, "WebP: first frame is corrupt");
                    st = alloc_rgb(out, (int)cw, (int)ch, e);
                    if (st != ALBEDO_OK) {
                        WebPFree(frame);
                        return st;
                    }
                    memset(out->px, 0, (size_t)cw * (size_t)ch * 3);
                    for (int64_t y = 0; y < fh; y++)
                        memcpy(out->px + ((size_t)(fy + y) * (size_t)cw + (size_t)fx) * 3,
                               frame + (size_t)y * (size_t)fw * 3, (size_t)fw * 3);
                    WebPFree(frame);
                    return ALBEDO_OK;
                }
                q += 8 + qs + (qs & 1);
            }
            return errf(e, ALBEDO_ERR_IMAGE, "WebP: first frame has no image data");
        }
        pos = body + csize + (csize & 1);
    }
    return errf(e, ALBEDO_ERR_IMAGE, "WebP: animation has no frame");
}

static albedo_status decode_webp(const uint8_t *buf, size_t len, const img_limits *lim,
                                 img_rgb *out, errbuf *e) {
    WebPBitstreamFeatures f;
    VP8StatusCode vs = WebPGetFeatures(buf, len, &f);
    if (vs == VP8_STATUS_NOT_ENOUGH_DATA)
        return errf(e, ALBEDO_ERR_IMAGE, "WebP: file is truncated");
    if (vs != VP8_STATUS_OK)
        return errf(e, ALBEDO_ERR_IMAGE, "WebP: corrupt header (libwebp status %d)", (int)vs);
    if (f.has_animation) return decode_webp_anim(buf, len, lim, out, e);
    albedo_status st = check_dims("WebP", f.width, f.height, lim, e);
    if (st != ALBEDO_OK) return st;
    st = alloc_rgb(out, f.width, f.height, e);
    if (st != ALBEDO_OK) return st;
    size_t stride = (size_t)f.width * 3;
    /* Alpha, if present, is decoded separately and simply not asked for: the
     * colour samples are the same as in RGBA output. */
    if (!WebPDecodeRGBInto(buf, len, out->px, stride * (size_t)f.height, (int)stride)) {
        img_free(out);
        return errf(e, ALBEDO_ERR_IMAGE, "WebP: corrupt or truncated image data");
    }
    return ALBEDO_OK;
}

/* ---- GIF (giflib) ---------------------------------------------------------- */

typedef struct gif_src {
    const uint8_t *buf;
    size_t len, pos;
    int padded; /* the end of the data has been read past */
} gif_src;

/* giflib's reader. Pillow accepts a GIF whose data stops right after the
 * first frame's pixels (block terminator and trailer missing) and refuses one
 * cut inside them; giflib reads the terminator after the last pixel, so the
 * end of the data reads as one terminator byte (0), then fails. A frame cut
 * short still fails, since a terminator inside pixel data is an error. */
static int gif_read_mem(GifFileType *g, GifByteType *dst, int n) {
    gif_src *s = g->UserData;
    size_t k = (size_t)n;
    if (n <= 0) return 0;
    if (s->pos == s->len && n == 1 && !s->padded) {
        s->padded = 1;
        dst[0] = 0;
        return 1;
    }
    if (k > s->len - s->pos) k = s->len - s->pos;
    memcpy(dst, s->buf + s->pos, k);
    s->pos += k;
    return (int)k; /* a short read is reported by giflib as a read error */
}

static albedo_status gif_fail(GifFileType *g, uint8_t *idx, int code, errbuf *e) {
    const char *m = GifErrorString(code);
    int truncated = code == D_GIF_ERR_READ_FAILED;
    if (g) {
        truncated |= ((gif_src *)g->UserData)->padded;
        int ignored;
        DGifCloseFile(g, &ignored);
    }
    free(idx);
    if (truncated) return errf(e, ALBEDO_ERR_IMAGE, "GIF: file is truncated");
    return errf(e, ALBEDO_ERR_IMAGE, "GIF: %s", m ? m : "corrupt data");
}

/* Pillow treats a colour table whose entry i is (i, i, i) for every i as no
 * palette at all (mode "L"): the index is then the grey level, even past the
 * table's end. */
static int gif_is_ramp(const ColorMapObject *cm) {
    for (int i = 0; i < cm->ColorCount; i++)
        if (cm->Colors[i].Red != i || cm->Colors[i].Green != i || cm->Colors[i].Blue != i) return 0;
    return 1;
}

/* The first frame as Pillow's convert("RGB") shows it: the canvas is the
 * logical screen, grown to hold the frame if it sticks out; before the frame
 * is drawn, every canvas pixel holds the transparency index if the frame has
 * one, else index 0; the frame's pixels (transparent ones included) then
 * replace the canvas's. Indices map through the frame's local colour table,
 * else the global one, with entries past the table's end black; with neither
 * (or a grey ramp, see gif_is_ramp) index i is grey i. The background colour
 * index is not used. */
static albedo_status decode_gif(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out,
                                errbuf *e) {
    gif_src src = {buf, len, 0, 0};
    int err = 0;
    GifFileType *g = DGifOpen(&src, gif_read_mem, &err);
    if (!g) return gif_fail(NULL, NULL, err, e);
    int trans = -1;
    for (;;) {
        GifRecordType rt;
        if (DGifGetRecordType(g, &rt) == GIF_ERROR) return gif_fail(g, NULL, g->Error, e);
        if (rt == TERMINATE_RECORD_TYPE) {
            int ignored;
            DGifCloseFile(g, &ignored);
            return errf(e, ALBEDO_ERR_IMAGE, "GIF: file contains no image");
        }
        if (rt == EXTENSION_RECORD_TYPE) {
            int code;
            GifByteType *ext;
            if (DGifGetExtension(g, &code, &ext) == GIF_ERROR)
                return gif_fail(g, NULL, g->Error, e);
            if (code == GRAPHICS_EXT_FUNC_CODE && ext && ext[0] >= 4 && (ext[1] & 1))
                trans = ext[4];
            while (ext) {
                if (DGifGetExtensionNext(g, &ext) == GIF_ERROR)
                    return gif_fail(g, NULL, g->Error, e);
            }
            continue;
        }
        if (rt != IMAGE_DESC_RECORD_TYPE) continue;

        if (DGifGetImageDesc(g) == GIF_ERROR) return gif_fail(g, NULL, g->Error, e);
        const GifImageDesc *d = &g->Image;
        int64_t fx = d->Left, fy = d->Top, fw = d->Width, fh = d->Height;
        int64_t cw = fx + fw > g->SWidth ? fx + fw : g->SWidth;
        int64_t ch = fy + fh > g->SHeight ? fy + fh : g->SHeight;
        albedo_status st = check_dims("GIF", cw, ch, lim, e);
        if (st != ALBEDO_OK) {
            int ignored;
            DGifCloseFile(g, &ignored);
            return st;
        }
        size_t n = (size_t)cw * (size_t)ch;
        uint8_t *idx = malloc(n);
        if (!idx) {
            int ignored;
            DGifCloseFile(g, &ignored);
            return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "GIF: out of memory");
        }
        memset(idx, trans >= 0 ? trans : 0, n);
        /* Interlaced rows come in four passes: every 8th row from 0, every
         * 8th from 4, every 4th from 2, every 2nd from 1. */
        static const int start[4] = {0, 4, 2, 1}, step[4] = {8, 8, 4, 2};
        int npass = d->Interlace ? 4 : 1;
        for (int p = 0; p < npass; p++) {
            int y0 = d->Interlace ? start[p] : 0, dy = d->Interlace ? step[p] : 1;
            for (int64_t y = y0; y < fh; y += dy) {
                if (DGifGetLine(g, idx + (size_t)(fy + y) * (size_t)cw + (size_t)fx, (int)fw) ==
                    GIF_ERROR)
                    return gif_fail(g, idx, g->Error, e);
            }
        }
        const ColorMapObject *cm = d->ColorMap ? d->ColorMap : g->SColorMap;
        uint8_t pal[256][3];
        if (!cm || gif_is_ramp(cm)) {
            for (int i = 0; i < 256; i++) pal[i][0] = pal[i][1] = pal[i][2] = (uint8_t)i;
        } else {
            memset(pal, 0, sizeof pal);
            for (int i = 0; i < cm->ColorCount && i < 256; i++) {
                pal[i][0] = cm->Colors[i].Red;
                pal[i][1] = cm->Colors[i].Green;
                pal[i][2] = cm->Colors[i].Blue;
            }
        }
        int ignored;
        DGifCloseFile(g, &ignored);
        st = alloc_rgb(out, (int)cw, (int)ch, e);
        if (st != ALBEDO_OK) {
            free(idx);
            return st;
        }
        for (size_t i = 0; i < n; i++) memcpy(out->px + 3 * i, pal[idx[i]], 3);
        free(idx);
        return ALBEDO_OK;
    }
}

/* ---- Format dispatch --------------------------------------------------------- */

albedo_status img_decode(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out,
                         errbuf *e) {
    if (!out) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "image: no output given");
    memset(out, 0, sizeof *out);
    if (!buf || len == 0) return errf(e, ALBEDO_ERR_IMAGE, "image: empty data (0 bytes)");
    if (lim && (lim->max_side <= 0 || lim->max_pixels <= 0))
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "image: limits must be positive (%d, %lld)",
                    lim->max_side, (long long)lim->max_pixels);

    static const uint8_t png_magic[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (len >= 3 && buf[0] == 0xff && buf[1] == 0xd8 && buf[2] == 0xff)
        return decode_jpeg(buf, len, lim, out, e);
    if (len >= 8 && memcmp(buf, png_magic, 8) == 0) return decode_png(buf, len, lim, out, e);
    if (len >= 12 && memcmp(buf, "RIFF", 4) == 0 && memcmp(buf + 8, "WEBP", 4) == 0)
        return decode_webp(buf, len, lim, out, e);
    if (len >= 6 && (memcmp(buf, "GIF87a", 6) == 0 || memcmp(buf, "GIF89a", 6) == 0))
        return decode_gif(buf, len, lim, out, e);

    /* Formats people do send that this build does not decode: say which. */
    const char *known = NULL;
    if (len >= 2 && buf[0] == 'B' && buf[1] == 'M')
        known = "BMP";
    else if (len >= 4 && (memcmp(buf, "II*\0", 4) == 0 || memcmp(buf, "MM\0*", 4) == 0))
        known = "TIFF";
    else if (len >= 12 && memcmp(buf + 4, "ftyp", 4) == 0)
        known = "HEIF/AVIF";
    if (known)
        return errf(e, ALBEDO_ERR_UNSUPPORTED,
                    "image: %s is not supported (JPEG, PNG, WebP and GIF are)", known);
    return errf(e, ALBEDO_ERR_IMAGE,
                "image: unrecognised image format (%zu bytes starting %02x %02x %02x %02x)", len,
                buf[0], len > 1 ? buf[1] : 0, len > 2 ? buf[2] : 0, len > 3 ? buf[3] : 0);
}

albedo_status img_load_file(const char *path, const img_limits *lim, img_rgb *out, errbuf *e) {
    if (!out) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "image: no output given");
    memset(out, 0, sizeof *out);
    if (!path) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "image: no path given");
    uint8_t *buf;
    size_t len;
    albedo_status st = read_file(path, IMG_MAX_FILE_BYTES, &buf, &len, e);
    if (st != ALBEDO_OK) return st;
    errbuf inner = {{0}};
    st = img_decode(buf, len, lim, out, &inner);
    free(buf);
    if (st != ALBEDO_OK) errf(e, st, "%s: %s", path, inner.msg);
    return st;
}

/* ---- Lanczos resize, bit-exact with Pillow ------------------------------------
 *
 * Pillow's ImagingResample (libImaging/Resample.c) for 8-bit images, per axis
 * of in -> out pixels:
 *   scale = in/out; filterscale = max(scale, 1); support = 3·filterscale
 *   output i has centre c = (i + 0.5)·scale and reads input pixels
 *   [xmin, xmin + n) with xmin = max(0, (int)(c - support + 0.5)),
 *   xmin + n = min(in, (int)(c + support + 0.5)); tap x weighs
 *   lanczos3((x - c + 0.5) / filterscale), normalised to sum 1, then
 *   rounded half away from zero to fixed point with 22 fractional bits.
 *   A pixel is (2^21 + Σ weight·sample) >> 22, clamped to [0, 255].
 * The horizontal pass runs first, over only the rows the vertical pass will
 * read, into an 8-bit intermediate; a pass whose axis keeps its size is
 * skipped. Integer sums cannot overflow: Σ|weight| stays well under 2^23. */

#define RS_BITS 22

static double sinc(double x) {
    if (x == 0.0) return 1.0;
    x = x * 3.14159265358979323846;
    return sin(x) / x;
}

static double lanczos3(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }

/* Coefficients of one axis: output i reads n[i] inputs from first[i] with
 * weights w[i·ksize ...]. */
typedef struct rs_axis {
    int ksize;
    int *first, *n;
    int32_t *w;
} rs_axis;

static void rs_axis_free(rs_axis *a) {
    free(a->first);
    free(a->n);
    free(a->w);
}

static albedo_status rs_axis_init(rs_axis *a, int in, int out, errbuf *e) {
    memset(a, 0, sizeof *a);
    /* Pillow computes in1 - in0 in float, then widens: exact for any int
     * size an image can have. */
    double scale = (double)in / out;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 3.0 * filterscale;
    a->ksize = (int)ceil(support) * 2 + 1;
    double *k = malloc((size_t)a->ksize * sizeof *k);
    a->first = malloc((size_t)out * sizeof *a->first);
    a->n = malloc((size_t)out * sizeof *a->n);
    a->w = malloc((size_t)out * (size_t)a->ksize * sizeof *a->w);
    if (!k || !a->first || !a->n || !a->w) {
        free(k);
        rs_axis_free(a);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "resize: out of memory for %d -> %d", in, out);
    }
    for (int i = 0; i < out; i++) {
        double center = (i + 0.5) * scale;
        double ss = 1.0 / filterscale, ww = 0.0;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in) xmax = in;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            double wt = lanczos3((x + xmin - center + 0.5) * ss);
            k[x] = wt;
            ww += wt;
        }
        int32_t *kw = a->w + (size_t)i * (size_t)a->ksize;
        for (int x = 0; x < a->ksize; x++) {
            double v = x < xmax ? (ww != 0.0 ? k[x] / ww : k[x]) : 0.0;
            kw[x] = (int32_t)(v < 0 ? -0.5 + v * (1 << RS_BITS) : 0.5 + v * (1 << RS_BITS));
        }
        a->first[i] = xmin;
        a->n[i] = xmax;
    }
    free(k);
    return ALBEDO_OK;
}

static inline uint8_t rs_clip(int32_t v) {
    return v <= 0 ? 0 : v >= (256 << RS_BITS) ? 255 : (uint8_t)(v >> RS_BITS);
}

/* Speed without intrinsics: both passes are written so that their inner
 * loops have a fixed length over 16-bit samples and 32-bit sums, which
 * compilers vectorise even at -O2 (8-bit samples need a two-step widening
 * that GCC's -O2 cost model refuses). The arithmetic is Pillow's, only done
 * in another order, which exact integer sums do not notice.
 *
 * Horizontal pass: RS_ROWS rows at a time are transposed into
 * [column][row][channel] order, so that for each output column every tap
 * reads RS_LANES consecutive samples. */
#define RS_ROWS 8
#define RS_LANES (RS_ROWS * 3)

/* src rows [y0, y1) (width sw) -> rows [0, y1 - y0) of width dw, written as
 * 8-bit pixels to dst8 or, for the vertical pass to read, as 16-bit samples
 * to dst16 (row stride dstride samples). blk holds sw·RS_LANES samples. */
static void rs_horizontal(const uint8_t *src, int sw, int y0, int y1, const rs_axis *a, int dw,
                          uint8_t *dst8, int16_t *dst16, size_t dstride, int16_t *blk) {
    for (int yb = y0; yb < y1; yb += RS_ROWS) {
        int nr = y1 - yb < RS_ROWS ? y1 - yb : RS_ROWS;
        /* Missing rows of the last block repeat its last row; their results
         * are not stored. */
        for (int r = 0; r < RS_ROWS; r++) {
            const uint8_t *s = src + (size_t)(yb + (r < nr ? r : nr - 1)) * (size_t)sw * 3;
            int16_t *b = blk + r * 3;
            for (int x = 0; x < sw; x++, s += 3, b += RS_LANES) {
                b[0] = s[0];
                b[1] = s[1];
                b[2] = s[2];
            }
        }
        for (int xx = 0; xx < dw; xx++) {
            int32_t acc[RS_LANES];
            for (int j = 0; j < RS_LANES; j++) acc[j] = 1 << (RS_BITS - 1);
            const int32_t *k = a->w + (size_t)xx * (size_t)a->ksize;
            const int16_t *b = blk + (size_t)a->first[xx] * RS_LANES;
            for (int t = 0; t < a->n[xx]; t++, b += RS_LANES) {
                int32_t kt = k[t];
                for (int j = 0; j < RS_LANES; j++) acc[j] += b[j] * kt;
            }
            for (int r = 0; r < nr; r++) {
                size_t o = (size_t)(yb - y0 + r) * dstride + (size_t)xx * 3;
                for (int c = 0; c < 3; c++) {
                    uint8_t v = rs_clip(acc[3 * r + c]);
                    if (dst16)
                        dst16[o + c] = v;
                    else
                        dst8[o + c] = v;
                }
            }
        }
    }
}

/* Vertical pass: whole rows are accumulated RS_CHUNK samples at a time; rows
 * are padded to a multiple of RS_CHUNK so that no loop has a remainder. */
#define RS_CHUNK 16

static size_t rs_padded(size_t n) { return (n + RS_CHUNK - 1) / RS_CHUNK * RS_CHUNK; }

/* src: 16-bit rows of stride rs_padded(w·3), row 0 being input row `offset`
 * -> dst rows [yy0, yy1) of 8-bit pixels. acc holds rs_padded(w·3) sums. */
static void rs_vertical(const int16_t *src, int w, int offset, const rs_axis *a, int yy0, int yy1,
                        uint8_t *dst, int32_t *acc) {
    size_t n = (size_t)w * 3, stride = rs_padded(n);
    for (int yy = yy0; yy < yy1; yy++) {
        const int32_t *k = a->w + (size_t)yy * (size_t)a->ksize;
        for (size_t i = 0; i < stride; i++) acc[i] = 1 << (RS_BITS - 1);
        for (int t = 0; t < a->n[yy]; t++) {
            const int16_t *s = src + (size_t)(a->first[yy] - offset + t) * stride;
            int32_t kt = k[t];
            for (size_t i = 0; i < stride; i += RS_CHUNK)
                for (int j = 0; j < RS_CHUNK; j++) acc[i + j] += s[i + j] * kt;
        }
        uint8_t *d = dst + (size_t)yy * n;
        for (size_t i = 0; i < n; i++) d[i] = rs_clip(acc[i]);
    }
}

/* Largest output side accepted: keeps every size product in range and far
 * exceeds anything the crops need. */
#define RS_MAX_SIDE (1 << 16)

/* Both passes split into bands of rows on up to RS_THREADS threads when the
 * work is large enough to pay for starting them (a 640x480 photo's tiled
 * resize is ~40 million multiply-adds). Every output row is computed by
 * exactly the same arithmetic as on one thread, so the result is identical.
 * A thread that cannot be started leaves its band to the caller. */
#define RS_THREADS 8
#define RS_MIN_WORK_PER_THREAD 4000000.0

typedef struct rs_band {
    /* horizontal */
    const uint8_t *src;
    int sw, y0, y1, dw;
    const rs_axis *a;
    uint8_t *dst8;
    int16_t *dst16;
    size_t dstride;
    int16_t *blk;
    /* vertical (src16 set) */
    const int16_t *src16;
    int offset, yy0, yy1;
    int32_t *acc;
    uint8_t *dst;
} rs_band;

static void *rs_band_run(void *arg) {
    rs_band *b = arg;
    if (b->src16)
        rs_vertical(b->src16, b->dw, b->offset, b->a, b->yy0, b->yy1, b->dst, b->acc);
    else
        rs_horizontal(b->src, b->sw, b->y0, b->y1, b->a, b->dw, b->dst8, b->dst16, b->dstride, b->blk);
    return NULL;
}

static int rs_threads_for(double work, int max_threads) {
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int n = (int)(work / RS_MIN_WORK_PER_THREAD);
    if (n > RS_THREADS) n = RS_THREADS;
    if (max_threads > 0 && n > max_threads) n = max_threads;
    if (cpus > 0 && n > cpus) n = (int)cpus;
    return n < 1 ? 1 : n;
}

/* Run bands [0, n) on threads (band 0 on the caller). */
static void rs_run_bands(rs_band *b, int n) {
    pthread_t th[RS_THREADS];
    int started[RS_THREADS] = {0};
    for (int i = 1; i < n; i++) started[i] = pthread_create(&th[i], NULL, rs_band_run, &b[i]) == 0;
    rs_band_run(&b[0]);
    for (int i = 1; i < n; i++) {
        if (started[i])
            pthread_join(th[i], NULL);
        else
            rs_band_run(&b[i]);
    }
}

const char *img_kernels_name(const char *name) {
    if (!name || !strcmp(name, "scalar") || !strcmp(name, "avx2") || !strcmp(name, "avx512") ||
        !strcmp(name, "neon"))
        return "scalar";
    return NULL;
}

albedo_status img_resize_lanczos(const img_rgb *src, int out_w, int out_h, img_rgb *dst,
                                 errbuf *e) {
    return img_resize_lanczos_x(src, out_w, out_h, dst, NULL, e);
}

albedo_status img_resize_lanczos_x(const img_rgb *src, int out_w, int out_h, img_rgb *dst,
                                   const img_exec *x, errbuf *e) {
    const int max_threads = x ? x->max_threads : 0;
    if (!dst) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "resize: no output given");
    memset(dst, 0, sizeof *dst);
    if (!src || !src->px || src->w <= 0 || src->h <= 0)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "resize: empty source image");
    if (out_w <= 0 || out_h <= 0 || out_w > RS_MAX_SIDE || out_h > RS_MAX_SIDE)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "resize: output size %dx%d out of range", out_w,
                    out_h);
    /* Beyond this, Pillow's int arithmetic (filter length) would overflow. */
    if (src->w > (1 << 28) || src->h > (1 << 28))
        return errf(e, ALBEDO_ERR_LIMIT, "resize: source %dx%d is too large", src->w, src->h);
    int sw = src->w, sh = src->h;
    albedo_status st = alloc_rgb(dst, out_w, out_h, e);
    if (st != ALBEDO_OK) return st;
    if (sw == out_w && sh == out_h) {
        memcpy(dst->px, src->px, (size_t)sw * (size_t)sh * 3);
        return ALBEDO_OK;
    }

    rs_axis ax = {0}, ay = {0};
    int16_t *tmp = NULL, *blk = NULL;
    int32_t *acc = NULL;
    int need_h = out_w != sw, need_v = out_h != sh;
    if (need_v) st = rs_axis_init(&ay, sh, out_h, e);
    if (st == ALBEDO_OK && need_h) st = rs_axis_init(&ax, sw, out_w, e);
    if (st != ALBEDO_OK) goto fail;

    /* Rows the vertical pass reads (all of them when it is skipped). */
    int y_first = need_v ? ay.first[0] : 0;
    int y_last = need_v ? ay.first[out_h - 1] + ay.n[out_h - 1] : sh;
    size_t vstride = rs_padded((size_t)out_w * 3);
    int nv = need_v ? rs_threads_for((double)out_h * (double)vstride * ay.ksize, max_threads) : 1;
    if (nv > out_h) nv = out_h;
    if (need_v) {
        tmp = calloc(vstride * (size_t)(y_last - y_first), sizeof *tmp);
        acc = malloc((size_t)nv * vstride * sizeof *acc);
        if (!tmp || !acc) goto oom;
    }
    if (need_h) {
        const int hy0 = need_v ? y_first : 0, hy1 = need_v ? y_last : sh;
        int nt = rs_threads_for((double)(hy1 - hy0) * out_w * 3 * ax.ksize, max_threads);
        /* bands of whole RS_ROWS blocks */
        const int blocks = (hy1 - hy0 + RS_ROWS - 1) / RS_ROWS;
        if (nt > blocks) nt = blocks;
        blk = malloc((size_t)nt * (size_t)sw * RS_LANES * sizeof *blk);
        if (!blk) goto oom;
        rs_band band[RS_THREADS];
        for (int i = 0; i < nt; i++) {
            const int b0 = blocks * i / nt, b1 = blocks * (i + 1) / nt;
            const int y0 = hy0 + b0 * RS_ROWS, y1 = hy0 + b1 * RS_ROWS < hy1 ? hy0 + b1 * RS_ROWS : hy1;
            band[i] = (rs_band){.src = src->px, .sw = sw, .y0 = y0, .y1 = y1, .dw = out_w, .a = &ax,
                                .blk = blk + (size_t)i * (size_t)sw * RS_LANES};
            if (need_v) {
                band[i].dst16 = tmp + (size_t)(y0 - y_first) * vstride;
                band[i].dstride = vstride;
            } else {
                band[i].dst8 = dst->px + (size_t)y0 * (size_t)out_w * 3;
                band[i].dstride = (size_t)out_w * 3;
            }
        }
        rs_run_bands(band, nt);
    } else {
        /* Vertical pass only: widen the rows it reads. */
        for (int y = y_first; y < y_last; y++) {
            const uint8_t *s = src->px + (size_t)y * (size_t)sw * 3;
            int16_t *d = tmp + (size_t)(y - y_first) * vstride;
            for (size_t i = 0; i < (size_t)sw * 3; i++) d[i] = s[i];
        }
    }
    if (need_v) {
        rs_band band[RS_THREADS];
        for (int i = 0; i < nv; i++)
            band[i] = (rs_band){.src16 = tmp, .dw = out_w, .offset = y_first, .a = &ay, .yy0 = out_h * i / nv,
                                .yy1 = out_h * (i + 1) / nv, .acc = acc + (size_t)i * vstride, .dst = dst->px};
        rs_run_bands(band, nv);
    }
    free(acc);
    free(tmp);
    free(blk);
    rs_axis_free(&ax);
    rs_axis_free(&ay);
    return ALBEDO_OK;
oom:
    st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "resize: out of memory for %dx%d -> %dx%d", sw, sh,
              out_w, out_h);
fail:
    free(acc);
    free(tmp);
    free(blk);
    rs_axis_free(&ax);
    rs_axis_free(&ay);
    img_free(dst);
    return st;
}

/* ---- Tiling and crops (spec §4.1-4.2) ----------------------------------------- */

void img_select_tiling(int h, int w, int c, int max_crops, int *th, int *tw) {
    if (c <= 0 || max_crops <= 0 || h <= c || w <= c) {
        *th = *tw = 1;
        return;
    }
    int64_t mh = ((int64_t)h + c - 1) / c, mw = ((int64_t)w + c - 1) / c;
    int64_t M = max_crops, rh, rw;
    if (mh * mw > M) {
        double r = sqrt((double)M / (double)(mh * mw));
        rh = (int64_t)floor((double)mh * r);
        rw = (int64_t)floor((double)mw * r);
    } else {
        /* Python's M*h/w is the correctly rounded quotient of the exact
         * integers, as this is. */
        rh = (int64_t)floor(sqrt((double)(M * h) / (double)w));
        rw = (int64_t)floor(sqrt((double)(M * w) / (double)h));
        if (rh < mh) rh = mh;
        if (rw < mw) rw = mw;
        if (rh * rw > M) {
            if (rw > rh)
                rw = M / rh;
            else
                rh = M / rw;
        }
    }
    *th = rh < 1 ? 1 : rh > INT_MAX ? INT_MAX : (int)rh;
    *tw = rw < 1 ? 1 : rw > INT_MAX ? INT_MAX : (int)rw;
}

void img_crops_free(img_crops *c) {
    if (!c) return;
    free(c->px);
    memset(c, 0, sizeof *c);
}

albedo_status img_make_crops(const img_rgb *im, int crop_size, int patch_size, int margin_patches,
                             int max_crops, img_crops *out, errbuf *e) {
    return img_make_crops_x(im, crop_size, patch_size, margin_patches, max_crops, NULL, out, e);
}

albedo_status img_make_crops_x(const img_rgb *im, int crop_size, int patch_size, int margin_patches,
                               int max_crops, const img_exec *x, img_crops *out, errbuf *e) {
    if (!out) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "crops: no output given");
    memset(out, 0, sizeof *out);
    if (!im || !im->px || im->w <= 0 || im->h <= 0)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "crops: empty image");
    /* Range checks first, so that the products below cannot overflow. */
    if (crop_size <= 0 || crop_size > RS_MAX_SIDE || patch_size <= 0 || patch_size > crop_size ||
        margin_patches < 0 || margin_patches > crop_size || max_crops < 1 ||
        crop_size - 2 * margin_patches * patch_size <= 0)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT,
                    "crops: bad geometry (crop %d, patch %d, margin %d patches, max crops %d)",
                    crop_size, patch_size, margin_patches, max_crops);
    int margin = margin_patches * patch_size; /* 56 px for Moondream 2 */
    int window = crop_size - 2 * margin;      /* 266 px: each tile's own area */

    int th, tw;
    img_select_tiling(im->h - 2 * margin, im->w - 2 * margin, window, max_crops, &th, &tw);
    /* A huge max_crops can ask for an absurd upscale: refuse it before
     * allocating. */
    int64_t rh64 = (int64_t)th * window + 2 * margin, rw64 = (int64_t)tw * window + 2 * margin;
    size_t crop_bytes = (size_t)crop_size * (size_t)crop_size * 3;
    int64_t n64 = (int64_t)th * tw + 1;
    if (rh64 > RS_MAX_SIDE || rw64 > RS_MAX_SIDE || n64 > (int64_t)(SIZE_MAX / 2 / crop_bytes))
        return errf(e, ALBEDO_ERR_LIMIT, "crops: tiling %dx%d needs a %lldx%lld resize", th, tw,
                    (long long)rw64, (long long)rh64);
    int rh = (int)rh64, rw = (int)rw64, n = (int)n64;
    uint8_t *px = malloc(crop_bytes * (size_t)n);
    if (!px) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "crops: out of memory for %d crops", n);

    img_rgb global, tiled;
    albedo_status st = img_resize_lanczos_x(im, crop_size, crop_size, &global, x, e);
    if (st != ALBEDO_OK) {
        free(px);
        return st;
    }
    memcpy(px, global.px, crop_bytes);
    if (rw == crop_size && rh == crop_size) {
        tiled = global; /* 1x1 tiling: the same resize, done once */
    } else {
        st = img_resize_lanczos_x(im, rw, rh, &tiled, x, e);
        if (st != ALBEDO_OK) {
            img_free(&global);
            free(px);
            return st;
        }
    }
    /* Windows never run off the resized image (rh = window·(th-1) + crop),
     * but the reference zero-pads if they did, and so does this. */
    for (int i = 0; i < th; i++) {
        for (int j = 0; j < tw; j++) {
            uint8_t *c = px + crop_bytes * (size_t)(1 + i * tw + j);
            int y0 = i * window, x0 = j * window;
            memset(c, 0, crop_bytes);
            int cols = rw - x0 < crop_size ? rw - x0 : crop_size;
            for (int y = 0; y < crop_size && y0 + y < rh; y++)
                memcpy(c + (size_t)y * (size_t)crop_size * 3,
                       tiled.px + ((size_t)(y0 + y) * (size_t)rw + (size_t)x0) * 3,
                       (size_t)cols * 3);
        }
    }
    if (tiled.px != global.px) img_free(&tiled);
    img_free(&global);
    out->n = n;
    out->th = th;
    out->tw = tw;
    out->size = crop_size;
    out->px = px;
    return ALBEDO_OK;
}
