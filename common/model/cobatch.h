/* Co-batching of frozen products (the BatchLoRA idea): several computations
 * over one base, each on a thread of its own that runs only while the
 * others wait, meet at their frozen matrix products; products over the same
 * BF16 weights with the same form become one product over the concatenated
 * rows. kernels.c hands its *_k products here when the calling thread is
 * one of cobatch_run's; train.c's trainer_shard_grad_many uses cobatch_run.
 *
 * Exactness: a BF16 product's row depends on that row alone (bf16.h: work
 * is cut by output columns, every accumulator starts from zero and takes
 * its pairs in order), so a row computed among other rows has the bits it
 * has alone. F32 products (OpenBLAS) round a row differently depending on
 * where it falls in the blocking, so they are never concatenated: the F32
 * product calls of all computations (base and trainable alike) run as one
 * team job, each cut into the single-threaded parts it has alone.
 * tests/test_cobatch.c checks both. */
#ifndef PEFTPS_COBATCH_H
#define PEFTPS_COBATCH_H

#include <stdint.h>

/* The most computations one cobatch_run takes. */
#define COBATCH_MAX 64

/* Runs fn(ctx, i) for every i in [0, n), each on a thread of a pool kept
 * for the process, one thread at a time (so that the team and everything
 * but the products run exactly as they would alone); whenever every one
 * still running waits at a product, waiting products are run (those with
 * equal keys as one; which ones wait for a later round is the
 * coordinator's choice, made for sharing: it never changes a result). Returns when all are done.
 * One cobatch_run at a time per process (a second caller waits). n <= 1, or threads that cannot be
 * started, run fn in the caller one after the other: the same results. Returns 0, or -1 when n is
 * out of [0, COBATCH_MAX] (nothing run). */
int cobatch_run(int n, void (*fn)(void *ctx, int i), void *ctx);

/* What co-batching did since the process started (cumulative counters). */
typedef struct cobatch_stats {
    uint64_t rounds;         /* times every computation waited at a product */
    uint64_t calls_shared;   /* products run over the rows of 2 or more computations */
    uint64_t products_in;    /* computations' products those calls served */
    uint64_t rows_shared;    /* rows of those calls */
    uint64_t products_alone; /* BF16 products with no partner (or over the buffer bound) */
    uint64_t products_f32;   /* F32 product calls: never concatenated, each cut as alone */
    uint64_t f32_team_jobs;  /* the team jobs they ran in, several computations' calls each */
} cobatch_stats;
void cobatch_stats_get(cobatch_stats *s);
/* s = a - b, counter by counter (what happened between two readings). */
void cobatch_stats_diff(cobatch_stats *s, const cobatch_stats *a, const cobatch_stats *b);

/* A shared call gathers its members' rows in place (no copies), but the
 * BF16 product rounds its inputs into a buffer of the coordinating thread:
 * calls whose rounded inputs would take more bytes than this are split
 * into several (rows are independent, so the split never shows). */
#define COBATCH_BUFFER_BYTES ((size_t)128 << 20)

/* ---- kernels.c's side ---- */

/* Whether the calling thread is one of a cobatch_run's computations. */
int cobatch_active(void);

/* A product as kernels.c's *_k functions take it, every weight in BF16. */
typedef enum {
    COBATCH_FORWARD,
    COBATCH_RESIDUAL,
    COBATCH_BACKWARD_INPUT,
    COBATCH_F32 /* an F32 product job of kernels.c (gemm_jobs_run), never concatenated */
} cobatch_kind;

typedef struct cobatch_req {
    /* the key: calls with equal keys are one product over their rows */
    cobatch_kind kind;
    int n;                /* products of the call, <= 4 */
    const uint16_t *w[4]; /* BF16 weights (OC[i], C) */
    const float *bias[4]; /* forward: each product's bias; residual: bias[0]; may be NULL */
    int C, OC[4];         /* the shapes */
    int accumulate;       /* backward input: added to dinp's values */
    /* the rows, the computation's own */
    int N;
    const float *in[4]; /* forward, residual: in[0] the input (N,C), residual: in[1] the
                         * residual (N,OC[0]); backward: in[i] douts[i] (N,OC[i]) */
    float *out[4];      /* forward: outs[i] (N,OC[i]); residual: out[0] (N,OC[0]);
                         * backward: out[0] dinp (N,C) */
    void *f32_job;      /* COBATCH_F32: the job and its number of tasks */
    int f32_tasks;
} cobatch_req;

/* Waits until the product has run (with others' rows, or alone). Only from
 * a thread for which cobatch_active() is true. */
void cobatch_product(cobatch_req *r);

#endif
