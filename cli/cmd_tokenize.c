/* `peftps tokenize MODEL_DIR ...`: the model's tokenizer (common/data/tokenizer.h)
 * from the command line: text to ids, ids to text, and a data file into its
 * token cache (common/data/data.h), so that training starts from a ready cache. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "config/cmdline.h"
#include "base/fsutil.h"
#include "data/chat.h"
#include "data/data.h"
#include "model/model.h"
#include "data/tokenizer.h"

static const char usage[] =
    "usage: peftps tokenize MODEL_DIR --text STRING [--no-special]\n"
    "       peftps tokenize MODEL_DIR --decode \"ID ID ...\" [--skip-special]\n"
    "       peftps tokenize MODEL_DIR --data FILE [--seq-len N] [--cache-dir DIR]\n"
    "       peftps tokenize MODEL_DIR --chat FILE.jsonl\n"
    "\n"
    "Uses MODEL_DIR/tokenizer.json (MODEL_DIR may also name the tokenizer.json\n"
    "itself), with BOS/EOS from tokenizer_config.json or config.json beside it.\n"
    "\n"
    "  --text STRING    prints the ids of STRING, space-separated; \"-\" reads\n"
    "                   standard input. The tokenizer's template tokens (Llama 3's\n"
    "                   BOS) are added unless --no-special.\n"
    "  --decode IDS     prints the text of the ids (separated by spaces or commas);\n"
    "                   --skip-special leaves special tokens out.\n"
    "  --data FILE      tokenizes a .txt or .jsonl data file as training reads it\n"
    "                   and writes its token cache (FILE.peftps-cache, or in\n"
    "                   --cache-dir DIR), or finds the cache current; prints the\n"
    "                   records, tokens, tokens with loss and, with --seq-len N,\n"
    "                   the windows of N+1 tokens. Ids are checked against the\n"
    "                   vocab_size of MODEL_DIR/config.json when there is one.\n"
    "  --chat FILE      for each {\"messages\": [...]} record of a JSONL file: the\n"
    "                   text the model's chat template renders (\"== record N\" and\n"
    "                   the text), then one line of id:mask pairs, mask 1 where the\n"
    "                   token trains (the assistant turns and their end-of-turn\n"
    "                   tokens), 0 elsewhere: what training on the file learns.\n"
    "  -h, --help       this help\n"
    "\n"
    "Exits 0, 1 on a failure while working, or 2 with one error line on bad usage\n"
    "or bad input.\n";

static int print_ids(tok *t, const char *text, size_t len, int add_special) {
    int32_t *ids;
    size_t n;
    err e;
    if (tok_encode(t, text, len, add_special, &ids, &n, &e) != 0) {
        fprintf(stderr, "peftps tokenize: %s\n", e.msg);
        return 2;
    }
    for (size_t i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
    printf("\n");
    free(ids);
    return 0;
}

static int print_text(tok *t, const char *list, int skip_special) {
    size_t cap = 16, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    const char *p = list;
    while (ids) {
        while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < INT32_MIN || v > INT32_MAX ||
            (*end && !strchr(" ,\t\n", *end))) {
            fprintf(stderr, "peftps tokenize: --decode: \"%.*s\" is not a token id\n",
                    (int)strcspn(p, " ,\t\n"), p);
            free(ids);
            return 2;
        }
        if (n == cap) {
            int32_t *q = realloc(ids, 2 * cap * sizeof *q);
            if (!q) break;
            ids = q;
            cap *= 2;
        }
        ids[n++] = (int32_t)v;
        p = end;
    }
    if (!ids || *p) {
        free(ids);
        fprintf(stderr, "peftps tokenize: out of memory\n");
        return 1;
    }
    char *text;
    size_t len;
    err e;
    int rc = tok_decode(t, ids, n, skip_special, &text, &len, &e);
    free(ids);
    if (rc != 0) {
        fprintf(stderr, "peftps tokenize: %s\n", e.msg);
        return 2;
    }
    fwrite(text, 1, len, stdout);
    printf("\n");
    free(text);
    return 0;
}

/* --chat: every conversation record rendered, with ids and loss mask. */
static int print_chat(tok *t, const char *model_dir, const char *file) {
    err e;
    chat *c = NULL;
    size_t len = 0;
    char *text = NULL;
    if (fs_read_file(file, 0, &text, &len, &e) < 0) {
        fprintf(stderr, "peftps tokenize: %s\n", e.msg);
        return 2;
    }
    struct stat st;
    char *dir = stat(model_dir, &st) == 0 && S_ISDIR(st.st_mode) ? strdup(model_dir) : NULL;
    if (!dir) {
        const char *slash = strrchr(model_dir, '/');
        dir = slash ? strndup(model_dir, (size_t)(slash - model_dir)) : strdup(".");
    }
    int rc = dir && chat_open(&c, dir, &e) == 0 ? 0 : 2;
    free(dir);
    if (rc) fprintf(stderr, "peftps tokenize: %s\n", e.msg);
    size_t line = 0, records = 0;
    for (char *p = text; !rc && p < text + len;) {
        char *nl = memchr(p, '\n', (size_t)(text + len - p));
        size_t n = nl ? (size_t)(nl - p) : (size_t)(text + len - p);
        line++;
        json_error_t je;
        int blank = strspn(p, " \t\r") >= n; /* the set has no \n: stops at the line end */
        json_t *rec = blank ? NULL : json_loadb(p, n, 0, &je);
        p += n + 1;
        if (blank) continue;
        if (!rec || !json_is_object(rec) || !json_object_get(rec, "messages")) {
            fprintf(stderr, "peftps tokenize: %s:%zu: %s\n", file, line,
                    rec ? "a record needs \"messages\"" : je.text);
            json_decref(rec);
            rc = 2;
            break;
        }
        char *rendered;
        int32_t *ids;
        unsigned char *mask;
        size_t nids;
        if (chat_encode(c, t, json_object_get(rec, "messages"), &rendered, &ids, &mask, &nids,
                        &e)) {
            fprintf(stderr, "peftps tokenize: %s:%zu: %s\n", file, line, e.msg);
            json_decref(rec);
            rc = 2;
            break;
        }
        printf("== record %zu (%s:%zu)\n%s\n", ++records, file, line, rendered);
        for (size_t i = 0; i < nids; i++) printf("%s%d:%d", i ? " " : "", ids[i], mask[i]);
        printf("\n");
        free(rendered);
        free(ids);
        free(mask);
        json_decref(rec);
    }
    chat_free(c);
    free(text);
    return rc;
}

/* The model's vocab_size from MODEL_DIR/config.json; 0 when there is none. */
static int model_vocab_size(const char *model_dir, int *vocab, err *e) {
    struct stat st;
    *vocab = 0;
    if (stat(model_dir, &st) != 0 || !S_ISDIR(st.st_mode)) return 0;
    char path[4096], *text;
    size_t len;
    snprintf(path, sizeof path, "%s/config.json", model_dir);
    if (fs_read_file(path, 0, &text, &len, e) < 0) return errno == ENOENT ? 0 : -1;
    model_config cfg;
    int rc = model_config_parse(&cfg, text, path, e);
    free(text);
    if (rc == 0) *vocab = cfg.vocab_size;
    return rc;
}

/* The tokenizer is opened only when the cache must be built, or when
 * there is no config.json to give the vocabulary size. */
static int tokenize_data(const char *model_dir, const char *file, int seq_len,
                         const char *cache_dir) {
    err e;
    int vocab;
    tok *t = NULL;
    if (model_vocab_size(model_dir, &vocab, &e) != 0 ||
        (vocab == 0 && tok_open(&t, model_dir, &e) != 0)) {
        fprintf(stderr, "peftps tokenize: %s\n", e.msg);
        return 2;
    }
    data_opts o = {.seq_len = seq_len > 0 ? seq_len : 1,
                   .vocab_size = t ? tok_vocab_size(t) : vocab,
                   .tokenizer = t,
                   .tokenizer_path = model_dir,
                   .cache_dir = cache_dir};
    data *d;
    int rc = data_open(&d, file, &o, &e);
    tok_close(t);
    if (rc != 0) {
        fprintf(stderr, "peftps tokenize: %s\n", e.msg);
        return 2;
    }
    const char *cache = data_cache_path(d);
    printf("%s: %llu records, %llu tokens, %llu with loss\n", file,
           (unsigned long long)data_num_records(d), (unsigned long long)data_num_tokens(d),
           (unsigned long long)data_num_loss_tokens(d));
    if (cache)
        printf("cache: %s (%s)\n", cache, data_cache_reused(d) ? "current" : "written");
    else
        printf("cache: none (%s)\n", data_needs_tokenizer(file, o.format)
                                         ? "could not be written"
                                         : "token files need none");
    if (seq_len > 0)
        printf("windows of %d+1 tokens: %llu\n", seq_len, (unsigned long long)data_num_windows(d));
    data_close(d);
    return 0;
}

int cmd_tokenize(int argc, char **argv) {
    const char *model_dir = NULL, *text = NULL, *decode = NULL, *file = NULL, *cache_dir = NULL,
               *chat_file = NULL;
    int add_special = 1, skip_special = 0, seq_len = 0;
    const cmdline_opt opts[] = {CMDLINE_STR("--text", &text),
                                CMDLINE_STR("--decode", &decode),
                                CMDLINE_STR("--data", &file),
                                CMDLINE_STR("--cache-dir", &cache_dir),
                                CMDLINE_INT("--seq-len", &seq_len, 1, INT32_MAX - 1),
                                CMDLINE_SET("--no-special", &add_special, 0),
                                CMDLINE_SET("--skip-special", &skip_special, 1),
                                CMDLINE_STR("--chat", &chat_file)};
    int rc = cmdline_parse("peftps tokenize", usage, opts, 8, "model directory", &model_dir, 1,
                           argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!model_dir || (!!text + !!decode + !!file + !!chat_file) != 1) {
        fprintf(stderr, "peftps tokenize: give a model directory and one of --text, --decode, "
                        "--data, --chat\n");
        fputs(usage, stderr);
        return 2;
    }
    if (file) return tokenize_data(model_dir, file, seq_len, cache_dir);
    tok *t;
    err e;
    if (tok_open(&t, model_dir, &e) != 0) {
        fprintf(stderr, "peftps tokenize: %s\n", e.msg);
        return 2;
    }
    if (text) {
        size_t len = strlen(text);
        char *in = NULL;
        if (!strcmp(text, "-") && fs_read_stream(stdin, 0, &in, &len, &e) < 0) {
            fprintf(stderr, "peftps tokenize: reading standard input: %s\n", e.msg);
            tok_close(t);
            return 1;
        }
        rc = print_ids(t, in ? in : text, len, add_special);
        free(in);
    } else if (chat_file)
        rc = print_chat(t, model_dir, chat_file);
    else
        rc = print_text(t, decode, skip_special);
    tok_close(t);
    return rc;
}
