/* Tests of what the floors above ask of a method through the registry
 * (common/methods/registry.c) without naming it: the lists that messages
 * quote, the method of a PEFT peft_type, calibration needs, the defaults
 * hook agreeing with what the method assumes of an unfilled block, and the
 * checks failing through the located checker. The base is gradcheck.h's
 * tiny random model. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "gradcheck.h"
#include "methods/registry.h"

static void test_lists(void **state) {
    char buf[256];
    methods_list(METHODS_NAMES, ", ", ", ", buf, sizeof buf);
    assert_string_equal(buf, "lora, prefix, layer_wise, attention_heads, subnetwork, full");
    methods_list(METHODS_NAMES, ", ", " or ", buf, sizeof buf);
    assert_string_equal(buf, "lora, prefix, layer_wise, attention_heads, subnetwork or full");
    methods_list(METHODS_ADAPTER_NAMES, ", ", " and ", buf, sizeof buf);
    assert_string_equal(buf, "lora and prefix");
    methods_list(METHODS_PEFT_TYPES, ", ", " and ", buf, sizeof buf);
    assert_string_equal(buf, "LORA and PREFIX_TUNING");
    /* Cut short, never past the buffer. */
    char small[8];
    methods_list(METHODS_NAMES, ", ", ", ", small, sizeof small);
    assert_string_equal(small, "lora, p");
    methods_block_hint(buf, sizeof buf);
    assert_string_equal(buf, "e.g. method { lora { r: 8 } } (one of lora, prefix, layer_wise, "
                             "attention_heads, subnetwork, full)");
}

static void test_peft_types(void **state) {
    assert_ptr_equal(methods_find_peft_type("LORA"), &lora_method);
    assert_ptr_equal(methods_find_peft_type("PREFIX_TUNING"), &prefix_method);
    assert_null(methods_find_peft_type("IA3"));
    assert_null(methods_find_peft_type("lora"));
    assert_null(methods_find_peft_type(NULL));
}

static void test_calibration(void **state) {
    static const struct {
        const char *block;
        int want;
    } cases[] = {
        {"lora { r: 4 }", 0},
        {"attention_heads { heads: [0] calibration_batches: 5 }", 0},
        {"attention_heads { top_k: 2 calibration_batches: 5 }", 5},
        {"subnetwork { selection: GRADIENT calibration_batches: 3 }", 3},
        {"subnetwork { selection: RANDOM calibration_batches: 3 }", 0},
        {"full {}", 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Peftps__Method *m = gc_method("%s", cases[i].block);
        assert_int_equal(methods_calibration_batches(m), cases[i].want);
        gc_method_free(m);
    }
    Peftps__Method none = PEFTPS__METHOD__INIT;
    assert_int_equal(methods_calibration_batches(&none), 0);
    assert_int_equal(methods_calibration_batches(NULL), 0);
}

/* adapter_config.json's lora_alpha and r for a block, over the tiny base. */
static void lora_written(const gc_base *b, Peftps__Method *m, double *alpha, long *r) {
    peft *p;
    err e;
    if (methods_create(&p, m, &b->cfg, &b->w, &e) < 0) fail_msg("%s", e.msg);
    json_t *o = json_object();
    assert_int_equal(p->method->adapter_config_write(p, o, &e), 0);
    *alpha = json_number_value(json_object_get(o, "lora_alpha"));
    *r = (long)json_integer_value(json_object_get(o, "r"));
    json_decref(o);
    peft_free(p);
}

/* One default per field: what the defaults hook writes is what the method
 * assumes of a block that comes without it (here, through the adapter it
 * writes). */
static void test_defaults_agree(void **state) {
    gc_base b;
    assert_int_equal(gc_base_create(&b, 0, 1), 0);
    Peftps__Method *bare = gc_method("lora {}"), *filled = gc_method("lora {}");
    assert_int_equal(methods_fill_defaults(filled), 0);
    assert_true(filled->lora->has_alpha && filled->lora->alpha == 16.0f);
    assert_true(filled->lora->has_r && filled->lora->r == 8);
    double a1, a2;
    long r1, r2;
    lora_written(&b, bare, &a1, &r1);
    lora_written(&b, filled, &a2, &r2);
    assert_true(a1 == 16.0 && a2 == 16.0);
    assert_true(r1 == 8 && r2 == 8);
    gc_method_free(bare);
    gc_method_free(filled);

    /* A block naming no method: nothing to fill; checks and create name the
     * methods. */
    Peftps__Method none = PEFTPS__METHOD__INIT;
    assert_int_equal(methods_fill_defaults(&none), 0);
    err e = {{0}};
    config_checker c = {"x.pbtxt", NULL, &e};
    assert_int_equal(methods_check(&c, &none), -1);
    assert_string_equal(e.msg, "x.pbtxt: error: the method block must choose one of lora, "
                               "prefix, layer_wise, attention_heads, subnetwork, full");
    peft *p = (peft *)&b;
    assert_int_equal(methods_create(&p, &none, &b.cfg, &b.w, &e), -1);
    assert_null(p);
    assert_string_equal(e.msg, "the experiment has no method block: set one of lora, prefix, "
                               "layer_wise, attention_heads, subnetwork or full");
    gc_base_free(&b);
}

/* The check hooks on their own, through a checker without locations (the
 * located form is test_config's): each method's message for a bad value,
 * and check_model against the tiny model's layers and heads. */
static void test_checks(void **state) {
    gc_base b;
    assert_int_equal(gc_base_create(&b, 0, 1), 0);
    static const struct {
        const char *block, *want;
        int model; /* the failure comes from check_model */
    } cases[] = {
        {"lora { r: 0 }", "method.lora.r must be > 0", 0},
        {"prefix { num_virtual_tokens: 0 }", "method.prefix.num_virtual_tokens must be > 0", 0},
        {"layer_wise { first_layer: 1 last_layer: 0 }",
         "method.layer_wise.first_layer (1) must not be above last_layer (0)", 0},
        {"subnetwork { sparsity: 1 }", "method.subnetwork.sparsity must be in (0, 1), got 1", 0},
        {"attention_heads { }", "method.attention_heads: set heads (query-head indices) or top_k",
         0},
        {"lora { layers: [9] }", "method.lora.layers: layer 9 does not exist", 1},
        {"layer_wise { last_layer: 9 }", "method.layer_wise.last_layer 9 does not exist", 1},
        {"attention_heads { heads: [99] }", "method.attention_heads.heads: head 99 does not exist",
         1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Peftps__Method *m = gc_method("%s", cases[i].block);
        assert_int_equal(methods_fill_defaults(m), 0);
        err e = {{0}};
        config_checker c = {"x.pbtxt", NULL, &e};
        int rc = methods_check(&c, m);
        if (cases[i].model) {
            assert_int_equal(rc, 0);
            rc = methods_check_model(&c, m, &b.cfg);
        }
        assert_int_equal(rc, -1);
        if (!strstr(e.msg, cases[i].want)) fail_msg("%s: got \"%s\"", cases[i].block, e.msg);
        assert_memory_equal(e.msg, "x.pbtxt: error: ", strlen("x.pbtxt: error: "));
        gc_method_free(m);
    }
    /* Every method's defaults pass its own checks (attention_heads needs
     * its heads). */
    static const char *const good[] = {"lora {}",       "prefix {}",
                                       "layer_wise {}", "attention_heads { heads: [0] }",
                                       "subnetwork {}", "full {}"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        Peftps__Method *m = gc_method("%s", good[i]);
        assert_int_equal(methods_fill_defaults(m), 0);
        err e = {{0}};
        config_checker c = {"x.pbtxt", NULL, &e};
        if (methods_check(&c, m) || methods_check_model(&c, m, &b.cfg))
            fail_msg("%s: %s", good[i], e.msg);
        gc_method_free(m);
    }
    gc_base_free(&b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lists),       cmocka_unit_test(test_peft_types),
        cmocka_unit_test(test_calibration), cmocka_unit_test(test_defaults_agree),
        cmocka_unit_test(test_checks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
