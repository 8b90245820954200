/*
 * sampler.h — next-token choice: greedy argmax, or temperature + nucleus
 * (top-p) sampling as the reference does (spec/model.md §9.3), driven by a
 * seeded generator so that the same seed gives the same output.
 */
#ifndef ALBEDO_SAMPLER_H
#define ALBEDO_SAMPLER_H

#include <stdint.h>

typedef struct sampler {
    uint64_t s[4]; /* xoshiro256** state */
    int cap;       /* capacity of the scratch below */
    int *idx;
    float *prob;
} sampler;

int sampler_init(sampler *sp, int vocab); /* 0, or -1 on OOM */
void sampler_free(sampler *sp);
void sampler_seed(sampler *sp, uint64_t seed);
/* A uniform double in [0, 1). */
double sampler_uniform(sampler *sp);

/* Index of the largest value (first on ties); *margin = top-1 minus top-2. */
int sampler_argmax(const float *v, int n, float *margin);

/* Choose a token from logits [n] (not modified): argmax when temperature is
 * 0, else softmax(logits / temperature), keep the smallest prefix of tokens
 * by descending probability whose mass before each kept token is ≤ top_p,
 * renormalise and draw. */
int sampler_pick(sampler *sp, const float *logits, int n, float temperature, float top_p);

#endif
