/* A stand-in peer of a pool's coordinator for tests/it_pool_cli.sh: plays a
 * worker, a server started outside the pool, or a hostile peer sending
 * frames that are not pool messages (net/poolmsg.h, proto/pool.proto), and
 * prints each answer on one line ("error: ..." or what came back).
 * Usage: pool_peer ENDPOINT garbage
 *        pool_peer ENDPOINT hello FINGERPRINT [PROTOCOL]
 *        pool_peer ENDPOINT worker FINGERPRINT JOB SECONDS
 *        pool_peer ENDPOINT announce EXPERIMENT.pbtxt INDEX FINGERPRINT
 *        pool_peer ENDPOINT status JOB INDEX STEP LOSS [done|failed|cancelled] */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "base/fsutil.h"
#include "base/rng.h"
#include "net/poolmsg.h"

static void *ctx;

static void *dealer(const char *ep) {
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int t = 5000, linger = 0;
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &t, sizeof t);
    zmq_setsockopt(s, ZMQ_SNDTIMEO, &t, sizeof t);
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(s, ep) < 0) {
        fprintf(stderr, "pool_peer: %s: %s\n", ep, zmq_strerror(errno));
        exit(1);
    }
    return s;
}

/* Prints one answer; returns 0 for an answer, 1 for an Error, -1 for none. */
static int print_answer(void *s) {
    Peftps__Pool__PoolMessage *r = NULL;
    err e;
    int rc = poolmsg_recv(s, 0, NULL, NULL, &r, &e);
    if (rc == 1) {
        printf("no answer\n");
        return -1;
    }
    if (rc < 0) {
        printf("bad answer: %s\n", e.msg);
        return -1;
    }
    int out = 0;
    switch (r->body_case) {
    case PEFTPS__POOL__POOL_MESSAGE__BODY_ERROR:
        printf("error: %s\n", r->error->message ? r->error->message : "");
        out = 1;
        break;
    case PEFTPS__POOL__POOL_MESSAGE__BODY_JOB_LIST:
        printf("job_list revision %llu jobs %zu unchanged %d",
               (unsigned long long)r->job_list->revision, r->job_list->n_jobs,
               (int)r->job_list->unchanged);
        for (size_t i = 0; i < r->job_list->n_jobs; i++)
            printf(" %s%s", r->job_list->jobs[i]->id,
                   r->job_list->jobs[i]->experiment ? "(+experiment)" : "");
        printf("\n");
        break;
    case PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_REPLY:
        printf("server_reply %s cancel %d\n", r->server_reply->id ? r->server_reply->id : "",
               (int)r->server_reply->cancel);
        break;
    case PEFTPS__POOL__POOL_MESSAGE__BODY_JOBS:
        printf("jobs %zu\n", r->jobs->n_jobs);
        break;
    default:
        printf("%s\n", poolmsg_body_name(r->body_case));
    }
    fflush(stdout);
    poolmsg_free(r);
    return out;
}

static int ask(void *s, const Peftps__Pool__PoolMessage *m) {
    err e;
    if (poolmsg_send(s, NULL, 0, m, &e) < 0) {
        printf("send failed: %s\n", e.msg);
        return -1;
    }
    return print_answer(s);
}

/* Sends raw frames; the answer must be an Error. */
static int raw(void *s, const char *what, const void *const *frames, const size_t *lens, int n) {
    for (int i = 0; i < n; i++)
        if (zmq_send(s, frames[i], lens[i], i + 1 < n ? ZMQ_SNDMORE : 0) < 0) {
            printf("%s: send failed: %s\n", what, zmq_strerror(errno));
            return -1;
        }
    printf("%s: ", what);
    return print_answer(s) == 1 ? 0 : -1;
}

static int garbage(const char *ep) {
    void *s = dealer(ep);
    int bad = 0;
    rng r;
    rng_seed(&r, 7, 0, 0, 0);
    unsigned char junk[4096];
    for (size_t i = 0; i < sizeof junk; i++) junk[i] = (unsigned char)rng_u64(&r);
    size_t lens[3] = {0};
    const void *fr[3] = {junk, junk, junk};
    /* Random bytes of several sizes: none is a pool message with a body. */
    static const size_t sizes[] = {1, 7, 64, 4096};
    for (int i = 0; i < 4; i++) {
        char what[32];
        lens[0] = sizes[i];
        snprintf(what, sizeof what, "random %zu bytes", sizes[i]);
        bad += raw(s, what, fr, lens, 1) < 0;
    }
    lens[0] = 0;
    bad += raw(s, "empty frame", fr, lens, 1) < 0;
    lens[0] = lens[1] = lens[2] = 5;
    bad += raw(s, "three frames", fr, lens, 3) < 0;
    /* Well-formed messages the coordinator must refuse. */
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    unsigned char nobody[8];
    size_t n = peftps__pool__pool_message__pack(&m, nobody);
    const void *fn[1] = {nobody};
    bad += raw(s, "no body", fn, &n, 1) < 0;
    Peftps__Pool__Jobs js = PEFTPS__POOL__JOBS__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_JOBS;
    m.jobs = &js;
    printf("a jobs message: ");
    bad += ask(s, &m) != 1;
    Peftps__Pool__Submit sub = PEFTPS__POOL__SUBMIT__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SUBMIT;
    m.submit = &sub;
    printf("submit without experiment: ");
    bad += ask(s, &m) != 1;
    char text[600];
    memcpy(text, junk, 512);
    for (int i = 0; i < 512; i++) text[i] = (char)(32 + (junk[i] % 95));
    text[512] = '\0';
    sub.experiment = text;
    sub.source = "junk.pbtxt";
    printf("submit of junk text: ");
    bad += ask(s, &m) != 1;
    Peftps__Pool__WorkerStatus ws = PEFTPS__POOL__WORKER_STATUS__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_WORKER_STATUS;
    m.worker_status = &ws;
    printf("status of an unregistered worker: ");
    bad += ask(s, &m) != 1;
    Peftps__Pool__ServerStatus ss = PEFTPS__POOL__SERVER_STATUS__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_STATUS;
    m.server_status = &ss;
    printf("server status without a job: ");
    bad += ask(s, &m) != 1;
    Peftps__Pool__ServerAnnounce sa = PEFTPS__POOL__SERVER_ANNOUNCE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_ANNOUNCE;
    m.server_announce = &sa;
    printf("empty announce: ");
    bad += ask(s, &m) != 1;
    Peftps__Pool__Cancel c = PEFTPS__POOL__CANCEL__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_CANCEL;
    m.cancel = &c;
    printf("cancel without id: ");
    bad += ask(s, &m) != 1;
    /* Still answering. */
    Peftps__Pool__ListJobs l = PEFTPS__POOL__LIST_JOBS__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_LIST_JOBS;
    m.list_jobs = &l;
    printf("list after all that: ");
    bad += ask(s, &m) != 0;
    zmq_close(s);
    printf("%d unexpected answer(s)\n", bad);
    return bad ? 1 : 0;
}

/* ---- storm: many random well-formed messages ------------------------------ */

static uint64_t pick(rng *r, uint64_t n) {
    return rng_u64(r) % n;
}

static double odd_number(rng *r) {
    static const double v[] = {0, 1, -1, 1e308, -1e308, 3600.5, 1e-300, 0.5};
    switch (pick(r, 4)) {
    case 0:
        return NAN;
    case 1:
        return pick(r, 2) ? INFINITY : -INFINITY;
    default:
        return v[pick(r, 8)];
    }
}

static const char *some_id(rng *r, char *buf) {
    static const char *ids[] = {"ext", "lora", "quick", "", "../x", "a b"};
    if (pick(r, 4)) return ids[pick(r, 6)];
    size_t n = pick(r, 40);
    for (size_t i = 0; i < n; i++) buf[i] = (char)(32 + pick(r, 95));
    buf[n] = '\0';
    return buf;
}

/* The experiment text cut short, or with one byte changed, or whole. */
static char *some_text(rng *r, const char *text, size_t len) {
    char *t = malloc(len + 1);
    memcpy(t, text, len + 1);
    switch (pick(r, 3)) {
    case 0:
        t[pick(r, len + 1)] = '\0';
        break;
    case 1:
        if (len) t[pick(r, len)] = (char)(32 + pick(r, 95));
        break;
    }
    return t;
}

/* n random messages of every kind, each on a new or the same DEALER, with
 * ids, indices, states, numbers and texts a coordinator must check; every
 * one must be answered. */
static int storm(const char *ep, uint64_t seed, int n, const char *fp, const char *path) {
    char *text;
    size_t len;
    err e;
    if (fs_read_file(path, 0, &text, &len, &e) < 0) {
        fprintf(stderr, "pool_peer: %s\n", e.msg);
        return 1;
    }
    rng r;
    rng_seed(&r, seed, 1, 2, 3);
    void *s = dealer(ep);
    int unanswered = 0, errors = 0;
    for (int i = 0; i < n; i++) {
        if (pick(&r, 8) == 0) {
            zmq_close(s);
            s = dealer(ep);
        }
        char b1[64], b2[64];
        char *t = NULL;
        Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
        Peftps__Pool__WorkerHello h = PEFTPS__POOL__WORKER_HELLO__INIT;
        Peftps__Pool__WorkerStatus ws = PEFTPS__POOL__WORKER_STATUS__INIT;
        Peftps__Pool__JobUsage u[3], *up[3];
        Peftps__Pool__Submit sub = PEFTPS__POOL__SUBMIT__INIT;
        Peftps__Pool__ListJobs l = PEFTPS__POOL__LIST_JOBS__INIT;
        Peftps__Pool__Cancel c = PEFTPS__POOL__CANCEL__INIT;
        Peftps__Pool__ServerAnnounce a = PEFTPS__POOL__SERVER_ANNOUNCE__INIT;
        Peftps__Pool__ServerStatus st = PEFTPS__POOL__SERVER_STATUS__INIT;
        Peftps__Pool__JobList jl = PEFTPS__POOL__JOB_LIST__INIT;
        switch (pick(&r, 9)) {
        case 0:
            h.has_protocol_version = 1;
            h.protocol_version = pick(&r, 4) ? POOLMSG_PROTOCOL_VERSION : (uint32_t)rng_u64(&r);
            h.worker_id = (char *)some_id(&r, b1);
            h.base_fingerprint = pick(&r, 3) ? (char *)fp : (char *)some_id(&r, b2);
            h.has_bf16 = 1, h.bf16 = (int)pick(&r, 2);
            m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_WORKER_HELLO, m.worker_hello = &h;
            break;
        case 1:
            ws.has_have_revision = 1, ws.have_revision = pick(&r, 5);
            ws.n_usage = pick(&r, 4);
            for (size_t k = 0; k < ws.n_usage; k++) {
                peftps__pool__job_usage__init(&u[k]);
                u[k].id = (char *)(k ? "lora" : some_id(&r, b1));
                u[k].has_compute_s = u[k].has_shards = 1;
                u[k].compute_s = pick(&r, 2) ? (double)pick(&r, 100) / 10 : odd_number(&r);
                u[k].shards = rng_u64(&r) >> pick(&r, 64);
                up[k] = &u[k];
            }
            ws.usage = up;
            m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_WORKER_STATUS, m.worker_status = &ws;
            break;
        case 2:
            sub.experiment = t = some_text(&r, text, len);
            sub.source = (char *)some_id(&r, b1);
            if (pick(&r, 2)) sub.has_share = 1, sub.share = odd_number(&r);
            m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SUBMIT, m.submit = &sub;
            break;
        case 3:
            m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_LIST_JOBS, m.list_jobs = &l;
            break;
        case 4:
            c.id = (char *)some_id(&r, b1);
            m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_CANCEL, m.cancel = &c;
            break;
        case 5:
            if (pick(&r, 2)) a.id = (char *)some_id(&r, b1);
            if (pick(&r, 4)) a.experiment = t = some_text(&r, text, len);
            a.has_index = 1, a.index = pick(&r, 3) ? (uint32_t)pick(&r, 3) : (uint32_t)rng_u64(&r);
            a.base_fingerprint = pick(&r, 3) ? (char *)fp : (char *)some_id(&r, b2);
            if (pick(&r, 3) == 0) a.fingerprint = (char *)some_id(&r, b2);
            m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_ANNOUNCE;
            m.server_announce = &a;
            break;
        case 6:
            st.id = (char *)some_id(&r, b1);
            st.has_index = st.has_step = st.has_total_steps = st.has_loss = 1;
            st.index = pick(&r, 3) ? (uint32_t)pick(&r, 2) : (uint32_t)rng_u64(&r);
            st.step = rng_u64(&r) >> pick(&r, 64);
            st.total_steps = rng_u64(&r) >> pick(&r, 64);
            st.loss = odd_number(&r);
            st.has_tokens_per_s = 1, st.tokens_per_s = odd_number(&r);
            if (pick(&r, 2)) st.has_state = 1, st.state = (Peftps__Pool__JobState)pick(&r, 7);
            if (pick(&r, 2)) st.message = (char *)some_id(&r, b2);
            m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_STATUS, m.server_status = &st;
            break;
        default:
            m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_JOB_LIST, m.job_list = &jl;
        }
        int rc = ask(s, &m);
        free(t);
        if (rc < 0) {
            unanswered++;
            zmq_close(s);
            s = dealer(ep);
        }
        errors += rc == 1;
    }
    zmq_close(s);
    free(text);
    printf("storm: %d messages, %d refused, %d unanswered\n", n, errors, unanswered);
    return unanswered ? 1 : 0;
}

static void hello_msg(Peftps__Pool__PoolMessage *m, Peftps__Pool__WorkerHello *h, const char *fp,
                      unsigned proto) {
    h->has_protocol_version = 1;
    h->protocol_version = proto;
    h->worker_id = "pool-peer";
    h->base_fingerprint = (char *)fp;
    m->body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_WORKER_HELLO;
    m->worker_hello = h;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: pool_peer ENDPOINT garbage|hello|worker|announce|status ...\n");
        return 2;
    }
    ctx = zmq_ctx_new();
    const char *ep = argv[1], *cmd = argv[2];
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    int rc = 2;
    if (!strcmp(cmd, "garbage")) {
        rc = garbage(ep);
    } else if (!strcmp(cmd, "storm") && argc >= 7) {
        rc = storm(ep, strtoull(argv[3], NULL, 10), atoi(argv[4]), argv[5], argv[6]);
    } else if (!strcmp(cmd, "hello") && argc >= 4) {
        Peftps__Pool__WorkerHello h = PEFTPS__POOL__WORKER_HELLO__INIT;
        hello_msg(&m, &h, argv[3], argc > 4 ? (unsigned)atoi(argv[4]) : POOLMSG_PROTOCOL_VERSION);
        void *s = dealer(ep);
        rc = ask(s, &m) == 0 ? 0 : 1;
        zmq_close(s);
    } else if (!strcmp(cmd, "worker") && argc >= 6) {
        Peftps__Pool__WorkerHello h = PEFTPS__POOL__WORKER_HELLO__INIT;
        hello_msg(&m, &h, argv[3], POOLMSG_PROTOCOL_VERSION);
        void *s = dealer(ep);
        rc = ask(s, &m) == 0 ? 0 : 1;
        Peftps__Pool__JobUsage u = PEFTPS__POOL__JOB_USAGE__INIT, *up = &u;
        u.id = argv[4];
        u.has_compute_s = u.has_shards = 1;
        u.compute_s = atof(argv[5]);
        u.shards = 1;
        Peftps__Pool__WorkerStatus ws = PEFTPS__POOL__WORKER_STATUS__INIT;
        ws.n_usage = 1;
        ws.usage = &up;
        m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_WORKER_STATUS;
        m.worker_status = &ws;
        if (rc == 0) rc = ask(s, &m) == 0 ? 0 : 1;
        zmq_close(s);
    } else if (!strcmp(cmd, "announce") && argc >= 6) {
        char *text;
        size_t len;
        err e;
        if (fs_read_file(argv[3], 0, &text, &len, &e) < 0) {
            fprintf(stderr, "pool_peer: %s\n", e.msg);
            return 1;
        }
        Peftps__Pool__ServerAnnounce a = PEFTPS__POOL__SERVER_ANNOUNCE__INIT;
        a.experiment = text;
        a.has_index = 1;
        a.index = (uint32_t)atoi(argv[4]);
        a.base_fingerprint = argv[5];
        m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_ANNOUNCE;
        m.server_announce = &a;
        void *s = dealer(ep);
        rc = ask(s, &m) == 0 ? 0 : 1;
        zmq_close(s);
        free(text);
    } else if (!strcmp(cmd, "status") && argc >= 7) {
        Peftps__Pool__ServerStatus st = PEFTPS__POOL__SERVER_STATUS__INIT;
        st.id = argv[3];
        st.has_index = st.has_step = st.has_loss = st.has_total_steps = 1;
        st.index = (uint32_t)atoi(argv[4]);
        st.step = (uint64_t)atoll(argv[5]);
        st.loss = atof(argv[6]);
        st.total_steps = 0;
        if (argc > 7) {
            st.has_state = 1;
            st.state = !strcmp(argv[7], "done")        ? PEFTPS__POOL__JOB_STATE__DONE
                       : !strcmp(argv[7], "cancelled") ? PEFTPS__POOL__JOB_STATE__CANCELLED
                                                       : PEFTPS__POOL__JOB_STATE__FAILED;
            st.message = !strcmp(argv[7], "done") ? "" : "the peer says it failed";
        }
        m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SERVER_STATUS;
        m.server_status = &st;
        void *s = dealer(ep);
        rc = ask(s, &m) == 0 ? 0 : 1;
        zmq_close(s);
    } else {
        fprintf(stderr, "pool_peer: unknown or incomplete command '%s'\n", cmd);
    }
    zmq_ctx_term(ctx);
    return rc;
}
