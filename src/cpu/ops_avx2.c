/* ops_avx2.c — placeholder until the AVX2 kernels land: reports "not available". */
#include "cpu.h"
const ops *ops_avx2_table(void) { return NULL; }
