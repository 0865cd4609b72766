/* BF16 compute through the model (model.c, modelfile.c, kernels.c and
 * bf16.c): a BF16 base is used in place in its mapping, with no F32 copy
 * of its matrices and no cache file for them; an F16 base becomes BF16
 * once; the loss and every LoRA gradient of the BF16 path stay within a
 * stated bound of the F32 path on tests/fixtures/tiny-llama, with the
 * full-fine-tuning and delta methods running beside a BF16 base too.
 * Skipped, saying so, on a CPU without AVX512-BF16. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "procmaps.h"

#include "gradcheck.h"
#include "base/fsutil.h"
#include "methods/registry.h"
#include "model/bf16.h"
#include "model/model.h"
#include "model/peft.h"
#include "model/safetensors.h"

#define TINY "tests/fixtures/tiny-llama"

static char tmpdir[] = "/tmp/peftps-bf16-XXXXXX";

static int skip_without_cpu(void) {
    if (bf16_cpu_ok()) return 0;
    printf("  skipped: this CPU has no AVX512-BF16\n");
    return 1;
}

/* Copies tiny-llama into dir with every tensor in dtype (BF16 or F16). */
static void write_copy(const char *dir, st_dtype dtype) {
    err e = {{0}};
    char path[512];
    assert_int_equal(fs_mkdir_p(dir, &e), 0);
    st_file *f;
    if (st_open(&f, TINY "/model.safetensors", &e) < 0) fail_msg("%s", e.msg);
    int n = st_count(f);
    st_entry *en = calloc((size_t)n, sizeof *en);
    uint16_t **bufs = calloc((size_t)n, sizeof *bufs);
    for (int i = 0; i < n; i++) {
        const st_tensor *t = st_tensor_at(f, i);
        float *v = malloc(t->numel * sizeof *v);
        bufs[i] = malloc(t->numel * sizeof **bufs);
        assert_int_equal(st_convert_f32(f, t, v, &e), 0);
        for (size_t j = 0; j < t->numel; j++)
            bufs[i][j] = dtype == ST_BF16 ? st_f32_to_bf16(v[j]) : st_f32_to_f16(v[j]);
        free(v);
        en[i] = (st_entry){.name = t->name, .dtype = dtype, .ndim = t->ndim, .data = bufs[i]};
        memcpy(en[i].shape, t->shape, sizeof t->shape);
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (st_write(path, en, n, NULL, &e) < 0) fail_msg("%s", e.msg);
    for (int i = 0; i < n; i++) free(bufs[i]);
    free(bufs), free(en);
    st_close(f);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "cp " TINY "/config.json %s/config.json", dir);
    assert_int_equal(system(cmd), 0);
}

/* Bytes of the cache files in dir. */
static long cache_bytes(const char *dir) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "du -sb --apparent-size %s 2>/dev/null | cut -f1", dir);
    FILE *p = popen(cmd, "r");
    long n = -1;
    if (p && fscanf(p, "%ld", &n) != 1) n = -1;
    if (p) pclose(p);
    return n;
}

static void test_base_in_place(void **state) {
    (void)state;
    char dir[600], cache[600];
    snprintf(dir, sizeof dir, "%s/bf16-base", tmpdir);
    snprintf(cache, sizeof cache, "%s/cache-bf16", tmpdir);
    write_copy(dir, ST_BF16);
    setenv("PEFTPS_CACHE_DIR", cache, 1);
    err e = {{0}};
    model_files *f;
    if (model_files_open_compute(&f, dir, MODEL_COMPUTE_BF16, &e) < 0) fail_msg("%s", e.msg);
    const model_weights *w = model_files_weights(f);
    const model_config *c = model_files_config(f);
    for (int l = 0; l < c->num_layers; l++)
        for (int k = LW_Q; k <= LW_DOWN; k++) {
            assert_null(w->layer[l][k]);
            assert_true(in_file_mapping(w->layer16[l][k], "bf16-base/model.safetensors"));
        }
    assert_true(in_file_mapping(w->global16[GW_EMBED], "bf16-base/model.safetensors"));
    assert_true(in_file_mapping(w->global16[GW_LM_HEAD], "bf16-base/model.safetensors"));
    assert_non_null(w->layer[0][LW_INPUT_NORM]); /* norms as F32 */
    assert_false(in_file_mapping(w->layer[0][LW_INPUT_NORM], "bf16-base/model.safetensors"));
    /* Only the norms were converted: C floats per norm, a line each. */
    long bytes = cache_bytes(cache);
    printf("  cache of a BF16 base under BF16 compute: %ld bytes (norms only)\n", bytes);
    assert_true(bytes > 0 &&
                bytes < 4096 + (2 * c->num_layers + 1) * 64 * (c->hidden_size / 16 + 1));
    model_files_close(f);

    /* The same base under F32 compute gets its F32 cache, as before. */
    if (model_files_open_compute(&f, dir, MODEL_COMPUTE_F32, &e) < 0) fail_msg("%s", e.msg);
    w = model_files_weights(f);
    assert_null(w->layer16);
    assert_true(in_file_mapping(w->layer[0][LW_Q], ".f32"));
    model_files_close(f);
    unsetenv("PEFTPS_CACHE_DIR");
}

/* An F16 base under BF16 compute: each weight the BF16 rounding of its
 * exact F32 value, in the shared cache. */
static void test_f16_base(void **state) {
    (void)state;
    char dir[600], cache[600];
    snprintf(dir, sizeof dir, "%s/f16-base", tmpdir);
    snprintf(cache, sizeof cache, "%s/cache-f16", tmpdir);
    write_copy(dir, ST_F16);
    setenv("PEFTPS_CACHE_DIR", cache, 1);
    err e = {{0}};
    model_files *f, *g;
    if (model_files_open_compute(&f, dir, MODEL_COMPUTE_BF16, &e) < 0) fail_msg("%s", e.msg);
    if (model_files_open_compute(&g, dir, MODEL_COMPUTE_F32, &e) < 0) fail_msg("%s", e.msg);
    const model_weights *w = model_files_weights(f), *w32 = model_files_weights(g);
    int rows, cols;
    size_t n = model_weight_shape(model_files_config(f), 1, LW_DOWN, &rows, &cols);
    assert_true(in_file_mapping(w->layer16[1][LW_DOWN], ".bf16"));
    for (size_t i = 0; i < n; i++)
        assert_int_equal(w->layer16[1][LW_DOWN][i], st_f32_to_bf16(w32->layer[1][LW_DOWN][i]));
    model_files_close(f);
    model_files_close(g);
    unsetenv("PEFTPS_CACHE_DIR");
}

/* Worst |a - b| / max |b| over n values. */
static double rel_diff(const float *a, const float *b, size_t n) {
    double d = 0.0, m = 0.0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        m = fmax(m, fabs((double)b[i]));
    }
    return m > 0 ? d / m : d;
}

#define B 2
#define T 16

/* Loss and gradients of the method block over tiny-llama in one compute. */
static double run(model_compute compute, const char *block, float **grads, size_t *n) {
    err e = {{0}};
    model_files *f;
    if (model_files_open_compute(&f, TINY, compute, &e) < 0) fail_msg("%s", e.msg);
    const model_config *c = model_files_config(f);
    Peftps__Method *mb = gc_method("%s", block);
    peft *p;
    model *m;
    if (methods_create(&p, mb, c, model_files_weights(f), &e) < 0) fail_msg("%s", e.msg);
    peft_init(p, 5);
    gc_perturb(p, 0.05f, 9);
    if (model_create(&m, c, model_files_weights(f), p, B, T, &e) < 0) fail_msg("%s", e.msg);
    int32_t tokens[B * T], labels[B * T];
    gc_batch(c, tokens, labels, B, T, 77);
    long count;
    peft_zero_grads(p);
    double loss = model_forward(m, tokens, labels, B, T, &count);
    model_backward(m, 1.0f / (float)count);
    *n = p->n_params;
    *grads = malloc(*n * sizeof **grads);
    memcpy(*grads, p->grads, *n * sizeof **grads);
    model_free(m);
    peft_free(p);
    gc_method_free(mb);
    model_files_close(f);
    return loss / (double)count;
}

/* The BF16 path against F32 on the fixture: the loss within 2e-4
 * relative and each method's gradient within 2e-2 of its largest value
 * (BF16 keeps 8 bits: activations and weights each rounded by up to
 * 2^-9 relative at every product of the base). */
static void test_vs_f32(void **state) {
    (void)state;
    if (skip_without_cpu()) return;
    static const char *blocks[] = {
        "lora { r: 4 alpha: 8 target_modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, "
        "UP_PROJ, DOWN_PROJ] }",
        "prefix { num_virtual_tokens: 3 }",
        "layer_wise { first_layer: 1 last_layer: 1 }",
        "full { }",
    };
    for (size_t i = 0; i < sizeof blocks / sizeof *blocks; i++) {
        float *g32, *g16;
        size_t n32, n16;
        double l32 = run(MODEL_COMPUTE_F32, blocks[i], &g32, &n32);
        double l16 = run(MODEL_COMPUTE_BF16, blocks[i], &g16, &n16);
        assert_int_equal(n32, n16);
        double dl = fabs(l16 - l32) / fabs(l32), dg = rel_diff(g16, g32, n32);
        printf("  %-12.12s loss F32 %.6f BF16 %.6f (rel %.2e), gradients rel %.2e\n", blocks[i],
               l32, l16, dl, dg);
        assert_true(dl < 2e-4);
        assert_true(dg < 2e-2);
        assert_true(dg > 0.0); /* really another path */
        free(g32), free(g16);
    }
}

static int setup(void **state) {
    (void)state;
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_base_in_place),
        cmocka_unit_test(test_f16_base),
        cmocka_unit_test(test_vs_f32),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
