/* BPE as Hugging Face's tokenizer.json describes it, byte-level and
 * SentencePiece-style (see tokenizer.h): jansson reads the file, PCRE2 runs
 * the pre-tokenizer regexes (Oniguruma syntax rewritten to PCRE2's where the
 * two differ), utf8proc normalizes, base/utf8.h handles UTF-8. The reference it is checked against
 * is tokenizers.js, through tests/test_tokenizer.c and the fixtures of tests/reference/tokenizer/.
 */
#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <jansson.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Normalizers (NFC, ...) use libutf8proc. */
#include <utf8proc.h>

#include "base/fsutil.h"
#include "base/hash.h"
#include "base/utf8.h"

/* ---- growable arrays ---------------------------------------------------- */

typedef struct {
    int32_t *v;
    size_t n, cap;
} i32vec;

typedef struct {
    char *p;
    size_t n, cap;
} buf;

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 16;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

static int i32_push(i32vec *a, int32_t x) {
    if (grow((void **)&a->v, &a->cap, a->n + 1, sizeof *a->v)) return -1;
    a->v[a->n++] = x;
    return 0;
}

static int i32_append(i32vec *a, const int32_t *x, size_t n) {
    if (n == 0) return 0;
    if (grow((void **)&a->v, &a->cap, a->n + n, sizeof *a->v)) return -1;
    memcpy(a->v + a->n, x, n * sizeof *x);
    a->n += n;
    return 0;
}

static int buf_put(buf *b, const void *s, size_t n) {
    /* One spare byte so that a buffer can always be NUL-terminated. */
    if (grow((void **)&b->p, &b->cap, b->n + n + 1, 1)) return -1;
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
    return 0;
}

static int buf_puts(buf *b, const char *s) {
    return buf_put(b, s, strlen(s));
}

/* ---- hashing ------------------------------------------------------------ */

static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

static uint64_t hash_bytes(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * UINT64_C(0x100000001b3);
    return mix64(h ^ n);
}

/* Open addressing from 64-bit keys to 64-bit values (merge pairs, trie
 * edges, id -> added token). Keys are stored plus one: 0 marks a free slot. */
typedef struct {
    uint64_t *keys, *vals;
    size_t mask, n;
} u64map;

static int u64map_resize(u64map *m, size_t slots) {
    uint64_t *k = calloc(slots, sizeof *k), *v = malloc(slots * sizeof *v);
    if (!k || !v) {
        free(k);
        free(v);
        return -1;
    }
    for (size_t i = 0; m->keys && i <= m->mask; i++) {
        if (!m->keys[i]) continue;
        size_t j = mix64(m->keys[i]) & (slots - 1);
        while (k[j]) j = (j + 1) & (slots - 1);
        k[j] = m->keys[i];
        v[j] = m->vals[i];
    }
    free(m->keys);
    free(m->vals);
    m->keys = k;
    m->vals = v;
    m->mask = slots - 1;
    return 0;
}

static int u64map_put(u64map *m, uint64_t key, uint64_t val) {
    if (!m->keys || 2 * (m->n + 1) > m->mask + 1) {
        if (u64map_resize(m, m->keys ? 2 * (m->mask + 1) : 64)) return -1;
    }
    uint64_t k = key + 1;
    size_t j = mix64(k) & m->mask;
    while (m->keys[j] && m->keys[j] != k) j = (j + 1) & m->mask;
    if (!m->keys[j]) m->n++;
    m->keys[j] = k;
    m->vals[j] = val;
    return 0;
}

static int u64map_get(const u64map *m, uint64_t key, uint64_t *val) {
    if (!m->keys) return 0;
    uint64_t k = key + 1;
    for (size_t j = mix64(k) & m->mask; m->keys[j]; j = (j + 1) & m->mask)
        if (m->keys[j] == k) {
            *val = m->vals[j];
            return 1;
        }
    return 0;
}

static void u64map_free(u64map *m) {
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

/* ---- UTF-8 -------------------------------------------------------------- */

/* Appends bytes as UTF-8, each maximal invalid subsequence replaced by one
 * U+FFFD: the rule of Rust's from_utf8_lossy and of the WHATWG decoder that
 * the reference uses, so a character cut between tokens decodes alike. */
static int utf8_lossy_append(buf *out, const unsigned char *s, size_t n) {
    size_t i = 0, run = 0;
    while (i < n) {
        size_t l = utf8_valid_at(s + i, n - i);
        if (l) {
            i += l;
            continue;
        }
        if (buf_put(out, s + run, i - run) || buf_put(out, "\xEF\xBF\xBD", 3)) return -1;
        i += utf8_invalid_len(s + i, n - i);
        run = i;
    }
    return buf_put(out, s + run, n - run);
}

/* ---- byte-level alphabet ------------------------------------------------ */

/* GPT-2's map from bytes to printable characters: the printable bytes of
 * Latin-1 stand for themselves, the other 68 take U+0100.. in byte order. */
static unsigned char bl_enc[256][3]; /* [0] = length, then UTF-8 */
static int16_t bl_dec[0x200];        /* code point -> byte, -1 if none */

static void byte_level_fill(void) {
    int next = 256;
    for (int c = 0; c < 0x200; c++) bl_dec[c] = -1;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        int cp = printable ? b : next++;
        char u[4];
        size_t l = utf8_encode((uint32_t)cp, u);
        bl_enc[b][0] = (unsigned char)l;
        memcpy(bl_enc[b] + 1, u, l);
        bl_dec[cp] = (int16_t)b;
    }
}

/* Once per process, whichever thread opens the first tokenizer. */
static void byte_level_init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, byte_level_fill);
}

/* ---- regexes ------------------------------------------------------------ */

/* tokenizer.json stores Oniguruma patterns (Ruby syntax), which the Rust
 * library compiles with Oniguruma. PCRE2 reads almost all of them the same;
 * the differences that matter are rewritten here, as the reference does:
 *   \s \S         Oniguruma means Unicode White_Space (PCRE2: Perl space);
 *   (?i: ...)     ASCII letters fold to their other case and nothing else,
 *                 as in the reference; for the contraction patterns of these
 *                 files that is Oniguruma's result too (PCRE2 would also
 *                 match the long s for s; Oniguruma does not);
 *   X{n,m}+       a repeated interval in Ruby syntax, possessive in PCRE2;
 *   \h \H \uHHHH  Oniguruma's hex-digit class and code point escape. */
typedef struct {
    const char *p;
    size_t n, i;
    int fold;    /* inside (?i ...) */
    size_t atom; /* where the last atom starts in out, or SIZE_MAX */
    buf *out;
    char why[160];
} rewriter;

static int rw_fail(rewriter *r, const char *what) {
    snprintf(r->why, sizeof r->why, "%s at offset %zu", what, r->i);
    return -1;
}

static int is_ascii_letter(int c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static int other_case(int c) {
    return c >= 'a' && c <= 'z' ? c - 32 : c + 32;
}

/* Copies the escape at r->i; in_class: inside [...]. */
static int rw_escape(rewriter *r, int in_class) {
    const char *p = r->p;
    size_t i = r->i;
    if (i + 1 >= r->n) return rw_fail(r, "pattern ends with a backslash");
    char c = p[i + 1];
    int rc = 0;
    switch (c) {
    case 's':
        rc = buf_puts(r->out, "\\p{White_Space}");
        i += 2;
        break;
    case 'S':
        rc = buf_puts(r->out, "\\P{White_Space}");
        i += 2;
        break;
    case 'h':
        rc = buf_puts(r->out, in_class ? "0-9a-fA-F" : "[0-9a-fA-F]");
        i += 2;
        break;
    case 'H':
        if (in_class) return rw_fail(r, "\\H inside a character class is not supported");
        rc = buf_puts(r->out, "[^0-9a-fA-F]");
        i += 2;
        break;
    case 'u': {
        size_t k = 0;
        while (k < 4 && i + 2 + k < r->n && strchr("0123456789abcdefABCDEF", p[i + 2 + k]) &&
               p[i + 2 + k])
            k++;
        if (k != 4) return rw_fail(r, "\\u needs four hex digits");
        rc = buf_puts(r->out, "\\x{") || buf_put(r->out, p + i + 2, 4) || buf_puts(r->out, "}");
        i += 6;
        break;
    }
    case 'p':
    case 'P':
    case 'x':
        if (i + 2 < r->n && p[i + 2] == '{') {
            const char *close = memchr(p + i + 2, '}', r->n - (i + 2));
            if (!close) return rw_fail(r, "unterminated \\p{ or \\x{");
            size_t end = (size_t)(close - p) + 1;
            rc = buf_put(r->out, p + i, end - i);
            i = end;
            break;
        }
        /* \pL or \xHH: the escape and what follows it. */
        {
            size_t end = i + 3;
            if (c == 'x')
                while (end < i + 4 && end < r->n && strchr("0123456789abcdefABCDEF", p[end]) &&
                       p[end])
                    end++;
            if (end > r->n) end = r->n;
            rc = buf_put(r->out, p + i, end - i);
            i = end;
        }
        break;
    default: {
        size_t l = utf8_seq_len((unsigned char)c);
        if (i + 1 + l > r->n) return rw_fail(r, "truncated escape");
        rc = buf_put(r->out, p + i, 1 + l);
        i += 1 + l;
    }
    }
    r->i = i;
    return rc ? rw_fail(r, "out of memory") : 0;
}

/* Copies the character class at r->i ('['). */
static int rw_class(rewriter *r) {
    const char *p = r->p;
    int oom = buf_puts(r->out, "[");
    r->i++;
    if (r->i < r->n && p[r->i] == '^') {
        oom |= buf_puts(r->out, "^");
        r->i++;
    }
    if (r->i < r->n && p[r->i] == ']') { /* a leading ] is literal */
        oom |= buf_puts(r->out, "\\]");
        r->i++;
    }
    while (r->i < r->n && p[r->i] != ']') {
        if (p[r->i] == '[') {
            if (r->i + 1 < r->n && p[r->i + 1] == ':') {
                const char *end = strstr(p + r->i, ":]");
                if (!end || (size_t)(end - p) >= r->n) return rw_fail(r, "unterminated [:class:]");
                size_t stop = (size_t)(end - p) + 2;
                oom |= buf_put(r->out, p + r->i, stop - r->i);
                r->i = stop;
                continue;
            }
            return rw_fail(r, "nested character classes are not supported");
        }
        if (p[r->i] == '&' && r->i + 1 < r->n && p[r->i + 1] == '&')
            return rw_fail(r, "character class intersection (&&) is not supported");
        if (p[r->i] == '\\') {
            if (rw_escape(r, 1)) return -1;
            continue;
        }
        size_t l = utf8_seq_len((unsigned char)p[r->i]);
        if (r->i + l > r->n) return rw_fail(r, "truncated character");
        int c = (unsigned char)p[r->i];
        /* A range of plain characters: copied, and under (?i) its other case
         * added when both ends are letters of one case. */
        if (l == 1 && r->i + 2 < r->n && p[r->i + 1] == '-' && p[r->i + 2] != ']' &&
            p[r->i + 2] != '\\' && p[r->i + 2] != '[' && !((unsigned char)p[r->i + 2] & 0x80)) {
            int d = (unsigned char)p[r->i + 2];
            oom |= buf_put(r->out, p + r->i, 3);
            if (r->fold && is_ascii_letter(c) && is_ascii_letter(d) && (c >= 'a') == (d >= 'a')) {
                char o[3] = {(char)other_case(c), '-', (char)other_case(d)};
                oom |= buf_put(r->out, o, 3);
            }
            r->i += 3;
            continue;
        }
        oom |= buf_put(r->out, p + r->i, l);
        if (r->fold && l == 1 && is_ascii_letter(c)) {
            char o = (char)other_case(c);
            oom |= buf_put(r->out, &o, 1);
        }
        r->i += l;
    }
    if (r->i >= r->n) return rw_fail(r, "unterminated character class");
    r->i++;
    return oom || buf_puts(r->out, "]") ? rw_fail(r, "out of memory") : 0;
}

static int pattern_rewrite(const char *p, size_t n, buf *out, char *why, size_t why_len) {
    rewriter r = {.p = p, .n = n, .out = out, .atom = SIZE_MAX};
    /* Per open group: the fold state outside it and where it starts in out. */
    unsigned char fold_stack[64];
    size_t start_stack[64];
    int depth = 0, rc = 0;
    out->n = 0;
    while (r.i < n && rc == 0) {
        char c = p[r.i];
        size_t here = out->n;
        if (c == '\\') {
            rc = rw_escape(&r, 0);
            r.atom = here;
        } else if (c == '[') {
            rc = rw_class(&r);
            r.atom = here;
        } else if (c == '(') {
            if (depth == 64) {
                rc = rw_fail(&r, "groups nested too deeply");
                break;
            }
            if (!strncmp(p + r.i, "(?i)", 4) || !strncmp(p + r.i, "(?-i)", 5)) {
                /* Applies to the rest of the enclosing group. */
                r.fold = p[r.i + 2] == 'i';
                r.i += r.fold ? 4 : 5;
                continue;
            }
            fold_stack[depth] = (unsigned char)r.fold;
            start_stack[depth++] = here;
            if (!strncmp(p + r.i, "(?i:", 4) || !strncmp(p + r.i, "(?-i:", 5)) {
                r.fold = p[r.i + 2] == 'i';
                r.i += r.fold ? 4 : 5;
                rc = buf_puts(out, "(?:");
            } else if (r.i + 1 < n && p[r.i + 1] == '?') {
                size_t j = r.i + 2;
                if (j < n && strchr(":=!>", p[j]) && p[j])
                    j++;
                else if (j < n && p[j] == '<') {
                    if (j + 1 < n && (p[j + 1] == '=' || p[j + 1] == '!'))
                        j += 2;
                    else {
                        while (j < n && p[j] != '>') j++;
                        if (j == n) {
                            rc = rw_fail(&r, "unterminated group name");
                            break;
                        }
                        j++;
                    }
                } else {
                    rc = rw_fail(&r, "unsupported group syntax");
                    break;
                }
                rc = buf_put(out, p + r.i, j - r.i);
                r.i = j;
            } else {
                rc = buf_puts(out, "(");
                r.i++;
            }
            r.atom = SIZE_MAX;
        } else if (c == ')') {
            if (depth > 0) {
                r.fold = fold_stack[--depth];
                r.atom = start_stack[depth];
            } else
                r.atom = SIZE_MAX;
            rc = buf_puts(out, ")");
            r.i++;
        } else if (c == '|') {
            rc = buf_puts(out, "|");
            r.atom = SIZE_MAX;
            r.i++;
        } else if (c == '{') {
            /* An interval {n}, {n,}, {n,m} or {,m}; otherwise a literal. */
            size_t j = r.i + 1;
            while (j < n && ((p[j] >= '0' && p[j] <= '9') || p[j] == ',')) j++;
            if (j < n && p[j] == '}' && j > r.i + 1 && r.atom != SIZE_MAX) {
                size_t end = j + 1;
                int lead_comma = p[r.i + 1] == ',';
                if (end < n && p[end] == '+') {
                    /* X{n,m}+ in Ruby syntax: (X{n,m})+ */
                    buf atom = {0};
                    rc = buf_put(&atom, out->p + r.atom, out->n - r.atom);
                    out->n = r.atom;
                    rc = rc || buf_puts(out, "(?:") || buf_put(out, atom.p, atom.n) ||
                         buf_puts(out, lead_comma ? "{0" : "{") ||
                         buf_put(out, p + r.i + 1, end - r.i - 1) || buf_puts(out, ")+");
                    free(atom.p);
                    r.i = end + 1;
                } else {
                    rc = buf_puts(out, lead_comma ? "{0" : "{") ||
                         buf_put(out, p + r.i + 1, end - r.i - 1);
                    r.i = end;
                }
                r.atom = SIZE_MAX;
            } else {
                rc = buf_puts(out, "\\{");
                r.atom = here;
                r.i++;
            }
        } else if (r.fold && is_ascii_letter((unsigned char)c)) {
            char cls[4] = {'[', c, (char)other_case((unsigned char)c), ']'};
            rc = buf_put(out, cls, 4);
            r.atom = here;
            r.i++;
        } else {
            size_t l = utf8_seq_len((unsigned char)c);
            if (r.i + l > n) l = n - r.i;
            rc = buf_put(out, p + r.i, l);
            r.atom = strchr("*+?", c) && c ? SIZE_MAX : here;
            r.i += l;
        }
    }
    if (rc) {
        snprintf(why, why_len, "%s", r.why[0] ? r.why : "out of memory");
        return -1;
    }
    if (buf_put(out, "", 0)) {
        snprintf(why, why_len, "out of memory");
        return -1;
    }
    return 0;
}

typedef struct {
    pcre2_code *code;
    pcre2_match_data *md;
} regex;

/* Compiles an Oniguruma pattern, or a literal string when literal is set. */
static int regex_compile(regex *re, const char *pat, size_t n, int literal, err *e) {
    buf b = {0};
    char why[200];
    PCRE2_SPTR src = (PCRE2_SPTR)pat;
    size_t len = n;
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE;
    if (literal)
        opts = PCRE2_UTF | PCRE2_LITERAL;
    else {
        if (pattern_rewrite(pat, n, &b, why, sizeof why)) {
            free(b.p);
            return err_set(e, "regex /%.*s/: %s", (int)n, pat, why);
        }
        src = (PCRE2_SPTR)b.p;
        len = b.n;
    }
    pcre2_compile_context *cc = pcre2_compile_context_create(NULL);
    if (!cc) {
        free(b.p);
        return err_set(e, "out of memory");
    }
    pcre2_set_newline(cc, PCRE2_NEWLINE_LF);
    int code;
    PCRE2_SIZE off;
    re->code = pcre2_compile(src, len, opts, &code, &off, cc);
    pcre2_compile_context_free(cc);
    if (!re->code) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        int rc = err_set(e, "regex /%.*s/ does not compile (as PCRE2 /%.*s/): %s at offset %zu",
                         (int)n, pat, (int)len, (const char *)src, (const char *)msg, (size_t)off);
        free(b.p);
        return rc;
    }
    free(b.p);
    /* The JIT is an optimisation only: without it the interpreter runs. */
    (void)pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);
    re->md = pcre2_match_data_create_from_pattern(re->code, NULL);
    if (!re->md) return err_set(e, "out of memory");
    return 0;
}

static void regex_free(regex *re) {
    if (re->md) pcre2_match_data_free(re->md);
    if (re->code) pcre2_code_free(re->code);
    memset(re, 0, sizeof *re);
}

/* A piece of a string: [s, e), and whether the pattern matched it. */
typedef struct {
    size_t s, e;
    int match;
} seg;

typedef struct {
    seg *v;
    size_t n, cap;
} segvec;

static int seg_push(segvec *a, size_t s, size_t e, int match) {
    if (grow((void **)&a->v, &a->cap, a->n + 1, sizeof *a->v)) return -1;
    a->v[a->n++] = (seg){s, e, match};
    return 0;
}

/* Cuts s[0..n) into matched and unmatched pieces covering it, as Rust's
 * tokenizers does before applying a split behavior: an empty match still
 * cuts, and the search then moves one character on. */
static int regex_segments(const regex *re, pcre2_match_context *mc, const char *s, size_t n,
                          segvec *out, err *e) {
    out->n = 0;
    if (n == 0) return seg_push(out, 0, 0, 0) ? err_set(e, "out of memory") : 0;
    size_t prev = 0, pos = 0;
    while (pos <= n) {
        int rc = pcre2_match(re->code, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, re->md, mc);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return err_set(e, "regex match failed: %s", (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(re->md);
        size_t ms = ov[0], me = ov[1];
        if (ms < prev || me < ms) break; /* \K tricks: not in tokenizer patterns */
        if (ms > prev && seg_push(out, prev, ms, 0)) return err_set(e, "out of memory");
        if (seg_push(out, ms, me, 1)) return err_set(e, "out of memory");
        prev = me;
        if (me == ms) {
            if (me >= n) break;
            pos = me + utf8_seq_len((unsigned char)s[me]);
        } else
            pos = me;
    }
    if (prev < n && seg_push(out, prev, n, 0)) return err_set(e, "out of memory");
    return 0;
}

/* ---- the tokenizer ------------------------------------------------------ */

typedef struct {
    int32_t id;
    char *content;
    size_t len;
    int special, lstrip, rstrip, single_word, normalized;
} added_tok;

/* Added tokens as a byte trie: edges (node << 8 | byte) -> child, and per
 * node the added token ending there (-1 for none). Node 0 is the root. */
typedef struct {
    u64map edges;
    int32_t *term;
    size_t n_nodes, cap_nodes;
    unsigned char first[256]; /* bytes that start some token */
} trie;

typedef enum {
    SPLIT_REMOVED,
    SPLIT_ISOLATED,
    SPLIT_MERGED_PREV,
    SPLIT_MERGED_NEXT,
    SPLIT_CONTIGUOUS
} split_behavior;

typedef enum { STEP_SPLIT, STEP_BYTE_LEVEL, STEP_METASPACE } step_kind;

/* Metaspace's prepend_scheme: when a replacement character goes in front. */
typedef enum { PREPEND_ALWAYS, PREPEND_FIRST, PREPEND_NEVER } prepend_scheme;

/* One pre-tokenizer, with the scratch its pieces live in while the steps
 * after it run (each step cuts its input and hands every piece on). */
typedef struct {
    step_kind kind;
    regex re; /* Split's pattern; ByteLevel's GPT-2 regex when use_regex */
    int has_re;
    split_behavior behavior;
    int invert;
    int add_prefix_space;
    char replacement[8]; /* Metaspace: the character that stands for a space */
    prepend_scheme prepend;
    int split;
    segvec segs, keep;
    buf prefixed, mapped;
} pt_step;

/* One normalizer of the chain. */
typedef enum { NORM_UNICODE, NORM_REPLACE, NORM_PREPEND, NORM_STRIP } norm_kind;

typedef struct {
    norm_kind kind;
    int form;        /* NORM_UNICODE: utf8proc options */
    char *from, *to; /* NORM_REPLACE: literal pattern (or NULL with re) and content;
                        NORM_PREPEND: to */
    regex re;        /* NORM_REPLACE with a Regex pattern */
    int left, right; /* NORM_STRIP */
} norm_step;

/* One decoder of the chain (tokenizers' decode_chain: token strings in,
 * token strings out). */
typedef enum { DEC_REPLACE, DEC_BYTE_FALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE } dec_kind;

typedef struct {
    dec_kind kind;
    char *from, *to;  /* DEC_REPLACE; DEC_METASPACE: from = replacement */
    uint32_t content; /* DEC_STRIP: the character stripped */
    int start, stop;  /* DEC_STRIP: how many at most; DEC_METASPACE: start = strip
                         the first token's leading space */
} dec_step;

/* A cache of merged words: open addressing over entries whose key bytes and
 * ids live in two arenas; cleared whole when full. */
typedef struct {
    uint64_t hash;
    uint32_t key_off, key_len, ids_off, ids_n;
} cache_entry;

#define CACHE_SLOTS (1u << 17)
#define CACHE_MAX_ENTRIES (CACHE_SLOTS / 2)
#define CACHE_MAX_WORD 256
#define CACHE_MAX_BYTES (16u << 20)

typedef struct {
    uint32_t *slot; /* entry index + 1 */
    cache_entry *ent;
    size_t n_ent;
    buf keys;
    i32vec ids;
} word_cache;

/* A symbol of a word being merged: a token, linked to its neighbours. */
typedef struct {
    int32_t id, prev, next;
    uint32_t len; /* bytes; 0 once merged into its left neighbour */
} symbol;

typedef struct {
    uint32_t rank;
    int32_t pos, new_id;
} merge_cand;

struct tok {
    char *path, *dir;
    char fingerprint[65];

    /* model vocabulary: id -> string in vstr, string -> id by hash */
    buf vstr;
    uint32_t *voff, *vlen; /* UINT32_MAX offset: no token */
    size_t n_ids;          /* vocab_size: largest id + 1 */
    uint32_t *vslot;       /* id + 1 */
    size_t vmask;
    u64map merges; /* (a << 32 | b) -> (rank << 32 | merged id) */
    int32_t unk;
    int fuse_unk, ignore_merges;

    added_tok *added;
    size_t n_added;
    int32_t *added_of; /* id -> index into added, -1 */
    trie raw_trie, norm_trie;

    norm_step *norms; /* applied in order */
    int n_norm;
    int first_section;    /* the text being encoded is the input's first section */
    const char *encoding; /* the input of tok_encode, while it runs */

    pt_step *steps;
    int n_steps;

    int32_t *pre, *post; /* the template's ids around the sequence */
    size_t n_pre, n_post;

    dec_step *decs; /* the decoder chain; NULL with n_dec 0 when absent */
    int n_dec;
    int dec_byte_level;    /* the whole decoder is ByteLevel */
    char decoder_why[160]; /* why decoding is refused, or "" */
    int32_t byte_ids[256]; /* byte_fallback: the id of <0xNN>, -1 if none */
    int byte_fallback;

    int32_t bos, eos;

    pcre2_match_context *mctx;
    pcre2_jit_stack *jit_stack;
    regex word_re; /* one word character, for single_word */
    word_cache cache;
    symbol *sym;
    size_t sym_cap;
    merge_cand *heap;
    size_t heap_cap;
};

/* ---- vocabulary --------------------------------------------------------- */

static int32_t vocab_find(const tok *t, const char *s, size_t n) {
    if (!t->vslot) return -1;
    for (size_t j = hash_bytes(s, n) & t->vmask; t->vslot[j]; j = (j + 1) & t->vmask) {
        uint32_t id = t->vslot[j] - 1;
        if (t->vlen[id] == n && !memcmp(t->vstr.p + t->voff[id], s, n)) return (int32_t)id;
    }
    return -1;
}

static int32_t added_find(const tok *t, const char *s, size_t n) {
    for (size_t i = 0; i < t->n_added; i++)
        if (t->added[i].len == n && !memcmp(t->added[i].content, s, n)) return t->added[i].id;
    return -1;
}

/* ---- added tokens ------------------------------------------------------- */

static int trie_node(trie *tr) {
    if (grow((void **)&tr->term, &tr->cap_nodes, tr->n_nodes + 1, sizeof *tr->term)) return -1;
    tr->term[tr->n_nodes] = -1;
    return (int)tr->n_nodes++;
}

static int trie_add(trie *tr, const char *s, size_t n, int32_t index) {
    if (tr->n_nodes == 0 && trie_node(tr) < 0) return -1;
    uint64_t node = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t key = node << 8 | (unsigned char)s[i], child;
        if (!u64map_get(&tr->edges, key, &child)) {
            int c = trie_node(tr);
            if (c < 0 || u64map_put(&tr->edges, key, (uint64_t)c)) return -1;
            child = (uint64_t)c;
        }
        node = child;
    }
    tr->first[(unsigned char)s[0]] = 1;
    /* Two added tokens with one text: the first listed keeps it. */
    if (tr->term[node] < 0) tr->term[node] = index;
    return 0;
}

static void trie_free(trie *tr) {
    u64map_free(&tr->edges);
    free(tr->term);
    memset(tr, 0, sizeof *tr);
}

/* The longest added token that starts at s[i]: its index, and *end. */
static int32_t trie_longest(const trie *tr, const char *s, size_t n, size_t i, size_t *end) {
    int32_t best = -1;
    uint64_t node = 0, child;
    for (size_t j = i; j < n; j++) {
        if (!u64map_get(&tr->edges, node << 8 | (unsigned char)s[j], &child)) break;
        node = child;
        if (tr->term[node] >= 0) {
            best = tr->term[node];
            *end = j + 1;
        }
    }
    return best;
}

/* Whether the character at s[i] is a word character, as Rust regex's
 * Unicode \w counts them (letters, marks, decimal digits, letter numbers,
 * connector punctuation, joiners): the boundary test of single_word. */
static int is_word_at(tok *t, const char *s, size_t n, size_t i) {
    return pcre2_match(t->word_re.code, (PCRE2_SPTR)s, n, i, PCRE2_ANCHORED | PCRE2_NO_UTF_CHECK,
                       t->word_re.md, t->mctx) > 0;
}

typedef int (*section_fn)(tok *t, const char *s, size_t n, i32vec *out, err *e);

/* Finds the added tokens of tr in s, leftmost first and longest at a
 * position, and hands the text between them to fn. The flags behave as in
 * Hugging Face's AddedVocabulary: single_word skips a match with a word
 * character on either side; lstrip/rstrip take the whitespace before/after
 * into the token. A skipped match still consumes its bytes. */
static int split_added(tok *t, const trie *tr, const char *s, size_t n, section_fn fn, i32vec *out,
                       err *e) {
    if (tr->n_nodes == 0) return n ? fn(t, s, n, out, e) : 0;
    size_t done = 0; /* bytes already given out */
    for (size_t i = 0; i < n;) {
        size_t stop = 0;
        int32_t a = tr->first[(unsigned char)s[i]] ? trie_longest(tr, s, n, i, &stop) : -1;
        if (a < 0) {
            i++;
            continue;
        }
        const added_tok *at = &t->added[a];
        size_t start = i;
        i = stop;
        if (at->single_word) {
            size_t l;
            if (start > 0) {
                utf8_last(s, start, &l);
                if (is_word_at(t, s, start, start - l)) continue;
            }
            if (stop < n && is_word_at(t, s, n, stop)) continue;
        }
        if (at->lstrip) {
            size_t l;
            while (start > done && utf8_is_white_space(utf8_last(s, start, &l))) start -= l;
        }
        if (at->rstrip) {
            size_t l;
            while (stop < n &&
                   utf8_is_white_space(utf8_decode((const unsigned char *)s + stop, &l)))
                stop += l;
            i = stop;
        }
        if (start > done && fn(t, s + done, start - done, out, e)) return -1;
        if (i32_push(out, at->id)) return err_set(e, "out of memory");
        done = stop;
    }
    if (done < n) return fn(t, s + done, n - done, out, e);
    return 0;
}

/* ---- merging ------------------------------------------------------------ */

static int cache_init(word_cache *c) {
    c->slot = calloc(CACHE_SLOTS, sizeof *c->slot);
    c->ent = malloc(CACHE_MAX_ENTRIES * sizeof *c->ent);
    return c->slot && c->ent ? 0 : -1;
}

static void cache_clear(word_cache *c) {
    memset(c->slot, 0, CACHE_SLOTS * sizeof *c->slot);
    c->n_ent = 0;
    c->keys.n = 0;
    c->ids.n = 0;
}

static void cache_free(word_cache *c) {
    free(c->slot);
    free(c->ent);
    free(c->keys.p);
    free(c->ids.v);
    memset(c, 0, sizeof *c);
}

static const cache_entry *cache_get(const word_cache *c, const char *w, size_t n, uint64_t h) {
    for (size_t j = h & (CACHE_SLOTS - 1); c->slot[j]; j = (j + 1) & (CACHE_SLOTS - 1)) {
        const cache_entry *ce = &c->ent[c->slot[j] - 1];
        if (ce->hash == h && ce->key_len == n && !memcmp(c->keys.p + ce->key_off, w, n)) return ce;
    }
    return NULL;
}

/* Remembers a word's ids; a full cache starts over (memory stays bounded
 * on data files with an unbounded number of distinct words). */
static int cache_put(word_cache *c, const char *w, size_t n, uint64_t h, const int32_t *ids,
                     size_t k) {
    if (c->n_ent + 1 > CACHE_MAX_ENTRIES || c->keys.n + n > CACHE_MAX_BYTES ||
        c->ids.n + k > CACHE_MAX_BYTES)
        cache_clear(c);
    cache_entry ce = {h, (uint32_t)c->keys.n, (uint32_t)n, (uint32_t)c->ids.n, (uint32_t)k};
    if (buf_put(&c->keys, w, n) || i32_append(&c->ids, ids, k)) return -1;
    c->ent[c->n_ent++] = ce;
    size_t j = h & (CACHE_SLOTS - 1);
    while (c->slot[j]) j = (j + 1) & (CACHE_SLOTS - 1);
    c->slot[j] = (uint32_t)c->n_ent;
    return 0;
}

/* Lowest rank first, then leftmost: the order in which Rust's BPE applies
 * merges, which decides the result when two candidates overlap. */
static int cand_before(const merge_cand *a, const merge_cand *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(merge_cand *h, size_t *n, merge_cand c) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_before(&c, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = c;
}

static merge_cand heap_pop(merge_cand *h, size_t *n) {
    merge_cand top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const merge_cand *best = &last;
        if (l < *n && cand_before(&h[l], best)) {
            m = l;
            best = &h[l];
        }
        if (r < *n && cand_before(&h[r], best)) m = r;
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (*n) h[i] = last;
    return top;
}

static int merge_lookup(const tok *t, int32_t a, int32_t b, merge_cand *c, int32_t pos) {
    uint64_t v;
    if (!u64map_get(&t->merges, (uint64_t)(uint32_t)a << 32 | (uint32_t)b, &v)) return 0;
    *c = (merge_cand){(uint32_t)(v >> 32), pos, (int32_t)(uint32_t)v};
    return 1;
}

/* BPE of one pre-token (the characters of w, after the byte-level map). */
static int bpe_word(tok *t, const char *w, size_t n, i32vec *out, err *e) {
    if (t->ignore_merges) {
        int32_t id = vocab_find(t, w, n);
        if (id >= 0) return i32_push(out, id) ? err_set(e, "out of memory") : 0;
    }
    uint64_t h = hash_bytes(w, n);
    if (n < CACHE_MAX_WORD) {
        const cache_entry *ce = cache_get(&t->cache, w, n, h);
        if (ce)
            return i32_append(out, t->cache.ids.v + ce->ids_off, ce->ids_n)
                       ? err_set(e, "out of memory")
                       : 0;
    }
    if (grow((void **)&t->sym, &t->sym_cap, n, sizeof *t->sym) ||
        grow((void **)&t->heap, &t->heap_cap, 2 * n + 1, sizeof *t->heap))
        return err_set(e, "out of memory");
    symbol *sym = t->sym;
    size_t ns = 0;
    int prev_unknown = 0;
    for (size_t i = 0; i < n;) {
        size_t l = utf8_seq_len((unsigned char)w[i]);
        int32_t id = vocab_find(t, w + i, l);
        if (id < 0 && t->byte_fallback) {
            /* The character's bytes as <0xNN> tokens, when all exist. */
            size_t k = 0;
            while (k < l && t->byte_ids[(unsigned char)w[i + k]] >= 0) k++;
            if (k == l) {
                for (k = 0; k < l; k++, ns++)
                    sym[ns] = (symbol){t->byte_ids[(unsigned char)w[i + k]], (int32_t)ns - 1,
                                       (int32_t)ns + 1, 1};
                i += l;
                prev_unknown = 0;
                continue;
            }
        }
        if (id < 0) {
            if (t->unk < 0) {
                size_t cl;
                uint32_t cp = utf8_decode((const unsigned char *)w + i, &cl);
                return err_set(e,
                               "no token for the character U+%04X (\"%.*s\") of \"%.*s\" and "
                               "the model has no unk_token",
                               (unsigned)cp, (int)l, w + i, n > 60 ? 60 : (int)n, w);
            }
            if (t->fuse_unk && prev_unknown) { /* consecutive unknowns make one */
                sym[ns - 1].len += (uint32_t)l;
                i += l;
                continue;
            }
            id = t->unk;
            prev_unknown = 1;
        } else
            prev_unknown = 0;
        sym[ns] = (symbol){id, (int32_t)ns - 1, (int32_t)ns + 1, (uint32_t)l};
        ns++;
        i += l;
    }
    if (ns) sym[ns - 1].next = -1;
    size_t nh = 0;
    merge_cand c;
    for (size_t i = 0; i + 1 < ns; i++)
        if (merge_lookup(t, sym[i].id, sym[i + 1].id, &c, (int32_t)i)) heap_push(t->heap, &nh, c);
    while (nh) {
        merge_cand top = heap_pop(t->heap, &nh);
        symbol *left = &sym[top.pos];
        if (left->len == 0 || left->next < 0) continue;
        symbol *right = &sym[left->next];
        /* Stale when either side changed since the candidate was queued. */
        if (!merge_lookup(t, left->id, right->id, &c, top.pos) || c.new_id != top.new_id) continue;
        left->id = top.new_id;
        left->len += right->len;
        left->next = right->next;
        right->len = 0;
        if (left->next >= 0) sym[left->next].prev = top.pos;
        if (nh + 2 > t->heap_cap && grow((void **)&t->heap, &t->heap_cap, nh + 2, sizeof *t->heap))
            return err_set(e, "out of memory");
        if (left->prev >= 0 && merge_lookup(t, sym[left->prev].id, left->id, &c, left->prev))
            heap_push(t->heap, &nh, c);
        if (left->next >= 0 && merge_lookup(t, left->id, sym[left->next].id, &c, top.pos))
            heap_push(t->heap, &nh, c);
    }
    size_t first = out->n;
    for (int32_t i = ns ? 0 : -1; i >= 0; i = sym[i].next)
        if (i32_push(out, sym[i].id)) return err_set(e, "out of memory");
    if (n < CACHE_MAX_WORD && cache_put(&t->cache, w, n, h, out->v + first, out->n - first))
        return err_set(e, "out of memory");
    return 0;
}

/* ---- pre-tokenizers ----------------------------------------------------- */

/* The pieces a split behavior keeps, from the matched/unmatched pieces. */
static int split_keep(const pt_step *st, const segvec *in, segvec *out) {
    out->n = 0;
    int prev_match = 0;
    if (st->behavior == SPLIT_MERGED_NEXT) {
        for (size_t k = in->n; k-- > 0;) {
            seg g = in->v[k];
            int m = g.match ^ st->invert;
            if (m && !prev_match && out->n > 0)
                out->v[out->n - 1].s = g.s;
            else if (seg_push(out, g.s, g.e, 0))
                return -1;
            prev_match = m;
        }
        for (size_t a = 0, b = out->n ? out->n - 1 : 0; a < b; a++, b--) {
            seg x = out->v[a];
            out->v[a] = out->v[b];
            out->v[b] = x;
        }
        return 0;
    }
    for (size_t k = 0; k < in->n; k++) {
        seg g = in->v[k];
        int m = g.match ^ st->invert;
        switch (st->behavior) {
        case SPLIT_REMOVED:
            if (!m && seg_push(out, g.s, g.e, 0)) return -1;
            break;
        case SPLIT_ISOLATED:
            if (seg_push(out, g.s, g.e, 0)) return -1;
            break;
        case SPLIT_MERGED_PREV:
            if (m && !prev_match && out->n > 0)
                out->v[out->n - 1].e = g.e;
            else if (seg_push(out, g.s, g.e, 0))
                return -1;
            break;
        case SPLIT_CONTIGUOUS:
            if (m == prev_match && out->n > 0)
                out->v[out->n - 1].e = g.e;
            else if (seg_push(out, g.s, g.e, 0))
                return -1;
            break;
        case SPLIT_MERGED_NEXT:
            break;
        }
        prev_match = m;
    }
    return 0;
}

static int pretokenize(tok *t, int k, const char *s, size_t n, i32vec *out, err *e);

/* Replaces every space by `to` (tl bytes) into b. */
static int replace_all(buf *b, const char *s, size_t n, const char *from, size_t fl, const char *to,
                       size_t tl) {
    size_t done = 0;
    for (size_t i = 0; fl && i + fl <= n;) {
        if (memcmp(s + i, from, fl)) {
            i++;
            continue;
        }
        if (buf_put(b, s + done, i - done) || buf_put(b, to, tl)) return -1;
        i += fl;
        done = i;
    }
    return buf_put(b, s + done, n - done);
}

/* Metaspace: spaces become the replacement character, which also goes in
 * front (always, or only in the input's first section); with split, every
 * replacement character starts a new pre-token (MergedWithNext). */
static int metaspace(tok *t, int k, pt_step *st, const char *s, size_t n, i32vec *out, err *e) {
    size_t rl = strlen(st->replacement);
    st->mapped.n = 0;
    int lead = n >= 1 && s[0] == ' ';
    if (!lead && n >= rl && !memcmp(s, st->replacement, rl)) lead = 1;
    if (!lead &&
        (st->prepend == PREPEND_ALWAYS || (st->prepend == PREPEND_FIRST && t->first_section)) &&
        buf_put(&st->mapped, st->replacement, rl))
        return err_set(e, "out of memory");
    if (replace_all(&st->mapped, s, n, " ", 1, st->replacement, rl))
        return err_set(e, "out of memory");
    const char *m = st->mapped.p;
    size_t mn = st->mapped.n;
    if (!st->split) return pretokenize(t, k + 1, m, mn, out, e);
    /* The pieces are cut from a copy: the steps after this one reuse mapped. */
    char *copy = malloc(mn + 1);
    if (!copy) return err_set(e, "out of memory");
    memcpy(copy, m, mn);
    int rc = 0;
    size_t start = 0;
    for (size_t i = rl; i + rl <= mn && !rc; i++)
        if (!memcmp(copy + i, st->replacement, rl)) {
            if (i > start) rc = pretokenize(t, k + 1, copy + start, i - start, out, e);
            start = i;
        }
    if (!rc && mn > start) rc = pretokenize(t, k + 1, copy + start, mn - start, out, e);
    free(copy);
    return rc;
}

/* Runs pre-tokenizer k and the ones after it on s; the last hands each
 * pre-token to BPE. */
static int pretokenize(tok *t, int k, const char *s, size_t n, i32vec *out, err *e) {
    if (k == t->n_steps) return bpe_word(t, s, n, out, e);
    pt_step *st = &t->steps[k];
    if (st->kind == STEP_SPLIT) {
        if (regex_segments(&st->re, t->mctx, s, n, &st->segs, e)) return -1;
        if (split_keep(st, &st->segs, &st->keep)) return err_set(e, "out of memory");
        for (size_t i = 0; i < st->keep.n; i++) {
            seg g = st->keep.v[i];
            if (g.e > g.s && pretokenize(t, k + 1, s + g.s, g.e - g.s, out, e)) return -1;
        }
        return 0;
    }
    if (st->kind == STEP_METASPACE) return metaspace(t, k, st, s, n, out, e);
    /* ByteLevel: optional leading space, optional GPT-2 split, then every
     * byte becomes its printable stand-in. */
    if (st->add_prefix_space && (n == 0 || s[0] != ' ')) {
        st->prefixed.n = 0;
        if (buf_put(&st->prefixed, " ", 1) || buf_put(&st->prefixed, s, n))
            return err_set(e, "out of memory");
        s = st->prefixed.p;
        n = st->prefixed.n;
    }
    size_t pieces = 1;
    if (st->has_re) {
        if (regex_segments(&st->re, t->mctx, s, n, &st->segs, e)) return -1;
        pieces = st->segs.n;
    }
    for (size_t i = 0; i < pieces; i++) {
        size_t a = st->has_re ? st->segs.v[i].s : 0, b = st->has_re ? st->segs.v[i].e : n;
        if (b <= a) continue;
        st->mapped.n = 0;
        for (size_t j = a; j < b; j++) {
            const unsigned char *m = bl_enc[(unsigned char)s[j]];
            if (buf_put(&st->mapped, m + 1, m[0])) return err_set(e, "out of memory");
        }
        if (pretokenize(t, k + 1, st->mapped.p, st->mapped.n, out, e)) return -1;
    }
    return 0;
}

/* ---- normalizers -------------------------------------------------------- */

/* Strips Unicode White_Space from the ends of s[0..*n) as asked; returns
 * where the kept part starts. */
static size_t strip_white(const char *s, size_t *n, int left, int right) {
    size_t a = 0, b = *n, l;
    while (left && a < b && utf8_is_white_space(utf8_decode((const unsigned char *)s + a, &l)))
        a += l;
    while (right && b > a && utf8_is_white_space(utf8_last(s + a, b - a, &l))) b -= l;
    *n = b - a;
    return a;
}

/* Runs one normalizer over s[0..n) into *res (malloc'd). */
static int normalize_step(const norm_step *ns, const char *s, size_t n, char **res, size_t *rn,
                          pcre2_match_context *mc, err *e) {
    buf b = {0};
    int rc = 0;
    switch (ns->kind) {
    case NORM_UNICODE: {
        utf8proc_uint8_t *dst = NULL;
        utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                          (utf8proc_option_t)ns->form);
        if (r < 0) return err_set(e, "normalizing: %s", utf8proc_errmsg(r));
        *res = (char *)dst;
        *rn = (size_t)r;
        return 0;
    }
    case NORM_REPLACE:
        if (ns->from)
            rc = replace_all(&b, s, n, ns->from, strlen(ns->from), ns->to, strlen(ns->to));
        else {
            segvec sv = {0};
            if (regex_segments(&ns->re, mc, s, n, &sv, e)) return -1;
            for (size_t i = 0; i < sv.n && !rc; i++)
                rc = sv.v[i].match ? buf_puts(&b, ns->to)
                                   : buf_put(&b, s + sv.v[i].s, sv.v[i].e - sv.v[i].s);
            free(sv.v);
        }
        break;
    case NORM_PREPEND: /* as Rust's: nothing goes in front of an empty text */
        rc = (n && buf_puts(&b, ns->to)) || buf_put(&b, s, n);
        break;
    case NORM_STRIP: {
        size_t m = n, a = strip_white(s, &m, ns->left, ns->right);
        rc = buf_put(&b, s + a, m);
        break;
    }
    }
    if (rc || (!b.p && buf_put(&b, "", 0))) {
        free(b.p);
        return err_set(e, "out of memory");
    }
    *res = b.p;
    *rn = b.n;
    return 0;
}

static int normalize(const tok *t, const char *s, size_t n, char **res, size_t *rn, err *e) {
    char *cur = NULL;
    size_t len = n;
    for (int i = 0; i < t->n_norm; i++) {
        char *next = NULL;
        size_t nl = 0;
        int rc = normalize_step(&t->norms[i], cur ? cur : s, len, &next, &nl, t->mctx, e);
        free(cur);
        if (rc) return -1;
        cur = next;
        len = nl;
    }
    *res = cur;
    *rn = len;
    return 0;
}

static int section_normalized(tok *t, const char *s, size_t n, i32vec *out, err *e) {
    return pretokenize(t, 0, s, n, out, e);
}

/* Text between the added tokens matched before normalization. */
static int section_raw(tok *t, const char *s, size_t n, i32vec *out, err *e) {
    t->first_section = s == t->encoding;
    if (t->n_norm == 0) return split_added(t, &t->norm_trie, s, n, section_normalized, out, e);
    char *norm = NULL;
    size_t nn = 0;
    if (normalize(t, s, n, &norm, &nn, e)) return -1;
    int rc = split_added(t, &t->norm_trie, norm, nn, section_normalized, out, e);
    free(norm);
    return rc;
}

/* ---- loading tokenizer.json --------------------------------------------- */

static const char *jstr(const json_t *o, const char *key) {
    return json_string_value(json_object_get(o, key));
}

static int jbool(const json_t *o, const char *key, int dflt) {
    const json_t *v = json_object_get(o, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

/* The model vocabulary, then the id -> string and string -> id tables. */
static int load_vocab(tok *t, const json_t *vocab, err *e) {
    if (!json_is_object(vocab)) return err_set(e, "model.vocab is missing or not an object");
    size_t count = json_object_size(vocab);
    int64_t max_id = -1;
    const char *key;
    const json_t *val;
    json_object_foreach((json_t *)vocab, key, val) {
        if (!json_is_integer(val) || json_integer_value(val) < 0 ||
            json_integer_value(val) >= INT32_MAX)
            return err_set(e, "model.vocab[\"%s\"] is not a token id (a non-negative integer)",
                           key);
        if (json_integer_value(val) > max_id) max_id = json_integer_value(val);
    }
    for (size_t i = 0; i < t->n_added; i++)
        if (t->added[i].id > max_id) max_id = t->added[i].id;
    t->n_ids = (size_t)(max_id + 1);
    t->voff = malloc((t->n_ids ? t->n_ids : 1) * sizeof *t->voff);
    t->vlen = calloc(t->n_ids ? t->n_ids : 1, sizeof *t->vlen);
    size_t slots = 64;
    while (slots < 2 * count + 2) slots *= 2;
    t->vslot = calloc(slots, sizeof *t->vslot);
    t->vmask = slots - 1;
    if (!t->voff || !t->vlen || !t->vslot) return err_set(e, "out of memory");
    for (size_t i = 0; i < t->n_ids; i++) t->voff[i] = UINT32_MAX;
    size_t klen;
    json_object_keylen_foreach((json_t *)vocab, key, klen, val) {
        uint32_t id = (uint32_t)json_integer_value(val);
        if (t->voff[id] != UINT32_MAX)
            return err_set(e, "model.vocab gives id %u to both \"%s\" and \"%s\"", id,
                           t->vstr.p + t->voff[id], key);
        if (t->vstr.n + klen + 1 > UINT32_MAX) return err_set(e, "model.vocab is too large");
        t->voff[id] = (uint32_t)t->vstr.n;
        t->vlen[id] = (uint32_t)klen;
        /* Strings are kept NUL-terminated so tok_token_text can hand them out. */
        if (buf_put(&t->vstr, key, klen + 1)) return err_set(e, "out of memory");
        size_t j = hash_bytes(key, klen) & t->vmask;
        while (t->vslot[j]) j = (j + 1) & t->vmask;
        t->vslot[j] = id + 1;
    }
    return 0;
}

/* One merge, "a b" or ["a", "b"], into the (a, b) -> (rank, a+b) map. */
static int load_merge(tok *t, const json_t *m, size_t rank, buf *scratch, err *e) {
    const char *a, *b;
    size_t na, nb;
    if (json_is_string(m)) {
        const char *s = json_string_value(m);
        size_t n = json_string_length(m);
        const char *sp = memchr(s, ' ', n);
        if (!sp || memchr(sp + 1, ' ', n - (size_t)(sp - s) - 1))
            return err_set(e, "model.merges[%zu] \"%s\" is not two tokens separated by one space",
                           rank, s);
        a = s;
        na = (size_t)(sp - s);
        b = sp + 1;
        nb = n - na - 1;
    } else if (json_is_array(m) && json_array_size(m) == 2 &&
               json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
        a = json_string_value(json_array_get(m, 0));
        na = json_string_length(json_array_get(m, 0));
        b = json_string_value(json_array_get(m, 1));
        nb = json_string_length(json_array_get(m, 1));
    } else
        return err_set(e, "model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", rank);
    int32_t ia = vocab_find(t, a, na), ib = vocab_find(t, b, nb);
    scratch->n = 0;
    if (buf_put(scratch, a, na) || buf_put(scratch, b, nb)) return err_set(e, "out of memory");
    int32_t ic = vocab_find(t, scratch->p, scratch->n);
    const char *missing = ia < 0 ? a : ib < 0 ? b : ic < 0 ? scratch->p : NULL;
    if (missing)
        return err_set(e, "model.merges[%zu] (\"%.*s\" \"%.*s\"): \"%s\" is not in the vocabulary",
                       rank, (int)na, a, (int)nb, b, missing);
    /* A repeated pair keeps the later rank, as a map built in order does. */
    if (u64map_put(&t->merges, (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib,
                   (uint64_t)rank << 32 | (uint32_t)ic))
        return err_set(e, "out of memory");
    return 0;
}

static int load_model(tok *t, const json_t *model, err *e) {
    if (!json_is_object(model)) return err_set(e, "\"model\" is missing or not an object");
    const char *type = jstr(model, "type");
    /* Old files leave the type out; their fields tell. */
    if (!type && json_object_get(model, "merges")) type = "BPE";
    if (!type || strcmp(type, "BPE"))
        return err_set(e, "model type \"%s\" is not supported (only BPE)", type ? type : "(none)");
    const json_t *dropout = json_object_get(model, "dropout");
    if (json_is_number(dropout) && json_number_value(dropout) > 0)
        return err_set(e, "BPE dropout %g is not supported (training data must be deterministic)",
                       json_number_value(dropout));
    const char *cont = jstr(model, "continuing_subword_prefix");
    const char *eow = jstr(model, "end_of_word_suffix");
    if (cont && cont[0])
        return err_set(e, "BPE continuing_subword_prefix \"%s\" is not supported", cont);
    if (eow && eow[0]) return err_set(e, "BPE end_of_word_suffix \"%s\" is not supported", eow);
    t->byte_fallback = jbool(model, "byte_fallback", 0);
    t->ignore_merges = jbool(model, "ignore_merges", 0);
    t->fuse_unk = jbool(model, "fuse_unk", 0);
    if (load_vocab(t, json_object_get(model, "vocab"), e)) return -1;
    t->unk = -1;
    const char *unk = jstr(model, "unk_token");
    if (unk && (t->unk = vocab_find(t, unk, strlen(unk))) < 0)
        return err_set(e, "model.unk_token \"%s\" is not in the vocabulary", unk);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_ids[b] = t->byte_fallback ? vocab_find(t, name, 6) : -1;
    }
    const json_t *merges = json_object_get(model, "merges");
    if (!json_is_array(merges)) return err_set(e, "model.merges is missing or not a list");
    buf scratch = {0};
    for (size_t i = 0; i < json_array_size(merges); i++)
        if (load_merge(t, json_array_get(merges, i), i, &scratch, e)) {
            free(scratch.p);
            return -1;
        }
    free(scratch.p);
    return 0;
}

static int load_added(tok *t, const json_t *list, err *e) {
    if (!list || json_is_null(list)) return 0;
    if (!json_is_array(list)) return err_set(e, "\"added_tokens\" is not a list");
    t->added = calloc(json_array_size(list) + 1, sizeof *t->added);
    if (!t->added) return err_set(e, "out of memory");
    for (size_t i = 0; i < json_array_size(list); i++) {
        const json_t *a = json_array_get(list, i);
        const json_t *id = json_object_get(a, "id");
        const json_t *content = json_object_get(a, "content");
        if (!json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) >= INT32_MAX || !json_is_string(content))
            return err_set(e, "added_tokens[%zu] needs an integer \"id\" and a string \"content\"",
                           i);
        if (json_string_length(content) == 0)
            return err_set(e, "added_tokens[%zu] has an empty content", i);
        added_tok *at = &t->added[t->n_added++];
        at->id = (int32_t)json_integer_value(id);
        at->len = json_string_length(content);
        at->content = malloc(at->len + 1);
        if (!at->content) return err_set(e, "out of memory");
        memcpy(at->content, json_string_value(content), at->len + 1);
        at->special = jbool(a, "special", 0);
        at->lstrip = jbool(a, "lstrip", 0);
        at->rstrip = jbool(a, "rstrip", 0);
        at->single_word = jbool(a, "single_word", 0);
        at->normalized = jbool(a, "normalized", !at->special);
    }
    return 0;
}

/* After the normalizer is known: the id -> added table and the two tries. */
static int index_added(tok *t, err *e) {
    t->added_of = malloc((t->n_ids ? t->n_ids : 1) * sizeof *t->added_of);
    if (!t->added_of) return err_set(e, "out of memory");
    for (size_t i = 0; i < t->n_ids; i++) t->added_of[i] = -1;
    for (size_t i = 0; i < t->n_added; i++) {
        added_tok *at = &t->added[i];
        if (t->added_of[at->id] < 0) t->added_of[at->id] = (int32_t)i;
        if (at->normalized && t->n_norm > 0) {
            char *norm = NULL;
            size_t nn = 0;
            if (normalize(t, at->content, at->len, &norm, &nn, e))
                return err_wrap(e, "added token \"%s\"", at->content);
            int rc = nn ? trie_add(&t->norm_trie, norm, nn, (int32_t)i) : 0;
            free(norm);
            if (rc) return err_set(e, "out of memory");
        } else if (trie_add(&t->raw_trie, at->content, at->len, (int32_t)i))
            return err_set(e, "out of memory");
    }
    return 0;
}

static int load_normalizer(tok *t, const json_t *n, err *e) {
    if (!n || json_is_null(n)) return 0;
    const char *type = jstr(n, "type");
    if (!type) return err_set(e, "normalizer has no \"type\"");
    if (!strcmp(type, "Sequence")) {
        const json_t *list = json_object_get(n, "normalizers");
        if (!json_is_array(list))
            return err_set(e, "normalizer Sequence has no \"normalizers\" list");
        for (size_t i = 0; i < json_array_size(list); i++)
            if (load_normalizer(t, json_array_get(list, i), e)) return -1;
        return 0;
    }
    norm_step ns = {0};
    int form = -1;
    static const char *const forms[] = {"NFC", "NFD", "NFKC", "NFKD"};
    for (int i = 0; i < 4; i++)
        if (!strcmp(type, forms[i])) form = i;
    static const int options[] = {UTF8PROC_STABLE | UTF8PROC_COMPOSE,
                                  UTF8PROC_STABLE | UTF8PROC_DECOMPOSE,
                                  UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT,
                                  UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT};
    if (form >= 0) {
        ns.kind = NORM_UNICODE;
        ns.form = options[form];
    } else if (!strcmp(type, "Replace")) {
        const json_t *pat = json_object_get(n, "pattern");
        const json_t *rx = json_object_get(pat, "Regex"), *str = json_object_get(pat, "String");
        const char *content = jstr(n, "content");
        if ((!json_is_string(rx) && !json_is_string(str)) || !content)
            return err_set(e, "normalizer Replace needs a pattern {\"String\": ...} or "
                              "{\"Regex\": ...} and a \"content\" string");
        ns.kind = NORM_REPLACE;
        ns.to = strdup(content);
        if (json_is_string(str)) {
            ns.from = strdup(json_string_value(str));
            if (ns.from && !ns.from[0])
                return free(ns.to), free(ns.from), err_set(e, "normalizer Replace: empty pattern");
        } else if (regex_compile(&ns.re, json_string_value(rx), json_string_length(rx), 0, e)) {
            free(ns.to);
            return err_wrap(e, "normalizer Replace");
        }
        if (!ns.to || (json_is_string(str) && !ns.from)) {
            free(ns.to);
            free(ns.from);
            return err_set(e, "out of memory");
        }
    } else if (!strcmp(type, "Prepend")) {
        const char *prepend = jstr(n, "prepend");
        if (!prepend) return err_set(e, "normalizer Prepend has no \"prepend\" string");
        ns.kind = NORM_PREPEND;
        if (!(ns.to = strdup(prepend))) return err_set(e, "out of memory");
    } else if (!strcmp(type, "Strip")) {
        ns.kind = NORM_STRIP;
        ns.left = jbool(n, "strip_left", 0);
        ns.right = jbool(n, "strip_right", 0);
    } else
        return err_set(e,
                       "normalizer \"%s\" is not supported (supported: NFC, NFD, NFKC, NFKD, "
                       "Replace, Prepend, Strip and Sequence of them)",
                       type);
    norm_step *q = realloc(t->norms, (size_t)(t->n_norm + 1) * sizeof *q);
    if (!q) {
        free(ns.from);
        free(ns.to);
        regex_free(&ns.re);
        return err_set(e, "out of memory");
    }
    t->norms = q;
    t->norms[t->n_norm++] = ns;
    return 0;
}

static int add_step(tok *t, pt_step **st, err *e) {
    pt_step *s = realloc(t->steps, (size_t)(t->n_steps + 1) * sizeof *s);
    if (!s) return err_set(e, "out of memory");
    t->steps = s;
    *st = &s[t->n_steps++];
    memset(*st, 0, sizeof **st);
    return 0;
}

/* GPT-2's pre-tokenizer regex, used by ByteLevel with use_regex. */
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int load_pretokenizer(tok *t, const json_t *p, err *e) {
    if (!p || json_is_null(p)) return 0;
    const char *type = jstr(p, "type");
    if (!type) return err_set(e, "pre_tokenizer has no \"type\"");
    pt_step *st;
    if (!strcmp(type, "Sequence")) {
        const json_t *list = json_object_get(p, "pretokenizers");
        if (!json_is_array(list))
            return err_set(e, "pre_tokenizer Sequence has no \"pretokenizers\" list");
        for (size_t i = 0; i < json_array_size(list); i++)
            if (load_pretokenizer(t, json_array_get(list, i), e)) return -1;
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) {
        if (add_step(t, &st, e)) return -1;
        st->kind = STEP_BYTE_LEVEL;
        st->add_prefix_space = jbool(p, "add_prefix_space", 1);
        if (jbool(p, "use_regex", 1)) {
            if (regex_compile(&st->re, gpt2_pattern, strlen(gpt2_pattern), 0, e)) return -1;
            st->has_re = 1;
        }
        return 0;
    }
    if (!strcmp(type, "Metaspace")) {
        const char *rep = jstr(p, "replacement");
        if (!rep) rep = "\xE2\x96\x81"; /* U+2581 */
        size_t rl;
        if (!rep[0] || strlen(rep) >= sizeof st->replacement ||
            (utf8_decode((const unsigned char *)rep, &rl), rl != strlen(rep)))
            return err_set(e, "pre_tokenizer Metaspace: replacement \"%s\" is not one character",
                           rep);
        const char *scheme = jstr(p, "prepend_scheme");
        prepend_scheme ps;
        if (!scheme) /* files before prepend_scheme: add_prefix_space */
            ps = jbool(p, "add_prefix_space", 1) ? PREPEND_ALWAYS : PREPEND_NEVER;
        else if (!strcmp(scheme, "always"))
            ps = PREPEND_ALWAYS;
        else if (!strcmp(scheme, "first"))
            ps = PREPEND_FIRST;
        else if (!strcmp(scheme, "never"))
            ps = PREPEND_NEVER;
        else
            return err_set(e,
                           "pre_tokenizer Metaspace: prepend_scheme \"%s\" is not one of always, "
                           "first, never",
                           scheme);
        if (add_step(t, &st, e)) return -1;
        st->kind = STEP_METASPACE;
        memcpy(st->replacement, rep, strlen(rep) + 1);
        st->prepend = ps;
        st->split = jbool(p, "split", 1);
        return 0;
    }
    if (!strcmp(type, "Digits")) {
        if (add_step(t, &st, e)) return -1;
        st->kind = STEP_SPLIT;
        st->behavior = SPLIT_ISOLATED;
        const char *pat = jbool(p, "individual_digits", 0) ? "\\p{N}" : "\\p{N}+";
        if (regex_compile(&st->re, pat, strlen(pat), 0, e)) return -1;
        st->has_re = 1;
        return 0;
    }
    if (!strcmp(type, "Split")) {
        const json_t *pat = json_object_get(p, "pattern");
        const json_t *rx = json_object_get(pat, "Regex"), *str = json_object_get(pat, "String");
        if (!json_is_string(rx) && !json_is_string(str))
            return err_set(e, "pre_tokenizer Split needs a pattern {\"Regex\": ...} or "
                              "{\"String\": ...}");
        const char *behavior = jstr(p, "behavior");
        static const struct {
            const char *name;
            split_behavior b;
        } behaviors[] = {{"Removed", SPLIT_REMOVED},
                         {"Isolated", SPLIT_ISOLATED},
                         {"MergedWithPrevious", SPLIT_MERGED_PREV},
                         {"MergedWithNext", SPLIT_MERGED_NEXT},
                         {"Contiguous", SPLIT_CONTIGUOUS}};
        int found = -1;
        for (int i = 0; behavior && i < 5; i++)
            if (!strcmp(behavior, behaviors[i].name)) found = i;
        if (found < 0)
            return err_set(e,
                           "pre_tokenizer Split behavior \"%s\" is not one of Removed, "
                           "Isolated, MergedWithPrevious, MergedWithNext, Contiguous",
                           behavior ? behavior : "(none)");
        if (add_step(t, &st, e)) return -1;
        st->kind = STEP_SPLIT;
        st->behavior = behaviors[found].b;
        st->invert = jbool(p, "invert", 0);
        const json_t *src = json_is_string(rx) ? rx : str;
        if (regex_compile(&st->re, json_string_value(src), json_string_length(src), src == str, e))
            return err_wrap(e, "pre_tokenizer Split");
        st->has_re = 1;
        return 0;
    }
    return err_set(e,
                   "pre_tokenizer \"%s\" is not supported (supported: ByteLevel, Metaspace, "
                   "Split, Digits and Sequence of them)",
                   type);
}

static int append_ids(int32_t **v, size_t *n, const int32_t *x, size_t k, int front) {
    if (k == 0) return 0;
    int32_t *q = realloc(*v, (*n + k) * sizeof *q);
    if (!q) return -1;
    if (front) {
        memmove(q + k, q, *n * sizeof *q);
        memcpy(q, x, k * sizeof *q);
    } else
        memcpy(q + *n, x, k * sizeof *q);
    *v = q;
    *n += k;
    return 0;
}

/* The ids of a template's SpecialToken: from its special_tokens table,
 * else the token of that name. */
static int template_ids(tok *t, const json_t *specials, const char *name, i32vec *ids, err *e) {
    const json_t *entry = json_object_get(specials, name);
    const json_t *list = json_object_get(entry, "ids");
    ids->n = 0;
    if (json_is_array(list)) {
        for (size_t i = 0; i < json_array_size(list); i++) {
            const json_t *v = json_array_get(list, i);
            if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) >= (json_int_t)t->n_ids)
                return err_set(e,
                               "TemplateProcessing special token \"%s\" has an id outside "
                               "the vocabulary",
                               name);
            if (i32_push(ids, (int32_t)json_integer_value(v))) return err_set(e, "out of memory");
        }
        return 0;
    }
    int32_t id = tok_token_id(t, name);
    if (id < 0)
        return err_set(e, "TemplateProcessing special token \"%s\" is not in the vocabulary", name);
    return i32_push(ids, id) ? err_set(e, "out of memory") : 0;
}

/* Wraps the current template in one more: its tokens before the sequence go
 * in front of what is there, those after it behind. */
static int load_template(tok *t, const json_t *p, err *e) {
    const json_t *single = json_object_get(p, "single");
    const json_t *specials = json_object_get(p, "special_tokens");
    if (!json_is_array(single))
        return err_set(e, "post_processor TemplateProcessing has no \"single\" list");
    int32_t *pre = NULL, *post = NULL;
    size_t npre = 0, npost = 0;
    int seen_a = 0, rc = 0;
    i32vec ids = {0};
    for (size_t i = 0; i < json_array_size(single) && !rc; i++) {
        const json_t *item = json_array_get(single, i);
        const json_t *sp = json_object_get(item, "SpecialToken");
        const json_t *sq = json_object_get(item, "Sequence");
        if (sq) {
            const char *id = jstr(sq, "id");
            if (!id || strcmp(id, "A") || seen_a)
                rc = err_set(e, "post_processor TemplateProcessing \"single\" must hold "
                                "sequence A once");
            seen_a = 1;
        } else if (sp && jstr(sp, "id")) {
            rc = template_ids(t, specials, jstr(sp, "id"), &ids, e);
            if (!rc && append_ids(seen_a ? &post : &pre, seen_a ? &npost : &npre, ids.v, ids.n, 0))
                rc = err_set(e, "out of memory");
        } else
            rc = err_set(e,
                         "post_processor TemplateProcessing: single[%zu] is neither a "
                         "SpecialToken nor a Sequence",
                         i);
    }
    if (!rc && !seen_a)
        rc = err_set(e, "post_processor TemplateProcessing \"single\" has no sequence A");
    if (!rc && (append_ids(&t->pre, &t->n_pre, pre, npre, 1) ||
                append_ids(&t->post, &t->n_post, post, npost, 0)))
        rc = err_set(e, "out of memory");
    free(pre);
    free(post);
    free(ids.v);
    return rc;
}

/* RobertaProcessing / BertProcessing: cls A sep. */
static int load_cls_sep(tok *t, const json_t *p, const char *type, err *e) {
    const json_t *cls = json_object_get(p, "cls"), *sep = json_object_get(p, "sep");
    const json_t *ci = json_array_get(cls, 1), *si = json_array_get(sep, 1);
    if (!json_is_integer(ci) || !json_is_integer(si) || json_integer_value(ci) < 0 ||
        json_integer_value(si) < 0 || json_integer_value(ci) >= (json_int_t)t->n_ids ||
        json_integer_value(si) >= (json_int_t)t->n_ids)
        return err_set(e,
                       "post_processor %s needs \"cls\" and \"sep\" as [token, id] in the "
                       "vocabulary",
                       type);
    int32_t c = (int32_t)json_integer_value(ci), s = (int32_t)json_integer_value(si);
    if (append_ids(&t->pre, &t->n_pre, &c, 1, 1) || append_ids(&t->post, &t->n_post, &s, 1, 0))
        return err_set(e, "out of memory");
    return 0;
}

static int load_postprocessor(tok *t, const json_t *p, err *e) {
    if (!p || json_is_null(p)) return 0;
    const char *type = jstr(p, "type");
    if (!type) return err_set(e, "post_processor has no \"type\"");
    if (!strcmp(type, "Sequence")) {
        const json_t *list = json_object_get(p, "processors");
        if (!json_is_array(list))
            return err_set(e, "post_processor Sequence has no \"processors\" list");
        for (size_t i = 0; i < json_array_size(list); i++)
            if (load_postprocessor(t, json_array_get(list, i), e)) return -1;
        return 0;
    }
    if (!strcmp(type, "ByteLevel")) return 0; /* changes offsets only */
    if (!strcmp(type, "TemplateProcessing")) return load_template(t, p, e);
    if (!strcmp(type, "RobertaProcessing") || !strcmp(type, "BertProcessing"))
        return load_cls_sep(t, p, type, e);
    return err_set(e,
                   "post_processor \"%s\" is not supported (supported: ByteLevel, "
                   "TemplateProcessing, RobertaProcessing, BertProcessing, Sequence)",
                   type);
}

/* One decoder into the chain; 0, or -1 with t->decoder_why set (decoding is
 * checked when asked for, so that a tokenizer with another decoder still
 * encodes). */
static int load_dec_step(tok *t, const json_t *d) {
    const char *type = jstr(d, "type");
    dec_step ds = {0};
    if (!type) type = "(none)";
    if (!strcmp(type, "ByteFallback"))
        ds.kind = DEC_BYTE_FALLBACK;
    else if (!strcmp(type, "Fuse"))
        ds.kind = DEC_FUSE;
    else if (!strcmp(type, "Replace")) {
        const char *from = jstr(json_object_get(d, "pattern"), "String"), *to = jstr(d, "content");
        if (!from || !from[0] || !to) {
            snprintf(t->decoder_why, sizeof t->decoder_why,
                     "decoder Replace is supported with a String pattern only");
            return -1;
        }
        ds.kind = DEC_REPLACE;
        ds.from = strdup(from);
        ds.to = strdup(to);
    } else if (!strcmp(type, "Strip")) {
        const char *c = jstr(d, "content");
        size_t l = 0;
        ds.kind = DEC_STRIP;
        ds.content = c && c[0] ? utf8_decode((const unsigned char *)c, &l) : 0;
        ds.start = (int)json_integer_value(json_object_get(d, "start"));
        ds.stop = (int)json_integer_value(json_object_get(d, "stop"));
        if (!c || !c[0] || l != strlen(c) || ds.start < 0 || ds.stop < 0) {
            snprintf(t->decoder_why, sizeof t->decoder_why,
                     "decoder Strip needs one content character and start/stop counts");
            return -1;
        }
    } else if (!strcmp(type, "Metaspace")) {
        const char *rep = jstr(d, "replacement"), *scheme = jstr(d, "prepend_scheme");
        ds.kind = DEC_METASPACE;
        ds.from = strdup(rep && rep[0] ? rep : "\xE2\x96\x81");
        ds.to = strdup(" ");
        ds.start = scheme ? strcmp(scheme, "never") != 0 : jbool(d, "add_prefix_space", 1);
    } else {
        snprintf(t->decoder_why, sizeof t->decoder_why,
                 "decoder \"%s\" is not supported (supported: ByteLevel alone, or a chain of "
                 "Replace, ByteFallback, Fuse, Strip and Metaspace)",
                 type);
        return -1;
    }
    dec_step *q = realloc(t->decs, (size_t)(t->n_dec + 1) * sizeof *q);
    if (q) t->decs = q;
    if (!q || ((ds.kind == DEC_REPLACE || ds.kind == DEC_METASPACE) && (!ds.from || !ds.to))) {
        free(ds.from);
        free(ds.to);
        snprintf(t->decoder_why, sizeof t->decoder_why, "out of memory");
        return -1;
    }
    t->decs[t->n_dec++] = ds;
    return 0;
}

static void load_decoder(tok *t, const json_t *d) {
    const char *type = d && !json_is_null(d) ? jstr(d, "type") : NULL;
    t->decoder_why[0] = '\0';
    if (!type) {
        snprintf(t->decoder_why, sizeof t->decoder_why, "the tokenizer has no decoder");
        return;
    }
    const json_t *list = !strcmp(type, "Sequence") ? json_object_get(d, "decoders") : NULL;
    size_t n = list ? json_array_size(list) : 1, byte_level = 0;
    for (size_t i = 0; i < n; i++) {
        const char *ti = jstr(list ? json_array_get(list, i) : d, "type");
        if (ti && !strcmp(ti, "ByteLevel")) byte_level++;
    }
    if (byte_level) {
        t->dec_byte_level = byte_level == n && n > 0;
        if (!t->dec_byte_level)
            snprintf(t->decoder_why, sizeof t->decoder_why,
                     "decoder ByteLevel is supported alone only, not in a chain with others");
        return;
    }
    if (n == 0) snprintf(t->decoder_why, sizeof t->decoder_why, "the decoder Sequence is empty");
    for (size_t i = 0; i < n; i++)
        if (load_dec_step(t, list ? json_array_get(list, i) : d)) return;
}

/* ---- files -------------------------------------------------------------- */

/* tokenizer.json's path and its directory, from a file or directory path. */
static int resolve_paths(const char *path, char **file, char **dir, err *e) {
    struct stat st;
    if (stat(path, &st) != 0) return err_errno(e, "cannot open tokenizer %s", path);
    size_t n = strlen(path);
    if (S_ISDIR(st.st_mode)) {
        *dir = strdup(path);
        *file = malloc(n + sizeof "/tokenizer.json");
        if (*file) snprintf(*file, n + sizeof "/tokenizer.json", "%s/tokenizer.json", path);
    } else {
        *file = strdup(path);
        const char *slash = strrchr(path, '/');
        *dir = slash ? strndup(path, (size_t)(slash - path) + (slash == path)) : strdup(".");
    }
    if (!*file || !*dir) {
        free(*file);
        free(*dir);
        return err_set(e, "out of memory");
    }
    return 0;
}

/* The files beside tokenizer.json that change the ids data gets: BOS/EOS
 * (the first two, read by load_special_ids) and the chat template. */
static const char *const sidecars[] = {"tokenizer_config.json", "config.json",
                                       "chat_template.jinja"};

/* Hashes one file into the fingerprint, framed by its name and length so
 * that no two sets of files give the same stream. */
static int fingerprint_file(hash_sha256 *c, const char *name, const char *data, size_t len) {
    unsigned char n8[8];
    for (int i = 0; i < 8; i++) n8[i] = (unsigned char)((uint64_t)len >> (8 * i));
    hash_sha256_update(c, name, strlen(name) + 1);
    if (!data) {
        hash_sha256_update(c, "absent", 6);
        return 0;
    }
    hash_sha256_update(c, n8, 8);
    hash_sha256_update(c, data, len);
    return 0;
}

static int fingerprint_sidecars(hash_sha256 *c, const char *dir, err *e) {
    for (size_t i = 0; i < sizeof sidecars / sizeof sidecars[0]; i++) {
        char *p = fs_join(dir, sidecars[i]), *data = NULL;
        size_t len = 0;
        if (!p) return err_set(e, "out of memory");
        if (fs_read_file(p, 0, &data, &len, e) != 0 && errno != ENOENT) {
            free(p);
            return -1;
        }
        fingerprint_file(c, sidecars[i], data, len);
        free(data);
        free(p);
    }
    return 0;
}

int tok_fingerprint_path(const char *path, char hex[65], err *e) {
    char *file, *dir, *data;
    size_t len;
    if (resolve_paths(path, &file, &dir, e)) return -1;
    if (fs_read_file(file, 0, &data, &len, e) != 0) {
        free(file);
        free(dir);
        return -1;
    }
    hash_sha256 c;
    hash_sha256_init(&c);
    fingerprint_file(&c, "tokenizer.json", data, len);
    free(data);
    int rc = fingerprint_sidecars(&c, dir, e);
    if (rc == 0) {
        uint8_t d[32];
        hash_sha256_final(&c, d);
        hash_hex(d, hex);
    }
    free(file);
    free(dir);
    return rc;
}

/* bos_token/eos_token of tokenizer_config.json: a string, {"content": s}
 * or null. Returns 1 when the key is there (even null), 0 when absent. */
static int config_token(tok *t, const json_t *cfg, const char *key, int32_t *id, const char *path,
                        err *e) {
    const json_t *v = json_object_get(cfg, key);
    if (!v) return 0;
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (json_is_null(v)) return 1;
    if (!json_is_string(v))
        return err_set(e, "%s: \"%s\" is neither a token string, {\"content\": ...} nor null", path,
                       key);
    *id = tok_token_id(t, json_string_value(v));
    if (*id < 0)
        return err_set(e, "%s: %s \"%s\" is not a token of the tokenizer", path, key,
                       json_string_value(v));
    return 1;
}

/* config.json's bos_token_id/eos_token_id: an id or a list (the first).
 * Numbers arrive as reals (see load_special_ids). An id the tokenizer does
 * not have is an error naming both files, rather than a token silently
 * missing later. */
static int config_id(const tok *t, const json_t *cfg, const char *key, int32_t *id,
                     const char *path, err *e) {
    const json_t *v = json_object_get(cfg, key);
    if (json_is_array(v)) v = json_array_get(v, 0);
    if (!json_is_number(v)) return 0;
    double x = json_number_value(v);
    if (x >= 0 && x < (double)t->n_ids && x == (double)(int32_t)x) {
        *id = (int32_t)x;
        return 0;
    }
    return err_set(e,
                   "%s: %s %.17g is not an id of the tokenizer %s/tokenizer.json, whose "
                   "vocabulary has %zu ids (0 to %zu); the model and its tokenizer do not match "
                   "(or set %s in tokenizer_config.json)",
                   path, key, x, t->dir, t->n_ids, t->n_ids - 1,
                   !strcmp(key, "eos_token_id") ? "eos_token" : "bos_token");
}

static int load_special_ids(tok *t, err *e) {
    t->bos = t->eos = -1;
    int have_bos = 0, have_eos = 0;
    for (size_t i = 0; i < 2; i++) {
        char *p = fs_join(t->dir, sidecars[i]);
        if (!p) return err_set(e, "out of memory");
        json_error_t je;
        /* Integers as reals: tokenizer_config.json files hold values such as
         * model_max_length 1e30 written out in digits, past jansson's range. */
        json_t *cfg = json_load_file(p, JSON_DECODE_INT_AS_REAL, &je);
        if (!cfg) {
            int missing = access(p, F_OK) != 0;
            int rc = missing ? 0 : err_set(e, "%s:%d:%d: %s", p, je.line, je.column, je.text);
            free(p);
            if (rc) return rc;
            continue;
        }
        int rc = 0;
        if (i == 0) {
            rc = config_token(t, cfg, "bos_token", &t->bos, p, e);
            if (rc > 0) have_bos = 1;
            if (rc >= 0) rc = config_token(t, cfg, "eos_token", &t->eos, p, e);
            if (rc > 0) have_eos = 1;
        } else {
            if (!have_bos) rc = config_id(t, cfg, "bos_token_id", &t->bos, p, e);
            if (rc >= 0 && !have_eos) rc = config_id(t, cfg, "eos_token_id", &t->eos, p, e);
        }
        json_decref(cfg);
        free(p);
        if (rc < 0) return -1;
    }
    return 0;
}

/* ---- public ------------------------------------------------------------- */

static int tok_load(tok *t, const json_t *root, err *e) {
    if (!json_is_object(root)) return err_set(e, "not a JSON object");
    if (load_added(t, json_object_get(root, "added_tokens"), e)) return -1;
    if (load_model(t, json_object_get(root, "model"), e)) return -1;
    if (load_normalizer(t, json_object_get(root, "normalizer"), e)) return -1;
    if (index_added(t, e)) return -1;
    if (load_pretokenizer(t, json_object_get(root, "pre_tokenizer"), e)) return -1;
    if (load_postprocessor(t, json_object_get(root, "post_processor"), e)) return -1;
    load_decoder(t, json_object_get(root, "decoder"));
    return 0;
}

int tok_open(tok **out, const char *path, err *e) {
    *out = NULL;
    byte_level_init();
    tok *t = calloc(1, sizeof *t);
    if (!t) return err_set(e, "out of memory");
    t->unk = t->bos = t->eos = -1;
    char *data = NULL;
    size_t len;
    json_t *root = NULL;
    if (resolve_paths(path, &t->path, &t->dir, e)) goto fail;
    if (fs_read_file(t->path, 0, &data, &len, e) != 0) goto fail;
    hash_sha256 c;
    hash_sha256_init(&c);
    fingerprint_file(&c, "tokenizer.json", data, len);
    if (fingerprint_sidecars(&c, t->dir, e)) goto fail;
    uint8_t d[32];
    hash_sha256_final(&c, d);
    hash_hex(d, t->fingerprint);

    json_error_t je;
    root = json_loadb(data, len, JSON_ALLOW_NUL, &je);
    free(data);
    data = NULL;
    if (!root) {
        err_set(e, "%s:%d:%d: not valid JSON: %s", t->path, je.line, je.column, je.text);
        goto fail;
    }
    if (tok_load(t, root, e)) {
        err_wrap(e, "%s", t->path);
        goto fail;
    }
    json_decref(root);
    root = NULL;
    if (load_special_ids(t, e)) goto fail;
    t->mctx = pcre2_match_context_create(NULL);
    t->jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
    if (!t->mctx || !t->jit_stack || cache_init(&t->cache)) {
        err_set(e, "out of memory");
        goto fail;
    }
    pcre2_jit_stack_assign(t->mctx, NULL, t->jit_stack);
    static const char word[] = "[\\p{L}\\p{M}\\p{Nd}\\p{Nl}\\p{Pc}\\x{200C}\\x{200D}]";
    if (regex_compile(&t->word_re, word, strlen(word), 0, e)) goto fail;
    *out = t;
    return 0;
fail:
    free(data);
    json_decref(root);
    tok_close(t);
    return -1;
}

void tok_close(tok *t) {
    if (!t) return;
    free(t->path);
    free(t->dir);
    free(t->vstr.p);
    free(t->voff);
    free(t->vlen);
    free(t->vslot);
    u64map_free(&t->merges);
    for (size_t i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    free(t->added_of);
    trie_free(&t->raw_trie);
    trie_free(&t->norm_trie);
    for (int i = 0; i < t->n_steps; i++) {
        pt_step *st = &t->steps[i];
        regex_free(&st->re);
        free(st->segs.v);
        free(st->keep.v);
        free(st->prefixed.p);
        free(st->mapped.p);
    }
    free(t->steps);
    for (int i = 0; i < t->n_norm; i++) {
        free(t->norms[i].from);
        free(t->norms[i].to);
        regex_free(&t->norms[i].re);
    }
    free(t->norms);
    for (int i = 0; i < t->n_dec; i++) {
        free(t->decs[i].from);
        free(t->decs[i].to);
    }
    free(t->decs);
    free(t->pre);
    free(t->post);
    if (t->mctx) pcre2_match_context_free(t->mctx);
    if (t->jit_stack) pcre2_jit_stack_free(t->jit_stack);
    regex_free(&t->word_re);
    cache_free(&t->cache);
    free(t->sym);
    free(t->heap);
    free(t);
}

int tok_encode(tok *t, const char *text, size_t len, int add_special, int32_t **ids, size_t *n,
               err *e) {
    *ids = NULL;
    *n = 0;
    size_t bad;
    if (!utf8_valid(text, len, &bad))
        return err_set(e, "text is not valid UTF-8 (byte %zu is 0x%02x)", bad,
                       (unsigned char)text[bad]);
    i32vec out = {0};
    if (add_special && i32_append(&out, t->pre, t->n_pre)) goto oom;
    t->encoding = text;
    if (split_added(t, &t->raw_trie, text, len, section_raw, &out, e)) {
        free(out.v);
        return -1;
    }
    if (add_special && i32_append(&out, t->post, t->n_post)) goto oom;
    *ids = out.v;
    *n = out.n;
    return 0;
oom:
    free(out.v);
    return err_set(e, "out of memory");
}

/* Appends the bytes a vocabulary token stands for: each character mapped
 * back through the byte-level alphabet, or, when one is outside it, the
 * token's own UTF-8 (as the Rust decoder does). */
static int token_bytes(const char *s, size_t n, buf *out) {
    size_t start = out->n;
    for (size_t i = 0; i < n;) {
        size_t l;
        uint32_t c = utf8_decode((const unsigned char *)s + i, &l);
        if (c >= 0x200 || bl_dec[c] < 0) {
            out->n = start;
            return buf_put(out, s, n);
        }
        unsigned char b = (unsigned char)bl_dec[c];
        if (buf_put(out, &b, 1)) return -1;
        i += l;
    }
    return 0;
}

/* Token strings for the decoder chain: piece i is text[end[i-1], end[i]). */
typedef struct {
    buf text;
    size_t *end;
    size_t n, cap;
} strlist;

static int strlist_end(strlist *l) {
    if (grow((void **)&l->end, &l->cap, l->n + 1, sizeof *l->end)) return -1;
    l->end[l->n++] = l->text.n;
    return 0;
}

static const char *strlist_at(const strlist *l, size_t i, size_t *n) {
    size_t a = i ? l->end[i - 1] : 0;
    *n = l->end[i] - a;
    return l->text.p + a;
}

static int hexval(char c) {
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                  : -1;
}

/* Runs one decoder over in into out (emptied first). */
static int dec_run(const dec_step *d, const strlist *in, strlist *out) {
    out->text.n = 0;
    out->n = 0;
    buf bytes = {0};
    int rc = 0;
    for (size_t i = 0; i < in->n && !rc; i++) {
        size_t n;
        const char *s = strlist_at(in, i, &n);
        switch (d->kind) {
        case DEC_REPLACE:
        case DEC_METASPACE: {
            size_t at = out->text.n;
            rc = replace_all(&out->text, s, n, d->from, strlen(d->from), d->to, strlen(d->to));
            if (!rc && d->kind == DEC_METASPACE && d->start && i == 0 && out->text.n > at &&
                out->text.p[at] == ' ') {
                memmove(out->text.p + at, out->text.p + at + 1, out->text.n - at - 1);
                out->text.n--;
            }
            rc = rc || strlist_end(out);
            break;
        }
        case DEC_BYTE_FALLBACK: {
            /* Runs of <0xNN> become their bytes, read as UTF-8 (each maximal
             * invalid part one U+FFFD, as the reference's TextDecoder). */
            int hi = n == 6 && !memcmp(s, "<0x", 3) && s[5] == '>' ? hexval(s[3]) : -1;
            int lo = hi >= 0 ? hexval(s[4]) : -1;
            if (lo >= 0) {
                unsigned char b = (unsigned char)(hi << 4 | lo);
                rc = buf_put(&bytes, &b, 1);
                if (i + 1 < in->n) break;
            }
            if (bytes.n) {
                rc = rc || utf8_lossy_append(&out->text, (const unsigned char *)bytes.p, bytes.n) ||
                     strlist_end(out);
                bytes.n = 0;
            }
            if (lo < 0) rc = rc || buf_put(&out->text, s, n) || strlist_end(out);
            break;
        }
        case DEC_FUSE:
            rc = buf_put(&out->text, s, n) || (i + 1 == in->n && strlist_end(out));
            break;
        case DEC_STRIP: {
            size_t a = 0, b = n, l;
            for (int k = 0; k < d->start && a < b; k++) {
                if (utf8_decode((const unsigned char *)s + a, &l) != d->content) break;
                a += l;
            }
            for (int k = 0; k < d->stop && b > a; k++) {
                if (utf8_last(s + a, b - a, &l) != d->content) break;
                b -= l;
            }
            rc = buf_put(&out->text, s + a, b - a) || strlist_end(out);
            break;
        }
        }
    }
    free(bytes.p);
    return rc;
}

/* Decoding through the chain of decoders: the token strings (added tokens
 * as their content) go through every decoder in turn, then join. */
static int decode_chain(const tok *t, const int32_t *ids, size_t n, int skip_special, buf *out,
                        err *e) {
    strlist a = {0}, b = {0};
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        int32_t id = ids[i];
        if (skip_special && tok_is_special(t, id)) continue;
        const char *s = tok_token_text(t, id);
        rc = buf_puts(&a.text, s) || strlist_end(&a);
    }
    for (int k = 0; k < t->n_dec && !rc; k++) {
        rc = dec_run(&t->decs[k], &a, &b);
        strlist x = a;
        a = b;
        b = x;
    }
    rc = rc || buf_put(out, a.text.p ? a.text.p : "", a.text.n);
    free(a.text.p);
    free(a.end);
    free(b.text.p);
    free(b.end);
    return rc ? err_set(e, "out of memory") : 0;
}

int tok_decode(const tok *t, const int32_t *ids, size_t n, int skip_special, char **text,
               size_t *len, err *e) {
    *text = NULL;
    if (len) *len = 0;
    if (t->decoder_why[0]) return err_set(e, "%s: %s", t->path, t->decoder_why);
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || (size_t)id >= t->n_ids || (t->added_of[id] < 0 && t->voff[id] == UINT32_MAX))
            return err_set(e, "%s: id %d (position %zu) is not in the vocabulary", t->path, id, i);
    }
    if (!t->dec_byte_level) {
        buf o = {0};
        if (decode_chain(t, ids, n, skip_special, &o, e) || buf_put(&o, "", 0)) {
            free(o.p);
            return -1;
        }
        *text = o.p;
        if (len) *len = o.n;
        return 0;
    }
    buf out = {0}, bytes = {0};
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        int32_t id = ids[i];
        if (id < 0 || (size_t)id >= t->n_ids ||
            (t->added_of[id] < 0 && t->voff[id] == UINT32_MAX)) {
            rc = err_set(e, "%s: id %d (position %zu) is not in the vocabulary", t->path, id, i);
            break;
        }
        if (t->added_of[id] >= 0) {
            /* Added tokens are their content, cut from the bytes around them. */
            const added_tok *at = &t->added[t->added_of[id]];
            if (skip_special && at->special) continue;
            if (utf8_lossy_append(&out, (const unsigned char *)bytes.p, bytes.n) ||
                buf_put(&out, at->content, at->len))
                rc = err_set(e, "out of memory");
            bytes.n = 0;
        } else if (token_bytes(t->vstr.p + t->voff[id], t->vlen[id], &bytes))
            rc = err_set(e, "out of memory");
    }
    if (!rc &&
        (utf8_lossy_append(&out, (const unsigned char *)bytes.p, bytes.n) || buf_put(&out, "", 0)))
        rc = err_set(e, "out of memory");
    free(bytes.p);
    if (rc) {
        free(out.p);
        return -1;
    }
    *text = out.p;
    if (len) *len = out.n;
    return 0;
}

void tok_template(const tok *t, const int32_t **prefix, size_t *n_prefix, const int32_t **suffix,
                  size_t *n_suffix) {
    *prefix = t->pre;
    *n_prefix = t->n_pre;
    *suffix = t->post;
    *n_suffix = t->n_post;
}

int tok_vocab_size(const tok *t) {
    return (int)t->n_ids;
}

int32_t tok_token_id(const tok *t, const char *token) {
    size_t n = strlen(token);
    int32_t id = added_find(t, token, n);
    return id >= 0 ? id : vocab_find(t, token, n);
}

const char *tok_token_text(const tok *t, int32_t id) {
    if (id < 0 || (size_t)id >= t->n_ids) return NULL;
    if (t->added_of && t->added_of[id] >= 0) return t->added[t->added_of[id]].content;
    return t->voff[id] == UINT32_MAX ? NULL : t->vstr.p + t->voff[id];
}

int tok_is_special(const tok *t, int32_t id) {
    return id >= 0 && (size_t)id < t->n_ids && t->added_of[id] >= 0 &&
           t->added[t->added_of[id]].special;
}

int32_t tok_bos(const tok *t) {
    return t->bos;
}

int32_t tok_eos(const tok *t) {
    return t->eos;
}

const char *tok_path(const tok *t) {
    return t->path;
}

const char *tok_fingerprint(const tok *t) {
    return t->fingerprint;
}
