/* The Llama decoder's forward and backward (model.h): the layers of
 * kernels.c composed over activations allocated once, with every weight,
 * extra linear term, prefix and gradient going through the hooks of the
 * peft object (peft.h). model_config_* and model_files_* live in
 * modelcfg.c and modelfile.c. */
#include "model/model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/clshead.h"
#include "model/kernels.h"
#include "base/log.h"
#include "model/peft.h"
#include "base/team.h"

/* Rows of logits formed at once, in the forward's loss and in the
 * backward: bounds the logits buffer near CE_FLOATS floats instead of B*T*V
 * (a 128k vocabulary times 512 tokens is 256 MB), and at least CE_MIN_ROWS
 * rows, so that lm_head's products stay large. The backward turns a chunk's
 * logits into their gradient in place. */
#define CE_FLOATS (1 << 22)
#define CE_MIN_ROWS 256

static size_t ce_rows(size_t N, size_t V) {
    size_t rows = CE_FLOATS / V;
    if (rows < CE_MIN_ROWS) rows = CE_MIN_ROWS;
    return rows < N ? rows : N;
}

/* What one layer keeps from its forward for its backward. N = B*T rows. */
typedef struct layer_acts {
    float *resid;  /* (N,C) the layer's input */
    float *rstd1;  /* (N) input_layernorm's reciprocal RMS */
    float *q;      /* (N,Hq*D) after bias, method term and rotary */
    float *k;      /* (N,Hkv*D) after bias, method term and rotary */
    float *v;      /* (N,Hkv*D) after bias and method term */
    float *atty;   /* (N,Hq*D) attention output: o_proj's input */
    float *resid2; /* (N,C) after the attention's residual add */
    float *rstd2;  /* (N) post_attention_layernorm's reciprocal RMS */
    float *gate;   /* (N,I) gate_proj's output */
    float *up;     /* (N,I) up_proj's output */
    float *h;      /* (N,I) silu(gate) * up: down_proj's input */
    float *probs;  /* (B,Hq,T,P+T) attention probabilities, or NULL (see keep_probs) */
} layer_acts;

struct model {
    model_view v;  /* the base and the method */
    int B, T;      /* capacity */
    int P;         /* the longest prefix the buffers hold, from the method at create */
    int n_store;   /* layers whose activations are kept: all when training, else 1 */
    int recompute; /* layers keep only their input; the backward recomputes the rest */

    float *mem;                 /* every float buffer below, one allocation */
    size_t mem_bytes;           /* its size */
    float *rope_cos, *rope_sin; /* (P+T, D/2) */
    layer_acts *layers;         /* n_store */
    float *resid_out;           /* (N,C) the last layer's output */
    float *rstdf;               /* (N) the final norm's reciprocal RMS */
    float *lnf;                 /* (N,C) the final norm's output: lm_head's input */
    float *logits;              /* (ce_rows,V) a chunk of rows, then its gradient */
    float *lse;                 /* (N) log-sum-exp of each row of logits */
    double *row_loss;           /* (N) each row's loss, summed in a fixed order */
    float *logits_all;          /* (N,V) for forwards without labels, allocated at the first */
    const float *out_logits;    /* what model_logits returns: the last forward's, or NULL */
    int held;                   /* the chunk (first row) whose logits m->logits holds; -1: none */
    /* scratch of one layer at a time */
    float *ln;    /* (N,C) a norm's output */
    float *attsc; /* 2 * (T,P+T) attention scratch */
    /* gradients (only with a peft object) */
    float *xhat;             /* (N,C) a norm's normalised input, rebuilt */
    float *dresid;           /* (N,C) the residual stream */
    float *dln;              /* (N,C) a norm's output */
    float *dxhat;            /* (N,C) a norm's normalised input */
    float *datty;            /* (N,Hq*D) */
    float *dq;               /* (N,Hq*D) after rotary, then unrotated in place */
    float *dk, *dv;          /* (N,Hkv*D), dk as dq */
    float *dh, *dgate, *dup; /* (N,I) */
    float *dkp, *dvp;        /* (P,Hkv*D) */

    clshead *cls; /* the score head in place of lm_head (sequence classification), or NULL */

    int32_t *tokens, *labels; /* (N) copies of the last forward's batch */
    int fB, fT, fP;           /* the last forward's shape and rotary offset; fB 0: none */
    int f_labels;             /* the last forward had labels */
};

/* ---- hooks ------------------------------------------------------------------ */

const float *model_view_weight(const model_view *v, int layer, int kind) {
    peft *p = v->p;
    if (p && p->method->weight) {
        const float *w = p->method->weight(p, layer, kind);
        if (w) return w;
    }
    return layer == MODEL_GLOBAL ? v->w->global[kind] : v->w->layer[layer][kind];
}

const float *model_view_bias(const model_view *v, int layer, int kind) {
    return model_weight_shape(v->cfg, layer, kind, NULL, NULL) ? model_view_weight(v, layer, kind)
                                                               : NULL;
}

const float *model_view_lm_head(const model_view *v) {
    return model_view_weight(v, MODEL_GLOBAL, v->cfg->tie_word_embeddings ? GW_EMBED : GW_LM_HEAD);
}

kweight model_view_matrix(const model_view *v, int layer, int kind) {
    peft *p = v->p;
    if (p && p->method->weight) {
        const float *w = p->method->weight(p, layer, kind);
        if (w) return (kweight){w, peft_weight_bf16(p, layer, kind)};
    }
    return model_weights_get(v->w, layer, kind);
}

kweight model_view_head(const model_view *v) {
    return model_view_matrix(v, MODEL_GLOBAL, v->cfg->tie_word_embeddings ? GW_EMBED : GW_LM_HEAD);
}

/* Whether the method trains a norm's weight. A method that trains a weight
 * must return its effective value from weight() (else the forward would not
 * see the training), so NULL means frozen: the backward may then skip the
 * norm's output gradient where nothing below needs it. */
static int norm_trains(const model *m, int layer, int kind) {
    peft *p = m->v.p;
    return p && p->method->weight && p->method->weight(p, layer, kind) != NULL;
}

int model_view_prefix(const model_view *v, int layer, const float **k, const float **val,
                      size_t *stride) {
    peft *p = v->p;
    *k = *val = NULL;
    *stride = 0;
    if (!p || !p->method->prefix) return 0;
    int P = p->method->prefix(p, layer, k, val, stride);
    return P > 0 ? P : 0;
}

void model_view_hook(const model_view *v, int layer, int kind, const float *x, float *y, int n) {
    peft *p = v->p;
    if (p && p->method->linear_forward) p->method->linear_forward(p, layer, kind, x, y, n);
}

/* The hooks run with BLAS single-threaded, like everything in a forward
 * or backward: a method's large products go through kernels.h, on the team. */
static void hook_backward(model *m, int layer, int kind, const float *x, const float *dy, float *dx,
                          int n) {
    peft *p = m->v.p;
    if (p->method->linear_backward) p->method->linear_backward(p, layer, kind, x, dy, dx, n);
}

/* ---- memory ------------------------------------------------------------------- */

static layer_acts *acts(model *m, int layer) {
    return &m->layers[m->n_store > 1 ? layer : 0];
}

/* Whether training keeps each layer's attention probabilities for the
 * backward, which then need not rebuild them (a fifth of the attention
 * backward's work, measured at T=128): when they add at most a quarter to
 * what a layer keeps anyway. Long sequences rebuild them instead of
 * holding T^2 floats per head. */
static int keep_probs(const model *m, int grads) {
    const model_config *c = m->v.cfg;
    size_t N = (size_t)m->B * m->T, qd = (size_t)c->num_heads * c->head_dim;
    size_t kvd = (size_t)c->num_kv_heads * c->head_dim, S = (size_t)m->P + m->T;
    size_t acts =
        N * (2 * (size_t)c->hidden_size + 2 * qd + 2 * kvd + 3 * (size_t)c->intermediate_size);
    size_t probs = (size_t)m->B * c->num_heads * m->T * S;
    return grads && m->n_store > 1 && 4 * probs <= acts;
}

/* Lays the buffers out in m->mem (64-byte aligned); with base NULL only
 * counts. Every view is a multiple of 16 floats, so each starts on a 64-byte
 * boundary. */
static size_t layout(model *m, float *base, int grads) {
    const model_config *c = m->v.cfg;
    size_t N = (size_t)m->B * m->T, C = c->hidden_size, IC = c->intermediate_size;
    size_t V = c->vocab_size, qd = (size_t)c->num_heads * c->head_dim;
    size_t kvd = (size_t)c->num_kv_heads * c->head_dim, S = (size_t)m->P + m->T;
    size_t off = 0, probs = keep_probs(m, grads) ? (size_t)m->B * c->num_heads * m->T * S : 0;
    m->rope_cos = model_arena_take(base, &off, S * (c->head_dim / 2));
    m->rope_sin = model_arena_take(base, &off, S * (c->head_dim / 2));
    for (int l = 0; l < m->n_store; l++) {
        layer_acts *a = &m->layers[l];
        if (l > 0 && m->recompute) { /* its own input; the rest is layer 0's, shared */
            float *resid = model_arena_take(base, &off, N * C);
            *a = m->layers[0];
            a->resid = resid;
            continue;
        }
        a->resid = model_arena_take(base, &off, N * C);
        a->rstd1 = model_arena_take(base, &off, N);
        a->q = model_arena_take(base, &off, N * qd);
        a->k = model_arena_take(base, &off, N * kvd);
        a->v = model_arena_take(base, &off, N * kvd);
        a->atty = model_arena_take(base, &off, N * qd);
        a->resid2 = model_arena_take(base, &off, N * C);
        a->rstd2 = model_arena_take(base, &off, N);
        a->gate = model_arena_take(base, &off, N * IC);
        a->up = model_arena_take(base, &off, N * IC);
        a->h = model_arena_take(base, &off, N * IC);
        a->probs = probs ? model_arena_take(base, &off, probs) : NULL;
    }
    m->resid_out = model_arena_take(base, &off, N * C);
    m->rstdf = model_arena_take(base, &off, N);
    m->lnf = model_arena_take(base, &off, N * C);
    /* A score head (sequence classification) replaces lm_head: no (N,V)
     * logits, which for a large vocabulary would be most of the memory. */
    size_t LV = m->v.p && m->v.p->num_labels > 0 ? 0 : V;
    m->logits = model_arena_take(base, &off, ce_rows(N, V) * LV);
    m->lse = model_arena_take(base, &off, N);
    m->row_loss = (double *)model_arena_take(base, &off, 2 * N);
    m->ln = model_arena_take(base, &off, N * C);
    m->attsc = model_arena_take(base, &off, 2 * (size_t)m->T * S);
    if (grads) {
        m->xhat = model_arena_take(base, &off, N * C);
        m->dresid = model_arena_take(base, &off, N * C);
        m->dln = model_arena_take(base, &off, N * C);
        m->dxhat = model_arena_take(base, &off, N * C);
        m->datty = model_arena_take(base, &off, N * qd);
        m->dq = model_arena_take(base, &off, N * qd);
        m->dk = model_arena_take(base, &off, N * kvd);
        m->dv = model_arena_take(base, &off, N * kvd);
        m->dh = model_arena_take(base, &off, N * IC);
        m->dgate = model_arena_take(base, &off, N * IC);
        m->dup = model_arena_take(base, &off, N * IC);
        m->dkp = model_arena_take(base, &off, (size_t)m->P * kvd);
        m->dvp = model_arena_take(base, &off, (size_t)m->P * kvd);
    }
    return off;
}

static int check_config(const model_config *c, err *e) {
    if (c->vocab_size < 1 || c->hidden_size < 1 || c->intermediate_size < 1 || c->num_layers < 1 ||
        c->num_heads < 1 || c->num_kv_heads < 1 || c->head_dim < 2)
        return err_set(e,
                       "model config: vocab_size %d, hidden_size %d, intermediate_size %d, "
                       "layers %d, heads %d, kv heads %d, head_dim %d: all must be positive",
                       c->vocab_size, c->hidden_size, c->intermediate_size, c->num_layers,
                       c->num_heads, c->num_kv_heads, c->head_dim);
    if (c->num_heads % c->num_kv_heads)
        return err_set(e, "model config: %d attention heads are not a multiple of %d kv heads",
                       c->num_heads, c->num_kv_heads);
    if (c->head_dim % 2)
        return err_set(e, "model config: head_dim %d is odd; rotary embeddings need pairs",
                       c->head_dim);
    return 0;
}

int model_create(model **out, const model_config *cfg, const model_weights *w, peft *p, int B,
                 int T, err *e) {
    return model_create_opts(out, cfg, w, p, B, T, NULL, e);
}

int model_create_opts(model **out, const model_config *cfg, const model_weights *w, peft *p, int B,
                      int T, const model_opts *opts, err *e) {
    *out = NULL;
    if (check_config(cfg, e) < 0) return -1;
    if (B < 1 || T < 1)
        return err_set(e, "model: batch capacity %d x %d tokens: both must be at least 1", B, T);
    for (int l = 0; l < cfg->num_layers; l++)
        for (int kind = 0; kind < LW_COUNT; kind++) {
            if (!w->layer[l][kind] && !(w->layer16 && w->layer16[l][kind]) &&
                model_weight_shape(cfg, l, kind, NULL, NULL)) {
                char name[160];
                model_weight_name(cfg, l, kind, name, sizeof name);
                return err_set(e, "model: base weight %s is missing", name);
            }
        }
    for (int kind = 0; kind < GW_COUNT; kind++)
        if (!w->global[kind] && !w->global16[kind] &&
            !(kind == GW_LM_HEAD && cfg->tie_word_embeddings))
            return err_set(e, "model: base weight %s is missing",
                           kind == GW_EMBED        ? "embed_tokens"
                           : kind == GW_FINAL_NORM ? "norm"
                                                   : "lm_head");
    model *m = calloc(1, sizeof *m);
    if (!m) return err_set(e, "model: out of memory");
    m->v = (model_view){cfg, w, p};
    m->B = B;
    m->T = T;
    for (int l = 0; l < cfg->num_layers; l++) {
        const float *kp, *vp;
        size_t stride;
        int P = model_view_prefix(&m->v, l, &kp, &vp, &stride);
        if (P > m->P) m->P = P;
    }
    m->n_store = p ? cfg->num_layers : 1;
    m->recompute = p && opts && opts->recompute;
    m->held = -1;
    m->layers = calloc((size_t)m->n_store, sizeof *m->layers);
    size_t N = (size_t)B * T;
    m->tokens = malloc(2 * N * sizeof *m->tokens);
    if (!m->layers || !m->tokens) {
        model_free(m);
        return err_set(e, "model: out of memory");
    }
    size_t n = layout(m, NULL, p != NULL); /* a multiple of 16 floats */
    m->mem = aligned_alloc(64, n * sizeof(float));
    m->mem_bytes = n * sizeof(float);
    if (!m->mem) {
        model_free(m);
        return err_set(e, "model: out of memory for activations of %d x %d tokens (%.1f MB)", B, T,
                       (double)n * sizeof(float) / 1e6);
    }
    m->labels = m->tokens + N;
    layout(m, m->mem, p != NULL);
    rope_init(m->rope_cos, m->rope_sin, m->P + T, cfg);
    if (p && p->num_labels > 0 &&
        clshead_create(&m->cls, B, p->num_labels, cfg->hidden_size, e) < 0) {
        model_free(m);
        return err_wrap(e, "model");
    }
    if (peft_reserve(p, B, T, e) < 0) {
        model_free(m);
        return err_wrap(e, "model");
    }
    *out = m;
    return 0;
}

void model_free(model *m) {
    if (!m) return;
    free(m->mem);
    free(m->logits_all);
    clshead_free(m->cls);
    free(m->layers);
    free(m->tokens);
    free(m);
}

size_t model_workspace_bytes(const model *m) {
    return m->mem_bytes;
}

const float *model_logits(const model *m) {
    return m->cls ? NULL : m->out_logits;
}

const float *model_class_logits(const model *m) {
    return m->cls && m->fB ? clshead_logits(m->cls) : NULL;
}

/* ---- forward ------------------------------------------------------------------ */

void model_layer_forward(const model_view *v, int l, const model_layer_io *io) {
    const model_config *c = v->cfg;
    int B = io->B, T = io->T, N = B * T, C = c->hidden_size, IC = c->intermediate_size;
    int Hq = c->num_heads, Hkv = c->num_kv_heads, D = c->head_dim;
    int qd = Hq * D, kvd = Hkv * D;
    float *ln = io->ln;

    /* q, k and v in one team job, then their hooks (each adds to its own
     * output only, so the order of the products does not matter). */
    rmsnorm_forward(ln, io->rstd1, io->in, model_view_weight(v, l, LW_INPUT_NORM), N, C,
                    c->rms_norm_eps);
    float *qkv[3] = {io->q, io->k, io->v};
    kweight wqkv[3] = {model_view_matrix(v, l, LW_Q), model_view_matrix(v, l, LW_K),
                       model_view_matrix(v, l, LW_V)};
    const float *bqkv[3] = {model_view_bias(v, l, LW_Q_BIAS), model_view_bias(v, l, LW_K_BIAS),
                            model_view_bias(v, l, LW_V_BIAS)};
    int oqkv[3] = {qd, kvd, kvd};
    linears_forward_k(3, qkv, ln, wqkv, bqkv, N, C, oqkv);
    model_view_hook(v, l, LW_Q, ln, io->q, N);
    model_view_hook(v, l, LW_K, ln, io->k, N);
    model_view_hook(v, l, LW_V, ln, io->v, N);
    rope_forward(io->q, io->q, io->rope_cos, io->rope_sin, B, T, Hq, D, io->pos0);
    rope_forward(io->k, io->k, io->rope_cos, io->rope_sin, B, T, Hkv, D, io->pos0);

    if (io->probs)
        attention_forward_keep(io->atty, io->probs, io->q, io->k, io->v, io->kp, io->vp,
                               io->pstride, B, T, io->P, Hq, Hkv, D);
    else
        attention_forward(io->atty, io->attsc, io->q, io->k, io->v, io->kp, io->vp, io->pstride, B,
                          T, io->P, Hq, Hkv, D);
    /* o_proj's output lands on the residual stream directly; its hook adds
     * its term there, which is the same sum. */
    linear_residual_forward_k(io->mid, io->in, io->atty, model_view_matrix(v, l, LW_O),
                              model_view_bias(v, l, LW_O_BIAS), N, qd, C);
    model_view_hook(v, l, LW_O, io->atty, io->mid, N);

    rmsnorm_forward(ln, io->rstd2, io->mid, model_view_weight(v, l, LW_POST_NORM), N, C,
                    c->rms_norm_eps);
    float *gu[2] = {io->gate, io->up};
    kweight wgu[2] = {model_view_matrix(v, l, LW_GATE), model_view_matrix(v, l, LW_UP)};
    const float *bgu[2] = {model_view_bias(v, l, LW_GATE_BIAS), model_view_bias(v, l, LW_UP_BIAS)};
    int ogu[2] = {IC, IC};
    linears_forward_k(2, gu, ln, wgu, bgu, N, C, ogu);
    model_view_hook(v, l, LW_GATE, ln, io->gate, N);
    model_view_hook(v, l, LW_UP, ln, io->up, N);
    swiglu_forward(io->h, io->gate, io->up, N, IC);
    linear_residual_forward_k(io->out, io->mid, io->h, model_view_matrix(v, l, LW_DOWN),
                              model_view_bias(v, l, LW_DOWN_BIAS), N, IC, C);
    model_view_hook(v, l, LW_DOWN, io->h, io->out, N);
}

/* logits (rows,V) of the final norm's output ln (rows,C): lm_head and its hook. */
static void head_logits(const model_view *v, float *logits, const float *ln, int rows) {
    const model_config *c = v->cfg;
    kweight head = model_view_head(v);
    linears_forward_k(1, &logits, ln, &head, NULL, rows, c->hidden_size, &c->vocab_size);
    model_view_hook(v, MODEL_GLOBAL, GW_LM_HEAD, ln, logits, rows);
}

void model_head_forward(const model_view *v, float *logits, float *ln, float *rstd, const float *x,
                        int rows) {
    const model_config *c = v->cfg;
    rmsnorm_forward(ln, rstd, x, model_view_weight(v, MODEL_GLOBAL, GW_FINAL_NORM), rows,
                    c->hidden_size, c->rms_norm_eps);
    head_logits(v, logits, ln, rows);
}

/* The logits of rows r0..r0+n-1 into m->logits, from the final norm's
 * output the forward kept. Rows are formed in the same chunks in the
 * forward and the backward, so both see the same bits. */
static void chunk_logits(model *m, int r0, int n) {
    if (m->held == r0) return;
    head_logits(&m->v, m->logits, m->lnf + (size_t)r0 * m->v.cfg->hidden_size, n);
    m->held = r0;
}

/* The summed loss of the last forward's N rows against m->labels, lm_head
 * taken a chunk of rows at a time, the last chunk first: the backward starts
 * with the first, which the buffer then still holds. The row losses are
 * summed in the order of crossentropy_forward over all rows at once. */
static double head_loss(model *m, int N, long *count) {
    const model_config *c = m->v.cfg;
    int V = c->vocab_size, chunk = (int)ce_rows((size_t)N, (size_t)V);
    rmsnorm_forward(m->lnf, m->rstdf, m->resid_out,
                    model_view_weight(&m->v, MODEL_GLOBAL, GW_FINAL_NORM), N, c->hidden_size,
                    c->rms_norm_eps);
    for (int r0 = (N - 1) / chunk * chunk; r0 >= 0; r0 -= chunk) {
        int n = N - r0 < chunk ? N - r0 : chunk;
        chunk_logits(m, r0, n);
        crossentropy_rows(m->lse + r0, m->row_loss + r0, m->logits, m->labels + r0, n, V);
    }
    m->out_logits = N <= chunk ? m->logits : NULL;
    return crossentropy_total(m->row_loss, m->labels, N, count);
}

/* Layer l of the model's own forward: the stored activations of l. */
static void layer_forward(model *m, int l, float *next, int B, int T) {
    layer_acts *a = acts(m, l);
    model_layer_io io = {.in = a->resid,
                         .mid = a->resid2,
                         .out = next,
                         .ln = m->ln,
                         .rstd1 = a->rstd1,
                         .rstd2 = a->rstd2,
                         .q = a->q,
                         .k = a->k,
                         .v = a->v,
                         .atty = a->atty,
                         .gate = a->gate,
                         .up = a->up,
                         .h = a->h,
                         .probs = a->probs,
                         .attsc = m->attsc,
                         .rope_cos = m->rope_cos,
                         .rope_sin = m->rope_sin,
                         .B = B,
                         .T = T,
                         .pos0 = m->fP};
    io.P = model_view_prefix(&m->v, l, &io.kp, &io.vp, &io.pstride);
    model_layer_forward(&m->v, l, &io);
}

/* Tokens in [0, V) and labels -100 or in [0, V); logs the first offender. */
static int check_batch(const model *m, const int32_t *tokens, const int32_t *labels, int N) {
    int V = m->v.cfg->vocab_size;
    for (int i = 0; i < N; i++) {
        if (tokens[i] < 0 || tokens[i] >= V) {
            log_error("model_forward: token %d at position %d is outside the vocabulary (0..%d)",
                      tokens[i], i, V - 1);
            return -1;
        }
        if (labels && !m->cls && labels[i] != -100 && (labels[i] < 0 || labels[i] >= V)) {
            log_error("model_forward: label %d at position %d is neither -100 nor in 0..%d",
                      labels[i], i, V - 1);
            return -1;
        }
    }
    return 0;
}

double model_forward(model *m, const int32_t *tokens, const int32_t *labels, int B, int T,
                     long *n_tokens) {
    const model_config *c = m->v.cfg;
    int L = c->num_layers, C = c->hidden_size, V = c->vocab_size, N = B * T;
    if (n_tokens) *n_tokens = 0;
    m->fB = 0;
    if (B < 1 || T < 1 || B > m->B || T > m->T) {
        log_error("model_forward: batch %d x %d exceeds the capacity %d x %d given at create", B, T,
                  m->B, m->T);
        return NAN;
    }
    if (check_batch(m, tokens, labels, N) < 0) return NAN;
    const float *kp, *vp;
    size_t stride;
    /* Real tokens follow the prefix (PEFT's past_key_values): positions P..P+T-1. */
    m->fP = model_view_prefix(&m->v, 0, &kp, &vp, &stride);
    for (int l = 0; l < L; l++)
        if (model_view_prefix(&m->v, l, &kp, &vp, &stride) > m->P) {
            log_error("model_forward: layer %d's prefix is longer than the %d positions the "
                      "model was created for",
                      l, m->P);
            return NAN;
        }
    memcpy(m->tokens, tokens, (size_t)N * sizeof *tokens);
    m->f_labels = labels != NULL;
    if (labels) memcpy(m->labels, labels, (size_t)N * sizeof *labels);

    /* The team parallelises; BLAS runs single-threaded throughout, the
     * methods' own products included (see model_backward). */
    team_blas_enter();
    embedding_forward_k(acts(m, 0)->resid, m->tokens,
                        model_view_matrix(&m->v, MODEL_GLOBAL, GW_EMBED), N, C);
    for (int l = 0; l < L; l++)
        layer_forward(m, l, l + 1 < L ? acts(m, l + 1)->resid : m->resid_out, B, T);
    double loss = 0.0;
    m->held = -1;
    m->out_logits = NULL;
    if (m->cls) {
        /* Sequence classification: the score head reads the final norm's
         * output; lm_head is not used. */
        long count;
        rmsnorm_forward(m->lnf, m->rstdf, m->resid_out,
                        model_view_weight(&m->v, MODEL_GLOBAL, GW_FINAL_NORM), N, C,
                        c->rms_norm_eps);
        loss = clshead_forward(m->cls, m->v.p, m->lnf, m->tokens, labels ? m->labels : NULL, B, T,
                               &count);
        if (n_tokens) *n_tokens = count;
        team_blas_leave();
        if (isnan(loss)) return NAN;
        m->fB = B;
        m->fT = T;
        return labels ? loss : 0.0;
    }
    if (labels) {
        long count;
        loss = head_loss(m, N, &count);
        if (n_tokens) *n_tokens = count;
    } else {
        /* The caller wants every row's logits: all at once, as asked. */
        float *dst = m->logits;
        if ((size_t)N > ce_rows((size_t)N, (size_t)V)) {
            if (!m->logits_all)
                m->logits_all =
                    aligned_alloc(64, ((size_t)m->B * m->T * V + 15) / 16 * 16 * sizeof(float));
            if (!m->logits_all) {
                team_blas_leave();
                log_error("model_forward: out of memory for the logits of %d x %d tokens", B, T);
                return NAN;
            }
            dst = m->logits_all;
        }
        model_head_forward(&m->v, dst, m->lnf, m->rstdf, m->resid_out, N);
        m->out_logits = dst;
    }
    m->fB = B;
    m->fT = T;
    team_blas_leave();
    return loss;
}

/* ---- backward ----------------------------------------------------------------- */

/* A norm (layer, kind) whose output gradient is dln, whose normalised input
 * is already in xhat and whose reciprocal RMS was rstd: forms dxhat through
 * the weight, lets the method add its share and take the weight's gradient,
 * then adds the input gradient into dinp unless dinp is NULL. */
static void norm_backward(model *m, int layer, int kind, float *dinp, const float *rstd, int N) {
    int C = m->v.cfg->hidden_size;
    /* dxhat = dln * weight, written: scale_backward into zeros, one pass. */
    scale_forward(m->dxhat, m->dln, model_view_weight(&m->v, layer, kind), N, C);
    hook_backward(m, layer, kind, m->xhat, m->dln, m->dxhat, N);
    if (dinp) rmsnorm_backward(dinp, m->dxhat, m->xhat, rstd, N, C);
}

/* Backward of layer l: m->dresid holds the gradient of its output and is
 * left holding that of its input (when input_grad). Products that write a
 * gradient buffer first write it (beta 0) rather than add to zeros. */
static void layer_backward(model *m, int l, int input_grad) {
    const model_config *c = m->v.cfg;
    peft *p = m->v.p;
    int B = m->fB, T = m->fT, N = B * T, C = c->hidden_size, IC = c->intermediate_size;
    int Hq = c->num_heads, Hkv = c->num_kv_heads, D = c->head_dim;
    int qd = Hq * D, kvd = Hkv * D;
    layer_acts *a = acts(m, l);
    /* With recomputation the layers share one set of activations, which
     * holds the top layer's after the forward; below it, the layer's
     * forward runs again from its kept input, the same bits as the first
     * time (its output rewrites the next layer's input with equal values). */
    if (m->recompute && l + 1 < c->num_layers) layer_forward(m, l, acts(m, l + 1)->resid, B, T);

    /* MLP: the residual passes dresid both to resid2 and to down_proj's output. */
    rmsnorm_rebuild(m->xhat, m->ln, a->resid2, a->rstd2, model_view_weight(&m->v, l, LW_POST_NORM),
                    N, C);
    kweight wdown = model_view_matrix(&m->v, l, LW_DOWN);
    const float *dres = m->dresid;
    linears_backward_input_k(m->dh, 0, 1, &dres, &wdown, N, IC, &C);
    hook_backward(m, l, LW_DOWN, a->h, m->dresid, m->dh, N);
    swiglu_grad(m->dgate, m->dup, m->dh, a->gate, a->up, N, IC);
    const float *dgu[2] = {m->dgate, m->dup};
    kweight wgu[2] = {model_view_matrix(&m->v, l, LW_GATE), model_view_matrix(&m->v, l, LW_UP)};
    int ogu[2] = {IC, IC};
    linears_backward_input_k(m->dln, 0, 2, dgu, wgu, N, C, ogu);
    hook_backward(m, l, LW_GATE, m->ln, m->dgate, m->dln, N);
    hook_backward(m, l, LW_UP, m->ln, m->dup, m->dln, N);
    norm_backward(m, l, LW_POST_NORM, m->dresid, a->rstd2, N);

    /* Attention: dresid is now the gradient of resid2, passed to the layer
     * input and to o_proj's output. */
    kweight wo = model_view_matrix(&m->v, l, LW_O);
    linears_backward_input_k(m->datty, 0, 1, &dres, &wo, N, qd, &C);
    hook_backward(m, l, LW_O, a->atty, m->dresid, m->datty, N);
    const float *kp, *vp;
    size_t pstride;
    int P = model_view_prefix(&m->v, l, &kp, &vp, &pstride);
    int train_prefix = P && p->method->prefix_backward;
    if (train_prefix) {
        memset(m->dkp, 0, (size_t)P * kvd * sizeof(float));
        memset(m->dvp, 0, (size_t)P * kvd * sizeof(float));
    }
    attention_grad(m->dq, m->dk, m->dv, train_prefix ? m->dkp : NULL, train_prefix ? m->dvp : NULL,
                   (size_t)kvd, m->attsc, a->probs, m->datty, a->q, a->k, a->v, kp, vp, pstride, B,
                   T, P, Hq, Hkv, D);
    if (train_prefix) p->method->prefix_backward(p, l, m->dkp, m->dvp, (size_t)kvd);
    rope_unrotate(m->dq, m->dq, m->rope_cos, m->rope_sin, B, T, Hq, D, m->fP);
    rope_unrotate(m->dk, m->dk, m->rope_cos, m->rope_sin, B, T, Hkv, D, m->fP);

    /* q, k, v read the input norm's output; biases' gradients are the
     * methods', from dy. Their input gradient dln is needed for the layer's
     * input gradient or for a trained input norm; otherwise the hooks get
     * dx NULL and the three products are skipped. */
    rmsnorm_rebuild(m->xhat, m->ln, a->resid, a->rstd1, model_view_weight(&m->v, l, LW_INPUT_NORM),
                    N, C);
    float *dln = input_grad || norm_trains(m, l, LW_INPUT_NORM) ? m->dln : NULL;
    if (dln) {
        const float *dqkv[3] = {m->dq, m->dk, m->dv};
        kweight wqkv[3] = {model_view_matrix(&m->v, l, LW_Q), model_view_matrix(&m->v, l, LW_K),
                           model_view_matrix(&m->v, l, LW_V)};
        int oqkv[3] = {qd, kvd, kvd};
        linears_backward_input_k(dln, 0, 3, dqkv, wqkv, N, C, oqkv);
    }
    hook_backward(m, l, LW_Q, m->ln, m->dq, dln, N);
    hook_backward(m, l, LW_K, m->ln, m->dk, dln, N);
    hook_backward(m, l, LW_V, m->ln, m->dv, dln, N);
    if (dln) norm_backward(m, l, LW_INPUT_NORM, input_grad ? m->dresid : NULL, a->rstd1, N);
}

void model_backward(model *m, float loss_scale) {
    const model_config *c = m->v.cfg;
    peft *p = m->v.p;
    if (!p) return;
    if (!m->fB || !m->f_labels) {
        log_error("model_backward: the last forward %s", m->fB ? "had no labels"
                                                               : "failed or "
                                                                 "never ran");
        return;
    }
    int L = c->num_layers, C = c->hidden_size, V = c->vocab_size, N = m->fB * m->fT;
    int first = p->first_trainable_layer;
    first = first < -1 ? -1 : first > L ? L : first;
    /* As in the forward: the team parallelises, BLAS stays single-threaded
     * (an OpenBLAS pool left idle would spin against the team). */
    team_blas_enter();

    /* lm_head and the loss, a chunk of rows at a time; dln is the final
     * norm's output gradient, not needed when only lm_head trains. */
    kweight head = model_view_head(&m->v);
    float *dln = first < L || norm_trains(m, MODEL_GLOBAL, GW_FINAL_NORM) ? m->dln : NULL;
    int chunk = (int)ce_rows((size_t)N, (size_t)V);
    /* With a score head in place of lm_head, the head gives dln. */
    if (m->cls) clshead_backward(m->cls, p, dln, m->fT, loss_scale);
    for (int r0 = 0; !m->cls && r0 < N; r0 += chunk) {
        int n = N - r0 < chunk ? N - r0 : chunk;
        const float *dlogits = m->logits;
        chunk_logits(m, r0, n);
        crossentropy_grad(m->logits, m->logits, m->lse + r0, m->labels + r0, n, V, loss_scale);
        m->held = -1; /* now the chunk's gradient */
        m->out_logits = NULL;
        float *dx = dln ? dln + (size_t)r0 * C : NULL;
        if (dx) linears_backward_input_k(dx, 0, 1, &dlogits, &head, n, C, &V);
        hook_backward(m, MODEL_GLOBAL, GW_LM_HEAD, m->lnf + (size_t)r0 * C, m->logits, dx, n);
    }
    if (first < L) memset(m->dresid, 0, (size_t)N * C * sizeof(float));
    if (dln) {
        rmsnorm_normalize(m->xhat, m->resid_out, m->rstdf, N, C);
        norm_backward(m, MODEL_GLOBAL, GW_FINAL_NORM, first < L ? m->dresid : NULL, m->rstdf, N);
    }
    for (int l = L - 1; l >= 0 && l >= first; l--) layer_backward(m, l, l > first);
    if (first < 0 && p->method->embed_backward)
        p->method->embed_backward(p, m->tokens, m->dresid, N);
    if (p->method->end_backward) p->method->end_backward(p);
    team_blas_leave();
}
