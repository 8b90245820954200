"""A stand-in Hugging Face hub on 127.0.0.1 for the download tests.

It answers what huggingface_hub (and albedo's src/hub.c) ask of the real one:

* ``HEAD/GET /<owner>/<repo>/resolve/<revision>/<file>``: small files are
  served directly with a git-style ``ETag``; "LFS" files (*.safetensors)
  answer ``302`` to ``/cdn/<sha256>`` with ``X-Linked-Etag: "<sha256>"`` and
  ``X-Linked-Size``, as the hub does; every answer carries ``X-Repo-Commit``.
* ``GET /cdn/<sha256>`` with ``Range: bytes=N-`` support (206).

Faults for the tests: ``drop_once`` (file names whose first GET sends the
headers and half the bytes, then closes the connection), ``bad_sha`` (file
names whose announced sha256 is wrong). ``log`` records (method, path,
Range header) of every request.
"""
import hashlib
import http.server
import os
import threading


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Hub:
    def __init__(self, repos):
        """repos: {"owner/repo": {"commit": 40-hex, "revisions": [...], "files": {name: path}}}."""
        self.repos = {}
        self.blobs = {}
        for name, r in repos.items():
            files = {}
            for fname, path in r["files"].items():
                with open(path, "rb") as f:
                    data = f.read()
                sha = hashlib.sha256(data).hexdigest()
                self.blobs[sha] = data
                files[fname] = {"data": data, "sha256": sha, "lfs": fname.endswith(".safetensors")}
            self.repos[name] = {"commit": r["commit"], "revisions": set(r.get("revisions", ["main"])) | {r["commit"]},
                                "files": files}
        self.drop_once = set()
        self.bad_sha = set()
        self.log = []
        self._lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                hub._serve(self, head=True)

            def do_GET(self):
                hub._serve(self, head=False)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------------
    def _send(self, h, code, headers, body=b"", head=False):
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _serve(self, h, head):
        with self._lock:
            self.log.append((h.command, h.path, h.headers.get("Range")))
        path = h.path.split("?")[0]
        if path.startswith("/cdn/"):
            return self._cdn(h, path[5:], head)
        parts = path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._send(h, 404, {"X-Error-Code": "EntryNotFound"}, b"not found", head)
        repo, rev, fname = parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:])
        r = self.repos.get(repo)
        if not r:
            return self._send(h, 401, {"X-Error-Code": "RepoNotFound"}, b"repository not found", head)
        if rev not in r["revisions"]:
            return self._send(h, 404, {"X-Error-Code": "RevisionNotFound"}, b"revision not found", head)
        f = r["files"].get(fname)
        if not f:
            return self._send(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": r["commit"]},
                              b"entry not found", head)
        data = f["data"]
        if f["lfs"]:
            # absolute, like the hub's redirect to its CDN (relative ones are
            # followed by the HEAD and mean "renamed repo")
            sha = f["sha256"]
            announced = ("0" * 64) if fname in self.bad_sha else sha
            return self._send(h, 302, {"Location": f"{self.url}/cdn/{sha}?name={fname}", "X-Repo-Commit": r["commit"],
                                       "X-Linked-Etag": f'"{announced}"', "X-Linked-Size": str(len(data)),
                                       "ETag": f'"{git_blob_sha1(data)}"'}, b"", head)
        headers = {"X-Repo-Commit": r["commit"], "ETag": f'"{git_blob_sha1(data)}"',
                   "Content-Type": "application/octet-stream"}
        return self._send(h, 200, headers, data, head)

    def _cdn(self, h, sha, head):
        data = self.blobs.get(sha)
        if data is None:
            return self._send(h, 404, {}, b"no such blob", head)
        name = h.path.partition("?name=")[2]
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                return self._send(h, 416, {"Content-Range": f"bytes */{len(data)}"}, b"", head)
        body = data[start:]
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(body)),
                   "Accept-Ranges": "bytes"}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        code = 206 if start else 200
        if not head and name in self.drop_once and not start:
            self.drop_once.discard(name)
            h.send_response(code)
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            # shut the socket so the client sees the transfer cut short
            try:
                h.connection.shutdown(2)
            except OSError:
                pass
            return
        self._send(h, code, headers, body, head)
