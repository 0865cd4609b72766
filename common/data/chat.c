/* The chat template of chat.h: found beside tokenizer.json, parsed once,
 * rendered with the special tokens tokenizer_config.json names. */
#include "data/chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data/jinja.h"

struct chat {
    jinja *j;
    char *path;
    json_t *bos, *eos; /* strings, "" when absent */
};

static json_t *token_string(const json_t *cfg, const char *key) {
    const json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    return json_string(json_is_string(v) ? json_string_value(v) : "");
}

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int chat_open(chat **out, const char *dir, err *e) {
    *out = NULL;
    chat *c = calloc(1, sizeof *c);
    char *cfg_path = join(dir, "tokenizer_config.json"),
         *jinja_path = join(dir, "chat_template.jinja");
    json_t *cfg = NULL, *src = NULL;
    if (!c || !cfg_path || !jinja_path) {
        err_set(e, "out of memory");
        goto fail;
    }
    json_error_t je;
    if (access(cfg_path, F_OK) == 0) {
        cfg = json_load_file(cfg_path, JSON_DECODE_INT_AS_REAL, &je);
        if (!cfg) {
            err_set(e, "%s:%d:%d: %s", cfg_path, je.line, je.column, je.text);
            goto fail;
        }
        const json_t *t = json_object_get(cfg, "chat_template");
        if (json_is_array(t)) { /* named templates: the one called default */
            const json_t *item;
            size_t i;
            json_array_foreach(
                t, i,
                item) if (json_is_string(json_object_get(item, "name")) &&
                          !strcmp(json_string_value(json_object_get(item, "name")), "default"))
                src = json_incref(json_object_get(item, "template"));
        } else if (json_is_string(t))
            src = json_incref((json_t *)t);
        if (src) c->path = strdup(cfg_path);
    }
    if (!src && access(jinja_path, R_OK) == 0) {
        FILE *f = fopen(jinja_path, "rb");
        char *text = NULL;
        size_t n = 0;
        if (f && fseek(f, 0, SEEK_END) == 0) {
            long l = ftell(f);
            rewind(f);
            text = l >= 0 ? malloc((size_t)l + 1) : NULL;
            if (text) n = fread(text, 1, (size_t)l, f);
        }
        if (f) fclose(f);
        if (!text) {
            err_errno(e, "cannot read %s", jinja_path);
            goto fail;
        }
        src = json_stringn(text, n);
        free(text);
        c->path = strdup(jinja_path);
    }
    if (!json_is_string(src)) {
        err_set(e, "%s has no chat_template and there is no %s: the model has no chat format",
                cfg_path, jinja_path);
        goto fail;
    }
    if (jinja_parse(&c->j, json_string_value(src), json_string_length(src), e)) {
        err_wrap(e, "the chat template of %s", c->path);
        goto fail;
    }
    c->bos = token_string(cfg, "bos_token");
    c->eos = token_string(cfg, "eos_token");
    json_decref(src);
    json_decref(cfg);
    free(cfg_path);
    free(jinja_path);
    *out = c;
    return 0;
fail:
    json_decref(src);
    json_decref(cfg);
    free(cfg_path);
    free(jinja_path);
    chat_free(c);
    return -1;
}

int chat_render(const chat *c, const json_t *messages, int add_generation_prompt, char **text,
                size_t *len, err *e) {
    json_t *ctx = json_pack("{sOsbsOsO}", "messages", messages, "add_generation_prompt",
                            add_generation_prompt, "bos_token", c->bos, "eos_token", c->eos);
    if (!ctx) return err_set(e, "out of memory");
    int rc = jinja_render(c->j, ctx, text, len, e);
    json_decref(ctx);
    return rc ? err_wrap(e, "the chat template of %s", c->path) : 0;
}

void chat_free(chat *c) {
    if (!c) return;
    jinja_free(c->j);
    free(c->path);
    json_decref(c->bos);
    json_decref(c->eos);
    free(c);
}
