/*
 * fuzz_json_out.c — the JSON writers behind every REST response
 * (src/json_out.c): json_put_string on arbitrary bytes and json_put_double on
 * arbitrary doubles. What they write is read back with jansson: a string
 * must come back byte for byte (when it is valid UTF-8, which is all the
 * library ever passes: decoded text has U+FFFD for invalid bytes), a double
 * must come back as the same double, and non-finite values must be null.
 *
 * Input: byte 0 picks the writer (even: string, odd: doubles), the rest is
 * the string or a run of 8-byte doubles.
 */
#include <jansson.h>
#include <math.h>
#include <string.h>

#include "fuzz.h"
#include "session.h"

/* Internal to the library (json_out.c); not in a header. */
int json_put_string(buf *b, const char *s, size_t n);
int json_put_double(buf *b, double v);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    buf b = {0};
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    json_error_t je;
    if (!(data[0] & 1)) {
        if (json_put_string(&b, (const char *)p, n)) goto done; /* OOM */
        FUZZ_CHECK(b.len >= n + 2 && b.p[0] == '"' && b.p[b.len - 1] == '"', "not a quoted string");
        for (size_t i = 0; i < b.len; i++)
            FUZZ_CHECK((uint8_t)b.p[i] >= 0x20 && b.p[i] != 0x7f, "raw control byte 0x%02x in output",
                       (unsigned)(uint8_t)b.p[i]);
        if (fuzz_utf8_ok(p, n)) {
            json_t *j = json_loadb(b.p, b.len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
            FUZZ_CHECK(j && json_is_string(j), "output does not parse: %s", je.text);
            FUZZ_CHECK(json_string_length(j) == n && memcmp(json_string_value(j), p, n) == 0,
                       "string does not read back");
            json_decref(j);
        }
    } else {
        for (size_t i = 0; i + 8 <= n; i += 8) {
            double v;
            memcpy(&v, p + i, 8);
            b.len = 0;
            if (json_put_double(&b, v)) goto done;
            json_t *j = json_loadb(b.p, b.len, JSON_DECODE_ANY, &je);
            FUZZ_CHECK(j, "%.17g written as unparsable \"%.*s\": %s", v, (int)b.len, b.p, je.text);
            if (json_is_null(j)) {
                FUZZ_CHECK(!isfinite(v) || fabs(v) > 1e308, "finite %.17g written as null", v);
            } else {
                FUZZ_CHECK(json_is_real(j), "%.17g written as \"%.*s\", not a float", v, (int)b.len, b.p);
                FUZZ_CHECK(json_real_value(j) == v, "%.17g reads back as %.17g (\"%.*s\")", v, json_real_value(j),
                           (int)b.len, b.p);
            }
            json_decref(j);
        }
    }
done:
    free(b.p);
    return 0;
}
