/*
 * bench_decode.cu — the CUDA backend at Moondream 2's full shapes with
 * random bf16 weights (never zeros), timed with device events after
 * warm-up, median of many CUDA-graph replays. Prints a table:
 *
 *   1. decode, batch 1, at depth 740 (an image prefix of 730 + 10 tokens):
 *      embedding row -> 24 × {LN, qkv GEMV, rope + KV write, attention
 *      over 741 keys, proj GEMV (+= x), fc1 GEMV + gelu, fc2 GEMV (+= x)}
 *      -> LN -> lm_head GEMV -> argmax, all in one graph whose argmax
 *      feeds the next replay's embedding; against the floor = bytes read
 *      per token / the copy bandwidth measured in the same run; and the
 *      same step with the MLP on a second stream beside the attention
 *      (the model runner's decode graph, docs/CUDA.md);
 *   2. prefill of the 730-token image prefix (T = 730, bidirectional),
 *      and 3. the vision encoder's 27 layers over 9 crops (T = 6561): the
 *      linears alone through cuBLASLt, attention alone, and whole layers,
 *      in TFLOP/s and as a fraction of 790 TFLOP/s (an 8192³ bf16 GEMM
 *      through the same cuda_linear is measured beside it).
 *
 *   bench_decode [replays=100]
 *   bench_decode [replays] linear  one text forward's 96 linears over 1..128
 *                                  rows, GEMV against cuBLASLt
 *   bench_decode [replays] attn    only the flash attention, under each
 *                                  block geometry (cuda_ctx_set_flash):
 *                                  vision's 27 layers, the 730-token
 *                                  prefix's 24, a 20-row prompt's 24
 * Build: cmake -S . -B build-cuda -DALBEDO_CUDA=ON && cmake --build build-cuda --target bench_decode
 * Pass -DALBEDO_COMMIT='"<hash>"' (CMAKE_CUDA_FLAGS) to have the commit printed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "cuda/ops_cuda.h"

#ifndef ALBEDO_COMMIT
#define ALBEDO_COMMIT "unknown"
#endif

static cuda_ctx *G;
static cudaStream_t S;
/* The forked decode graph's second branch (model_cuda.cu, text_layers):
 * fc1 on G2's stream beside qkv, rotary and attention. */
static cuda_ctx *G2;
static cudaEvent_t EV_FORK, EV_JOIN;

#define CK(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define OP(call)                                                                              \
    do {                                                                                      \
        albedo_status s_ = (call);                                                            \
        if (s_ != ALBEDO_OK) {                                                                \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cuda_ctx_error(G)); \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

/* ---- random device tensors ---------------------------------------------------- */

__global__ void fill_bf16_kernel(uint16_t *p, size_t n, uint64_t seed, float lo, float hi) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = seed + i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * 0x1.0p-24f, v = lo + (hi - lo) * u;
        if (v == 0.0f) v = hi * 0.5f;
        __nv_bfloat16 b = __float2bfloat16_rn(v);
        p[i] = *(uint16_t *)&b;
    }
}

static uint64_t g_seed = 1;

static uint16_t *rand_bf16(size_t n, float lo, float hi) {
    uint16_t *p;
    CK(cudaMalloc((void **)&p, n * 2));
    fill_bf16_kernel<<<1024, 256, 0, S>>>(p, n, (g_seed++) * 0x1234567ull, lo, hi);
    CK(cudaGetLastError());
    return p;
}

__global__ void fill_f32_kernel(float *p, size_t n, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = seed + i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        p[i] = (float)(z >> 40) * 0x1.0p-23f - 1.0f + 0x1.0p-25f; /* (-1, 1), never 0 */
    }
}

static float *rand_f32(size_t n) {
    float *p;
    CK(cudaMalloc((void **)&p, n * 4));
    fill_f32_kernel<<<1024, 256, 0, S>>>(p, n, (g_seed++) * 0x7654321ull);
    CK(cudaGetLastError());
    return p;
}

/* A plain copy kernel, four 16-byte loads in flight per thread: the copy
 * engine behind cudaMemcpy does not always reach what kernels can. */
__global__ void copy_kernel(uint4 *dst, const uint4 *src, size_t n) {
    const size_t st = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i + 3 * st < n; i += 4 * st) {
        uint4 a = src[i], b = src[i + st], c = src[i + 2 * st], d = src[i + 3 * st];
        dst[i] = a, dst[i + st] = b, dst[i + 2 * st] = c, dst[i + 3 * st] = d;
    }
    for (; i < n; i += st) dst[i] = src[i];
}

static void *dalloc(size_t bytes) {
    void *p;
    CK(cudaMalloc(&p, bytes));
    CK(cudaMemsetAsync(p, 0, bytes, S));
    return p;
}

/* A linear layer with weights ~ U(-a, a), a = sqrt(3/K): unit-variance outputs. */
static cuda_linear_w lin(int N, int K) {
    float a = sqrtf(3.0f / K);
    cuda_linear_w L;
    L.w = rand_bf16((size_t)N * K, -a, a);
    L.b = rand_bf16((size_t)N, -0.1f, 0.1f);
    L.bdt = DT_BF16;
    L.n_out = N;
    L.n_in = K;
    return L;
}

static size_t lin_bytes(const cuda_linear_w *L) { return (size_t)L->n_out * L->n_in * 2 + (size_t)L->n_out * 2; }
static double lin_flops(const cuda_linear_w *L, int T) { return 2.0 * T * L->n_out * L->n_in; }

/* ---- timing --------------------------------------------------------------------- */

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

/* Median milliseconds of one replay of g over reps timed replays (after
 * warm-up replays). */
static float time_graph(cudaGraphExec_t g, int reps, int warm) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int i = 0; i < warm; i++) CK(cudaGraphLaunch(g, S));
    CK(cudaStreamSynchronize(S));
    float *t = (float *)malloc(reps * sizeof(float));
    for (int i = 0; i < reps; i++) {
        CK(cudaEventRecord(e0, S));
        CK(cudaGraphLaunch(g, S));
        CK(cudaEventRecord(e1, S));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&t[i], e0, e1));
    }
    qsort(t, reps, sizeof(float), cmp_float);
    float m = t[reps / 2];
    free(t);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return m;
}

typedef void (*step_fn)(void *);

/* Run fn once eagerly (cuBLASLt plans are made then), capture it into a
 * graph, and return the median replay time. */
static float time_step(step_fn fn, void *arg, int reps) {
    fn(arg);
    CK(cudaStreamSynchronize(S));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(S, cudaStreamCaptureModeGlobal));
    fn(arg);
    CK(cudaStreamEndCapture(S, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    float ms = time_graph(exec, reps, 5);
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    return ms;
}

/* ---- the text model ----------------------------------------------------------------- */

enum { TC = 2048, TH = 32, TD = 64, TR = 32, TF = 8192, TV = 51200, TL = 24, NCTX = 2048 };
enum { DEPTH = 740, PREFIX = 730 };

typedef struct tlayer {
    uint16_t *ln_g, *ln_b;
    cuda_linear_w qkv, proj, fc1, fc2;
    uint16_t *kc, *vc; /* [TH, NCTX, TD] */
} tlayer;

typedef struct text {
    tlayer l[TL];
    uint16_t *wte, *post_g, *post_b;
    cuda_linear_w head;
    float *cos_t, *sin_t;
    int T, pos0, n_prefix; /* the step's shape */
    float *x, *logits;
    uint16_t *h, *qkv, *att, *f;
    int32_t *ids;
    int what;
    /* Whole decode steps as the model runner's decode graph: 1 fc1 on G2's
     * stream; 2 fc1 and fc2 (into y2, then x += y2: the model's form). (A
     * third form, the add fused into the next layernorm, measured 1.24
     * against 1.18 ms on an H100 and was removed with its kernel.) */
    int fork;
    float *y2; /* [TC] */
} text;

/* what: 0 the whole step; 1 the linears alone; 2, 3, 4 the 24 layernorms,
 * rope + KV writes, or attentions alone (the decode breakdown). */
static void text_step(void *arg) {
    text *m = (text *)arg;
    const int T = m->T, all = m->what == 0;
    /* Decode embeds the token the last replay chose; a prefill's rows (the
     * image embeddings) are already in x. */
    if (all && T == 1) OP(cuda_embed(G, m->x, m->wte, TV, TC, m->ids, 1));
    const int fork = all && T == 1 ? m->fork : 0;
    for (int i = 0; i < TL; i++) {
        tlayer *L = &m->l[i];
        if (all || m->what == 2)
            OP(cuda_layernorm(G, m->h, DT_BF16, m->x, DT_F32, T, TC, L->ln_g, L->ln_b, DT_BF16, 1e-5f));
        if (fork) {
            cudaStream_t s2 = (cudaStream_t)cuda_ctx_stream(G2);
            CK(cudaEventRecord(EV_FORK, S));
            CK(cudaStreamWaitEvent(s2, EV_FORK, 0));
            if (cuda_linear(G2, m->f, DT_BF16, TF, m->h, TC, T, &L->fc1, CUDA_ACT_GELU_TANH, 0) != ALBEDO_OK ||
                (m->fork >= 2 &&
                 cuda_linear(G2, m->y2, DT_F32, TC, m->f, TF, T, &L->fc2, CUDA_ACT_NONE, 0) != ALBEDO_OK)) {
                fprintf(stderr, "fc1 on the second stream: %s\n", cuda_ctx_error(G2));
                exit(1);
            }
            CK(cudaEventRecord(EV_JOIN, s2));
        }
        if (all || m->what == 1) OP(cuda_linear(G, m->qkv, DT_BF16, 3 * TC, m->h, TC, T, &L->qkv, CUDA_ACT_NONE, 0));
        if (all || m->what == 3) {
            cuda_rope r;
            memset(&r, 0, sizeof r);
            r.x = m->qkv, r.ldx = 3 * TC, r.T = T, r.H = TH, r.Hkv = TH, r.D = TD, r.R = TR, r.pos0 = m->pos0;
            r.cos_t = m->cos_t, r.sin_t = m->sin_t, r.k_cache = L->kc, r.v_cache = L->vc, r.n_ctx = NCTX;
            OP(cuda_rope_kv(G, &r));
        }
        if (all || m->what == 4) {
            cuda_attn a;
            memset(&a, 0, sizeof a);
            a.T = T, a.S = m->pos0 + T, a.H = TH, a.Hkv = TH, a.D = TD, a.pos0 = m->pos0;
            a.n_prefix = m->n_prefix, a.scale = 0.125f, a.n_seq = 1;
            a.q = m->qkv, a.ldq = 3 * TC;
            a.k = L->kc, a.ldk = TD, a.k_head = (long)NCTX * TD;
            a.v = L->vc, a.ldv = TD, a.v_head = (long)NCTX * TD;
            a.out = m->att, a.ldo = TC;
            OP(cuda_attention(G, &a));
        }
        if (fork == 1) CK(cudaStreamWaitEvent(S, EV_JOIN, 0));
        if (fork >= 2) {
            OP(cuda_linear(G, m->x, DT_F32, TC, m->att, TC, T, &L->proj, CUDA_ACT_NONE, 1));
            CK(cudaStreamWaitEvent(S, EV_JOIN, 0));
            OP(cuda_add(G, m->x, DT_F32, m->y2, DT_F32, TC));
            continue;
        }
        if (all || m->what == 1) {
            OP(cuda_linear(G, m->x, DT_F32, TC, m->att, TC, T, &L->proj, CUDA_ACT_NONE, 1));
            if (!fork) OP(cuda_linear(G, m->f, DT_BF16, TF, m->h, TC, T, &L->fc1, CUDA_ACT_GELU_TANH, 0));
            OP(cuda_linear(G, m->x, DT_F32, TC, m->f, TF, T, &L->fc2, CUDA_ACT_NONE, 1));
        }
    }
    /* Logits of the last row only. */
    const float *xl = m->x + (size_t)(T - 1) * TC;
    uint16_t *hl = m->h + (size_t)(T - 1) * TC;
    if (all) OP(cuda_layernorm(G, hl, DT_BF16, xl, DT_F32, 1, TC, m->post_g, m->post_b, DT_BF16, 1e-5f));
    if (all || m->what == 1) OP(cuda_linear(G, m->logits, DT_F32, TV, hl, TC, 1, &m->head, CUDA_ACT_NONE, 0));
    if (all) OP(cuda_argmax(G, m->ids, m->logits, 1, TV, TV));
}

static void text_init(text *m, int T_max) {
    memset(m, 0, sizeof *m);
    for (int i = 0; i < TL; i++) {
        tlayer *L = &m->l[i];
        L->ln_g = rand_bf16(TC, 0.8f, 1.2f);
        L->ln_b = rand_bf16(TC, -0.1f, 0.1f);
        L->qkv = lin(3 * TC, TC);
        L->proj = lin(TC, TC);
        L->fc1 = lin(TF, TC);
        L->fc2 = lin(TC, TF);
        L->kc = rand_bf16((size_t)TH * NCTX * TD, -1, 1);
        L->vc = rand_bf16((size_t)TH * NCTX * TD, -1, 1);
    }
    m->wte = rand_bf16((size_t)TV * TC, -1, 1);
    m->post_g = rand_bf16(TC, 0.8f, 1.2f);
    m->post_b = rand_bf16(TC, -0.1f, 0.1f);
    m->head = lin(TV, TC);
    const int half = TR / 2;
    float *cs = (float *)malloc((size_t)NCTX * half * 4), *sn = (float *)malloc((size_t)NCTX * half * 4);
    for (int p = 0; p < NCTX; p++)
        for (int i = 0; i < half; i++) {
            double a = p * pow(10000.0, -2.0 * i / TR);
            cs[p * half + i] = (float)cos(a);
            sn[p * half + i] = (float)sin(a);
        }
    m->cos_t = (float *)dalloc((size_t)NCTX * half * 4);
    m->sin_t = (float *)dalloc((size_t)NCTX * half * 4);
    /* On S, after dalloc's zeroing there: S does not wait for the legacy
     * stream that a plain cudaMemcpy uses. */
    CK(cudaMemcpyAsync(m->cos_t, cs, (size_t)NCTX * half * 4, cudaMemcpyHostToDevice, S));
    CK(cudaMemcpyAsync(m->sin_t, sn, (size_t)NCTX * half * 4, cudaMemcpyHostToDevice, S));
    CK(cudaStreamSynchronize(S));
    free(cs), free(sn);
    m->x = rand_f32((size_t)T_max * TC);
    m->h = (uint16_t *)dalloc((size_t)T_max * TC * 2);
    m->qkv = (uint16_t *)dalloc((size_t)T_max * 3 * TC * 2);
    m->att = (uint16_t *)dalloc((size_t)T_max * TC * 2);
    m->f = (uint16_t *)dalloc((size_t)T_max * TF * 2);
    m->logits = (float *)dalloc((size_t)TV * 4);
    m->ids = (int32_t *)dalloc(sizeof(int32_t) * 8);
}

/* Bytes a decode step must read: every weight once, the KV cache up to S. */
static double decode_bytes(const text *m, int S) {
    double b = 0;
    for (int i = 0; i < TL; i++) {
        const tlayer *L = &m->l[i];
        b += lin_bytes(&L->qkv) + lin_bytes(&L->proj) + lin_bytes(&L->fc1) + lin_bytes(&L->fc2) + 4.0 * TC;
        b += 2.0 * S * TH * TD * 2; /* K and V */
    }
    return b + lin_bytes(&m->head) + 4.0 * TC + 2.0 * TC;
}

/* ---- the vision encoder ---------------------------------------------------------------- */

enum { VC = 1152, VH = 16, VD = 72, VF = 4304, VL = 27, VTOK = 729, CROPS = 9 };

typedef struct vlayer {
    uint16_t *ln1_g, *ln1_b, *ln2_g, *ln2_b;
    cuda_linear_w qkv, proj, fc1, fc2;
} vlayer;

typedef struct vision {
    vlayer l[VL];
    float *x;
    uint16_t *h, *qkv, *att, *f;
    int what; /* 0 whole layers, 1 linears only, 2 attention only */
} vision;

static void vision_step(void *arg) {
    vision *m = (vision *)arg;
    const int T = VTOK * CROPS;
    for (int i = 0; i < VL; i++) {
        vlayer *L = &m->l[i];
        if (m->what == 0) OP(cuda_layernorm(G, m->h, DT_BF16, m->x, DT_F32, T, VC, L->ln1_g, L->ln1_b, DT_BF16, 1e-5f));
        if (m->what != 2) OP(cuda_linear(G, m->qkv, DT_BF16, 3 * VC, m->h, VC, T, &L->qkv, CUDA_ACT_NONE, 0));
        if (m->what != 1) {
            cuda_attn a;
            memset(&a, 0, sizeof a);
            a.T = VTOK, a.S = VTOK, a.H = VH, a.Hkv = VH, a.D = VD, a.pos0 = 0, a.n_prefix = VTOK;
            a.scale = 1.0f / sqrtf((float)VD), a.n_seq = CROPS;
            a.q = m->qkv, a.ldq = 3 * VC, a.q_seq = (long)VTOK * 3 * VC;
            a.k = m->qkv + VC, a.ldk = 3 * VC, a.k_head = VD, a.k_seq = (long)VTOK * 3 * VC;
            a.v = m->qkv + 2 * VC, a.ldv = 3 * VC, a.v_head = VD, a.v_seq = (long)VTOK * 3 * VC;
            a.out = m->att, a.ldo = VC, a.o_seq = (long)VTOK * VC;
            OP(cuda_attention(G, &a));
        }
        if (m->what == 2) continue;
        OP(cuda_linear(G, m->x, DT_F32, VC, m->att, VC, T, &L->proj, CUDA_ACT_NONE, 1));
        if (m->what == 0) OP(cuda_layernorm(G, m->h, DT_BF16, m->x, DT_F32, T, VC, L->ln2_g, L->ln2_b, DT_BF16, 1e-5f));
        OP(cuda_linear(G, m->f, DT_BF16, VF, m->h, VC, T, &L->fc1, CUDA_ACT_GELU_TANH, 0));
        OP(cuda_linear(G, m->x, DT_F32, VC, m->f, VF, T, &L->fc2, CUDA_ACT_NONE, 1));
    }
}

static void vision_init(vision *m) {
    memset(m, 0, sizeof *m);
    const int T = VTOK * CROPS;
    for (int i = 0; i < VL; i++) {
        vlayer *L = &m->l[i];
        L->ln1_g = rand_bf16(VC, 0.8f, 1.2f), L->ln1_b = rand_bf16(VC, -0.1f, 0.1f);
        L->ln2_g = rand_bf16(VC, 0.8f, 1.2f), L->ln2_b = rand_bf16(VC, -0.1f, 0.1f);
        L->qkv = lin(3 * VC, VC);
        L->proj = lin(VC, VC);
        L->fc1 = lin(VF, VC);
        L->fc2 = lin(VC, VF);
    }
    m->x = rand_f32((size_t)T * VC);
    m->h = rand_bf16((size_t)T * VC, -2, 2);
    m->qkv = rand_bf16((size_t)T * 3 * VC, -2, 2);
    m->att = rand_bf16((size_t)T * VC, -1, 1);
    m->f = rand_bf16((size_t)T * VF, -1, 1);
}

/* ---- main ------------------------------------------------------------------------------------ */

/* The image prefix's attention in the engine's forms: through a block
 * table over a token-major pool (segments), or over e4m3 head-major caches. */
typedef struct pform {
    cuda_attn a;
} pform;

static void pform_step(void *arg) {
    pform *p = (pform *)arg;
    for (int i = 0; i < TL; i++) OP(cuda_attention(G, &p->a));
}

/* The flash kernel alone under each block geometry: vision (27 layers, 9
 * crops), the image prefix (24 layers, 730 rows, bidirectional) on a
 * session's cache, through the engine's block table, and over e4m3 caches,
 * and a prompt (24 layers, 20 rows at position 730 over the cache). */
static int attn_only(int reps) {
    static text tm;
    static vision vm;
    text_init(&tm, PREFIX);
    vision_init(&vm);
    /* The paged form: an identity block table of 16-position blocks over a
     * token-major pool ([rows][3·TC]: the qkv rows' k and v parts). */
    pform pg, f8;
    memset(&pg, 0, sizeof pg);
    {
        const int bs = 16, nb = (PREFIX + bs - 1) / bs;
        int seg[4] = {0, PREFIX, 0, PREFIX}, bt[64];
        for (int i = 0; i < nb; i++) bt[i] = i;
        /* On S, after dalloc's zeroing there (a legacy-stream copy could land first). */
        int *dseg = (int *)dalloc(sizeof seg), *dbt = (int *)dalloc(sizeof bt);
        CK(cudaMemcpyAsync(dseg, seg, sizeof seg, cudaMemcpyHostToDevice, S));
        CK(cudaMemcpyAsync(dbt, bt, sizeof bt, cudaMemcpyHostToDevice, S));
        CK(cudaStreamSynchronize(S));
        cuda_attn *a = &pg.a;
        a->T = PREFIX, a->S = PREFIX, a->H = TH, a->Hkv = TH, a->D = TD, a->n_prefix = PREFIX, a->n_seq = 1;
        a->scale = 0.125f, a->seg = dseg, a->blocks = dbt, a->block_size = bs, a->blocks_ld = nb;
        a->q = tm.qkv, a->ldq = 3 * TC;
        a->k = tm.qkv + TC, a->ldk = 3 * TC, a->k_head = TD;
        a->v = tm.qkv + 2 * TC, a->ldv = 3 * TC, a->v_head = TD;
        a->out = tm.att, a->ldo = TC;
    }
    /* e4m3 caches [TH][NCTX][TD] of random values 2^-4 .. 2^2 (never NaN). */
    memset(&f8, 0, sizeof f8);
    {
        const size_t n = (size_t)TH * NCTX * TD;
        uint8_t *hb = (uint8_t *)malloc(n);
        for (size_t i = 0; i < n; i++) hb[i] = (uint8_t)((rand() & 0x80) | ((3 + rand() % 6) << 3) | (rand() & 7));
        uint8_t *kc = (uint8_t *)dalloc(n), *vc = (uint8_t *)dalloc(n);
        CK(cudaMemcpyAsync(kc, hb, n, cudaMemcpyHostToDevice, S));
        CK(cudaMemcpyAsync(vc, hb, n, cudaMemcpyHostToDevice, S));
        CK(cudaStreamSynchronize(S));
        free(hb);
        cuda_attn *a = &f8.a;
        a->T = PREFIX, a->S = PREFIX, a->H = TH, a->Hkv = TH, a->D = TD, a->n_prefix = PREFIX, a->n_seq = 1;
        a->scale = 0.125f, a->kv_fp8 = 1, a->k_scale = 0.5f, a->v_scale = 0.25f;
        a->q = tm.qkv, a->ldq = 3 * TC;
        a->k = kc, a->ldk = TD, a->k_head = (long)NCTX * TD;
        a->v = vc, a->ldv = TD, a->v_head = (long)NCTX * TD;
        a->out = tm.att, a->ldo = TC;
    }
    CK(cudaStreamSynchronize(S));
    const double vis_flops = 4.0 * CROPS * (double)VTOK * VTOK * VD * VH * VL;
    const double pre_flops = 4.0 * PREFIX * (double)PREFIX * TD * TH * TL;
    /* On sm_90a the default runs the wgmma kernels where they apply (T > 64,
     * D <= 72, bf16); CUDA_FLASH_MMA the mma.sync one. */
    static const int geoms[] = {CUDA_FLASH_128 | CUDA_FLASH_MMA,
                                CUDA_FLASH_128,
                                CUDA_FLASH_128 | CUDA_FLASH_WGALT,
                                CUDA_FLASH_64,
                                CUDA_FLASH_128 | CUDA_FLASH_PAD16 | CUDA_FLASH_MMA,
                                CUDA_FLASH_128 | CUDA_FLASH_MMA,
                                CUDA_FLASH_128};
    static const char *names[] = {"mma.sync 128 rows, 8 warps x 16",
                                  "default (sm_90a: wgmma)",
                                  "wgmma, the other kernel a head width",
                                  "mma.sync 64 rows, 4 warps x 16",
                                  "mma.sync 128 rows, D 72 padded to 80",
                                  "mma.sync 128 rows (again)",
                                  "default (again)"};
    printf("%-40s %10s %8s %10s %8s %10s %10s %10s\n", "flash geometry (ms)", "vision", "TFLOP/s", "prefix", "TFLOP/s",
           "paged", "e4m3", "prompt 20");
    for (int i = 0; i < (int)(sizeof geoms / sizeof geoms[0]); i++) {
        cuda_ctx_set_flash(G, geoms[i]);
        vm.what = 2;
        const float vis_ms = time_step(vision_step, &vm, reps);
        tm.what = 4, tm.T = PREFIX, tm.pos0 = 0, tm.n_prefix = PREFIX;
        const float pre_ms = time_step(text_step, &tm, reps);
        const float pg_ms = time_step(pform_step, &pg, reps);
        const float f8_ms = time_step(pform_step, &f8, reps);
        tm.T = 20, tm.pos0 = PREFIX, tm.n_prefix = PREFIX;
        const float pr_ms = time_step(text_step, &tm, reps);
        printf("%-40s %10.3f %8.0f %10.3f %8.0f %10.3f %10.3f %10.3f\n", names[i], vis_ms,
               vis_flops / (vis_ms * 1e-3) / 1e12, pre_ms, pre_flops / (pre_ms * 1e-3) / 1e12, pg_ms, f8_ms, pr_ms);
    }
    cuda_ctx_set_flash(G, CUDA_FLASH_128);
    CK(cudaDeviceSynchronize());
    cuda_ctx_free(G2);
    cuda_ctx_free(G);
    return 0;
}

typedef struct gemm_arg {
    cuda_linear_w L;
    uint16_t *x, *y;
    int T;
} gemm_arg;

static void gemm_step(void *arg) {
    gemm_arg *g = (gemm_arg *)arg;
    OP(cuda_linear(G, g->y, DT_BF16, g->L.n_out, g->x, g->L.n_in, g->T, &g->L, CUDA_ACT_NONE, 0));
}

/* ---- the text model's linears over a few rows: GEMV against cuBLASLt ---- */

typedef struct rows_arg {
    cuda_linear_w L[TL][4]; /* qkv, proj, fc1, fc2 of 24 layers: 2.4 GB, never in L2 */
    uint16_t *x, *h, *f;
    float *y;
    int T;
} rows_arg;

static void rows_step(void *arg) {
    rows_arg *r = (rows_arg *)arg;
    for (int l = 0; l < TL; l++) {
        OP(cuda_linear(G, r->h, DT_BF16, 3 * TC, r->x, TC, r->T, &r->L[l][0], CUDA_ACT_NONE, 0));
        OP(cuda_linear(G, r->y, DT_F32, TC, r->x, TC, r->T, &r->L[l][1], CUDA_ACT_NONE, 1));
        OP(cuda_linear(G, r->f, DT_BF16, TF, r->x, TC, r->T, &r->L[l][2], CUDA_ACT_GELU_TANH, 0));
        OP(cuda_linear(G, r->y, DT_F32, TC, r->f, TF, r->T, &r->L[l][3], CUDA_ACT_NONE, 1));
    }
}

/* bench_decode [reps] linear: one text forward's 96 linears over T rows
 * through the GEMV and through cuBLASLt, as the weights' bytes over the
 * time: where cuda_linear's switch (cuda_ctx_set_gemv_max) belongs. */
static int linear_only(int reps) {
    rows_arg *r = (rows_arg *)calloc(1, sizeof *r);
    size_t bytes = 0;
    for (int l = 0; l < TL; l++) {
        r->L[l][0] = lin(3 * TC, TC), r->L[l][1] = lin(TC, TC), r->L[l][2] = lin(TF, TC), r->L[l][3] = lin(TC, TF);
        for (int i = 1; i < 4; i += 2) { /* float32 biases where the output is float32, as the model runner's */
            CK(cudaFree((void *)r->L[l][i].b));
            r->L[l][i].b = rand_f32(TC);
            r->L[l][i].bdt = DT_F32;
        }
        for (int i = 0; i < 4; i++) bytes += lin_bytes(&r->L[l][i]);
    }
    r->x = rand_bf16((size_t)128 * TC, -1, 1);
    r->f = rand_bf16((size_t)128 * TF, -1, 1);
    r->h = (uint16_t *)dalloc((size_t)128 * 3 * TC * 2);
    r->y = rand_f32((size_t)128 * TC);
    CK(cudaStreamSynchronize(S));
    static const int Ts[] = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128};
    printf("one text forward's 96 linears (%.2f GB of weights) over T rows: ms (GB/s)\n", bytes / 1e9);
    printf("%4s %20s %20s\n", "T", "GEMV (T <= 8)", "cuBLASLt");
    for (size_t i = 0; i < sizeof Ts / sizeof Ts[0]; i++) {
        r->T = Ts[i];
        printf("%4d", r->T);
        for (int path = 0; path < 2; path++) {
            /* the GEMV takes at most 8 rows; cuda_linear gives T = 1 to it always */
            if ((path == 0 && r->T > 8) || (path == 1 && r->T == 1)) {
                printf(" %20s", "-");
                continue;
            }
            cuda_ctx_set_gemv_max(G, path == 0 ? 8 : 1);
            const float ms = time_step(rows_step, r, reps);
            printf(" %9.3f (%6.0f)   ", ms, bytes / (ms * 1e-3) / 1e9);
        }
        printf("\n");
    }
    cuda_ctx_set_gemv_max(G, 8);
    CK(cudaDeviceSynchronize());
    cuda_ctx_free(G2);
    cuda_ctx_free(G);
    return 0;
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 100;
    if (reps < 50) reps = 50;
    errbuf e;
    if (cuda_ctx_new(0, &G, &e) != ALBEDO_OK) {
        fprintf(stderr, "cuda_ctx_new: %s\n", e.msg);
        return 1;
    }
    S = (cudaStream_t)cuda_ctx_stream(G);
    if (cuda_ctx_new(0, &G2, &e) != ALBEDO_OK) {
        fprintf(stderr, "cuda_ctx_new: %s\n", e.msg);
        return 1;
    }
    CK(cudaEventCreateWithFlags(&EV_FORK, cudaEventDisableTiming));
    CK(cudaEventCreateWithFlags(&EV_JOIN, cudaEventDisableTiming));
    CK(cudaDeviceSynchronize());
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    int rt = 0, drv = 0;
    cudaRuntimeGetVersion(&rt);
    cudaDriverGetVersion(&drv);
    printf("bench_decode: %s, sm_%d%d, %d SMs, %.0f MiB L2, %.1f GiB; CUDA runtime %d, driver %d; commit %s\n",
           prop.name, prop.major, prop.minor, prop.multiProcessorCount, prop.l2CacheSize / 1048576.0,
           prop.totalGlobalMem / 1073741824.0, rt, drv, ALBEDO_COMMIT);
    printf("Moondream 2 shapes, random bf16 weights; medians of %d graph replays after warm-up\n\n", reps);
    if (argc > 2 && strcmp(argv[2], "attn") == 0) return attn_only(reps);
    if (argc > 2 && strcmp(argv[2], "linear") == 0) return linear_only(reps);

    /* Copy bandwidth: 1 GiB device-to-device, counting bytes read + written. */
    const size_t cb = (size_t)1 << 30;
    void *c0 = dalloc(cb), *c1 = dalloc(cb);
    float copy_ms, copy_kernel_ms;
    {
        cudaGraph_t gr;
        cudaGraphExec_t ex;
        CK(cudaStreamBeginCapture(S, cudaStreamCaptureModeGlobal));
        CK(cudaMemcpyAsync(c1, c0, cb, cudaMemcpyDeviceToDevice, S));
        CK(cudaStreamEndCapture(S, &gr));
        CK(cudaGraphInstantiate(&ex, gr, 0));
        copy_ms = time_graph(ex, 20, 3);
        cudaGraphExecDestroy(ex);
        cudaGraphDestroy(gr);
        CK(cudaStreamBeginCapture(S, cudaStreamCaptureModeGlobal));
        copy_kernel<<<prop.multiProcessorCount * 4, 512, 0, S>>>((uint4 *)c1, (const uint4 *)c0, cb / 16);
        CK(cudaStreamEndCapture(S, &gr));
        CK(cudaGraphInstantiate(&ex, gr, 0));
        copy_kernel_ms = time_graph(ex, 20, 3);
        cudaGraphExecDestroy(ex);
        cudaGraphDestroy(gr);
    }
    CK(cudaFree(c0));
    CK(cudaFree(c1));
    const double copy_bw_memcpy = 2.0 * cb / (copy_ms * 1e-3), copy_bw_kernel = 2.0 * cb / (copy_kernel_ms * 1e-3);
    const double copy_bw = copy_bw_memcpy > copy_bw_kernel ? copy_bw_memcpy : copy_bw_kernel;

    /* GEMM peak through cuda_linear: 8192³ bf16. */
    float peak_tf;
    {
        gemm_arg g;
        g.L = lin(8192, 8192);
        g.x = rand_bf16((size_t)8192 * 8192, -1, 1);
        CK(cudaMalloc((void **)&g.y, (size_t)8192 * 8192 * 2));
        g.T = 8192;
        float ms = time_step(gemm_step, &g, 20);
        peak_tf = (float)(lin_flops(&g.L, 8192) / (ms * 1e-3) / 1e12);
        cudaFree((void *)g.L.w), cudaFree((void *)g.L.b), cudaFree(g.x), cudaFree(g.y);
    }

    /* ---- decode ---- */
    static text tm;
    text_init(&tm, PREFIX);
    CK(cudaStreamSynchronize(S));
    tm.T = 1, tm.pos0 = DEPTH, tm.n_prefix = PREFIX;
    const float dec_ms = time_step(text_step, &tm, reps);
    /* Eager (no graph) for comparison. */
    float eager_ms;
    {
        cudaEvent_t e0, e1;
        CK(cudaEventCreate(&e0));
        CK(cudaEventCreate(&e1));
        float t[21];
        for (int i = 0; i < 21; i++) {
            CK(cudaEventRecord(e0, S));
            text_step(&tm);
            CK(cudaEventRecord(e1, S));
            CK(cudaEventSynchronize(e1));
            CK(cudaEventElapsedTime(&t[i], e0, e1));
        }
        qsort(t, 21, sizeof(float), cmp_float);
        eager_ms = t[10];
    }
    /* Without programmatic dependent launch, for comparison. */
    cuda_ctx_set_pdl(G, 0);
    const float dec_nopdl_ms = time_step(text_step, &tm, reps);
    const float dec_ms2 = (cuda_ctx_set_pdl(G, 1), time_step(text_step, &tm, reps));
    /* The model runner's decode graph forks the MLP beside the attention
     * (model_cuda.cu, text_layers): two forms of it. */
    CK(cudaMalloc((void **)&tm.y2, TC * sizeof(float)));
    tm.fork = 1;
    const float dec_fork_ms = time_step(text_step, &tm, reps);
    tm.fork = 2;
    const float dec_fork2_ms = time_step(text_step, &tm, reps);
    tm.fork = 0;
    /* The weight GEMVs alone (no attention, norms, rope, argmax), with and
     * without PDL, and the other kernels of the step by kind. */
    tm.what = 1;
    const float gemv_ms = time_step(text_step, &tm, reps);
    cuda_ctx_set_pdl(G, 0);
    const float gemv_nopdl_ms = time_step(text_step, &tm, reps);
    cuda_ctx_set_pdl(G, 1);
    float part_ms[5] = {0};
    for (int w = 2; w <= 4; w++) {
        tm.what = w;
        part_ms[w] = time_step(text_step, &tm, reps);
    }
    tm.what = 0;
    int32_t tok = -1;
    float *lg = (float *)malloc(TV * 4);
    CK(cudaStreamSynchronize(S));
    CK(cudaMemcpy(&tok, tm.ids, 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(lg, tm.logits, TV * 4, cudaMemcpyDeviceToHost));
    int nonfinite = 0;
    for (int i = 0; i < TV; i++) nonfinite += !isfinite(lg[i]);
    free(lg);
    const double dbytes = decode_bytes(&tm, DEPTH + 1);
    double wbytes = 0;
    for (int i = 0; i < TL; i++)
        wbytes +=
            lin_bytes(&tm.l[i].qkv) + lin_bytes(&tm.l[i].proj) + lin_bytes(&tm.l[i].fc1) + lin_bytes(&tm.l[i].fc2);
    wbytes += lin_bytes(&tm.head);
    const double floor_ms = dbytes / copy_bw * 1e3;

    /* ---- prefill 730 ---- */
    tm.T = PREFIX, tm.pos0 = 0, tm.n_prefix = PREFIX;
    const float pre_ms = time_step(text_step, &tm, reps / 2);
    tm.what = 1;
    const float pre_lin_ms = time_step(text_step, &tm, reps / 2);
    tm.what = 0;
    double pre_lin_flops = 0;
    for (int i = 0; i < TL; i++)
        pre_lin_flops += lin_flops(&tm.l[i].qkv, PREFIX) + lin_flops(&tm.l[i].proj, PREFIX) +
                         lin_flops(&tm.l[i].fc1, PREFIX) + lin_flops(&tm.l[i].fc2, PREFIX);
    pre_lin_flops += lin_flops(&tm.head, 1);
    const double pre_att_flops = 4.0 * PREFIX * PREFIX * TD * TH * TL;

    /* ---- vision 9 crops ---- */
    static vision vm;
    vision_init(&vm);
    CK(cudaStreamSynchronize(S));
    vm.what = 1;
    const float vis_lin_ms = time_step(vision_step, &vm, reps / 4);
    vm.what = 2;
    const float vis_att_ms = time_step(vision_step, &vm, reps / 4);
    vm.what = 0;
    const float vis_ms = time_step(vision_step, &vm, reps / 4);
    const int VT = VTOK * CROPS;
    double vis_lin_flops = 0;
    for (int i = 0; i < VL; i++)
        vis_lin_flops += lin_flops(&vm.l[i].qkv, VT) + lin_flops(&vm.l[i].proj, VT) + lin_flops(&vm.l[i].fc1, VT) +
                         lin_flops(&vm.l[i].fc2, VT);
    const double vis_att_flops = 4.0 * CROPS * (double)VTOK * VTOK * VD * VH * VL;

    long fused, unfused, gemv;
    cuda_ctx_counters(G, &fused, &unfused, &gemv);
    CK(cudaDeviceSynchronize());

    const double P = 790e12;
    printf("device-to-device copy (1 GiB, read + written): cudaMemcpy %.0f GB/s, copy kernel %.0f GB/s\n",
           copy_bw_memcpy / 1e9, copy_bw_kernel / 1e9);
    printf("bf16 GEMM 8192^3 through cuda_linear: %.0f TFLOP/s\n\n", peak_tf);
    printf("%-46s %10s %12s %s\n", "what", "ms", "rate", "vs floor / anchor");
    printf("%-46s %10.3f %9.0f tok/s  floor %.3f ms (%.2f GB at copy bw): %.0f%%; target >= 800 tok/s, "
           "PyTorch compiled 218\n",
           "decode b=1, depth 740, CUDA graph", dec_ms, 1e3 / dec_ms, floor_ms, dbytes / 1e9,
           100.0 * floor_ms / dec_ms);
    printf("%-46s %10.3f %9.0f tok/s\n", "decode b=1, same graph again (run-to-run)", dec_ms2, 1e3 / dec_ms2);
    printf("%-46s %10.3f %9.0f tok/s\n", "decode b=1, fc1 forked beside attention", dec_fork_ms, 1e3 / dec_fork_ms);
    printf("%-46s %10.3f %9.0f tok/s\n", "decode b=1, fc1+fc2 forked, x += y2 (model's)", dec_fork2_ms,
           1e3 / dec_fork2_ms);
    printf("%-46s %10.3f %9.0f tok/s\n", "decode b=1, graph without PDL", dec_nopdl_ms, 1e3 / dec_nopdl_ms);
    printf("%-46s %10.3f %9.0f tok/s\n", "decode b=1, eager launches", eager_ms, 1e3 / eager_ms);
    printf("%-46s %10.3f %9.0f GB/s   %.0f%% of copy bandwidth (%.2f GB of weights)\n",
           "decode weight GEMVs alone (97 launches)", gemv_ms, wbytes / (gemv_ms * 1e-3) / 1e9,
           100.0 * wbytes / (gemv_ms * 1e-3) / copy_bw, wbytes / 1e9);
    printf("%-46s %10.3f %9.0f GB/s\n", "decode weight GEMVs alone, without PDL", gemv_nopdl_ms,
           wbytes / (gemv_ms * 1e-3) / 1e9 * gemv_ms / gemv_nopdl_ms);
    printf("%-46s %10.3f %9.1f us each\n", "decode: the 24 layernorms alone", part_ms[2], part_ms[2] * 1e3 / TL);
    printf("%-46s %10.3f %9.1f us each\n", "decode: the 24 rope + KV writes alone", part_ms[3], part_ms[3] * 1e3 / TL);
    printf("%-46s %10.3f %9.1f us each (%.0f MB of K/V)\n", "decode: the 24 attentions (741 keys) alone", part_ms[4],
           part_ms[4] * 1e3 / TL, 2.0 * (DEPTH + 1) * TH * TD * 2 * TL / 1e6);
    printf("%-46s %10.3f %9.0f TFLOP/s %.0f%% of 790 (floor ~2.7 ms for ~2.1 TFLOP)\n",
           "prefill 730 tokens, whole step", pre_ms, (pre_lin_flops + pre_att_flops) / (pre_ms * 1e-3) / 1e12,
           100.0 * (pre_lin_flops + pre_att_flops) / (pre_ms * 1e-3) / P);
    printf("%-46s %10.3f %9.0f TFLOP/s %.0f%% of 790\n", "prefill 730 tokens, linears alone (cuBLASLt)", pre_lin_ms,
           pre_lin_flops / (pre_lin_ms * 1e-3) / 1e12, 100.0 * pre_lin_flops / (pre_lin_ms * 1e-3) / P);
    printf("%-46s %10.3f %9.0f TFLOP/s %.0f%% of 790 (floor ~7.6 ms for ~6.0 TFLOP)\n",
           "vision 9 crops (T=6561), 27 whole layers", vis_ms, (vis_lin_flops + vis_att_flops) / (vis_ms * 1e-3) / 1e12,
           100.0 * (vis_lin_flops + vis_att_flops) / (vis_ms * 1e-3) / P);
    printf("%-46s %10.3f %9.0f TFLOP/s %.0f%% of 790\n", "vision 9 crops, linears alone (cuBLASLt)", vis_lin_ms,
           vis_lin_flops / (vis_lin_ms * 1e-3) / 1e12, 100.0 * vis_lin_flops / (vis_lin_ms * 1e-3) / P);
    printf("%-46s %10.3f %9.0f TFLOP/s %.0f%% of 790\n", "vision 9 crops, attention alone (flash)", vis_att_ms,
           vis_att_flops / (vis_att_ms * 1e-3) / 1e12, 100.0 * vis_att_flops / (vis_att_ms * 1e-3) / P);
    printf("\nlast token %d, non-finite logits %d; linear paths: cuBLASLt+epilogue %ld, +bias kernel %ld, GEMV %ld\n",
           tok, nonfinite, fused, unfused, gemv);
    cuda_ctx_free(G2);
    cuda_ctx_free(G);
    return nonfinite || tok < 0 || tok >= TV ? 1 : 0;
}
