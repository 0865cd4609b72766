/* The coordinator of a pool (pool.h): one ROUTER answering every message of
 * proto/pool.proto (framed by net/poolmsg.h), the table of jobs and workers
 * of net/pooljobs.h, and the children it supervises through cli/spawn.h:
 * the local workers, restarted when they die, and each job's servers,
 * restarted from their checkpoint when they fail. One loop, polling the
 * ROUTER every 100 ms, reaping children and dropping silent workers. */
#include "pool.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <zmq.h>

#include "base/fsutil.h"
#include "base/log.h"
#include "base/progress.h"
#include "base/stopsig.h"
#include "config/config.h"
#include "model/model.h"
#include "net/poolmsg.h"
#include "net/pooljobs.h"
#include "spawn.h"
#include "train/experiment.h"

/* A job's server is restarted at most this often before the job fails. */
#define POOL_MAX_RESTARTS 5
/* Messages handled per turn of the loop, so children are reaped under a flood. */
#define POOL_BURST 256
/* How long the servers get to checkpoint and stop after SIGTERM. */
#define POOL_STOP_GRACE_S 60.0
/* A health line at least this often. */
#define POOL_HEALTH_S 60.0

static volatile sig_atomic_t pool_signal;

static void pool_on_signal(int sig) {
    pool_signal = sig;
}

const char *pool_endpoint(const char *given) {
    if (given) return given;
    const char *env = getenv("PEFTPS_POOL");
    return env && *env ? env : POOL_DEFAULT_ENDPOINT;
}

/* One server process of a job, started by the coordinator. */
typedef struct pool_server {
    pid_t pid;
    char *job;
    int index;
    uint64_t serial;       /* its job's (pooljob.serial) */
    uint32_t metrics_port; /* 0: none */
    long log_from;         /* its log's size when it was last started */
    char listen[32];       /* with --advertise: its port on every interface, else empty */
} pool_server;

/* One local worker. */
typedef struct pool_worker {
    pid_t pid;
    double started, restart_at;
    int quick_failures; /* deaths in a row within seconds of starting */
} pool_worker;

typedef struct pool {
    const pool_options *o;
    pooljobs t;
    char endpoint[512]; /* what the children connect to */
    const char *host;   /* where the jobs' servers are reached (--advertise) */
    int remote;         /* host is not loopback: servers listen on every interface */
    char server_bin[4200], worker_bin[4200];
    void *ctx, *router;
    pool_worker *workers;
    pool_server *servers;
    int n_servers, cap_servers;
    double t0, last_health;
    int stopping;
    int health[3]; /* workers, running, starting at the last health line */
} pool;

static double pool_now(const pool *p) {
    return progress_now() - p->t0;
}

/* ---- job states ------------------------------------------------------------- */

static void pool_set_state(pool *p, pooljob *j, int state, const char *message) {
    int before = j->state;
    if (!pooljobs_set_state(&p->t, j, state, message, pool_now(p))) return;
    const char *m = j->message[0] ? j->message : "";
    if (state == PEFTPS__POOL__JOB_STATE__FAILED)
        log_error("job %s: %s -> %s: %s", j->id, poolmsg_state_name(before),
                  poolmsg_state_name(state), m);
    else
        log_info("job %s: %s -> %s%s%s", j->id, poolmsg_state_name(before),
                 poolmsg_state_name(state), *m ? ": " : "", m);
}

/* What a failed server said, from what it wrote to its log since `from`
 * (the log's size when it was started): the last line logged at level
 * error; else, when it printed its usage, the line before (the complaint
 * about its command line); else its last line. */
static void server_reason(const char *path, long from, char *out, size_t n) {
    snprintf(out, n, "(its log %.300s says nothing)", path);
    FILE *f = fopen(path, "r");
    if (!f) return;
    enum { CAP = 65536 };
    char *buf = malloc(CAP);
    long size = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    if (!buf || size < 0) {
        free(buf);
        fclose(f);
        return;
    }
    if (size - from > CAP - 1) from = size - CAP + 1;
    fseek(f, from > 0 ? from : 0, SEEK_SET);
    size_t k = fread(buf, 1, CAP - 1, f);
    fclose(f);
    buf[k] = '\0';
    const char *pick = NULL, *before_usage = NULL, *last = NULL, *prev = NULL;
    for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
        if (!*line) continue;
        if (strstr(line, " error: ") || strstr(line, " error ")) pick = line;
        if (!before_usage && prev && !strncmp(line, "usage: ", 7)) before_usage = prev;
        prev = last = line;
    }
    const char *r = pick ? pick : before_usage ? before_usage : last;
    if (r) snprintf(out, n, "%.390s", r);
    free(buf);
}

/* ---- children ------------------------------------------------------------------- */

static void server_log_path(const pool *p, const char *job, int index, char *buf, size_t n) {
    snprintf(buf, n, "%s/jobs/%s/server-%d.log", p->o->work, job, index);
}

static int server_spawn(pool *p, pool_server *s, err *e) {
    char exp[4300], log[4300], idx[16], mset[64];
    snprintf(exp, sizeof exp, "%s/jobs/%s/experiment.pbtxt", p->o->work, s->job);
    server_log_path(p, s->job, s->index, log, sizeof log);
    snprintf(idx, sizeof idx, "%d", s->index);
    FILE *lf = fopen(log, "r");
    s->log_from = lf && fseek(lf, 0, SEEK_END) == 0 ? ftell(lf) : 0;
    if (lf) fclose(lf);
    char *argv[14] = {p->server_bin, exp,         "--index",    idx,
                      "--pool",      p->endpoint, "--pool-job", s->job};
    int na = 8;
    if (s->listen[0]) {
        argv[na++] = "--listen";
        argv[na++] = s->listen;
    }
    if (s->metrics_port) {
        snprintf(mset, sizeof mset, "cluster.metrics_port=%u", s->metrics_port);
        argv[na++] = "--set";
        argv[na++] = mset;
    }
    argv[na] = NULL;
    pid_t pid = spawn_start_log("peftps pool", argv, 0, log, e);
    if (pid < 0) return -1;
    s->pid = pid;
    return 0;
}

static void servers_signal(pool *p, const char *job, int sig) {
    for (int i = 0; i < p->n_servers; i++)
        if (p->servers[i].pid > 0 && (!job || !strcmp(p->servers[i].job, job)))
            kill(p->servers[i].pid, sig);
}

static void server_remove(pool *p, int i) {
    free(p->servers[i].job);
    p->servers[i] = p->servers[--p->n_servers];
}

/* Starts server `index` of job j, reached at endpoint. */
static int server_start(pool *p, const pooljob *j, int index, const char *endpoint,
                        uint32_t metrics_port, err *e) {
    if (p->n_servers == p->cap_servers) {
        int cap = p->cap_servers ? 2 * p->cap_servers : 16;
        pool_server *ns = realloc(p->servers, (size_t)cap * sizeof *ns);
        if (!ns) return err_set(e, "out of memory");
        p->servers = ns;
        p->cap_servers = cap;
    }
    pool_server *s = &p->servers[p->n_servers];
    *s = (pool_server){0, strdup(j->id), index, j->serial, metrics_port, 0, ""};
    if (!s->job) return err_set(e, "out of memory");
    const char *port = strrchr(endpoint, ':');
    if (p->remote && port) snprintf(s->listen, sizeof s->listen, "tcp://*%s", port);
    if (server_spawn(p, s, e) < 0) {
        free(s->job);
        return -1;
    }
    p->n_servers++;
    return 0;
}

/* A job's server ended: its job is done, failed (bad input, or too many
 * restarts) or goes on after a restart from its checkpoint. */
static void server_exited(pool *p, int i, int ws) {
    pool_server *s = &p->servers[i];
    pooljob *j = pooljobs_find(&p->t, s->job);
    int code = spawn_code(ws);
    char how[96], log[4300], line[400], msg[600];
    spawn_describe(ws, how, sizeof how);
    server_log_path(p, s->job, s->index, log, sizeof log);
    s->pid = 0;
    if (j && j->serial != s->serial) j = NULL; /* a server of an earlier job of that name */
    if (!j || !pooljobs_live(j) || p->stopping) {
        log_info("job %s: server %d %s", s->job, s->index, how);
        server_remove(p, i);
        return;
    }
    if (code == 0) {
        /* Done once all its servers are: server 0 may still be writing the
         * outputs when another has left. */
        uint64_t serial = s->serial;
        server_remove(p, i);
        for (int k = 0; k < p->n_servers; k++)
            if (p->servers[k].serial == serial) return;
        pool_set_state(p, j, PEFTPS__POOL__JOB_STATE__DONE, NULL);
        return;
    }
    server_reason(log, s->log_from, line, sizeof line);
    if (code != 2 && j->restarts < POOL_MAX_RESTARTS) {
        j->restarts++;
        log_warn("job %s: server %d %s; restarting it from its checkpoint (restart %d of %d)",
                 j->id, s->index, how, j->restarts, POOL_MAX_RESTARTS);
        err e;
        if (server_spawn(p, s, &e) == 0) return;
        snprintf(msg, sizeof msg, "restarting server %d: %.500s", s->index, e.msg);
    } else if (code == 2) {
        snprintf(msg, sizeof msg, "server %d %s: %s", s->index, how, line);
    } else {
        snprintf(msg, sizeof msg, "server %d %s after %d restarts: %s", s->index, how,
                 POOL_MAX_RESTARTS, line);
    }
    char *job = strdup(s->job);
    server_remove(p, i);
    pool_set_state(p, j, PEFTPS__POOL__JOB_STATE__FAILED, msg);
    if (job) servers_signal(p, job, SIGTERM);
    free(job);
}

static int worker_start(pool *p, int i, err *e) {
    char log[4300];
    snprintf(log, sizeof log, "%s/worker-%d.log", p->o->work, i);
    char *argv[] = {p->worker_bin,
                    "--pool",
                    p->endpoint,
                    "--model",
                    (char *)p->o->model,
                    p->o->cobatch ? NULL : "--no-cobatch",
                    NULL};
    pid_t pid = spawn_start_log("peftps pool", argv, 0, log, e);
    if (pid < 0) return -1;
    p->workers[i].pid = pid;
    p->workers[i].started = pool_now(p);
    p->workers[i].restart_at = 0;
    return 0;
}

/* A local worker died: it is started again, at once when it had run for a
 * while, else after a pause that doubles with each quick death (up to a
 * minute), so a worker that cannot start does not spin. */
static void worker_exited(pool *p, int i, int ws) {
    char how[96];
    pool_worker *w = &p->workers[i];
    w->pid = 0;
    if (p->stopping) return;
    double now = pool_now(p), ran = now - w->started;
    w->quick_failures = ran < 10 ? w->quick_failures + 1 : 0;
    double pause = w->quick_failures ? fmin(60, pow(2, w->quick_failures - 1)) : 0;
    w->restart_at = now + pause;
    log_warn("worker %d %s after %.0f s; starting it again%s (log %s/worker-%d.log)", i,
             spawn_describe(ws, how, sizeof how), ran, pause > 0 ? " after a pause" : "",
             p->o->work, i);
}

static void children_reap(pool *p) {
    for (;;) {
        int ws;
        pid_t pid = waitpid(-1, &ws, WNOHANG);
        if (pid <= 0) return;
        for (int i = 0; i < p->o->workers; i++)
            if (p->workers[i].pid == pid) worker_exited(p, i, ws);
        for (int i = 0; i < p->n_servers; i++)
            if (p->servers[i].pid == pid) {
                server_exited(p, i, ws);
                break;
            }
    }
}

static void workers_restart_due(pool *p) {
    double now = pool_now(p);
    for (int i = 0; i < p->o->workers && !p->stopping; i++) {
        pool_worker *w = &p->workers[i];
        if (w->pid || w->restart_at > now) continue;
        err e;
        if (worker_start(p, i, &e) < 0) {
            log_error("starting worker %d: %s", i, e.msg);
            w->restart_at = now + 10;
        }
    }
}

/* ---- admission -------------------------------------------------------------- */

/* cluster.servers becomes one free port of this machine per server, at
 * host: each port found by binding port 0 (on loopback, or on every
 * interface when remote), all held until every one is found. */
static int local_endpoints(Peftps__Cluster *cl, const char *host, int remote, err *e) {
    int n = (int)cl->n_servers, fds[POOLJOBS_MAX_SERVERS], rc = 0;
    for (int i = 0; i < n; i++) fds[i] = -1;
    for (int i = 0; i < n && rc == 0; i++) {
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_addr.s_addr = htonl(remote ? INADDR_ANY : INADDR_LOOPBACK)};
        socklen_t len = sizeof a;
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&a, sizeof a) < 0 ||
            getsockname(fds[i], (struct sockaddr *)&a, &len) < 0) {
            rc = err_errno(e, "finding a free port for server %d", i);
            break;
        }
        char ep[320];
        snprintf(ep, sizeof ep, "tcp://%s:%u", host, (unsigned)ntohs(a.sin_port));
        char *dup = strdup(ep);
        if (!dup) {
            rc = err_set(e, "out of memory");
            break;
        }
        free(cl->servers[i]);
        cl->servers[i] = dup;
    }
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0) close(fds[i]);
    return rc;
}

/* A checked experiment becomes a job: its servers on local ports, its
 * resolved text in WORK/jobs/ID/experiment.pbtxt, its servers started. */
static pooljob *submit_job(pool *p, Peftps__Experiment *ex, const char *source, int has_share,
                           double share, err *e) {
    char fp[65], dir[4300], path[4400];
    config_fingerprint(ex, fp);
    if (has_share && !(share >= 0.01 && share <= 100.0)) {
        err_set(e, "%s: share %g is outside 0.01..100", source, share);
        return NULL;
    }
    if (pooljobs_admit(&p->t, ex, fp, NULL, source, e) < 0) return NULL;
    for (int i = 0; i < p->n_servers; i++)
        if (!strcmp(p->servers[i].job, ex->name)) {
            err_set(e,
                    "%s: the servers of the earlier job %s are still stopping (checkpointing); "
                    "submit again in a moment",
                    source, ex->name);
            return NULL;
        }
    if (has_share) ex->cluster->share = share;
    if (local_endpoints(ex->cluster, p->host, p->remote, e) < 0) return NULL;
    char *text = NULL;
    snprintf(dir, sizeof dir, "%s/jobs/%s", p->o->work, ex->name);
    snprintf(path, sizeof path, "%s/experiment.pbtxt", dir);
    if (pbtext_print(&ex->base, &text, e) < 0 || fs_mkdir_p(dir, e) < 0 ||
        fs_write_text(path, text, e) < 0) {
        free(text);
        return NULL;
    }
    pooljob *j = pooljobs_add(&p->t, ex, text, fp, ex->cluster->share, 0, pool_now(p), e);
    free(text);
    if (!j) return NULL;
    log_info("job %s: submitted from %s: %d server(s), share %g, output %s", j->id, source,
             j->n_servers, j->share, j->output_dir);
    if (ex->model->compute == PEFTPS__COMPUTE__BF16 && !pooljobs_any_bf16(&p->t)) {
        snprintf(j->message, sizeof j->message,
                 "model.compute is BF16 and no registered worker runs BF16 compute "
                 "(AVX512-BF16) yet: the job waits for one");
        log_warn("job %s: %s", j->id, j->message);
    }
    uint32_t mport = ex->cluster->metrics_port;
    for (int i = 0; i < j->n_servers; i++)
        if (server_start(p, j, i, ex->cluster->servers[i], mport ? mport + (uint32_t)i : 0, e) <
            0) {
            err_wrap(e, "starting server %d of job %s", i, j->id);
            pool_set_state(p, j, PEFTPS__POOL__JOB_STATE__FAILED, e->msg);
            servers_signal(p, j->id, SIGTERM);
            return NULL;
        }
    return j;
}

/* ---- answers ---------------------------------------------------------------- */

static void hex_ident(const unsigned char *id, size_t n, char *buf, size_t cap) {
    size_t k = 0;
    for (size_t i = 0; i < n && i < 8 && k + 3 < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%02x", id[i]);
    buf[k] = '\0';
}

static void send_reply(pool *p, const unsigned char *id, size_t idlen,
                       const Peftps__Pool__PoolMessage *m) {
    err e;
    if (poolmsg_send(p->router, id, idlen, m, &e) < 0) {
        char h[20];
        hex_ident(id, idlen, h, sizeof h);
        log_debug("answering peer %s: %s", h, e.msg);
    }
}

static void send_error(pool *p, const unsigned char *id, size_t idlen, const char *msg) {
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    Peftps__Pool__Error er = PEFTPS__POOL__ERROR__INIT;
    er.message = (char *)msg;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_ERROR;
    m.error = &er;
    send_reply(p, id, idlen, &m);
}

/* Jobs: the given jobs (or all when only is NULL), the base and workers. */
static int send_jobs(pool *p, const unsigned char *id, size_t idlen, pooljob *only, err *e) {
    int n = only ? 1 : p->t.n_jobs;
    Peftps__Pool__Job *jobs = calloc((size_t)(n ? n : 1), sizeof *jobs);
    Peftps__Pool__Job **ptrs = calloc((size_t)(n ? n : 1), sizeof *ptrs);
    if (!jobs || !ptrs) {
        free(jobs);
        free(ptrs);
        return err_set(e, "out of memory");
    }
    for (int i = 0; i < n; i++) {
        pooljobs_job_msg(&p->t, only ? only : p->t.jobs[i], 0, &jobs[i]);
        ptrs[i] = &jobs[i];
    }
    Peftps__Pool__Jobs js = PEFTPS__POOL__JOBS__INIT;
    js.n_jobs = (size_t)n;
    js.jobs = ptrs;
    js.base_path = p->t.base_path;
    js.base_fingerprint = p->t.base_fingerprint;
    js.has_workers = 1;
    js.workers = (uint32_t)p->t.n_workers;
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_JOBS;
    m.jobs = &js;
    send_reply(p, id, idlen, &m);
    free(jobs);
    free(ptrs);
    return 0;
}

/* JobList: every RUNNING job with its experiment, or `unchanged`. */
static int send_job_list(pool *p, const unsigned char *id, size_t idlen, int unchanged, err *e) {
    int n = unchanged ? 0 : pooljobs_count(&p->t, PEFTPS__POOL__JOB_STATE__RUNNING), k = 0;
    Peftps__Pool__Job *jobs = calloc((size_t)(n ? n : 1), sizeof *jobs);
    Peftps__Pool__Job **ptrs = calloc((size_t)(n ? n : 1), sizeof *ptrs);
    if (!jobs || !ptrs) {
        free(jobs);
        free(ptrs);
        return err_set(e, "out of memory");
    }
    for (int i = 0; i < p->t.n_jobs && k < n; i++)
        if (p->t.jobs[i]->state == PEFTPS__POOL__JOB_STATE__RUNNING) {
            pooljobs_job_msg(&p->t, p->t.jobs[i], 1, &jobs[k]);
            ptrs[k] = &jobs[k];
            k++;
        }
    Peftps__Pool__JobList jl = PEFTPS__POOL__JOB_LIST__INIT;
    jl.has_revision = 1;
    jl.revision = p->t.revision;
    jl.n_jobs = (size_t)k;
    jl.jobs = ptrs;
    jl.has_unchanged = 1;
    jl.unchanged = unchanged;
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_JOB_LIST;
    m.job_list = &jl;
    send_reply(p, id, idlen, &m);
    free(jobs);
    free(ptrs);
    return 0;
}

static void send_server_reply(pool *p, const unsigned char *id, size_t idlen, const pooljob *j) {
    Peftps__Pool__ServerReply r = PEFTPS__POOL__SERVER_REPLY__INIT;
    r.id = j->id;
    r.has_cancel = 1;
    r.cancel = j->state == PEFTPS__POOL__JOB_STATE__CANCELLED;
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_REPLY;
    m.server_reply = &r;
    send_reply(p, id, idlen, &m);
}

/* ---- messages --------------------------------------------------------------- */

static int on_worker_hello(pool *p, const unsigned char *id, size_t idlen,
                           const Peftps__Pool__WorkerHello *h, err *e) {
    int known = pooljobs_worker_find(&p->t, id, idlen) != NULL;
    if (pooljobs_worker_hello(&p->t, id, idlen, h, pool_now(p), e) < 0) return -1;
    if (!known)
        log_info("worker %s joined (%s)", h->worker_id ? h->worker_id : "?",
                 h->bf16 ? "BF16 compute" : "F32 compute only");
    return send_job_list(p, id, idlen, 0, e);
}

static int on_worker_status(pool *p, const unsigned char *id, size_t idlen,
                            const Peftps__Pool__WorkerStatus *s, err *e) {
    poolworker *w = pooljobs_worker_find(&p->t, id, idlen);
    if (!w && (w = pooljobs_worker_revive(&p->t, id, idlen, pool_now(p))))
        log_info("worker %s speaks again: registered again", w->id);
    if (!w)
        return err_set(e,
                       "a worker that is not registered (silent for over %.0f s, or the pool "
                       "restarted): say WorkerHello first",
                       POOLJOBS_WORKER_SILENCE_S);
    w->last_seen = pool_now(p);
    for (size_t i = 0; i < s->n_usage; i++) {
        const Peftps__Pool__JobUsage *u = s->usage[i];
        err ue;
        if (pooljobs_usage(&p->t, u->id, u->has_compute_s ? u->compute_s : 0,
                           u->has_shards ? u->shards : 0, &ue) < 0)
            log_debug("worker %s: %s", w->id, ue.msg);
    }
    int unchanged = s->has_have_revision && s->have_revision == p->t.revision;
    return send_job_list(p, id, idlen, unchanged, e);
}

static int on_submit(pool *p, const unsigned char *id, size_t idlen, const Peftps__Pool__Submit *s,
                     err *e) {
    if (p->stopping) return err_set(e, "the pool is stopping: submit to another");
    if (!s->experiment) return err_set(e, "a submit without an experiment");
    char source[256];
    snprintf(source, sizeof source, "%s",
             s->source && *s->source ? s->source : "the submitted experiment");
    Peftps__Experiment *ex = NULL;
    if (experiment_load_text(s->experiment, strlen(s->experiment), source, &ex, NULL, e) < 0)
        return -1;
    pooljob *j = submit_job(p, ex, source, s->has_share, s->share, e);
    config_free(ex);
    if (!j) return -1;
    return send_jobs(p, id, idlen, j, e);
}

static int on_server_announce(pool *p, const unsigned char *id, size_t idlen,
                              const Peftps__Pool__ServerAnnounce *a, err *e) {
    uint32_t index = a->has_index ? a->index : 0;
    pooljob *j;
    if (a->id && *a->id) {
        if (!(j = pooljobs_find(&p->t, a->id)))
            return err_set(e, "no job %.64s in this pool: it was not submitted here", a->id);
        if (a->fingerprint && strcmp(a->fingerprint, j->fingerprint))
            return err_set(e,
                           "server %u of job %s announced fingerprint %.16s.., the job's is "
                           "%.16s..",
                           index, j->id, a->fingerprint, j->fingerprint);
        if (pooljobs_live(j)) {
            int was = j->state;
            if (pooljobs_announce(&p->t, j, index, pool_now(p), e) < 0) return -1;
            if (j->state != was)
                log_info("job %s: %s -> %s", j->id, poolmsg_state_name(was),
                         poolmsg_state_name(j->state));
        }
        send_server_reply(p, id, idlen, j);
        return 0;
    }
    /* A server started elsewhere (a Kubernetes StatefulSet): its experiment
     * is checked as a submission is, its base by the fingerprint it sends. */
    if (!a->experiment) return err_set(e, "a server announce with neither id nor experiment");
    if (!a->base_fingerprint) return err_set(e, "a server announce without base_fingerprint");
    if (strcmp(a->base_fingerprint, p->t.base_fingerprint))
        return err_set(e,
                       "the server's base has fingerprint %.12s.., this pool serves %s "
                       "(fingerprint %.12s..): announce it to a pool of its base",
                       a->base_fingerprint, p->t.base_path, p->t.base_fingerprint);
    Peftps__Experiment *ex = NULL;
    if (experiment_load_text(a->experiment, strlen(a->experiment), "the announced experiment", &ex,
                             NULL, e) < 0)
        return -1;
    char fp[65];
    config_fingerprint(ex, fp);
    int rc = -1;
    j = pooljobs_find(&p->t, ex->name);
    if (a->fingerprint && strcmp(a->fingerprint, fp)) {
        err_set(e, "the announced fingerprint %.16s.. is not that of its experiment (%.16s..)",
                a->fingerprint, fp);
    } else if (j && !strcmp(j->fingerprint, fp) &&
               (pooljobs_live(j) || j->state != PEFTPS__POOL__JOB_STATE__FAILED)) {
        /* The same job again: a restarted server, or another of its servers. */
        rc = pooljobs_live(j) ? pooljobs_announce(&p->t, j, index, pool_now(p), e) : 0;
    } else if (pooljobs_admit(&p->t, ex, fp, a->base_fingerprint, "the announced experiment", e) ==
               0) {
        char *text = NULL;
        if (pbtext_print(&ex->base, &text, e) == 0 &&
            (j = pooljobs_add(&p->t, ex, text, fp, ex->cluster->share, 1, pool_now(p), e))) {
            log_info("job %s: announced by its server %u (started outside the pool), output %s",
                     j->id, index, j->output_dir);
            rc = pooljobs_announce(&p->t, j, index, pool_now(p), e);
        }
        free(text);
    }
    config_free(ex);
    if (rc < 0) return -1;
    if (j->state == PEFTPS__POOL__JOB_STATE__RUNNING && rc == 1)
        log_info("job %s: starting -> running", j->id);
    send_server_reply(p, id, idlen, j);
    return 0;
}

static int on_server_status(pool *p, const unsigned char *id, size_t idlen,
                            const Peftps__Pool__ServerStatus *s, err *e) {
    if (!s->id || !*s->id) return err_set(e, "a server status without a job id");
    pooljob *j = pooljobs_find(&p->t, s->id);
    if (!j)
        return err_set(e, "no job %.64s in this pool: announce the server first",
                       s->id ? s->id : "");
    uint32_t index = s->has_index ? s->index : 0;
    if (index >= (uint32_t)j->n_servers)
        return err_set(e, "job %s has %d server(s); there is no server %u", j->id, j->n_servers,
                       index);
    if (pooljobs_live(j) && index == 0) {
        if (s->has_step) j->step = s->step;
        if (s->has_total_steps && s->total_steps > 0) j->total_steps = s->total_steps;
        if (s->has_loss) j->loss = s->loss;
        if (s->has_tokens_per_s && isfinite(s->tokens_per_s) && s->tokens_per_s >= 0)
            j->tokens_per_s = s->tokens_per_s;
    }
    const char *msg = s->message && *s->message ? s->message : NULL;
    /* Server 0 writes the outputs: the job is done when it says so. */
    if (s->has_state && s->state == PEFTPS__POOL__JOB_STATE__DONE && index == 0)
        pool_set_state(p, j, PEFTPS__POOL__JOB_STATE__DONE, msg);
    else if (s->has_state && s->state == PEFTPS__POOL__JOB_STATE__FAILED)
        pool_set_state(p, j, PEFTPS__POOL__JOB_STATE__FAILED,
                       msg ? msg : "its server failed without saying why");
    else if (s->has_state && s->state == PEFTPS__POOL__JOB_STATE__CANCELLED && j->external &&
             !p->stopping) {
        /* A server started outside the pool was stopped (its pod deleted
         * or moved): the workers leave the job until it announces again. */
        if (pooljobs_server_left(&p->t, j, index, pool_now(p)))
            log_info("job %s: running -> starting: %s", j->id, j->message);
    } else if (msg && pooljobs_live(j))
        snprintf(j->message, sizeof j->message, "%s", msg);
    send_server_reply(p, id, idlen, j);
    return 0;
}

static int on_cancel(pool *p, const unsigned char *id, size_t idlen, const Peftps__Pool__Cancel *c,
                     err *e) {
    if (!c->id || !*c->id) return err_set(e, "a cancel without a job id");
    pooljob *j = pooljobs_find(&p->t, c->id);
    if (!j)
        return err_set(e, "no job %.64s in this pool (`peftps jobs` lists them)",
                       c->id ? c->id : "");
    if (!pooljobs_live(j))
        return err_set(e, "job %s is already %s", j->id, poolmsg_state_name(j->state));
    pool_set_state(p, j, PEFTPS__POOL__JOB_STATE__CANCELLED, "cancelled");
    /* Its servers checkpoint the last completed step and stop. */
    servers_signal(p, j->id, SIGTERM);
    return send_jobs(p, id, idlen, j, e);
}

static void pool_handle(pool *p, const unsigned char *id, size_t idlen,
                        const Peftps__Pool__PoolMessage *m) {
    err e;
    int rc;
    switch (m->body_case) {
    case PEFTPS__POOL__POOL_MESSAGE__BODY_WORKER_HELLO:
        rc = on_worker_hello(p, id, idlen, m->worker_hello, &e);
        break;
    case PEFTPS__POOL__POOL_MESSAGE__BODY_WORKER_STATUS:
        rc = on_worker_status(p, id, idlen, m->worker_status, &e);
        break;
    case PEFTPS__POOL__POOL_MESSAGE__BODY_SUBMIT:
        rc = on_submit(p, id, idlen, m->submit, &e);
        break;
    case PEFTPS__POOL__POOL_MESSAGE__BODY_LIST_JOBS:
        rc = send_jobs(p, id, idlen, NULL, &e);
        break;
    case PEFTPS__POOL__POOL_MESSAGE__BODY_CANCEL:
        rc = on_cancel(p, id, idlen, m->cancel, &e);
        break;
    case PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_ANNOUNCE:
        rc = on_server_announce(p, id, idlen, m->server_announce, &e);
        break;
    case PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_STATUS:
        rc = on_server_status(p, id, idlen, m->server_status, &e);
        break;
    default:
        rc = err_set(&e, "a %s message is not one a coordinator takes",
                     poolmsg_body_name(m->body_case));
    }
    if (rc < 0) {
        char h[20];
        hex_ident(id, idlen, h, sizeof h);
        log_warn("refused a %s from peer %s: %s", poolmsg_body_name(m->body_case), h, e.msg);
        send_error(p, id, idlen, e.msg);
    }
}

/* ---- the loop --------------------------------------------------------------- */

static void pool_receive(pool *p) {
    for (int k = 0; k < POOL_BURST; k++) {
        unsigned char id[POOLMSG_ID_MAX];
        size_t idlen = 0;
        Peftps__Pool__PoolMessage *m = NULL;
        err e;
        int rc = poolmsg_recv(p->router, ZMQ_DONTWAIT, id, &idlen, &m, &e);
        if (rc == 1) return;
        if (rc < 0) {
            char h[20];
            hex_ident(id, idlen, h, sizeof h);
            log_warn("a malformed message from peer %s: %s", idlen ? h : "?", e.msg);
            if (idlen) send_error(p, id, idlen, e.msg);
            continue;
        }
        pool_handle(p, id, idlen, m);
        poolmsg_free(m);
    }
}

static void pool_health(pool *p) {
    char last[POOLJOBS_ID_MAX + 1];
    double now = pool_now(p);
    int dropped = pooljobs_worker_expire(&p->t, now, last, sizeof last);
    if (dropped)
        log_warn("dropped %d silent worker(s) (last: %s): nothing heard for %.0f s", dropped, last,
                 POOLJOBS_WORKER_SILENCE_S);
    int h[3] = {p->t.n_workers, pooljobs_count(&p->t, PEFTPS__POOL__JOB_STATE__RUNNING),
                pooljobs_count(&p->t, PEFTPS__POOL__JOB_STATE__STARTING)};
    if (memcmp(h, p->health, sizeof h) || now - p->last_health > POOL_HEALTH_S) {
        log_info("pool: %d worker(s) registered, %d job(s) running, %d starting, %d ended", h[0],
                 h[1], h[2], p->t.n_jobs - h[1] - h[2]);
        memcpy(p->health, h, sizeof h);
        p->last_health = now;
    }
}

/* The endpoint children connect to: a wildcard bind is reached on loopback. */
static void connect_endpoint(const char *listen, char *out, size_t n) {
    const char *rest = NULL;
    if (!strncmp(listen, "tcp://*:", 8))
        rest = listen + 8;
    else if (!strncmp(listen, "tcp://0.0.0.0:", 14))
        rest = listen + 14;
    if (rest)
        snprintf(out, n, "tcp://127.0.0.1:%s", rest);
    else
        snprintf(out, n, "%s", listen);
}

static int pool_open(pool *p, err *e) {
    char fp[65], dir[4096], jobs[4300];
    if (model_files_probe(p->o->model, fp, e) < 0) {
        err_wrap(e, "--model %s", p->o->model);
        return -2; /* bad input */
    }
    if (pooljobs_init(&p->t, p->o->model, fp, e) < 0) return -1;
    snprintf(jobs, sizeof jobs, "%s/jobs", p->o->work);
    if (fs_mkdir_p(jobs, e) < 0) return -1;
    if (spawn_self(dir, sizeof dir, 1, e) < 0) return -1;
    snprintf(p->server_bin, sizeof p->server_bin, "%s/peftps-server", dir);
    snprintf(p->worker_bin, sizeof p->worker_bin, "%s/peftps-worker", dir);
    connect_endpoint(p->o->listen, p->endpoint, sizeof p->endpoint);
    p->host = p->o->advertise ? p->o->advertise : "127.0.0.1";
    p->remote = strcmp(p->host, "127.0.0.1") && strcmp(p->host, "localhost");
    if (strlen(p->host) > 253 || strpbrk(p->host, "/:*"))
        return err_set(e, "--advertise %s: give a host name or IPv4 address", p->host);
    if (!p->remote && strncmp(p->o->listen, "tcp://127.", 10) &&
        strncmp(p->o->listen, "tcp://localhost:", 16) && strncmp(p->o->listen, "ipc://", 6))
        log_warn("the servers of jobs submitted here listen on loopback: workers on other "
                 "machines reach them with --advertise HOST");
    p->workers = calloc((size_t)(p->o->workers ? p->o->workers : 1), sizeof *p->workers);
    if (!p->workers) return err_set(e, "out of memory");
    if (!(p->ctx = zmq_ctx_new()) || !(p->router = zmq_socket(p->ctx, ZMQ_ROUTER)))
        return err_set(e, "zmq: %s", zmq_strerror(errno));
    int one = 1, linger = 0, sndtimeo = 100;
    int64_t maxsz = POOLMSG_MAX_BYTES + 1024;
    zmq_setsockopt(p->router, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(p->router, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(p->router, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    zmq_setsockopt(p->router, ZMQ_MAXMSGSIZE, &maxsz, sizeof maxsz);
    if (zmq_bind(p->router, p->o->listen) < 0)
        return err_set(e,
                       "cannot listen at %s: %s (is another pool there? --listen picks "
                       "another endpoint)",
                       p->o->listen, zmq_strerror(errno));
    log_info("pool at %s serving base %s (fingerprint %s), work directory %s", p->o->listen,
             p->o->model, fp, p->o->work);
    for (int i = 0; i < p->o->workers; i++)
        if (worker_start(p, i, e) < 0) return err_wrap(e, "starting worker %d", i);
    if (p->o->workers)
        log_info("started %d worker(s) (logs %s/worker-*.log)", p->o->workers, p->o->work);
    return 0;
}

/* SIGTERM to every child, then their end: servers checkpoint and stop. */
static void pool_stop(pool *p) {
    p->stopping = 1;
    log_info("stopping: asking %d server(s) and %d worker(s) to stop", p->n_servers, p->o->workers);
    servers_signal(p, NULL, SIGTERM);
    for (int i = 0; i < p->o->workers; i++)
        if (p->workers[i].pid > 0) kill(p->workers[i].pid, SIGTERM);
    double until = pool_now(p) + POOL_STOP_GRACE_S;
    for (;;) {
        int left = p->n_servers;
        for (int i = 0; i < p->o->workers; i++) left += p->workers[i].pid > 0;
        if (!left) break;
        if (pool_now(p) > until) {
            log_warn("%d child(ren) still running after %.0f s: killing them", left,
                     POOL_STOP_GRACE_S);
            servers_signal(p, NULL, SIGKILL);
            for (int i = 0; i < p->o->workers; i++)
                if (p->workers[i].pid > 0) kill(p->workers[i].pid, SIGKILL);
            until = pool_now(p) + 5;
        }
        /* Servers still report while they checkpoint: keep answering. */
        zmq_pollitem_t it = {p->router, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, 50) > 0) pool_receive(p);
        children_reap(p);
    }
}

int pool_run(const pool_options *o) {
    pool p = {.o = o, .t0 = progress_now(), .health = {-1, -1, -1}};
    err e;
    stopsig sigs;
    pool_signal = 0;
    stopsig_catch(&sigs, pool_on_signal);
    int rc = 0;
    int opened = pool_open(&p, &e);
    if (opened < 0) {
        fprintf(stderr, "peftps pool start: %s\n", e.msg);
        rc = opened == -2 ? 2 : 1;
    }
    while (rc == 0 && !pool_signal) {
        zmq_pollitem_t it = {p.router, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, 100) < 0 && errno != EINTR) {
            log_error("polling the pool's socket: %s", zmq_strerror(errno));
            break;
        }
        pool_receive(&p);
        children_reap(&p);
        workers_restart_due(&p);
        pool_health(&p);
        log_flush();
    }
    if (p.workers) pool_stop(&p);
    stopsig_restore(&sigs);
    if (rc == 0) log_info("stopped");
    for (int i = 0; i < p.n_servers; i++) free(p.servers[i].job);
    free(p.servers);
    free(p.workers);
    if (p.router) zmq_close(p.router);
    if (p.ctx) zmq_ctx_term(p.ctx);
    pooljobs_free(&p.t);
    return rc;
}
