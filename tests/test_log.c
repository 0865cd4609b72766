/* Tests of common/base/log.c's rate limit: a flood of 200,000 lines of one
 * kind (numbers and hex identities varying) writes a handful of lines and
 * one summary with the exact count; kinds are counted apart; a kind writes
 * again once its window ended. stderr is redirected to a file to measure. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "base/log.h"

static char path[64];

static int redirect(void **state) {
    snprintf(path, sizeof path, "/tmp/peftps-log-XXXXXX");
    int fd = mkstemp(path);
    if (fd < 0) return -1;
    close(fd);
    log_set_repeat_window(0.5);
    return freopen(path, "w", stderr) ? 0 : -1;
}

static int restore(void **state) {
    fflush(stderr);
    unlink(path);
    log_set_repeat_window(0);
    return freopen("/dev/null", "w", stderr) ? 0 : -1;
}

static char *slurp(size_t *n) {
    fflush(stderr);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    static char buf[1 << 16];
    *n = fread(buf, 1, sizeof buf - 1, f);
    buf[*n] = 0;
    fclose(f);
    return buf;
}

static int count(const char *text, const char *what) {
    int n = 0;
    for (const char *p = text; (p = strstr(p, what)); p++) n++;
    return n;
}

static void nap(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static void test_flood(void **state) {
    /* A window longer than the flood takes, even under a sanitizer; then
     * a short one, so that the flush ends it. */
    log_set_repeat_window(60);
    for (long i = 0; i < 200000; i++)
        log_warn("message from peer %08lx: malformed header (%ld bytes)", i * 2654435761u, i % 97);
    size_t n;
    char *text = slurp(&n);
    print_message("200000 lines logged: %zu bytes written\n", n);
    assert_true(n < 4096);
    assert_int_equal(count(text, "malformed header"), LOG_REPEAT_BURST);
    log_set_repeat_window(0.001);
    nap(0.01);
    log_flush();
    text = slurp(&n);
    char want[64];
    snprintf(want, sizeof want, "... %d more in the last", 200000 - LOG_REPEAT_BURST);
    if (!strstr(text, want)) fail_msg("no '%s' in:\n%s", want, text);
    /* The summary quotes the last line suppressed. */
    assert_non_null(strstr(text, "(82 bytes)"));
    assert_true(n < 4096);
}

static void test_kinds_apart_and_windows(void **state) {
    for (int i = 0; i < 50; i++) {
        log_warn("refused CURVE key %d", i);
        log_info("worker w%d registered", i);
    }
    size_t n;
    char *text = slurp(&n);
    assert_int_equal(count(text, "refused CURVE key"), LOG_REPEAT_BURST);
    assert_int_equal(count(text, "registered"), LOG_REPEAT_BURST);
    /* A new window: the kind writes again, after the summary of the last. */
    nap(0.6);
    log_warn("refused CURVE key %d", 99);
    text = slurp(&n);
    assert_non_null(strstr(text, "45 more in the last 0.5 s like: refused CURVE key 49"));
    assert_non_null(strstr(text, "refused CURVE key 99"));
    assert_int_equal(count(text, "refused CURVE key"), LOG_REPEAT_BURST + 2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_flood, redirect, restore),
        cmocka_unit_test_setup_teardown(test_kinds_apart_and_windows, redirect, restore),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
