/* /healthz and /metrics over HTTP (see httpd.h): a metric registry guarded
 * by one mutex, its rendering in the Prometheus text format, and the
 * libmicrohttpd daemon that answers from its own thread. The metric sets of
 * server/ and worker/ are defined at the end, so their names live in one
 * place next to docs/deploy.md's list. */
#include "net/httpd.h"
#include "base/memstat.h"

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#include <microhttpd.h>

#include "base/log.h"

typedef enum { KIND_COUNTER, KIND_GAUGE, KIND_HISTOGRAM } metric_kind;

struct httpd_metric {
    httpd *owner;
    metric_kind kind;
    char name[HTTPD_NAME_MAX];
    char help[HTTPD_HELP_MAX];
    double value; /* counter or gauge; a histogram's sum */
    int n_le;
    double le[HTTPD_MAX_BUCKETS];
    uint64_t counts[HTTPD_MAX_BUCKETS + 1]; /* per bucket, not cumulative; last is +Inf */
    uint64_t count;
};

struct httpd {
    pthread_mutex_t mu;
    atomic_int ready;
    int n;
    httpd_metric metrics[HTTPD_MAX_METRICS];
    struct MHD_Daemon *daemon;
    unsigned port;
    /* libmicrohttpd's last complaint while starting, for the error message;
     * once serving, its complaints go to the log instead. */
    char start_msg[256];
    atomic_int serving;
    /* Liveness: the last heartbeat and the silence allowed, both in
     * milliseconds of the monotonic clock; max 0 means always alive. */
    atomic_llong beat_ms;
    atomic_llong max_silence_ms;
};

static const char prom_type[] = "text/plain; version=0.0.4; charset=utf-8";

int httpd_create(httpd **out, err *e) {
    *out = NULL;
    httpd *h = calloc(1, sizeof *h);
    if (!h) return err_set(e, "http metrics: out of memory");
    if (pthread_mutex_init(&h->mu, NULL) != 0) {
        free(h);
        return err_set(e, "http metrics: cannot create a mutex");
    }
    atomic_init(&h->ready, 0);
    atomic_init(&h->serving, 0);
    atomic_init(&h->beat_ms, 0);
    atomic_init(&h->max_silence_ms, 0);
    *out = h;
    return 0;
}

/* ---- registry --------------------------------------------------------------------------- */

static int name_ok(const char *s) {
    if (!s || !*s || strlen(s) >= HTTPD_NAME_MAX) return 0;
    for (const char *p = s; *p; p++) {
        int alpha = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_' || *p == ':';
        if (!alpha && !(p > s && *p >= '0' && *p <= '9')) return 0;
    }
    return 1;
}

static int metric_add(httpd *h, httpd_metric **m, metric_kind kind, const char *name,
                      const char *help, const double *le, int n, err *e) {
    *m = NULL;
    if (!name_ok(name))
        return err_set(e,
                       "metric name '%s' is not a Prometheus name ([a-zA-Z_:][a-zA-Z0-9_:]*, "
                       "under %d characters)",
                       name ? name : "(null)", HTTPD_NAME_MAX);
    if (!help) help = "";
    if (strlen(help) >= HTTPD_HELP_MAX)
        return err_set(e, "metric %s: help text is longer than %d characters", name,
                       HTTPD_HELP_MAX - 1);
    if (kind == KIND_HISTOGRAM) {
        if (!le || n < 1 || n > HTTPD_MAX_BUCKETS)
            return err_set(e, "histogram %s: %d bucket bounds, wanted 1 to %d", name, n,
                           HTTPD_MAX_BUCKETS);
        for (int i = 0; i < n; i++) {
            if (!isfinite(le[i]))
                return err_set(e, "histogram %s: bound %d is not finite (+Inf is implicit)", name,
                               i);
            if (i > 0 && !(le[i] > le[i - 1]))
                return err_set(e, "histogram %s: bounds must increase, but bound %d (%g) <= %g",
                               name, i, le[i], le[i - 1]);
        }
    }
    pthread_mutex_lock(&h->mu);
    int rc = 0;
    for (int i = 0; i < h->n; i++)
        if (!strcmp(h->metrics[i].name, name)) {
            rc = err_set(e, "metric %s is registered already", name);
            goto out;
        }
    if (h->n >= HTTPD_MAX_METRICS) {
        rc = err_set(e, "metric %s: %d metrics are registered already", name, HTTPD_MAX_METRICS);
        goto out;
    }
    httpd_metric *x = &h->metrics[h->n];
    memset(x, 0, sizeof *x);
    x->owner = h;
    x->kind = kind;
    snprintf(x->name, sizeof x->name, "%s", name);
    snprintf(x->help, sizeof x->help, "%s", help);
    if (kind == KIND_HISTOGRAM) {
        x->n_le = n;
        memcpy(x->le, le, (size_t)n * sizeof *le);
    }
    h->n++;
    *m = x;
out:
    pthread_mutex_unlock(&h->mu);
    return rc;
}

int httpd_counter(httpd *h, httpd_metric **m, const char *name, const char *help, err *e) {
    return metric_add(h, m, KIND_COUNTER, name, help, NULL, 0, e);
}

int httpd_gauge(httpd *h, httpd_metric **m, const char *name, const char *help, err *e) {
    return metric_add(h, m, KIND_GAUGE, name, help, NULL, 0, e);
}

int httpd_histogram(httpd *h, httpd_metric **m, const char *name, const char *help,
                    const double *le, int n, err *e) {
    return metric_add(h, m, KIND_HISTOGRAM, name, help, le, n, e);
}

void httpd_add(httpd_metric *m, double v) {
    if (!m || m->kind != KIND_COUNTER || !(v >= 0)) return;
    pthread_mutex_lock(&m->owner->mu);
    m->value += v;
    pthread_mutex_unlock(&m->owner->mu);
}

void httpd_set(httpd_metric *m, double v) {
    if (!m || m->kind != KIND_GAUGE) return;
    pthread_mutex_lock(&m->owner->mu);
    m->value = v;
    pthread_mutex_unlock(&m->owner->mu);
}

void httpd_observe(httpd_metric *m, double v) {
    if (!m || m->kind != KIND_HISTOGRAM || isnan(v)) return;
    int b = 0;
    while (b < m->n_le && v > m->le[b]) b++;
    pthread_mutex_lock(&m->owner->mu);
    m->counts[b]++;
    m->count++;
    m->value += v;
    pthread_mutex_unlock(&m->owner->mu);
}

double httpd_value(httpd_metric *m) {
    if (!m) return 0.0;
    pthread_mutex_lock(&m->owner->mu);
    double v = m->kind == KIND_HISTOGRAM ? (double)m->count : m->value;
    pthread_mutex_unlock(&m->owner->mu);
    return v;
}

void httpd_set_ready(httpd *h, int ready) {
    atomic_store(&h->ready, ready != 0);
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void httpd_heartbeat(httpd *h) {
    atomic_store(&h->beat_ms, now_ms());
}

void httpd_set_liveness(httpd *h, double max_silence_s) {
    httpd_heartbeat(h);
    atomic_store(&h->max_silence_ms, max_silence_s > 0 ? (long long)(max_silence_s * 1000.0) : 0);
}

/* ---- rendering -------------------------------------------------------------------------- */

/* Prometheus spells the special values +Inf, -Inf and NaN; integral values
 * print without an exponent so that step numbers and byte counts read as
 * such; other values get the fewest digits that read back exactly. */
static void fmt_num(char *buf, size_t n, double v) {
    if (isnan(v)) {
        snprintf(buf, n, "NaN");
        return;
    }
    if (isinf(v)) {
        snprintf(buf, n, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    if (v == floor(v) && fabs(v) < 9007199254740992.0) {
        snprintf(buf, n, "%.0f", v);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) return;
    }
}

/* HELP text escapes backslash and newline, as the format requires. */
static void put_help(FILE *f, const httpd_metric *m) {
    fprintf(f, "# HELP %s ", m->name);
    for (const char *p = m->help; *p; p++) {
        if (*p == '\\')
            fputs("\\\\", f);
        else if (*p == '\n')
            fputs("\\n", f);
        else
            fputc(*p, f);
    }
    fputc('\n', f);
}

static void put_metric(FILE *f, const httpd_metric *m) {
    static const char *types[] = {"counter", "gauge", "histogram"};
    char num[64], le[64];
    put_help(f, m);
    fprintf(f, "# TYPE %s %s\n", m->name, types[m->kind]);
    if (m->kind != KIND_HISTOGRAM) {
        fmt_num(num, sizeof num, m->value);
        fprintf(f, "%s %s\n", m->name, num);
        return;
    }
    uint64_t cum = 0;
    for (int b = 0; b < m->n_le; b++) {
        cum += m->counts[b];
        fmt_num(le, sizeof le, m->le[b]);
        fprintf(f, "%s_bucket{le=\"%s\"} %llu\n", m->name, le, (unsigned long long)cum);
    }
    fprintf(f, "%s_bucket{le=\"+Inf\"} %llu\n", m->name, (unsigned long long)m->count);
    fmt_num(num, sizeof num, m->value);
    fprintf(f, "%s_sum %s\n", m->name, num);
    fprintf(f, "%s_count %llu\n", m->name, (unsigned long long)m->count);
}

int httpd_render(httpd *h, char **text, size_t *len, err *e) {
    *text = NULL;
    *len = 0;
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f) return err_set(e, "rendering metrics: out of memory");
    pthread_mutex_lock(&h->mu);
    for (int i = 0; i < h->n; i++) put_metric(f, &h->metrics[i]);
    pthread_mutex_unlock(&h->mu);
    if (fclose(f) != 0 || !buf) {
        free(buf);
        return err_set(e, "rendering metrics: out of memory");
    }
    *text = buf;
    *len = n;
    return 0;
}

/* ---- HTTP ------------------------------------------------------------------------------- */

static enum MHD_Result respond(struct MHD_Connection *c, unsigned status, const char *type,
                               char *body, size_t len, int owned) {
    struct MHD_Response *r = MHD_create_response_from_buffer(
        len, body, owned ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (!r) {
        if (owned) free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    /* Probes and scrapers must see the state of now, never a cached one. */
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED) MHD_add_response_header(r, "Allow", "GET, HEAD");
    enum MHD_Result rc = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **state) {
    static int seen;
    httpd *h = cls;
    (void)version;
    (void)upload;
    /* The first call carries only the headers; answer once any body is
     * drained (and ignored: no endpoint takes one). */
    if (!*state) {
        *state = &seen;
        return MHD_YES;
    }
    if (*upload_size) {
        *upload_size = 0;
        return MHD_YES;
    }
    static char text_type[] = "text/plain; charset=utf-8";
    if (strcmp(method, MHD_HTTP_METHOD_GET) && strcmp(method, MHD_HTTP_METHOD_HEAD)) {
        static char body[] = "method not allowed: use GET\n";
        return respond(c, MHD_HTTP_METHOD_NOT_ALLOWED, text_type, body, sizeof body - 1, 0);
    }
    if (!strcmp(url, "/healthz")) {
        static char ok[] = "ok\n", not_ready[] = "not ready\n";
        if (atomic_load(&h->ready)) return respond(c, MHD_HTTP_OK, text_type, ok, sizeof ok - 1, 0);
        return respond(c, MHD_HTTP_SERVICE_UNAVAILABLE, text_type, not_ready, sizeof not_ready - 1,
                       0);
    }
    if (!strcmp(url, "/livez")) {
        static char alive[] = "alive\n";
        long long max = atomic_load(&h->max_silence_ms);
        long long silent = now_ms() - atomic_load(&h->beat_ms);
        if (max <= 0 || silent <= max)
            return respond(c, MHD_HTTP_OK, text_type, alive, sizeof alive - 1, 0);
        char *body = malloc(64);
        if (!body) return MHD_NO;
        int n = snprintf(body, 64, "main loop silent for %.1f s\n", silent / 1000.0);
        return respond(c, MHD_HTTP_SERVICE_UNAVAILABLE, text_type, body, (size_t)n, 1);
    }
    if (!strcmp(url, "/metrics")) {
        char *text;
        size_t len;
        err e;
        if (httpd_render(h, &text, &len, &e) < 0) {
            static char body[] = "out of memory\n";
            return respond(c, MHD_HTTP_INTERNAL_SERVER_ERROR, text_type, body, sizeof body - 1, 0);
        }
        return respond(c, MHD_HTTP_OK, prom_type, text, len, 1);
    }
    static char body[] = "not found: try /healthz, /livez or /metrics\n";
    return respond(c, MHD_HTTP_NOT_FOUND, text_type, body, sizeof body - 1, 0);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
    httpd *h = cls;
    char msg[256];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = 0;
    if (atomic_load(&h->serving))
        log_warn("http metrics: %s", msg);
    else
        snprintf(h->start_msg, sizeof h->start_msg, "%s", msg);
}

/* How many connections the daemon holds at once: HTTPD_MAX_CONNECTIONS, or
 * fewer when the descriptor limit (raised to its hard limit first) leaves
 * less beside HTTPD_FD_RESERVE for the process's own sockets and files. */
static unsigned connection_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0) return 64;
    rlim_t want = HTTPD_MAX_CONNECTIONS + HTTPD_FD_RESERVE;
    if (rl.rlim_cur < want && rl.rlim_cur < rl.rlim_max) {
        struct rlimit up = rl;
        up.rlim_cur = rl.rlim_max < want ? rl.rlim_max : want;
        if (setrlimit(RLIMIT_NOFILE, &up) == 0) rl = up;
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= want) return HTTPD_MAX_CONNECTIONS;
    if (rl.rlim_cur < HTTPD_FD_RESERVE + 64) return 64;
    return (unsigned)(rl.rlim_cur - HTTPD_FD_RESERVE);
}

static struct MHD_Daemon *start(httpd *h, unsigned flags, const struct sockaddr *sa,
                                unsigned port) {
    h->start_msg[0] = 0;
    /* Idle or slow clients must not starve the probes: epoll holds
     * thousands of connections at no cost, one address may take only half
     * of them (a probe from another address always finds room), and a
     * connection silent for HTTPD_IDLE_TIMEOUT_S is cut. */
    unsigned limit = connection_limit(), per_ip = limit / 2;
    if (sa)
        return MHD_start_daemon(
            flags, (uint16_t)port, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER,
            on_mhd_log, h, MHD_OPTION_CONNECTION_LIMIT, limit, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
            per_ip, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)HTTPD_IDLE_TIMEOUT_S,
            MHD_OPTION_SOCK_ADDR, sa, MHD_OPTION_END);
    return MHD_start_daemon(
        flags, (uint16_t)port, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, h,
        MHD_OPTION_CONNECTION_LIMIT, limit, MHD_OPTION_PER_IP_CONNECTION_LIMIT, per_ip,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)HTTPD_IDLE_TIMEOUT_S, MHD_OPTION_END);
}

int httpd_listen(httpd *h, const char *addr, unsigned port, err *e) {
    const char *shown = addr ? addr : "*";
    if (h->daemon) return err_set(e, "http metrics on %s:%u: listening already", shown, port);
    if (port > 65535) return err_set(e, "http metrics: port %u is above 65535", port);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG;
    struct MHD_Daemon *d = NULL;
    if (addr) {
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
        memset(&v4, 0, sizeof v4);
        memset(&v6, 0, sizeof v6);
        if (inet_pton(AF_INET, addr, &v4.sin_addr) == 1) {
            v4.sin_family = AF_INET;
            v4.sin_port = htons((uint16_t)port);
            d = start(h, flags, (const struct sockaddr *)&v4, port);
        } else if (inet_pton(AF_INET6, addr, &v6.sin6_addr) == 1) {
            v6.sin6_family = AF_INET6;
            v6.sin6_port = htons((uint16_t)port);
            d = start(h, flags | MHD_USE_IPv6, (const struct sockaddr *)&v6, port);
        } else {
            return err_set(e, "http metrics: '%s' is not an IPv4 or IPv6 address", addr);
        }
    } else {
        /* Pods of an IPv6-only cluster need [::]; a kernel without IPv6
         * refuses it, and then IPv4 alone will do. */
        d = start(h, flags | MHD_USE_DUAL_STACK, NULL, port);
        if (!d) d = start(h, flags, NULL, port);
    }
    if (!d)
        return err_set(e, "http metrics: cannot listen on %s:%u: %s", shown, port,
                       h->start_msg[0] ? h->start_msg : "libmicrohttpd could not start");
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    h->daemon = d;
    h->port = info && info->port ? info->port : port;
    atomic_store(&h->serving, 1);
    return 0;
}

unsigned httpd_port(const httpd *h) {
    return h && h->daemon ? h->port : 0;
}

void httpd_close(httpd *h) {
    if (!h) return;
    if (h->daemon) MHD_stop_daemon(h->daemon);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

/* ---- the metrics of server/ and worker/ --------------------------------------------------- */

/* Steps take from milliseconds (a tiny model, loopback) to many minutes (a
 * large base on CPUs): a wide, roughly 2.5x-spaced ladder covers both. */
static const double seconds_le[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,   2.5,
                                    5,     10,   25,    50,   100, 250,  500, 1000};
#define N_SECONDS_LE ((int)(sizeof seconds_le / sizeof seconds_le[0]))

typedef struct def {
    metric_kind kind;
    const char *name, *help;
    size_t field; /* offset of the httpd_metric * in the metrics struct */
} def;

static int define_all(httpd *h, void *base, const def *d, int n, err *e) {
    for (int i = 0; i < n; i++) {
        httpd_metric **slot = (httpd_metric **)((char *)base + d[i].field);
        if (metric_add(h, slot, d[i].kind, d[i].name, d[i].help, seconds_le, N_SECONDS_LE, e) < 0)
            return -1;
    }
    return 0;
}

#define SM(f) offsetof(httpd_server_metrics, f)
static const def server_defs[] = {
    {KIND_GAUGE, "peftps_server_step", "Training steps completed.", SM(step)},
    {KIND_GAUGE, "peftps_server_total_steps", "Steps the schedule runs for.", SM(total_steps)},
    {KIND_GAUGE, "peftps_server_loss", "Mean token loss of the last step.", SM(loss)},
    {KIND_GAUGE, "peftps_server_learning_rate", "Learning rate of the last step.", SM(lr)},
    {KIND_GAUGE, "peftps_server_grad_norm",
     "Global gradient norm of the last step, before clipping.", SM(grad_norm)},
    {KIND_GAUGE, "peftps_server_workers", "Workers registered now.", SM(workers)},
    {KIND_COUNTER, "peftps_server_pushes_accepted_total",
     "Gradient pushes accepted into a step's sum.", SM(pushes_accepted)},
    {KIND_COUNTER, "peftps_server_pushes_rejected_total",
     "Gradient pushes refused: stale, duplicate, unassigned or malformed.", SM(pushes_rejected)},
    {KIND_COUNTER, "peftps_server_workers_dropped_total",
     "Workers dropped after worker_timeout_ms of silence; their shards went to others.",
     SM(workers_dropped)},
    {KIND_COUNTER, "peftps_server_received_bytes_total", "Bytes received from workers.",
     SM(bytes_in)},
    {KIND_COUNTER, "peftps_server_sent_bytes_total", "Bytes sent to workers.", SM(bytes_out)},
    {KIND_HISTOGRAM, "peftps_server_step_duration_seconds",
     "Wall time from a step's first assignment to its update.", SM(step_seconds)},
    {KIND_GAUGE, "peftps_server_last_checkpoint_step",
     "Step of the newest checkpoint written or resumed from (0: none).", SM(checkpoint_step)},
    {KIND_GAUGE, "peftps_server_private_memory_bytes",
     "Resident private memory (RssAnon): trainable tensors, optimizer state, buffers.",
     SM(private_bytes)},
    {KIND_GAUGE, "peftps_server_mapped_memory_bytes",
     "Resident pages of mapped files (RssFile + RssShmem), shared with other processes.",
     SM(mapped_bytes)},
};

#define WM(f) offsetof(httpd_worker_metrics, f)
static const def worker_defs[] = {
    {KIND_GAUGE, "peftps_worker_step", "Step of the last shard computed.", WM(step)},
    {KIND_GAUGE, "peftps_worker_servers", "Parameter servers this worker is registered with.",
     WM(servers)},
    {KIND_COUNTER, "peftps_worker_shards_computed_total", "Shards computed and pushed.",
     WM(shards)},
    {KIND_COUNTER, "peftps_worker_tokens_total", "Tokens scored in the shards computed.",
     WM(tokens)},
    {KIND_COUNTER, "peftps_worker_received_bytes_total", "Bytes received from servers.",
     WM(bytes_in)},
    {KIND_COUNTER, "peftps_worker_sent_bytes_total", "Bytes sent to servers.", WM(bytes_out)},
    {KIND_HISTOGRAM, "peftps_worker_compute_duration_seconds",
     "Forward and backward time of one shard.", WM(compute_seconds)},
    {KIND_GAUGE, "peftps_worker_private_memory_bytes",
     "Resident private memory (RssAnon): activations, gradients, buffers.", WM(private_bytes)},
    {KIND_GAUGE, "peftps_worker_mapped_memory_bytes",
     "Resident pages of mapped files (RssFile + RssShmem): mostly the base model, shared by "
     "the processes of the machine.",
     WM(mapped_bytes)},
    {KIND_GAUGE, "peftps_worker_experiments",
     "Experiments this worker serves (a pool worker: any number; else 1).", WM(experiments)},
    {KIND_COUNTER, "peftps_worker_cobatched_products_total",
     "Frozen products of an experiment computed in one call with another experiment's rows.",
     WM(cobatched_products)},
    {KIND_COUNTER, "peftps_worker_shared_calls_total",
     "Calls that computed the frozen products of two or more experiments at once.",
     WM(shared_calls)},
};

int httpd_server_metrics_init(httpd *h, httpd_server_metrics *m, err *e) {
    memset(m, 0, sizeof *m);
    return define_all(h, m, server_defs, (int)(sizeof server_defs / sizeof server_defs[0]), e);
}

int httpd_worker_metrics_init(httpd *h, httpd_worker_metrics *m, err *e) {
    memset(m, 0, sizeof *m);
    return define_all(h, m, worker_defs, (int)(sizeof worker_defs / sizeof worker_defs[0]), e);
}

void httpd_set_memory(httpd_metric *private_bytes, httpd_metric *mapped_bytes) {
    memstat ms;
    if (memstat_read(0, &ms) < 0) return;
    if (ms.private_kib >= 0) httpd_set(private_bytes, 1024.0 * (double)ms.private_kib);
    if (ms.mapped_kib >= 0) httpd_set(mapped_bytes, 1024.0 * (double)ms.mapped_kib);
}
