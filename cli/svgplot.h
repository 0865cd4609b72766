/* Line plots as standalone SVG, written by peftps itself so that drawing a
 * loss curve needs no plotting package: axes with "nice" ticks, grid, axis
 * labels, a legend and one polyline (or a row of markers) per series.
 * `peftps compare` (cli/cmd_compare.c) draws the loss curves of its methods
 * with it; tests/test_svgplot.c checks the output. */
#ifndef PEFTPS_SVGPLOT_H
#define PEFTPS_SVGPLOT_H

#include <stddef.h>

#include "base/err.h"

/* How a series is drawn. */
typedef enum {
    SVGPLOT_LINE = 0, /* a polyline through the points, in x order as given */
    SVGPLOT_MARKERS,  /* a circle at each point, unconnected */
    SVGPLOT_LINE_MARKERS
} svgplot_style;

/* One series: n points (x[i], y[i]). Points with a non-finite coordinate
 * are skipped and break the line there. Series with a non-NULL name get a
 * legend entry; `color` picks from a fixed palette of 10 (taken modulo 10),
 * so that two series of one method (training and eval loss) can share it. */
typedef struct svgplot_series {
    const char *name;
    const double *x;
    const double *y;
    size_t n;
    int color;
    svgplot_style style;
} svgplot_series;

/* The figure. Texts may be NULL; width/height of 0 mean 720x450. The axes
 * span the series' finite points, widened to whole ticks; with y_from_zero
 * the y axis starts at 0 (when every y is positive). */
typedef struct svgplot {
    const char *title;
    const char *x_label;
    const char *y_label;
    int width, height;
    int y_from_zero;
    const svgplot_series *series;
    int n_series;
} svgplot;

/* Ticks for the range [lo, hi]: a step of 1, 2 or 5 times a power of ten
 * such that at most max_ticks (>= 2) ticks cover the range, the first at or
 * below lo and the last at or above hi. Writes up to cap values to ticks and
 * returns how many it wrote, or 0 when lo or hi is not finite, lo > hi,
 * max_ticks < 2 or cap < 2. A zero-width range is widened around its value
 * first (by 1 for 0, else by a tenth of its magnitude), so it still gets
 * two ticks. */
int svgplot_ticks(double lo, double hi, int max_ticks, double *ticks, int cap);

/* Renders the figure into *svg (malloc'd, NUL-terminated; the caller frees).
 * Text is XML-escaped. Fails, saying which, when there is no series, a series
 * has n > 0 but no x or y array, or no series has a finite point. */
int svgplot_render(const svgplot *p, char **svg, err *e);

/* svgplot_render, then writes the text to path atomically. */
int svgplot_write(const svgplot *p, const char *path, err *e);

#endif
