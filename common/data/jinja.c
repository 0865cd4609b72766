/* The Jinja interpreter of jinja.h: a lexer that applies the whitespace
 * rules (trim_blocks, lstrip_blocks, - controls), a recursive-descent
 * parser into a tree of nodes, and a tree walker over jansson values with
 * Python's semantics where templates rely on them (truthiness, str(),
 * equality, slicing by code point). */
#include "data/jinja.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/utf8.h"

/* ---- buffers ------------------------------------------------------------ */

typedef struct {
    char *p;
    size_t n, cap;
} jbuf;

static int jb_put(jbuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (c < b->n + n + 1) c *= 2;
        char *q = realloc(b->p, c);
        if (!q) return -1;
        b->p = q;
        b->cap = c;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
    return 0;
}

static int jb_puts(jbuf *b, const char *s) {
    return jb_put(b, s, strlen(s));
}

/* ---- lexer -------------------------------------------------------------- */

typedef enum {
    T_TEXT,
    T_VAR_BEGIN,
    T_VAR_END,
    T_BLOCK_BEGIN,
    T_BLOCK_END,
    T_NAME,
    T_STRING,
    T_INT,
    T_FLOAT,
    T_OP,
    T_EOF
} tkind;

typedef struct {
    tkind kind;
    char *s; /* text, name, string value (unescaped) or operator */
    size_t n;
    long long i;
    double f;
    int line;
} token;

typedef struct {
    token *v;
    size_t n, cap;
} tokvec;

static int tv_push(tokvec *tv, token t) {
    if (tv->n == tv->cap) {
        size_t c = tv->cap ? 2 * tv->cap : 64;
        token *q = realloc(tv->v, c * sizeof *q);
        if (!q) return -1;
        tv->v = q;
        tv->cap = c;
    }
    tv->v[tv->n++] = t;
    return 0;
}

static int is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

static int line_of(const char *src, size_t at) {
    int l = 1;
    for (size_t i = 0; i < at; i++) l += src[i] == '\n';
    return l;
}

/* Tokens of one tag's inside, src[a..b). */
static int lex_inside(const char *src, size_t a, size_t b, tokvec *tv, err *e) {
    size_t i = a;
    while (i < b) {
        char c = src[i];
        if (is_space(c)) {
            i++;
            continue;
        }
        token t = {.line = line_of(src, i)};
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_') {
            size_t j = i;
            while (j < b && ((src[j] >= 'a' && src[j] <= 'z') || (src[j] >= 'A' && src[j] <= 'Z') ||
                             src[j] == '_' || (src[j] >= '0' && src[j] <= '9')))
                j++;
            t.kind = T_NAME;
            t.s = strndup(src + i, j - i);
            t.n = j - i;
            i = j;
        } else if (c >= '0' && c <= '9') {
            size_t j = i;
            while (j < b && ((src[j] >= '0' && src[j] <= '9') || src[j] == '_')) j++;
            int fl = 0;
            if (j + 1 < b && src[j] == '.' && src[j + 1] >= '0' && src[j + 1] <= '9') {
                fl = 1;
                j++;
                while (j < b && src[j] >= '0' && src[j] <= '9') j++;
            }
            char *num = strndup(src + i, j - i);
            if (!num) return err_set(e, "out of memory");
            t.kind = fl ? T_FLOAT : T_INT;
            if (fl)
                t.f = strtod(num, NULL);
            else
                t.i = strtoll(num, NULL, 10);
            free(num);
            i = j;
        } else if (c == '\'' || c == '"') {
            jbuf s = {0};
            size_t j = i + 1;
            while (j < b && src[j] != c) {
                char d = src[j];
                if (d == '\\' && j + 1 < b) {
                    char x = src[++j], o = x;
                    if (x == 'n')
                        o = '\n';
                    else if (x == 't')
                        o = '\t';
                    else if (x == 'r')
                        o = '\r';
                    else if (x != '\\' && x != '\'' && x != '"') {
                        if (jb_put(&s, "\\", 1)) return err_set(e, "out of memory");
                    }
                    if (jb_put(&s, &o, 1)) return err_set(e, "out of memory");
                    j++;
                    continue;
                }
                if (jb_put(&s, &d, 1)) return err_set(e, "out of memory");
                j++;
            }
            if (j >= b) {
                free(s.p);
                return err_set(e, "line %d: unterminated string", t.line);
            }
            t.kind = T_STRING;
            t.s = s.p ? s.p : strdup("");
            t.n = s.n;
            i = j + 1;
        } else {
            static const char *const ops2[] = {"==", "!=", "<=", ">=", "//", "**"};
            t.kind = T_OP;
            size_t l = 1;
            for (int k = 0; k < 6; k++)
                if (i + 1 < b && !strncmp(src + i, ops2[k], 2)) l = 2;
            if (l == 1 && !strchr("+-*/%~|.,:()[]{}<>=!", c))
                return err_set(e, "line %d: unexpected character '%c'", t.line, c);
            t.s = strndup(src + i, l);
            t.n = l;
            i += l;
        }
        if (!t.s && t.kind != T_INT && t.kind != T_FLOAT) return err_set(e, "out of memory");
        if (tv_push(tv, t)) return err_set(e, "out of memory");
    }
    return 0;
}

/* A copy of n bytes, NUL bytes in them included, NUL-terminated. */
static char *memdup0(const char *s, size_t n) {
    char *p = malloc(n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* Splits the template into text and tags, applying the whitespace rules. */
static int lex(const char *src, size_t len, tokvec *tv, err *e) {
    size_t i = 0;
    int strip_next = 0; /* the previous tag ended with - */
    int trim_nl = 0;    /* the previous tag was a block or comment: trim_blocks */
    while (i <= len) {
        /* Find the next tag start. */
        size_t j = i;
        while (j + 1 < len &&
               !(src[j] == '{' && (src[j + 1] == '{' || src[j + 1] == '%' || src[j + 1] == '#')))
            j++;
        if (j + 1 >= len) j = len;
        size_t ta = i, tb = j;
        if (strip_next)
            while (ta < tb && is_space(src[ta])) ta++;
        else if (trim_nl && ta < tb && src[ta] == '\n')
            ta++;
        else if (trim_nl && ta + 1 < tb && src[ta] == '\r' && src[ta + 1] == '\n')
            ta += 2;
        if (j < len) {
            char kind = src[j + 1];
            int minus = j + 2 < len && src[j + 2] == '-';
            int plus = j + 2 < len && src[j + 2] == '+';
            if (minus)
                while (tb > ta && is_space(src[tb - 1])) tb--;
            else if (kind != '{' && !plus) {
                /* lstrip_blocks: spaces and tabs from the line start to a block. */
                size_t k = tb;
                while (k > ta && (src[k - 1] == ' ' || src[k - 1] == '\t')) k--;
                if (k == 0 || src[k - 1] == '\n') tb = k;
            }
        }
        if (tb > ta) {
            token t = {.kind = T_TEXT,
                       .s = memdup0(src + ta, tb - ta),
                       .n = tb - ta,
                       .line = line_of(src, ta)};
            if (!t.s || tv_push(tv, t)) return err_set(e, "out of memory");
        }
        if (j >= len) break;
        char kind = src[j + 1];
        size_t a = j + 2;
        if (a < len && (src[a] == '-' || src[a] == '+')) a++;
        const char *close = kind == '{' ? "}}" : kind == '%' ? "%}" : "#}";
        size_t k = a;
        /* The closing delimiter, outside string literals. */
        char quote = 0;
        while (k + 1 < len) {
            if (quote) {
                if (src[k] == '\\')
                    k++;
                else if (src[k] == quote)
                    quote = 0;
            } else if (kind != '#' && (src[k] == '\'' || src[k] == '"'))
                quote = src[k];
            else if (src[k] == close[0] && src[k + 1] == close[1])
                break;
            k++;
        }
        if (k + 1 >= len)
            return err_set(e, "line %d: a tag opened here is never closed with %s", line_of(src, j),
                           close);
        size_t b = k;
        strip_next = b > a && src[b - 1] == '-';
        if (strip_next) b--;
        trim_nl = kind != '{';
        if (kind != '#') {
            token open = {.kind = kind == '{' ? T_VAR_BEGIN : T_BLOCK_BEGIN,
                          .line = line_of(src, j)};
            if (tv_push(tv, open)) return err_set(e, "out of memory");
            if (lex_inside(src, a, b, tv, e)) return -1;
            token end = {.kind = kind == '{' ? T_VAR_END : T_BLOCK_END, .line = line_of(src, k)};
            if (tv_push(tv, end)) return err_set(e, "out of memory");
        }
        i = k + 2;
    }
    token eof = {.kind = T_EOF, .line = line_of(src, len)};
    return tv_push(tv, eof) ? err_set(e, "out of memory") : 0;
}

/* ---- tree --------------------------------------------------------------- */

typedef enum {
    /* expressions */
    N_LIT, /* val */
    N_NAME,
    N_LIST,
    N_TUPLE,
    N_DICT,   /* kids: key, value, key, value ... */
    N_ATTR,   /* a . s */
    N_ITEM,   /* a [ b ] */
    N_SLICE,  /* a [ kids[1] : kids[2] : kids[3] ] (NULL when absent) */
    N_CALL,   /* kids[0] callee, then args; kw names in names[] (NULL for positional) */
    N_FILTER, /* s name, kids[0] the value, then args */
    N_TEST,   /* s name, kids[0] value, then args; flag: negated */
    N_BIN,    /* s operator */
    N_AND,
    N_OR,
    N_NOT,
    N_NEG,
    N_COND, /* kids: cond, then, else (NULL) */
    /* statements */
    S_TEXT,
    S_OUT,
    S_IF,    /* kids[0] cond; body; orelse */
    S_FOR,   /* kids[0] target, kids[1] iterable, kids[2] filter or NULL; body; orelse */
    S_SET,   /* kids[0] target, kids[1] value (or NULL: body) */
    S_MACRO, /* s name; kids: parameters as N_NAME (with defaults in names/kids of a N_DICT) */
    S_BREAK,
    S_CONTINUE,
    S_BLOCK /* a body rendered as it is: generation */
} nkind;

typedef struct node node;

typedef struct {
    node **v;
    size_t n, cap;
} nodevec;

struct node {
    nkind kind;
    char *s;
    json_t *val;
    nodevec kids;
    char **names; /* N_CALL/N_FILTER keyword names, parallel to kids */
    nodevec body, orelse;
    int flag;
    int line;
};

static int nv_push(nodevec *v, node *x) {
    if (v->n == v->cap) {
        size_t c = v->cap ? 2 * v->cap : 4;
        node **q = realloc(v->v, c * sizeof *q);
        if (!q) return -1;
        v->v = q;
        v->cap = c;
    }
    v->v[v->n++] = x;
    return 0;
}

static void node_free(node *x);

static void nv_free(nodevec *v) {
    for (size_t i = 0; i < v->n; i++) node_free(v->v[i]);
    free(v->v);
}

static void node_free(node *x) {
    if (!x) return;
    free(x->s);
    if (x->val) json_decref(x->val);
    if (x->names)
        for (size_t i = 0; i < x->kids.n; i++) free(x->names[i]);
    free(x->names);
    nv_free(&x->kids);
    nv_free(&x->body);
    nv_free(&x->orelse);
    free(x);
}

struct jinja {
    nodevec body;
};

/* ---- parser ------------------------------------------------------------- */

typedef struct {
    tokvec tv;
    size_t i;
    err *e;
    int failed;
    int depth; /* nesting of expressions being parsed */
} parser;

/* Templates come from model files: nesting and output are bounded, so that
 * no file can exhaust the stack or memory (Python's Jinja has its recursion
 * limit). */
#define JINJA_MAX_DEPTH 200
#define JINJA_MAX_OUTPUT (256u << 20)

static token *peek(parser *p) {
    return &p->tv.v[p->i];
}

/* The first error of a parse or a render, with its template line: later
 * ones are knock-on effects and are dropped. The message is cut at cap - 1
 * characters (cap at most 400). */
static int jinja_vfail(err *e, int *failed, int line, size_t cap, const char *fmt, va_list ap) {
    if (*failed) return -1;
    char msg[400];
    vsnprintf(msg, cap < sizeof msg ? cap : sizeof msg, fmt, ap);
    *failed = 1;
    return err_set(e, "line %d: %s", line, msg);
}

static int fail(parser *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(parser *p, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int rc = jinja_vfail(p->e, &p->failed, peek(p)->line, 300, fmt, ap);
    va_end(ap);
    return rc;
}

static int is_op(parser *p, const char *op) {
    token *t = peek(p);
    return t->kind == T_OP && !strcmp(t->s, op);
}

static int is_name(parser *p, const char *name) {
    token *t = peek(p);
    return t->kind == T_NAME && !strcmp(t->s, name);
}

static int accept_op(parser *p, const char *op) {
    if (!is_op(p, op)) return 0;
    p->i++;
    return 1;
}

static int accept_name(parser *p, const char *name) {
    if (!is_name(p, name)) return 0;
    p->i++;
    return 1;
}

static int expect_op(parser *p, const char *op) {
    if (accept_op(p, op)) return 0;
    return fail(p, "expected '%s'", op);
}

static node *mk(parser *p, nkind k) {
    node *x = calloc(1, sizeof *x);
    if (!x) {
        fail(p, "out of memory");
        return NULL;
    }
    x->kind = k;
    x->line = peek(p)->line;
    return x;
}

static node *add_kid(parser *p, node *x, node *kid) {
    if (!x || !kid || nv_push(&x->kids, kid)) {
        node_free(kid);
        node_free(x);
        if (!p->failed) fail(p, "out of memory");
        return NULL;
    }
    return x;
}

static node *parse_expr(parser *p);
static node *parse_or(parser *p);

/* Arguments of a call or filter: positional and name=value. */
static node *parse_args(parser *p, node *x) {
    while (x && !accept_op(p, ")")) {
        char *kw = NULL;
        if (peek(p)->kind == T_NAME && p->tv.v[p->i + 1].kind == T_OP &&
            !strcmp(p->tv.v[p->i + 1].s, "=")) {
            kw = strdup(peek(p)->s);
            p->i += 2;
        }
        node *a = parse_expr(p);
        size_t at = x->kids.n;
        if (!(x = add_kid(p, x, a))) {
            free(kw);
            return NULL;
        }
        char **q = realloc(x->names, (at + 1) * sizeof *q);
        if (!q) {
            free(kw);
            node_free(x);
            fail(p, "out of memory");
            return NULL;
        }
        x->names = q;
        x->names[at] = kw;
        if (!accept_op(p, ",") && !is_op(p, ")")) {
            node_free(x);
            fail(p, "expected ',' or ')' in the arguments");
            return NULL;
        }
    }
    return x;
}

/* names[] parallel to kids[] for the first `from` kids without names. */
static node *names_init(parser *p, node *x, size_t from) {
    if (!x) return NULL;
    x->names = calloc(from + 1, sizeof *x->names);
    if (!x->names) {
        node_free(x);
        fail(p, "out of memory");
        return NULL;
    }
    return x;
}

static node *parse_primary(parser *p) {
    token *t = peek(p);
    node *x;
    switch (t->kind) {
    case T_STRING: {
        jbuf s = {0};
        /* Adjacent literals concatenate. */
        while (peek(p)->kind == T_STRING) {
            if (jb_put(&s, peek(p)->s, peek(p)->n)) return fail(p, "out of memory"), NULL;
            p->i++;
        }
        x = mk(p, N_LIT);
        if (x) x->val = json_stringn(s.p ? s.p : "", s.n);
        free(s.p);
        return x;
    }
    case T_INT:
        p->i++;
        x = mk(p, N_LIT);
        if (x) x->val = json_integer(t->i);
        return x;
    case T_FLOAT:
        p->i++;
        x = mk(p, N_LIT);
        if (x) x->val = json_real(t->f);
        return x;
    case T_NAME:
        p->i++;
        if (!strcmp(t->s, "true") || !strcmp(t->s, "True") || !strcmp(t->s, "false") ||
            !strcmp(t->s, "False")) {
            x = mk(p, N_LIT);
            if (x) x->val = json_boolean(t->s[0] == 't' || t->s[0] == 'T');
            return x;
        }
        if (!strcmp(t->s, "none") || !strcmp(t->s, "None")) {
            x = mk(p, N_LIT);
            if (x) x->val = json_null();
            return x;
        }
        x = mk(p, N_NAME);
        if (x && !(x->s = strdup(t->s))) return node_free(x), fail(p, "out of memory"), NULL;
        return x;
    case T_OP:
        if (accept_op(p, "(")) {
            if (accept_op(p, ")")) return mk(p, N_TUPLE);
            node *first = parse_expr(p);
            if (!first) return NULL;
            if (accept_op(p, ")")) return first;
            x = add_kid(p, mk(p, N_TUPLE), first);
            while (x && accept_op(p, ",")) {
                if (is_op(p, ")")) break;
                x = add_kid(p, x, parse_expr(p));
            }
            if (x && expect_op(p, ")")) return node_free(x), NULL;
            return x;
        }
        if (accept_op(p, "[")) {
            x = mk(p, N_LIST);
            while (x && !accept_op(p, "]")) {
                x = add_kid(p, x, parse_expr(p));
                if (x && !accept_op(p, ",") && !is_op(p, "]"))
                    return node_free(x), fail(p, "expected ',' or ']' in a list"), NULL;
            }
            return x;
        }
        if (accept_op(p, "{")) {
            x = mk(p, N_DICT);
            while (x && !accept_op(p, "}")) {
                x = add_kid(p, x, parse_expr(p));
                if (x && expect_op(p, ":")) return node_free(x), NULL;
                x = add_kid(p, x, parse_expr(p));
                if (x && !accept_op(p, ",") && !is_op(p, "}"))
                    return node_free(x), fail(p, "expected ',' or '}' in a dict"), NULL;
            }
            return x;
        }
        break;
    default:
        break;
    }
    fail(p, "expected an expression");
    return NULL;
}

static node *parse_postfix(parser *p) {
    node *x = parse_primary(p);
    while (x) {
        if (accept_op(p, ".")) {
            token *t = peek(p);
            if (t->kind != T_NAME && t->kind != T_INT)
                return node_free(x), fail(p, "expected a name after '.'"), NULL;
            node *a = mk(p, t->kind == T_NAME ? N_ATTR : N_ITEM);
            if (!a) return node_free(x), NULL;
            if (t->kind == T_NAME) a->s = strdup(t->s);
            p->i++;
            a = add_kid(p, a, x);
            if (a && a->kind == N_ITEM) {
                node *idx = mk(p, N_LIT);
                if (idx) idx->val = json_integer(t->i);
                a = add_kid(p, a, idx);
            }
            x = a;
        } else if (accept_op(p, "[")) {
            node *parts[3] = {NULL, NULL, NULL};
            int colons = 0;
            for (;;) {
                if (is_op(p, ":")) {
                    p->i++;
                    if (++colons > 2) break;
                    continue;
                }
                if (is_op(p, "]")) break;
                if (parts[colons]) {
                    fail(p, "expected ':' or ']' in a subscript");
                    break;
                }
                parts[colons] = parse_expr(p);
                if (!parts[colons]) break;
            }
            if (p->failed || colons > 2 || expect_op(p, "]")) {
                for (int k = 0; k < 3; k++) node_free(parts[k]);
                node_free(x);
                if (!p->failed) fail(p, "bad subscript");
                return NULL;
            }
            node *a = mk(p, colons ? N_SLICE : N_ITEM);
            a = add_kid(p, a, x);
            if (!colons)
                a = add_kid(p, a, parts[0]);
            else
                for (int k = 0; k < 3 && a; k++)
                    if (nv_push(&a->kids, parts[k])) {
                        node_free(a);
                        a = NULL;
                        fail(p, "out of memory");
                    }
            x = a;
        } else if (accept_op(p, "(")) {
            node *c = names_init(p, add_kid(p, mk(p, N_CALL), x), 1);
            x = parse_args(p, c);
        } else
            break;
    }
    return x;
}

/* Filters bind tighter than every operator: a + b | f is a + (b | f). */
static node *parse_filtered(parser *p, node *x) {
    while (x && accept_op(p, "|")) {
        token *t = peek(p);
        if (t->kind != T_NAME) return node_free(x), fail(p, "expected a filter name"), NULL;
        node *f = mk(p, N_FILTER);
        if (!f) return node_free(x), NULL;
        f->s = strdup(t->s);
        p->i++;
        f = names_init(p, add_kid(p, f, x), 1);
        if (f && accept_op(p, "(")) f = parse_args(p, f);
        x = f;
    }
    return x;
}

/* fn one level deeper, refused past JINJA_MAX_DEPTH (what: "expressions"). */
static node *parse_nested(parser *p, node *(*fn)(parser *), const char *what) {
    if (++p->depth > JINJA_MAX_DEPTH) {
        p->depth--;
        return fail(p, "%s nested more than %d deep", what, JINJA_MAX_DEPTH), NULL;
    }
    node *x = fn(p);
    p->depth--;
    return x;
}

static node *parse_unary_in(parser *p);

static node *parse_unary(parser *p) {
    return parse_nested(p, parse_unary_in, "expressions");
}

static node *parse_unary_in(parser *p) {
    if (accept_op(p, "-")) {
        node *x = mk(p, N_NEG);
        return add_kid(p, x, parse_unary(p));
    }
    if (accept_op(p, "+")) return parse_unary(p);
    return parse_filtered(p, parse_postfix(p));
}

static node *bin(parser *p, const char *op, node *a, node *b) {
    node *x = mk(p, N_BIN);
    if (x && !(x->s = strdup(op))) {
        node_free(x);
        x = NULL;
    }
    x = add_kid(p, x, a);
    if (!x) {
        node_free(b);
        return NULL;
    }
    return add_kid(p, x, b);
}

static node *parse_pow(parser *p) {
    node *x = parse_unary(p);
    while (x && is_op(p, "**")) {
        p->i++;
        x = bin(p, "**", x, parse_unary(p));
    }
    return x;
}

static node *parse_mul(parser *p) {
    node *x = parse_pow(p);
    while (x && (is_op(p, "*") || is_op(p, "/") || is_op(p, "//") || is_op(p, "%"))) {
        char op[3];
        snprintf(op, sizeof op, "%s", peek(p)->s);
        p->i++;
        x = bin(p, op, x, parse_pow(p));
    }
    return x;
}

static node *parse_add(parser *p) {
    node *x = parse_mul(p);
    while (x && (is_op(p, "+") || is_op(p, "-"))) {
        char op[2] = {peek(p)->s[0], 0};
        p->i++;
        x = bin(p, op, x, parse_mul(p));
    }
    return x;
}

static node *parse_concat(parser *p) {
    node *x = parse_add(p);
    while (x && accept_op(p, "~")) x = bin(p, "~", x, parse_add(p));
    return x;
}

static node *parse_compare(parser *p) {
    node *x = parse_concat(p);
    while (x) {
        static const char *const ops[] = {"==", "!=", "<=", ">=", "<", ">"};
        int k = -1;
        for (int i = 0; i < 6; i++)
            if (is_op(p, ops[i])) k = i;
        if (k >= 0) {
            p->i++;
            x = bin(p, ops[k], x, parse_concat(p));
        } else if (is_name(p, "in")) {
            p->i++;
            x = bin(p, "in", x, parse_concat(p));
        } else if (is_name(p, "not") && p->tv.v[p->i + 1].kind == T_NAME &&
                   !strcmp(p->tv.v[p->i + 1].s, "in")) {
            p->i += 2;
            x = bin(p, "not in", x, parse_concat(p));
        } else if (accept_name(p, "is")) {
            int neg = accept_name(p, "not");
            token *t = peek(p);
            if (t->kind != T_NAME && !(t->kind == T_OP && !strcmp(t->s, "==")))
                return node_free(x), fail(p, "expected a test name after 'is'"), NULL;
            node *te = mk(p, N_TEST);
            if (!te) return node_free(x), NULL;
            te->s = strdup(t->s);
            te->flag = neg;
            p->i++;
            te = names_init(p, add_kid(p, te, x), 1);
            if (te && accept_op(p, "("))
                te = parse_args(p, te);
            else if (te && (peek(p)->kind == T_STRING || peek(p)->kind == T_INT ||
                            peek(p)->kind == T_FLOAT ||
                            (peek(p)->kind == T_NAME && !is_name(p, "and") && !is_name(p, "or") &&
                             !is_name(p, "else") && !is_name(p, "if")))) {
                /* One argument without parentheses: x is divisibleby 3. */
                te = add_kid(p, te, parse_concat(p));
                if (te) {
                    char **q = realloc(te->names, 2 * sizeof *q);
                    if (q) {
                        q[1] = NULL;
                        te->names = q;
                    }
                }
            }
            x = te;
        } else
            break;
    }
    return x;
}

static node *parse_not(parser *p) {
    if (accept_name(p, "not")) return add_kid(p, mk(p, N_NOT), parse_not(p));
    return parse_compare(p);
}

/* operand (word operand)*, left-associative: and over not, or over and. */
static node *parse_chain(parser *p, const char *word, nkind kind, node *(*operand)(parser *)) {
    node *x = operand(p);
    while (x && accept_name(p, word)) {
        node *y = add_kid(p, mk(p, kind), x);
        x = add_kid(p, y, operand(p));
    }
    return x;
}

static node *parse_and(parser *p) {
    return parse_chain(p, "and", N_AND, parse_not);
}

static node *parse_or(parser *p) {
    return parse_chain(p, "or", N_OR, parse_and);
}

static node *parse_expr(parser *p) {
    node *x = parse_or(p);
    if (x && accept_name(p, "if")) {
        node *cond = parse_or(p);
        node *other = NULL;
        if (cond && accept_name(p, "else")) {
            other = parse_expr(p);
            if (!other) return node_free(x), node_free(cond), NULL;
        }
        node *c = add_kid(p, mk(p, N_COND), cond);
        c = add_kid(p, c, x);
        if (c && nv_push(&c->kids, other)) {
            node_free(c);
            return fail(p, "out of memory"), NULL;
        }
        return c;
    }
    return x;
}

/* A for or set target: a name, a.b, or names separated by commas. */
static node *parse_target(parser *p) {
    node *x = parse_postfix(p);
    if (x && is_op(p, ",")) {
        node *t = add_kid(p, mk(p, N_TUPLE), x);
        while (t && accept_op(p, ",")) t = add_kid(p, t, parse_postfix(p));
        return t;
    }
    return x;
}

static int parse_body(parser *p, nodevec *out, const char *const *stops, int *which);

static int block_end(parser *p) {
    if (peek(p)->kind == T_BLOCK_END) {
        p->i++;
        return 0;
    }
    return fail(p, "expected the end of the block tag");
}

/* The rest of a block: its body up to {% end %}, which it consumes. */
static int parse_until(parser *p, nodevec *body, const char *end) {
    const char *const stops[] = {end, NULL};
    int which;
    if (parse_body(p, body, stops, &which)) return -1;
    p->i++;
    return block_end(p);
}

/* The rest of an if or for: its body, then {% else %} and another body, or
 * {% end %}; elif (stops[0] "elif", for if only) leaves the parser on it. */
static int parse_branches(parser *p, node *x, const char *const *stops, const char *end,
                          int *elif) {
    int which;
    *elif = 0;
    if (parse_body(p, &x->body, stops, &which)) return -1;
    if (!strcmp(stops[which], "elif")) return *elif = 1, 0;
    p->i++;
    if (block_end(p)) return -1;
    return strcmp(stops[which], "else") ? 0 : parse_until(p, &x->orelse, end);
}

static node *parse_stmt_in(parser *p);

static node *parse_stmt(parser *p) {
    return parse_nested(p, parse_stmt_in, "blocks");
}

static node *parse_stmt_in(parser *p) {
    token *t = peek(p);
    if (t->kind != T_NAME) return fail(p, "expected a statement name"), NULL;
    node *x = NULL;
    int elif;
    if (accept_name(p, "if") || accept_name(p, "elif")) {
        x = add_kid(p, mk(p, S_IF), parse_expr(p));
        if (!x || block_end(p)) return node_free(x), NULL;
        static const char *const stops[] = {"elif", "else", "endif", NULL};
        if (parse_branches(p, x, stops, "endif", &elif)) return node_free(x), NULL;
        if (elif) { /* a nested if in orelse; it consumes endif */
            node *sub = parse_stmt(p);
            if (!sub || nv_push(&x->orelse, sub)) return node_free(sub), node_free(x), NULL;
        }
        return x;
    }
    if (accept_name(p, "for")) {
        x = add_kid(p, mk(p, S_FOR), parse_target(p));
        if (x && !accept_name(p, "in")) return node_free(x), fail(p, "expected 'in'"), NULL;
        x = add_kid(p, x, parse_or(p));
        node *cond = NULL;
        if (x && accept_name(p, "if") && !(cond = parse_or(p))) return node_free(x), NULL;
        if (x && nv_push(&x->kids, cond)) return node_free(x), node_free(cond), NULL;
        accept_name(p, "recursive");
        if (!x || block_end(p)) return node_free(x), NULL;
        static const char *const stops[] = {"else", "endfor", NULL};
        if (parse_branches(p, x, stops, "endfor", &elif)) return node_free(x), NULL;
        return x;
    }
    if (accept_name(p, "set")) {
        x = add_kid(p, mk(p, S_SET), parse_target(p));
        if (!x) return NULL;
        if (accept_op(p, "=")) {
            x = add_kid(p, x, parse_expr(p));
            if (!x || block_end(p)) return node_free(x), NULL;
            return x;
        }
        /* {% set x %}...{% endset %} */
        if (nv_push(&x->kids, NULL) || block_end(p) || parse_until(p, &x->body, "endset"))
            return node_free(x), NULL;
        return x;
    }
    if (accept_name(p, "macro")) {
        token *n = peek(p);
        if (n->kind != T_NAME) return fail(p, "expected a macro name"), NULL;
        x = mk(p, S_MACRO);
        if (!x) return NULL;
        x->s = strdup(n->s);
        p->i++;
        if (expect_op(p, "(")) return node_free(x), NULL;
        /* Parameters: kids are N_NAME nodes, each with its default as kid. */
        while (!accept_op(p, ")")) {
            token *pn = peek(p);
            if (pn->kind != T_NAME) return node_free(x), fail(p, "expected a parameter"), NULL;
            node *par = mk(p, N_NAME);
            if (!par) return node_free(x), NULL;
            par->s = strdup(pn->s);
            p->i++;
            if (accept_op(p, "=")) par = add_kid(p, par, parse_expr(p));
            x = add_kid(p, x, par);
            if (!x) return NULL;
            if (!accept_op(p, ",") && !is_op(p, ")"))
                return node_free(x), fail(p, "expected ',' or ')' in the parameters"), NULL;
        }
        if (block_end(p) || parse_until(p, &x->body, "endmacro")) return node_free(x), NULL;
        return x;
    }
    if (accept_name(p, "break") || accept_name(p, "continue")) {
        x = mk(p, t->s[0] == 'b' ? S_BREAK : S_CONTINUE);
        if (!x || block_end(p)) return node_free(x), NULL;
        return x;
    }
    if (accept_name(p, "generation")) {
        x = mk(p, S_BLOCK);
        if (!x || block_end(p) || parse_until(p, &x->body, "endgeneration"))
            return node_free(x), NULL;
        return x;
    }
    fail(p, "statement '%s' is not supported", t->s);
    return NULL;
}

/* Parses until one of stops (a block tag name) or the end; *which is the
 * index of the stop found (its name token is next), -1 at the end. */
static int parse_body(parser *p, nodevec *out, const char *const *stops, int *which) {
    *which = -1;
    for (;;) {
        token *t = peek(p);
        if (t->kind == T_EOF) {
            if (stops) {
                int last = 0;
                while (stops[last + 1]) last++;
                return fail(p, "the template ends inside a block: expected %s", stops[last]);
            }
            return 0;
        }
        node *x = NULL;
        if (t->kind == T_TEXT) {
            x = mk(p, S_TEXT);
            if (x) {
                x->val = json_stringn(t->s, t->n);
                p->i++;
            }
        } else if (t->kind == T_VAR_BEGIN) {
            p->i++;
            x = add_kid(p, mk(p, S_OUT), parse_expr(p));
            if (x && peek(p)->kind != T_VAR_END) {
                node_free(x);
                return fail(p, "expected '}}'");
            }
            p->i++;
        } else if (t->kind == T_BLOCK_BEGIN) {
            p->i++;
            for (int k = 0; stops && stops[k]; k++)
                if (is_name(p, stops[k])) {
                    *which = k;
                    return 0;
                }
            x = parse_stmt(p);
        } else
            return fail(p, "unexpected token");
        if (!x) return -1;
        if (nv_push(out, x)) {
            node_free(x);
            return fail(p, "out of memory");
        }
    }
}

int jinja_parse(jinja **out, const char *src, size_t len, err *e) {
    *out = NULL;
    parser p = {.e = e};
    if (lex(src, len, &p.tv, e)) {
        for (size_t i = 0; i < p.tv.n; i++) free(p.tv.v[i].s);
        free(p.tv.v);
        return -1;
    }
    jinja *j = calloc(1, sizeof *j);
    int which, rc = j ? parse_body(&p, &j->body, NULL, &which) : err_set(e, "out of memory");
    for (size_t i = 0; i < p.tv.n; i++) free(p.tv.v[i].s);
    free(p.tv.v);
    if (rc) {
        jinja_free(j);
        return -1;
    }
    *out = j;
    return 0;
}

void jinja_free(jinja *j) {
    if (!j) return;
    nv_free(&j->body);
    free(j);
}

/* ---- values ------------------------------------------------------------- */

/* Undefined is NULL; every other value a jansson reference the holder owns.
 * Macros are objects with the hidden key below pointing at their node. */
#define MACRO_KEY "\x01macro"

typedef struct {
    json_t **frames; /* variables, innermost last */
    int n, cap;
    jbuf out;
    err *e;
    int failed;
    int brk, cont; /* a break or continue is unwinding */
    int calls;     /* macro calls in progress */
} interp;

static int rfail(interp *r, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int rfail(interp *r, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int rc = jinja_vfail(r->e, &r->failed, line, 400, fmt, ap);
    va_end(ap);
    return rc;
}

static int truthy(const json_t *v) {
    if (!v) return 0;
    switch (json_typeof(v)) {
    case JSON_NULL:
    case JSON_FALSE:
        return 0;
    case JSON_TRUE:
        return 1;
    case JSON_INTEGER:
        return json_integer_value(v) != 0;
    case JSON_REAL:
        return json_real_value(v) != 0;
    case JSON_STRING:
        return json_string_length(v) > 0;
    case JSON_ARRAY:
        return json_array_size(v) > 0;
    case JSON_OBJECT:
        return json_object_size(v) > 0;
    }
    return 0;
}

/* Python's repr of a float: the shortest digits that read back the same. */
static void float_repr(double x, char *out, size_t n) {
    if (isinf(x)) {
        snprintf(out, n, x > 0 ? "inf" : "-inf");
        return;
    }
    if (isnan(x)) {
        snprintf(out, n, "nan");
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, n, "%.*g", prec, x);
        if (strtod(out, NULL) == x) break;
    }
    if (!strpbrk(out, ".eEn")) strncat(out, ".0", n - strlen(out) - 1);
}

static int repr(jbuf *b, const json_t *v);

/* A JSON integer or real as both str() and json.dumps print it. */
static int put_number(jbuf *b, const json_t *v) {
    char num[64];
    if (json_is_integer(v))
        snprintf(num, sizeof num, "%lld", (long long)json_integer_value(v));
    else
        float_repr(json_real_value(v), num, sizeof num);
    return jb_puts(b, num);
}

/* str() of a value as Python prints it. */
static int to_str(jbuf *b, const json_t *v) {
    if (!v) return 0;
    switch (json_typeof(v)) {
    case JSON_STRING:
        return jb_put(b, json_string_value(v), json_string_length(v));
    case JSON_INTEGER:
    case JSON_REAL:
        return put_number(b, v);
    case JSON_TRUE:
        return jb_puts(b, "True");
    case JSON_FALSE:
        return jb_puts(b, "False");
    case JSON_NULL:
        return jb_puts(b, "None");
    default:
        return repr(b, v);
    }
}

static int repr(jbuf *b, const json_t *v) {
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        size_t n = json_string_length(v);
        char q = memchr(s, '\'', n) && !memchr(s, '"', n) ? '"' : '\'';
        int rc = jb_put(b, &q, 1);
        for (size_t i = 0; i < n && !rc; i++) {
            char c = s[i];
            if (c == q || c == '\\') rc = jb_put(b, "\\", 1);
            if (c == '\n')
                rc = rc || jb_puts(b, "\\n");
            else if (c == '\t')
                rc = rc || jb_puts(b, "\\t");
            else
                rc = rc || jb_put(b, &c, 1);
        }
        return rc || jb_put(b, &q, 1);
    }
    if (json_is_array(v)) {
        int rc = jb_puts(b, "[");
        for (size_t i = 0; i < json_array_size(v) && !rc; i++)
            rc = (i && jb_puts(b, ", ")) || repr(b, json_array_get(v, i));
        return rc || jb_puts(b, "]");
    }
    if (json_is_object(v)) {
        int rc = jb_puts(b, "{"), first = 1;
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)v, k, x) {
            json_t *ks = json_string(k);
            rc =
                rc || (!first && jb_puts(b, ", ")) || repr(b, ks) || jb_puts(b, ": ") || repr(b, x);
            json_decref(ks);
            first = 0;
        }
        return rc || jb_puts(b, "}");
    }
    return to_str(b, v);
}

/* json.dumps(v, ensure_ascii=False, indent=indent) as transformers' tojson. */
static int dump_json(jbuf *b, const json_t *v, int indent, int depth) {
    char num[64];
    if (!v) return jb_puts(b, "null");
    switch (json_typeof(v)) {
    case JSON_NULL:
        return jb_puts(b, "null");
    case JSON_TRUE:
        return jb_puts(b, "true");
    case JSON_FALSE:
        return jb_puts(b, "false");
    case JSON_INTEGER:
    case JSON_REAL:
        return put_number(b, v);
    case JSON_STRING: {
        const char *s = json_string_value(v);
        size_t n = json_string_length(v);
        int rc = jb_puts(b, "\"");
        for (size_t i = 0; i < n && !rc; i++) {
            unsigned char c = (unsigned char)s[i];
            if (c == '"')
                rc = jb_puts(b, "\\\"");
            else if (c == '\\')
                rc = jb_puts(b, "\\\\");
            else if (c == '\n')
                rc = jb_puts(b, "\\n");
            else if (c == '\r')
                rc = jb_puts(b, "\\r");
            else if (c == '\t')
                rc = jb_puts(b, "\\t");
            else if (c == '\b')
                rc = jb_puts(b, "\\b");
            else if (c == '\f')
                rc = jb_puts(b, "\\f");
            else if (c < 0x20) {
                snprintf(num, sizeof num, "\\u%04x", c);
                rc = jb_puts(b, num);
            } else
                rc = jb_put(b, (const char *)&c, 1);
        }
        return rc || jb_puts(b, "\"");
    }
    case JSON_ARRAY:
    case JSON_OBJECT: {
        int arr = json_is_array(v);
        size_t n = arr ? json_array_size(v) : json_object_size(v);
        if (n == 0) return jb_puts(b, arr ? "[]" : "{}");
        int rc = jb_puts(b, arr ? "[" : "{");
        size_t i = 0;
        const char *k;
        json_t *x;
        void *it = arr ? NULL : json_object_iter((json_t *)v);
        for (i = 0; i < n && !rc; i++) {
            if (i) rc = jb_puts(b, indent >= 0 ? "," : ", ");
            if (indent >= 0) {
                rc = rc || jb_puts(b, "\n");
                for (int s = 0; s < indent * (depth + 1) && !rc; s++) rc = jb_puts(b, " ");
            }
            if (arr)
                x = json_array_get(v, i);
            else {
                k = json_object_iter_key(it);
                x = json_object_iter_value(it);
                json_t *ks = json_string(k);
                rc = rc || dump_json(b, ks, indent, depth + 1) || jb_puts(b, ": ");
                json_decref(ks);
                it = json_object_iter_next((json_t *)v, it);
            }
            rc = rc || dump_json(b, x, indent, depth + 1);
        }
        if (indent >= 0) {
            rc = rc || jb_puts(b, "\n");
            for (int s = 0; s < indent * depth && !rc; s++) rc = jb_puts(b, " ");
        }
        return rc || jb_puts(b, arr ? "]" : "}");
    }
    }
    return 0;
}

static int py_equal(const json_t *a, const json_t *b) {
    if (!a || !b) return !a && !b;
    if (json_is_number(a) && json_is_number(b)) return json_number_value(a) == json_number_value(b);
    if ((json_is_boolean(a) && json_is_number(b)) || (json_is_number(a) && json_is_boolean(b))) {
        double x = json_is_number(a) ? json_number_value(a) : json_is_true(a);
        double y = json_is_number(b) ? json_number_value(b) : json_is_true(b);
        return x == y;
    }
    return json_equal((json_t *)a, (json_t *)b);
}

static json_t *jstr_from(jbuf *b) {
    json_t *s = json_stringn(b->p ? b->p : "", b->n);
    free(b->p);
    return s;
}

/* ---- evaluation --------------------------------------------------------- */

static json_t *eval(interp *r, const node *x);
static int exec_body(interp *r, const nodevec *body);

static json_t *lookup(interp *r, const char *name) {
    for (int i = r->n - 1; i >= 0; i--) {
        json_t *v = json_object_get(r->frames[i], name);
        if (v) return json_incref(v);
    }
    return NULL;
}

static int push_frame(interp *r) {
    if (r->n == r->cap) {
        int c = r->cap ? 2 * r->cap : 8;
        json_t **q = realloc(r->frames, (size_t)c * sizeof *q);
        if (!q) return -1;
        r->frames = q;
        r->cap = c;
    }
    r->frames[r->n] = json_object();
    return r->frames[r->n++] ? 0 : -1;
}

static void pop_frame(interp *r) {
    json_decref(r->frames[--r->n]);
}

static int set_var(interp *r, const char *name, json_t *v) {
    /* Steals v. Undefined sets nothing, as assigning an undefined value
     * leaves the name undefined. */
    if (!v) {
        json_object_del(r->frames[r->n - 1], name);
        return 0;
    }
    return json_object_set_new(r->frames[r->n - 1], name, v);
}

static const char *type_name(const json_t *v) {
    if (!v) return "undefined";
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "dict";
    case JSON_ARRAY:
        return "list";
    case JSON_STRING:
        return "string";
    case JSON_INTEGER:
        return "int";
    case JSON_REAL:
        return "float";
    case JSON_NULL:
        return "none";
    default:
        return "bool";
    }
}

/* An iterable as a list (strings by character, dicts by key); new ref. */
static json_t *as_list(interp *r, const json_t *v, int line) {
    if (json_is_array(v)) return json_incref((json_t *)v);
    json_t *l = json_array();
    if (json_is_object(v)) {
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)v, k, x) json_array_append_new(l, json_string(k));
        return l;
    }
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        size_t n = json_string_length(v);
        for (size_t i = 0; i < n;) {
            size_t j = i + 1;
            while (j < n && ((unsigned char)s[j] & 0xC0) == 0x80) j++;
            json_array_append_new(l, json_stringn(s + i, j - i));
            i = j;
        }
        return l;
    }
    if (!v) return l; /* undefined iterates as nothing */
    json_decref(l);
    rfail(r, line, "a %s is not iterable", type_name(v));
    return NULL;
}

static json_t *get_attr(const json_t *v, const char *name) {
    if (json_is_object(v)) return json_incref(json_object_get(v, name));
    return NULL;
}

static json_t *get_item(interp *r, const json_t *v, const json_t *k, int line) {
    if (json_is_object(v) && json_is_string(k))
        return json_incref(json_object_get(v, json_string_value(k)));
    if ((json_is_array(v) || json_is_string(v)) && json_is_integer(k)) {
        long long i = json_integer_value(k);
        if (json_is_array(v)) {
            long long n = (long long)json_array_size(v);
            if (i < 0) i += n;
            return i >= 0 && i < n ? json_incref(json_array_get(v, (size_t)i)) : NULL;
        }
        const char *s = json_string_value(v);
        size_t n = json_string_length(v);
        long long c = (long long)utf8_count(s, n);
        if (i < 0) i += c;
        if (i < 0 || i >= c) return NULL;
        size_t a = utf8_offset(s, n, (size_t)i), b = utf8_offset(s, n, (size_t)i + 1);
        return json_stringn(s + a, b - a);
    }
    if (!v) return NULL;
    (void)r, (void)line;
    return NULL;
}

/* Python's slice [a:b:c] of a list or string. */
static json_t *do_slice(interp *r, const json_t *v, const json_t *ja, const json_t *jb,
                        const json_t *jc, int line) {
    long long step = jc && !json_is_null(jc) ? json_integer_value(jc) : 1;
    if (step == 0) return rfail(r, line, "slice step cannot be zero"), NULL;
    json_t *items = as_list(r, v, line);
    if (!items) return NULL;
    long long n = (long long)json_array_size(items);
    long long a, b;
    if (step > 0) {
        a = ja && !json_is_null(ja) ? json_integer_value(ja) : 0;
        b = jb && !json_is_null(jb) ? json_integer_value(jb) : n;
        if (a < 0) a += n;
        if (b < 0) b += n;
        if (a < 0) a = 0;
        if (b > n) b = n;
    } else {
        a = ja && !json_is_null(ja) ? json_integer_value(ja) : n - 1;
        b = jb && !json_is_null(jb) ? json_integer_value(jb) : -n - 1;
        if (a < 0) a += n;
        if (b < 0) b += n;
        if (a >= n) a = n - 1;
        if (b < -1) b = -1;
    }
    json_t *out = json_array();
    for (long long i = a; step > 0 ? i < b : i > b; i += step)
        json_array_append(out, json_array_get(items, (size_t)i));
    json_decref(items);
    if (json_is_string(v)) {
        jbuf s = {0};
        for (size_t i = 0; i < json_array_size(out); i++) to_str(&s, json_array_get(out, i));
        json_decref(out);
        return jstr_from(&s);
    }
    return out;
}

/* Arguments evaluated: positional in pos[], keywords looked up by name. */
typedef struct {
    json_t *pos[8];
    int npos;
    const char *kwn[8];
    json_t *kwv[8];
    int nkw;
} args;

static void args_free(args *a) {
    for (int i = 0; i < a->npos; i++) json_decref(a->pos[i]);
    for (int i = 0; i < a->nkw; i++) json_decref(a->kwv[i]);
}

static int eval_args(interp *r, const node *x, size_t from, args *a) {
    memset(a, 0, sizeof *a);
    for (size_t i = from; i < x->kids.n; i++) {
        json_t *v = eval(r, x->kids.v[i]);
        if (r->failed) return -1;
        const char *kw = x->names ? x->names[i] : NULL;
        if (kw) {
            if (a->nkw == 8) return rfail(r, x->line, "too many arguments");
            a->kwn[a->nkw] = kw;
            a->kwv[a->nkw++] = v;
        } else {
            if (a->npos == 8) return rfail(r, x->line, "too many arguments");
            a->pos[a->npos++] = v;
        }
    }
    return 0;
}

/* Argument k by position or by name; borrowed, may be NULL. */
static json_t *arg(const args *a, int k, const char *name) {
    if (k >= 0 && k < a->npos) return a->pos[k];
    for (int i = 0; i < a->nkw; i++)
        if (name && !strcmp(a->kwn[i], name)) return a->kwv[i];
    return NULL;
}

static json_t *call_macro(interp *r, const node *m, const args *a, int line) {
    if (r->calls >= JINJA_MAX_DEPTH)
        return rfail(r, line, "macros call each other more than %d deep", JINJA_MAX_DEPTH), NULL;
    /* A macro sees the template's top-level variables and its parameters. */
    int saved = r->n;
    json_t **keep = malloc((size_t)saved * sizeof *keep);
    if (!keep) return rfail(r, line, "out of memory"), NULL;
    memcpy(keep, r->frames, (size_t)saved * sizeof *keep);
    r->n = 1;
    if (push_frame(r)) {
        free(keep);
        return rfail(r, line, "out of memory"), NULL;
    }
    for (size_t i = 0; i < m->kids.n; i++) {
        const node *par = m->kids.v[i];
        json_t *v = arg(a, (int)i, par->s);
        if (v)
            v = json_incref(v);
        else if (par->kids.n)
            v = eval(r, par->kids.v[0]);
        set_var(r, par->s, v);
    }
    jbuf saved_out = r->out;
    memset(&r->out, 0, sizeof r->out);
    r->calls++;
    exec_body(r, &m->body);
    r->calls--;
    json_t *res = jstr_from(&r->out);
    r->out = saved_out;
    pop_frame(r);
    /* Frames pushed above 1 were popped by exec_body; restore the caller's. */
    if (r->cap < saved) {
        json_t **q = realloc(r->frames, (size_t)saved * sizeof *q);
        if (q) {
            r->frames = q;
            r->cap = saved;
        }
    }
    memcpy(r->frames, keep, (size_t)saved * sizeof *keep);
    r->n = saved;
    free(keep);
    return res;
}

/* str.upper(), lower(), title() and capitalize() of the n bytes at p, ASCII
 * letters only, by the method's first letter (u, l, t, c). */
static json_t *str_recase(char how, const char *p, size_t n) {
    char *c = malloc(n + 1);
    if (!c) return NULL;
    int start = 1;
    for (size_t i = 0; i < n; i++) {
        char ch = p[i];
        int lower = ch >= 'a' && ch <= 'z', upper = ch >= 'A' && ch <= 'Z';
        int up = how == 'u' || (how != 'l' && start);
        if (up && lower) ch -= 32;
        if (!up && upper) ch += 32;
        if (how == 't')
            start = !(lower || upper);
        else
            start = 0;
        c[i] = ch;
    }
    json_t *res = json_stringn(c, n);
    free(c);
    return res;
}

static json_t *str_method(interp *r, const json_t *s, const char *name, const args *a, int line) {
    const char *p = json_string_value(s);
    size_t n = json_string_length(s);
    if (!strcmp(name, "startswith") || !strcmp(name, "endswith")) {
        json_t *x = arg(a, 0, NULL);
        int ok = 0;
        size_t cnt = json_is_array(x) ? json_array_size(x) : 1;
        for (size_t i = 0; i < cnt; i++) {
            json_t *y = json_is_array(x) ? json_array_get(x, i) : x;
            if (!json_is_string(y)) return rfail(r, line, "%s() needs a string", name), NULL;
            size_t m = json_string_length(y);
            if (m <= n && !memcmp(name[0] == 's' ? p : p + n - m, json_string_value(y), m)) ok = 1;
        }
        return json_boolean(ok);
    }
    if (!strcmp(name, "strip") || !strcmp(name, "lstrip") || !strcmp(name, "rstrip")) {
        json_t *chars = arg(a, 0, NULL);
        const char *set = json_is_string(chars) ? json_string_value(chars) : NULL;
        size_t i = 0, j = n;
#define STRIPPABLE(c) (set ? strchr(set, (c)) != NULL && (c) : is_space(c))
        if (name[0] != 'r')
            while (i < j && STRIPPABLE(p[i])) i++;
        if (name[0] != 'l')
            while (j > i && STRIPPABLE(p[j - 1])) j--;
#undef STRIPPABLE
        return json_stringn(p + i, j - i);
    }
    if (!strcmp(name, "upper") || !strcmp(name, "lower") || !strcmp(name, "title") ||
        !strcmp(name, "capitalize"))
        return str_recase(name[0], p, n);
    if (!strcmp(name, "split")) {
        json_t *sep = arg(a, 0, "sep"), *out = json_array();
        json_t *maxs = arg(a, 1, "maxsplit");
        long long maxsplit = json_is_integer(maxs) ? json_integer_value(maxs) : -1;
        if (json_is_string(sep)) {
            const char *d = json_string_value(sep);
            size_t dl = json_string_length(sep), i = 0, start = 0;
            if (!dl)
                return json_decref(out), rfail(r, line, "split() with an empty separator"), NULL;
            while (i + dl <= n && maxsplit != 0) {
                if (!memcmp(p + i, d, dl)) {
                    json_array_append_new(out, json_stringn(p + start, i - start));
                    i += dl;
                    start = i;
                    maxsplit--;
                } else
                    i++;
            }
            json_array_append_new(out, json_stringn(p + start, n - start));
        } else {
            size_t i = 0;
            while (i < n) {
                while (i < n && is_space(p[i])) i++;
                if (i >= n) break;
                size_t j = i;
                if (maxsplit == 0)
                    j = n;
                else
                    while (j < n && !is_space(p[j])) j++;
                size_t e2 = j;
                while (maxsplit == 0 && e2 > i && is_space(p[e2 - 1])) e2--;
                json_array_append_new(out, json_stringn(p + i, e2 - i));
                if (maxsplit > 0) maxsplit--;
                i = j;
            }
        }
        return out;
    }
    if (!strcmp(name, "replace")) {
        json_t *from = arg(a, 0, NULL), *to = arg(a, 1, NULL);
        if (!json_is_string(from) || !json_is_string(to))
            return rfail(r, line, "replace() needs two strings"), NULL;
        const char *f = json_string_value(from);
        size_t fl = json_string_length(from);
        jbuf b = {0};
        size_t i = 0, start = 0;
        if (fl == 0) return json_incref((json_t *)s);
        while (i + fl <= n) {
            if (!memcmp(p + i, f, fl)) {
                jb_put(&b, p + start, i - start);
                jb_put(&b, json_string_value(to), json_string_length(to));
                i += fl;
                start = i;
            } else
                i++;
        }
        jb_put(&b, p + start, n - start);
        return jstr_from(&b);
    }
    if (!strcmp(name, "find") || !strcmp(name, "count")) {
        json_t *x = arg(a, 0, NULL);
        if (!json_is_string(x)) return rfail(r, line, "%s() needs a string", name), NULL;
        const char *f = json_string_value(x);
        size_t fl = json_string_length(x);
        long long cnt = 0;
        for (size_t i = 0; i + fl <= n; i++)
            if (!memcmp(p + i, f, fl)) {
                if (name[0] == 'f') return json_integer((long long)utf8_count(p, i));
                cnt++;
                if (fl) i += fl - 1;
            }
        return json_integer(name[0] == 'f' ? -1 : cnt);
    }
    rfail(r, line, "the string method %s() is not supported", name);
    return NULL;
}

static json_t *dict_method(interp *r, const json_t *d, const char *name, const args *a, int line) {
    if (!strcmp(name, "items") || !strcmp(name, "keys") || !strcmp(name, "values")) {
        json_t *out = json_array();
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)d, k, x) {
            if (name[0] == 'i')
                json_array_append_new(out, json_pack("[sO]", k, x));
            else if (name[0] == 'k')
                json_array_append_new(out, json_string(k));
            else
                json_array_append(out, x);
        }
        return out;
    }
    if (!strcmp(name, "get")) {
        json_t *k = arg(a, 0, NULL), *dflt = arg(a, 1, NULL);
        json_t *v = json_is_string(k) ? json_object_get(d, json_string_value(k)) : NULL;
        return json_incref(v ? v : dflt ? dflt : json_null());
    }
    rfail(r, line, "the dict method %s() is not supported", name);
    return NULL;
}

static json_t *call(interp *r, const node *x) {
    const node *callee = x->kids.v[0];
    args a;
    json_t *res = NULL;
    if (callee->kind == N_ATTR) {
        json_t *obj = eval(r, callee->kids.v[0]);
        if (r->failed) return NULL;
        if (eval_args(r, x, 1, &a) == 0) {
            if (json_is_string(obj))
                res = str_method(r, obj, callee->s, &a, x->line);
            else if (json_is_object(obj))
                res = dict_method(r, obj, callee->s, &a, x->line);
            else
                rfail(r, x->line, "%s.%s() cannot be called", type_name(obj), callee->s);
        }
        args_free(&a);
        json_decref(obj);
        return res;
    }
    if (callee->kind != N_NAME) return rfail(r, x->line, "this expression cannot be called"), NULL;
    const char *fn = callee->s;
    json_t *m = lookup(r, fn);
    if (eval_args(r, x, 1, &a) < 0) {
        json_decref(m);
        args_free(&a);
        return NULL;
    }
    if (json_is_object(m) && json_object_get(m, MACRO_KEY)) {
        res = call_macro(r,
                         (const node *)(uintptr_t)json_integer_value(json_object_get(m, MACRO_KEY)),
                         &a, x->line);
    } else if (!strcmp(fn, "raise_exception")) {
        jbuf b = {0};
        to_str(&b, arg(&a, 0, NULL));
        rfail(r, x->line, "the chat template raised an exception: %s", b.p ? b.p : "");
        free(b.p);
    } else if (!strcmp(fn, "namespace") || !strcmp(fn, "dict")) {
        res = json_object();
        if (a.npos && json_is_object(a.pos[0])) json_object_update(res, a.pos[0]);
        for (int i = 0; i < a.nkw; i++)
            json_object_set(res, a.kwn[i], a.kwv[i] ? a.kwv[i] : json_null());
    } else if (!strcmp(fn, "range")) {
        long long lo = 0, hi, st = 1;
        if (a.npos == 1)
            hi = json_integer_value(a.pos[0]);
        else {
            lo = json_integer_value(a.pos[0]);
            hi = json_integer_value(a.pos[1]);
            if (a.npos > 2) st = json_integer_value(a.pos[2]);
        }
        if (st == 0 || a.npos == 0 || ((double)hi - (double)lo) / (double)st > (1 << 20)) {
            rfail(r, x->line,
                  "range() needs a non-zero step, at least one argument and at most 2^20 numbers");
        } else {
            res = json_array();
            for (long long i = lo; st > 0 ? i < hi : i > hi; i += st)
                json_array_append_new(res, json_integer(i));
        }
    } else
        rfail(r, x->line, "the function %s() is not defined", fn);
    json_decref(m);
    args_free(&a);
    return res;
}

static int run_test(interp *r, const char *name, const json_t *v, const args *a, int line) {
    if (!strcmp(name, "defined")) return v != NULL;
    if (!strcmp(name, "undefined")) return v == NULL;
    if (!strcmp(name, "none")) return json_is_null(v);
    if (!strcmp(name, "string")) return json_is_string(v);
    if (!strcmp(name, "number")) return json_is_number(v);
    if (!strcmp(name, "integer")) return json_is_integer(v);
    if (!strcmp(name, "float")) return json_is_real(v);
    if (!strcmp(name, "boolean")) return json_is_boolean(v);
    if (!strcmp(name, "true")) return json_is_true(v);
    if (!strcmp(name, "false")) return json_is_false(v);
    if (!strcmp(name, "mapping")) return json_is_object(v);
    if (!strcmp(name, "sequence") || !strcmp(name, "iterable"))
        return json_is_array(v) || json_is_string(v) || json_is_object(v);
    if (!strcmp(name, "even") || !strcmp(name, "odd"))
        return json_is_integer(v) && (json_integer_value(v) % 2 == 0) == (name[0] == 'e');
    if (!strcmp(name, "divisibleby")) {
        long long d = json_integer_value(arg(a, 0, NULL));
        return d && json_is_integer(v) && json_integer_value(v) % d == 0;
    }
    if (!strcmp(name, "equalto") || !strcmp(name, "eq") || !strcmp(name, "=="))
        return py_equal(v, arg(a, 0, NULL));
    if (!strcmp(name, "in")) {
        json_t *c = arg(a, 0, NULL);
        if (json_is_array(c)) {
            for (size_t i = 0; i < json_array_size(c); i++)
                if (py_equal(v, json_array_get(c, i))) return 1;
            return 0;
        }
        if (json_is_object(c)) return json_is_string(v) && json_object_get(c, json_string_value(v));
        if (json_is_string(c) && json_is_string(v))
            return memmem(json_string_value(c), json_string_length(c), json_string_value(v),
                          json_string_length(v)) != NULL;
        return 0;
    }
    return rfail(r, line, "the test '%s' is not supported", name), 0;
}

static json_t *apply_filter(interp *r, const char *name, json_t *v, const args *a, int line);

static json_t *filter(interp *r, const node *x) {
    json_t *v = eval(r, x->kids.v[0]);
    if (r->failed) return NULL;
    args a;
    json_t *res = NULL;
    if (eval_args(r, x, 1, &a) == 0) res = apply_filter(r, x->s, v, &a, x->line);
    args_free(&a);
    json_decref(v);
    return res;
}

static json_t *attr_of(const json_t *v, const char *path) {
    /* "a.b" attribute paths of map/selectattr. */
    json_t *cur = json_incref((json_t *)v);
    char buf2[256];
    snprintf(buf2, sizeof buf2, "%s", path);
    for (char *tokp = strtok(buf2, "."); tokp && cur; tokp = strtok(NULL, ".")) {
        json_t *nx = get_attr(cur, tokp);
        json_decref(cur);
        cur = nx;
    }
    return cur;
}

static json_t *apply_filter(interp *r, const char *name, json_t *v, const args *a, int line) {
    if (!strcmp(name, "safe")) return json_incref(v);
    /* The string filters: the method of the value's str(). */
    static const char *const as_method[][2] = {
        {"trim", "strip"},  {"upper", "upper"},           {"lower", "lower"},
        {"title", "title"}, {"capitalize", "capitalize"}, {"replace", "replace"}};
    for (size_t k = 0; k < sizeof as_method / sizeof as_method[0]; k++)
        if (!strcmp(name, as_method[k][0])) {
            jbuf b = {0};
            to_str(&b, v);
            json_t *s = jstr_from(&b);
            json_t *res = str_method(r, s, as_method[k][1], a, line);
            json_decref(s);
            return res;
        }
    if (!strcmp(name, "string")) {
        jbuf b = {0};
        to_str(&b, v);
        return jstr_from(&b);
    }
    if (!strcmp(name, "tojson")) {
        json_t *ind = arg(a, 0, "indent");
        jbuf b = {0};
        if (dump_json(&b, v, json_is_integer(ind) ? (int)json_integer_value(ind) : -1, 0)) {
            free(b.p);
            return rfail(r, line, "out of memory"), NULL;
        }
        return jstr_from(&b);
    }
    if (!strcmp(name, "length") || !strcmp(name, "count")) {
        if (json_is_string(v))
            return json_integer((long long)utf8_count(json_string_value(v), json_string_length(v)));
        if (json_is_array(v)) return json_integer((long long)json_array_size(v));
        if (json_is_object(v)) return json_integer((long long)json_object_size(v));
        if (!v) return json_integer(0);
        return rfail(r, line, "a %s has no length", type_name(v)), NULL;
    }
    if (!strcmp(name, "items")) {
        if (!json_is_object(v)) return rfail(r, line, "items of a %s", type_name(v)), NULL;
        return dict_method(r, v, "items", a, line);
    }
    if (!strcmp(name, "default") || !strcmp(name, "d")) {
        json_t *dflt = arg(a, 0, "default_value"), *boolean = arg(a, 1, "boolean");
        if (!v || (truthy(boolean) && !truthy(v))) return json_incref(dflt ? dflt : NULL);
        return json_incref(v);
    }
    if (!strcmp(name, "list")) return as_list(r, v, line);
    if (!strcmp(name, "first") || !strcmp(name, "last")) {
        json_t *l = as_list(r, v, line);
        if (!l) return NULL;
        size_t n = json_array_size(l);
        json_t *res = n ? json_incref(json_array_get(l, name[0] == 'f' ? 0 : n - 1)) : NULL;
        json_decref(l);
        return res;
    }
    if (!strcmp(name, "reverse")) { /* as the slice [::-1] */
        json_t *back = json_integer(-1), *res = do_slice(r, v, NULL, NULL, back, line);
        json_decref(back);
        return res;
    }
    if (!strcmp(name, "join")) {
        json_t *sep = arg(a, 0, "d"), *attr = arg(a, 1, "attribute");
        json_t *l = as_list(r, v, line);
        if (!l) return NULL;
        jbuf b = {0};
        for (size_t i = 0; i < json_array_size(l); i++) {
            if (i && json_is_string(sep))
                jb_put(&b, json_string_value(sep), json_string_length(sep));
            json_t *it = json_array_get(l, i);
            if (json_is_string(attr)) {
                json_t *av = attr_of(it, json_string_value(attr));
                to_str(&b, av);
                json_decref(av);
            } else
                to_str(&b, it);
        }
        json_decref(l);
        return jstr_from(&b);
    }
    if (!strcmp(name, "int") || !strcmp(name, "float") || !strcmp(name, "abs")) {
        double d = json_is_number(v)   ? json_number_value(v)
                   : json_is_string(v) ? strtod(json_string_value(v), NULL)
                   : json_is_true(v)   ? 1
                                       : 0;
        if (!strcmp(name, "abs")) {
            if (json_is_integer(v)) return json_integer(llabs(json_integer_value(v)));
            return json_real(fabs(d));
        }
        return name[0] == 'i' ? json_integer((long long)d) : json_real(d);
    }
    if (!strcmp(name, "selectattr") || !strcmp(name, "rejectattr")) {
        json_t *attr = arg(a, 0, NULL);
        if (!json_is_string(attr)) return rfail(r, line, "%s needs an attribute name", name), NULL;
        json_t *l = as_list(r, v, line), *out = json_array();
        if (!l) return json_decref(out), NULL;
        json_t *test = arg(a, 1, NULL);
        args ta = {0};
        if (a->npos > 2) {
            ta.pos[0] = a->pos[2];
            ta.npos = 1;
        }
        for (size_t i = 0; i < json_array_size(l) && !r->failed; i++) {
            json_t *it = json_array_get(l, i), *av = attr_of(it, json_string_value(attr));
            int ok = json_is_string(test) ? run_test(r, json_string_value(test), av, &ta, line)
                                          : truthy(av);
            json_decref(av);
            if (ok == (name[0] == 's')) json_array_append(out, it);
        }
        json_decref(l);
        return out;
    }
    if (!strcmp(name, "map")) {
        json_t *attr = arg(a, -1, "attribute");
        json_t *l = as_list(r, v, line), *out = json_array();
        if (!l) return json_decref(out), NULL;
        for (size_t i = 0; i < json_array_size(l) && !r->failed; i++) {
            json_t *it = json_array_get(l, i), *mv;
            if (json_is_string(attr))
                mv = attr_of(it, json_string_value(attr));
            else if (a->npos && json_is_string(a->pos[0])) {
                args rest = {0};
                for (int k = 1; k < a->npos; k++) rest.pos[rest.npos++] = a->pos[k];
                mv = apply_filter(r, json_string_value(a->pos[0]), it, &rest, line);
            } else
                return json_decref(l), json_decref(out),
                       rfail(r, line, "map needs a filter name or attribute="), NULL;
            json_array_append_new(out, mv ? mv : json_null());
        }
        json_decref(l);
        return out;
    }
    return rfail(r, line, "the filter '%s' is not supported", name), NULL;
}

static int compare(interp *r, const char *op, const json_t *a, const json_t *b, int line) {
    double x, y;
    if (json_is_number(a) && json_is_number(b)) {
        x = json_number_value(a);
        y = json_number_value(b);
    } else if (json_is_string(a) && json_is_string(b)) {
        int c = strcmp(json_string_value(a), json_string_value(b));
        x = c;
        y = 0;
    } else
        return rfail(r, line, "'%s' between a %s and a %s", op, type_name(a), type_name(b)), 0;
    if (!strcmp(op, "<")) return x < y;
    if (!strcmp(op, ">")) return x > y;
    if (!strcmp(op, "<=")) return x <= y;
    return x >= y;
}

static json_t *binop(interp *r, const node *x) {
    const char *op = x->s;
    json_t *a = eval(r, x->kids.v[0]);
    if (r->failed) return NULL;
    json_t *b = eval(r, x->kids.v[1]);
    json_t *res = NULL;
    if (r->failed) goto done;
    if (!strcmp(op, "==") || !strcmp(op, "!=")) {
        res = json_boolean(py_equal(a, b) == (op[0] == '='));
    } else if (!strcmp(op, "in") || !strcmp(op, "not in")) {
        args ta = {.pos = {b}, .npos = 1};
        int in = run_test(r, "in", a, &ta, x->line);
        res = json_boolean(in == (op[0] == 'i'));
    } else if (!strcmp(op, "~")) {
        jbuf s = {0};
        to_str(&s, a);
        to_str(&s, b);
        res = jstr_from(&s);
    } else if (op[0] == '<' || op[0] == '>') {
        res = json_boolean(compare(r, op, a, b, x->line));
    } else if (!strcmp(op, "+") && json_is_string(a) && json_is_string(b)) {
        jbuf s = {0};
        to_str(&s, a);
        to_str(&s, b);
        res = jstr_from(&s);
    } else if (!strcmp(op, "+") && json_is_array(a) && json_is_array(b)) {
        res = json_copy(a);
        json_array_extend(res, b);
    } else if (!strcmp(op, "*") && json_is_string(a) && json_is_integer(b)) {
        jbuf s = {0};
        long long times = json_integer_value(b);
        if (times > 0 && json_string_length(a) > 0 &&
            (unsigned long long)times > JINJA_MAX_OUTPUT / json_string_length(a)) {
            rfail(r, x->line, "a string repeated past %u bytes", JINJA_MAX_OUTPUT);
            goto done;
        }
        for (long long i = 0; i < times; i++) to_str(&s, a);
        res = jstr_from(&s);
    } else if ((json_is_number(a) || json_is_boolean(a)) &&
               (json_is_number(b) || json_is_boolean(b))) {
        int ints = !json_is_real(a) && !json_is_real(b);
        long long ia = json_is_integer(a) ? json_integer_value(a) : json_is_true(a);
        long long ib = json_is_integer(b) ? json_integer_value(b) : json_is_true(b);
        double fa = json_is_real(a) ? json_real_value(a) : (double)ia;
        double fb = json_is_real(b) ? json_real_value(b) : (double)ib;
        switch (op[0]) {
        case '+':
            res = ints ? json_integer(ia + ib) : json_real(fa + fb);
            break;
        case '-':
            res = ints ? json_integer(ia - ib) : json_real(fa - fb);
            break;
        case '*':
            res = op[1] == '*'
                      ? (ints && ib >= 0 ? json_integer((long long)pow((double)ia, (double)ib))
                                         : json_real(pow(fa, fb)))
                  : ints ? json_integer(ia * ib)
                         : json_real(fa * fb);
            break;
        case '/':
            if (fb == 0) {
                rfail(r, x->line, "division by zero");
                break;
            }
            if (op[1] == '/')
                res = ints ? json_integer((long long)floor((double)ia / (double)ib))
                           : json_real(floor(fa / fb));
            else
                res = json_real(fa / fb);
            break;
        case '%':
            if (fb == 0) {
                rfail(r, x->line, "modulo by zero");
                break;
            }
            res = ints ? json_integer(((ia % ib) + ib) % ib) : json_real(fmod(fa, fb));
            break;
        }
    } else
        rfail(r, x->line, "'%s' between a %s and a %s", op, type_name(a), type_name(b));
done:
    json_decref(a);
    json_decref(b);
    return res;
}

static json_t *eval(interp *r, const node *x) {
    if (r->failed) return NULL;
    switch (x->kind) {
    case N_LIT:
        return json_incref(x->val);
    case N_NAME:
        return lookup(r, x->s);
    case N_LIST:
    case N_TUPLE: {
        json_t *l = json_array();
        for (size_t i = 0; i < x->kids.n; i++) {
            json_t *v = eval(r, x->kids.v[i]);
            json_array_append_new(l, v ? v : json_null());
        }
        return l;
    }
    case N_DICT: {
        json_t *d = json_object();
        for (size_t i = 0; i + 1 < x->kids.n; i += 2) {
            json_t *k = eval(r, x->kids.v[i]), *v = eval(r, x->kids.v[i + 1]);
            if (json_is_string(k))
                json_object_set_new(d, json_string_value(k), v ? v : json_null());
            else
                json_decref(v);
            json_decref(k);
        }
        return d;
    }
    case N_ATTR: {
        json_t *v = eval(r, x->kids.v[0]), *res = get_attr(v, x->s);
        json_decref(v);
        return res;
    }
    case N_ITEM: {
        json_t *v = eval(r, x->kids.v[0]), *k = eval(r, x->kids.v[1]);
        json_t *res = get_item(r, v, k, x->line);
        json_decref(v);
        json_decref(k);
        return res;
    }
    case N_SLICE: {
        json_t *v = eval(r, x->kids.v[0]);
        json_t *p[3];
        for (int i = 0; i < 3; i++) p[i] = x->kids.v[i + 1] ? eval(r, x->kids.v[i + 1]) : NULL;
        json_t *res = do_slice(r, v, p[0], p[1], p[2], x->line);
        json_decref(v);
        for (int i = 0; i < 3; i++) json_decref(p[i]);
        return res;
    }
    case N_CALL:
        return call(r, x);
    case N_FILTER:
        return filter(r, x);
    case N_TEST: {
        json_t *v = eval(r, x->kids.v[0]);
        args a;
        int t = 0;
        if (eval_args(r, x, 1, &a) == 0) t = run_test(r, x->s, v, &a, x->line);
        args_free(&a);
        json_decref(v);
        return r->failed ? NULL : json_boolean(t != x->flag);
    }
    case N_BIN:
        return binop(r, x);
    case N_AND:
    case N_OR: {
        json_t *a = eval(r, x->kids.v[0]);
        if ((x->kind == N_AND) != truthy(a)) return a;
        json_decref(a);
        return eval(r, x->kids.v[1]);
    }
    case N_NOT: {
        json_t *a = eval(r, x->kids.v[0]);
        int t = truthy(a);
        json_decref(a);
        return json_boolean(!t);
    }
    case N_NEG: {
        json_t *a = eval(r, x->kids.v[0]);
        json_t *res = json_is_integer(a) ? json_integer(-json_integer_value(a))
                      : json_is_real(a)  ? json_real(-json_real_value(a))
                                         : NULL;
        if (!res) rfail(r, x->line, "cannot negate a %s", type_name(a));
        json_decref(a);
        return res;
    }
    case N_COND: {
        json_t *c = eval(r, x->kids.v[0]);
        int t = truthy(c);
        json_decref(c);
        if (t) return eval(r, x->kids.v[1]);
        return x->kids.v[2] ? eval(r, x->kids.v[2]) : NULL;
    }
    default:
        rfail(r, x->line, "a statement where an expression was expected");
        return NULL;
    }
}

/* Assigns v (stolen) to a target: a name, ns.attr, or a tuple of names. */
static int assign(interp *r, const node *target, json_t *v) {
    if (target->kind == N_NAME) return set_var(r, target->s, v);
    if (target->kind == N_ATTR) {
        json_t *obj = eval(r, target->kids.v[0]);
        if (!json_is_object(obj)) {
            json_decref(obj);
            json_decref(v);
            return rfail(r, target->line, "cannot set an attribute of a %s", type_name(obj));
        }
        json_object_set_new(obj, target->s, v ? v : json_null());
        json_decref(obj);
        return 0;
    }
    if (target->kind == N_TUPLE) {
        json_t *l = as_list(r, v, target->line);
        json_decref(v);
        if (!l) return -1;
        if (json_array_size(l) != target->kids.n) {
            json_decref(l);
            return rfail(r, target->line, "cannot unpack %zu values into %zu names",
                         json_array_size(l), target->kids.n);
        }
        for (size_t i = 0; i < target->kids.n; i++)
            if (assign(r, target->kids.v[i], json_incref(json_array_get(l, i)))) {
                json_decref(l);
                return -1;
            }
        json_decref(l);
        return 0;
    }
    json_decref(v);
    return rfail(r, target->line, "cannot assign to this expression");
}

static int exec_for(interp *r, const node *x) {
    json_t *it = eval(r, x->kids.v[1]);
    if (r->failed) return -1;
    json_t *items = as_list(r, it, x->line);
    json_decref(it);
    if (!items) return -1;
    /* The if clause filters before loop counts are known. */
    if (x->kids.v[2]) {
        json_t *kept = json_array();
        for (size_t i = 0; i < json_array_size(items) && !r->failed; i++) {
            if (push_frame(r)) break;
            assign(r, x->kids.v[0], json_incref(json_array_get(items, i)));
            json_t *c = eval(r, x->kids.v[2]);
            if (truthy(c)) json_array_append(kept, json_array_get(items, i));
            json_decref(c);
            pop_frame(r);
        }
        json_decref(items);
        items = kept;
    }
    size_t n = json_array_size(items);
    for (size_t i = 0; i < n && !r->failed; i++) {
        if (push_frame(r)) {
            json_decref(items);
            return rfail(r, x->line, "out of memory");
        }
        json_t *loop =
            json_pack("{sIsIsIsIsbsbsI}", "index", (json_int_t)i + 1, "index0", (json_int_t)i,
                      "revindex", (json_int_t)(n - i), "revindex0", (json_int_t)(n - i - 1),
                      "first", i == 0, "last", i + 1 == n, "length", (json_int_t)n);
        if (i > 0) json_object_set(loop, "previtem", json_array_get(items, i - 1));
        if (i + 1 < n) json_object_set(loop, "nextitem", json_array_get(items, i + 1));
        set_var(r, "loop", loop);
        assign(r, x->kids.v[0], json_incref(json_array_get(items, i)));
        exec_body(r, &x->body);
        pop_frame(r);
        r->cont = 0;
        if (r->brk) {
            r->brk = 0;
            break;
        }
    }
    json_decref(items);
    if (n == 0 && !r->failed) exec_body(r, &x->orelse);
    return r->failed ? -1 : 0;
}

static int exec_stmt(interp *r, const node *x) {
    switch (x->kind) {
    case S_TEXT:
        return jb_put(&r->out, json_string_value(x->val), json_string_length(x->val))
                   ? rfail(r, x->line, "out of memory")
                   : 0;
    case S_OUT: {
        json_t *v = eval(r, x->kids.v[0]);
        int rc = r->failed ? -1 : to_str(&r->out, v);
        json_decref(v);
        return rc;
    }
    case S_IF: {
        json_t *c = eval(r, x->kids.v[0]);
        int t = truthy(c);
        json_decref(c);
        if (r->failed) return -1;
        return exec_body(r, t ? &x->body : &x->orelse);
    }
    case S_FOR:
        return exec_for(r, x);
    case S_SET: {
        json_t *v;
        if (x->kids.v[1])
            v = eval(r, x->kids.v[1]);
        else {
            jbuf saved = r->out;
            memset(&r->out, 0, sizeof r->out);
            exec_body(r, &x->body);
            v = jstr_from(&r->out);
            r->out = saved;
        }
        if (r->failed) {
            json_decref(v);
            return -1;
        }
        return assign(r, x->kids.v[0], v);
    }
    case S_MACRO:
        return set_var(r, x->s, json_pack("{sI}", MACRO_KEY, (json_int_t)(uintptr_t)x));
    case S_BREAK:
        r->brk = 1;
        return 0;
    case S_CONTINUE:
        r->cont = 1;
        return 0;
    case S_BLOCK:
        return exec_body(r, &x->body);
    default:
        return rfail(r, x->line, "an expression where a statement was expected");
    }
}

static int exec_body(interp *r, const nodevec *body) {
    for (size_t i = 0; i < body->n && !r->failed && !r->brk && !r->cont; i++) {
        exec_stmt(r, body->v[i]);
        if (r->out.n > JINJA_MAX_OUTPUT)
            rfail(r, body->v[i]->line, "the rendering grows past %u bytes", JINJA_MAX_OUTPUT);
    }
    return r->failed ? -1 : 0;
}

int jinja_render(const jinja *j, const json_t *ctx, char **text, size_t *len, err *e) {
    *text = NULL;
    interp r = {.e = e};
    if (push_frame(&r)) return err_set(e, "out of memory");
    if (json_is_object(ctx)) json_object_update(r.frames[0], (json_t *)ctx);
    exec_body(&r, &j->body);
    while (r.n) pop_frame(&r);
    free(r.frames);
    if (r.failed) {
        free(r.out.p);
        return -1;
    }
    if (!r.out.p && jb_put(&r.out, "", 0)) return err_set(e, "out of memory");
    *text = r.out.p;
    if (len) *len = r.out.n;
    return 0;
}
