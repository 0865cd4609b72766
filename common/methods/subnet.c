/* The subnetwork method: a fixed sparse mask over the chosen modules of
 * every layer, by weight magnitude, at random (rng.h), or by accumulated
 * squared gradients on calibration batches (the Fisher mask of Sung et al.
 * 2021); only masked entries train. Deltas, gradients and the hooks that
 * pass through to them are delta.c's; this file owns the config block
 * (defaults, checks) and the choice of the mask. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/rng.h"
#include "methods/delta.h"
#include "methods/registry.h"
#include "model/peft.h"

/* An unset sparsity: 99% frozen. */
#define SUBNET_DEFAULT_SPARSITY 0.99f
/* Calibration batches of a GRADIENT mask that does not say. */
#define SUBNET_DEFAULT_CALIBRATION 8

/* Keeps the mask streams rng_seed(seed, layer, kind, tag) apart from the
 * per-step streams (seed, step, shard, ...) and from PEFT_STREAM_INIT. */
#define SUBNET_STREAM_MASK UINT64_C(0x4d41534b00000000)

typedef struct subnet_state {
    delta_set ds; /* first, for delta.h's shared hooks */
    Peftps__MaskSelection selection;
    float sparsity;
    float **fisher; /* GRADIENT calibration: per entry, summed squared gradients */
    float **batch;  /* and this batch's gradient */
    int calibrating;
} subnet_state;

static void free_calibration(subnet_state *s) {
    for (int i = 0; s->fisher && i < s->ds.n; i++) free(s->fisher[i]);
    for (int i = 0; s->batch && i < s->ds.n; i++) free(s->batch[i]);
    free(s->fisher);
    free(s->batch);
    s->fisher = s->batch = NULL;
}

static void subnet_destroy(peft *p) {
    subnet_state *s = p->state;
    if (!s) return;
    free_calibration(s);
    delta_free(&s->ds);
    free(s);
    p->state = NULL;
}

static const char *selection_name(Peftps__MaskSelection sel) {
    return sel == PEFTPS__MASK_SELECTION__MAGNITUDE ? "magnitude"
           : sel == PEFTPS__MASK_SELECTION__RANDOM  ? "random"
                                                    : "gradient";
}

/* Sets the mask of entry i to the nnz largest |score|, ties by index. */
static int mask_largest(subnet_state *s, int i, const float *score, err *e) {
    delta_entry *d = &s->ds.entries[i];
    uint32_t *idx = malloc(d->nnz * sizeof *idx);
    if (!idx) return err_set(e, "out of memory for a mask of %zu entries", d->nnz);
    delta_select_largest(score, (size_t)d->rows * d->cols, d->nnz, idx);
    delta_set_indices(&s->ds, i, idx);
    return 0;
}

static int subnet_create(peft *p, err *e) {
    const Peftps__Subnetwork *c = p->config->subnetwork;
    const model_config *cfg = p->cfg;
    if (!c) return err_set(e, "subnetwork: the method block has no subnetwork settings");
    subnet_state *s = calloc(1, sizeof *s);
    if (!s) return err_set(e, "subnetwork: out of memory");
    p->state = s;
    if (delta_init(&s->ds, cfg, p->base, e) < 0) return err_wrap(e, "subnetwork");
    /* Unset: 99% frozen by weight magnitude, which needs no data. */
    s->sparsity = c->has_sparsity ? c->sparsity : SUBNET_DEFAULT_SPARSITY;
    s->selection =
        c->has_selection && c->selection != PEFTPS__MASK_SELECTION__MASK_SELECTION_UNSPECIFIED
            ? c->selection
            : PEFTPS__MASK_SELECTION__MAGNITUDE;
    if (!(s->sparsity >= 0.0f && s->sparsity < 1.0f))
        return err_set(e,
                       "subnetwork: sparsity %g must be at least 0 and below 1 (the fraction "
                       "of entries that stay frozen)",
                       (double)s->sparsity);
    if (s->selection != PEFTPS__MASK_SELECTION__MAGNITUDE &&
        s->selection != PEFTPS__MASK_SELECTION__RANDOM &&
        s->selection != PEFTPS__MASK_SELECTION__GRADIENT)
        return err_set(e, "subnetwork: selection %d is not MAGNITUDE, RANDOM or GRADIENT",
                       (int)s->selection);
    unsigned allowed = PEFT_LINEARS | PEFT_BIT(LW_INPUT_NORM) | PEFT_BIT(LW_POST_NORM), mask;
    if (peft_module_mask(c->modules, c->n_modules, PEFT_LINEARS, allowed, "subnetwork.modules",
                         &mask, e) < 0)
        return -1;

    for (int l = 0; l < cfg->num_layers; l++)
        for (int k = 0; k < LW_COUNT; k++) {
            if (!(mask & PEFT_BIT(k))) continue;
            int rows, cols;
            size_t numel = model_weight_shape(cfg, l, k, &rows, &cols);
            size_t nnz = (size_t)llround((1.0 - (double)s->sparsity) * (double)numel);
            if (nnz == 0) {
                char name[PEFT_NAME_MAX];
                model_weight_name(cfg, l, k, name, sizeof name);
                return err_set(e,
                               "subnetwork: sparsity %g leaves no entry of %s (%zu entries) "
                               "to train; lower it",
                               (double)s->sparsity, name, numel);
            }
            if (delta_add_sparse(&s->ds, p, l, k, nnz, e) < 0) return err_wrap(e, "subnetwork");
        }
    p->first_trainable_layer = 0;
    if (s->selection == PEFTPS__MASK_SELECTION__MAGNITUDE)
        for (int i = 0; i < s->ds.n; i++) {
            delta_entry *d = &s->ds.entries[i];
            const float *w = p->base->layer[d->layer][d->kind];
            float *wide = NULL; /* a BF16 base, widened for the ranking */
            size_t numel = (size_t)d->rows * d->cols;
            if (!w && !(w = wide = malloc(numel * sizeof *wide)))
                return err_set(e, "subnetwork: out of memory for %zu weights", numel);
            if (wide) model_weights_read_f32(p->base, d->layer, d->kind, wide, numel);
            int rc = mask_largest(s, i, w, e);
            free(wide);
            if (rc < 0) return err_wrap(e, "subnetwork");
        }
    log_info("subnetwork: %s mask, sparsity %g, %d modules, %zu parameters",
             selection_name(s->selection), (double)s->sparsity, s->ds.n, peft_num_trainable(p));
    return 0;
}

/* After each calibration batch: the squares of its gradient join the sums. */
static void fold_batch(void *arg) {
    subnet_state *s = arg;
    for (int i = 0; i < s->ds.n; i++) {
        const delta_entry *d = &s->ds.entries[i];
        float *f = s->fisher[i], *g = s->batch[i];
        for (size_t j = 0, n = (size_t)d->rows * d->cols; j < n; j++) {
            f[j] += g[j] * g[j];
            g[j] = 0.0f;
        }
    }
}

static int subnet_calibrate(peft *p, model *m, peft_batch_fn fn, void *ctx, int batches, err *e) {
    subnet_state *s = p->state;
    if (s->selection != PEFTPS__MASK_SELECTION__GRADIENT) return 0;
    s->fisher = calloc((size_t)s->ds.n, sizeof *s->fisher);
    s->batch = calloc((size_t)s->ds.n, sizeof *s->batch);
    if (!s->fisher || !s->batch) {
        free_calibration(s);
        return err_set(e, "subnetwork: out of memory");
    }
    for (int i = 0; i < s->ds.n; i++) {
        const delta_entry *d = &s->ds.entries[i];
        size_t n = (size_t)d->rows * d->cols;
        s->fisher[i] = calloc(n, sizeof(float));
        s->batch[i] = calloc(n, sizeof(float));
        if (!s->fisher[i] || !s->batch[i]) {
            free_calibration(s);
            return err_set(e,
                           "subnetwork: out of memory for the gradient statistics of %d "
                           "modules",
                           s->ds.n);
        }
    }
    s->calibrating = 1;
    int rc = delta_calibrate(&s->ds, m, fn, ctx, batches, fold_batch, s, e);
    s->calibrating = 0;
    for (int i = 0; rc == 0 && i < s->ds.n; i++) rc = mask_largest(s, i, s->fisher[i], e);
    free_calibration(s);
    if (rc < 0) return err_wrap(e, "subnetwork");
    log_info("subnetwork: gradient mask chosen over %d batches", batches);
    return 0;
}

/* nnz distinct indices below n, uniformly: the first nnz draws of a
 * Fisher-Yates shuffle, reported in ascending order. */
static int random_mask(delta_entry *d, rng *r, uint32_t *idx) {
    size_t n = (size_t)d->rows * d->cols;
    uint32_t *perm = malloc(n * sizeof *perm);
    unsigned char *taken = calloc(n, 1);
    if (!perm || !taken) {
        free(perm);
        free(taken);
        return -1;
    }
    for (size_t i = 0; i < n; i++) perm[i] = (uint32_t)i;
    for (size_t i = 0; i < d->nnz; i++) {
        size_t j = i + (size_t)(rng_u64(r) % (uint64_t)(n - i));
        uint32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
        taken[perm[i]] = 1;
    }
    for (size_t i = 0, k = 0; i < n; i++)
        if (taken[i]) idx[k++] = (uint32_t)i;
    free(perm);
    free(taken);
    return 0;
}

/* Values start at zero. A RANDOM mask is drawn here, the first hook that
 * knows the experiment's seed. */
static void subnet_init(peft *p, uint64_t seed) {
    subnet_state *s = p->state;
    delta_method_init(p, seed);
    if (s->selection == PEFTPS__MASK_SELECTION__RANDOM) {
        for (int i = 0; i < s->ds.n; i++) {
            delta_entry *d = &s->ds.entries[i];
            rng r;
            rng_seed(&r, seed, (uint64_t)d->layer, (uint64_t)d->kind, SUBNET_STREAM_MASK);
            uint32_t *idx = malloc(d->nnz * sizeof *idx);
            if (!idx || random_mask(d, &r, idx) < 0) {
                free(idx);
                log_error("subnetwork: out of memory drawing a random mask; %s trains nothing",
                          p->tensors[d->tensor].name);
                continue;
            }
            delta_set_indices(&s->ds, i, idx);
        }
    }
    int unmasked = 0;
    for (int i = 0; i < s->ds.n; i++) unmasked += !s->ds.entries[i].idx;
    if (unmasked)
        log_error("subnetwork: %d of %d modules have no mask and train nothing (a gradient mask "
                  "needs calibrate before init)",
                  unmasked, s->ds.n);
}

static void subnet_linear_backward(peft *p, int layer, int kind, const float *x, const float *dy,
                                   float *dx, int n) {
    subnet_state *s = p->state;
    if (s->calibrating) {
        /* The dense gradient is computed only here, to rank entries. */
        delta_entry *d = delta_find(&s->ds, layer, kind);
        if (d) delta_dense_grad(d, x, dy, n, s->batch[d - s->ds.entries]);
        return;
    }
    delta_method_linear_backward(p, layer, kind, x, dy, dx, n);
}

/* ---- the experiment's subnetwork block ------------------------------------ */

static int subnet_defaults(Peftps__Method *m) {
    Peftps__Subnetwork *c = m->subnetwork;
    CONFIG_DEFAULT(c, sparsity, SUBNET_DEFAULT_SPARSITY);
    CONFIG_DEFAULT_ENUM(c, selection, PEFTPS__MASK_SELECTION__MAGNITUDE);
    CONFIG_DEFAULT(c, calibration_batches, SUBNET_DEFAULT_CALIBRATION);
    return config_default_modules(&c->modules, &c->n_modules, PEFTPS__MODULE__Q_PROJ,
                                  PEFTPS__MODULE__DOWN_PROJ);
}

static int subnet_check(const config_checker *c, const Peftps__Method *m) {
    const Peftps__Subnetwork *s = m->subnetwork;
    if (!(s->sparsity > 0 && s->sparsity < 1))
        return config_fail(c, "method.subnetwork.sparsity",
                           "method.subnetwork.sparsity must be in (0, 1), got %g",
                           (double)s->sparsity);
    if (s->selection == PEFTPS__MASK_SELECTION__GRADIENT && s->calibration_batches == 0)
        return config_fail(c, "method.subnetwork.calibration_batches|method.subnetwork.selection",
                           "method.subnetwork.calibration_batches must be > 0 with a GRADIENT "
                           "mask");
    return config_check_modules(c, "method.subnetwork.modules", s->modules, s->n_modules,
                                PEFTPS__MODULE__Q_PROJ, PEFTPS__MODULE__DOWN_PROJ);
}

/* A GRADIENT mask is chosen on calibration batches; the others need none. */
static int subnet_calibration_batches(const Peftps__Method *m) {
    const Peftps__Subnetwork *s = m->subnetwork;
    return s->selection == PEFTPS__MASK_SELECTION__GRADIENT ? (int)s->calibration_batches : 0;
}

const peft_method subnet_method = {
    .name = "subnetwork",
    .example = "subnetwork { sparsity: 0.99 }",
    .defaults = subnet_defaults,
    .check = subnet_check,
    .calibration_batches = subnet_calibration_batches,
    .create = subnet_create,
    .calibrate = subnet_calibrate,
    .init = subnet_init,
    .refresh = delta_method_refresh,
    .reserve = delta_method_reserve,
    .weight = delta_method_weight,
    .linear_backward = subnet_linear_backward,
    .merge = delta_method_merge,
    .destroy = subnet_destroy,
};

const uint32_t *subnet_indices(const peft *p, int tensor, size_t *k) {
    if (!p || p->method != &subnet_method || !p->state) return NULL;
    const subnet_state *s = p->state;
    for (int i = 0; i < s->ds.n; i++) {
        const delta_entry *d = &s->ds.entries[i];
        if (d->tensor != tensor || !d->idx) continue;
        if (k) *k = d->nnz;
        return d->idx;
    }
    return NULL;
}
