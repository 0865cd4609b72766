/* metrics.jsonl written and read in one place (metrics.h): the line format
 * lives here only; jansson parses it back. */
#include "train/metrics.h"

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"

/* Copies the lines of `path` whose step is at most keep_through into memory. */
static int metrics_kept(const char *path, uint64_t keep_through, char **kept, size_t *nkept) {
    *kept = NULL;
    *nkept = 0;
    FILE *old = fopen(path, "r");
    if (!old) return 0;
    FILE *mem = open_memstream(kept, nkept);
    char line[4096];
    while (mem && fgets(line, sizeof line, old)) {
        unsigned long long st;
        if (sscanf(line, "{\"step\":%llu", &st) == 1 && st <= keep_through) fputs(line, mem);
    }
    if (mem) fclose(mem);
    fclose(old);
    return 0;
}

int metrics_open(metrics *m, const char *dir, uint64_t keep_through, err *e) {
    snprintf(m->path, sizeof m->path, "%s/metrics.jsonl", dir);
    char *kept = NULL;
    size_t nkept = 0;
    if (keep_through > 0 && keep_through != METRICS_KEEP_ALL)
        metrics_kept(m->path, keep_through, &kept, &nkept);
    m->f = fopen(m->path, keep_through == METRICS_KEEP_ALL ? "a" : "w");
    if (!m->f) {
        free(kept);
        return err_errno(e, "%s", m->path);
    }
    if (kept) fwrite(kept, 1, nkept, m->f);
    free(kept);
    if (fflush(m->f) != 0) return err_errno(e, "%s", m->path);
    return 0;
}

int metrics_write(metrics *m, const metrics_line *l, err *e) {
    unsigned long long step = (unsigned long long)l->step;
    if (l->kind == METRICS_EVAL && l->num_labels > 0) {
        int K = l->num_labels;
        long correct = 0, total = 0;
        for (int g = 0; g < K; g++)
            for (int p = 0; p < K; p++) {
                total += l->confusion[(size_t)g * K + p];
                if (g == p) correct += l->confusion[(size_t)g * K + p];
            }
        double acc = total ? (double)correct / (double)total : 0.0;
        fprintf(m->f,
                "{\"step\":%llu,\"eval_loss\":%.6f,\"eval_accuracy\":%.6f,\"eval_correct\":%ld,"
                "\"eval_sequences\":%ld,\"eval_confusion\":[",
                step, l->loss, acc, correct, total);
        for (int g = 0; g < K; g++) {
            fprintf(m->f, "%s[", g ? "," : "");
            for (int p = 0; p < K; p++)
                fprintf(m->f, "%s%ld", p ? "," : "", l->confusion[(size_t)g * K + p]);
            fprintf(m->f, "]");
        }
        fprintf(m->f, "]}\n");
        log_info("step %llu: eval loss %.4f, accuracy %.4f (%ld of %ld sequences)", step, l->loss,
                 acc, correct, total);
    } else if (l->kind == METRICS_EVAL) {
        fprintf(m->f,
                "{\"step\":%llu,\"eval_loss\":%.6f,\"eval_ppl\":%.4f,\"eval_loss_tokens\":%ld}\n",
                step, l->loss, exp(l->loss), l->loss_tokens);
        log_info("step %llu: eval loss %.4f, perplexity %.3f (%ld tokens)", step, l->loss,
                 exp(l->loss), l->loss_tokens);
    } else {
        fprintf(m->f,
                "{\"step\":%llu,\"loss\":%.6f,\"lr\":%.6g,\"grad_norm\":%.6f,\"loss_tokens\":%ld,"
                "\"tokens\":%.0f,\"tokens_per_s\":%.1f",
                step, l->loss, l->lr, l->grad_norm, l->loss_tokens, l->tokens, l->tokens_per_s);
        if (l->has_bytes)
            fprintf(m->f, ",\"bytes_in\":%llu,\"bytes_out\":%llu", (unsigned long long)l->bytes_in,
                    (unsigned long long)l->bytes_out);
        fputs("}\n", m->f);
    }
    if (fflush(m->f) != 0) return err_errno(e, "%s", m->path);
    return 0;
}

int metrics_close(metrics *m, err *e) {
    if (!m->f) return 0;
    int rc = fclose(m->f);
    m->f = NULL;
    return rc != 0 ? err_errno(e, "%s", m->path) : 0;
}

static double metrics_num(json_t *o, const char *key) {
    return json_number_value(json_object_get(o, key));
}

/* The line's fields; 0 for a step or eval line, 1 for another kind. */
static int metrics_parse(json_t *o, metrics_line *l) {
    memset(l, 0, sizeof *l);
    l->step = (uint64_t)metrics_num(o, "step");
    json_t *loss = json_object_get(o, "loss"), *ev = json_object_get(o, "eval_loss");
    if (json_is_number(loss)) {
        l->kind = METRICS_STEP;
        l->loss = json_number_value(loss);
        /* Older files named the loss tokens `tokens`, and had no count of
         * the tokens processed. */
        if (json_object_get(o, "loss_tokens")) {
            l->loss_tokens = (long)metrics_num(o, "loss_tokens");
            l->tokens = metrics_num(o, "tokens");
        } else {
            l->loss_tokens = (long)metrics_num(o, "tokens");
        }
        l->lr = metrics_num(o, "lr");
        l->grad_norm = metrics_num(o, "grad_norm");
        l->tokens_per_s = metrics_num(o, "tokens_per_s");
        l->has_bytes = json_is_number(json_object_get(o, "bytes_in"));
        l->bytes_in = (uint64_t)metrics_num(o, "bytes_in");
        l->bytes_out = (uint64_t)metrics_num(o, "bytes_out");
        return 0;
    }
    if (!json_is_number(ev)) return 1;
    l->kind = METRICS_EVAL;
    l->loss = json_number_value(ev);
    l->loss_tokens = (long)metrics_num(
        o, json_object_get(o, "eval_loss_tokens") ? "eval_loss_tokens" : "eval_tokens");
    return 0;
}

int metrics_read(const char *path, int (*each)(void *ctx, const metrics_line *l, err *e), void *ctx,
                 err *e) {
    FILE *f = fopen(path, "r");
    if (!f) return err_errno(e, "%s", path);
    char *text = NULL;
    size_t cap = 0, lineno = 0;
    int rc = 0;
    while (rc == 0 && getline(&text, &cap, f) > 0) {
        lineno++;
        json_error_t je;
        json_t *o = json_loads(text, 0, &je);
        metrics_line l;
        if (!json_is_object(o))
            rc = err_set(e, "%s:%zu: not a JSON object", path, lineno);
        else if (metrics_parse(o, &l) == 0)
            rc = each(ctx, &l, e);
        json_decref(o);
    }
    free(text);
    fclose(f);
    return rc;
}
