/* `peftps cache list|clean`: the machine's F32 copies of BF16/F16 base
 * weights (common/model/f32cache.h), with the model each was made from,
 * its size and age, and their removal by age or staleness. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "config/cmdline.h"
#include "model/f32cache.h"

static const char cache_usage[] =
    "usage: peftps cache list\n"
    "       peftps cache clean [--older-than DAYS] [--stale] [--dry-run]\n\n"
    "BF16 and F16 base weights are converted to F32 once per machine into a cache\n"
    "file that every process maps (4 bytes per parameter), in $PEFTPS_CACHE_DIR\n"
    "(default $XDG_CACHE_HOME/peftps, else ~/.cache/peftps). A model whose files\n"
    "change gets a new one; the old one stays until cleaned.\n\n"
    "list     one line per cache file: its size, when it was last used, its state\n"
    "         and the model directory it was made from. States:\n"
    "           current  the model directory holds the files it was made from\n"
    "           changed  the model's files changed since (a newer copy replaces it)\n"
    "           gone     the model directory no longer exists\n"
    "           unknown  no note of its model (written by an older peftps)\n"
    "           partial  left by a conversion that did not finish\n"
    "clean    removes cache files: all of them, or those that match every option\n"
    "         given:\n"
    "  --older-than DAYS   not used for more than DAYS days (a number, e.g. 7 or 0.5)\n"
    "  --stale             changed, gone, unknown or partial: not what a present\n"
    "                      model uses\n"
    "  --dry-run           print what would be removed, and remove nothing\n"
    "A file in use by a running process may be removed: the process keeps its\n"
    "mapping, and the next process to open that model converts it again.\n";

static void human_bytes(uint64_t b, char *buf, size_t n) {
    const char *unit[] = {"B", "KB", "MB", "GB", "TB"};
    double v = (double)b;
    int u = 0;
    while (v >= 1000 && u < 4) v /= 1000, u++;
    snprintf(buf, n, u ? "%.1f %s" : "%.0f %s", v, unit[u]);
}

static void human_age(double seconds, char *buf, size_t n) {
    if (seconds < 0) seconds = 0;
    if (seconds < 3600)
        snprintf(buf, n, "%.0f min ago", seconds / 60);
    else if (seconds < 86400)
        snprintf(buf, n, "%.1f h ago", seconds / 3600);
    else
        snprintf(buf, n, "%.1f days ago", seconds / 86400);
}

static const char *base_name(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

static void print_entry(const f32cache_entry *en, time_t now, const char *prefix) {
    char size[32], age[32];
    human_bytes(en->bytes, size, sizeof size);
    human_age(difftime(now, (time_t)en->mtime), age, sizeof age);
    printf("%s%10s  %-15s %-8s %s  (%s)\n", prefix, size, age, f32cache_state_name(en->state),
           en->model[0] ? en->model : "-", base_name(en->path));
}

int cmd_cache(int argc, char **argv) {
    const char *sub = NULL;
    float days = -1;
    int stale = 0, dry = 0;
    const cmdline_opt opts[] = {CMDLINE_FLOAT("--older-than", &days, 0, 1e6),
                                CMDLINE_SET("--stale", &stale, 1),
                                CMDLINE_SET("--dry-run", &dry, 1)};
    int rc = cmdline_parse("peftps cache", cache_usage, opts, 3, "command", &sub, 1, argc, argv);
    if (rc) return rc == 1 ? 0 : rc;
    if (!sub || (strcmp(sub, "list") && strcmp(sub, "clean"))) {
        fprintf(stderr, "peftps cache: give list or clean%s%s%s\n%s", sub ? " (not \"" : "",
                sub ? sub : "", sub ? "\")" : "", cache_usage);
        return 2;
    }
    int list = !strcmp(sub, "list");
    if (list && (days >= 0 || stale || dry)) {
        fprintf(stderr, "peftps cache list: --older-than, --stale and --dry-run are options of "
                        "clean\n");
        return 2;
    }
    char *dir = f32cache_dir();
    if (!dir) {
        fprintf(stderr, "peftps cache: no cache directory (PEFTPS_CACHE_DIR is set empty, or "
                        "neither XDG_CACHE_HOME nor HOME is set)\n");
        return 2;
    }
    err e;
    f32cache_entry *en = NULL;
    int n = 0;
    if (f32cache_list(dir, &en, &n, &e) < 0) {
        fprintf(stderr, "peftps cache: %s\n", e.msg);
        free(dir);
        return 1;
    }
    time_t now = time(NULL);
    uint64_t total = 0, removed = 0;
    int n_removed = 0;
    char size[32];
    rc = 0;
    if (list) {
        for (int i = 0; i < n; i++) total += en[i].bytes;
        human_bytes(total, size, sizeof size);
        printf("%s: %d file%s, %s\n", dir, n, n == 1 ? "" : "s", size);
        for (int i = 0; i < n; i++) print_entry(&en[i], now, "");
    } else {
        for (int i = 0; i < n; i++) {
            if (days >= 0 && difftime(now, (time_t)en[i].mtime) <= (double)days * 86400.0) continue;
            if (stale && en[i].state == F32CACHE_CURRENT) continue;
            if (!dry && f32cache_remove(&en[i], &e) < 0) {
                fprintf(stderr, "peftps cache clean: %s\n", e.msg);
                rc = 1;
                continue;
            }
            print_entry(&en[i], now, dry ? "would remove " : "removed ");
            removed += en[i].bytes;
            n_removed++;
        }
        human_bytes(removed, size, sizeof size);
        printf("%s %d file%s, %s, from %s\n", dry ? "would remove" : "removed", n_removed,
               n_removed == 1 ? "" : "s", size, dir);
    }
    free(en);
    free(dir);
    return rc;
}
