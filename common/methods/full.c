/* Full fine-tuning, the baseline: every base weight is a trainable tensor
 * under its Hugging Face name, starting as a copy of the base, so that AdamW
 * (optim.c) decays the weights themselves as torch full fine-tuning does.
 * Implements the peft_method of peft.h; the model (model.c) reads weight()
 * and feeds the gradient hooks; peft.c registers it. */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>

#include "model/kernels.h"
#include "model/peft.h"

typedef struct full_state {
    int *layer_tensor;           /* num_layers * LW_COUNT: tensor index, -1 if absent */
    int global_tensor[GW_COUNT]; /* lm_head shares the embedding's when tied */
} full_state;

static int full_tensor(const peft *p, int layer, int kind) {
    const full_state *s = p->state;
    if (layer == MODEL_GLOBAL) return kind >= 0 && kind < GW_COUNT ? s->global_tensor[kind] : -1;
    if (layer < 0 || layer >= p->cfg->num_layers || kind < 0 || kind >= LW_COUNT) return -1;
    return s->layer_tensor[layer * LW_COUNT + kind];
}

/* Declares weight (layer, kind) under its HF name; *index stays -1 for an
 * absent weight (a bias the model does not have). */
static int full_declare(peft *p, int layer, int kind, int *index, err *e) {
    int rows, cols;
    *index = -1;
    if (!model_weight_shape(p->cfg, layer, kind, &rows, &cols)) return 0;
    char name[PEFT_NAME_MAX];
    model_weight_name(p->cfg, layer, kind, name, sizeof name);
    int64_t shape[2] = {rows, cols};
    /* Norms and biases are vectors in the checkpoint, not (n, 1) matrices. */
    int vector = layer == MODEL_GLOBAL
                     ? kind == GW_FINAL_NORM
                     : kind == LW_INPUT_NORM || kind == LW_POST_NORM || model_is_bias(kind);
    int i = peft_add_tensor(p, name, vector ? 1 : 2, shape, e);
    if (i < 0) return -1;
    *index = i;
    return 0;
}

static int full_create(peft *p, err *e) {
    const model_config *cfg = p->cfg;
    full_state *s = calloc(1, sizeof *s);
    if (!s) return err_set(e, "out of memory");
    p->state = s;
    s->layer_tensor = malloc((size_t)cfg->num_layers * LW_COUNT * sizeof *s->layer_tensor);
    if (!s->layer_tensor) return err_set(e, "out of memory");
    /* Checkpoint order: the embedding, the layers, the final norm, lm_head. */
    if (full_declare(p, MODEL_GLOBAL, GW_EMBED, &s->global_tensor[GW_EMBED], e) < 0) return -1;
    for (int l = 0; l < cfg->num_layers; l++)
        for (int kind = 0; kind < LW_COUNT; kind++)
            if (full_declare(p, l, kind, &s->layer_tensor[l * LW_COUNT + kind], e) < 0) return -1;
    if (full_declare(p, MODEL_GLOBAL, GW_FINAL_NORM, &s->global_tensor[GW_FINAL_NORM], e) < 0)
        return -1;
    /* Tied: one tensor, model.embed_tokens.weight, serves as both (a tied HF
     * checkpoint has no lm_head.weight). */
    if (cfg->tie_word_embeddings)
        s->global_tensor[GW_LM_HEAD] = s->global_tensor[GW_EMBED];
    else if (full_declare(p, MODEL_GLOBAL, GW_LM_HEAD, &s->global_tensor[GW_LM_HEAD], e) < 0)
        return -1;
    p->first_trainable_layer = -1;
    return 0;
}

static void full_copy_base(peft *p, int layer, int kind) {
    int i = full_tensor(p, layer, kind);
    if (i >= 0) model_weights_read_f32(p->base, layer, kind, peft_param(p, i), p->tensors[i].numel);
}

/* The seed plays no part: training starts from the base itself. */
static void full_init(peft *p, uint64_t seed) {
    for (int kind = 0; kind < GW_COUNT; kind++) full_copy_base(p, MODEL_GLOBAL, kind);
    for (int l = 0; l < p->cfg->num_layers; l++)
        for (int kind = 0; kind < LW_COUNT; kind++) full_copy_base(p, l, kind);
}

static const float *full_weight(peft *p, int layer, int kind) {
    int i = full_tensor(p, layer, kind);
    return i < 0 ? NULL : peft_param(p, i);
}

static int full_is_norm(int layer, int kind) {
    return layer == MODEL_GLOBAL ? kind == GW_FINAL_NORM
                                 : kind == LW_INPUT_NORM || kind == LW_POST_NORM;
}

static void full_linear_backward(peft *p, int layer, int kind, const float *x, const float *dy,
                                 float *dx, int n) {
    int i = full_tensor(p, layer, kind);
    if (i < 0 || n <= 0) return;
    float *dw = peft_grad(p, i);
    int rows, cols;
    model_weight_shape(p->cfg, layer, kind, &rows, &cols);
    if (full_is_norm(layer, kind)) {
        /* dw (C) += sum over tokens of dy * xnorm */
        for (int t = 0; t < n; t++) {
            const float *dyt = dy + (size_t)t * rows, *xt = x + (size_t)t * rows;
            for (int j = 0; j < rows; j++) dw[j] += dyt[j] * xt[j];
        }
        return;
    }
    /* dW (out, in) += dy^T x, with dy (n, out) and x (n, in): on the
     * thread team, in parts fixed by the shape (kernels.h); under BF16
     * compute with both operands rounded to BF16, F32 accumulation. */
    if (p->base->layer16)
        linear_backward_weight_bf16(dw, dy, x, n, cols, rows);
    else
        linear_backward(NULL, dw, NULL, dy, x, NULL, n, cols, rows);
    /* A linear with a bias carries its gradient too: db (out) += sum of dy. */
    int bias_kind = layer == MODEL_GLOBAL ? -1 : model_bias_kind(kind);
    int bi = bias_kind < 0 ? -1 : full_tensor(p, layer, bias_kind);
    if (bi < 0) return;
    float *db = peft_grad(p, bi);
    for (int t = 0; t < n; t++) {
        const float *dyt = dy + (size_t)t * rows;
        for (int j = 0; j < rows; j++) db[j] += dyt[j];
    }
}

/* dE[token] += dx row; with tied embeddings lm_head's gradient lands in the
 * same tensor through linear_backward. */
static void full_embed_backward(peft *p, const int32_t *tokens, const float *dx, int n) {
    const full_state *s = p->state;
    int i = s->global_tensor[GW_EMBED];
    int C = p->cfg->hidden_size, V = p->cfg->vocab_size;
    float *de = peft_grad(p, i);
    for (int t = 0; t < n; t++) {
        if (tokens[t] < 0 || tokens[t] >= V) continue;
        float *row = de + (size_t)tokens[t] * C;
        const float *g = dx + (size_t)t * C;
        for (int j = 0; j < C; j++) row[j] += g[j];
    }
}

static void full_merge(peft *p, int layer, int kind, float *w) {
    int i = full_tensor(p, layer, kind);
    if (i >= 0) memcpy(w, peft_param(p, i), p->tensors[i].numel * sizeof(float));
}

static void full_destroy(peft *p) {
    full_state *s = p->state;
    if (!s) return;
    free(s->layer_tensor);
    free(s);
    p->state = NULL;
}

const peft_method full_method = {
    .name = "full",
    .example = "full {}",
    .create = full_create,
    .init = full_init,
    .weight = full_weight,
    .linear_backward = full_linear_backward,
    .bf16_weights = 1,
    .embed_backward = full_embed_backward,
    .merge = full_merge,
    .destroy = full_destroy,
};
