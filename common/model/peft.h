/* The method interface: what a parameter-efficient method adds to the frozen
 * base and how. Each method is one file of methods/ (lora.c, prefix.c,
 * layerwise.c, heads.c, subnet.c, full.c) defining one `peft_method`, and one
 * line in the registry (methods/registry.c). The model (model.h) calls only
 * the hooks below.
 *
 * All trainable tensors of a method live in one allocation (`params`), with
 * gradients in a second of the same layout (`grads`); each tensor is a named
 * view (offset, shape). That flat layout is what the optimizer updates, what
 * the parameter server holds, what travels on the wire and what checkpoints
 * store. */
#ifndef PEFTPS_PEFT_H
#define PEFTPS_PEFT_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"
#include "config/config.h"
#include "model/model.h"
#include "peftps.pb-c.h"

/* jansson's JSON value, for the PEFT adapter hooks (only the methods with
 * a PEFT format include <jansson.h>). */
struct json_t;

#define PEFT_NAME_MAX 160
#define PEFT_MAX_DIMS 4

typedef struct peft_tensor {
    char name[PEFT_NAME_MAX]; /* export name, e.g. a PEFT state-dict key */
    int ndim;
    int64_t shape[PEFT_MAX_DIMS];
    size_t offset; /* in floats, into params and grads */
    size_t numel;
} peft_tensor;

/* Calibration data for methods that select what trains from gradients
 * (attention-head importance, Fisher subnetwork masks): writes batch i
 * (B,T tokens and labels) and returns 0, or -1 with e set. */
typedef int (*peft_batch_fn)(void *ctx, int i, int32_t *tokens, int32_t *labels, err *e);

typedef struct peft_method {
    const char *name; /* as in the config: "lora", "prefix", ... */
    /* A small block of the method to quote in messages: "lora { r: 8 }". */
    const char *example;

    /* ---- the method's block of the experiment (config/config.h) ---- */

    /* Writes the method's defaults into the unset fields of its block, so
     * that printing the experiment shows every value the run uses. Fails
     * (-1) only when out of memory. Optional. */
    int (*defaults)(Peftps__Method *config);
    /* Checks the filled block's values on their own, before the model is
     * read; each failure through config_fail, naming the field
     * ("method.lora.r"). Optional. */
    int (*check)(const config_checker *c, const Peftps__Method *config);
    /* Checks the block against the model's configuration (layer and head
     * indices), after check passed, the same way. Optional. */
    int (*check_model)(const config_checker *c, const Peftps__Method *config,
                       const model_config *cfg);
    /* How many calibration batches the block asks for before init (the
     * calibrate hook then chooses what trains from their gradients), or 0
     * when it needs none. Optional (none). */
    int (*calibration_batches)(const Peftps__Method *config);

    /* ---- Hugging Face PEFT adapter (train/export.h); all NULL for a
     * method PEFT does not have ---- */

    /* The peft_type of its adapter_config.json: "LORA". */
    const char *peft_type;
    /* Adds the method's fields of adapter_config.json to the JSON object o
     * (the common ones, task_type, base model, ..., are the caller's). */
    int (*adapter_config_write)(const peft *p, struct json_t *o, err *e);
    /* Reads the method's fields of adapter_config.json (`root`, read from
     * `path`, whose peft_type is this method's) into the empty block
     * `config`, setting its kind; with cfg (may be NULL) also checks the
     * adapter against the model. Fails naming the file and the field, also
     * on settings the method does not implement. */
    int (*adapter_config_read)(const char *path, const struct json_t *root, const model_config *cfg,
                               Peftps__Method *config, err *e);
    /* Writes adapter_model.safetensors, the tensors as PEFT saves them. */
    int (*adapter_save)(const peft *p, const char *path, err *e);

    /* ---- the trainable tensors and the model's hooks ---- */

    /* Declares the trainable tensors (peft_add_tensor) and any method state
     * from the config block; may not touch params (not yet allocated). */
    int (*create)(peft *p, err *e);
    /* Chooses what trains when that needs gradients of the base (optional):
     * runs forward/backward on `batches` batches through m. Must be
     * deterministic. Called after create, before init. */
    int (*calibrate)(peft *p, model *m, peft_batch_fn fn, void *ctx, int batches, err *e);
    /* Initial values of params, from the seed (deterministic). */
    void (*init)(peft *p, uint64_t seed);

    /* Called after params changed (a new version): derive what the forward
     * needs, e.g. W + delta. Optional. */
    void (*refresh)(peft *p);
    /* Scratch sized for n tokens per forward (activations the method keeps
     * for its backward). Optional. */
    int (*reserve)(peft *p, int B, int T, err *e);

    /* The weight the model uses in place of base (layer, kind), or NULL to
     * use the base. Layer MODEL_GLOBAL with a global_weight kind. A method
     * that trains a norm weight must return it here (non-NULL): the model
     * skips input gradients it can prove unneeded by that test. */
    const float *(*weight)(peft *p, int layer, int kind);
    /* y (n,out) += the method's extra term for linear (layer, kind) of input
     * x (n,in), e.g. the LoRA branch. Optional. It may keep what its
     * backward needs, but must give the same result and keep the same state
     * when called again with the same input: model.recompute runs a layer's
     * forward a second time before its backward. */
    void (*linear_forward)(peft *p, int layer, int kind, const float *x, float *y, int n);
    /* Gradients for linear (layer, kind) or norm weight: x is the layer's
     * input (for a norm, the normalised input before the weight), dy the
     * gradient of its output. On entry dx (if not NULL) holds the gradient of
     * x through the effective weight, and possibly sibling linears' shares
     * (q/k/v and gate/up read the same x): the hook only adds its own share
     * (LoRA), never overwrites. Accumulates into grads. Also called for
     * GW_LM_HEAD. Optional. */
    void (*linear_backward)(peft *p, int layer, int kind, const float *x, const float *dy,
                            float *dx, int n);
    /* Gradient of the embedding rows: dx (n,C) for tokens (n). Optional. */
    void (*embed_backward)(peft *p, const int32_t *tokens, const float *dx, int n);
    /* Prefix keys/values for a layer: P positions, each K and V row of
     * Hkv*D floats, consecutive positions `stride` floats apart. Returns P
     * (0: no prefix). Optional. */
    int (*prefix)(peft *p, int layer, const float **k, const float **v, size_t *stride);
    /* Gradients of the prefix keys/values of a layer, same layout as prefix(). */
    void (*prefix_backward)(peft *p, int layer, const float *dk, const float *dv, size_t stride);
    /* After the model's backward of one batch (e.g. backprop through a
     * reparameterisation MLP). Optional. */
    void (*end_backward)(peft *p);

    /* Whether, under BF16 compute, the products may take the weights
     * returned by weight() rounded to BF16 (as autocast does with F32
     * master weights): set by full fine-tuning, whose every product would
     * otherwise run in F32. Methods adding small deltas to the base leave
     * it 0: rounding W + delta to BF16 would hide deltas below 2^-9 of W. */
    int bf16_weights;

    /* Adds the method's trained change into a copy of a base weight: its
     * whole contribution to a merged export (peft_merge). Optional when the
     * method changes no weight (merged export then refuses it). */
    void (*merge)(peft *p, int layer, int kind, float *w);
    void (*destroy)(peft *p);
} peft_method;

struct peft {
    const peft_method *method;
    const model_config *cfg;
    const model_weights *base;
    const Peftps__Method *config; /* the experiment's method block */

    peft_tensor *tensors;
    int n_tensors, cap_tensors;
    size_t n_params; /* trainable parameters */
    float *params;   /* n_params */
    float *grads;    /* n_params */

    /* The lowest layer whose input gradient the backward must produce:
     * backward stops below it. -1 when the embedding trains; num_layers when
     * only weights above the last layer train. Set by create/calibrate.
     * Layers at or above it run backward; the input gradient of that lowest
     * layer is not computed, and embed_backward is called only at -1. */
    int first_trainable_layer;

    /* Sequence classification (model/clshead.h): the index of the score
     * head's tensor (num_labels, C), one more tensor of the layout, and the
     * pad id that finds each sequence's last token. num_labels is 0 for
     * causal language modelling (what a zeroed peft says too); score is
     * valid only when num_labels > 0. Set by clshead_add, never by a
     * method. */
    int score, num_labels, pad_id;

    /* Per forward: training (dropout on) and the stream for its randomness. */
    int training;
    uint64_t seed, step, shard;

    void *state; /* the method's own */

    /* Under BF16 compute with a method setting bf16_weights: its matrices
     * rounded to BF16 at each refresh, one allocation, and a view per
     * (layer + 1) * LW_COUNT + kind (NULL where not replaced). */
    uint16_t *low;
    const uint16_t **low_of;
};

/* Creates method m (configured by its block `config`) over a base, declares
 * its tensors and allocates params and grads (zeroed). Does not initialise:
 * call peft_calibrate when needed, then peft_init. m NULL (no method block)
 * fails. The registry (methods/registry.h) finds m from the block:
 * methods_create does both, naming the methods when the block names none. */
int peft_create(peft **out, const peft_method *m, const Peftps__Method *config,
                const model_config *cfg, const model_weights *base, err *e);
int peft_calibrate(peft *p, model *m, peft_batch_fn fn, void *ctx, int batches, err *e);
void peft_init(peft *p, uint64_t seed);
/* The method's scratch for forwards of up to B x T tokens (its reserve
 * hook); nothing to do without a method (p NULL) or hook. */
int peft_reserve(peft *p, int B, int T, err *e);
void peft_free(peft *p);

/* Declares a trainable tensor (for create hooks); returns its index. */
int peft_add_tensor(peft *p, const char *name, int ndim, const int64_t *shape, err *e);
/* Finds a tensor by name; -1 if none. */
int peft_find_tensor(const peft *p, const char *name);
/* Pointers into params/grads for tensor i. */
float *peft_param(peft *p, int i);
float *peft_grad(peft *p, int i);

/* Call after params changed (loaded, optimizer step, pulled version). */
void peft_refresh(peft *p);
/* The BF16 rounding of weight() for (layer, kind) as of the last refresh,
 * or NULL (F32 compute, a method without bf16_weights, a vector). */
const uint16_t *peft_weight_bf16(const peft *p, int layer, int kind);
void peft_zero_grads(peft *p);
/* Sets the context of the next forward (dropout on/off, random stream). */
void peft_set_step(peft *p, int training, uint64_t seed, uint64_t step, uint64_t shard);

/* ---- Helpers shared by the methods (peft.c) ---------------------------- */

/* Streams of initial values are rng_seed(seed, PEFT_STREAM_INIT, tensor
 * index, 0): the tag keeps them apart from the per-step streams
 * (seed, step, shard, ...), whose step never comes near it. */
#define PEFT_STREAM_INIT UINT64_C(0x494e495400000000)

/* The layer_weight of a config Module (Q_PROJ -> LW_Q ... DOWN_PROJ ->
 * LW_DOWN, INPUT_LAYERNORM -> LW_INPUT_NORM, POST_ATTENTION_LAYERNORM ->
 * LW_POST_NORM); -1 for MODULE_UNSPECIFIED or a value outside the enum. */
int peft_module_weight(int module);
/* The Hugging Face module name of a layer_weight ("q_proj", ...,
 * "input_layernorm", "q_proj.bias"); "?" for a value outside the enum. */
const char *peft_weight_module_name(int kind);
/* Bit (1u << kind) for a layer_weight kind, to build module masks. */
#define PEFT_BIT(kind) (1u << (kind))
/* Q_PROJ .. DOWN_PROJ, the seven linear layers of a decoder layer. */
#define PEFT_LINEARS                                                                               \
    (PEFT_BIT(LW_Q) | PEFT_BIT(LW_K) | PEFT_BIT(LW_V) | PEFT_BIT(LW_O) | PEFT_BIT(LW_GATE) |       \
     PEFT_BIT(LW_UP) | PEFT_BIT(LW_DOWN))

/* Fills *mask with PEFT_BIT(kind) of each listed module, or with dflt when
 * the list is empty. Fails, naming `what` (e.g. "lora.target_modules") and
 * the module, on MODULE_UNSPECIFIED, an unknown value or a module outside
 * `allowed`. Duplicates are harmless. */
int peft_module_mask(const Peftps__Module *mods, size_t n, unsigned dflt, unsigned allowed,
                     const char *what, unsigned *mask, err *e);

/* Sets chosen[l] = 1 for each listed layer and 0 elsewhere; an empty list
 * chooses every layer. chosen has cfg->num_layers entries. Fails, naming
 * `what` (e.g. "lora.layers"), on an index >= cfg->num_layers. */
int peft_layer_list(const model_config *cfg, const uint32_t *layers, size_t n, const char *what,
                    unsigned char *chosen, err *e);

/* Trainable parameters without the alignment padding of the flat layout
 * (the sum of the tensors' numel; n_params may be a little larger). */
size_t peft_num_trainable(const peft *p);

/* Merged export: adds the method's trained change into w, a copy of base
 * weight (layer, kind) (MODEL_GLOBAL with a global_weight); leaves w alone
 * when the method does not change that weight. Fails for a method that
 * changes no weight at all (prefix tuning: export the adapter instead). */
int peft_merge(peft *p, int layer, int kind, float *w, err *e);

/* Writes every trainable tensor, by name, as F32, to a safetensors file. */
int peft_save(const peft *p, const char *path, err *e);
/* Reads every trainable tensor by name from a safetensors file, or from
 * DIR/adapter_model.safetensors when `path` is a PEFT adapter directory (F32,
 * or BF16/F16 converted), then refreshes. Fails, naming the tensor, when one
 * is missing, has another shape or another dtype, or when the file holds a
 * tensor the method does not train; params are unchanged on failure. */
int peft_load(peft *p, const char *path, err *e);
/* As peft_load, but a file without the score head of sequence
 * classification (model/clshead.h) is accepted and the head keeps its
 * values; *head_loaded tells whether the file had it. For a classifier that
 * starts from a causal-LM adapter of the same method (init_from). */
int peft_load_without_head(peft *p, const char *path, int *head_loaded, err *e);

#endif
