/* Generation (generate.h): model.c's decoder layers (model_layer_forward)
 * run a chunk of tokens at a time over a per-layer KV cache, so that its
 * logits match model_forward's to float rounding (model_forward is the
 * reference path, kept here behind the same API) and sampling. */
#include "model/generate.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/kernels.h"

/* Tokens computed at once by a cached feed: bounds the scratch (a prompt of
 * any length is fed in chunks, each attending to the cache of the ones
 * before, which is what the cache is for). */
#define GEN_CHUNK 64

struct generator {
    model_view v; /* the base and the method, as model.c reads them */
    int cap;      /* real tokens at most */
    int P;        /* prefix positions, the first cache entries */
    int n;        /* real tokens held */
    int use_cache;
    int have_last; /* last holds the logits of the last token fed */

    /* cache: (L, S, Hkv*D) keys and values, S = P + cap; keys rotated */
    float *kc, *vc;
    float *rope_cos, *rope_sin; /* (S, D/2) */
    /* scratch of one chunk of GEN_CHUNK tokens */
    float *x, *ln, *rstd, *q, *atty, *gate, *up, *h, *attsc;
    float *last; /* (V) */
    float *mem;  /* every buffer above */

    /* the reference path */
    model *m;
    int32_t *hist; /* (cap) tokens fed so far */

    /* sampling scratch */
    int32_t *order; /* (V) token ids, most likely first */
    float *clean;   /* (V) logits with NaN as -infinity */
    double *wt;     /* (V) unnormalised probabilities in `order` */
};

/* ---- open / close ------------------------------------------------------------- */

void generate_opts_default(generate_opts *o) {
    o->max_new_tokens = 128;
    o->temperature = 1.0f;
    o->top_k = 0;
    o->top_p = 1.0f;
    o->seed = 0;
}

static size_t gen_layout(generator *g, float *base) {
    const model_config *c = g->v.cfg;
    size_t C = (size_t)c->hidden_size, IC = (size_t)c->intermediate_size;
    size_t qd = (size_t)c->num_heads * c->head_dim, kvd = (size_t)c->num_kv_heads * c->head_dim;
    size_t S = (size_t)g->P + (size_t)g->cap, L = (size_t)c->num_layers, N = GEN_CHUNK;
    size_t off = 0;
    g->last = model_arena_take(base, &off, c->vocab_size);
    if (g->use_cache) {
        g->kc = model_arena_take(base, &off, L * S * kvd);
        g->vc = model_arena_take(base, &off, L * S * kvd);
        g->rope_cos = model_arena_take(base, &off, S * (size_t)(c->head_dim / 2));
        g->rope_sin = model_arena_take(base, &off, S * (size_t)(c->head_dim / 2));
        g->x = model_arena_take(base, &off, N * C);
        g->ln = model_arena_take(base, &off, N * C);
        g->rstd = model_arena_take(base, &off, N);
        g->q = model_arena_take(base, &off, N * qd);
        g->atty = model_arena_take(base, &off, N * qd);
        g->gate = model_arena_take(base, &off, N * IC);
        g->up = model_arena_take(base, &off, N * IC);
        g->h = model_arena_take(base, &off, N * IC);
        g->attsc = model_arena_take(base, &off, N * S);
    }
    return off;
}

int generate_open(generator **out, const model_config *cfg, const model_weights *w, peft *p,
                  int max_tokens, int use_cache, err *e) {
    *out = NULL;
    if (max_tokens < 1)
        return err_set(e, "generate: room for %d tokens: at least 1 is needed", max_tokens);
    generator *g = calloc(1, sizeof *g);
    if (!g) return err_set(e, "generate: out of memory");
    g->v = (model_view){cfg, w, p};
    g->cap = max_tokens;
    g->use_cache = use_cache;
    if (p) peft_set_step(p, 0, 0, 0, 0);
    for (int l = 0; l < cfg->num_layers; l++) {
        const float *k, *v;
        size_t stride;
        int P = model_view_prefix(&g->v, l, &k, &v, &stride);
        if (l == 0) g->P = P;
        if (P != g->P) {
            generate_close(g);
            return err_set(e,
                           "generate: layer %d's prefix has %d positions but layer 0's has %d; "
                           "the cache needs one length",
                           l, P, g->P);
        }
    }
    size_t V = (size_t)cfg->vocab_size;
    g->order = malloc(V * sizeof *g->order);
    g->clean = malloc(V * sizeof *g->clean);
    g->wt = malloc(V * sizeof *g->wt);
    g->hist = malloc((size_t)max_tokens * sizeof *g->hist);
    size_t n = gen_layout(g, NULL);
    g->mem = aligned_alloc(64, n * sizeof(float));
    if (!g->order || !g->clean || !g->wt || !g->hist || !g->mem) {
        generate_close(g);
        return err_set(e, "generate: out of memory for %d tokens (%.1f MB of cache and scratch)",
                       max_tokens, (double)n * sizeof(float) / 1e6);
    }
    gen_layout(g, g->mem);
    if (use_cache) {
        rope_init(g->rope_cos, g->rope_sin, g->P + g->cap, cfg);
        if (peft_reserve(p, 1, GEN_CHUNK, e) < 0) {
            generate_close(g);
            return err_wrap(e, "generate");
        }
    } else if (model_create(&g->m, cfg, w, p, 1, max_tokens, e) < 0) {
        generate_close(g);
        return err_wrap(e, "generate");
    }
    generate_reset(g);
    *out = g;
    return 0;
}

void generate_close(generator *g) {
    if (!g) return;
    model_free(g->m);
    free(g->mem);
    free(g->hist);
    free(g->order);
    free(g->clean);
    free(g->wt);
    free(g);
}

void generate_reset(generator *g) {
    g->n = 0;
    g->have_last = 0;
    if (g->v.p) peft_set_step(g->v.p, 0, 0, 0, 0);
    if (!g->use_cache || !g->P) return;
    /* The prefix keys are used as the method gives them (no rotation), as
     * PEFT's past_key_values are. */
    const model_config *c = g->v.cfg;
    size_t kvd = (size_t)c->num_kv_heads * c->head_dim, S = (size_t)g->P + g->cap;
    for (int l = 0; l < c->num_layers; l++) {
        const float *k, *v;
        size_t stride;
        model_view_prefix(&g->v, l, &k, &v, &stride);
        for (int j = 0; j < g->P; j++) {
            memcpy(g->kc + ((size_t)l * S + j) * kvd, k + (size_t)j * stride, kvd * sizeof(float));
            memcpy(g->vc + ((size_t)l * S + j) * kvd, v + (size_t)j * stride, kvd * sizeof(float));
        }
    }
}

int generate_length(const generator *g) {
    return g->n;
}

const float *generate_last_logits(const generator *g) {
    return g->have_last ? g->last : NULL;
}

/* ---- the cached forward ------------------------------------------------------- */

/* N <= GEN_CHUNK tokens at real positions n..n+N-1; their keys and values
 * join the cache. Logits of every row go to logits (N,V) when not NULL; the
 * last row's always to g->last. */
static void gen_chunk(generator *g, const int32_t *tokens, int N, float *logits) {
    const model_config *c = g->v.cfg;
    int C = c->hidden_size, V = c->vocab_size, kvd = c->num_kv_heads * c->head_dim;
    size_t S = (size_t)g->P + g->cap;
    int pos0 = g->P + g->n; /* cache entries before the chunk: prefix and past tokens */

    embedding_forward_k(g->x, tokens, model_view_matrix(&g->v, MODEL_GLOBAL, GW_EMBED), N, C);
    /* Every cache entry before the chunk (the method's prefix, then past
     * tokens) acts as a prefix all of its queries see; within the chunk
     * attention is causal. The stream is updated in place. */
    model_layer_io io = {.in = g->x,
                         .mid = g->x,
                         .out = g->x,
                         .ln = g->ln,
                         .rstd1 = g->rstd,
                         .rstd2 = g->rstd,
                         .q = g->q,
                         .atty = g->atty,
                         .gate = g->gate,
                         .up = g->up,
                         .h = g->h,
                         .attsc = g->attsc,
                         .rope_cos = g->rope_cos,
                         .rope_sin = g->rope_sin,
                         .pstride = (size_t)kvd,
                         .P = pos0,
                         .B = 1,
                         .T = N,
                         .pos0 = pos0};
    for (int l = 0; l < c->num_layers; l++) {
        float *kl = g->kc + (size_t)l * S * kvd, *vl = g->vc + (size_t)l * S * kvd;
        io.k = kl + (size_t)pos0 * kvd; /* (N, kvd): the chunk's own cache rows */
        io.v = vl + (size_t)pos0 * kvd;
        io.kp = pos0 ? kl : NULL;
        io.vp = pos0 ? vl : NULL;
        model_layer_forward(&g->v, l, &io);
    }
    /* Without a request for every row only the last is projected: the
     * vocabulary product dominates a long prompt otherwise. */
    int first = logits ? 0 : N - 1;
    float *dst = logits ? logits : g->last;
    model_head_forward(&g->v, dst, g->ln, g->rstd, g->x + (size_t)first * C, N - first);
    if (logits) memcpy(g->last, logits + (size_t)(N - 1) * V, (size_t)V * sizeof(float));
    g->n += N;
}

/* The reference: the whole sequence through model_forward. */
static int gen_recompute(generator *g, int n_new, float *logits, err *e) {
    int V = g->v.cfg->vocab_size;
    double r = model_forward(g->m, g->hist, NULL, 1, g->n + n_new, NULL);
    if (isnan(r))
        return err_set(e, "generate: the model's forward failed over %d tokens (see the log)",
                       g->n + n_new);
    const float *all = model_logits(g->m);
    if (logits) memcpy(logits, all + (size_t)g->n * V, (size_t)n_new * V * sizeof(float));
    memcpy(g->last, all + (size_t)(g->n + n_new - 1) * V, (size_t)V * sizeof(float));
    g->n += n_new;
    return 0;
}

int generate_feed(generator *g, const int32_t *tokens, int n, float *logits, err *e) {
    int V = g->v.cfg->vocab_size;
    if (n < 1) return err_set(e, "generate: nothing to feed (%d tokens)", n);
    if (n > g->cap - g->n)
        return err_set(e,
                       "generate: %d more tokens would exceed the %d the generator was opened "
                       "for (%d held)",
                       n, g->cap, g->n);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return err_set(e, "generate: token %d (at %d) is outside the vocabulary (0..%d)",
                           tokens[i], i, V - 1);
    memcpy(g->hist + g->n, tokens, (size_t)n * sizeof *tokens);
    if (!g->use_cache) {
        if (gen_recompute(g, n, logits, e) < 0) return -1;
    } else {
        for (int i = 0; i < n; i += GEN_CHUNK) {
            int k = n - i < GEN_CHUNK ? n - i : GEN_CHUNK;
            gen_chunk(g, tokens + i, k, logits ? logits + (size_t)i * V : NULL);
        }
    }
    g->have_last = 1;
    return 0;
}

int generate_logits(generator *g, const int32_t *tokens, int n, int step, float *logits, err *e) {
    generate_reset(g);
    if (step < 1) step = 1;
    int V = g->v.cfg->vocab_size;
    for (int i = 0; i < n; i += step) {
        int k = n - i < step ? n - i : step;
        if (generate_feed(g, tokens + i, k, logits + (size_t)i * V, e) < 0) return -1;
    }
    return 0;
}

/* ---- sampling --------------------------------------------------------------- */

/* Most likely first; equal values by id, so that the order is total. */
static int by_logit(const void *a, const void *b, void *ctx) {
    const float *x = ctx;
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (x[i] > x[j]) return -1;
    if (x[i] < x[j]) return 1;
    return (i > j) - (i < j);
}

/* NaN sorts and weighs as the least likely. */
static float gen_clean(float x) {
    return isnan(x) ? -INFINITY : x;
}

int32_t generate_sample(generator *g, const float *logits, const generate_opts *o, rng *r) {
    int V = g->v.cfg->vocab_size;
    if (!(o->temperature > 0.0f)) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (gen_clean(logits[i]) > gen_clean(logits[best])) best = i;
        return best;
    }
    /* The order of logits is the order of probabilities at any temperature. */
    for (int i = 0; i < V; i++) {
        g->clean[i] = gen_clean(logits[i]);
        g->order[i] = i;
    }
    qsort_r(g->order, (size_t)V, sizeof *g->order, by_logit, g->clean);
    float top = g->clean[g->order[0]];
    if (top == -INFINITY) return g->order[0];
    int keep = o->top_k > 0 && o->top_k < V ? o->top_k : V;
    double inv_t = 1.0 / (double)o->temperature, total = 0.0;
    for (int j = 0; j < keep; j++) {
        g->wt[j] = exp(((double)g->clean[g->order[j]] - (double)top) * inv_t);
        total += g->wt[j];
    }
    if (o->top_p < 1.0f) {
        double need = (double)o->top_p * total, cum = 0.0;
        int j = 0;
        while (j < keep) {
            cum += g->wt[j++];
            if (cum >= need) break;
        }
        keep = j > 0 ? j : 1;
        total = 0.0;
        for (j = 0; j < keep; j++) total += g->wt[j];
    }
    double u = (double)rng_uniform(r) * total, cum = 0.0;
    for (int j = 0; j < keep; j++) {
        cum += g->wt[j];
        if (u < cum) return g->order[j];
    }
    return g->order[keep - 1]; /* u within rounding of total */
}

int generate_run(generator *g, const int32_t *prompt, size_t n, const generate_opts *o,
                 const int32_t *stop, int n_stop, generate_token_fn fn, void *ctx, int32_t **out,
                 size_t *n_out, err *e) {
    *out = NULL;
    *n_out = 0;
    if (n == 0) return err_set(e, "generate: the prompt has no tokens");
    int max_new = o->max_new_tokens > 0 ? o->max_new_tokens : 0;
    if ((size_t)g->cap < n || (size_t)(g->cap) - n < (size_t)max_new)
        return err_set(e,
                       "generate: a prompt of %zu tokens and %d new ones exceed the %d tokens "
                       "the generator was opened for",
                       n, max_new, g->cap);
    int32_t *ids = malloc((size_t)(max_new ? max_new : 1) * sizeof *ids);
    if (!ids) return err_set(e, "generate: out of memory");
    generate_reset(g);
    if (generate_feed(g, prompt, (int)n, NULL, e) < 0) {
        free(ids);
        return -1;
    }
    size_t k = 0;
    for (int i = 0; i < max_new; i++) {
        rng r;
        rng_seed(&r, o->seed, GENERATE_STREAM, (uint64_t)i, 0);
        int32_t id = generate_sample(g, g->last, o, &r);
        int is_stop = 0;
        for (int s = 0; s < n_stop && !is_stop; s++) is_stop = stop[s] == id;
        if (is_stop) break;
        ids[k++] = id;
        if (fn && fn(ctx, id)) break;
        if (i + 1 < max_new && generate_feed(g, &id, 1, NULL, e) < 0) {
            free(ids);
            return -1;
        }
    }
    if (k == 0) {
        free(ids);
        ids = NULL;
    }
    *out = ids;
    *n_out = k;
    return 0;
}
