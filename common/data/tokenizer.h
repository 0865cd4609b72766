/* The Hugging Face tokenizer of the Llama families: byte-level BPE (GPT-2,
 * Llama 3, Qwen2/3) and SentencePiece-style BPE with byte fallback (Llama 2,
 * TinyLlama, Mistral, Gemma), read from a tokenizer.json (jansson), with its
 * added tokens, normalizers (utf8proc for the Unicode forms), pre-tokenizer
 * regexes (PCRE2), post-processor and decoder chain. data.c tokenizes
 * TEXT/JSONL data with it; cli/cmd_tokenize.c exposes it. Checked against
 * the reference JavaScript implementation by tests/test_tokenizer.c with the
 * fixtures of tests/reference/tokenizer/. */
#ifndef PEFTPS_TOKENIZER_H
#define PEFTPS_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"

typedef struct tok tok;

/* Opens a tokenizer from `path`: a tokenizer.json file, or a directory
 * holding one. Supported: model BPE (merges as "a b" strings or [a, b]
 * pairs, ignore_merges, unk_token, fuse_unk, byte_fallback: a character
 * without a token becomes its UTF-8 bytes as <0xNN> tokens, or unk_token
 * when one of them is missing); normalizers NFC, NFD, NFKC, NFKD, Replace
 * (String or Regex pattern), Prepend (not in front of an empty text), Strip
 * and Sequence of them; pre-tokenizers Split (Regex or String pattern, every
 * behavior, invert), ByteLevel, Metaspace (replacement, prepend_scheme
 * always/first/never, where first is the input's first section before any
 * added token, or add_prefix_space in older files; split on the replacement
 * as the Rust library does), Digits and Sequence of them; post-processors
 * ByteLevel, TemplateProcessing, RobertaProcessing, BertProcessing and
 * Sequence; decoders ByteLevel alone, or a chain of Replace (String
 * pattern), ByteFallback, Fuse, Strip and Metaspace (checked by tok_decode
 * only). BOS/EOS come from
 * tokenizer_config.json beside the file (bos_token/eos_token), else from
 * config.json (bos_token_id/eos_token_id), else are absent.
 * Errors, each naming the file: it cannot be read or is not JSON (with line
 * and column); a required field is missing or has the wrong type; the model
 * type, a normalizer, pre-tokenizer or post-processor type is not supported
 * (named); a merge names a token that is not in the vocabulary; a regex does
 * not compile (with PCRE2's message and offset); bos_token/eos_token is not a
 * token of the vocabulary; a normalizer is set but the build does not link
 * libutf8proc; a Metaspace replacement is not one character or its
 * prepend_scheme is unknown; a Replace normalizer lacks its pattern or
 * content. BPE dropout and subword prefixes/suffixes are refused by name
 * (no Llama-family file uses them). */
int tok_open(tok **out, const char *path, err *e);

/* Frees everything; t may be NULL. */
void tok_close(tok *t);

/* Encodes len bytes of UTF-8 text (NUL bytes allowed) into *ids (malloc'd,
 * the caller frees; NULL when *n is 0). Added tokens are matched in the
 * text first (longest first, with their lstrip/rstrip/single_word/normalized
 * flags), the rest is normalized, pre-tokenized and merged. With add_special
 * the post-processor's template adds its special tokens (Llama 3: BOS).
 * Not thread-safe (a per-tokenizer cache of merged words): one tok per
 * thread. Errors: the text is not valid UTF-8 (byte offset given); a
 * character has no token and the model has no unk_token; out of memory. */
int tok_encode(tok *t, const char *text, size_t len, int add_special, int32_t **ids, size_t *n,
               err *e);

/* Decodes ids into *text (malloc'd, NUL-terminated; *len, if not NULL,
 * gets its length without the NUL). Byte sequences that are not valid
 * UTF-8 (a character cut between tokens) become U+FFFD; added tokens are
 * written as their content. With skip_special, special added tokens are
 * left out. With a decoder chain, every token's text (added tokens'
 * content too) goes through the chain in order and the results are joined:
 * SentencePiece's ▁ becomes a space, runs of <0xNN> tokens their bytes read
 * as UTF-8 (invalid parts as above), the first space is stripped. Errors:
 * an id is not in the vocabulary; the tokenizer's decoder is absent or not
 * supported (named). */
int tok_decode(const tok *t, const int32_t *ids, size_t n, int skip_special, char **text,
               size_t *len, err *e);

/* The ids the post-processor's template puts before and after a sequence
 * when encoding with add_special (Llama 3: BOS before, nothing after); the
 * arrays belong to the tokenizer, either may be empty. */
void tok_template(const tok *t, const int32_t **prefix, size_t *n_prefix, const int32_t **suffix,
                  size_t *n_suffix);

/* One more than the largest id of the vocabulary and the added tokens. */
int tok_vocab_size(const tok *t);

/* The id of a token given by its text as stored in tokenizer.json (an added
 * token's content, or a vocabulary entry such as "Ġthe"); -1 if none. */
int32_t tok_token_id(const tok *t, const char *token);

/* The stored text of id, or NULL when no token has it. */
const char *tok_token_text(const tok *t, int32_t id);

/* 1 when id is an added token marked special. */
int tok_is_special(const tok *t, int32_t id);

/* Beginning and end of sequence ids (see tok_open), -1 when unknown. */
int32_t tok_bos(const tok *t);
int32_t tok_eos(const tok *t);

/* The tokenizer.json file the tokenizer was read from. */
const char *tok_path(const tok *t);

/* Hex SHA-256 over the files that decide the ids this tokenizer produces:
 * tokenizer.json and, when present beside it, tokenizer_config.json and
 * config.json (BOS/EOS, the chat template) and chat_template.jinja. Equal to tok_fingerprint_path
 * of the same path. */
const char *tok_fingerprint(const tok *t);

/* The same fingerprint computed from the files alone, without parsing the
 * tokenizer (cheap: lets a data cache be checked before loading). Errors:
 * tokenizer.json cannot be read. */
int tok_fingerprint_path(const char *path, char hex[65], err *e);

#endif
