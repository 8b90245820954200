/*
 * quant.c — quantised weights (docs/QUANT.md): the text decoder's linears
 * converted at load time into albedo's block formats (ops.h qformat), and
 * `albedo quantize`, which stores them so that later loads map them from
 * the file instead.
 *
 *   which:  per text layer attn.qkv, attn.proj and (dense layers) mlp.fc1,
 *           mlp.fc2 — about 93% of Moondream 2's decode bytes. The vision
 *           encoder keeps 16 bits (it runs once per image, compute-bound);
 *           the LM head, region model and MoE experts keep their dtype
 *           (text_logits_of and md_expert_linear address rows by element
 *           size, which a block format does not have).
 *   how:    row by row with q_quantize_row (ops_ref.c), the rows of each
 *           matrix split over all cores; one allocation owns every copy.
 *   stored: model.safetensors with each quantised weight as a U8 tensor
 *           [N, q_row_bytes(K)] under its usual name, and "__metadata__"
 *           {"albedo.format": "q8"|"q4", "albedo.version": "1"}; weights.c
 *           binds those tensors as DT_Q8 / DT_Q4 in place (mapped, no copy).
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "model.h"

albedo_status md_weights_format(const char *name, dtype *dt, errbuf *e) {
    if (!name || !*name || !strcmp(name, "bf16")) *dt = DT_BF16;
    else if (!strcmp(name, "q8")) *dt = DT_Q8;
    else if (!strcmp(name, "q4")) *dt = DT_Q4;
    else return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "weights '%s': expected bf16, q8 or q4", name);
    return ALBEDO_OK;
}

/* The linears quant.c converts, in a fixed order; returns their count
 * (at most 4 per layer). */
static int text_linears(md_weights *w, const md_config *c, op_linear **out) {
    int n = 0;
    for (int i = 0; i < c->n_layers; i++) {
        txt_block *t = &w->tb[i];
        out[n++] = &t->qkv;
        out[n++] = &t->proj;
        if (!t->moe) {
            out[n++] = &t->fc1;
            out[n++] = &t->fc2;
        }
    }
    return n;
}

/* Row n of L's weight as float32, for any weight dtype. */
static void weight_row(const op_linear *L, int n, float *out) {
    const int K = L->n_in;
    if (L->dt == DT_Q8 || L->dt == DT_Q4) {
        q_dequantize_row(L->dt, (const char *)L->w + (size_t)n * q_row_bytes(L->dt, K), K, out);
        return;
    }
    const size_t base = (size_t)n * (size_t)K;
    for (int k = 0; k < K; k++) {
        switch (L->dt) {
        case DT_BF16: out[k] = bf16_to_f32(((const uint16_t *)L->w)[base + k]); break;
        case DT_F16: out[k] = f16_to_f32(((const uint16_t *)L->w)[base + k]); break;
        default: out[k] = ((const float *)L->w)[base + k]; break;
        }
    }
}

#define QUANT_TASKS 64 /* row chunks per matrix: a few per core, evenly loaded */

typedef struct quant_job {
    const op_linear *src;
    dtype dt;
    char *dst;
    size_t rb;
    float **rowbuf; /* one [K] buffer per task */
} quant_job;

static void quant_task(void *arg, int task) {
    const quant_job *j = arg;
    const int N = j->src->n_out;
    const int r0 = (int)((long long)task * N / QUANT_TASKS), r1 = (int)((long long)(task + 1) * N / QUANT_TASKS);
    float *row = j->rowbuf[task];
    for (int n = r0; n < r1; n++) {
        weight_row(j->src, n, row);
        q_quantize_row(j->dt, row, j->src->n_in, j->dst + (size_t)n * j->rb);
    }
}

void md_weights_quant_free(md_weights *w) {
    free(w->quant_mem);
    w->quant_mem = NULL;
    w->quant_dt = (dtype)0;
}

albedo_status md_weights_quantize(md_weights *w, const md_config *c, dtype dt, errbuf *e) {
    if (dt == DT_BF16) return ALBEDO_OK;
    if (dt != DT_Q8 && dt != DT_Q4) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "quantize: dtype %s is not a block format", dtype_name(dt));
    if (!w->tb) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "quantize: weights are not bound");
    op_linear **ls = calloc((size_t)c->n_layers * 4 + 1, sizeof *ls);
    if (!ls) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    const int n = text_linears(w, c, ls);
    /* One allocation for every matrix not already in dt, each 64-byte aligned. */
    size_t total = 0, max_k = 1;
    for (int i = 0; i < n; i++) {
        if (ls[i]->dt == dt) continue;
        total += (q_row_bytes(dt, ls[i]->n_in) * (size_t)ls[i]->n_out + 63) & ~(size_t)63;
        if ((size_t)ls[i]->n_in > max_k) max_k = (size_t)ls[i]->n_in;
    }
    if (total == 0) {
        free(ls);
        return ALBEDO_OK;
    }
    void *mem = NULL;
    float *rows = malloc(QUANT_TASKS * max_k * sizeof *rows);
    ops_ctx *ctx = NULL;
    albedo_status st = ALBEDO_OK;
    if (posix_memalign(&mem, 64, total) || !rows)
        st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for %.1f MB of %s weights", (double)total / 1e6,
                  dtype_name(dt));
    if (!st) st = ops_ctx_new("generic", 0, OPS_F32, &ctx, e);
    if (st) {
        free(mem);
        free(rows);
        free(ls);
        return st;
    }
    float *rowbuf[QUANT_TASKS];
    for (int i = 0; i < QUANT_TASKS; i++) rowbuf[i] = rows + (size_t)i * max_k;
    char *p = mem;
    for (int i = 0; i < n; i++) {
        op_linear *L = ls[i];
        if (L->dt == dt) continue;
        quant_job j = {L, dt, p, q_row_bytes(dt, L->n_in), rowbuf};
        ops_parallel_for(ctx, QUANT_TASKS, quant_task, &j);
        L->w = p;
        L->dt = dt;
        p += (j.rb * (size_t)L->n_out + 63) & ~(size_t)63;
    }
    ops_ctx_free(ctx);
    free(rows);
    free(ls);
    free(w->quant_mem); /* copies of an earlier call, no longer referenced */
    w->quant_mem = mem;
    w->quant_dt = dt;
    return ALBEDO_OK;
}

/* ---- albedo quantize ----------------------------------------------------------- */

static albedo_status copy_file(const char *from, const char *to, errbuf *e) {
    uint8_t *buf = NULL;
    size_t len = 0;
    albedo_status st = read_file(from, (size_t)1 << 30, &buf, &len, e);
    if (st) return st;
    FILE *f = fopen(to, "wb");
    int ok = f && fwrite(buf, 1, len, f) == len;
    if (f && fclose(f)) ok = 0;
    free(buf);
    return ok ? ALBEDO_OK : errf(e, ALBEDO_ERR_IO, "%s: write failed", to);
}

albedo_status albedo_model_quantize(const char *dir, const albedo_model_params *params, const char *out_dir) {
    errbuf e = {{0}};
    albedo_model_params p = params ? *params : albedo_model_params_default();
    dtype dt;
    albedo_status st = md_weights_format(p.weights, &dt, &e);
    if (!st && dt == DT_BF16) st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "quantize: weights must be q8 or q4");
    if (!st && (!dir || !out_dir || !*out_dir)) st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "quantize: no directory");
    if (st) {
        error_set_last(e.msg);
        return st;
    }
    /* Load as stored, remember where each linear's tensor lies, then convert. */
    p.weights = NULL;
    albedo_model *m = NULL;
    if ((st = albedo_model_load(dir, &p, &m))) return st; /* albedo_last_error is set */
    op_linear **ls = calloc((size_t)m->cfg.n_layers * 4 + 1, sizeof *ls);
    const void **orig = calloc((size_t)m->cfg.n_layers * 4 + 1, sizeof *orig);
    int n = 0, nt = 0;
    for (int i = 0; i < m->n_st; i++) nt += st_count(m->st[i]);
    st_tensor *ts = calloc((size_t)nt + 1, sizeof *ts);
    if (!ls || !orig || !ts) st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    if (!st) {
        n = text_linears(&m->w, &m->cfg, ls);
        for (int i = 0; i < n; i++) orig[i] = ls[i]->w;
        st = md_weights_quantize(&m->w, &m->cfg, dt, &e);
    }
    if (!st && mkdir(out_dir, 0755) && errno != EEXIST) st = errf(&e, ALBEDO_ERR_IO, "%s: %s", out_dir, strerror(errno));
    char path[4096], from[4096];
    if (!st) {
        int k = 0;
        for (int s = 0; s < m->n_st; s++)
            for (int i = 0; i < st_count(m->st[s]); i++) {
                const st_tensor *t = st_at(m->st[s], i);
                ts[k] = *t;
                for (int l = 0; l < n; l++) {
                    if (orig[l] != t->data) continue;
                    const size_t rb = q_row_bytes(dt, ls[l]->n_in);
                    ts[k].dt = DT_U8;
                    ts[k].ndim = 2;
                    ts[k].shape[0] = ls[l]->n_out;
                    ts[k].shape[1] = (int64_t)rb;
                    ts[k].numel = (int64_t)(rb * (size_t)ls[l]->n_out);
                    ts[k].nbytes = rb * (size_t)ls[l]->n_out;
                    ts[k].data = ls[l]->w;
                    break;
                }
                k++;
            }
        const char *meta[] = {"albedo.format", dt == DT_Q8 ? "q8" : "q4", "albedo.version", "1"};
        snprintf(path, sizeof path, "%s/model.safetensors", out_dir);
        st = st_write_meta(path, ts, k, meta, 2, &e);
    }
    static const char *const copies[] = {"config.json", "tokenizer.json"};
    for (int i = 0; i < 2 && !st; i++) {
        snprintf(from, sizeof from, "%s/%s", dir, copies[i]);
        snprintf(path, sizeof path, "%s/%s", out_dir, copies[i]);
        st = copy_file(from, path, &e);
    }
    free(ls);
    free(orig);
    free(ts);
    albedo_model_free(m);
    if (st) error_set_last(e.msg);
    return st;
}
