/* Tests of common/base/rng.c and common/train/optim.c: the random streams against the
 * published xoshiro256** and splitmix64 definitions and basic statistics;
 * AdamW, clipping and the schedule against a PyTorch run written by
 * tests/reference/make_optim_fixture.py (tests/fixtures/reference/optim_adamw.bin). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/optim.h"
#include "base/rng.h"

#define FIXTURE "tests/fixtures/reference/optim_adamw.bin"

/* ---- rng ----------------------------------------------------------------- */

static void test_rng_xoshiro_reference(void **state) {
    (void)state;
    /* The first outputs of xoshiro256** from state {1,2,3,4}, as given by the
     * reference implementation. */
    rng r = {{1, 2, 3, 4}};
    const uint64_t want[] = {11520ULL, 0ULL, 1509978240ULL, 1215971899390074240ULL};
    for (int i = 0; i < 4; i++) assert_int_equal(rng_u64(&r), want[i]);
}

static void test_rng_seeding_pinned(void **state) {
    (void)state;
    /* rng_seed(42,1,2,3) as documented in rng.h, computed by an independent
     * Python transcription of splitmix64 and xoshiro256**. A change here
     * breaks resuming old runs bit-identically. */
    rng r;
    rng_seed(&r, 42, 1, 2, 3);
    const uint64_t want[] = {0x98f5bfd5a6302686ULL, 0xab6187d789917d08ULL, 0x9c3abf19769be9c7ULL,
                             0x85753c9820c02e3bULL};
    for (int i = 0; i < 4; i++) assert_int_equal(rng_u64(&r), want[i]);
}

static void test_rng_distributions_pinned(void **state) {
    (void)state;
    /* rng_uniform and rng_normal (polar method) of the stream (42,1,2,3),
     * from the same Python transcription, using libm's log: rng_log must
     * not change a single float. */
    const float want_u[] = {0.597499788f, 0.669456899f, 0.610271394f, 0.521320105f};
    const float want_n[] = {0.966533244f,  2.39958596f,  -2.25465178f,  -0.958548546f,
                            -0.262333125f, 0.305306405f, -0.940489709f, -1.83532226f};
    rng r;
    rng_seed(&r, 42, 1, 2, 3);
    for (int i = 0; i < 4; i++) assert_true(rng_uniform(&r) == want_u[i]);
    rng_seed(&r, 42, 1, 2, 3);
    for (int i = 0; i < 8; i++) assert_true(rng_normal(&r) == want_n[i]);
}

static void test_rng_deterministic(void **state) {
    (void)state;
    rng a, b;
    rng_seed(&a, 7, 100, 3, 9);
    rng_seed(&b, 7, 100, 3, 9);
    for (int i = 0; i < 1000; i++) {
        assert_int_equal(rng_u64(&a), rng_u64(&b));
        float x = rng_normal(&a), y = rng_normal(&b);
        assert_memory_equal(&x, &y, sizeof x);
    }
}

/* Pearson correlation of the uniforms of two streams. */
static double stream_corr(rng *a, rng *b, int n) {
    double sa = 0, sb = 0, saa = 0, sbb = 0, sab = 0;
    for (int i = 0; i < n; i++) {
        double x = rng_uniform(a), y = rng_uniform(b);
        sa += x, sb += y, saa += x * x, sbb += y * y, sab += x * y;
    }
    double cov = sab / n - (sa / n) * (sb / n);
    return cov / sqrt((saa / n - (sa / n) * (sa / n)) * (sbb / n - (sb / n) * (sb / n)));
}

static void test_rng_streams_independent(void **state) {
    (void)state;
    /* Neighbouring tuples, each differing from the base in one input, and
     * swapped inputs: none may repeat the base stream or correlate with it. */
    const uint64_t tuples[][4] = {{5, 10, 2, 0}, {6, 10, 2, 0}, {5, 11, 2, 0}, {5, 10, 3, 0},
                                  {5, 10, 2, 1}, {5, 2, 10, 0}, {0, 0, 0, 0},  {0, 0, 0, 1}};
    const int nt = (int)(sizeof tuples / sizeof tuples[0]);
    const int n = 200000;
    for (int i = 0; i < nt; i++)
        for (int j = i + 1; j < nt; j++) {
            rng a, b;
            rng_seed(&a, tuples[i][0], tuples[i][1], tuples[i][2], tuples[i][3]);
            rng_seed(&b, tuples[j][0], tuples[j][1], tuples[j][2], tuples[j][3]);
            int same = 0;
            for (int k = 0; k < 64; k++) same += rng_u64(&a) == rng_u64(&b);
            assert_int_equal(same, 0);
            /* 5 standard errors of a correlation estimate over n pairs. */
            double c = stream_corr(&a, &b, n);
            assert_true(fabs(c) < 5.0 / sqrt((double)n));
        }
}

static void test_rng_uniform_moments(void **state) {
    (void)state;
    rng r;
    rng_seed(&r, 1, 2, 3, 4);
    const int n = 1000000;
    double s = 0, s2 = 0;
    for (int i = 0; i < n; i++) {
        float u = rng_uniform(&r);
        assert_true(u >= 0.0f && u < 1.0f);
        assert_true(u * 16777216.0f == floorf(u * 16777216.0f)); /* 24-bit grid */
        s += u, s2 += (double)u * u;
    }
    double mean = s / n, var = s2 / n - mean * mean;
    /* Standard errors: 0.29/sqrt(n) for the mean, 0.075/sqrt(n) for the
     * variance; 6 of them. */
    assert_true(fabs(mean - 0.5) < 6 * 0.29 / sqrt(n));
    assert_true(fabs(var - 1.0 / 12) < 6 * 0.075 / sqrt(n));
}

static void test_rng_normal_moments(void **state) {
    (void)state;
    rng r;
    rng_seed(&r, 99, 0, 0, 0);
    const int n = 1000000;
    double m1 = 0, m2 = 0, m3 = 0, m4 = 0;
    int tail = 0;
    for (int i = 0; i < n; i++) {
        double z = rng_normal(&r);
        assert_true(isfinite(z));
        m1 += z, m2 += z * z, m3 += z * z * z, m4 += z * z * z * z;
        tail += fabs(z) > 1.959963985;
    }
    m1 /= n, m2 /= n, m3 /= n, m4 /= n;
    printf("normal: mean %.5f var %.5f skew %.5f kurt %.5f tail %.5f\n", m1, m2, m3, m4,
           (double)tail / n);
    /* Standard errors over n draws: 1, sqrt 2, sqrt 15, sqrt 96 over sqrt n;
     * the two-sided 5% tail has sd sqrt(.05*.95/n). Allow 6 of each. */
    const double sn = sqrt((double)n);
    assert_true(fabs(m1) < 6 * 1.0 / sn);
    assert_true(fabs(m2 - 1) < 6 * sqrt(2.0) / sn);
    assert_true(fabs(m3) < 6 * sqrt(15.0) / sn);
    assert_true(fabs(m4 - 3) < 6 * sqrt(96.0) / sn);
    assert_true(fabs((double)tail / n - 0.05) < 6 * sqrt(0.05 * 0.95) / sn);
}

static void test_rng_log(void **state) {
    (void)state;
    /* rng_log must agree with libm's log to a few ulps across the whole
     * range, subnormals and exact powers of two included. */
    assert_true(rng_log(1.0) == 0.0);
    assert_true(fabs(rng_log(2.0) - log(2.0)) <= 1e-16);
    rng r;
    rng_seed(&r, 3, 1, 4, 1);
    double worst = 0;
    for (int i = 0; i < 200000; i++) {
        int ex = (int)(rng_u64(&r) % 2140) - 1070;
        double x = ldexp(0.5 + 0.5 * (double)(rng_u64(&r) >> 11) * 0x1p-53, ex);
        if (i % 1000 == 0) x = ldexp(1.0, ex);
        double want = log(x), got = rng_log(x);
        double ulp = want == 0 ? 0x1p-1074 : nextafter(fabs(want), INFINITY) - fabs(want);
        double d = fabs(got - want) / ulp;
        if (d > worst) worst = d;
    }
    printf("rng_log: worst %.1f ulp from libm log\n", worst);
    assert_true(worst <= 4.0);
}

/* ---- optimizer: the PyTorch replay ---------------------------------------- */

typedef struct fixture {
    unsigned char *buf;
    size_t size, pos;
} fixture;

static void fx_read(fixture *f, void *dst, size_t n) {
    assert_true(f->pos + n <= f->size);
    memcpy(dst, f->buf + f->pos, n); /* the test host is little-endian, checked below */
    f->pos += n;
}

static uint32_t fx_u32(fixture *f) {
    uint32_t x;
    fx_read(f, &x, 4);
    return x;
}

static float fx_f32(fixture *f) {
    float x;
    fx_read(f, &x, 4);
    return x;
}

static double fx_f64(fixture *f) {
    double x;
    fx_read(f, &x, 8);
    return x;
}

static void fx_load(fixture *f) {
    const uint32_t one = 1;
    assert_int_equal(*(const unsigned char *)&one, 1); /* fixture is little-endian */
    FILE *fp = fopen(FIXTURE, "rb");
    if (!fp) fail_msg("cannot open %s (run the tests from the repository root)", FIXTURE);
    fseek(fp, 0, SEEK_END);
    f->size = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    f->buf = malloc(f->size);
    assert_non_null(f->buf);
    assert_int_equal(fread(f->buf, 1, f->size, fp), f->size);
    fclose(fp);
    f->pos = 0;
}

/* Replays the fixture. With use_torch_norm the clipping factor comes from
 * the norm torch reported, isolating AdamW and the factor from the norm's
 * summation order; then every step must equal torch's bits. Otherwise the
 * whole pipeline runs on our own (double, index-order) norm and each step
 * must agree to 1e-6 relative. */
static void replay(int use_torch_norm) {
    fixture f;
    fx_load(&f);
    char magic[8];
    fx_read(&f, magic, 8);
    assert_memory_equal(magic, "PFOPTIM1", 8);
    uint32_t n_tensors = fx_u32(&f), steps = fx_u32(&f);
    Peftps__Schedule sched = PEFTPS__SCHEDULE__INIT;
    sched.warmup_steps = fx_u32(&f);
    sched.total_steps = fx_u32(&f);
    sched.decay = (Peftps__Decay)fx_u32(&f);
    Peftps__Optimizer cfg = PEFTPS__OPTIMIZER__INIT;
    cfg.lr = fx_f32(&f);
    cfg.beta1 = fx_f32(&f);
    cfg.beta2 = fx_f32(&f);
    cfg.eps = fx_f32(&f);
    cfg.weight_decay = fx_f32(&f);
    cfg.max_grad_norm = fx_f32(&f);
    sched.min_lr = fx_f32(&f);
    assert_true(cfg.weight_decay > 0);
    assert_int_equal(sched.decay, PEFTPS__DECAY__COSINE);
    assert_true(sched.total_steps < steps); /* the schedule's end is replayed too */
    size_t n = 0;
    for (uint32_t i = 0; i < n_tensors; i++) n += fx_u32(&f);

    float *params = malloc(n * sizeof(float)), *grads = malloc(n * sizeof(float));
    float *want = malloc(n * sizeof(float));
    assert_true(params && grads && want);
    fx_read(&f, params, n * sizeof(float));

    optim o;
    err e = {{0}};
    assert_int_equal(optim_create(&o, n, &cfg, &e), 0);
    int clipped = 0, unclipped = 0;
    /* Tolerance: each element within 1e-6 of the reference, relative to
     * max(|reference|, 1e-2): parameters are of order 1 and updates of order
     * lr = 1e-2, so the floor never hides a wrong update. */
    const double tol = use_torch_norm ? 0.0 : 1e-6;
    printf("%s norm\nstep        lr         norm   max rel diff\n",
           use_torch_norm ? "torch's" : "our own");
    for (uint32_t s = 0; s < steps; s++) {
        fx_read(&f, grads, n * sizeof(float));
        double want_lr = fx_f64(&f), want_norm = fx_f64(&f);
        fx_read(&f, want, n * sizeof(float));

        double lr = optim_lr(&cfg, &sched, s);
        assert_true(fabs(lr - want_lr) <= 1e-12 * cfg.lr);
        double norm;
        if (use_torch_norm) {
            norm = want_norm;
            const float c = optim_clip_coef(norm, cfg.max_grad_norm);
            for (size_t i = 0; i < n; i++) grads[i] *= c;
        } else {
            norm = optim_clip(grads, n, cfg.max_grad_norm);
            /* torch sums in float32, we in double: equal to float precision. */
            assert_true(fabs(norm - want_norm) <= 1e-6 * want_norm);
        }
        if (norm > cfg.max_grad_norm)
            clipped++;
        else
            unclipped++;
        optim_step(&o, params, grads, lr);
        double worst = 0;
        for (size_t i = 0; i < n; i++) {
            double d = fabs((double)params[i] - want[i]) / fmax(fabs(want[i]), 1e-2);
            if (d > worst) worst = d;
        }
        printf("%4u %.4e %12.6f   %.3e\n", s, lr, norm, worst);
        assert_true(worst <= tol);
    }
    assert_int_equal(f.pos, f.size);
    /* The fixture must exercise both sides of clipping. */
    assert_true(clipped > 0 && unclipped > 0);
    assert_int_equal(o.t, steps);
    optim_free(&o);
    free(params), free(grads), free(want), free(f.buf);
}

static void test_optim_matches_torch(void **state) {
    (void)state;
    replay(0);
}

/* Exact only because the fixture was made by torch's AVX2 kernels, which
 * fuse the moment updates as optim_step's fmaf does; a fixture regenerated
 * on a CPU without FMA would differ in the last bit (then only the 1e-6
 * replay above applies). */
static void test_optim_bits_equal_torch(void **state) {
    (void)state;
    replay(1);
}

/* The same replay with the vector update turned off (PEFTPS_CPU_DISABLE=avx2):
 * the scalar loop, which a CPU without AVX2 and FMA runs, gives torch's bits
 * too. */
static void test_optim_bits_equal_torch_scalar(void **state) {
    (void)state;
    setenv("PEFTPS_CPU_DISABLE", "avx2", 1);
    replay(1);
    unsetenv("PEFTPS_CPU_DISABLE");
}

/* ---- optimizer: unit checks ----------------------------------------------- */

static Peftps__Optimizer adamw_cfg(float lr, float wd) {
    Peftps__Optimizer c = PEFTPS__OPTIMIZER__INIT;
    c.lr = lr, c.beta1 = 0.9f, c.beta2 = 0.999f, c.eps = 1e-8f, c.weight_decay = wd;
    return c;
}

static void test_clip(void **state) {
    (void)state;
    float g[4] = {3, 0, -4, 0};
    /* Off: max_norm 0 measures only. */
    assert_true(fabs(optim_clip(g, 4, 0.0f) - 5.0) < 1e-12);
    assert_true(g[0] == 3 && g[2] == -4);
    /* Below the limit: untouched. */
    assert_true(fabs(optim_clip(g, 4, 10.0f) - 5.0) < 1e-12);
    assert_true(g[0] == 3 && g[2] == -4);
    /* Above: scaled by max_norm/(norm+1e-6), as clip_grad_norm_. */
    assert_true(fabs(optim_clip(g, 4, 1.0f) - 5.0) < 1e-12);
    const float c = 1.0f / (5.0f + 1e-6f);
    assert_true(fabs(c - 0.2) < 1e-7);
    assert_true(g[0] == 3 * c && g[2] == -4 * c && g[1] == 0);
    assert_true(fabs(optim_grad_norm(g, 4) - 1.0) < 1e-6);
    assert_true(optim_clip_coef(5.0, 0.0f) == 1.0f);
    assert_true(optim_clip_coef(0.5, 1.0f) == 1.0f);
    assert_true(optim_clip_coef(4.0, 2.0f) == 2.0f / (4.0f + 1e-6f));
    assert_true(fabs(optim_grad_sumsq(g, 4) - 1.0) < 1e-6);
}

static void test_bias_correction_first_step(void **state) {
    (void)state;
    /* At t=1 the corrected update is lr * g/(|g| + eps*sqrt(1-b2)/...):
     * practically lr * sign(g), whatever the size of g; weight decay first
     * scales p by 1 - lr*wd. */
    const float lr = 0.01f, wd = 0.1f;
    Peftps__Optimizer cfg = adamw_cfg(lr, wd);
    float p[4] = {1.0f, -2.0f, 0.5f, 3.0f};
    const float g[4] = {1e-3f, -50.0f, 2.0f, -1e-2f};
    const float p0[4] = {1.0f, -2.0f, 0.5f, 3.0f};
    optim o;
    err e = {{0}};
    assert_int_equal(optim_create(&o, 4, &cfg, &e), 0);
    optim_step(&o, p, g, lr);
    assert_int_equal(o.t, 1);
    for (int i = 0; i < 4; i++) {
        double want = p0[i] * (1.0 - (double)lr * wd) - lr * (g[i] > 0 ? 1.0 : -1.0);
        assert_true(fabs(p[i] - want) < 2e-6);
        assert_true(fabs(o.m[i] - 0.1 * g[i]) <= 1e-6 * fabs(g[i]));
        assert_true(fabs(o.v[i] - 0.001 * g[i] * g[i]) <= 1e-6 * g[i] * g[i]);
    }
    /* Zero learning rate: nothing moves, but the moments still count. */
    float q[4];
    memcpy(q, p, sizeof q);
    optim_step(&o, p, g, 0.0);
    assert_memory_equal(p, q, sizeof q);
    assert_int_equal(o.t, 2);
    optim_free(&o);
}

static void test_schedule_end_points(void **state) {
    (void)state;
    Peftps__Optimizer cfg = adamw_cfg(1e-3f, 0);
    const double lr = cfg.lr;
    Peftps__Schedule s = PEFTPS__SCHEDULE__INIT;
    s.warmup_steps = 10, s.total_steps = 110, s.min_lr = 1e-4f;
    const double min_lr = s.min_lr;

    assert_true(optim_lr(&cfg, NULL, 12345) == lr);
    for (int d = PEFTPS__DECAY__CONSTANT; d <= PEFTPS__DECAY__COSINE; d++) {
        s.decay = (Peftps__Decay)d;
        /* Steps counted from 0: the first warmup step already trains at
         * lr/warmup (a one-step run changes something), the last warmup step
         * and the first after it run at the full rate. */
        assert_true(optim_lr(&cfg, &s, 0) == lr / 10);
        assert_true(optim_lr(&cfg, &s, 0) > 0);
        assert_true(fabs(optim_lr(&cfg, &s, 4) - lr / 2) < 1e-18);
        assert_true(fabs(optim_lr(&cfg, &s, 9) - lr) < 1e-18);
        assert_true(fabs(optim_lr(&cfg, &s, 10) - lr) < 1e-18);
        double end = d == PEFTPS__DECAY__CONSTANT ? lr : min_lr;
        assert_true(fabs(optim_lr(&cfg, &s, 110) - end) < 1e-18);
        assert_true(fabs(optim_lr(&cfg, &s, 1000000) - end) < 1e-18);
        /* Halfway through the decay both LINEAR and COSINE are at the middle. */
        double mid = d == PEFTPS__DECAY__CONSTANT ? lr : (lr + min_lr) / 2;
        assert_true(fabs(optim_lr(&cfg, &s, 60) - mid) < 1e-15);
    }
    s.decay = PEFTPS__DECAY__LINEAR;
    assert_true(fabs(optim_lr(&cfg, &s, 35) - (min_lr + (lr - min_lr) * 0.75)) < 1e-15);
    /* The cosine, computed without libm, against libm over the whole decay. */
    s.decay = PEFTPS__DECAY__COSINE;
    for (uint64_t k = 10; k <= 110; k++) {
        double p = (double)(k - 10) / 100.0;
        double want = min_lr + (lr - min_lr) * 0.5 * (1.0 + cos(M_PI * p));
        assert_true(fabs(optim_lr(&cfg, &s, k) - want) <= 1e-15 * lr);
    }
    /* No warmup: the first step trains at full rate. */
    s.warmup_steps = 0;
    assert_true(optim_lr(&cfg, &s, 0) == lr);
    /* total_steps not beyond warmup: the decay takes one step, as in HF. */
    s.warmup_steps = 10, s.total_steps = 5;
    assert_true(optim_lr(&cfg, &s, 10) == lr);
    assert_true(optim_lr(&cfg, &s, 11) == min_lr);
}

static void fill(float *x, size_t n, uint64_t stream, float scale) {
    rng r;
    rng_seed(&r, 1234, stream, 0, 0);
    for (size_t i = 0; i < n; i++) x[i] = scale * rng_normal(&r);
}

static void test_determinism_and_restore(void **state) {
    (void)state;
    enum { N = 1000, STEPS = 30, SAVE = 12 };
    Peftps__Optimizer cfg = adamw_cfg(3e-3f, 0.05f);
    static float pa[N], pb[N], g[N], saved_m[N], saved_v[N], saved_p[N];
    fill(pa, N, 0, 1.0f);
    memcpy(pb, pa, sizeof pa);
    optim a, b;
    err e = {{0}};
    assert_int_equal(optim_create(&a, N, &cfg, &e), 0);
    assert_int_equal(optim_create(&b, N, &cfg, &e), 0);
    uint64_t saved_t = 0;
    for (int s = 0; s < STEPS; s++) {
        fill(g, N, (uint64_t)s + 1, 0.1f);
        optim_clip(g, N, 1.0f);
        optim_step(&a, pa, g, 3e-3);
        optim_step(&b, pb, g, 3e-3);
        if (s + 1 == SAVE) {
            const float *m, *v;
            optim_state(&a, &saved_t, &m, &v);
            memcpy(saved_m, m, sizeof saved_m);
            memcpy(saved_v, v, sizeof saved_v);
            memcpy(saved_p, pa, sizeof saved_p);
        }
    }
    /* Same inputs, same bits. */
    assert_memory_equal(pa, pb, sizeof pa);
    assert_memory_equal(a.m, b.m, N * sizeof(float));
    assert_memory_equal(a.v, b.v, N * sizeof(float));
    assert_int_equal(saved_t, SAVE);

    /* Resuming from the saved state reproduces the uninterrupted run. */
    optim c;
    assert_int_equal(optim_create(&c, N, &cfg, &e), 0);
    assert_int_equal(optim_restore(&c, saved_t, saved_m, saved_v, N, &e), 0);
    for (int s = SAVE; s < STEPS; s++) {
        fill(g, N, (uint64_t)s + 1, 0.1f);
        optim_clip(g, N, 1.0f);
        optim_step(&c, saved_p, g, 3e-3);
    }
    assert_memory_equal(saved_p, pa, sizeof pa);
    assert_int_equal(c.t, STEPS);

    /* A state of another size is refused and changes nothing. */
    assert_int_equal(optim_restore(&c, 3, saved_m, saved_v, N - 1, &e), -1);
    assert_non_null(strstr(e.msg, "999"));
    assert_int_equal(c.t, STEPS);
    optim_free(&a), optim_free(&b), optim_free(&c);
}

/* The vector update (8 elements at a time) against the scalar loop, bit for
 * bit, over 40 steps on values that reach the corners: zero, subnormal and
 * huge gradients, zero and negative parameters, a length that leaves a
 * tail of 5, and weight decay on. */
static void test_vector_update_same_bits(void **state) {
    (void)state;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        printf("this CPU has no AVX2 and FMA: only the scalar update runs here\n");
        skip();
    }
#else
    skip();
#endif
    enum { N = 8 * 125 + 5, STEPS = 40 };
    Peftps__Optimizer cfg = adamw_cfg(1e-2f, 0.1f);
    static float pv[N], ps[N], g[N];
    fill(pv, N, 7, 1.0f);
    pv[0] = 0, pv[1] = -0.0f, pv[2] = 1e30f, pv[3] = -1e-40f;
    memcpy(ps, pv, sizeof pv);
    optim a, b;
    err e = {{0}};
    assert_int_equal(optim_create(&a, N, &cfg, &e), 0);
    assert_int_equal(optim_create(&b, N, &cfg, &e), 0);
    for (int s = 0; s < STEPS; s++) {
        fill(g, N, (uint64_t)s + 100, 0.1f);
        g[4] = 0, g[5] = 1e-41f, g[6] = -3e-39f, g[7] = 1e18f, g[N - 1] = -2e-38f;
        if (s % 3 == 0) g[8] = 0, g[9] = 0;
        unsetenv("PEFTPS_CPU_DISABLE");
        optim_step(&a, pv, g, 1e-2);
        setenv("PEFTPS_CPU_DISABLE", "avx2", 1);
        optim_step(&b, ps, g, 1e-2);
        unsetenv("PEFTPS_CPU_DISABLE");
        assert_memory_equal(pv, ps, sizeof pv);
        assert_memory_equal(a.m, b.m, N * sizeof(float));
        assert_memory_equal(a.v, b.v, N * sizeof(float));
    }
    optim_free(&a), optim_free(&b);
}

static void test_create_errors(void **state) {
    (void)state;
    optim o;
    err e = {{0}};
    Peftps__Optimizer cfg = adamw_cfg(1e-3f, 0);
    assert_int_equal(optim_create(&o, 0, &cfg, &e), -1);
    assert_non_null(strstr(e.msg, "no parameters"));
    cfg.beta1 = 1.0f;
    assert_int_equal(optim_create(&o, 4, &cfg, &e), -1);
    assert_non_null(strstr(e.msg, "beta1"));
    cfg = adamw_cfg(1e-3f, 0);
    cfg.beta2 = NAN;
    assert_int_equal(optim_create(&o, 4, &cfg, &e), -1);
    assert_non_null(strstr(e.msg, "beta2"));
    cfg = adamw_cfg(1e-3f, 0);
    cfg.eps = -1e-8f;
    assert_int_equal(optim_create(&o, 4, &cfg, &e), -1);
    assert_non_null(strstr(e.msg, "eps"));
    cfg = adamw_cfg(1e-3f, -0.1f);
    assert_int_equal(optim_create(&o, 4, &cfg, &e), -1);
    assert_non_null(strstr(e.msg, "weight_decay"));
    optim_free(&o); /* safe after a failed create */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rng_xoshiro_reference),
        cmocka_unit_test(test_rng_seeding_pinned),
        cmocka_unit_test(test_rng_distributions_pinned),
        cmocka_unit_test(test_rng_deterministic),
        cmocka_unit_test(test_rng_streams_independent),
        cmocka_unit_test(test_rng_uniform_moments),
        cmocka_unit_test(test_rng_normal_moments),
        cmocka_unit_test(test_rng_log),
        cmocka_unit_test(test_optim_matches_torch),
        cmocka_unit_test(test_optim_bits_equal_torch),
        cmocka_unit_test(test_optim_bits_equal_torch_scalar),
        cmocka_unit_test(test_vector_update_same_bits),
        cmocka_unit_test(test_clip),
        cmocka_unit_test(test_bias_correction_first_step),
        cmocka_unit_test(test_schedule_end_points),
        cmocka_unit_test(test_determinism_and_restore),
        cmocka_unit_test(test_create_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
