/* Tests of common/model/kernels.c: each backward against central finite
 * differences of its forward on small random inputs, forwards against
 * direct double-precision formulas, and the numerically delicate cases
 * (large scores and logits, ignored labels, causal blocks, rope scaling).
 *
 * Finite differences: the scalar probed is L = sum(out * R) for a fixed
 * random R, accumulated in double; inputs are O(1) and the step is
 * h = 1e-2. In float32 the forward's rounding (~6e-8 relative per element)
 * puts ~1e-5 of noise on (L(x+h) - L(x-h)) / 2h and the truncation error is
 * h^2/6 * L''' ~ 1e-5, so a correct backward agrees to ~1e-4 of the largest
 * gradient entry (observed: at most 3e-4, on prefix rows whose gradients are
 * small); FD_TOL = 2e-3 of it is asserted, while a wrong term (a missing
 * factor, a sign, a masked entry) costs O(1). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "model/kernels.h"

#define FD_H 1e-2f
#define FD_TOL 2e-3

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

/* Uniform in [-1, 1), xorshift64*: deterministic across runs. */
static float urand(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * 0x2545F4914F6CDD1DULL;
    return (float)((double)(r >> 40) / (double)(1ULL << 24) * 2.0 - 1.0);
}

static float *rnd(size_t n, float scale) {
    float *x = malloc(n * sizeof *x);
    assert_non_null(x);
    for (size_t i = 0; i < n; i++) x[i] = scale * urand();
    return x;
}

static float *zeros(size_t n) {
    float *x = calloc(n ? n : 1, sizeof *x);
    assert_non_null(x);
    return x;
}

static double dot(const float *a, const float *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

/* The forward of a test case as a scalar of its inputs. */
typedef double (*loss_fn)(void *ctx);

/* Compares the analytic gradient g of loss with respect to x (n entries)
 * with central differences on every entry (or on `probe` spread entries
 * when probe > 0), prints the worst error and asserts it. */
static void check_grad(const char *what, float *x, const float *g, size_t n, loss_fn loss,
                       void *ctx, size_t probe) {
    double worst = 0.0, gmax = 0.0;
    for (size_t i = 0; i < n; i++) gmax = fmax(gmax, fabs(g[i]));
    size_t step = probe && probe < n ? n / probe : 1;
    for (size_t i = 0; i < n; i += step) {
        float keep = x[i];
        x[i] = keep + FD_H;
        double lp = loss(ctx);
        x[i] = keep - FD_H;
        double lm = loss(ctx);
        x[i] = keep;
        double num = (lp - lm) / (2.0 * FD_H);
        worst = fmax(worst, fabs(num - g[i]));
    }
    loss(ctx); /* leaves the outputs of the unperturbed inputs for later checks */
    printf("  %-28s max|grad| %.3e  worst fd error %.3e (%.2e relative)\n", what, gmax, worst,
           worst / fmax(gmax, 1e-30));
    assert_true(gmax > 1e-6); /* a vanishing gradient would make the check vacuous */
    assert_true(worst <= FD_TOL * gmax);
}

/* ---- linear ------------------------------------------------------------------ */

typedef struct {
    int N, C, OC;
    float *inp, *w, *b, *out, *r;
} linear_ctx;

static double linear_loss(void *p) {
    linear_ctx *c = p;
    linear_forward(c->out, c->inp, c->w, c->b, c->N, c->C, c->OC);
    return dot(c->out, c->r, (size_t)c->N * c->OC);
}

static void test_linear(void **state) {
    (void)state;
    linear_ctx c = {.N = 5, .C = 7, .OC = 6};
    c.inp = rnd(35, 1), c.w = rnd(42, 1), c.b = rnd(6, 1), c.out = zeros(30), c.r = rnd(30, 1);
    linear_loss(&c);
    for (int i = 0; i < c.N; i++)
        for (int o = 0; o < c.OC; o++) {
            double s = c.b[o];
            for (int k = 0; k < c.C; k++) s += (double)c.inp[i * c.C + k] * c.w[o * c.C + k];
            assert_float_equal(c.out[i * c.OC + o], s, 1e-5);
        }
    float *dinp = zeros(35), *dw = zeros(42), *db = zeros(6);
    linear_backward(dinp, dw, db, c.r, c.inp, c.w, c.N, c.C, c.OC);
    check_grad("linear dinp", c.inp, dinp, 35, linear_loss, &c, 0);
    check_grad("linear dweight", c.w, dw, 42, linear_loss, &c, 0);
    check_grad("linear dbias", c.b, db, 6, linear_loss, &c, 0);
    /* Backward accumulates: a second call doubles, NULL outputs are skipped. */
    float before = dw[3];
    linear_backward(NULL, dw, NULL, c.r, c.inp, c.w, c.N, c.C, c.OC);
    assert_float_equal(dw[3], 2 * before, 1e-5);
    /* Without a bias the output is x W^T alone. */
    float *bias = c.b;
    c.b = NULL;
    float *dinp2 = zeros(35);
    linear_backward(dinp2, NULL, NULL, c.r, c.inp, c.w, c.N, c.C, c.OC);
    check_grad("linear (no bias) dinp", c.inp, dinp2, 35, linear_loss, &c, 0);
    free(dinp2), free(dinp), free(dw), free(db), free(bias);
    free(c.inp), free(c.w), free(c.out), free(c.r);
}

/* ---- low-rank branch (LoRA's) --------------------------------------------------- */

typedef struct {
    int N, in, r, out;
    float scale;
    float *x, *a, *b, *y0, *y, *h, *rr;
} lowrank_ctx;

static double lowrank_loss(void *p) {
    lowrank_ctx *c = p;
    memcpy(c->y, c->y0, (size_t)c->N * c->out * sizeof *c->y);
    lowrank_forward(c->y, c->h, c->x, c->a, c->b, c->scale, c->N, c->in, c->r, c->out);
    return dot(c->y, c->rr, (size_t)c->N * c->out);
}

static void test_lowrank(void **state) {
    (void)state;
    /* N * r * (in + out) is 2^21 multiply-adds: the forward's rows go in 2
     * parts, one of them short (N is no multiple of 16). */
    lowrank_ctx c = {.N = 333, .in = 500, .r = 8, .out = 484, .scale = 0.5f};
    size_t nx = (size_t)c.N * c.in, ny = (size_t)c.N * c.out;
    c.x = rnd(nx, 1), c.a = rnd((size_t)c.r * c.in, 0.1f), c.b = rnd((size_t)c.out * c.r, 0.1f);
    c.y0 = rnd(ny, 1), c.y = zeros(ny), c.h = zeros((size_t)c.N * c.r), c.rr = rnd(ny, 1);
    lowrank_loss(&c);
    /* y = y0 + scale (x a^T) b^T, against a double evaluation. */
    double worst = 0.0;
    for (int i = 0; i < c.N; i++) {
        double hd[8];
        for (int k = 0; k < c.r; k++)
            hd[k] = dot(c.x + (size_t)i * c.in, c.a + (size_t)k * c.in, c.in);
        for (int o = 0; o < c.out; o++) {
            double s = c.y0[(size_t)i * c.out + o];
            for (int k = 0; k < c.r; k++) s += c.scale * hd[k] * c.b[(size_t)o * c.r + k];
            worst = fmax(worst, fabs(c.y[(size_t)i * c.out + o] - s));
        }
    }
    printf("  lowrank forward worst error %.2e\n", worst);
    assert_true(worst < 1e-4);
    /* The backward: da, db and dx against finite differences; g = dy b. */
    float *da = zeros((size_t)c.r * c.in), *db = zeros((size_t)c.out * c.r), *dx = zeros(nx);
    float *g = zeros((size_t)c.N * c.r);
    lowrank_backward(da, db, dx, g, c.rr, c.x, c.h, c.a, c.b, c.scale, c.N, c.in, c.r, c.out);
    check_grad("lowrank da", c.a, da, (size_t)c.r * c.in, lowrank_loss, &c, 200);
    check_grad("lowrank db", c.b, db, (size_t)c.out * c.r, lowrank_loss, &c, 200);
    check_grad("lowrank dx", c.x, dx, nx, lowrank_loss, &c, 200);
    /* It accumulates into da, db, dx; without dx only those two move. */
    float before = da[5], before_b = db[7];
    lowrank_backward(da, db, NULL, g, c.rr, c.x, c.h, c.a, c.b, c.scale, c.N, c.in, c.r, c.out);
    assert_float_equal(da[5], 2 * before, 1e-4 * fabs(before) + 1e-6);
    assert_float_equal(db[7], 2 * before_b, 1e-4 * fabs(before_b) + 1e-6);
    free(da), free(db), free(dx), free(g);
    free(c.x), free(c.a), free(c.b), free(c.y0), free(c.y), free(c.h), free(c.rr);
}

/* ---- RMSNorm (normalisation, then the per-channel weight) -------------------- */

typedef struct {
    int N, C;
    float eps;
    float *inp, *w, *out, *rstd, *r;
} norm_ctx;

static double norm_loss(void *p) {
    norm_ctx *c = p;
    rmsnorm_forward(c->out, c->rstd, c->inp, c->w, c->N, c->C, c->eps);
    return dot(c->out, c->r, (size_t)c->N * c->C);
}

static void test_rmsnorm(void **state) {
    (void)state;
    norm_ctx c = {.N = 4, .C = 9, .eps = 1e-5f};
    size_t n = 36;
    c.inp = rnd(n, 1), c.w = rnd(9, 1), c.out = zeros(n), c.rstd = zeros(4), c.r = rnd(n, 1);
    for (int k = 0; k < 9; k++) c.w[k] += 1.0f;
    norm_loss(&c);
    for (int i = 0; i < c.N; i++) {
        double ss = 0;
        for (int k = 0; k < c.C; k++) ss += (double)c.inp[i * c.C + k] * c.inp[i * c.C + k];
        double r = 1.0 / sqrt(ss / c.C + c.eps);
        assert_float_equal(c.rstd[i], r, 1e-5 * r);
        for (int k = 0; k < c.C; k++)
            assert_float_equal(c.out[i * c.C + k], c.inp[i * c.C + k] * r * c.w[k], 1e-5);
    }
    /* The model's decomposition: xhat, dxhat through the weight, then the rest. */
    float *xhat = zeros(n), *dxhat = zeros(n), *dinp = zeros(n), *dw = zeros(9);
    rmsnorm_normalize(xhat, c.inp, c.rstd, c.N, c.C);
    scale_backward(dxhat, dw, c.r, xhat, c.w, c.N, c.C);
    rmsnorm_backward(dinp, dxhat, xhat, c.rstd, c.N, c.C);
    check_grad("rmsnorm dinp", c.inp, dinp, n, norm_loss, &c, 0);
    check_grad("rmsnorm dweight", c.w, dw, 9, norm_loss, &c, 0);
    /* scale_forward of xhat rebuilds the norm's output, as the backward does. */
    float *again = zeros(n);
    scale_forward(again, xhat, c.w, c.N, c.C);
    for (size_t i = 0; i < n; i++) assert_float_equal(again[i], c.out[i], 1e-6);
    free(again), free(xhat), free(dxhat), free(dinp), free(dw);
    free(c.inp), free(c.w), free(c.out), free(c.rstd), free(c.r);
}

/* ---- embedding ------------------------------------------------------------------ */

typedef struct {
    int N, C;
    const int32_t *tok;
    float *table, *out, *r;
} emb_ctx;

static double emb_loss(void *p) {
    emb_ctx *c = p;
    embedding_forward(c->out, c->tok, c->table, c->N, c->C);
    return dot(c->out, c->r, (size_t)c->N * c->C);
}

static void test_embedding(void **state) {
    (void)state;
    static const int32_t tok[6] = {3, 0, 3, 5, 1, 3}; /* repeats must add up */
    emb_ctx c = {.N = 6, .C = 4, .tok = tok};
    c.table = rnd(24, 1), c.out = zeros(24), c.r = rnd(24, 1);
    emb_loss(&c);
    assert_memory_equal(c.out + 4, c.table, 4 * sizeof(float));
    assert_memory_equal(c.out + 12, c.table + 20, 4 * sizeof(float));
    float *dt = zeros(24);
    embedding_backward(dt, c.r, tok, c.N, c.C);
    check_grad("embedding dtable", c.table, dt, 24, emb_loss, &c, 0);
    for (int k = 0; k < 4; k++) assert_float_equal(dt[2 * 4 + k], 0.0f, 0.0f); /* unused row */
    free(dt), free(c.table), free(c.out), free(c.r);
}

/* ---- rotary embeddings ---------------------------------------------------------- */

typedef struct {
    int B, T, H, D, pos0;
    const float *cos_t, *sin_t;
    float *inp, *out, *r;
} rope_ctx;

static double rope_loss(void *p) {
    rope_ctx *c = p;
    rope_forward(c->out, c->inp, c->cos_t, c->sin_t, c->B, c->T, c->H, c->D, c->pos0);
    return dot(c->out, c->r, (size_t)c->B * c->T * c->H * c->D);
}

static model_config rope_cfg(int D, rope_scaling_type type) {
    model_config cfg = {0};
    cfg.head_dim = D;
    cfg.rope_theta = 10000.0f;
    cfg.rope_scaling = type;
    cfg.rope_factor = 8.0f;
    cfg.rope_low_freq_factor = 1.0f;
    cfg.rope_high_freq_factor = 4.0f;
    cfg.rope_original_max_position_embeddings = 64;
    return cfg;
}

/* Inverse frequency i of Hugging Face's rules, written out independently. */
static double expected_inv_freq(const model_config *cfg, int i) {
    double inv = 1.0 / pow(cfg->rope_theta, (2.0 * i) / cfg->head_dim);
    if (cfg->rope_scaling == ROPE_LINEAR) return inv / cfg->rope_factor;
    if (cfg->rope_scaling != ROPE_LLAMA3) return inv;
    double lam = 2 * M_PI / inv, old = cfg->rope_original_max_position_embeddings;
    if (lam < old / cfg->rope_high_freq_factor) return inv;
    if (lam > old / cfg->rope_low_freq_factor) return inv / cfg->rope_factor;
    double s = (old / lam - cfg->rope_low_freq_factor) /
               (cfg->rope_high_freq_factor - cfg->rope_low_freq_factor);
    return (1 - s) * inv / cfg->rope_factor + s * inv;
}

static void test_rope_tables(void **state) {
    (void)state;
    enum { D = 16, NPOS = 40 };
    float cs[NPOS * D / 2], sn[NPOS * D / 2];
    int regimes[3] = {0, 0, 0}; /* llama3: kept, smoothed, divided */
    for (int type = ROPE_NONE; type <= ROPE_LLAMA3; type++) {
        model_config cfg = rope_cfg(D, (rope_scaling_type)type);
        rope_init(cs, sn, NPOS, &cfg);
        for (int i = 0; i < D / 2; i++) {
            double inv = expected_inv_freq(&cfg, i), base = 1.0 / pow(10000.0, 2.0 * i / D);
            if (type == ROPE_LLAMA3) {
                double ratio = inv / base;
                regimes[ratio > 0.999 ? 0 : ratio < 1.0 / 8 + 1e-9 ? 2 : 1]++;
            }
            for (int pos = 0; pos < NPOS; pos++) {
                assert_float_equal(cs[pos * D / 2 + i], cos(pos * inv), 1e-6);
                assert_float_equal(sn[pos * D / 2 + i], sin(pos * inv), 1e-6);
            }
        }
    }
    /* The fixture's parameters reach every regime of the llama3 rule. */
    assert_true(regimes[0] > 0 && regimes[1] > 0 && regimes[2] > 0);
    /* Linear scaling is the unscaled table at pos / factor. */
    model_config lin = rope_cfg(D, ROPE_LINEAR), none = rope_cfg(D, ROPE_NONE);
    float cs2[NPOS * D / 2], sn2[NPOS * D / 2];
    rope_init(cs, sn, NPOS, &lin);
    rope_init(cs2, sn2, NPOS, &none);
    for (int i = 0; i < D / 2; i++)
        assert_float_equal(cs[32 * D / 2 + i], cs2[4 * D / 2 + i], 1e-6);
}

static void test_rope(void **state) {
    (void)state;
    enum { D = 8, NPOS = 20 };
    float cs[NPOS * D / 2], sn[NPOS * D / 2];
    model_config cfg = rope_cfg(D, ROPE_LLAMA3);
    rope_init(cs, sn, NPOS, &cfg);
    rope_ctx c = {.B = 2, .T = 5, .H = 3, .D = D, .pos0 = 3, .cos_t = cs, .sin_t = sn};
    size_t n = 2 * 5 * 3 * D;
    c.inp = rnd(n, 1), c.out = zeros(n), c.r = rnd(n, 1);
    rope_loss(&c);
    /* rotate_half pairs i with i + D/2 and keeps each pair's length. */
    for (size_t row = 0; row < n / D; row++)
        for (int i = 0; i < D / 2; i++) {
            const float *x = c.inp + row * D, *y = c.out + row * D;
            assert_float_equal(hypot(y[i], y[i + D / 2]), hypot(x[i], x[i + D / 2]), 1e-5);
        }
    /* Position 0 is the identity. */
    float *y0 = zeros(3 * D);
    rope_forward(y0, c.inp, cs, sn, 1, 1, 3, D, 0);
    assert_memory_equal(y0, c.inp, 3 * D * sizeof(float));
    float *din = zeros(n);
    rope_backward(din, c.r, cs, sn, c.B, c.T, c.H, D, c.pos0);
    check_grad("rope dinp", c.inp, din, n, rope_loss, &c, 0);
    /* In place equals out of place. */
    float *copy = zeros(n);
    memcpy(copy, c.inp, n * sizeof(float));
    rope_forward(copy, copy, cs, sn, c.B, c.T, c.H, D, c.pos0);
    assert_memory_equal(copy, c.out, n * sizeof(float));
    free(y0), free(copy), free(din), free(c.inp), free(c.out), free(c.r);
}

/* ---- attention ------------------------------------------------------------------- */

typedef struct {
    int B, T, P, Hq, Hkv, D;
    float *q, *k, *v, *kp, *vp, *out, *r, *scratch;
    size_t pstride;
} att_ctx;

static double att_loss(void *p) {
    att_ctx *c = p;
    attention_forward(c->out, c->scratch, c->q, c->k, c->v, c->kp, c->vp, c->pstride, c->B, c->T,
                      c->P, c->Hq, c->Hkv, c->D);
    return dot(c->out, c->r, (size_t)c->B * c->T * c->Hq * c->D);
}

/* The textbook attention in double: out (B,T,Hq,D). */
static void att_reference(const att_ctx *c, double *out) {
    int S = c->P + c->T, group = c->Hq / c->Hkv;
    double *s = malloc((size_t)S * sizeof *s);
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->Hq; h++)
            for (int t = 0; t < c->T; t++) {
                int g = h / group, n = c->P + t + 1;
                const float *qr = c->q + (((size_t)b * c->T + t) * c->Hq + h) * c->D;
                double m = -INFINITY, sum = 0;
                for (int j = 0; j < n; j++) {
                    const float *kr =
                        j < c->P ? c->kp + j * c->pstride + g * c->D
                                 : c->k + (((size_t)b * c->T + j - c->P) * c->Hkv + g) * c->D;
                    s[j] = 0;
                    for (int d = 0; d < c->D; d++) s[j] += (double)qr[d] * kr[d];
                    s[j] /= sqrt(c->D);
                    m = fmax(m, s[j]);
                }
                for (int j = 0; j < n; j++) sum += s[j] = exp(s[j] - m);
                double *o = out + (((size_t)b * c->T + t) * c->Hq + h) * c->D;
                for (int d = 0; d < c->D; d++) o[d] = 0;
                for (int j = 0; j < n; j++) {
                    const float *vr =
                        j < c->P ? c->vp + j * c->pstride + g * c->D
                                 : c->v + (((size_t)b * c->T + j - c->P) * c->Hkv + g) * c->D;
                    for (int d = 0; d < c->D; d++) o[d] += s[j] / sum * vr[d];
                }
            }
    free(s);
}

/* Forward against the reference, then every gradient by finite
 * differences (on `probe` entries per tensor; 0: all). The prefix rows sit
 * in a wider table (stride > Hkv*D), as prefix.c lays them out. */
static void attention_case(const char *name, int B, int T, int P, int Hq, int Hkv, int D,
                           size_t probe) {
    att_ctx c = {.B = B, .T = T, .P = P, .Hq = Hq, .Hkv = Hkv, .D = D};
    size_t nq = (size_t)B * T * Hq * D, nk = (size_t)B * T * Hkv * D, kvd = (size_t)Hkv * D;
    c.pstride = 3 * kvd;
    c.q = rnd(nq, 1.5f), c.k = rnd(nk, 1.5f), c.v = rnd(nk, 1);
    c.kp = P ? rnd(P * c.pstride, 1.5f) : NULL;
    c.vp = P ? c.kp + kvd : NULL;
    c.out = zeros(nq), c.r = rnd(nq, 1);
    c.scratch = zeros(2 * (size_t)T * (P + T));
    att_loss(&c);
    double *ref = malloc(nq * sizeof *ref), worst = 0;
    att_reference(&c, ref);
    for (size_t i = 0; i < nq; i++) worst = fmax(worst, fabs(ref[i] - c.out[i]));
    printf("  %s: forward worst |c - ref| %.2e\n", name, worst);
    assert_true(worst < 1e-5);

    float *dq = zeros(nq), *dk = zeros(nk), *dv = zeros(nk);
    float *dkp = zeros(P * kvd), *dvp = zeros(P * kvd);
    attention_backward(dq, dk, dv, P ? dkp : NULL, P ? dvp : NULL, kvd, c.scratch, c.r, c.q, c.k,
                       c.v, c.kp, c.vp, c.pstride, B, T, P, Hq, Hkv, D);
    char what[64];
    snprintf(what, sizeof what, "%s dq", name);
    check_grad(what, c.q, dq, nq, att_loss, &c, probe);
    snprintf(what, sizeof what, "%s dk", name);
    check_grad(what, c.k, dk, nk, att_loss, &c, probe);
    snprintf(what, sizeof what, "%s dv", name);
    check_grad(what, c.v, dv, nk, att_loss, &c, probe);
    if (P) {
        /* Gradients of the strided prefix rows, gathered to (P, Hkv*D). */
        float *gk = zeros(P * c.pstride), *gv = zeros(P * c.pstride);
        for (int j = 0; j < P; j++) {
            memcpy(gk + j * c.pstride, dkp + j * kvd, kvd * sizeof(float));
            memcpy(gv + j * c.pstride + kvd, dvp + j * kvd, kvd * sizeof(float));
        }
        snprintf(what, sizeof what, "%s dkp", name);
        for (int j = 0; j < P; j++)
            check_grad(what, c.kp + j * c.pstride, gk + j * c.pstride, kvd, att_loss, &c, 0);
        snprintf(what, sizeof what, "%s dvp", name);
        for (int j = 0; j < P; j++)
            check_grad(what, c.kp + j * c.pstride + kvd, gv + j * c.pstride + kvd, kvd, att_loss,
                       &c, 0);
        free(gk), free(gv);
    }
    free(ref), free(dq), free(dk), free(dv), free(dkp), free(dvp);
    free(c.q), free(c.k), free(c.v), free(c.kp), free(c.out), free(c.r), free(c.scratch);
}

static void test_attention(void **state) {
    (void)state;
    attention_case("attention mha", 2, 5, 0, 2, 2, 4, 0);
    attention_case("attention gqa", 2, 5, 0, 4, 2, 4, 0);
    attention_case("attention gqa+prefix", 2, 6, 2, 4, 2, 4, 0);
    attention_case("attention mqa+prefix", 1, 4, 3, 3, 1, 6, 0);
    /* Longer than one causal block (32 rows up to T=256, 64 beyond): the
     * blocked products must agree, including a partial last block. */
    attention_case("attention 32-blocks+prefix", 1, 130, 2, 2, 1, 4, 97);
    attention_case("attention 64-blocks+prefix", 1, 300, 1, 2, 1, 4, 61);
}

static void test_attention_stable(void **state) {
    (void)state;
    /* Scores of order 1e4: a softmax without the max subtraction overflows. */
    int B = 1, T = 4, Hq = 2, Hkv = 1, D = 4;
    size_t nq = (size_t)B * T * Hq * D, nk = (size_t)B * T * Hkv * D;
    float *q = rnd(nq, 100), *k = rnd(nk, 100), *v = rnd(nk, 1), *out = zeros(nq);
    float *sc = zeros(2 * T * T), *dq = zeros(nq), *dk = zeros(nk), *dv = zeros(nk);
    float *g = rnd(nq, 1);
    attention_forward(out, sc, q, k, v, NULL, NULL, 0, B, T, 0, Hq, Hkv, D);
    attention_backward(dq, dk, dv, NULL, NULL, 0, sc, g, q, k, v, NULL, NULL, 0, B, T, 0, Hq, Hkv,
                       D);
    for (size_t i = 0; i < nq; i++) assert_true(isfinite(out[i]) && isfinite(dq[i]));
    for (size_t i = 0; i < nk; i++) assert_true(isfinite(dk[i]) && isfinite(dv[i]));
    /* The first query sees only the first key: its output is that value row. */
    for (int d = 0; d < D; d++) assert_float_equal(out[d], v[d], 1e-6);
    free(q), free(k), free(v), free(out), free(sc), free(dq), free(dk), free(dv), free(g);
}

/* ---- SwiGLU, residual ---------------------------------------------------------------- */

typedef struct {
    int N, IC;
    float *gate, *up, *out, *r;
} swiglu_ctx;

static double swiglu_loss(void *p) {
    swiglu_ctx *c = p;
    swiglu_forward(c->out, c->gate, c->up, c->N, c->IC);
    return dot(c->out, c->r, (size_t)c->N * c->IC);
}

static void test_swiglu(void **state) {
    (void)state;
    swiglu_ctx c = {.N = 3, .IC = 7};
    c.gate = rnd(21, 3), c.up = rnd(21, 1), c.out = zeros(21), c.r = rnd(21, 1);
    swiglu_loss(&c);
    for (int i = 0; i < 21; i++)
        assert_float_equal(c.out[i], c.gate[i] / (1 + exp(-(double)c.gate[i])) * c.up[i], 1e-6);
    float *dg = zeros(21), *du = zeros(21);
    swiglu_backward(dg, du, c.r, c.gate, c.up, c.N, c.IC);
    check_grad("swiglu dgate", c.gate, dg, 21, swiglu_loss, &c, 0);
    check_grad("swiglu dup", c.up, du, 21, swiglu_loss, &c, 0);
    /* Saturated gates stay finite. */
    float big[2] = {-200.0f, 200.0f}, one[2] = {1, 1}, o[2], gg[2] = {0, 0}, gu[2] = {0, 0};
    swiglu_forward(o, big, one, 1, 2);
    swiglu_backward(gg, gu, one, big, one, 1, 2);
    assert_float_equal(o[0], 0.0f, 1e-30);
    assert_float_equal(o[1], 200.0f, 1e-3);
    assert_true(isfinite(gg[0]) && isfinite(gg[1]));
    free(dg), free(du), free(c.gate), free(c.up), free(c.out), free(c.r);
}

static void test_residual(void **state) {
    (void)state;
    float a[5] = {1, 2, 3, 4, 5}, b[5] = {.5f, -1, 0, 2, 1}, o[5], da[5] = {0},
          db[5] = {1, 1, 1, 1, 1};
    residual_forward(o, a, b, 5);
    for (int i = 0; i < 5; i++) assert_float_equal(o[i], a[i] + b[i], 0);
    residual_backward(da, db, b, 5);
    for (int i = 0; i < 5; i++) {
        assert_float_equal(da[i], b[i], 0);
        assert_float_equal(db[i], 1 + b[i], 0);
    }
}

/* ---- cross-entropy ------------------------------------------------------------------- */

typedef struct {
    int N, V;
    const int32_t *labels;
    float *logits, *lse;
} ce_ctx;

static double ce_loss(void *p) {
    ce_ctx *c = p;
    long n;
    return crossentropy_forward(c->lse, c->logits, c->labels, c->N, c->V, &n);
}

static void test_crossentropy(void **state) {
    (void)state;
    static const int32_t labels[5] = {2, -100, 0, 10, -100};
    ce_ctx c = {.N = 5, .V = 11, .labels = labels};
    c.logits = rnd(55, 3), c.lse = zeros(5);
    long n;
    double loss = crossentropy_forward(c.lse, c.logits, labels, c.N, c.V, &n);
    assert_int_equal(n, 3);
    double ref = 0;
    for (int i = 0; i < c.N; i++) {
        if (labels[i] == -100) continue;
        double s = 0;
        for (int j = 0; j < c.V; j++) s += exp(c.logits[i * c.V + j]);
        ref += log(s) - c.logits[i * c.V + labels[i]];
    }
    assert_float_equal(loss, ref, 1e-5);
    float *d = zeros(55);
    crossentropy_backward(d, c.logits, c.lse, labels, c.N, c.V, 1.0f);
    check_grad("crossentropy dlogits", c.logits, d, 55, ce_loss, &c, 0);
    /* Ignored rows have no gradient; scale multiplies (the mean uses 1/n). */
    for (int j = 0; j < c.V; j++) assert_float_equal(d[1 * c.V + j], 0.0f, 0.0f);
    float *d2 = zeros(55);
    crossentropy_backward(d2, c.logits, c.lse, labels, c.N, c.V, 1.0f / 3);
    for (int i = 0; i < 55; i++) assert_float_equal(d2[i], d[i] / 3, 1e-7);
    /* Huge logits: stable log-sum-exp. */
    float big[3] = {1e4f, 0, -1e4f};
    int32_t lab = 0;
    float lse;
    double l = crossentropy_forward(&lse, big, &lab, 1, 3, &n);
    assert_float_equal(l, 0.0, 1e-6);
    lab = 1;
    l = crossentropy_forward(&lse, big, &lab, 1, 3, &n);
    assert_float_equal(l, 1e4, 1e-1);
    /* A NaN logit (a diverged model) shows as a NaN loss, not a finite one. */
    float bad[3] = {0.5f, NAN, -1.0f};
    lab = 0;
    assert_true(isnan(crossentropy_forward(&lse, bad, &lab, 1, 3, &n)));
    /* A long row (the vectorised blocks and the tail) against double. */
    enum { LV = 1000 };
    float *row = rnd(LV, 20);
    int32_t l7 = 7;
    double s = 0, mx = -INFINITY;
    for (int j = 0; j < LV; j++) mx = fmax(mx, row[j]);
    for (int j = 0; j < LV; j++) s += exp(row[j] - mx);
    assert_float_equal(crossentropy_forward(&lse, row, &l7, 1, LV, &n), mx + log(s) - row[7], 1e-5);
    free(row);
    /* All labels ignored: zero loss, zero count. */
    int32_t none[2] = {-100, -100};
    assert_float_equal(crossentropy_forward(c.lse, c.logits, none, 2, c.V, &n), 0.0, 0);
    assert_int_equal(n, 0);
    free(d), free(d2), free(c.logits), free(c.lse);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_linear),       cmocka_unit_test(test_lowrank),
        cmocka_unit_test(test_rmsnorm),      cmocka_unit_test(test_embedding),
        cmocka_unit_test(test_rope_tables),  cmocka_unit_test(test_rope),
        cmocka_unit_test(test_attention),    cmocka_unit_test(test_attention_stable),
        cmocka_unit_test(test_swiglu),       cmocka_unit_test(test_residual),
        cmocka_unit_test(test_crossentropy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
