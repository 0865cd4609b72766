/* Prefix tuning with Hugging Face PEFT's semantics: P virtual tokens of
 * trained keys and values in front of every layer's attention, either
 * trained directly ("prompt_embeddings") or produced by PEFT's
 * prefix_projection MLP (Embedding -> Linear -> tanh -> Linear). Implements
 * the peft_method of peft.h: the model (model.c) reads prefix() and feeds
 * prefix_backward(), the experiment loader calls its defaults and checks,
 * export.c its adapter_config.json reader and writer (jansson) and its
 * prompt_embeddings writer (safetensors.h); methods/registry.c registers it. */
#include <cblas.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "model/peft.h"
#include "model/safetensors.h"

/* The default of an experiment's prefix block: PEFT's examples' 20. */
#define PREFIX_DEFAULT_TOKENS 20

typedef struct prefix_state {
    int P;      /* virtual tokens */
    int td;     /* token_dim = Hkv*D, as PEFT sets it for GQA models */
    int row;    /* L*2*td: one virtual token, rows L0.K, L0.V, L1.K, ... */
    int hidden; /* projection MLP width; 0 without projection */
    int emb;    /* tensor indices: prompt_embeddings, or the encoder's */
    int w1, b1, w2, b2;
    float *table;  /* projection: the MLP output (P, row), what the model reads */
    float *dtable; /* projection: its gradient, summed over prefix_backward calls */
    float *t;      /* projection: tanh activations (P, hidden) */
    float *dt;     /* projection: backward scratch (P, hidden) */
} prefix_state;

static int prefix_create(peft *p, err *e) {
    const Peftps__Prefix *c = p->config->prefix;
    const model_config *cfg = p->cfg;
    if (!c) return err_set(e, "the prefix block is missing");
    if (!c->has_num_virtual_tokens || c->num_virtual_tokens == 0)
        return err_set(e, "prefix.num_virtual_tokens must be set to at least 1");
    if (c->num_virtual_tokens > 65536)
        return err_set(e, "prefix.num_virtual_tokens is %u: at most 65536 are supported",
                       c->num_virtual_tokens);
    uint32_t hidden = c->has_projection_hidden ? c->projection_hidden : 0;
    if (hidden > 1048576)
        return err_set(e, "prefix.projection_hidden is %u: at most 1048576 is supported", hidden);

    prefix_state *s = calloc(1, sizeof *s);
    if (!s) return err_set(e, "out of memory");
    p->state = s;
    s->P = (int)c->num_virtual_tokens;
    s->td = cfg->num_kv_heads * cfg->head_dim;
    s->row = cfg->num_layers * 2 * s->td;
    s->hidden = (int)hidden;
    s->w1 = s->b1 = s->w2 = s->b2 = -1;
    if (!hidden) {
        int64_t shape[2] = {s->P, s->row};
        s->emb = peft_add_tensor(p, "prompt_embeddings", 2, shape, e);
        if (s->emb < 0) return -1;
    } else {
        int64_t emb[2] = {s->P, s->td}, w1[2] = {s->hidden, s->td}, b1[1] = {s->hidden};
        int64_t w2[2] = {s->row, s->hidden}, b2[1] = {s->row};
        if ((s->emb = peft_add_tensor(p, "prompt_encoder.embedding.weight", 2, emb, e)) < 0 ||
            (s->w1 = peft_add_tensor(p, "prompt_encoder.transform.0.weight", 2, w1, e)) < 0 ||
            (s->b1 = peft_add_tensor(p, "prompt_encoder.transform.0.bias", 1, b1, e)) < 0 ||
            (s->w2 = peft_add_tensor(p, "prompt_encoder.transform.2.weight", 2, w2, e)) < 0 ||
            (s->b2 = peft_add_tensor(p, "prompt_encoder.transform.2.bias", 1, b2, e)) < 0)
            return -1;
        size_t table = (size_t)s->P * (size_t)s->row, act = (size_t)s->P * (size_t)s->hidden;
        s->table = calloc(table, sizeof(float));
        s->dtable = calloc(table, sizeof(float));
        s->t = calloc(act, sizeof(float));
        s->dt = calloc(act, sizeof(float));
        if (!s->table || !s->dtable || !s->t || !s->dt)
            return err_set(e, "out of memory for a prefix table of %d x %d", s->P, s->row);
    }
    /* Every layer's attention reads a prefix, so the backward runs to layer 0. */
    p->first_trainable_layer = 0;
    return 0;
}

static void prefix_fill_uniform(peft *p, int tensor, uint64_t seed, float bound) {
    rng g;
    rng_seed(&g, seed, PEFT_STREAM_INIT, (uint64_t)tensor, 0);
    float *v = peft_param(p, tensor);
    for (size_t i = 0; i < p->tensors[tensor].numel; i++)
        v[i] = (2.0f * rng_uniform(&g) - 1.0f) * bound;
}

/* PyTorch's defaults, as PEFT leaves them: nn.Embedding N(0, 1), nn.Linear
 * weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)). */
static void prefix_init(peft *p, uint64_t seed) {
    prefix_state *s = p->state;
    rng g;
    rng_seed(&g, seed, PEFT_STREAM_INIT, (uint64_t)s->emb, 0);
    float *emb = peft_param(p, s->emb);
    for (size_t i = 0; i < p->tensors[s->emb].numel; i++) emb[i] = rng_normal(&g);
    if (!s->hidden) return;
    prefix_fill_uniform(p, s->w1, seed, 1.0f / sqrtf((float)s->td));
    prefix_fill_uniform(p, s->b1, seed, 1.0f / sqrtf((float)s->td));
    prefix_fill_uniform(p, s->w2, seed, 1.0f / sqrtf((float)s->hidden));
    prefix_fill_uniform(p, s->b2, seed, 1.0f / sqrtf((float)s->hidden));
}

/* Projection: table (P, row) = tanh(E W1^T + b1) W2^T + b2, with E the
 * embedding (P, td), W1 (hidden, td), W2 (row, hidden). */
static void prefix_refresh(peft *p) {
    prefix_state *s = p->state;
    if (!s->hidden) return;
    int P = s->P, td = s->td, hid = s->hidden, row = s->row;
    const float *emb = peft_param(p, s->emb), *w1 = peft_param(p, s->w1);
    const float *b1 = peft_param(p, s->b1), *w2 = peft_param(p, s->w2);
    const float *b2 = peft_param(p, s->b2);
    for (int i = 0; i < P; i++) memcpy(s->t + (size_t)i * hid, b1, (size_t)hid * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, P, hid, td, 1.0f, emb, td, w1, td, 1.0f,
                s->t, hid);
    for (size_t i = 0; i < (size_t)P * hid; i++) s->t[i] = tanhf(s->t[i]);
    for (int i = 0; i < P; i++) memcpy(s->table + (size_t)i * row, b2, (size_t)row * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, P, row, hid, 1.0f, s->t, hid, w2, hid,
                1.0f, s->table, row);
}

static const float *prefix_weight(peft *p, int layer, int kind) {
    return NULL;
}

static int prefix_prefix(peft *p, int layer, const float **k, const float **v, size_t *stride) {
    prefix_state *s = p->state;
    if (layer < 0 || layer >= p->cfg->num_layers) return 0;
    const float *table = s->hidden ? s->table : peft_param(p, s->emb);
    *k = table + (size_t)(2 * layer) * (size_t)s->td;
    *v = *k + s->td;
    *stride = (size_t)s->row;
    return s->P;
}

static void prefix_prefix_backward(peft *p, int layer, const float *dk, const float *dv,
                                   size_t stride) {
    prefix_state *s = p->state;
    if (layer < 0 || layer >= p->cfg->num_layers) return;
    float *d = s->hidden ? s->dtable : peft_grad(p, s->emb);
    d += (size_t)(2 * layer) * (size_t)s->td;
    for (int i = 0; i < s->P; i++) {
        float *gk = d + (size_t)i * s->row, *gv = gk + s->td;
        const float *ik = dk + (size_t)i * stride, *iv = dv + (size_t)i * stride;
        for (int j = 0; j < s->td; j++) {
            gk[j] += ik[j];
            gv[j] += iv[j];
        }
    }
}

/* Backprop of the batch's table gradient through the projection MLP. */
static void prefix_end_backward(peft *p) {
    prefix_state *s = p->state;
    if (!s->hidden) return;
    int P = s->P, td = s->td, hid = s->hidden, row = s->row;
    const float *emb = peft_param(p, s->emb), *w1 = peft_param(p, s->w1);
    const float *w2 = peft_param(p, s->w2);
    float *demb = peft_grad(p, s->emb), *dw1 = peft_grad(p, s->w1), *db1 = peft_grad(p, s->b1);
    float *dw2 = peft_grad(p, s->w2), *db2 = peft_grad(p, s->b2);
    const float *dout = s->dtable;

    /* dW2 (row, hid) += dout^T t; db2 += column sums of dout; dt = dout W2 */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, row, hid, P, 1.0f, dout, row, s->t, hid,
                1.0f, dw2, hid);
    for (int i = 0; i < P; i++)
        for (int j = 0; j < row; j++) db2[j] += dout[(size_t)i * row + j];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, P, hid, row, 1.0f, dout, row, w2, hid,
                0.0f, s->dt, hid);
    /* through tanh: dh = dt (1 - t^2) */
    for (size_t i = 0; i < (size_t)P * hid; i++) s->dt[i] *= 1.0f - s->t[i] * s->t[i];
    /* dW1 (hid, td) += dh^T E; db1 += column sums of dh; dE (P, td) += dh W1 */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, hid, td, P, 1.0f, s->dt, hid, emb, td,
                1.0f, dw1, td);
    for (int i = 0; i < P; i++)
        for (int j = 0; j < hid; j++) db1[j] += s->dt[(size_t)i * hid + j];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, P, td, hid, 1.0f, s->dt, hid, w1, td,
                1.0f, demb, td);
    memset(s->dtable, 0, (size_t)P * row * sizeof(float));
}

static void prefix_destroy(peft *p) {
    prefix_state *s = p->state;
    if (!s) return;
    free(s->table);
    free(s->dtable);
    free(s->t);
    free(s->dt);
    free(s);
    p->state = NULL;
}

/* ---- the experiment's prefix block ---------------------------------------- */

static int prefix_defaults(Peftps__Method *m) {
    CONFIG_DEFAULT(m->prefix, num_virtual_tokens, PREFIX_DEFAULT_TOKENS);
    CONFIG_DEFAULT(m->prefix, projection_hidden, 0);
    return 0;
}

static int prefix_check(const config_checker *c, const Peftps__Method *m) {
    if (m->prefix->num_virtual_tokens == 0)
        return config_fail(c, "method.prefix.num_virtual_tokens",
                           "method.prefix.num_virtual_tokens must be > 0");
    return 0;
}

/* ---- the PEFT adapter --------------------------------------------------------- */

/* PrefixTuningConfig's fields. The saved table is the keys and values
 * themselves (prefix_projection false) whatever produced them. */
static int prefix_adapter_config_write(const peft *p, json_t *o, err *e) {
    (void)e;
    const Peftps__Prefix *x = p->config->prefix;
    const model_config *cfg = p->cfg;
    int td = cfg->num_kv_heads * cfg->head_dim;
    uint32_t hidden = x->has_projection_hidden ? x->projection_hidden : 0;
    json_object_set_new(o, "encoder_hidden_size", json_integer(hidden ? (json_int_t)hidden : td));
    json_object_set_new(o, "modules_to_save", json_null());
    /* PEFT sets these for grouped-query attention: the prefix holds keys and
     * values, so its heads are the kv heads. */
    json_object_set_new(o, "num_attention_heads", json_integer(cfg->num_kv_heads));
    json_object_set_new(o, "num_layers", json_integer(cfg->num_layers));
    json_object_set_new(o, "num_transformer_submodules", json_integer(1));
    json_object_set_new(o, "num_virtual_tokens", json_integer(x->num_virtual_tokens));
    json_object_set_new(o, "peft_type", json_string("PREFIX_TUNING"));
    json_object_set_new(o, "prefix_projection", json_false());
    json_object_set_new(o, "token_dim", json_integer(td));
    return 0;
}

static int prefix_adapter_config_read(const char *path, const json_t *root, const model_config *cfg,
                                      Peftps__Method *m, err *e) {
    Peftps__Prefix *x = malloc(sizeof *x);
    if (!x) return err_set(e, "out of memory");
    peftps__prefix__init(x);
    m->kind_case = PEFTPS__METHOD__KIND_PREFIX;
    m->prefix = x;
    const json_t *nv = json_object_get(root, "num_virtual_tokens");
    if (!json_is_integer(nv) || json_integer_value(nv) < 1 || json_integer_value(nv) > 65536)
        return err_set(e, "%s: \"num_virtual_tokens\" must be an integer from 1 to 65536", path);
    x->has_num_virtual_tokens = 1;
    x->num_virtual_tokens = (uint32_t)json_integer_value(nv);
    /* The saved table holds the keys and values themselves, whatever
     * produced them: no projection at inference. */
    x->has_projection_hidden = 1;
    x->projection_hidden = 0;
    const json_t *sub = json_object_get(root, "num_transformer_submodules");
    if (sub && !json_is_null(sub) && (!json_is_integer(sub) || json_integer_value(sub) != 1))
        return err_set(e, "%s: \"num_transformer_submodules\" must be 1 (a decoder-only model)",
                       path);
    if (!cfg) return 0;
    const json_t *nl = json_object_get(root, "num_layers");
    if (nl && !json_is_null(nl) &&
        (!json_is_integer(nl) || json_integer_value(nl) != cfg->num_layers))
        return err_set(e,
                       "%s: \"num_layers\" is not the model's %d layers: an adapter of another "
                       "model",
                       path, cfg->num_layers);
    const json_t *td = json_object_get(root, "token_dim");
    long long want = (long long)cfg->num_kv_heads * cfg->head_dim;
    if (td && !json_is_null(td) && (!json_is_integer(td) || json_integer_value(td) != want))
        return err_set(e,
                       "%s: \"token_dim\" is %s but the model's keys have %lld values "
                       "(kv heads x head_dim): an adapter of another model, or saved by a PEFT "
                       "older than its grouped-query attention support",
                       path, json_is_integer(td) ? "another number" : "not a number", want);
    return 0;
}

/* prompt_embeddings (P, L*2*td): per virtual token, each layer's key then
 * value, as PEFT's get_prompt reshapes it. That is the layout of the table
 * the model reads (prefix_prefix), so the table is written as it is: with a
 * projection, its output, not the MLP's weights. */
static int prefix_adapter_save(const peft *p, const char *path, err *e) {
    const prefix_state *s = p->state;
    st_entry en = {.name = "prompt_embeddings", .dtype = ST_F32, .ndim = 2};
    en.data = s->hidden ? s->table : p->params + p->tensors[s->emb].offset;
    en.shape[0] = s->P;
    en.shape[1] = s->row;
    return st_write(path, &en, 1, "{\"format\": \"pt\"}", e);
}

/* No merge: a prefix changes no weight, so peft_merge refuses. */
const peft_method prefix_method = {
    .name = "prefix",
    .example = "prefix { num_virtual_tokens: 20 }",
    .defaults = prefix_defaults,
    .check = prefix_check,
    .peft_type = "PREFIX_TUNING",
    .adapter_config_write = prefix_adapter_config_write,
    .adapter_config_read = prefix_adapter_config_read,
    .adapter_save = prefix_adapter_save,
    .create = prefix_create,
    .init = prefix_init,
    .refresh = prefix_refresh,
    .weight = prefix_weight,
    .prefix = prefix_prefix,
    .prefix_backward = prefix_prefix_backward,
    .end_backward = prefix_end_backward,
    .destroy = prefix_destroy,
};
