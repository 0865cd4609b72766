/* `peftps train` and `peftps eval`: one experiment in one process, over
 * common/train/train.h. Training writes OUTPUT/metrics.jsonl (a JSON object per
 * step), OUTPUT/tensors.safetensors (the trained tensors) and
 * OUTPUT/experiment.pbtxt (the resolved experiment). */
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
#include "train/metrics.h"
#include "train/train.h"

static const char train_usage[] =
    "usage: peftps train EXPERIMENT.pbtxt [--set PATH=VALUE ...]\n\n"
    "Trains the experiment's method in this process (no server, no workers) and\n"
    "writes, under the experiment's output_dir:\n"
    "  metrics.jsonl          one JSON object per step: step, loss, lr, grad_norm,\n"
    "                         tokens, tokens_per_s (and eval_loss, eval_ppl on eval steps;\n"
    "                         for classification eval_accuracy, eval_correct,\n"
    "                         eval_sequences and eval_confusion[true][predicted])\n"
    "  tensors.safetensors    the trained tensors, by name\n"
    "  experiment.pbtxt       the resolved experiment\n"
    "The result is bit-identical to `peftps run` with any number of workers.\n\n"
    "options:\n"
    "  --set PATH=VALUE   override a field, e.g. --set optimizer.lr=3e-4 (repeatable)\n";

/* The eval line of step `step`, written and logged. */
static int train_report_eval(trainer *t, metrics *m, uint64_t step, err *e) {
    metrics_line l = {.kind = METRICS_EVAL,
                      .step = step,
                      .num_labels = t->n_labels,
                      .confusion = t->eval_confusion};
    if (trainer_eval(t, &l.loss, &l.tokens, e) < 0) return -1;
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

/* Every step, with its metrics line, the progress line and the eval lines
 * of eval_every; the final eval is the caller's. */
static int train_steps(trainer *t, metrics *mf, err *e) {
    const Peftps__Experiment *ex = t->exp;
    uint64_t total = ex->schedule->total_steps;
    uint32_t every = ex->data->eval_every;
    /* Every input token is processed, whether or not it carries loss. */
    double toks = (double)ex->data->batch_size * (double)ex->data->seq_len, tok_total = 0;
    progress pr;
    progress_start(&pr, total);
    for (uint64_t s = 0; s < total; s++) {
        double t0 = progress_now();
        train_step_stats st;
        if (trainer_step(t, s, &st, e) < 0) return -1;
        double dt = progress_now() - t0;
        tok_total += toks;
        metrics_line l = {.kind = METRICS_STEP,
                          .step = s + 1,
                          .loss = st.loss,
                          .tokens = st.n_tokens,
                          .lr = st.lr,
                          .grad_norm = st.grad_norm,
                          .tokens_per_s = toks / dt};
        if (metrics_write(mf, &l, e) < 0) return -1;
        if (!isfinite(st.loss))
            return err_set(e, "step %llu: loss is %g; lower optimizer.lr or check the data",
                           (unsigned long long)(s + 1), st.loss);
        char detail[160];
        snprintf(detail, sizeof detail, "loss %.4f  lr %.2e  %.0f tok/s", st.loss, st.lr,
                 tok_total / (progress_now() - pr.start));
        progress_update(&pr, s + 1, detail);
        if (t->eval && every > 0 && (s + 1) % every == 0 && s + 1 < total) {
            progress_end(&pr);
            if (train_report_eval(t, mf, s + 1, e) < 0) return -1;
        }
    }
    progress_end(&pr);
    return 0;
}

int cmd_train(int argc, char **argv) {
    Peftps__Experiment *ex = NULL;
    int rc = experiment_from_cmdline("peftps train", train_usage, NULL, 0, argc, argv, &ex);
    if (rc) return rc == 1 ? 0 : rc;
    err e;
    trainer *t = NULL;
    metrics mf = {0};
    char path[4096];
    rc = 1;
    if (train_write_experiment(ex, &e) < 0 || train_compute_check(ex, &e) < 0 ||
        trainer_open(&t, ex, 1, &e) < 0)
        goto done;
    log_info("%s: %s, %zu trainable parameters", ex->name, t->p->method->name,
             peft_num_trainable(t->p));
    if (metrics_open(&mf, ex->output_dir, 0, &e) < 0 || train_steps(t, &mf, &e) < 0) goto done;
    if (t->eval && train_report_eval(t, &mf, ex->schedule->total_steps, &e) < 0) goto done;
    if (metrics_close(&mf, &e) < 0) goto done;
    snprintf(path, sizeof path, "%s/tensors.safetensors", ex->output_dir);
    if (peft_save(t->p, path, &e) < 0) goto done;
    log_info("wrote %s", path);
    rc = 0;
done:
    if (rc) fprintf(stderr, "peftps train: %s\n", e.msg);
    metrics_close(&mf, NULL);
    trainer_close(t);
    config_free(ex);
    return rc;
}

static const char eval_usage[] =
    "usage: peftps eval EXPERIMENT.pbtxt [--adapter FILE] [--set PATH=VALUE ...]\n\n"
    "Prints the mean token loss and perplexity on the experiment's eval data\n"
    "(for sequence classification: the mean loss per sequence, the accuracy and\n"
    "each class's correct/total with what it was mistaken for)\n"
    "(data.eval; at most data.eval_batches batches), for the base model with the\n"
    "method freshly initialised (which leaves LoRA and the delta methods equal to\n"
    "the base) or with trained tensors from --adapter.\n\n"
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
