/* SHA-256 for fingerprints (the base model, tokenizer, data and experiment
 * fingerprints of modelfile.c, tokenizer.c, data.c and config.c), so that
 * every machine can check it holds the same inputs; not for secrets. The
 * digest is libsodium's crypto_hash_sha256 (FIPS 180-4). */
#ifndef PEFTPS_HASH_H
#define PEFTPS_HASH_H

#include <sodium.h>
#include <stddef.h>
#include <stdint.h>

typedef crypto_hash_sha256_state hash_sha256;

/* Starts a new digest (initialising libsodium the first time). */
void hash_sha256_init(hash_sha256 *h);

/* Appends n bytes of p (n may be 0, p may then be NULL). */
void hash_sha256_update(hash_sha256 *h, const void *p, size_t n);

/* Writes the 32-byte digest; h must be started again before reuse. */
void hash_sha256_final(hash_sha256 *h, uint8_t out[32]);

/* Lower-case hex of a digest, NUL-terminated (65 bytes). */
void hash_hex(const uint8_t d[32], char hex[65]);

/* The hex digest of n bytes of p, in one call. */
void hash_sha256_hex_of(const void *p, size_t n, char hex[65]);

#endif
