/*
 * fuzz.h — what every fuzz target shares: the libFuzzer entry points and a
 * check that turns a broken invariant into a crash the fuzzer records.
 *
 * A target never prints on the normal path (libFuzzer runs it millions of
 * times); it aborts only when the library broke a promise of its header:
 * a status other than the documented ones, an output outside its bounds, two
 * paths that must agree and do not.
 */
#ifndef ALBEDO_FUZZ_H
#define ALBEDO_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define FUZZ_CHECK(cond, ...)                                                            \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: invariant failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                                \
            fputc('\n', stderr);                                                         \
            abort();                                                                     \
        }                                                                                \
    } while (0)

/* Sum of a buffer's bytes: reading every byte lets ASan check that a buffer
 * the library handed back really is as long as it says. */
static inline unsigned fuzz_touch(const void *p, size_t n) {
    const volatile uint8_t *b = (const volatile uint8_t *)p;
    unsigned s = 0;
    for (size_t i = 0; i < n; i++) s += b[i];
    return s;
}

/* 1 if s[0..n) is well-formed UTF-8 (no overlong forms, no surrogates,
 * nothing above U+10FFFF): what jansson accepts in a JSON document, and what
 * every response body of the server must be. */
static inline int fuzz_utf8_ok(const uint8_t *s, size_t n) {
    static const uint32_t min[5] = {0, 0, 0x80, 0x800, 0x10000};
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t k = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
        if (!k || i + k > n) return 0;
        uint32_t cp = k == 1 ? c : k == 2 ? c & 0x1fu : k == 3 ? c & 0x0fu : c & 0x07u;
        for (size_t j = 1; j < k; j++) {
            if ((s[i + j] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (s[i + j] & 0x3fu);
        }
        if (cp < min[k] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
        i += k;
    }
    return 1;
}

#endif
