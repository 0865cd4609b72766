/* The `peftps` front end: one function per command, each in cli/cmd_*.c,
 * dispatched by cli/main.c. Each returns the process exit status: 0 on
 * success, 1 on a failure while working, 2 on bad usage or bad input. */
#ifndef PEFTPS_CLI_H
#define PEFTPS_CLI_H

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
