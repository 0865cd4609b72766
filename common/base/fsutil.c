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

int fs_read_stream(FILE *f, size_t max, char **out, size_t *len, err *e) {
    size_t cap = 0, n = 0;
    char *buf = NULL;
    *out = NULL;
    for (;;) {
        if (cap - n < 4096) {
            cap = cap ? 2 * cap : 65536;
            char *nb = realloc(buf, cap + 1);
            if (!nb) {
                free(buf);
                errno = ENOMEM;
                return err_set(e, "out of memory");
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (max > 0 && n > max) {
            free(buf);
            errno = EFBIG;
            return err_set(e, "larger than %zu bytes", max);
        }
        if (r == 0) break;
    }
    if (ferror(f)) {
        int saved = errno;
        free(buf);
        err_errno(e, "read error");
        errno = saved;
        return -1;
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return 0;
}

int fs_read_file(const char *path, size_t max, char **out, size_t *len, err *e) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        int saved = errno;
        err_errno(e, "%s", path);
        errno = saved;
        return -1;
    }
    int rc = fs_read_stream(f, max, out, len, e);
    int saved = errno;
    fclose(f);
    if (rc < 0) err_wrap(e, "%s", path);
    errno = saved;
    return rc;
}

char *fs_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int fs_ends_with(const char *path, const char *suffix) {
    size_t n = strlen(path), k = strlen(suffix);
    return n >= k && !strcmp(path + n - k, suffix);
}
