/* The incremental detokenizer of textstream.h: decodes the ids held since
 * the last complete character boundary and gives out what became whole. */
#include "data/textstream.h"

#include <stdlib.h>
#include <string.h>

void textstream_init(textstream *s, const tok *t) {
    memset(s, 0, sizeof *s);
    s->t = t;
}

void textstream_free(textstream *s) {
    free(s->ids);
    memset(s, 0, sizeof *s);
}

/* The decoder gives U+FFFD (EF BF BD) for bytes of a character cut short. */
static size_t trailing_replacements(const char *text, size_t len) {
    size_t n = 0;
    while (len - n >= 3 && !memcmp(text + len - n - 3, "\xef\xbf\xbd", 3)) n += 3;
    return n;
}

/* At a complete boundary: starts afresh from the ids decoded since the
 * previous boundary (a whole character or more), so that decoding stays
 * short, keeping them as context because decoders such as SentencePiece's
 * strip the leading space of the first token they see. */
static int textstream_keep_group(textstream *s, err *e) {
    char *text;
    size_t len, g = s->n - s->ctx;
    memmove(s->ids, s->ids + s->ctx, g * sizeof *s->ids);
    s->n = g;
    if (tok_decode(s->t, s->ids, g, 1, &text, &len, e) < 0) return -1;
    /* Ids that are not a whole character alone (a broken tail given out)
     * are no context: start empty. */
    int partial = trailing_replacements(text, len) > 0;
    free(text);
    s->n = s->ctx = partial ? 0 : g;
    s->emitted = partial ? 0 : len;
    return 0;
}

/* Decodes the held ids and returns the bytes not yet given out: all of them
 * when `all`, else those before an incomplete tail. */
static int textstream_take(textstream *s, int all, char **piece, err *e) {
    *piece = NULL;
    char *text;
    size_t len;
    if (tok_decode(s->t, s->ids, s->n, 1, &text, &len, e) < 0) return -1;
    size_t tail = all ? 0 : trailing_replacements(text, len);
    /* No character spans more than 4 tokens: a tail cut for longer is not
     * waiting for its end but broken, and goes out as it is. */
    if (tail && s->n - s->ctx >= 4) tail = 0;
    size_t end = len - tail;
    size_t from = s->emitted < end ? s->emitted : end;
    size_t n = end - from;
    char *out = malloc(n + 1);
    if (!out) {
        free(text);
        return err_set(e, "out of memory");
    }
    memcpy(out, text + from, n);
    out[n] = '\0';
    free(text);
    if (tail) {
        s->emitted = end;
    } else if (s->n > s->ctx && textstream_keep_group(s, e) < 0) {
        free(out);
        return -1;
    }
    *piece = out;
    return 0;
}

int textstream_push(textstream *s, int32_t id, char **piece, err *e) {
    *piece = NULL;
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 8;
        int32_t *ids = realloc(s->ids, cap * sizeof *ids);
        if (!ids) return err_set(e, "out of memory");
        s->ids = ids;
        s->cap = cap;
    }
    s->ids[s->n++] = id;
    if (textstream_take(s, 0, piece, e) < 0) {
        s->n--;
        return -1;
    }
    return 0;
}

int textstream_prime(textstream *s, int32_t id, err *e) {
    if (s->cap == 0) {
        s->ids = malloc(8 * sizeof *s->ids);
        if (!s->ids) return err_set(e, "out of memory");
        s->cap = 8;
    }
    s->ids[0] = id;
    s->n = 1;
    s->ctx = 0;
    return textstream_keep_group(s, e);
}

int textstream_flush(textstream *s, char **piece, err *e) {
    if (s->n == s->ctx) {
        *piece = calloc(1, 1);
        return *piece ? 0 : err_set(e, "out of memory");
    }
    return textstream_take(s, 1, piece, e);
}
