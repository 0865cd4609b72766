/* The thread team of team.h: helpers started once, woken per job, tasks
 * handed out one at a time through a single atomic word. kernels.c and
 * model.c split their loops with it; tests/test_team.c checks coverage,
 * nesting and that results do not depend on the team's size. */
#include "base/team.h"

#include <cblas.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

/* A helper keeps polling this long after a job before it sleeps: the model
 * issues jobs every few tens of microseconds in a step, and waking a
 * sleeping thread costs about as much as a small job. After the first
 * PAUSE_NS it yields between polls, leaving the core to any other thread
 * (an OpenBLAS call of the caller's, another process). */
#define SPIN_NS 200000L
#define PAUSE_NS 20000L

/* One job; two slots alternate so that a helper still reading the previous
 * job's slot never sees this one's fields change under it. */
typedef struct team_job {
    team_fn fn;
    void *ctx;
    size_t floats;
    atomic_int n;
    atomic_int done;
} team_job;

static struct {
    pthread_once_t once;
    int size;
    pthread_mutex_t run; /* held by the caller of the current job */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    atomic_uint gen;            /* the last job published */
    atomic_int sleepers;        /* helpers blocked on wake */
    atomic_uint_least64_t word; /* gen << 32 | next task to hand out */
    team_job slot[2];
    float *buf[TEAM_MAX]; /* helpers' scratch, grown by the caller */
    size_t cap[TEAM_MAX];
} team = {
    .once = PTHREAD_ONCE_INIT,
    .run = PTHREAD_MUTEX_INITIALIZER,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
};

/* Set in helpers and in a caller while its job runs: team_run from there
 * runs serially instead of waiting on itself. */
static _Thread_local int in_team;

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Takes tasks of job g until none is left or a newer job was published.
 * A task is taken by advancing the word from (g, i) to (g, i+1), so a
 * helper that arrives late can never take a task of a later job. */
static void work(uint32_t g, int t, float *caller_scratch) {
    team_job *job = &team.slot[g & 1];
    uint64_t w = atomic_load_explicit(&team.word, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(w >> 32) != g) return;
        int i = (int)(uint32_t)w;
        if (i >= atomic_load_explicit(&job->n, memory_order_relaxed)) return;
        if (!atomic_compare_exchange_weak_explicit(&team.word, &w, w + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        /* Holding a task of job g, the caller cannot be growing buffers. */
        float *scratch = !job->floats ? NULL : t ? team.buf[t] : caller_scratch;
        job->fn(job->ctx, i, scratch);
        atomic_fetch_add_explicit(&job->done, 1, memory_order_release);
        w = atomic_load_explicit(&team.word, memory_order_acquire);
    }
}

static void *helper_main(void *arg) {
    int t = (int)(intptr_t)arg;
    in_team = 1;
    uint32_t seen = 0;
    for (;;) {
        uint32_t g;
        long t0 = now_ns();
        int spins = 0;
        int yielding = 0;
        while ((g = atomic_load(&team.gen)) == seen) {
            if (yielding)
                sched_yield();
            else
                cpu_relax();
            if (!yielding && ++spins % 256) continue;
            long waited = now_ns() - t0;
            yielding = waited >= PAUSE_NS;
            if (waited < SPIN_NS) continue;
            pthread_mutex_lock(&team.lock);
            atomic_fetch_add(&team.sleepers, 1);
            while (atomic_load(&team.gen) == seen) pthread_cond_wait(&team.wake, &team.lock);
            atomic_fetch_sub(&team.sleepers, 1);
            pthread_mutex_unlock(&team.lock);
        }
        seen = g;
        work(g, t, NULL);
    }
    return NULL;
}

static int cpus_available(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
    return 1;
}

/* A child of fork has none of the helpers: it runs every job serially. */
static void team_after_fork(void) {
    team.size = 1;
}

static void team_init(void) {
    pthread_atfork(NULL, NULL, team_after_fork);
    int n = cpus_available();
    const char *env = getenv("PEFTPS_THREADS");
    if (env && *env) {
        char *end;
        long v = strtol(env, &end, 10);
        if (!*end && v >= 1) n = (int)v;
    }
    if (n > TEAM_MAX) n = TEAM_MAX;
    if (n < 1) n = 1;
    team.size = 1;
    for (int t = 1; t < n; t++) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, helper_main, (void *)(intptr_t)t);
        pthread_attr_destroy(&attr);
        if (rc) break; /* a smaller team computes the same bits */
        team.size++;
    }
}

int team_size(void) {
    pthread_once(&team.once, team_init);
    return team.size;
}

/* OpenBLAS's thread count is one setting for the whole process: sections
 * are counted so that concurrent and nested ones never restore it early or
 * to a value another section set. */
static pthread_mutex_t blas_lock = PTHREAD_MUTEX_INITIALIZER;
static int blas_depth, blas_outer;

void team_blas_enter(void) {
    pthread_mutex_lock(&blas_lock);
    if (blas_depth++ == 0) {
        blas_outer = openblas_get_num_threads();
        if (blas_outer != 1) openblas_set_num_threads(1);
    }
    pthread_mutex_unlock(&blas_lock);
}

void team_blas_leave(void) {
    pthread_mutex_lock(&blas_lock);
    if (--blas_depth == 0) {
        if (openblas_get_num_threads() != blas_outer) openblas_set_num_threads(blas_outer);
    }
    pthread_mutex_unlock(&blas_lock);
}

/* Gives every helper at least `floats` of scratch; 0 when out of memory. */
static int reserve(size_t floats) {
    for (int t = 1; t < team.size; t++) {
        if (team.cap[t] >= floats) continue;
        size_t bytes = (floats * sizeof(float) + 63) & ~(size_t)63;
        float *p = aligned_alloc(64, bytes);
        if (!p) return 0;
        free(team.buf[t]);
        team.buf[t] = p;
        team.cap[t] = floats;
    }
    return 1;
}

int team_in_task(void) {
    return in_team;
}

void team_run(int n, team_fn fn, void *ctx, float *scratch, size_t scratch_floats) {
    if (n <= 0) return;
    float *mine = scratch_floats ? scratch : NULL;
    if (in_team) { /* inside a task: BLAS is single-threaded already */
        for (int i = 0; i < n; i++) fn(ctx, i, mine);
        return;
    }
    team_blas_enter();
    if (n == 1 || team_size() == 1 || pthread_mutex_trylock(&team.run) != 0) {
        for (int i = 0; i < n; i++) fn(ctx, i, mine);
        team_blas_leave();
        return;
    }
    if (scratch_floats && !reserve(scratch_floats)) {
        pthread_mutex_unlock(&team.run);
        for (int i = 0; i < n; i++) fn(ctx, i, mine);
        team_blas_leave();
        return;
    }
    in_team = 1;
    uint32_t g = atomic_load(&team.gen) + 1;
    team_job *job = &team.slot[g & 1];
    job->fn = fn;
    job->ctx = ctx;
    job->floats = scratch_floats;
    atomic_store_explicit(&job->n, n, memory_order_relaxed);
    atomic_store_explicit(&job->done, 0, memory_order_relaxed);
    atomic_store_explicit(&team.word, (uint64_t)g << 32, memory_order_release);
    atomic_store(&team.gen, g);
    if (atomic_load(&team.sleepers) > 0) {
        pthread_mutex_lock(&team.lock);
        pthread_cond_broadcast(&team.wake);
        pthread_mutex_unlock(&team.lock);
    }
    work(g, 0, mine);
    /* A helper may still be inside its last task; past a few microseconds
     * yield, in case it waits for this core (a busy machine). */
    for (int spins = 0; atomic_load_explicit(&job->done, memory_order_acquire) < n; spins++) {
        if (spins < 256)
            cpu_relax();
        else
            sched_yield();
    }
    in_team = 0;
    pthread_mutex_unlock(&team.run);
    team_blas_leave();
}

/* ---- ranges ---------------------------------------------------------------------- */

/* Work (in elements touched) below which a loop runs in the caller: a team
 * job costs a few microseconds, the time of ~16K elements. */
#define FOR_GRAIN 16384

typedef struct range_job {
    void (*fn)(void *ctx, size_t i0, size_t i1);
    void *ctx;
    size_t n, per;
} range_job;

static void range_task(void *c, int i, float *scratch) {
    (void)scratch;
    const range_job *j = c;
    size_t i0 = (size_t)i * j->per, i1 = i0 + j->per < j->n ? i0 + j->per : j->n;
    j->fn(j->ctx, i0, i1);
}

void team_for(size_t n, size_t cost, size_t align, void (*fn)(void *ctx, size_t i0, size_t i1),
              void *ctx) {
    int threads = team_size();
    size_t tasks = n * cost / FOR_GRAIN;
    /* A few tasks per thread even out a core that is busy elsewhere. */
    if (tasks > 4 * (size_t)threads) tasks = 4 * (size_t)threads;
    if (align < 1) align = 1;
    if (threads == 1 || tasks < 2 || n < 2 * align) {
        if (n) fn(ctx, 0, n);
        return;
    }
    size_t per = (n + tasks - 1) / tasks;
    per = (per + align - 1) / align * align;
    range_job j = {fn, ctx, n, per};
    team_run((int)((n + per - 1) / per), range_task, &j, NULL, 0);
}
