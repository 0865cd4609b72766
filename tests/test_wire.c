/* Tests of common/net/wire.c over real ZeroMQ ROUTER/DEALER pairs, on inproc://
 * and on tcp://127.0.0.1 with a free port: round trips of every body, every
 * malformed message rejected with its own message while the socket stays in
 * sync, zero-copy lending, the ZMQ_MAXMSGSIZE drop, and the fuzz seeds of
 * tests/fuzz/fuzz_wire.c (included below for its frame splitter). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/crc32c.h"
#include "net/wire.h"

#include "tests/fuzz/fuzz_wire.c"

/* ---- helpers -------------------------------------------------------------- */

static void *ctx;

static int setup_ctx(void **state) {
    ctx = zmq_ctx_new();
    return ctx ? 0 : -1;
}

/* Sockets still open when a failed test jumped out; closed here so that
 * zmq_ctx_term does not wait for them forever. */
static void *open_socks[16];

static void *sock_new(int type) {
    void *s = zmq_socket(ctx, type);
    assert_non_null(s);
    int linger = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    for (int i = 0; i < 16; i++)
        if (!open_socks[i]) return open_socks[i] = s;
    fail_msg("too many sockets");
    return NULL;
}

static void sock_close(void *s) {
    for (int i = 0; i < 16; i++)
        if (open_socks[i] == s) open_socks[i] = NULL;
    zmq_close(s);
}

static int teardown_ctx(void **state) {
    for (int i = 0; i < 16; i++)
        if (open_socks[i]) sock_close(open_socks[i]);
    return zmq_ctx_term(ctx);
}

/* A ROUTER bound and a DEALER (routing id "w7") connected to it. Receives
 * time out after 5 s, so that a lost message fails the test, not hangs it. */
typedef struct pair {
    void *router, *dealer;
    int tcp;
    char ep[128];
} pair;

static void pair_open(pair *p, int tcp, int64_t router_maxmsg) {
    static int serial;
    memset(p, 0, sizeof *p);
    p->tcp = tcp;
    p->router = sock_new(ZMQ_ROUTER);
    p->dealer = sock_new(ZMQ_DEALER);
    int timeout = 5000;
    assert_int_equal(zmq_setsockopt(p->router, ZMQ_RCVTIMEO, &timeout, sizeof timeout), 0);
    assert_int_equal(zmq_setsockopt(p->dealer, ZMQ_RCVTIMEO, &timeout, sizeof timeout), 0);
    assert_int_equal(zmq_setsockopt(p->dealer, ZMQ_ROUTING_ID, "w7", 2), 0);
    if (router_maxmsg >= 0) {
        err e;
        assert_int_equal(wire_set_limits(p->router, (uint64_t)router_maxmsg, &e), 0);
    }
    if (tcp) {
        assert_int_equal(zmq_bind(p->router, "tcp://127.0.0.1:*"), 0);
        size_t n = sizeof p->ep;
        assert_int_equal(zmq_getsockopt(p->router, ZMQ_LAST_ENDPOINT, p->ep, &n), 0);
    } else {
        snprintf(p->ep, sizeof p->ep, "inproc://wire-%d", serial++);
        assert_int_equal(zmq_bind(p->router, p->ep), 0);
    }
    assert_int_equal(zmq_connect(p->dealer, p->ep), 0);
}

static void pair_close(pair *p) {
    sock_close(p->dealer);
    sock_close(p->router);
}

/* An independent bitwise CRC-32C, the reference for the headers. */
static uint32_t crc_ref(const void *p, size_t n) {
    const uint8_t *b = p;
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= b[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82f63b78u & (0u - (c & 1)));
    }
    return ~c;
}

/* Deterministic bytes, different for every seed. */
static void *pattern(size_t n, unsigned seed) {
    uint8_t *p = malloc(n ? n : 1);
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 1103515245u + 12345u;
        p[i] = (uint8_t)(x >> 16);
    }
    return p;
}

/* Receives one message at the router, which must be valid. */
static void recv_ok(pair *p, wire_msg *m) {
    err e = {{0}};
    if (wire_recv(p->router, 1, m, NULL, &e)) fail_msg("wire_recv: %s", e.msg);
    assert_int_equal(m->received, 1);
    assert_int_equal(m->id_len, 2);
    assert_memory_equal(m->identity, "w7", 2);
}

/* Asserts that the received tensors are the sent ones: headers filled from
 * the table and bytes identical. */
static void assert_tensors(const wire_msg *m, const wire_tensor *t, int n, int with_data) {
    assert_int_equal(m->n_tensors, n);
    const Peftps__Wire__Envelope *env = m->env;
    Peftps__Wire__TensorHeader **h =
        env->body_case == PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT    ? env->snapshot->tensors
        : env->body_case == PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH ? env->grad_push->tensors
                                                                   : env->welcome->tensors;
    for (int i = 0; i < n; i++) {
        const wire_view *v = &m->tensors[i];
        assert_string_equal(v->name, t[i].name);
        assert_string_equal(h[i]->name, t[i].name);
        assert_int_equal(v->dtype, t[i].dtype);
        assert_int_equal(h[i]->dtype, t[i].dtype);
        assert_int_equal(v->ndim, t[i].ndim);
        assert_int_equal(h[i]->n_shape, t[i].ndim);
        for (int d = 0; d < t[i].ndim; d++) {
            assert_int_equal(v->shape[d], t[i].shape[d]);
            assert_int_equal(h[i]->shape[d], t[i].shape[d]);
        }
        assert_int_equal(v->nbytes, t[i].nbytes);
        assert_true(h[i]->has_nbytes);
        assert_int_equal(h[i]->nbytes, t[i].nbytes);
        if (with_data) {
            assert_true(h[i]->has_crc32c);
            assert_int_equal(h[i]->crc32c, crc_ref(t[i].data, t[i].nbytes));
            if (t[i].nbytes) assert_memory_equal(v->data, t[i].data, t[i].nbytes);
        } else {
            assert_false(h[i]->has_crc32c);
            assert_null(v->data);
        }
    }
}

/* A table of mixed tensors: a 4-d F32, a scalar, a BF16 matrix, an empty
 * one, I64 and a 1 MiB F32 one (past libzmq's in-buffer decoding). */
#define N_MIXED 6
static void mixed_tensors(wire_tensor *t, void **bufs) {
    static const struct {
        const char *name;
        int dtype, ndim;
        int64_t shape[4];
    } spec[N_MIXED] = {
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", 0, 4, {2, 3, 1, 5}},
        {"scalar", 0, 0, {0}},
        {"bf16.matrix", PEFTPS__WIRE__DTYPE__BF16, 2, {7, 3}},
        {"empty", PEFTPS__WIRE__DTYPE__I32, 2, {4, 0}},
        {"ids", PEFTPS__WIRE__DTYPE__I64, 1, {9}},
        {"big", 0, 2, {512, 512}},
    };
    for (int i = 0; i < N_MIXED; i++) {
        size_t numel = 1;
        for (int d = 0; d < spec[i].ndim; d++) numel *= (size_t)spec[i].shape[d];
        size_t nbytes = numel * wire_dtype_size(spec[i].dtype);
        bufs[i] = pattern(nbytes, (unsigned)i + 1);
        t[i] = (wire_tensor){spec[i].name, spec[i].dtype, spec[i].ndim, {0}, bufs[i], nbytes};
        memcpy(t[i].shape, spec[i].shape, sizeof t[i].shape);
    }
}

/* ---- round trips ---------------------------------------------------------- */

static void test_dtype_and_crc_reference(void **state) {
    assert_int_equal(crc_ref("123456789", 9), 0xe3069283u); /* the published check value */
    assert_int_equal(wire_dtype_size(PEFTPS__WIRE__DTYPE__F32), 4);
    assert_int_equal(wire_dtype_size(PEFTPS__WIRE__DTYPE__BF16), 2);
    assert_int_equal(wire_dtype_size(PEFTPS__WIRE__DTYPE__I64), 8);
    assert_int_equal(wire_dtype_size(PEFTPS__WIRE__DTYPE__F64), 8);
    assert_int_equal(wire_dtype_size(7), 0);
    assert_int_equal(wire_dtype_size(-1), 0);
    assert_string_equal(wire_dtype_name(PEFTPS__WIRE__DTYPE__F16), "F16");
    assert_string_equal(wire_body_name(PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH), "grad_push");
}

/* Every body without tensors, worker to server, fields intact. */
static void test_roundtrip_plain_bodies(void **state) {
    for (int tcp = 0; tcp < 2; tcp++) {
        pair p;
        pair_open(&p, tcp, -1);
        wire_out o;
        wire_msg m;
        err e = {{0}};
        const uint32_t shards[] = {3, 1, 4};

        assert_int_equal(wire_send(p.dealer, NULL, 0,
                                   wire_hello(&o, "w-1", "base", "exp", "host", 42), NULL, 0, &e),
                         0);
        recv_ok(&p, &m);
        assert_int_equal(m.env->body_case, PEFTPS__WIRE__ENVELOPE__BODY_HELLO);
        Peftps__Wire__Hello *h = m.env->hello;
        assert_int_equal(h->protocol_version, WIRE_PROTOCOL_VERSION);
        assert_string_equal(h->worker_id, "w-1");
        assert_string_equal(h->base_fingerprint, "base");
        assert_string_equal(h->experiment_fingerprint, "exp");
        assert_string_equal(h->hostname, "host");
        assert_int_equal(h->pid, 42);
        assert_int_equal(m.n_tensors, 0);
        assert_true(m.bytes > 0);
        wire_msg_close(&m);

        assert_int_equal(wire_send(p.dealer, NULL, 0, wire_pull(&o, 17), NULL, 0, &e), 0);
        recv_ok(&p, &m);
        assert_int_equal(m.env->body_case, PEFTPS__WIRE__ENVELOPE__BODY_PULL);
        assert_int_equal(m.env->pull->have_version, 17);
        wire_msg_close(&m);

        assert_int_equal(wire_send(p.dealer, NULL, 0, wire_heartbeat(&o, 5, 6), NULL, 0, &e), 0);
        recv_ok(&p, &m);
        assert_int_equal(m.env->heartbeat->version, 5);
        assert_int_equal(m.env->heartbeat->step, 6);
        wire_msg_close(&m);

        /* Server to worker: replies routed by the identity just received. */
        wire_out ro[4];
        Peftps__Wire__Envelope *replies[] = {
            wire_assign(&ro[0], 9, 8, shards, 3),
            wire_ack(&ro[1], 9, 4, 1),
            wire_error(&ro[2], PEFTPS__WIRE__ERROR_CODE__STALE, "version %d is old", 3),
            wire_shutdown(&ro[3], "bye"),
        };
        for (int i = 0; i < 4; i++) {
            assert_int_equal(wire_send(p.router, "w7", 2, replies[i], NULL, 0, &e), 0);
            if (wire_recv(p.dealer, 0, &m, NULL, &e)) fail_msg("%s", e.msg);
            assert_int_equal(m.id_len, 0);
            assert_int_equal(m.env->body_case, replies[i]->body_case);
            switch (m.env->body_case) {
            case PEFTPS__WIRE__ENVELOPE__BODY_ASSIGN:
                assert_int_equal(m.env->assign->step, 9);
                assert_int_equal(m.env->assign->version, 8);
                assert_int_equal(m.env->assign->n_shards, 3);
                assert_memory_equal(m.env->assign->shards, shards, sizeof shards);
                break;
            case PEFTPS__WIRE__ENVELOPE__BODY_ACK:
                assert_int_equal(m.env->ack->step, 9);
                assert_int_equal(m.env->ack->shard, 4);
                assert_true(m.env->ack->accepted);
                break;
            case PEFTPS__WIRE__ENVELOPE__BODY_ERROR:
                assert_int_equal(m.env->error->code, PEFTPS__WIRE__ERROR_CODE__STALE);
                assert_string_equal(m.env->error->message, "version 3 is old");
                break;
            default:
                assert_string_equal(m.env->shutdown->reason, "bye");
            }
            wire_msg_close(&m);
        }
        pair_close(&p);
    }
}

/* Snapshot and GradPush with 0, 1 and several tensors, both directions;
 * Welcome announcing a table without frames. */
static void test_roundtrip_tensors(void **state) {
    wire_tensor t[N_MIXED];
    void *bufs[N_MIXED];
    mixed_tensors(t, bufs);
    for (int tcp = 0; tcp < 2; tcp++) {
        pair p;
        pair_open(&p, tcp, -1);
        wire_out o;
        wire_msg m;
        err e = {{0}};
        const int counts[] = {0, 1, N_MIXED};
        for (int c = 0; c < 3; c++) {
            int n = counts[c];
            Peftps__Wire__Envelope *g = wire_grad_push(&o, 11, 10, 2, 123.5, 4096);
            if (wire_send(p.dealer, NULL, 0, g, t, n, &e)) fail_msg("%s", e.msg);
            /* wire_send fills a copy: the caller's body stays empty. */
            assert_int_equal(o.body.grad_push.n_tensors, 0);
            recv_ok(&p, &m);
            assert_int_equal(m.env->body_case, PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH);
            Peftps__Wire__GradPush *gp = m.env->grad_push;
            assert_int_equal(gp->step, 11);
            assert_int_equal(gp->version, 10);
            assert_int_equal(gp->shard, 2);
            assert_true(gp->loss_sum == 123.5);
            assert_int_equal(gp->n_tokens, 4096);
            assert_tensors(&m, t, n, 1);
            wire_msg_close(&m);

            if (wire_send(p.router, "w7", 2, wire_snapshot(&o, 12, 11), t, n, &e))
                fail_msg("%s", e.msg);
            if (wire_recv(p.dealer, 0, &m, NULL, &e)) fail_msg("%s", e.msg);
            assert_int_equal(m.env->body_case, PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT);
            assert_int_equal(m.env->snapshot->version, 12);
            assert_int_equal(m.env->snapshot->step, 11);
            assert_tensors(&m, t, n, 1);
            wire_msg_close(&m);
        }
        /* The Welcome table describes; no frames follow it. */
        if (wire_send(p.router, "w7", 2, wire_welcome(&o, 1, 2, 250, 7), t, N_MIXED, &e))
            fail_msg("%s", e.msg);
        if (wire_recv(p.dealer, 0, &m, NULL, &e)) fail_msg("%s", e.msg);
        assert_int_equal(m.env->body_case, PEFTPS__WIRE__ENVELOPE__BODY_WELCOME);
        assert_int_equal(m.env->welcome->server_index, 1);
        assert_int_equal(m.env->welcome->num_servers, 2);
        assert_int_equal(m.env->welcome->heartbeat_ms, 250);
        assert_int_equal(m.env->welcome->version, 7);
        assert_tensors(&m, t, N_MIXED, 0);
        assert_true(m.bytes < 2048); /* the 1 MiB tensor did not travel */
        wire_msg_close(&m);
        pair_close(&p);
    }
    for (int i = 0; i < N_MIXED; i++) free(bufs[i]);
}

/* Data may arrive unaligned (libzmq decodes small frames inside its receive
 * buffer): the F32 helpers must hand out only aligned pointers and copy the
 * rest correctly. Header sizes are varied to move the frame's offset. */
static void test_unaligned_f32(void **state) {
    pair p;
    pair_open(&p, 1, -1);
    float vals[100];
    for (int i = 0; i < 100; i++) vals[i] = (float)i * 0.25f - 3.0f;
    char name[16];
    int unaligned = 0;
    for (int k = 1; k <= 8; k++) {
        snprintf(name, sizeof name, "%.*s", k, "abcdefgh");
        wire_tensor t = {name, PEFTPS__WIRE__DTYPE__F32, 1, {100}, vals, sizeof vals};
        wire_out o;
        wire_msg m;
        err e = {{0}};
        assert_int_equal(wire_send(p.dealer, NULL, 0, wire_grad_push(&o, 1, 1, 0, 0, 0), &t, 1, &e),
                         0);
        recv_ok(&p, &m);
        const wire_view *v = &m.tensors[0];
        const float *direct = wire_tensor_f32(v);
        if ((uintptr_t)v->data % 4) {
            unaligned++;
            assert_null(direct);
        } else {
            assert_ptr_equal(direct, v->data);
        }
        float out[100];
        assert_int_equal(wire_tensor_copy_f32(v, out, 100, &e), 0);
        assert_memory_equal(out, vals, sizeof vals);
        assert_int_equal(wire_tensor_copy_f32(v, out, 99, &e), -1);
        assert_non_null(strstr(e.msg, "has 100 elements, expected 99"));
        wire_msg_close(&m);
    }
    /* Documents the libzmq behaviour wire.h warns about. */
    assert_true(unaligned > 0);
    pair_close(&p);

    /* A non-F32 view is refused by both helpers. */
    int32_t ids[2] = {1, 2};
    wire_view v = {"ids", PEFTPS__WIRE__DTYPE__I32, 1, {2}, 2, 8, ids};
    float f[2];
    err e;
    assert_null(wire_tensor_f32(&v));
    assert_int_equal(wire_tensor_copy_f32(&v, f, 2, &e), -1);
    assert_non_null(strstr(e.msg, "is I32, expected F32"));
}

/* ---- table checks --------------------------------------------------------- */

static void test_check_tensors(void **state) {
    pair p;
    pair_open(&p, 0, -1);
    float a[6] = {1, 2, 3, 4, 5, 6}, b[4] = {7, 8, 9, 10};
    wire_tensor t[2] = {{"a", 0, 2, {2, 3}, a, sizeof a}, {"b", 0, 1, {4}, b, sizeof b}};
    wire_out o;
    wire_msg m;
    err e = {{0}};
    assert_int_equal(wire_send(p.dealer, NULL, 0, wire_grad_push(&o, 1, 1, 0, 0, 0), t, 2, &e), 0);
    recv_ok(&p, &m);
    wire_expect ok[2] = {{"a", 2, {2, 3}}, {"b", 1, {4}}};
    assert_int_equal(wire_check_tensors(&m, ok, 2, &e), 0);
    const struct {
        wire_expect x[2];
        int n;
        const char *msg;
    } bad[] = {
        {{{"a", 2, {2, 3}}}, 1, "2 tensors received, 1 expected"},
        {{{"b", 1, {4}}, {"a", 2, {2, 3}}}, 2, "tensor 0 is 'a', expected 'b'"},
        {{{"a", 2, {3, 2}}, {"b", 1, {4}}}, 2, "tensor 0 ('a') has shape [2,3], expected [3,2]"},
        {{{"a", 2, {2, 3}}, {"b", 2, {4, 1}}}, 2, "tensor 1 ('b') has shape [4], expected [4,1]"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(wire_check_tensors(&m, bad[i].x, bad[i].n, &e), -1);
        if (!strstr(e.msg, bad[i].msg)) fail_msg("case %zu: \"%s\"", i, e.msg);
    }
    wire_msg_close(&m);

    /* A dtype other than F32 is refused even with the right name and shape. */
    t[1].dtype = PEFTPS__WIRE__DTYPE__I32;
    assert_int_equal(wire_send(p.dealer, NULL, 0, wire_grad_push(&o, 1, 1, 0, 0, 0), t, 2, &e), 0);
    recv_ok(&p, &m);
    assert_int_equal(wire_check_tensors(&m, ok, 2, &e), -1);
    assert_non_null(strstr(e.msg, "tensor 1 ('b') is I32, expected F32"));
    wire_msg_close(&m);
    pair_close(&p);

    wire_limits lim;
    assert_int_equal(wire_limits_for(&lim, ok, 2, &e), 0);
    assert_int_equal(lim.max_message_bytes, 4096 + (24 + 256) + (16 + 256));
    assert_int_equal(lim.max_tensors, 2);
    wire_expect huge = {"h", 3, {INT64_MAX, INT64_MAX, 2}};
    assert_int_equal(wire_limits_for(&lim, &huge, 1, &e), -1);
    assert_non_null(strstr(e.msg, "overflows at tensor 'h'"));
}

/* ---- sender-side errors --------------------------------------------------- */

static void test_send_errors(void **state) {
    pair p;
    pair_open(&p, 0, -1);
    float f[4] = {0};
    wire_out o;
    err e = {{0}};
    const struct {
        wire_tensor t;
        const char *msg;
    } bad[] = {
        {{"", 0, 1, {4}, f, 16}, "tensor 0 has no name"},
        {{"x", 9, 1, {4}, f, 16}, "unknown dtype 9"},
        {{"x", 0, 5, {1, 1, 1, 1}, f, 4}, "5 dimensions, expected 0..4"},
        {{"x", 0, 1, {-4}, f, 16}, "negative dimension -4"},
        {{"x", 0, 1, {4}, f, 12}, "nbytes 12 does not match shape [4] of F32"},
        {{"x", 0, 1, {4}, NULL, 16}, "no data"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(wire_send(p.dealer, NULL, 0, wire_snapshot(&o, 1, 1), &bad[i].t, 1, &e),
                         -1);
        if (!strstr(e.msg, bad[i].msg) || strncmp(e.msg, "sending snapshot: ", 18))
            fail_msg("case %zu: \"%s\"", i, e.msg);
    }
    wire_tensor ok = {"x", 0, 1, {4}, f, 16};
    assert_int_equal(wire_send(p.dealer, NULL, 0, wire_pull(&o, 1), &ok, 1, &e), -1);
    assert_non_null(strstr(e.msg, "sending pull: this message carries no tensors, 1 given"));
    Peftps__Wire__Envelope none = PEFTPS__WIRE__ENVELOPE__INIT;
    assert_int_equal(wire_send(p.dealer, NULL, 0, &none, NULL, 0, &e), -1);
    assert_non_null(strstr(e.msg, "the envelope has no body"));
    /* A list the caller filled would go out without its frames. */
    Peftps__Wire__TensorHeader h = PEFTPS__WIRE__TENSOR_HEADER__INIT, *hp = &h;
    Peftps__Wire__Envelope *s = wire_snapshot(&o, 1, 1);
    o.body.snapshot.n_tensors = 1;
    o.body.snapshot.tensors = &hp;
    assert_int_equal(wire_send(p.dealer, NULL, 0, s, NULL, 0, &e), -1);
    assert_non_null(strstr(e.msg, "already lists 1 tensor headers"));
    /* Nothing of the refused sends reached the peer: the next message is
     * the first one it sees. */
    wire_msg m;
    assert_int_equal(wire_send(p.dealer, NULL, 0, wire_pull(&o, 99), NULL, 0, &e), 0);
    recv_ok(&p, &m);
    assert_int_equal(m.env->pull->have_version, 99);
    wire_msg_close(&m);
    pair_close(&p);
}

/* ---- malformed messages --------------------------------------------------- */

/* A TensorHeader for hand-made messages; every field present. */
static Peftps__Wire__TensorHeader theader(const char *name, int dtype, const uint64_t *shape,
                                          size_t ndim, uint64_t nbytes, uint32_t crc) {
    Peftps__Wire__TensorHeader h = PEFTPS__WIRE__TENSOR_HEADER__INIT;
    h.name = (char *)name;
    h.has_dtype = h.has_nbytes = h.has_crc32c = 1;
    h.dtype = (Peftps__Wire__DType)dtype;
    h.shape = (uint64_t *)shape;
    h.n_shape = ndim;
    h.nbytes = nbytes;
    h.crc32c = crc;
    return h;
}

/* Sends raw frames from the dealer: the header bytes, then frames. */
static void send_raw(pair *p, const void *hdr, size_t hdr_len, const void *const *fr,
                     const size_t *len, int n) {
    assert_int_equal(zmq_send(p->dealer, hdr, hdr_len, n ? ZMQ_SNDMORE : 0), (int)hdr_len);
    for (int i = 0; i < n; i++)
        assert_int_equal(zmq_send(p->dealer, fr[i], len[i], i + 1 < n ? ZMQ_SNDMORE : 0),
                         (int)len[i]);
}

/* Packs a GradPush with the given headers and sends it with raw frames. */
static void send_push(pair *p, Peftps__Wire__TensorHeader *h, int nh, const void *const *fr,
                      const size_t *len, int n) {
    wire_out o;
    Peftps__Wire__Envelope *env = wire_grad_push(&o, 1, 1, 0, 0, 0);
    Peftps__Wire__TensorHeader *hp[8];
    for (int i = 0; i < nh; i++) hp[i] = &h[i];
    o.body.grad_push.n_tensors = (size_t)nh;
    o.body.grad_push.tensors = hp;
    uint8_t buf[4096];
    size_t size = peftps__wire__envelope__get_packed_size(env);
    assert_true(size <= sizeof buf);
    peftps__wire__envelope__pack(env, buf);
    send_raw(p, buf, size, fr, len, n);
}

/* The router must reject the next message with `want` in the message,
 * still knowing the peer; then a valid message must arrive intact. */
static void expect_reject(pair *p, const wire_limits *lim, const char *want) {
    wire_msg m;
    err e = {{0}};
    int rc = wire_recv(p->router, 1, &m, lim, &e);
    if (rc == 0 || !strstr(e.msg, want) || strncmp(e.msg, "message from peer 7737: ", 24))
        fail_msg("%s: expected a rejection containing \"%s\", got rc=%d \"%s\"",
                 p->tcp ? "tcp" : "inproc", want, rc, e.msg);
    assert_int_equal(m.received, 1);
    assert_int_equal(m.id_len, 2);
    assert_memory_equal(m.identity, "w7", 2);
    assert_null(m.env);
    assert_null(m.tensors);
    wire_msg_close(&m);

    float v[3] = {1.5f, -2.0f, 3.25f};
    wire_tensor t = {"after", 0, 1, {3}, v, sizeof v};
    wire_out o;
    assert_int_equal(wire_send(p->dealer, NULL, 0, wire_grad_push(&o, 77, 1, 0, 0, 0), &t, 1, &e),
                     0);
    recv_ok(p, &m);
    assert_int_equal(m.env->grad_push->step, 77);
    assert_tensors(&m, &t, 1, 1);
    wire_msg_close(&m);
}

static void test_malformed(void **state) {
    float v[4] = {1, 2, 3, 4};
    uint32_t crc = crc32c(0, v, 16);
    const void *fr[3] = {v, v, v};
    size_t len16[3] = {16, 16, 16};
    uint64_t s4[] = {4}, s2x2[] = {2, 2}, s5[] = {1, 1, 1, 1, 4};
    for (int tcp = 0; tcp < 2; tcp++) {
        pair p;
        pair_open(&p, tcp, -1);

        send_raw(&p, "\xff\xff\xff\xff\x0f garbage", 13, NULL, NULL, 0);
        expect_reject(&p, NULL, "header frame (13 bytes) is not a valid Envelope");

        send_raw(&p, "", 0, NULL, NULL, 0);
        expect_reject(&p, NULL, "header has no body");
        send_raw(&p, "\x78\x01", 2, NULL, NULL, 0); /* field 15: unknown to this version */
        expect_reject(&p, NULL, "header has no body");

        wire_out o;
        uint8_t buf[512];
        size_t n = peftps__wire__envelope__pack(wire_pull(&o, 3), buf);
        send_raw(&p, buf, n, fr, len16, 1);
        expect_reject(&p, NULL, "pull carries no tensor frames, but 1 follow");

        Peftps__Wire__TensorHeader h[2] = {theader("a", 0, s4, 1, 16, crc),
                                           theader("b", 0, s2x2, 2, 16, crc)};
        send_push(&p, h, 2, fr, len16, 1);
        expect_reject(&p, NULL, "grad_push lists 2 tensor headers but 1 tensor frames follow");
        send_push(&p, h, 2, fr, len16, 3);
        expect_reject(&p, NULL, "grad_push lists 2 tensor headers but 3 tensor frames follow");
        send_push(&p, h, 2, NULL, NULL, 0);
        expect_reject(&p, NULL, "grad_push lists 2 tensor headers but 0 tensor frames follow");

        /* Each header fault on the second tensor, so the index is checked. */
        const struct {
            Peftps__Wire__TensorHeader h;
            size_t frame_len;
            const char *msg;
        } bad[] = {
            {theader("b", 0, s4, 1, 16, crc), 12,
             "tensor 1 ('b'): frame has 12 bytes but the header says nbytes 16"},
            {theader("b", 0, s4, 1, 12, crc), 12,
             "tensor 1 ('b'): nbytes 12 does not match shape [4] of F32 (16 bytes)"},
            {theader("b", 0, s4, 1, 16, crc ^ 1), 16, "tensor 1 ('b'): CRC-32C mismatch"},
            {theader("b", 9, s4, 1, 16, crc), 16, "tensor 1 ('b'): unknown dtype 9"},
            {theader("b", -1, s4, 1, 16, crc), 16, "tensor 1 ('b'): unknown dtype -1"},
            {theader("", 0, s4, 1, 16, crc), 16, "tensor 1 has an empty name"},
            {theader(NULL, 0, s4, 1, 16, crc), 16, "tensor 1 has no name"},
            {theader("b", 0, s5, 5, 16, crc), 16, "tensor 1 ('b'): 5 dimensions, at most 4"},
            {theader("b", 0, (const uint64_t[]){1ull << 32, 1ull << 32, 2}, 3, 16, crc), 16,
             "tensor 1 ('b'): shape [4294967296,4294967296,2] of F32 overflows 64 bits"},
            {theader("b", 0, (const uint64_t[]){1ull << 62}, 1, 0, crc), 16,
             "shape [4611686018427387904] of F32 overflows 64 bits"},
            {theader("b", 0, (const uint64_t[]){UINT64_MAX, 0}, 2, 0, crc), 0,
             "tensor 1 ('b'): dimension 0 is 18446744073709551615, too large"},
            {theader("b", 0, (const uint64_t[]){1ull << 40}, 1, 1ull << 42, crc), 16,
             "tensor 1 ('b'): 4398046511104 bytes, over the message limit"},
        };
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            Peftps__Wire__TensorHeader two[2] = {theader("a", 0, s4, 1, 16, crc), bad[i].h};
            size_t lens[2] = {16, bad[i].frame_len};
            send_push(&p, two, 2, fr, lens, 2);
            expect_reject(&p, NULL, bad[i].msg);
        }
        /* Absent fields. */
        Peftps__Wire__TensorHeader miss[3] = {theader("b", 0, s4, 1, 16, crc),
                                              theader("b", 0, s4, 1, 16, crc),
                                              theader("b", 0, s4, 1, 16, crc)};
        miss[0].has_dtype = 0;
        miss[1].has_nbytes = 0;
        miss[2].has_crc32c = 0;
        const char *miss_msg[3] = {"tensor 0 ('b') has no dtype", "tensor 0 ('b') has no nbytes",
                                   "tensor 0 ('b') has no crc32c"};
        for (int i = 0; i < 3; i++) {
            send_push(&p, &miss[i], 1, fr, len16, 1);
            expect_reject(&p, NULL, miss_msg[i]);
        }

        /* A name too long, and a name with a NUL inside: protobuf-c would
         * hand "ab\0cd" over as "ab", so the raw bytes are checked. */
        char longname[WIRE_NAME_MAX + 1];
        memset(longname, 'n', WIRE_NAME_MAX);
        longname[WIRE_NAME_MAX] = '\0';
        Peftps__Wire__TensorHeader ln = theader(longname, 0, s4, 1, 16, crc);
        send_push(&p, &ln, 1, fr, len16, 1);
        expect_reject(&p, NULL, "name of 160 bytes, the limit is 159");
        longname[WIRE_NAME_MAX - 1] = '\0'; /* 159 bytes: accepted */
        wire_tensor lt = {longname, 0, 1, {4}, v, 16};
        wire_msg m;
        err e = {{0}};
        assert_int_equal(
            wire_send(p.dealer, NULL, 0, wire_grad_push(&o, 1, 1, 0, 0, 0), &lt, 1, &e), 0);
        recv_ok(&p, &m);
        assert_int_equal(strlen(m.tensors[0].name), WIRE_NAME_MAX - 1);
        wire_msg_close(&m);

        Peftps__Wire__TensorHeader nul[2] = {theader("a", 0, s4, 1, 16, crc),
                                             theader("abXcd", 0, s4, 1, 16, crc)};
        Peftps__Wire__TensorHeader *hp[2] = {&nul[0], &nul[1]};
        Peftps__Wire__Envelope *env = wire_grad_push(&o, 1, 1, 0, 0, 0);
        o.body.grad_push.n_tensors = 2;
        o.body.grad_push.tensors = hp;
        n = peftps__wire__envelope__pack(env, buf);
        uint8_t *x = memmem(buf, n, "abXcd", 5);
        assert_non_null(x);
        x[2] = '\0';
        send_raw(&p, buf, n, fr, len16, 2);
        expect_reject(&p, NULL, "header field grad_push.tensors[1].name holds a NUL byte");
        n = peftps__wire__envelope__pack(wire_hello(&o, "wXrker", "b", "x", "h", 1), buf);
        x = memmem(buf, n, "wXrker", 6);
        x[1] = '\0';
        send_raw(&p, buf, n, NULL, NULL, 0);
        expect_reject(&p, NULL, "header field hello.worker_id holds a NUL byte");

        /* Limits: bytes over all frames, and the number of tensors. */
        wire_limits lim = {1000, 2};
        Peftps__Wire__TensorHeader three[3] = {theader("a", 0, s4, 1, 16, crc),
                                               theader("b", 0, s4, 1, 16, crc),
                                               theader("c", 0, s4, 1, 16, crc)};
        send_push(&p, three, 3, fr, len16, 3);
        expect_reject(&p, &lim, "message has 3 tensor frames, the limit is 2");
        lim = (wire_limits){60, 16};
        send_push(&p, three, 3, fr, len16, 3);
        expect_reject(&p, &lim, "exceeds the limit of 60 bytes");
        pair_close(&p);
    }
}

/* wire_decode on frames in memory: the cases a socket cannot produce. */
static void test_decode_direct(void **state) {
    wire_msg m;
    memset(&m, 0, sizeof m);
    err e = {{0}};
    assert_int_equal(wire_decode(NULL, 0, NULL, &m, &e), -1);
    assert_non_null(strstr(e.msg, "message has no header frame"));
    /* A Welcome table goes through the same header checks. */
    wire_out o;
    uint64_t s4[] = {4};
    Peftps__Wire__TensorHeader h = theader("w", 7, s4, 1, 16, 0), *hp = &h;
    Peftps__Wire__Envelope *env = wire_welcome(&o, 0, 1, 100, 1);
    o.body.welcome.n_tensors = 1;
    o.body.welcome.tensors = &hp;
    uint8_t buf[256];
    wire_frame f = {buf, peftps__wire__envelope__pack(env, buf)};
    assert_int_equal(wire_decode(&f, 1, NULL, &m, &e), -1);
    assert_non_null(strstr(e.msg, "welcome: tensor 0 ('w'): unknown dtype 7"));
    assert_null(m.env);
    h.dtype = PEFTPS__WIRE__DTYPE__F32;
    h.has_crc32c = 0; /* a description carries no checksum */
    f.size = peftps__wire__envelope__pack(env, buf);
    assert_int_equal(wire_decode(&f, 1, NULL, &m, &e), 0);
    assert_int_equal(m.n_tensors, 1);
    assert_null(m.tensors[0].data);
    assert_int_equal(m.bytes, f.size);
    wire_expect x = {"w", 1, {4}};
    assert_int_equal(wire_check_tensors(&m, &x, 1, &e), 0);
    wire_msg_close(&m);
    assert_null(m.env);
    wire_msg_close(&m); /* harmless twice */
}

/* ---- lending, limits ------------------------------------------------------ */

static atomic_int released;
/* May run on a libzmq I/O thread, where cmocka's asserts cannot: a wrong
 * hint shows as a count far off. */
static void count_release(void *hint) {
    atomic_fetch_add(&released, hint == &released ? 1 : 100);
}

static void wait_released(int want) {
    for (int i = 0; i < 500 && atomic_load(&released) != want; i++)
        nanosleep(&(struct timespec){0, 10000000}, NULL);
    assert_int_equal(atomic_load(&released), want);
}

static void test_zero_copy(void **state) {
    wire_tensor t[N_MIXED];
    void *bufs[N_MIXED];
    mixed_tensors(t, bufs);
    for (int tcp = 0; tcp < 2; tcp++) {
        pair p;
        pair_open(&p, tcp, -1);
        wire_out o;
        wire_msg m;
        err e = {{0}};
        atomic_store(&released, 0);
        if (wire_send_zc(p.dealer, NULL, 0, wire_grad_push(&o, 3, 2, 1, 0, 0), t, N_MIXED,
                         count_release, &released, &e))
            fail_msg("%s", e.msg);
        if (!tcp) {
            /* inproc hands the lent buffer itself to the receiver: not
             * released until the receiver closes the message. */
            assert_int_equal(atomic_load(&released), 0);
            recv_ok(&p, &m);
            assert_ptr_equal(m.tensors[N_MIXED - 1].data, t[N_MIXED - 1].data);
            assert_int_equal(atomic_load(&released), 0);
        } else {
            recv_ok(&p, &m);
        }
        assert_tensors(&m, t, N_MIXED, 1);
        wire_msg_close(&m);
        wait_released(1);

        /* Released exactly once on an error too, before anything is sent. */
        wire_tensor bad = t[0];
        bad.nbytes = 3;
        atomic_store(&released, 0);
        assert_int_equal(wire_send_zc(p.dealer, NULL, 0, wire_grad_push(&o, 3, 2, 1, 0, 0), &bad, 1,
                                      count_release, &released, &e),
                         -1);
        assert_int_equal(atomic_load(&released), 1);
        pair_close(&p);
    }
    for (int i = 0; i < N_MIXED; i++) free(bufs[i]);
}

/* Polls the monitor for a DISCONNECTED event within ms. */
static int saw_disconnect(void *mon, int ms) {
    zmq_pollitem_t it = {mon, 0, ZMQ_POLLIN, 0};
    while (zmq_poll(&it, 1, ms) > 0) {
        zmq_msg_t a, b;
        zmq_msg_init(&a);
        zmq_msg_init(&b);
        zmq_msg_recv(&a, mon, 0);
        zmq_msg_recv(&b, mon, 0);
        uint16_t ev;
        memcpy(&ev, zmq_msg_data(&a), 2);
        zmq_msg_close(&a);
        zmq_msg_close(&b);
        if (ev == ZMQ_EVENT_DISCONNECTED) return 1;
    }
    return 0;
}

/* ZMQ_MAXMSGSIZE over tcp: libzmq drops the connection of a peer sending a
 * frame over the limit; the router never sees that message, and the DEALER
 * reconnects by itself, so a later message arrives. Over inproc libzmq does
 * not apply it, and wire_recv's own limit catches the message. */
static void test_maxmsgsize(void **state) {
    pair p;
    pair_open(&p, 1, 1000);
    assert_int_equal(zmq_socket_monitor(p.router, "inproc://wire-mon", ZMQ_EVENT_DISCONNECTED), 0);
    void *mon = sock_new(ZMQ_PAIR);
    assert_int_equal(zmq_connect(mon, "inproc://wire-mon"), 0);
    wire_out o;
    wire_msg m;
    err e = {{0}};
    void *big = pattern(4000, 9);
    wire_tensor t = {"big", 0, 1, {1000}, big, 4000};
    assert_int_equal(
        wire_send(p.dealer, NULL, 0, wire_hello(&o, "before", "", "", "", 1), NULL, 0, &e), 0);
    recv_ok(&p, &m);
    assert_string_equal(m.env->hello->worker_id, "before");
    wire_msg_close(&m);
    /* The limit is per frame: three frames of 900 bytes pass. */
    wire_tensor three[3] = {{"x", 0, 1, {225}, big, 900},
                            {"y", 0, 1, {225}, (char *)big + 900, 900},
                            {"z", 0, 1, {225}, (char *)big + 1800, 900}};
    assert_int_equal(wire_send(p.dealer, NULL, 0, wire_grad_push(&o, 2, 1, 0, 0, 0), three, 3, &e),
                     0);
    recv_ok(&p, &m);
    assert_tensors(&m, three, 3, 1);
    wire_msg_close(&m);
    assert_false(saw_disconnect(mon, 0));
    /* One frame of 4000 bytes does not. */
    assert_int_equal(wire_send(p.dealer, NULL, 0, wire_grad_push(&o, 1, 1, 0, 0, 0), &t, 1, &e), 0);
    assert_true(saw_disconnect(mon, 5000));
    assert_int_equal(
        wire_send(p.dealer, NULL, 0, wire_hello(&o, "after", "", "", "", 1), NULL, 0, &e), 0);
    /* The next message is the one sent after the drop, never the push. */
    recv_ok(&p, &m);
    assert_int_equal(m.env->body_case, PEFTPS__WIRE__ENVELOPE__BODY_HELLO);
    assert_string_equal(m.env->hello->worker_id, "after");
    wire_msg_close(&m);
    sock_close(mon);
    pair_close(&p);

    pair_open(&p, 0, 1000);
    wire_limits lim = {1000, 16};
    assert_int_equal(wire_send(p.dealer, NULL, 0, wire_grad_push(&o, 1, 1, 0, 0, 0), &t, 1, &e), 0);
    expect_reject(&p, &lim, "exceeds the limit of 1000 bytes");
    assert_int_equal(wire_set_limits(p.router, UINT64_MAX, &e), -1);
    assert_non_null(strstr(e.msg, "too large"));
    pair_close(&p);
    free(big);
}

/* A receive that gets nothing says so and holds nothing. */
static void test_recv_timeout(void **state) {
    void *d = sock_new(ZMQ_DEALER);
    int timeout = 10;
    zmq_setsockopt(d, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    wire_msg m;
    err e = {{0}};
    assert_int_equal(wire_recv(d, 0, &m, NULL, &e), -1);
    assert_int_equal(m.received, 0);
    assert_int_equal(errno, EAGAIN);
    assert_non_null(strstr(e.msg, "receiving a message: "));
    wire_msg_close(&m);
    sock_close(d);
}

/* ---- fuzz seeds ----------------------------------------------------------- */

/* good_* seeds decode, bad_* seeds are rejected, and the fuzz target's own
 * checks hold on every one. */
static void test_fuzz_corpus(void **state) {
    FILE *pp = popen("ls tests/fuzz/corpus/fuzz_wire 2>/dev/null", "r");
    assert_non_null(pp);
    char name[256], path[512];
    int good = 0, bad = 0;
    while (fgets(name, sizeof name, pp)) {
        name[strcspn(name, "\n")] = '\0';
        snprintf(path, sizeof path, "tests/fuzz/corpus/fuzz_wire/%s", name);
        FILE *fp = fopen(path, "rb");
        assert_non_null(fp);
        static uint8_t data[1 << 20];
        size_t size = fread(data, 1, sizeof data, fp);
        fclose(fp);
        wire_frame f[FUZZ_WIRE_MAX_FRAMES];
        int n = fuzz_wire_frames(data, size, f, FUZZ_WIRE_MAX_FRAMES);
        wire_limits lim = {1 << 16, 16};
        wire_msg m;
        memset(&m, 0, sizeof m);
        err e = {{0}};
        int rc = wire_decode(f, n, &lim, &m, &e);
        if (!strncmp(name, "good_", 5)) {
            if (rc) fail_msg("%s: %s", name, e.msg);
            good++;
        } else {
            if (!rc) fail_msg("%s decodes", name);
            bad++;
        }
        wire_msg_close(&m);
        assert_int_equal(LLVMFuzzerTestOneInput(data, size), 0);
    }
    pclose(pp);
    assert_true(good >= 4);
    assert_true(bad >= 4);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtype_and_crc_reference),
        cmocka_unit_test(test_roundtrip_plain_bodies),
        cmocka_unit_test(test_roundtrip_tensors),
        cmocka_unit_test(test_unaligned_f32),
        cmocka_unit_test(test_check_tensors),
        cmocka_unit_test(test_send_errors),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_decode_direct),
        cmocka_unit_test(test_zero_copy),
        cmocka_unit_test(test_maxmsgsize),
        cmocka_unit_test(test_recv_timeout),
        cmocka_unit_test(test_fuzz_corpus),
    };
    return cmocka_run_group_tests(tests, setup_ctx, teardown_ctx);
}
