/*
 * bench_chartqa.c — `albedo bench chartqa`: the ChartQA workload of
 * spec/performance.md §1 through the asynchronous engine.
 *
 * Chart-like images are rendered here (axes, bars, a line series, rows of
 * text-like blocks) at ChartQA's typical sizes and written as PNG bytes,
 * zlib-compressed as ChartQA's are; each gets two questions (~40-token prompts with a BPE vocabulary like
 * Moondream's: --tokenizer with the repository's GPT-2 one; the synthetic
 * model's byte-level tokenizer makes them about three times longer), so the
 * second can reuse the first's cached image prefix. Outputs have forced lengths so that random
 * weights give the real ones: direct = 3 tokens; CoT = reasoning with
 * max_tokens 15 for the reasoning and 15 for the answer, ~30 tokens. All
 * requests are queued at once; per max batch size the table gives req/s
 * (completed / wall time), P50 / P95 latency from prefill start (the
 * request's admission) to its last token, queue wait excluded, the mean
 * number of sequences per forward step, and the share of steps that ran
 * while the image worker was encoding a chart (the decodes that went on
 * meanwhile rather than waiting for the vision encoder).
 *
 * Warm-up (--warmup N, by default 8 on a GPU model and none on the CPU):
 * before each row's timed requests, the row's engine serves N untimed
 * requests on other charts of the same sizes with the same questions, so
 * that what a process does once (the image worker's threads and device
 * memory, CUDA's lazy loading of the kernels each new shape picks: ~250 ms
 * of the first 64 requests at batch 1 on an H100) stays out of the figures,
 * as spec/performance.md §5 asks (time after warm-up). --warmup 0 shows a
 * cold process.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zlib.h>

#include "albedo.h"
#include "bench_chartqa.h"

static double albedo_bench_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ---- a PNG writer ------------------------------------------------------------- */

typedef struct bytes {
    uint8_t *p;
    size_t n, cap;
} bytes;

static int put(bytes *b, const void *d, size_t n) {
    if (b->n + n > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 4096;
        while (nc < b->n + n) nc *= 2;
        uint8_t *q = realloc(b->p, nc);
        if (!q) return -1;
        b->p = q;
        b->cap = nc;
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
    return 0;
}

static int put_be32(bytes *b, uint32_t v) {
    uint8_t x[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    return put(b, x, 4);
}

static int chunk(bytes *b, const char *type, const uint8_t *d, size_t n) {
    if (put_be32(b, (uint32_t)n) || put(b, type, 4) || (n && put(b, d, n))) return -1;
    uLong crc = crc32(0L, (const Bytef *)type, 4);
    if (n) crc = crc32(crc, d, (uInt)n);
    return put_be32(b, (uint32_t)crc);
}

/* RGB rows as a PNG compressed by zlib at its default level, as the PNGs
 * of ChartQA (plotting libraries' output) are: the decoder's inflate is part
 * of a cold chart's host time. */
static int png_rgb(const uint8_t *rgb, int w, int h, bytes *out) {
    bytes raw = {0};
    int rc = 0;
    for (int y = 0; y < h && !rc; y++) rc = put(&raw, "\0", 1) || put(&raw, rgb + (size_t)y * w * 3, (size_t)w * 3);
    uLongf zn = compressBound((uLong)raw.n);
    uint8_t *z = rc ? NULL : malloc(zn);
    rc = rc || !z || compress2(z, &zn, raw.p, (uLong)raw.n, Z_DEFAULT_COMPRESSION) != Z_OK;
    static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    uint8_t ihdr[13] = {(uint8_t)(w >> 24),
                        (uint8_t)(w >> 16),
                        (uint8_t)(w >> 8),
                        (uint8_t)w,
                        (uint8_t)(h >> 24),
                        (uint8_t)(h >> 16),
                        (uint8_t)(h >> 8),
                        (uint8_t)h,
                        8,
                        2,
                        0,
                        0,
                        0};
    rc = rc || put(out, sig, 8) || chunk(out, "IHDR", ihdr, 13) || chunk(out, "IDAT", z, zn) ||
         chunk(out, "IEND", NULL, 0);
    free(raw.p);
    free(z);
    return rc;
}

/* ---- chart rendering ------------------------------------------------------------ */

static uint32_t rnd(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*s >> 33);
}

static void fill(uint8_t *im, int w, int h, int x0, int y0, int x1, int y1, const uint8_t c[3]) {
    for (int y = y0 < 0 ? 0 : y0; y < y1 && y < h; y++)
        for (int x = x0 < 0 ? 0 : x0; x < x1 && x < w; x++) memcpy(im + ((size_t)y * w + x) * 3, c, 3);
}

/* A bar chart with a line series, a title and axis labels as text-like blocks. */
static uint8_t *render_chart(int w, int h, uint64_t seed) {
    uint8_t *im = malloc((size_t)w * h * 3);
    if (!im) return NULL;
    memset(im, 255, (size_t)w * h * 3);
    uint64_t s = seed;
    const uint8_t ink[3] = {40, 40, 40}, grid[3] = {225, 225, 225};
    const int L = w / 10, R = w - w / 20, T = h / 8, B = h - h / 8;
    for (int k = 0; k < 5; k++) fill(im, w, h, L, T + k * (B - T) / 5, R, T + k * (B - T) / 5 + 1, grid);
    fill(im, w, h, L, T, L + 2, B, ink);
    fill(im, w, h, L, B, R, B + 2, ink);
    /* title: words of text-like blocks */
    for (int x = w / 4; x < 3 * w / 4;) {
        int ww = 8 + (int)(rnd(&s) % 40);
        fill(im, w, h, x, T / 3, x + ww, T / 3 + 12, ink);
        x += ww + 8;
    }
    const int n_bars = 4 + (int)(rnd(&s) % 8);
    uint8_t col[3] = {(uint8_t)(rnd(&s) % 200), (uint8_t)(rnd(&s) % 200), (uint8_t)(rnd(&s) % 200)};
    int prev_x = -1, prev_y = -1;
    for (int i = 0; i < n_bars; i++) {
        int slot = (R - L) / n_bars, x0 = L + i * slot + slot / 5, x1 = x0 + slot * 3 / 5;
        int y0 = B - (int)(rnd(&s) % (uint32_t)(B - T - 10)) - 5;
        fill(im, w, h, x0, y0, x1, B, col);
        /* value label and category label */
        fill(im, w, h, x0 + 2, y0 - 14, x0 + 2 + 6 * (1 + (int)(rnd(&s) % 3)), y0 - 4, ink);
        fill(im, w, h, x0, B + 8, x0 + 6 * (2 + (int)(rnd(&s) % 5)), B + 18, ink);
        /* the line series: a thick polyline through random points */
        int px = (x0 + x1) / 2, py = T + (int)(rnd(&s) % (uint32_t)(B - T));
        if (prev_x >= 0)
            for (int k = 0; k <= 64; k++) {
                int x = prev_x + (px - prev_x) * k / 64, y = prev_y + (py - prev_y) * k / 64;
                fill(im, w, h, x - 2, y - 2, x + 2, y + 2, (const uint8_t[3]){220, 60, 40});
            }
        prev_x = px;
        prev_y = py;
    }
    return im;
}

/* ---- the workload ------------------------------------------------------------------ */

typedef struct job {
    int image;
    char question[256];
} job;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *sorted, int n, double p) {
    if (n <= 0) return 0;
    int i = (int)(p * (n - 1) + 0.5);
    return sorted[i];
}

/* The request of job j in mode cot (its question written into q). */
static albedo_request make_request(const job *j, int cot, char *q, size_t q_cap) {
    albedo_request r = albedo_request_default(ALBEDO_SKILL_QUERY);
    /* Direct prompts carry the benchmark's instruction; CoT the raw question. */
    snprintf(q, q_cap, "%s%s", cot ? "" : "Answer the question using a single word or number. ", j->question);
    r.question = q;
    r.temperature = 0;
    r.ignore_eos = 1;
    r.reasoning = cot;
    r.max_tokens = cot ? 15 : 3;
    return r;
}

/* Untimed requests through e: job k on warm-up chart k % n_warm. */
static int warm_up(albedo_engine *e, int n, int cot, const bytes *warm, int n_warm, const job *jobs, int n_jobs) {
    int rc = 0;
    for (int k = 0; k < n && !rc; k++) {
        char q[512];
        albedo_request r = make_request(&jobs[k % n_jobs], cot, q, sizeof q);
        const bytes *b = &warm[k % n_warm];
        albedo_ticket *t = NULL;
        rc = albedo_engine_submit(e, &r, b->p, b->n, NULL, &t) != ALBEDO_OK || albedo_ticket_wait(t, NULL) != ALBEDO_OK;
        if (rc)
            fprintf(stderr, "albedo: warm-up request %d: %s\n", k, t ? albedo_ticket_error(t) : albedo_last_error());
        albedo_ticket_free(t);
    }
    return rc;
}

static int run_one(albedo_model *m, int batch, int cot, int n_threads, const bytes *imgs, const job *jobs, int n_jobs,
                   const bytes *warm, int n_warm, int n_warmup, int json) {
    albedo_engine_params ep = albedo_engine_params_default();
    ep.max_batch = batch;
    ep.n_threads = n_threads;
    ep.max_queue = n_jobs + 1;
    albedo_engine *e = NULL;
    if (albedo_engine_new(m, &ep, &e) != ALBEDO_OK) {
        fprintf(stderr, "albedo: %s\n", albedo_last_error());
        return 1;
    }
    albedo_ticket **t = calloc((size_t)n_jobs, sizeof *t);
    double *lat = calloc((size_t)n_jobs, sizeof *lat);
    int rc = !t || !lat, n_done = 0;
    double out_tok = 0, in_tok = 0, ttft = 0;
    if (!rc && n_warmup > 0) rc = warm_up(e, n_warmup, cot, warm, n_warm, jobs, n_jobs);
    albedo_engine_stats es0; /* the warm-up's steps, left out of the row */
    albedo_engine_get_stats(e, &es0);
    const double t0 = albedo_bench_now_ms();
    for (int i = 0; i < n_jobs && !rc; i++) {
        /* The engine copies the question at submit. */
        char q[512];
        albedo_request r = make_request(&jobs[i], cot, q, sizeof q);
        const bytes *b = &imgs[jobs[i].image];
        if (albedo_engine_submit(e, &r, b->p, b->n, NULL, &t[i]) != ALBEDO_OK) {
            fprintf(stderr, "albedo: submit: %s\n", albedo_last_error());
            rc = 1;
        }
    }
    for (int i = 0; i < n_jobs; i++) {
        if (!t[i]) continue;
        const albedo_result *res = NULL;
        if (albedo_ticket_wait(t[i], &res) == ALBEDO_OK) {
            /* prefill_time_ms runs from admission (vision, prefix, prompt). */
            lat[n_done++] = res->metrics.prefill_time_ms + res->metrics.decode_time_ms;
            out_tok += res->metrics.output_tokens;
            in_tok += res->metrics.input_tokens - res->metrics.cached_tokens;
            ttft += res->metrics.ttft_ms;
        } else {
            fprintf(stderr, "albedo: request %d: %s\n", i, albedo_ticket_error(t[i]));
            rc = 1;
        }
    }
    const double wall = albedo_bench_now_ms() - t0;
    albedo_engine_stats es;
    albedo_engine_get_stats(e, &es);
    es.steps -= es0.steps;
    es.step_sequences -= es0.step_sequences;
    es.steps_while_encoding -= es0.steps_while_encoding;
    const double mean_batch = es.steps ? (double)es.step_sequences / (double)es.steps : 0;
    const double overlap = es.steps ? 100.0 * (double)es.steps_while_encoding / (double)es.steps : 0;
    for (int i = 0; i < n_jobs; i++) albedo_ticket_free(t[i]);
    albedo_engine_free(e);
    qsort(lat, (size_t)n_done, sizeof *lat, cmp_double);
    const double rps = n_done / (wall / 1000.0);
    if (json)
        printf(
            "{\"mode\": \"%s\", \"batch\": %d, \"requests\": %d, \"req_s\": %.4f, \"p50_ms\": %.1f, \"p95_ms\": %.1f, "
            "\"mean_output_tokens\": %.1f, \"mean_uncached_input\": %.1f, \"mean_ttft_ms\": %.1f, "
            "\"steps\": %llu, \"mean_batch\": %.2f, \"steps_while_encoding\": %llu}\n",
            cot ? "cot" : "direct", batch, n_done, rps, pct(lat, n_done, 0.5), pct(lat, n_done, 0.95),
            n_done ? out_tok / n_done : 0, n_done ? in_tok / n_done : 0, n_done ? ttft / n_done : 0,
            (unsigned long long)es.steps, mean_batch, (unsigned long long)es.steps_while_encoding);
    else
        printf("| %-6s | %5d | %8d | %8.3f | %9.0f | %9.0f | %7.1f | %9.0f | %10.2f | %12.0f%% |\n",
               cot ? "CoT" : "direct", batch, n_done, rps, pct(lat, n_done, 0.5), pct(lat, n_done, 0.95),
               n_done ? out_tok / n_done : 0, n_done ? ttft / n_done : 0, mean_batch, overlap);
    fflush(stdout);
    free(t);
    free(lat);
    return rc;
}

static const char *const QUESTIONS[][2] = {
    {"What is the value of the tallest bar in the chart, according to the labels on the vertical axis?",
     "How many of the bars in this chart are above the red line series at their position?"},
    {"Which category on the horizontal axis has the lowest value in this chart, and what is it?",
     "What is the difference between the values of the first two bars from the left in the chart?"},
    {"In which year did the line series reach its highest point over the whole period shown?",
     "What is the sum of the two largest values shown in the chart, rounded to one decimal place?"},
    {"What is the average of all the bars in the chart, taken over every category shown?",
     "Is the last bar on the right of the chart taller than the first one on the left, yes or no?"},
};

int albedo_bench_chartqa(albedo_model *m, const albedo_chartqa_opts *o) {
    static const int SIZES[][2] = {{800, 600}, {850, 600}, {800, 557}, {1000, 700}, {640, 480}, {800, 800}};
    const int n_img = o->n_images > 0 ? o->n_images : 4, n_jobs = 2 * n_img, n_warm = 6;
    bytes *imgs = calloc((size_t)n_img, sizeof *imgs), *warm = calloc((size_t)n_warm, sizeof *warm);
    job *jobs = calloc((size_t)n_jobs, sizeof *jobs);
    if (!imgs || !jobs || !warm) return 1;
    int rc = 0;
    /* Warm-up charts: one of each size, other content (their prefixes are
     * never the timed charts'). */
    for (int i = 0; i < n_warm && !rc && o->warmup > 0; i++) {
        uint8_t *im = render_chart(SIZES[i][0], SIZES[i][1], 900000 + (uint64_t)i);
        rc = !im || png_rgb(im, SIZES[i][0], SIZES[i][1], &warm[i]);
        free(im);
    }
    for (int i = 0; i < n_img && !rc; i++) {
        const int w = SIZES[i % 6][0], h = SIZES[i % 6][1];
        uint8_t *im = render_chart(w, h, 1000 + (uint64_t)i);
        rc = !im || png_rgb(im, w, h, &imgs[i]);
        free(im);
        for (int q = 0; q < 2; q++) {
            job *j = &jobs[2 * i + q];
            j->image = i;
            snprintf(j->question, sizeof j->question, "%s", QUESTIONS[i % 4][q]);
        }
    }
    /* Two questions per chart, in chart order: the second finds the prefix
     * cached (or being built, and then waits for it). */
    if (!o->json) {
        printf("model: %s\n", albedo_model_describe(m));
        /* The questions' own tokens (the prompt template adds a few): with a
         * byte-level synthetic tokenizer about three times the real count. */
        double n_tok[2] = {0, 0};
        for (int cot = 0; cot < 2; cot++)
            for (int i = 0; i < n_jobs; i++) {
                char q[512];
                albedo_request r = make_request(&jobs[i], cot, q, sizeof q);
                n_tok[cot] += albedo_tokenize(m, r.question, NULL, 0);
            }
        printf("prompts: %.1f tokens direct, %.1f CoT (mean, the question's text)\n", n_tok[0] / n_jobs,
               n_tok[1] / n_jobs);
        printf("workload: %d charts (ChartQA sizes), %d questions; direct = 3 tokens, CoT = 15 reasoning + 15 answer; "
               "%d warm-up requests a row\n",
               n_img, n_jobs, o->warmup > 0 ? o->warmup : 0);
        printf("| mode   | batch | requests |    req/s |  P50 (ms) |  P95 (ms) | out tok | TTFT (ms) | seqs/step | "
               "steps encoding |\n");
        printf("|--------|------:|---------:|---------:|----------:|----------:|--------:|----------:|----------:|-----"
               "----------:|\n");
    }
    for (int mode = 0; mode < 2 && !rc; mode++) {
        if (!(o->modes & (1 << mode))) continue;
        for (int b = 0; b < o->n_batches && !rc; b++)
            rc = run_one(m, o->batches[b], mode, o->n_threads, imgs, jobs, n_jobs, warm, n_warm, o->warmup, o->json);
    }
    for (int i = 0; i < n_img; i++) free(imgs[i].p);
    for (int i = 0; i < n_warm; i++) free(warm[i].p);
    free(imgs);
    free(warm);
    free(jobs);
    return rc;
}
