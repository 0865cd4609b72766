/* The score head of sequence classification, as transformers'
 * LlamaForSequenceClassification: score = Linear(hidden, num_labels,
 * bias=False) over the final-norm hidden state of each sequence's last
 * non-padding token, and cross-entropy over the labels. Its weight is one
 * more tensor of the method's flat layout (peft.h), so the optimizer, the
 * parameter server, the wire and checkpoints carry it like any other; the
 * model (model.c) calls the forward and backward here at the loss point in
 * place of lm_head. */
#ifndef PEFTPS_CLSHEAD_H
#define PEFTPS_CLSHEAD_H

#include <stdint.h>

#include "base/err.h"
#include "model/peft.h"

/* The head's tensor name: PEFT's saved key of a `modules_to_save` module
 * named score of a LoRA-family adapter (PEFT strips
 * "modules_to_save.default" on save and puts it back on load). */
#define CLSHEAD_TENSOR "base_model.model.score.weight"
/* The same head in an adapter of a prompt-learning method (prefix tuning),
 * where PEFT's base_model is the transformers model itself. peft_load
 * accepts either name. */
#define CLSHEAD_TENSOR_PROMPT "base_model.score.weight"

/* The head's key in a PEFT adapter of p's method: CLSHEAD_TENSOR_PROMPT for
 * a method that puts virtual tokens before the keys and values (PEFT's
 * prompt learning), CLSHEAD_TENSOR otherwise. */
const char *clshead_adapter_name(const peft *p);

/* The position transformers pools for a row of T tokens: the rightmost
 * token that is not pad_id (0 when every token is pad_id), or T-1 when
 * pad_id < 0 (no pad token). */
int clshead_last_token(const int32_t *tokens, int T, int pad_id);

/* Declares the head (num_labels, C) in p after the method's tensors, and
 * initialises it now from the seed, normal(0, initializer_range) as
 * transformers' _init_weights does, on the stream rng_seed(seed,
 * PEFT_STREAM_INIT, tensor index, 0); the method's init leaves it alone.
 * pad_id is the id pooling skips (-1: none). Fails when num_labels < 2 or a
 * head was already added. */
int clshead_add(peft *p, int num_labels, int pad_id, uint64_t seed, err *e);

/* Buffers of one batch of at most B sequences. */
typedef struct clshead clshead;
int clshead_create(clshead **out, int B, int num_labels, int C, err *e);
void clshead_free(clshead *h);

/* Over x (B*T, C), the final norm's output: each row's pooled position is
 * the one position whose label is not -100 (labels (B,T), the class index
 * there), or, without labels, clshead_last_token of its tokens. Writes the
 * logits (B, num_labels) and returns the SUM of the rows' cross-entropies,
 * the number of labelled rows in *count. A row without a label has logits
 * at its last token and no loss. Returns NAN, having logged why, when a row
 * has two labels or a label is not a class index. */
double clshead_forward(clshead *h, const peft *p, const float *x, const int32_t *tokens,
                       const int32_t *labels, int B, int T, long *count);

/* Backward of the last forward's summed loss times loss_scale: adds the
 * head's weight gradient into p's grads and, when dx is not NULL, writes dx
 * (B*T, C), the gradient of x: zero but at the pooled rows. */
void clshead_backward(clshead *h, peft *p, float *dx, int T, float loss_scale);

/* Logits (B, num_labels) and pooled positions (B) of the last forward. */
const float *clshead_logits(const clshead *h);
const int *clshead_positions(const clshead *h);

#endif
