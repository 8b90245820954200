/*
 * error.c — status messages, the thread-local last error, and the few helpers
 * of common.h (dtype names, float16 conversion, file reading, clock, large
 * allocations).
 */
#define _DEFAULT_SOURCE /* madvise */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common.h"

static const char *const status_msgs[ALBEDO_STATUS_COUNT] = {
    [ALBEDO_OK] = "ok",
    [ALBEDO_ERR_INVALID_ARGUMENT] = "invalid argument",
    [ALBEDO_ERR_IO] = "input/output error",
    [ALBEDO_ERR_MODEL_FORMAT] = "invalid model file",
    [ALBEDO_ERR_TOKENIZER] = "invalid tokenizer file",
    [ALBEDO_ERR_IMAGE] = "invalid image",
    [ALBEDO_ERR_LIMIT] = "limit exceeded",
    [ALBEDO_ERR_OUT_OF_MEMORY] = "out of memory",
    [ALBEDO_ERR_CANCELLED] = "cancelled",
    [ALBEDO_ERR_UNSUPPORTED] = "unsupported",
    [ALBEDO_ERR_NETWORK] = "network error",
    [ALBEDO_ERR_INTERNAL] = "internal error",
};

const char *albedo_status_str(albedo_status st) {
    if ((int)st < 0 || st >= ALBEDO_STATUS_COUNT) return "unknown status";
    return status_msgs[st];
}

static _Thread_local char last_error[512];

void error_set_last(const char *msg) { snprintf(last_error, sizeof last_error, "%s", msg ? msg : ""); }

const char *albedo_last_error(void) { return last_error; }

const char *albedo_version(void) { return ALBEDO_VERSION_STRING; }

albedo_status errf(errbuf *e, albedo_status st, const char *fmt, ...) {
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return st;
}

static const struct {
    const char *name;
    size_t size;
} dtypes[DT_COUNT] = {
    [DT_F32] = {"F32", 4}, [DT_F16] = {"F16", 2},      [DT_BF16] = {"BF16", 2}, [DT_F64] = {"F64", 8},
    [DT_I8] = {"I8", 1},   [DT_U8] = {"U8", 1},        [DT_I16] = {"I16", 2},   [DT_U16] = {"U16", 2},
    [DT_I32] = {"I32", 4}, [DT_I64] = {"I64", 8},      [DT_BOOL] = {"BOOL", 1}, [DT_Q8] = {"Q8", 0},
    [DT_Q4] = {"Q4", 0},   [DT_E4M3] = {"F8_E4M3", 1},
};

const char *dtype_name(dtype t) { return (unsigned)t < DT_COUNT ? dtypes[t].name : "?"; }
size_t dtype_size(dtype t) { return (unsigned)t < DT_COUNT ? dtypes[t].size : 0; }

float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) {
                man <<= 1;
                exp--;
            }
            man &= 0x3ffu;
            u = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t exp = (int32_t)((u >> 23) & 0xff) - 127 + 15;
    uint32_t man = u & 0x7fffffu;
    if (((u >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = sign | ((uint32_t)exp << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)h;
}

void *big_alloc(size_t n) {
    void *p = NULL;
    if (n == 0 || posix_memalign(&p, (size_t)2 << 20, n)) return NULL;
#ifdef MADV_HUGEPAGE
    /* advice only: where the system refuses (THP "never"), 4 KiB pages */
    if (n >= ((size_t)2 << 20)) madvise(p, n, MADV_HUGEPAGE);
#endif
    return p;
}

double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

albedo_status read_file(const char *path, size_t max_bytes, uint8_t **out, size_t *len, errbuf *e) {
    *out = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return errf(e, ALBEDO_ERR_IO, "%s: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap + 1);
    if (!buf) {
        fclose(f);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
    }
    for (;;) {
        if (n == cap) {
            if (cap >= max_bytes) {
                free(buf);
                fclose(f);
                return errf(e, ALBEDO_ERR_LIMIT, "%s: larger than %zu bytes", path, max_bytes);
            }
            size_t ncap = cap * 2 > max_bytes ? max_bytes : cap * 2;
            uint8_t *nb = realloc(buf, ncap + 1);
            if (!nb) {
                free(buf);
                fclose(f);
                return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "%s: out of memory", path);
            }
            buf = nb;
            cap = ncap;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        return errf(e, ALBEDO_ERR_IO, "%s: read error", path);
    }
    if (n > max_bytes) {
        free(buf);
        return errf(e, ALBEDO_ERR_LIMIT, "%s: larger than %zu bytes", path, max_bytes);
    }
    buf[n] = 0;
    *out = buf;
    *len = n;
    return ALBEDO_OK;
}
