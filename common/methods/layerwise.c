/* The layer_wise method: dense deltas on the chosen modules of the layers
 * first_layer..last_layer, everything else frozen. The deltas, W_eff, the
 * gradients and the hooks that pass through to them are delta.c's; this
 * file owns the config block (peftps.proto): its defaults, its checks and
 * what it declares. */
#include <stdlib.h>

#include "base/log.h"
#include "methods/delta.h"
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
    /* Biases belong to their projections (q/k/v as Qwen2, o as Llama's
     * attention_bias, gate/up/down as mlp_bias), where the model has them. */
    for (int k = LW_Q; k <= LW_DOWN; k++) {
        int b = model_bias_kind(k);
        if (b >= 0) chosen[b] = chosen[k] && model_weight_shape(cfg, 0, b, NULL, NULL) > 0;
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

static int lw_defaults(Peftps__Method *m) {
    /* first_layer and last_layer depend on the model; create resolves them
     * when absent. */
    return config_default_modules(&m->layer_wise->modules, &m->layer_wise->n_modules,
                                  PEFTPS__MODULE__Q_PROJ, PEFTPS__MODULE__POST_ATTENTION_LAYERNORM);
}

static int lw_check(const config_checker *c, const Peftps__Method *m) {
    const Peftps__LayerWise *w = m->layer_wise;
    if (w->has_first_layer && w->has_last_layer && w->first_layer > w->last_layer)
        return config_fail(c, "method.layer_wise.first_layer",
                           "method.layer_wise.first_layer (%u) must not be above last_layer (%u)",
                           w->first_layer, w->last_layer);
    return config_check_modules(c, "method.layer_wise.modules", w->modules, w->n_modules,
                                PEFTPS__MODULE__Q_PROJ, PEFTPS__MODULE__POST_ATTENTION_LAYERNORM);
}

static int lw_check_model(const config_checker *c, const Peftps__Method *m,
                          const model_config *cfg) {
    const Peftps__LayerWise *w = m->layer_wise;
    long L = cfg->num_layers;
    if (w->has_first_layer && w->first_layer >= L)
        return config_fail(c, "method.layer_wise.first_layer",
                           "method.layer_wise.first_layer %u does not exist; the model has %ld "
                           "layers (0 to %ld)",
                           w->first_layer, L, L - 1);
    if (w->has_last_layer && w->last_layer >= L)
        return config_fail(c, "method.layer_wise.last_layer",
                           "method.layer_wise.last_layer %u does not exist; the model has %ld "
                           "layers (0 to %ld)",
                           w->last_layer, L, L - 1);
    return 0;
}

const peft_method layerwise_method = {
    .name = "layer_wise",
    .example = "layer_wise { first_layer: 0 }",
    .defaults = lw_defaults,
    .check = lw_check,
    .check_model = lw_check_model,
    .create = lw_create,
    .init = delta_method_init,
    .refresh = delta_method_refresh,
    .reserve = delta_method_reserve,
    .weight = delta_method_weight,
    .linear_backward = delta_method_linear_backward,
    .merge = delta_method_merge,
    .destroy = lw_destroy,
};
