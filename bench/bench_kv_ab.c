/*
 * bench_kv_ab.c — decode steps with and without the fp8 KV cache, for a
 * machine shared with other work: two models in one process (the same
 * weights, BF16 precision, 2 threads; one with kv_dtype "fp8"), the same
 * 740-position context, then single decode steps at depth 740 alternated
 * one by one (which model goes first alternates too), so that the other
 * work's load falls on both alike. Prints each model's median, 25th
 * percentile and best step.
 *
 *   bench_kv_ab MODEL_DIR q4|q8|bf16 STEPS
 *
 * Build (from the repository root, after a Release build in build/):
 *   gcc -O2 -Iinclude -Isrc bench/bench_kv_ab.c build/libalbedo.a -o bench_kv_ab -lm -lpthread \
 *       -lz -ljpeg -lpng -lwebp -lgif -ljansson -lpcre2-8 -lutf8proc -ldl
 */
#include <stdio.h>
#include <stdlib.h>

#include "session.h"

static int cmp_ms(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 4 || atoi(argv[3]) < 1) {
        fprintf(stderr, "usage: bench_kv_ab MODEL_DIR q4|q8|bf16 STEPS\n");
        return 2;
    }
    const char *dir = argv[1], *weights = argv[2];
    const int steps = atoi(argv[3]);
    albedo_model *m[2] = {0};
    md_state s[2];
    errbuf e;
    for (int k = 0; k < 2; k++) {
        albedo_model_params p = albedo_model_params_default();
        p.n_threads = 2;
        p.precision = ALBEDO_PRECISION_BF16;
        p.weights = weights;
        p.kv_dtype = k ? "fp8" : NULL;
        if (albedo_model_load(dir, &p, &m[k]) != ALBEDO_OK) return fprintf(stderr, "%s\n", albedo_last_error()), 1;
        if (md_state_init(&s[k], m[k], &e) != ALBEDO_OK) return fprintf(stderr, "%s\n", e.msg), 1;
    }
    const md_config *c = &m[0]->cfg;
    const int n_pos = c->prefix_attn, depth = n_pos + 10;
    float *emb = malloc((size_t)n_pos * c->dim * sizeof(float));
    double *t[2] = {malloc((size_t)steps * sizeof(double)), malloc((size_t)steps * sizeof(double))};
    if (!emb || !t[0] || !t[1]) return fprintf(stderr, "out of memory\n"), 1;
    for (int i = 0; i < n_pos; i++) text_embed(m[0], (int32_t)((i * 7919) % c->vocab), emb + (size_t)i * c->dim);
    for (int k = 0; k < 2; k++) /* the context (as albedo bench builds it), then one warm-up step */
        if (text_forward(&s[k], emb, n_pos, 0, n_pos, 0, &e) ||
            text_forward(&s[k], emb, depth - n_pos, n_pos, n_pos, 1, &e) ||
            text_forward(&s[k], emb, 1, depth, n_pos, 1, &e))
            return fprintf(stderr, "%s\n", e.msg), 1;
    for (int r = 0; r < steps; r++)
        for (int i = 0; i < 2; i++) {
            const int k = r & 1 ? 1 - i : i;
            const double t0 = now_ms();
            if (text_forward(&s[k], emb + (size_t)(r % 16) * c->dim, 1, depth, n_pos, 1, &e))
                return fprintf(stderr, "%s\n", e.msg), 1;
            t[k][r] = now_ms() - t0;
        }
    for (int k = 0; k < 2; k++) {
        qsort(t[k], (size_t)steps, sizeof(double), cmp_ms);
        printf("%s, %s cache: median %.2f ms (%.2f tok/s), p25 %.2f ms, best %.2f ms\n", weights, k ? "fp8 " : "bf16",
               t[k][steps / 2], 1000.0 / t[k][steps / 2], t[k][steps / 4], t[k][0]);
        md_state_free(&s[k]);
        albedo_model_free(m[k]);
        free(t[k]);
    }
    free(emb);
    return 0;
}
