/*
 * model.h — the model's configuration, its weights as views into the mapped
 * checkpoint, and the internal objects behind the public handles. Shared by
 * the stage files (vision.c, text.c, region.c, generate.c) and the API glue
 * (albedo.c); never seen by backends.
 */
#ifndef ALBEDO_MODEL_H
#define ALBEDO_MODEL_H

#include "common.h"
#include "image.h"
#include "ops.h"
#include "safetensors.h"
#include "tokenizer.h"

#define MD_MAX_TEMPLATE 16

/* A prompt template: a short list of token ids. */
typedef struct md_tmpl {
    int n;
    int32_t ids[MD_MAX_TEMPLATE];
} md_tmpl;

typedef struct md_config {
    /* vision (spec/model.md §2.1) */
    int crop_size, patch, in_ch, enc_dim, enc_layers, enc_heads, enc_ff;
    int max_crops, overlap_margin, proj_inner, proj_out;
    /* text (§2.2) */
    int dim, ff_dim, n_layers, vocab, max_context, n_heads, n_kv_heads;
    int prefix_attn; /* 1 + (crop_size/patch)^2: the bidirectional prefix */
    int head_dim, rot_dims;
    float rope_theta;
    /* region (§2.3) */
    int r_dim, coord_feat, coord_out, size_feat, size_out, r_inner;
    /* Moondream 3 (§10): tau attention in every layer and mixture-of-experts
     * MLPs from layer moe_start on (moe_experts experts, moe_topk per token,
     * expert inner width moe_inner). moe_experts == 0 and md3 == 0 for
     * Moondream 2. */
    int md3;
    int moe_experts, moe_topk, moe_inner, moe_start;
    /* Tau's position term reads ln(p + 1) with p rounded to bf16 first, as the
     * reference does when its activations are bf16; set for BF16 precision.
     * The fixture's float32 run uses exact positions. */
    int tau_pos_bf16;
    /* tokenizer ids (§2.4) */
    int bos, eos, answer_id, thinking_id, coord_id, size_id, start_ground_id, end_ground_id;
    /* prompt templates (§7.3) */
    md_tmpl caption[3]; /* indexed by albedo_length */
    md_tmpl query_prefix, query_suffix, detect_prefix, detect_suffix, point_prefix, point_suffix;
    /* generation rules that differ between the generations (§7.3, §10.6):
     *   MD2: query = prefix + q + suffix + suffix; reasoning = ... + suffix + thinking;
     *        detect/point continue while argmax(full vocabulary) != eos.
     *   MD3: query = prefix + q + suffix;          reasoning = ... + q + thinking;
     *        after each object, continue iff logit[coord_id] > logit[eos]. */
    int query_suffix_twice, reasoning_after_suffix, points_coord_or_eos;
    /* generation defaults (§13.1) */
    float default_temperature, default_top_p;
    int default_max_tokens, default_max_objects;
    /* Which of the generation-dependent defaults config.json set itself. */
    int set_max_context, set_rope_theta;
} md_config;

/* Fill c with the Moondream 2 (2025-06-21) defaults. */
void md_config_defaults(md_config *c);
/* Apply config.json's "config" overrides (the Hugging Face wrapper format;
 * a bare config object is accepted too). */
albedo_status md_config_parse(md_config *c, const char *json, size_t len, errbuf *e);
/* Switch c to Moondream 3: its generation rules and defaults (rotary θ 1.5e6,
 * context 4096 unless config.json set them, top_p 0.9, max_objects 150). */
void md_config_set_md3(md_config *c);

typedef struct vit_block {
    op_vec ln1_w, ln1_b, ln2_w, ln2_b; /* [enc_dim] */
    op_linear qkv;                     /* [3*enc_dim, enc_dim] */
    op_linear proj;                    /* [enc_dim, enc_dim] */
    op_linear fc1;                     /* [enc_ff, enc_dim] */
    op_linear fc2;                     /* [enc_dim, enc_ff] */
} vit_block;

typedef struct txt_block {
    op_vec ln_w, ln_b; /* [dim] */
    op_linear qkv;     /* [(H + 2*Hkv)*D, dim] */
    op_linear proj;    /* [dim, H*D] */
    op_linear fc1;     /* [ff_dim, dim] (dense layers) */
    op_linear fc2;     /* [dim, ff_dim] */
    /* Moondream 3 tau attention (every layer) */
    op_linear tau_wq, tau_wv; /* [H, (H + 2*Hkv)*D], no bias */
    op_vec tau_alpha;         /* [H] */
    /* Moondream 3 mixture of experts (layers >= moe_start) */
    int moe;
    op_linear router;             /* [E, dim] with bias */
    const void *exp_fc1;          /* [E, 2*inner, dim]: rows [0, inner) the GELU half, [inner, 2*inner) the gate */
    const void *exp_fc2;          /* [E, dim, inner] */
    dtype exp_fc1_dt, exp_fc2_dt; /* 16/32-bit, or DT_Q8 / DT_Q4: rows of q_row_bytes */
} txt_block;

typedef struct md_weights {
    /* vision */
    op_linear patch_emb; /* [enc_dim, in_ch*patch*patch] */
    op_vec pos_emb;      /* [1, n_patches, enc_dim] */
    vit_block *vb;       /* [enc_layers] */
    op_vec post_ln_w, post_ln_b;
    op_linear proj_fc1; /* [proj_inner, 2*enc_dim] */
    op_linear proj_fc2; /* [proj_out, proj_inner] */
    /* text */
    op_vec wte; /* [vocab, dim] */
    txt_block *tb;
    op_vec tpost_w, tpost_b;
    op_linear lm_head; /* [vocab, dim] */
    /* region */
    op_vec coord_features; /* [1, coord_feat/2] (or transposed in legacy files) */
    op_vec size_features;  /* [2, size_feat/2] (or transposed) */
    int features_transposed;
    op_linear coord_enc;            /* [r_dim, coord_feat] */
    op_linear coord_fc1, coord_fc2; /* [r_inner, r_dim], [coord_out, r_inner] */
    op_linear size_enc;             /* [r_dim, size_feat] */
    op_linear size_fc1, size_fc2;   /* [r_inner, r_dim], [size_out, r_inner] */
    /* Moondream 3: single linear decoders, optionally behind a LayerNorm */
    int region_linear;
    op_linear coord_dec, size_dec; /* [coord_out, r_dim], [size_out, r_dim] */
    int region_ln;
    op_vec region_ln_w, region_ln_b; /* [r_dim] */
    /* quant.c: the block-format copies of the text linears, owned here */
    void *quant_mem;
    dtype quant_dt; /* their format, DT_Q8 or DT_Q4 (0 when none) */
} md_weights;

/* Bind weights to the tensors of a safetensors file (2025 or legacy names),
 * checking presence, dtype and shape of every tensor against c. */
albedo_status md_weights_bind(md_weights *w, const md_config *c, const st_file *f, errbuf *e);
/* The same over the shards of a checkpoint (each tensor in exactly one). */
albedo_status md_weights_bind_files(md_weights *w, const md_config *c, const st_file *const *files, int n_files,
                                    errbuf *e);
/* A checkpoint whose tensors are Moondream 3's (tau, routers) under a
 * config.json without "moe": take the expert geometry from the tensors and
 * switch c to Moondream 3. No-op otherwise. */
albedo_status md_config_from_tensors(md_config *c, const st_file *const *files, int n_files, errbuf *e);
void md_weights_release(md_weights *w);

/* quant.c: replace the text decoder's linears (attn.qkv, attn.proj, dense
 * mlp.fc1/fc2 of every layer) and MoE expert tensors by copies in block
 * format dt (DT_Q8 or DT_Q4; DT_BF16 leaves the weights as they are), owned
 * by w and freed by md_weights_quant_free (which md_weights_release calls).
 * Matrices already in dt are kept; other block formats are requantised from
 * their values. The vision encoder, LM head, routers and region model keep
 * their file dtype. Runs on all cores. 16/32-bit sources must be read-only
 * file mappings: their pages are released from the process once copied. */
albedo_status md_weights_quantize(md_weights *w, const md_config *c, dtype dt, errbuf *e);
/* "albedo.version" of the files `albedo quantize` writes (quant.c): 2 since
 * Q4 blocks carry two sub-block scale codes (ops.h qformat); weights.c
 * refuses q4 files of another version. */
#define QUANT_FORMAT_VERSION "2"
void md_weights_quant_free(md_weights *w);
/* "bf16" (or NULL / ""), "q8", "q4" → DT_BF16, DT_Q8, DT_Q4. */
albedo_status md_weights_format(const char *name, dtype *dt, errbuf *e);

/* An expert's slice of a 3-D expert tensor as a linear layer: rows
 * [row0, row0 + n_out) of expert e's [rows_per_expert, n_in] matrix, in
 * any weight dtype (block formats: rows of q_row_bytes(dt, n_in)). */
op_linear md_expert_linear(const void *w, dtype dt, int e, int rows_per_expert, int row0, int n_out, int n_in);

struct albedo_model {
    md_config cfg;
    md_weights w;
    st_file **st; /* the checkpoint's shards, memory-mapped */
    int n_st;
    tokenizer *tok;
    albedo_model_params params;
    img_limits limits;
    float *rope_cos, *rope_sin; /* [max_context, rot_dims/2] */
    /* Element type of every KV cache of this model (sessions, images, the
     * engine's pool): DT_F32 with F32 precision, DT_BF16 with BF16 (half the
     * bytes that decode attention reads; the float32 path stays exact). */
    dtype kv_dt;
    struct mdc_model *cuda; /* backend_cuda.c: the weights on the GPU (backend "cuda"), else NULL */
    /* albedo.c: the engine that runs blocking session runs, made at the first */
    struct albedo_engine *_Atomic engine;
    char describe[256];
};

/* ---- stages ------------------------------------------------------------- */

/* The next token picked where the logits are (the engine's GPU steps,
 * docs/CUDA.md): ids mask[0 .. n_mask) excluded, then argmax (temperature
 * <= 0) or temperature + top-p with the draw a hash of (seed, counter); the
 * id lands in id and the logits row is not brought to the host. */
typedef struct md_pick {
    float temperature, top_p;
    uint64_t seed, counter;
    int32_t mask[2];
    int n_mask;
    int32_t id;
} md_pick;

enum { MD_PICK_GREEDY = 1, MD_PICK_ALL = 2 }; /* md_state.dev_pick */

/* Working memory of one session: buffers sized from the config, the KV
 * cache and the ops context (threads). */
typedef struct md_state {
    const albedo_model *m;
    ops_ctx *ops;
    struct mdc_state *cu; /* backend_cuda.c: device memory and KV cache of a GPU session, else NULL */
    int max_ctx;
    /* KV cache, per layer [max_ctx, Hkv*D] of m->kv_dt */
    void **k_cache, **v_cache;
    /* text scratch for up to t_cap rows */
    int t_cap;
    float *x, *h, *qkv, *att, *mlp, *proj;
    float *logits; /* [max(vocab, coord_out, size_out)] */
    float *feat;   /* [max(coord_feat, size_feat)]: Fourier features */
    float *hidden; /* [dim]: last row of the last forward, before post_ln */
    float *rln;    /* [dim]: region LayerNorm output */
    /* Moondream 3 scratch for up to t_cap rows (NULL for Moondream 2) */
    float *tau_f;         /* [T, (H+2*Hkv)*D]: gelu_erf(qkv) */
    float *tau_q, *tau_v; /* [T, H] */
    float *moe_logits;    /* [T, E] router logits */
    float *moe_x, *moe_y; /* [T, dim]: rows gathered for one expert, its output */
    float *moe_a;         /* [T, 2*inner]: the up projection, both halves */
    float *moe_g;         /* [T, inner]: gelu(first half) * (second half + 1) */
    int32_t *moe_sel;     /* [T, k] selected experts per token */
    float *moe_w;         /* [T, k] their weights */
    int32_t *moe_rows;    /* [T*k] token of each (expert-sorted) assignment */
    float *moe_roww;      /* [T*k] its weight */
    int32_t *moe_count;   /* [E + 1] assignments per expert, then offsets */
    /* Device picks: dev_pick says which picks the forwards of this state's
     * owner may make on the device: MD_PICK_ALL for an engine ticket of a
     * GPU model, MD_PICK_GREEDY (argmax only, so the tokens are the host's)
     * for a blocking session of one; the generation loops then set pick
     * for a step's duration (generate.c, step_pick). */
    int dev_pick;
    md_pick *pick;
} md_state;

albedo_status md_state_init(md_state *s, const albedo_model *m, errbuf *e);
/* The same with n_threads ops threads, and without the contiguous KV cache
 * when with_kv is 0 (the engine's states: their caches live in its pool). */
albedo_status md_state_init_ex(md_state *s, const albedo_model *m, int n_threads, int with_kv, errbuf *e);
void md_state_free(md_state *s);
/* Ensure the text scratch holds T rows. */
albedo_status md_state_reserve(md_state *s, int T, errbuf *e);

/* vision.c: crops [n, cs, cs, 3] u8 → img_emb [n_patches, dim]. If enc_out is
 * not NULL it receives the encoder output [n, n_patches, enc_dim]. */
albedo_status vision_encode(md_state *s, const img_crops *crops, float *img_emb, float *enc_out, errbuf *e);

/* vision.c: the encoder alone on n crops [n, cs, cs, 3] → out [n, np, enc_dim]. */
albedo_status vision_encode_crops(md_state *s, const uint8_t *crops, int n, float *out, errbuf *e);

/* text.c: run T input embeddings [T, dim] at positions pos0.. through the
 * decoder, writing K/V at those positions. Leaves the last row's hidden state
 * (before post_ln) in s->hidden, and its logits in s->logits if want_logits.
 * n_prefix: bidirectional prefix length (prefix_attn with an image, 0 for
 * text-only). */
albedo_status text_forward(md_state *s, const float *emb, int T, int pos0, int n_prefix, int want_logits, errbuf *e);
/* text.c, batched: one segment of a batch — T consecutive rows of the input
 * at positions pos0.., attending over keys 0 .. pos0+T-1 of its own cache.
 * k, v are per-layer cache bases [rows, Hkv*D]; with blocks the segment's
 * position p lives in row blocks[p / block_size]·block_size + p % block_size
 * (the paged pool of kvcache.h), without it in row p (a session's cache). */
typedef struct txt_seg {
    void *const *k, *const *v; /* [n_layers] cache bases, elements of the model's kv_dt */
    const int32_t *blocks;     /* block table, or NULL: contiguous */
    int block_size;
    int pos0, T, n_prefix;
    float *hidden; /* out [dim]: the last row, before post_ln */
    float *logits; /* out [vocab] when not NULL: lm_head(post_ln(hidden)) */
    md_pick *pick; /* instead of logits (the GPU's paged steps): only the picked id comes back */
} txt_seg;

/* Run the segments' rows emb [ΣT, dim] (segment after segment) through the
 * decoder at once: per-row work (LayerNorm, linears, MLP / MoE) over all
 * rows, per-segment work (tau's position term, rotary, cache writes,
 * attention) per segment. logits_scratch [n_logits, vocab] is needed when
 * more than one segment wants logits. text_forward is the one-segment case. */
albedo_status text_forward_batch(md_state *s, const float *emb, txt_seg *segs, int n_seg, float *logits_scratch,
                                 errbuf *e);
/* The token embedding of id into out [dim]. */
void text_embed(const albedo_model *m, int32_t id, float *out);
/* logits [vocab] = lm_head(post_ln(h)). */
void text_logits(md_state *s, const float *h, float *logits);
/* out[i] = logit of token ids[i] only (n rows of the LM head). */
void text_logits_of(md_state *s, const float *h, const int32_t *ids, int n, float *out);

/* backend_cuda.c: the GPU backend's hooks (docs/CUDA.md). md_cuda_requested
 * says whether a backend name ("cuda", "cuda:N") asks for it; the loader
 * then uploads the weights (m->cuda), md_state_init_ex gives sessions with
 * a KV cache their device state (s->cu), and the stages hand their work to
 * it whenever s->cu is set. */
int md_cuda_requested(const char *backend);
albedo_status md_cuda_model_load(albedo_model *m, errbuf *e);
void md_cuda_model_free(albedo_model *m);
const char *md_cuda_describe(const albedo_model *m);
albedo_status md_cuda_state_init(md_state *s, errbuf *e);
void md_cuda_state_free(md_state *s);
albedo_status md_cuda_vision(md_state *s, const img_crops *crops, float *img_emb, float *enc_out, errbuf *e);
albedo_status md_cuda_vision_crops(md_state *s, const uint8_t *crops, int n, float *out, errbuf *e);
albedo_status md_cuda_forward_batch(md_state *s, const float *emb, txt_seg *segs, int n_seg, errbuf *e);
/* The image prefix (vision, BOS + image tokens through the decoder) on the
 * device; *prefix gets a device copy of its KV for the albedo_image. */
albedo_status md_cuda_image_prefix(md_state *s, const img_crops *crops, void **prefix, errbuf *e);
void md_cuda_prefix_load(md_state *s, const void *prefix);
void md_cuda_prefix_free(void *prefix);
/* The engine on the GPU (scheduler.c): a state without its own KV cache
 * for paged steps of up to rows rows and seqs sequences over a pool of
 * block_size positions a block (with vision memory for the image worker);
 * the device KV pool's memory hooks (kvcache.h's kv_mem) and the bytes it
 * may take by default; the image prefix prefilled straight into the pool's
 * blocks. text_forward_batch runs paged segments of such a state on the
 * device. */
struct kv_mem;
albedo_status md_cuda_engine_state_init(md_state *s, int rows, int seqs, int block_size, int vision, errbuf *e);
void md_cuda_kv_mem(const albedo_model *m, struct kv_mem *out);
size_t md_cuda_kv_default_bytes(const albedo_model *m);
/* Bytes of one element of the device KV pool: 2 (bf16) or 1 (the fp8 cache,
 * albedo_model_params.kv_dtype "fp8"). */
size_t md_cuda_kv_elem_bytes(const albedo_model *m);
albedo_status md_cuda_prefix_paged(md_state *s, const img_crops *crops, void *const *k, void *const *v, int block_size,
                                   const int32_t *blocks, int n_blocks, errbuf *e);
/* Page-lock (on) or release host memory that paged steps copy logits into. */
void md_cuda_host_pin(void *p, size_t bytes, int on);

/* region.c */
void region_encode_coord(md_state *s, float v, float *out);         /* out [dim] */
void region_encode_size(md_state *s, float w, float h, float *out); /* out [dim] */
/* Argmax bins of the coordinate / size decoders on hidden h [dim]. */
int region_decode_coord(md_state *s, const float *h, float *margin);
void region_decode_size(md_state *s, const float *h, int *w_bin, int *h_bin);

/* synth.c (internal): write preset with its safetensors split into shards
 * of at most shard_bytes (0: one file) plus model.safetensors.index.json;
 * and the tensor and parameter counts of a preset without writing it. */
albedo_status synth_write_sharded(const char *dir, const char *preset, uint64_t seed, int legacy_f16,
                                  const char *tokenizer_json, uint64_t shard_bytes);
albedo_status synth_plan(const char *preset, int *n_tensors, int64_t *n_params);

#endif
