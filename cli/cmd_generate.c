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
#include "data/chat.h"
#include "data/textstream.h"
#include "base/fsutil.h"
#include "base/log.h"
#include "data/tokenizer.h"

static const char usage[] =
    "usage: peftps generate MODEL_DIR --prompt TEXT [options]\n\n"
    "Continues TEXT with the model in MODEL_DIR (config.json, model.safetensors,\n"
    "tokenizer.json), printing the text as it is generated, until the end-of-sequence\n"
    "token or --max-new-tokens.\n\n"
    "options:\n"
    "  --prompt TEXT          the text to continue; \"-\" reads standard input\n"
    "  --chat MESSAGE         instead of --prompt: a user message, rendered with the\n"
    "                         model's chat template and its generation prompt\n"
    "  --system TEXT          with --chat: a system message before it\n"
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

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* What the command line asks for. */
typedef struct gen_args {
    const char *model_dir, *prompt, *adapter, *chat_msg, *system_msg;
    size_t prompt_len;
    char *stdin_text; /* the prompt, when read from standard input or rendered */
    int use_cache, add_special;
    config_args sets;
    export_opts xo;
    generate_opts go;
} gen_args;

/* --chat: the conversation [system,] user rendered with the model's chat
 * template and its generation prompt is the prompt; its special tokens are
 * in the text. 0, or 2 after an error. */
static int gen_chat_prompt(gen_args *a) {
    err e;
    chat *c = NULL;
    json_t *msgs = json_array();
    if (a->system_msg)
        json_array_append_new(msgs,
                              json_pack("{ssss}", "role", "system", "content", a->system_msg));
    json_array_append_new(msgs, json_pack("{ssss}", "role", "user", "content", a->chat_msg));
    int rc = chat_open(&c, a->model_dir, &e) ||
             chat_render(c, msgs, 1, &a->stdin_text, &a->prompt_len, &e);
    chat_free(c);
    json_decref(msgs);
    if (rc) {
        fprintf(stderr, "peftps generate: %s\n", e.msg);
        return 2;
    }
    a->prompt = a->stdin_text;
    a->add_special = 0;
    return 0;
}

/* The options into a; 0, 1 after --help, 2 after an error. */
static int gen_parse(gen_args *a, int argc, char **argv) {
    err e;
    if (config_parse_args(&argc, argv, &a->sets, &e) < 0) {
        fprintf(stderr, "peftps generate: %s\n%s", e.msg, usage);
        return 2;
    }
    a->use_cache = a->add_special = 1;
    export_opts_default(&a->xo);
    a->xo.sets = a->sets.sets;
    a->xo.nsets = a->sets.nsets;
    generate_opts_default(&a->go);
    const cmdline_opt opts[] = {CMDLINE_STR("--prompt", &a->prompt),
                                CMDLINE_STR("--adapter", &a->adapter),
                                CMDLINE_STR("--experiment", &a->xo.experiment),
                                CMDLINE_INT("--max-new-tokens", &a->go.max_new_tokens, 0, 1 << 20),
                                CMDLINE_FLOAT("--temperature", &a->go.temperature, 0, 1e6),
                                CMDLINE_INT("--top-k", &a->go.top_k, 0, 1 << 30),
                                CMDLINE_FLOAT("--top-p", &a->go.top_p, 0, 1),
                                CMDLINE_UINT("--seed", &a->go.seed, 0, CMDLINE_UINT_MAX),
                                CMDLINE_UINT("--step", &a->xo.step, 0, CMDLINE_UINT_MAX),
                                CMDLINE_SET("--no-kv-cache", &a->use_cache, 0),
                                CMDLINE_SET("--no-special", &a->add_special, 0),
                                CMDLINE_STR("--chat", &a->chat_msg),
                                CMDLINE_STR("--system", &a->system_msg)};
    int rc = cmdline_parse("peftps generate", usage, opts, 13, "model directory", &a->model_dir, 1,
                           argc, argv);
    if (rc) return rc;
    if (!a->model_dir || !a->prompt == !a->chat_msg || (a->system_msg && !a->chat_msg)) {
        fprintf(stderr, "peftps generate: %s\n%s",
                !a->model_dir                   ? "no MODEL_DIR given"
                : a->prompt && a->chat_msg      ? "--prompt and --chat exclude each other"
                : a->system_msg && !a->chat_msg ? "--system goes with --chat"
                                                : "--prompt is required (or --chat)",
                usage);
        return 2;
    }
    if (a->chat_msg) return gen_chat_prompt(a);
    a->prompt_len = strlen(a->prompt);
    if (!strcmp(a->prompt, "-")) {
        if (fs_read_stream(stdin, 0, &a->stdin_text, &a->prompt_len, &e) < 0) {
            fprintf(stderr, "peftps generate: reading the prompt from standard input: %s\n", e.msg);
            return 2;
        }
        a->prompt = a->stdin_text;
    }
    return 0;
}

/* The prompt's token ids; an empty prompt starts from BOS, the model's own
 * beginning. */
static int gen_prompt_ids(const gen_args *a, tok *t, int32_t **ids, size_t *n, err *e) {
    if (tok_encode(t, a->prompt, a->prompt_len, a->add_special, ids, n, e) < 0) return -1;
    if (*n > 0) return 0;
    int32_t bos = tok_bos(t);
    free(*ids);
    if (bos < 0 || !(*ids = malloc(sizeof **ids)))
        return err_set(e, "the prompt is empty and the tokenizer has no BOS token to start from");
    (*ids)[0] = bos;
    *n = 1;
    return 0;
}

/* The base, with the adapter when one is given (then *src owns the files). */
static int gen_open_model(gen_args *a, export_source **src, model_files **files, peft **p, err *e) {
    if (!a->adapter) return model_files_open(files, a->model_dir, e);
    a->xo.model_dir = a->model_dir;
    if (export_open(src, a->adapter, &a->xo, e) < 0) return -1;
    *files = (*src)->files;
    *p = (*src)->p;
    if ((*p)->num_labels > 0)
        return err_set(e,
                       "%s is a sequence-classification adapter (a score head, no language-model "
                       "head trained): it classifies, it does not generate; use peftps eval",
                       a->adapter);
    log_info("adapter %s: method %s, %zu trained parameters", a->adapter, (*p)->method->name,
             peft_num_trainable(*p));
    return 0;
}

/* Generates after ids, printing the text as it comes, then the speed. */
static int gen_print(const gen_args *a, const model_files *files, peft *p, tok *t,
                     const int32_t *ids, size_t n_ids, err *e) {
    const model_config *cfg = model_files_config(files);
    int max_new = a->go.max_new_tokens;
    if (n_ids + (size_t)max_new > (size_t)cfg->max_position_embeddings)
        log_warn("the prompt (%zu tokens) and %d new tokens go past the model's %d positions",
                 n_ids, max_new, cfg->max_position_embeddings);
    if (n_ids + (size_t)max_new > (1u << 30))
        return err_set(e, "a prompt of %zu tokens is too long", n_ids);
    generator *g = NULL;
    if (generate_open(&g, cfg, model_files_weights(files), p, (int)n_ids + max_new, a->use_cache,
                      e) < 0)
        return -1;
    int32_t stop[2], *out = NULL;
    int n_stop = 0, rc = -1;
    if (tok_eos(t) >= 0) stop[n_stop++] = tok_eos(t);
    if (cfg->eos_token_id >= 0 && cfg->eos_token_id != tok_eos(t))
        stop[n_stop++] = cfg->eos_token_id;
    printer pr = {.failed = 0};
    textstream_init(&pr.text, t);
    size_t n_out = 0;
    char *rest;
    double t0 = now_s();
    if (textstream_prime(&pr.text, ids[n_ids - 1], e) < 0) goto done;
    if (generate_run(g, ids, n_ids, &a->go, stop, n_stop, print_token, &pr, &out, &n_out, e) < 0)
        goto done;
    if (pr.failed) {
        *e = pr.e;
        goto done;
    }
    if (textstream_flush(&pr.text, &rest, e) < 0) goto done;
    printf("%s\n", rest);
    fflush(stdout);
    free(rest);
    double dt = now_s() - t0;
    log_info("%zu prompt tokens, %zu generated in %.2f s (%.1f tokens/s%s)", n_ids, n_out, dt,
             dt > 0 ? (double)n_out / dt : 0.0, a->use_cache ? "" : ", without the KV cache");
    rc = 0;
done:
    textstream_free(&pr.text);
    generate_close(g);
    free(out);
    return rc;
}

int cmd_generate(int argc, char **argv) {
    gen_args a = {0};
    int rc = gen_parse(&a, argc, argv);
    if (rc) {
        free(a.stdin_text);
        config_args_free(&a.sets);
        return rc == 1 ? 0 : 2;
    }
    err e;
    tok *t = NULL;
    export_source *src = NULL;
    model_files *files = NULL;
    peft *p = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    rc = 2; /* the prompt is input */
    if (tok_open(&t, a.model_dir, &e) == 0 && gen_prompt_ids(&a, t, &ids, &n_ids, &e) == 0) {
        rc = 1;
        if (gen_open_model(&a, &src, &files, &p, &e) == 0 &&
            gen_print(&a, files, p, t, ids, n_ids, &e) == 0)
            rc = 0;
    }
    if (rc) {
        fflush(stdout);
        fprintf(stderr, "peftps generate: %s\n", e.msg);
    }
    if (src)
        export_close(src);
    else
        model_files_close(files);
    tok_close(t);
    free(ids);
    free(a.stdin_text);
    config_args_free(&a.sets);
    return rc;
}
