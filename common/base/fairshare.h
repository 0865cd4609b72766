/* The rule by which a pool worker (worker/worker.c) shares its time between
 * the experiments that have work ready: stride scheduling by weight. Each
 * experiment's "pass" is the compute seconds it got over its share; the
 * lowest pass always goes, so none starves, and with co-batching every
 * other ready one within one round's time of it joins, so that a heavier
 * share, falling behind less, joins more rounds and weights still hold
 * when all are ready. tests/test_fairshare.c checks both forms. */
#ifndef PEFTPS_FAIRSHARE_H
#define PEFTPS_FAIRSHARE_H

/* Of n ready experiments with used[i] seconds and share[i] > 0, writes to
 * chosen[0..k) the indices to compute now, the lowest pass first (the
 * lower index on ties), and returns k: 1 without `together`, else also
 * every other whose pass is within `window` seconds of the lowest, in
 * index order. n >= 1. */
int fairshare_pick(const double *used, const double *share, int n, int together, double window,
                   int *chosen);

#endif
