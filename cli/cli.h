/* The `peftps` front end: one function per command, each in cli/cmd_*.c,
 * dispatched by cli/main.c. Each returns the process exit status: 0 on
 * success, 1 on a failure while working, 2 on bad usage or bad input. */
#ifndef PEFTPS_CLI_H
#define PEFTPS_CLI_H

#include <stddef.h>
#include <stdio.h>

#include "net/poolmsg.h"
#include "peftps.pb-c.h"

/* A command or subcommand: its name, what runs it (argv[0] is the name)
 * and one line for the usage text. */
typedef struct cli_command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} cli_command;

/* Runs the entry of `cmds` named by argv[1]: `-h`, `--help` and `help`
 * print usage to stdout and return 0; no name, or a name not in cmds
 * ("PROG: unknown WHAT 'x'"), print usage to stderr and return 2. */
int cli_dispatch(const char *prog, const char *what, const cli_command *cmds, size_t n,
                 void (*usage)(FILE *out), int argc, char **argv);

/* argv[0] is the command's name ("config" for `peftps config check`). */
int cmd_config(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_keygen(int argc, char **argv);
int cmd_compare(int argc, char **argv);
int cmd_export(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_cache(int argc, char **argv);
int cmd_pool(int argc, char **argv);
int cmd_submit(int argc, char **argv);
int cmd_jobs(int argc, char **argv);
int cmd_cancel(int argc, char **argv);

/* The eval line `peftps train` ends with, for the tensors a cluster (or a
 * pool) trained into ex's output_dir: appended to its metrics.jsonl when
 * the experiment has eval data (cli/cmd_run.c). */
int run_eval(const Peftps__Experiment *ex, err *e);

/* ---- the pool's requests (cli/cmd_pool.c), for the commands that use a pool ---- */

/* Submits the resolved experiment ex (source: its file, for messages) to
 * the pool at ep with weight share (0: the experiment's own). Returns 0 with
 * *reply a Jobs message holding the job (free with poolmsg_free); 2 when the
 * pool refused it; 1 when the pool did not answer; e says why. */
int pool_submit(const char *ep, const Peftps__Experiment *ex, const char *source, double share,
                Peftps__Pool__PoolMessage **reply, err *e);
/* Every job of the pool at ep: as pool_submit, *reply a Jobs message. */
int pool_list(const char *ep, Peftps__Pool__PoolMessage **reply, err *e);
/* The job named id in a Jobs message, or NULL. */
const Peftps__Pool__Job *pool_job_in(const Peftps__Pool__Jobs *js, const char *id);
/* Whether a job is done, failed or cancelled. */
int pool_job_ended(const Peftps__Pool__Job *j);
/* Polls the pool at ep each second until job id ends, with a progress line
 * on stderr unless quiet: 0 when it is done, 1 when it failed, was
 * cancelled or the pool stopped answering (saying so). */
int pool_wait(const char *ep, const char *id, int quiet);

#endif
