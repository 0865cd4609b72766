/* The numeric layers of the Llama family (see kernels.h): forward/backward
 * pairs over raw float arrays, matrix products through cblas_sgemm.
 * model.c composes them into the decoder; tests/test_kernels.c checks each
 * backward against finite differences of its forward. */
#include "kernels.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

/* ---- vectorisable elementwise helpers -------------------------------------- */

/* The build is plain -O2, where GCC vectorises a loop only when its trip
 * count is a known multiple of the vector width, never across a float
 * comparison (which may trap) and never across a libm call. So the hot
 * elementwise loops (exp in softmax, cross-entropy and SwiGLU) run in blocks
 * of VB with a constant inner count, compare floats through their bits, and
 * use exp_fast; a scalar tail finishes each row. */
#define VB 16

/* The build targets baseline x86-64 (SSE2); the row loops below also get an
 * AVX2 clone that glibc's ifunc picks at load time. The lane structure is in
 * the source, so both clones round identically. */
#if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
#define ROW_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define ROW_LOOP
#endif

/* e^x within 3e-7 relative (expf: 6e-8), for |x| <= 87; clamped beyond
 * (e^-87 stands in for 0, e^88 for overflow). NaN and infinities give NaN,
 * so a diverged model shows as a NaN loss. Cody-Waite reduction x = n ln2 + r,
 * degree-6 Taylor polynomial of e^r, 2^n through the exponent bits. */
static inline float exp_fast(float x) {
    float x0 = x;
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    b = b > 0xC2AE0000u ? 0xC2AE0000u : b;                  /* x < -87 */
    b = (int32_t)b > 0x42B00000 ? (uint32_t)0x42B00000 : b; /* x > 88 */
    memcpy(&x, &b, sizeof x);
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = x - n * 0.693145752f;
    r = r - n * 1.42860677e-6f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.166666672f +
                                                  r * (0.0416666679f + r * (0.00833333377f +
                                                                            r * 0.00138888892f)))));
    int32_t e = ((int32_t)n + 127) * (1 << 23);
    float s;
    memcpy(&s, &e, sizeof s);
    return p * s + (x0 - x0);
}

/* Float order as signed-integer order: negative floats flip their
 * magnitude bits. An involution, so it also maps back. */
static inline int32_t float_key(int32_t bits) {
    return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

/* The largest of x[0..n), n >= 1 (a positive NaN counts as largest). */
ROW_LOOP static float max_of(const float *x, int n) {
    int32_t m[VB], r, v;
    int i = 0;
    memcpy(&r, x, sizeof r);
    r = float_key(r);
    if (n >= 2 * VB) {
        memcpy(m, x, sizeof m);
        for (int k = 0; k < VB; k++) m[k] = float_key(m[k]);
        for (i = VB; i + VB <= n; i += VB)
            for (int k = 0; k < VB; k++) {
                memcpy(&v, x + i + k, sizeof v);
                v = float_key(v);
                m[k] = v > m[k] ? v : m[k];
            }
        for (int k = 0; k < VB; k++) r = m[k] > r ? m[k] : r;
    }
    for (; i < n; i++) {
        memcpy(&v, x + i, sizeof v);
        v = float_key(v);
        r = v > r ? v : r;
    }
    r = float_key(r);
    float f;
    memcpy(&f, &r, sizeof f);
    return f;
}

/* Sum of e^(x[i] - m) over [0, n); with y not NULL, also y[i] = that term
 * (y may be x: each element is read before it is written). */
ROW_LOOP static float exp_sum(float *y, const float *x, float m, int n) {
    float acc[VB] = {0}, t[VB];
    int i = 0;
    for (; i + VB <= n; i += VB) {
        for (int k = 0; k < VB; k++) {
            t[k] = exp_fast(x[i + k] - m);
            acc[k] += t[k];
        }
        if (y) memcpy(y + i, t, sizeof t);
    }
    float sum = 0.0f;
    for (int k = 0; k < VB; k++) sum += acc[k];
    for (; i < n; i++) {
        float e = exp_fast(x[i] - m);
        if (y) y[i] = e;
        sum += e;
    }
    return sum;
}

/* ---- embedding ------------------------------------------------------------ */

void embedding_forward(float *out, const int32_t *tokens, const float *table, int N, int C) {
    // out is (N,C), table is (V,C)
    for (int i = 0; i < N; i++)
        memcpy(out + (size_t)i * C, table + (size_t)tokens[i] * C, (size_t)C * sizeof(float));
}

void embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int N, int C) {
    // dtable is (V,C), dout is (N,C)
    for (int i = 0; i < N; i++) {
        float *restrict d = dtable + (size_t)tokens[i] * C;
        const float *restrict g = dout + (size_t)i * C;
        for (int c = 0; c < C; c++) d[c] += g[c];
    }
}

/* ---- RMSNorm and the per-channel scale ------------------------------------ */

/* Row loops of the norms, restrict and in blocks of VB (see exp_fast). */
ROW_LOOP static float dot_row(const float *restrict a, const float *restrict b, int n) {
    float acc[VB] = {0};
    int i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++) acc[k] += a[i + k] * b[i + k];
    float s = 0.0f;
    for (int k = 0; k < VB; k++) s += acc[k];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y = x * r * w, or y = x * r when w is NULL. */
ROW_LOOP static void scale_row(float *restrict y, const float *restrict x, float r,
                               const float *restrict w, int n) {
    int i = 0;
    if (w) {
        for (; i + VB <= n; i += VB)
            for (int k = 0; k < VB; k++) y[i + k] = x[i + k] * r * w[i + k];
        for (; i < n; i++) y[i] = x[i] * r * w[i];
    } else {
        for (; i + VB <= n; i += VB)
            for (int k = 0; k < VB; k++) y[i + k] = x[i + k] * r;
        for (; i < n; i++) y[i] = x[i] * r;
    }
}

/* d += a * b */
ROW_LOOP static void fma_row(float *restrict d, const float *restrict a, const float *restrict b,
                             int n) {
    int i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++) d[i + k] += a[i + k] * b[i + k];
    for (; i < n; i++) d[i] += a[i] * b[i];
}

ROW_LOOP static void rms_bwd_row(float *restrict d, const float *restrict g,
                                 const float *restrict xh, float r, float m, int n) {
    int i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++) d[i + k] += r * (g[i + k] - xh[i + k] * m);
    for (; i < n; i++) d[i] += r * (g[i] - xh[i] * m);
}

void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C,
                     float eps) {
    // out, inp are (N,C), weight is (C), rstd is (N)
    for (int i = 0; i < N; i++) {
        const float *x = inp + (size_t)i * C;
        float r = 1.0f / sqrtf(dot_row(x, x, C) / (float)C + eps);
        scale_row(out + (size_t)i * C, x, r, weight, C);
        rstd[i] = r;
    }
}

void rmsnorm_normalize(float *xhat, const float *inp, const float *rstd, int N, int C) {
    // xhat, inp are (N,C), rstd is (N)
    for (int i = 0; i < N; i++)
        scale_row(xhat + (size_t)i * C, inp + (size_t)i * C, rstd[i], NULL, C);
}

void rmsnorm_backward(float *dinp, const float *dxhat, const float *xhat, const float *rstd, int N,
                      int C) {
    // dinp, dxhat, xhat are (N,C), rstd is (N).
    // xhat = x r with r = (mean(x^2) + eps)^-1/2, so
    // dx = r (dxhat - xhat mean(dxhat xhat)).
    for (int i = 0; i < N; i++) {
        const float *g = dxhat + (size_t)i * C, *xh = xhat + (size_t)i * C;
        float m = dot_row(g, xh, C) / (float)C;
        rms_bwd_row(dinp + (size_t)i * C, g, xh, rstd[i], m, C);
    }
}

void scale_forward(float *out, const float *inp, const float *weight, int N, int C) {
    // out, inp are (N,C), weight is (C)
    for (int i = 0; i < N; i++)
        scale_row(out + (size_t)i * C, inp + (size_t)i * C, 1.0f, weight, C);
}

void scale_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                    const float *weight, int N, int C) {
    // dinp, dout, inp are (N,C), dweight, weight are (C)
    for (int i = 0; i < N; i++) {
        const float *g = dout + (size_t)i * C;
        if (dinp) fma_row(dinp + (size_t)i * C, g, weight, C);
        if (dweight) fma_row(dweight, g, inp + (size_t)i * C, C);
    }
}

/* ---- linear ----------------------------------------------------------------- */

void linear_forward(float *out, const float *inp, const float *weight, const float *bias, int N,
                    int C, int OC) {
    // out is (N,OC), inp is (N,C), weight is (OC,C), bias is (OC)
    if (bias)
        for (int i = 0; i < N; i++) memcpy(out + (size_t)i * OC, bias, (size_t)OC * sizeof(float));
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, C, weight, C,
                bias ? 1.0f : 0.0f, out, OC);
}

void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                     const float *weight, int N, int C, int OC) {
    // dinp, inp are (N,C), dweight, weight are (OC,C), dout is (N,OC), dbias is (OC)
    if (dinp)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, OC, weight, C,
                    1.0f, dinp, C);
    if (dweight)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f,
                    dweight, C);
    if (dbias)
        for (int i = 0; i < N; i++) {
            const float *restrict g = dout + (size_t)i * OC;
            for (int o = 0; o < OC; o++) dbias[o] += g[o];
        }
}

/* ---- residual -------------------------------------------------------------- */

void residual_forward(float *out, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void residual_backward(float *da, float *db, const float *dout, size_t n) {
    for (size_t i = 0; i < n; i++) {
        da[i] += dout[i];
        db[i] += dout[i];
    }
}

/* ---- rotary embeddings -------------------------------------------------------- */

/* Hugging Face's _compute_llama3_parameters: wavelengths shorter than
 * original_max/high_freq_factor keep their frequency, those longer than
 * original_max/low_freq_factor are divided by factor, and the band between
 * blends the two by where the wavelength falls. */
static double rope_llama3(double inv, const model_config *cfg) {
    double factor = cfg->rope_factor, low = cfg->rope_low_freq_factor;
    double high = cfg->rope_high_freq_factor, old = cfg->rope_original_max_position_embeddings;
    double wavelen = 2.0 * M_PI / inv;
    if (wavelen < old / high) return inv;
    if (wavelen > old / low) return inv / factor;
    if (high == low) return inv; /* empty band: only reachable at its edge */
    double smooth = (old / wavelen - low) / (high - low);
    return (1.0 - smooth) * inv / factor + smooth * inv;
}

void rope_init(float *cos_t, float *sin_t, int n_pos, const model_config *cfg) {
    // cos_t, sin_t are (n_pos, D/2)
    int D = cfg->head_dim, half = D / 2;
    for (int i = 0; i < half; i++) {
        double inv = pow((double)cfg->rope_theta, -2.0 * i / D);
        if (cfg->rope_scaling == ROPE_LINEAR && cfg->rope_factor > 0) inv /= cfg->rope_factor;
        if (cfg->rope_scaling == ROPE_LLAMA3) inv = rope_llama3(inv, cfg);
        for (int pos = 0; pos < n_pos; pos++) {
            double a = pos * inv;
            cos_t[(size_t)pos * half + i] = (float)cos(a);
            sin_t[(size_t)pos * half + i] = (float)sin(a);
        }
    }
}

void rope_forward(float *out, const float *inp, const float *cos_t, const float *sin_t, int B,
                  int T, int H, int D, int pos0) {
    // out, inp are (B,T,H,D); cos_t, sin_t are (n_pos, D/2)
    int half = D / 2;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *c = cos_t + (size_t)(pos0 + t) * half;
            const float *s = sin_t + (size_t)(pos0 + t) * half;
            for (int h = 0; h < H; h++) {
                size_t off = (((size_t)b * T + t) * H + h) * D;
                const float *x = inp + off;
                float *y = out + off;
                for (int i = 0; i < half; i++) {
                    float x1 = x[i], x2 = x[i + half];
                    y[i] = x1 * c[i] - x2 * s[i];
                    y[i + half] = x2 * c[i] + x1 * s[i];
                }
            }
        }
}

void rope_backward(float *dinp, const float *dout, const float *cos_t, const float *sin_t, int B,
                   int T, int H, int D, int pos0) {
    // dinp, dout are (B,T,H,D): the rotation is orthogonal, so its backward
    // is the rotation by the opposite angle.
    int half = D / 2;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *c = cos_t + (size_t)(pos0 + t) * half;
            const float *s = sin_t + (size_t)(pos0 + t) * half;
            for (int h = 0; h < H; h++) {
                size_t off = (((size_t)b * T + t) * H + h) * D;
                const float *restrict g = dout + off;
                float *restrict d = dinp + off;
                for (int i = 0; i < half; i++) {
                    float g1 = g[i], g2 = g[i + half];
                    d[i] += g1 * c[i] + g2 * s[i];
                    d[i + half] += g2 * c[i] - g1 * s[i];
                }
            }
        }
}

/* ---- attention -------------------------------------------------------------- */

/* The causal part is done in blocks of query rows (or key columns) so that
 * the products skip most of the masked upper triangle. Short sequences use
 * narrower blocks: less masked work, and products small enough that
 * OpenBLAS runs them on one thread instead of paying its fork-join for
 * little work (measured: T=128 is 25% faster at 32 than at 64, T=512 12%
 * slower). */
static int att_block(int T) {
    return T <= 256 ? 32 : 64;
}

/* Softmax over the first n of a row of S entries, zeroing the rest. */
static void softmax_row(float *x, int n, int S) {
    float inv = 1.0f / exp_sum(x, x, max_of(x, n), n);
    for (int j = 0; j < n; j++) x[j] *= inv;
    for (int j = n; j < S; j++) x[j] = 0.0f;
}

/* One head's probabilities a (T, S=P+T) of query rows qbh (row stride qs)
 * against the prefix keys kpg (rows pstride apart) and the real keys kbh
 * (row stride ks). */
static void head_probs(float *a, const float *qbh, int qs, const float *kpg, int pstride,
                       const float *kbh, int ks, int T, int P, int D) {
    int S = P + T, blk = att_block(T);
    float scale = 1.0f / sqrtf((float)D);
    if (P)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, P, D, scale, qbh, qs, kpg, pstride,
                    0.0f, a, S);
    for (int r0 = 0; r0 < T; r0 += blk) {
        int r1 = r0 + blk < T ? r0 + blk : T;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, r1, D, scale,
                    qbh + (size_t)r0 * qs, qs, kbh, ks, 0.0f, a + (size_t)r0 * S + P, S);
    }
    for (int t = 0; t < T; t++) softmax_row(a + (size_t)t * S, P + t + 1, S);
}

void attention_forward(float *out, float *scratch, const float *q, const float *k, const float *v,
                       const float *kp, const float *vp, size_t pstride, int B, int T, int P,
                       int Hq, int Hkv, int D) {
    // out, q are (B,T,Hq,D); k, v are (B,T,Hkv,D); kp, vp are (P, pstride);
    // scratch is (T,P+T): one head's probabilities at a time
    int S = P + T, group = Hq / Hkv, blk = att_block(T);
    int qs = Hq * D, ks = Hkv * D, ps = (int)pstride;
    float *a = scratch;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hq; h++) {
            int g = h / group;
            size_t qoff = (size_t)b * T * qs + (size_t)h * D;
            size_t koff = (size_t)b * T * ks + (size_t)g * D;
            head_probs(a, q + qoff, qs, P ? kp + (size_t)g * D : NULL, ps, k + koff, ks, T, P, D);
            float *obh = out + qoff;
            if (P)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, D, P, 1.0f, a, S,
                            vp + (size_t)g * D, ps, 0.0f, obh, qs);
            for (int r0 = 0; r0 < T; r0 += blk) {
                int r1 = r0 + blk < T ? r0 + blk : T;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, D, r1, 1.0f,
                            a + (size_t)r0 * S + P, S, v + koff, ks, P ? 1.0f : 0.0f,
                            obh + (size_t)r0 * qs, qs);
            }
        }
}

void attention_backward(float *dq, float *dk, float *dv, float *dkp, float *dvp, size_t dpstride,
                        float *scratch, const float *dout, const float *q, const float *k,
                        const float *v, const float *kp, const float *vp, size_t pstride, int B,
                        int T, int P, int Hq, int Hkv, int D) {
    // dq, dout, q are (B,T,Hq,D); dk, dv, k, v are (B,T,Hkv,D); scratch is
    // 2 x (T,P+T): one head's probabilities, rebuilt here rather than kept
    // per layer, and the gradient of its scores.
    int S = P + T, group = Hq / Hkv, blk = att_block(T);
    int qs = Hq * D, ks = Hkv * D, ps = (int)pstride, dps = (int)dpstride;
    float scale = 1.0f / sqrtf((float)D);
    float *a = scratch, *ds = scratch + (size_t)T * S;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < Hq; h++) {
            int g = h / group;
            size_t qoff = (size_t)b * T * qs + (size_t)h * D;
            size_t koff = (size_t)b * T * ks + (size_t)g * D;
            const float *gbh = dout + qoff, *qbh = q + qoff;
            const float *kbh = k + koff, *vbh = v + koff;
            const float *kpg = P ? kp + (size_t)g * D : NULL, *vpg = P ? vp + (size_t)g * D : NULL;
            head_probs(a, qbh, qs, kpg, ps, kbh, ks, T, P, D);
            // d(probabilities) = dout V^T
            if (P)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, P, D, 1.0f, gbh, qs, vpg,
                            ps, 0.0f, ds, S);
            for (int r0 = 0; r0 < T; r0 += blk) {
                int r1 = r0 + blk < T ? r0 + blk : T;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, r1, D, 1.0f,
                            gbh + (size_t)r0 * qs, qs, vbh, ks, 0.0f, ds + (size_t)r0 * S + P, S);
            }
            // dV += A^T dout, for the prefix and, by blocks of keys, the real keys
            if (P && dvp)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, P, D, T, 1.0f, a, S, gbh, qs,
                            1.0f, dvp + (size_t)g * D, dps);
            for (int c0 = 0; c0 < T; c0 += blk) {
                int c1 = c0 + blk < T ? c0 + blk : T;
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c1 - c0, D, T - c0, 1.0f,
                            a + (size_t)c0 * S + P + c0, S, gbh + (size_t)c0 * qs, qs, 1.0f,
                            dv + koff + (size_t)c0 * ks, ks);
            }
            // through the softmax: ds = a (da - sum(a da)) on the visible entries
            for (int t = 0; t < T; t++) {
                const float *ar = a + (size_t)t * S;
                float *dr = ds + (size_t)t * S;
                int n = P + t + 1;
                double dot = 0.0;
                for (int j = 0; j < n; j++) dot += (double)ar[j] * dr[j];
                float fd = (float)dot;
                for (int j = 0; j < n; j++) dr[j] = ar[j] * (dr[j] - fd);
                for (int j = n; j < S; j++) dr[j] = 0.0f;
            }
            // dq += scale ds K; dK += scale ds^T q
            if (P) {
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, D, P, scale, ds, S, kpg,
                            ps, 1.0f, dq + qoff, qs);
                if (dkp)
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, P, D, T, scale, ds, S, qbh,
                                qs, 1.0f, dkp + (size_t)g * D, dps);
            }
            for (int r0 = 0; r0 < T; r0 += blk) {
                int r1 = r0 + blk < T ? r0 + blk : T;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, D, r1, scale,
                            ds + (size_t)r0 * S + P, S, kbh, ks, 1.0f, dq + qoff + (size_t)r0 * qs,
                            qs);
            }
            for (int c0 = 0; c0 < T; c0 += blk) {
                int c1 = c0 + blk < T ? c0 + blk : T;
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c1 - c0, D, T - c0, scale,
                            ds + (size_t)c0 * S + P + c0, S, qbh + (size_t)c0 * qs, qs, 1.0f,
                            dk + koff + (size_t)c0 * ks, ks);
            }
        }
}

/* ---- SwiGLU ------------------------------------------------------------------ */

/* The loops of swiglu_forward/backward over n elements, restrict so that
 * GCC vectorises the blocks. */
ROW_LOOP static void swiglu_fwd(float *restrict out, const float *restrict g,
                                const float *restrict u, size_t n) {
    size_t i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++)
            out[i + k] = g[i + k] / (1.0f + exp_fast(-g[i + k])) * u[i + k];
    for (; i < n; i++) out[i] = g[i] / (1.0f + exp_fast(-g[i])) * u[i];
}

/* silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))) */
ROW_LOOP static void swiglu_bwd(float *restrict dg, float *restrict du, const float *restrict d,
                                const float *restrict g, const float *restrict u, size_t n) {
    size_t i = 0;
    for (; i + VB <= n; i += VB)
        for (int k = 0; k < VB; k++) {
            float sg = 1.0f / (1.0f + exp_fast(-g[i + k]));
            dg[i + k] += d[i + k] * u[i + k] * sg * (1.0f + g[i + k] * (1.0f - sg));
            du[i + k] += d[i + k] * g[i + k] * sg;
        }
    for (; i < n; i++) {
        float sg = 1.0f / (1.0f + exp_fast(-g[i]));
        dg[i] += d[i] * u[i] * sg * (1.0f + g[i] * (1.0f - sg));
        du[i] += d[i] * g[i] * sg;
    }
}

void swiglu_forward(float *out, const float *gate, const float *up, int N, int IC) {
    // out, gate, up are (N,IC)
    swiglu_fwd(out, gate, up, (size_t)N * IC);
}

void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                     const float *up, int N, int IC) {
    // dgate, dup, dout, gate, up are (N,IC)
    swiglu_bwd(dgate, dup, dout, gate, up, (size_t)N * IC);
}

/* ---- cross-entropy ------------------------------------------------------------ */

double crossentropy_forward(float *lse, const float *logits, const int32_t *labels, int N, int V,
                            long *count) {
    // lse is (N), logits is (N,V), labels is (N)
    double total = 0.0;
    long n = 0;
    for (int i = 0; i < N; i++) {
        lse[i] = 0.0f;
        if (labels[i] == -100) continue;
        const float *x = logits + (size_t)i * V;
        float m = max_of(x, V);
        double l = m + log((double)exp_sum(NULL, x, m, V));
        lse[i] = (float)l;
        total += l - x[labels[i]];
        n++;
    }
    *count = n;
    return total;
}

/* d (V) += scale * softmax of x (V) given its log-sum-exp l. */
ROW_LOOP static void softmax_grad_row(float *restrict d, const float *restrict x, float l,
                                      float scale, int V) {
    int j = 0;
    for (; j + VB <= V; j += VB)
        for (int k = 0; k < VB; k++) d[j + k] += scale * exp_fast(x[j + k] - l);
    for (; j < V; j++) d[j] += scale * exp_fast(x[j] - l);
}

void crossentropy_backward(float *dlogits, const float *logits, const float *lse,
                           const int32_t *labels, int N, int V, float scale) {
    // dlogits, logits are (N,V), lse, labels are (N)
    for (int i = 0; i < N; i++) {
        if (labels[i] == -100) continue;
        float *d = dlogits + (size_t)i * V;
        softmax_grad_row(d, logits + (size_t)i * V, lse[i], scale, V);
        d[labels[i]] -= scale;
    }
}
