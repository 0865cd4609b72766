/* SHA-256 (FIPS 180-4), incremental. Used for config and base-model
 * fingerprints (modelfile.c, experiment configs) so that every machine can
 * check it holds the same inputs; not for secrets. */
#ifndef PEFTPS_SHA256_H
#define PEFTPS_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct sha256_ctx {
    uint32_t h[8];
    uint64_t len;    /* bytes hashed so far */
    uint8_t buf[64]; /* pending partial block */
    size_t nbuf;
} sha256_ctx;

/* Starts a new digest. */
void sha256_init(sha256_ctx *c);

/* Appends n bytes of p (n may be 0, p may then be NULL). */
void sha256_update(sha256_ctx *c, const void *p, size_t n);

/* Writes the 32-byte digest; the context must be re-initialised before reuse. */
void sha256_final(sha256_ctx *c, uint8_t out[32]);

/* Lower-case hex of a digest, NUL-terminated (65 bytes). */
void sha256_hex(const uint8_t d[32], char hex[65]);

/* One-shot convenience: hex digest of n bytes of p. */
void sha256_hex_of(const void *p, size_t n, char hex[65]);

#endif
