/* `make bench-onednn`: peftps's BF16 products (common/model/bf16.c) against
 * oneDNN's BF16 matmul primitive (Debian's libdnnl, the library PyTorch
 * uses on CPUs) on the projection shapes of the bench models, in the same
 * process, with the instruction's own ceiling (vdpbf16ps alone) beside
 * them. Each product is the forward of a linear: x (N,K) BF16 times w
 * (M,K)^T, w BF16 as the checkpoints ship it, F32 out; peftps also rounds x
 * from F32 inside the call, oneDNN is handed x already rounded. Per shape:
 * 15 calls of peftps, then 15 of oneDNN (blocks, not alternate calls:
 * oneDNN's OpenMP threads spin after each call and would take the core
 * from peftps's team), best of each. Both use the same number of threads:
 * PEFTPS_THREADS for peftps, OMP_NUM_THREADS set to the same for oneDNN.
 * Also counts the output elements whose bits differ between the two.
 * Prints a Markdown table. Never part of `make test`; peftps does not link
 * oneDNN. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <oneapi/dnnl/dnnl.h>

#include "base/progress.h"
#include "base/team.h"
#include "model/bf16.h"

#define CHECK(call)                                                                                \
    do {                                                                                           \
        dnnl_status_t st_ = (call);                                                                \
        if (st_ != dnnl_success) {                                                                 \
            fprintf(stderr, "bench_onednn: %s failed (status %d)\n", #call, (int)st_);             \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

#define CALLS 15

typedef struct shape {
    const char *what;
    int N, K, M;
} shape;

/* The GPT-2-small-like shape (256 tokens) and the Llama-3.2-1B one (512). */
static const shape shapes[] = {
    {"gpt2 q/o", 256, 768, 768},       {"gpt2 gate/up", 256, 768, 3072},
    {"gpt2 down", 256, 3072, 768},     {"gpt2 lm_head", 256, 768, 50257},
    {"llama1b q/o", 512, 2048, 2048},  {"llama1b gate/up", 512, 2048, 8192},
    {"llama1b down", 512, 8192, 2048},
};

static void pause_ms(int ms) {
    struct timespec t = {0, (long)ms * 1000000L};
    nanosleep(&t, NULL);
}

int main(int argc, char **argv) {
    if (argc > 1) {
        fprintf(stderr, "usage: bench_onednn (threads: PEFTPS_THREADS, the CPU's otherwise)\n");
        return 2;
    }
    if (!bf16_cpu_ok()) {
        fprintf(stderr, "bench_onednn: this CPU has no AVX512-BF16\n");
        return 1;
    }
    /* oneDNN's OpenMP reads OMP_NUM_THREADS when the program loads: set it
     * to the team's size and start again when it differs. */
    char threads[16];
    snprintf(threads, sizeof threads, "%d", team_size());
    const char *omp = getenv("OMP_NUM_THREADS");
    if (!omp || strcmp(omp, threads) != 0) {
        setenv("OMP_NUM_THREADS", threads, 1);
        execv("/proc/self/exe", argv);
        fprintf(stderr, "bench_onednn: cannot start again with OMP_NUM_THREADS=%s\n", threads);
        return 1;
    }
    dnnl_engine_t eng;
    dnnl_stream_t stream;
    CHECK(dnnl_engine_create(&eng, dnnl_cpu, 0));
    CHECK(dnnl_stream_create(&stream, eng, dnnl_stream_default_flags));
    printf("threads: %d\n\n", team_size());
    printf(
        "| shape | N | K | M | peftps GFLOPS | oneDNN GFLOPS | oneDNN / peftps | oneDNN kernel | "
        "elements with other bits |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | "
        "---: |\n");
    team_blas_enter();
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const shape *s = &shapes[si];
        size_t nx = (size_t)s->N * s->K, nw = (size_t)s->K * s->M, no = (size_t)s->N * s->M;
        float *x = malloc(nx * sizeof *x), *ours = malloc(no * sizeof *ours);
        float *theirs = malloc(no * sizeof *theirs);
        uint16_t *xb = malloc(nx * sizeof *xb), *w = malloc(nw * sizeof *w);
        if (!x || !ours || !theirs || !xb || !w) {
            fprintf(stderr, "bench_onednn: out of memory for %s\n", s->what);
            return 1;
        }
        for (size_t i = 0; i < nx; i++) x[i] = 0.01f * (float)((i * 7) % 23) - 0.1f;
        for (size_t i = 0; i < nw; i++) w[i] = (uint16_t)(0x3c00 + (i * 13) % 300);
        bf16_round(xb, x, nx);

        /* w is (M,K) row-major: oneDNN's weights (K,M) in the transposed
         * layout "ba". */
        dnnl_memory_desc_t xmd, wmd, omd;
        dnnl_dims_t xd = {s->N, s->K}, wd = {s->K, s->M}, od = {s->N, s->M};
        CHECK(dnnl_memory_desc_init_by_tag(&xmd, 2, xd, dnnl_bf16, dnnl_ab));
        CHECK(dnnl_memory_desc_init_by_tag(&wmd, 2, wd, dnnl_bf16, dnnl_ba));
        CHECK(dnnl_memory_desc_init_by_tag(&omd, 2, od, dnnl_f32, dnnl_ab));
        dnnl_matmul_desc_t md;
        dnnl_primitive_desc_t pd;
        dnnl_primitive_t prim;
        CHECK(dnnl_matmul_desc_init(&md, &xmd, &wmd, NULL, &omd));
        CHECK(dnnl_primitive_desc_create(&pd, &md, NULL, eng, NULL));
        const char *impl = "?";
        dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &impl);
        CHECK(dnnl_primitive_create(&prim, pd));
        dnnl_memory_t xm, wm, om;
        CHECK(dnnl_memory_create(&xm, &xmd, eng, xb));
        CHECK(dnnl_memory_create(&wm, &wmd, eng, w));
        CHECK(dnnl_memory_create(&om, &omd, eng, theirs));
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, om}};

        bf16_op op = {.N = s->N, .K = s->K, .M = s->M, .x = x, .w = w, .out = ours};
        double best_ours = 1e30, best_theirs = 1e30;
        pause_ms(50);
        for (int c = 0; c <= CALLS; c++) { /* the first call of each warms up */
            double t0 = progress_now();
            bf16_matmul(&op, 1, 0);
            double t = progress_now() - t0;
            if (c > 0 && t < best_ours) best_ours = t;
        }
        for (int c = 0; c <= CALLS; c++) {
            double t0 = progress_now();
            CHECK(dnnl_primitive_execute(prim, stream, 3, args));
            CHECK(dnnl_stream_wait(stream));
            double t = progress_now() - t0;
            if (c > 0 && t < best_theirs) best_theirs = t;
        }
        size_t differ = 0;
        for (size_t i = 0; i < no; i++) differ += memcmp(ours + i, theirs + i, sizeof *ours) != 0;
        double gflop = 2.0 * s->N * (double)s->K * s->M / 1e9;
        printf("| %s | %d | %d | %d | %.0f | %.0f | %.2fx | %s | %zu of %zu |\n", s->what, s->N,
               s->K, s->M, gflop / best_ours, gflop / best_theirs, best_ours / best_theirs, impl,
               differ, no);
        fflush(stdout);
        dnnl_primitive_destroy(prim);
        dnnl_primitive_desc_destroy(pd);
        dnnl_memory_destroy(xm);
        dnnl_memory_destroy(wm);
        dnnl_memory_destroy(om);
        free(x), free(ours), free(theirs), free(xb), free(w);
    }
    team_blas_leave();
    dnnl_stream_destroy(stream);
    dnnl_engine_destroy(eng);
    return 0;
}
