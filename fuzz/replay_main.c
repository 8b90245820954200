/*
 * replay_main.c — a main() for fuzz targets built without libFuzzer
 * (ALBEDO_FUZZ_ENGINE=replay): runs each file named on the command line, and
 * each regular file in a named directory, through LLVMFuzzerTestOneInput
 * once. Options starting with '-' are libFuzzer's and are ignored, so the
 * command line of a libFuzzer replay (-runs=0 DIR...) works unchanged.
 * A crash is reported by the sanitizers; a file that cannot be read is an
 * error (exit 1).
 */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz.h"

__attribute__((weak)) int LLVMFuzzerInitialize(int *argc, char ***argv);

static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "replay: cannot open %s\n", path);
        return -1;
    }
    size_t cap = 1 << 16, n = 0;
    uint8_t *b = malloc(cap);
    while (b) {
        n += fread(b + n, 1, cap - n, f);
        if (n < cap) break;
        uint8_t *b2 = realloc(b, cap *= 2);
        if (!b2) free(b);
        b = b2;
    }
    int err = ferror(f);
    fclose(f);
    if (!b || err) {
        free(b);
        fprintf(stderr, "replay: cannot read %s\n", path);
        return -1;
    }
    /* An exact-size copy so that ASan sees reads past the input's end. */
    uint8_t *exact = malloc(n ? n : 1);
    if (!exact) {
        free(b);
        return -1;
    }
    memcpy(exact, b, n);
    free(b);
    LLVMFuzzerTestOneInput(exact, n);
    free(exact);
    return 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int main(int argc, char **argv) {
    if (LLVMFuzzerInitialize) LLVMFuzzerInitialize(&argc, &argv);
    int runs = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] == '-') continue;
        struct stat sb;
        if (stat(argv[i], &sb)) {
            fprintf(stderr, "replay: %s does not exist\n", argv[i]);
            bad = 1;
            continue;
        }
        if (!S_ISDIR(sb.st_mode)) {
            bad |= run_file(argv[i]) != 0;
            runs++;
            continue;
        }
        DIR *d = opendir(argv[i]);
        if (!d) {
            bad = 1;
            continue;
        }
        char **names = NULL;
        size_t nn = 0, cap = 0;
        struct dirent *de;
        while ((de = readdir(d))) {
            if (de->d_name[0] == '.') continue;
            if (nn == cap) {
                char **n2 = realloc(names, (cap = cap ? 2 * cap : 64) * sizeof *names);
                if (!n2) break;
                names = n2;
            }
            size_t l = strlen(argv[i]) + strlen(de->d_name) + 2;
            if (!(names[nn] = malloc(l))) break;
            snprintf(names[nn], l, "%s/%s", argv[i], de->d_name);
            nn++;
        }
        closedir(d);
        if (nn) qsort(names, nn, sizeof *names, cmp_str);
        for (size_t k = 0; k < nn; k++) {
            if (!stat(names[k], &sb) && S_ISREG(sb.st_mode)) {
                bad |= run_file(names[k]) != 0;
                runs++;
            }
            free(names[k]);
        }
        free(names);
    }
    printf("replay: %d inputs run%s\n", runs, bad ? ", with errors" : "");
    return bad;
}
