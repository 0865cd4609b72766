/* The bookkeeping of a pool's coordinator (cli/pool.c keeps one table): its
 * base, its jobs (experiments) and its workers; admission of a new
 * experiment against the base and the live jobs, job states and the
 * revision workers follow, compute accounting and the Job messages of
 * proto/pool.proto (net/poolmsg.h frames them). No sockets, no processes:
 * every table is bounded, every input from the network checked here. */
#ifndef PEFTPS_POOLJOBS_H
#define PEFTPS_POOLJOBS_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"
#include "net/poolmsg.h"
#include "peftps.pb-c.h"

/* Jobs kept, ended ones included: when full, the oldest ended one goes. */
#define POOLJOBS_MAX 256
/* Servers of one job (cluster.servers entries). */
#define POOLJOBS_MAX_SERVERS 64
/* Registered workers. */
#define POOLJOBS_MAX_WORKERS 1024
/* A worker silent for this long is dropped (it says WorkerHello again). */
#define POOLJOBS_WORKER_SILENCE_S 10.0
/* A job's resolved experiment text is at most this long, so that the list
 * of every running job fits in one message (POOLJOBS_MAX of them below
 * POOLMSG_MAX_BYTES); a resolved experiment is a few KB. */
#define POOLJOBS_MAX_TEXT 60000
/* A job id (the experiment's name) and a worker id are at most this long. */
#define POOLJOBS_ID_MAX 200

typedef struct pooljob {
    char *id;         /* the experiment's name */
    char *experiment; /* the resolved experiment, text format */
    char *output_dir, *checkpoint;
    char fingerprint[65];
    double share;
    int state; /* Peftps__Pool__JobState */
    uint64_t step, total_steps;
    double loss, tokens_per_s;
    double compute_s; /* worker seconds spent on it */
    uint64_t shards;
    char message[512];
    double submitted_s, ended_s;
    int n_servers;
    unsigned char announced[POOLJOBS_MAX_SERVERS];
    int external;    /* its servers were started elsewhere (ServerAnnounce without id) */
    int restarts;    /* of its servers, by the coordinator */
    uint64_t serial; /* unique in the table's life: a later job of the same name differs */
} pooljob;

typedef struct poolworker {
    unsigned char ident[POOLMSG_ID_MAX]; /* its ROUTER identity */
    size_t ident_len;
    char id[POOLJOBS_ID_MAX + 1];
    int bf16;
    double last_seen;
} poolworker;

typedef struct pooljobs {
    char *base_path;
    char base_fingerprint[65];
    pooljob *jobs[POOLJOBS_MAX];
    int n_jobs;
    poolworker *workers; /* POOLJOBS_MAX_WORKERS entries */
    int n_workers;
    /* Workers dropped for silence, newest last: one that speaks again (it
     * was busy, not gone) is taken back without a new hello. */
    poolworker *gone; /* POOLJOBS_MAX_WORKERS entries */
    int n_gone;
    /* Bumped whenever the set of RUNNING jobs changes. */
    uint64_t revision;
    uint64_t next_serial;
} pooljobs;

/* An empty table for the base at base_path with that fingerprint. */
int pooljobs_init(pooljobs *t, const char *base_path, const char *base_fingerprint, err *e);
void pooljobs_free(pooljobs *t);

/* STARTING or RUNNING. */
int pooljobs_live(const pooljob *j);

pooljob *pooljobs_find(const pooljobs *t, const char *id);

/* Whether a new job of experiment ex (resolved, checked) with fingerprint
 * fp may join: its name can be a job id; its base has the pool's
 * fingerprint (base_fp when not NULL, as a server announced it, else that
 * of opening model.path's config.json and safetensors headers here); and
 * no live job has its name, its fingerprint, its output_dir or its
 * checkpoint.path. Fails with a message a user can act on, naming `source`
 * (the file it came from). */
int pooljobs_admit(const pooljobs *t, const Peftps__Experiment *ex, const char *fp,
                   const char *base_fp, const char *source, err *e);

/* Adds a STARTING job for ex (text: its resolved text) with weight share,
 * at time now (seconds since the pool started). When the table is full the
 * oldest ended job is dropped; fails when every job is live, or when text
 * is longer than POOLJOBS_MAX_TEXT. */
pooljob *pooljobs_add(pooljobs *t, const Peftps__Experiment *ex, const char *text, const char *fp,
                      double share, int external, double now, err *e);

/* Moves j to state (a Peftps__Pool__JobState) with message (may be NULL:
 * kept), bumping the revision when it enters or leaves RUNNING and setting
 * ended_s when it ends. Returns 1 when the state changed, else 0. An ended
 * job stays ended. */
int pooljobs_set_state(pooljobs *t, pooljob *j, int state, const char *message, double now);

/* Server `index` of j announced itself: when every server has, a STARTING
 * job becomes RUNNING (returns 1). Fails on an index outside the job's
 * servers. */
int pooljobs_announce(pooljobs *t, pooljob *j, uint32_t index, double now, err *e);

/* Server `index` of j stopped without the job ending (a server started
 * outside the pool, stopped by its supervisor): the job waits for it to
 * announce itself again, out of the workers' list meanwhile. Returns 1
 * when j left RUNNING. */
int pooljobs_server_left(pooljobs *t, pooljob *j, uint32_t index, double now);

/* Adds a worker's report of compute_s seconds and shards on job id; an
 * unknown id or a value that is not a finite amount below an hour is
 * refused (returns -1 with e set), the others still counted by the caller. */
int pooljobs_usage(pooljobs *t, const char *id, double compute_s, uint64_t shards, err *e);

/* j's fraction of the compute of all jobs (0 with no compute yet). */
double pooljobs_share_got(const pooljobs *t, const pooljob *j);

/* j's weight as a fraction of the weights of the RUNNING jobs (0 when it
 * is not running). */
double pooljobs_share_of_running(const pooljobs *t, const pooljob *j);

/* A Job message of j; its strings point into j (valid while j is). With
 * `with_experiment` the experiment text is included (workers need it, the
 * commands do not). */
void pooljobs_job_msg(const pooljobs *t, const pooljob *j, int with_experiment,
                      Peftps__Pool__Job *out);

/* Registers (or refreshes) the worker at a ROUTER identity after a
 * WorkerHello: checks the protocol version and base fingerprint. Fails
 * when they do not match, the id is too long or the table is full. */
int pooljobs_worker_hello(pooljobs *t, const unsigned char *ident, size_t ident_len,
                          const Peftps__Pool__WorkerHello *h, double now, err *e);

/* The registered worker at that identity, or NULL. */
poolworker *pooljobs_worker_find(pooljobs *t, const unsigned char *ident, size_t ident_len);

/* Drops workers silent for more than POOLJOBS_WORKER_SILENCE_S; returns
 * how many, the id of the last one dropped in last_id (n bytes). */
int pooljobs_worker_expire(pooljobs *t, double now, char *last_id, size_t n);

/* The worker at that identity when it was dropped for silence and speaks
 * again: registered again (it passed its hello's checks), or NULL. */
poolworker *pooljobs_worker_revive(pooljobs *t, const unsigned char *ident, size_t ident_len,
                                   double now);

/* Whether a registered worker runs BF16 compute. */
int pooljobs_any_bf16(const pooljobs *t);

/* Jobs in a state (-1: live ones). */
int pooljobs_count(const pooljobs *t, int state);

#endif
