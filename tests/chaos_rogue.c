/* The rogue peer of the chaos test (tests/chaos.sh): registers with server 0
 * of an experiment like a worker (no CURVE), and answers every assignment
 * with a poisoned push: a NaN loss, a NaN or infinite gradient, or every
 * value 1e30, chosen by a seeded generator. When the server drops it or goes
 * away it connects again under a new identity, until SIGTERM or the end of
 * the run; then prints what it sent and how the server answered.
 * Usage: chaos_rogue EXPERIMENT SEED [--set FIELD=VALUE]... */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

#include "base/rng.h"
#include "config/config.h"
#include "model/model.h"
#include "net/wire.h"
#include "train/experiment.h"

static volatile sig_atomic_t stop;

static void on_signal(int sig) {
    stop = 1;
}

enum { P_NAN_LOSS, P_NAN_GRAD, P_INF_GRAD, P_HUGE_GRAD, P_KINDS };
static const char *const kind_name[P_KINDS] = {"NaN loss", "NaN gradient", "infinite gradient",
                                               "1e30 gradient"};

typedef struct tally {
    long pushes[P_KINDS], refused, accepted, drops, connections;
} tally;

/* The tensor table from a Welcome: names and shapes to push under. */
typedef struct table {
    int n;
    char **names;
    wire_tensor *t;
    float *data;
    size_t floats;
} table;

static void table_free(table *tb) {
    for (int i = 0; i < tb->n; i++) free(tb->names[i]);
    free(tb->names);
    free(tb->t);
    free(tb->data);
    memset(tb, 0, sizeof *tb);
}

static int table_from(table *tb, const wire_msg *m) {
    table_free(tb);
    tb->n = m->n_tensors;
    tb->names = calloc((size_t)tb->n + 1, sizeof *tb->names);
    tb->t = calloc((size_t)tb->n + 1, sizeof *tb->t);
    if (!tb->names || !tb->t) return -1;
    for (int i = 0; i < tb->n; i++) tb->floats += m->tensors[i].numel;
    tb->data = malloc((tb->floats ? tb->floats : 1) * sizeof(float));
    if (!tb->data) return -1;
    size_t off = 0;
    for (int i = 0; i < tb->n; i++) {
        const wire_view *v = &m->tensors[i];
        tb->names[i] = strdup(v->name);
        if (!tb->names[i]) return -1;
        tb->t[i].name = tb->names[i];
        tb->t[i].dtype = PEFTPS__WIRE__DTYPE__F32;
        tb->t[i].ndim = v->ndim;
        for (int d = 0; d < v->ndim; d++) tb->t[i].shape[d] = v->shape[d];
        tb->t[i].data = tb->data + off;
        tb->t[i].nbytes = v->numel * sizeof(float);
        off += v->numel;
    }
    return 0;
}

static void poisoned_push(void *s, table *tb, rng *r, const Peftps__Wire__Assign *a, tally *y) {
    int kind = (int)(rng_u64(r) % P_KINDS);
    float fill = kind == P_HUGE_GRAD ? 1e30f : 1e-3f;
    for (size_t i = 0; i < tb->floats; i++) tb->data[i] = fill;
    if (tb->floats && kind == P_NAN_GRAD) tb->data[rng_u64(r) % tb->floats] = NAN;
    if (tb->floats && kind == P_INF_GRAD) tb->data[rng_u64(r) % tb->floats] = INFINITY;
    double loss = kind == P_NAN_LOSS ? NAN : 1.0;
    wire_out o;
    err e;
    Peftps__Wire__Envelope *env =
        wire_grad_push(&o, a->step, a->version, a->n_shards ? a->shards[0] : 0, loss, 64);
    if (wire_send(s, NULL, 0, env, tb->t, tb->n, &e) == 0) y->pushes[kind]++;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: chaos_rogue EXPERIMENT SEED [--set FIELD=VALUE]...\n");
        return 2;
    }
    char *sets[64];
    int nsets = 0;
    for (int i = 3; i + 1 < argc && nsets < 64; i += 2)
        if (!strcmp(argv[i], "--set")) sets[nsets++] = argv[i + 1];
    Peftps__Experiment *exp;
    err e;
    if (experiment_load(argv[1], sets, nsets, &exp, NULL, &e) < 0) {
        fprintf(stderr, "chaos_rogue: %s\n", e.msg);
        return 1;
    }
    char exp_fp[65], base_fp[65];
    config_fingerprint(exp, exp_fp);
    model_files *mf;
    if (model_files_open(&mf, exp->model->path, &e) < 0) {
        fprintf(stderr, "chaos_rogue: %s\n", e.msg);
        return 1;
    }
    snprintf(base_fp, sizeof base_fp, "%s", model_files_fingerprint(mf));
    model_files_close(mf);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    rng r;
    rng_seed(&r, strtoull(argv[2], NULL, 10), 0x706f6973, 0, 0);
    void *ctx = zmq_ctx_new();
    tally y;
    memset(&y, 0, sizeof y);
    table tb;
    memset(&tb, 0, sizeof tb);
    int finished = 0;
    while (!stop && !finished) {
        void *s = zmq_socket(ctx, ZMQ_DEALER);
        int linger = 0, rcv = 250;
        zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
        zmq_setsockopt(s, ZMQ_RCVTIMEO, &rcv, sizeof rcv);
        zmq_connect(s, exp->cluster->servers[0]);
        y.connections++;
        char name[64];
        snprintf(name, sizeof name, "rogue-%ld", y.connections);
        wire_out o;
        wire_send(s, NULL, 0, wire_hello(&o, name, base_fp, exp_fp, "chaos", 1), NULL, 0, &e);
        int quiet = 0; /* receive timeouts in a row */
        while (!stop && quiet < 12) {
            wire_msg m;
            memset(&m, 0, sizeof m);
            if (wire_recv(s, 0, &m, NULL, &e) < 0) {
                quiet += !m.received;
                wire_msg_close(&m);
                continue;
            }
            quiet = 0;
            int body = m.env->body_case, again = 0;
            if (body == PEFTPS__WIRE__ENVELOPE__BODY_WELCOME) {
                if (table_from(&tb, &m) < 0) {
                    fprintf(stderr, "chaos_rogue: out of memory\n");
                    return 1;
                }
                Peftps__Wire__Envelope *pull = wire_pull(&o, 0);
                o.body.pull.has_have_version = 0;
                wire_send(s, NULL, 0, pull, NULL, 0, &e);
            } else if (body == PEFTPS__WIRE__ENVELOPE__BODY_ASSIGN && tb.n) {
                poisoned_push(s, &tb, &r, m.env->assign, &y);
            } else if (body == PEFTPS__WIRE__ENVELOPE__BODY_ERROR) {
                const char *text = m.env->error->message ? m.env->error->message : "";
                if (strstr(text, "refused:")) {
                    y.refused++;
                    wire_send(s, NULL, 0, wire_pull(&o, 0), NULL, 0, &e);
                } else {
                    /* Dropped, or the server restarted: a new identity. */
                    y.drops += m.env->error->code == PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED;
                    again = 1;
                }
            } else if (body == PEFTPS__WIRE__ENVELOPE__BODY_SHUTDOWN) {
                const char *why = m.env->shutdown->reason ? m.env->shutdown->reason : "";
                finished = strstr(why, "finished") != NULL;
                again = 1;
            }
            wire_msg_close(&m);
            if (again) break;
        }
        zmq_close(s);
        struct timespec nap = {0, 100 * 1000 * 1000};
        nanosleep(&nap, NULL);
    }
    long total = 0;
    for (int k = 0; k < P_KINDS; k++) total += y.pushes[k];
    printf("rogue: %ld connections, %ld poisoned pushes (", y.connections, total);
    for (int k = 0; k < P_KINDS; k++) printf("%s%ld %s", k ? ", " : "", y.pushes[k], kind_name[k]);
    printf("), %ld refused, %ld times unregistered\n", y.refused, y.drops);
    table_free(&tb);
    zmq_ctx_term(ctx);
    config_free(exp);
    return 0;
}
