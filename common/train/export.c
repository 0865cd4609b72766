/* Export (export.h): opens trained tensors from a train directory, a
 * checkpoint (ckpt.h), a file or a PEFT adapter over their base and method
 * (model.h, peft.h; train.h for methods that calibrate), and writes them as
 * a PEFT adapter, a merged model directory or raw tensors (safetensors.h),
 * with the JSON files through jansson. What is particular to a method (its
 * adapter_config.json fields and tensors, its merge, its calibration) is
 * asked of it through the registry (methods/registry.h). */
#include "train/export.h"
#include "methods/registry.h"

#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "train/ckpt.h"
#include "train/experiment.h"
#include "config/config.h"
#include "base/fsutil.h"
#include "base/log.h"
#include "config/pbtext.h"
#include "model/clshead.h"
#include "model/safetensors.h"

#define EXPORT_PATH_MAX 4096

/* ---- small file helpers --------------------------------------------------------- */

static int path_join(char *buf, const char *dir, const char *name, err *e) {
    int n = snprintf(buf, EXPORT_PATH_MAX, "%s/%s", dir, name);
    if (n < 0 || n >= EXPORT_PATH_MAX)
        return err_set(e, "%s/%s: path longer than %d bytes", dir, name, EXPORT_PATH_MAX - 1);
    return 0;
}

static int is_dir(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static int is_file(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* Whether DIR/name is a regular file (a too long path is not). */
static int has_file(const char *dir, const char *name) {
    char p[EXPORT_PATH_MAX];
    return path_join(p, dir, name, NULL) == 0 && is_file(p);
}

/* Copies a small text file (JSON) from src to dst, atomically. */
static int copy_text(const char *src, const char *dst, err *e) {
    FILE *f = fopen(src, "rb");
    if (!f) return err_errno(e, "%s", src);
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        char *nb = realloc(buf, 2 * cap + 1);
        if (!nb) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = nb;
        cap *= 2;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf) return err_set(e, "%s: out of memory", src);
    if (bad) {
        free(buf);
        return err_set(e, "%s: read error", src);
    }
    buf[n] = '\0';
    if (strlen(buf) != n) {
        free(buf);
        return err_set(e, "%s: holds a NUL byte; not the text file expected", src);
    }
    int rc = fs_write_text(dst, buf, e);
    free(buf);
    return rc;
}

/* jansson's text of a JSON value with a final newline, written atomically. */
static int write_json(const char *path, json_t *root, size_t flags, err *e) {
    char *text = json_dumps(root, flags);
    if (!text) return err_set(e, "%s: out of memory formatting JSON", path);
    size_t n = strlen(text);
    char *t2 = realloc(text, n + 2);
    if (!t2) {
        free(text);
        return err_set(e, "%s: out of memory", path);
    }
    t2[n] = '\n';
    t2[n + 1] = '\0';
    int rc = fs_write_text(path, t2, e);
    free(t2);
    return rc;
}

/* ---- kinds and experiments -------------------------------------------------------- */

void export_opts_default(export_opts *o) {
    memset(o, 0, sizeof *o);
    o->step = CKPT_LATEST;
}

int export_kind_of(const char *source, export_kind *kind, err *e) {
    struct stat sb;
    if (stat(source, &sb) != 0) return err_errno(e, "%s", source);
    if (S_ISREG(sb.st_mode)) {
        *kind = EXPORT_FILE;
        return 0;
    }
    if (!S_ISDIR(sb.st_mode)) return err_set(e, "%s is neither a file nor a directory", source);
    char p[EXPORT_PATH_MAX];
    if (has_file(source, "adapter_config.json")) {
        *kind = EXPORT_PEFT_DIR;
        return 0;
    }
    if (has_file(source, "data.mdb") ||
        (path_join(p, source, "server-0", NULL) == 0 && has_file(p, "data.mdb"))) {
        *kind = EXPORT_CHECKPOINT;
        return 0;
    }
    if (has_file(source, "tensors.safetensors")) {
        *kind = EXPORT_TRAIN_DIR;
        return 0;
    }
    return err_set(e,
                   "%s holds none of tensors.safetensors (a `peftps train` or `peftps run` "
                   "output directory), data.mdb or server-0/data.mdb (a checkpoint directory) "
                   "and adapter_config.json (a PEFT adapter directory)",
                   source);
}

/* Parses an experiment file and applies overrides and defaults as
 * experiment_load does, without experiment_check: the data files an experiment
 * names need not exist to read its tensors (the method checks its block). */
static int load_experiment(const char *path, char *const *sets, int nsets, Peftps__Experiment **out,
                           err *e) {
    *out = NULL;
    ProtobufCMessage *m = NULL;
    if (pbtext_parse_file(&peftps__experiment__descriptor, path, &m, NULL, e) < 0) return -1;
    Peftps__Experiment *exp = (Peftps__Experiment *)m;
    for (int i = 0; i < nsets; i++)
        if (pbtext_set(m, sets[i], e) < 0) goto fail;
    if (experiment_fill_defaults(exp, path, NULL, e) < 0) goto fail;
    if (!methods_find(exp->method)) {
        err_set(e, "%s: error: the experiment has no method block", path);
        goto fail;
    }
    *out = exp;
    return 0;
fail:
    config_free(exp);
    return -1;
}

/* Points exp->model->path at dir. */
static int set_model_path(Peftps__Experiment *exp, const char *dir, err *e) {
    if (!exp->model) {
        exp->model = malloc(sizeof *exp->model);
        if (!exp->model) return err_set(e, "out of memory");
        peftps__model__init(exp->model);
    }
    char *p = strdup(dir);
    if (!p) return err_set(e, "out of memory");
    free(exp->model->path);
    exp->model->path = p;
    return 0;
}

/* ---- checkpoints -------------------------------------------------------------------- */

/* The checkpoints of one run: one environment, or one per server. */
typedef struct ckpt_set {
    int n;
    ckpt **c;
    ckpt_data *d;
} ckpt_set;

static void ckpts_free(ckpt_set *cs) {
    for (int i = 0; i < cs->n; i++) {
        ckpt_data_free(&cs->d[i]);
        ckpt_close(cs->c[i]);
    }
    free(cs->c);
    free(cs->d);
    memset(cs, 0, sizeof *cs);
}

static int held(const uint64_t *steps, int n, uint64_t step) {
    for (int i = 0; i < n; i++)
        if (steps[i] == step) return 1;
    return 0;
}

/* Reads checkpoint `step` (CKPT_LATEST: the newest step every server holds)
 * of DIR or of each DIR/server-i. */
static int ckpts_read(ckpt_set *cs, const char *dir, uint64_t step, err *e) {
    memset(cs, 0, sizeof *cs);
    int servers = 0;
    char p[EXPORT_PATH_MAX];
    if (!has_file(dir, "data.mdb")) {
        for (;; servers++) {
            char name[32];
            snprintf(name, sizeof name, "server-%d", servers);
            if (path_join(p, dir, name, e) < 0) return -1;
            if (!has_file(p, "data.mdb")) break;
        }
    }
    int n = servers ? servers : 1;
    cs->c = calloc((size_t)n, sizeof *cs->c);
    cs->d = calloc((size_t)n, sizeof *cs->d);
    if (!cs->c || !cs->d) {
        free(cs->c);
        free(cs->d);
        return err_set(e, "out of memory");
    }
    cs->n = n;
    uint64_t **steps = calloc((size_t)n, sizeof *steps);
    int *nsteps = calloc((size_t)n, sizeof *nsteps);
    int rc = -1;
    if (!steps || !nsteps) {
        err_set(e, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        if (servers) {
            char name[32];
            snprintf(name, sizeof name, "server-%d", i);
            path_join(p, dir, name, NULL);
        } else {
            snprintf(p, sizeof p, "%s", dir);
        }
        if (ckpt_open(&cs->c[i], p, 0, NULL, e) < 0 ||
            ckpt_steps(cs->c[i], &steps[i], &nsteps[i], e) < 0)
            goto out;
    }
    if (step == CKPT_LATEST) {
        int found = 0;
        for (int j = nsteps[0] - 1; j >= 0 && !found; j--) {
            found = 1;
            for (int i = 1; i < n && found; i++) found = held(steps[i], nsteps[i], steps[0][j]);
            if (found) step = steps[0][j];
        }
        if (!found) {
            err_set(e, "%s: no step is held by all %d servers' checkpoints; pass one with --step",
                    dir, n);
            goto out;
        }
    }
    for (int i = 0; i < n; i++)
        if (ckpt_read(cs->c[i], step, &cs->d[i], e) < 0) goto out;
    rc = 0;
out:
    for (int i = 0; steps && i < n; i++) free(steps[i]);
    free(steps);
    free(nsteps);
    if (rc < 0) ckpts_free(cs);
    return rc;
}

/* The tensor `name` of the set and its values, or NULL. */
static const float *ckpts_find(const ckpt_set *cs, const char *name, const peft_tensor **t) {
    for (int i = 0; i < cs->n; i++)
        for (int j = 0; j < cs->d[i].n_tensors; j++)
            if (!strcmp(cs->d[i].tensors[j].name, name)) {
                *t = &cs->d[i].tensors[j];
                return cs->d[i].params + cs->d[i].tensors[j].offset;
            }
    return NULL;
}

static void shape_text(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t len = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < ndim && len < n; d++)
        len += (size_t)snprintf(buf + len, n - len, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (len < n) snprintf(buf + len, n - len, "]");
}

/* Copies the method's tensors out of the checkpoints by name, as peft_load
 * does from a file: all or nothing. */
static int ckpts_load(const ckpt_set *cs, const char *dir, peft *p, err *e) {
    for (int i = 0; i < p->n_tensors; i++) {
        const peft_tensor *want = &p->tensors[i], *have;
        if (!ckpts_find(cs, want->name, &have))
            return err_set(e, "checkpoint %s has no tensor %s, which method %s trains", dir,
                           want->name, p->method->name);
        int same = have->ndim == want->ndim;
        for (int d = 0; same && d < want->ndim; d++) same = have->shape[d] == want->shape[d];
        if (!same) {
            char a[96], b[96];
            shape_text(have->ndim, have->shape, a, sizeof a);
            shape_text(want->ndim, want->shape, b, sizeof b);
            return err_set(e, "checkpoint %s: tensor %s has shape %s, but method %s needs %s", dir,
                           want->name, a, p->method->name, b);
        }
    }
    for (int s = 0; s < cs->n; s++)
        for (int j = 0; j < cs->d[s].n_tensors; j++)
            if (peft_find_tensor(p, cs->d[s].tensors[j].name) < 0)
                return err_set(e,
                               "checkpoint %s: tensor %s is not one that method %s trains (a "
                               "checkpoint of another experiment?)",
                               dir, cs->d[s].tensors[j].name, p->method->name);
    for (int i = 0; i < p->n_tensors; i++) {
        const peft_tensor *have;
        const float *v = ckpts_find(cs, p->tensors[i].name, &have);
        memcpy(peft_param(p, i), v, p->tensors[i].numel * sizeof(float));
    }
    peft_refresh(p);
    return 0;
}

/* ---- PEFT adapter_config.json, read ------------------------------------------------- */

/* A SEQ_CLS adapter's modules_to_save: what PeftModelForSequenceClassification
 * adds itself (score, classifier) and nothing else; removed from root once
 * checked, as the methods' readers refuse other modules_to_save. */
static int export_seq_cls_modules(const char *path, json_t *root, err *e) {
    json_t *mts = json_object_get(root, "modules_to_save");
    if (!mts || json_is_null(mts)) return 0;
    size_t i;
    json_t *v;
    if (!json_is_array(mts))
        return err_set(e, "%s: \"modules_to_save\" must be a list of module names", path);
    json_array_foreach(mts, i, v) {
        const char *name = json_is_string(v) ? json_string_value(v) : "";
        if (strcmp(name, "score") && strcmp(name, "classifier"))
            return err_set(e,
                           "%s: \"modules_to_save\" lists \"%s\"; peftps trains only the "
                           "classification head score besides the method",
                           path, name);
    }
    json_object_del(root, "modules_to_save");
    return 0;
}

/* The head of a SEQ_CLS adapter directory: its number of labels from the
 * score tensor's rows (0 for a CAUSAL_LM adapter). */
static int peft_dir_num_labels(const char *dir, int *num_labels, err *e) {
    char path[EXPORT_PATH_MAX];
    *num_labels = 0;
    if (path_join(path, dir, "adapter_config.json", e) < 0) return -1;
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root) return err_set(e, "%s:%d:%d: %s", path, je.line, je.column, je.text);
    const char *task = json_string_value(json_object_get(root, "task_type"));
    int cls = task && !strcmp(task, "SEQ_CLS");
    json_decref(root);
    if (!cls) return 0;
    if (path_join(path, dir, "adapter_model.safetensors", e) < 0) return -1;
    st_file *f;
    if (st_open(&f, path, e) < 0) return -1;
    const st_tensor *t = st_find(f, CLSHEAD_TENSOR);
    if (!t) t = st_find(f, CLSHEAD_TENSOR_PROMPT);
    int rc = 0;
    if (!t || t->ndim != 2 || t->shape[0] < 2 || t->shape[0] > 65536)
        rc = err_set(e,
                     "%s: a SEQ_CLS adapter needs the head %s (labels, hidden) with at least 2 "
                     "labels",
                     path, CLSHEAD_TENSOR);
    else
        *num_labels = (int)t->shape[0];
    st_close(f);
    return rc;
}

int export_read_adapter_config(const char *dir, const model_config *cfg, Peftps__Method **method,
                               char **base_model, err *e) {
    *method = NULL;
    if (base_model) *base_model = NULL;
    char path[EXPORT_PATH_MAX];
    if (path_join(path, dir, "adapter_config.json", e) < 0) return -1;
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root) return err_set(e, "%s:%d:%d: %s", path, je.line, je.column, je.text);
    Peftps__Method *m = malloc(sizeof *m);
    int rc = -1;
    if (!m) {
        err_set(e, "out of memory");
        goto out;
    }
    peftps__method__init(m);
    if (!json_is_object(root)) {
        err_set(e, "%s: not a JSON object", path);
        goto out;
    }
    const char *type = json_string_value(json_object_get(root, "peft_type"));
    const json_t *task = json_object_get(root, "task_type");
    const char *task_name = json_is_string(task) ? json_string_value(task) : NULL;
    if (task && !json_is_null(task) &&
        !(task_name && (!strcmp(task_name, "CAUSAL_LM") || !strcmp(task_name, "SEQ_CLS")))) {
        err_set(e,
                "%s: \"task_type\" must be \"CAUSAL_LM\" (a language-model adapter) or "
                "\"SEQ_CLS\" (sequence classification)",
                path);
        goto out;
    }
    if (task_name && !strcmp(task_name, "SEQ_CLS") && export_seq_cls_modules(path, root, e) < 0)
        goto out;
    const peft_method *pm = methods_find_peft_type(type);
    if (!pm) {
        char types[128];
        methods_list(METHODS_PEFT_TYPES, ", ", " and ", types, sizeof types);
        err_set(e, "%s: peft_type %s%s%s is not supported (%s are)", path, type ? "\"" : "",
                type ? type : "missing", type ? "\"" : "", types);
        goto out;
    }
    if (pm->adapter_config_read(path, root, cfg, m, e) < 0) goto out;
    const char *base = json_string_value(json_object_get(root, "base_model_name_or_path"));
    if (base_model && base && !(*base_model = strdup(base))) {
        err_set(e, "out of memory");
        goto out;
    }
    *method = m;
    m = NULL;
    rc = 0;
out:
    if (m) protobuf_c_message_free_unpacked(&m->base, NULL);
    json_decref(root);
    return rc;
}

/* ---- opening ----------------------------------------------------------------------- */

void export_close(export_source *s) {
    if (!s) return;
    if (s->t) {
        trainer_close(s->t);
    } else {
        peft_free(s->p);
        model_files_close(s->files);
    }
    config_free(s->exp);
    free(s->path);
    free(s);
}

/* An experiment for a PEFT adapter: its method over the base at model_dir. */
static int peft_dir_experiment(export_source *s, const char *dir, const char *model_dir, err *e) {
    char *base = NULL;
    Peftps__Method *m = NULL;
    if (export_read_adapter_config(dir, NULL, &m, &base, e) < 0) return -1;
    const char *where = model_dir ? model_dir : base;
    if (!where || !is_dir(where)) {
        err_set(e,
                "%s/adapter_config.json: base_model_name_or_path %s%s%s is not a local model "
                "directory; give the base model's directory",
                dir, where ? "\"" : "", where ? where : "is missing", where ? "\"" : "");
        free(base);
        protobuf_c_message_free_unpacked(&m->base, NULL);
        return -1;
    }
    Peftps__Experiment *exp = malloc(sizeof *exp);
    if (!exp) {
        free(base);
        protobuf_c_message_free_unpacked(&m->base, NULL);
        return err_set(e, "out of memory");
    }
    peftps__experiment__init(exp);
    exp->method = m;
    s->exp = exp;
    int rc = set_model_path(exp, where, e), K;
    free(base);
    if (rc < 0 || peft_dir_num_labels(dir, &K, e) < 0) return -1;
    if (K > 0) {
        /* The class names are not in a PEFT adapter: transformers' defaults. */
        Peftps__Task *t = malloc(sizeof *t);
        Peftps__SequenceClassification *sc = malloc(sizeof *sc);
        char **labels = calloc((size_t)K, sizeof *labels);
        if (!t || !sc || !labels) {
            free(t);
            free(sc);
            free(labels);
            return err_set(e, "out of memory");
        }
        peftps__task__init(t);
        peftps__sequence_classification__init(sc);
        t->kind_case = PEFTPS__TASK__KIND_SEQUENCE_CLASSIFICATION;
        t->sequence_classification = sc;
        sc->labels = labels;
        sc->n_labels = (size_t)K;
        exp->task = t;
        for (int i = 0; i < K; i++)
            if (asprintf(&labels[i], "LABEL_%d", i) < 0) {
                labels[i] = NULL;
                return err_set(e, "out of memory");
            }
    }
    return 0;
}

int export_open(export_source **out, const char *source, const export_opts *o, err *e) {
    *out = NULL;
    export_source *s = calloc(1, sizeof *s);
    if (!s || !(s->path = strdup(source))) {
        free(s);
        return err_set(e, "out of memory");
    }
    char path[EXPORT_PATH_MAX], fp[65] = "";
    ckpt_set cs = {0};
    if (export_kind_of(source, &s->kind, e) < 0) goto fail;

    /* The experiment, and the fingerprint a checkpoint must carry, taken
     * before model.path is pointed elsewhere. */
    if (s->kind == EXPORT_PEFT_DIR) {
        if (o->experiment || o->nsets)
            log_warn("%s is a PEFT adapter: its adapter_config.json describes it, and the "
                     "experiment and --set options are not used",
                     source);
        if (peft_dir_experiment(s, source, o->model_dir, e) < 0) goto fail;
    } else {
        const char *xp = o->experiment;
        if (!xp && s->kind == EXPORT_TRAIN_DIR) {
            if (path_join(path, source, "experiment.pbtxt", e) < 0) goto fail;
            if (!is_file(path)) {
                err_set(e, "%s has no experiment.pbtxt; give the experiment that trained it",
                        source);
                goto fail;
            }
            xp = path;
        }
        if (!xp) {
            err_set(e,
                    "%s is a %s, which does not record its experiment; give the experiment "
                    "file the run used (and its --set options)",
                    source, s->kind == EXPORT_CHECKPOINT ? "checkpoint" : "tensor file");
            goto fail;
        }
        if (load_experiment(xp, o->sets, o->nsets, &s->exp, e) < 0) goto fail;
        config_fingerprint(s->exp, fp);
        if (o->model_dir && set_model_path(s->exp, o->model_dir, e) < 0) goto fail;
        if (!s->exp->model || !s->exp->model->path || !s->exp->model->path[0]) {
            err_set(e, "%s: the experiment names no model.path; give the base model directory", xp);
            goto fail;
        }
    }
    if (s->kind == EXPORT_CHECKPOINT) {
        if (ckpts_read(&cs, source, o->step, e) < 0) goto fail;
        s->step = cs.d[0].step;
        for (int i = 0; i < cs.n; i++)
            if (strcmp(cs.d[i].experiment_fp, fp)) {
                err_set(e,
                        "checkpoint %s was written by another experiment (fingerprint %.12s, "
                        "this one %.12s): give the experiment file and --set options the server "
                        "ran with",
                        source, cs.d[i].experiment_fp, fp);
                goto fail;
            }
    }

    /* The method over its base: calibrating methods through the trainer,
     * whose calibration is the one training did. */
    if (methods_calibration_batches(s->exp->method) > 0) {
        free(s->exp->init_from); /* replaced below by the trained tensors */
        s->exp->init_from = NULL;
        if (trainer_open(&s->t, s->exp, 0, e) < 0) {
            err_wrap(e, "rebuilding the method, which chooses what trains from calibration "
                        "batches of data.train (readable as during training)");
            goto fail;
        }
        trainer_drop_compute(s->t);
        s->files = s->t->files;
        s->p = s->t->p;
    } else {
        /* In the experiment's compute, as training held it: a BF16 base
         * under BF16 compute is read in place, with no F32 copy. */
        if (model_files_open_compute(&s->files, s->exp->model->path, train_compute(s->exp), e) < 0)
            goto fail;
        if (methods_create(&s->p, s->exp->method, model_files_config(s->files),
                           model_files_weights(s->files), e) < 0 ||
            train_add_task(s->p, s->exp, model_files_config(s->files), e) < 0)
            goto fail;
        peft_init(s->p, s->exp->seed);
    }

    switch (s->kind) {
    case EXPORT_CHECKPOINT:
        for (int i = 0; i < cs.n; i++)
            if (cs.d[i].base_fp[0] && strcmp(cs.d[i].base_fp, model_files_fingerprint(s->files))) {
                err_set(e, "checkpoint %s was trained on another base model than %s", source,
                        s->exp->model->path);
                goto fail;
            }
        if (ckpts_load(&cs, source, s->p, e) < 0) goto fail;
        break;
    case EXPORT_TRAIN_DIR:
        if (path_join(path, source, "tensors.safetensors", e) < 0 || peft_load(s->p, path, e) < 0)
            goto fail;
        break;
    case EXPORT_PEFT_DIR:
        /* Checked against the model now that it is open. */
        {
            Peftps__Method *m = NULL;
            if (export_read_adapter_config(source, model_files_config(s->files), &m, NULL, e) < 0)
                goto fail;
            protobuf_c_message_free_unpacked(&m->base, NULL);
        }
        if (peft_load(s->p, source, e) < 0) goto fail;
        break;
    case EXPORT_FILE:
        if (peft_load(s->p, source, e) < 0) goto fail;
        break;
    }
    ckpts_free(&cs);
    *out = s;
    return 0;
fail:
    ckpts_free(&cs);
    export_close(s);
    return -1;
}

/* ---- PEFT layout, written ----------------------------------------------------------- */

static int no_peft_format(const export_source *s, err *e) {
    char names[128];
    methods_list(METHODS_ADAPTER_NAMES, ", ", " and ", names, sizeof names);
    return err_set(e,
                   "method %s has no Hugging Face PEFT format (%s have one); export it with "
                   "--format merged (a complete model) or --format tensors (the trained tensors)",
                   s->p->method->name, names);
}

int export_adapter_config(const export_source *s, char **text, err *e) {
    *text = NULL;
    const peft_method *pm = s->p->method;
    if (!pm->adapter_config_write) return no_peft_format(s, e);
    json_t *o = json_object();
    if (!o) return err_set(e, "out of memory");
    json_object_set_new(o, "auto_mapping", json_null());
    /* Absolute, so that the adapter finds its base from wherever it is
     * loaded (PEFT's AutoPeftModel, `peftps generate --adapter`). */
    char abs_base[PATH_MAX];
    const char *base = realpath(s->exp->model->path, abs_base) ? abs_base : s->exp->model->path;
    json_object_set_new(o, "base_model_name_or_path", json_string(base));
    json_object_set_new(o, "inference_mode", json_true());
    json_object_set_new(o, "revision", json_null());
    json_object_set_new(o, "task_type", json_string("CAUSAL_LM"));
    if (pm->adapter_config_write(s->p, o, e) < 0) {
        json_decref(o);
        return -1;
    }
    if (s->p->num_labels > 0) {
        /* Sequence classification: PeftModelForSequenceClassification's
         * task, and the head saved whole as a module to save. */
        json_t *mts = json_array();
        json_array_append_new(mts, json_string("score"));
        json_object_set_new(o, "task_type", json_string("SEQ_CLS"));
        json_object_set_new(o, "modules_to_save", mts);
    }
    /* As PEFT writes it: json.dumps(indent=2, sort_keys=True). */
    *text = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(15));
    json_decref(o);
    return *text ? 0 : err_set(e, "out of memory formatting adapter_config.json");
}

/* The score head of sequence classification, added to the adapter file the
 * method wrote (each method writes its own tensors) under PEFT's saved key
 * of a module to save (clshead_adapter_name). A file that already holds it
 * (a method that saves every tensor by name) is left alone. */
static int export_add_head(const peft *p, const char *path, err *e) {
    st_file *f;
    if (st_open(&f, path, e) < 0) return -1;
    if (st_find(f, CLSHEAD_TENSOR) || st_find(f, CLSHEAD_TENSOR_PROMPT)) {
        st_close(f);
        return 0;
    }
    int n = st_count(f), rc;
    st_entry *en = calloc((size_t)n + 1, sizeof *en);
    if (!en) {
        st_close(f);
        return err_set(e, "out of memory");
    }
    for (int i = 0; i < n; i++) {
        const st_tensor *t = st_tensor_at(f, i);
        en[i] = (st_entry){.name = t->name, .dtype = t->dtype, .ndim = t->ndim, .data = t->data};
        memcpy(en[i].shape, t->shape, sizeof en[i].shape);
    }
    const peft_tensor *h = &p->tensors[p->score];
    en[n] = (st_entry){
        .name = clshead_adapter_name(p), .dtype = ST_F32, .ndim = 2, .data = p->params + h->offset};
    en[n].shape[0] = h->shape[0];
    en[n].shape[1] = h->shape[1];
    /* st_write renames a new file over the mapped one: the entries stay valid. */
    rc = st_write(path, en, n + 1, "{\"format\": \"pt\"}", e);
    free(en);
    st_close(f);
    return rc;
}

int export_peft(const export_source *s, const char *dir, err *e) {
    char *config;
    if (export_adapter_config(s, &config, e) < 0) return -1;
    char path[EXPORT_PATH_MAX];
    int rc = -1;
    if (fs_mkdir_p(dir, e) < 0 || path_join(path, dir, "adapter_model.safetensors", e) < 0)
        goto out;
    if (s->p->method->adapter_save(s->p, path, e) < 0 ||
        (s->p->num_labels > 0 && export_add_head(s->p, path, e) < 0))
        goto out;
    size_t n = strlen(config);
    char *text = realloc(config, n + 2);
    if (!text) {
        err_set(e, "out of memory");
        goto out;
    }
    config = text;
    config[n] = '\n';
    config[n + 1] = '\0';
    if (path_join(path, dir, "adapter_config.json", e) < 0 || fs_write_text(path, config, e) < 0)
        goto out;
    rc = 0;
out:
    free(config);
    return rc;
}

/* ---- merged model ----------------------------------------------------------------- */

/* One weight of the merged model. */
typedef struct mweight {
    int layer, kind;
    char name[PEFT_NAME_MAX];
    int ndim;
    int64_t shape[2];
    size_t numel;
    int shard;
} mweight;

static int is_vector(int layer, int kind) {
    if (layer == MODEL_GLOBAL) return kind == GW_FINAL_NORM;
    return kind == LW_INPUT_NORM || kind == LW_POST_NORM || kind >= LW_Q_BIAS;
}

static void mweight_set(mweight *w, const model_config *cfg, int layer, int kind) {
    int rows, cols;
    w->layer = layer;
    w->kind = kind;
    w->numel = model_weight_shape(cfg, layer, kind, &rows, &cols);
    model_weight_name(cfg, layer, kind, w->name, sizeof w->name);
    w->ndim = is_vector(layer, kind) ? 1 : 2;
    w->shape[0] = rows;
    w->shape[1] = cols;
}

/* A copy of base weight (layer, kind) with the method's change added. */
static float *merged_weight(export_source *s, const mweight *mw, err *e) {
    float *buf = malloc(mw->numel * sizeof *buf);
    if (!buf) {
        err_set(e, "out of memory for %s (%zu values)", mw->name, mw->numel);
        return NULL;
    }
    model_weights_read_f32(model_files_weights(s->files), mw->layer, mw->kind, buf, mw->numel);
    if (peft_merge(s->p, mw->layer, mw->kind, buf, e) < 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

/* Whether the method changes the embedding of a tied model. */
static int embedding_changed(export_source *s, int *changed, err *e) {
    mweight mw;
    mweight_set(&mw, model_files_config(s->files), MODEL_GLOBAL, GW_EMBED);
    float *buf = merged_weight(s, &mw, e), *base = malloc(mw.numel * sizeof *base);
    if (!buf || !base) {
        if (buf && !base) err_set(e, "out of memory for %s (%zu values)", mw.name, mw.numel);
        free(buf);
        free(base);
        return -1;
    }
    model_weights_read_f32(model_files_weights(s->files), MODEL_GLOBAL, GW_EMBED, base, mw.numel);
    *changed = memcmp(buf, base, mw.numel * sizeof *buf) != 0;
    free(buf);
    free(base);
    return 0;
}

/* buf (numel F32) rounded to BF16 (round to nearest even) in its own first
 * half, which is then all that is kept. Each value is read before its
 * 2 bytes are written, and those never reach a value not yet read. */
static float *narrow_bf16(float *buf, size_t numel) {
    for (size_t i = 0; i < numel; i++) {
        uint16_t h = st_f32_to_bf16(buf[i]);
        memcpy((char *)buf + 2 * i, &h, sizeof h);
    }
    float *shrunk = realloc(buf, numel ? numel * 2 : 1);
    return shrunk ? shrunk : buf;
}

static int write_shard(export_source *s, const mweight *ws, int n, int shard, int dtype,
                       const char *path, err *e) {
    int count = 0;
    for (int i = 0; i < n; i++) count += ws[i].shard == shard;
    st_entry *en = calloc((size_t)count, sizeof *en);
    float **bufs = calloc((size_t)count, sizeof *bufs);
    int rc = -1, k = 0;
    if (!en || !bufs) {
        err_set(e, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        if (ws[i].shard != shard) continue;
        if (!(bufs[k] = merged_weight(s, &ws[i], e))) goto out;
        if (dtype == ST_BF16) bufs[k] = narrow_bf16(bufs[k], ws[i].numel);
        en[k].name = ws[i].name;
        en[k].dtype = dtype;
        en[k].ndim = ws[i].ndim;
        en[k].shape[0] = ws[i].shape[0];
        en[k].shape[1] = ws[i].shape[1];
        en[k].data = bufs[k];
        k++;
    }
    rc = st_write(path, en, count, "{\"format\": \"pt\"}", e);
out:
    for (int i = 0; bufs && i < count; i++) free(bufs[i]);
    free(bufs);
    free(en);
    return rc;
}

/* The base's config.json with what the merged weights change. */
static int write_config(export_source *s, const char *dir, int untie, int dtype, err *e) {
    const char *torch = dtype == ST_BF16 ? "bfloat16" : "float32";
    char src[EXPORT_PATH_MAX], dst[EXPORT_PATH_MAX];
    if (path_join(src, s->exp->model->path, "config.json", e) < 0 ||
        path_join(dst, dir, "config.json", e) < 0)
        return -1;
    json_error_t je;
    json_t *root = json_load_file(src, 0, &je);
    if (!root) return err_set(e, "%s:%d:%d: %s", src, je.line, je.column, je.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return err_set(e, "%s: not a JSON object", src);
    }
    if (untie) json_object_set_new(root, "tie_word_embeddings", json_false());
    /* transformers reads either name; the weights are now in dtype. */
    int named = 0;
    if (json_object_get(root, "dtype")) {
        json_object_set_new(root, "dtype", json_string(torch));
        named = 1;
    }
    if (json_object_get(root, "torch_dtype") || !named)
        json_object_set_new(root, "torch_dtype", json_string(torch));
    int rc = write_json(dst, root, JSON_INDENT(2), e);
    json_decref(root);
    return rc;
}

static int write_index(const char *dir, const mweight *ws, int n, int shards, size_t elem, err *e) {
    json_t *root = json_object(), *meta = json_object(), *map = json_object();
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        char file[64];
        snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", ws[i].shard + 1, shards);
        json_object_set_new(map, ws[i].name, json_string(file));
        total += ws[i].numel * elem;
    }
    json_object_set_new(meta, "total_size", json_integer((json_int_t)total));
    json_object_set_new(root, "metadata", meta);
    json_object_set_new(root, "weight_map", map);
    char path[EXPORT_PATH_MAX];
    int rc = path_join(path, dir, "model.safetensors.index.json", e);
    if (rc == 0) rc = write_json(path, root, JSON_INDENT(2) | JSON_SORT_KEYS, e);
    json_decref(root);
    return rc;
}

int export_merged(export_source *s, const char *dir, size_t shard_bytes, int dtype, err *e) {
    const model_config *cfg = model_files_config(s->files);
    if (s->p->num_labels > 0)
        return err_set(e,
                       "a merged model of sequence classification (LlamaForSequenceClassification) "
                       "is not supported; export the adapter with --format peft (SEQ_CLS) "
                       "or the tensors with --format tensors");
    if (dtype == EXPORT_DTYPE_BASE)
        dtype = model_files_dtype(s->files) == ST_BF16 ? ST_BF16 : ST_F32;
    if (dtype != ST_BF16 && dtype != ST_F32)
        return err_set(e, "merged models are written in BF16 or F32, not %s",
                       st_dtype_name((st_dtype)dtype));
    size_t elem = dtype == ST_BF16 ? 2 : sizeof(float);
    if (!s->p->method->merge)
        return err_set(e,
                       "method %s changes no base weight, so there is nothing to merge; export "
                       "the adapter with --format peft instead",
                       s->p->method->name);
    if (!shard_bytes) shard_bytes = EXPORT_SHARD_BYTES;
    if (fs_mkdir_p(dir, e) < 0) return -1;
    char real_out[PATH_MAX], real_base[PATH_MAX];
    if (realpath(dir, real_out) && realpath(s->exp->model->path, real_base) &&
        !strcmp(real_out, real_base))
        return err_set(e, "%s is the base model's own directory; write the merged model elsewhere",
                       dir);
    int untie = 0;
    if (cfg->tie_word_embeddings && embedding_changed(s, &untie, e) < 0) return -1;

    /* Hugging Face order: the embedding, the layers, the final norm, lm_head. */
    int cap = 3 + cfg->num_layers * LW_COUNT, n = 0;
    mweight *ws = calloc((size_t)cap, sizeof *ws);
    if (!ws) return err_set(e, "out of memory");
    mweight_set(&ws[n++], cfg, MODEL_GLOBAL, GW_EMBED);
    for (int l = 0; l < cfg->num_layers; l++)
        for (int k = 0; k < LW_COUNT; k++)
            if (model_weight_shape(cfg, l, k, NULL, NULL)) mweight_set(&ws[n++], cfg, l, k);
    mweight_set(&ws[n++], cfg, MODEL_GLOBAL, GW_FINAL_NORM);
    if (!cfg->tie_word_embeddings || untie) mweight_set(&ws[n++], cfg, MODEL_GLOBAL, GW_LM_HEAD);
    if (untie)
        log_info("the method changed the tied embedding; lm_head is written apart and "
                 "tie_word_embeddings set to false");

    int shards = 1;
    size_t in_shard = 0;
    for (int i = 0; i < n; i++) {
        size_t bytes = ws[i].numel * elem;
        if (in_shard > 0 && in_shard + bytes > shard_bytes) {
            shards++;
            in_shard = 0;
        }
        ws[i].shard = shards - 1;
        in_shard += bytes;
    }
    char path[EXPORT_PATH_MAX];
    int rc = -1;
    /* A file of an earlier export in the other layout would shadow this one. */
    if (path_join(path, dir, shards == 1 ? "model.safetensors.index.json" : "model.safetensors",
                  e) < 0)
        goto out;
    unlink(path);
    for (int sh = 0; sh < shards; sh++) {
        char file[64];
        if (shards == 1)
            snprintf(file, sizeof file, "model.safetensors");
        else
            snprintf(file, sizeof file, "model-%05d-of-%05d.safetensors", sh + 1, shards);
        if (path_join(path, dir, file, e) < 0 || write_shard(s, ws, n, sh, dtype, path, e) < 0)
            goto out;
    }
    if (shards > 1 && write_index(dir, ws, n, shards, elem, e) < 0) goto out;
    if (write_config(s, dir, untie, dtype, e) < 0) goto out;
    static const char *const extras[] = {"tokenizer.json", "tokenizer_config.json",
                                         "special_tokens_map.json", "generation_config.json",
                                         "chat_template.jinja"};
    for (size_t i = 0; i < sizeof extras / sizeof extras[0]; i++) {
        char src[EXPORT_PATH_MAX];
        if (path_join(src, s->exp->model->path, extras[i], e) < 0 ||
            path_join(path, dir, extras[i], e) < 0)
            goto out;
        if (is_file(src) && copy_text(src, path, e) < 0) goto out;
    }
    rc = 0;
out:
    free(ws);
    return rc;
}

/* ---- raw tensors --------------------------------------------------------------------- */

/* Every tensor of a safetensors file, as F32, to path. */
static int tensors_from_file(const char *src, const char *path, err *e) {
    st_file *f;
    if (st_open(&f, src, e) < 0) return -1;
    int n = st_count(f), rc = -1;
    st_entry *en = calloc((size_t)(n ? n : 1), sizeof *en);
    float **bufs = calloc((size_t)(n ? n : 1), sizeof *bufs);
    if (!en || !bufs) {
        err_set(e, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        const st_tensor *t = st_tensor_at(f, i);
        bufs[i] = malloc((t->numel ? t->numel : 1) * sizeof(float));
        if (!bufs[i]) {
            err_set(e, "out of memory for %s", t->name);
            goto out;
        }
        if (st_convert_f32(f, t, bufs[i], e) < 0) goto out;
        en[i].name = t->name;
        en[i].dtype = ST_F32;
        en[i].ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++) en[i].shape[d] = t->shape[d];
        en[i].data = bufs[i];
    }
    rc = st_write(path, en, n, "{\"format\": \"pt\"}", e);
out:
    for (int i = 0; bufs && i < n; i++) free(bufs[i]);
    free(bufs);
    free(en);
    st_close(f);
    return rc;
}

static int tensors_from_ckpt(const char *dir, uint64_t step, const char *path, err *e) {
    ckpt_set cs;
    if (ckpts_read(&cs, dir, step, e) < 0) return -1;
    int total = 0;
    for (int i = 0; i < cs.n; i++) total += cs.d[i].n_tensors;
    st_entry *en = calloc((size_t)(total ? total : 1), sizeof *en);
    int rc = -1, k = 0;
    if (!en) {
        err_set(e, "out of memory");
        goto out;
    }
    for (int i = 0; i < cs.n; i++)
        for (int j = 0; j < cs.d[i].n_tensors; j++) {
            const peft_tensor *t = &cs.d[i].tensors[j];
            en[k].name = t->name;
            en[k].dtype = ST_F32;
            en[k].ndim = t->ndim;
            for (int d = 0; d < t->ndim; d++) en[k].shape[d] = t->shape[d];
            en[k].data = cs.d[i].params + t->offset;
            k++;
        }
    /* st_write refuses a name twice: two servers holding one tensor. */
    rc = st_write(path, en, total, "{\"format\": \"pt\"}", e);
    if (rc == 0)
        log_info("%s: step %llu, %d tensors", dir, (unsigned long long)cs.d[0].step, total);
out:
    free(en);
    ckpts_free(&cs);
    return rc;
}

int export_tensors(const char *source, const export_opts *o, const char *path, err *e) {
    export_kind kind;
    if (export_kind_of(source, &kind, e) < 0) return -1;
    char src[EXPORT_PATH_MAX];
    switch (kind) {
    case EXPORT_CHECKPOINT:
        return tensors_from_ckpt(source, o->step, path, e);
    case EXPORT_TRAIN_DIR:
        if (path_join(src, source, "tensors.safetensors", e) < 0) return -1;
        return tensors_from_file(src, path, e);
    case EXPORT_PEFT_DIR:
        if (path_join(src, source, "adapter_model.safetensors", e) < 0) return -1;
        return tensors_from_file(src, path, e);
    case EXPORT_FILE:
        return tensors_from_file(source, path, e);
    }
    return err_set(e, "%s: unknown kind of source", source);
}
