/* The pool's commands: `peftps pool start` runs a coordinator (cli/pool.c);
 * `peftps submit`, `jobs` and `cancel` are one request each to it over
 * net/poolmsg.h (proto/pool.proto). pool_submit and pool_list serve
 * `peftps compare --pool` (cli/cmd_compare.c) too. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/progress.h"
#include "cli.h"
#include "config/cmdline.h"
#include "config/config.h"
#include "net/poolmsg.h"
#include "pool.h"
#include "train/experiment.h"

/* Answers come within this (submit checks the experiment and its base). */
#define POOL_TIMEOUT_MS 10000

/* ---- requests ------------------------------------------------------------------- */

/* Sends req to the pool at ep: 0 with *reply, 2 when the pool refused (e
 * holds why), 1 when it did not answer or another failure. */
static int pool_ask(const char *ep, const Peftps__Pool__PoolMessage *req, int expect,
                    Peftps__Pool__PoolMessage **reply, err *e) {
    int rc = poolmsg_request(ep, req, POOL_TIMEOUT_MS, reply, e);
    if (rc == -2) return 2;
    if (rc < 0) return 1;
    if ((int)(*reply)->body_case != expect) {
        err_set(e, "pool %s answered with a %s message, not %s", ep,
                poolmsg_body_name((*reply)->body_case), poolmsg_body_name(expect));
        poolmsg_free(*reply);
        *reply = NULL;
        return 1;
    }
    return 0;
}

int pool_submit(const char *ep, const Peftps__Experiment *ex, const char *source, double share,
                Peftps__Pool__PoolMessage **reply, err *e) {
    char *text = NULL;
    if (pbtext_print(&ex->base, &text, e) < 0) return 1;
    Peftps__Pool__Submit s = PEFTPS__POOL__SUBMIT__INIT;
    s.experiment = text;
    s.source = (char *)source;
    if (share > 0) s.has_share = 1, s.share = share;
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_SUBMIT;
    m.submit = &s;
    int rc = pool_ask(ep, &m, PEFTPS__POOL__POOL_MESSAGE__BODY_JOBS, reply, e);
    free(text);
    if (rc == 0 && (*reply)->jobs->n_jobs != 1) {
        poolmsg_free(*reply);
        *reply = NULL;
        err_set(e, "pool %s answered a submit without the job", ep);
        return 1;
    }
    return rc;
}

int pool_list(const char *ep, Peftps__Pool__PoolMessage **reply, err *e) {
    Peftps__Pool__ListJobs l = PEFTPS__POOL__LIST_JOBS__INIT;
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_LIST_JOBS;
    m.list_jobs = &l;
    return pool_ask(ep, &m, PEFTPS__POOL__POOL_MESSAGE__BODY_JOBS, reply, e);
}

const Peftps__Pool__Job *pool_job_in(const Peftps__Pool__Jobs *js, const char *id) {
    for (size_t i = 0; i < js->n_jobs; i++)
        if (js->jobs[i]->id && !strcmp(js->jobs[i]->id, id)) return js->jobs[i];
    return NULL;
}

int pool_job_ended(const Peftps__Pool__Job *j) {
    return j->state == PEFTPS__POOL__JOB_STATE__DONE ||
           j->state == PEFTPS__POOL__JOB_STATE__FAILED ||
           j->state == PEFTPS__POOL__JOB_STATE__CANCELLED;
}

/* ---- peftps pool -------------------------------------------------------------------- */

static const char pool_start_usage[] =
    "usage: peftps pool start --model DIR [--listen ENDPOINT] [--workers N] [--work DIR]\n"
    "                         [--advertise HOST] [--no-cobatch]\n\n"
    "Runs a pool in the foreground: a coordinator at ENDPOINT that serves the base\n"
    "model in DIR to every experiment submitted to it (`peftps submit`), and N\n"
    "local workers (peftps-worker --pool) that train them side by side, restarted\n"
    "when they die. Each experiment (a job, named by its experiment's name) gets\n"
    "its own parameter server(s), started here on free loopback ports, with its\n"
    "own tensors, optimizer, checkpoint and fingerprint; a server that fails is\n"
    "restarted from its checkpoint (at most 5 times). Workers on other machines\n"
    "join with `peftps-worker --pool ENDPOINT --model DIR`. A line on stderr for\n"
    "every job that changes state. Ctrl-C (or SIGTERM) stops every server (each\n"
    "checkpoints) and worker, then exits 0.\n\n"
    "options:\n"
    "  --model DIR         the base model (config.json, model.safetensors); required\n"
    "  --listen ENDPOINT   where the coordinator listens (default $PEFTPS_POOL or\n"
    "                      " POOL_DEFAULT_ENDPOINT ")\n"
    "  --workers N         local workers to run (default 2; 0: the coordinator only,\n"
    "                      workers joining from elsewhere)\n"
    "  --work DIR          the workers' logs and, per job, WORK/jobs/ID/\n"
    "                      (experiment.pbtxt, server-I.log) (default ./pool)\n"
    "  --advertise HOST    the jobs' servers listen on every interface and workers\n"
    "                      reach them at HOST (this machine's name or address, for\n"
    "                      workers on other machines; default: loopback only)\n"
    "  --no-cobatch        the workers run each job's frozen products on their own\n";

static int pool_start(int argc, char **argv) {
    pool_options o = {.listen = NULL, .work = "pool", .workers = 2, .cobatch = 1};
    int no_cobatch = 0;
    const cmdline_opt opts[] = {CMDLINE_STR("--model", &o.model),
                                CMDLINE_STR("--listen", &o.listen),
                                CMDLINE_INT("--workers", &o.workers, 0, 256),
                                CMDLINE_STR("--work", &o.work),
                                CMDLINE_SET("--no-cobatch", &no_cobatch, 1),
                                CMDLINE_STR("--advertise", &o.advertise)};
    int rc = cmdline_parse("peftps pool start", pool_start_usage, opts, 6, "argument", NULL, 0,
                           argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!o.model) {
        fprintf(stderr, "peftps pool start: --model DIR is required: the base the pool serves\n%s",
                pool_start_usage);
        return 2;
    }
    o.listen = pool_endpoint(o.listen);
    o.cobatch = !no_cobatch;
    return pool_run(&o);
}

static void pool_usage(FILE *out) {
    fprintf(out, "usage: peftps pool SUBCOMMAND [ARGS...]\n\n"
                 "A pool: workers that map one base model once and train many experiments\n"
                 "side by side. Submit with `peftps submit`, watch with `peftps jobs`, stop one\n"
                 "with `peftps cancel`.\n\n"
                 "subcommands:\n"
                 "  start      run a pool's coordinator and its local workers\n");
}

int cmd_pool(int argc, char **argv) {
    static const cli_command subs[] = {
        {"start", pool_start, "run a pool's coordinator and its local workers"}};
    return cli_dispatch("peftps pool", "subcommand", subs, 1, pool_usage, argc, argv);
}

/* ---- peftps submit ------------------------------------------------------------------ */

static const char submit_usage[] =
    "usage: peftps submit EXPERIMENT.pbtxt [--pool ENDPOINT] [--share X]\n"
    "                     [--set PATH=VALUE ...] [--wait]\n\n"
    "Loads and checks the experiment as `peftps run` does, then submits it to the\n"
    "pool at ENDPOINT, which starts its server(s) and trains it beside its other\n"
    "jobs. The job is named by the experiment's name; it writes what `peftps train`\n"
    "writes under output_dir. The pool refuses, saying why, an experiment on\n"
    "another base, or one whose name, fingerprint, output_dir or checkpoint.path\n"
    "a running job has. Relative paths in the experiment are taken from the\n"
    "pool's working directory.\n\n"
    "options:\n"
    "  --pool ENDPOINT    the pool (default $PEFTPS_POOL or " POOL_DEFAULT_ENDPOINT ")\n"
    "  --share X          the job's weight in the pool's sharing, 0.01 to 100\n"
    "                     (default cluster.share of the experiment, 1)\n"
    "  --set PATH=VALUE   override a field, e.g. --set optimizer.lr=3e-4 (repeatable)\n"
    "  --wait             show the job's progress until it ends: exit 0 when done,\n"
    "                     1 when it failed or was cancelled\n";

/* Polls the pool each second until job id ends: its progress on stderr. */
int pool_wait(const char *ep, const char *id, int quiet) {
    progress pr;
    int started = 0, misses = 0;
    for (;;) {
        Peftps__Pool__PoolMessage *r = NULL;
        err e;
        int rc = pool_list(ep, &r, &e);
        if (rc) {
            if (rc == 1 && ++misses < 5) {
                struct timespec nap = {1, 0};
                nanosleep(&nap, NULL);
                continue;
            }
            if (started) progress_end(&pr);
            fprintf(stderr, "peftps: waiting for job %s: %s\n", id, e.msg);
            return 1;
        }
        misses = 0;
        const Peftps__Pool__Job *j = pool_job_in(r->jobs, id);
        if (!j) {
            if (started) progress_end(&pr);
            fprintf(stderr, "peftps: job %s is no longer in the pool at %s (did it restart?)\n", id,
                    ep);
            poolmsg_free(r);
            return 1;
        }
        if (!quiet) {
            if (!started) progress_start(&pr, j->total_steps ? j->total_steps : 1), started = 1;
            char detail[200];
            if (j->has_loss && isfinite(j->loss))
                snprintf(detail, sizeof detail, "%s  loss %.4f  %.0f tok/s",
                         poolmsg_state_name(j->state), j->loss, j->tokens_per_s);
            else
                snprintf(detail, sizeof detail, "%s", poolmsg_state_name(j->state));
            progress_update(&pr, j->step, detail);
        }
        if (pool_job_ended(j)) {
            if (started) progress_end(&pr);
            int ok = j->state == PEFTPS__POOL__JOB_STATE__DONE;
            if (!quiet || !ok)
                fprintf(ok ? stdout : stderr, "job %s %s%s%s\n", id, poolmsg_state_name(j->state),
                        j->message && *j->message ? ": " : "", j->message ? j->message : "");
            poolmsg_free(r);
            return ok ? 0 : 1;
        }
        poolmsg_free(r);
        struct timespec nap = {1, 0};
        nanosleep(&nap, NULL);
    }
}

int cmd_submit(int argc, char **argv) {
    const char *ep = NULL, *path;
    float share = 0;
    int wait = 0;
    config_args sets = {0};
    const cmdline_opt opts[] = {CMDLINE_STR("--pool", &ep),
                                CMDLINE_FLOAT("--share", &share, 0.01, 100),
                                CMDLINE_SET("--wait", &wait, 1)};
    int rc =
        cmdline_experiment_args("peftps submit", submit_usage, opts, 3, argc, argv, &path, &sets);
    if (rc) {
        config_args_free(&sets);
        return rc == 1 ? 0 : 2;
    }
    ep = pool_endpoint(ep);
    err e;
    Peftps__Experiment *ex = NULL;
    if (experiment_load(path, sets.sets, sets.nsets, &ex, NULL, &e) < 0) {
        config_args_free(&sets);
        fprintf(stderr, "%s\n", e.msg);
        return 2;
    }
    config_args_free(&sets);
    Peftps__Pool__PoolMessage *r = NULL;
    rc = pool_submit(ep, ex, path, share, &r, &e);
    config_free(ex);
    if (rc) {
        fprintf(stderr, "peftps submit: %s\n", e.msg);
        return rc;
    }
    const Peftps__Pool__Job *j = r->jobs->jobs[0];
    char id[256];
    snprintf(id, sizeof id, "%s", j->id ? j->id : "?");
    printf("submitted job %s to the pool at %s: outputs in %s\n", id, ep,
           j->output_dir ? j->output_dir : "?");
    if (j->message && *j->message && strncmp(j->message, "waiting for", 11))
        printf("note: %s\n", j->message);
    printf("follow it with `peftps jobs --pool %s`; stop it with `peftps cancel %s --pool %s`\n",
           ep, id, ep);
    fflush(stdout);
    poolmsg_free(r);
    return wait ? pool_wait(ep, id, 0) : 0;
}

/* ---- peftps jobs -------------------------------------------------------------------- */

static const char jobs_usage[] =
    "usage: peftps jobs [--pool ENDPOINT] [--json]\n\n"
    "Lists the jobs of the pool at ENDPOINT, ended ones too:\n"
    "  ID          the job (its experiment's name)\n"
    "  STATE       starting, running, done, failed or cancelled\n"
    "  STEP/TOTAL  steps done and to do\n"
    "  LOSS        the last step's training loss\n"
    "  TOK/S       tokens trained per second\n"
    "  SHARE       its weight as a fraction of the running jobs' weights: what it\n"
    "              is due\n"
    "  GOT         its fraction of all the worker time the pool has spent\n"
    "  OUTPUT      its output_dir\n"
    "then why each failed or what its server last said.\n\n"
    "options:\n"
    "  --pool ENDPOINT   the pool (default $PEFTPS_POOL or " POOL_DEFAULT_ENDPOINT ")\n"
    "  --json            JSON lines instead of the table: first the pool (base_path,\n"
    "                    base_fingerprint, workers), then one object per job (id,\n"
    "                    state, step, total_steps, loss, tokens_per_s, share,\n"
    "                    share_of_running, share_got, compute_s, output_dir, ...)\n";

static double jobs_running_weight(const Peftps__Pool__Jobs *js) {
    double w = 0;
    for (size_t i = 0; i < js->n_jobs; i++)
        if (js->jobs[i]->state == PEFTPS__POOL__JOB_STATE__RUNNING) w += js->jobs[i]->share;
    return w;
}

static int jobs_json(const Peftps__Pool__Jobs *js) {
    double w = jobs_running_weight(js);
    json_t *pool = json_pack("{s:s, s:s, s:i}", "base_path", js->base_path ? js->base_path : "",
                             "base_fingerprint", js->base_fingerprint ? js->base_fingerprint : "",
                             "workers", (int)js->workers);
    char *head = pool ? json_dumps(pool, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(pool);
    if (!head) {
        fprintf(stderr, "peftps jobs: out of memory\n");
        return 1;
    }
    printf("%s\n", head);
    free(head);
    for (size_t i = 0; i < js->n_jobs; i++) {
        const Peftps__Pool__Job *j = js->jobs[i];
        int running = j->state == PEFTPS__POOL__JOB_STATE__RUNNING;
        json_t *o = json_object();
        json_object_set_new(o, "id", json_string(j->id ? j->id : ""));
        json_object_set_new(o, "state", json_string(poolmsg_state_name(j->state)));
        json_object_set_new(o, "step", json_integer((json_int_t)j->step));
        json_object_set_new(o, "total_steps", json_integer((json_int_t)j->total_steps));
        json_object_set_new(o, "loss",
                            j->has_loss && isfinite(j->loss) ? json_real(j->loss) : json_null());
        json_object_set_new(o, "tokens_per_s",
                            json_real(isfinite(j->tokens_per_s) ? j->tokens_per_s : 0));
        json_object_set_new(o, "share", json_real(j->share));
        json_object_set_new(o, "share_of_running", json_real(running && w > 0 ? j->share / w : 0));
        json_object_set_new(o, "share_got", json_real(j->share_got));
        json_object_set_new(o, "compute_s", json_real(j->compute_s));
        json_object_set_new(o, "output_dir", json_string(j->output_dir ? j->output_dir : ""));
        json_object_set_new(o, "fingerprint", json_string(j->fingerprint ? j->fingerprint : ""));
        json_object_set_new(o, "message", json_string(j->message ? j->message : ""));
        json_object_set_new(o, "submitted_s", json_real(j->submitted_s));
        json_object_set_new(o, "ended_s", json_real(j->ended_s));
        char *text = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
        json_decref(o);
        if (!text) {
            fprintf(stderr, "peftps jobs: out of memory\n");
            return 1;
        }
        printf("%s\n", text);
        free(text);
    }
    return 0;
}

static void jobs_table(const char *ep, const Peftps__Pool__Jobs *js) {
    double w = jobs_running_weight(js);
    printf("pool %s: base %s (fingerprint %.12s..), %u worker(s), %zu job(s)\n", ep,
           js->base_path ? js->base_path : "?", js->base_fingerprint ? js->base_fingerprint : "?",
           js->workers, js->n_jobs);
    if (!js->n_jobs) return;
    printf("%-24s %-10s %13s %8s %8s %6s %6s  %s\n", "ID", "STATE", "STEP/TOTAL", "LOSS", "TOK/S",
           "SHARE", "GOT", "OUTPUT");
    for (size_t i = 0; i < js->n_jobs; i++) {
        const Peftps__Pool__Job *j = js->jobs[i];
        char steps[48], loss[32], tps[32], share[16], got[16];
        snprintf(steps, sizeof steps, "%llu/%llu", (unsigned long long)j->step,
                 (unsigned long long)j->total_steps);
        if (j->has_loss && isfinite(j->loss))
            snprintf(loss, sizeof loss, "%.4f", j->loss);
        else
            snprintf(loss, sizeof loss, "-");
        if (j->tokens_per_s > 0)
            snprintf(tps, sizeof tps, "%.0f", j->tokens_per_s);
        else
            snprintf(tps, sizeof tps, "-");
        if (j->state == PEFTPS__POOL__JOB_STATE__RUNNING && w > 0)
            snprintf(share, sizeof share, "%.2f", j->share / w);
        else
            snprintf(share, sizeof share, "-");
        snprintf(got, sizeof got, "%.2f", j->share_got);
        printf("%-24s %-10s %13s %8s %8s %6s %6s  %s\n", j->id ? j->id : "?",
               poolmsg_state_name(j->state), steps, loss, tps, share, got,
               j->output_dir ? j->output_dir : "");
    }
    int header = 0;
    for (size_t i = 0; i < js->n_jobs; i++) {
        const Peftps__Pool__Job *j = js->jobs[i];
        if (!j->message || !*j->message) continue;
        if (!header) printf("\n"), header = 1;
        printf("%s: %s\n", j->id ? j->id : "?", j->message);
    }
}

int cmd_jobs(int argc, char **argv) {
    const char *ep = NULL;
    int json = 0;
    const cmdline_opt opts[] = {CMDLINE_STR("--pool", &ep), CMDLINE_SET("--json", &json, 1)};
    int rc = cmdline_parse("peftps jobs", jobs_usage, opts, 2, "argument", NULL, 0, argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    ep = pool_endpoint(ep);
    Peftps__Pool__PoolMessage *r = NULL;
    err e;
    if ((rc = pool_list(ep, &r, &e))) {
        fprintf(stderr, "peftps jobs: %s\n", e.msg);
        return rc;
    }
    rc = 0;
    if (json)
        rc = jobs_json(r->jobs);
    else
        jobs_table(ep, r->jobs);
    poolmsg_free(r);
    if (fflush(stdout) || ferror(stdout)) {
        perror("peftps jobs: writing");
        return 1;
    }
    return rc;
}

/* ---- peftps cancel ------------------------------------------------------------------ */

static const char cancel_usage[] =
    "usage: peftps cancel ID [--pool ENDPOINT]\n\n"
    "Cancels job ID of the pool at ENDPOINT: the workers drop it, its server(s)\n"
    "checkpoint the last completed step and stop. Submitting the same experiment\n"
    "again resumes from that checkpoint.\n\n"
    "options:\n"
    "  --pool ENDPOINT   the pool (default $PEFTPS_POOL or " POOL_DEFAULT_ENDPOINT ")\n";

int cmd_cancel(int argc, char **argv) {
    const char *ep = NULL, *id = NULL;
    const cmdline_opt opts[] = {CMDLINE_STR("--pool", &ep)};
    int rc = cmdline_parse("peftps cancel", cancel_usage, opts, 1, "job id", &id, 1, argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!id) {
        fprintf(stderr, "peftps cancel: no job id given (`peftps jobs` lists them)\n%s",
                cancel_usage);
        return 2;
    }
    ep = pool_endpoint(ep);
    Peftps__Pool__Cancel c = PEFTPS__POOL__CANCEL__INIT;
    c.id = (char *)id;
    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT;
    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_CANCEL;
    m.cancel = &c;
    Peftps__Pool__PoolMessage *r = NULL;
    err e;
    if ((rc = pool_ask(ep, &m, PEFTPS__POOL__POOL_MESSAGE__BODY_JOBS, &r, &e))) {
        fprintf(stderr, "peftps cancel: %s\n", e.msg);
        return rc;
    }
    const Peftps__Pool__Job *j = r->jobs->n_jobs ? r->jobs->jobs[0] : NULL;
    printf("cancelled job %s at step %llu: its server(s) checkpoint and stop\n", id,
           j ? (unsigned long long)j->step : 0ull);
    poolmsg_free(r);
    return 0;
}
