/* A Jinja interpreter for the subset chat templates use, with the settings
 * transformers renders them with (trim_blocks, lstrip_blocks, no autoescape,
 * tojson without HTML escaping, loop controls). Values are jansson values.
 * common/data/chat.c renders conversations with it; checked byte for byte
 * against @huggingface/jinja by tests/test_jinja.c. */
#ifndef PEFTPS_JINJA_H
#define PEFTPS_JINJA_H

#include <jansson.h>
#include <stddef.h>

#include "base/err.h"

typedef struct jinja jinja;

/* Parses a template. Supported: text, {{ }}, {% %}, {# #} with the -
 * whitespace controls; statements if/elif/else, for (with unpacking, an if
 * filter, else, loop.index/index0/revindex/revindex0/first/last/length/
 * previtem/nextitem, break, continue), set (names, ns.attr, tuples, block
 * set), macro (with defaults), generation (rendered as its body);
 * expressions with literals, lists, dicts, attributes, subscripts, slices,
 * calls, filters, tests, and/or/not, comparisons, in, ~, arithmetic and
 * the conditional expression. Errors name the line and what was expected. */
int jinja_parse(jinja **out, const char *src, size_t len, err *e);

/* Renders with the variables of ctx (an object; not changed) into *text
 * (malloc'd, NUL-terminated, *len bytes). Globals: raise_exception(msg),
 * namespace(...), range(...); the filters trim, tojson, length, count,
 * items, upper, lower, title, capitalize, default, join, first, last,
 * list, string, int, float, abs, replace, reverse, selectattr, rejectattr,
 * map, safe; the tests defined, undefined, none, string, number, integer,
 * float, boolean, mapping, iterable, sequence, true, false, even, odd,
 * divisibleby, equalto/eq/==, in; string methods startswith, endswith,
 * strip, lstrip, rstrip, split, replace, upper, lower, title, capitalize,
 * find, count; dict methods items, keys, values, get. Errors: the
 * template's raise_exception (its message), a filter, test or function
 * that is not supported (named), a type error (what and where). */
int jinja_render(const jinja *j, const json_t *ctx, char **text, size_t *len, err *e);

void jinja_free(jinja *j);

#endif
