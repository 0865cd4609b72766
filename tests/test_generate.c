/* Generation (common/model/generate.h) on the tiny model: the KV-cache logits of
 * every position equal the full recompute through model_forward (fed one
 * token at a time, in small chunks, and across the chunk size), for the base
 * and with LoRA, prefix tuning (with and without projection), layer-wise and
 * full fine-tuning; greedy decoding gives the same tokens with and without
 * the cache; a seed reproduces a sampled text and another seed does not;
 * temperature, top-k and top-p keep to their sets and proportions; stop
 * tokens, limits and bad input behave; the detokenizer prints whole UTF-8
 * characters (with tests/fixtures/tiny-llama/tokenizer.json, written by
 * tests/reference/make_tiny_tokenizer.py). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config/config.h"
#include "model/generate.h"
#include "data/textstream.h"
#include "config/pbtext.h"
#include "model/peft.h"
#include "methods/registry.h"
#include "base/rng.h"
#include "data/tokenizer.h"

#define TINY "tests/fixtures/tiny-llama"

/* Cached against recomputed logits, relative to their largest magnitude.
 * The two paths run the same kernels in the same order; only the shapes of
 * the products differ (one row or a chunk instead of the whole sequence)
 * and model.c fuses some of them, which changes the rounding of each sum.
 * Measured here: at most 9e-7; a wrong position, prefix or method term
 * moves the logits by 1e-2 and more (test_methods_matter). */
#define CACHE_TOL 1e-5

static model_files *files;
static const model_config *cfg;
static const model_weights *weights;

static int open_model(void **state) {
    (void)state;
    err e;
    if (model_files_open(&files, TINY, &e) < 0) {
        fprintf(stderr, "%s\n", e.msg);
        return -1;
    }
    cfg = model_files_config(files);
    weights = model_files_weights(files);
    return 0;
}

/* The method blocks the pefts point into, freed at the end. */
static Peftps__Experiment *blocks_made[32];
static int n_blocks_made;

static int close_model(void **state) {
    (void)state;
    for (int i = 0; i < n_blocks_made; i++) config_free(blocks_made[i]);
    model_files_close(files);
    return 0;
}

/* A method from its config block text (e.g. "lora { r: 4 }"), every
 * trainable value perturbed from its initial one so that it changes the
 * model everywhere. */
static peft *make_method(const char *block) {
    char text[512];
    snprintf(text, sizeof text, "method { %s }", block);
    ProtobufCMessage *msg = NULL;
    err e;
    if (pbtext_parse(&peftps__experiment__descriptor, text, strlen(text), "method", &msg, NULL,
                     &e) < 0)
        fail_msg("%s", e.msg);
    Peftps__Experiment *ex = (Peftps__Experiment *)msg;
    assert_true(n_blocks_made < 32);
    blocks_made[n_blocks_made++] = ex; /* the peft points into it */
    peft *p = NULL;
    if (methods_create(&p, ex->method, cfg, weights, &e) < 0) fail_msg("%s: %s", block, e.msg);
    peft_init(p, 4);
    rng r;
    rng_seed(&r, 17, 0, 0, 0);
    for (size_t i = 0; i < p->n_params; i++) p->params[i] += 0.05f * rng_normal(&r);
    peft_refresh(p);
    return p;
}

static void random_tokens(int32_t *t, int n, uint64_t seed) {
    rng r;
    rng_seed(&r, seed, 0, 0, 0);
    for (int i = 0; i < n; i++) t[i] = (int32_t)(rng_u64(&r) % (uint64_t)cfg->vocab_size);
}

static generator *open_gen(peft *p, int cap, int cache) {
    generator *g = NULL;
    err e;
    if (generate_open(&g, cfg, weights, p, cap, cache, &e) < 0) fail_msg("%s", e.msg);
    return g;
}

static double rel_worst(const float *a, const float *b, size_t n) {
    double worst = 0, scale = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= worst)) worst = d;
        scale = fmax(scale, fabs((double)b[i]));
    }
    return worst / fmax(scale, 1e-30);
}

/* Every position's logits, cached (fed `step` at a time) and recomputed. */
static void check_cache(const char *label, peft *p, int n) {
    int V = cfg->vocab_size;
    int32_t *tokens = malloc((size_t)n * sizeof *tokens);
    float *ref = malloc((size_t)n * V * sizeof *ref), *got = malloc((size_t)n * V * sizeof *got);
    assert_true(tokens && ref && got);
    random_tokens(tokens, n, (uint64_t)n);
    err e;
    generator *full = open_gen(p, n, 0), *cached = open_gen(p, n, 1);
    if (generate_logits(full, tokens, n, n, ref, &e) < 0) fail_msg("%s", e.msg);
    static const int steps[] = {1, 3, 64, 1000};
    for (size_t k = 0; k < sizeof steps / sizeof steps[0]; k++) {
        memset(got, 0, (size_t)n * V * sizeof *got);
        if (generate_logits(cached, tokens, n, steps[k], got, &e) < 0) fail_msg("%s", e.msg);
        double worst = 0;
        for (int i = 0; i < n; i++) {
            double d = rel_worst(got + (size_t)i * V, ref + (size_t)i * V, (size_t)V);
            if (d > worst) worst = d;
        }
        printf("  %-28s %3d tokens, %4d per feed: worst %.2e of each position's scale\n", label, n,
               steps[k], worst);
        assert_true(worst <= CACHE_TOL);
        assert_memory_equal(generate_last_logits(cached), got + (size_t)(n - 1) * V,
                            (size_t)V * sizeof(float));
        assert_int_equal(generate_length(cached), n);
    }
    generate_close(full);
    generate_close(cached);
    free(tokens);
    free(ref);
    free(got);
}

static void test_cache_base(void **state) {
    (void)state;
    check_cache("base", NULL, 20);
    check_cache("base, past one chunk", NULL, 150);
}

static void test_cache_lora(void **state) {
    (void)state;
    peft *p = make_method("lora { r: 4 alpha: 8 dropout: 0.1 target_modules: [Q_PROJ, K_PROJ, "
                          "V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ] }");
    check_cache("lora", p, 40);
    check_cache("lora, past one chunk", p, 100);
    peft_free(p);
}

static void test_cache_prefix(void **state) {
    (void)state;
    peft *p = make_method("prefix { num_virtual_tokens: 5 }");
    check_cache("prefix", p, 40);
    check_cache("prefix, past one chunk", p, 90);
    peft_free(p);
    p = make_method("prefix { num_virtual_tokens: 2 projection_hidden: 8 }");
    check_cache("prefix with projection", p, 30);
    peft_free(p);
}

static void test_cache_weight_methods(void **state) {
    (void)state;
    peft *p = make_method("layer_wise { first_layer: 0 last_layer: 1 }");
    check_cache("layer_wise", p, 30);
    peft_free(p);
    p = make_method("full {}");
    check_cache("full (embedding and lm_head)", p, 30);
    peft_free(p);
}

/* The method changes the logits the cache computes: the check above cannot
 * pass by ignoring it. */
static void test_methods_matter(void **state) {
    (void)state;
    int n = 12, V = cfg->vocab_size;
    int32_t tokens[12];
    random_tokens(tokens, n, 5);
    float *a = malloc((size_t)n * V * sizeof *a), *b = malloc((size_t)n * V * sizeof *b);
    err e;
    generator *g = open_gen(NULL, n, 1);
    assert_int_equal(generate_logits(g, tokens, n, 1, a, &e), 0);
    generate_close(g);
    static const char *const blocks[] = {"lora { r: 2 }", "prefix { num_virtual_tokens: 3 }"};
    for (int k = 0; k < 2; k++) {
        peft *p = make_method(blocks[k]);
        g = open_gen(p, n, 1);
        assert_int_equal(generate_logits(g, tokens, n, 1, b, &e), 0);
        assert_true(rel_worst(b, a, (size_t)n * V) > 1e-2);
        generate_close(g);
        peft_free(p);
    }
    free(a);
    free(b);
}

/* ---- decoding -------------------------------------------------------------------- */

static void run(generator *g, const int32_t *prompt, size_t n, const generate_opts *o,
                const int32_t *stop, int n_stop, int32_t **out, size_t *n_out) {
    err e;
    if (generate_run(g, prompt, n, o, stop, n_stop, NULL, NULL, out, n_out, &e) < 0)
        fail_msg("%s", e.msg);
}

static void test_greedy_same_with_and_without_cache(void **state) {
    (void)state;
    static const char *const blocks[] = {NULL,
                                         "lora { r: 4 target_modules: [Q_PROJ, V_PROJ, "
                                         "DOWN_PROJ] }",
                                         "prefix { num_virtual_tokens: 4 }"};
    for (int k = 0; k < 3; k++) {
        peft *p = blocks[k] ? make_method(blocks[k]) : NULL;
        int32_t prompt[7];
        random_tokens(prompt, 7, 11);
        generate_opts o;
        generate_opts_default(&o);
        o.temperature = 0;
        o.max_new_tokens = 40;
        generator *a = open_gen(p, 47, 1), *b = open_gen(p, 47, 0);
        int32_t *x, *y;
        size_t nx, ny;
        run(a, prompt, 7, &o, NULL, 0, &x, &nx);
        run(b, prompt, 7, &o, NULL, 0, &y, &ny);
        assert_int_equal(nx, 40);
        assert_int_equal(ny, 40);
        assert_memory_equal(x, y, nx * sizeof *x);
        /* greedy is the argmax of the logits of the sequence so far */
        int32_t seq[47];
        memcpy(seq, prompt, sizeof prompt);
        memcpy(seq + 7, x, 40 * sizeof *x);
        int V = cfg->vocab_size;
        float *lg = malloc(47 * (size_t)V * sizeof *lg);
        err e;
        assert_int_equal(generate_logits(b, seq, 47, 47, lg, &e), 0);
        for (int i = 0; i < 40; i++) {
            const float *row = lg + (size_t)(6 + i) * V;
            int best = 0;
            for (int j = 1; j < V; j++)
                if (row[j] > row[best]) best = j;
            assert_int_equal(x[i], best);
        }
        free(lg);
        free(x);
        free(y);
        generate_close(a);
        generate_close(b);
        peft_free(p);
    }
}

static void test_seed_reproducible(void **state) {
    (void)state;
    peft *p = make_method("lora { r: 2 }");
    generator *g = open_gen(p, 64, 1);
    int32_t prompt[4] = {72, 105, 33, 32};
    generate_opts o;
    generate_opts_default(&o);
    o.temperature = 1.2f;
    o.top_k = 50;
    o.top_p = 0.95f;
    o.max_new_tokens = 50;
    o.seed = 7;
    int32_t *a, *b, *c;
    size_t na, nb, nc;
    run(g, prompt, 4, &o, NULL, 0, &a, &na);
    run(g, prompt, 4, &o, NULL, 0, &b, &nb);
    o.seed = 8;
    run(g, prompt, 4, &o, NULL, 0, &c, &nc);
    assert_int_equal(na, 50);
    assert_int_equal(nb, 50);
    assert_int_equal(nc, 50);
    assert_memory_equal(a, b, na * sizeof *a);
    assert_true(memcmp(a, c, na * sizeof *a) != 0);
    free(c);
    /* the same seed without the cache: the same text */
    generator *ref = open_gen(p, 64, 0);
    o.seed = 7;
    run(ref, prompt, 4, &o, NULL, 0, &c, &nc);
    assert_memory_equal(a, c, na * sizeof *a);
    free(a);
    free(b);
    free(c);
    generate_close(g);
    generate_close(ref);
    peft_free(p);
}

/* Draws n tokens from logits, each from its own stream; counts them. */
static void draw(generator *g, const float *logits, const generate_opts *o, int n, int *count) {
    memset(count, 0, (size_t)cfg->vocab_size * sizeof *count);
    for (int i = 0; i < n; i++) {
        rng r;
        rng_seed(&r, 3, 4, (uint64_t)i, 0);
        int32_t id = generate_sample(g, logits, o, &r);
        assert_true(id >= 0 && id < cfg->vocab_size);
        count[id]++;
    }
}

static void test_sampling_rules(void **state) {
    (void)state;
    int V = cfg->vocab_size, N = 4000;
    generator *g = open_gen(NULL, 4, 1);
    float *lg = malloc((size_t)V * sizeof *lg);
    int *count = malloc((size_t)V * sizeof *count);
    /* probabilities 0.5, 0.3, 0.1, 0.05 and the rest shared by 252 tokens */
    for (int i = 0; i < V; i++) lg[i] = logf(0.05f / (float)(V - 4));
    lg[10] = logf(0.5f);
    lg[20] = logf(0.3f);
    lg[30] = logf(0.1f);
    lg[40] = logf(0.05f);
    generate_opts o;
    generate_opts_default(&o);

    o.temperature = 0; /* greedy: the argmax, whatever the stream */
    draw(g, lg, &o, 50, count);
    assert_int_equal(count[10], 50);

    o.temperature = 1; /* plain sampling follows the probabilities */
    draw(g, lg, &o, N, count);
    assert_true(fabs(count[10] / (double)N - 0.5) < 0.03);
    assert_true(fabs(count[20] / (double)N - 0.3) < 0.03);
    assert_true(fabs(count[30] / (double)N - 0.1) < 0.02);

    o.top_k = 2; /* only the two most likely, renormalised: 5/8, 3/8 */
    draw(g, lg, &o, N, count);
    assert_int_equal(count[10] + count[20], N);
    assert_true(fabs(count[10] / (double)N - 0.625) < 0.03);

    o.top_k = 0;
    o.top_p = 0.85f; /* 0.5 + 0.3 < 0.85 <= 0.9: the nucleus is 10, 20, 30 */
    draw(g, lg, &o, N, count);
    assert_int_equal(count[10] + count[20] + count[30], N);
    assert_true(count[30] > 0);
    assert_true(fabs(count[10] / (double)N - 0.5 / 0.9) < 0.03);

    o.top_p = 0.01f; /* at least one token stays */
    draw(g, lg, &o, 100, count);
    assert_int_equal(count[10], 100);

    o.top_p = 1;
    o.temperature = 1e-3f; /* a cold temperature is nearly greedy */
    draw(g, lg, &o, 200, count);
    assert_int_equal(count[10], 200);

    o.temperature = 100; /* a hot one nearly uniform: most tokens show up */
    draw(g, lg, &o, N, count);
    int seen = 0;
    for (int i = 0; i < V; i++) seen += count[i] > 0;
    assert_true(seen > V * 3 / 4);

    /* ties go to the lower id; NaN is never the most likely */
    for (int i = 0; i < V; i++) lg[i] = 0;
    lg[5] = NAN;
    lg[7] = 2;
    lg[9] = 2;
    o.temperature = 0;
    draw(g, lg, &o, 5, count);
    assert_int_equal(count[7], 5);
    o.temperature = 1;
    o.top_k = 2;
    draw(g, lg, &o, 500, count);
    assert_int_equal(count[7] + count[9], 500);
    assert_int_equal(count[5], 0);
    free(lg);
    free(count);
    generate_close(g);
}

static int count_calls(void *ctx, int32_t id) {
    (void)id;
    int *n = ctx;
    return ++*n >= 3; /* stop after the third */
}

static void test_stops_and_limits(void **state) {
    (void)state;
    generator *g = open_gen(NULL, 20, 1);
    int32_t prompt[3] = {1, 50, 60}, *out;
    size_t n;
    err e;
    generate_opts o;
    generate_opts_default(&o);
    o.temperature = 0;
    o.max_new_tokens = 10;
    run(g, prompt, 3, &o, NULL, 0, &out, &n);
    assert_int_equal(n, 10);
    int32_t first = out[0], third = out[2];
    free(out);
    /* a stop token ends before itself */
    run(g, prompt, 3, &o, &first, 1, &out, &n);
    assert_int_equal(n, 0);
    assert_null(out);
    /* the callback sees each token and may stop */
    int calls = 0;
    assert_int_equal(generate_run(g, prompt, 3, &o, NULL, 0, count_calls, &calls, &out, &n, &e), 0);
    assert_int_equal(calls, 3);
    assert_int_equal(n, 3);
    assert_int_equal(out[2], third);
    free(out);
    /* limits and bad input */
    o.max_new_tokens = 18;
    assert_int_equal(generate_run(g, prompt, 3, &o, NULL, 0, NULL, NULL, &out, &n, &e), -1);
    assert_non_null(strstr(e.msg, "exceed"));
    assert_int_equal(generate_run(g, prompt, 0, &o, NULL, 0, NULL, NULL, &out, &n, &e), -1);
    assert_non_null(strstr(e.msg, "no tokens"));
    generate_reset(g);
    int32_t bad = cfg->vocab_size;
    assert_int_equal(generate_feed(g, &bad, 1, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "outside the vocabulary"));
    assert_int_equal(generate_length(g), 0);
    assert_null(generate_last_logits(g));
    int32_t many[21] = {0};
    assert_int_equal(generate_feed(g, many, 21, NULL, &e), -1);
    assert_int_equal(generate_feed(g, many, 20, NULL, &e), 0);
    assert_int_equal(generate_feed(g, many, 1, NULL, &e), -1);
    generate_close(g);
    assert_int_equal(generate_open(&g, cfg, weights, NULL, 0, 1, &e), -1);
}

/* ---- text --------------------------------------------------------------------- */

/* Pushes the bytes of s one id each (the fixture's ids are bytes) and
 * returns the pieces joined by '|'. */
static void pieces(textstream *st, const char *s, size_t n, char *out, size_t cap) {
    out[0] = '\0';
    err e;
    for (size_t i = 0; i < n; i++) {
        char *piece;
        if (textstream_push(st, (unsigned char)s[i], &piece, &e) < 0) fail_msg("%s", e.msg);
        strncat(out, piece, cap - strlen(out) - 1);
        strncat(out, "|", cap - strlen(out) - 1);
        free(piece);
    }
}

static void test_text_stream(void **state) {
    (void)state;
    tok *t = NULL;
    err e;
    if (tok_open(&t, TINY, &e) < 0)
        fail_msg("%s (run tests/reference/make_tiny_tokenizer.py)", e.msg);
    assert_int_equal(tok_vocab_size(t), 256);
    textstream st;
    textstream_init(&st, t);
    char out[256];
    /* 2-byte é and 4-byte 😀 come out whole, on the token that completes them */
    const char text[] = "a\xc3\xa9z\xf0\x9f\x98\x80!";
    pieces(&st, text, sizeof text - 1, out, sizeof out);
    assert_string_equal(out, "a||\xc3\xa9|z||||\xf0\x9f\x98\x80|!|");
    /* a character cut and never finished is given out once it cannot be */
    const char broken[] = "\xc3"
                          "b";
    pieces(&st, broken, 2, out, sizeof out);
    assert_string_equal(out, "|\xef\xbf\xbd"
                             "b|");
    const char stray[] = "\x80\x80\x80\x80";
    pieces(&st, stray, 4, out, sizeof out);
    assert_string_equal(out, "|||\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd|");
    /* and what is held at the end is flushed: the start of a 3-byte
     * character as one U+FFFD */
    pieces(&st, "\xe2\x82", 2, out, sizeof out);
    assert_string_equal(out, "||");
    char *rest;
    assert_int_equal(textstream_flush(&st, &rest, &e), 0);
    assert_string_equal(rest, "\xef\xbf\xbd");
    free(rest);
    assert_int_equal(textstream_flush(&st, &rest, &e), 0);
    assert_string_equal(rest, "");
    free(rest);
    /* an id outside the vocabulary is an error and leaves the stream usable */
    char *piece;
    assert_int_equal(textstream_push(&st, 100000, &piece, &e), -1);
    pieces(&st, "ok", 2, out, sizeof out);
    assert_string_equal(out, "o|k|");
    textstream_free(&st);
    tok_close(t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cache_base),
        cmocka_unit_test(test_cache_lora),
        cmocka_unit_test(test_cache_prefix),
        cmocka_unit_test(test_cache_weight_methods),
        cmocka_unit_test(test_methods_matter),
        cmocka_unit_test(test_greedy_same_with_and_without_cache),
        cmocka_unit_test(test_seed_reproducible),
        cmocka_unit_test(test_sampling_rules),
        cmocka_unit_test(test_stops_and_limits),
        cmocka_unit_test(test_text_stream),
    };
    return cmocka_run_group_tests(tests, open_model, close_model);
}
