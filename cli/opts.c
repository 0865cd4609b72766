/* Command-line options shared by the commands (cli.h). */
#include <stdio.h>
#include <string.h>

#include "cli.h"

int cli_opt_take(const char *cmd, const char *usage, const cli_opt *opts, int n, int argc,
                 char **argv, int *i) {
    const char *a = argv[*i];
    for (int k = 0; k < n; k++) {
        if (strcmp(a, opts[k].name)) continue;
        if (*i + 1 >= argc) {
            fprintf(stderr, "peftps %s: %s needs a value\n%s", cmd, a, usage ? usage : "");
            return -1;
        }
        *opts[k].value = argv[++*i];
        return 1;
    }
    return 0;
}
