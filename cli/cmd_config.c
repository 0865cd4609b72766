/* `peftps config check FILE.pbtxt [--set PATH=VALUE ...]`: loads an
 * experiment with config.c (defaults, checks, overrides) and prints it
 * resolved in text format (pbtext.c), or the one located error line. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "config/cmdline.h"
#include "config/config.h"
#include "train/experiment.h"
#include "config/pbtext.h"

static const char check_usage[] =
    "usage: peftps config check FILE.pbtxt [--set PATH=VALUE ...]\n"
    "\n"
    "Reads an experiment file (protobuf text format, message peftps.Experiment),\n"
    "applies the --set overrides in order, fills every default and checks it:\n"
    "required fields, value ranges, modules, that the files it names exist, and\n"
    "layer and head indices against model.path/config.json. Prints the resolved\n"
    "experiment to stdout (with its fingerprint as a comment) and exits 0, or\n"
    "prints one error line FILE:LINE:COL: error: ... to stderr and exits 2.\n"
    "\n"
    "options:\n"
    "  --set PATH=VALUE  override one field, e.g. --set optimizer.lr=3e-4,\n"
    "                    --set method.lora.r=16 (selects lora), --set\n"
    "                    method.lora.target_modules=[Q_PROJ,V_PROJ]; repeatable\n"
    "  -h, --help        this help\n"
    "\n"
    "Relative paths in the experiment are taken from the current directory.\n";

static void usage(FILE *out) {
    fputs(check_usage, out);
}

static void stdout_sink(void *ctx, const char *data, size_t n) {
    fwrite(data, 1, n, ctx);
}

static int check(int argc, char **argv) {
    config_args args;
    err e;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--")) break;
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        }
    }
    if (config_parse_args(&argc, argv, &args, &e)) {
        fprintf(stderr, "peftps config check: %s\n", e.msg);
        return 2;
    }
    const char *file = NULL;
    int rc = cmdline_parse("peftps config check", check_usage, NULL, 0, "experiment file", &file, 1,
                           argc, argv);
    if (rc == 0 && !file) {
        fprintf(stderr, "peftps config check: which experiment file?\n%s", check_usage);
        rc = 2;
    }
    if (rc) {
        config_args_free(&args);
        return rc == 1 ? 0 : 2;
    }
    Peftps__Experiment *exp;
    rc = experiment_load(file, args.sets, args.nsets, &exp, NULL, &e);
    config_args_free(&args);
    if (rc) {
        fprintf(stderr, "%s\n", e.msg);
        return 2;
    }
    char fp[65];
    config_fingerprint(exp, fp);
    printf("# %s resolved by `peftps config check`\n# fingerprint: %s\n", file, fp);
    pbtext_write(&exp->base, stdout_sink, stdout);
    config_free(exp);
    if (fflush(stdout) || ferror(stdout)) {
        perror("peftps config check: writing the experiment");
        return 1;
    }
    return 0;
}

int cmd_config(int argc, char **argv) {
    static const cli_command subs[] = {{"check", check, "check an experiment file"}};
    return cli_dispatch("peftps config", "subcommand", subs, 1, usage, argc, argv);
}
