/* Tests of common/train/ckpt.c: bit-identical round trips, pruning, latest step,
 * CRC checks against bytes damaged in data.mdb, fingerprint and layout
 * refusals, map growth from a tiny map, a writer SIGKILLed mid-write,
 * directories that are not checkpoints, and data.mdb truncated or empty. Temporary directories live
 * in /tmp. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "train/ckpt.h"

/* ---- helpers -------------------------------------------------------------- */

static char tmpdir[64];

static int setup_dir(void **state) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/peftps-ckpt-XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    return remove(p);
}

static int teardown_dir(void **state) {
    return nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static void path_in(char *buf, size_t n, const char *name) {
    snprintf(buf, n, "%s/%s", tmpdir, name);
}

#define EXP_FP "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define EXP_FP2 "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"
#define BASE_FP "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd"

/* A checkpoint whose every value derives from (step, n): what a test writes
 * and, independently, what it expects to read back. */
typedef struct sample {
    ckpt_data d;
    float *params, *m, *v;
    peft_tensor tensors[3];
    ckpt_blob blobs[3];
    unsigned char blob_bytes[300];
    uint32_t mask[5];
} sample;

static float value_of(uint64_t step, size_t i, int which) {
    uint32_t x = (uint32_t)(step * 2654435761u) ^ (uint32_t)(i * 40503u + (size_t)which * 97u);
    x ^= x >> 13;
    x *= 0x5bd1e995u;
    x ^= x >> 15;
    return ((float)(x % 2000001u) - 1000000.0f) * 1e-6f;
}

/* Three tensors laid out as peft.h does, with a gap of padding before the
 * last, inside n >= 64 floats. */
static void sample_make(sample *s, uint64_t step, size_t n) {
    memset(s, 0, sizeof *s);
    s->params = malloc(n * sizeof(float));
    s->m = malloc(n * sizeof(float));
    s->v = malloc(n * sizeof(float));
    assert_non_null(s->params);
    assert_non_null(s->m);
    assert_non_null(s->v);
    for (size_t i = 0; i < n; i++) {
        s->params[i] = value_of(step, i, 0);
        s->m[i] = value_of(step, i, 1);
        s->v[i] = fabsf(value_of(step, i, 2));
    }
    /* Values whose bits an arithmetic round trip would lose. */
    s->params[1] = -0.0f;
    s->params[2] = 1e-45f; /* a denormal */
    s->m[3] = INFINITY;
    uint32_t nan_bits = 0x7fc01234u;
    memcpy(&s->v[4], &nan_bits, 4);

    peft_tensor *t = s->tensors;
    snprintf(t[0].name, sizeof t[0].name,
             "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    t[0].ndim = 2, t[0].shape[0] = 4, t[0].shape[1] = 8, t[0].offset = 0, t[0].numel = 32;
    snprintf(t[1].name, sizeof t[1].name, "scalar");
    t[1].ndim = 0, t[1].offset = 32, t[1].numel = 1;
    snprintf(t[2].name, sizeof t[2].name, "rest");
    t[2].ndim = 1, t[2].shape[0] = (int64_t)(n - 48), t[2].offset = 48, t[2].numel = n - 48;

    for (size_t i = 0; i < sizeof s->blob_bytes; i++)
        s->blob_bytes[i] = (unsigned char)(i * 7 + step);
    for (int i = 0; i < 5; i++) s->mask[i] = (uint32_t)(step + (uint64_t)i * 1000);
    snprintf(s->blobs[0].name, sizeof s->blobs[0].name, "subnet/mask_indices");
    s->blobs[0].data = s->mask, s->blobs[0].size = sizeof s->mask;
    snprintf(s->blobs[1].name, sizeof s->blobs[1].name, "bytes with \x01 odd name");
    s->blobs[1].data = s->blob_bytes, s->blobs[1].size = sizeof s->blob_bytes;
    snprintf(s->blobs[2].name, sizeof s->blobs[2].name, "empty");
    s->blobs[2].data = NULL, s->blobs[2].size = 0;

    ckpt_data *d = &s->d;
    d->step = step;
    snprintf(d->experiment_fp, sizeof d->experiment_fp, "%s", EXP_FP);
    snprintf(d->base_fp, sizeof d->base_fp, "%s", BASE_FP);
    d->data_pos = step * 16 + 3;
    d->opt_t = step;
    d->n_params = n;
    d->params = s->params, d->m = s->m, d->v = s->v;
    d->tensors = s->tensors, d->n_tensors = 3;
    d->blobs = s->blobs, d->n_blobs = 3;
}

static void sample_free(sample *s) {
    free(s->params);
    free(s->m);
    free(s->v);
}

/* Everything read must equal what was written, bit for bit. */
static void assert_same(const ckpt_data *got, const ckpt_data *want) {
    assert_int_equal(got->step, want->step);
    assert_string_equal(got->experiment_fp, want->experiment_fp);
    assert_string_equal(got->base_fp, want->base_fp);
    assert_int_equal(got->data_pos, want->data_pos);
    assert_int_equal(got->opt_t, want->opt_t);
    assert_int_equal(got->n_params, want->n_params);
    size_t bytes = want->n_params * sizeof(float);
    assert_memory_equal(got->params, want->params, bytes);
    assert_memory_equal(got->m, want->m, bytes);
    assert_memory_equal(got->v, want->v, bytes);
    assert_int_equal(got->n_tensors, want->n_tensors);
    for (int i = 0; i < want->n_tensors; i++) {
        const peft_tensor *a = &got->tensors[i], *b = &want->tensors[i];
        assert_string_equal(a->name, b->name);
        assert_int_equal(a->ndim, b->ndim);
        for (int k = 0; k < b->ndim; k++) assert_int_equal(a->shape[k], b->shape[k]);
        assert_int_equal(a->offset, b->offset);
        assert_int_equal(a->numel, b->numel);
    }
    /* Blobs come back in key order; find each by name. */
    assert_int_equal(got->n_blobs, want->n_blobs);
    for (int i = 0; i < want->n_blobs; i++) {
        int j = 0;
        while (j < got->n_blobs && strcmp(got->blobs[j].name, want->blobs[i].name)) j++;
        assert_true(j < got->n_blobs);
        assert_int_equal(got->blobs[j].size, want->blobs[i].size);
        if (want->blobs[i].size)
            assert_memory_equal(got->blobs[j].data, want->blobs[i].data, want->blobs[i].size);
    }
}

static void assert_err_has(const err *e, const char *part) {
    if (!strstr(e->msg, part)) fail_msg("error '%s' lacks '%s'", e->msg, part);
}

/* ---- round trip, listing, pruning ----------------------------------------- */

static void test_roundtrip(void **state) {
    char dir[128];
    path_in(dir, sizeof dir, "a/b/ck"); /* parents are created */
    err e;
    ckpt *c;
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), 0);
    uint64_t *steps;
    int n;
    assert_int_equal(ckpt_steps(c, &steps, &n, &e), 0);
    assert_int_equal(n, 0);
    ckpt_data got;
    assert_int_equal(ckpt_read(c, CKPT_LATEST, &got, &e), -1);
    assert_err_has(&e, "holds no checkpoint");
    ckpt_data_free(&got);

    sample s;
    sample_make(&s, 42, 1000);
    time_t before = time(NULL);
    assert_int_equal(ckpt_write(c, &s.d, &e), 0);
    assert_int_equal(ckpt_read(c, CKPT_LATEST, &got, &e), 0);
    assert_same(&got, &s.d);
    assert_true(got.time >= before && got.time <= time(NULL));
    ckpt_data_free(&got);
    ckpt_close(c);

    /* A fresh read-only open sees the same bits. */
    assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), 0);
    assert_int_equal(ckpt_read(c, 42, &got, &e), 0);
    assert_same(&got, &s.d);
    ckpt_data_free(&got);
    ckpt_info *info;
    assert_int_equal(ckpt_list(c, &info, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_int_equal(info[0].step, 42);
    assert_int_equal(info[0].data_pos, 42 * 16 + 3);
    assert_int_equal(info[0].opt_t, 42);
    assert_int_equal(info[0].n_params, 1000);
    assert_int_equal(info[0].n_tensors, 3);
    assert_int_equal(info[0].n_blobs, 3);
    assert_string_equal(info[0].experiment_fp, EXP_FP);
    assert_string_equal(info[0].base_fp, BASE_FP);
    free(info);
    /* A read-only handle refuses to write. */
    assert_int_equal(ckpt_write(c, &s.d, &e), -1);
    assert_err_has(&e, "read-only");
    ckpt_close(c);

    /* No tensors, no blobs, no base fingerprint, zero parameters. */
    path_in(dir, sizeof dir, "empty-ck");
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), 0);
    ckpt_data z = {.step = 0, .experiment_fp = EXP_FP};
    assert_int_equal(ckpt_write(c, &z, &e), 0);
    assert_int_equal(ckpt_read(c, CKPT_LATEST, &got, &e), 0);
    assert_int_equal(got.step, 0);
    assert_int_equal(got.n_params, 0);
    assert_int_equal(got.n_tensors, 0);
    assert_int_equal(got.n_blobs, 0);
    assert_string_equal(got.base_fp, "");
    ckpt_data_free(&got);
    ckpt_close(c);
    sample_free(&s);
}

static void test_keep_and_latest(void **state) {
    char dir[128];
    path_in(dir, sizeof dir, "keep");
    err e;
    ckpt *c;
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), 0); /* default keep: 3 */
    for (uint64_t step = 10; step <= 60; step += 10) {
        sample s;
        sample_make(&s, step, 200);
        assert_int_equal(ckpt_write(c, &s.d, &e), 0);
        sample_free(&s);
    }
    uint64_t *steps;
    int n;
    assert_int_equal(ckpt_steps(c, &steps, &n, &e), 0);
    assert_int_equal(n, 3);
    assert_int_equal(steps[0], 40);
    assert_int_equal(steps[1], 50);
    assert_int_equal(steps[2], 60);
    free(steps);

    ckpt_data got;
    sample want;
    assert_int_equal(ckpt_read(c, CKPT_LATEST, &got, &e), 0);
    sample_make(&want, 60, 200);
    assert_same(&got, &want.d);
    ckpt_data_free(&got);
    sample_free(&want);
    assert_int_equal(ckpt_read(c, 50, &got, &e), 0);
    sample_make(&want, 50, 200);
    assert_same(&got, &want.d);
    ckpt_data_free(&got);

    /* A pruned step is gone, and the message lists what is held. */
    assert_int_equal(ckpt_read(c, 10, &got, &e), -1);
    assert_err_has(&e, "no step 10");
    assert_err_has(&e, "40, 50, 60");
    assert_err_has(&e, dir);

    /* Writing an older step than held is refused and changes nothing. */
    assert_int_equal(ckpt_write(c, &want.d, &e), -1);
    assert_err_has(&e, "newer than step 50");
    assert_int_equal(ckpt_steps(c, &steps, &n, &e), 0);
    assert_int_equal(n, 3);
    free(steps);
    sample_free(&want);

    /* One environment holds one experiment on one base. */
    sample_make(&want, 70, 200);
    snprintf(want.d.experiment_fp, sizeof want.d.experiment_fp, "%s", EXP_FP2);
    assert_int_equal(ckpt_write(c, &want.d, &e), -1);
    assert_err_has(&e, "another experiment");
    assert_err_has(&e, "fedcba987654");
    snprintf(want.d.experiment_fp, sizeof want.d.experiment_fp, "%s", EXP_FP);
    snprintf(want.d.base_fp, sizeof want.d.base_fp, "%s", EXP_FP2);
    assert_int_equal(ckpt_write(c, &want.d, &e), -1);
    assert_err_has(&e, "base model");
    sample_free(&want);

    /* The same step again replaces it (a resumed server recomputing). */
    sample_make(&want, 60, 200);
    want.d.data_pos = 999;
    want.d.n_blobs = 1;
    assert_int_equal(ckpt_write(c, &want.d, &e), 0);
    assert_int_equal(ckpt_read(c, 60, &got, &e), 0);
    assert_same(&got, &want.d);
    ckpt_data_free(&got);
    sample_free(&want);
    ckpt_close(c);

    /* keep = 1 prunes everything older at the next write, which may hold a
     * different number of parameters. */
    ckpt_options opt = {.keep = 1};
    assert_int_equal(ckpt_open(&c, dir, 1, &opt, &e), 0);
    sample_make(&want, 70, 100);
    assert_int_equal(ckpt_write(c, &want.d, &e), 0);
    assert_int_equal(ckpt_steps(c, &steps, &n, &e), 0);
    assert_int_equal(n, 1);
    assert_int_equal(steps[0], 70);
    free(steps);
    sample_free(&want);
    ckpt_close(c);
}

/* ---- damage --------------------------------------------------------------- */

/* Flips one byte in every occurrence of pattern in file; returns the count. */
static int damage_file(const char *file, const void *pattern, size_t n) {
    FILE *f = fopen(file, "r+b");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    unsigned char *buf = malloc((size_t)size);
    assert_non_null(buf);
    fseek(f, 0, SEEK_SET);
    assert_int_equal(fread(buf, 1, (size_t)size, f), (size_t)size);
    int hits = 0;
    for (long i = 0; i + (long)n <= size; i++) {
        if (memcmp(buf + i, pattern, n)) continue;
        unsigned char b = buf[i + n / 2] ^ 0x10;
        fseek(f, i + (long)(n / 2), SEEK_SET);
        assert_int_equal(fwrite(&b, 1, 1, f), 1);
        hits++;
    }
    assert_int_equal(fclose(f), 0);
    free(buf);
    return hits;
}

static void test_crc_detects_damage(void **state) {
    char dir[128], file[160];
    path_in(dir, sizeof dir, "damaged");
    snprintf(file, sizeof file, "%s/data.mdb", dir);
    err e;
    ckpt *c;
    sample s;
    sample_make(&s, 7, 5000);
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), 0);
    assert_int_equal(ckpt_write(c, &s.d, &e), 0);
    ckpt_close(c);

    /* Damage a byte inside params, far from either end of the value. */
    assert_true(damage_file(file, &s.params[2500], 32) >= 1);
    ckpt_data got;
    assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), 0);
    assert_int_equal(ckpt_read(c, CKPT_LATEST, &got, &e), -1);
    assert_err_has(&e, "step/00000000000000000007/params");
    assert_err_has(&e, dir);
    assert_err_has(&e, "CRC-32C");
    assert_null(got.params);
    ckpt_data_free(&got);
    /* The header is intact: listing still works. */
    ckpt_info *info;
    int n;
    assert_int_equal(ckpt_list(c, &info, &n, &e), 0);
    assert_int_equal(n, 1);
    free(info);
    ckpt_close(c);

    /* Undo it, then damage a blob instead. */
    unsigned char changed[32];
    memcpy(changed, &s.params[2500], 32);
    changed[16] ^= 0x10;
    assert_true(damage_file(file, changed, 32) >= 1);
    assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), 0);
    assert_int_equal(ckpt_read(c, 7, &got, &e), 0);
    assert_same(&got, &s.d);
    ckpt_data_free(&got);
    ckpt_close(c);
    assert_true(damage_file(file, s.blob_bytes + 100, 40) >= 1);
    assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), 0);
    assert_int_equal(ckpt_read(c, 7, &got, &e), -1);
    assert_err_has(&e, "step/00000000000000000007/blob/bytes with \x01 odd name");
    assert_err_has(&e, "CRC-32C");
    ckpt_close(c);
    sample_free(&s);
}

/* ---- checks against the running experiment -------------------------------- */

static void test_check_refuses(void **state) {
    sample s;
    sample_make(&s, 5, 100);
    const ckpt_data *d = &s.d;
    err e;
    peft_tensor t[3];
    memcpy(t, s.tensors, sizeof t);
    assert_int_equal(ckpt_check(d, "/ck", EXP_FP, BASE_FP, t, 3, 100, &e), 0);
    assert_int_equal(ckpt_check(d, "/ck", EXP_FP, NULL, t, 3, 100, &e), 0);

    assert_int_equal(ckpt_check(d, "/ck", EXP_FP2, BASE_FP, t, 3, 100, &e), -1);
    assert_err_has(&e, "checkpoint /ck was written by another experiment");
    assert_err_has(&e, "0123456789ab");
    assert_err_has(&e, "fedcba987654");
    assert_err_has(&e, "use a new checkpoint.path or remove it");

    assert_int_equal(ckpt_check(d, "/ck", EXP_FP, EXP_FP2, t, 3, 100, &e), -1);
    assert_err_has(&e, "another base model");
    /* A checkpoint without a base fingerprint cannot be checked for it. */
    ckpt_data nobase = *d;
    nobase.base_fp[0] = '\0';
    assert_int_equal(ckpt_check(&nobase, "/ck", EXP_FP, EXP_FP2, t, 3, 100, &e), 0);

    t[0].shape[1] = 9;
    assert_int_equal(ckpt_check(d, "/ck", EXP_FP, BASE_FP, t, 3, 100, &e), -1);
    assert_err_has(&e, "tensor 0");
    assert_err_has(&e, "[4, 8]");
    assert_err_has(&e, "[4, 9]");
    t[0].shape[1] = 8;
    snprintf(t[1].name, sizeof t[1].name, "other");
    assert_int_equal(ckpt_check(d, "/ck", EXP_FP, BASE_FP, t, 3, 100, &e), -1);
    assert_err_has(&e, "other");
    snprintf(t[1].name, sizeof t[1].name, "scalar");
    t[2].offset = 40;
    assert_int_equal(ckpt_check(d, "/ck", EXP_FP, BASE_FP, t, 3, 100, &e), -1);
    assert_err_has(&e, "offset 48");
    t[2].offset = 48;
    assert_int_equal(ckpt_check(d, "/ck", EXP_FP, BASE_FP, t, 2, 100, &e), -1);
    assert_err_has(&e, "holds 3 tensors, the method declares 2");
    assert_int_equal(ckpt_check(d, "/ck", EXP_FP, BASE_FP, t, 3, 104, &e), -1);
    assert_err_has(&e, "100 parameters");
    sample_free(&s);
}

static void test_write_validates(void **state) {
    char dir[128];
    path_in(dir, sizeof dir, "validate");
    err e;
    ckpt *c;
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), 0);
    sample s;
    sample_make(&s, 3, 100);

    snprintf(s.d.experiment_fp, sizeof s.d.experiment_fp, "%s", "abc");
    assert_int_equal(ckpt_write(c, &s.d, &e), -1);
    assert_err_has(&e, "not 64 lower-case hex digits");
    snprintf(s.d.experiment_fp, sizeof s.d.experiment_fp, "%s", EXP_FP);

    s.tensors[2].numel = 53; /* shape says 52 */
    assert_int_equal(ckpt_write(c, &s.d, &e), -1);
    assert_err_has(&e, "tensor 2 ('rest')");
    assert_err_has(&e, "product of its shape");
    s.tensors[2].numel = 52;
    s.tensors[2].offset = 49;
    assert_int_equal(ckpt_write(c, &s.d, &e), -1);
    assert_err_has(&e, "outside the parameter array");
    s.tensors[2].offset = 48;

    snprintf(s.blobs[2].name, sizeof s.blobs[2].name, "%s", s.blobs[0].name);
    assert_int_equal(ckpt_write(c, &s.d, &e), -1);
    assert_err_has(&e, "given twice");
    snprintf(s.blobs[2].name, sizeof s.blobs[2].name, "empty");

    s.d.m = NULL;
    assert_int_equal(ckpt_write(c, &s.d, &e), -1);
    assert_err_has(&e, "params, m and v are required");
    s.d.m = s.m;

    /* Nothing of the refused writes reached the disk. */
    uint64_t *steps;
    int n;
    assert_int_equal(ckpt_steps(c, &steps, &n, &e), 0);
    assert_int_equal(n, 0);
    assert_int_equal(ckpt_write(c, &s.d, &e), 0);
    ckpt_close(c);
    sample_free(&s);
}

/* ---- map growth ------------------------------------------------------------ */

static void test_map_growth(void **state) {
    char dir[128];
    path_in(dir, sizeof dir, "tiny-map");
    err e;
    ckpt *c;
    ckpt_options opt = {.map_size = 64 << 10, .keep = 2};
    assert_int_equal(ckpt_open(&c, dir, 1, &opt, &e), 0);
    assert_int_equal(ckpt_map_size(c), 64 << 10);
    const size_t n = 1 << 20; /* 4 MiB per array, 12 MiB per checkpoint */
    for (uint64_t step = 1; step <= 3; step++) {
        sample s;
        sample_make(&s, step, n);
        assert_int_equal(ckpt_write(c, &s.d, &e), 0);
        sample_free(&s);
    }
    size_t grown = ckpt_map_size(c);
    /* Two checkpoints live plus the one being written. */
    assert_true(grown >= (size_t)36 << 20);
    ckpt_close(c);

    /* Reopened (reading the map size the file recorded), both are intact. */
    assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), 0);
    uint64_t *steps;
    int count;
    assert_int_equal(ckpt_steps(c, &steps, &count, &e), 0);
    assert_int_equal(count, 2);
    for (int i = 0; i < count; i++) {
        ckpt_data got;
        sample want;
        assert_int_equal(ckpt_read(c, steps[i], &got, &e), 0);
        sample_make(&want, steps[i], n);
        assert_same(&got, &want.d);
        ckpt_data_free(&got);
        sample_free(&want);
    }
    free(steps);
    ckpt_close(c);

    /* A writer reopening keeps the grown map rather than the tiny one asked for. */
    assert_int_equal(ckpt_open(&c, dir, 1, &opt, &e), 0);
    assert_true(ckpt_map_size(c) >= grown);
    ckpt_close(c);
}

/* ---- crash in the middle of writes ----------------------------------------- */

#define CRASH_N ((size_t)1 << 20) /* 4 MiB per array, 12 MiB per checkpoint */

/* What the writer child reports: a write about to start, or committed. */
typedef struct crash_msg {
    uint64_t step;
    int committed;
} crash_msg;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The child: writes checkpoints from the step after the latest one held,
 * reporting around each ckpt_write, until killed. The data is made before
 * the "starting" report, so the window between the two reports is the write
 * alone. */
static void crash_child(const char *dir, int fd) {
    err e;
    ckpt *c;
    ckpt_options opt = {.keep = 2, .map_size = 1 << 20};
    if (ckpt_open(&c, dir, 1, &opt, &e) < 0) _exit(3);
    uint64_t *steps;
    int n;
    if (ckpt_steps(c, &steps, &n, &e) < 0) _exit(4);
    uint64_t step = n ? steps[n - 1] + 1 : 1;
    free(steps);
    for (;; step++) {
        sample s;
        sample_make(&s, step, CRASH_N);
        crash_msg m = {step, 0};
        if (write(fd, &m, sizeof m) != sizeof m) _exit(6);
        if (ckpt_write(c, &s.d, &e) < 0) _exit(5);
        m.committed = 1;
        if (write(fd, &m, sizeof m) != sizeof m) _exit(6);
        sample_free(&s);
    }
}

static void test_crash_mid_write(void **state) {
    char dir[128];
    path_in(dir, sizeof dir, "crash");
    /* Each round lets the child commit twice to time its writes, then kills
     * it a fraction of a write's duration after the next write starts. Rounds
     * go on until three kills have provably interrupted a transaction (the
     * step being written is absent afterwards), at most 20 rounds. */
    int interrupted = 0, round;
    for (round = 0; round < 20 && interrupted < 3; round++) {
        int fds[2];
        assert_int_equal(pipe(fds), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            close(fds[0]);
            crash_child(dir, fds[1]);
        }
        close(fds[1]);
        crash_msg m;
        double started = 0, took = 0;
        int commits = 0;
        while (read(fds[0], &m, sizeof m) == sizeof m) {
            if (!m.committed && commits == 2) break; /* the write to interrupt */
            if (!m.committed)
                started = now_s();
            else
                took += now_s() - started, commits++;
        }
        assert_int_equal(commits, 2);
        uint64_t writing = m.step;
        double fraction = 0.15 + 0.7 * (double)(round % 5) / 4.0;
        usleep((useconds_t)(1e6 * fraction * took / 2));
        assert_int_equal(kill(pid, SIGKILL), 0);
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
            fail_msg("writer exited with status %d before being killed", status);
        /* Later reports, when the kill came late. */
        uint64_t last_committed = writing - 1;
        while (read(fds[0], &m, sizeof m) == sizeof m) {
            if (m.committed)
                last_committed = m.step;
            else
                writing = m.step;
        }
        close(fds[0]);

        err e;
        ckpt *c;
        assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), 0);
        uint64_t *steps;
        int n;
        assert_int_equal(ckpt_steps(c, &steps, &n, &e), 0);
        assert_true(n >= 1 && n <= 2);
        /* The latest is the last reported commit, or the write in flight
         * when it had committed but not yet reported. */
        uint64_t latest = steps[n - 1];
        if (latest != last_committed && !(writing > last_committed && latest == writing))
            fail_msg("latest step %llu; last committed %llu, in flight %llu",
                     (unsigned long long)latest, (unsigned long long)last_committed,
                     (unsigned long long)writing);
        if (writing > last_committed && latest == last_committed) interrupted++;
        for (int i = 0; i < n; i++) {
            ckpt_data got;
            sample want;
            assert_int_equal(ckpt_read(c, steps[i], &got, &e), 0);
            sample_make(&want, steps[i], CRASH_N);
            assert_same(&got, &want.d);
            ckpt_data_free(&got);
            sample_free(&want);
        }
        free(steps);
        ckpt_close(c);
    }
    print_message("%d of %d kills interrupted a write\n", interrupted, round);
    assert_true(interrupted >= 1);
}

/* ---- directories that are not checkpoints ---------------------------------- */

static void test_not_a_checkpoint(void **state) {
    char dir[128], file[160];
    err e;
    ckpt *c = (ckpt *)1;

    path_in(dir, sizeof dir, "missing");
    assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), -1);
    assert_null(c);
    assert_err_has(&e, "does not exist");
    struct stat st;
    assert_int_equal(stat(dir, &st), -1); /* not created by a reader */

    /* A directory of other things: refused for reading and for writing. */
    path_in(dir, sizeof dir, "other");
    assert_int_equal(mkdir(dir, 0777), 0);
    snprintf(file, sizeof file, "%s/notes.txt", dir);
    FILE *f = fopen(file, "w");
    assert_non_null(f);
    fputs("not a checkpoint\n", f);
    fclose(f);
    assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), -1);
    assert_err_has(&e, "holds no data.mdb");
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), -1);
    assert_err_has(&e, "holds files but no data.mdb");
    snprintf(file, sizeof file, "%s/data.mdb", dir);
    assert_int_equal(stat(file, &st), -1);

    /* A data.mdb that is not LMDB is left alone. */
    f = fopen(file, "wb");
    assert_non_null(f);
    unsigned char junk[16384];
    for (size_t i = 0; i < sizeof junk; i++) junk[i] = (unsigned char)(i * 31 + 7);
    fwrite(junk, 1, sizeof junk, f);
    fclose(f);
    assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), -1);
    assert_err_has(&e, "is not an LMDB file");
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), -1);
    assert_err_has(&e, "is not an LMDB file");
    unsigned char back[sizeof junk];
    f = fopen(file, "rb");
    assert_int_equal(fread(back, 1, sizeof back, f), sizeof back);
    fclose(f);
    assert_memory_equal(back, junk, sizeof junk);

    /* An empty data.mdb read-only. */
    path_in(dir, sizeof dir, "zero");
    assert_int_equal(mkdir(dir, 0777), 0);
    snprintf(file, sizeof file, "%s/data.mdb", dir);
    f = fopen(file, "wb");
    fclose(f);
    assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), -1);
    assert_err_has(&e, dir);

    /* A file where a directory should be. */
    path_in(dir, sizeof dir, "other/notes.txt");
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), -1);
    assert_err_has(&e, "is not a directory");

    /* An environment created but never written: nothing to read. */
    path_in(dir, sizeof dir, "fresh");
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), 0);
    ckpt_close(c);
    assert_int_equal(ckpt_open(&c, dir, 0, NULL, &e), -1);
    assert_err_has(&e, "holds no checkpoint");
    /* ...but a writer may open it again. */
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), 0);
    ckpt_close(c);
}

/* ---- truncated and empty files --------------------------------------------- */

/* Copies the first `len` bytes of src into dst (created). */
static void copy_prefix(const char *src, const char *dst, size_t len) {
    FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
    assert_non_null(in);
    assert_non_null(out);
    char buf[65536];
    while (len > 0) {
        size_t want = len < sizeof buf ? len : sizeof buf;
        size_t got = fread(buf, 1, want, in);
        assert_true(got > 0);
        assert_int_equal(fwrite(buf, 1, got, out), got);
        len -= got;
    }
    fclose(in);
    fclose(out);
}

/* data.mdb cut to 25, 50 and 90% (page-aligned, as a copy interrupted or a
 * full disk leaves it) and a zero-byte data.mdb: refused before LMDB maps
 * them, by readers and writers alike, naming the file; a whole copy opens. */
static void test_truncated_file(void **state) {
    char dir[128], src[160];
    err e;
    ckpt *c;
    path_in(dir, sizeof dir, "whole");
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), 0);
    for (uint64_t step = 1; step <= 3; step++) {
        sample sm;
        sample_make(&sm, step, 300000);
        if (ckpt_write(c, &sm.d, &e) < 0) fail_msg("%s", e.msg);
        sample_free(&sm);
    }
    ckpt_close(c);
    snprintf(src, sizeof src, "%s/data.mdb", dir);
    struct stat st;
    assert_int_equal(stat(src, &st), 0);
    size_t size = (size_t)st.st_size, page = 4096;
    assert_true(size > 16 * page);

    const int percent[] = {25, 50, 90, 100};
    for (int i = 0; i < 4; i++) {
        char cut[128], file[160];
        snprintf(cut, sizeof cut, "%s/cut%d", tmpdir, percent[i]);
        assert_int_equal(mkdir(cut, 0777), 0);
        snprintf(file, sizeof file, "%s/data.mdb", cut);
        size_t len = size * (size_t)percent[i] / 100 / page * page;
        copy_prefix(src, file, len);
        for (int create = 0; create <= 1; create++) {
            int rc = ckpt_open(&c, cut, create, NULL, &e);
            if (percent[i] == 100) {
                if (rc < 0) fail_msg("whole copy: %s", e.msg);
                ckpt_data d;
                assert_int_equal(ckpt_read(c, CKPT_LATEST, &d, &e), 0);
                assert_int_equal(d.step, 3);
                ckpt_data_free(&d);
                ckpt_close(c);
                continue;
            }
            assert_int_equal(rc, -1);
            assert_null(c);
            assert_err_has(&e, file);
            assert_err_has(&e, "is truncated");
            print_message("%d%%, %s: %s\n", percent[i], create ? "writer" : "reader", e.msg);
        }
        /* Refused, and left as it was. */
        assert_int_equal(stat(file, &st), 0);
        assert_int_equal((size_t)st.st_size, len);
    }

    /* A zero-byte data.mdb is not "no checkpoint yet": a writer would
     * silently start again at step 0. */
    char zero[128], file[160];
    snprintf(zero, sizeof zero, "%s/zero", tmpdir);
    assert_int_equal(mkdir(zero, 0777), 0);
    snprintf(file, sizeof file, "%s/data.mdb", zero);
    copy_prefix(src, file, 0);
    for (int create = 0; create <= 1; create++) {
        assert_int_equal(ckpt_open(&c, zero, create, NULL, &e), -1);
        assert_err_has(&e, file);
        assert_err_has(&e, "is empty (0 bytes)");
    }
    assert_int_equal(stat(file, &st), 0);
    assert_int_equal(st.st_size, 0);

    /* Shorter than the two meta pages. */
    copy_prefix(src, file, page + 100);
    assert_int_equal(ckpt_open(&c, zero, 0, NULL, &e), -1);
    assert_err_has(&e, "too short for LMDB's two meta pages");
}

/* ---- a full disk ------------------------------------------------------------------ */

/* A checkpoint that does not fit on its file system (a 2 MiB tmpfs, when
 * this test may mount one) is reported as a full disk with the directory,
 * not as an I/O error, and what was written before stays readable. */
static void test_disk_full(void **state) {
    char mnt[128], dir[160], cmd[300];
    path_in(mnt, sizeof mnt, "small");
    assert_int_equal(mkdir(mnt, 0777), 0);
    snprintf(cmd, sizeof cmd, "mount -t tmpfs -o size=2m peftps-test %s 2>/dev/null", mnt);
    if (geteuid() != 0 || system(cmd) != 0) {
        print_message("skipped: mounting a small tmpfs needs root\n");
        skip();
    }
    snprintf(dir, sizeof dir, "%s/ck", mnt);
    ckpt *c;
    err e;
    assert_int_equal(ckpt_open(&c, dir, 1, NULL, &e), 0);
    sample small, big;
    sample_make(&small, 1, 1000);
    sample_make(&big, 2, 300000); /* 3.6 MB */
    if (ckpt_write(c, &small.d, &e) < 0) fail_msg("%s", e.msg);
    int rc = ckpt_write(c, &big.d, &e);
    print_message("%s\n", rc < 0 ? e.msg : "written?");
    snprintf(cmd, sizeof cmd, "umount -l %s", mnt);
    if (rc == 0) {
        ckpt_close(c);
        if (system(cmd) != 0) print_message("could not unmount %s\n", mnt);
    }
    assert_int_equal(rc, -1);
    assert_err_has(&e, dir);
    assert_err_has(&e, "no space left");
    ckpt_data d;
    assert_int_equal(ckpt_read(c, CKPT_LATEST, &d, &e), 0);
    assert_same(&d, &small.d);
    ckpt_data_free(&d);
    ckpt_close(c);
    sample_free(&small);
    sample_free(&big);
    assert_int_equal(system(cmd), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_roundtrip, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_keep_and_latest, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_crc_detects_damage, setup_dir, teardown_dir),
        cmocka_unit_test(test_check_refuses),
        cmocka_unit_test_setup_teardown(test_write_validates, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_map_growth, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_crash_mid_write, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_not_a_checkpoint, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_truncated_file, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_disk_full, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
