/*
 * md3_cases.h — the Moondream 3 fixture cases (shared/fixtures/reference/
 * md3-small/cases.json): fixture_check.h under the Moondream 3 rules (a
 * query reasons when its reference output does; the {coord, eos} choice
 * decides each detect/point object after the first; see fixture_rules).
 * Shared by test_md3.c (float32, 1e-3) and tests/cuda/test_md3_cuda.c (bf16
 * on the GPU, 0.1). Include after test.h and jansson.h.
 */
#ifndef ALBEDO_MD3_CASES_H
#define ALBEDO_MD3_CASES_H

#define FIXTURE_RULES \
    { 1, 1, 1 } /* reasoning_if_output, eos_choice, md3_extra_checks */
#include "fixture_check.h"

/* The requests both tests run on md3-alt (synth.c's Moondream 3 of other
 * shapes), q < MD3_VARIANT_REQUESTS: caption, query, query with reasoning,
 * detect, point. */
#define MD3_VARIANT_REQUESTS 5
static inline albedo_request md3_variant_request(int q) {
    static const albedo_skill skills[MD3_VARIANT_REQUESTS] = {
        ALBEDO_SKILL_CAPTION, ALBEDO_SKILL_QUERY, ALBEDO_SKILL_QUERY, ALBEDO_SKILL_DETECT, ALBEDO_SKILL_POINT};
    albedo_request r = albedo_request_default(skills[q]);
    r.temperature = 0;
    r.max_tokens = 12;
    r.max_objects = 3;
    r.question = "What is in the picture?";
    r.object = "helmet";
    r.reasoning = q == 2;
    return r;
}

#endif
