/* AdamW, gradient clipping and learning-rate schedules matching PyTorch and
 * Hugging Face; see optim.h. Deterministic by construction: scalar factors
 * come from basic arithmetic only (own powers and cosine, IEEE sqrt), and
 * element loops are independent per element or summed in index order. */
#include "train/optim.h"

/* Bits must not depend on the compiler fusing a*b+c: GCC keeps products and
 * sums apart in ISO mode (-std=c11 implies -ffp-contract=off); clang needs
 * telling. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/cpu.h"
#include "base/team.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define ADAMW_X86 1
#else
#define ADAMW_X86 0
#endif

int optim_create(optim *o, size_t n, const Peftps__Optimizer *cfg, err *e) {
    memset(o, 0, sizeof *o);
    if (n == 0) return err_set(e, "optimizer: no parameters to train");
    /* Negated comparisons so that NaN fails too. */
    if (!(cfg->beta1 >= 0 && cfg->beta1 < 1))
        return err_set(e, "optimizer: beta1 is %g, must be in [0, 1)", (double)cfg->beta1);
    if (!(cfg->beta2 >= 0 && cfg->beta2 < 1))
        return err_set(e, "optimizer: beta2 is %g, must be in [0, 1)", (double)cfg->beta2);
    if (!(cfg->eps >= 0)) return err_set(e, "optimizer: eps is %g, must be >= 0", (double)cfg->eps);
    if (!(cfg->weight_decay >= 0))
        return err_set(e, "optimizer: weight_decay is %g, must be >= 0", (double)cfg->weight_decay);
    if (n > SIZE_MAX / (2 * sizeof(float)))
        return err_set(e, "optimizer: %zu parameters are too many", n);
    float *mv = calloc(2 * n, sizeof(float));
    if (!mv)
        return err_set(e, "optimizer: cannot allocate moments for %zu parameters (%zu MiB)", n,
                       2 * n * sizeof(float) >> 20);
    o->n = n;
    o->beta1 = cfg->beta1;
    o->beta2 = cfg->beta2;
    o->eps = cfg->eps;
    o->weight_decay = cfg->weight_decay;
    o->m = mv;
    o->v = mv + n;
    return 0;
}

void optim_free(optim *o) {
    free(o->m); /* v lives in the same block */
    o->m = o->v = NULL;
    o->n = 0;
}

/* cos(pi * x) for x in [0,1] from its Taylor series after reduction to
 * [0, pi/4]; within a few ulps of libm's cos, and the same bits everywhere. */
static double cospi01(double x) {
    if (x > 0.5) return -cospi01(1.0 - x);
    const double pi = 0x1.921fb54442d18p+1;
    int use_sin = x > 0.25; /* cos(pi x) = sin(pi (1/2 - x)) */
    const double a = pi * (use_sin ? 0.5 - x : x);
    const double a2 = a * a;
    /* a <= pi/4: the 11th term of either series is below 2^-60. */
    double term = use_sin ? a : 1.0, sum = term;
    for (int k = use_sin ? 2 : 1; k < 24; k += 2) {
        term *= -a2 / (double)(k * (k + 1));
        sum += term;
    }
    return sum;
}

double optim_lr(const Peftps__Optimizer *cfg, const Peftps__Schedule *sched, uint64_t step) {
    const double lr = cfg->lr;
    if (!sched) return lr;
    const uint64_t warmup = sched->warmup_steps;
    /* Step s (from 0) of the warmup runs at lr * (s+1) / warmup: the first
     * step already trains, and the last warmup step reaches lr. */
    if (step < warmup) return lr * ((double)(step + 1) / (double)warmup);
    const double min_lr = sched->min_lr;
    const uint64_t total = sched->total_steps;
    const uint64_t span = total > warmup ? total - warmup : 1;
    double progress = (double)(step - warmup) / (double)span;
    if (progress > 1.0) progress = 1.0;
    switch (sched->decay) {
    case PEFTPS__DECAY__LINEAR:
        return min_lr + (lr - min_lr) * (1.0 - progress);
    case PEFTPS__DECAY__COSINE:
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + cospi01(progress));
    default:
        return lr;
    }
}

double optim_grad_sumsq(const float *g, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)g[i] * (double)g[i];
    return s;
}

double optim_grad_norm(const float *g, size_t n) {
    return sqrt(optim_grad_sumsq(g, n));
}

float optim_clip_coef(double norm, float max_norm) {
    if (!(max_norm > 0)) return 1.0f;
    /* In float32, as torch divides by its float32 total_norm tensor. */
    const float coef = max_norm / ((float)norm + 1e-6f);
    return coef < 1.0f ? coef : 1.0f;
}

double optim_clip(float *g, size_t n, float max_norm) {
    const double norm = optim_grad_norm(g, n);
    const float coef = optim_clip_coef(norm, max_norm);
    if (coef != 1.0f)
        for (size_t i = 0; i < n; i++) g[i] *= coef;
    return norm;
}

/* b^t by squaring: exact integer exponent, basic arithmetic only. */
static double powi(double b, uint64_t t) {
    double r = 1.0;
    while (t) {
        if (t & 1) r *= b;
        b *= b;
        t >>= 1;
    }
    return r;
}

/* The arguments of one AdamW update, shared by the ranges of team_for. */
typedef struct adamw {
    float *params, *m, *v;
    const float *grads;
    float decay, step_size, bc2_sqrt, w1, w2, b1, b2, eps;
} adamw;

#if ADAMW_X86
/* adamw_range's arithmetic 8 elements at a time, operation for operation:
 * multiplies, fused multiply-adds, square roots and divisions are each
 * correctly rounded in AVX2 as in scalar C, so the bits are the same. The
 * scalar loop is not vectorized by the compiler (fmaf is a library call
 * without -mfma), and the update is memory-bound only once vectorized.
 * Returns the first element it left to the scalar loop. */
__attribute__((target("avx2,fma"))) static size_t adamw_vec(const adamw *a, size_t i0, size_t i1) {
    const __m256 decay = _mm256_set1_ps(a->decay), nstep = _mm256_set1_ps(-a->step_size);
    const __m256 bc2 = _mm256_set1_ps(a->bc2_sqrt), w1 = _mm256_set1_ps(a->w1);
    const __m256 w2 = _mm256_set1_ps(a->w2), b1 = _mm256_set1_ps(a->b1);
    const __m256 b2 = _mm256_set1_ps(a->b2), eps = _mm256_set1_ps(a->eps);
    size_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        __m256 g = _mm256_loadu_ps(a->grads + i);
        __m256 p = _mm256_mul_ps(_mm256_loadu_ps(a->params + i), decay);
        __m256 m = _mm256_fmadd_ps(g, w1, _mm256_mul_ps(_mm256_loadu_ps(a->m + i), b1));
        __m256 v =
            _mm256_fmadd_ps(_mm256_mul_ps(w2, g), g, _mm256_mul_ps(_mm256_loadu_ps(a->v + i), b2));
        _mm256_storeu_ps(a->m + i, m);
        _mm256_storeu_ps(a->v + i, v);
        __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2), eps);
        _mm256_storeu_ps(a->params + i,
                         _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(nstep, m), denom)));
    }
    return i;
}

static int adamw_vec_ok(void) {
    static _Atomic int known = -1;
    int k = known;
    if (k < 0) {
        __builtin_cpu_init();
        known = k = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return k;
}
#endif

/* Elements [i0, i1), each on its own: any split gives the same bits. */
static void adamw_range(void *ctx, size_t i0, size_t i1) {
    const adamw *a = ctx;
    float *m = a->m, *v = a->v, *params = a->params;
    const float *grads = a->grads;
    const float decay = a->decay, step_size = a->step_size, bc2_sqrt = a->bc2_sqrt;
    const float w1 = a->w1, w2 = a->w2, b1 = a->b1, b2 = a->b2, eps = a->eps;
#if ADAMW_X86
    if (adamw_vec_ok() && !cpu_disabled("avx2")) i0 = adamw_vec(a, i0, i1);
#endif
    for (size_t i = i0; i < i1; i++) {
        const float g = grads[i];
        const float p = params[i] * decay;
        /* torch's exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1) and
         * exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2) run
         * as fused multiply-adds in its vector kernels; fmaf is correctly
         * rounded everywhere, so this is both torch's bits and portable. */
        m[i] = fmaf(g, w1, m[i] * b1);
        v[i] = fmaf(w2 * g, g, v[i] * b2);
        const float denom = sqrtf(v[i]) / bc2_sqrt + eps;
        /* addcdiv_(m, denom, value=-step_size) rounds (value*m)/denom. */
        params[i] = p + (-step_size * m[i]) / denom;
    }
}

void optim_step(optim *o, float *params, const float *grads, double lr) {
    o->t++;
    /* Scalars in double, rounded once to float as torch does when a Python
     * float meets a float32 tensor. */
    adamw a = {.params = params, .m = o->m, .v = o->v, .grads = grads};
    a.decay = (float)(1.0 - lr * (double)o->weight_decay);
    a.step_size = (float)(lr / (1.0 - powi(o->beta1, o->t)));
    a.bc2_sqrt = (float)sqrt(1.0 - powi(o->beta2, o->t));
    a.w1 = (float)(1.0 - (double)o->beta1);
    a.w2 = (float)(1.0 - (double)o->beta2);
    a.b1 = o->beta1, a.b2 = o->beta2, a.eps = o->eps;
    /* Memory-bound (28 bytes an element): the team's cores add bandwidth. */
    team_for(o->n, 16, 1024, adamw_range, &a);
}

void optim_state(const optim *o, uint64_t *t, const float **m, const float **v) {
    *t = o->t;
    *m = o->m;
    *v = o->v;
}

int optim_restore(optim *o, uint64_t t, const float *m, const float *v, size_t n, err *e) {
    if (n != o->n)
        return err_set(e, "optimizer state holds %zu parameters, the model trains %zu", n, o->n);
    memcpy(o->m, m, n * sizeof(float));
    memcpy(o->v, v, n * sizeof(float));
    o->t = t;
    return 0;
}
