/* The human progress line on stderr: rewritten in place on a terminal, one
 * line per few seconds otherwise (logs, CI). Used by `peftps train`, `peftps
 * run` and the server. */
#ifndef PEFTPS_PROGRESS_H
#define PEFTPS_PROGRESS_H

#include <stdint.h>

typedef struct progress {
    uint64_t total;
    double start; /* seconds, monotonic */
    double last;  /* when a line was last printed */
    int tty;
    int printed; /* a line is on screen and not yet ended */
} progress;

/* Seconds on a monotonic clock. */
double progress_now(void);

/* Starts counting toward `total` steps. */
void progress_start(progress *pr, uint64_t total);

/* Shows "step done/total" with `detail` and the ETA; on a terminal at most
 * ten times a second, elsewhere every few seconds and at the last step. */
void progress_update(progress *pr, uint64_t done, const char *detail);

/* Ends the line on screen (before other output, and at the end). */
void progress_end(progress *pr);

#endif
