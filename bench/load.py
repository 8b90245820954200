#!/usr/bin/env python3
"""Load benchmark for `albedo serve`: N requests from C concurrent clients on
loopback; prints throughput and latency percentiles as a table.

    # against a running server
    python3 bench/load.py --url http://127.0.0.1:2020 -n 100 -c 8 --endpoint caption
    # or start one for the run (and stop it after)
    python3 bench/load.py --model ../shared/fixtures/models/md2-small --workers 2 -n 40 -c 4

Only the standard library is used. The target must be a loopback address
unless --allow-remote is given; request count and run time are bounded
(-n and --max-seconds), so the run always ends by itself.
"""
import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_IMAGE = os.path.join(ROOT, "..", "shared", "fixtures", "images", "tiny.png")


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def build_body(args):
    settings = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.endpoint == "health":
        return None
    with open(args.image, "rb") as f:
        url = "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()
    body = {"image_url": url, "settings": settings, "stream": args.stream}
    if args.endpoint == "query":
        body["question"] = args.question
    if args.endpoint in ("detect", "point"):
        body["object"] = args.object
        body.pop("stream")
    return json.dumps(body).encode()


def one_request(base, endpoint, body, timeout):
    """(ok, status, latency s, ttft s or None)"""
    path = "/health" if endpoint == "health" else f"/v1/{endpoint}"
    req = urllib.request.Request(base + path, data=body, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    t0 = time.perf_counter()
    ttft = None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            if r.headers.get("Content-Type", "").startswith("text/event-stream"):
                for line in r:
                    if line.startswith(b"data: ") and ttft is None:
                        ttft = time.perf_counter() - t0
            else:
                r.read()
            return True, r.status, time.perf_counter() - t0, ttft
    except urllib.error.HTTPError as e:
        e.read()
        return False, e.code, time.perf_counter() - t0, ttft
    except Exception:  # noqa: BLE001 - counted as a failure
        return False, None, time.perf_counter() - t0, ttft


def run(args, base):
    body = build_body(args)
    lock = threading.Lock()
    results = []
    next_i = [0]
    stop_at = time.perf_counter() + args.max_seconds

    def client():
        while True:
            with lock:
                if next_i[0] >= args.requests or time.perf_counter() > stop_at:
                    return
                next_i[0] += 1
            r = one_request(base, args.endpoint, body, args.timeout)
            with lock:
                results.append(r)

    # one warm-up request so that model loading and first-touch costs stay out
    one_request(base, args.endpoint, body, args.timeout)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return results, wall


def report(args, results, wall):
    ok = [r for r in results if r[0]]
    lat = [r[2] * 1e3 for r in ok]
    ttft = [r[3] * 1e3 for r in ok if r[3] is not None]
    codes = {}
    for r in results:
        codes[r[1]] = codes.get(r[1], 0) + 1
    rows = [
        ("endpoint", args.endpoint + (" (stream)" if args.stream and args.endpoint in ("caption", "query") else "")),
        ("concurrency", str(args.concurrency)),
        ("requests", f"{len(results)} ({len(ok)} ok)"),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in sorted(codes.items(), key=lambda kv: str(kv[0])))),
        ("wall time", f"{wall:.2f} s"),
        ("throughput", f"{len(ok) / wall:.2f} req/s" if wall > 0 else "-"),
        ("latency mean", f"{statistics.mean(lat):.1f} ms" if lat else "-"),
        ("latency p50", f"{percentile(lat, 50):.1f} ms" if lat else "-"),
        ("latency p95", f"{percentile(lat, 95):.1f} ms" if lat else "-"),
        ("latency p99", f"{percentile(lat, 99):.1f} ms" if lat else "-"),
    ]
    if ttft:
        rows.append(("time to first event p50", f"{percentile(ttft, 50):.1f} ms"))
    w = max(len(k) for k, _ in rows)
    print(f"| {'metric':<{w}} | value |\n|{'-' * (w + 2)}|------:|")
    for k, v in rows:
        print(f"| {k:<{w}} | {v} |")
    return 0 if len(ok) == len(results) else 1


def start_server(args):
    binary = args.binary or os.path.join(ROOT, "build", "albedo")
    cmd = [binary, "serve", "--port", "0", "--model", args.model, "--workers", str(args.workers),
           "--queue", str(max(64, args.concurrency * 2)), "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    port = None
    for line in proc.stderr:
        if "listening on http://" in line:
            port = int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])
            break
    if port is None:
        proc.kill()
        sys.exit("bench/load.py: the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, base
        except Exception:  # noqa: BLE001 - still loading
            time.sleep(0.2)
    proc.kill()
    sys.exit("bench/load.py: the server never became ready")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:2020", help="server base URL (without /v1)")
    ap.add_argument("--model", help="start `albedo serve --model MODEL` for the run instead of using --url")
    ap.add_argument("--binary", help="albedo binary (default build/albedo)")
    ap.add_argument("--workers", type=int, default=1, help="--workers of the started server")
    ap.add_argument("-n", "--requests", type=int, default=50)
    ap.add_argument("-c", "--concurrency", type=int, default=4)
    ap.add_argument("--endpoint", default="caption", choices=["caption", "query", "detect", "point", "health"])
    ap.add_argument("--image", default=DEFAULT_IMAGE)
    ap.add_argument("--question", default="What is in this image?")
    ap.add_argument("--object", default="face")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--max-seconds", type=float, default=600, help="stop issuing requests after this long")
    ap.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")
    args = ap.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        ap.error("-n and -c must be positive")

    proc = None
    if args.model:
        proc, base = start_server(args)
    else:
        base = args.url.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        host = urllib.parse.urlparse(base).hostname or ""
        if not args.allow_remote and not (host in ("localhost", "::1") or host.startswith("127.")):
            ap.error(f"{host} is not a loopback address (pass --allow-remote to benchmark it)")
    try:
        results, wall = run(args, base)
        return report(args, results, wall)
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    sys.exit(main())
