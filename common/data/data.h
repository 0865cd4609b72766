/* Training and evaluation data: a stream of tokens cut into fixed windows of
 * seq_len+1 tokens, with a per-token loss mask, and the map from
 * (step, shard) to the sequences of that shard, so that every worker reads
 * the same tokens for the same shard. Workers and the one-process trainer
 * read batches here; the model (model.h) consumes them. Text formats go
 * through the tokenizer (tokenizer.h) once and are cached beside the file.
 *
 * Formats:
 *   .tokens  raw little-endian uint32 ids, every token a target.
 *   .txt     one document: the whole file, UTF-8, encoded as one text (the
 *            tokenizer's template tokens such as Llama 3's BOS first, then
 *            the text, then EOS); every token a target except the template's
 *            leading ones. Blank lines are text like any other: to train on
 *            separate documents, use JSONL {"text": ...} records.
 *   .jsonl   one JSON object per line: {"text": "..."} (every token a
 *            target) or {"prompt": "...", "completion": "..."} (the prompt's
 *            tokens carry no loss, the completion's do). Each record is
 *            template-prefix + tokens + EOS (EOS a target); records are
 *            packed one after another. Prompt and completion are encoded
 *            separately, so a token never spans their boundary. Blank lines
 *            are skipped; other keys of a record are ignored.
 *            With a classification task (data_opts.n_labels > 0) each
 *            record is {"text": "...", "label": NAME or INDEX} and becomes
 *            one window of its own, never packed: template-prefix + text
 *            tokens + template-suffix, cut to seq_len, then padded with
 *            pad_id; the label sits at the position transformers pools
 *            (clshead_last_token of model/clshead.h) and every other label
 *            is DATA_IGNORE. A label that is not one of the names, or an
 *            index outside them, is refused naming FILE:LINE.
 *
 * The cache: tokens and loss mask of a .txt/.jsonl file are written to
 * FILE.peftps-cache (or CACHE_DIR/BASENAME.peftps-cache with
 * data_opts.cache_dir), headed by the SHA-256 of the file's bytes and the
 * tokenizer's fingerprint (tok_fingerprint: tokenizer.json and the files
 * that set BOS/EOS). It is reused, mapped read-only and shared by the
 * processes of a machine, while both are unchanged, and rebuilt otherwise.
 * When it cannot be written (a read-only directory) the tokens stay in
 * memory and a warning says so. */
#ifndef PEFTPS_DATA_H
#define PEFTPS_DATA_H

#include <stdint.h>

#include "base/err.h"
#include "peftps.pb-c.h"

/* tokenizer.h's tok, by its tag: this header leaves the name `tok` free for
 * the files that include it (a typedef would clash with their variables). */
struct tok;

/* A label that carries no loss (the model's ignore index). */
#define DATA_IGNORE (-100)

typedef struct data data;

/* How to read a file. Set the fields by name: fields added later default to
 * zero and leave callers unchanged. */
typedef struct data_opts {
    Peftps__DataFormat format; /* DATA_FORMAT_UNSPECIFIED: from the file name */
    int seq_len;               /* T, tokens per sequence, >= 1 */
    int vocab_size;            /* every id must be below it, >= 1 */
    /* For TEXT/JSONL, the tokenizer: an open one (borrowed), or else the
     * model directory or tokenizer.json to open when the cache must be
     * built (a valid cache is used without parsing the tokenizer). */
    struct tok *tokenizer;
    const char *tokenizer_path;
    const char *cache_dir; /* NULL: the cache sits beside the data file */
    /* Sequence classification when n_labels > 0 (JSONL only): the class
     * names in index order, and the id that pads each record to seq_len. */
    char *const *labels;
    int n_labels;
    int pad_id;
} data_opts;

/* 1 when the format (or, when UNSPECIFIED, the file name's ending .txt or
 * .jsonl) needs a tokenizer. */
int data_needs_tokenizer(const char *path, Peftps__DataFormat format);

/* Opens `path` and checks all of it. With format UNSPECIFIED the name's
 * ending decides: `.tokens` (TOKENS), `.txt` (TEXT), `.jsonl` (JSONL). For
 * TEXT and JSONL the cache is checked and used, or built (see above).
 * Errors, each naming the file: it cannot be opened, read or mapped; the
 * format cannot be told from the name; seq_len or vocab_size is not
 * positive; it holds fewer than seq_len+1 tokens; a token id is not below
 * vocab_size (the token's index, and for .tokens its byte offset).
 * .tokens: its size is not a multiple of 4 bytes. TEXT/JSONL: no tokenizer
 * was given, or it fails to open; the tokenizer has no EOS; the text is not
 * UTF-8 or a character has no token. JSONL, naming FILE:LINE (and the column
 * for JSON syntax): a line is not valid JSON or not an object; a record has
 * neither "text" nor both "prompt" and "completion", or has "text" and
 * "prompt" both; one of them is not a string; "text" or "completion" is
 * empty; the file has no record. Tokens after the last whole window are
 * never read. */
int data_open(data **out, const char *path, const data_opts *opts, err *e);

/* Unmaps and frees; d may be NULL. */
void data_close(data *d);

/* Windows in the file: floor(tokens / (seq_len+1)), at least 1. */
uint64_t data_num_windows(const data *d);

/* Tokens in the stream. */
uint64_t data_num_tokens(const data *d);

/* Tokens that are targets (not masked out); data_num_tokens for .tokens. */
uint64_t data_num_loss_tokens(const data *d);

/* JSONL records (1 for TEXT, 0 for .tokens). */
uint64_t data_num_records(const data *d);

/* The cache file of TEXT/JSONL data (NULL for .tokens, and when it could
 * not be written), and whether data_open found it valid rather than
 * building it. */
const char *data_cache_path(const data *d);
int data_cache_reused(const data *d);

/* T, as opened. */
int data_seq_len(const data *d);

/* Window w (< data_num_windows) as one sequence: with ids = the stream's
 * tokens from w*(T+1), tokens[t] = ids[t] and labels[t] = ids[t+1] for
 * t < T (position t predicts labels[t]), or DATA_IGNORE where the loss mask
 * leaves token t+1 out. For evaluation, which reads windows 0, 1, ... of its
 * file in order. Fails, naming the file, when w is out of range. */
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
