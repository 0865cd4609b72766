/* OUTPUT/metrics.jsonl, one JSON object a line. The one writer and reader
 * of that file, for `peftps train` and `run` (cli/), the parameter server
 * (server/) and `peftps compare`. A step line per optimizer step:
 *
 *   step          optimizer steps completed (1 for the first)
 *   loss          mean token loss of the step's batch
 *   lr            learning rate the step applied
 *   grad_norm     global norm of the mean gradient, before clipping
 *   loss_tokens   tokens of the batch that carried loss (the loss's divisor)
 *   tokens        tokens the step processed: batch_size * seq_len, loss or not
 *   tokens_per_s  tokens / the step's wall time
 *   bytes_in, bytes_out   (the server only) bytes received and sent for it
 *
 * An eval line per evaluation: step, eval_loss (mean token loss), eval_ppl
 * (its exp) and eval_loss_tokens (tokens that carried loss); for sequence
 * classification step, eval_loss (mean loss per sequence), eval_accuracy,
 * eval_correct, eval_sequences and eval_confusion. Older files
 * named loss_tokens `tokens` and eval_loss_tokens `eval_tokens` (and had no
 * count of tokens processed); metrics_read reads both. */
#ifndef PEFTPS_METRICS_H
#define PEFTPS_METRICS_H

#include <stdint.h>
#include <stdio.h>

#include "base/err.h"

typedef enum metrics_kind { METRICS_STEP, METRICS_EVAL } metrics_kind;

/* One line of the file. */
typedef struct metrics_line {
    metrics_kind kind;
    uint64_t step;       /* steps done when the line was written (1 for the first) */
    double loss;         /* step: mean training loss of the step; eval: eval loss */
    long loss_tokens;    /* tokens that carried loss (step: of the batch; eval: of the data) */
    double tokens;       /* step lines: tokens processed, loss or not (0: an older file) */
    double lr;           /* step lines: learning rate applied */
    double grad_norm;    /* step lines: global gradient norm before clipping */
    double tokens_per_s; /* step lines: tokens processed per second of the step */
    int has_bytes;       /* step lines of the server: the wire traffic below */
    uint64_t bytes_in, bytes_out;
    /* Eval lines of sequence classification (num_labels > 0): tokens is the
     * number of sequences, and confusion[g*num_labels+p] (num_labels^2,
     * borrowed) counts sequences of class g predicted as p; written as
     * eval_accuracy, eval_correct, eval_sequences and eval_confusion instead
     * of eval_ppl and eval_tokens. Not read back (metrics_read leaves 0). */
    int num_labels;
    const long *confusion;
} metrics_line;

/* An open metrics.jsonl being written. */
typedef struct metrics {
    FILE *f;
    char path[4200];
} metrics;

/* Keep every line already there and append (`peftps run` after its cluster). */
#define METRICS_KEEP_ALL UINT64_MAX

/* Opens DIR/metrics.jsonl for writing, keeping the lines already there whose
 * step is at most keep_through (0: none, a new file; a resumed server keeps
 * those of the steps its checkpoint holds, so that steps computed again
 * appear once; METRICS_KEEP_ALL: every line, appending). Errors name the
 * file. */
int metrics_open(metrics *m, const char *dir, uint64_t keep_through, err *e);

/* Writes one line and flushes it, so that a reader of the file follows the
 * run; an eval line is also logged (log_info) with its perplexity. Errors
 * name the file. */
int metrics_write(metrics *m, const metrics_line *l, err *e);

/* Closes the file (nothing when it was never opened); errors name it. */
int metrics_close(metrics *m, err *e);

/* Reads the file at path, calling each(ctx, line) for every step and eval
 * line in order (lines of other kinds are skipped). Stops at the first
 * nonzero return of each (returned) or at a line that is not a JSON object
 * ("PATH:LINE: not a JSON object"); -1 with e set when the file cannot be
 * read. */
int metrics_read(const char *path, int (*each)(void *ctx, const metrics_line *l, err *e), void *ctx,
                 err *e);

#endif
