/* UTF-8: validation, decoding and encoding of code points, the maximal
 * invalid parts a lossy decoder replaces, Unicode White_Space, and counting
 * and indexing by code point. One toolkit for config/pbtext.c (strings of
 * experiment files), data/tokenizer.c and data/jinja.c. */
#ifndef PEFTPS_UTF8_H
#define PEFTPS_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* Bytes of the character that lead byte c starts (1 for ASCII and for a
 * stray continuation byte): for text already known to be valid. */
size_t utf8_seq_len(unsigned char c);

/* Length (1-4) of the valid sequence at s[0..n), n >= 1, or 0 when it is not
 * valid: overlong forms, surrogates, values past U+10FFFF and sequences cut
 * short are invalid. */
size_t utf8_valid_at(const unsigned char *s, size_t n);

/* 1 when s[0..n) is valid UTF-8; else 0, with the offending byte offset in
 * *bad when bad is not NULL. */
int utf8_valid(const char *s, size_t n, size_t *bad);

/* The code point at s (valid UTF-8) and its length in *len. */
uint32_t utf8_decode(const unsigned char *s, size_t *len);

/* Writes cp (at most U+10FFFF) into out; returns its length (1-4). */
size_t utf8_encode(uint32_t cp, char out[4]);

/* The code point that ends s[0..n) (n >= 1, valid UTF-8), its length in
 * *len. */
uint32_t utf8_last(const char *s, size_t n, size_t *len);

/* At an invalid position s[0..n) (utf8_valid_at is 0): the bytes one
 * U+FFFD replaces, the lead byte and the continuation bytes that still
 * fitted it (the WHATWG decoder's and Rust's from_utf8_lossy rule). */
size_t utf8_invalid_len(const unsigned char *s, size_t n);

/* Unicode White_Space (Rust's char::is_whitespace, Oniguruma's \s). */
int utf8_is_white_space(uint32_t c);

/* Code points in s[0..n) (continuation bytes not counted). */
size_t utf8_count(const char *s, size_t n);

/* Byte offset of code point k of s[0..n) (n when k is past the end). */
size_t utf8_offset(const char *s, size_t n, size_t k);

#endif
