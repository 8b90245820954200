/*
 * common.h — small shared pieces of the library: dtypes, 16-bit float
 * conversions and the error buffer every fallible internal function fills.
 * Not a grab bag: anything model-specific lives in its stage file.
 */
#ifndef ALBEDO_COMMON_H
#define ALBEDO_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "albedo.h"

/* Element types of tensors in files and in memory. */
typedef enum dtype {
    DT_F32 = 0,
    DT_F16,
    DT_BF16,
    DT_F64,
    DT_I8,
    DT_U8,
    DT_I16,
    DT_U16,
    DT_I32,
    DT_I64,
    DT_BOOL,
    DT_Q8, /* albedo's 8-bit block format (ops.h) */
    DT_Q4, /* albedo's 4-bit block format (ops.h) */
    DT_COUNT
} dtype;

const char *dtype_name(dtype t);
size_t dtype_size(dtype t); /* bytes per element; 0 for block formats */

/* bfloat16 <-> float32. Widening is exact; narrowing rounds to nearest even,
 * as torch does, and keeps NaN a NaN. */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

/* Error buffer: the detail message that becomes albedo_last_error(). */
typedef struct errbuf {
    char msg[512];
} errbuf;

/* Format a message into e (if not NULL) and return st. */
albedo_status errf(errbuf *e, albedo_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Thread-local last error used by the public API. */
void error_set_last(const char *msg);

/* Monotonic clock in milliseconds. */
double now_ms(void);

/* Read a whole file into a malloc'ed buffer (NUL-terminated for convenience). */
albedo_status read_file(const char *path, size_t max_bytes, uint8_t **out, size_t *len, errbuf *e);

#endif
