/*
 * tokenizer.h — Hugging Face tokenizer.json, byte-level BPE.
 *
 * Supports what byte-level BPE tokenizers (GPT-2, moondream/starmie-v1) use:
 * normalizers (NFC, NFKC, NFD, NFKD, Lowercase, Sequence, or none);
 * pre-tokenizers ByteLevel (with or without the GPT-2 regex), Split (regex
 * or string, every behaviour, invert) and Sequence of these; the BPE model
 * with merges (both the "a b" and ["a", "b"] forms), ignore_merges, and the
 * byte-level alphabet; added tokens (special or not, lstrip/rstrip,
 * single_word, normalized) matched before the model; the ByteLevel decoder.
 * Anything else is rejected at load with a message naming it.
 *
 * No BOS/EOS is added by encode (Moondream builds its prompts itself).
 */
#ifndef ALBEDO_TOKENIZER_H
#define ALBEDO_TOKENIZER_H

#include "common.h"

typedef struct tokenizer tokenizer;

albedo_status tok_load_file(const char *path, tokenizer **out, errbuf *e);
albedo_status tok_load_json(const char *json, size_t len, tokenizer **out, errbuf *e);
void tok_free(tokenizer *t);

int tok_vocab_size(const tokenizer *t);            /* largest id + 1 */
int tok_id(const tokenizer *t, const char *token); /* -1 if absent */
int tok_is_special(const tokenizer *t, int32_t id);

/* Encode UTF-8 text. *ids is malloc'ed (free it); *n its length. Invalid
 * UTF-8 in the input is an error (ALBEDO_ERR_INVALID_ARGUMENT). */
albedo_status tok_encode(const tokenizer *t, const char *text, size_t len, int32_t **ids, int *n, errbuf *e);

/* The raw bytes a token stands for (byte-level alphabet undone; an added
 * token's content as is). Returns 0 and sets bytes and len, or -1 for an
 * unknown id. */
int tok_token_bytes(const tokenizer *t, int32_t id, const uint8_t **bytes, size_t *len);

/* Decode ids to a malloc'ed NUL-terminated UTF-8 string, as the tokenizers
 * library does: bytes concatenated, invalid UTF-8 replaced by U+FFFD (one per
 * maximal invalid subsequence), special tokens skipped when skip_special.
 * The text may itself contain NUL bytes (a token for byte 0): *out_len is its
 * length. An id outside the vocabulary is ALBEDO_ERR_INVALID_ARGUMENT. */
albedo_status tok_decode(const tokenizer *t, const int32_t *ids, int n, int skip_special, char **out, size_t *out_len,
                         errbuf *e);

/* Incremental decoding for streaming: push ids, get back text that is final
 * (complete UTF-8). The concatenation of everything returned by push and
 * finish equals tok_decode of all ids. */
typedef struct tok_stream {
    uint8_t pending[8]; /* an incomplete UTF-8 sequence held back */
    int n_pending;
} tok_stream;

void tok_stream_init(tok_stream *s);
/* Appends the final text for id to out (malloc'ed/realloc'ed buffer with
 * *out_len used bytes and *out_cap capacity, kept NUL-terminated). Returns 0,
 * or -1 on OOM or an id outside the vocabulary. */
int tok_stream_push(const tokenizer *t, tok_stream *s, int32_t id, int skip_special, char **out, size_t *out_len,
                    size_t *out_cap);
int tok_stream_finish(tok_stream *s, char **out, size_t *out_len, size_t *out_cap);

#endif
