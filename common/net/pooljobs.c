/* A pool coordinator's table of jobs and workers (pooljobs.h). */
#include "net/pooljobs.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"
#include "model/model.h"

int pooljobs_init(pooljobs *t, const char *base_path, const char *base_fingerprint, err *e) {
    memset(t, 0, sizeof *t);
    t->base_path = strdup(base_path);
    t->workers = calloc(POOLJOBS_MAX_WORKERS, sizeof *t->workers);
    t->gone = calloc(POOLJOBS_MAX_WORKERS, sizeof *t->gone);
    if (!t->base_path || !t->workers || !t->gone) {
        pooljobs_free(t);
        return err_set(e, "out of memory");
    }
    snprintf(t->base_fingerprint, sizeof t->base_fingerprint, "%s", base_fingerprint);
    t->revision = 1;
    return 0;
}

static void job_free(pooljob *j) {
    if (!j) return;
    free(j->id);
    free(j->experiment);
    free(j->output_dir);
    free(j->checkpoint);
    free(j);
}

void pooljobs_free(pooljobs *t) {
    for (int i = 0; i < t->n_jobs; i++) job_free(t->jobs[i]);
    free(t->base_path);
    free(t->workers);
    free(t->gone);
    memset(t, 0, sizeof *t);
}

int pooljobs_live(const pooljob *j) {
    return j->state == PEFTPS__POOL__JOB_STATE__STARTING ||
           j->state == PEFTPS__POOL__JOB_STATE__RUNNING;
}

pooljob *pooljobs_find(const pooljobs *t, const char *id) {
    if (!id) return NULL;
    for (int i = 0; i < t->n_jobs; i++)
        if (!strcmp(t->jobs[i]->id, id)) return t->jobs[i];
    return NULL;
}

/* A job id names a directory of the pool's work area: no '/', no leading
 * '.', nothing a shell or a path would read otherwise. */
static int id_ok(const char *s) {
    size_t n = strlen(s);
    if (n == 0 || n > POOLJOBS_ID_MAX || s[0] == '.' || s[0] == '-') return 0;
    for (; *s; s++)
        if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-", *s))
            return 0;
    return 1;
}

/* The first 12 hex digits of a fingerprint, for messages. */
static const char *short_fp(const char *fp, char buf[16]) {
    snprintf(buf, 16, "%.12s..", fp);
    return buf;
}

int pooljobs_admit(const pooljobs *t, const Peftps__Experiment *ex, const char *fp,
                   const char *base_fp_given, const char *source, err *e) {
    char a[16], b[16];
    if (!id_ok(ex->name))
        return err_set(e,
                       "%s: the experiment's name \"%.64s\" cannot name a pool job: use at most "
                       "%d letters, digits, '.', '_' and '-', not starting with '.' or '-'",
                       source, ex->name, POOLJOBS_ID_MAX);
    if (ex->cluster->n_servers > POOLJOBS_MAX_SERVERS)
        return err_set(e, "%s: %zu cluster.servers; a pool job has at most %d", source,
                       ex->cluster->n_servers, POOLJOBS_MAX_SERVERS);
    char base_fp[65];
    err me;
    if (base_fp_given)
        snprintf(base_fp, sizeof base_fp, "%s", base_fp_given);
    else if (model_files_probe(ex->model->path, base_fp, &me) < 0)
        return err_set(e, "%s: model.path \"%s\" cannot be opened here: %s", source,
                       ex->model->path, me.msg);
    if (strcmp(base_fp, t->base_fingerprint))
        return err_set(e,
                       "experiment %s trains on the base at %s (fingerprint %s), this pool serves "
                       "%s (fingerprint %s): submit it to a pool of that base",
                       ex->name, ex->model->path, short_fp(base_fp, a), t->base_path,
                       short_fp(t->base_fingerprint, b));
    for (int i = 0; i < t->n_jobs; i++) {
        const pooljob *j = t->jobs[i];
        if (!pooljobs_live(j)) continue;
        if (!strcmp(j->fingerprint, fp))
            return err_set(e,
                           "%s: the same experiment as job %s (fingerprint %s): a fingerprint "
                           "clash; change a setting (seed, data, method) or cancel %s",
                           source, j->id, short_fp(fp, a), j->id);
        if (!strcmp(j->id, ex->name))
            return err_set(e, "%s: a job named %s is %s; give the experiment another name", source,
                           j->id, poolmsg_state_name(j->state));
        if (!strcmp(j->output_dir, ex->output_dir))
            return err_set(e, "%s: output_dir %s is job %s's; give the experiment its own", source,
                           j->output_dir, j->id);
        if (!strcmp(j->checkpoint, ex->checkpoint->path))
            return err_set(e, "%s: checkpoint.path %s is job %s's; give the experiment its own",
                           source, j->checkpoint, j->id);
    }
    return 0;
}

pooljob *pooljobs_add(pooljobs *t, const Peftps__Experiment *ex, const char *text, const char *fp,
                      double share, int external, double now, err *e) {
    size_t len = strlen(text);
    if (len > POOLJOBS_MAX_TEXT) {
        err_set(e, "experiment %s is %zu bytes resolved; a pool job's is at most %d", ex->name, len,
                POOLJOBS_MAX_TEXT);
        return NULL;
    }
    if (t->n_jobs == POOLJOBS_MAX) {
        int oldest = -1;
        for (int i = 0; i < t->n_jobs; i++)
            if (!pooljobs_live(t->jobs[i]) &&
                (oldest < 0 || t->jobs[i]->ended_s < t->jobs[oldest]->ended_s))
                oldest = i;
        if (oldest < 0) {
            err_set(e, "the pool holds %d live jobs, its most: wait for one to end", POOLJOBS_MAX);
            return NULL;
        }
        job_free(t->jobs[oldest]);
        memmove(&t->jobs[oldest], &t->jobs[oldest + 1],
                (size_t)(t->n_jobs - oldest - 1) * sizeof *t->jobs);
        t->n_jobs--;
    }
    /* An ended job of the same name gives its place to the new one. */
    for (int i = 0; i < t->n_jobs; i++)
        if (!strcmp(t->jobs[i]->id, ex->name)) {
            job_free(t->jobs[i]);
            memmove(&t->jobs[i], &t->jobs[i + 1], (size_t)(t->n_jobs - i - 1) * sizeof *t->jobs);
            t->n_jobs--;
            break;
        }
    pooljob *j = calloc(1, sizeof *j);
    if (!j || !(j->id = strdup(ex->name)) || !(j->experiment = strdup(text)) ||
        !(j->output_dir = strdup(ex->output_dir)) ||
        !(j->checkpoint = strdup(ex->checkpoint->path))) {
        job_free(j);
        err_set(e, "out of memory");
        return NULL;
    }
    snprintf(j->fingerprint, sizeof j->fingerprint, "%s", fp);
    j->share = share;
    j->state = PEFTPS__POOL__JOB_STATE__STARTING;
    j->total_steps = ex->schedule->total_steps;
    j->n_servers = (int)ex->cluster->n_servers;
    j->external = external;
    j->submitted_s = now;
    j->serial = ++t->next_serial;
    j->loss = NAN;
    snprintf(j->message, sizeof j->message, "waiting for its %d server(s)", j->n_servers);
    t->jobs[t->n_jobs++] = j;
    return j;
}

int pooljobs_set_state(pooljobs *t, pooljob *j, int state, const char *message, double now) {
    if (!pooljobs_live(j)) return 0;
    if (message) snprintf(j->message, sizeof j->message, "%s", message);
    if (j->state == state) return 0;
    if (j->state == PEFTPS__POOL__JOB_STATE__RUNNING || state == PEFTPS__POOL__JOB_STATE__RUNNING)
        t->revision++;
    j->state = state;
    if (!pooljobs_live(j)) j->ended_s = now > 0 ? now : 1e-9;
    return 1;
}

int pooljobs_announce(pooljobs *t, pooljob *j, uint32_t index, double now, err *e) {
    if (index >= (uint32_t)j->n_servers)
        return err_set(e, "job %s has %d server(s); there is no server %u", j->id, j->n_servers,
                       index);
    j->announced[index] = 1;
    for (int i = 0; i < j->n_servers; i++)
        if (!j->announced[i]) return 0;
    if (j->state != PEFTPS__POOL__JOB_STATE__STARTING) return 0;
    return pooljobs_set_state(t, j, PEFTPS__POOL__JOB_STATE__RUNNING, "", now);
}

int pooljobs_server_left(pooljobs *t, pooljob *j, uint32_t index, double now) {
    if (index >= (uint32_t)j->n_servers || !pooljobs_live(j)) return 0;
    j->announced[index] = 0;
    char msg[128];
    snprintf(msg, sizeof msg, "its server %u stopped; waiting for it to announce itself again",
             index);
    return pooljobs_set_state(t, j, PEFTPS__POOL__JOB_STATE__STARTING, msg, now);
}

int pooljobs_usage(pooljobs *t, const char *id, double compute_s, uint64_t shards, err *e) {
    pooljob *j = pooljobs_find(t, id);
    if (!j) return err_set(e, "usage for an unknown job \"%.64s\"", id ? id : "");
    if (!isfinite(compute_s) || compute_s < 0 || compute_s > 3600 || shards > (1u << 30))
        return err_set(e, "usage of job %s out of range (%g s, %llu shards)", j->id, compute_s,
                       (unsigned long long)shards);
    j->compute_s += compute_s;
    j->shards += shards;
    return 0;
}

double pooljobs_share_got(const pooljobs *t, const pooljob *j) {
    double total = 0;
    for (int i = 0; i < t->n_jobs; i++) total += t->jobs[i]->compute_s;
    return total > 0 ? j->compute_s / total : 0;
}

double pooljobs_share_of_running(const pooljobs *t, const pooljob *j) {
    if (j->state != PEFTPS__POOL__JOB_STATE__RUNNING) return 0;
    double total = 0;
    for (int i = 0; i < t->n_jobs; i++)
        if (t->jobs[i]->state == PEFTPS__POOL__JOB_STATE__RUNNING) total += t->jobs[i]->share;
    return total > 0 ? j->share / total : 0;
}

void pooljobs_job_msg(const pooljobs *t, const pooljob *j, int with_experiment,
                      Peftps__Pool__Job *out) {
    peftps__pool__job__init(out);
    out->id = j->id;
    if (with_experiment) out->experiment = j->experiment;
    out->fingerprint = (char *)j->fingerprint;
    out->has_share = 1, out->share = j->share;
    out->has_state = 1, out->state = (Peftps__Pool__JobState)j->state;
    out->has_step = 1, out->step = j->step;
    out->has_total_steps = 1, out->total_steps = j->total_steps;
    if (isfinite(j->loss)) out->has_loss = 1, out->loss = j->loss;
    out->has_tokens_per_s = 1, out->tokens_per_s = j->tokens_per_s;
    out->has_compute_s = 1, out->compute_s = j->compute_s;
    out->has_share_got = 1, out->share_got = pooljobs_share_got(t, j);
    out->message = (char *)j->message;
    out->output_dir = j->output_dir;
    out->has_submitted_s = 1, out->submitted_s = j->submitted_s;
    out->has_ended_s = 1, out->ended_s = j->ended_s;
}

poolworker *pooljobs_worker_find(pooljobs *t, const unsigned char *ident, size_t ident_len) {
    for (int i = 0; i < t->n_workers; i++)
        if (t->workers[i].ident_len == ident_len && !memcmp(t->workers[i].ident, ident, ident_len))
            return &t->workers[i];
    return NULL;
}

int pooljobs_worker_hello(pooljobs *t, const unsigned char *ident, size_t ident_len,
                          const Peftps__Pool__WorkerHello *h, double now, err *e) {
    const char *id = h->worker_id ? h->worker_id : "";
    char a[16], b[16];
    if (!h->has_protocol_version || h->protocol_version != POOLMSG_PROTOCOL_VERSION)
        return err_set(e,
                       "worker %.64s speaks pool protocol %u, this pool %d: run the same "
                       "version of peftps on both",
                       id, h->has_protocol_version ? h->protocol_version : 0,
                       POOLMSG_PROTOCOL_VERSION);
    if (strlen(id) > POOLJOBS_ID_MAX)
        return err_set(e, "a worker id of %zu bytes (at most %d)", strlen(id), POOLJOBS_ID_MAX);
    if (ident_len > POOLMSG_ID_MAX) return err_set(e, "a worker identity of %zu bytes", ident_len);
    if (!h->base_fingerprint || strcmp(h->base_fingerprint, t->base_fingerprint))
        return err_set(e,
                       "worker %s mapped a base with fingerprint %s, this pool serves %s "
                       "(fingerprint %s): start the worker with --model on that base",
                       id, h->base_fingerprint ? short_fp(h->base_fingerprint, a) : "(none)",
                       t->base_path, short_fp(t->base_fingerprint, b));
    poolworker *w = pooljobs_worker_find(t, ident, ident_len);
    if (!w) {
        if (t->n_workers == POOLJOBS_MAX_WORKERS)
            return err_set(e, "the pool has %d workers, its most", POOLJOBS_MAX_WORKERS);
        w = &t->workers[t->n_workers++];
        memcpy(w->ident, ident, ident_len);
        w->ident_len = ident_len;
    }
    snprintf(w->id, sizeof w->id, "%s", id);
    w->bf16 = h->has_bf16 && h->bf16;
    w->last_seen = now;
    return 0;
}

int pooljobs_worker_expire(pooljobs *t, double now, char *last_id, size_t n) {
    int dropped = 0;
    for (int i = 0; i < t->n_workers;) {
        if (now - t->workers[i].last_seen > POOLJOBS_WORKER_SILENCE_S) {
            if (last_id) snprintf(last_id, n, "%s", t->workers[i].id);
            if (t->n_gone == POOLJOBS_MAX_WORKERS)
                memmove(t->gone, t->gone + 1, (size_t)--t->n_gone * sizeof *t->gone);
            t->gone[t->n_gone++] = t->workers[i];
            t->workers[i] = t->workers[--t->n_workers];
            dropped++;
        } else {
            i++;
        }
    }
    return dropped;
}

poolworker *pooljobs_worker_revive(pooljobs *t, const unsigned char *ident, size_t ident_len,
                                   double now) {
    for (int i = 0; i < t->n_gone; i++) {
        poolworker *g = &t->gone[i];
        if (g->ident_len != ident_len || memcmp(g->ident, ident, ident_len)) continue;
        if (t->n_workers == POOLJOBS_MAX_WORKERS) return NULL;
        poolworker *w = &t->workers[t->n_workers++];
        *w = *g;
        w->last_seen = now;
        memmove(g, g + 1, (size_t)(t->n_gone - i - 1) * sizeof *g);
        t->n_gone--;
        return w;
    }
    return NULL;
}

int pooljobs_any_bf16(const pooljobs *t) {
    for (int i = 0; i < t->n_workers; i++)
        if (t->workers[i].bf16) return 1;
    return 0;
}

int pooljobs_count(const pooljobs *t, int state) {
    int n = 0;
    for (int i = 0; i < t->n_jobs; i++)
        n += state < 0 ? pooljobs_live(t->jobs[i]) : t->jobs[i]->state == state;
    return n;
}
