"""Model download (src/hub.c via `albedo pull` and --model) against a test hub
on 127.0.0.1 serving the fixture model; never the internet."""
import hashlib
import os
import subprocess
import time

import pytest

from conftest import BIN, IMAGES, MODEL, SHARED, Server, get, load_cases, post, data_url
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


# ---- Moondream 3: sharded checkpoints (model.safetensors.index.json + shards) ----------

COMMIT_MD3 = "d4" * 20
SHARED_MD3 = os.path.join(SHARED, "fixtures", "reference", "md3-small", "cases.json")


def md3_cases():
    """md3-small's reference cases: the fixture's, or the repository's compact copy."""
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    for p in (SHARED_MD3, os.path.join(root, "tests", "data", "md3-small", "cases.json")):
        if os.path.exists(p):
            import json
            with open(p) as f:
                return json.load(f)["cases"]
    raise FileNotFoundError("md3-small cases.json")


@pytest.fixture(scope="module")
def md3_sharded(tmp_path_factory):
    """md3-small written by `albedo synth` in 12 MiB shards (41.5 MB: 4 shards
    plus the index), with the fixture's tokenizer (md2-small's, the same file)."""
    d = tmp_path_factory.mktemp("md3") / "md3-small-sharded"
    r = subprocess.run([BIN, "synth", "--preset", "md3-small", "--out", str(d), "--seed", "31337", "--shard-mb", "12",
                        "--tokenizer", os.path.join(MODEL, "tokenizer.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shards = sorted(n for n in os.listdir(d) if n.startswith("model-"))
    assert len(shards) >= 3 and not (d / "model.safetensors").exists(), shards
    return d, shards


@pytest.fixture
def hub3(md3_sharded):
    d, shards = md3_sharded
    files = {n: str(d / n) for n in ["config.json", "model.safetensors.index.json"] + shards}
    h = Hub({"moondream/moondream3-preview": {"commit": COMMIT_MD3, "files": files},
             "moondream/starmie-v1": {"commit": COMMIT_TOK, "files": {"tokenizer.json": str(d / "tokenizer.json")}}})
    yield h
    h.stop()


@pytest.fixture
def env3(tmp_path, hub3):
    e = dict(os.environ)
    for k in ("HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE", "XDG_CACHE_HOME", "ALBEDO_MODEL"):
        e.pop(k, None)
    e.update(HF_ENDPOINT=hub3.url, HF_HUB_CACHE=str(tmp_path / "hf"), ALBEDO_CACHE=str(tmp_path / "albedo"),
             HOME=str(tmp_path / "home"))
    return e


def test_md3_sharded_pull_and_run(env3, hub3, md3_sharded, tmp_path):
    d, shards = md3_sharded
    r = pull(env3, "moondream3")
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert out == str(tmp_path / "albedo" / "models" / "moondream3")
    for n in ["config.json", "model.safetensors.index.json", "tokenizer.json"] + shards:
        assert sha256(os.path.join(out, n)) == sha256(d / n), n
    assert not os.path.lexists(os.path.join(out, "model.safetensors"))
    repo = tmp_path / "hf" / "models--moondream--moondream3-preview"
    assert (repo / "refs" / "main").read_text() == COMMIT_MD3
    for n in shards:  # each shard is an LFS blob named by its SHA-256
        assert os.readlink(repo / "snapshots" / COMMIT_MD3 / n) == f"../../blobs/{sha256(d / n)}"
    # the hub said 404 for model.safetensors: remembered as huggingface_hub does
    assert (repo / ".no_exist" / COMMIT_MD3 / "model.safetensors").is_file()
    cdn = [p for m, p, _ in hub3.log if m == "GET" and p.startswith("/cdn/")]
    assert len(cdn) == len(shards)
    # the downloaded model runs offline with the hub gone: the fixture's point case
    hub3.stop()
    case = next(c for c in md3_cases() if c["image"] == "tiny.png" and c["task"] == "point")
    o = subprocess.run([BIN, "point", os.path.join(IMAGES, "tiny.png"), case["args"]["object"], "--model", "moondream3",
                        "--json", "--temperature", "0", "--max-objects", "4", "--threads", "1"],
                       env=dict(env3, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert o.returncode == 0, o.stderr
    import json
    got, want = json.loads(o.stdout)["points"], case["output"]["points"]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert abs(g["x"] - w["x"]) < 1e-6 and abs(g["y"] - w["y"]) < 1e-6, (got, want)
    r2 = pull(env3, "moondream3", HF_HUB_OFFLINE="1")
    assert r2.returncode == 0 and r2.stdout == r.stdout, r2.stderr


def test_md3_shard_resumed_and_checked(env3, hub3, md3_sharded, tmp_path):
    d, shards = md3_sharded
    hub3.drop_once.add(shards[1])
    r = pull(env3, "moondream3")
    assert r.returncode == 0, r.stderr
    assert sha256(os.path.join(r.stdout.strip(), shards[1])) == sha256(d / shards[1])
    sha = sha256(d / shards[1])
    gets = [rng for m, p, rng in hub3.log if m == "GET" and p.startswith(f"/cdn/{sha}")]
    assert len(gets) == 2 and gets[0] is None and gets[1].startswith("bytes=")
    start = int(gets[1][len("bytes="):].split("-")[0])
    assert 0 < start < os.path.getsize(d / shards[1])


def test_md3_shard_bad_checksum(env3, hub3, md3_sharded, tmp_path):
    d, shards = md3_sharded
    hub3.bad_sha.add(shards[-1])
    r = pull(env3, "moondream3")
    assert r.returncode == 1
    assert "checksum mismatch" in r.stderr and shards[-1] in r.stderr and sha256(d / shards[-1]) in r.stderr
    blobs = tmp_path / "hf" / "models--moondream--moondream3-preview" / "blobs"
    assert not list(blobs.glob("*.incomplete")) and not (blobs / ("0" * 64)).exists()


def test_md3_index_with_bad_shard_name(env3, hub3, tmp_path):
    """An index that came over the network must not steer a shard outside the cache."""
    import json
    bad = tmp_path / "index.json"
    bad.write_text(json.dumps({"metadata": {}, "weight_map": {"model.text.wte": "../../escape.safetensors"}}))
    data = bad.read_bytes()
    f = hub3.repos["moondream/moondream3-preview"]["files"]["model.safetensors.index.json"]
    f["data"], f["sha256"] = data, hashlib.sha256(data).hexdigest()
    r = pull(env3, "moondream3")
    assert r.returncode == 1 and "not a plain *.safetensors file name" in r.stderr, r.stderr
    assert not any(p.startswith("/moondream/moondream3-preview/resolve/main/..") for _, p, _ in hub3.log)


def test_md3_neither_weights_file(env3, hub3):
    del hub3.repos["moondream/moondream3-preview"]["files"]["model.safetensors.index.json"]
    r = pull(env3, "moondream3")
    assert r.returncode == 1
    assert "model.safetensors: not found (HTTP 404), nor model.safetensors.index.json" in r.stderr, r.stderr


def test_alias_moondream31(env3, hub3, md3_sharded):
    """moondream3.1 names moondream/moondream3.1-9B-A2B (here: a single model.safetensors)."""
    d, _ = md3_sharded
    hub3.repos["moondream/moondream3.1-9B-A2B"] = {
        "commit": "e5" * 20, "revisions": {"main", "e5" * 20},
        "files": {"config.json": hub3.repos["moondream/moondream3-preview"]["files"]["config.json"],
                  "model.safetensors": {"data": b"x" * 100, "sha256": hashlib.sha256(b"x" * 100).hexdigest(),
                                        "lfs": True}}}
    hub3.blobs[hashlib.sha256(b"x" * 100).hexdigest()] = b"x" * 100
    r = pull(env3, "moondream3.1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("/models/moondream3.1")
    assert open(os.path.join(r.stdout.strip(), "model.safetensors"), "rb").read() == b"x" * 100
