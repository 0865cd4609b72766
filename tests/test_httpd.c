/* Tests of common/net/httpd.c: the exact Prometheus text of counters, gauges and
 * histograms (cumulative buckets, inclusive bounds, special values), every
 * registration error, and the HTTP side over a real TCP connection on an
 * ephemeral loopback port with a plain socket client: status codes, content
 * type, readiness switching, 404 and 405, and counts that stay exact while
 * other threads update and scrape at the same time. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "net/httpd.h"

static const char prom_type[] = "text/plain; version=0.0.4; charset=utf-8";

/* ---- a plain HTTP/1.1 client -------------------------------------------------------- */

typedef struct reply {
    int status;
    char content_type[128];
    long content_length; /* -1 when absent */
    char *body;
    size_t body_len;
} reply;

/* Sends `method path` to 127.0.0.1:port with Connection: close and reads
 * the whole answer. */
static void fetch(unsigned port, const char *method, const char *path, reply *r) {
    memset(r, 0, sizeof *r);
    r->content_length = -1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    char req[512];
    int n =
        snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
                 method, path);
    assert_int_equal(write(fd, req, (size_t)n), n);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    for (;;) {
        if (len + 4096 > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
        ssize_t k = read(fd, buf + len, cap - len - 1);
        assert_true(k >= 0);
        if (k == 0) break;
        len += (size_t)k;
    }
    close(fd);
    buf[len] = 0;
    assert_int_equal(sscanf(buf, "HTTP/1.1 %d", &r->status), 1);
    char *end = strstr(buf, "\r\n\r\n");
    assert_non_null(end);
    *end = 0;
    for (char *line = strstr(buf, "\r\n"); line && line < end; line = strstr(line + 2, "\r\n")) {
        char *h = line + 2;
        if (!strncasecmp(h, "Content-Type: ", 14))
            snprintf(r->content_type, sizeof r->content_type, "%.*s", (int)strcspn(h + 14, "\r\n"),
                     h + 14);
        if (!strncasecmp(h, "Content-Length: ", 16)) r->content_length = atol(h + 16);
    }
    r->body_len = len - (size_t)(end + 4 - buf);
    r->body = malloc(r->body_len + 1);
    assert_non_null(r->body);
    memcpy(r->body, end + 4, r->body_len);
    r->body[r->body_len] = 0;
    free(buf);
}

static void reply_free(reply *r) {
    free(r->body);
    r->body = NULL;
}

static char *render(httpd *h) {
    char *text;
    size_t len;
    err e;
    assert_int_equal(httpd_render(h, &text, &len, &e), 0);
    assert_int_equal(strlen(text), len);
    return text;
}

/* ---- exposition text ---------------------------------------------------------------- */

static void test_exposition_exact(void **state) {
    httpd *h;
    err e;
    assert_int_equal(httpd_create(&h, &e), 0);
    httpd_metric *c, *g, *hist;
    static const double le[] = {0.1, 1, 10};
    assert_int_equal(httpd_counter(h, &c, "x_pushes_total", "Pushes \\ accepted\nso far.", &e), 0);
    assert_int_equal(httpd_gauge(h, &g, "x_loss", "Loss.", &e), 0);
    assert_int_equal(httpd_histogram(h, &hist, "x_step_seconds", "Step time.", le, 3, &e), 0);

    char *t = render(h);
    assert_string_equal(t, "# HELP x_pushes_total Pushes \\\\ accepted\\nso far.\n"
                           "# TYPE x_pushes_total counter\n"
                           "x_pushes_total 0\n"
                           "# HELP x_loss Loss.\n"
                           "# TYPE x_loss gauge\n"
                           "x_loss 0\n"
                           "# HELP x_step_seconds Step time.\n"
                           "# TYPE x_step_seconds histogram\n"
                           "x_step_seconds_bucket{le=\"0.1\"} 0\n"
                           "x_step_seconds_bucket{le=\"1\"} 0\n"
                           "x_step_seconds_bucket{le=\"10\"} 0\n"
                           "x_step_seconds_bucket{le=\"+Inf\"} 0\n"
                           "x_step_seconds_sum 0\n"
                           "x_step_seconds_count 0\n");
    free(t);

    httpd_add(c, 3);
    httpd_add(c, 4);
    httpd_add(c, -5);  /* counters never go down */
    httpd_add(c, NAN); /* nor become NaN */
    httpd_set(g, 2.75);
    /* A bound is inclusive: 0.1 falls in le="0.1", 10 in le="10". */
    const double obs[] = {0.05, 0.1, 0.5, 10, 50};
    for (int i = 0; i < 5; i++) httpd_observe(hist, obs[i]);
    httpd_observe(hist, NAN); /* ignored */
    assert_true(httpd_value(c) == 7.0);
    assert_true(httpd_value(g) == 2.75);
    assert_true(httpd_value(hist) == 5.0);

    t = render(h);
    assert_non_null(strstr(t, "\nx_pushes_total 7\n"));
    assert_non_null(strstr(t, "\nx_loss 2.75\n"));
    assert_non_null(strstr(t, "# TYPE x_step_seconds histogram\n"
                              "x_step_seconds_bucket{le=\"0.1\"} 2\n"
                              "x_step_seconds_bucket{le=\"1\"} 3\n"
                              "x_step_seconds_bucket{le=\"10\"} 4\n"
                              "x_step_seconds_bucket{le=\"+Inf\"} 5\n"
                              "x_step_seconds_sum 60.65\n"
                              "x_step_seconds_count 5\n"));
    free(t);

    /* Updates of the wrong kind are no-ops, as are NULL metrics. */
    httpd_set(c, 100);
    httpd_add(g, 100);
    httpd_observe(g, 1);
    httpd_add(NULL, 1);
    httpd_set(NULL, 1);
    httpd_observe(NULL, 1);
    assert_true(httpd_value(c) == 7.0);
    assert_true(httpd_value(g) == 2.75);
    httpd_close(h);
}

/* Values print exactly and in Prometheus's spelling. */
static void test_number_format(void **state) {
    httpd *h;
    err e;
    assert_int_equal(httpd_create(&h, &e), 0);
    httpd_metric *g;
    assert_int_equal(httpd_gauge(h, &g, "v", "", &e), 0);
    static const struct {
        double v;
        const char *text;
    } cases[] = {
        {0.1, "0.1"},
        {3e-4, "0.0003"},
        {1.0 / 3.0, "0.3333333333333333"},
        {-2.5, "-2.5"},
        {12345678901.0, "12345678901"},
        {1e20, "1e+20"},
        {(double)(float)0.1, "0.10000000149011612"},
        {NAN, "NaN"},
        {INFINITY, "+Inf"},
        {-INFINITY, "-Inf"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        httpd_set(g, cases[i].v);
        char *t = render(h);
        char want[128];
        snprintf(want, sizeof want, "# HELP v \n# TYPE v gauge\nv %s\n", cases[i].text);
        assert_string_equal(t, want);
        if (isfinite(cases[i].v)) assert_true(strtod(cases[i].text, NULL) == cases[i].v);
        free(t);
    }
    httpd_close(h);
}

static void test_registration_errors(void **state) {
    httpd *h;
    err e;
    assert_int_equal(httpd_create(&h, &e), 0);
    httpd_metric *m = (httpd_metric *)&e; /* must be cleared on failure */
    assert_int_equal(httpd_gauge(h, &m, "9lives", "", &e), -1);
    assert_null(m);
    assert_non_null(strstr(e.msg, "'9lives' is not a Prometheus name"));
    assert_int_equal(httpd_gauge(h, &m, "a-b", "", &e), -1);
    assert_int_equal(httpd_gauge(h, &m, "", "", &e), -1);
    char longname[HTTPD_NAME_MAX + 4];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    assert_int_equal(httpd_gauge(h, &m, longname, "", &e), -1);
    char longhelp[HTTPD_HELP_MAX + 1];
    memset(longhelp, 'h', sizeof longhelp - 1);
    longhelp[sizeof longhelp - 1] = 0;
    assert_int_equal(httpd_gauge(h, &m, "ok", longhelp, &e), -1);
    assert_non_null(strstr(e.msg, "metric ok: help text is longer"));

    assert_int_equal(httpd_gauge(h, &m, "ns:ok_1", NULL, &e), 0);
    assert_non_null(m);
    assert_int_equal(httpd_counter(h, &m, "ns:ok_1", "", &e), -1);
    assert_string_equal(e.msg, "metric ns:ok_1 is registered already");

    static const double down[] = {1, 0.5}, flat[] = {1, 1}, inf[] = {1, INFINITY};
    assert_int_equal(httpd_histogram(h, &m, "hd", "", down, 2, &e), -1);
    assert_non_null(strstr(e.msg, "histogram hd: bounds must increase"));
    assert_int_equal(httpd_histogram(h, &m, "hf", "", flat, 2, &e), -1);
    assert_int_equal(httpd_histogram(h, &m, "hi", "", inf, 2, &e), -1);
    assert_non_null(strstr(e.msg, "not finite"));
    assert_int_equal(httpd_histogram(h, &m, "h0", "", down, 0, &e), -1);
    double many[HTTPD_MAX_BUCKETS + 1];
    for (int i = 0; i <= HTTPD_MAX_BUCKETS; i++) many[i] = i;
    assert_int_equal(httpd_histogram(h, &m, "hm", "", many, HTTPD_MAX_BUCKETS + 1, &e), -1);
    assert_int_equal(httpd_histogram(h, &m, "hm", "", many, HTTPD_MAX_BUCKETS, &e), 0);

    /* The table is bounded; two are registered. */
    for (int i = 2; i < HTTPD_MAX_METRICS; i++) {
        char name[32];
        snprintf(name, sizeof name, "g%d", i);
        assert_int_equal(httpd_gauge(h, &m, name, "", &e), 0);
    }
    assert_int_equal(httpd_gauge(h, &m, "one_more", "", &e), -1);
    assert_non_null(strstr(e.msg, "metrics are registered already"));
    httpd_close(h);
}

/* The server's and the worker's sets: every advertised name is rendered
 * with its type, and a second registration of the same set is refused. */
static void test_metric_sets(void **state) {
    httpd *h;
    err e;
    assert_int_equal(httpd_create(&h, &e), 0);
    httpd_server_metrics sm;
    httpd_worker_metrics wm;
    assert_int_equal(httpd_server_metrics_init(h, &sm, &e), 0);
    assert_int_equal(httpd_worker_metrics_init(h, &wm, &e), 0);
    httpd_metric *all[] = {sm.step,
                           sm.total_steps,
                           sm.loss,
                           sm.lr,
                           sm.grad_norm,
                           sm.workers,
                           sm.pushes_accepted,
                           sm.pushes_rejected,
                           sm.workers_dropped,
                           sm.bytes_in,
                           sm.bytes_out,
                           sm.step_seconds,
                           sm.checkpoint_step,
                           wm.step,
                           wm.servers,
                           wm.shards,
                           wm.tokens,
                           wm.bytes_in,
                           wm.bytes_out,
                           wm.compute_seconds,
                           sm.private_bytes,
                           sm.mapped_bytes,
                           wm.private_bytes,
                           wm.mapped_bytes};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) assert_non_null(all[i]);
    httpd_set(sm.step, 12);
    httpd_add(sm.bytes_in, 4096);
    httpd_observe(sm.step_seconds, 0.3);
    httpd_observe(wm.compute_seconds, 2000);
    /* this process's memory: private pages (the heap), and mapped files
     * (the executable and its libraries at least) */
    httpd_set_memory(wm.private_bytes, wm.mapped_bytes);
    httpd_set_memory(sm.private_bytes, NULL);
    assert_true(httpd_value(wm.private_bytes) > 0);
    assert_true(httpd_value(wm.mapped_bytes) > 0);
    assert_true(httpd_value(sm.private_bytes) > 0);
    assert_true(httpd_value(sm.mapped_bytes) == 0);
    char *t = render(h);
    static const char *want[] = {
        "# TYPE peftps_server_step gauge\npeftps_server_step 12\n",
        "# TYPE peftps_server_received_bytes_total counter\npeftps_server_received_bytes_total "
        "4096\n",
        "# TYPE peftps_server_pushes_accepted_total counter\n",
        "# TYPE peftps_server_pushes_rejected_total counter\n",
        "# TYPE peftps_server_sent_bytes_total counter\n",
        "# TYPE peftps_server_workers gauge\n",
        "# TYPE peftps_server_learning_rate gauge\n",
        "# TYPE peftps_server_last_checkpoint_step gauge\n",
        "peftps_server_step_duration_seconds_bucket{le=\"0.25\"} 0\n"
        "peftps_server_step_duration_seconds_bucket{le=\"0.5\"} 1\n",
        "peftps_server_step_duration_seconds_bucket{le=\"+Inf\"} 1\n"
        "peftps_server_step_duration_seconds_sum 0.3\n"
        "peftps_server_step_duration_seconds_count 1\n",
        "# TYPE peftps_worker_shards_computed_total counter\n",
        "# TYPE peftps_worker_private_memory_bytes gauge\npeftps_worker_private_memory_bytes ",
        "# TYPE peftps_worker_mapped_memory_bytes gauge\npeftps_worker_mapped_memory_bytes ",
        "# TYPE peftps_server_private_memory_bytes gauge\n",
        "peftps_worker_compute_duration_seconds_bucket{le=\"1000\"} 0\n"
        "peftps_worker_compute_duration_seconds_bucket{le=\"+Inf\"} 1\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        if (!strstr(t, want[i])) fail_msg("missing from /metrics:\n%s\nin:\n%s", want[i], t);
    }
    free(t);
    assert_int_equal(httpd_server_metrics_init(h, &sm, &e), -1);
    assert_string_equal(e.msg, "metric peftps_server_step is registered already");
    httpd_close(h);
}

/* ---- HTTP --------------------------------------------------------------------------- */

static void test_http_endpoints(void **state) {
    httpd *h;
    err e;
    assert_int_equal(httpd_create(&h, &e), 0);
    assert_int_equal(httpd_port(h), 0);
    httpd_metric *steps;
    assert_int_equal(httpd_gauge(h, &steps, "peftps_test_step", "Steps.", &e), 0);
    assert_int_equal(httpd_listen(h, "127.0.0.1", 0, &e), 0);
    unsigned port = httpd_port(h);
    assert_true(port > 0 && port <= 65535);

    reply r;
    fetch(port, "GET", "/healthz", &r);
    assert_int_equal(r.status, 503);
    assert_string_equal(r.body, "not ready\n");
    assert_string_equal(r.content_type, "text/plain; charset=utf-8");
    reply_free(&r);

    httpd_set_ready(h, 1);
    fetch(port, "GET", "/healthz", &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "ok\n");
    assert_int_equal(r.content_length, 3);
    reply_free(&r);

    fetch(port, "HEAD", "/healthz", &r);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.body_len, 0);
    reply_free(&r);

    httpd_set_ready(h, 0);
    fetch(port, "GET", "/healthz", &r);
    assert_int_equal(r.status, 503);
    reply_free(&r);

    httpd_set(steps, 41);
    fetch(port, "GET", "/metrics", &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.content_type, prom_type);
    assert_string_equal(r.body, "# HELP peftps_test_step Steps.\n"
                                "# TYPE peftps_test_step gauge\n"
                                "peftps_test_step 41\n");
    assert_int_equal(r.content_length, (long)r.body_len);
    reply_free(&r);

    /* Metrics registered while serving show up, and updates are live. */
    httpd_metric *late;
    assert_int_equal(httpd_counter(h, &late, "peftps_test_late_total", "Late.", &e), 0);
    httpd_set(steps, 42);
    httpd_add(late, 1);
    fetch(port, "GET", "/metrics?fresh=1", &r);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "\npeftps_test_step 42\n"));
    assert_non_null(strstr(r.body, "\npeftps_test_late_total 1\n"));
    reply_free(&r);

    fetch(port, "GET", "/", &r);
    assert_int_equal(r.status, 404);
    reply_free(&r);
    fetch(port, "GET", "/metricsx", &r);
    assert_int_equal(r.status, 404);
    reply_free(&r);
    fetch(port, "GET", "/healthz/", &r);
    assert_int_equal(r.status, 404);
    reply_free(&r);
    fetch(port, "POST", "/metrics", &r);
    assert_int_equal(r.status, 405);
    reply_free(&r);
    fetch(port, "DELETE", "/healthz", &r);
    assert_int_equal(r.status, 405);
    reply_free(&r);

    assert_int_equal(httpd_listen(h, "127.0.0.1", 0, &e), -1);
    assert_non_null(strstr(e.msg, "listening already"));
    httpd_close(h);

    /* Closed means closed: nothing answers on that port any more. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), -1);
    assert_int_equal(errno, ECONNREFUSED);
    close(fd);
}

/* /livez: always alive until a silence limit is set, then alive only while
 * the heartbeat is recent. */
static void test_liveness(void **state) {
    httpd *h;
    err e;
    assert_int_equal(httpd_create(&h, &e), 0);
    assert_int_equal(httpd_listen(h, "127.0.0.1", 0, &e), 0);
    unsigned port = httpd_port(h);
    reply r;
    fetch(port, "GET", "/livez", &r);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.body, "alive\n");
    reply_free(&r);

    httpd_set_liveness(h, 0.2);
    fetch(port, "GET", "/livez", &r);
    assert_int_equal(r.status, 200);
    reply_free(&r);
    usleep(400 * 1000);
    fetch(port, "GET", "/livez", &r);
    assert_int_equal(r.status, 503);
    double silent = 0;
    assert_int_equal(sscanf(r.body, "main loop silent for %lf s", &silent), 1);
    assert_true(silent >= 0.35 && silent < 5.0);
    reply_free(&r);
    /* Readiness is separate from liveness. */
    httpd_set_ready(h, 1);
    fetch(port, "GET", "/healthz", &r);
    assert_int_equal(r.status, 200);
    reply_free(&r);

    httpd_heartbeat(h);
    fetch(port, "GET", "/livez", &r);
    assert_int_equal(r.status, 200);
    reply_free(&r);
    httpd_set_liveness(h, 0);
    usleep(300 * 1000);
    fetch(port, "GET", "/livez", &r);
    assert_int_equal(r.status, 200);
    reply_free(&r);
    httpd_close(h);
}

static void test_listen_errors(void **state) {
    httpd *h;
    err e;
    assert_int_equal(httpd_create(&h, &e), 0);
    assert_int_equal(httpd_listen(h, "not-an-address", 0, &e), -1);
    assert_string_equal(e.msg, "http metrics: 'not-an-address' is not an IPv4 or IPv6 address");
    assert_int_equal(httpd_listen(h, "127.0.0.1", 70000, &e), -1);
    assert_string_equal(e.msg, "http metrics: port 70000 is above 65535");

    /* A port someone else holds. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(fd, 1), 0);
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    unsigned taken = ntohs(sa.sin_port);
    assert_int_equal(httpd_listen(h, "127.0.0.1", taken, &e), -1);
    char want[64];
    snprintf(want, sizeof want, "cannot listen on 127.0.0.1:%u: ", taken);
    assert_non_null(strstr(e.msg, want));
    assert_int_equal(httpd_port(h), 0);
    close(fd);

    /* IPv6 loopback, where the kernel has it. */
    int fd6 = socket(AF_INET6, SOCK_STREAM, 0);
    if (fd6 >= 0) {
        close(fd6);
        if (httpd_listen(h, "::1", 0, &e) == 0) assert_true(httpd_port(h) > 0);
    }
    httpd_close(h);
    httpd_close(NULL);
}

/* ---- concurrency -------------------------------------------------------------------- */

#define ADDS 200000

typedef struct hammer {
    httpd_metric *c, *hist;
} hammer;

static void *hammer_main(void *arg) {
    hammer *hm = arg;
    for (int i = 0; i < ADDS; i++) {
        httpd_add(hm->c, 1);
        httpd_observe(hm->hist, (i % 4) * 0.5);
    }
    return NULL;
}

/* Two updating threads and concurrent scrapes: no update is lost, and every
 * scrape sees a histogram whose +Inf bucket equals its count. */
static void test_concurrent_updates(void **state) {
    httpd *h;
    err e;
    assert_int_equal(httpd_create(&h, &e), 0);
    static const double le[] = {0.25, 1};
    hammer hm;
    assert_int_equal(httpd_counter(h, &hm.c, "adds_total", "", &e), 0);
    assert_int_equal(httpd_histogram(h, &hm.hist, "obs", "", le, 2, &e), 0);
    assert_int_equal(httpd_listen(h, "127.0.0.1", 0, &e), 0);
    pthread_t t[2];
    for (int i = 0; i < 2; i++) assert_int_equal(pthread_create(&t[i], NULL, hammer_main, &hm), 0);
    int scrapes = 0;
    for (; scrapes < 20; scrapes++) {
        reply r;
        fetch(httpd_port(h), "GET", "/metrics", &r);
        assert_int_equal(r.status, 200);
        unsigned long long inf = 0, count = 1;
        const char *p = strstr(r.body, "obs_bucket{le=\"+Inf\"} ");
        assert_non_null(p);
        sscanf(p, "obs_bucket{le=\"+Inf\"} %llu", &inf);
        p = strstr(r.body, "obs_count ");
        assert_non_null(p);
        sscanf(p, "obs_count %llu", &count);
        assert_int_equal(inf, count);
        reply_free(&r);
    }
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    assert_true(httpd_value(hm.c) == 2.0 * ADDS);
    char *text = render(h);
    /* Per thread: ADDS/4 each of 0, 0.5, 1, 1.5. */
    char want[512];
    snprintf(want, sizeof want,
             "obs_bucket{le=\"0.25\"} %d\nobs_bucket{le=\"1\"} %d\nobs_bucket{le=\"+Inf\"} "
             "%d\nobs_sum %d\nobs_count %d\n",
             2 * ADDS / 4, 2 * 3 * ADDS / 4, 2 * ADDS, 2 * 3 * ADDS / 4, 2 * ADDS);
    if (!strstr(text, want)) fail_msg("wanted\n%s\nin\n%s", want, text);
    free(text);
    httpd_close(h);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exposition_exact),    cmocka_unit_test(test_number_format),
        cmocka_unit_test(test_registration_errors), cmocka_unit_test(test_metric_sets),
        cmocka_unit_test(test_http_endpoints),      cmocka_unit_test(test_liveness),
        cmocka_unit_test(test_listen_errors),       cmocka_unit_test(test_concurrent_updates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
