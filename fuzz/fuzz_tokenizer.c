/*
 * fuzz_tokenizer.c — tokenizer.json loading, encoding, decoding and
 * streaming.
 *
 * Input layout: <tokenizer.json part> NUL <text part>. Without a NUL byte the
 * whole input is both parts, so a seed that is only a tokenizer.json or only
 * text still exercises both sides.
 *
 *  1. tok_load_json on the JSON part (at most MAX_JSON bytes); a tokenizer it
 *     accepts then encodes the text part and decodes/streams ids, like a
 *     fixed one (a hostile tokenizer.json with odd regexes, merges or added
 *     tokens meets the encoder).
 *  2. One of the fixture tokenizers (gpt2, split-nfc-special,
 *     bytelevel-noregex from ../shared/fixtures, loaded once by
 *     LLVMFuzzerInitialize; the gzipped gpt2 copy in tests/data when shared/
 *     is absent) encodes the text part and decodes the text part read as a
 *     list of 16-bit ids.
 *
 * Checked: statuses are the documented ones; every id encode returns is in
 * the vocabulary; decode(encode(s)) == s for the byte-level tokenizers
 * without a normalizer; streaming pushes then finish give exactly
 * tok_decode's text, with and without special tokens; decode refuses an
 * unknown id.
 */
#define _POSIX_C_SOURCE 200809L
#include <string.h>

#include "fuzz.h"
#include "tokenizer.h"

#ifdef ALBEDO_FUZZ_HAVE_ZLIB
#include <zlib.h>
#endif

#define MAX_JSON (32 << 10)

typedef struct fixed_tok {
    const char *name;
    int roundtrip; /* no normalizer: decode(encode(s)) == s */
    tokenizer *t;
} fixed_tok;

static fixed_tok fixed[] = {{"gpt2", 1, NULL}, {"bytelevel-noregex", 1, NULL}, {"split-nfc-special", 0, NULL}};
#define N_FIXED (int)(sizeof fixed / sizeof fixed[0])
static fixed_tok *loaded[N_FIXED];
static int n_loaded;

#ifdef ALBEDO_FUZZ_HAVE_ZLIB
/* tests/data keeps gpt2's tokenizer.json gzipped. */
static tokenizer *load_gz(const char *path) {
    gzFile gz = gzopen(path, "rb");
    if (!gz) return NULL;
    size_t cap = 4 << 20, n = 0;
    char *buf = malloc(cap);
    int r;
    while (buf && (r = gzread(gz, buf + n, (unsigned)(cap - n))) > 0) {
        n += (size_t)r;
        if (n == cap) {
            char *b2 = realloc(buf, cap *= 2);
            if (!b2) free(buf);
            buf = b2;
        }
    }
    gzclose(gz);
    tokenizer *t = NULL;
    errbuf e = {{0}};
    if (buf && tok_load_json(buf, n, &t, &e) != ALBEDO_OK) fprintf(stderr, "fuzz_tokenizer: %s: %s\n", path, e.msg);
    free(buf);
    return t;
}
#endif

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *shared = getenv("ALBEDO_SHARED");
    char path[4096];
    for (int i = 0; i < N_FIXED; i++) {
        errbuf e = {{0}};
        if (shared)
            snprintf(path, sizeof path, "%s/fixtures/tokenizers/%s/tokenizer.json", shared, fixed[i].name);
        else
            snprintf(path, sizeof path, "%s/../shared/fixtures/tokenizers/%s/tokenizer.json", ALBEDO_SOURCE_DIR,
                     fixed[i].name);
        if (tok_load_file(path, &fixed[i].t, &e) != ALBEDO_OK) {
            fixed[i].t = NULL;
#ifdef ALBEDO_FUZZ_HAVE_ZLIB
            if (!strcmp(fixed[i].name, "gpt2"))
                fixed[i].t = load_gz(ALBEDO_SOURCE_DIR "/tests/data/tokenizer/gpt2.tokenizer.json.gz");
#endif
        }
        if (fixed[i].t) loaded[n_loaded++] = &fixed[i];
    }
    if (!n_loaded) {
        fprintf(stderr, "fuzz_tokenizer: no fixture tokenizer found (set ALBEDO_SHARED to shared/)\n");
        abort();
    }
    return 0;
}

static int valid_id(const tokenizer *t, int32_t id) {
    const uint8_t *b;
    size_t n;
    return tok_token_bytes(t, id, &b, &n) == 0;
}

/* Streams ids and checks the result against tok_decode; all ids valid. */
static void check_stream(const tokenizer *t, const int32_t *ids, int n, int skip) {
    char *want = NULL, *got = NULL;
    size_t want_len = 0, got_len = 0, got_cap = 0;
    errbuf e = {{0}};
    albedo_status st = tok_decode(t, ids, n, skip, &want, &want_len, &e);
    if (st == ALBEDO_ERR_OUT_OF_MEMORY) return;
    FUZZ_CHECK(st == ALBEDO_OK, "tok_decode of valid ids: %d (%s)", (int)st, e.msg);
    /* Token bytes may be NUL (byte-level "\xc4\x80" is byte 0): the text may
     * hold NULs, so only the terminator and the length are checked. */
    FUZZ_CHECK(want[want_len] == 0 && strlen(want) <= want_len, "decoded text is not NUL-terminated");
    tok_stream s;
    tok_stream_init(&s);
    for (int i = 0; i < n; i++) {
        FUZZ_CHECK(tok_stream_push(t, &s, ids[i], skip, &got, &got_len, &got_cap) == 0,
                   "stream push of valid id %d failed", (int)ids[i]);
        FUZZ_CHECK(s.n_pending >= 0 && s.n_pending <= 3, "stream holds %d bytes", s.n_pending);
    }
    FUZZ_CHECK(tok_stream_finish(&s, &got, &got_len, &got_cap) == 0, "stream finish failed");
    FUZZ_CHECK(got_len == want_len && (want_len == 0 || memcmp(got, want, want_len) == 0),
               "stream (%zu bytes) differs from decode (%zu bytes), skip_special=%d", got_len, want_len, skip);
    free(want);
    free(got);
}

/* Encode text, check and decode the ids. */
static void exercise_text(const tokenizer *t, const char *text, size_t len, int roundtrip) {
    int32_t *ids = NULL;
    int n = 0;
    errbuf e = {{0}};
    albedo_status st = tok_encode(t, text, len, &ids, &n, &e);
    if (st != ALBEDO_OK) {
        FUZZ_CHECK(st == ALBEDO_ERR_INVALID_ARGUMENT || st == ALBEDO_ERR_LIMIT || st == ALBEDO_ERR_OUT_OF_MEMORY ||
                       st == ALBEDO_ERR_TOKENIZER,
                   "tok_encode status %d (%s)", (int)st, e.msg);
        FUZZ_CHECK(ids == NULL && n == 0, "failed encode left output");
        return;
    }
    /* No bound on n from len: NFKD alone turns 3 bytes (U+FDFA) into 33. */
    FUZZ_CHECK(ids != NULL && n >= 0, "encode gave %d ids for %zu bytes", n, len);
    for (int i = 0; i < n; i++)
        FUZZ_CHECK(valid_id(t, ids[i]), "encode produced id %d, not in the vocabulary", (int)ids[i]);
    if (roundtrip) {
        char *s = NULL;
        size_t sl = 0;
        if (tok_decode(t, ids, n, 0, &s, &sl, &e) == ALBEDO_OK) {
            FUZZ_CHECK(sl == len && memcmp(s, text, len) == 0, "decode(encode(text)) != text (%zu vs %zu bytes)", sl,
                       len);
            free(s);
        }
    }
    check_stream(t, ids, n, 0);
    check_stream(t, ids, n, 1);
    free(ids);
}

/* Decode bytes read as 16-bit ids (0xffff: -1, 0xfffe: INT32_MAX). */
static void exercise_ids(const tokenizer *t, const uint8_t *b, size_t len) {
    int n = (int)(len / 2), n_valid = 0, any_bad = 0;
    int32_t *ids = calloc((size_t)n + 1, sizeof *ids), *good = calloc((size_t)n + 1, sizeof *good);
    if (!ids || !good) {
        free(ids);
        free(good);
        return;
    }
    for (int i = 0; i < n; i++) {
        uint32_t v = (uint32_t)b[2 * i] | (uint32_t)b[2 * i + 1] << 8;
        ids[i] = v == 0xffff ? -1 : v == 0xfffe ? INT32_MAX : (int32_t)v;
        if (valid_id(t, ids[i]))
            good[n_valid++] = ids[i];
        else
            any_bad = 1;
        (void)tok_is_special(t, ids[i]);
    }
    char *s = NULL;
    size_t sl = 0;
    errbuf e = {{0}};
    albedo_status st = tok_decode(t, ids, n, (int)(len & 1), &s, &sl, &e);
    if (any_bad)
        FUZZ_CHECK(st == ALBEDO_ERR_INVALID_ARGUMENT && s == NULL, "decode accepted an unknown id (%d)", (int)st);
    else
        FUZZ_CHECK(st == ALBEDO_OK || st == ALBEDO_ERR_OUT_OF_MEMORY, "decode status %d (%s)", (int)st, e.msg);
    free(s);
    check_stream(t, good, n_valid, 0);
    check_stream(t, good, n_valid, 1);
    free(ids);
    free(good);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nul = memchr(data, 0, size);
    const uint8_t *json = data, *text = data;
    size_t json_len = size, text_len = size;
    if (nul) {
        json_len = (size_t)(nul - data);
        text = nul + 1;
        text_len = size - json_len - 1;
    }

    if (json_len <= MAX_JSON) {
        tokenizer *t = NULL;
        errbuf e = {{0}};
        albedo_status st = tok_load_json((const char *)json, json_len, &t, &e);
        if (st == ALBEDO_OK) {
            FUZZ_CHECK(t != NULL && tok_vocab_size(t) >= 0, "loaded tokenizer");
            exercise_text(t, (const char *)text, text_len, 0);
            exercise_ids(t, text, text_len);
            tok_free(t);
        } else {
            FUZZ_CHECK(st == ALBEDO_ERR_TOKENIZER || st == ALBEDO_ERR_OUT_OF_MEMORY || st == ALBEDO_ERR_LIMIT ||
                           st == ALBEDO_ERR_UNSUPPORTED,
                       "tok_load_json status %d (%s)", (int)st, e.msg);
            FUZZ_CHECK(t == NULL && e.msg[0], "failed load: handle %p, message \"%s\"", (void *)t, e.msg);
        }
    }

    const fixed_tok *f = loaded[size % (size_t)n_loaded];
    exercise_text(f->t, (const char *)text, text_len, f->roundtrip);
    exercise_ids(f->t, text, text_len);

    /* tok_id on a short NUL-terminated prefix of the text. */
    char key[48];
    size_t kl = text_len < sizeof key - 1 ? text_len : sizeof key - 1;
    memcpy(key, text, kl);
    key[kl] = 0;
    int id = tok_id(f->t, key);
    FUZZ_CHECK(id == -1 || valid_id(f->t, id), "tok_id gave %d", id);
    return 0;
}
