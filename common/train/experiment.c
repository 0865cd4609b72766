/* Loading a whole experiment (experiment.h): config.c parses it and owns the
 * blocks every experiment has, the registry's methods own their block, and
 * the model's config.json (model_config_parse of model.h) bounds data.seq_len
 * and the method's indices; all errors go through config.c's checker. */
#include "train/experiment.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/fsutil.h"
#include "config/cmdline.h"
#include "methods/registry.h"
#include "model/model.h"

int experiment_fill_defaults(Peftps__Experiment *exp, const char *path, const pbtext_locs *locs,
                             err *e) {
    if (config_fill_defaults(exp, path, locs, e) < 0) return -1;
    if (exp->method && methods_fill_defaults(exp->method) < 0)
        return err_set(e, "%s: error: out of memory filling defaults", path);
    return 0;
}

/* data.seq_len and the method block against the model's config.json. */
static int check_model(const config_checker *c, const Peftps__Experiment *exp) {
    char cfg_path[4096];
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", exp->model->path);
    char *text;
    size_t len;
    err re;
    if (fs_read_file(cfg_path, 0, &text, &len, &re) < 0)
        return config_fail(c, "model.path", "model.path \"%s\": cannot read config.json: %s",
                           exp->model->path, strerror(errno));
    model_config mc;
    err me;
    int rc = model_config_parse(&mc, text, cfg_path, &me);
    free(text);
    if (rc) return config_fail(c, "model.path", "model.path: %s", me.msg);
    if (methods_check_model(c, exp->method, &mc)) return -1;
    if (mc.max_position_embeddings > 0 && exp->data->seq_len > (uint32_t)mc.max_position_embeddings)
        return config_fail(c, "data.seq_len",
                           "data.seq_len %u exceeds the model's max_position_embeddings %d",
                           exp->data->seq_len, mc.max_position_embeddings);
    return 0;
}

int experiment_check(const Peftps__Experiment *exp, const char *path, const pbtext_locs *locs,
                     err *e) {
    config_checker c = {path, locs, e};
    char hint[512];
    methods_block_hint(hint, sizeof hint);
    if (config_check_required(&c, exp, hint)) return -1;
    if (methods_check(&c, exp->method) || config_check_values(&c, exp)) return -1;
    return check_model(&c, exp);
}

/* Defaults and checks of a parsed experiment; frees it on failure. */
static int fill_and_check(Peftps__Experiment *exp, pbtext_locs *locs, const char *path,
                          Peftps__Experiment **out, pbtext_locs **locs_out, err *e) {
    if (experiment_fill_defaults(exp, path, locs, e) || experiment_check(exp, path, locs, e)) {
        config_free(exp);
        pbtext_locs_free(locs);
        return -1;
    }
    *out = exp;
    if (locs_out)
        *locs_out = locs;
    else
        pbtext_locs_free(locs);
    return 0;
}

int experiment_load(const char *path, char *const *sets, int nsets, Peftps__Experiment **out,
                    pbtext_locs **locs_out, err *e) {
    *out = NULL;
    if (locs_out) *locs_out = NULL;
    Peftps__Experiment *exp;
    pbtext_locs *locs;
    if (config_parse(path, sets, nsets, &exp, &locs, e) < 0) return -1;
    return fill_and_check(exp, locs, path, out, locs_out, e);
}

int experiment_load_text(const char *text, size_t len, const char *source, Peftps__Experiment **out,
                         pbtext_locs **locs_out, err *e) {
    *out = NULL;
    if (locs_out) *locs_out = NULL;
    Peftps__Experiment *exp;
    pbtext_locs *locs;
    if (config_parse_text(text, len, source, &exp, &locs, e) < 0) return -1;
    return fill_and_check(exp, locs, source, out, locs_out, e);
}

int experiment_from_cmdline(const char *prog, const char *usage, const cmdline_opt *opts, int nopts,
                            int argc, char **argv, Peftps__Experiment **out) {
    *out = NULL;
    const char *path;
    config_args sets = {0};
    int rc = cmdline_experiment_args(prog, usage, opts, nopts, argc, argv, &path, &sets);
    if (rc == 0) {
        err e;
        if (experiment_load(path, sets.sets, sets.nsets, out, NULL, &e) < 0) {
            fprintf(stderr, "%s\n", e.msg);
            rc = 2;
        }
    }
    config_args_free(&sets);
    return rc;
}
