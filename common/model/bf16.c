/* BF16 products (bf16.h): activations rounded to BF16 once per call, the
 * weight packed a panel of 64 output columns at a time into the pair layout
 * vdpbf16ps reads, and a 6 x 64 register tile of F32 accumulators. Built for
 * baseline x86-64: only the functions marked BF16_TARGET use AVX-512, and
 * they run only after bf16_cpu_ok said yes. kernels.c dispatches here;
 * tests/test_bf16.c checks the bits against a scalar model of the
 * instruction and the values against double precision. */
#include "model/bf16.h"

#include <stdlib.h>
#include <string.h>

#include "base/cpu.h"
#include "base/team.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define BF16_X86 1
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))
#else
#define BF16_X86 0
#endif

/* ---- the CPU --------------------------------------------------------------- */

static int cpu_probe(void) {
#if BF16_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0; /* OSXSAVE */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xE6) != 0xE6) return 0; /* the OS saves SSE, AVX and AVX-512 state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(b & (1u << 16)) || !(b & (1u << 30))) return 0; /* AVX512F, AVX512BW */
    if (a < 1 || !__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
    return (a >> 5) & 1; /* AVX512_BF16 */
#else
    return 0;
#endif
}

/* The CPU does not change under a process: asked once. */
static int cpu_has_bf16(void) {
    static _Atomic int known = -1;
    int k = known;
    if (k < 0) known = k = cpu_probe();
    return k;
}

int bf16_cpu_ok(void) {
    return cpu_has_bf16() && !cpu_disabled("avx512bf16");
}

int bf16_cpu_check(const char *what, err *e) {
    if (bf16_cpu_ok()) return 0;
    return err_set(e,
                   "%s needs the AVX512-BF16 instruction set (vdpbf16ps), which this CPU "
                   "lacks%s; run it on a CPU with AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids "
                   "or later, AMD Zen 4 or later), or train with compute: F32",
                   what,
                   cpu_disabled("avx512bf16") ? " (PEFTPS_CPU_DISABLE=avx512bf16 is set)" : "");
}

/* ---- rounding -------------------------------------------------------------- */

static inline uint16_t round_one(uint32_t b) {
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((b >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

#if BF16_X86
/* round_one on 16 floats at a time, the same bits. */
BF16_TARGET static size_t round_vec(uint16_t *dst, const float *src, size_t n) {
    const __m512i abs = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    const __m512i half = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
    const __m512i quiet = _mm512_set1_epi32(0x40);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i b = _mm512_loadu_si512((const void *)(src + i));
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(half, odd)), 16);
        __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, abs), inf);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(b, 16), quiet));
        _mm256_storeu_si256((void *)(dst + i), _mm512_cvtepi32_epi16(r));
    }
    return i;
}
#endif

void bf16_round(uint16_t *dst, const float *src, size_t n) {
    size_t i = 0;
#if BF16_X86
    if (n >= 16 && cpu_has_bf16()) i = round_vec(dst, src, n);
#endif
    for (; i < n; i++) {
        uint32_t b;
        memcpy(&b, src + i, sizeof b);
        dst[i] = round_one(b);
    }
}

void bf16_widen(float *dst, const uint16_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t b = (uint32_t)src[i] << 16;
        memcpy(dst + i, &b, sizeof b);
    }
}

/* ---- products -------------------------------------------------------------- */

#define MR 6            /* rows of a register tile */
#define NR 4            /* 16-lane vectors of a tile: 64 columns */
#define PANEL (16 * NR) /* output columns a task packs and computes */
#define MAX_OPS 4

/* Rounded inputs of a job, kept per calling thread and grown as needed:
 * row i of op k's x is kp[k] pairs at xb[k] + i * kp[k]. */
static _Thread_local uint32_t *tl_xb;
static _Thread_local size_t tl_xb_len;
static _Thread_local float *tl_scratch;
static _Thread_local size_t tl_scratch_len;

typedef struct job {
    const bf16_op *ops;
    int n, sum;
    const uint32_t *xb[MAX_OPS];
    int first[MAX_OPS + 1]; /* task of each op's first panel (independent ops); first[n]: tasks */
    int width;              /* threads of the team */
} job;

typedef struct round_args {
    const float *x;
    const float *const *x_rows;
    uint32_t *xb;
    int K, kp;
} round_args;

static void round_rows(void *c, size_t r0, size_t r1) {
    const round_args *a = c;
    for (size_t i = r0; i < r1; i++) {
        uint16_t *d = (uint16_t *)(a->xb + i * (size_t)a->kp);
        bf16_round(d, a->x_rows ? a->x_rows[i] : a->x + i * (size_t)a->K, (size_t)a->K);
        if (a->K % 2) d[a->K] = 0;
    }
}

/* Column j0 + c of a panel of a w (M,K) op, from pair p0 on: row j0 + c
 * of w read as pairs, then the last weight of an odd K with a zero pad.
 * Shared by pack_scalar and the tail of pack_panel. */
static inline void pack_row_pairs(const bf16_op *op, int j0, int c, int p0, uint32_t *pw) {
    int K = op->K, kp = (K + 1) / 2;
    const uint16_t *row = op->w + (size_t)(j0 + c) * K;
    for (int p = p0; p < K / 2; p++) {
        uint32_t v;
        memcpy(&v, row + 2 * p, sizeof v);
        pw[(size_t)p * PANEL + c] = v;
    }
    if (K % 2) pw[(size_t)(kp - 1) * PANEL + c] = row[K - 1];
}

/* The panel of columns [j0, j0 + PANEL) of op's weight in pair layout:
 * pw[p * PANEL + c] holds the two weights that multiply x pair p for
 * column j0 + c; columns past M and the pad of an odd K are zeros. */
static void pack_scalar(const bf16_op *op, int j0, uint32_t *pw) {
    int K = op->K, M = op->M, kp = (K + 1) / 2, nc = M - j0 < PANEL ? M - j0 : PANEL;
    if (nc < PANEL)
        for (int p = 0; p < kp; p++) memset(pw + (size_t)p * PANEL + nc, 0, (PANEL - nc) * 4);
    if (!op->nn) {
        /* w (M,K): column j is row j of w, its pairs consecutive. */
        for (int c = 0; c < nc; c++) pack_row_pairs(op, j0, c, 0, pw);
    } else {
        /* w (K,M): pair p of column j is w[2p][j], w[2p+1][j]. */
        for (int p = 0; p < kp; p++) {
            const uint16_t *r0 = op->w + (size_t)(2 * p) * M + j0;
            const uint16_t *r1 = 2 * p + 1 < K ? r0 + M : NULL;
            uint32_t *d = pw + (size_t)p * PANEL;
            for (int c = 0; c < nc; c++) d[c] = r0[c] | (r1 ? (uint32_t)r1[c] << 16 : 0);
        }
    }
}

/* The weights a panel packs, as runs of cache lines: an NT panel is one
 * run (its rows are consecutive), an NN panel one short run per row. */
typedef struct ahead {
    const char *base;   /* NULL: nothing to fetch */
    size_t run, stride; /* bytes of a run, bytes from run to run */
    int runs, done;     /* runs in all, runs fetched so far */
} ahead;

static ahead ahead_of(const bf16_op *op, int j0) {
    ahead a = {0};
    if (j0 >= op->M) return a;
    int nc = op->M - j0 < PANEL ? op->M - j0 : PANEL;
    if (!op->nn) {
        a.base = (const char *)(op->w + (size_t)j0 * op->K);
        a.run = (size_t)nc * op->K * 2;
        a.runs = 1;
    } else {
        a.base = (const char *)(op->w + j0);
        a.run = (size_t)nc * 2;
        a.stride = (size_t)op->M * 2;
        a.runs = op->K;
    }
    return a;
}

/* Asks for the next `lines` cache lines of a panel this thread will pack
 * later, so that reading the base from memory overlaps the products. */
static inline void fetch_ahead(ahead *a, int lines) {
    if (!a->base) return;
    if (a->runs == 1) {
        size_t from = (size_t)a->done * 64;
        for (int l = 0; l < lines && from < a->run; l++, from += 64)
            __builtin_prefetch(a->base + from, 0, 2);
        a->done = (int)(from / 64);
        return;
    }
    for (int l = 0; l < lines && a->done < a->runs; a->done++) {
        const char *r = a->base + (size_t)a->done * a->stride;
        for (size_t b = 0; b < a->run; b += 64, l++) __builtin_prefetch(r + b, 0, 2);
    }
}

#if BF16_X86
/* 16 x 16 dwords: r[i] (16 dwords of row i) become the columns. */
BF16_TARGET static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* r[4q + k] now holds, in each 128-bit lane l, element k of rows 4q..4q+3
     * for columns 4l..4l+3: gather lanes across the groups of four rows. */
    for (int k = 0; k < 4; k++) {
        __m512i a = _mm512_shuffle_i32x4(r[k], r[4 + k], 0x88); /* lanes 0,2 | 0,2 */
        __m512i b = _mm512_shuffle_i32x4(r[k], r[4 + k], 0xDD); /* lanes 1,3 | 1,3 */
        __m512i c = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0x88);
        __m512i d = _mm512_shuffle_i32x4(r[8 + k], r[12 + k], 0xDD);
        t[k] = _mm512_shuffle_i32x4(a, c, 0x88);      /* column 4*0 + k */
        t[8 + k] = _mm512_shuffle_i32x4(a, c, 0xDD);  /* column 4*2 + k */
        t[4 + k] = _mm512_shuffle_i32x4(b, d, 0x88);  /* column 4*1 + k */
        t[12 + k] = _mm512_shuffle_i32x4(b, d, 0xDD); /* column 4*3 + k */
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* pack_scalar's result, 16 columns by 16 pairs at a time where whole. */
BF16_TARGET static void pack_panel(const bf16_op *op, int j0, uint32_t *pw) {
    int K = op->K, M = op->M, nc = M - j0 < PANEL ? M - j0 : PANEL;
    if (nc < PANEL || K < 32) {
        pack_scalar(op, j0, pw);
        return;
    }
    int kp = (K + 1) / 2, whole = K / 32 * 16; /* pairs in whole blocks of 16 */
    if (!op->nn) {
        for (int c0 = 0; c0 < PANEL; c0 += 16)
            for (int p0 = 0; p0 < whole; p0 += 16) {
                __m512i r[16];
                for (int i = 0; i < 16; i++)
                    r[i] = _mm512_loadu_si512(
                        (const void *)(op->w + (size_t)(j0 + c0 + i) * K + 2 * p0));
                transpose16(r);
                for (int i = 0; i < 16; i++)
                    _mm512_store_si512((void *)(pw + (size_t)(p0 + i) * PANEL + c0), r[i]);
            }
        for (int c = 0; c < PANEL; c++) pack_row_pairs(op, j0, c, whole, pw);
    } else {
        for (int p = 0; p < kp; p++) {
            const uint16_t *r0 = op->w + (size_t)(2 * p) * M + j0;
            uint32_t *d = pw + (size_t)p * PANEL;
            for (int c = 0; c < PANEL; c += 16) {
                __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(r0 + c)));
                __m512i hi =
                    2 * p + 1 < K
                        ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(r0 + M + c)))
                        : _mm512_setzero_si512();
                _mm512_store_si512((void *)(d + c), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
            }
        }
    }
}

/* Asks for the rows a tile of rows [i0, i0 + mr) ends by reading (what it
 * adds) and writing, so that they arrive while its products run: the
 * weight gradients add into outputs far larger than the caches. */
static void fetch_rows(const bf16_op *op, int i0, int mr, int j0, int nc, int accumulate) {
    for (int i = 0; i < mr; i++) {
        const float *o =
            (op->out_rows ? op->out_rows[i0 + i] : op->out + (size_t)(i0 + i) * op->M) + j0;
        const float *a = accumulate              ? o
                         : op->add_rows          ? op->add_rows[i0 + i] + j0
                         : op->add && op->add_ld ? op->add + (size_t)(i0 + i) * op->add_ld + j0
                                                 : NULL;
        for (int c = 0; c < nc; c += 16) {
            __builtin_prefetch(o + c, 1, 3);
            if (a && a != o) __builtin_prefetch(a + c, 0, 3);
        }
    }
}

/* Rows [i0, i0 + mr) times the packed panel into out's columns [j0, j0 +
 * nc): each lane accumulates the pairs in order from zero, then adds
 * `add` (or writes) once. Always inlined with a constant mr. */
BF16_TARGET static inline __attribute__((always_inline)) void
tile(int mr, const uint32_t *x, size_t xld, const uint32_t *pw, int kp, const bf16_op *op, int i0,
     int j0, int nc, int accumulate) {
    __m512 acc[MR][NR];
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (int v = 0; v < NR; v++) acc[i][v] = _mm512_setzero_ps();
    for (int p = 0; p < kp; p++) {
        __m512bh w[NR];
#pragma GCC unroll 4
        for (int v = 0; v < NR; v++)
            w[v] = (__m512bh)_mm512_load_si512((const void *)(pw + (size_t)p * PANEL + 16 * v));
#pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)x[(size_t)i * xld + p]);
#pragma GCC unroll 4
            for (int v = 0; v < NR; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], xv, w[v]);
        }
    }
    for (int i = 0; i < mr; i++) {
        float *o = (op->out_rows ? op->out_rows[i0 + i] : op->out + (size_t)(i0 + i) * op->M) + j0;
        const float *a = accumulate     ? o
                         : op->add_rows ? op->add_rows[i0 + i] + j0
                         : op->add      ? op->add + (size_t)(i0 + i) * op->add_ld + j0
                                        : NULL;
        for (int v = 0; v < NR && 16 * v < nc; v++) {
            int left = nc - 16 * v;
            __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            __m512 r = acc[i][v];
            if (a) r = _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + 16 * v), r);
            _mm512_mask_storeu_ps(o + 16 * v, m, r);
        }
    }
}

BF16_TARGET static void panel_rows(const bf16_op *op, const uint32_t *xb, const uint32_t *pw,
                                   int j0, int accumulate, ahead *next) {
    int kp = (op->K + 1) / 2, nc = op->M - j0 < PANEL ? op->M - j0 : PANEL, N = op->N;
    int tiles = (N + MR - 1) / MR, lines = 0;
    if (next->base) {
        size_t total =
            next->runs == 1 ? next->run / 64 + 1 : (size_t)next->runs * ((next->run + 63) / 64);
        lines = (int)((total + (size_t)tiles - 1) / (size_t)tiles);
    }
    int i = 0;
    for (; i + MR <= N; i += MR) {
        fetch_ahead(next, lines);
        fetch_rows(op, i, MR, j0, nc, accumulate);
        tile(MR, xb + (size_t)i * kp, (size_t)kp, pw, kp, op, i, j0, nc, accumulate);
    }
    fetch_ahead(next, lines);
    switch (N - i) {
    case 5:
        tile(5, xb + (size_t)i * kp, (size_t)kp, pw, kp, op, i, j0, nc, accumulate);
        break;
    case 4:
        tile(4, xb + (size_t)i * kp, (size_t)kp, pw, kp, op, i, j0, nc, accumulate);
        break;
    case 3:
        tile(3, xb + (size_t)i * kp, (size_t)kp, pw, kp, op, i, j0, nc, accumulate);
        break;
    case 2:
        tile(2, xb + (size_t)i * kp, (size_t)kp, pw, kp, op, i, j0, nc, accumulate);
        break;
    case 1:
        tile(1, xb + (size_t)i * kp, (size_t)kp, pw, kp, op, i, j0, nc, accumulate);
        break;
    default:
        break;
    }
}
#else
static void pack_panel(const bf16_op *op, int j0, uint32_t *pw) {
    pack_scalar(op, j0, pw);
}

static void panel_rows(const bf16_op *op, const uint32_t *xb, const uint32_t *pw, int j0,
                       int accumulate, ahead *next) {
    (void)op, (void)xb, (void)pw, (void)j0, (void)accumulate, (void)next;
    abort(); /* bf16_cpu_ok is 0: never called */
}
#endif

/* The panel a task packs first: op k's columns from j0. */
static void task_panel(const job *j, int task, int *k, int *j0) {
    if (j->sum) {
        *k = 0;
        *j0 = task * PANEL;
        return;
    }
    int q = 0;
    while (q < j->n && task >= j->first[q + 1]) q++;
    *k = q;
    *j0 = q < j->n ? (task - j->first[q]) * PANEL : 0;
}

static void job_task(void *c, int task, float *scratch) {
    const job *j = c;
    uint32_t *pw = (uint32_t *)scratch;
    /* Tasks go out in order, so this thread's next one is likely a team's
     * width ahead: its weights are fetched while this one computes. */
    int nk, nj0, k, j0;
    ahead next = {0};
    if (task + j->width < j->first[j->n]) {
        task_panel(j, task + j->width, &nk, &nj0);
        next = ahead_of(&j->ops[nk], nj0);
    }
    if (j->sum) {
        for (k = 0; k < j->n; k++) {
            /* Fetched meanwhile: the next op's panel of these columns, or
             * after the last op the next task's. */
            ahead after = k + 1 < j->n ? ahead_of(&j->ops[k + 1], task * PANEL) : next;
            pack_panel(&j->ops[k], task * PANEL, pw);
            panel_rows(&j->ops[k], j->xb[k], pw, task * PANEL, k > 0, &after);
        }
        return;
    }
    task_panel(j, task, &k, &j0);
    pack_panel(&j->ops[k], j0, pw);
    panel_rows(&j->ops[k], j->xb[k], pw, j0, 0, &next);
}

static void *grow(void *p, size_t *len, size_t want) {
    if (want <= *len) return p;
    free(p);
    p = aligned_alloc(64, (want + 15) / 16 * 64);
    *len = p ? want : 0;
    return p;
}

void bf16_matmul(const bf16_op *ops, int n, int sum) {
    if (n < 1 || n > MAX_OPS || !bf16_cpu_ok()) abort(); /* a caller's bug, not an input */
    job j = {.ops = ops, .n = n, .sum = sum};
    size_t xlen = 0, pack = 0;
    int reuse[MAX_OPS];
    for (int k = 0; k < n; k++) {
        size_t kp = (size_t)(ops[k].K + 1) / 2;
        reuse[k] = -1;
        for (int q = 0; q < k && reuse[k] < 0; q++)
            if (ops[q].x == ops[k].x && ops[q].x_rows == ops[k].x_rows && ops[q].K == ops[k].K &&
                ops[q].N == ops[k].N)
                reuse[k] = q;
        if (reuse[k] < 0) xlen += (size_t)ops[k].N * kp + 16;
        if (kp * PANEL > pack) pack = kp * PANEL;
    }
    tl_xb = grow(tl_xb, &tl_xb_len, xlen);
    tl_scratch = grow(tl_scratch, &tl_scratch_len, pack);
    if (!tl_xb || !tl_scratch) abort(); /* as any allocation of workspace failing mid-step */
    int tasks = 0;
    if (sum)
        tasks = (ops[0].M + PANEL - 1) / PANEL;
    else
        for (int k = 0; k < n; k++) {
            j.first[k] = tasks;
            tasks += (ops[k].M + PANEL - 1) / PANEL;
        }
    j.first[n] = tasks;
    j.width = team_size();
    size_t off = 0;
    for (int k = 0; k < n; k++) {
        if (reuse[k] >= 0) {
            j.xb[k] = j.xb[reuse[k]];
            continue;
        }
        int kp = (ops[k].K + 1) / 2;
        round_args ra = {ops[k].x, ops[k].x_rows, tl_xb + off, ops[k].K, kp};
        team_for((size_t)ops[k].N, (size_t)ops[k].K, 1, round_rows, &ra);
        j.xb[k] = tl_xb + off;
        off += ((size_t)ops[k].N * kp + 15) / 16 * 16;
    }
    team_run(tasks, job_task, &j, tl_scratch, pack);
}
