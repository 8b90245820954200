"""Model download (src/hub.c via `albedo pull` and --model) against a test hub
on 127.0.0.1 serving the fixture model; never the internet."""
import hashlib
import os
import subprocess
import time

import pytest

from conftest import BIN, IMAGES, MODEL, Server, get, load_cases, post, data_url
from hub_server import Hub

COMMIT_MD2 = "a1" * 20
COMMIT_TOK = "b2" * 20
COMMIT_TEST = "c3" * 20
FILES = ("config.json", "model.safetensors", "tokenizer.json")
TINY = next(c for c in load_cases() if c["image"] == "tiny.png" and c["task"] == "caption")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


MODEL_SHA = sha256(os.path.join(MODEL, "model.safetensors"))


def make_hub():
    f = lambda n: os.path.join(MODEL, n)  # noqa: E731
    return Hub({
        "vikhyatk/moondream2": {"commit": COMMIT_MD2, "revisions": ["2025-06-21", "main"],
                                "files": {"config.json": f("config.json"), "model.safetensors": f("model.safetensors")}},
        "moondream/starmie-v1": {"commit": COMMIT_TOK, "files": {"tokenizer.json": f("tokenizer.json")}},
        "test/md2-small": {"commit": COMMIT_TEST, "revisions": ["main", "v1"],
                           "files": {n: f(n) for n in FILES}},
    })


@pytest.fixture
def hub():
    h = make_hub()
    yield h
    h.stop()


@pytest.fixture
def env(tmp_path, hub):
    e = dict(os.environ)
    for k in ("HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE", "XDG_CACHE_HOME", "ALBEDO_MODEL"):
        e.pop(k, None)
    e.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "hf"), ALBEDO_CACHE=str(tmp_path / "albedo"),
             HOME=str(tmp_path / "home"))
    return e


def pull(env, spec="moondream2", **extra):
    e = dict(env, **extra)
    return subprocess.run([BIN, "pull", spec], env=e, capture_output=True, text=True, timeout=300)


def assert_same_model(d):
    for n in FILES:
        assert sha256(os.path.join(d, n)) == sha256(os.path.join(MODEL, n)), n


def test_fresh_download_layout(env, hub, tmp_path):
    r = pull(env)
    assert r.returncode == 0, r.stderr
    d = r.stdout.strip()
    assert d == str(tmp_path / "albedo" / "models" / "moondream2")
    assert_same_model(d)
    repo = tmp_path / "hf" / "models--vikhyatk--moondream2"
    assert (repo / "refs" / "2025-06-21").read_text() == COMMIT_MD2
    link = repo / "snapshots" / COMMIT_MD2 / "model.safetensors"
    assert os.readlink(link) == f"../../blobs/{MODEL_SHA}"
    assert (repo / "blobs" / MODEL_SHA).is_file()
    assert not list((repo / "blobs").glob("*.incomplete"))
    tok = tmp_path / "hf" / "models--moondream--starmie-v1"
    assert (tok / "refs" / "main").read_text() == COMMIT_TOK
    assert (tok / "snapshots" / COMMIT_TOK / "tokenizer.json").is_file()
    # huggingface_hub's layout: config.json's blob is named by its git ETag
    cfg = os.readlink(repo / "snapshots" / COMMIT_MD2 / "config.json")
    assert cfg.startswith("../../blobs/") and len(cfg.split("/")[-1]) == 40
    # and the CLI runs the downloaded model, no network needed any more
    hub.stop()
    out = subprocess.run([BIN, "caption", os.path.join(IMAGES, "tiny.png"), "--model", "moondream2", "--json",
                          "--temperature", "0", "--max-tokens", "24"], env=dict(env, HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert '"caption": ' in out.stdout
    import json
    assert json.loads(out.stdout)["caption"] == TINY["output"]["caption"]


def test_repo_id_with_revision(env, hub, tmp_path):
    r = pull(env, "test/md2-small@v1")
    assert r.returncode == 0, r.stderr
    d = r.stdout.strip()
    # all three files in one snapshot: the snapshot is the model directory
    assert d == str(tmp_path / "hf" / "models--test--md2-small" / "snapshots" / COMMIT_TEST)
    assert_same_model(d)
    r2 = pull(env, "test/md2-small")  # main: re-checked online, same blobs, no second download
    assert r2.returncode == 0 and r2.stdout.strip() == d
    gets = [p for m, p, _ in hub.log if m == "GET" and p.startswith("/cdn/")]
    assert len(gets) == 1


def test_resume_after_dropped_connection(env, hub):
    hub.drop_once.add("model.safetensors")
    r = pull(env)
    assert r.returncode == 0, r.stderr
    assert_same_model(r.stdout.strip())
    cdn = [(p, rng) for m, p, rng in hub.log if m == "GET" and p.startswith("/cdn/")]
    assert len(cdn) == 2 and cdn[0][1] is None
    size = os.path.getsize(os.path.join(MODEL, "model.safetensors"))
    start = int(cdn[1][1][len("bytes="):].split("-")[0])
    assert 0 < start < size, cdn  # the second request resumed where the first stopped


def test_resume_from_partial_file(env, hub, tmp_path):
    """A .incomplete left by an interrupted run (or by huggingface_hub) is continued."""
    blobs = tmp_path / "hf" / "models--vikhyatk--moondream2" / "blobs"
    blobs.mkdir(parents=True)
    with open(os.path.join(MODEL, "model.safetensors"), "rb") as f:
        data = f.read()
    (blobs / f"{MODEL_SHA}.incomplete").write_bytes(data[:1234567])
    r = pull(env)
    assert r.returncode == 0, r.stderr
    assert_same_model(r.stdout.strip())
    ranges = [rng for m, p, rng in hub.log if m == "GET" and p.startswith("/cdn/")]
    assert ranges == ["bytes=1234567-"]


def test_cache_hit_offline_and_server_stopped(env, hub):
    r = pull(env)
    assert r.returncode == 0, r.stderr
    rm = pull(env, "test/md2-small")
    assert rm.returncode == 0, rm.stderr
    hub.stop()
    r2 = pull(env, HF_HUB_OFFLINE="1")
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout == r.stdout
    r3 = pull(env)  # not offline, but a fixed revision is taken from the cache without asking
    assert r3.returncode == 0, r3.stderr
    # main is re-checked when online; with the hub gone the cached copy still serves
    r4 = pull(env, "test/md2-small")
    assert r4.returncode == 0 and r4.stdout == rm.stdout, r4.stderr
    r5 = pull(env, "test/md2-small@v1")  # never downloaded at v1 (no ref): names the URL
    assert r5.returncode == 1 and "/test/md2-small/resolve/v1/config.json" in r5.stderr


def test_offline_error_when_not_cached(env, hub):
    r = pull(env, HF_HUB_OFFLINE="1")
    assert r.returncode == 1
    assert "HF_HUB_OFFLINE" in r.stderr and "/vikhyatk/moondream2/resolve/2025-06-21/config.json" in r.stderr
    assert not hub.log, "offline mode touched the network"


def test_network_error_names_url(env, hub):
    hub.stop()
    r = pull(env)
    assert r.returncode == 1
    assert f"{hub.url}/vikhyatk/moondream2/resolve/2025-06-21/config.json" in r.stderr


def test_wrong_checksum_detected(env, hub, tmp_path):
    hub.bad_sha.add("model.safetensors")
    r = pull(env)
    assert r.returncode == 1
    assert "checksum mismatch" in r.stderr and MODEL_SHA in r.stderr
    blobs = tmp_path / "hf" / "models--vikhyatk--moondream2" / "blobs"
    assert not (blobs / ("0" * 64)).exists() and not list(blobs.glob("*.incomplete"))


def test_unknown_repo_and_missing_file(env, hub):
    r = pull(env, "nobody/nothing")
    assert r.returncode == 1 and "nobody/nothing" in r.stderr
    r = pull(env, "test/md2-small@nope")
    assert r.returncode == 1 and "404" in r.stderr
    r = pull(env, "./not/a/dir")
    assert r.returncode == 1 and "no such model directory" in r.stderr


def test_hf_token_sent(env, hub):
    seen = []
    orig = hub._serve

    def spy(h, head):
        seen.append(h.headers.get("Authorization"))
        return orig(h, head)

    hub._serve = spy
    r = pull(env, HF_TOKEN="hf_secret")
    assert r.returncode == 0, r.stderr
    assert seen and all(s == "Bearer hf_secret" for s in seen)
    assert "hf_secret" not in r.stderr + r.stdout


def test_serve_downloads_then_serves(env, hub):
    """`albedo serve --model owner/repo` answers 503 while the model is not
    there yet, then serves it."""
    slow = []
    orig = hub._cdn

    def slow_cdn(h, sha, head):
        if not slow:
            slow.append(1)
            time.sleep(2.0)
        return orig(h, sha, head)

    hub._cdn = slow_cdn
    s = Server("--default-temperature", "0", "--default-max-tokens", "24", model="test/md2-small", env=env,
               wait_ready=False)
    try:
        st, _, out = get(s.url + "/health")
        assert st == 503 and out["status"] == "loading"
        st, _, out = post(s.url + "/v1/caption", {"image_url": data_url("tiny.png")})
        assert st == 503 and out["error"]["code"] == "not_ready"
        s.wait_ready()
        st, _, out = post(s.url + "/v1/caption", {"image_url": data_url("tiny.png")})
        assert st == 200 and out["caption"] == TINY["output"]["caption"]
    finally:
        assert s.stop() == 0


def test_python_fetch(env, hub, tmp_path, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import albedo
    d = albedo.fetch("moondream2")
    assert_same_model(d)
    hub.stop()
    assert albedo.fetch("moondream2", offline=True) == d
    with pytest.raises(albedo.AlbedoError) as e:
        albedo.fetch("test/md2-small", offline=True)
    assert "HF_HUB_OFFLINE" in str(e.value)
