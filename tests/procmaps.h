/* Where a pointer lives, from /proc/self/maps: for the tests that check a
 * base is used in place from its file mapping (test_modelcfg.c,
 * test_bf16_model.c). Static inline so each test program includes it alone. */
#ifndef PEFTPS_TESTS_PROCMAPS_H
#define PEFTPS_TESTS_PROCMAPS_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Whether p lies in a mapping of a file whose name ends in `suffix`. */
static inline int in_file_mapping(const void *p, const char *suffix) {
    FILE *fp = fopen("/proc/self/maps", "r");
    char line[1024];
    int hit = 0;
    while (!hit && fp && fgets(line, sizeof line, fp)) {
        unsigned long lo, hi;
        line[strcspn(line, "\n")] = 0;
        size_t L = strlen(line), S = strlen(suffix);
        if (sscanf(line, "%lx-%lx", &lo, &hi) == 2 && L >= S && strcmp(line + L - S, suffix) == 0)
            hit = (uintptr_t)p >= lo && (uintptr_t)p < hi;
    }
    if (fp) fclose(fp);
    return hit;
}

#endif
