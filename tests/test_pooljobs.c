/* Tests of a pool coordinator's bookkeeping (common/net/pooljobs.c):
 * admission (job ids, the base, name, fingerprint, output and checkpoint
 * clashes with live jobs only), the revision workers follow, servers
 * announcing, compute accounting and shares, workers' hello and expiry,
 * and the bound on the table. The experiments are parsed from text over
 * tests/fixtures/tiny-llama (experiment_load_text, whose errors name the
 * source). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "net/pooljobs.h"
#include "train/experiment.h"

#define TINY "tests/fixtures/tiny-llama"

static Peftps__Experiment *load(const char *name, const char *extra) {
    char text[1024];
    snprintf(text, sizeof text,
             "name: \"%s\"\nmodel { path: \"" TINY "\" }\nmethod { lora { r: 4 } }\n"
             "data { train: \"tests/fixtures/tiny.tokens\" seq_len: 16 }\n"
             "schedule { total_steps: 10 }\n%s",
             name, extra ? extra : "");
    Peftps__Experiment *ex = NULL;
    err e;
    if (experiment_load_text(text, strlen(text), "test.pbtxt", &ex, NULL, &e) < 0)
        fail_msg("%s", e.msg);
    return ex;
}

static void setup_table(pooljobs *t) {
    char fp[65];
    err e;
    if (model_files_probe(TINY, fp, &e) < 0) fail_msg("%s", e.msg);
    assert_int_equal(pooljobs_init(t, TINY, fp, &e), 0);
}

static pooljob *add(pooljobs *t, Peftps__Experiment *ex, double now) {
    char fp[65];
    err e;
    config_fingerprint(ex, fp);
    if (pooljobs_admit(t, ex, fp, NULL, "test.pbtxt", &e) < 0) fail_msg("%s", e.msg);
    pooljob *j = pooljobs_add(t, ex, "text", fp, ex->cluster->share, 0, now, &e);
    if (!j) fail_msg("%s", e.msg);
    return j;
}

static void test_text_errors_name_source(void **state) {
    Peftps__Experiment *ex = NULL;
    err e;
    const char bad[] = "name: \"x\"\nmethod { lora { r: } }\n";
    assert_int_equal(experiment_load_text(bad, strlen(bad), "sent.pbtxt", &ex, NULL, &e), -1);
    assert_null(ex);
    assert_non_null(strstr(e.msg, "sent.pbtxt:2:"));
}

static void test_admit(void **state) {
    pooljobs t;
    setup_table(&t);
    err e;
    char fp[65];
    Peftps__Experiment *a = load("a", NULL);
    pooljob *ja = add(&t, a, 1);
    assert_int_equal(ja->state, PEFTPS__POOL__JOB_STATE__STARTING);

    /* The same experiment again: a fingerprint clash. */
    config_fingerprint(a, fp);
    assert_int_equal(pooljobs_admit(&t, a, fp, NULL, "again.pbtxt", &e), -1);
    assert_non_null(strstr(e.msg, "again.pbtxt: the same experiment as job a"));
    assert_non_null(strstr(e.msg, "fingerprint clash"));
    /* The same name, another experiment. */
    Peftps__Experiment *a2 = load("a", "seed: 7\n");
    config_fingerprint(a2, fp);
    assert_int_equal(pooljobs_admit(&t, a2, fp, NULL, "x.pbtxt", &e), -1);
    assert_non_null(strstr(e.msg, "a job named a is starting"));
    /* Another name, the same output_dir, then the same checkpoint.path. */
    Peftps__Experiment *b = load("b", "output_dir: \"out/a\"\n");
    config_fingerprint(b, fp);
    assert_int_equal(pooljobs_admit(&t, b, fp, NULL, "b.pbtxt", &e), -1);
    assert_non_null(strstr(e.msg, "output_dir out/a is job a's"));
    Peftps__Experiment *c = load("c", "checkpoint { path: \"out/a/ckpt\" }\n");
    config_fingerprint(c, fp);
    assert_int_equal(pooljobs_admit(&t, c, fp, NULL, "c.pbtxt", &e), -1);
    assert_non_null(strstr(e.msg, "checkpoint.path out/a/ckpt is job a's"));
    /* A name that cannot be a directory of the pool's work area. */
    Peftps__Experiment *d = load("../etc", NULL);
    config_fingerprint(d, fp);
    assert_int_equal(pooljobs_admit(&t, d, fp, NULL, "d.pbtxt", &e), -1);
    assert_non_null(strstr(e.msg, "cannot name a pool job"));
    /* Another base, as announced by a server. */
    Peftps__Experiment *f = load("f", NULL);
    config_fingerprint(f, fp);
    assert_int_equal(
        pooljobs_admit(&t, f, fp,
                       "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
                       "f.pbtxt", &e),
        -1);
    assert_non_null(strstr(e.msg, "fingerprint 001122334455.."));
    assert_non_null(strstr(e.msg, "this pool serves " TINY));
    assert_int_equal(pooljobs_admit(&t, f, fp, NULL, "f.pbtxt", &e), 0);

    /* Once a ended, all of these may join; a new "a" takes its place. */
    pooljobs_set_state(&t, ja, PEFTPS__POOL__JOB_STATE__DONE, NULL, 2);
    config_fingerprint(a2, fp);
    assert_int_equal(pooljobs_admit(&t, a2, fp, NULL, "x.pbtxt", &e), 0);
    add(&t, a2, 3);
    assert_int_equal(t.n_jobs, 1);
    assert_string_equal(pooljobs_find(&t, "a")->fingerprint, fp);
    config_free(a);
    config_free(a2);
    config_free(b);
    config_free(c);
    config_free(d);
    config_free(f);
    pooljobs_free(&t);
}

static void test_states_and_revision(void **state) {
    pooljobs t;
    setup_table(&t);
    err e;
    Peftps__Experiment *a = load("a", "cluster { servers: [\"tcp://h:1\", \"tcp://h:2\"] }\n");
    pooljob *j = add(&t, a, 1);
    uint64_t r0 = t.revision;
    assert_int_equal(pooljobs_announce(&t, j, 1, 2, &e), 0);
    assert_int_equal(j->state, PEFTPS__POOL__JOB_STATE__STARTING);
    assert_int_equal(pooljobs_announce(&t, j, 2, 2, &e), -1);
    assert_non_null(strstr(e.msg, "there is no server 2"));
    assert_int_equal(t.revision, r0);
    assert_int_equal(pooljobs_announce(&t, j, 0, 2, &e), 1);
    assert_int_equal(j->state, PEFTPS__POOL__JOB_STATE__RUNNING);
    assert_int_equal(t.revision, r0 + 1);
    /* A server that leaves takes the job out of the list until it is back. */
    assert_int_equal(pooljobs_server_left(&t, j, 1, 3), 1);
    assert_int_equal(j->state, PEFTPS__POOL__JOB_STATE__STARTING);
    assert_int_equal(t.revision, r0 + 2);
    assert_int_equal(pooljobs_announce(&t, j, 1, 4, &e), 1);
    assert_int_equal(t.revision, r0 + 3);
    r0 += 2;
    /* Leaving RUNNING bumps it again; an ended job stays ended. */
    assert_int_equal(pooljobs_set_state(&t, j, PEFTPS__POOL__JOB_STATE__CANCELLED, "c", 5), 1);
    assert_int_equal(t.revision, r0 + 2);
    assert_true(j->ended_s == 5);
    assert_int_equal(pooljobs_set_state(&t, j, PEFTPS__POOL__JOB_STATE__DONE, "late", 6), 0);
    assert_int_equal(j->state, PEFTPS__POOL__JOB_STATE__CANCELLED);
    assert_string_equal(j->message, "c");
    /* STARTING to FAILED: workers never saw it, no bump. */
    Peftps__Experiment *b = load("b", NULL);
    pooljob *jb = add(&t, b, 7);
    pooljobs_set_state(&t, jb, PEFTPS__POOL__JOB_STATE__FAILED, "bad", 8);
    assert_int_equal(t.revision, r0 + 2);
    config_free(a);
    config_free(b);
    pooljobs_free(&t);
}

static void test_usage_and_shares(void **state) {
    pooljobs t;
    setup_table(&t);
    err e;
    Peftps__Experiment *a = load("a", NULL), *b = load("b", "cluster { share: 3 }\n");
    pooljob *ja = add(&t, a, 1), *jb = add(&t, b, 1);
    assert_true(pooljobs_share_got(&t, ja) == 0);
    assert_true(pooljobs_share_of_running(&t, ja) == 0);
    pooljobs_announce(&t, ja, 0, 2, &e);
    pooljobs_announce(&t, jb, 0, 2, &e);
    assert_true(fabs(pooljobs_share_of_running(&t, ja) - 0.25) < 1e-12);
    assert_true(fabs(pooljobs_share_of_running(&t, jb) - 0.75) < 1e-12);
    assert_int_equal(pooljobs_usage(&t, "a", 1.0, 2, &e), 0);
    assert_int_equal(pooljobs_usage(&t, "b", 3.0, 6, &e), 0);
    assert_true(fabs(pooljobs_share_got(&t, ja) - 0.25) < 1e-12);
    assert_int_equal(jb->shards, 6);
    /* Nothing a peer says unchecked. */
    assert_int_equal(pooljobs_usage(&t, "a", NAN, 1, &e), -1);
    assert_int_equal(pooljobs_usage(&t, "a", -1, 1, &e), -1);
    assert_int_equal(pooljobs_usage(&t, "a", 1e9, 1, &e), -1);
    assert_int_equal(pooljobs_usage(&t, "zz", 1, 1, &e), -1);
    assert_int_equal(pooljobs_usage(&t, NULL, 1, 1, &e), -1);
    assert_true(ja->compute_s == 1.0);
    Peftps__Pool__Job m;
    pooljobs_job_msg(&t, jb, 0, &m);
    assert_null(m.experiment);
    assert_true(fabs(m.share_got - 0.75) < 1e-12);
    assert_false(m.has_loss); /* no loss reported yet */
    pooljobs_job_msg(&t, jb, 1, &m);
    assert_string_equal(m.experiment, "text");
    config_free(a);
    config_free(b);
    pooljobs_free(&t);
}

static void test_workers(void **state) {
    pooljobs t;
    setup_table(&t);
    err e;
    Peftps__Pool__WorkerHello h = PEFTPS__POOL__WORKER_HELLO__INIT;
    const unsigned char id1[] = {0, 1, 2}, id2[] = {0, 1, 3};
    h.worker_id = "w1";
    h.base_fingerprint = t.base_fingerprint;
    assert_int_equal(pooljobs_worker_hello(&t, id1, 3, &h, 0, &e), -1);
    assert_non_null(strstr(e.msg, "protocol 0"));
    h.has_protocol_version = 1;
    h.protocol_version = POOLMSG_PROTOCOL_VERSION;
    h.base_fingerprint = "ffff";
    assert_int_equal(pooljobs_worker_hello(&t, id1, 3, &h, 0, &e), -1);
    assert_non_null(strstr(e.msg, "fingerprint ffff"));
    h.base_fingerprint = NULL;
    assert_int_equal(pooljobs_worker_hello(&t, id1, 3, &h, 0, &e), -1);
    h.base_fingerprint = t.base_fingerprint;
    assert_int_equal(pooljobs_worker_hello(&t, id1, 3, &h, 0, &e), 0);
    assert_int_equal(pooljobs_worker_hello(&t, id1, 3, &h, 1, &e), 0);
    assert_int_equal(t.n_workers, 1);
    assert_false(pooljobs_any_bf16(&t));
    h.has_bf16 = h.bf16 = 1;
    h.worker_id = "w2";
    assert_int_equal(pooljobs_worker_hello(&t, id2, 3, &h, 5, &e), 0);
    assert_true(pooljobs_any_bf16(&t));
    char last[64];
    assert_int_equal(
        pooljobs_worker_expire(&t, 1 + POOLJOBS_WORKER_SILENCE_S + 0.5, last, sizeof last), 1);
    assert_string_equal(last, "w1");
    assert_null(pooljobs_worker_find(&t, id1, 3));
    assert_non_null(pooljobs_worker_find(&t, id2, 3));
    /* A dropped worker that speaks again (it was busy) comes back; an
     * identity never registered does not. */
    const unsigned char id3[] = {9};
    assert_null(pooljobs_worker_revive(&t, id3, 1, 20));
    poolworker *w = pooljobs_worker_revive(&t, id1, 3, 20);
    assert_non_null(w);
    assert_string_equal(w->id, "w1");
    assert_int_equal(t.n_workers, 2);
    assert_null(pooljobs_worker_revive(&t, id1, 3, 21));
    pooljobs_free(&t);
}

static void test_table_bound(void **state) {
    pooljobs t;
    setup_table(&t);
    err e;
    char name[32], fp[65];
    for (int i = 0; i < POOLJOBS_MAX; i++) {
        snprintf(name, sizeof name, "j%d", i);
        Peftps__Experiment *ex = load(name, NULL);
        add(&t, ex, i);
        config_free(ex);
    }
    Peftps__Experiment *ex = load("more", NULL);
    config_fingerprint(ex, fp);
    char *big = malloc(POOLJOBS_MAX_TEXT + 2);
    memset(big, 'x', POOLJOBS_MAX_TEXT + 1);
    big[POOLJOBS_MAX_TEXT + 1] = '\0';
    assert_null(pooljobs_add(&t, ex, big, fp, 1, 0, 999, &e));
    assert_non_null(strstr(e.msg, "at most 60000"));
    free(big);
    assert_null(pooljobs_add(&t, ex, "text", fp, 1, 0, 999, &e));
    assert_non_null(strstr(e.msg, "live jobs"));
    /* One ends: the newcomer takes the oldest ended place. */
    pooljobs_set_state(&t, pooljobs_find(&t, "j7"), PEFTPS__POOL__JOB_STATE__FAILED, "x", 1000);
    assert_non_null(pooljobs_add(&t, ex, "text", fp, 1, 0, 1001, &e));
    assert_int_equal(t.n_jobs, POOLJOBS_MAX);
    assert_null(pooljobs_find(&t, "j7"));
    assert_int_equal(pooljobs_count(&t, -1), POOLJOBS_MAX);
    config_free(ex);
    pooljobs_free(&t);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_errors_name_source),
        cmocka_unit_test(test_admit),
        cmocka_unit_test(test_states_and_revision),
        cmocka_unit_test(test_usage_and_shares),
        cmocka_unit_test(test_workers),
        cmocka_unit_test(test_table_bound),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
