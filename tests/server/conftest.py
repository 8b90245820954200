"""Shared fixtures of the server tests: paths, a running `albedo serve`, and
small HTTP helpers. Everything talks to 127.0.0.1 only.

Environment: ALBEDO_BIN (default build/albedo), ALBEDO_LIBRARY (for the
Python package; default build/libalbedo.so), ALBEDO_SHARED (default ../shared).
"""
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHARED = os.environ.get("ALBEDO_SHARED", os.path.join(ROOT, "..", "shared"))
BIN = os.environ.get("ALBEDO_BIN", os.path.join(ROOT, "build", "albedo"))
if os.path.exists(os.path.join(SHARED, "fixtures", "README.md")):
    MODEL = os.path.join(SHARED, "fixtures", "models", "md2-small")
    IMAGES = os.path.join(SHARED, "fixtures", "images")
    CASES_FILE = os.path.join(SHARED, "fixtures", "reference", "md2-small", "cases.json")
else:
    # No fixtures beside the repository: the compact copies in tests/data and
    # md2-small regenerated from its seed next to the binary under test.
    import gzip

    IMAGES = os.path.join(ROOT, "tests", "data", "images")
    CASES_FILE = os.path.join(ROOT, "tests", "data", "md2-small", "cases.json")
    MODEL = os.path.join(os.path.dirname(os.path.abspath(BIN)), "server-md2-small-gen")
    if not os.path.exists(os.path.join(MODEL, "model.safetensors")):
        _tok = os.path.join(os.path.dirname(os.path.abspath(BIN)), "server-gpt2.tokenizer.json")
        with gzip.open(os.path.join(ROOT, "tests", "data", "tokenizer", "gpt2.tokenizer.json.gz"), "rb") as _f:
            open(_tok, "wb").write(_f.read())
        subprocess.run([BIN, "synth", "--preset", "md2-small", "--out", MODEL, "--seed", "20261127", "--tokenizer", _tok],
                       check=True)
# The reference outputs were made with these settings (fixtures/README.md).
REF_SETTINGS = {"temperature": 0, "max_tokens": 24, "max_objects": 4}
REF_FLAGS = ["--default-temperature", "0", "--default-max-tokens", "24", "--default-max-objects", "4"]

# The albedo package from the source tree over build/libalbedo.so, unless the
# pip-installed one is under test (ALBEDO_TEST_INSTALLED=1).
if not os.environ.get("ALBEDO_TEST_INSTALLED"):
    os.environ.setdefault("ALBEDO_LIBRARY", os.path.join(ROOT, "build", "libalbedo.so"))
    sys.path.insert(0, os.path.join(ROOT, "python"))


def load_cases():
    with open(CASES_FILE) as f:
        return json.load(f)["cases"]


def image_bytes(name):
    with open(os.path.join(IMAGES, name), "rb") as f:
        return f.read()


def data_url(name_or_bytes, mime=None):
    data = image_bytes(name_or_bytes) if isinstance(name_or_bytes, str) else name_or_bytes
    if mime is None:
        mime = "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class Server:
    """`albedo serve` on a free port; stop() sends SIGTERM and waits."""

    def __init__(self, *args, env=None, model=MODEL, wait_ready=True):
        cmd = [BIN, "serve", "--port", "0", "--model", model, "--threads", "2"] + list(args)
        e = dict(os.environ)
        e.pop("ALBEDO_API_KEY", None)
        e.update(env or {})
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=e)
        self.log = []
        self.port = None
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if "listening on http://" in line:
                self.port = int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
                break
        if self.port is None:
            self.proc.kill()
            raise RuntimeError("server did not start: " + "".join(self.log))
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()
        self.url = f"http://127.0.0.1:{self.port}"
        if wait_ready:
            self.wait_ready()

    def _read_log(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            st, _, _ = get(self.url + "/health")
            if st == 200:
                return
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + "".join(self.log))
            time.sleep(0.1)
        raise RuntimeError("server not ready: " + "".join(self.log))

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.returncode != 0:
            # what the server said (a sanitizer's report, an error) shows with the failing test
            drain = getattr(self, "_drain", None)
            if drain is not None:
                drain.join(5)
            print("server stderr:\n" + "".join(self.log))
        return self.proc.returncode


def request(method, url, body=None, headers=None, timeout=300):
    """(status, headers, parsed JSON or raw text) without raising on HTTP errors."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if body is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(url, data=body, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, hdrs = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, status, hdrs = e.read(), e.code, e.headers
    except (urllib.error.URLError, ConnectionError) as e:
        return None, None, str(e)
    text = raw.decode("utf-8", "replace")
    try:
        return status, hdrs, json.loads(text)
    except ValueError:
        return status, hdrs, text


def get(url, **kw):
    return request("GET", url, **kw)


def post(url, body, **kw):
    return request("POST", url, body, **kw)


def sse_events(url, body, headers=None, timeout=300):
    """POST a streaming request; returns (status, content-type, [data payloads as str])."""
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=h, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        ctype = r.headers.get("Content-Type")
        raw = r.read().decode("utf-8")
        status = r.status
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), f"bad SSE framing: {block!r}"
        events.append(lines[0][6:])
    assert raw.endswith("\n\n")
    return status, ctype, events


def metric(url, name):
    """The value of one un-labelled Prometheus sample."""
    _, _, text = get(url + "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


@pytest.fixture(scope="session")
def cases():
    return load_cases()


@pytest.fixture(scope="session")
def server():
    """The main server: reference defaults, one worker."""
    s = Server(*REF_FLAGS)
    yield s
    assert s.stop() == 0, "".join(s.log)
