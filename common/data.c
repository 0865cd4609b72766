/* Token data mapped read-only and cut into windows; the (step, shard) ->
 * sequence map of data-parallel training. See data.h. Works with the
 * generated Peftps__DataFormat of proto/peftps.proto. */
#include "data.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

struct data {
    char *path; /* for messages */
    const unsigned char *map;
    size_t map_size;
    uint64_t n_tokens;
    uint64_t n_windows;
    int seq_len;
};

/* Token i of the file, whatever the host's byte order. */
static uint32_t token_at(const data *d, uint64_t i) {
    const unsigned char *p = d->map + 4 * i;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static int resolve_format(const char *path, Peftps__DataFormat f, Peftps__DataFormat *out, err *e) {
    if (f == PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED) {
        if (ends_with(path, ".tokens"))
            f = PEFTPS__DATA_FORMAT__TOKENS;
        else if (ends_with(path, ".txt"))
            f = PEFTPS__DATA_FORMAT__TEXT;
        else if (ends_with(path, ".jsonl"))
            f = PEFTPS__DATA_FORMAT__JSONL;
        else
            return err_set(e,
                           "%s: cannot tell the data format from the name (expected .tokens, "
                           ".txt or .jsonl); set data.format",
                           path);
    }
    switch (f) {
    case PEFTPS__DATA_FORMAT__TOKENS:
        *out = f;
        return 0;
    case PEFTPS__DATA_FORMAT__TEXT:
    case PEFTPS__DATA_FORMAT__JSONL:
        return err_set(e,
                       "%s: %s data is not supported yet; convert it to a .tokens file "
                       "(raw little-endian uint32 token ids)",
                       path, f == PEFTPS__DATA_FORMAT__TEXT ? "TEXT" : "JSONL");
    default:
        return err_set(e, "%s: unknown data format %d", path, (int)f);
    }
}

/* Maps a .tokens file and checks its size and every id. */
static int open_tokens(data *d, const char *path, const data_opts *o, err *e) {
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
    const uint64_t size = (uint64_t)st.st_size;
    const uint64_t need = (uint64_t)o->seq_len + 1;
    if (size % 4 != 0) {
        close(fd);
        return err_set(e,
                       "%s: size %llu bytes is not a multiple of 4: not a file of uint32 token "
                       "ids",
                       path, (unsigned long long)size);
    }
    if (size / 4 < need) {
        close(fd);
        return err_set(e,
                       "%s: holds %llu tokens, fewer than one sequence of seq_len+1 = %llu "
                       "tokens",
                       path, (unsigned long long)(size / 4), (unsigned long long)need);
    }
    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd); /* the mapping keeps the file */
    if (map == MAP_FAILED) return err_errno(e, "cannot map %s", path);
    d->map = map;
    d->map_size = (size_t)size;
    d->n_tokens = size / 4;
    d->n_windows = d->n_tokens / need;
    /* Every id is checked once here, so that reading batches cannot fail
     * and a bad file is refused before any step runs. */
    for (uint64_t i = 0; i < d->n_tokens; i++) {
        uint32_t id = token_at(d, i);
        if (id >= (uint32_t)o->vocab_size)
            return err_set(e,
                           "%s: token %llu (byte offset %llu) is %u, not below the vocabulary "
                           "size %d",
                           path, (unsigned long long)i, (unsigned long long)(4 * i), id,
                           o->vocab_size);
    }
    return 0;
}

int data_open(data **out, const char *path, const data_opts *o, err *e) {
    *out = NULL;
    if (o->seq_len < 1) return err_set(e, "%s: seq_len is %d, must be >= 1", path, o->seq_len);
    if (o->vocab_size < 1)
        return err_set(e, "%s: vocab_size is %d, must be >= 1", path, o->vocab_size);
    Peftps__DataFormat format;
    if (resolve_format(path, o->format, &format, e) != 0) return -1;
    data *d = calloc(1, sizeof *d);
    if (!d || !(d->path = strdup(path))) {
        free(d);
        return err_set(e, "%s: out of memory", path);
    }
    d->seq_len = o->seq_len;
    /* resolve_format admits only TOKENS so far; other readers dispatch here. */
    if (format != PEFTPS__DATA_FORMAT__TOKENS || open_tokens(d, path, o, e) != 0) {
        data_close(d);
        return -1;
    }
    *out = d;
    return 0;
}

void data_close(data *d) {
    if (!d) return;
    if (d->map) munmap((void *)d->map, d->map_size);
    free(d->path);
    free(d);
}

uint64_t data_num_windows(const data *d) {
    return d->n_windows;
}

uint64_t data_num_tokens(const data *d) {
    return d->n_tokens;
}

int data_seq_len(const data *d) {
    return d->seq_len;
}

static void read_window(const data *d, uint64_t w, int32_t *tokens, int32_t *labels) {
    const int T = d->seq_len;
    const uint64_t base = w * ((uint64_t)T + 1);
    /* Ids were checked below vocab_size <= INT32_MAX: the casts are exact. */
    for (int t = 0; t < T; t++) tokens[t] = (int32_t)token_at(d, base + (uint64_t)t);
    for (int t = 0; t < T; t++) labels[t] = (int32_t)token_at(d, base + (uint64_t)t + 1);
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
