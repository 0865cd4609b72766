/* libFuzzer target for common/config/pbtext.c: any bytes are parsed as an
 * Experiment (proto/peftps.proto) and as a TestScalars (proto/testmsg.proto,
 * every scalar type). What parses must print and parse back to the same
 * bytes, print the same text again, and free cleanly; a first line
 * "#set PATH=VALUE" is also applied as an override and checked the same way. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/pbtext.h"
#include "peftps.pb-c.h"
#include "testmsg.pb-c.h"

static void die(const char *what, const char *text) {
    fprintf(stderr, "fuzz_pbtext: %s\n--- text ---\n%s\n", what, text ? text : "");
    abort();
}

/* print -> parse -> equal bytes, and the second print equals the first. */
static void check_roundtrip(const ProtobufCMessage *m) {
    char *text = NULL;
    err e;
    if (pbtext_print(m, &text, &e)) return; /* out of memory only */
    ProtobufCMessage *back = NULL;
    if (pbtext_parse(m->descriptor, text, strlen(text), "printed", &back, NULL, &e))
        die(e.msg, text);
    if (!pbtext_equal(m, back)) die("round trip changed the message", text);
    char *again = NULL;
    if (!pbtext_print(back, &again, &e)) {
        if (strcmp(text, again)) die("printing twice differs", again);
        free(again);
    }
    protobuf_c_message_free_unpacked(back, NULL);
    free(text);
}

static void one(const ProtobufCMessageDescriptor *d, const char *text, size_t n, const char *set) {
    pbtext_locs *locs = pbtext_locs_new();
    ProtobufCMessage *m = NULL;
    err e;
    if (pbtext_parse(d, text, n, "fuzz", &m, locs, &e) == 0) {
        if (!m) die("parse succeeded without a message", NULL);
        pbtext_pos pos;
        char where[256];
        if (!pbtext_locate(locs, "optimizer.lr", &pos))
            pbtext_pos_format(&pos, where, sizeof where);
        check_roundtrip(m);
        if (set) {
            size_t before = protobuf_c_message_get_packed_size(m);
            if (pbtext_set_at(m, set, "--set", locs, &e) == 0)
                check_roundtrip(m);
            else if (protobuf_c_message_get_packed_size(m) != before)
                die("a failed override changed the message", set);
        }
        protobuf_c_message_free_unpacked(m, NULL);
    } else {
        if (m) die("failed parse returned a message", NULL);
        if (strchr(e.msg, '\n')) die("error message spans lines", e.msg);
    }
    pbtext_locs_free(locs);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *text = (const char *)data;
    char *set = NULL;
    if (size > 5 && !memcmp(data, "#set ", 5)) {
        const char *nl = memchr(data, '\n', size);
        size_t len = (nl ? (size_t)(nl - text) : size) - 5;
        set = malloc(len + 1);
        if (!set) return 0;
        memcpy(set, text + 5, len);
        set[len] = 0;
        if (strlen(set) != len) { /* an embedded NUL: no override */
            free(set);
            set = NULL;
        }
    }
    one(&peftps__experiment__descriptor, text, size, set);
    one(&peftps__test__test_scalars__descriptor, text, size, set);
    free(set);
    return 0;
}
