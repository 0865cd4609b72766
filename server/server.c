/* The parameter server's state machine (see server.h): a ROUTER socket, a
 * table of registered workers, the shard slots of the current step, and the
 * event loop that ties them together with visible timeouts and heartbeats.
 * Arithmetic is common/train/train.h's, so a step gives the bits of trainer_step;
 * with several servers, peers.c joins their norms. */
#include "internal.h"

#include <errno.h>
#include <malloc.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zmq.h>

#include "config/config.h"
#include "base/crc32c.h"
#include "base/fsutil.h"
#include "base/log.h"
#include "train/metrics.h"
#include "train/optim.h"
#include "config/pbtext.h"

/* More registrations than this are refused: a table that any peer can grow
 * must have a bound. */
#define SERVER_MAX_WORKERS 4096
/* Linger on close, so that the last Shutdown messages leave. */
#define SERVER_LINGER_MS 2000
/* ASYNC hands out shards of at most this many steps at once. */
#define ASYNC_WINDOW 4
/* A worker whose pushes are refused this many times for non-finite or
 * absurd values is dropped, and its identity refused. */
#define SERVER_MAX_OFFENCES 3
/* A push whose per-token gradient norm exceeds this many times the largest
 * of the previous and current step's accepted pushes is absurd: refused
 * unless another worker computes the same bits. */
#define SERVER_PUSH_NORM_FACTOR 1e4
/* Before any push is accepted (a new run, a restarted server) there is no
 * scale: a per-token norm above this is absurd for any model that trains. */
#define SERVER_PUSH_NORM_FIRST 1e6
/* Seconds between returns of free heap memory to the system. */
#define SERVER_TRIM_S 2.0

static volatile sig_atomic_t stop_requested, reload_requested;

void server_stop(void) {
    stop_requested = 1;
}

void server_reload_keys(void) {
    reload_requested = 1;
}

/* Passes a reload request on to the ZAP handler (which reads the file). */
static void reload_keys(server *s) {
    if (!reload_requested) return;
    reload_requested = 0;
    if (s->zap)
        curve_zap_reload(s->zap);
    else
        server_log(s, LOG_WARN,
                   "asked to reload authorized keys, but this server runs without CURVE");
}

/* ---- layout ------------------------------------------------------------------------ */

/* Which server holds each tensor: largest first, each to the server holding
 * the fewest floats so far (lowest index on ties). Every server computes it
 * from the same table; workers learn it from each server's Welcome. */
static int partition(const peft_tensor *t, int n, int n_servers, int *owner) {
    int *order = malloc((size_t)(n ? n : 1) * sizeof *order);
    size_t *load = calloc((size_t)n_servers, sizeof *load);
    if (!order || !load) {
        free(order);
        free(load);
        return -1;
    }
    for (int i = 0; i < n; i++) order[i] = i;
    /* Insertion sort by numel descending, index ascending: stable and small. */
    for (int i = 1; i < n; i++) {
        int k = order[i], j = i - 1;
        while (j >= 0 && t[order[j]].numel < t[k].numel) {
            order[j + 1] = order[j];
            j--;
        }
        order[j + 1] = k;
    }
    for (int i = 0; i < n; i++) {
        int best = 0;
        for (int s = 1; s < n_servers; s++)
            if (load[s] < load[best]) best = s;
        owner[order[i]] = best;
        load[best] += t[order[i]].numel;
    }
    free(order);
    free(load);
    return 0;
}

static void expect_of(wire_expect *x, const peft_tensor *t) {
    x->name = t->name;
    x->ndim = t->ndim;
    for (int d = 0; d < t->ndim; d++) x->shape[d] = t->shape[d];
}

static int layout_build(server *s, err *e) {
    peft *p = s->t->p;
    int n = p->n_tensors, S = s->n_servers;
    s->n_global = n;
    s->owner = calloc((size_t)(n ? n : 1), sizeof *s->owner);
    s->kexpect = calloc((size_t)(n ? n : 1), sizeof *s->kexpect);
    s->kfirst = calloc((size_t)S, sizeof *s->kfirst);
    s->kcount = calloc((size_t)S, sizeof *s->kcount);
    s->tensors = calloc((size_t)(n ? n : 1), sizeof *s->tensors);
    s->gidx = calloc((size_t)(n ? n : 1), sizeof *s->gidx);
    s->sums = calloc((size_t)(n ? n : 1), sizeof *s->sums);
    if (!s->owner || !s->kexpect || !s->kfirst || !s->kcount || !s->tensors || !s->gidx ||
        !s->sums || partition(p->tensors, n, S, s->owner) < 0)
        return err_set(e, "out of memory");
    int at = 0;
    for (int k = 0; k < S; k++) {
        s->kfirst[k] = at;
        for (int i = 0; i < n; i++)
            if (s->owner[i] == k) expect_of(&s->kexpect[at++], &p->tensors[i]);
        s->kcount[k] = at - s->kfirst[k];
        if (s->kcount[k] == 0)
            return err_set(e,
                           "cluster.servers lists %d servers but the method trains only %d "
                           "tensors: server %d would hold none; use fewer servers",
                           S, n, k);
    }
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        if (s->owner[i] != s->opts.index) continue;
        s->gidx[s->n_tensors] = i;
        peft_tensor *lt = &s->tensors[s->n_tensors++];
        *lt = p->tensors[i];
        lt->offset = off;
        off += lt->numel;
    }
    s->n = off;
    size_t bytes = (s->n * sizeof(float) + 63) / 64 * 64;
    s->params = aligned_alloc(64, bytes);
    s->grad_sum = aligned_alloc(64, bytes);
    s->inbuf = aligned_alloc(64, bytes);
    s->out = calloc((size_t)s->n_tensors, sizeof *s->out);
    if (!s->params || !s->grad_sum || !s->inbuf || !s->out) return err_set(e, "out of memory");
    s->expect = s->kexpect + s->kfirst[s->opts.index];
    for (int i = 0; i < s->n_tensors; i++) {
        const peft_tensor *lt = &s->tensors[i];
        memcpy(s->params + lt->offset, peft_param(p, s->gidx[i]), lt->numel * sizeof(float));
        s->out[i].name = lt->name;
        s->out[i].dtype = PEFTPS__WIRE__DTYPE__F32;
        s->out[i].ndim = lt->ndim;
        for (int d = 0; d < lt->ndim; d++) s->out[i].shape[d] = lt->shape[d];
        s->out[i].data = s->params + lt->offset;
        s->out[i].nbytes = lt->numel * sizeof(float);
    }
    /* The largest message any server receives is the whole table (server
     * 0 collects every server's final tensors). */
    if (wire_limits_for(&s->lim, s->kexpect, n, e) < 0) return -1;
    if (optim_create(&s->opt, s->n, s->exp->optimizer, e) < 0) return -1;
    s->have_opt = 1;
    return 0;
}

/* ---- outputs ------------------------------------------------------------------------ */

static int write_experiment(const server *s, err *e) {
    char *text = NULL, path[4096];
    if (pbtext_print(&s->exp->base, &text, e) < 0) return -1;
    snprintf(path, sizeof path, "%s/experiment.pbtxt", s->exp->output_dir);
    int rc = fs_write_text(path, text, e);
    free(text);
    return rc;
}

/* Server 0 at the end: its own tensors (the others' came from peers.c)
 * back into the method, then saved. */
static int write_tensors(server *s, err *e) {
    peft *p = s->t->p;
    for (int i = 0; i < s->n_tensors; i++)
        memcpy(peft_param(p, s->gidx[i]), s->params + s->tensors[i].offset,
               s->tensors[i].numel * sizeof(float));
    char path[4096];
    snprintf(path, sizeof path, "%s/tensors.safetensors", s->exp->output_dir);
    if (peft_save(p, path, e) < 0) return -1;
    server_log(s, LOG_INFO, "wrote %s", path);
    return 0;
}

/* ---- checkpoints -------------------------------------------------------------------- */

static void ckpt_dir_of(const server *s, char *buf, size_t n) {
    if (s->n_servers == 1)
        snprintf(buf, n, "%s", s->exp->checkpoint->path);
    else
        snprintf(buf, n, "%s/server-%d", s->exp->checkpoint->path, s->opts.index);
}

static int checkpoint_write(server *s, err *e) {
    if (train_ckpt_write(s->ck, s->step, s->exp, s->exp_fp, s->base_fp, s->tensors, s->n_tensors,
                         s->params, s->n, &s->opt, e) < 0)
        return -1;
    /* A large checkpoint keeps this loop from reading for a while; the
     * workers' heartbeats wait in the socket meanwhile, so the silence was
     * ours, not theirs. */
    double now = progress_now();
    for (int i = 0; i < s->cap_workers; i++)
        if (s->workers[i].used && s->workers[i].last_seen < now) s->workers[i].last_seen = now;
    httpd_set(s->hm.checkpoint_step, (double)s->step);
    peers_own_steps(s);
    server_log(s, LOG_INFO, "checkpoint of step %llu written to %s", (unsigned long long)s->step,
               ckpt_dir(s->ck));
    return 0;
}

/* Opens the checkpoint directory and, with resume, restores the newest
 * checkpoint (or the one of --resume-step) through train_ckpt_resume; with
 * checkpoint.every_steps 0 checkpoints are off and nothing is opened. */
static int checkpoint_open(server *s, err *e) {
    if (!train_ckpt_enabled(s->exp)) {
        if (s->opts.resume_step != SERVER_RESUME_LATEST)
            return err_set(e, "--resume-step: checkpoints are off (checkpoint.every_steps is 0)");
        return 0;
    }
    char dir[4096];
    ckpt_dir_of(s, dir, sizeof dir);
    uint64_t want = s->opts.resume_step == SERVER_RESUME_LATEST ? CKPT_LATEST : s->opts.resume_step;
    uint64_t step;
    if (train_ckpt_resume(&s->ck, dir, s->exp, s->exp_fp, s->base_fp, s->tensors, s->n_tensors,
                          s->params, s->n, &s->opt, want, &step, e) < 0) {
        if (want != CKPT_LATEST) err_wrap(e, "--resume-step");
        return -1;
    }
    if (step == 0) return 0;
    s->step = step;
    s->version = s->opt.t;
    server_log(s, LOG_INFO, "resuming from the checkpoint of step %llu in %s",
               (unsigned long long)step, dir);
    return 0;
}

/* ---- open / close ------------------------------------------------------------------- */

int server_open(server **out, const Peftps__Experiment *exp, const server_opts *opts, err *e) {
    *out = NULL;
    const Peftps__Cluster *cl = exp->cluster;
    if (opts->index < 0 || (size_t)opts->index >= cl->n_servers)
        return err_set(e, "--index %d: cluster.servers has %zu entries", opts->index,
                       cl->n_servers);
    if (cl->sync != PEFTPS__SYNC_MODE__BSP && cl->n_servers > 1)
        return err_set(e, "cluster.sync: several servers need BSP (SSP and ASYNC run on one "
                          "server)");
    server *s = calloc(1, sizeof *s);
    if (!s) return err_set(e, "out of memory");
    s->exp = exp;
    s->opts = *opts;
    s->n_servers = (int)cl->n_servers;
    s->total = exp->schedule->total_steps;
    s->n_shards = exp->data->shards_per_step;
    s->sync = cl->sync;
    s->staleness = cl->staleness;
    s->window = s->sync == PEFTPS__SYNC_MODE__SSP     ? s->staleness + 1
                : s->sync == PEFTPS__SYNC_MODE__ASYNC ? ASYNC_WINDOW
                                                      : 1;
    s->hb_s = cl->heartbeat_ms / 1000.0;
    s->timeout_s = cl->worker_timeout_ms / 1000.0;
    s->s_per_byte = 8.0 / (cl->min_transfer_mbit_s * 1e6);
    config_fingerprint(exp, s->exp_fp);

    if (cl->curve && (cl->curve->server_keys || cl->curve->authorized_keys)) {
        if (!cl->curve->server_keys || !cl->curve->authorized_keys) {
            err_set(e, "cluster.curve needs both server_keys and authorized_keys on a server");
            goto fail;
        }
        if (curve_keys_load(&s->keys, cl->curve->server_keys, 1, e) < 0) {
            err_wrap(e, "cluster.curve.server_keys");
            goto fail;
        }
        s->curve = 1;
    }
    if (trainer_open(&s->t, exp, 0, e) < 0) goto fail;
    /* The server only holds tensors: the model's activations and the data
     * were needed to create, calibrate and initialise the method. */
    trainer_drop_compute(s->t);
    s->base_fp = model_files_fingerprint(s->t->files);
    if (layout_build(s, e) < 0) goto fail;
    s->shards = calloc((size_t)s->window * s->n_shards, sizeof *s->shards);
    s->pool = calloc((size_t)s->window * s->n_shards, sizeof *s->pool);
    s->peers = calloc((size_t)s->n_servers, sizeof *s->peers);
    s->ck_steps = calloc((size_t)s->n_servers, sizeof *s->ck_steps);
    s->gone_since = calloc((size_t)s->n_servers, sizeof *s->gone_since);
    s->server_timeout_s = cl->server_timeout_ms / 1000.0;
    if (!s->shards || !s->pool || !s->peers || !s->ck_steps || !s->gone_since) {
        err_set(e, "out of memory");
        goto fail;
    }
    if (httpd_create(&s->http, e) < 0 || httpd_server_metrics_init(s->http, &s->hm, e) < 0)
        goto fail;
    if (checkpoint_open(s, e) < 0) goto fail;
    peers_own_steps(s);
    httpd_set(s->hm.total_steps, (double)s->total);
    httpd_set(s->hm.step, (double)s->step);
    httpd_set(s->hm.checkpoint_step, (double)s->step);
    httpd_set_memory(s->hm.private_bytes, s->hm.mapped_bytes);
    if (opts->index == 0) {
        if (fs_mkdir_p(exp->output_dir, e) < 0 || write_experiment(s, e) < 0 ||
            metrics_open(&s->metrics, s->exp->output_dir, s->step, e) < 0)
            goto fail;
    }
    /* A worker's push of this server's tensors queues its heartbeats
     * behind it: the time it needs at the slowest rate allowed is not
     * silence. */
    double push_s = (double)s->n * sizeof(float) * s->s_per_byte;
    s->worker_silence_s = s->timeout_s + push_s;
    if (push_s >= 1.0)
        server_log(s, LOG_INFO,
                   "tensors of %.1f MB each way: a worker may be silent for %.1f s "
                   "(cluster.worker_timeout_ms plus their transfer at "
                   "cluster.min_transfer_mbit_s %u), longer while this server sends to it",
                   (double)s->n * sizeof(float) / 1e6, s->worker_silence_s,
                   cl->min_transfer_mbit_s);
    server_log(
        s, LOG_INFO,
        "%s: server %d of %d holds %d of %d tensors (%zu parameters) of %s, at step %llu/%llu",
        exp->name, opts->index, s->n_servers, s->n_tensors, s->n_global, s->n,
        s->t->p->method->name, (unsigned long long)s->step, (unsigned long long)s->total);
    *out = s;
    return 0;
fail:
    server_close(s);
    return -1;
}

void server_close(server *s) {
    if (!s) return;
    server_pool_close(s);
    httpd_close(s->http);
    if (s->sock) zmq_close(s->sock);
    if (s->link) zmq_close(s->link);
    if (s->zap) curve_zap_stop(s->zap);
    if (s->ctx) zmq_ctx_term(s->ctx);
    metrics_close(&s->metrics, NULL);
    ckpt_close(s->ck);
    if (s->have_opt) optim_free(&s->opt);
    if (s->shards)
        for (uint32_t i = 0; i < s->window * s->n_shards; i++) free(s->shards[i].buf);
    for (int i = 0; i < s->n_pool; i++) free(s->pool[i]);
    free(s->pool);
    free(s->shards);
    free(s->peers);
    free(s->ck_steps);
    free(s->gone_since);
    free(s->workers);
    free(s->owner);
    free(s->kexpect);
    free(s->kfirst);
    free(s->kcount);
    free(s->tensors);
    free(s->gidx);
    free(s->sums);
    free(s->params);
    free(s->grad_sum);
    free(s->inbuf);
    free(s->out);
    trainer_close(s->t);
    curve_keys_wipe(&s->keys);
    free(s);
}

int server_bind(server *s, err *e) {
    const char *ep = s->opts.listen ? s->opts.listen : s->exp->cluster->servers[s->opts.index];
    s->ctx = zmq_ctx_new();
    if (!s->ctx) return err_set(e, "zmq_ctx_new: %s", zmq_strerror(errno));
    if (s->curve && curve_zap_start(&s->zap, s->ctx, s->exp->cluster->curve->authorized_keys,
                                    s->keys.public_key, e) < 0)
        return err_wrap(e, "cluster.curve.authorized_keys");
    s->sock = zmq_socket(s->ctx, ZMQ_ROUTER);
    if (!s->sock) return err_set(e, "zmq_socket: %s", zmq_strerror(errno));
    int linger = SERVER_LINGER_MS;
    zmq_setsockopt(s->sock, ZMQ_LINGER, &linger, sizeof linger);
    if (wire_set_limits(s->sock, s->lim.max_message_bytes, e) < 0) return -1;
    if (s->curve && curve_server_setup(s->sock, &s->keys, e) < 0) return -1;
    if (zmq_bind(s->sock, ep) < 0) return err_set(e, "binding %s: %s", ep, zmq_strerror(errno));
    server_log(s, LOG_INFO, "listening on %s%s", ep, s->curve ? " (CURVE)" : "");
    /* Metrics are for watching, not for training: a port that is taken
     * (several servers on one machine) costs a warning, not the run. */
    unsigned mport = s->exp->cluster->metrics_port;
    err he;
    if (mport && httpd_listen(s->http, NULL, mport, &he) < 0)
        server_log(s, LOG_WARN, "cluster.metrics_port: %s; no /healthz or /metrics", he.msg);
    else if (mport)
        server_log(s, LOG_INFO, "serving /healthz, /livez and /metrics on port %u", mport);
    /* Ready: listening and holding a version. A loop silent for longer
     * than this is hung (the final write and checkpoints included). */
    httpd_set_liveness(s->http, 60.0 + 10.0 * s->timeout_s);
    httpd_set_ready(s->http, 1);
    if (s->opts.index > 0 && peers_link_open(s, e) < 0) return -1;
    return server_pool_open(s, e);
}

/* ---- sending ------------------------------------------------------------------------ */

/* Bytes a message takes on the wire, for metrics: the packed header (tensor
 * headers counted with their largest CRC encoding) and the tensor frames. */
static uint64_t message_bytes(const Peftps__Wire__Envelope *env, const wire_tensor *t, int n) {
    uint64_t b = protobuf_c_message_get_packed_size(&env->base);
    for (int i = 0; i < n; i++) {
        Peftps__Wire__TensorHeader h = PEFTPS__WIRE__TENSOR_HEADER__INIT;
        uint64_t shape[WIRE_MAX_DIMS];
        for (int d = 0; d < t[i].ndim; d++) shape[d] = (uint64_t)t[i].shape[d];
        h.name = (char *)t[i].name;
        h.has_dtype = h.has_nbytes = h.has_crc32c = 1;
        h.dtype = (Peftps__Wire__DType)t[i].dtype;
        h.nbytes = t[i].nbytes;
        h.crc32c = UINT32_MAX;
        h.shape = shape;
        h.n_shape = (size_t)t[i].ndim;
        size_t hs = protobuf_c_message_get_packed_size(&h.base);
        b += 1 + (hs >= 128 ? 2 : 1) + hs + t[i].nbytes;
    }
    return b;
}

void server_send(server *s, const unsigned char *id, size_t id_len,
                 const Peftps__Wire__Envelope *env, const wire_tensor *t, int n) {
    err e;
    if (wire_send(s->sock, id, id_len, env, t, n, &e) < 0) {
        server_log(s, LOG_WARN, "sending %s: %s", wire_body_name(env->body_case), e.msg);
        return;
    }
    uint64_t nb = message_bytes(env, t, n);
    s->bytes_out += nb;
    httpd_add(s->hm.bytes_out, (double)nb);
}

/* Bytes of tensor frames in a message. */
static uint64_t tensor_bytes(const wire_tensor *t, int n) {
    uint64_t b = 0;
    for (int i = 0; i < n; i++) b += t[i].nbytes;
    return b;
}

static void send_worker(server *s, worker_rec *w, const Peftps__Wire__Envelope *env,
                        const wire_tensor *t, int n) {
    double now = progress_now();
    w->last_sent = now;
    /* Transfers queued to one worker follow each other on its connection. */
    if (n > 0) {
        double from = w->busy_until > now ? w->busy_until : now;
        w->busy_until = from + (double)tensor_bytes(t, n) * s->s_per_byte;
    }
    server_send(s, w->id, w->id_len, env, t, n);
}

void server_reply_error(server *s, const wire_msg *m, const char *who, Peftps__Wire__ErrorCode code,
                        const char *fmt, ...) {
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    server_log(s, LOG_WARN, "%s: %s", who, text);
    wire_out o;
    server_send(s, m->identity, m->id_len, wire_error(&o, code, "%s", text), NULL, 0);
}

#define REPLY_ERROR(s, m, w, code, ...)                                                            \
    server_reply_error(s, m, (w) ? (w)->name : "unregistered peer", code, __VA_ARGS__)

/* ---- workers ------------------------------------------------------------------------ */

static worker_rec *worker_find(server *s, const unsigned char *id, size_t n) {
    for (int i = 0; i < s->cap_workers; i++) {
        worker_rec *w = &s->workers[i];
        if (w->used && w->id_len == n && !memcmp(w->id, id, n)) return w;
    }
    return NULL;
}

static int workers_alive(const server *s) {
    int n = 0;
    for (int i = 0; i < s->cap_workers; i++) n += s->workers[i].used;
    return n;
}

/* The shards a worker holds go back to the pending pool; returns how many. */
static int worker_release(server *s, worker_rec *w) {
    int wi = (int)(w - s->workers), n = 0;
    for (uint32_t i = 0; i < s->window * s->n_shards; i++)
        if (s->shards[i].state == SHARD_ASSIGNED && s->shards[i].worker == wi) {
            s->shards[i].state = SHARD_PENDING;
            n++;
        }
    return n;
}

static worker_rec *worker_add(server *s) {
    for (;;) {
        for (int i = 0; i < s->cap_workers; i++)
            if (!s->workers[i].used) return &s->workers[i];
        if (s->cap_workers >= SERVER_MAX_WORKERS) return NULL;
        int cap = s->cap_workers ? s->cap_workers * 2 : 16;
        if (cap > SERVER_MAX_WORKERS) cap = SERVER_MAX_WORKERS;
        worker_rec *nw = realloc(s->workers, (size_t)cap * sizeof *nw);
        if (!nw) return NULL;
        memset(nw + s->cap_workers, 0, (size_t)(cap - s->cap_workers) * sizeof *nw);
        s->workers = nw;
        s->cap_workers = cap;
    }
}

static void send_snapshot(server *s, worker_rec *w) {
    wire_out o;
    send_worker(s, w, wire_snapshot(&o, s->version, s->step), s->out, s->n_tensors);
    w->version = s->version;
}

static shard_slot *slot(server *s, uint64_t step, uint32_t shard) {
    return &s->shards[(size_t)(step % s->window) * s->n_shards + shard];
}

/* The last step whose shards may be handed out now: the window's end, the
 * run's end, and with ASYNC the next checkpoint (whose state must hold
 * exactly the steps before it, so nothing past it is applied early). */
static uint64_t last_assignable(const server *s) {
    uint64_t last = s->step + s->window - 1;
    if (last > s->total - 1) last = s->total - 1;
    if (s->sync == PEFTPS__SYNC_MODE__ASYNC) {
        uint64_t every = s->exp->checkpoint->every_steps;
        if (every == 0) return last; /* checkpoints off: no state to keep exact */
        uint64_t boundary = (s->step / every + 1) * every;
        if (last > boundary - 1) last = boundary - 1;
    }
    return last;
}

/* Server 0 hands one pending shard to each waiting worker (the oldest step
 * first, shards in order), with the parameters of the current version first
 * when the worker holds another. The other servers only answer waiting
 * workers with the new version. */
static void schedule(server *s) {
    if (s->finished || s->step >= s->total) return;
    uint64_t u = s->step, last = last_assignable(s);
    uint32_t next = 0;
    for (int i = 0; i < s->cap_workers; i++) {
        worker_rec *w = &s->workers[i];
        if (!w->used || !w->waiting) continue;
        if (s->opts.index > 0) {
            if (w->version != s->version) {
                send_snapshot(s, w);
                w->waiting = 0;
            }
            continue;
        }
        for (;;) {
            while (next < s->n_shards && slot(s, u, next)->state != SHARD_PENDING) next++;
            if (next < s->n_shards || u == last) break;
            u++;
            next = 0;
        }
        if (next == s->n_shards) return;
        if (w->version != s->version) send_snapshot(s, w);
        uint32_t shard = next;
        if (s->step_start == 0) s->step_start = progress_now(); /* the first step's clock */
        wire_out o;
        send_worker(s, w, wire_assign(&o, u, s->version, &shard, 1), NULL, 0);
        slot(s, u, next)->state = SHARD_ASSIGNED;
        slot(s, u, next)->worker = i;
        w->waiting = 0;
        log_debug("step %llu shard %u -> %s", (unsigned long long)u, shard, w->name);
    }
}

static void on_hello(server *s, const wire_msg *m, worker_rec *w) {
    const Peftps__Wire__Hello *h = m->env->hello;
    const char *who = h->worker_id && h->worker_id[0] ? h->worker_id : "a worker";
    if (!h->has_protocol_version || h->protocol_version != WIRE_PROTOCOL_VERSION) {
        REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__MALFORMED,
                    "%s speaks protocol version %u, this server %d: use the same peftps release",
                    who, h->protocol_version, WIRE_PROTOCOL_VERSION);
        return;
    }
    if (!h->base_fingerprint || strcmp(h->base_fingerprint, s->base_fp)) {
        REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__FINGERPRINT_MISMATCH,
                    "%s maps another base model (fingerprint %.12s, server %.12s): model.path "
                    "must hold the same files everywhere",
                    who, h->base_fingerprint ? h->base_fingerprint : "none", s->base_fp);
        return;
    }
    if (!h->experiment_fingerprint || strcmp(h->experiment_fingerprint, s->exp_fp)) {
        REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__FINGERPRINT_MISMATCH,
                    "%s runs another experiment (fingerprint %.12s, server %.12s): give workers "
                    "and servers the same experiment file and --set options",
                    who, h->experiment_fingerprint ? h->experiment_fingerprint : "none", s->exp_fp);
        return;
    }
    size_t np = strlen(PEER_ID_PREFIX);
    if (!strncmp(who, PEER_ID_PREFIX, np)) {
        char *end;
        long k = strtol(who + np, &end, 10);
        if (s->opts.index != 0 || *end || k < 1 || k >= s->n_servers) {
            REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__MALFORMED,
                        "%s: not a server of this cluster, or this is not server 0", who);
            return;
        }
        if (w) w->used = 0; /* an identity is a worker or a peer, not both */
        peers_on_hello(s, m, (int)k);
        return;
    }
    for (int i = 0; i < s->n_banned && i < SERVER_MAX_BANNED; i++)
        if (s->banned_len[i] == m->id_len && !memcmp(s->banned[i], m->identity, m->id_len)) {
            REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__BAD_TENSOR,
                        "%s was dropped after %d refused pushes; restart it to register again", who,
                        SERVER_MAX_OFFENCES);
            return;
        }
    /* Every worker computes the frozen products alike, or not at all: one
     * whose CPU cannot run the experiment's compute is refused, never given
     * another path. */
    const char *want = train_compute_name(train_compute(s->exp));
    int plain = train_compute(s->exp) == MODEL_COMPUTE_F32 && !h->compute && !h->missing_isa;
    if (!plain && (!h->compute || strcmp(h->compute, want))) {
        if (h->missing_isa)
            REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__UNSUPPORTED_CPU,
                        "%s refused: its CPU lacks the %s instruction set that model.compute: %s "
                        "needs; run it on a CPU with %s or train with compute: F32",
                        who, h->missing_isa, want, h->missing_isa);
        else
            REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__UNSUPPORTED_CPU,
                        "%s refused: it computes %s, the experiment %s", who,
                        h->compute ? h->compute : "nothing", want);
        return;
    }
    if (w) {
        worker_release(s, w);
    } else if (!(w = worker_add(s))) {
        server_reply_error(s, m, "unregistered peer", PEFTPS__WIRE__ERROR_CODE__ERROR_UNSPECIFIED,
                           "%s refused: %d workers are registered already", who,
                           SERVER_MAX_WORKERS);
        return;
    } else {
        w->used = 1;
        memcpy(w->id, m->identity, m->id_len);
        w->id_len = m->id_len;
        /* A record is new here; a Hello again keeps its refusals. */
        w->offences = 0;
        w->accepted = 0;
    }
    snprintf(w->name, sizeof w->name, "%s", who);
    w->last_seen = progress_now();
    w->version = NO_VERSION;
    w->waiting = 0;
    w->busy_until = 0;
    server_log(s, LOG_INFO, "worker %s registered (%d alive)", w->name, workers_alive(s));
    httpd_set(s->hm.workers, workers_alive(s));
    wire_out o;
    send_worker(s, w,
                wire_welcome(&o, (uint32_t)s->opts.index, (uint32_t)s->n_servers,
                             s->exp->cluster->heartbeat_ms, s->version),
                s->out, s->n_tensors);
}

static void on_pull(server *s, const wire_msg *m, worker_rec *w) {
    const Peftps__Wire__Pull *p = m->env->pull;
    /* A worker that asks for work has given up what it held. */
    worker_release(s, w);
    w->version = p->has_have_version ? p->have_version : NO_VERSION;
    w->waiting = 1;
    schedule(s);
}

/* ---- aggregation -------------------------------------------------------------------- */

static float *buf_get(server *s) {
    if (s->n_pool > 0) return s->pool[--s->n_pool];
    return aligned_alloc(64, (s->n * sizeof(float) + 63) / 64 * 64);
}

/* Every shard is summed: the mean gradient and this server's sums of
 * squares; then, alone, the update; with peers, the exchange first. */
static int shards_done(server *s, err *e) {
    long ntok = 0;
    for (uint32_t i = 0; i < s->n_shards; i++) ntok += (long)slot(s, s->step, i)->n_tokens;
    s->step_tokens = ntok;
    train_grad_mean(s->grad_sum, s->n, ntok);
    double *each = malloc((size_t)s->n_tensors * sizeof *each);
    if (!each) return err_set(e, "out of memory");
    train_grad_sumsq(s->tensors, s->n_tensors, s->grad_sum, each);
    for (int i = 0; i < s->n_tensors; i++) s->sums[s->gidx[i]] = each[i];
    free(each);
    s->own_ready = 1;
    if (s->n_servers == 1) return server_step_apply(s, e);
    if (s->opts.index == 0) return peers_try_complete(s, e);
    peers_send_sums(s);
    return 0;
}

/* Folds the current step's shards that are here, in shard order, and
 * applies each step that is complete; with SSP the next step may have
 * arrived already. */
static int advance(server *s, err *e) {
    while (!s->finished && s->step < s->total && !s->own_ready) {
        while (s->next_fold < s->n_shards) {
            shard_slot *q = slot(s, s->step, s->next_fold);
            if (q->state != SHARD_RECEIVED || !q->buf) break;
            train_fold(s->grad_sum, q->buf, s->n, s->next_fold);
            s->pool[s->n_pool++] = q->buf;
            q->buf = NULL;
            s->next_fold++;
        }
        if (s->next_fold < s->n_shards) break;
        uint64_t before = s->step;
        if (shards_done(s, e) < 0) return -1;
        if (s->step == before) break; /* waiting for the other servers */
    }
    return 0;
}

static int step_record(server *s, double loss, long ntok, double lr, double norm, err *e);

/* ASYNC: the shard's own mean gradient, clipped by its own norm, is one
 * AdamW update at its step's rate; a step is recorded once all its shards
 * are applied. */
static int async_apply(server *s, uint64_t step, shard_slot *sl, err *e) {
    train_grad_mean(s->inbuf, s->n, (long)sl->n_tokens);
    double norm = sqrt(train_grad_sumsq(s->tensors, s->n_tensors, s->inbuf, NULL));
    double lr = optim_lr(s->exp->optimizer, s->exp->schedule, step);
    train_apply(&s->opt, s->exp->optimizer, s->params, s->inbuf, s->n, norm, lr);
    sl->norm = norm;
    s->version++;
    while (!s->finished && s->step < s->total) {
        double loss = 0.0, nsum = 0.0;
        long ntok = 0;
        uint32_t i = 0;
        for (; i < s->n_shards; i++) {
            shard_slot *q = slot(s, s->step, i);
            if (q->state != SHARD_RECEIVED) break;
            loss += q->loss_sum;
            ntok += (long)q->n_tokens;
            nsum += q->norm;
        }
        if (i < s->n_shards) break;
        /* The step's grad_norm: the mean of its shards' norms. */
        if (step_record(s, loss, ntok, optim_lr(s->exp->optimizer, s->exp->schedule, s->step),
                        nsum / s->n_shards, e) < 0)
            return -1;
    }
    return 0;
}

/* Whether a push of (step, version) may be applied now, by the mode. */
static int push_in_time(const server *s, uint64_t step, uint64_t version) {
    if (step < s->step || step >= s->step + s->window || step >= s->total) return 0;
    switch (s->sync) {
    case PEFTPS__SYNC_MODE__SSP:
        return version <= s->version && version + s->staleness >= s->version;
    case PEFTPS__SYNC_MODE__ASYNC:
        return version <= s->version;
    default:
        return step == s->step && version == s->version && !s->own_ready;
    }
}

/* ---- pushes at the boundary ---------------------------------------------------------- */

/* What is wrong with the pushed loss and gradient (now in s->inbuf), in
 * words, or NULL when nothing is: a NaN or infinity anywhere, or a per-token
 * norm SERVER_PUSH_NORM_FACTOR times the scale of the accepted pushes, or
 * above SERVER_PUSH_NORM_FIRST before there is one (*absurd set; another
 * worker with a clean record pushing the same bits confirms it). */
static const char *push_problem(server *s, const Peftps__Wire__GradPush *g, shard_slot *sl,
                                const worker_rec *w, double *norm, int *absurd, char *buf,
                                size_t n) {
    *absurd = 0;
    *norm = 0.0;
    if (!isfinite(g->loss_sum)) {
        snprintf(buf, n, "its loss_sum is %g", g->loss_sum);
        return buf;
    }
    for (int t = 0; t < s->n_tensors; t++) {
        const float *x = s->inbuf + s->tensors[t].offset;
        for (size_t i = 0; i < s->tensors[t].numel; i++)
            if (!isfinite(x[i])) {
                snprintf(buf, n, "its gradient of %s holds %g at index %zu", s->tensors[t].name,
                         (double)x[i], i);
                return buf;
            }
    }
    double ntok = g->n_tokens > 0 ? (double)g->n_tokens : 1.0;
    double sumsq = train_grad_sumsq(s->tensors, s->n_tensors, s->inbuf, NULL);
    *norm = isfinite(sumsq) ? sqrt(sumsq) / ntok : INFINITY;
    double scale = s->push_norm_prev > s->push_norm_cur ? s->push_norm_prev : s->push_norm_cur;
    double bound = scale > 0 ? SERVER_PUSH_NORM_FACTOR * scale : SERVER_PUSH_NORM_FIRST;
    if (!(*norm <= bound)) {
        uint32_t crc = crc32c(0, s->inbuf, s->n * sizeof(float));
        /* The confirming worker has a record: pushes taken, none refused;
         * a rogue connecting again under a new name has none. */
        if (sl->suspect_by[0] && sl->suspect_crc == crc && strcmp(sl->suspect_by, w->name) &&
            w->accepted > 0 && w->offences == 0) {
            server_log(s, LOG_WARN,
                       "shard of step %llu: gradient norm %.3g per token, %.0fx the scale of "
                       "this run's pushes, confirmed by %s and %s computing the same bits: "
                       "accepted",
                       (unsigned long long)g->step, *norm, scale > 0 ? *norm / scale : 0.0,
                       sl->suspect_by, w->name);
            return NULL;
        }
        sl->suspect_crc = crc;
        snprintf(sl->suspect_by, sizeof sl->suspect_by, "%s", w->name);
        *absurd = 1;
        if (scale > 0)
            snprintf(buf, n,
                     "its gradient norm is %.3g per token, more than %.0f times the largest "
                     "accepted in this and the last step (%.3g); it is taken only when another "
                     "worker computes the same bits",
                     *norm, SERVER_PUSH_NORM_FACTOR, scale);
        else
            snprintf(buf, n,
                     "its gradient norm is %.3g per token, more than %.0g before any push set "
                     "the scale; it is taken only when another worker computes the same bits",
                     *norm, SERVER_PUSH_NORM_FIRST);
        return buf;
    }
    return NULL;
}

/* A push refused for its values: the shard goes to another worker, the
 * worker is named, and after SERVER_MAX_OFFENCES refusals dropped. */
static void push_refuse(server *s, const wire_msg *m, worker_rec *w, shard_slot *sl, int owned,
                        uint32_t shard, const char *why) {
    if (owned) sl->state = SHARD_PENDING;
    w->offences++;
    server_reply_error(s, m, w->name, PEFTPS__WIRE__ERROR_CODE__BAD_TENSOR,
                       "push of shard %u of step %llu refused: %s; the shard goes to another "
                       "worker (refusal %d of %d before %s is dropped)",
                       shard, (unsigned long long)m->env->grad_push->step, why, w->offences,
                       SERVER_MAX_OFFENCES, w->name);
    if (w->offences >= SERVER_MAX_OFFENCES) {
        int n = worker_release(s, w);
        w->used = 0;
        int k = s->n_banned++ % SERVER_MAX_BANNED;
        memcpy(s->banned[k], w->id, w->id_len);
        s->banned_len[k] = w->id_len;
        server_log(s, LOG_WARN,
                   "worker %s dropped after %d refused pushes (non-finite or absurd "
                   "gradients); %d shard(s) go to others (%d alive)",
                   w->name, w->offences, n, workers_alive(s));
        httpd_add(s->hm.workers_dropped, 1);
        httpd_set(s->hm.workers, workers_alive(s));
    }
    schedule(s);
}

/* 0 when the push was taken, -1 when it was refused. */
static int on_grad_push(server *s, const wire_msg *m, worker_rec *w) {
    const Peftps__Wire__GradPush *g = m->env->grad_push;
    if (!g->has_step || !g->has_version || !g->has_shard || !g->has_loss_sum || !g->has_n_tokens) {
        REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__MALFORMED,
                    "grad_push without step, version, shard, loss_sum or n_tokens");
        return -1;
    }
    if (!push_in_time(s, g->step, g->version)) {
        REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__STALE,
                    "push of step %llu version %llu, but the server is at step %llu version "
                    "%llu%s",
                    (unsigned long long)g->step, (unsigned long long)g->version,
                    (unsigned long long)s->step, (unsigned long long)s->version,
                    s->own_ready ? " and has every shard of it" : "");
        return -1;
    }
    if (g->shard >= s->n_shards) {
        REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__MALFORMED,
                    "push of shard %u, but a step has %u shards", g->shard, s->n_shards);
        return -1;
    }
    shard_slot *sl = slot(s, g->step, g->shard);
    if (sl->state == SHARD_RECEIVED) {
        REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__DUPLICATE,
                    "shard %u of step %llu was received already", g->shard,
                    (unsigned long long)g->step);
        return -1;
    }
    /* Server 0 assigns; the others take a shard from any registered worker. */
    int owned = sl->state == SHARD_ASSIGNED && &s->workers[sl->worker] == w;
    if (s->opts.index == 0 && !owned) {
        REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__STALE,
                    "shard %u of step %llu is not assigned to this worker", g->shard,
                    (unsigned long long)g->step);
        return -1;
    }
    err e;
    int bad = wire_check_tensors(m, s->expect, s->n_tensors, &e) < 0;
    for (int i = 0; !bad && i < s->n_tensors; i++)
        bad = wire_tensor_copy_f32(&m->tensors[i], s->inbuf + s->tensors[i].offset,
                                   s->tensors[i].numel, &e) < 0;
    if (bad) {
        /* Its owner cannot be trusted with it again: let another compute it. */
        if (owned) sl->state = SHARD_PENDING;
        REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__BAD_TENSOR, "shard %u: %s", g->shard, e.msg);
        schedule(s);
        return -1;
    }
    char why[400];
    double norm;
    int absurd;
    if (push_problem(s, g, sl, w, &norm, &absurd, why, sizeof why)) {
        push_refuse(s, m, w, sl, owned, g->shard, why);
        return -1;
    }
    if (norm > s->push_norm_cur) s->push_norm_cur = norm;
    sl->suspect_by[0] = '\0';
    w->accepted++;
    sl->state = SHARD_RECEIVED;
    httpd_add(s->hm.pushes_accepted, 1);
    sl->loss_sum = g->loss_sum;
    sl->n_tokens = g->n_tokens;
    if (s->opts.index == 0) w->waiting = 1;
    int rc = 0;
    if (s->sync == PEFTPS__SYNC_MODE__ASYNC) {
        rc = async_apply(s, g->step, sl, &s->fail);
    } else if (g->step == s->step && g->shard == s->next_fold) {
        train_fold(s->grad_sum, s->inbuf, s->n, g->shard);
        s->next_fold++;
        rc = advance(s, &s->fail);
    } else {
        /* Out of order: it waits, in a buffer of its own, for its turn. */
        float *b = buf_get(s);
        if (!b) {
            sl->state = owned ? SHARD_PENDING : sl->state;
            REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__ERROR_UNSPECIFIED,
                        "out of memory holding shard %u", g->shard);
            return -1;
        }
        sl->buf = s->inbuf;
        s->inbuf = b;
        rc = advance(s, &s->fail);
    }
    if (rc < 0) {
        s->finished = -1;
        return 0;
    }
    schedule(s);
    return 0;
}

void server_shutdown_workers(server *s, const char *reason) {
    for (int i = 0; i < s->cap_workers; i++) {
        worker_rec *w = &s->workers[i];
        if (!w->used) continue;
        wire_out o;
        send_worker(s, w, wire_shutdown(&o, reason), NULL, 0);
    }
}

int server_finish_run(server *s, err *e) {
    if (s->opts.index == 0) {
        if (!peers_all_final(s)) return 0;
        if (write_tensors(s, e) < 0) return -1;
        for (int k = 1; k < s->n_servers; k++) {
            wire_out o;
            server_send(s, s->peers[k].id, s->peers[k].id_len,
                        wire_shutdown(&o, "training finished"), NULL, 0);
        }
    } else if (!s->final_sent) {
        peers_send_final(s);
        return 0; /* server 0 says when to stop */
    }
    server_shutdown_workers(s, "training finished");
    s->finished = 1;
    return 0;
}

int server_step_apply(server *s, err *e) {
    /* Added in global tensor order, as train_update adds them. */
    double total = 0.0;
    for (int i = 0; i < s->n_global; i++) total += s->sums[i];
    double norm = sqrt(total);
    double lr = optim_lr(s->exp->optimizer, s->exp->schedule, s->step);
    train_apply(&s->opt, s->exp->optimizer, s->params, s->grad_sum, s->n, norm, lr);
    s->version++;
    double loss = 0.0;
    for (uint32_t i = 0; i < s->n_shards; i++) loss += slot(s, s->step, i)->loss_sum;
    s->next_fold = 0;
    s->own_ready = 0;
    for (int k = 0; k < s->n_servers; k++) s->peers[k].have_sums = 0;
    return step_record(s, loss, s->step_tokens, lr, norm, e);
}

/* The step is applied: its slots are free for step+window; metrics,
 * progress, checkpoint, and the end of the run. */
static int step_record(server *s, double loss, long ntok, double lr, double norm, err *e) {
    double mean = ntok > 0 ? loss / (double)ntok : 0.0;
    log_debug("step %llu: loss %.17g, grad norm %.17g", (unsigned long long)s->step + 1, mean,
              norm);
    double now = progress_now();
    double dt = now - s->step_start;
    double toks = (double)s->exp->data->batch_size * (double)s->exp->data->seq_len;
    for (uint32_t i = 0; i < s->n_shards; i++) slot(s, s->step, i)->state = SHARD_PENDING;
    s->push_norm_prev = s->push_norm_cur, s->push_norm_cur = 0.0;
    s->step++;
    s->last_loss = mean;
    s->last_tokens_per_s = dt > 0 ? toks / dt : 0.0;
    if (s->metrics.f) {
        /* Not fatal: a full disk stops the run at the next checkpoint, with its path. */
        metrics_line l = {.kind = METRICS_STEP,
                          .step = s->step,
                          .loss = mean,
                          .loss_tokens = ntok,
                          .tokens = toks,
                          .lr = lr,
                          .grad_norm = norm,
                          .tokens_per_s = dt > 0 ? toks / dt : 0.0,
                          .has_bytes = 1,
                          .bytes_in = s->bytes_in,
                          .bytes_out = s->bytes_out};
        err we;
        if (metrics_write(&s->metrics, &l, &we) < 0) server_log(s, LOG_WARN, "%s", we.msg);
    }
    char detail[200];
    snprintf(detail, sizeof detail, "loss %.4f  %.0f tok/s  %.1f KiB/step  %d workers", mean,
             dt > 0 ? toks / dt : 0.0, (double)(s->bytes_in + s->bytes_out) / 1024.0,
             workers_alive(s));
    if (s->opts.index == 0) progress_update(&s->pr, s->step, detail);
    httpd_set(s->hm.step, (double)s->step);
    httpd_set(s->hm.loss, mean);
    httpd_set(s->hm.lr, lr);
    httpd_set(s->hm.grad_norm, norm);
    httpd_observe(s->hm.step_seconds, dt);
    httpd_set_memory(s->hm.private_bytes, s->hm.mapped_bytes);
    s->bytes_in = s->bytes_out = 0;
    s->step_start = now;
    if (!isfinite(mean))
        return err_set(e, "step %llu: loss is %g; lower optimizer.lr or check the data",
                       (unsigned long long)s->step, mean);
    if (train_ckpt_due(s->exp, s->step) && checkpoint_write(s, e) < 0) return -1;
    if (s->step == s->total) {
        progress_end(&s->pr);
        return server_finish_run(s, e);
    }
    schedule(s);
    return 0;
}

/* ---- the loop ----------------------------------------------------------------------- */

static void on_message(server *s, wire_msg *m) {
    worker_rec *w = worker_find(s, m->identity, m->id_len);
    if (w) w->last_seen = progress_now();
    s->bytes_in += m->bytes;
    httpd_add(s->hm.bytes_in, (double)m->bytes);
    int body = m->env->body_case;
    peer_rec *p = s->opts.index == 0 ? peers_find(s, m->identity, m->id_len) : NULL;
    if (p && body != PEFTPS__WIRE__ENVELOPE__BODY_HELLO) {
        peers_on_message(s, m, p);
        return;
    }
    if (s->finished && body != PEFTPS__WIRE__ENVELOPE__BODY_HEARTBEAT) {
        wire_out o;
        server_send(s, m->identity, m->id_len, wire_shutdown(&o, "training finished"), NULL, 0);
        return;
    }
    if (body == PEFTPS__WIRE__ENVELOPE__BODY_HELLO) {
        on_hello(s, m, w);
        return;
    }
    if (!w) {
        server_reply_error(s, m, "unregistered peer", PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED,
                           "%s from a peer that has not registered (send Hello first)",
                           wire_body_name(body));
        return;
    }
    switch (body) {
    case PEFTPS__WIRE__ENVELOPE__BODY_PULL:
        on_pull(s, m, w);
        break;
    case PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH:
        if (on_grad_push(s, m, w) < 0) httpd_add(s->hm.pushes_rejected, 1);
        break;
    case PEFTPS__WIRE__ENVELOPE__BODY_HEARTBEAT:
        break;
    default:
        REPLY_ERROR(s, m, w, PEFTPS__WIRE__ERROR_CODE__MALFORMED, "unexpected %s from a worker",
                    wire_body_name(body));
    }
}

/* Workers silent for longer than the timeout are dropped and their shards
 * go to others; every worker hears from us at least every heartbeat. */
static void tick(server *s) {
    double now = progress_now();
    int dropped = 0;
    for (int i = 0; i < s->cap_workers; i++) {
        worker_rec *w = &s->workers[i];
        if (!w->used) continue;
        /* Silence counts from what we last heard or, later, the end of
         * what we were sending it at the slowest rate allowed. */
        double since = w->busy_until > w->last_seen ? w->busy_until : w->last_seen;
        if (now - since > s->worker_silence_s) {
            int n = worker_release(s, w);
            w->used = 0;
            dropped = 1;
            server_log(s, LOG_WARN,
                       "worker %s silent for %.1f s (allowed %.1f s): dropped, %d shard(s) go "
                       "to others (%d alive)",
                       w->name, now - w->last_seen, s->worker_silence_s + (since - w->last_seen), n,
                       workers_alive(s));
            httpd_add(s->hm.workers_dropped, 1);
            httpd_set(s->hm.workers, workers_alive(s));
            continue;
        }
        if (now - w->last_sent >= s->hb_s) {
            wire_out o;
            send_worker(s, w, wire_heartbeat(&o, s->version, s->step), NULL, 0);
        }
    }
    if (s->opts.index == 0) peers_tick(s);
    server_pool_tick(s);
    if (dropped) schedule(s);
    log_flush();
    /* Memory that connection storms left free inside malloc's arenas
     * (libzmq's I/O threads allocate per connection) goes back to the
     * system, so the footprint returns near its baseline once they end. */
    if (now - s->last_trim >= SERVER_TRIM_S) {
        malloc_trim(0);
        s->last_trim = now;
    }
}

/* Takes the messages waiting on the ROUTER (a bounded batch, so the timers
 * are never starved); none once the run ended, unless lingering. */
static int drain(server *s, err *e) {
    for (int k = 0; k < 256 && (!s->finished || (s->finished > 0 && s->opts.linger)); k++) {
        wire_msg m;
        memset(&m, 0, sizeof m);
        err me;
        if (wire_recv(s->sock, 1, &m, &s->lim, &me) < 0) {
            if (!m.received) {
                wire_msg_close(&m);
                if (errno == EINTR || errno == EAGAIN) return 0;
                return err_set(e, "receiving: %s", me.msg);
            }
            worker_rec *w = worker_find(s, m.identity, m.id_len);
            if (w) w->last_seen = progress_now();
            REPLY_ERROR(s, &m, w, PEFTPS__WIRE__ERROR_CODE__MALFORMED, "%s", me.msg);
        } else {
            on_message(s, &m);
        }
        wire_msg_close(&m);
        int ev = 0;
        size_t evn = sizeof ev;
        if (zmq_getsockopt(s->sock, ZMQ_EVENTS, &ev, &evn) < 0 || !(ev & ZMQ_POLLIN)) break;
    }
    return 0;
}

/* After the last step, with --linger: answers workers (Shutdown), peers,
 * /healthz and /metrics until a stop signal, for supervisors that restart
 * a program whatever its exit status (a Kubernetes StatefulSet). */
static int linger(server *s, err *e) {
    server_log(s, LOG_INFO, "the run ended; answering until SIGINT or SIGTERM (--linger)");
    while (!stop_requested) {
        zmq_pollitem_t it = {s->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, 250) < 0 && errno != EINTR)
            return err_set(e, "zmq_poll: %s", zmq_strerror(errno));
        if ((it.revents & ZMQ_POLLIN) && drain(s, e) < 0) return -1;
        httpd_heartbeat(s->http);
        reload_keys(s);
        log_flush();
    }
    return 0;
}

int server_run(server *s, err *e) {
    progress_start(&s->pr, s->total);
    s->step_start = 0;
    if (s->step >= s->total) {
        server_log(s, LOG_INFO, "the checkpoint is at the last step already");
        if (server_finish_run(s, e) < 0) return -1;
    }
    long tick_ms = (long)s->exp->cluster->heartbeat_ms / 4;
    if (tick_ms < 5) tick_ms = 5;
    if (tick_ms > 250) tick_ms = 250;
    double last_tick = 0;
    while (!s->finished && !stop_requested) {
        zmq_pollitem_t it[2] = {{s->sock, 0, ZMQ_POLLIN, 0}, {s->link, 0, ZMQ_POLLIN, 0}};
        int rc = zmq_poll(it, s->link ? 2 : 1, tick_ms);
        if (rc < 0) {
            if (errno == EINTR) continue;
            return err_set(e, "zmq_poll: %s", zmq_strerror(errno));
        }
        if ((it[0].revents & ZMQ_POLLIN) && drain(s, e) < 0) return -1;
        if (s->link && peers_link_poll(s, &s->fail) < 0) s->finished = -1;
        if (s->finished < 0) {
            *e = s->fail;
            return -1;
        }
        httpd_heartbeat(s->http);
        reload_keys(s);
        double now = progress_now();
        if (now - last_tick >= tick_ms / 1000.0) {
            tick(s);
            last_tick = now;
        }
    }
    if (s->finished < 0) {
        *e = s->fail;
        return -1;
    }
    if (s->finished) {
        server_pool_final(s, 0, NULL);
        return s->opts.linger ? linger(s, e) : 0;
    }
    progress_end(&s->pr);
    if (s->n_servers > 1) {
        /* A checkpoint of a step another server may not reach would widen
         * a mismatch: with several servers, only the every_steps ones. */
        char advice[900];
        peers_resume_advice(s, advice, sizeof advice);
        server_log(s, LOG_WARN,
                   "stopping on a signal at step %llu; no checkpoint written (several servers "
                   "keep only the checkpoints they all reach); %s",
                   (unsigned long long)s->step, advice);
        server_shutdown_workers(s, "the server was stopped");
        return 1;
    }
    server_log(s, LOG_WARN, "stopping on a signal at step %llu", (unsigned long long)s->step);
    if (!s->ck)
        server_log(s, LOG_WARN,
                   "checkpoints are off (checkpoint.every_steps is 0): the %llu steps done are "
                   "not kept",
                   (unsigned long long)s->step);
    else if (checkpoint_write(s, e) < 0)
        return -1;
    server_shutdown_workers(s, "the server was stopped");
    if (s->pool_cancelled && s->opts.linger) {
        /* A supervisor would start a cancelled job's server again (which
         * would announce it again): stay, answering, until told to stop. */
        server_pool_final(s, 1, "cancelled");
        s->finished = 1;
        stop_requested = 0;
        if (linger(s, e) < 0) return -1;
    }
    return 1;
}
