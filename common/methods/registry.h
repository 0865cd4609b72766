/* The method registry: every method of methods/, one file each (lora.c,
 * prefix.c, layerwise.c, heads.c, subnet.c, full.c), found by the oneof case
 * of the experiment's method block. Adding a method adds its file, one line
 * here and one in registry.c's table. */
#ifndef PEFTPS_METHODS_REGISTRY_H
#define PEFTPS_METHODS_REGISTRY_H

#include "model/peft.h"

extern const peft_method lora_method;
extern const peft_method prefix_method;
extern const peft_method layerwise_method;
extern const peft_method heads_method;
extern const peft_method subnet_method;
extern const peft_method full_method;

/* The method named by a method block; NULL for NULL or a block with no
 * method set. */
const peft_method *methods_find(const Peftps__Method *config);

/* peft_create of the method the block names (see model/peft.h). */
int methods_create(peft **out, const Peftps__Method *config, const model_config *cfg,
                   const model_weights *base, err *e);

#endif
