/* Tests of common/base/team.c and of the parallel paths of kernels.c and
 * model.c: every task runs once, nested and concurrent calls stay correct,
 * the products cut into parts and the row loops agree with direct double
 * formulas at sizes where they are cut, and a training step gives the same
 * bits with 1, 2 or 3 threads (this binary re-runs itself as a child with
 * PEFTPS_THREADS set, since the team's size is fixed at its first use). */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cblas.h>
#include <cmocka.h>

#include "model/kernels.h"
#include "model/model.h"
#include "model/peft.h"
#include "methods/registry.h"
#include "base/rng.h"
#include "base/team.h"

extern char **environ;

static float *rnd(size_t n, float scale, uint64_t seed) {
    float *x = malloc(n * sizeof *x);
    assert_non_null(x);
    rng r;
    rng_seed(&r, seed, 1, 2, 3);
    for (size_t i = 0; i < n; i++) x[i] = scale * (2.0f * rng_uniform(&r) - 1.0f);
    return x;
}

/* ---- the team itself ------------------------------------------------------------ */

/* Tasks run on helper threads, where cmocka's asserts cannot jump: they
 * count what went wrong in `bad`, which the test checks. */
typedef struct count_ctx {
    atomic_int *hits;
    size_t floats;
    atomic_int bad, nested_ok;
} count_ctx;

static void count_task(void *c, int i, float *scratch) {
    count_ctx *x = c;
    atomic_fetch_add(&x->hits[i], 1);
    if (!x->floats) {
        if (scratch) atomic_fetch_add(&x->bad, 1);
        return;
    }
    if (!scratch) {
        atomic_fetch_add(&x->bad, 1);
        return;
    }
    /* The whole scratch is the task's while it runs: writing all of it is
     * safe (the sanitizer build checks the bounds) and nobody else's task
     * overwrites it meanwhile. */
    for (size_t k = 0; k < x->floats; k++) scratch[k] = (float)i;
    for (size_t k = 0; k < x->floats; k++)
        if (scratch[k] != (float)i) {
            atomic_fetch_add(&x->bad, 1);
            break;
        }
}

static void test_every_task_once(void **state) {
    (void)state;
    int size = team_size();
    assert_true(size >= 1 && size <= TEAM_MAX);
    int counts[] = {0, 1, 2, 3, 7, 64, 1000};
    for (size_t c = 0; c < sizeof counts / sizeof *counts; c++)
        for (size_t floats = 0; floats <= 4096; floats += 4096) {
            int n = counts[c];
            count_ctx x = {.hits = calloc((size_t)n + 1, sizeof(atomic_int)), .floats = floats};
            float *mine = floats ? malloc(floats * sizeof(float)) : NULL;
            team_run(n, count_task, &x, mine, floats);
            for (int i = 0; i < n; i++) assert_int_equal(atomic_load(&x.hits[i]), 1);
            assert_int_equal(atomic_load(&x.hits[n]), 0);
            assert_int_equal(atomic_load(&x.bad), 0);
            free(x.hits);
            free(mine);
        }
    printf("  team of %d threads\n", size);
}

/* A task that runs a team job of its own: that one runs serially in the
 * task's thread, and both complete. */
static void nested_task(void *c, int i, float *scratch) {
    count_ctx *x = c;
    atomic_int hits[5] = {0};
    count_ctx inner = {.hits = hits};
    team_run(5, count_task, &inner, NULL, 0);
    int ok = 1;
    for (int k = 0; k < 5; k++) ok &= atomic_load(&hits[k]) == 1;
    if (ok) atomic_fetch_add(&x->nested_ok, 1);
    atomic_fetch_add(&x->hits[i], 1);
}

static void test_nested(void **state) {
    (void)state;
    atomic_int hits[16] = {0};
    count_ctx x = {.hits = hits};
    team_run(16, nested_task, &x, NULL, 0);
    assert_int_equal(atomic_load(&x.nested_ok), 16);
    for (int i = 0; i < 16; i++) assert_int_equal(atomic_load(&hits[i]), 1);
}

/* Two threads issuing jobs at once: one gets the team, the other runs its
 * tasks itself; neither loses or repeats a task. */
static void *caller_main(void *arg) {
    for (int round = 0; round < 200; round++) {
        atomic_int hits[33] = {0};
        count_ctx x = {.hits = hits};
        team_run(33, count_task, &x, NULL, 0);
        for (int i = 0; i < 33; i++)
            if (atomic_load(&hits[i]) != 1 || atomic_load(&x.bad)) return arg;
    }
    return NULL;
}

static void test_concurrent_callers(void **state) {
    (void)state;
    /* OpenBLAS's thread count is process-wide: jobs from two threads must
     * leave it as they found it. */
    int blas = openblas_get_num_threads();
    pthread_t a, b;
    int tag;
    assert_int_equal(pthread_create(&a, NULL, caller_main, &tag), 0);
    assert_int_equal(pthread_create(&b, NULL, caller_main, &tag), 0);
    void *ra, *rb;
    pthread_join(a, &ra);
    pthread_join(b, &rb);
    assert_null(ra);
    assert_null(rb);
    assert_int_equal(openblas_get_num_threads(), blas);
}

/* A child forked after the helpers started has none of them: its jobs still
 * complete (serially) instead of waiting for threads that do not exist. */
static void test_fork(void **state) {
    (void)state;
    atomic_int hits[40] = {0};
    count_ctx x = {.hits = hits};
    team_run(40, count_task, &x, NULL, 0); /* the helpers are running */
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        atomic_int again[40] = {0};
        count_ctx y = {.hits = again};
        team_run(40, count_task, &y, NULL, 0);
        int ok = team_size() == 1;
        for (int i = 0; i < 40; i++) ok &= atomic_load(&again[i]) == 1;
        _exit(ok ? 0 : 1);
    }
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* ---- kernels at sizes where they are cut into parts -------------------------------- */

/* max |got - want| / max |want| over n values. */
static double rel_err(const float *got, const double *want, size_t n) {
    double worst = 0, scale = 0;
    for (size_t i = 0; i < n; i++) {
        worst = fmax(worst, fabs(got[i] - want[i]));
        scale = fmax(scale, fabs(want[i]));
    }
    assert_true(scale > 0);
    return worst / scale;
}

static void test_products(void **state) {
    (void)state;
    /* 2*N*C*OC well above the 8 MFLOP where a product is cut: q, k, v with
     * biases (cut along their 384 columns, and rows), a residual, and the
     * summed input gradient. */
    enum { N = 300, C = 200, O1 = 384, O2 = 72 };
    float *x = rnd((size_t)N * C, 1, 1), *w1 = rnd((size_t)O1 * C, 1, 2);
    float *w2 = rnd((size_t)O2 * C, 1, 3), *b1 = rnd(O1, 1, 4), *res = rnd((size_t)N * O1, 1, 5);
    float *y1 = malloc(sizeof(float) * N * O1), *y2 = malloc(sizeof(float) * N * O2);
    float *y3 = malloc(sizeof(float) * N * O1);
    double *ref = malloc(sizeof(double) * N * O1);
    float *outs[2] = {y1, y2};
    const float *ws[2] = {w1, w2}, *bs[2] = {b1, NULL};
    int ocs[2] = {O1, O2};
    linears_forward(2, outs, x, ws, bs, N, C, ocs);
    for (int pass = 0; pass < 2; pass++) {
        int oc = ocs[pass];
        for (int i = 0; i < N; i++)
            for (int o = 0; o < oc; o++) {
                double s = pass == 0 ? b1[o] : 0;
                for (int k = 0; k < C; k++) s += (double)x[i * C + k] * ws[pass][o * C + k];
                ref[(size_t)i * oc + o] = s;
            }
        double e = rel_err(outs[pass], ref, (size_t)N * oc);
        printf("  linears_forward %d: %.2e\n", pass, e);
        assert_true(e < 1e-5);
    }
    linear_residual_forward(y3, res, x, w1, NULL, N, C, O1);
    for (int i = 0; i < N; i++)
        for (int o = 0; o < O1; o++) {
            double s = res[(size_t)i * O1 + o];
            for (int k = 0; k < C; k++) s += (double)x[i * C + k] * w1[o * C + k];
            ref[(size_t)i * O1 + o] = s;
        }
    assert_true(rel_err(y3, ref, (size_t)N * O1) < 1e-5);
    /* In place: out == res. */
    memcpy(y1, res, sizeof(float) * N * O1);
    linear_residual_forward(y1, y1, x, w1, NULL, N, C, O1);
    assert_memory_equal(y1, y3, sizeof(float) * N * O1);

    /* dinp = d1 w1 + d2 w2, written, then the same added on top. */
    float *d1 = rnd((size_t)N * O1, 1, 6), *d2 = rnd((size_t)N * O2, 1, 7);
    float *dx = malloc(sizeof(float) * N * C);
    const float *ds[2] = {d1, d2};
    for (int i = 0; i < N * C; i++) dx[i] = NAN; /* written, not read */
    linears_backward_input(dx, 0, 2, ds, ws, N, C, ocs);
    for (int i = 0; i < N; i++)
        for (int k = 0; k < C; k++) {
            double s = 0;
            for (int o = 0; o < O1; o++) s += (double)d1[(size_t)i * O1 + o] * w1[o * C + k];
            for (int o = 0; o < O2; o++) s += (double)d2[(size_t)i * O2 + o] * w2[o * C + k];
            ref[(size_t)i * C + k] = s;
        }
    double e = rel_err(dx, ref, (size_t)N * C);
    printf("  linears_backward_input: %.2e\n", e);
    assert_true(e < 1e-5);
    linears_backward_input(dx, 1, 2, ds, ws, N, C, ocs);
    for (size_t i = 0; i < (size_t)N * C; i++) ref[i] *= 2;
    assert_true(rel_err(dx, ref, (size_t)N * C) < 1e-5);

    /* The weight gradient through linear_backward (cut along its rows). */
    float *dw = calloc((size_t)O1 * C, sizeof(float));
    linear_backward(NULL, dw, NULL, d1, x, w1, N, C, O1);
    for (int o = 0; o < O1; o++)
        for (int k = 0; k < C; k++) {
            double s = 0;
            for (int i = 0; i < N; i++) s += (double)d1[(size_t)i * O1 + o] * x[i * C + k];
            ref[(size_t)o * C + k] = s;
        }
    assert_true(rel_err(dw, ref, (size_t)O1 * C) < 1e-5);
    free(x), free(w1), free(w2), free(b1), free(res), free(y1), free(y2), free(y3), free(ref);
    free(d1), free(d2), free(dx), free(dw);
}

static void test_row_loops(void **state) {
    (void)state;
    /* Enough rows that the loops are split over the team. */
    enum { N = 600, C = 96, V = 700 };
    size_t n = (size_t)N * C;
    float *x = rnd(n, 2, 8), *w = rnd(C, 1, 9), *y = malloc(n * sizeof(float));
    float *rstd = malloc(N * sizeof(float)), *xh = malloc(n * sizeof(float));
    float *y2 = malloc(n * sizeof(float));
    double *ref = malloc(n * sizeof(double));
    rmsnorm_forward(y, rstd, x, w, N, C, 1e-5f);
    for (int i = 0; i < N; i++) {
        double ss = 0;
        for (int k = 0; k < C; k++) ss += (double)x[i * C + k] * x[i * C + k];
        double r = 1 / sqrt(ss / C + 1e-5);
        for (int k = 0; k < C; k++) ref[(size_t)i * C + k] = x[i * C + k] * r * w[k];
    }
    assert_true(rel_err(y, ref, n) < 1e-6);
    /* The rebuilt output has the forward's bits. */
    rmsnorm_rebuild(xh, y2, x, rstd, w, N, C);
    assert_memory_equal(y2, y, n * sizeof(float));

    /* SwiGLU's written gradients equal accumulated ones on zeros. */
    float *g = rnd(n, 3, 10), *u = rnd(n, 1, 11), *d = rnd(n, 1, 12);
    float *dg = calloc(n, sizeof(float)), *du = calloc(n, sizeof(float));
    float *dg2 = malloc(n * sizeof(float)), *du2 = malloc(n * sizeof(float));
    swiglu_backward(dg, du, d, g, u, N, C);
    swiglu_grad(dg2, du2, d, g, u, N, C);
    assert_memory_equal(dg, dg2, n * sizeof(float));
    assert_memory_equal(du, du2, n * sizeof(float));

    /* Cross-entropy over many rows against double, and its written gradient. */
    float *logits = rnd((size_t)N * V, 4, 13), *lse = malloc(N * sizeof(float));
    int32_t *labels = malloc(N * sizeof(int32_t));
    for (int i = 0; i < N; i++) labels[i] = i % 7 == 3 ? -100 : (i * 31) % V;
    long count;
    double loss = crossentropy_forward(lse, logits, labels, N, V, &count), want = 0;
    long want_count = 0;
    for (int i = 0; i < N; i++) {
        if (labels[i] == -100) continue;
        double mx = -INFINITY, s = 0;
        for (int j = 0; j < V; j++) mx = fmax(mx, logits[(size_t)i * V + j]);
        for (int j = 0; j < V; j++) s += exp(logits[(size_t)i * V + j] - mx);
        want += mx + log(s) - logits[(size_t)i * V + labels[i]];
        want_count++;
    }
    assert_int_equal(count, want_count);
    assert_true(fabs(loss - want) < 1e-6 * fabs(want));
    float *dl = calloc((size_t)N * V, sizeof(float)), *dl2 = malloc((size_t)N * V * sizeof(float));
    for (size_t i = 0; i < (size_t)N * V; i++) dl2[i] = NAN;
    crossentropy_backward(dl, logits, lse, labels, N, V, 0.5f);
    crossentropy_grad(dl2, logits, lse, labels, N, V, 0.5f);
    assert_memory_equal(dl, dl2, (size_t)N * V * sizeof(float));

    /* The written inverse rotation equals rope_backward into zeros. */
    enum { B = 3, T = 40, H = 5, D = 32 };
    size_t nr = (size_t)B * T * H * D;
    float *cs = malloc(sizeof(float) * T * D / 2), *sn = malloc(sizeof(float) * T * D / 2);
    model_config cfg = {.head_dim = D, .rope_theta = 10000.0f};
    rope_init(cs, sn, T, &cfg);
    float *gr = rnd(nr, 1, 14), *acc = calloc(nr, sizeof(float)), *inplace = malloc(nr * 4);
    memcpy(inplace, gr, nr * sizeof(float));
    rope_backward(acc, gr, cs, sn, B, T, H, D, 0);
    rope_unrotate(inplace, inplace, cs, sn, B, T, H, D, 0);
    assert_memory_equal(acc, inplace, nr * sizeof(float));
    free(x), free(w), free(y), free(rstd), free(xh), free(y2), free(ref), free(g), free(u), free(d);
    free(dg), free(du), free(dg2), free(du2), free(logits), free(lse), free(labels), free(dl);
    free(dl2), free(cs), free(sn), free(gr), free(acc), free(inplace);
}

/* The kept probabilities give the bits of the rebuilt ones, and the
 * written gradients those of gradients added to zeros; with a prefix whose
 * gradients add up over the batch, and without. */
static void test_attention_keep(void **state) {
    (void)state;
    enum { B = 3, T = 70, Hq = 6, Hkv = 2, D = 16, P = 4 };
    size_t nq = (size_t)B * T * Hq * D, nk = (size_t)B * T * Hkv * D, kvd = (size_t)Hkv * D;
    for (int prefix = 0; prefix <= 1; prefix++) {
        int p = prefix ? P : 0, S = p + T;
        float *q = rnd(nq, 1.5f, 31), *k = rnd(nk, 1.5f, 32), *v = rnd(nk, 1, 33);
        float *kp = rnd((size_t)P * 2 * kvd, 1, 34), *g = rnd(nq, 1, 35);
        float *o1 = malloc(nq * 4), *o2 = malloc(nq * 4),
              *scratch = malloc(sizeof(float) * 2 * T * S);
        float *probs = malloc(sizeof(float) * B * Hq * T * S);
        attention_forward(o1, scratch, q, k, v, prefix ? kp : NULL, prefix ? kp + kvd : NULL,
                          2 * kvd, B, T, p, Hq, Hkv, D);
        attention_forward_keep(o2, probs, q, k, v, prefix ? kp : NULL, prefix ? kp + kvd : NULL,
                               2 * kvd, B, T, p, Hq, Hkv, D);
        assert_memory_equal(o1, o2, nq * sizeof(float));
        float *dq1 = calloc(nq, 4), *dk1 = calloc(nk, 4), *dv1 = calloc(nk, 4);
        float *dq2 = malloc(nq * 4), *dk2 = malloc(nk * 4), *dv2 = malloc(nk * 4);
        float *dkp1 = calloc(P * kvd, 4), *dvp1 = calloc(P * kvd, 4);
        float *dkp2 = calloc(P * kvd, 4), *dvp2 = calloc(P * kvd, 4);
        for (size_t i = 0; i < nq; i++) dq2[i] = NAN; /* written, not read */
        for (size_t i = 0; i < nk; i++) dk2[i] = dv2[i] = NAN;
        attention_backward(dq1, dk1, dv1, prefix ? dkp1 : NULL, prefix ? dvp1 : NULL, kvd, scratch,
                           g, q, k, v, prefix ? kp : NULL, prefix ? kp + kvd : NULL, 2 * kvd, B, T,
                           p, Hq, Hkv, D);
        attention_grad(dq2, dk2, dv2, prefix ? dkp2 : NULL, prefix ? dvp2 : NULL, kvd, scratch,
                       probs, g, q, k, v, prefix ? kp : NULL, prefix ? kp + kvd : NULL, 2 * kvd, B,
                       T, p, Hq, Hkv, D);
        assert_memory_equal(dq1, dq2, nq * sizeof(float));
        assert_memory_equal(dk1, dk2, nk * sizeof(float));
        assert_memory_equal(dv1, dv2, nk * sizeof(float));
        assert_memory_equal(dkp1, dkp2, P * kvd * sizeof(float));
        assert_memory_equal(dvp1, dvp2, P * kvd * sizeof(float));
        double norm = 0;
        for (size_t i = 0; i < nk; i++) norm += fabs(dk1[i]);
        assert_true(norm > 0);
        if (prefix) {
            norm = 0;
            for (size_t i = 0; i < P * kvd; i++) norm += fabs(dkp1[i]);
            assert_true(norm > 0);
        }
        free(q), free(k), free(v), free(kp), free(g), free(o1), free(o2), free(scratch);
        free(probs), free(dq1), free(dk1), free(dv1), free(dq2), free(dk2), free(dv2);
        free(dkp1), free(dvp1), free(dkp2), free(dvp2);
    }
}

/* ---- a training step: the same bits for any team ------------------------------------ */

/* Big enough that every product is cut (hidden 256, 512 tokens) and
 * attention has many tasks; GQA with a trained prefix takes the path that
 * sums prefix gradients over the batch. Full fine-tuning's weight
 * gradients are products of full.c run by OpenBLAS's own threads (see
 * hook_backward in model.c): parent and children share this machine's
 * OpenBLAS setting, so they must agree too. */
static const char *methods[] = {"lora", "full", "prefix"};

/* Runs forward and backward of method `which` on a random model and returns
 * the loss followed by every gradient (and the logits), malloc'd, *n floats. */
static float *step_outputs(int which, size_t *n) {
    model_config cfg = {0};
    cfg.vocab_size = 500;
    cfg.hidden_size = 256;
    cfg.intermediate_size = 688;
    cfg.num_layers = 2;
    cfg.num_heads = 8;
    cfg.num_kv_heads = which == 2 ? 2 : 8;
    cfg.head_dim = 32;
    cfg.max_position_embeddings = 1024;
    cfg.rms_norm_eps = 1e-5f;
    cfg.rope_theta = 10000.0f;
    cfg.bos_token_id = cfg.eos_token_id = -1;
    size_t total = 0;
    for (int k = 0; k < GW_COUNT; k++)
        total += model_weight_shape(&cfg, MODEL_GLOBAL, k, NULL, NULL);
    for (int l = 0; l < cfg.num_layers; l++)
        for (int k = 0; k < LW_COUNT; k++) total += model_weight_shape(&cfg, l, k, NULL, NULL);
    float *mem = rnd(total, 0.05f, 21);
    const float *(*layers)[LW_COUNT] = calloc((size_t)cfg.num_layers, sizeof *layers);
    model_weights w = {.layer = layers};
    float *at = mem;
    for (int k = 0; k < GW_COUNT; k++) {
        size_t c = model_weight_shape(&cfg, MODEL_GLOBAL, k, NULL, NULL);
        w.global[k] = c ? at : NULL;
        at += c;
    }
    for (int l = 0; l < cfg.num_layers; l++)
        for (int k = 0; k < LW_COUNT; k++) {
            size_t c = model_weight_shape(&cfg, l, k, NULL, NULL);
            layers[l][k] = c ? at : NULL;
            if (k == LW_INPUT_NORM || k == LW_POST_NORM)
                for (size_t i = 0; i < c; i++) at[i] += 1.0f;
            at += c;
        }
    Peftps__Method mc = PEFTPS__METHOD__INIT;
    Peftps__LoRA lora = PEFTPS__LO_RA__INIT;
    Peftps__Full full = PEFTPS__FULL__INIT;
    Peftps__Prefix prefix = PEFTPS__PREFIX__INIT;
    Peftps__Module targets[] = {PEFTPS__MODULE__Q_PROJ, PEFTPS__MODULE__V_PROJ,
                                PEFTPS__MODULE__DOWN_PROJ};
    if (which == 0) {
        lora.has_r = 1, lora.r = 8, lora.n_target_modules = 3, lora.target_modules = targets;
        mc.kind_case = PEFTPS__METHOD__KIND_LORA, mc.lora = &lora;
    } else if (which == 1) {
        mc.kind_case = PEFTPS__METHOD__KIND_FULL, mc.full = &full;
    } else {
        prefix.has_num_virtual_tokens = 1, prefix.num_virtual_tokens = 5;
        mc.kind_case = PEFTPS__METHOD__KIND_PREFIX, mc.prefix = &prefix;
    }
    err e;
    peft *p;
    model *m;
    int B = 4, T = 128;
    if (methods_create(&p, &mc, &cfg, &w, &e) < 0 || model_create(&m, &cfg, &w, p, B, T, &e) < 0)
        fail_msg("%s: %s", methods[which], e.msg);
    peft_init(p, 5);
    /* LoRA's B starts at zero; move it so every gradient is non-trivial. */
    rng r;
    rng_seed(&r, 9, 9, 9, 9);
    for (size_t i = 0; i < p->n_params; i++) p->params[i] += 0.01f * rng_normal(&r);
    peft_refresh(p);
    int32_t *tok = malloc(sizeof(int32_t) * B * T), *lab = malloc(sizeof(int32_t) * B * T);
    for (int i = 0; i < B * T; i++) {
        tok[i] = (int32_t)(rng_u64(&r) % (uint64_t)cfg.vocab_size);
        lab[i] = i % 9 == 0 ? -100 : (int32_t)(rng_u64(&r) % (uint64_t)cfg.vocab_size);
    }
    peft_set_step(p, 1, 1, 0, 0);
    peft_zero_grads(p);
    long count;
    double loss = model_forward(m, tok, lab, B, T, &count);
    model_backward(m, 1.0f / (float)count);
    size_t nl = (size_t)B * T * cfg.vocab_size;
    *n = 2 + p->n_params + nl;
    float *out = malloc(*n * sizeof(float));
    memcpy(out, &loss, sizeof loss); /* two floats' worth */
    memcpy(out + 2, p->grads, p->n_params * sizeof(float));
    /* the logits of the whole batch: a forward without labels forms them
     * (the loss takes them a chunk at a time and the backward consumes them) */
    model_forward(m, tok, NULL, B, T, NULL);
    memcpy(out + 2 + p->n_params, model_logits(m), nl * sizeof(float));
    model_free(m);
    peft_free(p);
    free(mem), free(layers), free(tok), free(lab);
    return out;
}

/* The child: writes step_outputs of every method to the file argv[2]. */
static int child_main(const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) return 1;
    for (int i = 0; i < 3; i++) {
        size_t n;
        float *o = step_outputs(i, &n);
        fwrite(&n, sizeof n, 1, f);
        fwrite(o, sizeof(float), n, f);
        free(o);
    }
    return fclose(f) != 0;
}

static char self_path[4096];

/* Runs this binary as a child with PEFTPS_THREADS=threads and checks that
 * its outputs are the bits of `want` (the parent's, per method). */
static void compare_child(int threads, float *const *want, const size_t *nwant) {
    char path[] = "/tmp/peftps-test-team-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    char env_threads[32];
    snprintf(env_threads, sizeof env_threads, "PEFTPS_THREADS=%d", threads);
    size_t ne = 0;
    while (environ[ne]) ne++;
    char **env = calloc(ne + 2, sizeof *env);
    size_t k = 0;
    for (size_t i = 0; i < ne; i++)
        if (strncmp(environ[i], "PEFTPS_THREADS=", 15)) env[k++] = environ[i];
    env[k++] = env_threads;
    char *argv[] = {self_path, "--child", path, NULL};
    pid_t pid;
    assert_int_equal(posix_spawn(&pid, self_path, NULL, NULL, argv, env), 0);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    free(env);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    for (int i = 0; i < 3; i++) {
        size_t n;
        assert_int_equal(fread(&n, sizeof n, 1, f), 1);
        assert_int_equal(n, nwant[i]);
        float *got = malloc(n * sizeof(float));
        assert_int_equal(fread(got, sizeof(float), n, f), n);
        size_t diff = 0;
        for (size_t j = 0; j < n; j++) diff += memcmp(&got[j], &want[i][j], sizeof(float)) != 0;
        printf("  %-6s %d thread(s): %zu of %zu floats differ\n", methods[i], threads, diff, n);
        assert_int_equal(diff, 0);
        free(got);
    }
    fclose(f);
    unlink(path);
}

static void test_step_bits(void **state) {
    (void)state;
    float *want[3];
    size_t n[3];
    for (int i = 0; i < 3; i++) {
        want[i] = step_outputs(i, &n[i]);
        /* Twice in one process: the same bits. */
        size_t n2;
        float *again = step_outputs(i, &n2);
        assert_int_equal(n2, n[i]);
        assert_memory_equal(again, want[i], n2 * sizeof(float));
        free(again);
    }
    printf("  parent's team: %d thread(s)\n", team_size());
    compare_child(1, want, n);
    compare_child(3, want, n);
    for (int i = 0; i < 3; i++) free(want[i]);
}

int main(int argc, char **argv) {
    ssize_t len = readlink("/proc/self/exe", self_path, sizeof self_path - 1);
    if (len > 0) self_path[len] = '\0';
    if (argc == 3 && !strcmp(argv[1], "--child")) return child_main(argv[2]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_task_once),    cmocka_unit_test(test_nested),
        cmocka_unit_test(test_concurrent_callers), cmocka_unit_test(test_fork),
        cmocka_unit_test(test_products),           cmocka_unit_test(test_row_loops),
        cmocka_unit_test(test_attention_keep),     cmocka_unit_test(test_step_bits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
