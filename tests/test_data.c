/* Tests of common/data.c: windows and labels of .tokens files written here,
 * the (step, shard) -> sequences map and its wrap-around, every error, and
 * that the committed fixtures tests/fixtures/tiny*.tokens load. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "data.h"

static char dir[64];

static int setup(void **state) {
    (void)state;
    strcpy(dir, "/tmp/peftps-test-data-XXXXXX");
    return mkdtemp(dir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

/* Writes raw bytes to dir/name; returns the path, valid until the next
 * write (each check uses its file before the next one is written). */
static const char *write_bytes(const char *name, const unsigned char *b, size_t n) {
    static char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(b, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
    return path;
}

/* Writes ids as little-endian uint32, byte by byte (independent of the
 * host's order, like the reader). */
static const char *write_ids(const char *name, const uint32_t *ids, size_t n) {
    unsigned char *b = malloc(4 * n + 1);
    assert_non_null(b);
    for (size_t i = 0; i < n; i++)
        for (int k = 0; k < 4; k++) b[4 * i + k] = (unsigned char)(ids[i] >> (8 * k));
    const char *p = write_bytes(name, b, 4 * n);
    free(b);
    return p;
}

static data_opts opts(int seq_len, int vocab) {
    return (data_opts){.format = PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED,
                       .seq_len = seq_len,
                       .vocab_size = vocab};
}

/* Ids that need all four bytes, so a wrong byte order shows. */
static uint32_t id_of(size_t i) {
    return (uint32_t)((i * 2654435761u) % 100003u) + 0x10000u * (uint32_t)(i % 3);
}
#define BIG_VOCAB (100003 + 2 * 0x10000)

static void test_windows_and_labels(void **state) {
    (void)state;
    enum { T = 9, N = 105 }; /* 10 windows of 10 tokens, 5 left over */
    uint32_t ids[N];
    for (size_t i = 0; i < N; i++) ids[i] = id_of(i);
    const char *path = write_ids("w.tokens", ids, N);
    data *d;
    err e = {{0}};
    data_opts o = opts(T, BIG_VOCAB);
    assert_int_equal(data_open(&d, path, &o, &e), 0);
    assert_int_equal(data_num_tokens(d), N);
    assert_int_equal(data_num_windows(d), 10);
    assert_int_equal(data_seq_len(d), T);
    int32_t tok[T], lab[T];
    for (uint64_t w = 0; w < 10; w++) {
        assert_int_equal(data_window(d, w, tok, lab, &e), 0);
        for (int t = 0; t < T; t++) {
            assert_int_equal(tok[t], (int32_t)ids[w * (T + 1) + t]);
            assert_int_equal(lab[t], (int32_t)ids[w * (T + 1) + t + 1]);
        }
    }
    /* The leftover tokens never form a window. */
    assert_int_equal(data_window(d, 10, tok, lab, &e), -1);
    assert_non_null(strstr(e.msg, path));
    assert_non_null(strstr(e.msg, "window 10"));
    data_close(d);

    /* Exactly one window: the smallest file accepted. */
    path = write_ids("one.tokens", ids, T + 1);
    assert_int_equal(data_open(&d, path, &o, &e), 0);
    assert_int_equal(data_num_windows(d), 1);
    data_sequence(d, 12345, tok, lab); /* wraps onto window 0 */
    assert_int_equal(tok[0], (int32_t)ids[0]);
    assert_int_equal(lab[T - 1], (int32_t)ids[T]);
    data_close(d);
}

static void test_shard_map(void **state) {
    (void)state;
    enum { T = 4, W = 13, N = W * (T + 1), B = 6, S = 3, ROWS = B / S };
    uint32_t ids[N];
    for (size_t i = 0; i < N; i++) ids[i] = id_of(i);
    const char *path = write_ids("s.tokens", ids, N);
    data *d;
    err e = {{0}};
    data_opts o = opts(T, BIG_VOCAB);
    assert_int_equal(data_open(&d, path, &o, &e), 0);
    int32_t whole_t[B * T], whole_l[B * T], part_t[B * T], part_l[B * T];
    for (uint64_t step = 0; step < 7; step++) {
        /* The union of a step's shards, in shard order, is the step read as
         * one shard. */
        assert_int_equal(data_shard(d, step, 0, 1, B, whole_t, whole_l, &e), 0);
        for (uint32_t k = 0; k < S; k++)
            assert_int_equal(
                data_shard(d, step, k, S, B, part_t + k * ROWS * T, part_l + k * ROWS * T, &e), 0);
        assert_memory_equal(whole_t, part_t, sizeof whole_t);
        assert_memory_equal(whole_l, part_l, sizeof whole_l);
        /* And row r of the step is sequence step*B + r: window (step*B+r)
         * mod W, read straight from the ids (this wraps from step 3 on). */
        for (int r = 0; r < B; r++) {
            uint64_t w = (step * B + (uint64_t)r) % W;
            for (int t = 0; t < T; t++) {
                assert_int_equal(whole_t[r * T + t], (int32_t)ids[w * (T + 1) + t]);
                assert_int_equal(whole_l[r * T + t], (int32_t)ids[w * (T + 1) + t + 1]);
            }
        }
    }
    /* Shard 1 of step 2 with S=3 holds sequences 14 and 15: windows 1, 2. */
    assert_int_equal(data_shard(d, 2, 1, S, B, part_t, part_l, &e), 0);
    assert_int_equal(part_t[0], (int32_t)ids[1 * (T + 1)]);
    assert_int_equal(part_t[T], (int32_t)ids[2 * (T + 1)]);
    /* Epochs wrap: sequence g and g + W are the same. */
    data_sequence(d, 5, whole_t, whole_l);
    data_sequence(d, 5 + 3 * W, part_t, part_l);
    assert_memory_equal(whole_t, part_t, T * sizeof(int32_t));
    assert_memory_equal(whole_l, part_l, T * sizeof(int32_t));

    /* Shard arguments that cannot be honoured. */
    assert_int_equal(data_shard(d, 0, 0, 4, B, part_t, part_l, &e), -1);
    assert_non_null(strstr(e.msg, "multiple"));
    assert_int_equal(data_shard(d, 0, 0, 0, B, part_t, part_l, &e), -1);
    assert_non_null(strstr(e.msg, "multiple"));
    assert_int_equal(data_shard(d, 0, 3, S, B, part_t, part_l, &e), -1);
    assert_non_null(strstr(e.msg, "shard 3"));
    data_close(d);
}

static void expect_open_error(const char *path, data_opts o, const char *what) {
    data *d = (data *)1;
    err e = {{0}};
    assert_int_equal(data_open(&d, path, &o, &e), -1);
    assert_null(d);
    printf("  %s\n", e.msg);
    assert_non_null(strstr(e.msg, path));
    if (!strstr(e.msg, what)) fail_msg("expected \"%s\" in: %s", what, e.msg);
}

static void test_errors(void **state) {
    (void)state;
    char missing[128];
    snprintf(missing, sizeof missing, "%s/missing.tokens", dir);
    expect_open_error(missing, opts(4, 10), "No such file");

    const unsigned char odd[10] = {1, 0, 0, 0, 2, 0, 0, 0, 3, 0};
    expect_open_error(write_bytes("odd.tokens", odd, sizeof odd), opts(1, 10), "multiple of 4");

    uint32_t ids[64];
    for (int i = 0; i < 64; i++) ids[i] = (uint32_t)i % 10;
    expect_open_error(write_ids("short.tokens", ids, 8), opts(8, 10), "fewer than");
    expect_open_error(write_bytes("empty.tokens", odd, 0), opts(1, 10), "fewer than");

    ids[37] = 10; /* == vocab_size */
    const char *bad = write_ids("bad.tokens", ids, 64);
    expect_open_error(bad, opts(4, 10), "token 37 (byte offset 148) is 10");
    ids[37] = 0xffffffffu; /* must not turn negative on the way */
    bad = write_ids("bad2.tokens", ids, 64);
    expect_open_error(bad, opts(4, 10), "is 4294967295");
    ids[37] = 7;

    const char *txt = write_ids("plain.txt", ids, 64);
    expect_open_error(txt, opts(4, 10), "TEXT data is not supported");
    const char *unknown = write_ids("data.bin", ids, 64);
    expect_open_error(unknown, opts(4, 10), "cannot tell the data format");
    expect_open_error(unknown, opts(0, 10), "seq_len");
    expect_open_error(unknown, opts(4, 0), "vocab_size");

    /* An explicit format overrides the name. */
    data_opts o = opts(4, 10);
    o.format = PEFTPS__DATA_FORMAT__TOKENS;
    data *d;
    err e = {{0}};
    assert_int_equal(data_open(&d, unknown, &o, &e), 0);
    assert_int_equal(data_num_windows(d), 64 / 5);
    data_close(d);
    o.format = PEFTPS__DATA_FORMAT__JSONL;
    expect_open_error(unknown, o, "JSONL data is not supported");
    data_close(NULL);
}

static void test_fixtures_load(void **state) {
    (void)state;
    /* The committed fixtures of tests/reference/make_tokens.py: 256 ids,
     * 40960 and 8192 tokens. */
    const char *files[] = {"tests/fixtures/tiny.tokens", "tests/fixtures/tiny-eval.tokens"};
    const uint64_t tokens[] = {40960, 8192};
    for (int i = 0; i < 2; i++) {
        data *d;
        err e = {{0}};
        data_opts o = opts(64, 256);
        if (data_open(&d, files[i], &o, &e) != 0) fail_msg("%s", e.msg);
        assert_int_equal(data_num_tokens(d), tokens[i]);
        assert_int_equal(data_num_windows(d), tokens[i] / 65);
        /* Structured, not constant: the first window uses many ids, and
         * labels are the next tokens. */
        int32_t tok[64], lab[64], seen[256] = {0}, distinct = 0;
        assert_int_equal(data_window(d, 0, tok, lab, &e), 0);
        for (int t = 0; t < 64; t++) distinct += !seen[tok[t]]++;
        assert_true(distinct > 16);
        for (int t = 0; t + 1 < 64; t++) assert_int_equal(lab[t], tok[t + 1]);
        data_close(d);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_windows_and_labels),
        cmocka_unit_test(test_shard_map),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_fixtures_load),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
