/* The method registry: every method of methods/, one file each (lora.c,
 * prefix.c, layerwise.c, heads.c, subnet.c, full.c), found by the oneof case
 * of the experiment's method block, and what the floors above ask of the
 * method of a block (defaults, checks, calibration, the PEFT adapter format)
 * without naming any. Adding a method adds its file, one line here and one
 * in registry.c's table. */
#ifndef PEFTPS_METHODS_REGISTRY_H
#define PEFTPS_METHODS_REGISTRY_H

#include <stddef.h>

#include "config/config.h"
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

/* The method whose PEFT adapter has this peft_type ("LORA"); NULL for NULL
 * or a type no method reads. */
const peft_method *methods_find_peft_type(const char *peft_type);

/* peft_create of the method the block names (see model/peft.h); a block
 * naming none fails with a message listing the methods. */
int methods_create(peft **out, const Peftps__Method *config, const model_config *cfg,
                   const model_weights *base, err *e);

/* What messages list, in registry order. */
typedef enum {
    METHODS_NAMES,         /* every method's name: "lora", ..., "full" */
    METHODS_ADAPTER_NAMES, /* the names of the methods with a PEFT format */
    METHODS_PEFT_TYPES,    /* their peft_types: "LORA", ... */
} methods_list_kind;

/* Writes the list to buf (n bytes, cut short if it must), entries joined by
 * sep and the last two by last_sep: (", ", " or ") gives "a, b or c". */
void methods_list(methods_list_kind what, const char *sep, const char *last_sep, char *buf,
                  size_t n);

/* How to write a method block, for the message when there is none:
 * "e.g. method { EXAMPLE } (one of NAMES)", the example the first method's. */
void methods_block_hint(char *buf, size_t n);

/* The method's defaults hook for its block; 0 for a block naming no method
 * (config_check then reports it). -1 only when out of memory. */
int methods_fill_defaults(Peftps__Method *config);

/* The method's check hook over its filled block; a block naming no method
 * fails at "method", listing the methods. */
int methods_check(const config_checker *c, const Peftps__Method *config);

/* The method's check_model hook: the block against the model's config. */
int methods_check_model(const config_checker *c, const Peftps__Method *config,
                        const model_config *cfg);

/* Calibration batches the block's method needs before init (0: none). */
int methods_calibration_batches(const Peftps__Method *config);

#endif
