/* The method interface of peft.h: the flat params/grads layout every method
 * declares its tensors into, the helpers the methods share (module and layer
 * lists), and saving/loading the tensors as safetensors. The methods and
 * their registry live one floor up, in methods/ (methods/registry.h). */
#include "model/peft.h"
#include "model/bf16.h"
#include "base/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "model/clshead.h"
#include "model/safetensors.h"

/* Tensors start on 16-float (64-byte) boundaries so that each one is
 * aligned for SIMD loads, like the buffers themselves. */
#define PEFT_ALIGN_FLOATS 16

static size_t peft_round_up(size_t n, size_t to) {
    return (n + to - 1) / to * to;
}

/* A zeroed, 64-byte aligned buffer of at least n floats (never NULL for
 * n == 0, so that params/grads are always valid pointers). */
static float *peft_alloc_floats(size_t n) {
    size_t bytes = peft_round_up((n ? n : 1) * sizeof(float), 64);
    float *f = aligned_alloc(64, bytes);
    if (f) memset(f, 0, bytes);
    return f;
}

/* Gives params and grads room for n_params floats, keeping their contents. */
static int peft_grow_buffers(peft *p, size_t old_n, err *e) {
    float *params = peft_alloc_floats(p->n_params);
    float *grads = peft_alloc_floats(p->n_params);
    if (!params || !grads) {
        free(params);
        free(grads);
        return err_set(e, "out of memory for %zu trainable parameters", p->n_params);
    }
    if (p->params) memcpy(params, p->params, old_n * sizeof(float));
    if (p->grads) memcpy(grads, p->grads, old_n * sizeof(float));
    free(p->params);
    free(p->grads);
    p->params = params;
    p->grads = grads;
    return 0;
}

int peft_create(peft **out, const peft_method *m, const Peftps__Method *config,
                const model_config *cfg, const model_weights *base, err *e) {
    *out = NULL;
    if (!m) return err_set(e, "the experiment has no method block");
    peft *p = calloc(1, sizeof *p);
    if (!p) return err_set(e, "out of memory");
    p->method = m;
    p->cfg = cfg;
    p->base = base;
    p->config = config;
    p->first_trainable_layer = cfg->num_layers;
    p->score = -1;
    p->pad_id = -1;
    if (m->create(p, e) < 0) {
        err_wrap(e, "method %s", m->name);
        peft_free(p);
        return -1;
    }
    if (peft_grow_buffers(p, 0, e) < 0) {
        err_wrap(e, "method %s", m->name);
        peft_free(p);
        return -1;
    }
    *out = p;
    return 0;
}

int peft_calibrate(peft *p, model *m, peft_batch_fn fn, void *ctx, int batches, err *e) {
    if (!p->method->calibrate) return 0;
    if (p->method->calibrate(p, m, fn, ctx, batches, e) < 0)
        return err_wrap(e, "calibrating method %s", p->method->name);
    return 0;
}

int peft_reserve(peft *p, int B, int T, err *e) {
    if (!p || !p->method->reserve || p->method->reserve(p, B, T, e) == 0) return 0;
    return err_wrap(e, "method %s", p->method->name);
}

void peft_init(peft *p, uint64_t seed) {
    if (p->method->init) p->method->init(p, seed);
    peft_refresh(p);
}

void peft_free(peft *p) {
    if (!p) return;
    if (p->method && p->method->destroy) p->method->destroy(p);
    free(p->tensors);
    free(p->params);
    free(p->grads);
    free(p->low);
    free(p->low_of);
    free(p);
}

int peft_add_tensor(peft *p, const char *name, int ndim, const int64_t *shape, err *e) {
    if (strlen(name) >= PEFT_NAME_MAX)
        return err_set(e, "tensor name \"%s\" is longer than %d characters", name,
                       PEFT_NAME_MAX - 1);
    if (ndim < 1 || ndim > PEFT_MAX_DIMS)
        return err_set(e, "tensor %s: %d dimensions (1 to %d supported)", name, ndim,
                       PEFT_MAX_DIMS);
    size_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] <= 0)
            return err_set(e, "tensor %s: dimension %d is %lld (must be positive)", name, d,
                           (long long)shape[d]);
        numel *= (size_t)shape[d];
    }
    if (peft_find_tensor(p, name) >= 0) return err_set(e, "tensor %s declared twice", name);
    if (p->n_tensors == p->cap_tensors) {
        int cap = p->cap_tensors ? 2 * p->cap_tensors : 16;
        peft_tensor *t = realloc(p->tensors, (size_t)cap * sizeof *t);
        if (!t) return err_set(e, "out of memory declaring tensor %s", name);
        p->tensors = t;
        p->cap_tensors = cap;
    }
    peft_tensor *t = &p->tensors[p->n_tensors];
    memset(t, 0, sizeof *t);
    strcpy(t->name, name);
    t->ndim = ndim;
    for (int d = 0; d < ndim; d++) t->shape[d] = shape[d];
    t->offset = peft_round_up(p->n_params, PEFT_ALIGN_FLOATS);
    t->numel = numel;
    size_t old_n = p->n_params;
    p->n_params = t->offset + numel;
    /* A method that decides what trains in calibrate declares tensors after
     * the buffers exist; they grow, zeroed, keeping what is there. */
    if (p->params && peft_grow_buffers(p, old_n, e) < 0) {
        p->n_params = old_n;
        return err_wrap(e, "declaring tensor %s", name);
    }
    return p->n_tensors++;
}

int peft_find_tensor(const peft *p, const char *name) {
    for (int i = 0; i < p->n_tensors; i++)
        if (!strcmp(p->tensors[i].name, name)) return i;
    return -1;
}

float *peft_param(peft *p, int i) {
    return p->params + p->tensors[i].offset;
}

float *peft_grad(peft *p, int i) {
    return p->grads + p->tensors[i].offset;
}

static int is_matrix(int layer, int kind) {
    return layer == MODEL_GLOBAL ? kind != GW_FINAL_NORM : kind >= LW_Q && kind <= LW_DOWN;
}

/* Rounds the method's matrices to BF16 (see bf16_weights), allocating the
 * copy at the first call; without memory the products stay F32 (logged). */
static void refresh_low(peft *p) {
    const model_config *c = p->cfg;
    size_t slots = (size_t)(c->num_layers + 1) * LW_COUNT;
    if (!p->low_of) {
        size_t total = 0;
        for (int l = MODEL_GLOBAL; l < c->num_layers; l++)
            for (int k = 0; k < (l < 0 ? GW_COUNT : LW_COUNT); k++)
                if (is_matrix(l, k) && p->method->weight(p, l, k))
                    total += (model_weight_shape(c, l, k, NULL, NULL) + 31) / 32 * 32;
        p->low_of = calloc(slots, sizeof *p->low_of);
        p->low = aligned_alloc(64, (total ? total : 32) * sizeof *p->low);
        if (!p->low_of || !p->low) {
            log_warn("%s: no memory for the BF16 copy of its weights (%zu MB): its products run "
                     "in F32",
                     p->method->name, total * 2 >> 20);
            free(p->low_of), free(p->low);
            p->low_of = NULL, p->low = NULL;
            return;
        }
        size_t off = 0;
        for (int l = MODEL_GLOBAL; l < c->num_layers; l++)
            for (int k = 0; k < (l < 0 ? GW_COUNT : LW_COUNT); k++)
                if (is_matrix(l, k) && p->method->weight(p, l, k)) {
                    p->low_of[(size_t)(l + 1) * LW_COUNT + k] = p->low + off;
                    off += (model_weight_shape(c, l, k, NULL, NULL) + 31) / 32 * 32;
                }
    }
    for (int l = MODEL_GLOBAL; l < c->num_layers; l++)
        for (int k = 0; k < (l < 0 ? GW_COUNT : LW_COUNT); k++) {
            const uint16_t *d = p->low_of[(size_t)(l + 1) * LW_COUNT + k];
            if (d)
                bf16_round((uint16_t *)d, p->method->weight(p, l, k),
                           model_weight_shape(c, l, k, NULL, NULL));
        }
}

void peft_refresh(peft *p) {
    if (p->method->refresh) p->method->refresh(p);
    if (p->method->bf16_weights && p->method->weight && p->base->layer16) refresh_low(p);
}

const uint16_t *peft_weight_bf16(const peft *p, int layer, int kind) {
    if (!p->low_of || layer < MODEL_GLOBAL || layer >= p->cfg->num_layers || kind < 0 ||
        kind >= LW_COUNT)
        return NULL;
    return p->low_of[(size_t)(layer + 1) * LW_COUNT + kind];
}

void peft_zero_grads(peft *p) {
    memset(p->grads, 0, p->n_params * sizeof(float));
}

void peft_set_step(peft *p, int training, uint64_t seed, uint64_t step, uint64_t shard) {
    p->training = training;
    p->seed = seed;
    p->step = step;
    p->shard = shard;
}

/* ---- Helpers shared by the methods -------------------------------------- */

static const char *const peft_module_names[LW_COUNT] = {
    [LW_Q] = "q_proj",
    [LW_K] = "k_proj",
    [LW_V] = "v_proj",
    [LW_O] = "o_proj",
    [LW_GATE] = "gate_proj",
    [LW_UP] = "up_proj",
    [LW_DOWN] = "down_proj",
    [LW_INPUT_NORM] = "input_layernorm",
    [LW_POST_NORM] = "post_attention_layernorm",
    [LW_Q_BIAS] = "q_proj.bias",
    [LW_K_BIAS] = "k_proj.bias",
    [LW_V_BIAS] = "v_proj.bias",
    [LW_O_BIAS] = "o_proj.bias",
    [LW_GATE_BIAS] = "gate_proj.bias",
    [LW_UP_BIAS] = "up_proj.bias",
    [LW_DOWN_BIAS] = "down_proj.bias",
};

int peft_module_weight(int module) {
    /* The proto enum lists the modules in layer_weight order, from 1. */
    if (module < PEFTPS__MODULE__Q_PROJ || module > PEFTPS__MODULE__POST_ATTENTION_LAYERNORM)
        return -1;
    return module - PEFTPS__MODULE__Q_PROJ + LW_Q;
}

const char *peft_weight_module_name(int kind) {
    if (kind < 0 || kind >= LW_COUNT) return "?";
    return peft_module_names[kind];
}

int peft_module_mask(const Peftps__Module *mods, size_t n, unsigned dflt, unsigned allowed,
                     const char *what, unsigned *mask, err *e) {
    if (n == 0) {
        *mask = dflt;
        return 0;
    }
    unsigned m = 0;
    for (size_t i = 0; i < n; i++) {
        int kind = peft_module_weight((int)mods[i]);
        if (kind < 0)
            return err_set(e, "%s: entry %zu is not a module (value %d)", what, i, (int)mods[i]);
        if (!(allowed & PEFT_BIT(kind))) {
            char list[256] = "";
            size_t len = 0;
            for (int k = 0; k < LW_COUNT; k++)
                if (allowed & PEFT_BIT(k))
                    len += (size_t)snprintf(list + len, sizeof list - len, "%s%s", len ? ", " : "",
                                            peft_module_names[k]);
            return err_set(e, "%s: module %s is not supported here (allowed: %s)", what,
                           peft_module_names[kind], list);
        }
        m |= PEFT_BIT(kind);
    }
    *mask = m;
    return 0;
}

int peft_layer_list(const model_config *cfg, const uint32_t *layers, size_t n, const char *what,
                    unsigned char *chosen, err *e) {
    memset(chosen, n == 0, (size_t)cfg->num_layers);
    for (size_t i = 0; i < n; i++) {
        if (layers[i] >= (uint32_t)cfg->num_layers)
            return err_set(e, "%s: layer %u does not exist: the model has %d layers (0 to %d)",
                           what, layers[i], cfg->num_layers, cfg->num_layers - 1);
        chosen[layers[i]] = 1;
    }
    return 0;
}

size_t peft_num_trainable(const peft *p) {
    size_t n = 0;
    for (int i = 0; i < p->n_tensors; i++) n += p->tensors[i].numel;
    return n;
}

int peft_merge(peft *p, int layer, int kind, float *w, err *e) {
    if (!p->method->merge)
        return err_set(e,
                       "method %s changes no base weight, so it cannot be merged into the "
                       "model; export the adapter instead",
                       p->method->name);
    p->method->merge(p, layer, kind, w);
    return 0;
}

/* ---- Saving and loading the tensors ------------------------------------- */

static void peft_shape_text(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t len = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < ndim && len < n; d++)
        len += (size_t)snprintf(buf + len, n - len, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (len < n) snprintf(buf + len, n - len, "]");
}

int peft_save(const peft *p, const char *path, err *e) {
    st_entry *entries = calloc((size_t)(p->n_tensors ? p->n_tensors : 1), sizeof *entries);
    if (!entries) return err_set(e, "saving %s: out of memory", path);
    for (int i = 0; i < p->n_tensors; i++) {
        const peft_tensor *t = &p->tensors[i];
        entries[i].name = t->name;
        entries[i].dtype = ST_F32;
        entries[i].ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++) entries[i].shape[d] = t->shape[d];
        entries[i].data = p->params + t->offset;
    }
    /* PEFT and safetensors' torch loader expect this marker. */
    int rc = st_write(path, entries, p->n_tensors, "{\"format\": \"pt\"}", e);
    free(entries);
    if (rc < 0) return err_wrap(e, "saving the %s tensors", p->method->name);
    return 0;
}

/* peft_load, and with head_optional peft_load_without_head. */
static int peft_load_tensors(peft *p, const char *where, int head_optional, int *head_loaded,
                             err *e) {
    /* A PEFT adapter directory holds its tensors in adapter_model.safetensors. */
    char path[4096];
    struct stat sb;
    if (stat(where, &sb) == 0 && S_ISDIR(sb.st_mode))
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", where);
    else
        snprintf(path, sizeof path, "%s", where);
    st_file *f;
    if (st_open(&f, path, e) < 0) return err_wrap(e, "loading the %s tensors", p->method->name);
    float *staged = aligned_alloc(64, (p->n_params * sizeof(float) + 63) / 64 * 64);
    if (!staged) {
        st_close(f);
        return err_set(e, "loading %s: out of memory", path);
    }
    memcpy(staged, p->params, p->n_params * sizeof(float));
    int rc = -1;
    for (int i = 0; i < p->n_tensors; i++) {
        const peft_tensor *t = &p->tensors[i];
        const st_tensor *st = st_find(f, t->name);
        int head = p->num_labels > 0 && i == p->score;
        if (!st && head) st = st_find(f, CLSHEAD_TENSOR_PROMPT);
        if (head && head_loaded) *head_loaded = st != NULL;
        if (!st && head && head_optional) continue; /* keeps its values */
        char want[96], have[96];
        if (!st) {
            err_set(e, "%s has no tensor %s, which method %s trains", path, t->name,
                    p->method->name);
            goto out;
        }
        int same = st->ndim == t->ndim;
        for (int d = 0; same && d < t->ndim; d++) same = st->shape[d] == t->shape[d];
        if (!same) {
            peft_shape_text(t->ndim, t->shape, want, sizeof want);
            peft_shape_text(st->ndim, st->shape, have, sizeof have);
            err_set(e, "%s: tensor %s has shape %s, but method %s needs %s", path, t->name, have,
                    p->method->name, want);
            goto out;
        }
        if (st_convert_f32(f, st, staged + t->offset, e) < 0) goto out;
    }
    for (int i = 0; i < st_count(f); i++) {
        const st_tensor *st = st_tensor_at(f, i);
        if (peft_find_tensor(p, st->name) < 0 &&
            !(p->num_labels > 0 && !strcmp(st->name, CLSHEAD_TENSOR_PROMPT))) {
            err_set(e,
                    "%s: tensor %s is not one that method %s trains (a file of another "
                    "method or model?)",
                    path, st->name, p->method->name);
            goto out;
        }
    }
    memcpy(p->params, staged, p->n_params * sizeof(float));
    peft_refresh(p);
    rc = 0;
out:
    free(staged);
    st_close(f);
    return rc;
}

int peft_load(peft *p, const char *where, err *e) {
    return peft_load_tensors(p, where, 0, NULL, e);
}

int peft_load_without_head(peft *p, const char *where, int *head_loaded, err *e) {
    *head_loaded = 0;
    return peft_load_tensors(p, where, 1, head_loaded, e);
}
