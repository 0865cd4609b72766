/* SIGINT and SIGTERM as a request to stop: the programs and the commands
 * that run for long install a handler that records the signal and asks their
 * loop to finish (a checkpoint, children told), then restore what was there
 * before. */
#ifndef PEFTPS_STOPSIG_H
#define PEFTPS_STOPSIG_H

#include <signal.h>

typedef struct stopsig {
    struct sigaction old_int, old_term;
} stopsig;

/* Routes SIGINT and SIGTERM to handler (which must be async-signal-safe),
 * keeping the previous actions in *s. */
void stopsig_catch(stopsig *s, void (*handler)(int));
/* Puts back the actions stopsig_catch found. */
void stopsig_restore(const stopsig *s);

#endif
