/* Command lines of the programs (bin/peftps's commands, peftps-server,
 * peftps-worker): the experiment file with its --set overrides (config.h),
 * and typed options (strings, flags, whole numbers and numbers in a range).
 * Messages go to stderr, --help to stdout, each naming the program as the
 * user typed it ("peftps train", "peftps-server"). */
#ifndef PEFTPS_CMDLINE_H
#define PEFTPS_CMDLINE_H

#include <stdint.h>

#include "config/config.h"

typedef enum cmdline_type {
    CMDLINE_STRING, /* value: const char ** */
    CMDLINE_FLAG,   /* value: int *, set to min when the option is given; takes no argument */
    CMDLINE_INT,    /* value: int *, a whole number from min to max */
    CMDLINE_UINT,   /* value: uint64_t *, a whole number from min (>= 0) to max */
    CMDLINE_FLOAT   /* value: float *, a number from min to max */
} cmdline_type;

/* One option: its name ("--workers"), its type and where its value goes. */
typedef struct cmdline_opt {
    const char *name;
    cmdline_type type;
    void *value;
    double min, max;
} cmdline_opt;

#define CMDLINE_STR(n, p)                                                                          \
    { (n), CMDLINE_STRING, (p), 0, 0 }
#define CMDLINE_SET(n, p, v)                                                                       \
    { (n), CMDLINE_FLAG, (p), (v), 0 }
#define CMDLINE_INT(n, p, lo, hi)                                                                  \
    { (n), CMDLINE_INT, (p), (lo), (hi) }
#define CMDLINE_UINT(n, p, lo, hi)                                                                 \
    { (n), CMDLINE_UINT, (p), (lo), (hi) }
#define CMDLINE_FLOAT(n, p, lo, hi)                                                                \
    { (n), CMDLINE_FLOAT, (p), (lo), (hi) }

/* The largest whole number a CMDLINE_UINT takes (steps, seeds): 2^53, up
 * to which every integer is exact in the double a range is kept in. */
#define CMDLINE_UINT_MAX 9007199254740992.0

/* The options of argv[1 .. argc-1]: --help or -h prints usage to stdout;
 * an option of opts with a value takes the next argument (or the part after
 * "=", as in --workers=3) and checks it ("OPTION must be a number from A to
 * B (not 'V')" when out of range or not a number; "needs a value" when
 * there is none); a flag sets its variable; any other option is unknown;
 * after "--" every argument is positional. The positional arguments fill
 * positional[0 .. maxpos-1] in order (the caller sets them NULL first),
 * `what` naming them in the message when there are more ("more than one
 * WHAT" for maxpos 1). Returns 0, 1 after --help, or 2 after printing an
 * error (then usage) to stderr. */
int cmdline_parse(const char *prog, const char *usage, const cmdline_opt *opts, int nopts,
                  const char *what, const char **positional, int maxpos, int argc, char **argv);

/* Takes apart a command line that names one experiment file: takes out the
 * --set options into *sets (free with config_args_free, also after a
 * failure), then parses the rest as cmdline_parse does with the one
 * positional argument the file (*path). Returns 0; 1 when --help or -h
 * printed usage; 2 when it printed an error (bad option or --set, no file or
 * two), after which the program exits with 2. train/experiment.h's
 * experiment_from_cmdline then loads the file. */
int cmdline_experiment_args(const char *prog, const char *usage, const cmdline_opt *opts, int nopts,
                            int argc, char **argv, const char **path, config_args *sets);

#endif
