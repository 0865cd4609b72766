/* Tests of common/config/cmdline.c, the one command-line parser of every
 * program: typed options and their ranges, "--x=v", flags, "--" and the
 * positional arguments. The messages themselves are checked by
 * tests/it_config_cli.sh. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "config/cmdline.h"

static const char usage[] = "usage: prog\n";

static int parse(int argc, char **argv, int *n, uint64_t *u, float *x, int *flag, const char **str,
                 const char **pos) {
    const cmdline_opt opts[] = {
        CMDLINE_INT("--n", n, 1, 10), CMDLINE_UINT("--u", u, 0, CMDLINE_UINT_MAX),
        CMDLINE_FLOAT("--x", x, 0, 1), CMDLINE_SET("--flag", flag, 7), CMDLINE_STR("--s", str)};
    return cmdline_parse("prog", usage, opts, 5, "file", pos, 1, argc, argv);
}

static void test_cmdline_typed(void **state) {
    (void)state;
    int n = 0, flag = 0;
    uint64_t u = 0;
    float x = 0;
    const char *str = NULL, *pos = NULL;
    char *ok[] = {"prog", "--n", "10",    "--u=9007199254740992", "--x", "0.5", "--flag", "--s",
                  "a=b",  "--",  "--file"};
    assert_int_equal(parse(11, ok, &n, &u, &x, &flag, &str, &pos), 0);
    assert_int_equal(n, 10);
    assert_true(u == 9007199254740992ULL);
    assert_true(x == 0.5f);
    assert_int_equal(flag, 7);
    assert_string_equal(str, "a=b");
    assert_string_equal(pos, "--file");

    char *bad[][3] = {{"prog", "--n", "11"},   {"prog", "--n", "0"},   {"prog", "--n", "1.0"},
                      {"prog", "--n", ""},     {"prog", "--u", "-1"},  {"prog", "--u", "1e3"},
                      {"prog", "--x", "nan"},  {"prog", "--x", "1.5"}, {"prog", "--flag=1", "x"},
                      {"prog", "--bogus", "1"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        pos = NULL;
        assert_int_equal(parse(3, bad[i], &n, &u, &x, &flag, &str, &pos), 2);
    }
    char *missing[] = {"prog", "--n"};
    assert_int_equal(parse(2, missing, &n, &u, &x, &flag, &str, &pos), 2);
    char *two[] = {"prog", "a", "b"};
    pos = NULL;
    assert_int_equal(parse(3, two, &n, &u, &x, &flag, &str, &pos), 2);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cmdline_typed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
