/* LoRA with Hugging Face PEFT's semantics: y += scaling * dropout(x) A^T B^T
 * on the chosen linears of the chosen layers, tensors named and shaped as in
 * a PEFT adapter_model.safetensors. Implements the peft_method of peft.h;
 * the model (model.c) calls its hooks, peft.c registers it. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/kernels.h"
#include "base/log.h"
#include "model/peft.h"
#include "base/rng.h"

/* PEFT's LoraConfig defaults. */
#define LORA_DEFAULT_R 8
#define LORA_DEFAULT_ALPHA 8.0f

/* One adapted linear: W (out, in) of `layer`, `kind`. */
typedef struct lora_site {
    int layer, kind;
    int in, out;
    int a, b;    /* tensor indices of lora_A (r, in) and lora_B (out, r) */
    float *h;    /* (cap, r): x_d A^T of the last forward */
    float *xd;   /* (cap, in): dropout(x) of the last forward; NULL without dropout */
    int dropped; /* the last forward applied dropout */
} lora_site;

typedef struct lora_state {
    int r;
    float scaling;
    float dropout;
    lora_site *sites;
    int n_sites;
    int *site_of; /* num_layers * LW_COUNT: site index or -1 */
    float *acts;  /* the one allocation behind every h and xd, and g */
    float *g;     /* (cap, r): dy B, backward scratch */
    size_t cap;   /* tokens the activations hold */
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
 * h (n, r) per site, xd (n, in) per site when dropout is configured, and
 * the shared backward scratch g (n, r). */
static int lora_reserve(peft *p, int B, int T, err *e) {
    lora_state *s = p->state;
    size_t n = (size_t)B * (size_t)T;
    if (n <= s->cap) return 0;
    size_t total = 0;
#define LORA_CHUNK(count) (((count) + 15) / 16 * 16)
    for (int i = 0; i < s->n_sites; i++) {
        total += LORA_CHUNK(n * (size_t)s->r);
        if (s->dropout > 0.0f) total += LORA_CHUNK(n * (size_t)s->sites[i].in);
    }
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
        s->sites[i].xd = NULL;
        if (s->dropout > 0.0f) {
            s->sites[i].xd = at;
            at += LORA_CHUNK(n * (size_t)s->sites[i].in);
        }
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

static void lora_linear_forward(peft *p, int layer, int kind, const float *x, float *y, int n) {
    lora_state *s = p->state;
    lora_site *site = lora_find(p, layer, kind);
    if (!site || n <= 0) return;
    lora_check_capacity(s, n);
    int r = s->r, in = site->in, out = site->out;
    const float *a = peft_param(p, site->a); /* (r, in) */
    const float *b = peft_param(p, site->b); /* (out, r) */
    const float *xin = x;                    /* (n, in) */
    site->dropped = p->training && s->dropout > 0.0f;
    if (site->dropped) {
        rng g;
        lora_dropout_stream(p, site, &g);
        float keep_scale = 1.0f / (1.0f - s->dropout);
        size_t count = (size_t)n * (size_t)in;
        for (size_t i = 0; i < count; i++)
            site->xd[i] = rng_uniform(&g) < s->dropout ? 0.0f : x[i] * keep_scale;
        xin = site->xd;
    }
    /* h (n, r) = xin A^T; y (n, out) += scaling * h B^T */
    lowrank_forward(y, site->h, xin, a, b, s->scaling, n, in, r, out);
}

static void lora_linear_backward(peft *p, int layer, int kind, const float *x, const float *dy,
                                 float *dx, int n) {
    lora_state *s = p->state;
    lora_site *site = lora_find(p, layer, kind);
    if (!site || n <= 0) return;
    lora_check_capacity(s, n);
    int r = s->r, in = site->in, out = site->out;
    const float *a = peft_param(p, site->a); /* (r, in) */
    const float *b = peft_param(p, site->b); /* (out, r) */
    float *da = peft_grad(p, site->a);
    float *db = peft_grad(p, site->b);
    const float *xin = site->dropped ? site->xd : x; /* (n, in) */
    float sc = s->scaling;

    /* g (n, r) = dy B; dB (out, r) += scaling * dy^T h; dA (r, in) +=
     * scaling * g^T xin; dx (n, in) += scaling * g A, unless through the
     * dropout, done below. */
    lowrank_backward(da, db, site->dropped ? NULL : dx, s->g, dy, xin, site->h, a, b, sc, n, in, r,
                     out);
    if (!dx || !site->dropped) return;
    /* Through the dropout: xd is dead once dA has it, so it holds g A. */
    float *t = site->xd;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, in, r, sc, s->g, r, a, in, 0.0f, t,
                in);
    rng g;
    lora_dropout_stream(p, site, &g);
    float keep_scale = 1.0f / (1.0f - s->dropout);
    size_t count = (size_t)n * (size_t)in;
    for (size_t i = 0; i < count; i++)
        if (!(rng_uniform(&g) < s->dropout)) dx[i] += t[i] * keep_scale;
    site->dropped = 0; /* xd no longer holds the forward's input */
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

const peft_method lora_method = {
    .name = "lora",
    .create = lora_create,
    .init = lora_init,
    .reserve = lora_reserve,
    .weight = lora_weight,
    .linear_forward = lora_linear_forward,
    .linear_backward = lora_linear_backward,
    .merge = lora_merge,
    .destroy = lora_destroy,
};
