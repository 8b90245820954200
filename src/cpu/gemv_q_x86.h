/*
 * gemv_q_x86.h — the small-T linear over block-format weights (ops.h
 * qformat), for x86. Included by ops_avx2.c and ops_avx512.c, each compiled
 * for its ISA, after defining
 *
 *   QDOT(u8, s8)  __m256i of 8 int32 lanes, each the sum of four products
 *                 u8[i]*s8[i] (unsigned x signed bytes): vpdpbusd with
 *                 AVX512-VNNI, vpmaddubsw + vpmaddwd on plain AVX2 (its 16-bit
 *                 pair sums cannot saturate: |x| <= 127 and |w| <= 127).
 *   QT_MAX        rows of x per tile (accumulators: 4 x QT_MAX ymm).
 *   INLINE, imin  as in the including file.
 *
 * x arrives quantised per block of 32 (cpu_quantize_x: int8 q_x, float d_x).
 * One block of one weight row against one row of x:
 *   s = sum_i q_w[i] q_x[i]  (exact in int32)    y += (d_w d_x) s
 * where Q4's two sub-blocks have their own d_w: lanes 0..3 of s hold
 * weights 0..15 (scale d0), lanes 4..7 weights 16..31 (d1).
 * vpdpbusd needs one unsigned operand: |q_x| and q_w with the sign of q_x
 * give the same products (vpsignb; q_w is never -128: Q8 stops at -127 and
 * Q4 spans -8..7). The 8 lanes of s are kept, converted and scaled per
 * block, and summed horizontally once per row at the end.
 *
 * One weight row at a time, front to back (one sequential stream per
 * thread, prefetched), against up to QT_MAX rows of x from L1. The scalar reference is ref_linear over q_dequantize_row
 * (ops_ref.c); this differs from it by the rounding of x to int8.
 */
#ifndef ALBEDO_GEMV_Q_X86_H
#define ALBEDO_GEMV_Q_X86_H

#define QPF_AHEAD 2048 /* bytes ahead of the weight stream */

/* The 32 weights of a block as signed bytes. */
INLINE __m256i q_block(const dtype DT, const uint8_t *blk) {
    if (DT == DT_Q8) return _mm256_loadu_si256((const __m256i *)(const void *)(blk + 2));
    const __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(blk + 2));
    const __m128i m = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
}

/* d_w of each of the 8 lanes of a block's sums. Q4: the two codes, each
 * put in the high byte of four words (vpshufb), made halves as
 * q4_code_f16 makes them (an arithmetic shift by one and a mask: sign in
 * bit 15, magnitude in bits 7..13) and widened. */
INLINE __m256 q_scales(const dtype DT, const uint8_t *blk) {
    uint16_t h;
    memcpy(&h, blk, 2);
    if (DT == DT_Q4) {
        const __m128i idx = _mm_setr_epi8(-128, 0, -128, 0, -128, 0, -128, 0, -128, 1, -128, 1, -128, 1, -128, 1);
        const __m128i c = _mm_shuffle_epi8(_mm_cvtsi32_si128(h), idx);
        return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(c, 1), _mm_set1_epi16((short)0xBF80)));
    }
    return _mm256_set1_ps(_cvtsh_ss(h));
}

INLINE float q_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE void gemv_q_row(const int TN, const dtype DT, int nb, const int8_t *xq, size_t ldxq, const uint8_t *wr,
                       float out[QT_MAX]) {
    const size_t bb = DT == DT_Q8 ? Q8_BLOCK_BYTES : Q4_BLOCK_BYTES;
    /* Two accumulators per row of x (even and odd blocks) hide the FMA
     * latency. */
    __m256 acc[QT_MAX][2];
    for (int t = 0; t < TN; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    const float *dx[QT_MAX];
    for (int t = 0; t < TN; t++) dx[t] = (const float *)(const void *)(xq + (size_t)t * ldxq + (size_t)nb * 32);
    /* Blocks in twos, so that the accumulator index is a constant and the
     * accumulators stay in registers. */
    for (int b = 0; b < nb; b += 2) {
        const uint8_t *blk = wr + (size_t)b * bb;
        _mm_prefetch((const char *)blk + QPF_AHEAD, _MM_HINT_T0);
        if (DT == DT_Q8) _mm_prefetch((const char *)blk + QPF_AHEAD + 64, _MM_HINT_T0);
        for (int h = 0; h < 2 && b + h < nb; h++) {
            const __m256i w = q_block(DT, blk + h * bb);
            const __m256 dw = q_scales(DT, blk + h * bb);
            for (int t = 0; t < TN; t++) {
                const __m256i xv =
                    _mm256_loadu_si256((const __m256i *)(const void *)(xq + (size_t)t * ldxq + (size_t)(b + h) * 32));
                const __m256i s = QDOT(_mm256_abs_epi8(xv), _mm256_sign_epi8(w, xv));
                if (h == 0)
                    acc[t][0] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(dx[t][b])), acc[t][0]);
                else
                    acc[t][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(dx[t][b + 1])),
                                                acc[t][1]);
            }
        }
    }
    for (int t = 0; t < TN; t++) out[t] = q_hsum8(_mm256_add_ps(acc[t][0], acc[t][1]));
}

INLINE void gemv_q_dt(const dtype DT, int T, int K, const void *xqv, size_t ldxq, const void *w, const void *b,
                      dtype bdt, int n0, int n1, float *y, size_t ldy) {
    const size_t rb = q_row_bytes(DT, K);
    const int nb = (K + 31) / 32;
    const int8_t *xq = xqv;
    for (int n = n0; n < n1; n++) {
        const uint8_t *wr = (const uint8_t *)w + (size_t)n * rb;
        const float bn = b ? cpu_ld(b, bdt, (size_t)n) : 0.0f;
        for (int t0 = 0; t0 < T; t0 += QT_MAX) {
            float s[QT_MAX];
            const int8_t *xt = xq + (size_t)t0 * ldxq;
            const int tn = imin(QT_MAX, T - t0);
            switch (tn) {
            case 1: gemv_q_row(1, DT, nb, xt, ldxq, wr, s); break;
#if QT_MAX > 2
            case 2: gemv_q_row(2, DT, nb, xt, ldxq, wr, s); break;
            case 3: gemv_q_row(3, DT, nb, xt, ldxq, wr, s); break;
#endif
            default: gemv_q_row(QT_MAX, DT, nb, xt, ldxq, wr, s); break;
            }
            for (int t = 0; t < tn; t++) y[(size_t)(t0 + t) * ldy + n] = s[t] + bn;
        }
    }
}

static void gemv_q_x86(int T, int K, const void *xq, size_t ldxq, const void *w, dtype dt, const void *b, dtype bdt,
                       int n0, int n1, float *y, size_t ldy) {
    if (dt == DT_Q8)
        gemv_q_dt(DT_Q8, T, K, xq, ldxq, w, b, bdt, n0, n1, y, ldy);
    else
        gemv_q_dt(DT_Q4, T, K, xq, ldxq, w, b, bdt, n0, n1, y, ldy);
}

#endif
