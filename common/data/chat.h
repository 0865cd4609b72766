/* A model's chat template: read from tokenizer_config.json's chat_template
 * (or chat_template.jinja beside it) and rendered with jinja.h as
 * transformers renders it (messages, add_generation_prompt, bos_token,
 * eos_token), and conversations encoded with the loss on the assistant's
 * turns for data.c and cli/cmd_tokenize.c. cli/cmd_generate.c renders
 * --chat prompts with it. */
#ifndef PEFTPS_CHAT_H
#define PEFTPS_CHAT_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "base/err.h"

typedef struct chat chat;
struct tok;

/* Opens the chat template of the model directory dir. Errors, naming the
 * file: tokenizer_config.json is not JSON; neither it nor
 * chat_template.jinja holds a template; the template does not parse. */
int chat_open(chat **out, const char *dir, err *e);

/* Renders messages (a list of {"role", "content"} objects) into *text
 * (malloc'd, NUL-terminated). Errors: the template raised an exception or
 * failed (its message, with the template's file). */
int chat_render(const chat *c, const json_t *messages, int add_generation_prompt, char **text,
                size_t *len, err *e);

/* A chat from template text, with the given BOS/EOS strings (NULL: "").
 * Errors: the template does not parse. */
int chat_from_string(chat **out, const char *src, size_t len, const char *bos, const char *eos,
                     err *e);

/* The conversation rendered whole into *text (*len bytes) and the byte
 * spans [start, end) of its trained assistant turns, as pairs in *spans
 * (malloc'd, 2 * *nspans values), located as chat_encode describes. */
int chat_spans(const chat *c, const json_t *messages, char **text, size_t *len, size_t **spans,
               size_t *nspans, err *e);

/* One conversation as training data: messages (a list of {"role",
 * "content"} objects, an assistant message optionally with "train": false)
 * rendered whole (no generation prompt) and encoded (without the
 * tokenizer's template: the chat template writes its own special tokens)
 * into *ids with *mask (1 = a target) of *n tokens, and the text into
 * *text (all malloc'd; text may be NULL when not wanted). The targets are
 * the tokens of each trained assistant turn: its content and the
 * template's end-of-turn tokens after it. An assistant turn is located by
 * rendering: the text of the messages before it with the generation prompt
 * ends where the turn starts (it must be how the whole begins), the text of
 * the messages up to it without one ends where it ends (when a template
 * dresses the last turn differently, where its tail continues the whole;
 * for the conversation's last message, not past where the text parts from
 * the same conversation with one more user message, so that what a
 * template writes after every conversation is not trained). A token that
 * straddles the start of a turn is a target, one that straddles its end is
 * not. Errors: a message is not an object with string "role" and
 * "content", "train" is not a boolean (naming the message); no message;
 * the template fails; it does not render the conversation prefix by prefix
 * (naming the turn it could not locate); the tokenizer fails. */
int chat_encode(const chat *c, struct tok *t, const json_t *messages, char **text, int32_t **ids,
                unsigned char **mask, size_t *n, err *e);

void chat_free(chat *c);

#endif
