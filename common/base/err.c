/* Error messages carried up the call chain; see err.h. */
#include "base/err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* e->msg = a + ": " + b, cut to fit. */
static void err_join(err *e, const char *a, const char *b) {
    size_t cap = sizeof e->msg - 1, n = 0;
    for (const char *parts[] = {a, ": ", b}, **q = parts; q < parts + 3; q++)
        for (const char *c = *q; *c && n < cap; c++) e->msg[n++] = *c;
    e->msg[n] = '\0';
}

int err_set(err *e, const char *fmt, ...) {
    if (!e) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return -1;
}

int err_wrap(err *e, const char *fmt, ...) {
    if (!e) return -1;
    char prefix[ERR_MAX], old[ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, e->msg, sizeof old);
    err_join(e, prefix, old);
    return -1;
}

int err_errno(err *e, const char *fmt, ...) {
    int saved = errno;
    if (!e) return -1;
    char what[ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    err_join(e, what, strerror(saved));
    return -1;
}
