/*
 * test_safetensors.c — the safetensors container: round trip through the
 * writer and reader, and every kind of corrupt file rejected with its own
 * message (never a crash or a read outside the buffer).
 */
#include "safetensors.h"
#include "test.h"

static albedo_status open_bytes(const void *b, size_t n, st_file **f, errbuf *e) { return st_open_memory(b, n, f, e); }

static size_t make(uint8_t *out, const char *hdr, size_t data_len) {
    size_t hl = strlen(hdr);
    for (int i = 0; i < 8; i++) out[i] = (uint8_t)((uint64_t)hl >> (8 * i));
    memcpy(out + 8, hdr, hl);
    memset(out + 8 + hl, 0x3c, data_len);
    return 8 + hl + data_len;
}

int main(void) {
    errbuf e;
    st_file *f = NULL;
    uint8_t buf[4096];

    /* round trip */
    uint16_t a[6] = {1, 2, 3, 4, 5, 6};
    float b[3] = {1.5f, -2.0f, 3.25f};
    st_tensor ts[2] = {{.name = "w", .dt = DT_BF16, .ndim = 2, .shape = {2, 3}, .numel = 6, .data = a, .nbytes = 12},
                       {.name = "b", .dt = DT_F32, .ndim = 1, .shape = {3}, .numel = 3, .data = b, .nbytes = 12}};
    char path[512];
    snprintf(path, sizeof path, "%s/test_rt.safetensors", ALBEDO_BINARY_DIR);
    CHECK(st_write(path, ts, 2, &e) == ALBEDO_OK, "write: %s", e.msg);
    CHECK(st_open(path, &f, &e) == ALBEDO_OK, "open: %s", e.msg);
    if (f) {
        CHECK(st_count(f) == 2, "count %d", st_count(f));
        const st_tensor *w = st_find(f, "w"), *bb = st_find(f, "b");
        CHECK(w && w->dt == DT_BF16 && w->ndim == 2 && w->shape[1] == 3 && !memcmp(w->data, a, 12), "w");
        CHECK(bb && bb->dt == DT_F32 && !memcmp(bb->data, b, 12), "b");
        CHECK(st_find(f, "nope") == NULL, "absent");
        CHECK(((uintptr_t)w->data % 8) == 0, "data is 8-byte aligned");
        st_close(f);
    }
    st_close(NULL);

    /* bad inputs: each with the expected status and message fragment */
    struct {
        const char *hdr;
        size_t data;
        const char *msg;
    } bad[] = {
        {"{\"x\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 16]}}", 8, "outside the file"},
        {"{\"x\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}", 8, "bytes of data for"},
        {"{\"x\": {\"dtype\": \"Q7\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 8, "unsupported dtype"},
        {"{\"x\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 8]}}", 8, "invalid shape"},
        {"{\"x\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [8, 0]}}", 8, "outside the file"},
        {"{\"x\": {\"dtype\": \"F32\", \"shape\": [2]}}", 8, "malformed"},
        {"{\"x\": 3}", 0, "malformed"},
        {"[1, 2]", 0, "not a JSON object"},
        {"{\"x\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], \"data_offsets\": [0, 4]}}", 4, "dims"},
        {"{\"x\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296], \"data_offsets\": [0, 4]}}", 4, "overflow"},
        {"{not json", 0, "not valid JSON"},
        {"{\"x\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}, \"x\": {\"dtype\": \"F32\", "
         "\"shape\": [1], \"data_offsets\": [0, 4]}}",
         4, "not valid JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t n = make(buf, bad[i].hdr, bad[i].data);
        e.msg[0] = 0;
        albedo_status st = open_bytes(buf, n, &f, &e);
        CHECK(st == ALBEDO_ERR_MODEL_FORMAT && f == NULL && strstr(e.msg, bad[i].msg), "case %zu: status %d msg '%s'",
              i, st, e.msg);
    }
    /* truncated: header length larger than the file */
    size_t n = make(buf, "{\"x\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4);
    for (size_t cut = 0; cut < n; cut += 7) {
        albedo_status st = open_bytes(buf, cut, &f, &e);
        CHECK(st == ALBEDO_ERR_MODEL_FORMAT, "truncated to %zu: status %d", cut, st);
    }
    /* unreadable path */
    CHECK(st_open("/nonexistent/model.safetensors", &f, &e) == ALBEDO_ERR_IO && strstr(e.msg, "No such file"), "%s",
          e.msg);
    CHECK(st_open(ALBEDO_SOURCE_DIR, &f, &e) == ALBEDO_ERR_IO, "directory: %s", e.msg);
    TEST_MAIN_END();
}
