/*
 * safetensors.h — reading and writing the safetensors container.
 *
 * A file is an 8-byte little-endian header length N, N bytes of JSON
 * ({"name": {"dtype": "BF16", "shape": [..], "data_offsets": [a, b]}, ...,
 * optional "__metadata__"}), then the raw tensor bytes. Files are
 * memory-mapped; the parser checks every offset, shape and size against the
 * file so that a corrupt or truncated file is an error, never a wild read.
 */
#ifndef ALBEDO_SAFETENSORS_H
#define ALBEDO_SAFETENSORS_H

#include "common.h"

#define ST_MAX_DIMS 8

typedef struct st_tensor {
    char *name;
    dtype dt;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    const void *data; /* into the mapping; aligned as the file is */
    size_t nbytes;
} st_tensor;

typedef struct st_file st_file;

/* Map and parse a file. */
albedo_status st_open(const char *path, st_file **out, errbuf *e);
/* Parse a buffer in memory (borrowed: it must outlive the st_file). */
albedo_status st_open_memory(const void *buf, size_t len, st_file **out, errbuf *e);
void st_close(st_file *f);

int st_count(const st_file *f);
const st_tensor *st_at(const st_file *f, int i);
const st_tensor *st_find(const st_file *f, const char *name); /* NULL if absent */

/* The string value of key in the header's "__metadata__", or NULL. */
const char *st_meta(const st_file *f, const char *key);

/* Write tensors to a new file (tensors' data pointers are read). */
albedo_status st_write(const char *path, const st_tensor *ts, int n, errbuf *e);
/* The same with "__metadata__" entries meta[2i] = meta[2i + 1], i < n_meta. */
albedo_status st_write_meta(const char *path, const st_tensor *ts, int n, const char *const *meta, int n_meta,
                            errbuf *e);

#endif
