/* The numeric layers of the Llama family (see kernels.h): forward/backward
 * pairs over raw float arrays, matrix products through cblas_sgemm, loops
 * spread over the thread team of team.h. model.c composes them into the
 * decoder; tests/test_kernels.c checks each backward against finite
 * differences of its forward, tests/test_team.c the parallel paths. */
#include "model/kernels.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/team.h"
#include "model/bf16.h"
#include "model/cobatch.h"

/* ---- vectorisable elementwise helpers -------------------------------------- */

/* The build is plain -O2, where GCC vectorises a loop only when its trip
 * count is a known multiple of the vector width, never across a float
 * comparison (which may trap) and never across a libm call. So the hot
 * elementwise loops (exp in softmax, cross-entropy and SwiGLU) run in blocks
 * of VB with a constant inner count, compare floats through their bits, and
 * use exp_fast; a scalar tail finishes each row. */
#define VB 16

/* The build targets baseline x86-64 (SSE2); the row loops below also get an
 * AVX2 clone that glibc's ifunc picks at load time. The lane structure is in
 * the source, so both clones round identically. */
#if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
#define ROW_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define ROW_LOOP
#endif

/* e^x within 3e-7 relative (expf: 6e-8), for |x| <= 87; clamped beyond
 * (e^-87 stands in for 0, e^88 for overflow). NaN and infinities give NaN,
 * so a diverged model shows as a NaN loss. Cody-Waite reduction x = n ln2 + r,
 * degree-6 Taylor polynomial of e^r, 2^n through the exponent bits. */
static inline float exp_fast(float x) {
    float x0 = x;
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    b = b > 0xC2AE0000u ? 0xC2AE0000u : b;                  /* x < -87 */
    b = (int32_t)b > 0x42B00000 ? (uint32_t)0x42B00000 : b; /* x > 88 */
    memcpy(&x, &b, sizeof x);
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = x - n * 0.693145752f;
    r = r - n * 1.42860677e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f +
                                                  r * (0.0416666679f + r * (0.00833333377f +
                                                                            r * 0.00138888892f)))));
    int32_t e = ((int32_t)n + 127) * (1 << 23);
    float s;
    memcpy(&s, &e, sizeof s);
    return p * s + (x0 - x0);
}

/* Float order as signed-integer order: negative floats flip their
 * magnitude bits. An involution, so it also maps back. */
static inline int32_t float_key(int32_t bits) {
    return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

/* The largest of x[0..n), n >= 1 (a positive NaN counts as largest). */
ROW_LOOP static float max_of(const float *x, int n) {
    int32_t m[VB], r, v;
    int i = 0;
    memcpy(&r, x, sizeof r);
    r = float_key(r);
    if (n >= 2 * VB) {
        memcpy(m, x, sizeof m);
        for (int k = 0; k < VB; k++) m[k] = float_key(m[k]);
        for (i = VB; i + VB <= n; i += VB)
            for (int k = 0; k < VB; k++) {
                memcpy(&v, x + i + k, sizeof v);
                v = float_key(v);
                m[k] = v > m[k] ? v : m[k];
            }
        for (int k = 0; k < VB; k++) r = m[k] > r ? m[k] : r;
    }
    for (; i < n; i++) {
        memcpy(&v, x + i, sizeof v);
        v = float_key(v);
        r = v > r ? v : r;
    }
    r = float_key(r);
    float f;
    memcpy(&f, &r, sizeof f);
    return f;
}

/* Sum of e^(x[i] - m) over [0, n); with y not NULL, also y[i] = that term
 * (y may be x: each element is read before it is written). */
ROW_LOOP static float exp_sum(float *y, const float *x, float m, int n) {
    float acc[VB] = {0}, t[VB];
    int i = 0;
    for (; i + VB <= n; i += VB) {
        for (int k = 0; k < VB; k++) {
            t[k] = exp_fast(x[i + k] - m);
            acc[k] += t[k];
        }
        if (y) memcpy(y + i, t, sizeof t);
    }
    float sum = 0.0f;
    for (int k = 0; k < VB; k++) sum += acc[k];
    for (; i < n; i++) {
        float e = exp_fast(x[i] - m);
        if (y) y[i] = e;
        sum += e;
    }
    return sum;
}

/* ---- matrix products over the team ------------------------------------------------ */

/* One cblas_sgemm, row-major: C (M,N) = alpha op(A) op(B) + beta C, where C
 * first becomes res (a matrix with C's stride; may be C itself) plus bias (a
 * row vector), when either is given. */
typedef struct gemm {
    CBLAS_TRANSPOSE ta, tb;
    int M, N, K;
    float alpha;
    const float *A;
    int lda;
    const float *B;
    int ldb;
    float beta;
    float *C;
    int ldc;
    const float *res, *bias;
} gemm;

/* A product is cut into parts along the longer side of C; the cut depends
 * on the shape alone, never on the team, because OpenBLAS rounds a row
 * differently depending on where it falls in its blocking. Each part
 * repacks the operand along the uncut side (A when cutting columns, B when
 * cutting rows), which costs about 1/width of the part's multiply-adds: so
 * 2 parts from 8 MFLOP, doubled while parts stay GEMM_WIDTH wide, at most
 * 8. Measured on two cores: narrower parts (4 or 8 at 96..384 wide) cost 2
 * to 6% of a GPT-2-sized step against this rule. */
#define GEMM_MIN_FLOPS 8e6
#define GEMM_WIDTH 512
#define GEMM_ALIGN 16

typedef struct gemm_plan {
    int by_rows, per, parts;
} gemm_plan;

static gemm_plan plan_of(int M, int N, double flops) {
    gemm_plan p = {M >= N, M >= N ? M : N, 1};
    int dim = p.per;
    if (flops < GEMM_MIN_FLOPS || dim < 2 * GEMM_ALIGN) return p;
    int want = 2;
    while (want < 8 && dim / (2 * want) >= GEMM_WIDTH) want *= 2;
    p.per = ((dim + want - 1) / want + GEMM_ALIGN - 1) / GEMM_ALIGN * GEMM_ALIGN;
    p.parts = (dim + p.per - 1) / p.per;
    return p;
}

/* Part [lo, hi) of g's rows or columns, as a product of its own. */
static gemm gemm_part(const gemm *g, int by_rows, int lo, int hi) {
    gemm s = *g;
    if (by_rows) {
        s.M = hi - lo;
        s.A = g->ta == CblasNoTrans ? g->A + (size_t)lo * g->lda : g->A + lo;
        s.C = g->C + (size_t)lo * g->ldc;
        if (g->res) s.res = g->res + (size_t)lo * g->ldc;
    } else {
        s.N = hi - lo;
        s.B = g->tb == CblasNoTrans ? g->B + lo : g->B + (size_t)lo * g->ldb;
        s.C = g->C + lo;
        if (g->res) s.res = g->res + lo;
        if (g->bias) s.bias = g->bias + lo;
    }
    return s;
}

static void gemm_call(const gemm *g) {
    float beta = g->beta;
    if (g->res || g->bias) {
        for (int i = 0; i < g->M; i++) {
            float *c = g->C + (size_t)i * g->ldc;
            const float *r = g->res ? g->res + (size_t)i * g->ldc : NULL;
            if (r && r != c) memcpy(c, r, (size_t)g->N * sizeof(float));
            if (g->bias && r)
                for (int j = 0; j < g->N; j++) c[j] += g->bias[j];
            else if (g->bias)
                memcpy(c, g->bias, (size_t)g->N * sizeof(float));
        }
        beta = 1.0f;
    }
    cblas_sgemm(CblasRowMajor, g->ta, g->tb, g->M, g->N, g->K, g->alpha, g->A, g->lda, g->B, g->ldb,
                beta, g->C, g->ldc);
}

/* C (M,N) = op(A) op(B) + beta C, no residual or bias. */
static gemm gemm_of(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int M, int N, int K, const float *A,
                    int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    gemm g = {.ta = ta,
              .tb = tb,
              .M = M,
              .N = N,
              .K = K,
              .alpha = 1.0f,
              .A = A,
              .lda = lda,
              .B = B,
              .ldb = ldb,
              .beta = beta,
              .C = C,
              .ldc = ldc};
    return g;
}

/* Up to 4 products run as one team job. Independent (sum 0): each is cut
 * by its own plan and every part is a task. Summed (sum 1): all write the
 * same C (the first with its beta, the rest adding), have its shape, and
 * one task runs all of them, in order, on its part of C. */
#define GEMM_MAX_OPS 4

typedef struct gemm_job {
    const gemm *ops;
    int nops, sum;
    gemm_plan plan[GEMM_MAX_OPS];
    int first[GEMM_MAX_OPS + 1]; /* task index of each op's first part */
} gemm_job;

static void gemm_task(void *c, int task, float *scratch) {
    (void)scratch;
    const gemm_job *j = c;
    int op = 0;
    while (!j->sum && task >= j->first[op + 1]) op++;
    const gemm_plan *p = &j->plan[op];
    int lo = (task - j->first[op]) * p->per;
    int dim = p->by_rows ? j->ops[op].M : j->ops[op].N;
    int hi = lo + p->per < dim ? lo + p->per : dim;
    for (int i = op; i < (j->sum ? j->nops : op + 1); i++) {
        gemm part = gemm_part(&j->ops[i], p->by_rows, lo, hi);
        gemm_call(&part);
    }
}

/* Plans the job of the nops products; returns its number of tasks. */
static int gemm_job_plan(gemm_job *jp, const gemm *ops, int nops, int sum) {
    gemm_job j = {.ops = ops, .nops = nops, .sum = sum};
    int tasks = 0;
    if (sum) {
        double flops = 0;
        for (int i = 0; i < nops; i++) flops += 2.0 * ops[i].M * ops[i].N * (double)ops[i].K;
        j.plan[0] = plan_of(ops[0].M, ops[0].N, flops);
        tasks = j.plan[0].parts;
    } else
        for (int i = 0; i < nops; i++) {
            j.first[i] = tasks;
            j.plan[i] = plan_of(ops[i].M, ops[i].N, 2.0 * ops[i].M * ops[i].N * (double)ops[i].K);
            tasks += j.plan[i].parts;
        }
    j.first[nops] = tasks;
    *jp = j;
    return tasks;
}

static void gemm_team(const gemm *ops, int nops, int sum) {
    gemm_job j;
    int tasks = gemm_job_plan(&j, ops, nops, sum);
    /* A computation of a co-batch (cobatch.h) hands the job over, to run
     * beside the others' F32 jobs as one team job, each part as here. */
    if (cobatch_active() && !team_in_task()) {
        cobatch_req r = {.kind = COBATCH_F32, .f32_job = &j, .f32_tasks = tasks};
        cobatch_product(&r);
        return;
    }
    /* Also for one task: BLAS single-threaded, as every product here. */
    team_run(tasks, gemm_task, &j, NULL, 0);
}

typedef struct gemm_jobs {
    void *const *jobs;
    const int *first; /* task index of each job's first task, and the total */
    int n;
} gemm_jobs;

static void gemm_jobs_task(void *c, int task, float *scratch) {
    const gemm_jobs *g = c;
    int k = 0;
    while (task >= g->first[k + 1]) k++;
    gemm_task(g->jobs[k], task - g->first[k], scratch);
}

void gemm_jobs_run(void *const *jobs, const int *tasks, int n) {
    int first[COBATCH_MAX + 1];
    first[0] = 0;
    for (int k = 0; k < n; k++) first[k + 1] = first[k] + tasks[k];
    gemm_jobs g = {jobs, first, n};
    team_run(first[n], gemm_jobs_task, &g, NULL, 0);
}

/* ---- low-rank branch --------------------------------------------------------- */

/* The forward's rows in 1, 2, 4 or 8 parts (multiples of GEMM_ALIGN rows),
 * each of at least LOWRANK_ROWS rows and 2^20 multiply-adds, so that a
 * part is worth a task: the parts depend on the shape alone. */
#define LOWRANK_ROWS 64

typedef struct lowrank {
    float *y, *h;
    const float *x, *a, *b;
    float scale;
    int N, in, r, out, per;
} lowrank;

/* Rows [task * per, ...) of both products: a row of y needs only its own h. */
static void lowrank_fwd_task(void *c, int task, float *scratch) {
    (void)scratch;
    const lowrank *l = c;
    int lo = task * l->per, n = l->N - lo < l->per ? l->N - lo : l->per;
    float *h = l->h + (size_t)lo * l->r;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, l->r, l->in, 1.0f,
                l->x + (size_t)lo * l->in, l->in, l->a, l->in, 0.0f, h, l->r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, l->out, l->r, l->scale, h, l->r, l->b,
                l->r, 1.0f, l->y + (size_t)lo * l->out, l->out);
}

void lowrank_forward(float *y, float *h, const float *x, const float *a, const float *b,
                     float scale, int N, int in, int r, int out) {
    if (N <= 0) return;
    lowrank l = {y, h, x, a, b, scale, N, in, r, out, N};
    double madds = (double)N * r * ((double)in + out);
    int parts = 1;
    while (parts < 8 && madds / (2 * parts) >= (1 << 20) && N / (2 * parts) >= LOWRANK_ROWS)
        parts *= 2;
    l.per = ((N + parts - 1) / parts + GEMM_ALIGN - 1) / GEMM_ALIGN * GEMM_ALIGN;
    team_run((N + l.per - 1) / l.per, lowrank_fwd_task, &l, NULL, 0);
}

void lowrank_backward(float *da, float *db, float *dx, float *g, const float *dy, const float *x,
                      const float *h, const float *a, const float *b, float scale, int N, int in,
                      int r, int out) {
    if (N <= 0) return;
    /* db and g read only dy: one job; da and dx read g: the next. */
    gemm first[2] = {
        gemm_of(CblasTrans, CblasNoTrans, out, r, N, dy, out, h, r, 1.0f, db, r),
        gemm_of(CblasNoTrans, CblasNoTrans, N, r, out, dy, out, b, r, 0.0f, g, r),
    };
    first[0].alpha = scale;
    gemm_team(first, 2, 0);
    gemm second[2] = {
        gemm_of(CblasTrans, CblasNoTrans, r, in, N, g, r, x, in, 1.0f, da, in),
        gemm_of(CblasNoTrans, CblasNoTrans, N, in, r, g, r, a, in, 1.0f, dx, in),
    };
    second[0].alpha = second[1].alpha = scale;
    gemm_team(second, dx ? 2 : 1, 0);
}

/* ---- embedding ------------------------------------------------------------ */

void embedding_forward(float *out, const int32_t *tokens, const float *table, int N, int C) {
    // out is (N,C), table is (V,C)
    for (int i = 0; i < N; i++)
        memcpy(out + (size_t)i * C, table + (size_t)tokens[i] * C, (size_t)C * sizeof(float));
}

void embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int N, int C) {
    // dtable is (V,C), dout is (N,C)
    for (int i = 0; i < N; i++) {
        float *restrict d = dtable + (size_t)tokens[i] * C;
        const float *restrict g = dout + (size_t)i * C;
        for (int c = 0; c < C; c++) d[c] += g[c];
    }
}

/* ---- RMSNorm and the per-channel scale ------------------------------------ */

/* Row loops of the norms, restrict and in blocks of VB (see exp_fast). */
ROW_LOOP static float dot_row(const float *restrict a, const float *restrict b, int n) {
    float acc[VB] = {0};
    int i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++) acc[k] += a[i + k] * b[i + k];
    float s = 0.0f;
    for (int k = 0; k < VB; k++) s += acc[k];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y = x * r * w, or y = x * r when w is NULL. */
ROW_LOOP static void scale_row(float *restrict y, const float *restrict x, float r,
                               const float *restrict w, int n) {
    int i = 0;
    if (w) {
        for (; i + VB <= n; i += VB)
            for (int k = 0; k < VB; k++) y[i + k] = x[i + k] * r * w[i + k];
        for (; i < n; i++) y[i] = x[i] * r * w[i];
    } else {
        for (; i + VB <= n; i += VB)
            for (int k = 0; k < VB; k++) y[i + k] = x[i + k] * r;
        for (; i < n; i++) y[i] = x[i] * r;
    }
}

/* xh = x * r and y = xh * w: the same bits as scale_row twice. */
ROW_LOOP static void norm_rebuild_row(float *restrict xh, float *restrict y,
                                      const float *restrict x, float r, const float *restrict w,
                                      int n) {
    int i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++) {
            float t = x[i + k] * r;
            xh[i + k] = t;
            y[i + k] = t * w[i + k];
        }
    for (; i < n; i++) {
        float t = x[i] * r;
        xh[i] = t;
        y[i] = t * w[i];
    }
}

/* d += a * b */
ROW_LOOP static void fma_row(float *restrict d, const float *restrict a, const float *restrict b,
                             int n) {
    int i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++) d[i + k] += a[i + k] * b[i + k];
    for (; i < n; i++) d[i] += a[i] * b[i];
}

ROW_LOOP static void rms_bwd_row(float *restrict d, const float *restrict g,
                                 const float *restrict xh, float r, float m, int n) {
    int i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++) d[i + k] += r * (g[i + k] - xh[i + k] * m);
    for (; i < n; i++) d[i] += r * (g[i] - xh[i] * m);
}

/* The arguments of the row loops below, one struct for all; row is the
 * work on one row, which rows_run spreads over the team. */
typedef struct rows_args rows_args;
struct rows_args {
    float *out, *out2, *rstd;
    const float *inp, *inp2, *weight, *rs;
    int C;
    float eps;
    void (*row)(const rows_args *a, size_t i, size_t C);
};

static void rows_range(void *c, size_t r0, size_t r1) {
    const rows_args *a = c;
    for (size_t i = r0; i < r1; i++) a->row(a, i, (size_t)a->C);
}

/* Runs row on each of the N rows of a, cost floats a row. */
static void rows_run(rows_args *a, void (*row)(const rows_args *, size_t, size_t), int N,
                     size_t cost) {
    a->row = row;
    team_for((size_t)N, cost, 1, rows_range, a);
}

static void rmsnorm_fwd_row(const rows_args *a, size_t i, size_t C) {
    const float *x = a->inp + i * C;
    float r = 1.0f / sqrtf(dot_row(x, x, a->C) / (float)a->C + a->eps);
    scale_row(a->out + i * C, x, r, a->weight, a->C);
    a->rstd[i] = r;
}

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C,
                     float eps) {
    // out, inp are (N,C), weight is (C), rstd is (N)
    rows_args a = {.out = out, .rstd = rstd, .inp = inp, .weight = weight, .C = C, .eps = eps};
    rows_run(&a, rmsnorm_fwd_row, N, (size_t)C * 2);
}

static void normalize_row(const rows_args *a, size_t i, size_t C) {
    if (a->out2)
        norm_rebuild_row(a->out + i * C, a->out2 + i * C, a->inp + i * C, a->rs[i], a->weight,
                         a->C);
    else
        scale_row(a->out + i * C, a->inp + i * C, a->rs[i], NULL, a->C);
}

void rmsnorm_normalize(float *xhat, const float *inp, const float *rstd, int N, int C) {
    // xhat, inp are (N,C), rstd is (N)
    rows_args a = {.out = xhat, .inp = inp, .rs = rstd, .C = C};
    rows_run(&a, normalize_row, N, (size_t)C);
}

void rmsnorm_rebuild(float *xhat, float *out, const float *inp, const float *rstd,
                     const float *weight, int N, int C) {
    // xhat, out, inp are (N,C), rstd is (N), weight is (C)
    rows_args a = {.out = xhat, .out2 = out, .inp = inp, .rs = rstd, .weight = weight, .C = C};
    rows_run(&a, normalize_row, N, (size_t)C * 2);
}

static void rmsnorm_bwd_row(const rows_args *a, size_t i, size_t C) {
    // xhat = x r with r = (mean(x^2) + eps)^-1/2, so
    // dx = r (dxhat - xhat mean(dxhat xhat)).
    const float *g = a->inp + i * C, *xh = a->inp2 + i * C;
    float m = dot_row(g, xh, a->C) / (float)a->C;
    rms_bwd_row(a->out + i * C, g, xh, a->rs[i], m, a->C);
}

void rmsnorm_backward(float *dinp, const float *dxhat, const float *xhat, const float *rstd, int N,
                      int C) {
    // dinp, dxhat, xhat are (N,C), rstd is (N).
    rows_args a = {.out = dinp, .inp = dxhat, .inp2 = xhat, .rs = rstd, .C = C};
    rows_run(&a, rmsnorm_bwd_row, N, (size_t)C * 3);
}

static void scale_fwd_row(const rows_args *a, size_t i, size_t C) {
    scale_row(a->out + i * C, a->inp + i * C, 1.0f, a->weight, a->C);
}

void scale_forward(float *out, const float *inp, const float *weight, int N, int C) {
    // out, inp are (N,C), weight is (C)
    rows_args a = {.out = out, .inp = inp, .weight = weight, .C = C};
    rows_run(&a, scale_fwd_row, N, (size_t)C);
}

static void scale_bwd_row(const rows_args *a, size_t i, size_t C) {
    fma_row(a->out + i * C, a->inp + i * C, a->weight, a->C);
}

void scale_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                    const float *weight, int N, int C) {
    // dinp, dout, inp are (N,C), dweight, weight are (C)
    if (dinp) {
        rows_args a = {.out = dinp, .inp = dout, .weight = weight, .C = C};
        rows_run(&a, scale_bwd_row, N, (size_t)C);
    }
    /* A sum over rows: in row order, in the caller. */
    if (dweight)
        for (int i = 0; i < N; i++) fma_row(dweight, dout + (size_t)i * C, inp + (size_t)i * C, C);
}

/* ---- linear ----------------------------------------------------------------- */

void linear_forward(float *out, const float *inp, const float *weight, const float *bias, int N,
                    int C, int OC) {
    // out is (N,OC), inp is (N,C), weight is (OC,C), bias is (OC)
    const float *w[1] = {weight}, *b[1] = {bias};
    float *o[1] = {out};
    linears_forward(1, o, inp, w, b, N, C, &OC);
}

void linears_forward(int n, float *const *outs, const float *inp, const float *const *weights,
                     const float *const *biases, int N, int C, const int *OC) {
    // outs[i] is (N,OC[i]), inp is (N,C), weights[i] is (OC[i],C), biases[i] is (OC[i])
    gemm ops[GEMM_MAX_OPS];
    for (int i = 0; i < n; i++) {
        ops[i] = gemm_of(CblasNoTrans, CblasTrans, N, OC[i], C, inp, C, weights[i], C, 0.0f,
                         outs[i], OC[i]);
        ops[i].bias = biases ? biases[i] : NULL;
    }
    gemm_team(ops, n, 0);
}

void linear_residual_forward(float *out, const float *res, const float *inp, const float *weight,
                             const float *bias, int N, int C, int OC) {
    // out, res are (N,OC), inp is (N,C), weight is (OC,C), bias is (OC)
    gemm op = gemm_of(CblasNoTrans, CblasTrans, N, OC, C, inp, C, weight, C, 0.0f, out, OC);
    op.res = res;
    op.bias = bias;
    gemm_team(&op, 1, 0);
}

void linears_backward_input(float *dinp, int accumulate, int n, const float *const *douts,
                            const float *const *weights, int N, int C, const int *OC) {
    // dinp is (N,C), douts[i] is (N,OC[i]), weights[i] is (OC[i],C)
    gemm ops[GEMM_MAX_OPS];
    for (int i = 0; i < n; i++)
        ops[i] = gemm_of(CblasNoTrans, CblasNoTrans, N, C, OC[i], douts[i], OC[i], weights[i], C,
                         i || accumulate ? 1.0f : 0.0f, dinp, C);
    gemm_team(ops, n, 1);
}

void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                     const float *weight, int N, int C, int OC) {
    // dinp, inp are (N,C), dweight, weight are (OC,C), dout is (N,OC), dbias is (OC)
    if (dinp) linears_backward_input(dinp, 1, 1, &dout, &weight, N, C, &OC);
    if (dweight) {
        gemm op = gemm_of(CblasTrans, CblasNoTrans, OC, C, N, dout, OC, inp, C, 1.0f, dweight, C);
        gemm_team(&op, 1, 0);
    }
    if (dbias)
        for (int i = 0; i < N; i++) {
            const float *restrict g = dout + (size_t)i * OC;
            for (int o = 0; o < OC; o++) dbias[o] += g[o];
        }
}

/* ---- the same with BF16 weights (bf16.h) -------------------------------------- */

/* out (N,OC) = inp (N,C) w^T + bias (a row, may be NULL), w a BF16 (OC,C):
 * one product of linears_forward_k. */
static bf16_op fwd_op(const float *inp, const uint16_t *w, float *out, const float *bias, int N,
                      int C, int OC) {
    return (bf16_op){
        .N = N, .K = C, .M = OC, .x = inp, .w = w, .out = out, .add = bias, .add_ld = 0};
}

/* out (N,OC) = res + inp (N,C) w^T, w a BF16 (OC,C): linear_residual_forward_k's
 * product, before its bias. */
static bf16_op residual_op(float *out, const float *res, const float *inp, const uint16_t *w, int N,
                           int C, int OC) {
    return (bf16_op){
        .N = N, .K = C, .M = OC, .x = inp, .w = w, .out = out, .add = res, .add_ld = (size_t)OC};
}

/* Its bias, added after the product and the residual, one row after another:
 * the same bits on every machine. */
static void bias_row(float *restrict o, const float *restrict bias, int OC) {
    for (int j = 0; j < OC; j++) o[j] += bias[j];
}

/* Whether every one of the n weights is BF16: a product that co-batching
 * (cobatch.h) may share over several computations' rows (F32 ones go
 * through gemm_team, which hands their jobs over whole). */
static int cobatch_all_h(int n, const kweight *weights) {
    for (int i = 0; i < n; i++)
        if (!weights[i].h) return 0;
    return 1;
}

void linears_forward_k(int n, float *const *outs, const float *inp, const kweight *weights,
                       const float *const *biases, int N, int C, const int *OC) {
    if (cobatch_active() && cobatch_all_h(n, weights)) {
        cobatch_req r = {.kind = COBATCH_FORWARD, .n = n, .C = C, .N = N, .in = {inp}};
        for (int i = 0; i < n; i++) {
            r.w[i] = weights[i].h;
            r.bias[i] = biases ? biases[i] : NULL;
            r.OC[i] = OC[i];
            r.out[i] = outs[i];
        }
        cobatch_product(&r);
        return;
    }
    gemm ops[GEMM_MAX_OPS];
    bf16_op hops[GEMM_MAX_OPS];
    int nf = 0, nh = 0;
    for (int i = 0; i < n; i++) {
        const float *bias = biases ? biases[i] : NULL;
        if (weights[i].h) {
            hops[nh++] = fwd_op(inp, weights[i].h, outs[i], bias, N, C, OC[i]);
        } else {
            ops[nf] = gemm_of(CblasNoTrans, CblasTrans, N, OC[i], C, inp, C, weights[i].f, C, 0.0f,
                              outs[i], OC[i]);
            ops[nf++].bias = bias;
        }
    }
    if (nh) bf16_matmul(hops, nh, 0);
    if (nf) gemm_team(ops, nf, 0);
}

void linear_residual_forward_k(float *out, const float *res, const float *inp, kweight weight,
                               const float *bias, int N, int C, int OC) {
    if (cobatch_active() && cobatch_all_h(1, &weight)) {
        cobatch_req r = {.kind = COBATCH_RESIDUAL,
                         .n = 1,
                         .w = {weight.h},
                         .bias = {bias},
                         .C = C,
                         .OC = {OC},
                         .N = N,
                         .in = {inp, res},
                         .out = {out}};
        cobatch_product(&r);
        return;
    }
    if (!weight.h) {
        linear_residual_forward(out, res, inp, weight.f, bias, N, C, OC);
        return;
    }
    bf16_op op = residual_op(out, res, inp, weight.h, N, C, OC);
    bf16_matmul(&op, 1, 0);
    /* The bias (o_proj's, down_proj's) */
    if (bias)
        for (int i = 0; i < N; i++) bias_row(out + (size_t)i * OC, bias, OC);
}

/* dinp (N,C) (+)= dout (N,OC) w, w a BF16 (OC,C): one product of
 * linears_backward_input_k, added to dinp's own values when accumulate. */
static bf16_op bwd_input_op(float *dinp, int accumulate, const float *dout, const uint16_t *w,
                            int N, int C, int OC) {
    return (bf16_op){.nn = 1,
                     .N = N,
                     .K = OC,
                     .M = C,
                     .x = dout,
                     .w = w,
                     .out = dinp,
                     .add = accumulate ? dinp : NULL,
                     .add_ld = (size_t)C};
}

void linears_backward_input_k(float *dinp, int accumulate, int n, const float *const *douts,
                              const kweight *weights, int N, int C, const int *OC) {
    if (cobatch_active() && cobatch_all_h(n, weights)) {
        cobatch_req r = {.kind = COBATCH_BACKWARD_INPUT,
                         .n = n,
                         .C = C,
                         .accumulate = accumulate,
                         .N = N,
                         .out = {dinp}};
        for (int i = 0; i < n; i++) {
            r.w[i] = weights[i].h;
            r.OC[i] = OC[i];
            r.in[i] = douts[i];
        }
        cobatch_product(&r);
        return;
    }
    int nh = 0;
    for (int i = 0; i < n; i++) nh += weights[i].h != NULL;
    if (nh == n) {
        bf16_op ops[GEMM_MAX_OPS];
        for (int i = 0; i < n; i++)
            ops[i] = bwd_input_op(dinp, accumulate, douts[i], weights[i].h, N, C, OC[i]);
        bf16_matmul(ops, n, 1);
        return;
    }
    /* F32 only, or mixed: one product after the other, in order of i. */
    for (int i = 0; i < n; i++) {
        int acc = i || accumulate;
        if (weights[i].h) {
            bf16_op op = bwd_input_op(dinp, acc, douts[i], weights[i].h, N, C, OC[i]);
            bf16_matmul(&op, 1, 0);
        } else if (!nh) {
            const float *w[GEMM_MAX_OPS];
            for (int k = 0; k < n; k++) w[k] = weights[k].f;
            linears_backward_input(dinp, accumulate, n, douts, w, N, C, OC);
            return;
        } else
            linears_backward_input(dinp, acc, 1, &douts[i], &weights[i].f, N, C, &OC[i]);
    }
}

/* ---- the same over gathered rows (co-batching, cobatch.h) ---------------------- */

void linears_forward_rows(int n, float *const *const *outs, const float *const *inp,
                          const uint16_t *const *w, const float *const *biases, int N, int C,
                          const int *OC) {
    bf16_op ops[GEMM_MAX_OPS];
    for (int i = 0; i < n; i++) {
        ops[i] = fwd_op(NULL, w[i], NULL, biases ? biases[i] : NULL, N, C, OC[i]);
        ops[i].x_rows = inp;
        ops[i].out_rows = outs[i];
    }
    bf16_matmul(ops, n, 0);
}

void linear_residual_forward_rows(float *const *out, const float *const *res,
                                  const float *const *inp, const uint16_t *w, const float *bias,
                                  int N, int C, int OC) {
    bf16_op op = residual_op(NULL, NULL, NULL, w, N, C, OC);
    op.x_rows = inp;
    op.out_rows = out;
    op.add_rows = res;
    bf16_matmul(&op, 1, 0);
    if (bias)
        for (int i = 0; i < N; i++) bias_row(out[i], bias, OC);
}

void linears_backward_input_rows(float *const *dinp, int accumulate, int n,
                                 const float *const *const *douts, const uint16_t *const *w, int N,
                                 int C, const int *OC) {
    bf16_op ops[GEMM_MAX_OPS];
    for (int i = 0; i < n; i++) {
        ops[i] = bwd_input_op(NULL, 0, NULL, w[i], N, C, OC[i]);
        ops[i].x_rows = douts[i];
        ops[i].out_rows = dinp;
        ops[i].add_rows = accumulate ? (const float *const *)dinp : NULL;
    }
    bf16_matmul(ops, n, 1);
}

/* dout transposed and inp rounded, per calling thread, grown as needed. */
static _Thread_local float *wg_t;
static _Thread_local uint16_t *wg_x;
static _Thread_local size_t wg_t_len, wg_x_len;

typedef struct transpose_args {
    float *dst;
    const float *src;
    int N, OC;
} transpose_args;

/* Rows [o0, o1) of dst (OC,N) = src (N,OC) transposed, in blocks of 16
 * columns by 64 rows of src so that the lines read stay in cache. */
static void transpose_rows(void *c, size_t o0, size_t o1) {
    const transpose_args *a = c;
    size_t N = (size_t)a->N, OC = (size_t)a->OC;
    for (size_t ob = o0; ob < o1; ob += 16) {
        size_t oe = ob + 16 < o1 ? ob + 16 : o1;
        for (size_t ib = 0; ib < N; ib += 64) {
            size_t ie = ib + 64 < N ? ib + 64 : N;
            for (size_t o = ob; o < oe; o++)
                for (size_t i = ib; i < ie; i++) a->dst[o * N + i] = a->src[i * OC + o];
        }
    }
}

void linear_backward_weight_bf16(float *dweight, const float *dout, const float *inp, int N, int C,
                                 int OC) {
    // dweight is (OC,C), dout is (N,OC), inp is (N,C)
    size_t nt = (size_t)OC * N, nx = (size_t)N * C;
    if (nt > wg_t_len) {
        free(wg_t);
        wg_t_len = (wg_t = malloc(nt * sizeof *wg_t)) ? nt : 0;
    }
    if (nx > wg_x_len) {
        free(wg_x);
        wg_x_len = (wg_x = malloc(nx * sizeof *wg_x)) ? nx : 0;
    }
    if (!wg_t || !wg_x) abort(); /* as any workspace failing mid-step */
    transpose_args ta = {wg_t, dout, N, OC};
    team_for((size_t)OC, (size_t)N, 16, transpose_rows, &ta);
    bf16_round(wg_x, inp, nx);
    /* The product out (OC,C) = dout^T (OC,N) inp (N,C): the NN form with
     * inp as the weight (K = N rows of M = C). */
    bf16_op op = {.nn = 1,
                  .N = OC,
                  .K = N,
                  .M = C,
                  .x = wg_t,
                  .w = wg_x,
                  .out = dweight,
                  .add = dweight,
                  .add_ld = (size_t)C};
    bf16_matmul(&op, 1, 0);
}

void embedding_forward_k(float *out, const int32_t *tokens, kweight table, int N, int C) {
    if (table.f) {
        embedding_forward(out, tokens, table.f, N, C);
        return;
    }
    for (int i = 0; i < N; i++)
        bf16_widen(out + (size_t)i * C, table.h + (size_t)tokens[i] * C, (size_t)C);
}

/* ---- residual -------------------------------------------------------------- */

static void residual_fwd_range(void *c, size_t r0, size_t r1) {
    const rows_args *a = c;
    for (size_t i = r0; i < r1; i++) a->out[i] = a->inp[i] + a->inp2[i];
}

void residual_forward(float *out, const float *a, const float *b, size_t n) {
    rows_args r = {.out = out, .inp = a, .inp2 = b};
    team_for(n, 3, 64, residual_fwd_range, &r);
}

static void residual_bwd_range(void *c, size_t r0, size_t r1) {
    const rows_args *a = c;
    for (size_t i = r0; i < r1; i++) {
        a->out[i] += a->inp[i];
        a->out2[i] += a->inp[i];
    }
}

void residual_backward(float *da, float *db, const float *dout, size_t n) {
    rows_args r = {.out = da, .out2 = db, .inp = dout};
    team_for(n, 5, 64, residual_bwd_range, &r);
}

/* ---- rotary embeddings -------------------------------------------------------- */

/* Hugging Face's _compute_llama3_parameters: wavelengths shorter than
 * original_max/high_freq_factor keep their frequency, those longer than
 * original_max/low_freq_factor are divided by factor, and the band between
 * blends the two by where the wavelength falls. */
static double rope_llama3(double inv, const model_config *cfg) {
    double factor = cfg->rope_factor, low = cfg->rope_low_freq_factor;
    double high = cfg->rope_high_freq_factor, old = cfg->rope_original_max_position_embeddings;
    double wavelen = 2.0 * M_PI / inv;
    if (wavelen < old / high) return inv;
    if (wavelen > old / low) return inv / factor;
    if (high == low) return inv; /* empty band: only reachable at its edge */
    double smooth = (old / wavelen - low) / (high - low);
    return (1.0 - smooth) * inv / factor + smooth * inv;
}

void rope_init(float *cos_t, float *sin_t, int n_pos, const model_config *cfg) {
    // cos_t, sin_t are (n_pos, D/2)
    int D = cfg->head_dim, half = D / 2;
    for (int i = 0; i < half; i++) {
        double inv = pow((double)cfg->rope_theta, -2.0 * i / D);
        if (cfg->rope_scaling == ROPE_LINEAR && cfg->rope_factor > 0) inv /= cfg->rope_factor;
        if (cfg->rope_scaling == ROPE_LLAMA3) inv = rope_llama3(inv, cfg);
        for (int pos = 0; pos < n_pos; pos++) {
            double a = pos * inv;
            cos_t[(size_t)pos * half + i] = (float)cos(a);
            sin_t[(size_t)pos * half + i] = (float)sin(a);
        }
    }
}

/* The rotations, over rows (b, t) of H heads each. mode 0 rotates out =
 * R inp (out may be inp), 1 adds the inverse rotation (out += R^T inp, out
 * not inp), 2 writes it (out = R^T inp, out may be inp). */
typedef struct rope_args {
    float *out;
    const float *inp, *cos_t, *sin_t;
    int T, H, D, pos0, mode;
} rope_args;

/* One head's rotation (see rope_args) in VB blocks; x and y are distinct. */
ROW_LOOP static void rope_head(float *restrict y, const float *restrict x, const float *restrict c,
                               const float *restrict s, int half, int mode) {
    const float *x2 = x + half;
    float *y2 = y + half;
    int i = 0;
    if (mode == 0) {
        for (; i + VB <= half; i += VB)
            for (int k = 0; k < VB; k++) {
                y[i + k] = x[i + k] * c[i + k] - x2[i + k] * s[i + k];
                y2[i + k] = x2[i + k] * c[i + k] + x[i + k] * s[i + k];
            }
        for (; i < half; i++) {
            y[i] = x[i] * c[i] - x2[i] * s[i];
            y2[i] = x2[i] * c[i] + x[i] * s[i];
        }
    } else if (mode == 1) {
        for (; i + VB <= half; i += VB)
            for (int k = 0; k < VB; k++) {
                y[i + k] += x[i + k] * c[i + k] + x2[i + k] * s[i + k];
                y2[i + k] += x2[i + k] * c[i + k] - x[i + k] * s[i + k];
            }
        for (; i < half; i++) {
            y[i] += x[i] * c[i] + x2[i] * s[i];
            y2[i] += x2[i] * c[i] - x[i] * s[i];
        }
    } else {
        for (; i + VB <= half; i += VB)
            for (int k = 0; k < VB; k++) {
                y[i + k] = x[i + k] * c[i + k] + x2[i + k] * s[i + k];
                y2[i + k] = x2[i + k] * c[i + k] - x[i + k] * s[i + k];
            }
        for (; i < half; i++) {
            y[i] = x[i] * c[i] + x2[i] * s[i];
            y2[i] = x2[i] * c[i] - x[i] * s[i];
        }
    }
}

/* Heads up to this size are rotated in place through a copy on the stack;
 * larger ones (none in the Llama family) element by element. */
#define ROPE_STACK 512

static void rope_rows(void *c, size_t r0, size_t r1) {
    const rope_args *a = c;
    int half = a->D / 2;
    float tmp[ROPE_STACK];
    for (size_t row = r0; row < r1; row++) {
        int t = (int)(row % (size_t)a->T);
        const float *cs = a->cos_t + (size_t)(a->pos0 + t) * half;
        const float *sn = a->sin_t + (size_t)(a->pos0 + t) * half;
        for (int h = 0; h < a->H; h++) {
            size_t off = (row * a->H + h) * a->D;
            const float *x = a->inp + off;
            float *y = a->out + off;
            if (x == y && a->D <= ROPE_STACK) {
                memcpy(tmp, x, (size_t)a->D * sizeof(float));
                x = tmp;
            }
            if (x != y) {
                rope_head(y, x, cs, sn, half, a->mode);
                continue;
            }
            for (int i = 0; i < half; i++) {
                float x1 = x[i], x2 = x[i + half];
                y[i] = a->mode == 0 ? x1 * cs[i] - x2 * sn[i] : x1 * cs[i] + x2 * sn[i];
                y[i + half] = a->mode == 0 ? x2 * cs[i] + x1 * sn[i] : x2 * cs[i] - x1 * sn[i];
            }
        }
    }
}

static void rope_run(float *out, const float *inp, const float *cos_t, const float *sin_t, int B,
                     int T, int H, int D, int pos0, int mode) {
    rope_args a = {out, inp, cos_t, sin_t, T, H, D, pos0, mode};
    team_for((size_t)B * T, (size_t)H * D * 2, 1, rope_rows, &a);
}

void rope_forward(float *out, const float *inp, const float *cos_t, const float *sin_t, int B,
                  int T, int H, int D, int pos0) {
    // out, inp are (B,T,H,D); cos_t, sin_t are (n_pos, D/2)
    rope_run(out, inp, cos_t, sin_t, B, T, H, D, pos0, 0);
}

void rope_backward(float *dinp, const float *dout, const float *cos_t, const float *sin_t, int B,
                   int T, int H, int D, int pos0) {
    // dinp, dout are (B,T,H,D): the rotation is orthogonal, so its backward
    // is the rotation by the opposite angle.
    rope_run(dinp, dout, cos_t, sin_t, B, T, H, D, pos0, 1);
}

void rope_unrotate(float *out, const float *inp, const float *cos_t, const float *sin_t, int B,
                   int T, int H, int D, int pos0) {
    rope_run(out, inp, cos_t, sin_t, B, T, H, D, pos0, 2);
}

/* ---- attention -------------------------------------------------------------- */

/* The causal part is done in blocks of query rows (or key columns) so that
 * the products skip most of the masked upper triangle. Short sequences use
 * narrower blocks: less masked work, and products small enough that
 * OpenBLAS runs them on one thread instead of paying its fork-join for
 * little work (measured: T=128 is 25% faster at 32 than at 64, T=512 12%
 * slower). */
static int att_block(int T) {
    return T <= 256 ? 32 : 64;
}

/* Softmax over the first n of a row of S entries, zeroing the rest. */
static void softmax_row(float *x, int n, int S) {
    float inv = 1.0f / exp_sum(x, x, max_of(x, n), n);
    for (int j = 0; j < n; j++) x[j] *= inv;
    for (int j = n; j < S; j++) x[j] = 0.0f;
}

/* sum of a[j] b[j] in double (each product is exact there), in VB lanes. */
ROW_LOOP static double dot_row_d(const float *restrict a, const float *restrict b, int n) {
    double acc[VB] = {0};
    int i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++) acc[k] += (double)a[i + k] * (double)b[i + k];
    double s = 0.0;
    for (int k = 0; k < VB; k++) s += acc[k];
    for (; i < n; i++) s += (double)a[i] * (double)b[i];
    return s;
}

/* d = a (d - f) over n entries: the softmax's backward given sum(a d). */
ROW_LOOP static void softmax_bwd_row(float *restrict d, const float *restrict a, float f, int n) {
    int i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++) d[i + k] = a[i + k] * (d[i + k] - f);
    for (; i < n; i++) d[i] = a[i] * (d[i] - f);
}

/* One head's probabilities a (T, S=P+T) of query rows qbh (row stride qs)
 * against the prefix keys kpg (rows pstride apart) and the real keys kbh
 * (row stride ks). */
static void head_probs(float *a, const float *qbh, int qs, const float *kpg, int pstride,
                       const float *kbh, int ks, int T, int P, int D) {
    int S = P + T, blk = att_block(T);
    float scale = 1.0f / sqrtf((float)D);
    if (P)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, P, D, scale, qbh, qs, kpg, pstride,
                    0.0f, a, S);
    for (int r0 = 0; r0 < T; r0 += blk) {
        int r1 = r0 + blk < T ? r0 + blk : T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, r1, D, scale,
                    qbh + (size_t)r0 * qs, qs, kbh, ks, 0.0f, a + (size_t)r0 * S + P, S);
    }
    for (int t = 0; t < T; t++) softmax_row(a + (size_t)t * S, P + t + 1, S);
}

/* Everything the attention tasks read; a task is one head (forward), one
 * kv head of one sequence (backward), or, when prefix gradients are summed
 * over the batch, one kv head of every sequence in batch order. */
typedef struct att_args {
    float *out, *dq, *dk, *dv, *dkp, *dvp;
    const float *dout, *q, *k, *v, *kp, *vp;
    int ps, dps, B, T, P, Hq, Hkv, D;
    int zero; /* the backward writes dq, dk, dv: each task zeroes its share first */
    /* Every head's probabilities (B,Hq,T,P+T), written by the forward
     * (keep) for the backward (probs); NULL: a head's are rebuilt in the
     * thread's scratch. */
    float *keep;
    const float *probs;
} att_args;

static void att_fwd_task(void *c, int task, float *a) {
    const att_args *x = c;
    int T = x->T, P = x->P, D = x->D, S = P + T, group = x->Hq / x->Hkv, blk = att_block(T);
    if (x->keep) a = x->keep + (size_t)task * T * S;
    int qs = x->Hq * D, ks = x->Hkv * D;
    int b = task / x->Hq, h = task % x->Hq, g = h / group;
    size_t qoff = (size_t)b * T * qs + (size_t)h * D;
    size_t koff = (size_t)b * T * ks + (size_t)g * D;
    head_probs(a, x->q + qoff, qs, P ? x->kp + (size_t)g * D : NULL, x->ps, x->k + koff, ks, T, P,
               D);
    float *obh = x->out + qoff;
    if (P)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, D, P, 1.0f, a, S,
                    x->vp + (size_t)g * D, x->ps, 0.0f, obh, qs);
    for (int r0 = 0; r0 < T; r0 += blk) {
        int r1 = r0 + blk < T ? r0 + blk : T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, D, r1, 1.0f,
                    a + (size_t)r0 * S + P, S, x->v + koff, ks, P ? 1.0f : 0.0f,
                    obh + (size_t)r0 * qs, qs);
    }
}

static void att_forward(float *out, float *scratch, float *probs, const float *q, const float *k,
                        const float *v, const float *kp, const float *vp, size_t pstride, int B,
                        int T, int P, int Hq, int Hkv, int D) {
    // out, q are (B,T,Hq,D); k, v are (B,T,Hkv,D); kp, vp are (P, pstride);
    // scratch is (T,P+T): one head's probabilities at a time, unless probs
    // (B,Hq,T,P+T) keeps them all
    att_args x = {.out = out, .keep = probs, .q = q, .k = k, .v = v, .kp = kp, .vp = vp};
    x.ps = (int)pstride;
    x.B = B, x.T = T, x.P = P, x.Hq = Hq, x.Hkv = Hkv, x.D = D;
    team_run(B * Hq, att_fwd_task, &x, probs ? NULL : scratch, probs ? 0 : (size_t)T * (P + T));
}

void attention_forward(float *out, float *scratch, const float *q, const float *k, const float *v,
                       const float *kp, const float *vp, size_t pstride, int B, int T, int P,
                       int Hq, int Hkv, int D) {
    att_forward(out, scratch, NULL, q, k, v, kp, vp, pstride, B, T, P, Hq, Hkv, D);
}

void attention_forward_keep(float *out, float *probs, const float *q, const float *k,
                            const float *v, const float *kp, const float *vp, size_t pstride, int B,
                            int T, int P, int Hq, int Hkv, int D) {
    att_forward(out, NULL, probs, q, k, v, kp, vp, pstride, B, T, P, Hq, Hkv, D);
}

/* Backward of head h of sequence b. */
static void att_bwd_head(const att_args *x, int b, int h, float *scratch) {
    int T = x->T, P = x->P, D = x->D, S = P + T, group = x->Hq / x->Hkv, blk = att_block(T);
    int qs = x->Hq * D, ks = x->Hkv * D, ps = x->ps, dps = x->dps;
    float scale = 1.0f / sqrtf((float)D);
    float *ds = scratch;
    const float *a = x->probs ? x->probs + ((size_t)b * x->Hq + h) * T * S : NULL;
    int g = h / group;
    size_t qoff = (size_t)b * T * qs + (size_t)h * D;
    size_t koff = (size_t)b * T * ks + (size_t)g * D;
    const float *gbh = x->dout + qoff, *qbh = x->q + qoff;
    const float *kbh = x->k + koff, *vbh = x->v + koff;
    const float *kpg = P ? x->kp + (size_t)g * D : NULL, *vpg = P ? x->vp + (size_t)g * D : NULL;
    if (!a) {
        float *rebuilt = scratch + (size_t)T * S;
        head_probs(rebuilt, qbh, qs, kpg, ps, kbh, ks, T, P, D);
        a = rebuilt;
    }
    // d(probabilities) = dout V^T
    if (P)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, P, D, 1.0f, gbh, qs, vpg, ps, 0.0f,
                    ds, S);
    for (int r0 = 0; r0 < T; r0 += blk) {
        int r1 = r0 + blk < T ? r0 + blk : T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, r1, D, 1.0f,
                    gbh + (size_t)r0 * qs, qs, vbh, ks, 0.0f, ds + (size_t)r0 * S + P, S);
    }
    // dV += A^T dout, for the prefix and, by blocks of keys, the real keys
    if (P && x->dvp)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, P, D, T, 1.0f, a, S, gbh, qs, 1.0f,
                    x->dvp + (size_t)g * D, dps);
    for (int c0 = 0; c0 < T; c0 += blk) {
        int c1 = c0 + blk < T ? c0 + blk : T;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c1 - c0, D, T - c0, 1.0f,
                    a + (size_t)c0 * S + P + c0, S, gbh + (size_t)c0 * qs, qs, 1.0f,
                    x->dv + koff + (size_t)c0 * ks, ks);
    }
    // through the softmax: ds = a (da - sum(a da)) on the visible entries
    for (int t = 0; t < T; t++) {
        const float *ar = a + (size_t)t * S;
        float *dr = ds + (size_t)t * S;
        int n = P + t + 1;
        softmax_bwd_row(dr, ar, (float)dot_row_d(ar, dr, n), n);
        for (int j = n; j < S; j++) dr[j] = 0.0f;
    }
    // dq += scale ds K; dK += scale ds^T q
    if (P) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, D, P, scale, ds, S, kpg, ps, 1.0f,
                    x->dq + qoff, qs);
        if (x->dkp)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, P, D, T, scale, ds, S, qbh, qs,
                        1.0f, x->dkp + (size_t)g * D, dps);
    }
    for (int r0 = 0; r0 < T; r0 += blk) {
        int r1 = r0 + blk < T ? r0 + blk : T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, D, r1, scale,
                    ds + (size_t)r0 * S + P, S, kbh, ks, 1.0f, x->dq + qoff + (size_t)r0 * qs, qs);
    }
    for (int c0 = 0; c0 < T; c0 += blk) {
        int c1 = c0 + blk < T ? c0 + blk : T;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c1 - c0, D, T - c0, scale,
                    ds + (size_t)c0 * S + P + c0, S, qbh + (size_t)c0 * qs, qs, 1.0f,
                    x->dk + koff + (size_t)c0 * ks, ks);
    }
}

/* Zeroes what the heads of kv head g of sequence b write: their rows of
 * dq and the kv head's rows of dk and dv. */
static void att_zero(const att_args *x, int b, int g) {
    int T = x->T, D = x->D, group = x->Hq / x->Hkv, qs = x->Hq * D, ks = x->Hkv * D;
    for (int t = 0; t < T; t++) {
        size_t row = (size_t)b * T + t;
        memset(x->dq + row * qs + (size_t)g * group * D, 0, (size_t)group * D * sizeof(float));
        memset(x->dk + row * ks + (size_t)g * D, 0, (size_t)D * sizeof(float));
        memset(x->dv + row * ks + (size_t)g * D, 0, (size_t)D * sizeof(float));
    }
}

/* One kv head g of sequence b: its query heads in order, so dk and dv add
 * up as in a serial loop. */
static void att_bwd_task(void *c, int task, float *scratch) {
    const att_args *x = c;
    int group = x->Hq / x->Hkv, b = task / x->Hkv, g = task % x->Hkv;
    if (x->zero) att_zero(x, b, g);
    for (int h = g * group; h < (g + 1) * group; h++) att_bwd_head(x, b, h, scratch);
}

/* One kv head over the whole batch: the prefix gradients of that head add
 * up over the sequences in batch order. */
static void att_bwd_group_task(void *c, int g, float *scratch) {
    const att_args *x = c;
    int group = x->Hq / x->Hkv;
    for (int b = 0; b < x->B; b++) {
        if (x->zero) att_zero(x, b, g);
        for (int h = g * group; h < (g + 1) * group; h++) att_bwd_head(x, b, h, scratch);
    }
}

static void att_backward(float *dq, float *dk, float *dv, float *dkp, float *dvp, size_t dpstride,
                         float *scratch, const float *probs, const float *dout, const float *q,
                         const float *k, const float *v, const float *kp, const float *vp,
                         size_t pstride, int B, int T, int P, int Hq, int Hkv, int D, int zero) {
    // dq, dout, q are (B,T,Hq,D); dk, dv, k, v are (B,T,Hkv,D); scratch is
    // 2 x (T,P+T): the gradient of one head's scores and, unless probs
    // (B,Hq,T,P+T) kept them from the forward, its probabilities, rebuilt.
    att_args x = {.dq = dq, .dk = dk, .dv = dv, .dkp = dkp, .dvp = dvp, .dout = dout};
    x.q = q, x.k = k, x.v = v, x.kp = kp, x.vp = vp, x.probs = probs;
    x.ps = (int)pstride, x.dps = (int)dpstride;
    x.B = B, x.T = T, x.P = P, x.Hq = Hq, x.Hkv = Hkv, x.D = D, x.zero = zero;
    size_t floats = (probs ? 1 : 2) * (size_t)T * (P + T);
    if (P && (dkp || dvp))
        team_run(Hkv, att_bwd_group_task, &x, scratch, floats);
    else
        team_run(B * Hkv, att_bwd_task, &x, scratch, floats);
}

void attention_backward(float *dq, float *dk, float *dv, float *dkp, float *dvp, size_t dpstride,
                        float *scratch, const float *dout, const float *q, const float *k,
                        const float *v, const float *kp, const float *vp, size_t pstride, int B,
                        int T, int P, int Hq, int Hkv, int D) {
    att_backward(dq, dk, dv, dkp, dvp, dpstride, scratch, NULL, dout, q, k, v, kp, vp, pstride, B,
                 T, P, Hq, Hkv, D, 0);
}

void attention_grad(float *dq, float *dk, float *dv, float *dkp, float *dvp, size_t dpstride,
                    float *scratch, const float *probs, const float *dout, const float *q,
                    const float *k, const float *v, const float *kp, const float *vp,
                    size_t pstride, int B, int T, int P, int Hq, int Hkv, int D) {
    att_backward(dq, dk, dv, dkp, dvp, dpstride, scratch, probs, dout, q, k, v, kp, vp, pstride, B,
                 T, P, Hq, Hkv, D, 1);
}

/* ---- SwiGLU ------------------------------------------------------------------ */

/* The loops of swiglu_forward/backward over n elements, restrict so that
 * GCC vectorises the blocks. */
ROW_LOOP static void swiglu_fwd(float *restrict out, const float *restrict g,
                                const float *restrict u, size_t n) {
    size_t i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++)
            out[i + k] = g[i + k] / (1.0f + exp_fast(-g[i + k])) * u[i + k];
    for (; i < n; i++) out[i] = g[i] / (1.0f + exp_fast(-g[i])) * u[i];
}

/* silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))) */
static inline float silu_grad(float d, float g, float u, float *tu) {
    float sg = 1.0f / (1.0f + exp_fast(-g));
    *tu = d * g * sg;
    return d * u * sg * (1.0f + g * (1.0f - sg));
}

/* Adds the gradients (acc) or writes them: writing gives the bits of
 * adding to zeros, without the pass that zeroes. */
ROW_LOOP static void swiglu_bwd(float *restrict dg, float *restrict du, const float *restrict d,
                                const float *restrict g, const float *restrict u, size_t n,
                                int acc) {
    size_t i = 0;
    float tu;
    if (acc) {
        for (; i + VB <= n; i += VB)
            for (int k = 0; k < VB; k++) {
                dg[i + k] += silu_grad(d[i + k], g[i + k], u[i + k], &tu);
                du[i + k] += tu;
            }
        for (; i < n; i++) {
            dg[i] += silu_grad(d[i], g[i], u[i], &tu);
            du[i] += tu;
        }
    } else {
        for (; i + VB <= n; i += VB)
            for (int k = 0; k < VB; k++) {
                dg[i + k] = silu_grad(d[i + k], g[i + k], u[i + k], &tu);
                du[i + k] = tu;
            }
        for (; i < n; i++) {
            dg[i] = silu_grad(d[i], g[i], u[i], &tu);
            du[i] = tu;
        }
    }
}

typedef struct swiglu_args {
    float *dg, *du, *out;
    const float *d, *g, *u;
    int acc;
} swiglu_args;

static void swiglu_fwd_range(void *c, size_t r0, size_t r1) {
    const swiglu_args *a = c;
    swiglu_fwd(a->out + r0, a->g + r0, a->u + r0, r1 - r0);
}

static void swiglu_bwd_range(void *c, size_t r0, size_t r1) {
    const swiglu_args *a = c;
    swiglu_bwd(a->dg + r0, a->du + r0, a->d + r0, a->g + r0, a->u + r0, r1 - r0, a->acc);
}

void swiglu_forward(float *out, const float *gate, const float *up, int N, int IC) {
    // out, gate, up are (N,IC)
    swiglu_args a = {.out = out, .g = gate, .u = up};
    team_for((size_t)N * IC, 8, 64, swiglu_fwd_range, &a);
}

void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                     const float *up, int N, int IC) {
    // dgate, dup, dout, gate, up are (N,IC)
    swiglu_args a = {.dg = dgate, .du = dup, .d = dout, .g = gate, .u = up, .acc = 1};
    team_for((size_t)N * IC, 12, 64, swiglu_bwd_range, &a);
}

void swiglu_grad(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                 int N, int IC) {
    swiglu_args a = {.dg = dgate, .du = dup, .d = dout, .g = gate, .u = up, .acc = 0};
    team_for((size_t)N * IC, 12, 64, swiglu_bwd_range, &a);
}

/* ---- cross-entropy ------------------------------------------------------------ */

/* The loss is summed in parts of a fixed number of rows, a function of N
 * alone, and the parts in order: the same total whatever the team. */
#define CE_PARTS 256
/* Logits below which the parts run in the caller, not worth a team job. */
#define CE_SERIAL 16384

typedef struct ce_args {
    float *lse, *dlogits;
    const float *logits, *lse_in;
    const int32_t *labels;
    int N, V, per, acc;
    float scale;
    double part[CE_PARTS];
    long count[CE_PARTS];
} ce_args;

/* The loss of one row x (V) against label (not -100): log-sum-exp minus the
 * label's logit, in double; *lse gets the log-sum-exp as a float. */
static double ce_row(float *lse, const float *x, int label, int V) {
    float m = max_of(x, V);
    double l = m + log((double)exp_sum(NULL, x, m, V));
    *lse = (float)l;
    return l - x[label];
}

static void ce_fwd_task(void *c, int task, float *scratch) {
    (void)scratch;
    ce_args *a = c;
    int r0 = task * a->per, r1 = r0 + a->per < a->N ? r0 + a->per : a->N;
    double total = 0.0;
    long n = 0;
    for (int i = r0; i < r1; i++) {
        a->lse[i] = 0.0f;
        if (a->labels[i] == -100) continue;
        total += ce_row(&a->lse[i], a->logits + (size_t)i * a->V, a->labels[i], a->V);
        n++;
    }
    a->part[task] = total;
    a->count[task] = n;
}

/* Rows per part of a sum over N rows, and the number of parts. */
static int ce_parts(int N, int *per) {
    *per = (N + CE_PARTS - 1) / CE_PARTS;
    if (*per < 1) *per = 1;
    return (N + *per - 1) / *per;
}

double crossentropy_forward(float *lse, const float *logits, const int32_t *labels, int N, int V,
                            long *count) {
    // lse is (N), logits is (N,V), labels is (N)
    ce_args a = {.lse = lse, .logits = logits, .labels = labels, .N = N, .V = V};
    int parts = ce_parts(N, &a.per);
    if ((size_t)N * V < CE_SERIAL)
        for (int t = 0; t < parts; t++) ce_fwd_task(&a, t, NULL);
    else
        team_run(parts, ce_fwd_task, &a, NULL, 0);
    double total = 0.0;
    long n = 0;
    for (int t = 0; t < parts; t++) {
        total += a.part[t];
        n += a.count[t];
    }
    *count = n;
    return total;
}

typedef struct ce_rows_args {
    float *lse;
    double *loss;
    const float *logits;
    const int32_t *labels;
    int V;
} ce_rows_args;

static void ce_rows_range(void *c, size_t r0, size_t r1) {
    const ce_rows_args *a = c;
    for (size_t i = r0; i < r1; i++) {
        a->lse[i] = 0.0f;
        a->loss[i] = 0.0;
        if (a->labels[i] != -100)
            a->loss[i] = ce_row(&a->lse[i], a->logits + i * a->V, a->labels[i], a->V);
    }
}

void crossentropy_rows(float *lse, double *loss, const float *logits, const int32_t *labels, int n,
                       int V) {
    // lse, loss, labels are (n), logits is (n,V)
    ce_rows_args a = {.lse = lse, .loss = loss, .logits = logits, .labels = labels, .V = V};
    if ((size_t)n * V < CE_SERIAL)
        ce_rows_range(&a, 0, (size_t)n);
    else
        team_for((size_t)n, (size_t)V * 2, 1, ce_rows_range, &a);
}

double crossentropy_total(const double *loss, const int32_t *labels, int N, long *count) {
    // loss, labels are (N); the parts of crossentropy_forward, summed the same way
    int per, parts = ce_parts(N, &per);
    double total = 0.0;
    long n = 0;
    for (int t = 0; t < parts; t++) {
        int r1 = (t + 1) * per < N ? (t + 1) * per : N;
        double part = 0.0;
        for (int i = t * per; i < r1; i++)
            if (labels[i] != -100) {
                part += loss[i];
                n++;
            }
        total += part;
    }
    *count = n;
    return total;
}

/* d (V) (+)= scale * softmax of x (V) given its log-sum-exp l. */
ROW_LOOP static void softmax_grad_row(float *restrict d, const float *restrict x, float l,
                                      float scale, int V, int acc) {
    int j = 0;
    if (acc) {
        for (; j + VB <= V; j += VB)
            for (int k = 0; k < VB; k++) d[j + k] += scale * exp_fast(x[j + k] - l);
        for (; j < V; j++) d[j] += scale * exp_fast(x[j] - l);
    } else {
        for (; j + VB <= V; j += VB)
            for (int k = 0; k < VB; k++) d[j + k] = scale * exp_fast(x[j + k] - l);
        for (; j < V; j++) d[j] = scale * exp_fast(x[j] - l);
    }
}

/* x (V) = scale * softmax of x given its log-sum-exp l, in place: the
 * operations of softmax_grad_row's writing form, element by element. */
ROW_LOOP static void softmax_grad_inplace(float *x, float l, float scale, int V) {
    int j = 0;
    for (; j + VB <= V; j += VB)
        for (int k = 0; k < VB; k++) x[j + k] = scale * exp_fast(x[j + k] - l);
    for (; j < V; j++) x[j] = scale * exp_fast(x[j] - l);
}

static void ce_bwd_rows(void *c, size_t r0, size_t r1) {
    const ce_args *a = c;
    for (size_t i = r0; i < r1; i++) {
        float *d = a->dlogits + i * a->V;
        const float *x = a->logits + i * a->V;
        if (a->labels[i] == -100) {
            if (!a->acc) memset(d, 0, (size_t)a->V * sizeof(float));
            continue;
        }
        if (d == x)
            softmax_grad_inplace(d, a->lse_in[i], a->scale, a->V);
        else
            softmax_grad_row(d, x, a->lse_in[i], a->scale, a->V, a->acc);
        d[a->labels[i]] -= a->scale;
    }
}

static void ce_backward(float *dlogits, const float *logits, const float *lse,
                        const int32_t *labels, int N, int V, float scale, int acc) {
    ce_args a = {.lse_in = lse,
                 .dlogits = dlogits,
                 .logits = logits,
                 .labels = labels,
                 .N = N,
                 .V = V,
                 .acc = acc,
                 .scale = scale};
    team_for((size_t)N, (size_t)V * 3, 1, ce_bwd_rows, &a);
}

void crossentropy_backward(float *dlogits, const float *logits, const float *lse,
                           const int32_t *labels, int N, int V, float scale) {
    // dlogits, logits are (N,V), lse, labels are (N)
    ce_backward(dlogits, logits, lse, labels, N, V, scale, 1);
}

void crossentropy_grad(float *dlogits, const float *logits, const float *lse, const int32_t *labels,
                       int N, int V, float scale) {
    ce_backward(dlogits, logits, lse, labels, N, V, scale, 0);
}
