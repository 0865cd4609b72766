/* A small fixed team of threads for the numeric kernels (kernels.c) and the
 * model (model.c): a loop of independent tasks is spread over the calling
 * thread and the team's helpers, with BLAS single-threaded inside so that
 * each cblas_sgemm of a task runs on the core that took the task.
 *
 * Results never depend on the team: a task must write only its own outputs
 * and compute them the same way whichever thread runs it, so the bits are
 * the same with 1 thread or 16, and from run to run. */
#ifndef PEFTPS_TEAM_H
#define PEFTPS_TEAM_H

#include <stddef.h>

/* The most threads a team has, the caller included. */
#define TEAM_MAX 16

/* A task: index in [0, n), and scratch of the floats asked of team_run
 * (NULL when none were asked), private to the thread running the task. */
typedef void (*team_fn)(void *ctx, int task, float *scratch);

/* Threads team_run uses, the caller included: PEFTPS_THREADS when set
 * (1..TEAM_MAX), else the CPUs this process may run on, at most TEAM_MAX.
 * Fixed at the first call; the helpers start then. */
int team_size(void);

/* Runs fn(ctx, i, scratch) once for every i in [0, n), tasks handed out in
 * order to whichever thread is free, and returns when all are done. The
 * caller's tasks get `scratch` (scratch_floats floats, which the caller
 * provides); the helpers' get buffers of their own of that size. BLAS is
 * single-threaded while the tasks run and restored after. A call from
 * inside a task, from a second thread while the team is busy, or when
 * helper scratch cannot be allocated runs every task in the caller, in
 * order: slower, never different. */
void team_run(int n, team_fn fn, void *ctx, float *scratch, size_t scratch_floats);

/* Whether the calling thread is running a task of team_run (a helper, or
 * a caller inside its job). */
int team_in_task(void);

/* fn(ctx, i0, i1) over contiguous ranges covering [0, n), each a multiple
 * of `align` elements (but the last), spread over the team when n * cost
 * (cost: the work of one element, counted in elements touched) is worth a
 * job, else one call over everything. As for team_run, ranges must write
 * disjoint outputs and compute each element the same way whatever the
 * range: then the split never shows in the results. */
void team_for(size_t n, size_t cost, size_t align, void (*fn)(void *ctx, size_t i0, size_t i1),
              void *ctx);

/* A section with BLAS single-threaded (team_run opens one itself; model.c
 * one per forward and backward). Sections nest and may be opened from
 * several threads: the first sets OpenBLAS to 1 thread, the last to close
 * restores the count found when the first opened. */
void team_blas_enter(void);
void team_blas_leave(void);

#endif
