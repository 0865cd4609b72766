/* Health and Prometheus metrics over HTTP for the parameter server (server/)
 * and the workers (worker/): GET /healthz for readiness probes and GET
 * /metrics in the Prometheus text exposition format, served by libmicrohttpd
 * from its own thread, and GET /livez for liveness probes. deploy/ points the
 * Kubernetes probes and scrapers here.
 *
 * The process's main loop owns the numbers and publishes them with the
 * setters below, which take a mutex and return at once; the HTTP thread
 * only reads under the same mutex, so a slow scraper never stalls training.
 * Metrics live as long as their httpd. */
#ifndef PEFTPS_HTTPD_H
#define PEFTPS_HTTPD_H

#include <stddef.h>

#include "base/err.h"

#define HTTPD_MAX_METRICS 64
#define HTTPD_MAX_BUCKETS 32
#define HTTPD_NAME_MAX 96
#define HTTPD_HELP_MAX 256

typedef struct httpd httpd;
typedef struct httpd_metric httpd_metric;

/* Creates an empty registry, not ready and not listening: a process can
 * always record its metrics, and only serves them when httpd_listen is
 * called (cluster.metrics_port non-zero). Fails only when out of memory or
 * a mutex cannot be made. */
int httpd_create(httpd **out, err *e);

/* Registers a counter (only goes up; by convention named ..._total), a gauge
 * (set to any value), or a histogram with the finite, strictly increasing
 * upper bounds le[0..n-1] (the +Inf bucket is implicit; 1 <= n <=
 * HTTPD_MAX_BUCKETS). Metrics start at 0 and are rendered in registration
 * order. Fails, naming the metric, when the name is not a Prometheus metric
 * name ([a-zA-Z_:][a-zA-Z0-9_:]*, under HTTPD_NAME_MAX), is registered
 * already, the help text is too long (HTTPD_HELP_MAX), the bounds are
 * invalid, or HTTPD_MAX_METRICS are registered. Safe while serving. */
int httpd_counter(httpd *h, httpd_metric **m, const char *name, const char *help, err *e);
int httpd_gauge(httpd *h, httpd_metric **m, const char *name, const char *help, err *e);
int httpd_histogram(httpd *h, httpd_metric **m, const char *name, const char *help,
                    const double *le, int n, err *e);

/* Thread-safe updates, cheap enough for every message of a loop. Each is a
 * no-op when m is NULL (a metric a caller chose not to register) or when m
 * is of another kind. httpd_add adds v >= 0 to a counter (a negative or NaN
 * v is ignored: counters never go down); httpd_set sets a gauge to v (NaN
 * and infinities are kept and rendered as Prometheus spells them);
 * httpd_observe counts v in the first bucket whose bound is >= v and adds
 * it to the sum (NaN is ignored). */
void httpd_add(httpd_metric *m, double v);
void httpd_set(httpd_metric *m, double v);
void httpd_observe(httpd_metric *m, double v);

/* The current value of a counter or gauge, or the count of a histogram. */
double httpd_value(httpd_metric *m);

/* Says whether GET /healthz answers 200 "ok" (ready != 0) or 503 "not
 * ready". A new httpd is not ready. Thread-safe. */
void httpd_set_ready(httpd *h, int ready);

/* Liveness for GET /livez: once max_silence_s > 0 is set, /livez answers
 * 200 "alive" while httpd_heartbeat was called within the last
 * max_silence_s seconds (monotonic clock) and 503 "main loop silent for N s"
 * after that, so that a probe restarts a process whose loop hangs while its
 * HTTP thread still answers. With max_silence_s <= 0 (the default) /livez
 * always answers 200. Setting it counts as a heartbeat. Thread-safe. */
void httpd_set_liveness(httpd *h, double max_silence_s);
void httpd_heartbeat(httpd *h);

/* Renders every metric in the Prometheus text format 0.0.4 (# HELP and
 * # TYPE lines, then the samples; histograms as cumulative _bucket{le="..."}
 * lines ending with le="+Inf", then _sum and _count) into a new
 * NUL-terminated string (*text, freed by the caller) of *len bytes. Numbers
 * are exact: integers print without exponent, others with the shortest
 * digits that read back to the same double. Fails only when out of memory. */
int httpd_render(httpd *h, char **text, size_t *len, err *e);

/* Starts serving on addr:port from a thread of libmicrohttpd: addr is an
 * IPv4 or IPv6 literal, or NULL for every address of the host (IPv6 and
 * IPv4 when the kernel has IPv6, IPv4 alone otherwise); port 0 takes a free
 * ephemeral port (see httpd_port). GET or HEAD /healthz, /livez and /metrics
 * are answered; other paths get 404, other methods 405. Fails, naming the
 * address and port, when the address is not a literal, the port is above
 * 65535 or cannot be bound (in use, not permitted), or the server is
 * listening already. */
int httpd_listen(httpd *h, const char *addr, unsigned port, err *e);

/* Connections served at once (epoll; fewer when the descriptor limit, which
 * httpd_listen raises towards its hard limit, leaves less), half of them at
 * most from one address, each cut after this many seconds of silence: idle
 * or slow clients cannot keep /healthz from answering. */
#define HTTPD_MAX_CONNECTIONS 4096
#define HTTPD_FD_RESERVE 512
#define HTTPD_IDLE_TIMEOUT_S 5

/* The port being served, or 0 when not listening. */
unsigned httpd_port(const httpd *h);

/* Stops serving (waiting for requests in progress) and frees the registry;
 * its metrics are invalid afterwards. h may be NULL. */
void httpd_close(httpd *h);

/* The metrics of the parameter server, registered in this order by
 * httpd_server_metrics_init under the names in its definition (documented
 * for users in docs/deploy.md). */
typedef struct httpd_server_metrics {
    httpd_metric *step;            /* gauge: steps completed */
    httpd_metric *total_steps;     /* gauge: schedule.total_steps */
    httpd_metric *loss;            /* gauge: mean loss of the last step */
    httpd_metric *lr;              /* gauge: learning rate of the last step */
    httpd_metric *grad_norm;       /* gauge: global gradient norm before clipping */
    httpd_metric *workers;         /* gauge: workers registered now */
    httpd_metric *pushes_accepted; /* counter: gradient pushes summed into a step */
    httpd_metric *pushes_rejected; /* counter: pushes refused (stale, duplicate, bad) */
    httpd_metric *workers_dropped; /* counter: workers dropped after the timeout */
    httpd_metric *bytes_in;        /* counter: bytes received from workers */
    httpd_metric *bytes_out;       /* counter: bytes sent to workers */
    httpd_metric *step_seconds;    /* histogram: wall time of a step */
    httpd_metric *checkpoint_step; /* gauge: step of the last checkpoint written or resumed */
    httpd_metric *private_bytes;   /* gauge: resident private memory (RssAnon) */
    httpd_metric *mapped_bytes;    /* gauge: resident pages of mapped files, the base's */
} httpd_server_metrics;

/* The metrics of a worker, registered by httpd_worker_metrics_init. */
typedef struct httpd_worker_metrics {
    httpd_metric *step;               /* gauge: step of the last shard computed */
    httpd_metric *servers;            /* gauge: servers this worker is registered with */
    httpd_metric *shards;             /* counter: shards computed and pushed */
    httpd_metric *tokens;             /* counter: tokens scored in those shards */
    httpd_metric *bytes_in;           /* counter: bytes received from servers */
    httpd_metric *bytes_out;          /* counter: bytes sent to servers */
    httpd_metric *compute_seconds;    /* histogram: forward+backward time of a shard */
    httpd_metric *private_bytes;      /* gauge: resident private memory (RssAnon) */
    httpd_metric *mapped_bytes;       /* gauge: resident pages of mapped files, the base's */
    httpd_metric *experiments;        /* gauge: experiments served */
    httpd_metric *cobatched_products; /* counter: products computed beside another's rows */
    httpd_metric *shared_calls;       /* counter: calls serving two or more experiments */
} httpd_worker_metrics;

/* Registers the server's or a worker's metrics in h and points m at them.
 * Fails as the registration functions do (only when h holds metrics of the
 * same names already or is full). */
int httpd_server_metrics_init(httpd *h, httpd_server_metrics *m, err *e);
int httpd_worker_metrics_init(httpd *h, httpd_worker_metrics *m, err *e);

/* Sets the gauges private_bytes and mapped_bytes (either may be NULL) to
 * this process's memory now (base/memstat.h); left as they were when /proc
 * cannot be read. */
void httpd_set_memory(httpd_metric *private_bytes, httpd_metric *mapped_bytes);

#endif
