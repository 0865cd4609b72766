/* Opens a base model directory in Hugging Face layout (model.h): config.json
 * through modelcfg.c, the weights through safetensors.c (one file or the
 * shards of model.safetensors.index.json), and its fingerprint (base/hash.h).
 * With F32 compute, BF16 and F16 weights become F32 in a cache file that
 * every process of the machine maps (fsutil.c for the directory, f32cache.c for where it is and the
 * note of which model each file is of); with BF16
 * compute, BF16 matrices are used in place and only F32/F16 matrices (to
 * BF16) and BF16/F16 norms and biases (to F32) go to such a file. */
#include "model/model.h"
#include "base/fsutil.h"
#include "model/f32cache.h"
#include "base/log.h"
#include "model/bf16.h"
#include "model/safetensors.h"
#include "base/hash.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* config.json and the index are a few kB; the bound keeps a wrong path (a
 * weights file named config.json) from being read whole. */
#define MAX_TEXT (64u << 20)

struct model_files {
    model_config cfg;
    model_weights w;
    st_file **files; /* one, or the shards sorted by file name */
    char **file_names;
    int n_files;
    model_compute compute;
    void *converted; /* every converted weight, one allocation, or */
    void *shared;    /* the same in the cache file, mapped */
    size_t shared_len;
    char fingerprint[65];
    int dtype; /* st_dtype of every stored weight when they share one, else ST_F32 */
};

/* A JSON text file whole; a NUL byte inside is refused. */
static int read_text(const char *path, char **out, size_t *len, err *e) {
    if (fs_read_file(path, MAX_TEXT, out, len, e) < 0) return -1;
    if (strlen(*out) != *len) {
        free(*out);
        *out = NULL;
        return err_set(e, "%s: contains a NUL byte; not a JSON text", path);
    }
    return 0;
}

static int file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Reads the index: the distinct shard names (sorted) into f->file_names and
 * the weight map (kept for lookups) into *map. */
static int read_index(model_files *f, const char *dir, const char *path, json_t **map, err *e) {
    char *text;
    size_t len;
    if (read_text(path, &text, &len, e)) return -1;
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    if (!root) return err_set(e, "%s:%d:%d: invalid JSON: %s", path, je.line, je.column, je.text);
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(wm)) {
        json_decref(root);
        return err_set(e, "%s: missing object \"weight_map\"", path);
    }
    size_t n = json_object_size(wm);
    f->file_names = calloc(n ? n : 1, sizeof *f->file_names);
    if (!f->file_names) {
        json_decref(root);
        return err_set(e, "%s: out of memory", path);
    }
    const char *k;
    json_t *v;
    json_object_foreach(wm, k, v) {
        const char *s = json_is_string(v) ? json_string_value(v) : NULL;
        /* Shards live beside the index: a path elsewhere is refused. */
        if (!s || !*s || strchr(s, '/') || strcmp(s, ".") == 0 || strcmp(s, "..") == 0) {
            err_set(e, "%s: weight_map entry \"%.200s\" is not a file name in %s", path, k, dir);
            json_decref(root); /* after the message: k belongs to root */
            return -1;
        }
        int seen = 0;
        for (int i = 0; i < f->n_files && !seen; i++) seen = strcmp(f->file_names[i], s) == 0;
        if (!seen && !(f->file_names[f->n_files++] = strdup(s))) {
            json_decref(root);
            return err_set(e, "%s: out of memory", path);
        }
    }
    if (f->n_files == 0) {
        json_decref(root);
        return err_set(e, "%s: \"weight_map\" is empty", path);
    }
    qsort(f->file_names, (size_t)f->n_files, sizeof *f->file_names, cmp_str);
    *map = json_incref(wm);
    json_decref(root);
    return 0;
}

static int is_vector(int layer, int kind) {
    if (layer == MODEL_GLOBAL) return kind == GW_FINAL_NORM;
    return kind == LW_INPUT_NORM || kind == LW_POST_NORM || kind >= LW_Q_BIAS;
}

/* One weight to bind: where it is and where its pointer goes: slot16
 * (not NULL) for a weight wanted in BF16, else slot for F32. */
typedef struct binding {
    const st_file *file;
    const st_tensor *t;
    const float **slot;
    const uint16_t **slot16;
} binding;

/* Finds weight `name` in the directory's files, or fails naming it. */
static int locate(model_files *f, json_t *map, const char *dir, const char *name,
                  const st_file **file, const st_tensor **t, err *e) {
    if (!map) {
        *file = f->files[0];
        if (!(*t = st_find(*file, name)))
            return err_set(e, "%s: missing tensor '%s'", st_path(*file), name);
        return 0;
    }
    json_t *v = json_object_get(map, name);
    if (!v)
        return err_set(e,
                       "%s/model.safetensors.index.json: missing tensor '%s' (not in weight_map)",
                       dir, name);
    const char *shard = json_string_value(v);
    char **hit = bsearch(&shard, f->file_names, (size_t)f->n_files, sizeof *f->file_names, cmp_str);
    *file = f->files[hit - f->file_names]; /* every mapped name was collected */
    if (!(*t = st_find(*file, name)))
        return err_set(e, "%s: missing tensor '%s' (the index places it in this shard)",
                       st_path(*file), name);
    return 0;
}

static void shape_str(const int64_t *shape, int ndim, char *buf, size_t n) {
    size_t k = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && k < n; i++)
        k += (size_t)snprintf(buf + k, n - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

static int check_tensor(const model_files *f, const st_file *file, const st_tensor *t, int layer,
                        int kind, err *e) {
    int rows, cols;
    model_weight_shape(&f->cfg, layer, kind, &rows, &cols);
    int64_t want[2] = {rows, cols};
    int nd = is_vector(layer, kind) ? 1 : 2;
    int ok = t->ndim == nd && t->shape[0] == want[0] && (nd == 1 || t->shape[1] == want[1]);
    if (!ok) {
        char got[256], exp[64];
        shape_str(t->shape, t->ndim, got, sizeof got);
        shape_str(want, nd, exp, sizeof exp);
        return err_set(e, "%s: tensor '%s' has shape %s, but config.json implies %s", st_path(file),
                       t->name, got, exp);
    }
    if (t->dtype != ST_F32 && t->dtype != ST_F16 && t->dtype != ST_BF16)
        return err_set(e, "%s: tensor '%s' has dtype %s; base weights must be F32, F16 or BF16",
                       st_path(file), t->name, st_dtype_name(t->dtype));
    return 0;
}

/* ---- the F32 cache of BF16/F16 weights ---------------------------------------- */

/* Whether a binding's tensor needs converting (another dtype than the one
 * wanted, or misaligned). */
static int needs_f32(const binding *b) {
    if (b->slot16) return b->t->dtype != ST_BF16 || (uintptr_t)b->t->data % _Alignof(uint16_t);
    return b->t->dtype != ST_F32 || (uintptr_t)b->t->data % _Alignof(float);
}

/* Bytes a converted weight takes in the cache or private copy: whole
 * 64-byte lines, so that every weight starts aligned. */
static size_t conv_bytes(const binding *b) {
    size_t n = b->t->numel * (b->slot16 ? sizeof(uint16_t) : sizeof(float));
    return (n + 63) / 64 * 64;
}

static void bind_at(binding *b, const void *p) {
    if (b->slot16)
        *b->slot16 = p;
    else
        *b->slot = p;
}

/* The cache file's name: the base's fingerprint (config and headers), the
 * converted tensors in their order in the file, and each weights file's
 * identity and modification time, so that a file rewritten in place under
 * the same header gets a new copy. */
static int cache_key(const model_files *f, const char *dir, const binding *b, size_t nb,
                     char hex[65], err *e) {
    hash_sha256 h;
    hash_sha256_init(&h);
    hash_sha256_update(&h, f->fingerprint, 64);
    for (size_t i = 0; i < nb; i++)
        if (needs_f32(&b[i])) {
            hash_sha256_update(&h, b[i].t->name, strlen(b[i].t->name) + 1);
            hash_sha256_update(&h, b[i].slot16 ? "b" : "f", 1);
        }
    for (int i = 0; i < f->n_files; i++) {
        char *p = fs_join(dir, f->file_names[i]);
        struct stat st;
        int bad = !p || stat(p, &st) != 0;
        if (bad) {
            err_errno(e, "%s", p ? p : dir);
            free(p);
            return -1;
        }
        free(p);
        int64_t id[5] = {(int64_t)st.st_dev, (int64_t)st.st_ino, (int64_t)st.st_size,
                         (int64_t)st.st_mtim.tv_sec, (int64_t)st.st_mtim.tv_nsec};
        hash_sha256_update(&h, id, sizeof id);
    }
    uint8_t d[32];
    hash_sha256_final(&h, d);
    hash_hex(d, hex);
    return 0;
}

/* Maps path read-only and shared if it holds exactly len bytes. */
static void *map_cached(const char *path, size_t len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return NULL;
    struct stat st;
    void *p = NULL;
    if (fstat(fd, &st) == 0 && (size_t)st.st_size == len) {
        p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) p = NULL;
    }
    close(fd);
    return p;
}

/* Converts every binding that needs it, in order, into dst. */
static int convert_all(binding *b, size_t nb, void *dst, err *e) {
    size_t off = 0;
    for (size_t i = 0; i < nb; i++) {
        if (!needs_f32(&b[i])) continue;
        void *d = (char *)dst + off;
        if (b[i].slot16 ? st_convert_bf16(b[i].file, b[i].t, d, e)
                        : st_convert_f32(b[i].file, b[i].t, d, e))
            return -1;
        off += conv_bytes(&b[i]);
    }
    return 0;
}

/* Binds every converted weight to its place in p, in order. */
static void bind_converted(binding *b, size_t nb, const void *p) {
    size_t off = 0;
    for (size_t i = 0; i < nb; i++) {
        if (!needs_f32(&b[i])) continue;
        bind_at(&b[i], (const char *)p + off);
        off += conv_bytes(&b[i]);
    }
}

/* Writes the converted weights (total bytes) to the cache file `path`
 * through a temporary file and a rename, so that a reader sees all of it or
 * none; space is reserved first, so a full disk is an error, not a fault.
 * Returns -1 when the cache cannot be written, -2 when a weight cannot be
 * converted (bad input, whatever the cache). */
static int cache_write(const char *path, binding *b, size_t nb, size_t total, err *e) {
    size_t len = total;
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    int fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return err_errno(e, "%s", tmp);
    int rc = -1, fa = posix_fallocate(fd, 0, (off_t)len);
    void *p = MAP_FAILED;
    if (fa) {
        errno = fa;
        err_errno(e, "%s: reserving %zu MB", tmp, len >> 20);
        goto out;
    }
    p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        err_errno(e, "%s: mmap", tmp);
        goto out;
    }
    if (convert_all(b, nb, p, e) < 0) {
        rc = -2;
        goto out;
    }
    if (msync(p, len, MS_SYNC) != 0) {
        err_errno(e, "%s: msync", tmp);
        goto out;
    }
    if (rename(tmp, path) != 0) {
        err_errno(e, "renaming %s to %s", tmp, path);
        goto out;
    }
    rc = 0;
out:
    if (p != MAP_FAILED) munmap(p, len);
    close(fd);
    if (rc) unlink(tmp);
    return rc;
}

/* Binds the weights that need converting to the machine's shared copy
 * in the cache directory, writing it when absent. Returns 1 when bound, 0
 * when there is no usable cache (the caller converts privately; a reason is
 * logged), -1 when a weight cannot be converted at all. */
static int bind_cached(model_files *f, const char *dir, binding *b, size_t nb, size_t total,
                       err *e) {
    char *cdir = f32cache_dir();
    if (!cdir) return 0;
    char key[65], path[4096];
    err ce = {{0}};
    int rc = 0;
    if (cache_key(f, dir, b, nb, key, &ce) < 0 || fs_mkdir_p(cdir, &ce) < 0) goto fallback;
    snprintf(path, sizeof path, "%s/%s.%s", cdir, key,
             f->compute == MODEL_COMPUTE_BF16 ? "bf16" : "f32");
    size_t len = total;
    void *p = map_cached(path, len);
    char note[4200];
    snprintf(note, sizeof note, "%s.json", path);
    int noted = p && access(note, F_OK) == 0;
    if (p) {
        log_info("%s: converted weights from the cache %s (shared)", dir, path);
        f32cache_touch(path);
    } else {
        int w = cache_write(path, b, nb, total, &ce);
        if (w == -2) { /* the weights themselves are bad */
            *e = ce;
            rc = -1;
            goto out;
        }
        if (w < 0) goto fallback;
        if (!(p = map_cached(path, len))) {
            err_errno(&ce, "%s: mapping the file just written", path);
            goto fallback;
        }
        log_info("%s: weights converted to %s into the cache %s (%zu MB, shared by "
                 "this machine's processes; `peftps cache list` shows them)",
                 dir, f->compute == MODEL_COMPUTE_BF16 ? "the compute's BF16/F32" : "F32", path,
                 len >> 20);
    }
    /* Which model the file is of, for `peftps cache` (also for files of
     * older versions, written without a note). */
    if (!noted && f32cache_note(path, dir, f->file_names, f->n_files, &ce) < 0)
        log_warn("%s: cannot note its model beside the cache file: %s", path, ce.msg);
    f->shared = p;
    f->shared_len = len;
    bind_converted(b, nb, p);
    rc = 1;
    goto out;
fallback:
    log_warn("%s: no cache of converted weights (%s); converting in this process, %zu MB not "
             "shared (set PEFTPS_CACHE_DIR to a writable directory)",
             dir, ce.msg, total >> 20);
out:
    free(cdir);
    return rc;
}

static int bind_all(model_files *f, json_t *map, const char *dir, err *e) {
    const model_config *c = &f->cfg;
    size_t cap = GW_COUNT + (size_t)c->num_layers * LW_COUNT, nb = 0;
    binding *b = calloc(cap, sizeof *b);
    f->w.layer = calloc((size_t)c->num_layers, sizeof *f->w.layer);
    if (f->compute == MODEL_COMPUTE_BF16)
        f->w.layer16 = calloc((size_t)c->num_layers, sizeof *f->w.layer16);
    if (!b || !f->w.layer || (f->compute == MODEL_COMPUTE_BF16 && !f->w.layer16)) {
        free(b);
        return err_set(e, "%s: out of memory", dir);
    }
    char name[256];
    for (int layer = MODEL_GLOBAL; layer < c->num_layers; layer++) {
        int kinds = layer == MODEL_GLOBAL ? GW_COUNT : LW_COUNT;
        for (int kind = 0; kind < kinds; kind++) {
            if (!model_weight_shape(c, layer, kind, NULL, NULL)) continue;
            /* Tied: the head is the embedding, whatever the file holds. */
            if (layer == MODEL_GLOBAL && kind == GW_LM_HEAD && c->tie_word_embeddings) continue;
            model_weight_name(c, layer, kind, name, sizeof name);
            binding *x = &b[nb++];
            x->slot = layer == MODEL_GLOBAL ? &f->w.global[kind] : &f->w.layer[layer][kind];
            if (f->compute == MODEL_COMPUTE_BF16 && !is_vector(layer, kind))
                x->slot16 =
                    layer == MODEL_GLOBAL ? &f->w.global16[kind] : &f->w.layer16[layer][kind];
            if (locate(f, map, dir, name, &x->file, &x->t, e) ||
                check_tensor(f, x->file, x->t, layer, kind, e)) {
                if (layer == MODEL_GLOBAL && kind == GW_LM_HEAD)
                    err_wrap(e, "tie_word_embeddings is false");
                free(b);
                return -1;
            }
        }
    }
    f->dtype = nb ? (int)b[0].t->dtype : ST_F32;
    for (size_t i = 1; i < nb; i++)
        if ((int)b[i].t->dtype != f->dtype) f->dtype = ST_F32;
    /* Weights in the wanted dtype stay in the mapping (shared by all
     * processes of the machine); the rest is converted once per machine
     * into the cache file, which every process maps, or, without a usable
     * cache, into one private allocation in every process. */
    size_t total = 0;
    for (size_t i = 0; i < nb; i++) {
        if (needs_f32(&b[i]))
            total += conv_bytes(&b[i]);
        else
            bind_at(&b[i], b[i].t->data);
    }
    int cached = total ? bind_cached(f, dir, b, nb, total, e) : 0;
    if (cached < 0) {
        free(b);
        return -1;
    }
    if (total && !cached) {
        if (!(f->converted = aligned_alloc(64, total))) {
            free(b);
            return err_set(e, "%s: out of memory converting weights (%zu MB)", dir, total >> 20);
        }
        if (convert_all(b, nb, f->converted, e)) {
            free(b);
            return -1;
        }
        bind_converted(b, nb, f->converted);
    }
    if (c->tie_word_embeddings) {
        f->w.global[GW_LM_HEAD] = f->w.global[GW_EMBED];
        f->w.global16[GW_LM_HEAD] = f->w.global16[GW_EMBED];
    }
    /* A file none of whose weights is used in place (all BF16, say) is
     * unmapped now rather than kept until close. */
    for (int i = 0; i < f->n_files; i++) {
        int used = 0;
        for (size_t j = 0; j < nb && !used; j++)
            used = b[j].file == f->files[i] &&
                   (b[j].slot16 ? (const void *)*b[j].slot16 : (const void *)*b[j].slot) ==
                       b[j].t->data;
        if (!used) {
            st_close(f->files[i]);
            f->files[i] = NULL;
        }
    }
    free(b);
    return 0;
}

/* Each piece is preceded by its length so that no two different sequences
 * of pieces hash alike. */
static void hash_piece(hash_sha256 *h, const void *p, size_t n) {
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)n >> (8 * i));
    hash_sha256_update(h, len, 8);
    hash_sha256_update(h, p, n);
}

/* Opens dir into f: config, files, fingerprint; with `bind`, the weights too. */
static int open_dir(model_files *f, const char *dir, int bind, err *e) {
    char *cfg_path = fs_join(dir, "config.json");
    char *single = fs_join(dir, "model.safetensors");
    char *index = fs_join(dir, "model.safetensors.index.json");
    char *text = NULL;
    json_t *map = NULL;
    size_t len = 0;
    int rc = -1;
    if (!cfg_path || !single || !index) {
        err_set(e, "%s: out of memory", dir);
        goto out;
    }
    if (read_text(cfg_path, &text, &len, e) || model_config_parse(&f->cfg, text, cfg_path, e))
        goto out;
    if (file_exists(single)) {
        f->file_names = calloc(1, sizeof *f->file_names);
        if (!f->file_names || !(f->file_names[0] = strdup("model.safetensors"))) {
            err_set(e, "%s: out of memory", dir);
            goto out;
        }
        f->n_files = 1;
    } else if (file_exists(index)) {
        if (read_index(f, dir, index, &map, e)) goto out;
    } else {
        err_set(e, "%s: neither model.safetensors nor model.safetensors.index.json exists", dir);
        goto out;
    }
    f->files = calloc((size_t)f->n_files, sizeof *f->files);
    if (!f->files) {
        err_set(e, "%s: out of memory", dir);
        goto out;
    }
    for (int i = 0; i < f->n_files; i++) {
        char *p = fs_join(dir, f->file_names[i]);
        int bad = !p ? err_set(e, "%s: out of memory", dir) : st_open(&f->files[i], p, e);
        free(p);
        if (bad) goto out;
    }
    hash_sha256 h;
    uint8_t d[32];
    hash_sha256_init(&h);
    hash_piece(&h, text, len);
    for (int i = 0; i < f->n_files; i++) {
        size_t hl;
        const void *hp = st_header(f->files[i], &hl);
        hash_piece(&h, hp, hl);
    }
    hash_sha256_final(&h, d);
    hash_hex(d, f->fingerprint);
    if (bind && bind_all(f, map, dir, e)) goto out;
    rc = 0;
out:
    json_decref(map);
    free(text);
    free(cfg_path);
    free(single);
    free(index);
    return rc;
}

int model_files_open(model_files **out, const char *dir, err *e) {
    return model_files_open_compute(out, dir, MODEL_COMPUTE_F32, e);
}

int model_files_open_compute(model_files **out, const char *dir, model_compute compute, err *e) {
    *out = NULL;
    model_files *f = calloc(1, sizeof *f);
    if (!f) return err_set(e, "%s: out of memory", dir);
    f->compute = compute;
    if (open_dir(f, dir, 1, e)) {
        model_files_close(f);
        return -1;
    }
    *out = f;
    return 0;
}

int model_files_probe(const char *dir, char fingerprint[65], err *e) {
    model_files *f = calloc(1, sizeof *f);
    if (!f) return err_set(e, "%s: out of memory", dir);
    int rc = open_dir(f, dir, 0, e);
    if (rc == 0) memcpy(fingerprint, f->fingerprint, 65);
    model_files_close(f);
    return rc;
}

const model_config *model_files_config(const model_files *f) {
    return &f->cfg;
}

const model_weights *model_files_weights(const model_files *f) {
    return &f->w;
}

int model_files_dtype(const model_files *f) {
    return f->dtype;
}

const char *model_files_fingerprint(const model_files *f) {
    return f->fingerprint;
}

void model_files_close(model_files *f) {
    if (!f) return;
    for (int i = 0; i < f->n_files; i++) {
        if (f->files) st_close(f->files[i]);
        free(f->file_names[i]);
    }
    free(f->files);
    free(f->file_names);
    free(f->converted);
    if (f->shared) munmap(f->shared, f->shared_len);
    free((void *)f->w.layer);
    free((void *)f->w.layer16);
    free(f);
}

kweight model_weights_get(const model_weights *w, int layer, int kind) {
    if (layer == MODEL_GLOBAL) return (kweight){w->global[kind], w->global16[kind]};
    return (kweight){w->layer[layer][kind], w->layer16 ? w->layer16[layer][kind] : NULL};
}

void model_weights_read_f32(const model_weights *w, int layer, int kind, float *dst, size_t n) {
    kweight k = model_weights_get(w, layer, kind);
    if (k.h)
        bf16_widen(dst, k.h, n);
    else if (k.f)
        memcpy(dst, k.f, n * sizeof *dst);
}
