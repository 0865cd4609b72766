/* The worker's private pieces, shared by worker.c (one experiment's
 * connections to its servers, the loop, the computing) and pool.c (a pool
 * worker's link to the coordinator and its table of experiments). A
 * `worker` is one experiment as seen by this process; a `worker_host` is
 * the process: the ZeroMQ context, the heartbeat thread, the metrics and
 * the experiments it serves (one, or a pool's). */
#ifndef PEFTPS_WORKER_INTERNAL_H
#define PEFTPS_WORKER_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "model/model.h"
#include "net/httpd.h"
#include "worker.h"

typedef struct pool_link pool_link; /* pool.c */

typedef struct worker_host {
    void *ctx;
    /* Held by the main thread except while it computes; the heartbeat
     * thread takes it to send on the experiments' sockets meanwhile. */
    pthread_mutex_t mu;
    pthread_t hb_thread;
    int hb_started;
    atomic_int busy, quit;
    double hb_s; /* the heartbeat thread's period: the shortest of the experiments' */
    httpd *http; /* /healthz, /livez and /metrics, of the whole process */
    httpd_worker_metrics hm;
    worker **jobs;
    int n_jobs, cap_jobs;
    pool_link *pool; /* NULL: one experiment, whose end is the process's */
    int cobatch;     /* compute the ready experiments' shards together */
    /* What co-batching shared (model/cobatch.h's counters), and when it
     * was last logged. */
    uint64_t co_rounds, co_products, co_calls, co_rows, co_alone;
    double co_logged;
} worker_host;

/* A host with no experiment yet (its metrics registered), and its end. */
int worker_host_create(worker_host **out, err *e);
void worker_host_free(worker_host *h);

/* A pool experiment's worker: exp (owned by the caller until
 * worker_close), its fingerprint as the servers know it (computed before
 * model.path was pointed at this worker's copy of the base), files the
 * pool's open base. Joins h's table. */
int worker_open_job(worker **out, worker_host *h, const char *job_id, const Peftps__Experiment *exp,
                    const char *exp_fp, model_files *files, double share, err *e);

/* The job's id ("" outside a pool), whether it ended (1: its server said
 * the run is over; -1: refused or failed, the reason logged), and the
 * compute seconds and shards spent on it since the last call (then reset). */
const char *worker_job_id(const worker *w);
int worker_ended(const worker *w);
void worker_take_usage(worker *w, double *seconds, uint64_t *shards);

/* Removes w from its host's table and frees it (a pool's ended or
 * cancelled job). */
void worker_close_job(worker *w);

/* The loop of a host: its experiments' connections, their shards, and the
 * pool link when there is one; until worker_stop (1), the one experiment's
 * end (0), or a fatal error (-1). */
int worker_host_run(worker_host *h, err *e);

/* pool.c, called by the loop: the coordinator's socket to poll (NULL while
 * unconnected), its messages, its timers (status, reconnection, the
 * opening and closing of jobs) and, from the heartbeat thread while the
 * main thread computes, its status message. -1: refused for good. */
void *pool_socket(pool_link *p);
int pool_on_readable(worker_host *h, err *e);
int pool_tick(worker_host *h, err *e);
void pool_heartbeat(worker_host *h);

#endif
