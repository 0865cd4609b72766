/* Tests of the delta methods (layerwise.c, heads.c, subnet.c over delta.c):
 * finite-difference checks of every tensor through the tiny model of
 * gradcheck.h (GQA, with and without attention biases), their gradients
 * against the dense weight gradient, where backward stops, the three mask
 * selections and the head ranking against independent computations, merge,
 * and the configuration errors. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "methods/delta.h"
#include "gradcheck.h"
#include "methods/registry.h"
#include "model/peft.h"
#include "base/rng.h"

/* Calibration batch i of the tiny model. */
static int batch_fn(void *ctx, int i, int32_t *tokens, int32_t *labels, err *e) {
    (void)e;
    gc_batch(ctx, tokens, labels, GC_B, GC_T, 100 + (uint64_t)i);
    return 0;
}

#define CALIB_BATCHES 3

typedef struct fx {
    gc_base b;
    Peftps__Method *meth; /* the method block p keeps */
    peft *p;
    model *m;
    int32_t tokens[GC_B * GC_T], labels[GC_B * GC_T];
} fx;

/* The tiny base (GQA: 4 query heads on 2 kv heads), with its attention
 * biases or, bias = 0, as a model without them. */
static void fx_base(fx *f, int bias) {
    memset(f, 0, sizeof *f);
    assert_int_equal(gc_base_create(&f->b, 0, 1234), 0);
    if (!bias) {
        f->b.cfg.attention_bias = f->b.cfg.o_bias = f->b.cfg.mlp_bias = 0;
        for (int l = 0; l < f->b.cfg.num_layers; l++)
            for (int k = LW_Q_BIAS; k <= LW_DOWN_BIAS; k++) f->b.layers[l][k] = NULL;
    }
    gc_batch(&f->b.cfg, f->tokens, f->labels, GC_B, GC_T, 11);
}

/* Creates the method of the block text (printf-style, see gc_method) and
 * its model; calibrates when asked; inits (zero deltas) with `seed`. */
static void fx_method(fx *f, int calibrate, uint64_t seed, const char *fmt, ...) {
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    err e = {{0}};
    f->meth = gc_method("%s", text);
    if (methods_create(&f->p, f->meth, &f->b.cfg, &f->b.w, &e) < 0) fail_msg("create: %s", e.msg);
    if (model_create(&f->m, &f->b.cfg, &f->b.w, f->p, GC_B, GC_T, &e) < 0)
        fail_msg("model: %s", e.msg);
    if (calibrate && peft_calibrate(f->p, f->m, batch_fn, &f->b.cfg, CALIB_BATCHES, &e) < 0)
        fail_msg("calibrate: %s", e.msg);
    peft_init(f->p, seed);
}

static void fx_close_method(fx *f) {
    if (f->m) model_free(f->m);
    peft_free(f->p);
    gc_method_free(f->meth);
    f->m = NULL;
    f->p = NULL;
    f->meth = NULL;
}

static void fx_close(fx *f) {
    fx_close_method(f);
    gc_base_free(&f->b);
}

static int tensor(const peft *p, const char *name) {
    int i = peft_find_tensor(p, name);
    if (i < 0) fail_msg("no tensor %s", name);
    return i;
}

static void assert_shape(const peft *p, const char *name, int ndim, int64_t d0, int64_t d1) {
    const peft_tensor *t = &p->tensors[tensor(p, name)];
    if (t->ndim != ndim || t->shape[0] != d0 || (ndim > 1 && t->shape[1] != d1))
        fail_msg("%s: shape %lld x %lld (%d dims), want %lld x %lld (%d dims)", name,
                 (long long)t->shape[0], (long long)(t->ndim > 1 ? t->shape[1] : 0), t->ndim,
                 (long long)d0, (long long)d1, ndim);
}

/* Finite differences of every tensor at a point where the deltas are not zero. */
static void gradcheck(fx *f, const char *label) {
    gc_perturb(f->p, 0.05f, 5);
    peft_set_step(f->p, 1, 7, 3, 1);
    int failures = gc_check(f->p, f->m, f->tokens, f->labels, 12, label);
    assert_int_equal(failures, 0);
}

/* The dense gradient of every weight of both layers, q..down and norms (and
 * biases when present), at the zero delta: the reference that the restricted
 * methods' gradients must be sub-blocks or entries of. */
typedef struct dense_ref {
    fx f;
} dense_ref;

static void dense_open(dense_ref *d, fx *like) {
    memset(d, 0, sizeof *d);
    d->f.b = like->b; /* shares the base: never freed through d */
    memcpy(d->f.tokens, like->tokens, sizeof d->f.tokens);
    memcpy(d->f.labels, like->labels, sizeof d->f.labels);
    fx_method(&d->f, 0, 1, "layer_wise { first_layer: 0 last_layer: 1 }");
    peft_zero_grads(d->f.p);
    long n;
    model_forward(d->f.m, d->f.tokens, d->f.labels, GC_B, GC_T, &n);
    model_backward(d->f.m, 1.0f);
}

static const float *dense_grad(dense_ref *d, int layer, int kind) {
    char w[PEFT_NAME_MAX], name[PEFT_NAME_MAX + 8];
    model_weight_name(&d->f.b.cfg, layer, kind, w, sizeof w);
    snprintf(name, sizeof name, "%s.delta", w);
    return peft_grad(d->f.p, tensor(d->f.p, name));
}

static void dense_close(dense_ref *d) {
    fx_close_method(&d->f);
}

static void assert_near(double got, double want, double tol, const char *what, size_t at) {
    if (fabs(got - want) > tol * (1.0 + fabs(want)))
        fail_msg("%s[%zu]: got %.8g, want %.8g", what, at, got, want);
}

/* ---- layer-wise ------------------------------------------------------------ */

static void test_layerwise_layout(void **state) {
    (void)state;
    fx f;
    fx_base(&f, 1);
    /* Defaults: the last layer, all nine modules plus the seven biases
     * (q/k/v, o, gate/up/down). */
    fx_method(&f, 0, 1, "layer_wise {}");
    assert_int_equal(f.p->n_tensors, 16);
    assert_int_equal(f.p->first_trainable_layer, 1);
    assert_shape(f.p, "model.layers.1.self_attn.q_proj.weight.delta", 2, 16, 16);
    assert_shape(f.p, "model.layers.1.self_attn.k_proj.weight.delta", 2, 8, 16);
    assert_shape(f.p, "model.layers.1.self_attn.o_proj.weight.delta", 2, 16, 16);
    assert_shape(f.p, "model.layers.1.mlp.down_proj.weight.delta", 2, 16, 24);
    assert_shape(f.p, "model.layers.1.input_layernorm.weight.delta", 1, 16, 0);
    assert_shape(f.p, "model.layers.1.post_attention_layernorm.weight.delta", 1, 16, 0);
    assert_shape(f.p, "model.layers.1.self_attn.v_proj.bias.delta", 1, 8, 0);
    assert_shape(f.p, "model.layers.1.self_attn.o_proj.bias.delta", 1, 16, 0);
    assert_shape(f.p, "model.layers.1.mlp.gate_proj.bias.delta", 1, 24, 0);
    assert_shape(f.p, "model.layers.1.mlp.down_proj.bias.delta", 1, 16, 0);
    assert_int_equal(peft_find_tensor(f.p, "model.layers.0.self_attn.q_proj.weight.delta"), -1);
    /* 256+128+128+256 + 3*384 + 2*16 + 16+8+8 + 16 + 24+24+16 */
    assert_int_equal(peft_num_trainable(f.p), 768 + 1152 + 32 + 32 + 16 + 64);
    /* Zero deltas: the effective weights are the base. */
    const float *w = f.p->method->weight(f.p, 1, LW_UP);
    assert_non_null(w);
    assert_memory_equal(w, f.b.layers[1][LW_UP], 24 * 16 * sizeof(float));
    assert_null(f.p->method->weight(f.p, 0, LW_UP));
    assert_null(f.p->method->weight(f.p, MODEL_GLOBAL, GW_EMBED));
    fx_close_method(&f);

    /* first_layer alone reaches the last layer; chosen modules only. */
    fx_method(&f, 0, 1,
              "layer_wise { first_layer: 0 modules: [V_PROJ, POST_ATTENTION_LAYERNORM] }");
    assert_int_equal(f.p->n_tensors, 6); /* v, its bias and the norm, in 2 layers */
    assert_int_equal(f.p->first_trainable_layer, 0);
    assert_shape(f.p, "model.layers.0.self_attn.v_proj.bias.delta", 1, 8, 0);
    fx_close(&f);
}

static void test_gradcheck_layerwise_bias(void **state) {
    (void)state;
    fx f;
    fx_base(&f, 1);
    fx_method(&f, 0, 1, "layer_wise { first_layer: 0 last_layer: 1 }");
    assert_int_equal(f.p->n_tensors, 32);
    gradcheck(&f, "layer_wise");
    fx_close(&f);
}

static void test_gradcheck_layerwise_nobias(void **state) {
    (void)state;
    fx f;
    fx_base(&f, 0);
    fx_method(&f, 0, 1,
              "layer_wise { first_layer: 1 last_layer: 1 modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, "
              "GATE_PROJ, UP_PROJ, DOWN_PROJ, INPUT_LAYERNORM, POST_ATTENTION_LAYERNORM] }");
    assert_int_equal(f.p->n_tensors, 9);
    assert_int_equal(peft_find_tensor(f.p, "model.layers.1.self_attn.q_proj.bias.delta"), -1);
    gradcheck(&f, "layer_wise");
    fx_close(&f);
}

/* A wrapper that counts the hook's calls per layer. */
static peft_method counting;
static int calls_per_layer[4];
static void counting_backward(peft *p, int layer, int kind, const float *x, const float *dy,
                              float *dx, int n) {
    if (layer >= 0) calls_per_layer[layer]++;
    layerwise_method.linear_backward(p, layer, kind, x, dy, dx, n);
}

static void backward_calls(fx *f, int first, int *out) {
    fx_method(f, 0, 1, "layer_wise { first_layer: %d last_layer: 1 }", first);
    counting = layerwise_method;
    counting.linear_backward = counting_backward;
    f->p->method = &counting;
    memset(calls_per_layer, 0, sizeof calls_per_layer);
    long n;
    peft_zero_grads(f->p);
    model_forward(f->m, f->tokens, f->labels, GC_B, GC_T, &n);
    model_backward(f->m, 1.0f);
    memcpy(out, calls_per_layer, 2 * sizeof *out);
    fx_close_method(f);
}

static void test_layerwise_stops_at_first_layer(void **state) {
    (void)state;
    fx f;
    int calls[2];
    fx_base(&f, 1);
    backward_calls(&f, 1, calls);
    assert_int_equal(calls[0], 0);
    assert_int_equal(calls[1], 9); /* 7 linears and 2 norms */
    backward_calls(&f, 0, calls);
    assert_int_equal(calls[0], 9);
    assert_int_equal(calls[1], 9);
    fx_close(&f);
}

/* ---- attention heads ------------------------------------------------------- */

/* Heads 0 and 1 share kv head 0: k and v train that kv head once. */
static void test_heads_layout_gqa(void **state) {
    (void)state;
    fx f;
    fx_base(&f, 1);
    fx_method(&f, 0, 1, "attention_heads { layers: [1] heads: [1, 0] }");
    assert_int_equal(f.p->n_tensors, 4);
    assert_int_equal(f.p->first_trainable_layer, 1);
    assert_shape(f.p, "model.layers.1.self_attn.q_proj.heads.delta", 2, 8, 16);
    assert_shape(f.p, "model.layers.1.self_attn.k_proj.heads.delta", 2, 4, 16);
    assert_shape(f.p, "model.layers.1.self_attn.v_proj.heads.delta", 2, 4, 16);
    assert_shape(f.p, "model.layers.1.self_attn.o_proj.heads.delta", 2, 16, 8);
    int L[4], H[4];
    assert_int_equal(heads_chosen(f.p, L, H, 4), 2);
    assert_true(L[0] == 1 && H[0] == 0 && L[1] == 1 && H[1] == 1);
    assert_true(heads_importance(f.p, 1, 0) < 0); /* explicit: nothing measured */
    fx_close_method(&f);

    /* Heads 1 and 2 sit on different kv heads; only k and o. */
    fx_method(&f, 0, 1, "attention_heads { heads: [1, 2] projections: [K_PROJ, O_PROJ] }");
    assert_int_equal(f.p->n_tensors, 4);
    assert_int_equal(f.p->first_trainable_layer, 0);
    assert_shape(f.p, "model.layers.0.self_attn.k_proj.heads.delta", 2, 8, 16);
    assert_shape(f.p, "model.layers.1.self_attn.o_proj.heads.delta", 2, 16, 8);
    assert_int_equal(peft_find_tensor(f.p, "model.layers.0.self_attn.q_proj.heads.delta"), -1);
    assert_int_equal(heads_chosen(f.p, NULL, NULL, 0), 4);
    fx_close(&f);
}

static void test_gradcheck_heads(void **state) {
    (void)state;
    fx f;
    fx_base(&f, 1);
    fx_method(&f, 0, 1, "attention_heads { heads: [0, 1, 3] }");
    gradcheck(&f, "heads");
    fx_close_method(&f);
    fx_close(&f);
    fx_base(&f, 0);
    fx_method(&f, 0, 1, "attention_heads { heads: [2] }");
    gradcheck(&f, "heads/nobias");
    fx_close(&f);
}

/* At the zero delta, each head tensor's gradient is the matching rows or
 * columns of the dense weight gradient. */
static void test_heads_match_dense(void **state) {
    (void)state;
    fx f;
    dense_ref d;
    fx_base(&f, 1);
    dense_open(&d, &f);
    uint32_t h13[2] = {1, 3}; /* kv heads 0 and 1 */
    fx_method(&f, 0, 1, "attention_heads { heads: [%u, %u] }", h13[0], h13[1]);
    peft_zero_grads(f.p);
    long n;
    model_forward(f.m, f.tokens, f.labels, GC_B, GC_T, &n);
    model_backward(f.m, 1.0f);
    int D = 4, C = 16, kv[2] = {0, 1};
    for (int l = 0; l < 2; l++) {
        char name[PEFT_NAME_MAX];
        static const char *proj[4] = {"q", "k", "v", "o"};
        for (int k = LW_Q; k <= LW_O; k++) {
            snprintf(name, sizeof name, "model.layers.%d.self_attn.%s_proj.heads.delta", l,
                     proj[k]);
            const float *g = peft_grad(f.p, tensor(f.p, name)), *ref = dense_grad(&d, l, k);
            for (int b = 0; b < 2; b++) {
                int h = k == LW_Q || k == LW_O ? (int)h13[b] : kv[b];
                for (int r = 0; r < D; r++)
                    for (int c = 0; c < C; c++) {
                        double got = k == LW_O ? g[c * 2 * D + b * D + r] : g[(b * D + r) * C + c];
                        double want =
                            k == LW_O ? ref[c * 16 + h * D + r] : ref[(h * D + r) * C + c];
                        assert_near(got, want, 1e-5, name, (size_t)(r * C + c));
                    }
            }
        }
    }
    dense_close(&d);
    fx_close(&f);
}

/* The gate gradient of head h of layer l, by central differences: scaling
 * head h's o_proj columns by g scales its output by g. Mean loss per batch,
 * summed |.| over the calibration batches, as calibrate defines it. */
static double fd_importance(fx *f, int l, int h) {
    const model_config *cfg = &f->b.cfg;
    int C = cfg->hidden_size, QD = cfg->num_heads * cfg->head_dim, D = cfg->head_dim;
    float *wo = malloc((size_t)C * QD * sizeof(float));
    const float *(*layers)[LW_COUNT] = malloc((size_t)cfg->num_layers * sizeof *layers);
    assert_non_null(wo);
    assert_non_null(layers);
    memcpy(layers, f->b.layers, (size_t)cfg->num_layers * sizeof *layers);
    layers[l][LW_O] = wo;
    model_weights w = f->b.w;
    w.layer = layers;
    model *m;
    err e = {{0}};
    assert_int_equal(model_create(&m, cfg, &w, NULL, GC_B, GC_T, &e), 0);
    const double eps = 2e-3;
    double total = 0;
    for (int i = 0; i < CALIB_BATCHES; i++) {
        int32_t tokens[GC_B * GC_T], labels[GC_B * GC_T];
        batch_fn((void *)cfg, i, tokens, labels, &e);
        double loss[2];
        for (int s = 0; s < 2; s++) {
            memcpy(wo, f->b.layers[l][LW_O], (size_t)C * QD * sizeof(float));
            float g = (float)(s == 0 ? 1 + eps : 1 - eps);
            for (int r = 0; r < C; r++)
                for (int c = h * D; c < (h + 1) * D; c++) wo[r * QD + c] *= g;
            long n;
            loss[s] = model_forward(m, tokens, labels, GC_B, GC_T, &n) / (double)n;
        }
        total += fabs((loss[0] - loss[1]) / (2 * eps));
    }
    model_free(m);
    free(layers);
    free(wo);
    return total;
}

typedef struct ranked {
    double v;
    int i;
} ranked;

static int by_value_desc(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->i - y->i;
}

static void test_heads_top_k(void **state) {
    (void)state;
    fx f;
    fx_base(&f, 1);
    const int K = 3, LH = 8;
    fx_method(&f, 1, 1, "attention_heads { top_k: %d }", K);
    ranked fd[8], mine[8];
    for (int i = 0; i < LH; i++) {
        fd[i] = (ranked){fd_importance(&f, i / 4, i % 4), i};
        mine[i] = (ranked){heads_importance(f.p, i / 4, i % 4), i};
        printf("head %d.%d: importance %.6f, finite differences %.6f\n", i / 4, i % 4, mine[i].v,
               fd[i].v);
        assert_near(mine[i].v, fd[i].v, 2e-3, "importance", (size_t)i);
    }
    qsort(fd, LH, sizeof *fd, by_value_desc);
    qsort(mine, LH, sizeof *mine, by_value_desc);
    /* The finite differences must separate the top K from the rest clearly
     * enough for the comparison of sets to mean something. */
    assert_true(fd[K - 1].v - fd[K].v > 1e-3 * (1 + fd[K].v));
    int want[8] = {0}, got_l[8], got_h[8];
    for (int i = 0; i < K; i++) want[fd[i].i] = 1;
    assert_int_equal(heads_chosen(f.p, got_l, got_h, 8), K);
    int lowest = 2;
    for (int i = 0; i < K; i++) {
        int at = got_l[i] * 4 + got_h[i];
        if (!want[at])
            fail_msg("chose head %d.%d outside the brute-force top %d", got_l[i], got_h[i], K);
        if (i > 0) assert_true(got_l[i] * 4 + got_h[i] > got_l[i - 1] * 4 + got_h[i - 1]);
        if (got_l[i] < lowest) lowest = got_l[i];
        assert_true(mine[i].i == fd[i].i);
    }
    assert_int_equal(f.p->first_trainable_layer, lowest);
    /* Tensors exist for the chosen heads, and they train. */
    assert_true(f.p->n_tensors >= 4);
    gradcheck(&f, "heads/top_k");
    fx_close(&f);
}

/* ---- subnetwork ------------------------------------------------------------ */

/* Every values tensor's indices: count, sorted, distinct, in range. */
static void assert_masks_valid(const peft *p, const model_config *cfg, float sparsity) {
    for (int t = 0; t < p->n_tensors; t++) {
        size_t k;
        const uint32_t *idx = subnet_indices(p, t, &k);
        if (!idx) fail_msg("%s has no mask", p->tensors[t].name);
        assert_int_equal(k, p->tensors[t].numel);
        int layer = -1, kind = -1;
        for (int l = 0; l < cfg->num_layers && kind < 0; l++)
            for (int w = 0; w < LW_COUNT && kind < 0; w++) {
                char name[PEFT_NAME_MAX + 16], hf[PEFT_NAME_MAX];
                model_weight_name(cfg, l, w, hf, sizeof hf);
                snprintf(name, sizeof name, "%s.sparse_values", hf);
                if (!strcmp(name, p->tensors[t].name)) layer = l, kind = w;
            }
        assert_true(kind >= 0);
        size_t numel = model_weight_shape(cfg, layer, kind, NULL, NULL);
        assert_int_equal(k, (size_t)llround((1.0 - (double)sparsity) * (double)numel));
        for (size_t i = 0; i < k; i++) {
            assert_true(idx[i] < numel);
            if (i > 0) assert_true(idx[i] > idx[i - 1]);
        }
    }
}

static int by_key_desc(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->i - y->i;
}

static int by_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* The k largest of score (n), ties by index, as sorted indices: by sorting. */
static uint32_t *top_k_by_sorting(const double *score, size_t n, size_t k) {
    ranked *r = malloc(n * sizeof *r);
    uint32_t *idx = malloc(k * sizeof *idx);
    assert_non_null(r);
    assert_non_null(idx);
    for (size_t i = 0; i < n; i++) r[i] = (ranked){score[i], (int)i};
    qsort(r, n, sizeof *r, by_key_desc);
    for (size_t i = 0; i < k; i++) idx[i] = (uint32_t)r[i].i;
    qsort(idx, k, sizeof *idx, by_u32);
    free(r);
    return idx;
}

static void test_subnet_magnitude(void **state) {
    (void)state;
    fx f;
    fx_base(&f, 1);
    fx_method(&f, 0, 1, "subnetwork { sparsity: 0.9 selection: MAGNITUDE }");
    assert_int_equal(f.p->n_tensors, 14); /* q..down of 2 layers */
    assert_int_equal(f.p->first_trainable_layer, 0);
    /* k_proj has 8*16 = 128 entries: round(12.8) = 13 train. */
    assert_shape(f.p, "model.layers.0.self_attn.k_proj.weight.sparse_values", 1, 13, 0);
    assert_masks_valid(f.p, &f.b.cfg, 0.9f);
    for (int l = 0; l < 2; l++)
        for (int kind = LW_Q; kind <= LW_DOWN; kind++) {
            char hf[PEFT_NAME_MAX], name[PEFT_NAME_MAX + 16];
            model_weight_name(&f.b.cfg, l, kind, hf, sizeof hf);
            snprintf(name, sizeof name, "%s.sparse_values", hf);
            size_t k, n = model_weight_shape(&f.b.cfg, l, kind, NULL, NULL);
            const uint32_t *idx = subnet_indices(f.p, tensor(f.p, name), &k);
            double *mag = malloc(n * sizeof *mag);
            assert_non_null(mag);
            for (size_t i = 0; i < n; i++) mag[i] = fabs((double)f.b.layers[l][kind][i]);
            uint32_t *want = top_k_by_sorting(mag, n, k);
            assert_memory_equal(idx, want, k * sizeof *idx);
            free(want);
            free(mag);
        }
    fx_close(&f);
}

/* Ties go to the lower index, and the selection is exact on awkward values. */
static void test_select_largest(void **state) {
    (void)state;
    float v[12] = {1, -3, 3, 0, -0.0f, 2, -3, 1e-30f, 7, 3, -7, 0.5f};
    uint32_t idx[12];
    delta_select_largest(v, 12, 4, idx); /* 7 (8), -7 (10), then 3s: 1, 2 */
    uint32_t want4[4] = {1, 2, 8, 10};
    assert_memory_equal(idx, want4, sizeof want4);
    delta_select_largest(v, 12, 11, idx); /* all but one of the two zeros: 4 goes */
    uint32_t want11[11] = {0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11};
    assert_memory_equal(idx, want11, sizeof want11);
    delta_select_largest(v, 12, 1, idx);
    assert_int_equal(idx[0], 8);
}

static void test_subnet_random(void **state) {
    (void)state;
    fx f, g;
    fx_base(&f, 1);
    fx_base(&g, 1);
    const char *random75 =
        "subnetwork { sparsity: 0.75 selection: RANDOM modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, "
        "GATE_PROJ, UP_PROJ, DOWN_PROJ, INPUT_LAYERNORM, POST_ATTENTION_LAYERNORM] }";
    fx_method(&f, 0, 42, random75);
    fx_method(&g, 0, 42, random75);
    assert_int_equal(f.p->n_tensors, 18);
    assert_masks_valid(f.p, &f.b.cfg, 0.75f);
    for (int t = 0; t < f.p->n_tensors; t++) {
        size_t k1, k2;
        const uint32_t *a = subnet_indices(f.p, t, &k1), *b = subnet_indices(g.p, t, &k2);
        assert_int_equal(k1, k2);
        assert_memory_equal(a, b, k1 * sizeof *a);
    }
    fx_close_method(&g);
    fx_method(&g, 0, 43, random75);
    int differ = 0;
    for (int t = 0; t < f.p->n_tensors; t++) {
        size_t k1, k2;
        const uint32_t *a = subnet_indices(f.p, t, &k1), *b = subnet_indices(g.p, t, &k2);
        differ += memcmp(a, b, k1 * sizeof *a) != 0;
    }
    assert_true(differ >= f.p->n_tensors - 2);
    /* Not the magnitude mask in disguise. */
    fx_close_method(&g);
    fx_method(
        &g, 0, 42,
        "subnetwork { sparsity: 0.75 selection: MAGNITUDE modules: [Q_PROJ, K_PROJ, V_PROJ, "
        "O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ, INPUT_LAYERNORM, POST_ATTENTION_LAYERNORM] }");
    size_t k1;
    const uint32_t *a = subnet_indices(f.p, 0, &k1), *b = subnet_indices(g.p, 0, &k1);
    assert_true(memcmp(a, b, k1 * sizeof *a) != 0);
    fx_close(&g);

    /* A new mask (init again, another seed) leaves no trace of the old
     * trained entries in the effective weights. */
    gc_perturb(f.p, 0.3f, 9);
    assert_true(memcmp(f.p->method->weight(f.p, 0, LW_Q), f.b.layers[0][LW_Q], 256 * 4) != 0);
    peft_init(f.p, 7);
    for (int l = 0; l < 2; l++)
        for (int kind = LW_Q; kind <= LW_POST_NORM; kind++) {
            size_t n = model_weight_shape(&f.b.cfg, l, kind, NULL, NULL);
            assert_memory_equal(f.p->method->weight(f.p, l, kind), f.b.layers[l][kind],
                                n * sizeof(float));
        }
    fx_close(&f);
}

/* The mask of squared gradients summed over the calibration batches, with
 * the dense gradients taken independently through the layer-wise method. */
static void test_subnet_gradient(void **state) {
    (void)state;
    fx f, d;
    fx_base(&f, 1);
    fx_base(&d, 1);
    const float sparsity = 0.8f;
    fx_method(&f, 1, 1, "subnetwork { sparsity: %.9g selection: GRADIENT }", sparsity);
    assert_masks_valid(f.p, &f.b.cfg, sparsity);
    fx_method(&d, 0, 1,
              "layer_wise { first_layer: 0 last_layer: 1 modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, "
              "GATE_PROJ, UP_PROJ, DOWN_PROJ] }");
    double *fisher = calloc(d.p->n_params, sizeof *fisher);
    assert_non_null(fisher);
    for (int i = 0; i < CALIB_BATCHES; i++) {
        int32_t tokens[GC_B * GC_T], labels[GC_B * GC_T];
        err e;
        batch_fn(&d.b.cfg, i, tokens, labels, &e);
        long n;
        peft_zero_grads(d.p);
        model_forward(d.m, tokens, labels, GC_B, GC_T, &n);
        model_backward(d.m, 1.0f / (float)n);
        for (size_t j = 0; j < d.p->n_params; j++)
            fisher[j] += (double)d.p->grads[j] * d.p->grads[j];
    }
    int linears = 0;
    for (int t = 0; t < d.p->n_tensors; t++) {
        const peft_tensor *dt = &d.p->tensors[t];
        if (dt->ndim != 2) continue; /* biases */
        linears++;
        char name[PEFT_NAME_MAX + 16];
        snprintf(name, sizeof name, "%.*s.sparse_values", (int)(strlen(dt->name) - 6), dt->name);
        size_t k;
        const uint32_t *idx = subnet_indices(f.p, tensor(f.p, name), &k);
        uint32_t *want = top_k_by_sorting(fisher + dt->offset, dt->numel, k);
        if (memcmp(idx, want, k * sizeof *idx))
            fail_msg("%s: not the top-k of squared gradients", name);
        free(want);
    }
    assert_int_equal(linears, 14);
    /* Not the magnitude mask in disguise. */
    size_t k;
    const uint32_t *g = subnet_indices(f.p, 0, &k);
    double *mag = malloc(256 * sizeof *mag);
    for (int i = 0; i < 256; i++) mag[i] = fabs((double)f.b.layers[0][LW_Q][i]);
    uint32_t *by_mag = top_k_by_sorting(mag, 256, k);
    assert_true(memcmp(g, by_mag, k * sizeof *g) != 0);
    free(by_mag);
    free(mag);
    free(fisher);
    fx_close(&d);
    fx_close(&f);
}

static void test_gradcheck_subnet(void **state) {
    (void)state;
    fx f;
    fx_base(&f, 1);
    fx_method(
        &f, 0, 1,
        "subnetwork { sparsity: 0.5 selection: MAGNITUDE modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, "
        "GATE_PROJ, UP_PROJ, DOWN_PROJ, INPUT_LAYERNORM, POST_ATTENTION_LAYERNORM] }");
    gradcheck(&f, "subnetwork");
    fx_close(&f);
}

/* At the zero delta the values' gradients are the dense gradient's entries. */
static void test_subnet_match_dense(void **state) {
    (void)state;
    fx f;
    dense_ref d;
    fx_base(&f, 1);
    dense_open(&d, &f);
    fx_method(
        &f, 0, 3,
        "subnetwork { sparsity: 0.7 selection: RANDOM modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, "
        "GATE_PROJ, UP_PROJ, DOWN_PROJ, INPUT_LAYERNORM, POST_ATTENTION_LAYERNORM] }");
    peft_zero_grads(f.p);
    long n;
    model_forward(f.m, f.tokens, f.labels, GC_B, GC_T, &n);
    model_backward(f.m, 1.0f);
    for (int l = 0; l < 2; l++)
        for (int kind = LW_Q; kind <= LW_POST_NORM; kind++) {
            char hf[PEFT_NAME_MAX], name[PEFT_NAME_MAX + 16];
            model_weight_name(&f.b.cfg, l, kind, hf, sizeof hf);
            snprintf(name, sizeof name, "%s.sparse_values", hf);
            int t = tensor(f.p, name);
            size_t k;
            const uint32_t *idx = subnet_indices(f.p, t, &k);
            const float *g = peft_grad(f.p, t), *ref = dense_grad(&d, l, kind);
            for (size_t i = 0; i < k; i++) assert_near(g[i], ref[idx[i]], 1e-5, name, i);
        }
    dense_close(&d);
    fx_close(&f);
}

/* ---- merge ----------------------------------------------------------------- */

/* merge() of every weight equals the effective weight and the delta placed
 * by hand (the `place` callback). */
typedef void (*place_fn)(fx *f, int layer, int kind, float *w);

static void check_merge(fx *f, place_fn place) {
    gc_perturb(f->p, 0.3f, 9);
    const model_config *cfg = &f->b.cfg;
    int touched = 0;
    for (int l = 0; l < cfg->num_layers; l++)
        for (int kind = 0; kind < LW_COUNT; kind++) {
            size_t n = model_weight_shape(cfg, l, kind, NULL, NULL);
            if (!n || !f->b.layers[l][kind]) continue;
            float *merged = malloc(n * sizeof(float)), *want = malloc(n * sizeof(float));
            assert_non_null(merged);
            assert_non_null(want);
            memcpy(merged, f->b.layers[l][kind], n * sizeof(float));
            memcpy(want, merged, n * sizeof(float));
            err e = {{0}};
            assert_int_equal(peft_merge(f->p, l, kind, merged, &e), 0);
            place(f, l, kind, want);
            assert_memory_equal(merged, want, n * sizeof(float));
            const float *eff = f->p->method->weight(f->p, l, kind);
            if (eff) {
                assert_memory_equal(eff, want, n * sizeof(float));
                touched++;
            } else {
                assert_memory_equal(merged, f->b.layers[l][kind], n * sizeof(float));
            }
            free(merged);
            free(want);
        }
    assert_true(touched > 0);
}

static void place_layerwise(fx *f, int layer, int kind, float *w) {
    char hf[PEFT_NAME_MAX], name[PEFT_NAME_MAX + 8];
    model_weight_name(&f->b.cfg, layer, kind, hf, sizeof hf);
    snprintf(name, sizeof name, "%s.delta", hf);
    int t = peft_find_tensor(f->p, name);
    if (t < 0) return;
    const float *v = peft_param(f->p, t);
    for (size_t i = 0; i < f->p->tensors[t].numel; i++) w[i] += v[i];
}

/* Heads 0 and 3 of layer 1: kv heads 0 and 1. */
static void place_heads(fx *f, int layer, int kind, float *w) {
    static const char *proj[4] = {"q", "k", "v", "o"};
    if (layer != 1 || kind > LW_O) return;
    char name[PEFT_NAME_MAX];
    snprintf(name, sizeof name, "model.layers.1.self_attn.%s_proj.heads.delta", proj[kind]);
    const float *v = peft_param(f->p, tensor(f->p, name));
    int heads[2] = {0, 3}, kv[2] = {0, 1}, D = 4, C = 16;
    for (int b = 0; b < 2; b++)
        for (int r = 0; r < D; r++)
            for (int c = 0; c < C; c++) {
                if (kind == LW_O)
                    w[c * 16 + heads[b] * D + r] += v[c * 8 + b * D + r];
                else
                    w[((kind == LW_Q ? heads[b] : kv[b]) * D + r) * C + c] +=
                        v[(b * D + r) * C + c];
            }
}

static void place_subnet(fx *f, int layer, int kind, float *w) {
    char hf[PEFT_NAME_MAX], name[PEFT_NAME_MAX + 16];
    model_weight_name(&f->b.cfg, layer, kind, hf, sizeof hf);
    snprintf(name, sizeof name, "%s.sparse_values", hf);
    int t = peft_find_tensor(f->p, name);
    if (t < 0) return;
    size_t k;
    const uint32_t *idx = subnet_indices(f->p, t, &k);
    const float *v = peft_param(f->p, t);
    for (size_t i = 0; i < k; i++) w[idx[i]] += v[i];
}

static void test_merge(void **state) {
    (void)state;
    fx f;
    fx_base(&f, 1);
    fx_method(&f, 0, 1, "layer_wise { first_layer: 1 last_layer: 1 }");
    check_merge(&f, place_layerwise);
    fx_close_method(&f);
    fx_method(&f, 0, 1, "attention_heads { layers: [1] heads: [0, 3] }");
    check_merge(&f, place_heads);
    fx_close_method(&f);
    fx_method(
        &f, 0, 5,
        "subnetwork { sparsity: 0.6 selection: RANDOM modules: [Q_PROJ, K_PROJ, V_PROJ, O_PROJ, "
        "GATE_PROJ, UP_PROJ, DOWN_PROJ, INPUT_LAYERNORM, POST_ATTENTION_LAYERNORM] }");
    check_merge(&f, place_subnet);
    fx_close(&f);
}

/* ---- errors ---------------------------------------------------------------- */

/* peft_create of method m fails with a message containing needle; frees m. */
static void expect_error_of(fx *f, Peftps__Method *m, const char *needle) {
    err e = {{0}};
    peft *p = NULL;
    assert_int_equal(methods_create(&p, m, &f->b.cfg, &f->b.w, &e), -1);
    assert_null(p);
    gc_method_free(m);
    if (!strstr(e.msg, needle)) fail_msg("error \"%s\" does not say \"%s\"", e.msg, needle);
}

static void expect_error(fx *f, const char *method, const char *needle) {
    expect_error_of(f, gc_method("%s", method), needle);
}

static void test_errors(void **state) {
    (void)state;
    fx f;
    fx_base(&f, 1);
    expect_error(&f, "layer_wise { first_layer: 0 last_layer: 2 }",
                 "layer_wise: layer 2 is beyond the model's 2 layers (0..1)");
    expect_error(&f, "layer_wise { first_layer: 1 last_layer: 0 }",
                 "first_layer 1 is above last_layer 0");
    expect_error(&f, "layer_wise { first_layer: 0 last_layer: 1 modules: [MODULE_UNSPECIFIED] }",
                 "layer_wise.modules: entry 0 is not a module");
    expect_error(&f, "attention_heads { heads: [4] }",
                 "head 4 does not exist: the model has 4 (0 to 3)");
    expect_error(&f, "attention_heads { heads: [0] top_k: 2 }", "either heads or top_k");
    expect_error(&f, "attention_heads {}", "set heads");
    expect_error(&f, "attention_heads { top_k: 9 }", "top_k 9 must be between 1 and the 8");
    expect_error(&f, "attention_heads { layers: [5] heads: [0] }",
                 "attention_heads.layers: layer 5 does not exist");
    expect_error(&f, "attention_heads { heads: [0] projections: [UP_PROJ] }",
                 "attention_heads.projections: module up_proj is not supported");
    expect_error(&f, "subnetwork { sparsity: 1 selection: MAGNITUDE }",
                 "sparsity 1 must be at least 0 and below 1");
    expect_error(&f, "subnetwork { sparsity: 0.999 selection: MAGNITUDE }",
                 "leaves no entry of model.layers.0.self_attn.q_proj.weight");
    /* A selection no text can name (the parser refuses it): set by hand. */
    Peftps__Method *m = gc_method("subnetwork { sparsity: 0.5 }");
    m->subnetwork->has_selection = 1;
    m->subnetwork->selection = (Peftps__MaskSelection)7;
    expect_error_of(&f, m, "selection 7 is not MAGNITUDE, RANDOM or GRADIENT");

    /* top_k cannot rank without batches. */
    err e = {{0}};
    f.meth = gc_method("attention_heads { top_k: 2 }");
    assert_int_equal(methods_create(&f.p, f.meth, &f.b.cfg, &f.b.w, &e), 0);
    assert_int_equal(f.p->n_tensors, 0);
    assert_int_equal(heads_chosen(f.p, NULL, NULL, 0), -1);
    assert_int_equal(model_create(&f.m, &f.b.cfg, &f.b.w, f.p, GC_B, GC_T, &e), 0);
    assert_int_equal(peft_calibrate(f.p, f.m, batch_fn, &f.b.cfg, 0, &e), -1);
    assert_non_null(strstr(e.msg, "calibration needs at least one batch"));
    fx_close(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layerwise_layout),
        cmocka_unit_test(test_gradcheck_layerwise_bias),
        cmocka_unit_test(test_gradcheck_layerwise_nobias),
        cmocka_unit_test(test_layerwise_stops_at_first_layer),
        cmocka_unit_test(test_heads_layout_gqa),
        cmocka_unit_test(test_gradcheck_heads),
        cmocka_unit_test(test_heads_match_dense),
        cmocka_unit_test(test_heads_top_k),
        cmocka_unit_test(test_select_largest),
        cmocka_unit_test(test_subnet_magnitude),
        cmocka_unit_test(test_subnet_random),
        cmocka_unit_test(test_subnet_gradient),
        cmocka_unit_test(test_gradcheck_subnet),
        cmocka_unit_test(test_subnet_match_dense),
        cmocka_unit_test(test_merge),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
