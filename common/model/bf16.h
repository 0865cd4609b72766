/* BF16 products of the frozen base: BF16 weights (as shipped) times
 * activations rounded to BF16 (round to nearest even), accumulated in F32
 * with AVX512-BF16's vdpbf16ps, outputs F32. kernels.c calls these for a
 * weight given in BF16 (kweight); the CPU check serves worker/, cli/ and
 * model_create.
 *
 * Every output element is one F32 accumulator that takes the pairs of its
 * reduction in order 0, 1, 2, ... (each vdpbf16ps step adds the odd product,
 * then the even one, rounding after each), starting from zero; the residual,
 * bias or previous value is added once at the end. Work is cut by output
 * columns only, so a row's result depends neither on the other rows of the
 * call, nor on the team's size, nor on which thread computed it. */
#ifndef PEFTPS_BF16_H
#define PEFTPS_BF16_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"

/* Whether this CPU (and OS) runs AVX512-BF16; answers no when the
 * environment variable PEFTPS_CPU_DISABLE lists "avx512bf16" (comma
 * separated), so that tests can play a CPU without it. */
int bf16_cpu_ok(void);
/* 0 when BF16 products can run here, else -1 with e saying which
 * instruction set is missing, for `what` (e.g. "compute: BF16"). */
int bf16_cpu_check(const char *what, err *e);

/* dst (n) = src rounded to BF16, to nearest even (NaN stays NaN). */
void bf16_round(uint16_t *dst, const float *src, size_t n);
/* dst (n) = src widened to F32 (exact). */
void bf16_widen(float *dst, const uint16_t *src, size_t n);

/* One product of a job. NT: out (N,M) = x (N,K) w^T with w (M,K), a
 * linear's forward. NN: out (N,M) = x (N,K) w with w (K,M), the input
 * gradient through a linear (x = dy, w the weight (OC,C), K = OC, M = C).
 * x is F32 and rounded to BF16 here. The result is written, or added to
 * `add` (rows add_ld floats apart; add_ld 0 adds the same row, a bias, to
 * every row; add may equal out). */
typedef struct bf16_op {
    int nn;
    int N, K, M;
    const float *x;
    const uint16_t *w;
    float *out;
    const float *add;
    size_t add_ld;
    /* Rows gathered from several places (co-batching, cobatch.h): when not
     * NULL, row i of x is x_rows[i] (K floats), of out out_rows[i] (M
     * floats) and of add add_rows[i]; x, out, add are then not used. A
     * row's bits are the same either way. */
    const float *const *x_rows;
    float *const *out_rows;
    const float *const *add_rows;
} bf16_op;

/* Runs n <= 4 products as one team job. Independent (sum 0): each op
 * writes its own out. Summed (sum 1): all ops share out and its shape and
 * are added in order: out = op0 (with op0's add) + op1 + op2 ..., each op's
 * product formed whole before being added. The CPU must pass bf16_cpu_ok. */
void bf16_matmul(const bf16_op *ops, int n, int sum);

#endif
