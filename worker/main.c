/* `peftps-worker`: the stateless worker program. Reads the experiment
 * (common/config/config.h) and runs worker/worker.c; exit status 0 when a server
 * said Shutdown, 1 on a failure while working, 2 on bad usage or input or
 * when a server refuses this worker, 128+signal when stopped. */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "config/cmdline.h"
#include "config/config.h"
#include "train/experiment.h"
#include "base/log.h"
#include "base/stopsig.h"
#include "worker.h"

static const char usage[] =
    "usage: peftps-worker EXPERIMENT.pbtxt [--set PATH=VALUE ...] [--linger]\n"
    "       peftps-worker --pool ENDPOINT --model DIR [--no-cobatch] [--metrics-port P]\n"
    "\n"
    "A stateless worker: maps the experiment's base model read-only, registers with\n"
    "every server of cluster.servers, and computes the gradients of the shards it is\n"
    "given until a server says the run is over. It keeps nothing worth saving: stop\n"
    "or kill it at any time and the servers give its work to others. Reconnects by\n"
    "itself when a server restarts.\n"
    "\n"
    "options:\n"
    "  --set PATH=VALUE   override a field of the experiment (repeatable)\n"
    "  --linger           when the run is over, stay (idle, /livez and /metrics up)\n"
    "                     until SIGINT or SIGTERM, then exit 0: for supervisors that\n"
    "                     restart a program that exits, such as a Kubernetes Deployment\n";

static int stop_signal;

static void on_signal(int sig) {
    stop_signal = sig;
    worker_stop();
}

/* `peftps-worker --pool ...`: no experiment file. */
static int pool_main(int argc, char **argv) {
    worker_pool_opts o = {.cobatch = 1};
    int no_cobatch = 0;
    uint64_t port = 0;
    const cmdline_opt opts[] = {CMDLINE_STR("--pool", &o.pool),
                                CMDLINE_STR("--model", &o.model_dir),
                                CMDLINE_SET("--no-cobatch", &no_cobatch, 1),
                                CMDLINE_UINT("--metrics-port", &port, 1, 65535)};
    int rc = cmdline_parse("peftps-worker", usage, opts, 4, "argument", NULL, 0, argc, argv);
    if (rc) return rc == 1 ? 0 : rc;
    if (!o.model_dir) {
        fprintf(stderr, "peftps-worker: --pool needs --model DIR (this machine's copy of the "
                        "pool's base)\n");
        return 2;
    }
    o.cobatch = !no_cobatch;
    o.metrics_port = (unsigned)port;
    stopsig sigs;
    stopsig_catch(&sigs, on_signal);
    signal(SIGPIPE, SIG_IGN);
    err e;
    rc = worker_pool_run(&o, &e);
    if (rc < 0) {
        fprintf(stderr, "peftps-worker: %s\n", e.msg);
        return 2;
    }
    return rc > 0 ? 128 + stop_signal : 0;
}

int main(int argc, char **argv) {
    log_init("worker");
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--pool") || !strncmp(argv[i], "--pool=", 7))
            return pool_main(argc, argv);
    int linger = 0;
    const cmdline_opt opts[] = {CMDLINE_SET("--linger", &linger, 1)};
    Peftps__Experiment *ex = NULL;
    int rc = experiment_from_cmdline("peftps-worker", usage, opts, 1, argc, argv, &ex);
    if (rc) return rc == 1 ? 0 : rc;
    err e;
    worker *w = NULL;
    if (worker_open(&w, ex, &e) < 0) {
        fprintf(stderr, "peftps-worker: %s\n", e.msg);
        config_free(ex);
        return 2;
    }
    stopsig sigs;
    stopsig_catch(&sigs, on_signal);
    signal(SIGPIPE, SIG_IGN);
    rc = worker_run(w, &e);
    if (rc == 0 && linger) worker_linger(w);
    int status = rc == 0 ? 0 : rc > 0 ? 128 + stop_signal : 2;
    if (rc < 0) fprintf(stderr, "peftps-worker: %s\n", e.msg);
    worker_close(w);
    config_free(ex);
    return status;
}
