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

#define FUZZ_CHECK(cond, ...)                                                   \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "%s:%d: invariant failed: %s: ", __FILE__, __LINE__, \
                    #cond);                                                     \
            fprintf(stderr, __VA_ARGS__);                                       \
            fputc('\n', stderr);                                                \
            abort();                                                            \
        }                                                                       \
    } while (0)

/* Sum of a buffer's bytes: reading every byte lets ASan check that a buffer
 * the library handed back really is as long as it says. */
static inline unsigned fuzz_touch(const void *p, size_t n) {
    const volatile uint8_t *b = (const volatile uint8_t *)p;
    unsigned s = 0;
    for (size_t i = 0; i < n; i++) s += b[i];
    return s;
}

#endif
