/* The table behind methods/registry.h: each method's definition, indexed by
 * the oneof case of Peftps__Method. */
#include "methods/registry.h"

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

int methods_create(peft **out, const Peftps__Method *config, const model_config *cfg,
                   const model_weights *base, err *e) {
    return peft_create(out, methods_find(config), config, cfg, base, e);
}
