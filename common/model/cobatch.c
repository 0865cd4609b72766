/* Co-batching (cobatch.h): a pool of threads kept for the process, one per
 * computation of a cobatch_run, handed a single turn so that one computes
 * at a time; the caller of cobatch_run coordinates and, when every
 * computation waits at a product, runs the waiting products, those with
 * equal keys over their gathered rows through kernels.c's *_rows
 * functions, the F32 ones side by side as one team job (gemm_jobs_run).
 * tests/test_cobatch.c checks the bits against solo runs. */
#include "model/cobatch.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "model/kernels.h"

/* ---- counters -------------------------------------------------------------- */

static atomic_uint_least64_t st_rounds, st_calls_shared, st_products_in, st_rows_shared,
    st_products_alone, st_products_f32, st_f32_team_jobs;

void cobatch_stats_get(cobatch_stats *s) {
    s->rounds = atomic_load(&st_rounds);
    s->calls_shared = atomic_load(&st_calls_shared);
    s->products_in = atomic_load(&st_products_in);
    s->rows_shared = atomic_load(&st_rows_shared);
    s->products_alone = atomic_load(&st_products_alone);
    s->products_f32 = atomic_load(&st_products_f32);
    s->f32_team_jobs = atomic_load(&st_f32_team_jobs);
}

void cobatch_stats_diff(cobatch_stats *s, const cobatch_stats *a, const cobatch_stats *b) {
    s->rounds = a->rounds - b->rounds;
    s->calls_shared = a->calls_shared - b->calls_shared;
    s->products_in = a->products_in - b->products_in;
    s->rows_shared = a->rows_shared - b->rows_shared;
    s->products_alone = a->products_alone - b->products_alone;
    s->products_f32 = a->products_f32 - b->products_f32;
    s->f32_team_jobs = a->f32_team_jobs - b->f32_team_jobs;
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
    if (a->kind == COBATCH_F32 || b->kind == COBATCH_F32) return a->kind == b->kind;
    if (a->kind != b->kind || a->n != b->n || a->C != b->C || a->accumulate != b->accumulate)
        return 0;
    for (int i = 0; i < a->n; i++)
        if (a->w[i] != b->w[i] || a->bias[i] != b->bias[i] || a->OC[i] != b->OC[i]) return 0;
    return 1;
}

/* Bytes a row of the request takes in the BF16 product's rounded inputs
 * (bf16.c keeps them per calling thread): what COBATCH_BUFFER_BYTES bounds. */
static size_t row_bytes(const cobatch_req *r) {
    if (r->kind != COBATCH_BACKWARD_INPUT) return 4 * (size_t)((r->C + 1) / 2);
    size_t b = 0;
    for (int i = 0; i < r->n; i++) b += 4 * (size_t)((r->OC[i] + 1) / 2);
    return b;
}

/* The tables of row pointers of a shared call, kept by the coordinating
 * thread and grown as needed (a pointer or a few per row). */
static _Thread_local void **tab;
static _Thread_local size_t tab_len;

static void **tab_take(size_t n) {
    if (n > tab_len) {
        free(tab);
        tab = malloc(n * sizeof *tab);
        tab_len = tab ? n : 0;
    }
    return tab;
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
    case COBATCH_F32: {
        void *job = r->f32_job;
        gemm_jobs_run(&job, &r->f32_tasks, 1);
        break;
    }
    }
}

/* Fills rows[0..) with the rows of the g requests' array in[k] (or out[k]
 * when is_out), width floats apart, in member order. */
static void fill_rows(void **rows, cobatch_req *const *g, int n, int is_out, int k, int width) {
    size_t at = 0;
    for (int m = 0; m < n; m++) {
        const float *base = is_out ? g[m]->out[k] : g[m]->in[k];
        for (int i = 0; i < g[m]->N; i++) rows[at++] = (void *)(base + (size_t)i * width);
    }
}

/* One product over the rows of the n >= 2 requests g (equal keys), in
 * member order, the rows gathered in place (kernels.h's *_rows). Returns
 * -1 when the row tables cannot be allocated. */
static int run_shared(cobatch_req *const *g, int n) {
    const cobatch_req *r = g[0];
    int N = 0;
    for (int m = 0; m < n; m++) N += g[m]->N;
    void **rows = tab_take((size_t)N * (size_t)(r->n + 2));
    if (!rows) return -1;
    int C = r->C;
    switch (r->kind) {
    case COBATCH_FORWARD: {
        float **outs[4];
        fill_rows(rows, g, n, 0, 0, C);
        for (int i = 0; i < r->n; i++) {
            outs[i] = (float **)rows + (size_t)(i + 1) * N;
            fill_rows((void **)outs[i], g, n, 1, i, r->OC[i]);
        }
        linears_forward_rows(r->n, (float *const *const *)outs, (const float *const *)rows, r->w,
                             r->bias, N, C, r->OC);
        break;
    }
    case COBATCH_RESIDUAL: {
        void **res = rows + N, **out = rows + 2 * (size_t)N;
        fill_rows(rows, g, n, 0, 0, C);
        fill_rows(res, g, n, 0, 1, r->OC[0]);
        fill_rows(out, g, n, 1, 0, r->OC[0]);
        linear_residual_forward_rows((float *const *)out, (const float *const *)res,
                                     (const float *const *)rows, r->w[0], r->bias[0], N, C,
                                     r->OC[0]);
        break;
    }
    case COBATCH_BACKWARD_INPUT: {
        const float **douts[4];
        fill_rows(rows, g, n, 1, 0, C);
        for (int i = 0; i < r->n; i++) {
            douts[i] = (const float **)rows + (size_t)(i + 1) * N;
            fill_rows((void **)douts[i], g, n, 0, i, r->OC[i]);
        }
        linears_backward_input_rows((float *const *)rows, r->accumulate, r->n,
                                    (const float *const *const *)douts, r->w, N, C, r->OC);
        break;
    }
    case COBATCH_F32: /* run_f32's */
        return -1;
    }
    atomic_fetch_add(&st_calls_shared, 1);
    atomic_fetch_add(&st_products_in, (uint64_t)n);
    atomic_fetch_add(&st_rows_shared, (uint64_t)N);
    return 0;
}

/* The F32 jobs of the n requests g as one team job. */
static void run_f32(cobatch_req *const *g, int n) {
    void *jobs[COBATCH_MAX];
    int tasks[COBATCH_MAX];
    for (int m = 0; m < n; m++) {
        jobs[m] = g[m]->f32_job;
        tasks[m] = g[m]->f32_tasks;
    }
    gemm_jobs_run(jobs, tasks, n);
    atomic_fetch_add(&st_products_f32, (uint64_t)n);
    atomic_fetch_add(&st_f32_team_jobs, 1);
}

/* Runs some of the n waiting requests and sets ran[k] for those. Which
 * ones never changes a result (each runs as alone or over independent
 * rows), only how much is shared, so the choice favours alignment: the
 * F32 jobs first when there are any (one team job; their computations
 * then often reach the product the others wait at); else every group of 2
 * or more equal keys, as few shared calls as the buffer bound allows,
 * holding back the products without a partner (whose computations may be
 * ahead); else those alone. Something runs in every round. */
static void run_waiting(cobatch_req **reqs, int n, int *ran) {
    cobatch_req *g[COBATCH_MAX];
    int ng = 0, grouped[COBATCH_MAX] = {0}, any_group = 0;
    for (int i = 0; i < n; i++)
        if (reqs[i]->kind == COBATCH_F32) {
            ran[i] = 1;
            g[ng++] = reqs[i];
        }
    if (ng) {
        run_f32(g, ng);
        return;
    }
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (same_key(reqs[i], reqs[j])) grouped[i] = grouped[j] = any_group = 1;
    for (int i = 0; i < n; i++) {
        if (ran[i] || (any_group && !grouped[i])) continue;
        ng = 0;
        for (int j = i; j < n; j++)
            if (!ran[j] && same_key(reqs[i], reqs[j])) {
                g[ng++] = reqs[j];
                ran[j] = 1;
            }
        size_t per = row_bytes(reqs[i]);
        for (int a = 0; a < ng;) {
            int b = a + 1;
            size_t rows = (size_t)g[a]->N;
            while (b < ng && (rows + (size_t)g[b]->N) * per <= COBATCH_BUFFER_BYTES)
                rows += (size_t)g[b++]->N;
            if (b - a == 1 || run_shared(g + a, b - a) < 0)
                for (int m = a; m < b; m++) {
                    run_alone(g[m]);
                    atomic_fetch_add(&st_products_alone, 1);
                }
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
        int ran[COBATCH_MAX] = {0};
        run_waiting(reqs, nw, ran);
        pthread_mutex_lock(&mu);
        for (int k = 0; k < nw; k++)
            if (ran[k]) {
                slots[idx[k]]->req = NULL;
                slots[idx[k]]->state = S_READY;
            }
    }
    for (int i = 0; i < n; i++) slots[i]->state = S_IDLE;
    pthread_mutex_unlock(&mu);
    pthread_mutex_unlock(&run_mu);
    return 0;
}
