#!/usr/bin/env python3
"""Builds synthetic.json: small tokenizer.json variants, each with the ids and
decoded strings that the Hugging Face `tokenizers` library produces for a list
of texts. test_tokenizer.c replays them to check the parts of the format the
three fixture tokenizers do not exercise (every Split behaviour, normalizers,
added-token flags, unk/byte fallback, ignore_merges, legacy merges, anchors).

The vocabulary is GPT-2's byte alphabet and first 1000 merges, cut from the
fixture tokenizer (../shared/fixtures/tokenizers/gpt2/tokenizer.json or the
gzipped copy next to this script).

Run:  pip install tokenizers==0.23.3 && python3 gen_synthetic.py
"""
import copy
import gzip
import json
import os

import tokenizers
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
N_MERGES = 1000


def load_gpt2():
    with gzip.open(os.path.join(HERE, "gpt2.tokenizer.json.gz"), "rt", encoding="utf-8") as f:
        return json.load(f)


def make_base():
    g = load_gpt2()
    inv = {v: k for k, v in g["model"]["vocab"].items()}
    vocab = {inv[i]: i for i in range(256 + N_MERGES)}
    merges = g["model"]["merges"][:N_MERGES]
    for a, b in merges:  # every merge result of the cut is in the cut vocabulary
        assert a in vocab and b in vocab and a + b in vocab
    base = copy.deepcopy(g)
    base["model"]["vocab"] = vocab
    base["model"]["merges"] = merges
    return base


BL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
BL_NOREGEX = dict(BL, use_regex=False)


def split(pattern, behavior, invert=False, literal=False):
    return {"type": "Split", "pattern": {("String" if literal else "Regex"): pattern},
            "behavior": behavior, "invert": invert}


def seq(*steps):
    return {"type": "Sequence", "pretokenizers": list(steps)}


def added(id_, content, special=False, lstrip=False, rstrip=False, single_word=False,
          normalized=False):
    return {"id": id_, "content": content, "single_word": single_word, "lstrip": lstrip,
            "rstrip": rstrip, "normalized": normalized, "special": special}


COMMON = ["", "a", "Hello world", "  two  spaces  ", "line\nbreak\r\nend\n", "tab\tx",
          "The quick brown fox jumps over the lazy dog.", "don't stop", "x-y--z", "123-4567",
          "na\u00efve caf\u00e9", "\u65e5\u672c\u8a9e", "\U0001F642 ok"]

BEHAVIORS = ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"]


def variants():
    v = []
    v.append({"name": "bytelevel-prefix-legacy-merges",
              "set": {"pre_tokenizer": dict(BL, add_prefix_space=True)},
              "legacy_merges": True,
              "texts": COMMON + [" already spaced", "\u00a0nbsp"]})
    v.append({"name": "ignore-merges",
              "set": {"pre_tokenizer": BL},
              "model": {"ignore_merges": True},
              "vocab_add": {"\u0120zzzzqq": 1256, "zzzz": 1257},
              "texts": ["zzzz zzzzqq", " zzzzqq", "zzzzqq", "zzz"]})
    for beh in BEHAVIORS:
        for inv in (False, True):
            v.append({"name": "split-string-%s-%s" % (beh, inv),
                      "set": {"pre_tokenizer": seq(split("-", beh, inv, literal=True), BL_NOREGEX)},
                      "texts": ["x-y--z", "-a-", "--", "no dashes", "a-b c-d"]})
            v.append({"name": "split-regex-%s-%s" % (beh, inv),
                      "set": {"pre_tokenizer": seq(split("\\d+|\\s", beh, inv), BL_NOREGEX)},
                      "texts": ["ab12cd 34 ef", "12", " lead", "trail 9", "x"]})
    v.append({"name": "split-empty-matches",
              "set": {"pre_tokenizer": seq(split("x*", "MergedWithPrevious"), BL_NOREGEX)},
              "texts": ["abxxcx", "xx", "b", "xaxbx"]})
    v.append({"name": "split-literal-metachars",
              "set": {"pre_tokenizer": seq(split(".*", "Isolated", literal=True), BL_NOREGEX)},
              "texts": ["a.*b.*", "abc", ".*.*"]})
    v.append({"name": "split-anchors-multiline",
              "set": {"pre_tokenizer": seq(split("^\\s+|\\s+$", "Removed"), BL)},
              "texts": ["  a b  \n  c d  ", "\n\nx\n", "plain"]})
    # Removed rather than Isolated: BPE alone would often hide a different split.
    v.append({"name": "split-oniguruma-space",
              "set": {"pre_tokenizer": seq(split("\\s+", "Removed"), BL_NOREGEX)},
              "texts": ["a\u180eb\u0085c\u00a0d\u3000e\x1cf", "a \u2028 b"]})
    v.append({"name": "split-oniguruma-space-class",
              "set": {"pre_tokenizer": seq(split("[^\\s\\p{L}]+", "Removed"), BL_NOREGEX)},
              "texts": ["a\u180eb\u0085c\u00a0d-e\x1cf"]})
    v.append({"name": "split-oniguruma-word",
              "set": {"pre_tokenizer": seq(split("\\w+", "Removed"), BL_NOREGEX)},
              "texts": ["ab\u0301c\u0663d\u2167e \u00bd-x_y"]})
    v.append({"name": "split-oniguruma-hex",
              "set": {"pre_tokenizer": seq(split("\\h+", "Removed"), BL_NOREGEX)},
              "texts": ["cafe babe xyz 09AF"]})
    v.append({"name": "split-oniguruma-dotall",
              "set": {"pre_tokenizer": seq(split("(?m)a.b", "Removed"), BL_NOREGEX)},
              "texts": ["xa\nbx", "a-b"]})
    v.append({"name": "gpt2-regex-nel",
              "set": {"pre_tokenizer": BL},
              "texts": ["a\u0085\u0085c", "a\u180e\u180eb", "  \u00a0d"]})
    v.append({"name": "nfkd-lowercase",
              "set": {"normalizer": {"type": "Sequence", "normalizers": [
                  {"type": "NFKD"}, {"type": "Lowercase"}]},
                      "pre_tokenizer": seq(split("\\s+", "MergedWithPrevious"), BL_NOREGEX)},
              "texts": ["\ufb01ne \u00c9COLE", "\u0130stanbul", "\u216b \u2460", "\u03a3\u0391\u03a3 ok",
                        "\u212b ANGSTROM"]})
    for form in ("NFC", "NFD", "NFKC"):
        v.append({"name": "normalizer-" + form,
                  "set": {"normalizer": {"type": form}, "pre_tokenizer": BL},
                  "texts": ["e\u0301 \u00e9 \ufb01 \u2460 \u212b \uac00 \u1100\u1161"]})
    v.append({"name": "added-token-flags",
              "set": {"normalizer": {"type": "Lowercase"}, "pre_tokenizer": BL,
                      "added_tokens": [
                          added(1256, "<sep>", special=True, lstrip=True, rstrip=True),
                          added(1257, "[w]", single_word=True),
                          added(1258, "Hello", normalized=True),
                          added(1259, "<|x|>", special=True),
                          added(1260, "<|x|>long", special=False),
                          added(1261, "\u00e9t\u00e9", normalized=True),
                      ]},
              "texts": ["a  <sep>  b", "<sep>", " <sep> <sep> ", "x[w]y", "x [w] y", "[w]",
                        "_[w]", "\u00e9[w]", "HELLO world hello", "<|x|><|x|>long", "<|X|>",
                        "\u00c9T\u00c9 \u00e9t\u00e9", "\u0130 \u0130stanbul \u023a"],
              "ids_only": [[1256, 64, 1259], [1259, 1260, 1258]]})
    v.append({"name": "added-normalized-nfkc-strip",
              "set": {"normalizer": {"type": "NFKC"}, "pre_tokenizer": BL,
                      "added_tokens": [
                          added(1256, "\ufb01x", normalized=True),
                          added(1257, "<a>", special=True, rstrip=True),
                          added(1258, " <b>"),
                          added(1259, "[sw]", single_word=True, lstrip=True),
                      ]},
              "texts": ["\ufb01x fix \ufb01 x", "<a> <b>", "<a>   <b> ", "a [sw] b", "a[sw] b",
                        "\ufb01x<a>", "  [sw]"],
              "ids_only": [[1256, 1257, 1258]]})
    v.append({"name": "bytelevel-prefix-after-split",
              "set": {"pre_tokenizer": seq(split("\\s+", "MergedWithNext"),
                                           dict(BL_NOREGEX, add_prefix_space=True))},
              "texts": ["hello big  world", " x", "x"]})
    v.append({"name": "added-tokens-not-in-vocab-numbering",
              "set": {"pre_tokenizer": BL,
                      "added_tokens": [added(5000, "<a>", special=True), added(7, "<b>"),
                                       added(1, "the", special=True)]},
              "texts": ["<a><b>the", "thethe"],
              "ids_only": [[1256, 1257, 1, 0]]})
    v.append({"name": "unk-fuse",
              "set": {"pre_tokenizer": split(" ", "Removed", literal=True)},
              "model": {"unk_token": "<unk>", "fuse_unk": True},
              "vocab_add": {"<unk>": 1256},
              "texts": ["ab\u4e2d\u4e2dc d", "\u4e2d", "a\u20acb\u20ac\u20ac"]})
    v.append({"name": "unk-nofuse",
              "set": {"pre_tokenizer": split(" ", "Removed", literal=True)},
              "model": {"unk_token": "<unk>", "fuse_unk": False},
              "vocab_add": {"<unk>": 1256},
              "texts": ["ab\u4e2d\u4e2dc d", "a\u20acb\u20ac\u20ac"]})
    v.append({"name": "no-unk-drops",
              "set": {"pre_tokenizer": None},
              "texts": ["ab\u4e2d c"]})
    v.append({"name": "byte-fallback",
              "set": {"pre_tokenizer": None},
              "model": {"byte_fallback": True, "unk_token": "<unk>"},
              "vocab_add": {"<unk>": 1256, "<0x20>": 1257, "<0xE4>": 1258, "<0xB8>": 1259,
                            "<0xAD>": 1260},
              "texts": ["a b\u4e2d", "\u20ac\u4e2d\u20ac", "\u20ac\u20ac"]})
    return v


def build(base, var):
    tok = copy.deepcopy(base)
    for k, val in var.get("set", {}).items():
        tok[k] = val
    for k, val in var.get("model", {}).items():
        tok["model"][k] = val
    tok["model"]["vocab"].update(var.get("vocab_add", {}))
    if var.get("legacy_merges"):
        tok["model"]["merges"] = [a + " " + b for a, b in tok["model"]["merges"]]
    return tok


def main():
    base = make_base()
    out = {"generator": "gen_synthetic.py", "library": "tokenizers " + tokenizers.__version__,
           "base": base, "variants": []}
    for var in variants():
        tok = Tokenizer.from_str(json.dumps(build(base, var)))
        cases = []
        for text in var["texts"]:
            ids = tok.encode(text).ids
            cases.append({"text": text, "ids": ids,
                          "decoded": tok.decode(ids, skip_special_tokens=True),
                          "decoded_keep_special": tok.decode(ids, skip_special_tokens=False)})
        for ids in var.get("ids_only", []):
            cases.append({"ids_only": ids,
                          "decoded": tok.decode(ids, skip_special_tokens=True),
                          "decoded_keep_special": tok.decode(ids, skip_special_tokens=False)})
        entry = {k: var[k] for k in ("name", "set", "model", "vocab_add", "legacy_merges")
                 if k in var}
        entry["cases"] = cases
        out["variants"].append(entry)
    with open(os.path.join(HERE, "synthetic.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
