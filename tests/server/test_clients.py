"""The official `moondream` Python client (pip install --no-deps moondream)
pointed at `albedo serve`, and the `albedo` Python package, against the
reference outputs and against each other.

What the official client sends (moondream 2.6.1, cloud_vl.py): image_url as a
data URL (PIL images re-encoded to JPEG q95; a Base64EncodedImage passes its
URL through unchanged), length/question/object/reasoning/spatial_refs,
"stream", and "settings" only when the caller passes settings=. The server's
--default-* flags supply the reference settings for callers that pass none.
"""
import io
import json
import os
import threading

import pytest

from conftest import MODEL, REF_SETTINGS, IMAGES, Server, data_url, image_bytes, load_cases, post

md = pytest.importorskip("moondream")
from moondream.types import Base64EncodedImage  # noqa: E402

CASES = load_cases()
SAMPLE = [c for c in CASES if c["image"] in ("chelsea.jpg", "tiny.png", None)
          or (c["image"] == "astronaut.png" and (c["args"].get("reasoning") or c["args"].get("spatial_refs")))]


def cid(c):
    a = c["args"]
    return f"{c['image']}-{c['task']}-{(a.get('question') or a.get('object') or a.get('length'))[:10]}"


def call(client, c, image, settings=None, stream=False):
    a = c["args"]
    kw = {} if settings is None else {"settings": settings}
    if c["task"] == "caption":
        return client.caption(image, length=a["length"], stream=stream, **kw)
    if c["task"] == "query":
        extra = {}
        if a.get("reasoning"):
            extra["reasoning"] = True
        if a.get("spatial_refs"):
            extra["spatial_refs"] = a["spatial_refs"]
        return client.query(image, a["question"], stream=stream, **extra, **kw)
    return getattr(client, c["task"])(image, a["object"], **kw)


@pytest.fixture(scope="module")
def official(server):
    return md.vl(endpoint=server.url + "/v1")


@pytest.fixture(scope="module")
def local():
    import albedo
    m = albedo.vl(model=MODEL, sessions=2)
    yield m
    m.close()


@pytest.mark.parametrize("c", SAMPLE, ids=[cid(c) for c in SAMPLE])
def test_official_client_reference(official, c):
    """Unchanged bytes (Base64EncodedImage) and no settings: the server's
    defaults make it the reference run."""
    img = Base64EncodedImage(image_url=data_url(c["image"])) if c["image"] else None
    assert call(official, c, img) == c["output"]


@pytest.mark.parametrize("c", [c for c in SAMPLE if c["task"] in ("caption", "query")],
                         ids=[cid(c) for c in SAMPLE if c["task"] in ("caption", "query")])
def test_official_client_streaming(official, c):
    img = Base64EncodedImage(image_url=data_url(c["image"])) if c["image"] else None
    out = call(official, c, img, settings=REF_SETTINGS, stream=True)
    key = "caption" if c["task"] == "caption" else "answer"
    assert "".join(out[key]) == c["output"][key]


def test_official_client_settings_reach_server(official):
    img = Base64EncodedImage(image_url=data_url("tiny.png"))
    short = official.caption(img, settings={"max_tokens": 3, "temperature": 0})["caption"]
    full = official.caption(img)["caption"]
    assert full.startswith(short) and len(short) < len(full)
    assert len(official.point(img, "eye", settings={"max_objects": 1})["points"]) == 1


def test_official_client_pil_images(official, server, local):
    """PIL images: the client sends JPEG q95 of them; the server's answer is
    the REST answer for those exact bytes, and the albedo package given the
    same bytes returns the same dicts."""
    from PIL import Image
    pil = Image.open(os.path.join(IMAGES, "chelsea.jpg"))
    buf = io.BytesIO()
    pil.convert("RGB").save(buf, format="JPEG", quality=95)
    jpeg = buf.getvalue()
    for task, arg in (("caption", None), ("query", "What is this?"), ("detect", "face"), ("point", "eye")):
        if task == "caption":
            got = official.caption(pil)
            ref = local.caption(jpeg, settings=REF_SETTINGS)
        elif task == "query":
            got = official.query(pil, arg)
            ref = local.query(jpeg, arg, settings=REF_SETTINGS)
        else:
            got = getattr(official, task)(pil, arg)
            ref = getattr(local, task)(jpeg, arg, settings=REF_SETTINGS)
        body = {"image_url": data_url(jpeg, "image/jpeg"), "settings": REF_SETTINGS}
        if arg:
            body["question" if task == "query" else "object"] = arg
        rest = post(f"{server.url}/v1/{task}", body)[2]
        key = {"caption": "caption", "query": "answer", "detect": "objects", "point": "points"}[task]
        assert got == ref == {key: rest[key]}


def test_official_client_chat(official, server):
    c = next(c for c in CASES if c["image"] == "chelsea.jpg" and c["task"] == "query")
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("chelsea.jpg")}},
                                         {"type": "text", "text": c["args"]["question"]}]}]
    out = official.chat(msgs, settings={"temperature": 0, "max_tokens": 24})
    assert out["message"]["content"] == c["output"]["answer"] and out["finish_reason"] == "length"
    assert "".join(official.chat(msgs, stream=True)["message"]) == c["output"]["answer"]


def test_official_client_api_key():
    s = Server("--api-key", "k3y", "--default-max-tokens", "4")
    try:
        img = Base64EncodedImage(image_url=data_url("tiny.png"))
        assert isinstance(md.vl(endpoint=s.url + "/v1", api_key="k3y").caption(img)["caption"], str)
        with pytest.raises(Exception) as e:
            md.vl(endpoint=s.url + "/v1").caption(img)
        assert getattr(e.value, "code", None) == 401
    finally:
        assert s.stop() == 0


# ---- the albedo package -------------------------------------------------------------

@pytest.mark.parametrize("c", SAMPLE, ids=[cid(c) for c in SAMPLE])
def test_package_equals_official_client(local, c):
    """Same dicts as the official client returns for the reference run."""
    path = os.path.join(IMAGES, c["image"]) if c["image"] else None
    assert call(local, c, path, settings=REF_SETTINGS) == c["output"]


def test_package_inputs_and_reuse(local):
    c = {cc["task"]: cc for cc in CASES if cc["image"] == "astronaut.png" and not cc["args"].get("reasoning")
         and not cc["args"].get("spatial_refs") and cc["args"].get("length", "normal") == "normal"}
    from PIL import Image
    path = os.path.join(IMAGES, "astronaut.png")
    enc = local.encode_image(Image.open(path))  # PIL: raw RGB, no JPEG round trip
    assert enc.size == Image.open(path).size
    assert local.caption(enc, settings=REF_SETTINGS) == c["caption"]["output"]
    assert local.query(enc, c["query"]["args"]["question"], settings=REF_SETTINGS) == c["query"]["output"]
    assert local.detect(enc, "face", settings=REF_SETTINGS) == c["detect"]["output"]
    assert local.point(image_bytes("astronaut.png"), "eye", settings=REF_SETTINGS) == c["point"]["output"]
    assert local.caption(Base64EncodedImage(image_url=data_url("astronaut.png")),
                         settings=REF_SETTINGS) == c["caption"]["output"]
    assert local.caption(data_url("astronaut.png"), settings=REF_SETTINGS) == c["caption"]["output"]


def test_package_streaming_and_cancel(local):
    c = next(c for c in CASES if c["image"] == "tiny.png" and c["task"] == "caption")
    out = local.caption(os.path.join(IMAGES, "tiny.png"), stream=True, settings=REF_SETTINGS)
    assert set(out) == {"caption"}
    assert "".join(out["caption"]) == c["output"]["caption"]
    g = local.query(None, "Talk.", stream=True, settings={"max_tokens": 1500, "temperature": 0})["answer"]
    next(g)
    g.close()  # cancels the generation and frees the session
    assert local.query(None, "hi", settings={"max_tokens": 2})["answer"] is not None


def test_package_threads(local):
    c = next(c for c in CASES if c["image"] is None)
    results = []

    def one():
        results.append(local.query(None, c["args"]["question"], settings=REF_SETTINGS))

    ts = [threading.Thread(target=one) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert results == [c["output"]] * 4


def test_package_errors(local):
    import albedo
    with pytest.raises(albedo.AlbedoError) as e:
        local.caption(b"not an image")
    assert e.value.status_name == "invalid image"
    with pytest.raises(TypeError):
        local.caption(12345)
    with pytest.raises(ValueError):
        local.query(None, None)
    with pytest.raises(albedo.AlbedoError):
        albedo.vl(model="/nonexistent/model/dir")
    with pytest.raises(ValueError):
        albedo.vl(model=MODEL, weights="q5")


def test_package_quantized_weights():
    """weights="q8" reaches the library: the text decoder is quantised at load."""
    import albedo
    m = albedo.vl(model=MODEL, weights="q8")
    try:
        assert ", q8" in m.description
        assert isinstance(m.caption(image_bytes("tiny.png"),
                                    settings={"max_tokens": 4})["caption"], str)
    finally:
        m.close()
