/* The decoder-only transformer of the Llama family (Llama, Mistral, Qwen2,
 * SmolLM, TinyLlama): configuration from config.json, the frozen base
 * weights, and forward/backward over a batch. The model never asks which
 * fine-tuning method is active: it calls the hooks of the `peft` object
 * (peft.h) for effective weights, extra linear terms, prefix keys/values and
 * gradients. Kernels live in kernels.h; files are read by safetensors.h. */
#ifndef PEFTPS_MODEL_H
#define PEFTPS_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"

/* Weights of one decoder layer, in Hugging Face order. nn.Linear weights are
 * (out, in), row-major. */
typedef enum {
    LW_Q = 0,      /* (Hq*D, C) */
    LW_K,          /* (Hkv*D, C) */
    LW_V,          /* (Hkv*D, C) */
    LW_O,          /* (C, Hq*D) */
    LW_GATE,       /* (I, C) */
    LW_UP,         /* (I, C) */
    LW_DOWN,       /* (C, I) */
    LW_INPUT_NORM, /* (C) */
    LW_POST_NORM,  /* (C) */
    LW_Q_BIAS,     /* (Hq*D), only with attention_bias */
    LW_K_BIAS,     /* (Hkv*D) */
    LW_V_BIAS,     /* (Hkv*D) */
    LW_O_BIAS,     /* (C), only with o_bias */
    LW_GATE_BIAS,  /* (I), only with mlp_bias */
    LW_UP_BIAS,    /* (I) */
    LW_DOWN_BIAS,  /* (C) */
    LW_COUNT
} layer_weight;

/* Weights outside the layers; used with layer index MODEL_GLOBAL. */
typedef enum { GW_EMBED = 0, GW_FINAL_NORM, GW_LM_HEAD, GW_COUNT } global_weight;
#define MODEL_GLOBAL (-1)

typedef enum { ROPE_NONE = 0, ROPE_LINEAR, ROPE_LLAMA3 } rope_scaling_type;

typedef struct model_config {
    int vocab_size;        /* V */
    int hidden_size;       /* C */
    int intermediate_size; /* I */
    int num_layers;        /* L */
    int num_heads;         /* Hq */
    int num_kv_heads;      /* Hkv, divides Hq */
    int head_dim;          /* D; hidden_size/num_heads unless config.json says */
    int max_position_embeddings;
    float rms_norm_eps;
    float rope_theta;
    rope_scaling_type rope_scaling;
    float rope_factor;
    float rope_low_freq_factor;                /* llama3 */
    float rope_high_freq_factor;               /* llama3 */
    int rope_original_max_position_embeddings; /* llama3 */
    int attention_bias; /* q, k and v have biases (Qwen2; Llama's attention_bias) */
    int o_bias;         /* o_proj has a bias (Llama's attention_bias, not Qwen2) */
    int mlp_bias;       /* gate, up and down have biases (Llama's mlp_bias) */
    int tie_word_embeddings;
    int bos_token_id, eos_token_id; /* -1 when absent */
    int pad_token_id;               /* -1 when absent */
    float initializer_range;        /* std of transformers' normal init; 0.02 when absent */
} model_config;

/* Parses a Hugging Face config.json text (architectures of the Llama family;
 * rope_theta/rope_scaling at top level or inside rope_parameters). `path` is
 * used in messages only. */
int model_config_parse(model_config *cfg, const char *json_text, const char *path, err *e);

/* Rows and columns of a weight (cols is 1 for vectors); layer may be
 * MODEL_GLOBAL with a global_weight kind. Returns 0 for an absent weight
 * (a bias the configuration does not have). */
size_t model_weight_shape(const model_config *cfg, int layer, int kind, int *rows, int *cols);

/* The bias kind of linear `kind` (LW_Q_BIAS for LW_Q, ...), or -1 for a kind
 * that is not a linear; whether the model has it is model_weight_shape's. */
int model_bias_kind(int kind);
/* Whether a layer kind is a bias. */
int model_is_bias(int kind);

/* The Hugging Face tensor name of a weight, e.g. "model.layers.3.self_attn.q_proj.weight". */
void model_weight_name(const model_config *cfg, int layer, int kind, char *buf, size_t n);

/* Pointers to the frozen base weights, typically into read-only mapped
 * files. lm_head == embed when tie_word_embeddings. Absent biases are NULL.
 * With F32 compute every weight is F32 and the BF16 pointers are NULL. With
 * BF16 compute (model_files_open_compute) the matrices (embedding, lm_head,
 * the seven linears) are BF16, used in place, and their F32 pointers NULL;
 * the vectors (norms, biases) stay F32. */
typedef struct model_weights {
    const float *global[GW_COUNT];
    const float *(*layer)[LW_COUNT]; /* num_layers entries */
    const uint16_t *global16[GW_COUNT];
    const uint16_t *(*layer16)[LW_COUNT]; /* num_layers entries, or NULL */
} model_weights;

/* A matrix as a product takes it: F32 (f), or BF16 (h, then f is NULL). */
typedef struct kweight {
    const float *f;
    const uint16_t *h;
} kweight;

/* Base weight (layer, kind) (MODEL_GLOBAL with a global_weight) in the
 * dtype it is held in; both NULL for an absent weight. */
kweight model_weights_get(const model_weights *w, int layer, int kind);
/* Writes base weight (layer, kind), n values, as F32 into dst (copied, or
 * widened from BF16): for methods that start from the base or add to it. */
void model_weights_read_f32(const model_weights *w, int layer, int kind, float *dst, size_t n);

typedef struct peft peft;
typedef struct model model;

/* What a forward reads: the base and the method (NULL: none), which may
 * replace weights, add to linears' outputs and put a prefix before the keys
 * and values. model.c and generate.c both read through it. */
typedef struct model_view {
    const model_config *cfg;
    const model_weights *w;
    peft *p;
} model_view;

/* The weight (layer, kind) in use, as F32: the method's when it replaces
 * it, else the base's. A bias is NULL for a model without it; a
 * tied lm_head is the embedding in use. Under BF16 compute a base matrix
 * has no F32 form (NULL): products take model_view_matrix instead. */
const float *model_view_weight(const model_view *v, int layer, int kind);
const float *model_view_bias(const model_view *v, int layer, int kind);
const float *model_view_lm_head(const model_view *v);
/* A matrix (layer, kind) as the products take it: the method's F32
 * weight when it replaces the base's, else the base's in its dtype;
 * model_view_head likewise for lm_head (the embedding when tied). */
kweight model_view_matrix(const model_view *v, int layer, int kind);
kweight model_view_head(const model_view *v);
/* The method's addition to y (n rows), the output of linear (layer, kind)
 * for input x; nothing without a method or hook. */
void model_view_hook(const model_view *v, int layer, int kind, const float *x, float *y, int n);
/* The method's prefix positions before layer's keys and values (0: none),
 * with their rows (stride floats apart) in *k and *val. */
int model_view_prefix(const model_view *v, int layer, const float **k, const float **val,
                      size_t *stride);

/* Where one decoder layer's forward reads and writes, for B sequences of T
 * tokens (N = B*T rows): model_forward's stored activations, or the scratch
 * and KV cache of generate.c. */
typedef struct model_layer_io {
    const float *in;       /* (N,C) the residual stream into the layer */
    float *mid;            /* (N,C) the stream after attention; may be in */
    float *out;            /* (N,C) the stream out of the layer; may be mid */
    float *ln;             /* (N,C) scratch for a norm's output */
    float *rstd1, *rstd2;  /* (N) the two norms' reciprocal RMS; may be one */
    float *q, *k, *v;      /* (N,Hq*D), (N,Hkv*D), (N,Hkv*D); rotated here */
    float *atty;           /* (N,Hq*D) attention output */
    float *gate, *up, *h;  /* (N,I) */
    float *probs;          /* (B,Hq,T,P+T) attention probabilities kept, or NULL */
    float *attsc;          /* without probs: (T,P+T) scratch */
    const float *rope_cos; /* rotary tables (rope_init) covering pos0 + T */
    const float *rope_sin;
    const float *kp, *vp; /* (P, pstride) keys and values every token sees, */
    size_t pstride;       /* used as given (a prefix, or past tokens' cache) */
    int P;
    int B, T, pos0; /* shape; the first token's rotary position */
} model_layer_io;

/* Carves count floats at *off from an arena of views; offsets advance by
 * multiples of 16 floats, so views of a 64-byte aligned base stay aligned.
 * With base NULL (a first pass that sizes the arena) returns NULL. */
static inline float *model_arena_take(float *base, size_t *off, size_t count) {
    float *p = base ? base + *off : NULL;
    *off += (count + 15) & ~(size_t)15;
    return p;
}

/* Layer `layer` of v's model over io, the method's hooks included. */
void model_layer_forward(const model_view *v, int layer, const model_layer_io *io);
/* logits (rows,V) of the final norm of x (rows,C) through lm_head and its
 * hook; ln (rows,C) and rstd (rows) receive the norm. */
void model_head_forward(const model_view *v, float *logits, float *ln, float *rstd, const float *x,
                        int rows);

/* A base model opened from a Hugging Face directory. */
typedef struct model_files model_files;

/* Opens DIR/config.json and DIR/model.safetensors (or the shards of
 * model.safetensors.index.json), maps them read-only and binds every weight.
 * BF16/F16 weights are converted to F32 once, at load. */
int model_files_open(model_files **out, const char *dir, err *e);
/* The weights in the dtype of a compute setting: F32 as model_files_open;
 * BF16 binds BF16 matrices in place in the mapping (no copy) and converts
 * F16 and F32 matrices to BF16 once (round to nearest even) into a cache
 * file every process of the machine maps; norms and biases become F32. */
typedef enum { MODEL_COMPUTE_F32 = 0, MODEL_COMPUTE_BF16 = 1 } model_compute;
int model_files_open_compute(model_files **out, const char *dir, model_compute compute, err *e);
const model_config *model_files_config(const model_files *f);
const model_weights *model_files_weights(const model_files *f);
/* Hex digest of config.json and the safetensors headers: equal on every
 * machine that holds the same base. */
const char *model_files_fingerprint(const model_files *f);
/* The fingerprint model_files_open would give dir, from config.json and
 * the safetensors headers alone: no weight is bound or converted. Fails as
 * model_files_open does on a missing or malformed config or file. */
int model_files_probe(const char *dir, char fingerprint[65], err *e);
/* The dtype (an st_dtype of safetensors.h) the files store every weight in:
 * ST_BF16 or ST_F16 when all weights are, else ST_F32. */
int model_files_dtype(const model_files *f);
void model_files_close(model_files *f);

/* Creates a model over cfg and base weights (both must outlive it) for
 * batches of at most B sequences of T tokens; activations are allocated here,
 * once. p may be NULL (no method: inference of the base). With p, calls the
 * method's reserve(B, T) and sizes the rotary tables and prefix buffers for
 * the prefix length the method reports now, which must not grow later.
 * Fails on an inconsistent config (heads not a multiple of kv heads, odd
 * head_dim), a missing base weight, or out of memory. */
int model_create(model **out, const model_config *cfg, const model_weights *w, peft *p, int B,
                 int T, err *e);

/* Choices that change memory, never results. */
typedef struct model_opts {
    /* Training keeps only each layer's input and recomputes the layer's
     * activations in the backward: activations of L layers shrink to L
     * inputs plus one layer's, for one more forward of the layers. */
    int recompute;
} model_opts;

/* model_create with options (NULL: none of them). */
int model_create_opts(model **out, const model_config *cfg, const model_weights *w, peft *p, int B,
                      int T, const model_opts *opts, err *e);
void model_free(model *m);

/* Bytes model_create allocated for activations, gradients and the loss's
 * chunk of logits: the model's share of a worker's private memory (the
 * method's tensors and buffers come on top). */
size_t model_workspace_bytes(const model *m);

/* Forward over tokens (B,T). With labels (B,T) (-100 = ignored) returns the
 * SUM of token cross-entropies and writes the number of counted tokens to
 * *n_tokens; without labels returns 0. Labels are already shifted by the
 * caller: position t is scored against labels[t] (for plain language
 * modelling labels[t] = tokens[t+1], and the last position -100). B and T may
 * be below the capacity. Returns NAN, having logged why, when B or T exceeds
 * the capacity, a token is outside the vocabulary, a label is neither -100
 * nor inside it, or the method's prefix grew past its length at create. */
double model_forward(model *m, const int32_t *tokens, const int32_t *labels, int B, int T,
                     long *n_tokens);

/* Backward of the last forward's summed loss, scaled by loss_scale, into the
 * gradients of the trainable tensors of the peft object (accumulating: the
 * caller zeroes them). Stops below the lowest layer holding a trainable
 * tensor; frozen weight gradients are never computed. */
void model_backward(model *m, float loss_scale);

/* Logits (B,T,V) of the last forward: always after a forward without
 * labels; after one with labels only when they fit in one chunk of the loss
 * (B*T*V at most 4M floats, or B*T at most 256 rows), else NULL, as after a
 * backward or a failed forward. The loss takes lm_head a chunk of rows at a
 * time, so logits never exist for a whole training batch. NULL with a score
 * head (below). */
const float *model_logits(const model *m);

/* With a score head (p->num_labels > 0, model/clshead.h) the forward is
 * sequence classification: labels (B,T) hold each sequence's class index at
 * its pooled position (clshead_last_token) and -100 elsewhere, the return
 * is the sum of the sequences' cross-entropies over the classes and
 * *n_tokens the number of labelled sequences; lm_head is not computed.
 * This returns the class logits (B, num_labels) of the last forward, or
 * NULL without a head. */
const float *model_class_logits(const model *m);

#endif
