/* Co-batching (model/cobatch.h, train.h's trainer_shard_grad_many): a
 * BF16 product's rows have the same bits whichever rows share the call, in
 * the exact call forms kernels.c's *_k functions take, contiguous and
 * gathered (*_rows); F32 (OpenBLAS) rows may not, which is why they are
 * never concatenated; and trainers of several methods over one shared base
 * give, co-batched, the gradients and losses they give alone, bit for bit,
 * under F32 and BF16 compute, with BF16 products actually shared and F32
 * calls actually run several to a team job. BF16 parts are skipped, saying
 * so, on a CPU without AVX512-BF16. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "config/config.h"
#include "model/bf16.h"
#include "model/cobatch.h"
#include "model/kernels.h"
#include "train/experiment.h"
#include "train/train.h"

static char tmpdir[] = "/tmp/peftps-cobatch-XXXXXX";

static int skip_without_cpu(void) {
    if (bf16_cpu_ok()) return 0;
    printf("  skipped: this CPU has no AVX512-BF16\n");
    return 1;
}

/* ---- rows of one product ------------------------------------------------------ */

static uint64_t seed_state = 12345;

static float *rnd(size_t n) {
    float *v = malloc((n ? n : 1) * sizeof *v);
    assert_non_null(v);
    for (size_t i = 0; i < n; i++) {
        seed_state = seed_state * 6364136223846793005ULL + 1442695040888963407ULL;
        v[i] = (float)((double)(seed_state >> 40) / (double)(1 << 24) * 2.0 - 1.0);
    }
    return v;
}

static uint16_t *rnd_bf16(size_t n) {
    float *f = rnd(n);
    uint16_t *h = malloc(n * sizeof *h);
    assert_non_null(h);
    bf16_round(h, f, n);
    free(f);
    return h;
}

#define NM 3
static const int rows_of[NM] = {7, 13, 32}; /* members' rows: tiles of 6 cross them */

/* Forward with biases (one NULL), residual forward with bias in place and
 * not, backward input of 2 and 3 products with and without accumulation:
 * each member's rows alone against the same call over all members' rows
 * concatenated, memcmp. */
static void test_bf16_rows_independent(void **state) {
    (void)state;
    if (skip_without_cpu()) return;
    const int C = 45, OC[3] = {70, 64, 131}; /* odd K, partial panels */
    int Nall = 0, off[NM + 1] = {0};
    for (int m = 0; m < NM; m++) off[m + 1] = Nall += rows_of[m];
    uint16_t *wh[3];
    kweight w[3];
    float *bias[3];
    for (int i = 0; i < 3; i++) {
        wh[i] = rnd_bf16((size_t)OC[i] * C);
        w[i] = (kweight){NULL, wh[i]};
        bias[i] = rnd((size_t)OC[i]);
    }
    const float *biases[3] = {bias[0], NULL, bias[2]};
    float *x = rnd((size_t)Nall * C);
    int checked = 0;

    /* linears_forward_k, 3 products with biases. */
    float *cat[3], *solo[3];
    for (int i = 0; i < 3; i++) {
        cat[i] = malloc((size_t)Nall * OC[i] * sizeof(float));
        solo[i] = malloc((size_t)Nall * OC[i] * sizeof(float));
    }
    linears_forward_k(3, cat, x, w, biases, Nall, C, OC);
    for (int m = 0; m < NM; m++) {
        float *o[3];
        for (int i = 0; i < 3; i++) o[i] = solo[i] + (size_t)off[m] * OC[i];
        linears_forward_k(3, o, x + (size_t)off[m] * C, w, biases, rows_of[m], C, OC);
    }
    for (int i = 0; i < 3; i++, checked++)
        assert_memory_equal(cat[i], solo[i], (size_t)Nall * OC[i] * sizeof(float));

    /* linear_residual_forward_k with a bias: out of place, and in place. */
    float *res = rnd((size_t)Nall * OC[2]);
    linear_residual_forward_k(cat[2], res, x, w[2], bias[2], Nall, C, OC[2]);
    for (int m = 0; m < NM; m++) {
        size_t o = (size_t)off[m] * OC[2];
        memcpy(solo[2] + o, res + o, (size_t)rows_of[m] * OC[2] * sizeof(float));
        linear_residual_forward_k(solo[2] + o, solo[2] + o, x + (size_t)off[m] * C, w[2], bias[2],
                                  rows_of[m], C, OC[2]);
    }
    assert_memory_equal(cat[2], solo[2], (size_t)Nall * OC[2] * sizeof(float));
    checked++;

    /* linears_backward_input_k: 3 summed products into dinp, and 2 added
     * to dinp's values. */
    float *dy[3];
    for (int i = 0; i < 3; i++) dy[i] = rnd((size_t)Nall * OC[i]);
    float *dcat = rnd((size_t)Nall * C), *dsolo = malloc((size_t)Nall * C * sizeof(float));
    memcpy(dsolo, dcat, (size_t)Nall * C * sizeof(float));
    for (int acc = 0; acc <= 1; acc++) {
        int n = acc ? 2 : 3;
        const float *d[3] = {dy[0], dy[1], dy[2]};
        linears_backward_input_k(dcat, acc, n, d, w, Nall, C, OC);
        for (int m = 0; m < NM; m++) {
            const float *dm[3];
            for (int i = 0; i < 3; i++) dm[i] = dy[i] + (size_t)off[m] * OC[i];
            linears_backward_input_k(dsolo + (size_t)off[m] * C, acc, n, dm, w, rows_of[m], C, OC);
        }
        assert_memory_equal(dcat, dsolo, (size_t)Nall * C * sizeof(float));
        checked++;
    }
    printf("  BF16: %d call forms, rows %d+%d+%d alone == concatenated, bit for bit\n", checked,
           rows_of[0], rows_of[1], rows_of[2]);

    /* The gathered forms co-batching runs (kernels.h's *_rows), each
     * member's rows in an allocation of its own, against the solo results
     * above (solo[2] is the residual's, dsolo the accumulated backward's). */
    float *mx[NM], *mo[NM][3], *md[NM][3], *mdi[NM];
    const float **xr = malloc((size_t)Nall * sizeof *xr), **rr = malloc((size_t)Nall * sizeof *rr);
    float **orow[3], **dirow = malloc((size_t)Nall * sizeof *dirow);
    const float **drow[3];
    for (int i = 0; i < 3; i++) {
        orow[i] = malloc((size_t)Nall * sizeof **orow);
        drow[i] = malloc((size_t)Nall * sizeof **drow);
    }
    float *res_m[NM];
    for (int m = 0; m < NM; m++) {
        size_t nr = (size_t)rows_of[m];
        mx[m] = malloc(nr * C * sizeof(float));
        memcpy(mx[m], x + (size_t)off[m] * C, nr * C * sizeof(float));
        res_m[m] = malloc(nr * OC[2] * sizeof(float));
        memcpy(res_m[m], res + (size_t)off[m] * OC[2], nr * OC[2] * sizeof(float));
        mdi[m] = malloc(nr * C * sizeof(float));
        for (int i = 0; i < 3; i++) {
            mo[m][i] = malloc(nr * OC[i] * sizeof(float));
            md[m][i] = malloc(nr * OC[i] * sizeof(float));
            memcpy(md[m][i], dy[i] + (size_t)off[m] * OC[i], nr * OC[i] * sizeof(float));
        }
        for (int r = 0; r < rows_of[m]; r++) {
            xr[off[m] + r] = mx[m] + (size_t)r * C;
            rr[off[m] + r] = res_m[m] + (size_t)r * OC[2];
            dirow[off[m] + r] = mdi[m] + (size_t)r * C;
            for (int i = 0; i < 3; i++) {
                orow[i][off[m] + r] = mo[m][i] + (size_t)r * OC[i];
                drow[i][off[m] + r] = md[m][i] + (size_t)r * OC[i];
            }
        }
    }
    /* member m's rows of a gathered output against rows off[m].. of ref */
#define SAME_ROWS(arr, k, ref, width)                                                              \
    for (int m = 0; m < NM; m++)                                                                   \
        assert_memory_equal(arr[m] k, (ref) + (size_t)off[m] * (width),                            \
                            (size_t)rows_of[m] * (width) * sizeof(float));
    linears_forward_rows(3, (float *const *const *)orow, xr, (const uint16_t *const *)wh, biases,
                         Nall, C, OC);
    /* the forward's solo results were overwritten above but for 0 and 1 */
    SAME_ROWS(mo, [0], cat[0], OC[0]);
    SAME_ROWS(mo, [1], cat[1], OC[1]);
    /* residual in place on each member's own rows */
    linear_residual_forward_rows(orow[2], rr, xr, wh[2], bias[2], Nall, C, OC[2]);
    SAME_ROWS(mo, [2], solo[2], OC[2]);
    float **rrw = (float **)rr; /* the residual rows as the output: in place */
    linear_residual_forward_rows(rrw, rr, xr, wh[2], bias[2], Nall, C, OC[2]);
    SAME_ROWS(res_m, , solo[2], OC[2]);
    /* backward: 3 summed into dinp written, then 2 added */
    float *dref = rnd((size_t)Nall * C);
    for (int m = 0; m < NM; m++)
        memcpy(mdi[m], dref + (size_t)off[m] * C, (size_t)rows_of[m] * C * sizeof(float));
    for (int acc = 0; acc <= 1; acc++) {
        int n = acc ? 2 : 3;
        const float *d[3] = {dy[0], dy[1], dy[2]};
        linears_backward_input_k(dref, acc, n, d, w, Nall, C, OC);
        linears_backward_input_rows(dirow, acc, n, (const float *const *const *)drow,
                                    (const uint16_t *const *)wh, Nall, C, OC);
        SAME_ROWS(mdi, , dref, C);
    }
#undef SAME_ROWS
    printf("  BF16: the same call forms over rows gathered from separate allocations, bit for "
           "bit\n");
    for (int m = 0; m < NM; m++) {
        free(mx[m]), free(res_m[m]), free(mdi[m]);
        for (int i = 0; i < 3; i++) free(mo[m][i]), free(md[m][i]);
    }
    for (int i = 0; i < 3; i++) free(orow[i]), free((void *)drow[i]);
    free((void *)xr), free((void *)rr), free(dirow), free(dref);
    for (int i = 0; i < 3; i++) {
        free(wh[i]), free(bias[i]), free(cat[i]), free(solo[i]), free(dy[i]);
    }
    free(x), free(res), free(dcat), free(dsolo);
}

/* F32 products (OpenBLAS through kernels.c's team): the same rows computed
 * alone and within a taller call. Reports the shapes where the bits
 * differ, the reason F32 products are never concatenated; whether any
 * does depends on the OpenBLAS build and CPU, so it is reported, not
 * asserted (the trainers' test asserts the F32 fallback is exact). */
static void test_f32_rows_depend(void **state) {
    (void)state;
    const int Cs[] = {64, 100, 768}, OCs[] = {64, 256, 768};
    const int Ns[] = {7, 32, 100};
    int differ = 0, tried = 0;
    for (size_t a = 0; a < sizeof Cs / sizeof *Cs; a++)
        for (size_t b = 0; b < sizeof OCs / sizeof *OCs; b++)
            for (size_t c = 0; c < sizeof Ns / sizeof *Ns; c++) {
                int C = Cs[a], OC = OCs[b], N = Ns[c], Nall = 3 * N + 5;
                float *x = rnd((size_t)Nall * C), *wt = rnd((size_t)OC * C);
                float *all = malloc((size_t)Nall * OC * sizeof(float));
                float *one = malloc((size_t)N * OC * sizeof(float));
                linear_forward(all, x, wt, NULL, Nall, C, OC);
                /* member rows [N+5, 2N+5) alone */
                linear_forward(one, x + (size_t)(N + 5) * C, wt, NULL, N, C, OC);
                int d = memcmp(one, all + (size_t)(N + 5) * OC, (size_t)N * OC * sizeof(float));
                tried++;
                if (d) {
                    if (!differ)
                        printf("  F32: rows %d..%d of a %d-row product (C %d, OC %d) differ "
                               "from the same rows alone\n",
                               N + 5, 2 * N + 4, Nall, C, OC);
                    differ++;
                }
                free(x), free(wt), free(all), free(one);
            }
    printf("  F32: %d of %d shapes change a row's bits when other rows share the call%s\n", differ,
           tried, differ ? ": F32 products are never concatenated" : "");
}

/* ---- trainers over one base --------------------------------------------------- */

static Peftps__Experiment *exp_from_text(const char *text) {
    char path[700];
    snprintf(path, sizeof path, "%s/exp.pbtxt", tmpdir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    Peftps__Experiment *ex = NULL;
    err e;
    if (experiment_load(path, NULL, 0, &ex, NULL, &e) < 0)
        fail_msg("experiment:\n%s\n%s", text, e.msg);
    return ex;
}

#define NT 5
/* Methods and data shapes differ: rows per shard 2x16, 3x24, 2x16, 1x20, 2x8. */
static const char *const methods[NT] = {
    "lora { r: 4 alpha: 8 }",
    "lora { r: 8 alpha: 16 target_modules: [Q_PROJ, K_PROJ, O_PROJ, GATE_PROJ, DOWN_PROJ] }",
    "prefix { num_virtual_tokens: 3 projection_hidden: 8 }",
    "layer_wise { first_layer: 1 last_layer: 1 }",
    "full {}",
};
static const char *const datas[NT] = {
    "seq_len: 16 batch_size: 4 shards_per_step: 2", "seq_len: 24 batch_size: 6 shards_per_step: 2",
    "seq_len: 16 batch_size: 4 shards_per_step: 2", "seq_len: 20 batch_size: 2 shards_per_step: 2",
    "seq_len: 8 batch_size: 4 shards_per_step: 2",
};
static const double lrs[NT] = {1e-2, 1e-3, 3e-2, 1e-4, 1e-5};

static Peftps__Experiment *trainer_exp(int i, const char *compute) {
    char text[2048];
    snprintf(text, sizeof text,
             "name: \"cobatch%d\"\nseed: %d\n"
             "model { path: \"tests/fixtures/tiny-llama\" compute: %s }\n"
             "method { %s }\n"
             "optimizer { lr: %g weight_decay: 0.01 max_grad_norm: 1.0 }\n"
             "schedule { warmup_steps: 1 total_steps: 10 decay: LINEAR }\n"
             "data { train: \"tests/fixtures/tiny.tokens\" %s }\n",
             i, 11 + i, compute, methods[i], lrs[i], datas[i]);
    return exp_from_text(text);
}

/* Opens the NT trainers over one model_files of `compute`, and NT more,
 * each over a model_files of its own, as the reference run alone. For two
 * steps (an optimizer step between, so that parameters move) each shard
 * alone in the reference, then through trainer_shard_grad_many with
 * cobatch 1 and 0 (in that order: the co-batched run finds the buffers of
 * its trainers' previous step, not this step's values), compared bit for
 * bit. Adds the co-batching counters of the co-batched calls to *got. */
static void trainers_match(model_compute compute, cobatch_stats *got) {
    const char *cname = compute == MODEL_COMPUTE_BF16 ? "BF16" : "F32";
    err e;
    model_files *files, *own[NT];
    if (model_files_open_compute(&files, "tests/fixtures/tiny-llama", compute, &e) < 0)
        fail_msg("%s", e.msg);
    Peftps__Experiment *ex[NT];
    trainer *t[NT], *ref[NT];
    float *solo[NT];
    for (int i = 0; i < NT; i++) {
        ex[i] = trainer_exp(i, cname);
        if (trainer_open_files(&t[i], ex[i], files, 1, &e) < 0)
            fail_msg("%s: %s", methods[i], e.msg);
        if (model_files_open_compute(&own[i], "tests/fixtures/tiny-llama", compute, &e) < 0 ||
            trainer_open_files(&ref[i], ex[i], own[i], 1, &e) < 0)
            fail_msg("%s: %s", methods[i], e.msg);
        solo[i] = malloc(t[i]->p->n_params * sizeof(float));
        assert_non_null(solo[i]);
    }
    memset(got, 0, sizeof *got);
    for (uint64_t step = 0; step < 2; step++) {
        uint32_t shard = (uint32_t)step; /* shard 0 of step 0, shard 1 of step 1 */
        double loss[NT];
        long ntok[NT];
        for (int i = 0; i < NT; i++) {
            if (trainer_shard_grad(ref[i], step, shard, &loss[i], &ntok[i], &e) < 0)
                fail_msg("%s: %s", methods[i], e.msg);
            memcpy(solo[i], ref[i]->p->grads, ref[i]->p->n_params * sizeof(float));
        }
        for (int cb = 1; cb >= 0; cb--) {
            train_shard_job jobs[NT];
            for (int i = 0; i < NT; i++) {
                jobs[i] = (train_shard_job){.t = t[i], .step = step, .shard = shard};
                memset(t[i]->p->grads, 0xFF, t[i]->p->n_params * sizeof(float)); /* NaNs */
            }
            cobatch_stats before, after, d;
            cobatch_stats_get(&before);
            if (trainer_shard_grad_many(jobs, NT, cb) < 0)
                for (int i = 0; i < NT; i++)
                    if (jobs[i].rc) fail_msg("%s: %s", methods[i], jobs[i].e.msg);
            cobatch_stats_get(&after);
            cobatch_stats_diff(&d, &after, &before);
            if (cb) {
                got->rounds += d.rounds;
                got->calls_shared += d.calls_shared;
                got->products_in += d.products_in;
                got->rows_shared += d.rows_shared;
                got->products_alone += d.products_alone;
                got->products_f32 += d.products_f32;
                got->f32_team_jobs += d.f32_team_jobs;
            } else
                assert_int_equal(d.rounds + d.products_f32, 0);
            for (int i = 0; i < NT; i++) {
                assert_int_equal(jobs[i].rc, 0);
                if (memcmp(&jobs[i].loss_sum, &loss[i], sizeof loss[i]) != 0)
                    fail_msg("%s %s step %d cobatch %d: loss %.17g, alone %.17g", cname, methods[i],
                             (int)step, cb, jobs[i].loss_sum, loss[i]);
                assert_int_equal(jobs[i].n_tokens, ntok[i]);
                if (memcmp(t[i]->p->grads, solo[i], t[i]->p->n_params * sizeof(float)) != 0) {
                    size_t k = 0;
                    while (memcmp(t[i]->p->grads + k, solo[i] + k, sizeof(float)) == 0) k++;
                    fail_msg("%s %s step %d cobatch %d: gradient %zu of %zu is %.9g, alone %.9g",
                             cname, methods[i], (int)step, cb, k, t[i]->p->n_params,
                             t[i]->p->grads[k], solo[i][k]);
                }
            }
        }
        /* An optimizer step on both sets (the same gradients), so that the
         * next step's parameters differ from this one's. */
        for (int i = 0; i < NT; i++) {
            double lr = optim_lr(ex[i]->optimizer, ex[i]->schedule, step);
            trainer *both[2] = {t[i], ref[i]};
            for (int k = 0; k < 2; k++) {
                peft *p = both[k]->p;
                train_update(&both[k]->opt, ex[i]->optimizer, p->tensors, p->n_tensors, p->params,
                             p->grads, p->n_params, ntok[i], lr);
                peft_refresh(p);
            }
            assert_memory_equal(t[i]->p->params, ref[i]->p->params,
                                t[i]->p->n_params * sizeof(float));
        }
    }
    printf("  %s: %d trainers, 2 steps: co-batched == alone, bit for bit; %llu rounds, %llu "
           "shared calls serving %llu products (%llu rows), %llu BF16 products alone, %llu F32 "
           "product calls in %llu team jobs\n",
           cname, NT, (unsigned long long)got->rounds, (unsigned long long)got->calls_shared,
           (unsigned long long)got->products_in, (unsigned long long)got->rows_shared,
           (unsigned long long)got->products_alone, (unsigned long long)got->products_f32,
           (unsigned long long)got->f32_team_jobs);
    for (int i = 0; i < NT; i++) {
        trainer_close(t[i]);
        trainer_close(ref[i]);
        model_files_close(own[i]);
        config_free(ex[i]);
        free(solo[i]);
    }
    model_files_close(files);
}

static void test_trainers_f32(void **state) {
    (void)state;
    cobatch_stats s;
    trainers_match(MODEL_COMPUTE_F32, &s);
    /* Nothing concatenated under F32; the products ran side by side, several
     * computations' in a team job. */
    assert_int_equal(s.calls_shared, 0);
    assert_int_equal(s.products_alone, 0);
    assert_true(s.products_f32 > 0);
    assert_true(s.f32_team_jobs < s.products_f32);
}

static void test_trainers_bf16(void **state) {
    (void)state;
    if (skip_without_cpu()) return;
    cobatch_stats s;
    trainers_match(MODEL_COMPUTE_BF16, &s);
    assert_true(s.calls_shared > 0);
    assert_true(s.products_in >= 2 * s.calls_shared);
    /* F32 products (full fine-tuning's and layer-wise's own weights, the
     * methods' own products) ran too, side by side. */
    assert_true(s.products_f32 > 0);
}

static int setup(void **state) {
    (void)state;
    if (!mkdtemp(tmpdir)) return -1;
    char cache[700];
    snprintf(cache, sizeof cache, "%s/cache", tmpdir);
    setenv("PEFTPS_CACHE_DIR", cache, 1);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bf16_rows_independent),
        cmocka_unit_test(test_f32_rows_depend),
        cmocka_unit_test(test_trainers_f32),
        cmocka_unit_test(test_trainers_bf16),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
