/*
 * model_cuda.h — Moondream 2 on the GPU, whole stages at a time: the device
 * half of the CUDA backend (docs/CUDA.md). C reaches it through this
 * extern "C" header only; src/backend_cuda.c translates the model's
 * weights and configuration (model.h) into an mdc_desc and calls it from
 * the stage files' hooks.
 *
 *   mdc_model   the weights on one device, uploaded once at load as bf16
 *               (linears; K padded with zeros to a multiple of 8), float32
 *               (LayerNorm parameters, biases of float32 outputs, position
 *               embeddings, rotary tables); shared by every session, and a
 *               pool of image-prefix KV slots. Immutable after load except
 *               for the pool, which has its own lock.
 *   mdc_state   one session's device memory, allocated once when the session
 *               is made (sized from the configuration and max_ctx, never per
 *               request): a context (stream, cuBLASLt), the text workspace
 *               for max_ctx rows, the KV cache (bf16, or e4m3 with
 *               mdc_desc.kv_fp8; [layer][k|v][Hkv][max_ctx][D]), the vision workspace for max_crops + 1 crops
 *               (more crops run in groups), pinned staging, the decode graph.
 *
 * Activations follow ops_cuda.h: bf16 matrix operands, float32 sums, a
 * float32 residual stream. Host pointers are named so; every call returns
 * when its results are on the host (one stream synchronisation per call).
 * Moondream 3's tau attention and experts run in model_cuda_md3.cu, called
 * from the text layers; block-quantised weights are not supported here
 * (ALBEDO_ERR_UNSUPPORTED from the glue).
 */
#ifndef ALBEDO_MODEL_CUDA_H
#define ALBEDO_MODEL_CUDA_H

#ifdef __cplusplus
extern "C" {
#endif

#include "../ops.h"

/* Host views of one block's weights (pointers into the mapped checkpoint). */
typedef struct mdc_vblock {
    op_vec ln1_w, ln1_b, ln2_w, ln2_b;
    op_linear qkv, proj, fc1, fc2;
} mdc_vblock;

typedef struct mdc_tblock {
    op_vec ln_w, ln_b;
    op_linear qkv, proj, fc1, fc2;
} mdc_tblock;

/* What the device model is made from. Shapes are model.h's md_config. */
typedef struct mdc_desc {
    /* vision */
    int crop_size, patch, in_ch, enc_dim, enc_layers, enc_heads, enc_ff;
    int max_crops, overlap_margin, proj_inner, proj_out;
    op_linear patch_emb;
    op_vec pos_emb; /* [n_patches, enc_dim] */
    const mdc_vblock *vb;
    op_vec post_ln_w, post_ln_b;
    op_linear proj_fc1, proj_fc2;
    /* text */
    int dim, ff_dim, n_layers, vocab, n_heads, n_kv_heads, head_dim, rot_dims;
    int prefix_attn, max_context, bos;
    op_vec wte; /* [vocab, dim] */
    const mdc_tblock *tb;
    op_vec tpost_w, tpost_b;
    op_linear lm_head;
    const float *rope_cos, *rope_sin; /* [max_context, rot_dims/2] */
    const struct mdc_md3_desc *md3;   /* Moondream 3's additions (below), or NULL */
    /* KV caches (sessions, image prefixes, the engine's pool) as e4m3 bytes
     * with one scale per tensor (docs/CUDA.md, FP8 KV cache); needs sm_89+
     * (ALBEDO_ERR_UNSUPPORTED below). 0: bf16. */
    int kv_fp8;
} mdc_desc;

/* Moondream 3 (spec/model.md §10; model_cuda_md3.cu): per text block the
 * tau parameters and, from the first MoE layer on, the router and experts
 * (whose blocks leave mdc_tblock's fc1/fc2 empty). */
typedef struct mdc_md3_block {
    op_linear tau_wq, tau_wv; /* [H, (H + 2*Hkv)*D], no bias */
    op_vec tau_alpha;         /* [H] */
    int moe;
    op_linear router;              /* [E, dim] with bias */
    const void *exp_fc1, *exp_fc2; /* [E, 2*inner, dim], [E, dim, inner] */
    dtype exp_fc1_dt, exp_fc2_dt;
} mdc_md3_block;

typedef struct mdc_md3_desc {
    int experts, topk, inner, tau_pos_bf16;
    /* Experts as e4m3 with a float scale per row, converted at upload
     * (albedo_model_params.weights "fp8"; sm_89+, else
     * ALBEDO_ERR_UNSUPPORTED; docs/CUDA.md, FP8 experts). 0: bf16. */
    int exp_fp8;
    const mdc_md3_block *b; /* [n_layers] */
} mdc_md3_desc;

typedef struct mdc_model mdc_model;
typedef struct mdc_state mdc_state;
typedef struct mdc_prefix mdc_prefix; /* an image's prefix KV on the device */

/* Number of CUDA devices (0 when there is none or no driver). */
int mdc_device_count(void);

/* Upload the weights to device `device`. Fails with ALBEDO_ERR_OUT_OF_MEMORY
 * and a message giving both sizes when the weights and one session's
 * working memory do not fit the card's free memory; with
 * ALBEDO_ERR_UNSUPPORTED for shapes the kernels cannot take. */
albedo_status mdc_model_new(const mdc_desc *d, int device, mdc_model **out, errbuf *e);
void mdc_model_free(mdc_model *m); /* NULL is a no-op */
/* "cuda (NVIDIA H100 80GB HBM3, sm_90, 2.93 GiB of weights)" */
const char *mdc_model_describe(const mdc_model *m);

/* A session on m with max_ctx positions of KV cache. logits_host [vocab]
 * and hidden_host [dim] are the session's host buffers that text forwards
 * fill; they are page-locked for the state's lifetime. */
albedo_status mdc_state_new(mdc_model *m, int max_ctx, float *logits_host, float *hidden_host, mdc_state **out,
                            errbuf *e);
void mdc_state_free(mdc_state *s); /* NULL is a no-op */

/* What a state holds besides its text working memory. */
#define MDC_KV 1     /* its own KV cache of max_ctx positions (sessions) */
#define MDC_VISION 2 /* the vision workspace (sessions, the engine's image worker) */
/* A state of rows text rows (at least max_ctx with MDC_KV, prefix_attn with
 * MDC_VISION) for paged steps of up to seqs sequences over a pool of
 * block_size positions a block (0: no paged steps). mdc_state_new is
 * (max_ctx, max_ctx, 1, 0, MDC_KV | MDC_VISION). logits_host may be NULL. */
albedo_status mdc_state_new_ex(mdc_model *m, int max_ctx, int rows, int seqs, int block_size, int flags,
                               float *logits_host, float *hidden_host, mdc_state **out, errbuf *e);

/* Bytes of one cached K or V element: 2 (bf16) or 1 (e4m3). */
int mdc_kv_elem_bytes(const mdc_model *m);

/* ---- the engine: a paged KV pool on the device ------------------------------
 *
 * One allocation, [n_layers][k|v][n_rows][Hkv*D] bf16 (or e4m3); k[l] and v[l] get
 * the device base of layer l's planes (kvcache.h's kv_pool with device
 * memory). Positions reach rows through per-sequence block tables. */
typedef struct mdc_pool mdc_pool;
albedo_status mdc_pool_new(mdc_model *m, long n_rows, void **k, void **v, mdc_pool **out, errbuf *e);
void mdc_pool_free(mdc_pool *p); /* NULL is a no-op */
/* Rows src_row.. → dst_row.. (n_rows) in every plane; returns when done. */
albedo_status mdc_pool_copy(mdc_pool *p, long dst_row, long src_row, int n_rows, errbuf *e);
/* Page-lock host memory (on) or release it; a failure leaves it pageable
 * (copies into it still work, more slowly). */
void mdc_host_pin(void *p, size_t bytes, int on);
/* Free memory on m's device now, in bytes (0 if unknown). */
size_t mdc_free_memory(mdc_model *m);

/* The next token of a sequence picked on the device from its logits row,
 * which then never leaves the device: ids mask[0 .. n_mask) set to -inf,
 * then argmax (temperature <= 0) or cuda_sample's temperature + top-p with
 * the draw a hash of (seed, counter) (counter: the request's pick number,
 * so the draws do not depend on the batch). *id_host gets the token. */
typedef struct mdc_pick {
    float temperature, top_p;
    uint64_t seed, counter;
    int32_t mask[2];
    int n_mask;
    int32_t *id_host;
} mdc_pick;

/* One sequence of a paged step: T rows at positions pos0.. (keys 0 ..
 * pos0+T-1 through blocks[0 .. n_blocks)), n_prefix its bidirectional
 * prefix; hidden_host [dim] gets its last row before post_ln, logits_host
 * [vocab] (when not NULL) its logits; with pick (and logits_host NULL) the
 * logits stay on the device and only the picked id comes down. */
typedef struct mdc_seg {
    int pos0, T, n_prefix;
    const int32_t *blocks;
    int n_blocks;
    float *hidden_host, *logits_host;
    const mdc_pick *pick;
} mdc_seg;

/* Rows picked on the device since the process started (all states; for tests). */
long mdc_device_picks(void);
/* Paged steps that replayed a decode graph since the process started (all
 * states; for tests). */
long mdc_paged_graph_steps(void);
/* Paged decode steps that ran forked (their MLP beside the attention, on a
 * second stream; replayed or eager) since the process started (for tests). */
long mdc_paged_fork_steps(void);

/* The engine's batched step: emb_host [ΣT, dim] (segment after segment)
 * through the decoder at once on a state made with block_size bs; K/V into
 * the pool (kl, vl: its per-layer device bases). Steps whose segments are
 * all single rows with logits replay a CUDA graph per number of sequences
 * (captured at the second such step) unless ALBEDO_CUDA_GRAPH=0. */
albedo_status mdc_forward_paged(mdc_state *s, void *const *kl, void *const *vl, int bs, const float *emb_host,
                                const mdc_seg *segs, int n_seg, errbuf *e);
/* The image prefix (mdc_image_prefix) with its K/V written straight into
 * the pool through blocks (positions 0 .. prefix_attn-1); s needs
 * MDC_VISION and paged steps. */
albedo_status mdc_image_prefix_paged(mdc_state *s, const uint8_t *crops_host, int n, int th, int tw, void *const *kl,
                                     void *const *vl, int bs, const int32_t *blocks, int n_blocks, errbuf *e);

/* The vision encoder and projection on n crops [n, cs, cs, 3] (host): the
 * global crop first, then th × tw tiles row-major (n = th*tw + 1). Writes
 * img_emb_host [np, dim] and, when not NULL, enc_out_host [n, np, enc_dim]
 * (the encoder's output after post_ln). */
albedo_status mdc_vision(mdc_state *s, const uint8_t *crops_host, int n, int th, int tw, float *img_emb_host,
                         float *enc_out_host, errbuf *e);
/* The encoder alone on n crops → out_host [n, np, enc_dim]. */
albedo_status mdc_vision_crops(mdc_state *s, const uint8_t *crops_host, int n, float *out_host, errbuf *e);

/* The image prefix: vision on the crops, then [BOS embedding, img_emb]
 * through the text decoder at positions 0 .. prefix_attn-1 with the
 * bidirectional prefix mask, all on the device; the prefix KV is left in
 * s's cache and, when out is not NULL, copied into a new mdc_prefix. */
albedo_status mdc_image_prefix(mdc_state *s, const uint8_t *crops_host, int n, int th, int tw, mdc_prefix **out,
                               errbuf *e);
/* Copy an image's prefix KV into positions 0 .. prefix_attn-1 of s's cache
 * (stream-ordered before the next forward). */
albedo_status mdc_prefix_load(mdc_state *s, const mdc_prefix *p, errbuf *e);
void mdc_prefix_free(mdc_prefix *p); /* NULL is a no-op */

/* text_forward on the device: emb_host [T, dim] at positions pos0.., K/V
 * into the cache, n_prefix the bidirectional prefix. hidden_host (the
 * state's) gets the last row before post_ln; logits_host too when
 * want_logits, unless pick_id is not NULL: then the ids pick_mask[0 ..
 * n_mask) (n_mask <= 2) are set to -inf on the device, the argmax (first
 * index on a tie, NaN never) lands in *pick_id, and the logits row stays on
 * the device. A step of one row with logits at pos0 >= n_prefix replays a
 * CUDA graph (captured at the session's first such step, with the position
 * and the masked ids read from device memory; the argmax is part of it)
 * unless ALBEDO_CUDA_GRAPH=0. */
albedo_status mdc_text_forward(mdc_state *s, const float *emb_host, int T, int pos0, int n_prefix, int want_logits,
                               const int32_t *pick_mask, int n_mask, int32_t *pick_id, errbuf *e);

/* For tests: layer l's keys and values at positions 0 .. n_pos-1 as float
 * [n_pos, Hkv*D] (the CPU cache's layout). */
albedo_status mdc_kv_download(mdc_state *s, int l, int n_pos, float *k_host, float *v_host, errbuf *e);
/* For tests and benchmarks: whether the last text forward replayed the
 * decode graph, and how many graphs the state has captured. */
void mdc_graph_stats(const mdc_state *s, int *last_used_graph, int *n_captured);
/* Why capturing the decode graph failed ("" if it did not; the session then
 * runs eagerly). */
const char *mdc_graph_error(const mdc_state *s);
/* For tests: the layers whose MLP (or experts) the last forked decode graph
 * or paged step ran on the second stream (0 if none was forked). */
int mdc_fork_layers(const mdc_state *s);

#ifdef __cplusplus
}
#endif
#endif
