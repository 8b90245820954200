"""`albedo serve` on the engine: concurrent requests batched into shared
forward steps, image prefixes reused across requests (cached_tokens),
cancellation of queued and running requests whose client hangs up, and the
Moondream 3 generation defaults. All on loopback servers with the fixture
models (md3-small from its seed when ../shared is absent)."""
import io
import json
import os
import random
import socket
import subprocess
import threading
import time

import pytest

from conftest import (BIN, MODEL, REF_FLAGS, SHARED, Server, data_url, get, load_cases, metric, post)

CASES = load_cases()


def fresh_image(seed, size=(320, 240)):
    """PNG bytes of an image no other test sends: its prefix is never cached."""
    from PIL import Image
    im = Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def metrics(url):
    """Every un-labelled sample of /metrics as a dict."""
    _, _, text = get(url + "/metrics")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


def run_together(fns):
    """Call every fn at once (a barrier), return their results in order."""
    go = threading.Barrier(len(fns))
    res = [None] * len(fns)

    def one(i):
        go.wait()
        res[i] = fns[i]()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return res


def decidable(c):
    """A case whose every step has a clear margin: batching's rounding cannot
    change its output (fixtures/README.md)."""
    def low(v):
        return any(low(x) for x in v) if isinstance(v, list) else v < 1e-3
    return not any(low(c.get(k, [])) for k in ("logit_margins", "coord_margins", "size_margins"))


def body_of(c):
    body = dict(c["args"])
    if c["image"]:
        body["image_url"] = data_url(c["image"])
    body["settings"] = {"temperature": 0, "max_tokens": 24, "max_objects": 4}
    return body


@pytest.fixture(scope="module")
def batched():
    """Batches of up to 8; reference defaults."""
    s = Server("--max-batch", "8", *REF_FLAGS)
    yield s
    assert s.stop() == 0, "".join(s.log)


def test_concurrent_requests_share_steps(batched):
    before = metrics(batched.url)
    body = {"question": "Tell me about the sea.", "settings": {"max_tokens": 120, "temperature": 0}}
    res = run_together([lambda: post(batched.url + "/v1/query", body)] * 4)
    after = metrics(batched.url)
    assert all(st == 200 for st, _, _ in res), res
    # Greedy, same prompt: batched or not, the same answer.
    assert len({out["answer"] for _, _, out in res}) == 1
    steps = after["albedo_engine_steps_total"] - before["albedo_engine_steps_total"]
    seqs = after["albedo_engine_step_sequences_total"] - before["albedo_engine_step_sequences_total"]
    assert seqs >= 4 * 120 and seqs > 2 * steps, f"{seqs} sequences in {steps} steps: not batched"


def test_concurrent_reference_cases(batched):
    """The decidable reference cases, eight at a time, give the reference's
    exact outputs."""
    cases = [c for c in CASES if decidable(c)]
    assert len(cases) >= 8
    for i in range(0, len(cases), 8):
        group = cases[i:i + 8]
        res = run_together([lambda c=c: post(f"{batched.url}/v1/{c['task']}", body_of(c)) for c in group])
        for c, (st, _, out) in zip(group, res):
            assert st == 200, out
            for key, val in c["output"].items():
                assert out[key] == val, (c["image"], c["task"], key, out[key], val)


def test_repeated_image_reuses_its_prefix(batched):
    """The second request on the same image bytes skips the vision encoder
    and the prefix: cached_tokens 730, in the response and in /metrics."""
    before = metrics(batched.url)
    body = {"image_url": data_url(fresh_image(1)), "question": "What is this?",
            "settings": {"max_tokens": 4, "temperature": 0}}
    st1, _, a = post(batched.url + "/v1/query", body)
    st2, _, b = post(batched.url + "/v1/query", dict(body, question="And the colour?"))
    after = metrics(batched.url)
    assert st1 == 200 and st2 == 200
    assert a["metrics"]["cached_tokens"] == 0 and b["metrics"]["cached_tokens"] == 730
    assert b["metrics"]["input_tokens"] > 730
    assert after["albedo_cached_tokens_total"] - before["albedo_cached_tokens_total"] == 730
    assert after["albedo_prefix_cache_hits_total"] - before["albedo_prefix_cache_hits_total"] == 1
    assert after["albedo_prefix_cache_misses_total"] - before["albedo_prefix_cache_misses_total"] == 1


def test_same_new_image_at_once_is_encoded_once(batched):
    before = metrics(batched.url)
    body = {"image_url": data_url(fresh_image(2)), "settings": {"max_tokens": 3}}
    res = run_together([lambda: post(batched.url + "/v1/caption", body)] * 3)
    after = metrics(batched.url)
    assert all(st == 200 for st, _, _ in res)
    assert sorted(out["metrics"]["cached_tokens"] for _, _, out in res) == [0, 730, 730]
    assert after["albedo_prefix_cache_misses_total"] - before["albedo_prefix_cache_misses_total"] == 1
    assert after["albedo_cached_tokens_total"] - before["albedo_cached_tokens_total"] == 2 * 730


def test_decoding_goes_on_while_an_image_is_encoded(batched):
    """A running generation keeps stepping while the image worker encodes a
    new image (before the engine, the encoder stalled every request)."""
    image = data_url(fresh_image(3))  # made first: the generation is short enough to end meanwhile
    long = {"question": "Go on and on.", "settings": {"max_tokens": 1900, "temperature": 0}}
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", post(batched.url + "/v1/query", long)))
    t.start()
    deadline = time.time() + 60
    while metric(batched.url, "albedo_in_flight") < 1 and time.time() < deadline:
        time.sleep(0.01)
    before = metrics(batched.url)
    st, _, out = post(batched.url + "/v1/caption", {"image_url": image, "settings": {"max_tokens": 2}})
    after = metrics(batched.url)
    t.join()
    assert st == 200 and done["r"][0] == 200
    assert after["albedo_engine_steps_while_encoding_total"] > before["albedo_engine_steps_while_encoding_total"]


def hang_up_after_sending(port, path, body, stream):
    """POST and close the connection without reading the answer."""
    data = json.dumps(dict(body, stream=stream)).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % (path.encode(), len(data)) + data)
    return s


def wait_for(fn, timeout=30):
    deadline = time.time() + timeout
    while not fn() and time.time() < deadline:
        time.sleep(0.02)
    return fn()


def test_hang_up_cancels_a_running_request(batched):
    """Not streamed: nothing is written to the client until the end, so only
    the executor's watch of suspended connections notices."""
    before = metric(batched.url, "albedo_cancelled_total")
    body = {"question": "Tell me everything.", "settings": {"max_tokens": 1800, "temperature": 0}}
    s = hang_up_after_sending(batched.port, "/v1/query", body, False)
    assert wait_for(lambda: metric(batched.url, "albedo_in_flight") >= 1)
    t0 = time.time()
    s.close()
    assert wait_for(lambda: metric(batched.url, "albedo_cancelled_total") == before + 1), "not cancelled"
    assert wait_for(lambda: metric(batched.url, "albedo_in_flight") == 0)
    print(f"cancelled {time.time() - t0:.2f} s after the client hung up")


@pytest.fixture(scope="module")
def single():
    """One request at a time: the second waits in the queue."""
    s = Server("--max-batch", "1", *REF_FLAGS)
    yield s
    assert s.stop() == 0, "".join(s.log)


def test_hang_up_removes_a_queued_request(single):
    before = metric(single.url, "albedo_cancelled_total")
    long = {"question": "Tell me everything.", "settings": {"max_tokens": 1800, "temperature": 0}}
    first = hang_up_after_sending(single.port, "/v1/query", long, True)
    assert wait_for(lambda: metric(single.url, "albedo_in_flight") == 1)
    queued = hang_up_after_sending(single.port, "/v1/query", long, False)
    assert wait_for(lambda: metric(single.url, "albedo_queue_depth") == 1)
    queued.close()
    assert wait_for(lambda: metric(single.url, "albedo_queue_depth") == 0)
    assert wait_for(lambda: metric(single.url, "albedo_cancelled_total") == before + 1)
    assert metric(single.url, "albedo_in_flight") == 1  # the first one runs on
    first.close()
    assert wait_for(lambda: metric(single.url, "albedo_in_flight") == 0)
    assert metric(single.url, "albedo_cancelled_total") == before + 2
    st, _, out = post(single.url + "/v1/query", {"question": "hi", "settings": {"max_tokens": 2}})
    assert st == 200, out


# ---- Moondream 3 -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def md3_model(tmp_path_factory):
    fixture = os.path.join(SHARED, "fixtures", "models", "md3-small")
    if os.path.exists(os.path.join(fixture, "config.json")):
        return fixture
    d = tmp_path_factory.mktemp("md3") / "md3-small"
    r = subprocess.run([BIN, "synth", "--preset", "md3-small", "--out", str(d), "--seed", "31337",
                        "--tokenizer", os.path.join(MODEL, "tokenizer.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return str(d)


@pytest.fixture(scope="module")
def md3(md3_model):
    s = Server(model=md3_model)
    yield s
    assert s.stop() == 0, "".join(s.log)


def test_md3_defaults(md3, server):
    st, _, out = get(md3.url + "/v1/models")
    assert st == 200
    assert out["data"][0]["defaults"] == {"temperature": 0.5, "top_p": 0.9, "max_tokens": 768, "max_objects": 150}
    # Flags still win over the model's defaults; md2-small's are the library's.
    st, _, out = get(server.url + "/v1/models")
    assert out["data"][0]["defaults"] == {"temperature": 0, "top_p": 0.3, "max_tokens": 24, "max_objects": 4}


def cli_query(model, question, seed, *extra):
    r = subprocess.run([BIN, "query", "--question", question, "--model", model, "--seed", str(seed), "--max-tokens",
                        "12", "--json", "--threads", "1", *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["answer"]


def test_md3_sampling_uses_top_p_09(md3, md3_model):
    """A request without settings samples like the CLI with the model's
    defaults (temperature 0.5, top_p 0.9), not with Moondream 2's top_p 0.3."""
    question = "Name three colours."
    for seed in range(1, 40):
        own = cli_query(md3_model, question, seed)
        if own != cli_query(md3_model, question, seed, "--top-p", "0.3"):
            break
    else:
        pytest.fail("top_p 0.9 and 0.3 sampled alike for 39 seeds")
    st, _, out = post(md3.url + "/v1/query", {"question": question, "settings": {"seed": seed, "max_tokens": 12}})
    assert st == 200 and out["answer"] == own, (seed, out, own)


def test_md3_reasoning_only_when_asked(md3):
    body = {"image_url": data_url("tiny.png"), "question": "What is it?", "settings": {"max_tokens": 6}}
    st, _, out = post(md3.url + "/v1/query", body)
    assert st == 200 and "reasoning" not in out, out
    st, _, out = post(md3.url + "/v1/query", dict(body, reasoning=True))
    assert st == 200 and "reasoning" in out, out
    st, _, out = post(md3.url + "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "What is it?"}], "max_tokens": 6})
    assert st == 200 and "reasoning" not in out["choices"][0]["message"], out
