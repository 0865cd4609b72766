/* cli_dispatch of cli.h: the one way `peftps` and its commands with
 * subcommands (`peftps config check`) pick what to run. */
#include <string.h>

#include "cli.h"

int cli_dispatch(const char *prog, const char *what, const cli_command *cmds, size_t n,
                 void (*usage)(FILE *out), int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < n; i++)
        if (!strcmp(argv[1], cmds[i].name)) return cmds[i].run(argc - 1, argv + 1);
    fprintf(stderr, "%s: unknown %s '%s'\n", prog, what, argv[1]);
    usage(stderr);
    return 2;
}
