/* A rogue client against a real parameter server (bin/peftps-server, started
 * here over loopback TCP on a free port): garbage, truncated and oversized
 * frames, messages before Hello, wrong fingerprints, and, once registered,
 * wrong shapes, wrong versions, unassigned and out-of-range shards and a
 * duplicate shard, a NaN loss, a NaN gradient and a gradient of 1e30 (after
 * three such refusals the peer is dropped). Each gets its Error (or, for an oversized frame, a
 * dropped connection), the server keeps running with bounded memory, and
 * after a real worker (bin/peftps-worker) finishes the run the tensors are
 * bit-identical to `peftps train`. With CURVE on, a client whose key is not
 * listed can neither register nor push, while a listed one registers.
 * Needs the programs in $BIN (default bin) and the fixtures. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <time.h>
#include <unistd.h>

#include "config/config.h"
#include "train/experiment.h"
#include "net/curve.h"
#include "model/model.h"
#include "train/train.h"
#include "net/wire.h"

#define EXP "examples/lora.pbtxt"
/* Under AddressSanitizer (make test-asan) freed memory stays in its
 * quarantine: the storms' memory bounds are not checked there. */
#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#else
#define SANITIZED 0
#endif
#define STEPS "12"
#define REPLY_MS 3000

typedef struct cluster {
    char dir[64];
    char endpoint[64];
    char sets[8][200];
    char *argv[32];
    int argc_sets;
    pid_t server;
    void *ctx;
    Peftps__Experiment *exp;
    char exp_fp[65];
    char base_fp[65];
} cluster;

static const char *bin_dir(void) {
    const char *b = getenv("BIN");
    return b && *b ? b : "bin";
}

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t n = sizeof a;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &n), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* Runs BIN/prog EXP with the cluster's --set options and `extra`, output to
 * DIR/log; returns the pid. */
static pid_t spawn(cluster *c, const char *prog, const char *log, char *const *extra, int nextra) {
    char path[256], logpath[256];
    snprintf(path, sizeof path, "%s/%s", bin_dir(), prog);
    snprintf(logpath, sizeof logpath, "%s/%s", c->dir, log);
    char *argv[48];
    int n = 0;
    argv[n++] = path;
    if (!strcmp(prog, "peftps")) argv[n++] = "train";
    argv[n++] = EXP;
    for (int i = 0; i < c->argc_sets; i++) {
        argv[n++] = "--set";
        argv[n++] = c->sets[i];
    }
    for (int i = 0; i < nextra; i++) argv[n++] = extra[i];
    argv[n] = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        setenv("OPENBLAS_NUM_THREADS", "1", 1);
        execv(path, argv);
        _exit(127);
    }
    return pid;
}

/* Exit status of pid, waiting at most `seconds`; -1 on timeout (killed). */
static int wait_status(pid_t pid, int seconds) {
    for (int i = 0; i < seconds * 20; i++) {
        int st;
        pid_t p = waitpid(pid, &st, WNOHANG);
        if (p == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        struct timespec nap = {0, 50 * 1000 * 1000};
        nanosleep(&nap, NULL);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return -1;
}

static int alive(pid_t pid) {
    return waitpid(pid, NULL, WNOHANG) == 0;
}

static long rss_kib(pid_t pid) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    long kib = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1) break;
    if (f) fclose(f);
    return kib;
}

static long file_size_of(const char *dir, const char *name) {
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static void cluster_setup(cluster *c, const char *extra_set) {
    snprintf(c->dir, sizeof c->dir, "/tmp/peftps_rogue_XXXXXX");
    assert_non_null(mkdtemp(c->dir));
    snprintf(c->endpoint, sizeof c->endpoint, "tcp://127.0.0.1:%d", free_port());
    int n = 0;
    snprintf(c->sets[n++], sizeof c->sets[0], "schedule.total_steps=" STEPS);
    snprintf(c->sets[n++], sizeof c->sets[0], "cluster.servers=%s", c->endpoint);
    snprintf(c->sets[n++], sizeof c->sets[0], "cluster.heartbeat_ms=100");
    snprintf(c->sets[n++], sizeof c->sets[0], "cluster.worker_timeout_ms=1500");
    snprintf(c->sets[n++], sizeof c->sets[0], "output_dir=%s/out", c->dir);
    if (extra_set) snprintf(c->sets[n++], sizeof c->sets[0], "%s", extra_set);
    c->argc_sets = n;
    /* The experiment as the server resolves it, for the fingerprints. */
    char *sets[8];
    for (int i = 0; i < n; i++) sets[i] = c->sets[i];
    err e;
    if (experiment_load(EXP, sets, n, &c->exp, NULL, &e) < 0) fail_msg("%s", e.msg);
    config_fingerprint(c->exp, c->exp_fp);
    model_files *mf;
    if (model_files_open(&mf, c->exp->model->path, &e) < 0) fail_msg("%s", e.msg);
    snprintf(c->base_fp, sizeof c->base_fp, "%s", model_files_fingerprint(mf));
    model_files_close(mf);
    c->ctx = zmq_ctx_new();
    assert_non_null(c->ctx);
}

static void cluster_teardown(cluster *c) {
    if (c->server > 0 && alive(c->server)) {
        kill(c->server, SIGKILL);
        waitpid(c->server, NULL, 0);
    }
    if (c->ctx) zmq_ctx_term(c->ctx);
    config_free(c->exp);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", c->dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", c->dir);
}

static void *dealer(cluster *c, const curve_keys *mine, const char *server_public) {
    void *s = zmq_socket(c->ctx, ZMQ_DEALER);
    assert_non_null(s);
    int linger = 0, rcv = REPLY_MS;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &rcv, sizeof rcv);
    err e;
    if (mine && curve_client_setup(s, mine, server_public, &e) < 0) fail_msg("%s", e.msg);
    assert_int_equal(zmq_connect(s, c->endpoint), 0);
    return s;
}

/* The next message on s, skipping heartbeats; 0 when none came in time. */
static int next_msg(void *s, wire_msg *m) {
    for (;;) {
        err e;
        memset(m, 0, sizeof *m);
        if (wire_recv(s, 0, m, NULL, &e) < 0) {
            if (!m->received) return 0;
            fail_msg("the server sent a malformed message: %s", e.msg);
        }
        if (m->env->body_case != PEFTPS__WIRE__ENVELOPE__BODY_HEARTBEAT) return 1;
        wire_msg_close(m);
    }
}

static void expect_error(void *s, Peftps__Wire__ErrorCode code, const char *what) {
    wire_msg m;
    if (!next_msg(s, &m)) fail_msg("%s: no reply", what);
    if (m.env->body_case != PEFTPS__WIRE__ENVELOPE__BODY_ERROR)
        fail_msg("%s: got %s, wanted an Error", what, wire_body_name(m.env->body_case));
    if ((int)m.env->error->code != (int)code)
        fail_msg("%s: error code %d (%s), wanted %d", what, m.env->error->code,
                 m.env->error->message, code);
    wire_msg_close(&m);
}

static void expect_body(void *s, int body, wire_msg *m, const char *what) {
    if (!next_msg(s, m)) fail_msg("%s: no reply", what);
    if ((int)m->env->body_case != body)
        fail_msg("%s: got %s (%s), wanted %s", what, wire_body_name(m->env->body_case),
                 m->env->body_case == PEFTPS__WIRE__ENVELOPE__BODY_ERROR ? m->env->error->message
                                                                         : "",
                 wire_body_name(body));
}

static void send_env(void *s, const Peftps__Wire__Envelope *env, const wire_tensor *t, int n) {
    err e;
    if (wire_send(s, NULL, 0, env, t, n, &e) < 0) fail_msg("%s", e.msg);
}

static void send_raw(void *s, const void *p, size_t n, int more) {
    assert_true(zmq_send(s, p, n, more ? ZMQ_SNDMORE : 0) == (int)n);
}

static void hello(cluster *c, void *s, const char *exp_fp, uint32_t proto) {
    wire_out o;
    Peftps__Wire__Envelope *env = wire_hello(&o, "rogue", c->base_fp, exp_fp, "rogue", 1);
    o.body.hello.protocol_version = proto;
    send_env(s, env, NULL, 0);
}

/* ---- the rogue ------------------------------------------------------------------------- */

static cluster rc;

static int rogue_setup(void **state) {
    cluster_setup(&rc, NULL);
    char ref_dir[200];
    snprintf(ref_dir, sizeof ref_dir, "output_dir=%s/ref", rc.dir);
    char *extra[] = {"--set", ref_dir};
    pid_t t = spawn(&rc, "peftps", "train.log", extra, 2);
    if (wait_status(t, 60) != 0) fail_msg("peftps train failed; see %s/train.log", rc.dir);
    rc.server = spawn(&rc, "peftps-server", "server.log", NULL, 0);
    /* The server answers once it has bound. */
    void *s = dealer(&rc, NULL, NULL);
    wire_out o;
    send_env(s, wire_pull(&o, 0), NULL, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED, "server start");
    zmq_close(s);
    return 0;
}

static int rogue_teardown(void **state) {
    cluster_teardown(&rc);
    return 0;
}

static void test_garbage_and_truncated(void **state) {
    void *s = dealer(&rc, NULL, NULL);
    unsigned char junk[333];
    for (size_t i = 0; i < sizeof junk; i++) junk[i] = (unsigned char)(i * 151 + 7);
    send_raw(s, junk, sizeof junk, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__MALFORMED, "garbage header");

    send_raw(s, "", 0, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__MALFORMED, "empty frame");

    /* A GradPush header announcing a tensor whose frame never comes. */
    Peftps__Wire__TensorHeader h = PEFTPS__WIRE__TENSOR_HEADER__INIT;
    Peftps__Wire__TensorHeader *hs[1] = {&h};
    uint64_t shape[1] = {4};
    h.name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    h.has_dtype = h.has_nbytes = h.has_crc32c = 1;
    h.dtype = PEFTPS__WIRE__DTYPE__F32;
    h.nbytes = 16;
    h.shape = shape;
    h.n_shape = 1;
    Peftps__Wire__GradPush gp = PEFTPS__WIRE__GRAD_PUSH__INIT;
    gp.n_tensors = 1;
    gp.tensors = hs;
    Peftps__Wire__Envelope env = PEFTPS__WIRE__ENVELOPE__INIT;
    env.body_case = PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH;
    env.grad_push = &gp;
    uint8_t buf[512];
    size_t n = peftps__wire__envelope__pack(&env, buf);
    send_raw(s, buf, n, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__MALFORMED, "missing tensor frame");
    /* And a frame shorter than its header says. */
    send_raw(s, buf, n, 1);
    send_raw(s, junk, 10, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__MALFORMED, "truncated tensor frame");
    zmq_close(s);
    assert_true(alive(rc.server));
}

static void test_before_hello_and_bad_hello(void **state) {
    void *s = dealer(&rc, NULL, NULL);
    wire_out o;
    send_env(s, wire_pull(&o, 0), NULL, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED, "pull before hello");
    send_env(s, wire_grad_push(&o, 0, 0, 0, 1.0, 1), NULL, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED, "push before hello");
    hello(&rc, s, "0000000000000000000000000000000000000000000000000000000000000000",
          WIRE_PROTOCOL_VERSION);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__FINGERPRINT_MISMATCH, "another experiment");
    hello(&rc, s, rc.exp_fp, WIRE_PROTOCOL_VERSION + 1);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__MALFORMED, "another protocol");
    /* Still not registered after refused Hellos. */
    send_env(s, wire_pull(&o, 0), NULL, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED, "pull after refused hello");
    zmq_close(s);
}

static void test_oversized_frame(void **state) {
    void *s = dealer(&rc, NULL, NULL);
    size_t big = (size_t)64 << 20;
    char *p = calloc(1, big);
    assert_non_null(p);
    send_raw(s, p, big, 0);
    free(p);
    /* libzmq drops the connection at ZMQ_MAXMSGSIZE: no reply comes. */
    wire_msg m;
    int got = next_msg(s, &m);
    if (got) wire_msg_close(&m);
    assert_false(got);
    zmq_close(s);
    assert_true(alive(rc.server));
    s = dealer(&rc, NULL, NULL);
    wire_out o;
    send_env(s, wire_pull(&o, 0), NULL, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED, "after the oversized frame");
    zmq_close(s);
}

/* Copies a Snapshot into the trainer's params. */
static void take_snapshot(trainer *t, const wire_msg *m) {
    err e;
    for (int i = 0; i < m->n_tensors; i++) {
        int k = peft_find_tensor(t->p, m->tensors[i].name);
        assert_true(k >= 0);
        if (wire_tensor_copy_f32(&m->tensors[i], peft_param(t->p, k), t->p->tensors[k].numel, &e) <
            0)
            fail_msg("%s", e.msg);
    }
    peft_refresh(t->p);
}

static void push(void *s, trainer *t, uint64_t step, uint64_t version, uint32_t shard, double loss,
                 long ntok, int wrong_shape) {
    peft *p = t->p;
    wire_tensor *wt = calloc((size_t)p->n_tensors, sizeof *wt);
    assert_non_null(wt);
    for (int i = 0; i < p->n_tensors; i++) {
        const peft_tensor *pt = &p->tensors[i];
        wt[i].name = pt->name;
        wt[i].dtype = PEFTPS__WIRE__DTYPE__F32;
        wt[i].ndim = pt->ndim;
        for (int d = 0; d < pt->ndim; d++) wt[i].shape[d] = pt->shape[d];
        wt[i].data = p->grads + pt->offset;
        wt[i].nbytes = pt->numel * sizeof(float);
    }
    if (wrong_shape) {
        /* Same bytes, another shape: (a, b) read as (b, a). */
        int64_t a = wt[0].shape[0];
        wt[0].shape[0] = wt[0].shape[1];
        wt[0].shape[1] = a;
        assert_true(wt[0].shape[0] != wt[0].shape[1]);
    }
    wire_out o;
    send_env(s, wire_grad_push(&o, step, version, shard, loss, (uint64_t)ntok), wt, p->n_tensors);
    free(wt);
}

static void test_registered_abuse(void **state) {
    err e;
    trainer *t;
    if (trainer_open(&t, rc.exp, 0, &e) < 0) fail_msg("%s", e.msg);
    void *s = dealer(&rc, NULL, NULL);
    hello(&rc, s, rc.exp_fp, WIRE_PROTOCOL_VERSION);
    wire_msg m;
    expect_body(s, PEFTPS__WIRE__ENVELOPE__BODY_WELCOME, &m, "hello");
    assert_int_equal(m.n_tensors, t->p->n_tensors);
    wire_msg_close(&m);
    wire_out o;
    Peftps__Wire__Envelope *pull = wire_pull(&o, 0);
    o.body.pull.has_have_version = 0;
    send_env(s, pull, NULL, 0);
    expect_body(s, PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT, &m, "first pull");
    assert_int_equal(m.env->snapshot->version, 0);
    take_snapshot(t, &m);
    wire_msg_close(&m);
    expect_body(s, PEFTPS__WIRE__ENVELOPE__BODY_ASSIGN, &m, "first pull");
    uint32_t shard = m.env->assign->shards[0];
    assert_int_equal(m.env->assign->step, 0);
    wire_msg_close(&m);

    double loss;
    long ntok;
    if (trainer_shard_grad(t, 0, shard, &loss, &ntok, &e) < 0) fail_msg("%s", e.msg);
    push(s, t, 0, 0, shard, loss, ntok, 1);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__BAD_TENSOR, "wrong shape");

    /* The shard was taken back; ask for work again. */
    send_env(s, wire_pull(&o, 0), NULL, 0);
    expect_body(s, PEFTPS__WIRE__ENVELOPE__BODY_ASSIGN, &m, "pull after bad tensor");
    shard = m.env->assign->shards[0];
    wire_msg_close(&m);
    uint32_t S = rc.exp->data->shards_per_step;
    if (trainer_shard_grad(t, 0, shard, &loss, &ntok, &e) < 0) fail_msg("%s", e.msg);
    push(s, t, 0, 7, shard, loss, ntok, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__STALE, "wrong version");
    push(s, t, 3, 0, shard, loss, ntok, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__STALE, "wrong step");
    push(s, t, 0, 0, (shard + 1) % S, loss, ntok, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__STALE, "unassigned shard");
    push(s, t, 0, 0, S + 5, loss, ntok, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__MALFORMED, "shard out of range");

    /* The real gradient is accepted: the answer is the next assignment. */
    push(s, t, 0, 0, shard, loss, ntok, 0);
    expect_body(s, PEFTPS__WIRE__ENVELOPE__BODY_ASSIGN, &m, "good push");
    assert_int_not_equal(m.env->assign->shards[0], shard);
    wire_msg_close(&m);
    push(s, t, 0, 0, shard, loss, ntok, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__DUPLICATE, "duplicate shard");
    /* Unexpected bodies from a worker. */
    send_env(s, wire_shutdown(&o, "no"), NULL, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__MALFORMED, "shutdown from a worker");

    /* A flood of garbage: every message answered, memory bounded, and the
     * log holds a few lines of it, not one per message. */
    long before = rss_kib(rc.server);
    long log_before = file_size_of(rc.dir, "server.log");
    unsigned char junk[4096];
    for (size_t i = 0; i < sizeof junk; i++) junk[i] = (unsigned char)(i * 37 + 1);
    for (int i = 0; i < 2000; i++) {
        send_raw(s, junk, sizeof junk, 0);
        wire_msg r;
        assert_true(next_msg(s, &r));
        wire_msg_close(&r);
    }
    long after = rss_kib(rc.server);
    assert_true(before > 0 && after > 0);
    if (after - before > 8 * 1024) fail_msg("server RSS grew from %ld to %ld KiB", before, after);
    long log_after = file_size_of(rc.dir, "server.log");
    print_message("2000 junk messages: server.log grew by %ld bytes\n", log_after - log_before);
    if (log_after - log_before > 4096)
        fail_msg("server.log grew by %ld bytes for 2000 junk messages", log_after - log_before);
    /* The rogue vanishes holding a shard: the server gives it to others. */
    zmq_close(s);
    trainer_close(t);
    assert_true(alive(rc.server));
}

/* Registers as `name`, takes the first Snapshot and Assign; returns the
 * shard. */
static uint32_t join(void *s, trainer *t, const char *name) {
    wire_out o;
    send_env(s, wire_hello(&o, name, rc.base_fp, rc.exp_fp, name, 1), NULL, 0);
    wire_msg m;
    expect_body(s, PEFTPS__WIRE__ENVELOPE__BODY_WELCOME, &m, "hello");
    wire_msg_close(&m);
    Peftps__Wire__Envelope *pull = wire_pull(&o, 0);
    o.body.pull.has_have_version = 0;
    send_env(s, pull, NULL, 0);
    expect_body(s, PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT, &m, "first pull");
    take_snapshot(t, &m);
    uint64_t version = m.env->snapshot->version;
    wire_msg_close(&m);
    expect_body(s, PEFTPS__WIRE__ENVELOPE__BODY_ASSIGN, &m, "first pull");
    uint32_t shard = m.env->assign->shards[0];
    assert_int_equal(m.env->assign->version, version);
    assert_int_equal(version, 0);
    wire_msg_close(&m);
    return shard;
}

/* A registered peer pushing a NaN loss, a NaN gradient and a gradient of
 * 1e30: each refused at the boundary with the shard handed back, the peer
 * named, and after the third refusal dropped and its identity refused. */
static void test_nonfinite_and_huge(void **state) {
    err e;
    trainer *t;
    if (trainer_open(&t, rc.exp, 0, &e) < 0) fail_msg("%s", e.msg);
    void *s = dealer(&rc, NULL, NULL);
    uint32_t shard = join(s, t, "rogue-nan");
    double loss;
    long ntok;
    wire_msg m;
    wire_out o;
    peft *p = t->p;
    for (int round = 0; round < 3; round++) {
        if (trainer_shard_grad(t, 0, shard, &loss, &ntok, &e) < 0) fail_msg("%s", e.msg);
        if (round == 0) loss = NAN;
        if (round == 1) p->grads[p->tensors[p->n_tensors - 1].offset + 3] = NAN;
        if (round == 2)
            for (size_t i = 0; i < p->n_params; i++) p->grads[i] = 1e30f;
        push(s, t, 0, 0, shard, loss, ntok, 0);
        expect_error(s, PEFTPS__WIRE__ERROR_CODE__BAD_TENSOR, "poisoned push");
        if (round < 2) {
            /* The shard is free again: ask for work. */
            send_env(s, wire_pull(&o, 0), NULL, 0);
            expect_body(s, PEFTPS__WIRE__ENVELOPE__BODY_ASSIGN, &m, "pull after refusal");
            shard = m.env->assign->shards[0];
            wire_msg_close(&m);
        }
    }
    /* Dropped: a pull is from an unregistered peer, and a Hello is refused. */
    send_env(s, wire_pull(&o, 0), NULL, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED, "pull after being dropped");
    send_env(s, wire_hello(&o, "rogue-nan", rc.base_fp, rc.exp_fp, "rogue-nan", 1), NULL, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__BAD_TENSOR, "hello after being dropped");
    zmq_close(s);
    trainer_close(t);
    assert_true(alive(rc.server));
    char cmd[300];
    const char *lines[] = {
        "rogue-nan: push of shard .* refused: its loss_sum is nan",
        "rogue-nan: push of shard .* refused: its gradient of .* holds nan at index 3",
        "rogue-nan: push of shard .* refused: its gradient norm is .* more than 10000 times",
        "worker rogue-nan dropped after 3 refused pushes",
    };
    for (int i = 0; i < 4; i++) {
        snprintf(cmd, sizeof cmd, "grep -q '%s' %s/server.log", lines[i], rc.dir);
        if (system(cmd) != 0) fail_msg("server.log lacks '%s'", lines[i]);
    }
}

/* Connection storms: 3,000 connections in waves of 500, each sending a
 * junk message and going away without a word; once they are gone the
 * server's memory is back near where it was (bound: 8 MiB over the
 * baseline; the figures are printed). */
static void test_connection_storm(void **state) {
    long base = rss_kib(rc.server), peak = base;
    for (int wave = 0; wave < 6; wave++) {
        void *s[500];
        for (int i = 0; i < 500; i++) {
            s[i] = dealer(&rc, NULL, NULL);
            send_raw(s[i], "junk", 4, 0);
        }
        /* Every one answered (an Error), so all were connected at once. */
        for (int i = 0; i < 500; i++) {
            wire_msg m;
            if (next_msg(s[i], &m)) wire_msg_close(&m);
        }
        long now = rss_kib(rc.server);
        if (now > peak) peak = now;
        for (int i = 0; i < 500; i++) zmq_close(s[i]);
    }
    /* The server notices the closed connections within its loop ticks. */
    struct timespec nap = {3, 0};
    nanosleep(&nap, NULL);
    long after = rss_kib(rc.server);
    print_message("server RSS: %ld KiB before 3000 connections, %ld KiB at the peak, %ld KiB "
                  "after\n",
                  base, peak, after);
    assert_true(alive(rc.server));
    if (after - base > 8 * 1024 && !SANITIZED)
        fail_msg("server RSS %ld KiB after the storm, %ld KiB before", after, base);
}

static void test_run_completes_unchanged(void **state) {
    pid_t w = spawn(&rc, "peftps-worker", "worker.log", NULL, 0);
    int st = wait_status(rc.server, 90);
    rc.server = 0;
    if (st != 0) fail_msg("server exited with %d; see %s/server.log", st, rc.dir);
    assert_int_equal(wait_status(w, 20), 0);
    char a[256], b[256];
    snprintf(a, sizeof a, "cmp %s/ref/tensors.safetensors %s/out/tensors.safetensors", rc.dir,
             rc.dir);
    assert_int_equal(system(a), 0);
    /* The rogue's accepted shard counted once, and its vanishing was noticed. */
    snprintf(b, sizeof b, "grep -q 'rogue silent .*1 shard(s) go to others' %s/server.log", rc.dir);
    assert_int_equal(system(b), 0);
}

/* ---- CURVE ----------------------------------------------------------------------------- */

static cluster cc;
static curve_keys server_keys, worker_keys, intruder_keys;

static int curve_setup(void **state) {
    char set[200];
    cluster_setup(&cc, NULL);
    err e;
    char prefix[128], path[160];
    const char *names[] = {"server", "worker", "intruder"};
    curve_keys *keys[] = {&server_keys, &worker_keys, &intruder_keys};
    for (int i = 0; i < 3; i++) {
        snprintf(prefix, sizeof prefix, "%s/%s", cc.dir, names[i]);
        if (curve_keygen(prefix, &e) < 0) fail_msg("%s", e.msg);
        snprintf(path, sizeof path, "%s.key", prefix);
        if (curve_keys_load(keys[i], path, 1, &e) < 0) fail_msg("%s", e.msg);
    }
    /* keygen never overwrites. */
    snprintf(prefix, sizeof prefix, "%s/worker", cc.dir);
    assert_int_equal(curve_keygen(prefix, &e), -1);
    char cmd[200];
    snprintf(cmd, sizeof cmd, "cp %s/worker.pub %s/authorized", cc.dir, cc.dir);
    assert_int_equal(system(cmd), 0);
    snprintf(set, sizeof set,
             "cluster.curve={server_keys: \"%s/server.key\" authorized_keys: "
             "\"%s/authorized\"}",
             cc.dir, cc.dir);
    snprintf(cc.sets[cc.argc_sets++], sizeof cc.sets[0], "%s", set);
    cc.server = spawn(&cc, "peftps-server", "server.log", NULL, 0);
    /* Up once a listed client gets an answer. */
    void *s = dealer(&cc, &worker_keys, server_keys.public_key);
    wire_out o;
    send_env(s, wire_pull(&o, 0), NULL, 0);
    expect_error(s, PEFTPS__WIRE__ERROR_CODE__NOT_REGISTERED, "CURVE server start");
    zmq_close(s);
    return 0;
}

static int curve_teardown(void **state) {
    cluster_teardown(&cc);
    return 0;
}

static void test_curve_unlisted_key(void **state) {
    void *s = dealer(&cc, &intruder_keys, server_keys.public_key);
    hello(&cc, s, cc.exp_fp, WIRE_PROTOCOL_VERSION);
    wire_out o;
    send_env(s, wire_grad_push(&o, 0, 0, 0, 1.0, 1), NULL, 0);
    wire_msg m;
    int got = next_msg(s, &m);
    if (got) wire_msg_close(&m);
    assert_false(got);
    zmq_close(s);
    /* Nor without CURVE at all. */
    s = dealer(&cc, NULL, NULL);
    hello(&cc, s, cc.exp_fp, WIRE_PROTOCOL_VERSION);
    got = next_msg(s, &m);
    if (got) wire_msg_close(&m);
    assert_false(got);
    zmq_close(s);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "grep -qF 'key %s)' %s/server.log", intruder_keys.public_key, cc.dir);
    assert_int_equal(system(cmd), 0);
    snprintf(cmd, sizeof cmd, "grep -q 'worker .* registered (' %s/server.log", cc.dir);
    assert_int_not_equal(system(cmd), 0);
}

/* 2,000 connections with a key that is not listed, in waves of 500: each
 * refused (rate-limited log), and the memory of their handshakes returned
 * once they are gone (bound: 8 MiB over the baseline). */
static void test_curve_storm(void **state) {
    long base = rss_kib(cc.server), peak = base;
    for (int wave = 0; wave < 4; wave++) {
        void *s[500];
        for (int i = 0; i < 500; i++) {
            s[i] = dealer(&cc, &intruder_keys, server_keys.public_key);
            hello(&cc, s[i], cc.exp_fp, WIRE_PROTOCOL_VERSION);
        }
        struct timespec nap = {1, 0};
        nanosleep(&nap, NULL);
        long now = rss_kib(cc.server);
        if (now > peak) peak = now;
        for (int i = 0; i < 500; i++) zmq_close(s[i]);
    }
    struct timespec nap = {3, 0};
    nanosleep(&nap, NULL);
    long after = rss_kib(cc.server);
    print_message("server RSS: %ld KiB before 2000 refused CURVE connections, %ld KiB at the "
                  "peak, %ld KiB after\n",
                  base, peak, after);
    assert_true(alive(cc.server));
    if (after - base > 8 * 1024 && !SANITIZED)
        fail_msg("server RSS %ld KiB after the storm, %ld KiB before", after, base);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "grep -c 'refused a connection from' %s/server.log", cc.dir);
    FILE *p = popen(cmd, "r");
    int lines = 0;
    if (p && fscanf(p, "%d", &lines) != 1) lines = -1;
    if (p) pclose(p);
    print_message("%d log lines for the refused connections\n", lines);
    assert_true(lines >= 1 && lines < 100);
}

static void test_curve_listed_key(void **state) {
    void *s = dealer(&cc, &worker_keys, server_keys.public_key);
    hello(&cc, s, cc.exp_fp, WIRE_PROTOCOL_VERSION);
    wire_msg m;
    expect_body(s, PEFTPS__WIRE__ENVELOPE__BODY_WELCOME, &m, "listed key");
    wire_msg_close(&m);
    zmq_close(s);
}

/* OpenBLAS's bits depend on its thread count, and the rogue's accepted
 * gradient must be the one a worker (started with one thread) computes. */
void openblas_set_num_threads(int n);

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    openblas_set_num_threads(1);
    const struct CMUnitTest rogue[] = {
        cmocka_unit_test(test_garbage_and_truncated),
        cmocka_unit_test(test_before_hello_and_bad_hello),
        cmocka_unit_test(test_oversized_frame),
        cmocka_unit_test(test_registered_abuse),
        cmocka_unit_test(test_nonfinite_and_huge),
        cmocka_unit_test(test_connection_storm),
        cmocka_unit_test(test_run_completes_unchanged),
    };
    const struct CMUnitTest curve[] = {
        cmocka_unit_test(test_curve_unlisted_key),
        cmocka_unit_test(test_curve_storm),
        cmocka_unit_test(test_curve_listed_key),
    };
    int failed = cmocka_run_group_tests_name("rogue client", rogue, rogue_setup, rogue_teardown);
    failed += cmocka_run_group_tests_name("CURVE", curve, curve_setup, curve_teardown);
    return failed;
}
