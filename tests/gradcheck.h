/* Finite-difference checking of the methods' gradients on a tiny random
 * Llama built in memory, shared by tests/test_gradcheck.c (LoRA, prefix,
 * full) and tests/test_gradcheck_delta.c (layer-wise, heads, subnetwork).
 * Everything is static inline so that each test program includes it alone;
 * it uses model.h, peft.h and rng.h from the library.
 *
 * Use: gc_run(&opts) builds the model, the method, a batch, and compares
 * every trainable tensor's analytic gradient (model_forward + model_backward
 * with loss_scale 1) against central differences of the summed loss. */
#ifndef PEFTPS_TESTS_GRADCHECK_H
#define PEFTPS_TESTS_GRADCHECK_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/clshead.h"
#include "model/model.h"
#include "config/pbtext.h"
#include "model/peft.h"
#include "methods/registry.h"
#include "base/rng.h"

/* The tiny model: 2 layers, hidden 16, 4 query heads and 2 kv heads of 4,
 * intermediate 24, vocabulary 32; batches of B=2 sequences of T=5. */
#define GC_B 2
#define GC_T 5

/* Tolerance, and why. The forward runs in float32 and the loss is the sum
 * over GC_B*GC_T = 10 tokens of about ln(32) = 3.5 each, so |L| ~ 35 and its
 * rounding noise is ~ 35 * 6e-8 * (a few) ~ 1e-5. The numeric derivative is
 * Richardson's extrapolation of central differences at steps h and h/2,
 * (4 D(h/2) - D(h)) / 3, whose truncation error is O(h^4) (a plain central
 * difference at h = 1e-2 is off by up to 3% on the sharpest entries of this
 * model) and whose noise is about 3 * 1e-5 / h ~ 3e-3 at worst, rarely more
 * than 1e-3: the absolute floor GC_ABS_TOL = 5e-3 covers it. The relative
 * tolerance of 1e-2 still catches any wrong factor, sign, transpose or
 * missing term (those give errors of order 1; the smallest plausible bug,
 * a missing dropout rescale at p = 0.3, is 30%). An entry passes when
 * |analytic - numeric| <= GC_ABS_TOL + GC_REL_TOL * max(|analytic|, |numeric|). */
#define GC_STEP 1e-2f
#define GC_REL_TOL 1e-2
#define GC_ABS_TOL 5e-3

typedef struct gc_base {
    model_config cfg;
    model_weights w;
    const float *(*layers)[LW_COUNT];
    float *mem;
} gc_base;

/* The tiny configuration; tied selects tie_word_embeddings. Attention
 * biases are on (Qwen2-style) so that bias paths are exercised. */
static inline void gc_config(model_config *cfg, int tied) {
    memset(cfg, 0, sizeof *cfg);
    cfg->vocab_size = 32;
    cfg->hidden_size = 16;
    cfg->intermediate_size = 24;
    cfg->num_layers = 2;
    cfg->num_heads = 4;
    cfg->num_kv_heads = 2;
    cfg->head_dim = 4;
    cfg->max_position_embeddings = 64;
    cfg->rms_norm_eps = 1e-5f;
    cfg->rope_theta = 10000.0f;
    cfg->rope_scaling = ROPE_NONE;
    cfg->rope_factor = 1.0f;
    /* Every bias a Llama-family layer can have: q/k/v (Qwen2), o (Llama's
     * attention_bias) and the MLP's (mlp_bias). */
    cfg->attention_bias = 1;
    cfg->o_bias = 1;
    cfg->mlp_bias = 1;
    cfg->tie_word_embeddings = tied;
    cfg->bos_token_id = 1;
    cfg->eos_token_id = 2;
    cfg->pad_token_id = -1;
    /* The score head's init std: large enough that the head passes back
     * gradients big enough to check through the layers. */
    cfg->initializer_range = 0.5f;
}

/* Random base weights of cfg from `seed`: matrices N(0, 1/in) so that every
 * projection keeps activations O(1) (a hotter model makes the attention
 * nearly one-hot and the finite differences poor), the embedding N(0, 1),
 * norm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2). Returns 0, or -1 when out
 * of memory. */
static inline int gc_base_create_cfg(gc_base *b, const model_config *c, uint64_t seed) {
    memset(b, 0, sizeof *b);
    b->cfg = *c;
    const model_config *cfg = &b->cfg;
    int tied = cfg->tie_word_embeddings;
    size_t total = 0;
    for (int k = 0; k < GW_COUNT; k++) total += model_weight_shape(cfg, MODEL_GLOBAL, k, 0, 0);
    for (int l = 0; l < cfg->num_layers; l++)
        for (int k = 0; k < LW_COUNT; k++) total += model_weight_shape(cfg, l, k, 0, 0);
    b->mem = malloc(total * sizeof(float));
    b->layers = calloc((size_t)cfg->num_layers, sizeof *b->layers);
    if (!b->mem || !b->layers) return -1;
    b->w.layer = b->layers;
    float *at = b->mem;
    rng g;
    for (int l = MODEL_GLOBAL; l < cfg->num_layers; l++) {
        int kinds = l == MODEL_GLOBAL ? GW_COUNT : LW_COUNT;
        for (int k = 0; k < kinds; k++) {
            if (l == MODEL_GLOBAL && k == GW_LM_HEAD && tied) {
                b->w.global[k] = b->w.global[GW_EMBED];
                continue;
            }
            int rows, cols;
            size_t n = model_weight_shape(cfg, l, k, &rows, &cols);
            if (!n) continue;
            float scale = l == MODEL_GLOBAL && k == GW_EMBED ? 1.0f : 1.0f / sqrtf((float)cols);
            int norm =
                l == MODEL_GLOBAL ? k == GW_FINAL_NORM : k == LW_INPUT_NORM || k == LW_POST_NORM;
            int bias = l != MODEL_GLOBAL && model_is_bias(k);
            rng_seed(&g, seed, (uint64_t)(l + 1), (uint64_t)k, 77);
            for (size_t i = 0; i < n; i++) {
                float z = rng_normal(&g);
                at[i] = norm ? 1.0f + 0.1f * z : bias ? 0.1f * z : scale * z;
            }
            if (l == MODEL_GLOBAL)
                b->w.global[k] = at;
            else
                b->layers[l][k] = at;
            at += n;
        }
    }
    return 0;
}

/* The same for the tiny configuration. */
static inline int gc_base_create(gc_base *b, int tied, uint64_t seed) {
    model_config cfg;
    gc_config(&cfg, tied);
    return gc_base_create_cfg(b, &cfg, seed);
}

static inline void gc_base_free(gc_base *b) {
    free(b->mem);
    free(b->layers);
    memset(b, 0, sizeof *b);
}

/* Random tokens and labels (B,T) over the vocabulary; label -100 (ignored)
 * at one position so that masking is exercised. */
static inline void gc_batch(const model_config *cfg, int32_t *tokens, int32_t *labels, int B, int T,
                            uint64_t seed) {
    rng g;
    rng_seed(&g, seed, 991, 0, 0);
    for (int i = 0; i < B * T; i++) {
        tokens[i] = (int32_t)(rng_u64(&g) % (uint64_t)cfg->vocab_size);
        labels[i] = (int32_t)(rng_u64(&g) % (uint64_t)cfg->vocab_size);
    }
    labels[1] = -100;
}

/* The pad id of classification batches. */
#define GC_PAD 0

/* A classification batch (B,T) of K classes: random tokens other than
 * GC_PAD, with sequence 0 ending in two pads (so that it pools position
 * T-3) and the others unpadded (T-1); each sequence's class at its pooled
 * position (clshead_last_token), -100 elsewhere. */
static inline void gc_cls_batch(const model_config *cfg, int32_t *tokens, int32_t *labels, int B,
                                int T, int K, uint64_t seed) {
    rng g;
    rng_seed(&g, seed, 992, 0, 0);
    for (int i = 0; i < B * T; i++) {
        tokens[i] = 1 + (int32_t)(rng_u64(&g) % (uint64_t)(cfg->vocab_size - 1));
        labels[i] = -100;
    }
    tokens[T - 1] = tokens[T - 2] = GC_PAD;
    for (int b = 0; b < B; b++)
        labels[b * T + clshead_last_token(tokens + b * T, T, GC_PAD)] =
            (int32_t)(rng_u64(&g) % (uint64_t)K);
}

/* Adds N(0, scale^2) noise to every parameter (e.g. so that LoRA's B is not
 * zero and A gets a gradient) and refreshes. */
static inline void gc_perturb(peft *p, float scale, uint64_t seed) {
    for (int i = 0; i < p->n_tensors; i++) {
        rng g;
        rng_seed(&g, seed, 4242, (uint64_t)i, 0);
        float *v = peft_param(p, i);
        for (size_t j = 0; j < p->tensors[i].numel; j++) v[j] += scale * rng_normal(&g);
    }
    peft_refresh(p);
}

static inline double gc_loss(model *m, const int32_t *tokens, const int32_t *labels) {
    long n = 0;
    return model_forward(m, tokens, labels, GC_B, GC_T, &n);
}

/* Central difference of the loss in parameter *v with step h (restoring
 * *v), divided by the step actually taken after float rounding. */
static inline double gc_central(peft *p, model *m, const int32_t *tokens, const int32_t *labels,
                                float *v, float h) {
    float saved = *v, up = saved + h, down = saved - h;
    *v = up;
    peft_refresh(p);
    double lp = gc_loss(m, tokens, labels);
    *v = down;
    peft_refresh(p);
    double lm = gc_loss(m, tokens, labels);
    *v = saved;
    peft_refresh(p);
    return (lp - lm) / ((double)up - (double)down);
}

/* Compares, for each tensor, up to `samples` entries: the one with the
 * largest analytic gradient and others drawn at random. Prints the worst
 * difference per tensor. Returns the number of failed entries, plus one for
 * each tensor whose largest gradient is too small to test anything (a
 * check that cannot fail is no check). */
static inline int gc_check(peft *p, model *m, const int32_t *tokens, const int32_t *labels,
                           int samples, const char *label) {
    peft_zero_grads(p);
    gc_loss(m, tokens, labels);
    model_backward(m, 1.0f);
    float *analytic = malloc(p->n_params * sizeof(float));
    if (!analytic) return 1;
    memcpy(analytic, p->grads, p->n_params * sizeof(float));
    int failures = 0;
    for (int i = 0; i < p->n_tensors; i++) {
        const peft_tensor *t = &p->tensors[i];
        const float *ga = analytic + t->offset;
        float *v = peft_param(p, i);
        size_t top = 0;
        for (size_t j = 1; j < t->numel; j++)
            if (fabsf(ga[j]) > fabsf(ga[top])) top = j;
        rng g;
        rng_seed(&g, 31337, (uint64_t)i, 0, 0);
        double worst = 0, worst_a = 0, worst_n = 0, top_numeric = 0;
        size_t worst_j = 0;
        int n = samples < (int)t->numel ? samples : (int)t->numel;
        for (int s = 0; s < n; s++) {
            size_t j = s == 0 ? top : (size_t)(rng_u64(&g) % t->numel);
            double numeric = (4.0 * gc_central(p, m, tokens, labels, v + j, GC_STEP / 2) -
                              gc_central(p, m, tokens, labels, v + j, GC_STEP)) /
                             3.0,
                   a = ga[j];
            if (s == 0) top_numeric = numeric;
            double bound = GC_ABS_TOL + GC_REL_TOL * fmax(fabs(a), fabs(numeric));
            double ratio = fabs(a - numeric) / bound;
            if (ratio > 1.0) failures++;
            if (ratio >= worst) {
                worst = ratio, worst_a = a, worst_n = numeric;
                worst_j = j;
            }
        }
        int trivial = fabs(top_numeric) < 10 * GC_ABS_TOL;
        printf("%-12s %-64s max|g| %9.3e  worst err/tol %6.3f (entry %zu: analytic %+.5e "
               "numeric %+.5e)%s\n",
               label, t->name, fabs((double)ga[top]), worst, worst_j, worst_a, worst_n,
               trivial ? "  TRIVIAL: gradient too small to check" : "");
        if (trivial) failures++;
    }
    free(analytic);
    return failures;
}

/* One gradient check run. */
typedef struct gc_opts {
    const char *label;
    const Peftps__Method *method;
    int tied;       /* tie_word_embeddings */
    float perturb;  /* gc_perturb scale after init; 0 keeps the init */
    int training;   /* peft_set_step's training flag (dropout) */
    int samples;    /* entries per tensor; 0 means 12 */
    int num_labels; /* > 0: sequence classification with a score head of that many classes */
    int recompute;  /* model_opts.recompute: the backward recomputes each layer */
    /* Optional, after model_create and before peft_init, e.g. calibration;
     * returns 0 or -1 with e set. */
    int (*prepare)(peft *p, model *m, void *ctx, err *e);
    void *ctx;
} gc_opts;

/* Builds everything, checks, frees. Returns the number of failures, or -1
 * when setting up failed (printing why). */
static inline int gc_run(const gc_opts *o) {
    gc_base b;
    peft *p = NULL;
    model *m = NULL;
    err e = {{0}};
    int rc = -1;
    if (gc_base_create(&b, o->tied, 1234) < 0) {
        printf("%s: out of memory\n", o->label);
        goto out;
    }
    if (methods_create(&p, o->method, &b.cfg, &b.w, &e) < 0 ||
        (o->num_labels && clshead_add(p, o->num_labels, GC_PAD, 99, &e) < 0) ||
        model_create_opts(&m, &b.cfg, &b.w, p, GC_B, GC_T, &(model_opts){.recompute = o->recompute},
                          &e) < 0 ||
        (o->prepare && o->prepare(p, m, o->ctx, &e) < 0)) {
        printf("%s: %s\n", o->label, e.msg);
        goto out;
    }
    peft_init(p, 99);
    if (o->perturb > 0) gc_perturb(p, o->perturb, 5);
    peft_set_step(p, o->training, 7, 3, 1);
    int32_t tokens[GC_B * GC_T], labels[GC_B * GC_T];
    if (o->num_labels)
        gc_cls_batch(&b.cfg, tokens, labels, GC_B, GC_T, o->num_labels, 11);
    else
        gc_batch(&b.cfg, tokens, labels, GC_B, GC_T, 11);
    rc = gc_check(p, m, tokens, labels, o->samples ? o->samples : 12, o->label);
out:
    if (m) model_free(m);
    peft_free(p);
    gc_base_free(&b);
    return rc;
}

/* A method block from its text, as it stands inside `method { ... }` of an
 * experiment ("lora { r: 4 alpha: 8 }"), printf-style. A block that does
 * not parse is a bug of the test: reported, then the program stops. Free
 * with gc_method_free once the method created from it is freed (a method
 * keeps its block). */
static inline Peftps__Method *gc_method(const char *fmt, ...) {
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    ProtobufCMessage *m = NULL;
    err e = {{0}};
    if (pbtext_parse(&peftps__method__descriptor, text, strlen(text), "method", &m, NULL, &e) < 0) {
        fprintf(stderr, "gc_method(\"%s\"): %s\n", text, e.msg);
        abort();
    }
    return (Peftps__Method *)m;
}

static inline void gc_method_free(Peftps__Method *m) {
    if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
}

#endif
