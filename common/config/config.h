/* Experiments: reads an Experiment (proto/peftps.proto) from a *.pbtxt file
 * with pbtext.c, applies `--set` overrides, fills the defaults and checks the
 * meaning of the blocks every experiment has, pointing every error at
 * file:line:col through a config_checker. The method block and the model's
 * config.json are checked a floor up, through the same checker
 * (train/experiment.h loads a whole experiment). */
#ifndef PEFTPS_CONFIG_H
#define PEFTPS_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"
#include "config/pbtext.h"
#include "peftps.pb-c.h"

/* Parses the experiment at `path` and applies the nsets overrides
 * "PATH=VALUE" in order (pbtext_set_at syntax, e.g. "optimizer.lr=3e-4"),
 * without defaults or checks: train/experiment.h's experiment_load adds
 * those. *out is freed with config_free; *locs (never NULL on success) holds
 * where each field was set, for located errors (free with pbtext_locs_free).
 * On failure returns -1 with one line in e: "FILE:LINE:COL: error: ...",
 * "FILE: error: ..." or "--set PATH=VALUE: error: ...". */
int config_parse(const char *path, char *const *sets, int nsets, Peftps__Experiment **out,
                 pbtext_locs **locs, err *e);

/* config_parse of text (len bytes) instead of a file, with no overrides:
 * `source` names it in errors ("SOURCE:LINE:COL: error: ..."), as a path
 * would (an experiment received over the network, `peftps submit`). */
int config_parse_text(const char *text, size_t len, const char *source, Peftps__Experiment **out,
                      pbtext_locs **locs, err *e);

/* Frees an experiment from config_parse (everything it owns); NULL is fine. */
void config_free(Peftps__Experiment *exp);

/* ---- located errors ---------------------------------------------------------- */

/* Where the errors of one experiment point: its file, and where each field
 * was set (locs may be NULL: every error then names the file). */
typedef struct config_checker {
    const char *path;
    const pbtext_locs *locs;
    err *e;
} config_checker;

/* Sets c->e to "WHERE: error: MSG" and returns -1. WHERE is the position
 * of the first of the '|'-separated `fields` (e.g.
 * "method.lora.r|method.lora") that was set in the file or by a --set, a
 * list element "f[2]" falling back to its list "f"; else (or with fields
 * NULL) the file. */
int config_fail(const config_checker *c, const char *fields, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Every entry of a module list lies in [lo, hi] and appears once; fails
 * naming `field` (e.g. "method.lora.target_modules"), the entry and the
 * allowed modules. */
int config_check_modules(const config_checker *c, const char *field, const Peftps__Module *mods,
                         size_t n, Peftps__Module lo, Peftps__Module hi);

/* Every index of a list is below limit (when limit > 0) and appears once;
 * `what` names an index ("layer", "head") in the message. */
int config_check_indices(const config_checker *c, const char *field, const uint32_t *v, size_t n,
                         long limit, const char *what);

/* ---- defaults ----------------------------------------------------------------- */

/* An optional field left unset takes v. */
#define CONFIG_DEFAULT(msg, field, v)                                                              \
    do {                                                                                           \
        if (!(msg)->has_##field) (msg)->has_##field = 1, (msg)->field = (v);                       \
    } while (0)

/* An enum left out or set to its UNSPECIFIED zero takes v. */
#define CONFIG_DEFAULT_ENUM(msg, field, v)                                                         \
    do {                                                                                           \
        if (!(msg)->has_##field || (msg)->field == 0) (msg)->has_##field = 1, (msg)->field = (v);  \
    } while (0)

/* An empty module list becomes first..last (in enum order); -1 when out of
 * memory. */
int config_default_modules(Peftps__Module **arr, size_t *n, Peftps__Module first,
                           Peftps__Module last);

/* Writes every default of the blocks every experiment has (not the method
 * block: its method fills that, see methods/registry.h) into exp, so that
 * printing it shows all values the run uses. `path` is the experiment file,
 * for the default name (its base name without .pbtxt). Does not check
 * anything; fails only when out of memory, or when data.format is unset and
 * cannot be told from data.train's ending (.tokens, .txt, .jsonl): that
 * error is located through locs (may be NULL). */
int config_fill_defaults(Peftps__Experiment *exp, const char *path, const pbtext_locs *locs,
                         err *e);

/* ---- checks -------------------------------------------------------------------- */

/* The fields every experiment needs, in this order: model.path, a method
 * block (its absence is reported as "a method block is required, " followed
 * by `method_hint`, which names the choices), data.train and
 * schedule.total_steps > 0; fails when defaults were not filled. */
int config_check_required(const config_checker *c, const Peftps__Experiment *exp,
                          const char *method_hint);

/* The values of the blocks every experiment has, on a filled experiment
 * with its required fields: ranges, exclusive options, and that the files
 * it names exist (model.path a directory, data and keys files). The method
 * block and the model's config.json are left to the floors that know them. */
int config_check_values(const config_checker *c, const Peftps__Experiment *exp);

/* The data format a file's name implies (.tokens, .txt, .jsonl), or
 * DATA_FORMAT_UNSPECIFIED when its ending says none: the one rule for the
 * default of data.format and for data files opened without an experiment. */
Peftps__DataFormat config_data_format_of(const char *path);

/* Lower-case hex SHA-256 of the canonical text of exp with output_dir,
 * cluster, checkpoint, model.recompute, schedule.total_steps and the eval
 * settings (data.eval, eval_every, eval_batches) left out: equal for every
 * run of the same resolved experiment wherever it runs, whatever it writes
 * to, however much memory it trades for compute, however long it runs (so
 * that raising total_steps extends a run) and however it is evaluated. */
void config_fingerprint(const Peftps__Experiment *exp, char hex[65]);

/* The number of classes of a sequence_classification task, 0 for causal
 * language modelling (no task block, or causal_lm). */
int config_num_labels(const Peftps__Experiment *exp);

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
