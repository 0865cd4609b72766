/* Tests of common/model/bf16.c: the BF16 products give the bits of a scalar
 * model of vdpbf16ps (each output element one F32 accumulator taking the
 * pairs in order, odd product first) and stay within a stated bound of a
 * double-precision evaluation of the same BF16-rounded inputs; a row's
 * result does not depend on the other rows of the call (any number of
 * rows, any neighbours) nor on the number of threads (this binary re-runs
 * itself with PEFTPS_THREADS 1 and 3, the team's size being fixed at its
 * first use); rounding is to nearest even; the CPU check obeys
 * PEFTPS_CPU_DISABLE. Skipped, saying so, on a CPU without AVX512-BF16. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/rng.h"
#include "model/bf16.h"
#include "model/kernels.h"
#include "model/safetensors.h"

static float *rnd(size_t n, float scale, uint64_t seed) {
    float *x = malloc(n * sizeof *x);
    assert_non_null(x);
    rng r;
    rng_seed(&r, seed, 7, 8, 9);
    for (size_t i = 0; i < n; i++) x[i] = scale * (2.0f * rng_uniform(&r) - 1.0f);
    return x;
}

static uint16_t *rnd16(size_t n, float scale, uint64_t seed) {
    float *f = rnd(n, scale, seed);
    uint16_t *h = malloc(n * sizeof *h);
    assert_non_null(h);
    for (size_t i = 0; i < n; i++) h[i] = st_f32_to_bf16(f[i]);
    free(f);
    return h;
}

static float bf(uint16_t h) {
    return st_bf16_to_f32(h);
}

/* Weight element (k, j) of the reduction k for output column j. */
static uint16_t w_at(const bf16_op *op, int k, int j) {
    return op->nn ? op->w[(size_t)k * op->M + j] : op->w[(size_t)j * op->K + k];
}

/* The scalar model: pairs in order, the odd product added first, each
 * addition rounded to F32 (the products of two BF16 are exact in F32). */
static float model_elem(const bf16_op *op, int i, int j) {
    float acc = 0.0f;
    for (int k = 0; k < op->K; k += 2) {
        float xo = 0.0f, wo = 0.0f;
        if (k + 1 < op->K) {
            xo = bf(st_f32_to_bf16(op->x[(size_t)i * op->K + k + 1]));
            wo = bf(w_at(op, k + 1, j));
        }
        float xe = bf(st_f32_to_bf16(op->x[(size_t)i * op->K + k])), we = bf(w_at(op, k, j));
        acc = acc + xo * wo;
        acc = acc + xe * we;
    }
    return acc;
}

static double exact_elem(const bf16_op *op, int i, int j, double *mag) {
    double s = 0.0, m = 0.0;
    for (int k = 0; k < op->K; k++) {
        double t = (double)bf(st_f32_to_bf16(op->x[(size_t)i * op->K + k])) * bf(w_at(op, k, j));
        s += t;
        m += fabs(t);
    }
    *mag = m;
    return s;
}

static int skip_without_cpu(void) {
    if (bf16_cpu_ok()) return 0;
    printf("  skipped: this CPU has no AVX512-BF16\n");
    return 1;
}

/* One product of each kind and shape: bits against the scalar model, and
 * the worst error against double relative to sum |x w| of the element. */
static void check_shape(int nn, int N, int K, int M, int with_add, double *worst) {
    float *x = rnd((size_t)N * K, 1.0f, 11u + (unsigned)K);
    uint16_t *w = rnd16((size_t)K * M, 0.1f, 13u + (unsigned)M);
    float *add = with_add ? rnd((size_t)N * M, 1.0f, 17) : NULL;
    float *out = malloc((size_t)N * M * sizeof *out);
    assert_non_null(out);
    bf16_op op = {.nn = nn,
                  .N = N,
                  .K = K,
                  .M = M,
                  .x = x,
                  .w = w,
                  .out = out,
                  .add = add,
                  .add_ld = (size_t)M};
    bf16_matmul(&op, 1, 0);
    long bad = 0;
    for (int i = 0; i < N; i++)
        for (int j = 0; j < M; j++) {
            float want = model_elem(&op, i, j);
            if (add) want = add[(size_t)i * M + j] + want;
            float got = out[(size_t)i * M + j];
            if (memcmp(&got, &want, sizeof got) && bad++ < 3)
                printf("  %s N %d K %d M %d (%d,%d): %.9g, model %.9g\n", nn ? "NN" : "NT", N, K, M,
                       i, j, (double)got, (double)want);
            double mag, ex = exact_elem(&op, i, j, &mag);
            double e = fabs((double)(got - (add ? add[(size_t)i * M + j] : 0.0f)) - ex) / mag;
            if (!add && e > *worst) *worst = e;
        }
    assert_int_equal(bad, 0);
    free(x), free(w), free(add), free(out);
}

static void test_products_exact(void **state) {
    (void)state;
    if (skip_without_cpu()) return;
    double worst = 0.0;
    static const int shapes[][3] = {{1, 2, 1},     {7, 33, 65},   {13, 96, 64},
                                    {6, 768, 130}, {37, 257, 17}, {64, 512, 200}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
        for (int nn = 0; nn < 2; nn++)
            for (int a = 0; a < 2; a++)
                check_shape(nn, shapes[s][0], shapes[s][1], shapes[s][2], a, &worst);
    printf("  worst error against double, relative to sum |x w|: %.3g (K up to 768)\n", worst);
    /* F32 accumulation of K terms: at most about K * 2^-24 relative to
     * sum |x w|; 768 * 6e-8 = 4.6e-5. */
    assert_true(worst < 4.6e-5);
}

/* A row's output is the same bits whatever rows surround it and however
 * many rows the call has: rows of one call against each row alone, and
 * against the row inside another batch at another position. */
static void test_row_independent(void **state) {
    (void)state;
    if (skip_without_cpu()) return;
    int N = 29, K = 200, M = 150;
    float *x = rnd((size_t)N * K, 2.0f, 3);
    float *other = rnd((size_t)N * K, 5.0f, 4);
    uint16_t *w = rnd16((size_t)M * K, 0.2f, 5);
    size_t big = (size_t)N * (K > M ? K : M);
    float *all = malloc(big * sizeof *all), *one = malloc(big * sizeof *one);
    float *mix = malloc(big * sizeof *mix), *mixout = malloc(big * sizeof *mixout);
    assert_true(all && one && mix && mixout);
    for (int nn = 0; nn < 2; nn++) {
        int Kx = nn ? M : K, Mo = nn ? K : M;
        bf16_op op = {.nn = nn, .N = N, .K = Kx, .M = Mo, .x = x, .w = w, .out = all};
        bf16_matmul(&op, 1, 0);
        for (int i = 0; i < N; i++) {
            bf16_op o1 = op;
            o1.N = 1;
            o1.x = x + (size_t)i * Kx;
            o1.out = one;
            bf16_matmul(&o1, 1, 0);
            assert_memory_equal(one, all + (size_t)i * Mo, (size_t)Mo * sizeof *one);
            /* Row i placed at row N-1-i among other rows. */
            memcpy(mix, other, (size_t)N * Kx * sizeof *mix);
            memcpy(mix + (size_t)(N - 1 - i) * Kx, x + (size_t)i * Kx, (size_t)Kx * sizeof *mix);
            bf16_op om = op;
            om.x = mix;
            om.out = mixout;
            bf16_matmul(&om, 1, 0);
            assert_memory_equal(mixout + (size_t)(N - 1 - i) * Mo, all + (size_t)i * Mo,
                                (size_t)Mo * sizeof *one);
        }
    }
    free(x), free(other), free(w), free(all), free(one), free(mix), free(mixout);
}

/* Summed jobs add each op's whole product in order; independent jobs
 * share a rounded input when ops read the same x. */
static void test_jobs(void **state) {
    (void)state;
    if (skip_without_cpu()) return;
    int N = 20, C = 96, O[3] = {64, 32, 80};
    float *x = rnd((size_t)N * C, 1.0f, 21);
    uint16_t *w[3];
    float *outs[3], *dy[3], *single = malloc((size_t)N * 96 * 4);
    for (int k = 0; k < 3; k++) {
        w[k] = rnd16((size_t)O[k] * C, 0.1f, 30u + (unsigned)k);
        outs[k] = malloc((size_t)N * O[k] * sizeof(float));
        dy[k] = rnd((size_t)N * O[k], 1.0f, 40u + (unsigned)k);
    }
    bf16_op ops[3];
    for (int k = 0; k < 3; k++)
        ops[k] = (bf16_op){.N = N, .K = C, .M = O[k], .x = x, .w = w[k], .out = outs[k]};
    bf16_matmul(ops, 3, 0);
    for (int k = 0; k < 3; k++) {
        bf16_op o = ops[k];
        o.out = single;
        bf16_matmul(&o, 1, 0);
        assert_memory_equal(single, outs[k], (size_t)N * O[k] * sizeof(float));
    }
    /* dx = sum_k dy_k w_k, added in order of k. */
    float *dx = malloc((size_t)N * C * 4), *want = malloc((size_t)N * C * 4);
    for (int k = 0; k < 3; k++)
        ops[k] = (bf16_op){.nn = 1, .N = N, .K = O[k], .M = C, .x = dy[k], .w = w[k], .out = dx};
    bf16_matmul(ops, 3, 1);
    for (int k = 0; k < 3; k++) {
        bf16_op o = ops[k];
        o.out = single;
        bf16_matmul(&o, 1, 0);
        for (size_t i = 0; i < (size_t)N * C; i++) want[i] = k ? want[i] + single[i] : single[i];
    }
    assert_memory_equal(dx, want, (size_t)N * C * sizeof(float));
    for (int k = 0; k < 3; k++) free(w[k]), free(outs[k]), free(dy[k]);
    free(x), free(single), free(dx), free(want);
}

/* A digest of a fixed job's outputs (independent and summed products). */
static uint64_t job_digest(void) {
    int N = 45, C = 300, O[2] = {200, 70};
    float *x = rnd((size_t)N * C, 1.0f, 51), *out[2], *dx = malloc((size_t)N * C * 4);
    uint16_t *w[2];
    bf16_op ops[2];
    for (int k = 0; k < 2; k++) {
        w[k] = rnd16((size_t)O[k] * C, 0.1f, 60u + (unsigned)k);
        out[k] = malloc((size_t)N * O[k] * sizeof(float));
        ops[k] = (bf16_op){.N = N, .K = C, .M = O[k], .x = x, .w = w[k], .out = out[k]};
    }
    bf16_matmul(ops, 2, 0);
    for (int k = 0; k < 2; k++)
        ops[k] = (bf16_op){.nn = 1, .N = N, .K = O[k], .M = C, .x = out[k], .w = w[k], .out = dx};
    bf16_matmul(ops, 2, 1);
    uint64_t h = 1469598103934665603u;
    const unsigned char *b = (const unsigned char *)dx;
    for (size_t i = 0; i < (size_t)N * C * 4; i++) h = (h ^ b[i]) * 1099511628211u;
    for (int k = 0; k < 2; k++) free(w[k]), free(out[k]);
    free(x), free(dx);
    return h;
}

static void test_threads(void **state) {
    (void)state;
    if (skip_without_cpu()) return;
    uint64_t mine = job_digest();
    for (int threads = 1; threads <= 3; threads += 2) {
        char cmd[256];
        snprintf(cmd, sizeof cmd, "PEFTPS_THREADS=%d PEFTPS_BF16_DIGEST=1 /proc/%d/exe", threads,
                 (int)getpid());
        FILE *p = popen(cmd, "r");
        unsigned long long theirs = 0;
        assert_non_null(p);
        assert_int_equal(fscanf(p, "%llu", &theirs), 1);
        assert_int_equal(pclose(p), 0);
        printf("  %d thread(s): digest %016llx, here %016llx\n", threads, theirs,
               (unsigned long long)mine);
        assert_true(theirs == mine);
    }
}

/* Full fine-tuning's weight gradient: dW += dy^T x with both rounded to
 * BF16, against double of the same rounded values, added to what dW held. */
static void test_weight_grad(void **state) {
    (void)state;
    if (skip_without_cpu()) return;
    int N = 70, C = 90, OC = 130;
    float *dy = rnd((size_t)N * OC, 1.0f, 91), *x = rnd((size_t)N * C, 1.0f, 92);
    float *dw = rnd((size_t)OC * C, 1.0f, 93), *before = malloc((size_t)OC * C * sizeof *before);
    memcpy(before, dw, (size_t)OC * C * sizeof *dw);
    linear_backward_weight_bf16(dw, dy, x, N, C, OC);
    double worst = 0.0;
    for (int o = 0; o < OC; o++)
        for (int c = 0; c < C; c++) {
            double sum = 0.0, mag = 0.0;
            for (int i = 0; i < N; i++) {
                double t = (double)bf(st_f32_to_bf16(dy[(size_t)i * OC + o])) *
                           bf(st_f32_to_bf16(x[(size_t)i * C + c]));
                sum += t;
                mag += fabs(t);
            }
            double got = (double)dw[(size_t)o * C + c] - before[(size_t)o * C + c];
            double e = fabs(got - sum) / (mag + fabs(before[(size_t)o * C + c]));
            if (e > worst) worst = e;
        }
    printf("  weight gradient: worst error against double %.3g\n", worst);
    assert_true(worst < 1e-5);
    free(dy), free(x), free(dw), free(before);
}

static void test_rounding(void **state) {
    (void)state;
    float in[] = {1.0f,
                  1.00390625f /* tie, even below */,
                  1.01171875f /* tie, even above */,
                  -3.5f,
                  1e-40f,
                  INFINITY,
                  NAN,
                  3.4e38f};
    uint16_t got[8];
    bf16_round(got, in, 8);
    for (int i = 0; i < 8; i++) assert_int_equal(got[i], st_f32_to_bf16(in[i]));
    assert_int_equal(got[1], 0x3F80);
    assert_int_equal(got[2], 0x3F82);
    assert_true(isnan(st_bf16_to_f32(got[6])));
    /* 16 at a time (the vector path) and a tail, specials included. */
    float many[53];
    uint16_t out[53];
    float *r = rnd(53, 100.0f, 77);
    for (int i = 0; i < 53; i++) many[i] = i < 8 ? in[i] : i < 16 ? -in[i - 8] : r[i];
    free(r);
    bf16_round(out, many, 53);
    for (int i = 0; i < 53; i++) assert_int_equal(out[i], st_f32_to_bf16(many[i]));
}

static void test_cpu_disable(void **state) {
    (void)state;
    int real = bf16_cpu_ok();
    setenv("PEFTPS_CPU_DISABLE", "avx2,avx512bf16", 1);
    assert_false(bf16_cpu_ok());
    err e = {{0}};
    assert_int_equal(bf16_cpu_check("compute: BF16", &e), -1);
    assert_non_null(strstr(e.msg, "AVX512-BF16"));
    assert_non_null(strstr(e.msg, "compute: BF16"));
    setenv("PEFTPS_CPU_DISABLE", "avx512bf16x", 1);
    assert_int_equal(bf16_cpu_ok(), real);
    unsetenv("PEFTPS_CPU_DISABLE");
}

int main(void) {
    if (getenv("PEFTPS_BF16_DIGEST")) {
        printf("%llu\n", (unsigned long long)job_digest());
        return 0;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads),        cmocka_unit_test(test_weight_grad),
        cmocka_unit_test(test_products_exact), cmocka_unit_test(test_row_independent),
        cmocka_unit_test(test_jobs),           cmocka_unit_test(test_rounding),
        cmocka_unit_test(test_cpu_disable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
