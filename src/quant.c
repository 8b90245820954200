/*
 * quant.c — quantised weights (docs/QUANT.md): the text decoder's linears
 * and Moondream 3's experts converted at load time into albedo's block
 * formats (ops.h qformat), and `albedo quantize`, which stores them so that
 * later loads map them from the file instead.
 *
 *   which:  per text layer attn.qkv, attn.proj and either the dense
 *           mlp.fc1, mlp.fc2 or (MoE layers) the expert tensors
 *           mlp.fc1.weight [E, 2·inner, dim] and mlp.fc2.weight
 *           [E, dim, inner], each seen as one [E·rows, K] matrix: row r of
 *           expert e is row e·rows + r, at (e·rows + r)·q_row_bytes(K)
 *           (md_expert_linear); and the LM head, in Q8 in both recipes,
 *           as is the first layer's attn.qkv (text_mats). The vision encoder keeps 16 bits (it runs once
 *           per image, compute-bound); the region model keeps its dtype.
 *           The routers stay as stored: [E, dim] is tiny and routing is
 *           sensitive (a flipped top-8 choice changes the whole MLP).
 *   how:    row by row with q_quantize_row (ops_ref.c), the rows of each
 *           matrix split over all cores; one allocation owns every copy.
 *           Once a matrix is converted, the pages of its 16-bit source are
 *           released from the process (madvise): the file mapping stays,
 *           so nothing is lost, but the source no longer counts towards the
 *           resident set, which for Moondream 3 (16 GB of bf16 experts)
 *           would otherwise reach the machine's memory during the load.
 *   stored: model.safetensors with each quantised weight as a U8 tensor
 *           [N, q_row_bytes(K)] (experts: [E, rows, q_row_bytes(K)]) under
 *           its usual name, and "__metadata__" {"albedo.format": "q8"|"q4",
 *           "albedo.version": "2"}; weights.c binds those tensors as DT_Q8 /
 *           DT_Q4 in place (mapped, no copy); a q4 file's Q8 tensors (the
 *           LM head, layer 0's attn.qkv) are told apart by their row bytes.
 *           Version 2 is Q4 with two scale codes per block (ops.h); a
 *           version 1 q4 file (one f16 scale) is refused, q8 is unchanged.
 */
#define _DEFAULT_SOURCE /* madvise */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model.h"

albedo_status md_weights_format(const char *name, dtype *dt, errbuf *e) {
    if (!name || !*name || !strcmp(name, "bf16"))
        *dt = DT_BF16;
    else if (!strcmp(name, "q8"))
        *dt = DT_Q8;
    else if (!strcmp(name, "q4"))
        *dt = DT_Q4;
    else
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "weights '%s': expected bf16, q8 or q4", name);
    return ALBEDO_OK;
}

/* One matrix quant.c converts: a linear's [N, K] weight, or a 3-D expert
 * tensor [E, N/E, K] taken as N rows. *w and *dt are what the model reads:
 * they are pointed at the copy. */
typedef struct qmat {
    const void **w;
    dtype *dt;
    int n_rows, n_in; /* N (all experts' rows), K */
    int n_experts;    /* 0: a 2-D linear; E: a 3-D expert tensor */
    dtype want;       /* the block format the recipe gives it */
} qmat;

#define QMATS_PER_LAYER 4

/* The matrices quant.c converts, in a fixed order, with the format of each
 * in recipe fmt; returns their count. The recipes: "q8" is Q8 throughout;
 * "q4" is Q4 but for two matrices that stay Q8: the LM head (its 51200 rows
 * are a tenth of the bytes Q4 saves, and the logits are what the argmax
 * reads) and the first layer's attn.qkv, the most sensitive linear for its
 * size (docs/QUANT.md: the K and V it makes of every position, the image
 * prefix's included, feed every later token, and its error passes through
 * every later layer): about 1% of Moondream 2's decoder bytes. */
static int text_mats(md_weights *w, const md_config *c, dtype fmt, qmat *out) {
    int n = 0;
    for (int i = 0; i < c->n_layers; i++) {
        txt_block *t = &w->tb[i];
        out[n++] = (qmat){&t->qkv.w, &t->qkv.dt, t->qkv.n_out, t->qkv.n_in, 0, i == 0 ? DT_Q8 : fmt};
        out[n++] = (qmat){&t->proj.w, &t->proj.dt, t->proj.n_out, t->proj.n_in, 0, fmt};
        if (!t->moe) {
            out[n++] = (qmat){&t->fc1.w, &t->fc1.dt, t->fc1.n_out, t->fc1.n_in, 0, fmt};
            out[n++] = (qmat){&t->fc2.w, &t->fc2.dt, t->fc2.n_out, t->fc2.n_in, 0, fmt};
        } else {
            const int E = c->moe_experts, I = c->moe_inner;
            out[n++] = (qmat){&t->exp_fc1, &t->exp_fc1_dt, E * 2 * I, c->dim, E, fmt};
            out[n++] = (qmat){&t->exp_fc2, &t->exp_fc2_dt, E * c->dim, I, E, fmt};
        }
    }
    out[n++] = (qmat){&w->lm_head.w, &w->lm_head.dt, w->lm_head.n_out, w->lm_head.n_in, 0, DT_Q8};
    return n;
}

/* Row n of a [N, K] matrix of any weight dtype as float32. */
static void weight_row(const void *w, dtype dt, int K, size_t n, float *out) {
    if (dt == DT_Q8 || dt == DT_Q4) {
        q_dequantize_row(dt, (const char *)w + n * q_row_bytes(dt, K), K, out);
        return;
    }
    const size_t base = n * (size_t)K;
    for (int k = 0; k < K; k++) {
        switch (dt) {
        case DT_BF16: out[k] = bf16_to_f32(((const uint16_t *)w)[base + k]); break;
        case DT_F16: out[k] = f16_to_f32(((const uint16_t *)w)[base + k]); break;
        default: out[k] = ((const float *)w)[base + k]; break;
        }
    }
}

/* Bytes of a matrix in dt (block formats: rows of q_row_bytes). */
static size_t mat_bytes(dtype dt, int n_rows, int n_in) {
    const size_t rb = q_row_bytes(dt, n_in);
    return (rb ? rb : (size_t)n_in * dtype_size(dt)) * (size_t)n_rows;
}

/* Drop the whole pages of [p, p + n) from the resident set. Only for the
 * read-only file mappings of the checkpoint: a later read faults the bytes
 * back in from the file (they usually still sit in the page cache). */
static void release_pages(const void *p, size_t n) {
    const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1), b = ((uintptr_t)p + n) & ~(page - 1);
    if (page > 1 && b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

#define QUANT_TASKS 64 /* row chunks per matrix: a few per core, evenly loaded */

typedef struct quant_job {
    const void *src;
    dtype src_dt, dt;
    int n_rows, n_in;
    char *dst;
    size_t rb;
    float **rowbuf;       /* one [K] buffer per task */
    q4_block_fn q4_block; /* the fastest Q4 quantiser here (the same bytes) */
} quant_job;

static void quant_task(void *arg, int task) {
    const quant_job *j = arg;
    const size_t N = (size_t)j->n_rows;
    const size_t r0 = task * N / QUANT_TASKS, r1 = (task + 1) * N / QUANT_TASKS;
    float *row = j->rowbuf[task];
    for (size_t n = r0; n < r1; n++) {
        weight_row(j->src, j->src_dt, j->n_in, n, row);
        q_quantize_row_with(j->q4_block, j->dt, row, j->n_in, j->dst + n * j->rb);
    }
}

void md_weights_quant_free(md_weights *w) {
    free(w->quant_mem);
    w->quant_mem = NULL;
    w->quant_dt = (dtype)0;
}

albedo_status md_weights_quantize(md_weights *w, const md_config *c, dtype dt, errbuf *e) {
    if (dt == DT_BF16) return ALBEDO_OK;
    if (dt != DT_Q8 && dt != DT_Q4)
        return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "quantize: dtype %s is not a block format", dtype_name(dt));
    if (!w->tb) return errf(e, ALBEDO_ERR_INVALID_ARGUMENT, "quantize: weights are not bound");
    qmat *ms = calloc((size_t)c->n_layers * QMATS_PER_LAYER + 2, sizeof *ms);
    if (!ms) return errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    const int n = text_mats(w, c, dt, ms);
    /* One allocation for every matrix not already in dt, each 64-byte aligned. */
    size_t total = 0, max_k = 1;
    for (int i = 0; i < n; i++) {
        if (*ms[i].dt == ms[i].want) continue;
        total += (mat_bytes(ms[i].want, ms[i].n_rows, ms[i].n_in) + 63) & ~(size_t)63;
        if ((size_t)ms[i].n_in > max_k) max_k = (size_t)ms[i].n_in;
    }
    if (total == 0) {
        free(ms);
        return ALBEDO_OK;
    }
    void *mem = NULL;
    float *rows = malloc(QUANT_TASKS * max_k * sizeof *rows);
    ops_ctx *ctx = NULL;
    albedo_status st = ALBEDO_OK;
    mem = big_alloc(total); /* in huge pages: decode streams it every token */
    if (!mem || !rows)
        st = errf(e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory for %.1f MB of %s weights", (double)total / 1e6,
                  dtype_name(dt));
    if (!st) st = ops_ctx_new("generic", 0, OPS_F32, &ctx, e); /* 0 threads: every core */
    if (st) {
        free(mem);
        free(rows);
        free(ms);
        return st;
    }
    float *rowbuf[QUANT_TASKS];
    for (int i = 0; i < QUANT_TASKS; i++) rowbuf[i] = rows + (size_t)i * max_k;
    char *p = mem;
    const q4_block_fn q4b = cpu_q4_search(NULL);
    for (int i = 0; i < n; i++) {
        const qmat *q = &ms[i];
        if (*q->dt == q->want) continue;
        quant_job j = {*q->w, *q->dt, q->want, q->n_rows, q->n_in, p, q_row_bytes(q->want, q->n_in), rowbuf, q4b};
        ops_parallel_for(ctx, QUANT_TASKS, quant_task, &j);
        /* 16/32-bit sources are the mapped checkpoint; a block-format source
         * may be an earlier call's copy (freed below), never released. */
        if (j.src_dt == DT_BF16 || j.src_dt == DT_F16 || j.src_dt == DT_F32)
            release_pages(j.src, mat_bytes(j.src_dt, q->n_rows, q->n_in));
        *q->w = p;
        *q->dt = q->want;
        p += (j.rb * (size_t)q->n_rows + 63) & ~(size_t)63;
    }
    ops_ctx_free(ctx);
    free(rows);
    free(ms);
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
    /* Load as stored, remember where each matrix's tensor lies, then convert. */
    p.weights = NULL;
    albedo_model *m = NULL;
    if ((st = albedo_model_load(dir, &p, &m))) return st; /* albedo_last_error is set */
    qmat *ms = calloc((size_t)m->cfg.n_layers * QMATS_PER_LAYER + 2, sizeof *ms);
    const void **orig = calloc((size_t)m->cfg.n_layers * QMATS_PER_LAYER + 2, sizeof *orig);
    int n = 0, nt = 0;
    for (int i = 0; i < m->n_st; i++) nt += st_count(m->st[i]);
    st_tensor *ts = calloc((size_t)nt + 1, sizeof *ts);
    if (!ms || !orig || !ts) st = errf(&e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
    if (!st) {
        n = text_mats(&m->w, &m->cfg, dt, ms);
        for (int i = 0; i < n; i++) orig[i] = *ms[i].w;
        st = md_weights_quantize(&m->w, &m->cfg, dt, &e);
    }
    if (!st && mkdir(out_dir, 0755) && errno != EEXIST)
        st = errf(&e, ALBEDO_ERR_IO, "%s: %s", out_dir, strerror(errno));
    char path[4096], from[4096];
    if (!st) {
        int k = 0;
        for (int s = 0; s < m->n_st; s++)
            for (int i = 0; i < st_count(m->st[s]); i++) {
                const st_tensor *t = st_at(m->st[s], i);
                ts[k] = *t;
                for (int l = 0; l < n; l++) {
                    if (orig[l] != t->data) continue;
                    const qmat *q = &ms[l];
                    const size_t rb = q_row_bytes(q->want, q->n_in);
                    ts[k].dt = DT_U8;
                    if (q->n_experts) { /* [E, rows, row bytes] */
                        ts[k].ndim = 3;
                        ts[k].shape[0] = q->n_experts;
                        ts[k].shape[1] = q->n_rows / q->n_experts;
                        ts[k].shape[2] = (int64_t)rb;
                    } else {
                        ts[k].ndim = 2;
                        ts[k].shape[0] = q->n_rows;
                        ts[k].shape[1] = (int64_t)rb;
                    }
                    ts[k].numel = (int64_t)(rb * (size_t)q->n_rows);
                    ts[k].nbytes = rb * (size_t)q->n_rows;
                    ts[k].data = *q->w;
                    break;
                }
                k++;
            }
        const char *meta[] = {"albedo.format", dt == DT_Q8 ? "q8" : "q4", "albedo.version", QUANT_FORMAT_VERSION};
        snprintf(path, sizeof path, "%s/model.safetensors", out_dir);
        st = st_write_meta(path, ts, k, meta, 2, &e);
    }
    static const char *const copies[] = {"config.json", "tokenizer.json"};
    for (int i = 0; i < 2 && !st; i++) {
        snprintf(from, sizeof from, "%s/%s", dir, copies[i]);
        snprintf(path, sizeof path, "%s/%s", out_dir, copies[i]);
        st = copy_file(from, path, &e);
    }
    free(ms);
    free(orig);
    free(ts);
    albedo_model_free(m);
    if (st) error_set_last(e.msg);
    return st;
}
