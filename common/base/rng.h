/* Deterministic random numbers: one independent stream per (seed, a, b, c),
 * e.g. (seed, step, shard, tensor index), so that every machine draws the same
 * bits for the same work. Used by the methods' init and dropout (peft.h),
 * random masks (subnet.c), data (data.c) and the tests.
 *
 * Generator: xoshiro256** (Blackman and Vigna, 2018). Seeding: the four inputs
 * are folded through the splitmix64 finaliser into one 64-bit key, and the
 * state is four successive splitmix64 outputs from that key (the seeding the
 * xoshiro authors recommend). Normals: Marsaglia's polar method with a
 * logarithm computed here from + - * / only, so that no libm routine (whose
 * last bit may differ between libc versions and CPU code paths) enters the
 * stream. Everything is integer or IEEE basic arithmetic: bit-identical on
 * every platform. */
#ifndef PEFTPS_RNG_H
#define PEFTPS_RNG_H

#include <stdint.h>

typedef struct rng {
    uint64_t s[4];
} rng;

/* Starts the stream of (seed, a, b, c). Different tuples give unrelated
 * streams (they coincide only if the 64-bit keys collide, chance 2^-64). */
void rng_seed(rng *r, uint64_t seed, uint64_t a, uint64_t b, uint64_t c);

/* Next 64 uniformly distributed bits. */
uint64_t rng_u64(rng *r);

/* Uniform on [0,1): the top 24 bits of one rng_u64, times 2^-24, so every
 * value is an exact float and 1.0 never occurs. */
float rng_uniform(rng *r);

/* Standard normal N(0,1), rounded to float. Consumes a variable number of
 * rng_u64 draws (two per polar-method attempt, on average 2.55). */
float rng_normal(rng *r);

/* Natural logarithm of x > 0 (finite, normal or subnormal), to within about
 * one unit in the last place, computed from basic arithmetic only: the same
 * bits everywhere. Exposed for rng_normal's test. */
double rng_log(double x);

#endif
