/* The methods of the registry in peft.c, one per file: lora.c, prefix.c,
 * layerwise.c, heads.c, subnet.c, full.c. Adding a method adds one line here
 * and one in peft.c's table. */
#ifndef PEFTPS_METHODS_H
#define PEFTPS_METHODS_H

#include "peft.h"

extern const peft_method lora_method;
extern const peft_method prefix_method;
extern const peft_method layerwise_method;
extern const peft_method heads_method;
extern const peft_method subnet_method;
extern const peft_method full_method;

#endif
