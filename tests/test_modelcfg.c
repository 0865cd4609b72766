/* Tests of common/model/modelcfg.c (config.json, weight names and shapes) and
 * common/model/modelfile.c (opening a model directory: single file, shards, tied
 * embeddings, BF16 conversion, fingerprints and every binding error). Model
 * directories are written with st_write into a temporary directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "procmaps.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "model/f32cache.h"
#include "model/model.h"
#include "model/safetensors.h"

static char tmpdir[64];

static char cachedir[96];

/* The F32 cache of BF16/F16 weights goes under the test directory, never
 * into the user's home. */
static int setup_dir(void **state) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/peftps-cfg-XXXXXX");
    if (!mkdtemp(tmpdir)) return -1;
    snprintf(cachedir, sizeof cachedir, "%s/f32-cache", tmpdir);
    return setenv("PEFTPS_CACHE_DIR", cachedir, 1);
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    return remove(p);
}

static int teardown_dir(void **state) {
    return nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static void write_text(const char *dir, const char *name, const char *text) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *fp = fopen(p, "w");
    assert_non_null(fp);
    fputs(text, fp);
    assert_int_equal(fclose(fp), 0);
}

/* A fresh subdirectory of the test directory. */
static const char *subdir(const char *name) {
    static char buf[8][256];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 256, "%s/%s", tmpdir, name);
    assert_int_equal(mkdir(p, 0755), 0);
    return p;
}

static int parse(model_config *c, const char *json, err *e) {
    return model_config_parse(c, json, "cfg/config.json", e);
}

static void expect_cfg_error(const char *json, const char *want) {
    model_config c;
    err e = {{0}};
    int rc = parse(&c, json, &e);
    if (rc == 0 || !strstr(e.msg, want) || strncmp(e.msg, "cfg/config.json", 15) != 0)
        fail_msg("expected error containing \"%s\", got rc=%d \"%s\"", want, rc, e.msg);
}

/* ---- config.json ------------------------------------------------------------ */

/* TinyLlama-1.1B-Chat-v1.0's config.json, verbatim but for the sizes. */
static const char *llama_json =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false,"
    " \"bos_token_id\": 1, \"eos_token_id\": 2, \"hidden_act\": \"silu\","
    " \"hidden_size\": 2048, \"initializer_range\": 0.02, \"intermediate_size\": 5632,"
    " \"max_position_embeddings\": 2048, \"model_type\": \"llama\","
    " \"num_attention_heads\": 32, \"num_hidden_layers\": 22, \"num_key_value_heads\": 4,"
    " \"pretraining_tp\": 1, \"rms_norm_eps\": 1e-05, \"rope_scaling\": null,"
    " \"rope_theta\": 10000.0, \"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\","
    " \"transformers_version\": \"4.35.0\", \"use_cache\": true, \"vocab_size\": 32000}";

/* Llama's attention_bias biases q, k, v and o; mlp_bias gate, up and down
 * (transformers' LlamaAttention and LlamaMLP). */
static void test_cfg_llama_biases(void **state) {
    static const char *base = "{\"model_type\": \"llama\", \"vocab_size\": 10, \"hidden_size\": 8,"
                              " \"intermediate_size\": 12, \"num_hidden_layers\": 2,"
                              " \"num_attention_heads\": 2, \"num_key_value_heads\": 1,"
                              " \"max_position_embeddings\": 16, %s}";
    char buf[512];
    model_config c;
    err e;
    int r, k;
    char name[128];
    snprintf(buf, sizeof buf, base, "\"attention_bias\": true");
    if (parse(&c, buf, &e)) fail_msg("%s", e.msg);
    assert_true(c.attention_bias && c.o_bias && !c.mlp_bias);
    assert_int_equal(model_weight_shape(&c, 1, LW_Q_BIAS, &r, &k), 8);
    assert_int_equal(model_weight_shape(&c, 1, LW_K_BIAS, &r, &k), 4);
    assert_int_equal(model_weight_shape(&c, 1, LW_O_BIAS, &r, &k), 8);
    assert_int_equal(k, 1);
    assert_int_equal(model_weight_shape(&c, 1, LW_GATE_BIAS, &r, &k), 0);
    model_weight_name(&c, 1, LW_O_BIAS, name, sizeof name);
    assert_string_equal(name, "model.layers.1.self_attn.o_proj.bias");

    snprintf(buf, sizeof buf, base, "\"mlp_bias\": true");
    if (parse(&c, buf, &e)) fail_msg("%s", e.msg);
    assert_true(!c.attention_bias && !c.o_bias && c.mlp_bias);
    assert_int_equal(model_weight_shape(&c, 0, LW_Q_BIAS, &r, &k), 0);
    assert_int_equal(model_weight_shape(&c, 0, LW_O_BIAS, &r, &k), 0);
    assert_int_equal(model_weight_shape(&c, 0, LW_GATE_BIAS, &r, &k), 12);
    assert_int_equal(model_weight_shape(&c, 0, LW_UP_BIAS, &r, &k), 12);
    assert_int_equal(model_weight_shape(&c, 0, LW_DOWN_BIAS, &r, &k), 8);
    model_weight_name(&c, 0, LW_GATE_BIAS, name, sizeof name);
    assert_string_equal(name, "model.layers.0.mlp.gate_proj.bias");
    model_weight_name(&c, 0, LW_DOWN_BIAS, name, sizeof name);
    assert_string_equal(name, "model.layers.0.mlp.down_proj.bias");

    /* Qwen2's attention biases stop at v: no o_proj bias. */
    snprintf(buf, sizeof buf, base, "\"attention_bias\": false");
    memcpy(strstr(buf, "llama"), "qwen2", 5);
    if (parse(&c, buf, &e)) fail_msg("%s", e.msg);
    assert_true(c.attention_bias && !c.o_bias && !c.mlp_bias);
    assert_int_equal(model_weight_shape(&c, 0, LW_O_BIAS, &r, &k), 0);

    for (int kind = LW_Q; kind <= LW_DOWN; kind++) {
        assert_true(model_is_bias(model_bias_kind(kind)));
        assert_false(model_is_bias(kind));
    }
    assert_int_equal(model_bias_kind(LW_INPUT_NORM), -1);
}

static void test_cfg_llama(void **state) {
    model_config c;
    err e;
    if (parse(&c, llama_json, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.vocab_size, 32000);
    assert_int_equal(c.hidden_size, 2048);
    assert_int_equal(c.intermediate_size, 5632);
    assert_int_equal(c.num_layers, 22);
    assert_int_equal(c.num_heads, 32);
    assert_int_equal(c.num_kv_heads, 4);
    assert_int_equal(c.head_dim, 64);
    assert_int_equal(c.max_position_embeddings, 2048);
    assert_true(c.rms_norm_eps == 1e-5f);
    assert_true(c.rope_theta == 10000.0f);
    assert_int_equal(c.rope_scaling, ROPE_NONE);
    assert_int_equal(c.attention_bias, 0);
    assert_int_equal(c.tie_word_embeddings, 0);
    assert_int_equal(c.bos_token_id, 1);
    assert_int_equal(c.eos_token_id, 2);

    /* Defaults: kv heads = heads, eps 1e-6, theta 10000, tokens -1. */
    const char *minimal = "{\"model_type\": \"mistral\", \"vocab_size\": 10, \"hidden_size\": 8,"
                          " \"intermediate_size\": 4, \"num_hidden_layers\": 1,"
                          " \"num_attention_heads\": 2, \"max_position_embeddings\": 16}";
    if (parse(&c, minimal, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.num_kv_heads, 2);
    assert_int_equal(c.head_dim, 4);
    assert_true(c.rms_norm_eps == 1e-6f);
    assert_true(c.rope_theta == 10000.0f);
    assert_int_equal(c.bos_token_id, -1);
    assert_int_equal(c.eos_token_id, -1);
    assert_int_equal(c.tie_word_embeddings, 0);

    /* An explicit head_dim need not equal hidden/heads (Gemma-like sizes). */
    const char *hd = "{\"model_type\": \"llama\", \"vocab_size\": 10, \"hidden_size\": 12,"
                     " \"intermediate_size\": 4, \"num_hidden_layers\": 1, \"head_dim\": 8,"
                     " \"num_attention_heads\": 4, \"num_key_value_heads\": 2,"
                     " \"max_position_embeddings\": 16, \"eos_token_id\": [7, 9],"
                     " \"bos_token_id\": null}";
    if (parse(&c, hd, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.head_dim, 8);
    assert_int_equal(c.eos_token_id, 7);
    assert_int_equal(c.bos_token_id, -1);
    int r, k;
    assert_int_equal(model_weight_shape(&c, 0, LW_Q, &r, &k), 32 * 12);
    assert_int_equal(r, 32);
    assert_int_equal(k, 12);
    assert_int_equal(model_weight_shape(&c, 0, LW_O, &r, &k), 12 * 32);
    assert_int_equal(model_weight_shape(&c, 0, LW_K, &r, &k), 16 * 12);
}

/* Qwen2-0.5B-Instruct's config.json (sizes kept). */
static const char *qwen2_json =
    "{\"architectures\": [\"Qwen2ForCausalLM\"], \"attention_dropout\": 0.0,"
    " \"bos_token_id\": 151643, \"eos_token_id\": 151645, \"hidden_act\": \"silu\","
    " \"hidden_size\": 896, \"initializer_range\": 0.02, \"intermediate_size\": 4864,"
    " \"max_position_embeddings\": 32768, \"max_window_layers\": 21,"
    " \"model_type\": \"qwen2\", \"num_attention_heads\": 14, \"num_hidden_layers\": 24,"
    " \"num_key_value_heads\": 2, \"rms_norm_eps\": 1e-06, \"rope_theta\": 1000000.0,"
    " \"sliding_window\": 32768, \"tie_word_embeddings\": true, \"torch_dtype\": \"bfloat16\","
    " \"transformers_version\": \"4.40.1\", \"use_cache\": true,"
    " \"use_sliding_window\": false, \"vocab_size\": 151936}";

static void test_cfg_qwen2(void **state) {
    model_config c;
    err e;
    if (parse(&c, qwen2_json, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.attention_bias, 1);
    assert_int_equal(c.tie_word_embeddings, 1);
    assert_int_equal(c.head_dim, 64);
    assert_int_equal(c.num_kv_heads, 2);
    assert_true(c.rope_theta == 1e6f);
    assert_int_equal(c.eos_token_id, 151645);
    int r, k;
    assert_int_equal(model_weight_shape(&c, 3, LW_Q_BIAS, &r, &k), 896);
    assert_int_equal(k, 1);
    assert_int_equal(model_weight_shape(&c, 3, LW_V_BIAS, &r, &k), 128);
    char name[128];
    model_weight_name(&c, 3, LW_K_BIAS, name, sizeof name);
    assert_string_equal(name, "model.layers.3.self_attn.k_proj.bias");
}

static void test_cfg_rope(void **state) {
    model_config c;
    err e;
    char buf[2048];
    const char *head = "{\"model_type\": \"llama\", \"vocab_size\": 10, \"hidden_size\": 8,"
                       " \"intermediate_size\": 4, \"num_hidden_layers\": 1,"
                       " \"num_attention_heads\": 2, \"max_position_embeddings\": 16, ";
    snprintf(buf, sizeof buf, "%s\"rope_scaling\": {\"type\": \"linear\", \"factor\": 4.0}}", head);
    if (parse(&c, buf, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.rope_scaling, ROPE_LINEAR);
    assert_true(c.rope_factor == 4.0f);

    /* Llama-3.2-1B's rope_scaling. */
    snprintf(buf, sizeof buf,
             "%s\"rope_theta\": 500000.0, \"rope_scaling\": {\"factor\": 32.0, "
             "\"high_freq_factor\": 4.0, \"low_freq_factor\": 1.0, "
             "\"original_max_position_embeddings\": 8192, \"rope_type\": \"llama3\"}}",
             head);
    if (parse(&c, buf, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.rope_scaling, ROPE_LLAMA3);
    assert_true(c.rope_factor == 32.0f);
    assert_true(c.rope_low_freq_factor == 1.0f);
    assert_true(c.rope_high_freq_factor == 4.0f);
    assert_int_equal(c.rope_original_max_position_embeddings, 8192);
    assert_true(c.rope_theta == 500000.0f);

    /* transformers 5: theta and scaling together in rope_parameters. */
    snprintf(buf, sizeof buf,
             "%s\"rope_parameters\": {\"rope_theta\": 500000.0, \"rope_type\": \"llama3\", "
             "\"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
             "\"original_max_position_embeddings\": 8192}}",
             head);
    if (parse(&c, buf, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.rope_scaling, ROPE_LLAMA3);
    assert_true(c.rope_factor == 8.0f);
    assert_true(c.rope_theta == 500000.0f);
    snprintf(buf, sizeof buf,
             "%s\"rope_parameters\": {\"rope_theta\": 1000000.0, \"rope_type\": \"default\"}}",
             head);
    if (parse(&c, buf, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.rope_scaling, ROPE_NONE);
    assert_true(c.rope_theta == 1e6f);
    snprintf(buf, sizeof buf, "%s\"rope_scaling\": {\"rope_type\": \"default\"}}", head);
    if (parse(&c, buf, &e)) fail_msg("%s", e.msg);
    assert_int_equal(c.rope_scaling, ROPE_NONE);

    snprintf(buf, sizeof buf, "%s\"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}}",
             head);
    expect_cfg_error(buf, "rope scaling type \"yarn\" is not supported");
    snprintf(buf, sizeof buf, "%s\"rope_scaling\": {\"type\": \"linear\"}}", head);
    expect_cfg_error(buf, "missing key \"factor\"");
    snprintf(buf, sizeof buf, "%s\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8}}",
             head);
    expect_cfg_error(buf, "missing key \"low_freq_factor\"");
    snprintf(buf, sizeof buf, "%s\"rope_parameters\": {\"full_attention\": {\"rope_theta\": 1e6}}}",
             head);
    expect_cfg_error(buf, "per-layer-type rope parameters are not supported");
    snprintf(buf, sizeof buf, "%s\"rope_scaling\": {\"factor\": 8}}", head);
    expect_cfg_error(buf, "has no \"rope_type\"");
}

static void test_cfg_errors(void **state) {
    char buf[2048];
    expect_cfg_error("{\"model_type\": \"gpt2\"}", "model_type \"gpt2\" is not supported");
    expect_cfg_error("{\"vocab_size\": 3}", "missing key \"model_type\"");
    expect_cfg_error("{\"model_type\": \"llama\", \"vocab_size\": 10}",
                     "missing key \"hidden_size\"");
    expect_cfg_error("[1]", "not a JSON object");
    expect_cfg_error("{\"model_type\": ", "cfg/config.json:1:");
    const char *sizes = "\"vocab_size\": 10, \"intermediate_size\": 4, \"num_hidden_layers\": 1,"
                        " \"max_position_embeddings\": 16";
    snprintf(buf, sizeof buf,
             "{\"model_type\": \"llama\", \"hidden_size\": 12, \"num_attention_heads\": 3,"
             " \"num_key_value_heads\": 2, %s}",
             sizes);
    expect_cfg_error(buf,
                     "\"num_attention_heads\" (3) is not divisible by \"num_key_value_heads\"");
    snprintf(buf, sizeof buf,
             "{\"model_type\": \"llama\", \"hidden_size\": 10, \"num_attention_heads\": 4, %s}",
             sizes);
    expect_cfg_error(buf, "no \"head_dim\" is given");
    snprintf(buf, sizeof buf,
             "{\"model_type\": \"llama\", \"hidden_size\": 8.5, \"num_attention_heads\": 2, %s}",
             sizes);
    expect_cfg_error(buf, "key \"hidden_size\" must be an integer");
    snprintf(buf, sizeof buf,
             "{\"model_type\": \"llama\", \"hidden_size\": 0, \"num_attention_heads\": 2, %s}",
             sizes);
    expect_cfg_error(buf, "key \"hidden_size\" must be positive");
    snprintf(buf, sizeof buf,
             "{\"model_type\": \"llama\", \"hidden_size\": 8, \"num_attention_heads\": 2, %s,"
             " \"hidden_act\": \"gelu\"}",
             sizes);
    expect_cfg_error(buf, "\"hidden_act\"");
    snprintf(buf, sizeof buf,
             "{\"model_type\": \"qwen2\", \"hidden_size\": 8, \"num_attention_heads\": 2, %s,"
             " \"use_sliding_window\": true}",
             sizes);
    expect_cfg_error(buf, "use_sliding_window");
    snprintf(buf, sizeof buf,
             "{\"model_type\": \"llama\", \"hidden_size\": 8, \"num_attention_heads\": 2, %s,"
             " \"vocab_size\": 11}",
             sizes);
    expect_cfg_error(buf, "duplicate object key");
}

static void test_weight_names_shapes(void **state) {
    model_config c;
    err e;
    assert_int_equal(parse(&c, llama_json, &e), 0);
    char n[128];
    model_weight_name(&c, MODEL_GLOBAL, GW_EMBED, n, sizeof n);
    assert_string_equal(n, "model.embed_tokens.weight");
    model_weight_name(&c, MODEL_GLOBAL, GW_FINAL_NORM, n, sizeof n);
    assert_string_equal(n, "model.norm.weight");
    model_weight_name(&c, MODEL_GLOBAL, GW_LM_HEAD, n, sizeof n);
    assert_string_equal(n, "lm_head.weight");
    model_weight_name(&c, 21, LW_DOWN, n, sizeof n);
    assert_string_equal(n, "model.layers.21.mlp.down_proj.weight");
    model_weight_name(&c, 0, LW_POST_NORM, n, sizeof n);
    assert_string_equal(n, "model.layers.0.post_attention_layernorm.weight");
    model_weight_name(&c, 5, LW_O, n, sizeof n);
    assert_string_equal(n, "model.layers.5.self_attn.o_proj.weight");
    model_weight_name(&c, 22, LW_O, n, sizeof n); /* past the last layer */
    assert_string_equal(n, "");
    int r, k;
    assert_int_equal(model_weight_shape(&c, MODEL_GLOBAL, GW_EMBED, &r, &k), 32000 * 2048);
    assert_int_equal(model_weight_shape(&c, MODEL_GLOBAL, GW_FINAL_NORM, &r, &k), 2048);
    assert_int_equal(k, 1);
    assert_int_equal(model_weight_shape(&c, 1, LW_K, &r, &k), 256 * 2048);
    assert_int_equal(r, 256);
    assert_int_equal(model_weight_shape(&c, 1, LW_GATE, &r, &k), 5632 * 2048);
    assert_int_equal(model_weight_shape(&c, 1, LW_DOWN, &r, &k), 2048 * 5632);
    assert_int_equal(r, 2048);
    assert_int_equal(k, 5632);
    for (int b = LW_Q_BIAS; b <= LW_DOWN_BIAS; b++) {
        assert_int_equal(model_weight_shape(&c, 1, b, &r, &k), 0); /* no bias */
        assert_int_equal(r, 0);
    }
    assert_int_equal(model_weight_shape(&c, 22, LW_Q, &r, &k), 0);
    assert_int_equal(model_weight_shape(&c, MODEL_GLOBAL, GW_COUNT, &r, &k), 0);
}

/* ---- model directories --------------------------------------------------- */

/* 2 layers, V=16, C=8, I=12, 2 query heads and 1 kv head of 4. */
#define TINY_CFG(extra)                                                                            \
    "{\"model_type\": \"llama\", \"vocab_size\": 16, \"hidden_size\": 8,"                          \
    " \"intermediate_size\": 12, \"num_hidden_layers\": 2, \"num_attention_heads\": 2,"            \
    " \"num_key_value_heads\": 1, \"max_position_embeddings\": 64" extra "}"

/* Exact in BF16: the first element numbers the tensor, the rest are small
 * multiples of 1/4. */
static float val(int t, size_t i) {
    return i == 0 ? (float)(t + 1) : (float)((int)((t * 7 + i) % 64) - 32) * 0.25f;
}

typedef struct tiny_opts {
    st_dtype dtype;
    int shards;        /* 0: model.safetensors; 2: two shards and an index */
    int with_lm_head;  /* write lm_head.weight */
    const char *drop;  /* a tensor left out */
    const char *wrong; /* a tensor written with one extra row */
    const char *extra_cfg_json;
} tiny_opts;

/* Writes DIR/config.json and the weights of the tiny model. */
static void write_tiny(const char *dir, const char *cfg_json, tiny_opts o) {
    model_config c;
    err e;
    if (model_config_parse(&c, cfg_json, "tiny", &e)) fail_msg("%s", e.msg);
    write_text(dir, "config.json", cfg_json);
    st_entry en[64];
    char names[64][96];
    void *bufs[64];
    int shard_of[64], n = 0, t = 0;
    for (int layer = MODEL_GLOBAL; layer < c.num_layers; layer++) {
        int kinds = layer == MODEL_GLOBAL ? GW_COUNT : LW_COUNT;
        for (int kind = 0; kind < kinds; kind++, t++) {
            int r, k;
            if (!model_weight_shape(&c, layer, kind, &r, &k)) continue;
            model_weight_name(&c, layer, kind, names[n], sizeof names[n]);
            if (layer == MODEL_GLOBAL && kind == GW_LM_HEAD && !o.with_lm_head) continue;
            if (o.drop && strcmp(o.drop, names[n]) == 0) continue;
            if (o.wrong && strcmp(o.wrong, names[n]) == 0) r++;
            size_t numel = (size_t)r * (size_t)k;
            int vec = k == 1 && (kind == LW_INPUT_NORM || kind == LW_POST_NORM ||
                                 kind >= LW_Q_BIAS || layer == MODEL_GLOBAL);
            en[n] = (st_entry){names[n], o.dtype, vec ? 1 : 2, {r, k}, NULL};
            if (o.dtype == ST_F32) {
                float *p = malloc(numel * 4);
                for (size_t i = 0; i < numel; i++) p[i] = val(t, i);
                bufs[n] = p;
            } else {
                uint16_t *p = malloc(numel * 2);
                for (size_t i = 0; i < numel; i++)
                    p[i] =
                        o.dtype == ST_BF16 ? st_f32_to_bf16(val(t, i)) : st_f32_to_f16(val(t, i));
                bufs[n] = p;
            }
            en[n].data = bufs[n];
            shard_of[n] = layer < 1 ? 0 : 1; /* globals and layer 0 | layer 1 */
            n++;
        }
    }
    char path[512];
    if (!o.shards) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (st_write(path, en, n, "{\"format\": \"pt\"}", &e)) fail_msg("%s", e.msg);
    } else {
        char index[8192] = "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {";
        int listed = 0;
        for (int s = 0; s < 2; s++) {
            st_entry part[64];
            int m = 0;
            for (int i = 0; i < n; i++)
                if (shard_of[i] == s) {
                    part[m++] = en[i];
                    char line[256];
                    snprintf(line, sizeof line, "%s\"%s\": \"model-0000%d-of-00002.safetensors\"",
                             listed++ ? ", " : "", en[i].name, s + 1);
                    strcat(index, line);
                }
            snprintf(path, sizeof path, "%s/model-0000%d-of-00002.safetensors", dir, s + 1);
            if (st_write(path, part, m, NULL, &e)) fail_msg("%s", e.msg);
        }
        strcat(index, "}}");
        write_text(dir, "model.safetensors.index.json", index);
    }
    for (int i = 0; i < n; i++) free(bufs[i]);
}

/* Whether any mapping of a file whose name ends in `suffix` exists. */
static int file_mapped(const char *suffix) {
    FILE *fp = fopen("/proc/self/maps", "r");
    char line[1024];
    int hit = 0;
    while (!hit && fp && fgets(line, sizeof line, fp)) {
        line[strcspn(line, "\n")] = 0;
        size_t L = strlen(line), S = strlen(suffix);
        hit = L >= S && strcmp(line + L - S, suffix) == 0;
    }
    if (fp) fclose(fp);
    return hit;
}

/* Every bound weight holds the values write_tiny wrote for it, and lies in
 * a mapping of the file named by suffix exactly when expect_mapped (not
 * checked when suffix is NULL). */
static void check_values(const model_files *f, int expect_mapped, const char *suffix) {
    const model_config *c = model_files_config(f);
    const model_weights *w = model_files_weights(f);
    int t = 0;
    for (int layer = MODEL_GLOBAL; layer < c->num_layers; layer++) {
        int kinds = layer == MODEL_GLOBAL ? GW_COUNT : LW_COUNT;
        for (int kind = 0; kind < kinds; kind++, t++) {
            int r, k;
            size_t numel = model_weight_shape(c, layer, kind, &r, &k);
            const float *p = layer == MODEL_GLOBAL ? w->global[kind] : w->layer[layer][kind];
            if (!numel) {
                assert_null(p);
                continue;
            }
            assert_non_null(p);
            int src = t;
            if (layer == MODEL_GLOBAL && kind == GW_LM_HEAD && c->tie_word_embeddings) src = 0;
            for (size_t i = 0; i < numel; i++)
                if (p[i] != val(src, i))
                    fail_msg("layer %d kind %d [%zu]: %g, expected %g", layer, kind, i, p[i],
                             val(src, i));
            if (suffix) assert_int_equal(in_file_mapping(p, suffix), expect_mapped);
        }
    }
}

static void test_dir_single_f32(void **state) {
    const char *dir = subdir("single");
    write_tiny(dir, TINY_CFG(""), (tiny_opts){ST_F32, 0, 1, NULL, NULL, NULL});
    model_files *f;
    err e;
    if (model_files_open(&f, dir, &e)) fail_msg("%s", e.msg);
    assert_int_equal(model_files_config(f)->num_layers, 2);
    check_values(f, 1, "/single/model.safetensors"); /* F32 used in place */
    assert_true(file_mapped("/single/model.safetensors"));
    const model_weights *w = model_files_weights(f);
    assert_ptr_not_equal(w->global[GW_LM_HEAD], w->global[GW_EMBED]);
    const char *fp = model_files_fingerprint(f);
    assert_int_equal(strlen(fp), 64);
    assert_int_equal(strspn(fp, "0123456789abcdef"), 64);
    char saved[65];
    strcpy(saved, fp);
    model_files_close(f);

    /* The same files elsewhere give the same fingerprint; another config
     * a different one. */
    const char *copy = subdir("single-copy");
    write_tiny(copy, TINY_CFG(""), (tiny_opts){ST_F32, 0, 1, NULL, NULL, NULL});
    assert_int_equal(model_files_open(&f, copy, &e), 0);
    assert_string_equal(model_files_fingerprint(f), saved);
    model_files_close(f);
    const char *other = subdir("single-eps");
    write_tiny(other, TINY_CFG(", \"rms_norm_eps\": 1e-5"),
               (tiny_opts){ST_F32, 0, 1, NULL, NULL, NULL});
    assert_int_equal(model_files_open(&f, other, &e), 0);
    assert_string_not_equal(model_files_fingerprint(f), saved);
    model_files_close(f);
}

static void test_dir_tied_bf16_f16(void **state) {
    const char *dir = subdir("tied");
    write_tiny(dir, TINY_CFG(", \"tie_word_embeddings\": true"),
               (tiny_opts){ST_BF16, 0, 0, NULL, NULL, NULL});
    model_files *f;
    err e;
    if (model_files_open(&f, dir, &e)) fail_msg("%s", e.msg);
    const model_weights *w = model_files_weights(f);
    assert_ptr_equal(w->global[GW_LM_HEAD], w->global[GW_EMBED]);
    check_values(f, 0, "/tied/model.safetensors");        /* converted, in our memory */
    assert_false(file_mapped("/tied/model.safetensors")); /* nothing left in use */
    model_files_close(f);

    const char *h = subdir("f16");
    write_tiny(h, TINY_CFG(""), (tiny_opts){ST_F16, 0, 1, NULL, NULL, NULL});
    if (model_files_open(&f, h, &e)) fail_msg("%s", e.msg);
    check_values(f, 0, "/f16/model.safetensors");
    model_files_close(f);
}

/* Cache files (*.f32, not their notes) in the cache directory, and the
 * inode of the last one seen. */
static int cache_files(ino_t *ino) {
    DIR *d = opendir(cachedir);
    int n = 0;
    struct dirent *de;
    while (d && (de = readdir(d)))
        if (de->d_name[0] != '.' && strlen(de->d_name) > 4 &&
            !strcmp(de->d_name + strlen(de->d_name) - 4, ".f32")) {
            n++;
            char p[400];
            struct stat st;
            snprintf(p, sizeof p, "%s/%s", cachedir, de->d_name);
            if (ino && stat(p, &st) == 0) *ino = st.st_ino;
        }
    if (d) closedir(d);
    return n;
}

/* Every weight of a and b holds the same values. */
static void same_weights(const model_files *a, const model_files *b) {
    const model_config *c = model_files_config(a);
    for (int layer = MODEL_GLOBAL; layer < c->num_layers; layer++)
        for (int kind = 0; kind < (layer == MODEL_GLOBAL ? GW_COUNT : LW_COUNT); kind++) {
            size_t n = model_weight_shape(c, layer, kind, NULL, NULL);
            const model_weights *wa = model_files_weights(a), *wb = model_files_weights(b);
            const float *pa = layer == MODEL_GLOBAL ? wa->global[kind] : wa->layer[layer][kind];
            const float *pb = layer == MODEL_GLOBAL ? wb->global[kind] : wb->layer[layer][kind];
            if (n) assert_memory_equal(pa, pb, n * sizeof(float));
        }
}

/* How many weight elements of f equal x. */
static int count_value(const model_files *f, float x) {
    const model_config *c = model_files_config(f);
    const model_weights *w = model_files_weights(f);
    int n = 0;
    for (int layer = MODEL_GLOBAL; layer < c->num_layers; layer++)
        for (int kind = 0; kind < (layer == MODEL_GLOBAL ? GW_COUNT : LW_COUNT); kind++) {
            size_t m = model_weight_shape(c, layer, kind, NULL, NULL);
            const float *p = layer == MODEL_GLOBAL ? w->global[kind] : w->layer[layer][kind];
            for (size_t i = 0; i < m; i++) n += p[i] == x;
        }
    return n;
}

/* BF16 weights become F32 once, in a cache file every later open maps
 * (shared between processes); a weights file changed in place gets a new
 * copy; without a usable cache each process converts for itself. */
static void test_dir_f32_cache(void **state) {
    const char *dir = subdir("cached");
    write_tiny(dir, TINY_CFG(""), (tiny_opts){ST_BF16, 0, 1, NULL, NULL, NULL});
    int before = cache_files(NULL);
    model_files *f, *g;
    err e;
    if (model_files_open(&f, dir, &e)) fail_msg("%s", e.msg);
    check_values(f, 1, ".f32"); /* every weight lies in the cache file's mapping */
    ino_t ino = 0, again = 0;
    assert_int_equal(cache_files(&ino), before + 1);
    if (model_files_open(&g, dir, &e)) fail_msg("%s", e.msg);
    check_values(g, 1, ".f32");
    assert_int_equal(cache_files(&again), before + 1); /* the same file, not rewritten */
    assert_int_equal(again, ino);
    model_files_close(g);
    model_files_close(f);

    /* The last weight's last element changed in place, same header, later
     * modification time: the values come from the new bytes. */
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *fp = fopen(path, "r+b");
    assert_non_null(fp);
    assert_int_equal(fseek(fp, -2, SEEK_END), 0);
    uint16_t v = st_f32_to_bf16(99.0f);
    assert_int_equal(fwrite(&v, 2, 1, fp), 1);
    fclose(fp);
    struct timespec later[2] = {{0, UTIME_OMIT}, {time(NULL) + 5, 0}};
    assert_int_equal(utimensat(AT_FDCWD, path, later, 0), 0);
    if (model_files_open(&f, dir, &e)) fail_msg("%s", e.msg);
    assert_int_equal(cache_files(NULL), before + 2);
    assert_true(in_file_mapping(model_files_weights(f)->global[GW_EMBED], ".f32"));
    setenv("PEFTPS_CACHE_DIR", "", 1); /* no cache: converted in this process */
    if (model_files_open(&g, dir, &e)) fail_msg("%s", e.msg);
    assert_false(in_file_mapping(model_files_weights(g)->global[GW_EMBED], ".f32"));
    same_weights(f, g);
    assert_int_equal(count_value(g, 99.0f), 1); /* val() never gives 99 */
    model_files_close(g);
    model_files_close(f);

    /* A cache directory that cannot be made: a warning, and the same weights. */
    setenv("PEFTPS_CACHE_DIR", "/proc/peftps-no-such-cache", 1);
    if (model_files_open(&g, dir, &e)) fail_msg("%s", e.msg);
    assert_false(in_file_mapping(model_files_weights(g)->global[GW_EMBED], ".f32"));
    assert_int_equal(count_value(g, 99.0f), 1);
    model_files_close(g);
    setenv("PEFTPS_CACHE_DIR", cachedir, 1);

    /* The listing (f32cache.h): the file of the first version is "changed",
     * the new one "current", both of this model directory; then gone. */
    f32cache_entry *en;
    int n;
    char abs[PATH_MAX];
    assert_non_null(realpath(dir, abs));
    assert_int_equal(f32cache_list(cachedir, &en, &n, &e), 0);
    int current = 0, changed = 0;
    for (int i = 0; i < n; i++) {
        if (strcmp(en[i].model, abs)) continue;
        current += en[i].state == F32CACHE_CURRENT;
        changed += en[i].state == F32CACHE_CHANGED;
        assert_true(en[i].bytes > 0 && en[i].mtime > 0);
    }
    assert_int_equal(current, 1);
    assert_int_equal(changed, 1);
    for (int i = 0; i < n; i++)
        if (!strcmp(en[i].model, abs) && en[i].state == F32CACHE_CHANGED)
            assert_int_equal(f32cache_remove(&en[i], &e), 0);
    free(en);
    assert_int_equal(cache_files(NULL), before + 1);
    char moved[600];
    snprintf(moved, sizeof moved, "%s.moved", dir);
    assert_int_equal(rename(dir, moved), 0);
    assert_int_equal(f32cache_list(cachedir, &en, &n, &e), 0);
    int gone = 0;
    for (int i = 0; i < n; i++) gone += !strcmp(en[i].model, abs) && en[i].state == F32CACHE_GONE;
    assert_int_equal(gone, 1);
    free(en);
    assert_int_equal(rename(moved, dir), 0);
    assert_string_equal(f32cache_state_name(F32CACHE_PARTIAL), "partial");
}

static void test_dir_sharded(void **state) {
    const char *dir = subdir("sharded");
    write_tiny(dir, TINY_CFG(""), (tiny_opts){ST_F32, 2, 1, NULL, NULL, NULL});
    model_files *f;
    err e;
    if (model_files_open(&f, dir, &e)) fail_msg("%s", e.msg);
    const model_weights *w = model_files_weights(f);
    assert_true(in_file_mapping(w->layer[0][LW_Q], "/sharded/model-00001-of-00002.safetensors"));
    assert_true(in_file_mapping(w->layer[1][LW_Q], "/sharded/model-00002-of-00002.safetensors"));
    assert_true(in_file_mapping(w->global[GW_EMBED], "/sharded/model-00001-of-00002.safetensors"));
    check_values(f, 0, NULL);
    char saved[65];
    strcpy(saved, model_files_fingerprint(f));
    model_files_close(f);
    /* The same weights unsharded are another set of files. */
    const char *one = subdir("unsharded");
    write_tiny(one, TINY_CFG(""), (tiny_opts){ST_F32, 0, 1, NULL, NULL, NULL});
    assert_int_equal(model_files_open(&f, one, &e), 0);
    assert_string_not_equal(model_files_fingerprint(f), saved);
    model_files_close(f);
}

static void test_dir_qwen2_bias(void **state) {
    const char *cfg =
        "{\"model_type\": \"qwen2\", \"vocab_size\": 16, \"hidden_size\": 8,"
        " \"intermediate_size\": 12, \"num_hidden_layers\": 2, \"num_attention_heads\": 2,"
        " \"num_key_value_heads\": 1, \"max_position_embeddings\": 64}";
    const char *dir = subdir("qwen");
    write_tiny(dir, cfg, (tiny_opts){ST_F32, 0, 1, NULL, NULL, NULL});
    model_files *f;
    err e;
    if (model_files_open(&f, dir, &e)) fail_msg("%s", e.msg);
    check_values(f, 1, "/qwen/model.safetensors");
    assert_non_null(model_files_weights(f)->layer[1][LW_V_BIAS]);
    model_files_close(f);

    const char *nob = subdir("qwen-nobias");
    write_tiny(nob, cfg,
               (tiny_opts){ST_F32, 0, 1, "model.layers.1.self_attn.q_proj.bias", NULL, NULL});
    assert_int_equal(model_files_open(&f, nob, &e), -1);
    assert_null(f);
    assert_non_null(strstr(e.msg, "missing tensor 'model.layers.1.self_attn.q_proj.bias'"));
}

static void expect_open_error(const char *dir, const char *want1, const char *want2) {
    model_files *f = (model_files *)1;
    err e = {{0}};
    int rc = model_files_open(&f, dir, &e);
    if (rc == 0 || !strstr(e.msg, want1) || (want2 && !strstr(e.msg, want2)))
        fail_msg("expected \"%s\" and \"%s\", got rc=%d \"%s\"", want1, want2 ? want2 : "", rc,
                 e.msg);
    assert_null(f);
}

static void test_dir_errors(void **state) {
    const char *d = subdir("missing");
    write_tiny(d, TINY_CFG(""),
               (tiny_opts){ST_F32, 0, 1, "model.layers.1.mlp.up_proj.weight", NULL, NULL});
    expect_open_error(d,
                      "/missing/model.safetensors: missing tensor "
                      "'model.layers.1.mlp.up_proj.weight'",
                      NULL);

    d = subdir("wrong");
    write_tiny(d, TINY_CFG(""),
               (tiny_opts){ST_F32, 0, 1, NULL, "model.layers.0.self_attn.k_proj.weight", NULL});
    expect_open_error(d, "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [5, 8]",
                      "config.json implies [4, 8]");

    d = subdir("wrongnorm");
    write_tiny(d, TINY_CFG(""), (tiny_opts){ST_BF16, 2, 1, NULL, "model.norm.weight", NULL});
    expect_open_error(d, "tensor 'model.norm.weight' has shape [9]", "implies [8]");

    d = subdir("nohead");
    write_tiny(d, TINY_CFG(""), (tiny_opts){ST_F32, 0, 0, NULL, NULL, NULL});
    expect_open_error(d, "tie_word_embeddings is false", "missing tensor 'lm_head.weight'");

    d = subdir("shardmissing");
    write_tiny(d, TINY_CFG(""),
               (tiny_opts){ST_F32, 2, 1, "model.layers.0.mlp.gate_proj.weight", NULL, NULL});
    expect_open_error(d,
                      "model.safetensors.index.json: missing tensor "
                      "'model.layers.0.mlp.gate_proj.weight'",
                      NULL);

    d = subdir("noweights");
    write_text(d, "config.json", TINY_CFG(""));
    expect_open_error(d, "neither model.safetensors nor model.safetensors.index.json", NULL);

    d = subdir("escape");
    write_text(d, "config.json", TINY_CFG(""));
    write_text(d, "model.safetensors.index.json",
               "{\"weight_map\": {\"model.norm.weight\": \"../single/model.safetensors\"}}");
    expect_open_error(d, "weight_map entry \"model.norm.weight\" is not a file name", NULL);

    d = subdir("badshard");
    write_text(d, "config.json", TINY_CFG(""));
    write_text(d, "model.safetensors.index.json",
               "{\"weight_map\": {\"model.norm.weight\": \"gone.safetensors\"}}");
    expect_open_error(d, "/badshard/gone.safetensors: No such file", NULL);

    d = subdir("nocfg");
    expect_open_error(d, "/nocfg/config.json: No such file", NULL);

    d = subdir("badcfg");
    write_text(d, "config.json", "{\"model_type\": \"bert\"}");
    expect_open_error(d, "/badcfg/config.json: model_type \"bert\"", NULL);

    d = subdir("corrupt");
    write_text(d, "config.json", TINY_CFG(""));
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", d);
    FILE *fp = fopen(path, "wb");
    assert_int_equal(fwrite("\x10\0\0\0\0\0\0\0{}", 1, 10, fp), 10);
    fclose(fp);
    expect_open_error(d, "/corrupt/model.safetensors: header length 16 exceeds", NULL);

    /* Integer weights are not a float type. */
    d = subdir("ints");
    write_tiny(d, TINY_CFG(""), (tiny_opts){ST_I16, 0, 1, NULL, NULL, NULL});
    expect_open_error(d, "has dtype I16; base weights must be F32, F16 or BF16", NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cfg_llama),      cmocka_unit_test(test_cfg_llama_biases),
        cmocka_unit_test(test_cfg_qwen2),      cmocka_unit_test(test_cfg_rope),
        cmocka_unit_test(test_cfg_errors),     cmocka_unit_test(test_weight_names_shapes),
        cmocka_unit_test(test_dir_single_f32), cmocka_unit_test(test_dir_tied_bf16_f16),
        cmocka_unit_test(test_dir_f32_cache),  cmocka_unit_test(test_dir_sharded),
        cmocka_unit_test(test_dir_qwen2_bias), cmocka_unit_test(test_dir_errors),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
