/* base/fairshare.c: the lowest pass goes first; shares hold over many
 * rounds with experiments always ready, one at a time and co-batched; a
 * small share is never starved. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "base/fairshare.h"

static void test_lowest_pass_first(void **state) {
    (void)state;
    double used[3] = {6.0, 1.0, 3.0}, share[3] = {3.0, 1.0, 1.0};
    int chosen[3];
    /* Passes 2, 1, 3: the second. */
    assert_int_equal(fairshare_pick(used, share, 3, 0, 0.0, chosen), 1);
    assert_int_equal(chosen[0], 1);
    /* Together within 1.5 s of pass 1: the first (2) joins, the third (3) not. */
    assert_int_equal(fairshare_pick(used, share, 3, 1, 1.5, chosen), 2);
    assert_int_equal(chosen[0], 1);
    assert_int_equal(chosen[1], 0);
    /* Ties: the lower index. */
    double tie[2] = {2.0, 2.0}, one[2] = {1.0, 1.0};
    assert_int_equal(fairshare_pick(tie, one, 2, 0, 0.0, chosen), 1);
    assert_int_equal(chosen[0], 0);
}

/* Experiments always ready, each round costing 1 s split evenly among the
 * chosen; returns the seconds each got after `rounds`. */
static void simulate(const double *share, int n, int together, int rounds, double *used) {
    int chosen[8];
    for (int i = 0; i < n; i++) used[i] = 0.0;
    for (int r = 0; r < rounds; r++) {
        int k = fairshare_pick(used, share, n, together, 1.0, chosen);
        for (int c = 0; c < k; c++) used[chosen[c]] += 1.0 / k;
    }
}

static void test_shares_hold(void **state) {
    (void)state;
    double share[3] = {3.0, 1.0, 0.5}, used[3];
    for (int together = 0; together <= 1; together++) {
        simulate(share, 3, together, 9000, used);
        double total = used[0] + used[1] + used[2];
        /* Due: 3/4.5, 1/4.5, 0.5/4.5 of the time, within 2% of the total. */
        for (int i = 0; i < 3; i++) assert_true(fabs(used[i] / total - share[i] / 4.5) < 0.02);
    }
}

static void test_small_share_not_starved(void **state) {
    (void)state;
    double share[2] = {100.0, 0.01}, used[2];
    simulate(share, 2, 0, 200000, used);
    assert_true(used[1] > 0.0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lowest_pass_first),
        cmocka_unit_test(test_shares_hold),
        cmocka_unit_test(test_small_share_not_starved),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
