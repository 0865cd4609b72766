/* Experiment files (see config.h): parsing with overrides, and the defaults
 * and checks of meaning of the blocks every experiment has, over the
 * text-format reader of pbtext.c, each error located at its field through
 * pbtext_locs; base/hash.h hashes fingerprints. The method block and the
 * model's config.json are the business of train/experiment.c. */
#include "config/config.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/fsutil.h"
#include "base/hash.h"

#define DEFAULT_SERVER "tcp://127.0.0.1:5555"

/* ---- locating errors ----------------------------------------------------- */

/* The position of `field`, or of the list it is an element of. */
static int locate(const pbtext_locs *locs, const char *field, pbtext_pos *pos) {
    if (!pbtext_locate(locs, field, pos)) return 0;
    const char *br = strrchr(field, '[');
    if (!br) return -1;
    char parent[256];
    snprintf(parent, sizeof parent, "%.*s", (int)(br - field), field);
    return pbtext_locate(locs, parent, pos);
}

int config_fail(const config_checker *c, const char *fields, const char *fmt, ...) {
    char msg[ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (const char *p = fields; p && *p;) {
        const char *bar = strchr(p, '|');
        size_t n = bar ? (size_t)(bar - p) : strlen(p);
        char field[256];
        pbtext_pos pos;
        snprintf(field, sizeof field, "%.*s", (int)n, p);
        if (!locate(c->locs, field, &pos)) {
            char where[ERR_MAX / 2];
            pbtext_pos_format(&pos, where, sizeof where);
            return err_set(c->e, "%s: error: %s", where, msg);
        }
        p = bar ? bar + 1 : NULL;
    }
    return err_set(c->e, "%s: error: %s", c->path, msg);
}

/* ---- defaults ------------------------------------------------------------ */

static void *new_msg(const ProtobufCMessageDescriptor *d) {
    ProtobufCMessage *m = malloc(d->sizeof_message);
    if (m) d->message_init(m);
    return m;
}

/* Creates *slot when absent; -1 when out of memory. */
#define ENSURE(slot, desc) ((slot) || ((slot) = new_msg(&(desc))) ? 0 : -1)

int config_default_modules(Peftps__Module **arr, size_t *n, Peftps__Module first,
                           Peftps__Module last) {
    if (*n) return 0;
    size_t k = (size_t)(last - first) + 1;
    *arr = malloc(k * sizeof **arr);
    if (!*arr) return -1;
    for (size_t i = 0; i < k; i++) (*arr)[i] = (Peftps__Module)(first + (int)i);
    *n = k;
    return 0;
}

static int default_string(char **s, const char *fmt, const char *a) {
    if (*s) return 0;
    size_t n = strlen(fmt) + strlen(a) + 1;
    *s = malloc(n);
    if (!*s) return -1;
    snprintf(*s, n, fmt, a);
    return 0;
}

int config_fill_defaults(Peftps__Experiment *exp, const char *path, const pbtext_locs *locs,
                         err *e) {
    config_checker c = {path, locs, e};
    if (!exp->name) {
        const char *base = strrchr(path, '/');
        base = base ? base + 1 : path;
        size_t n = strlen(base);
        if (fs_ends_with(base, ".pbtxt")) n -= strlen(".pbtxt");
        if (!n) base = "experiment", n = strlen(base);
        exp->name = strndup(base, n);
        if (!exp->name) goto oom;
    }
    CONFIG_DEFAULT(exp, seed, 42);
    if (default_string(&exp->output_dir, "out/%s", exp->name)) goto oom;

    if (ENSURE(exp->optimizer, peftps__optimizer__descriptor)) goto oom;
    Peftps__Optimizer *o = exp->optimizer;
    CONFIG_DEFAULT(o, lr, 1e-3f);
    CONFIG_DEFAULT(o, beta1, 0.9f);
    CONFIG_DEFAULT(o, beta2, 0.999f);
    CONFIG_DEFAULT(o, eps, 1e-8f);
    CONFIG_DEFAULT(o, weight_decay, 0.01f);
    CONFIG_DEFAULT(o, max_grad_norm, 1.0f);

    if (ENSURE(exp->schedule, peftps__schedule__descriptor)) goto oom;
    CONFIG_DEFAULT(exp->schedule, warmup_steps, 0);
    CONFIG_DEFAULT_ENUM(exp->schedule, decay, PEFTPS__DECAY__LINEAR);
    CONFIG_DEFAULT(exp->schedule, min_lr, 0.0f);

    if (ENSURE(exp->data, peftps__data__descriptor)) goto oom;
    Peftps__Data *d = exp->data;
    if ((!d->has_format || d->format == PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED) && d->train) {
        Peftps__DataFormat f = config_data_format_of(d->train);
        if (f == PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED)
            return config_fail(
                &c, "data.train",
                "cannot tell the format of data.train \"%s\" from its ending (.tokens, "
                ".txt or .jsonl); set data.format to TOKENS, TEXT or JSONL",
                d->train);
        d->has_format = 1;
        d->format = f;
    }
    CONFIG_DEFAULT(d, seq_len, 128);
    CONFIG_DEFAULT(d, batch_size, 8);
    CONFIG_DEFAULT(d, shards_per_step, d->batch_size);
    CONFIG_DEFAULT(d, eval_every, 0);
    CONFIG_DEFAULT(d, eval_batches, 0);

    if (ENSURE(exp->cluster, peftps__cluster__descriptor)) goto oom;
    Peftps__Cluster *cl = exp->cluster;
    if (!cl->n_servers) {
        cl->servers = malloc(sizeof *cl->servers);
        if (!cl->servers || !(cl->servers[0] = strdup(DEFAULT_SERVER))) goto oom;
        cl->n_servers = 1;
    }
    CONFIG_DEFAULT_ENUM(cl, sync, PEFTPS__SYNC_MODE__BSP);
    CONFIG_DEFAULT(cl, staleness, 0);
    CONFIG_DEFAULT(cl, heartbeat_ms, 1000);
    CONFIG_DEFAULT(cl, worker_timeout_ms, 10000);
    CONFIG_DEFAULT(cl, metrics_port, 0);
    CONFIG_DEFAULT(cl, min_transfer_mbit_s, 100);
    CONFIG_DEFAULT(cl, server_timeout_ms, 120000);
    CONFIG_DEFAULT(cl, share, 1.0);

    if (ENSURE(exp->checkpoint, peftps__checkpoint__descriptor)) goto oom;
    if (default_string(&exp->checkpoint->path, "%s/ckpt", exp->output_dir)) goto oom;
    CONFIG_DEFAULT(exp->checkpoint, every_steps, 100);
    CONFIG_DEFAULT(exp->checkpoint, resume, 1);
    CONFIG_DEFAULT(exp->checkpoint, keep, 3);
    return 0;
oom:
    return err_set(e, "%s: error: out of memory filling defaults", path);
}

/* ---- checks -------------------------------------------------------------- */

static const char *module_name(Peftps__Module m) {
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&peftps__module__descriptor, m);
    return v ? v->name : "?";
}

int config_check_modules(const config_checker *c, const char *field, const Peftps__Module *mods,
                         size_t n, Peftps__Module lo, Peftps__Module hi) {
    char at[160], allowed[256] = "";
    size_t len = 0;
    for (int m = lo; m <= (int)hi; m++)
        len += (size_t)snprintf(allowed + len, sizeof allowed - len, "%s%s", len ? ", " : "",
                                module_name((Peftps__Module)m));
    for (size_t i = 0; i < n; i++) {
        snprintf(at, sizeof at, "%s[%zu]", field, i);
        if (mods[i] < lo || mods[i] > hi)
            return config_fail(c, at, "%s cannot hold %s; allowed: %s", field, module_name(mods[i]),
                               allowed);
        for (size_t j = 0; j < i; j++)
            if (mods[j] == mods[i])
                return config_fail(c, at, "%s lists %s twice", field, module_name(mods[i]));
    }
    return 0;
}

int config_check_indices(const config_checker *c, const char *field, const uint32_t *v, size_t n,
                         long limit, const char *what) {
    char at[160];
    for (size_t i = 0; i < n; i++) {
        snprintf(at, sizeof at, "%s[%zu]", field, i);
        if (limit > 0 && v[i] >= (uint64_t)limit)
            return config_fail(c, at, "%s: %s %u does not exist; the model has %ld %ss (0 to %ld)",
                               field, what, v[i], limit, what, limit - 1);
        for (size_t j = 0; j < i; j++)
            if (v[j] == v[i]) return config_fail(c, at, "%s lists %s %u twice", field, what, v[i]);
    }
    return 0;
}

/* What stat says of a path that must exist: 0 when it is of the wanted kind
 * ('d' directory, 'f' regular file, 'a' either). */
static int check_path(const config_checker *c, const char *field, const char *p, int kind) {
    struct stat st;
    if (stat(p, &st) != 0)
        return config_fail(c, field,
                           "%s \"%s\": %s (relative paths start at the current directory)", field,
                           p, strerror(errno));
    if (kind == 'd' && !S_ISDIR(st.st_mode))
        return config_fail(c, field, "%s \"%s\" is not a directory", field, p);
    if (kind == 'f' && S_ISDIR(st.st_mode))
        return config_fail(c, field, "%s \"%s\" is a directory, not a file", field, p);
    return 0;
}

static int check_ranges(const config_checker *c, const Peftps__Experiment *exp) {
    const Peftps__Optimizer *o = exp->optimizer;
    if (!(o->lr > 0))
        return config_fail(c, "optimizer.lr", "optimizer.lr must be > 0, got %g", (double)o->lr);
    if (!(o->beta1 >= 0 && o->beta1 < 1))
        return config_fail(c, "optimizer.beta1", "optimizer.beta1 must be in [0, 1), got %g",
                           (double)o->beta1);
    if (!(o->beta2 >= 0 && o->beta2 < 1))
        return config_fail(c, "optimizer.beta2", "optimizer.beta2 must be in [0, 1), got %g",
                           (double)o->beta2);
    if (!(o->eps > 0))
        return config_fail(c, "optimizer.eps", "optimizer.eps must be > 0, got %g", (double)o->eps);
    if (!(o->weight_decay >= 0 && isfinite(o->weight_decay)))
        return config_fail(c, "optimizer.weight_decay",
                           "optimizer.weight_decay must be >= 0, got %g", (double)o->weight_decay);
    if (!(o->max_grad_norm >= 0 && isfinite(o->max_grad_norm)))
        return config_fail(c, "optimizer.max_grad_norm",
                           "optimizer.max_grad_norm must be >= 0 (0 disables clipping), got %g",
                           (double)o->max_grad_norm);
    if (!isfinite(o->lr))
        return config_fail(c, "optimizer.lr", "optimizer.lr must be finite, got %g", (double)o->lr);

    const Peftps__Schedule *s = exp->schedule;
    if (s->warmup_steps > s->total_steps)
        return config_fail(c, "schedule.warmup_steps|schedule.total_steps",
                           "schedule.warmup_steps (%u) must not exceed schedule.total_steps (%u)",
                           s->warmup_steps, s->total_steps);
    if (!(s->min_lr >= 0 && s->min_lr <= o->lr))
        return config_fail(c, "schedule.min_lr|optimizer.lr",
                           "schedule.min_lr must be in [0, optimizer.lr = %g], got %g",
                           (double)o->lr, (double)s->min_lr);

    const Peftps__Data *d = exp->data;
    if (d->seq_len == 0) return config_fail(c, "data.seq_len", "data.seq_len must be > 0");
    if (d->batch_size == 0) return config_fail(c, "data.batch_size", "data.batch_size must be > 0");
    if (d->shards_per_step == 0)
        return config_fail(c, "data.shards_per_step", "data.shards_per_step must be > 0");
    if (d->batch_size % d->shards_per_step)
        return config_fail(c, "data.shards_per_step|data.batch_size",
                           "data.batch_size (%u) must be a multiple of data.shards_per_step (%u)",
                           d->batch_size, d->shards_per_step);

    const Peftps__Cluster *cl = exp->cluster;
    if (cl->staleness > 0 && cl->sync != PEFTPS__SYNC_MODE__SSP)
        return config_fail(c, "cluster.staleness|cluster.sync",
                           "cluster.staleness applies only with sync: SSP (bounded staleness)");
    if (cl->heartbeat_ms == 0)
        return config_fail(c, "cluster.heartbeat_ms", "cluster.heartbeat_ms must be > 0");
    if (cl->worker_timeout_ms <= cl->heartbeat_ms)
        return config_fail(c, "cluster.worker_timeout_ms|cluster.heartbeat_ms",
                           "cluster.worker_timeout_ms (%u) must exceed cluster.heartbeat_ms (%u)",
                           cl->worker_timeout_ms, cl->heartbeat_ms);
    if (cl->min_transfer_mbit_s == 0)
        return config_fail(c, "cluster.min_transfer_mbit_s",
                           "cluster.min_transfer_mbit_s must be > 0 (megabits per second)");
    if (cl->server_timeout_ms <= cl->heartbeat_ms)
        return config_fail(c, "cluster.server_timeout_ms|cluster.heartbeat_ms",
                           "cluster.server_timeout_ms (%u) must exceed cluster.heartbeat_ms (%u)",
                           cl->server_timeout_ms, cl->heartbeat_ms);
    if (!(cl->share >= 0.01 && cl->share <= 100.0))
        return config_fail(c, "cluster.share",
                           "cluster.share %g is outside 0.01..100 (a pool's weight of this "
                           "experiment)",
                           cl->share);
    if (cl->metrics_port > 65535)
        return config_fail(c, "cluster.metrics_port", "cluster.metrics_port %u is not a TCP port",
                           cl->metrics_port);
    for (size_t i = 0; i < cl->n_servers; i++) {
        char at[64];
        const char *ep = cl->servers[i];
        snprintf(at, sizeof at, "cluster.servers[%zu]", i);
        if (strncmp(ep, "tcp://", 6) && strncmp(ep, "ipc://", 6) && strncmp(ep, "inproc://", 9))
            return config_fail(
                c, at,
                "cluster.servers entry \"%s\" is not a ZeroMQ endpoint (tcp://HOST:PORT, "
                "ipc://PATH)",
                ep);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(cl->servers[j], ep))
                return config_fail(c, at, "cluster.servers lists \"%s\" twice", ep);
    }
    if (exp->checkpoint->keep == 0)
        return config_fail(c, "checkpoint.keep",
                           "checkpoint.keep must be > 0 (checkpoint.every_steps: 0 turns "
                           "checkpoints off)");
    if (!exp->name[0]) return config_fail(c, "name", "name must not be empty");
    if (!exp->output_dir[0]) return config_fail(c, "output_dir", "output_dir must not be empty");
    return 0;
}

/* A classification task: its labels, and data it can read. */
static int check_task(const config_checker *c, const Peftps__Experiment *exp) {
    const Peftps__Task *t = exp->task;
    if (!t || t->kind_case != PEFTPS__TASK__KIND_SEQUENCE_CLASSIFICATION) return 0;
    const Peftps__SequenceClassification *sc = t->sequence_classification;
    if (sc->n_labels < 2)
        return config_fail(
            c, "task.sequence_classification.labels|task.sequence_classification",
            "task.sequence_classification.labels needs at least 2 class names, got %zu",
            sc->n_labels);
    for (size_t i = 0; i < sc->n_labels; i++) {
        char at[96];
        snprintf(at, sizeof at, "task.sequence_classification.labels[%zu]", i);
        if (!sc->labels[i][0])
            return config_fail(c, at, "task.sequence_classification.labels[%zu] is empty", i);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(sc->labels[i], sc->labels[j]))
                return config_fail(
                    c, at,
                    "task.sequence_classification.labels lists \"%s\" twice (entries %zu "
                    "and %zu)",
                    sc->labels[i], j, i);
    }
    if (exp->data->format != PEFTPS__DATA_FORMAT__JSONL)
        return config_fail(c, "data.format|data.train",
                           "sequence classification reads JSONL records {\"text\": ..., \"label\": "
                           "...}; data.train \"%s\" is not JSONL",
                           exp->data->train);
    return 0;
}

int config_num_labels(const Peftps__Experiment *exp) {
    const Peftps__Task *t = exp->task;
    if (!t || t->kind_case != PEFTPS__TASK__KIND_SEQUENCE_CLASSIFICATION) return 0;
    return (int)t->sequence_classification->n_labels;
}

int config_check_required(const config_checker *c, const Peftps__Experiment *exp,
                          const char *method_hint) {
    if (!exp->model || !exp->model->path || !exp->model->path[0])
        return config_fail(c, "model.path|model",
                           "model.path is required: a Hugging Face model directory with "
                           "config.json");
    if (!exp->method) return config_fail(c, NULL, "a method block is required, %s", method_hint);
    if (!exp->data || !exp->data->train || !exp->data->train[0])
        return config_fail(c, "data.train|data", "data.train is required: the training data file");
    if (!exp->schedule || !exp->schedule->has_total_steps || exp->schedule->total_steps == 0)
        return config_fail(c, "schedule.total_steps",
                           "schedule.total_steps is required and must be > 0");
    if (!exp->optimizer || !exp->cluster || !exp->checkpoint || !exp->name || !exp->output_dir)
        return err_set(c->e, "%s: error: defaults were not filled before checking", c->path);
    return 0;
}

int config_check_values(const config_checker *c, const Peftps__Experiment *exp) {
    if (check_ranges(c, exp) || check_task(c, exp)) return -1;
    if (check_path(c, "model.path", exp->model->path, 'd')) return -1;
    if (check_path(c, "data.train", exp->data->train, 'f')) return -1;
    if (exp->data->eval && exp->data->eval[0] && check_path(c, "data.eval", exp->data->eval, 'f'))
        return -1;
    if (exp->init_from && check_path(c, "init_from", exp->init_from, 'a')) return -1;
    const Peftps__Curve *cv = exp->cluster->curve;
    if (cv && cv->server_keys && check_path(c, "cluster.curve.server_keys", cv->server_keys, 'f'))
        return -1;
    if (cv && cv->worker_keys && check_path(c, "cluster.curve.worker_keys", cv->worker_keys, 'f'))
        return -1;
    if (cv && cv->authorized_keys &&
        check_path(c, "cluster.curve.authorized_keys", cv->authorized_keys, 'f'))
        return -1;
    return 0;
}

/* ---- parsing ------------------------------------------------------------- */

void config_free(Peftps__Experiment *exp) {
    if (exp) protobuf_c_message_free_unpacked(&exp->base, NULL);
}

/* config_parse and config_parse_text: the file or the text (text NULL:
 * the file at path), then the overrides. */
static int parse_with_sets(const char *path, const char *text, size_t len, char *const *sets,
                           int nsets, Peftps__Experiment **out, pbtext_locs **locs_out, err *e) {
    *out = NULL;
    *locs_out = NULL;
    pbtext_locs *locs = pbtext_locs_new();
    if (!locs) return err_set(e, "%s: error: out of memory", path);
    ProtobufCMessage *m = NULL;
    if (text ? pbtext_parse(&peftps__experiment__descriptor, text, len, path, &m, locs, e)
             : pbtext_parse_file(&peftps__experiment__descriptor, path, &m, locs, e))
        goto fail;
    for (int i = 0; i < nsets; i++) {
        size_t n = strlen(sets[i]) + sizeof "--set ";
        char *label = malloc(n);
        if (!label) {
            err_set(e, "%s: error: out of memory", path);
            goto fail;
        }
        snprintf(label, n, "--set %s", sets[i]);
        int rc = pbtext_set_at(m, sets[i], label, locs, e);
        free(label);
        if (rc) goto fail;
    }
    *out = (Peftps__Experiment *)m;
    *locs_out = locs;
    return 0;
fail:
    if (m) protobuf_c_message_free_unpacked(m, NULL);
    pbtext_locs_free(locs);
    return -1;
}

int config_parse(const char *path, char *const *sets, int nsets, Peftps__Experiment **out,
                 pbtext_locs **locs, err *e) {
    return parse_with_sets(path, NULL, 0, sets, nsets, out, locs, e);
}

int config_parse_text(const char *text, size_t len, const char *source, Peftps__Experiment **out,
                      pbtext_locs **locs, err *e) {
    return parse_with_sets(source, text, len, NULL, 0, out, locs, e);
}

/* ---- fingerprint and arguments ------------------------------------------ */

static void hash_sink(void *ctx, const char *data, size_t n) {
    hash_sha256_update(ctx, data, n);
}

void config_fingerprint(const Peftps__Experiment *exp, char hex[65]) {
    /* A shallow copy with the run-specific blocks detached: nothing is
     * allocated, so this cannot fail. The schedule's length is left out too,
     * so that a finished run can be extended by raising total_steps, and
     * what only evaluation reads, which training never sees. */
    Peftps__Experiment copy = *exp;
    copy.output_dir = NULL;
    copy.cluster = NULL;
    copy.checkpoint = NULL;
    /* Recomputation changes memory, never a bit of the result. */
    Peftps__Model model_block;
    if (exp->model) {
        model_block = *exp->model;
        model_block.has_recompute = 0;
        copy.model = &model_block;
    }
    Peftps__Schedule sched;
    if (exp->schedule) {
        sched = *exp->schedule;
        sched.has_total_steps = 0;
        sched.total_steps = 0;
        copy.schedule = &sched;
    }
    Peftps__Data data;
    if (exp->data) {
        data = *exp->data;
        data.eval = NULL;
        data.has_eval_every = data.has_eval_batches = 0;
        data.eval_every = data.eval_batches = 0;
        copy.data = &data;
    }
    hash_sha256 c;
    uint8_t d[32];
    hash_sha256_init(&c);
    pbtext_write(&copy.base, hash_sink, &c);
    hash_sha256_final(&c, d);
    hash_hex(d, hex);
}

int config_parse_args(int *argc, char **argv, config_args *args, err *e) {
    int n = *argc, kept = 1;
    args->nsets = 0;
    args->sets = malloc((size_t)(n > 0 ? n : 1) * sizeof *args->sets);
    if (!args->sets) return err_set(e, "out of memory");
    for (int i = 1; i < n; i++) {
        char *a = argv[i], *v;
        if (!strcmp(a, "--")) {
            while (i < n) argv[kept++] = argv[i++];
            break;
        }
        if (!strcmp(a, "--set")) {
            if (i + 1 >= n) {
                config_args_free(args);
                return err_set(e, "--set needs PATH=VALUE, e.g. --set optimizer.lr=3e-4");
            }
            v = argv[++i];
        } else if (!strncmp(a, "--set=", 6)) {
            v = a + 6;
        } else {
            argv[kept++] = a;
            continue;
        }
        if (!strchr(v, '=') || v[0] == '=') {
            config_args_free(args);
            return err_set(e, "--set %s: expected PATH=VALUE, e.g. --set optimizer.lr=3e-4", v);
        }
        args->sets[args->nsets++] = v;
    }
    if (kept < n) argv[kept] = NULL;
    *argc = kept;
    return 0;
}

void config_args_free(config_args *args) {
    free(args->sets);
    args->sets = NULL;
    args->nsets = 0;
}

Peftps__DataFormat config_data_format_of(const char *path) {
    if (fs_ends_with(path, ".tokens")) return PEFTPS__DATA_FORMAT__TOKENS;
    if (fs_ends_with(path, ".txt")) return PEFTPS__DATA_FORMAT__TEXT;
    if (fs_ends_with(path, ".jsonl")) return PEFTPS__DATA_FORMAT__JSONL;
    return PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED;
}
