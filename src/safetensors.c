/*
 * safetensors.c — the safetensors container: parse, map, write.
 *
 * Layout: u64 little-endian header length N; N bytes of UTF-8 JSON mapping
 * tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
 * relative to the end of the header); then the data. Every field is checked:
 * offsets inside the file, end - begin == numel * element size, no overflow,
 * known dtypes, at most ST_MAX_DIMS dims. A file that fails any check is
 * rejected with a message naming the tensor.
 */
#define _POSIX_C_SOURCE 200809L
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER (100u << 20) /* same bound as the reference implementation */

struct st_file {
    void *map; /* mmap'ed file or NULL for memory buffers */
    size_t map_len;
    int n;
    st_tensor *t;
    char **meta; /* "__metadata__" string entries: key, value, key, value, ... */
    int n_meta;
};

static int parse_dtype(const char *s, dtype *out) {
    static const struct {
        const char *n;
        dtype t;
    } tab[] = {{"F32", DT_F32}, {"F16", DT_F16}, {"BF16", DT_BF16}, {"F64", DT_F64}, {"I8", DT_I8},    {"U8", DT_U8},
               {"I16", DT_I16}, {"U16", DT_U16}, {"I32", DT_I32},   {"I64", DT_I64}, {"BOOL", DT_BOOL}};
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++) {
        if (!strcmp(s, tab[i].n)) {
            *out = tab[i].t;
            return 0;
        }
    }
    return -1;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

static albedo_status parse(st_file *f, const uint8_t *buf, size_t len, errbuf *e) {
    if (len < 8) return errf(e, ALBEDO_ERR_MODEL_FORMAT, "safetensors: file too short (%zu bytes)", len);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = (hl << 8) | buf[i];
    if (hl > ST_MAX_HEADER || hl > len - 8)
        return errf(e, ALBEDO_ERR_MODEL_FORMAT,
                    "safetensors: header length %llu exceeds the file (%zu bytes): truncated or not a safetensors file",
                    (unsigned long long)hl, len);
    const uint8_t *data = buf + 8 + hl;
    size_t data_len = len - 8 - (size_t)hl;

    json_error_t je;
    json_t *root = json_loadb((const char *)buf + 8, (size_t)hl, JSON_REJECT_DUPLICATES, &je);
    if (!root) return errf(e, ALBEDO_ERR_MODEL_FORMAT, "safetensors: header is not valid JSON: %s", je.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return errf(e, ALBEDO_ERR_MODEL_FORMAT, "safetensors: header is not a JSON object");
    }
    size_t n = json_object_size(root);
    f->t = calloc(n ? n : 1, sizeof *f->t);
    if (!f->t) {
        json_decref(root);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "safetensors: out of memory");
    }
    albedo_status st = ALBEDO_OK;
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (!strcmp(key, "__metadata__")) {
            /* String entries only (the format's rule); others are ignored. */
            const char *mk;
            json_t *mv;
            size_t nm = json_is_object(v) ? json_object_size(v) : 0;
            f->meta = nm ? calloc(2 * nm, sizeof *f->meta) : NULL;
            if (nm && !f->meta) {
                st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "safetensors: out of memory");
                break;
            }
            if (nm) json_object_foreach(v, mk, mv) {
                    if (!json_is_string(mv)) continue;
                    f->meta[2 * f->n_meta] = strdup(mk);
                    f->meta[2 * f->n_meta + 1] = strdup(json_string_value(mv));
                    f->n_meta++;
                    if (!f->meta[2 * f->n_meta - 2] || !f->meta[2 * f->n_meta - 1]) {
                        st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "safetensors: out of memory");
                        break;
                    }
                }
            if (st) break;
            continue;
        }
        st_tensor *t = &f->t[f->n];
        t->name = strdup(key);
        if (!t->name) {
            st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "safetensors: out of memory");
            break;
        }
        f->n++;
        json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
               *jo = json_object_get(v, "data_offsets");
        if (!json_is_object(v) || !json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
            json_array_size(jo) != 2) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "safetensors: tensor %s: malformed entry", key);
            break;
        }
        if (parse_dtype(json_string_value(jd), &t->dt)) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "safetensors: tensor %s: unsupported dtype %s", key,
                      json_string_value(jd));
            break;
        }
        size_t nd = json_array_size(js);
        if (nd > ST_MAX_DIMS) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "safetensors: tensor %s: %zu dims (max %d)", key, nd, ST_MAX_DIMS);
            break;
        }
        t->ndim = (int)nd;
        uint64_t numel = 1;
        for (size_t d = 0; d < nd; d++) {
            json_t *x = json_array_get(js, d);
            if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) > ((json_int_t)1 << 40)) {
                st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "safetensors: tensor %s: invalid shape", key);
                break;
            }
            t->shape[d] = json_integer_value(x);
            if (t->shape[d] && numel > (UINT64_MAX >> 1) / (uint64_t)t->shape[d]) {
                st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "safetensors: tensor %s: shape overflows", key);
                break;
            }
            numel *= (uint64_t)t->shape[d];
        }
        if (st) break;
        json_t *a = json_array_get(jo, 0), *b = json_array_get(jo, 1);
        if (!json_is_integer(a) || !json_is_integer(b) || json_integer_value(a) < 0 ||
            json_integer_value(b) < json_integer_value(a) || (uint64_t)json_integer_value(b) > data_len) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "safetensors: tensor %s: data offsets outside the file (truncated?)",
                      key);
            break;
        }
        uint64_t nb = (uint64_t)(json_integer_value(b) - json_integer_value(a));
        if (numel > UINT64_MAX / 8 || nb != numel * dtype_size(t->dt)) {
            st = errf(e, ALBEDO_ERR_MODEL_FORMAT, "safetensors: tensor %s: %llu bytes of data for %llu elements of %s",
                      key, (unsigned long long)nb, (unsigned long long)numel, dtype_name(t->dt));
            break;
        }
        t->numel = (int64_t)numel;
        t->nbytes = (size_t)nb;
        t->data = data + json_integer_value(a);
    }
    json_decref(root);
    if (st) return st;
    qsort(f->t, (size_t)f->n, sizeof *f->t, cmp_name);
    return ALBEDO_OK;
}

albedo_status st_open_memory(const void *buf, size_t len, st_file **out, errbuf *e) {
    *out = NULL;
    st_file *f = calloc(1, sizeof *f);
    if (!f) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "safetensors: out of memory");
    albedo_status st = parse(f, buf, len, e);
    if (st) {
        st_close(f);
        return st;
    }
    *out = f;
    return ALBEDO_OK;
}

albedo_status st_open(const char *path, st_file **out, errbuf *e) {
    *out = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return errf(e, ALBEDO_ERR_IO, "%s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        close(fd);
        return errf(e, ALBEDO_ERR_IO, "%s: not a regular file", path);
    }
    size_t len = (size_t)sb.st_size;
    if (len < 8) {
        close(fd);
        return errf(e, ALBEDO_ERR_MODEL_FORMAT, "%s: file too short (%zu bytes)", path, len);
    }
    void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return errf(e, ALBEDO_ERR_IO, "%s: mmap: %s", path, strerror(errno));
    st_file *f = calloc(1, sizeof *f);
    if (!f) {
        munmap(map, len);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "safetensors: out of memory");
    }
    f->map = map;
    f->map_len = len;
    errbuf sub;
    albedo_status st = parse(f, map, len, &sub);
    if (st) {
        st_close(f);
        return errf(e, st, "%s: %s", path, sub.msg);
    }
    *out = f;
    return ALBEDO_OK;
}

void st_close(st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) free(f->t[i].name);
    free(f->t);
    for (int i = 0; i < 2 * f->n_meta; i++) free(f->meta[i]);
    free(f->meta);
    if (f->map) munmap(f->map, f->map_len);
    free(f);
}

int st_count(const st_file *f) { return f->n; }
const st_tensor *st_at(const st_file *f, int i) { return (i >= 0 && i < f->n) ? &f->t[i] : NULL; }

const st_tensor *st_find(const st_file *f, const char *name) {
    st_tensor key = {.name = (char *)name};
    return bsearch(&key, f->t, (size_t)f->n, sizeof *f->t, cmp_name);
}

const char *st_meta(const st_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta[2 * i], key)) return f->meta[2 * i + 1];
    return NULL;
}

albedo_status st_write(const char *path, const st_tensor *ts, int n, errbuf *e) {
    return st_write_meta(path, ts, n, NULL, 0, e);
}

albedo_status st_write_meta(const char *path, const st_tensor *ts, int n, const char *const *meta, int n_meta,
                            errbuf *e) {
    json_t *root = json_object();
    if (root && n_meta > 0) {
        json_t *m = json_object();
        for (int i = 0; i < n_meta && m; i++) json_object_set_new(m, meta[2 * i], json_string(meta[2 * i + 1]));
        if (m) json_object_set_new(root, "__metadata__", m);
    }
    uint64_t off = 0;
    for (int i = 0; i < n && root; i++) {
        json_t *shape = json_array();
        for (int d = 0; d < ts[i].ndim; d++) json_array_append_new(shape, json_integer(ts[i].shape[d]));
        json_t *offs = json_array();
        json_array_append_new(offs, json_integer((json_int_t)off));
        json_array_append_new(offs, json_integer((json_int_t)(off + ts[i].nbytes)));
        json_t *ent = json_object();
        json_object_set_new(ent, "dtype", json_string(dtype_name(ts[i].dt)));
        json_object_set_new(ent, "shape", shape);
        json_object_set_new(ent, "data_offsets", offs);
        json_object_set_new(root, ts[i].name, ent);
        off += ts[i].nbytes;
    }
    char *hdr = root ? json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(root);
    if (!hdr) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "safetensors: out of memory");
    size_t hl = strlen(hdr), pad = (8 - (hl % 8)) % 8; /* keep data 8-byte aligned */
    FILE *f = fopen(path, "wb");
    if (!f) {
        free(hdr);
        return errf(e, ALBEDO_ERR_IO, "%s: %s", path, strerror(errno));
    }
    uint64_t L = hl + pad;
    uint8_t lb[8];
    for (int i = 0; i < 8; i++) lb[i] = (uint8_t)(L >> (8 * i));
    int ok = fwrite(lb, 1, 8, f) == 8 && fwrite(hdr, 1, hl, f) == hl;
    for (size_t i = 0; i < pad && ok; i++) ok = fputc(' ', f) != EOF;
    for (int i = 0; i < n && ok; i++) ok = ts[i].nbytes == 0 || fwrite(ts[i].data, 1, ts[i].nbytes, f) == ts[i].nbytes;
    free(hdr);
    if (fclose(f) != 0) ok = 0;
    if (!ok) return errf(e, ALBEDO_ERR_IO, "%s: write failed", path);
    return ALBEDO_OK;
}
