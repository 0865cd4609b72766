/* Tests of common/base/utf8.c: validation at the edges of every sequence
 * length, the replaced parts of invalid input, encoding and decoding every
 * length, White_Space, counting and indexing by code point. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <string.h>

#include "base/utf8.h"

static size_t at(const char *s) {
    return utf8_valid_at((const unsigned char *)s, strlen(s));
}

static void test_validation(void **state) {
    (void)state;
    assert_int_equal(at("a"), 1);
    assert_int_equal(at("\xc2\x80"), 2);     /* U+0080 */
    assert_int_equal(at("\xc1\xbf"), 0);     /* overlong */
    assert_int_equal(at("\xe0\xa0\x80"), 3); /* U+0800 */
    assert_int_equal(at("\xe0\x9f\xbf"), 0); /* overlong */
    assert_int_equal(at("\xed\x9f\xbf"), 3); /* U+D7FF */
    assert_int_equal(at("\xed\xa0\x80"), 0); /* a surrogate */
    assert_int_equal(at("\xf0\x90\x80\x80"), 4);
    assert_int_equal(at("\xf4\x8f\xbf\xbf"), 4); /* U+10FFFF */
    assert_int_equal(at("\xf4\x90\x80\x80"), 0); /* past it */
    assert_int_equal(at("\xe2\x82"), 0);         /* cut short */
    assert_int_equal(at("\x80"), 0);
    size_t bad = 99;
    assert_true(utf8_valid("ok \xc3\xa9", 5, &bad));
    assert_int_equal(bad, 99);
    assert_false(utf8_valid("ok \xff", 4, &bad));
    assert_int_equal(bad, 3);
    assert_false(utf8_valid("\xe2\x82", 2, NULL));
}

static void test_invalid_parts(void **state) {
    (void)state;
    /* A lead and the continuation bytes that fitted it go as one U+FFFD;
     * a stray continuation byte or a byte that leads nothing alone. */
    assert_int_equal(utf8_invalid_len((const unsigned char *)"\xe2\x82"
                                                             "a",
                                      3),
                     2);
    assert_int_equal(utf8_invalid_len((const unsigned char *)"\xf0\x9f\x98", 3), 3);
    assert_int_equal(utf8_invalid_len((const unsigned char *)"\x80\x80", 2), 1);
    assert_int_equal(utf8_invalid_len((const unsigned char *)"\xe0\x80", 2), 1);
    assert_int_equal(utf8_invalid_len((const unsigned char *)"\xff", 1), 1);
}

static void test_code_points(void **state) {
    (void)state;
    static const uint32_t cps[] = {0x41, 0xE9, 0x20AC, 0x1F680, 0x10FFFF};
    static const size_t lens[] = {1, 2, 3, 4, 4};
    for (int i = 0; i < 5; i++) {
        char u[4];
        size_t n = utf8_encode(cps[i], u), l;
        assert_int_equal(n, lens[i]);
        assert_int_equal(utf8_valid_at((const unsigned char *)u, n), n);
        assert_int_equal(utf8_decode((const unsigned char *)u, &l), cps[i]);
        assert_int_equal(l, n);
        assert_int_equal(utf8_seq_len((unsigned char)u[0]), n);
    }
    size_t l;
    assert_int_equal(utf8_last("a\xc3\xa9", 3, &l), 0xE9);
    assert_int_equal(l, 2);
    assert_true(utf8_is_white_space(0x3000));
    assert_true(utf8_is_white_space(0x85));
    assert_false(utf8_is_white_space(0x200B)); /* zero width space is not */
    const char *s = "h\xc3\xa9llo \xf0\x9f\x9a\x80!";
    assert_int_equal(utf8_count(s, strlen(s)), 8);
    assert_int_equal(utf8_offset(s, strlen(s), 2), 3);
    assert_int_equal(utf8_offset(s, strlen(s), 7), 11);
    assert_int_equal(utf8_offset(s, strlen(s), 99), strlen(s));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_validation),
        cmocka_unit_test(test_invalid_parts),
        cmocka_unit_test(test_code_points),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
