/* `peftps train` and `peftps eval`: one experiment in one process, over
 * common/train/train.h. Training writes OUTPUT/metrics.jsonl (a JSON object per
 * step, train/metrics.h), OUTPUT/tensors.safetensors (the trained tensors),
 * OUTPUT/experiment.pbtxt (the resolved experiment) and LMDB checkpoints
 * (train/ckpt.h) it resumes from, as the parameter server does. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "config/cmdline.h"
#include "config/config.h"
#include "train/experiment.h"
#include "base/fsutil.h"
#include "base/log.h"
#include "config/pbtext.h"
#include "base/progress.h"
#include "base/stopsig.h"
#include "train/ckpt.h"
#include "train/metrics.h"
#include "train/train.h"

static const char train_usage[] =
    "usage: peftps train EXPERIMENT.pbtxt [--set PATH=VALUE ...]\n\n"
    "Trains the experiment's method in this process (no server, no workers) and\n"
    "writes, under the experiment's output_dir:\n"
    "  metrics.jsonl          one JSON object per step:\n"
    "                           step, loss (mean token loss), lr, grad_norm (before clipping),\n"
    "                           loss_tokens (tokens that carried loss),\n"
    "                           tokens (tokens processed: batch_size * seq_len),\n"
    "                           tokens_per_s (tokens / the step's time);\n"
    "                         and on eval steps: eval_loss, eval_ppl, eval_loss_tokens\n"
    "                         (for classification: eval_loss, eval_accuracy, eval_correct,\n"
    "                         eval_sequences and eval_confusion[true][predicted])\n"
    "  tensors.safetensors    the trained tensors, by name\n"
    "  experiment.pbtxt       the resolved experiment\n"
    "and a checkpoint every checkpoint.every_steps steps and after the last into\n"
    "checkpoint.path (an LMDB directory; the newest checkpoint.keep are kept;\n"
    "every_steps: 0 turns checkpoints off), and on SIGINT/SIGTERM after the step\n"
    "under way. Run again, it resumes from the newest checkpoint, bit-identical\n"
    "to a run that was never interrupted.\n"
    "A finished run is extended by raising schedule.total_steps and running again:\n"
    "it resumes from the last checkpoint and trains the added steps. The steps\n"
    "after the checkpoint follow the new schedule: with a LINEAR or COSINE decay\n"
    "their learning rate differs from that of the first run's last steps (and\n"
    "the result from a run of the new length from the start).\n"
    "The result is bit-identical to `peftps run` with any number of workers.\n\n"
    "options:\n"
    "  --set PATH=VALUE   override a field, e.g. --set optimizer.lr=3e-4 (repeatable);\n"
    "                     PATH= with nothing after '=' clears it (e.g. data.eval=)\n";

static volatile sig_atomic_t train_signal;

static void train_on_signal(int sig) {
    train_signal = sig;
}

/* The eval line of step `step`, written and logged. */
static int train_report_eval(trainer *t, metrics *m, uint64_t step, err *e) {
    metrics_line l = {.kind = METRICS_EVAL,
                      .step = step,
                      .num_labels = t->n_labels,
                      .confusion = t->eval_confusion};
    if (trainer_eval(t, &l.loss, &l.loss_tokens, e) < 0) return -1;
    return metrics_write(m, &l, e);
}

/* OUTPUT/experiment.pbtxt: the resolved experiment. */
static int train_write_experiment(const Peftps__Experiment *ex, err *e) {
    char path[4096], *text = NULL;
    if (fs_mkdir_p(ex->output_dir, e) < 0 || pbtext_print(&ex->base, &text, e) < 0) return -1;
    snprintf(path, sizeof path, "%s/experiment.pbtxt", ex->output_dir);
    int rc = fs_write_text(path, text, e);
    free(text);
    return rc;
}

/* The checkpoints of a run: the environment (NULL when checkpoints are
 * off) and what identifies the run in it. */
typedef struct train_ckpts {
    ckpt *c;
    char exp_fp[65];
    const char *base_fp;
} train_ckpts;

/* Opens checkpoint.path (unless checkpoints are off) and restores its
 * newest checkpoint into the trainer; *start is the step it holds (0: none). */
static int train_resume(trainer *t, train_ckpts *k, uint64_t *start, err *e) {
    const Peftps__Experiment *ex = t->exp;
    peft *p = t->p;
    *start = 0;
    k->base_fp = model_files_fingerprint(t->files);
    config_fingerprint(ex, k->exp_fp);
    if (!train_ckpt_enabled(ex)) return 0;
    if (train_ckpt_resume(&k->c, ex->checkpoint->path, ex, k->exp_fp, k->base_fp, p->tensors,
                          p->n_tensors, p->params, p->n_params, &t->opt, CKPT_LATEST, start, e) < 0)
        return -1;
    if (*start > 0) {
        peft_refresh(p);
        log_info("resuming from the checkpoint of step %llu in %s (%llu of %llu steps left)",
                 (unsigned long long)*start, ex->checkpoint->path,
                 (unsigned long long)(ex->schedule->total_steps - *start),
                 (unsigned long long)ex->schedule->total_steps);
    }
    return 0;
}

/* Steps start.. of the run, with their metrics lines, the progress line,
 * the eval lines of eval_every and the checkpoints; on SIGINT/SIGTERM the
 * step under way finishes and is checkpointed. The final eval is the
 * caller's. */
static int train_steps(trainer *t, metrics *mf, train_ckpts *k, uint64_t start, err *e) {
    const Peftps__Experiment *ex = t->exp;
    peft *p = t->p;
    uint64_t total = ex->schedule->total_steps;
    uint32_t every = ex->data->eval_every;
    /* Every input token is processed, whether or not it carries loss. */
    double toks = (double)ex->data->batch_size * (double)ex->data->seq_len, tok_total = 0;
    progress pr;
    progress_start(&pr, total);
    stopsig sigs;
    stopsig_catch(&sigs, train_on_signal);
    int rc = 0;
    for (uint64_t s = start; s < total && rc == 0; s++) {
        double t0 = progress_now();
        train_step_stats st;
        if (trainer_step(t, s, &st, e) < 0) {
            rc = -1;
            break;
        }
        double dt = progress_now() - t0;
        tok_total += toks;
        metrics_line l = {.kind = METRICS_STEP,
                          .step = s + 1,
                          .loss = st.loss,
                          .loss_tokens = st.n_tokens,
                          .tokens = toks,
                          .lr = st.lr,
                          .grad_norm = st.grad_norm,
                          .tokens_per_s = toks / dt};
        if (metrics_write(mf, &l, e) < 0) {
            rc = -1;
            break;
        }
        if (!isfinite(st.loss)) {
            rc = err_set(e, "step %llu: loss is %g; lower optimizer.lr or check the data",
                         (unsigned long long)(s + 1), st.loss);
            break;
        }
        /* On a signal, the state after this step is kept too (the step under
         * way finishes first: a checkpoint holds whole steps). */
        if ((train_ckpt_due(ex, s + 1) || (train_signal && k->c)) &&
            train_ckpt_write(k->c, s + 1, ex, k->exp_fp, k->base_fp, p->tensors, p->n_tensors,
                             p->params, p->n_params, &t->opt, e) < 0) {
            rc = -1;
            break;
        }
        if (train_signal) {
            if (k->c)
                rc = err_set(e,
                             "stopped by a signal after step %llu; its checkpoint is in %s: run "
                             "the same command again to resume",
                             (unsigned long long)(s + 1), ex->checkpoint->path);
            else
                rc = err_set(e,
                             "stopped by a signal after step %llu; checkpoints are off "
                             "(checkpoint.every_steps is 0), so nothing is kept",
                             (unsigned long long)(s + 1));
            break;
        }
        char detail[160];
        snprintf(detail, sizeof detail, "loss %.4f  lr %.2e  %.0f tok/s", st.loss, st.lr,
                 tok_total / (progress_now() - pr.start));
        progress_update(&pr, s + 1, detail);
        if (t->eval && every > 0 && (s + 1) % every == 0 && s + 1 < total) {
            progress_end(&pr);
            if (train_report_eval(t, mf, s + 1, e) < 0) rc = -1;
        }
    }
    progress_end(&pr);
    stopsig_restore(&sigs);
    return rc;
}

int cmd_train(int argc, char **argv) {
    Peftps__Experiment *ex = NULL;
    int rc = experiment_from_cmdline("peftps train", train_usage, NULL, 0, argc, argv, &ex);
    if (rc) return rc == 1 ? 0 : rc;
    err e;
    trainer *t = NULL;
    metrics mf = {0};
    train_ckpts k = {0};
    uint64_t start = 0;
    char path[4096];
    rc = 1;
    if (train_write_experiment(ex, &e) < 0 || train_compute_check(ex, &e) < 0 ||
        trainer_open(&t, ex, 1, &e) < 0)
        goto done;
    log_info("%s: %s, %zu trainable parameters", ex->name, t->p->method->name,
             peft_num_trainable(t->p));
    if (train_resume(t, &k, &start, &e) < 0 || metrics_open(&mf, ex->output_dir, start, &e) < 0 ||
        train_steps(t, &mf, &k, start, &e) < 0)
        goto done;
    if (t->eval && train_report_eval(t, &mf, ex->schedule->total_steps, &e) < 0) goto done;
    if (metrics_close(&mf, &e) < 0) goto done;
    snprintf(path, sizeof path, "%s/tensors.safetensors", ex->output_dir);
    if (peft_save(t->p, path, &e) < 0) goto done;
    log_info("wrote %s", path);
    rc = 0;
done:
    if (rc) fprintf(stderr, "peftps train: %s\n", e.msg);
    metrics_close(&mf, NULL);
    ckpt_close(k.c);
    trainer_close(t);
    config_free(ex);
    return rc;
}

static const char eval_usage[] =
    "usage: peftps eval EXPERIMENT.pbtxt [--adapter FILE] [--set PATH=VALUE ...]\n\n"
    "Prints the mean token loss and perplexity on the experiment's eval data\n"
    "(for sequence classification: the mean loss per sequence, the accuracy and\n"
    "each class's correct/total with what it was mistaken for)\n"
    "(data.eval: the whole file, or at most data.eval_batches batches when set),\n"
    "for the base model with the method freshly initialised (which leaves LoRA\n"
    "and the delta methods equal to the base) or with trained tensors from\n"
    "--adapter.\n\n"
    "options:\n"
    "  --adapter FILE     trained tensors (tensors.safetensors of `peftps train`)\n"
    "  --set PATH=VALUE   override a field (repeatable)\n";

int cmd_eval(int argc, char **argv) {
    const char *adapter = NULL;
    const cmdline_opt opts[] = {CMDLINE_STR("--adapter", &adapter)};
    Peftps__Experiment *ex = NULL;
    int rc = experiment_from_cmdline("peftps eval", eval_usage, opts, 1, argc, argv, &ex);
    if (rc) return rc == 1 ? 0 : rc;
    err e;
    trainer *t = NULL;
    rc = 1;
    if (!ex->data->eval || !ex->data->eval[0]) {
        fprintf(stderr, "peftps eval: the experiment has no eval data; set data.eval\n");
        config_free(ex);
        return 2;
    }
    if (train_compute_check(ex, &e) < 0 || trainer_open(&t, ex, 0, &e) < 0) goto done;
    if (adapter && peft_load(t->p, adapter, &e) < 0) goto done;
    double loss;
    long ntok;
    if (trainer_eval(t, &loss, &ntok, &e) < 0) goto done;
    if (t->n_labels) {
        long correct, total;
        double acc = trainer_eval_accuracy(t, &correct, &total);
        printf("eval loss %.6f  accuracy %.4f  correct %ld  sequences %ld\n", loss, acc, correct,
               total);
        trainer_eval_report(t, stdout);
    } else {
        printf("eval loss %.6f  perplexity %.4f  tokens %ld\n", loss, exp(loss), ntok);
    }
    rc = 0;
done:
    if (rc) fprintf(stderr, "peftps eval: %s\n", e.msg);
    trainer_close(t);
    config_free(ex);
    return rc;
}
