/* Tests of loading an experiment (common/train/experiment.c over
 * common/config/config.c and each method's defaults and checks in
 * common/methods/): every default written into the experiment, each
 * check of meaning with the exact location of its error (file:line:col, the
 * file, or the --set that caused it), overrides in order, the fingerprint
 * and the --set argument helper. Model directories and data files are
 * written into a temporary directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config/config.h"
#include "train/experiment.h"
#include "base/hash.h"

static char tmp[64];

static const char *model_json =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64, \"intermediate_size\": 128,"
    " \"max_position_embeddings\": 256, \"model_type\": \"llama\", \"num_attention_heads\": 4,"
    " \"num_hidden_layers\": 2, \"num_key_value_heads\": 2, \"rms_norm_eps\": 1e-05,"
    " \"rope_theta\": 10000.0, \"vocab_size\": 256}\n";

static void write_file(const char *name, const char *text) {
    char p[256];
    snprintf(p, sizeof p, "%s/%s", tmp, name);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int setup(void **state) {
    snprintf(tmp, sizeof tmp, "/tmp/peftps-config-XXXXXX");
    if (!mkdtemp(tmp)) return -1;
    char p[256];
    snprintf(p, sizeof p, "%s/model", tmp);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/badmodel", tmp);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/empty", tmp);
    mkdir(p, 0755);
    write_file("model/config.json", model_json);
    write_file("badmodel/config.json", "{\"num_hidden_layers\": ");
    static const char *const data[] = {"train.tokens",       "eval.tokens", "train.txt",
                                       "train.jsonl",        "train.bin",   "server.key",
                                       "adapter.safetensors"};
    for (size_t i = 0; i < sizeof data / sizeof data[0]; i++) write_file(data[i], "0123");
    return 0;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    return remove(p);
}

static int teardown(void **state) {
    return nftw(tmp, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* Writes an experiment file; every '@' in body becomes the temporary
 * directory. Returns its path (static). */
static const char *write_exp(const char *name, const char *body) {
    static char path[256];
    char text[8192];
    size_t n = 0;
    for (const char *c = body; *c && n < sizeof text - 80; c++) {
        if (*c == '@')
            n += (size_t)snprintf(text + n, sizeof text - n, "%s", tmp);
        else
            text[n++] = *c;
    }
    text[n] = 0;
    write_file(name, text);
    snprintf(path, sizeof path, "%s/%s", tmp, name);
    return path;
}

/* Four lines that make a valid experiment, in this order. */
#define L_MODEL "model { path: \"@/model\" }\n"
#define L_LORA "method { lora {} }\n"
#define L_DATA "data { train: \"@/train.tokens\" }\n"
#define L_SCHED "schedule { total_steps: 10 }\n"
#define BASE L_MODEL L_LORA L_DATA L_SCHED

static Peftps__Experiment *load_ok(const char *path, char **sets, int nsets) {
    Peftps__Experiment *x = NULL;
    err e;
    if (experiment_load(path, sets, nsets, &x, NULL, &e)) fail_msg("%s", e.msg);
    assert_non_null(x);
    return x;
}

/* Loading fails with want, where "F" at its start stands for the path and
 * every '@' for the temporary directory. */
static void load_fails(const char *path, char **sets, int nsets, const char *want) {
    Peftps__Experiment *x = (Peftps__Experiment *)&x;
    pbtext_locs *locs = (pbtext_locs *)&x;
    err e;
    char full[ERR_MAX];
    size_t n = 0;
    if (want[0] == 'F') n = (size_t)snprintf(full, sizeof full, "%s", path), want++;
    for (; *want && n < sizeof full - 80; want++) {
        if (*want == '@')
            n += (size_t)snprintf(full + n, sizeof full - n, "%s", tmp);
        else
            full[n++] = *want;
    }
    full[n] = 0;
    assert_int_equal(experiment_load(path, sets, nsets, &x, &locs, &e), -1);
    assert_null(x);
    assert_null(locs);
    assert_string_equal(e.msg, full);
    assert_null(strchr(e.msg, '\n'));
}

static void test_defaults(void **state) {
    Peftps__Experiment *x = load_ok(write_exp("base.pbtxt", BASE), NULL, 0);
    assert_string_equal(x->name, "base");
    assert_true(x->has_seed && x->seed == 42);
    assert_string_equal(x->output_dir, "out/base");
    assert_null(x->init_from);
    const Peftps__LoRA *l = x->method->lora;
    assert_true(l->has_r && l->r == 8);
    assert_true(l->has_alpha && l->alpha == 16.0f);
    assert_true(l->has_dropout && l->dropout == 0.0f);
    assert_true(l->has_use_rslora && !l->use_rslora);
    assert_int_equal(l->n_target_modules, 2);
    assert_int_equal(l->target_modules[0], PEFTPS__MODULE__Q_PROJ);
    assert_int_equal(l->target_modules[1], PEFTPS__MODULE__V_PROJ);
    assert_int_equal(l->n_layers, 0);
    const Peftps__Optimizer *o = x->optimizer;
    assert_true(o->has_lr && o->lr == 1e-3f);
    assert_true(o->has_beta1 && o->beta1 == 0.9f);
    assert_true(o->has_beta2 && o->beta2 == 0.999f);
    assert_true(o->has_eps && o->eps == 1e-8f);
    assert_true(o->has_weight_decay && o->weight_decay == 0.01f);
    assert_true(o->has_max_grad_norm && o->max_grad_norm == 1.0f);
    const Peftps__Schedule *s = x->schedule;
    assert_true(s->has_warmup_steps && s->warmup_steps == 0);
    assert_int_equal(s->total_steps, 10);
    assert_true(s->has_decay && s->decay == PEFTPS__DECAY__LINEAR);
    assert_true(s->has_min_lr && s->min_lr == 0.0f);
    const Peftps__Data *d = x->data;
    assert_true(d->has_format && d->format == PEFTPS__DATA_FORMAT__TOKENS);
    assert_true(d->has_seq_len && d->seq_len == 128);
    assert_true(d->has_batch_size && d->batch_size == 8);
    assert_true(d->has_shards_per_step && d->shards_per_step == 8);
    assert_true(d->has_eval_every && d->eval_every == 0);
    assert_true(d->has_eval_batches && d->eval_batches == 0); /* the whole eval file */
    assert_null(d->eval);
    const Peftps__Cluster *c = x->cluster;
    assert_int_equal(c->n_servers, 1);
    assert_string_equal(c->servers[0], "tcp://127.0.0.1:5555");
    assert_true(c->has_sync && c->sync == PEFTPS__SYNC_MODE__BSP);
    assert_true(c->has_staleness && c->staleness == 0);
    assert_true(c->has_heartbeat_ms && c->heartbeat_ms == 1000);
    assert_true(c->has_worker_timeout_ms && c->worker_timeout_ms == 10000);
    assert_true(c->has_metrics_port && c->metrics_port == 0);
    assert_null(c->curve);
    assert_string_equal(x->checkpoint->path, "out/base/ckpt");
    assert_true(x->checkpoint->has_every_steps && x->checkpoint->every_steps == 100);
    assert_true(x->checkpoint->has_keep && x->checkpoint->keep == 3);
    assert_true(x->checkpoint->has_resume && x->checkpoint->resume);
    config_free(x);

    /* Given values stay; derived defaults follow them. */
    x = load_ok(write_exp("given.pbtxt",
                          L_MODEL "method { lora { r: 4 target_modules: [O_PROJ] } }\n"
                                  "data { batch_size: 6 format: TEXT train: \"@/train.tokens\" }\n"
                                  "schedule { total_steps: 10 decay: DECAY_UNSPECIFIED }\n"
                                  "name: \"run7\" seed: 0\n"
                                  "checkpoint { resume: false }\n"),
                NULL, 0);
    assert_string_equal(x->name, "run7");
    assert_true(x->has_seed && x->seed == 0);
    assert_string_equal(x->output_dir, "out/run7");
    assert_string_equal(x->checkpoint->path, "out/run7/ckpt");
    assert_false(x->checkpoint->resume);
    assert_int_equal(x->data->shards_per_step, 6);
    assert_int_equal(x->data->format, PEFTPS__DATA_FORMAT__TEXT);
    assert_int_equal(x->schedule->decay, PEFTPS__DECAY__LINEAR);
    assert_int_equal(x->method->lora->r, 4);
    assert_int_equal(x->method->lora->n_target_modules, 1);
    config_free(x);
}

static void test_method_defaults(void **state) {
    Peftps__Experiment *x =
        load_ok(write_exp("p.pbtxt", L_MODEL "method { prefix {} }\n" L_DATA L_SCHED), NULL, 0);
    assert_true(x->method->prefix->has_num_virtual_tokens);
    assert_int_equal(x->method->prefix->num_virtual_tokens, 20);
    assert_true(x->method->prefix->has_projection_hidden);
    assert_int_equal(x->method->prefix->projection_hidden, 0);
    config_free(x);

    x = load_ok(write_exp("h.pbtxt",
                          L_MODEL "method { attention_heads { heads: [0, 3] } }\n" L_DATA L_SCHED),
                NULL, 0);
    const Peftps__AttentionHeads *h = x->method->attention_heads;
    assert_int_equal(h->calibration_batches, 8);
    assert_int_equal(h->n_projections, 4);
    for (int i = 0; i < 4; i++) assert_int_equal(h->projections[i], PEFTPS__MODULE__Q_PROJ + i);
    assert_false(h->has_top_k);
    config_free(x);

    x = load_ok(write_exp("s.pbtxt", L_MODEL "method { subnetwork { selection: "
                                             "MASK_SELECTION_UNSPECIFIED } }\n" L_DATA L_SCHED),
                NULL, 0);
    const Peftps__Subnetwork *s = x->method->subnetwork;
    assert_true(s->has_sparsity && s->sparsity == 0.99f);
    assert_int_equal(s->selection, PEFTPS__MASK_SELECTION__MAGNITUDE);
    assert_int_equal(s->calibration_batches, 8);
    assert_int_equal(s->n_modules, 7);
    for (int i = 0; i < 7; i++) assert_int_equal(s->modules[i], PEFTPS__MODULE__Q_PROJ + i);
    config_free(x);

    x = load_ok(write_exp("w.pbtxt", L_MODEL "method { layer_wise {} }\n" L_DATA L_SCHED), NULL, 0);
    const Peftps__LayerWise *w = x->method->layer_wise;
    assert_int_equal(w->n_modules, 9);
    assert_int_equal(w->modules[8], PEFTPS__MODULE__POST_ATTENTION_LAYERNORM);
    assert_false(w->has_first_layer);
    assert_false(w->has_last_layer);
    config_free(x);

    x = load_ok(write_exp("f.pbtxt", L_MODEL "method { full {} }\n" L_DATA L_SCHED), NULL, 0);
    assert_int_equal(x->method->kind_case, PEFTPS__METHOD__KIND_FULL);
    config_free(x);
}

static void test_format_from_ending(void **state) {
    static const struct {
        const char *file;
        Peftps__DataFormat want;
    } cases[] = {{"train.tokens", PEFTPS__DATA_FORMAT__TOKENS},
                 {"train.txt", PEFTPS__DATA_FORMAT__TEXT},
                 {"train.jsonl", PEFTPS__DATA_FORMAT__JSONL}};
    for (size_t i = 0; i < 3; i++) {
        char set[128];
        snprintf(set, sizeof set, "data.train=%s/%s", tmp, cases[i].file);
        char *sets[] = {set};
        Peftps__Experiment *x = load_ok(write_exp("fmt.pbtxt", BASE), sets, 1);
        assert_int_equal(x->data->format, cases[i].want);
        config_free(x);
    }
    load_fails(
        write_exp("bin.pbtxt", L_MODEL L_LORA "data {\n  train: \"@/train.bin\"\n}\n" L_SCHED),
        NULL, 0,
        "F:4:3: error: cannot tell the format of data.train \"@/train.bin\" from its ending "
        "(.tokens, "
        ".txt or .jsonl); set data.format to TOKENS, TEXT or JSONL");
}

/* One check per case: BASE with one line replaced (or a fifth line added)
 * that breaks one rule. */
static void test_checks(void **state) {
    static const struct {
        int line; /* 2 method, 3 data, 4 schedule, 5 an extra line */
        const char *text, *want;
    } cases[] = {
        {2, "method { lora { r: 0 } }", "F:2:17: error: method.lora.r must be > 0"},
        {2, "method { lora { alpha: -1 } }",
         "F:2:17: error: method.lora.alpha must be > 0, got -1"},
        {2, "method { lora { dropout: 1 } }",
         "F:2:17: error: method.lora.dropout must be in [0, 1), got 1"},
        {2, "method { lora { target_modules: [Q_PROJ, INPUT_LAYERNORM] } }",
         "F:2:42: error: method.lora.target_modules cannot hold INPUT_LAYERNORM; allowed: Q_PROJ, "
         "K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ"},
        {2, "method { lora { target_modules: [Q_PROJ, K_PROJ, Q_PROJ] } }",
         "F:2:50: error: method.lora.target_modules lists Q_PROJ twice"},
        {2, "method { lora { target_modules: MODULE_UNSPECIFIED } }",
         "F:2:33: error: method.lora.target_modules cannot hold MODULE_UNSPECIFIED; allowed: "
         "Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ"},
        {2, "method { lora { layers: [0, 2] } }",
         "F:2:29: error: method.lora.layers: layer 2 does not exist; the model has 2 layers (0 to "
         "1)"},
        {2, "method { lora { layers: [1, 1] } }",
         "F:2:29: error: method.lora.layers lists layer 1 twice"},
        {5, "optimizer { lr: 0 }", "F:5:13: error: optimizer.lr must be > 0, got 0"},
        {5, "optimizer { lr: nan }", "F:5:13: error: optimizer.lr must be > 0, got nan"},
        {5, "optimizer { lr: inf }", "F:5:13: error: optimizer.lr must be finite, got inf"},
        {5, "optimizer { beta1: 1 }", "F:5:13: error: optimizer.beta1 must be in [0, 1), got 1"},
        {5, "optimizer { beta2: -0.5 }",
         "F:5:13: error: optimizer.beta2 must be in [0, 1), got -0.5"},
        {5, "optimizer { eps: 0 }", "F:5:13: error: optimizer.eps must be > 0, got 0"},
        {5, "optimizer { weight_decay: -0.1 }",
         "F:5:13: error: optimizer.weight_decay must be >= 0, got -0.1"},
        {5, "optimizer { max_grad_norm: -1 }",
         "F:5:13: error: optimizer.max_grad_norm must be >= 0 (0 disables clipping), got -1"},
        {4, "schedule { warmup_steps: 11 total_steps: 10 }",
         "F:4:12: error: schedule.warmup_steps (11) must not exceed schedule.total_steps (10)"},
        {4, "schedule { min_lr: 0.5 total_steps: 10 }",
         "F:4:12: error: schedule.min_lr must be in [0, optimizer.lr = 0.001], got 0.5"},
        {3, "data { seq_len: 0 train: \"@/train.tokens\" }",
         "F:3:8: error: data.seq_len must be > 0"},
        {3, "data { seq_len: 257 train: \"@/train.tokens\" }",
         "F:3:8: error: data.seq_len 257 exceeds the model's max_position_embeddings 256"},
        {3, "data { batch_size: 0 train: \"@/train.tokens\" }",
         "F:3:8: error: data.batch_size must be > 0"},
        {3, "data { shards_per_step: 0 train: \"@/train.tokens\" }",
         "F:3:8: error: data.shards_per_step must be > 0"},
        {3, "data { batch_size: 8 shards_per_step: 3 train: \"@/train.tokens\" }",
         "F:3:22: error: data.batch_size (8) must be a multiple of data.shards_per_step (3)"},
        {5, "cluster { staleness: 2 }",
         "F:5:11: error: cluster.staleness applies only with sync: SSP (bounded staleness)"},
        {5, "cluster { heartbeat_ms: 0 }", "F:5:11: error: cluster.heartbeat_ms must be > 0"},
        {5, "cluster { heartbeat_ms: 500 worker_timeout_ms: 500 }",
         "F:5:29: error: cluster.worker_timeout_ms (500) must exceed cluster.heartbeat_ms (500)"},
        {5, "cluster { metrics_port: 70000 }",
         "F:5:11: error: cluster.metrics_port 70000 is not a TCP port"},
        {5, "cluster { servers: [\"tcp://a:1\", \"localhost:5555\"] }",
         "F:5:34: error: cluster.servers entry \"localhost:5555\" is not a ZeroMQ endpoint "
         "(tcp://HOST:PORT, ipc://PATH)"},
        {5, "cluster { servers: [\"tcp://a:1\", \"tcp://a:1\"] }",
         "F:5:34: error: cluster.servers lists \"tcp://a:1\" twice"},
        {5, "checkpoint { keep: 0 }",
         "F:5:14: error: checkpoint.keep must be > 0 (checkpoint.every_steps: 0 turns "
         "checkpoints off)"},
        {5, "task { sequence_classification { labels: [\"a\"] } }",
         "F:5:34: error: task.sequence_classification.labels needs at least 2 class names, got 1"},
        {5, "task { sequence_classification { labels: [\"a\", \"b\", \"a\"] } }",
         "F:5:53: error: task.sequence_classification.labels lists \"a\" twice (entries 0 and 2)"},
        {5, "task { sequence_classification { labels: [\"a\", \"\"] } }",
         "F:5:48: error: task.sequence_classification.labels[1] is empty"},
        {5, "task { sequence_classification { labels: [\"a\", \"b\"] } }",
         "F:3:8: error: sequence classification reads JSONL records {\"text\": ..., \"label\": "
         "...}; data.train \"@/train.tokens\" is not JSONL"},
        {5, "name: \"\"", "F:5:1: error: name must not be empty"},
        {2, "method { prefix { num_virtual_tokens: 0 } }",
         "F:2:19: error: method.prefix.num_virtual_tokens must be > 0"},
        {2, "method { layer_wise { first_layer: 1 last_layer: 0 } }",
         "F:2:23: error: method.layer_wise.first_layer (1) must not be above last_layer (0)"},
        {2, "method { layer_wise { last_layer: 2 } }",
         "F:2:23: error: method.layer_wise.last_layer 2 does not exist; the model has 2 layers (0 "
         "to 1)"},
        {2, "method { layer_wise { modules: [MODULE_UNSPECIFIED] } }",
         "F:2:33: error: method.layer_wise.modules cannot hold MODULE_UNSPECIFIED; allowed: "
         "Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ, INPUT_LAYERNORM, "
         "POST_ATTENTION_LAYERNORM"},
        {2, "method { attention_heads { heads: [0] top_k: 2 } }",
         "F:2:39: error: method.attention_heads: set either heads or top_k, not both"},
        {2, "method { attention_heads { } }",
         "F:2:10: error: method.attention_heads: set heads (query-head indices) or top_k"},
        {2, "method { attention_heads { top_k: 0 } }",
         "F:2:28: error: method.attention_heads.top_k must be > 0"},
        {2, "method { attention_heads { top_k: 2 calibration_batches: 0 } }",
         "F:2:37: error: method.attention_heads.calibration_batches must be > 0 with top_k "
         "(importance is measured on calibration batches)"},
        {2, "method { attention_heads { top_k: 9 } }",
         "F:2:28: error: method.attention_heads.top_k 9 exceeds the 8 (layer, head) pairs to "
         "choose from"},
        {2, "method { attention_heads { layers: [1] top_k: 5 } }",
         "F:2:40: error: method.attention_heads.top_k 5 exceeds the 4 (layer, head) pairs to "
         "choose from"},
        {2, "method { attention_heads { heads: [1, 4] } }",
         "F:2:39: error: method.attention_heads.heads: head 4 does not exist; the model has 4 "
         "heads (0 to 3)"},
        {2, "method { attention_heads { heads: [1] layers: [2] } }",
         "F:2:48: error: method.attention_heads.layers: layer 2 does not exist; the model has 2 "
         "layers (0 to 1)"},
        {2, "method { attention_heads { heads: [1] projections: [UP_PROJ] } }",
         "F:2:53: error: method.attention_heads.projections cannot hold UP_PROJ; allowed: Q_PROJ, "
         "K_PROJ, V_PROJ, O_PROJ"},
        {2, "method { subnetwork { sparsity: 0 } }",
         "F:2:23: error: method.subnetwork.sparsity must be in (0, 1), got 0"},
        {2, "method { subnetwork { sparsity: 1 } }",
         "F:2:23: error: method.subnetwork.sparsity must be in (0, 1), got 1"},
        {2, "method { subnetwork { selection: GRADIENT calibration_batches: 0 } }",
         "F:2:43: error: method.subnetwork.calibration_batches must be > 0 with a GRADIENT mask"},
        {2, "method { subnetwork { modules: [Q_PROJ, POST_ATTENTION_LAYERNORM] } }",
         "F:2:41: error: method.subnetwork.modules cannot hold POST_ATTENTION_LAYERNORM; allowed: "
         "Q_PROJ, K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ"},
        {2, "method { }",
         "F:2:1: error: the method block must choose one of lora, prefix, layer_wise, "
         "attention_heads, subnetwork, full"},
        {3, "data { eval: \"@/nope.tokens\" train: \"@/train.tokens\" }",
         "F:3:8: error: data.eval \"@/nope.tokens\": No such file or directory (relative paths "
         "start at the current directory)"},
        {5, "init_from: \"@/nope\"",
         "F:5:1: error: init_from \"@/nope\": No such file or directory (relative paths start at "
         "the current directory)"},
        {5, "cluster { curve { server_keys: \"@/model\" } }",
         "F:5:19: error: cluster.curve.server_keys \"@/model\" is a directory, not a file"},
        {5, "cluster { curve { authorized_keys: \"@/none.keys\" } }",
         "F:5:19: error: cluster.curve.authorized_keys \"@/none.keys\": No such file or directory "
         "(relative paths start at the current directory)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *lines[] = {L_MODEL, L_LORA, L_DATA, L_SCHED, ""};
        char body[1024], repl[512];
        snprintf(repl, sizeof repl, "%s\n", cases[i].text);
        lines[cases[i].line - 1] = repl;
        snprintf(body, sizeof body, "%s%s%s%s%s", lines[0], lines[1], lines[2], lines[3], lines[4]);
        print_message("case %zu: %s\n", i, cases[i].want);
        load_fails(write_exp("check.pbtxt", body), NULL, 0, cases[i].want);
    }
}

static void test_required_and_files(void **state) {
    load_fails(write_exp("r1.pbtxt", L_LORA L_DATA L_SCHED), NULL, 0,
               "F: error: model.path is required: a Hugging Face model directory with config.json");
    load_fails(write_exp("r2.pbtxt", "model {}\n" L_LORA L_DATA L_SCHED), NULL, 0,
               "F:1:1: error: model.path is required: a Hugging Face model directory with "
               "config.json");
    load_fails(write_exp("r3.pbtxt", L_MODEL L_DATA L_SCHED), NULL, 0,
               "F: error: a method block is required, e.g. method { lora { r: 8 } } (one of lora, "
               "prefix, layer_wise, attention_heads, subnetwork, full)");
    load_fails(write_exp("r4.pbtxt", L_MODEL L_LORA L_SCHED), NULL, 0,
               "F: error: data.train is required: the training data file");
    load_fails(write_exp("r5.pbtxt", L_MODEL L_LORA "data { seq_len: 8 }\n" L_SCHED), NULL, 0,
               "F:3:1: error: data.train is required: the training data file");
    load_fails(write_exp("r6.pbtxt", L_MODEL L_LORA L_DATA), NULL, 0,
               "F: error: schedule.total_steps is required and must be > 0");
    load_fails(write_exp("r7.pbtxt", L_MODEL L_LORA L_DATA "schedule {\n  total_steps: 0\n}\n"),
               NULL, 0, "F:5:3: error: schedule.total_steps is required and must be > 0");

    char want[512];
    snprintf(want, sizeof want,
             "F:1:9: error: model.path \"%s/nope\": No such file or directory (relative paths "
             "start at the current directory)",
             tmp);
    load_fails(write_exp("m1.pbtxt", "model { path: \"@/nope\" }\n" L_LORA L_DATA L_SCHED), NULL, 0,
               want);
    snprintf(want, sizeof want, "F:1:9: error: model.path \"%s/train.tokens\" is not a directory",
             tmp);
    load_fails(write_exp("m2.pbtxt", "model { path: \"@/train.tokens\" }\n" L_LORA L_DATA L_SCHED),
               NULL, 0, want);
    snprintf(want, sizeof want,
             "F:1:9: error: model.path \"%s/empty\": cannot read config.json: No such file or "
             "directory",
             tmp);
    load_fails(write_exp("m3.pbtxt", "model { path: \"@/empty\" }\n" L_LORA L_DATA L_SCHED), NULL,
               0, want);
    snprintf(want, sizeof want,
             "F:3:8: error: data.train \"%s/none.tokens\": No such file or directory (relative "
             "paths start at the current directory)",
             tmp);
    load_fails(write_exp("m4.pbtxt", L_MODEL L_LORA "data { train: \"@/none.tokens\" }\n" L_SCHED),
               NULL, 0, want);

    /* config.json that does not parse: modelcfg.c's message, at model.path. */
    Peftps__Experiment *x = NULL;
    err e;
    const char *p = write_exp("m5.pbtxt", "model { path: \"@/badmodel\" }\n" L_LORA L_DATA L_SCHED);
    assert_int_equal(experiment_load(p, NULL, 0, &x, NULL, &e), -1);
    char prefix[512];
    snprintf(prefix, sizeof prefix, "%s:1:9: error: model.path: ", p);
    assert_memory_equal(e.msg, prefix, strlen(prefix));
    assert_null(strchr(e.msg, '\n'));

    /* Every file that may be named, present: passes. */
    x = load_ok(write_exp("allfiles.pbtxt", L_MODEL L_LORA L_SCHED
                          "data { eval: \"@/eval.tokens\" train: \"@/train.tokens\" }\n"
                          "init_from: \"@/adapter.safetensors\"\n"
                          "cluster { curve { server_keys: \"@/server.key\" worker_keys: "
                          "\"@/server.key\" authorized_keys: \"@/server.key\" } }\n"),
                NULL, 0);
    assert_non_null(x->cluster->curve);
    config_free(x);

    /* A parse error comes straight from pbtext. */
    load_fails(write_exp("syntax.pbtxt", BASE "optimizer { lerning_rate: 1 }\n"), NULL, 0,
               "F:5:13: error: unknown field \"lerning_rate\" in peftps.Optimizer; did you mean "
               "\"lr\"?");
    load_fails("/nonexistent/x.pbtxt", NULL, 0,
               "/nonexistent/x.pbtxt: error: cannot read: No such file or directory");
}

static void test_relative_paths(void **state) {
    char cwd[4096];
    assert_non_null(getcwd(cwd, sizeof cwd));
    const char *p = write_exp("rel.pbtxt", "model { path: \"model\" }\n" L_LORA
                                           "data { train: \"train.tokens\" }\n" L_SCHED);
    /* From the temporary directory the relative paths resolve... */
    assert_int_equal(chdir(tmp), 0);
    Peftps__Experiment *x = NULL;
    err e;
    int rc = experiment_load(p, NULL, 0, &x, NULL, &e);
    assert_int_equal(chdir(cwd), 0);
    if (rc) fail_msg("%s", e.msg);
    config_free(x);
    /* ...and from elsewhere they do not, whatever directory the file is in. */
    load_fails(p, NULL, 0,
               "F:1:9: error: model.path \"model\": No such file or directory (relative paths "
               "start at the current directory)");
}

static void test_sets(void **state) {
    const char *p = write_exp("sets.pbtxt", BASE "optimizer { lr: -1 }\n");
    load_fails(p, NULL, 0, "F:5:13: error: optimizer.lr must be > 0, got -1");
    /* Applied in order: the last wins, and the error points at the --set. */
    char s1[] = "optimizer.lr=0.5", s2[] = "optimizer.lr=2e-4",
         s3[] = "method.prefix.num_virtual_tokens=7";
    char *sets[] = {s1, s2, s3};
    Peftps__Experiment *x = NULL;
    pbtext_locs *locs = NULL;
    err e;
    if (experiment_load(p, sets, 3, &x, &locs, &e)) fail_msg("%s", e.msg);
    assert_int_equal(x->optimizer->lr, 2e-4f);
    assert_int_equal(x->method->kind_case, PEFTPS__METHOD__KIND_PREFIX);
    assert_int_equal(x->method->prefix->num_virtual_tokens, 7);
    pbtext_pos pos;
    assert_int_equal(pbtext_locate(locs, "optimizer.lr", &pos), 0);
    assert_string_equal(pos.source, "--set optimizer.lr=2e-4");
    assert_int_equal(pbtext_locate(locs, "data.train", &pos), 0);
    assert_string_equal(pos.source, p);
    assert_int_equal(pos.line, 3);
    assert_int_equal(pos.col, 8);
    pbtext_locs_free(locs);
    config_free(x);

    char bad[] = "data.batch_size=6", bad2[] = "data.shards_per_step=4";
    char *sets2[] = {s2, bad, bad2};
    load_fails(p, sets2, 3,
               "--set data.shards_per_step=4: error: data.batch_size (6) must be a multiple of "
               "data.shards_per_step (4)");
    char typo[] = "optimizer.lerning_rate=1";
    char *sets3[] = {typo};
    load_fails(p, sets3, 1,
               "--set optimizer.lerning_rate=1: error: unknown field \"lerning_rate\" in "
               "peftps.Optimizer; did you mean \"lr\"?");
    char neg[] = "method.lora.alpha=-2";
    char *sets4[] = {s2, neg};
    load_fails(p, sets4, 2,
               "--set method.lora.alpha=-2: error: method.lora.alpha must be > 0, got -2");
}

static void test_fingerprint(void **state) {
    const char *p = write_exp("fp.pbtxt", BASE);
    Peftps__Experiment *x = load_ok(p, NULL, 0);
    char text[2048];
    snprintf(text, sizeof text,
             "name: \"fp\"\nseed: 42\nmodel {\n  path: \"%s/model\"\n}\n"
             "method {\n  lora {\n    r: 8\n    alpha: 16\n    use_rslora: false\n"
             "    dropout: 0\n    target_modules: [Q_PROJ, V_PROJ]\n  }\n}\n"
             "optimizer {\n  lr: 0.001\n  beta1: 0.9\n  beta2: 0.999\n  eps: 1e-08\n"
             "  weight_decay: 0.01\n  max_grad_norm: 1\n}\n"
             "schedule {\n  warmup_steps: 0\n  decay: LINEAR\n  min_lr: 0\n}\n"
             "data {\n  train: \"%s/train.tokens\"\n  format: TOKENS\n  seq_len: 128\n"
             "  batch_size: 8\n  shards_per_step: 8\n}\n",
             tmp, tmp);
    char want[65], got[65];
    hash_sha256_hex_of(text, strlen(text), want);
    config_fingerprint(x, got);
    assert_string_equal(got, want);

    /* Where it runs and writes, how much memory it takes, for how many steps
     * (a finished run can be extended) and how it is evaluated do not count;
     * what it trains does. */
    char o1[] = "output_dir=/elsewhere", o2[] = "cluster.servers=tcp://10.1.1.1:7000",
         o3[] = "checkpoint.every_steps=5", o4[] = "schedule.total_steps=15",
         o5[] = "data.eval_every=3", o6[] = "data.eval_batches=2", o7[] = "model.recompute=true",
         lr[] = "optimizer.lr=2e-3";
    char *sets[] = {o1, o2, o3, o4, o5, o6, o7};
    Peftps__Experiment *y = load_ok(p, sets, 7);
    assert_int_equal(y->schedule->total_steps, 15);
    char fy[65];
    config_fingerprint(y, fy);
    assert_string_equal(fy, got);
    config_free(y);
    char *sets2[] = {lr};
    y = load_ok(p, sets2, 1);
    config_fingerprint(y, fy);
    assert_string_not_equal(fy, got);
    config_free(y);
    /* The experiment itself is untouched by fingerprinting. */
    assert_string_equal(x->output_dir, "out/fp");
    assert_true(x->schedule->has_total_steps && x->schedule->total_steps == 10);
    assert_non_null(x->cluster);
    assert_non_null(x->checkpoint);
    config_free(x);
}

static void test_parse_args(void **state) {
    char a0[] = "check", a1[] = "--set", a2[] = "optimizer.lr=1", a3[] = "exp.pbtxt",
         a4[] = "--set=seed=3", a5[] = "-v", a6[] = "--", a7[] = "--set", a8[] = "x=1";
    char *argv[] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, NULL};
    int argc = 9;
    config_args args;
    err e;
    assert_int_equal(config_parse_args(&argc, argv, &args, &e), 0);
    assert_int_equal(args.nsets, 2);
    assert_string_equal(args.sets[0], "optimizer.lr=1");
    assert_string_equal(args.sets[1], "seed=3");
    assert_int_equal(argc, 6);
    assert_string_equal(argv[0], "check");
    assert_string_equal(argv[1], "exp.pbtxt");
    assert_string_equal(argv[2], "-v");
    assert_string_equal(argv[3], "--");
    assert_string_equal(argv[4], "--set");
    assert_string_equal(argv[5], "x=1");
    assert_null(argv[6]);
    config_args_free(&args);

    char b1[] = "--set";
    char *argv2[] = {a0, a3, b1, NULL};
    argc = 3;
    assert_int_equal(config_parse_args(&argc, argv2, &args, &e), -1);
    assert_string_equal(e.msg, "--set needs PATH=VALUE, e.g. --set optimizer.lr=3e-4");
    char c2[] = "optimizer.lr";
    char *argv3[] = {a0, b1, c2, NULL};
    argc = 3;
    assert_int_equal(config_parse_args(&argc, argv3, &args, &e), -1);
    assert_string_equal(e.msg,
                        "--set optimizer.lr: expected PATH=VALUE, e.g. --set optimizer.lr=3e-4");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_method_defaults),
        cmocka_unit_test(test_format_from_ending),
        cmocka_unit_test(test_checks),
        cmocka_unit_test(test_required_and_files),
        cmocka_unit_test(test_relative_paths),
        cmocka_unit_test(test_sets),
        cmocka_unit_test(test_fingerprint),
        cmocka_unit_test(test_parse_args),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
