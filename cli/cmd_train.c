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
#include "train/train.h"

static const char train_usage[] =
    "usage: peftps train EXPERIMENT.pbtxt [--set PATH=VALUE ...]\n\n"
    "Trains the experiment's method in this process (no server, no workers) and\n"
    "writes, under the experiment's output_dir:\n"
    "  metrics.jsonl          one JSON object per step: step, loss, lr, grad_norm,\n"
    "                         tokens, tokens_per_s (and eval_loss, eval_ppl on eval steps)\n"
    "  tensors.safetensors    the trained tensors, by name\n"
    "  experiment.pbtxt       the resolved experiment\n"
    "The result is bit-identical to `peftps run` with any number of workers.\n\n"
    "options:\n"
    "  --set PATH=VALUE   override a field, e.g. --set optimizer.lr=3e-4 (repeatable)\n";

static void report_eval(FILE *metrics, uint64_t step, double loss, long ntok) {
    fprintf(metrics, "{\"step\":%llu,\"eval_loss\":%.6f,\"eval_ppl\":%.4f,\"eval_tokens\":%ld}\n",
            (unsigned long long)step, loss, exp(loss), ntok);
    fflush(metrics);
    log_info("step %llu: eval loss %.4f, perplexity %.3f (%ld tokens)", (unsigned long long)step,
             loss, exp(loss), ntok);
}

int cmd_train(int argc, char **argv) {
    Peftps__Experiment *ex = NULL;
    int rc = experiment_from_cmdline("peftps train", train_usage, NULL, &argc, argv, &ex);
    if (rc) return rc == 1 ? 0 : rc;
    if (cmdline_parse("peftps train", train_usage, NULL, 0, NULL, 0, NULL, NULL, 0, argc, argv)) {
        config_free(ex);
        return 2;
    }
    err e;
    trainer *t = NULL;
    FILE *metrics = NULL;
    char path[4096];
    rc = 1;
    if (fs_mkdir_p(ex->output_dir, &e) < 0) goto done;
    char *text = NULL;
    if (pbtext_print(&ex->base, &text, &e) < 0) goto done;
    snprintf(path, sizeof path, "%s/experiment.pbtxt", ex->output_dir);
    int wrc = fs_write_text(path, text, &e);
    free(text);
    if (wrc < 0) goto done;
    if (trainer_open(&t, ex, 1, &e) < 0) goto done;
    log_info("%s: %s, %zu trainable parameters", ex->name, t->p->method->name,
             peft_num_trainable(t->p));
    snprintf(path, sizeof path, "%s/metrics.jsonl", ex->output_dir);
    metrics = fopen(path, "w");
    if (!metrics) {
        err_errno(&e, "%s", path);
        goto done;
    }
    uint64_t total = ex->schedule->total_steps;
    uint32_t every = ex->data->eval_every;
    progress pr;
    progress_start(&pr, total);
    double tok_total = 0;
    for (uint64_t s = 0; s < total; s++) {
        double t0 = progress_now();
        train_step_stats st;
        if (trainer_step(t, s, &st, &e) < 0) goto done;
        double dt = progress_now() - t0;
        /* Every input token is processed, whether or not it carries loss. */
        double toks = (double)ex->data->batch_size * (double)ex->data->seq_len;
        tok_total += toks;
        fprintf(metrics,
                "{\"step\":%llu,\"loss\":%.6f,\"lr\":%.6g,\"grad_norm\":%.6f,\"tokens\":%ld,"
                "\"tokens_per_s\":%.1f}\n",
                (unsigned long long)(s + 1), st.loss, st.lr, st.grad_norm, st.n_tokens, toks / dt);
        fflush(metrics);
        if (!isfinite(st.loss)) {
            err_set(&e, "step %llu: loss is %g; lower optimizer.lr or check the data",
                    (unsigned long long)(s + 1), st.loss);
            goto done;
        }
        char detail[160];
        snprintf(detail, sizeof detail, "loss %.4f  lr %.2e  %.0f tok/s", st.loss, st.lr,
                 tok_total / (progress_now() - pr.start));
        progress_update(&pr, s + 1, detail);
        if (t->eval && every > 0 && (s + 1) % every == 0 && s + 1 < total) {
            double el;
            long nt;
            progress_end(&pr);
            if (trainer_eval(t, &el, &nt, &e) < 0) goto done;
            report_eval(metrics, s + 1, el, nt);
        }
    }
    progress_end(&pr);
    if (t->eval) {
        double el;
        long nt;
        if (trainer_eval(t, &el, &nt, &e) < 0) goto done;
        report_eval(metrics, total, el, nt);
    }
    snprintf(path, sizeof path, "%s/tensors.safetensors", ex->output_dir);
    if (peft_save(t->p, path, &e) < 0) goto done;
    log_info("wrote %s", path);
    rc = 0;
done:
    if (rc) fprintf(stderr, "peftps train: %s\n", e.msg);
    if (metrics) fclose(metrics);
    trainer_close(t);
    config_free(ex);
    return rc;
}

static const char eval_usage[] =
    "usage: peftps eval EXPERIMENT.pbtxt [--adapter FILE] [--set PATH=VALUE ...]\n\n"
    "Prints the mean token loss and perplexity on the experiment's eval data\n"
    "(data.eval; at most data.eval_batches batches), for the base model with the\n"
    "method freshly initialised (which leaves LoRA and the delta methods equal to\n"
    "the base) or with trained tensors from --adapter.\n\n"
    "options:\n"
    "  --adapter FILE     trained tensors (tensors.safetensors of `peftps train`)\n"
    "  --set PATH=VALUE   override a field (repeatable)\n";

int cmd_eval(int argc, char **argv) {
    const char *adapter = NULL;
    const char *const valued[] = {"--adapter", NULL};
    Peftps__Experiment *ex = NULL;
    int rc = experiment_from_cmdline("peftps eval", eval_usage, valued, &argc, argv, &ex);
    if (rc) return rc == 1 ? 0 : rc;
    const cmdline_opt opts[] = {{"--adapter", &adapter}};
    if (cmdline_parse("peftps eval", eval_usage, opts, 1, NULL, 0, NULL, NULL, 0, argc, argv)) {
        config_free(ex);
        return 2;
    }
    err e;
    trainer *t = NULL;
    rc = 1;
    if (!ex->data->eval || !ex->data->eval[0]) {
        fprintf(stderr, "peftps eval: the experiment has no eval data; set data.eval\n");
        config_free(ex);
        return 2;
    }
    if (trainer_open(&t, ex, 0, &e) < 0) goto done;
    if (adapter && peft_load(t->p, adapter, &e) < 0) goto done;
    double loss;
    long ntok;
    if (trainer_eval(t, &loss, &ntok, &e) < 0) goto done;
    printf("eval loss %.6f  perplexity %.4f  tokens %ld\n", loss, exp(loss), ntok);
    rc = 0;
done:
    if (rc) fprintf(stderr, "peftps eval: %s\n", e.msg);
    trainer_close(t);
    config_free(ex);
    return rc;
}
