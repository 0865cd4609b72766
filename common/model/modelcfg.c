/* The model configuration from a Hugging Face config.json, and the names and
 * shapes of the weights it implies (model.h). modelfile.c binds weights by
 * these names; model.c and the methods size their tensors by these shapes. */
#include "model/model.h"

#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* Reads an optional integer key into *out; absent or null leaves *out. */
static int get_int(json_t *o, const char *key, int *out, int required, const char *path, err *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required) return err_set(e, "%s: missing key \"%s\"", path, key);
        return 0;
    }
    if (!json_is_integer(v)) return err_set(e, "%s: key \"%s\" must be an integer", path, key);
    json_int_t x = json_integer_value(v);
    if (x < INT_MIN || x > INT_MAX)
        return err_set(e, "%s: key \"%s\" is out of range (%lld)", path, key, (long long)x);
    *out = (int)x;
    return 0;
}

static int get_num(json_t *o, const char *key, float *out, int required, const char *path, err *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        if (required) return err_set(e, "%s: missing key \"%s\"", path, key);
        return 0;
    }
    if (!json_is_number(v)) return err_set(e, "%s: key \"%s\" must be a number", path, key);
    double x = json_number_value(v);
    if (!isfinite(x) || fabs(x) > 3.4e38)
        return err_set(e, "%s: key \"%s\" is out of range (%g)", path, key, x);
    *out = (float)x;
    return 0;
}

static int get_bool(json_t *o, const char *key, int *out, const char *path, err *e) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) return err_set(e, "%s: key \"%s\" must be true or false", path, key);
    *out = json_is_true(v);
    return 0;
}

/* bos/eos may be an integer or a list of them (several stop tokens): the
 * first is the one the model uses. */
static int get_token(json_t *o, const char *key, int *out, const char *path, err *e) {
    json_t *v = json_object_get(o, key);
    *out = -1;
    if (v && json_is_array(v)) v = json_array_size(v) ? json_array_get(v, 0) : NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT_MAX)
        return err_set(e, "%s: key \"%s\" must be a token id or a list of them", path, key);
    *out = (int)json_integer_value(v);
    return 0;
}

/* rope_scaling (or the scaling part of rope_parameters): the type name is
 * "rope_type" in recent files and "type" in older ones. */
static int parse_rope_scaling(model_config *cfg, json_t *rs, const char *key, const char *path,
                              err *e) {
    if (!rs || json_is_null(rs)) return 0;
    if (!json_is_object(rs))
        return err_set(e, "%s: key \"%s\" must be an object or null", path, key);
    json_t *t = json_object_get(rs, "rope_type");
    if (!t || json_is_null(t)) t = json_object_get(rs, "type");
    if (!t || json_is_null(t) || !json_is_string(t))
        return err_set(e, "%s: key \"%s\" has no \"rope_type\" (or \"type\") string", path, key);
    const char *type = json_string_value(t);
    char where[1024];
    snprintf(where, sizeof where, "%s (%s.*)", path, key);
    if (strcmp(type, "default") == 0) return 0;
    if (strcmp(type, "linear") == 0) {
        cfg->rope_scaling = ROPE_LINEAR;
        if (get_num(rs, "factor", &cfg->rope_factor, 1, where, e)) return -1;
    } else if (strcmp(type, "llama3") == 0) {
        cfg->rope_scaling = ROPE_LLAMA3;
        if (get_num(rs, "factor", &cfg->rope_factor, 1, where, e) ||
            get_num(rs, "low_freq_factor", &cfg->rope_low_freq_factor, 1, where, e) ||
            get_num(rs, "high_freq_factor", &cfg->rope_high_freq_factor, 1, where, e) ||
            get_int(rs, "original_max_position_embeddings",
                    &cfg->rope_original_max_position_embeddings, 1, where, e))
            return -1;
        if (cfg->rope_low_freq_factor <= 0 ||
            cfg->rope_high_freq_factor <= cfg->rope_low_freq_factor ||
            cfg->rope_original_max_position_embeddings <= 0)
            return err_set(e,
                           "%s: llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor "
                           "and original_max_position_embeddings > 0",
                           where);
    } else {
        return err_set(e,
                       "%s: rope scaling type \"%.64s\" is not supported (supported: default, "
                       "linear, llama3)",
                       where, type);
    }
    if (!(cfg->rope_factor > 0)) return err_set(e, "%s: \"factor\" must be positive", where);
    return 0;
}

static int parse_obj(model_config *cfg, json_t *root, const char *path, err *e) {
    json_t *mt = json_object_get(root, "model_type");
    if (!mt) return err_set(e, "%s: missing key \"model_type\"", path);
    if (!json_is_string(mt)) return err_set(e, "%s: key \"model_type\" must be a string", path);
    const char *type = json_string_value(mt);
    int qwen2 = strcmp(type, "qwen2") == 0;
    /* SmolLM and TinyLlama publish model_type "llama". */
    if (!qwen2 && strcmp(type, "llama") != 0 && strcmp(type, "mistral") != 0)
        return err_set(e,
                       "%s: model_type \"%.64s\" is not supported (supported: llama, mistral, "
                       "qwen2)",
                       path, type);

    memset(cfg, 0, sizeof *cfg);
    cfg->num_kv_heads = -1;
    cfg->head_dim = -1;
    cfg->rms_norm_eps = 1e-6f;
    cfg->rope_theta = 10000.0f;
    cfg->rope_factor = 1.0f;
    cfg->initializer_range = 0.02f; /* transformers' LlamaConfig default */
    if (get_int(root, "vocab_size", &cfg->vocab_size, 1, path, e) ||
        get_int(root, "hidden_size", &cfg->hidden_size, 1, path, e) ||
        get_int(root, "intermediate_size", &cfg->intermediate_size, 1, path, e) ||
        get_int(root, "num_hidden_layers", &cfg->num_layers, 1, path, e) ||
        get_int(root, "num_attention_heads", &cfg->num_heads, 1, path, e) ||
        get_int(root, "num_key_value_heads", &cfg->num_kv_heads, 0, path, e) ||
        get_int(root, "head_dim", &cfg->head_dim, 0, path, e) ||
        get_int(root, "max_position_embeddings", &cfg->max_position_embeddings, 1, path, e) ||
        get_num(root, "rms_norm_eps", &cfg->rms_norm_eps, 0, path, e) ||
        get_num(root, "rope_theta", &cfg->rope_theta, 0, path, e) ||
        get_bool(root, "attention_bias", &cfg->attention_bias, path, e) ||
        get_bool(root, "tie_word_embeddings", &cfg->tie_word_embeddings, path, e) ||
        get_token(root, "bos_token_id", &cfg->bos_token_id, path, e) ||
        get_token(root, "eos_token_id", &cfg->eos_token_id, path, e) ||
        get_token(root, "pad_token_id", &cfg->pad_token_id, path, e) ||
        get_num(root, "initializer_range", &cfg->initializer_range, 0, path, e))
        return -1;

    json_t *rp = json_object_get(root, "rope_parameters");
    json_t *rs = json_object_get(root, "rope_scaling");
    if (rp && !json_is_null(rp)) {
        /* transformers >= 5 keeps theta and scaling together here. */
        if (!json_is_object(rp))
            return err_set(e, "%s: key \"rope_parameters\" must be an object", path);
        json_t *rt = json_object_get(rp, "rope_type");
        if (!json_object_get(rp, "rope_theta") && !rt)
            return err_set(e,
                           "%s: key \"rope_parameters\" has neither \"rope_theta\" nor "
                           "\"rope_type\" (per-layer-type rope parameters are not supported)",
                           path);
        if (get_num(rp, "rope_theta", &cfg->rope_theta, 0, path, e)) return -1;
        if (rt && !json_is_null(rt) && parse_rope_scaling(cfg, rp, "rope_parameters", path, e))
            return -1;
    }
    if (cfg->rope_scaling == ROPE_NONE && parse_rope_scaling(cfg, rs, "rope_scaling", path, e))
        return -1;

    /* The model implements SiLU-gated MLPs (with or without biases), q/k/v
     * biases (Qwen2; with the o_proj bias, Llama's attention_bias) and full
     * causal attention: refuse what would silently compute something else. */
    json_t *act = json_object_get(root, "hidden_act");
    if (act && !json_is_null(act) &&
        (!json_is_string(act) || strcmp(json_string_value(act), "silu") != 0))
        return err_set(e, "%s: key \"hidden_act\": only \"silu\" is supported", path);
    int sliding = 0;
    if (get_bool(root, "mlp_bias", &cfg->mlp_bias, path, e)) return -1;
    if (qwen2) {
        if (get_bool(root, "use_sliding_window", &sliding, path, e)) return -1;
        if (sliding)
            return err_set(e,
                           "%s: key \"use_sliding_window\": sliding-window attention is not "
                           "supported",
                           path);
        cfg->attention_bias = 1; /* Qwen2's q/k/v projections always have biases */
    } else {
        /* LlamaAttention: attention_bias biases q, k, v and o alike. */
        cfg->o_bias = cfg->attention_bias;
    }

    if (cfg->num_kv_heads < 0) cfg->num_kv_heads = cfg->num_heads;
#define POSITIVE(field, key)                                                                       \
    if (cfg->field <= 0)                                                                           \
    return err_set(e, "%s: key \"%s\" must be positive (%d)", path, key, cfg->field)
    POSITIVE(vocab_size, "vocab_size");
    POSITIVE(hidden_size, "hidden_size");
    POSITIVE(intermediate_size, "intermediate_size");
    POSITIVE(num_layers, "num_hidden_layers");
    POSITIVE(num_heads, "num_attention_heads");
    POSITIVE(num_kv_heads, "num_key_value_heads");
    POSITIVE(max_position_embeddings, "max_position_embeddings");
#undef POSITIVE
    if (cfg->head_dim < 0) {
        if (cfg->hidden_size % cfg->num_heads)
            return err_set(e,
                           "%s: key \"hidden_size\" (%d) is not divisible by "
                           "\"num_attention_heads\" (%d) and no \"head_dim\" is given",
                           path, cfg->hidden_size, cfg->num_heads);
        cfg->head_dim = cfg->hidden_size / cfg->num_heads;
    }
    if (cfg->head_dim <= 0 || cfg->head_dim % 2)
        return err_set(e,
                       "%s: key \"head_dim\" must be positive and even for rotary embeddings (%d)",
                       path, cfg->head_dim);
    if (cfg->num_heads % cfg->num_kv_heads)
        return err_set(e,
                       "%s: key \"num_attention_heads\" (%d) is not divisible by "
                       "\"num_key_value_heads\" (%d)",
                       path, cfg->num_heads, cfg->num_kv_heads);
    if ((long long)cfg->num_heads * cfg->head_dim > INT_MAX)
        return err_set(e, "%s: num_attention_heads * head_dim is out of range", path);
    if (!(cfg->rms_norm_eps > 0))
        return err_set(e, "%s: key \"rms_norm_eps\" must be positive", path);
    if (!(cfg->rope_theta > 0)) return err_set(e, "%s: key \"rope_theta\" must be positive", path);
    return 0;
}

int model_config_parse(model_config *cfg, const char *json_text, const char *path, err *e) {
    json_error_t je;
    json_t *root = json_loads(json_text, JSON_REJECT_DUPLICATES, &je);
    if (!root) return err_set(e, "%s:%d:%d: invalid JSON: %s", path, je.line, je.column, je.text);
    int rc = json_is_object(root) ? parse_obj(cfg, root, path, e)
                                  : err_set(e, "%s: not a JSON object", path);
    json_decref(root);
    return rc;
}

size_t model_weight_shape(const model_config *cfg, int layer, int kind, int *rows, int *cols) {
    int C = cfg->hidden_size, I = cfg->intermediate_size, V = cfg->vocab_size;
    int q = cfg->num_heads * cfg->head_dim, kv = cfg->num_kv_heads * cfg->head_dim;
    int r = 0, c = 1;
    if (layer == MODEL_GLOBAL) {
        switch (kind) {
        case GW_EMBED:
        case GW_LM_HEAD:
            r = V, c = C;
            break;
        case GW_FINAL_NORM:
            r = C;
            break;
        default:
            c = 0;
        }
    } else if (layer >= 0 && layer < cfg->num_layers) {
        switch (kind) {
        case LW_Q:
            r = q, c = C;
            break;
        case LW_K:
        case LW_V:
            r = kv, c = C;
            break;
        case LW_O:
            r = C, c = q;
            break;
        case LW_GATE:
        case LW_UP:
            r = I, c = C;
            break;
        case LW_DOWN:
            r = C, c = I;
            break;
        case LW_INPUT_NORM:
        case LW_POST_NORM:
            r = C;
            break;
        case LW_Q_BIAS:
            r = cfg->attention_bias ? q : 0;
            break;
        case LW_K_BIAS:
        case LW_V_BIAS:
            r = cfg->attention_bias ? kv : 0;
            break;
        case LW_O_BIAS:
            r = cfg->o_bias ? C : 0;
            break;
        case LW_GATE_BIAS:
        case LW_UP_BIAS:
            r = cfg->mlp_bias ? I : 0;
            break;
        case LW_DOWN_BIAS:
            r = cfg->mlp_bias ? C : 0;
            break;
        default:
            c = 0;
        }
    } else {
        c = 0;
    }
    if (r == 0) c = 0;
    if (rows) *rows = r;
    if (cols) *cols = c;
    return (size_t)r * (size_t)c;
}

void model_weight_name(const model_config *cfg, int layer, int kind, char *buf, size_t n) {
    static const char *const global[GW_COUNT] = {"model.embed_tokens.weight", "model.norm.weight",
                                                 "lm_head.weight"};
    static const char *const local[LW_COUNT] = {
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight",    "mlp.up_proj.weight",
        "mlp.down_proj.weight",    "input_layernorm.weight",  "post_attention_layernorm.weight",
        "self_attn.q_proj.bias",   "self_attn.k_proj.bias",   "self_attn.v_proj.bias",
        "self_attn.o_proj.bias",   "mlp.gate_proj.bias",      "mlp.up_proj.bias",
        "mlp.down_proj.bias"};
    if (!n) return;
    buf[0] = '\0';
    if (layer == MODEL_GLOBAL) {
        if (kind >= 0 && kind < GW_COUNT) snprintf(buf, n, "%s", global[kind]);
    } else if (layer >= 0 && layer < cfg->num_layers && kind >= 0 && kind < LW_COUNT) {
        snprintf(buf, n, "model.layers.%d.%s", layer, local[kind]);
    }
}

int model_bias_kind(int kind) {
    switch (kind) {
    case LW_Q:
        return LW_Q_BIAS;
    case LW_K:
        return LW_K_BIAS;
    case LW_V:
        return LW_V_BIAS;
    case LW_O:
        return LW_O_BIAS;
    case LW_GATE:
        return LW_GATE_BIAS;
    case LW_UP:
        return LW_UP_BIAS;
    case LW_DOWN:
        return LW_DOWN_BIAS;
    default:
        return -1;
    }
}

int model_is_bias(int kind) {
    return kind >= LW_Q_BIAS && kind <= LW_DOWN_BIAS;
}
