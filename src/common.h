/*
 * common.h — small shared pieces of the library: dtypes, 16- and 8-bit float
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
    DT_Q8,   /* albedo's 8-bit block format (ops.h) */
    DT_Q4,   /* albedo's 4-bit block format (ops.h) */
    DT_E4M3, /* OCP fp8 e4m3 (the fp8 KV cache): below */
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

/* fp8 e4m3 (OCP "E4M3FN", CUDA's __NV_E4M3): sign, 4 exponent bits (bias 7),
 * 3 mantissa bits; no infinities, S.1111.111 is NaN, the largest finite
 * value 448, normals down to 2^-6, subnormals m * 2^-9. Widening is exact.
 * Narrowing is CUDA's __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3):
 * round to nearest even, every finite |x| beyond 448 (and infinity)
 * saturated to ±448, NaN to NaN (0x7f with x's sign). */
static inline float e4m3_to_f32(uint8_t b) {
    const uint32_t e = (b >> 3) & 15u, m = b & 7u;
    if (e == 0) return (b & 0x80u ? -0x1p-9f : 0x1p-9f) * (float)m; /* subnormal (and zero): exact */
    uint32_t u = (e == 15 && m == 7) ? 0x7fc00000u : ((e + 120u) << 23) | (m << 20);
    u |= (uint32_t)(b & 0x80u) << 24;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* Branch-free (a KV cache write converts every K and V element: the
 * branchy form took 5.5 ns an element, 0.4 s over Moondream 2's prefix).
 * Normals: round the float's mantissa to 3 bits (to nearest even) in the
 * integer bits, then rebias the exponent (127 -> 7) by subtracting 120 << 3;
 * a carry into the exponent is the next power of two, as it should be, and
 * anything from 464 up lands above 0x7e and is clamped to it (448..464
 * rounds to 448 itself). Below 2^-6 the steps are 2^-9: adding 2^14, whose
 * float spacing is 2^-9, rounds |x| to that grid (to nearest even, in the
 * default rounding mode) and leaves the count of steps, 0..8, in the low
 * bits (8 is 2^-6, the same byte as the smallest normal). */
static inline uint8_t f32_to_e4m3(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 24) & 0x80u;
    u &= 0x7fffffffu;
    float a, y;
    memcpy(&a, &u, 4);
    y = a + 0x1p14f;
    uint32_t sub;
    memcpy(&sub, &y, 4);
    sub -= 0x46800000u; /* the bits of 2^14 */
    uint32_t norm = ((u + 0x7ffffu + ((u >> 20) & 1u)) >> 20) - (120u << 3);
    norm = norm < 0x7eu ? norm : 0x7eu;
    uint32_t b = u < 0x3c800000u ? sub : norm; /* below 2^-6: subnormal steps */
    b = u > 0x7f800000u ? 0x7fu : b;           /* NaN */
    return (uint8_t)(sign | b);
}

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

/* n bytes (free() them) aligned to 2 MiB and, on Linux, advised into
 * transparent huge pages: for what decode streams every token (quantised
 * weights, KV caches). With 4 KiB pages a core's hardware prefetcher stops
 * at every page boundary (PERFORMANCE.md: q4 decode on the 2-core Zen 5).
 * Pages are still faulted in on first touch, 2 MiB at a time. */
void *big_alloc(size_t n);

/* Monotonic clock in milliseconds. */
double now_ms(void);

/* Read a whole file into a malloc'ed buffer (NUL-terminated for convenience). */
albedo_status read_file(const char *path, size_t max_bytes, uint8_t **out, size_t *len, errbuf *e);

#endif
