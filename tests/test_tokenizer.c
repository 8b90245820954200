/*
 * test_tokenizer.c — the tokenizer against what the Hugging Face `tokenizers`
 * library produced, plus its unit and bad-input behaviour.
 *
 * Fixtures, each case giving text -> ids and ids -> decoded text (special
 * tokens skipped and kept), also checked through the streaming decoder:
 *  - ../shared/fixtures/tokenizers/{gpt2,split-nfc-special,bytelevel-noregex}
 *    and the md2-small reference's tokenizer list, when ../shared exists;
 *  - always, the compact copies in tests/data/tokenizer (see make_copies.py
 *    there): the gpt2 tokenizer.json gzipped, the other two rebuilt from it
 *    with small "overlay" files (they differ from gpt2 only in normalizer,
 *    pre-tokenizer, added tokens and added vocabulary entries), and copies of
 *    every cases.json. With ../shared present the rebuilt files and the copies
 *    are also compared with the originals, so the copies cannot drift;
 *  - tests/data/tokenizer/synthetic.json (gen_synthetic.py): small variants
 *    covering every Split behaviour, normalizers, added-token flags,
 *    unk/byte fallback, ignore_merges and legacy merges.
 * Then: UTF-8 repair on decode, stream/decode agreement on random byte
 * tokens, lookups, bad files and bad arguments, and a speed bound that an
 * O(n^2) merge loop would miss by far.
 */
#define _POSIX_C_SOURCE 200809L

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <zlib.h>

#include "test.h"
#include "tokenizer.h"

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

static char *path_join(const char *dir, const char *rel) {
    static char buf[4][4096];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%.3000s/%.1000s", dir, rel);
    return buf[k];
}

static json_t *json_from_buffer(const uint8_t *buf, size_t len, const char *what) {
    json_error_t err;
    json_t *j = json_loadb((const char *)buf, len, JSON_ALLOW_NUL, &err);
    if (!j) fprintf(stderr, "FAIL %s: %s (line %d)\n", what, err.text, err.line);
    return j;
}

static json_t *json_from_file(const char *path) {
    uint8_t *buf;
    size_t len;
    errbuf e = {{0}};
    if (read_file(path, (size_t)64 << 20, &buf, &len, &e) != ALBEDO_OK) {
        fprintf(stderr, "FAIL cannot read %s: %s\n", path, e.msg);
        return NULL;
    }
    json_t *j = json_from_buffer(buf, len, path);
    free(buf);
    return j;
}

/* Inflates a gzip file into a malloc'ed buffer. */
static uint8_t *gunzip_file(const char *path, size_t *out_len) {
    uint8_t *in;
    size_t in_len;
    errbuf e = {{0}};
    if (read_file(path, (size_t)16 << 20, &in, &in_len, &e) != ALBEDO_OK) {
        fprintf(stderr, "FAIL cannot read %s: %s\n", path, e.msg);
        return NULL;
    }
    z_stream z;
    memset(&z, 0, sizeof z);
    size_t cap = in_len * 4 + 1024, n = 0;
    uint8_t *out = malloc(cap);
    int rc = out ? inflateInit2(&z, 16 + MAX_WBITS) : Z_MEM_ERROR;
    z.next_in = in;
    z.avail_in = (uInt)in_len;
    while (rc == Z_OK) {
        if (n == cap) {
            uint8_t *bigger = realloc(out, cap * 2);
            if (!bigger) {
                rc = Z_MEM_ERROR;
                break;
            }
            out = bigger;
            cap *= 2;
        }
        z.next_out = out + n;
        z.avail_out = (uInt)(cap - n);
        rc = inflate(&z, Z_NO_FLUSH);
        n = cap - z.avail_out;
    }
    inflateEnd(&z);
    free(in);
    if (rc != Z_STREAM_END) {
        fprintf(stderr, "FAIL cannot inflate %s (zlib %d)\n", path, rc);
        free(out);
        return NULL;
    }
    *out_len = n;
    return out;
}

/* Loads a tokenizer from a JSON value through tok_load_json. */
static tokenizer *tok_from_json(const json_t *j, albedo_status *st, errbuf *e) {
    size_t n = json_dumpb(j, NULL, 0, JSON_COMPACT);
    char *buf = malloc(n ? n : 1);
    if (!buf || json_dumpb(j, buf, n, JSON_COMPACT) != n) {
        free(buf);
        *st = ALBEDO_ERR_OUT_OF_MEMORY;
        return NULL;
    }
    tokenizer *t = NULL;
    *st = tok_load_json(buf, n, &t, e);
    free(buf);
    return t;
}

/* An id list from JSON into a malloc'ed array. */
static int32_t *ids_from_json(const json_t *a, int *n) {
    *n = (int)json_array_size(a);
    int32_t *v = malloc(((size_t)*n + 1) * sizeof *v);
    for (int i = 0; v && i < *n; i++) v[i] = (int32_t)json_integer_value(json_array_get(a, (size_t)i));
    return v;
}

/* Everything the streaming decoder returns for ids, concatenated. */
static char *stream_all(const tokenizer *t, const int32_t *ids, int n, int skip, size_t *len, int *failed) {
    tok_stream s;
    tok_stream_init(&s);
    char *out = NULL;
    size_t cap = 0;
    *len = 0;
    *failed = 0;
    for (int i = 0; i < n; i++)
        if (tok_stream_push(t, &s, ids[i], skip, &out, len, &cap) != 0) *failed = 1;
    if (tok_stream_finish(&s, &out, len, &cap) != 0) *failed = 1;
    return out;
}

static bool same_bytes(const char *a, size_t alen, const char *b, size_t blen) {
    return alen == blen && (alen == 0 || memcmp(a, b, alen) == 0);
}

/* Replays a cases list: each case has text+ids or ids_only, and decoded /
 * decoded_keep_special strings. */
static void check_cases(const char *label, const tokenizer *t, const json_t *cases) {
    CHECK(json_array_size(cases) > 0, "%s: no cases", label);
    for (size_t ci = 0; ci < json_array_size(cases); ci++) {
        const json_t *c = json_array_get(cases, ci);
        const json_t *jt = json_object_get(c, "text");
        int nwant;
        int32_t *want = ids_from_json(json_object_get(c, jt ? "ids" : "ids_only"), &nwant);
        errbuf e = {{0}};
        if (jt) {
            int32_t *got = NULL;
            int ngot = -1;
            albedo_status st = tok_encode(t, json_string_value(jt), json_string_length(jt), &got, &ngot, &e);
            int diff = -1;
            if (st == ALBEDO_OK)
                for (int i = 0; i < (ngot > nwant ? ngot : nwant) && diff < 0; i++)
                    if (i >= ngot || i >= nwant || got[i] != want[i]) diff = i;
            CHECK(st == ALBEDO_OK && diff < 0,
                  "%s case %zu (\"%.40s\"): encode status %d (%s), %d ids vs %d expected, first "
                  "difference at %d (got %d, want %d)",
                  label, ci, json_string_value(jt), st, e.msg, ngot, nwant, diff,
                  diff >= 0 && diff < ngot ? got[diff] : -1, diff >= 0 && diff < nwant ? want[diff] : -1);
            free(got);
        }
        static const char *const keys[2] = {"decoded_keep_special", "decoded"};
        for (int skip = 0; skip < 2; skip++) {
            const json_t *jd = json_object_get(c, keys[skip]);
            if (!jd) continue;
            char *got = NULL;
            size_t glen = 0;
            albedo_status st = tok_decode(t, want, nwant, skip, &got, &glen, &e);
            CHECK(st == ALBEDO_OK && got && same_bytes(got, glen, json_string_value(jd), json_string_length(jd)),
                  "%s case %zu: decode(skip_special=%d) gave \"%.60s\" (status %d), want \"%.60s\"", label, ci, skip,
                  got ? got : "", st, json_string_value(jd));
            CHECK(got && got[glen] == 0, "%s case %zu: decode output not NUL-terminated", label, ci);
            free(got);
            int failed;
            char *sgot = stream_all(t, want, nwant, skip, &glen, &failed);
            CHECK(!failed && same_bytes(sgot ? sgot : "", glen, json_string_value(jd), json_string_length(jd)),
                  "%s case %zu: stream(skip_special=%d) gave \"%.60s\", want \"%.60s\"", label, ci, skip,
                  sgot ? sgot : "", json_string_value(jd));
            free(sgot);
        }
        free(want);
    }
}

/* ------------------------------------------------------------------------ */
/* Fixtures                                                                  */

static const char *const fixture_names[3] = {"gpt2", "split-nfc-special", "bytelevel-noregex"};

/* The fixture tokenizer `name` rebuilt from the gzipped gpt2 one and the
 * name's overlay: top-level fields replaced, vocab_add merged into the
 * vocabulary. */
static json_t *rebuild_fixture(const json_t *gpt2, const char *data_dir, const char *name) {
    json_t *tok = json_deep_copy(gpt2);
    if (strcmp(name, "gpt2") == 0) return tok;
    char rel[256];
    snprintf(rel, sizeof rel, "%s.overlay.json", name);
    json_t *ov = json_from_file(path_join(data_dir, rel));
    if (!ov || !tok) {
        json_decref(ov);
        json_decref(tok);
        return NULL;
    }
    const char *key;
    json_t *val;
    json_object_foreach(ov, key, val) {
        if (strcmp(key, "vocab_add") == 0)
            json_object_update(json_object_get(json_object_get(tok, "model"), "vocab"), val);
        else
            json_object_set(tok, key, val);
    }
    json_decref(ov);
    return tok;
}

static void test_fixture_copies(const char *data_dir, const char *shared) {
    size_t len;
    uint8_t *gz = gunzip_file(path_join(data_dir, "gpt2.tokenizer.json.gz"), &len);
    CHECK(gz != NULL, "cannot read the gzipped gpt2 tokenizer");
    if (!gz) return;
    json_t *gpt2 = json_from_buffer(gz, len, "gpt2.tokenizer.json.gz");
    free(gz);
    CHECK(gpt2 != NULL, "gzipped gpt2 tokenizer is not JSON");
    if (!gpt2) return;
    for (int k = 0; k < 3; k++) {
        const char *name = fixture_names[k];
        char rel[256], label[300];
        json_t *tj = rebuild_fixture(gpt2, data_dir, name);
        snprintf(rel, sizeof rel, "%s.cases.json", name);
        json_t *cases = json_from_file(path_join(data_dir, rel));
        CHECK(tj && cases, "%s: cannot build the copy", name);
        errbuf e = {{0}};
        albedo_status st = ALBEDO_OK;
        tokenizer *t = tj ? tok_from_json(tj, &st, &e) : NULL;
        CHECK(t != NULL, "%s (copy): load failed: %d %s", name, st, e.msg);
        snprintf(label, sizeof label, "%s (tests/data copy)", name);
        if (t && cases) check_cases(label, t, json_object_get(cases, "cases"));
        if (shared && tj && cases) { /* the copies must equal the originals */
            snprintf(rel, sizeof rel, "fixtures/tokenizers/%s/tokenizer.json", name);
            json_t *orig = json_from_file(path_join(shared, rel));
            CHECK(orig && json_equal(orig, tj), "%s: rebuilt tokenizer.json differs from %s", name, rel);
            json_decref(orig);
            snprintf(rel, sizeof rel, "fixtures/tokenizers/%s/cases.json", name);
            orig = json_from_file(path_join(shared, rel));
            CHECK(orig && json_equal(orig, cases), "%s: cases copy differs from %s", name, rel);
            json_decref(orig);
        }
        if (k == 0) { /* md2-small's tokenizer is the gpt2 one */
            json_t *md2 = json_from_file(path_join(data_dir, "md2-small.cases.json"));
            CHECK(md2 != NULL, "md2-small.cases.json missing");
            if (t && md2) check_cases("md2-small (tests/data copy)", t, md2);
            if (shared && md2) {
                json_t *ref = json_from_file(path_join(shared, "fixtures/reference/md2-small/cases.json"));
                CHECK(ref && json_equal(json_object_get(ref, "tokenizer"), md2),
                      "md2-small.cases.json differs from the reference's tokenizer list");
                json_decref(ref);
            }
            json_decref(md2);
        }
        tok_free(t);
        json_decref(tj);
        json_decref(cases);
    }
    json_decref(gpt2);
}

static void test_shared_fixtures(const char *shared) {
    for (int k = 0; k < 4; k++) {
        char tpath[512], cpath[512];
        if (k < 3) {
            snprintf(tpath, sizeof tpath, "fixtures/tokenizers/%s/tokenizer.json", fixture_names[k]);
            snprintf(cpath, sizeof cpath, "fixtures/tokenizers/%s/cases.json", fixture_names[k]);
        } else {
            snprintf(tpath, sizeof tpath, "fixtures/models/md2-small/tokenizer.json");
            snprintf(cpath, sizeof cpath, "fixtures/reference/md2-small/cases.json");
        }
        tokenizer *t = NULL;
        errbuf e = {{0}};
        albedo_status st = tok_load_file(path_join(shared, tpath), &t, &e);
        CHECK(st == ALBEDO_OK && t, "%s: load failed: %d %s", tpath, st, e.msg);
        json_t *cases = json_from_file(path_join(shared, cpath));
        CHECK(cases != NULL, "%s unreadable", cpath);
        if (t && cases)
            check_cases(k < 3 ? fixture_names[k] : "md2-small", t,
                        json_object_get(cases, k < 3 ? "cases" : "tokenizer"));
        tok_free(t);
        json_decref(cases);
    }
}

static void test_synthetic(const char *data_dir) {
    json_t *syn = json_from_file(path_join(data_dir, "synthetic.json"));
    CHECK(syn != NULL, "synthetic.json missing");
    if (!syn) return;
    const json_t *base = json_object_get(syn, "base"), *vars = json_object_get(syn, "variants");
    CHECK(json_array_size(vars) >= 20, "synthetic.json has %zu variants", json_array_size(vars));
    for (size_t i = 0; i < json_array_size(vars); i++) {
        const json_t *v = json_array_get(vars, i);
        const char *name = json_string_value(json_object_get(v, "name"));
        json_t *tok = json_deep_copy(base), *model = json_object_get(tok, "model");
        const char *key;
        json_t *val;
        json_object_foreach(json_object_get(v, "set"), key, val) json_object_set(tok, key, val);
        json_object_foreach(json_object_get(v, "model"), key, val) json_object_set(model, key, val);
        json_object_update(json_object_get(model, "vocab"), json_object_get(v, "vocab_add"));
        if (json_is_true(json_object_get(v, "legacy_merges"))) {
            const json_t *merges = json_object_get(model, "merges");
            json_t *legacy = json_array();
            for (size_t m = 0; m < json_array_size(merges); m++) {
                const json_t *p = json_array_get(merges, m);
                char line[256];
                snprintf(line, sizeof line, "%s %s", json_string_value(json_array_get(p, 0)),
                         json_string_value(json_array_get(p, 1)));
                json_array_append_new(legacy, json_string(line));
            }
            json_object_set_new(model, "merges", legacy);
        }
        errbuf e = {{0}};
        albedo_status st;
        tokenizer *t = tok_from_json(tok, &st, &e);
        CHECK(t != NULL, "synthetic %s: load failed: %d %s", name, st, e.msg);
        char label[200];
        snprintf(label, sizeof label, "synthetic %s", name);
        if (t) check_cases(label, t, json_object_get(v, "cases"));
        tok_free(t);
        json_decref(tok);
    }
    json_decref(syn);
}

/* ------------------------------------------------------------------------ */
/* A tiny tokenizer built here: byte b's stand-in character has id b, then a
 * few merges. Its alphabet is computed independently of the library. */

static void byte_char_utf8(int b, char *out) {
    int n = 0;
    for (int x = 0; x < b; x++) {
        bool printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE;
        n += !printable;
    }
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    unsigned cp = printable ? (unsigned)b : 256u + (unsigned)n;
    if (cp < 0x80) {
        out[0] = (char)cp, out[1] = 0;
    } else {
        out[0] = (char)(0xC0 | (cp >> 6)), out[1] = (char)(0x80 | (cp & 0x3F)), out[2] = 0;
    }
}

enum { ID_HE = 256, ID_LL, ID_HELL, ID_HELLO, ID_SPECIAL, ID_PLAIN_ADDED };

static json_t *tiny_json(void) {
    json_t *vocab = json_object();
    for (int b = 0; b < 256; b++) {
        char c[4];
        byte_char_utf8(b, c);
        json_object_set_new(vocab, c, json_integer(b));
    }
    json_object_set_new(vocab, "he", json_integer(ID_HE));
    json_object_set_new(vocab, "ll", json_integer(ID_LL));
    json_object_set_new(vocab, "hell", json_integer(ID_HELL));
    json_object_set_new(vocab, "hello", json_integer(ID_HELLO));
    return json_pack("{s:s, s:n, s:n, s:[{s:i, s:s, s:b, s:b, s:b, s:b, s:b}, {s:i, s:s, s:b, s:b, s:b, s:b, "
                     "s:b}], s:n, s:{s:s, s:b, s:b, s:b}, s:n, s:{s:s, s:b, s:b, s:b}, s:{s:s, s:n, s:n, s:s, "
                     "s:s, s:b, s:b, s:b, s:o, s:[[s,s],s,[s,s]]}}",
                     "version", "1.0", "truncation", "padding", "added_tokens", "id", ID_SPECIAL, "content", "<|end|>",
                     "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized", 0, "special", 1, "id", ID_PLAIN_ADDED,
                     "content", "[plain]", "single_word", 0, "lstrip", 0, "rstrip", 0, "normalized", 0, "special", 0,
                     "normalizer", "pre_tokenizer", "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets", 1,
                     "use_regex", 1, "post_processor", "decoder", "type", "ByteLevel", "add_prefix_space", 1,
                     "trim_offsets", 1, "use_regex", 1, "model", "type", "BPE", "dropout", "unk_token",
                     "continuing_subword_prefix", "", "end_of_word_suffix", "", "fuse_unk", 0, "byte_fallback", 0,
                     "ignore_merges", 0, "vocab", vocab, "merges", "h", "e", "l l", "he", "ll");
}

static tokenizer *tiny_with(json_t *j, albedo_status *st, errbuf *e) {
    tokenizer *t = tok_from_json(j, st, e);
    json_decref(j);
    return t;
}

static void test_tiny(void) {
    errbuf e = {{0}};
    albedo_status st;
    json_t *j = tiny_json();
    CHECK(j != NULL, "tiny tokenizer JSON did not build");
    if (!j) return;
    /* "hell o" has no merge: only he+ll -> hell is listed. */
    tokenizer *t = tiny_with(j, &st, &e);
    CHECK(t != NULL, "tiny tokenizer: %d %s", st, e.msg);
    if (!t) return;
    CHECK(tok_vocab_size(t) == ID_PLAIN_ADDED + 1, "vocab size %d", tok_vocab_size(t));
    CHECK(tok_id(t, "hell") == ID_HELL && tok_id(t, "<|end|>") == ID_SPECIAL && tok_id(t, "nope") == -1,
          "tok_id lookups");
    CHECK(tok_is_special(t, ID_SPECIAL) && !tok_is_special(t, ID_PLAIN_ADDED) && !tok_is_special(t, 'a') &&
              !tok_is_special(t, -5),
          "tok_is_special");

    int32_t *ids = NULL;
    int n = -1;
    st = tok_encode(t, "hello", 5, &ids, &n, &e);
    CHECK(st == ALBEDO_OK && n == 2 && ids[0] == ID_HELL && ids[1] == 'o', "hello -> hell o");
    free(ids);
    st = tok_encode(t, "x<|end|>[plain]", 15, &ids, &n, &e);
    CHECK(st == ALBEDO_OK && n == 3 && ids[0] == 'x' && ids[1] == ID_SPECIAL && ids[2] == ID_PLAIN_ADDED,
          "added tokens matched on encode (special and not)");
    free(ids);
    st = tok_encode(t, "", 0, &ids, &n, &e);
    CHECK(st == ALBEDO_OK && n == 0, "empty text gives no ids");
    free(ids);
    st = tok_encode(t, NULL, 0, &ids, &n, &e);
    CHECK(st == ALBEDO_OK && n == 0, "NULL text of length 0 gives no ids");
    free(ids);

    static const char *const bad_utf8[] = {"\xff", "a\xc3", "\xed\xa0\x80", "\xc0\xaf", "\xf4\x90\x80\x80", "ok\x80"};
    for (size_t i = 0; i < sizeof bad_utf8 / sizeof bad_utf8[0]; i++) {
        ids = (int32_t *)&n; /* must be reset */
        st = tok_encode(t, bad_utf8[i], strlen(bad_utf8[i]), &ids, &n, &e);
        CHECK(st == ALBEDO_ERR_INVALID_ARGUMENT && ids == NULL && n == 0, "invalid UTF-8 #%zu: status %d", i, st);
    }
    CHECK(tok_encode(NULL, "a", 1, &ids, &n, &e) == ALBEDO_ERR_INVALID_ARGUMENT, "NULL tokenizer");

    const uint8_t *bytes;
    size_t blen;
    CHECK(tok_token_bytes(t, 0x0A, &bytes, &blen) == 0 && blen == 1 && bytes[0] == '\n', "token 10 is the byte 0x0A");
    CHECK(tok_token_bytes(t, ID_SPECIAL, &bytes, &blen) == 0 && blen == 7 && memcmp(bytes, "<|end|>", 7) == 0,
          "added token bytes are its content");
    CHECK(tok_token_bytes(t, 9999, &bytes, &blen) == -1 && tok_token_bytes(t, -1, &bytes, &blen) == -1,
          "unknown ids have no bytes");

    /* Decoding bytes: invalid UTF-8 becomes one U+FFFD per maximal subpart,
     * as Rust's from_utf8_lossy (and Python's "replace") do. */
    static const struct {
        int32_t ids[5];
        int n;
        const char *want;
    } lossy[] = {
        {{0xE6, 0x97, 0xA5}, 3, "\xe6\x97\xa5"},
        {{0xE6, 0x97}, 2, "\xef\xbf\xbd"},
        {{0xE6, 0x97, 'A'},
         3,
         "\xef\xbf\xbd"
         "A"},
        {{0xF0, 0x80, 0x80}, 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
        {{0xE0, 0x80}, 2, "\xef\xbf\xbd\xef\xbf\xbd"},
        {{0xED, 0xA0, 0x80}, 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
        {{0xF4, 0x90}, 2, "\xef\xbf\xbd\xef\xbf\xbd"},
        {{0xC0, 0xAF}, 2, "\xef\xbf\xbd\xef\xbf\xbd"},
        {{0xF0, 0x9F, 0x99, 0x82, 0xFF}, 5, "\xf0\x9f\x99\x82\xef\xbf\xbd"},
        {{0xF0, 0x9F, 0x99, ID_SPECIAL}, 4, "\xef\xbf\xbd<|end|>"},
        {{0}, 1, "\0"},
    };
    for (size_t i = 0; i < sizeof lossy / sizeof lossy[0]; i++) {
        char *out = NULL;
        size_t olen = 0;
        size_t wlen = lossy[i].want[0] ? strlen(lossy[i].want) : 1;
        st = tok_decode(t, lossy[i].ids, lossy[i].n, 0, &out, &olen, &e);
        CHECK(st == ALBEDO_OK && same_bytes(out, olen, lossy[i].want, wlen), "lossy decode #%zu", i);
        free(out);
        int failed;
        out = stream_all(t, lossy[i].ids, lossy[i].n, 0, &olen, &failed);
        CHECK(!failed && same_bytes(out, olen, lossy[i].want, wlen), "lossy stream #%zu", i);
        free(out);
    }
    /* Skipping a special token joins the bytes around it. */
    char *out = NULL;
    size_t olen;
    st = tok_decode(t, (int32_t[]){0xF0, 0x9F, ID_SPECIAL, 0x99, 0x82}, 5, 1, &out, &olen, &e);
    CHECK(st == ALBEDO_OK && same_bytes(out, olen, "\xf0\x9f\x99\x82", 4), "skip joins bytes");
    free(out);

    /* Unknown ids: decode fails, stream push refuses. */
    int32_t unknown[3] = {'a', 12345, 'b'};
    out = (char *)&olen;
    st = tok_decode(t, unknown, 3, 1, &out, &olen, &e);
    CHECK(st == ALBEDO_ERR_INVALID_ARGUMENT && out == NULL && strstr(e.msg, "12345"), "decode of an unknown id: %d %s",
          st, e.msg);
    st = tok_decode(t, (int32_t[]){-1}, 1, 1, &out, &olen, &e);
    CHECK(st == ALBEDO_ERR_INVALID_ARGUMENT, "decode of id -1");
    tok_stream s;
    tok_stream_init(&s);
    size_t cap = 0;
    olen = 0;
    out = NULL;
    CHECK(tok_stream_push(t, &s, 12345, 1, &out, &olen, &cap) == -1, "stream push unknown id");
    free(out);

    /* Streaming equals decoding for random byte runs, specials mixed in. */
    uint32_t rng = 12345;
    int mismatches = 0, invalid = 0;
    for (int round = 0; round < 3000; round++) {
        int32_t seq[24];
        int len = 1 + (int)((rng = rng * 1103515245u + 12345u) >> 16) % 24;
        for (int i = 0; i < len; i++) {
            uint32_t r = (rng = rng * 1103515245u + 12345u) >> 16;
            static const int32_t pool[] = {0x41, 0xC3, 0xA9, 0xE6,       0x97,     0xA5,          0xF0, 0x9F,
                                           0x99, 0x82, 0xED, 0xA0,       0xE0,     0xF4,          0x90, 0xFF,
                                           0xC0, 0x80, 0xBF, ID_SPECIAL, ID_HELLO, ID_PLAIN_ADDED};
            seq[i] = pool[r % (sizeof pool / sizeof pool[0])];
        }
        for (int skip = 0; skip < 2; skip++) {
            char *d = NULL, *sd;
            size_t dlen = 0, slen;
            int failed;
            st = tok_decode(t, seq, len, skip, &d, &dlen, &e);
            sd = stream_all(t, seq, len, skip, &slen, &failed);
            if (st != ALBEDO_OK || failed || !same_bytes(d, dlen, sd ? sd : "", slen)) mismatches++;
            int32_t *re_ids = NULL;
            int re_n;
            if (tok_encode(t, d, dlen, &re_ids, &re_n, &e) != ALBEDO_OK) invalid++;
            free(re_ids);
            free(d);
            free(sd);
        }
    }
    CHECK(mismatches == 0, "stream and decode disagree on %d random sequences", mismatches);
    CHECK(invalid == 0, "decode produced invalid UTF-8 %d times", invalid);
    tok_free(t);
}

/* ------------------------------------------------------------------------ */
/* Bad input                                                                 */

typedef void (*mutate_fn)(json_t *root);

static void m_no_model(json_t *r) { json_object_del(r, "model"); }
static void m_model_type(json_t *r) {
    json_object_set_new(json_object_get(r, "model"), "type", json_string("WordPiece"));
}
static void m_vocab_array(json_t *r) { json_object_set_new(json_object_get(r, "model"), "vocab", json_array()); }
static void m_vocab_negative(json_t *r) {
    json_object_set_new(json_object_get(json_object_get(r, "model"), "vocab"), "zz", json_integer(-3));
}
static void m_vocab_string(json_t *r) {
    json_object_set_new(json_object_get(json_object_get(r, "model"), "vocab"), "zz", json_string("7"));
}
static void m_merge_unknown(json_t *r) {
    json_array_append_new(json_object_get(json_object_get(r, "model"), "merges"), json_string("q zzz"));
}
static void m_merge_result_unknown(json_t *r) {
    json_array_append_new(json_object_get(json_object_get(r, "model"), "merges"), json_string("q q"));
}
static void m_merge_bad_form(json_t *r) {
    json_array_append_new(json_object_get(json_object_get(r, "model"), "merges"), json_integer(4));
}
static void m_merge_three_parts(json_t *r) {
    json_array_append_new(json_object_get(json_object_get(r, "model"), "merges"), json_string("h e l"));
}
static void m_no_merges(json_t *r) { json_object_del(json_object_get(r, "model"), "merges"); }
static void m_pre_unknown(json_t *r) {
    json_object_set_new(r, "pre_tokenizer", json_pack("{s:s}", "type", "Whitespace"));
}
static void m_pre_seq_unknown(json_t *r) {
    json_object_set_new(r, "pre_tokenizer",
                        json_pack("{s:s, s:[{s:s, s:b}, {s:s}]}", "type", "Sequence", "pretokenizers", "type",
                                  "ByteLevel", "use_regex", 0, "type", "Metaspace"));
}
static void m_bad_regex(json_t *r) {
    json_object_set_new(r, "pre_tokenizer",
                        json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern", "Regex", "(unclosed",
                                  "behavior", "Isolated", "invert", 0));
}
static void m_bad_behavior(json_t *r) {
    json_object_set_new(r, "pre_tokenizer",
                        json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern", "String", "-", "behavior",
                                  "Sideways", "invert", 0));
}
static void m_bad_pattern(json_t *r) {
    json_object_set_new(
        r, "pre_tokenizer",
        json_pack("{s:s, s:{s:i}, s:s}", "type", "Split", "pattern", "Regex", 5, "behavior", "Isolated"));
}
static void m_bool_type(json_t *r) {
    json_object_set_new(json_object_get(r, "pre_tokenizer"), "add_prefix_space", json_string("yes"));
}
static void m_pre_not_object(json_t *r) { json_object_set_new(r, "pre_tokenizer", json_integer(1)); }
static void m_norm_unknown(json_t *r) {
    json_object_set_new(r, "normalizer", json_pack("{s:s}", "type", "BertNormalizer"));
}
static void m_norm_no_type(json_t *r) { json_object_set_new(r, "normalizer", json_object()); }
static void m_decoder_unknown(json_t *r) { json_object_set_new(r, "decoder", json_pack("{s:s}", "type", "WordPiece")); }
static void m_decoder_null(json_t *r) { json_object_set_new(r, "decoder", json_null()); }
static void m_prefix(json_t *r) {
    json_object_set_new(json_object_get(r, "model"), "continuing_subword_prefix", json_string("##"));
}
static void m_suffix(json_t *r) {
    json_object_set_new(json_object_get(r, "model"), "end_of_word_suffix", json_string("</w>"));
}
static void m_dropout(json_t *r) { json_object_set_new(json_object_get(r, "model"), "dropout", json_real(0.1)); }
static void m_truncation(json_t *r) { json_object_set_new(r, "truncation", json_pack("{s:i}", "max_length", 8)); }
static void m_version(json_t *r) { json_object_set_new(r, "version", json_string("2.0")); }
static void m_added_not_array(json_t *r) { json_object_set_new(r, "added_tokens", json_object()); }
static void m_added_no_content(json_t *r) {
    json_object_del(json_array_get(json_object_get(r, "added_tokens"), 0), "content");
}
static void m_added_bad_flag(json_t *r) {
    json_object_set_new(json_array_get(json_object_get(r, "added_tokens"), 1), "special", json_integer(1));
}
static void m_deep_sequence(json_t *r) {
    json_t *p = json_pack("{s:s}", "type", "NFC");
    for (int i = 0; i < 40; i++) p = json_pack("{s:s, s:[o]}", "type", "Sequence", "normalizers", p);
    json_object_set_new(r, "normalizer", p);
}
static void m_id_too_large(json_t *r) {
    json_object_set_new(json_object_get(json_object_get(r, "model"), "vocab"), "zz", json_integer(3000000000LL));
}

static void test_bad_input(void) {
    static const struct {
        const char *name;
        mutate_fn fn;
        const char *needle; /* the message must name the field */
    } bad[] = {
        {"missing model", m_no_model, "model"},
        {"model type", m_model_type, "model.type"},
        {"vocab not an object", m_vocab_array, "model.vocab"},
        {"vocab id negative", m_vocab_negative, "model.vocab"},
        {"vocab id a string", m_vocab_string, "model.vocab"},
        {"vocab id too large", m_id_too_large, "model.vocab"},
        {"merge of unknown token", m_merge_unknown, "model.merges["},
        {"merge result unknown", m_merge_result_unknown, "model.merges["},
        {"merge of wrong type", m_merge_bad_form, "model.merges["},
        {"merge with two spaces", m_merge_three_parts, "model.merges["},
        {"no merges", m_no_merges, "model.merges"},
        {"unknown pre-tokenizer", m_pre_unknown, "pre_tokenizer.type"},
        {"unknown pre-tokenizer in a sequence", m_pre_seq_unknown, "pre_tokenizer.pretokenizers[1].type"},
        {"invalid regex", m_bad_regex, "pre_tokenizer.pattern"},
        {"bad behavior", m_bad_behavior, "pre_tokenizer.behavior"},
        {"pattern not a string", m_bad_pattern, "pre_tokenizer.pattern"},
        {"boolean of wrong type", m_bool_type, "pre_tokenizer.add_prefix_space"},
        {"pre-tokenizer not an object", m_pre_not_object, "pre_tokenizer"},
        {"unknown normalizer", m_norm_unknown, "normalizer.type"},
        {"normalizer without type", m_norm_no_type, "normalizer.type"},
        {"unknown decoder", m_decoder_unknown, "decoder.type"},
        {"null decoder", m_decoder_null, "decoder"},
        {"subword prefix", m_prefix, "continuing_subword_prefix"},
        {"word suffix", m_suffix, "end_of_word_suffix"},
        {"dropout", m_dropout, "dropout"},
        {"truncation", m_truncation, "truncation"},
        {"version", m_version, "version"},
        {"added_tokens not an array", m_added_not_array, "added_tokens"},
        {"added token without content", m_added_no_content, "added_tokens[0].content"},
        {"added token flag of wrong type", m_added_bad_flag, "added_tokens[1].special"},
        {"sequence nested too deep", m_deep_sequence, "normalizer"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        json_t *j = tiny_json();
        bad[i].fn(j);
        errbuf e = {{0}};
        albedo_status st;
        tokenizer *t = tiny_with(j, &st, &e);
        CHECK(t == NULL && st == ALBEDO_ERR_TOKENIZER && strstr(e.msg, bad[i].needle),
              "%s: status %d, message \"%s\" should name \"%s\"", bad[i].name, st, e.msg, bad[i].needle);
        tok_free(t);
    }

    /* Not JSON at all, truncated, empty, or not an object. */
    json_t *j = tiny_json();
    char *full = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    size_t flen = strlen(full);
    const struct {
        const char *s;
        size_t n;
    } broken[] = {
        {full, flen / 2},       {full, flen - 1}, {"hello", 5}, {"", 0}, {"[1,2]", 5}, {"{\"model\": \"BPE\"}", 16},
        {"\x1f\x8b\x08\x00", 4}};
    for (size_t i = 0; i < sizeof broken / sizeof broken[0]; i++) {
        errbuf e = {{0}};
        tokenizer *t = (tokenizer *)&e; /* must be reset */
        albedo_status st = tok_load_json(broken[i].s, broken[i].n, &t, &e);
        CHECK(st == ALBEDO_ERR_TOKENIZER && t == NULL && e.msg[0], "broken JSON #%zu: %d", i, st);
    }
    /* Every prefix of a valid file fails cleanly (and leaks nothing). */
    int prefix_ok = 0;
    for (size_t cut = 0; cut < flen; cut += 97) {
        errbuf e = {{0}};
        tokenizer *t = NULL;
        if (tok_load_json(full, cut, &t, &e) == ALBEDO_ERR_TOKENIZER && !t) prefix_ok++;
        tok_free(t);
    }
    CHECK(prefix_ok == (int)((flen + 96) / 97), "truncated files: %d rejected", prefix_ok);
    free(full);

    errbuf e = {{0}};
    tokenizer *t = NULL;
    CHECK(tok_load_file("/nonexistent/tokenizer.json", &t, &e) == ALBEDO_ERR_IO && !t, "missing file is an I/O error");
    char gz[4096];
    snprintf(gz, sizeof gz, "%s/tests/data/tokenizer/gpt2.tokenizer.json.gz", test_source_dir());
    albedo_status st = tok_load_file(gz, &t, &e);
    CHECK(st == ALBEDO_ERR_TOKENIZER && !t && strstr(e.msg, "gpt2.tokenizer.json.gz"), "binary file: %d %s", st, e.msg);
    CHECK(tok_load_json("{}", 2, NULL, &e) == ALBEDO_ERR_INVALID_ARGUMENT, "NULL out");
    tok_free(NULL);
    CHECK(tok_vocab_size(NULL) == 0 && tok_id(NULL, "a") == -1 && !tok_is_special(NULL, 0), "lookups on NULL");
}

/* ------------------------------------------------------------------------ */
/* Speed: a 100 KB text must encode in well under a second; a quadratic
 * merge loop or regex scan would take minutes. */

static void test_speed(const char *data_dir) {
    size_t len;
    uint8_t *gz = gunzip_file(path_join(data_dir, "gpt2.tokenizer.json.gz"), &len);
    if (!gz) return;
    tokenizer *t = NULL;
    errbuf e = {{0}};
    albedo_status st = tok_load_json((const char *)gz, len, &t, &e);
    free(gz);
    CHECK(st == ALBEDO_OK, "gpt2 load: %s", e.msg);
    if (st) return;
    static const char piece[] =
        "The quick brown fox, 1234 times: \"na\xc3\xafve caf\xc3\xa9\" \xe6\x97\xa5\xe6\x9c\xac "
        "\xf0\x9f\x99\x82   spaces\n\n";
    size_t n = 0, cap = 100000;
    char *text = malloc(cap + sizeof piece);
    while (n < cap) {
        memcpy(text + n, piece, sizeof piece - 1);
        n += sizeof piece - 1;
    }
    const struct {
        const char *what;
        const char *s;
        size_t n;
    } inputs[] = {{"mixed text", text, n}, {"4000 characters", text, 4000}};
    for (int i = 0; i < 2; i++) {
        int32_t *ids = NULL;
        int nids = 0;
        double t0 = now_ms();
        st = tok_encode(t, inputs[i].s, inputs[i].n, &ids, &nids, &e);
        double ms = now_ms() - t0;
        CHECK(st == ALBEDO_OK && nids > 0 && ms < (i == 0 ? 2000.0 : 200.0), "encode %s: %.1f ms", inputs[i].what, ms);
        free(ids);
    }
    memset(text, 'a', n); /* one 100 KB word: the heap-ordered merge keeps it n log n */
    int32_t *ids = NULL;
    int nids = 0;
    double t0 = now_ms();
    st = tok_encode(t, text, n, &ids, &nids, &e);
    double ms = now_ms() - t0;
    CHECK(st == ALBEDO_OK && nids > 0 && ms < 2000.0, "encode one long word: %.1f ms", ms);
    free(ids);
    free(text);
    tok_free(t);
}

int main(void) {
    const char *shared = test_shared_dir();
    char data_dir[4096];
    snprintf(data_dir, sizeof data_dir, "%s/tests/data/tokenizer", test_source_dir());
    test_tiny();
    test_bad_input();
    test_fixture_copies(data_dir, shared);
    if (shared) test_shared_fixtures(shared);
    test_synthetic(data_dir);
    test_speed(data_dir);
    TEST_MAIN_END();
}
