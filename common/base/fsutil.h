/* Small file-system helpers shared by the commands, the server and the
 * checkpoint store. */
#ifndef PEFTPS_FSUTIL_H
#define PEFTPS_FSUTIL_H

#include "base/err.h"

/* Creates `path` and any missing parents (mode 0777 less the umask), like
 * `mkdir -p`; an existing directory is fine. */
int fs_mkdir_p(const char *path, err *e);

/* Writes text to path atomically (a temporary file in the same directory,
 * then rename), so readers never see half a file. */
int fs_write_text(const char *path, const char *text, err *e);

#endif
