/* base/memstat.h against memory this test makes resident itself: 64 MB of
 * touched heap count as private and not as mapped, a 32 MB file mapped and
 * read counts as mapped and not as private. */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/memstat.h"

#define MB (1L << 20)

static void test_private_and_mapped(void **state) {
    (void)state;
    memstat a, b, c;
    assert_int_equal(memstat_read(0, &a), 0);
    assert_string_equal(a.name, "test_memstat");
    assert_true(a.private_kib > 0 && a.mapped_kib > 0 && a.rss_kib > 0 && a.peak_kib > 0);

    size_t heap = 64 * MB;
    char *p = malloc(heap);
    assert_non_null(p);
    memset(p, 1, heap);
    assert_int_equal(memstat_read(0, &b), 0);
    printf("private %ld -> %ld kB, mapped %ld -> %ld kB after 64 MB of heap\n", a.private_kib,
           b.private_kib, a.mapped_kib, b.mapped_kib);
    assert_true(b.private_kib - a.private_kib >= 60 * 1024);
    assert_true(b.mapped_kib - a.mapped_kib < 8 * 1024);

    char path[] = "/tmp/peftps_test_memstat_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    size_t len = 32 * MB;
    char *buf = calloc(1, MB);
    assert_non_null(buf);
    for (size_t i = 0; i < len / MB; i++) assert_int_equal(write(fd, buf, MB), MB);
    free(buf);
    const volatile char *m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    assert_true(m != MAP_FAILED);
    unsigned sum = 0;
    for (size_t i = 0; i < len; i += 4096) sum += (unsigned)m[i];
    assert_int_equal(sum, 0);
    assert_int_equal(memstat_read(0, &c), 0);
    printf("private %ld -> %ld kB, mapped %ld -> %ld kB after reading a 32 MB mapped file\n",
           b.private_kib, c.private_kib, b.mapped_kib, c.mapped_kib);
    assert_true(c.mapped_kib - b.mapped_kib >= 30 * 1024);
    assert_true(c.private_kib - b.private_kib < 8 * 1024);
    munmap((void *)m, len);
    close(fd);
    unlink(path);
    free(p);

    assert_int_equal(memstat_read(getppid(), &a), 0);
    assert_true(a.name[0] != '\0');
    assert_int_equal(memstat_read(-5, &a), -1);
    assert_int_equal(a.private_kib, -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_private_and_mapped)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
