/* Protobuf text format over protobuf-c descriptors (see pbtext.h): a
 * tokenizer, a recursive reader that builds messages the way
 * protobuf_c_message_unpack does, dotted-path overrides and the canonical
 * writer. Used by config.c; tested by tests/test_pbtext.c and fuzzed by
 * tests/fuzz/fuzz_pbtext.c. */
#include "config/pbtext.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/fsutil.h"
#include "base/utf8.h"

#define MEMBER(msg, off) ((void *)((char *)(msg) + (off)))
#define CMEMBER(msg, off) ((const void *)((const char *)(msg) + (off)))

/* ---- growable byte buffer ------------------------------------------------ */

typedef struct strbuf {
    char *p;
    size_t n, cap;
    int oom;
} strbuf;

static int buf_put(strbuf *b, const void *data, size_t n) {
    if (b->oom) return -1;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return -1;
        }
        b->p = p;
        b->cap = cap;
    }
    if (n) memcpy(b->p + b->n, data, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

static int buf_putc(strbuf *b, int c) {
    char ch = (char)c;
    return buf_put(b, &ch, 1);
}

static void buf_free(strbuf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* ---- locations ----------------------------------------------------------- */

typedef struct loc_entry {
    char *path;
    int source; /* index into sources */
    int line, col;
} loc_entry;

struct pbtext_locs {
    loc_entry *v;
    size_t n, cap;
    char **sources;
    size_t nsources, capsources;
};

pbtext_locs *pbtext_locs_new(void) {
    return calloc(1, sizeof(pbtext_locs));
}

void pbtext_locs_free(pbtext_locs *l) {
    if (!l) return;
    for (size_t i = 0; i < l->n; i++) free(l->v[i].path);
    for (size_t i = 0; i < l->nsources; i++) free(l->sources[i]);
    free(l->v);
    free(l->sources);
    free(l);
}

/* Index of source in l->sources, added when new; -1 when out of memory. */
static int locs_source(pbtext_locs *l, const char *source) {
    for (size_t i = l->nsources; i-- > 0;)
        if (!strcmp(l->sources[i], source)) return (int)i;
    if (l->nsources == l->capsources) {
        size_t cap = l->capsources ? 2 * l->capsources : 4;
        char **s = realloc(l->sources, cap * sizeof *s);
        if (!s) return -1;
        l->sources = s;
        l->capsources = cap;
    }
    char *s = strdup(source);
    if (!s) return -1;
    l->sources[l->nsources] = s;
    return (int)l->nsources++;
}

static int locs_add(pbtext_locs *l, const char *path, size_t len, int source, int line, int col) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 32;
        loc_entry *v = realloc(l->v, cap * sizeof *v);
        if (!v) return -1;
        l->v = v;
        l->cap = cap;
    }
    char *p = malloc(len + 1);
    if (!p) return -1;
    memcpy(p, path, len);
    p[len] = 0;
    l->v[l->n++] = (loc_entry){p, source, line, col};
    return 0;
}

/* Forgets path and everything below it ("a.b" drops "a.b", "a.b.c", "a.b[0]"). */
static void locs_drop(pbtext_locs *l, const char *path, size_t k) {
    size_t j = 0;
    for (size_t i = 0; i < l->n; i++) {
        const char *p = l->v[i].path;
        if (!strncmp(p, path, k) && (p[k] == 0 || p[k] == '.' || p[k] == '['))
            free(l->v[i].path);
        else
            l->v[j++] = l->v[i];
    }
    l->n = j;
}

/* Appends every record of src to dst. */
static int locs_merge(pbtext_locs *dst, const pbtext_locs *src) {
    for (size_t i = 0; i < src->n; i++) {
        const loc_entry *x = &src->v[i];
        int s = locs_source(dst, src->sources[x->source]);
        if (s < 0 || locs_add(dst, x->path, strlen(x->path), s, x->line, x->col)) return -1;
    }
    return 0;
}

int pbtext_locate(const pbtext_locs *l, const char *path, pbtext_pos *pos) {
    if (!l || !path) return -1;
    for (size_t i = l->n; i-- > 0;) {
        if (!strcmp(l->v[i].path, path)) {
            pos->source = l->sources[l->v[i].source];
            pos->line = l->v[i].line;
            pos->col = l->v[i].col;
            return 0;
        }
    }
    return -1;
}

void pbtext_pos_format(const pbtext_pos *pos, char *buf, size_t n) {
    if (pos->line > 0)
        snprintf(buf, n, "%s:%d:%d", pos->source, pos->line, pos->col);
    else
        snprintf(buf, n, "%s", pos->source);
}

/* ---- descriptors --------------------------------------------------------- */

static size_t elem_size(ProtobufCType t) {
    switch (t) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_FLOAT:
    case PROTOBUF_C_TYPE_ENUM:
        return 4;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
    case PROTOBUF_C_TYPE_DOUBLE:
        return 8;
    case PROTOBUF_C_TYPE_BOOL:
        return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING:
    case PROTOBUF_C_TYPE_MESSAGE:
        return sizeof(void *);
    case PROTOBUF_C_TYPE_BYTES:
        return sizeof(ProtobufCBinaryData);
    }
    return 0;
}

static const char *type_name(const ProtobufCFieldDescriptor *f) {
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
        return "int32";
    case PROTOBUF_C_TYPE_SINT32:
        return "sint32";
    case PROTOBUF_C_TYPE_SFIXED32:
        return "sfixed32";
    case PROTOBUF_C_TYPE_INT64:
        return "int64";
    case PROTOBUF_C_TYPE_SINT64:
        return "sint64";
    case PROTOBUF_C_TYPE_SFIXED64:
        return "sfixed64";
    case PROTOBUF_C_TYPE_UINT32:
        return "uint32";
    case PROTOBUF_C_TYPE_FIXED32:
        return "fixed32";
    case PROTOBUF_C_TYPE_UINT64:
        return "uint64";
    case PROTOBUF_C_TYPE_FIXED64:
        return "fixed64";
    case PROTOBUF_C_TYPE_FLOAT:
        return "float";
    case PROTOBUF_C_TYPE_DOUBLE:
        return "double";
    case PROTOBUF_C_TYPE_BOOL:
        return "bool";
    case PROTOBUF_C_TYPE_ENUM:
        return ((const ProtobufCEnumDescriptor *)f->descriptor)->name;
    case PROTOBUF_C_TYPE_STRING:
        return "string";
    case PROTOBUF_C_TYPE_BYTES:
        return "bytes";
    case PROTOBUF_C_TYPE_MESSAGE:
        return ((const ProtobufCMessageDescriptor *)f->descriptor)->name;
    }
    return "?";
}

/* Whether the field stores a has_ flag (proto2 optional non-pointer types). */
static int has_flag(const ProtobufCFieldDescriptor *f) {
    return f->label == PROTOBUF_C_LABEL_OPTIONAL && !(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
           f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE;
}

static const ProtobufCFieldDescriptor *find_field(const ProtobufCMessageDescriptor *d,
                                                  const char *name, size_t n) {
    for (unsigned i = 0; i < d->n_fields; i++)
        if (strlen(d->fields[i].name) == n && !memcmp(d->fields[i].name, name, n))
            return &d->fields[i];
    return NULL;
}

static const ProtobufCFieldDescriptor *field_by_id(const ProtobufCMessageDescriptor *d,
                                                   uint32_t id) {
    for (unsigned i = 0; i < d->n_fields; i++)
        if (d->fields[i].id == id) return &d->fields[i];
    return NULL;
}

static ProtobufCMessage *msg_new(const ProtobufCMessageDescriptor *d) {
    ProtobufCMessage *m = malloc(d->sizeof_message);
    if (m) d->message_init(m);
    return m;
}

/* Frees what one non-repeated field owns, as protobuf_c_message_free_unpacked
 * would, without touching the storage. */
static void free_single(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f) {
    void *p = MEMBER(m, f->offset);
    if (f->type == PROTOBUF_C_TYPE_STRING) {
        char *s = *(char **)p;
        if (s && s != f->default_value) free(s);
    } else if (f->type == PROTOBUF_C_TYPE_BYTES) {
        const ProtobufCBinaryData *def = f->default_value;
        void *data = ((ProtobufCBinaryData *)p)->data;
        if (data && (!def || def->data != data)) free(data);
    } else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
        ProtobufCMessage *sub = *(ProtobufCMessage **)p;
        if (sub && (const void *)sub != f->default_value)
            protobuf_c_message_free_unpacked(sub, NULL);
    }
}

/* Returns a field to its unset state, freeing what it held. For a oneof
 * member this clears whichever member of that oneof is selected. */
static void clear_field(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f) {
    void *p = MEMBER(m, f->offset);
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
        size_t *n = MEMBER(m, f->quantifier_offset);
        void *arr = *(void **)p;
        for (size_t i = 0; arr && i < *n; i++) {
            if (f->type == PROTOBUF_C_TYPE_STRING)
                free(((char **)arr)[i]);
            else if (f->type == PROTOBUF_C_TYPE_BYTES)
                free(((ProtobufCBinaryData *)arr)[i].data);
            else if (f->type == PROTOBUF_C_TYPE_MESSAGE)
                protobuf_c_message_free_unpacked(((ProtobufCMessage **)arr)[i], NULL);
        }
        free(arr);
        *(void **)p = NULL;
        *n = 0;
        return;
    }
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
        uint32_t *c = MEMBER(m, f->quantifier_offset);
        const ProtobufCFieldDescriptor *cur = *c ? field_by_id(m->descriptor, *c) : NULL;
        if (cur) {
            free_single(m, cur);
            memset(MEMBER(m, cur->offset), 0, elem_size(cur->type));
        }
        *c = 0;
        return;
    }
    free_single(m, f);
    if (f->default_value && f->type == PROTOBUF_C_TYPE_STRING)
        *(const char **)p = f->default_value;
    else if (f->default_value && f->type != PROTOBUF_C_TYPE_MESSAGE)
        memcpy(p, f->default_value, elem_size(f->type));
    else
        memset(p, 0, elem_size(f->type));
    if (has_flag(f)) *(protobuf_c_boolean *)MEMBER(m, f->quantifier_offset) = 0;
}

/* ---- names: edit distance for suggestions ------------------------------- */

static int lower(int c) {
    return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c;
}

/* Case-insensitive Levenshtein distance; SIZE_MAX when b is too long. */
static size_t edit_distance(const char *a, size_t na, const char *b) {
    size_t nb = strlen(b), row[129];
    if (nb > 128) return SIZE_MAX;
    for (size_t j = 0; j <= nb; j++) row[j] = j;
    for (size_t i = 1; i <= na; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= nb; j++) {
            size_t up = row[j];
            size_t best = diag + (lower((unsigned char)a[i - 1]) != lower((unsigned char)b[j - 1]));
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            if (up + 1 < best) best = up + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[nb];
}

/* Whether b spells the initials of a's words ("lr" for "learning_rate"). */
static int initials_of(const char *a, size_t na, const char *b) {
    size_t k = 0;
    for (size_t i = 0; i < na; i++) {
        if (a[i] == '_' || (i > 0 && a[i - 1] != '_')) continue;
        if (!b[k] || lower((unsigned char)a[i]) != lower((unsigned char)b[k])) return 0;
        k++;
    }
    return k > 1 && !b[k];
}

typedef const char *(*name_at_fn)(const void *d, unsigned i);

static const char *field_name_at(const void *d, unsigned i) {
    return ((const ProtobufCMessageDescriptor *)d)->fields[i].name;
}

static const char *enum_name_at(const void *d, unsigned i) {
    return ((const ProtobufCEnumDescriptor *)d)->values[i].name;
}

/* The known name nearest to name, or NULL when none is close enough to be a
 * plausible typo. */
static const char *nearest(const char *name, size_t n, const void *d, unsigned count,
                           name_at_fn name_at) {
    const char *best = NULL;
    size_t best_d = SIZE_MAX;
    if (n > 128) return NULL; /* no typo; and the distance would be costly */
    for (unsigned i = 0; i < count; i++) {
        const char *cand = name_at(d, i);
        size_t len = strlen(cand);
        size_t dist = initials_of(name, n, cand) ? 0 : edit_distance(name, n, cand);
        size_t limit = len / 3 > 2 ? len / 3 : 2;
        if (dist <= limit && dist < len && dist < best_d) {
            best = cand;
            best_d = dist;
        }
    }
    return best;
}

/* "A, B, C" into b, for error messages. */
static void list_names(strbuf *b, const void *d, unsigned count, name_at_fn name_at) {
    for (unsigned i = 0; i < count; i++) {
        if (i) buf_put(b, ", ", 2);
        buf_put(b, name_at(d, i), strlen(name_at(d, i)));
    }
}

/* ---- UTF-8 --------------------------------------------------------------- */

static void utf8_put(strbuf *b, uint32_t cp) {
    char u[4];
    size_t n = utf8_encode(cp, u);
    for (size_t i = 0; i < n; i++) buf_putc(b, (unsigned char)u[i]);
}

/* ---- tokenizer ----------------------------------------------------------- */

typedef enum { T_EOF, T_IDENT, T_NUMBER, T_STRING, T_SYM } tok_kind;

typedef struct tok {
    tok_kind kind;
    size_t start, len; /* bytes of the token in the text */
    int line, col;
    int sym; /* the byte, for T_SYM */
} tok;

typedef struct parser {
    const char *text;
    size_t len, pos;
    int line;
    size_t line_start;
    const char *source;
    int positions; /* 0 for an override value: errors name only the source */
    err *e;
    pbtext_locs *locs;
    int source_id;
    strbuf path; /* dotted path of the field being read, kept only with locs */
    strbuf str;  /* decoded string literal */
    int depth;
    tok t; /* the current token */
} parser;

static int perr_at(parser *P, int line, int col, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int perr_at(parser *P, int line, int col, const char *fmt, ...) {
    char msg[ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (P->positions) return err_set(P->e, "%s:%d:%d: error: %s", P->source, line, col, msg);
    return err_set(P->e, "%s: error: %s", P->source, msg);
}

#define perr(P, ...) perr_at(P, (P)->t.line, (P)->t.col, __VA_ARGS__)

/* A printable excerpt of n bytes for messages: at most 40, others as '?'. */
static const char *excerpt(const char *s, size_t n, char out[48]) {
    size_t k = 0;
    for (size_t i = 0; i < n && k < 40; i++) {
        unsigned char c = (unsigned char)s[i];
        out[k++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
    }
    if (n > 40) out[k++] = '.', out[k++] = '.', out[k++] = '.';
    out[k] = 0;
    return out;
}

/* Describes a token for "got ..." in messages. */
static const char *describe(const parser *P, const tok *t, char out[80]) {
    char ex[48];
    switch (t->kind) {
    case T_EOF:
        return "end of input";
    case T_IDENT:
        snprintf(out, 80, "\"%s\"", excerpt(P->text + t->start, t->len, ex));
        break;
    case T_NUMBER:
        snprintf(out, 80, "number %s", excerpt(P->text + t->start, t->len, ex));
        break;
    case T_STRING:
        return "a string";
    case T_SYM:
        if (t->sym >= 0x20 && t->sym < 0x7f)
            snprintf(out, 80, "'%c'", t->sym);
        else
            snprintf(out, 80, "byte 0x%02x", (unsigned)t->sym);
        break;
    }
    return out;
}

#define GOT(P) describe(P, &(P)->t, (char[80]){0})

static int is_ident_start(int c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static int is_digit(int c) {
    return c >= '0' && c <= '9';
}

static int is_ident_char(int c) {
    return is_ident_start(c) || is_digit(c);
}

static void newline(parser *P) {
    if (P->line < INT_MAX) P->line++;
    P->line_start = P->pos;
}

static void skip_space(parser *P) {
    while (P->pos < P->len) {
        char c = P->text[P->pos];
        if (c == '\n') {
            P->pos++;
            newline(P);
        } else if (c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f') {
            P->pos++;
        } else if (c == '#') {
            while (P->pos < P->len && P->text[P->pos] != '\n') P->pos++;
        } else {
            break;
        }
    }
}

/* Reads the next token into P->t. Fails only on an unterminated string. */
static int next(parser *P) {
    skip_space(P);
    tok *t = &P->t;
    const char *s = P->text;
    t->start = P->pos;
    t->line = P->line;
    t->col = P->pos - P->line_start < INT_MAX ? (int)(P->pos - P->line_start) + 1 : INT_MAX;
    t->sym = 0;
    if (P->pos >= P->len) {
        t->kind = T_EOF;
        t->len = 0;
        return 0;
    }
    unsigned char c = (unsigned char)s[P->pos];
    if (is_ident_start(c)) {
        while (P->pos < P->len && is_ident_char((unsigned char)s[P->pos])) P->pos++;
        t->kind = T_IDENT;
    } else if (is_digit(c) || (c == '.' && P->pos + 1 < P->len && is_digit(s[P->pos + 1]))) {
        /* One run of number-like bytes; its meaning is decided by the field
         * type, so "12abc" is read whole and refused there. */
        int hex = c == '0' && P->pos + 1 < P->len && (s[P->pos + 1] == 'x' || s[P->pos + 1] == 'X');
        P->pos++;
        while (P->pos < P->len) {
            char d = s[P->pos];
            if (is_ident_char((unsigned char)d) || d == '.')
                P->pos++;
            else if ((d == '+' || d == '-') && !hex &&
                     (s[P->pos - 1] == 'e' || s[P->pos - 1] == 'E'))
                P->pos++;
            else
                break;
        }
        t->kind = T_NUMBER;
    } else if (c == '"' || c == '\'') {
        P->pos++;
        for (;;) {
            if (P->pos >= P->len || s[P->pos] == '\n')
                return perr_at(P, t->line, t->col, "unterminated string: missing closing %c", c);
            char d = s[P->pos++];
            if (d == '\\') {
                if (P->pos < P->len && s[P->pos] != '\n') P->pos++;
            } else if ((unsigned char)d == c) {
                break;
            }
        }
        t->kind = T_STRING;
    } else {
        P->pos++;
        t->kind = T_SYM;
        t->sym = c;
    }
    t->len = P->pos - t->start;
    return 0;
}

static int at_sym(const parser *P, int c) {
    return P->t.kind == T_SYM && P->t.sym == c;
}

/* ---- literals ------------------------------------------------------------ */

static int hex_val(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes the string literal t (quotes, escapes) and appends it to out. */
static int decode_string(parser *P, const tok *t, strbuf *out) {
    const char *s = P->text + t->start;
    size_t end = t->len - 1; /* the closing quote */
    size_t i = 1;
    while (i < end) {
        unsigned char c = (unsigned char)s[i];
        if (c != '\\') {
            buf_putc(out, c);
            i++;
            continue;
        }
        int col = t->col + (int)i;
        i++;
        int e = (unsigned char)s[i++];
        switch (e) {
        case 'n':
            buf_putc(out, '\n');
            break;
        case 't':
            buf_putc(out, '\t');
            break;
        case 'r':
            buf_putc(out, '\r');
            break;
        case 'a':
            buf_putc(out, '\a');
            break;
        case 'b':
            buf_putc(out, '\b');
            break;
        case 'f':
            buf_putc(out, '\f');
            break;
        case 'v':
            buf_putc(out, '\v');
            break;
        case '\\':
        case '\'':
        case '"':
        case '?':
            buf_putc(out, e);
            break;
        case 'x':
        case 'X': {
            int v = 0, k = 0;
            while (k < 2 && i < end && hex_val(s[i]) >= 0) v = v * 16 + hex_val(s[i++]), k++;
            if (!k) return perr_at(P, t->line, col, "bad escape: \\x needs 1 or 2 hex digits");
            buf_putc(out, v);
            break;
        }
        case '0':
        case '1':
        case '2':
        case '3':
        case '4':
        case '5':
        case '6':
        case '7': {
            int v = e - '0', k = 1;
            while (k < 3 && i < end && s[i] >= '0' && s[i] <= '7') v = v * 8 + (s[i++] - '0'), k++;
            if (v > 0377)
                return perr_at(P, t->line, col, "bad escape: octal \\%o is above \\377", v);
            buf_putc(out, v);
            break;
        }
        case 'u':
        case 'U': {
            int digits = e == 'u' ? 4 : 8;
            uint32_t cp = 0;
            for (int k = 0; k < digits; k++, i++) {
                if (i >= end || hex_val(s[i]) < 0)
                    return perr_at(P, t->line, col, "bad escape: \\%c needs %d hex digits", e,
                                   digits);
                cp = cp * 16 + (uint32_t)hex_val(s[i]);
            }
            if (cp >= 0xd800 && cp <= 0xdbff && i + 6 <= end && s[i] == '\\' && s[i + 1] == 'u') {
                /* A UTF-16 surrogate pair written as two escapes. */
                uint32_t lo = 0;
                int ok = 1;
                for (size_t k = i + 2; k < i + 6; k++) {
                    if (hex_val(s[k]) < 0) ok = 0;
                    lo = lo * 16 + (uint32_t)(ok ? hex_val(s[k]) : 0);
                }
                if (ok && lo >= 0xdc00 && lo <= 0xdfff) {
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                    i += 6;
                }
            }
            if ((cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff)
                return perr_at(P, t->line, col,
                               "bad escape: U+%04" PRIX32 " is not a Unicode scalar value", cp);
            utf8_put(out, cp);
            break;
        }
        default:
            if (e >= 0x20 && e < 0x7f)
                return perr_at(P, t->line, col, "bad escape \"\\%c\" in string", e);
            return perr_at(P, t->line, col, "bad escape: backslash before byte 0x%02x", e);
        }
    }
    return 0;
}

/* Reads an unsigned integer literal: decimal, 0x hex or 0 octal. Returns 0
 * with *v, 1 when s is not an integer literal, 2 when it exceeds uint64. */
static int parse_uint_literal(const char *s, size_t n, uint64_t *v, int *base_out) {
    unsigned base = 10;
    size_t i = 0;
    if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        base = 16, i = 2;
    else if (n > 1 && s[0] == '0')
        base = 8, i = 1;
    if (n == 0) return 1;
    uint64_t x = 0;
    int over = 0;
    for (; i < n; i++) {
        int d = hex_val((unsigned char)s[i]);
        if (d < 0 || (unsigned)d >= base) return 1;
        if (x > (UINT64_MAX - (unsigned)d) / base)
            over = 1;
        else
            x = x * base + (unsigned)d;
    }
    if (base_out) *base_out = (int)base;
    if (over) return 2;
    *v = x;
    return 0;
}

/* Whether s is a decimal floating literal: digits, optional fraction and
 * exponent, at least one digit before the exponent. */
static int is_decimal_float(const char *s, size_t n) {
    size_t i = 0, digits = 0;
    while (i < n && is_digit(s[i])) i++, digits++;
    if (i < n && s[i] == '.') {
        i++;
        while (i < n && is_digit(s[i])) i++, digits++;
    }
    if (!digits) return 0;
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        size_t ed = 0;
        while (i < n && is_digit(s[i])) i++, ed++;
        if (!ed) return 0;
    }
    return i == n;
}

/* Parses a number token for a float (is_float) or double field. Returns 0,
 * 1 when not a number, 2 when out of range. */
static int parse_real(const char *s, size_t n, int is_float, double *out) {
    uint64_t u;
    int base = 10;
    int rc = parse_uint_literal(s, n, &u, &base);
    if (rc != 1 && base != 10) {
        if (rc == 2) return 2;
        *out = is_float ? (double)(float)u : (double)u;
        return 0;
    }
    if (n > 1 && (s[n - 1] == 'f' || s[n - 1] == 'F')) n--;
    if (!is_decimal_float(s, n)) return 1;
    char small[128];
    char *tmp = n < sizeof small ? small : malloc(n + 1);
    if (!tmp) return 2;
    memcpy(tmp, s, n);
    tmp[n] = 0;
    double v = is_float ? (double)strtof(tmp, NULL) : strtod(tmp, NULL);
    if (tmp != small) free(tmp);
    if (isinf(v)) return 2;
    *out = v;
    return 0;
}

/* ---- values -------------------------------------------------------------- */

typedef union value {
    int32_t i32;
    uint32_t u32;
    int64_t i64;
    uint64_t u64;
    float f;
    double d;
    protobuf_c_boolean b;
    char *s;
    ProtobufCBinaryData bd;
    ProtobufCMessage *m;
} value;

static void value_free(ProtobufCType t, value *v) {
    if (t == PROTOBUF_C_TYPE_STRING)
        free(v->s);
    else if (t == PROTOBUF_C_TYPE_BYTES)
        free(v->bd.data);
    else if (t == PROTOBUF_C_TYPE_MESSAGE)
        protobuf_c_message_free_unpacked(v->m, NULL);
}

static int oom(parser *P) {
    return perr(P, "out of memory");
}

static int enum_error(parser *P, int line, int col, const ProtobufCFieldDescriptor *f,
                      const char *what, const char *near) {
    const ProtobufCEnumDescriptor *ed = f->descriptor;
    strbuf names = {0};
    list_names(&names, ed, ed->n_values, enum_name_at);
    int rc = perr_at(P, line, col, "%s for field \"%s\" (enum %s);%s%s%s valid values: %s", what,
                     f->name, ed->name, near ? " did you mean \"" : "", near ? near : "",
                     near ? "\"?" : "", names.p ? names.p : "");
    buf_free(&names);
    return rc;
}

/* One or more adjacent string literals into v (a malloc'd string or bytes). */
static int parse_string_value(parser *P, const ProtobufCFieldDescriptor *f, value *v) {
    if (P->t.kind != T_STRING)
        return perr(P, "expected a quoted string for %s field \"%s\", got %s", type_name(f),
                    f->name, GOT(P));
    int line = P->t.line, col = P->t.col;
    P->str.n = 0;
    buf_put(&P->str, "", 0);
    while (P->t.kind == T_STRING) {
        if (decode_string(P, &P->t, &P->str) || next(P)) return -1;
    }
    if (P->str.oom) return oom(P);
    size_t n = P->str.n;
    if (f->type == PROTOBUF_C_TYPE_STRING) {
        if (memchr(P->str.p, 0, n))
            return perr_at(P, line, col,
                           "string field \"%s\" cannot hold a NUL byte (bytes fields can)",
                           f->name);
        if (!utf8_valid(P->str.p, n, NULL))
            return perr_at(P, line, col, "string for field \"%s\" is not valid UTF-8", f->name);
        v->s = malloc(n + 1);
        if (!v->s) return oom(P);
        memcpy(v->s, P->str.p, n + 1);
    } else {
        v->bd.len = n;
        v->bd.data = NULL;
        if (n) {
            v->bd.data = malloc(n);
            if (!v->bd.data) return oom(P);
            memcpy(v->bd.data, P->str.p, n);
        }
    }
    return 0;
}

/* Reads one scalar value (sign included) for field f and advances past it. */
static int parse_scalar(parser *P, const ProtobufCFieldDescriptor *f, value *v) {
    ProtobufCType ty = f->type;
    if (ty == PROTOBUF_C_TYPE_STRING || ty == PROTOBUF_C_TYPE_BYTES)
        return parse_string_value(P, f, v);
    int line = P->t.line, col = P->t.col, neg = 0;
    if (at_sym(P, '-') && ty != PROTOBUF_C_TYPE_BOOL) {
        neg = 1;
        if (next(P)) return -1;
    }
    const tok t = P->t;
    const char *s = P->text + t.start;
    char ex[48];
    switch (ty) {
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumDescriptor *ed = f->descriptor;
        char what[160];
        if (t.kind == T_IDENT && !neg) {
            const ProtobufCEnumValue *ev = NULL;
            for (unsigned i = 0; i < ed->n_values && !ev; i++)
                if (strlen(ed->values[i].name) == t.len && !memcmp(ed->values[i].name, s, t.len))
                    ev = &ed->values[i];
            if (!ev) {
                const char *near = nearest(s, t.len, ed, ed->n_values, enum_name_at);
                snprintf(what, sizeof what, "unknown value \"%s\"", excerpt(s, t.len, ex));
                return enum_error(P, line, col, f, what, near);
            }
            v->i32 = ev->value;
        } else if (t.kind == T_NUMBER) {
            uint64_t u;
            int rc = parse_uint_literal(s, t.len, &u, NULL);
            if (rc == 1)
                return perr_at(P, line, col, "expected a value of enum %s for field \"%s\", got %s",
                               ed->name, f->name, GOT(P));
            int64_t x = rc == 2 || u > (uint64_t)INT32_MAX + neg ? INT64_MAX
                        : neg                                    ? -(int64_t)u
                                                                 : (int64_t)u;
            const ProtobufCEnumValue *ev =
                x == INT64_MAX ? NULL : protobuf_c_enum_descriptor_get_value(ed, (int)x);
            if (!ev) {
                snprintf(what, sizeof what, "%s%s is not a value", neg ? "-" : "",
                         excerpt(s, t.len, ex));
                return enum_error(P, line, col, f, what, NULL);
            }
            v->i32 = ev->value;
        } else {
            return perr_at(P, line, col, "expected a value of enum %s for field \"%s\", got %s",
                           ed->name, f->name, GOT(P));
        }
        break;
    }
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: {
        int is64 = elem_size(ty) == 8;
        int is_signed = ty == PROTOBUF_C_TYPE_INT32 || ty == PROTOBUF_C_TYPE_SINT32 ||
                        ty == PROTOBUF_C_TYPE_SFIXED32 || ty == PROTOBUF_C_TYPE_INT64 ||
                        ty == PROTOBUF_C_TYPE_SINT64 || ty == PROTOBUF_C_TYPE_SFIXED64;
        uint64_t u = 0;
        int rc = t.kind == T_NUMBER ? parse_uint_literal(s, t.len, &u, NULL) : 1;
        if (rc == 1)
            return perr_at(P, line, col, "expected an integer for %s field \"%s\", got %s",
                           type_name(f), f->name, GOT(P));
        uint64_t pos_max =
            is_signed ? (is64 ? INT64_MAX : INT32_MAX) : (is64 ? UINT64_MAX : UINT32_MAX);
        uint64_t neg_max =
            is_signed ? (is64 ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT32_MAX + 1) : 0;
        if (rc == 2 || u > (neg ? neg_max : pos_max)) {
            char lo[32], hi[32];
            if (is_signed)
                snprintf(lo, sizeof lo, "%" PRId64, is64 ? INT64_MIN : (int64_t)INT32_MIN);
            else
                snprintf(lo, sizeof lo, "0");
            snprintf(hi, sizeof hi, "%" PRIu64, pos_max);
            return perr_at(P, line, col, "%s%s is out of range for %s field \"%s\" (%s to %s)",
                           neg ? "-" : "", excerpt(s, t.len, ex), type_name(f), f->name, lo, hi);
        }
        int64_t x = neg ? (u == 0 ? 0 : -(int64_t)(u - 1) - 1) : (int64_t)u;
        if (is64)
            v->u64 = is_signed ? (uint64_t)x : u;
        else if (is_signed)
            v->i32 = (int32_t)x;
        else
            v->u32 = (uint32_t)u;
        break;
    }
    case PROTOBUF_C_TYPE_FLOAT:
    case PROTOBUF_C_TYPE_DOUBLE: {
        int is_float = ty == PROTOBUF_C_TYPE_FLOAT;
        double d = 0;
        if (t.kind == T_IDENT) {
            char w[16] = {0};
            for (size_t i = 0; i < t.len && i < sizeof w - 1; i++) w[i] = (char)lower(s[i]);
            if (t.len < sizeof w && (!strcmp(w, "inf") || !strcmp(w, "infinity")))
                d = INFINITY;
            else if (t.len < sizeof w && !strcmp(w, "nan"))
                d = NAN;
            else
                return perr_at(P, line, col, "expected a number for %s field \"%s\", got %s",
                               type_name(f), f->name, GOT(P));
        } else if (t.kind == T_NUMBER) {
            int rc = parse_real(s, t.len, is_float, &d);
            if (rc == 1)
                return perr_at(P, line, col, "expected a number for %s field \"%s\", got %s",
                               type_name(f), f->name, GOT(P));
            if (rc == 2)
                return perr_at(P, line, col, "%s%s is out of range for %s field \"%s\"",
                               neg ? "-" : "", excerpt(s, t.len, ex), type_name(f), f->name);
        } else {
            return perr_at(P, line, col, "expected a number for %s field \"%s\", got %s",
                           type_name(f), f->name, GOT(P));
        }
        if (neg) d = -d;
        if (is_float)
            v->f = (float)d;
        else
            v->d = d;
        break;
    }
    case PROTOBUF_C_TYPE_BOOL: {
        int b = -1;
        if (t.kind == T_IDENT) {
            static const char *const yes[] = {"true", "True", "t"}, *const no[] = {"false", "False",
                                                                                   "f"};
            for (int i = 0; i < 3; i++) {
                if (strlen(yes[i]) == t.len && !memcmp(s, yes[i], t.len)) b = 1;
                if (strlen(no[i]) == t.len && !memcmp(s, no[i], t.len)) b = 0;
            }
        } else if (t.kind == T_NUMBER && t.len == 1 && (s[0] == '0' || s[0] == '1')) {
            b = s[0] == '1';
        }
        if (b < 0)
            return perr_at(P, line, col, "expected true or false for bool field \"%s\", got %s",
                           f->name, GOT(P));
        v->b = b;
        break;
    }
    default:
        return perr_at(P, line, col, "field \"%s\" holds a message, not a value", f->name);
    }
    return next(P);
}

/* ---- messages ------------------------------------------------------------ */

/* What one message body being read keeps: where each field was first set
 * (line 0: not yet) and the allocated length of each repeated array. */
typedef struct frame {
    ProtobufCMessage *msg;
    const ProtobufCMessageDescriptor *d;
    int *set_line, *set_col;
    size_t *cap;
    size_t path_len; /* length of the message's own path in P->path */
} frame;

static int frame_init(parser *P, frame *F, ProtobufCMessage *msg) {
    unsigned n = msg->descriptor->n_fields;
    F->msg = msg;
    F->d = msg->descriptor;
    F->set_line = calloc(n ? n : 1, sizeof(int));
    F->set_col = calloc(n ? n : 1, sizeof(int));
    F->cap = calloc(n ? n : 1, sizeof(size_t));
    F->path_len = P->path.n;
    if (!F->set_line || !F->set_col || !F->cap) return oom(P);
    return 0;
}

static void frame_free(frame *F) {
    free(F->set_line);
    free(F->set_col);
    free(F->cap);
}

/* Stores v into field f of the frame's message: appended to a repeated
 * field, selected in a oneof, or set with its has_ flag. Takes ownership of
 * v's allocations on success only. */
static int store_value(parser *P, frame *F, const ProtobufCFieldDescriptor *f, const value *v) {
    ProtobufCMessage *m = F->msg;
    void *dst = MEMBER(m, f->offset);
    size_t es = elem_size(f->type);
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
        size_t *n = MEMBER(m, f->quantifier_offset);
        void **arr = dst;
        size_t i = (size_t)(f - F->d->fields);
        if (*n >= F->cap[i]) {
            size_t cap = F->cap[i] ? 2 * F->cap[i] : 4;
            if (cap < *n + 1) cap = *n + 1;
            void *a = cap < SIZE_MAX / es ? realloc(*arr, cap * es) : NULL;
            if (!a) return oom(P);
            *arr = a;
            F->cap[i] = cap;
        }
        memcpy((char *)*arr + *n * es, v, es);
        (*n)++;
        return 0;
    }
    memcpy(dst, v, es);
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
        *(uint32_t *)MEMBER(m, f->quantifier_offset) = f->id;
    else if (has_flag(f))
        *(protobuf_c_boolean *)MEMBER(m, f->quantifier_offset) = 1;
    return 0;
}

static int path_push(parser *P, const char *s, size_t n) {
    if (!P->locs) return 0;
    if ((P->path.n && buf_putc(&P->path, '.')) || buf_put(&P->path, s, n)) return oom(P);
    return 0;
}

static void path_pop(parser *P, size_t len) {
    if (!P->locs) return;
    P->path.n = len;
    if (P->path.p) P->path.p[len] = 0;
}

static int record(parser *P, int line, int col) {
    if (!P->locs) return 0;
    if (locs_add(P->locs, P->path.p ? P->path.p : "", P->path.n, P->source_id,
                 P->positions ? line : 0, P->positions ? col : 0))
        return oom(P);
    return 0;
}

/* Checks that field f may be set once more in this message (a non-repeated
 * field only once, one member per oneof), remembers where, and extends the
 * path with its name. */
static int begin_field(parser *P, frame *F, const ProtobufCFieldDescriptor *f, int line, int col) {
    unsigned i = (unsigned)(f - F->d->fields);
    if (f->label != PROTOBUF_C_LABEL_REPEATED && F->set_line[i]) {
        if (P->positions)
            return perr_at(P, line, col, "field \"%s\" is set twice (first at %d:%d)", f->name,
                           F->set_line[i], F->set_col[i]);
        return perr_at(P, line, col, "field \"%s\" is set twice", f->name);
    }
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
        uint32_t c = *(const uint32_t *)MEMBER(F->msg, f->quantifier_offset);
        const ProtobufCFieldDescriptor *other = c && c != f->id ? field_by_id(F->d, c) : NULL;
        if (other)
            return perr_at(P, line, col,
                           "\"%s\" and \"%s\" are members of the same oneof of %s; set only one",
                           other->name, f->name, F->d->name);
    }
    int first = !F->set_line[i];
    if (first) F->set_line[i] = line, F->set_col[i] = col;
    if (path_push(P, f->name, strlen(f->name))) return -1;
    if (first && record(P, line, col)) return -1;
    return 0;
}

static int parse_body(parser *P, ProtobufCMessage *msg, int close, int open_line, int open_col,
                      const char *open_name);

/* One value of field f (one element of a repeated field). */
static int parse_element(parser *P, frame *F, const ProtobufCFieldDescriptor *f) {
    size_t field_path = P->path.n;
    if (f->label == PROTOBUF_C_LABEL_REPEATED && P->locs) {
        char idx[32];
        snprintf(idx, sizeof idx, "[%zu]", *(const size_t *)MEMBER(F->msg, f->quantifier_offset));
        if (buf_put(&P->path, idx, strlen(idx))) return oom(P);
        if (record(P, P->t.line, P->t.col)) return -1;
    }
    value v;
    memset(&v, 0, sizeof v);
    if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
        if (!at_sym(P, '{') && !at_sym(P, '<'))
            return perr(P, "expected '{' to start message \"%s\", got %s", f->name, GOT(P));
        int close = P->t.sym == '{' ? '}' : '>', line = P->t.line, col = P->t.col;
        if (P->depth >= PBTEXT_MAX_DEPTH)
            return perr(P, "messages nested deeper than %d levels", PBTEXT_MAX_DEPTH);
        if (next(P)) return -1;
        v.m = msg_new(f->descriptor);
        if (!v.m) return oom(P);
        /* Attached before it is filled, so that on error freeing the root
         * frees it too. */
        if (store_value(P, F, f, &v)) {
            value_free(f->type, &v);
            return -1;
        }
        P->depth++;
        int rc = parse_body(P, v.m, close, line, col, f->name);
        P->depth--;
        if (rc || next(P)) return -1;
    } else {
        if (parse_scalar(P, f, &v)) return -1;
        if (store_value(P, F, f, &v)) {
            value_free(f->type, &v);
            return -1;
        }
    }
    path_pop(P, field_path);
    return 0;
}

/* The value part of a field: one element, or for a repeated field a
 * `[a, b]` list. */
static int parse_values(parser *P, frame *F, const ProtobufCFieldDescriptor *f) {
    if (!at_sym(P, '[')) return parse_element(P, F, f);
    if (f->label != PROTOBUF_C_LABEL_REPEATED)
        return perr(P, "field \"%s\" is not repeated; a list [...] needs a repeated field",
                    f->name);
    if (next(P)) return -1;
    if (at_sym(P, ']')) return next(P);
    for (;;) {
        if (parse_element(P, F, f)) return -1;
        if (at_sym(P, ',')) {
            if (next(P)) return -1;
            continue;
        }
        if (at_sym(P, ']')) return next(P);
        return perr(P, "expected ',' or ']' in the list of \"%s\", got %s", f->name, GOT(P));
    }
}

static int unknown_field(parser *P, const ProtobufCMessageDescriptor *d, const char *name, size_t n,
                         int line, int col) {
    char ex[48];
    const char *near = nearest(name, n, d, d->n_fields, field_name_at);
    if (near)
        return perr_at(P, line, col, "unknown field \"%s\" in %s; did you mean \"%s\"?",
                       excerpt(name, n, ex), d->name, near);
    strbuf names = {0};
    list_names(&names, d, d->n_fields, field_name_at);
    int rc = perr_at(P, line, col, "unknown field \"%s\" in %s; its fields are: %s",
                     excerpt(name, n, ex), d->name, names.p ? names.p : "(none)");
    buf_free(&names);
    return rc;
}

/* NAME [:] VALUE [,;] */
static int parse_field(parser *P, frame *F) {
    const tok name = P->t;
    if (at_sym(P, '[')) return perr(P, "extension and Any fields ([...]) are not supported");
    if (name.kind != T_IDENT) return perr(P, "expected a field name, got %s", GOT(P));
    const ProtobufCFieldDescriptor *f = find_field(F->d, P->text + name.start, name.len);
    if (!f) return unknown_field(P, F->d, P->text + name.start, name.len, name.line, name.col);
    if (begin_field(P, F, f, name.line, name.col) || next(P)) return -1;
    if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
        if (at_sym(P, ':') && next(P)) return -1;
        if (!at_sym(P, '{') && !at_sym(P, '<') && !at_sym(P, '['))
            return perr(P, "expected '{' after \"%s\", got %s", f->name, GOT(P));
    } else {
        if (!at_sym(P, ':'))
            return perr(P, "expected ':' after field name \"%s\", got %s", f->name, GOT(P));
        if (next(P)) return -1;
    }
    if (parse_values(P, F, f)) return -1;
    path_pop(P, F->path_len);
    if ((at_sym(P, ',') || at_sym(P, ';')) && next(P)) return -1;
    return 0;
}

/* Fields up to `close` ('}', '>', or 0 for the end of input), which is left
 * as the current token. */
static int parse_body(parser *P, ProtobufCMessage *msg, int close, int open_line, int open_col,
                      const char *open_name) {
    frame F;
    int rc = -1;
    if (frame_init(P, &F, msg)) goto out;
    for (;;) {
        if (close && at_sym(P, close)) break;
        if (P->t.kind == T_EOF) {
            if (!close) break;
            if (P->positions)
                perr(P, "expected '%c' to close \"%s\" opened at %d:%d, got end of input", close,
                     open_name, open_line, open_col);
            else
                perr(P, "expected '%c' to close \"%s\", got end of input", close, open_name);
            goto out;
        }
        if (parse_field(P, &F)) goto out;
    }
    for (unsigned i = 0; i < F.d->n_fields; i++) {
        if (F.d->fields[i].label == PROTOBUF_C_LABEL_REQUIRED && !F.set_line[i]) {
            perr(P, "missing required field \"%s\" of %s", F.d->fields[i].name, F.d->name);
            goto out;
        }
    }
    rc = 0;
out:
    frame_free(&F);
    return rc;
}

static void parser_init(parser *P, const char *text, size_t len, const char *source, err *e) {
    memset(P, 0, sizeof *P);
    P->text = text;
    P->len = len;
    P->line = 1;
    P->source = source;
    P->positions = 1;
    P->e = e;
}

static void parser_free(parser *P) {
    buf_free(&P->path);
    buf_free(&P->str);
    pbtext_locs_free(P->locs);
}

/* Gives the parser its own locations (merged into the caller's only on
 * success, so a failed parse records nothing). */
static int parser_locs(parser *P, pbtext_locs *want) {
    if (!want) return 0;
    P->locs = pbtext_locs_new();
    if (!P->locs || (P->source_id = locs_source(P->locs, P->source)) < 0) return oom(P);
    return buf_put(&P->path, "", 0) ? oom(P) : 0;
}

int pbtext_parse(const ProtobufCMessageDescriptor *desc, const char *text, size_t len,
                 const char *source, ProtobufCMessage **out, pbtext_locs *locs, err *e) {
    parser P;
    parser_init(&P, text, len, source ? source : "<input>", e);
    *out = NULL;
    ProtobufCMessage *msg = msg_new(desc);
    int rc = -1;
    if (!msg) {
        oom(&P);
    } else if (!parser_locs(&P, locs) && !next(&P) && !parse_body(&P, msg, 0, 0, 0, "")) {
        if (locs && locs_merge(locs, P.locs))
            oom(&P);
        else
            rc = 0;
    }
    if (rc == 0)
        *out = msg;
    else
        protobuf_c_message_free_unpacked(msg, NULL);
    parser_free(&P);
    return rc;
}

int pbtext_parse_file(const ProtobufCMessageDescriptor *desc, const char *path,
                      ProtobufCMessage **out, pbtext_locs *locs, err *e) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return err_errno(e, "%s: error: cannot read", path);
    char *text;
    size_t len;
    int rc = fs_read_stream(f, 0, &text, &len, e);
    int saved = errno;
    fclose(f);
    errno = saved;
    if (rc < 0 && saved == ENOMEM)
        return err_set(e, "%s: error: out of memory reading the file", path);
    if (rc < 0) return err_errno(e, "%s: error: cannot read", path);
    rc = pbtext_parse(desc, text, len, path, out, locs, e);
    free(text);
    return rc;
}

/* ---- overrides ----------------------------------------------------------- */

/* The submessage in field f of m, created (and for a oneof member,
 * selected, freeing the old member) when absent. NULL when out of memory. */
static ProtobufCMessage *get_or_create(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f) {
    ProtobufCMessage **p = MEMBER(m, f->offset);
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
        uint32_t *c = MEMBER(m, f->quantifier_offset);
        if (*c == f->id && *p) return *p;
        clear_field(m, f);
    } else if (*p && (const void *)*p != f->default_value) {
        return *p;
    }
    ProtobufCMessage *sub = msg_new(f->descriptor);
    if (!sub) return NULL;
    *p = sub;
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
        *(uint32_t *)MEMBER(m, f->quantifier_offset) = f->id;
    return sub;
}

/* Moves field f from src to dst (same descriptor), replacing what dst held. */
static void move_field(ProtobufCMessage *dst, ProtobufCMessage *src,
                       const ProtobufCFieldDescriptor *f) {
    size_t sz = f->label == PROTOBUF_C_LABEL_REPEATED ? sizeof(void *) : elem_size(f->type);
    clear_field(dst, f);
    memcpy(MEMBER(dst, f->offset), MEMBER(src, f->offset), sz);
    memset(MEMBER(src, f->offset), 0, sz);
    if (f->label == PROTOBUF_C_LABEL_REPEATED || (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) ||
        has_flag(f)) {
        size_t qs = f->label == PROTOBUF_C_LABEL_REPEATED      ? sizeof(size_t)
                    : (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) ? sizeof(uint32_t)
                                                               : sizeof(protobuf_c_boolean);
        memcpy(MEMBER(dst, f->quantifier_offset), MEMBER(src, f->quantifier_offset), qs);
        memset(MEMBER(src, f->quantifier_offset), 0, qs);
    }
}

/* The unquoted-text form of a string or bytes override. */
static int raw_string_value(parser *P, const ProtobufCFieldDescriptor *f, const char *s, value *v) {
    size_t n = strlen(s);
    if (f->type == PROTOBUF_C_TYPE_STRING) {
        if (!utf8_valid(s, n, NULL))
            return perr(P, "value for string field \"%s\" is not valid UTF-8", f->name);
        v->s = strdup(s);
        if (!v->s) return oom(P);
    } else {
        v->bd.len = n;
        v->bd.data = n ? malloc(n) : NULL;
        if (n && !v->bd.data) return oom(P);
        if (n) memcpy(v->bd.data, s, n);
    }
    return 0;
}

int pbtext_set_at(ProtobufCMessage *msg, const char *assignment, const char *label,
                  pbtext_locs *locs, err *e) {
    if (!label) label = assignment;
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        return err_set(e, "%s: error: expected PATH=VALUE, e.g. optimizer.lr=3e-4", label);
    const char *path_end = eq;
    while (path_end > assignment && (path_end[-1] == ' ' || path_end[-1] == '\t')) path_end--;

    parser P;
    parser_init(&P, eq + 1, strlen(eq + 1), label, e);
    P.positions = 0;

    /* Resolve the path through descriptors first, so that a bad path or
     * value leaves msg untouched. */
    const ProtobufCFieldDescriptor *chain[PBTEXT_MAX_DEPTH];
    int depth = 0;
    const ProtobufCMessageDescriptor *d = msg->descriptor;
    const char *p = assignment, *last = assignment;
    for (;;) {
        const char *end = p;
        while (end < path_end && *end != '.') end++;
        if (end == p || !is_ident_start((unsigned char)*p))
            return err_set(e, "%s: error: \"%.*s\" is not a field path", label,
                           (int)(path_end - assignment), assignment);
        for (const char *c = p; c < end; c++)
            if (!is_ident_char((unsigned char)*c))
                return err_set(e, "%s: error: \"%.*s\" is not a field path", label,
                               (int)(path_end - assignment), assignment);
        if (depth == PBTEXT_MAX_DEPTH)
            return err_set(e, "%s: error: path deeper than %d fields", label, PBTEXT_MAX_DEPTH);
        const ProtobufCFieldDescriptor *f = find_field(d, p, (size_t)(end - p));
        if (!f) return unknown_field(&P, d, p, (size_t)(end - p), 0, 0);
        chain[depth++] = f;
        last = p;
        if (end == path_end) break;
        if (f->type != PROTOBUF_C_TYPE_MESSAGE)
            return err_set(e, "%s: error: \"%s\" is a %s field of %s; a path cannot go inside it",
                           label, f->name, type_name(f), d->name);
        if (f->label == PROTOBUF_C_LABEL_REPEATED)
            return err_set(e,
                           "%s: error: \"%s\" is a repeated field of %s; a path cannot go inside "
                           "it (replace it whole with %s=[...])",
                           label, f->name, d->name, f->name);
        d = f->descriptor;
        p = end + 1;
    }
    const ProtobufCFieldDescriptor *f = chain[depth - 1];

    /* The value goes into a scratch message of the parent's type first. */
    int rc = -1;
    frame F = {0};
    ProtobufCMessage *tmp = msg_new(d);
    if (!tmp) {
        oom(&P);
        goto out;
    }
    if (parser_locs(&P, locs)) goto out;
    if (P.locs &&
        buf_put(&P.path, assignment, (size_t)(last > assignment ? last - 1 - assignment : 0))) {
        oom(&P);
        goto out;
    }
    const char *val = eq + 1;
    while (*val == ' ' || *val == '\t') val++;
    int is_str = f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_BYTES;
    if (!*val) {
        /* Nothing after '=': tmp holds the field unset, and moving it below
         * clears the field (its default applies again). */
    } else if (frame_init(&P, &F, tmp) || begin_field(&P, &F, f, 1, 1)) {
        goto out;
    } else if (is_str && *val != '"' && *val != '\'' &&
               !(*val == '[' && f->label == PROTOBUF_C_LABEL_REPEATED)) {
        value v;
        if (f->label == PROTOBUF_C_LABEL_REPEATED && P.locs &&
            (buf_put(&P.path, "[0]", 3) || record(&P, 0, 0))) {
            oom(&P);
            goto out;
        }
        if (raw_string_value(&P, f, eq + 1, &v)) goto out;
        if (store_value(&P, &F, f, &v)) {
            value_free(f->type, &v);
            goto out;
        }
    } else {
        if (next(&P) || parse_values(&P, &F, f)) goto out;
        if (P.t.kind != T_EOF) {
            perr(&P, "unexpected %s after the value of \"%s\"", GOT(&P), f->name);
            goto out;
        }
    }

    ProtobufCMessage *cur = msg;
    for (int i = 0; i < depth - 1; i++) {
        const ProtobufCFieldDescriptor *step = chain[i];
        if (locs && (step->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)) {
            /* Selecting another member forgets where the old one was set. */
            uint32_t c = *(const uint32_t *)MEMBER(cur, step->quantifier_offset);
            const ProtobufCFieldDescriptor *old =
                c && c != step->id ? field_by_id(cur->descriptor, c) : NULL;
            if (old) {
                strbuf op = {0};
                const char *seg = assignment;
                for (int k = 0; k < i; k++) seg = strchr(seg, '.') + 1;
                buf_put(&op, assignment, (size_t)(seg - assignment));
                buf_put(&op, old->name, strlen(old->name));
                if (!op.oom) locs_drop(locs, op.p, op.n);
                buf_free(&op);
            }
        }
        cur = get_or_create(cur, step);
        if (!cur) {
            oom(&P);
            goto out;
        }
    }
    if (locs && (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)) {
        uint32_t c = *(const uint32_t *)MEMBER(cur, f->quantifier_offset);
        const ProtobufCFieldDescriptor *old =
            c && c != f->id ? field_by_id(cur->descriptor, c) : NULL;
        if (old) {
            strbuf op = {0};
            buf_put(&op, assignment, (size_t)(last - assignment));
            buf_put(&op, old->name, strlen(old->name));
            if (!op.oom) locs_drop(locs, op.p, op.n);
            buf_free(&op);
        }
    }
    move_field(cur, tmp, f);
    rc = 0;
    if (locs) {
        locs_drop(locs, assignment, (size_t)(path_end - assignment));
        if (locs_merge(locs, P.locs)) rc = oom(&P);
    }
out:
    frame_free(&F);
    if (tmp) protobuf_c_message_free_unpacked(tmp, NULL);
    parser_free(&P);
    return rc;
}

int pbtext_set(ProtobufCMessage *msg, const char *assignment, err *e) {
    return pbtext_set_at(msg, assignment, NULL, NULL, e);
}

/* ---- writer -------------------------------------------------------------- */

typedef struct writer {
    pbtext_write_fn fn;
    void *ctx;
} writer;

static void w_put(writer *w, const char *s, size_t n) {
    if (n) w->fn(w->ctx, s, n);
}

static void w_str(writer *w, const char *s) {
    w_put(w, s, strlen(s));
}

static void w_indent(writer *w, int depth) {
    for (int i = 0; i < depth; i++) w_put(w, "  ", 2);
}

/* A quoted literal; with utf8, valid UTF-8 sequences stay as they are. */
static void w_quoted(writer *w, const unsigned char *s, size_t n, int utf8) {
    w_put(w, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        char esc[8];
        size_t k;
        if (c == '"') {
            w_put(w, "\\\"", 2);
        } else if (c == '\\') {
            w_put(w, "\\\\", 2);
        } else if (c == '\n') {
            w_put(w, "\\n", 2);
        } else if (c == '\r') {
            w_put(w, "\\r", 2);
        } else if (c == '\t') {
            w_put(w, "\\t", 2);
        } else if (c >= 0x20 && c < 0x7f) {
            w_put(w, (const char *)s + i, 1);
        } else if (c >= 0x80 && utf8 && (k = utf8_valid_at(s + i, n - i)) > 0) {
            w_put(w, (const char *)s + i, k);
            i += k;
            continue;
        } else {
            /* Always three digits, so a following digit is not swallowed. */
            snprintf(esc, sizeof esc, "\\%03o", c);
            w_put(w, esc, 4);
        }
        i++;
    }
    w_put(w, "\"", 1);
}

static int reads_back(const char *text, double v, int is_float) {
    return is_float ? strtof(text, NULL) == (float)v : strtod(text, NULL) == v;
}

/* The shortest %g form that reads back to the same value, written without
 * an exponent for magnitudes from 1 to 1e16 ("1000", not "1e+03"). */
static void fmt_real(char *out, size_t n, double v, int is_float) {
    if (isnan(v)) {
        snprintf(out, n, "%s", signbit(v) ? "-nan" : "nan");
        return;
    }
    if (isinf(v)) {
        snprintf(out, n, "%s", v < 0 ? "-inf" : "inf");
        return;
    }
    int max = is_float ? 9 : 17, p = 1;
    for (; p <= max; p++) {
        snprintf(out, n, "%.*g", p, v);
        if (reads_back(out, v, is_float)) break;
    }
    const char *e = strchr(out, 'e');
    int exp10 = e ? atoi(e + 1) : -1;
    if (exp10 >= 0 && exp10 < 16) {
        char plain[64];
        snprintf(plain, sizeof plain, "%.*g", exp10 + 1, v);
        if (reads_back(plain, v, is_float)) snprintf(out, n, "%s", plain);
    }
}

static void w_value(writer *w, const ProtobufCFieldDescriptor *f, const void *p) {
    char b[64];
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
        snprintf(b, sizeof b, "%" PRId32, *(const int32_t *)p);
        break;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        snprintf(b, sizeof b, "%" PRIu32, *(const uint32_t *)p);
        break;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        snprintf(b, sizeof b, "%" PRId64, *(const int64_t *)p);
        break;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        snprintf(b, sizeof b, "%" PRIu64, *(const uint64_t *)p);
        break;
    case PROTOBUF_C_TYPE_FLOAT:
        fmt_real(b, sizeof b, *(const float *)p, 1);
        break;
    case PROTOBUF_C_TYPE_DOUBLE:
        fmt_real(b, sizeof b, *(const double *)p, 0);
        break;
    case PROTOBUF_C_TYPE_BOOL:
        snprintf(b, sizeof b, "%s", *(const protobuf_c_boolean *)p ? "true" : "false");
        break;
    case PROTOBUF_C_TYPE_ENUM: {
        int32_t v = *(const int32_t *)p;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);
        if (ev) {
            w_str(w, ev->name);
            return;
        }
        snprintf(b, sizeof b, "%" PRId32, v);
        break;
    }
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(const char *const *)p;
        w_quoted(w, (const unsigned char *)(s ? s : ""), s ? strlen(s) : 0, 1);
        return;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *bd = p;
        w_quoted(w, bd->data ? bd->data : (const unsigned char *)"", bd->data ? bd->len : 0, 0);
        return;
    }
    case PROTOBUF_C_TYPE_MESSAGE:
        return;
    }
    w_str(w, b);
}

/* Whether a non-repeated field would be packed, i.e. is present. */
static int present(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f) {
    const void *p = CMEMBER(m, f->offset);
    int ptr_type = f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_MESSAGE;
    const void *ptr = ptr_type ? *(const void *const *)p : NULL;
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
        if (*(const uint32_t *)CMEMBER(m, f->quantifier_offset) != f->id) return 0;
        return !ptr_type || (ptr && ptr != f->default_value);
    }
    switch (f->label) {
    case PROTOBUF_C_LABEL_REQUIRED:
        return f->type != PROTOBUF_C_TYPE_MESSAGE || ptr;
    case PROTOBUF_C_LABEL_OPTIONAL:
        if (ptr_type) return ptr && ptr != f->default_value;
        return *(const protobuf_c_boolean *)CMEMBER(m, f->quantifier_offset);
    case PROTOBUF_C_LABEL_NONE:
        /* proto3 implicit presence: zero values are not packed. */
        switch (f->type) {
        case PROTOBUF_C_TYPE_STRING:
            return ptr && *(const char *)ptr;
        case PROTOBUF_C_TYPE_MESSAGE:
            return ptr != NULL;
        case PROTOBUF_C_TYPE_BYTES:
            return ((const ProtobufCBinaryData *)p)->len > 0;
        case PROTOBUF_C_TYPE_FLOAT:
            return *(const float *)p != 0;
        case PROTOBUF_C_TYPE_DOUBLE:
            return *(const double *)p != 0;
        default: {
            static const char zero[8];
            return memcmp(p, zero, elem_size(f->type)) != 0;
        }
        }
    case PROTOBUF_C_LABEL_REPEATED:
        return 0;
    }
    return 0;
}

static void w_message(writer *w, const ProtobufCMessage *m, int depth);

static void w_block(writer *w, const char *name, const ProtobufCMessage *sub, int depth) {
    w_indent(w, depth);
    w_str(w, name);
    w_put(w, " {\n", 3);
    w_message(w, sub, depth + 1);
    w_indent(w, depth);
    w_put(w, "}\n", 2);
}

static void w_message(writer *w, const ProtobufCMessage *m, int depth) {
    const ProtobufCMessageDescriptor *d = m->descriptor;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        const void *p = CMEMBER(m, f->offset);
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)CMEMBER(m, f->quantifier_offset);
            const char *arr = *(const char *const *)p;
            if (!n || !arr) continue;
            if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
                for (size_t j = 0; j < n; j++) {
                    const ProtobufCMessage *sub = ((const ProtobufCMessage *const *)arr)[j];
                    if (sub) w_block(w, f->name, sub, depth);
                }
                continue;
            }
            size_t es = elem_size(f->type);
            w_indent(w, depth);
            w_str(w, f->name);
            w_put(w, ": [", 3);
            for (size_t j = 0; j < n; j++) {
                if (j) w_put(w, ", ", 2);
                w_value(w, f, arr + j * es);
            }
            w_put(w, "]\n", 2);
            continue;
        }
        if (!present(m, f)) continue;
        if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
            w_block(w, f->name, *(const ProtobufCMessage *const *)p, depth);
            continue;
        }
        w_indent(w, depth);
        w_str(w, f->name);
        w_put(w, ": ", 2);
        w_value(w, f, p);
        w_put(w, "\n", 1);
    }
}

void pbtext_write(const ProtobufCMessage *msg, pbtext_write_fn fn, void *ctx) {
    writer w = {fn, ctx};
    w_message(&w, msg, 0);
}

static void buf_sink(void *ctx, const char *data, size_t n) {
    buf_put(ctx, data, n);
}

int pbtext_print(const ProtobufCMessage *msg, char **out, err *e) {
    strbuf b = {0};
    buf_put(&b, "", 0);
    pbtext_write(msg, buf_sink, &b);
    if (b.oom) {
        buf_free(&b);
        *out = NULL;
        return err_set(e, "printing %s: out of memory", msg->descriptor->name);
    }
    *out = b.p;
    return 0;
}

int pbtext_equal(const ProtobufCMessage *a, const ProtobufCMessage *b) {
    if (a->descriptor != b->descriptor) return 0;
    size_t na = protobuf_c_message_get_packed_size(a), nb = protobuf_c_message_get_packed_size(b);
    if (na != nb) return 0;
    uint8_t *pa = malloc(na ? na : 1), *pb = malloc(nb ? nb : 1);
    int eq = 0;
    if (pa && pb) {
        protobuf_c_message_pack(a, pa);
        protobuf_c_message_pack(b, pb);
        eq = !memcmp(pa, pb, na);
    }
    free(pa);
    free(pb);
    return eq;
}
