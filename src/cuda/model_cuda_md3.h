/*
 * model_cuda_md3.h — Moondream 3's part of the GPU model runner, internal to
 * src/cuda/ (model_cuda.cu calls it; docs/CUDA.md). The runner keeps
 * Moondream 2's stages (vision, prefix, text layers, LM head) and asks this
 * file for the two things Moondream 3 changes in a text block:
 *
 *   md3_tau   after the fused qkv projection, before rotary and the cache
 *             write: f = gelu_erf(qkv) (bf16), scores = f·[wq ‖ wv]ᵀ
 *             (cuda_linear, float32), then Q and V scaled in place by
 *             cuda_tau_scale (the position from the host or, in the decode
 *             graph, from device memory);
 *   md3_moe   in place of fc1/fc2 from the first MoE layer on: router
 *             (cuda_linear with bias, float32 logits), cuda_moe_route (top-k,
 *             softmax over the selected), cuda_moe_mlp (x += the experts).
 *
 * md3_model holds the tau matrices, alphas, routers and experts (bf16,
 * padded to multiples of 8 columns) in one device allocation; md3_state a
 * state's working memory for up to max_ctx rows (a session's context, or a
 * paged state's rows). Both are allocated once
 * (at load, at session creation); the calls allocate nothing and can be
 * captured into a CUDA graph.
 */
#ifndef ALBEDO_MODEL_CUDA_MD3_H
#define ALBEDO_MODEL_CUDA_MD3_H

#include "model_cuda.h"
#include "ops_cuda.h"

typedef struct md3_model md3_model;
typedef struct md3_state md3_state;

/* Upload d->md3's tensors to the current device. Fails with
 * ALBEDO_ERR_OUT_OF_MEMORY (both sizes in the message) when they and
 * session_extra more bytes (one session's other memory) do not fit the free
 * memory; with ALBEDO_ERR_UNSUPPORTED for shapes the kernels cannot take. */
albedo_status md3_model_new(const mdc_desc *d, size_t session_extra, md3_model **out, errbuf *e);
void md3_model_free(md3_model *m); /* NULL is a no-op */
size_t md3_model_bytes(const md3_model *m);
size_t md3_state_bytes(const md3_model *m, int max_ctx);
albedo_status md3_state_new(const md3_model *m, int max_ctx, md3_state **out, errbuf *e);
void md3_state_free(md3_state *s); /* NULL is a no-op */
/* Whether layer l's MLP is the experts. */
int md3_layer_moe(const md3_model *m, int l);

/* Tau on T rows of qkv [T, ldq] bf16 at positions pos0.. (or *pos_dev), or
 * at pos_rows[t · pos_stride] (device memory: the engine's paged steps, one
 * position per row). Tg >= T: the rows the score linear runs over (the
 * paged steps' bucketed row count, rows past T stale but finite). */
albedo_status md3_tau(const md3_model *m, md3_state *s, cuda_ctx *ctx, int l, uint16_t *qkv, int ldq, int T, int Tg,
                      int pos0, const int *pos_dev, const int *pos_rows, int pos_stride, errbuf *e);
/* x [T, ldx] += the experts of layer l on h [T, ldh] (bf16, padding
 * columns zeros), or x = their sum with store (the decode steps' second
 * branch, joined into the residual later: the same float sum); the router
 * linear over Tg >= T rows. The expert path follows T alone (GEMVs up to
 * CUDA_MOE_GEMV_MAX_T rows, grouped GEMMs above), so a graph captured for T
 * rows replays for any routing. Writes the state's rlog, sel, wt and
 * scratch only (md3_tau writes f and scores), so the two may run on two
 * streams at once. */
albedo_status md3_moe(const md3_model *m, md3_state *s, cuda_ctx *ctx, int l, const uint16_t *h, int ldh, float *x,
                      int ldx, int T, int Tg, int store, errbuf *e);

#endif
