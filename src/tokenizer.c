/*
 * tokenizer.c — Hugging Face tokenizer.json for byte-level BPE tokenizers
 * (GPT-2, moondream/starmie-v1): loading, encoding and decoding.
 *
 * It reproduces what the `tokenizers` library (0.23, Rust) returns for
 * encode(text).ids and decode(ids, skip_special_tokens) for the parts of the
 * format listed in tokenizer.h. It is not a general port of that library:
 * other models, normalizers, pre-tokenizers and decoders, truncation and
 * padding are refused at load with a message naming the field.
 *
 *   encode:  text ─► added tokens matched on the raw text (normalized=false)
 *                 ─► normalizer on each remaining piece
 *                 ─► added tokens matched on the normalized piece (normalized=true)
 *                 ─► pre-tokenizer steps (Split / ByteLevel) ─► words
 *                 ─► BPE merges per word ─► ids
 *   decode:  ids ─► each token's bytes (ByteLevel decoder) ─► concatenated
 *                 ─► UTF-8 with U+FFFD per maximal invalid subpart
 *
 * Where the library's behaviour is subtle this file follows its source
 * (tokenizers/src/tokenizer/added_vocabulary.rs, normalizer.rs,
 * pre_tokenizers/{byte_level,split}.rs, models/bpe/{model,word}.rs):
 *  - Added tokens get their ids as the library assigns them: the id of the
 *    same string in the model vocabulary, else the next free id after the
 *    vocabulary's size. For consistent files this is the "id" in the file.
 *  - Regexes in tokenizer.json are Oniguruma (Ruby syntax) patterns. They are
 *    run with PCRE2 after a small translation (regex_translate): \s, \w and \h
 *    get Oniguruma's Unicode meanings, ^/$ match at line breaks, and the inline
 *    option m means "dot matches newline". Other dialect differences (nested
 *    character classes, && intersections, \S/\W/\H inside a class) are not
 *    translated.
 *  - The post-processor is ignored: encode never adds BOS/EOS, which is what
 *    ByteLevel post-processing does and what Moondream's prompts need.
 *  - The BPE word cache and dropout of the library do not change results and
 *    are left out (dropout other than null/0 is refused).
 *
 * A loaded tokenizer is immutable: encode/decode allocate their own scratch,
 * so one tokenizer may be used from several threads at once.
 */
#define PCRE2_CODE_UNIT_WIDTH 8

#include "tokenizer.h"

#include <jansson.h>
#include <limits.h>
#include <pcre2.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#define TOK_MAX_FILE ((size_t)256 << 20) /* tokenizer.json larger than this is refused */
#define TOK_MAX_ID (1 << 23)             /* the id table is dense: bound it */
#define TOK_MAX_STEPS 32                 /* normalizer / pre-tokenizer steps after flattening */
#define TOK_MAX_DEPTH 8                  /* nesting of Sequence objects */

#define ERR_TOK ALBEDO_ERR_TOKENIZER

/* The GPT-2 pre-tokenizer regex, used by ByteLevel when use_regex is true. */
static const char gpt2_regex[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* ------------------------------------------------------------------------ */
/* Growable buffers                                                          */

typedef struct bytebuf {
    uint8_t *p;
    size_t n, cap;
} bytebuf;

/* Makes room for extra more bytes plus a terminating NUL, so that every
 * buffer is also a C string for whoever wants one. */
static bool bb_reserve(bytebuf *b, size_t extra) {
    if (extra > SIZE_MAX / 2 - b->n) return false;
    size_t need = b->n + extra + 1;
    if (need <= b->cap) return true;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) return false;
    b->p = p;
    b->cap = cap;
    return true;
}

static bool bb_put(bytebuf *b, const void *s, size_t n) {
    if (!bb_reserve(b, n)) return false;
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return true;
}

typedef struct seg {
    size_t a, b; /* byte range [a, b) */
    bool flag;   /* "is a match" from the pattern, then "remove" after a behaviour */
} seg;

typedef struct segvec {
    seg *v;
    size_t n, cap;
} segvec;

static bool seg_push(segvec *s, size_t a, size_t b, bool flag) {
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 32;
        seg *v = realloc(s->v, cap * sizeof *v);
        if (!v) return false;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = (seg){a, b, flag};
    return true;
}

static albedo_status oom(errbuf *e) { return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "tokenizer: out of memory"); }

/* ------------------------------------------------------------------------ */
/* UTF-8                                                                     */

/* Classifies the bytes s[0..n), n >= 1, following the Unicode practice of
 * "substitution of maximal subparts" that Rust's String::from_utf8_lossy
 * implements. Returns k > 0 for a well-formed sequence of k bytes; -k for an
 * ill-formed maximal subpart of k bytes (it becomes one U+FFFD); 0 when
 * s[0..n) is a proper prefix of a well-formed sequence, which more bytes
 * could still complete. */
static int utf8_classify(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    int need;
    uint8_t lo = 0x80, hi = 0xBF; /* allowed range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) {
        need = 1;
    } else if (c == 0xE0) {
        need = 2, lo = 0xA0; /* no overlong forms */
    } else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) {
        need = 2;
    } else if (c == 0xED) {
        need = 2, hi = 0x9F; /* no surrogates */
    } else if (c == 0xF0) {
        need = 3, lo = 0x90;
    } else if (c >= 0xF1 && c <= 0xF3) {
        need = 3;
    } else if (c == 0xF4) {
        need = 3, hi = 0x8F; /* nothing above U+10FFFF */
    } else {
        return -1; /* 80..C1, F5..FF never start a sequence */
    }
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n) return 0;
        uint8_t x = s[k];
        if (k == 1 ? (x < lo || x > hi) : (x < 0x80 || x > 0xBF)) return -k;
    }
    return need + 1;
}

/* The code point of a well-formed sequence of k bytes. */
static uint32_t utf8_cp(const uint8_t *s, int k) {
    switch (k) {
    case 1: return s[0];
    case 2: return ((uint32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
    case 3: return ((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    default:
        return ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) | ((uint32_t)(s[2] & 0x3F) << 6) |
               (s[3] & 0x3F);
    }
}

/* Length in bytes of the (well-formed) character starting at s[0]. */
static int utf8_len(uint8_t c) { return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4; }

static int utf8_put(uint32_t cp, uint8_t *o) {
    if (cp < 0x80) {
        o[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (uint8_t)(0xC0 | (cp >> 6));
        o[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (uint8_t)(0xE0 | (cp >> 12));
        o[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | (cp >> 18));
    o[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* Returns true when s[0..n) is well-formed UTF-8; else *bad is the offset of
 * the first byte that is not. */
static bool utf8_valid(const uint8_t *s, size_t n, size_t *bad) {
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        int k = utf8_classify(s + i, n - i);
        if (k <= 0) {
            *bad = i;
            return false;
        }
        i += (size_t)k;
    }
    return true;
}

static const uint8_t replacement_char[3] = {0xEF, 0xBF, 0xBD}; /* U+FFFD */

/* Appends s[0..n) to out as valid UTF-8, each maximal invalid subpart
 * replaced by U+FFFD. With hold_tail, a trailing proper prefix of a
 * well-formed sequence is not consumed (a later call may complete it); the
 * number of bytes consumed is returned through *used. */
static bool utf8_lossy(bytebuf *out, const uint8_t *s, size_t n, bool hold_tail, size_t *used) {
    size_t i = 0, run = 0;           /* s[run..i) is valid and not yet copied */
    if (!s) s = (const uint8_t *)""; /* an empty buffer never allocated */
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        int k = utf8_classify(s + i, n - i);
        if (k > 0) {
            i += (size_t)k;
            continue;
        }
        if (!bb_put(out, s + run, i - run)) return false;
        if (k == 0 && hold_tail) {
            run = i;
            break;
        }
        if (!bb_put(out, replacement_char, 3)) return false;
        i += k == 0 ? n - i : (size_t)-k;
        run = i;
    }
    if (i == n && !bb_put(out, s + run, n - run)) return false;
    *used = i == n ? n : run;
    return true;
}

/* Unicode White_Space, which is what Rust's char::is_whitespace, Rust
 * regex's \s and Oniguruma's Unicode \s all mean. */
static bool is_white_space(uint32_t c) {
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Rust regex's Unicode \w: Alphabetic, marks, decimal digits, connector
 * punctuation and join controls. Alphabetic is approximated by letters,
 * letter numbers and the circled/squared Latin letters (Other_Alphabetic
 * symbols); the remaining Other_Alphabetic code points are marks anyway. */
static bool is_word_char(uint32_t c) {
    if (c == '_' || c == 0x200C || c == 0x200D) return true;
    if ((c >= 0x24B6 && c <= 0x24E9) || (c >= 0x1F130 && c <= 0x1F149) || (c >= 0x1F150 && c <= 0x1F169) ||
        (c >= 0x1F170 && c <= 0x1F189))
        return true;
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_PC: return true;
    default: return false;
    }
}

/* The last character of the valid UTF-8 text s[0..end), end > 0. */
static uint32_t utf8_last(const uint8_t *s, size_t end, size_t *start) {
    size_t i = end - 1;
    while (i > 0 && (s[i] & 0xC0) == 0x80) i--;
    *start = i;
    return utf8_cp(s + i, (int)(end - i));
}

/* ------------------------------------------------------------------------ */
/* Hash tables                                                               */

/* String -> id map. Keys live in the tokenizer's arena (as offsets, since
 * the arena may move while it grows); open addressing, linear probing. */
typedef struct strmap_entry {
    uint32_t off, len;
    int32_t id;
    uint32_t flags; /* added tokens: 1 = the content is in the special set */
} strmap_entry;

typedef struct strmap {
    strmap_entry *ent;
    uint32_t n, cap;
    uint32_t *slot; /* entry index + 1; 0 is empty */
    uint32_t mask;
} strmap;

#define STRMAP_IN_SPECIAL_SET 1u

static uint32_t hash_bytes(const uint8_t *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325u; /* FNV-1a, folded to 32 bits */
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3u;
    return (uint32_t)(h ^ (h >> 32));
}

static strmap_entry *strmap_find(const strmap *m, const uint8_t *arena, const uint8_t *s, size_t n) {
    if (!m->slot) return NULL;
    for (uint32_t i = hash_bytes(s, n) & m->mask;; i = (i + 1) & m->mask) {
        uint32_t k = m->slot[i];
        if (!k) return NULL;
        strmap_entry *x = &m->ent[k - 1];
        if (x->len == n && memcmp(arena + x->off, s, n) == 0) return x;
    }
}

static int32_t strmap_get(const strmap *m, const uint8_t *arena, const uint8_t *s, size_t n) {
    const strmap_entry *x = strmap_find(m, arena, s, n);
    return x ? x->id : -1;
}

static bool strmap_rehash(strmap *m, const uint8_t *arena, uint32_t nslots) {
    uint32_t *slot = calloc(nslots, sizeof *slot);
    if (!slot) return false;
    free(m->slot);
    m->slot = slot;
    m->mask = nslots - 1;
    for (uint32_t k = 0; k < m->n; k++) {
        const strmap_entry *x = &m->ent[k];
        uint32_t i = hash_bytes(arena + x->off, x->len) & m->mask;
        while (slot[i]) i = (i + 1) & m->mask;
        slot[i] = k + 1;
    }
    return true;
}

/* Maps the arena string [off, off+len) to id, replacing an existing id. */
static strmap_entry *strmap_put(strmap *m, const uint8_t *arena, uint32_t off, uint32_t len, int32_t id) {
    strmap_entry *x = strmap_find(m, arena, arena + off, len);
    if (x) {
        x->id = id;
        return x;
    }
    if (m->n == m->cap) {
        uint32_t cap = m->cap ? m->cap * 2 : 64;
        strmap_entry *ent = realloc(m->ent, (size_t)cap * sizeof *ent);
        if (!ent) return NULL;
        m->ent = ent;
        m->cap = cap;
    }
    m->ent[m->n++] = (strmap_entry){off, len, id, 0};
    uint32_t nslots = m->slot ? m->mask + 1 : 0;
    if ((uint64_t)m->n * 2 > nslots) {
        if (!strmap_rehash(m, arena, nslots ? nslots * 2 : 128)) {
            m->n--;
            return NULL;
        }
    } else {
        uint32_t i = hash_bytes(arena + off, len) & m->mask;
        while (m->slot[i]) i = (i + 1) & m->mask;
        m->slot[i] = m->n;
    }
    return &m->ent[m->n - 1];
}

static void strmap_free(strmap *m) {
    free(m->ent);
    free(m->slot);
}

/* (left id, right id) -> (rank, merged id), sized once from the merge count. */
typedef struct merge_entry {
    uint32_t a, b, rank;
    int32_t new_id; /* -1: empty slot */
} merge_entry;

typedef struct mergemap {
    merge_entry *ent;
    uint32_t mask;
} mergemap;

static uint32_t hash_pair(uint32_t a, uint32_t b) {
    uint64_t k = ((uint64_t)a << 32) | b; /* splitmix64 finaliser */
    k ^= k >> 30;
    k *= 0xbf58476d1ce4e5b9u;
    k ^= k >> 27;
    k *= 0x94d049bb133111ebu;
    k ^= k >> 31;
    return (uint32_t)k;
}

static bool mergemap_init(mergemap *m, size_t n) {
    size_t cap = 64;
    while (cap < n * 2) cap *= 2;
    m->ent = malloc(cap * sizeof *m->ent);
    if (!m->ent) return false;
    for (size_t i = 0; i < cap; i++) m->ent[i].new_id = -1;
    m->mask = (uint32_t)(cap - 1);
    return true;
}

static const merge_entry *mergemap_get(const mergemap *m, int32_t a, int32_t b) {
    if (!m->ent) return NULL;
    for (uint32_t i = hash_pair((uint32_t)a, (uint32_t)b) & m->mask;; i = (i + 1) & m->mask) {
        const merge_entry *x = &m->ent[i];
        if (x->new_id < 0) return NULL;
        if (x->a == (uint32_t)a && x->b == (uint32_t)b) return x;
    }
}

/* A repeated pair keeps the later rank, as the library's HashMap collect does. */
static void mergemap_put(mergemap *m, int32_t a, int32_t b, uint32_t rank, int32_t new_id) {
    uint32_t i = hash_pair((uint32_t)a, (uint32_t)b) & m->mask;
    while (m->ent[i].new_id >= 0 && !(m->ent[i].a == (uint32_t)a && m->ent[i].b == (uint32_t)b)) i = (i + 1) & m->mask;
    m->ent[i] = (merge_entry){(uint32_t)a, (uint32_t)b, rank, new_id};
}

/* ------------------------------------------------------------------------ */
/* The tokenizer                                                             */

enum norm_kind { NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD, NORM_LOWERCASE };
enum pre_kind { PRE_BYTELEVEL, PRE_SPLIT };
enum split_behavior {
    SPLIT_REMOVED,
    SPLIT_ISOLATED,
    SPLIT_MERGED_WITH_PREVIOUS,
    SPLIT_MERGED_WITH_NEXT,
    SPLIT_CONTIGUOUS
};

typedef struct pre_step {
    enum pre_kind kind;
    bool add_prefix_space; /* ByteLevel */
    pcre2_code *re;        /* Split; ByteLevel with use_regex; else NULL */
    enum split_behavior behavior;
    bool invert;
} pre_step;

typedef struct added_token {
    uint32_t match_off, match_len; /* what is matched: the content, or its normalized
                                      form when normalized=true and there is a normalizer */
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} added_token;

/* Leftmost-longest literal matching of added tokens: the candidates are
 * bucketed by first byte, longest first within a bucket. */
typedef struct match_set {
    int32_t *order; /* indices into added[] */
    uint32_t start[257];
    int n;
} match_set;

typedef struct tok_entry {
    uint32_t str_off, str_len; /* the token string (what the decoder sees) */
    uint32_t dec_off, dec_len; /* its bytes after the ByteLevel decoder */
    bool present, special;
} tok_entry;

struct tokenizer {
    bytebuf arena; /* every string the tables refer to */
    strmap vocab;  /* model vocabulary */
    mergemap merges;
    tok_entry *ent; /* indexed by id */
    int32_t n_ent;  /* largest id + 1 */

    strmap added_map; /* added-token content -> id */
    added_token *added;
    int n_added, cap_added;
    match_set raw_set, norm_set;

    enum norm_kind norm[TOK_MAX_STEPS];
    int n_norm;
    pre_step pre[TOK_MAX_STEPS];
    int n_pre;

    bool ignore_merges, byte_fallback, fuse_unk, has_unk;
    int32_t unk_id; /* -1 when unk_token is not in the vocabulary */
    char unk_name[64];
    int32_t fallback_id[256]; /* "<0xXX>" ids for byte_fallback, or -1 */

    /* GPT-2's bytes_to_unicode: each byte's stand-in character, and back. */
    uint8_t byte_utf8[256][2];
    uint8_t byte_utf8_len[256];
    int16_t char_byte[512];
};

/* Copies s into the arena and returns its offset through *off. */
static bool arena_add(tokenizer *t, const void *s, size_t n, uint32_t *off) {
    if (t->arena.n + n > UINT32_MAX - 1) return false;
    *off = (uint32_t)t->arena.n;
    return bb_put(&t->arena, s, n);
}

/* GPT-2's bytes_to_unicode: printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ')
 * stand for themselves; the others, in increasing order, get U+0100 on. */
static void byte_level_init(tokenizer *t) {
    uint32_t next = 256;
    for (int c = 0; c < 512; c++) t->char_byte[c] = -1;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        uint32_t cp = printable ? (uint32_t)b : next++;
        t->byte_utf8_len[b] = (uint8_t)utf8_put(cp, t->byte_utf8[b]);
        t->char_byte[cp] = (int16_t)b;
    }
}

void tok_free(tokenizer *t) {
    if (!t) return;
    free(t->arena.p);
    strmap_free(&t->vocab);
    strmap_free(&t->added_map);
    free(t->merges.ent);
    free(t->ent);
    free(t->added);
    free(t->raw_set.order);
    free(t->norm_set.order);
    for (int i = 0; i < t->n_pre; i++) pcre2_code_free(t->pre[i].re);
    free(t);
}

/* ------------------------------------------------------------------------ */
/* Regexes                                                                   */

/* Oniguruma's Unicode classes written out for PCRE2 (PCRE2's \s, for one,
 * also takes U+180E, which Oniguruma does not). */
#define WS_CLASS                                                                                  \
    "\\t\\n\\x0b\\f\\r\\x20\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}" \
    "\\x{205f}\\x{3000}"
#define WORD_CLASS "\\p{L}\\p{M}\\p{N}\\p{Pc}"
#define HEX_CLASS "0-9a-fA-F"

/* Translates an Oniguruma (Ruby syntax) pattern into PCRE2 syntax; see the
 * top of the file for what is and is not translated. */
static bool regex_translate(const char *p, size_t n, bytebuf *out) {
    int depth = 0; /* inside a character class */
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == '\\' && i + 1 < n) {
            char x = p[++i];
            const char *cls = NULL;
            bool neg = false;
            if (x == 's' || x == 'S') cls = WS_CLASS, neg = x == 'S';
            if (x == 'w' || x == 'W') cls = WORD_CLASS, neg = x == 'W';
            if (x == 'h' || x == 'H') cls = HEX_CLASS, neg = x == 'H';
            if (x == 'Q') { /* quoted literal text up to \E: copy as is */
                size_t j = i + 1;
                while (j + 1 < n && !(p[j] == '\\' && p[j + 1] == 'E')) j++;
                j = j + 1 < n ? j + 2 : n;
                if (!bb_put(out, p + i - 1, j - (i - 1))) return false;
                i = j - 1;
                continue;
            }
            bool ok;
            if (cls && depth == 0) {
                ok = bb_put(out, neg ? "[^" : "[", neg ? 2 : 1) && bb_put(out, cls, strlen(cls)) && bb_put(out, "]", 1);
            } else if (cls && !neg) {
                ok = bb_put(out, cls, strlen(cls));
            } else {
                ok = bb_put(out, p + i - 1, 2);
            }
            if (!ok) return false;
            continue;
        }
        if (depth == 0 && ch == '(' && i + 2 < n && p[i + 1] == '?') {
            /* An option group such as (?m) or (?i-m:...): Ruby's m is PCRE2's s. */
            size_t j = i + 2;
            while (j < n && (p[j] == 'i' || p[j] == 'm' || p[j] == 'x' || p[j] == '-')) j++;
            if (j > i + 2 && j < n && (p[j] == ')' || p[j] == ':')) {
                if (!bb_put(out, "(?", 2)) return false;
                for (size_t k = i + 2; k < j; k++)
                    if (!bb_put(out, p[k] == 'm' ? "s" : p + k, 1)) return false;
                i = j - 1;
                continue;
            }
        }
        if (ch == '[') {
            if (depth > 0 && i + 1 < n && p[i + 1] == ':') { /* [:alpha:] inside a class */
                size_t j = i + 2;
                while (j + 1 < n && !(p[j] == ':' && p[j + 1] == ']')) j++;
                j = j + 1 < n ? j + 2 : n;
                if (!bb_put(out, p + i, j - i)) return false;
                i = j - 1;
                continue;
            }
            depth++;
            size_t j = i + 1;
            if (j < n && p[j] == '^') j++;
            if (j < n && p[j] == ']') j++; /* a leading ] is a literal */
            if (!bb_put(out, p + i, j - i)) return false;
            i = j - 1;
            continue;
        }
        if (ch == ']' && depth > 0) depth--;
        if (!bb_put(out, &p[i], 1)) return false;
    }
    return true;
}

/* Compiles a pattern from the file; literal is the {"String": ...} form. */
static albedo_status regex_compile(const char *pat, size_t len, bool literal, const char *path, pcre2_code **out,
                                   errbuf *e) {
    bytebuf tr = {0};
    const uint8_t *src = (const uint8_t *)pat;
    size_t n = len;
    uint32_t opts = PCRE2_UTF | PCRE2_LITERAL;
    if (!literal) {
        if (!regex_translate(pat, len, &tr)) {
            free(tr.p);
            return oom(e);
        }
        src = tr.p ? tr.p : (const uint8_t *)"";
        n = tr.n;
        opts = PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE;
    }
    pcre2_compile_context *cc = pcre2_compile_context_create(NULL);
    if (!cc) {
        free(tr.p);
        return oom(e);
    }
    pcre2_set_newline(cc, PCRE2_NEWLINE_LF); /* Oniguruma's line ends: \n only */
    int code;
    PCRE2_SIZE where;
    pcre2_code *re = pcre2_compile(src, n, opts, &code, &where, cc);
    pcre2_compile_context_free(cc);
    free(tr.p);
    if (!re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(code, msg, sizeof msg);
        return errf(e, ERR_TOK, "%s: invalid regex \"%.80s\": %s", path, pat, (const char *)msg);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* without JIT the interpreter runs */
    *out = re;
    return ALBEDO_OK;
}

/* Cuts s[0..n) into pieces that alternate between not matching and matching
 * re (flag = match), as the library's Pattern::find_matches does over
 * Oniguruma's find_iter: an empty match right where the previous match ended
 * is skipped by moving one character on. */
static albedo_status regex_segments(const pcre2_code *re, const uint8_t *s, size_t n, bool invert, pcre2_match_data *md,
                                    segvec *out, errbuf *e) {
    out->n = 0;
    if (n == 0) return seg_push(out, 0, 0, invert) ? ALBEDO_OK : oom(e);
    size_t prev = 0, from = 0, last_end = 0;
    bool have_last = false;
    while (from <= n) {
        int rc = pcre2_match(re, s, n, from, PCRE2_NO_UTF_CHECK, md, NULL);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT) /* the interpreter keeps its stack on the heap */
            rc = pcre2_match(re, s, n, from, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return errf(e, ALBEDO_ERR_LIMIT, "pre-tokenizer regex: %s", (const char *)msg);
        }
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (ms > me || me > n) ms = me = from; /* \K games; cannot happen in sane patterns */
        if (ms == me && have_last && last_end == me) {
            if (from >= n) break;
            from += (size_t)utf8_len(s[from]);
            continue;
        }
        from = me;
        have_last = true;
        last_end = me;
        if (prev != ms && !seg_push(out, prev, ms, false)) return oom(e);
        if (!seg_push(out, ms, me, true)) return oom(e);
        prev = me;
    }
    if (prev != n && !seg_push(out, prev, n, false)) return oom(e);
    if (invert)
        for (size_t i = 0; i < out->n; i++) out->v[i].flag = !out->v[i].flag;
    return ALBEDO_OK;
}

/* Applies a Split behaviour to the match flags, in place; afterwards flag
 * means "remove" (NormalizedString::split). */
static void split_apply(segvec *sv, enum split_behavior beh) {
    seg *v = sv->v;
    size_t n = sv->n, k = 0;
    bool prev = false;
    switch (beh) {
    case SPLIT_REMOVED: return;
    case SPLIT_ISOLATED:
        for (size_t i = 0; i < n; i++) v[i].flag = false;
        return;
    case SPLIT_CONTIGUOUS:
    case SPLIT_MERGED_WITH_PREVIOUS:
        for (size_t i = 0; i < n; i++) {
            seg cur = v[i];
            bool join = beh == SPLIT_CONTIGUOUS ? cur.flag == prev : cur.flag && !prev;
            if (join && k > 0)
                v[k - 1].b = cur.b;
            else
                v[k++] = (seg){cur.a, cur.b, false};
            prev = cur.flag;
        }
        sv->n = k;
        return;
    case SPLIT_MERGED_WITH_NEXT:
        k = n; /* fold from the right, writing from the end */
        for (size_t i = n; i-- > 0;) {
            seg cur = v[i];
            if (cur.flag && !prev && k < n)
                v[k].a = cur.a;
            else
                v[--k] = (seg){cur.a, cur.b, false};
            prev = cur.flag;
        }
        memmove(v, v + k, (n - k) * sizeof *v);
        sv->n = n - k;
        return;
    }
}

/* ------------------------------------------------------------------------ */
/* Normalizers                                                               */

/* Rust's char::to_lowercase, character by character (no final-sigma rule):
 * the simple lowercase mapping, except U+0130, the one character whose
 * lowercase is two characters. */
static utf8proc_ssize_t lowercase(const uint8_t *s, size_t n, uint8_t **out) {
    bytebuf b = {0};
    if (!bb_reserve(&b, n + n / 2)) return UTF8PROC_ERROR_NOMEM;
    for (size_t i = 0; i < n;) {
        int k = utf8_len(s[i]);
        uint32_t c = utf8_cp(s + i, k);
        uint8_t o[8];
        int m;
        if (c == 0x130) {
            m = utf8_put('i', o);
            m += utf8_put(0x307, o + m);
        } else {
            m = utf8_put((uint32_t)utf8proc_tolower((utf8proc_int32_t)c), o);
        }
        if (!bb_put(&b, o, (size_t)m)) {
            free(b.p);
            return UTF8PROC_ERROR_NOMEM;
        }
        i += (size_t)k;
    }
    *out = b.p;
    return (utf8proc_ssize_t)b.n;
}

/* Runs the normalizer steps over valid UTF-8 s[0..n). *out is malloc'ed,
 * or NULL when there are no steps (the text is unchanged). */
static albedo_status normalize(const tokenizer *t, const uint8_t *s, size_t n, uint8_t **out, size_t *out_n,
                               errbuf *e) {
    uint8_t *cur = NULL;
    const uint8_t *src = s;
    size_t len = n;
    for (int i = 0; i < t->n_norm; i++) {
        uint8_t *res = NULL;
        utf8proc_ssize_t r;
        if (t->norm[i] == NORM_LOWERCASE) {
            r = lowercase(src, len, &res);
        } else {
            utf8proc_option_t f = UTF8PROC_STABLE;
            if (t->norm[i] == NORM_NFC || t->norm[i] == NORM_NFKC) f |= UTF8PROC_COMPOSE;
            if (t->norm[i] == NORM_NFD || t->norm[i] == NORM_NFKD) f |= UTF8PROC_DECOMPOSE;
            if (t->norm[i] == NORM_NFKC || t->norm[i] == NORM_NFKD) f |= UTF8PROC_COMPAT;
            r = utf8proc_map(src, (utf8proc_ssize_t)len, &res, f);
        }
        free(cur);
        if (r < 0) {
            free(res);
            if (r == UTF8PROC_ERROR_NOMEM) return oom(e);
            return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "normalizer: %s", utf8proc_errmsg(r));
        }
        cur = res;
        src = cur;
        len = (size_t)r;
    }
    *out = cur;
    *out_n = len;
    return ALBEDO_OK;
}

/* ------------------------------------------------------------------------ */
/* Loading                                                                   */

static const char *json_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER:
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* An optional boolean field: absent or null gives dflt. */
static albedo_status get_bool(const json_t *obj, const char *key, bool dflt, const char *path, bool *out, errbuf *e) {
    const json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        *out = dflt;
        return ALBEDO_OK;
    }
    if (!json_is_boolean(v))
        return errf(e, ERR_TOK, "%s.%s must be true or false, not %s", path, key, json_type_name(v));
    *out = json_is_true(v);
    return ALBEDO_OK;
}

/* The "type" string of a component object. */
static albedo_status get_type(const json_t *obj, const char *path, const char **type, errbuf *e) {
    if (!json_is_object(obj))
        return errf(e, ERR_TOK, "%s must be an object or null, not %s", path, json_type_name(obj));
    const json_t *v = json_object_get(obj, "type");
    if (!json_is_string(v)) return errf(e, ERR_TOK, "%s.type is missing or not a string", path);
    *type = json_string_value(v);
    return ALBEDO_OK;
}

static albedo_status parse_normalizer(tokenizer *t, const json_t *n, const char *path, int depth, errbuf *e) {
    const char *type;
    albedo_status st = get_type(n, path, &type, e);
    if (st) return st;
    if (strcmp(type, "Sequence") == 0) {
        const json_t *list = json_object_get(n, "normalizers");
        if (!json_is_array(list)) return errf(e, ERR_TOK, "%s.normalizers is missing or not an array", path);
        if (depth >= TOK_MAX_DEPTH) return errf(e, ERR_TOK, "%s: Sequence nested too deep", path);
        for (size_t i = 0; i < json_array_size(list); i++) {
            char sub[256];
            snprintf(sub, sizeof sub, "%s.normalizers[%zu]", path, i);
            st = parse_normalizer(t, json_array_get(list, i), sub, depth + 1, e);
            if (st) return st;
        }
        return ALBEDO_OK;
    }
    static const struct {
        const char *name;
        enum norm_kind kind;
    } kinds[] = {
        {"NFC", NORM_NFC}, {"NFD", NORM_NFD}, {"NFKC", NORM_NFKC}, {"NFKD", NORM_NFKD}, {"Lowercase", NORM_LOWERCASE}};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        if (strcmp(type, kinds[i].name) != 0) continue;
        if (t->n_norm == TOK_MAX_STEPS) return errf(e, ERR_TOK, "%s: more than %d normalizers", path, TOK_MAX_STEPS);
        t->norm[t->n_norm++] = kinds[i].kind;
        return ALBEDO_OK;
    }
    return errf(e, ERR_TOK,
                "%s.type \"%.60s\" is not supported (supported: NFC, NFD, NFKC, NFKD, Lowercase, "
                "Sequence)",
                path, type);
}

static albedo_status parse_pre_tokenizer(tokenizer *t, const json_t *p, const char *path, int depth, errbuf *e) {
    const char *type;
    albedo_status st = get_type(p, path, &type, e);
    if (st) return st;
    if (strcmp(type, "Sequence") == 0) {
        const json_t *list = json_object_get(p, "pretokenizers");
        if (!json_is_array(list)) return errf(e, ERR_TOK, "%s.pretokenizers is missing or not an array", path);
        if (depth >= TOK_MAX_DEPTH) return errf(e, ERR_TOK, "%s: Sequence nested too deep", path);
        for (size_t i = 0; i < json_array_size(list); i++) {
            char sub[256];
            snprintf(sub, sizeof sub, "%s.pretokenizers[%zu]", path, i);
            st = parse_pre_tokenizer(t, json_array_get(list, i), sub, depth + 1, e);
            if (st) return st;
        }
        return ALBEDO_OK;
    }
    bool bytelevel = strcmp(type, "ByteLevel") == 0, split = strcmp(type, "Split") == 0;
    if (!bytelevel && !split)
        return errf(e, ERR_TOK, "%s.type \"%.60s\" is not supported (supported: ByteLevel, Split, Sequence)", path,
                    type);
    if (t->n_pre == TOK_MAX_STEPS) return errf(e, ERR_TOK, "%s: more than %d pre-tokenizers", path, TOK_MAX_STEPS);
    pre_step *s = &t->pre[t->n_pre];
    memset(s, 0, sizeof *s);
    if (bytelevel) {
        bool use_regex;
        s->kind = PRE_BYTELEVEL;
        if ((st = get_bool(p, "add_prefix_space", true, path, &s->add_prefix_space, e)) ||
            (st = get_bool(p, "use_regex", true, path, &use_regex, e)))
            return st;
        if (use_regex) {
            char sub[280];
            snprintf(sub, sizeof sub, "%s (GPT-2 regex)", path);
            st = regex_compile(gpt2_regex, strlen(gpt2_regex), false, sub, &s->re, e);
            if (st) return st;
        }
        t->n_pre++;
        return ALBEDO_OK;
    }
    s->kind = PRE_SPLIT;
    const json_t *pat = json_object_get(p, "pattern");
    const json_t *rx = json_object_get(pat, "Regex"), *str = json_object_get(pat, "String");
    if (!json_is_object(pat) || (!json_is_string(rx) && !json_is_string(str)))
        return errf(e, ERR_TOK, "%s.pattern must be {\"Regex\": \"...\"} or {\"String\": \"...\"}", path);
    const json_t *beh = json_object_get(p, "behavior");
    static const char *const behaviors[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                            "Contiguous"};
    int b = -1;
    for (int i = 0; i < 5 && json_is_string(beh); i++)
        if (strcmp(json_string_value(beh), behaviors[i]) == 0) b = i;
    if (b < 0)
        return errf(e, ERR_TOK,
                    "%s.behavior must be one of Removed, Isolated, MergedWithPrevious, "
                    "MergedWithNext, Contiguous",
                    path);
    s->behavior = (enum split_behavior)b;
    if ((st = get_bool(p, "invert", false, path, &s->invert, e))) return st;
    char sub[280];
    snprintf(sub, sizeof sub, "%s.pattern", path);
    const json_t *pv = json_is_string(rx) ? rx : str;
    st = regex_compile(json_string_value(pv), json_string_length(pv), pv == str, sub, &s->re, e);
    if (st) return st;
    t->n_pre++;
    return ALBEDO_OK;
}

/* Splits a legacy "a b" merge line at its only space. */
static bool split_merge_line(const char *s, size_t n, size_t *space) {
    const char *sp = memchr(s, ' ', n);
    if (!sp || memchr(sp + 1, ' ', n - (size_t)(sp - s) - 1)) return false;
    *space = (size_t)(sp - s);
    return true;
}

static albedo_status load_merges(tokenizer *t, const json_t *merges, errbuf *e) {
    size_t n = json_array_size(merges);
    if (!mergemap_init(&t->merges, n)) return oom(e);
    bytebuf cat = {0};
    albedo_status st = ALBEDO_OK;
    uint32_t rank = 0;
    for (size_t i = 0; i < n && !st; i++) {
        const json_t *m = json_array_get(merges, i);
        const char *a, *b;
        size_t alen, blen;
        if (json_is_string(m)) {
            const char *s = json_string_value(m);
            size_t len = json_string_length(m), sp;
            if (len >= 8 && memcmp(s, "#version", 8) == 0) continue; /* merges.txt header */
            if (!split_merge_line(s, len, &sp)) {
                st = errf(e, ERR_TOK, "model.merges[%zu] \"%.60s\" is not two tokens and one space", i, s);
                break;
            }
            a = s, alen = sp, b = s + sp + 1, blen = len - sp - 1;
        } else if (json_is_array(m) && json_array_size(m) == 2 && json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            alen = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            blen = json_string_length(json_array_get(m, 1));
        } else {
            st = errf(e, ERR_TOK, "model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", i);
            break;
        }
        int32_t ia = strmap_get(&t->vocab, t->arena.p, (const uint8_t *)a, alen);
        int32_t ib = strmap_get(&t->vocab, t->arena.p, (const uint8_t *)b, blen);
        cat.n = 0;
        if (!bb_put(&cat, a, alen) || !bb_put(&cat, b, blen)) {
            st = oom(e);
            break;
        }
        int32_t iab = strmap_get(&t->vocab, t->arena.p, cat.p, cat.n);
        if (ia < 0 || ib < 0 || iab < 0) {
            const char *miss = ia < 0 ? a : ib < 0 ? b : (const char *)cat.p;
            int mlen = (int)(ia < 0 ? alen : ib < 0 ? blen : cat.n);
            st = errf(e, ERR_TOK, "model.merges[%zu]: token \"%.*s\" is not in model.vocab", i, mlen > 60 ? 60 : mlen,
                      miss);
            break;
        }
        mergemap_put(&t->merges, ia, ib, rank++, iab);
    }
    free(cat.p);
    return st;
}

static albedo_status load_model(tokenizer *t, const json_t *root, errbuf *e) {
    const json_t *m = json_object_get(root, "model");
    if (!m || json_is_null(m)) return errf(e, ERR_TOK, "tokenizer.json has no \"model\"");
    if (!json_is_object(m)) return errf(e, ERR_TOK, "model must be an object, not %s", json_type_name(m));
    const json_t *type = json_object_get(m, "type");
    if (type && !json_is_string(type)) return errf(e, ERR_TOK, "model.type is not a string");
    if (type && strcmp(json_string_value(type), "BPE") != 0)
        return errf(e, ERR_TOK, "model.type \"%.60s\" is not supported (only BPE)", json_string_value(type));

    const json_t *v = json_object_get(m, "dropout");
    if (v && !json_is_null(v) && !(json_is_number(v) && json_number_value(v) == 0.0))
        return errf(e, ERR_TOK, "model.dropout is not supported (only null or 0)");
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        v = json_object_get(m, affixes[i]);
        if (v && !json_is_null(v) && !(json_is_string(v) && json_string_length(v) == 0))
            return errf(e, ERR_TOK, "model.%s is not supported (only null or \"\")", affixes[i]);
    }
    albedo_status st;
    if ((st = get_bool(m, "fuse_unk", false, "model", &t->fuse_unk, e)) ||
        (st = get_bool(m, "byte_fallback", false, "model", &t->byte_fallback, e)) ||
        (st = get_bool(m, "ignore_merges", false, "model", &t->ignore_merges, e)))
        return st;

    const json_t *vocab = json_object_get(m, "vocab");
    if (!json_is_object(vocab)) return errf(e, ERR_TOK, "model.vocab is missing or not an object");
    for (void *it = json_object_iter((json_t *)vocab); it; it = json_object_iter_next((json_t *)vocab, it)) {
        const char *key = json_object_iter_key(it);
        size_t klen = json_object_iter_key_len(it);
        const json_t *id = json_object_iter_value(it);
        if (!json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= TOK_MAX_ID)
            return errf(e, ERR_TOK, "model.vocab[\"%.60s\"]: id must be an integer in [0, %d)", key, TOK_MAX_ID);
        uint32_t off;
        if (!arena_add(t, key, klen, &off) ||
            !strmap_put(&t->vocab, t->arena.p, off, (uint32_t)klen, (int32_t)json_integer_value(id)))
            return oom(e);
    }
    const json_t *merges = json_object_get(m, "merges");
    if (!json_is_array(merges)) return errf(e, ERR_TOK, "model.merges is missing or not an array");
    if ((st = load_merges(t, merges, e))) return st;

    t->unk_id = -1;
    v = json_object_get(m, "unk_token");
    if (v && !json_is_null(v)) {
        if (!json_is_string(v)) return errf(e, ERR_TOK, "model.unk_token must be a string or null");
        t->has_unk = true;
        t->unk_id = strmap_get(&t->vocab, t->arena.p, (const uint8_t *)json_string_value(v), json_string_length(v));
        snprintf(t->unk_name, sizeof t->unk_name, "%s", json_string_value(v));
    }
    for (int b = 0; b < 256; b++) { /* the library spells these with format!("<{:#04X}>") */
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->fallback_id[b] = strmap_get(&t->vocab, t->arena.p, (const uint8_t *)name, 6);
    }
    return ALBEDO_OK;
}

static albedo_status load_added_tokens(tokenizer *t, const json_t *root, errbuf *e) {
    const json_t *list = json_object_get(root, "added_tokens");
    if (!list || json_is_null(list)) return ALBEDO_OK;
    if (!json_is_array(list)) return errf(e, ERR_TOK, "added_tokens must be an array");
    /* AddedVocabulary::add_tokens numbers tokens that are in neither map
     * from the model's vocabulary size (its entry count) upwards. */
    int64_t next_id = t->vocab.n;
    for (size_t i = 0; i < json_array_size(list); i++) {
        const json_t *o = json_array_get(list, i);
        char path[64];
        snprintf(path, sizeof path, "added_tokens[%zu]", i);
        if (!json_is_object(o)) return errf(e, ERR_TOK, "%s must be an object", path);
        const json_t *content = json_object_get(o, "content");
        if (!json_is_string(content)) return errf(e, ERR_TOK, "%s.content is missing or not a string", path);
        if (!json_is_integer(json_object_get(o, "id")))
            return errf(e, ERR_TOK, "%s.id is missing or not an integer", path);
        added_token a = {0};
        albedo_status st;
        if ((st = get_bool(o, "special", false, path, &a.special, e)) ||
            (st = get_bool(o, "lstrip", false, path, &a.lstrip, e)) ||
            (st = get_bool(o, "rstrip", false, path, &a.rstrip, e)) ||
            (st = get_bool(o, "single_word", false, path, &a.single_word, e)) ||
            (st = get_bool(o, "normalized", true, path, &a.normalized, e)))
            return st;
        const uint8_t *c = (const uint8_t *)json_string_value(content);
        size_t clen = json_string_length(content), dummy;
        if (clen == 0) continue; /* the library ignores empty tokens */
        if (!utf8_valid(c, clen, &dummy)) return errf(e, ERR_TOK, "%s.content is not UTF-8", path);

        const strmap_entry *x = strmap_find(&t->added_map, t->arena.p, c, clen);
        int64_t id = x ? x->id : strmap_get(&t->vocab, t->arena.p, c, clen);
        if (id < 0) id = next_id++;
        if (id >= TOK_MAX_ID) return errf(e, ERR_TOK, "%s: id %lld is too large", path, (long long)id);
        a.id = (int32_t)id;

        uint32_t coff;
        if (!arena_add(t, c, clen, &coff)) return oom(e);
        a.match_off = coff, a.match_len = (uint32_t)clen;
        if (a.normalized && t->n_norm > 0) {
            uint8_t *nz;
            size_t nn;
            if ((st = normalize(t, t->arena.p + coff, clen, &nz, &nn, e))) return st;
            bool ok = arena_add(t, nz, nn, &a.match_off);
            free(nz);
            if (!ok) return oom(e);
            a.match_len = (uint32_t)nn;
        }
        strmap_entry *me = strmap_put(&t->added_map, t->arena.p, coff, (uint32_t)clen, a.id);
        if (!me) return oom(e);
        if (a.special) me->flags |= STRMAP_IN_SPECIAL_SET; /* the set only ever grows */

        int k = 0; /* one entry per id: a later token with the same id replaces it */
        while (k < t->n_added && t->added[k].id != a.id) k++;
        if (k == t->n_added) {
            if (t->n_added == t->cap_added) {
                int cap = t->cap_added ? t->cap_added * 2 : 16;
                added_token *na = realloc(t->added, (size_t)cap * sizeof *na);
                if (!na) return oom(e);
                t->added = na;
                t->cap_added = cap;
            }
            t->n_added++;
        }
        t->added[k] = a;
    }
    return ALBEDO_OK;
}

/* Buckets the added tokens of one kind (normalized or not) by first byte,
 * longest first, for leftmost-longest matching. */
static bool match_set_build(const tokenizer *t, match_set *ms, bool normalized) {
    uint32_t count[256] = {0};
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].normalized == normalized && t->added[i].match_len > 0)
            count[t->arena.p[t->added[i].match_off]]++;
    ms->start[0] = 0;
    for (int b = 0; b < 256; b++) ms->start[b + 1] = ms->start[b] + count[b];
    ms->n = (int)ms->start[256];
    if (ms->n == 0) return true;
    ms->order = malloc((size_t)ms->n * sizeof *ms->order);
    if (!ms->order) return false;
    uint32_t fill[256];
    memcpy(fill, ms->start, sizeof fill);
    for (int i = 0; i < t->n_added; i++) {
        const added_token *a = &t->added[i];
        if (a->normalized != normalized || a->match_len == 0) continue;
        uint8_t b = t->arena.p[a->match_off];
        uint32_t j = fill[b]++;
        /* insertion into the bucket, longest first */
        while (j > ms->start[b] && t->added[ms->order[j - 1]].match_len < a->match_len) {
            ms->order[j] = ms->order[j - 1];
            j--;
        }
        ms->order[j] = i;
    }
    return true;
}

/* Fills the per-id table: the token string the decoder sees (an added
 * token's, else the vocabulary's), its decoded bytes and whether decode
 * treats it as special. */
static albedo_status build_id_table(tokenizer *t, errbuf *e) {
    int32_t max_id = -1;
    for (uint32_t i = 0; i < t->vocab.n; i++)
        if (t->vocab.ent[i].id > max_id) max_id = t->vocab.ent[i].id;
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].id > max_id) max_id = t->added[i].id;
    t->n_ent = max_id + 1;
    t->ent = calloc((size_t)t->n_ent + 1, sizeof *t->ent);
    if (!t->ent) return oom(e);
    for (uint32_t i = 0; i < t->vocab.n; i++) {
        tok_entry *x = &t->ent[t->vocab.ent[i].id];
        x->str_off = t->vocab.ent[i].off;
        x->str_len = t->vocab.ent[i].len;
        x->present = true;
    }
    /* An added token decodes from its normalized form when it has one
     * (AddedVocabulary::simple_id_to_token), which is its match string. */
    for (int i = 0; i < t->n_added; i++) {
        tok_entry *x = &t->ent[t->added[i].id];
        x->str_off = t->added[i].match_off;
        x->str_len = t->added[i].match_len;
        x->present = true;
    }
    bytebuf dec = {0};
    for (int32_t id = 0; id < t->n_ent; id++) {
        tok_entry *x = &t->ent[id];
        if (!x->present) continue;
        /* The ByteLevel decoder maps a token through the byte alphabet when
         * every character is in it, else takes the token's UTF-8 as is. */
        dec.n = 0;
        bool mapped = true;
        for (uint32_t i = 0; i < x->str_len && mapped;) {
            const uint8_t *s = t->arena.p + x->str_off + i;
            int k = utf8_len(s[0]);
            uint32_t cp = utf8_cp(s, k);
            if (cp >= 512 || t->char_byte[cp] < 0) {
                mapped = false;
            } else {
                uint8_t byte = (uint8_t)t->char_byte[cp];
                if (!bb_put(&dec, &byte, 1)) goto nomem;
            }
            i += (uint32_t)k;
        }
        if (mapped) {
            if (!arena_add(t, dec.p, dec.n, &x->dec_off)) goto nomem;
            x->dec_len = (uint32_t)dec.n;
        } else {
            x->dec_off = x->str_off;
            x->dec_len = x->str_len;
        }
        const strmap_entry *s = strmap_find(&t->added_map, t->arena.p, t->arena.p + x->str_off, x->str_len);
        x->special = s && (s->flags & STRMAP_IN_SPECIAL_SET);
    }
    free(dec.p);
    return ALBEDO_OK;
nomem:
    free(dec.p);
    return oom(e);
}

static albedo_status load_root(tokenizer *t, const json_t *root, errbuf *e) {
    if (!json_is_object(root))
        return errf(e, ERR_TOK, "tokenizer.json must be an object, not %s", json_type_name(root));
    const json_t *v = json_object_get(root, "version");
    if (v && !(json_is_string(v) && strcmp(json_string_value(v), "1.0") == 0))
        return errf(e, ERR_TOK, "version must be \"1.0\"");
    static const char *const unsupported[] = {"truncation", "padding"};
    for (int i = 0; i < 2; i++) {
        v = json_object_get(root, unsupported[i]);
        if (v && !json_is_null(v)) return errf(e, ERR_TOK, "%s is set; only null is supported", unsupported[i]);
    }
    byte_level_init(t);
    albedo_status st = load_model(t, root, e);
    if (st) return st;
    v = json_object_get(root, "normalizer");
    if (v && !json_is_null(v) && (st = parse_normalizer(t, v, "normalizer", 0, e))) return st;
    v = json_object_get(root, "pre_tokenizer");
    if (v && !json_is_null(v) && (st = parse_pre_tokenizer(t, v, "pre_tokenizer", 0, e))) return st;
    v = json_object_get(root, "decoder");
    const char *type;
    if (!v || json_is_null(v)) return errf(e, ERR_TOK, "decoder is null; only the ByteLevel decoder is supported");
    if ((st = get_type(v, "decoder", &type, e))) return st;
    if (strcmp(type, "ByteLevel") != 0)
        return errf(e, ERR_TOK, "decoder.type \"%.60s\" is not supported (only ByteLevel)", type);
    if ((st = load_added_tokens(t, root, e))) return st;
    if ((st = build_id_table(t, e))) return st;
    if (!match_set_build(t, &t->raw_set, false) || !match_set_build(t, &t->norm_set, true)) return oom(e);
    return ALBEDO_OK;
}

albedo_status tok_load_json(const char *json, size_t len, tokenizer **out, errbuf *e) {
    if (!out || (!json && len)) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "tok_load_json: missing argument");
    *out = NULL;
    json_error_t jerr;
    json_t *root = json_loadb(json ? json : "", len, JSON_ALLOW_NUL, &jerr);
    if (!root)
        return errf(e, ERR_TOK, "tokenizer.json is not valid JSON (line %d, column %d): %s", jerr.line, jerr.column,
                    jerr.text);
    tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        json_decref(root);
        return oom(e);
    }
    albedo_status st = load_root(t, root, e);
    json_decref(root);
    if (st) {
        tok_free(t);
        return st;
    }
    *out = t;
    return ALBEDO_OK;
}

albedo_status tok_load_file(const char *path, tokenizer **out, errbuf *e) {
    if (!path || !out) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "tok_load_file: missing argument");
    *out = NULL;
    uint8_t *buf;
    size_t len;
    albedo_status st = read_file(path, TOK_MAX_FILE, &buf, &len, e);
    if (st) return st;
    st = tok_load_json((const char *)buf, len, out, e);
    free(buf);
    if (st && e) { /* name the file in front of the detail */
        char msg[sizeof e->msg];
        snprintf(msg, sizeof msg, "%.200s: %.300s", path, e->msg);
        memcpy(e->msg, msg, sizeof msg);
    }
    return st;
}

/* ------------------------------------------------------------------------ */
/* Lookups                                                                   */

int tok_vocab_size(const tokenizer *t) { return t ? t->n_ent : 0; }

int tok_id(const tokenizer *t, const char *token) {
    if (!t || !token) return -1;
    size_t n = strlen(token);
    int32_t id = strmap_get(&t->added_map, t->arena.p, (const uint8_t *)token, n);
    return id >= 0 ? id : strmap_get(&t->vocab, t->arena.p, (const uint8_t *)token, n);
}

static const tok_entry *entry(const tokenizer *t, int32_t id) {
    return t && id >= 0 && id < t->n_ent && t->ent[id].present ? &t->ent[id] : NULL;
}

int tok_is_special(const tokenizer *t, int32_t id) {
    const tok_entry *x = entry(t, id);
    return x && x->special;
}

int tok_token_bytes(const tokenizer *t, int32_t id, const uint8_t **bytes, size_t *len) {
    const tok_entry *x = entry(t, id);
    if (!x || !bytes || !len) return -1;
    *bytes = t->arena.p + x->dec_off;
    *len = x->dec_len;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Encoding                                                                  */

typedef struct bpe_sym {
    int32_t id;
    int32_t prev, next; /* neighbours in the word, -1 at the ends */
    uint32_t len;       /* bytes covered; 0 once merged into its left neighbour */
} bpe_sym;

typedef struct bpe_cand {
    uint32_t rank;
    int32_t pos; /* the left symbol of the pair */
    int32_t new_id;
} bpe_cand;

typedef struct enc_ctx {
    const tokenizer *t;
    errbuf *e;
    int32_t *ids;
    size_t n_ids, cap_ids;
    pcre2_match_data *md;
    bytebuf prefixed[TOK_MAX_STEPS]; /* per pre-tokenizer step: the piece with a space added */
    bytebuf mapped[TOK_MAX_STEPS];   /* per step: a piece in the byte-level alphabet */
    segvec segs[TOK_MAX_STEPS];      /* per step: the piece's segments */
    bpe_sym *sym;
    size_t cap_sym;
    bpe_cand *heap;
    size_t n_heap, cap_heap;
} enc_ctx;

static bool emit(enc_ctx *c, int32_t id) {
    if (c->n_ids == c->cap_ids) {
        size_t cap = c->cap_ids ? c->cap_ids * 2 : 64;
        int32_t *v = realloc(c->ids, cap * sizeof *v);
        if (!v) return false;
        c->ids = v;
        c->cap_ids = cap;
    }
    c->ids[c->n_ids++] = id;
    return true;
}

static bool cand_less(const bpe_cand *x, const bpe_cand *y) {
    return x->rank != y->rank ? x->rank < y->rank : x->pos < y->pos;
}

static bool heap_push(enc_ctx *c, bpe_cand v) {
    if (c->n_heap == c->cap_heap) {
        size_t cap = c->cap_heap ? c->cap_heap * 2 : 64;
        bpe_cand *h = realloc(c->heap, cap * sizeof *h);
        if (!h) return false;
        c->heap = h;
        c->cap_heap = cap;
    }
    size_t i = c->n_heap++;
    while (i > 0 && cand_less(&v, &c->heap[(i - 1) / 2])) {
        c->heap[i] = c->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    c->heap[i] = v;
    return true;
}

static bpe_cand heap_pop(enc_ctx *c) {
    bpe_cand top = c->heap[0], last = c->heap[--c->n_heap];
    size_t i = 0, n = c->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        const bpe_cand *best = &last;
        if (l < n && cand_less(&c->heap[l], best)) m = l, best = &c->heap[l];
        if (l + 1 < n && cand_less(&c->heap[l + 1], best)) m = l + 1;
        if (m == i) break;
        c->heap[i] = c->heap[m];
        i = m;
    }
    if (n) c->heap[i] = last;
    return top;
}

/* Pushes the merge candidate (pos, its right neighbour) if the pair merges. */
static bool push_pair(enc_ctx *c, int32_t pos) {
    if (pos < 0 || c->sym[pos].next < 0) return true;
    int32_t next = c->sym[pos].next;
    const merge_entry *m = mergemap_get(&c->t->merges, c->sym[pos].id, c->sym[next].id);
    return !m || heap_push(c, (bpe_cand){m->rank, pos, m->new_id});
}

static bool add_sym(enc_ctx *c, size_t *n, int32_t id, uint32_t len) {
    if (*n == c->cap_sym) {
        size_t cap = c->cap_sym ? c->cap_sym * 2 : 64;
        bpe_sym *s = realloc(c->sym, cap * sizeof *s);
        if (!s) return false;
        c->sym = s;
        c->cap_sym = cap;
    }
    c->sym[*n] = (bpe_sym){id, (int32_t)*n - 1, -1, len};
    if (*n > 0) c->sym[*n - 1].next = (int32_t)*n;
    (*n)++;
    return true;
}

/* BPE on one word (models/bpe: BPE::merge_word and Word::merge_all): one
 * symbol per character, then the pair with the lowest merge rank is merged
 * first, leftmost among equals, until no pair merges. */
static albedo_status bpe_word(enc_ctx *c, const uint8_t *w, size_t n) {
    const tokenizer *t = c->t;
    if (n == 0) return ALBEDO_OK;
    if (t->ignore_merges) {
        int32_t id = strmap_get(&t->vocab, t->arena.p, w, n);
        if (id >= 0) return emit(c, id) ? ALBEDO_OK : oom(c->e);
    }
    if (n > INT32_MAX / 2) return errf(c->e, ALBEDO_ERR_LIMIT, "tokenizer: word too long");
    size_t ns = 0;
    bool unk = false; /* an unknown-character run waiting to be added */
    uint32_t unk_len = 0;
    for (size_t i = 0; i < n;) {
        uint32_t k = (uint32_t)utf8_len(w[i]);
        int32_t id = strmap_get(&t->vocab, t->arena.p, w + i, k);
        if (id >= 0) {
            if (unk && !add_sym(c, &ns, t->unk_id, unk_len)) return oom(c->e);
            unk = false;
            if (!add_sym(c, &ns, id, k)) return oom(c->e);
        } else {
            bool done = false;
            if (t->byte_fallback) {
                done = true;
                for (uint32_t j = 0; j < k; j++) done = done && t->fallback_id[w[i + j]] >= 0;
                for (uint32_t j = 0; j < k && done; j++)
                    if (!add_sym(c, &ns, t->fallback_id[w[i + j]], 1)) return oom(c->e);
            }
            if (!done && t->has_unk) {
                if (t->unk_id < 0)
                    return errf(c->e, ERR_TOK, "model.unk_token \"%s\" is not in model.vocab", t->unk_name);
                if (unk && t->fuse_unk) {
                    unk_len += k;
                } else {
                    if (unk && !add_sym(c, &ns, t->unk_id, unk_len)) return oom(c->e);
                    unk = true;
                    unk_len = k;
                }
            }
            /* Without unk_token or byte fallback the library drops the character. */
        }
        i += k;
    }
    if (unk && !add_sym(c, &ns, t->unk_id, unk_len)) return oom(c->e);
    if (ns == 0) return ALBEDO_OK;

    c->n_heap = 0;
    for (size_t i = 0; i + 1 < ns; i++)
        if (!push_pair(c, (int32_t)i)) return oom(c->e);
    while (c->n_heap) {
        bpe_cand top = heap_pop(c);
        bpe_sym *s = &c->sym[top.pos];
        if (s->len == 0 || s->next < 0) continue;
        /* Skip candidates made stale by an earlier merge, checking as the
         * library does: the pair now at pos must still merge into new_id. */
        const merge_entry *m = mergemap_get(&t->merges, s->id, c->sym[s->next].id);
        if (!m || m->new_id != top.new_id) continue;
        bpe_sym *r = &c->sym[s->next];
        s->id = top.new_id;
        s->len += r->len;
        r->len = 0;
        s->next = r->next;
        if (s->next >= 0) c->sym[s->next].prev = top.pos;
        if (!push_pair(c, s->prev) || !push_pair(c, top.pos)) return oom(c->e);
    }
    for (int32_t i = 0; i >= 0; i = c->sym[i].next)
        if (!emit(c, c->sym[i].id)) return oom(c->e);
    return ALBEDO_OK;
}

static albedo_status pre_tokenize(enc_ctx *c, int d, const uint8_t *s, size_t n);

/* ByteLevel's second half: rewrite a piece's bytes in the byte alphabet. */
static albedo_status byte_map(enc_ctx *c, int d, const uint8_t *s, size_t n) {
    if (n == 0) return ALBEDO_OK;
    bytebuf *m = &c->mapped[d];
    m->n = 0;
    if (!bb_reserve(m, 2 * n)) return oom(c->e);
    for (size_t i = 0; i < n; i++) {
        memcpy(m->p + m->n, c->t->byte_utf8[s[i]], c->t->byte_utf8_len[s[i]]);
        m->n += c->t->byte_utf8_len[s[i]];
    }
    return pre_tokenize(c, d + 1, m->p, m->n);
}

/* Runs pre-tokenizer step d and the following ones on a piece, then BPE on
 * each resulting word. Empty pieces are dropped, as PreTokenizedString::split
 * does. */
static albedo_status pre_tokenize(enc_ctx *c, int d, const uint8_t *s, size_t n) {
    if (n == 0) return ALBEDO_OK;
    if (d == c->t->n_pre) return bpe_word(c, s, n);
    const pre_step *p = &c->t->pre[d];
    albedo_status st;
    if (p->kind == PRE_BYTELEVEL) {
        if (p->add_prefix_space && s[0] != ' ') {
            bytebuf *b = &c->prefixed[d];
            b->n = 0;
            if (!bb_put(b, " ", 1) || !bb_put(b, s, n)) return oom(c->e);
            s = b->p;
            n = b->n;
        }
        if (!p->re) return byte_map(c, d, s, n);
    }
    segvec *sv = &c->segs[d];
    if ((st = regex_segments(p->re, s, n, p->invert, c->md, sv, c->e))) return st;
    split_apply(sv, p->kind == PRE_BYTELEVEL ? SPLIT_ISOLATED : p->behavior);
    for (size_t i = 0; i < sv->n; i++) {
        const seg g = sv->v[i];
        if (g.flag || g.b == g.a) continue;
        st = p->kind == PRE_BYTELEVEL ? byte_map(c, d, s + g.a, g.b - g.a) : pre_tokenize(c, d + 1, s + g.a, g.b - g.a);
        if (st) return st;
    }
    return ALBEDO_OK;
}

/* Finds the leftmost-longest added token of ms in s[from..n). */
static bool added_find(const tokenizer *t, const match_set *ms, const uint8_t *s, size_t n, size_t from, size_t *start,
                       const added_token **tok) {
    for (size_t i = from; i < n; i++) {
        for (uint32_t k = ms->start[s[i]]; k < ms->start[s[i] + 1]; k++) {
            const added_token *a = &t->added[ms->order[k]];
            if (a->match_len <= n - i && memcmp(t->arena.p + a->match_off, s + i, a->match_len) == 0) {
                *start = i;
                *tok = a;
                return true;
            }
        }
    }
    return false;
}

static albedo_status encode_normalized(enc_ctx *c, const uint8_t *s, size_t n);

/* The text between added tokens: at level 0 (raw text) it is normalized next,
 * at level 1 (normalized text) it is pre-tokenized. */
static albedo_status gap(enc_ctx *c, int level, const uint8_t *s, size_t n) {
    return level == 0 ? encode_normalized(c, s, n) : pre_tokenize(c, 0, s, n);
}

/* Extracts the added tokens of ms from s (AddedVocabulary::find_matches):
 * non-overlapping leftmost-longest matches, single_word checked against the
 * neighbouring characters, lstrip/rstrip widening the match over adjacent
 * white space. */
static albedo_status encode_added(enc_ctx *c, const match_set *ms, int level, const uint8_t *s, size_t n) {
    const tokenizer *t = c->t;
    if (n == 0) return ALBEDO_OK;
    if (ms->n == 0) return gap(c, level, s, n);
    size_t from = 0, done = 0, ms_start;
    const added_token *a;
    albedo_status st;
    while (added_find(t, ms, s, n, from, &ms_start, &a)) {
        size_t start = ms_start, stop = ms_start + a->match_len, q;
        from = stop;
        if (a->single_word) {
            bool left_ok = start == 0 || !is_word_char(utf8_last(s, start, &q));
            bool right_ok = stop == n || !is_word_char(utf8_cp(s + stop, utf8_len(s[stop])));
            if (!left_ok || !right_ok) continue;
        }
        if (a->lstrip) {
            size_t ns = start;
            while (ns > 0 && is_white_space(utf8_last(s, ns, &q))) ns = q;
            start = ns > done ? ns : done;
        }
        if (a->rstrip)
            while (stop < n && is_white_space(utf8_cp(s + stop, utf8_len(s[stop])))) stop += (size_t)utf8_len(s[stop]);
        if (done < start && (st = gap(c, level, s + done, start - done))) return st;
        if (!emit(c, a->id)) return oom(c->e);
        done = stop;
    }
    return done < n ? gap(c, level, s + done, n - done) : ALBEDO_OK;
}

static albedo_status encode_normalized(enc_ctx *c, const uint8_t *s, size_t n) {
    uint8_t *nz = NULL;
    size_t nn = n;
    albedo_status st = normalize(c->t, s, n, &nz, &nn, c->e);
    if (st) return st;
    st = encode_added(c, &c->t->norm_set, 1, nz ? nz : s, nn);
    free(nz);
    return st;
}

albedo_status tok_encode(const tokenizer *t, const char *text, size_t len, int32_t **ids, int *n, errbuf *e) {
    if (ids) *ids = NULL;
    if (n) *n = 0;
    if (!t || !ids || !n || (!text && len)) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "tok_encode: missing argument");
    const uint8_t *s = (const uint8_t *)(text ? text : "");
    size_t bad;
    if (!utf8_valid(s, len, &bad))
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "text is not valid UTF-8 (at byte %zu)", bad);
    enc_ctx c = {.t = t, .e = e};
    albedo_status st = ALBEDO_OK;
    c.md = pcre2_match_data_create(1, NULL);
    if (!c.md) st = oom(e);
    if (!st) st = encode_added(&c, &t->raw_set, 0, s, len);
    if (!st && c.n_ids > INT_MAX) st = errf(e, ALBEDO_ERR_LIMIT, "text gives too many tokens");
    if (!st && !c.ids && !(c.ids = malloc(sizeof *c.ids))) st = oom(e);
    if (!st) {
        *ids = c.ids;
        *n = (int)c.n_ids;
    } else {
        free(c.ids);
    }
    pcre2_match_data_free(c.md);
    for (int i = 0; i < TOK_MAX_STEPS; i++) {
        free(c.prefixed[i].p);
        free(c.mapped[i].p);
        free(c.segs[i].v);
    }
    free(c.sym);
    free(c.heap);
    return st;
}

/* ------------------------------------------------------------------------ */
/* Decoding                                                                  */

albedo_status tok_decode(const tokenizer *t, const int32_t *ids, int n, int skip_special, char **out, size_t *out_len,
                         errbuf *e) {
    if (out) *out = NULL;
    if (out_len) *out_len = 0;
    if (!t || !out || n < 0 || (!ids && n > 0))
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "tok_decode: missing argument");
    /* The ByteLevel decoder joins all tokens' bytes before converting, so
     * a character split across tokens comes back whole. */
    bytebuf raw = {0}, text = {0};
    for (int i = 0; i < n; i++) {
        const tok_entry *x = entry(t, ids[i]);
        if (!x) {
            free(raw.p);
            return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "id %ld at position %d is not in the vocabulary", (long)ids[i],
                        i);
        }
        if (skip_special && x->special) continue;
        if (!bb_put(&raw, t->arena.p + x->dec_off, x->dec_len)) {
            free(raw.p);
            return oom(e);
        }
    }
    size_t used;
    bool ok = bb_reserve(&text, raw.n) && utf8_lossy(&text, raw.p, raw.n, false, &used);
    free(raw.p);
    if (!ok) {
        free(text.p);
        return oom(e);
    }
    *out = (char *)text.p;
    *out_len = text.n;
    return ALBEDO_OK;
}

void tok_stream_init(tok_stream *s) {
    if (s) memset(s, 0, sizeof *s);
}

/* Appends to the caller's growable buffer, keeping it NUL-terminated. */
static int stream_out(const uint8_t *s, size_t n, bool hold_tail, size_t *used, char **out, size_t *out_len,
                      size_t *out_cap) {
    bytebuf b = {(uint8_t *)*out, *out_len, *out_cap};
    bool ok = bb_reserve(&b, n) && utf8_lossy(&b, s, n, hold_tail, used);
    *out = (char *)b.p;
    *out_len = b.n;
    *out_cap = b.cap;
    return ok ? 0 : -1;
}

int tok_stream_push(const tokenizer *t, tok_stream *s, int32_t id, int skip_special, char **out, size_t *out_len,
                    size_t *out_cap) {
    const tok_entry *x = entry(t, id);
    if (!x || !s || !out || !out_len || !out_cap) return -1;
    if (skip_special && x->special) return 0;
    const uint8_t *bytes = t->arena.p + x->dec_off;
    size_t n = x->dec_len, np = (size_t)s->n_pending;
    if (n == 0) return 0;
    /* The held-back bytes go in front of the new ones. */
    uint8_t local[64], *joined = NULL;
    const uint8_t *src = bytes;
    if (np) {
        joined = np + n <= sizeof local ? local : malloc(np + n);
        if (!joined) return -1;
        memcpy(joined, s->pending, np);
        memcpy(joined + np, bytes, n);
        src = joined;
        n += np;
    }
    size_t used;
    int rc = stream_out(src, n, true, &used, out, out_len, out_cap);
    if (rc == 0) { /* at most 3 bytes stay: a proper prefix of one character */
        s->n_pending = (int)(n - used);
        memcpy(s->pending, src + used, n - used);
    }
    if (joined != local) free(joined);
    return rc;
}

int tok_stream_finish(tok_stream *s, char **out, size_t *out_len, size_t *out_cap) {
    if (!s || !out || !out_len || !out_cap) return -1;
    size_t used;
    int rc = stream_out(s->pending, (size_t)s->n_pending, false, &used, out, out_len, out_cap);
    if (rc == 0) s->n_pending = 0;
    return rc;
}
