#!/usr/bin/env python3
"""make_corpus.py — (re)writes the committed seed corpus under fuzz/corpus/
and the tiny checkpoint in fuzz/data/. Needs Pillow (Debian: python3-pil)
for the images. Deterministic: running it twice gives the same files.

  /usr/bin/python3 fuzz/make_corpus.py   # Debian's python, which has python3-pil

The seeds are small on purpose (libFuzzer mutates faster, the repo stays
light): 16x16 images in every format and flavour image.c decodes, truncated
variants, a complete checkpoint for tiny_model.h's config (names in the 2025
form and the legacy one), config.json variants and tiny tokenizer.json files
cut from tests/data/tokenizer/synthetic.json.

Files named fuzzed-<sha1> in the corpus were found by libFuzzer and kept
because they reach new edges (-merge=1 -use_counters=0 over a 10-minute run);
this script neither writes nor removes them.
"""
import io
import json
import os
import re
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")
CORPUS = os.path.join(FUZZ, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- images -------------------------------------------------------------

def images():
    from PIL import Image

    def base(w=16, h=16):
        im = Image.new("RGB", (w, h))
        px = im.load()
        for y in range(h):
            for x in range(w):
                px[x, y] = ((x * 37 + y * 11) & 255, (x * 5 + y * 53) & 255, ((x ^ y) * 29) & 255)
        return im

    def enc(im, fmt, **kw):
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    rgb = base()
    out = {
        "rgb.png": enc(rgb, "PNG"),
        "rgba.png": enc(rgb.convert("RGBA"), "PNG"),
        "grey.png": enc(rgb.convert("L"), "PNG"),
        "la.png": enc(rgb.convert("LA"), "PNG"),
        "bilevel.png": enc(rgb.convert("1"), "PNG"),
        "pal.png": enc(rgb.convert("P", palette=Image.ADAPTIVE, colors=16), "PNG", transparency=3),
        "grey16.png": enc(rgb.convert("I").point(lambda v: v * 257).convert("I;16"), "PNG"),
        "baseline.jpg": enc(rgb, "JPEG", quality=75),
        "progressive.jpg": enc(rgb, "JPEG", quality=50, progressive=True),
        "grey.jpg": enc(rgb.convert("L"), "JPEG"),
        "cmyk.jpg": enc(rgb.convert("CMYK"), "JPEG"),
        "sub420.jpg": enc(base(13, 7), "JPEG", subsampling=2),
        "rgb.gif": enc(rgb, "GIF"),
        "lossy.webp": enc(rgb, "WEBP", quality=60),
        "lossless.webp": enc(rgb.convert("RGBA"), "WEBP", lossless=True),
        "wide.png": enc(base(64, 6), "PNG"),
        "tall.jpg": enc(base(5, 40), "JPEG"),
        "one.png": enc(base(1, 1), "PNG"),
    }
    frames = [base(), base().transpose(Image.FLIP_LEFT_RIGHT)]
    out["anim.webp"] = enc(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)
    out["anim.gif"] = enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    # Adam7 interlacing is not written by Pillow; tests/data has one.
    p = os.path.join(ROOT, "tests/data/image/interlaced.png")
    out["interlaced.png"] = open(p, "rb").read() if os.path.exists(p) and os.path.getsize(p) < 8192 else None
    for k, v in list(out.items()):
        if v is None:
            del out[k]
    for k in ["baseline.jpg", "rgb.png", "rgb.gif", "lossy.webp"]:
        v = out[k]
        out["trunc-half-" + k] = v[: len(v) // 2]
        out["trunc-hdr-" + k] = v[:40]
    for k, v in sorted(out.items()):
        put("fuzz_image", k, v)


# ---- safetensors --------------------------------------------------------

# Must match fuzz/tiny_model.h.
TINY = dict(crop=4, patch=2, in_ch=1, enc_dim=4, enc_layers=1, enc_ff=4, proj_inner=4, dim=8,
            ff=4, n_layers=1, vocab=4, heads=1, kv_heads=1, coord_feat=2, coord_out=2,
            size_feat=2, size_out=2, r_inner=4)


def tiny_tensors(legacy=False):
    t = TINY
    pd = t["in_ch"] * t["patch"] ** 2
    npatch = (t["crop"] // t["patch"]) ** 2
    E, D = t["enc_dim"], t["dim"]
    hd = D // t["heads"]
    ts = []

    def lin(p, o, i):
        ts.append((p + ".weight", [o, i]))
        ts.append((p + ".bias", [o]))

    def vec(n, k):
        ts.append((n, [k]))

    lin("vision.patch_emb", E, pd)
    ts.append(("vision.pos_emb", [1, npatch, E]))
    for b in range(t["enc_layers"]):
        for ln in ("ln1", "ln2"):
            vec(f"vision.blocks.{b}.{ln}.weight", E)
            vec(f"vision.blocks.{b}.{ln}.bias", E)
        lin(f"vision.blocks.{b}.attn.qkv", 3 * E, E)
        lin(f"vision.blocks.{b}.attn.proj", E, E)
        lin(f"vision.blocks.{b}.mlp.fc1", t["enc_ff"], E)
        lin(f"vision.blocks.{b}.mlp.fc2", E, t["enc_ff"])
    vec("vision.post_ln.weight", E)
    vec("vision.post_ln.bias", E)
    lin("vision.proj_mlp.fc1", t["proj_inner"], 2 * E)
    lin("vision.proj_mlp.fc2", D, t["proj_inner"])
    ts.append(("text.wte", [t["vocab"], D]))
    for b in range(t["n_layers"]):
        vec(f"text.blocks.{b}.ln.weight", D)
        vec(f"text.blocks.{b}.ln.bias", D)
        lin(f"text.blocks.{b}.attn.qkv", (t["heads"] + 2 * t["kv_heads"]) * hd, D)
        lin(f"text.blocks.{b}.attn.proj", D, t["heads"] * hd)
        lin(f"text.blocks.{b}.mlp.fc1", t["ff"], D)
        lin(f"text.blocks.{b}.mlp.fc2", D, t["ff"])
    vec("text.post_ln.weight", D)
    vec("text.post_ln.bias", D)
    lin("text.lm_head", t["vocab"], D)
    cf, sf = t["coord_feat"] // 2, t["size_feat"] // 2
    ts.append(("region.coord_features", [cf, 1] if legacy else [1, cf]))
    ts.append(("region.size_features", [sf, 2] if legacy else [2, sf]))
    lin("region.coord_encoder", D, t["coord_feat"])
    lin("region.coord_decoder.fc1", t["r_inner"], D)
    lin("region.coord_decoder.fc2", t["coord_out"], t["r_inner"])
    lin("region.size_encoder", D, t["size_feat"])
    lin("region.size_decoder.fc1", t["r_inner"], D)
    lin("region.size_decoder.fc2", t["size_out"], t["r_inner"])
    return ts


LEGACY = [  # canonical prefix -> 2024-08-26 prefix (weights.c, spec §3.4)
    ("vision.patch_emb.", "vision_encoder.encoder.model.visual.patch_embed.linear."),
    ("vision.pos_emb", "vision_encoder.encoder.model.visual.pos_embed"),
    ("vision.post_ln.", "vision_encoder.encoder.model.visual.norm."),
    ("vision.proj_mlp.", "vision_encoder.projection.mlp."),
    ("text.wte", "text_model.transformer.embd.wte.weight"),
    ("text.post_ln.", "text_model.lm_head.ln."),
    ("text.lm_head.", "text_model.lm_head.linear."),
    ("region.coord_features", "region_model.coordinate_features.weight"),
    ("region.size_features", "region_model.size_features.weight"),
    ("region.coord_encoder.", "region_model.coordinate_encoder."),
    ("region.coord_decoder.", "region_model.coordinate_decoder."),
    ("region.size_encoder.", "region_model.size_encoder."),
    ("region.size_decoder.", "region_model.size_decoder."),
]


def legacy_name(n):
    for a, b in LEGACY:
        if n.startswith(a):
            return b + n[len(a):]
    if n.startswith("vision.blocks."):
        rest = n[len("vision.blocks."):]
        blk, tail = rest.split(".", 1)
        tail = tail.replace("ln1.", "norm1.").replace("ln2.", "norm2.")
        return f"vision_encoder.encoder.model.visual.blocks.{blk}.{tail}"
    if n.startswith("text.blocks."):
        rest = n[len("text.blocks."):]
        blk, tail = rest.split(".", 1)
        tail = tail.replace("attn.qkv.", "mixer.Wqkv.").replace("attn.proj.", "mixer.out_proj.")
        return f"text_model.transformer.h.{blk}.{tail}"
    return n


def safetensors(tensors, dtype="BF16", meta=True, align=8):
    """tensors: [(name, shape)]; values are a fixed byte pattern."""
    size = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    hdr, data = {}, b""
    for name, shape in sorted(tensors):
        n = 1
        for s in shape:
            n *= s
        nb = n * size
        hdr[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + nb]}
        data += bytes((i * 7 + 0x3c) & 0xff for i in range(nb))
    if meta:
        hdr["__metadata__"] = {"format": "pt"}
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % align)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_corpus():
    tiny = tiny_tensors()
    full = safetensors([("model." + n, s) for n, s in tiny])
    os.makedirs(os.path.join(FUZZ, "data"), exist_ok=True)
    with open(os.path.join(FUZZ, "data", "tiny.safetensors"), "wb") as f:
        f.write(full)
    put("fuzz_safetensors", "tiny-bf16.safetensors", full)
    put("fuzz_safetensors", "tiny-f32-bare-names.safetensors", safetensors(tiny, "F32", meta=False))
    leg = [("model." + legacy_name(n), s) for n, s in tiny_tensors(legacy=True)]
    put("fuzz_safetensors", "tiny-legacy-f16.safetensors", safetensors(leg, "F16"))
    orig = [("model._orig_mod." + n if i % 3 == 0 else n, s) for i, (n, s) in enumerate(tiny)]
    put("fuzz_safetensors", "tiny-orig-mod.safetensors", safetensors(orig))
    put("fuzz_safetensors", "empty-header.safetensors", struct.pack("<Q", 2) + b"{}")
    put("fuzz_safetensors", "metadata-only.safetensors", safetensors([], meta=True))
    put("fuzz_safetensors", "md2-shape.safetensors",
        safetensors([("model.vision.patch_emb.weight", [1152, 588])], meta=False)[:200])
    put("fuzz_safetensors", "dtypes.safetensors", (lambda h: struct.pack("<Q", len(h)) + h + bytes(64))(json.dumps({
        "a": {"dtype": "I8", "shape": [2, 3], "data_offsets": [0, 6]},
        "b": {"dtype": "I64", "shape": [1], "data_offsets": [8, 16]},
        "c": {"dtype": "BOOL", "shape": [], "data_offsets": [16, 17]},
        "d": {"dtype": "F64", "shape": [0, 5], "data_offsets": [17, 17]},
        "e": {"dtype": "U16", "shape": [1, 1, 1, 1, 1, 1, 1, 2], "data_offsets": [18, 22]},
        "f": {"dtype": "I32", "shape": [2], "data_offsets": [24, 32]},
        "g": {"dtype": "U8", "shape": [3], "data_offsets": [32, 35]},
        "h": {"dtype": "I16", "shape": [2], "data_offsets": [36, 40]}}).encode()))
    put("fuzz_safetensors", "truncated.safetensors", full[: len(full) // 2])
    put("fuzz_safetensors", "short.safetensors", full[:5])


# ---- config.json --------------------------------------------------------

def config_corpus():
    sh = os.path.join(ROOT, "..", "shared", "fixtures", "models")
    for m in ("md2-small", "md3-small"):
        p = os.path.join(sh, m, "config.json")
        if os.path.exists(p):
            put("fuzz_config", m + ".json", json.dumps(json.load(open(p)), separators=(",", ":")))
    tiny_h = open(os.path.join(FUZZ, "tiny_model.h")).read()
    body = tiny_h.split("tiny_config_json[] =", 1)[1].split(";", 1)[0]
    tiny_json = "".join(json.loads(part) for part in re.findall(r'"(?:[^"\\]|\\.)*"', body))
    put("fuzz_config", "tiny.json", tiny_json)
    put("fuzz_config", "empty-wrapper.json", '{"architectures":["HfMoondream"],"config":{}}')
    put("fuzz_config", "bare.json", '{"text":{"dim":64,"n_heads":4,"n_kv_heads":2},"region":{"dim":64},"vision":{"proj_out_dim":64}}')
    put("fuzz_config", "templates.json", json.dumps({"config": {"tokenizer": {
        "bos_id": 0, "eos_id": 0, "answer_id": 3, "templates": {
            "caption": {"short": [1, 32708, 2, 12492, 3], "normal": [1, 2], "long": []},
            "query": {"prefix": [1, 15381, 2], "suffix": [3]},
            "detect": {"prefix": [1, 7235, 476, 2], "suffix": [3]},
            "point": {"prefix": [1, 2581, 2], "suffix": [3]}}}}}, separators=(",", ":")))
    put("fuzz_config", "int4.json", '{"config":{"text":{"group_size":128}}}')
    put("fuzz_config", "nulls.json", '{"config":{"text":{"dim":null,"moe":null},"vision":{"crop_size":null}}}')
    put("fuzz_config", "bad-type.json", '{"config":{"vision":{"crop_size":"378"}}}')
    put("fuzz_config", "not-object.json", '[1,2,3]')
    # Valid but large geometry: a mutation or two away from the size
    # arithmetic's limits (side * side, in_ch * patch * patch).
    put("fuzz_config", "big-side.json", '{"config":{"vision":{"crop_size":40000,"enc_patch_size":2}}}')
    put("fuzz_config", "big-patch.json",
        '{"config":{"vision":{"crop_size":20000,"enc_patch_size":20000,"in_channels":1,"overlap_margin":0}}}')


# ---- tokenizer.json -----------------------------------------------------

def tokenizer_corpus():
    syn = json.load(open(os.path.join(ROOT, "tests/data/tokenizer/synthetic.json")))
    base = syn["base"]
    vocab = base["model"]["vocab"]
    merges = base["model"]["merges"][:60]
    byte_tokens = {k: v for k, v in vocab.items() if v < 256}
    keep = dict(byte_tokens)
    for a, b in merges:
        keep[a + b] = vocab[a + b]
    texts = ["Hello world", "  two  spaces  ", "caf\u00e9 \u00c5ngstr\u00f6m \u2126", "a-b-c 123 4567",
             "\u3053\u3093\u306b\u3061\u306f \U0001f600", "line1\nline2\r\n\tend"]
    variants = {v["name"]: v for v in syn["variants"]}
    pick = ["bytelevel-prefix-legacy-merges", "split-regex-Isolated-False", "split-string-Removed-True",
            "split-regex-MergedWithNext-True", "split-empty-matches", "split-anchors-multiline",
            "nfkd-lowercase", "normalizer-NFC", "added-token-flags", "added-tokens-not-in-vocab-numbering",
            "unk-fuse", "byte-fallback", "ignore-merges", "split-oniguruma-dotall"]
    for i, name in enumerate(pick):
        v = variants[name]
        tok = json.loads(json.dumps(base))
        tok["model"]["vocab"] = dict(keep)
        tok["model"]["merges"] = [" ".join(m) for m in merges] if v.get("legacy_merges") else merges
        for k, val in v.get("set", {}).items():
            tok[k] = val
        for k, val in v.get("model", {}).items():
            tok["model"][k] = val
        for k, val in v.get("vocab_add", {}).items():
            tok["model"]["vocab"][k] = val
        js = json.dumps(tok, separators=(",", ":"), ensure_ascii=False).encode()
        text = texts[i % len(texts)].encode()
        put("fuzz_tokenizer", name + ".bin", js + b"\0" + text)
    for i, t in enumerate(texts):
        put("fuzz_tokenizer", f"text-{i}.txt", t)
    put("fuzz_tokenizer", "special.txt", "<|endoftext|>Hello<|md_reserved_0|> albedo world<|endoftext|>")
    put("fuzz_tokenizer", "ids.bin", b"{}\0" + struct.pack("<8H", 15496, 995, 50256, 0xffff, 1, 2, 220, 0xfffe))
    put("fuzz_tokenizer", "invalid-utf8.bin", b"null\0" + b"ok \xc3\x28 \xe2\x82 \xf0\x9f\x98")


# ---- json_out -----------------------------------------------------------

def json_out_corpus():
    put("fuzz_json_out", "string.bin", b"\0" + "a \"quoted\" \\ line\n\ttab \x01\x1f\x7f caf\u00e9 \U0001f600".encode())
    put("fuzz_json_out", "string-empty.bin", b"\0")
    put("fuzz_json_out", "doubles.bin", b"\1" + struct.pack("<10d", 0.0, -0.0, 1.0, 0.1, 1e16, 1e-7, 123.456,
                                                            5e-324, 1.7976931348623157e308, float("nan")))
    put("fuzz_json_out", "doubles-inf.bin", b"\1" + struct.pack("<3d", float("inf"), -float("inf"), 2.5e-310))


# ---- the REST server: bodies, data URLs, SSE writers, HTTP requests ------

def tiny_png():
    """A 1x1 RGB PNG, written without Pillow."""
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\0\x80\x40\x20")) + chunk(b"IEND", b""))


def rest_corpus():
    import base64
    png = base64.b64encode(tiny_png()).decode()
    url = "data:image/png;base64," + png
    # fuzz_api: byte 0 = route (0 caption, 1 query, 2 detect, 3 point, 4 chat) | defaults bits.
    bodies = [
        (0, "caption", {"image_url": url, "length": "short", "stream": True,
                        "settings": {"temperature": 0, "top_p": 0.5, "max_tokens": 24, "seed": 7}}),
        (0, "caption-bare", {"image_url": png, "length": "long", "model": "moondream2"}),
        (0, "caption-nulls", {"image_url": url, "length": None, "stream": None, "settings": None}),
        (1, "query", {"image_url": url, "question": "What is this?", "reasoning": True,
                      "spatial_refs": [[0.25, 0.5], [0.1, 0.2, 0.6, 0.7]], "stream": False}),
        (1, "query-text", {"question": "Hello there, who are you?", "settings": {"max_tokens": 1000000}}),
        (2, "detect", {"image_url": url, "object": "face", "settings": {"max_objects": 4}, "stream": True}),
        (3, "point", {"image_url": url, "object": "eye", "settings": {"max_objects": 1000001}}),
        (4, "chat", {"model": "moondream2", "stream": True, "reasoning": False, "temperature": 0.5, "top_p": 0.9,
                     "max_completion_tokens": 8, "seed": 1,
                     "messages": [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                                               {"type": "image_url", "image_url": {"url": url}}]},
                                  {"role": "assistant", "content": "ok"},
                                  {"role": "user", "content": [{"type": "text", "text": "More."},
                                                               {"type": "image_url", "image_url": url}]}]}),
        (4, "chat-string", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
        (0, "bad-settings", {"image_url": url, "settings": {"temperature": -1, "top_p": 0, "max_tokens": 2.5}}),
        (1, "bad-refs", {"question": "q", "spatial_refs": [[0.5], [0.5, 7]]}),
        (4, "bad-part", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
        (0, "remote-url", {"image_url": "http://example.com/cat.jpg"}),
        (0, "bad-base64", {"image_url": "data:image/png;base64,@@@@"}),
        (0, "not-image", {"image_url": base64.b64encode(b"hello, not an image").decode()}),
    ]
    for route, name, body in bodies:
        put("fuzz_api", name + ".bin", bytes([route]) + json.dumps(body).encode())
    put("fuzz_api", "defaults.bin", bytes([0x78]) + json.dumps({"image_url": url}).encode())
    put("fuzz_api", "not-json.bin", b"\0{not json")
    put("fuzz_api", "array.bin", b"\1[1, 2]")
    put("fuzz_api", "escapes.bin", b"\1" + '{"question": "caf\\u00e9 \\ud83d\\ude00 \u00e9\\n"}'.encode())

    # fuzz_dataurl: the image_url string itself.
    jpeg = base64.b64encode(b"\xff\xd8\xff\xe0" + bytes(12)).decode()
    gif = base64.b64encode(b"GIF89a" + bytes(10)).decode()
    webp = base64.b64encode(b"RIFF\0\0\0\0WEBPVP8 " + bytes(8)).decode()
    for name, u in [("png-url", url), ("png-bare", png), ("png-nopad", png.rstrip("=")),
                    ("png-urlsafe", png.replace("+", "-").replace("/", "_")),
                    ("png-wrapped", "\n".join(png[i:i + 16] for i in range(0, len(png), 16))),
                    ("jpeg", "data:image/jpeg;base64," + jpeg), ("gif", "data:image/gif;charset=x;base64," + gif),
                    ("webp", webp), ("no-comma", "data:image/png;base64"), ("not-base64-url", "data:image/png,raw"),
                    ("http", "http://example.com/a.png"), ("https", "https://example.com/a.png"),
                    ("pad-middle", "iVBO=Rw0KGgo"), ("pad-three", "iVBORw0KGgo==="), ("one-extra", "iVBORw0KGgoA"),
                    ("empty", ""), ("path", "/etc/passwd"), ("file-url", "file:///etc/passwd")]:
        put("fuzz_dataurl", name + ".txt", u)

    # fuzz_sse: byte 0 = route (0 caption, 1 query, 2 chat) | 4 stream | 8 reasoning | 16 length | 32 fail;
    # then NUL-separated: model name, [reasoning], chunks..., [error message].
    parts = ["moondream2", "A cat ", "on a \"mat\".\n", "caf\u00e9 \U0001f600", "\x01\x7f"]
    seeds = [("caption-stream", 0 | 4, parts), ("caption", 0, parts), ("query-reasoning", 1 | 4 | 8,
             ["m", "Thinking about \u00e9", "yes"]), ("chat-stream", 2 | 4 | 16, parts), ("chat", 2, parts),
             ("fail-stream", 1 | 4 | 32, ["m", "partial ", "engine failed: caf\u00e9"]),
             ("fail-before", 0 | 4 | 32, ["m", "out of memory"]),
             ("long-model", 2 | 4, ["x" * 126 + "\u00e9\u00e9", "hi"])]
    for name, flags, ps in seeds:
        put("fuzz_sse", name + ".bin", bytes([flags]) + b"\0".join(p.encode() for p in ps))

    # fuzz_http: byte 0 = 1 ready | 8 key "fuzz-key" | 16*mode (0 full, 1 closed, 2 at once, 3 async) |
    # 64 "Connection: close"; then the raw request.
    def req(method, path, body=None, headers=(), chunked=False):
        h = [f"{method} {path} HTTP/1.1", "Host: x"] + list(headers)
        data = b""
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            h.append("Content-Type: application/json")
            if chunked:
                h.append("Transfer-Encoding: chunked")
                data = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + 7]), data[i:i + 7])
                                for i in range(0, len(data), 7)) + b"0\r\n\r\n"
            else:
                h.append(f"Content-Length: {len(data)}")
        return ("\r\n".join(h) + "\r\n\r\n").encode() + data
    q = {"question": "hi"}
    qs = {"question": "hi", "stream": True}
    cases = [
        ("health", 1, req("GET", "/health")), ("health-head", 1, req("HEAD", "/health")),
        ("health-loading", 2, req("GET", "/health")), ("health-failed", 3, req("GET", "/health")),
        ("health-stopping", 1 | 4, req("GET", "/health")),
        ("models", 1, req("GET", "/v1/models")), ("metrics", 1, req("GET", "/metrics")),
        ("not-found", 1, req("GET", "/v1/nope")), ("wrong-method", 1, req("GET", "/v1/caption")),
        ("post-health", 1, req("POST", "/health", {})),
        ("query-at-once", 1 | 32, req("POST", "/v1/query", q)),
        ("query-async", 1 | 48, req("POST", "/v1/query", q)),
        ("stream-at-once", 1 | 32, req("POST", "/v1/query", qs)),
        ("stream-async", 1 | 48 | 64, req("POST", "/v1/query", qs)),
        ("queue-full", 1, req("POST", "/v1/query", q)), ("closed", 1 | 16, req("POST", "/v1/query", q)),
        ("not-ready", 2, req("POST", "/v1/query", q)),
        ("chat-stream", 1 | 48, req("POST", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "hi"}], "stream": True})),
        ("caption-bad-image", 1 | 32, req("POST", "/v1/caption", {"image_url": "@@"})),
        ("key-moondream", 1 | 8 | 32, req("POST", "/v1/query", q, ["X-Moondream-Auth: fuzz-key"])),
        ("key-bearer", 1 | 8 | 48, req("POST", "/v1/query", qs, ["Authorization: Bearer fuzz-key"])),
        ("key-wrong", 1 | 8 | 32, req("POST", "/v1/query", q, ["Authorization: Bearer fuzz-ke"])),
        ("key-missing-metrics", 1 | 8, req("GET", "/metrics")),
        ("key-health", 1 | 8, req("GET", "/health")),
        ("chunked", 1 | 32, req("POST", "/v1/query", q, chunked=True)),
        ("too-large", 1 | 32, req("POST", "/v1/query", {"question": "x" * 1100})),
        ("too-large-chunked", 1 | 32, req("POST", "/v1/query", {"question": "x" * 1100}, chunked=True)),
        ("too-large-expect", 1 | 32, req("POST", "/v1/query", {"question": "x" * 1100},
                                         ["Expect: 100-continue"])),
        ("expect", 1 | 48, req("POST", "/v1/query", q, ["Expect: 100-continue"])),
        ("length-huge", 1, b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{}"),
        ("short-body", 1 | 32, b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: 24\r\n\r\n{\"q"),
        ("pipelined", 1 | 32, req("GET", "/health") + req("POST", "/v1/query", q) + req("GET", "/v1/models")),
        ("http10", 1 | 32, req("POST", "/v1/query", q).replace(b"HTTP/1.1", b"HTTP/1.0")),
        ("escaped-path", 1, req("GET", "/v1/%6dodels%0a")),
        ("query-string", 1 | 8, req("GET", "/health?key=fuzz-key")),
    ]
    for name, flags, data in cases:
        put("fuzz_http", name + ".bin", bytes([flags]) + data)


ALL = {"images": images, "safetensors": safetensors_corpus, "config": config_corpus,
       "tokenizer": tokenizer_corpus, "json_out": json_out_corpus, "rest": rest_corpus}

if __name__ == "__main__":
    # No argument: everything; else the named parts (e.g. "rest", which
    # needs no Pillow).
    for part in sys.argv[1:] or list(ALL):
        ALL[part]()
