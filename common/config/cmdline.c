/* Command lines of the programs (cmdline.h), over config.h. */
#include "config/cmdline.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"

/* Stores text as opt's value; -1 after printing why it does not fit. */
static int cmdline_value(const char *prog, const char *usage, const cmdline_opt *o,
                         const char *text) {
    char *end = NULL;
    double v = 0;
    errno = 0;
    if (o->type == CMDLINE_STRING) {
        *(const char **)o->value = text;
        return 0;
    }
    if (o->type == CMDLINE_FLOAT) {
        v = strtod(text, &end);
    } else if (o->type == CMDLINE_UINT) {
        unsigned long long u = strtoull(text, &end, 10);
        v = strchr(text, '-') ? -1 : (double)u;
    } else {
        v = (double)strtoll(text, &end, 10);
    }
    if (end != text && !*end && !errno && v >= o->min && v <= o->max) {
        if (o->type == CMDLINE_FLOAT)
            *(float *)o->value = (float)v;
        else if (o->type == CMDLINE_UINT)
            *(uint64_t *)o->value = strtoull(text, NULL, 10);
        else
            *(int *)o->value = (int)v;
        return 0;
    }
    const char *fmt = o->type == CMDLINE_FLOAT ? "%g" : "%.0f";
    char lo[40], hi[40];
    snprintf(lo, sizeof lo, fmt, o->min);
    snprintf(hi, sizeof hi, fmt, o->max);
    fprintf(stderr, "%s: %s must be a number from %s to %s (not '%s')\n%s", prog, o->name, lo, hi,
            text, usage);
    return -1;
}

/* The option of opts that `a` names ("--x" or "--x=..."), or NULL. */
static const cmdline_opt *cmdline_find(const cmdline_opt *opts, int nopts, const char *a,
                                       const char **inline_value) {
    *inline_value = NULL;
    for (int k = 0; k < nopts; k++) {
        size_t n = strlen(opts[k].name);
        if (strncmp(a, opts[k].name, n)) continue;
        if (!a[n]) return &opts[k];
        if (a[n] == '=' && opts[k].type != CMDLINE_FLAG) {
            *inline_value = a + n + 1;
            return &opts[k];
        }
    }
    return NULL;
}

int cmdline_parse(const char *prog, const char *usage, const cmdline_opt *opts, int nopts,
                  const char *what, const char **positional, int maxpos, int argc, char **argv) {
    int npos = 0, options = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        const cmdline_opt *o = options ? cmdline_find(opts, nopts, a, &v) : NULL;
        if (options && !strcmp(a, "--")) {
            options = 0;
        } else if (options && (!strcmp(a, "--help") || !strcmp(a, "-h"))) {
            fputs(usage, stdout);
            return 1;
        } else if (o && o->type == CMDLINE_FLAG) {
            *(int *)o->value = (int)o->min;
        } else if (o) {
            if (!v && i + 1 >= argc) {
                fprintf(stderr, "%s: %s needs a value\n%s", prog, a, usage);
                return 2;
            }
            if (cmdline_value(prog, usage, o, v ? v : argv[++i]) < 0) return 2;
        } else if (options && a[0] == '-' && a[1]) {
            fprintf(stderr, "%s: unknown option '%s'\n%s", prog, a, usage);
            return 2;
        } else if (npos == maxpos) {
            if (maxpos == 1)
                fprintf(stderr, "%s: more than one %s ('%s', '%s')\n%s", prog, what, positional[0],
                        a, usage);
            else
                fprintf(stderr, "%s: unexpected argument '%s'\n%s", prog, a, usage);
            return 2;
        } else {
            positional[npos++] = a;
        }
    }
    return 0;
}

int cmdline_experiment_args(const char *prog, const char *usage, const cmdline_opt *opts, int nopts,
                            int argc, char **argv, const char **path, config_args *sets) {
    *path = NULL;
    err e;
    if (config_parse_args(&argc, argv, sets, &e) < 0) {
        fprintf(stderr, "%s: %s\n%s", prog, e.msg, usage);
        return 2;
    }
    int rc = cmdline_parse(prog, usage, opts, nopts, "experiment file", path, 1, argc, argv);
    if (rc == 0 && !*path) {
        fprintf(stderr, "%s: no experiment file given\n%s", prog, usage);
        rc = 2;
    }
    return rc;
}
