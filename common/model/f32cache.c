/* The F32 cache directory, the notes beside its files, listing and removal;
 * see f32cache.h. modelfile.c writes the cache files themselves. */
#include "model/f32cache.h"
#include "base/fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NOTE_SUFFIX ".json"
#define TMP_MARK ".f32.tmp."

char *f32cache_dir(void) {
    const char *env = getenv("PEFTPS_CACHE_DIR");
    if (env) return *env ? strdup(env) : NULL;
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (xdg && *xdg) return fs_join(xdg, "peftps");
    return home && *home ? fs_join(home, ".cache/peftps") : NULL;
}

/* {"name", "dev", "ino", "size", "mtime_ns"} of dir/name, or NULL. */
static json_t *file_identity(const char *dir, const char *name) {
    char *p = fs_join(dir, name);
    struct stat st;
    int ok = p && stat(p, &st) == 0;
    free(p);
    if (!ok) return NULL;
    return json_pack("{sssIsIsIsI}", "name", name, "dev", (json_int_t)st.st_dev, "ino",
                     (json_int_t)st.st_ino, "size", (json_int_t)st.st_size, "mtime_ns",
                     (json_int_t)st.st_mtim.tv_sec * 1000000000 + (json_int_t)st.st_mtim.tv_nsec);
}

int f32cache_note(const char *cache_path, const char *dir, char *const *files, int n_files,
                  err *e) {
    char abs[PATH_MAX];
    if (!realpath(dir, abs)) return err_errno(e, "%s", dir);
    json_t *list = json_array();
    json_t *root = json_pack("{ssso}", "model", abs, "files", list);
    if (!root) return err_set(e, "out of memory");
    int rc = 0;
    for (int i = -1; i < n_files && !rc; i++) {
        json_t *id = file_identity(abs, i < 0 ? "config.json" : files[i]);
        if (!id || json_array_append_new(list, id))
            rc = err_set(e, "%s/%s: cannot read its identity", abs,
                         i < 0 ? "config.json" : files[i]);
    }
    if (!rc) {
        char note[4200], tmp[4300];
        snprintf(note, sizeof note, "%s" NOTE_SUFFIX, cache_path);
        snprintf(tmp, sizeof tmp, "%s.tmp.%ld", note, (long)getpid());
        if (json_dump_file(root, tmp, JSON_INDENT(1)) != 0)
            rc = err_errno(e, "%s", tmp);
        else if (rename(tmp, note) != 0)
            rc = err_errno(e, "renaming %s to %s", tmp, note);
        if (rc) unlink(tmp);
    }
    json_decref(root);
    return rc;
}

void f32cache_touch(const char *path) {
    /* Fails silently on a read-only cache, which then only ages. */
    (void)utimensat(AT_FDCWD, path, NULL, 0);
}

/* The state of a cache file from its note. */
static f32cache_state note_state(const char *cache_path, char *model, size_t model_n) {
    char note[4200];
    snprintf(note, sizeof note, "%s" NOTE_SUFFIX, cache_path);
    json_t *root = json_load_file(note, 0, NULL);
    const char *dir = json_string_value(json_object_get(root, "model"));
    json_t *files = json_object_get(root, "files");
    if (!dir || !json_is_array(files)) {
        json_decref(root);
        return F32CACHE_UNKNOWN;
    }
    snprintf(model, model_n, "%s", dir);
    struct stat st;
    f32cache_state s = F32CACHE_CURRENT;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        s = F32CACHE_GONE;
    } else {
        size_t i;
        json_t *was;
        json_array_foreach(files, i, was) {
            const char *name = json_string_value(json_object_get(was, "name"));
            json_t *now = name ? file_identity(dir, name) : NULL;
            if (!now || !json_equal(now, was)) s = F32CACHE_CHANGED;
            json_decref(now);
            if (s != F32CACHE_CURRENT) break;
        }
    }
    json_decref(root);
    return s;
}

/* A temporary file whose writer (the pid after TMP_MARK) is still running
 * is a write in progress, not something to list or remove. */
static int tmp_in_progress(const char *name) {
    const char *at = strstr(name, TMP_MARK);
    if (!at) return 0;
    char *end;
    long pid = strtol(at + strlen(TMP_MARK), &end, 10);
    return pid > 0 && *end == '\0' && (kill((pid_t)pid, 0) == 0 || errno == EPERM);
}

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const f32cache_entry *)a)->path, ((const f32cache_entry *)b)->path);
}

int f32cache_list(const char *dir, f32cache_entry **out, int *n, err *e) {
    *out = NULL;
    *n = 0;
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : err_errno(e, "%s", dir);
    f32cache_entry *list = NULL;
    int cap = 0, rc = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        const char *name = de->d_name;
        int partial = strstr(name, TMP_MARK) != NULL;
        if (!partial && !fs_ends_with(name, ".f32")) continue;
        if (partial && tmp_in_progress(name)) continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 16;
            f32cache_entry *grown = realloc(list, (size_t)cap * sizeof *grown);
            if (!grown) {
                rc = err_set(e, "out of memory");
                break;
            }
            list = grown;
        }
        f32cache_entry *en = &list[*n];
        memset(en, 0, sizeof *en);
        snprintf(en->path, sizeof en->path, "%s/%s", dir, name);
        struct stat st;
        if (stat(en->path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
        en->bytes = (uint64_t)st.st_size;
        en->mtime = (int64_t)st.st_mtim.tv_sec;
        if (partial) {
            en->state = F32CACHE_PARTIAL;
        } else {
            char note[4200];
            snprintf(note, sizeof note, "%s" NOTE_SUFFIX, en->path);
            if (stat(note, &st) == 0) en->bytes += (uint64_t)st.st_size;
            en->state = note_state(en->path, en->model, sizeof en->model);
        }
        (*n)++;
    }
    closedir(d);
    if (rc) {
        free(list);
        *n = 0;
        return rc;
    }
    if (*n) qsort(list, (size_t)*n, sizeof *list, cmp_entry);
    *out = list;
    return 0;
}

int f32cache_remove(const f32cache_entry *en, err *e) {
    if (unlink(en->path) != 0 && errno != ENOENT) return err_errno(e, "removing %s", en->path);
    if (en->state != F32CACHE_PARTIAL) {
        char note[4200];
        snprintf(note, sizeof note, "%s" NOTE_SUFFIX, en->path);
        if (unlink(note) != 0 && errno != ENOENT) return err_errno(e, "removing %s", note);
    }
    return 0;
}

const char *f32cache_state_name(f32cache_state s) {
    switch (s) {
    case F32CACHE_CURRENT:
        return "current";
    case F32CACHE_CHANGED:
        return "changed";
    case F32CACHE_GONE:
        return "gone";
    case F32CACHE_PARTIAL:
        return "partial";
    default:
        return "unknown";
    }
}
