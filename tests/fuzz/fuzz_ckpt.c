/* libFuzzer target for the checkpoint reader (common/train/ckpt.c) fed
 * damaged copies of a real checkpoint: a valid data.mdb of three steps is
 * written once, and each input cuts it to some length and rewrites fields of
 * its two LMDB meta pages (page size, last page, transaction id, magic,
 * flags). Opening, listing and reading must either succeed or fail with a
 * message naming the directory; never crash (a SIGBUS on a truncated map was
 * the bug this guards against). Damage inside the B-tree pages is LMDB's to
 * detect and is not generated here. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "train/ckpt.h"

static char dir[64], src_dir[80], file[96];
static unsigned char *whole;
static size_t whole_n;

#define EXP_FP "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

static void remove_dir(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
}

/* A checkpoint of several pages, overflow pages included. */
static void make_source(void) {
    snprintf(dir, sizeof dir, "/tmp/peftps-fuzz-ckpt-XXXXXX");
    if (!mkdtemp(dir)) abort();
    atexit(remove_dir);
    snprintf(src_dir, sizeof src_dir, "%s/src", dir);
    ckpt *c;
    err e;
    if (ckpt_open(&c, src_dir, 1, NULL, &e) < 0) abort();
    size_t n = 20000;
    float *a = malloc(n * sizeof *a);
    if (!a) abort();
    for (size_t i = 0; i < n; i++) a[i] = (float)i * 0.25f;
    peft_tensor t = {.name = "w", .ndim = 1, .shape = {(int64_t)n}, .offset = 0, .numel = n};
    for (uint64_t step = 1; step <= 3; step++) {
        ckpt_data d = {.step = step,
                       .n_params = n,
                       .params = a,
                       .m = a,
                       .v = a,
                       .tensors = &t,
                       .n_tensors = 1,
                       .opt_t = step};
        memcpy(d.experiment_fp, EXP_FP, 65);
        if (ckpt_write(c, &d, &e) < 0) abort();
    }
    free(a);
    ckpt_close(c);
    char path[128];
    snprintf(path, sizeof path, "%s/data.mdb", src_dir);
    FILE *f = fopen(path, "rb");
    if (!f || fseek(f, 0, SEEK_END) < 0) abort();
    whole_n = (size_t)ftell(f);
    rewind(f);
    whole = malloc(whole_n);
    if (!whole || fread(whole, 1, whole_n, f) != whole_n) abort();
    fclose(f);
    snprintf(src_dir, sizeof src_dir, "%s/cut", dir);
    snprintf(file, sizeof file, "%s/data.mdb", src_dir);
    if (mkdir(src_dir, 0777) < 0) abort();
}

/* Field offsets within a meta page that decide what LMDB maps. */
static const size_t fields[] = {10, 16, 20, 16 + 24, 16 + 120, 16 + 128};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!whole) make_source();
    if (size < 4) return 0;
    uint32_t cut = (uint32_t)data[0] | (uint32_t)data[1] << 8 | (uint32_t)data[2] << 16 |
                   (uint32_t)data[3] << 24;
    size_t len = cut % (whole_n + 1);
    /* Half of the cuts page-aligned, as copies and full disks leave them. */
    if (cut & 0x80000000u) len = len / 4096 * 4096;
    unsigned char *buf = malloc(whole_n);
    if (!buf) abort();
    memcpy(buf, whole, whole_n);
    /* Then (meta page, field, byte, value) patches. */
    for (size_t i = 4; i + 3 < size; i += 4) {
        size_t page = data[i] & 1, field = fields[data[i + 1] % (sizeof fields / sizeof *fields)];
        size_t at = page * 4096 + field + (data[i + 2] & 7);
        if (at < whole_n) buf[at] = data[i + 3];
    }
    FILE *f = fopen(file, "wb");
    if (!f) abort();
    if (len && fwrite(buf, 1, len, f) != len) abort();
    fclose(f);
    free(buf);
    ckpt *c;
    err e;
    if (ckpt_open(&c, src_dir, 0, NULL, &e) < 0) {
        if (!strstr(e.msg, src_dir)) abort();
        return 0;
    }
    ckpt_info *info;
    int n;
    if (ckpt_list(c, &info, &n, &e) == 0) free(info);
    ckpt_data d;
    if (ckpt_read(c, CKPT_LATEST, &d, &e) == 0) {
        volatile float sum = 0;
        for (size_t i = 0; i < d.n_params; i++) sum += d.params[i] + d.m[i] + d.v[i];
    }
    ckpt_data_free(&d);
    ckpt_close(c);
    return 0;
}
