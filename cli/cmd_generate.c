/* `peftps generate MODEL_DIR --prompt TEXT`: samples a continuation from a
 * base model, optionally with a trained adapter, streaming the text as it
 * comes; common/model/generate.h does the work, common/train/export.h opens adapters and
 * common/data/tokenizer.h turns text into ids and back. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "train/ckpt.h"
#include "cli.h"
#include "config/cmdline.h"
#include "config/config.h"
#include "train/export.h"
#include "model/generate.h"
#include "data/textstream.h"
#include "base/log.h"
#include "data/tokenizer.h"

static const char usage[] =
    "usage: peftps generate MODEL_DIR --prompt TEXT [options]\n\n"
    "Continues TEXT with the model in MODEL_DIR (config.json, model.safetensors,\n"
    "tokenizer.json), printing the text as it is generated, until the end-of-sequence\n"
    "token or --max-new-tokens.\n\n"
    "options:\n"
    "  --prompt TEXT          the text to continue; \"-\" reads standard input\n"
    "  --adapter PATH         trained tensors to apply: a PEFT adapter directory (LoRA\n"
    "                         or prefix tuning), the output directory of `peftps train`\n"
    "                         or `peftps run`, a checkpoint directory or a tensors file\n"
    "                         (the last two with --experiment)\n"
    "  --experiment FILE      the experiment that trained the adapter (default: the\n"
    "                         adapter directory's experiment.pbtxt)\n"
    "  --set PATH=VALUE       override a field of that experiment (repeatable)\n"
    "  --step N               with a checkpoint: the step (default: the newest)\n"
    "  --max-new-tokens N     tokens to generate at most (default 128)\n"
    "  --temperature T        sampling temperature; 0 always takes the most likely\n"
    "                         token (greedy) (default 1)\n"
    "  --top-k K              sample among the K most likely tokens; 0: all (default 0)\n"
    "  --top-p P              sample among the most likely tokens whose probabilities\n"
    "                         add up to P (nucleus); 1: all (default 1)\n"
    "  --seed S               the sampling seed: the same seed gives the same text\n"
    "                         (default 0)\n"
    "  --no-kv-cache          recompute the whole sequence for every token instead of\n"
    "                         caching keys and values (slow; a reference)\n"
    "  --no-special           do not add the tokenizer's template tokens (BOS)\n"
    "  -h, --help             this help\n\n"
    "The text goes to standard output; the token count and speed to standard error.\n";

/* Reads standard input whole. */
static char *read_stdin(size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *p = malloc(cap + 1);
    while (p) {
        n += fread(p + n, 1, cap - n, stdin);
        if (n < cap) break;
        char *q = realloc(p, 2 * cap + 1);
        if (!q) {
            free(p);
            return NULL;
        }
        p = q;
        cap *= 2;
    }
    if (!p || ferror(stdin)) {
        free(p);
        return NULL;
    }
    p[n] = '\0';
    *len = n;
    return p;
}

typedef struct printer {
    textstream text;
    err e;
    int failed;
} printer;

/* Prints each token's text as soon as its characters are whole. */
static int print_token(void *ctx, int32_t id) {
    printer *pr = ctx;
    char *piece;
    if (textstream_push(&pr->text, id, &piece, &pr->e) < 0) {
        pr->failed = 1;
        return 1;
    }
    fputs(piece, stdout);
    fflush(stdout);
    free(piece);
    return 0;
}

static int parse_num(const char *opt, const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !(v >= lo && v <= hi)) {
        fprintf(stderr, "peftps generate: %s '%s' must be a number from %g to %g\n", opt, s, lo,
                hi);
        return -1;
    }
    *out = v;
    return 0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int cmd_generate(int argc, char **argv) {
    config_args sets;
    err e;
    if (config_parse_args(&argc, argv, &sets, &e) < 0) {
        fprintf(stderr, "peftps generate: %s\n%s", e.msg, usage);
        return 2;
    }
    const char *model_dir = NULL, *prompt = NULL, *adapter = NULL;
    const char *num_opt[6] = {0};
    static const char *const num_names[6] = {"--max-new-tokens", "--temperature", "--top-k",
                                             "--top-p",          "--seed",        "--step"};
    int use_cache = 1, add_special = 1, rc = 2;
    export_opts xo;
    export_opts_default(&xo);
    xo.sets = sets.sets;
    xo.nsets = sets.nsets;
    generate_opts go;
    generate_opts_default(&go);
    const cmdline_opt opts[] = {
        {"--prompt", &prompt},       {"--adapter", &adapter},     {"--experiment", &xo.experiment},
        {num_names[0], &num_opt[0]}, {num_names[1], &num_opt[1]}, {num_names[2], &num_opt[2]},
        {num_names[3], &num_opt[3]}, {num_names[4], &num_opt[4]}, {num_names[5], &num_opt[5]}};
    const cmdline_flag flags[] = {{"--no-kv-cache", &use_cache, 0},
                                  {"--no-special", &add_special, 0}};
    rc = cmdline_parse("peftps generate", usage, opts, 9, flags, 2, "model directory", &model_dir,
                       1, argc, argv);
    if (rc) {
        rc = rc == 1 ? 0 : 2;
        goto done;
    }
    rc = 2;
    if (!model_dir || !prompt) {
        fprintf(stderr, "peftps generate: %s\n%s",
                !model_dir ? "no MODEL_DIR given" : "--prompt is required", usage);
        goto done;
    }
    double v;
    if (num_opt[0]) {
        if (parse_num("--max-new-tokens", num_opt[0], 0, 1 << 20, &v) < 0) goto done;
        go.max_new_tokens = (int)v;
    }
    if (num_opt[1]) {
        if (parse_num("--temperature", num_opt[1], 0, 1e6, &v) < 0) goto done;
        go.temperature = (float)v;
    }
    if (num_opt[2]) {
        if (parse_num("--top-k", num_opt[2], 0, 1 << 30, &v) < 0) goto done;
        go.top_k = (int)v;
    }
    if (num_opt[3]) {
        if (parse_num("--top-p", num_opt[3], 0, 1, &v) < 0) goto done;
        go.top_p = (float)v;
    }
    if (num_opt[4]) {
        char *end;
        errno = 0;
        go.seed = strtoull(num_opt[4], &end, 10);
        if (end == num_opt[4] || *end || errno || num_opt[4][0] == '-') {
            fprintf(stderr, "peftps generate: --seed '%s' is not a non-negative integer\n",
                    num_opt[4]);
            goto done;
        }
    }
    if (num_opt[5]) {
        char *end;
        errno = 0;
        xo.step = strtoull(num_opt[5], &end, 10);
        if (end == num_opt[5] || *end || errno || num_opt[5][0] == '-') {
            fprintf(stderr, "peftps generate: --step '%s' is not a step number\n", num_opt[5]);
            goto done;
        }
    }

    char *stdin_text = NULL;
    size_t prompt_len = strlen(prompt);
    if (!strcmp(prompt, "-")) {
        if (!(stdin_text = read_stdin(&prompt_len))) {
            fprintf(stderr, "peftps generate: cannot read the prompt from standard input\n");
            goto done;
        }
        prompt = stdin_text;
    }

    tok *t = NULL;
    export_source *src = NULL;
    model_files *files = NULL;
    generator *g = NULL;
    int32_t *ids = NULL, *out = NULL;
    size_t n_ids = 0, n_out = 0;
    printer pr = {.failed = 0};
    if (tok_open(&t, model_dir, &e) < 0 ||
        tok_encode(t, prompt, prompt_len, add_special, &ids, &n_ids, &e) < 0)
        goto fail_input;
    if (n_ids == 0) {
        /* An empty prompt starts from BOS, the model's own beginning. */
        int32_t bos = tok_bos(t);
        if (bos < 0 || !(ids = malloc(sizeof *ids))) {
            err_set(&e, "the prompt is empty and the tokenizer has no BOS token to start from");
            goto fail_input;
        }
        ids[0] = bos;
        n_ids = 1;
    }
    rc = 1;
    peft *p = NULL;
    if (adapter) {
        xo.model_dir = model_dir;
        if (export_open(&src, adapter, &xo, &e) < 0) goto fail;
        files = src->files;
        p = src->p;
        log_info("adapter %s: method %s, %zu trained parameters", adapter, p->method->name,
                 peft_num_trainable(p));
    } else if (model_files_open(&files, model_dir, &e) < 0) {
        goto fail;
    }
    const model_config *cfg = model_files_config(files);
    if (n_ids + (size_t)go.max_new_tokens > (size_t)cfg->max_position_embeddings)
        log_warn("the prompt (%zu tokens) and %d new tokens go past the model's %d positions",
                 n_ids, go.max_new_tokens, cfg->max_position_embeddings);
    if (n_ids + (size_t)go.max_new_tokens > (1u << 30)) {
        err_set(&e, "a prompt of %zu tokens is too long", n_ids);
        goto fail;
    }
    if (generate_open(&g, cfg, model_files_weights(files), p, (int)n_ids + go.max_new_tokens,
                      use_cache, &e) < 0)
        goto fail;
    int32_t stop[2];
    int n_stop = 0;
    if (tok_eos(t) >= 0) stop[n_stop++] = tok_eos(t);
    if (cfg->eos_token_id >= 0 && cfg->eos_token_id != tok_eos(t))
        stop[n_stop++] = cfg->eos_token_id;
    textstream_init(&pr.text, t);
    double t0 = now_s();
    if (generate_run(g, ids, n_ids, &go, stop, n_stop, print_token, &pr, &out, &n_out, &e) < 0)
        goto fail;
    if (pr.failed) {
        e = pr.e;
        goto fail;
    }
    char *rest;
    if (textstream_flush(&pr.text, &rest, &e) < 0) goto fail;
    fputs(rest, stdout);
    free(rest);
    fputc('\n', stdout);
    fflush(stdout);
    double dt = now_s() - t0;
    log_info("%zu prompt tokens, %zu generated in %.2f s (%.1f tokens/s%s)", n_ids, n_out, dt,
             dt > 0 ? (double)n_out / dt : 0.0, use_cache ? "" : ", without the KV cache");
    rc = 0;
    goto cleanup;
fail_input:
    rc = 2;
fail:
    fflush(stdout);
    fprintf(stderr, "peftps generate: %s\n", e.msg);
cleanup:
    textstream_free(&pr.text);
    generate_close(g);
    if (src)
        export_close(src);
    else
        model_files_close(files);
    tok_close(t);
    free(ids);
    free(out);
    free(stdin_text);
done:
    config_args_free(&sets);
    return rc;
}
