/* Tests of the method interface (peft.c) and of the LoRA, prefix and full
 * fine-tuning methods (lora.c, prefix.c, full.c): layouts, names, counts,
 * inits, each hook against a naive reference, dropout streams, save/load,
 * and finite-difference checks of every gradient through the model
 * (gradcheck.h, shared with test_gradcheck_delta.c). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gradcheck.h"
#include "model/peft.h"
#include "methods/registry.h"
#include "base/rng.h"
#include "model/safetensors.h"

/* A created and initialised method over a tiny base. */
typedef struct fixture {
    gc_base base;
    Peftps__Method *method; /* the block p keeps */
    peft *p;
} fixture;

/* The method of the block text (printf-style, see gc_method) over the
 * tiny base, initialised with seed. */
static void fixture_open(fixture *f, int tied, uint64_t seed, const char *fmt, ...) {
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    err e = {{0}};
    assert_int_equal(gc_base_create(&f->base, tied, 1234), 0);
    f->method = gc_method("%s", text);
    if (methods_create(&f->p, f->method, &f->base.cfg, &f->base.w, &e) < 0) fail_msg("%s", e.msg);
    peft_init(f->p, seed);
}

static void fixture_close(fixture *f) {
    peft_free(f->p);
    gc_method_free(f->method);
    gc_base_free(&f->base);
}

/* peft_create of the block text fails over base with a message containing
 * needle. */
static void expect_create_error(gc_base *base, const char *method, const char *needle) {
    err e = {{0}};
    peft *p = NULL;
    Peftps__Method *m = gc_method("%s", method);
    assert_int_equal(methods_create(&p, m, &base->cfg, &base->w, &e), -1);
    assert_null(p);
    gc_method_free(m);
    if (!strstr(e.msg, needle)) fail_msg("error \"%s\" does not say \"%s\"", e.msg, needle);
}

static void random_fill(float *v, size_t n, uint64_t seed, float scale) {
    rng g;
    rng_seed(&g, seed, 555, 0, 0);
    for (size_t i = 0; i < n; i++) v[i] = scale * rng_normal(&g);
}

static void assert_close(const float *got, const double *want, size_t n, double tol,
                         const char *what) {
    for (size_t i = 0; i < n; i++)
        if (fabs(got[i] - want[i]) > tol * (1.0 + fabs(want[i])))
            fail_msg("%s[%zu]: got %.7g, want %.7g", what, i, (double)got[i], want[i]);
}

static int tensor(const peft *p, const char *name) {
    int i = peft_find_tensor(p, name);
    if (i < 0) fail_msg("no tensor %s", name);
    return i;
}

/* ---- the registry and the shared helpers ---------------------------------- */

static void test_registry(void **state) {
    static const char *const names[] = {
        "", "lora", "prefix", "layer_wise", "attention_heads", "subnetwork", "full"};
    Peftps__Method m = PEFTPS__METHOD__INIT;
    assert_null(methods_find(&m));
    assert_null(methods_find(NULL));
    for (int k = PEFTPS__METHOD__KIND_LORA; k <= PEFTPS__METHOD__KIND_FULL; k++) {
        m.kind_case = (Peftps__Method__KindCase)k;
        const peft_method *pm = methods_find(&m);
        assert_non_null(pm);
        assert_string_equal(pm->name, names[k]);
    }
    m.kind_case = (Peftps__Method__KindCase)7;
    assert_null(methods_find(&m));

    gc_base b;
    assert_int_equal(gc_base_create(&b, 0, 1), 0);
    Peftps__Method none = PEFTPS__METHOD__INIT;
    peft *p = (peft *)&b; /* must be overwritten with NULL */
    err e = {{0}};
    assert_int_equal(methods_create(&p, &none, &b.cfg, &b.w, &e), -1);
    assert_null(p);
    assert_non_null(strstr(e.msg, "no method block"));
    gc_base_free(&b);
}

static void test_module_helpers(void **state) {
    assert_int_equal(peft_module_weight(PEFTPS__MODULE__Q_PROJ), LW_Q);
    assert_int_equal(peft_module_weight(PEFTPS__MODULE__K_PROJ), LW_K);
    assert_int_equal(peft_module_weight(PEFTPS__MODULE__O_PROJ), LW_O);
    assert_int_equal(peft_module_weight(PEFTPS__MODULE__DOWN_PROJ), LW_DOWN);
    assert_int_equal(peft_module_weight(PEFTPS__MODULE__INPUT_LAYERNORM), LW_INPUT_NORM);
    assert_int_equal(peft_module_weight(PEFTPS__MODULE__POST_ATTENTION_LAYERNORM), LW_POST_NORM);
    assert_int_equal(peft_module_weight(PEFTPS__MODULE__MODULE_UNSPECIFIED), -1);
    assert_int_equal(peft_module_weight(10), -1);
    assert_string_equal(peft_weight_module_name(LW_GATE), "gate_proj");
    assert_string_equal(peft_weight_module_name(LW_POST_NORM), "post_attention_layernorm");
    assert_string_equal(peft_weight_module_name(LW_COUNT), "?");

    err e = {{0}};
    unsigned mask = 0;
    assert_int_equal(peft_module_mask(NULL, 0, 5u, PEFT_LINEARS, "x", &mask, &e), 0);
    assert_int_equal(mask, 5u);
    Peftps__Module two[2] = {PEFTPS__MODULE__DOWN_PROJ, PEFTPS__MODULE__Q_PROJ};
    assert_int_equal(peft_module_mask(two, 2, 0, PEFT_LINEARS, "x", &mask, &e), 0);
    assert_int_equal(mask, PEFT_BIT(LW_DOWN) | PEFT_BIT(LW_Q));
    Peftps__Module norm[1] = {PEFTPS__MODULE__INPUT_LAYERNORM};
    assert_int_equal(peft_module_mask(norm, 1, 0, PEFT_LINEARS, "lora.target_modules", &mask, &e),
                     -1);
    assert_non_null(strstr(e.msg, "lora.target_modules: module input_layernorm is not supported"));
    assert_non_null(strstr(e.msg, "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"));
    Peftps__Module bad[1] = {(Peftps__Module)0};
    assert_int_equal(peft_module_mask(bad, 1, 0, PEFT_LINEARS, "m", &mask, &e), -1);
    assert_non_null(strstr(e.msg, "m: entry 0 is not a module"));

    model_config cfg;
    gc_config(&cfg, 0);
    unsigned char chosen[2] = {7, 7};
    assert_int_equal(peft_layer_list(&cfg, NULL, 0, "l", chosen, &e), 0);
    assert_true(chosen[0] == 1 && chosen[1] == 1);
    uint32_t one[1] = {1};
    assert_int_equal(peft_layer_list(&cfg, one, 1, "l", chosen, &e), 0);
    assert_true(chosen[0] == 0 && chosen[1] == 1);
    uint32_t two_l[2] = {0, 2};
    assert_int_equal(peft_layer_list(&cfg, two_l, 2, "lora.layers", chosen, &e), -1);
    assert_string_equal(e.msg,
                        "lora.layers: layer 2 does not exist: the model has 2 layers (0 to 1)");
}

/* Tensors are 16-float aligned in 64-byte aligned buffers; declaring after
 * allocation (a calibrating method) keeps the values; bad declarations fail. */
static void test_tensor_table(void **state) {
    fixture f;
    fixture_open(&f, 0, 1, "lora { r: 4 alpha: 8 }");
    peft *p = f.p;
    assert_int_equal((uintptr_t)p->params % 64, 0);
    assert_int_equal((uintptr_t)p->grads % 64, 0);
    for (int i = 0; i < p->n_tensors; i++) {
        assert_int_equal(p->tensors[i].offset % 16, 0);
        if (i)
            assert_true(p->tensors[i].offset >= p->tensors[i - 1].offset + p->tensors[i - 1].numel);
    }
    size_t n = p->n_params;
    float *before = malloc(n * sizeof(float));
    memcpy(before, p->params, n * sizeof(float));
    err e = {{0}};
    int64_t shape[2] = {3, 5};
    int i = peft_add_tensor(p, "extra", 2, shape, &e);
    assert_int_equal(i, p->n_tensors - 1);
    assert_int_equal(p->tensors[i].numel, 15);
    assert_int_equal(p->tensors[i].offset % 16, 0);
    assert_memory_equal(p->params, before, n * sizeof(float));
    for (int j = 0; j < 15; j++) assert_true(peft_param(p, i)[j] == 0.0f);
    assert_int_equal(peft_find_tensor(p, "extra"), i);
    assert_int_equal(peft_find_tensor(p, "nothing"), -1);
    free(before);

    assert_int_equal(peft_add_tensor(p, "extra", 2, shape, &e), -1);
    assert_non_null(strstr(e.msg, "declared twice"));
    int64_t zero[2] = {3, 0};
    assert_int_equal(peft_add_tensor(p, "z", 2, zero, &e), -1);
    assert_non_null(strstr(e.msg, "tensor z: dimension 1 is 0"));
    assert_int_equal(peft_add_tensor(p, "d", 5, shape, &e), -1);
    char longname[PEFT_NAME_MAX + 4];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    assert_int_equal(peft_add_tensor(p, longname, 2, shape, &e), -1);

    peft_set_step(p, 1, 2, 3, 4);
    assert_true(p->training == 1 && p->seed == 2 && p->step == 3 && p->shard == 4);
    p->grads[0] = 1;
    peft_zero_grads(p);
    for (size_t j = 0; j < p->n_params; j++) assert_true(p->grads[j] == 0.0f);
    fixture_close(&f);
}

/* ---- LoRA -------------------------------------------------------------- */

static size_t lora_expected(const model_config *c, int r, unsigned mask, int layers) {
    size_t C = (size_t)c->hidden_size, q = (size_t)(c->num_heads * c->head_dim);
    size_t kv = (size_t)(c->num_kv_heads * c->head_dim), I = (size_t)c->intermediate_size;
    size_t in_out[7] = {C + q, C + kv, C + kv, q + C, C + I, C + I, I + C};
    size_t n = 0;
    for (int k = 0; k < 7; k++)
        if (mask & PEFT_BIT(k)) n += (size_t)r * in_out[k];
    return n * (size_t)layers;
}

static void test_lora_layout(void **state) {
    fixture f;
    fixture_open(&f, 0, 1, "lora { r: 4 alpha: 8 }");
    const model_config *c = &f.base.cfg;
    assert_int_equal(f.p->n_tensors, 8);
    assert_int_equal(peft_num_trainable(f.p),
                     lora_expected(c, 4, PEFT_BIT(LW_Q) | PEFT_BIT(LW_V), 2));
    assert_int_equal(peft_num_trainable(f.p), 2 * (4 * (16 + 16) + 4 * (16 + 8)));
    assert_int_equal(f.p->first_trainable_layer, 0);
    const peft_tensor *a = &f.p->tensors[tensor(
        f.p, "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight")];
    assert_true(a->ndim == 2 && a->shape[0] == 4 && a->shape[1] == 16);
    const peft_tensor *b = &f.p->tensors[tensor(
        f.p, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")];
    assert_true(b->ndim == 2 && b->shape[0] == 8 && b->shape[1] == 4);
    assert_int_equal(
        peft_find_tensor(f.p, "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"),
        -1);
    fixture_close(&f);

    fixture_open(&f, 0, 1,
                 "lora { r: 3 alpha: 6 target_modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, "
                 "UP_PROJ, DOWN_PROJ] layers: [1] }");
    assert_int_equal(f.p->n_tensors, 14);
    assert_int_equal(peft_num_trainable(f.p), lora_expected(c, 3, PEFT_LINEARS, 1));
    assert_int_equal(f.p->first_trainable_layer, 1);
    b = &f.p->tensors[tensor(f.p, "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")];
    assert_true(b->shape[0] == 16 && b->shape[1] == 3);
    a = &f.p->tensors[tensor(f.p, "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")];
    assert_true(a->shape[0] == 3 && a->shape[1] == 24);
    assert_int_equal(
        peft_find_tensor(f.p, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"), -1);
    fixture_close(&f);

    /* bad blocks */
    err e = {{0}};
    gc_base base;
    assert_int_equal(gc_base_create(&base, 0, 1), 0);
    peft *p;
    expect_create_error(&base, "lora { r: 4 alpha: 8 layers: [5] }",
                        "method lora: lora.layers: layer 5 does not exist");
    expect_create_error(&base, "lora { r: 0 alpha: 8 }", "lora.r is 0");
    expect_create_error(&base, "lora { r: 4 alpha: 8 dropout: 1 }", "lora.dropout is 1");
    expect_create_error(&base, "lora { r: 4 alpha: 8 target_modules: [POST_ATTENTION_LAYERNORM] }",
                        "post_attention_layernorm is not supported");
    /* lora.c's defaults without r and alpha: r = 8 (alpha 16) */
    Peftps__Method *defaults = gc_method("lora {}");
    assert_int_equal(methods_create(&p, defaults, &base.cfg, &base.w, &e), 0);
    assert_int_equal(peft_num_trainable(p),
                     lora_expected(&base.cfg, 8, PEFT_BIT(LW_Q) | PEFT_BIT(LW_V), 2));
    peft_free(p);
    gc_method_free(defaults);
    gc_base_free(&base);
}

static void test_lora_init(void **state) {
    fixture f, g;
    fixture_open(&f, 0, 42,
                 "lora { r: 4 alpha: 8 target_modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, "
                 "UP_PROJ, DOWN_PROJ] }");
    fixture_open(&g, 0, 42,
                 "lora { r: 4 alpha: 8 target_modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, "
                 "UP_PROJ, DOWN_PROJ] }");
    assert_memory_equal(f.p->params, g.p->params, f.p->n_params * sizeof(float));
    for (int i = 0; i < f.p->n_tensors; i++) {
        const peft_tensor *t = &f.p->tensors[i];
        const float *v = peft_param(f.p, i);
        if (strstr(t->name, "lora_B")) {
            for (size_t j = 0; j < t->numel; j++) assert_true(v[j] == 0.0f);
            continue;
        }
        /* kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)) */
        float bound = 1.0f / sqrtf((float)t->shape[1]), lo = 0, hi = 0;
        for (size_t j = 0; j < t->numel; j++) {
            assert_true(fabsf(v[j]) <= bound);
            lo = fminf(lo, v[j]);
            hi = fmaxf(hi, v[j]);
        }
        assert_true(hi > 0.5f * bound && lo < -0.5f * bound);
        if (i >= 2) assert_memory_not_equal(v, peft_param(f.p, i - 2), 16 * sizeof(float));
    }
    fixture_close(&g);
    fixture_open(&g, 0, 43,
                 "lora { r: 4 alpha: 8 target_modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, "
                 "UP_PROJ, DOWN_PROJ] }");
    assert_memory_not_equal(peft_param(f.p, 0), peft_param(g.p, 0), 64 * sizeof(float));
    fixture_close(&g);
    fixture_close(&f);
}

/* The mask the method must draw: one uniform per input element from
 * rng_seed(seed, step, shard, index of lora_A), dropped when below p. */
static void lora_mask(uint64_t seed, uint64_t step, uint64_t shard, int a, float rate, size_t n,
                      float *mask) {
    rng g;
    rng_seed(&g, seed, step, shard, (uint64_t)a);
    for (size_t i = 0; i < n; i++) mask[i] = rng_uniform(&g) < rate ? 0.0f : 1.0f / (1.0f - rate);
}

/* The hooks of one adapted linear against double-precision loops. */
static void lora_hooks_case(int rslora, float dropout, int training) {
    fixture f;
    const int r = 4, n = 10, layer = 1, kind = LW_V, in = 16, out = 8;
    fixture_open(&f, 0, 3, "lora { r: %d alpha: 8 use_rslora: %s dropout: %.9g }", r,
                 rslora ? "true" : "false", dropout);
    peft *p = f.p;
    err e = {{0}};
    assert_int_equal(p->method->reserve(p, 2, 5, &e), 0);
    gc_perturb(p, 0.3f, 9);
    peft_set_step(p, training, 7, 3, 1);
    double s = rslora ? 8.0 / 2.0 : 8.0 / 4.0;
    int ia = tensor(p, "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight");
    int ib = tensor(p, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight");
    const float *A = peft_param(p, ia), *B = peft_param(p, ib);

    float x[10 * 16], y[10 * 8], dy[10 * 8], dx[10 * 16], mask[10 * 16];
    double want_y[10 * 8], want_dx[10 * 16], want_da[4 * 16] = {0}, want_db[8 * 4] = {0};
    random_fill(x, n * in, 1, 1.0f);
    random_fill(y, n * out, 2, 1.0f);
    random_fill(dy, n * out, 3, 1.0f);
    random_fill(dx, n * in, 4, 1.0f);
    for (int i = 0; i < n * in; i++) mask[i] = 1.0f;
    if (training && dropout > 0) lora_mask(7, 3, 1, ia, dropout, n * in, mask);
    for (int t = 0; t < n; t++) {
        double h[4], g[4];
        for (int k = 0; k < r; k++) {
            h[k] = 0;
            for (int i = 0; i < in; i++)
                h[k] += (double)x[t * in + i] * mask[t * in + i] * A[k * in + i];
        }
        for (int o = 0; o < out; o++) {
            double acc = 0;
            for (int k = 0; k < r; k++) acc += h[k] * B[o * r + k];
            want_y[t * out + o] = y[t * out + o] + s * acc;
        }
        for (int k = 0; k < r; k++) {
            g[k] = 0;
            for (int o = 0; o < out; o++) g[k] += (double)dy[t * out + o] * B[o * r + k];
        }
        for (int o = 0; o < out; o++)
            for (int k = 0; k < r; k++) want_db[o * r + k] += s * dy[t * out + o] * h[k];
        for (int k = 0; k < r; k++)
            for (int i = 0; i < in; i++)
                want_da[k * in + i] += s * g[k] * x[t * in + i] * mask[t * in + i];
        for (int i = 0; i < in; i++) {
            double acc = 0;
            for (int k = 0; k < r; k++) acc += g[k] * A[k * in + i];
            want_dx[t * in + i] = dx[t * in + i] + s * acc * mask[t * in + i];
        }
    }
    p->method->linear_forward(p, layer, kind, x, y, n);
    assert_close(y, want_y, (size_t)n * out, 1e-5, "y");
    /* a linear without adapter is left alone */
    float y2[10 * 16], y2_copy[10 * 16];
    random_fill(y2, n * 16, 5, 1.0f);
    memcpy(y2_copy, y2, sizeof y2);
    p->method->linear_forward(p, layer, LW_K, x, y2, n);
    p->method->linear_forward(p, layer, LW_O, x, y2, n);
    assert_memory_equal(y2, y2_copy, sizeof y2);

    peft_zero_grads(p);
    p->method->linear_backward(p, layer, kind, x, dy, dx, n);
    assert_close(dx, want_dx, (size_t)n * in, 1e-5, "dx");
    assert_close(peft_grad(p, ia), want_da, (size_t)r * in, 1e-5, "dA");
    assert_close(peft_grad(p, ib), want_db, (size_t)out * r, 1e-5, "dB");
    for (int i = 0; i < p->n_tensors; i++)
        if (i != ia && i != ib)
            for (size_t j = 0; j < p->tensors[i].numel; j++)
                assert_true(peft_grad(p, i)[j] == 0.0f);

    /* merge: W + s B A */
    float w[8 * 16];
    double want_w[8 * 16];
    memcpy(w, f.base.w.layer[layer][kind], sizeof w);
    for (int o = 0; o < out; o++)
        for (int i = 0; i < in; i++) {
            double acc = 0;
            for (int k = 0; k < r; k++) acc += (double)B[o * r + k] * A[k * in + i];
            want_w[o * in + i] = w[o * in + i] + s * acc;
        }
    assert_int_equal(peft_merge(p, layer, kind, w, &e), 0);
    assert_close(w, want_w, (size_t)out * in, 1e-5, "merged W");
    memcpy(w, f.base.w.layer[0][LW_K], sizeof w);
    assert_int_equal(peft_merge(p, 0, LW_K, w, &e), 0);
    assert_memory_equal(w, f.base.w.layer[0][LW_K], sizeof w);
    fixture_close(&f);
}

static void test_lora_hooks(void **state) {
    lora_hooks_case(0, 0, 0);
    lora_hooks_case(1, 0, 1);    /* rslora: alpha/sqrt(r) */
    lora_hooks_case(0, 0.4f, 1); /* dropout in the branch, forward and backward */
    lora_hooks_case(0, 0.4f, 0); /* not training: no dropout */
}

/* Same (seed, step, shard): the same mask; another step or shard: another. */
static void test_lora_dropout_stream(void **state) {
    fixture f;
    const int n = 10, in = 16, out = 16;
    fixture_open(&f, 0, 3, "lora { r: 4 alpha: 8 dropout: 0.5 }");
    peft *p = f.p;
    err e = {{0}};
    assert_int_equal(p->method->reserve(p, 2, 5, &e), 0);
    gc_perturb(p, 0.3f, 9);
    float x[10 * 16], y[5][10 * 16];
    random_fill(x, n * in, 1, 1.0f);
    const uint64_t steps[5][3] = {{7, 3, 1}, {7, 3, 1}, {7, 4, 1}, {7, 3, 2}, {8, 3, 1}};
    for (int c = 0; c < 5; c++) {
        memset(y[c], 0, sizeof y[c]);
        peft_set_step(p, 1, steps[c][0], steps[c][1], steps[c][2]);
        p->method->linear_forward(p, 0, LW_Q, x, y[c], n);
    }
    assert_memory_equal(y[0], y[1], sizeof y[0]);
    assert_memory_not_equal(y[0], y[2], sizeof y[0]);
    assert_memory_not_equal(y[0], y[3], sizeof y[0]);
    assert_memory_not_equal(y[0], y[4], sizeof y[0]);
    (void)out;
    /* the rate: about half of 160 draws dropped (binomial sd 6.3) */
    float mask[160];
    int dropped = 0;
    lora_mask(7, 3, 1, tensor(p, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
              0.5f, 160, mask);
    for (int i = 0; i < 160; i++) dropped += mask[i] == 0.0f;
    assert_true(dropped > 55 && dropped < 105);
    fixture_close(&f);
}

/* ---- prefix ------------------------------------------------------------- */

static void test_prefix_layout(void **state) {
    fixture f;
    fixture_open(&f, 0, 5, "prefix { num_virtual_tokens: 50 }");
    peft *p = f.p;
    const int td = 2 * 4, row = 2 * 2 * td; /* Hkv*D; L*2*token_dim */
    assert_int_equal(p->n_tensors, 1);
    assert_string_equal(p->tensors[0].name, "prompt_embeddings");
    assert_true(p->tensors[0].ndim == 2 && p->tensors[0].shape[0] == 50 &&
                p->tensors[0].shape[1] == row);
    assert_int_equal(peft_num_trainable(p), 50 * row);
    assert_int_equal(p->first_trainable_layer, 0);
    /* nn.Embedding's N(0, 1) */
    double mean = 0, var = 0;
    const float *v = peft_param(p, 0);
    for (int i = 0; i < 50 * row; i++) mean += v[i];
    mean /= 50 * row;
    for (int i = 0; i < 50 * row; i++) var += (v[i] - mean) * (v[i] - mean);
    var /= 50 * row;
    assert_true(fabs(mean) < 0.1 && var > 0.85 && var < 1.15);

    const float *k, *vv;
    size_t stride;
    assert_int_equal(p->method->prefix(p, 1, &k, &vv, &stride), 50);
    assert_ptr_equal(k, v + 2 * td);
    assert_ptr_equal(vv, v + 3 * td);
    assert_int_equal(stride, row);

    /* gradients land at the same layout, from the caller's stride, and add up */
    float dk[50 * td], dv[50 * td];
    random_fill(dk, 50 * td, 1, 1.0f);
    random_fill(dv, 50 * td, 2, 1.0f);
    peft_zero_grads(p);
    p->method->prefix_backward(p, 1, dk, dv, td);
    p->method->prefix_backward(p, 1, dk, dv, td);
    if (p->method->end_backward) p->method->end_backward(p);
    const float *g = peft_grad(p, 0);
    for (int i = 0; i < 50; i++)
        for (int j = 0; j < row; j++) {
            float want = j >= 2 * td && j < 3 * td   ? 2 * dk[i * td + j - 2 * td]
                         : j >= 3 * td && j < 4 * td ? 2 * dv[i * td + j - 3 * td]
                                                     : 0.0f;
            assert_true(g[i * row + j] == want);
        }
    err e = {{0}};
    float w[16];
    assert_int_equal(peft_merge(p, 0, LW_INPUT_NORM, w, &e), -1);
    assert_non_null(strstr(e.msg, "method prefix changes no base weight, so it cannot be merged"));
    fixture_close(&f);

    gc_base b;
    assert_int_equal(gc_base_create(&b, 0, 1), 0);
    expect_create_error(&b, "prefix { num_virtual_tokens: 0 }",
                        "prefix.num_virtual_tokens must be set");
    gc_base_free(&b);
}

/* table[i] = tanh(E[i] W1^T + b1) W2^T + b2, in double. */
static void prefix_reference(peft *p, double *table, int P, int td, int hid, int row) {
    const float *E = peft_param(p, tensor(p, "prompt_encoder.embedding.weight"));
    const float *W1 = peft_param(p, tensor(p, "prompt_encoder.transform.0.weight"));
    const float *b1 = peft_param(p, tensor(p, "prompt_encoder.transform.0.bias"));
    const float *W2 = peft_param(p, tensor(p, "prompt_encoder.transform.2.weight"));
    const float *b2 = peft_param(p, tensor(p, "prompt_encoder.transform.2.bias"));
    for (int i = 0; i < P; i++) {
        double t[64];
        for (int h = 0; h < hid; h++) {
            double acc = b1[h];
            for (int j = 0; j < td; j++) acc += (double)E[i * td + j] * W1[h * td + j];
            t[h] = tanh(acc);
        }
        for (int o = 0; o < row; o++) {
            double acc = b2[o];
            for (int h = 0; h < hid; h++) acc += t[h] * W2[o * hid + h];
            table[i * row + o] = acc;
        }
    }
}

/* The projection's table against a double reference, and its backward
 * (prefix_backward + end_backward) against central differences of
 * J = sum(table * G) for a fixed random G. */
static void test_prefix_projection(void **state) {
    fixture f;
    const int P = 3, td = 8, hid = 6, row = 32;
    fixture_open(&f, 0, 5, "prefix { num_virtual_tokens: %d projection_hidden: %d }", P, hid);
    peft *p = f.p;
    assert_int_equal(p->n_tensors, 5);
    size_t want = (size_t)P * td + hid * td + hid + (size_t)row * hid + row;
    assert_int_equal(peft_num_trainable(p), want);
    const peft_tensor *w2 = &p->tensors[tensor(p, "prompt_encoder.transform.2.weight")];
    assert_true(w2->shape[0] == row && w2->shape[1] == hid);
    /* PyTorch Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) */
    const float *w1 = peft_param(p, tensor(p, "prompt_encoder.transform.0.weight"));
    for (int i = 0; i < hid * td; i++) assert_true(fabsf(w1[i]) <= 1.0f / sqrtf((float)td));
    const float *pb2 = peft_param(p, tensor(p, "prompt_encoder.transform.2.bias"));
    for (int i = 0; i < row; i++) assert_true(fabsf(pb2[i]) <= 1.0f / sqrtf((float)hid));

    double table[3 * 32];
    prefix_reference(p, table, P, td, hid, row);
    for (int l = 0; l < 2; l++) {
        const float *k, *v;
        size_t stride;
        assert_int_equal(p->method->prefix(p, l, &k, &v, &stride), P);
        assert_int_equal(stride, row);
        for (int i = 0; i < P; i++)
            for (int j = 0; j < td; j++) {
                assert_true(fabs(k[i * stride + j] - table[i * row + 2 * l * td + j]) < 1e-5);
                assert_true(fabs(v[i * stride + j] - table[i * row + (2 * l + 1) * td + j]) < 1e-5);
            }
    }

    float G[3 * 32];
    random_fill(G, (size_t)P * row, 8, 1.0f);
    peft_zero_grads(p);
    for (int l = 0; l < 2; l++)
        p->method->prefix_backward(p, l, G + 2 * l * td, G + (2 * l + 1) * td, row);
    p->method->end_backward(p);
    for (int i = 0; i < p->n_tensors; i++) {
        float *v = peft_param(p, i);
        const float *g = peft_grad(p, i);
        for (size_t j = 0; j < p->tensors[i].numel; j++) {
            float saved = v[j];
            double J[2];
            for (int side = 0; side < 2; side++) {
                v[j] = saved + (side ? -1e-2f : 1e-2f);
                peft_refresh(p);
                prefix_reference(p, table, P, td, hid, row);
                J[side] = 0;
                for (int q = 0; q < P * row; q++) J[side] += table[q] * G[q];
            }
            v[j] = saved;
            double numeric = (J[0] - J[1]) / ((double)(saved + 1e-2f) - (double)(saved - 1e-2f));
            if (fabs(numeric - g[j]) > 1e-3 + 1e-2 * fabs(numeric))
                fail_msg("%s[%zu]: analytic %g, numeric %g", p->tensors[i].name, j, (double)g[j],
                         numeric);
        }
    }
    peft_refresh(p);
    /* end_backward consumed the table gradient: a second one adds nothing */
    float *snapshot = malloc(p->n_params * sizeof(float));
    memcpy(snapshot, p->grads, p->n_params * sizeof(float));
    p->method->end_backward(p);
    assert_memory_equal(snapshot, p->grads, p->n_params * sizeof(float));
    free(snapshot);
    fixture_close(&f);
}

/* ---- full fine-tuning ------------------------------------------------------ */

static size_t full_expected(const model_config *c) {
    size_t C = (size_t)c->hidden_size, q = (size_t)(c->num_heads * c->head_dim);
    size_t kv = (size_t)(c->num_kv_heads * c->head_dim), I = (size_t)c->intermediate_size;
    size_t V = (size_t)c->vocab_size;
    size_t layer = C * q + 2 * C * kv + q * C + 3 * C * I + 2 * C +
                   (c->attention_bias ? q + 2 * kv : 0) + (c->o_bias ? C : 0) +
                   (c->mlp_bias ? 2 * I + C : 0);
    return V * C + C + (c->tie_word_embeddings ? 0 : V * C) + (size_t)c->num_layers * layer;
}

static void test_full_layout(void **state) {
    for (int tied = 0; tied < 2; tied++) {
        fixture f;
        fixture_open(&f, tied, 5, "full {}");
        peft *p = f.p;
        const model_config *c = &f.base.cfg;
        assert_int_equal(p->n_tensors, 2 * 16 + 2 + !tied); /* 16 weights a layer, biases too */
        assert_int_equal(peft_num_trainable(p), full_expected(c));
        assert_int_equal(p->first_trainable_layer, -1);
        assert_int_equal(peft_find_tensor(p, "lm_head.weight") >= 0, !tied);
        const peft_tensor *bias = &p->tensors[tensor(p, "model.layers.1.self_attn.v_proj.bias")];
        assert_true(bias->ndim == 1 && bias->shape[0] == 8);
        bias = &p->tensors[tensor(p, "model.layers.1.self_attn.o_proj.bias")];
        assert_true(bias->ndim == 1 && bias->shape[0] == 16);
        bias = &p->tensors[tensor(p, "model.layers.0.mlp.up_proj.bias")];
        assert_true(bias->ndim == 1 && bias->shape[0] == 24);
        const peft_tensor *norm = &p->tensors[tensor(p, "model.norm.weight")];
        assert_true(norm->ndim == 1 && norm->shape[0] == 16);
        const peft_tensor *o = &p->tensors[tensor(p, "model.layers.0.self_attn.o_proj.weight")];
        assert_true(o->ndim == 2 && o->shape[0] == 16 && o->shape[1] == 16);
        /* every weight starts as the base and is what the model uses */
        for (int l = MODEL_GLOBAL; l < c->num_layers; l++)
            for (int k = 0; k < (l == MODEL_GLOBAL ? GW_COUNT : LW_COUNT); k++) {
                const float *bw = l == MODEL_GLOBAL ? f.base.w.global[k] : f.base.w.layer[l][k];
                const float *w = p->method->weight(p, l, k);
                size_t n = model_weight_shape(c, l, k, 0, 0);
                assert_true(bw != NULL && w != NULL && w != bw);
                assert_memory_equal(w, bw, n * sizeof(float));
            }
        assert_int_equal(p->method->weight(p, MODEL_GLOBAL, GW_LM_HEAD) ==
                             p->method->weight(p, MODEL_GLOBAL, GW_EMBED),
                         tied);
        /* merge hands back the trained weight */
        float *w = peft_param(p, tensor(p, "model.layers.1.mlp.up_proj.weight"));
        w[5] += 1.0f;
        float merged[24 * 16];
        memcpy(merged, f.base.w.layer[1][LW_UP], sizeof merged);
        err e = {{0}};
        assert_int_equal(peft_merge(p, 1, LW_UP, merged, &e), 0);
        assert_memory_equal(merged, w, sizeof merged);
        fixture_close(&f);
    }
}

/* Gradient hooks of full fine-tuning against double loops. */
static void test_full_hooks(void **state) {
    fixture f;
    fixture_open(&f, 1, 5, "full {}");
    peft *p = f.p;
    const int n = 10, C = 16, q = 16, V = 32;
    float x[10 * 16], dy[10 * 32], dx[10 * 16], dx_copy[10 * 16];
    random_fill(x, n * C, 1, 1.0f);
    random_fill(dy, n * V, 2, 1.0f);
    random_fill(dx, n * C, 3, 1.0f);
    memcpy(dx_copy, dx, sizeof dx);
    peft_zero_grads(p);
    p->method->linear_backward(p, 0, LW_Q, x, dy, dx, n);
    assert_memory_equal(dx, dx_copy, sizeof dx); /* the model's share, not the hook's */
    double want[32 * 16];
    for (int o = 0; o < q; o++)
        for (int i = 0; i < C; i++) {
            want[o * C + i] = 0;
            for (int t = 0; t < n; t++) want[o * C + i] += (double)dy[t * q + o] * x[t * C + i];
        }
    assert_close(peft_grad(p, tensor(p, "model.layers.0.self_attn.q_proj.weight")), want,
                 (size_t)q * C, 1e-5, "dWq");
    for (int o = 0; o < q; o++) {
        want[o] = 0;
        for (int t = 0; t < n; t++) want[o] += dy[t * q + o];
    }
    assert_close(peft_grad(p, tensor(p, "model.layers.0.self_attn.q_proj.bias")), want, q, 1e-5,
                 "dbq");
    assert_true(peft_grad(p, tensor(p, "model.layers.0.self_attn.k_proj.bias"))[0] == 0.0f);

    /* norm: sum of dy * xnorm */
    p->method->linear_backward(p, 1, LW_POST_NORM, x, dy, NULL, n);
    for (int i = 0; i < C; i++) {
        want[i] = 0;
        for (int t = 0; t < n; t++) want[i] += (double)dy[t * C + i] * x[t * C + i];
    }
    assert_close(peft_grad(p, tensor(p, "model.layers.1.post_attention_layernorm.weight")), want, C,
                 1e-5, "dnorm");

    /* tied: lm_head's gradient and the embedding rows share one tensor */
    int32_t tokens[10] = {3, 5, 3, 0, 31, 7, 7, 7, 2, 3};
    p->method->linear_backward(p, MODEL_GLOBAL, GW_LM_HEAD, x, dy, NULL, n);
    p->method->embed_backward(p, tokens, x, n);
    for (int v = 0; v < V; v++)
        for (int i = 0; i < C; i++) {
            double acc = 0;
            for (int t = 0; t < n; t++) {
                acc += (double)dy[t * V + v] * x[t * C + i];
                if (tokens[t] == v) acc += x[t * C + i];
            }
            want[0] = acc;
            assert_close(&peft_grad(p, tensor(p, "model.embed_tokens.weight"))[v * C + i], want, 1,
                         1e-5, "dE");
        }
    fixture_close(&f);
}

/* ---- save and load --------------------------------------------------------- */

static void test_save_load(void **state) {
    char dir[] = "/tmp/peftps-test-gradcheck-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[128], path2[128];
    snprintf(path, sizeof path, "%s/qv.safetensors", dir);
    snprintf(path2, sizeof path2, "%s/prefix.safetensors", dir);
    err e = {{0}};
    fixture f, g;
    fixture_open(&f, 0, 1, "lora { r: 4 alpha: 8 }");
    gc_perturb(f.p, 0.3f, 2);
    if (peft_save(f.p, path, &e) < 0) fail_msg("%s", e.msg);

    fixture_open(&g, 0, 2, "lora { r: 4 alpha: 8 }");
    assert_memory_not_equal(f.p->params, g.p->params, f.p->n_params * sizeof(float));
    if (peft_load(g.p, path, &e) < 0) fail_msg("%s", e.msg);
    assert_memory_equal(f.p->params, g.p->params, f.p->n_params * sizeof(float));
    fixture_close(&g);

    /* another rank: the shape error names tensor and shapes; nothing changes */
    fixture_open(&g, 0, 2, "lora { r: 8 alpha: 8 }");
    float *before = malloc(g.p->n_params * sizeof(float));
    memcpy(before, g.p->params, g.p->n_params * sizeof(float));
    assert_int_equal(peft_load(g.p, path, &e), -1);
    assert_non_null(strstr(e.msg, "tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A."
                                  "weight has shape [4, 16], but method lora needs [8, 16]"));
    assert_memory_equal(before, g.p->params, g.p->n_params * sizeof(float));
    free(before);
    fixture_close(&g);

    /* more modules than the file has: the missing tensor is named */
    fixture_open(&g, 0, 2, "lora { r: 4 alpha: 8 target_modules: [Q_PROJ, K_PROJ, V_PROJ] }");
    assert_int_equal(peft_load(g.p, path, &e), -1);
    assert_non_null(
        strstr(e.msg, "has no tensor base_model.model.model.layers.0.self_attn.k_proj.lora_A"));
    fixture_close(&g);
    /* fewer: the surplus tensor is named */
    fixture_open(&g, 0, 2, "lora { r: 4 alpha: 8 layers: [0] }");
    assert_int_equal(peft_load(g.p, path, &e), -1);
    assert_non_null(strstr(e.msg, "tensor base_model.model.model.layers.1."));
    assert_non_null(strstr(e.msg, "is not one that method lora trains"));
    fixture_close(&g);
    /* a PEFT adapter directory, and BF16 tensors (as PEFT may save them) */
    char adapter[160];
    snprintf(adapter, sizeof adapter, "%s/adapter_model.safetensors", dir);
    st_entry entries[8];
    uint16_t *bf = malloc(f.p->n_params * sizeof *bf);
    assert_int_equal(f.p->n_tensors, 8);
    for (int i = 0; i < 8; i++) {
        const peft_tensor *t = &f.p->tensors[i];
        entries[i] = (st_entry){.name = t->name,
                                .dtype = ST_BF16,
                                .ndim = 2,
                                .shape = {t->shape[0], t->shape[1]},
                                .data = bf + t->offset};
        for (size_t j = 0; j < t->numel; j++)
            bf[t->offset + j] = st_f32_to_bf16(f.p->params[t->offset + j]);
    }
    if (st_write(adapter, entries, 8, NULL, &e) < 0) fail_msg("%s", e.msg);
    fixture_open(&g, 0, 2, "lora { r: 4 alpha: 8 }");
    if (peft_load(g.p, dir, &e) < 0) fail_msg("%s", e.msg);
    for (int i = 0; i < 8; i++) {
        const peft_tensor *t = &g.p->tensors[i];
        for (size_t j = 0; j < t->numel; j++) {
            float want = st_bf16_to_f32(bf[t->offset + j]);
            assert_true(g.p->params[t->offset + j] == want);
            assert_true(fabsf(want - f.p->params[t->offset + j]) <=
                        fabsf(f.p->params[t->offset + j]) / 128);
        }
    }
    free(bf);
    fixture_close(&g);
    unlink(adapter);

    char missing[160];
    snprintf(missing, sizeof missing, "%s/none.safetensors", dir);
    assert_int_equal(peft_load(f.p, missing, &e), -1);
    assert_non_null(strstr(e.msg, "none.safetensors"));
    fixture_close(&f);

    /* the projection's table follows a load */
    fixture_open(&f, 0, 1, "prefix { num_virtual_tokens: 3 projection_hidden: 6 }");
    fixture_open(&g, 0, 2, "prefix { num_virtual_tokens: 3 projection_hidden: 6 }");
    if (peft_save(f.p, path2, &e) < 0) fail_msg("%s", e.msg);
    if (peft_load(g.p, path2, &e) < 0) fail_msg("%s", e.msg);
    const float *k1, *k2, *v1, *v2;
    size_t s1, s2;
    f.p->method->prefix(f.p, 1, &k1, &v1, &s1);
    g.p->method->prefix(g.p, 1, &k2, &v2, &s2);
    assert_memory_equal(k1, k2, (2 * s1 + 8) * sizeof(float));
    fixture_close(&g);
    fixture_close(&f);
    unlink(path);
    unlink(path2);
    rmdir(dir);
}

/* ---- through the model ------------------------------------------------------ */

/* LoRA's B starts at zero: the adapted model's logits are the base's, bit
 * for bit, even with dropout on. */
static void test_lora_zero_b_is_base(void **state) {
    gc_base b;
    assert_int_equal(gc_base_create(&b, 0, 1234), 0);
    err e = {{0}};
    model *base = NULL, *m = NULL;
    peft *p = NULL;
    Peftps__Method *meth =
        gc_method("lora { r: 4 alpha: 16 dropout: 0.3 target_modules: [Q_PROJ, K_PROJ, V_PROJ, "
                  "O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ] }");
    int32_t tokens[GC_B * GC_T], labels[GC_B * GC_T];
    gc_batch(&b.cfg, tokens, labels, GC_B, GC_T, 11);
    if (model_create(&base, &b.cfg, &b.w, NULL, GC_B, GC_T, &e) < 0) fail_msg("%s", e.msg);
    if (methods_create(&p, meth, &b.cfg, &b.w, &e) < 0 ||
        model_create(&m, &b.cfg, &b.w, p, GC_B, GC_T, &e) < 0)
        fail_msg("%s", e.msg);
    peft_init(p, 3);
    peft_set_step(p, 1, 7, 3, 1);
    long n1, n2;
    double l1 = model_forward(base, tokens, labels, GC_B, GC_T, &n1);
    double l2 = model_forward(m, tokens, labels, GC_B, GC_T, &n2);
    assert_int_equal(n1, n2);
    assert_int_equal(n1, GC_B * GC_T - 1);
    assert_true(l1 == l2);
    size_t nl = (size_t)GC_B * GC_T * b.cfg.vocab_size;
    assert_memory_equal(model_logits(base), model_logits(m), nl * sizeof(float));
    /* and a non-zero B does change them */
    gc_perturb(p, 0.1f, 4);
    model_forward(m, tokens, labels, GC_B, GC_T, &n2);
    assert_memory_not_equal(model_logits(base), model_logits(m), nl * sizeof(float));
    model_free(m);
    model_free(base);
    peft_free(p);
    gc_method_free(meth);
    gc_base_free(&b);
}

/* Finite differences of every tensor of the method of the block text. */
static void gradcheck(const char *label, int tied, float perturb, int training,
                      const char *method) {
    Peftps__Method *m = gc_method("%s", method);
    gc_opts o = {
        .label = label, .method = m, .tied = tied, .perturb = perturb, .training = training};
    int failures = gc_run(&o);
    gc_method_free(m);
    if (failures != 0)
        fail_msg("%s: %d gradient entries disagree (or setup failed)", label, failures);
}

#define ALL_SEVEN "[Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ]"

static void test_gradcheck_lora(void **state) {
    /* B made non-zero, or A would get no gradient to check */
    gradcheck("lora-qv", 0, 0.1f, 0, "lora { r: 4 alpha: 8 }");
    gradcheck("lora-all", 0, 0.1f, 0, "lora { r: 3 alpha: 6 target_modules: " ALL_SEVEN " }");
    gradcheck("lora-rslora", 0, 0.1f, 0,
              "lora { r: 4 alpha: 8 use_rslora: true target_modules: " ALL_SEVEN " layers: [1] }");
    /* the dropout mask is fixed by (seed, step, shard), so the loss is a
     * deterministic function of the parameters and can be differentiated */
    gradcheck("lora-drop", 1, 0.1f, 1,
              "lora { r: 4 alpha: 8 dropout: 0.3 target_modules: " ALL_SEVEN " }");
}

static void test_gradcheck_prefix(void **state) {
    gradcheck("prefix", 0, 0, 0, "prefix { num_virtual_tokens: 3 }");
    gradcheck("prefix-proj", 0, 0, 0, "prefix { num_virtual_tokens: 3 projection_hidden: 6 }");
}

/* Sequence classification: the score head's gradient, and through it
 * (the gradient of the pooled hidden states) the method's. */
static void gradcheck_cls(const char *label, int K, const char *method) {
    Peftps__Method *m = gc_method("%s", method);
    gc_opts o = {.label = label, .method = m, .perturb = 0.1f, .num_labels = K};
    int failures = gc_run(&o);
    gc_method_free(m);
    if (failures != 0)
        fail_msg("%s: %d gradient entries disagree (or setup failed)", label, failures);
}

static void test_gradcheck_classification(void **state) {
    gradcheck_cls("cls-lora", 3, "lora { r: 3 alpha: 6 target_modules: " ALL_SEVEN " }");
    gradcheck_cls("cls-prefix", 4, "prefix { num_virtual_tokens: 3 }");
    gradcheck_cls("cls-layerwise", 2, "layer_wise { first_layer: 1 last_layer: 1 }");
}

static void test_gradcheck_full(void **state) {
    gradcheck("full", 0, 0, 0, "full {}");
    gradcheck("full-tied", 1, 0, 0, "full {}");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_registry),
        cmocka_unit_test(test_module_helpers),
        cmocka_unit_test(test_tensor_table),
        cmocka_unit_test(test_lora_layout),
        cmocka_unit_test(test_lora_init),
        cmocka_unit_test(test_lora_hooks),
        cmocka_unit_test(test_lora_dropout_stream),
        cmocka_unit_test(test_prefix_layout),
        cmocka_unit_test(test_prefix_projection),
        cmocka_unit_test(test_full_layout),
        cmocka_unit_test(test_full_hooks),
        cmocka_unit_test(test_save_load),
        cmocka_unit_test(test_lora_zero_b_is_base),
        cmocka_unit_test(test_gradcheck_lora),
        cmocka_unit_test(test_gradcheck_prefix),
        cmocka_unit_test(test_gradcheck_full),
        cmocka_unit_test(test_gradcheck_classification),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
