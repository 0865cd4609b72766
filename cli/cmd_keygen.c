/* `peftps keygen OUT_PREFIX`: a new CURVE key pair for a server or a worker,
 * written by common/net/curve.c as OUT_PREFIX.key (secret) and OUT_PREFIX.pub,
 * the files cluster.curve names. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "net/curve.h"

static const char keygen_usage[] =
    "usage: peftps keygen OUT_PREFIX\n\n"
    "Writes a new CURVE key pair: OUT_PREFIX.key (public and secret key, mode\n"
    "0600: keep it on the machine that uses it) and OUT_PREFIX.pub (the public\n"
    "key alone). Existing files are never overwritten. Then, in the experiment:\n"
    "  cluster { curve {\n"
    "    server_keys: \"server.key\"         # on workers, server.pub is enough\n"
    "    worker_keys: \"worker.key\"         # workers only\n"
    "    authorized_keys: \"authorized\"     # server only: the workers' .pub lines\n"
    "  } }\n"
    "e.g. `peftps keygen server && peftps keygen worker && cat worker.pub > authorized`.\n";

int cmd_keygen(int argc, char **argv) {
    if (argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        fputs(keygen_usage, stdout);
        return 0;
    }
    if (argc != 2 || (argv[1][0] == '-' && argv[1][1])) {
        fprintf(stderr, "peftps keygen: give one OUT_PREFIX\n%s", keygen_usage);
        return 2;
    }
    err e;
    if (curve_keygen(argv[1], &e) < 0) {
        fprintf(stderr, "peftps keygen: %s\n", e.msg);
        return 1;
    }
    printf("wrote %s.key (secret) and %s.pub\n", argv[1], argv[1]);
    return 0;
}
