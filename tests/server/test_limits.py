"""The limits of docs/SERVER.md ("Limits"), each enforced at its boundary:
request body, headers and URL, image side and pixels, prompt tokens and
question bytes, max_tokens, max_objects, spatial references, concurrent
connections, and that no request makes the server read a file; and that
every body stays valid UTF-8 JSON when it quotes what the client sent. The
queue length and the per-request
deadline are in test_errors.py (test_queue_full_and_timeout), the default
body limit and chunked bodies there too; the soak test (tests/soak) mixes
them all under load. Also: what the access log shows."""
import http.client
import json
import os
import socket
import struct
import time
import zlib

import pytest

from conftest import IMAGES, MODEL, REF_FLAGS, Server, data_url, get, load_cases, post, request
from test_errors import assert_error, raw_http

CASES = load_cases()
TINY = next(c for c in CASES if c["image"] == "tiny.png" and c["task"] == "caption")
CTX = 2048  # md2-small's max_context


def png_header(w, h):
    """A PNG whose header says w x h, with no real pixel data: the decoder
    gets past its size check (or not) and then fails on the data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def caption(url, image):
    return post(url + "/v1/caption", {"image_url": data_url(image, "image/png")})[::2]


def test_image_side_limit(server):
    """16384 pixels a side is allowed (the decoder then finds no pixels),
    16385 is refused from the header alone."""
    assert_error(*caption(server.url, png_header(16384, 1)), 400, "image_decode_failed", "image_url")
    assert_error(*caption(server.url, png_header(1, 16384)), 400, "image_decode_failed", "image_url")
    assert_error(*caption(server.url, png_header(16385, 1)), 413, "image_too_large", "image_url")
    assert_error(*caption(server.url, png_header(1, 16385)), 413, "image_too_large", "image_url")


def test_image_pixel_limit(server):
    """100,000,000 pixels allowed, one row more refused."""
    assert_error(*caption(server.url, png_header(10000, 10000)), 400, "image_decode_failed")
    st, out = caption(server.url, png_header(10000, 10001))
    assert_error(st, out, 413, "image_too_large")
    assert "100000000" in out["error"]["message"]


def test_prompt_token_limit(server):
    """A prompt that does not fit the context (image positions included) is
    refused before anything runs; one that fits is answered."""
    st, _, out = post(server.url + "/v1/query", {"question": "hello " * 2500})
    assert_error(st, out, 400, "context_length_exceeded")
    assert f"{CTX}-position context" in out["error"]["message"]
    st, _, out = post(server.url + "/v1/query", {"image_url": data_url("tiny.png"), "question": "hello " * 1400})
    assert_error(st, out, 400, "context_length_exceeded")
    assert "730 taken by the image" in out["error"]["message"]
    st, _, out = post(server.url + "/v1/query", {"question": "hello " * 1000, "settings": {"max_tokens": 1}})
    assert st == 200 and out["metrics"]["input_tokens"] > 1000, out


def test_question_bytes_limit(server):
    st, _, out = post(server.url + "/v1/query", {"question": "a" * ((1 << 20) + 1)})
    assert_error(st, out, 400, "context_length_exceeded")
    assert "1048576 bytes" in out["error"]["message"]
    st, _, out = post(server.url + "/v1/detect", {"image_url": data_url("tiny.png"), "object": "b" * ((1 << 20) + 1)})
    assert_error(st, out, 400, "context_length_exceeded")


def test_max_tokens_bounds_and_context_cap(server):
    for bad, code in ((0, "invalid_value"), (1000001, "invalid_value"), (-5, "invalid_value"), (1.5, "invalid_type")):
        st, _, out = post(server.url + "/v1/query", {"question": "hi", "settings": {"max_tokens": bad}})
        assert_error(st, out, 400, code, "settings.max_tokens")
    st, _, out = post(server.url + "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000001})
    assert_error(st, out, 400, "invalid_value", "max_completion_tokens")
    # The largest value is accepted; generation stops at the end of the
    # context with finish_reason "length" (the last token is sampled from the
    # last position and never fed back, hence CTX + 1).
    st, _, out = post(server.url + "/v1/query", {"question": "hi", "settings": {"max_tokens": 1000000, "temperature": 0}})
    assert st == 200, out
    m = out["metrics"]
    assert out["finish_reason"] == "length" and m["input_tokens"] + m["output_tokens"] == CTX + 1, out["metrics"]


def test_max_objects_bounds(server):
    body = {"image_url": data_url("tiny.png"), "object": "face"}
    for bad, code in ((0, "invalid_value"), (1000001, "invalid_value"), ("3", "invalid_type")):
        st, _, out = post(server.url + "/v1/detect", dict(body, settings={"max_objects": bad}))
        assert_error(st, out, 400, code, "settings.max_objects")
    st, _, out = post(server.url + "/v1/point", dict(body, settings={"max_objects": 1}))
    assert st == 200 and len(out["points"]) == 1 and out["finish_reason"] == "length", out


def test_spatial_refs_limit(server):
    body = {"image_url": data_url("tiny.png"), "question": "What is here?", "settings": {"max_tokens": 2}}
    st, _, out = post(server.url + "/v1/query", dict(body, spatial_refs=[[0.5, 0.5]] * 64))
    assert st == 200, out
    st, _, out = post(server.url + "/v1/query", dict(body, spatial_refs=[[0.5, 0.5]] * 65))
    assert_error(st, out, 400, "invalid_value", "spatial_refs")


@pytest.fixture(scope="module")
def small():
    """--max-body 4096 and --max-connections 4 over two HTTP threads."""
    s = Server("--max-body", "4096", "--max-connections", "4", "--http-threads", "2", *REF_FLAGS)
    yield s
    assert s.stop() == 0, "".join(s.log)


def padded(n):
    """A valid query body of exactly n bytes (unknown keys are ignored)."""
    body = {"question": "hi", "settings": {"max_tokens": 2}, "pad": ""}
    body["pad"] = "x" * (n - len(json.dumps(body)))
    raw = json.dumps(body).encode()
    assert len(raw) == n
    return raw


def test_body_limit_at_its_boundary(small):
    st, _, out = request("POST", small.url + "/v1/query", padded(4096))
    assert st == 200, out
    st, _, out = request("POST", small.url + "/v1/query", padded(4097))
    assert_error(st, out, 413, "body_too_large")
    # A client that waits for 100 Continue is refused before it sends a byte.
    head = (b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    resp = raw_http(small.port, head, read_timeout=10)
    assert resp.startswith(b"HTTP/1.1 413") and b"body_too_large" in resp, resp[:200]


def test_connection_limit(small):
    """With 4 connections open, a fifth is not served (it waits in the
    kernel's accept queue) until one of them closes. The four stay idle: a
    request on them would be answered with "Connection: close", which
    microhttpd sends near its limit to free slots."""
    time.sleep(0.5)  # earlier tests' connections are closed by now
    socks = [socket.create_connection(("127.0.0.1", small.port)) for _ in range(4)]
    try:
        time.sleep(0.5)  # accepted by now
        extra = socket.create_connection(("127.0.0.1", small.port))
        extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        extra.settimeout(1.0)
        with pytest.raises(socket.timeout):
            extra.recv(100)
        socks.pop(0).close()
        extra.settimeout(10)
        assert extra.recv(100).startswith(b"HTTP/1.1 200")
        extra.close()
    finally:
        for s in socks:
            s.close()


def test_header_and_url_limits(server):
    """microhttpd's 32 KB per connection holds the request line and the
    headers: more is refused by it (its own plain answers, not JSON)."""
    resp = raw_http(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 200"), resp[:100]
    resp = raw_http(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 431"), resp[:100]
    resp = raw_http(server.port, b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 414"), resp[:100]
    assert get(server.url + "/health")[0] == 200


def test_no_request_reads_a_file(server):
    """The model is fixed at start-up and images come only as base64: a path,
    a file URL or a remote URL is refused, a "model" field is ignored."""
    path = os.path.join(os.path.abspath(IMAGES), "tiny.png")
    for url, code in ((path, "invalid_base64"), ("file://" + path, "invalid_base64"),
                      ("https://example.com/tiny.png", "invalid_image_url"), ("/etc/passwd", "image_decode_failed")):
        st, _, out = post(server.url + "/v1/caption", {"image_url": url})
        assert_error(st, out, 400, code, "image_url")
        st, _, out = post(server.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]})
        assert_error(st, out, 400, code, "messages")
    st, _, out = post(server.url + "/v1/caption", {"image_url": data_url("tiny.png"), "model": "/nonexistent/model"})
    assert st == 200 and out["caption"] == TINY["output"]["caption"], out
    st, _, out = get(server.url + "/v1/models")
    assert [m["id"] for m in out["data"]] == [os.path.basename(MODEL)]


def test_log_shows_no_secrets_or_control_bytes():
    """The access log has the method, the path without its query string,
    the status and the time: never a key (header, query string or body), and
    no control byte from a %-encoded path that could forge a log line."""
    key = "log-secret-5e1d"
    s = Server("--api-key", key, *REF_FLAGS)
    try:
        hdr = {"Authorization": "Bearer " + key}
        assert post(s.url + "/v1/query", {"question": key, "settings": {"max_tokens": 2}}, headers=hdr)[0] == 200
        assert post(s.url + "/v1/query", {"question": "hi"}, headers={"X-Moondream-Auth": key + "x"})[0] == 401
        assert get(s.url + "/health?api_key=" + key)[0] == 200
        resp = raw_http(s.port, b"GET /v1/x%0Aalbedo: POST /v1/caption 200 1.0 ms%0D%1b[2J HTTP/1.1\r\nHost: x\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 404")
    finally:
        assert s.stop() == 0
    log = "".join(s.log)
    assert key not in log
    lines = log.splitlines()
    assert all(ln.startswith("albedo: ") for ln in lines), lines
    assert not any(ch in log.replace("\n", "") for ch in "\r\x1b"), log
    assert not any(ln.startswith("albedo: POST /v1/caption") for ln in lines), lines


def raw_post(port, path, body):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_bodies_quoting_the_client_stay_utf8(server):
    """jansson's error text quotes the bytes near a syntax error, and a chat
    model name is cut to 127 bytes: neither may put invalid UTF-8 into a
    response (found by fuzz_api; a strict client would fail to decode it)."""
    st, raw = raw_post(server.port, "/v1/caption", b'{"image_url": "i]]OR\\u0\xd0\x9a\xc6\xc2\xdd\xd3stream": true}')
    assert st == 400
    out = json.loads(raw.decode("utf-8"))  # strict: raises on invalid UTF-8
    assert out["error"]["code"] == "invalid_json"
    name = "m" * 126 + "\u00e9\u00e9"  # 130 bytes in UTF-8: cut inside the first e-acute
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1}
    st, raw = raw_post(server.port, "/v1/chat/completions", json.dumps(body).encode())
    assert st == 200
    out = json.loads(raw.decode("utf-8"))
    assert out["model"] == "m" * 126 + "\ufffd"
