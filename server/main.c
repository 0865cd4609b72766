/* `peftps-server`: the parameter server program. Reads the experiment
 * (common/config/config.h), runs server/server.c until the last step, and maps the
 * outcome to an exit status: 0 done, 1 failed while running, 2 bad usage or
 * input (including a refused checkpoint), 128+signal when stopped. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/cmdline.h"
#include "config/config.h"
#include "train/experiment.h"
#include "base/log.h"
#include "base/stopsig.h"
#include "server.h"

static const char usage[] =
    "usage: peftps-server EXPERIMENT.pbtxt [--set PATH=VALUE ...] [--index I]\n"
    "                     [--listen ENDPOINT] [--resume-step N] [--linger]\n"
    "                     [--pool ENDPOINT [--pool-job ID]]\n"
    "\n"
    "The parameter server of an experiment: holds the trainable tensors and their\n"
    "optimizer state, hands the shards of each step to workers (peftps-worker),\n"
    "sums their gradients in shard order and updates. Writes metrics.jsonl,\n"
    "tensors.safetensors and experiment.pbtxt under output_dir like `peftps train`,\n"
    "and checkpoints to checkpoint.path, from which a restarted server resumes.\n"
    "\n"
    "options:\n"
    "  --set PATH=VALUE   override a field of the experiment (repeatable)\n"
    "  --index I          this process is cluster.servers[I] (default 0)\n"
    "  --listen ENDPOINT  bind here instead of cluster.servers[I], e.g. tcp://*:5555\n"
    "  --resume-step N    resume from the checkpoint of step N, not the newest (with\n"
    "                     several servers: a step every server holds a checkpoint of)\n"
    "  --linger           after the last step, keep answering workers (telling them\n"
    "                     the run is over), /healthz and /metrics until SIGINT or\n"
    "                     SIGTERM, then exit 0: for supervisors that restart a\n"
    "                     program that exits, such as a Kubernetes StatefulSet\n"
    "  --pool ENDPOINT    run the experiment on a pool: announce it to the pool's\n"
    "                     coordinator (`peftps pool start`), whose workers then\n"
    "                     serve it; report progress there; stop (checkpointing)\n"
    "                     when it is cancelled. Refused (another base, a name or\n"
    "                     fingerprint clash with a running job): exit 2\n"
    "  --pool-job ID      the job id the coordinator gave (set by the coordinator\n"
    "                     when it starts the server itself)\n"
    "\n"
    "With several cluster.servers, start one process per entry with --index I;\n"
    "each holds a share of the tensors and server 0 coordinates the others.\n"
    "SIGHUP makes a server with CURVE read cluster.curve.authorized_keys again.\n";

static int stop_signal;

static void on_signal(int sig) {
    stop_signal = sig;
    server_stop();
}

static void on_hangup(int sig) {
    (void)sig;
    server_reload_keys();
}

int main(int argc, char **argv) {
    log_init("server");
    server_opts opts = {0, NULL, SERVER_RESUME_LATEST, 0, NULL, NULL};
    const cmdline_opt takes[] = {
        CMDLINE_INT("--index", &opts.index, 0, 1 << 20),
        CMDLINE_STR("--listen", &opts.listen),
        CMDLINE_UINT("--resume-step", &opts.resume_step, 0, CMDLINE_UINT_MAX),
        CMDLINE_SET("--linger", &opts.linger, 1),
        CMDLINE_STR("--pool", &opts.pool),
        CMDLINE_STR("--pool-job", &opts.pool_job)};
    Peftps__Experiment *ex = NULL;
    int rc = experiment_from_cmdline("peftps-server", usage, takes, 6, argc, argv, &ex);
    if (rc) return rc == 1 ? 0 : rc;
    err e;
    server *s = NULL;
    if (server_open(&s, ex, &opts, &e) < 0) {
        fprintf(stderr, "peftps-server: %s\n", e.msg);
        config_free(ex);
        return 2;
    }
    stopsig sigs;
    stopsig_catch(&sigs, on_signal);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction hup;
    memset(&hup, 0, sizeof hup);
    hup.sa_handler = on_hangup;
    sigemptyset(&hup.sa_mask);
    sigaction(SIGHUP, &hup, NULL);
    int status = 1;
    if (server_bind(s, &e) == 0) {
        rc = server_run(s, &e);
        status = rc == 0 ? 0 : rc > 0 ? 128 + stop_signal : 1;
        server_pool_final(s, rc, rc < 0 ? e.msg : rc > 0 ? "the server was stopped" : NULL);
        if (server_pool_refused(s)) status = 2;
        if (rc > 0 && server_pool_cancelled(s)) status = 0;
    }
    if (status == 1) fprintf(stderr, "peftps-server: %s\n", e.msg);
    server_close(s);
    config_free(ex);
    return status;
}
