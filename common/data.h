/* Training and evaluation data: a token file cut into fixed windows of
 * seq_len+1 tokens, and the map from (step, shard) to the sequences of that
 * shard, so that every worker reads the same tokens for the same shard.
 * Workers and the one-process trainer read batches here; the model
 * (model.h) consumes them. Formats: `.tokens` (raw little-endian uint32 ids);
 * TEXT and JSONL need the tokenizer and are refused for now. */
#ifndef PEFTPS_DATA_H
#define PEFTPS_DATA_H

#include <stdint.h>

#include "err.h"
#include "peftps.pb-c.h"

/* A label that carries no loss (the model's ignore index). Formats with a
 * loss mask (prompt/completion) write it; `.tokens` never does. */
#define DATA_IGNORE (-100)

typedef struct data data;

/* How to read a file. Set the fields by name: fields added later (a
 * tokenizer for TEXT/JSONL) default to zero and leave callers unchanged. */
typedef struct data_opts {
    Peftps__DataFormat format; /* DATA_FORMAT_UNSPECIFIED: from the file name */
    int seq_len;               /* T, tokens per sequence, >= 1 */
    int vocab_size;            /* every id must be below it, >= 1 */
} data_opts;

/* Opens `path` read-only (mapped, shared by the processes of a machine) and
 * checks all of it. With format UNSPECIFIED the name's ending decides:
 * `.tokens` (TOKENS), `.txt` (TEXT), `.jsonl` (JSONL).
 * Errors, each naming the file: it cannot be opened or mapped; the format
 * cannot be told from the name, or is TEXT/JSONL (not supported yet); its
 * size is not a multiple of 4 bytes; it holds fewer than seq_len+1 tokens;
 * a token id is not below vocab_size (message gives the token's index and
 * byte offset); seq_len or vocab_size is not positive. Tokens after the last
 * whole window are never read. */
int data_open(data **out, const char *path, const data_opts *opts, err *e);

/* Unmaps and frees; d may be NULL. */
void data_close(data *d);

/* Windows in the file: floor(tokens / (seq_len+1)), at least 1. */
uint64_t data_num_windows(const data *d);

/* Tokens in the file. */
uint64_t data_num_tokens(const data *d);

/* T, as opened. */
int data_seq_len(const data *d);

/* Window w (< data_num_windows) as one sequence: with ids = the file's
 * tokens from w*(T+1), tokens[t] = ids[t] and labels[t] = ids[t+1] for
 * t < T (position t predicts labels[t]). For evaluation, which reads windows
 * 0, 1, ... of its file in order. Fails, naming the file, when w is out of
 * range. */
int data_window(const data *d, uint64_t w, int32_t *tokens, int32_t *labels, err *e);

/* Training sequence g: window g mod data_num_windows, so epochs wrap. */
void data_sequence(const data *d, uint64_t g, int32_t *tokens, int32_t *labels);

/* The batch_size/shards sequences (rows of T) of shard `shard` of step
 * `step`: sequences g = step*batch_size + shard*(batch_size/shards) + r for
 * r = 0 .. batch_size/shards - 1, so the shards of a step, in order, are the
 * step's batch read as one shard. tokens and labels hold
 * (batch_size/shards)*T values. Fails when shards is 0, batch_size is 0 or
 * not a multiple of shards, or shard >= shards. */
int data_shard(const data *d, uint64_t step, uint32_t shard, uint32_t shards, uint32_t batch_size,
               int32_t *tokens, int32_t *labels, err *e);

#endif
