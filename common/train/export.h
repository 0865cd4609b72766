/* Exporting what a run trained, and reading it back: the trained tensors of
 * a `peftps train`/`peftps run` output directory, a parameter-server
 * checkpoint (ckpt.h), a safetensors file or a Hugging Face PEFT adapter
 * directory, opened over their base model (model.h) and method (peft.h);
 * written out in PEFT's layout (adapter_config.json +
 * adapter_model.safetensors), as a complete merged model directory, or as
 * one safetensors file of raw tensors. cli/cmd_export.c and
 * cli/cmd_generate.c use it; train.h rebuilds methods that calibrate. */
#ifndef PEFTPS_EXPORT_H
#define PEFTPS_EXPORT_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"
#include "model/model.h"
#include "model/peft.h"
#include "peftps.pb-c.h"
#include "train/train.h"

/* What a source is, told from what it holds. */
typedef enum {
    EXPORT_TRAIN_DIR,  /* DIR/tensors.safetensors (+ DIR/experiment.pbtxt) */
    EXPORT_CHECKPOINT, /* DIR/data.mdb, or DIR/server-N/data.mdb of N servers */
    EXPORT_PEFT_DIR,   /* DIR/adapter_config.json + DIR/adapter_model.safetensors */
    EXPORT_FILE,       /* a safetensors file of trained tensors */
} export_kind;

/* How to open a source. */
typedef struct export_opts {
    /* The experiment that trained the tensors. NULL: DIR/experiment.pbtxt of
     * a train directory; required for a checkpoint or a file; not used for
     * a PEFT directory (its adapter_config.json says it all). */
    const char *experiment;
    char *const *sets; /* "PATH=VALUE" overrides of the experiment */
    int nsets;
    /* The base model directory. NULL: the experiment's model.path, or a PEFT
     * adapter's base_model_name_or_path when that is a local directory. */
    const char *model_dir;
    uint64_t step; /* checkpoint step; CKPT_LATEST for the newest */
} export_opts;

/* No experiment, no overrides, no model directory, the newest step. */
void export_opts_default(export_opts *o);

/* A trained method over its base, ready to export or to generate with. */
typedef struct export_source {
    export_kind kind;
    char *path;              /* the source as given */
    Peftps__Experiment *exp; /* the experiment, model.path set to the base used */
    model_files *files;      /* the base */
    peft *p;                 /* the method holding the trained tensors */
    trainer *t;              /* when the method had to calibrate (owns files and p) */
    uint64_t step;           /* a checkpoint's step (0 otherwise) */
} export_source;

/* Tells what `source` is (see export_kind); fails, naming it and what was
 * looked for, when it is none of them or does not exist. */
int export_kind_of(const char *source, export_kind *kind, err *e);

/* Opens a source: its experiment (or, for a PEFT directory, the method
 * block its adapter_config.json describes, see export_read_adapter_config),
 * the base model, the method created over it and initialised from the
 * experiment's seed, then the trained tensors loaded by name (peft_load,
 * or a checkpoint's tensor table). Methods that choose what trains from
 * calibration batches (attention_heads with top_k, subnetwork with GRADIENT)
 * are rebuilt through trainer_open, which needs the experiment's training
 * data as it was. Fails, naming the file and what to do, when: the source is
 * not recognised; a checkpoint or a file comes without an experiment; the
 * experiment does not parse; a checkpoint was written by another experiment
 * (its fingerprint differs from config_fingerprint of this one) or on
 * another base; the servers' checkpoints are at different steps (pass a
 * step); the base does not open; a tensor is missing, of another shape, or
 * not one the method trains. */
int export_open(export_source **out, const char *source, const export_opts *o, err *e);
/* Frees the source, its method, base and experiment; s may be NULL. */
void export_close(export_source *s);

/* Writes DIR/adapter_config.json and DIR/adapter_model.safetensors as
 * Hugging Face PEFT saves them (DIR is created), the method's part through
 * its adapter hooks (peft.h; lora.c and prefix.c have them). LoRA: the tensors under
 * their PEFT names (base_model.model.model.layers.N.self_attn.q_proj.lora_A
 * .weight (r, in), ...lora_B.weight (out, r)) and LoraConfig's fields
 * (peft_type "LORA", r, lora_alpha, lora_dropout, use_rslora, target_modules,
 * layers_to_transform for a subset of layers, the rest at PEFT's defaults).
 * Prefix tuning: one tensor prompt_embeddings (P, L*2*Hkv*D), the keys and
 * values the model reads (a projection MLP's output, not its weights), and
 * PrefixTuningConfig's fields (num_attention_heads the kv heads, token_dim
 * Hkv*D, prefix_projection false). Fails for other methods, which PEFT does
 * not have (suggesting merged or tensors), and on I/O errors. */
int export_peft(const export_source *s, const char *dir, err *e);

/* The adapter_config.json text export_peft writes (malloc'ed; free it). */
int export_adapter_config(const export_source *s, char **json, err *e);

/* Default size of one weights file of a merged model. */
#define EXPORT_SHARD_BYTES ((size_t)4 << 30)

/* dtype of export_merged: the base's (BF16 when every base weight is BF16,
 * else F32). */
#define EXPORT_DTYPE_BASE (-1)

/* Writes a complete model directory DIR: config.json (the base's, with
 * torch_dtype of the weights written, and tie_word_embeddings false when the
 * method changed a tied embedding, whose lm_head is then written apart),
 * every base weight plus the method's change (peft_merge), summed in F32,
 * then written in dtype (ST_F32, ST_BF16 rounded to nearest even, or
 * EXPORT_DTYPE_BASE) under its Hugging Face name
 * in model.safetensors, or, past shard_bytes (0: EXPORT_SHARD_BYTES), in
 * model-0000i-of-0000n.safetensors with model.safetensors.index.json, and
 * the base's tokenizer.json, tokenizer_config.json, special_tokens_map.json
 * and generation_config.json when present. Loadable by model_files_open and
 * by transformers. Fails for prefix tuning (no weight changes: export peft
 * instead), for a dtype other than those, when DIR is the base's own
 * directory, and on I/O errors. */
int export_merged(export_source *s, const char *dir, size_t shard_bytes, int dtype, err *e);

/* Writes the trained tensors of `source` as one F32 safetensors file at
 * path, by name, without opening a base or an experiment: a train
 * directory's tensors.safetensors, a PEFT directory's
 * adapter_model.safetensors, a file, or a checkpoint's tensors at o->step
 * (of every server, by name). Fails like export_open on the source and on
 * I/O errors. */
int export_tensors(const char *source, const export_opts *o, const char *path, err *e);

/* Reads DIR/adapter_config.json of a Hugging Face PEFT adapter into *method,
 * through the adapter_config_read hook of the method of its peft_type
 * (free with protobuf_c_message_free_unpacked(&m->base, NULL)): LORA becomes
 * a lora block (r, alpha, dropout, use_rslora, target_modules,
 * layers_to_transform as layers), PREFIX_TUNING a prefix block without
 * projection (the saved table is the keys and values themselves). With cfg
 * (may be NULL) the adapter is checked against the model: layers, and a
 * prefix's num_layers and token_dim. *base_model (may be NULL) gets
 * base_model_name_or_path (malloc'ed, NULL when absent). Fails, naming the
 * file and the field, on JSON errors, another peft_type or task_type,
 * settings peftps does not implement (DoRA, bias other than "none",
 * fan_in_fan_out, rank/alpha patterns, modules_to_save, target_modules as a
 * regular expression, modules other than the seven linears) and on an
 * adapter made for another model shape. */
int export_read_adapter_config(const char *dir, const model_config *cfg, Peftps__Method **method,
                               char **base_model, err *e);

#endif
