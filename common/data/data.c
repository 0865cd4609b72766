/* Token streams cut into windows, with loss masks; the (step, shard) ->
 * sequence map of data-parallel training. See data.h. Text formats are
 * tokenized with tokenizer.h and cached (SHA-256 keys from base/hash.h); works
 * with the generated Peftps__DataFormat of proto/peftps.proto. */
#include "data/data.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/hash.h"
#include "base/log.h"
#include "config/config.h"
#include "data/chat.h"
#include "data/tokenizer.h"
#include "model/clshead.h"

struct data {
    char *path; /* for messages */
    void *map;  /* the mapped file (.tokens or cache), or NULL */
    size_t map_size;
    void *owned;               /* tokens kept in memory when the cache could not be written */
    const unsigned char *ids;  /* n_tokens little-endian uint32 */
    const unsigned char *mask; /* n_tokens bytes, 1 = target; NULL: all */
    uint64_t n_tokens, n_windows, n_loss, n_records;
    char *cache_path;
    int cache_reused;
    int seq_len;
    int n_labels; /* classification: each window is a record, its last id the class */
};

/* Token i of the stream, whatever the host's byte order. */
static uint32_t token_at(const data *d, uint64_t i) {
    const unsigned char *p = d->ids + 4 * i;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int resolve_format(const char *path, Peftps__DataFormat f, Peftps__DataFormat *out, err *e) {
    if (f == PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED) {
        f = config_data_format_of(path);
        if (f == PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED)
            return err_set(e,
                           "%s: cannot tell the data format from the name (expected .tokens, "
                           ".txt or .jsonl); set data.format",
                           path);
    }
    switch (f) {
    case PEFTPS__DATA_FORMAT__TOKENS:
    case PEFTPS__DATA_FORMAT__TEXT:
    case PEFTPS__DATA_FORMAT__JSONL:
        *out = f;
        return 0;
    default:
        return err_set(e, "%s: unknown data format %d", path, (int)f);
    }
}

int data_needs_tokenizer(const char *path, Peftps__DataFormat format) {
    Peftps__DataFormat f = PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED;
    return resolve_format(path, format, &f, NULL) == 0 && f != PEFTPS__DATA_FORMAT__TOKENS;
}

/* Maps a whole regular file read-only. An empty file maps to nothing. */
static int map_file(const char *path, void **map, size_t *size, err *e) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_errno(e, "cannot open %s", path);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        err_errno(e, "cannot stat %s", path);
        close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return err_set(e, "%s: not a regular file", path);
    }
    *size = (size_t)st.st_size;
    *map = NULL;
    if (*size > 0) {
        void *m = mmap(NULL, *size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            err_errno(e, "cannot map %s", path);
            close(fd);
            return -1;
        }
        *map = m;
    }
    close(fd); /* the mapping keeps the file */
    return 0;
}

/* Windows, and every id below vocab_size: checked once here, so that
 * reading batches cannot fail and a bad file is refused before any step. */
static int check_stream(data *d, const data_opts *o, int bytes_offsets, err *e) {
    const uint64_t need = (uint64_t)o->seq_len + 1;
    if (d->n_tokens < need)
        return err_set(e,
                       "%s: holds %llu tokens, fewer than one sequence of seq_len+1 = %llu "
                       "tokens",
                       d->path, (unsigned long long)d->n_tokens, (unsigned long long)need);
    d->n_windows = d->n_tokens / need;
    for (uint64_t i = 0; i < d->n_tokens; i++) {
        uint32_t id = token_at(d, i);
        if (d->n_labels && i % need == need - 1) {
            if (id < (uint32_t)d->n_labels) continue;
            return err_set(e, "%s: record %llu has class %u, not below the %d labels", d->path,
                           (unsigned long long)(i / need), id, d->n_labels);
        }
        if (id < (uint32_t)o->vocab_size) continue;
        if (bytes_offsets)
            return err_set(e,
                           "%s: token %llu (byte offset %llu) is %u, not below the vocabulary "
                           "size %d",
                           d->path, (unsigned long long)i, (unsigned long long)(4 * i), id,
                           o->vocab_size);
        return err_set(e,
                       "%s: token %llu is %u, not below the model's vocabulary size %d: the "
                       "tokenizer does not belong to this model",
                       d->path, (unsigned long long)i, id, o->vocab_size);
    }
    return 0;
}

/* Maps a .tokens file and checks its size and every id. */
static int open_tokens(data *d, const char *path, const data_opts *o, err *e) {
    if (map_file(path, &d->map, &d->map_size, e)) return -1;
    if (d->map_size % 4 != 0)
        return err_set(e,
                       "%s: size %llu bytes is not a multiple of 4: not a file of uint32 token "
                       "ids",
                       path, (unsigned long long)d->map_size);
    d->ids = d->map;
    d->n_tokens = d->map_size / 4;
    d->n_loss = d->n_tokens;
    return check_stream(d, o, 1, e);
}

/* ---- tokenized formats -------------------------------------------------- */

/* A stream being built: ids as little-endian bytes, and the mask. */
typedef struct {
    unsigned char *ids, *mask;
    size_t n, cap;
    uint64_t n_loss, n_records;
    const data_opts *cls; /* classification: the labels, seq_len, pad_id; else NULL */
    uint64_t n_cut;       /* classification records cut to seq_len */
} stream;

static int stream_add(stream *s, const int32_t *ids, size_t n, int target) {
    if (s->n + n > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->n + n) cap *= 2;
        unsigned char *a = realloc(s->ids, 4 * cap), *m = a ? realloc(s->mask, cap) : NULL;
        if (a) s->ids = a;
        if (!m) return -1;
        s->mask = m;
        s->cap = cap;
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)ids[i];
        unsigned char *p = s->ids + 4 * (s->n + i);
        p[0] = (unsigned char)v;
        p[1] = (unsigned char)(v >> 8);
        p[2] = (unsigned char)(v >> 16);
        p[3] = (unsigned char)(v >> 24);
        s->mask[s->n + i] = (unsigned char)target;
    }
    s->n += n;
    if (target) s->n_loss += n;
    return 0;
}

/* Encodes text (no template) into the stream with one mask value. */
static int stream_text(stream *s, tok *t, const char *text, size_t len, int target, err *e) {
    int32_t *ids;
    size_t n;
    if (tok_encode(t, text, len, 0, &ids, &n, e)) return -1;
    int rc = stream_add(s, ids, n, target);
    free(ids);
    return rc ? err_set(e, "out of memory") : 0;
}

/* One record: the template's leading tokens (no loss: nothing predicts a
 * BOS), the prompt (no loss) if any, the text (loss), the template's
 * trailing tokens and EOS (loss: the model learns to stop). EOS is not
 * repeated when the template already ends with it. text_name, when not
 * NULL, names the text in messages ("text", "completion"). */
static int stream_record(stream *s, tok *t, const char *prompt, size_t plen, const char *text,
                         size_t tlen, const char *text_name, err *e) {
    const int32_t *pre, *post;
    size_t npre, npost;
    tok_template(t, &pre, &npre, &post, &npost);
    int32_t eos = tok_eos(t);
    if (stream_add(s, pre, npre, 0)) return err_set(e, "out of memory");
    if (prompt && stream_text(s, t, prompt, plen, 0, e)) return err_wrap(e, "\"prompt\"");
    if (stream_text(s, t, text, tlen, 1, e))
        return text_name ? err_wrap(e, "\"%s\"", text_name) : -1;
    if (stream_add(s, post, npost, 1)) return err_set(e, "out of memory");
    if ((npost == 0 || post[npost - 1] != eos) && stream_add(s, &eos, 1, 1))
        return err_set(e, "out of memory");
    s->n_records++;
    return 0;
}

static const char *json_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "a list";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    default:
        return "null";
    }
}

/* A string field of a record, or NULL with e set (naming the key) when it
 * is there but not a string. *present tells whether the key is there. */
static const char *record_string(const json_t *rec, const char *key, size_t *len, int *present,
                                 err *e) {
    const json_t *v = json_object_get(rec, key);
    *present = v != NULL;
    if (!v) return NULL;
    if (!json_is_string(v)) {
        err_set(e, "\"%s\" is %s, not a string", key, json_type_name(v));
        return NULL;
    }
    *len = json_string_length(v);
    return json_string_value(v);
}

/* The class index of a record's "label": a name of the task, or an index. */
static int record_label(const json_t *rec, const data_opts *o, int *label, err *e) {
    const json_t *v = json_object_get(rec, "label");
    if (!v) return err_set(e, "a classification record needs \"label\" (a class name or index)");
    if (json_is_integer(v)) {
        json_int_t i = json_integer_value(v);
        if (i < 0 || i >= o->n_labels)
            return err_set(e, "\"label\" %lld is not a class index (0 to %d)", (long long)i,
                           o->n_labels - 1);
        *label = (int)i;
        return 0;
    }
    if (!json_is_string(v))
        return err_set(e, "\"label\" is %s, not a class name or index", json_type_name(v));
    const char *name = json_string_value(v);
    for (int i = 0; i < o->n_labels; i++)
        if (!strcmp(name, o->labels[i])) {
            *label = i;
            return 0;
        }
    char list[512];
    size_t n = 0;
    list[0] = '\0';
    for (int i = 0; i < o->n_labels && n < sizeof list - 8; i++)
        n += (size_t)snprintf(list + n, sizeof list - n, "%s%s", i ? ", " : "", o->labels[i]);
    if (n >= sizeof list - 8) snprintf(list + sizeof list - 8, 8, ", ...");
    return err_set(e, "\"label\" \"%s\" is not one of the task's labels (%s)", name, list);
}

/* A classification record: one window of seq_len tokens, padded, with the
 * mask at the pooled position, then the class index. */
static int cls_record(stream *s, tok *t, const json_t *rec, err *e) {
    const data_opts *o = s->cls;
    size_t tl = 0;
    int has_t, label = 0;
    const char *text = record_string(rec, "text", &tl, &has_t, e);
    if (has_t && !text) return -1;
    if (!has_t) return err_set(e, "a classification record needs \"text\" and \"label\"");
    if (tl == 0) return err_set(e, "\"text\" is empty");
    if (record_label(rec, o, &label, e)) return -1;
    const int32_t *pre, *post;
    size_t npre, npost, n;
    tok_template(t, &pre, &npre, &post, &npost);
    int32_t *ids;
    if (tok_encode(t, text, tl, 0, &ids, &n, e)) return err_wrap(e, "\"text\"");
    size_t T = (size_t)o->seq_len, all = npre + n + npost;
    int32_t *row = malloc(T * sizeof *row);
    unsigned char *mask = calloc(T, 1);
    if (!row || !mask) {
        free(ids);
        free(row);
        free(mask);
        return err_set(e, "out of memory");
    }
    /* As a tokenizer with truncation to seq_len: the first T tokens. */
    for (size_t i = 0; i < T; i++)
        row[i] = i < npre       ? pre[i]
                 : i < npre + n ? ids[i - npre]
                 : i < all      ? post[i - npre - n]
                                : o->pad_id;
    free(ids);
    if (all > T) s->n_cut++;
    mask[clshead_last_token(row, (int)T, o->pad_id)] = 1;
    int rc = 0;
    for (size_t i = 0; i < T && !rc; i++) rc = stream_add(s, row + i, 1, mask[i]);
    int32_t cls = label;
    if (!rc) rc = stream_add(s, &cls, 1, 0);
    free(row);
    free(mask);
    if (rc) return err_set(e, "out of memory");
    s->n_records++;
    return 0;
}

/* The chat template of the tokenizer's model directory, opened at the first
 * conversation record. */
typedef struct {
    tok *t;
    chat *c;
} jsonl_ctx;

/* A conversation record: rendered with the chat template, the loss on the
 * assistant turns (chat_encode). */
static int stream_chat(stream *s, jsonl_ctx *x, const json_t *messages, err *e) {
    if (!x->c) {
        const char *p = tok_path(x->t);
        const char *slash = strrchr(p, '/');
        char *dir = slash ? strndup(p, (size_t)(slash - p) + (slash == p)) : strdup(".");
        int rc = dir ? chat_open(&x->c, dir, e) : err_set(e, "out of memory");
        free(dir);
        if (rc) return -1;
    }
    int32_t *ids;
    unsigned char *mask;
    size_t n;
    if (chat_encode(x->c, x->t, messages, NULL, &ids, &mask, &n, e)) return -1;
    int rc = 0;
    for (size_t i = 0; i < n && !rc;) {
        size_t j = i;
        while (j < n && mask[j] == mask[i]) j++;
        rc = stream_add(s, ids + i, j - i, mask[i]);
        i = j;
    }
    free(ids);
    free(mask);
    if (rc) return err_set(e, "out of memory");
    s->n_records++;
    return 0;
}

/* One JSONL line: checks its shape and adds its record. */
static int jsonl_line(stream *s, jsonl_ctx *x, const char *line, size_t len, err *e) {
    tok *t = x->t;
    json_error_t je;
    json_t *rec = json_loadb(line, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &je);
    if (!rec) return err_set(e, "invalid JSON at column %d: %s", je.column, je.text);
    int rc = -1;
    if (s->cls && json_is_object(rec)) {
        rc = cls_record(s, t, rec, e);
        goto done;
    }
    size_t tl = 0, pl = 0, cl = 0;
    int has_t, has_p, has_c;
    const char *text, *prompt, *completion;
    if (!json_is_object(rec)) {
        err_set(e, "a record is a JSON object, this line holds %s", json_type_name(rec));
        goto done;
    }
    const json_t *messages = json_object_get(rec, "messages");
    if (messages) {
        if (json_object_get(rec, "text") || json_object_get(rec, "prompt") ||
            json_object_get(rec, "completion"))
            err_set(e, "a record has \"messages\" or \"text\" or \"prompt\"/\"completion\", "
                       "one of them");
        else
            rc = stream_chat(s, x, messages, e);
        goto done;
    }
    text = record_string(rec, "text", &tl, &has_t, e);
    if (has_t && !text) goto done;
    prompt = record_string(rec, "prompt", &pl, &has_p, e);
    if (has_p && !prompt) goto done;
    completion = record_string(rec, "completion", &cl, &has_c, e);
    if (has_c && !completion) goto done;
    if (has_t && (has_p || has_c)) {
        err_set(e, "a record has \"text\" or \"prompt\"/\"completion\", not both");
        goto done;
    }
    if (!has_t && !(has_p && has_c)) {
        err_set(e, "%s",
                has_p   ? "\"prompt\" without \"completion\""
                : has_c ? "\"completion\" without \"prompt\""
                        : "a record needs \"text\", \"prompt\" and \"completion\", or "
                          "\"messages\"");
        goto done;
    }
    if (has_t ? tl == 0 : cl == 0) {
        err_set(e, "\"%s\" is empty", has_t ? "text" : "completion");
        goto done;
    }
    rc = has_t ? stream_record(s, t, NULL, 0, text, tl, "text", e)
               : stream_record(s, t, prompt, pl, completion, cl, "completion", e);
done:
    json_decref(rec);
    return rc;
}

static int is_blank(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r') return 0;
    return 1;
}

static int tokenize_jsonl(stream *s, tok *t, const char *path, const char *text, size_t n, err *e) {
    size_t line = 0;
    jsonl_ctx x = {.t = t};
    for (size_t i = 0; i < n;) {
        const char *nl = memchr(text + i, '\n', n - i);
        size_t end = nl ? (size_t)(nl - text) : n;
        line++;
        if (!is_blank(text + i, end - i) && jsonl_line(s, &x, text + i, end - i, e)) {
            chat_free(x.c);
            return err_wrap(e, "%s:%zu", path, line);
        }
        i = end + 1;
    }
    chat_free(x.c);
    if (s->n_records == 0) return err_set(e, "%s: holds no record", path);
    return 0;
}

/* The cache file, little-endian: a 192-byte header (magic "PEFTPSTK",
 * version at byte 8, format at 12, the source's SHA-256 in hex at 16, the
 * tokenizer fingerprint in hex at 80, then tokens, records and loss tokens
 * as uint64 at 144, 152, 160; zeros to the end), the ids as uint32, the mask
 * as one byte per token. The version changes whenever the way records
 * become tokens does, so that older caches are rebuilt. */
#define CACHE_MAGIC "PEFTPSTK"
#define CACHE_VERSION 1
#define CACHE_HEADER 192

typedef struct {
    char source_sha[65], tok_fp[65];
    uint32_t format;
} cache_key;

static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void cache_header(unsigned char h[CACHE_HEADER], const cache_key *k, const stream *s) {
    memset(h, 0, CACHE_HEADER);
    memcpy(h, CACHE_MAGIC, 8);
    h[8] = CACHE_VERSION;
    h[12] = (unsigned char)k->format;
    memcpy(h + 16, k->source_sha, 64);
    memcpy(h + 80, k->tok_fp, 64);
    put_u64(h + 144, s->n);
    put_u64(h + 152, s->n_records);
    put_u64(h + 160, s->n_loss);
}

/* Uses the cache when it exists and its header matches key (sets
 * cache_reused); otherwise leaves d alone, to be rebuilt. */
static void cache_load(data *d, const cache_key *k) {
    void *map;
    size_t size;
    err ignored;
    if (access(d->cache_path, F_OK) != 0) return;
    if (map_file(d->cache_path, &map, &size, &ignored)) {
        log_warn("%s: cannot read the token cache (%s); rebuilding it", d->path, ignored.msg);
        return;
    }
    const unsigned char *h = map;
    unsigned char want[CACHE_HEADER];
    stream probe = {0};
    int ok = size >= CACHE_HEADER;
    if (ok) {
        probe.n = (size_t)get_u64(h + 144);
        probe.n_records = get_u64(h + 152);
        probe.n_loss = get_u64(h + 160);
        cache_header(want, k, &probe);
        ok = !memcmp(h, want, CACHE_HEADER) && probe.n <= (size - CACHE_HEADER) / 5 &&
             size == CACHE_HEADER + 5 * probe.n;
    }
    if (!ok) {
        if (map) munmap(map, size);
        log_info("%s: token cache %s is stale; rebuilding it", d->path, d->cache_path);
        return;
    }
    d->map = map;
    d->map_size = size;
    d->ids = h + CACHE_HEADER;
    d->mask = d->ids + 4 * probe.n;
    d->n_tokens = probe.n;
    d->n_records = probe.n_records;
    d->n_loss = probe.n_loss;
    d->cache_reused = 1;
}

/* Writes the cache beside a temporary name and renames it into place, so
 * that a reader never sees half a file and two writers do not mix. */
static int cache_write(const data *d, const cache_key *k, const stream *s, err *e) {
    size_t n = strlen(d->cache_path) + 32;
    char *tmp = malloc(n);
    if (!tmp) return err_set(e, "out of memory");
    snprintf(tmp, n, "%s.tmp.%ld", d->cache_path, (long)getpid());
    unsigned char h[CACHE_HEADER];
    cache_header(h, k, s);
    FILE *f = fopen(tmp, "wb");
    int rc = 0;
    if (!f)
        rc = err_errno(e, "cannot create %s", tmp);
    else {
        if (fwrite(h, 1, CACHE_HEADER, f) != CACHE_HEADER || fwrite(s->ids, 4, s->n, f) != s->n ||
            fwrite(s->mask, 1, s->n, f) != s->n)
            rc = err_errno(e, "cannot write %s", tmp);
        if (fclose(f) != 0 && !rc) rc = err_errno(e, "cannot write %s", tmp);
        if (!rc && rename(tmp, d->cache_path) != 0)
            rc = err_errno(e, "cannot rename %s to %s", tmp, d->cache_path);
        if (rc) unlink(tmp);
    }
    free(tmp);
    return rc;
}

static char *cache_path_for(const char *path, const char *dir) {
    const char *base = dir ? strrchr(path, '/') : NULL;
    base = base ? base + 1 : path;
    size_t n = (dir ? strlen(dir) + 1 : 0) + strlen(base) + sizeof ".peftps-cache";
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s%s%s.peftps-cache", dir ? dir : "", dir ? "/" : "", base);
    return p;
}

/* TEXT and JSONL: the cache when valid, else tokenize and write it. */
static int open_text(data *d, const char *path, Peftps__DataFormat format, const data_opts *o,
                     err *e) {
    if (!o->tokenizer && !o->tokenizer_path)
        return err_set(e,
                       "%s: %s data needs a tokenizer (the model directory's tokenizer.json); "
                       "none was given",
                       path, format == PEFTPS__DATA_FORMAT__TEXT ? "TEXT" : "JSONL");
    cache_key k = {.format = (uint32_t)format};
    if (o->tokenizer)
        snprintf(k.tok_fp, sizeof k.tok_fp, "%s", tok_fingerprint(o->tokenizer));
    else if (tok_fingerprint_path(o->tokenizer_path, k.tok_fp, e))
        return err_wrap(e, "%s: tokenizer", path);
    if (o->n_labels > 0) {
        if (format != PEFTPS__DATA_FORMAT__JSONL)
            return err_set(e,
                           "%s: sequence classification reads JSONL records {\"text\": ..., "
                           "\"label\": ...}, not TEXT",
                           path);
        /* Records are padded to seq_len and labelled by index: the cache of
         * one task is not another's, nor a language model's. */
        hash_sha256 c;
        uint8_t dg[32];
        char num[64];
        hash_sha256_init(&c);
        hash_sha256_update(&c, k.tok_fp, strlen(k.tok_fp));
        snprintf(num, sizeof num, "|classify|%d|%d|", o->seq_len, o->pad_id);
        hash_sha256_update(&c, num, strlen(num));
        for (int i = 0; i < o->n_labels; i++)
            hash_sha256_update(&c, o->labels[i], strlen(o->labels[i]) + 1);
        hash_sha256_final(&c, dg);
        hash_hex(dg, k.tok_fp);
    }
    void *src;
    size_t len;
    if (map_file(path, &src, &len, e)) return -1;
    hash_sha256_hex_of(src, len, k.source_sha);
    d->cache_path = cache_path_for(path, o->cache_dir);
    if (!d->cache_path) {
        if (src) munmap(src, len);
        return err_set(e, "out of memory");
    }
    cache_load(d, &k);
    if (d->cache_reused) {
        if (src) munmap(src, len);
        return check_stream(d, o, 0, e);
    }
    if (len == 0) return err_set(e, "%s: is empty", path);

    tok *t = o->tokenizer;
    if (!t && tok_open(&t, o->tokenizer_path, e)) {
        if (src) munmap(src, len);
        return err_wrap(e, "%s: tokenizer", path);
    }
    stream s = {.cls = o->n_labels > 0 ? o : NULL};
    int rc = 0;
    if (tok_eos(t) < 0)
        rc = err_set(e,
                     "%s: the tokenizer %s has no EOS token (eos_token in "
                     "tokenizer_config.json or eos_token_id in config.json), which ends every "
                     "record",
                     path, tok_path(t));
    else if (format == PEFTPS__DATA_FORMAT__JSONL)
        rc = tokenize_jsonl(&s, t, path, src, len, e);
    else if (stream_record(&s, t, NULL, 0, src, len, NULL, e))
        rc = err_wrap(e, "%s", path);
    if (src) munmap(src, len);
    if (t != o->tokenizer) tok_close(t);
    if (rc) {
        free(s.ids);
        free(s.mask);
        return -1;
    }
    log_info("%s: %llu records, %llu tokens; writing the token cache %s", path,
             (unsigned long long)s.n_records, (unsigned long long)s.n, d->cache_path);
    if (s.n_cut)
        log_warn("%s: %llu of %llu records are longer than seq_len %d tokens and were cut to it",
                 path, (unsigned long long)s.n_cut, (unsigned long long)s.n_records, o->seq_len);
    err we;
    if (cache_write(d, &k, &s, &we) == 0) {
        free(s.ids);
        free(s.mask);
        cache_load(d, &k);
        if (!d->cache_reused)
            return err_set(e, "%s: cannot read back the token cache %s", path, d->cache_path);
        d->cache_reused = 0;
        return check_stream(d, o, 0, e);
    }
    log_warn("%s: %s; keeping the tokens in memory", path, we.msg);
    free(d->cache_path);
    d->cache_path = NULL;
    /* One allocation holds both, as the mapped cache would. */
    d->owned = realloc(s.ids, 5 * s.n + 1);
    if (!d->owned) {
        free(s.ids);
        free(s.mask);
        return err_set(e, "out of memory");
    }
    memcpy((unsigned char *)d->owned + 4 * s.n, s.mask, s.n);
    free(s.mask);
    d->ids = d->owned;
    d->mask = d->ids + 4 * s.n;
    d->n_tokens = s.n;
    d->n_loss = s.n_loss;
    d->n_records = s.n_records;
    return check_stream(d, o, 0, e);
}

int data_open(data **out, const char *path, const data_opts *o, err *e) {
    *out = NULL;
    if (o->seq_len < 1) return err_set(e, "%s: seq_len is %d, must be >= 1", path, o->seq_len);
    if (o->vocab_size < 1)
        return err_set(e, "%s: vocab_size is %d, must be >= 1", path, o->vocab_size);
    Peftps__DataFormat format = PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED;
    if (resolve_format(path, o->format, &format, e) != 0) return -1;
    if (o->n_labels > 0 && (o->pad_id < 0 || o->pad_id >= o->vocab_size))
        return err_set(e, "%s: pad id %d for classification records is not in the vocabulary", path,
                       o->pad_id);
    data *d = calloc(1, sizeof *d);
    if (!d || !(d->path = strdup(path))) {
        free(d);
        return err_set(e, "%s: out of memory", path);
    }
    d->seq_len = o->seq_len;
    d->n_labels = o->n_labels > 0 ? o->n_labels : 0;
    int rc = format == PEFTPS__DATA_FORMAT__TOKENS ? open_tokens(d, path, o, e)
                                                   : open_text(d, path, format, o, e);
    if (rc != 0) {
        data_close(d);
        return -1;
    }
    *out = d;
    return 0;
}

void data_close(data *d) {
    if (!d) return;
    if (d->map) munmap(d->map, d->map_size);
    free(d->owned);
    free(d->cache_path);
    free(d->path);
    free(d);
}

uint64_t data_num_windows(const data *d) {
    return d->n_windows;
}

uint64_t data_num_tokens(const data *d) {
    return d->n_tokens;
}

uint64_t data_num_loss_tokens(const data *d) {
    return d->n_loss;
}

uint64_t data_num_records(const data *d) {
    return d->n_records;
}

const char *data_cache_path(const data *d) {
    return d->cache_path;
}

int data_cache_reused(const data *d) {
    return d->cache_reused;
}

int data_seq_len(const data *d) {
    return d->seq_len;
}

static void read_window(const data *d, uint64_t w, int32_t *tokens, int32_t *labels) {
    const int T = d->seq_len;
    const uint64_t base = w * ((uint64_t)T + 1);
    /* Ids were checked below vocab_size <= INT32_MAX: the casts are exact. */
    for (int t = 0; t < T; t++) tokens[t] = (int32_t)token_at(d, base + (uint64_t)t);
    if (d->n_labels) {
        /* A classification record: its class at the masked position. */
        int32_t cls = (int32_t)token_at(d, base + (uint64_t)T);
        for (int t = 0; t < T; t++) labels[t] = d->mask[base + (uint64_t)t] ? cls : DATA_IGNORE;
        return;
    }
    for (int t = 0; t < T; t++) {
        uint64_t i = base + (uint64_t)t + 1;
        labels[t] = d->mask && !d->mask[i] ? DATA_IGNORE : (int32_t)token_at(d, i);
    }
}

int data_window(const data *d, uint64_t w, int32_t *tokens, int32_t *labels, err *e) {
    if (w >= d->n_windows)
        return err_set(e, "%s: window %llu requested, the file has %llu of %d+1 tokens", d->path,
                       (unsigned long long)w, (unsigned long long)d->n_windows, d->seq_len);
    read_window(d, w, tokens, labels);
    return 0;
}

void data_sequence(const data *d, uint64_t g, int32_t *tokens, int32_t *labels) {
    read_window(d, g % d->n_windows, tokens, labels);
}

int data_shard(const data *d, uint64_t step, uint32_t shard, uint32_t shards, uint32_t batch_size,
               int32_t *tokens, int32_t *labels, err *e) {
    if (shards == 0 || batch_size == 0 || batch_size % shards != 0)
        return err_set(e, "batch_size %u must be a positive multiple of shards_per_step %u",
                       batch_size, shards);
    if (shard >= shards)
        return err_set(e, "shard %u requested of a step cut into %u shards", shard, shards);
    const uint32_t rows = batch_size / shards;
    const size_t T = (size_t)d->seq_len;
    const uint64_t first = step * batch_size + (uint64_t)shard * rows;
    for (uint32_t r = 0; r < rows; r++) data_sequence(d, first + r, tokens + r * T, labels + r * T);
    return 0;
}
