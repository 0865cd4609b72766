/* One experiment in one process: the base model, the method's trainable
 * tensors, the data and the optimizer, and the two halves of a training step
 * that the distributed system splits between workers (the gradient of one
 * shard) and the parameter server (sum shards in order, then update). The
 * one-process trainer runs both halves in the same order with the same
 * arithmetic, so its tensors are what a cluster of any size produces. Used by
 * cli/cmd_train.c and cli/cmd_eval.c; the worker (worker/) and the parameter
 * server (server/) use the halves, the server the update's pieces. */
#ifndef PEFTPS_TRAIN_H
#define PEFTPS_TRAIN_H

#include <stdint.h>
#include <stdio.h>

#include "data/data.h"
#include "base/err.h"
#include "model/model.h"
#include "train/optim.h"
#include "model/peft.h"
#include "peftps.pb-c.h"

typedef struct trainer {
    const Peftps__Experiment *exp;
    model_files *files;
    int borrowed_files; /* files belong to the caller (trainer_open_files) */
    model *m;
    peft *p;
    data *train; /* NULL when opened for evaluation only */
    data *eval;  /* NULL when the experiment has no eval data */
    optim opt;
    int have_opt;
    float *grad_sum;          /* p->n_params: shard gradients summed in shard order */
    int rows;                 /* sequences per shard (batch_size / shards_per_step) */
    int T;                    /* seq_len */
    int32_t *tokens, *labels; /* rows*T each */
    /* Sequence classification: the number of labels (0: language
     * modelling) and, after trainer_eval, its counts: eval_confusion[g*K+p]
     * sequences of class g predicted as p (argmax of the logits, the lower
     * index on ties). */
    int n_labels;
    long *eval_confusion;
} trainer;

/* What one optimizer step did. */
typedef struct train_step_stats {
    double loss;      /* mean token loss over the step's batch */
    long n_tokens;    /* tokens that carried loss */
    double lr;        /* learning rate applied */
    double grad_norm; /* global norm of the mean gradient, before clipping */
} train_step_stats;

/* The id that pads classification records: config.json's pad_token_id,
 * else its eos_token_id (what transformers users set as pad); fails when
 * the model has neither. */
int train_pad_id(const model_config *cfg, err *e);

/* Adds what the experiment's task trains besides the method, to a method
 * just created over cfg: the score head of sequence classification
 * (model/clshead.h), initialised from exp->seed; nothing for causal
 * language modelling. Every process that builds the experiment's tensor
 * layout calls it right after methods_create, so that the layout is the
 * same everywhere. */
int train_add_task(peft *p, const Peftps__Experiment *exp, const model_config *cfg, err *e);

/* The compute setting of the experiment (model.compute; unset is F32). */
model_compute train_compute(const Peftps__Experiment *exp);
/* Its name as the wire and messages give it: "F32" or "BF16". */
const char *train_compute_name(model_compute c);
/* 0 when this machine can run the experiment's compute, else -1 with e
 * naming the instruction set it lacks (BF16 needs AVX512-BF16). */
int train_compute_check(const Peftps__Experiment *exp, err *e);

/* Opens the base model, creates the method, calibrates it when it needs
 * gradients to choose what trains (methods_calibration_batches of
 * methods/registry.h), initialises it from the seed (or from
 * exp->init_from), and opens the data. With `training` the train data and
 * the optimizer are set up too; without it only what evaluation needs. */
int trainer_open(trainer **out, const Peftps__Experiment *exp, int training, err *e);
void trainer_close(trainer *t);

/* trainer_open over a base the caller has open (model_files_open_compute
 * with train_compute(exp)) and keeps open until trainer_close: several
 * trainers then share one mapping of the base and one set of its weight
 * pointers (what a pool worker serving several experiments needs). The
 * tokenizer and config.json are still read from exp->model->path. */
int trainer_open_files(trainer **out, const Peftps__Experiment *exp, model_files *files,
                       int training, err *e);

/* Gradient of the summed token loss of shard `shard` of step `step` into
 * t->p->grads (zeroed first), at the current parameters; the worker's half.
 * Like trainer_step and trainer_eval, fails (train_compute_check) rather
 * than compute BF16 on a CPU without AVX512-BF16.
 * Writes the shard's summed loss and its count of loss-carrying tokens. */
int trainer_shard_grad(trainer *t, uint64_t step, uint32_t shard, double *loss_sum, long *n_tokens,
                       err *e);

/* One shard of one trainer for trainer_shard_grad_many. */
typedef struct train_shard_job {
    trainer *t;
    uint64_t step;
    uint32_t shard; /* in */
    double loss_sum;
    long n_tokens; /* out, as trainer_shard_grad's */
    int rc;
    err e; /* out: 0, or -1 with e */
} train_shard_job;

/* The gradients of n trainers' shards, each into its own t->p->grads, bit
 * for bit what trainer_shard_grad gives each alone. cobatch 0: one after
 * the other. cobatch 1: together (model/cobatch.h), the frozen products of
 * trainers over one base (trainer_open_files with the same model_files)
 * shared where that is exact: BF16 products over the same weight become
 * one product over their rows; F32 products are never concatenated but
 * run side by side in team jobs, each cut as alone. The
 * trainers must be distinct. Returns 0 when every job succeeded, else -1
 * (each job's rc and e say which). More than COBATCH_MAX jobs are taken
 * COBATCH_MAX at a time.
 * What was shared: cobatch_stats_get (model/cobatch.h). */
int trainer_shard_grad_many(train_shard_job *jobs, int n, int cobatch);

/* Adds shard `shard`'s gradient g (n floats) into sum, in the order every
 * trainer and server must take: shard 0 copies, each next shard adds. The
 * shards folded in ascending order through this one function are what makes
 * `peftps train` and a cluster of any size agree to the bit. */
void train_fold(float *sum, const float *g, size_t n, uint32_t shard);

/* The server's half: given the sum over the step's shards of the summed-loss
 * gradients (in `grads`, modified), divide by n_tokens, clip by the global
 * norm and take one AdamW step on params at the step's learning rate.
 * `tensors` lists the flat layout (norms are summed per tensor, in order, so
 * that servers holding disjoint tensor sets can combine their partial sums
 * into the same bits). Returns the norm before clipping. */
double train_update(optim *o, const Peftps__Optimizer *ocfg, const peft_tensor *tensors,
                    int n_tensors, float *params, float *grads, size_t n, long n_tokens, double lr);

/* The pieces of train_update, for servers that hold disjoint sets of
 * tensors and must together reach the bits of one train_update over all of
 * them. Each server runs train_grad_mean and train_grad_sumsq on its own
 * tensors, the per-tensor sums are added in global tensor order (as
 * train_grad_sumsq adds them), and each server runs train_apply with the
 * square root of that total. */

/* The mean gradient: grads[i] *= 1/n_tokens for i < n, the factor rounded
 * to float once (0 when n_tokens is 0). */
void train_grad_mean(float *grads, size_t n, long n_tokens);

/* Sum of squares of each listed tensor's gradient (optim_grad_sumsq over its
 * view), stored in each[i] when `each` is not NULL; returns their total,
 * added in list order. */
double train_grad_sumsq(const peft_tensor *tensors, int n_tensors, const float *grads,
                        double *each);

/* Clips the n floats of grads by the global norm `norm` against
 * ocfg->max_grad_norm (optim_clip_coef) and takes one AdamW step of o on
 * params at rate lr. */
void train_apply(optim *o, const Peftps__Optimizer *ocfg, float *params, float *grads, size_t n,
                 double norm, double lr);

/* Frees what computing needs (the model and its activations, the data, the
 * batch buffers), keeping the mapped base and the method with its tensors:
 * what the parameter server keeps once the method is initialised. Afterwards
 * only t->p, t->files and t->exp may be used. */
void trainer_drop_compute(trainer *t);

/* One whole step in process: every shard in order, summed, then updated. */
int trainer_step(trainer *t, uint64_t step, train_step_stats *st, err *e);

/* Mean token loss on the eval data (or, without eval data, nothing: returns
 * -1 with e set): every window of the eval file, or with data.eval_batches
 * > 0 at most that many batches of batch_size sequences from its start; for
 * classification the mean loss per sequence, with t->eval_confusion filled
 * (see trainer_eval_accuracy). */
int trainer_eval(trainer *t, double *mean_loss, long *n_tokens, err *e);

/* Accuracy of the last classification trainer_eval (correct / total, 0
 * when nothing was evaluated); *correct and *total when not NULL. */
double trainer_eval_accuracy(const trainer *t, long *correct, long *total);

/* Writes the per-class counts of the last classification trainer_eval, one
 * line per class: "  NAME  correct/total  (predicted as: NAME n, ...)". */
void trainer_eval_report(const trainer *t, FILE *out);

/* ---- checkpoints of a run (the parameter server's and `peftps train`'s) ---- */

/* Whether checkpoints are on: checkpoint.every_steps > 0. */
int train_ckpt_enabled(const Peftps__Experiment *exp);

/* Whether the state after `step` steps is written: checkpoints are on and
 * step is a multiple of checkpoint.every_steps or the last step. */
int train_ckpt_due(const Peftps__Experiment *exp, uint64_t step);

/* Opens the checkpoint environment `dir` for writing (keeping
 * checkpoint.keep) and, when it holds checkpoints, restores checkpoint
 * `want` (CKPT_LATEST: the newest) into params[0..n) and o, after checking
 * that it belongs to this experiment (exp_fp, base_fp: see ckpt_check) and
 * to this layout of tensors. *step is the restored step, 0 when the
 * environment was empty. Fails, naming dir, when: the environment cannot be
 * opened; it holds checkpoints and checkpoint.resume is false; `want` is not
 * CKPT_LATEST and not held; the checkpoint is damaged, of another experiment,
 * base or layout; its step is past schedule.total_steps. A checkpoint of a
 * run with another schedule.total_steps resumes (the fingerprint leaves the
 * schedule's length out): the steps after it follow the new schedule. On
 * failure *out is NULL. */
struct ckpt; /* train/ckpt.h */
int train_ckpt_resume(struct ckpt **out, const char *dir, const Peftps__Experiment *exp,
                      const char *exp_fp, const char *base_fp, const peft_tensor *tensors,
                      int n_tensors, float *params, size_t n, optim *o, uint64_t want,
                      uint64_t *step, err *e);

/* Writes the state after `step` steps (params[0..n) laid out as tensors,
 * the optimizer o) as one checkpoint of c. */
int train_ckpt_write(struct ckpt *c, uint64_t step, const Peftps__Experiment *exp,
                     const char *exp_fp, const char *base_fp, const peft_tensor *tensors,
                     int n_tensors, const float *params, size_t n, const optim *o, err *e);

#endif
