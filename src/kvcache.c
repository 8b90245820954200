/*
 * kvcache.c — block pool, block tables and the image prefix cache (see
 * kvcache.h). All of it runs on the scheduler's thread: no locking here.
 */
#include "kvcache.h"

#include <stdlib.h>

size_t kv_block_bytes(int n_layers, int kvd, size_t elem, int block) {
    return (size_t)2 * n_layers * (size_t)kvd * (size_t)block * elem;
}

albedo_status kv_pool_init(kv_pool *p, int n_layers, int kvd, size_t elem, int block, size_t bytes, int min_blocks,
                           errbuf *e) {
    return kv_pool_init_mem(p, n_layers, kvd, elem, block, bytes, min_blocks, NULL, e);
}

albedo_status kv_pool_init_mem(kv_pool *p, int n_layers, int kvd, size_t elem, int block, size_t bytes, int min_blocks,
                               const kv_mem *mem, errbuf *e) {
    memset(p, 0, sizeof *p);
    size_t per = kv_block_bytes(n_layers, kvd, elem, block);
    size_t nb = bytes / per;
    if (nb < (size_t)min_blocks) nb = (size_t)min_blocks;
    if (nb > (1u << 24)) nb = 1u << 24;
    p->n_layers = n_layers;
    p->kvd = kvd;
    p->elem = elem;
    p->block = block;
    p->n_blocks = (int)nb;
    p->k = calloc((size_t)n_layers, sizeof *p->k);
    p->v = calloc((size_t)n_layers, sizeof *p->v);
    p->ref = calloc(nb, sizeof *p->ref);
    p->free_list = malloc(nb * sizeof *p->free_list);
    int ok = p->k && p->v && p->ref && p->free_list;
    if (ok && mem) {
        albedo_status st = mem->alloc(mem->user, (long)(nb * (size_t)block), p->k, p->v, &p->dev, e);
        if (st) {
            kv_pool_free(p);
            return st;
        }
        p->mem = *mem;
    }
    for (int l = 0; ok && !p->dev && l < n_layers; l++) {
        /* Pages never written are never faulted in: a large budget costs
         * address space, not memory, until it is used. */
        p->k[l] = big_alloc(nb * (size_t)block * (size_t)kvd * elem);
        p->v[l] = big_alloc(nb * (size_t)block * (size_t)kvd * elem);
        ok = p->k[l] && p->v[l];
    }
    if (!ok) {
        kv_pool_free(p);
        return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for a KV cache of %zu blocks (%zu MiB)", nb,
                    nb * per >> 20);
    }
    /* Hand out low block numbers first: they are the ones already touched. */
    for (size_t i = 0; i < nb; i++) p->free_list[i] = (int)(nb - 1 - i);
    p->n_free = (int)nb;
    return ALBEDO_OK;
}

void kv_pool_free(kv_pool *p) {
    if (p->dev) p->mem.free(p->dev);
    for (int l = 0; !p->dev && l < p->n_layers; l++) {
        if (p->k) free(p->k[l]);
        if (p->v) free(p->v[l]);
    }
    free(p->k);
    free(p->v);
    free(p->ref);
    free(p->free_list);
    memset(p, 0, sizeof *p);
}

static int pool_take(kv_pool *p) {
    if (!p->n_free) return -1;
    int b = p->free_list[--p->n_free];
    p->ref[b] = 1;
    return b;
}

static void pool_put(kv_pool *p, int b) {
    if (--p->ref[b] == 0) p->free_list[p->n_free++] = b;
}

static int seq_grow(kv_seq *s, int n) {
    if (n <= s->cap) return 0;
    int nc = s->cap ? s->cap : 8;
    while (nc < n) nc *= 2;
    int32_t *q = realloc(s->blocks, (size_t)nc * sizeof *q);
    if (!q) return -1;
    s->blocks = q;
    s->cap = nc;
    return 0;
}

int kv_seq_reserve(kv_pool *p, kv_seq *s, int n_pos) {
    int need = kv_blocks_for(p, n_pos);
    if (need <= s->n_blocks) return 0;
    if (need - s->n_blocks > p->n_free || seq_grow(s, need)) return -1;
    while (s->n_blocks < need) s->blocks[s->n_blocks++] = pool_take(p);
    return 0;
}

void kv_seq_release(kv_pool *p, kv_seq *s) {
    for (int i = 0; i < s->n_blocks; i++) pool_put(p, s->blocks[i]);
    free(s->blocks);
    memset(s, 0, sizeof *s);
}

int kv_seq_fork(kv_pool *p, kv_seq *s, const kv_seq *src, int n_pos) {
    const int full = n_pos / p->block, part = n_pos % p->block, nb = full + (part > 0);
    if ((part > 0 && p->n_free < 1) || seq_grow(s, nb)) return -1;
    for (int i = 0; i < full; i++) {
        s->blocks[i] = src->blocks[i];
        p->ref[src->blocks[i]]++;
    }
    s->n_blocks = full;
    if (part && p->dev) {
        int b = pool_take(p);
        if (p->mem.copy(p->dev, (long)b * p->block, (long)src->blocks[full] * p->block, part)) {
            pool_put(p, b);
            kv_seq_release(p, s);
            return -1;
        }
        s->blocks[s->n_blocks++] = b;
    } else if (part) {
        int b = pool_take(p);
        const size_t row = (size_t)p->kvd * p->elem, blk = (size_t)p->block * row;
        for (int l = 0; l < p->n_layers; l++) {
            char *k = p->k[l], *v = p->v[l];
            memcpy(k + (size_t)b * blk, k + (size_t)src->blocks[full] * blk, (size_t)part * row);
            memcpy(v + (size_t)b * blk, v + (size_t)src->blocks[full] * blk, (size_t)part * row);
        }
        s->blocks[s->n_blocks++] = b;
    }
    return 0;
}

/* ---- prefix cache ------------------------------------------------------------ */

void kv_prefix_init(kv_prefix_cache *c) { memset(c, 0, sizeof *c); }

void kv_prefix_free(kv_pool *p, kv_prefix_cache *c) {
    for (int i = 0; i < c->n; i++) kv_seq_release(p, &c->e[i].seq);
    free(c->e);
    memset(c, 0, sizeof *c);
}

kv_prefix *kv_prefix_find(kv_prefix_cache *c, const uint64_t key[2]) {
    for (int i = 0; i < c->n; i++) {
        if (c->e[i].key[0] == key[0] && c->e[i].key[1] == key[1]) {
            c->e[i].last_use = ++c->clock;
            c->hits++;
            return &c->e[i];
        }
    }
    c->misses++;
    return NULL;
}

int kv_prefix_put(kv_pool *p, kv_prefix_cache *c, const uint64_t key[2], const kv_seq *seq, int n_pos) {
    if (c->n == c->cap) {
        int nc = c->cap ? c->cap * 2 : 16;
        kv_prefix *q = realloc(c->e, (size_t)nc * sizeof *q);
        if (!q) return -1;
        c->e = q;
        c->cap = nc;
    }
    kv_prefix *x = &c->e[c->n];
    memset(x, 0, sizeof *x);
    /* The entry holds whole blocks only, shared with seq. A partly filled
     * last block is shared too: sequences that fork from the entry copy it
     * before writing (kv_seq_fork), and seq itself writes only past n_pos. */
    int nb = kv_blocks_for(p, n_pos);
    if (seq_grow(&x->seq, nb)) return -1;
    for (int i = 0; i < nb; i++) {
        x->seq.blocks[i] = seq->blocks[i];
        p->ref[seq->blocks[i]]++;
    }
    x->seq.n_blocks = nb;
    x->key[0] = key[0];
    x->key[1] = key[1];
    x->n_pos = n_pos;
    x->last_use = ++c->clock;
    c->n++;
    return 0;
}

int kv_prefix_evict(kv_pool *p, kv_prefix_cache *c, int need) {
    while (p->n_free < need) {
        int victim = -1;
        for (int i = 0; i < c->n; i++)
            if (!c->e[i].pinned && (victim < 0 || c->e[i].last_use < c->e[victim].last_use)) victim = i;
        if (victim < 0) break;
        kv_seq_release(p, &c->e[victim].seq);
        c->e[victim] = c->e[--c->n];
        c->evictions++;
    }
    return p->n_free;
}

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void kv_hash(const void *data, size_t len, uint64_t seed, uint64_t out[2]) {
    const unsigned char *b = data;
    uint64_t h0 = 0xCBF29CE484222325ull ^ seed, h1 = 0x84222325CBF29CE4ull ^ mix64(seed + 1);
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, 8);
        h0 = (h0 ^ w) * 0x100000001B3ull;
        h1 = mix64(h1 ^ w);
    }
    for (; i < len; i++) {
        h0 = (h0 ^ b[i]) * 0x100000001B3ull;
        h1 = mix64(h1 ^ b[i]);
    }
    out[0] = mix64(h0 ^ len);
    out[1] = mix64(h1 + len);
}
