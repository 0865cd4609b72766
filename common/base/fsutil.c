/* Small file-system helpers; see fsutil.h. */
#include "base/fsutil.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int fs_mkdir_p(const char *path, err *e) {
    size_t n = strlen(path);
    char *buf = malloc(n + 1);
    if (!buf) return err_set(e, "out of memory");
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0') continue;
        char ch = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0777) < 0 && errno != EEXIST) {
            int rc = err_errno(e, "creating directory %s", buf);
            free(buf);
            return rc;
        }
        buf[i] = ch;
    }
    free(buf);
    return 0;
}

int fs_write_text(const char *path, const char *text, err *e) {
    size_t n = strlen(path);
    char *tmp = malloc(n + 16);
    if (!tmp) return err_set(e, "out of memory");
    snprintf(tmp, n + 16, "%s.tmp%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) {
        err_errno(e, "writing %s", tmp);
        free(tmp);
        return -1;
    }
    size_t len = strlen(text);
    int bad = fwrite(text, 1, len, f) != len;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) < 0) {
        err_errno(e, "writing %s", path);
        unlink(tmp);
        free(tmp);
        return -1;
    }
    free(tmp);
    return 0;
}
