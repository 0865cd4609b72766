/* Child processes of the commands that start other programs: `peftps run`
 * (cli/cmd_run.c) starts peftps-server and peftps-worker, `peftps compare`
 * (cli/cmd_compare.c) starts `peftps run`. Finding the sibling programs,
 * starting one, polling for exits and saying how one ended. */
#ifndef PEFTPS_SPAWN_H
#define PEFTPS_SPAWN_H

#include <stddef.h>
#include <sys/types.h>

#include "base/err.h"

/* The path of the running binary (n bytes of buf); with `dir_only`, its
 * directory, where its sibling programs are. */
int spawn_self(char *buf, size_t n, int dir_only, err *e);

/* Starts argv[0] with argv (NULL-terminated) in a child whose SIGINT and
 * SIGTERM are back to their defaults; with `quiet`, PEFTPS_LOG=warn unless the
 * user set it. A program that cannot be executed exits 127 after a line
 * naming it and `prog` (the command starting it). Returns the pid, or -1
 * with e set when fork fails. */
pid_t spawn_start(const char *prog, char *const *argv, int quiet, err *e);

/* spawn_start with the child's stdout and stderr appended to the file
 * `log` (created when missing); log NULL: as spawn_start. */
pid_t spawn_start_log(const char *prog, char *const *argv, int quiet, const char *log, err *e);

/* Waits up to 50 ms for `pid` (-1: any child) to end: returns its pid with
 * *status (waitpid's), 0 when none ended, -1 (with errno ECHILD) when there
 * is no child to wait for. */
pid_t spawn_poll(pid_t pid, int *status);

/* The exit status a shell shows for a waitpid status: the code, or
 * 128+signal. */
int spawn_code(int status);

/* "exited with status 3" or "was killed by signal 9 (Killed)". */
const char *spawn_describe(int status, char *buf, size_t n);

/* Sends sig to every positive pid of pids[0 .. n-1]. */
void spawn_kill(const pid_t *pids, int n, int sig);

/* The index of p among pids[0 .. n-1], or -1. */
int spawn_find(const pid_t *pids, int n, pid_t p);

/* A command line as a shell reads it back: prefix, then argv[0 .. argc-1],
 * joined by spaces, each argument quoted when it holds anything but
 * [A-Za-z0-9_./=:,+-@%]. Returns a malloc'd string, NULL when out of memory. */
char *spawn_command_line(const char *prefix, char *const *argv, int argc);

#endif
