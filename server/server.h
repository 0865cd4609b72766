/* The parameter server of one experiment: holds the trainable tensors of its
 * share of the method (all of them with one server) and their AdamW state,
 * registers workers, hands out the shards of each step, sums the pushed
 * gradients in shard order, updates, checkpoints and writes the outputs.
 * server/main.c is the program around it; the messages are those of
 * common/net/wire.h, the arithmetic that of common/train/train.h, the checkpoints
 * those of common/train/ckpt.h. */
#ifndef PEFTPS_SERVER_H
#define PEFTPS_SERVER_H

#include <stdint.h>

#include "base/err.h"
#include "peftps.pb-c.h"

typedef struct server server;

/* server_opts.resume_step: the newest checkpoint. */
#define SERVER_RESUME_LATEST UINT64_MAX

typedef struct server_opts {
    int index;            /* which of cluster.servers this process is */
    const char *listen;   /* bind here instead of cluster.servers[index]; NULL: that */
    uint64_t resume_step; /* the checkpoint to resume from, or SERVER_RESUME_LATEST */
    int linger;           /* after the last step, keep answering until server_stop */
    const char *pool;     /* a pool's coordinator to announce to, or NULL */
    const char *pool_job; /* the job id the coordinator gave (it started this server) */
} server_opts;

/* Prepares the server of exp (resolved by experiment_load): opens the base
 * read-only and initialises the method exactly as trainer_open does, keeps
 * only its share of the tensors (all with one server; several servers split
 * them by a deterministic size-balanced partition), sets up AdamW and, with
 * checkpoint.resume and a checkpoint at checkpoint.path (with several
 * servers, checkpoint.path/server-I), restores the newest one or the one of
 * opts->resume_step. Writes
 * OUTPUT/experiment.pbtxt and opens OUTPUT/metrics.jsonl (server 0 only;
 * on resume the lines of steps after the checkpoint are dropped). Fails on
 * bad input: an index outside cluster.servers, a base, method or data that
 * cannot be opened, a checkpoint of another experiment, base or tensor
 * layout, a damaged checkpoint, checkpoints present with resume off, CURVE
 * key files that cannot be read. exp must outlive the server. */
int server_open(server **out, const Peftps__Experiment *exp, const server_opts *opts, err *e);

/* Binds the ROUTER socket (and starts the ZAP handler with CURVE); a server
 * other than 0 also links to server 0. Fails when the endpoint cannot be
 * bound (in use, bad address) or ZeroMQ fails. */
int server_bind(server *s, err *e);

/* Runs the training loop until the last step is done: then checkpoints,
 * writes OUTPUT/tensors.safetensors (server 0, with every server's
 * tensors), sends Shutdown to the workers and returns 0; with opts->linger
 * it first goes on answering (Shutdown to every worker that calls, health
 * and metrics) until server_stop. Returns 1 when server_stop was called
 * during the run (from a signal handler): it checkpointed the last
 * completed step and told the workers to stop.
 * Returns -1 with e set when the run cannot continue (a non-finite loss, a
 * checkpoint or output that cannot be written, ZeroMQ failing, server 0
 * refusing this server because they are at different steps). */
int server_run(server *s, err *e);

/* Asks a running server_run to stop; async-signal-safe. */
void server_stop(void);

/* Asks a running server_run to read cluster.curve.authorized_keys again
 * (curve_zap_reload), so that keys can be added or revoked without a
 * restart; async-signal-safe. Workers already registered stay. */
void server_reload_keys(void);

void server_close(server *s);

/* On a pool: tells the coordinator how the run ended (outcome: server_run's
 * return, msg the failure or NULL), once; nothing without opts.pool. */
void server_pool_final(server *s, int outcome, const char *msg);

/* Whether the pool's coordinator refused this experiment (server_run then
 * failed with its reason): bad input, exit status 2. */
int server_pool_refused(const server *s);

/* Whether the run stopped because the coordinator cancelled the job
 * (server_run returned 1): a stop asked for, exit status 0. */
int server_pool_cancelled(const server *s);

#endif
