/* The layer_wise method: dense deltas on the chosen modules of the layers
 * first_layer..last_layer, everything else frozen. The deltas, W_eff and the
 * gradients are delta.c's; this file reads the config block (peftps.proto). */
#include <stdlib.h>

#include "methods/delta.h"
#include "base/log.h"
#include "model/peft.h"

static void lw_destroy(peft *p) {
    if (!p->state) return;
    delta_free(p->state);
    free(p->state);
    p->state = NULL;
}

static int lw_create(peft *p, err *e) {
    const Peftps__LayerWise *c = p->config->layer_wise;
    const model_config *cfg = p->cfg;
    int L = cfg->num_layers;
    if (!c) return err_set(e, "layer_wise: the method block has no layer_wise settings");
    if (L <= 0) return err_set(e, "layer_wise: the model has no layers");
    /* By default only the last layer trains; a single bound names a range
     * that reaches the other end (first_layer alone: up to the last). */
    long last = c->has_last_layer ? (long)c->last_layer : L - 1;
    long first = c->has_first_layer ? (long)c->first_layer : last;
    if (first >= L || last >= L)
        return err_set(e, "layer_wise: layer %ld is beyond the model's %d layers (0..%d)",
                       first >= L ? first : last, L, L - 1);
    if (first > last)
        return err_set(e, "layer_wise: first_layer %ld is above last_layer %ld", first, last);

    unsigned all = PEFT_LINEARS | PEFT_BIT(LW_INPUT_NORM) | PEFT_BIT(LW_POST_NORM), mask;
    if (peft_module_mask(c->modules, c->n_modules, all, all, "layer_wise.modules", &mask, e) < 0)
        return -1;
    int chosen[LW_COUNT];
    for (int k = 0; k < LW_COUNT; k++) chosen[k] = (mask & PEFT_BIT(k)) != 0;
    /* Biases belong to their projections (Qwen2-style attention_bias). */
    if (cfg->attention_bias) {
        chosen[LW_Q_BIAS] = chosen[LW_Q];
        chosen[LW_K_BIAS] = chosen[LW_K];
        chosen[LW_V_BIAS] = chosen[LW_V];
    }

    delta_set *ds = calloc(1, sizeof *ds);
    if (!ds) return err_set(e, "layer_wise: out of memory");
    p->state = ds;
    if (delta_init(ds, cfg, p->base, e) < 0) return err_wrap(e, "layer_wise");
    for (int l = (int)first; l <= (int)last; l++)
        for (int k = 0; k < LW_COUNT; k++)
            if (chosen[k] && delta_add_dense(ds, p, l, k, e) < 0) return err_wrap(e, "layer_wise");
    p->first_trainable_layer = (int)first;
    log_info("layer_wise: layers %ld..%ld, %d dense deltas", first, last, ds->n);
    return 0;
}

/* Deltas start at zero: the first forward is the base model's. */
static void lw_init(peft *p, uint64_t seed) {
    (void)seed;
    for (int i = 0; i < p->n_tensors; i++) {
        float *t = peft_param(p, i);
        for (size_t j = 0; j < p->tensors[i].numel; j++) t[j] = 0.0f;
    }
}

static void lw_refresh(peft *p) {
    delta_refresh(p->state, p);
}

static const float *lw_weight(peft *p, int layer, int kind) {
    return delta_weight(p->state, layer, kind);
}

static void lw_linear_backward(peft *p, int layer, int kind, const float *x, const float *dy,
                               float *dx, int n) {
    (void)dx;
    delta_backward(p->state, p, layer, kind, x, dy, n);
}

static void lw_merge(peft *p, int layer, int kind, float *w) {
    delta_merge(p->state, p, layer, kind, w);
}

const peft_method layerwise_method = {
    .name = "layer_wise",
    .create = lw_create,
    .init = lw_init,
    .refresh = lw_refresh,
    .weight = lw_weight,
    .linear_backward = lw_linear_backward,
    .merge = lw_merge,
    .destroy = lw_destroy,
};
