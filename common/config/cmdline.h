/* Command lines of the programs (bin/peftps's commands, peftps-server,
 * peftps-worker): the experiment file with its --set overrides, and options
 * that take a value. Messages go to stderr, --help to stdout, each naming
 * the program as the user typed it ("peftps train", "peftps-server"). */
#ifndef PEFTPS_CMDLINE_H
#define PEFTPS_CMDLINE_H

#include "config/config.h"

/* An option that takes a value: its name and where the value goes. */
typedef struct cmdline_opt {
    const char *name;
    const char **value;
} cmdline_opt;

/* Takes apart a command line that names an experiment: takes out the --set
 * options into *sets (free with config_args_free, also after a failure),
 * then the one argument that is not an option (the file, *path), and
 * leaves the other options in argv[1 .. *argc-1], in order, each option
 * named in `valued` (a NULL-terminated list, may be NULL) with the argument
 * after it. Returns 0; 1 when --help or -h printed usage; 2 when it printed
 * an error (bad --set, no file or two), after which the program exits with
 * 2. train/experiment.h's experiment_from_cmdline then loads the file; the
 * rest of the command line is for cmdline_parse with maxpos 0. */
int cmdline_experiment_args(const char *prog, const char *usage, const char *const *valued,
                            int *argc, char **argv, const char **path, config_args *sets);

/* An option without a value: *set = value when it is given. */
typedef struct cmdline_flag {
    const char *name;
    int *set;
    int value;
} cmdline_flag;

/* The options of argv[1 .. argc-1]: --help or -h prints usage to stdout;
 * an option of opts takes the next argument as its value ("needs a value"
 * when there is none); a flag sets its variable; any other option is
 * unknown; the arguments that are no option fill positional[0 .. maxpos-1]
 * in order (the caller sets them NULL first), `what` naming them in the
 * message when there are more ("more than one WHAT" for maxpos 1). Returns
 * 0, 1 after --help, or 2 after printing an error (then usage) to stderr. */
int cmdline_parse(const char *prog, const char *usage, const cmdline_opt *opts, int nopts,
                  const cmdline_flag *flags, int nflags, const char *what, const char **positional,
                  int maxpos, int argc, char **argv);

#endif
