/* `peftps`: the command-line front end. Dispatches to the commands of
 * cli/cmd_*.c (declared in cli.h); each command has its own --help. */
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "base/log.h"

static const cli_command commands[] = {
    {"config", cmd_config, "check an experiment file and print it resolved"},
    {"train", cmd_train, "train an experiment in this process"},
    {"run", cmd_run, "train on a cluster of a server and N workers started on this machine"},
    {"eval", cmd_eval, "loss and perplexity on the eval data, with or without an adapter"},
    {"inspect", cmd_inspect, "list the checkpoints of a checkpoint directory and describe one"},
    {"tokenize", cmd_tokenize,
     "text to ids and back with a model's tokenizer; cache a data file's tokens"},
    {"keygen", cmd_keygen, "write a CURVE key pair for encrypted, authenticated clusters"},
    {"compare", cmd_compare,
     "train several experiments on local clusters and compare cost and loss"},
    {"export", cmd_export,
     "write trained tensors as a PEFT adapter, a merged model or raw tensors"},
    {"generate", cmd_generate, "sample text from a model, with or without a trained adapter"},
    {"cache", cmd_cache, "list or clean the F32 copies of BF16/F16 base weights"},
    {"pool", cmd_pool, "run a pool: workers that train many experiments on one base"},
    {"submit", cmd_submit, "submit an experiment to a pool"},
    {"jobs", cmd_jobs, "list a pool's experiments: state, step, loss, tokens/s, share"},
    {"cancel", cmd_cancel, "cancel an experiment of a pool (it checkpoints and stops)"},
};

static void usage(FILE *out) {
    fprintf(out, "usage: peftps COMMAND [ARGS...]\n\n"
                 "Parameter-efficient fine-tuning of Llama-family models on a pool of machines.\n\n"
                 "commands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(out, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(out, "\n`peftps COMMAND --help` tells more about each.\n");
}

int main(int argc, char **argv) {
    log_init("peftps");
    return cli_dispatch("peftps", "command", commands, sizeof commands / sizeof commands[0], usage,
                        argc, argv);
}
