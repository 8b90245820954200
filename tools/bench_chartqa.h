/* bench_chartqa.h — `albedo bench chartqa` (tools/bench_chartqa.c). */
#ifndef ALBEDO_TOOLS_BENCH_CHARTQA_H
#define ALBEDO_TOOLS_BENCH_CHARTQA_H

#include "albedo.h"

typedef struct albedo_chartqa_opts {
    int batches[8]; /* max batch sizes to run */
    int n_batches;
    int modes;     /* bit 0: direct, bit 1: CoT */
    int n_images;  /* charts; two questions each */
    int n_threads; /* engine ops threads, 0 = the model's */
    int json;      /* one JSON line per row instead of the table */
    int warmup;    /* untimed requests on other charts of the same sizes before each row */
} albedo_chartqa_opts;

/* Run the workload on m for every batch size and mode; prints the table.
 * Returns 0, or 1 if a request failed. */
int albedo_bench_chartqa(albedo_model *m, const albedo_chartqa_opts *o);

#endif
