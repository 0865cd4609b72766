/* Checkpoints of one experiment in an LMDB environment: what the parameter
 * server needs to resume bit-identically (the flat trainable tensors of
 * peft.h, the AdamW state of optim.h, the data cursor, method state), each
 * value checksummed with crc32c.h. `peftps inspect` (cli/cmd_inspect.c) reads them.
 *
 * Layout. DIR is an LMDB environment directory (DIR/data.mdb, DIR/lock.mdb)
 * holding one main database of byte-string keys:
 *
 *   format                                "peftps-ckpt 1"
 *   step/SSSSSSSSSSSSSSSSSSSS/meta        fixed header (below)
 *   step/SSSSSSSSSSSSSSSSSSSS/tensors     the tensor table
 *   step/SSSSSSSSSSSSSSSSSSSS/params      n_params floats
 *   step/SSSSSSSSSSSSSSSSSSSS/m           n_params floats (AdamW first moment)
 *   step/SSSSSSSSSSSSSSSSSSSS/v           n_params floats (AdamW second moment)
 *   step/SSSSSSSSSSSSSSSSSSSS/blob/NAME   opaque method state
 *
 * where S... is the step in 20 decimal digits, so that key order is step
 * order. Every value is its payload followed by 4 bytes: the CRC-32C of the
 * key and then the payload, little-endian; a value read under another key
 * fails its check like a damaged one. All integers are little-endian; floats
 * are IEEE-754 binary32 in host order, which must be little-endian.
 *   meta:    u32 version (1), u64 step, u64 data_pos, u64 opt_t, u64 n_params,
 *            u32 n_tensors, u32 n_blobs, i64 unix time of the write,
 *            64 bytes experiment fingerprint, 64 bytes base fingerprint
 *            (NUL-padded when empty)
 *   tensors: per tensor: u32 name length, the name (no NUL), u32 ndim,
 *            ndim x i64 shape, u64 offset, u64 numel
 *
 * One checkpoint is written in one LMDB write transaction, together with the
 * pruning of old ones: after a crash at any point the environment holds
 * either the previous set of checkpoints or the new one, never a part.
 * Readers use read-only transactions, so `peftps inspect` may read while a
 * server writes. When a write finds the map full, it aborts, doubles the map
 * size and retries from the beginning.
 *
 * A handle is used by one thread at a time. LMDB forbids opening one
 * environment twice in the same process: open each DIR once. */
#ifndef PEFTPS_CKPT_H
#define PEFTPS_CKPT_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"
#include "model/peft.h"

/* Step argument of ckpt_read: the checkpoint of the highest step. */
#define CKPT_LATEST UINT64_MAX
/* Checkpoints kept after each write when the options do not say. */
#define CKPT_DEFAULT_KEEP 3
/* Initial map size when the options do not say. LMDB reserves address space
 * only; the file grows with the data. */
#define CKPT_DEFAULT_MAP_SIZE ((size_t)1 << 30)
/* Longest blob name, in bytes. */
#define CKPT_BLOB_NAME_MAX 255

typedef struct ckpt ckpt;

typedef struct ckpt_options {
    size_t map_size; /* initial LMDB map size in bytes; 0: CKPT_DEFAULT_MAP_SIZE */
    int keep;        /* newest checkpoints kept after a write; 0: CKPT_DEFAULT_KEEP */
} ckpt_options;

/* Named opaque method state (subnetwork mask indices, chosen heads, ...). */
typedef struct ckpt_blob {
    char name[CKPT_BLOB_NAME_MAX + 1]; /* non-empty, NUL-terminated */
    const void *data;                  /* size bytes; may be NULL when size is 0 */
    size_t size;
} ckpt_blob;

/* One checkpoint. For ckpt_write the caller owns every pointer; ckpt_read
 * fills a ckpt_data whose arrays belong to it, released by ckpt_data_free. */
typedef struct ckpt_data {
    uint64_t step;          /* optimizer steps completed */
    char experiment_fp[65]; /* config_fingerprint: 64 lower-case hex digits */
    char base_fp[65];       /* model_files_fingerprint, or "" when not recorded */
    uint64_t data_pos;      /* the caller's data cursor, e.g. next sequence index */
    uint64_t opt_t;         /* optim.t */
    size_t n_params;        /* floats in each of params, m, v */
    const float *params, *m, *v;
    const peft_tensor *tensors; /* every tensor lies inside [0, n_params) */
    int n_tensors;
    const ckpt_blob *blobs; /* distinct names */
    int n_blobs;
    int64_t time; /* unix seconds of the write; set by ckpt_write, ignored on input */
} ckpt_data;

/* The header of one checkpoint, without its arrays (ckpt_list). */
typedef struct ckpt_info {
    uint64_t step, data_pos, opt_t;
    char experiment_fp[65], base_fp[65];
    size_t n_params;
    int n_tensors, n_blobs;
    int64_t time;
} ckpt_info;

/* Opens the checkpoint environment DIR; opt may be NULL for the defaults.
 * With create, DIR (and its parents) is created when missing, an empty
 * directory becomes a new environment, and the handle may write; a new
 * environment holds no checkpoint. Without create the environment is opened
 * read-only and must hold at least one checkpoint. Fails, naming DIR, when:
 * DIR is not a directory or cannot be created; without create, DIR is
 * missing, holds no data.mdb, or holds no checkpoint; data.mdb fails
 * ckpt_check_file (empty, truncated); with create, DIR holds
 * files but no data.mdb (a directory of something else: refused rather than
 * written into); data.mdb is not an LMDB file, or an LMDB environment without
 * the peftps format key, or of another format version; LMDB fails (its
 * message is given); memory runs out. */
int ckpt_open(ckpt **out, const char *dir, int create, const ckpt_options *opt, err *e);

/* Checks an LMDB data file (DIR/data.mdb) before it is mapped: both meta
 * pages are LMDB's, and the file holds every page the newer one says is in
 * use. ckpt_open calls it on an existing data.mdb; a mapped file shorter
 * than that would be a SIGBUS inside LMDB. Fails, naming path, when the file
 * cannot be read, is empty (0 bytes: an interrupted first write; never taken
 * as "no checkpoint"), has no LMDB meta page at its start, is shorter than
 * its two meta pages or than the pages in use ("truncated", with the sizes),
 * or its second meta page is damaged. */
int ckpt_check_file(const char *path, err *e);

/* Closes the environment; c may be NULL. */
void ckpt_close(ckpt *c);

/* The directory c was opened on, for messages. */
const char *ckpt_dir(const ckpt *c);

/* Current LMDB map size in bytes (grows as writes need it). */
size_t ckpt_map_size(const ckpt *c);

/* Writes checkpoint d->step in one transaction and deletes all but the
 * newest `keep` checkpoints in the same transaction; a checkpoint of the
 * same step is replaced. On failure nothing changed on disk. Fails when c
 * was opened without create; d is inconsistent (experiment_fp not 64 hex
 * digits, base_fp neither empty nor 64 hex digits, a NULL array with
 * n_params > 0, a tensor with ndim outside 0..PEFT_MAX_DIMS, a negative
 * dimension, numel not the product of its shape, lying outside n_params or
 * with an unterminated name, a blob with an empty or too long name, NULL
 * data with size > 0 or a repeated name); the environment holds a checkpoint
 * of a higher step (writing an older step would mix two histories; remove
 * the directory or use another one); the latest checkpoint held has another
 * experiment fingerprint, or another non-empty base fingerprint (one environment
 * holds one experiment); the map cannot grow further; LMDB or
 * the disk fails (the message names DIR and the LMDB error). */
int ckpt_write(ckpt *c, const ckpt_data *d, err *e);

/* The steps held, ascending, in *steps (malloc'ed, free() it; NULL when *n
 * is 0). Fails only on an LMDB error or out of memory. */
int ckpt_steps(ckpt *c, uint64_t **steps, int *n, err *e);

/* The headers of every checkpoint, ascending by step, in *out (malloc'ed,
 * free() it; NULL when *n is 0). Fails like ckpt_read on a damaged header. */
int ckpt_list(ckpt *c, ckpt_info **out, int *n, err *e);

/* Reads checkpoint `step` (CKPT_LATEST: the highest) into *out, checking the
 * CRC of every value and the consistency of header, table and arrays.
 * Release with ckpt_data_free; on failure *out is left empty (safe to free).
 * Fails, naming DIR, when the environment holds no checkpoint or not that
 * step (the message lists the steps held); a value is missing; a value fails
 * its CRC ("value step/.../params of checkpoint DIR fails its CRC-32C
 * check"); a value has the wrong size or the table is malformed; memory runs
 * out; LMDB fails. */
int ckpt_read(ckpt *c, uint64_t step, ckpt_data *out, err *e);

/* Releases what ckpt_read allocated and zeroes d; d may be NULL or zeroed. */
void ckpt_data_free(ckpt_data *d);

/* Checks that checkpoint d (read from directory `dir`, named in messages)
 * belongs to the experiment about to resume: its experiment fingerprint
 * equals expected_experiment_fp, its base fingerprint equals expected_base_fp
 * (skipped when expected_base_fp is NULL or the checkpoint recorded none),
 * and its tensor table and n_params equal tensors[0..n) and n_params (same
 * order, names, shapes, offsets, numel). Fails with a message saying what
 * differs and what to do: another experiment's checkpoint ("use a new
 * checkpoint.path or remove it"), another base model, or another tensor
 * layout (naming the first tensor that differs). */
int ckpt_check(const ckpt_data *d, const char *dir, const char *expected_experiment_fp,
               const char *expected_base_fp, const peft_tensor *tensors, int n, size_t n_params,
               err *e);

#endif
