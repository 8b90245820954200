#!/usr/bin/env python3
"""End-to-end: every fixture case through the `albedo` command line.

Runs `albedo <task> IMAGE ... --json --temperature 0 --max-tokens 24`
(detect and point with `--max-objects 4`) for each case of the md2-small
reference, on the fixture model, and every case through `albedo batch` on the same model
stored under the 2024-08-26 names in F16, and compares the printed REST response with the
official implementation's output: identical text, boxes and points, up to the
first step whose reference margin is below 1e-3.

Usage: test_cli.py BUILD_DIR   (prints "N passed, N failed"; exit 1 on failure)
"""
import gzip
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.environ.get("ALBEDO_SHARED", os.path.join(ROOT, "..", "shared"))
HAVE_SHARED = os.path.exists(os.path.join(SHARED, "fixtures", "README.md"))


def flat(v):
    out = []
    for x in v:
        out += flat(x) if isinstance(x, list) else [x]
    return out


def first_low(margins, thr=1e-3):
    for i, m in enumerate(flat(margins)):
        if m < thr:
            return i
    return None


def case_args(case):
    task, a = case["task"], case["args"]
    args = [task]
    if case["image"]:
        args += ["--image", case["image_path"]]
    if task == "caption":
        args += ["--length", a["length"]]
    elif task == "query":
        args += ["--question", a["question"]]
        if a.get("reasoning") or "reasoning" in case["output"]:
            args.append("--reasoning")
        if a.get("spatial_refs"):
            args += ["--spatial-refs", json.dumps(a["spatial_refs"])]
    else:
        args += ["--object", a["object"], "--max-objects", "4"]
    return args + ["--json", "--temperature", "0", "--max-tokens", "24"]


def compare(case, got):
    """Return a list of problems (empty when the output matches)."""
    out, task = case["output"], case["task"]
    problems = []
    if task in ("caption", "query"):
        if first_low(case["logit_margins"]) is not None:
            return problems  # a near-tie decides some token: compared in test_model by tokens
        key = "caption" if task == "caption" else "answer"
        if got.get(key) != out[key]:
            problems.append(f"{key}: got {got.get(key)!r} want {out[key]!r}")
        if "reasoning" in out:
            r = got.get("reasoning") or {}
            if r.get("text") != out["reasoning"]["text"]:
                problems.append("reasoning text differs")
            if [(g["start_idx"], g["end_idx"]) for g in r.get("grounding", [])] != [
                    (g["start_idx"], g["end_idx"]) for g in out["reasoning"]["grounding"]]:
                problems.append("grounding differs")
        return problems
    key = "objects" if task == "detect" else "points"
    want, have = out[key], got.get(key, [])
    per = 3 if task == "detect" else 2
    lm = flat(case["logit_margins"])
    limit = len(want) + 1
    if "eos_coord_margins" in case:
        # Moondream 3: the first object is decided by the prompt's logits row,
        # each later one by the two-way {coord, EOS} choice after an object.
        decisions = lm[:1] + flat(case["eos_coord_margins"])
        for j, m in enumerate(decisions):
            if m < 1e-3:
                limit = min(limit, j)
    else:
        for j in range(len(want) + 1):
            if per * j < len(lm) and lm[per * j] < 1e-3:
                limit = min(limit, j)
    c = first_low(case.get("coord_margins", []))
    if c is not None:
        limit = min(limit, c // 2)
    s = first_low(case.get("size_margins", []))
    if s is not None:
        limit = min(limit, s // 2)
    if limit > len(want) and len(have) != len(want):
        problems.append(f"{len(have)} {key}, want {len(want)}")
    for j in range(min(limit, len(want), len(have))):
        if have[j] != want[j]:
            problems.append(f"{key}[{j}]: got {have[j]} want {want[j]}")
    return problems


def main():
    build = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build"))
    albedo = os.path.join(build, "albedo")
    if HAVE_SHARED:
        cases_path = os.path.join(SHARED, "fixtures/reference/md2-small/cases.json")
        images = os.path.join(SHARED, "fixtures/images")
        main_model = os.path.join(SHARED, "fixtures/models/md2-small")
        tok = os.path.join(main_model, "tokenizer.json")
    else:
        # No fixtures beside the repository: md2-small from its seed, with
        # the repository's copy of its tokenizer.
        cases_path = os.path.join(ROOT, "tests/data/md2-small/cases.json")
        images = os.path.join(ROOT, "tests/data/images")
        main_model = os.path.join(build, "cli-md2-small-gen")
        tok = os.path.join(build, "cli-gpt2.tokenizer.json")
        with gzip.open(os.path.join(ROOT, "tests/data/tokenizer/gpt2.tokenizer.json.gz"), "rb") as f:
            open(tok, "wb").write(f.read())
        subprocess.run([albedo, "synth", "--preset", "md2-small", "--out", main_model, "--seed", "20261127",
                        "--tokenizer", tok], check=True)
    legacy = os.path.join(build, "cli-md2-small-legacy-f16")
    passed = failed = 0
    r = subprocess.run([albedo, "synth", "--preset", "md2-small", "--out", legacy, "--legacy-f16",
                        "--seed", "20261127", "--tokenizer", tok], capture_output=True, text=True)
    if r.returncode != 0:
        print("FAIL synth legacy:", r.stderr)
        failed += 1
    cases = json.load(open(cases_path))["cases"]
    # The fixture model: one `albedo <task> ... --json` invocation per case.
    for model_name, model in (("md2-small", main_model),):
        for i, case in enumerate(cases):
            case = dict(case)
            if case["image"]:
                case["image_path"] = os.path.join(images, case["image"])
            cmd = [albedo] + case_args(case) + ["--model", model, "--threads", "1"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            label = f"{model_name} case {i} ({case['image']} {case['task']})"
            if r.returncode != 0:
                print(f"FAIL {label}: exit {r.returncode}: {r.stderr.strip()}")
                failed += 1
                continue
            try:
                got = json.loads(r.stdout)
            except ValueError:
                print(f"FAIL {label}: not JSON: {r.stdout[:200]!r}")
                failed += 1
                continue
            problems = compare(case, got)
            if problems:
                print(f"FAIL {label}: " + "; ".join(problems))
                failed += 1
            else:
                passed += 1
    # Moondream 3: every md3-small case through `albedo <task> ... --json`.
    # (The reference's text-only case reasoned by default: it gets --reasoning.)
    if HAVE_SHARED:
        md3_cases = json.load(open(os.path.join(SHARED, "fixtures/reference/md3-small/cases.json")))["cases"]
        md3_model = os.path.join(SHARED, "fixtures/models/md3-small")
    else:
        md3_cases = json.load(open(os.path.join(ROOT, "tests/data/md3-small/cases.json")))["cases"]
        md3_model = os.path.join(build, "cli-md3-small-gen")
        subprocess.run([albedo, "synth", "--preset", "md3-small", "--out", md3_model, "--seed", "31337",
                        "--tokenizer", tok], check=True)
    for i, case in enumerate(md3_cases):
        case = dict(case)
        if case["image"]:
            case["image_path"] = os.path.join(images, case["image"])
        cmd = [albedo] + case_args(case) + ["--model", md3_model, "--threads", "1"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        label = f"md3-small case {i} ({case['image']} {case['task']})"
        try:
            got = json.loads(r.stdout) if r.returncode == 0 else None
        except ValueError:
            got = None
        problems = compare(case, got) if got is not None else [f"exit {r.returncode}: {r.stderr.strip()[:200]}"]
        if problems:
            print(f"FAIL {label}: " + "; ".join(problems))
            failed += 1
        else:
            passed += 1
    # `albedo bench` on md3-small with q8 experts: the three stage figures, the
    # end-to-end request (32 output tokens) and the process's peak resident
    # memory, as JSON.
    r = subprocess.run([albedo, "bench", "--model", md3_model, "--threads", "1", "--repeats", "1", "--weights", "q8",
                        "--json"], capture_output=True, text=True)
    try:
        b = json.loads(r.stdout) if r.returncode == 0 else {}
    except ValueError:
        b = {}
    keys = ("vision_crop_ms", "prefill730_tok_s", "decode_d740_tok_s", "e2e_ms", "e2e_ttft_ms", "peak_rss_mb",
            "load_ms", "first_request_ms")
    if all(isinstance(b.get(k), (int, float)) and b[k] > 0 for k in keys) and b.get("e2e_output_tokens") == 32:
        passed += 1
    else:
        print(f"FAIL bench md3-small q8 --json: exit {r.returncode}: {r.stdout.strip()[:200]} {r.stderr.strip()[:200]}")
        failed += 1
    # `albedo bench chartqa` on a synthetic md2-small written into a fresh
    # cache, with its byte-level tokenizer and then with --tokenizer (the
    # GPT-2 vocabulary): a table row of 2 requests each, and the BPE prompts
    # under half as long; the second model directory links the first's weights.
    cache = os.path.join(build, "cli-cache")
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, ALBEDO_CACHE=cache)
    counts = []
    for extra in ([], ["--tokenizer", tok]):
        r = subprocess.run([albedo, "bench", "chartqa", "--synthetic", "md2-small", "--batch", "1", "--mode", "direct",
                            "--images", "1", "--threads", "1"] + extra, capture_output=True, text=True, env=env)
        m = re.search(r"prompts: ([0-9.]+) tokens direct", r.stdout)
        rows = [x.split("|") for x in r.stdout.splitlines() if x.startswith("| direct ")]
        ok = r.returncode == 0 and m and len(rows) == 1 and rows[0][3].strip() == "2"
        counts.append(float(m.group(1)) if ok else None)
        if not ok:
            print(f"FAIL bench chartqa {extra}: exit {r.returncode}: {r.stdout[-300:]} {r.stderr[-300:]}")
    linked = [d for d in os.listdir(cache) if d.startswith("synthetic-md2-small-tok")] if os.path.isdir(cache) else []
    if (None not in counts and counts[1] < counts[0] / 2 and len(linked) == 1
            and os.path.islink(os.path.join(cache, linked[0], "model.safetensors"))
            and open(os.path.join(cache, linked[0], "tokenizer.json"), "rb").read() == open(tok, "rb").read()):
        passed += 1
    else:
        print(f"FAIL bench chartqa --tokenizer: prompt tokens {counts}, directories {linked}")
        failed += 1
    # The legacy F16 model: every case through `albedo batch` (one process,
    # each image encoded once), whose lines carry the same settings.
    lines = []
    for i, case in enumerate(cases):
        a = case["args"]
        req = {"id": i, "skill": case["task"], "settings": {"temperature": 0, "max_tokens": 24, "max_objects": 4}}
        if case["image"]:
            req["image"] = os.path.join(images, case["image"])
        for k in ("length", "question", "object", "reasoning", "spatial_refs"):
            if k in a:
                req[k] = a[k]
        lines.append(json.dumps(req))
    r = subprocess.run([albedo, "batch", "-", "--model", legacy, "--threads", "1"], input="\n".join(lines) + "\n",
                       capture_output=True, text=True)
    outs = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    if r.returncode != 0 or len(outs) != len(cases):
        print(f"FAIL legacy-f16 batch: exit {r.returncode}, {len(outs)} lines: {r.stderr.strip()[:300]}")
        failed += 1
    for out in outs:
        i = out.get("id")
        label = f"legacy-f16 case {i}"
        if out.get("status") != "ok":
            print(f"FAIL {label}: {out}")
            failed += 1
            continue
        problems = compare(cases[i], out["result"])
        if problems:
            print(f"FAIL {label}: " + "; ".join(problems))
            failed += 1
        else:
            passed += 1
    # streaming prints the same text as the non-streamed answer
    case = next(c for c in cases if c["task"] == "caption" and c["image"])
    img = os.path.join(images, case["image"])
    base = [albedo, "caption", img, "--model", main_model, "--temperature", "0", "--max-tokens", "24"]
    a = subprocess.run(base, capture_output=True, text=True).stdout
    b = subprocess.run(base + ["--stream"], capture_output=True, text=True).stdout
    if a == b and a.strip():
        passed += 1
    else:
        print(f"FAIL stream: {b!r} != {a!r}")
        failed += 1
    # usage errors exit 2 with a message; runtime errors exit 1
    for args, code in ((["caption"], 2), (["query"], 2), (["frobnicate"], 2),
                       (["caption", "/nonexistent.jpg", "--model", main_model], 1),
                       (["caption", img, "--model", "/nonexistent"], 1),
                       (["query", img, "hi", "--model", main_model, "--temperature", "-1"], 1),
                       (["caption", img, "--model", main_model, "--length", "epic"], 2)):
        r = subprocess.run([albedo] + args, capture_output=True, text=True)
        if r.returncode == code and r.stderr.startswith("albedo"):
            passed += 1
        else:
            print(f"FAIL {args}: exit {r.returncode} (want {code}), stderr {r.stderr!r}")
            failed += 1
    print(f"{passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
