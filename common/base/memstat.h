/* A process's memory as Linux accounts it in /proc/PID/status, split the way
 * a worker's memory matters: private (anonymous) pages, which each process
 * pays for alone, and file-backed pages, mostly the base model's mapped
 * files, which every process of a machine shares through the page cache.
 * cli/cmd_compare.c samples its runs' processes; server/ and worker/ publish
 * their own figures as metrics (net/httpd.h). */
#ifndef PEFTPS_MEMSTAT_H
#define PEFTPS_MEMSTAT_H

#include <sys/types.h>

typedef struct memstat {
    long private_kib; /* RssAnon: resident private memory (heap, activations, optimizer) */
    long mapped_kib;  /* RssFile + RssShmem: resident pages of mapped files (the base) */
    long rss_kib;     /* VmRSS: the two together */
    long peak_kib;    /* VmHWM: the largest VmRSS so far */
    char name[64];    /* Name: the command's name, e.g. "peftps-worker" */
} memstat;

/* Reads /proc/PID/status (pid 0: this process). Fields the kernel does not
 * report are -1. Returns 0, or -1 when the process is gone or /proc is not
 * mounted (no message: a sampler skips such processes). */
int memstat_read(pid_t pid, memstat *m);

#endif
