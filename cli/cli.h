/* The `peftps` front end: one function per command, each in cli/cmd_*.c,
 * dispatched by cli/main.c. Each returns the process exit status: 0 on
 * success, 1 on a failure while working, 2 on bad usage or bad input. */
#ifndef PEFTPS_CLI_H
#define PEFTPS_CLI_H

#include <stddef.h>
#include <stdio.h>

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

#endif
