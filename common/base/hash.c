/* SHA-256 fingerprints over libsodium; see hash.h. */
#include "base/hash.h"

#include <pthread.h>

static pthread_once_t hash_once = PTHREAD_ONCE_INIT;
static int hash_sodium_status;

static void hash_sodium_init(void) {
    /* Fails only without a source of randomness, which hashing never asks
     * for: SHA-256 works either way, so the status is only kept. */
    hash_sodium_status = sodium_init();
}

void hash_sha256_init(hash_sha256 *h) {
    pthread_once(&hash_once, hash_sodium_init);
    crypto_hash_sha256_init(h);
}

void hash_sha256_update(hash_sha256 *h, const void *p, size_t n) {
    if (n) crypto_hash_sha256_update(h, p, n);
}

void hash_sha256_final(hash_sha256 *h, uint8_t out[32]) {
    crypto_hash_sha256_final(h, out);
}

void hash_hex(const uint8_t d[32], char hex[65]) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[d[i] >> 4];
        hex[2 * i + 1] = digits[d[i] & 15];
    }
    hex[64] = '\0';
}

void hash_sha256_hex_of(const void *p, size_t n, char hex[65]) {
    hash_sha256 h;
    uint8_t d[32];
    hash_sha256_init(&h);
    hash_sha256_update(&h, p, n);
    hash_sha256_final(&h, d);
    hash_hex(d, hex);
}
