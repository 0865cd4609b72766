/* One experiment in one process, and the two halves of a training step that
 * workers and the parameter server share; see train.h. */
#include "train/train.h"
#include "methods/registry.h"
#include "train/ckpt.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "config/config.h"
#include "model/clshead.h"
#include "model/bf16.h"
#include "model/cobatch.h"

/* Calibration batch i: training sequences i*rows .. i*rows+rows-1. */
static int trainer_calibration_batch(void *ctx, int i, int32_t *tokens, int32_t *labels, err *e) {
    trainer *t = ctx;
    (void)e;
    for (int r = 0; r < t->rows; r++)
        data_sequence(t->train, (uint64_t)i * (uint64_t)t->rows + (uint64_t)r,
                      tokens + (size_t)r * (size_t)t->T, labels + (size_t)r * (size_t)t->T);
    return 0;
}

int train_pad_id(const model_config *cfg, err *e) {
    if (cfg->pad_token_id >= 0) return cfg->pad_token_id;
    if (cfg->eos_token_id >= 0) return cfg->eos_token_id;
    return err_set(e, "the model's config.json has neither pad_token_id nor eos_token_id: "
                      "sequence classification pads records with one of them");
}

int train_add_task(peft *p, const Peftps__Experiment *exp, const model_config *cfg, err *e) {
    int K = config_num_labels(exp);
    if (K == 0) return 0;
    int pad = train_pad_id(cfg, e);
    if (pad < 0) return -1;
    if (clshead_add(p, K, pad, exp->seed, e) < 0) return err_wrap(e, "sequence classification");
    return 0;
}

model_compute train_compute(const Peftps__Experiment *exp) {
    return exp->model && exp->model->has_compute && exp->model->compute == PEFTPS__COMPUTE__BF16
               ? MODEL_COMPUTE_BF16
               : MODEL_COMPUTE_F32;
}

const char *train_compute_name(model_compute c) {
    return c == MODEL_COMPUTE_BF16 ? "BF16" : "F32";
}

int train_compute_check(const Peftps__Experiment *exp, err *e) {
    if (train_compute(exp) != MODEL_COMPUTE_BF16) return 0;
    return bf16_cpu_check("model.compute: BF16", e);
}

int trainer_open(trainer **out, const Peftps__Experiment *exp, int training, err *e) {
    return trainer_open_files(out, exp, NULL, training, e);
}

int trainer_open_files(trainer **out, const Peftps__Experiment *exp, model_files *files,
                       int training, err *e) {
    *out = NULL;
    trainer *t = calloc(1, sizeof *t);
    if (!t) return err_set(e, "out of memory");
    t->exp = exp;
    const Peftps__Data *d = exp->data;
    t->rows = (int)(d->batch_size / d->shards_per_step);
    t->T = (int)d->seq_len;

    if (files) {
        t->files = files;
        t->borrowed_files = 1;
    } else if (model_files_open_compute(&t->files, exp->model->path, train_compute(exp), e) < 0)
        goto fail;
    const model_config *cfg = model_files_config(t->files);
    const model_weights *w = model_files_weights(t->files);
    data_opts opts = {.format = d->format,
                      .seq_len = t->T,
                      .vocab_size = cfg->vocab_size,
                      .tokenizer_path = exp->model->path};
    t->n_labels = config_num_labels(exp);
    if (t->n_labels) {
        opts.labels = exp->task->sequence_classification->labels;
        opts.n_labels = t->n_labels;
        if ((opts.pad_id = train_pad_id(cfg, e)) < 0) goto fail;
        t->eval_confusion = calloc((size_t)t->n_labels * t->n_labels, sizeof *t->eval_confusion);
        if (!t->eval_confusion) {
            err_set(e, "out of memory");
            goto fail;
        }
    }
    if (data_open(&t->train, d->train, &opts, e) < 0) goto fail;
    if (d->eval && d->eval[0] && data_open(&t->eval, d->eval, &opts, e) < 0) goto fail;

    if (methods_create(&t->p, exp->method, cfg, w, e) < 0) goto fail;
    if (train_add_task(t->p, exp, cfg, e) < 0) goto fail;
    model_opts mo = {.recompute = exp->model->has_recompute && exp->model->recompute};
    if (model_create_opts(&t->m, cfg, w, t->p, t->rows, t->T, &mo, e) < 0) goto fail;
    size_t nbt = (size_t)t->rows * (size_t)t->T;
    t->tokens = malloc(nbt * sizeof *t->tokens);
    t->labels = malloc(nbt * sizeof *t->labels);
    if (!t->tokens || !t->labels) {
        err_set(e, "out of memory");
        goto fail;
    }
    int calib = methods_calibration_batches(exp->method);
    if (calib > 0 && train_compute_check(exp, e) < 0) {
        err_wrap(e, "calibrating %s", t->p->method->name);
        goto fail;
    }
    if (calib > 0) {
        log_info("calibrating %s on %d batches of %d sequences", t->p->method->name, calib,
                 t->rows);
        peft_set_step(t->p, 0, exp->seed, 0, 0);
        if (peft_calibrate(t->p, t->m, trainer_calibration_batch, t, calib, e) < 0) goto fail;
    }
    peft_init(t->p, exp->seed);
    if (exp->init_from && exp->init_from[0]) {
        /* A classifier may start from a language-model adapter: its head
         * then keeps the seeded initialisation. */
        int head = 1;
        if ((t->n_labels ? peft_load_without_head(t->p, exp->init_from, &head, e)
                         : peft_load(t->p, exp->init_from, e)) < 0) {
            err_wrap(e, "init_from");
            goto fail;
        }
        if (!head)
            log_info("init_from %s has no classification head; the head starts from its "
                     "initialisation",
                     exp->init_from);
    }
    if (training) {
        t->grad_sum = malloc(t->p->n_params * sizeof *t->grad_sum);
        if (!t->grad_sum) {
            err_set(e, "out of memory");
            goto fail;
        }
        if (optim_create(&t->opt, t->p->n_params, exp->optimizer, e) < 0) goto fail;
        t->have_opt = 1;
    }
    *out = t;
    return 0;
fail:
    trainer_close(t);
    return -1;
}

void trainer_close(trainer *t) {
    if (!t) return;
    if (t->have_opt) optim_free(&t->opt);
    free(t->grad_sum);
    free(t->eval_confusion);
    free(t->tokens);
    free(t->labels);
    model_free(t->m);
    peft_free(t->p);
    data_close(t->train);
    data_close(t->eval);
    if (!t->borrowed_files) model_files_close(t->files);
    free(t);
}

int trainer_shard_grad(trainer *t, uint64_t step, uint32_t shard, double *loss_sum, long *n_tokens,
                       err *e) {
    const Peftps__Data *d = t->exp->data;
    if (train_compute_check(t->exp, e) < 0) return -1; /* never another path */
    if (data_shard(t->train, step, shard, d->shards_per_step, d->batch_size, t->tokens, t->labels,
                   e) < 0)
        return -1;
    peft_set_step(t->p, 1, t->exp->seed, step, shard);
    peft_zero_grads(t->p);
    *loss_sum = model_forward(t->m, t->tokens, t->labels, t->rows, t->T, n_tokens);
    model_backward(t->m, 1.0f);
    return 0;
}

static void shard_job_run(void *ctx, int i) {
    train_shard_job *j = (train_shard_job *)ctx + i;
    j->rc = trainer_shard_grad(j->t, j->step, j->shard, &j->loss_sum, &j->n_tokens, &j->e);
}

int trainer_shard_grad_many(train_shard_job *jobs, int n, int cobatch) {
    for (int i = 0; i < n; i++) {
        jobs[i].rc = -1;
        jobs[i].loss_sum = 0.0;
        jobs[i].n_tokens = 0;
        jobs[i].e.msg[0] = 0;
    }
    if (cobatch)
        for (int i0 = 0; i0 < n; i0 += COBATCH_MAX) /* at most COBATCH_MAX together */
            cobatch_run(n - i0 < COBATCH_MAX ? n - i0 : COBATCH_MAX, shard_job_run, jobs + i0);
    else
        for (int i = 0; i < n; i++) shard_job_run(jobs, i);
    int rc = 0;
    for (int i = 0; i < n; i++) rc |= jobs[i].rc;
    return rc < 0 ? -1 : 0;
}

void train_fold(float *sum, const float *g, size_t n, uint32_t shard) {
    if (shard == 0)
        memcpy(sum, g, n * sizeof *g);
    else
        for (size_t i = 0; i < n; i++) sum[i] += g[i];
}

void train_grad_mean(float *grads, size_t n, long n_tokens) {
    /* One multiply per element, the same on every server. */
    float inv = n_tokens > 0 ? (float)(1.0 / (double)n_tokens) : 0.0f;
    for (size_t i = 0; i < n; i++) grads[i] *= inv;
}

double train_grad_sumsq(const peft_tensor *tensors, int n_tensors, const float *grads,
                        double *each) {
    double total = 0.0;
    for (int i = 0; i < n_tensors; i++) {
        double s = optim_grad_sumsq(grads + tensors[i].offset, tensors[i].numel);
        if (each) each[i] = s;
        total += s;
    }
    return total;
}

void train_apply(optim *o, const Peftps__Optimizer *ocfg, float *params, float *grads, size_t n,
                 double norm, double lr) {
    float coef = optim_clip_coef(norm, ocfg->max_grad_norm);
    if (coef < 1.0f)
        for (size_t i = 0; i < n; i++) grads[i] *= coef;
    optim_step(o, params, grads, lr);
}

double train_update(optim *o, const Peftps__Optimizer *ocfg, const peft_tensor *tensors,
                    int n_tensors, float *params, float *grads, size_t n, long n_tokens,
                    double lr) {
    train_grad_mean(grads, n, n_tokens);
    double norm = sqrt(train_grad_sumsq(tensors, n_tensors, grads, NULL));
    train_apply(o, ocfg, params, grads, n, norm, lr);
    return norm;
}

void trainer_drop_compute(trainer *t) {
    model_free(t->m);
    t->m = NULL;
    data_close(t->train);
    t->train = NULL;
    data_close(t->eval);
    t->eval = NULL;
    free(t->tokens);
    free(t->labels);
    t->tokens = t->labels = NULL;
}

int trainer_step(trainer *t, uint64_t step, train_step_stats *st, err *e) {
    const Peftps__Data *d = t->exp->data;
    peft *p = t->p;
    double loss = 0.0;
    long ntok = 0;
    for (uint32_t s = 0; s < d->shards_per_step; s++) {
        double ls;
        long nt;
        if (trainer_shard_grad(t, step, s, &ls, &nt, e) < 0) return -1;
        train_fold(t->grad_sum, p->grads, p->n_params, s);
        loss += ls;
        ntok += nt;
    }
    double lr = optim_lr(t->exp->optimizer, t->exp->schedule, step);
    st->grad_norm = train_update(&t->opt, t->exp->optimizer, p->tensors, p->n_tensors, p->params,
                                 t->grad_sum, p->n_params, ntok, lr);
    peft_refresh(p);
    st->loss = ntok > 0 ? loss / (double)ntok : 0.0;
    st->n_tokens = ntok;
    st->lr = lr;
    return 0;
}

int trainer_eval(trainer *t, double *mean_loss, long *n_tokens, err *e) {
    if (!t->eval) return err_set(e, "the experiment has no eval data (data.eval)");
    if (train_compute_check(t->exp, e) < 0) return -1;
    const Peftps__Data *d = t->exp->data;
    uint64_t have = data_num_windows(t->eval);
    uint64_t want = d->eval_batches ? (uint64_t)d->eval_batches * d->batch_size : have;
    if (want > have) want = have;
    double loss = 0.0;
    long ntok = 0;
    int K = t->n_labels;
    if (K) memset(t->eval_confusion, 0, (size_t)K * K * sizeof *t->eval_confusion);
    peft_set_step(t->p, 0, t->exp->seed, 0, 0);
    for (uint64_t w = 0; w < want;) {
        int rows = 0;
        for (; rows < t->rows && w < want; rows++, w++)
            if (data_window(t->eval, w, t->tokens + (size_t)rows * (size_t)t->T,
                            t->labels + (size_t)rows * (size_t)t->T, e) < 0)
                return -1;
        long nt = 0;
        loss += model_forward(t->m, t->tokens, t->labels, rows, t->T, &nt);
        ntok += nt;
        const float *logits = K ? model_class_logits(t->m) : NULL;
        for (int r = 0; logits && r < rows; r++) {
            const int32_t *lab = t->labels + (size_t)r * t->T;
            int gold = -1;
            for (int i = 0; i < t->T && gold < 0; i++)
                if (lab[i] != DATA_IGNORE) gold = lab[i];
            if (gold < 0) continue;
            const float *z = logits + (size_t)r * K;
            int pred = 0;
            for (int k = 1; k < K; k++)
                if (z[k] > z[pred]) pred = k;
            t->eval_confusion[(size_t)gold * K + pred]++;
        }
    }
    *mean_loss = ntok > 0 ? loss / (double)ntok : 0.0;
    *n_tokens = ntok;
    return 0;
}

double trainer_eval_accuracy(const trainer *t, long *correct, long *total) {
    long c = 0, n = 0;
    for (int g = 0; g < t->n_labels; g++)
        for (int p = 0; p < t->n_labels; p++) {
            long v = t->eval_confusion[(size_t)g * t->n_labels + p];
            n += v;
            if (g == p) c += v;
        }
    if (correct) *correct = c;
    if (total) *total = n;
    return n ? (double)c / (double)n : 0.0;
}

void trainer_eval_report(const trainer *t, FILE *out) {
    int K = t->n_labels;
    char *const *names = t->exp->task->sequence_classification->labels;
    for (int g = 0; g < K; g++) {
        const long *row = t->eval_confusion + (size_t)g * K;
        long n = 0;
        for (int p = 0; p < K; p++) n += row[p];
        fprintf(out, "  %-12s %ld/%ld", names[g], row[g], n);
        int first = 1;
        for (int p = 0; p < K; p++)
            if (p != g && row[p]) {
                fprintf(out, "%s%s %ld", first ? "  (predicted as: " : ", ", names[p], row[p]);
                first = 0;
            }
        fprintf(out, "%s\n", first ? "" : ")");
    }
}

/* ---- checkpoints of a run ---- */

/* Blob of a checkpoint: schedule.total_steps of the run that wrote it (u64,
 * host order, which ckpt.h requires to be little-endian). */
#define TRAIN_BLOB_TOTAL "schedule.total_steps"

int train_ckpt_enabled(const Peftps__Experiment *exp) {
    return exp->checkpoint && exp->checkpoint->every_steps > 0;
}

int train_ckpt_due(const Peftps__Experiment *exp, uint64_t step) {
    if (!train_ckpt_enabled(exp)) return 0;
    return step % exp->checkpoint->every_steps == 0 || step == exp->schedule->total_steps;
}

int train_ckpt_resume(ckpt **out, const char *dir, const Peftps__Experiment *exp,
                      const char *exp_fp, const char *base_fp, const peft_tensor *tensors,
                      int n_tensors, float *params, size_t n, optim *o, uint64_t want,
                      uint64_t *step, err *e) {
    *out = NULL;
    *step = 0;
    ckpt_options co = {.keep = (int)exp->checkpoint->keep};
    ckpt *c;
    if (ckpt_open(&c, dir, 1, &co, e) < 0) return err_wrap(e, "checkpoint.path");
    uint64_t *steps = NULL;
    int held = 0;
    if (ckpt_steps(c, &steps, &held, e) < 0) {
        ckpt_close(c);
        return err_wrap(e, "checkpoint.path");
    }
    free(steps);
    if (held == 0) {
        if (want != CKPT_LATEST) {
            ckpt_close(c);
            return err_set(e, "%s holds no checkpoint to resume from", dir);
        }
        *out = c;
        return 0;
    }
    if (!exp->checkpoint->resume) {
        ckpt_close(c);
        return err_set(e,
                       "checkpoint.path %s already holds checkpoints and checkpoint.resume is "
                       "false; remove it, use another path, or resume",
                       dir);
    }
    ckpt_data d;
    int rc = -1;
    uint64_t total = exp->schedule->total_steps;
    if (ckpt_read(c, want, &d, e) < 0) {
        err_wrap(e, "refusing to resume");
        goto done;
    }
    if (ckpt_check(&d, dir, exp_fp, base_fp, tensors, n_tensors, n, e) < 0) {
        err_wrap(e, "refusing to resume");
        goto done;
    }
    if (d.step > total) {
        err_set(e,
                "refusing to resume: checkpoint %s is at step %llu, past schedule.total_steps "
                "%llu; raise total_steps to extend the run",
                dir, (unsigned long long)d.step, (unsigned long long)total);
        goto done;
    }
    if (optim_restore(o, d.opt_t, d.m, d.v, d.n_params, e) < 0) {
        err_wrap(e, "refusing to resume from %s", dir);
        goto done;
    }
    memcpy(params, d.params, n * sizeof *params);
    *step = d.step;
    for (int i = 0; i < d.n_blobs; i++) {
        uint64_t was;
        if (strcmp(d.blobs[i].name, TRAIN_BLOB_TOTAL) || d.blobs[i].size != sizeof was) continue;
        memcpy(&was, d.blobs[i].data, sizeof was);
        if (was != total && exp->schedule->decay != PEFTPS__DECAY__CONSTANT)
            log_info("schedule.total_steps is %llu, the checkpoint's run had %llu: the learning "
                     "rate of steps %llu on follows the %s decay over %llu steps",
                     (unsigned long long)total, (unsigned long long)was,
                     (unsigned long long)d.step + 1,
                     exp->schedule->decay == PEFTPS__DECAY__COSINE ? "cosine" : "linear",
                     (unsigned long long)total);
    }
    rc = 0;
done:
    ckpt_data_free(&d);
    if (rc < 0)
        ckpt_close(c);
    else
        *out = c;
    return rc;
}

int train_ckpt_write(ckpt *c, uint64_t step, const Peftps__Experiment *exp, const char *exp_fp,
                     const char *base_fp, const peft_tensor *tensors, int n_tensors,
                     const float *params, size_t n, const optim *o, err *e) {
    ckpt_data d;
    memset(&d, 0, sizeof d);
    d.step = step;
    snprintf(d.experiment_fp, sizeof d.experiment_fp, "%s", exp_fp);
    snprintf(d.base_fp, sizeof d.base_fp, "%s", base_fp ? base_fp : "");
    d.data_pos = step * exp->data->batch_size;
    optim_state(o, &d.opt_t, &d.m, &d.v);
    d.n_params = n;
    d.params = params;
    d.tensors = tensors;
    d.n_tensors = n_tensors;
    /* The schedule's length, only to say on resume that it changed. */
    uint64_t total = exp->schedule->total_steps;
    ckpt_blob b = {.name = TRAIN_BLOB_TOTAL, .data = &total, .size = sizeof total};
    d.blobs = &b;
    d.n_blobs = 1;
    return ckpt_write(c, &d, e);
}
