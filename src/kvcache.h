/*
 * kvcache.h — the paged KV cache: fixed-size blocks of positions in one pool
 * per layer, per-sequence block tables, reference counts so that sequences
 * share an image's prefix blocks, and the prefix cache that keeps encoded
 * image prefixes for later requests (least recently used evicted first).
 *
 *   pool, per layer:  K [n_blocks · block, Hkv·D]   V [n_blocks · block, Hkv·D]
 *   sequence:         blocks[] → position p lives in row blocks[p / block]·block + p % block
 */
#ifndef ALBEDO_KVCACHE_H
#define ALBEDO_KVCACHE_H

#include "common.h"

/* Where a pool's planes live when not in host memory (the CUDA engine,
 * backend_cuda.c): alloc makes k[l], v[l] [n_rows, kvd] each and a handle,
 * copy copies rows within every plane (returning when done), free frees. */
typedef struct kv_mem {
    void *user;
    albedo_status (*alloc)(void *user, long n_rows, void **k, void **v, void **handle, errbuf *e);
    int (*copy)(void *handle, long dst_row, long src_row, int n_rows); /* 0 or -1 */
    void (*free)(void *handle);
} kv_mem;

typedef struct kv_pool {
    int n_layers, kvd, block, n_blocks;
    size_t elem;   /* bytes per element: 4 (float32) or 2 (bf16), the model's kv_dt */
    void **k, **v; /* per layer [n_blocks * block, kvd]: host memory, or device memory with dev */
    kv_mem mem;    /* device hooks when dev is not NULL */
    void *dev;     /* the device allocation's handle, or NULL */
    int *ref;      /* per block: holders (sequences and prefix entries) */
    int *free_list;
    int n_free;
} kv_pool;

/* A pool of as many blocks as fit in bytes (at least min_blocks), of
 * elements of elem bytes. */
albedo_status kv_pool_init(kv_pool *p, int n_layers, int kvd, size_t elem, int block, size_t bytes, int min_blocks,
                           errbuf *e);
/* The same in the memory of mem (NULL: host memory). A device pool's rows
 * are never touched by the host: kv_seq_fork copies through mem.copy. */
albedo_status kv_pool_init_mem(kv_pool *p, int n_layers, int kvd, size_t elem, int block, size_t bytes, int min_blocks,
                               const kv_mem *mem, errbuf *e);
void kv_pool_free(kv_pool *p);
size_t kv_block_bytes(int n_layers, int kvd, size_t elem, int block);

/* A sequence's block table. */
typedef struct kv_seq {
    int32_t *blocks;
    int n_blocks, cap;
} kv_seq;

/* Make room for positions [0, n_pos): allocates blocks as needed. Returns 0,
 * or -1 when the pool has too few free blocks (nothing is allocated then). */
int kv_seq_reserve(kv_pool *p, kv_seq *s, int n_pos);
/* Give every block back (the ones shared with others stay alive). */
void kv_seq_release(kv_pool *p, kv_seq *s);
/* Start s as a copy of the first n_pos positions of src: whole blocks are
 * shared, a partly filled last block is copied (copy on write), so that s can
 * append without touching src. Returns 0, or -1 when no block is free (or a
 * device copy failed). */
int kv_seq_fork(kv_pool *p, kv_seq *s, const kv_seq *src, int n_pos);
/* Blocks needed for n_pos positions. */
static inline int kv_blocks_for(const kv_pool *p, int n_pos) { return (n_pos + p->block - 1) / p->block; }

/* Row of position pos in layer l's K or V pool. */
static inline void *kv_row(const kv_pool *p, void *const *base, int l, const kv_seq *s, int pos) {
    return (char *)base[l] +
           ((size_t)s->blocks[pos / p->block] * (size_t)p->block + (size_t)(pos % p->block)) * (size_t)p->kvd * p->elem;
}

/* ---- prefix cache: encoded image prefixes by content key ------------------ */

typedef struct kv_prefix {
    uint64_t key[2]; /* 128-bit content key */
    kv_seq seq;
    int n_pos;
    uint64_t last_use;
    int pinned; /* in use by a sequence being built */
} kv_prefix;

typedef struct kv_prefix_cache {
    kv_prefix *e;
    int n, cap;
    uint64_t clock;
    uint64_t hits, misses, evictions;
} kv_prefix_cache;

void kv_prefix_init(kv_prefix_cache *c);
void kv_prefix_free(kv_pool *p, kv_prefix_cache *c);
/* The entry for key, or NULL. A hit refreshes its recency. */
kv_prefix *kv_prefix_find(kv_prefix_cache *c, const uint64_t key[2]);
/* Keep n_pos positions of seq under key (the entry shares seq's blocks). */
int kv_prefix_put(kv_pool *p, kv_prefix_cache *c, const uint64_t key[2], const kv_seq *seq, int n_pos);
/* Evict least recently used, unpinned entries until need blocks are free or
 * nothing is left to evict. Returns the number of free blocks then. */
int kv_prefix_evict(kv_pool *p, kv_prefix_cache *c, int need);

/* 128-bit content hash (two independent 64-bit FNV-style lanes mixed with
 * splitmix), for prefix keys. */
void kv_hash(const void *data, size_t len, uint64_t seed, uint64_t out[2]);

#endif
