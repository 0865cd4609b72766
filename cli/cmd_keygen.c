/* `peftps keygen OUT_PREFIX`: a new CURVE key pair for a server or a worker,
 * written by common/net/curve.c as OUT_PREFIX.key (secret) and OUT_PREFIX.pub,
 * the files cluster.curve names. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "config/cmdline.h"
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
    const char *prefix = NULL;
    int rc =
        cmdline_parse("peftps keygen", keygen_usage, NULL, 0, "OUT_PREFIX", &prefix, 1, argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!prefix) {
        fprintf(stderr, "peftps keygen: give one OUT_PREFIX\n%s", keygen_usage);
        return 2;
    }
    err e;
    if (curve_keygen(prefix, &e) < 0) {
        fprintf(stderr, "peftps keygen: %s\n", e.msg);
        return 1;
    }
    printf("wrote %s.key (secret) and %s.pub\n", prefix, prefix);
    return 0;
}
