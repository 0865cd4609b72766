/* `peftps inspect CKPT_DIR [--step N]`: lists the checkpoints of an LMDB
 * checkpoint directory (common/train/ckpt.h) and describes one of them tensor by
 * tensor, with the L2 norms of parameters and AdamW moments. Read-only: safe
 * while a server writes to the same directory. */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "train/ckpt.h"
#include "cli.h"
#include "config/cmdline.h"

static const char usage[] =
    "usage: peftps inspect CKPT_DIR [--step N]\n"
    "\n"
    "Lists the checkpoints held in CKPT_DIR (an LMDB environment written by the\n"
    "parameter server, checkpoint.path of the experiment): step, data position,\n"
    "optimizer update count, time written and fingerprints. Then describes the\n"
    "latest checkpoint (or step N): every trainable tensor with its shape, element\n"
    "count and the L2 norms of its parameters and of the AdamW moments m and v,\n"
    "and the method's state blobs with their sizes. Every value read is checked\n"
    "against its CRC-32C. Opens the directory read-only; a server may be writing.\n"
    "\n"
    "options:\n"
    "  --step N     describe checkpoint N instead of the latest\n"
    "  -h, --help   this help\n"
    "\n"
    "Exits 0, or 2 with one error line on bad usage or an unreadable checkpoint.\n";

/* Names come from disk: show bytes a terminal would interpret as \xNN. */
static void print_escaped(const char *s, int width) {
    int n = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (isprint(*p) && *p != '\\') {
            putchar(*p);
            n++;
        } else {
            n += printf("\\x%02x", *p);
        }
    }
    for (; n < width; n++) putchar(' ');
}

static int escaped_len(const char *s) {
    int n = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        n += isprint(*p) && *p != '\\' ? 1 : 4;
    return n;
}

static double l2(const float *x, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
    return sqrt(s);
}

static void format_time(int64_t t, char *buf, size_t n) {
    time_t tt = (time_t)t;
    struct tm tm;
    if (!gmtime_r(&tt, &tm) || !strftime(buf, n, "%Y-%m-%d %H:%M:%S UTC", &tm))
        snprintf(buf, n, "%" PRId64, t);
}

static void print_list(const ckpt_info *info, int n, uint64_t chosen) {
    printf("%-2s%12s %14s %12s  %-23s  %-16s  %s\n", "", "step", "data_pos", "optim_t", "written",
           "experiment", "base");
    for (int i = 0; i < n; i++) {
        char when[64];
        format_time(info[i].time, when, sizeof when);
        printf("%-2s%12" PRIu64 " %14" PRIu64 " %12" PRIu64 "  %-23s  %.16s  %.16s\n",
               info[i].step == chosen ? "*" : "", info[i].step, info[i].data_pos, info[i].opt_t,
               when, info[i].experiment_fp, info[i].base_fp[0] ? info[i].base_fp : "(none)");
    }
}

static void shape_text(const peft_tensor *t, char *buf, size_t size) {
    size_t len = (size_t)snprintf(buf, size, "[");
    for (int k = 0; k < t->ndim && len < size; k++)
        len += (size_t)snprintf(buf + len, size - len, "%s%" PRId64, k ? ", " : "", t->shape[k]);
    if (len < size) snprintf(buf + len, size - len, "]");
}

static void print_checkpoint(const ckpt_data *d, int latest) {
    size_t trainable = 0;
    for (int i = 0; i < d->n_tensors; i++) trainable += d->tensors[i].numel;
    printf("\nstep %" PRIu64 "%s: %d tensor%s, %zu trainable parameters (%zu floats), %d blob%s\n",
           d->step, latest ? " (latest)" : "", d->n_tensors, d->n_tensors == 1 ? "" : "s",
           trainable, d->n_params, d->n_blobs, d->n_blobs == 1 ? "" : "s");
    printf("  experiment fingerprint  %s\n", d->experiment_fp);
    printf("  base fingerprint        %s\n", d->base_fp[0] ? d->base_fp : "(not recorded)");
    printf("  data position           %" PRIu64 "\n", d->data_pos);
    printf("  optimizer updates (t)   %" PRIu64 "\n", d->opt_t);

    double sq[3] = {0, 0, 0};
    int width = 6;
    for (int i = 0; i < d->n_tensors; i++) {
        int w = escaped_len(d->tensors[i].name);
        if (w > width) width = w;
    }
    printf("\n  ");
    print_escaped("tensor", width);
    printf("  %-20s %12s %12s %12s %12s\n", "shape", "numel", "|params|", "|m|", "|v|");
    for (int i = 0; i < d->n_tensors; i++) {
        const peft_tensor *t = &d->tensors[i];
        char shape[128];
        shape_text(t, shape, sizeof shape);
        printf("  ");
        print_escaped(t->name, width);
        double norm[3] = {l2(d->params + t->offset, t->numel), l2(d->m + t->offset, t->numel),
                          l2(d->v + t->offset, t->numel)};
        for (int k = 0; k < 3; k++) sq[k] += norm[k] * norm[k];
        printf("  %-20s %12zu %12.6g %12.6g %12.6g\n", shape, t->numel, norm[0], norm[1], norm[2]);
    }
    /* Over the tensors only: padding between them is not trained. */
    printf("  ");
    print_escaped("all", width);
    printf("  %-20s %12zu %12.6g %12.6g %12.6g\n", "", trainable, sqrt(sq[0]), sqrt(sq[1]),
           sqrt(sq[2]));

    if (d->n_blobs) {
        width = 4;
        for (int i = 0; i < d->n_blobs; i++) {
            int w = escaped_len(d->blobs[i].name);
            if (w > width) width = w;
        }
        printf("\n  ");
        print_escaped("blob", width);
        printf("  %12s\n", "bytes");
        for (int i = 0; i < d->n_blobs; i++) {
            printf("  ");
            print_escaped(d->blobs[i].name, width);
            printf("  %12zu\n", d->blobs[i].size);
        }
    }
}

int cmd_inspect(int argc, char **argv) {
    const char *dir = NULL;
    uint64_t step = CKPT_LATEST;
    const cmdline_opt opts[] = {CMDLINE_UINT("--step", &step, 0, CMDLINE_UINT_MAX)};
    int rc = cmdline_parse("peftps inspect", usage, opts, 1, "checkpoint directory", &dir, 1, argc,
                           argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!dir) {
        fprintf(stderr, "peftps inspect: which checkpoint directory?\n%s", usage);
        return 2;
    }

    err e;
    ckpt *c = NULL;
    ckpt_info *info = NULL;
    ckpt_data d = {0};
    int n = 0;
    rc = 2;
    if (ckpt_open(&c, dir, 0, NULL, &e) < 0 || ckpt_list(c, &info, &n, &e) < 0 ||
        ckpt_read(c, step, &d, &e) < 0)
        goto done;
    printf("checkpoint %s: %d checkpoint%s, map %zu MiB\n", dir, n, n == 1 ? "" : "s",
           ckpt_map_size(c) >> 20);
    print_list(info, n, d.step);
    print_checkpoint(&d, n > 0 && d.step == info[n - 1].step);
    rc = 0;
done:
    if (rc) fprintf(stderr, "peftps inspect: %s\n", e.msg);
    ckpt_data_free(&d);
    free(info);
    ckpt_close(c);
    return rc;
}
