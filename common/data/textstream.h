/* Ids to text as generation produces them: an incremental detokenizer over
 * tokenizer.h that holds back a UTF-8 character cut between tokens.
 * cli/cmd_generate.c prints through it. */
#ifndef PEFTPS_TEXTSTREAM_H
#define PEFTPS_TEXTSTREAM_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"
#include "data/tokenizer.h"

/* Ids to text as they come, holding back the bytes of a UTF-8 character
 * cut between tokens until it is complete, so that printing each piece
 * never splits a character. */
typedef struct textstream {
    const tok *t;
    int32_t *ids; /* tokens since the last complete boundary */
    size_t n, cap;
    size_t emitted; /* bytes of their decoding already returned */
    size_t ctx;     /* ids at the front held as context only (0 or 1) */
} textstream;

/* Starts an empty stream over tokenizer t (which must outlive it). */
void textstream_init(textstream *s, const tok *t);
/* Adds one id and returns in *piece (malloc'ed, NUL-terminated, free it)
 * the text that became complete, possibly empty. Special tokens are left
 * out. A tail that stays incomplete for 4 tokens (no UTF-8 character is
 * longer) is given out as U+FFFD. Errors: the id is not in the vocabulary,
 * out of memory. */
int textstream_push(textstream *s, int32_t id, char **piece, err *e);
/* Makes id (e.g. the prompt's last token) the context the next ids are
 * decoded after, so that a SentencePiece decoder keeps the space in front
 * of the first generated word. Errors: the id is not in the vocabulary. */
int textstream_prime(textstream *s, int32_t id, err *e);
/* Returns whatever is held (an incomplete tail as U+FFFD) and empties the
 * stream. */
int textstream_flush(textstream *s, char **piece, err *e);
/* Frees what the stream holds (not the tokenizer). */
void textstream_free(textstream *s);

#endif
