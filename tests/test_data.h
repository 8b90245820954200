/*
 * test_data.h — small helpers the model-level tests share: the relative L2
 * error of two float arrays, and unpacking tests/data's gzipped files.
 * Include after test.h; link zlib.
 */
#ifndef ALBEDO_TEST_DATA_H
#define ALBEDO_TEST_DATA_H

#include <math.h>
#include <stdio.h>
#include <zlib.h>

/* ||a - b|| / ||b|| (1 when b is all zeros). */
static inline double rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* Decompress the gzip file src into dst; 0 or -1. */
static inline int gunzip(const char *src, const char *dst) {
    gzFile in = gzopen(src, "rb");
    FILE *out = fopen(dst, "wb");
    int ok = in && out;
    char chunk[65536];
    int n;
    while (ok && (n = gzread(in, chunk, sizeof chunk)) > 0) ok = fwrite(chunk, 1, (size_t)n, out) == (size_t)n;
    if (in) gzclose(in);
    if (out && fclose(out)) ok = 0;
    return ok ? 0 : -1;
}

#endif
