/* A model's chat template: read from tokenizer_config.json's chat_template
 * (or chat_template.jinja beside it) and rendered with jinja.h as
 * transformers renders it (messages, add_generation_prompt, bos_token,
 * eos_token). cli/cmd_generate.c renders --chat prompts with it. */
#ifndef PEFTPS_CHAT_H
#define PEFTPS_CHAT_H

#include <jansson.h>
#include <stddef.h>

#include "base/err.h"

typedef struct chat chat;

/* Opens the chat template of the model directory dir. Errors, naming the
 * file: tokenizer_config.json is not JSON; neither it nor
 * chat_template.jinja holds a template; the template does not parse. */
int chat_open(chat **out, const char *dir, err *e);

/* Renders messages (a list of {"role", "content"} objects) into *text
 * (malloc'd, NUL-terminated). Errors: the template raised an exception or
 * failed (its message, with the template's file). */
int chat_render(const chat *c, const json_t *messages, int add_generation_prompt, char **text,
                size_t *len, err *e);

void chat_free(chat *c);

#endif
