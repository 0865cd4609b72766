/* The score head of sequence classification (clshead.h): gathers each
 * sequence's pooled row, one linear and the cross-entropy of kernels.h;
 * the weight lives in the peft layout (peft.h). Called by model.c. */
#include "model/clshead.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/rng.h"
#include "model/kernels.h"

struct clshead {
    int B, K, C;             /* capacity, labels, hidden */
    int fB;                  /* rows of the last forward */
    float *hx;               /* (B,C) the pooled rows of x */
    float *logits, *dlogits; /* (B,K) */
    float *lse;              /* (B) */
    float *dhx;              /* (B,C) */
    int32_t *lab;            /* (B) class or -100 */
    int *pos;                /* (B) pooled position */
};

int clshead_last_token(const int32_t *tokens, int T, int pad_id) {
    if (pad_id < 0) return T - 1;
    for (int t = T - 1; t >= 0; t--)
        if (tokens[t] != pad_id) return t;
    return 0;
}

const char *clshead_adapter_name(const peft *p) {
    return p->method->prefix ? CLSHEAD_TENSOR_PROMPT : CLSHEAD_TENSOR;
}

int clshead_add(peft *p, int num_labels, int pad_id, uint64_t seed, err *e) {
    if (p->num_labels > 0) return err_set(e, "the score head was added twice");
    if (num_labels < 2)
        return err_set(e, "sequence classification needs at least 2 labels, got %d", num_labels);
    int64_t shape[2] = {num_labels, p->cfg->hidden_size};
    int i = peft_add_tensor(p, CLSHEAD_TENSOR, 2, shape, e);
    if (i < 0) return err_wrap(e, "score head");
    p->score = i;
    p->num_labels = num_labels;
    p->pad_id = pad_id;
    rng g;
    rng_seed(&g, seed, PEFT_STREAM_INIT, (uint64_t)i, 0);
    float std = p->cfg->initializer_range, *w = peft_param(p, i);
    for (size_t k = 0; k < p->tensors[i].numel; k++) w[k] = std * rng_normal(&g);
    return 0;
}

int clshead_create(clshead **out, int B, int K, int C, err *e) {
    *out = NULL;
    clshead *h = calloc(1, sizeof *h);
    if (!h) return err_set(e, "out of memory");
    h->B = B, h->K = K, h->C = C;
    size_t bc = (size_t)B * C, bk = (size_t)B * K;
    h->hx = malloc(bc * sizeof(float));
    h->dhx = malloc(bc * sizeof(float));
    h->logits = malloc(bk * sizeof(float));
    h->dlogits = malloc(bk * sizeof(float));
    h->lse = malloc((size_t)B * sizeof(float));
    h->lab = malloc((size_t)B * sizeof(int32_t));
    h->pos = malloc((size_t)B * sizeof(int));
    if (!h->hx || !h->dhx || !h->logits || !h->dlogits || !h->lse || !h->lab || !h->pos) {
        clshead_free(h);
        return err_set(e, "out of memory for the score head");
    }
    *out = h;
    return 0;
}

void clshead_free(clshead *h) {
    if (!h) return;
    free(h->hx);
    free(h->dhx);
    free(h->logits);
    free(h->dlogits);
    free(h->lse);
    free(h->lab);
    free(h->pos);
    free(h);
}

double clshead_forward(clshead *h, const peft *p, const float *x, const int32_t *tokens,
                       const int32_t *labels, int B, int T, long *count) {
    int K = h->K, C = h->C;
    *count = 0;
    h->fB = 0;
    for (int b = 0; b < B; b++) {
        const int32_t *lr = labels ? labels + (size_t)b * T : NULL;
        int pos = -1;
        h->lab[b] = -100;
        for (int t = 0; lr && t < T; t++) {
            if (lr[t] == -100) continue;
            if (pos >= 0) {
                log_error("model_forward: sequence %d has labels at positions %d and %d; a "
                          "classified sequence has one",
                          b, pos, t);
                return NAN;
            }
            if (lr[t] < 0 || lr[t] >= K) {
                log_error("model_forward: label %d of sequence %d is neither -100 nor a class "
                          "index 0..%d",
                          lr[t], b, K - 1);
                return NAN;
            }
            pos = t;
            h->lab[b] = lr[t];
        }
        if (pos < 0) pos = clshead_last_token(tokens + (size_t)b * T, T, p->pad_id);
        h->pos[b] = pos;
        memcpy(h->hx + (size_t)b * C, x + ((size_t)b * T + pos) * C, (size_t)C * sizeof(float));
    }
    /* logits (B,K) = hx (B,C) score^T */
    linear_forward(h->logits, h->hx, peft_param((peft *)p, p->score), NULL, B, C, K);
    h->fB = B;
    return crossentropy_forward(h->lse, h->logits, h->lab, B, K, count);
}

void clshead_backward(clshead *h, peft *p, float *dx, int T, float loss_scale) {
    int B = h->fB, K = h->K, C = h->C;
    crossentropy_grad(h->dlogits, h->logits, h->lse, h->lab, B, K, loss_scale);
    if (dx) memset(h->dhx, 0, (size_t)B * C * sizeof(float));
    linear_backward(dx ? h->dhx : NULL, peft_grad(p, p->score), NULL, h->dlogits, h->hx,
                    peft_param(p, p->score), B, C, K);
    if (!dx) return;
    memset(dx, 0, (size_t)B * T * C * sizeof(float));
    for (int b = 0; b < B; b++)
        memcpy(dx + ((size_t)b * T + h->pos[b]) * C, h->dhx + (size_t)b * C,
               (size_t)C * sizeof(float));
}

const float *clshead_logits(const clshead *h) {
    return h->logits;
}

const int *clshead_positions(const clshead *h) {
    return h->pos;
}
