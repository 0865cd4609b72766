/* Tests of cli/svgplot.c: tick placement against hand-worked ranges,
 * points landing on the pixels the layout implies, breaks at non-finite
 * points, escaping, the errors, and that the SVG is well-formed XML (a small
 * checker here, and Python's xml.etree when /usr/bin/python3 is there). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/svgplot.h"

/* ---- ticks ---------------------------------------------------------------- */

static void expect_ticks(double lo, double hi, int max, const double *want, int n) {
    double got[64];
    int k = svgplot_ticks(lo, hi, max, got, 64);
    if (k != n) {
        print_error("ticks of [%g, %g] (max %d): got %d, wanted %d\n", lo, hi, max, k, n);
        fail();
    }
    for (int i = 0; i < n; i++)
        if (fabs(got[i] - want[i]) > 1e-12 * fmax(1, fabs(want[i]))) {
            print_error("tick %d of [%g, %g]: %.17g, wanted %.17g\n", i, lo, hi, got[i], want[i]);
            fail();
        }
}

static void test_ticks(void **state) {
    (void)state;
    expect_ticks(0, 1, 6, (double[]){0, 0.2, 0.4, 0.6, 0.8, 1.0}, 6);
    /* 0.1 steps would need 9 ticks (0.1 .. 0.9): 0.2 steps cover it in 6. */
    expect_ticks(0.13, 0.87, 8, (double[]){0, 0.2, 0.4, 0.6, 0.8, 1.0}, 6);
    expect_ticks(-7, 23, 5, (double[]){-10, 0, 10, 20, 30}, 5);
    expect_ticks(1, 300, 8, (double[]){0, 50, 100, 150, 200, 250, 300}, 7);
    /* Loss-like values: 2.31 .. 6.24 with 7 ticks is 1, 2, ... 7. */
    expect_ticks(2.31, 6.24, 7, (double[]){2, 3, 4, 5, 6, 7}, 6);
    expect_ticks(1e6, 3e6, 5, (double[]){1e6, 1.5e6, 2e6, 2.5e6, 3e6}, 5);
    /* A flat range is widened by a tenth of its value, or by 1 at zero. */
    double t[64];
    int n = svgplot_ticks(5, 5, 6, t, 64);
    assert_true(n >= 2 && n <= 6);
    assert_true(t[0] <= 4.5 && t[n - 1] >= 5.5);
    n = svgplot_ticks(0, 0, 6, t, 64);
    assert_true(n >= 2 && t[0] <= -1 && t[n - 1] >= 1);
    /* Ticks that should be zero are exactly zero, not 5.5e-17. */
    n = svgplot_ticks(-0.3, 0.3, 7, t, 64);
    int zero = 0;
    for (int i = 0; i < n; i++) zero += t[i] == 0.0;
    assert_int_equal(zero, 1);
}

static void test_ticks_refused(void **state) {
    (void)state;
    double t[8];
    assert_int_equal(svgplot_ticks(NAN, 1, 5, t, 8), 0);
    assert_int_equal(svgplot_ticks(0, INFINITY, 5, t, 8), 0);
    assert_int_equal(svgplot_ticks(2, 1, 5, t, 8), 0);
    assert_int_equal(svgplot_ticks(0, 1, 1, t, 8), 0);
    assert_int_equal(svgplot_ticks(0, 1, 5, t, 1), 0);
    /* The cap limits the count as max_ticks does. */
    int n = svgplot_ticks(0, 1, 50, t, 3);
    assert_true(n >= 2 && n <= 3);
    assert_true(t[0] <= 0 && t[n - 1] >= 1);
}

/* ---- a small well-formedness check ---------------------------------------- */

/* 0 when `s` is one well-formed XML element (after an optional declaration):
 * tags nest and match, attribute values are quoted, '&' starts one of the
 * five predefined entities, '<' never appears in text or values. */
static int xml_check(const char *s, char *why, size_t n) {
    char stack[64][32];
    int depth = 0, roots = 0;
    const char *p = s;
    if (!strncmp(p, "<?xml", 5)) {
        p = strstr(p, "?>");
        if (!p) return snprintf(why, n, "unterminated declaration"), -1;
        p += 2;
    }
    while (*p) {
        if (*p == '<') {
            int closing = p[1] == '/';
            const char *q = p + 1 + closing;
            size_t len = strcspn(q, " \t\n/>");
            if (len == 0 || len >= 32) return snprintf(why, n, "bad tag at %td", p - s), -1;
            char name[32];
            memcpy(name, q, len);
            name[len] = '\0';
            q += len;
            /* Attributes: name="value" with no '<' inside, entities checked below. */
            while (*q && *q != '>' && !(q[0] == '/' && q[1] == '>')) {
                if (*q == '"') {
                    const char *end = strchr(q + 1, '"');
                    if (!end) return snprintf(why, n, "unterminated value"), -1;
                    if (memchr(q + 1, '<', (size_t)(end - q - 1)))
                        return snprintf(why, n, "'<' inside a value of <%s>", name), -1;
                    q = end;
                }
                q++;
            }
            if (!*q) return snprintf(why, n, "unterminated tag <%s>", name), -1;
            int empty = *q == '/';
            if (closing) {
                if (depth == 0 || strcmp(stack[depth - 1], name))
                    return snprintf(why, n, "</%s> closes <%s>", name,
                                    depth ? stack[depth - 1] : "nothing"),
                           -1;
                depth--;
            } else if (!empty) {
                if (depth == 0) roots++;
                if (depth == 64) return snprintf(why, n, "too deep"), -1;
                strcpy(stack[depth++], name);
            } else if (depth == 0) {
                roots++;
            }
            p = q + (empty ? 2 : 1);
            continue;
        }
        if (*p == '&') {
            static const char *ents[] = {"&amp;", "&lt;", "&gt;", "&quot;", "&apos;"};
            int ok = 0;
            for (int i = 0; i < 5; i++) ok |= !strncmp(p, ents[i], strlen(ents[i]));
            if (!ok) return snprintf(why, n, "bare '&' at %td", p - s), -1;
        } else if (depth == 0 && !strchr(" \t\r\n", *p)) {
            return snprintf(why, n, "text outside the root at %td", p - s), -1;
        }
        p++;
    }
    if (depth) return snprintf(why, n, "<%s> is never closed", stack[depth - 1]), -1;
    if (roots != 1) return snprintf(why, n, "%d root elements", roots), -1;
    return 0;
}

static void assert_xml(const char *svg) {
    char why[200];
    if (xml_check(svg, why, sizeof why) < 0) {
        print_error("not well-formed XML: %s\n", why);
        fail();
    }
}

static void test_checker_catches(void **state) {
    (void)state;
    /* The checker itself must fail on broken documents, or the tests below
     * prove nothing. */
    char why[200];
    assert_int_equal(xml_check("<a><b></a>", why, sizeof why), -1);
    assert_int_equal(xml_check("<a>x & y</a>", why, sizeof why), -1);
    assert_int_equal(xml_check("<a t=\"<\"/>", why, sizeof why), -1);
    assert_int_equal(xml_check("<a/><b/>", why, sizeof why), -1);
    assert_int_equal(xml_check("<a>", why, sizeof why), -1);
    assert_int_equal(
        xml_check("<?xml version=\"1.0\"?>\n<a t=\"1\">x &amp; y<b/></a>\n", why, sizeof why), 0);
}

/* ---- rendering ------------------------------------------------------------ */

static int count(const char *s, const char *what) {
    int n = 0;
    for (const char *p = strstr(s, what); p; p = strstr(p + 1, what)) n++;
    return n;
}

/* The points="..." of the k-th polyline, copied into buf. */
static const char *polyline_points(const char *svg, int k, char *buf, size_t n) {
    const char *p = svg;
    for (int i = 0; i <= k; i++) {
        p = strstr(p, "<polyline");
        assert_non_null(p);
        p++;
    }
    p = strstr(p, "points=\"");
    assert_non_null(p);
    p += 8;
    size_t len = strcspn(p, "\"");
    assert_true(len < n);
    memcpy(buf, p, len);
    buf[len] = '\0';
    return buf;
}

static void test_render_layout(void **state) {
    (void)state;
    /* x 0..100 and y 0..10 are whole ticks, so the axes span exactly them.
     * 720x450 with a title and an x label: the plot area starts at (72, 40)
     * and is 720-72-24 = 624 wide, 450-40-58 = 352 high. */
    double x[3] = {0, 50, 100}, y[3] = {10, 5, 0};
    svgplot_series s = {"lora", x, y, 3, 0, SVGPLOT_LINE};
    svgplot p = {"loss", "step", "loss", 0, 0, 0, &s, 1};
    char *svg;
    err e;
    assert_int_equal(svgplot_render(&p, &svg, &e), 0);
    assert_xml(svg);
    char pts[256];
    assert_string_equal(polyline_points(svg, 0, pts, sizeof pts),
                        "72.00,40.00 384.00,216.00 696.00,392.00");
    assert_int_equal(count(svg, "<polyline"), 1);
    assert_non_null(strstr(svg, ">lora</text>"));
    assert_non_null(strstr(svg, "width=\"720\" height=\"450\""));
    /* Tick labels of both axes. */
    assert_non_null(strstr(svg, ">100</text>"));
    assert_non_null(strstr(svg, ">10</text>"));
    free(svg);
}

static void test_render_series_and_escaping(void **state) {
    (void)state;
    double x1[5] = {1, 2, 3, 4, 5}, y1[5] = {3.0, 2.5, NAN, 2.0, 1.9};
    double x2[2] = {2.5, 5}, y2[2] = {2.7, 2.1};
    double x3[2] = {1, 5}, y3[2] = {2.9, 1.5};
    svgplot_series s[3] = {
        {"lora <r=8> & \"q\"", x1, y1, 5, 0, SVGPLOT_LINE},
        {NULL, x2, y2, 2, 0, SVGPLOT_MARKERS}, /* same colour, no legend entry */
        {"prefix's", x3, y3, 2, 1, SVGPLOT_LINE_MARKERS},
    };
    svgplot p = {"a & b", NULL, NULL, 800, 500, 1, s, 3};
    char *svg;
    err e;
    assert_int_equal(svgplot_render(&p, &svg, &e), 0);
    assert_xml(svg);
    /* The NaN splits the first series in two; the third is one line. */
    assert_int_equal(count(svg, "<polyline"), 3);
    /* Markers: two of series 2, two of series 3, one in the legend. */
    assert_int_equal(count(svg, "<circle"), 5);
    assert_non_null(strstr(svg, ">lora &lt;r=8&gt; &amp; &quot;q&quot;</text>"));
    assert_non_null(strstr(svg, ">prefix&apos;s</text>"));
    assert_non_null(strstr(svg, ">a &amp; b</text>"));
    /* Two named series: two legend rows; the first colour twice in lines. */
    assert_int_equal(count(svg, "stroke=\"#4e79a7\""), 3);
    /* y_from_zero: the lowest y tick is 0. */
    assert_non_null(strstr(svg, ">0.0</text>"));
    free(svg);
}

static void test_render_errors(void **state) {
    (void)state;
    char *svg = (char *)1;
    err e;
    svgplot p = {0};
    assert_int_equal(svgplot_render(&p, &svg, &e), -1);
    assert_null(svg);
    assert_non_null(strstr(e.msg, "no series"));
    double x[2] = {NAN, 1}, y[2] = {1, INFINITY};
    svgplot_series s = {"nan", x, y, 2, 0, SVGPLOT_LINE};
    p.series = &s;
    p.n_series = 1;
    assert_int_equal(svgplot_render(&p, &svg, &e), -1);
    assert_non_null(strstr(e.msg, "finite"));
    svgplot_series bad = {"bad", NULL, y, 2, 0, SVGPLOT_LINE};
    p.series = &bad;
    assert_int_equal(svgplot_render(&p, &svg, &e), -1);
    assert_non_null(strstr(e.msg, "bad"));
    double ok[2] = {1, 2};
    svgplot_series tiny = {"tiny", ok, ok, 2, 0, SVGPLOT_LINE};
    svgplot small = {NULL, NULL, NULL, 60, 60, 0, &tiny, 1};
    assert_int_equal(svgplot_render(&small, &svg, &e), -1);
    assert_non_null(strstr(e.msg, "too small"));
    assert_int_equal(svgplot_write(&small, "/nonexistent-dir/x.svg", &e), -1);
    assert_non_null(strstr(e.msg, "/nonexistent-dir/x.svg"));
}

/* Written to a file, the plot parses with Python's XML parser as SVG, with
 * the polylines and legend texts the renderer put in. */
static void test_write_parses_in_python(void **state) {
    (void)state;
    double x[4] = {1, 2, 3, 4}, y[4] = {6.2, 4.0, 3.1, 2.8};
    double x2[4] = {1, 2, 3, 4}, y2[4] = {6.2, 5.0, 4.5, 4.4};
    svgplot_series s[2] = {{"lora & co", x, y, 4, 0, SVGPLOT_LINE},
                           {"full", x2, y2, 4, 1, SVGPLOT_LINE}};
    svgplot p = {"eval <loss>", "step", "loss", 0, 0, 0, s, 2};
    char path[] = "/tmp/peftps-test-svgplot-XXXXXX.svg";
    int fd = mkstemps(path, 4);
    assert_true(fd >= 0);
    close(fd);
    err e;
    assert_int_equal(svgplot_write(&p, path, &e), 0);
    char *svg;
    assert_int_equal(svgplot_render(&p, &svg, &e), 0);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char *back = calloc(1, strlen(svg) + 2);
    size_t got = fread(back, 1, strlen(svg) + 1, f);
    fclose(f);
    assert_int_equal(got, strlen(svg));
    assert_string_equal(back, svg);
    free(back);
    free(svg);
    if (access("/usr/bin/python3", X_OK) != 0) {
        unlink(path);
        skip();
    }
    char cmd[512];
    snprintf(cmd, sizeof cmd,
             "/usr/bin/python3 -c '"
             "import sys, xml.etree.ElementTree as ET\n"
             "r = ET.parse(sys.argv[1]).getroot()\n"
             "ns = \"{http://www.w3.org/2000/svg}\"\n"
             "assert r.tag == ns + \"svg\", r.tag\n"
             "assert len(r.findall(\".//\" + ns + \"polyline\")) == 2\n"
             "texts = [t.text for t in r.iter(ns + \"text\")]\n"
             "assert \"lora & co\" in texts and \"full\" in texts and \"eval <loss>\" in texts, "
             "texts\n' %s",
             path);
    int rc = system(cmd);
    unlink(path);
    assert_int_equal(rc, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ticks),
        cmocka_unit_test(test_ticks_refused),
        cmocka_unit_test(test_checker_catches),
        cmocka_unit_test(test_render_layout),
        cmocka_unit_test(test_render_series_and_escaping),
        cmocka_unit_test(test_render_errors),
        cmocka_unit_test(test_write_parses_in_python),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
