/*
 * bench_ops.c — speed of the CPU ops at Moondream 2's shapes, printed as a
 * table: linear (GFLOP/s, and GB/s of weights read for decode), attention,
 * and the elementwise ops. Median of several runs after a warm-up.
 *
 *   bench_ops [threads=all] [backend=auto] [runs=7] [q]
 *
 * With "q", only the text linears over Q8 and Q4 weights (BF16 precision;
 * "b": the same over bf16 weights; "a": only the text attention, over
 * float32, bf16 and e4m3 caches),
 * and with a fifth argument only those whose name contains it
 * ("bench_ops 2 auto 5 q prefill"). ALBEDO_BENCH_CPU=1 times by the
 * process's CPU time instead of the wall clock (bench_ms, below).
 *
 * Build (the CPU backend alone), from the repository root on x86-64:
 *   gcc -std=c11 -O3 -Iinclude -Isrc -DALBEDO_X86=1 -c src/cpu/ops_avx2.c -mavx2 -mfma -mf16c
 *   gcc -std=c11 -O3 -Iinclude -Isrc -DALBEDO_X86=1 -c src/cpu/ops_avx512.c -mavx512f
 *       -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mavx512vnni -mfma -mf16c -mavx2
 *   gcc -std=c11 -O3 -Iinclude -Isrc -DALBEDO_X86=1 src/cpu/ops_ref.c src/cpu/ops_cpu.c src/cpu/ops_generic.c
 *       src/cpu/threadpool.c src/error.c bench/bench_ops.c ops_avx2.o ops_avx512.o -lm -lpthread
 *
 * Decode-sized linears (T <= 4) cycle through enough copies of the weights
 * (>= 256 MiB) that they come from memory, not from the last-level cache,
 * as in a real decode step. Pass -DALBEDO_COMMIT='"<hash>"' to have the
 * commit printed. On a machine shared with other work the best run is
 * printed beside the median: it is the one the others disturbed least.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu/cpu.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void fill(float *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        p[i] = (float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f + 1e-4f;
    }
}

static void cpu_name(char *out, size_t n) {
    snprintf(out, n, "unknown CPU");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "model name", 10)) {
            char *c = strchr(line, ':');
            if (c) {
                snprintf(out, n, "%s", c + 2);
                out[strcspn(out, "\n")] = 0;
            }
            break;
        }
    }
    fclose(f);
}

#ifndef ALBEDO_COMMIT
#define ALBEDO_COMMIT "unknown"
#endif

/* The clock of the timings: wall (now_ms), or with ALBEDO_BENCH_CPU=1 in
 * the environment the process's CPU time, which other work on a shared
 * machine disturbs far less (with one thread it is the op's own time; with
 * more it adds the threads' times, so compare at the same count). */
static int cpu_clock;
static double bench_ms(void) {
    if (!cpu_clock) return now_ms();
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int runs = 7;

static void bench_linear(ops_ctx *c, const char *what, int T, int K, int N, dtype dt, ops_precision prec) {
    const int q = dt == DT_Q8 || dt == DT_Q4;
    const size_t rb = q_row_bytes(dt, K);
    const size_t wbytes = q ? (size_t)N * rb : (size_t)N * K * (dt == DT_F32 ? 4 : 2);
    int copies = T <= 4 ? (int)((256u << 20) / wbytes) + 1 : 1;
    if (copies > 64) copies = 64;
    void **w = calloc((size_t)copies, sizeof *w);
    float *tmp = malloc((size_t)K * sizeof *tmp);
    for (int i = 0; i < copies; i++) {
        w[i] = malloc(wbytes);
        uint16_t *h = w[i];
        float *f = w[i];
        for (int n = 0; n < N; n++) {
            fill(tmp, (size_t)K, (unsigned)(n + 7 * i));
            if (q) {
                for (int k = 0; k < K; k++) tmp[k] *= 0.05f;
                q_quantize_row(dt, tmp, K, (char *)w[i] + (size_t)n * rb);
                continue;
            }
            for (int k = 0; k < K; k++) {
                if (dt == DT_F32)
                    f[(size_t)n * K + k] = tmp[k] * 0.05f;
                else if (dt == DT_BF16)
                    h[(size_t)n * K + k] = f32_to_bf16(tmp[k] * 0.05f);
                else
                    h[(size_t)n * K + k] = f32_to_f16(tmp[k] * 0.05f);
            }
        }
    }
    float *x = malloc((size_t)T * K * sizeof *x), *y = malloc((size_t)T * N * sizeof *y);
    fill(x, (size_t)T * K, 1);
    c->prec = prec;
    int reps = T <= 4 ? copies * 4 : runs;
    if (reps < runs) reps = runs;
    double *ms = malloc((size_t)reps * sizeof *ms);
    for (int r = -1; r < reps; r++) {
        op_linear L = {w[(r + copies) % copies], NULL, dt, DT_F32, N, K};
        double t0 = bench_ms();
        ops_of(c)->linear(c, y, N, x, K, T, &L);
        if (r >= 0) ms[r] = bench_ms() - t0;
    }
    double m = median(ms, reps), best = ms[0]; /* sorted by median() */
    printf("| %-22s | %4d | %5d | %5d | %-4s | %-4s | %8.3f | %8.1f | %8.1f | %6.1f | %6.1f |\n", what, T, K, N,
           dt == DT_BF16  ? "bf16"
           : dt == DT_F16 ? "f16"
           : dt == DT_Q8  ? "q8"
           : dt == DT_Q4  ? "q4"
                          : "f32",
           prec == OPS_BF16 ? "bf16" : "f32", m, 2.0 * T * K * N / (m * 1e6), 2.0 * T * K * N / (best * 1e6),
           wbytes / (m * 1e6), wbytes / (best * 1e6));
    for (int i = 0; i < copies; i++) free(w[i]);
    free(w), free(tmp), free(x), free(y), free(ms);
}

/* Decode (T = 1) cycles through copies of the keys and values, so that
 * they come from memory as a real KV cache does. */
static void bench_attention(ops_ctx *c, const char *what, int T, int S, int H, int D, int pos0, int n_prefix,
                            dtype kvdt) {
    const int copies = T == 1 ? 8 : 1;
    const size_t kv = (size_t)S * H * D, es = kv_elem_bytes(kvdt);
    float *q = malloc((size_t)T * H * D * 4), *o = malloc((size_t)T * H * D * 4);
    float *k = malloc(kv * copies * 4), *v = malloc(kv * copies * 4);
    fill(q, (size_t)T * H * D, 3), fill(k, kv * copies, 4), fill(v, kv * copies, 5);
    if (kvdt == DT_BF16) /* the same buffers as bf16 (the first half of each) */
        for (size_t i = 0; i < kv * copies; i++) {
            ((uint16_t *)(void *)k)[i] = f32_to_bf16(k[i]);
            ((uint16_t *)(void *)v)[i] = f32_to_bf16(v[i]);
        }
    if (kvdt == DT_E4M3) /* the same buffers as e4m3 bytes (the first quarter) */
        for (size_t i = 0; i < kv * copies; i++) {
            ((uint8_t *)(void *)k)[i] = f32_to_e4m3(k[i]);
            ((uint8_t *)(void *)v)[i] = f32_to_e4m3(v[i]);
        }
    double flops = 0;
    for (int t = 0; t < T; t++) {
        int p = pos0 + t, lim = p < n_prefix ? n_prefix : p + 1;
        flops += 4.0 * H * D * (lim < S ? lim : S);
    }
    int reps = T == 1 ? runs * 8 : runs;
    double *ms = malloc((size_t)reps * sizeof *ms);
    for (int r = -1; r < reps; r++) {
        const size_t off = kv * (size_t)((r + copies) % copies) * es;
        op_attn a = {T,
                     S,
                     H,
                     H,
                     D,
                     pos0,
                     n_prefix,
                     1.0f / sqrtf((float)D),
                     q,
                     (const char *)k + off,
                     (const char *)v + off,
                     o,
                     H * D,
                     H * D,
                     H * D,
                     H * D,
                     NULL,
                     0,
                     kvdt};
        double t0 = bench_ms();
        ops_of(c)->attention(c, &a);
        if (r >= 0) ms[r] = bench_ms() - t0;
    }
    double m = median(ms, reps);
    printf("| %-18s %4s | %4d | %5d | %2d | %3d | %8.3f | %8.1f | %8.1f |\n", what,
           kvdt == DT_E4M3   ? "e4m3"
           : kvdt == DT_BF16 ? "bf16"
                             : "f32",
           T, S, H, D, m, flops / (m * 1e6), flops / (ms[0] * 1e6));
    free(q), free(k), free(v), free(o), free(ms);
}

static void bench_ew(ops_ctx *c, const char *what, int kind, size_t n) {
    float *x = malloc(n * 4), *y = malloc(n * 4);
    fill(x, n, 9), fill(y, n, 10);
    double *ms = malloc((size_t)runs * sizeof *ms);
    for (int r = -1; r < runs; r++) {
        fill(x, n, 9);
        double t0 = bench_ms();
        if (kind == 0)
            ops_of(c)->gelu_tanh(c, x, n);
        else if (kind == 1)
            ops_of(c)->gelu_erf(c, x, n);
        else if (kind == 2)
            ops_of(c)->add(c, y, x, n);
        else {
            float *g = malloc(1152 * 4), *b = malloc(1152 * 4);
            fill(g, 1152, 1), fill(b, 1152, 2);
            t0 = bench_ms();
            ops_of(c)->layernorm(c, y, x, (int)(n / 1152), 1152, (op_vec){g, DT_F32}, (op_vec){b, DT_F32}, 1e-5f);
            free(g), free(b);
        }
        if (r >= 0) ms[r] = bench_ms() - t0;
    }
    double m = median(ms, runs);
    printf("| %-22s | %9zu | %9.3f | %8.2f |\n", what, n, m, n / (m * 1e6));
    free(x), free(y), free(ms);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 0;
    const char *backend = argc > 2 ? argv[2] : "auto";
    if (argc > 3) runs = atoi(argv[3]) > 0 ? atoi(argv[3]) : runs;
    const int only_q = argc > 4 && argv[4][0] == 'q'; /* only the Q8/Q4 linears */
    const int only_b = argc > 4 && argv[4][0] == 'b'; /* only the bf16 text linears */
    const int only_a = argc > 4 && argv[4][0] == 'a'; /* only the text attention */
    const char *only = argc > 5 ? argv[5] : NULL;     /* ... whose name contains this */
    const char *cc = getenv("ALBEDO_BENCH_CPU");
    cpu_clock = cc && cc[0] == '1';
    ops_ctx *c;
    errbuf e;
    if (ops_ctx_new(backend, threads, OPS_F32, &c, &e) != ALBEDO_OK) {
        fprintf(stderr, "bench_ops: %s\n", e.msg);
        return 1;
    }
    char cpu[256];
    cpu_name(cpu, sizeof cpu);
    printf("bench_ops: %s, %d threads, backend %s, median (and best) of %d runs, %s, commit %s, "
           "compiler %s\n\n",
           cpu, ops_n_threads(c), ops_backend_name(c), runs, cpu_clock ? "CPU time" : "wall clock", ALBEDO_COMMIT,
           __VERSION__);

    printf("| linear                 |    T |     K |     N | W    | prec |       ms |  GFLOP/s |"
           "     best |   GB/s |   best |\n");
    printf("|------------------------|-----:|------:|------:|------|------|---------:|---------:|"
           "---------:|-------:|-------:|\n");
    static const struct {
        const char *what;
        int T, K, N;
    } lin[] = {
        {"vision qkv", 729, 1152, 3456},       {"vision proj", 729, 1152, 1152},
        {"vision fc1", 729, 1152, 4304},       {"vision fc2", 729, 4304, 1152},
        {"text prefill qkv", 730, 2048, 6144}, {"text prefill fc1", 730, 2048, 8192},
        {"text prefill fc2", 730, 8192, 2048}, {"text prompt fc1", 20, 2048, 8192},
        {"decode fc1", 1, 2048, 8192},         {"decode fc2", 1, 8192, 2048},
        {"decode lm_head", 1, 2048, 51200},    {"decode fc1 T=4", 4, 2048, 8192},
    };
    if (only_a) {
        printf("| attention           kv  |    T |     S |  H |   D |       ms |  GFLOP/s |     best |\n");
        printf("|-------------------------|-----:|------:|---:|----:|---------:|---------:|---------:|\n");
        static const dtype kdt[] = {DT_F32, DT_BF16, DT_E4M3};
        for (int i = 0; i < 3; i++) bench_attention(c, "text prompt after image", 10, 740, 32, 64, 730, 730, kdt[i]);
        for (int i = 0; i < 3; i++) bench_attention(c, "decode", 1, 740, 32, 64, 739, 730, kdt[i]);
        for (int i = 0; i < 3; i++) bench_attention(c, "decode deep", 1, 2048, 32, 64, 2047, 730, kdt[i]);
        ops_ctx_free(c);
        return 0;
    }
    if (only_q || only_b) {
        /* block formats: prefill (integer products where the table has them) and decode */
        for (int d = only_b ? 2 : 0; d < 3; d++)
            for (size_t i = 4; i < sizeof lin / sizeof lin[0]; i++)
                if ((!only || strstr(lin[i].what, only)) && (d < 2) == only_q)
                    bench_linear(c, lin[i].what, lin[i].T, lin[i].K, lin[i].N,
                                 d == 2 ? DT_BF16
                                 : d    ? DT_Q4
                                        : DT_Q8,
                                 OPS_BF16);
        ops_ctx_free(c);
        return 0;
    }
    for (size_t i = 0; i < sizeof lin / sizeof lin[0]; i++)
        for (int p = OPS_F32; p <= OPS_BF16; p++)
            bench_linear(c, lin[i].what, lin[i].T, lin[i].K, lin[i].N, DT_BF16, (ops_precision)p);
    bench_linear(c, "vision fc1", 729, 1152, 4304, DT_F16, OPS_F32);
    bench_linear(c, "vision fc1", 729, 1152, 4304, DT_F32, OPS_F32);
    bench_linear(c, "decode fc1", 1, 2048, 8192, DT_F16, OPS_F32);

    printf("\n| attention           kv  |    T |     S |  H |   D |       ms |  GFLOP/s |     best "
           "|\n");
    printf("|-------------------------|-----:|------:|---:|----:|---------:|---------:|---------:|\n");
    bench_attention(c, "vision (bidirectional)", 729, 729, 16, 72, 0, 729, DT_F32);
    bench_attention(c, "text prefill", 730, 730, 32, 64, 0, 730, DT_F32);
    bench_attention(c, "text prefill", 730, 730, 32, 64, 0, 730, DT_BF16);
    bench_attention(c, "text prefill", 730, 730, 32, 64, 0, 730, DT_E4M3);
    bench_attention(c, "text prompt after image", 10, 740, 32, 64, 730, 730, DT_F32);
    bench_attention(c, "text prompt after image", 10, 740, 32, 64, 730, 730, DT_BF16);
    bench_attention(c, "text prompt after image", 10, 740, 32, 64, 730, 730, DT_E4M3);
    bench_attention(c, "decode", 1, 740, 32, 64, 739, 730, DT_F32);
    bench_attention(c, "decode", 1, 740, 32, 64, 739, 730, DT_BF16);
    bench_attention(c, "decode", 1, 740, 32, 64, 739, 730, DT_E4M3);
    bench_attention(c, "decode deep", 1, 2048, 32, 64, 2047, 730, DT_F32);
    bench_attention(c, "decode deep", 1, 2048, 32, 64, 2047, 730, DT_BF16);
    bench_attention(c, "decode deep", 1, 2048, 32, 64, 2047, 730, DT_E4M3);

    printf("\n| elementwise            |         n |        ms |  Gelem/s |\n");
    printf("|------------------------|----------:|----------:|---------:|\n");
    bench_ew(c, "gelu_tanh", 0, 729 * 4304);
    bench_ew(c, "gelu_erf", 1, 729 * 4304);
    bench_ew(c, "add", 2, 729 * 1152);
    bench_ew(c, "layernorm C=1152", 3, 729 * 1152);
    ops_ctx_free(c);
    return 0;
}
