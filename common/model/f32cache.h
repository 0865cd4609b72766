/* The machine's F32 cache of BF16/F16 base weights: where it lives, the
 * note beside each cache file saying which model it was made from, and the
 * listing and cleaning `peftps cache` does (cli/cmd_cache.c). modelfile.c
 * writes and maps the cache files (KEY.f32) and calls f32cache_note and
 * f32cache_touch; a note is KEY.f32.json:
 *
 *   {"model": "/abs/model/dir", "files": [{"name": "config.json",
 *    "dev": D, "ino": I, "size": S, "mtime_ns": T}, ...]}
 *
 * listing config.json and every weights file as they were when the cache
 * file was written. A cache file is current while its model directory holds
 * those files unchanged (any change makes modelfile.c write a new one). */
#ifndef PEFTPS_F32CACHE_H
#define PEFTPS_F32CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"

/* PEFTPS_CACHE_DIR, else $XDG_CACHE_HOME/peftps, else ~/.cache/peftps
 * (malloc'ed; free it). NULL when PEFTPS_CACHE_DIR is set empty (no cache)
 * or no home is known. */
char *f32cache_dir(void);

/* Writes the note of cache file `cache_path`: the model directory `dir`
 * (made absolute) and the identity of dir/config.json and dir/files[i].
 * Best effort: returns -1 with e set when it cannot, and the cache file
 * stays usable (only the listing lacks its model). */
int f32cache_note(const char *cache_path, const char *dir, char *const *files, int n_files, err *e);

/* Marks cache file `path` as used now (its modification time), so that
 * `peftps cache clean --older-than` spares what is in use. Best effort. */
void f32cache_touch(const char *path);

typedef enum {
    F32CACHE_CURRENT = 0, /* its model directory holds the files it was made from */
    F32CACHE_CHANGED,     /* the model directory is there, its files changed */
    F32CACHE_GONE,        /* the model directory is gone */
    F32CACHE_UNKNOWN,     /* no readable note: the model is not known */
    F32CACHE_PARTIAL      /* a temporary file of a write that did not finish */
} f32cache_state;

/* One file of the cache directory. */
typedef struct f32cache_entry {
    char path[4096];
    char model[4096]; /* "" when unknown */
    uint64_t bytes;   /* the cache file and its note */
    int64_t mtime;    /* unix seconds: written or last used */
    f32cache_state state;
} f32cache_entry;

/* The cache files of directory `dir` (KEY.f32, with their notes, and
 * temporary files left by writes that did not finish), sorted by path, in
 * *out (malloc'ed; free it; NULL when *n is 0). A missing directory holds
 * none. Fails when dir cannot be read or memory runs out. */
int f32cache_list(const char *dir, f32cache_entry **out, int *n, err *e);

/* Removes an entry's cache file and its note. */
int f32cache_remove(const f32cache_entry *en, err *e);

/* The state's word in listings ("current", "changed", "gone", "unknown",
 * "partial"). */
const char *f32cache_state_name(f32cache_state s);

#endif
