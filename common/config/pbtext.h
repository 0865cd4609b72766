/* Protobuf text format (*.pbtxt) over protobuf-c descriptors, which have no
 * text support of their own: a reader, a canonical writer and dotted-path
 * overrides. config.c uses it for experiment files and `--set`; any message
 * of proto/ (peftps.pb-c.h, testmsg.pb-c.h) works. */
#ifndef PEFTPS_PBTEXT_H
#define PEFTPS_PBTEXT_H

#include <protobuf-c/protobuf-c.h>
#include <stddef.h>

#include "base/err.h"

/* Messages nested deeper than this are refused, so hostile input cannot
 * exhaust the stack. */
#define PBTEXT_MAX_DEPTH 64

/* Where a value came from: a file position (line and col from 1, col in
 * bytes), or an override with line == col == 0 (source is then the override
 * text, e.g. "--set optimizer.lr=3e-4"). `source` is owned by the locs. */
typedef struct pbtext_pos {
    const char *source;
    int line, col;
} pbtext_pos;

/* The positions of every field a parse or override set, by dotted path:
 * "optimizer.lr", "method.lora" (a oneof member), and for each element of a
 * repeated field "method.lora.target_modules[1]" besides the field itself
 * (at its first occurrence). Elements of repeated messages continue the path:
 * "r_inner[0].a". */
typedef struct pbtext_locs pbtext_locs;

/* A new empty set of locations, or NULL when out of memory. */
pbtext_locs *pbtext_locs_new(void);

/* Frees l and every string it holds (pbtext_pos.source included); NULL is fine. */
void pbtext_locs_free(pbtext_locs *l);

/* Finds the position of exactly `path` (latest record wins). Returns 0 and
 * fills *pos, or -1 when the path was never set (l may be NULL). */
int pbtext_locate(const pbtext_locs *l, const char *path, pbtext_pos *pos);

/* Writes "source:line:col" (or just "source" for an override) into buf. */
void pbtext_pos_format(const pbtext_pos *pos, char *buf, size_t n);

/* Parses text (len bytes, any bytes allowed; need not be NUL-terminated)
 * as a message of `desc`. On success *out is a message built as
 * protobuf_c_message_unpack builds one (free it with
 * protobuf_c_message_free_unpacked(msg, NULL)); field positions are recorded
 * into locs when locs is not NULL. On failure returns -1 with one line in e:
 * "SOURCE:LINE:COL: error: ..." naming what was expected; *out is NULL and
 * nothing leaks. Errors: syntax, unknown field (with the nearest known name),
 * unknown enum value (with the valid names), wrong value type, integer or
 * float out of range, bad escape, unterminated string, a non-repeated field
 * or two members of one oneof set twice, string not UTF-8 or holding a NUL
 * byte, missing required field, nesting deeper than PBTEXT_MAX_DEPTH. */
int pbtext_parse(const ProtobufCMessageDescriptor *desc, const char *text, size_t len,
                 const char *source, ProtobufCMessage **out, pbtext_locs *locs, err *e);

/* Reads the file at path and parses it as pbtext_parse does, with the path as
 * source. A file that cannot be read gives "PATH: error: cannot read: ...". */
int pbtext_parse_file(const ProtobufCMessageDescriptor *desc, const char *path,
                      ProtobufCMessage **out, pbtext_locs *locs, err *e);

/* Receives the writer's output in pieces. */
typedef void (*pbtext_write_fn)(void *ctx, const char *data, size_t n);

/* Writes msg in canonical text format: fields in field-number order, 2-space
 * indentation, one field per line, repeated scalars as one `name: [a, b]`
 * line, repeated messages as repeated blocks, floats in the shortest form
 * that reads back to the same bits (inf, -inf, nan, -nan spelled so), strings
 * escaped. Reading the text back gives a message that packs to the same
 * bytes, provided its strings are UTF-8 and its enums hold known values (as
 * every message pbtext_parse builds does; other values are still written, as
 * octal escapes and numbers). Absent fields are not written. Cannot fail. */
void pbtext_write(const ProtobufCMessage *msg, pbtext_write_fn fn, void *ctx);

/* pbtext_write into a new NUL-terminated string (*out, free() it). Fails
 * only when out of memory. */
int pbtext_print(const ProtobufCMessage *msg, char **out, err *e);

/* Applies "PATH=VALUE" to msg, e.g. "optimizer.lr=3e-4",
 * "method.lora.r=16", "method.lora.target_modules=[Q_PROJ, V_PROJ]",
 * "cluster.servers=tcp://10.0.0.5:5555", "optimizer={lr: 1e-4}".
 * Missing submessages on the path are created; naming a oneof member selects
 * it and frees the member that was selected. VALUE is text-format syntax for
 * the field's type; a repeated field takes a `[a, b]` list or one value, and
 * either replaces the whole list; a message field takes `{...}` and replaces
 * the message; a string or bytes field also takes unquoted text verbatim.
 * An empty VALUE ("data.eval=") clears the field: unset, an empty list, no
 * message, no oneof member; `PATH=""` sets the empty string instead.
 * `label` names the override in errors ("LABEL: error: ...") and in the
 * locations recorded into locs (may be NULL); when NULL the assignment itself
 * is the label. On failure msg is unchanged. */
int pbtext_set_at(ProtobufCMessage *msg, const char *assignment, const char *label,
                  pbtext_locs *locs, err *e);

/* pbtext_set_at without locations and with the assignment as label. */
int pbtext_set(ProtobufCMessage *msg, const char *assignment, err *e);

/* Packs both messages and compares the bytes: 1 when equal, 0 when not or
 * when out of memory. */
int pbtext_equal(const ProtobufCMessage *a, const ProtobufCMessage *b);

#endif
