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

int main(int argc, char **argv) {
    log_init("worker");
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
