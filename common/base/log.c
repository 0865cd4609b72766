/* Timestamped log lines on stderr, with repeated lines rate-limited; see
 * log.h. A line's kind is its text with every run of digits and hex digits
 * folded, so "refused key 1a2b..." and "refused key 9f8e..." are one kind;
 * the kinds seen lately live in a small table guarded by one mutex, since
 * libmicrohttpd's thread logs too. */
#include "base/log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

static const char *log_program = "peftps";
static int log_threshold = -1;

/* Kinds remembered at once; the least recently seen makes room. */
#define LOG_KINDS 64

typedef struct log_kind {
    uint64_t hash;
    double window_start; /* monotonic seconds; 0: slot free */
    double last_seen;
    int printed;     /* lines printed in this window */
    long suppressed; /* lines not printed in this window */
    log_level level;
    char last[512]; /* the last suppressed line, without its prefix */
} log_kind;

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static log_kind kinds[LOG_KINDS];
static double window_s = LOG_REPEAT_WINDOW_S;

static int log_threshold_from_env(void) {
    const char *v = getenv("PEFTPS_LOG");
    if (!v) return LOG_INFO;
    if (!strcmp(v, "debug")) return LOG_DEBUG;
    if (!strcmp(v, "warn")) return LOG_WARN;
    if (!strcmp(v, "error")) return LOG_ERROR;
    return LOG_INFO;
}

void log_init(const char *program) {
    log_program = program;
    log_threshold = log_threshold_from_env();
}

void log_set_repeat_window(double seconds) {
    pthread_mutex_lock(&log_mu);
    window_s = seconds > 0 ? seconds : LOG_REPEAT_WINDOW_S;
    pthread_mutex_unlock(&log_mu);
}

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int is_hex(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* FNV-1a of the text with each run of hex digits that holds a decimal digit
 * folded to one '#': numbers, identities and keys do not make a new kind. */
static uint64_t kind_hash(const char *s) {
    uint64_t h = 1469598103934665603ull;
    while (*s) {
        if (is_hex(*s)) {
            const char *e = s;
            int digit = 0;
            while (is_hex(*e)) digit |= (*e >= '0' && *e <= '9'), e++;
            if (digit) {
                h = (h ^ '#') * 1099511628211ull;
                s = e;
                continue;
            }
        }
        h = (h ^ (unsigned char)*s++) * 1099511628211ull;
    }
    return h;
}

static void emit(log_level level, const char *text) {
    static const char *names[] = {"debug", "info", "warn", "error"};
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    localtime_r(&tv.tv_sec, &tm);
    fprintf(stderr, "%02d:%02d:%02d.%03d %s %s: %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
            (int)(tv.tv_usec / 1000), log_program, names[level], text);
}

/* The summary of a window that held suppressed lines; the slot is reset. */
static void flush_kind(log_kind *k) {
    if (k->suppressed > 0) {
        char line[700];
        snprintf(line, sizeof line, "... %ld more in the last %g s like: %s", k->suppressed,
                 window_s, k->last);
        emit(k->level, line);
    }
    k->suppressed = 0;
    k->printed = 0;
}

static void flush_expired(double now) {
    for (int i = 0; i < LOG_KINDS; i++) {
        log_kind *k = &kinds[i];
        if (k->window_start > 0 && now - k->window_start >= window_s) {
            flush_kind(k);
            k->window_start = 0;
        }
    }
}

void log_flush(void) {
    pthread_mutex_lock(&log_mu);
    flush_expired(mono_now());
    pthread_mutex_unlock(&log_mu);
}

static void log_v(log_level level, int by_format, const char *fmt, va_list ap) {
    if (log_threshold < 0) log_threshold = log_threshold_from_env();
    if ((int)level < log_threshold) return;
    char text[4000];
    vsnprintf(text, sizeof text, fmt, ap);
    uint64_t h = kind_hash(by_format ? fmt : text) ^ (uint64_t)level;
    pthread_mutex_lock(&log_mu);
    double now = mono_now();
    flush_expired(now);
    log_kind *k = NULL, *oldest = &kinds[0];
    for (int i = 0; i < LOG_KINDS; i++) {
        if (kinds[i].window_start > 0 && kinds[i].hash == h) {
            k = &kinds[i];
            break;
        }
        if (kinds[i].window_start == 0 ||
            (oldest->window_start > 0 && kinds[i].last_seen < oldest->last_seen))
            oldest = &kinds[i];
    }
    if (!k) {
        k = oldest;
        if (k->window_start > 0) flush_kind(k);
        k->hash = h;
        k->window_start = now;
        k->printed = 0;
        k->suppressed = 0;
        k->level = level;
    }
    k->last_seen = now;
    if (k->printed < LOG_REPEAT_BURST) {
        k->printed++;
        emit(level, text);
    } else {
        k->suppressed++;
        snprintf(k->last, sizeof k->last, "%.500s", text);
    }
    pthread_mutex_unlock(&log_mu);
}

void log_msg(log_level level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    log_v(level, 0, fmt, ap);
    va_end(ap);
}

void log_msg_format_kind(log_level level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    log_v(level, 1, fmt, ap);
    va_end(ap);
}
