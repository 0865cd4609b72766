/* The shared machinery of the delta methods (layerwise.c, heads.c, subnet.c):
 * W_eff buffers, their materialisation from the peft params, weight gradients
 * through cblas_sgemm on whole or strided sub-blocks, sparse gradients, merge
 * and exact top-k selection. Contract in delta.h. */
#include "methods/delta.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/kernels.h"
#include "base/log.h"

int delta_init(delta_set *ds, const model_config *cfg, const model_weights *base, err *e) {
    memset(ds, 0, sizeof *ds);
    ds->cfg = cfg;
    ds->base = base;
    size_t n = (size_t)cfg->num_layers * LW_COUNT;
    ds->slot = malloc((n ? n : 1) * sizeof *ds->slot);
    if (!ds->slot) return err_set(e, "delta: out of memory for %zu weight slots", n);
    for (size_t i = 0; i < n; i++) ds->slot[i] = -1;
    return 0;
}

void delta_free(delta_set *ds) {
    for (int i = 0; i < ds->n; i++) {
        free(ds->entries[i].runs);
        free(ds->entries[i].idx);
        free(ds->entries[i].eff);
        free(ds->entries[i].wide);
    }
    free(ds->entries);
    free(ds->slot);
    free(ds->scratch);
    memset(ds, 0, sizeof *ds);
}

delta_entry *delta_find(delta_set *ds, int layer, int kind) {
    if (layer < 0 || layer >= ds->cfg->num_layers || kind < 0 || kind >= LW_COUNT) return NULL;
    int i = ds->slot[layer * LW_COUNT + kind];
    return i < 0 ? NULL : &ds->entries[i];
}

/* Registers an entry for (layer, kind) once its tensor exists. */
static delta_entry *add_entry(delta_set *ds, int layer, int kind, delta_layout layout, err *e) {
    const model_config *cfg = ds->cfg;
    char name[PEFT_NAME_MAX];
    if (layer < 0 || layer >= cfg->num_layers || kind < 0 || kind >= LW_COUNT) {
        err_set(e, "delta: no weight (layer %d, kind %d) in a model of %d layers", layer, kind,
                cfg->num_layers);
        return NULL;
    }
    model_weight_name(cfg, layer, kind, name, sizeof name);
    int rows, cols;
    kweight bw = model_weight_shape(cfg, layer, kind, &rows, &cols)
                     ? model_weights_get(ds->base, layer, kind)
                     : (kweight){NULL, NULL};
    if (!bw.f && !bw.h) {
        err_set(e, "delta: %s is absent from this model", name);
        return NULL;
    }
    if (ds->slot[layer * LW_COUNT + kind] >= 0) {
        err_set(e, "delta: %s is already trained by another delta", name);
        return NULL;
    }
    if (ds->n == ds->cap) {
        int cap = ds->cap ? 2 * ds->cap : 16;
        delta_entry *grown = realloc(ds->entries, (size_t)cap * sizeof *grown);
        if (!grown) {
            err_set(e, "delta: out of memory for %d entries", cap);
            return NULL;
        }
        ds->entries = grown;
        ds->cap = cap;
    }
    delta_entry *d = &ds->entries[ds->n];
    memset(d, 0, sizeof *d);
    d->layer = layer;
    d->kind = kind;
    d->layout = layout;
    d->rows = rows;
    d->cols = cols;
    d->tensor = -1;
    ds->slot[layer * LW_COUNT + kind] = ds->n++;
    ds->fresh = 0;
    return d;
}

/* Undoes the last add_entry when its tensor could not be declared. */
static void drop_last(delta_set *ds) {
    delta_entry *d = &ds->entries[--ds->n];
    ds->slot[d->layer * LW_COUNT + d->kind] = -1;
    free(d->runs);
    d->runs = NULL;
}

int delta_add_dense(delta_set *ds, peft *p, int layer, int kind, err *e) {
    delta_entry *d = add_entry(ds, layer, kind, DELTA_DENSE, e);
    if (!d) return -1;
    char wname[PEFT_NAME_MAX], name[PEFT_NAME_MAX + 8];
    model_weight_name(ds->cfg, layer, kind, wname, sizeof wname);
    snprintf(name, sizeof name, "%s.delta", wname);
    int64_t shape[2] = {d->rows, d->cols};
    int t = peft_add_tensor(p, name, d->cols == 1 ? 1 : 2, shape, e);
    if (t < 0) {
        drop_last(ds);
        return -1;
    }
    d->tensor = t;
    return 0;
}

int delta_add_blocks(delta_set *ds, peft *p, int layer, int kind, delta_layout layout, int block,
                     const int *blocks, int n_blocks, const char *name, err *e) {
    if (layout != DELTA_ROWS && layout != DELTA_COLS)
        return err_set(e, "delta: %s: blocks need DELTA_ROWS or DELTA_COLS", name);
    delta_entry *d = add_entry(ds, layer, kind, layout, e);
    if (!d) return -1;
    int extent = layout == DELTA_ROWS ? d->rows : d->cols;
    if (block <= 0 || n_blocks <= 0) {
        drop_last(ds);
        return err_set(e, "delta: %s: needs at least one block of at least one %s", name,
                       layout == DELTA_ROWS ? "row" : "column");
    }
    d->runs = malloc((size_t)n_blocks * sizeof *d->runs);
    if (!d->runs) {
        drop_last(ds);
        return err_set(e, "delta: %s: out of memory", name);
    }
    for (int b = 0; b < n_blocks; b++) {
        int w = blocks[b] * block;
        if (blocks[b] < 0 || w + block > extent || (b > 0 && blocks[b] <= blocks[b - 1])) {
            drop_last(ds);
            return err_set(e,
                           "delta: %s: block %d (of %d %s) is out of range or not ascending "
                           "for a weight of %d %s",
                           name, blocks[b], block, layout == DELTA_ROWS ? "rows" : "columns",
                           extent, layout == DELTA_ROWS ? "rows" : "columns");
        }
        /* Adjacent blocks form one run so that each run is one sgemm. */
        if (d->n_runs > 0 && d->runs[d->n_runs - 1].w + d->runs[d->n_runs - 1].len == w) {
            d->runs[d->n_runs - 1].len += block;
        } else {
            d->runs[d->n_runs++] = (delta_run){.w = w, .t = b * block, .len = block};
        }
    }
    d->span = n_blocks * block;
    int64_t shape[2];
    shape[0] = layout == DELTA_ROWS ? d->span : d->rows;
    shape[1] = layout == DELTA_ROWS ? d->cols : d->span;
    int t = peft_add_tensor(p, name, 2, shape, e);
    if (t < 0) {
        drop_last(ds);
        return -1;
    }
    d->tensor = t;
    return 0;
}

int delta_add_sparse(delta_set *ds, peft *p, int layer, int kind, size_t nnz, err *e) {
    delta_entry *d = add_entry(ds, layer, kind, DELTA_SPARSE, e);
    if (!d) return -1;
    char wname[PEFT_NAME_MAX], name[PEFT_NAME_MAX + 16];
    model_weight_name(ds->cfg, layer, kind, wname, sizeof wname);
    size_t numel = (size_t)d->rows * d->cols;
    if (nnz == 0 || nnz > numel || nnz > UINT32_MAX) {
        drop_last(ds);
        return err_set(e, "delta: %s: %zu trained entries of %zu is not a valid mask size", wname,
                       nnz, numel);
    }
    snprintf(name, sizeof name, "%s.sparse_values", wname);
    int64_t shape[1] = {(int64_t)nnz};
    int t = peft_add_tensor(p, name, 1, shape, e);
    if (t < 0) {
        drop_last(ds);
        return -1;
    }
    d->tensor = t;
    d->nnz = nnz;
    return 0;
}

void delta_set_indices(delta_set *ds, int i, uint32_t *idx) {
    free(ds->entries[i].idx);
    ds->entries[i].idx = idx;
    ds->entries[i].eff_base = 0; /* the old entries of eff hold base + delta */
    ds->fresh = 0;
}

int delta_reserve(delta_set *ds, int B, int T, err *e) {
    size_t widest = 0;
    for (int i = 0; i < ds->n; i++) {
        const delta_entry *d = &ds->entries[i];
        if (d->layout == DELTA_SPARSE && (size_t)d->rows + d->cols > widest)
            widest = (size_t)d->rows + d->cols;
    }
    if (B > ds->B) ds->B = B;
    if (T > ds->T) ds->T = T;
    size_t need = widest * (size_t)ds->B * (size_t)ds->T;
    if (need <= ds->scratch_cap) return 0;
    float *s = realloc(ds->scratch, need * sizeof *s);
    if (!s) return err_set(e, "delta: out of memory for %zu floats of gradient scratch", need);
    ds->scratch = s;
    ds->scratch_cap = need;
    return 0;
}

/* The delta d (params t) on the base: w = base + t at every entry the delta
 * covers (with base == w: w += t, the merge). Positions it does not cover
 * are left alone, so that a refresh rewrites only them. */
static void apply_delta(const delta_entry *d, const float *base, const float *t, float *w) {
    size_t cols = (size_t)d->cols;
    switch (d->layout) {
    case DELTA_DENSE:
        for (size_t i = 0, n = (size_t)d->rows * cols; i < n; i++) w[i] = base[i] + t[i];
        break;
    case DELTA_ROWS:
        for (int r = 0; r < d->n_runs; r++) {
            const delta_run *u = &d->runs[r];
            size_t at = (size_t)u->w * cols, from = (size_t)u->t * cols;
            for (size_t i = 0, n = (size_t)u->len * cols; i < n; i++)
                w[at + i] = base[at + i] + t[from + i];
        }
        break;
    case DELTA_COLS:
        for (int i = 0; i < d->rows; i++)
            for (int r = 0; r < d->n_runs; r++) {
                const delta_run *u = &d->runs[r];
                size_t at = (size_t)i * cols + u->w, from = (size_t)i * d->span + u->t;
                for (int c = 0; c < u->len; c++) w[at + c] = base[at + c] + t[from + c];
            }
        break;
    case DELTA_SPARSE:
        if (d->idx)
            for (size_t k = 0; k < d->nnz; k++) w[d->idx[k]] = base[d->idx[k]] + t[k];
        break;
    }
}

void delta_refresh(delta_set *ds, peft *p) {
    for (int i = 0; i < ds->n; i++) {
        delta_entry *d = &ds->entries[i];
        size_t numel = (size_t)d->rows * d->cols;
        const float *base = ds->base->layer[d->layer][d->kind];
        /* A BF16 base (BF16 compute): the delta adds to its exact F32
         * value, kept widened beside eff; the product then runs in F32. */
        if (!base && !d->wide && (d->wide = malloc(numel * sizeof *d->wide)))
            model_weights_read_f32(ds->base, d->layer, d->kind, d->wide, numel);
        if (!base) base = d->wide;
        if (!base || (!d->eff && !(d->eff = malloc(numel * sizeof *d->eff)))) {
            char name[PEFT_NAME_MAX];
            model_weight_name(ds->cfg, d->layer, d->kind, name, sizeof name);
            log_error("delta: out of memory for the effective weight of %s (%zu floats)", name,
                      numel);
            ds->fresh = 0;
            return;
        }
        /* The whole weight is copied once; afterwards only the delta's
         * entries change (a sparse mask touches a small part of it). */
        if (!d->eff_base) {
            memcpy(d->eff, base, numel * sizeof *d->eff);
            d->eff_base = 1;
        }
        apply_delta(d, base, peft_param(p, d->tensor), d->eff);
    }
    ds->fresh = 1;
}

const float *delta_weight(delta_set *ds, int layer, int kind) {
    delta_entry *d = delta_find(ds, layer, kind);
    return d && ds->fresh ? d->eff : NULL;
}

void delta_merge(delta_set *ds, peft *p, int layer, int kind, float *w) {
    delta_entry *d = delta_find(ds, layer, kind);
    if (d) apply_delta(d, w, peft_param(p, d->tensor), w);
}

/* out (cols, rows) = in (rows, cols) transposed, in cache-sized tiles. */
static void transpose(const float *in, float *out, size_t rows, size_t cols) {
    const size_t tile = 32;
    for (size_t i0 = 0; i0 < rows; i0 += tile)
        for (size_t j0 = 0; j0 < cols; j0 += tile)
            for (size_t i = i0; i < i0 + tile && i < rows; i++)
                for (size_t j = j0; j < j0 + tile && j < cols; j++)
                    out[j * rows + i] = in[i * cols + j];
}

/* Gradients at the entries of a sparse mask, one dot over tokens per entry:
 * dy and x are transposed once so that each dot reads two contiguous rows. */
static void sparse_backward(delta_set *ds, const delta_entry *d, const float *x, const float *dy,
                            int n, float *g) {
    size_t out = (size_t)d->rows, in = (size_t)d->cols, nt = (size_t)n;
    int is_norm = d->kind == LW_INPUT_NORM || d->kind == LW_POST_NORM;
    size_t need = (out + (is_norm ? out : in)) * nt;
    if (need > ds->scratch_cap) {
        /* Only when the model runs more tokens than it reserved for. */
        float *s = realloc(ds->scratch, need * sizeof *s);
        if (!s) {
            log_error("delta: out of memory for %zu floats of sparse-gradient scratch", need);
            abort();
        }
        ds->scratch = s;
        ds->scratch_cap = need;
    }
    float *dyT = ds->scratch, *xT = ds->scratch + out * nt;
    transpose(dy, dyT, nt, out);
    if (is_norm) {
        transpose(x, xT, nt, out);
        for (size_t k = 0; k < d->nnz; k++) {
            size_t c = d->idx[k];
            g[k] += cblas_sdot(n, dyT + c * nt, 1, xT + c * nt, 1);
        }
        return;
    }
    transpose(x, xT, nt, in);
    for (size_t k = 0; k < d->nnz; k++) {
        size_t i = d->idx[k] / in, j = d->idx[k] % in;
        g[k] += cblas_sdot(n, dyT + i * nt, 1, xT + j * nt, 1);
    }
}

void delta_dense_grad(const delta_entry *d, const float *x, const float *dy, int n, float *g) {
    int out = d->rows, in = d->cols;
    if (in > 1) { /* dW (out,in) += dy^T x, on the thread team (kernels.h) */
        linear_backward(NULL, g, NULL, dy, x, NULL, n, in, out);
        return;
    }
    for (int t = 0; t < n; t++) { /* a norm weight (x given) or a bias (x NULL) */
        const float *dyt = dy + (size_t)t * out;
        if (x) {
            const float *xt = x + (size_t)t * out;
            for (int c = 0; c < out; c++) g[c] += dyt[c] * xt[c];
        } else {
            for (int c = 0; c < out; c++) g[c] += dyt[c];
        }
    }
}

/* The gradient of one entry's delta from the input x (n,cols) and output
 * gradient dy (n,rows) of its weight; x is NULL for a bias. */
static void entry_backward(delta_set *ds, peft *p, const delta_entry *d, const float *x,
                           const float *dy, int n) {
    float *g = peft_grad(p, d->tensor);
    int out = d->rows, in = d->cols;
    switch (d->layout) {
    case DELTA_DENSE:
        delta_dense_grad(d, x, dy, n, g);
        break;
    case DELTA_ROWS: /* rows w..w+len of dW, from the matching columns of dy */
        for (int r = 0; r < d->n_runs; r++) {
            const delta_run *u = &d->runs[r];
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, u->len, in, n, 1.0f, dy + u->w,
                        out, x, in, 1.0f, g + (size_t)u->t * in, in);
        }
        break;
    case DELTA_COLS: /* columns w..w+len of dW, from the matching columns of x */
        for (int r = 0; r < d->n_runs; r++) {
            const delta_run *u = &d->runs[r];
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, u->len, n, 1.0f, dy, out,
                        x + u->w, in, 1.0f, g + u->t, d->span);
        }
        break;
    case DELTA_SPARSE:
        if (!d->idx) break; /* mask not chosen yet */
        if (x) {
            sparse_backward(ds, d, x, dy, n, g);
        } else {
            for (size_t k = 0; k < d->nnz; k++)
                for (int t = 0; t < n; t++) g[k] += dy[(size_t)t * out + d->idx[k]];
        }
        break;
    }
}

void delta_backward(delta_set *ds, peft *p, int layer, int kind, const float *x, const float *dy,
                    int n) {
    if (n <= 0) return;
    const delta_entry *d = delta_find(ds, layer, kind);
    if (d) entry_backward(ds, p, d, x, dy, n);
    int bias = model_bias_kind(kind);
    if (bias >= 0 && (d = delta_find(ds, layer, bias))) entry_backward(ds, p, d, NULL, dy, n);
}

/* |v| as an unsigned key whose order is the order of the magnitudes: the bits
 * of a non-negative IEEE float compare like the floats themselves. */
static inline uint32_t mag_key(float v) {
    float a = fabsf(v);
    uint32_t u;
    memcpy(&u, &a, sizeof u);
    return u;
}

void delta_select_largest(const float *v, size_t n, size_t k, uint32_t *idx) {
    if (k == 0) return;
    if (k > n) k = n;
    /* Radix select, most significant byte first: find the key of the k-th
     * largest entry in four counting passes, without sorting. */
    uint32_t prefix = 0, mask = 0;
    size_t remaining = k; /* how many of the keys matching prefix/mask still to take */
    for (int shift = 24; shift >= 0; shift -= 8) {
        size_t hist[256] = {0};
        for (size_t i = 0; i < n; i++) {
            uint32_t key = mag_key(v[i]);
            if ((key & mask) == prefix) hist[(key >> shift) & 255]++;
        }
        int b = 255;
        for (; b > 0 && hist[b] < remaining; b--) remaining -= hist[b];
        prefix |= (uint32_t)b << shift;
        mask |= 255u << shift;
    }
    /* prefix is the k-th largest key: everything above it is in, and the
     * first `remaining` entries equal to it by index. */
    size_t out = 0;
    for (size_t i = 0; i < n && out < k; i++) {
        uint32_t key = mag_key(v[i]);
        if (key > prefix) {
            idx[out++] = (uint32_t)i;
        } else if (key == prefix && remaining > 0) {
            idx[out++] = (uint32_t)i;
            remaining--;
        }
    }
}

int delta_calibrate(delta_set *ds, model *m, peft_batch_fn fn, void *ctx, int batches,
                    void (*after)(void *arg), void *arg, err *e) {
    if (batches < 1) return err_set(e, "calibration needs at least one batch, got %d", batches);
    if (ds->B <= 0 || ds->T <= 0)
        return err_set(e, "no batch shape to calibrate with: create the model over the method "
                          "before calibrating");
    size_t n = (size_t)ds->B * ds->T;
    int32_t *tokens = malloc(n * sizeof *tokens), *labels = malloc(n * sizeof *labels);
    int rc = 0;
    if (!tokens || !labels) {
        rc = err_set(e, "out of memory for a calibration batch of %zu tokens", n);
        goto out;
    }
    for (int i = 0; i < batches; i++) {
        if (fn(ctx, i, tokens, labels, e) < 0) {
            rc = err_wrap(e, "calibration batch %d", i);
            goto out;
        }
        long n_tokens = 0;
        model_forward(m, tokens, labels, ds->B, ds->T, &n_tokens);
        if (n_tokens <= 0) continue;
        /* The mean loss, so that batches weigh alike whatever their length. */
        model_backward(m, 1.0f / (float)n_tokens);
        after(arg);
    }
out:
    free(tokens);
    free(labels);
    return rc;
}

/* ---- hooks shared by the delta methods ---------------------------------- */

delta_set *delta_of(peft *p) {
    return p->state;
}

void delta_method_init(peft *p, uint64_t seed) {
    (void)seed;
    for (int i = 0; i < p->n_tensors; i++)
        memset(peft_param(p, i), 0, p->tensors[i].numel * sizeof(float));
}

void delta_method_refresh(peft *p) {
    delta_refresh(delta_of(p), p);
}

int delta_method_reserve(peft *p, int B, int T, err *e) {
    return delta_reserve(delta_of(p), B, T, e);
}

const float *delta_method_weight(peft *p, int layer, int kind) {
    return delta_weight(delta_of(p), layer, kind);
}

void delta_method_merge(peft *p, int layer, int kind, float *w) {
    delta_merge(delta_of(p), p, layer, kind, w);
}

void delta_method_linear_backward(peft *p, int layer, int kind, const float *x, const float *dy,
                                  float *dx, int n) {
    (void)dx;
    delta_backward(delta_of(p), p, layer, kind, x, dy, n);
}
