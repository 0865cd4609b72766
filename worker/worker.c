/* The worker's loop (see worker.h, internal.h): per experiment one DEALER
 * per server, all polled together with the pool's link when there is one;
 * reconnect with exponential backoff when a server goes silent; heartbeats
 * from the main thread while it waits and from a small thread while it
 * computes (the sockets change hands under a mutex, which is the full
 * memory barrier ZeroMQ asks for when a socket moves between threads). */
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

#include "config/config.h"
#include "net/curve.h"
#include "net/httpd.h"
#include "base/fairshare.h"
#include "base/log.h"
#include "base/progress.h"
#include "model/cobatch.h"
#include "train/train.h"
#include "net/wire.h"

#define NO_VERSION UINT64_MAX
/* Reconnect delays double from the first to the cap. */
#define BACKOFF_FIRST_MS 100
#define BACKOFF_CAP_MS 4000

typedef struct conn {
    int index;
    const char *endpoint;
    void *sock;
    int registered;
    double last_heard, last_sent, hello_at;
    int attempts;
    double retry_at;
    uint64_t version; /* of the parameters received from this server */
    int pulled;       /* a Pull is outstanding */
    /* Its tensors, from its Welcome: indices into the method's table. */
    int n;
    int *tidx;
    wire_expect *expect;
    wire_tensor *push;
    httpd_metric *bytes_out; /* the worker's counter of bytes sent */
} conn;

struct worker {
    worker_host *host;
    int owns_host; /* a single experiment's worker owns its host */
    const Peftps__Experiment *exp;
    trainer *t;
    char exp_fp[65];
    char id[128];
    char job[128]; /* the pool's job id; "" outside a pool */
    int n_conns;
    conn *conns;
    int curve;
    curve_keys mine;
    char server_public[CURVE_KEY_Z85 + 1];
    double hb_s, timeout_s;
    /* A server's silence allowed: timeout_s plus the whole table's transfer
     * at cluster.min_transfer_mbit_s, since its heartbeats queue behind the
     * tensors it sends (a Welcome or a Snapshot) on the same connection. */
    double silence_s;
    wire_limits lim;    /* no message may exceed the whole table */
    uint64_t refreshed; /* version the method's derived state was built for */

    /* The current assignment, from server 0. */
    int have_assign;
    uint64_t a_step, a_version;
    uint32_t *a_shards;
    size_t a_n;

    /* A pool's job: its end, its weight, and the compute it got (all of
     * it, and what the coordinator has not been told of yet). */
    int ended;
    double share, used_s, unsent_s;
    uint64_t unsent_shards;
};

static volatile sig_atomic_t stop_requested;

void worker_stop(void) {
    stop_requested = 1;
}

/* A server sends at most the whole table in one message. */
static int worker_limits(worker *w, err *e) {
    peft *p = w->t->p;
    wire_expect *t = calloc((size_t)(p->n_tensors ? p->n_tensors : 1), sizeof *t);
    if (!t) return err_set(e, "out of memory");
    for (int i = 0; i < p->n_tensors; i++) {
        t[i].name = p->tensors[i].name;
        t[i].ndim = p->tensors[i].ndim;
        for (int d = 0; d < t[i].ndim; d++) t[i].shape[d] = p->tensors[i].shape[d];
    }
    int rc = wire_limits_for(&w->lim, t, p->n_tensors, e);
    free(t);
    return rc;
}

/* ---- the host ----------------------------------------------------------------------- */

int worker_host_create(worker_host **out, err *e) {
    *out = NULL;
    worker_host *h = calloc(1, sizeof *h);
    if (!h) return err_set(e, "out of memory");
    pthread_mutex_init(&h->mu, NULL);
    h->hb_s = 1.0;
    if (httpd_create(&h->http, e) < 0 || httpd_worker_metrics_init(h->http, &h->hm, e) < 0) {
        httpd_close(h->http);
        pthread_mutex_destroy(&h->mu);
        free(h);
        return -1;
    }
    *out = h;
    return 0;
}

void worker_host_free(worker_host *h) {
    if (!h) return;
    httpd_close(h->http);
    if (h->ctx) zmq_ctx_term(h->ctx);
    free(h->jobs);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

static int host_add(worker_host *h, worker *w, err *e) {
    if (h->n_jobs == h->cap_jobs) {
        int cap = h->cap_jobs ? 2 * h->cap_jobs : 4;
        worker **j = realloc(h->jobs, (size_t)cap * sizeof *j);
        if (!j) return err_set(e, "out of memory");
        h->jobs = j;
        h->cap_jobs = cap;
    }
    h->jobs[h->n_jobs++] = w;
    httpd_set(h->hm.experiments, h->n_jobs);
    if (w->hb_s < h->hb_s) h->hb_s = w->hb_s;
    return 0;
}

static void host_remove(worker_host *h, worker *w) {
    for (int i = 0; i < h->n_jobs; i++)
        if (h->jobs[i] == w) {
            memmove(&h->jobs[i], &h->jobs[i + 1], (size_t)(h->n_jobs - i - 1) * sizeof *h->jobs);
            h->n_jobs--;
            httpd_set(h->hm.experiments, h->n_jobs);
            return;
        }
}

/* ---- one experiment ----------------------------------------------------------------- */

/* The experiment's side of a worker: its servers, keys and timeouts, the
 * method over `files` (opened here when NULL). */
static int job_open(worker **out, worker_host *h, const Peftps__Experiment *exp, const char *exp_fp,
                    model_files *files, err *e) {
    *out = NULL;
    const Peftps__Cluster *cl = exp->cluster;
    worker *w = calloc(1, sizeof *w);
    if (!w) return err_set(e, "out of memory");
    w->host = h;
    w->exp = exp;
    w->n_conns = (int)cl->n_servers;
    w->hb_s = cl->heartbeat_ms / 1000.0;
    w->timeout_s = cl->worker_timeout_ms / 1000.0;
    w->refreshed = NO_VERSION;
    w->share = 1.0;
    if (exp_fp)
        snprintf(w->exp_fp, sizeof w->exp_fp, "%s", exp_fp);
    else
        config_fingerprint(exp, w->exp_fp);
    char host[64] = "?";
    gethostname(host, sizeof host - 1);
    snprintf(w->id, sizeof w->id, "%s:%d", host, (int)getpid());
    w->conns = calloc((size_t)w->n_conns, sizeof *w->conns);
    w->a_shards = calloc(exp->data->shards_per_step, sizeof *w->a_shards);
    if (!w->conns || !w->a_shards) {
        err_set(e, "out of memory");
        goto fail;
    }
    for (int i = 0; i < w->n_conns; i++) {
        w->conns[i].index = i;
        w->conns[i].endpoint = cl->servers[i];
        w->conns[i].version = NO_VERSION;
        w->conns[i].bytes_out = h->hm.bytes_out;
    }
    if (cl->curve && (cl->curve->worker_keys || cl->curve->server_keys)) {
        curve_keys sk;
        if (!cl->curve->worker_keys || !cl->curve->server_keys) {
            err_set(e, "cluster.curve needs both worker_keys and server_keys on a worker");
            goto fail;
        }
        if (curve_keys_load(&w->mine, cl->curve->worker_keys, 1, e) < 0) {
            err_wrap(e, "cluster.curve.worker_keys");
            goto fail;
        }
        /* Only the server's public key is needed here: its .pub file will do. */
        if (curve_keys_load(&sk, cl->curve->server_keys, 0, e) < 0) {
            err_wrap(e, "cluster.curve.server_keys");
            goto fail;
        }
        memcpy(w->server_public, sk.public_key, sizeof w->server_public);
        curve_keys_wipe(&sk);
        w->curve = 1;
    }
    if (trainer_open_files(&w->t, exp, files, 0, e) < 0) goto fail;
    if (worker_limits(w, e) < 0) goto fail;
    double table_bytes = (double)peft_num_trainable(w->t->p) * sizeof(float);
    double transfer_s = table_bytes * 8.0 / (cl->min_transfer_mbit_s * 1e6);
    w->silence_s = w->timeout_s + transfer_s;
    if (transfer_s >= 1.0)
        log_info("tensors of %.1f MB each way: a server may be silent for %.1f s "
                 "(cluster.worker_timeout_ms plus their transfer at cluster.min_transfer_mbit_s "
                 "%u)",
                 table_bytes / 1e6, w->silence_s, cl->min_transfer_mbit_s);
    if (host_add(h, w, e) < 0) goto fail;
    *out = w;
    return 0;
fail:
    worker_close_job(w);
    return -1;
}

int worker_open(worker **out, const Peftps__Experiment *exp, err *e) {
    *out = NULL;
    worker_host *h;
    if (worker_host_create(&h, e) < 0) return -1;
    worker *w;
    if (job_open(&w, h, exp, NULL, NULL, e) < 0) {
        worker_host_free(h);
        return -1;
    }
    w->owns_host = 1;
    log_info("%s: worker %s ready (%s, %zu trainable parameters)", exp->name, w->id,
             w->t->p->method->name, peft_num_trainable(w->t->p));
    *out = w;
    return 0;
}

int worker_open_job(worker **out, worker_host *h, const char *job_id, const Peftps__Experiment *exp,
                    const char *exp_fp, model_files *files, double share, err *e) {
    if (job_open(out, h, exp, exp_fp, files, e) < 0) return -1;
    snprintf((*out)->job, sizeof(*out)->job, "%s", job_id);
    (*out)->share = share > 0 ? share : 1.0;
    log_info("job %s: serving it (%s, %zu trainable parameters, share %g)", job_id,
             (*out)->t->p->method->name, peft_num_trainable((*out)->t->p), (*out)->share);
    return 0;
}

const char *worker_job_id(const worker *w) {
    return w->job;
}

int worker_ended(const worker *w) {
    return w->ended;
}

void worker_take_usage(worker *w, double *seconds, uint64_t *shards) {
    *seconds = w->unsent_s;
    *shards = w->unsent_shards;
    w->unsent_s = 0;
    w->unsent_shards = 0;
}

static void conn_forget(conn *c) {
    free(c->tidx);
    free(c->expect);
    free(c->push);
    c->tidx = NULL;
    c->expect = NULL;
    c->push = NULL;
    c->n = 0;
}

static void conn_close(conn *c) {
    if (c->sock) zmq_close(c->sock);
    c->sock = NULL;
    c->registered = 0;
    c->pulled = 0;
}

void worker_close_job(worker *w) {
    if (!w) return;
    if (w->host) host_remove(w->host, w);
    for (int i = 0; i < w->n_conns && w->conns; i++) {
        conn_close(&w->conns[i]);
        conn_forget(&w->conns[i]);
    }
    free(w->conns);
    free(w->a_shards);
    trainer_close(w->t);
    curve_keys_wipe(&w->mine);
    free(w);
}

void worker_close(worker *w) {
    if (!w) return;
    worker_host *h = w->owns_host ? w->host : NULL;
    worker_close_job(w);
    worker_host_free(h);
}

/* ---- sending ------------------------------------------------------------------------ */

static int send_msg(conn *c, const Peftps__Wire__Envelope *env, const wire_tensor *t, int n) {
    err e;
    if (!c->sock) return -1;
    if (wire_send(c->sock, NULL, 0, env, t, n, &e) < 0) {
        log_warn("sending %s to server %d (%s): %s", wire_body_name(env->body_case), c->index,
                 c->endpoint, e.msg);
        return -1;
    }
    c->last_sent = progress_now();
    uint64_t nb = protobuf_c_message_get_packed_size(&env->base);
    for (int i = 0; i < n; i++) nb += t[i].nbytes;
    httpd_add(c->bytes_out, (double)nb);
    return 0;
}

static void send_hello(worker *w, conn *c) {
    wire_out o;
    c->hello_at = progress_now();
    c->registered = 0;
    Peftps__Wire__Envelope *env = wire_hello(&o, w->id, model_files_fingerprint(w->t->files),
                                             w->exp_fp, w->id, (uint32_t)getpid());
    /* The compute this worker runs, or, when its CPU cannot, what it lacks:
     * the server refuses it then, saying why. */
    err ce;
    if (train_compute_check(w->exp, &ce) == 0)
        o.body.hello.compute = (char *)train_compute_name(train_compute(w->exp));
    else
        o.body.hello.missing_isa = "AVX512-BF16";
    send_msg(c, env, NULL, 0);
}

static void send_pull(conn *c) {
    wire_out o;
    Peftps__Wire__Envelope *env = wire_pull(&o, c->version);
    /* No version held: an absent field, so the server sends everything. */
    if (c->version == NO_VERSION) o.body.pull.has_have_version = 0;
    if (send_msg(c, env, NULL, 0) == 0) c->pulled = 1;
}

/* A new DEALER to the server, and Hello on it. */
static int conn_open(worker *w, conn *c, err *e) {
    c->sock = zmq_socket(w->host->ctx, ZMQ_DEALER);
    if (!c->sock) return err_set(e, "zmq_socket: %s", zmq_strerror(errno));
    int linger = 0, sndtimeo = (int)w->exp->cluster->worker_timeout_ms;
    int ivl = BACKOFF_FIRST_MS, ivl_max = BACKOFF_CAP_MS;
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    /* A send never blocks longer than a server may stay silent. */
    zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    /* ZeroMQ's own reconnects back off the same way as ours. */
    zmq_setsockopt(c->sock, ZMQ_RECONNECT_IVL, &ivl, sizeof ivl);
    zmq_setsockopt(c->sock, ZMQ_RECONNECT_IVL_MAX, &ivl_max, sizeof ivl_max);
    if (wire_set_limits(c->sock, w->lim.max_message_bytes, e) < 0) return -1;
    if (w->curve && curve_client_setup(c->sock, &w->mine, w->server_public, e) < 0) return -1;
    if (zmq_connect(c->sock, c->endpoint) < 0)
        return err_set(e, "connecting to %s: %s", c->endpoint, zmq_strerror(errno));
    c->last_heard = progress_now();
    send_hello(w, c);
    return 0;
}

/* Gives up on the connection and schedules a new one after the backoff. */
static void conn_retry(worker *w, conn *c, const char *why) {
    int ms = BACKOFF_FIRST_MS;
    for (int i = 0; i < c->attempts && ms < BACKOFF_CAP_MS; i++) ms *= 2;
    if (ms > BACKOFF_CAP_MS) ms = BACKOFF_CAP_MS;
    c->attempts++;
    log_warn("server %d (%s): %s; reconnecting in %.1f s", c->index, c->endpoint, why, ms / 1000.0);
    conn_close(c);
    c->retry_at = progress_now() + ms / 1000.0;
    if (c->index == 0) w->have_assign = 0;
}

/* ---- receiving ---------------------------------------------------------------------- */

/* Checks a server's table against this worker's method and keeps the
 * mapping from its order to ours. */
static int on_welcome(worker *w, conn *c, const wire_msg *m, err *e) {
    const Peftps__Wire__Welcome *wl = m->env->welcome;
    peft *p = w->t->p;
    if (wl->server_index != (uint32_t)c->index || wl->num_servers != (uint32_t)w->n_conns)
        return err_set(e, "%s says it is server %u of %u, but cluster.servers lists it as %d of %d",
                       c->endpoint, wl->server_index, wl->num_servers, c->index, w->n_conns);
    conn_forget(c);
    c->n = m->n_tensors;
    c->tidx = calloc((size_t)(c->n ? c->n : 1), sizeof *c->tidx);
    c->expect = calloc((size_t)(c->n ? c->n : 1), sizeof *c->expect);
    c->push = calloc((size_t)(c->n ? c->n : 1), sizeof *c->push);
    if (!c->tidx || !c->expect || !c->push) return err_set(e, "out of memory");
    for (int i = 0; i < c->n; i++) {
        const wire_view *v = &m->tensors[i];
        int k = peft_find_tensor(p, v->name);
        if (k < 0)
            return err_set(e, "server %d holds tensor %s, which this worker's %s does not train",
                           c->index, v->name, p->method->name);
        const peft_tensor *pt = &p->tensors[k];
        int same = v->dtype == PEFTPS__WIRE__DTYPE__F32 && v->ndim == pt->ndim;
        for (int d = 0; same && d < pt->ndim; d++) same = v->shape[d] == pt->shape[d];
        if (!same)
            return err_set(e, "server %d's tensor %s differs in shape or dtype from this worker's",
                           c->index, v->name);
        c->tidx[i] = k;
        c->expect[i].name = pt->name;
        c->expect[i].ndim = pt->ndim;
        c->push[i].name = pt->name;
        c->push[i].dtype = PEFTPS__WIRE__DTYPE__F32;
        c->push[i].ndim = pt->ndim;
        for (int d = 0; d < pt->ndim; d++)
            c->expect[i].shape[d] = c->push[i].shape[d] = pt->shape[d];
        c->push[i].data = p->grads + pt->offset;
        c->push[i].nbytes = pt->numel * sizeof(float);
    }
    /* Together the servers must hold every tensor once. */
    int registered_all = 1, total = 0;
    for (int i = 0; i < w->n_conns; i++) {
        registered_all &= w->conns[i].registered || &w->conns[i] == c;
        total += w->conns[i].n;
    }
    if (registered_all && total != p->n_tensors)
        return err_set(e, "the servers hold %d tensors together, this worker's %s trains %d", total,
                       p->method->name, p->n_tensors);
    c->registered = 1;
    c->attempts = 0;
    c->version = NO_VERSION;
    log_info("registered with server %d (%s): %d tensors, version %llu", c->index, c->endpoint,
             c->n, (unsigned long long)wl->version);
    send_pull(c);
    return 0;
}

static void on_snapshot(worker *w, conn *c, const wire_msg *m) {
    err e;
    if (wire_check_tensors(m, c->expect, c->n, &e) < 0) {
        log_warn("server %d sent a bad snapshot: %s", c->index, e.msg);
        /* Ask again when an assignment needs this server's version. */
        c->version = NO_VERSION;
        c->pulled = 0;
        return;
    }
    peft *p = w->t->p;
    for (int i = 0; i < c->n; i++) {
        const peft_tensor *pt = &p->tensors[c->tidx[i]];
        if (wire_tensor_copy_f32(&m->tensors[i], p->params + pt->offset, pt->numel, &e) < 0) {
            log_warn("server %d sent a bad snapshot: %s", c->index, e.msg);
            c->version = NO_VERSION;
            c->pulled = 0;
            return;
        }
    }
    c->version = m->env->snapshot->version;
    c->pulled = 0;
    w->refreshed = NO_VERSION;
}

static void on_assign(worker *w, conn *c, const wire_msg *m) {
    const Peftps__Wire__Assign *a = m->env->assign;
    uint32_t S = w->exp->data->shards_per_step;
    if (c->index != 0 || a->n_shards == 0 || a->n_shards > S) {
        log_warn("server %d sent an assignment this worker cannot take", c->index);
        return;
    }
    for (size_t i = 0; i < a->n_shards; i++) {
        if (a->shards[i] >= S) {
            log_warn("server 0 assigned shard %u of %u", a->shards[i], S);
            return;
        }
        w->a_shards[i] = a->shards[i];
    }
    w->a_n = a->n_shards;
    w->a_step = a->step;
    w->a_version = a->version;
    w->have_assign = 1;
}

/* 0: go on; 1: shut down; -1: refused for good. */
static int on_error(worker *w, conn *c, const wire_msg *m, err *e) {
    const Peftps__Wire__Error *er = m->env->error;
    const char *text = er->message ? er->message : "";
    if (!c->registered && (er->code == PEFTPS__WIRE__ERROR_CODE__FINGERPRINT_MISMATCH ||
                           er->code == PEFTPS__WIRE__ERROR_CODE__MALFORMED ||
                           er->code == PEFTPS__WIRE__ERROR_CODE__UNAUTHORIZED ||
                           er->code == PEFTPS__WIRE__ERROR_CODE__UNSUPPORTED_CPU))
        return err_set(e, "server %d (%s) refused this worker: %s", c->index, c->endpoint, text);
    if (er->code == PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED) {
        /* The server restarted or dropped us: register again. */
        log_info("server %d: %s; registering again", c->index, text);
        send_hello(w, c);
        if (c->index == 0) w->have_assign = 0;
        return 0;
    }
    log_warn("server %d: %s", c->index, text);
    if (c->registered && c->index == 0) {
        w->have_assign = 0;
        send_pull(c);
    }
    return 0;
}

/* 0: go on; 1: shut down; -1: fatal. */
static int on_message(worker *w, conn *c, const wire_msg *m, err *e) {
    c->last_heard = progress_now();
    httpd_add(w->host->hm.bytes_in, (double)m->bytes);
    int body = m->env->body_case;
    if (body == PEFTPS__WIRE__ENVELOPE__BODY_SHUTDOWN) {
        const char *r = m->env->shutdown->reason;
        log_info("server %d says stop: %s", c->index, r ? r : "");
        return 1;
    }
    if (body == PEFTPS__WIRE__ENVELOPE__BODY_ERROR) return on_error(w, c, m, e);
    if (body == PEFTPS__WIRE__ENVELOPE__BODY_HEARTBEAT) return 0;
    if (body == PEFTPS__WIRE__ENVELOPE__BODY_WELCOME) return on_welcome(w, c, m, e);
    if (!c->registered) return 0; /* left over from before a re-registration */
    if (body == PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT)
        on_snapshot(w, c, m);
    else if (body == PEFTPS__WIRE__ENVELOPE__BODY_ASSIGN)
        on_assign(w, c, m);
    else
        log_warn("server %d sent an unexpected %s", c->index, wire_body_name(body));
    return 0;
}

/* ---- computing ---------------------------------------------------------------------- */

static void *hb_main(void *arg) {
    worker_host *h = arg;
    struct timespec nap = {0, (long)(h->hb_s * 1e9 / 4)};
    if (nap.tv_nsec > 250000000L) nap.tv_nsec = 250000000L;
    while (!atomic_load(&h->quit)) {
        nanosleep(&nap, NULL);
        if (!atomic_load(&h->busy)) continue;
        httpd_heartbeat(h->http);
        pthread_mutex_lock(&h->mu);
        double now = progress_now();
        for (int j = 0; atomic_load(&h->busy) && j < h->n_jobs; j++) {
            worker *w = h->jobs[j];
            for (int i = 0; i < w->n_conns; i++) {
                conn *c = &w->conns[i];
                if (!c->registered || now - c->last_sent < w->hb_s) continue;
                wire_out o;
                send_msg(c, wire_heartbeat(&o, c->version, 0), NULL, 0);
            }
        }
        if (atomic_load(&h->busy) && h->pool) pool_heartbeat(h);
        pthread_mutex_unlock(&h->mu);
    }
    return NULL;
}

/* Ready when every server is registered and at the assignment's version. */
static int assignment_ready(worker *w) {
    if (!w->have_assign || w->ended) return 0;
    int ready = 1;
    for (int i = 0; i < w->n_conns; i++) {
        conn *c = &w->conns[i];
        if (!c->registered) return 0;
        if (c->version != w->a_version) {
            ready = 0;
            if (!c->pulled) send_pull(c);
        }
    }
    return ready;
}

/* Ends a pool's job for this worker (a single experiment's failure is the
 * process's, returned to the caller instead). */
static void job_fail(worker *w, const err *e) {
    log_error("job %s: %s; this worker leaves it", w->job, e->msg);
    w->ended = -1;
    w->have_assign = 0;
    for (int i = 0; i < w->n_conns; i++) conn_close(&w->conns[i]);
}

/* Pushes the gradient of w's shard i to every server. */
static void push_shard(worker *w, size_t i, double loss, long ntok) {
    for (int k = 0; k < w->n_conns; k++) {
        conn *c = &w->conns[k];
        wire_out o;
        if (send_msg(
                c,
                wire_grad_push(&o, w->a_step, w->a_version, w->a_shards[i], loss, (uint64_t)ntok),
                c->push, c->n) < 0)
            conn_retry(w, c, "cannot push");
    }
}

/* Counts what co-batching did in a round of k experiments, and says so
 * every COBATCH_LOG_S seconds while it shares products. */
#define COBATCH_LOG_S 10.0
static void cobatch_note(worker_host *h, const cobatch_stats *did, int k) {
    httpd_add(h->hm.cobatched_products, (double)did->products_in);
    httpd_add(h->hm.shared_calls, (double)did->calls_shared);
    h->co_rounds += k > 1;
    h->co_products += did->products_in;
    h->co_calls += did->calls_shared;
    h->co_rows += did->rows_shared;
    h->co_alone += did->products_alone + did->products_f32;
    double now = progress_now();
    if (h->co_products && (!h->co_logged || now - h->co_logged >= COBATCH_LOG_S)) {
        log_info("co-batched %llu frozen products of experiments computed together into %llu "
                 "calls (%.0f rows each on average); %llu not concatenated (F32 calls, run side "
                 "by side in team jobs; BF16 ones without a partner)",
                 (unsigned long long)h->co_products, (unsigned long long)h->co_calls,
                 h->co_calls ? (double)h->co_rows / (double)h->co_calls : 0.0,
                 (unsigned long long)h->co_alone);
        h->co_logged = now;
    }
}

/* Computes the assigned shards of the n ready experiments ws and pushes
 * each to every server: the i-th shards of all of them together (one
 * trainer_shard_grad_many), then the next; called with the mutex held,
 * which it lends to the heartbeat thread meanwhile. Shards of one
 * experiment never share a call (they share its gradient buffer). */
static int compute(worker_host *h, worker **ws, int n, err *e) {
    train_shard_job *jobs = calloc((size_t)n, sizeof *jobs);
    worker **who = calloc((size_t)n, sizeof *who);
    if (!jobs || !who) {
        free(jobs);
        free(who);
        return err_set(e, "out of memory");
    }
    size_t most = 0;
    for (int j = 0; j < n; j++) {
        if (ws[j]->refreshed != ws[j]->a_version) {
            peft_refresh(ws[j]->t->p);
            ws[j]->refreshed = ws[j]->a_version;
        }
        if (ws[j]->a_n > most) most = ws[j]->a_n;
    }
    int rc = 0;
    for (size_t i = 0; i < most && rc == 0; i++) {
        int k = 0;
        long rows = 0;
        for (int j = 0; j < n; j++) {
            if (ws[j]->a_n <= i || ws[j]->ended) continue;
            jobs[k] = (train_shard_job){
                .t = ws[j]->t, .step = ws[j]->a_step, .shard = ws[j]->a_shards[i]};
            rows += (long)ws[j]->t->rows * ws[j]->t->T;
            who[k++] = ws[j];
        }
        if (!k) break;
        atomic_store(&h->busy, 1);
        pthread_mutex_unlock(&h->mu);
        double t0 = progress_now();
        cobatch_stats before, after, did;
        cobatch_stats_get(&before);
        trainer_shard_grad_many(jobs, k, h->cobatch);
        cobatch_stats_get(&after);
        double dt = progress_now() - t0;
        pthread_mutex_lock(&h->mu);
        atomic_store(&h->busy, 0);
        cobatch_stats_diff(&did, &after, &before);
        cobatch_note(h, &did, k);
        httpd_observe(h->hm.compute_seconds, dt);
        httpd_set_memory(h->hm.private_bytes, h->hm.mapped_bytes);
        for (int j = 0; j < k; j++) {
            worker *w = who[j];
            if (jobs[j].rc < 0) {
                if (!h->pool) {
                    *e = jobs[j].e;
                    rc = -1;
                    break;
                }
                job_fail(w, &jobs[j].e);
                continue;
            }
            /* The round's time, to each experiment by its share of the rows. */
            double mine = dt * (double)w->t->rows * w->t->T / (double)rows;
            w->used_s += mine;
            w->unsent_s += mine;
            w->unsent_shards++;
            httpd_add(h->hm.shards, 1);
            httpd_add(h->hm.tokens, (double)jobs[j].n_tokens);
            httpd_set(h->hm.step, (double)w->a_step);
            push_shard(w, i, jobs[j].loss_sum, jobs[j].n_tokens);
        }
    }
    for (int j = 0; j < n; j++) ws[j]->have_assign = 0;
    free(jobs);
    free(who);
    return rc;
}

/* Which of the ready experiments compute now (base/fairshare.h), together
 * only where products are shared: moves them to the front of ready[] and
 * returns how many. */
static int pick(worker_host *h, worker **ready, int n, double round_s) {
    double *used = malloc((size_t)n * 2 * sizeof *used);
    int *chosen = malloc((size_t)n * sizeof *chosen);
    worker **order = malloc((size_t)n * sizeof *order);
    if (!used || !chosen || !order) {
        free(used);
        free(chosen);
        free(order);
        return 1; /* the first ready one: never wrong, only less fair */
    }
    for (int j = 0; j < n; j++) {
        used[j] = ready[j]->used_s;
        used[n + j] = ready[j]->share;
    }
    int k = fairshare_pick(used, used + n, n, h->cobatch, round_s, chosen);
    /* Together only with what shares the first one's products: BF16
     * compute over the same base (F32 products are never shared, and a
     * round pushes its shards only at its end, so grouping F32 shards
     * would only delay them). */
    const worker *first = ready[chosen[0]];
    int kept = 1;
    for (int j = 1; j < k; j++) {
        const worker *o = ready[chosen[j]];
        if (train_compute(first->exp) == MODEL_COMPUTE_BF16 &&
            train_compute(o->exp) == MODEL_COMPUTE_BF16 && o->t->files == first->t->files)
            chosen[kept++] = chosen[j];
    }
    k = kept;
    int m = 0;
    for (int j = 0; j < k; j++) order[m++] = ready[chosen[j]];
    for (int j = 0; j < n; j++) {
        int in = 0;
        for (int c = 0; c < k && !in; c++) in = chosen[c] == j;
        if (!in) order[m++] = ready[j];
    }
    memcpy(ready, order, (size_t)n * sizeof *ready);
    free(used);
    free(chosen);
    free(order);
    return k;
}

/* ---- the loop ----------------------------------------------------------------------- */

/* Opens the connections that are due: 0, or -1 when ZeroMQ fails. */
static int job_connect(worker *w, double now, err *e) {
    for (int i = 0; i < w->n_conns && !w->ended; i++) {
        conn *c = &w->conns[i];
        if (!c->sock && now >= c->retry_at && conn_open(w, c, e) < 0) return -1;
    }
    return 0;
}

/* Silence and heartbeats of w's connections. */
static void job_timers(worker *w, double now) {
    for (int i = 0; i < w->n_conns && !w->ended; i++) {
        conn *c = &w->conns[i];
        if (!c->sock) continue;
        if (c->registered && now - c->last_heard > w->silence_s) {
            conn_retry(w, c,
                       "silent for longer than cluster.worker_timeout_ms plus a transfer "
                       "of the tensors at cluster.min_transfer_mbit_s");
        } else if (!c->registered && now - c->hello_at > w->silence_s) {
            conn_retry(w, c, "no answer to Hello");
        } else if (c->registered && now - c->last_sent >= w->hb_s) {
            wire_out o;
            send_msg(c, wire_heartbeat(&o, c->version, 0), NULL, 0);
        }
    }
}

/* The messages waiting on c: 0 go on, 1 the server said the run is over,
 * -1 fatal (refused for good) with e set. */
static int job_read(worker *w, conn *c, err *e) {
    int rc = 0;
    for (int k = 0; k < 64 && c->sock && rc == 0; k++) {
        wire_msg m;
        memset(&m, 0, sizeof m);
        err me;
        if (wire_recv(c->sock, 0, &m, &w->lim, &me) < 0) {
            if (m.received) log_warn("server %d sent a bad message: %s", c->index, me.msg);
        } else {
            rc = on_message(w, c, &m, e);
        }
        wire_msg_close(&m);
        int ev = 0;
        size_t evn = sizeof ev;
        if (rc || !c->sock || zmq_getsockopt(c->sock, ZMQ_EVENTS, &ev, &evn) < 0 ||
            !(ev & ZMQ_POLLIN))
            break;
    }
    return rc;
}

/* A pool's job whose server said stop: the job's end is the coordinator's
 * to say (its list drops it), and a server that stops may be restarted
 * from its checkpoint; so this worker only reconnects, after the backoff. */
static void job_server_stopped(worker *w) {
    for (int i = 0; i < w->n_conns; i++)
        if (w->conns[i].sock) conn_retry(w, &w->conns[i], "the server stopped");
}

typedef struct poll_set {
    zmq_pollitem_t *items;
    worker **wof;
    conn **cof;
    int n, cap;
} poll_set;

static int poll_add(poll_set *ps, void *sock, worker *w, conn *c) {
    if (ps->n == ps->cap) {
        int cap = ps->cap ? 2 * ps->cap : 16;
        zmq_pollitem_t *it = realloc(ps->items, (size_t)cap * sizeof *it);
        if (!it) return -1;
        ps->items = it;
        worker **wo = realloc(ps->wof, (size_t)cap * sizeof *wo);
        if (!wo) return -1;
        ps->wof = wo;
        conn **co = realloc(ps->cof, (size_t)cap * sizeof *co);
        if (!co) return -1;
        ps->cof = co;
        ps->cap = cap;
    }
    ps->items[ps->n] = (zmq_pollitem_t){sock, 0, ZMQ_POLLIN, 0};
    ps->wof[ps->n] = w;
    ps->cof[ps->n++] = c;
    return 0;
}

static int loop(worker_host *h, err *e) {
    poll_set ps = {0};
    worker **ready = NULL;
    int cap_ready = 0, rc = 0;
    double round_s = 0;
    long tick_ms = (long)(h->hb_s * 1000 / 4);
    if (tick_ms < 5) tick_ms = 5;
    if (tick_ms > 250) tick_ms = 250;
    while (!stop_requested && rc == 0) {
        double now = progress_now();
        for (int j = 0; j < h->n_jobs && rc == 0; j++)
            if (job_connect(h->jobs[j], now, e) < 0) rc = -1;
        if (rc) break;
        if (cap_ready < h->n_jobs) {
            worker **r = realloc(ready, (size_t)h->n_jobs * sizeof *r);
            if (!r) {
                rc = err_set(e, "out of memory");
                break;
            }
            ready = r;
            cap_ready = h->n_jobs;
        }
        int nr = 0;
        for (int j = 0; j < h->n_jobs; j++)
            if (assignment_ready(h->jobs[j])) ready[nr++] = h->jobs[j];
        if (nr) {
            int k = pick(h, ready, nr, round_s);
            double t0 = progress_now();
            if (compute(h, ready, k, e) < 0) {
                rc = -1;
                break;
            }
            round_s = progress_now() - t0;
            continue;
        }
        ps.n = 0;
        void *psock = h->pool ? pool_socket(h->pool) : NULL;
        if (psock && poll_add(&ps, psock, NULL, NULL) < 0) rc = err_set(e, "out of memory");
        for (int j = 0; j < h->n_jobs && rc == 0; j++)
            for (int i = 0; i < h->jobs[j]->n_conns; i++)
                if (h->jobs[j]->conns[i].sock &&
                    poll_add(&ps, h->jobs[j]->conns[i].sock, h->jobs[j], &h->jobs[j]->conns[i]) < 0)
                    rc = err_set(e, "out of memory");
        if (rc) break;
        int pr = zmq_poll(ps.items, ps.n, tick_ms);
        if (pr < 0) {
            if (errno == EINTR) continue;
            rc = err_set(e, "zmq_poll: %s", zmq_strerror(errno));
            break;
        }
        for (int j = 0; j < ps.n && pr > 0 && rc == 0; j++) {
            if (!(ps.items[j].revents & ZMQ_POLLIN)) continue;
            if (!ps.cof[j]) {
                if (pool_on_readable(h, e) < 0) rc = -1;
                continue;
            }
            worker *w = ps.wof[j];
            if (w->ended || !ps.cof[j]->sock) continue;
            err je;
            int r = job_read(w, ps.cof[j], &je);
            if (r == 1 && !h->pool)
                rc = 1;
            else if (r == 1)
                job_server_stopped(w);
            else if (r < 0 && !h->pool) {
                *e = je;
                rc = -1;
            } else if (r < 0)
                job_fail(w, &je);
        }
        if (rc) break;
        /* Ready: registered with every server and holding their tensors. */
        int nreg = 0, nconn = 0, held = 1;
        for (int j = 0; j < h->n_jobs; j++)
            for (int i = 0; i < h->jobs[j]->n_conns; i++) {
                nconn++;
                nreg += h->jobs[j]->conns[i].registered;
                held &= h->jobs[j]->conns[i].version != NO_VERSION;
            }
        httpd_set(h->hm.servers, nreg);
        httpd_set_ready(h->http, h->pool ? pool_socket(h->pool) != NULL : nreg == nconn && held);
        httpd_heartbeat(h->http);
        log_flush();
        now = progress_now();
        for (int j = 0; j < h->n_jobs; j++) job_timers(h->jobs[j], now);
        if (h->pool && pool_tick(h, e) < 0) rc = -1;
    }
    free(ps.items);
    free(ps.wof);
    free(ps.cof);
    free(ready);
    if (rc < 0) return -1;
    return rc == 1 ? 0 : 1;
}

int worker_host_run(worker_host *h, err *e) {
    h->ctx = zmq_ctx_new();
    if (!h->ctx) return err_set(e, "zmq_ctx_new: %s", zmq_strerror(errno));
    httpd_set_memory(h->hm.private_bytes, h->hm.mapped_bytes);
    pthread_mutex_lock(&h->mu);
    if (pthread_create(&h->hb_thread, NULL, hb_main, h) != 0) {
        pthread_mutex_unlock(&h->mu);
        return err_set(e, "starting the heartbeat thread failed");
    }
    h->hb_started = 1;
    int rc = loop(h, e);
    atomic_store(&h->quit, 1);
    pthread_mutex_unlock(&h->mu);
    pthread_join(h->hb_thread, NULL);
    h->hb_started = 0;
    return rc;
}

void worker_linger(worker *w) {
    log_info("the run is over; idle until SIGINT or SIGTERM (--linger)");
    while (!stop_requested) {
        httpd_heartbeat(w->host->http);
        struct timespec ts = {0, 250 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

int worker_run(worker *w, err *e) {
    /* Metrics are for watching, not for training: a port that is taken
     * (workers beside a server on one machine) costs a warning, not the run. */
    unsigned mport = w->exp->cluster->metrics_port;
    httpd *http = w->host->http;
    err he;
    if (mport && !httpd_port(http) && httpd_listen(http, NULL, mport, &he) < 0)
        log_warn("cluster.metrics_port: %s; no /healthz or /metrics", he.msg);
    else if (mport)
        log_info("serving /healthz, /livez and /metrics on port %u", mport);
    httpd_set_liveness(http, 60.0 + 10.0 * w->timeout_s);
    return worker_host_run(w->host, e);
}
