"""The REST API against the reference outputs, streaming, chat, health,
models and metrics — all on a loopback `albedo serve` with the fixture model."""
import json
import os
import threading
import time

import pytest

from conftest import (MODEL, REF_SETTINGS, data_url, get, load_cases, metric, post, sse_events)

CASES = load_cases()


def case_id(c):
    a = c["args"]
    extra = a.get("question") or a.get("object") or a.get("length") or ""
    return f"{c['image']}-{c['task']}-{extra[:12]}{'-reasoning' if a.get('reasoning') else ''}"


def rest_body(c, settings=True):
    body = dict(c["args"])
    if c["image"]:
        body["image_url"] = data_url(c["image"])
    if settings:
        body["settings"] = dict(REF_SETTINGS)
    return body


def compare(out, ref):
    """Text identical; floats identical (the JSON numbers read back exactly)."""
    for key, val in ref.items():
        assert key in out, f"missing {key} in {out}"
        assert out[key] == val, f"{key}: {out[key]!r} != {val!r}"


@pytest.mark.parametrize("c", CASES, ids=[case_id(c) for c in CASES])
def test_reference_case(server, c):
    st, hdrs, out = post(f"{server.url}/v1/{c['task']}", rest_body(c))
    assert st == 200, out
    compare(out, c["output"])
    assert out["request_id"] and hdrs["X-Request-Id"] == out["request_id"]
    assert out["finish_reason"] in ("stop", "length")
    assert set(out["metrics"]) >= {"input_tokens", "output_tokens", "prefill_time_ms", "decode_time_ms", "ttft_ms"}
    assert hdrs["Content-Type"] == "application/json"


STREAM_CASES = [c for c in CASES if c["task"] in ("caption", "query")
                and c["image"] in (None, "tiny.png", "chelsea.jpg", "astronaut.png")]


@pytest.mark.parametrize("c", STREAM_CASES, ids=[case_id(c) for c in STREAM_CASES])
def test_stream_matches_reference(server, c):
    body = rest_body(c)
    body["stream"] = True
    st, ctype, events = sse_events(f"{server.url}/v1/{c['task']}", body)
    assert st == 200 and ctype.startswith("text/event-stream")
    objs = [json.loads(e) for e in events]
    *chunks, last = objs
    assert chunks and all(o["completed"] is False and isinstance(o["chunk"], str) for o in chunks)
    assert last["completed"] is True and last["chunk"] == ""
    assert last["request_id"] and last["finish_reason"] in ("stop", "length") and "metrics" in last
    key = "caption" if c["task"] == "caption" else "answer"
    assert "".join(o["chunk"] for o in chunks) == c["output"][key]
    if "reasoning" in c["output"]:
        assert last["reasoning"] == c["output"]["reasoning"]


def test_defaults_apply_without_settings(server, cases):
    """The server runs with --default-* set to the reference settings, for
    clients (like the Node one) that cannot send settings."""
    c = next(c for c in cases if c["image"] == "tiny.png" and c["task"] == "detect")
    st, _, out = post(f"{server.url}/v1/detect", rest_body(c, settings=False))
    assert st == 200
    compare(out, c["output"])


def test_settings_are_honoured(server):
    body = {"image_url": data_url("tiny.png"), "settings": {"temperature": 0, "max_tokens": 5}}
    st, _, out = post(f"{server.url}/v1/caption", body)
    assert st == 200 and out["metrics"]["output_tokens"] == 5 and out["finish_reason"] == "length"
    body = {"image_url": data_url("tiny.png"), "object": "face", "settings": {"max_objects": 2}}
    st, _, out = post(f"{server.url}/v1/point", body)
    assert st == 200 and len(out["points"]) == 2
    # sampling: the same seed gives the same text, temperature > 0 is accepted
    body = {"question": "Hello", "settings": {"temperature": 1.0, "top_p": 0.9, "max_tokens": 8, "seed": 7}}
    a = post(f"{server.url}/v1/query", body)[2]
    b = post(f"{server.url}/v1/query", body)[2]
    assert a["answer"] == b["answer"]


def test_bare_base64_image(server, cases):
    c = next(c for c in cases if c["image"] == "tiny.png" and c["task"] == "caption")
    body = rest_body(c)
    body["image_url"] = body["image_url"].split(",", 1)[1]
    st, _, out = post(f"{server.url}/v1/caption", body)
    assert st == 200
    compare(out, c["output"])


def test_chat_completions(server, cases):
    c = next(c for c in cases if c["image"] == "chelsea.jpg" and c["task"] == "query")
    body = {"model": "moondream2", "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "system", "content": "You are helpful."},
                         {"role": "user", "content": [
                             {"type": "image_url", "image_url": {"url": data_url("chelsea.jpg")}},
                             {"type": "text", "text": c["args"]["question"]}]}]}
    st, _, out = post(f"{server.url}/v1/chat/completions", body)
    assert st == 200, out
    assert out["object"] == "chat.completion" and out["model"] == "moondream2" and out["id"]
    ch = out["choices"][0]
    assert ch["index"] == 0 and ch["message"]["role"] == "assistant"
    assert ch["message"]["content"] == c["output"]["answer"]
    assert ch["finish_reason"] == "length"
    u = out["usage"]
    assert u["completion_tokens"] == 24 and u["total_tokens"] == u["prompt_tokens"] + 24

    body["stream"] = True
    st, ctype, events = sse_events(f"{server.url}/v1/chat/completions", body)
    assert ctype.startswith("text/event-stream") and events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert all(o["object"] == "chat.completion.chunk" for o in objs)
    text = "".join(o["choices"][0]["delta"].get("content") or "" for o in objs)
    assert text == c["output"]["answer"]
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert objs[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_text_only_string_content(server, cases):
    c = next(c for c in cases if c["image"] is None)
    body = {"messages": [{"role": "user", "content": c["args"]["question"]}], "max_completion_tokens": 24,
            "temperature": 0}
    st, _, out = post(f"{server.url}/v1/chat/completions", body)
    assert st == 200 and out["choices"][0]["message"]["content"] == c["output"]["answer"]


def test_models_and_health(server):
    st, _, out = get(server.url + "/health")
    assert st == 200 and out["status"] == "ok"
    st, _, out = get(server.url + "/v1/models")
    assert st == 200 and out["object"] == "list" and out["data"][0]["id"] == os.path.basename(MODEL)


def test_metrics(server):
    post(f"{server.url}/v1/caption", {"image_url": data_url("tiny.png"), "settings": {"max_tokens": 3}})
    st, hdrs, text = get(server.url + "/metrics")
    assert st == 200 and hdrs["Content-Type"].startswith("text/plain")
    assert 'albedo_requests_total{endpoint="caption",status="200"}' in text
    assert "albedo_request_duration_seconds_bucket{endpoint=\"caption\",le=\"+Inf\"}" in text
    for name in ("albedo_input_tokens_total", "albedo_output_tokens_total", "albedo_queue_depth", "albedo_in_flight"):
        assert metric(server.url, name) >= 0
    assert metric(server.url, "albedo_output_tokens_total") > 0


def test_health_answers_during_long_generation(server):
    """microhttpd's threads never wait for the engine."""
    body = {"question": "Tell me a long story.", "settings": {"max_tokens": 1500, "temperature": 0}}
    done = {}

    def long_request():
        done["result"] = post(f"{server.url}/v1/query", body)
        done["t"] = time.time()

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 60
    while metric(server.url, "albedo_in_flight") < 1 and time.time() < deadline:
        time.sleep(0.02)
    assert metric(server.url, "albedo_in_flight") == 1
    t0 = time.time()
    st, _, out = get(server.url + "/health")
    latency = time.time() - t0
    still_running = "t" not in done
    t.join()
    assert st == 200 and out["status"] == "ok"
    assert still_running, "the generation finished before /health was asked; make it longer"
    assert latency < 1.0, f"/health took {latency:.2f} s during a generation"
    assert done["result"][0] == 200
