/* The parameter server's private state, shared by server.c (registration,
 * assignment, aggregation, the loop) and peers.c (the link between several
 * servers that holds their global gradient norm to the bits of one server). */
#ifndef PEFTPS_SERVER_INTERNAL_H
#define PEFTPS_SERVER_INTERNAL_H

#include <stdint.h>
#include <stdio.h>

#include "train/ckpt.h"
#include "base/log.h"
#include "net/curve.h"
#include "net/httpd.h"
#include "base/progress.h"
#include "server.h"
#include "train/metrics.h"
#include "train/train.h"
#include "net/wire.h"

/* A worker (or a peer) that holds no parameters yet. */
#define NO_VERSION UINT64_MAX
/* The F64 tensor in which servers exchange per-tensor sums of squares. */
#define PEER_SUMSQ_TENSOR "peftps.grad_sumsq"
/* Hello.worker_id of server k's link to server 0: "server:k". */
#define PEER_ID_PREFIX "server:"
/* Identities dropped for bad pushes that are remembered (the newest). */
#define SERVER_MAX_BANNED 64

typedef enum { SHARD_PENDING, SHARD_ASSIGNED, SHARD_RECEIVED } shard_state;

typedef struct shard_slot {
    shard_state state;
    int worker;      /* index into workers while ASSIGNED (server 0) */
    float *buf;      /* gradient waiting for its turn in the shard-order sum */
    double loss_sum; /* once RECEIVED */
    uint64_t n_tokens;
    double norm; /* ASYNC: the norm of its own update */
    /* A push refused as absurdly large: its bits and its worker, so that
     * another worker computing the same bits confirms it. */
    uint32_t suspect_crc;
    char suspect_by[96];
} shard_slot;

typedef struct worker_rec {
    int used;
    unsigned char id[WIRE_IDENTITY_MAX];
    size_t id_len;
    char name[96];    /* Hello's worker_id, for logs */
    double last_seen; /* any message from it */
    double last_sent; /* our last message to it */
    uint64_t version; /* of the parameters it holds */
    int waiting;      /* server 0: wants work; others: wants a newer version */
    int offences;     /* pushes refused for non-finite or absurd values */
    long accepted;    /* pushes taken since it registered */
    /* Until then its silence is a transfer to it under way (our tensors
     * queue ahead of our heartbeats); see transfer_s. */
    double busy_until;
} worker_rec;

/* At server 0: the link of server k (1..n_servers-1). */
typedef struct peer_rec {
    int used;
    unsigned char id[WIRE_IDENTITY_MAX];
    size_t id_len;
    double last_seen, last_sent;
    int checked;    /* its step was compared with ours */
    int have_sums;  /* its sums of the current step are in `sums` */
    int have_final; /* its final tensors are in the method's params */
} peer_rec;

/* Checkpoint steps a server told of in its heartbeats (the newest ones). */
#define PEER_MAX_STEPS 16
typedef struct peer_steps {
    int known;
    int n;
    uint64_t step[PEER_MAX_STEPS];
} peer_steps;

struct server {
    const Peftps__Experiment *exp;
    server_opts opts;
    int n_servers;
    trainer *t; /* the method's tensors and the base; nothing to compute with */
    char exp_fp[65];
    const char *base_fp;

    /* Every tensor's server, and this server's tensors packed in global
     * order at local offsets. */
    int n_global;
    int *owner;           /* n_global */
    wire_expect *kexpect; /* n_global: server 0's tensors, then server 1's, ... */
    int *kfirst, *kcount; /* per server: where its tensors start in kexpect, how many */
    peft_tensor *tensors;
    int *gidx; /* local -> global index */
    int n_tensors;
    size_t n;
    float *params, *grad_sum, *inbuf;
    optim opt;
    int have_opt;
    wire_expect *expect;
    wire_tensor *out; /* params as frames of a Snapshot */
    wire_limits lim;

    /* `step` is the oldest step not yet applied; `version` counts the
     * optimizer's updates (one per step, or with ASYNC one per shard). */
    uint64_t step, total, version;
    Peftps__SyncMode sync;
    uint32_t staleness;
    uint32_t n_shards;
    /* Shards of the steps step .. step+window-1 (1 with BSP, staleness+1
     * with SSP): slot (u, i) at ((u % window) * n_shards + i). */
    uint32_t window;
    shard_slot *shards;
    uint32_t next_fold; /* shards 0..next_fold-1 of `step` are in grad_sum */
    float **pool;       /* free gradient buffers (at most window*n_shards ever made) */
    int n_pool;

    /* This step's norm: per-tensor sums of squares of the mean gradient, in
     * global order, filled by each tensor's server. */
    double *sums;
    int own_ready; /* this server's shards are summed and its sums computed */
    long step_tokens;

    worker_rec *workers;
    int cap_workers;
    /* Identities dropped for repeated bad pushes, refused when they say
     * Hello again (a ring). */
    unsigned char banned[SERVER_MAX_BANNED][WIRE_IDENTITY_MAX];
    size_t banned_len[SERVER_MAX_BANNED];
    int n_banned;
    /* Per-token gradient norms of accepted pushes: the largest of the last
     * applied step and of the current one, the scale a push is held to. */
    double push_norm_prev, push_norm_cur;

    void *ctx, *sock;
    curve_keys keys;
    int curve;
    void *zap;

    /* Server 0: the other servers' links. Server k: its link to server 0. */
    peer_rec *peers;
    /* Per server: its checkpoint steps as last heard (this server's own
     * at opts.index), and since when it has been gone (0: linked). */
    peer_steps *ck_steps;
    double *gone_since;
    double server_timeout_s;
    void *link;
    int link_registered;
    double link_heard, link_sent, link_hello;
    int final_sent;

    ckpt *ck;
    metrics metrics; /* server 0's metrics.jsonl */
    httpd *http;     /* /healthz, /livez and /metrics (cluster.metrics_port) */
    httpd_server_metrics hm;
    progress pr;
    uint64_t bytes_in, bytes_out; /* this step's messages */
    double step_start;
    double hb_s, timeout_s;
    double last_trim; /* malloc_trim, see tick */
    /* Seconds a byte of tensors may take (cluster.min_transfer_mbit_s), and
     * the silence a worker is allowed: timeout_s plus its push. */
    double s_per_byte, worker_silence_s;
    int finished; /* 1: done, -1: failed with `fail` */
    err fail;

    /* On a pool (opts.pool, poollink.c): the coordinator's DEALER, this
     * experiment as announced, and what the last step gave. */
    void *pool_sock;
    char *pool_text;
    char pool_id[128];
    int pool_accepted, pool_ever_accepted, pool_refused, pool_cancelled, pool_final_sent;
    double pool_sent;
    double last_loss, last_tokens_per_s;
};

/* A log line of server s: first ends the progress line on a terminal, so
 * that the two do not run into each other. */
#define server_log(s, level, ...)                                                                  \
    do {                                                                                           \
        progress_end(&(s)->pr);                                                                    \
        log_msg(level, __VA_ARGS__);                                                               \
    } while (0)

/* Sends env (and tensor frames) to the peer of identity id at the ROUTER;
 * counts the bytes for this step's metrics; a failure is logged. */
void server_send(server *s, const unsigned char *id, size_t id_len,
                 const Peftps__Wire__Envelope *env, const wire_tensor *t, int n);

/* Answers the sender of m with an Error and logs it under `who`. */
void server_reply_error(server *s, const wire_msg *m, const char *who, Peftps__Wire__ErrorCode code,
                        const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* With `sums` complete for the step: the global norm from them in global
 * order, clip, AdamW, next version; metrics, checkpoint, end of the run.
 * Fails when a checkpoint or output cannot be written or the loss is not
 * finite. */
int server_step_apply(server *s, err *e);

/* Writes the outputs and stops everyone when the last step is done: server
 * 0 once every peer's final tensors arrived; a peer sends its own to server
 * 0 and waits for its Shutdown. */
int server_finish_run(server *s, err *e);

/* Tells every registered worker to stop. */
void server_shutdown_workers(server *s, const char *reason);

/* Server 0, when its last shard is summed and its sums are in: applies the
 * step when every other server's sums are in too (sending them all back). */
int peers_try_complete(server *s, err *e);

/* Server 0: a Hello whose worker_id is "server:k"; registers the link. */
void peers_on_hello(server *s, const wire_msg *m, int k);

/* Server 0: the peer record of an identity, or NULL. */
peer_rec *peers_find(server *s, const unsigned char *id, size_t n);

/* Server 0: a message on a registered peer link. */
void peers_on_message(server *s, const wire_msg *m, peer_rec *p);

/* Server 0: whether every peer's final tensors arrived (then it may write
 * the outputs and shut everything down). */
int peers_all_final(const server *s);

/* Server k: opens the DEALER to server 0 and says Hello. */
int peers_link_open(server *s, err *e);

/* Server k: sends this step's sums to server 0 (after the last shard). */
void peers_send_sums(server *s);

/* Server k: sends the final tensors to server 0 (after the last step). */
void peers_send_final(server *s);

/* Server k: handles what arrived on the link; timers and heartbeats. Fails
 * when server 0 refuses this server for good. */
int peers_link_poll(server *s, err *e);

/* Server 0: heartbeats to and timeouts of peer links; stops the run (with
 * s->fail) when one has been gone for cluster.server_timeout_ms. */
void peers_tick(server *s);

/* Rereads this server's own checkpoint steps (after opening, after each
 * write), which its heartbeats to the other servers carry. */
void peers_own_steps(server *s);

/* Writes into buf the advice of a server that cannot go on with its peers:
 * "restart every server with --resume-step N" and which steps each holds,
 * N the newest step of which every server holds a checkpoint as far as this
 * server knows (from their heartbeats, or from their directories beside its
 * own when it can read them), or why there is none. */
void peers_resume_advice(server *s, char *buf, size_t n);

/* poollink.c: with opts.pool, connects to the coordinator and announces
 * this server (after server_bind); reads its answers and reports progress
 * (from tick); the run's end (outcome 0 done, 1 stopped, -1 failed, with
 * msg); whether the coordinator refused the experiment; the socket's end. */
int server_pool_open(server *s, err *e);
void server_pool_tick(server *s);
void server_pool_close(server *s);

#endif
