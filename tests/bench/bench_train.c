/* Training-step benchmark: tokens/s of one full step (forward, backward,
 * AdamW) of a random Llama-shaped model, for LoRA (r=8 on q,v; r=16 on
 * q,k,v,o for the 1B shape) or for full fine-tuning, with the frozen
 * products in F32 or BF16 (--compute), plus the cblas_sgemm and BF16
 * product rates of this machine and the step's floating-point operations,
 * so a run can say what share of the matrix-multiply limit it reached.
 * tests/bench/run.py runs it beside the PyTorch peer
 * (tests/bench/torch_step.py), interleaved. With --cobatch N: one shard's
 * gradient of each of N LoRA methods over the one base, one after the
 * other against co-batched (model/cobatch.h), alternately. */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/bf16.h"
#include "model/cobatch.h"
#include "model/kernels.h"
#include "model/model.h"
#include "train/optim.h"
#include "model/peft.h"
#include "methods/registry.h"
#include "base/progress.h"
#include "base/rng.h"
#include "model/safetensors.h"
#include "base/team.h"

typedef struct shape {
    const char *name;
    int layers, hidden, heads, kv_heads, inter, seq, batch, vocab;
    int lora_r;       /* LoRA's rank */
    unsigned targets; /* LoRA's modules: PEFT_BIT(LW_Q) | ... */
} shape;

#define QV (PEFT_BIT(LW_Q) | PEFT_BIT(LW_V))
#define QKVO (QV | PEFT_BIT(LW_K) | PEFT_BIT(LW_O))

static const shape shapes[] = {
    {"small", 4, 256, 4, 4, 688, 128, 8, 256, 8, QV},
    {"gpt2", 12, 768, 12, 12, 3072, 64, 4, 50257, 8, QV},
    /* Llama-3.2-1B's config (tied embeddings left untied: the same work). */
    {"llama1b", 16, 2048, 32, 8, 8192, 256, 2, 128256, 16, QKVO},
};

static void config_of(const shape *s, model_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->vocab_size = s->vocab;
    cfg->hidden_size = s->hidden;
    cfg->intermediate_size = s->inter;
    cfg->num_layers = s->layers;
    cfg->num_heads = s->heads;
    cfg->num_kv_heads = s->kv_heads;
    cfg->head_dim = s->hidden / s->heads;
    cfg->max_position_embeddings = 4096;
    cfg->rms_norm_eps = 1e-5f;
    cfg->rope_theta = 10000.0f;
    cfg->rope_factor = 1.0f;
    cfg->bos_token_id = -1;
    cfg->eos_token_id = -1;
}

/* Matrix-multiply FLOPs of one training step. Forward: 2 per multiply-add
 * of every linear and lm_head, plus QK^T and PV over the full TxT square
 * (what the kernels compute). Backward: input gradients cost the forward
 * again; full fine-tuning adds the weight gradients (the linear forward
 * once more). LoRA's own products are counted too. */
static double step_flops(const shape *s, int full) {
    double N = (double)s->batch * s->seq, C = s->hidden, F = s->inter, L = s->layers, V = s->vocab;
    double kv = C / s->heads * s->kv_heads;
    double lin = L * (2 * C * C + 2 * C * kv + 3 * C * F);
    double attn = L * 2.0 * 2.0 * s->batch * (double)s->seq * s->seq * C;
    double fwd = 2 * N * (lin + V * C) + attn;
    double total = 2 * fwd;
    if (full) {
        total += 2 * N * (lin + V * C);
    } else {
        /* LoRA's own products, forward and two backward, at each site. */
        double sites = 0;
        if (s->targets & PEFT_BIT(LW_Q)) sites += C + C;
        if (s->targets & PEFT_BIT(LW_K)) sites += C + kv;
        if (s->targets & PEFT_BIT(LW_V)) sites += C + kv;
        if (s->targets & PEFT_BIT(LW_O)) sites += C + C;
        total += 3 * 2 * N * L * s->lora_r * sites;
    }
    return total;
}

/* Seconds of CPU time of the whole process (every thread). */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void sort_doubles(double *x, int n) {
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && x[j] < x[j - 1]; j--) {
            double tmp = x[j];
            x[j] = x[j - 1];
            x[j - 1] = tmp;
        }
}

/* The machine's matrix-multiply rate: the best of five 1024^3 products,
 * done by OpenBLAS's own threads (*openblas) and cut over the team with
 * single-threaded BLAS in each part, as the model runs them (*team). The
 * limit is the better of the two, so that neither way of running gets a
 * share above what the machine can do. */
static double sgemm_gflops(double *openblas, double *team) {
    int n = 1024;
    float *a = malloc(sizeof(float) * n * n), *b = malloc(sizeof(float) * n * n),
          *c = malloc(sizeof(float) * n * n);
    for (int i = 0; i < n * n; i++) a[i] = b[i] = 0.001f * (float)(i % 97);
    *openblas = *team = 0;
    /* The team first, after 0.3 s of its products: OpenBLAS's pool threads
     * poll (sched_yield) for ~0.1 s after the library starts and after each
     * of its threaded products, and while they do the team's helper barely
     * gets a core (measured: the team at one core's rate 3 runs out of 5). */
    for (int way = 1; way >= 0; way--) {
        if (way) {
            team_blas_enter();
            for (double t0 = progress_now(); progress_now() - t0 < 0.3;)
                linear_forward(c, a, b, NULL, n, n, n);
        }
        for (int r = 0; r < 6; r++) {
            double t0 = progress_now();
            if (way)
                linear_forward(c, a, b, NULL, n, n, n);
            else
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n,
                            0.0f, c, n);
            double g = 2.0 * n * n * (double)n / (progress_now() - t0) / 1e9;
            double *best = way ? team : openblas;
            if (r > 0 && g > *best) *best = g; /* the first run warms up */
        }
        if (way) team_blas_leave();
    }
    free(a);
    free(b);
    free(c);
    return *openblas > *team ? *openblas : *team;
}

/* The BF16 product rate (bf16.h) on 1024^3, over the team as the model
 * runs it: the best of five after a warm-up. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PEAK_ITERS 20000000L
/* One thread's share of --bf16-peak: vdpbf16ps on 12 independent
 * accumulators, nothing else, so the instruction's own throughput is all
 * that limits it. */
__attribute__((target("avx512f,avx512bf16"))) static void peak_task(void *ctx, int task,
                                                                    float *scratch) {
    (void)task, (void)scratch;
    __m512 acc[12];
    for (int i = 0; i < 12; i++) acc[i] = _mm512_setzero_ps();
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = a;
    for (long k = 0; k < PEAK_ITERS; k++) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        __asm__ volatile("" : "+v"(a)); /* keeps the loop from being folded */
    }
    float sum = 0;
    for (int i = 0; i < 12; i++) sum += _mm512_reduce_add_ps(acc[i]);
    *(volatile float *)ctx = sum;
}

/* GFLOPS of vdpbf16ps alone on every thread of the team at once: the
 * ceiling any BF16 product kernel here runs under. */
static double bf16_peak_gflops(void) {
    static volatile float sink;
    int n = team_size();
    double best = 0;
    for (int r = 0; r < 3; r++) {
        double t0 = progress_now();
        team_run(n, peak_task, (void *)&sink, NULL, 0);
        double g = (double)n * PEAK_ITERS * 12 * 64 / (progress_now() - t0) / 1e9;
        if (g > best) best = g;
    }
    return best;
}
#else
static double bf16_peak_gflops(void) {
    return 0;
}
#endif

static double bf16_gflops(void) {
    int n = 1024;
    float *a = malloc(sizeof(float) * n * n), *c = malloc(sizeof(float) * n * n);
    uint16_t *b = malloc(sizeof(uint16_t) * n * n);
    for (int i = 0; i < n * n; i++) a[i] = 0.001f * (float)(i % 97);
    bf16_round(b, a, (size_t)n * n);
    bf16_op op = {.N = n, .K = n, .M = n, .x = a, .w = b, .out = c};
    double best = 0;
    team_blas_enter();
    for (double t0 = progress_now(); progress_now() - t0 < 0.3;) bf16_matmul(&op, 1, 0);
    for (int r = 0; r < 6; r++) {
        double t0 = progress_now();
        bf16_matmul(&op, 1, 0);
        double g = 2.0 * n * n * (double)n / (progress_now() - t0) / 1e9;
        if (r > 0 && g > best) best = g;
    }
    team_blas_leave();
    free(a);
    free(b);
    free(c);
    return best;
}

/* Seconds of the step's linear products alone, through the same kernels
 * (kernels.h) on the same weights: every linear and lm_head forward, their
 * input gradients (not below the lowest trained layer: layer 0's q, k, v
 * for LoRA), and for full fine-tuning the weight gradients. A step does
 * this and more (attention, norms, activations, the loss, the optimizer),
 * so ntok over it bounds the tokens/s any schedule of the step's work
 * reaches at the rate these products run here. Median of 3 after one
 * warm-up. */
/* Full fine-tuning's weight gradient as full.c takes it in each compute. */
static void weight_grad(float *gw, const float *dy, const float *x, int N, int C, int OC,
                        int bf16) {
    if (bf16)
        linear_backward_weight_bf16(gw, dy, x, N, C, OC);
    else
        linear_backward(NULL, gw, NULL, dy, x, NULL, N, C, OC);
}

static double products_seconds(const shape *s, const model_config *cfg, const model_weights *w,
                               int full) {
    int bf16 = w->layer16 != NULL;
    int N = s->batch * s->seq, C = s->hidden, F = s->inter, V = s->vocab, L = s->layers;
    size_t wide = (size_t)N * (size_t)(F > V ? F : V);
    float *x = calloc(wide, sizeof *x), *y = calloc(wide, sizeof *y);
    float *gw =
        full ? calloc((size_t)V * C > (size_t)F * C ? (size_t)V * C : (size_t)F * C, sizeof *gw)
             : NULL;
    if (!x || !y || (full && !gw)) {
        fprintf(stderr, "bench_train: out of memory\n");
        exit(1);
    }
    const int kinds[7] = {LW_Q, LW_K, LW_V, LW_O, LW_GATE, LW_UP, LW_DOWN};
    int KV = C / s->heads * s->kv_heads;
    double t[4];
    /* Large shapes (a step of many seconds): one timed run after the warm-up. */
    int reps = (double)N * C * C * L > 1e12 ? 2 : 4;
    team_blas_enter();
    for (int rep = 0; rep < reps; rep++) {
        double t0 = progress_now();
        for (int l = 0; l < L; l++) {
            float *outs[3] = {y, y, y};
            kweight wq[3] = {model_weights_get(w, l, LW_Q), model_weights_get(w, l, LW_K),
                             model_weights_get(w, l, LW_V)};
            int oc[3] = {C, KV, KV};
            linears_forward_k(3, outs, x, wq, NULL, N, C, oc);
            linear_residual_forward_k(y, y, x, model_weights_get(w, l, LW_O), NULL, N, C, C);
            kweight wg[2] = {model_weights_get(w, l, LW_GATE), model_weights_get(w, l, LW_UP)};
            int of[2] = {F, F};
            linears_forward_k(2, outs, x, wg, NULL, N, C, of);
            linear_residual_forward_k(y, y, x, model_weights_get(w, l, LW_DOWN), NULL, N, F, C);
        }
        kweight head = model_weights_get(w, MODEL_GLOBAL, GW_LM_HEAD);
        linears_forward_k(1, &y, x, &head, NULL, N, C, &V);
        const float *dy = y, *dys[3] = {y, y, y};
        linears_backward_input_k(x, 0, 1, &dy, &head, N, C, &V);
        if (full) weight_grad(gw, y, x, N, C, V, bf16);
        for (int l = L - 1; l >= 0; l--) {
            kweight wg[2] = {model_weights_get(w, l, LW_GATE), model_weights_get(w, l, LW_UP)};
            kweight wq[3] = {model_weights_get(w, l, LW_Q), model_weights_get(w, l, LW_K),
                             model_weights_get(w, l, LW_V)};
            kweight wd = model_weights_get(w, l, LW_DOWN), wo = model_weights_get(w, l, LW_O);
            int of[2] = {F, F}, oc[3] = {C, KV, KV};
            linears_backward_input_k(x, 0, 1, &dy, &wd, N, F, &C);
            linears_backward_input_k(x, 0, 2, dys, wg, N, C, of);
            linears_backward_input_k(x, 0, 1, &dy, &wo, N, C, &C);
            if (full || l > 0) linears_backward_input_k(x, 0, 3, dys, wq, N, C, oc);
            if (!full) continue;
            for (int k = 0; k < 7; k++) {
                int rows, cols;
                model_weight_shape(cfg, l, kinds[k], &rows, &cols);
                weight_grad(gw, y, x, N, cols, rows, bf16);
            }
        }
        t[rep] = progress_now() - t0;
    }
    team_blas_leave();
    free(x);
    free(y);
    free(gw);
    sort_doubles(t + 1, reps - 1);
    return t[reps / 2];
}

/* Writes the random base of `cfg` (weights in `w`) as a Hugging Face model
 * directory, for the cluster benchmark (tests/bench/cluster.py). */
static int write_model(const char *dir, const model_config *cfg, const model_weights *w) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return 1;
    }
    fprintf(
        f,
        "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", "
        "\"vocab_size\": %d, \"hidden_size\": %d, \"intermediate_size\": %d, "
        "\"num_hidden_layers\": %d, \"num_attention_heads\": %d, \"num_key_value_heads\": %d, "
        "\"max_position_embeddings\": %d, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0, "
        "\"hidden_act\": \"silu\", \"tie_word_embeddings\": false, \"torch_dtype\": \"float32\"}\n",
        cfg->vocab_size, cfg->hidden_size, cfg->intermediate_size, cfg->num_layers, cfg->num_heads,
        cfg->num_kv_heads, cfg->max_position_embeddings);
    if (fclose(f) != 0) {
        perror(path);
        return 1;
    }
    int n = 0, cap = GW_COUNT + cfg->num_layers * LW_COUNT;
    st_entry *ents = calloc((size_t)cap, sizeof *ents);
    char(*names)[160] = calloc((size_t)cap, sizeof *names);
    if (!ents || !names) return 1;
    for (int l = -1; l < cfg->num_layers; l++)
        for (int k = 0; k < (l < 0 ? GW_COUNT : LW_COUNT); k++) {
            int rows, cols;
            if (!model_weight_shape(cfg, l, k, &rows, &cols)) continue;
            model_weight_name(cfg, l, k, names[n], sizeof names[n]);
            ents[n].name = names[n];
            ents[n].dtype = ST_F32;
            ents[n].ndim = cols > 1 ? 2 : 1;
            ents[n].shape[0] = rows;
            ents[n].shape[1] = cols;
            ents[n].data = l < 0 ? w->global[k] : w->layer[l][k];
            n++;
        }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    err e;
    int rc = st_write(path, ents, n, NULL, &e) < 0;
    if (rc) fprintf(stderr, "bench_train: %s\n", e.msg);
    free(ents);
    free(names);
    return rc;
}

/* ---- co-batching: N LoRA methods over one base ---- */

typedef struct cb_one {
    peft *p;
    model *m;
    const int32_t *tok, *lab;
    int B, T;
} cb_one;

/* One shard's gradient of method i, as trainer_shard_grad computes it. */
static void cb_shard(void *ctx, int i) {
    cb_one *c = (cb_one *)ctx + i;
    peft_set_step(c->p, 1, 1, 0, 0);
    peft_zero_grads(c->p);
    long n;
    model_forward(c->m, c->tok, c->lab, c->B, c->T, &n);
    model_backward(c->m, 1.0f);
}

/* N LoRA methods (rank 4, 8, 16, 32, ... on q,v; q,k,v,o; the MLP; all
 * seven, in turn) over the base w, each with its own batch: the median
 * wall time of their shards one after the other and co-batched,
 * alternately, and what co-batching shared. */
static int cobatch_bench(const shape *s, const model_config *cfg, const model_weights *w, int n,
                         int steps, int warmup, const char *compute) {
    static Peftps__Module sets[4][7] = {
        {PEFTPS__MODULE__Q_PROJ, PEFTPS__MODULE__V_PROJ},
        {PEFTPS__MODULE__Q_PROJ, PEFTPS__MODULE__K_PROJ, PEFTPS__MODULE__V_PROJ,
         PEFTPS__MODULE__O_PROJ},
        {PEFTPS__MODULE__GATE_PROJ, PEFTPS__MODULE__UP_PROJ, PEFTPS__MODULE__DOWN_PROJ},
        {PEFTPS__MODULE__Q_PROJ, PEFTPS__MODULE__K_PROJ, PEFTPS__MODULE__V_PROJ,
         PEFTPS__MODULE__O_PROJ, PEFTPS__MODULE__GATE_PROJ, PEFTPS__MODULE__UP_PROJ,
         PEFTPS__MODULE__DOWN_PROJ}};
    static const size_t nsets[4] = {2, 4, 3, 7};
    cb_one *one = calloc((size_t)n, sizeof *one);
    size_t ntok = (size_t)s->batch * s->seq;
    rng r;
    rng_seed(&r, 5, 6, 7, 8);
    for (int i = 0; i < n; i++) {
        Peftps__Method mcfg = PEFTPS__METHOD__INIT;
        Peftps__LoRA lora = PEFTPS__LO_RA__INIT;
        lora.has_r = lora.has_alpha = 1;
        lora.r = 4u << (i % 4);
        lora.alpha = 2.0f * (float)lora.r;
        lora.n_target_modules = nsets[i % 4];
        lora.target_modules = sets[i % 4];
        mcfg.kind_case = PEFTPS__METHOD__KIND_LORA;
        mcfg.lora = &lora;
        err e;
        if (methods_create(&one[i].p, &mcfg, cfg, w, &e) < 0 ||
            model_create(&one[i].m, cfg, w, one[i].p, s->batch, s->seq, &e) < 0) {
            fprintf(stderr, "bench_train: %s\n", e.msg);
            return 1;
        }
        peft_init(one[i].p, 7 + (uint64_t)i);
        int32_t *tok = malloc(ntok * sizeof *tok), *lab = malloc(ntok * sizeof *lab);
        for (size_t k = 0; k < ntok; k++) {
            tok[k] = (int32_t)(rng_u64(&r) % (uint64_t)s->vocab);
            lab[k] = (int32_t)(rng_u64(&r) % (uint64_t)s->vocab);
        }
        one[i].tok = tok, one[i].lab = lab, one[i].B = s->batch, one[i].T = s->seq;
    }
    double *t[2] = {malloc(sizeof(double) * (size_t)steps), malloc(sizeof(double) * (size_t)steps)};
    cobatch_stats st0, st1, d;
    memset(&d, 0, sizeof d);
    for (int it = 0; it < warmup + steps; it++)
        for (int cb = 0; cb <= 1; cb++) {
            double t0 = progress_now();
            cobatch_stats_get(&st0);
            if (cb)
                cobatch_run(n, cb_shard, one);
            else
                for (int i = 0; i < n; i++) cb_shard(one, i);
            if (it < warmup) continue;
            t[cb][it - warmup] = progress_now() - t0;
            cobatch_stats_get(&st1);
            if (cb && it == warmup) cobatch_stats_diff(&d, &st1, &st0);
        }
    sort_doubles(t[0], steps);
    sort_doubles(t[1], steps);
    double a = t[0][steps / 2], b = t[1][steps / 2];
    printf("{\"shape\":\"%s\",\"compute\":\"%s\",\"methods\":%d,\"tokens_each\":%zu,"
           "\"alone_ms\":%.1f,\"cobatch_ms\":%.1f,\"speedup\":%.3f,\"shared_calls\":%llu,"
           "\"products_in_shared\":%llu,\"products_alone\":%llu,\"products_f32\":%llu,"
           "\"f32_team_jobs\":%llu}\n",
           s->name, compute, n, ntok, a * 1e3, b * 1e3, a / b, (unsigned long long)d.calls_shared,
           (unsigned long long)d.products_in, (unsigned long long)d.products_alone,
           (unsigned long long)d.products_f32, (unsigned long long)d.f32_team_jobs);
    for (int i = 0; i < n; i++) {
        model_free(one[i].m);
        peft_free(one[i].p);
        free((void *)one[i].tok);
        free((void *)one[i].lab);
    }
    free(one);
    free(t[0]);
    free(t[1]);
    return 0;
}

int main(int argc, char **argv) {
    const char *shape_name = "small", *method = "lora", *model_dir = NULL, *compute = "f32";
    int steps = 10, warmup = 2, cobatch = 0, batch = 0, seq = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--shape") && i + 1 < argc)
            shape_name = argv[++i];
        else if (!strcmp(argv[i], "--method") && i + 1 < argc)
            method = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--write-model") && i + 1 < argc)
            model_dir = argv[++i];
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc)
            warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--compute") && i + 1 < argc)
            compute = argv[++i];
        else if (!strcmp(argv[i], "--cobatch") && i + 1 < argc)
            cobatch = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc)
            batch = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seq") && i + 1 < argc)
            seq = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--bf16-rate")) {
            if (!bf16_cpu_ok()) {
                fprintf(stderr, "bench_train: this CPU has no AVX512-BF16\n");
                return 1;
            }
            printf("{\"bf16_gflops\":%.2f}\n", bf16_gflops());
            return 0;
        } else if (!strcmp(argv[i], "--bf16-peak")) {
            if (!bf16_cpu_ok()) {
                fprintf(stderr, "bench_train: this CPU has no AVX512-BF16\n");
                return 1;
            }
            printf("{\"bf16_peak_gflops\":%.2f,\"threads\":%d}\n", bf16_peak_gflops(), team_size());
            return 0;
        } else if (!strcmp(argv[i], "--sgemm")) {
            double ob, tm, best = sgemm_gflops(&ob, &tm);
            printf("{\"sgemm_gflops\":%.2f,\"openblas_threads\":%.2f,\"team\":%.2f}\n", best, ob,
                   tm);
            return 0;
        } else {
            fprintf(stderr, "usage: bench_train [--shape small|gpt2|llama1b] [--method lora|full] "
                            "[--compute f32|bf16] [--steps N] [--warmup N] [--cobatch N] [--batch "
                            "B] [--seq T] | --sgemm "
                            "| --bf16-rate | --bf16-peak | --shape S "
                            "--write-model DIR\n");
            return 2;
        }
    }
    const shape *s = NULL;
    static shape custom;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        if (!strcmp(shapes[i].name, shape_name)) s = &shapes[i];
    if (s && (batch > 0 || seq > 0)) { /* the shape with another batch or sequence length */
        custom = *s;
        if (batch > 0) custom.batch = batch;
        if (seq > 0) custom.seq = seq;
        s = &custom;
    }
    int full = !strcmp(method, "full"), bf16 = !strcmp(compute, "bf16");
    if (!s || (!full && strcmp(method, "lora")) || (!bf16 && strcmp(compute, "f32")) ||
        (bf16 && model_dir)) {
        fprintf(stderr,
                "bench_train: unknown shape '%s', method '%s' or compute '%s' (or "
                "--write-model with bf16)\n",
                shape_name, method, compute);
        return 2;
    }
    if (bf16 && !bf16_cpu_ok()) {
        fprintf(stderr, "bench_train: --compute bf16 needs AVX512-BF16, which this CPU lacks\n");
        return 1;
    }

    model_config cfg;
    config_of(s, &cfg);
    /* All base weights in one allocation, N(0, 0.02), norms 1; with BF16
     * compute the matrices are the BF16 roundings of the same values, in
     * an allocation of their own, and have no F32 copy. */
    size_t total = 0, total16 = 0;
    for (int l = MODEL_GLOBAL; l < cfg.num_layers; l++)
        for (int k = 0; k < (l < 0 ? GW_COUNT : LW_COUNT); k++) {
            int rows, cols;
            size_t n = model_weight_shape(&cfg, l, k, &rows, &cols);
            if (bf16 && cols > 1)
                total16 += n;
            else
                total += n;
        }
    float *mem = malloc((total ? total : 1) * sizeof *mem);
    uint16_t *mem16 = bf16 ? malloc(total16 * sizeof *mem16) : NULL;
    const float *(*layers)[LW_COUNT] = calloc((size_t)cfg.num_layers, sizeof *layers);
    const uint16_t *(*layers16)[LW_COUNT] =
        bf16 ? calloc((size_t)cfg.num_layers, sizeof *layers16) : NULL;
    size_t biggest = (size_t)s->hidden * (size_t)(s->vocab > s->inter ? s->vocab : s->inter);
    float *tmp = malloc(sizeof(float) * biggest);
    if (!mem || !layers || !tmp || (bf16 && (!mem16 || !layers16))) {
        fprintf(stderr, "bench_train: out of memory for the base\n");
        return 1;
    }
    rng r;
    rng_seed(&r, 1, 2, 3, 4);
    model_weights w = {.layer = layers, .layer16 = layers16};
    float *at = mem;
    uint16_t *at16 = mem16;
    for (int l = MODEL_GLOBAL; l < cfg.num_layers; l++)
        for (int k = 0; k < (l < 0 ? GW_COUNT : LW_COUNT); k++) {
            int rows, cols;
            size_t n = model_weight_shape(&cfg, l, k, &rows, &cols);
            if (!n) continue;
            int norm = l < 0 ? k == GW_FINAL_NORM : (k == LW_INPUT_NORM || k == LW_POST_NORM);
            for (size_t i = 0; i < n; i++) tmp[i] = norm ? 1.0f : 0.02f * rng_normal(&r);
            if (bf16 && cols > 1) {
                bf16_round(at16, tmp, n);
                *(l < 0 ? &w.global16[k] : &layers16[l][k]) = at16;
                at16 += n;
            } else {
                memcpy(at, tmp, n * sizeof *at);
                *(l < 0 ? &w.global[k] : &layers[l][k]) = at;
                at += n;
            }
        }
    free(tmp);

    if (model_dir) return write_model(model_dir, &cfg, &w);
    if (cobatch > 0) return cobatch_bench(s, &cfg, &w, cobatch, steps, warmup, compute);

    Peftps__Method mcfg = PEFTPS__METHOD__INIT;
    Peftps__LoRA lora = PEFTPS__LO_RA__INIT;
    Peftps__Full fullcfg = PEFTPS__FULL__INIT;
    Peftps__Module targets[4];
    int nt = 0;
    if (s->targets & PEFT_BIT(LW_Q)) targets[nt++] = PEFTPS__MODULE__Q_PROJ;
    if (s->targets & PEFT_BIT(LW_K)) targets[nt++] = PEFTPS__MODULE__K_PROJ;
    if (s->targets & PEFT_BIT(LW_V)) targets[nt++] = PEFTPS__MODULE__V_PROJ;
    if (s->targets & PEFT_BIT(LW_O)) targets[nt++] = PEFTPS__MODULE__O_PROJ;
    if (full) {
        mcfg.kind_case = PEFTPS__METHOD__KIND_FULL;
        mcfg.full = &fullcfg;
    } else {
        lora.has_r = 1;
        lora.r = (uint32_t)s->lora_r;
        lora.has_alpha = 1;
        lora.alpha = 2.0f * (float)s->lora_r;
        lora.n_target_modules = (size_t)nt;
        lora.target_modules = targets;
        mcfg.kind_case = PEFTPS__METHOD__KIND_LORA;
        mcfg.lora = &lora;
    }
    err e;
    peft *p;
    model *m;
    if (methods_create(&p, &mcfg, &cfg, &w, &e) < 0 ||
        model_create(&m, &cfg, &w, p, s->batch, s->seq, &e) < 0) {
        fprintf(stderr, "bench_train: %s\n", e.msg);
        return 1;
    }
    peft_init(p, 7);
    Peftps__Optimizer ocfg = PEFTPS__OPTIMIZER__INIT;
    ocfg.lr = 1e-4f;
    ocfg.beta1 = 0.9f;
    ocfg.beta2 = 0.999f;
    ocfg.eps = 1e-8f;
    ocfg.weight_decay = 0.0f;
    optim o;
    if (optim_create(&o, p->n_params, &ocfg, &e) < 0) {
        fprintf(stderr, "bench_train: %s\n", e.msg);
        return 1;
    }
    size_t ntok = (size_t)s->batch * s->seq;
    int32_t *tok = malloc(ntok * sizeof *tok), *lab = malloc(ntok * sizeof *lab);
    for (size_t i = 0; i < ntok; i++) {
        tok[i] = (int32_t)(rng_u64(&r) % (uint64_t)s->vocab);
        lab[i] = (int32_t)(rng_u64(&r) % (uint64_t)s->vocab);
    }
    double *times = malloc(sizeof(double) * (size_t)steps);
    double *cpu = malloc(sizeof(double) * (size_t)steps);
    for (int it = 0; it < warmup + steps; it++) {
        double t0 = progress_now(), c0 = cpu_now();
        peft_set_step(p, 1, 1, (uint64_t)it, 0);
        peft_zero_grads(p);
        long n;
        model_forward(m, tok, lab, s->batch, s->seq, &n);
        model_backward(m, 1.0f / (float)n);
        optim_step(&o, p->params, p->grads, 1e-4);
        peft_refresh(p);
        if (it >= warmup) {
            times[it - warmup] = progress_now() - t0;
            cpu[it - warmup] = cpu_now() - c0;
        }
    }
    /* Median step time, and the median CPU time (all threads) of a step. */
    sort_doubles(times, steps);
    sort_doubles(cpu, steps);
    double med = times[steps / 2];
    double products = products_seconds(s, &cfg, &w, full);
    printf("{\"impl\":\"peftps\",\"shape\":\"%s\",\"method\":\"%s\",\"compute\":\"%s\","
           "\"step_ms\":%.3f,"
           "\"cpu_ms\":%.3f,\"tokens_per_s\":%.1f,\"gflops\":%.2f,\"trainable\":%zu,"
           "\"products_ms\":%.3f,\"products_tokens_per_s\":%.1f}\n",
           s->name, method, compute, med * 1e3, cpu[steps / 2] * 1e3, (double)ntok / med,
           step_flops(s, full) / med / 1e9, peft_num_trainable(p), products * 1e3,
           (double)ntok / products);
    optim_free(&o);
    model_free(m);
    peft_free(p);
    free(times);
    free(cpu);
    free(tok);
    free(lab);
    free(mem);
    free(mem16);
    free(layers);
    free(layers16);
    return 0;
}
