/* The C model against PyTorch: replays every case that
 * tests/reference/make_fixtures.py recorded (logits, summed loss, token
 * count, and the gradients of LoRA, prefix tuning, a layer delta and full
 * fine-tuning) through model.c and the methods of peft.c, printing the
 * worst difference per tensor as llm.c's test does. Also checks the
 * model's call protocol towards the methods with a spy method, batches
 * below capacity, and the errors of model_create/model_forward.
 *
 * Tolerance: the reference is float64, the C model float32 (unit roundoff
 * 6e-8; exp_fast adds 3e-7). Each output sums a few hundred products through
 * two layers, a softmax and a log-softmax; the rounding that accumulates
 * stays near 1e-6 of a tensor's scale (observed: at most 1e-5, on q/k LoRA
 * gradients of the 0.02-std model, where the softmax backward cancels), so
 * a tensor passes when max|c - ref| <= 1e-4 * max|ref| (plus 1e-7 absolute
 * for tensors that are nearly zero). Every case moves the logits by more
 * than 1e-2 of their scale (asserted by the script), so a missing or wrong
 * term cannot hide under the tolerance. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "model/clshead.h"
#include "model/kernels.h"
#include "model/model.h"
#include "model/peft.h"
#include "methods/registry.h"
#include "model/safetensors.h"

#define REF_DIR "tests/fixtures/reference"
#define TINY_DIR "tests/fixtures/tiny-llama"
#define REL_TOL 1e-4
#define ABS_TOL 1e-7

/* ---- fixtures ------------------------------------------------------------------ */

typedef struct fixture {
    st_file *st;
    int B, T, V;
    int32_t *tokens, *labels;
    float *logits;
    double loss_sum;
    long n_tokens;
} fixture;

/* A float tensor of the fixture, converted into a new array. */
static float *fx_floats(const fixture *f, const char *name, size_t *numel) {
    const st_tensor *t = st_find(f->st, name);
    if (!t) fail_msg("%s: no tensor %s", st_path(f->st), name);
    float *x = malloc(t->numel * sizeof *x);
    assert_non_null(x);
    err e;
    if (st_convert_f32(f->st, t, x, &e) < 0) fail_msg("%s", e.msg);
    if (numel) *numel = t->numel;
    return x;
}

static int32_t *fx_ints(const fixture *f, const char *name, int *rows, int *cols) {
    const st_tensor *t = st_find(f->st, name);
    if (!t || t->dtype != ST_I32 || t->ndim != 2)
        fail_msg("%s: %s is missing or not a 2-d I32 tensor", st_path(f->st), name);
    int32_t *x = malloc(t->nbytes);
    assert_non_null(x);
    memcpy(x, t->data, t->nbytes);
    *rows = (int)t->shape[0];
    *cols = (int)t->shape[1];
    return x;
}

static void fx_open(fixture *f, const char *variant, const char *name) {
    char path[512];
    snprintf(path, sizeof path, REF_DIR "/%s/%s.safetensors", variant, name);
    err e;
    memset(f, 0, sizeof *f);
    if (st_open(&f->st, path, &e) < 0) fail_msg("%s", e.msg);
    f->tokens = fx_ints(f, "tokens", &f->B, &f->T);
    int b, t;
    f->labels = fx_ints(f, "labels", &b, &t);
    assert_true(b == f->B && t == f->T);
    size_t n;
    f->logits = fx_floats(f, "logits", &n);
    f->V = (int)(n / ((size_t)f->B * f->T));
    float *loss = fx_floats(f, "loss_sum", NULL);
    f->loss_sum = loss[0];
    free(loss);
    const char *meta = st_metadata_get(f->st, "loss_sum"); /* exact repr of the float64 */
    if (meta) f->loss_sum = strtod(meta, NULL);
    const st_tensor *nt = st_find(f->st, "n_tokens");
    assert_non_null(nt);
    int32_t count;
    memcpy(&count, nt->data, sizeof count);
    f->n_tokens = count;
}

static void fx_close(fixture *f) {
    free(f->tokens);
    free(f->labels);
    free(f->logits);
    st_close(f->st);
}

/* Prints the worst absolute and relative difference, llm.c style, and
 * returns whether the tensor is within tolerance. */
static int compare(const char *label, const float *c, const float *ref, size_t n) {
    double worst = 0.0, scale = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)c[i] - ref[i]);
        if (!(d <= worst)) worst = d, at = i; /* NaN counts as worst */
        scale = fmax(scale, fabs(ref[i]));
    }
    int ok = worst <= REL_TOL * scale + ABS_TOL;
    printf("  %-4s %-66s max|ref| %.3e  worst |diff| %.3e (%.2e rel) at %zu\n", ok ? "OK" : "BAD",
           label, scale, worst, worst / fmax(scale, 1e-30), at);
    return ok;
}

/* ---- methods ------------------------------------------------------------------- */

static const char *model_dir(const char *variant, char *buf, size_t n) {
    if (!strcmp(variant, "tiny-llama")) return TINY_DIR;
    snprintf(buf, n, REF_DIR "/%s", variant);
    return buf;
}

/* The method block of a case, as an experiment's pbtxt would give it. */
typedef struct method_cfg {
    Peftps__Method method;
    Peftps__LoRA lora;
    Peftps__Prefix prefix;
    Peftps__LayerWise layer_wise;
    Peftps__Full full;
    Peftps__Module modules[7];
} method_cfg;

static const Peftps__Method *method_for(method_cfg *mc, const char *name) {
    Peftps__Method m = PEFTPS__METHOD__INIT;
    Peftps__LoRA lora = PEFTPS__LO_RA__INIT;
    Peftps__Prefix prefix = PEFTPS__PREFIX__INIT;
    Peftps__LayerWise lw = PEFTPS__LAYER_WISE__INIT;
    Peftps__Full full = PEFTPS__FULL__INIT;
    mc->method = m, mc->lora = lora, mc->prefix = prefix, mc->layer_wise = lw, mc->full = full;
    if (!strncmp(name, "lora", 4)) {
        mc->method.kind_case = PEFTPS__METHOD__KIND_LORA;
        mc->method.lora = &mc->lora;
        mc->lora.has_r = 1, mc->lora.r = 4;
        mc->lora.has_alpha = 1, mc->lora.alpha = 8.0f;
        if (!strcmp(name, "lora_all")) { /* lora_qv leaves the default q, v */
            for (int i = 0; i < 7; i++)
                mc->modules[i] = (Peftps__Module)(PEFTPS__MODULE__Q_PROJ + i);
            mc->lora.n_target_modules = 7;
            mc->lora.target_modules = mc->modules;
        }
    } else if (!strncmp(name, "prefix", 6)) {
        mc->method.kind_case = PEFTPS__METHOD__KIND_PREFIX;
        mc->method.prefix = &mc->prefix;
        mc->prefix.has_num_virtual_tokens = 1, mc->prefix.num_virtual_tokens = 3;
        if (!strcmp(name, "prefix_proj"))
            mc->prefix.has_projection_hidden = 1, mc->prefix.projection_hidden = 16;
    } else if (!strcmp(name, "layer1")) {
        mc->method.kind_case = PEFTPS__METHOD__KIND_LAYER_WISE;
        mc->method.layer_wise = &mc->layer_wise;
        mc->layer_wise.has_first_layer = 1, mc->layer_wise.first_layer = 1;
        mc->layer_wise.has_last_layer = 1, mc->layer_wise.last_layer = 1;
    } else if (!strcmp(name, "full")) {
        mc->method.kind_case = PEFTPS__METHOD__KIND_FULL;
        mc->method.full = &mc->full;
    } else {
        return NULL; /* "base": no method */
    }
    return &mc->method;
}

/* The method's tensor for a fixture name: the name itself, or the delta of
 * a weight (layer_wise names "<weight>.delta"). */
static int find_tensor(const peft *p, const char *name) {
    int i = peft_find_tensor(p, name);
    if (i >= 0) return i;
    char alt[PEFT_NAME_MAX + 8];
    snprintf(alt, sizeof alt, "%s.delta", name);
    return peft_find_tensor(p, alt);
}

/* ---- one case ----------------------------------------------------------------- */

static int run_case(const char *variant, const char *name) {
    char dirbuf[256], label[256];
    const char *dir = model_dir(variant, dirbuf, sizeof dirbuf);
    printf("%s/%s\n", variant, name);
    fixture f;
    fx_open(&f, variant, name);
    err e;
    model_files *mf;
    if (model_files_open(&mf, dir, &e) < 0) fail_msg("%s", e.msg);
    const model_config *cfg = model_files_config(mf);
    const model_weights *w = model_files_weights(mf);
    /* cls_METHOD: sequence classification (make_cls_fixture.py), whose
     * logits are (B, num_labels) and whose pad is the model's EOS. */
    int cls = !strncmp(name, "cls_", 4), K = 0;
    if (cls) {
        const st_tensor *sc = st_find(f.st, "param:" CLSHEAD_TENSOR);
        assert_non_null(sc);
        K = (int)sc->shape[0];
    } else {
        assert_int_equal(cfg->vocab_size, f.V);
    }

    method_cfg mc;
    const Peftps__Method *mcfg = method_for(&mc, cls ? name + 4 : name);
    peft *p = NULL;
    if (mcfg) {
        if (methods_create(&p, mcfg, cfg, w, &e) < 0) fail_msg("%s/%s: %s", variant, name, e.msg);
        if (cls && clshead_add(p, K, cfg->eos_token_id, 1234, &e) < 0) fail_msg("%s", e.msg);
        peft_init(p, 1234);
    }
    int ok = 1, n_params = 0, n_grads = 0;
    for (int i = 0; i < st_count(f.st); i++) {
        const st_tensor *t = st_tensor_at(f.st, i);
        if (strncmp(t->name, "param:", 6)) continue;
        assert_non_null(p);
        int k = find_tensor(p, t->name + 6);
        if (k < 0) fail_msg("%s/%s: the method has no tensor %s", variant, name, t->name + 6);
        assert_int_equal(p->tensors[k].numel, t->numel);
        if (st_convert_f32(f.st, t, peft_param(p, k), &e) < 0) fail_msg("%s", e.msg);
        n_params++;
    }
    if (p) peft_refresh(p);

    model *m;
    if (model_create(&m, cfg, w, p, f.B, f.T, &e) < 0) fail_msg("%s", e.msg);
    if (p) peft_zero_grads(p);
    long n_tokens = -1;
    double loss = model_forward(m, f.tokens, f.labels, f.B, f.T, &n_tokens);
    assert_int_equal(n_tokens, f.n_tokens);
    double dl = fabs(loss - f.loss_sum);
    int loss_ok = dl <= REL_TOL * fabs(f.loss_sum);
    printf("  %-4s %-66s ref %.9f  c %.9f (%.2e rel)\n", loss_ok ? "OK" : "BAD", "loss_sum",
           f.loss_sum, loss, dl / fabs(f.loss_sum));
    ok &= loss_ok;
    if (cls)
        ok &= compare("class logits", model_class_logits(m), f.logits, (size_t)f.B * K);
    else
        ok &= compare("logits", model_logits(m), f.logits, (size_t)f.B * f.T * f.V);

    if (p) {
        model_backward(m, 1.0f / (float)n_tokens);
        for (int i = 0; i < st_count(f.st); i++) {
            const st_tensor *t = st_tensor_at(f.st, i);
            if (strncmp(t->name, "grad:", 5)) continue;
            int k = find_tensor(p, t->name + 5);
            if (k < 0) fail_msg("%s/%s: the method has no tensor %s", variant, name, t->name + 5);
            assert_int_equal(p->tensors[k].numel, t->numel);
            float *ref = malloc(t->numel * sizeof *ref);
            assert_non_null(ref);
            if (st_convert_f32(f.st, t, ref, &e) < 0) fail_msg("%s", e.msg);
            snprintf(label, sizeof label, "%s", t->name);
            ok &= compare(label, peft_grad(p, k), ref, t->numel);
            free(ref);
            n_grads++;
        }
        /* Every trainable tensor was compared: nothing escapes the check. */
        if (n_grads != p->n_tensors)
            fail_msg("%s/%s: %d gradients in the fixture, %d tensors in the method", variant, name,
                     n_grads, p->n_tensors);
    }
    (void)n_params;
    model_free(m);
    peft_free(p);
    model_files_close(mf);
    fx_close(&f);
    return ok;
}

static void run_variant(const char *variant, const char *const *cases) {
    int ok = 1;
    for (int i = 0; cases[i]; i++) ok &= run_case(variant, cases[i]);
    assert_true(ok);
}

static void test_tiny_llama(void **state) {
    (void)state;
    static const char *const cases[] = {"base",        "lora_qv", "lora_all", "prefix",
                                        "prefix_proj", "layer1",  "full",     NULL};
    run_variant("tiny-llama", cases);
}

/* Sequence classification against transformers' LlamaForSequenceClassification
 * (the score head over the last non-pad token), with LoRA: loss, class
 * logits and every gradient, the head's and the factors' through it. */
static void test_classification(void **state) {
    (void)state;
    static const char *const cases[] = {"cls_lora_qv", NULL};
    run_variant("tiny-llama", cases);
}

static void test_tied(void **state) {
    (void)state;
    static const char *const cases[] = {"base", "lora_qv", "prefix", "full", NULL};
    run_variant("tied", cases);
}

static void test_qwen2_bias(void **state) {
    (void)state;
    static const char *const cases[] = {"base", "lora_all", "layer1", "full", "prefix", NULL};
    run_variant("qwen2", cases);
}

static void test_rope_linear(void **state) {
    (void)state;
    static const char *const cases[] = {"base", "lora_qv", "prefix", NULL};
    run_variant("rope-linear", cases);
}

static void test_rope_llama3(void **state) {
    (void)state;
    static const char *const cases[] = {"base", "lora_qv", "prefix", NULL};
    run_variant("rope-llama3", cases);
}

static void test_head_dim(void **state) {
    (void)state;
    static const char *const cases[] = {"base", "lora_all", "prefix", "full", NULL};
    run_variant("head-dim", cases);
}

/* Llama's attention_bias (q, k, v and o) and mlp_bias (gate, up, down):
 * logits and the gradients of every method, biases of layer_wise and full
 * included, against PyTorch in float64. */
static void test_llama_bias(void **state) {
    (void)state;
    static const char *const cases[] = {"base", "lora_all", "layer1", "full", NULL};
    run_variant("llama-bias", cases);
}

/* ---- batches below capacity, repeated forwards ------------------------------------ */

static void test_partial_batch(void **state) {
    (void)state;
    fixture f;
    fx_open(&f, "tiny-llama", "base");
    err e;
    model_files *mf;
    if (model_files_open(&mf, TINY_DIR, &e) < 0) fail_msg("%s", e.msg);
    model *m;
    if (model_create(&m, model_files_config(mf), model_files_weights(mf), NULL, f.B, f.T, &e) < 0)
        fail_msg("%s", e.msg);
    /* Causal: the first 5 positions of sequence 1 alone give the same logits. */
    int T5 = 5;
    model_forward(m, f.tokens + f.T, NULL, 1, T5, NULL);
    assert_true(compare("logits of (1,5) inside capacity (2,8)", model_logits(m),
                        f.logits + (size_t)f.T * f.V, (size_t)T5 * f.V));
    /* Then the full batch again: nothing left over from the smaller one. */
    long n;
    double loss = model_forward(m, f.tokens, f.labels, f.B, f.T, &n);
    assert_true(compare("logits after a smaller batch", model_logits(m), f.logits,
                        (size_t)f.B * f.T * f.V));
    assert_true(fabs(loss - f.loss_sum) <= REL_TOL * f.loss_sum);
    /* Without labels: loss 0, no tokens counted. */
    n = 7;
    assert_true(model_forward(m, f.tokens, NULL, f.B, f.T, &n) == 0.0);
    assert_int_equal(n, 0);
    model_free(m);
    model_files_close(mf);
    fx_close(&f);
}

/* A method's gradients from a batch below capacity equal those of a model
 * created for exactly that batch: nothing in the backward depends on the
 * capacity. Run with the prefix case, whose positions start at P. */
static void partial_backward_case(const char *name) {
    fixture f;
    fx_open(&f, "tiny-llama", name);
    err e;
    model_files *mf;
    if (model_files_open(&mf, TINY_DIR, &e) < 0) fail_msg("%s", e.msg);
    const model_config *cfg = model_files_config(mf);
    const model_weights *w = model_files_weights(mf);
    method_cfg mc;
    peft *p;
    if (methods_create(&p, method_for(&mc, name), cfg, w, &e) < 0) fail_msg("%s", e.msg);
    peft_init(p, 7);
    peft_refresh(p);
    float *first = malloc(p->n_params * sizeof(float));
    assert_non_null(first);
    int B = 1, T = 5;
    for (int round = 0; round < 2; round++) {
        model *m;
        int capB = round ? B : f.B, capT = round ? T : f.T;
        if (model_create(&m, cfg, w, p, capB, capT, &e) < 0) fail_msg("%s", e.msg);
        peft_zero_grads(p);
        long n;
        double loss = model_forward(m, f.tokens + f.T, f.labels + f.T, B, T, &n);
        assert_true(isfinite(loss) && n > 0);
        model_backward(m, 1.0f);
        if (!round)
            memcpy(first, p->grads, p->n_params * sizeof(float));
        else
            assert_true(compare(name, p->grads, first, p->n_params));
        model_free(m);
    }
    double norm = 0;
    for (size_t i = 0; i < p->n_params; i++) norm += fabs(first[i]);
    assert_true(norm > 0);
    free(first);
    peft_free(p);
    model_files_close(mf);
    fx_close(&f);
}

static void test_partial_backward(void **state) {
    (void)state;
    partial_backward_case("prefix");
    partial_backward_case("lora_all");
    partial_backward_case("full");
}

/* The prefix length is fixed at create: a longer one is refused, not overrun. */
static void test_prefix_grows(void **state);

/* ---- errors --------------------------------------------------------------------- */

static void test_errors(void **state) {
    (void)state;
    err e;
    model_files *mf;
    if (model_files_open(&mf, TINY_DIR, &e) < 0) fail_msg("%s", e.msg);
    model_config bad = *model_files_config(mf);
    const model_weights *w = model_files_weights(mf);
    model *m = NULL;
    bad.num_kv_heads = 3;
    assert_int_equal(model_create(&m, &bad, w, NULL, 1, 4, &e), -1);
    assert_non_null(strstr(e.msg, "kv heads"));
    assert_null(m);
    assert_int_equal(model_create(&m, model_files_config(mf), w, NULL, 0, 4, &e), -1);
    assert_non_null(strstr(e.msg, "capacity"));

    if (model_create(&m, model_files_config(mf), w, NULL, 1, 4, &e) < 0) fail_msg("%s", e.msg);
    int32_t tokens[5] = {1, 2, 3, 4, 5}, labels[4] = {1, -100, 7, 2};
    long n = 9;
    assert_true(isnan(model_forward(m, tokens, labels, 1, 5, &n))); /* T above capacity */
    assert_int_equal(n, 0);
    assert_true(isnan(model_forward(m, tokens, labels, 2, 2, &n))); /* B above capacity */
    tokens[2] = 256;                                                /* vocabulary is 256 */
    assert_true(isnan(model_forward(m, tokens, labels, 1, 4, &n)));
    tokens[2] = 3;
    labels[3] = -1;
    assert_true(isnan(model_forward(m, tokens, labels, 1, 4, &n)));
    labels[3] = 2;
    double loss = model_forward(m, tokens, labels, 1, 4, &n);
    assert_true(isfinite(loss) && loss > 0);
    assert_int_equal(n, 3);
    model_free(m);
    model_files_close(mf);
}

/* ---- the call protocol, seen by a spy method ---------------------------------------- */

/* Records which hooks the model calls, for which (layer, kind), and checks
 * their arguments against the model's shapes. */
typedef struct spy {
    int fwd[8][LW_COUNT], bwd[8][LW_COUNT], gfwd[GW_COUNT], gbwd[GW_COUNT], gweight[GW_COUNT];
    int weight[8][LW_COUNT], prefix_bwd[8], embed, end, P;
    int null_dx[8][LW_COUNT], gnull_dx[GW_COUNT];
    int train_norms;          /* weight() returns the norms: the method trains them */
    float kv[3 * 2 * 2 * 32]; /* prefix table: P rows of L*2*Hkv*D */
} spy;

static spy the_spy;

static const float *spy_weight(peft *p, int layer, int kind) {
    if (layer == MODEL_GLOBAL) {
        the_spy.gweight[kind]++;
        return the_spy.train_norms && kind == GW_FINAL_NORM ? p->base->global[kind] : NULL;
    }
    the_spy.weight[layer][kind]++;
    int norm = kind == LW_INPUT_NORM || kind == LW_POST_NORM;
    return the_spy.train_norms && norm ? p->base->layer[layer][kind] : NULL;
}

static void spy_linear_forward(peft *p, int layer, int kind, const float *x, float *y, int n) {
    if (layer == MODEL_GLOBAL)
        the_spy.gfwd[kind]++;
    else
        the_spy.fwd[layer][kind]++;
}

static void spy_linear_backward(peft *p, int layer, int kind, const float *x, const float *dy,
                                float *dx, int n) {
    if (layer == MODEL_GLOBAL) {
        the_spy.gbwd[kind]++;
        the_spy.gnull_dx[kind] += !dx;
    } else {
        the_spy.bwd[layer][kind]++;
        the_spy.null_dx[layer][kind] += !dx;
    }
}

static void spy_embed_backward(peft *p, const int32_t *tokens, const float *dx, int n) {
    the_spy.embed++;
}

static int spy_prefix(peft *p, int layer, const float **k, const float **v, size_t *stride) {
    if (!the_spy.P) return 0;
    size_t row = (size_t)p->cfg->num_layers * 2 * p->cfg->num_kv_heads * p->cfg->head_dim;
    *k = the_spy.kv + (size_t)layer * 2 * (row / (2 * p->cfg->num_layers));
    *v = *k + row / (2 * p->cfg->num_layers);
    *stride = row;
    return the_spy.P;
}

static void spy_prefix_backward(peft *p, int layer, const float *dk, const float *dv,
                                size_t stride) {
    the_spy.prefix_bwd[layer]++;
}

static void spy_end_backward(peft *p) {
    the_spy.end++;
}

static const peft_method spy_method = {
    .name = "spy",
    .weight = spy_weight,
    .linear_forward = spy_linear_forward,
    .linear_backward = spy_linear_backward,
    .embed_backward = spy_embed_backward,
    .prefix = spy_prefix,
    .prefix_backward = spy_prefix_backward,
    .end_backward = spy_end_backward,
};

/* Runs forward and backward with the spy at first_trainable_layer `first`,
 * a prefix of P rows and trained norms or not, and checks what the model
 * asked and gave. */
static void spy_run(model_files *mf, int first, int P, int train_norms) {
    const model_config *cfg = model_files_config(mf);
    int L = cfg->num_layers;
    assert_true(L <= 8 && (size_t)P * L * 2 * cfg->num_kv_heads * cfg->head_dim <=
                              sizeof the_spy.kv / sizeof(float));
    memset(&the_spy, 0, sizeof the_spy);
    the_spy.P = P;
    the_spy.train_norms = train_norms;
    for (size_t i = 0; i < sizeof the_spy.kv / sizeof(float); i++) the_spy.kv[i] = 0.01f * (i % 7);
    peft p = {.method = &spy_method, .cfg = cfg, .base = model_files_weights(mf)};
    p.first_trainable_layer = first;
    err e;
    model *m;
    if (model_create(&m, cfg, model_files_weights(mf), &p, 2, 6, &e) < 0) fail_msg("%s", e.msg);
    int32_t tokens[12], labels[12];
    for (int i = 0; i < 12; i++)
        tokens[i] = (i * 37) % cfg->vocab_size, labels[i] = i % 5 ? i : -100;
    long n;
    double loss = model_forward(m, tokens, labels, 2, 6, &n);
    assert_true(isfinite(loss));
    assert_int_equal(n, 9);
    static const int linears[] = {LW_Q, LW_K, LW_V, LW_O, LW_GATE, LW_UP, LW_DOWN};
    for (int l = 0; l < L; l++) {
        for (int i = 0; i < 7; i++) {
            assert_int_equal(the_spy.fwd[l][linears[i]], 1);
            assert_true(the_spy.weight[l][linears[i]] >= 1);
        }
        assert_true(the_spy.weight[l][LW_INPUT_NORM] >= 1);
        assert_true(the_spy.weight[l][LW_POST_NORM] >= 1);
        assert_int_equal(the_spy.fwd[l][LW_INPUT_NORM], 0); /* norms are not linears */
    }
    assert_int_equal(the_spy.gfwd[GW_LM_HEAD], 1);
    assert_true(the_spy.gweight[GW_EMBED] >= 1 && the_spy.gweight[GW_FINAL_NORM] >= 1);
    assert_true(the_spy.gweight[GW_LM_HEAD] >= 1); /* untied tiny-llama */
    model_backward(m, 1.0f / (float)n);
    int lo = first < 0 ? 0 : first;
    for (int l = 0; l < L; l++) {
        int want = l >= lo;
        /* The bottom layer's q, k, v input gradient serves only a trained
         * input norm; without one the hooks get dx NULL and the norm's
         * hook is not called. */
        int bottom_frozen = l == first && !train_norms;
        for (int k = 0; k < LW_Q_BIAS; k++) {
            int called = want && !(bottom_frozen && k == LW_INPUT_NORM);
            assert_int_equal(the_spy.bwd[l][k], called);
            int null_dx = bottom_frozen && (k == LW_Q || k == LW_K || k == LW_V);
            assert_int_equal(the_spy.null_dx[l][k], null_dx);
        }
        assert_int_equal(the_spy.prefix_bwd[l], want && P > 0);
    }
    /* Above the last layer, lm_head's input gradient serves only a trained final norm. */
    int head_only = first >= L && !train_norms;
    assert_int_equal(the_spy.gbwd[GW_LM_HEAD], 1);
    assert_int_equal(the_spy.gnull_dx[GW_LM_HEAD], head_only);
    assert_int_equal(the_spy.gbwd[GW_FINAL_NORM], !head_only);
    assert_int_equal(the_spy.gnull_dx[GW_FINAL_NORM], 0);
    assert_int_equal(the_spy.embed, first < 0);
    assert_int_equal(the_spy.end, 1);
    model_free(m);
}

static void test_prefix_grows(void **state) {
    (void)state;
    err e;
    model_files *mf;
    if (model_files_open(&mf, TINY_DIR, &e) < 0) fail_msg("%s", e.msg);
    const model_config *cfg = model_files_config(mf);
    memset(&the_spy, 0, sizeof the_spy);
    the_spy.P = 2;
    peft p = {.method = &spy_method, .cfg = cfg, .base = model_files_weights(mf)};
    model *m;
    if (model_create(&m, cfg, model_files_weights(mf), &p, 1, 4, &e) < 0) fail_msg("%s", e.msg);
    int32_t tokens[4] = {1, 2, 3, 4}, labels[4] = {2, 3, 4, -100};
    long n;
    assert_true(isfinite(model_forward(m, tokens, labels, 1, 4, &n)));
    the_spy.P = 3;
    assert_true(isnan(model_forward(m, tokens, labels, 1, 4, &n)));
    /* A backward after a refused forward does nothing. */
    model_backward(m, 1.0f);
    assert_int_equal(the_spy.end, 0);
    model_free(m);
    model_files_close(mf);
}

static void test_protocol(void **state) {
    (void)state;
    err e;
    model_files *mf;
    if (model_files_open(&mf, TINY_DIR, &e) < 0) fail_msg("%s", e.msg);
    for (int norms = 0; norms <= 1; norms++) {
        spy_run(mf, -1, 0, norms); /* the embedding trains: everything runs */
        spy_run(mf, 0, 2, norms);  /* a prefix: every layer, not the embedding */
        spy_run(mf, 1, 0, norms);  /* layer 1 and above only */
        spy_run(mf, 2, 0, norms);  /* above the last layer: final norm and lm_head */
    }
    model_files_close(mf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tiny_llama),       cmocka_unit_test(test_tied),
        cmocka_unit_test(test_qwen2_bias),       cmocka_unit_test(test_rope_linear),
        cmocka_unit_test(test_rope_llama3),      cmocka_unit_test(test_head_dim),
        cmocka_unit_test(test_llama_bias),       cmocka_unit_test(test_partial_batch),
        cmocka_unit_test(test_errors),           cmocka_unit_test(test_protocol),
        cmocka_unit_test(test_partial_backward), cmocka_unit_test(test_prefix_grows),
        cmocka_unit_test(test_classification),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
