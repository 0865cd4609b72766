/* The stateless worker: maps the frozen base read-only, registers with each
 * parameter server (server/), and loops pulling parameters, computing the
 * gradient of the shards it is assigned (common/train/train.h's
 * trainer_shard_grad) and pushing them back over common/net/wire.h. It keeps
 * nothing worth saving: killed at any moment, the servers give its shards
 * to others. worker/main.c is the program around it. */
#ifndef PEFTPS_WORKER_H
#define PEFTPS_WORKER_H

#include "base/err.h"
#include "peftps.pb-c.h"

typedef struct worker worker;

/* Opens the base and the data and creates the method exactly as
 * trainer_open does (calibrated the same way), and reads the CURVE keys
 * when cluster.curve names them. Fails on bad input: files that cannot be
 * opened, key files that cannot be read. exp must outlive the worker. */
int worker_open(worker **out, const Peftps__Experiment *exp, err *e);

/* Connects to every server of cluster.servers and works until a server
 * sends Shutdown (returns 0) or worker_stop is called (returns 1). A server
 * that goes silent for cluster.worker_timeout_ms is reconnected to with
 * exponential backoff, forever. Returns -1 with e set when a server refuses
 * this worker for good (another experiment, another base, another protocol)
 * or its tensor table does not match this worker's method. */
int worker_run(worker *w, err *e);

/* Asks worker_run (or worker_linger) to return; async-signal-safe. */
void worker_stop(void);

/* After worker_run returned 0: idles, keeping /livez and /metrics up,
 * until worker_stop. For supervisors that restart a program that exits
 * (a Kubernetes Deployment), which would otherwise start it again to be
 * told once more that the run is over. */
void worker_linger(worker *w);

void worker_close(worker *w);

/* A pool worker (`peftps-worker --pool`): maps the base at model_dir once,
 * registers with the pool's coordinator and serves every experiment it
 * lists, each with its own servers, tensors and fingerprint, computing
 * their ready shards fairly by cluster.share and, with cobatch, together
 * (trainer_shard_grad_many). An experiment joins when the coordinator
 * lists it and leaves when it no longer does; a server refusing this
 * worker, or a failure computing an experiment's shard, ends only that
 * experiment here. The coordinator going silent costs nothing but its
 * reconnection: the experiments go on with their servers. */
typedef struct worker_pool_opts {
    const char *pool;      /* the coordinator's endpoint */
    const char *model_dir; /* this worker's copy of the pool's base */
    int cobatch;
    unsigned metrics_port; /* 0: none */
} worker_pool_opts;

/* Runs until worker_stop (returns 1); -1 with e set when the base cannot
 * be opened or the coordinator refuses this worker (another base, another
 * protocol). */
int worker_pool_run(const worker_pool_opts *o, err *e);

#endif
