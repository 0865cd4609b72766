/* Line plots as standalone SVG; see svgplot.h. Plain text output through
 * open_memstream, written with fsutil.h's atomic write. Used by
 * cli/cmd_compare.c for loss curves. */
#include "svgplot.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/fsutil.h"

#define SVGPLOT_MAX_TICKS 64

/* Tableau 10: distinct for most forms of colour blindness, and in print. */
static const char *const palette[10] = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                                        "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"};

int svgplot_ticks(double lo, double hi, int max_ticks, double *ticks, int cap) {
    if (!isfinite(lo) || !isfinite(hi) || lo > hi || max_ticks < 2 || cap < 2) return 0;
    if (lo == hi) {
        double pad = lo == 0 ? 1.0 : fabs(lo) / 10.0;
        lo -= pad;
        hi += pad;
    }
    double span = hi - lo;
    if (!isfinite(span)) return 0;
    static const double mult[3] = {1, 2, 5};
    /* Start one decade below the step that max_ticks would need, climb. */
    int e0 = (int)floor(log10(span / max_ticks)) - 1;
    for (int e = e0; e < e0 + 40; e++) {
        for (int m = 0; m < 3; m++) {
            double step = mult[m] * pow(10.0, e);
            double first = floor(lo / step), last = ceil(hi / step);
            /* Rounding of lo/step can leave lo a hair outside; step back. */
            if (first * step > lo) first -= 1;
            if (last * step < hi) last += 1;
            long count = (long)(last - first) + 1;
            if (count > max_ticks || count > cap) continue;
            for (long i = 0; i < count; i++) {
                double v = (first + (double)i) * step;
                /* Products like 3*0.1 land next to zero, not on it. */
                ticks[i] = fabs(v) < step * 1e-9 ? 0.0 : v;
            }
            return (int)count;
        }
    }
    return 0;
}

/* Digits after the point that tick labels of this step need. */
static int tick_decimals(double step) {
    if (step >= 1) return 0;
    int d = (int)ceil(-log10(step) - 1e-9);
    return d > 12 ? 12 : d;
}

static void tick_label(char *buf, size_t n, double v, int decimals) {
    if (fabs(v) >= 1e6)
        snprintf(buf, n, "%g", v);
    else
        snprintf(buf, n, "%.*f", decimals, v);
    if (!strcmp(buf, "-0") || (buf[0] == '-' && strspn(buf + 1, "0.") == strlen(buf + 1)))
        memmove(buf, buf + 1, strlen(buf));
}

static void put_escaped(FILE *f, const char *s) {
    for (; *s; s++) {
        switch (*s) {
        case '&':
            fputs("&amp;", f);
            break;
        case '<':
            fputs("&lt;", f);
            break;
        case '>':
            fputs("&gt;", f);
            break;
        case '"':
            fputs("&quot;", f);
            break;
        case '\'':
            fputs("&apos;", f);
            break;
        default:
            /* Control characters other than tab and newline are not XML. */
            if ((unsigned char)*s < 0x20 && *s != '\t' && *s != '\n')
                fputc(' ', f);
            else
                fputc(*s, f);
        }
    }
}

typedef struct frame {
    double x0, x1, y0, y1;    /* data range of the axes */
    double left, top, pw, ph; /* plot area in pixels */
} frame;

static double px(const frame *fr, double x) {
    return fr->left + (x - fr->x0) / (fr->x1 - fr->x0) * fr->pw;
}

static double py(const frame *fr, double y) {
    return fr->top + fr->ph - (y - fr->y0) / (fr->y1 - fr->y0) * fr->ph;
}

static void draw_series(FILE *f, const frame *fr, const svgplot_series *s) {
    const char *col = palette[((s->color % 10) + 10) % 10];
    if (s->style != SVGPLOT_MARKERS) {
        int open = 0;
        for (size_t i = 0; i < s->n; i++) {
            if (!isfinite(s->x[i]) || !isfinite(s->y[i])) {
                if (open) fputs("\"/>\n", f);
                open = 0;
                continue;
            }
            if (!open)
                fprintf(f,
                        "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.6\" "
                        "stroke-linejoin=\"round\" points=\"",
                        col);
            fprintf(f, "%s%.2f,%.2f", open ? " " : "", px(fr, s->x[i]), py(fr, s->y[i]));
            open = 1;
        }
        if (open) fputs("\"/>\n", f);
    }
    if (s->style != SVGPLOT_LINE)
        for (size_t i = 0; i < s->n; i++)
            if (isfinite(s->x[i]) && isfinite(s->y[i]))
                fprintf(f,
                        "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"3.2\" fill=\"%s\" stroke=\"white\" "
                        "stroke-width=\"0.8\"/>\n",
                        px(fr, s->x[i]), py(fr, s->y[i]), col);
}

static void draw_legend(FILE *f, const frame *fr, const svgplot *p) {
    int rows = 0;
    size_t widest = 0;
    for (int i = 0; i < p->n_series; i++) {
        if (!p->series[i].name) continue;
        rows++;
        size_t w = strlen(p->series[i].name);
        if (w > widest) widest = w;
    }
    if (!rows) return;
    double w = 36 + 7.0 * (double)widest, h = 8 + 18.0 * rows;
    double x = fr->left + fr->pw - w - 8, y = fr->top + 8;
    fprintf(f,
            "<g class=\"legend\">\n<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
            "fill=\"white\" fill-opacity=\"0.9\" stroke=\"#999\"/>\n",
            x, y, w, h);
    int r = 0;
    for (int i = 0; i < p->n_series; i++) {
        const svgplot_series *s = &p->series[i];
        if (!s->name) continue;
        const char *col = palette[((s->color % 10) + 10) % 10];
        double ly = y + 4 + 18.0 * r + 9;
        if (s->style != SVGPLOT_LINE)
            fprintf(f, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3.2\" fill=\"%s\"/>\n", x + 17, ly,
                    col);
        if (s->style != SVGPLOT_MARKERS)
            fprintf(f,
                    "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" "
                    "stroke-width=\"2.5\"/>\n",
                    x + 8, ly, x + 26, ly, col);
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" dominant-baseline=\"middle\">", x + 32, ly + 1);
        put_escaped(f, s->name);
        fputs("</text>\n", f);
        r++;
    }
    fputs("</g>\n", f);
}

int svgplot_render(const svgplot *p, char **svg, err *e) {
    *svg = NULL;
    if (!p->series || p->n_series <= 0) return err_set(e, "svgplot: no series to plot");
    double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
    for (int i = 0; i < p->n_series; i++) {
        const svgplot_series *s = &p->series[i];
        if (s->n > 0 && (!s->x || !s->y))
            return err_set(e, "svgplot: series %d (%s) has %zu points but no data", i,
                           s->name ? s->name : "unnamed", s->n);
        for (size_t k = 0; k < s->n; k++) {
            if (!isfinite(s->x[k]) || !isfinite(s->y[k])) continue;
            xmin = fmin(xmin, s->x[k]);
            xmax = fmax(xmax, s->x[k]);
            ymin = fmin(ymin, s->y[k]);
            ymax = fmax(ymax, s->y[k]);
        }
    }
    if (!isfinite(xmin)) return err_set(e, "svgplot: no series has a finite point");
    if (p->y_from_zero && ymin > 0) ymin = 0;

    int W = p->width > 0 ? p->width : 720, H = p->height > 0 ? p->height : 450;
    double xt[SVGPLOT_MAX_TICKS], yt[SVGPLOT_MAX_TICKS];
    int nx = svgplot_ticks(xmin, xmax, 8, xt, SVGPLOT_MAX_TICKS);
    int ny = svgplot_ticks(ymin, ymax, 7, yt, SVGPLOT_MAX_TICKS);
    if (nx < 2 || ny < 2) return err_set(e, "svgplot: cannot place ticks on the data's range");
    frame fr = {xt[0], xt[nx - 1], yt[0], yt[ny - 1], 72, p->title ? 40 : 16, 0, 0};
    fr.pw = W - fr.left - 24;
    fr.ph = H - fr.top - (p->x_label ? 58 : 36);
    if (fr.pw < 40 || fr.ph < 40) return err_set(e, "svgplot: %dx%d is too small a figure", W, H);

    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return err_errno(e, "svgplot: open_memstream");
    fprintf(f,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
            "viewBox=\"0 0 %d %d\" font-family=\"sans-serif\" font-size=\"12\">\n"
            "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
            W, H, W, H);
    if (p->title) {
        fprintf(f, "<text x=\"%.1f\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">",
                fr.left + fr.pw / 2);
        put_escaped(f, p->title);
        fputs("</text>\n", f);
    }
    char label[64];
    int xd = tick_decimals(xt[1] - xt[0]), yd = tick_decimals(yt[1] - yt[0]);
    fputs("<g class=\"grid\" stroke=\"#e5e5e5\" stroke-width=\"1\">\n", f);
    for (int i = 0; i < nx; i++)
        fprintf(f, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\"/>\n", px(&fr, xt[i]),
                fr.top, px(&fr, xt[i]), fr.top + fr.ph);
    for (int i = 0; i < ny; i++)
        fprintf(f, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\"/>\n", fr.left,
                py(&fr, yt[i]), fr.left + fr.pw, py(&fr, yt[i]));
    fputs("</g>\n<g class=\"ticks\">\n", f);
    for (int i = 0; i < nx; i++) {
        tick_label(label, sizeof label, xt[i], xd);
        fprintf(f, "<text x=\"%.2f\" y=\"%.2f\" text-anchor=\"middle\">%s</text>\n", px(&fr, xt[i]),
                fr.top + fr.ph + 18, label);
    }
    for (int i = 0; i < ny; i++) {
        tick_label(label, sizeof label, yt[i], yd);
        fprintf(f,
                "<text x=\"%.2f\" y=\"%.2f\" text-anchor=\"end\" dominant-baseline=\"middle\">"
                "%s</text>\n",
                fr.left - 8, py(&fr, yt[i]), label);
    }
    fputs("</g>\n", f);
    fprintf(f,
            "<rect class=\"axes\" x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" "
            "fill=\"none\" stroke=\"#333\"/>\n",
            fr.left, fr.top, fr.pw, fr.ph);
    if (p->x_label) {
        fprintf(f, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">", fr.left + fr.pw / 2,
                (double)H - 14);
        put_escaped(f, p->x_label);
        fputs("</text>\n", f);
    }
    if (p->y_label) {
        fprintf(f, "<text transform=\"translate(18,%.1f) rotate(-90)\" text-anchor=\"middle\">",
                fr.top + fr.ph / 2);
        put_escaped(f, p->y_label);
        fputs("</text>\n", f);
    }
    fputs("<g class=\"series\">\n", f);
    for (int i = 0; i < p->n_series; i++) draw_series(f, &fr, &p->series[i]);
    fputs("</g>\n", f);
    draw_legend(f, &fr, p);
    fputs("</svg>\n", f);
    if (fclose(f) != 0) {
        free(buf);
        return err_errno(e, "svgplot: writing the figure");
    }
    *svg = buf;
    return 0;
}

int svgplot_write(const svgplot *p, const char *path, err *e) {
    char *svg;
    if (svgplot_render(p, &svg, e) < 0) return err_wrap(e, "%s", path);
    int rc = fs_write_text(path, svg, e);
    free(svg);
    return rc;
}
