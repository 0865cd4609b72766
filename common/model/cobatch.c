/* Co-batching (cobatch.h): a pool of threads kept for the process, one per
 * computation of a cobatch_run, handed a single turn so that one computes
 * at a time; the caller of cobatch_run coordinates and, when every
 * computation waits at a product, runs the waiting products, those with
 * equal keys over their concatenated rows through kernels.c's *_k
 * functions. tests/test_cobatch.c checks the bits against solo runs. */
#include "model/cobatch.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "model/kernels.h"

/* ---- counters -------------------------------------------------------------- */

static atomic_uint_least64_t st_rounds, st_calls_shared, st_products_in, st_rows_shared,
    st_products_alone, st_products_f32;

void cobatch_stats_get(cobatch_stats *s) {
    s->rounds = atomic_load(&st_rounds);
    s->calls_shared = atomic_load(&st_calls_shared);
    s->products_in = atomic_load(&st_products_in);
    s->rows_shared = atomic_load(&st_rows_shared);
    s->products_alone = atomic_load(&st_products_alone);
    s->products_f32 = atomic_load(&st_products_f32);
}

void cobatch_stats_diff(cobatch_stats *s, const cobatch_stats *a, const cobatch_stats *b) {
    s->rounds = a->rounds - b->rounds;
    s->calls_shared = a->calls_shared - b->calls_shared;
    s->products_in = a->products_in - b->products_in;
    s->rows_shared = a->rows_shared - b->rows_shared;
    s->products_alone = a->products_alone - b->products_alone;
    s->products_f32 = a->products_f32 - b->products_f32;
}

void cobatch_count_f32(void) {
    atomic_fetch_add(&st_products_f32, 1);
}

/* ---- the pool of computation threads --------------------------------------- */

enum { S_IDLE, S_READY, S_RUNNING, S_WAITING, S_DONE };

typedef struct slot {
    pthread_t th;
    pthread_cond_t cv; /* the slot's thread waits here for its turn */
    int state;         /* S_*, under mu */
    void (*fn)(void *ctx, int i);
    void *ctx;
    int idx;
    cobatch_req *req; /* while S_WAITING */
} slot;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t coord_cv = PTHREAD_COND_INITIALIZER; /* the coordinator waits here */
static pthread_mutex_t run_mu = PTHREAD_MUTEX_INITIALIZER; /* one cobatch_run at a time */
static slot *slots[COBATCH_MAX];
static int n_slots;
static _Thread_local slot *tl_slot;

int cobatch_active(void) {
    return tl_slot != NULL;
}

static void *slot_main(void *arg) {
    slot *s = arg;
    tl_slot = s;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (s->state != S_RUNNING) pthread_cond_wait(&s->cv, &mu);
        pthread_mutex_unlock(&mu);
        s->fn(s->ctx, s->idx);
        pthread_mutex_lock(&mu);
        s->state = S_DONE;
        pthread_cond_signal(&coord_cv);
    }
    return NULL;
}

/* Starts slots up to n; returns how many exist. Under run_mu. */
static int slots_grow(int n) {
    while (n_slots < n) {
        slot *s = calloc(1, sizeof *s);
        if (!s) break;
        pthread_cond_init(&s->cv, NULL);
        s->state = S_IDLE;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setstacksize(&at, (size_t)8 << 20);
        int rc = pthread_create(&s->th, &at, slot_main, s);
        pthread_attr_destroy(&at);
        if (rc != 0) {
            pthread_cond_destroy(&s->cv);
            free(s);
            break;
        }
        slots[n_slots++] = s;
    }
    return n_slots;
}

void cobatch_product(cobatch_req *r) {
    slot *s = tl_slot;
    pthread_mutex_lock(&mu);
    s->req = r;
    s->state = S_WAITING;
    pthread_cond_signal(&coord_cv);
    while (s->state != S_RUNNING) pthread_cond_wait(&s->cv, &mu);
    pthread_mutex_unlock(&mu);
}

/* ---- running the products ----------------------------------------------------- */

static int same_key(const cobatch_req *a, const cobatch_req *b) {
    if (a->kind != b->kind || a->n != b->n || a->C != b->C || a->accumulate != b->accumulate)
        return 0;
    for (int i = 0; i < a->n; i++)
        if (a->w[i] != b->w[i] || a->bias[i] != b->bias[i] || a->OC[i] != b->OC[i]) return 0;
    return 1;
}

/* Floats a row of the request takes in the concatenation buffers. */
static size_t row_floats(const cobatch_req *r) {
    size_t f = (size_t)r->C;
    if (r->kind == COBATCH_RESIDUAL) return f + (size_t)r->OC[0];
    for (int i = 0; i < r->n; i++) f += (size_t)r->OC[i];
    return f;
}

/* The concatenation buffer, kept by the coordinating thread, at most
 * COBATCH_BUFFER_BYTES. */
static _Thread_local float *cat_buf;
static _Thread_local size_t cat_len;

static float *cat_take(size_t floats) {
    if (floats > cat_len) {
        free(cat_buf);
        cat_buf = aligned_alloc(64, (floats + 15) / 16 * 16 * sizeof(float));
        cat_len = cat_buf ? floats : 0;
    }
    return cat_buf;
}

/* The product of r alone, on its own rows: what the computation would
 * have run itself. */
static void run_alone(const cobatch_req *r) {
    kweight w[4];
    for (int i = 0; i < r->n; i++) w[i] = (kweight){NULL, r->w[i]};
    switch (r->kind) {
    case COBATCH_FORWARD:
        linears_forward_k(r->n, r->out, r->in[0], w, r->bias, r->N, r->C, r->OC);
        break;
    case COBATCH_RESIDUAL:
        linear_residual_forward_k(r->out[0], r->in[1], r->in[0], w[0], r->bias[0], r->N, r->C,
                                  r->OC[0]);
        break;
    case COBATCH_BACKWARD_INPUT:
        linears_backward_input_k(r->out[0], r->accumulate, r->n, r->in, w, r->N, r->C, r->OC);
        break;
    }
}

/* Copies rows of the g requests' arrays (which: in[k] or out[k]) into the
 * concatenation at dst, width floats per row, or back when back. */
static void cat_rows(float *dst, cobatch_req *const *g, int n, int is_out, int k, int width,
                     int back) {
    size_t off = 0;
    for (int m = 0; m < n; m++) {
        size_t len = (size_t)g[m]->N * (size_t)width;
        float *own = is_out ? g[m]->out[k] : (float *)g[m]->in[k];
        if (back)
            memcpy(own, dst + off, len * sizeof(float));
        else
            memcpy(dst + off, own, len * sizeof(float));
        off += len;
    }
}

/* One product over the rows of the n >= 2 requests g (equal keys), in
 * member order, within the buffer bound. */
static void run_shared(cobatch_req *const *g, int n) {
    const cobatch_req *r = g[0];
    int N = 0;
    for (int m = 0; m < n; m++) N += g[m]->N;
    float *buf = cat_take((size_t)N * row_floats(r));
    if (!buf) {
        for (int m = 0; m < n; m++) run_alone(g[m]);
        atomic_fetch_add(&st_products_alone, (uint64_t)n);
        return;
    }
    kweight w[4];
    for (int i = 0; i < r->n; i++) w[i] = (kweight){NULL, r->w[i]};
    int C = r->C;
    float *x = buf, *rest = buf + (size_t)N * C;
    switch (r->kind) {
    case COBATCH_FORWARD: {
        float *outs[4];
        cat_rows(x, g, n, 0, 0, C, 0);
        for (int i = 0; i < r->n; i++) {
            outs[i] = rest;
            rest += (size_t)N * r->OC[i];
        }
        linears_forward_k(r->n, outs, x, w, r->bias, N, C, r->OC);
        for (int i = 0; i < r->n; i++) cat_rows(outs[i], g, n, 1, i, r->OC[i], 1);
        break;
    }
    case COBATCH_RESIDUAL: {
        /* The residual rows are copied where the output goes; the product
         * adds to them in place, as it may (out == res). */
        cat_rows(x, g, n, 0, 0, C, 0);
        cat_rows(rest, g, n, 0, 1, r->OC[0], 0);
        linear_residual_forward_k(rest, rest, x, w[0], r->bias[0], N, C, r->OC[0]);
        cat_rows(rest, g, n, 1, 0, r->OC[0], 1);
        break;
    }
    case COBATCH_BACKWARD_INPUT: {
        /* x is dinp here (N,C), then the douts. */
        const float *douts[4];
        if (r->accumulate) cat_rows(x, g, n, 1, 0, C, 0);
        for (int i = 0; i < r->n; i++) {
            cat_rows(rest, g, n, 0, i, r->OC[i], 0);
            douts[i] = rest;
            rest += (size_t)N * r->OC[i];
        }
        linears_backward_input_k(x, r->accumulate, r->n, douts, w, N, C, r->OC);
        cat_rows(x, g, n, 1, 0, C, 1);
        break;
    }
    }
    atomic_fetch_add(&st_calls_shared, 1);
    atomic_fetch_add(&st_products_in, (uint64_t)n);
    atomic_fetch_add(&st_rows_shared, (uint64_t)N);
}

/* Runs the n waiting requests: each group of equal keys, in order of its
 * first member, as few shared calls as the buffer bound allows. */
static void run_waiting(cobatch_req **reqs, int n) {
    int done[COBATCH_MAX] = {0};
    cobatch_req *g[COBATCH_MAX];
    size_t budget = COBATCH_BUFFER_BYTES / sizeof(float);
    for (int i = 0; i < n; i++) {
        if (done[i]) continue;
        int ng = 0;
        for (int j = i; j < n; j++)
            if (!done[j] && same_key(reqs[i], reqs[j])) {
                g[ng++] = reqs[j];
                done[j] = 1;
            }
        size_t per = row_floats(reqs[i]);
        for (int a = 0; a < ng;) {
            int b = a + 1;
            size_t rows = (size_t)g[a]->N;
            while (b < ng && (rows + (size_t)g[b]->N) * per <= budget) rows += (size_t)g[b++]->N;
            if (b - a == 1) {
                run_alone(g[a]);
                atomic_fetch_add(&st_products_alone, 1);
            } else
                run_shared(g + a, b - a);
            a = b;
        }
    }
}

int cobatch_run(int n, void (*fn)(void *ctx, int i), void *ctx) {
    if (n < 0 || n > COBATCH_MAX) return -1;
    pthread_mutex_lock(&run_mu);
    if (n <= 1 || slots_grow(n) < n) {
        for (int i = 0; i < n; i++) fn(ctx, i);
        pthread_mutex_unlock(&run_mu);
        return 0;
    }
    pthread_mutex_lock(&mu);
    for (int i = 0; i < n; i++) {
        slots[i]->fn = fn;
        slots[i]->ctx = ctx;
        slots[i]->idx = i;
        slots[i]->state = S_READY;
    }
    for (;;) {
        /* A turn each, in order: each runs up to its next product or its end. */
        for (int i = 0; i < n; i++) {
            slot *s = slots[i];
            if (s->state != S_READY) continue;
            s->state = S_RUNNING;
            pthread_cond_signal(&s->cv);
            while (s->state == S_RUNNING) pthread_cond_wait(&coord_cv, &mu);
        }
        cobatch_req *reqs[COBATCH_MAX];
        int idx[COBATCH_MAX], nw = 0;
        for (int i = 0; i < n; i++)
            if (slots[i]->state == S_WAITING) {
                idx[nw] = i;
                reqs[nw++] = slots[i]->req;
            }
        if (!nw) break; /* all done */
        /* Every computation waits: none touches its buffers while the
         * products run here. */
        pthread_mutex_unlock(&mu);
        atomic_fetch_add(&st_rounds, 1);
        run_waiting(reqs, nw);
        pthread_mutex_lock(&mu);
        for (int k = 0; k < nw; k++) {
            slots[idx[k]]->req = NULL;
            slots[idx[k]]->state = S_READY;
        }
    }
    for (int i = 0; i < n; i++) slots[i]->state = S_IDLE;
    pthread_mutex_unlock(&mu);
    pthread_mutex_unlock(&run_mu);
    return 0;
}
