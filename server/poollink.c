/* An experiment's server on a pool (`peftps-server --pool`): announces
 * itself to the pool's coordinator (proto/pool.proto over net/poolmsg.h),
 * which lists the experiment to its workers once every server of it has;
 * reports its progress each second; stops, checkpointing, when the
 * coordinator says the job was cancelled; says how the run ended. A
 * coordinator that is away costs nothing but the reports: training goes on. */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "config/pbtext.h"
#include "net/poolmsg.h"

#define POOL_ANNOUNCE_S 2.0
#define POOL_STATUS_S 1.0

static void pool_send(server *s, const Peftps__Pool__PoolMessage *m) {
    err e;
    if (poolmsg_send(s->pool_sock, NULL, 0, m, &e) < 0)
        server_log(s, LOG_WARN, "pool %s: %s", s->opts.pool, e.msg);
    s->pool_sent = progress_now();
}

static void announce(server *s) {
    Peftps__Pool__ServerAnnounce a = PEFTPS__POOL__SERVER_ANNOUNCE__INIT;
    a.id = (char *)s->opts.pool_job;
    a.experiment = s->pool_text;
    a.has_index = 1;
    a.index = (uint32_t)s->opts.index;
    a.fingerprint = s->exp_fp;
    a.base_fingerprint = (char *)s->base_fp;
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_ANNOUNCE;
    m.server_announce = &a;
    pool_send(s, &m);
}

static void status(server *s, Peftps__Pool__JobState state, const char *msg) {
    Peftps__Pool__ServerStatus st = PEFTPS__POOL__SERVER_STATUS__INIT;
    st.id = s->pool_id;
    st.has_index = st.has_step = st.has_total_steps = st.has_state = 1;
    st.index = (uint32_t)s->opts.index;
    st.step = s->step;
    st.total_steps = s->total;
    st.state = state;
    st.has_loss = st.has_tokens_per_s = s->step > 0;
    st.loss = s->last_loss;
    st.tokens_per_s = s->last_tokens_per_s;
    st.message = (char *)msg;
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_STATUS;
    m.server_status = &st;
    pool_send(s, &m);
}

int server_pool_open(server *s, err *e) {
    if (!s->opts.pool) return 0;
    if (pbtext_print(&s->exp->base, &s->pool_text, e) < 0) return -1;
    snprintf(s->pool_id, sizeof s->pool_id, "%s",
             s->opts.pool_job ? s->opts.pool_job : s->exp->name);
    s->pool_sock = zmq_socket(s->ctx, ZMQ_DEALER);
    if (!s->pool_sock) return err_set(e, "zmq_socket: %s", zmq_strerror(errno));
    int linger = 1000, sndtimeo = 1000;
    int64_t maxsz = POOLMSG_MAX_BYTES + 1024;
    zmq_setsockopt(s->pool_sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s->pool_sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    zmq_setsockopt(s->pool_sock, ZMQ_MAXMSGSIZE, &maxsz, sizeof maxsz);
    if (zmq_connect(s->pool_sock, s->opts.pool) < 0)
        return err_set(e, "--pool %s: %s", s->opts.pool, zmq_strerror(errno));
    announce(s);
    server_log(s, LOG_INFO, "announced job %s to pool %s", s->pool_id, s->opts.pool);
    return 0;
}

void server_pool_tick(server *s) {
    if (!s->pool_sock) return;
    for (int k = 0; k < 16; k++) {
        Peftps__Pool__PoolMessage *m = NULL;
        err me;
        int r = poolmsg_recv(s->pool_sock, ZMQ_DONTWAIT, NULL, NULL, &m, &me);
        if (r == 1) break;
        if (r < 0) {
            server_log(s, LOG_WARN, "pool %s sent a bad message: %s", s->opts.pool, me.msg);
            continue;
        }
        if (m->body_case == PEFTPS__POOL__POOL_MESSAGE__BODY_ERROR) {
            const char *text = m->error->message ? m->error->message : "";
            if (!s->pool_ever_accepted && !s->finished) {
                /* Refused: another base, a clash with a running job. */
                err_set(&s->fail, "pool %s refused job %s: %s", s->opts.pool, s->pool_id, text);
                s->pool_refused = 1;
                s->finished = -1;
            } else {
                /* The coordinator lost this job (it restarted): announce
                 * again; training goes on whatever it answers. */
                server_log(s, LOG_WARN, "pool %s: %s; announcing job %s again", s->opts.pool, text,
                           s->pool_id);
                if (s->pool_accepted) announce(s);
                s->pool_accepted = 0;
            }
        } else if (m->body_case == PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_REPLY) {
            if (!s->pool_accepted)
                server_log(s, LOG_INFO, "pool %s lists job %s", s->opts.pool, s->pool_id);
            s->pool_accepted = s->pool_ever_accepted = 1;
            if (m->server_reply->has_cancel && m->server_reply->cancel && !s->pool_cancelled) {
                server_log(s, LOG_WARN, "job %s was cancelled on the pool: stopping", s->pool_id);
                s->pool_cancelled = 1;
                server_stop();
            }
        } else {
            server_log(s, LOG_WARN, "pool %s sent an unexpected %s", s->opts.pool,
                       poolmsg_body_name(m->body_case));
        }
        poolmsg_free(m);
    }
    double now = progress_now();
    if (!s->pool_accepted && now - s->pool_sent >= POOL_ANNOUNCE_S)
        announce(s);
    else if (s->pool_accepted && now - s->pool_sent >= POOL_STATUS_S)
        status(s, PEFTPS__POOL__JOB_STATE__RUNNING, NULL);
}

void server_pool_final(server *s, int outcome, const char *msg) {
    if (!s->pool_sock || s->pool_final_sent || s->pool_refused) return;
    Peftps__Pool__JobState st = outcome == 0  ? PEFTPS__POOL__JOB_STATE__DONE
                                : outcome > 0 ? PEFTPS__POOL__JOB_STATE__CANCELLED
                                              : PEFTPS__POOL__JOB_STATE__FAILED;
    status(s, st, msg);
    s->pool_final_sent = 1;
}

int server_pool_refused(const server *s) {
    return s->pool_refused;
}

int server_pool_cancelled(const server *s) {
    return s->pool_cancelled;
}

void server_pool_close(server *s) {
    if (s->pool_sock) zmq_close(s->pool_sock);
    s->pool_sock = NULL;
    free(s->pool_text);
    s->pool_text = NULL;
}
