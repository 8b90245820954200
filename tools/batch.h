/* batch.h — `albedo batch`: JSON lines in, JSON lines out (tools/batch.c). */
#ifndef ALBEDO_TOOLS_BATCH_H
#define ALBEDO_TOOLS_BATCH_H
#include <stdio.h>

#include "albedo.h"

/* Run every request line of in on m, printing one result line each to
 * stdout. Returns 0 if every line succeeded, 1 otherwise. */
int albedo_batch_run(albedo_model *m, FILE *in);
#endif
