/* Command lines of the programs (cmdline.h), over config.h. */
#include "config/cmdline.h"

#include <stdio.h>
#include <string.h>

#include "config/config.h"

static int is_valued(const char *const *valued, const char *a) {
    for (; valued && *valued; valued++)
        if (!strcmp(*valued, a)) return 1;
    return 0;
}

int cmdline_experiment_args(const char *prog, const char *usage, const char *const *valued,
                            int *argc, char **argv, const char **path, config_args *sets) {
    *path = NULL;
    err e;
    if (config_parse_args(argc, argv, sets, &e) < 0) {
        fprintf(stderr, "%s: %s\n%s", prog, e.msg, usage);
        return 2;
    }
    int n = 0;
    for (int i = 1; i < *argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            return 1;
        }
        if (a[0] == '-' && a[1]) { /* the program's own options, kept in order */
            argv[++n] = argv[i];
            if (is_valued(valued, a) && i + 1 < *argc) argv[++n] = argv[++i];
            continue;
        }
        if (*path) {
            fprintf(stderr, "%s: more than one experiment file ('%s', '%s')\n%s", prog, *path, a,
                    usage);
            return 2;
        }
        *path = a;
    }
    if (!*path) {
        fprintf(stderr, "%s: no experiment file given\n%s", prog, usage);
        return 2;
    }
    *argc = n + 1;
    return 0;
}

int cmdline_parse(const char *prog, const char *usage, const cmdline_opt *opts, int nopts,
                  const cmdline_flag *flags, int nflags, const char *what, const char **positional,
                  int maxpos, int argc, char **argv) {
    int npos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            return 1;
        }
        int k = 0;
        while (k < nopts && strcmp(a, opts[k].name)) k++;
        if (k < nopts) {
            if (i + 1 >= argc) {
                fprintf(stderr, "%s: %s needs a value\n%s", prog, a, usage);
                return 2;
            }
            *opts[k].value = argv[++i];
            continue;
        }
        for (k = 0; k < nflags && strcmp(a, flags[k].name); k++) continue;
        if (k < nflags) {
            *flags[k].set = flags[k].value;
            continue;
        }
        if (a[0] == '-' && a[1]) {
            fprintf(stderr, "%s: unknown option '%s'\n%s", prog, a, usage);
            return 2;
        }
        if (npos == maxpos) {
            if (maxpos == 1)
                fprintf(stderr, "%s: more than one %s ('%s', '%s')\n%s", prog, what, positional[0],
                        a, usage);
            else
                fprintf(stderr, "%s: unexpected argument '%s'\n%s", prog, a, usage);
            return 2;
        }
        positional[npos++] = a;
    }
    return 0;
}
