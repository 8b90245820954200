#!/usr/bin/env python3
"""make_data.py — regenerate tests/data/image: small images in every format and
mode the decoder handles, and expect.txt, what Pillow made of them.

test_image checks albedo's decoding, resizing and crops against expect.txt in
every clone, with or without ../shared. Run once with Pillow and numpy
installed (any Pillow: resizes are done one axis at a time, which pins the
horizontal-then-vertical order that Pillow <= 12.1 always used, see
src/image.c); pass --fixtures DIR (../shared/fixtures) to also record hashes
of the reference crops.

Hashes are FNV-1a 64 over the raw bytes ([H, W, 3] u8, row-major).
"""
import argparse
import io
import math
import os
import struct
import zlib

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
LANCZOS = Image.Resampling.LANCZOS


def fnv(b):
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def smooth(w, h, seed, noise=2.0):
    """Photo-like content that compresses well: waves, a gradient, shapes."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a = np.stack(
        [
            128 + 100 * np.sin(xx / 23 + yy / 41),
            128 + 90 * np.cos(yy / 19 - xx / 53),
            255 * (xx + yy) / (w + h),
        ],
        -1,
    )
    for _ in range(6):
        cx, cy, rad = r.uniform(0, w), r.uniform(0, h), r.uniform(10, min(w, h) / 3)
        m = (xx - cx) ** 2 + (yy - cy) ** 2 < rad**2
        a[m] = r.uniform(0, 255, 3)
    a += r.normal(0, noise, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def noisy(w, h, seed):
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([(xx * 5) % 256, (yy * 7) % 256, (xx * yy) % 256], -1).astype(np.int32)
    a += r.integers(-20, 21, a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


# ---- raw writers for what Pillow cannot save ---------------------------------

def png_raw(w, h, ctype, depth, scan, interlace=0, plte=None, trns=None):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    b = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, interlace))
    if plte is not None:
        b += chunk(b"PLTE", plte)
    if trns is not None:
        b += chunk(b"tRNS", trns)
    return b + chunk(b"IDAT", zlib.compress(scan, 9)) + chunk(b"IEND", b"")


def adam7(arr, rowbytes):
    out = b""
    for x0, y0, dx, dy in [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]:
        sub = arr[y0::dy, x0::dx]
        if sub.shape[0] and sub.shape[1]:
            out += b"".join(b"\x00" + rowbytes(r) for r in sub)
    return out


def gif_raw(sw, sh, gpal, frame, trans=None, lpal=None):
    """One-frame GIF with the frame at an offset (Pillow always writes full
    frames), optionally with a local colour table."""
    x, y, w, h, pix = frame
    bits = max(1, (len(gpal) - 1).bit_length())
    b = bytearray(b"GIF89a" + struct.pack("<HHBBB", sw, sh, 0x80 | 0x70 | (bits - 1), 1, 0))
    for i in range(1 << bits):
        b += bytes(gpal[i] if i < len(gpal) else (0, 0, 0))
    if trans is not None:
        b += bytes([0x21, 0xF9, 4, 1, 0, 0, trans, 0])
    b += b"," + struct.pack("<HHHHB", x, y, w, h, 0 if lpal is None else 0x80 | (bits - 1))
    if lpal is not None:
        for i in range(1 << bits):
            b += bytes(lpal[i] if i < len(lpal) else (0, 0, 0))
    mcs = max(2, bits)
    clear, eoi, cs = 1 << mcs, (1 << mcs) + 1, mcs + 1
    codes, n = [clear], 0
    for v in pix:  # literal codes only, clearing before the code size grows
        if n >= (1 << cs) - (eoi + 1) - 1:
            codes.append(clear)
            n = 0
        codes.append(v)
        n += 1
    codes.append(eoi)
    acc = nb = 0
    data = bytearray()
    for c in codes:
        acc |= c << nb
        nb += cs
        while nb >= 8:
            data.append(acc & 255)
            acc >>= 8
            nb -= 8
    if nb:
        data.append(acc & 255)
    b.append(mcs)
    for i in range(0, len(data), 255):
        b.append(len(data[i : i + 255]))
        b += data[i : i + 255]
    return bytes(b + b"\x00;")


def webp_anim_offset(canvas, x, y, frame_img, **kw):
    """Animated WebP whose first frame sits at (x, y) on a larger canvas."""
    bio = io.BytesIO()
    frame_img.save(bio, "WEBP", **kw)
    s, pos, fd = bio.getvalue(), 12, b""
    while pos + 8 <= len(s):
        n = struct.unpack("<I", s[pos + 4 : pos + 8])[0]
        if s[pos : pos + 4] in (b"VP8 ", b"VP8L", b"ALPH"):
            fd += s[pos : pos + 8 + n + (n & 1)]
        pos += 8 + n + (n & 1)
    le24 = lambda v: struct.pack("<I", v)[:3]
    w, h = frame_img.size
    body = b"VP8X" + struct.pack("<I", 10) + bytes([0x12, 0, 0, 0]) + le24(canvas[0] - 1) + le24(canvas[1] - 1)
    body += b"ANIM" + struct.pack("<I", 6) + bytes([0, 0, 255, 255, 0, 0])
    pl = le24(x // 2) + le24(y // 2) + le24(w - 1) + le24(h - 1) + le24(100) + bytes([2]) + fd
    body += b"ANMF" + struct.pack("<I", len(pl)) + pl + (b"\0" if len(pl) & 1 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def save(img, fmt, **kw):
    bio = io.BytesIO()
    img.save(bio, fmt, **kw)
    return bio.getvalue()


# ---- the reference behaviour ------------------------------------------------

def resize(im, w, h):
    """Pillow Lanczos, horizontal pass first (one axis per call pins the order)."""
    if im.size[0] != w:
        im = im.resize((w, im.size[1]), LANCZOS)
    if im.size[1] != h:
        im = im.resize((w, h), LANCZOS)
    return im


def select_tiling(h, w, c, m):
    if h <= c or w <= c:
        return 1, 1
    mh, mw = math.ceil(h / c), math.ceil(w / c)
    if mh * mw > m:
        r = math.sqrt(m / (mh * mw))
        return max(1, math.floor(mh * r)), max(1, math.floor(mw * r))
    th, tw = math.floor(math.sqrt(m * h / w)), math.floor(math.sqrt(m * w / h))
    th, tw = max(th, mh), max(tw, mw)
    if th * tw > m:
        if tw > th:
            tw = m // th
        else:
            th = m // tw
    return max(1, th), max(1, tw)


def crops(im, cs=378, patch=14, margin=4, max_crops=12):
    mp = margin * patch
    win = cs - 2 * mp
    W, H = im.size
    th, tw = select_tiling(H - 2 * mp, W - 2 * mp, win, max_crops)
    out = [np.asarray(resize(im, cs, cs))]
    big = np.asarray(resize(im, tw * win + 2 * mp, th * win + 2 * mp))
    for i in range(th):
        for j in range(tw):
            out.append(big[win * i : win * i + cs, win * j : win * j + cs])
    return th, tw, out


def st_crops(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        import json

        meta = json.loads(f.read(n))["crops_u8"]
        a, b = meta["data_offsets"]
        f.seek(8 + n + a)
        return np.frombuffer(f.read(b - a), np.uint8).reshape(meta["shape"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", help="../shared/fixtures, to record the reference crops' hashes")
    args = ap.parse_args()

    files = {}
    A = smooth(97, 61, 1)
    N = noisy(53, 37, 2)
    im = Image.fromarray(A)
    rgba = np.dstack([A, np.random.default_rng(3).integers(0, 256, A.shape[:2], dtype=np.uint8)])
    files["grey.png"] = save(im.convert("L"), "PNG")
    files["rgba.png"] = save(Image.fromarray(rgba, "RGBA"), "PNG")
    pal = im.quantize(13)
    files["pal4_trns.png"] = save(pal, "PNG", bits=4, transparency=bytes([0, 90, 255, 7]))
    files["bilevel.png"] = save(im.convert("1"), "PNG")
    r = np.random.default_rng(4)
    a16 = r.integers(0, 65536, (37, 53, 3), dtype=np.uint16)
    files["rgb16.png"] = png_raw(53, 37, 2, 16, b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a16))
    # 16-bit grey: Pillow clips to 255, so mix values below and above it.
    g16 = r.integers(0, 600, (37, 53), dtype=np.uint16)
    files["grey16.png"] = png_raw(53, 37, 0, 16, b"".join(b"\x00" + row.astype(">u2").tobytes() for row in g16))
    files["interlaced.png"] = png_raw(53, 37, 2, 8, adam7(N, lambda row: row.tobytes()), interlace=1)
    # The other PNG colour types, depths and transparencies (each one a
    # different path through the decoder's pixel formats).
    g8 = N[:, :, 0]
    files["grey_alpha.png"] = save(Image.fromarray(np.dstack([g8, N[:, :, 1]]), "LA"), "PNG")
    la16 = r.integers(0, 65536, (37, 53, 2), dtype=np.uint16)
    files["grey_alpha16.png"] = png_raw(53, 37, 4, 16, b"".join(b"\x00" + row.astype(">u2").tobytes() for row in la16))
    rgba16 = r.integers(0, 65536, (37, 53, 4), dtype=np.uint16)
    files["rgba16.png"] = png_raw(53, 37, 6, 16, b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgba16))
    files["pal8.png"] = save(Image.fromarray(N).quantize(200), "PNG")
    g2 = (g8 >> 6).astype(np.uint8)  # 2-bit grey, four pixels a byte
    g2p = np.pad(g2, ((0, 0), (0, (-g2.shape[1]) % 4)))
    g2b = (g2p[:, 0::4] << 6) | (g2p[:, 1::4] << 4) | (g2p[:, 2::4] << 2) | g2p[:, 3::4]
    files["grey2.png"] = png_raw(53, 37, 0, 2, b"".join(b"\x00" + row.astype(np.uint8).tobytes() for row in g2b))
    files["grey_trns.png"] = png_raw(53, 37, 0, 8, b"".join(b"\x00" + row.tobytes() for row in g8),
                                     trns=struct.pack(">H", int(g8[0, 0])))
    files["rgb_trns.png"] = png_raw(53, 37, 2, 8, b"".join(b"\x00" + row.tobytes() for row in N),
                                    trns=struct.pack(">HHH", *(int(v) for v in N[0, 0])))
    files["grey16_trns_interlaced.png"] = png_raw(
        53, 37, 0, 16, adam7(g16, lambda row: row.astype(">u2").tobytes()), interlace=1, trns=struct.pack(">H", 300))
    # APNG: the IDAT image is the first frame, or only the default image
    # before an animation of other frames; Pillow's first frame is it both ways.
    frames = [Image.fromarray(np.roll(N, 7 * k, axis=1)) for k in range(3)]
    files["apng.png"] = save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100)
    files["apng_default.png"] = save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100,
                                     default_image=True)
    p8 = (N[:, :, 0] // 2).astype(np.uint8)
    plte = bytes(np.random.default_rng(7).integers(0, 256, 128 * 3, dtype=np.uint8))
    files["pal_trns_interlaced.png"] = png_raw(53, 37, 3, 8, adam7(p8, lambda row: row.tobytes()), interlace=1,
                                               plte=plte, trns=bytes(range(0, 256, 4)))
    files["baseline.jpg"] = save(im, "JPEG", quality=85)
    files["progressive.jpg"] = save(Image.fromarray(N), "JPEG", quality=80, progressive=True, subsampling=1)
    files["grey.jpg"] = save(im.convert("L"), "JPEG", quality=80)
    files["cmyk.jpg"] = save(im.convert("CMYK"), "JPEG", quality=85)
    files["lossy.webp"] = save(im, "WEBP", quality=70)
    files["lossless_alpha.webp"] = save(Image.fromarray(rgba, "RGBA"), "WEBP", lossless=True)
    files["anim_offset.webp"] = webp_anim_offset((61, 47), 6, 10, Image.fromarray(N[:30, :40]), quality=75)
    r5 = np.random.default_rng(5)
    gpal = [tuple(int(v) for v in r5.integers(0, 256, 3)) for _ in range(16)]
    pix = [int(v) for v in np.random.default_rng(6).integers(0, 16, 20 * 14)]
    lpal = [tuple(int(v) for v in r5.integers(0, 256, 3)) for _ in range(16)]
    files["offset_trans.gif"] = gif_raw(33, 25, gpal, (7, 5, 20, 14, pix), trans=3)
    files["local_palette.gif"] = gif_raw(30, 20, gpal, (3, 2, 20, 14, pix), lpal=lpal)
    files["pillow.gif"] = save(im.quantize(64), "GIF")
    # Crops with several tiles: landscape 2x4 and portrait 5x2 tilings.
    files["tiles.jpg"] = save(Image.fromarray(smooth(640, 480, 7)), "JPEG", quality=60, progressive=True)
    files["portrait.png"] = save(Image.fromarray(smooth(400, 800, 8, noise=0)).quantize(16), "PNG", optimize=True)

    lines = ["# What Pillow made of the files here; written by make_data.py, read by tests/test_image.c.",
             "# decode FILE W H HASH | resize FILE W H HASH | crops FILE TH TW N | crop FILE I HASH",
             "# fixture STEM TH TW N HASH (../shared/fixtures/reference/md2-small/cases/STEM crops_u8).",
             "# HASH: FNV-1a 64 of the [H, W, 3] u8 bytes."]
    total = 0
    for name, data in files.items():
        assert len(data) <= 20 * 1024, (name, len(data))
        with open(os.path.join(HERE, name), "wb") as f:
            f.write(data)
        total += len(data)
        dec = Image.open(io.BytesIO(data)).convert("RGB")
        lines.append(f"decode {name} {dec.size[0]} {dec.size[1]} {fnv(np.asarray(dec).tobytes()):016x}")
    base = Image.open(io.BytesIO(files["baseline.jpg"])).convert("RGB")  # 97x61
    for w, h in [(378, 378), (40, 25), (97, 200), (300, 61), (1, 1), (13, 500), (96, 60), (1000, 7)]:
        lines.append(f"resize baseline.jpg {w} {h} {fnv(np.asarray(resize(base, w, h)).tobytes()):016x}")
    for name in ("tiles.jpg", "portrait.png", "grey16.png"):
        th, tw, cr = crops(Image.open(io.BytesIO(files[name])).convert("RGB"))
        lines.append(f"crops {name} {th} {tw} {len(cr)}")
        for i, c in enumerate(cr):
            lines.append(f"crop {name} {i} {fnv(np.ascontiguousarray(c).tobytes()):016x}")
    if args.fixtures:
        import json

        cases = json.load(open(os.path.join(args.fixtures, "reference/md2-small/cases.json")))["cases"]
        seen = set()
        for c in cases:
            if not c.get("image") or c["image"] in seen:
                continue
            seen.add(c["image"])
            stem = os.path.splitext(c["image"])[0]
            ref = st_crops(os.path.join(args.fixtures, "reference/md2-small", c["tensors"]))
            im_f = Image.open(os.path.join(args.fixtures, "images", c["image"])).convert("RGB")
            th, tw, cr = crops(im_f)
            assert (th, tw) == tuple(c["tiling"]) and np.array_equal(np.stack(cr), ref), stem
            lines.append(f"fixture {stem} {th} {tw} {len(cr)} {fnv(ref.tobytes()):016x}")
    with open(os.path.join(HERE, "expect.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"{len(files)} files, {total} bytes")


if __name__ == "__main__":
    main()
