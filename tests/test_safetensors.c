/* Tests of common/model/safetensors.c (reader, writer, half-precision conversions)
 * and of the hashes it sits beside, common/base/hash.c (libsodium's SHA-256) and
 * common/base/crc32c.c. Conversion references are digests of numpy/PyTorch results (see the
 * comments at each constant). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <float.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/crc32c.h"
#include "model/safetensors.h"
#include "base/hash.h"

/* ---- helpers -------------------------------------------------------------- */
/* Run from the repository root (the fuzz corpus is read from tests/fuzz). */

static char tmpdir[64];

static int setup_dir(void **state) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/peftps-st-XXXXXX");
    if (!mkdtemp(tmpdir)) return -1;
    return 0;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    return remove(p);
}

static int teardown_dir(void **state) {
    return nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static char *tpath(const char *name) {
    static char buf[4][256];
    static int k;
    char *p = buf[k++ % 4];
    snprintf(p, 256, "%s/%s", tmpdir, name);
    return p;
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(p, 1, n, fp), n);
    assert_int_equal(fclose(fp), 0);
}

static uint8_t *read_bytes(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    *n = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *p = malloc(*n + 1);
    assert_int_equal(fread(p, 1, *n, fp), *n);
    fclose(fp);
    return p;
}

/* A file image: 8-byte length, header text, then data_len bytes 0..255. */
static uint8_t *image(const char *header, size_t data_len, size_t *n) {
    size_t h = strlen(header);
    *n = 8 + h + data_len;
    uint8_t *p = malloc(*n);
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)((uint64_t)h >> (8 * i));
    memcpy(p + 8, header, h);
    for (size_t i = 0; i < data_len; i++) p[8 + h + i] = (uint8_t)i;
    return p;
}

/* Opens an image in memory named "model.safetensors" and asserts that it
 * fails with a message naming the file and containing `want`. */
static void expect_bad(const uint8_t *p, size_t n, const char *want) {
    st_file *f = (st_file *)1;
    err e = {{0}};
    int rc = st_open_memory(&f, p, n, "model.safetensors", &e);
    if (rc == 0 || !strstr(e.msg, want) || strncmp(e.msg, "model.safetensors: ", 19) != 0)
        fail_msg("expected failure containing \"%s\", got rc=%d \"%s\"", want, rc, e.msg);
    assert_null(f);
}

static void expect_bad_header(const char *header, size_t data_len, const char *want) {
    size_t n;
    uint8_t *p = image(header, data_len, &n);
    expect_bad(p, n, want);
    free(p);
}

/* ---- hashes --------------------------------------------------------------- */

static void sha_hex_str(const char *s, char hex[65]) {
    hash_sha256_hex_of(s, strlen(s), hex);
}

static void test_sha256_vectors(void **state) {
    char hex[65];
    sha_hex_str("abc", hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    sha_hex_str("", hex);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    sha_hex_str("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", hex);
    assert_string_equal(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    /* One million 'a', fed in uneven pieces to exercise the block buffer. */
    char *a = malloc(1000000);
    memset(a, 'a', 1000000);
    hash_sha256 c;
    uint8_t d[32];
    hash_sha256_init(&c);
    for (size_t i = 0, step = 1; i < 1000000; i += step, step = step % 131 + 1)
        hash_sha256_update(&c, a + i, i + step > 1000000 ? 1000000 - i : step);
    hash_sha256_final(&c, d);
    hash_hex(d, hex);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    hash_sha256_hex_of(a, 1000000, hex);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    /* Lengths around the padding boundary (55, 56, 64 bytes) against
     * Python's hashlib. */
    static const char *pad_ref[3] = {
        "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318",
        "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a",
        "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"};
    static const size_t pad_len[3] = {55, 56, 64};
    for (int i = 0; i < 3; i++) {
        hash_sha256_hex_of("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                           pad_len[i], hex);
        assert_string_equal(hex, pad_ref[i]);
    }
    free(a);
}

static void test_crc32c_vectors(void **state) {
    assert_int_equal(crc32c(0, "123456789", 9), 0xE3069283u);
    assert_int_equal(crc32c(0, "", 0), 0);
    /* RFC 3720 (iSCSI) B.4 vectors. */
    uint8_t buf[32];
    memset(buf, 0, 32);
    assert_int_equal(crc32c(0, buf, 32), 0x8A9136AAu);
    memset(buf, 0xff, 32);
    assert_int_equal(crc32c(0, buf, 32), 0x62A8AB43u);
    for (int i = 0; i < 32; i++) buf[i] = (uint8_t)i;
    assert_int_equal(crc32c(0, buf, 32), 0x46DD794Eu);
    for (int i = 0; i < 32; i++) buf[i] = (uint8_t)(31 - i);
    assert_int_equal(crc32c(0, buf, 32), 0x113FDB5Cu);
    /* Any split and any alignment gives the one-shot result. */
    uint8_t big[1000];
    for (int i = 0; i < 1000; i++) big[i] = (uint8_t)(i * 7 + 3);
    uint32_t whole = crc32c(0, big + 1, 999);
    for (size_t cut = 0; cut <= 999; cut += 37)
        assert_int_equal(crc32c(crc32c(0, big + 1, cut), big + 1 + cut, 999 - cut), whole);
}

/* ---- conversions ---------------------------------------------------------- */

static uint32_t f32_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    return x;
}

static void test_half_chosen_values(void **state) {
    assert_true(st_f16_to_f32(0x0000) == 0.0f && !signbit(st_f16_to_f32(0x0000)));
    assert_true(st_f16_to_f32(0x8000) == 0.0f && signbit(st_f16_to_f32(0x8000)));
    assert_true(st_f16_to_f32(0x0001) == 0x1p-24f);        /* smallest subnormal */
    assert_true(st_f16_to_f32(0x03ff) == 1023 * 0x1p-24f); /* largest subnormal */
    assert_true(st_f16_to_f32(0x8200) == -512 * 0x1p-24f); /* negative subnormal */
    assert_true(st_f16_to_f32(0x0400) == 0x1p-14f);        /* smallest normal */
    assert_true(st_f16_to_f32(0x3c00) == 1.0f);
    assert_true(st_f16_to_f32(0xc000) == -2.0f);
    assert_true(st_f16_to_f32(0x3555) == 0.333251953125f);
    assert_true(st_f16_to_f32(0x7bff) == 65504.0f);
    assert_true(isinf(st_f16_to_f32(0x7c00)) && st_f16_to_f32(0x7c00) > 0);
    assert_true(isinf(st_f16_to_f32(0xfc00)) && st_f16_to_f32(0xfc00) < 0);
    assert_true(isnan(st_f16_to_f32(0x7e00)));
    assert_int_equal(f32_bits(st_f16_to_f32(0x7c01)), 0x7f802000u); /* payload kept */

    assert_true(st_bf16_to_f32(0x3f80) == 1.0f);
    assert_true(st_bf16_to_f32(0xc049) == -3.140625f);
    assert_int_equal(f32_bits(st_bf16_to_f32(0x0001)), 0x00010000u); /* subnormal */
    assert_true(st_bf16_to_f32(0x7f7f) == 0x1.fep127f);
    assert_true(isinf(st_bf16_to_f32(0xff80)) && st_bf16_to_f32(0xff80) < 0);
    assert_true(isnan(st_bf16_to_f32(0x7fc0)));

    /* Rounding to nearest, ties to even. */
    assert_int_equal(st_f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie, down to even */
    assert_int_equal(st_f32_to_f16(1.0f + 0x3p-11f), 0x3c02); /* tie, up to even */
    assert_int_equal(st_f32_to_f16(65519.0f), 0x7bff);
    assert_int_equal(st_f32_to_f16(65520.0f), 0x7c00); /* overflows */
    assert_int_equal(st_f32_to_f16(0x1p-25f), 0x0000); /* tie to zero */
    assert_int_equal(st_f32_to_f16(0x1.8p-25f), 0x0001);
    assert_int_equal(st_f32_to_f16(-0x3p-25f), 0x8002);    /* subnormal tie up */
    assert_int_equal(st_f32_to_f16(0x1.ffcp-15f), 0x0400); /* rounds into normal */
    assert_true((st_f32_to_f16(NAN) & 0x7c00) == 0x7c00 && (st_f32_to_f16(NAN) & 0x3ff));
    assert_int_equal(st_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
    assert_int_equal(st_f32_to_bf16(1.0f + 0x3p-8f), 0x3f82);
    assert_int_equal(st_f32_to_bf16(FLT_MAX), 0x7f80);
    assert_true((st_f32_to_bf16(NAN) & 0x7f80) == 0x7f80 && (st_f32_to_bf16(NAN) & 0x7f));
}

/* The generator of ref.py used for the digests below: xorshift32 patterns,
 * a quarter each uniform, exponent near the F16 range, exact F16 ties, and
 * exact BF16 ties; NaN patterns get one exponent bit cleared. */
static uint32_t *patterns(int n) {
    uint32_t *p = malloc((size_t)n * 4), x = 2463534242u;
    for (int i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        uint32_t b = x;
        switch (i % 4) {
        case 1:
            b = (b & 0x807fffffu) | (100 + (b >> 23) % 44) << 23;
            break;
        case 2:
            b = (b & 0x807fe000u) | 0x1000u | (100 + (b >> 23) % 44) << 23;
            break;
        case 3:
            b = (b & 0xffff0000u) | 0x8000u;
            break;
        }
        if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x7fffffu)) b &= 0xff7fffffu;
        p[i] = b;
    }
    return p;
}

static void test_half_against_numpy_torch(void **state) {
    char hex[65];
    /* Every F16 value to F32: numpy float16.astype(float32), bitwise. */
    uint32_t *all = malloc(65536 * 4);
    for (int i = 0; i < 65536; i++) all[i] = f32_bits(st_f16_to_f32((uint16_t)i));
    hash_sha256_hex_of(all, 65536 * 4, hex);
    assert_string_equal(hex, "f4fdd084f85448d28c84f20fabf4022ba938e40b7f382d2727dec6f41ac6267a");
    /* Every finite F16 survives F32 and back. */
    for (int i = 0; i < 65536; i++)
        if ((i & 0x7c00) != 0x7c00) assert_int_equal(st_f32_to_f16(st_f16_to_f32((uint16_t)i)), i);
    free(all);

    int n = 1 << 16;
    uint32_t *p = patterns(n);
    assert_int_equal(p[0], 0x2b1f4d63u); /* the generator matches ref.py */
    assert_int_equal(p[3], 0x77b08000u);
    uint16_t *h = malloc((size_t)n * 2);
    float f;
    for (int i = 0; i < n; i++) memcpy(&f, &p[i], 4), h[i] = st_f32_to_f16(f);
    hash_sha256_hex_of(h, (size_t)n * 2, hex); /* numpy astype(float16) */
    assert_string_equal(hex, "3fc38468f000c8e017abaab268c354f41da0315fd39c1441455995a0e1fdcc16");
    for (int i = 0; i < n; i++) memcpy(&f, &p[i], 4), h[i] = st_f32_to_bf16(f);
    hash_sha256_hex_of(h, (size_t)n * 2, hex); /* torch .to(torch.bfloat16) */
    assert_string_equal(hex, "f3881a2fba384413708632f4d65688013a7857974f2dc260cbdffca2c4c67755");
    free(h);
    free(p);
}

/* ---- write and read back --------------------------------------------------- */

static void test_roundtrip_all_dtypes(void **state) {
    enum { N = ST_DTYPE_COUNT };
    st_entry en[N + 2];
    uint8_t data[N][64];
    for (int d = 0; d < N; d++) {
        size_t sz = st_dtype_size((st_dtype)d);
        assert_true(sz >= 1 && sz <= 8);
        for (size_t i = 0; i < sizeof data[d]; i++) data[d][i] = (uint8_t)(d * 31 + i);
        char *name = malloc(32);
        snprintf(name, 32, "t.%s", st_dtype_name((st_dtype)d));
        en[d] = (st_entry){name, (st_dtype)d, 2, {2, 3}, data[d]};
    }
    float scalar = 2.5f;
    en[N] = (st_entry){"scalar", ST_F32, 0, {0}, &scalar};
    en[N + 1] = (st_entry){"empty", ST_F32, 3, {4, 0, 2}, NULL};
    err e = {{0}};
    const char *path = tpath("all.safetensors");
    assert_int_equal(st_write(path, en, N + 2, "{\"format\": \"pt\", \"note\": \"héllo\"}", &e), 0);

    /* Data starts 8-aligned (header padded with spaces). */
    size_t flen;
    uint8_t *raw = read_bytes(path, &flen);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | raw[i];
    assert_int_equal(hl % 8, 0);
    assert_int_equal(raw[8], '{');
    free(raw);

    st_file *f;
    if (st_open(&f, path, &e)) fail_msg("%s", e.msg);
    assert_int_equal(st_count(f), N + 2);
    assert_string_equal(st_path(f), path);
    for (int d = 0; d < N; d++) {
        const st_tensor *t = st_find(f, en[d].name);
        assert_non_null(t);
        assert_int_equal(t->dtype, d);
        assert_int_equal(t->ndim, 2);
        assert_int_equal(t->shape[0], en[d].shape[0]);
        assert_int_equal(t->shape[1], en[d].shape[1]);
        assert_int_equal(t->nbytes, en[d].shape[0] * en[d].shape[1] * st_dtype_size(d));
        assert_memory_equal(t->data, data[d], t->nbytes);
    }
    const st_tensor *s = st_find(f, "scalar");
    assert_int_equal(s->ndim, 0);
    assert_int_equal(s->numel, 1);
    assert_true(*(const float *)s->data == 2.5f);
    const st_tensor *z = st_find(f, "empty");
    assert_int_equal(z->numel, 0);
    assert_int_equal(z->nbytes, 0);
    assert_int_equal(z->shape[2], 2);
    assert_null(st_find(f, "absent"));
    /* Iteration visits each tensor once, in file order. */
    size_t off = 0;
    for (int i = 0; i < st_count(f); i++) {
        const st_tensor *t = st_tensor_at(f, i);
        assert_int_equal(t->offset, off);
        off += t->nbytes;
    }
    assert_null(st_tensor_at(f, st_count(f)));
    /* Metadata, sorted by key. */
    assert_int_equal(st_metadata_count(f), 2);
    assert_string_equal(st_metadata_get(f, "format"), "pt");
    assert_string_equal(st_metadata_get(f, "note"), "héllo");
    assert_null(st_metadata_get(f, "nope"));
    const char *k, *v;
    st_metadata_at(f, 1, &k, &v);
    assert_string_equal(k, "note");
    size_t hlen;
    const char *hdr = st_header(f, &hlen);
    assert_int_equal(hlen, hl);
    assert_int_equal(hdr[0], '{');
    st_close(f);
    for (int d = 0; d < N; d++) free((char *)en[d].name);

    /* Overwriting replaces the file and leaves no temporary behind. */
    assert_int_equal(st_write(path, en + N, 1, NULL, &e), 0);
    assert_int_equal(st_open(&f, path, &e), 0);
    assert_int_equal(st_count(f), 1);
    assert_int_equal(st_metadata_count(f), 0);
    st_close(f);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "ls %s | grep -c tmp", tmpdir);
    FILE *pp = popen(cmd, "r");
    int count = -1;
    assert_int_equal(fscanf(pp, "%d", &count), 1);
    pclose(pp);
    assert_int_equal(count, 0);
}

static void test_get_f32(void **state) {
    float f32[6] = {1.5f, -2.0f, 0.25f, 3.0f, -0.0f, 1e30f};
    uint16_t bf[3] = {0x3f80, 0xc049, 0x7f80};
    uint16_t hf[4] = {0x0001, 0x3c00, 0xfc00, 0x7e00};
    int32_t ints[2] = {1, 2};
    st_entry en[4] = {{"f32", ST_F32, 2, {2, 3}, f32},
                      {"bf16", ST_BF16, 1, {3}, bf},
                      {"f16", ST_F16, 1, {4}, hf},
                      {"i32", ST_I32, 1, {2}, ints}};
    err e = {{0}};
    const char *path = tpath("f.safetensors");
    assert_int_equal(st_write(path, en, 4, NULL, &e), 0);
    st_file *f;
    assert_int_equal(st_open(&f, path, &e), 0);
    const float *d;
    float *owned;
    const st_tensor *t;
    assert_int_equal(st_get_f32(f, "f32", &d, &owned, &t, &e), 0);
    assert_null(owned);
    assert_ptr_equal(d, t->data); /* in place, in the mapping */
    assert_memory_equal(d, f32, sizeof f32);
    assert_int_equal(st_get_f32(f, "bf16", &d, &owned, &t, &e), 0);
    assert_ptr_equal(d, owned);
    assert_true(d[0] == 1.0f && d[1] == -3.140625f && isinf(d[2]));
    free(owned);
    assert_int_equal(st_get_f32(f, "f16", &d, &owned, NULL, &e), 0);
    assert_true(d[0] == 0x1p-24f && d[1] == 1.0f && isinf(d[2]) && d[2] < 0 && isnan(d[3]));
    free(owned);
    assert_int_equal(st_get_f32(f, "i32", &d, &owned, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "f.safetensors: tensor 'i32' has dtype I32"));
    assert_null(owned);
    assert_int_equal(st_get_f32(f, "nothere", &d, &owned, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "no tensor 'nothere'"));
    st_close(f);
}

/* A hand-made file whose header length is not a multiple of 4: the F32
 * tensor is unaligned and must be copied rather than used in place. */
static void test_get_f32_unaligned(void **state) {
    float v[2] = {3.5f, -1.25f};
    const char *h =
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}} "; /* 57 bytes */
    size_t n;
    uint8_t *p = image(h, 8, &n);
    memcpy(p + 8 + strlen(h), v, 8);
    st_file *f;
    err e;
    assert_int_equal(st_open_memory(&f, p, n, "u.safetensors", &e), 0);
    const float *d;
    float *owned;
    assert_int_equal(st_get_f32(f, "a", &d, &owned, NULL, &e), 0);
    if ((uintptr_t)st_find(f, "a")->data % 4) assert_non_null(owned);
    assert_true(d[0] == 3.5f && d[1] == -1.25f);
    free(owned);
    st_close(f);
    free(p);
}

static void test_write_errors(void **state) {
    float x = 1;
    err e;
    st_entry dup[2] = {{"a", ST_F32, 0, {0}, &x}, {"a", ST_F32, 0, {0}, &x}};
    assert_int_equal(st_write(tpath("w.safetensors"), dup, 2, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "w.safetensors: tensor 'a' appears twice"));
    st_entry meta = {"__metadata__", ST_F32, 0, {0}, &x};
    assert_int_equal(st_write(tpath("w.safetensors"), &meta, 1, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "invalid tensor name"));
    st_entry neg = {"n", ST_F32, 1, {-1}, &x};
    assert_int_equal(st_write(tpath("w.safetensors"), &neg, 1, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "tensor 'n': invalid shape"));
    st_entry ok = {"a", ST_F32, 0, {0}, &x};
    assert_int_equal(st_write(tpath("w.safetensors"), &ok, 1, "{\"k\": 3}", &e), -1);
    assert_non_null(strstr(e.msg, "metadata value of \"k\" is not a string"));
    assert_int_equal(st_write(tpath("w.safetensors"), &ok, 1, "[1", &e), -1);
    assert_non_null(strstr(e.msg, "metadata is not valid JSON"));
    assert_int_equal(st_write("/nonexistent-dir/x.safetensors", &ok, 1, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "/nonexistent-dir/x.safetensors"));
    assert_int_equal(access(tpath("w.safetensors"), F_OK), -1); /* nothing left behind */
}

/* ---- corruption ------------------------------------------------------------ */

static void test_corrupt_headers(void **state) {
    expect_bad_header("{", 0, "header is not valid JSON");
    expect_bad_header("[1, 2]", 0, "header is not a JSON object");
    expect_bad_header("{\"a\": 1}", 0, "tensor 'a': entry is not a JSON object");
    expect_bad_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                      "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                      8, "not valid JSON");
    expect_bad_header("{\"x\":{\"dtype\":\"F31\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                      "tensor 'x': unknown dtype \"F31\"");
    expect_bad_header("{\"x\":{\"dtype\":\"F4\",\"shape\":[2],\"data_offsets\":[0,1]}}", 1,
                      "tensor 'x': dtype F4 packs elements below one byte");
    expect_bad_header("{\"x\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                      "\"dtype\" is not a string");
    expect_bad_header("{\"x\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "missing \"dtype\"");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, "missing \"shape\"");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "missing \"data_offsets\"");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
                      "tensor 'x': shape[0] is negative");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4,
                      "tensor 'x': shape[0] is not an integer");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[\"1\"],\"data_offsets\":[0,4]}}", 4,
                      "shape[0] is not an integer");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":1,\"data_offsets\":[0,4]}}", 4,
                      "\"shape\" is not an array");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],"
                      "\"data_offsets\":[0,4]}}",
                      4, "9 dimensions");
    expect_bad_header("{\"x\":{\"dtype\":\"F64\",\"shape\":[4294967296,4294967296],"
                      "\"data_offsets\":[0,4]}}",
                      4, "overflows");
    expect_bad_header("{\"x\":{\"dtype\":\"F64\",\"shape\":[2305843009213693952],"
                      "\"data_offsets\":[0,4]}}",
                      4, "shape overflows the byte count");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[2,4],\"data_offsets\":[0,12]}}", 12,
                      "tensor 'x': data_offsets [0, 12] do not match shape [2, 4] of F32 (32 "
                      "bytes)");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,8]}}", 4,
                      "tensor 'x': data_offsets [0, 8] reach beyond the data section (4 bytes");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 8,
                      "not an ascending pair");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8,
                      "not an ascending pair");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4,
                      "not an array of two integers");
    expect_bad_header("{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4.0]}}", 4,
                      "not an array of two integers");
    /* Layout of the data section: overlap, gap, trailing bytes, not from 0. */
    expect_bad_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                      12, "tensor 'b' at data_offsets [4, 12] overlaps tensor 'a'");
    expect_bad_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
                      12, "gap of 4 bytes in the data section before tensor 'b'");
    expect_bad_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8,
                      "gap of 4 bytes");
    expect_bad_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 6,
                      "tensors cover 4 bytes but the data section holds 6");
    expect_bad_header("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
                      4, "overlaps");
    /* Metadata must be an object of strings. */
    expect_bad_header("{\"__metadata__\": [1]}", 0, "\"__metadata__\" is not a JSON object");
    expect_bad_header("{\"__metadata__\": {\"a\": 1}}", 0, "value of \"a\" is not a string");
    expect_bad_header("{\"__metadata__\": {\"a\": \"x\\u0000y\"}}", 0, "not valid JSON");
    /* Header length itself. */
    uint8_t small[8] = {0};
    expect_bad(small, 8, "header length is 0");
    expect_bad(small, 5, "file is 5 bytes, shorter than the 8-byte header length");
    expect_bad(small, 0, "file is 0 bytes");
    size_t n;
    uint8_t *p = image("{}", 0, &n);
    p[0] = 200;
    expect_bad(p, n, "header length 200 exceeds the 2 bytes that follow it");
    memset(p, 0xff, 8);
    expect_bad(p, n, "header length 18446744073709551615 exceeds");
    free(p);

    /* The valid neighbours of these cases do open. */
    const char *good[] = {
        "{}",
        "{\"__metadata__\": {}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},"
        "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
        "\"c\":{\"dtype\":\"F32\",\"shape\":[0,5],\"data_offsets\":[4,4]}}   ",
    };
    size_t data[] = {0, 0, 4};
    for (int i = 0; i < 3; i++) {
        p = image(good[i], data[i], &n);
        st_file *f;
        err e;
        if (st_open_memory(&f, p, n, "g", &e)) fail_msg("good[%d]: %s", i, e.msg);
        st_close(f);
        free(p);
    }
}

/* Truncating a valid file anywhere gives a clean error naming the file. */
static void test_truncation(void **state) {
    float w[10];
    for (int i = 0; i < 10; i++) w[i] = (float)i;
    uint16_t b[6] = {1, 2, 3, 4, 5, 6};
    st_entry en[3] = {
        {"w", ST_F32, 2, {2, 5}, w}, {"b", ST_BF16, 1, {6}, b}, {"e", ST_I8, 1, {0}, NULL}};
    err e;
    char path[256];
    snprintf(path, sizeof path, "%s", tpath("t.safetensors"));
    assert_int_equal(st_write(path, en, 3, "{\"k\":\"v\"}", &e), 0);
    size_t n;
    uint8_t *full = read_bytes(path, &n);
    for (size_t len = 0; len < n; len++) {
        st_file *f = (st_file *)1;
        /* A private exact-size copy, so that any read past the end trips
         * AddressSanitizer. */
        uint8_t *cut = malloc(len ? len : 1);
        memcpy(cut, full, len);
        int rc = st_open_memory(&f, cut, len, "t.safetensors", &e);
        if (rc == 0) fail_msg("truncated to %zu of %zu bytes: opened", len, n);
        assert_null(f);
        assert_int_equal(strncmp(e.msg, "t.safetensors: ", 15), 0);
        free(cut);
    }
    /* The same through files: inside the prefix, the header and the data. */
    size_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | full[i];
    size_t cuts[] = {3, 8 + hl / 2, 8 + hl + 20};
    const char *want[] = {"shorter than the 8-byte header length", "exceeds the",
                          "reach beyond the data section"};
    for (int i = 0; i < 3; i++) {
        write_bytes(tpath("cut.safetensors"), full, cuts[i]);
        st_file *f;
        assert_int_equal(st_open(&f, tpath("cut.safetensors"), &e), -1);
        if (!strstr(e.msg, tpath("cut.safetensors")) || !strstr(e.msg, want[i]))
            fail_msg("cut at %zu: %s", cuts[i], e.msg);
    }
    /* The untouched file opens through both entry points. */
    st_file *f;
    assert_int_equal(st_open_memory(&f, full, n, "t", &e), 0);
    st_close(f);
    assert_int_equal(st_open(&f, path, &e), 0);
    st_close(f);
    free(full);

    /* Files that are not safetensors at all. */
    assert_int_equal(st_open(&f, tpath("missing.safetensors"), &e), -1);
    assert_non_null(strstr(e.msg, "missing.safetensors: No such file"));
    assert_int_equal(st_open(&f, tmpdir, &e), -1);
    assert_non_null(strstr(e.msg, "not a regular file"));
    write_bytes(tpath("empty.safetensors"), "", 0);
    assert_int_equal(st_open(&f, tpath("empty.safetensors"), &e), -1);
    assert_non_null(strstr(e.msg, "empty.safetensors: file is 0 bytes"));
}

/* The seed corpus of the fuzz target: good_* seeds open, bad_* seeds fail
 * with a message naming the file, anything else (units a fuzzer added)
 * just must not crash. */
static void test_fuzz_corpus(void **state) {
    FILE *pp = popen("ls tests/fuzz/corpus/fuzz_safetensors 2>/dev/null", "r");
    char name[512];
    int good = 0, bad = 0;
    while (pp && fgets(name, sizeof name, pp)) {
        name[strcspn(name, "\n")] = 0;
        char path[600];
        snprintf(path, sizeof path, "tests/fuzz/corpus/fuzz_safetensors/%s", name);
        st_file *f;
        err e;
        int rc = st_open(&f, path, &e);
        if (rc == 0) st_close(f);
        if (strncmp(name, "bad_", 4) == 0) {
            if (rc == 0) fail_msg("%s: opened", path);
            assert_non_null(strstr(e.msg, path));
            bad++;
        } else if (strncmp(name, "good_", 5) == 0) {
            if (rc) fail_msg("%s", e.msg);
            good++;
        }
    }
    if (pp) pclose(pp);
    assert_true(good >= 4 && bad >= 3);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_vectors),
        cmocka_unit_test(test_crc32c_vectors),
        cmocka_unit_test(test_half_chosen_values),
        cmocka_unit_test(test_half_against_numpy_torch),
        cmocka_unit_test(test_roundtrip_all_dtypes),
        cmocka_unit_test(test_get_f32),
        cmocka_unit_test(test_get_f32_unaligned),
        cmocka_unit_test(test_write_errors),
        cmocka_unit_test(test_corrupt_headers),
        cmocka_unit_test(test_truncation),
        cmocka_unit_test(test_fuzz_corpus),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
