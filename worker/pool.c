/* A pool worker's side of the pool (worker.h's worker_pool_run): one
 * DEALER to the coordinator (proto/pool.proto over net/poolmsg.h), the
 * table of the experiments it lists, and the base, mapped once per compute
 * and shared by every experiment's trainer (worker.c runs them). */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zmq.h>

#include "base/log.h"
#include "base/progress.h"
#include "config/config.h"
#include "config/pbtext.h"
#include "model/bf16.h"
#include "net/poolmsg.h"
#include "train/experiment.h"
#include "train/train.h"

/* Reconnects to a silent coordinator back off from the first to the cap. */
#define POOL_BACKOFF_FIRST_S 0.2
#define POOL_BACKOFF_CAP_S 5.0
/* Status every this often; the coordinator silent this long is reconnected. */
#define POOL_STATUS_S 1.0
#define POOL_SILENCE_S 10.0
/* Experiments one worker serves at most. */
#define POOL_MAX_JOBS 256

typedef struct pool_job {
    char id[128];
    Peftps__Experiment *exp;
    worker *w;  /* NULL once it ended here */
    int listed; /* in the coordinator's latest list */
} pool_job;

struct pool_link {
    const char *endpoint, *model_dir;
    char id[128];
    void *sock;
    int welcomed, attempts;
    int ever_welcomed; /* since then, refusals are not fatal: see pool_on_readable */
    double last_heard, last_sent, hello_at, retry_at;
    uint64_t revision;
    int have_revision;
    char base_fp[65];
    model_files *files[2]; /* by model_compute, opened when a job needs it */
    pool_job *jobs;
    int n_jobs;
};

void *pool_socket(pool_link *p) {
    return p->sock;
}

/* ---- the coordinator's connection ----------------------------------------------------- */

static void link_send(worker_host *h, const Peftps__Pool__PoolMessage *m) {
    pool_link *p = h->pool;
    err e;
    if (!p->sock) return;
    if (poolmsg_send(p->sock, NULL, 0, m, &e) < 0)
        log_warn("pool %s: %s", p->endpoint, e.msg);
    else
        p->last_sent = progress_now();
}

static void send_hello(worker_host *h) {
    pool_link *p = h->pool;
    Peftps__Pool__WorkerHello hi = PEFTPS__POOL__WORKER_HELLO__INIT;
    hi.has_protocol_version = 1;
    hi.protocol_version = POOLMSG_PROTOCOL_VERSION;
    hi.worker_id = p->id;
    hi.base_fingerprint = p->base_fp;
    hi.has_bf16 = 1;
    hi.bf16 = bf16_cpu_ok();
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_WORKER_HELLO;
    m.worker_hello = &hi;
    p->hello_at = progress_now();
    link_send(h, &m);
}

/* The status: what each experiment got since the last one, and the list
 * revision held. */
static void send_status(worker_host *h) {
    pool_link *p = h->pool;
    Peftps__Pool__JobUsage *u = calloc((size_t)(h->n_jobs ? h->n_jobs : 1), sizeof *u);
    Peftps__Pool__JobUsage **up = calloc((size_t)(h->n_jobs ? h->n_jobs : 1), sizeof *up);
    if (!u || !up) {
        free(u);
        free(up);
        return;
    }
    for (int j = 0; j < h->n_jobs; j++) {
        peftps__pool__job_usage__init(&u[j]);
        u[j].id = (char *)worker_job_id(h->jobs[j]);
        u[j].has_compute_s = u[j].has_shards = 1;
        worker_take_usage(h->jobs[j], &u[j].compute_s, &u[j].shards);
        up[j] = &u[j];
    }
    Peftps__Pool__WorkerStatus st = PEFTPS__POOL__WORKER_STATUS__INIT;
    st.has_have_revision = p->have_revision;
    st.have_revision = p->revision;
    st.n_usage = (size_t)h->n_jobs;
    st.usage = up;
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_WORKER_STATUS;
    m.worker_status = &st;
    link_send(h, &m);
    free(u);
    free(up);
}

static int link_open(worker_host *h, err *e) {
    pool_link *p = h->pool;
    p->sock = zmq_socket(h->ctx, ZMQ_DEALER);
    if (!p->sock) return err_set(e, "zmq_socket: %s", zmq_strerror(errno));
    int linger = 0, sndtimeo = 2000;
    int64_t maxsz = POOLMSG_MAX_BYTES + 1024;
    zmq_setsockopt(p->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(p->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    zmq_setsockopt(p->sock, ZMQ_MAXMSGSIZE, &maxsz, sizeof maxsz);
    if (zmq_connect(p->sock, p->endpoint) < 0)
        return err_set(e, "--pool %s: %s", p->endpoint, zmq_strerror(errno));
    p->welcomed = 0;
    p->last_heard = progress_now();
    send_hello(h);
    return 0;
}

static void link_retry(worker_host *h, const char *why) {
    pool_link *p = h->pool;
    double s = POOL_BACKOFF_FIRST_S;
    for (int i = 0; i < p->attempts && s < POOL_BACKOFF_CAP_S; i++) s *= 2;
    if (s > POOL_BACKOFF_CAP_S) s = POOL_BACKOFF_CAP_S;
    p->attempts++;
    log_warn("pool %s: %s; reconnecting in %.1f s (the experiments go on meanwhile)", p->endpoint,
             why, s);
    if (p->sock) zmq_close(p->sock);
    p->sock = NULL;
    p->welcomed = 0;
    p->retry_at = progress_now() + s;
}

/* ---- the experiments ------------------------------------------------------------------ */

static model_files *files_for(pool_link *p, model_compute c, err *e) {
    if (!p->files[c] && model_files_open_compute(&p->files[c], p->model_dir, c, e) < 0) return NULL;
    if (strcmp(model_files_fingerprint(p->files[c]), p->base_fp)) {
        err_set(e, "the base at %s changed while this worker ran (fingerprint %.12s, was %.12s)",
                p->model_dir, model_files_fingerprint(p->files[c]), p->base_fp);
        return NULL;
    }
    return p->files[c];
}

/* Starts serving the listed job j: its experiment from the text (the
 * coordinator checked it; it is checked again, trusting nothing), its
 * fingerprint as its servers know it, then model.path pointed at this
 * worker's copy of the base. Failing ends the job here, with the reason. */
static void job_start(worker_host *h, pool_job *pj, const Peftps__Pool__Job *j) {
    pool_link *p = h->pool;
    err e;
    char source[160], fp[65];
    snprintf(source, sizeof source, "job %s", pj->id);
    ProtobufCMessage *msg = NULL;
    if (!j->experiment || pbtext_parse(&peftps__experiment__descriptor, j->experiment,
                                       strlen(j->experiment), source, &msg, NULL, &e) < 0) {
        log_error("job %s: its experiment does not parse: %s", pj->id,
                  j->experiment ? e.msg : "no text");
        return;
    }
    pj->exp = (Peftps__Experiment *)msg;
    if (experiment_fill_defaults(pj->exp, source, NULL, &e) < 0 ||
        experiment_check(pj->exp, source, NULL, &e) < 0) {
        log_error("job %s: %s", pj->id, e.msg);
        return;
    }
    config_fingerprint(pj->exp, fp);
    free(pj->exp->model->path);
    pj->exp->model->path = strdup(p->model_dir);
    model_files *f = pj->exp->model->path ? files_for(p, train_compute(pj->exp), &e) : NULL;
    if (!pj->exp->model->path) err_set(&e, "out of memory");
    if (!f ||
        worker_open_job(&pj->w, h, pj->id, pj->exp, fp, f, j->has_share ? j->share : 1.0, &e) < 0) {
        pj->w = NULL;
        log_error("job %s: %s; this worker does not serve it", pj->id, e.msg);
    }
}

static void job_drop(pool_job *pj) {
    if (pj->w) worker_close_job(pj->w);
    pj->w = NULL;
    config_free(pj->exp);
    pj->exp = NULL;
}

static pool_job *job_find(pool_link *p, const char *id) {
    for (int i = 0; i < p->n_jobs; i++)
        if (!strcmp(p->jobs[i].id, id)) return &p->jobs[i];
    return NULL;
}

/* A new list: listed jobs not held start, held jobs not listed stop. A job
 * that ended here stays ended while it is listed. */
static void on_job_list(worker_host *h, const Peftps__Pool__JobList *l) {
    pool_link *p = h->pool;
    if (l->has_unchanged && l->unchanged) return;
    for (int i = 0; i < p->n_jobs; i++) p->jobs[i].listed = 0;
    for (size_t k = 0; k < l->n_jobs; k++) {
        const Peftps__Pool__Job *j = l->jobs[k];
        if (!j->id || !*j->id || strlen(j->id) >= sizeof p->jobs[0].id) {
            log_warn("pool %s listed a job without a usable id", p->endpoint);
            continue;
        }
        pool_job *pj = job_find(p, j->id);
        if (pj) {
            pj->listed = 1;
            continue;
        }
        if (p->n_jobs == POOL_MAX_JOBS) {
            log_warn("pool %s lists more than %d jobs; job %s waits", p->endpoint, POOL_MAX_JOBS,
                     j->id);
            continue;
        }
        pj = &p->jobs[p->n_jobs++];
        memset(pj, 0, sizeof *pj);
        snprintf(pj->id, sizeof pj->id, "%s", j->id);
        pj->listed = 1;
        job_start(h, pj, j);
    }
    /* Jobs no longer listed leave in pool_tick, after the loop has handled
     * what their sockets received. */
    p->revision = l->revision;
    p->have_revision = 1;
}

int pool_on_readable(worker_host *h, err *e) {
    pool_link *p = h->pool;
    for (int k = 0; k < 16 && p->sock; k++) {
        Peftps__Pool__PoolMessage *m = NULL;
        err me;
        int r = poolmsg_recv(p->sock, ZMQ_DONTWAIT, NULL, NULL, &m, &me);
        if (r == 1) break;
        if (r < 0) {
            log_warn("pool %s sent a bad message: %s", p->endpoint, me.msg);
            continue;
        }
        p->last_heard = progress_now();
        if (m->body_case == PEFTPS__POOL__POOL_MESSAGE__BODY_ERROR) {
            const char *text = m->error->message ? m->error->message : "";
            if (!p->ever_welcomed) {
                err_set(e, "pool %s refused this worker: %s", p->endpoint, text);
                poolmsg_free(m);
                return -1;
            }
            /* Once registered, an error means the coordinator lost us (it
             * restarted, or dropped us for silence): register again. The
             * experiments go on meanwhile; a refusal now is only logged. */
            log_warn("pool %s: %s; registering again", p->endpoint, text);
            p->welcomed = 0;
            if (progress_now() - p->hello_at >= POOL_STATUS_S) send_hello(h);
        } else if (m->body_case == PEFTPS__POOL__POOL_MESSAGE__BODY_JOB_LIST) {
            if (!p->welcomed) log_info("registered with pool %s", p->endpoint);
            p->welcomed = p->ever_welcomed = 1;
            p->attempts = 0;
            on_job_list(h, m->job_list);
        } else {
            log_warn("pool %s sent an unexpected %s", p->endpoint, poolmsg_body_name(m->body_case));
        }
        poolmsg_free(m);
    }
    return 0;
}

int pool_tick(worker_host *h, err *e) {
    pool_link *p = h->pool;
    double now = progress_now();
    if (!p->sock && now >= p->retry_at && link_open(h, e) < 0) return -1;
    if (p->sock && now - p->last_heard > POOL_SILENCE_S)
        link_retry(h, p->welcomed ? "silent" : "no answer to WorkerHello");
    else if (p->sock && p->welcomed && now - p->last_sent >= POOL_STATUS_S)
        send_status(h);
    else if (p->sock && !p->welcomed && now - p->hello_at >= POOL_STATUS_S)
        send_hello(h);
    /* Jobs no longer listed leave; jobs that ended here (refused, failed)
     * free their memory now, their entry staying while listed, so that
     * they are not started again. */
    for (int i = 0; i < p->n_jobs;) {
        pool_job *pj = &p->jobs[i];
        if (!pj->listed) {
            log_info("job %s: no longer listed by the pool; leaving it", pj->id);
            job_drop(pj);
            *pj = p->jobs[--p->n_jobs];
            continue;
        }
        if (pj->w && worker_ended(pj->w)) {
            worker_close_job(pj->w);
            pj->w = NULL;
        }
        i++;
    }
    return 0;
}

void pool_heartbeat(worker_host *h) {
    pool_link *p = h->pool;
    if (p->sock && p->welcomed && progress_now() - p->last_sent >= POOL_STATUS_S) send_status(h);
}

/* ---- the program ---------------------------------------------------------------------- */

int worker_pool_run(const worker_pool_opts *o, err *e) {
    pool_link p;
    memset(&p, 0, sizeof p);
    p.endpoint = o->pool;
    p.model_dir = o->model_dir;
    p.jobs = calloc(POOL_MAX_JOBS, sizeof *p.jobs);
    if (!p.jobs) return err_set(e, "out of memory");
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    snprintf(p.id, sizeof p.id, "%s:%d", host, (int)getpid());
    /* The base's fingerprint, from the compute this CPU runs best; the
     * files of each compute are kept open while an experiment uses them. */
    model_compute c = bf16_cpu_ok() ? MODEL_COMPUTE_BF16 : MODEL_COMPUTE_F32;
    if (model_files_open_compute(&p.files[c], o->model_dir, c, e) < 0) {
        free(p.jobs);
        return err_wrap(e, "--model");
    }
    snprintf(p.base_fp, sizeof p.base_fp, "%s", model_files_fingerprint(p.files[c]));
    worker_host *h;
    if (worker_host_create(&h, e) < 0) {
        model_files_close(p.files[c]);
        free(p.jobs);
        return -1;
    }
    h->pool = &p;
    h->cobatch = o->cobatch;
    err he;
    if (o->metrics_port && httpd_listen(h->http, NULL, o->metrics_port, &he) < 0)
        log_warn("--metrics-port: %s; no /healthz or /metrics", he.msg);
    httpd_set_liveness(h->http, 120.0);
    log_info("pool worker %s: base %s (fingerprint %.12s), co-batching %s; joining %s", p.id,
             o->model_dir, p.base_fp, o->cobatch ? "on" : "off", o->pool);
    int rc = worker_host_run(h, e);
    for (int i = 0; i < p.n_jobs; i++) job_drop(&p.jobs[i]);
    if (p.sock) zmq_close(p.sock);
    worker_host_free(h);
    for (int i = 0; i < 2; i++) model_files_close(p.files[i]);
    free(p.jobs);
    return rc;
}
