/* Deterministic random streams (xoshiro256** seeded by splitmix64) and the
 * distributions built on them; see rng.h for the choices and why. Used by
 * every file that needs randomness, so that runs repeat bit for bit. */
#include "base/rng.h"

/* Bits must not depend on the compiler fusing a*b+c: GCC keeps products and
 * sums apart in ISO mode (-std=c11 implies -ffp-contract=off); clang needs
 * telling. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

#include <math.h>
#include <string.h>

static uint64_t splitmix64_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t splitmix64_next(uint64_t *x) {
    *x += 0x9e3779b97f4a7c15ULL;
    return splitmix64_mix(*x);
}

static uint64_t rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

void rng_seed(rng *r, uint64_t seed, uint64_t a, uint64_t b, uint64_t c) {
    /* Each input is added to a key that has already been mixed, and the mix
     * is a bijection, so changing any one input always changes the key; the
     * odd constants keep (0,0,0,0) away from a trivial key. */
    uint64_t key = splitmix64_mix(seed + 0x9e3779b97f4a7c15ULL);
    key = splitmix64_mix(key ^ (a + 0x6a09e667f3bcc909ULL));
    key = splitmix64_mix(key ^ (b + 0xbb67ae8584caa73bULL));
    key = splitmix64_mix(key ^ (c + 0x3c6ef372fe94f82bULL));
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64_next(&key);
    /* xoshiro must not start from the all-zero state; four consecutive
     * splitmix64 outputs are never all zero, but the guard costs nothing. */
    if ((r->s[0] | r->s[1] | r->s[2] | r->s[3]) == 0) r->s[0] = 1;
}

uint64_t rng_u64(rng *r) {
    uint64_t *s = r->s;
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

float rng_uniform(rng *r) {
    return (float)(rng_u64(r) >> 40) * 0x1p-24f;
}

/* Uniform on [0,1) with 53 random bits. */
static double uniform53(rng *r) {
    return (double)(rng_u64(r) >> 11) * 0x1p-53;
}

double rng_log(double x) {
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    int k = 0;
    if ((bits >> 52) == 0) { /* subnormal: scale into the normal range */
        x *= 0x1p54;
        memcpy(&bits, &x, sizeof bits);
        k = -54;
    }
    k += (int)((bits >> 52) & 0x7ff) - 1023;
    bits = (bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;
    double m;
    memcpy(&m, &bits, sizeof m);    /* x = m * 2^k, m in [1,2) */
    if (m > 0x1.6a09e667f3bcdp+0) { /* keep m in [sqrt(1/2), sqrt(2)] */
        m *= 0.5;
        k += 1;
    }
    /* log(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), |s| <= 0.1716,
     * so s^2 <= 0.0295 and 13 terms reach below 2^-53. */
    const double s = (m - 1.0) / (m + 1.0);
    const double t = s * s;
    double p = 1.0 / 25;
    for (int j = 11; j >= 0; j--) p = p * t + 1.0 / (2 * j + 1);
    /* ln 2 split so that k * ln2_hi is exact for every k in range. */
    const double ln2_hi = 0x1.62e42fee00000p-1;
    const double ln2_lo = 0x1.a39ef35793c76p-33;
    return (double)k * ln2_hi + (2.0 * s * p + (double)k * ln2_lo);
}

float rng_normal(rng *r) {
    for (;;) {
        const double v1 = 2.0 * uniform53(r) - 1.0;
        const double v2 = 2.0 * uniform53(r) - 1.0;
        const double s = v1 * v1 + v2 * v2;
        if (s >= 1.0 || s == 0.0) continue;
        /* IEEE 754 requires sqrt to be correctly rounded: portable bits. */
        return (float)(v1 * sqrt(-2.0 * rng_log(s) / s));
    }
}
