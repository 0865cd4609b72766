/* The chat template of chat.h: found beside tokenizer.json, parsed once,
 * rendered with the special tokens tokenizer_config.json names. */
#include "data/chat.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/fsutil.h"
#include "data/jinja.h"
#include "data/tokenizer.h"

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

int chat_open(chat **out, const char *dir, err *e) {
    *out = NULL;
    chat *c = calloc(1, sizeof *c);
    char *cfg_path = fs_join(dir, "tokenizer_config.json"),
         *jinja_path = fs_join(dir, "chat_template.jinja");
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
    if (!src && access(jinja_path, F_OK) == 0) {
        char *text = NULL;
        size_t n = 0;
        if (fs_read_file(jinja_path, 0, &text, &n, e) < 0) goto fail;
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

/* Messages checked: each an object with string role and content, train a
 * boolean when present. */
static int check_messages(const json_t *messages, err *e) {
    if (!json_is_array(messages) || json_array_size(messages) == 0)
        return err_set(e, "\"messages\" must be a non-empty list");
    size_t i;
    const json_t *m;
    json_array_foreach(messages, i, m) {
        if (!json_is_object(m)) return err_set(e, "messages[%zu] is not an object", i);
        if (!json_is_string(json_object_get(m, "role")))
            return err_set(e, "messages[%zu] has no string \"role\"", i);
        if (!json_is_string(json_object_get(m, "content")))
            return err_set(e, "messages[%zu] (%s) has no string \"content\"", i,
                           json_string_value(json_object_get(m, "role")));
        const json_t *train = json_object_get(m, "train");
        if (train && !json_is_boolean(train))
            return err_set(e, "messages[%zu]: \"train\" must be true or false", i);
    }
    return 0;
}

/* Renders messages[0..k) into *text. */
static int render_first(const chat *c, const json_t *messages, size_t k, int gen, char **text,
                        size_t *len, err *e) {
    json_t *part = json_array();
    for (size_t i = 0; i < k; i++) json_array_append(part, json_array_get(messages, i));
    int rc = chat_render(c, part, gen, text, len, e);
    json_decref(part);
    return rc;
}

/* How many leading tokens of ids (n) encode text[0..end) alone: the
 * tokens wholly before the byte end. */
static int tokens_before(tok *t, const char *text, size_t end, const int32_t *ids, size_t n,
                         size_t *k, err *e) {
    int32_t *p;
    size_t np;
    if (tok_encode(t, text, end, 0, &p, &np, e)) return -1;
    size_t i = 0;
    while (i < np && i < n && p[i] == ids[i]) i++;
    free(p);
    *k = i;
    return 0;
}

/* Where an assistant turn that starts at byte lb of full ends, from upto
 * (the conversation rendered up to and including the turn): where upto
 * ends, when it is how full begins. Otherwise the two part at some c >= lb
 * because the template writes the turn differently when it is the last
 * one: upto has text inserted at c (Qwen3's empty <think> block) and then
 * continues as full does, and the turn ends where that continuation ends;
 * or upto has text appended (Phi-3.5's EOS after every conversation), and
 * the turn ends at c. 1 when found. */
static int turn_end(const char *full, size_t flen, const char *upto, size_t lu, size_t lb,
                    size_t *end) {
    size_t c = 0;
    while (c < lu && c < flen && upto[c] == full[c]) c++;
    if (c < lb) return 0;
    *end = c;
    for (size_t d = 1; d < lu - c; d++) { /* the shortest insertion that realigns */
        size_t k = lu - c - d;
        if (c + k <= flen && !memcmp(upto + c + d, full + c, k)) {
            *end = c + k;
            break;
        }
    }
    return 1;
}

/* The end of a conversation's last turn, which a template may follow with
 * text it writes at the end of every conversation (Phi-3.5's EOS, a
 * generation prompt written always): where the text parts from the same
 * conversation with one more user message. Not before lb + 1; flen when
 * that rendering fails (a template that refuses it). */
static size_t last_turn_end(const chat *c, const json_t *messages, const char *full, size_t flen,
                            size_t lb) {
    json_t *more = json_copy((json_t *)messages);
    json_array_append_new(more, json_pack("{ssss}", "role", "user", "content", "\x01"));
    char *text = NULL;
    size_t len = 0, k = 0;
    err e;
    if (!more || chat_render(c, more, 0, &text, &len, &e)) k = flen;
    while (k < flen && k < len && text[k] == full[k]) k++;
    free(text);
    json_decref(more);
    return k > lb ? k : flen;
}

int chat_spans(const chat *c, const json_t *messages, char **text, size_t *len, size_t **spans,
               size_t *nspans, err *e) {
    *text = NULL;
    *spans = NULL;
    *nspans = 0;
    if (check_messages(messages, e)) return -1;
    char *full = NULL;
    size_t flen = 0, nm = json_array_size(messages), ns = 0;
    if (chat_render(c, messages, 0, &full, &flen, e)) return -1;
    size_t *sp = malloc(2 * nm * sizeof *sp);
    if (!sp) {
        free(full);
        return err_set(e, "out of memory");
    }
    for (size_t i = 0; i < nm; i++) {
        const json_t *msg = json_array_get(messages, i);
        if (strcmp(json_string_value(json_object_get(msg, "role")), "assistant") ||
            json_is_false(json_object_get(msg, "train")))
            continue;
        char *before = NULL, *upto = NULL;
        size_t lb = 0, lu = 0, end = 0;
        int rc = render_first(c, messages, i, 1, &before, &lb, e) ||
                 render_first(c, messages, i + 1, 0, &upto, &lu, e);
        int located = !rc && lb <= flen && !memcmp(before, full, lb) &&
                      turn_end(full, flen, upto, lu, lb, &end) && end > lb;
        free(before);
        free(upto);
        if (located && i + 1 == nm && end == flen) end = last_turn_end(c, messages, full, flen, lb);
        if (!rc && !located)
            rc = err_set(e,
                         "cannot locate assistant message %zu: the chat template %s does not "
                         "render the conversation prefix by prefix (the text before it with the "
                         "generation prompt is not how the whole conversation begins, or the "
                         "turn's text is not found after it)",
                         i, c->path);
        if (rc) {
            free(full);
            free(sp);
            return -1;
        }
        sp[2 * ns] = lb;
        sp[2 * ns + 1] = end;
        ns++;
    }
    *text = full;
    if (len) *len = flen;
    *spans = sp;
    *nspans = ns;
    return 0;
}

int chat_encode(const chat *c, struct tok *t, const json_t *messages, char **text, int32_t **ids,
                unsigned char **mask, size_t *n, err *e) {
    *ids = NULL;
    *mask = NULL;
    *n = 0;
    if (text) *text = NULL;
    char *full;
    size_t flen, *sp, ns;
    if (chat_spans(c, messages, &full, &flen, &sp, &ns, e)) return -1;
    int32_t *v = NULL;
    size_t nv = 0;
    unsigned char *m = NULL;
    if (tok_encode(t, full, flen, 0, &v, &nv, e)) goto fail;
    m = calloc(nv ? nv : 1, 1);
    if (!m) {
        err_set(e, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < ns; i++) {
        size_t ks, ke;
        if (tokens_before(t, full, sp[2 * i], v, nv, &ks, e) ||
            tokens_before(t, full, sp[2 * i + 1], v, nv, &ke, e))
            goto fail;
        for (size_t k = ks; k < ke; k++) m[k] = 1;
    }
    free(sp);
    *ids = v;
    *mask = m;
    *n = nv;
    if (text)
        *text = full;
    else
        free(full);
    return 0;
fail:
    free(sp);
    free(full);
    free(v);
    free(m);
    return -1;
}

int chat_from_string(chat **out, const char *src, size_t len, const char *bos, const char *eos,
                     err *e) {
    *out = NULL;
    chat *c = calloc(1, sizeof *c);
    if (!c || !(c->path = strdup("(template text)"))) {
        free(c);
        return err_set(e, "out of memory");
    }
    c->bos = json_string(bos ? bos : "");
    c->eos = json_string(eos ? eos : "");
    if (jinja_parse(&c->j, src, len, e)) {
        chat_free(c);
        return err_wrap(e, "the chat template");
    }
    *out = c;
    return 0;
}
