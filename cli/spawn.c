/* Child processes for `peftps run` and `peftps compare`; see spawn.h. */
#include "spawn.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int spawn_self(char *buf, size_t n, int dir_only, err *e) {
    ssize_t k = readlink("/proc/self/exe", buf, n - 1);
    if (k < 0) return err_errno(e, "reading /proc/self/exe");
    buf[k] = '\0';
    if (!dir_only) return 0;
    char *slash = strrchr(buf, '/');
    if (!slash) return err_set(e, "cannot tell the directory of %s", buf);
    *slash = '\0';
    return 0;
}

pid_t spawn_start(const char *prog, char *const *argv, int quiet, err *e) {
    return spawn_start_log(prog, argv, quiet, NULL, e);
}

pid_t spawn_start_log(const char *prog, char *const *argv, int quiet, const char *log, err *e) {
    pid_t parent = getpid();
    fflush(stdout);
    fflush(stderr);
    /* Opened before the fork, so that a log that cannot be written is the
     * caller's error, not a child's silent exit. */
    int fd = -1;
    if (log && (fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644)) < 0)
        return err_errno(e, "opening the log %s", log);
    pid_t pid = fork();
    if (pid < 0) {
        if (fd >= 0) close(fd);
        return err_errno(e, "fork");
    }
    if (pid > 0) {
        if (fd >= 0) close(fd);
        return pid;
    }
    if (pid == 0) {
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        /* Helpers speak only of trouble: the server's progress line is the
         * one a user follows. */
        if (quiet && !getenv("PEFTPS_LOG")) setenv("PEFTPS_LOG", "warn", 1);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        /* A child does not outlive the command that started it (killed,
         * say): it gets SIGTERM then, on which a server checkpoints and a
         * worker stops, so that no orphan trains on beside a new start. */
        if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0 || getppid() != parent) _exit(128 + SIGTERM);
        execv(argv[0], argv);
        fprintf(stderr, "%s: cannot start %s: %s\n", prog, argv[0], strerror(errno));
        _exit(127);
    }
    return pid;
}

pid_t spawn_poll(pid_t pid, int *status) {
    pid_t p = waitpid(pid, status, WNOHANG);
    if (p > 0 || (p < 0 && errno != EINTR)) return p;
    struct timespec nap = {0, 50 * 1000 * 1000};
    nanosleep(&nap, NULL);
    return 0;
}

int spawn_code(int status) {
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

const char *spawn_describe(int status, char *buf, size_t n) {
    if (WIFSIGNALED(status))
        snprintf(buf, n, "was killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else
        snprintf(buf, n, "exited with status %d", spawn_code(status));
    return buf;
}

void spawn_kill(const pid_t *pids, int n, int sig) {
    for (int i = 0; i < n; i++)
        if (pids[i] > 0) kill(pids[i], sig);
}

int spawn_find(const pid_t *pids, int n, pid_t p) {
    for (int i = 0; i < n; i++)
        if (pids[i] == p) return i;
    return -1;
}

static int spawn_plain(const char *a) {
    if (!*a) return 0;
    for (; *a; a++)
        if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./=:,+-@%", *a))
            return 0;
    return 1;
}

char *spawn_command_line(const char *prefix, char *const *argv, int argc) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return NULL;
    fputs(prefix, f);
    for (int i = 0; i < argc; i++) {
        fputc(' ', f);
        if (spawn_plain(argv[i])) {
            fputs(argv[i], f);
            continue;
        }
        fputc('\'', f);
        for (const char *c = argv[i]; *c; c++)
            if (*c == '\'')
                fputs("'\\''", f);
            else
                fputc(*c, f);
        fputc('\'', f);
    }
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}
