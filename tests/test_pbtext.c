/* Tests of common/config/pbtext.c: every scalar type and its limits (on the
 * test-only messages of proto/testmsg.proto), the exact file:line:col of each
 * error class, dotted-path overrides, field locations, the canonical writer
 * and parse(print(m)) == m on every example in examples/. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/pbtext.h"
#include "peftps.pb-c.h"
#include "testmsg.pb-c.h"

#define EXP (&peftps__experiment__descriptor)
#define TS (&peftps__test__test_scalars__descriptor)

static ProtobufCMessage *parse_ok(const ProtobufCMessageDescriptor *d, const char *text) {
    err e;
    ProtobufCMessage *m = NULL;
    if (pbtext_parse(d, text, strlen(text), "t.pbtxt", &m, NULL, &e))
        fail_msg("parse failed: %s\ninput:\n%s", e.msg, text);
    assert_non_null(m);
    return m;
}

/* Parses text and expects exactly the error `want`, on one line. */
static void expect_error_n(const ProtobufCMessageDescriptor *d, const char *text, size_t len,
                           const char *want) {
    err e = {{0}};
    ProtobufCMessage *m = (ProtobufCMessage *)&e;
    pbtext_locs *locs = pbtext_locs_new();
    assert_int_equal(pbtext_parse(d, text, len, "t.pbtxt", &m, locs, &e), -1);
    assert_null(m);
    assert_string_equal(e.msg, want);
    assert_null(strchr(e.msg, '\n'));
    /* A failed parse records no locations. */
    pbtext_pos pos;
    assert_int_equal(pbtext_locate(locs, "seed", &pos), -1);
    pbtext_locs_free(locs);
}

static void expect_error(const ProtobufCMessageDescriptor *d, const char *text, const char *want) {
    expect_error_n(d, text, strlen(text), want);
}

static char *print(const ProtobufCMessage *m) {
    char *s = NULL;
    err e;
    assert_int_equal(pbtext_print(m, &s, &e), 0);
    assert_non_null(s);
    return s;
}

/* parse(print(m)) packs to the bytes of m, and printing again gives the
 * same text. */
static void roundtrip(const ProtobufCMessage *m) {
    char *text = print(m);
    ProtobufCMessage *back = parse_ok(m->descriptor, text);
    if (!pbtext_equal(m, back)) fail_msg("round trip changed the message; printed:\n%s", text);
    char *again = print(back);
    assert_string_equal(text, again);
    free(again);
    free(text);
    protobuf_c_message_free_unpacked(back, NULL);
}

/* The parsed message is what unpacking its own bytes gives. */
static void same_as_unpacked(const ProtobufCMessage *m) {
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *b = malloc(n + 1);
    assert_non_null(b);
    assert_int_equal(protobuf_c_message_pack(m, b), n);
    ProtobufCMessage *u = protobuf_c_message_unpack(m->descriptor, NULL, n, b);
    assert_non_null(u);
    assert_true(pbtext_equal(m, u));
    char *t1 = print(m), *t2 = print(u);
    assert_string_equal(t1, t2);
    free(t1);
    free(t2);
    free(b);
    protobuf_c_message_free_unpacked(u, NULL);
}

static uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static uint64_t double_bits(double d) {
    uint64_t u;
    memcpy(&u, &d, 8);
    return u;
}

/* ---- examples ------------------------------------------------------------ */

static void test_examples_roundtrip(void **state) {
    static const char *const names[] = {"lora",       "prefix", "layer_wise", "attention_heads",
                                        "subnetwork", "full"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char path[128];
        snprintf(path, sizeof path, "examples/%s.pbtxt", names[i]);
        ProtobufCMessage *m = NULL;
        pbtext_locs *locs = pbtext_locs_new();
        err e;
        if (pbtext_parse_file(EXP, path, &m, locs, &e)) fail_msg("%s", e.msg);
        Peftps__Experiment *x = (Peftps__Experiment *)m;
        assert_string_equal(x->name, names[i]);
        assert_non_null(x->method);
        assert_int_not_equal(x->method->kind_case, PEFTPS__METHOD__KIND__NOT_SET);
        assert_string_equal(x->model->path, "tests/fixtures/tiny-llama");
        pbtext_pos pos;
        assert_int_equal(pbtext_locate(locs, "model.path", &pos), 0);
        assert_string_equal(pos.source, path);
        assert_true(pos.line > 1);
        roundtrip(m);
        same_as_unpacked(m);
        pbtext_locs_free(locs);
        protobuf_c_message_free_unpacked(m, NULL);
    }
}

/* ---- scalars ------------------------------------------------------------- */

static void test_scalar_limits(void **state) {
    const char *text = "f_int32: -2147483648\n"
                       "f_int64: -9223372036854775808\n"
                       "f_uint32: 4294967295\n"
                       "f_uint64: 18446744073709551615\n"
                       "f_sint32: 2147483647\n"
                       "f_sint64: 9223372036854775807\n"
                       "f_fixed32: 0xFFFFFFFF\n"
                       "f_fixed64: 01777777777777777777777  # octal 2^64-1\n"
                       "f_sfixed32: -0x80000000\n"
                       "f_sfixed64: -9223372036854775808\n"
                       "f_float: -0.0\n"
                       "f_double: -0\n"
                       "f_bool: t\n"
                       "f_enum: -3\n";
    Peftps__Test__TestScalars *m = (Peftps__Test__TestScalars *)parse_ok(TS, text);
    assert_true(m->has_f_int32 && m->f_int32 == INT32_MIN);
    assert_true(m->has_f_int64 && m->f_int64 == INT64_MIN);
    assert_true(m->has_f_uint32 && m->f_uint32 == UINT32_MAX);
    assert_true(m->has_f_uint64 && m->f_uint64 == UINT64_MAX);
    assert_true(m->has_f_sint32 && m->f_sint32 == INT32_MAX);
    assert_true(m->has_f_sint64 && m->f_sint64 == INT64_MAX);
    assert_true(m->has_f_fixed32 && m->f_fixed32 == UINT32_MAX);
    assert_true(m->has_f_fixed64 && m->f_fixed64 == UINT64_MAX);
    assert_true(m->has_f_sfixed32 && m->f_sfixed32 == INT32_MIN);
    assert_true(m->has_f_sfixed64 && m->f_sfixed64 == INT64_MIN);
    assert_true(m->has_f_float && m->f_float == 0.0f && signbit(m->f_float));
    assert_true(m->has_f_double && m->f_double == 0.0 && signbit(m->f_double));
    assert_true(m->has_f_bool && m->f_bool == 1);
    assert_true(m->has_f_enum && m->f_enum == PEFTPS__TEST__COLOR__BLUE);
    assert_false(m->has_f_default_int);
    assert_int_equal(m->f_default_int, 7);
    char *out = print(&m->base);
    assert_string_equal(out, "f_int32: -2147483648\n"
                             "f_int64: -9223372036854775808\n"
                             "f_uint32: 4294967295\n"
                             "f_uint64: 18446744073709551615\n"
                             "f_sint32: 2147483647\n"
                             "f_sint64: 9223372036854775807\n"
                             "f_fixed32: 4294967295\n"
                             "f_fixed64: 18446744073709551615\n"
                             "f_sfixed32: -2147483648\n"
                             "f_sfixed64: -9223372036854775808\n"
                             "f_float: -0\n"
                             "f_double: -0\n"
                             "f_bool: true\n"
                             "f_enum: BLUE\n");
    free(out);
    roundtrip(&m->base);
    same_as_unpacked(&m->base);
    protobuf_c_message_free_unpacked(&m->base, NULL);
}

static void test_floats(void **state) {
    static const struct {
        const char *in, *out;
        float want;
    } fl[] = {
        {"0.1", "0.1", 0.1f},
        {"16777217", "16777216", 16777216.0f}, /* rounds to the nearest float */
        {"3.40282347e+38", "3.4028235e+38", FLT_MAX},
        {"1.17549435e-38", "1.1754944e-38", FLT_MIN},
        {"1e-45", "1e-45", 1e-45f}, /* the smallest denormal */
        {"1.5f", "1.5", 1.5f},
        {"3", "3", 3.0f},
        {".5", "0.5", 0.5f},
        {"0x10", "16", 16.0f},
        {"1E3", "1000", 1000.0f},
        {"-2.5e-3", "-0.0025", -2.5e-3f},
        {"3e-4", "0.0003", 3e-4f},
        {"1e10", "10000000000", 1e10f}, /* plain digits below 1e16 */
        {"1e16", "1e+16", 1e16f},
    };
    for (size_t i = 0; i < sizeof fl / sizeof fl[0]; i++) {
        char text[96], want[96];
        snprintf(text, sizeof text, "f_float: %s", fl[i].in);
        snprintf(want, sizeof want, "f_float: %s\n", fl[i].out);
        Peftps__Test__TestScalars *m = (Peftps__Test__TestScalars *)parse_ok(TS, text);
        assert_int_equal(float_bits(m->f_float), float_bits(fl[i].want));
        char *out = print(&m->base);
        assert_string_equal(out, want);
        free(out);
        roundtrip(&m->base);
        protobuf_c_message_free_unpacked(&m->base, NULL);
    }
    static const struct {
        const char *in, *out;
        double want;
    } db[] = {
        {"0.1", "0.1", 0.1},
        {"0.3333333333333333", "0.3333333333333333", 1.0 / 3.0},
        {"1.7976931348623157e308", "1.7976931348623157e+308", DBL_MAX},
        {"4.9406564584124654e-324", "5e-324", 4.9406564584124654e-324},
        {"123456789012345678", "1.2345678901234568e+17", 123456789012345678.0},
        {"1e-8", "1e-08", 1e-8},
        {"999999999999999.9", "999999999999999.9", 999999999999999.9},
        {"1e15", "1000000000000000", 1e15},
    };
    for (size_t i = 0; i < sizeof db / sizeof db[0]; i++) {
        char text[96], want[96];
        snprintf(text, sizeof text, "f_double: %s", db[i].in);
        snprintf(want, sizeof want, "f_double: %s\n", db[i].out);
        Peftps__Test__TestScalars *m = (Peftps__Test__TestScalars *)parse_ok(TS, text);
        assert_int_equal(double_bits(m->f_double), double_bits(db[i].want));
        char *out = print(&m->base);
        assert_string_equal(out, want);
        free(out);
        roundtrip(&m->base);
        protobuf_c_message_free_unpacked(&m->base, NULL);
    }
    /* Non-finite values, any case, with sign. */
    Peftps__Test__TestScalars *m = (Peftps__Test__TestScalars *)parse_ok(
        TS, "r_float: [inf, -Infinity, nan, -NaN] r_double: [-inf, INF, -nan, nan]");
    assert_int_equal(m->n_r_float, 4);
    assert_true(isinf(m->r_float[0]) && m->r_float[0] > 0);
    assert_true(isinf(m->r_float[1]) && m->r_float[1] < 0);
    assert_true(isnan(m->r_float[2]) && !signbit(m->r_float[2]));
    assert_true(isnan(m->r_float[3]) && signbit(m->r_float[3]));
    assert_true(isinf(m->r_double[0]) && m->r_double[0] < 0);
    assert_true(isnan(m->r_double[2]) && signbit(m->r_double[2]));
    char *out = print(&m->base);
    assert_string_equal(out, "r_float: [inf, -inf, nan, -nan]\nr_double: [-inf, inf, -nan, nan]\n");
    free(out);
    roundtrip(&m->base);
    protobuf_c_message_free_unpacked(&m->base, NULL);
}

static void test_bools_strings_bytes_enums(void **state) {
    Peftps__Test__TestScalars *m = (Peftps__Test__TestScalars *)parse_ok(
        TS,
        "r_bool: [true, false, t, f, 1, 0, True, False]\n"
        "f_string: \"tab\\there \\\"q\\\" \\'s\\' \\\\ \\x41\\101\\u00e9\\U0001F600\\ud83d\\ude00\""
        " 'single\"' \"\\?\\a\\b\\f\\v\\r\\n\"\n"
        "f_bytes: \"\\0\\377\\x7f\" '\\1a'\n"
        "r_enum: [RED, 2, BLUE, -3, COLOR_UNSPECIFIED]\n"
        "r_string: 'a' r_string: \"\" r_string: \"caf\xc3\xa9\"\n"
        "r_bytes: [\"\", \"\\xff\\xfe\"]\n");
    static const int want_bools[] = {1, 0, 1, 0, 1, 0, 1, 0};
    assert_int_equal(m->n_r_bool, 8);
    for (int i = 0; i < 8; i++) assert_int_equal(m->r_bool[i], want_bools[i]);
    assert_string_equal(m->f_string, "tab\there \"q\" 's' \\ AA\xc3\xa9\xf0\x9f\x98\x80"
                                     "\xf0\x9f\x98\x80single\"?\a\b\f\v\r\n");
    assert_true(m->has_f_bytes);
    assert_int_equal(m->f_bytes.len, 5);
    assert_memory_equal(m->f_bytes.data, "\0\377\177\001a", 5);
    assert_int_equal(m->n_r_enum, 5);
    assert_int_equal(m->r_enum[0], PEFTPS__TEST__COLOR__RED);
    assert_int_equal(m->r_enum[1], PEFTPS__TEST__COLOR__GREEN);
    assert_int_equal(m->r_enum[2], PEFTPS__TEST__COLOR__BLUE);
    assert_int_equal(m->r_enum[3], PEFTPS__TEST__COLOR__BLUE);
    assert_int_equal(m->r_enum[4], PEFTPS__TEST__COLOR__COLOR_UNSPECIFIED);
    assert_int_equal(m->n_r_string, 3);
    assert_string_equal(m->r_string[1], "");
    assert_string_equal(m->r_string[2], "caf\xc3\xa9");
    assert_int_equal(m->n_r_bytes, 2);
    assert_int_equal(m->r_bytes[0].len, 0);
    assert_int_equal(m->r_bytes[1].len, 2);
    char *out = print(&m->base);
    assert_string_equal(
        out, "f_string: \"tab\\there \\\"q\\\" 's' \\\\ AA\xc3\xa9\xf0\x9f\x98\x80\xf0\x9f\x98\x80"
             "single\\\"?\\007\\010\\014\\013\\r\\n\"\n"
             "f_bytes: \"\\000\\377\\177\\001a\"\n"
             "r_bool: [true, false, true, false, true, false, true, false]\n"
             "r_string: [\"a\", \"\", \"caf\xc3\xa9\"]\n"
             "r_bytes: [\"\", \"\\377\\376\"]\n"
             "r_enum: [RED, GREEN, BLUE, BLUE, COLOR_UNSPECIFIED]\n");
    free(out);
    roundtrip(&m->base);
    same_as_unpacked(&m->base);
    protobuf_c_message_free_unpacked(&m->base, NULL);
}

static void test_repeated_nested_oneof(void **state) {
    Peftps__Test__TestScalars *m = (Peftps__Test__TestScalars *)parse_ok(
        TS, "# comment line\n"
            "r_int32: 1, r_int32: [2, -3]; r_int32: []\n"
            "r_int64: [-9223372036854775808, 9223372036854775807]\n"
            "r_uint32: [0, 4294967295] r_uint64: [18446744073709551615]\n"
            "r_sint32: [-1] r_sint64: [-2] r_fixed32: [3] r_fixed64: [4]\n"
            "r_sfixed32: [-5] r_sfixed64: [-6] r_packed: [7, 8, 9]\n"
            "f_inner: { a: 1 s: \"x\" }\n"
            "r_inner < a: 2 > r_inner { } r_inner: [{a: 3}, <s: 'y'>]\n"
            "o_inner { a: 4 }\n"
            "child { child { f_int32: 5 } }\n"
            "f_default_string: \"dflt\"\n");
    assert_int_equal(m->n_r_int32, 3);
    assert_int_equal(m->r_int32[0], 1);
    assert_int_equal(m->r_int32[2], -3);
    assert_int_equal(m->n_r_int64, 2);
    assert_true(m->r_int64[0] == INT64_MIN);
    assert_int_equal(m->n_r_packed, 3);
    assert_int_equal(m->f_inner->a, 1);
    assert_int_equal(m->n_r_inner, 4);
    assert_int_equal(m->r_inner[0]->a, 2);
    assert_false(m->r_inner[1]->has_a);
    assert_int_equal(m->r_inner[2]->a, 3);
    assert_string_equal(m->r_inner[3]->s, "y");
    assert_int_equal(m->choice_case, PEFTPS__TEST__TEST_SCALARS__CHOICE_O_INNER);
    assert_int_equal(m->o_inner->a, 4);
    assert_int_equal(m->child->child->f_int32, 5);
    /* Set explicitly to the default: a string of its own, so it is packed. */
    assert_string_equal(m->f_default_string, "dflt");
    char *out = print(&m->base);
    assert_string_equal(out, "f_inner {\n"
                             "  a: 1\n"
                             "  s: \"x\"\n"
                             "}\n"
                             "r_int32: [1, 2, -3]\n"
                             "r_int64: [-9223372036854775808, 9223372036854775807]\n"
                             "r_uint32: [0, 4294967295]\n"
                             "r_uint64: [18446744073709551615]\n"
                             "r_sint32: [-1]\n"
                             "r_sint64: [-2]\n"
                             "r_fixed32: [3]\n"
                             "r_fixed64: [4]\n"
                             "r_sfixed32: [-5]\n"
                             "r_sfixed64: [-6]\n"
                             "r_inner {\n"
                             "  a: 2\n"
                             "}\n"
                             "r_inner {\n"
                             "}\n"
                             "r_inner {\n"
                             "  a: 3\n"
                             "}\n"
                             "r_inner {\n"
                             "  s: \"y\"\n"
                             "}\n"
                             "r_packed: [7, 8, 9]\n"
                             "o_inner {\n"
                             "  a: 4\n"
                             "}\n"
                             "child {\n"
                             "  child {\n"
                             "    f_int32: 5\n"
                             "  }\n"
                             "}\n"
                             "f_default_string: \"dflt\"\n");
    free(out);
    roundtrip(&m->base);
    same_as_unpacked(&m->base);
    protobuf_c_message_free_unpacked(&m->base, NULL);

    /* Other oneof members: scalar, string, bytes. */
    static const char *const members[] = {"o_int: -7", "o_string: \"s\"", "o_bytes: \"\\0\""};
    static const int cases[] = {PEFTPS__TEST__TEST_SCALARS__CHOICE_O_INT,
                                PEFTPS__TEST__TEST_SCALARS__CHOICE_O_STRING,
                                PEFTPS__TEST__TEST_SCALARS__CHOICE_O_BYTES};
    for (int i = 0; i < 3; i++) {
        m = (Peftps__Test__TestScalars *)parse_ok(TS, members[i]);
        assert_int_equal(m->choice_case, cases[i]);
        roundtrip(&m->base);
        same_as_unpacked(&m->base);
        protobuf_c_message_free_unpacked(&m->base, NULL);
    }
}

static void test_files(void **state) {
    ProtobufCMessage *m = (ProtobufCMessage *)&m;
    err e;
    assert_int_equal(pbtext_parse_file(EXP, "/nonexistent/x.pbtxt", &m, NULL, &e), -1);
    assert_null(m);
    assert_string_equal(e.msg,
                        "/nonexistent/x.pbtxt: error: cannot read: No such file or directory");
    assert_int_equal(pbtext_parse_file(EXP, "examples", &m, NULL, &e), -1);
    assert_string_equal(e.msg, "examples: error: cannot read: Is a directory");
    assert_int_equal(pbtext_parse_file(EXP, "/dev/null", &m, NULL, &e), 0);
    assert_int_equal(protobuf_c_message_get_packed_size(m), 0);
    protobuf_c_message_free_unpacked(m, NULL);
}

static void test_empty_and_required(void **state) {
    ProtobufCMessage *m = parse_ok(EXP, "  # only a comment\n\n");
    char *out = print(m);
    assert_string_equal(out, "");
    free(out);
    assert_int_equal(protobuf_c_message_get_packed_size(m), 0);
    protobuf_c_message_free_unpacked(m, NULL);

    Peftps__Test__WithRequired *r =
        (Peftps__Test__WithRequired *)parse_ok(&peftps__test__with_required__descriptor, "x: 0");
    assert_int_equal(r->x, 0);
    out = print(&r->base);
    assert_string_equal(out, "x: 0\n");
    free(out);
    roundtrip(&r->base);
    protobuf_c_message_free_unpacked(&r->base, NULL);
}

/* ---- errors -------------------------------------------------------------- */

static void test_errors(void **state) {
    expect_error(EXP, "optimizer {\n  lerning_rate: 1\n}\n",
                 "t.pbtxt:2:3: error: unknown field \"lerning_rate\" in peftps.Optimizer; did you "
                 "mean \"lr\"?");
    expect_error(EXP, "data { batchsize: 4 }",
                 "t.pbtxt:1:8: error: unknown field \"batchsize\" in peftps.Data; did you mean "
                 "\"batch_size\"?");
    expect_error(EXP, "model { xyz: 1 }",
                 "t.pbtxt:1:9: error: unknown field \"xyz\" in peftps.Model; its fields are: path, "
                 "compute, recompute");
    expect_error(EXP, "schedule {\n  decay: LINEAR_X\n}",
                 "t.pbtxt:2:10: error: unknown value \"LINEAR_X\" for field \"decay\" (enum "
                 "peftps.Decay); did you mean \"LINEAR\"? valid values: DECAY_UNSPECIFIED, "
                 "CONSTANT, LINEAR, COSINE");
    expect_error(EXP, "schedule { decay: 7 }",
                 "t.pbtxt:1:19: error: 7 is not a value for field \"decay\" (enum peftps.Decay); "
                 "valid values: DECAY_UNSPECIFIED, CONSTANT, LINEAR, COSINE");
    expect_error(EXP, "seed: \"abc\"",
                 "t.pbtxt:1:7: error: expected an integer for uint64 field \"seed\", got a string");
    expect_error(EXP, "seed: 1.5",
                 "t.pbtxt:1:7: error: expected an integer for uint64 field \"seed\", got number "
                 "1.5");
    expect_error(EXP, "name: 12",
                 "t.pbtxt:1:7: error: expected a quoted string for string field \"name\", got "
                 "number 12");
    expect_error(EXP, "optimizer { lr: fast }",
                 "t.pbtxt:1:17: error: expected a number for float field \"lr\", got \"fast\"");
    expect_error(EXP, "checkpoint { resume: yes }",
                 "t.pbtxt:1:22: error: expected true or false for bool field \"resume\", got "
                 "\"yes\"");
    expect_error(EXP, "name: \"abc\nseed: 1",
                 "t.pbtxt:1:7: error: unterminated string: missing closing \"");
    expect_error(EXP, "name: 'abc\\'",
                 "t.pbtxt:1:7: error: unterminated string: missing closing '");
    expect_error(EXP, "method {\n  lora {}\n  prefix {}\n}",
                 "t.pbtxt:3:3: error: \"lora\" and \"prefix\" are members of the same oneof of "
                 "peftps.Method; set only one");
    expect_error(EXP, "method { lora { r: 300000000000 } }",
                 "t.pbtxt:1:20: error: 300000000000 is out of range for uint32 field \"r\" (0 to "
                 "4294967295)");
    expect_error(EXP, "seed: -1",
                 "t.pbtxt:1:7: error: -1 is out of range for uint64 field \"seed\" (0 to "
                 "18446744073709551615)");
    expect_error(EXP, "seed: 18446744073709551616",
                 "t.pbtxt:1:7: error: 18446744073709551616 is out of range for uint64 field "
                 "\"seed\" (0 to 18446744073709551615)");
    expect_error(TS, "f_int32: -2147483649",
                 "t.pbtxt:1:10: error: -2147483649 is out of range for int32 field \"f_int32\" "
                 "(-2147483648 to 2147483647)");
    expect_error(TS, "f_int64: 9223372036854775808",
                 "t.pbtxt:1:10: error: 9223372036854775808 is out of range for int64 field "
                 "\"f_int64\" (-9223372036854775808 to 9223372036854775807)");
    expect_error(TS, "f_float: 1e39",
                 "t.pbtxt:1:10: error: 1e39 is out of range for float field \"f_float\"");
    expect_error(TS, "f_double: 0x1p3",
                 "t.pbtxt:1:11: error: expected a number for double field \"f_double\", got "
                 "number 0x1p3");
    expect_error(EXP, "model {\n  path: \"x\"\n",
                 "t.pbtxt:3:1: error: expected '}' to close \"model\" opened at 1:7, got end of "
                 "input");
    expect_error(EXP, "model < path: \"x\" }",
                 "t.pbtxt:1:19: error: expected a field name, got '}'");
    expect_error(EXP, "name: \"a\\qb\"", "t.pbtxt:1:9: error: bad escape \"\\q\" in string");
    expect_error(EXP, "name: \"a\\x\"",
                 "t.pbtxt:1:9: error: bad escape: \\x needs 1 or 2 hex digits");
    expect_error(EXP, "name: \"\\u12\"", "t.pbtxt:1:8: error: bad escape: \\u needs 4 hex digits");
    expect_error(EXP, "name: \"\\ud800\"",
                 "t.pbtxt:1:8: error: bad escape: U+D800 is not a Unicode scalar value");
    expect_error(EXP, "name: \"\\777\"",
                 "t.pbtxt:1:8: error: bad escape: octal \\777 is above \\377");
    expect_error(EXP, "seed: 1\nseed: 2",
                 "t.pbtxt:2:1: error: field \"seed\" is set twice (first at 1:1)");
    expect_error(EXP, "seed 1",
                 "t.pbtxt:1:6: error: expected ':' after field name \"seed\", got number 1");
    expect_error(EXP, "model: path",
                 "t.pbtxt:1:8: error: expected '{' after \"model\", got \"path\"");
    expect_error(EXP, "seed: [1]",
                 "t.pbtxt:1:7: error: field \"seed\" is not repeated; a list [...] needs a "
                 "repeated field");
    expect_error(EXP, "cluster { servers: [\"a\" \"b\"; }",
                 "t.pbtxt:1:28: error: expected ',' or ']' in the list of \"servers\", got ';'");
    expect_error(EXP, "[ext.field]: 1",
                 "t.pbtxt:1:1: error: extension and Any fields ([...]) are not supported");
    expect_error(EXP, "name: \"a\\0b\"",
                 "t.pbtxt:1:7: error: string field \"name\" cannot hold a NUL byte (bytes fields "
                 "can)");
    expect_error(EXP, "name: \"\xff\"",
                 "t.pbtxt:1:7: error: string for field \"name\" is not valid UTF-8");
    expect_error(EXP, "name: \"\\xc3\"",
                 "t.pbtxt:1:7: error: string for field \"name\" is not valid UTF-8");
    expect_error_n(EXP, "seed: 1\n\0", 9,
                   "t.pbtxt:2:1: error: expected a field name, got byte 0x00");
    expect_error(EXP, "\xef\xbb\xbfseed: 1",
                 "t.pbtxt:1:1: error: expected a field name, got byte 0xef");
    expect_error(&peftps__test__with_required__descriptor, "inner { a: 1 }",
                 "t.pbtxt:1:15: error: missing required field \"x\" of peftps.test.WithRequired");
    expect_error(TS, "f_int32: 12abc",
                 "t.pbtxt:1:10: error: expected an integer for int32 field \"f_int32\", got number "
                 "12abc");
}

static void test_depth_limit(void **state) {
    char *ok = malloc(16 * (PBTEXT_MAX_DEPTH + 2)), *bad = malloc(16 * (PBTEXT_MAX_DEPTH + 2));
    size_t n = 0;
    for (int i = 0; i < PBTEXT_MAX_DEPTH; i++) n += (size_t)sprintf(ok + n, "child {");
    for (int i = 0; i < PBTEXT_MAX_DEPTH; i++) ok[n++] = '}';
    ok[n] = 0;
    Peftps__Test__TestScalars *m = (Peftps__Test__TestScalars *)parse_ok(TS, ok);
    int depth = 0;
    for (Peftps__Test__TestScalars *c = m; c->child; c = c->child) depth++;
    assert_int_equal(depth, PBTEXT_MAX_DEPTH);
    roundtrip(&m->base);
    protobuf_c_message_free_unpacked(&m->base, NULL);

    n = 0;
    for (int i = 0; i <= PBTEXT_MAX_DEPTH; i++) n += (size_t)sprintf(bad + n, "child {");
    bad[n] = 0;
    char want[128];
    snprintf(want, sizeof want, "t.pbtxt:1:%d: error: messages nested deeper than %d levels",
             7 * PBTEXT_MAX_DEPTH + 7, PBTEXT_MAX_DEPTH);
    expect_error(TS, bad, want);
    free(ok);
    free(bad);
}

/* ---- locations ----------------------------------------------------------- */

static void test_locations(void **state) {
    const char *text = "name: \"x\"\n"
                       "method {\n"
                       "  lora {\n"
                       "    target_modules: Q_PROJ\n"
                       "    target_modules: [K_PROJ,\n"
                       "                     V_PROJ]\n"
                       "  }\n"
                       "}\n"
                       "optimizer { lr: 1e-4 }\n";
    pbtext_locs *locs = pbtext_locs_new();
    ProtobufCMessage *m;
    err e;
    assert_int_equal(pbtext_parse(EXP, text, strlen(text), "exp.pbtxt", &m, locs, &e), 0);
    static const struct {
        const char *path;
        int line, col;
    } want[] = {
        {"name", 1, 1},
        {"method", 2, 1},
        {"method.lora", 3, 3},
        {"method.lora.target_modules", 4, 5},
        {"method.lora.target_modules[0]", 4, 21},
        {"method.lora.target_modules[1]", 5, 22},
        {"method.lora.target_modules[2]", 6, 22},
        {"optimizer.lr", 9, 13},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        pbtext_pos pos;
        if (pbtext_locate(locs, want[i].path, &pos)) fail_msg("no location for %s", want[i].path);
        assert_string_equal(pos.source, "exp.pbtxt");
        assert_int_equal(pos.line, want[i].line);
        assert_int_equal(pos.col, want[i].col);
    }
    pbtext_pos pos;
    assert_int_equal(pbtext_locate(locs, "seed", &pos), -1);
    assert_int_equal(pbtext_locate(locs, "method.lora.target_modules[3]", &pos), -1);
    char where[64];
    assert_int_equal(pbtext_locate(locs, "optimizer.lr", &pos), 0);
    pbtext_pos_format(&pos, where, sizeof where);
    assert_string_equal(where, "exp.pbtxt:9:13");
    pbtext_locs_free(locs);
    protobuf_c_message_free_unpacked(m, NULL);

    /* Elements of repeated messages continue the path with their index. */
    locs = pbtext_locs_new();
    const char *t2 = "r_inner { a: 1 }\nr_inner { a: 2 s: \"z\" }";
    assert_int_equal(pbtext_parse(TS, t2, strlen(t2), "t2", &m, locs, &e), 0);
    assert_int_equal(pbtext_locate(locs, "r_inner[1].s", &pos), 0);
    assert_int_equal(pos.line, 2);
    assert_int_equal(pos.col, 16);
    assert_int_equal(pbtext_locate(locs, "r_inner[0].a", &pos), 0);
    assert_int_equal(pos.col, 11);
    pbtext_locs_free(locs);
    protobuf_c_message_free_unpacked(m, NULL);
}

/* ---- overrides ----------------------------------------------------------- */

static void set_ok(ProtobufCMessage *m, const char *assignment, pbtext_locs *locs) {
    err e;
    char label[256];
    snprintf(label, sizeof label, "--set %s", assignment);
    if (pbtext_set_at(m, assignment, label, locs, &e)) fail_msg("%s", e.msg);
}

/* The override fails with `want` and leaves the message's bytes as they were. */
static void set_fails(ProtobufCMessage *m, const char *assignment, const char *want) {
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *before = malloc(n + 1), *after = malloc(n + 1);
    protobuf_c_message_pack(m, before);
    err e;
    assert_int_equal(pbtext_set(m, assignment, &e), -1);
    assert_string_equal(e.msg, want);
    assert_int_equal(protobuf_c_message_get_packed_size(m), n);
    protobuf_c_message_pack(m, after);
    assert_memory_equal(before, after, n);
    free(before);
    free(after);
}

static void test_set(void **state) {
    pbtext_locs *locs = pbtext_locs_new();
    const char *text = "method {\n  prefix { num_virtual_tokens: 5 }\n}\n";
    ProtobufCMessage *m;
    err e;
    assert_int_equal(pbtext_parse(EXP, text, strlen(text), "f.pbtxt", &m, locs, &e), 0);
    Peftps__Experiment *x = (Peftps__Experiment *)m;
    pbtext_pos pos;

    /* A scalar in a block that does not exist yet. */
    set_ok(m, "optimizer.lr=3e-4", locs);
    assert_non_null(x->optimizer);
    assert_true(x->optimizer->has_lr);
    assert_int_equal(float_bits(x->optimizer->lr), float_bits(3e-4f));
    assert_false(x->optimizer->has_beta1);
    assert_int_equal(pbtext_locate(locs, "optimizer.lr", &pos), 0);
    assert_string_equal(pos.source, "--set optimizer.lr=3e-4");
    assert_int_equal(pos.line, 0);

    /* A oneof switch: the prefix block and its locations go. */
    assert_int_equal(pbtext_locate(locs, "method.prefix.num_virtual_tokens", &pos), 0);
    set_ok(m, "method.lora.r=16", locs);
    assert_int_equal(x->method->kind_case, PEFTPS__METHOD__KIND_LORA);
    assert_true(x->method->lora->has_r);
    assert_int_equal(x->method->lora->r, 16);
    assert_int_equal(pbtext_locate(locs, "method.prefix.num_virtual_tokens", &pos), -1);
    assert_int_equal(pbtext_locate(locs, "method.lora.r", &pos), 0);

    /* Enums, lists, and a single value replacing a list. */
    set_ok(m, "schedule.decay=COSINE", locs);
    assert_int_equal(x->schedule->decay, PEFTPS__DECAY__COSINE);
    set_ok(m, "method.lora.target_modules=[Q_PROJ, K_PROJ, 3]", locs);
    assert_int_equal(x->method->lora->n_target_modules, 3);
    assert_int_equal(x->method->lora->target_modules[2], PEFTPS__MODULE__V_PROJ);
    assert_int_equal(pbtext_locate(locs, "method.lora.target_modules[2]", &pos), 0);
    set_ok(m, "method.lora.target_modules=O_PROJ", locs);
    assert_int_equal(x->method->lora->n_target_modules, 1);
    assert_int_equal(x->method->lora->target_modules[0], PEFTPS__MODULE__O_PROJ);
    assert_int_equal(pbtext_locate(locs, "method.lora.target_modules[2]", &pos), -1);
    set_ok(m, "method.lora.layers=[]", locs);
    assert_int_equal(x->method->lora->n_layers, 0);

    /* Strings: unquoted text is taken verbatim, quoted text is unescaped. */
    set_ok(m, "cluster.servers=tcp://10.0.0.5:5555", locs);
    assert_int_equal(x->cluster->n_servers, 1);
    assert_string_equal(x->cluster->servers[0], "tcp://10.0.0.5:5555");
    set_ok(m, "cluster.servers=[\"tcp://a:1\", 'tcp://b:2']", locs);
    assert_int_equal(x->cluster->n_servers, 2);
    assert_string_equal(x->cluster->servers[1], "tcp://b:2");
    set_ok(m, "name=my run=1", locs);
    assert_string_equal(x->name, "my run=1");
    set_ok(m, "name=\"tab\\there\"", locs);
    assert_string_equal(x->name, "tab\there");
    set_ok(m, "data.train=\"\"", locs);
    assert_string_equal(x->data->train, "");

    /* A whole message replaced. */
    set_ok(m, "optimizer={beta1: 0.5, eps: 1e-6}", locs);
    assert_false(x->optimizer->has_lr);
    assert_true(x->optimizer->has_beta1);
    assert_int_equal(pbtext_locate(locs, "optimizer.lr", &pos), -1);
    assert_int_equal(pbtext_locate(locs, "optimizer.eps", &pos), 0);
    assert_string_equal(pos.source, "--set optimizer={beta1: 0.5, eps: 1e-6}");

    /* Back to prefix, then a oneof member replaced by a message value. */
    set_ok(m, "method.prefix={num_virtual_tokens: 3}", locs);
    assert_int_equal(x->method->kind_case, PEFTPS__METHOD__KIND_PREFIX);
    assert_int_equal(x->method->prefix->num_virtual_tokens, 3);
    assert_int_equal(pbtext_locate(locs, "method.lora.r", &pos), -1);
    set_ok(m, "method.full={}", locs);
    assert_int_equal(x->method->kind_case, PEFTPS__METHOD__KIND_FULL);
    roundtrip(m);
    same_as_unpacked(m);

    /* Failures leave the message as it was. */
    set_fails(m, "optimizer.lr=abc",
              "optimizer.lr=abc: error: expected a number for float field \"lr\", got \"abc\"");
    set_fails(m, "optimizer.lerning_rate=1",
              "optimizer.lerning_rate=1: error: unknown field \"lerning_rate\" in "
              "peftps.Optimizer; did you mean \"lr\"?");
    set_fails(m, "method.lora.r=-1",
              "method.lora.r=-1: error: -1 is out of range for uint32 field \"r\" (0 to "
              "4294967295)");
    set_fails(m, "method.lora.r.x=1",
              "method.lora.r.x=1: error: \"r\" is a uint32 field of peftps.LoRA; a path cannot go "
              "inside it");
    set_fails(m, "seed=1 2", "seed=1 2: error: unexpected number 2 after the value of \"seed\"");
    set_fails(m, "seed", "seed: error: expected PATH=VALUE, e.g. optimizer.lr=3e-4");
    set_fails(m, "=3", "=3: error: expected PATH=VALUE, e.g. optimizer.lr=3e-4");
    set_fails(m, "optimizer..lr=3",
              "optimizer..lr=3: error: \"optimizer..lr\" is not a field path");
    set_fails(m, "seed=[1, 2]",
              "seed=[1, 2]: error: field \"seed\" is not repeated; a list [...] needs a repeated "
              "field");
    set_fails(m, "optimizer=3",
              "optimizer=3: error: expected '{' to start message \"optimizer\", got number 3");
    set_fails(m, "method.lora.target_modules=[Q_PROJ, NOPE]",
              "method.lora.target_modules=[Q_PROJ, NOPE]: error: unknown value \"NOPE\" for field "
              "\"target_modules\" (enum peftps.Module); valid values: MODULE_UNSPECIFIED, Q_PROJ, "
              "K_PROJ, V_PROJ, O_PROJ, GATE_PROJ, UP_PROJ, DOWN_PROJ, INPUT_LAYERNORM, "
              "POST_ATTENTION_LAYERNORM");
    set_fails(m, "optimizer={lr: 1 lr: 2}",
              "optimizer={lr: 1 lr: 2}: error: field \"lr\" is set twice");
    assert_int_equal(x->method->kind_case, PEFTPS__METHOD__KIND_FULL);
    pbtext_locs_free(locs);
    protobuf_c_message_free_unpacked(m, NULL);

    /* Other types, on the test message. */
    Peftps__Test__TestScalars *t = (Peftps__Test__TestScalars *)parse_ok(TS, "o_string: \"s\"");
    set_ok(&t->base, "o_inner.a=5", NULL);
    assert_int_equal(t->choice_case, PEFTPS__TEST__TEST_SCALARS__CHOICE_O_INNER);
    assert_int_equal(t->o_inner->a, 5);
    set_ok(&t->base, "o_bytes=raw", NULL);
    assert_int_equal(t->choice_case, PEFTPS__TEST__TEST_SCALARS__CHOICE_O_BYTES);
    assert_int_equal(t->o_bytes.len, 3);
    set_ok(&t->base, "o_int=-4", NULL);
    assert_int_equal(t->o_int, -4);
    set_ok(&t->base, "r_inner=[{a: 1}, {a: 2}]", NULL);
    assert_int_equal(t->n_r_inner, 2);
    set_ok(&t->base, "r_inner={s: 'q'}", NULL);
    assert_int_equal(t->n_r_inner, 1);
    assert_string_equal(t->r_inner[0]->s, "q");
    set_ok(&t->base, "f_default_string=other", NULL);
    assert_string_equal(t->f_default_string, "other");
    set_ok(&t->base, "child.child.f_double=-inf", NULL);
    assert_true(isinf(t->child->child->f_double));
    set_ok(&t->base, "f_bool=1", NULL);
    assert_true(t->f_bool);
    set_fails(&t->base, "r_inner.a=1",
              "r_inner.a=1: error: \"r_inner\" is a repeated field of peftps.test.TestScalars; a "
              "path cannot go inside it (replace it whole with r_inner=[...])");
    set_fails(&t->base, "f_string=\"\\xff\"",
              "f_string=\"\\xff\": error: string for field \"f_string\" is not valid UTF-8");
    roundtrip(&t->base);
    same_as_unpacked(&t->base);
    protobuf_c_message_free_unpacked(&t->base, NULL);
}

/* PATH= with nothing after '=' clears the field, whatever its kind, and
 * forgets where it was set; defaults apply again. */
static void test_set_clears(void **state) {
    pbtext_locs *locs = pbtext_locs_new();
    const char *text = "optimizer { lr: 0.5 beta1: 0.8 }\n"
                       "data { train: \"a.tokens\" eval: \"b.tokens\" }\n"
                       "cluster { servers: [\"tcp://a:1\", \"tcp://b:2\"] }\n"
                       "method { lora { r: 4 } }\n";
    ProtobufCMessage *m;
    err e;
    assert_int_equal(pbtext_parse(EXP, text, strlen(text), "f.pbtxt", &m, locs, &e), 0);
    Peftps__Experiment *x = (Peftps__Experiment *)m;
    pbtext_pos pos;

    assert_int_equal(pbtext_locate(locs, "data.eval", &pos), 0);
    set_ok(m, "data.eval=", locs);
    assert_null(x->data->eval);
    assert_string_equal(x->data->train, "a.tokens");
    assert_int_equal(pbtext_locate(locs, "data.eval", &pos), -1);
    set_ok(m, "optimizer.lr= ", locs); /* blanks after '=' are nothing too */
    assert_false(x->optimizer->has_lr);
    assert_true(x->optimizer->has_beta1);
    set_ok(m, "cluster.servers=", locs);
    assert_int_equal(x->cluster->n_servers, 0);
    assert_null(x->cluster->servers);
    set_ok(m, "method.lora=", locs);
    assert_int_equal(x->method->kind_case, PEFTPS__METHOD__KIND__NOT_SET);
    set_ok(m, "optimizer=", locs);
    assert_null(x->optimizer);
    assert_int_equal(pbtext_locate(locs, "optimizer.beta1", &pos), -1);
    /* Clearing what is not set changes nothing; the path is still checked. */
    set_ok(m, "schedule.min_lr=", locs);
    set_fails(m, "schedule.no_such=",
              "schedule.no_such=: error: unknown field \"no_such\" in peftps.Schedule; its "
              "fields are: warmup_steps, total_steps, decay, min_lr");
    roundtrip(m);
    same_as_unpacked(m);
    pbtext_locs_free(locs);
    protobuf_c_message_free_unpacked(m, NULL);

    Peftps__Test__TestScalars *t =
        (Peftps__Test__TestScalars *)parse_ok(TS, "o_string: \"s\" f_default_string: \"x\"");
    set_ok(&t->base, "f_default_string=", NULL);
    assert_string_equal(t->f_default_string, "dflt");
    set_ok(&t->base, "o_string=", NULL);
    assert_int_equal(t->choice_case, 0);
    roundtrip(&t->base);
    protobuf_c_message_free_unpacked(&t->base, NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_examples_roundtrip),
        cmocka_unit_test(test_scalar_limits),
        cmocka_unit_test(test_floats),
        cmocka_unit_test(test_bools_strings_bytes_enums),
        cmocka_unit_test(test_repeated_nested_oneof),
        cmocka_unit_test(test_empty_and_required),
        cmocka_unit_test(test_files),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_depth_limit),
        cmocka_unit_test(test_locations),
        cmocka_unit_test(test_set),
        cmocka_unit_test(test_set_clears),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
