/* Trained deltas on frozen base weights, shared by the layer-wise (layerwise.c),
 * attention-head (heads.c) and subnetwork (subnet.c) methods: W_eff = W_base +
 * delta, with the delta dense, on blocks of rows or columns, or sparse. This
 * file owns the W_eff buffers, their materialisation, the weight gradients
 * and the merge; the methods only choose what trains (peft.h, model.h). */
#ifndef PEFTPS_DELTA_H
#define PEFTPS_DELTA_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"
#include "model/model.h"
#include "model/peft.h"

typedef enum {
    DELTA_DENSE,  /* the delta has the weight's shape */
    DELTA_ROWS,   /* chosen rows of the weight, as consecutive tensor rows */
    DELTA_COLS,   /* chosen columns, as consecutive tensor columns */
    DELTA_SPARSE, /* values at sorted flat indices */
} delta_layout;

/* A run of consecutive weight rows (DELTA_ROWS) or columns (DELTA_COLS)
 * starting at `w`, stored from row/column `t` of the tensor. */
typedef struct delta_run {
    int w, t, len;
} delta_run;

/* One touched base weight. */
typedef struct delta_entry {
    int layer, kind;
    delta_layout layout;
    int rows, cols;  /* of the base weight; cols is 1 for vectors */
    int tensor;      /* index of the trainable tensor in the peft */
    delta_run *runs; /* DELTA_ROWS, DELTA_COLS */
    int n_runs;
    int span;      /* rows (ROWS) or columns (COLS) of the tensor */
    uint32_t *idx; /* DELTA_SPARSE: sorted flat indices row*cols+col; NULL until chosen */
    size_t nnz;    /* DELTA_SPARSE: entries */
    float *eff;    /* W_eff (rows*cols), allocated by the first refresh */
    int eff_base;  /* eff holds the base outside the delta's entries */
    float *wide;   /* a BF16 base weight widened to F32 once (rows*cols), else NULL */
} delta_entry;

typedef struct delta_set {
    const model_config *cfg;
    const model_weights *base;
    delta_entry *entries;
    int n, cap;
    int *slot;      /* (layer, kind) -> entry, -1 when untouched; num_layers*LW_COUNT */
    int fresh;      /* every eff holds base + current delta */
    float *scratch; /* sparse gradients: transposed dy and x */
    size_t scratch_cap;
    int B, T; /* the largest batch shape reserved for */
} delta_set;

/* Prepares an empty set over a base. Fails only when out of memory. */
int delta_init(delta_set *ds, const model_config *cfg, const model_weights *base, err *e);
/* Frees every buffer of the set (not the peft's tensors). */
void delta_free(delta_set *ds);

/* Declares a delta with the weight's shape for (layer, kind), as tensor
 * "<HF weight name>.delta". Fails on an absent weight (a bias without
 * attention_bias), a weight already touched, or from peft_add_tensor. */
int delta_add_dense(delta_set *ds, peft *p, int layer, int kind, err *e);

/* Declares a delta over blocks of `block` rows (DELTA_ROWS) or columns
 * (DELTA_COLS) of (layer, kind): blocks[0..n_blocks) are block indices,
 * strictly ascending; tensor `name` is (n_blocks*block, cols) for rows and
 * (rows, n_blocks*block) for columns. Fails on blocks out of range or not
 * ascending, a weight already touched, or from peft_add_tensor. */
int delta_add_blocks(delta_set *ds, peft *p, int layer, int kind, delta_layout layout, int block,
                     const int *blocks, int n_blocks, const char *name, err *e);

/* Declares a sparse delta of nnz values for (layer, kind), as tensor
 * "<HF weight name>.sparse_values" (nnz). Its indices are set later with
 * delta_set_indices; until then the entry neither changes the weight nor
 * receives gradients. Fails when nnz is 0 or above the weight's size. */
int delta_add_sparse(delta_set *ds, peft *p, int layer, int kind, size_t nnz, err *e);

/* Takes ownership of idx (entry->nnz sorted, distinct flat indices, malloc'ed)
 * as the mask of sparse entry i, freeing any previous one. */
void delta_set_indices(delta_set *ds, int i, uint32_t *idx);

/* The entry touching (layer, kind), or NULL (also for MODEL_GLOBAL). */
delta_entry *delta_find(delta_set *ds, int layer, int kind);

/* Records the model's batch shape (for delta_calibrate) and sizes the
 * sparse-gradient scratch for B*T tokens. Fails when out of memory. */
int delta_reserve(delta_set *ds, int B, int T, err *e);

/* Materialises W_eff = base + delta of every entry from the current params.
 * On allocation failure logs it and leaves weight() returning the base. */
void delta_refresh(delta_set *ds, peft *p);

/* W_eff of (layer, kind) when touched and refreshed, else NULL. */
const float *delta_weight(delta_set *ds, int layer, int kind);

/* Accumulates into grads the gradients of every delta fed by linear or norm
 * (layer, kind): x (n,in) its input (for a norm, the normalised input), dy
 * (n,out) its output gradient. For q/k/v it also covers their bias deltas
 * (sum of dy). Sparse deltas get gradients only at their entries. */
void delta_backward(delta_set *ds, peft *p, int layer, int kind, const float *x, const float *dy,
                    int n);

/* Accumulates the full dense gradient of d's base weight into g (rows*cols):
 * dy^T x for a linear, sum of dy*x for a norm (x the normalised input), sum
 * of dy for a bias (x NULL). For calibration; training uses delta_backward. */
void delta_dense_grad(const delta_entry *d, const float *x, const float *dy, int n, float *g);

/* Runs calibration batches 0..batches-1 of fn through m at the reserved batch
 * shape: forward, then backward of the batch's mean token loss, then
 * after(arg) (where per-batch statistics are folded in). Batches whose labels
 * are all ignored are skipped. Fails when nothing was reserved (the model
 * must be created over the peft first), batches < 1, or fn fails. */
int delta_calibrate(delta_set *ds, model *m, peft_batch_fn fn, void *ctx, int batches,
                    void (*after)(void *arg), void *arg, err *e);

/* Adds the delta of (layer, kind), if any, into w (a copy of the base weight). */
void delta_merge(delta_set *ds, peft *p, int layer, int kind, float *w);

/* The k entries of v (n) with the largest |v|, ties going to the lower index,
 * written to idx in ascending index order. Exact and deterministic. */
void delta_select_largest(const float *v, size_t n, size_t k, uint32_t *idx);

/* ---- hooks shared by the delta methods -------------------------------------
 * The peft_method hooks that only pass through to the set, for a method
 * whose p->state begins with its delta_set (is one, or is a struct whose
 * first member is one). */

/* The delta_set at the start of p->state. */
delta_set *delta_of(peft *p);
/* init: every tensor zero, so that the first forward is the base model's. */
void delta_method_init(peft *p, uint64_t seed);
/* refresh, reserve, weight, merge: delta_refresh, delta_reserve,
 * delta_weight and delta_merge of the set. */
void delta_method_refresh(peft *p);
int delta_method_reserve(peft *p, int B, int T, err *e);
const float *delta_method_weight(peft *p, int layer, int kind);
void delta_method_merge(peft *p, int layer, int kind, float *w);
/* linear_backward: delta_backward of the set (the deltas add nothing to dx
 * beyond what the effective weight gave). */
void delta_method_linear_backward(peft *p, int layer, int kind, const float *x, const float *dy,
                                  float *dx, int n);

/* Queries of the methods' state, for export, reports and tests. */

/* attention_heads: the chosen (layer, query head) pairs in (layer, head) order;
 * writes at most max of them and returns how many there are, or -1 when p is
 * not the attention_heads method or heads are not chosen yet. */
int heads_chosen(const peft *p, int *layers, int *heads, int max);
/* attention_heads after top_k calibration: the importance of (layer, head)
 * (sum over batches of |dL/dgate|, mean loss per batch), or -1 without one. */
double heads_importance(const peft *p, int layer, int head);
/* subnetwork: the sorted flat indices (row*cols+col into the base weight) of
 * the values tensor `tensor`, their count in *k; NULL when p is not the
 * subnetwork method, the tensor is not a values tensor, or its mask is not
 * chosen yet (RANDOM is chosen by init, GRADIENT by calibrate). */
const uint32_t *subnet_indices(const peft *p, int tensor, size_t *k);

#endif
