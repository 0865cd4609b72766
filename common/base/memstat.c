/* /proc/PID/status read into a memstat (memstat.h): the kB fields by name,
 * in one pass. */
#include "base/memstat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The value of "Key:   123 kB" when line starts with key and a colon, else -1. */
static long field_kib(const char *line, const char *key) {
    size_t n = strlen(key);
    if (strncmp(line, key, n) || line[n] != ':') return -1;
    return strtol(line + n + 1, NULL, 10);
}

int memstat_read(pid_t pid, memstat *m) {
    char path[64], line[256];
    if (pid)
        snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    else
        snprintf(path, sizeof path, "/proc/self/status");
    m->private_kib = m->mapped_kib = m->rss_kib = m->peak_kib = -1;
    m->name[0] = '\0';
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long file = -1, shmem = -1, v;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "Name:", 5)) {
            const char *s = line + 5 + strspn(line + 5, " \t");
            snprintf(m->name, sizeof m->name, "%.*s", (int)strcspn(s, "\n"), s);
        } else if ((v = field_kib(line, "RssAnon")) >= 0)
            m->private_kib = v;
        else if ((v = field_kib(line, "RssFile")) >= 0)
            file = v;
        else if ((v = field_kib(line, "RssShmem")) >= 0)
            shmem = v;
        else if ((v = field_kib(line, "VmRSS")) >= 0)
            m->rss_kib = v;
        else if ((v = field_kib(line, "VmHWM")) >= 0)
            m->peak_kib = v;
    }
    fclose(f);
    if (file >= 0) m->mapped_kib = file + (shmem > 0 ? shmem : 0);
    return 0;
}
