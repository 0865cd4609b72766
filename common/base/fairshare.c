/* Stride scheduling of a pool worker's ready experiments (fairshare.h). */
#include "base/fairshare.h"

int fairshare_pick(const double *used, const double *share, int n, int together, double window,
                   int *chosen) {
    int lo = 0;
    for (int i = 1; i < n; i++)
        if (used[i] / share[i] < used[lo] / share[lo]) lo = i;
    chosen[0] = lo;
    if (!together) return 1;
    double pass0 = used[lo] / share[lo];
    int k = 1;
    for (int i = 0; i < n; i++)
        if (i != lo && used[i] / share[i] <= pass0 + window) chosen[k++] = i;
    return k;
}
