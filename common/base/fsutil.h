/* Small file-system helpers shared by the commands, the server and the
 * checkpoint store. */
#ifndef PEFTPS_FSUTIL_H
#define PEFTPS_FSUTIL_H

#include <stddef.h>
#include <stdio.h>

#include "base/err.h"

/* Creates `path` and any missing parents (mode 0777 less the umask), like
 * `mkdir -p`; an existing directory is fine. */
int fs_mkdir_p(const char *path, err *e);

/* Writes text to path atomically (a temporary file in the same directory,
 * then rename), so readers never see half a file. */
int fs_write_text(const char *path, const char *text, err *e);

/* Reads all of f (a file or standard input) into *out, NUL-terminated (the
 * NUL not counted in *len), refusing more than max bytes when max > 0. The
 * caller frees *out. Errors: a read error, more than max bytes, out of
 * memory; *out is NULL then. */
int fs_read_stream(FILE *f, size_t max, char **out, size_t *len, err *e);

/* fs_read_stream of the file at path; errors name the file, and a file that
 * cannot be opened leaves errno as open left it (ENOENT tells a missing file
 * from a broken one). */
int fs_read_file(const char *path, size_t max, char **out, size_t *len, err *e);

/* Whether path ends with suffix (".jsonl"). */
int fs_ends_with(const char *path, const char *suffix);

/* "DIR/NAME", malloc'd; NULL when out of memory. */
char *fs_join(const char *dir, const char *name);

#endif
