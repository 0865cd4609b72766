/* `peftps compare`: several experiments (one per method, same task) each
 * trained through `peftps run` (cli/cmd_run.c) on a local cluster, or with
 * --pool all at once on one pool (`peftps pool start`, cli/pool.c, through
 * cli/cmd_pool.c's requests), then one table of what each cost and gained, a
 * JSON record of it and one SVG plot of the loss curves (cli/svgplot.h) read
 * from each run's metrics.jsonl.
 * Eval before training is that of `peftps eval` (common/train/train.h); peak
 * memory is read from /proc while the server and workers run. */
#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "pool.h"
#include "config/cmdline.h"
#include "config/config.h"
#include "train/experiment.h"
#include "base/fsutil.h"
#include "base/log.h"
#include "base/memstat.h"
#include "base/progress.h"
#include "base/stopsig.h"
#include "spawn.h"
#include "svgplot.h"
#include "train/metrics.h"
#include "train/train.h"

static const char compare_usage[] =
    "usage: peftps compare EXPERIMENT.pbtxt... [--workers N] [--out DIR] [--pool [ENDPOINT]]\n"
    "                      [--set PATH=VALUE ...]\n\n"
    "Trains each experiment with `peftps run` on a cluster of this machine (one\n"
    "server, N workers), one after another, and compares them. With --pool they\n"
    "train at the same time on one pool instead: a private one started on their\n"
    "common base (`peftps pool start` with N workers, its logs under DIR/pool),\n"
    "or the running pool at ENDPOINT; experiments on different bases are refused.\n"
    "Give every experiment the same data,\n"
    "steps and batch (as examples/demo-*.pbtxt do) and the table compares the\n"
    "methods; a warning says when steps or tokens per step differ.\n\n"
    "For each experiment NAME, under DIR/NAME: the run's outputs (metrics.jsonl,\n"
    "tensors.safetensors, experiment.pbtxt; a previous checkpoint there is\n"
    "removed first). Then it prints one row per experiment:\n"
    "  trainable        trained parameters, and their share of the base's\n"
    "  bytes/step       wire traffic of the server per step, both directions\n"
    "  tokens/s         tokens processed per second of training steps\n"
    "  worker private   the largest private memory (RssAnon) of a worker: what each\n"
    "                   worker costs alone (activations, gradients, buffers)\n"
    "  worker mapped    the largest resident mapped files of a worker: mostly the\n"
    "                   base, shared by every process of the machine\n"
    "  server private   the largest private memory of the parameter server\n"
    "  eval before      eval loss of the method untrained, as `peftps eval`\n"
    "  eval after       the run's final eval loss\n"
    "and writes DIR/compare.md (the table), DIR/compare.json (every number) and\n"
    "DIR/loss.svg (training loss of each, smoothed, with eval losses as dots).\n\n"
    "options:\n"
    "  --workers N        workers per run (default 2)\n"
    "  --out DIR          where the runs and the comparison go (default out/compare)\n"
    "  --pool [ENDPOINT]  train them concurrently on a pool: a private one (the\n"
    "                     worker columns are then its workers', which serve every\n"
    "                     experiment at once), or the one at ENDPOINT (worker and\n"
    "                     server memory are then not measured)\n"
    "  --set PATH=VALUE   override a field of every experiment (repeatable)\n";

/* What one experiment's run measured. */
typedef struct cmp_row {
    const char *file;
    char name[128];
    char method[32];
    char out[4096];
    int ok;
    size_t trainable, base_params;
    uint64_t steps;
    double tokens_per_step;         /* batch_size * seq_len */
    double eval_before, eval_after; /* NAN when unknown */
    double tokens_per_s, bytes_per_step, wall_s;
    long worker_peak_kib, server_peak_kib;       /* VmHWM: private and mapped together */
    long worker_private_kib, server_private_kib; /* the largest RssAnon sampled */
    long worker_mapped_kib, server_mapped_kib;   /* the largest RssFile + RssShmem sampled */
    /* The curves, from metrics.jsonl. */
    double *step, *loss, *smooth;
    size_t n;
    double *eval_step, *eval_loss;
    size_t n_eval;
} cmp_row;

static volatile sig_atomic_t cmp_signal;

static void cmp_on_signal(int sig) {
    cmp_signal = sig;
}

static void row_free(cmp_row *r) {
    free(r->step);
    free(r->loss);
    free(r->smooth);
    free(r->eval_step);
    free(r->eval_loss);
}

/* Parameters of the base: every weight once (a tied lm_head is the embedding). */
static size_t base_parameters(const model_config *cfg) {
    size_t n = 0;
    int rows, cols;
    for (int k = 0; k < GW_COUNT; k++) {
        if (k == GW_LM_HEAD && cfg->tie_word_embeddings) continue;
        n += model_weight_shape(cfg, MODEL_GLOBAL, k, &rows, &cols);
    }
    for (int l = 0; l < cfg->num_layers; l++)
        for (int k = 0; k < LW_COUNT; k++) n += model_weight_shape(cfg, l, k, &rows, &cols);
    return n;
}

/* Trainable parameters and the untrained method's eval loss, as `peftps eval`. */
static int measure_before(cmp_row *r, const Peftps__Experiment *ex, err *e) {
    trainer *t = NULL;
    if (trainer_open(&t, ex, 0, e) < 0) return -1;
    r->trainable = peft_num_trainable(t->p);
    r->base_params = base_parameters(model_files_config(t->files));
    snprintf(r->method, sizeof r->method, "%s", t->p->method->name);
    r->eval_before = NAN;
    int rc = 0;
    if (t->eval) {
        double loss;
        long ntok;
        rc = trainer_eval(t, &loss, &ntok, e);
        if (rc == 0) {
            r->eval_before = loss;
            printf("%s: before training: eval loss %.4f  perplexity %.3f  (%ld tokens)\n", r->name,
                   loss, exp(loss), ntok);
            fflush(stdout);
        }
    }
    trainer_close(t);
    return rc;
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* Removes a previous run's checkpoint directory, so that the run starts at
 * step 0 instead of refusing (another experiment) or resuming. */
static int remove_tree(const char *path, err *e) {
    struct stat st;
    if (lstat(path, &st) < 0) return errno == ENOENT ? 0 : err_errno(e, "%s", path);
    if (nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS) < 0)
        return err_errno(e, "removing the old checkpoint %s", path);
    return 0;
}

/* Parent of PID from /proc/PID/stat, or -1. */
static pid_t proc_parent(pid_t pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    /* The name in parentheses may hold spaces and ')': fields follow the last one. */
    char *p = strrchr(buf, ')');
    int ppid;
    if (!p || sscanf(p + 1, " %*c %d", &ppid) != 1) return -1;
    return (pid_t)ppid;
}

static void raise_to(long *to, long v) {
    if (v > *to) *to = v;
}

static void note_child(cmp_row *r, pid_t child) {
    memstat m;
    if (memstat_read(child, &m) < 0) return;
    if (!strcmp(m.name, "peftps-worker")) {
        raise_to(&r->worker_peak_kib, m.peak_kib);
        raise_to(&r->worker_private_kib, m.private_kib);
        raise_to(&r->worker_mapped_kib, m.mapped_kib);
    } else if (!strcmp(m.name, "peftps-server")) {
        raise_to(&r->server_peak_kib, m.peak_kib);
        raise_to(&r->server_private_kib, m.private_kib);
        raise_to(&r->server_mapped_kib, m.mapped_kib);
    }
}

/* The experiment name a pool's server serves, from its command line
 * (".../jobs/NAME/experiment.pbtxt"), into buf; 0 when it has none. */
static int pool_server_job(pid_t pid, char *buf, size_t n) {
    char path[64], cmd[8192];
    snprintf(path, sizeof path, "/proc/%d/cmdline", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    size_t k = fread(cmd, 1, sizeof cmd - 1, f);
    fclose(f);
    cmd[k] = '\0';
    for (size_t i = 0; i < k; i += strlen(cmd + i) + 1) {
        const char *a = cmd + i, *j = strstr(a, "/jobs/");
        if (!j || !fs_ends_with(a, "/experiment.pbtxt")) continue;
        j += strlen("/jobs/");
        size_t len = strlen(j) - strlen("/experiment.pbtxt");
        if (len == 0 || len >= n) return 0;
        memcpy(buf, j, len);
        buf[len] = '\0';
        return 1;
    }
    return 0;
}

/* The memory of a pool's children (pid: the pool's process): every worker
 * serves every row; each server, the row of its job. */
static void sample_pool_memory(cmp_row *rows, int n, pid_t pool) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)pool, (int)pool);
    FILE *f = fopen(path, "r");
    if (!f) return;
    int child;
    while (fscanf(f, "%d", &child) == 1) {
        memstat m;
        char job[256];
        if (memstat_read((pid_t)child, &m) < 0) continue;
        int server = !strcmp(m.name, "peftps-server");
        if (server && !pool_server_job((pid_t)child, job, sizeof job)) continue;
        for (int i = 0; i < n; i++)
            if (!server || !strcmp(rows[i].name, job)) note_child(&rows[i], (pid_t)child);
    }
    fclose(f);
}

/* Raises the row's peaks with the memory of the run's server and workers
 * (the children of `run`). VmHWM only grows, so sampling every few tens of
 * milliseconds catches the peak a process reached before it ends; private
 * and mapped memory are the largest sampled (a worker allocates its
 * activations once, so they stay resident while it runs). */
static void sample_memory(cmp_row *r, pid_t run) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task/%d/children", (int)run, (int)run);
    FILE *f = fopen(path, "r");
    if (f) {
        int child;
        while (fscanf(f, "%d", &child) == 1) note_child(r, (pid_t)child);
        fclose(f);
        return;
    }
    /* Kernels without the children file: every process's parent. */
    DIR *d = opendir("/proc");
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d))) {
        char *end;
        long pid = strtol(de->d_name, &end, 10);
        if (*end || pid <= 0) continue;
        if (proc_parent((pid_t)pid) == run) note_child(r, (pid_t)pid);
    }
    closedir(d);
}

/* Runs `peftps run` for one experiment, sampling memory; returns its exit
 * status (or 128+signal), -1 with e set when it could not start. */
static int run_cluster(cmp_row *r, const char *self, char *const *sets, int nsets, int workers,
                       err *e) {
    char nw[16];
    snprintf(nw, sizeof nw, "%d", workers);
    char **argv = calloc((size_t)(2 * nsets + 8), sizeof *argv);
    if (!argv) return err_set(e, "out of memory");
    int na = 0;
    argv[na++] = (char *)self;
    argv[na++] = "run";
    argv[na++] = (char *)r->file;
    argv[na++] = "--workers";
    argv[na++] = nw;
    for (int i = 0; i < nsets; i++) {
        argv[na++] = "--set";
        argv[na++] = sets[i];
    }
    argv[na] = NULL;
    pid_t pid = spawn_start("peftps compare", argv, 0, e);
    free(argv);
    if (pid < 0) return -1;
    double t0 = progress_now();
    int status;
    for (;;) {
        pid_t w = spawn_poll(pid, &status);
        if (w == pid) break;
        if (w < 0) return err_errno(e, "waiting for peftps run");
        /* Ctrl-C reaches the run too (same process group): it checkpoints and
         * stops its cluster; we wait for that, then stop. */
        if (cmp_signal == SIGTERM) kill(pid, SIGTERM);
        sample_memory(r, pid);
    }
    r->wall_s = progress_now() - t0;
    return spawn_code(status);
}

static int push(double **a, size_t *n, size_t *cap, double v) {
    if (*n == *cap) {
        size_t c = *cap ? 2 * *cap : 256;
        double *p = realloc(*a, c * sizeof *p);
        if (!p) return -1;
        *a = p;
        *cap = c;
    }
    (*a)[(*n)++] = v;
    return 0;
}

/* What read_metrics gathers while metrics_read goes through the lines. */
typedef struct cmp_curves {
    cmp_row *r;
    size_t cap_s, cap_l, cap_es, cap_el, n_l, n_el, n_step;
    double inv_tps, bytes;
} cmp_curves;

static int cmp_line(void *ctx, const metrics_line *l, err *e) {
    cmp_curves *c = ctx;
    cmp_row *r = c->r;
    if (l->kind == METRICS_STEP) {
        if (l->tokens_per_s > 0) c->inv_tps += 1.0 / l->tokens_per_s;
        c->bytes += (double)l->bytes_in + (double)l->bytes_out;
        c->n_step++;
        if (push(&r->step, &r->n, &c->cap_s, (double)l->step) < 0 ||
            push(&r->loss, &c->n_l, &c->cap_l, l->loss) < 0)
            return err_set(e, "out of memory");
    } else if (push(&r->eval_step, &r->n_eval, &c->cap_es, (double)l->step) < 0 ||
               push(&r->eval_loss, &c->n_el, &c->cap_el, l->loss) < 0) {
        return err_set(e, "out of memory");
    }
    return 0;
}

/* Reads OUT/metrics.jsonl: the step lines (loss, tokens_per_s, bytes) and
 * the eval lines. */
static int read_metrics(cmp_row *r, err *e) {
    char path[4200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", r->out);
    cmp_curves c = {.r = r};
    r->n = r->n_eval = 0;
    if (metrics_read(path, cmp_line, &c, e) != 0) return -1;
    if (c.n_step == 0) return err_set(e, "%s: no training steps recorded", path);
    /* Tokens over the time of the steps: the harmonic mean of the rates. */
    r->tokens_per_s = c.inv_tps > 0 ? (double)c.n_step / c.inv_tps : NAN;
    r->bytes_per_step = c.bytes / (double)c.n_step;
    r->eval_after = r->n_eval ? r->eval_loss[r->n_eval - 1] : NAN;
    /* A trailing mean over a thirtieth of the run keeps the curves readable. */
    size_t w = r->n / 30 > 1 ? r->n / 30 : 1;
    r->smooth = malloc(r->n * sizeof *r->smooth);
    if (!r->smooth) return err_set(e, "out of memory");
    double acc = 0;
    for (size_t i = 0; i < r->n; i++) {
        acc += r->loss[i];
        if (i >= w) acc -= r->loss[i - w];
        r->smooth[i] = acc / (double)(i + 1 < w ? i + 1 : w);
    }
    return 0;
}

/* "1,234,567" */
static const char *grouped(char *buf, size_t n, size_t v) {
    char tmp[32];
    int len = snprintf(tmp, sizeof tmp, "%zu", v), k = 0;
    size_t o = 0;
    for (int i = 0; i < len && o + 2 < n; i++) {
        buf[o++] = tmp[i];
        k = len - i - 1;
        if (k > 0 && k % 3 == 0) buf[o++] = ',';
    }
    buf[o] = '\0';
    return buf;
}

static const char *human_bytes(char *buf, size_t n, double b) {
    if (!isfinite(b))
        snprintf(buf, n, "-");
    else if (b >= 1024.0 * 1024.0)
        snprintf(buf, n, "%.1f MiB", b / (1024.0 * 1024.0));
    else if (b >= 1024.0)
        snprintf(buf, n, "%.1f KiB", b / 1024.0);
    else
        snprintf(buf, n, "%.0f B", b);
    return buf;
}

static const char *loss_text(char *buf, size_t n, double v) {
    if (isfinite(v))
        snprintf(buf, n, "%.4f", v);
    else
        snprintf(buf, n, "-");
    return buf;
}

/* One table, as text (markdown = 0) or as a Markdown table. */
static void print_table(FILE *f, const cmp_row *rows, int n, int markdown) {
    static const char *head[] = {"method",      "trainable",      "share",         "bytes/step",
                                 "tokens/s",    "worker private", "worker mapped", "server private",
                                 "eval before", "eval after"};
    if (markdown) {
        fputs("|", f);
        for (int i = 0; i < 10; i++) fprintf(f, " %s |", head[i]);
        fputs("\n|", f);
        for (int i = 0; i < 10; i++) fputs(i ? " ---: |" : " --- |", f);
        fputs("\n", f);
    } else {
        fprintf(f, "%-24s %11s %7s %11s %9s  %14s  %13s  %14s  %11s  %10s\n", head[0], head[1],
                head[2], head[3], head[4], head[5], head[6], head[7], head[8], head[9]);
    }
    for (int i = 0; i < n; i++) {
        const cmp_row *r = &rows[i];
        char tr[32], share[32], bps[32], tps[32], wp[32], wm[32], sp[32], b[32], a[32], label[200];
        grouped(tr, sizeof tr, r->trainable);
        snprintf(share, sizeof share, "%.2f%%",
                 r->base_params ? 100.0 * (double)r->trainable / (double)r->base_params : 0.0);
        human_bytes(bps, sizeof bps, r->ok ? r->bytes_per_step : NAN);
        if (r->ok && isfinite(r->tokens_per_s))
            snprintf(tps, sizeof tps, "%.0f", r->tokens_per_s);
        else
            snprintf(tps, sizeof tps, "-");
        human_bytes(wp, sizeof wp,
                    r->worker_private_kib > 0 ? 1024.0 * r->worker_private_kib : NAN);
        human_bytes(wm, sizeof wm, r->worker_mapped_kib > 0 ? 1024.0 * r->worker_mapped_kib : NAN);
        human_bytes(sp, sizeof sp,
                    r->server_private_kib > 0 ? 1024.0 * r->server_private_kib : NAN);
        loss_text(b, sizeof b, r->eval_before);
        loss_text(a, sizeof a, r->ok ? r->eval_after : NAN);
        if (strcmp(r->name, r->method))
            snprintf(label, sizeof label, "%s (%s)", r->name, r->method);
        else
            snprintf(label, sizeof label, "%s", r->name);
        if (!r->ok) snprintf(label + strlen(label), sizeof label - strlen(label), " FAILED");
        if (markdown)
            fprintf(f, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", label, tr, share,
                    bps, tps, wp, wm, sp, b, a);
        else
            fprintf(f, "%-24s %11s %7s %11s %9s  %14s  %13s  %14s  %11s  %10s\n", label, tr, share,
                    bps, tps, wp, wm, sp, b, a);
    }
}

static json_t *jnum(double v) {
    return isfinite(v) ? json_real(v) : json_null();
}

static int write_json(const char *dir, const cmp_row *rows, int n, int workers, err *e) {
    json_t *arr = json_array();
    for (int i = 0; i < n; i++) {
        const cmp_row *r = &rows[i];
        json_t *o = json_object();
        json_object_set_new(o, "name", json_string(r->name));
        json_object_set_new(o, "method", json_string(r->method));
        json_object_set_new(o, "experiment", json_string(r->file));
        json_object_set_new(o, "output_dir", json_string(r->out));
        json_object_set_new(o, "ok", json_boolean(r->ok));
        json_object_set_new(o, "trainable", json_integer((json_int_t)r->trainable));
        json_object_set_new(o, "base_parameters", json_integer((json_int_t)r->base_params));
        json_object_set_new(
            o, "share", jnum(r->base_params ? (double)r->trainable / (double)r->base_params : NAN));
        json_object_set_new(o, "steps", json_integer((json_int_t)r->steps));
        json_object_set_new(o, "tokens_per_step", jnum(r->tokens_per_step));
        json_object_set_new(o, "tokens_per_s", jnum(r->ok ? r->tokens_per_s : NAN));
        json_object_set_new(o, "bytes_per_step", jnum(r->ok ? r->bytes_per_step : NAN));
        json_object_set_new(o, "worker_peak_kib", json_integer(r->worker_peak_kib));
        json_object_set_new(o, "server_peak_kib", json_integer(r->server_peak_kib));
        json_object_set_new(o, "worker_private_kib", json_integer(r->worker_private_kib));
        json_object_set_new(o, "worker_mapped_kib", json_integer(r->worker_mapped_kib));
        json_object_set_new(o, "server_private_kib", json_integer(r->server_private_kib));
        json_object_set_new(o, "server_mapped_kib", json_integer(r->server_mapped_kib));
        json_object_set_new(o, "eval_loss_before", jnum(r->eval_before));
        json_object_set_new(o, "eval_loss_after", jnum(r->ok ? r->eval_after : NAN));
        json_object_set_new(o, "eval_ppl_before", jnum(exp(r->eval_before)));
        json_object_set_new(o, "eval_ppl_after", jnum(r->ok ? exp(r->eval_after) : NAN));
        json_object_set_new(o, "wall_s", jnum(r->wall_s));
        json_array_append_new(arr, o);
    }
    json_t *top = json_pack("{s:i, s:o}", "workers", workers, "runs", arr);
    char *text = json_dumps(top, JSON_INDENT(1) | JSON_PRESERVE_ORDER);
    json_decref(top);
    if (!text) return err_set(e, "out of memory");
    char path[4200];
    snprintf(path, sizeof path, "%s/compare.json", dir);
    size_t len = strlen(text);
    char *withnl = realloc(text, len + 2);
    if (!withnl) {
        free(text);
        return err_set(e, "out of memory");
    }
    memcpy(withnl + len, "\n", 2);
    int rc = fs_write_text(path, withnl, e);
    free(withnl);
    return rc;
}

static int write_markdown(const char *dir, const cmp_row *rows, int n, const char *cmdline,
                          err *e) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return err_errno(e, "open_memstream");
    fprintf(f, "Measured with `%s`.\n\n", cmdline);
    print_table(f, rows, n, 1);
    if (fclose(f) != 0) {
        free(buf);
        return err_errno(e, "writing the table");
    }
    char path[4200];
    snprintf(path, sizeof path, "%s/compare.md", dir);
    int rc = fs_write_text(path, buf, e);
    free(buf);
    return rc;
}

static int write_plot(const char *dir, const cmp_row *rows, int n, err *e) {
    svgplot_series *s = calloc((size_t)(2 * n), sizeof *s);
    double **ex = calloc((size_t)n, sizeof *ex), **ey = calloc((size_t)n, sizeof *ey);
    int k = 0, rc = -1;
    if (!s || !ex || !ey) {
        err_set(e, "out of memory");
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const cmp_row *r = &rows[i];
        if (!r->ok || r->n == 0) continue;
        s[k++] = (svgplot_series){r->name, r->step, r->smooth, r->n, i, SVGPLOT_LINE};
        /* Eval losses as dots: before training at step 0, then the run's. */
        ex[i] = malloc((r->n_eval + 1) * sizeof **ex);
        ey[i] = malloc((r->n_eval + 1) * sizeof **ey);
        if (!ex[i] || !ey[i]) {
            err_set(e, "out of memory");
            goto done;
        }
        size_t m = 0;
        if (isfinite(r->eval_before)) ex[i][m] = 0, ey[i][m++] = r->eval_before;
        for (size_t j = 0; j < r->n_eval; j++)
            ex[i][m] = r->eval_step[j], ey[i][m++] = r->eval_loss[j];
        if (m) s[k++] = (svgplot_series){NULL, ex[i], ey[i], m, i, SVGPLOT_MARKERS};
    }
    if (k == 0) {
        rc = 0; /* every run failed: nothing to draw, the table says why */
        goto done;
    }
    char path[4200];
    snprintf(path, sizeof path, "%s/loss.svg", dir);
    svgplot p = {"Loss by method (lines: training loss, smoothed; dots: eval loss)",
                 "step",
                 "loss (nats per token)",
                 0,
                 0,
                 0,
                 s,
                 k};
    rc = svgplot_write(&p, path, e);
done:
    for (int i = 0; i < n && ex && ey; i++) {
        free(ex[i]);
        free(ey[i]);
    }
    free(ex);
    free(ey);
    free(s);
    return rc;
}

/* Loads every experiment first, so that a typo in the last one does not
 * wait for the first to train; 0, or -1 after printing why. */
static int cmp_load(cmp_row *rows, const char **files, int nfiles, const config_args *sets,
                    const char *out) {
    err e;
    for (int i = 0; i < nfiles; i++) {
        Peftps__Experiment *ex = NULL;
        if (experiment_load(files[i], sets->sets, sets->nsets, &ex, NULL, &e) < 0) {
            fprintf(stderr, "%s\n", e.msg);
            return -1;
        }
        cmp_row *r = &rows[i];
        r->file = files[i];
        snprintf(r->name, sizeof r->name, "%s", ex->name);
        snprintf(r->out, sizeof r->out, "%s/%s", out, ex->name);
        r->steps = ex->schedule->total_steps;
        r->tokens_per_step = (double)ex->data->batch_size * (double)ex->data->seq_len;
        r->eval_before = r->eval_after = NAN;
        config_free(ex);
        for (int j = 0; j < i; j++)
            if (!strcmp(rows[j].name, r->name)) {
                fprintf(stderr,
                        "peftps compare: %s and %s are both named \"%s\"; their outputs would "
                        "collide (give each its own name)\n",
                        rows[j].file, r->file, r->name);
                return -1;
            }
        if (r->steps != rows[0].steps || r->tokens_per_step != rows[0].tokens_per_step)
            log_warn("%s trains %llu steps of %.0f tokens, %s %llu of %.0f: not like for like",
                     r->file, (unsigned long long)r->steps, r->tokens_per_step, rows[0].file,
                     (unsigned long long)rows[0].steps, rows[0].tokens_per_step);
    }
    return 0;
}

/* Experiment i of n: its eval before training, its run into r->out (a
 * previous checkpoint there removed), its metrics; sets r->ok. */
static void cmp_run_one(cmp_row *r, int i, int n, const char *self, const config_args *sets,
                        int workers) {
    char set_out[4200], set_ckpt[4300], ckpt[4200];
    snprintf(ckpt, sizeof ckpt, "%s/ckpt", r->out);
    snprintf(set_out, sizeof set_out, "output_dir=%s", r->out);
    snprintf(set_ckpt, sizeof set_ckpt, "checkpoint.path=%s", ckpt);
    char **runsets = calloc((size_t)sets->nsets + 2, sizeof *runsets);
    err e;
    if (!runsets) {
        fprintf(stderr, "peftps compare: out of memory\n");
        return;
    }
    for (int j = 0; j < sets->nsets; j++) runsets[j] = sets->sets[j];
    runsets[sets->nsets] = set_out;
    runsets[sets->nsets + 1] = set_ckpt;
    int ns = sets->nsets + 2;
    printf("== %s (%s), %d of %d: %s --workers %d\n", r->name, r->file, i + 1, n, r->out, workers);
    fflush(stdout);
    Peftps__Experiment *ex = NULL;
    int st = -1;
    if (experiment_load(r->file, runsets, ns, &ex, NULL, &e) == 0 &&
        measure_before(r, ex, &e) == 0 && remove_tree(ckpt, &e) == 0)
        st = run_cluster(r, self, runsets, ns, workers, &e);
    config_free(ex);
    free(runsets);
    if (st < 0) {
        fprintf(stderr, "peftps compare: %s: %s\n", r->file, e.msg);
    } else if (st != 0) {
        fprintf(stderr, "peftps compare: %s: peftps run exited with status %d\n", r->file, st);
    } else if (read_metrics(r, &e) < 0) {
        fprintf(stderr, "peftps compare: %s: %s\n", r->file, e.msg);
    } else {
        r->ok = 1;
        if (isfinite(r->eval_after))
            printf("%s: after %llu steps: eval loss %.4f  perplexity %.3f  (run took %.0f s)\n",
                   r->name, (unsigned long long)r->steps, r->eval_after, exp(r->eval_after),
                   r->wall_s);
        else
            printf("%s: %llu steps (run took %.0f s); no eval data\n", r->name,
                   (unsigned long long)r->steps, r->wall_s);
    }
}

/* ---- --pool ------------------------------------------------------------------ */

/* The options of one experiment's run: the user's, then output_dir and
 * checkpoint.path under out (runsets[nsets], [nsets+1]); NULL when out of
 * memory. */
static char **cmp_runsets(const cmp_row *r, const config_args *sets, char *set_out, size_t n_out,
                          char *set_ckpt, size_t n_ckpt) {
    char **runsets = calloc((size_t)sets->nsets + 2, sizeof *runsets);
    if (!runsets) return NULL;
    for (int j = 0; j < sets->nsets; j++) runsets[j] = sets->sets[j];
    snprintf(set_out, n_out, "output_dir=%s", r->out);
    snprintf(set_ckpt, n_ckpt, "checkpoint.path=%s/ckpt", r->out);
    runsets[sets->nsets] = set_out;
    runsets[sets->nsets + 1] = set_ckpt;
    return runsets;
}

/* The common base of every experiment (its path into base, n bytes);
 * -1 after printing which two differ. */
static int cmp_common_base(const cmp_row *rows, int n, const config_args *sets, char *base,
                           size_t nb) {
    char fp0[65], path0[4096];
    for (int i = 0; i < n; i++) {
        Peftps__Experiment *ex = NULL;
        err e;
        char fp[65];
        if (experiment_load(rows[i].file, sets->sets, sets->nsets, &ex, NULL, &e) < 0 ||
            model_files_probe(ex->model->path, fp, &e) < 0) {
            fprintf(stderr, "peftps compare: %s: %s\n", rows[i].file, e.msg);
            config_free(ex);
            return -1;
        }
        if (i == 0) {
            memcpy(fp0, fp, sizeof fp0);
            snprintf(path0, sizeof path0, "%s", ex->model->path);
        } else if (strcmp(fp, fp0)) {
            fprintf(stderr,
                    "peftps compare: --pool: %s trains on the base at %s (fingerprint %.12s..), "
                    "%s on %s (fingerprint %.12s..); a pool serves one base: compare them "
                    "without --pool, or each base's experiments in their own run\n",
                    rows[0].file, path0, fp0, rows[i].file, ex->model->path, fp);
            config_free(ex);
            return -1;
        }
        config_free(ex);
    }
    snprintf(base, nb, "%s", path0);
    return 0;
}

/* Starts a private pool on base with nw workers at an ipc:// endpoint
 * (into ep) under out/pool; returns its pid once it answers, or -1. */
static pid_t cmp_pool_start(const char *self, const char *base, int nw, const char *out, char *ep,
                            size_t nep, char *tmp, err *e) {
    char work[4200], log[4300], nws[16];
    snprintf(tmp, 32, "/tmp/peftps-compare-XXXXXX");
    if (!mkdtemp(tmp)) return err_errno(e, "creating %s", tmp);
    snprintf(ep, nep, "ipc://%s/pool", tmp);
    snprintf(work, sizeof work, "%s/pool", out);
    snprintf(log, sizeof log, "%s/pool.log", out);
    snprintf(nws, sizeof nws, "%d", nw);
    char *argv[] = {(char *)self, "pool",      "start", "--model", (char *)base, "--listen",
                    ep,           "--workers", nws,     "--work",  work,         NULL};
    pid_t pid = spawn_start_log("peftps compare", argv, 0, log, e);
    if (pid < 0) return -1;
    for (int tries = 0; tries < 300; tries++) {
        Peftps__Pool__PoolMessage *r = NULL;
        err le;
        int st;
        if (spawn_poll(pid, &st) == pid) {
            err_set(e, "the pool stopped at once (%s): see %s",
                    spawn_code(st) ? "failed" : "exit 0", log);
            return -1;
        }
        if (access(ep + strlen("ipc://"), F_OK) == 0 && pool_list(ep, &r, &le) == 0) {
            poolmsg_free(r);
            log_info("started a pool of %d worker(s) at %s (log %s)", nw, ep, log);
            return pid;
        }
    }
    kill(pid, SIGTERM);
    err_set(e, "the pool did not answer within 15 s: see %s", log);
    return -1;
}

/* Submits every experiment to the pool at ep, then waits for all: rows of
 * jobs that end done are measured as after a run. Returns how many failed. */
static int cmp_pool_run(cmp_row *rows, int n, const config_args *sets, const char *ep, pid_t pool) {
    int failed = 0, *live = calloc((size_t)n, sizeof *live);
    double t0 = progress_now();
    if (!live) return n;
    for (int i = 0; i < n; i++) {
        cmp_row *r = &rows[i];
        char set_out[4200], set_ckpt[4300], ckpt[4300];
        char **runsets = cmp_runsets(r, sets, set_out, sizeof set_out, set_ckpt, sizeof set_ckpt);
        Peftps__Experiment *ex = NULL;
        Peftps__Pool__PoolMessage *reply = NULL;
        err e;
        int ok = 0;
        snprintf(ckpt, sizeof ckpt, "%s/ckpt", r->out);
        printf("== %s (%s), %d of %d: %s on the pool %s\n", r->name, r->file, i + 1, n, r->out, ep);
        fflush(stdout);
        if (!runsets)
            err_set(&e, "out of memory");
        else if (experiment_load(r->file, runsets, sets->nsets + 2, &ex, NULL, &e) == 0 &&
                 measure_before(r, ex, &e) == 0 && remove_tree(ckpt, &e) == 0 &&
                 pool_submit(ep, ex, r->file, 0, &reply, &e) == 0)
            ok = 1;
        if (!ok) {
            fprintf(stderr, "peftps compare: %s: %s\n", r->file, e.msg);
            failed++;
        }
        live[i] = ok;
        poolmsg_free(reply);
        config_free(ex);
        free(runsets);
    }
    int left = n - failed;
    while (left > 0) {
        if (cmp_signal) {
            /* Ctrl-C: the jobs stop (each checkpoints) whether the pool is ours or not. */
            for (int i = 0; i < n; i++)
                if (live[i]) {
                    Peftps__Pool__Cancel c = PEFTPS__POOL__CANCEL__INIT;
                    Peftps__Pool__PoolMessage m = PEFTPS__POOL__POOL_MESSAGE__INIT, *r = NULL;
                    err e;
                    c.id = rows[i].name;
                    m.body_case = PEFTPS__POOL__POOL_MESSAGE__BODY_CANCEL;
                    m.cancel = &c;
                    if (poolmsg_request(ep, &m, 5000, &r, &e) == 0) poolmsg_free(r);
                }
            break;
        }
        Peftps__Pool__PoolMessage *r = NULL;
        err e;
        if (pool_list(ep, &r, &e) != 0) {
            fprintf(stderr, "peftps compare: %s\n", e.msg);
            break;
        }
        for (int i = 0; i < n; i++) {
            if (!live[i]) continue;
            const Peftps__Pool__Job *j = pool_job_in(r->jobs, rows[i].name);
            if (j && !pool_job_ended(j)) continue;
            live[i] = 0;
            left--;
            cmp_row *row = &rows[i];
            row->wall_s = j && j->ended_s > j->submitted_s ? j->ended_s - j->submitted_s
                                                           : progress_now() - t0;
            if (!j || j->state != PEFTPS__POOL__JOB_STATE__DONE) {
                fprintf(stderr, "peftps compare: %s: job %s %s%s%s\n", row->file, row->name,
                        j ? poolmsg_state_name(j->state) : "left the pool",
                        j && j->message && *j->message ? ": " : "",
                        j && j->message ? j->message : "");
                failed++;
                continue;
            }
            Peftps__Experiment *ex = NULL;
            char set_out[4200], set_ckpt[4300];
            char **runsets =
                cmp_runsets(row, sets, set_out, sizeof set_out, set_ckpt, sizeof set_ckpt);
            if (!runsets ||
                experiment_load(row->file, runsets, sets->nsets + 2, &ex, NULL, &e) < 0 ||
                run_eval(ex, &e) < 0 || read_metrics(row, &e) < 0) {
                fprintf(stderr, "peftps compare: %s: %s\n", row->file,
                        runsets ? e.msg : "out of memory");
                failed++;
            } else {
                row->ok = 1;
                printf("%s: done after %.0f s%s", row->name, row->wall_s,
                       isfinite(row->eval_after) ? "" : "; no eval data\n");
                if (isfinite(row->eval_after))
                    printf(": eval loss %.4f  perplexity %.3f\n", row->eval_after,
                           exp(row->eval_after));
                fflush(stdout);
            }
            config_free(ex);
            free(runsets);
        }
        poolmsg_free(r);
        if (left > 0) {
            for (int k = 0; k < 10 && !cmp_signal; k++) {
                if (pool > 0) sample_pool_memory(rows, n, pool);
                struct timespec nap = {0, 100 * 1000 * 1000};
                nanosleep(&nap, NULL);
            }
        }
    }
    for (int i = 0; i < n; i++) failed += live[i];
    free(live);
    return failed;
}

/* --pool: the experiments at once on a pool (ours when ep is NULL). */
static int cmp_pool(cmp_row *rows, int n, const config_args *sets, const char *ep, int nw,
                    const char *out, const char *self) {
    char base[4096], own_ep[128], tmp[32] = "";
    pid_t pool = 0;
    err e;
    if (cmp_common_base(rows, n, sets, base, sizeof base) < 0) return -2;
    if (!ep) {
        pool = cmp_pool_start(self, base, nw, out, own_ep, sizeof own_ep, tmp, &e);
        if (pool < 0) {
            fprintf(stderr, "peftps compare: starting a pool: %s\n", e.msg);
            if (tmp[0]) rmdir(tmp);
            return n;
        }
        ep = own_ep;
    }
    int failed = cmp_pool_run(rows, n, sets, ep, pool);
    if (pool > 0) {
        int st;
        kill(pool, SIGTERM);
        while (spawn_poll(pool, &st) == 0) {
        }
        unlink(own_ep + strlen("ipc://"));
        rmdir(tmp);
    }
    return failed;
}

/* The table on stdout, and compare.md, compare.json and loss.svg under out. */
static int cmp_report(const char *out, const cmp_row *rows, int n, const char *cmdline,
                      int workers) {
    err e;
    printf("\n");
    print_table(stdout, rows, n, 0);
    if (write_markdown(out, rows, n, cmdline ? cmdline : "peftps compare", &e) < 0 ||
        write_json(out, rows, n, workers, &e) < 0 || write_plot(out, rows, n, &e) < 0) {
        fprintf(stderr, "peftps compare: %s\n", e.msg);
        return -1;
    }
    printf("\nwrote %s/compare.md, %s/compare.json and %s/loss.svg\n", out, out, out);
    return 0;
}

int cmd_compare(int argc, char **argv) {
    config_args sets;
    err e;
    /* The command, for compare.md: how to measure it again. */
    char *cmdline = spawn_command_line("peftps", argv, argc);
    if (config_parse_args(&argc, argv, &sets, &e) < 0) {
        free(cmdline);
        fprintf(stderr, "peftps compare: %s\n%s", e.msg, compare_usage);
        return 2;
    }
    const char *out = "out/compare", *pool_ep = NULL;
    int nw = 2, nfiles = 0, rc = 2, use_pool = 0;
    /* --pool takes an optional endpoint: the next argument when it is one. */
    for (int i = 1; i < argc; i++) {
        int take = 0;
        if (!strcmp(argv[i], "--")) break;
        if (!strcmp(argv[i], "--pool")) {
            use_pool = take = 1;
            if (i + 1 < argc && strstr(argv[i + 1], "://")) pool_ep = argv[i + 1], take = 2;
        } else if (!strncmp(argv[i], "--pool=", 7)) {
            use_pool = take = 1;
            pool_ep = argv[i] + 7;
        }
        if (take) {
            memmove(&argv[i], &argv[i + take], (size_t)(argc - i - take + 1) * sizeof *argv);
            argc -= take;
            i--;
        }
    }
    const char **files = calloc((size_t)argc, sizeof *files);
    cmp_row *rows = calloc((size_t)argc, sizeof *rows);
    const cmdline_opt opts[] = {CMDLINE_INT("--workers", &nw, 1, 1024), CMDLINE_STR("--out", &out)};
    if (!files || !rows) {
        fprintf(stderr, "peftps compare: out of memory\n");
        goto done;
    }
    rc = cmdline_parse("peftps compare", compare_usage, opts, 2, "experiment", files, argc, argc,
                       argv);
    while (nfiles < argc && files[nfiles]) nfiles++;
    if (rc == 0 && nfiles == 0) {
        fprintf(stderr, "peftps compare: no experiment file given\n%s", compare_usage);
        rc = 2;
    }
    if (rc || cmp_load(rows, files, nfiles, &sets, out) < 0) {
        rc = rc == 1 ? 0 : 2;
        goto done;
    }
    char self[4096];
    if (fs_mkdir_p(out, &e) < 0 || spawn_self(self, sizeof self, 0, &e) < 0) {
        fprintf(stderr, "peftps compare: %s\n", e.msg);
        rc = 1;
        goto done;
    }
    stopsig sigs;
    stopsig_catch(&sigs, cmp_on_signal);
    int failed = 0;
    double t0 = progress_now();
    if (use_pool) {
        failed = cmp_pool(rows, nfiles, &sets, pool_ep, nw, out, self);
        if (failed == -2) {
            stopsig_restore(&sigs);
            rc = 2;
            goto done;
        }
    } else {
        for (int i = 0; i < nfiles && !cmp_signal; i++) {
            cmp_run_one(&rows[i], i, nfiles, self, &sets, nw);
            failed += !rows[i].ok;
        }
    }
    stopsig_restore(&sigs);
    printf("\n%d experiment(s) %s in %.1f s of wall time\n", nfiles,
           use_pool ? "trained concurrently on one pool" : "trained one after another",
           progress_now() - t0);
    rc = cmp_signal ? 130 : failed ? 1 : 0;
    if (cmp_report(out, rows, nfiles, cmdline, nw) < 0) rc = 1;
done:
    for (int i = 0; rows && i < nfiles; i++) row_free(&rows[i]);
    free(rows);
    free(files);
    free(cmdline);
    config_args_free(&sets);
    return rc;
}
