/* Experiments: reads an Experiment (proto/peftps.proto) from a *.pbtxt file
 * with pbtext.c, applies `--set` overrides, fills defaults and checks
 * meaning, pointing every error at file:line:col. Used by every command that
 * takes an experiment (cli/cmd_*.c); the model checks use model.h. */
#ifndef PEFTPS_CONFIG_H
#define PEFTPS_CONFIG_H

#include "base/err.h"
#include "config/pbtext.h"
#include "peftps.pb-c.h"

/* Loads the experiment at `path`: parses it, applies the nsets overrides
 * "PATH=VALUE" in order (pbtext_set_at syntax, e.g. "optimizer.lr=3e-4"),
 * fills defaults (config_fill_defaults) and checks it (config_check). On
 * success *out is the resolved experiment (free with config_free) and, when
 * locs is not NULL, *locs holds where each field was set (free with
 * pbtext_locs_free), so later errors can point at the file. On failure
 * returns -1 with one line in e: "FILE:LINE:COL: error: ...", "FILE: error:
 * ..." when the offending field is absent from the file, or "--set
 * PATH=VALUE: error: ..." when an override set it. Relative paths inside the
 * experiment (model.path, data.train, ...) are taken relative to the current
 * directory, not to the file. */
int config_load(const char *path, char *const *sets, int nsets, Peftps__Experiment **out,
                pbtext_locs **locs, err *e);

/* Frees an experiment from config_load (everything it owns); NULL is fine. */
void config_free(Peftps__Experiment *exp);

/* Writes every default into exp, so that printing it shows all values the run
 * uses. `path` is the experiment file, for the default name (its base name
 * without .pbtxt). Does not check anything; fails only when out of memory,
 * or when data.format is unset and cannot be told from data.train's ending
 * (.tokens, .txt, .jsonl): that error is located through locs (may be NULL). */
int config_fill_defaults(Peftps__Experiment *exp, const char *path, const pbtext_locs *locs,
                         err *e);

/* Checks a filled experiment: required fields (model.path, a method block,
 * data.train, schedule.total_steps > 0), value ranges, exclusive options,
 * allowed modules, that the files it names exist, and, when
 * model.path/config.json parses, layer and head indices against the model.
 * Returns the first problem found, located through locs as config_load
 * describes; `path` names the file when a field has no location. */
int config_check(const Peftps__Experiment *exp, const char *path, const pbtext_locs *locs, err *e);

/* Lower-case hex SHA-256 of the canonical text of exp with output_dir,
 * cluster and checkpoint left out: equal for every run of the same resolved
 * experiment wherever it runs and whatever it writes to. */
/* The data format a file's name implies (.tokens, .txt, .jsonl), or
 * DATA_FORMAT_UNSPECIFIED when its ending says none: the one rule for the
 * default of data.format and for data files opened without an experiment. */
Peftps__DataFormat config_data_format_of(const char *path);

void config_fingerprint(const Peftps__Experiment *exp, char hex[65]);

/* The `--set PATH=VALUE` options of a command line. */
typedef struct config_args {
    char **sets; /* pointers into argv */
    int nsets;
} config_args;

/* Takes every `--set PATH=VALUE` and `--set=PATH=VALUE` out of argv[1..],
 * keeping the other arguments in order (*argc shrinks) and argv[0]. Stops at
 * "--". Fails when --set has no value or the value has no '='. Free with
 * config_args_free. */
int config_parse_args(int *argc, char **argv, config_args *args, err *e);

/* Frees the list of config_parse_args (not the strings, which are argv's). */
void config_args_free(config_args *args);

#endif
