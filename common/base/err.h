/* Errors carried up the call chain. A function that can fail returns 0 on
 * success and -1 on failure, having written what failed into an `err`; each
 * caller may prefix context, and only the top level reports it, once. */
#ifndef PEFTPS_ERR_H
#define PEFTPS_ERR_H

#include <stddef.h>

#define ERR_MAX 2048

typedef struct err {
    char msg[ERR_MAX];
} err;

/* Sets the message (printf-style) and returns -1, so that
 * `return err_set(e, "...")` reports and fails in one line. e may be NULL. */
int err_set(err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Prefixes the current message with context ("loading x: " + old) and
 * returns -1. e may be NULL. */
int err_wrap(err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Sets the message from errno: "<what>: <strerror(errno)>"; returns -1. */
int err_errno(err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
