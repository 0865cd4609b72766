/* PEFTPS_CPU_DISABLE (cpu.h). */
#include "base/cpu.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

int cpu_disabled(const char *isa) {
    const char *s = getenv("PEFTPS_CPU_DISABLE");
    size_t n = strlen(isa);
    while (s && *s) {
        const char *end = strchr(s, ',');
        size_t len = end ? (size_t)(end - s) : strlen(s);
        if (len == n && strncasecmp(s, isa, n) == 0) return 1;
        s = end ? end + 1 : NULL;
    }
    return 0;
}
