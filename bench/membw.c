/*
 * membw.c — this machine's memory read bandwidth, the floor that decode is
 * measured against (PERFORMANCE.md): 1 GiB read with AVX-512 loads by 1
 * and 2 threads, with and without a software prefetch ahead; best of 5.
 *
 *   gcc -O2 -mavx512f -pthread bench/membw.c -o membw && ./membw
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

typedef struct part {
    const char *p;
    size_t n;
    int pf;
    float sum;
} part;

static void *read_part(void *arg) {
    part *a = arg;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (size_t i = 0; i < a->n; i += 256) {
        if (a->pf)
            for (int l = 0; l < 256; l += 64) _mm_prefetch(a->p + i + a->pf + l, _MM_HINT_T0);
        s0 = _mm512_add_ps(s0, _mm512_load_ps((const float *)(const void *)(a->p + i)));
        s1 = _mm512_add_ps(s1, _mm512_load_ps((const float *)(const void *)(a->p + i + 64)));
        s2 = _mm512_add_ps(s2, _mm512_load_ps((const float *)(const void *)(a->p + i + 128)));
        s3 = _mm512_add_ps(s3, _mm512_load_ps((const float *)(const void *)(a->p + i + 192)));
    }
    a->sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    return NULL;
}

static double best_gbs(const char *p, size_t n, int threads, int pf) {
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        pthread_t th[8];
        part a[8];
        double t0 = now_s();
        for (int i = 0; i < threads; i++) {
            a[i] = (part){p + n / threads * i, n / threads, pf, 0};
            pthread_create(&th[i], NULL, read_part, &a[i]);
        }
        for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
        double gbs = (double)n / (now_s() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

int main(void) {
    const size_t n = (size_t)1 << 30;
    char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    memset(p, 1, n);
    printf("| threads | prefetch ahead | GB/s (best of 5) |\n|---:|---:|---:|\n");
    for (int t = 1; t <= 2; t++)
        for (int pf = 0; pf <= 2048; pf += pf ? pf : 512) printf("| %d | %d | %.1f |\n", t, pf, best_gbs(p, n, t, pf));
    return 0;
}
