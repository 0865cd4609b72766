/* The wire between workers and parameter servers (ZeroMQ ROUTER on the
 * server, DEALER on the worker): framing, sending and fully validated
 * receiving of the messages of proto/wire.proto. Uses crc32c.h for frame
 * checksums; server/ and worker/ build their protocol on top of it.
 *
 * A message on the wire is one header frame (a packed Envelope) followed by
 * one raw frame per TensorHeader of the body, in order. Only Snapshot and
 * GradPush bodies are followed by tensor frames; Welcome lists tensor
 * headers that describe the server's table, with no frames. Tensor bytes
 * are in host order, and only little-endian hosts are supported, so the
 * bytes on the wire are little-endian. At a ROUTER every message is
 * preceded by the peer's identity frame (no empty delimiter: peers are
 * DEALERs). */
#ifndef PEFTPS_WIRE_H
#define PEFTPS_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include <zmq.h>

#include "base/err.h"
#include "wire.pb-c.h"

/* Sent in Hello.protocol_version; bumped on any incompatible change. */
#define WIRE_PROTOCOL_VERSION 1
/* Dimensions of a tensor, as many as a peft_tensor holds (peft.h). */
#define WIRE_MAX_DIMS 4
/* Buffer size that holds any valid tensor name with its NUL, equal to
 * PEFT_NAME_MAX: names are 1..WIRE_NAME_MAX-1 bytes. */
#define WIRE_NAME_MAX 160
/* A ROUTER identity is at most 255 bytes (ZMQ_ROUTING_ID). */
#define WIRE_IDENTITY_MAX 255
/* Frames below this size are copied by wire_send_zc rather than lent:
 * lending costs an allocation and a callback for no gain. */
#define WIRE_ZC_MIN_BYTES 65536

/* Limits applied to every received message. A NULL wire_limits means the
 * defaults below. */
typedef struct wire_limits {
    uint64_t max_message_bytes; /* all frames but the identity, summed */
    int max_tensors;            /* tensor headers, and tensor frames */
} wire_limits;
#define WIRE_DEFAULT_MAX_MESSAGE_BYTES (UINT64_C(4) << 30)
#define WIRE_DEFAULT_MAX_TENSORS 65536

/* A tensor to send. dtype is a Peftps__Wire__DType; nbytes must equal
 * product(shape) * dtype size (a scalar has ndim 0 and one element). data
 * may be NULL only when nbytes is 0, and is not read for a Welcome. */
typedef struct wire_tensor {
    const char *name;
    int dtype;
    int ndim;
    int64_t shape[WIRE_MAX_DIMS];
    const void *data;
    size_t nbytes;
} wire_tensor;

/* A received tensor, validated against its header. `data` points into a
 * received ZeroMQ frame, valid until wire_msg_close, and MAY BE UNALIGNED:
 * libzmq decodes frames that fit its 8 KiB receive buffer in place, at any
 * offset. Use wire_tensor_f32 / wire_tensor_copy_f32 to read floats. For a
 * Welcome, data is NULL (the header describes, no frame follows). */
typedef struct wire_view {
    const char *name; /* inside the envelope, NUL-terminated */
    int dtype;
    int ndim;
    int64_t shape[WIRE_MAX_DIMS];
    size_t numel;
    size_t nbytes;
    const void *data;
} wire_view;

/* One entry of the table a receiver expects: an F32 tensor of this name and
 * exact shape. */
typedef struct wire_expect {
    const char *name;
    int ndim;
    int64_t shape[WIRE_MAX_DIMS];
} wire_expect;

/* One received message. Zero it (or let wire_recv fill it) before use. */
typedef struct wire_msg {
    unsigned char identity[WIRE_IDENTITY_MAX]; /* the peer, at a ROUTER */
    size_t id_len;
    /* 1 once a whole message was taken off the socket, even if it was then
     * rejected: the socket is in sync and the peer may be answered. */
    int received;
    uint64_t bytes;              /* header and tensor frames, for metrics */
    Peftps__Wire__Envelope *env; /* decoded header; body_case is set */
    wire_view *tensors;          /* n_tensors validated views */
    int n_tensors;
    /* Private: the received tensor frames that `tensors` point into. */
    zmq_msg_t *frames_;
    int n_frames_;
} wire_msg;

/* An in-memory frame, for wire_decode. */
typedef struct wire_frame {
    const void *data;
    size_t size;
} wire_frame;

/* Storage for an envelope built by the wire_<body> helpers below, so that
 * building one needs no allocation; the returned envelope points into it and
 * into the caller's strings, which must outlive the send. */
typedef struct wire_out {
    Peftps__Wire__Envelope env;
    union {
        Peftps__Wire__Hello hello;
        Peftps__Wire__Welcome welcome;
        Peftps__Wire__Pull pull;
        Peftps__Wire__Snapshot snapshot;
        Peftps__Wire__Assign assign;
        Peftps__Wire__GradPush grad_push;
        Peftps__Wire__Ack ack;
        Peftps__Wire__Error error;
        Peftps__Wire__Heartbeat heartbeat;
        Peftps__Wire__Shutdown shutdown;
    } body;
    char text[512]; /* wire_error's formatted message */
} wire_out;

/* Called once when libzmq no longer needs any tensor lent to wire_send_zc,
 * possibly from a libzmq I/O thread or from the receiving thread (inproc),
 * and possibly before wire_send_zc returns. Must be thread-safe. */
typedef void (*wire_release_fn)(void *hint);

/* Sends one message: identity frame first when id_len > 0 (ROUTER; pass
 * NULL, 0 from a DEALER), the packed envelope, then a frame per tensor.
 * For Snapshot and GradPush bodies the n tensors are sent as frames and
 * their TensorHeaders (name, dtype, shape, nbytes, CRC-32C) are filled from
 * `tensors`: the body's own list must be empty. For a Welcome, the list is
 * filled the same way (without CRC) and no frames follow; or n is 0 and the
 * list is sent as the caller built it. Other bodies take n == 0. env itself
 * is not modified. The tensor bytes are copied into libzmq (zmq_send), so
 * the caller may reuse them as soon as this returns; this costs one memcpy
 * per frame (23 ms for 64 MiB here, against 47 ms for its loopback round
 * trip), see wire_send_zc for the lending variant. A DEALER blocks while it
 * has no peer or its high-water mark is reached; a ROUTER silently drops a
 * message for an unknown identity unless ZMQ_ROUTER_MANDATORY is set.
 * Errors (-1): a tensor the header could not describe (empty or too long
 * name, unknown dtype, ndim outside 0..4, negative dim, nbytes not equal to
 * the shape's size, NULL data), a body with no tensors given tensors or a
 * tensor-carrying body with a pre-filled list, no body, and zmq errors on
 * the first frame (EHOSTUNREACH for an unknown identity with
 * ZMQ_ROUTER_MANDATORY, EAGAIN, ETERM, EINTR). Later frames retry EINTR,
 * since a half-sent message would swallow the next one; only ETERM (the
 * context is closing) can leave one half sent. */
int wire_send(void *sock, const void *identity, size_t id_len, const Peftps__Wire__Envelope *env,
              const wire_tensor *tensors, int n, err *e);

/* As wire_send, but tensor frames of at least WIRE_ZC_MIN_BYTES are lent to
 * libzmq instead of copied (zmq_msg_init_data): their bytes must stay
 * allocated and unchanged until release(hint) is called, exactly once, on
 * success and on every error. Lending is not "until send returns": libzmq
 * writes from its I/O thread later, and over inproc the receiver reads the
 * sender's very buffer until it closes the message. A server therefore
 * lends an immutable per-version copy of its parameters and frees it in
 * release, never the parameters the optimizer updates in place. */
int wire_send_zc(void *sock, const void *identity, size_t id_len, const Peftps__Wire__Envelope *env,
                 const wire_tensor *tensors, int n, wire_release_fn release, void *hint, err *e);

/* Receives one whole message (blocking, unless the socket has ZMQ_RCVTIMEO)
 * into out, which need not be initialised (a message it held must have
 * been closed first); with_identity is 1 on a ROUTER. Always
 * takes every frame of the message off the socket, also of a bad one, so
 * that the next call starts at a message boundary. Validates it as
 * wire_decode does, and also rejects more than lim->max_tensors frames or
 * lim->max_message_bytes bytes while receiving (without keeping them).
 * Returns 0 with out holding the message (release with wire_msg_close).
 * Returns -1 with e set when:
 *   - out->received is 0: nothing was received (errno EAGAIN after
 *     ZMQ_RCVTIMEO, ETERM, EINTR); out holds nothing;
 *   - out->received is 1: the message was malformed; e says what was wrong
 *     ("message from peer <hex identity>: ..."), out->identity/id_len are
 *     filled so the server can answer with an Error, nothing else is held.
 * wire_msg_close is harmless after -1. */
int wire_recv(void *sock, int with_identity, wire_msg *out, const wire_limits *lim, err *e);

/* The checks of wire_recv on frames in memory: frames[0] is the header,
 * frames[1..n-1] the tensor frames. Fills out->env, out->tensors and
 * out->n_tensors (views point into frames, which must outlive them) and
 * out->bytes; leaves identity and private frames alone. Checks that the
 * header decodes as an Envelope, that a body is set, that no string in it
 * holds a NUL byte, that tensor-carrying bodies (Snapshot, GradPush) are
 * followed by exactly one frame per TensorHeader and other bodies by none,
 * and for each TensorHeader (also a Welcome's): name present, non-empty,
 * shorter than WIRE_NAME_MAX; dtype present and known; at most 4 dims, each
 * <= INT64_MAX; nbytes present and equal to product(shape) * dtype size
 * (computed without overflow); and for frames, frame length == nbytes and
 * CRC-32C present and equal to the frame's. Also at most lim->max_tensors
 * headers and lim->max_message_bytes bytes over all frames. Returns 0, or
 * -1 with e saying which check failed on which tensor (index and name);
 * out then holds nothing. Release a success with wire_msg_close. */
int wire_decode(const wire_frame *frames, int n, const wire_limits *lim, wire_msg *out, err *e);

/* Releases what a wire_msg holds and zeroes it; accepts a zeroed msg. */
void wire_msg_close(wire_msg *m);

/* Checks the received tensors against the table the receiver registered:
 * exactly n tensors, in that order, with those names, dtype F32 and exact
 * shapes. Works on a Welcome too (compare the server's table with one's
 * own). Returns 0, or -1 naming the first tensor that differs and how. */
int wire_check_tensors(const wire_msg *m, const wire_expect *expected, int n, err *e);

/* The tensor's data as floats when it is F32 and 4-byte aligned, else NULL
 * (then copy it with wire_tensor_copy_f32). */
const float *wire_tensor_f32(const wire_view *t);

/* Copies an F32 tensor of exactly `count` elements into dst (aligned).
 * Returns 0, or -1 if the dtype is not F32, the count differs or there is
 * no data (a Welcome's view). */
int wire_tensor_copy_f32(const wire_view *t, float *dst, size_t count, err *e);

/* Bytes per element of a Peftps__Wire__DType, 0 for an unknown value. */
size_t wire_dtype_size(int dtype);
/* Name of a dtype ("F32", ...); "?" for an unknown value. */
const char *wire_dtype_name(int dtype);
/* Name of a body ("hello", "grad_push", ...; "none" when not set). */
const char *wire_body_name(int body_case);

/* Limits for a server holding table t (n F32 tensors): the largest message
 * is a Snapshot or GradPush of the whole table, plus room for its header.
 * Returns 0, or -1 on a bad shape or if the sum overflows. */
int wire_limits_for(wire_limits *lim, const wire_expect *t, int n, err *e);

/* Sets ZMQ_MAXMSGSIZE on sock to max_message_bytes. libzmq applies it to
 * each frame (not the whole message) arriving over a network transport
 * (not inproc), and on a frame too large it drops the connection: the
 * receiver gets nothing of that message, nor of the messages queued behind
 * it on the connection; the peer reconnects by itself (a DEALER without
 * ZMQ_ROUTING_ID comes back under a new identity) and must resend after a
 * timeout. Call before bind/connect: it applies to new connections.
 * Returns 0, or -1 if the value exceeds INT64_MAX or zmq refuses it. */
int wire_set_limits(void *sock, uint64_t max_message_bytes, err *e);

/* Envelope builders: fill o and return &o->env, ready for wire_send. */
Peftps__Wire__Envelope *wire_hello(wire_out *o, const char *worker_id, const char *base_fingerprint,
                                   const char *experiment_fingerprint, const char *hostname,
                                   uint32_t pid);
Peftps__Wire__Envelope *wire_welcome(wire_out *o, uint32_t server_index, uint32_t num_servers,
                                     uint32_t heartbeat_ms, uint64_t version);
Peftps__Wire__Envelope *wire_pull(wire_out *o, uint64_t have_version);
Peftps__Wire__Envelope *wire_snapshot(wire_out *o, uint64_t version, uint64_t step);
/* shards (n of them) must outlive the send. */
Peftps__Wire__Envelope *wire_assign(wire_out *o, uint64_t step, uint64_t version,
                                    const uint32_t *shards, size_t n);
Peftps__Wire__Envelope *wire_grad_push(wire_out *o, uint64_t step, uint64_t version, uint32_t shard,
                                       double loss_sum, uint64_t n_tokens);
Peftps__Wire__Envelope *wire_ack(wire_out *o, uint64_t step, uint32_t shard, int accepted);
/* The message is formatted into o->text (cut to fit). */
Peftps__Wire__Envelope *wire_error(wire_out *o, Peftps__Wire__ErrorCode code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
Peftps__Wire__Envelope *wire_heartbeat(wire_out *o, uint64_t version, uint64_t step);
Peftps__Wire__Envelope *wire_shutdown(wire_out *o, const char *reason);

#endif
