/* Export (common/train/export.h) end to end on the tiny fixtures: trained LoRA and
 * prefix tensors survive the PEFT layout and come back through init_from
 * bit for bit; the adapter's key names, shapes and adapter_config.json
 * fields are PEFT's, asserted one by one; a merged model gives the logits of
 * the base with the method (LoRA, layer-wise, attention heads, subnetwork,
 * full; tied and biased models; sharded files) within float rounding and
 * visibly differs from the base; checkpoints export from one server or
 * several; and the refusals (prefix merged, other methods as PEFT, foreign
 * adapters and experiments) fire with their messages. */
#include <jansson.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "train/ckpt.h"
#include "config/config.h"
#include "train/experiment.h"
#include "train/export.h"
#include "config/pbtext.h"
#include "model/peft.h"
#include "methods/registry.h"
#include "base/rng.h"
#include "model/safetensors.h"
#include "train/train.h"

#define TINY "tests/fixtures/tiny-llama"
#define TIED "tests/fixtures/reference/tied"
#define QWEN2 "tests/fixtures/reference/qwen2"
#define LLAMA_BIAS "tests/fixtures/reference/llama-bias"

/* Logits of a merged model against the base with the method: both are F32
 * with the same kernels. The delta methods and full fine-tuning read the
 * very W_eff the merge writes (measured: equal to the bit); LoRA adds
 * scaling * B A once into W instead of scaling * (x A^T) B^T per product,
 * a float rounding of the logits' scale (measured 5e-7). */
#define MERGE_TOL 1e-5
/* The trained change must show in the logits by far more than that. */
#define EFFECT_MIN 1e-3

static char tmp_root[] = "/tmp/peftps_test_export_XXXXXX";

static int setup_root(void **state) {
    (void)state;
    return mkdtemp(tmp_root) ? 0 : -1;
}

static int remove_root(void **state) {
    (void)state;
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_root);
    return system(cmd) == 0 ? 0 : -1;
}

/* A fresh directory under the test's root. */
static void tmp_dir(char *buf, size_t n, const char *name) {
    snprintf(buf, n, "%s/%s", tmp_root, name);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", buf);
    assert_int_equal(system(cmd), 0);
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* ---- experiments and trained sources -------------------------------------------- */

static const char exp_fmt[] = "name: \"test_export\"\n"
                              "seed: 5\n"
                              "model { path: \"%s\" }\n"
                              "method { %s }\n"
                              "optimizer { lr: 2e-2 }\n"
                              "schedule { total_steps: 4 }\n"
                              "data { train: \"tests/fixtures/tiny.tokens\" seq_len: 16 "
                              "batch_size: 4 shards_per_step: 2 }\n"
                              "%s";

/* Loads an experiment through a file, as `peftps train` does. */
static Peftps__Experiment *load_exp(const char *model_dir, const char *method, const char *extra) {
    char path[512], text[2048];
    snprintf(path, sizeof path, "%s/exp.pbtxt", tmp_root);
    snprintf(text, sizeof text, exp_fmt, model_dir, method, extra ? extra : "");
    write_text(path, text);
    Peftps__Experiment *ex = NULL;
    err e;
    if (experiment_load(path, NULL, 0, &ex, NULL, &e) < 0) fail_msg("%s\n%s", text, e.msg);
    return ex;
}

/* Writes dir/experiment.pbtxt and dir/tensors.safetensors as `peftps train`
 * does. */
static void write_train_dir(const char *dir, const Peftps__Experiment *ex, const peft *p) {
    err e;
    char path[512], *text;
    assert_int_equal(mkdir(dir, 0777), 0);
    assert_int_equal(pbtext_print(&ex->base, &text, &e), 0);
    snprintf(path, sizeof path, "%s/experiment.pbtxt", dir);
    write_text(path, text);
    free(text);
    snprintf(path, sizeof path, "%s/tensors.safetensors", dir);
    if (peft_save(p, path, &e) < 0) fail_msg("%s", e.msg);
}

/* Whether the method picks what trains from calibration batches, which only
 * trainer_open runs (the rule of train.c). */
static int calibrates(const Peftps__Method *m) {
    return (m->kind_case == PEFTPS__METHOD__KIND_ATTENTION_HEADS &&
            m->attention_heads->has_top_k) ||
           (m->kind_case == PEFTPS__METHOD__KIND_SUBNETWORK &&
            m->subnetwork->selection == PEFTPS__MASK_SELECTION__GRADIENT);
}

/* Trains `steps` steps (or, with 0, sets every trainable value to a random
 * perturbation of its initial value, which reaches every entry of every
 * tensor), writes the train directory and returns a copy of the params.
 * Without steps or calibration the method is built without the trainer, so
 * that models whose vocabulary the token data exceeds serve too. */
static float *make_source(const char *dir, const Peftps__Experiment *ex, int steps, size_t *n) {
    trainer *t = NULL;
    model_files *mf = NULL;
    peft *p = NULL;
    err e;
    if (steps > 0 || calibrates(ex->method)) {
        if (trainer_open(&t, ex, 1, &e) < 0) fail_msg("trainer_open: %s", e.msg);
        p = t->p;
    } else {
        if (model_files_open(&mf, ex->model->path, &e) < 0 ||
            methods_create(&p, ex->method, model_files_config(mf), model_files_weights(mf), &e) < 0)
            fail_msg("%s", e.msg);
        peft_init(p, ex->seed);
    }
    for (int s = 0; s < steps; s++) {
        train_step_stats st;
        if (trainer_step(t, (uint64_t)s, &st, &e) < 0) fail_msg("step %d: %s", s, e.msg);
    }
    if (steps == 0) {
        rng r;
        rng_seed(&r, 99, 1, 2, 3);
        for (size_t i = 0; i < p->n_params; i++) p->params[i] += 0.05f * rng_normal(&r);
        peft_refresh(p);
    }
    write_train_dir(dir, ex, p);
    *n = p->n_params;
    float *copy = malloc(*n * sizeof *copy);
    assert_non_null(copy);
    memcpy(copy, p->params, *n * sizeof *copy);
    if (t) {
        trainer_close(t);
    } else {
        peft_free(p);
        model_files_close(mf);
    }
    return copy;
}

static export_source *open_source(const char *source, const char *experiment,
                                  const char *model_dir) {
    export_opts o;
    export_opts_default(&o);
    o.experiment = experiment;
    o.model_dir = model_dir;
    export_source *s = NULL;
    err e;
    if (export_open(&s, source, &o, &e) < 0) fail_msg("export_open %s: %s", source, e.msg);
    return s;
}

/* Trains `block` on model_dir for `steps` steps (0: initialised, then
 * perturbed) into a fresh directory NAME_src, whose path goes to src, and
 * opens it as a source. *trained receives the tensors written (n floats;
 * the caller frees them) unless trained is NULL. */
static export_source *source_of(char *src, size_t src_n, const char *name, const char *model_dir,
                                const char *block, int steps, float **trained, size_t *n) {
    char dir[128];
    snprintf(dir, sizeof dir, "%s_src", name);
    tmp_dir(src, src_n, dir);
    Peftps__Experiment *ex = load_exp(model_dir, block, NULL);
    size_t count;
    float *t = make_source(src, ex, steps, &count);
    config_free(ex);
    if (trained)
        *trained = t;
    else
        free(t);
    if (n) *n = count;
    return open_source(src, NULL, NULL);
}

static void assert_params(const peft *p, const float *want, size_t n) {
    assert_int_equal(p->n_params, n);
    for (int i = 0; i < p->n_tensors; i++) {
        const peft_tensor *t = &p->tensors[i];
        if (memcmp(p->params + t->offset, want + t->offset, t->numel * sizeof(float)))
            fail_msg("tensor %s differs from the trained one", t->name);
    }
}

/* init_from = where, through trainer_open as a run starting from it does. */
static void assert_init_from(const char *model_dir, const char *method, const char *where,
                             const float *want, size_t n) {
    char extra[600];
    snprintf(extra, sizeof extra, "init_from: \"%s\"\n", where);
    Peftps__Experiment *ex = load_exp(model_dir, method, extra);
    trainer *t = NULL;
    err e;
    if (trainer_open(&t, ex, 0, &e) < 0) fail_msg("init_from %s: %s", where, e.msg);
    assert_params(t->p, want, n);
    trainer_close(t);
    config_free(ex);
}

/* ---- JSON assertions -------------------------------------------------------------- */

static json_t *load_json(const char *dir, const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    json_error_t je;
    json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!j) fail_msg("%s:%d: %s", path, je.line, je.text);
    return j;
}

static void assert_json_null(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    if (!v || !json_is_null(v)) fail_msg("\"%s\" should be null", key);
}

static void assert_json_bool(const json_t *o, const char *key, int want) {
    const json_t *v = json_object_get(o, key);
    if (!json_is_boolean(v) || json_is_true(v) != want)
        fail_msg("\"%s\" should be %s", key, want ? "true" : "false");
}

static void assert_json_int(const json_t *o, const char *key, long long want) {
    const json_t *v = json_object_get(o, key);
    if (!json_is_integer(v) || json_integer_value(v) != want)
        fail_msg("\"%s\" should be the integer %lld", key, want);
}

static void assert_json_str(const json_t *o, const char *key, const char *want) {
    const char *v = json_string_value(json_object_get(o, key));
    if (!v || strcmp(v, want)) fail_msg("\"%s\" is \"%s\", should be \"%s\"", key, v, want);
}

/* TINY as the adapter records it: absolute, whatever directory export ran in. */
static const char *tiny_abs(void) {
    static char abs[PATH_MAX];
    assert_non_null(realpath(TINY, abs));
    assert_true(abs[0] == '/');
    return abs;
}

static void assert_json_empty_object(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    if (!json_is_object(v) || json_object_size(v)) fail_msg("\"%s\" should be {}", key);
}

static void assert_json_strings(const json_t *o, const char *key, const char *const *want, int n) {
    const json_t *v = json_object_get(o, key);
    if (!json_is_array(v) || json_array_size(v) != (size_t)n)
        fail_msg("\"%s\": %d entries", key, n);
    for (int i = 0; i < n; i++)
        assert_string_equal(json_string_value(json_array_get(v, i)), want[i]);
}

/* Keys in sorted order and 2-space indentation: json.dumps(indent=2,
 * sort_keys=True), as PEFT writes the file. */
static void assert_peft_text(const char *dir) {
    char path[512], line[512], prev[512] = "";
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "  \"", 3)) continue; /* top-level keys only */
        char *end = strchr(line + 3, '"');
        assert_non_null(end);
        *end = '\0';
        if (strcmp(prev, line + 3) >= 0) fail_msg("key %s after %s: not sorted", line + 3, prev);
        snprintf(prev, sizeof prev, "%s", line + 3);
    }
    fclose(f);
}

/* ---- safetensors assertions ------------------------------------------------------- */

/* The file holds exactly the names of `want` (in any order), each F32 with
 * the shape given, and their values equal params' tensor of that name. */
typedef struct want_tensor {
    const char *name;
    int64_t rows, cols;
} want_tensor;

static void assert_adapter_file(const char *path, const want_tensor *want, int n, const peft *p,
                                const float *values) {
    st_file *f;
    err e;
    if (st_open(&f, path, &e) < 0) fail_msg("%s", e.msg);
    assert_int_equal(st_count(f), n);
    const char *fmt = st_metadata_get(f, "format");
    assert_non_null(fmt);
    assert_string_equal(fmt, "pt");
    for (int i = 0; i < n; i++) {
        const st_tensor *t = st_find(f, want[i].name);
        if (!t) fail_msg("%s has no tensor %s", path, want[i].name);
        assert_int_equal(t->dtype, ST_F32);
        assert_int_equal(t->ndim, 2);
        assert_int_equal(t->shape[0], want[i].rows);
        assert_int_equal(t->shape[1], want[i].cols);
        if (p) {
            int k = peft_find_tensor(p, want[i].name);
            assert_true(k >= 0);
            if (memcmp(t->data, values + p->tensors[k].offset, t->nbytes))
                fail_msg("%s: %s differs from the trained tensor", path, want[i].name);
        }
    }
    st_close(f);
}

/* ---- LoRA ------------------------------------------------------------------------- */

static const char lora_block[] = "lora { r: 4 alpha: 8 dropout: 0.05 "
                                 "target_modules: [Q_PROJ, V_PROJ, GATE_PROJ] layers: [1] }";

static void test_lora_peft_round_trip(void **state) {
    (void)state;
    char src[512], out[512];
    tmp_dir(out, sizeof out, "lora_peft");
    size_t n;
    float *trained;
    export_source *s = source_of(src, sizeof src, "lora", TINY, lora_block, 3, &trained, &n);
    assert_int_equal(s->kind, EXPORT_TRAIN_DIR);
    assert_params(s->p, trained, n);
    err e;
    if (export_peft(s, out, &e) < 0) fail_msg("%s", e.msg);

    /* PEFT's state-dict keys for layer 1 of a Llama: A is (r, in), B (out, r). */
    static const want_tensor keys[] = {
        {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", 4, 64},
        {"base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", 64, 4},
        {"base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight", 4, 64},
        {"base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight", 32, 4},
        {"base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight", 4, 64},
        {"base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight", 128, 4},
    };
    char path[600];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", out);
    assert_adapter_file(path, keys, 6, s->p, trained);

    json_t *c = load_json(out, "adapter_config.json");
    assert_json_str(c, "peft_type", "LORA");
    assert_json_str(c, "task_type", "CAUSAL_LM");
    assert_json_int(c, "r", 4);
    assert_json_int(c, "lora_alpha", 8);
    assert_true(json_is_real(json_object_get(c, "lora_dropout")));
    assert_true(json_real_value(json_object_get(c, "lora_dropout")) == 0.05);
    static const char *const modules[] = {"q_proj", "v_proj", "gate_proj"};
    assert_json_strings(c, "target_modules", modules, 3);
    const json_t *layers = json_object_get(c, "layers_to_transform");
    assert_true(json_is_array(layers) && json_array_size(layers) == 1);
    assert_int_equal(json_integer_value(json_array_get(layers, 0)), 1);
    assert_json_bool(c, "use_rslora", 0);
    assert_json_str(c, "bias", "none");
    assert_json_bool(c, "fan_in_fan_out", 0);
    assert_json_str(c, "base_model_name_or_path", tiny_abs());
    assert_json_bool(c, "inference_mode", 1);
    assert_json_bool(c, "init_lora_weights", 1);
    assert_json_bool(c, "use_dora", 0);
    assert_json_bool(c, "lora_bias", 0);
    assert_json_null(c, "modules_to_save");
    assert_json_null(c, "layers_pattern");
    assert_json_null(c, "layer_replication");
    assert_json_null(c, "revision");
    assert_json_null(c, "auto_mapping");
    assert_json_null(c, "megatron_config");
    assert_json_str(c, "megatron_core", "megatron.core");
    assert_json_empty_object(c, "rank_pattern");
    assert_json_empty_object(c, "alpha_pattern");
    assert_json_empty_object(c, "loftq_config");
    json_decref(c);
    assert_peft_text(out);

    /* Read back: the same method block, and the same tensors. */
    Peftps__Method *m = NULL;
    if (export_read_adapter_config(out, model_files_config(s->files), &m, NULL, &e) < 0)
        fail_msg("%s", e.msg);
    assert_int_equal(m->kind_case, PEFTPS__METHOD__KIND_LORA);
    assert_int_equal(m->lora->r, 4);
    assert_true(m->lora->alpha == 8.0f);
    assert_int_equal(m->lora->n_target_modules, 3);
    assert_int_equal(m->lora->target_modules[2], PEFTPS__MODULE__GATE_PROJ);
    assert_int_equal(m->lora->n_layers, 1);
    assert_int_equal(m->lora->layers[0], 1);
    protobuf_c_message_free_unpacked(&m->base, NULL);
    export_close(s);

    s = open_source(out, NULL, TINY);
    assert_int_equal(s->kind, EXPORT_PEFT_DIR);
    assert_params(s->p, trained, n);
    export_close(s);

    assert_init_from(TINY, lora_block, out, trained, n);
    free(trained);
}

/* All layers: layers_to_transform is null; rsLoRA and a fractional alpha. */
static void test_lora_config_all_layers(void **state) {
    (void)state;
    char src[512], out[512];
    tmp_dir(out, sizeof out, "lora_all_peft");
    const char *block = "lora { r: 2 alpha: 2.5 use_rslora: true }";
    size_t n;
    float *trained;
    export_source *s = source_of(src, sizeof src, "lora_all", TINY, block, 0, &trained, &n);
    err e;
    if (export_peft(s, out, &e) < 0) fail_msg("%s", e.msg);
    json_t *c = load_json(out, "adapter_config.json");
    assert_json_null(c, "layers_to_transform");
    assert_json_bool(c, "use_rslora", 1);
    assert_true(json_is_real(json_object_get(c, "lora_alpha")));
    assert_true(json_real_value(json_object_get(c, "lora_alpha")) == 2.5);
    static const char *const modules[] = {"q_proj", "v_proj"};
    assert_json_strings(c, "target_modules", modules, 2);
    json_decref(c);
    export_close(s);
    assert_init_from(TINY, block, out, trained, n);
    free(trained);
}

/* ---- prefix tuning ------------------------------------------------------------------ */

static void test_prefix_peft_round_trip(void **state) {
    (void)state;
    char src[512], out[512];
    tmp_dir(out, sizeof out, "prefix_peft");
    const char *block = "prefix { num_virtual_tokens: 3 }";
    size_t n;
    float *trained;
    export_source *s = source_of(src, sizeof src, "prefix", TINY, block, 3, &trained, &n);
    err e;
    if (export_peft(s, out, &e) < 0) fail_msg("%s", e.msg);

    /* (P, L*2*token_dim) with token_dim = 2 kv heads x 16. */
    static const want_tensor keys[] = {{"prompt_embeddings", 3, 2 * 2 * 32}};
    char path[600];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", out);
    assert_adapter_file(path, keys, 1, s->p, trained);

    json_t *c = load_json(out, "adapter_config.json");
    assert_json_str(c, "peft_type", "PREFIX_TUNING");
    assert_json_str(c, "task_type", "CAUSAL_LM");
    assert_json_int(c, "num_virtual_tokens", 3);
    assert_json_int(c, "token_dim", 32);
    assert_json_int(c, "num_layers", 2);
    assert_json_int(c, "num_attention_heads", 2);
    assert_json_int(c, "num_transformer_submodules", 1);
    assert_json_int(c, "encoder_hidden_size", 32);
    assert_json_bool(c, "prefix_projection", 0);
    assert_json_bool(c, "inference_mode", 1);
    assert_json_str(c, "base_model_name_or_path", tiny_abs());
    assert_json_null(c, "revision");
    assert_json_null(c, "auto_mapping");
    assert_json_null(c, "modules_to_save");
    json_decref(c);
    assert_peft_text(out);
    export_close(s);

    s = open_source(out, NULL, TINY);
    assert_params(s->p, trained, n);
    export_close(s);
    assert_init_from(TINY, block, out, trained, n);
    free(trained);
}

/* Logits (B,T,V) of tokens through a model over cfg/w with p (may be NULL). */
static float *logits_of(const model_config *cfg, const model_weights *w, peft *p,
                        const int32_t *tokens, int B, int T) {
    model *m = NULL;
    err e;
    if (model_create(&m, cfg, w, p, B, T, &e) < 0) fail_msg("%s", e.msg);
    if (p) peft_set_step(p, 0, 0, 0, 0);
    double r = model_forward(m, tokens, NULL, B, T, NULL);
    assert_false(isnan(r));
    size_t nl = (size_t)B * T * cfg->vocab_size;
    float *out = malloc(nl * sizeof *out);
    assert_non_null(out);
    memcpy(out, model_logits(m), nl * sizeof *out);
    model_free(m);
    return out;
}

static void random_tokens(int32_t *tokens, int n, int V, uint64_t seed) {
    rng r;
    rng_seed(&r, seed, 0, 0, 0);
    for (int i = 0; i < n; i++) tokens[i] = (int32_t)(rng_u64(&r) % (uint64_t)V);
}

/* Worst |a - b| relative to max|b|, printed. */
static double rel_worst(const char *label, const float *a, const float *b, size_t n) {
    double worst = 0, scale = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= worst)) worst = d;
        scale = fmax(scale, fabs((double)b[i]));
    }
    double rel = worst / fmax(scale, 1e-30);
    printf("  %-52s max|ref| %.3e  worst |diff| %.3e (%.2e rel)\n", label, scale, worst, rel);
    return rel;
}

/* With a projection the exported table is the MLP's output: reloaded as a
 * plain prefix it gives the same logits; init_from cannot rebuild an MLP
 * from its output and says which tensor is missing. */
static void test_prefix_projection_exports_table(void **state) {
    (void)state;
    char src[512], out[512];
    tmp_dir(out, sizeof out, "prefix_proj_peft");
    const char *block = "prefix { num_virtual_tokens: 2 projection_hidden: 8 }";
    export_source *s = source_of(src, sizeof src, "prefix_proj", TINY, block, 2, NULL, NULL);
    err e;
    if (export_peft(s, out, &e) < 0) fail_msg("%s", e.msg);
    json_t *c = load_json(out, "adapter_config.json");
    assert_json_int(c, "encoder_hidden_size", 8);
    assert_json_bool(c, "prefix_projection", 0);
    json_decref(c);

    export_source *back = open_source(out, NULL, TINY);
    assert_int_equal(back->p->n_tensors, 1);
    for (int l = 0; l < 2; l++) {
        const float *k1, *v1, *k2, *v2;
        size_t s1, s2;
        assert_int_equal(s->p->method->prefix(s->p, l, &k1, &v1, &s1), 2);
        assert_int_equal(back->p->method->prefix(back->p, l, &k2, &v2, &s2), 2);
        for (int j = 0; j < 2; j++) {
            assert_memory_equal(k1 + j * s1, k2 + j * s2, 32 * sizeof(float));
            assert_memory_equal(v1 + j * s1, v2 + j * s2, 32 * sizeof(float));
        }
    }
    const model_config *cfg = model_files_config(s->files);
    int32_t tokens[2 * 8];
    random_tokens(tokens, 16, cfg->vocab_size, 7);
    float *a = logits_of(cfg, model_files_weights(s->files), s->p, tokens, 2, 8);
    float *b = logits_of(cfg, model_files_weights(back->files), back->p, tokens, 2, 8);
    assert_memory_equal(a, b, 16 * (size_t)cfg->vocab_size * sizeof(float));
    free(a);
    free(b);
    export_close(back);
    export_close(s);

    char extra[600];
    snprintf(extra, sizeof extra, "init_from: \"%s\"\n", out);
    Peftps__Experiment *ex2 = load_exp(TINY, block, extra);
    trainer *t = NULL;
    assert_int_equal(trainer_open(&t, ex2, 0, &e), -1);
    assert_non_null(strstr(e.msg, "prompt_encoder.embedding.weight"));
    config_free(ex2);
}

/* ---- merged models ------------------------------------------------------------------ */

/* Exports `block` trained (or perturbed) on `model` as a merged model and
 * compares logits; returns the source for further checks (close it). */
static export_source *check_merged(const char *name, const char *model_dir, const char *block,
                                   int steps, size_t shard_bytes, char *out, size_t out_n) {
    char src[512], oname[128];
    snprintf(oname, sizeof oname, "%s_merged", name);
    tmp_dir(out, out_n, oname);
    export_source *s = source_of(src, sizeof src, name, model_dir, block, steps, NULL, NULL);
    err e;
    if (export_merged(s, out, shard_bytes, EXPORT_DTYPE_BASE, &e) < 0)
        fail_msg("%s: %s", name, e.msg);

    model_files *mf = NULL;
    if (model_files_open(&mf, out, &e) < 0) fail_msg("%s: merged model: %s", name, e.msg);
    const model_config *cfg = model_files_config(s->files);
    int B = 2, T = 12, V = cfg->vocab_size;
    int32_t tokens[2 * 12];
    random_tokens(tokens, B * T, V, 3);
    float *with = logits_of(cfg, model_files_weights(s->files), s->p, tokens, B, T);
    float *merged = logits_of(model_files_config(mf), model_files_weights(mf), NULL, tokens, B, T);
    float *base = logits_of(cfg, model_files_weights(s->files), NULL, tokens, B, T);
    char label[160];
    snprintf(label, sizeof label, "%s: merged vs base + method", name);
    double d = rel_worst(label, merged, with, (size_t)B * T * V);
    snprintf(label, sizeof label, "%s: base vs base + method", name);
    double effect = rel_worst(label, base, with, (size_t)B * T * V);
    assert_true(d <= MERGE_TOL);
    assert_true(effect >= EFFECT_MIN);
    free(with);
    free(merged);
    free(base);
    model_files_close(mf);
    return s;
}

static void test_merged_lora(void **state) {
    (void)state;
    char out[512], path[600];
    export_source *s = check_merged("lora", TINY, lora_block, 3, 0, out, sizeof out);
    export_close(s);
    /* One file, the base's tokenizer beside it, F32 in config.json. */
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    assert_true(access(path, R_OK) == 0);
    snprintf(path, sizeof path, "%s/tokenizer.json", out);
    assert_true(access(path, R_OK) == 0);
    json_t *c = load_json(out, "config.json");
    assert_json_str(c, "torch_dtype", "float32");
    assert_json_bool(c, "tie_word_embeddings", 0);
    assert_json_int(c, "vocab_size", 256);
    assert_json_str(c, "model_type", "llama");
    json_decref(c);
}

static void test_merged_layer_wise(void **state) {
    (void)state;
    char out[512];
    export_close(check_merged("layer_wise", TINY, "layer_wise { first_layer: 0 last_layer: 1 }", 0,
                              0, out, sizeof out));
}

static void test_merged_attention_heads(void **state) {
    (void)state;
    char out[512];
    /* top_k: the heads are chosen by calibration, which export repeats. */
    export_close(check_merged("heads", TINY, "attention_heads { top_k: 3 calibration_batches: 2 }",
                              0, 0, out, sizeof out));
    export_close(check_merged("heads_listed", TINY, "attention_heads { heads: [1, 3] }", 2, 0, out,
                              sizeof out));
}

static void test_merged_subnetwork(void **state) {
    (void)state;
    char out[512];
    export_close(check_merged("subnet_gradient", TINY,
                              "subnetwork { sparsity: 0.9 selection: GRADIENT "
                              "calibration_batches: 2 }",
                              0, 0, out, sizeof out));
    export_close(check_merged("subnet_random", TINY,
                              "subnetwork { sparsity: 0.95 selection: RANDOM }", 2, 0, out,
                              sizeof out));
}

/* Full fine-tuning, in shards of at most 64 kB: the index loads. */
static void test_merged_full_sharded(void **state) {
    (void)state;
    char out[512], path[600];
    export_close(check_merged("full", TINY, "full {}", 0, 64 * 1024, out, sizeof out));
    json_t *idx = load_json(out, "model.safetensors.index.json");
    const json_t *map = json_object_get(idx, "weight_map");
    assert_true(json_is_object(map));
    /* every weight of the 2-layer model: embed, 9 per layer, norm, lm_head */
    assert_int_equal(json_object_size(map), 1 + 2 * 9 + 1 + 1);
    const char *first = json_string_value(json_object_get(map, "model.embed_tokens.weight"));
    assert_non_null(first);
    assert_non_null(strstr(first, "-of-"));
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(idx, "metadata"), "total_size")),
        (long long)(256 * 64 * 2 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64) + 64) *
            4);
    json_decref(idx);
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    assert_true(access(path, F_OK) != 0);
}

/* F32 to BF16, rounded to nearest even, written here apart from
 * safetensors.c (finite values only, as the weights are). */
static uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static void copy_file(const char *from, const char *to) {
    FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
    assert_non_null(a);
    assert_non_null(b);
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, a)) > 0) assert_int_equal(fwrite(buf, 1, n, b), n);
    fclose(a);
    fclose(b);
}

/* TINY with every weight rounded to BF16 and stored as BF16, in dir. */
static void make_bf16_base(char *dir, size_t n) {
    tmp_dir(dir, n, "bf16_base");
    assert_int_equal(mkdir(dir, 0755), 0);
    char path[600];
    static const char *const texts[] = {"config.json", "tokenizer.json"};
    for (int i = 0; i < 2; i++) {
        char from[200];
        snprintf(from, sizeof from, TINY "/%s", texts[i]);
        snprintf(path, sizeof path, "%s/%s", dir, texts[i]);
        copy_file(from, path);
    }
    err e;
    st_file *f;
    if (st_open(&f, TINY "/model.safetensors", &e) < 0) fail_msg("%s", e.msg);
    int count = st_count(f);
    st_entry *en = calloc((size_t)count, sizeof *en);
    uint16_t **bufs = calloc((size_t)count, sizeof *bufs);
    assert_non_null(en);
    assert_non_null(bufs);
    for (int i = 0; i < count; i++) {
        const st_tensor *t = st_tensor_at(f, i);
        float *v = malloc(t->numel * sizeof *v);
        bufs[i] = malloc(t->numel * sizeof **bufs);
        assert_non_null(v);
        assert_non_null(bufs[i]);
        if (st_convert_f32(f, t, v, &e) < 0) fail_msg("%s", e.msg);
        for (size_t j = 0; j < t->numel; j++) bufs[i][j] = bf16_rne(v[j]);
        free(v);
        en[i] = (st_entry){.name = t->name, .dtype = ST_BF16, .ndim = t->ndim, .data = bufs[i]};
        for (int d = 0; d < t->ndim; d++) en[i].shape[d] = t->shape[d];
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (st_write(path, en, count, NULL, &e) < 0) fail_msg("%s", e.msg);
    for (int i = 0; i < count; i++) free(bufs[i]);
    free(bufs);
    free(en);
    st_close(f);
}

/* A BF16 base gives a BF16 merged model by default (config.json says
 * bfloat16, every tensor BF16), whose values are the F32 merge's rounded
 * to nearest even; --dtype f32 still gives F32; both load. */
static void test_merged_bf16(void **state) {
    (void)state;
    char base[512], src[512], out16[512], out32[512], path[600];
    make_bf16_base(base, sizeof base);
    export_source *s = source_of(src, sizeof src, "bf16", base, lora_block, 3, NULL, NULL);
    assert_int_equal(model_files_dtype(s->files), ST_BF16);
    tmp_dir(out16, sizeof out16, "bf16_merged");
    tmp_dir(out32, sizeof out32, "bf16_merged_f32");
    err e;
    if (export_merged(s, out16, 0, EXPORT_DTYPE_BASE, &e) < 0) fail_msg("%s", e.msg);
    if (export_merged(s, out32, 0, ST_F32, &e) < 0) fail_msg("%s", e.msg);
    assert_int_equal(export_merged(s, out32, 0, ST_F16, &e), -1);
    assert_non_null(strstr(e.msg, "BF16 or F32"));
    export_close(s);

    json_t *c = load_json(out16, "config.json");
    assert_json_str(c, "torch_dtype", "bfloat16");
    json_decref(c);
    c = load_json(out32, "config.json");
    assert_json_str(c, "torch_dtype", "float32");
    json_decref(c);
    st_file *f16, *f32;
    snprintf(path, sizeof path, "%s/model.safetensors", out16);
    if (st_open(&f16, path, &e) < 0) fail_msg("%s", e.msg);
    snprintf(path, sizeof path, "%s/model.safetensors", out32);
    if (st_open(&f32, path, &e) < 0) fail_msg("%s", e.msg);
    assert_int_equal(st_count(f16), st_count(f32));
    size_t values = 0, changed = 0;
    for (int i = 0; i < st_count(f32); i++) {
        const st_tensor *t = st_tensor_at(f32, i), *h = st_find(f16, t->name);
        assert_non_null(h);
        assert_int_equal(t->dtype, ST_F32);
        assert_int_equal(h->dtype, ST_BF16);
        assert_int_equal(h->numel, t->numel);
        const uint8_t *a = t->data, *b = h->data;
        for (size_t j = 0; j < t->numel; j++) {
            float v;
            uint16_t got;
            memcpy(&v, a + 4 * j, sizeof v);
            memcpy(&got, b + 2 * j, sizeof got);
            if (got != bf16_rne(v))
                fail_msg("%s[%zu]: BF16 0x%04x, F32 %.9g rounds to 0x%04x", t->name, j, got,
                         (double)v, bf16_rne(v));
            /* a merged LoRA weight is rarely a BF16 value itself */
            changed += (float)st_bf16_to_f32(got) != v;
        }
        values += t->numel;
    }
    printf("bf16 merged: %zu values equal the F32 merge rounded to nearest even (%zu of them "
           "needed rounding)\n",
           values, changed);
    assert_true(changed > 0);
    st_close(f16);
    st_close(f32);
    model_files *mf;
    if (model_files_open(&mf, out16, &e) < 0) fail_msg("%s", e.msg);
    assert_int_equal(model_files_dtype(mf), ST_BF16);
    model_files_close(mf);
}

/* A tied model: LoRA keeps it tied (no lm_head written); full training
 * changes the embedding, so lm_head is written and the tie undone. */
static void test_merged_tied(void **state) {
    (void)state;
    char out[512], path[600];
    err e;
    export_close(check_merged("tied_lora", TIED, "lora { r: 2 }", 0, 0, out, sizeof out));
    json_t *c = load_json(out, "config.json");
    assert_json_bool(c, "tie_word_embeddings", 1);
    json_decref(c);
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    st_file *f;
    if (st_open(&f, path, &e) < 0) fail_msg("%s", e.msg);
    assert_null(st_find(f, "lm_head.weight"));
    st_close(f);

    export_close(check_merged("tied_full", TIED, "full {}", 0, 0, out, sizeof out));
    c = load_json(out, "config.json");
    assert_json_bool(c, "tie_word_embeddings", 0);
    json_decref(c);
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    if (st_open(&f, path, &e) < 0) fail_msg("%s", e.msg);
    assert_non_null(st_find(f, "lm_head.weight"));
    st_close(f);
}

/* Biases (Qwen2's attention_bias) merge too. */
static void test_merged_biases(void **state) {
    (void)state;
    char out[512];
    export_close(
        check_merged("qwen2_layer_wise", QWEN2,
                     "layer_wise { first_layer: 1 last_layer: 1 modules: [Q_PROJ, K_PROJ] }", 0, 0,
                     out, sizeof out));
    /* Llama's o_proj bias (attention_bias) and MLP biases (mlp_bias), whose
     * deltas layer_wise trains with their projections. */
    export_source *s = check_merged(
        "llama_bias_layer_wise", LLAMA_BIAS,
        "layer_wise { first_layer: 1 last_layer: 1 modules: [O_PROJ, GATE_PROJ, DOWN_PROJ] }", 0, 0,
        out, sizeof out);
    assert_true(peft_find_tensor(s->p, "model.layers.1.self_attn.o_proj.bias.delta") >= 0);
    assert_true(peft_find_tensor(s->p, "model.layers.1.mlp.gate_proj.bias.delta") >= 0);
    assert_true(peft_find_tensor(s->p, "model.layers.1.mlp.down_proj.bias.delta") >= 0);
    assert_true(peft_find_tensor(s->p, "model.layers.1.mlp.up_proj.bias.delta") < 0);
    export_close(s);
    export_close(check_merged("llama_bias_full", LLAMA_BIAS, "full {}", 0, 0, out, sizeof out));
}

/* ---- refusals ----------------------------------------------------------------------- */

static void test_refusals(void **state) {
    (void)state;
    char src[512], out[512];
    err e;
    tmp_dir(out, sizeof out, "refuse_out");
    export_source *s = source_of(src, sizeof src, "refuse_prefix", TINY,
                                 "prefix { num_virtual_tokens: 2 }", 0, NULL, NULL);
    assert_int_equal(export_merged(s, out, 0, EXPORT_DTYPE_BASE, &e), -1);
    assert_non_null(strstr(e.msg, "--format peft"));
    export_close(s);

    s = source_of(src, sizeof src, "refuse_lw", TINY, "layer_wise { first_layer: 1 }", 0, NULL,
                  NULL);
    assert_int_equal(export_peft(s, out, &e), -1);
    assert_non_null(strstr(e.msg, "no Hugging Face PEFT format"));
    assert_non_null(strstr(e.msg, "--format merged"));
    export_close(s);

    /* Not a source at all; a file without an experiment; the merged model
     * over its own base. */
    export_opts o;
    export_opts_default(&o);
    assert_int_equal(export_open(&s, tmp_root, &o, &e), -1);
    assert_non_null(strstr(e.msg, "tensors.safetensors"));
    char file[600];
    snprintf(file, sizeof file, "%s/tensors.safetensors", src);
    assert_int_equal(export_open(&s, file, &o, &e), -1);
    assert_non_null(strstr(e.msg, "experiment"));
    s = open_source(src, NULL, NULL);
    assert_int_equal(export_merged(s, TINY, 0, EXPORT_DTYPE_BASE, &e), -1);
    assert_non_null(strstr(e.msg, "base model's own directory"));
    export_close(s);
}

/* adapter_config.json settings peftps does not implement are named. */
static void test_adapter_config_errors(void **state) {
    (void)state;
    static const struct {
        const char *json, *expect;
    } cases[] = {
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": "
         "[\"q_proj\"], \"use_dora\": true}",
         "use_dora"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": "
         "\".*(q|v)_proj\"}",
         "regular expression"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": "
         "[\"c_attn\"]}",
         "target_modules[0]"},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": "
         "[\"q_proj\"], \"bias\": \"all\"}",
         "\"bias\""},
        {"{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": "
         "[\"q_proj\"], \"layers_to_transform\": [2]}",
         "layers_to_transform"},
        {"{\"peft_type\": \"IA3\"}", "IA3"},
        {"{\"peft_type\": \"LORA\", \"task_type\": \"TOKEN_CLS\", \"r\": 4}", "task_type"},
        {"{\"peft_type\": \"LORA\", \"task_type\": \"SEQ_CLS\", \"r\": 4, \"lora_alpha\": 8, "
         "\"modules_to_save\": [\"score\", \"lm_head\"]}",
         "\"modules_to_save\" lists \"lm_head\""},
        {"{\"peft_type\": \"PREFIX_TUNING\", \"num_virtual_tokens\": 4, \"token_dim\": 64, "
         "\"num_layers\": 2}",
         "token_dim"},
        {"{\"peft_type\": \"PREFIX_TUNING\", \"num_virtual_tokens\": 4, \"num_layers\": 3}",
         "num_layers"},
        {"{\"peft_type\": ", "adapter_config.json:1:"},
    };
    char dir[512], path[600];
    tmp_dir(dir, sizeof dir, "bad_adapter");
    assert_int_equal(mkdir(dir, 0777), 0);
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    model_files *mf = NULL;
    err e;
    if (model_files_open(&mf, TINY, &e) < 0) fail_msg("%s", e.msg);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_text(path, cases[i].json);
        Peftps__Method *m = NULL;
        e.msg[0] = '\0';
        assert_int_equal(export_read_adapter_config(dir, model_files_config(mf), &m, NULL, &e), -1);
        assert_null(m);
        if (!strstr(e.msg, cases[i].expect))
            fail_msg("case %zu: \"%s\" does not mention %s", i, e.msg, cases[i].expect);
    }
    model_files_close(mf);
}

/* ---- checkpoints and raw tensors ------------------------------------------------- */

/* Writes the params of p as checkpoint `step` into dir, the tensors split
 * between `servers` environments (dir/server-i) when servers > 1. */
static void write_ckpt(const char *dir, const Peftps__Experiment *ex, const peft *p,
                       const char *base_fp, uint64_t step, int servers) {
    err e;
    char fp[65];
    config_fingerprint(ex, fp);
    for (int s = 0; s < servers; s++) {
        char path[600];
        if (servers > 1)
            snprintf(path, sizeof path, "%s/server-%d", dir, s);
        else
            snprintf(path, sizeof path, "%s", dir);
        /* this server's tensors, packed */
        peft_tensor *ts = calloc((size_t)p->n_tensors, sizeof *ts);
        float *vals = malloc(p->n_params * sizeof *vals);
        assert_true(ts && vals);
        int n = 0;
        size_t off = 0;
        for (int i = 0; i < p->n_tensors; i++) {
            if (i % servers != s) continue;
            ts[n] = p->tensors[i];
            ts[n].offset = off;
            memcpy(vals + off, p->params + p->tensors[i].offset, ts[n].numel * sizeof(float));
            off += ts[n].numel;
            n++;
        }
        float *zeros = calloc(off ? off : 1, sizeof *zeros);
        ckpt_data d;
        memset(&d, 0, sizeof d);
        d.step = step;
        memcpy(d.experiment_fp, fp, sizeof fp);
        snprintf(d.base_fp, sizeof d.base_fp, "%s", base_fp);
        d.n_params = off;
        d.params = vals;
        d.m = d.v = zeros;
        d.tensors = ts;
        d.n_tensors = n;
        ckpt *c = NULL;
        if (ckpt_open(&c, path, 1, NULL, &e) < 0 || ckpt_write(c, &d, &e) < 0)
            fail_msg("%s: %s", path, e.msg);
        ckpt_close(c);
        free(ts);
        free(vals);
        free(zeros);
    }
}

static void assert_tensor_file(const char *path, const peft *p, const float *values) {
    st_file *f;
    err e;
    if (st_open(&f, path, &e) < 0) fail_msg("%s", e.msg);
    assert_int_equal(st_count(f), p->n_tensors);
    for (int i = 0; i < p->n_tensors; i++) {
        const st_tensor *t = st_find(f, p->tensors[i].name);
        if (!t) fail_msg("%s has no %s", path, p->tensors[i].name);
        assert_int_equal(t->dtype, ST_F32);
        assert_int_equal(t->ndim, p->tensors[i].ndim);
        for (int d = 0; d < t->ndim; d++) assert_int_equal(t->shape[d], p->tensors[i].shape[d]);
        assert_memory_equal(t->data, values + p->tensors[i].offset, t->nbytes);
    }
    st_close(f);
}

static void test_checkpoints(void **state) {
    (void)state;
    char src[512], ck[512], ck2[512], file[600], exp_path[600];
    err e;
    tmp_dir(src, sizeof src, "ckpt_src");
    tmp_dir(ck, sizeof ck, "ckpt_one");
    tmp_dir(ck2, sizeof ck2, "ckpt_two");
    Peftps__Experiment *ex = load_exp(TINY, lora_block, NULL);
    size_t n;
    float *trained = make_source(src, ex, 2, &n);
    snprintf(exp_path, sizeof exp_path, "%s/experiment.pbtxt", src);
    export_source *s = open_source(src, NULL, NULL);
    const char *bfp = model_files_fingerprint(s->files);
    /* step 1 holds other values; step 2 the trained ones */
    float *save = malloc(n * sizeof *save);
    memcpy(save, s->p->params, n * sizeof *save);
    for (size_t i = 0; i < n; i++) s->p->params[i] = 0.5f;
    write_ckpt(ck, ex, s->p, bfp, 1, 1);
    write_ckpt(ck2, ex, s->p, bfp, 1, 2);
    memcpy(s->p->params, save, n * sizeof *save);
    write_ckpt(ck, ex, s->p, bfp, 2, 1);
    write_ckpt(ck2, ex, s->p, bfp, 2, 2);
    free(save);

    export_opts o;
    export_opts_default(&o);
    const char *dirs[2] = {ck, ck2};
    for (int k = 0; k < 2; k++) {
        /* raw tensors: no experiment needed; the newest step by default */
        snprintf(file, sizeof file, "%s/raw%d.safetensors", tmp_root, k);
        if (export_tensors(dirs[k], &o, file, &e) < 0) fail_msg("%s", e.msg);
        assert_tensor_file(file, s->p, trained);

        export_source *c = open_source(dirs[k], exp_path, NULL);
        assert_int_equal(c->kind, EXPORT_CHECKPOINT);
        assert_int_equal(c->step, 2);
        assert_params(c->p, trained, n);
        export_close(c);

        /* an older step on request */
        export_opts old = o;
        old.step = 1;
        old.experiment = exp_path;
        if (export_open(&c, dirs[k], &old, &e) < 0) fail_msg("%s", e.msg);
        assert_true(c->p->params[c->p->tensors[0].offset] == 0.5f);
        export_close(c);

        /* without the experiment, or with another one */
        assert_int_equal(export_open(&c, dirs[k], &o, &e), -1);
        assert_non_null(strstr(e.msg, "experiment"));
        export_opts other = o;
        other.experiment = exp_path;
        char *sets[] = {"seed=6"};
        other.sets = sets;
        other.nsets = 1;
        assert_int_equal(export_open(&c, dirs[k], &other, &e), -1);
        assert_non_null(strstr(e.msg, "another experiment"));
    }
    /* a train directory's tensors, as one file */
    snprintf(file, sizeof file, "%s/raw_train.safetensors", tmp_root);
    if (export_tensors(src, &o, file, &e) < 0) fail_msg("%s", e.msg);
    assert_tensor_file(file, s->p, trained);
    /* and that file with its experiment is a source of its own */
    export_source *f = open_source(file, exp_path, NULL);
    assert_int_equal(f->kind, EXPORT_FILE);
    assert_params(f->p, trained, n);
    export_close(f);
    export_close(s);
    config_free(ex);
    free(trained);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lora_peft_round_trip),
        cmocka_unit_test(test_lora_config_all_layers),
        cmocka_unit_test(test_prefix_peft_round_trip),
        cmocka_unit_test(test_prefix_projection_exports_table),
        cmocka_unit_test(test_merged_lora),
        cmocka_unit_test(test_merged_layer_wise),
        cmocka_unit_test(test_merged_attention_heads),
        cmocka_unit_test(test_merged_subnetwork),
        cmocka_unit_test(test_merged_full_sharded),
        cmocka_unit_test(test_merged_bf16),
        cmocka_unit_test(test_merged_tied),
        cmocka_unit_test(test_merged_biases),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_adapter_config_errors),
        cmocka_unit_test(test_checkpoints),
    };
    return cmocka_run_group_tests(tests, setup_root, remove_root);
}
