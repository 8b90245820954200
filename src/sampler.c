/*
 * sampler.c — greedy and nucleus sampling (see sampler.h).
 *
 * Nucleus sampling needs the tokens in order of probability only down to the
 * point where the kept mass passes top_p, so instead of sorting the whole
 * vocabulary it first finds a probability threshold whose super-level set
 * already holds more than top_p of the mass, and sorts only that set.
 */
#include "sampler.h"

#include <math.h>
#include <stdlib.h>

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void sampler_seed(sampler *sp, uint64_t seed) {
    for (int i = 0; i < 4; i++) sp->s[i] = splitmix(&seed);
}

static uint64_t next(sampler *sp) {
    uint64_t *s = sp->s;
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

double sampler_uniform(sampler *sp) { return (double)(next(sp) >> 11) * 0x1.0p-53; }

int sampler_init(sampler *sp, int vocab) {
    sp->cap = vocab;
    sp->idx = malloc((size_t)vocab * sizeof *sp->idx);
    sp->prob = malloc((size_t)vocab * sizeof *sp->prob);
    sampler_seed(sp, 0);
    return sp->idx && sp->prob ? 0 : -1;
}

void sampler_free(sampler *sp) {
    free(sp->idx);
    free(sp->prob);
    sp->idx = NULL;
    sp->prob = NULL;
}

int sampler_argmax(const float *v, int n, float *margin) {
    int best = 0;
    float b1 = -INFINITY, b2 = -INFINITY;
    for (int i = 0; i < n; i++) {
        if (v[i] > b1) {
            b2 = b1;
            b1 = v[i];
            best = i;
        } else if (v[i] > b2) {
            b2 = v[i];
        }
    }
    if (margin) *margin = b1 - b2;
    return best;
}

/* C11's qsort comparator takes no context; a thread-local pointer keeps
 * concurrent sessions apart. */
static _Thread_local const float *g_sort_prob;

static int by_prob_desc(const void *a, const void *b) {
    float pa = g_sort_prob[*(const int *)a], pb = g_sort_prob[*(const int *)b];
    if (pa != pb) return pa < pb ? 1 : -1;
    return *(const int *)a - *(const int *)b;
}

int sampler_pick(sampler *sp, const float *logits, int n, float temperature, float top_p) {
    if (temperature <= 0.0f || n > sp->cap) return sampler_argmax(logits, n, NULL);
    float *p = sp->prob;
    float mx = -INFINITY;
    for (int i = 0; i < n; i++) {
        p[i] = logits[i] / temperature;
        if (p[i] > mx) mx = p[i];
    }
    double sum = 0;
    for (int i = 0; i < n; i++) {
        p[i] = p[i] == -INFINITY ? 0.0f : expf(p[i] - mx);
        sum += p[i];
    }
    float inv = (float)(1.0 / sum), pmax = 0.0f;
    for (int i = 0; i < n; i++) {
        p[i] *= inv;
        if (p[i] > pmax) pmax = p[i];
    }
    /* Lower the threshold until the candidate set holds more than top_p. */
    int m = 0;
    for (float thr = pmax;; thr *= 0.25f) {
        double mass = 0;
        m = 0;
        for (int i = 0; i < n; i++)
            if (p[i] >= thr && p[i] > 0.0f) {
                sp->idx[m++] = i;
                mass += p[i];
            }
        if (mass > top_p || thr < 1e-30f || m == n) break;
    }
    if (m <= 64) { /* insertion sort: usually a handful of candidates */
        for (int i = 1; i < m; i++) {
            int v = sp->idx[i], k = i - 1;
            while (k >= 0 && (p[sp->idx[k]] < p[v] || (p[sp->idx[k]] == p[v] && sp->idx[k] > v))) {
                sp->idx[k + 1] = sp->idx[k];
                k--;
            }
            sp->idx[k + 1] = v;
        }
    } else {
        g_sort_prob = p;
        qsort(sp->idx, (size_t)m, sizeof *sp->idx, by_prob_desc);
    }
    double cum = 0, kept = 0;
    int k = 0;
    for (; k < m; k++) {
        if (cum > top_p) break; /* mass before this token exceeds top_p */
        cum += p[sp->idx[k]];
        kept += p[sp->idx[k]];
    }
    double u = sampler_uniform(sp) * kept, acc = 0;
    for (int i = 0; i < k; i++) {
        acc += p[sp->idx[i]];
        if (u < acc) return sp->idx[i];
    }
    return sp->idx[k > 0 ? k - 1 : 0];
}
