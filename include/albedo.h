/*
 * albedo.h — the one public header of albedo, an inference engine for the
 * Moondream vision-language models.
 *
 * Usage:
 *
 *     albedo_model *m;
 *     albedo_model_params mp = albedo_model_params_default();
 *     if (albedo_model_load("path/to/moondream2", &mp, &m) != ALBEDO_OK) {
 *         fprintf(stderr, "%s\n", albedo_last_error());
 *         return 1;
 *     }
 *     albedo_session *s;
 *     albedo_session_new(m, &s);
 *     albedo_image *img;
 *     albedo_image_encode_file(s, "photo.jpg", &img);   // vision encoder + prefix, once
 *
 *     albedo_request r = albedo_request_default(ALBEDO_SKILL_QUERY);
 *     r.image = img;
 *     r.question = "What is in this image?";
 *     const albedo_result *res;
 *     if (albedo_session_run(s, &r, &res) == ALBEDO_OK)
 *         printf("%s\n", res->text);                     // valid until the next call on s
 *
 *     albedo_image_free(img);
 *     albedo_session_free(s);
 *     albedo_model_free(m);
 *
 * Thread-safety:
 *   - An albedo_model is immutable after loading: any number of threads may
 *     create sessions on it and run them concurrently (their forward passes
 *     are batched by the model's engine).
 *   - An albedo_session (working memory, KV cache, the last result) must be
 *     used by one thread at a time. Create one session per thread.
 *   - An albedo_image is immutable after encoding and may be shared by
 *     sessions of the same model on any thread; free it after its last use.
 *   - albedo_last_error() is per thread; albedo_session_error() per session.
 *
 * Ownership: inputs are borrowed for the duration of a call. Objects created
 * by the _new, _load and _encode functions are freed by the matching _free, which accepts
 * NULL. Results are borrowed from the session and stay valid until the next
 * call on that session.
 *
 * The library never prints, exits or aborts on bad input: every failure comes
 * back as an albedo_status with a message naming what was wrong.
 */
#ifndef ALBEDO_H
#define ALBEDO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define ALBEDO_API __declspec(dllexport)
#else
#define ALBEDO_API __attribute__((visibility("default")))
#endif

#define ALBEDO_VERSION_STRING "0.1.0"

/* ---- Status ------------------------------------------------------------- */

typedef enum albedo_status {
    ALBEDO_OK = 0,
    ALBEDO_ERR_INVALID_ARGUMENT, /* a parameter or setting is out of range */
    ALBEDO_ERR_IO,               /* a file could not be opened or read */
    ALBEDO_ERR_MODEL_FORMAT,     /* safetensors / config.json is corrupt or does not match */
    ALBEDO_ERR_TOKENIZER,        /* tokenizer.json is corrupt or unsupported */
    ALBEDO_ERR_IMAGE,            /* image bytes could not be decoded */
    ALBEDO_ERR_LIMIT,            /* input exceeds a limit (image size, prompt length, context) */
    ALBEDO_ERR_OUT_OF_MEMORY,
    ALBEDO_ERR_CANCELLED,   /* the stream callback asked to stop */
    ALBEDO_ERR_UNSUPPORTED, /* valid input that this build cannot handle */
    ALBEDO_ERR_NETWORK,     /* a download failed */
    ALBEDO_ERR_INTERNAL,
    ALBEDO_STATUS_COUNT
} albedo_status;

/* A fixed English message for a status ("invalid argument"). Never NULL. */
ALBEDO_API const char *albedo_status_str(albedo_status st);

/* The detailed message of the last failing call on this thread
 * ("tensor model.text.wte: expected [51200, 2048], file has [51200, 1024]").
 * Empty string if none. Valid until the next failing call on this thread. */
ALBEDO_API const char *albedo_last_error(void);

ALBEDO_API const char *albedo_version(void);

/* ---- Model -------------------------------------------------------------- */

typedef struct albedo_model albedo_model;

typedef enum albedo_precision {
    /* Activations in float32, weights widened exactly from 16 bits: the
     * reference path, matching the official implementation's float32 run. */
    ALBEDO_PRECISION_F32 = 0,
    /* Activations rounded to bfloat16 for matrix products, float32
     * accumulation: about twice as fast where the CPU has bf16 dot products.
     * Like the official bf16 GPU run; compared against F32 by the tests. */
    ALBEDO_PRECISION_BF16 = 1
} albedo_precision;

typedef struct albedo_model_params {
    int n_threads;              /* 0 = all cores */
    albedo_precision precision; /* default F32 */
    const char *backend;        /* NULL or "auto" = best available; "ref" = scalar
                                   reference; "avx2", "avx512", "neon"; "cuda" or
                                   "cuda:N" = NVIDIA GPU N (builds with ALBEDO_CUDA;
                                   bf16 activations; docs/CUDA.md) */
    int max_context;            /* 0 = the model's max_context */
    int max_image_side;         /* reject images wider or taller (default 16384) */
    int64_t max_image_pixels;   /* reject images with more pixels (default 100e6) */
    const char *weights;        /* text decoder weights: NULL or "bf16" = as stored; "q8",
                                   "q4" = albedo block formats made at load (docs/QUANT.md;
                                   the CPU backends); "fp8" = Moondream 3's experts as e4m3
                                   with a float scale per row, converted at upload, half
                                   their bytes (backend cuda on an sm_89+ GPU only, else
                                   ALBEDO_ERR_UNSUPPORTED, as for Moondream 2; docs/CUDA.md) */
    const char *kv_dtype;       /* KV cache: NULL, "auto" or "bf16" = the backend's own (bf16
                                   on cuda; the CPU's follows precision); "fp8" = e4m3 with one
                                   scale per tensor, half the bytes of bf16: on the CPU backends
                                   (docs/QUANT.md) and on sm_89+ GPUs (older cards:
                                   ALBEDO_ERR_UNSUPPORTED; docs/CUDA.md). Other values:
                                   ALBEDO_ERR_INVALID_ARGUMENT */
} albedo_model_params;

ALBEDO_API albedo_model_params albedo_model_params_default(void);

/* Load a model directory holding config.json, model.safetensors (or shards
 * model-0000i-of-0000n.safetensors with model.safetensors.index.json) and
 * tokenizer.json. Moondream 2 and Moondream 3 are told apart by the config
 * and the tensors. Every tensor's presence, dtype and shape is checked against
 * the configuration. Weights are memory-mapped and stay 16-bit. */
ALBEDO_API albedo_status albedo_model_load(const char *dir, const albedo_model_params *params, albedo_model **out);
ALBEDO_API void albedo_model_free(albedo_model *m);

/* Load dir with params (params->weights "q8" or "q4") and write its quantised
 * copy to out_dir (created if missing): config.json, tokenizer.json and one
 * model.safetensors that later loads map without converting. */
ALBEDO_API albedo_status albedo_model_quantize(const char *dir, const albedo_model_params *params, const char *out_dir);

/* A one-line description: "moondream2 (text 2048x24, vision 1152x27), backend avx512, 2 threads". */
ALBEDO_API const char *albedo_model_describe(const albedo_model *m);

/* ---- Session ------------------------------------------------------------ */

typedef struct albedo_session albedo_session;

ALBEDO_API albedo_status albedo_session_new(albedo_model *m, albedo_session **out);
ALBEDO_API void albedo_session_free(albedo_session *s);
/* Detail of the last failing call on this session; empty string if none. */
ALBEDO_API const char *albedo_session_error(const albedo_session *s);

/* ---- Images ------------------------------------------------------------- */

/* An image after the vision encoder and the 730-position prefix prefill: any
 * number of requests can reuse it without running either again. */
typedef struct albedo_image albedo_image;

ALBEDO_API albedo_status albedo_image_encode_file(albedo_session *s, const char *path, albedo_image **out);
/* JPEG, PNG, WebP or GIF bytes (first frame). */
ALBEDO_API albedo_status albedo_image_encode_bytes(albedo_session *s, const void *data, size_t len, albedo_image **out);
/* Packed 8-bit RGB, rows top to bottom, stride = 3 * width. */
ALBEDO_API albedo_status albedo_image_encode_rgb(albedo_session *s, const uint8_t *rgb, int width, int height,
                                                 albedo_image **out);
/* Free an image (and its prefix in the model's engine); before its model. */
ALBEDO_API void albedo_image_free(albedo_image *img);
ALBEDO_API void albedo_image_size(const albedo_image *img, int *width, int *height);

/* ---- Requests ----------------------------------------------------------- */

typedef enum albedo_skill {
    ALBEDO_SKILL_CAPTION = 0,
    ALBEDO_SKILL_QUERY,
    ALBEDO_SKILL_DETECT,
    ALBEDO_SKILL_POINT
} albedo_skill;

typedef enum albedo_length { ALBEDO_LENGTH_NORMAL = 0, ALBEDO_LENGTH_SHORT, ALBEDO_LENGTH_LONG } albedo_length;

/* A spatial reference: a point (n = 2: x, y) or a box (n = 4: x_min, y_min,
 * x_max, y_max), normalised to [0, 1]. */
typedef struct albedo_spatial_ref {
    int n;
    double v[4];
} albedo_spatial_ref;

/* Streaming callback: receives each piece of answer/caption text as it is
 * decoded (UTF-8, never splitting a character). Return nonzero to stop the
 * generation, which then ends with ALBEDO_ERR_CANCELLED. */
typedef int (*albedo_text_fn)(void *user, const char *text, size_t len);

typedef struct albedo_request {
    albedo_skill skill;
    const albedo_image *image;              /* NULL: text-only query */
    const char *question;                   /* query */
    const char *object;                     /* detect, point */
    albedo_length length;                   /* caption */
    int reasoning;                          /* query: think first, with grounding */
    const albedo_spatial_ref *spatial_refs; /* query */
    int n_spatial_refs;
    float temperature; /* >= 0; 0 = greedy. Default 0.5 */
    float top_p;       /* (0, 1]. Default 0.3 */
    int max_tokens;    /* > 0. Default 768 */
    int max_objects;   /* > 0. Default 50 */
    uint64_t seed;     /* sampling seed; same seed, same output */
    int ignore_eos;    /* keep generating until max_tokens (benchmarks) */
    albedo_text_fn on_text;
    void *user;
} albedo_request;

ALBEDO_API albedo_request albedo_request_default(albedo_skill skill);
/* The same with the model's own generation defaults (Moondream 3: top_p 0.9,
 * max_objects 150). */
ALBEDO_API albedo_request albedo_model_request_default(const albedo_model *m, albedo_skill skill);

typedef struct albedo_box {
    double x_min, y_min, x_max, y_max;
} albedo_box;

typedef struct albedo_point {
    double x, y;
} albedo_point;

typedef struct albedo_grounding {
    int start_idx, end_idx; /* character offsets into reasoning text */
    int n_points;
    const albedo_point *points;
} albedo_grounding;

typedef enum albedo_finish {
    ALBEDO_FINISH_STOP = 0, /* end of sequence or object list */
    ALBEDO_FINISH_LENGTH    /* max_tokens or max_objects reached */
} albedo_finish;

typedef struct albedo_metrics {
    int input_tokens; /* prompt tokens incl. the 730 image positions */
    int output_tokens;
    int cached_tokens; /* positions reused from an encoded image */
    double prefill_time_ms;
    double decode_time_ms;
    double ttft_ms;
    double queue_time_ms; /* submit to admission in the engine (a session's run waits there too) */
} albedo_metrics;

typedef struct albedo_result {
    albedo_skill skill;
    const char *text;      /* caption or answer, UTF-8 */
    const char *reasoning; /* reasoning text, or NULL */
    int n_grounding;
    const albedo_grounding *grounding;
    int n_objects;
    const albedo_box *objects;
    int n_points;
    const albedo_point *points;
    albedo_finish finish;
    albedo_metrics metrics;
    const int32_t *tokens; /* every token id fed after the image, in order */
    int n_tokens;
    size_t text_len;      /* bytes of text (it may hold NUL bytes: a token can decode to one) */
    size_t reasoning_len; /* bytes of reasoning (0 when it is NULL) */
} albedo_result;

/* Run one request. On success *out points at a result owned by the session,
 * valid until the next call on s. The forward passes run in the model's own
 * engine (created at the first run, see "Asynchronous engine"), batched with
 * those of other sessions' runs on the same model; the image's prefix is
 * copied into the engine's KV cache at its first use. */
ALBEDO_API albedo_status albedo_session_run(albedo_session *s, const albedo_request *r, const albedo_result **out);

/* The REST API's response object for a result: {"caption": …}, {"answer": …,
 * "reasoning": {…}}, {"objects": […]} or {"points": […]}. With metrics != 0,
 * also "finish_reason" and "metrics". Returns a string owned by the session,
 * valid until the next call on s. */
ALBEDO_API const char *albedo_result_json(albedo_session *s, const albedo_result *res, int metrics);

/* ---- Asynchronous engine -----------------------------------------------------
 *
 * Many requests at once over one model: the engine owns the working memory,
 * a paged KV cache of kv_bytes (at least one request of the full context)
 * and a cache of image prefixes keyed by the image bytes' content, and
 * batches the forward passes of up to max_batch running requests per step
 * (decode rows first, then prompts, split into chunks beyond token_budget
 * rows per step). A new image is decoded, encoded and its 730-position
 * prefix prefilled on an image worker thread with its own ops threads while
 * the running requests go on decoding. Requests wait in a FIFO queue and
 * are admitted in order when a batch slot and KV blocks for their prompt
 * plus max_tokens (or max_objects) are free; unused image prefixes are
 * evicted least recently used first. A second request on the same image
 * bytes reuses the prefix: no vision encoder, no prefix prefill,
 * metrics.cached_tokens = 730. Blocking session runs (albedo_session_run)
 * go through an engine of the model's own.
 *
 *     albedo_engine *eng;
 *     albedo_engine_params ep = albedo_engine_params_default();
 *     albedo_engine_new(model, &ep, &eng);
 *     albedo_request r = albedo_request_default(ALBEDO_SKILL_QUERY);
 *     r.question = "What is the highest bar?";
 *     albedo_ticket *t;
 *     albedo_engine_submit(eng, &r, jpeg, jpeg_len, NULL, &t);
 *     const albedo_result *res;
 *     if (albedo_ticket_wait(t, &res) == ALBEDO_OK) printf("%s\n", res->text);
 *     albedo_ticket_free(t);
 *     albedo_engine_free(eng);
 *
 * Thread-safety: every function may be called from any thread. Callbacks
 * run on engine threads: on_text on the request's own thread, on_done on the
 * scheduler thread; they must return quickly (a step waits up to one step's
 * time for a request whose callback is still busy) and must not free the
 * ticket.
 * Results are identical to albedo_session_run's up to the rounding of
 * batched matrix products (different row counts per product).
 */

typedef struct albedo_engine albedo_engine;
typedef struct albedo_ticket albedo_ticket;

typedef struct albedo_engine_params {
    int max_batch;      /* concurrently running sequences (default 16) */
    size_t kv_bytes;    /* KV cache budget; 0 = min(25% of RAM, 8 GiB) */
    int block_size;     /* positions per KV block (default 16) */
    int max_queue;      /* waiting requests; more fail with ALBEDO_ERR_LIMIT (default 1024) */
    int token_budget;   /* rows per forward step (default 512) */
    int n_threads;      /* ops threads of the scheduler; 0 = the model's */
    int vision_threads; /* ops threads of the image worker; 0 = n_threads */
} albedo_engine_params;

ALBEDO_API albedo_engine_params albedo_engine_params_default(void);

/* Called once per ticket when it ends (st: its status; res: its result when
 * st is ALBEDO_OK, else NULL). */
typedef void (*albedo_done_fn)(void *user, albedo_ticket *t, albedo_status st, const albedo_result *res);

typedef struct albedo_submit_params {
    albedo_text_fn on_text; /* streaming, as albedo_request.on_text (which is ignored here) */
    albedo_done_fn on_done;
    void *user;
    double deadline_ms; /* > 0: fail with ALBEDO_ERR_CANCELLED this long after submit */
} albedo_submit_params;

ALBEDO_API albedo_status albedo_engine_new(albedo_model *m, const albedo_engine_params *params, albedo_engine **out);
/* Cancels what is queued or running, waits for the scheduler, frees. Tickets
 * stay valid (all ended) until albedo_ticket_free, which may come after this
 * or meanwhile on another thread. */
ALBEDO_API void albedo_engine_free(albedo_engine *e);

/* Queue a request. image: encoded image bytes (JPEG, PNG, WebP, GIF), or
 * NULL for a text-only query; r->image must be NULL. Both are copied. Fails
 * at once with ALBEDO_ERR_INVALID_ARGUMENT for a bad request and
 * ALBEDO_ERR_LIMIT when max_queue requests are waiting. params may be NULL. */
ALBEDO_API albedo_status albedo_engine_submit(albedo_engine *e, const albedo_request *r, const void *image,
                                              size_t image_len, const albedo_submit_params *params,
                                              albedo_ticket **out);
/* Block until the ticket ends; *res (may be NULL) gets its result, valid
 * until albedo_ticket_free, when the status is ALBEDO_OK. */
ALBEDO_API albedo_status albedo_ticket_wait(albedo_ticket *t, const albedo_result **res);
/* 1 if the ticket has ended (then albedo_ticket_wait returns at once), else 0. */
ALBEDO_API int albedo_ticket_poll(const albedo_ticket *t);
/* Ask the ticket to end with ALBEDO_ERR_CANCELLED: at once when queued, at
 * its next forward step when running. No effect once ended. */
ALBEDO_API void albedo_ticket_cancel(albedo_ticket *t);
/* The detail of a failed ticket; empty string if none. Failures of the
 * image (decoding, size limits) begin with "image: ". */
ALBEDO_API const char *albedo_ticket_error(const albedo_ticket *t);
/* The REST response object of a ticket that ended with ALBEDO_OK, as
 * albedo_result_json; owned by the ticket. NULL otherwise. May be called
 * from on_done. */
ALBEDO_API const char *albedo_ticket_json(albedo_ticket *t, int metrics);

typedef struct albedo_engine_stats {
    int queued, running; /* waiting for admission; admitted and not ended */
    int encoding;        /* of the running: waiting for or in the image worker */
    int kv_blocks_used, kv_blocks_total;
    uint64_t prefix_hits, prefix_misses, prefix_evictions;
    uint64_t steps;                /* batched forward steps */
    uint64_t step_sequences;       /* sequences over all steps (÷ steps = mean batch) */
    uint64_t step_rows;            /* rows over all steps */
    uint64_t steps_while_encoding; /* steps begun while the image worker was busy */
} albedo_engine_stats;

ALBEDO_API void albedo_engine_get_stats(albedo_engine *e, albedo_engine_stats *out);
/* Cancel if still running, wait for the end, free. NULL is a no-op. */
ALBEDO_API void albedo_ticket_free(albedo_ticket *t);

/* ---- Tools: synthetic models and benchmarks --------------------------------- */

/* Write a model directory (config.json, model.safetensors, tokenizer.json)
 * with seeded random weights: preset "md2" (the full Moondream 2 shapes) or
 * "md2-small" (the test fixture; with seed 20261127 it reproduces
 * shared/fixtures/models/md2-small bit for bit). legacy_f16 writes the
 * 2024-08-26 names in F16. tokenizer_json: a tokenizer.json to copy, or NULL
 * for a minimal byte-level one. */
ALBEDO_API albedo_status albedo_synth_write(const char *dir, const char *preset, uint64_t seed, int legacy_f16,
                                            const char *tokenizer_json);
/* The same with the weights in shards of at most shard_bytes each (Hugging
 * Face layout: model-0000k-of-0000N.safetensors + model.safetensors.index.json;
 * a larger tensor gets a shard of its own); 0 writes one model.safetensors. */
ALBEDO_API albedo_status albedo_synth_write_shards(const char *dir, const char *preset, uint64_t seed,
                                                   const char *tokenizer_json, uint64_t shard_bytes);

typedef struct albedo_bench_result {
    double vision_crop_ms;    /* one crop through the vision encoder */
    double prefill730_tok_s;  /* the 730-position image prefix through the text model */
    double decode_d740_tok_s; /* one decode step (incl. LM head) at depth 740 */
} albedo_bench_result;

/* Time the three stages, median of `repeats` runs each. */
ALBEDO_API albedo_status albedo_model_bench(albedo_model *m, int repeats, albedo_bench_result *out);

/* ---- Tokens (for tools and tests) ---------------------------------------- */

/* Encode text with the model's tokenizer. Writes up to cap ids; returns the
 * number of ids the text has (which may exceed cap), or -1 on error. */
ALBEDO_API int albedo_tokenize(const albedo_model *m, const char *text, int32_t *ids, int cap);

/* ---- Model download ------------------------------------------------------------
 *
 * Models from the Hugging Face hub, stored in its standard cache layout
 * (models--owner--repo/{blobs,snapshots,refs}) so that files huggingface_hub
 * already downloaded are reused and the other way round.
 */

/* Progress of one file: done of total bytes (total 0 = unknown). Called on
 * the downloading thread; the library itself never prints. */
typedef void (*albedo_progress_fn)(void *user, const char *file, uint64_t done, uint64_t total);

typedef struct albedo_fetch_params {
    const char *endpoint;     /* NULL: $HF_ENDPOINT, else https://huggingface.co */
    const char *token;        /* NULL: $HF_TOKEN (sent as Authorization: Bearer) */
    const char *hub_cache;    /* NULL: $HF_HUB_CACHE, $HF_HOME/hub, ~/.cache/huggingface/hub */
    const char *albedo_cache; /* NULL: $ALBEDO_CACHE, $XDG_CACHE_HOME/albedo, ~/.cache/albedo */
    int offline;              /* -1: from $HF_HUB_OFFLINE; 1: cache only; 0: network allowed */
    int max_retries;          /* resumed attempts after a dropped transfer (default 3) */
    long connect_timeout_s;   /* default 10 */
    albedo_progress_fn progress;
    void *user;
} albedo_fetch_params;

ALBEDO_API albedo_fetch_params albedo_fetch_params_default(void);

/* Resolve a model spec to a directory that albedo_model_load accepts, writing
 * it (NUL-terminated) to out_dir:
 *   - an existing directory: returned as is, nothing downloaded;
 *   - "moondream2": config.json and model.safetensors of vikhyatk/moondream2
 *     at revision 2025-06-21 plus tokenizer.json of moondream/starmie-v1,
 *     merged by symlinks in <albedo cache>/models/moondream2;
 *   - "moondream3" / "moondream3.1": moondream/moondream3-preview and
 *     moondream/moondream3.1-9B-A2B at main, likewise with Starmie's tokenizer;
 *   - "owner/repo[@revision]" (default revision main): the three files of that
 *     repo (tokenizer.json from moondream/starmie-v1 if the repo has none).
 * The weights are model.safetensors or, where a repo has none, its
 * model.safetensors.index.json and every shard that the index names.
 * Files already in the cache are used without network, except that a
 * revision "main" is re-checked when the network is allowed. Downloads resume
 * from a partial ".incomplete" file with an HTTP Range request, and LFS files
 * are checked against the SHA-256 the hub announces. Fails with
 * ALBEDO_ERR_NETWORK (naming the URL) when a file is neither cached nor
 * downloadable, ALBEDO_ERR_IO for cache directory trouble. */
ALBEDO_API albedo_status albedo_model_fetch(const char *spec, const albedo_fetch_params *params, char *out_dir,
                                            size_t cap);

#ifdef __cplusplus
}
#endif
#endif /* ALBEDO_H */
