/* Text generation: an inference forward with a KV cache over the kernels of
 * kernels.h and the method hooks of peft.h (effective weights, LoRA terms,
 * prefix keys/values), a full-recompute path through model_forward (model.h)
 * as its reference, and sampling (temperature, top-k, top-p, seeded by
 * rng.h). cli/cmd_generate.c drives it and prints through data/textstream.h;
 * tests/test_generate.c checks the cache against the recompute. */
#ifndef PEFTPS_GENERATE_H
#define PEFTPS_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "base/err.h"
#include "model/model.h"
#include "model/peft.h"
#include "base/rng.h"

/* How tokens are drawn. */
typedef struct generate_opts {
    int max_new_tokens; /* tokens sampled at most (default 128) */
    float temperature;  /* logits are divided by it; 0 is greedy (default 1) */
    int top_k;          /* keep the k most likely tokens; 0 keeps all (default 0) */
    float top_p;        /* keep the smallest set of most likely tokens whose
                           probability reaches top_p; 1 keeps all (default 1) */
    uint64_t seed;      /* the sampling stream (default 0) */
} generate_opts;

/* Fills o with the defaults above. */
void generate_opts_default(generate_opts *o);

/* The stream of the draw for the i-th sampled token is rng_seed(seed,
 * GENERATE_STREAM, i, 0): one uniform per token, so a run is reproducible
 * from its seed and independent of the other streams of the seed. */
#define GENERATE_STREAM UINT64_C(0x47454e4500000000)

typedef struct generator generator;

/* Opens a generator over a base (cfg and w must outlive it) and an optional
 * method p (NULL: the base alone; else it must outlive the generator, and
 * its params must not change while tokens are cached: call generate_reset
 * after they do). It holds at most max_tokens real tokens (prompt and
 * generated). With use_cache, keys and values are cached per layer (prefix
 * tuning's P virtual tokens are the first P entries and real tokens start at
 * position P, as in model_forward), and each token is computed once; without
 * it, every feed recomputes the whole sequence with model_forward: the slow
 * reference. Switches p to inference (peft_set_step: no dropout). Fails on
 * max_tokens < 1, a method whose layers have prefixes of different lengths,
 * an inconsistent config (from model_create) or out of memory. */
int generate_open(generator **out, const model_config *cfg, const model_weights *w, peft *p,
                  int max_tokens, int use_cache, err *e);
/* Frees the generator (not the base or the method); g may be NULL. */
void generate_close(generator *g);

/* Forgets every cached token and rereads the method's prefix; call after
 * the method's params changed. */
void generate_reset(generator *g);

/* Real tokens held now. */
int generate_length(const generator *g);

/* Appends n tokens at the next positions and computes their logits: all n
 * rows into logits (n, V) when it is not NULL; the last row is always kept
 * (generate_last_logits). Fails, leaving the generator as it was, when n < 1,
 * a token is outside the vocabulary, or the tokens would exceed max_tokens. */
int generate_feed(generator *g, const int32_t *tokens, int n, float *logits, err *e);

/* Logits (V) of the last token fed; NULL before the first feed. */
const float *generate_last_logits(const generator *g);

/* From an empty cache: feeds tokens `step` at a time (step 1: one token per
 * feed; step >= n: one feed) and writes the logits of every position into
 * logits (n, V). For tests comparing the cache with the recompute. */
int generate_logits(generator *g, const int32_t *tokens, int n, int step, float *logits, err *e);

/* Draws a token from logits (V) under o: greedy (the lowest id of the
 * largest logit) when temperature is 0; otherwise softmax(logits /
 * temperature) restricted to the top_k most likely and then to the nucleus
 * of top_p (ties broken towards lower ids), renormalised, sampled with one
 * rng_uniform of r. Never fails; a NaN logit counts as -infinity. */
int32_t generate_sample(generator *g, const float *logits, const generate_opts *o, rng *r);

/* Called with each sampled token; returning non-zero stops generation. */
typedef int (*generate_token_fn)(void *ctx, int32_t id);

/* Empties the cache, feeds the prompt (n >= 1 tokens) and samples up to
 * o->max_new_tokens tokens, the i-th from stream (o->seed, GENERATE_STREAM,
 * i, 0), stopping before any of the n_stop stop tokens (not passed on nor
 * kept). Each token goes to fn (may be NULL) as it comes, and all of them to
 * *out (malloc'ed, free it; may be NULL when *n_out is 0). Fails when the
 * prompt is empty, prompt plus max_new_tokens exceed max_tokens, or a feed
 * fails. */
int generate_run(generator *g, const int32_t *prompt, size_t n, const generate_opts *o,
                 const int32_t *stop, int n_stop, generate_token_fn fn, void *ctx, int32_t **out,
                 size_t *n_out, err *e);

#endif
