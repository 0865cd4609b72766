/* A whole experiment, loaded and checked: config/config.h's parsing, the
 * defaults and checks of the blocks every experiment has, the method
 * block's own through the registry (methods/registry.h), and the checks
 * against the model's config.json (model.h), every error located at its
 * field. Every program and command that takes an experiment loads it here
 * (cli/, server/, worker/); export.c fills one's defaults. */
#ifndef PEFTPS_EXPERIMENT_H
#define PEFTPS_EXPERIMENT_H

#include "base/err.h"
#include "config/cmdline.h"
#include "config/config.h"
#include "config/pbtext.h"
#include "peftps.pb-c.h"

/* Loads the experiment at `path`: parses it, applies the nsets overrides
 * "PATH=VALUE" in order (pbtext_set_at syntax, e.g. "optimizer.lr=3e-4"),
 * fills defaults (experiment_fill_defaults) and checks it
 * (experiment_check). On success *out is the resolved experiment (free with
 * config_free) and, when locs is not NULL, *locs holds where each field was
 * set (free with pbtext_locs_free), so later errors can point at the file.
 * On failure returns -1 with one line in e: "FILE:LINE:COL: error: ...",
 * "FILE: error: ..." when the offending field is absent from the file, or
 * "--set PATH=VALUE: error: ..." when an override set it. Relative paths
 * inside the experiment (model.path, data.train, ...) are taken relative to
 * the current directory, not to the file. */
int experiment_load(const char *path, char *const *sets, int nsets, Peftps__Experiment **out,
                    pbtext_locs **locs, err *e);

/* experiment_load of text (len bytes) instead of a file, with no
 * overrides: `source` stands for the path in errors and in the default
 * name. Relative paths inside are taken relative to the current directory. */
int experiment_load_text(const char *text, size_t len, const char *source, Peftps__Experiment **out,
                         pbtext_locs **locs, err *e);

/* Writes every default into exp: config_fill_defaults, then the method's
 * own for its block. Fails as config_fill_defaults does. */
int experiment_fill_defaults(Peftps__Experiment *exp, const char *path, const pbtext_locs *locs,
                             err *e);

/* Checks a filled experiment: required fields (model.path, a method block,
 * data.train, schedule.total_steps > 0), the method block through its
 * method, value ranges, exclusive options, allowed modules, that the files
 * it names exist, and, when model.path/config.json parses, data.seq_len and
 * the method's layer and head indices against the model. Returns the first
 * problem found, located through locs as experiment_load describes; `path`
 * names the file when a field has no location. */
int experiment_check(const Peftps__Experiment *exp, const char *path, const pbtext_locs *locs,
                     err *e);

/* Loads the experiment a command line names: cmdline_experiment_args
 * (config/cmdline.h) takes out the --set options, parses the program's own
 * options into opts and finds the one file, then experiment_load loads it
 * with the overrides. Returns 0 with *out loaded; 1 when --help or -h
 * printed usage; 2 when it printed an error (bad option or --set, no file or
 * two, an experiment that does not load), after which the program exits
 * with 2. */
int experiment_from_cmdline(const char *prog, const char *usage, const cmdline_opt *opts, int nopts,
                            int argc, char **argv, Peftps__Experiment **out);

#endif
