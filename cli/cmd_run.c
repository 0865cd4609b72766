/* `peftps run`: a whole cluster on this machine. Starts the parameter
 * server(s) and N workers as child processes (peftps-server and
 * peftps-worker from the directory of this very binary), shows the server's
 * progress line, forwards Ctrl-C, waits, then evaluates the final tensors in
 * process (common/train/train.h) and appends the eval line to metrics.jsonl, so
 * the outputs are those of `peftps train` (cli/cmd_train.c). Processes are
 * started and watched through cli/spawn.h. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/log.h"
#include "base/progress.h"
#include "base/stopsig.h"
#include "cli.h"
#include "config/cmdline.h"
#include "config/config.h"
#include "spawn.h"
#include "train/experiment.h"
#include "train/metrics.h"
#include "train/train.h"

static const char run_usage[] =
    "usage: peftps run EXPERIMENT.pbtxt [--workers N] [--set PATH=VALUE ...]\n\n"
    "Trains the experiment on a cluster started on this machine: one\n"
    "peftps-server per cluster.servers entry and N peftps-worker processes\n"
    "(default 1), talking over private ipc:// endpoints (the experiment's\n"
    "endpoints are replaced; set them and start the programs yourself to use\n"
    "other machines). Shows the server's progress; Ctrl-C stops everything,\n"
    "after the server checkpointed (unless checkpoint.every_steps is 0, which\n"
    "turns checkpoints off). Writes what `peftps train` writes under\n"
    "output_dir (metrics.jsonl, tensors.safetensors, experiment.pbtxt), with\n"
    "bit-identical tensors, and resumes from checkpoint.path when a checkpoint\n"
    "of the same experiment is there. Exits with the server's status; when a\n"
    "server dies, says which and how, and the command that resumes the run.\n\n"
    "options:\n"
    "  --workers N        worker processes to start (default 1)\n"
    "  --set PATH=VALUE   override a field, e.g. --set optimizer.lr=3e-4 (repeatable)\n";

/* Seconds the workers get to leave by themselves after the server is done. */
#define RUN_WORKER_GRACE_S 5.0

static volatile sig_atomic_t run_signal;

static void run_on_signal(int sig) {
    run_signal = sig;
}

/* A cluster on this machine, from the command line to the last exit. */
typedef struct run_state {
    const char *path; /* the experiment file */
    config_args sets; /* the user's --set pairs, passed on to every process */
    char *command;    /* the command line as typed: what resumes the run */
    int n_workers, n_servers;
    Peftps__Experiment *ex;
    char tmp[32];    /* private directory of the ipc:// endpoints */
    char *endpoints; /* cluster.servers=["ipc://TMP/server-0", ...] */
    char **args;     /* argv of the children, filled in by run_start */
    pid_t *servers, *workers;
    int servers_left, workers_left, workers_failed;
    int status;      /* the exit status the run takes from its servers; -1 none yet */
    int stopping;    /* we asked the servers to stop (signal, or no worker left) */
    int server_died; /* a server ended on its own with a failure */
} run_state;

/* The command line: --workers and the experiment, with the --set pairs. */
static int run_parse(run_state *r, int argc, char **argv) {
    err e;
    r->command = spawn_command_line("peftps", argv, argc);
    if (config_parse_args(&argc, argv, &r->sets, &e) < 0) {
        fprintf(stderr, "peftps run: %s\n%s", e.msg, run_usage);
        return 2;
    }
    r->n_workers = 1;
    const cmdline_opt opts[] = {CMDLINE_INT("--workers", &r->n_workers, 1, 1024)};
    int rc =
        cmdline_parse("peftps run", run_usage, opts, 1, "experiment file", &r->path, 1, argc, argv);
    if (rc) return rc;
    if (!r->path) {
        fprintf(stderr, "peftps run: no experiment file given\n%s", run_usage);
        return 2;
    }
    if (experiment_load(r->path, r->sets.sets, r->sets.nsets, &r->ex, NULL, &e) < 0) {
        fprintf(stderr, "%s\n", e.msg);
        return 2;
    }
    r->n_servers = (int)r->ex->cluster->n_servers;
    return 0;
}

/* The private endpoints and the argv the children share: program,
 * experiment, the user's --set pairs, the endpoints, then room for
 * --set cluster.metrics_port=P --index I. */
static int run_prepare(run_state *r, err *e) {
    r->servers = calloc((size_t)r->n_servers, sizeof *r->servers);
    r->workers = calloc((size_t)r->n_workers, sizeof *r->workers);
    r->args = calloc((size_t)(2 * r->sets.nsets + 10), sizeof *r->args);
    snprintf(r->tmp, sizeof r->tmp, "/tmp/peftps-run-XXXXXX");
    if (!r->servers || !r->workers || !r->args) return err_set(e, "out of memory");
    if (!mkdtemp(r->tmp)) {
        err_errno(e, "creating %s", r->tmp);
        r->tmp[0] = '\0';
        return -1;
    }
    size_t cap = 64 + (size_t)r->n_servers * (strlen(r->tmp) + 40), k;
    if (!(r->endpoints = malloc(cap))) return err_set(e, "out of memory");
    k = (size_t)snprintf(r->endpoints, cap, "cluster.servers=[");
    for (int i = 0; i < r->n_servers; i++)
        k += (size_t)snprintf(r->endpoints + k, cap - k, "%s\"ipc://%s/server-%d\"", i ? ", " : "",
                              r->tmp, i);
    snprintf(r->endpoints + k, cap - k, "]");
    int na = 1;
    r->args[na++] = (char *)r->path;
    for (int i = 0; i < r->sets.nsets; i++) {
        r->args[na++] = "--set";
        r->args[na++] = r->sets.sets[i];
    }
    r->args[na++] = "--set";
    r->args[na++] = r->endpoints;
    return na;
}

/* Starts the servers, then the workers. On one machine each server i
 * serves /metrics on metrics_port+i; the workers serve none. */
static int run_start(run_state *r, int base, err *e) {
    char dir[4096], server_bin[4200], worker_bin[4200], index[16], mport_set[64];
    if (spawn_self(dir, sizeof dir, 1, e) < 0) return -1;
    snprintf(server_bin, sizeof server_bin, "%s/peftps-server", dir);
    snprintf(worker_bin, sizeof worker_bin, "%s/peftps-worker", dir);
    uint32_t mport = r->ex->cluster->metrics_port;
    char **a = r->args;
    a[0] = server_bin;
    a[base] = "--set";
    a[base + 1] = mport_set;
    for (int i = 0; i < r->n_servers; i++) {
        snprintf(index, sizeof index, "%d", i);
        snprintf(mport_set, sizeof mport_set, "cluster.metrics_port=%u",
                 mport ? mport + (uint32_t)i : 0);
        a[base + 2] = "--index";
        a[base + 3] = index;
        a[base + 4] = NULL;
        if ((r->servers[i] = spawn_start("peftps run", a, 0, e)) < 0) return -1;
        r->servers_left++;
    }
    a[0] = worker_bin;
    snprintf(mport_set, sizeof mport_set, "cluster.metrics_port=0");
    a[base + 2] = NULL;
    for (int i = 0; i < r->n_workers; i++) {
        if ((r->workers[i] = spawn_start("peftps run", a, 1, e)) < 0) return -1;
        r->workers_left++;
    }
    log_info("started %d server(s) and %d worker(s)", r->n_servers, r->n_workers);
    return 0;
}

static void run_stop_all(run_state *r, int sig) {
    spawn_kill(r->servers, r->n_servers, sig);
    spawn_kill(r->workers, r->n_workers, sig);
}

/* A child ended: one server failing ends the run for every process, and so
 * does the last worker leaving. */
static void run_child_exited(run_state *r, pid_t pid, int ws) {
    int code = spawn_code(ws), si = spawn_find(r->servers, r->n_servers, pid);
    int wi = spawn_find(r->workers, r->n_workers, pid);
    char how[96];
    if (si >= 0) {
        r->servers[si] = 0;
        r->servers_left--;
        if (si == 0 || code != 0) r->status = r->status > 0 ? r->status : code;
        if (code == 0) return;
        if (!r->stopping) {
            log_error("server %d (pid %d) %s; stopping the other processes", si, (int)pid,
                      spawn_describe(ws, how, sizeof how));
            r->server_died = 1;
            r->stopping = 1;
        }
        run_stop_all(r, SIGTERM);
    } else if (wi >= 0) {
        r->workers[wi] = 0;
        r->workers_left--;
        if (code != 0 && r->servers_left > 0) {
            r->workers_failed++;
            log_warn("worker %d %s", wi, spawn_describe(ws, how, sizeof how));
        }
        if (r->servers_left > 0 && r->workers_left == 0 && !r->stopping) {
            log_error("every worker has exited; stopping the server");
            r->stopping = 1;
            spawn_kill(r->servers, r->n_servers, SIGTERM);
        }
    }
}

/* Waits for every child: forwards a stop signal to the servers (which
 * checkpoint and tell the workers), and gives the workers a grace period
 * once the servers are done. */
static void run_supervise(run_state *r) {
    double server_done = 0;
    int forwarded = 0;
    while (r->servers_left > 0 || r->workers_left > 0) {
        if (run_signal && !forwarded) {
            spawn_kill(r->servers, r->n_servers, run_signal);
            spawn_kill(r->workers, r->n_workers, SIGTERM);
            forwarded = r->stopping = 1;
        }
        if (r->servers_left == 0 && r->workers_left > 0) {
            double now = progress_now();
            if (server_done == 0) server_done = now;
            if (now - server_done > RUN_WORKER_GRACE_S)
                spawn_kill(r->workers, r->n_workers, SIGKILL);
            else if (now - server_done > RUN_WORKER_GRACE_S / 2)
                spawn_kill(r->workers, r->n_workers, SIGTERM);
        }
        int ws;
        pid_t p = spawn_poll(-1, &ws);
        if (p < 0) break;
        if (p > 0) run_child_exited(r, p, ws);
    }
}

int run_eval(const Peftps__Experiment *ex, err *e) {
    if (!ex->data->eval || !ex->data->eval[0]) return 0;
    trainer *t = NULL;
    metrics m = {0};
    char path[4096];
    snprintf(path, sizeof path, "%s/tensors.safetensors", ex->output_dir);
    metrics_line l = {.kind = METRICS_EVAL, .step = ex->schedule->total_steps};
    int rc = -1;
    if (trainer_open(&t, ex, 0, e) == 0 && peft_load(t->p, path, e) == 0 &&
        trainer_eval(t, &l.loss, &l.loss_tokens, e) == 0) {
        l.num_labels = t->n_labels; /* classification: the counts behind the accuracy */
        l.confusion = t->eval_confusion;
        if (metrics_open(&m, ex->output_dir, METRICS_KEEP_ALL, e) == 0 &&
            metrics_write(&m, &l, e) == 0 && metrics_close(&m, e) == 0)
            rc = 0;
    }
    metrics_close(&m, NULL);
    trainer_close(t);
    return rc;
}

static void run_free(run_state *r) {
    if (r->tmp[0]) {
        char sock[64];
        for (int i = 0; i < r->n_servers; i++) {
            snprintf(sock, sizeof sock, "%s/server-%d", r->tmp, i);
            unlink(sock);
        }
        rmdir(r->tmp);
    }
    free(r->args);
    free(r->endpoints);
    free(r->servers);
    free(r->workers);
    free(r->command);
    config_args_free(&r->sets);
    config_free(r->ex);
}

int cmd_run(int argc, char **argv) {
    run_state r = {.status = -1};
    int rc = run_parse(&r, argc, argv);
    if (rc) {
        run_free(&r);
        return rc == 1 ? 0 : 2;
    }
    err e;
    stopsig sigs;
    stopsig_catch(&sigs, run_on_signal);
    int base = run_prepare(&r, &e);
    if (base < 0 || run_start(&r, base, &e) < 0) {
        fprintf(stderr, "peftps run: %s\n", e.msg);
        r.stopping = 1;
        run_stop_all(&r, SIGTERM);
        r.status = 1;
    }
    run_supervise(&r);
    stopsig_restore(&sigs);
    rc = r.status < 0 ? 1 : r.status;
    if (rc == 0 && r.workers_failed == r.n_workers) rc = 1;
    if (r.server_died)
        fprintf(stderr,
                "peftps run: the run stopped; its checkpoints are in %s: resume with\n  %s\n",
                r.ex->checkpoint->path, r.command ? r.command : "the same command");
    if (rc == 0 && run_eval(r.ex, &e) < 0) {
        fprintf(stderr, "peftps run: evaluating: %s\n", e.msg);
        rc = 1;
    }
    run_free(&r);
    return rc;
}
