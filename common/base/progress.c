/* The human progress line on stderr; see progress.h. */
#include "base/progress.h"

#include <stdio.h>
#include <time.h>
#include <unistd.h>

double progress_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void progress_start(progress *pr, uint64_t total) {
    pr->total = total;
    pr->start = progress_now();
    pr->last = 0;
    pr->tty = isatty(STDERR_FILENO);
    pr->printed = 0;
}

void progress_update(progress *pr, uint64_t done, const char *detail) {
    double now = progress_now();
    double gap = pr->tty ? 0.1 : 5.0;
    if (done < pr->total && done > 1 && now - pr->last < gap) return;
    pr->last = now;
    double el = now - pr->start;
    double eta = done > 0 ? el * (double)(pr->total - done) / (double)done : 0;
    int es = (int)(eta + 0.5);
    char line[512];
    snprintf(line, sizeof line, "step %llu/%llu  %s  ETA %d:%02d:%02d", (unsigned long long)done,
             (unsigned long long)pr->total, detail, es / 3600, es / 60 % 60, es % 60);
    if (pr->tty) {
        fprintf(stderr, "\r\033[K%s", line);
        pr->printed = 1;
    } else {
        fprintf(stderr, "%s\n", line);
    }
    fflush(stderr);
}

void progress_end(progress *pr) {
    if (pr->tty && pr->printed) fputc('\n', stderr);
    pr->printed = 0;
}
