/* bench_attn_cpu.c - llmkv_attend on the CPU: how fast, and how close to the
   machine's memory bandwidth.

   Shapes (head_dim 128, page 16 tokens, K and V of one storage type):
     decode   32 query heads over 8 KV heads, and 32 over 32; contexts 512,
              4096, 16384, 32768; batch 1, 4, 16 (each sequence holds `ctx`
              tokens, its newest is the query)
     prefill  32 query heads over 8 KV heads; chunks of 128 and 512 query
              tokens over contexts 0 and 4096 (the sequence holds ctx + chunk
              tokens, the newest `chunk` are the queries), causal
   for every storage type (F32, F16, BF16) and 1 and 2 threads (1: pool NULL,
   2: llmkv_threadpool_create(2)). A case whose K/V would pass 6 GiB is
   skipped and says so. One layer per cache, filled with random values
   through llmkv_put; every cache is made with llmkv_cache_create_in in one
   reused buffer, so its memory is faulted in once per run.

   The same run measures the machine's read bandwidth: a streaming read of a
   1 GiB buffer (far beyond the last-level cache) with 1 and with 2 threads,
   median of 7 runs, before the cases (the reference of %bw) and again after
   them (to show whether other work on the machine disturbed the run). Each
   case reports:
     time      median (and minimum) over repetitions of one llmkv_attend call,
               after one untimed warm-up; at least 5 repetitions, more for
               fast cases (up to 51)
     tokens/s  decode: batch / time; prefill: chunk / time
     KV GB/s   K/V bytes the call must read from the cache / time. Decode:
               sum over sequences of len * n_kv_heads * head_dim * elem * 2;
               prefill: the K/V of all ctx + chunk positions, counted once
     %bw       KV GB/s as a percent of the read bandwidth measured with the
               same number of threads
     GFLOP/s   4 * n_q_heads * head_dim * (query, key) pairs visible under
               the causal mask, / time
     %peak     GFLOP/s as a percent of the F32 multiply-add peak measured at
               the start of the run with the same number of threads: sixteen
               independent chains of FMAs as wide as the path's vectors
               (512-bit for the AVX-512 paths, 256 for AVX2, 128 for NEON;
               otherwise a plain C loop, as the compiler builds it), median
               of 5 runs of about 0.1 s
   Cold caches: a case with less than 256 MiB of K/V would otherwise find it
   in the CPU caches on every repetition, which a layer of a real model never
   does; before each of its calls (warm-up included) the benchmark reads a
   64 MiB buffer on every thread, untimed. Larger cases evict themselves.

   After the warm-up, untimed, every output is checked finite and a few rows
   (first and last sequence or query, first and last head) are compared with
   a double-precision reference over the stored keys and values (as
   llmkv_gather returns them): relative L2 error at most 1e-2, or the run
   fails.

   Types: f32, f16, bf16, q8, q4 and fp8 store K and V alike, in pages of
   16 tokens; "q4c" is the outlier-aware mode: per-channel Q4 keys (Q4C) in
   pages of 64 tokens (the per-page channel table wants long pages) with Q4
   values. K/V bytes count codes, scales and tables.

   Usage: bench_attn_cpu [--json] [--quick] [--threads N] [--dtype f32|f16|bf16|q8|q4|fp8|q4c]
                         [--kind decode|prefill] [--path auto|scalar|avx2|avx512|neon|avx512bf16|avx512vnni]
                         [--ctx N] [--batch N] [--kv-heads 8|32]
     --json     one JSON object per line (bandwidth lines, then one per case,
                skipped cases included), nothing else on stdout
     --quick    a smoke run: a handful of small cases, 3 repetitions each,
                a 256 MiB bandwidth buffer; figures not meant to be reported
     --threads  only that thread count (1..256) instead of 1 and 2
     --dtype    only that storage type
     --kind     only decode or only prefill cases
     --path     sets llmkv_attn_desc.path (default AUTO, i.e. the best the
                machine supports, or env LLMKV_CPU_PATH)
     --ctx, --batch, --kv-heads
                only decode cases of that context (512, 4096, 16384, 32768),
                batch (1, 4, 16) or KV head count (with 32 query heads)

   Exit status 1, with a message on stderr, if any llmkv call fails, an
   output is not finite or disagrees with the reference; 2 on a bad
   command line. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200112L /* clock_gettime, posix_memalign, pthreads under -std=c99 */
#endif
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define BENCH_SSE2 1
#endif
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define BENCH_X86_FMA 1
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define BENCH_NEON 1
#endif

#define LLMKV_IMPLEMENTATION
#include "../llmkv.h"
#include "bench_util.h"

#define HEAD_DIM 128u
#define PAGE_SIZE 16u       /* Q4C: PAGE_SIZE_Q4C */
#define PAGE_SIZE_Q4C 64u
#define N_Q_HEADS 32u
#define MAX_BATCH 16u
#define MAX_THREADS 256u
#define KV_CAP_BYTES ((uint64_t)6 << 30)     /* skip cases whose K/V pass this */
#define BW_BYTES ((size_t)1 << 30)           /* bandwidth buffer */
#define BW_BYTES_QUICK ((size_t)256 << 20)
#define BW_RUNS 7
#define IN_CACHE_BYTES ((size_t)1 << 20)     /* to show what the read loop can do */
#define EVICT_BYTES ((size_t)64 << 20)       /* read before each call of a small case */
#define EVICT_BELOW ((uint64_t)256 << 20)    /* cases with less K/V than this run cold */
#define MIN_REPS 5
#define MAX_REPS 51
#define QUICK_REPS 3
#define CASE_SECONDS 0.25                    /* aimed-at time of one case's repetitions */
#define FILL_CHUNK 512u                      /* tokens per llmkv_put while filling */
#define FILL_SPARE 67u                       /* extra random rows, to vary the chunks */
#define MAX_REL_ERR 1e-2
#define PEAK_ITERS 30000000u                 /* iterations of 16 FMAs per thread and run */
#define PEAK_RUNS 5

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

static void die(const char* what) {
    fprintf(stderr, "bench_attn_cpu: %s\n", what);
    exit(1);
}

static double seconds_since(uint64_t t0) { return (double)(now_ns() - t0) * 1e-9; }

/* 64-byte aligned, every page written before anything is timed. */
static void* xalloc(size_t size) {
    void* p = NULL;
    if (posix_memalign(&p, 64, size ? size : 64) != 0 || !p) {
        fprintf(stderr, "bench_attn_cpu: out of memory (%lu bytes)\n", (unsigned long)size);
        exit(1);
    }
    memset(p, 0x3c, size);
    return p;
}

/* Linux's 1, 5 and 15-minute load averages, or "?": the machine may be
   shared, and other work there distorts every figure. */
static const char* load_average(char* buf, size_t size) {
    FILE* f = fopen("/proc/loadavg", "r");
    float a = 0, b = 0, c = 0;
    int n = f ? fscanf(f, "%f %f %f", &a, &b, &c) : 0;
    if (f) fclose(f);
    if (n == 3) snprintf(buf, size, "%.2f %.2f %.2f", (double)a, (double)b, (double)c);
    else snprintf(buf, size, "?");
    return buf;
}

static double gib(uint64_t bytes) { return (double)bytes / (1024.0 * 1024.0 * 1024.0); }


/* ------------------------------------------------------------------------ */
/* Streaming read: the bandwidth measurement and the cache eviction          */
/* ------------------------------------------------------------------------ */

static volatile uint64_t g_sink; /* keeps every read alive */

/* Sums n bytes (a multiple of 128; p 64-byte aligned) as 64-bit integers,
   eight independent accumulators: no floating-point dependency chain, so
   the loop runs far faster than memory (see IN_CACHE_BYTES). */
static uint64_t read_sum(const unsigned char* p, size_t n) {
#ifdef BENCH_SSE2
    const __m128i* q = (const __m128i*)(const void*)p;
    size_t i, m = n / 16;
    __m128i a0 = _mm_setzero_si128(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    uint64_t lanes[2];
    for (i = 0; i + 8 <= m; i += 8) {
        a0 = _mm_add_epi64(a0, _mm_load_si128(q + i));
        a1 = _mm_add_epi64(a1, _mm_load_si128(q + i + 1));
        a2 = _mm_add_epi64(a2, _mm_load_si128(q + i + 2));
        a3 = _mm_add_epi64(a3, _mm_load_si128(q + i + 3));
        a4 = _mm_add_epi64(a4, _mm_load_si128(q + i + 4));
        a5 = _mm_add_epi64(a5, _mm_load_si128(q + i + 5));
        a6 = _mm_add_epi64(a6, _mm_load_si128(q + i + 6));
        a7 = _mm_add_epi64(a7, _mm_load_si128(q + i + 7));
    }
    a0 = _mm_add_epi64(_mm_add_epi64(_mm_add_epi64(a0, a1), _mm_add_epi64(a2, a3)),
                       _mm_add_epi64(_mm_add_epi64(a4, a5), _mm_add_epi64(a6, a7)));
    _mm_storeu_si128((__m128i*)(void*)lanes, a0);
    return lanes[0] + lanes[1];
#else
    const uint64_t* q = (const uint64_t*)(const void*)p;
    size_t i, m = n / 8;
    uint64_t a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (i = 0; i + 8 <= m; i += 8) {
        a[0] += q[i];
        a[1] += q[i + 1];
        a[2] += q[i + 2];
        a[3] += q[i + 3];
        a[4] += q[i + 4];
        a[5] += q[i + 5];
        a[6] += q[i + 6];
        a[7] += q[i + 7];
    }
    return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
#endif
}

typedef struct read_part {
    const unsigned char* p;
    size_t n;
    uint64_t sum;
} read_part;

static void* read_thread(void* arg) {
    read_part* part = (read_part*)arg;
    part->sum = read_sum(part->p, part->n);
    return NULL;
}

/* Reads `bytes` of buf split among n_threads (the calling thread is one of
   them); returns the wall-clock seconds, thread start and join included
   (tens of microseconds against tens of milliseconds). */
static double read_parallel(const unsigned char* buf, size_t bytes, uint32_t n_threads) {
    pthread_t tid[MAX_THREADS];
    read_part parts[MAX_THREADS];
    size_t per = bytes / n_threads / 128 * 128;
    uint64_t t0 = now_ns(), sum = 0;
    uint32_t t;
    for (t = 0; t < n_threads; ++t) {
        parts[t].p = buf + per * t;
        parts[t].n = t + 1 == n_threads ? bytes - per * t : per;
        parts[t].sum = 0;
    }
    for (t = 1; t < n_threads; ++t)
        if (pthread_create(&tid[t], NULL, read_thread, &parts[t]) != 0) die("pthread_create failed");
    read_thread(&parts[0]);
    for (t = 1; t < n_threads; ++t)
        if (pthread_join(tid[t], NULL) != 0) die("pthread_join failed");
    t0 = now_ns() - t0;
    for (t = 0; t < n_threads; ++t) sum += parts[t].sum;
    g_sink += sum;
    return (double)t0 * 1e-9;
}

/* Median GB/s (1e9 bytes/s) of `runs` reads after one warm-up read. */
static double read_bandwidth(const unsigned char* buf, size_t bytes, uint32_t n_threads, int runs) {
    double gbps[BW_RUNS];
    int r;
    read_parallel(buf, bytes, n_threads);
    for (r = 0; r < runs; ++r) gbps[r] = (double)bytes / read_parallel(buf, bytes, n_threads) / 1e9;
    return median_of(gbps, runs);
}

/* ------------------------------------------------------------------------ */
/* Compute peak: F32 multiply-adds per second, the reference of %peak       */
/* ------------------------------------------------------------------------ */

/* Each loop runs `iters` rounds of 16 independent multiply-add chains (more
   than FMA latency x units, so throughput bound) and returns a sum that
   keeps them alive. */
#ifdef BENCH_X86_FMA
__attribute__((target("avx512f"))) static float fma_loop_512(uint32_t iters) {
    __m512 a0 = _mm512_set1_ps(0.10f), a1 = _mm512_set1_ps(0.11f), a2 = _mm512_set1_ps(0.12f);
    __m512 a3 = _mm512_set1_ps(0.13f), a4 = _mm512_set1_ps(0.14f), a5 = _mm512_set1_ps(0.15f);
    __m512 a6 = _mm512_set1_ps(0.16f), a7 = _mm512_set1_ps(0.17f), a8 = _mm512_set1_ps(0.18f);
    __m512 a9 = _mm512_set1_ps(0.19f), a10 = _mm512_set1_ps(0.20f), a11 = _mm512_set1_ps(0.21f);
    __m512 a12 = _mm512_set1_ps(0.22f), a13 = _mm512_set1_ps(0.23f), a14 = _mm512_set1_ps(0.24f);
    __m512 a15 = _mm512_set1_ps(0.25f); /* all different: identical chains would be merged */
    const __m512 m = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(0.001f);
    uint32_t i;
    for (i = 0; i < iters; ++i) {
        a0 = _mm512_fmadd_ps(a0, m, c); a1 = _mm512_fmadd_ps(a1, m, c); a2 = _mm512_fmadd_ps(a2, m, c);
        a3 = _mm512_fmadd_ps(a3, m, c); a4 = _mm512_fmadd_ps(a4, m, c); a5 = _mm512_fmadd_ps(a5, m, c);
        a6 = _mm512_fmadd_ps(a6, m, c); a7 = _mm512_fmadd_ps(a7, m, c); a8 = _mm512_fmadd_ps(a8, m, c);
        a9 = _mm512_fmadd_ps(a9, m, c); a10 = _mm512_fmadd_ps(a10, m, c); a11 = _mm512_fmadd_ps(a11, m, c);
        a12 = _mm512_fmadd_ps(a12, m, c); a13 = _mm512_fmadd_ps(a13, m, c); a14 = _mm512_fmadd_ps(a14, m, c);
        a15 = _mm512_fmadd_ps(a15, m, c);
    }
    a0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                       _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    a8 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)),
                       _mm512_add_ps(_mm512_add_ps(a12, a13), _mm512_add_ps(a14, a15)));
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a8));
}
__attribute__((target("avx2,fma"))) static float fma_loop_256(uint32_t iters) {
    __m256 a0 = _mm256_set1_ps(0.10f), a1 = _mm256_set1_ps(0.11f), a2 = _mm256_set1_ps(0.12f);
    __m256 a3 = _mm256_set1_ps(0.13f), a4 = _mm256_set1_ps(0.14f), a5 = _mm256_set1_ps(0.15f);
    __m256 a6 = _mm256_set1_ps(0.16f), a7 = _mm256_set1_ps(0.17f), a8 = _mm256_set1_ps(0.18f);
    __m256 a9 = _mm256_set1_ps(0.19f), a10 = _mm256_set1_ps(0.20f), a11 = _mm256_set1_ps(0.21f);
    __m256 a12 = _mm256_set1_ps(0.22f), a13 = _mm256_set1_ps(0.23f), a14 = _mm256_set1_ps(0.24f);
    __m256 a15 = _mm256_set1_ps(0.25f);
    const __m256 m = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(0.001f);
    float lanes[8], sum = 0.0f;
    uint32_t i;
    for (i = 0; i < iters; ++i) {
        a0 = _mm256_fmadd_ps(a0, m, c); a1 = _mm256_fmadd_ps(a1, m, c); a2 = _mm256_fmadd_ps(a2, m, c);
        a3 = _mm256_fmadd_ps(a3, m, c); a4 = _mm256_fmadd_ps(a4, m, c); a5 = _mm256_fmadd_ps(a5, m, c);
        a6 = _mm256_fmadd_ps(a6, m, c); a7 = _mm256_fmadd_ps(a7, m, c); a8 = _mm256_fmadd_ps(a8, m, c);
        a9 = _mm256_fmadd_ps(a9, m, c); a10 = _mm256_fmadd_ps(a10, m, c); a11 = _mm256_fmadd_ps(a11, m, c);
        a12 = _mm256_fmadd_ps(a12, m, c); a13 = _mm256_fmadd_ps(a13, m, c); a14 = _mm256_fmadd_ps(a14, m, c);
        a15 = _mm256_fmadd_ps(a15, m, c);
    }
    a0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                       _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    a8 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)),
                       _mm256_add_ps(_mm256_add_ps(a12, a13), _mm256_add_ps(a14, a15)));
    _mm256_storeu_ps(lanes, _mm256_add_ps(a0, a8));
    for (i = 0; i < 8; ++i) sum += lanes[i];
    return sum;
}
#endif
#ifdef BENCH_NEON
static float fma_loop_neon(uint32_t iters) {
    float32x4_t a[16];
    const float32x4_t m = vdupq_n_f32(0.999f), c = vdupq_n_f32(0.001f);
    float sum = 0.0f;
    uint32_t i, k;
    for (k = 0; k < 16; ++k) a[k] = vdupq_n_f32(0.1f + 0.01f * (float)k);
    for (i = 0; i < iters; ++i)
        for (k = 0; k < 16; ++k) a[k] = vfmaq_f32(c, a[k], m);
    for (k = 0; k < 16; ++k) sum += vaddvq_f32(a[k]);
    return sum;
}
#endif
static float fma_loop_scalar(uint32_t iters) {
    float a[16], sum = 0.0f;
    uint32_t i, k;
    for (k = 0; k < 16; ++k) a[k] = 0.1f + 0.01f * (float)k;
    for (i = 0; i < iters; ++i)
        for (k = 0; k < 16; ++k) a[k] = a[k] * 0.999f + 0.001f;
    for (k = 0; k < 16; ++k) sum += a[k];
    return sum;
}

typedef struct peak_part {
    int width; /* lanes per FMA: 16, 8, 4 or 1 */
    float sum;
} peak_part;

static void* peak_thread(void* arg) {
    peak_part* part = (peak_part*)arg;
    switch (part->width) {
#ifdef BENCH_X86_FMA
    case 16: part->sum = fma_loop_512(PEAK_ITERS); break;
    case 8: part->sum = fma_loop_256(PEAK_ITERS); break;
#endif
#ifdef BENCH_NEON
    case 4: part->sum = fma_loop_neon(PEAK_ITERS); break;
#endif
    default: part->sum = fma_loop_scalar(PEAK_ITERS); break;
    }
    return NULL;
}

/* The FMA width of a path: what its kernels use. */
static int path_width(const char* path_name) {
#ifdef BENCH_X86_FMA
    if (strncmp(path_name, "avx512", 6) == 0) return 16;
    if (strcmp(path_name, "avx2") == 0) return 8;
#endif
#ifdef BENCH_NEON
    if (strcmp(path_name, "neon") == 0) return 4;
#endif
    (void)path_name;
    return 1;
}

/* Median GFLOP/s (2 flops per lane and multiply-add) of PEAK_RUNS runs on
   n_threads threads, wall clock from the first start to the last join. */
static double fma_peak(int width, uint32_t n_threads) {
    pthread_t tid[MAX_THREADS];
    peak_part parts[MAX_THREADS];
    double gflops[PEAK_RUNS];
    uint32_t t;
    int r;
    for (r = 0; r < PEAK_RUNS; ++r) {
        uint64_t t0 = now_ns();
        for (t = 0; t < n_threads; ++t) parts[t].width = width;
        for (t = 1; t < n_threads; ++t)
            if (pthread_create(&tid[t], NULL, peak_thread, &parts[t]) != 0) die("pthread_create failed");
        peak_thread(&parts[0]);
        for (t = 1; t < n_threads; ++t)
            if (pthread_join(tid[t], NULL) != 0) die("pthread_join failed");
        gflops[r] = 2.0 * 16.0 * width * PEAK_ITERS * n_threads / ((double)(now_ns() - t0) * 1e-9) / 1e9;
        for (t = 0; t < n_threads; ++t) g_sink += (uint64_t)(parts[t].sum > 0.0f);
    }
    return median_of(gflops, PEAK_RUNS);
}

/* ------------------------------------------------------------------------ */
/* Options and run state                                                    */
/* ------------------------------------------------------------------------ */

typedef struct bench {
    int json, quick;
    int only_kind;              /* 0: both, 1: decode, 2: prefill */
    llmkv_dtype only_dtype;     /* DEFAULT: every type */
    uint32_t only_threads;      /* 0: 1 and 2 */
    uint32_t only_ctx;          /* 0: every context */
    uint32_t only_batch;        /* 0: every decode batch */
    uint32_t only_kv_heads;     /* 0: 8 and 32 */
    llmkv_cpu_path path;        /* desc.path */
    const char* path_name;      /* the path that runs */

    uint32_t threads[2];        /* thread counts to run */
    int n_threads;
    llmkv_threadpool* pools[2]; /* NULL for 1 thread */
    uint32_t bw_threads[3];     /* thread counts whose bandwidth was measured */
    double bw_gbps[3];
    double peak_gflops[3];      /* F32 FMA peak at those thread counts */
    int n_bw;

    unsigned char* evict_buf;
    uint32_t evict_threads;

    /* Every cache is made inside this one buffer (llmkv_cache_create_in),
       grown when a case needs more: the memory is faulted in once, not for
       each of the tens of GiB the run fills (page faults are slow here). */
    unsigned char* arena;
    size_t arena_size;

    int n_run, n_skipped;
    uint64_t fill_bytes;
    double fill_seconds;
} bench;

static double peak_for(const bench* b, uint32_t threads) {
    int i;
    for (i = 0; i < b->n_bw; ++i)
        if (b->bw_threads[i] == threads) return b->peak_gflops[i];
    return 0;
}

static double bandwidth_for(const bench* b, uint32_t threads) {
    int i;
    for (i = 0; i < b->n_bw; ++i)
        if (b->bw_threads[i] == threads) return b->bw_gbps[i];
    return 0;
}

/* ------------------------------------------------------------------------ */
/* A filled cache                                                           */
/* ------------------------------------------------------------------------ */

typedef struct kvset {
    llmkv_cache* kv;
    llmkv_batch* batch;
    llmkv_seq seqs[MAX_BATCH];
    uint32_t n_seqs, seq_len, n_kv_heads;
    llmkv_dtype dtype;
} kvset;

static uint32_t page_size_for(llmkv_dtype dtype) { return dtype == LLMKV_DTYPE_Q4C ? PAGE_SIZE_Q4C : PAGE_SIZE; }

/* The cache descriptor of a benchmark type ("q4c": Q4C keys, Q4 values). */
static void desc_for(llmkv_desc* d, uint32_t n_kv_heads, llmkv_dtype dtype) {
    memset(d, 0, sizeof *d);
    d->n_layers = 1;
    d->n_kv_heads = n_kv_heads;
    d->head_dim = HEAD_DIM;
    d->page_size = page_size_for(dtype);
    d->k_dtype = dtype;
    d->v_dtype = dtype == LLMKV_DTYPE_Q4C ? LLMKV_DTYPE_Q4 : dtype;
}

/* Source rows for a storage type: the type itself for F32/F16/BF16 (so
   put copies), F32 for the quantized types (put quantizes). */
static llmkv_dtype source_type(llmkv_dtype dtype) {
    return dtype == LLMKV_DTYPE_F16 || dtype == LLMKV_DTYPE_BF16 ? dtype : LLMKV_DTYPE_F32;
}

static void fill_random(void* dst, llmkv_dtype dtype, size_t n, uint64_t* seed) {
    size_t i;
    for (i = 0; i < n; ++i) {
        float x = rng_float(seed);
        if (dtype == LLMKV_DTYPE_F32) ((float*)dst)[i] = x;
        else if (dtype == LLMKV_DTYPE_F16) ((uint16_t*)dst)[i] = llmkv_f32_to_f16(x);
        else ((uint16_t*)dst)[i] = llmkv_f32_to_bf16(x);
    }
}

/* n_seqs sequences of seq_len tokens, one layer, every K and V random
   (rows of source_type). */
static void kvset_create(bench* b, kvset* s, uint32_t n_kv_heads, llmkv_dtype dtype, uint32_t n_seqs,
                         uint32_t seq_len, uint32_t max_tokens) {
    const size_t row = (size_t)n_kv_heads * HEAD_DIM;
    const llmkv_dtype src_t = source_type(dtype);
    const size_t elem = llmkv_dtype_size(src_t);
    const size_t src_elems = (size_t)(FILL_CHUNK + FILL_SPARE) * row;
    unsigned char* k_src = (unsigned char*)xalloc(src_elems * elem);
    unsigned char* v_src = (unsigned char*)xalloc(src_elems * elem);
    uint64_t seed = 0x5eed0000u + n_kv_heads * 131u + (uint64_t)dtype, t0, pool_bytes;
    uint32_t i, done, chunk_no = 0;
    size_t size;
    void* pool;
    llmkv_desc d;

    memset(s, 0, sizeof *s);
    fill_random(k_src, src_t, src_elems, &seed);
    fill_random(v_src, src_t, src_elems, &seed);
    desc_for(&d, n_kv_heads, dtype);
    d.n_pages = n_seqs * ((seq_len + d.page_size - 1) / d.page_size);
    d.max_seqs = n_seqs;
    d.max_seq_len = seq_len;
    t0 = now_ns();
    CHECK(llmkv_cache_memory_size(&d, &size, NULL));
    if (size > b->arena_size) {
        free(b->arena);
        b->arena = (unsigned char*)xalloc(size);
        b->arena_size = size;
    }
    CHECK(llmkv_cache_create_in(&d, b->arena, size, &s->kv));
    for (i = 0; i < n_seqs; ++i) {
        CHECK(llmkv_seq_create(s->kv, &s->seqs[i]));
        for (done = 0; done < seq_len; done += FILL_CHUNK, ++chunk_no) {
            uint32_t n = seq_len - done < FILL_CHUNK ? seq_len - done : FILL_CHUNK;
            size_t off = (size_t)(chunk_no * 13u % FILL_SPARE) * row * elem;
            CHECK(llmkv_reserve(s->kv, s->seqs[i], n));
            CHECK(llmkv_put(s->kv, s->seqs[i], 0, n, k_src + off, 0, v_src + off, 0, src_t));
        }
    }
    b->fill_seconds += seconds_since(t0);
    CHECK(llmkv_cache_pool(s->kv, &pool, &pool_bytes));
    b->fill_bytes += pool_bytes;
    CHECK(llmkv_batch_create(s->kv, n_seqs, max_tokens, &s->batch));
    s->n_seqs = n_seqs;
    s->seq_len = seq_len;
    s->n_kv_heads = n_kv_heads;
    s->dtype = dtype;
    free(k_src);
    free(v_src);
}

static void kvset_destroy(kvset* s) {
    uint32_t i;
    llmkv_batch_destroy(s->batch);
    for (i = 0; i < s->n_seqs; ++i) CHECK(llmkv_seq_free(s->kv, s->seqs[i]));
    llmkv_cache_destroy(s->kv);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------------------------ */
/* Cases                                                                    */
/* ------------------------------------------------------------------------ */

typedef struct acase {
    int prefill;
    llmkv_dtype dtype;
    uint32_t n_kv_heads;
    uint32_t batch;     /* sequences */
    uint32_t ctx;       /* decode: sequence length; prefill: positions before the chunk */
    uint32_t q_tokens;  /* query rows: decode batch, prefill chunk */
    uint32_t threads;
} acase;

static uint64_t case_kv_bytes(const acase* c) {
    uint64_t tokens = c->prefill ? (uint64_t)c->ctx + c->q_tokens : (uint64_t)c->batch * c->ctx;
    llmkv_desc d;
    llmkv_layout l;
    desc_for(&d, c->n_kv_heads, c->dtype);
    CHECK(llmkv_layout_for(&d, &l));
    /* K and V of every head: data, scales and tables, without padding */
    return tokens * (l.k.bytes + l.k.scale_bytes + l.v.bytes + l.v.scale_bytes) / l.page_size;
}

static double case_pairs(const acase* c) { /* (query, key) pairs under the causal mask */
    if (c->prefill)
        return (double)c->q_tokens * (double)c->ctx +
               (double)c->q_tokens * ((double)c->q_tokens + 1.0) / 2.0;
    return (double)c->batch * (double)c->ctx;
}

static void print_table_header(void) {
    printf("%-7s %-5s %-5s %5s %6s %5s %3s %11s %11s %4s %11s %8s %6s %8s %6s\n", "kind", "dtype",
           "heads", "batch", "ctx", "q_tok", "thr", "median ms", "min ms", "reps", "tokens/s",
           "KV GB/s", "%bw", "GFLOP/s", "%peak");
}

static void print_shape(const acase* c) {
    char heads[16];
    snprintf(heads, sizeof heads, "%u/%u", N_Q_HEADS, c->n_kv_heads);
    printf("%-7s %-5s %-5s %5u %6u %5u %3u", c->prefill ? "prefill" : "decode",
           llmkv_dtype_name(c->dtype), heads, c->batch, c->ctx, c->q_tokens, c->threads);
}

static void json_shape(const bench* b, const acase* c) {
    printf("{\"bench\":\"attn_cpu\",\"kind\":\"%s\",\"dtype\":\"%s\",\"batch\":%u,\"ctx\":%u,"
           "\"q_tokens\":%u,\"n_q_heads\":%u,\"n_kv_heads\":%u,\"head_dim\":%u,\"page_size\":%u,"
           "\"threads\":%u,\"path\":\"%s\",\"kv_bytes\":%llu",
           c->prefill ? "prefill" : "decode", llmkv_dtype_name(c->dtype), c->batch, c->ctx,
           c->q_tokens, N_Q_HEADS, c->n_kv_heads, HEAD_DIM, page_size_for(c->dtype), c->threads, b->path_name,
           (unsigned long long)case_kv_bytes(c));
}

static void emit_skip(bench* b, const acase* c) {
    b->n_skipped++;
    if (b->json) {
        json_shape(b, c);
        printf(",\"skipped\":\"too large\",\"cap_bytes\":%llu}\n", (unsigned long long)KV_CAP_BYTES);
    } else {
        print_shape(c);
        printf("   skipped: too large (%.1f GiB of K/V > %.0f GiB cap)\n", gib(case_kv_bytes(c)),
               gib(KV_CAP_BYTES));
    }
    fflush(stdout);
}

static void emit_result(bench* b, const acase* c, double median, double min, int reps, int cold) {
    double kv_gbps = (double)case_kv_bytes(c) / median / 1e9;
    double bw = bandwidth_for(b, c->threads);
    double pct = bw > 0 ? 100.0 * kv_gbps / bw : 0;
    double gflops = 4.0 * N_Q_HEADS * HEAD_DIM * case_pairs(c) / median / 1e9;
    double tok_s = (double)c->q_tokens / median;
    double peak = peak_for(b, c->threads);
    double pct_peak = peak > 0 ? 100.0 * gflops / peak : 0;
    b->n_run++;
    if (b->json) {
        json_shape(b, c);
        printf(",\"seconds\":%.9f,\"seconds_min\":%.9f,\"reps\":%d,\"tokens_per_s\":%.1f,"
               "\"kv_gbps\":%.3f,\"bw_gbps\":%.3f,\"pct_bw\":%.2f,\"gflops\":%.3f,\"peak_gflops\":%.3f,"
               "\"pct_peak\":%.2f,\"cold\":%s}\n",
               median, min, reps, tok_s, kv_gbps, bw, pct, gflops, peak, pct_peak, cold ? "true" : "false");
    } else {
        print_shape(c);
        printf(" %11.3f %11.3f %4d %11.1f %8.2f %5.1f%% %8.2f %5.1f%%\n", median * 1e3, min * 1e3, reps,
               tok_s, kv_gbps, pct, gflops, pct_peak);
    }
    fflush(stdout);
}

/* ------------------------------------------------------------------------ */
/* Checking the output                                                      */
/* ------------------------------------------------------------------------ */

/* The stored K and V head vectors (position pos, kv_head) of sequence seq,
   as floats (what llmkv_gather returns: the exact stored values). */
static void stored_kv(const kvset* s, uint32_t seq, uint32_t pos, uint32_t kv_head, float* k, float* v) {
    float kr[N_Q_HEADS * HEAD_DIM], vr[N_Q_HEADS * HEAD_DIM]; /* n_kv_heads <= N_Q_HEADS */
    CHECK(llmkv_gather(s->kv, s->seqs[seq], 0, pos, 1, kr, 0, vr, 0, LLMKV_DTYPE_F32));
    memcpy(k, kr + (size_t)kv_head * HEAD_DIM, sizeof(float) * HEAD_DIM);
    memcpy(v, vr + (size_t)kv_head * HEAD_DIM, sizeof(float) * HEAD_DIM);
}

/* Relative L2 error of output row `row`, head `h` (of sequence `seq` in the
   batch) against a double-precision softmax over the keys it may see. */
static double check_row(const kvset* s, const llmkv_batch_info* info, const float* q,
                        const float* out, uint32_t seq, uint32_t row, uint32_t h) {
    const uint32_t group = N_Q_HEADS / s->n_kv_heads, kvh = h / group;
    const float* qv = q + ((size_t)row * N_Q_HEADS + h) * HEAD_DIM;
    const float* ov = out + ((size_t)row * N_Q_HEADS + h) * HEAD_DIM;
    const uint32_t n_keys = (uint32_t)info->positions[row] + 1; /* causal */
    const double scale = 1.0 / sqrt((double)HEAD_DIM);
    double acc[HEAD_DIM], m = -HUGE_VAL, sum = 0, err = 0, norm = 0;
    uint32_t j, d;
    for (d = 0; d < HEAD_DIM; ++d) acc[d] = 0;
    float kf[HEAD_DIM], vf[HEAD_DIM];
    for (j = 0; j < n_keys; ++j) { /* the maximum logit first */
        double l = 0;
        stored_kv(s, seq, j, kvh, kf, vf);
        for (d = 0; d < HEAD_DIM; ++d) l += (double)qv[d] * (double)kf[d];
        if (l * scale > m) m = l * scale;
    }
    for (j = 0; j < n_keys; ++j) {
        double l = 0, p;
        stored_kv(s, seq, j, kvh, kf, vf);
        for (d = 0; d < HEAD_DIM; ++d) l += (double)qv[d] * (double)kf[d];
        p = exp(l * scale - m);
        sum += p;
        for (d = 0; d < HEAD_DIM; ++d) acc[d] += p * (double)vf[d];
    }
    for (d = 0; d < HEAD_DIM; ++d) {
        double ref = acc[d] / sum, e = (double)ov[d] - ref;
        err += e * e;
        norm += ref * ref;
    }
    return sqrt(err) / (sqrt(norm) > 1e-30 ? sqrt(norm) : 1e-30);
}

static void check_output(const kvset* s, const acase* c, const float* q, const float* out) {
    llmkv_batch_info info;
    size_t i, n = (size_t)c->q_tokens * N_Q_HEADS * HEAD_DIM;
    uint32_t rows[2], seqs[2], heads[2] = {0, N_Q_HEADS - 1}, a, h;
    for (i = 0; i < n; ++i) {
        if (!isfinite(out[i])) {
            fprintf(stderr, "bench_attn_cpu: %s %s batch %u ctx %u threads %u: output %lu is not "
                    "finite (%g)\n", c->prefill ? "prefill" : "decode", llmkv_dtype_name(c->dtype),
                    c->batch, c->ctx, c->threads, (unsigned long)i, (double)out[i]);
            exit(1);
        }
    }
    CHECK(llmkv_batch_get(s->batch, &info));
    if (info.n_seqs != c->batch || info.n_tokens != c->q_tokens) die("batch does not match the case");
    if (c->prefill) { /* the first and the last query of the chunk */
        seqs[0] = seqs[1] = 0;
        rows[0] = 0;
        rows[1] = c->q_tokens - 1;
    } else { /* the query of the first and of the last sequence */
        seqs[0] = 0;
        seqs[1] = c->batch - 1;
        rows[0] = (uint32_t)info.qo_indptr[0];
        rows[1] = (uint32_t)info.qo_indptr[c->batch - 1];
    }
    for (a = 0; a < 2; ++a)
        for (h = 0; h < 2; ++h) {
            double e = check_row(s, &info, q, out, seqs[a], rows[a], heads[h]);
            if (!(e <= MAX_REL_ERR)) {
                fprintf(stderr, "bench_attn_cpu: %s %s %u/%u batch %u ctx %u threads %u: row %u "
                        "head %u differs from the reference (relative L2 error %.3g > %.0e)\n",
                        c->prefill ? "prefill" : "decode", llmkv_dtype_name(c->dtype), N_Q_HEADS,
                        c->n_kv_heads, c->batch, c->ctx, c->threads, rows[a], heads[h], e,
                        MAX_REL_ERR);
                exit(1);
            }
        }
}

/* ------------------------------------------------------------------------ */
/* Timing one case                                                          */
/* ------------------------------------------------------------------------ */

/* Times one llmkv_attend call; a cold case reads the eviction buffer first. */
static double attend_once(const bench* b, const kvset* s, const llmkv_attn_desc* desc,
                          llmkv_threadpool* pool, int cold) {
    uint64_t t0;
    if (cold) read_parallel(b->evict_buf, EVICT_BYTES, b->evict_threads);
    t0 = now_ns();
    CHECK(llmkv_attend(s->kv, s->batch, desc, pool));
    return seconds_since(t0);
}

/* Runs every thread count for the batch that s->batch describes now. */
static void run_threads(bench* b, const kvset* s, acase c, const float* q, float* out) {
    llmkv_attn_desc desc;
    int ti;
    memset(&desc, 0, sizeof desc);
    desc.layer = 0;
    desc.n_q_heads = N_Q_HEADS;
    desc.q = q;
    desc.out = out;
    desc.path = b->path;
    for (ti = 0; ti < b->n_threads; ++ti) {
        double t[MAX_REPS], warm, evict_s = 0, median, min;
        int cold = case_kv_bytes(&c) < EVICT_BELOW, reps, r;
        c.threads = b->threads[ti];
        memset(out, 0xff, (size_t)c.q_tokens * N_Q_HEADS * HEAD_DIM * sizeof(float)); /* NaN */
        if (cold) {
            uint64_t t0 = now_ns();
            read_parallel(b->evict_buf, EVICT_BYTES, b->evict_threads);
            evict_s = seconds_since(t0);
        }
        warm = attend_once(b, s, &desc, b->pools[ti], cold);
        check_output(s, &c, q, out);
        if (b->quick) {
            reps = QUICK_REPS;
        } else {
            double want = CASE_SECONDS / (warm + evict_s);
            reps = want >= MAX_REPS ? MAX_REPS : want <= MIN_REPS ? MIN_REPS : (int)want;
        }
        for (r = 0; r < reps; ++r) t[r] = attend_once(b, s, &desc, b->pools[ti], cold);
        median = median_of(t, reps);
        min = t[0];
        emit_result(b, &c, median, min, reps, cold);
    }
}

static void* xalloc_floats(size_t n, uint64_t* seed) {
    float* p = (float*)xalloc(n * sizeof(float));
    size_t i;
    if (seed)
        for (i = 0; i < n; ++i) p[i] = rng_float(seed);
    return p;
}

static void section(const bench* b, const char* kind, uint32_t n_kv_heads, llmkv_dtype dtype) {
    if (!b->json)
        printf("\n-- %s, %u query heads over %u KV heads, %s K/V\n", kind, N_Q_HEADS, n_kv_heads,
               llmkv_dtype_name(dtype));
}

static void bench_decode(bench* b, uint32_t n_kv_heads, llmkv_dtype dtype) {
    static const uint32_t ctxs[] = {512, 4096, 16384, 32768};
    static const uint32_t batches[] = {1, 4, 16};
    const int n_ctx = b->quick ? 1 : 4, n_batch = b->quick ? 2 : 3;
    int ci, bi, ti;
    section(b, "decode", n_kv_heads, dtype);
    for (ci = 0; ci < n_ctx; ++ci) {
        kvset s;
        uint32_t fit = 0; /* the largest batch within the cap */
        acase c;
        if (b->only_ctx && ctxs[ci] != b->only_ctx) continue;
        memset(&c, 0, sizeof c);
        c.dtype = dtype;
        c.n_kv_heads = n_kv_heads;
        c.ctx = ctxs[ci];
        for (bi = 0; bi < n_batch; ++bi) {
            c.batch = batches[bi];
            if (case_kv_bytes(&c) <= KV_CAP_BYTES && (!b->only_batch || batches[bi] <= b->only_batch))
                fit = batches[bi];
        }
        if (fit) kvset_create(b, &s, n_kv_heads, dtype, fit, c.ctx, fit);
        for (bi = 0; bi < n_batch; ++bi) {
            uint32_t q_lens[MAX_BATCH], i;
            uint64_t seed = 0x9000u + c.ctx + batches[bi];
            float *q, *out;
            c.batch = c.q_tokens = batches[bi];
            if (b->only_batch && c.batch != b->only_batch) continue;
            if (c.batch > fit) {
                for (ti = 0; ti < b->n_threads; ++ti) {
                    c.threads = b->threads[ti];
                    emit_skip(b, &c);
                }
                continue;
            }
            for (i = 0; i < c.batch; ++i) q_lens[i] = 1; /* the newest token is the query */
            CHECK(llmkv_batch_build(s.batch, s.seqs, q_lens, c.batch));
            q = (float*)xalloc_floats((size_t)c.q_tokens * N_Q_HEADS * HEAD_DIM, &seed);
            out = (float*)xalloc_floats((size_t)c.q_tokens * N_Q_HEADS * HEAD_DIM, NULL);
            run_threads(b, &s, c, q, out);
            free(q);
            free(out);
        }
        if (fit) kvset_destroy(&s);
    }
}

static void bench_prefill(bench* b, llmkv_dtype dtype) {
    static const uint32_t chunks[] = {128, 512};
    static const uint32_t ctxs[] = {0, 4096};
    const uint32_t n_kv_heads = 8;
    const int n_chunk = b->quick ? 1 : 2, n_ctx = b->quick ? 1 : 2;
    int ki, ci;
    section(b, "prefill", n_kv_heads, dtype);
    for (ki = 0; ki < n_chunk; ++ki)
        for (ci = 0; ci < n_ctx; ++ci) {
            kvset s;
            acase c;
            uint64_t seed = 0xA000u + chunks[ki] + ctxs[ci];
            float *q, *out;
            memset(&c, 0, sizeof c);
            c.prefill = 1;
            c.dtype = dtype;
            c.n_kv_heads = n_kv_heads;
            c.batch = 1;
            c.ctx = ctxs[ci];
            c.q_tokens = chunks[ki];
            if (case_kv_bytes(&c) > KV_CAP_BYTES) { /* never with these shapes */
                int ti;
                for (ti = 0; ti < b->n_threads; ++ti) {
                    c.threads = b->threads[ti];
                    emit_skip(b, &c);
                }
                continue;
            }
            kvset_create(b, &s, n_kv_heads, dtype, 1, c.ctx + c.q_tokens, c.q_tokens);
            CHECK(llmkv_batch_build(s.batch, s.seqs, &c.q_tokens, 1));
            q = (float*)xalloc_floats((size_t)c.q_tokens * N_Q_HEADS * HEAD_DIM, &seed);
            out = (float*)xalloc_floats((size_t)c.q_tokens * N_Q_HEADS * HEAD_DIM, NULL);
            run_threads(b, &s, c, q, out);
            free(q);
            free(out);
            kvset_destroy(&s);
        }
}

/* ------------------------------------------------------------------------ */
/* Bandwidth                                                                */
/* ------------------------------------------------------------------------ */

/* Measures the read bandwidth for 1 and 2 threads (and an other --threads
   count). At the start of the run (at_end 0) the figures become the
   reference of every %bw; at the end (at_end 1, in the cache arena, already
   faulted in) they are measured again only to show whether the machine was
   equally quiet throughout: other work on it lowers both figures. */
static void measure_bandwidth(bench* b, int at_end) {
    const size_t bytes = b->quick ? BW_BYTES_QUICK : BW_BYTES;
    const int runs = b->quick ? 3 : BW_RUNS;
    int reuse = at_end && b->arena_size >= bytes, i, changed = 0;
    unsigned char* buf = reuse ? b->arena : (unsigned char*)xalloc(bytes);
    double gbps[3], in_cache;
    if (!at_end) {
        b->bw_threads[b->n_bw++] = 1;
        b->bw_threads[b->n_bw++] = 2;
        if (b->only_threads > 2) b->bw_threads[b->n_bw++] = b->only_threads;
    }
    for (i = 0; i < b->n_bw; ++i) {
        gbps[i] = read_bandwidth(buf, bytes, b->bw_threads[i], runs);
        if (at_end && fabs(gbps[i] / b->bw_gbps[i] - 1.0) > 0.15) changed = 1;
        if (!at_end) b->bw_gbps[i] = gbps[i];
    }
    in_cache = read_bandwidth(buf, IN_CACHE_BYTES, 1, runs);
    if (!reuse) free(buf);
    if (!at_end)
        for (i = 0; i < b->n_bw; ++i) b->peak_gflops[i] = fma_peak(path_width(b->path_name), b->bw_threads[i]);
    for (i = 0; i < b->n_bw; ++i) {
        if (b->json)
            printf("{\"bench\":\"attn_cpu\",\"kind\":\"bandwidth\",\"when\":\"%s\",\"threads\":%u,"
                   "\"bw_gbps\":%.3f,\"buffer_bytes\":%lu,\"runs\":%d,\"loop_in_cache_gbps\":%.3f}\n",
                   at_end ? "end" : "start", b->bw_threads[i], gbps[i], (unsigned long)bytes, runs,
                   in_cache);
    }
    if (!b->json) {
        printf("%s (streaming read of a %lu MiB buffer, median of %d):",
               at_end ? "read bandwidth again at the end" : "memory read bandwidth", (unsigned long)(bytes >> 20),
               runs);
        for (i = 0; i < b->n_bw; ++i)
            printf("%s %u thread%s %.2f GB/s", i ? "," : "", b->bw_threads[i],
                   b->bw_threads[i] == 1 ? "" : "s", gbps[i]);
        printf("\n  (the read loop itself: %.1f GB/s on a %lu MiB cache-resident buffer, 1 thread)\n",
               in_cache, (unsigned long)(IN_CACHE_BYTES >> 20));
        if (changed)
            printf("  more than 15%% away from the start: the machine was busy, so %%bw (and every "
                   "time) is uncertain\n");
        if (!at_end) {
            printf("F32 FMA peak (%d-lane multiply-adds, 16 chains, median of %d):", path_width(b->path_name),
                   PEAK_RUNS);
            for (i = 0; i < b->n_bw; ++i)
                printf("%s %u thread%s %.1f GFLOP/s", i ? "," : "", b->bw_threads[i],
                       b->bw_threads[i] == 1 ? "" : "s", b->peak_gflops[i]);
            printf("\n");
        }
    }
    if (b->json && !at_end)
        for (i = 0; i < b->n_bw; ++i)
            printf("{\"bench\":\"attn_cpu\",\"kind\":\"peak\",\"threads\":%u,\"lanes\":%d,\"gflops\":%.3f}\n",
                   b->bw_threads[i], path_width(b->path_name), b->peak_gflops[i]);
    fflush(stdout);
}

/* ------------------------------------------------------------------------ */

static void usage(const char* argv0) {
    fprintf(stderr,
            "usage: %s [--json] [--quick] [--threads N] [--dtype f32|f16|bf16|q8|q4|fp8|q4c]\n"
            "       [--kind decode|prefill] [--path auto|scalar|avx2|avx512|neon|avx512bf16|avx512vnni]\n"
            "       [--ctx N] [--batch N] [--kv-heads 8|32]\n",
            argv0);
    exit(2);
}

int main(int argc, char** argv) {
    bench b;
    int i;
    char load[64];
    uint64_t t_start = now_ns();
    static const llmkv_dtype dtypes[] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_Q8,
                                         LLMKV_DTYPE_Q4,  LLMKV_DTYPE_FP8, LLMKV_DTYPE_Q4C};
    memset(&b, 0, sizeof b);
    b.path = LLMKV_CPU_PATH_AUTO;
    for (i = 1; i < argc; ++i) {
        const char* a = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--json") == 0) {
            b.json = 1;
        } else if (strcmp(a, "--quick") == 0) {
            b.quick = 1;
        } else if (strcmp(a, "--threads") == 0 && v) {
            char* end;
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > (long)MAX_THREADS) usage(argv[0]);
            b.only_threads = (uint32_t)n;
            ++i;
        } else if (strcmp(a, "--dtype") == 0 && v) {
            if (strcmp(v, "f32") == 0) b.only_dtype = LLMKV_DTYPE_F32;
            else if (strcmp(v, "f16") == 0) b.only_dtype = LLMKV_DTYPE_F16;
            else if (strcmp(v, "bf16") == 0) b.only_dtype = LLMKV_DTYPE_BF16;
            else if (strcmp(v, "q8") == 0) b.only_dtype = LLMKV_DTYPE_Q8;
            else if (strcmp(v, "q4") == 0) b.only_dtype = LLMKV_DTYPE_Q4;
            else if (strcmp(v, "fp8") == 0) b.only_dtype = LLMKV_DTYPE_FP8;
            else if (strcmp(v, "q4c") == 0) b.only_dtype = LLMKV_DTYPE_Q4C;
            else usage(argv[0]);
            ++i;
        } else if ((strcmp(a, "--ctx") == 0 || strcmp(a, "--batch") == 0 || strcmp(a, "--kv-heads") == 0) && v) {
            char* end;
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > 1000000) usage(argv[0]);
            if (a[2] == 'c') b.only_ctx = (uint32_t)n;
            else if (a[2] == 'b') b.only_batch = (uint32_t)n;
            else b.only_kv_heads = (uint32_t)n;
            ++i;
        } else if (strcmp(a, "--kind") == 0 && v) {
            if (strcmp(v, "decode") == 0) b.only_kind = 1;
            else if (strcmp(v, "prefill") == 0) b.only_kind = 2;
            else usage(argv[0]);
            ++i;
        } else if (strcmp(a, "--path") == 0 && v) {
            int p, named = -1;
            for (p = LLMKV_CPU_PATH_AUTO; p <= LLMKV_CPU_PATH_LAST; ++p)
                if (strcmp(v, llmkv_cpu_path_name((llmkv_cpu_path)p)) == 0) named = p;
            if (named < 0) usage(argv[0]);
            b.path = (llmkv_cpu_path)named;
            ++i;
        } else {
            usage(argv[0]);
        }
    }
    if (!llmkv_cpu_path_supported(b.path)) {
        fprintf(stderr, "bench_attn_cpu: path %s is not supported on this machine or build\n",
                llmkv_cpu_path_name(b.path));
        return 1;
    }
    b.path_name = llmkv_cpu_path_name(b.path == LLMKV_CPU_PATH_AUTO ? llmkv_cpu_path_auto() : b.path);
    if (b.only_threads) {
        b.threads[b.n_threads++] = b.only_threads;
    } else {
        b.threads[b.n_threads++] = 1;
        b.threads[b.n_threads++] = 2;
    }
    for (i = 0; i < b.n_threads; ++i)
        if (b.threads[i] > 1) CHECK(llmkv_threadpool_create(b.threads[i], NULL, &b.pools[i]));
    b.evict_threads = b.threads[b.n_threads - 1] > 2 ? b.threads[b.n_threads - 1] : 2;

    if (!b.json) {
        printf("llmkv %s CPU attention benchmark: path %s%s, head_dim %u, page %u, %u query heads, "
               "one layer\n",
               llmkv_version(), b.path_name, b.path == LLMKV_CPU_PATH_AUTO ? " (auto)" : "",
               HEAD_DIM, PAGE_SIZE, N_Q_HEADS);
        printf("load average at start: %s (other work on the machine distorts every figure)\n",
               load_average(load, sizeof load));
    }
    measure_bandwidth(&b, 0);
    b.evict_buf = (unsigned char*)xalloc(EVICT_BYTES);
    if (!b.json) {
        printf("time: median (and minimum) of one llmkv_attend call over reps repetitions after "
               "an untimed warm-up\n");
        printf("KV GB/s: K/V bytes read / time. decode: sum over sequences of len * n_kv_heads * "
               "head_dim * elem * 2;\n");
        printf("  prefill: K/V of all ctx + chunk positions counted once\n");
        printf("%%bw: KV GB/s / read bandwidth at the same thread count. GFLOP/s: 4 * n_q_heads * "
               "head_dim * (query, key)\n");
        printf("  pairs under the causal mask / time. tokens/s: decode batch / time, prefill "
               "chunk / time\n");
        printf("cases under %llu MiB of K/V run cold: a %llu MiB read evicts the caches before "
               "each call (untimed)\n",
               (unsigned long long)(EVICT_BELOW >> 20), (unsigned long long)(EVICT_BYTES >> 20));
        printf("cases over %.0f GiB of K/V are skipped; every output is checked against a "
               "reference once per case\n",
               gib(KV_CAP_BYTES));
        if (b.quick) printf("--quick: a smoke run, %d repetitions; do not report these figures\n",
                            QUICK_REPS);
        printf("\n");
        print_table_header();
    }

    if (b.only_kind != 2) {
        static const uint32_t kv_heads[] = {8, 32};
        int h, d;
        for (h = 0; h < 2; ++h)
            for (d = 0; d < (int)(sizeof dtypes / sizeof dtypes[0]); ++d)
                if ((!b.only_dtype || b.only_dtype == dtypes[d]) && (!b.only_kv_heads || b.only_kv_heads == kv_heads[h]))
                    bench_decode(&b, kv_heads[h], dtypes[d]);
    }
    if (b.only_kind != 1) {
        int d;
        for (d = 0; d < (int)(sizeof dtypes / sizeof dtypes[0]); ++d)
            if (!b.only_dtype || b.only_dtype == dtypes[d]) bench_prefill(&b, dtypes[d]);
    }

    if (!b.json) printf("\n");
    measure_bandwidth(&b, 1);
    for (i = 0; i < b.n_threads; ++i) llmkv_threadpool_destroy(b.pools[i]);
    free(b.evict_buf);
    free(b.arena);
    if (!b.json)
        printf("%d cases run, %d skipped (too large); caches made and filled through llmkv_put: "
               "%.1f GiB in %.1f s (untimed); %.1f s in all; load average now %s\n",
               b.n_run, b.n_skipped, gib(b.fill_bytes), b.fill_seconds, seconds_since(t_start),
               load_average(load, sizeof load));
    return 0;
}
