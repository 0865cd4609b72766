/* The attention_heads method: deltas on the rows of q, k, v and the columns
 * of o that belong to chosen query heads (GQA-aware), the heads given in the
 * config or the top_k by gate-gradient importance (Michel et al. 2019) on
 * calibration batches. Deltas, gradients and the hooks that pass through to
 * them are delta.c's; this file owns the config block (defaults, checks)
 * and the choice of heads. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "methods/delta.h"
#include "methods/registry.h"
#include "model/model.h"
#include "model/peft.h"

/* Calibration batches of a top_k block that does not say. */
#define HEADS_DEFAULT_CALIBRATION 8

typedef struct heads_state {
    delta_set ds;            /* first, for delta.h's shared hooks */
    unsigned proj;           /* PEFT_BIT of LW_Q, LW_K, LW_V, LW_O */
    unsigned char *in_layer; /* num_layers: layer is a candidate */
    int *chosen_layer, *chosen_head, n_chosen;
    int ready; /* heads chosen and tensors declared */
    int top_k;
    double *importance;  /* num_layers*Hq after calibration */
    double *batch_sum;   /* num_layers*Hq: this batch's signed gate gradient */
    unsigned char *seen; /* num_layers: an o_proj input gradient arrived */
    int calibrating;
} heads_state;

static void heads_destroy(peft *p) {
    heads_state *s = p->state;
    if (!s) return;
    delta_free(&s->ds);
    free(s->in_layer);
    free(s->chosen_layer);
    free(s->chosen_head);
    free(s->importance);
    free(s->batch_sum);
    free(s->seen);
    free(s);
    p->state = NULL;
}

/* "model.layers.3.self_attn.q_proj.weight" -> "...q_proj.heads.delta" */
static void tensor_name(const model_config *cfg, int layer, int kind, char *buf, size_t n) {
    static const char suffix[] = ".heads.delta";
    /* Room for the suffix, so the name is never cut. */
    char w[PEFT_NAME_MAX - sizeof suffix + 1];
    model_weight_name(cfg, layer, kind, w, sizeof w);
    size_t len = strlen(w);
    if (len > 7 && !strcmp(w + len - 7, ".weight")) w[len - 7] = 0;
    snprintf(buf, n, "%s%s", w, suffix);
}

/* Declares the deltas of one layer for its chosen query heads (ascending).
 * A kv head shared by several chosen query heads is trained once. */
static int declare_layer(peft *p, heads_state *s, int layer, const int *hs, int nh, err *e) {
    const model_config *cfg = p->cfg;
    int group = cfg->num_heads / cfg->num_kv_heads;
    int kv[nh > 0 ? nh : 1], nkv = 0;
    for (int i = 0; i < nh; i++)
        if (nkv == 0 || kv[nkv - 1] != hs[i] / group) kv[nkv++] = hs[i] / group;
    static const int kinds[] = {LW_Q, LW_K, LW_V, LW_O};
    for (int i = 0; i < 4; i++) {
        int k = kinds[i];
        if (!(s->proj & PEFT_BIT(k))) continue;
        char name[PEFT_NAME_MAX];
        tensor_name(cfg, layer, k, name, sizeof name);
        int rc =
            k == LW_O
                ? delta_add_blocks(&s->ds, p, layer, k, DELTA_COLS, cfg->head_dim, hs, nh, name, e)
            : k == LW_Q
                ? delta_add_blocks(&s->ds, p, layer, k, DELTA_ROWS, cfg->head_dim, hs, nh, name, e)
                : delta_add_blocks(&s->ds, p, layer, k, DELTA_ROWS, cfg->head_dim, kv, nkv, name,
                                   e);
        if (rc < 0) return -1;
    }
    return 0;
}

/* Declares every chosen head's deltas; chosen_* are in (layer, head) order. */
static int declare_chosen(peft *p, heads_state *s, err *e) {
    int lowest = p->cfg->num_layers;
    for (int i = 0; i < s->n_chosen;) {
        int j = i;
        while (j < s->n_chosen && s->chosen_layer[j] == s->chosen_layer[i]) j++;
        if (declare_layer(p, s, s->chosen_layer[i], s->chosen_head + i, j - i, e) < 0) return -1;
        if (s->chosen_layer[i] < lowest) lowest = s->chosen_layer[i];
        i = j;
    }
    p->first_trainable_layer = lowest;
    s->ready = 1;
    return 0;
}

static int heads_create(peft *p, err *e) {
    const Peftps__AttentionHeads *c = p->config->attention_heads;
    const model_config *cfg = p->cfg;
    int L = cfg->num_layers, H = cfg->num_heads;
    if (!c) return err_set(e, "attention_heads: the method block has no attention_heads settings");
    if (H <= 0 || cfg->num_kv_heads <= 0 || H % cfg->num_kv_heads)
        return err_set(e, "attention_heads: %d query heads do not split into %d kv heads", H,
                       cfg->num_kv_heads);
    heads_state *s = calloc(1, sizeof *s);
    if (!s) return err_set(e, "attention_heads: out of memory");
    p->state = s;
    if (delta_init(&s->ds, cfg, p->base, e) < 0) return err_wrap(e, "attention_heads");
    unsigned qkvo = PEFT_BIT(LW_Q) | PEFT_BIT(LW_K) | PEFT_BIT(LW_V) | PEFT_BIT(LW_O);
    if (peft_module_mask(c->projections, c->n_projections, qkvo, qkvo,
                         "attention_heads.projections", &s->proj, e) < 0)
        return -1;
    s->in_layer = malloc((size_t)L);
    if (!s->in_layer) return err_set(e, "attention_heads: out of memory");
    if (peft_layer_list(cfg, c->layers, c->n_layers, "attention_heads.layers", s->in_layer, e) < 0)
        return -1;
    int n_layers = 0;
    for (int l = 0; l < L; l++) n_layers += s->in_layer[l];

    if (c->n_heads > 0 && c->has_top_k)
        return err_set(e, "attention_heads: give either heads or top_k, not both");
    if (c->n_heads == 0 && !c->has_top_k)
        return err_set(e, "attention_heads: set heads (query-head indices) or top_k");
    if (c->has_top_k) {
        if (c->top_k == 0 || c->top_k > (uint32_t)(n_layers * H))
            return err_set(e,
                           "attention_heads: top_k %u must be between 1 and the %d (layer, head) "
                           "pairs of the chosen layers",
                           c->top_k, n_layers * H);
        s->top_k = (int)c->top_k;
        /* Nothing trains until calibrate has ranked the heads. */
        return 0;
    }

    unsigned char want[H];
    memset(want, 0, sizeof want);
    for (size_t i = 0; i < c->n_heads; i++) {
        if (c->heads[i] >= (uint32_t)H)
            return err_set(e, "attention_heads: head %u does not exist: the model has %d (0 to %d)",
                           c->heads[i], H, H - 1);
        want[c->heads[i]] = 1;
    }
    int nh = 0;
    for (int h = 0; h < H; h++) nh += want[h];
    s->chosen_layer = malloc((size_t)(n_layers * nh) * sizeof(int));
    s->chosen_head = malloc((size_t)(n_layers * nh) * sizeof(int));
    if (!s->chosen_layer || !s->chosen_head) return err_set(e, "attention_heads: out of memory");
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H && s->in_layer[l]; h++)
            if (want[h]) {
                s->chosen_layer[s->n_chosen] = l;
                s->chosen_head[s->n_chosen++] = h;
            }
    if (declare_chosen(p, s, e) < 0) return err_wrap(e, "attention_heads");
    log_info("attention_heads: %d heads in each of %d layers, %zu parameters", nh, n_layers,
             peft_num_trainable(p));
    return 0;
}

typedef struct ranked {
    double imp;
    int layer, head;
} ranked;

/* Most important first; equal importance in (layer, head) order, so that
 * the choice is the same on every machine. */
static int by_importance(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->imp != y->imp) return x->imp > y->imp ? -1 : 1;
    if (x->layer != y->layer) return x->layer < y->layer ? -1 : 1;
    return (x->head > y->head) - (x->head < y->head);
}

static int by_position(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->layer != y->layer) return x->layer < y->layer ? -1 : 1;
    return (x->head > y->head) - (x->head < y->head);
}

/* After each calibration batch: its signed gate gradients become |.|. */
static void fold_batch(void *arg) {
    peft *p = arg;
    heads_state *s = p->state;
    size_t LH = (size_t)p->cfg->num_layers * p->cfg->num_heads;
    for (size_t j = 0; j < LH; j++) {
        s->importance[j] += fabs(s->batch_sum[j]);
        s->batch_sum[j] = 0;
    }
}

static int heads_calibrate(peft *p, model *m, peft_batch_fn fn, void *ctx, int batches, err *e) {
    heads_state *s = p->state;
    const model_config *cfg = p->cfg;
    int L = cfg->num_layers, H = cfg->num_heads;
    if (s->ready) return 0; /* explicit heads: nothing to measure */
    size_t LH = (size_t)L * H;
    free(s->importance);
    s->importance = calloc(LH, sizeof *s->importance);
    s->batch_sum = calloc(LH, sizeof *s->batch_sum);
    s->seen = calloc((size_t)L, 1);
    if (!s->importance || !s->batch_sum || !s->seen)
        return err_set(e, "attention_heads: out of memory for head importances");

    /* Every layer's backward must run to reach every head's gradient. */
    int saved = p->first_trainable_layer;
    p->first_trainable_layer = 0;
    s->calibrating = 1;
    int rc = delta_calibrate(&s->ds, m, fn, ctx, batches, fold_batch, p, e);
    s->calibrating = 0;
    p->first_trainable_layer = saved;
    free(s->batch_sum);
    s->batch_sum = NULL;
    if (rc < 0) return err_wrap(e, "attention_heads");
    for (int l = 0; l < L; l++)
        if (s->in_layer[l] && !s->seen[l])
            return err_set(e,
                           "attention_heads: the model gave no gradient of the o_proj input of "
                           "layer %d, so its heads cannot be ranked",
                           l);

    ranked *r = malloc(LH * sizeof *r);
    if (!r) return err_set(e, "attention_heads: out of memory");
    int nr = 0;
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H && s->in_layer[l]; h++)
            r[nr++] = (ranked){.imp = s->importance[(size_t)l * H + h], .layer = l, .head = h};
    qsort(r, (size_t)nr, sizeof *r, by_importance);
    qsort(r, (size_t)s->top_k, sizeof *r, by_position);
    free(s->chosen_layer);
    free(s->chosen_head);
    s->chosen_layer = malloc((size_t)s->top_k * sizeof(int));
    s->chosen_head = malloc((size_t)s->top_k * sizeof(int));
    if (!s->chosen_layer || !s->chosen_head) {
        free(r);
        return err_set(e, "attention_heads: out of memory");
    }
    for (int i = 0; i < s->top_k; i++) {
        s->chosen_layer[i] = r[i].layer;
        s->chosen_head[i] = r[i].head;
    }
    s->n_chosen = s->top_k;
    free(r);
    if (declare_chosen(p, s, e) < 0) return err_wrap(e, "attention_heads");

    char list[1024];
    size_t len = 0;
    for (int i = 0; i < s->n_chosen && len < sizeof list - 16; i++)
        len += (size_t)snprintf(list + len, sizeof list - len, "%s%d.%d", i ? " " : "",
                                s->chosen_layer[i], s->chosen_head[i]);
    log_info("attention_heads: top %d (layer.head) by importance over %d batches: %s, "
             "%zu parameters",
             s->top_k, batches, list, peft_num_trainable(p));
    return 0;
}

static void heads_linear_backward(peft *p, int layer, int kind, const float *x, const float *dy,
                                  float *dx, int n) {
    heads_state *s = p->state;
    if (s->calibrating && kind == LW_O && dx && layer >= 0 && layer < p->cfg->num_layers) {
        /* x is the concatenated head outputs (n, H*D) and dx their gradient:
         * a gate g_h on head h has dL/dg_h = sum over tokens of <x_h, dx_h>. */
        int H = p->cfg->num_heads, D = p->cfg->head_dim;
        double *sum = s->batch_sum + (size_t)layer * H;
        for (int t = 0; t < n; t++) {
            const float *xt = x + (size_t)t * H * D, *dxt = dx + (size_t)t * H * D;
            for (int h = 0; h < H; h++) {
                double acc = 0;
                for (int d = 0; d < D; d++) acc += (double)xt[h * D + d] * dxt[h * D + d];
                sum[h] += acc;
            }
        }
        s->seen[layer] = 1;
    }
    delta_method_linear_backward(p, layer, kind, x, dy, dx, n);
}

/* ---- the experiment's attention_heads block ------------------------------- */

static int heads_defaults(Peftps__Method *m) {
    CONFIG_DEFAULT(m->attention_heads, calibration_batches, HEADS_DEFAULT_CALIBRATION);
    return config_default_modules(&m->attention_heads->projections,
                                  &m->attention_heads->n_projections, PEFTPS__MODULE__Q_PROJ,
                                  PEFTPS__MODULE__O_PROJ);
}

static int heads_check(const config_checker *c, const Peftps__Method *m) {
    const Peftps__AttentionHeads *h = m->attention_heads;
    if (h->n_heads && h->has_top_k)
        return config_fail(c, "method.attention_heads.top_k|method.attention_heads.heads",
                           "method.attention_heads: set either heads or top_k, not both");
    if (!h->n_heads && !h->has_top_k)
        return config_fail(c, "method.attention_heads",
                           "method.attention_heads: set heads (query-head indices) or top_k");
    if (h->has_top_k && h->top_k == 0)
        return config_fail(c, "method.attention_heads.top_k",
                           "method.attention_heads.top_k must be > 0");
    if (h->has_top_k && h->calibration_batches == 0)
        return config_fail(c, "method.attention_heads.calibration_batches",
                           "method.attention_heads.calibration_batches must be > 0 with top_k "
                           "(importance is measured on calibration batches)");
    if (config_check_modules(c, "method.attention_heads.projections", h->projections,
                             h->n_projections, PEFTPS__MODULE__Q_PROJ, PEFTPS__MODULE__O_PROJ) ||
        config_check_indices(c, "method.attention_heads.layers", h->layers, h->n_layers, 0,
                             "layer"))
        return -1;
    return config_check_indices(c, "method.attention_heads.heads", h->heads, h->n_heads, 0, "head");
}

static int heads_check_model(const config_checker *c, const Peftps__Method *m,
                             const model_config *cfg) {
    const Peftps__AttentionHeads *h = m->attention_heads;
    long L = cfg->num_layers, H = cfg->num_heads;
    if (config_check_indices(c, "method.attention_heads.layers", h->layers, h->n_layers, L,
                             "layer") ||
        config_check_indices(c, "method.attention_heads.heads", h->heads, h->n_heads, H, "head"))
        return -1;
    long pairs = (h->n_layers ? (long)h->n_layers : L) * H;
    if (h->has_top_k && h->top_k > pairs)
        return config_fail(c, "method.attention_heads.top_k",
                           "method.attention_heads.top_k %u exceeds the %ld (layer, head) pairs "
                           "to choose from",
                           h->top_k, pairs);
    return 0;
}

/* top_k heads are ranked on calibration batches; explicit heads need none. */
static int heads_calibration_batches(const Peftps__Method *m) {
    const Peftps__AttentionHeads *h = m->attention_heads;
    return h->has_top_k && h->top_k > 0 ? (int)h->calibration_batches : 0;
}

const peft_method heads_method = {
    .name = "attention_heads",
    .example = "attention_heads { heads: [0] }",
    .defaults = heads_defaults,
    .check = heads_check,
    .check_model = heads_check_model,
    .calibration_batches = heads_calibration_batches,
    .create = heads_create,
    .calibrate = heads_calibrate,
    .init = delta_method_init,
    .refresh = delta_method_refresh,
    .reserve = delta_method_reserve,
    .weight = delta_method_weight,
    .linear_backward = heads_linear_backward,
    .merge = delta_method_merge,
    .destroy = heads_destroy,
};

int heads_chosen(const peft *p, int *layers, int *heads, int max) {
    if (!p || p->method != &heads_method || !p->state) return -1;
    const heads_state *s = p->state;
    if (!s->ready) return -1;
    for (int i = 0; i < s->n_chosen && i < max; i++) {
        if (layers) layers[i] = s->chosen_layer[i];
        if (heads) heads[i] = s->chosen_head[i];
    }
    return s->n_chosen;
}

double heads_importance(const peft *p, int layer, int head) {
    if (!p || p->method != &heads_method || !p->state) return -1;
    const heads_state *s = p->state;
    if (!s->importance || layer < 0 || layer >= p->cfg->num_layers || head < 0 ||
        head >= p->cfg->num_heads)
        return -1;
    return s->importance[(size_t)layer * p->cfg->num_heads + head];
}
