/* The numeric layers of the Llama family, llm.c style: each layer is a pair
 * of free functions x_forward / x_backward over raw float arrays with the
 * shapes in comments. model.c composes them; the methods (lora.c, full.c,
 * ...) may reuse them. Every F32 matrix product is a cblas_sgemm; products
 * with a BF16 weight (the *_k variants, BF16 compute) go to bf16.h.
 *
 * Conventions: arrays are row-major and must not overlap unless a comment
 * says so. Backward functions ACCUMULATE (+=) into their gradient outputs
 * (the caller zeroes once per step); a NULL gradient output is skipped; the
 * few *_grad variants WRITE instead, sparing the zeroing pass. N is a number
 * of rows (tokens, B*T). Exponentials (softmax, cross-entropy, SwiGLU) are
 * computed to 3e-7 relative, not libm's 6e-8, so that they vectorise; NaN or
 * infinite inputs to them give NaN.
 *
 * Threads: large loops and products are spread over the team of team.h,
 * each sgemm single-threaded on its part; products are cut by their shape
 * alone and sums are taken in a fixed order, so the results are the same
 * bits from run to run and for any number of threads. Not reentrant on
 * shared outputs, like any function writing them. */
#ifndef PEFTPS_KERNELS_H
#define PEFTPS_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

/* out (N,C) = rows tokens[i] of table (V,C). Tokens must be in [0, V). */
void embedding_forward(float *out, const int32_t *tokens, const float *table, int N, int C);
/* dtable (V,C) += dout (N,C) scattered to the rows of the tokens. */
void embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int N, int C);

/* out (N,C) = inp * rsqrt(mean(inp^2) + eps) * weight (C), as Hugging Face
 * computes it in float32; rstd (N) keeps the reciprocal RMS per row. */
void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N, int C,
                     float eps);
/* xhat (N,C) = inp * rstd: the normalised input before the weight, rebuilt
 * for the backward (and for methods training the norm weight). */
void rmsnorm_normalize(float *xhat, const float *inp, const float *rstd, int N, int C);
/* xhat as rmsnorm_normalize and out (N,C) = xhat * weight, in one pass:
 * out has the bits of rmsnorm_forward's output for the same rstd. */
void rmsnorm_rebuild(float *xhat, float *out, const float *inp, const float *rstd,
                     const float *weight, int N, int C);
/* The part of the backward before the weight is the `scale` layer below;
 * this is the rest: dinp (N,C) += the gradient through xhat = inp * rstd,
 * given dxhat (N,C). */
void rmsnorm_backward(float *dinp, const float *dxhat, const float *xhat, const float *rstd, int N,
                      int C);

/* out (N,C) = inp (N,C) * weight (C) per channel: the weight of a norm. */
void scale_forward(float *out, const float *inp, const float *weight, int N, int C);
/* dinp (N,C) += dout * weight; dweight (C) += sum over rows of dout * inp. */
void scale_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                    const float *weight, int N, int C);

/* out (N,OC) = inp (N,C) weight^T + bias; weight is (OC,C) as nn.Linear
 * stores it, bias (OC) may be NULL. One sgemm. */
void linear_forward(float *out, const float *inp, const float *weight, const float *bias, int N,
                    int C, int OC);
/* dinp (N,C) += dout (N,OC) weight; dweight (OC,C) += dout^T inp;
 * dbias (OC) += column sums of dout. Any of the three may be NULL. */
void linear_backward(float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                     const float *weight, int N, int C, int OC);

/* n <= 4 linears reading one input (q, k, v; gate, up) as one team job:
 * outs[i] (N,OC[i]) = inp (N,C) weights[i]^T + biases[i], where biases may
 * be NULL, or hold NULL for a linear without bias. */
void linears_forward(int n, float *const *outs, const float *inp, const float *const *weights,
                     const float *const *biases, int N, int C, const int *OC);
/* out (N,OC) = res (N,OC) + inp (N,C) weight^T + bias: a linear and the
 * residual add after it, in one pass; out may equal res; bias (OC) may be
 * NULL. */
void linear_residual_forward(float *out, const float *res, const float *inp, const float *weight,
                             const float *bias, int N, int C, int OC);
/* dinp (N,C) = (accumulate ? dinp : 0) + sum over i < n <= 4 of douts[i]
 * (N,OC[i]) weights[i] (OC[i],C), added in order of i: the input gradient
 * of linears sharing an input, as one team job. */
void linears_backward_input(float *dinp, int accumulate, int n, const float *const *douts,
                            const float *const *weights, int N, int C, const int *OC);

/* The same three with each weight F32 or BF16 (kweight): a weight with a
 * BF16 form (h not NULL) runs the product of bf16.h (input rounded to BF16, F32 accumulation,
 * F32 output), an F32 one cblas_sgemm, in one team job or two. */
void linears_forward_k(int n, float *const *outs, const float *inp, const kweight *weights,
                       const float *const *biases, int N, int C, const int *OC);
void linear_residual_forward_k(float *out, const float *res, const float *inp, kweight weight,
                               const float *bias, int N, int C, int OC);
void linears_backward_input_k(float *dinp, int accumulate, int n, const float *const *douts,
                              const kweight *weights, int N, int C, const int *OC);
/* The BF16 paths of the three above (every weight BF16) over rows gathered
 * from several places, for co-batching (cobatch.h): row i of the input is
 * inp[i] (C floats), of outs[k] outs[k][i], of res res[i], of douts[k]
 * douts[k][i], of dinp dinp[i]. Each row has the bits of the same row in
 * the contiguous call; the rows of an output must not overlap. */
void linears_forward_rows(int n, float *const *const *outs, const float *const *inp,
                          const uint16_t *const *w, const float *const *biases, int N, int C,
                          const int *OC);
void linear_residual_forward_rows(float *const *out, const float *const *res,
                                  const float *const *inp, const uint16_t *w, const float *bias,
                                  int N, int C, int OC);
void linears_backward_input_rows(float *const *dinp, int accumulate, int n,
                                 const float *const *const *douts, const uint16_t *const *w, int N,
                                 int C, const int *OC);
/* Co-batching under F32 (cobatch.h): the n product jobs that computations'
 * gemm calls handed over (tasks[k] tasks each), as one team job, each
 * product cut into the parts it has alone: the same bits as alone. */
void gemm_jobs_run(void *const *jobs, const int *tasks, int n);
/* dweight (OC,C) += dout^T inp, as linear_backward's weight gradient, with
 * dout (N,OC) and inp (N,C) rounded to BF16 and F32 accumulation (bf16.h):
 * the weight gradient of full fine-tuning under BF16 compute. */
void linear_backward_weight_bf16(float *dweight, const float *dout, const float *inp, int N, int C,
                                 int OC);
/* embedding_forward from a table in F32 when it has one, else from its
 * BF16 (widened exactly). */
void embedding_forward_k(float *out, const int32_t *tokens, kweight table, int N, int C);

/* A low-rank branch beside a linear, as LoRA's: h (N,r) = x (N,in) a^T,
 * where a is (r,in), then y (N,out) += scale h b^T, where b is (out,r).
 * Rows go over the team in parts fixed by N. */
void lowrank_forward(float *y, float *h, const float *x, const float *a, const float *b,
                     float scale, int N, int in, int r, int out);
/* Its backward given dy (N,out) and the forward's h: g (N,r) = dy b, which
 * it writes; db (out,r) += scale dy^T h; da (r,in) += scale g^T x; dx (N,in)
 * += scale g a unless dx is NULL. Two team jobs of independent products. */
void lowrank_backward(float *da, float *db, float *dx, float *g, const float *dy, const float *x,
                      const float *h, const float *a, const float *b, float scale, int N, int in,
                      int r, int out);

/* out (n) = a + b; out may equal a or b. */
void residual_forward(float *out, const float *a, const float *b, size_t n);
/* da += dout, db += dout (n each). */
void residual_backward(float *da, float *db, const float *dout, size_t n);

/* Rotary tables cos, sin (n_pos, D/2) for positions 0..n_pos-1 with
 * D = cfg->head_dim: angle(pos, i) = pos * inv_freq[i], inv_freq[i] =
 * theta^(-2i/D) rescaled by cfg->rope_scaling as Hugging Face does ("linear":
 * divided by rope_factor; "llama3": low frequencies divided by rope_factor,
 * high ones kept, the band between interpolated). Computed in double. */
void rope_init(float *cos, float *sin, int n_pos, const model_config *cfg);
/* Rotates inp (B,T,H,D) into out in Hugging Face's rotate_half convention
 * (element i pairs with i + D/2) at positions pos0..pos0+T-1 of the tables
 * cos, sin (n_pos, D/2). out may equal inp. */
void rope_forward(float *out, const float *inp, const float *cos, const float *sin, int B, int T,
                  int H, int D, int pos0);
/* dinp (B,T,H,D) += the inverse rotation of dout; dinp must not be dout. */
void rope_backward(float *dinp, const float *dout, const float *cos, const float *sin, int B, int T,
                   int H, int D, int pos0);
/* out (B,T,H,D) = the inverse rotation of inp (rope_backward into zeros);
 * out may equal inp. */
void rope_unrotate(float *out, const float *inp, const float *cos, const float *sin, int B, int T,
                   int H, int D, int pos0);

/* Causal grouped-query attention with an optional prefix, scale 1/sqrt(D).
 * q is (B,T,Hq,D); k, v are (B,T,Hkv,D); query head h reads kv head
 * h / (Hq/Hkv). kp, vp are P prefix keys/values shared by the batch: row j
 * (Hkv*D floats) at kp + j*pstride (NULL when P is 0); every query attends
 * to all P of them and to the real keys at or before it. out is (B,T,Hq,D).
 * Heads are spread over the team: scratch holds T*(P+T) floats for the
 * calling thread (the helpers have their own). */
void attention_forward(float *out, float *scratch, const float *q, const float *k, const float *v,
                       const float *kp, const float *vp, size_t pstride, int B, int T, int P,
                       int Hq, int Hkv, int D);
/* As attention_forward, keeping every head's probabilities in probs
 * (B,Hq,T,P+T) for attention_grad instead of using a scratch: memory for
 * the time of rebuilding them in the backward. */
void attention_forward_keep(float *out, float *probs, const float *q, const float *k,
                            const float *v, const float *kp, const float *vp, size_t pstride, int B,
                            int T, int P, int Hq, int Hkv, int D);
/* Gradients of attention_forward: dq (B,T,Hq,D), dk, dv (B,T,Hkv,D) and,
 * when not NULL, dkp, dvp (P rows of Hkv*D floats, dpstride apart). The
 * probabilities are recomputed, a head at a time per thread, instead of
 * being kept: scratch holds 2*T*(P+T) floats for the calling thread. Prefix
 * gradients add up over the batch in batch order. */
void attention_backward(float *dq, float *dk, float *dv, float *dkp, float *dvp, size_t dpstride,
                        float *scratch, const float *dout, const float *q, const float *k,
                        const float *v, const float *kp, const float *vp, size_t pstride, int B,
                        int T, int P, int Hq, int Hkv, int D);
/* As attention_backward, but dq, dk and dv are written (=), not added to
 * (dkp and dvp are still added to), and with probs not NULL the
 * probabilities kept by attention_forward_keep are read instead of being
 * rebuilt; scratch then needs only T*(P+T) floats. */
void attention_grad(float *dq, float *dk, float *dv, float *dkp, float *dvp, size_t dpstride,
                    float *scratch, const float *probs, const float *dout, const float *q,
                    const float *k, const float *v, const float *kp, const float *vp,
                    size_t pstride, int B, int T, int P, int Hq, int Hkv, int D);

/* out (N,IC) = silu(gate) * up, silu(g) = g * sigmoid(g). */
void swiglu_forward(float *out, const float *gate, const float *up, int N, int IC);
/* dgate, dup (N,IC) += the gradients of swiglu_forward given dout (N,IC). */
void swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                     const float *up, int N, int IC);
/* As swiglu_backward, writing (=) dgate and dup instead of adding. */
void swiglu_grad(float *dgate, float *dup, const float *dout, const float *gate, const float *up,
                 int N, int IC);

/* Cross-entropy of logits (N,V) against labels (N), label -100 ignored.
 * lse (N) gets each row's log-sum-exp (for the backward). Returns the SUM of
 * the counted rows' losses and writes their number to *count. Labels must
 * be -100 or in [0, V). */
double crossentropy_forward(float *lse, const float *logits, const int32_t *labels, int N, int V,
                            long *count);
/* The same loss a row at a time, for logits formed in chunks of rows:
 * lse (n) as crossentropy_forward's and loss (n) each row's loss in double
 * (0 for label -100). Rows are independent. */
void crossentropy_rows(float *lse, double *loss, const float *logits, const int32_t *labels, int n,
                       int V);
/* The sum of the row losses loss (N) of counted rows, in the order of
 * crossentropy_forward: the same bits as it returns for the same logits. */
double crossentropy_total(const double *loss, const int32_t *labels, int N, long *count);
/* dlogits (N,V) += scale * (softmax(logits) - onehot(label)) on counted
 * rows: the gradient of scale * the summed loss (scale = 1/count for the
 * mean). lse from crossentropy_forward. */
void crossentropy_backward(float *dlogits, const float *logits, const float *lse,
                           const int32_t *labels, int N, int V, float scale);
/* As crossentropy_backward, writing (=) every row of dlogits instead of
 * adding: ignored rows become zeros. dlogits may be logits (in place). */
void crossentropy_grad(float *dlogits, const float *logits, const float *lse, const int32_t *labels,
                       int N, int V, float scale);

#endif
