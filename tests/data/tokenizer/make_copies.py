#!/usr/bin/env python3
"""Refreshes the compact copies of the shared tokenizer fixtures kept here, so
that test_tokenizer runs in a clone without ../shared:

  gpt2.tokenizer.json.gz        ../shared/fixtures/tokenizers/gpt2/tokenizer.json, gzipped
  <name>.overlay.json           what <name>/tokenizer.json changes in the gpt2 one: the
                                top-level fields that differ, and "vocab_add" for the
                                vocabulary entries it adds (vocab and merges are otherwise
                                identical, which this script asserts)
  <name>.cases.json             ../shared/fixtures/tokenizers/<name>/cases.json
  md2-small.cases.json          the "tokenizer" list of ../shared/fixtures/reference/md2-small/cases.json
                                (md2-small's tokenizer.json is the gpt2 one, asserted)
"""
import gzip
import json
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "..", "..", "..", "shared", "fixtures")
NAMES = ["gpt2", "split-nfc-special", "bytelevel-noregex"]


def load(*parts):
    with open(os.path.join(FIX, *parts), encoding="utf-8") as f:
        return json.load(f)


def dump(obj, name):
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=True, indent=1)
        f.write("\n")


def main():
    src = os.path.join(FIX, "tokenizers", "gpt2", "tokenizer.json")
    with open(src, "rb") as f, open(os.path.join(HERE, "gpt2.tokenizer.json.gz"), "wb") as o:
        with gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=o, mtime=0) as g:
            shutil.copyfileobj(f, g)
    base = load("tokenizers", "gpt2", "tokenizer.json")
    for name in NAMES:
        dump(load("tokenizers", name, "cases.json"), name + ".cases.json")
        if name == "gpt2":
            continue
        tok = load("tokenizers", name, "tokenizer.json")
        assert tok["model"]["merges"] == base["model"]["merges"]
        assert set(tok) == set(base) and set(tok["model"]) == set(base["model"])
        for k in tok["model"]:
            assert k == "vocab" or tok["model"][k] == base["model"][k], k
        bv, tv = base["model"]["vocab"], tok["model"]["vocab"]
        assert all(tv.get(k) == v for k, v in bv.items())
        overlay = {k: tok[k] for k in tok if k != "model" and tok[k] != base[k]}
        overlay["vocab_add"] = {k: v for k, v in tv.items() if k not in bv}
        dump(overlay, name + ".overlay.json")
    assert load("models", "md2-small", "tokenizer.json") == base
    dump(load("reference", "md2-small", "cases.json")["tokenizer"], "md2-small.cases.json")


if __name__ == "__main__":
    main()
