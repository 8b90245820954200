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
 * Decoding itself is left to libjpeg(-turbo), Wuffs (PNG, vendored), libwebp
 * and giflib: every library error is caught (setjmp, statuses or return
 * codes) and becomes a status.
 */
#include "image.h"
#include "cpu/resample.h"

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdatomic.h>
#include <stdio.h> /* jpeglib.h needs FILE and size_t declared first */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gif_lib.h>
#include <jpeglib.h>
#include <webp/decode.h>

#include "wuffs_png.h"

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
static albedo_status check_dims(const char *fmt, int64_t w, int64_t h, const img_limits *lim, errbuf *e) {
    img_limits def = img_limits_default();
    if (!lim) lim = &def;
    if (w <= 0 || h <= 0)
        return errf(e, ALBEDO_ERR_IMAGE, "%s: image has zero size (%lldx%lld)", fmt, (long long)w, (long long)h);
    if (w > lim->max_side || h > lim->max_side)
        return errf(e, ALBEDO_ERR_LIMIT, "%s: image is %lldx%lld, larger than the %d-pixel side limit", fmt,
                    (long long)w, (long long)h, lim->max_side);
    if (w * h > lim->max_pixels)
        return errf(e, ALBEDO_ERR_LIMIT, "%s: image is %lldx%lld = %lld pixels, more than the limit of %lld", fmt,
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

static albedo_status decode_jpeg(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out, errbuf *e) {
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

/* ---- PNG (Wuffs) ------------------------------------------------------------ */

/* Wuffs (third_party/wuffs, docs/DEPENDENCIES.md) decodes PNG 2-4x faster
 * than libpng with the system zlib (bench_image), and is memory-safe by
 * construction. Checksums are verified, as libpng verifies them.
 *
 * Pillow's convert("RGB"), which the reference applies, is reproduced:
 *   - every alpha channel (tRNS included) is dropped, never composited;
 *   - 16-bit samples keep their most significant byte ("RGB;16B",
 *     "RGBA;16B", "LA;16B"), except 16-bit greyscale, which Pillow opens as
 *     mode "I;16" and converts by clipping at 255 instead of scaling. */

/* Wuffs' status as ours: an error, or (all the bytes were given) a
 * suspension, meaning that the file ended early. */
static albedo_status png_fail(wuffs_base__status s, const char *what, errbuf *e) {
    if (wuffs_base__status__is_suspension(&s)) return errf(e, ALBEDO_ERR_IMAGE, "PNG: file is truncated (%s)", what);
    const char *m = wuffs_base__status__message(&s);
    if (!m) m = "decoding failed";
    if (!strncmp(m, "png: ", 5)) m += 5; /* "PNG: png: bad checksum" */
    return errf(e, ALBEDO_ERR_IMAGE, "PNG: %s (%s)", m, what);
}

static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Wuffs' BGRA (8 or 16 bits a sample, little-endian) to RGB. */
static void bgra_to_rgb(const uint8_t *s, uint8_t *d, size_t n, int wide, int grey) {
    if (!wide) {
        for (size_t i = 0; i < n; i++) d[3 * i] = s[4 * i + 2], d[3 * i + 1] = s[4 * i + 1], d[3 * i + 2] = s[4 * i];
    } else if (grey) { /* "I;16": B = G = R = the sample */
        for (size_t i = 0; i < n; i++) d[3 * i] = d[3 * i + 1] = d[3 * i + 2] = s[8 * i + 1] ? 255 : s[8 * i];
    } else {
        for (size_t i = 0; i < n; i++)
            d[3 * i] = s[8 * i + 5], d[3 * i + 1] = s[8 * i + 3], d[3 * i + 2] = s[8 * i + 1];
    }
}

static albedo_status decode_png_bytes(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out, errbuf *e) {
    /* IHDR must be the first chunk; its size is checked against the limits
     * before the decoder sees the file, so an absurd header costs nothing. */
    if (len < 33 || memcmp(buf + 12, "IHDR", 4) != 0)
        return errf(e, ALBEDO_ERR_IMAGE, "PNG: file is truncated or does not start with IHDR");
    albedo_status st = check_dims("PNG", be32(buf + 16), be32(buf + 20), lim, e);
    if (st != ALBEDO_OK) return st;
    const int depth = buf[24], grey = buf[25] == 0;

    wuffs_png__decoder *dec = wuffs_png__decoder__alloc();
    if (!dec) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "PNG: out of memory");
    uint8_t *px = NULL, *tmp = NULL, *work = NULL;
    wuffs_base__io_buffer src = wuffs_base__ptr_u8__reader((uint8_t *)buf, len, true);
    wuffs_base__image_config ic;
    wuffs_base__status s = wuffs_png__decoder__decode_image_config(dec, &ic, &src);
    if (s.repr) {
        st = png_fail(s, "header", e);
        goto done;
    }
    /* The IHDR that check_dims passed above. */
    const int w = (int)wuffs_base__pixel_config__width(&ic.pixcfg),
              h = (int)wuffs_base__pixel_config__height(&ic.pixcfg);
    /* Greyscale or RGB of at most 8 bits straight into the output; alpha,
     * palettes and 16-bit samples through BGRA, converted above. */
    const uint32_t native = wuffs_base__pixel_config__pixel_format(&ic.pixcfg).repr;
    const int wide = depth == 16;
    const int direct = !wide && (native == WUFFS_BASE__PIXEL_FORMAT__Y || native == WUFFS_BASE__PIXEL_FORMAT__BGR);
    const uint32_t fmt = direct ? WUFFS_BASE__PIXEL_FORMAT__RGB
                         : wide ? WUFFS_BASE__PIXEL_FORMAT__BGRA_NONPREMUL_4X16LE
                                : WUFFS_BASE__PIXEL_FORMAT__BGRA_NONPREMUL;
    const size_t n = (size_t)w * (size_t)h, bpp = direct ? 3 : wide ? 8 : 4;
    const uint64_t work_len = wuffs_png__decoder__workbuf_len(dec).max_incl;
    px = malloc(n * 3);
    tmp = direct ? NULL : malloc(n * bpp);
    work = work_len && work_len <= SIZE_MAX ? malloc((size_t)work_len) : NULL;
    if (!px || (!direct && !tmp) || (work_len && !work)) {
        st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "PNG: out of memory for %dx%d pixels", w, h);
        goto done;
    }
    wuffs_base__pixel_config__set(&ic.pixcfg, fmt, WUFFS_BASE__PIXEL_SUBSAMPLING__NONE, (uint32_t)w, (uint32_t)h);
    wuffs_base__pixel_buffer pb;
    s = wuffs_base__pixel_buffer__set_from_slice(&pb, &ic.pixcfg,
                                                 wuffs_base__make_slice_u8(direct ? px : tmp, n * bpp));
    if (s.repr) {
        st = png_fail(s, "pixel buffer", e);
        goto done;
    }
    /* Chunks after the image data are not read: Pillow ignores them too,
     * and a missing IEND does not stop it. */
    s = wuffs_png__decoder__decode_frame(dec, &pb, &src, WUFFS_BASE__PIXEL_BLEND__SRC,
                                         wuffs_base__make_slice_u8(work, (size_t)work_len), NULL);
    if (s.repr) {
        st = png_fail(s, "image data", e);
        goto done;
    }
    if (!direct) bgra_to_rgb(tmp, px, n, wide, grey);
    out->w = w;
    out->h = h;
    out->px = px;
    px = NULL;
done:
    free(px);
    free(tmp);
    free(work);
    free(dec);
    return st;
}

/* Chunks before the image data that Wuffs reads otherwise than Pillow, so
 * they are taken out of the bytes it sees:
 *   - tRNS of a greyscale or RGB file: Wuffs turns the pixels of its colour
 *     into transparent black; Pillow keeps their colour and convert("RGB")
 *     drops the transparency;
 *   - acTL (APNG): Wuffs decodes the animation's first frame, which is not
 *     the IDAT image when that is only the default image; Pillow's first
 *     frame is the IDAT image, which Wuffs decodes when there is no acTL. */
static int png_dropped(const uint8_t *type, int ctype) {
    return !memcmp(type, "acTL", 4) || ((ctype == 0 || ctype == 2) && !memcmp(type, "tRNS", 4));
}

static albedo_status decode_png(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out, errbuf *e) {
    /* The whole chunks before IDAT (they end at `end`); how many to drop. */
    const int ctype = len >= 33 ? buf[25] : -1;
    size_t end = 8, drop = 0;
    while (len >= 12 && end <= len - 12) {
        const uint32_t L = be32(buf + end);
        if (L > len - 12 - end || !memcmp(buf + end + 4, "IDAT", 4)) break;
        drop += png_dropped(buf + end + 4, ctype);
        end += 12 + (size_t)L;
    }
    if (!drop) return decode_png_bytes(buf, len, lim, out, e);
    uint8_t *copy = malloc(len);
    wuffs_crc32__ieee_hasher *crc = wuffs_crc32__ieee_hasher__alloc();
    albedo_status st = ALBEDO_OK;
    if (!copy || !crc) st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "PNG: out of memory");
    size_t n = 8;
    if (!st) memcpy(copy, buf, 8);
    for (size_t p = 8; !st && p < end;) {
        const size_t c = 12 + (size_t)be32(buf + p);
        if (!png_dropped(buf + p + 4, ctype)) {
            memcpy(copy + n, buf + p, c);
            n += c;
        } else { /* its checksum still counts */
            const wuffs_base__slice_u8 data = wuffs_base__make_slice_u8((uint8_t *)buf + p + 4, c - 8);
            if (wuffs_crc32__ieee_hasher__initialize(crc, sizeof__wuffs_crc32__ieee_hasher(), WUFFS_VERSION, 0).repr)
                st = errf(e, ALBEDO_ERR_INTERNAL, "PNG: cannot start a CRC-32");
            else if (wuffs_crc32__ieee_hasher__update_u32(crc, data) != be32(buf + p + c - 4))
                st = errf(e, ALBEDO_ERR_IMAGE, "PNG: bad checksum (%.4s)", (const char *)buf + p + 4);
        }
        p += c;
    }
    if (!st) {
        memcpy(copy + n, buf + end, len - end);
        st = decode_png_bytes(copy, n + len - end, lim, out, e);
    }
    free(copy);
    free(crc);
    return st;
}

/* ---- WebP (libwebp) -------------------------------------------------------- */

static uint32_t le24(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16; }
static uint32_t le32(const uint8_t *p) { return le24(p) | (uint32_t)p[3] << 24; }

/* An animated WebP's first frame, as Pillow (libwebp's WebPAnimDecoder) gives
 * it: the canvas starts transparent black and the frame's own pixels are
 * written at its offset without blending (the first frame has nothing to
 * blend with), so after dropping alpha the area outside the frame is black.
 * The frame's bitstream (VP8 or VP8L chunk) decodes like a still image; its
 * ALPH chunk, if any, only carries alpha and is skipped. */
static albedo_status decode_webp_anim(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out, errbuf *e) {
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

static albedo_status decode_webp(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out, errbuf *e) {
    WebPBitstreamFeatures f;
    VP8StatusCode vs = WebPGetFeatures(buf, len, &f);
    if (vs == VP8_STATUS_NOT_ENOUGH_DATA) return errf(e, ALBEDO_ERR_IMAGE, "WebP: file is truncated");
    if (vs != VP8_STATUS_OK) return errf(e, ALBEDO_ERR_IMAGE, "WebP: corrupt header (libwebp status %d)", (int)vs);
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
static albedo_status decode_gif(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out, errbuf *e) {
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
            if (DGifGetExtension(g, &code, &ext) == GIF_ERROR) return gif_fail(g, NULL, g->Error, e);
            if (code == GRAPHICS_EXT_FUNC_CODE && ext && ext[0] >= 4 && (ext[1] & 1)) trans = ext[4];
            while (ext) {
                if (DGifGetExtensionNext(g, &ext) == GIF_ERROR) return gif_fail(g, NULL, g->Error, e);
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
                if (DGifGetLine(g, idx + (size_t)(fy + y) * (size_t)cw + (size_t)fx, (int)fw) == GIF_ERROR)
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

albedo_status img_decode(const uint8_t *buf, size_t len, const img_limits *lim, img_rgb *out, errbuf *e) {
    if (!out) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "image: no output given");
    memset(out, 0, sizeof *out);
    if (!buf || len == 0) return errf(e, ALBEDO_ERR_IMAGE, "image: empty data (0 bytes)");
    if (lim && (lim->max_side <= 0 || lim->max_pixels <= 0))
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "image: limits must be positive (%d, %lld)", lim->max_side,
                    (long long)lim->max_pixels);

    static const uint8_t png_magic[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (len >= 3 && buf[0] == 0xff && buf[1] == 0xd8 && buf[2] == 0xff) return decode_jpeg(buf, len, lim, out, e);
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
        return errf(e, ALBEDO_ERR_UNSUPPORTED, "image: %s is not supported (JPEG, PNG, WebP and GIF are)", known);
    return errf(e, ALBEDO_ERR_IMAGE, "image: unrecognised image format (%zu bytes starting %02x %02x %02x %02x)", len,
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
 * skipped. Integer sums cannot overflow: Σ|weight| stays well under 2^23.
 * The weights and the kernels' arithmetic: src/cpu/resample.h. */

static double sinc(double x) {
    if (x == 0.0) return 1.0;
    x = x * 3.14159265358979323846;
    return sin(x) / x;
}

static double lanczos3(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }

static void rs_axis_free(rs_axis *a) {
    free(a->first);
    free(a->n);
    free(a->w);
}

/* The plan of one axis: sizes, first[] and n[] (cheap); the weights, which
 * need two sines a tap, are computed by rs_axis_weights, on the team's
 * threads (the first phase of rs_run). */
static albedo_status rs_axis_init(rs_axis *a, int in, int out, errbuf *e) {
    memset(a, 0, sizeof *a);
    /* Pillow computes in1 - in0 in float, then widens: exact for any int
     * size an image can have. */
    a->scale = (double)in / out;
    a->filterscale = a->scale < 1.0 ? 1.0 : a->scale;
    a->support = 3.0 * a->filterscale;
    a->ksize = (int)ceil(a->support) * 2 + 1;
    a->n_out = out;
    a->first = malloc((size_t)out * sizeof *a->first);
    a->n = malloc((size_t)out * sizeof *a->n);
    a->w = malloc((size_t)out * (size_t)a->ksize * sizeof *a->w);
    if (!a->first || !a->n || !a->w) {
        rs_axis_free(a);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "resize: out of memory for %d -> %d", in, out);
    }
    for (int i = 0; i < out; i++) {
        double center = (i + 0.5) * a->scale;
        int xmin = (int)(center - a->support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + a->support + 0.5);
        if (xmax > in) xmax = in;
        a->first[i] = xmin;
        a->n[i] = xmax - xmin;
    }
    return ALBEDO_OK;
}

/* Weights of outputs [i0, i1) of a planned axis; k: ksize doubles. */
static void rs_axis_weights(rs_axis *a, int i0, int i1, double *k) {
    for (int i = i0; i < i1; i++) {
        double center = (i + 0.5) * a->scale;
        double ss = 1.0 / a->filterscale, ww = 0.0;
        int xmin = a->first[i], xmax = a->n[i];
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
    }
}

/* ---- The resize driver: passes, bands and threads -----------------------------
 *
 * A resize is a job: its horizontal pass writes the rows the vertical pass
 * reads (y_first .. y_last) into an 8-bit intermediate, as Pillow's does;
 * the vertical pass then writes each output row either to a plain image or,
 * for the tiled resize of img_make_crops, straight into every crop that
 * holds it (so the tiled image itself is never stored). A pass whose axis
 * keeps its size is skipped as Pillow skips it: without a horizontal pass
 * the vertical one reads the source; without a vertical pass a one-tap
 * identity axis (weight 2^22) copies the rows, which gives the same bytes.
 *
 * Several jobs (the global and the tiled resize) run on one team of threads
 * in three phases, each finished before the next starts: the weights of
 * every axis (RS_WCHUNK outputs a task: two sines a tap make this a fifth of
 * the work on one thread), every horizontal task (RS_ROWS rows of one job),
 * every vertical task (RS_VROWS output rows of one job). Threads take tasks
 * from shared counters; each output row is computed by the same arithmetic
 * whichever thread takes it, so the result does not depend on the number
 * of threads. A thread that cannot be started (nor, then, the ones it
 * would have started) leaves its share to the others. The kernels
 * (src/cpu/resample*.c) are the best this CPU has unless img_exec names
 * others. */

/* Largest output side accepted: keeps every size product in range and far
 * exceeds anything the crops need. */
#define RS_MAX_SIDE (1 << 16)
#define RS_MAX_THREADS 16
/* Multiply-adds per thread below which another thread costs more than it
 * saves (starting one is ~20-50 us; SIMD kernels do ~10^4 per us). */
#define RS_MIN_WORK_PER_THREAD 1500000.0
#define RS_VROWS 8
#define RS_MAX_SCRATCH ((size_t)64 << 20)

typedef struct rs_job {
    const uint8_t *src; /* [sh, sw, 3] */
    int sw, sh, dw, dh;
    rs_axis ax, ay;
    int need_h;
    int y_first, y_last; /* source rows the vertical pass reads */
    uint8_t *mid;        /* rows [y_first, y_last) after the horizontal pass, stride dw·3 */
    const uint8_t *vin;  /* what the vertical pass reads: mid, or the source's row y_first */
    size_t vin_stride;
    uint8_t *dst; /* plain output [dh, dw, 3], or NULL for tiles */
    /* tiles: crop i·tw + j (of side crop, in tiles) is the window at
     * (i·step, j·step) of the output */
    uint8_t *tiles;
    int crop, step, th, tw;
    int h_tasks, v_tasks;
} rs_job;

static void rs_job_free(rs_job *j) {
    rs_axis_free(&j->ax);
    rs_axis_free(&j->ay);
    free(j->mid);
    memset(j, 0, sizeof *j);
}

static albedo_status rs_axis_identity(rs_axis *a, int n, errbuf *e) {
    memset(a, 0, sizeof *a);
    a->ksize = 1;
    a->first = malloc((size_t)n * sizeof *a->first);
    a->n = malloc((size_t)n * sizeof *a->n);
    a->w = malloc((size_t)n * sizeof *a->w);
    if (!a->first || !a->n || !a->w) {
        rs_axis_free(a);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "resize: out of memory");
    }
    for (int i = 0; i < n; i++) {
        a->first[i] = i;
        a->n[i] = 1;
        a->w[i] = 1 << RS_BITS;
    }
    return ALBEDO_OK;
}

/* Coefficients, intermediate and task counts of a job whose src, sizes and
 * destination are set. */
static albedo_status rs_job_init(rs_job *j, errbuf *e) {
    albedo_status st = ALBEDO_OK;
    j->need_h = j->dw != j->sw;
    if (j->dh != j->sh)
        st = rs_axis_init(&j->ay, j->sh, j->dh, e);
    else
        st = rs_axis_identity(&j->ay, j->dh, e);
    if (st == ALBEDO_OK && j->need_h) st = rs_axis_init(&j->ax, j->sw, j->dw, e);
    if (st != ALBEDO_OK) return st;
    j->y_first = j->ay.first[0];
    j->y_last = j->ay.first[j->dh - 1] + j->ay.n[j->dh - 1];
    if (j->need_h) {
        j->mid = malloc((size_t)(j->y_last - j->y_first) * (size_t)j->dw * 3);
        if (!j->mid)
            return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "resize: out of memory for %dx%d -> %dx%d", j->sw, j->sh, j->dw,
                        j->dh);
        j->vin = j->mid;
        j->vin_stride = (size_t)j->dw * 3;
        j->h_tasks = (j->y_last - j->y_first + RS_ROWS - 1) / RS_ROWS;
    } else {
        j->vin = j->src + (size_t)j->y_first * (size_t)j->sw * 3;
        j->vin_stride = (size_t)j->sw * 3;
    }
    j->v_tasks = (j->dh + RS_VROWS - 1) / RS_VROWS;
    return ALBEDO_OK;
}

/* Multiply-adds of a job, to size the team. */
static double rs_job_work(const rs_job *j) {
    double h = j->need_h ? (double)(j->y_last - j->y_first) * j->dw * 3 * j->ax.ksize : 0;
    return h + (double)j->dh * j->dw * 3 * j->ay.ksize;
}

/* Weight tasks: chunks of RS_WCHUNK outputs of an axis. */
#define RS_WCHUNK 64

enum { RS_WEIGHTS, RS_HORIZONTAL, RS_VERTICAL, RS_PHASES };

typedef struct rs_team {
    rs_job *jobs;
    int n_jobs;
    const rs_kernels *k;
    int total[RS_PHASES];
    atomic_int next[RS_PHASES];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done[RS_PHASES];            /* under mu */
    size_t blk_len, row_len, k_len; /* per-thread scratch: int32 samples, bytes, doubles */
    int32_t *blk;                   /* [threads][blk_len], 64-byte aligned */
    uint8_t *row;                   /* [threads][row_len] */
    double *kd;                     /* [threads][k_len] */
} rs_team;

/* The axes whose weights are still to be computed: job i's ax then ay. */
static int rs_wtasks(const rs_axis *a) { return a->n_out ? (a->n_out + RS_WCHUNK - 1) / RS_WCHUNK : 0; }

static void rs_wtask(rs_team *T, int task, double *kd) {
    for (int i = 0; i < T->n_jobs; i++) {
        rs_axis *axes[2] = {&T->jobs[i].ax, &T->jobs[i].ay};
        for (int k = 0; k < 2; k++) {
            int n = rs_wtasks(axes[k]);
            if (task < n) {
                int i0 = task * RS_WCHUNK, i1 = i0 + RS_WCHUNK < axes[k]->n_out ? i0 + RS_WCHUNK : axes[k]->n_out;
                rs_axis_weights(axes[k], i0, i1, kd);
                return;
            }
            task -= n;
        }
    }
}

static void rs_htask(const rs_team *T, rs_job *j, int task, int32_t *blk) {
    const int y0 = j->y_first + task * RS_ROWS;
    const int nr = j->y_last - y0 < RS_ROWS ? j->y_last - y0 : RS_ROWS;
    const uint8_t *src[RS_ROWS];
    uint8_t *dst[RS_ROWS];
    for (int r = 0; r < RS_ROWS; r++) {
        const int y = y0 + (r < nr ? r : nr - 1);
        src[r] = j->src + (size_t)y * (size_t)j->sw * 3;
        dst[r] = j->mid + (size_t)(y - j->y_first) * (size_t)j->dw * 3;
    }
    T->k->hblock(src, j->sw, &j->ax, j->dw, dst, blk);
}

static void rs_vtask(const rs_team *T, rs_job *j, int task, uint8_t *row) {
    const int yy0 = task * RS_VROWS, yy1 = yy0 + RS_VROWS < j->dh ? yy0 + RS_VROWS : j->dh;
    const size_t n = (size_t)j->dw * 3, cb = (size_t)j->crop * (size_t)j->crop * 3;
    for (int yy = yy0; yy < yy1; yy++) {
        const int32_t *w = j->ay.w + (size_t)yy * (size_t)j->ay.ksize;
        const uint8_t *s = j->vin + (size_t)(j->ay.first[yy] - j->y_first) * j->vin_stride;
        if (j->dst) {
            T->k->vrow(s, j->vin_stride, w, j->ay.n[yy], n, j->dst + (size_t)yy * n);
            continue;
        }
        T->k->vrow(s, j->vin_stride, w, j->ay.n[yy], n, row);
        /* tile rows i with i·step <= yy < i·step + crop */
        int i0 = yy < j->crop ? 0 : (yy - j->crop) / j->step + 1, i1 = yy / j->step;
        if (i1 > j->th - 1) i1 = j->th - 1;
        for (int i = i0; i <= i1; i++)
            for (int t = 0; t < j->tw; t++)
                memcpy(j->tiles + cb * (size_t)(i * j->tw + t) + (size_t)(yy - i * j->step) * (size_t)j->crop * 3,
                       row + (size_t)t * (size_t)j->step * 3, (size_t)j->crop * 3);
    }
}

/* Task number -> job and its own task number. */
static rs_job *rs_task_job(const rs_team *T, int *task, int vertical) {
    for (int i = 0; i < T->n_jobs; i++) {
        int n = vertical ? T->jobs[i].v_tasks : T->jobs[i].h_tasks;
        if (*task < n) return &T->jobs[i];
        *task -= n;
    }
    return NULL;
}

/* Worker i starts workers 2i + 1 and 2i + 2 (when < n) and joins them when
 * done: the team is up after log2(n) thread starts (~13 us each on the
 * 2-core VM), not n - 1 in a row on the caller. */
typedef struct rs_worker {
    rs_team *T;
    struct rs_worker *all;
    int id, n;
} rs_worker;

static void *rs_work(void *arg) {
    rs_worker *w = arg;
    rs_team *T = w->T;
    pthread_t kids[2];
    int started[2] = {0, 0};
    for (int c = 0; c < 2; c++) {
        const int id = 2 * w->id + 1 + c;
        if (id < w->n) started[c] = pthread_create(&kids[c], NULL, rs_work, &w->all[id]) == 0;
    }
    /* Each worker's scratch (a buffer that no phase needs is NULL). */
    int32_t *blk = T->blk ? T->blk + (size_t)w->id * T->blk_len : NULL;
    uint8_t *row = T->row ? T->row + (size_t)w->id * T->row_len : NULL;
    double *kd = T->kd ? T->kd + (size_t)w->id * T->k_len : NULL;
    for (int p = 0; p < RS_PHASES; p++) {
        int done = 0;
        for (;; done++) {
            int t = atomic_fetch_add(&T->next[p], 1);
            if (t >= T->total[p]) break;
            if (p == RS_WEIGHTS) {
                rs_wtask(T, t, kd);
            } else {
                rs_job *j = rs_task_job(T, &t, p == RS_VERTICAL);
                if (p == RS_HORIZONTAL)
                    rs_htask(T, j, t, blk);
                else
                    rs_vtask(T, j, t, row);
            }
        }
        if (p == RS_VERTICAL) break;
        /* Every task of this phase done before any of the next starts. */
        pthread_mutex_lock(&T->mu);
        T->done[p] += done;
        if (T->done[p] == T->total[p]) pthread_cond_broadcast(&T->cv);
        while (T->done[p] < T->total[p]) pthread_cond_wait(&T->cv, &T->mu);
        pthread_mutex_unlock(&T->mu);
    }
    for (int c = 0; c < 2; c++)
        if (started[c]) pthread_join(kids[c], NULL);
    return NULL;
}

/* Runs initialised jobs to completion on a team of threads: x->threads of
 * them when set, else as many as the work pays for, one per CPU at most. */
static albedo_status rs_run(rs_job *jobs, int n_jobs, const img_exec *x, errbuf *e) {
    const rs_kernels *k = rs_kernels_get(x ? x->kernels : NULL);
    if (!k) return errf(e, ALBEDO_ERR_UNSUPPORTED, "resize: kernels '%s' are not available here", x->kernels);
    rs_team T = {.jobs = jobs, .n_jobs = n_jobs, .k = k};
    double work = 0;
    for (int i = 0; i < n_jobs; i++) {
        T.total[RS_WEIGHTS] += rs_wtasks(&jobs[i].ax) + rs_wtasks(&jobs[i].ay);
        T.total[RS_HORIZONTAL] += jobs[i].h_tasks;
        T.total[RS_VERTICAL] += jobs[i].v_tasks;
        work += rs_job_work(&jobs[i]);
        if ((size_t)jobs[i].ax.ksize > T.k_len) T.k_len = (size_t)jobs[i].ax.ksize;
        if ((size_t)jobs[i].ay.ksize > T.k_len) T.k_len = (size_t)jobs[i].ay.ksize;
        if (jobs[i].need_h && (size_t)jobs[i].sw * RS_LANES > T.blk_len) T.blk_len = (size_t)jobs[i].sw * RS_LANES;
        if (!jobs[i].dst && (size_t)jobs[i].dw * 3 > T.row_len) T.row_len = (size_t)jobs[i].dw * 3;
    }
    if (T.k_len < 1) T.k_len = 1;
    T.blk_len = (T.blk_len + 15) / 16 * 16; /* keeps each thread's block 64-byte aligned */
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int nt = (int)(work / RS_MIN_WORK_PER_THREAD);
    if (nt > RS_MAX_THREADS) nt = RS_MAX_THREADS;
    if (cpus > 0 && nt > cpus) nt = (int)cpus;
    if (x && x->threads > 0) nt = x->threads < RS_MAX_THREADS ? x->threads : RS_MAX_THREADS;
    /* A horizontal block is 128 bytes a source pixel (8 MiB for a 65535-wide
     * image): fewer threads rather than more than RS_MAX_SCRATCH in all. */
    const size_t per = T.blk_len * sizeof *T.blk + T.row_len + T.k_len * sizeof *T.kd;
    if (nt > 1 && (size_t)nt * per > RS_MAX_SCRATCH) nt = (int)(RS_MAX_SCRATCH / per);
    if (nt < 1) nt = 1;
    T.blk = T.blk_len ? aligned_alloc(64, (size_t)nt * T.blk_len * sizeof *T.blk) : NULL;
    T.row = T.row_len ? malloc((size_t)nt * T.row_len) : NULL;
    T.kd = malloc((size_t)nt * T.k_len * sizeof *T.kd);
    if ((T.blk_len && !T.blk) || (T.row_len && !T.row) || !T.kd) {
        free(T.blk);
        free(T.row);
        free(T.kd);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "resize: out of memory for %d threads", nt);
    }
    for (int p = 0; p < RS_PHASES; p++) atomic_init(&T.next[p], 0);
    pthread_mutex_init(&T.mu, NULL);
    pthread_cond_init(&T.cv, NULL);
    rs_worker w[RS_MAX_THREADS];
    for (int i = 0; i < nt; i++) w[i] = (rs_worker){&T, w, i, nt};
    rs_work(&w[0]); /* the caller is worker 0 */
    pthread_cond_destroy(&T.cv);
    pthread_mutex_destroy(&T.mu);
    free(T.blk);
    free(T.row);
    free(T.kd);
    return ALBEDO_OK;
}

const char *img_kernels_name(const char *name) {
    const rs_kernels *k = rs_kernels_get(name);
    return k ? k->name : NULL;
}

albedo_status img_resize_lanczos(const img_rgb *src, int out_w, int out_h, img_rgb *dst, errbuf *e) {
    return img_resize_lanczos_x(src, out_w, out_h, dst, NULL, e);
}

albedo_status img_resize_lanczos_x(const img_rgb *src, int out_w, int out_h, img_rgb *dst, const img_exec *x,
                                   errbuf *e) {
    if (!dst) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "resize: no output given");
    memset(dst, 0, sizeof *dst);
    if (!src || !src->px || src->w <= 0 || src->h <= 0)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "resize: empty source image");
    if (out_w <= 0 || out_h <= 0 || out_w > RS_MAX_SIDE || out_h > RS_MAX_SIDE)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "resize: output size %dx%d out of range", out_w, out_h);
    /* Beyond this, Pillow's int arithmetic (filter length) would overflow. */
    if (src->w > (1 << 28) || src->h > (1 << 28))
        return errf(e, ALBEDO_ERR_LIMIT, "resize: source %dx%d is too large", src->w, src->h);
    albedo_status st = alloc_rgb(dst, out_w, out_h, e);
    if (st != ALBEDO_OK) return st;
    if (src->w == out_w && src->h == out_h) {
        memcpy(dst->px, src->px, (size_t)out_w * (size_t)out_h * 3);
        return ALBEDO_OK;
    }
    rs_job j = {.src = src->px, .sw = src->w, .sh = src->h, .dw = out_w, .dh = out_h, .dst = dst->px};
    st = rs_job_init(&j, e);
    if (st == ALBEDO_OK) st = rs_run(&j, 1, x, e);
    rs_job_free(&j);
    if (st != ALBEDO_OK) img_free(dst);
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

albedo_status img_make_crops(const img_rgb *im, int crop_size, int patch_size, int margin_patches, int max_crops,
                             img_crops *out, errbuf *e) {
    return img_make_crops_x(im, crop_size, patch_size, margin_patches, max_crops, NULL, out, e);
}

albedo_status img_make_crops_x(const img_rgb *im, int crop_size, int patch_size, int margin_patches, int max_crops,
                               const img_exec *x, img_crops *out, errbuf *e) {
    if (!out) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "crops: no output given");
    memset(out, 0, sizeof *out);
    if (!im || !im->px || im->w <= 0 || im->h <= 0) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "crops: empty image");
    /* Range checks first, so that the products below cannot overflow. */
    if (crop_size <= 0 || crop_size > RS_MAX_SIDE || patch_size <= 0 || patch_size > crop_size || margin_patches < 0 ||
        margin_patches > crop_size || max_crops < 1 || crop_size - 2 * margin_patches * patch_size <= 0)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT,
                    "crops: bad geometry (crop %d, patch %d, margin %d patches, max crops %d)", crop_size, patch_size,
                    margin_patches, max_crops);
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
        return errf(e, ALBEDO_ERR_LIMIT, "crops: tiling %dx%d needs a %lldx%lld resize", th, tw, (long long)rw64,
                    (long long)rh64);
    int rh = (int)rh64, rw = (int)rw64, n = (int)n64;
    uint8_t *px = malloc(crop_bytes * (size_t)n);
    if (!px) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "crops: out of memory for %d crops", n);

    /* The global crop and the tiles, resized together (one team of
     * threads). The tiles' windows exactly cover the tiled resize: rh =
     * th·window + 2·margin = (th - 1)·window + crop_size, and likewise rw,
     * so none runs off the image and no zero padding (which the reference
     * would apply) is ever needed. A 1x1 tiling is the global resize again. */
    const int same = rw == crop_size && rh == crop_size;
    rs_job jobs[2] = {
        {.src = im->px, .sw = im->w, .sh = im->h, .dw = crop_size, .dh = crop_size, .dst = px},
        {.src = im->px,
         .sw = im->w,
         .sh = im->h,
         .dw = rw,
         .dh = rh,
         .tiles = px + crop_bytes,
         .crop = crop_size,
         .step = window,
         .th = th,
         .tw = tw},
    };
    const int n_jobs = same ? 1 : 2;
    albedo_status st = ALBEDO_OK;
    for (int i = 0; i < n_jobs && st == ALBEDO_OK; i++) st = rs_job_init(&jobs[i], e);
    if (st == ALBEDO_OK) st = rs_run(jobs, n_jobs, x, e);
    for (int i = 0; i < 2; i++) rs_job_free(&jobs[i]);
    if (st != ALBEDO_OK) {
        free(px);
        return st;
    }
    if (same) memcpy(px + crop_bytes, px, crop_bytes);
    out->n = n;
    out->th = th;
    out->tw = tw;
    out->size = crop_size;
    out->px = px;
    return ALBEDO_OK;
}
