/* A pool's coordinator, run by `peftps pool start` (cli/cmd_pool.c): binds
 * a ROUTER for the messages of proto/pool.proto (net/poolmsg.h), keeps the
 * table of jobs and workers (net/pooljobs.h), starts and watches the local
 * workers and each job's parameter servers (cli/spawn.h). */
#ifndef PEFTPS_CLI_POOL_H
#define PEFTPS_CLI_POOL_H

/* The default endpoint of every pool command when neither --pool nor
 * PEFTPS_POOL names one. */
#define POOL_DEFAULT_ENDPOINT "tcp://127.0.0.1:5600"

/* The endpoint a pool command talks to: `given` when not NULL, else
 * $PEFTPS_POOL when set and not empty, else POOL_DEFAULT_ENDPOINT. */
const char *pool_endpoint(const char *given);

typedef struct pool_options {
    const char *model;     /* the base's directory */
    const char *listen;    /* the ROUTER's endpoint */
    const char *advertise; /* the host workers reach the jobs' servers at; NULL: loopback */
    const char *work;      /* logs and the jobs' resolved experiments */
    int workers;           /* local workers to start and keep running */
    int cobatch;           /* 0: start them with --no-cobatch */
} pool_options;

/* Runs the coordinator in the foreground until SIGINT or SIGTERM, then
 * stops every child it started (servers checkpoint) and returns 0; 2 when
 * the base cannot be read, 1 when it could not start otherwise (endpoint,
 * work directory), after printing why. */
int pool_run(const pool_options *o);

#endif
