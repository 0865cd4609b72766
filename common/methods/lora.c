/* LoRA with Hugging Face PEFT's semantics: y += scaling * dropout(x) A^T B^T
 * on the chosen linears of the chosen layers, tensors named and shaped as in
 * a PEFT adapter_model.safetensors. Implements the peft_method of peft.h:
 * the model (model.c) calls its compute hooks, the experiment loader its
 * defaults and checks, export.c its adapter_config.json reader and writer
 * (jansson); methods/registry.c registers it. */
#include <cblas.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/kernels.h"
#include "base/log.h"
#include "model/peft.h"
#include "base/rng.h"

/* The defaults of an experiment's lora block. r is LoraConfig's; alpha is
 * 16 (scaling 2 at r 8), not LoraConfig's 8: every experiment has been
 * resolved with 16 and its fingerprint records it. */
#define LORA_DEFAULT_R 8
#define LORA_DEFAULT_ALPHA 16.0f

/* One adapted linear: W (out, in) of `layer`, `kind`. */
typedef struct lora_site {
    int layer, kind;
    int in, out;
    int a, b;    /* tensor indices of lora_A (r, in) and lora_B (out, r) */
    float *h;    /* (cap, r): x_d A^T of the last forward */
    int dropped; /* the last forward applied dropout */
} lora_site;

typedef struct lora_state {
    int r;
    float scaling;
    float dropout;
    lora_site *sites;
    int n_sites;
    int *site_of; /* num_layers * LW_COUNT: site index or -1 */
    float *acts;  /* the one allocation behind every h, xd and g */
    /* (cap, largest in): dropout(x) of the site at hand, NULL without
     * dropout. One for all sites: the backward draws the mask again from
     * its stream rather than keeping every site's dropped input (for an
     * 8B model at 512 tokens, all seven projections: 2.5 GB). */
    float *xd;
    float *g;   /* (cap, r): dy B, backward scratch */
    size_t cap; /* tokens the activations hold */
} lora_state;

static lora_site *lora_find(peft *p, int layer, int kind) {
    lora_state *s = p->state;
    if (layer < 0 || layer >= p->cfg->num_layers || kind < 0 || kind >= LW_COUNT) return NULL;
    int i = s->site_of[layer * LW_COUNT + kind];
    return i < 0 ? NULL : &s->sites[i];
}

/* "model.layers.3.self_attn.q_proj.weight" -> PEFT's
 * "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight". */
static void lora_tensor_name(const model_config *cfg, int layer, int kind, char which, char *buf,
                             size_t n) {
    char base[PEFT_NAME_MAX];
    model_weight_name(cfg, layer, kind, base, sizeof base);
    size_t len = strlen(base);
    const char *suffix = ".weight";
    if (len >= strlen(suffix) && !strcmp(base + len - strlen(suffix), suffix))
        base[len - strlen(suffix)] = '\0';
    /* HF module paths are far below 120 characters; the bound keeps the
     * name within PEFT_NAME_MAX. */
    snprintf(buf, n, "base_model.model.%.120s.lora_%c.weight", base, which);
}

static int lora_create(peft *p, err *e) {
    const Peftps__LoRA *c = p->config->lora;
    const model_config *cfg = p->cfg;
    if (!c) return err_set(e, "the lora block is missing");
    uint32_t r = c->has_r ? c->r : LORA_DEFAULT_R;
    float alpha = c->has_alpha ? c->alpha : LORA_DEFAULT_ALPHA;
    float dropout = c->has_dropout ? c->dropout : 0.0f;
    if (r == 0 || r > 65536) return err_set(e, "lora.r is %u: must be in 1..65536", r);
    if (!isfinite(alpha)) return err_set(e, "lora.alpha is not a finite number");
    if (!(dropout >= 0.0f && dropout < 1.0f))
        return err_set(e, "lora.dropout is %g: must be in [0, 1)", (double)dropout);
    unsigned mask;
    if (peft_module_mask(c->target_modules, c->n_target_modules, PEFT_BIT(LW_Q) | PEFT_BIT(LW_V),
                         PEFT_LINEARS, "lora.target_modules", &mask, e) < 0)
        return -1;

    lora_state *s = calloc(1, sizeof *s);
    if (!s) return err_set(e, "out of memory");
    p->state = s; /* lora_destroy frees it and what follows, also on failure */
    s->r = (int)r;
    s->scaling = c->use_rslora ? alpha / sqrtf((float)r) : alpha / (float)r;
    s->dropout = dropout;
    size_t slots = (size_t)cfg->num_layers * LW_COUNT;
    s->site_of = malloc(slots * sizeof *s->site_of);
    s->sites = calloc(slots, sizeof *s->sites);
    unsigned char *chosen = malloc((size_t)cfg->num_layers);
    if (!s->site_of || !s->sites || !chosen) {
        free(chosen);
        return err_set(e, "out of memory");
    }
    for (size_t i = 0; i < slots; i++) s->site_of[i] = -1;
    if (peft_layer_list(cfg, c->layers, c->n_layers, "lora.layers", chosen, e) < 0) {
        free(chosen);
        return -1;
    }

    p->first_trainable_layer = cfg->num_layers;
    for (int l = 0; l < cfg->num_layers; l++) {
        if (!chosen[l]) continue;
        if (l < p->first_trainable_layer) p->first_trainable_layer = l;
        for (int kind = LW_Q; kind <= LW_DOWN; kind++) {
            if (!(mask & PEFT_BIT(kind))) continue;
            lora_site *site = &s->sites[s->n_sites];
            site->layer = l;
            site->kind = kind;
            model_weight_shape(cfg, l, kind, &site->out, &site->in);
            char name[PEFT_NAME_MAX];
            int64_t shape_a[2] = {(int64_t)r, site->in}, shape_b[2] = {site->out, (int64_t)r};
            lora_tensor_name(cfg, l, kind, 'A', name, sizeof name);
            site->a = peft_add_tensor(p, name, 2, shape_a, e);
            lora_tensor_name(cfg, l, kind, 'B', name, sizeof name);
            if (site->a < 0 || (site->b = peft_add_tensor(p, name, 2, shape_b, e)) < 0) {
                free(chosen);
                return -1;
            }
            s->site_of[l * LW_COUNT + kind] = s->n_sites++;
        }
    }
    free(chosen);
    return 0;
}

static void lora_init(peft *p, uint64_t seed) {
    lora_state *s = p->state;
    for (int i = 0; i < s->n_sites; i++) {
        lora_site *site = &s->sites[i];
        /* PEFT: kaiming_uniform_(A, a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in));
         * B zeros, so the adapted model starts as the base. */
        float bound = 1.0f / sqrtf((float)site->in);
        float *a = peft_param(p, site->a);
        rng g;
        rng_seed(&g, seed, PEFT_STREAM_INIT, (uint64_t)site->a, 0);
        for (size_t j = 0; j < p->tensors[site->a].numel; j++)
            a[j] = (2.0f * rng_uniform(&g) - 1.0f) * bound;
        memset(peft_param(p, site->b), 0, p->tensors[site->b].numel * sizeof(float));
    }
}

/* Carves every site's activations for n tokens out of one allocation:
 * h (n, r) per site, the shared xd (n, largest in) when dropout is
 * configured, and the shared backward scratch g (n, r). */
static int lora_reserve(peft *p, int B, int T, err *e) {
    lora_state *s = p->state;
    size_t n = (size_t)B * (size_t)T;
    if (n <= s->cap) return 0;
    size_t total = 0, in_max = 0;
#define LORA_CHUNK(count) (((count) + 15) / 16 * 16)
    for (int i = 0; i < s->n_sites; i++) {
        total += LORA_CHUNK(n * (size_t)s->r);
        if ((size_t)s->sites[i].in > in_max) in_max = (size_t)s->sites[i].in;
    }
    if (s->dropout > 0.0f) total += LORA_CHUNK(n * in_max);
    total += LORA_CHUNK(n * (size_t)s->r);
    float *acts = aligned_alloc(64, total * sizeof(float));
    if (!acts)
        return err_set(e, "lora: out of memory for the activations of %zu tokens (%zu MiB)", n,
                       total * sizeof(float) >> 20);
    free(s->acts);
    s->acts = acts;
    float *at = acts;
    for (int i = 0; i < s->n_sites; i++) {
        s->sites[i].h = at;
        at += LORA_CHUNK(n * (size_t)s->r);
    }
    s->xd = NULL;
    if (s->dropout > 0.0f) {
        s->xd = at;
        at += LORA_CHUNK(n * in_max);
    }
    s->g = at;
#undef LORA_CHUNK
    s->cap = n;
    return 0;
}

/* The hooks cannot return errors; more tokens than reserved is a bug of
 * the caller, and writing past the buffers would be worse than stopping. */
static void lora_check_capacity(const lora_state *s, int n) {
    if ((size_t)n > s->cap) {
        log_error("lora: %d tokens but only %zu reserved (reserve() not called with this B*T)", n,
                  s->cap);
        abort();
    }
}

/* The inverted-dropout stream of a site for the current (seed, step,
 * shard): one uniform per input element, in row-major order, so the
 * backward regenerates exactly the forward's mask. */
static void lora_dropout_stream(const peft *p, const lora_site *site, rng *g) {
    rng_seed(g, p->seed, p->step, p->shard, (uint64_t)site->a);
}

/* s->xd (n, in) = dropout(x) of a site, the same bits each time it is
 * drawn for one (seed, step, shard): the forward's, and the backward's
 * again from the same x. */
static float *lora_drop(const peft *p, const lora_site *site, const float *x, int n) {
    const lora_state *s = p->state;
    rng g;
    lora_dropout_stream(p, site, &g);
    float keep_scale = 1.0f / (1.0f - s->dropout);
    size_t count = (size_t)n * (size_t)site->in;
    for (size_t i = 0; i < count; i++)
        s->xd[i] = rng_uniform(&g) < s->dropout ? 0.0f : x[i] * keep_scale;
    return s->xd;
}

/* The site of linear (layer, kind) for a pass over n rows, with its factors
 * a (r, in) and b (out, r); NULL when LoRA does not adapt that linear. */
static lora_site *lora_site_for(peft *p, int layer, int kind, int n, const float **a,
                                const float **b) {
    lora_site *site = lora_find(p, layer, kind);
    if (!site || n <= 0) return NULL;
    lora_check_capacity(p->state, n);
    *a = peft_param(p, site->a);
    *b = peft_param(p, site->b);
    return site;
}

static void lora_linear_forward(peft *p, int layer, int kind, const float *x, float *y, int n) {
    lora_state *s = p->state;
    const float *a, *b;
    lora_site *site = lora_site_for(p, layer, kind, n, &a, &b);
    if (!site) return;
    int r = s->r, in = site->in, out = site->out;
    const float *xin = x; /* (n, in) */
    site->dropped = p->training && s->dropout > 0.0f;
    if (site->dropped) xin = lora_drop(p, site, x, n);
    /* h (n, r) = xin A^T; y (n, out) += scaling * h B^T */
    lowrank_forward(y, site->h, xin, a, b, s->scaling, n, in, r, out);
}

static void lora_linear_backward(peft *p, int layer, int kind, const float *x, const float *dy,
                                 float *dx, int n) {
    lora_state *s = p->state;
    const float *a, *b;
    lora_site *site = lora_site_for(p, layer, kind, n, &a, &b);
    if (!site) return;
    int r = s->r, in = site->in, out = site->out;
    float *da = peft_grad(p, site->a);
    float *db = peft_grad(p, site->b);
    /* The forward's input to the branch: dropout(x) drawn again. */
    const float *xin = site->dropped ? lora_drop(p, site, x, n) : x; /* (n, in) */
    float sc = s->scaling;

    /* g (n, r) = dy B; dB (out, r) += scaling * dy^T h; dA (r, in) +=
     * scaling * g^T xin; dx (n, in) += scaling * g A, unless through the
     * dropout, done below. */
    lowrank_backward(da, db, site->dropped ? NULL : dx, s->g, dy, xin, site->h, a, b, sc, n, in, r,
                     out);
    if (!dx || !site->dropped) return;
    /* Through the dropout: xd is dead once dA has it, so it holds g A. */
    float *t = s->xd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, r, sc, s->g, r, a, in, 0.0f, t,
                in);
    rng g;
    lora_dropout_stream(p, site, &g);
    float keep_scale = 1.0f / (1.0f - s->dropout);
    size_t count = (size_t)n * (size_t)in;
    for (size_t i = 0; i < count; i++)
        if (!(rng_uniform(&g) < s->dropout)) dx[i] += t[i] * keep_scale;
    site->dropped = 0;
}

static const float *lora_weight(peft *p, int layer, int kind) {
    return NULL;
}

/* w (out, in) += scaling * B A, as PEFT's merge_and_unload. */
static void lora_merge(peft *p, int layer, int kind, float *w) {
    lora_state *s = p->state;
    lora_site *site = lora_find(p, layer, kind);
    if (!site) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, site->out, site->in, s->r, s->scaling,
                peft_param(p, site->b), s->r, peft_param(p, site->a), site->in, 1.0f, w, site->in);
}

static void lora_destroy(peft *p) {
    lora_state *s = p->state;
    if (!s) return;
    free(s->acts);
    free(s->sites);
    free(s->site_of);
    free(s);
    p->state = NULL;
}

/* ---- the experiment's lora block ---------------------------------------- */

static int lora_defaults(Peftps__Method *m) {
    Peftps__LoRA *c = m->lora;
    CONFIG_DEFAULT(c, r, LORA_DEFAULT_R);
    CONFIG_DEFAULT(c, alpha, LORA_DEFAULT_ALPHA);
    CONFIG_DEFAULT(c, dropout, 0.0f);
    CONFIG_DEFAULT(c, use_rslora, 0);
    if (!c->n_target_modules) {
        c->target_modules = malloc(2 * sizeof *c->target_modules);
        if (!c->target_modules) return -1;
        c->target_modules[0] = PEFTPS__MODULE__Q_PROJ;
        c->target_modules[1] = PEFTPS__MODULE__V_PROJ;
        c->n_target_modules = 2;
    }
    return 0;
}

static int lora_check(const config_checker *c, const Peftps__Method *m) {
    const Peftps__LoRA *l = m->lora;
    if (l->r == 0) return config_fail(c, "method.lora.r", "method.lora.r must be > 0");
    if (!(l->alpha > 0))
        return config_fail(c, "method.lora.alpha", "method.lora.alpha must be > 0, got %g",
                           (double)l->alpha);
    if (!(l->dropout >= 0 && l->dropout < 1))
        return config_fail(c, "method.lora.dropout",
                           "method.lora.dropout must be in [0, 1), got %g", (double)l->dropout);
    if (config_check_modules(c, "method.lora.target_modules", l->target_modules,
                             l->n_target_modules, PEFTPS__MODULE__Q_PROJ,
                             PEFTPS__MODULE__DOWN_PROJ))
        return -1;
    return config_check_indices(c, "method.lora.layers", l->layers, l->n_layers, 0, "layer");
}

static int lora_check_model(const config_checker *c, const Peftps__Method *m,
                            const model_config *cfg) {
    return config_check_indices(c, "method.lora.layers", m->lora->layers, m->lora->n_layers,
                                cfg->num_layers, "layer");
}

/* ---- the PEFT adapter: adapter_config.json -------------------------------- */

/* A float as the shortest decimal that reads back to it, as a double: what
 * Python writes for the same setting (0.05, not 0.0500000007...). */
static double short_double(float f) {
    char buf[32];
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)f);
        if (strtof(buf, NULL) == f) break;
    }
    return strtod(buf, NULL);
}

/* A whole number as a JSON integer (PEFT writes lora_alpha: 16), else a real. */
static json_t *json_number_of(float f) {
    if (f == (float)(long long)f && f > -1e15f && f < 1e15f) return json_integer((long long)f);
    return json_real(short_double(f));
}

/* layers_to_transform: null for every layer, else the chosen ones. */
static json_t *lora_layers_json(const peft *p, err *e) {
    const Peftps__LoRA *l = p->config->lora;
    const model_config *cfg = p->cfg;
    unsigned char *chosen = malloc((size_t)cfg->num_layers);
    if (!chosen) {
        err_set(e, "out of memory");
        return NULL;
    }
    if (peft_layer_list(cfg, l->layers, l->n_layers, "lora.layers", chosen, e) < 0) {
        free(chosen);
        return NULL;
    }
    int all = 1;
    for (int i = 0; i < cfg->num_layers; i++) all &= chosen[i];
    json_t *layers = all ? json_null() : json_array();
    for (int i = 0; i < cfg->num_layers && layers && !all; i++)
        if (chosen[i]) json_array_append_new(layers, json_integer(i));
    free(chosen);
    if (!layers) err_set(e, "out of memory");
    return layers;
}

/* LoraConfig's fields: ours from the block, the rest at PEFT's defaults. */
static int lora_adapter_config_write(const peft *p, json_t *o, err *e) {
    const Peftps__LoRA *l = p->config->lora;
    unsigned mask;
    if (peft_module_mask(l->target_modules, l->n_target_modules, PEFT_BIT(LW_Q) | PEFT_BIT(LW_V),
                         PEFT_LINEARS, "lora.target_modules", &mask, e) < 0)
        return -1;
    json_t *layers = lora_layers_json(p, e);
    if (!layers) return -1;
    json_t *tm = json_array();
    for (int k = LW_Q; k <= LW_DOWN; k++)
        if (mask & PEFT_BIT(k)) json_array_append_new(tm, json_string(peft_weight_module_name(k)));
    float alpha = l->has_alpha ? l->alpha : LORA_DEFAULT_ALPHA;
    uint32_t r = l->has_r ? l->r : LORA_DEFAULT_R;
    json_object_set_new(o, "alora_invocation_tokens", json_null());
    json_object_set_new(o, "alpha_pattern", json_object());
    json_object_set_new(o, "arrow_config", json_null());
    json_object_set_new(o, "bias", json_string("none"));
    json_object_set_new(o, "corda_config", json_null());
    json_object_set_new(o, "ensure_weight_tying", json_false());
    json_object_set_new(o, "eva_config", json_null());
    json_object_set_new(o, "exclude_modules", json_null());
    json_object_set_new(o, "fan_in_fan_out", json_false());
    json_object_set_new(o, "init_lora_weights", json_true());
    json_object_set_new(o, "layer_replication", json_null());
    json_object_set_new(o, "layers_pattern", json_null());
    json_object_set_new(o, "layers_to_transform", layers);
    json_object_set_new(o, "loftq_config", json_object());
    json_object_set_new(o, "lora_alpha", json_number_of(alpha));
    json_object_set_new(o, "lora_bias", json_false());
    json_object_set_new(o, "lora_dropout",
                        json_real(short_double(l->has_dropout ? l->dropout : 0)));
    json_object_set_new(o, "megatron_config", json_null());
    json_object_set_new(o, "megatron_core", json_string("megatron.core"));
    json_object_set_new(o, "modules_to_save", json_null());
    json_object_set_new(o, "peft_type", json_string("LORA"));
    json_object_set_new(o, "qalora_group_size", json_integer(16));
    json_object_set_new(o, "r", json_integer(r));
    json_object_set_new(o, "rank_pattern", json_object());
    json_object_set_new(o, "target_modules", tm);
    json_object_set_new(o, "target_parameters", json_null());
    json_object_set_new(o, "trainable_token_indices", json_null());
    json_object_set_new(o, "use_dora", json_false());
    json_object_set_new(o, "use_qalora", json_false());
    json_object_set_new(o, "use_rslora", json_boolean(l->use_rslora));
    return 0;
}

/* Whether a field holds something other than PEFT's "nothing" (absent,
 * null, false, or an empty list or object). */
static int json_set(const json_t *root, const char *key) {
    const json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v) || json_is_false(v)) return 0;
    if (json_is_array(v)) return json_array_size(v) > 0;
    if (json_is_object(v)) return json_object_size(v) > 0;
    return 1;
}

/* LoraConfig's settings peftps does not implement must be left at "nothing". */
static int lora_read_unsupported(const char *path, const json_t *root, err *e) {
    static const char *const unsupported[] = {
        "use_dora",
        "lora_bias",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",
        "layer_replication",
        "target_parameters",
        "exclude_modules",
        "trainable_token_indices",
        "alora_invocation_tokens",
    };
    for (size_t i = 0; i < sizeof unsupported / sizeof unsupported[0]; i++)
        if (json_set(root, unsupported[i]))
            return err_set(e, "%s: \"%s\" is set; peftps's LoRA does not implement it", path,
                           unsupported[i]);
    const json_t *bias = json_object_get(root, "bias");
    if (bias && !json_is_null(bias) &&
        !(json_is_string(bias) && !strcmp(json_string_value(bias), "none")))
        return err_set(e, "%s: \"bias\" must be \"none\" (peftps's LoRA trains no bias)", path);
    return 0;
}

/* target_modules: a list of the seven linears' names, or "all-linear". */
static int lora_read_targets(const char *path, const json_t *root, Peftps__LoRA *l, err *e) {
    const json_t *tm = json_object_get(root, "target_modules");
    unsigned mask = 0;
    if (json_is_string(tm)) {
        if (strcmp(json_string_value(tm), "all-linear"))
            return err_set(e,
                           "%s: \"target_modules\" is the regular expression \"%s\"; peftps "
                           "needs a list of module names (q_proj, k_proj, v_proj, o_proj, "
                           "gate_proj, up_proj, down_proj) or \"all-linear\"",
                           path, json_string_value(tm));
        mask = PEFT_LINEARS;
    } else if (json_is_array(tm) && json_array_size(tm) > 0) {
        size_t i;
        const json_t *v;
        json_array_foreach(tm, i, v) {
            int kind = -1;
            for (int k = LW_Q; k <= LW_DOWN && json_is_string(v); k++)
                if (!strcmp(json_string_value(v), peft_weight_module_name(k))) kind = k;
            if (kind < 0)
                return err_set(e,
                               "%s: target_modules[%zu] is not one of q_proj, k_proj, v_proj, "
                               "o_proj, gate_proj, up_proj, down_proj",
                               path, i);
            mask |= PEFT_BIT(kind);
        }
    } else {
        return err_set(e, "%s: \"target_modules\" must be a non-empty list of module names", path);
    }
    l->target_modules = malloc(LW_COUNT * sizeof *l->target_modules);
    if (!l->target_modules) return err_set(e, "out of memory");
    for (int k = LW_Q; k <= LW_DOWN; k++)
        if (mask & PEFT_BIT(k))
            l->target_modules[l->n_target_modules++] =
                (Peftps__Module)(PEFTPS__MODULE__Q_PROJ + (k - LW_Q));
    return 0;
}

/* layers_pattern and layers_to_transform: a subset of the decoder layers. */
static int lora_read_layers(const char *path, const json_t *root, const model_config *cfg,
                            Peftps__LoRA *l, err *e) {
    const json_t *pat = json_object_get(root, "layers_pattern");
    if (pat && !json_is_null(pat)) {
        const json_t *one =
            json_is_array(pat) && json_array_size(pat) == 1 ? json_array_get(pat, 0) : pat;
        if (!json_is_string(one) || strcmp(json_string_value(one), "layers"))
            return err_set(e, "%s: \"layers_pattern\" must be \"layers\" for Llama models", path);
    }
    const json_t *ltt = json_object_get(root, "layers_to_transform");
    if (!ltt || json_is_null(ltt)) return 0;
    size_t n = json_is_array(ltt) ? json_array_size(ltt) : 1;
    l->layers = malloc((n ? n : 1) * sizeof *l->layers);
    if (!l->layers) return err_set(e, "out of memory");
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_is_array(ltt) ? json_array_get(ltt, i) : ltt;
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            (cfg && json_integer_value(v) >= cfg->num_layers) || json_integer_value(v) > UINT32_MAX)
            return err_set(e,
                           "%s: layers_to_transform entry %zu is not a layer index of the "
                           "model%s",
                           path, i, cfg ? "" : " (a non-negative integer)");
        l->layers[l->n_layers++] = (uint32_t)json_integer_value(v);
    }
    return 0;
}

static int lora_adapter_config_read(const char *path, const json_t *root, const model_config *cfg,
                                    Peftps__Method *m, err *e) {
    Peftps__LoRA *l = malloc(sizeof *l);
    if (!l) return err_set(e, "out of memory");
    peftps__lo_ra__init(l);
    m->kind_case = PEFTPS__METHOD__KIND_LORA;
    m->lora = l;
    if (lora_read_unsupported(path, root, e) < 0) return -1;
    const json_t *r = json_object_get(root, "r");
    if (!json_is_integer(r) || json_integer_value(r) < 1 || json_integer_value(r) > 65536)
        return err_set(e, "%s: \"r\" must be an integer from 1 to 65536", path);
    l->has_r = 1;
    l->r = (uint32_t)json_integer_value(r);
    const json_t *alpha = json_object_get(root, "lora_alpha");
    if (!json_is_number(alpha)) return err_set(e, "%s: \"lora_alpha\" must be a number", path);
    l->has_alpha = 1;
    l->alpha = (float)json_number_value(alpha);
    const json_t *drop = json_object_get(root, "lora_dropout");
    if (drop && !json_is_null(drop)) {
        if (!json_is_number(drop)) return err_set(e, "%s: \"lora_dropout\" must be a number", path);
        l->has_dropout = 1;
        l->dropout = (float)json_number_value(drop);
    }
    l->has_use_rslora = 1;
    l->use_rslora = json_is_true(json_object_get(root, "use_rslora"));
    if (lora_read_targets(path, root, l, e) < 0) return -1;
    return lora_read_layers(path, root, cfg, l, e);
}

/* The tensors already carry the names of PEFT's state dict. */
static int lora_adapter_save(const peft *p, const char *path, err *e) {
    return peft_save(p, path, e);
}

const peft_method lora_method = {
    .name = "lora",
    .example = "lora { r: 8 }",
    .defaults = lora_defaults,
    .check = lora_check,
    .check_model = lora_check_model,
    .peft_type = "LORA",
    .adapter_config_write = lora_adapter_config_write,
    .adapter_config_read = lora_adapter_config_read,
    .adapter_save = lora_adapter_save,
    .create = lora_create,
    .init = lora_init,
    .reserve = lora_reserve,
    .weight = lora_weight,
    .linear_forward = lora_linear_forward,
    .linear_backward = lora_linear_backward,
    .merge = lora_merge,
    .destroy = lora_destroy,
};
