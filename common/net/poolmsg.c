/* The pool's framing (poolmsg.h). */
#include "net/poolmsg.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

int poolmsg_send(void *sock, const unsigned char *id, size_t id_len,
                 const Peftps__Pool__PoolMessage *m, err *e) {
    size_t n = peftps__pool__pool_message__get_packed_size(m);
    if (n > POOLMSG_MAX_BYTES)
        return err_set(e, "a %s message of %zu bytes exceeds the pool's limit of %u",
                       poolmsg_body_name(m->body_case), n, POOLMSG_MAX_BYTES);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) return err_set(e, "out of memory");
    peftps__pool__pool_message__pack(m, buf);
    int rc = 0;
    if (id && zmq_send(sock, id, id_len, ZMQ_SNDMORE) < 0)
        rc = err_set(e, "sending: %s", zmq_strerror(errno));
    else if (zmq_send(sock, buf, n, 0) < 0)
        rc = err_set(e, "sending: %s", zmq_strerror(errno));
    free(buf);
    return rc;
}

/* Drops the rest of a multipart message. */
static void drain(void *sock) {
    int more = 1;
    size_t len = sizeof more;
    while (zmq_getsockopt(sock, ZMQ_RCVMORE, &more, &len) == 0 && more) {
        zmq_msg_t f;
        zmq_msg_init(&f);
        int r = zmq_msg_recv(&f, sock, 0);
        zmq_msg_close(&f);
        if (r < 0) break;
        len = sizeof more;
    }
}

int poolmsg_recv(void *sock, int flags, unsigned char *id, size_t *id_len,
                 Peftps__Pool__PoolMessage **out, err *e) {
    *out = NULL;
    zmq_msg_t f;
    zmq_msg_init(&f);
    if (zmq_msg_recv(&f, sock, flags) < 0) {
        int en = errno;
        zmq_msg_close(&f);
        if (en == EAGAIN) return 1;
        return err_set(e, "receiving: %s", zmq_strerror(en));
    }
    if (id) {
        size_t n = zmq_msg_size(&f);
        if (n > POOLMSG_ID_MAX || !zmq_msg_more(&f)) {
            zmq_msg_close(&f);
            drain(sock);
            return err_set(e, "a message without a body frame");
        }
        memcpy(id, zmq_msg_data(&f), n);
        *id_len = n;
        zmq_msg_close(&f);
        zmq_msg_init(&f);
        if (zmq_msg_recv(&f, sock, 0) < 0) {
            zmq_msg_close(&f);
            return err_set(e, "receiving: %s", zmq_strerror(errno));
        }
    }
    int rc = 0;
    if (zmq_msg_more(&f)) {
        rc = err_set(e, "a pool message is one frame; this one has more");
        drain(sock);
    } else if (zmq_msg_size(&f) > POOLMSG_MAX_BYTES) {
        rc = err_set(e, "a message of %zu bytes exceeds the pool's limit of %u", zmq_msg_size(&f),
                     POOLMSG_MAX_BYTES);
    } else {
        *out = peftps__pool__pool_message__unpack(NULL, zmq_msg_size(&f), zmq_msg_data(&f));
        if (!*out)
            rc = err_set(e, "a frame of %zu bytes that is not a pool message", zmq_msg_size(&f));
        else if ((*out)->body_case == PEFTPS__POOL__POOL_MESSAGE__BODY__NOT_SET) {
            poolmsg_free(*out);
            *out = NULL;
            rc = err_set(e, "a pool message without a body");
        }
    }
    zmq_msg_close(&f);
    return rc;
}

void poolmsg_free(Peftps__Pool__PoolMessage *m) {
    if (m) peftps__pool__pool_message__free_unpacked(m, NULL);
}

const char *poolmsg_body_name(int body_case) {
    const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(
        &peftps__pool__pool_message__descriptor, (unsigned)body_case);
    return f ? f->name : "empty";
}

int poolmsg_request(const char *endpoint, const Peftps__Pool__PoolMessage *req, int timeout_ms,
                    Peftps__Pool__PoolMessage **reply, err *e) {
    *reply = NULL;
    void *ctx = zmq_ctx_new();
    if (!ctx) return err_set(e, "zmq_ctx_new: %s", zmq_strerror(errno));
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int rc = -1, linger = 0;
    int64_t maxsz = POOLMSG_MAX_BYTES + 1024;
    if (!s) {
        err_set(e, "zmq_socket: %s", zmq_strerror(errno));
        goto out;
    }
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s, ZMQ_SNDTIMEO, &timeout_ms, sizeof timeout_ms);
    zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &maxsz, sizeof maxsz);
    if (zmq_connect(s, endpoint) < 0) {
        err_set(e, "pool %s: %s", endpoint, zmq_strerror(errno));
        goto out;
    }
    if (poolmsg_send(s, NULL, 0, req, e) < 0) {
        err_wrap(e, "pool %s", endpoint);
        goto out;
    }
    int r = poolmsg_recv(s, 0, NULL, NULL, reply, e);
    if (r == 1) {
        err_set(e, "pool %s did not answer within %.1f s: is `peftps pool start` running there?",
                endpoint, timeout_ms / 1000.0);
        goto out;
    }
    if (r < 0) {
        err_wrap(e, "pool %s", endpoint);
        goto out;
    }
    if ((*reply)->body_case == PEFTPS__POOL__POOL_MESSAGE__BODY_ERROR) {
        const char *msg = (*reply)->error->message;
        err_set(e, "%s", msg && *msg ? msg : "the pool refused without saying why");
        poolmsg_free(*reply);
        *reply = NULL;
        rc = -2;
        goto out;
    }
    rc = 0;
out:
    if (s) zmq_close(s);
    zmq_ctx_term(ctx);
    return rc;
}

const char *poolmsg_state_name(int state) {
    switch (state) {
    case PEFTPS__POOL__JOB_STATE__STARTING:
        return "starting";
    case PEFTPS__POOL__JOB_STATE__RUNNING:
        return "running";
    case PEFTPS__POOL__JOB_STATE__DONE:
        return "done";
    case PEFTPS__POOL__JOB_STATE__FAILED:
        return "failed";
    case PEFTPS__POOL__JOB_STATE__CANCELLED:
        return "cancelled";
    default:
        return "unknown";
    }
}
