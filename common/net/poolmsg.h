/* The pool's messages (proto/pool.proto) on ZeroMQ: one frame holding a
 * packed PoolMessage, preceded at the coordinator's ROUTER by the peer's
 * identity frame. Received frames are size-checked and unpacked, never
 * trusted further: each side checks the fields it reads. */
#ifndef PEFTPS_POOLMSG_H
#define PEFTPS_POOLMSG_H

#include <stddef.h>

#include "base/err.h"
#include "pool.pb-c.h"

/* Sent in WorkerHello.protocol_version; bumped on any incompatible change. */
#define POOLMSG_PROTOCOL_VERSION 1
/* No pool message may be larger: an experiment's text is well below. */
#define POOLMSG_MAX_BYTES (16u << 20)
/* A ROUTER identity is at most 255 bytes. */
#define POOLMSG_ID_MAX 255

/* Sends m on sock, after the identity frame id (id_len bytes) when id is
 * not NULL (a ROUTER). Fails when ZeroMQ does (ZMQ_SNDTIMEO expired,
 * peer gone at a ROUTER with ZMQ_ROUTER_MANDATORY). */
int poolmsg_send(void *sock, const unsigned char *id, size_t id_len,
                 const Peftps__Pool__PoolMessage *m, err *e);

/* Receives one message (flags as zmq_msg_recv, e.g. ZMQ_DONTWAIT). At a
 * ROUTER (id not NULL) the identity goes to id/id_len first. Returns 0
 * with *out set (free with poolmsg_free), 1 when nothing was waiting
 * (ZMQ_DONTWAIT), -1 on a malformed message (wrong frame count, too
 * large, not a PoolMessage, no body) or a ZeroMQ failure; every frame of
 * the message is consumed either way. */
int poolmsg_recv(void *sock, int flags, unsigned char *id, size_t *id_len,
                 Peftps__Pool__PoolMessage **out, err *e);

void poolmsg_free(Peftps__Pool__PoolMessage *m);

/* The body's field name ("submit", "job_list", ...), for messages. */
const char *poolmsg_body_name(int body_case);

/* One request and its answer over a fresh DEALER to endpoint, within
 * timeout_ms: what the commands (submit, jobs, cancel) use. An Error
 * answer is returned as -2 with e holding its message (the pool refused);
 * no answer in time, or any other failure, is -1, naming the endpoint. */
int poolmsg_request(const char *endpoint, const Peftps__Pool__PoolMessage *req, int timeout_ms,
                    Peftps__Pool__PoolMessage **reply, err *e);

/* A job state's name as the commands print it: "starting", "running", ... */
const char *poolmsg_state_name(int state);

#endif
