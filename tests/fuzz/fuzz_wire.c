/* libFuzzer target for the wire decoder (common/net/wire.c, wire_decode): any
 * set of frames must either decode into views that lie inside the frames
 * and agree with their headers, or fail with a message; never crash or read
 * out of bounds. tests/test_wire.c includes this file to run the seeds.
 *
 * Input: frames one after another, each a 4-byte little-endian length and
 * that many bytes (a length past the end takes what remains); the first
 * frame is the header. Seeds in tests/fuzz/corpus/fuzz_wire: good_* decode,
 * bad_* are rejected. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/crc32c.h"
#include "net/wire.h"

#define FUZZ_WIRE_MAX_FRAMES 64

/* Cuts the input into frames; returns their count. */
static int fuzz_wire_frames(const uint8_t *data, size_t size, wire_frame *f, int cap) {
    int n = 0;
    while (size >= 4 && n < cap) {
        size_t len =
            (size_t)data[0] | (size_t)data[1] << 8 | (size_t)data[2] << 16 | (size_t)data[3] << 24;
        data += 4, size -= 4;
        if (len > size) len = size;
        f[n++] = (wire_frame){data, len};
        data += len, size -= len;
    }
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    wire_frame f[FUZZ_WIRE_MAX_FRAMES];
    int n = fuzz_wire_frames(data, size, f, FUZZ_WIRE_MAX_FRAMES);
    /* Small limits, so that the limit checks are reachable too. */
    wire_limits lim = {1 << 16, 16};
    wire_msg m;
    memset(&m, 0, sizeof m);
    err e = {{0}};
    if (wire_decode(f, n, &lim, &m, &e)) {
        if (m.env || m.tensors || !e.msg[0]) abort();
        return 0;
    }
    if (!m.env || m.env->body_case == PEFTPS__WIRE__ENVELOPE__BODY__NOT_SET) abort();
    int frames = m.env->body_case == PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT ||
                 m.env->body_case == PEFTPS__WIRE__ENVELOPE__BODY_GRAD_PUSH;
    if (frames ? m.n_tensors != n - 1 : n != 1) abort();
    /* Every claim of a view is checked against the frames, so that ASan
     * and these aborts catch a decoder that trusts its input. */
    wire_expect *x = calloc((size_t)m.n_tensors + 1, sizeof *x);
    int all_f32 = 1;
    for (int i = 0; i < m.n_tensors; i++) {
        const wire_view *v = &m.tensors[i];
        size_t len = strlen(v->name);
        if (!len || len >= WIRE_NAME_MAX || v->ndim < 0 || v->ndim > WIRE_MAX_DIMS) abort();
        size_t numel = 1;
        for (int d = 0; d < v->ndim; d++) numel *= (size_t)v->shape[d];
        if (numel != v->numel || numel * wire_dtype_size(v->dtype) != v->nbytes) abort();
        if (frames) {
            if (v->data != f[i + 1].data || v->nbytes != f[i + 1].size) abort();
            Peftps__Wire__TensorHeader *const *h =
                m.env->body_case == PEFTPS__WIRE__ENVELOPE__BODY_SNAPSHOT
                    ? m.env->snapshot->tensors
                    : m.env->grad_push->tensors;
            if (!h[i]->has_crc32c || crc32c(0, v->data, v->nbytes) != h[i]->crc32c) abort();
        } else if (v->data) {
            abort();
        }
        x[i] = (wire_expect){v->name, v->ndim, {0}};
        memcpy(x[i].shape, v->shape, sizeof x[i].shape);
        all_f32 &= v->dtype == PEFTPS__WIRE__DTYPE__F32;
        if (v->dtype == PEFTPS__WIRE__DTYPE__F32 && v->data) {
            float *dst = malloc(v->nbytes + 1);
            if (wire_tensor_copy_f32(v, dst, v->numel, &e) || memcmp(dst, v->data, v->nbytes))
                abort();
            const float *p = wire_tensor_f32(v);
            if (p && (p != v->data || (uintptr_t)p % sizeof(float))) abort();
            free(dst);
        }
    }
    /* The message matches its own table exactly, and not a shorter one. */
    if ((wire_check_tensors(&m, x, m.n_tensors, &e) == 0) != all_f32) abort();
    if (m.n_tensors && wire_check_tensors(&m, x, m.n_tensors - 1, &e) == 0) abort();
    free(x);
    wire_msg_close(&m);
    if (m.env || m.tensors) abort();
    return 0;
}
