/*
 * test.h — the tiny test harness every test program uses: CHECK records a
 * failure with its location and keeps going; TEST_MAIN_END prints
 * "N passed, N failed" and returns nonzero if anything failed, so a failing
 * test can never exit 0.
 */
#ifndef ALBEDO_TEST_H
#define ALBEDO_TEST_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int test_passed, test_failed;

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (cond) {                                                         \
            test_passed++;                                                  \
        } else {                                                            \
            test_failed++;                                                  \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                   \
            fputc('\n', stderr);                                            \
        }                                                                   \
    } while (0)

#define TEST_MAIN_END()                                             \
    do {                                                            \
        printf("%d passed, %d failed\n", test_passed, test_failed); \
        return test_failed ? 1 : (test_passed ? 0 : 1);             \
    } while (0)

/* ../shared beside the repository, or NULL when this clone has none. */
static inline const char *test_shared_dir(void) {
    static char path[4096];
    const char *env = getenv("ALBEDO_SHARED");
    snprintf(path, sizeof path, "%s", env ? env : ALBEDO_SOURCE_DIR "/../shared");
    struct stat sb;
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/fixtures/README.md", path);
    return stat(probe, &sb) == 0 ? path : NULL;
}

static inline const char *test_source_dir(void) { return ALBEDO_SOURCE_DIR; }

#endif
