/* Command lines of the programs (bin/peftps's commands, peftps-server,
 * peftps-worker): the experiment file with its --set overrides, and options
 * that take a value. Messages go to stderr, --help to stdout, each naming
 * the program as the user typed it ("peftps train", "peftps-server"). */
#ifndef PEFTPS_CMDLINE_H
#define PEFTPS_CMDLINE_H

#include "peftps.pb-c.h"

/* An option that takes a value: its name and where the value goes. */
typedef struct cmdline_opt {
    const char *name;
    const char **value;
} cmdline_opt;

/* Loads the experiment a command line names: takes out the --set options,
 * then the one argument that is not an option (the file), and leaves the
 * other options in argv[1 .. *argc-1], in order, each option named in
 * `valued` (a NULL-terminated list, may be NULL) with the argument after it.
 * Returns 0 with *out loaded; 1 when --help or -h printed usage; 2 when it
 * printed an error (bad --set, no file or two, an experiment that does not
 * load), after which the program exits with 2. */
int cmdline_experiment(const char *prog, const char *usage, const char *const *valued, int *argc,
                       char **argv, Peftps__Experiment **out);

/* When argv[*i] is the name of one of the n opts, stores the argument after
 * it in that option's value, moves *i onto it and returns 1; returns 0 when
 * argv[*i] names none of them. When the value is missing, prints "PROG:
 * OPTION needs a value" and then usage (unless NULL) and returns -1. */
int cmdline_take_value(const char *prog, const char *usage, const cmdline_opt *opts, int n,
                       int argc, char **argv, int *i);

#endif
