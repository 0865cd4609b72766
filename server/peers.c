/* Several parameter servers, each holding a share of the tensors (the
 * partition of server.c), joined into one global gradient norm with the
 * bits of a single server. Server k >= 1 keeps a DEALER link to server 0's
 * ROUTER: after the last shard of a step it sends the sums of squares of
 * its tensors' mean gradients; server 0, once it has its own and every
 * peer's, sends the whole array, in global tensor order, back to each; every
 * server then adds it in that order (server_step_apply) and updates. At the
 * end the peers send their final tensors to server 0, which writes the
 * outputs and tells everyone to stop.
 *
 * The sums travel as one F64 tensor named PEER_SUMSQ_TENSOR, in a
 * GradPush whose shard is the sender's server index; the final tensors in a
 * Snapshot. A peer registers with a Hello whose worker_id is "server:k" and
 * the same fingerprints as a worker; its first Heartbeat carries its step,
 * which must equal server 0's (servers that resumed from different
 * checkpoints are refused: restart them all with --resume-step). Heartbeats
 * between servers carry their checkpoint steps, so that a server whose
 * peer is gone for cluster.server_timeout_ms, or that refuses one, names
 * the step every server can resume from. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <zmq.h>

#include "base/log.h"

/* ---- checkpoint steps of every server -------------------------------------------------- */

/* A heartbeat to another server: our step and our checkpoint steps. */
static Peftps__Wire__Envelope *peer_heartbeat(server *s, wire_out *o) {
    Peftps__Wire__Envelope *env = wire_heartbeat(o, s->version, s->step);
    peer_steps *own = &s->ck_steps[s->opts.index];
    o->body.heartbeat.n_checkpoint_steps = (size_t)own->n;
    o->body.heartbeat.checkpoint_steps = own->step;
    return env;
}

static void link_send(server *s, const Peftps__Wire__Envelope *env, const wire_tensor *t, int n);

void peers_own_steps(server *s) {
    peer_steps *own = &s->ck_steps[s->opts.index];
    uint64_t *steps = NULL;
    int n = 0;
    err e;
    if (!s->ck) return; /* checkpoints off (checkpoint.every_steps 0): none to tell */
    if (ckpt_steps(s->ck, &steps, &n, &e) < 0) {
        server_log(s, LOG_WARN, "listing this server's checkpoints: %s", e.msg);
        return;
    }
    int first = n > PEER_MAX_STEPS ? n - PEER_MAX_STEPS : 0;
    own->n = n - first;
    if (own->n) memcpy(own->step, steps + first, (size_t)own->n * sizeof *steps);
    own->known = 1;
    free(steps);
    /* Tell the others at once: while steps flow, sums replace heartbeats. */
    wire_out o;
    if (s->opts.index > 0 && s->link && s->link_registered) {
        link_send(s, peer_heartbeat(s, &o), NULL, 0);
    } else if (s->opts.index == 0 && s->sock) {
        for (int k = 1; k < s->n_servers; k++)
            if (s->peers[k].used)
                server_send(s, s->peers[k].id, s->peers[k].id_len, peer_heartbeat(s, &o), NULL, 0);
    }
}

static void record_steps(server *s, int k, const Peftps__Wire__Heartbeat *h) {
    peer_steps *ps = &s->ck_steps[k];
    size_t n = h->n_checkpoint_steps, first = n > PEER_MAX_STEPS ? n - PEER_MAX_STEPS : 0;
    ps->n = (int)(n - first);
    if (ps->n) memcpy(ps->step, h->checkpoint_steps + first, (size_t)ps->n * sizeof(uint64_t));
    ps->known = 1;
}

static int holds(const peer_steps *ps, uint64_t step) {
    for (int i = 0; i < ps->n; i++)
        if (ps->step[i] == step) return 1;
    return 0;
}

/* The steps of server k unheard of: from its directory beside ours,
 * checkpoint.path/server-k, when this machine sees it (one machine, or
 * shared storage). */
static void sibling_steps(server *s, int k) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/server-%d", s->exp->checkpoint->path, k);
    ckpt *c;
    err e;
    if (ckpt_open(&c, dir, 0, NULL, &e) < 0) return;
    uint64_t *steps = NULL;
    int count = 0;
    if (ckpt_steps(c, &steps, &count, &e) == 0) {
        peer_steps *ps = &s->ck_steps[k];
        int first = count > PEER_MAX_STEPS ? count - PEER_MAX_STEPS : 0;
        ps->n = count - first;
        if (ps->n) memcpy(ps->step, steps + first, (size_t)ps->n * sizeof *steps);
        ps->known = 1;
    }
    free(steps);
    ckpt_close(c);
}

void peers_resume_advice(server *s, char *buf, size_t n) {
    for (int k = 0; k < s->n_servers; k++)
        if (!s->ck_steps[k].known) sibling_steps(s, k);
    char held[600] = "";
    size_t at = 0;
    int unknown = -1;
    for (int k = 0; k < s->n_servers; k++) {
        const peer_steps *ps = &s->ck_steps[k];
        if (!ps->known) {
            if (unknown < 0) unknown = k;
            continue;
        }
        at += (size_t)snprintf(held + at, at < sizeof held ? sizeof held - at : 0,
                               "%sserver %d holds", at ? "; " : "", k);
        for (int i = 0; i < ps->n && at < sizeof held; i++)
            at += (size_t)snprintf(held + at, sizeof held - at, "%s %llu", i ? "," : "",
                                   (unsigned long long)ps->step[i]);
        if (ps->n == 0 && at < sizeof held)
            at += (size_t)snprintf(held + at, sizeof held - at, " none");
    }
    if (unknown >= 0) {
        snprintf(buf, n,
                 "restart every server with --resume-step N, N a step each of them holds a "
                 "checkpoint of (`peftps inspect` lists them; server %d's are not known here; "
                 "%s)",
                 unknown, held);
        return;
    }
    /* The newest step of this server's list that every other holds too. */
    const peer_steps *own = &s->ck_steps[s->opts.index];
    for (int i = own->n - 1; i >= 0; i--) {
        int all = 1;
        for (int k = 0; k < s->n_servers && all; k++) all = holds(&s->ck_steps[k], own->step[i]);
        if (all) {
            snprintf(buf, n,
                     "restart every server with --resume-step %llu, the newest step all %d "
                     "servers hold a checkpoint of (%s)",
                     (unsigned long long)own->step[i], s->n_servers, held);
            return;
        }
    }
    snprintf(buf, n,
             "no step is held in a checkpoint by every server (%s): restart them all with "
             "fresh checkpoint directories",
             held);
}

/* ---- server 0 ----------------------------------------------------------------------- */

peer_rec *peers_find(server *s, const unsigned char *id, size_t n) {
    for (int k = 1; k < s->n_servers; k++) {
        peer_rec *p = &s->peers[k];
        if (p->used && p->id_len == n && !memcmp(p->id, id, n)) return p;
    }
    return NULL;
}

void peers_on_hello(server *s, const wire_msg *m, int k) {
    peer_rec *p = &s->peers[k];
    memset(p, 0, sizeof *p);
    p->used = 1;
    memcpy(p->id, m->identity, m->id_len);
    p->id_len = m->id_len;
    p->last_seen = p->last_sent = progress_now();
    server_log(s, LOG_INFO, "server %d linked", k);
    wire_out o;
    server_send(
        s, p->id, p->id_len,
        wire_welcome(&o, 0, (uint32_t)s->n_servers, s->exp->cluster->heartbeat_ms, s->version),
        NULL, 0);
}

/* The F64 tensor of n sums, checked; NULL with e set otherwise. */
static const wire_view *sums_view(const wire_msg *m, int n, err *e) {
    if (m->n_tensors != 1) {
        err_set(e, "%d tensors instead of one", m->n_tensors);
        return NULL;
    }
    const wire_view *v = &m->tensors[0];
    if (strcmp(v->name, PEER_SUMSQ_TENSOR) || v->dtype != PEFTPS__WIRE__DTYPE__F64 ||
        v->ndim != 1 || v->shape[0] != n) {
        err_set(e, "not %s F64 [%d]", PEER_SUMSQ_TENSOR, n);
        return NULL;
    }
    return v;
}

static void on_peer_sums(server *s, const wire_msg *m, int k) {
    const Peftps__Wire__GradPush *g = m->env->grad_push;
    char who[32];
    snprintf(who, sizeof who, "server %d", k);
    err e;
    const wire_view *v = sums_view(m, s->kcount[k], &e);
    if (!v) {
        server_reply_error(s, m, who, PEFTPS__WIRE__ERROR_CODE__BAD_TENSOR, "sums: %s", e.msg);
        return;
    }
    if (g->step != s->step || g->version != s->version || g->shard != (uint32_t)k) {
        server_reply_error(s, m, who, PEFTPS__WIRE__ERROR_CODE__STALE,
                           "sums of step %llu from server %u, but server 0 is at step %llu: the "
                           "servers diverged; restart all of them with --resume-step",
                           (unsigned long long)g->step, g->shard, (unsigned long long)s->step);
        return;
    }
    const unsigned char *b = v->data;
    for (int i = 0, j = 0; i < s->n_global; i++)
        if (s->owner[i] == k) memcpy(&s->sums[i], b + 8 * (size_t)j++, sizeof(double));
    s->peers[k].have_sums = 1;
    if (peers_try_complete(s, &s->fail) < 0) s->finished = -1;
}

static void on_peer_final(server *s, const wire_msg *m, int k) {
    char who[32];
    snprintf(who, sizeof who, "server %d", k);
    err e;
    if (s->step != s->total || m->env->snapshot->version != s->version) {
        server_reply_error(s, m, who, PEFTPS__WIRE__ERROR_CODE__STALE,
                           "final tensors of version %llu, server 0 is at version %llu",
                           (unsigned long long)m->env->snapshot->version,
                           (unsigned long long)s->version);
        return;
    }
    if (wire_check_tensors(m, s->kexpect + s->kfirst[k], s->kcount[k], &e) < 0) {
        server_reply_error(s, m, who, PEFTPS__WIRE__ERROR_CODE__BAD_TENSOR, "final: %s", e.msg);
        return;
    }
    peft *p = s->t->p;
    for (int i = 0; i < m->n_tensors; i++) {
        int g = peft_find_tensor(p, m->tensors[i].name);
        if (wire_tensor_copy_f32(&m->tensors[i], peft_param(p, g), p->tensors[g].numel, &e) < 0) {
            server_reply_error(s, m, who, PEFTPS__WIRE__ERROR_CODE__BAD_TENSOR, "final: %s", e.msg);
            return;
        }
    }
    s->peers[k].have_final = 1;
    server_log(s, LOG_INFO, "server %d sent its final tensors", k);
    if (server_finish_run(s, &s->fail) < 0) s->finished = -1;
}

void peers_on_message(server *s, const wire_msg *m, peer_rec *p) {
    int k = (int)(p - s->peers);
    char who[32];
    snprintf(who, sizeof who, "server %d", k);
    p->last_seen = progress_now();
    switch (m->env->body_case) {
    case PEFTPS__WIRE__ENVELOPE__BODY_HEARTBEAT:
        record_steps(s, k, m->env->heartbeat);
        if (!p->checked) {
            const Peftps__Wire__Heartbeat *h = m->env->heartbeat;
            if (h->step != s->step) {
                char advice[900];
                peers_resume_advice(s, advice, sizeof advice);
                server_reply_error(s, m, who, PEFTPS__WIRE__ERROR_CODE__STALE,
                                   "server %d is at step %llu, server 0 at step %llu: %s", k,
                                   (unsigned long long)h->step, (unsigned long long)s->step,
                                   advice);
                p->used = 0;
                return;
            }
            p->checked = 1;
        }
        break;
    case PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH:
        if (!p->checked) {
            server_reply_error(s, m, who, PEFTPS__WIRE__ERROR_CODE__MALFORMED,
                               "sums before the heartbeat that tells the step");
            return;
        }
        on_peer_sums(s, m, k);
        break;
    case PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT:
        on_peer_final(s, m, k);
        break;
    default:
        server_reply_error(s, m, who, PEFTPS__WIRE__ERROR_CODE__MALFORMED,
                           "unexpected %s from a server", wire_body_name(m->env->body_case));
    }
}

int peers_try_complete(server *s, err *e) {
    if (!s->own_ready) return 0;
    for (int k = 1; k < s->n_servers; k++)
        if (!s->peers[k].used || !s->peers[k].have_sums) return 0;
    wire_tensor t = {PEER_SUMSQ_TENSOR,
                     PEFTPS__WIRE__DTYPE__F64,
                     1,
                     {s->n_global},
                     s->sums,
                     (size_t)s->n_global * sizeof(double)};
    for (int k = 1; k < s->n_servers; k++) {
        wire_out o;
        server_send(s, s->peers[k].id, s->peers[k].id_len,
                    wire_grad_push(&o, s->step, s->version, 0, 0.0, (uint64_t)s->step_tokens), &t,
                    1);
        s->peers[k].last_sent = progress_now();
    }
    return server_step_apply(s, e);
}

int peers_all_final(const server *s) {
    for (int k = 1; k < s->n_servers; k++)
        if (!s->peers[k].have_final) return 0;
    return 1;
}

/* The run cannot go on without server k: stop, saying how to resume. */
static void peer_gone(server *s, int k, double for_s) {
    char advice[900];
    peers_resume_advice(s, advice, sizeof advice);
    err_set(&s->fail,
            "server %d has been gone for %.0f s (cluster.server_timeout_ms): stopping at step "
            "%llu without a checkpoint; %s",
            k, for_s, (unsigned long long)s->step, advice);
    s->finished = -1;
}

void peers_tick(server *s) {
    double now = progress_now();
    for (int k = 1; k < s->n_servers; k++) {
        peer_rec *p = &s->peers[k];
        if (!p->used) {
            if (s->finished) continue;
            if (s->gone_since[k] == 0) s->gone_since[k] = now;
            if (now - s->gone_since[k] > s->server_timeout_s) {
                peer_gone(s, k, now - s->gone_since[k]);
                return;
            }
            continue;
        }
        s->gone_since[k] = 0;
        if (now - p->last_seen > s->timeout_s) {
            server_log(s, LOG_WARN,
                       "server %d silent for %.1f s; waiting up to %.0f s for it to come back", k,
                       now - p->last_seen, s->server_timeout_s);
            p->used = 0;
            s->gone_since[k] = p->last_seen;
            continue;
        }
        if (now - p->last_sent >= s->hb_s) {
            wire_out o;
            server_send(s, p->id, p->id_len, peer_heartbeat(s, &o), NULL, 0);
            p->last_sent = now;
        }
    }
}

/* ---- server k ----------------------------------------------------------------------- */

static void link_send(server *s, const Peftps__Wire__Envelope *env, const wire_tensor *t, int n) {
    err e;
    if (wire_send(s->link, NULL, 0, env, t, n, &e) < 0) {
        server_log(s, LOG_WARN, "sending %s to server 0: %s", wire_body_name(env->body_case),
                   e.msg);
        return;
    }
    s->link_sent = progress_now();
}

static void link_hello(server *s) {
    char id[32], host[64] = "?";
    snprintf(id, sizeof id, PEER_ID_PREFIX "%d", s->opts.index);
    gethostname(host, sizeof host - 1);
    wire_out o;
    s->link_registered = 0;
    s->link_hello = progress_now();
    link_send(s, wire_hello(&o, id, s->base_fp, s->exp_fp, host, (uint32_t)getpid()), NULL, 0);
}

int peers_link_open(server *s, err *e) {
    s->link = zmq_socket(s->ctx, ZMQ_DEALER);
    if (!s->link) return err_set(e, "zmq_socket: %s", zmq_strerror(errno));
    int linger = 0, sndtimeo = (int)s->exp->cluster->worker_timeout_ms;
    zmq_setsockopt(s->link, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s->link, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    if (wire_set_limits(s->link, s->lim.max_message_bytes, e) < 0) return -1;
    /* Servers share one key pair, which each one's ZAP handler admits. */
    if (s->curve && curve_client_setup(s->link, &s->keys, s->keys.public_key, e) < 0) return -1;
    const char *ep = s->exp->cluster->servers[0];
    if (zmq_connect(s->link, ep) < 0)
        return err_set(e, "connecting to server 0 at %s: %s", ep, zmq_strerror(errno));
    s->link_heard = progress_now();
    link_hello(s);
    return 0;
}

void peers_send_sums(server *s) {
    /* Until server 0 has compared steps (after its Welcome) they would be
     * refused: the Welcome sends them. */
    if (!s->link_registered) return;
    /* This server's tensors' sums, in its (global) order. */
    double *mine = malloc((size_t)s->n_tensors * sizeof *mine);
    if (!mine) {
        s->finished = -1;
        err_set(&s->fail, "out of memory");
        return;
    }
    for (int i = 0; i < s->n_tensors; i++) mine[i] = s->sums[s->gidx[i]];
    wire_tensor t = {PEER_SUMSQ_TENSOR,
                     PEFTPS__WIRE__DTYPE__F64,
                     1,
                     {s->n_tensors},
                     mine,
                     (size_t)s->n_tensors * sizeof(double)};
    wire_out o;
    link_send(s,
              wire_grad_push(&o, s->step, s->version, (uint32_t)s->opts.index, 0.0,
                             (uint64_t)s->step_tokens),
              &t, 1);
    free(mine);
}

void peers_send_final(server *s) {
    wire_out o;
    link_send(s, wire_snapshot(&o, s->version, s->step), s->out, s->n_tensors);
    s->final_sent = 1;
}

/* The whole array from server 0: this server's step can be applied. */
static int on_link_sums(server *s, const wire_msg *m, err *e) {
    const Peftps__Wire__GradPush *g = m->env->grad_push;
    err ve;
    const wire_view *v = sums_view(m, s->n_global, &ve);
    if (!v) {
        server_log(s, LOG_WARN, "server 0 sent bad sums: %s", ve.msg);
        return 0;
    }
    if (g->step != s->step || !s->own_ready)
        return err_set(e, "server 0 sent the sums of step %llu while this server is at step %llu%s",
                       (unsigned long long)g->step, (unsigned long long)s->step,
                       s->own_ready ? "" : " without all its shards");
    const unsigned char *b = v->data;
    for (int i = 0; i < s->n_global; i++) memcpy(&s->sums[i], b + 8 * (size_t)i, sizeof(double));
    return server_step_apply(s, e);
}

static int on_link_message(server *s, const wire_msg *m, err *e) {
    s->link_heard = progress_now();
    wire_out o;
    switch (m->env->body_case) {
    case PEFTPS__WIRE__ENVELOPE__BODY_WELCOME:
        s->link_registered = 1;
        server_log(s, LOG_INFO, "linked to server 0");
        /* Our step first, for server 0 to compare; then anything it missed. */
        link_send(s, peer_heartbeat(s, &o), NULL, 0);
        if (s->own_ready) peers_send_sums(s);
        if (s->final_sent) peers_send_final(s);
        return 0;
    case PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH:
        return on_link_sums(s, m, e);
    case PEFTPS__WIRE__ENVELOPE__BODY_SHUTDOWN:
        server_shutdown_workers(s, "training finished");
        s->finished = 1;
        return 0;
    case PEFTPS__WIRE__ENVELOPE__BODY_ERROR: {
        const Peftps__Wire__Error *er = m->env->error;
        if (er->code == PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED) {
            link_hello(s);
            return 0;
        }
        return err_set(e, "server 0 refused this server: %s", er->message ? er->message : "");
    }
    case PEFTPS__WIRE__ENVELOPE__BODY_HEARTBEAT:
        record_steps(s, 0, m->env->heartbeat);
        return 0;
    default:
        server_log(s, LOG_WARN, "server 0 sent an unexpected %s",
                   wire_body_name(m->env->body_case));
        return 0;
    }
}

int peers_link_poll(server *s, err *e) {
    for (int k = 0; k < 64 && !s->finished; k++) {
        int ev = 0;
        size_t evn = sizeof ev;
        if (zmq_getsockopt(s->link, ZMQ_EVENTS, &ev, &evn) < 0 || !(ev & ZMQ_POLLIN)) break;
        wire_msg m;
        memset(&m, 0, sizeof m);
        err me;
        int rc = 0;
        if (wire_recv(s->link, 0, &m, &s->lim, &me) < 0) {
            if (m.received) server_log(s, LOG_WARN, "server 0 sent a bad message: %s", me.msg);
        } else {
            rc = on_link_message(s, &m, e);
        }
        wire_msg_close(&m);
        if (rc < 0) return -1;
    }
    double now = progress_now();
    if (now - s->link_heard > s->server_timeout_s) {
        char advice[900];
        peers_resume_advice(s, advice, sizeof advice);
        return err_set(e,
                       "server 0 has been gone for %.0f s (cluster.server_timeout_ms): stopping "
                       "at step %llu without a checkpoint; %s",
                       now - s->link_heard, (unsigned long long)s->step, advice);
    }
    if (s->link_registered && now - s->link_heard > s->timeout_s) {
        server_log(s, LOG_WARN, "server 0 silent for %.1f s; registering again",
                   now - s->link_heard);
        link_hello(s);
    } else if (!s->link_registered && now - s->link_hello > s->timeout_s) {
        link_hello(s);
    } else if (s->link_registered && now - s->link_sent >= s->hb_s) {
        wire_out o;
        link_send(s, peer_heartbeat(s, &o), NULL, 0);
    }
    return 0;
}
