/* `peftps run`: a whole cluster on this machine. Starts the parameter
 * server(s) and N workers as child processes (peftps-server and
 * peftps-worker from the directory of this very binary), shows the server's
 * progress line, forwards Ctrl-C, waits, then evaluates the final tensors in
 * process (common/train/train.h) and appends the eval line to metrics.jsonl, so
 * the outputs are those of `peftps train` (cli/cmd_train.c). */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "config/config.h"
#include "train/experiment.h"
#include "base/log.h"
#include "base/progress.h"
#include "base/stopsig.h"
#include "train/train.h"

static const char run_usage[] =
    "usage: peftps run EXPERIMENT.pbtxt [--workers N] [--set PATH=VALUE ...]\n\n"
    "Trains the experiment on a cluster started on this machine: one\n"
    "peftps-server per cluster.servers entry and N peftps-worker processes\n"
    "(default 1), talking over private ipc:// endpoints (the experiment's\n"
    "endpoints are replaced; set them and start the programs yourself to use\n"
    "other machines). Shows the server's progress; Ctrl-C stops everything,\n"
    "after the server checkpointed. Writes what `peftps train` writes under\n"
    "output_dir (metrics.jsonl, tensors.safetensors, experiment.pbtxt), with\n"
    "bit-identical tensors, and resumes from checkpoint.path when a checkpoint\n"
    "of the same experiment is there. Exits with the server's status.\n\n"
    "options:\n"
    "  --workers N        worker processes to start (default 1)\n"
    "  --set PATH=VALUE   override a field, e.g. --set optimizer.lr=3e-4 (repeatable)\n";

/* Seconds the workers get to leave by themselves after the server is done. */
#define RUN_WORKER_GRACE_S 5.0

static volatile sig_atomic_t run_signal;

static void run_on_signal(int sig) {
    run_signal = sig;
}

/* The directory of the running binary, where its sibling programs are. */
static int exe_dir(char *buf, size_t n, err *e) {
    ssize_t k = readlink("/proc/self/exe", buf, n - 1);
    if (k < 0) return err_errno(e, "reading /proc/self/exe");
    buf[k] = '\0';
    char *slash = strrchr(buf, '/');
    if (!slash) return err_set(e, "cannot tell the directory of %s", buf);
    *slash = '\0';
    return 0;
}

static pid_t spawn(char **argv, int quiet, err *e) {
    pid_t pid = fork();
    if (pid < 0) return err_errno(e, "fork");
    if (pid == 0) {
        /* Workers speak only of trouble: the server's progress line is the
         * one a user follows. */
        if (quiet && !getenv("PEFTPS_LOG")) setenv("PEFTPS_LOG", "warn", 1);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        execv(argv[0], argv);
        fprintf(stderr, "peftps run: cannot start %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    return pid;
}

static void kill_all(pid_t *pids, int n, int sig) {
    for (int i = 0; i < n; i++)
        if (pids[i] > 0) kill(pids[i], sig);
}

static int find_pid(const pid_t *pids, int n, pid_t p) {
    for (int i = 0; i < n; i++)
        if (pids[i] == p) return i;
    return -1;
}

/* The eval line of `peftps train`, for the tensors the cluster trained. */
static int run_eval(const Peftps__Experiment *ex, err *e) {
    if (!ex->data->eval || !ex->data->eval[0]) return 0;
    trainer *t = NULL;
    char path[4096];
    snprintf(path, sizeof path, "%s/tensors.safetensors", ex->output_dir);
    if (trainer_open(&t, ex, 0, e) < 0) return -1;
    double loss;
    long ntok;
    int rc = -1;
    if (peft_load(t->p, path, e) < 0 || trainer_eval(t, &loss, &ntok, e) < 0) goto done;
    snprintf(path, sizeof path, "%s/metrics.jsonl", ex->output_dir);
    FILE *f = fopen(path, "a");
    if (!f) {
        err_errno(e, "%s", path);
        goto done;
    }
    fprintf(f, "{\"step\":%llu,\"eval_loss\":%.6f,\"eval_ppl\":%.4f,\"eval_tokens\":%ld}\n",
            (unsigned long long)ex->schedule->total_steps, loss, exp(loss), ntok);
    if (fclose(f) != 0) {
        err_errno(e, "%s", path);
        goto done;
    }
    log_info("step %llu: eval loss %.4f, perplexity %.3f (%ld tokens)",
             (unsigned long long)ex->schedule->total_steps, loss, exp(loss), ntok);
    rc = 0;
done:
    trainer_close(t);
    return rc;
}

int cmd_run(int argc, char **argv) {
    config_args sets;
    err e;
    if (config_parse_args(&argc, argv, &sets, &e) < 0) {
        fprintf(stderr, "peftps run: %s\n%s", e.msg, run_usage);
        return 2;
    }
    long n_workers = 1;
    const char *path = NULL;
    int rc = 2;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(run_usage, stdout);
            config_args_free(&sets);
            return 0;
        }
        if (!strcmp(a, "--workers") || !strncmp(a, "--workers=", 10)) {
            const char *v = a[9] == '=' ? a + 10 : i + 1 < argc ? argv[++i] : "";
            char *end;
            n_workers = strtol(v, &end, 10);
            if (!*v || *end || n_workers < 1 || n_workers > 1024) {
                fprintf(stderr, "peftps run: --workers takes a number from 1 to 1024\n%s",
                        run_usage);
                config_args_free(&sets);
                return 2;
            }
            continue;
        }
        if ((a[0] == '-' && a[1]) || path) {
            fprintf(stderr, "peftps run: unexpected argument '%s'\n%s", a, run_usage);
            config_args_free(&sets);
            return 2;
        }
        path = a;
    }
    if (!path) {
        fprintf(stderr, "peftps run: no experiment file given\n%s", run_usage);
        config_args_free(&sets);
        return 2;
    }
    Peftps__Experiment *ex = NULL;
    if (experiment_load(path, sets.sets, sets.nsets, &ex, NULL, &e) < 0) {
        fprintf(stderr, "%s\n", e.msg);
        config_args_free(&sets);
        return 2;
    }
    int n_servers = (int)ex->cluster->n_servers;
    char dir[4096], tmp[] = "/tmp/peftps-run-XXXXXX";
    char **args = NULL, *endpoints = NULL;
    pid_t *servers = calloc((size_t)n_servers, sizeof *servers);
    pid_t *workers = calloc((size_t)n_workers, sizeof *workers);
    int have_tmp = 0;
    if (!servers || !workers) {
        err_set(&e, "out of memory");
        goto fail;
    }
    if (exe_dir(dir, sizeof dir, &e) < 0) goto fail;
    if (!mkdtemp(tmp)) {
        err_errno(&e, "creating %s", tmp);
        goto fail;
    }
    have_tmp = 1;
    /* --set cluster.servers=["ipc://TMP/server-0", ...] */
    size_t cap = 64 + (size_t)n_servers * (strlen(tmp) + 40);
    endpoints = malloc(cap);
    if (!endpoints) {
        err_set(&e, "out of memory");
        goto fail;
    }
    size_t k = (size_t)snprintf(endpoints, cap, "cluster.servers=[");
    for (int i = 0; i < n_servers; i++)
        k += (size_t)snprintf(endpoints + k, cap - k, "%s\"ipc://%s/server-%d\"", i ? ", " : "",
                              tmp, i);
    snprintf(endpoints + k, cap - k, "]");

    /* argv: program, experiment, the user's --set pairs, ours, --index I. */
    char server_bin[4200], worker_bin[4200], index[16], metrics[64];
    snprintf(server_bin, sizeof server_bin, "%s/peftps-server", dir);
    snprintf(worker_bin, sizeof worker_bin, "%s/peftps-worker", dir);
    args = calloc((size_t)(2 * sets.nsets + 10), sizeof *args);
    if (!args) {
        err_set(&e, "out of memory");
        goto fail;
    }
    int na = 0;
    args[na++] = server_bin;
    args[na++] = (char *)path;
    for (int i = 0; i < sets.nsets; i++) {
        args[na++] = "--set";
        args[na++] = sets.sets[i];
    }
    args[na++] = "--set";
    args[na++] = endpoints;
    int base = na;

    stopsig sigs;
    stopsig_catch(&sigs, run_on_signal);

    /* One machine, one port each: server i serves metrics on metrics_port+i;
     * the workers serve none (scrape the servers, or start workers by hand). */
    uint32_t mport = ex->cluster->metrics_port;
    args[base] = "--set";
    args[base + 1] = metrics;
    for (int i = 0; i < n_servers; i++) {
        snprintf(index, sizeof index, "%d", i);
        snprintf(metrics, sizeof metrics, "cluster.metrics_port=%u",
                 mport ? mport + (uint32_t)i : 0);
        args[base + 2] = "--index";
        args[base + 3] = index;
        args[base + 4] = NULL;
        if ((servers[i] = spawn(args, 0, &e)) < 0) goto stop;
    }
    args[0] = worker_bin;
    snprintf(metrics, sizeof metrics, "cluster.metrics_port=0");
    args[base + 2] = NULL;
    for (long i = 0; i < n_workers; i++)
        if ((workers[i] = spawn(args, 1, &e)) < 0) goto stop;
    log_info("started %d server(s) and %ld worker(s)", n_servers, n_workers);

    int status = -1, servers_left = n_servers, workers_left = (int)n_workers, workers_failed = 0;
    int forwarded = 0;
    double server_done = 0;
    while (servers_left > 0 || workers_left > 0) {
        if (run_signal && !forwarded) {
            /* Servers checkpoint and tell the workers to stop. */
            kill_all(servers, n_servers, run_signal);
            kill_all(workers, (int)n_workers, SIGTERM);
            forwarded = 1;
        }
        if (servers_left == 0 && workers_left > 0) {
            double now = progress_now();
            if (server_done == 0) server_done = now;
            if (now - server_done > RUN_WORKER_GRACE_S)
                kill_all(workers, (int)n_workers, SIGKILL);
            else if (now - server_done > RUN_WORKER_GRACE_S / 2)
                kill_all(workers, (int)n_workers, SIGTERM);
        }
        int ws;
        pid_t p = waitpid(-1, &ws, WNOHANG);
        if (p == 0 || (p < 0 && errno == EINTR)) {
            struct timespec nap = {0, 50 * 1000 * 1000};
            nanosleep(&nap, NULL);
            continue;
        }
        if (p < 0) break;
        int code = WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
        int si = find_pid(servers, n_servers, p), wi = find_pid(workers, (int)n_workers, p);
        if (si >= 0) {
            servers[si] = 0;
            servers_left--;
            if (si == 0 || code != 0) status = status > 0 ? status : code;
            if (code != 0) {
                /* One server failing ends the run for every process. */
                kill_all(servers, n_servers, SIGTERM);
                kill_all(workers, (int)n_workers, SIGTERM);
            }
        } else if (wi >= 0) {
            workers[wi] = 0;
            workers_left--;
            if (code != 0 && servers_left > 0) {
                workers_failed++;
                log_warn("worker %d exited with status %d", wi, code);
            }
            if (servers_left > 0 && workers_left == 0 && !run_signal) {
                log_error("every worker has exited; stopping the server");
                kill_all(servers, n_servers, SIGTERM);
            }
        }
    }
    stopsig_restore(&sigs);
    rc = status < 0 ? 1 : status;
    if (rc == 0 && workers_failed == (int)n_workers) rc = 1;
    if (rc == 0 && run_eval(ex, &e) < 0) {
        fprintf(stderr, "peftps run: evaluating: %s\n", e.msg);
        rc = 1;
    }
    goto done;
stop:
    kill_all(servers, n_servers, SIGTERM);
    kill_all(workers, (int)n_workers, SIGTERM);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) {
    }
    stopsig_restore(&sigs);
fail:
    fprintf(stderr, "peftps run: %s\n", e.msg);
    rc = 1;
done:
    if (have_tmp) {
        char sock[4200];
        for (int i = 0; i < n_servers; i++) {
            snprintf(sock, sizeof sock, "%s/server-%d", tmp, i);
            unlink(sock);
        }
        rmdir(tmp);
    }
    free(args);
    free(endpoints);
    free(servers);
    free(workers);
    config_args_free(&sets);
    config_free(ex);
    return rc;
}
