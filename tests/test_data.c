/* Tests of common/data/data.c: windows and labels of .tokens files written here,
 * the (step, shard) -> sequences map and its wrap-around, every error, and
 * that the committed fixtures tests/fixtures/tiny*.tokens load. TEXT and
 * JSONL through a small byte-level tokenizer written here: the packed
 * stream and its loss mask (prompt tokens without loss, EOS after each
 * record), the token cache (reuse, rebuild when the data or the tokenizer
 * changes, in-memory fallback), and every error naming FILE:LINE. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/chat.h"
#include "data/data.h"
#include "data/tokenizer.h"

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
    int32_t toks[T], lab[T];
    for (uint64_t w = 0; w < 10; w++) {
        assert_int_equal(data_window(d, w, toks, lab, &e), 0);
        for (int t = 0; t < T; t++) {
            assert_int_equal(toks[t], (int32_t)ids[w * (T + 1) + t]);
            assert_int_equal(lab[t], (int32_t)ids[w * (T + 1) + t + 1]);
        }
    }
    /* The leftover tokens never form a window. */
    assert_int_equal(data_window(d, 10, toks, lab, &e), -1);
    assert_non_null(strstr(e.msg, path));
    assert_non_null(strstr(e.msg, "window 10"));
    data_close(d);

    /* Exactly one window: the smallest file accepted. */
    path = write_ids("one.tokens", ids, T + 1);
    assert_int_equal(data_open(&d, path, &o, &e), 0);
    assert_int_equal(data_num_windows(d), 1);
    data_sequence(d, 12345, toks, lab); /* wraps onto window 0 */
    assert_int_equal(toks[0], (int32_t)ids[0]);
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
    expect_open_error(txt, opts(4, 10), "TEXT data needs a tokenizer");
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
    expect_open_error(unknown, o, "JSONL data needs a tokenizer");
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
        int32_t toks[64], lab[64], seen[256] = {0}, distinct = 0;
        assert_int_equal(data_window(d, 0, toks, lab, &e), 0);
        for (int t = 0; t < 64; t++) distinct += !seen[toks[t]]++;
        assert_true(distinct > 16);
        for (int t = 0; t + 1 < 64; t++) assert_int_equal(lab[t], toks[t + 1]);
        data_close(d);
    }
}

/* ---- TEXT and JSONL ----------------------------------------------------- */

/* Ids of the small tokenizer: printable ASCII bytes are their own ids, the
 * space is 32 ("Ġ") and the newline 10 ("Ċ"), as in GPT-2's alphabet. */
enum { HELLO = 200, GWOR, AA, BOS, EOS, BIG = 1000 };
#define TOK_VOCAB (EOS + 1)

/* Writes dir/tok/tokenizer.json: byte-level BPE with a few merges, <s>
 * before each text by its template, and tokenizer_config.json naming </s>
 * as EOS (eos: NULL leaves the config out). */
static const char *write_tokenizer(const char *eos) {
    static char tdir[256];
    snprintf(tdir, sizeof tdir, "%s/tok", dir);
    mkdir(tdir, 0777);
    json_t *vocab = json_object();
    for (int b = 33; b < 127; b++) {
        char c[2] = {(char)b, 0};
        json_object_set_new(vocab, c, json_integer(b));
    }
    json_object_set_new(vocab, "\u0120", json_integer(32)); /* Ġ: the space */
    json_object_set_new(vocab, "\u010a", json_integer(10)); /* Ċ: the newline */
    static const char *const merged[][3] = {{"h", "e", "he"},
                                            {"l", "l", "ll"},
                                            {"he", "ll", "hell"},
                                            {"hell", "o", "hello"},
                                            {"\u0120", "w", "\u0120w"},
                                            {"o", "r", "or"},
                                            {"\u0120w", "or", "\u0120wor"},
                                            {"a", "a", "aa"}};
    json_t *merges = json_array();
    int next = 300;
    for (size_t i = 0; i < sizeof merged / sizeof merged[0]; i++) {
        char m[32];
        snprintf(m, sizeof m, "%s %s", merged[i][0], merged[i][1]);
        json_array_append_new(merges, json_string(m));
        int id = !strcmp(merged[i][2], "hello")       ? HELLO
                 : !strcmp(merged[i][2], "\u0120wor") ? GWOR
                 : !strcmp(merged[i][2], "aa")        ? AA
                                                      : next++;
        json_object_set_new(vocab, merged[i][2], json_integer(id));
    }
    json_t *root = json_pack(
        "{s[{sisssbsb},{sisssbsb}]sns{sssbsbsb}s{sss[{s{sssi}},{s{sssi}}]}s{ss}s{sssnsoso}}",
        "added_tokens", "id", BOS, "content", "<s>", "special", 1, "normalized", 0, "id", EOS,
        "content", "</s>", "special", 1, "normalized", 0, "normalizer", "pre_tokenizer", "type",
        "ByteLevel", "add_prefix_space", 0, "trim_offsets", 0, "use_regex", 1, "post_processor",
        "type", "TemplateProcessing", "single", "SpecialToken", "id", "<s>", "type_id", 0,
        "Sequence", "id", "A", "type_id", 0, "decoder", "type", "ByteLevel", "model", "type", "BPE",
        "dropout", "vocab", vocab, "merges", merges);
    assert_non_null(root);
    char p[320];
    snprintf(p, sizeof p, "%s/tokenizer.json", tdir);
    assert_int_equal(json_dump_file(root, p, JSON_ENSURE_ASCII), 0);
    json_decref(root);
    snprintf(p, sizeof p, "%s/tokenizer_config.json", tdir);
    if (eos) {
        FILE *f = fopen(p, "w");
        assert_non_null(f);
        fprintf(f, "{\"bos_token\": \"<s>\", \"eos_token\": \"%s\"}", eos);
        fclose(f);
    } else
        unlink(p);
    return tdir;
}

static const char *write_str(const char *name, const char *text) {
    return write_bytes(name, (const unsigned char *)text, strlen(text));
}

static data_opts text_opts(int seq_len, const char *tokenizer) {
    data_opts o = opts(seq_len, TOK_VOCAB);
    o.tokenizer_path = tokenizer;
    return o;
}

/* Reads window w and compares tokens and labels (M = DATA_IGNORE). */
#define M DATA_IGNORE
static void expect_window(const data *d, uint64_t w, const int32_t *tok_want,
                          const int32_t *lab_want) {
    int T = data_seq_len(d);
    int32_t toks[64], lab[64];
    err e = {{0}};
    assert_true(T <= 64);
    assert_int_equal(data_window(d, w, toks, lab, &e), 0);
    for (int t = 0; t < T; t++) {
        if (toks[t] != tok_want[t] || lab[t] != lab_want[t])
            fail_msg("window %llu position %d: token %d label %d, want token %d label %d",
                     (unsigned long long)w, t, toks[t], lab[t], tok_want[t], lab_want[t]);
    }
}

static void test_jsonl_masking(void **state) {
    (void)state;
    const char *tk = write_tokenizer("</s>");
    /* Record 1: prompt "hello", completion " world"; record 2: text "aa";
     * a blank line between them is skipped. */
    const char *path = write_str("pc.jsonl", "{\"prompt\": \"hello\", \"completion\": \" world\"}\n"
                                             "\n"
                                             "{\"text\": \"aa\", \"id\": 7}\n");
    data *d;
    err e = {{0}};
    data_opts o = text_opts(8, tk);
    if (data_open(&d, path, &o, &e) != 0) fail_msg("%s", e.msg);
    /* Stream: <s> hello | Ġwor l d </s> | <s> aa </s>, with loss on the
     * completion, the text and each EOS, never on <s> or the prompt. */
    assert_int_equal(data_num_tokens(d), 9);
    assert_int_equal(data_num_records(d), 2);
    assert_int_equal(data_num_loss_tokens(d), 6);
    assert_int_equal(data_num_windows(d), 1);
    const int32_t toks[] = {BOS, HELLO, GWOR, 'l', 'd', EOS, BOS, AA};
    const int32_t lab[] = {M, GWOR, 'l', 'd', EOS, M, AA, EOS};
    expect_window(d, 0, toks, lab);
    data_close(d);

    /* Windows cut records anywhere; labels keep the mask of the token they
     * predict. T=2: windows of 3 tokens. */
    o = text_opts(2, tk);
    assert_int_equal(data_open(&d, path, &o, &e), 0);
    assert_int_equal(data_num_windows(d), 3);
    const int32_t t0[] = {BOS, HELLO}, l0[] = {M, GWOR};
    expect_window(d, 0, t0, l0);
    const int32_t t1[] = {'l', 'd'}, l1[] = {'d', EOS};
    expect_window(d, 1, t1, l1);
    const int32_t t2[] = {BOS, AA}, l2[] = {AA, EOS};
    expect_window(d, 2, t2, l2);
    data_close(d);
}

static void expect_text_error(const char *path, data_opts o, const char *where, const char *what);

/* Writes the small tokenizer's tokenizer_config.json with a chat template:
 * each message as <s>R:CONTENT</s> (R the role's first letter), and the
 * generation prompt <s>a:. */
static const char *write_chat_tokenizer(void) {
    const char *tk = write_tokenizer("</s>");
    char p[320];
    snprintf(p, sizeof p, "%s/tokenizer_config.json", tk);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs("{\"bos_token\": \"<s>\", \"eos_token\": \"</s>\", \"chat_template\": \"{% for m in "
          "messages %}<s>{{ m.role[0] }}:{{ m.content }}</s>{% endfor %}{% if "
          "add_generation_prompt %}<s>a:{% endif %}\"}",
          f);
    fclose(f);
    return tk;
}

/* Conversations: rendered with the chat template, the loss only on the
 * assistant turns that train (their content and the </s> that ends them). */
static void test_chat_masking(void **state) {
    (void)state;
    const char *tk = write_chat_tokenizer();
    const char *path = write_str(
        "chat.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hello\"}, {\"role\": "
        "\"assistant\", \"content\": \"aa\"}]}\n"
        "{\"messages\": [{\"role\": \"system\", \"content\": \"aa\"}, {\"role\": \"user\", "
        "\"content\": \"aa\"}, {\"role\": \"assistant\", \"content\": \"hello\", \"train\": "
        "false}, {\"role\": \"user\", \"content\": \"hello\"}, {\"role\": \"assistant\", "
        "\"content\": \"hello aa\"}]}\n");
    data *d;
    err e = {{0}};
    data_opts o = text_opts(9, tk);
    if (data_open(&d, path, &o, &e) != 0) fail_msg("%s", e.msg);
    /* Record 1: <s> u : hello </s> <s> a : aa </s> (10), targets aa </s>.
     * Record 2: <s>s:aa</s> <s>u:aa</s> <s>a:hello</s> <s>u:hello</s>
     * <s>a:hello aa</s> (4 x 5 + 7: "hello aa" is hello Ġ aa), targets
     * hello Ġ aa </s> of the last turn only. */
    assert_int_equal(data_num_records(d), 2);
    assert_int_equal(data_num_tokens(d), 37);
    assert_int_equal(data_num_loss_tokens(d), 6);
    const int32_t t0[] = {BOS, 'u', ':', HELLO, EOS, BOS, 'a', ':', AA};
    const int32_t l0[] = {M, M, M, M, M, M, M, AA, EOS};
    expect_window(d, 0, t0, l0);
    data_close(d);

    /* The same through tokenize --chat's function, with the text. */
    tok *t;
    assert_int_equal(tok_open(&t, tk, &e), 0);
    chat *c;
    if (chat_open(&c, tk, &e) != 0) fail_msg("%s", e.msg);
    json_t *msgs = json_loads("[{\"role\": \"user\", \"content\": \"hello\"}, {\"role\": "
                              "\"assistant\", \"content\": \"aa\", \"train\": false}]",
                              0, NULL);
    char *text;
    int32_t *ids;
    unsigned char *mask;
    size_t n;
    assert_int_equal(chat_encode(c, t, msgs, &text, &ids, &mask, &n, &e), 0);
    assert_string_equal(text, "<s>u:hello</s><s>a:aa</s>");
    assert_int_equal(n, 10);
    for (size_t i = 0; i < n; i++) assert_int_equal(mask[i], 0);
    free(text);
    free(ids);
    free(mask);
    json_decref(msgs);
    /* Errors name the message. */
    static const char *const bad[][2] = {
        {"[]", "non-empty list"},
        {"[{\"role\": \"user\"}]", "messages[0] (user) has no string \"content\""},
        {"[{\"content\": \"x\"}]", "messages[0] has no string \"role\""},
        {"[{\"role\": \"assistant\", \"content\": \"x\", \"train\": 1}]", "true or false"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        msgs = json_loads(bad[i][0], 0, NULL);
        assert_int_equal(chat_encode(c, t, msgs, NULL, &ids, &mask, &n, &e), -1);
        if (!strstr(e.msg, bad[i][1])) fail_msg("\"%s\" does not say \"%s\"", e.msg, bad[i][1]);
        json_decref(msgs);
    }
    chat_free(c);
    tok_close(t);

    /* A model without a chat template: the record's error says so. */
    write_tokenizer("</s>");
    const char *p2 = write_str("chat2.jsonl", "{\"messages\": [{\"role\": \"user\", "
                                              "\"content\": \"hello\"}]}\n");
    expect_text_error(p2, o, ":1: ", "has no chat_template");
}

static void test_text_packing(void **state) {
    (void)state;
    const char *tk = write_tokenizer("</s>");
    /* One document: blank lines stay text (Ċ Ċ), BOS first, EOS last. */
    const char *path = write_str("doc.txt", "hello world\n\nhello");
    data *d;
    err e = {{0}};
    data_opts o = text_opts(4, tk);
    if (data_open(&d, path, &o, &e) != 0) fail_msg("%s", e.msg);
    /* <s> hello Ġwor l d Ċ Ċ hello </s>: 9 tokens, loss on all but <s>. */
    assert_int_equal(data_num_tokens(d), 10 - 1);
    assert_int_equal(data_num_records(d), 1);
    assert_int_equal(data_num_loss_tokens(d), 8);
    assert_int_equal(data_num_windows(d), 1);
    const int32_t toks[] = {BOS, HELLO, GWOR, 'l'}, lab[] = {HELLO, GWOR, 'l', 'd'};
    expect_window(d, 0, toks, lab);
    data_close(d);

    /* The same through an open tokenizer, and with the format set
     * explicitly on a name that tells nothing. */
    tok *t;
    if (tok_open(&t, tk, &e) != 0) fail_msg("%s", e.msg);
    o = text_opts(8, NULL);
    o.tokenizer = t;
    o.format = PEFTPS__DATA_FORMAT__TEXT;
    const char *odd = write_str("doc.data", "hello world\n\nhello");
    if (data_open(&d, odd, &o, &e) != 0) fail_msg("%s", e.msg);
    const int32_t tok8[] = {BOS, HELLO, GWOR, 'l', 'd', 10, 10, HELLO},
                  lab8[] = {HELLO, GWOR, 'l', 'd', 10, 10, HELLO, EOS};
    expect_window(d, 0, tok8, lab8);
    data_close(d);
    tok_close(t);
    assert_true(data_needs_tokenizer("x.txt", PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED));
    assert_true(data_needs_tokenizer("x.jsonl", PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED));
    assert_false(data_needs_tokenizer("x.tokens", PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED));
    assert_true(data_needs_tokenizer("x.tokens", PEFTPS__DATA_FORMAT__JSONL));
    assert_false(data_needs_tokenizer("x.bin", PEFTPS__DATA_FORMAT__DATA_FORMAT_UNSPECIFIED));
}

/* Opens path and returns whether the cache was reused; checks the first
 * token after <s> is `first`. */
static int open_cached(const char *path, data_opts *o, int32_t first, char *cache_out) {
    data *d;
    err e = {{0}};
    if (data_open(&d, path, o, &e) != 0) fail_msg("%s", e.msg);
    int32_t toks[4], lab[4];
    assert_int_equal(data_window(d, 0, toks, lab, &e), 0);
    assert_int_equal(toks[0], BOS);
    assert_int_equal(toks[1], first);
    int reused = data_cache_reused(d);
    if (cache_out) snprintf(cache_out, 256, "%s", data_cache_path(d) ? data_cache_path(d) : "");
    data_close(d);
    return reused;
}

static void test_cache(void **state) {
    (void)state;
    const char *tk = write_tokenizer("</s>");
    char path[256], cache[256], want[300];
    snprintf(path, sizeof path, "%s", write_str("c.jsonl", "{\"text\": \"hello aa\"}\n"));
    data_opts o = text_opts(3, tk);
    assert_int_equal(open_cached(path, &o, HELLO, cache), 0); /* built */
    snprintf(want, sizeof want, "%s.peftps-cache", path);
    assert_string_equal(cache, want);
    struct stat st;
    assert_int_equal(stat(cache, &st), 0);
    assert_int_equal(st.st_size, 192 + 5 * 5); /* header, then 5 ids and 5 mask bytes */
    assert_int_equal(open_cached(path, &o, HELLO, NULL), 1); /* reused */

    /* The data changes: rebuilt, with the new tokens. */
    write_str("c.jsonl", "{\"text\": \"aa hello\"}\n");
    assert_int_equal(open_cached(path, &o, AA, NULL), 0);
    assert_int_equal(open_cached(path, &o, AA, NULL), 1);

    /* The tokenizer's EOS changes: rebuilt (the cache would end records
     * with the old one). */
    write_tokenizer("<s>");
    assert_int_equal(open_cached(path, &o, AA, NULL), 0);
    data *d;
    err e = {{0}};
    o.seq_len = 4;
    assert_int_equal(data_open(&d, path, &o, &e), 0);
    int32_t toks[4], lab[4];
    assert_int_equal(data_window(d, 0, toks, lab, &e), 0);
    assert_int_equal(lab[3], BOS); /* the record now ends with <s> */
    data_close(d);
    o.seq_len = 3;
    write_tokenizer("</s>");
    assert_int_equal(open_cached(path, &o, AA, NULL), 0);

    /* A damaged cache (cut short) is rebuilt, not trusted. */
    assert_int_equal(truncate(cache, 150), 0);
    assert_int_equal(open_cached(path, &o, AA, NULL), 0);
    assert_int_equal(open_cached(path, &o, AA, NULL), 1);

    /* Another cache directory; one that cannot be written keeps the
     * tokens in memory (no cache path). */
    char cdir[256];
    snprintf(cdir, sizeof cdir, "%s/cachedir", dir);
    mkdir(cdir, 0777);
    o.cache_dir = cdir;
    assert_int_equal(open_cached(path, &o, AA, cache), 0);
    snprintf(want, sizeof want, "%s/c.jsonl.peftps-cache", cdir);
    assert_string_equal(cache, want);
    assert_int_equal(open_cached(path, &o, AA, NULL), 1);
    snprintf(cdir, sizeof cdir, "%s/no/such/dir", dir);
    assert_int_equal(open_cached(path, &o, AA, cache), 0);
    assert_string_equal(cache, "");
}

/* data_open must fail with `what` in the message, which starts with where. */
static void expect_text_error(const char *path, data_opts o, const char *where, const char *what) {
    data *d = (data *)1;
    err e = {{0}};
    assert_int_equal(data_open(&d, path, &o, &e), -1);
    assert_null(d);
    printf("  %s\n", e.msg);
    char w[300];
    snprintf(w, sizeof w, "%s%s", path, where);
    if (strncmp(e.msg, w, strlen(w)))
        fail_msg("expected the message to start with %s: %s", w, e.msg);
    if (!strstr(e.msg, what)) fail_msg("expected \"%s\" in: %s", what, e.msg);
}

static void test_text_errors(void **state) {
    (void)state;
    const char *tk = write_tokenizer("</s>");
    data_opts o = text_opts(1, tk);
    static const struct {
        const char *text, *where, *what;
    } cases[] = {
        {"{\"text\": \"aa\"}\n{\"text\": \"aa\",}\n", ":2:", "invalid JSON at column"},
        {"{\"text\": \"aa\"}\n\n[1, 2]\n", ":3:", "a JSON object, this line holds a list"},
        {"{\"txt\": \"aa\"}\n",
         ":1:", "needs \"text\", \"prompt\" and \"completion\", or \"messages\""},
        {"{\"text\": 5}\n", ":1:", "\"text\" is a number, not a string"},
        {"{\"prompt\": \"a\", \"completion\": null}\n", ":1:", "\"completion\" is null"},
        {"{\"prompt\": \"a\", \"completion\": \"\"}\n", ":1:", "\"completion\" is empty"},
        {"{\"text\": \"\"}\n", ":1:", "\"text\" is empty"},
        {"{\"prompt\": \"a\"}\n", ":1:", "\"prompt\" without \"completion\""},
        {"{\"completion\": \"a\"}\n", ":1:", "\"completion\" without \"prompt\""},
        {"{\"text\": \"a\", \"prompt\": \"b\", \"completion\": \"c\"}\n", ":1:", "not both"},
        {"{\"text\": \"a\", \"text\": \"b\"}\n", ":1:", "duplicate"},
        {"{\"text\": \"a\\u20acb\"}\n", ":1:", "\"text\": no token for the character"},
        {"\n \n", ": holds no record", "no record"},
        {"{\"text\": \"aa\"}", ": holds 3 tokens", "fewer than one sequence"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "bad%zu.jsonl", i);
        const char *p = write_str(name, cases[i].text);
        data_opts oi = o;
        if (i == sizeof cases / sizeof cases[0] - 1) oi.seq_len = 3;
        expect_text_error(p, oi, cases[i].where, cases[i].what);
    }
    const char *txt = write_str("bad.txt", "ok \xff");
    expect_text_error(txt, o, ": ", "not valid UTF-8 (byte 3 is 0xff)");
    txt = write_str("empty.txt", "");
    expect_text_error(txt, o, ": ", "is empty");
    txt = write_str("fine.txt", "hello");
    data_opts small = o;
    small.vocab_size = EOS; /* <s> hello </s>: the third is past it */
    expect_text_error(txt, small, ": ",
                      "token 2 is 204, not below the model's vocabulary size 204");
    data_opts none = o;
    none.tokenizer_path = NULL;
    expect_text_error(txt, none, ": ", "TEXT data needs a tokenizer");
    data_opts missing = o;
    char nowhere[300];
    snprintf(nowhere, sizeof nowhere, "%s/nowhere", dir);
    missing.tokenizer_path = nowhere;
    expect_text_error(txt, missing, ": tokenizer: ", "nowhere");
    write_tokenizer(NULL); /* no EOS anywhere */
    txt = write_str("fine2.txt", "hello");
    expect_text_error(txt, o, ": ", "has no EOS token");
}

/* ---- sequence classification -------------------------------------------------- */

static char *cls_names[] = {"noun", "verb", "adj"};

static data_opts cls_opts(int seq_len, const char *tokenizer) {
    data_opts o = text_opts(seq_len, tokenizer);
    o.labels = cls_names;
    o.n_labels = 3;
    o.pad_id = EOS;
    return o;
}

/* One record a window: template + text, cut to T, padded with pad_id; the
 * class (by name or index) at the last non-pad position, M elsewhere. */
static void test_classification_records(void **state) {
    (void)state;
    const char *tk = write_tokenizer("</s>");
    const char *path =
        write_str("cls.jsonl", "{\"text\": \"hello\", \"label\": \"verb\"}\n"
                               "\n"
                               "{\"text\": \"aa world\", \"label\": 2}\n"
                               "{\"label\": \"noun\", \"text\": \"hellohellohello\"}\n");
    data *d;
    err e = {{0}};
    data_opts o = cls_opts(5, tk);
    if (data_open(&d, path, &o, &e) != 0) fail_msg("%s", e.msg);
    assert_int_equal(data_num_records(d), 3);
    assert_int_equal(data_num_windows(d), 3);
    assert_int_equal(data_num_loss_tokens(d), 3);
    const int32_t t0[] = {BOS, HELLO, EOS, EOS, EOS}, l0[] = {M, 1, M, M, M};
    expect_window(d, 0, t0, l0);
    const int32_t t1[] = {BOS, AA, GWOR, 'l', 'd'}, l1[] = {M, M, M, M, 2};
    expect_window(d, 1, t1, l1);
    const int32_t t2[] = {BOS, HELLO, HELLO, HELLO, EOS}, l2[] = {M, M, M, 0, M};
    data_close(d);
    /* Cut to T = 3: the last position pools. */
    o = cls_opts(3, tk);
    if (data_open(&d, path, &o, &e) != 0) fail_msg("%s", e.msg);
    const int32_t t2c[] = {BOS, HELLO, HELLO}, l2c[] = {M, M, 0};
    expect_window(d, 2, t2c, l2c);
    assert_false(data_cache_reused(d)); /* T is part of the cache's key */
    data_close(d);
    o = cls_opts(5, tk);
    if (data_open(&d, path, &o, &e) != 0) fail_msg("%s", e.msg);
    expect_window(d, 2, t2, l2);
    data_close(d);
    /* The same file as language-model text is another cache. */
    data_opts lm = text_opts(5, tk);
    if (data_open(&d, path, &lm, &e) != 0) fail_msg("%s", e.msg);
    assert_false(data_cache_reused(d));
    assert_int_equal(data_num_loss_tokens(d), 2 + 5 + 4); /* text and EOS of each record */
    data_close(d);
}

static void test_classification_errors(void **state) {
    (void)state;
    const char *tk = write_tokenizer("</s>");
    data_opts o = cls_opts(4, tk);
    static const struct {
        const char *text, *where, *what;
    } cases[] = {
        {"{\"text\": \"aa\", \"label\": \"verb\"}\n{\"text\": \"aa\", \"label\": \"Verb\"}\n",
         ":2:", "\"label\" \"Verb\" is not one of the task's labels (noun, verb, adj)"},
        {"{\"text\": \"aa\", \"label\": 3}\n", ":1:", "\"label\" 3 is not a class index (0 to 2)"},
        {"{\"text\": \"aa\", \"label\": -1}\n", ":1:", "is not a class index"},
        {"{\"text\": \"aa\", \"label\": true}\n", ":1:", "\"label\" is a boolean, not a class"},
        {"{\"text\": \"aa\"}\n", ":1:", "needs \"label\""},
        {"{\"prompt\": \"aa\", \"label\": 0}\n", ":1:", "needs \"text\" and \"label\""},
        {"{\"text\": \"\", \"label\": 0}\n", ":1:", "\"text\" is empty"},
        {"[1]\n", ":1:", "a JSON object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "cbad%zu.jsonl", i);
        expect_text_error(write_str(name, cases[i].text), o, cases[i].where, cases[i].what);
    }
    expect_text_error(write_str("cls.txt", "aa"), o, ": ", "reads JSONL records");
    data_opts nopad = o;
    nopad.pad_id = -1;
    expect_text_error(write_str("cls2.jsonl", "{\"text\": \"aa\", \"label\": 0}\n"), nopad, ": ",
                      "pad id -1");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_windows_and_labels),
        cmocka_unit_test(test_shard_map),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_fixtures_load),
        cmocka_unit_test(test_jsonl_masking),
        cmocka_unit_test(test_chat_masking),
        cmocka_unit_test(test_text_packing),
        cmocka_unit_test(test_cache),
        cmocka_unit_test(test_text_errors),
        cmocka_unit_test(test_classification_records),
        cmocka_unit_test(test_classification_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
