/*
 * bench_util.h — what the benchmark programs share (bench_util.c): a
 * monotonic clock, the median of a sample, and a file read whole.
 */
#ifndef ALBEDO_BENCH_UTIL_H
#define ALBEDO_BENCH_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Milliseconds on the monotonic clock. */
double bench_now_ms(void);
/* The median of v[0 .. n) (n >= 1); sorts v. */
double bench_median(double *v, int n);
/* The bytes of path (its length in *len), or a message naming prog and the
 * path on stderr and exit(1): a benchmark cannot go on without its input. */
uint8_t *bench_read_file(const char *prog, const char *path, size_t *len);

#endif
