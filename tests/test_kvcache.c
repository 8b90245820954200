/*
 * test_kvcache.c — block accounting of the paged KV cache: thousands of
 * random sequences that grow, fork from cached prefixes, get cancelled or
 * finish, with prefix entries added and evicted under pressure; afterwards
 * every block is free again, and forks see exactly their source's rows.
 */
#include "kvcache.h"
#include "test.h"

static uint64_t rng = 88172645463325252ull;
static int rnd(int n) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (int)(rng % (uint64_t)n);
}

static void fill(kv_pool *p, const kv_seq *s, int from, int to, float tag) {
    for (int l = 0; l < p->n_layers; l++)
        for (int pos = from; pos < to; pos++) {
            ((float *)kv_row(p, p->k, l, s, pos))[0] = tag + (float)pos;
            ((float *)kv_row(p, p->v, l, s, pos))[p->kvd - 1] = -tag - (float)pos;
        }
}

static int rows_ok(kv_pool *p, const kv_seq *s, int n, float tag) {
    for (int l = 0; l < p->n_layers; l++)
        for (int pos = 0; pos < n; pos++)
            if (((float *)kv_row(p, p->k, l, s, pos))[0] != tag + (float)pos ||
                ((float *)kv_row(p, p->v, l, s, pos))[p->kvd - 1] != -tag - (float)pos)
                return 0;
    return 1;
}

int main(void) {
    errbuf e;
    kv_pool p;
    const int block = 16, kvd = 8, layers = 2;
    CHECK(kv_pool_init(&p, layers, kvd, sizeof(float), block, kv_block_bytes(layers, kvd, sizeof(float), block) * 64, 1,
                       &e) == ALBEDO_OK,
          "%s", e.msg);
    CHECK(p.n_blocks == 64 && p.n_free == 64, "pool of %d blocks, %d free", p.n_blocks, p.n_free);

    /* fork: whole blocks shared, the partial block copied */
    kv_seq a = {0}, b = {0};
    CHECK(kv_seq_reserve(&p, &a, 40) == 0 && a.n_blocks == 3, "reserve");
    fill(&p, &a, 0, 40, 1000);
    CHECK(kv_seq_fork(&p, &b, &a, 37) == 0 && b.n_blocks == 3, "fork");
    CHECK(b.blocks[0] == a.blocks[0] && b.blocks[1] == a.blocks[1] && b.blocks[2] != a.blocks[2], "sharing");
    CHECK(rows_ok(&p, &b, 37, 1000), "forked rows");
    CHECK(kv_seq_reserve(&p, &b, 60) == 0, "grow fork");
    fill(&p, &b, 37, 60, 5000); /* writes into b's own blocks only */
    CHECK(rows_ok(&p, &a, 40, 1000), "source untouched by the fork's writes");
    kv_seq_release(&p, &a);
    CHECK(rows_ok(&p, &b, 37, 1000), "fork survives the source");
    kv_seq_release(&p, &b);
    CHECK(p.n_free == 64, "all free after forks: %d", p.n_free);

    /* exhaustion: reserve fails without allocating */
    kv_seq big = {0};
    CHECK(kv_seq_reserve(&p, &big, 64 * block + 1) == -1 && p.n_free == 64 && big.n_blocks == 0, "over-reserve");
    kv_seq_release(&p, &big);

    /* random workload with a prefix cache */
    kv_prefix_cache pc;
    kv_prefix_init(&pc);
    kv_seq live[8] = {{0}};
    int len[8] = {0};
    long ops = 0, fails = 0;
    for (int it = 0; it < 5000; it++) {
        int i = rnd(8);
        switch (rnd(4)) {
        case 0: { /* start from a cached prefix (or make one) */
            if (live[i].n_blocks) break;
            uint64_t key[2] = {(uint64_t)rnd(6), 7};
            kv_prefix *x = kv_prefix_find(&pc, key);
            if (x) {
                x->pinned = 1;
                if (kv_prefix_evict(&p, &pc, 1) < 1 || kv_seq_fork(&p, &live[i], &x->seq, x->n_pos))
                    fails++;
                else {
                    len[i] = x->n_pos;
                    CHECK(rows_ok(&p, &live[i], len[i], (float)key[0] * 100000), "prefix rows");
                }
                x->pinned = 0;
            } else {
                int n = 20 + rnd(30);
                kv_prefix_evict(&p, &pc, kv_blocks_for(&p, n));
                if (kv_seq_reserve(&p, &live[i], n)) {
                    fails++;
                    break;
                }
                fill(&p, &live[i], 0, n, (float)key[0] * 100000);
                len[i] = n;
                kv_prefix_put(&p, &pc, key, &live[i], n);
            }
            break;
        }
        case 1: /* decode a few steps */
            if (!live[i].n_blocks) break;
            kv_prefix_evict(&p, &pc, 1);
            if (kv_seq_reserve(&p, &live[i], len[i] + 3) == 0)
                len[i] += 3;
            else
                fails++;
            break;
        default: /* finish or cancel */
            kv_seq_release(&p, &live[i]);
            len[i] = 0;
            break;
        }
        ops++;
    }
    for (int i = 0; i < 8; i++) kv_seq_release(&p, &live[i]);
    kv_prefix_free(&p, &pc);
    CHECK(p.n_free == p.n_blocks, "leak: %d of %d blocks free after %ld operations (%ld refused)", p.n_free, p.n_blocks,
          ops, fails);
    int bad_ref = 0;
    for (int bl = 0; bl < p.n_blocks; bl++) bad_ref += p.ref[bl] != 0;
    CHECK(bad_ref == 0, "%d blocks still referenced", bad_ref);
    kv_pool_free(&p);

    uint64_t h1[2], h2[2], h3[2];
    kv_hash("abc", 3, 0, h1);
    kv_hash("abc", 3, 0, h2);
    kv_hash("abd", 3, 0, h3);
    CHECK(h1[0] == h2[0] && h1[1] == h2[1] && (h1[0] != h3[0] || h1[1] != h3[1]), "hash");
    TEST_MAIN_END();
}
