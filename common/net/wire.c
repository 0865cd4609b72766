/* The wire between workers and parameter servers: packing and sending of
 * header + tensor frames, and receiving with every check of wire.h done
 * before anything is used. Frames are checksummed with crc32c.c; the
 * messages are those of proto/wire.proto (build/proto/wire.pb-c.h). */
#include "net/wire.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/crc32c.h"

/* Tensor frames carry host-order bytes; mixing byte orders would corrupt
 * silently, so only little-endian hosts build. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "wire.c assumes a little-endian host");

/* ---- names and sizes ----------------------------------------------------- */

static const struct {
    const char *name;
    size_t size;
} dtypes[] = {
    [PEFTPS__WIRE__DTYPE__F32] = {"F32", 4},   [PEFTPS__WIRE__DTYPE__F16] = {"F16", 2},
    [PEFTPS__WIRE__DTYPE__BF16] = {"BF16", 2}, [PEFTPS__WIRE__DTYPE__I32] = {"I32", 4},
    [PEFTPS__WIRE__DTYPE__U32] = {"U32", 4},   [PEFTPS__WIRE__DTYPE__I64] = {"I64", 8},
    [PEFTPS__WIRE__DTYPE__F64] = {"F64", 8},
};
#define N_DTYPES ((int)(sizeof dtypes / sizeof dtypes[0]))

size_t wire_dtype_size(int dtype) {
    return dtype >= 0 && dtype < N_DTYPES ? dtypes[dtype].size : 0;
}

const char *wire_dtype_name(int dtype) {
    return dtype >= 0 && dtype < N_DTYPES ? dtypes[dtype].name : "?";
}

const char *wire_body_name(int body_case) {
    static const char *const names[] = {"none",     "hello",     "welcome",   "pull",
                                        "snapshot", "assign",    "grad_push", "ack",
                                        "error",    "heartbeat", "shutdown"};
    if (body_case < 0 || body_case >= (int)(sizeof names / sizeof names[0])) return "unknown";
    return names[body_case];
}

/* "[2,3]" into buf. */
static const char *shape_str(char *buf, size_t cap, const uint64_t *shape, size_t ndim) {
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (size_t i = 0; i < ndim && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%llu", i ? "," : "",
                              (unsigned long long)shape[i]);
    if (k < cap) snprintf(buf + k, cap - k, "]");
    return buf;
}

static const char *shape_str_i64(char *buf, size_t cap, const int64_t *shape, int ndim) {
    uint64_t u[WIRE_MAX_DIMS];
    for (int i = 0; i < ndim && i < WIRE_MAX_DIMS; i++) u[i] = (uint64_t)shape[i];
    return shape_str(buf, cap, u, ndim < WIRE_MAX_DIMS ? (size_t)ndim : WIRE_MAX_DIMS);
}

/* The tensor header list of a body, and whether frames follow it. Bodies
 * without a list give *n = NULL. */
typedef struct body_list {
    size_t *n;
    Peftps__Wire__TensorHeader ***h;
    int frames;
} body_list;

static body_list body_list_of(Peftps__Wire__Envelope *env) {
    body_list b = {NULL, NULL, 0};
    switch (env->body_case) {
    case PEFTPS__WIRE__ENVELOPE__BODY_WELCOME:
        b = (body_list){&env->welcome->n_tensors, &env->welcome->tensors, 0};
        break;
    case PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT:
        b = (body_list){&env->snapshot->n_tensors, &env->snapshot->tensors, 1};
        break;
    case PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH:
        b = (body_list){&env->grad_push->n_tensors, &env->grad_push->tensors, 1};
        break;
    default:
        break;
    }
    return b;
}

/* product(shape) * size without overflow; -1 on overflow. */
static int shape_bytes(const uint64_t *shape, size_t ndim, size_t size, uint64_t *numel,
                       uint64_t *nbytes) {
    uint64_t p = 1;
    for (size_t i = 0; i < ndim; i++)
        if (__builtin_mul_overflow(p, shape[i], &p)) return -1;
    *numel = p;
    return __builtin_mul_overflow(p, (uint64_t)size, nbytes) ? -1 : 0;
}

/* ---- sending ------------------------------------------------------------- */

/* Shared by every frame lent in one wire_send_zc: the last one to be freed
 * by libzmq (or by wire_send_zc itself) releases the caller's buffers. */
typedef struct lend {
    atomic_int refs;
    wire_release_fn release;
    void *hint;
} lend;

static void lend_drop(lend *l) {
    if (l && atomic_fetch_sub(&l->refs, 1) == 1) {
        l->release(l->hint);
        free(l);
    }
}

static void lend_free(void *data, void *hint) {
    (void)data;
    lend_drop(hint);
}

static int check_out_tensor(const wire_tensor *t, int i, int want_data, err *e) {
    if (!t->name || !t->name[0]) return err_set(e, "tensor %d has no name", i);
    size_t len = strlen(t->name);
    if (len >= WIRE_NAME_MAX)
        return err_set(e, "tensor %d ('%.40s...'): name of %zu bytes, the limit is %d", i, t->name,
                       len, WIRE_NAME_MAX - 1);
    size_t size = wire_dtype_size(t->dtype);
    if (!size) return err_set(e, "tensor %d ('%s'): unknown dtype %d", i, t->name, t->dtype);
    if (t->ndim < 0 || t->ndim > WIRE_MAX_DIMS)
        return err_set(e, "tensor %d ('%s'): %d dimensions, expected 0..%d", i, t->name, t->ndim,
                       WIRE_MAX_DIMS);
    uint64_t shape[WIRE_MAX_DIMS], numel, nbytes;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0)
            return err_set(e, "tensor %d ('%s'): negative dimension %lld", i, t->name,
                           (long long)t->shape[d]);
        shape[d] = (uint64_t)t->shape[d];
    }
    char sb[96];
    if (shape_bytes(shape, (size_t)t->ndim, size, &numel, &nbytes) || nbytes != t->nbytes)
        return err_set(e, "tensor %d ('%s'): nbytes %zu does not match shape %s of %s", i, t->name,
                       t->nbytes, shape_str(sb, sizeof sb, shape, (size_t)t->ndim),
                       wire_dtype_name(t->dtype));
    if (want_data && t->nbytes && !t->data)
        return err_set(e, "tensor %d ('%s'): no data", i, t->name);
    return 0;
}

/* Sends one frame, lending its bytes to libzmq when l is set and the frame
 * is big enough to be worth it. */
static int send_frame(void *sock, const void *p, size_t n, int more, lend *l, err *e) {
    int flags = more ? ZMQ_SNDMORE : 0;
    /* Inside a message a signal must not leave it half sent: libzmq would
     * glue the next message's frames onto it. */
    if (!l || n < WIRE_ZC_MIN_BYTES) {
        int rc;
        while ((rc = zmq_send(sock, p, n, flags)) < 0 && errno == EINTR) {
        }
        if (rc < 0) return err_set(e, "zmq_send: %s", zmq_strerror(errno));
        return 0;
    }
    zmq_msg_t m;
    atomic_fetch_add(&l->refs, 1);
    if (zmq_msg_init_data(&m, (void *)p, n, lend_free, l) < 0) {
        int saved = errno;
        lend_drop(l);
        return err_set(e, "zmq_msg_init_data: %s", zmq_strerror(saved));
    }
    int rc;
    while ((rc = zmq_msg_send(&m, sock, flags)) < 0 && errno == EINTR) {
    }
    if (rc < 0) {
        int saved = errno;
        zmq_msg_close(&m); /* still ours after a failed send: runs lend_free */
        return err_set(e, "zmq_msg_send: %s", zmq_strerror(saved));
    }
    return 0;
}

static int send_impl(void *sock, const void *identity, size_t id_len,
                     const Peftps__Wire__Envelope *env, const wire_tensor *tensors, int n, lend *l,
                     err *e) {
    if (!env || env->body_case == PEFTPS__WIRE__ENVELOPE__BODY__NOT_SET || !env->hello)
        return err_set(e, "sending a message: the envelope has no body");
    if (n < 0 || (n > 0 && !tensors))
        return err_set(e, "sending a message: bad tensor count %d", n);
    const char *body = wire_body_name(env->body_case);

    /* A shallow copy whose body may take the tensor list: env is the
     * caller's and stays untouched. */
    Peftps__Wire__Envelope copy = *env;
    union {
        Peftps__Wire__Welcome w;
        Peftps__Wire__Snapshot s;
        Peftps__Wire__GradPush g;
    } b;
    switch (copy.body_case) {
    case PEFTPS__WIRE__ENVELOPE__BODY_WELCOME:
        b.w = *env->welcome;
        copy.welcome = &b.w;
        break;
    case PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT:
        b.s = *env->snapshot;
        copy.snapshot = &b.s;
        break;
    case PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH:
        b.g = *env->grad_push;
        copy.grad_push = &b.g;
        break;
    default:
        break;
    }
    body_list bl = body_list_of(&copy);
    if (!bl.n && n > 0)
        return err_set(e, "sending %s: this message carries no tensors, %d given", body, n);
    if (bl.n && *bl.n && (n > 0 || bl.frames))
        return err_set(e,
                       "sending %s: the body already lists %zu tensor headers; leave the list "
                       "empty, wire_send fills it from the tensors",
                       body, *bl.n);

    Peftps__Wire__TensorHeader *hs = NULL, **hp = NULL;
    uint64_t *shapes = NULL;
    if (n > 0) {
        hs = calloc((size_t)n, sizeof *hs);
        hp = calloc((size_t)n, sizeof *hp);
        shapes = calloc((size_t)n * WIRE_MAX_DIMS, sizeof *shapes);
        if (!hs || !hp || !shapes) {
            free(hs), free(hp), free(shapes);
            return err_set(e, "sending %s: out of memory for %d tensor headers", body, n);
        }
    }
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) {
        const wire_tensor *t = &tensors[i];
        if (check_out_tensor(t, i, bl.frames, e)) {
            rc = err_wrap(e, "sending %s", body);
            break;
        }
        Peftps__Wire__TensorHeader *h = &hs[i];
        peftps__wire__tensor_header__init(h);
        h->name = (char *)t->name;
        h->has_dtype = 1;
        h->dtype = (Peftps__Wire__DType)t->dtype;
        h->n_shape = (size_t)t->ndim;
        h->shape = shapes + (size_t)i * WIRE_MAX_DIMS;
        for (int d = 0; d < t->ndim; d++) h->shape[d] = (uint64_t)t->shape[d];
        h->has_nbytes = 1;
        h->nbytes = t->nbytes;
        if (bl.frames) {
            h->has_crc32c = 1;
            h->crc32c = crc32c(0, t->data, t->nbytes);
        }
        hp[i] = h;
    }
    if (!rc && n > 0) {
        *bl.n = (size_t)n;
        *bl.h = hp;
    }
    int n_frames = bl.frames ? n : 0;

    zmq_msg_t hdr;
    if (!rc) {
        size_t size = peftps__wire__envelope__get_packed_size(&copy);
        if (zmq_msg_init_size(&hdr, size) < 0) {
            rc = err_set(e, "sending %s: header of %zu bytes: %s", body, size, zmq_strerror(errno));
        } else {
            peftps__wire__envelope__pack(&copy, zmq_msg_data(&hdr));
            if (id_len && zmq_send(sock, identity, id_len, ZMQ_SNDMORE) < 0) {
                rc = err_set(e, "sending %s: identity frame: %s", body, zmq_strerror(errno));
                zmq_msg_close(&hdr);
            } else {
                int r;
                while ((r = zmq_msg_send(&hdr, sock, n_frames ? ZMQ_SNDMORE : 0)) < 0 && id_len &&
                       errno == EINTR) {
                }
                if (r < 0) {
                    rc = err_set(e, "sending %s: header frame: %s", body, zmq_strerror(errno));
                    zmq_msg_close(&hdr);
                }
            }
        }
    }
    for (int i = 0; i < n_frames && !rc; i++)
        if (send_frame(sock, tensors[i].data, tensors[i].nbytes, i + 1 < n_frames, l, e))
            rc = err_wrap(e, "sending %s: tensor %d ('%s')", body, i, tensors[i].name);
    free(hs);
    free(hp);
    free(shapes);
    return rc;
}

int wire_send(void *sock, const void *identity, size_t id_len, const Peftps__Wire__Envelope *env,
              const wire_tensor *tensors, int n, err *e) {
    return send_impl(sock, identity, id_len, env, tensors, n, NULL, e);
}

int wire_send_zc(void *sock, const void *identity, size_t id_len, const Peftps__Wire__Envelope *env,
                 const wire_tensor *tensors, int n, wire_release_fn release, void *hint, err *e) {
    if (!release) return err_set(e, "wire_send_zc: no release callback");
    lend *l = malloc(sizeof *l);
    if (!l) {
        release(hint);
        return err_set(e, "wire_send_zc: out of memory");
    }
    atomic_init(&l->refs, 1); /* held by this call until the frames are queued */
    l->release = release;
    l->hint = hint;
    int rc = send_impl(sock, identity, id_len, env, tensors, n, l, e);
    lend_drop(l);
    return rc;
}

/* ---- decoding ------------------------------------------------------------ */

static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    uint64_t x = 0;
    for (int shift = 0; shift < 64 && *p < end; shift += 7) {
        uint8_t c = *(*p)++;
        x |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80)) {
            *v = x;
            return 0;
        }
    }
    return -1;
}

/* protobuf-c unpacks a string with a NUL inside as a shorter C string, so
 * "a\0b" would pass as "a": walk the encoded header with the descriptors
 * and refuse any string field holding a NUL. path names the field for the
 * message ("grad_push.tensors[2].name"). */
static int scan_strings(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t len,
                        char *path, size_t plen, int depth, err *e) {
    const uint8_t *end = p + len;
    unsigned seen[32] = {0}; /* occurrences per field number, for indices */
    if (depth > 8) return err_set(e, "header nests too deeply");
    while (p < end) {
        uint64_t key, v;
        if (read_varint(&p, end, &key)) return err_set(e, "header is not valid protobuf");
        int wt = (int)(key & 7);
        uint64_t num = key >> 3;
        const ProtobufCFieldDescriptor *f =
            num <= UINT_MAX ? protobuf_c_message_descriptor_get_field(d, (unsigned)num) : NULL;
        if (wt == 0) {
            if (read_varint(&p, end, &v)) return err_set(e, "header is not valid protobuf");
        } else if (wt == 1 || wt == 5) {
            size_t skip = wt == 1 ? 8 : 4;
            if ((size_t)(end - p) < skip) return err_set(e, "header is not valid protobuf");
            p += skip;
        } else if (wt == 2) {
            if (read_varint(&p, end, &v) || v > (uint64_t)(end - p))
                return err_set(e, "header is not valid protobuf");
            if (f && (f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_MESSAGE)) {
                size_t k = plen;
                k += (size_t)snprintf(path + k, 256 - k, "%s%s", plen ? "." : "", f->name);
                if (f->label == PROTOBUF_C_LABEL_REPEATED && num < 32 && k < 256)
                    k += (size_t)snprintf(path + k, 256 - k, "[%u]", seen[num]);
                if (num < 32) seen[num]++;
                if (k >= 256) k = 255;
                if (f->type == PROTOBUF_C_TYPE_STRING && memchr(p, 0, (size_t)v))
                    return err_set(e, "header field %s holds a NUL byte", path);
                if (f->type == PROTOBUF_C_TYPE_MESSAGE &&
                    scan_strings(f->descriptor, p, (size_t)v, path, k, depth + 1, e))
                    return -1;
                path[plen] = '\0';
            }
            p += v;
        } else {
            return err_set(e, "header is not valid protobuf (wire type %d)", wt);
        }
    }
    return 0;
}

/* Checks header i (and its frame, when one follows) and fills its view. */
static int check_header(const Peftps__Wire__TensorHeader *h, int i, const wire_frame *frame,
                        uint64_t max_bytes, wire_view *v, err *e) {
    if (!h->name) return err_set(e, "tensor %d has no name", i);
    const char *nm = h->name;
    size_t len = strlen(nm);
    if (!len) return err_set(e, "tensor %d has an empty name", i);
    if (len >= WIRE_NAME_MAX)
        return err_set(e, "tensor %d ('%.40s...'): name of %zu bytes, the limit is %d", i, nm, len,
                       WIRE_NAME_MAX - 1);
    if (!h->has_dtype) return err_set(e, "tensor %d ('%s') has no dtype", i, nm);
    size_t size = wire_dtype_size((int)h->dtype);
    if (!size) return err_set(e, "tensor %d ('%s'): unknown dtype %d", i, nm, (int)h->dtype);
    if (h->n_shape > WIRE_MAX_DIMS)
        return err_set(e, "tensor %d ('%s'): %zu dimensions, at most %d are allowed", i, nm,
                       h->n_shape, WIRE_MAX_DIMS);
    for (size_t d = 0; d < h->n_shape; d++)
        if (h->shape[d] > (uint64_t)INT64_MAX)
            return err_set(e, "tensor %d ('%s'): dimension %zu is %llu, too large", i, nm, d,
                           (unsigned long long)h->shape[d]);
    char sb[128];
    uint64_t numel, nbytes;
    if (shape_bytes(h->shape, h->n_shape, size, &numel, &nbytes))
        return err_set(e, "tensor %d ('%s'): shape %s of %s overflows 64 bits", i, nm,
                       shape_str(sb, sizeof sb, h->shape, h->n_shape), wire_dtype_name(h->dtype));
    if (!h->has_nbytes) return err_set(e, "tensor %d ('%s') has no nbytes", i, nm);
    if (h->nbytes != nbytes)
        return err_set(
            e, "tensor %d ('%s'): nbytes %llu does not match shape %s of %s (%llu bytes)", i, nm,
            (unsigned long long)h->nbytes, shape_str(sb, sizeof sb, h->shape, h->n_shape),
            wire_dtype_name(h->dtype), (unsigned long long)nbytes);
    if (nbytes > max_bytes)
        return err_set(e, "tensor %d ('%s'): %llu bytes, over the message limit of %llu", i, nm,
                       (unsigned long long)nbytes, (unsigned long long)max_bytes);
    if (frame) {
        if (frame->size != nbytes)
            return err_set(e,
                           "tensor %d ('%s'): frame has %zu bytes but the header says nbytes %llu",
                           i, nm, frame->size, (unsigned long long)nbytes);
        if (!h->has_crc32c) return err_set(e, "tensor %d ('%s') has no crc32c", i, nm);
        uint32_t crc = crc32c(0, frame->data, frame->size);
        if (crc != h->crc32c)
            return err_set(e, "tensor %d ('%s'): CRC-32C mismatch (header 0x%08x, frame 0x%08x)", i,
                           nm, h->crc32c, crc);
    }
    v->name = nm;
    v->dtype = (int)h->dtype;
    v->ndim = (int)h->n_shape;
    for (size_t d = 0; d < h->n_shape; d++) v->shape[d] = (int64_t)h->shape[d];
    v->numel = (size_t)numel;
    v->nbytes = (size_t)nbytes;
    v->data = frame ? frame->data : NULL;
    return 0;
}

static void limits_or_default(const wire_limits *lim, uint64_t *max_bytes, int *max_tensors) {
    *max_bytes = lim ? lim->max_message_bytes : WIRE_DEFAULT_MAX_MESSAGE_BYTES;
    *max_tensors = lim ? lim->max_tensors : WIRE_DEFAULT_MAX_TENSORS;
    if (*max_tensors < 0) *max_tensors = 0;
}

int wire_decode(const wire_frame *frames, int n, const wire_limits *lim, wire_msg *out, err *e) {
    uint64_t max_bytes;
    int max_tensors;
    limits_or_default(lim, &max_bytes, &max_tensors);
    if (n < 1) return err_set(e, "message has no header frame");
    uint64_t total = 0;
    for (int i = 0; i < n; i++)
        if (__builtin_add_overflow(total, (uint64_t)frames[i].size, &total) || total > max_bytes)
            return err_set(e, "message exceeds the limit of %llu bytes",
                           (unsigned long long)max_bytes);
    if (n - 1 > max_tensors)
        return err_set(e, "message has %d tensor frames, the limit is %d", n - 1, max_tensors);

    Peftps__Wire__Envelope *env =
        peftps__wire__envelope__unpack(NULL, frames[0].size, frames[0].data);
    if (!env) return err_set(e, "header frame (%zu bytes) is not a valid Envelope", frames[0].size);
    int rc = 0;
    wire_view *views = NULL;
    const char *body = wire_body_name(env->body_case);
    char path[256] = "";
    body_list bl = body_list_of(env);
    size_t nh = bl.n ? *bl.n : 0;
    if (env->body_case == PEFTPS__WIRE__ENVELOPE__BODY__NOT_SET)
        rc = err_set(e, "header has no body (a missing or unknown message type)");
    else if (scan_strings(&peftps__wire__envelope__descriptor, frames[0].data, frames[0].size, path,
                          0, 0, e))
        rc = -1;
    else if (!bl.frames && n > 1)
        rc = err_set(e, "%s carries no tensor frames, but %d follow", body, n - 1);
    else if (nh > (size_t)max_tensors)
        rc = err_set(e, "%s lists %zu tensor headers, the limit is %d", body, nh, max_tensors);
    else if (bl.frames && nh != (size_t)(n - 1))
        rc = err_set(e, "%s lists %zu tensor headers but %d tensor frames follow", body, nh, n - 1);
    else if (!(views = calloc(nh ? nh : 1, sizeof *views)))
        rc = err_set(e, "%s: out of memory for %zu tensors", body, nh);
    for (size_t i = 0; i < nh && !rc; i++)
        if (check_header((*bl.h)[i], (int)i, bl.frames ? &frames[i + 1] : NULL, max_bytes,
                         &views[i], e))
            rc = err_wrap(e, "%s", body);
    if (rc) {
        free(views);
        peftps__wire__envelope__free_unpacked(env, NULL);
        return -1;
    }
    out->env = env;
    out->tensors = views;
    out->n_tensors = (int)nh;
    out->bytes = total;
    return 0;
}

/* ---- receiving ----------------------------------------------------------- */

static void peer_hex(const wire_msg *m, char *buf, size_t cap) {
    size_t k = 0, shown = m->id_len < 32 ? m->id_len : 32;
    buf[0] = '\0';
    for (size_t i = 0; i < shown && k + 3 < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%02x", m->identity[i]);
    if (shown < m->id_len && k + 4 < cap) snprintf(buf + k, cap - k, "...");
}

/* A part of a multipart message already delivered: libzmq hands over
 * multipart messages whole, so this only waits on a signal. */
static int recv_part(void *sock, zmq_msg_t *m) {
    int rc;
    while ((rc = zmq_msg_recv(m, sock, 0)) < 0 && errno == EINTR) {
    }
    return rc < 0 ? -1 : 0;
}

int wire_recv(void *sock, int with_identity, wire_msg *out, const wire_limits *lim, err *e) {
    memset(out, 0, sizeof *out);
    uint64_t max_bytes;
    int max_tensors;
    limits_or_default(lim, &max_bytes, &max_tensors);

    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, sock, 0) < 0) {
        int saved = errno;
        zmq_msg_close(&m);
        err_set(e, "receiving a message: %s", zmq_strerror(saved));
        errno = saved; /* EAGAIN tells a timeout from the rest */
        return -1;
    }
    out->received = 1;
    int more = zmq_msg_more(&m);
    if (with_identity) {
        size_t n = zmq_msg_size(&m);
        out->id_len = n < WIRE_IDENTITY_MAX ? n : WIRE_IDENTITY_MAX;
        memcpy(out->identity, zmq_msg_data(&m), out->id_len);
        zmq_msg_close(&m);
        zmq_msg_init(&m);
        if (!more) {
            char hex[80];
            peer_hex(out, hex, sizeof hex);
            return err_set(e, "message from peer %s holds only an identity frame", hex);
        }
        if (recv_part(sock, &m)) {
            zmq_msg_close(&m);
            return err_set(e, "receiving a message: %s", zmq_strerror(errno));
        }
        more = zmq_msg_more(&m);
    }

    /* Keep frames while within the limits; past them, drain and count. */
    int cap = 0, n = 0, dropped = 0, over_count = 0, fail = 0;
    uint64_t total = 0;
    zmq_msg_t *frames = NULL;
    for (;;) {
        size_t size = zmq_msg_size(&m);
        if (__builtin_add_overflow(total, (uint64_t)size, &total)) total = UINT64_MAX;
        if (n - 1 >= max_tensors) over_count = 1;
        if (!fail && !over_count && total <= max_bytes && n == cap) {
            int ncap = cap ? 2 * cap : 8;
            zmq_msg_t *nf = realloc(frames, (size_t)ncap * sizeof *nf);
            if (nf)
                frames = nf, cap = ncap;
            else
                fail = 1;
        }
        if (!fail && !over_count && total <= max_bytes) {
            /* realloc may move these later: a zmq_msg_t holds no pointer
             * to itself, and data pointers are taken only at the end. */
            zmq_msg_init(&frames[n]);
            zmq_msg_move(&frames[n++], &m);
        } else {
            dropped++;
            zmq_msg_close(&m);
        }
        zmq_msg_init(&m);
        if (!more) break;
        if (recv_part(sock, &m)) {
            int saved = errno;
            zmq_msg_close(&m);
            for (int i = 0; i < n; i++) zmq_msg_close(&frames[i]);
            free(frames);
            return err_set(e, "receiving a message: %s", zmq_strerror(saved));
        }
        more = zmq_msg_more(&m);
    }
    zmq_msg_close(&m);
    out->bytes = total;

    int rc = 0;
    wire_frame *wf = NULL;
    if (fail)
        rc = err_set(e, "out of memory for %d frames", n + dropped);
    else if (total > max_bytes)
        rc = err_set(e, "message of %llu bytes exceeds the limit of %llu bytes",
                     (unsigned long long)total, (unsigned long long)max_bytes);
    else if (over_count)
        rc = err_set(e, "message has %d tensor frames, the limit is %d", n + dropped - 1,
                     max_tensors);
    else if (!(wf = malloc((size_t)n * sizeof *wf)))
        rc = err_set(e, "out of memory for %d frames", n);
    else {
        for (int i = 0; i < n; i++)
            wf[i] = (wire_frame){zmq_msg_data(&frames[i]), zmq_msg_size(&frames[i])};
        rc = wire_decode(wf, n, lim, out, e);
    }
    free(wf);
    if (rc) {
        for (int i = 0; i < n; i++) zmq_msg_close(&frames[i]);
        free(frames);
        if (with_identity) {
            char hex[80];
            peer_hex(out, hex, sizeof hex);
            return err_wrap(e, "message from peer %s", hex);
        }
        return err_wrap(e, "received message");
    }
    out->frames_ = frames;
    out->n_frames_ = n;
    return 0;
}

void wire_msg_close(wire_msg *m) {
    if (!m) return;
    if (m->env) peftps__wire__envelope__free_unpacked(m->env, NULL);
    free(m->tensors);
    for (int i = 0; i < m->n_frames_; i++) zmq_msg_close(&m->frames_[i]);
    free(m->frames_);
    memset(m, 0, sizeof *m);
}

/* ---- checks and reading -------------------------------------------------- */

int wire_check_tensors(const wire_msg *m, const wire_expect *expected, int n, err *e) {
    if (m->n_tensors != n) return err_set(e, "%d tensors received, %d expected", m->n_tensors, n);
    char a[96], b[96];
    for (int i = 0; i < n; i++) {
        const wire_view *v = &m->tensors[i];
        const wire_expect *x = &expected[i];
        if (strcmp(v->name, x->name) != 0)
            return err_set(e, "tensor %d is '%s', expected '%s'", i, v->name, x->name);
        if (v->dtype != PEFTPS__WIRE__DTYPE__F32)
            return err_set(e, "tensor %d ('%s') is %s, expected F32", i, v->name,
                           wire_dtype_name(v->dtype));
        int same = v->ndim == x->ndim;
        for (int d = 0; same && d < v->ndim; d++) same = v->shape[d] == x->shape[d];
        if (!same)
            return err_set(e, "tensor %d ('%s') has shape %s, expected %s", i, v->name,
                           shape_str_i64(a, sizeof a, v->shape, v->ndim),
                           shape_str_i64(b, sizeof b, x->shape, x->ndim));
    }
    return 0;
}

const float *wire_tensor_f32(const wire_view *t) {
    if (t->dtype != PEFTPS__WIRE__DTYPE__F32 || !t->data) return NULL;
    if ((uintptr_t)t->data % _Alignof(float)) return NULL;
    return t->data;
}

int wire_tensor_copy_f32(const wire_view *t, float *dst, size_t count, err *e) {
    if (t->dtype != PEFTPS__WIRE__DTYPE__F32)
        return err_set(e, "tensor '%s' is %s, expected F32", t->name, wire_dtype_name(t->dtype));
    if (t->numel != count)
        return err_set(e, "tensor '%s' has %zu elements, expected %zu", t->name, t->numel, count);
    if (count && !t->data) return err_set(e, "tensor '%s' has no data", t->name);
    if (count) memcpy(dst, t->data, count * sizeof *dst);
    return 0;
}

int wire_limits_for(wire_limits *lim, const wire_expect *t, int n, err *e) {
    /* Room for the header: every TensorHeader is under 256 bytes (a name
     * under 160, four varint dims, nbytes, CRC, tags), plus the body's own
     * fields. */
    uint64_t total = 4096, numel, nbytes;
    if (n < 0) return err_set(e, "wire limits: negative tensor count %d", n);
    for (int i = 0; i < n; i++) {
        uint64_t shape[WIRE_MAX_DIMS];
        if (t[i].ndim < 0 || t[i].ndim > WIRE_MAX_DIMS)
            return err_set(e, "wire limits: tensor '%s' has %d dimensions", t[i].name, t[i].ndim);
        for (int d = 0; d < t[i].ndim; d++) {
            if (t[i].shape[d] < 0)
                return err_set(e, "wire limits: tensor '%s' has a negative dimension", t[i].name);
            shape[d] = (uint64_t)t[i].shape[d];
        }
        if (shape_bytes(shape, (size_t)t[i].ndim, sizeof(float), &numel, &nbytes) ||
            __builtin_add_overflow(total, nbytes + 256, &total))
            return err_set(e, "wire limits: the table's size overflows at tensor '%s'", t[i].name);
    }
    lim->max_message_bytes = total;
    lim->max_tensors = n;
    return 0;
}

int wire_set_limits(void *sock, uint64_t max_message_bytes, err *e) {
    if (max_message_bytes > (uint64_t)INT64_MAX)
        return err_set(e, "ZMQ_MAXMSGSIZE: %llu bytes is too large",
                       (unsigned long long)max_message_bytes);
    int64_t v = (int64_t)max_message_bytes;
    if (zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &v, sizeof v) < 0)
        return err_set(e, "ZMQ_MAXMSGSIZE %lld: %s", (long long)v, zmq_strerror(errno));
    return 0;
}

/* ---- envelope builders --------------------------------------------------- */

#define BODY(o, field, init, tag)                                                                  \
    do {                                                                                           \
        peftps__wire__envelope__init(&(o)->env);                                                   \
        init(&(o)->body.field);                                                                    \
        (o)->env.body_case = tag;                                                                  \
        (o)->env.field = &(o)->body.field;                                                         \
    } while (0)

Peftps__Wire__Envelope *wire_hello(wire_out *o, const char *worker_id, const char *base_fingerprint,
                                   const char *experiment_fingerprint, const char *hostname,
                                   uint32_t pid) {
    BODY(o, hello, peftps__wire__hello__init, PEFTPS__WIRE__ENVELOPE__BODY_HELLO);
    Peftps__Wire__Hello *h = &o->body.hello;
    h->has_protocol_version = 1;
    h->protocol_version = WIRE_PROTOCOL_VERSION;
    h->worker_id = (char *)worker_id;
    h->base_fingerprint = (char *)base_fingerprint;
    h->experiment_fingerprint = (char *)experiment_fingerprint;
    h->hostname = (char *)hostname;
    h->has_pid = 1;
    h->pid = pid;
    return &o->env;
}

Peftps__Wire__Envelope *wire_welcome(wire_out *o, uint32_t server_index, uint32_t num_servers,
                                     uint32_t heartbeat_ms, uint64_t version) {
    BODY(o, welcome, peftps__wire__welcome__init, PEFTPS__WIRE__ENVELOPE__BODY_WELCOME);
    Peftps__Wire__Welcome *w = &o->body.welcome;
    w->has_server_index = w->has_num_servers = w->has_heartbeat_ms = w->has_version = 1;
    w->server_index = server_index;
    w->num_servers = num_servers;
    w->heartbeat_ms = heartbeat_ms;
    w->version = version;
    return &o->env;
}

Peftps__Wire__Envelope *wire_pull(wire_out *o, uint64_t have_version) {
    BODY(o, pull, peftps__wire__pull__init, PEFTPS__WIRE__ENVELOPE__BODY_PULL);
    o->body.pull.has_have_version = 1;
    o->body.pull.have_version = have_version;
    return &o->env;
}

Peftps__Wire__Envelope *wire_snapshot(wire_out *o, uint64_t version, uint64_t step) {
    BODY(o, snapshot, peftps__wire__snapshot__init, PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT);
    Peftps__Wire__Snapshot *s = &o->body.snapshot;
    s->has_version = s->has_step = 1;
    s->version = version;
    s->step = step;
    return &o->env;
}

Peftps__Wire__Envelope *wire_assign(wire_out *o, uint64_t step, uint64_t version,
                                    const uint32_t *shards, size_t n) {
    BODY(o, assign, peftps__wire__assign__init, PEFTPS__WIRE__ENVELOPE__BODY_ASSIGN);
    Peftps__Wire__Assign *a = &o->body.assign;
    a->has_step = a->has_version = 1;
    a->step = step;
    a->version = version;
    a->n_shards = n;
    a->shards = (uint32_t *)shards;
    return &o->env;
}

Peftps__Wire__Envelope *wire_grad_push(wire_out *o, uint64_t step, uint64_t version, uint32_t shard,
                                       double loss_sum, uint64_t n_tokens) {
    BODY(o, grad_push, peftps__wire__grad_push__init, PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH);
    Peftps__Wire__GradPush *g = &o->body.grad_push;
    g->has_step = g->has_version = g->has_shard = g->has_loss_sum = g->has_n_tokens = 1;
    g->step = step;
    g->version = version;
    g->shard = shard;
    g->loss_sum = loss_sum;
    g->n_tokens = n_tokens;
    return &o->env;
}

Peftps__Wire__Envelope *wire_ack(wire_out *o, uint64_t step, uint32_t shard, int accepted) {
    BODY(o, ack, peftps__wire__ack__init, PEFTPS__WIRE__ENVELOPE__BODY_ACK);
    Peftps__Wire__Ack *a = &o->body.ack;
    a->has_step = a->has_shard = a->has_accepted = 1;
    a->step = step;
    a->shard = shard;
    a->accepted = accepted != 0;
    return &o->env;
}

Peftps__Wire__Envelope *wire_error(wire_out *o, Peftps__Wire__ErrorCode code, const char *fmt,
                                   ...) {
    BODY(o, error, peftps__wire__error__init, PEFTPS__WIRE__ENVELOPE__BODY_ERROR);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(o->text, sizeof o->text, fmt, ap);
    va_end(ap);
    o->body.error.has_code = 1;
    o->body.error.code = code;
    o->body.error.message = o->text;
    return &o->env;
}

Peftps__Wire__Envelope *wire_heartbeat(wire_out *o, uint64_t version, uint64_t step) {
    BODY(o, heartbeat, peftps__wire__heartbeat__init, PEFTPS__WIRE__ENVELOPE__BODY_HEARTBEAT);
    Peftps__Wire__Heartbeat *h = &o->body.heartbeat;
    h->has_version = h->has_step = 1;
    h->version = version;
    h->step = step;
    return &o->env;
}

Peftps__Wire__Envelope *wire_shutdown(wire_out *o, const char *reason) {
    BODY(o, shutdown, peftps__wire__shutdown__init, PEFTPS__WIRE__ENVELOPE__BODY_SHUTDOWN);
    o->body.shutdown.reason = (char *)reason;
    return &o->env;
}
