/* AdamW exactly as torch.optim.AdamW, global gradient-norm clipping as
 * torch.nn.utils.clip_grad_norm_, and the learning-rate schedules of the
 * experiment's Schedule block, all over the flat float arrays of peft.h.
 * The server (and the one-process trainer) runs it; ckpt.c saves its state.
 * Every result depends only on its inputs: same inputs, same bits, on any
 * machine (no libm transcendental enters a result; sums run in a fixed order). */
#ifndef PEFTPS_OPTIM_H
#define PEFTPS_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"
#include "peftps.pb-c.h"

typedef struct optim {
    size_t n;   /* parameters updated */
    uint64_t t; /* updates done so far; the next optim_step is update t+1 */
    float beta1, beta2, eps, weight_decay;
    float *m, *v; /* first and second moments, n each, one allocation */
} optim;

/* Prepares AdamW for n > 0 parameters with the hyperparameters of cfg (lr is
 * not kept: each step is given its rate): t = 0, moments zeroed. Fails when
 * beta1 or beta2 is outside [0,1), eps or weight_decay is negative or not a
 * number, or memory runs out. Values are taken as given (config.c fills the
 * defaults), so an unset field counts as 0. */
int optim_create(optim *o, size_t n, const Peftps__Optimizer *cfg, err *e);

/* Releases the moments; o may be zeroed or already freed. */
void optim_free(optim *o);

/* The learning rate of step `step` (counted from 0): cfg->lr * (step + 1) /
 * warmup_steps while step < warmup_steps (as llm.c and nanoGPT warm up: the
 * first step trains, unlike Hugging Face's get_*_schedule_with_warmup whose
 * first step runs at 0, and the last warmup step reaches lr), then with
 * progress = (step - warmup_steps) / max(1, total_steps - warmup_steps),
 * clamped to [0,1]:
 *   CONSTANT (or DECAY_UNSPECIFIED, or sched NULL): lr
 *   LINEAR: min_lr + (lr - min_lr) * (1 - progress)
 *   COSINE: min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * progress))
 * so the rate reaches min_lr at total_steps and stays there. */
double optim_lr(const Peftps__Optimizer *cfg, const Peftps__Schedule *sched, uint64_t step);

/* Sum of g[i]^2 for i = 0..n-1, accumulated in double one element after the
 * other, in index order (so the bits never depend on threads or splits of
 * the loop). */
double optim_grad_sumsq(const float *g, size_t n);

/* sqrt(optim_grad_sumsq(g, n)): the global L2 norm of a flat gradient. */
double optim_grad_norm(const float *g, size_t n);

/* The factor clip_grad_norm_ applies for a gradient of norm `norm`:
 * max_norm / (norm + 1e-6), evaluated in float32 as torch does, when that is
 * below 1, else 1. max_norm <= 0 means
 * no clipping (1). A non-finite norm gives a non-finite or zero factor, as in
 * torch; the caller decides whether to skip such a step. */
float optim_clip_coef(double norm, float max_norm);

/* Clips g in place as torch.nn.utils.clip_grad_norm_(params, max_norm) and
 * returns the norm before clipping. max_norm <= 0 only measures the norm. */
double optim_clip(float *g, size_t n, float max_norm);

/* One AdamW update of params (o->n floats) with grads at learning rate lr,
 * counting t up first (bias corrections use t from 1):
 *   p *= 1 - lr*wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
 *   p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 * with the float32 operations of torch 1.13's AdamW on an FMA-capable CPU
 * (moment updates fused): bit for bit torch's result for the same clipped
 * gradient (tests/test_optim.c). */
void optim_step(optim *o, float *params, const float *grads, double lr);

/* The state a checkpoint stores: update count and pointers to the moments
 * (o->n floats each, valid until the next optim_step or optim_free). */
void optim_state(const optim *o, uint64_t *t, const float **m, const float **v);

/* Puts back a state saved by optim_state, bit for bit. Fails, changing
 * nothing, when n differs from the optimizer's size. */
int optim_restore(optim *o, uint64_t t, const float *m, const float *v, size_t n, err *e);

#endif
