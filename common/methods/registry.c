/* The table behind methods/registry.h: each method's definition, indexed by
 * the oneof case of Peftps__Method, and the calls into their hooks. */
#include "methods/registry.h"

#include <stdio.h>
#include <string.h>

static const peft_method *const methods_table[] = {
    [PEFTPS__METHOD__KIND_LORA] = &lora_method,
    [PEFTPS__METHOD__KIND_PREFIX] = &prefix_method,
    [PEFTPS__METHOD__KIND_LAYER_WISE] = &layerwise_method,
    [PEFTPS__METHOD__KIND_ATTENTION_HEADS] = &heads_method,
    [PEFTPS__METHOD__KIND_SUBNETWORK] = &subnet_method,
    [PEFTPS__METHOD__KIND_FULL] = &full_method,
};

#define METHODS_TABLE_SIZE (sizeof methods_table / sizeof methods_table[0])

const peft_method *methods_find(const Peftps__Method *config) {
    if (!config) return NULL;
    unsigned kind = (unsigned)config->kind_case;
    if (kind >= METHODS_TABLE_SIZE) return NULL;
    return methods_table[kind];
}

const peft_method *methods_find_peft_type(const char *peft_type) {
    for (size_t i = 0; peft_type && i < METHODS_TABLE_SIZE; i++) {
        const peft_method *m = methods_table[i];
        if (m && m->peft_type && m->adapter_config_read && !strcmp(m->peft_type, peft_type))
            return m;
    }
    return NULL;
}

/* The entry of list `what` for method m, or NULL when m is not in it. */
static const char *list_entry(const peft_method *m, methods_list_kind what) {
    if (!m) return NULL;
    switch (what) {
    case METHODS_NAMES:
        return m->name;
    case METHODS_ADAPTER_NAMES:
        return m->adapter_config_write ? m->name : NULL;
    case METHODS_PEFT_TYPES:
        return m->adapter_config_write ? m->peft_type : NULL;
    }
    return NULL;
}

void methods_list(methods_list_kind what, const char *sep, const char *last_sep, char *buf,
                  size_t n) {
    size_t count = 0, k = 0, len = 0;
    for (size_t i = 0; i < METHODS_TABLE_SIZE; i++)
        count += list_entry(methods_table[i], what) != 0;
    if (n) buf[0] = '\0';
    for (size_t i = 0; i < METHODS_TABLE_SIZE && len < n; i++) {
        const char *entry = list_entry(methods_table[i], what);
        if (!entry) continue;
        const char *before = k == 0 ? "" : k + 1 == count ? last_sep : sep;
        int w = snprintf(buf + len, n - len, "%s%s", before, entry);
        if (w < 0) break;
        len += (size_t)w;
        k++;
    }
}

void methods_block_hint(char *buf, size_t n) {
    char names[256];
    methods_list(METHODS_NAMES, ", ", ", ", names, sizeof names);
    const char *example = NULL;
    for (size_t i = 0; !example && i < METHODS_TABLE_SIZE; i++)
        if (methods_table[i]) example = methods_table[i]->example;
    snprintf(buf, n, "e.g. method { %s } (one of %s)", example ? example : "...", names);
}

int methods_create(peft **out, const Peftps__Method *config, const model_config *cfg,
                   const model_weights *base, err *e) {
    const peft_method *m = methods_find(config);
    if (!m) {
        *out = NULL;
        char names[256];
        methods_list(METHODS_NAMES, ", ", " or ", names, sizeof names);
        return err_set(e, "the experiment has no method block: set one of %s", names);
    }
    return peft_create(out, m, config, cfg, base, e);
}

int methods_fill_defaults(Peftps__Method *config) {
    const peft_method *m = methods_find(config);
    return m && m->defaults ? m->defaults(config) : 0;
}

int methods_check(const config_checker *c, const Peftps__Method *config) {
    const peft_method *m = methods_find(config);
    if (!m) {
        char names[256];
        methods_list(METHODS_NAMES, ", ", ", ", names, sizeof names);
        return config_fail(c, "method", "the method block must choose one of %s", names);
    }
    return m->check ? m->check(c, config) : 0;
}

int methods_check_model(const config_checker *c, const Peftps__Method *config,
                        const model_config *cfg) {
    const peft_method *m = methods_find(config);
    return m && m->check_model ? m->check_model(c, config, cfg) : 0;
}

int methods_calibration_batches(const Peftps__Method *config) {
    const peft_method *m = methods_find(config);
    return m && m->calibration_batches ? m->calibration_batches(config) : 0;
}
