/*
 * bench_e2e.c — Moondream 2 end to end through the CUDA backend at full
 * size (random weights), through the public API, wall clock (every call
 * returns with its results on the host). Prints a table:
 *
 *   start-up              model load (read, upload) and the first session
 *   cold direct query     JPEG bytes in → answer out: decode + crops (CPU),
 *                         vision + 730-position prefix (GPU), prompt prefill,
 *                         3 forced output tokens, image freed; and its parts
 *   warm direct query     the same question on an image already encoded
 *   decode, batch 1       tokens/s of a long caption (CUDA graph, and with
 *                         ALBEDO_CUDA_GRAPH=0 for comparison)
 *   ChartQA-like, batch 1 two questions per image, the second reusing the
 *                         image: direct (3 tokens) and CoT (15 reasoning +
 *                         15 answer tokens); req/s and P50 latency
 *
 *   bench_e2e [--model DIR] [--image FILE.jpg] [--repeats N] [--kv-dtype fp8] [--weights fp8]
 * Without --model the full-size synthetic model is written once to
 * $ALBEDO_CACHE/synthetic-md2 (as `albedo bench --synthetic md2`). The
 * image defaults to tests/data/images/rocket.jpg (640×427: 9 crops).
 */
#define _POSIX_C_SOURCE 200809L
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "../bench_util.h"
#include "cuda/model_cuda.h"
#include "session.h"

static void die(const char *what, const char *msg) {
    fprintf(stderr, "bench_e2e: %s: %s\n", what, msg);
    exit(1);
}

static const char *Q1 = "What is the highest value shown in the chart?";
static const char *Q2 = "Which category has the lowest value in this chart?";

static albedo_request query(const char *q, int reasoning) {
    albedo_request r = albedo_request_default(ALBEDO_SKILL_QUERY);
    r.question = q;
    r.temperature = 0;
    r.reasoning = reasoning;
    r.max_tokens = reasoning ? 15 : 3; /* forced lengths: random weights never stop by themselves */
    r.ignore_eos = 1;
    return r;
}

/* Wall-clock time of every logits row of a request (on_logits). */
typedef struct stamps {
    int n;
    double t[64];
} stamps;

static void stamp(void *user, const float *logits, int n) {
    (void)logits, (void)n;
    stamps *st = user;
    if (st->n < 64) st->t[st->n++] = now_ms();
}

static const albedo_result *run(albedo_session *s, const albedo_request *r) {
    const albedo_result *res = NULL;
    if (albedo_session_run(s, r, &res) != ALBEDO_OK) die("run", albedo_session_error(s));
    return res;
}

int main(int argc, char **argv) {
    const char *model = NULL, *image = ALBEDO_SOURCE_DIR "/tests/data/images/rocket.jpg", *only = NULL, *kvd = NULL;
    const char *wts = NULL;
    int reps = 20;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model"))
            model = argv[i + 1];
        else if (!strcmp(argv[i], "--image"))
            image = argv[i + 1];
        else if (!strcmp(argv[i], "--repeats"))
            reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--only"))
            only = argv[i + 1]; /* "vision", "prefix" or "decode": for a profiler */
        else if (!strcmp(argv[i], "--kv-dtype"))
            kvd = argv[i + 1]; /* "fp8": the e4m3 KV cache */
        else if (!strcmp(argv[i], "--weights"))
            wts = argv[i + 1]; /* "fp8": Moondream 3's experts as e4m3 */
    }
    if (reps < 3) reps = 3;
    char dir[4096];
    if (!model) {
        const char *base = getenv("ALBEDO_CACHE") ? getenv("ALBEDO_CACHE") : "/tmp/albedo-cache";
        mkdir(base, 0755);
        snprintf(dir, sizeof dir, "%s/synthetic-md2", base);
        char probe[4200];
        struct stat sb;
        snprintf(probe, sizeof probe, "%s/tokenizer.json", dir);
        if (stat(probe, &sb) != 0) {
            double t0 = now_ms();
            if (albedo_synth_write(dir, "md2", 1, 0, NULL) != ALBEDO_OK) die("synth", albedo_last_error());
            printf("wrote the synthetic md2 model to %s in %.1f s\n", dir, (now_ms() - t0) / 1e3);
        }
        model = dir;
    }
    size_t jpeg_len = 0;
    uint8_t *jpeg = bench_read_file("bench_e2e", image, &jpeg_len);

    /* ---- start-up ---- */
    albedo_model_params p = albedo_model_params_default();
    p.backend = "cuda";
    p.kv_dtype = kvd;
    p.weights = wts;
    albedo_model *m = NULL;
    double t0 = now_ms();
    if (albedo_model_load(model, &p, &m) != ALBEDO_OK) die("load", albedo_last_error());
    const double t_load = now_ms() - t0;
    albedo_session *s = NULL;
    t0 = now_ms();
    if (albedo_session_new(m, &s) != ALBEDO_OK) die("session", albedo_last_error());
    const double t_sess = now_ms() - t0;
    /* Resident device memory once the model and one session exist (the
     * CUDA context included): total minus free. */
    size_t mem_free = 0, mem_total = 0;
    if (cudaMemGetInfo(&mem_free, &mem_total) != cudaSuccess) mem_free = mem_total = 0;
    printf("bench_e2e: %s\nimage %s (%zu bytes), %d repeats, wall clock, medians\n\n", albedo_model_describe(m), image,
           jpeg_len, reps);
    if (only) {
        /* One stage, twice (warm-up, then the pass a profiler looks at). */
        const md_config *oc = &m->cfg;
        errbuf e;
        img_rgb im = {0};
        img_crops cr = {0};
        float *xin = malloc((size_t)oc->prefix_attn * oc->dim * sizeof(float));
        if (img_decode(jpeg, jpeg_len, &m->limits, &im, &e) ||
            img_make_crops(&im, oc->crop_size, oc->patch, oc->overlap_margin, oc->max_crops, &cr, &e))
            die("crops", e.msg);
        for (int i = 0; i < oc->prefix_attn * oc->dim; i++) xin[i] = (float)((i * 7919) % 200 - 100) / 100.0f;
        for (int pass = 0; pass < 2; pass++) {
            albedo_status st = !strcmp(only, "vision") ? vision_encode(&s->st, &cr, xin, NULL, &e)
                               : !strcmp(only, "decode")
                                   ? text_forward(&s->st, xin, 1, oc->prefix_attn, oc->prefix_attn, 1, &e)
                                   : text_forward(&s->st, xin, oc->prefix_attn, 0, oc->prefix_attn, 0, &e);
            if (st) die(only, e.msg);
        }
        printf("%s: done\n", only);
        img_crops_free(&cr);
        img_free(&im);
        free(xin);
        albedo_session_free(s);
        albedo_model_free(m);
        return 0;
    }

    /* First request served after start-up (cold everything). */
    t0 = now_ms();
    albedo_image *img = NULL;
    if (albedo_image_encode_bytes(s, jpeg, jpeg_len, &img) != ALBEDO_OK) die("encode", albedo_session_error(s));
    albedo_request r = query(Q1, 0);
    r.image = img;
    run(s, &r);
    const double t_first = now_ms() - t0;
    albedo_image_free(img);

    /* ---- cold direct query and its parts ---- */
    double *tv = malloc((size_t)reps * 8), *te = malloc((size_t)reps * 8), *tp = malloc((size_t)reps * 8);
    double *td = malloc((size_t)reps * 8), *tc = malloc((size_t)reps * 8), *tg = malloc((size_t)reps * 8);
    double *tw = malloc((size_t)reps * 8), *tf = malloc((size_t)reps * 8), *tgp = malloc((size_t)reps * 8);
    for (int i = 0; i < reps; i++) {
        t0 = now_ms();
        img = NULL;
        if (albedo_image_encode_bytes(s, jpeg, jpeg_len, &img) != ALBEDO_OK) die("encode", albedo_session_error(s));
        const double t1 = now_ms();
        r.image = img;
        const albedo_result *res = run(s, &r);
        albedo_image_free(img);
        tv[i] = now_ms() - t0;
        te[i] = t1 - t0;
        tp[i] = res->metrics.prefill_time_ms;
        td[i] = res->metrics.decode_time_ms;
        tf[i] = res->metrics.ttft_ms;
        if (res->metrics.output_tokens != 3) die("query", "expected 3 output tokens");
    }
    /* Parts: decode + crops on the CPU, vision alone on the GPU (img_emb
     * downloaded), and vision + prefix on the GPU (what an image encode
     * does after the crops). */
    const md_config *c = &m->cfg;
    const int np = c->prefix_attn - 1;
    float *emb = malloc((size_t)np * c->dim * sizeof(float));
    img_crops cr = {0};
    for (int i = 0; i < reps; i++) {
        errbuf e;
        img_rgb im = {0};
        img_crops_free(&cr);
        t0 = now_ms();
        if (img_decode(jpeg, jpeg_len, &m->limits, &im, &e) ||
            img_make_crops(&im, c->crop_size, c->patch, c->overlap_margin, c->max_crops, &cr, &e))
            die("crops", e.msg);
        tc[i] = now_ms() - t0;
        img_free(&im);
        t0 = now_ms();
        if (vision_encode(&s->st, &cr, emb, NULL, &e)) die("vision", e.msg);
        tg[i] = now_ms() - t0;
        void *pfx = NULL;
        t0 = now_ms();
        if (md_cuda_image_prefix(&s->st, &cr, &pfx, &e)) die("prefix", e.msg);
        tgp[i] = now_ms() - t0;
        md_cuda_prefix_free(pfx);
    }
    const int n_crops = cr.n;
    img_crops_free(&cr);

    /* ---- warm direct query ---- */
    img = NULL;
    if (albedo_image_encode_bytes(s, jpeg, jpeg_len, &img) != ALBEDO_OK) die("encode", albedo_session_error(s));
    r.image = img;
    for (int i = 0; i < reps; i++) {
        t0 = now_ms();
        run(s, &r);
        tw[i] = now_ms() - t0;
    }

    /* Step by step: the interval between logits rows of a 12-token answer. */
    stamps stp = {0};
    albedo_request r12 = query(Q2, 0);
    r12.max_tokens = 12;
    r12.image = img;
    run(s, &r12);
    s->on_logits = stamp;
    s->on_logits_user = &stp;
    double ts0 = now_ms();
    run(s, &r12);
    s->on_logits = NULL;

    /* ---- decode at batch 1 ---- */
    albedo_request cap = albedo_request_default(ALBEDO_SKILL_CAPTION);
    cap.image = img;
    cap.temperature = 0;
    cap.max_tokens = 256;
    cap.ignore_eos = 1;
    double dec[5], dec_eager[5];
    for (int i = 0; i < 5; i++) {
        const albedo_result *res = run(s, &cap);
        dec[i] = (res->metrics.output_tokens - 1) / (res->metrics.decode_time_ms / 1e3);
    }
    setenv("ALBEDO_CUDA_GRAPH", "0", 1);
    albedo_session *s2 = NULL;
    if (albedo_session_new(m, &s2) != ALBEDO_OK) die("session", albedo_last_error());
    unsetenv("ALBEDO_CUDA_GRAPH");
    for (int i = 0; i < 5; i++) {
        const albedo_result *res = run(s2, &cap);
        dec_eager[i] = (res->metrics.output_tokens - 1) / (res->metrics.decode_time_ms / 1e3);
    }
    albedo_session_free(s2);
    /* Sampled decoding (temperature 0.5, top_p 0.3: the CPU sampler on the
     * downloaded logits). */
    cap.temperature = 0.5f;
    cap.top_p = 0.3f;
    double dec_s[5];
    for (int i = 0; i < 5; i++) {
        const albedo_result *res = run(s, &cap);
        dec_s[i] = (res->metrics.output_tokens - 1) / (res->metrics.decode_time_ms / 1e3);
    }
    albedo_image_free(img);
    if (*mdc_graph_error(s->st.cu)) printf("note: no decode graph: %s\n", mdc_graph_error(s->st.cu));

    /* ---- text forwards of T rows after the image prefix (eager), and the
     * prefix itself ---- */
    static const int Ts[] = {1, 2, 3, 4, 6, 8, 9, 16, 24, 32, 64};
    enum { NTS = 11 };
    /* Each path measured twice, in the order 0 1 1 0, on a new session each
     * time, so that an effect of the order shows (docs/CUDA.md, open item 7). */
    static const int order[4] = {0, 1, 1, 0};
    double t_rows[2][2][NTS]; /* [path][first, second time] */
    float *rows_emb = malloc((size_t)64 * c->dim * sizeof(float));
    for (int i = 0; i < 64 * c->dim; i++) rows_emb[i] = (float)((i * 7919) % 200 - 100) / 100.0f;
    albedo_session *s3 = NULL;
    for (int run = 0; run < 4; run++) {
        /* path 0: the default switch; path 1: cuBLASLt for every T >= 2 */
        const int path = order[run], again = run >= 2;
        setenv("ALBEDO_CUDA_GRAPH", "0", 1);
        if (path) setenv("ALBEDO_CUDA_GEMV_MAX_T", "1", 1);
        albedo_session_free(s3);
        if (albedo_session_new(m, &s3) != ALBEDO_OK) die("session", albedo_last_error());
        unsetenv("ALBEDO_CUDA_GRAPH");
        unsetenv("ALBEDO_CUDA_GEMV_MAX_T");
        for (int k = 0; k < NTS; k++) {
            double tt[9];
            for (int i = 0; i < 9; i++) {
                errbuf e;
                t0 = now_ms();
                if (text_forward(&s3->st, rows_emb, Ts[k], c->prefix_attn, c->prefix_attn, 1, &e))
                    die("forward", e.msg);
                tt[i] = now_ms() - t0;
            }
            t_rows[path][again][k] = bench_median(tt, 9);
        }
    }
    double t_pre[9];
    for (int i = 0; i < 9; i++) {
        errbuf e;
        float *pe = malloc((size_t)c->prefix_attn * c->dim * sizeof(float));
        for (int j = 0; j < c->prefix_attn * c->dim; j++) pe[j] = rows_emb[j % (64 * c->dim)];
        t0 = now_ms();
        if (text_forward(&s3->st, pe, c->prefix_attn, 0, c->prefix_attn, 0, &e)) die("forward", e.msg);
        t_pre[i] = now_ms() - t0;
        free(pe);
    }
    albedo_session_free(s3);
    free(rows_emb);

    /* ---- ChartQA-like at batch 1: 2 questions per image, 8 images ---- */
    double lat[2][16], wall[2];
    for (int mode = 0; mode < 2; mode++) {
        double w0 = now_ms();
        for (int k = 0; k < 8; k++) {
            for (int q = 0; q < 2; q++) {
                double a = now_ms();
                if (q == 0) {
                    img = NULL;
                    if (albedo_image_encode_bytes(s, jpeg, jpeg_len, &img) != ALBEDO_OK)
                        die("encode", albedo_session_error(s));
                }
                albedo_request qr = query(q ? Q2 : Q1, mode);
                qr.image = img;
                run(s, &qr);
                lat[mode][k * 2 + q] = now_ms() - a;
            }
            albedo_image_free(img);
        }
        wall[mode] = now_ms() - w0;
    }

    const int md3 = m->cfg.md3; /* Photon's anchors differ between the generations */
    printf("%-58s %12s\n",
           md3 ? "what (full Moondream 3 shapes, random weights)" : "what (full Moondream 2 shapes, random weights)",
           "median");
    printf("%-58s %9.0f ms\n", "start-up: model load (read + upload)", t_load);
    printf("%-58s %9.0f ms\n", "start-up: first session", t_sess);
    printf("%-58s %9.2f GiB (of %.1f)\n", "device memory in use after load + first session",
           (double)(mem_total - mem_free) / 1073741824.0, (double)mem_total / 1073741824.0);
    printf("%-58s %9.1f ms\n", "start-up: first request (cold query)", t_first);
    printf("%-58s %9.2f ms   %s\n", "cold direct query: JPEG bytes in -> 3-token answer out", bench_median(tv, reps),
           md3 ? "Photon MD3 b1 P50 46.9" : "target <= 15, Photon P50 36.7");
    printf("%-58s %9.2f ms\n", "  image encode (decode, crops, vision, prefix)", bench_median(te, reps));
    printf("%-58s %9.2f ms\n", "  decode + crops on the CPU, alone (one thread)", bench_median(tc, reps));
    printf("%-58s %9.2f ms   (%d crops, img_emb downloaded)\n", "  vision + projection on the GPU, alone",
           bench_median(tg, reps), n_crops);
    printf("%-58s %9.2f ms   (crops in, prefix KV copied for the image)\n",
           "  vision + 730-position prefix on the GPU, alone", bench_median(tgp, reps));
    printf("%-58s %9.2f ms\n", "  prompt prefill + first token", bench_median(tp, reps));
    printf("%-58s %9.2f ms\n", "  3 decode steps (every answer token is fed back)", bench_median(td, reps));
    printf("%-58s %9.2f ms\n", "  time to first token (request)", bench_median(tf, reps));
    printf("%-58s %9.2f ms\n", "warm direct query (image encoded)", bench_median(tw, reps));
    printf("%-58s %9.0f tok/s %s\n", "decode batch 1, 256 tokens after the prefix, CUDA graph", bench_median(dec, 5),
           md3 ? "" : "target >= 800");
    printf("%-58s %9.0f tok/s\n", "decode batch 1, ALBEDO_CUDA_GRAPH=0 (eager launches)", bench_median(dec_eager, 5));
    printf("%-58s %9.0f tok/s\n", "decode batch 1, temperature 0.5 top_p 0.3 (CPU sampler)", bench_median(dec_s, 5));
    printf("%-58s %9.2f ms   (embeddings uploaded, eager)\n", "prefix: 730 positions through the decoder",
           bench_median(t_pre, 9));
    for (int k = 0; k < NTS; k++) {
        char what[96];
        snprintf(what, sizeof what, "text forward, %d rows at position 730 + logits (eager)", Ts[k]);
        printf("%-58s %9.3f ms   (all-cuBLASLt %.3f ms; measured again, in the other order: %.3f / %.3f)\n", what,
               t_rows[0][0][k], t_rows[1][0][k], t_rows[0][1][k], t_rows[1][1][k]);
    }
    printf("steps of a 12-token warm answer (ms between logits rows, from the request's start):");
    for (int i = 0; i < stp.n; i++) printf(" %.2f", stp.t[i] - (i ? stp.t[i - 1] : ts0));
    printf("\n");
    for (int mode = 0; mode < 2; mode++)
        printf("ChartQA-like batch 1 %-6s 16 requests: %6.1f req/s, P50 %.1f ms (image cached on every 2nd)\n",
               mode ? "CoT" : "direct", 16 / (wall[mode] / 1e3), bench_median(lat[mode], 16));
    free(tv), free(te), free(tp), free(td), free(tc), free(tg), free(tw), free(tf), free(tgp), free(emb), free(jpeg);
    albedo_session_free(s);
    albedo_model_free(m);
    return 0;
}
