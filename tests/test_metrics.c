/* Tests of common/train/metrics.c, the one writer and reader of
 * metrics.jsonl: the exact bytes of step and eval lines (what `peftps
 * train`, the server and `peftps run` wrote before they shared it), the
 * lines a resumed server keeps, reading back what was written. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/fsutil.h"
#include "train/metrics.h"

static char dir[] = "/tmp/peftps-test-metrics-XXXXXX";

static char *slurp(const char *name) {
    char *path = fs_join(dir, name), *text = NULL;
    size_t len;
    err e;
    assert_non_null(path);
    if (fs_read_file(path, 0, &text, &len, &e) < 0) fail_msg("%s", e.msg);
    free(path);
    return text;
}

static void write_lines(uint64_t keep_through, uint64_t first, uint64_t last) {
    metrics m = {0};
    err e;
    assert_int_equal(metrics_open(&m, dir, keep_through, &e), 0);
    for (uint64_t s = first; s <= last; s++) {
        metrics_line l = {.kind = METRICS_STEP,
                          .step = s,
                          .loss = 2.5 + (double)s,
                          .loss_tokens = 100,
                          .tokens = 512,
                          .lr = 3e-4,
                          .grad_norm = 0.125,
                          .tokens_per_s = 1234.56,
                          .has_bytes = s % 2,
                          .bytes_in = 10 * s,
                          .bytes_out = 20 * s};
        assert_int_equal(metrics_write(&m, &l, &e), 0);
    }
    metrics_line ev = {.kind = METRICS_EVAL, .step = last, .loss = 1.0, .loss_tokens = 4096};
    assert_int_equal(metrics_write(&m, &ev, &e), 0);
    assert_int_equal(metrics_close(&m, &e), 0);
}

static void test_metrics_bytes(void **state) {
    (void)state;
    write_lines(0, 1, 2);
    char *text = slurp("metrics.jsonl");
    assert_string_equal(
        text,
        "{\"step\":1,\"loss\":3.500000,\"lr\":0.0003,\"grad_norm\":0.125000,"
        "\"loss_tokens\":100,\"tokens\":512,\"tokens_per_s\":1234.6,\"bytes_in\":10,"
        "\"bytes_out\":20}\n"
        "{\"step\":2,\"loss\":4.500000,\"lr\":0.0003,\"grad_norm\":0.125000,"
        "\"loss_tokens\":100,\"tokens\":512,\"tokens_per_s\":1234.6}\n"
        "{\"step\":2,\"eval_loss\":1.000000,\"eval_ppl\":2.7183,\"eval_loss_tokens\":4096}\n");
    free(text);
}

/* A sequence-classification eval line: accuracy and the confusion counts
 * in place of perplexity, and read back as an eval line. */
static void test_metrics_classification(void **state) {
    (void)state;
    metrics m = {0};
    err e;
    const long confusion[] = {3, 1, 0, 4};
    metrics_line ev = {.kind = METRICS_EVAL,
                       .step = 5,
                       .loss = 0.5,
                       .tokens = 8,
                       .num_labels = 2,
                       .confusion = confusion};
    assert_int_equal(metrics_open(&m, dir, 0, &e), 0);
    assert_int_equal(metrics_write(&m, &ev, &e), 0);
    assert_int_equal(metrics_close(&m, &e), 0);
    char *text = slurp("metrics.jsonl");
    assert_string_equal(text, "{\"step\":5,\"eval_loss\":0.500000,\"eval_accuracy\":0.875000,"
                              "\"eval_correct\":7,\"eval_sequences\":8,"
                              "\"eval_confusion\":[[3,1],[0,4]]}\n");
    free(text);
}

/* A server resuming at step 2 keeps the lines of steps 1 and 2 (the eval
 * line of step 2 too) and writes 3.. again; KEEP_ALL appends. */
static void test_metrics_resume(void **state) {
    (void)state;
    write_lines(0, 1, 4);
    write_lines(2, 3, 3);
    metrics m = {0};
    err e;
    assert_int_equal(metrics_open(&m, dir, METRICS_KEEP_ALL, &e), 0);
    metrics_line ev = {.kind = METRICS_EVAL, .step = 3, .loss = 2.0, .loss_tokens = 8};
    assert_int_equal(metrics_write(&m, &ev, &e), 0);
    assert_int_equal(metrics_close(&m, &e), 0);
    char *text = slurp("metrics.jsonl");
    const char *want_steps[] = {"{\"step\":1,", "{\"step\":2,", "{\"step\":3,", "{\"step\":3,",
                                "{\"step\":3,"};
    const char *p = text;
    for (int i = 0; i < 5; i++) {
        assert_memory_equal(p, want_steps[i], strlen(want_steps[i]));
        p = strchr(p, '\n') + 1;
    }
    assert_string_equal(p, "");
    assert_non_null(strstr(text, "\"eval_loss\":2.000000"));
    free(text);
}

typedef struct seen {
    int steps, evals;
    double loss_sum, eval_loss;
    uint64_t bytes;
} seen;

static int count_line(void *ctx, const metrics_line *l, err *e) {
    (void)e;
    seen *s = ctx;
    if (l->kind == METRICS_STEP) {
        s->steps++;
        s->loss_sum += l->loss;
        s->bytes += l->bytes_in + l->bytes_out;
        assert_int_equal(l->loss_tokens, 100);
        assert_true(l->tokens == 512 || l->tokens == 0); /* 0: a file of the old format */
        assert_true(l->tokens_per_s > 1234.5 && l->tokens_per_s < 1234.7);
    } else {
        s->evals++;
        s->eval_loss = l->loss;
        assert_int_equal(l->loss_tokens, 4096);
    }
    return 0;
}

static void test_metrics_read(void **state) {
    (void)state;
    write_lines(0, 1, 3);
    char *path = fs_join(dir, "metrics.jsonl");
    seen s = {0};
    err e;
    assert_int_equal(metrics_read(path, count_line, &s, &e), 0);
    assert_int_equal(s.steps, 3);
    assert_int_equal(s.evals, 1);
    assert_true(s.loss_sum == 3.5 + 4.5 + 5.5);
    assert_true(s.eval_loss == 1.0);
    assert_int_equal(s.bytes, 30 + 90); /* steps 1 and 3 carry bytes */
    FILE *f = fopen(path, "a");
    fputs("not json\n", f);
    fclose(f);
    assert_int_equal(metrics_read(path, count_line, &s, &e), -1);
    assert_non_null(strstr(e.msg, "metrics.jsonl:5: not a JSON object"));

    /* A file of the old format, whose `tokens` and `eval_tokens` counted the
     * tokens that carried loss, reads the same. */
    f = fopen(path, "w");
    fputs("{\"step\":1,\"loss\":3.500000,\"lr\":0.0003,\"grad_norm\":0.125000,\"tokens\":100,"
          "\"tokens_per_s\":1234.6,\"bytes_in\":10,\"bytes_out\":20}\n"
          "{\"step\":1,\"eval_loss\":1.000000,\"eval_ppl\":2.7183,\"eval_tokens\":4096}\n",
          f);
    fclose(f);
    memset(&s, 0, sizeof s);
    assert_int_equal(metrics_read(path, count_line, &s, &e), 0);
    assert_int_equal(s.steps, 1);
    assert_int_equal(s.evals, 1);
    assert_int_equal(s.bytes, 30);
    free(path);
}

int main(void) {
    if (!mkdtemp(dir)) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metrics_bytes),
        cmocka_unit_test(test_metrics_resume),
        cmocka_unit_test(test_metrics_read),
        cmocka_unit_test(test_metrics_classification),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char *path = fs_join(dir, "metrics.jsonl");
    if (path) unlink(path);
    free(path);
    rmdir(dir);
    return rc;
}
