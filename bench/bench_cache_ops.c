/* bench_cache_ops.c - what the llmkv cache manager costs per call, and the
   memory it saves.

   Shape: 32 layers, 8 KV heads, head_dim 128, page 16 tokens, F16 K and V
   (a Llama-3-8B-class model): 128 KiB per token, 2 MiB per page.

   Each row times a loop in which every timed call is of one kind (a reserve
   that stays inside its page is never mixed with one that takes a page; the
   loops check this through llmkv_cache_stats between timed sections). One
   untimed warm-up, then `reps` repetitions; a row reports the median and the
   minimum over repetitions of the average nanoseconds per call. The machine
   is shared and noisy: trust the median, read the minimum as the floor.

   Modes: "meta" rows use a metadata-only cache (LLMKV_STORAGE_METADATA_ONLY:
   no page bytes, so a 32k-token pool costs no RAM); "host" rows keep pages in
   host memory because the call moves data.

   Usage: bench_cache_ops [--json] [--reps N]
     --json    one JSON object per line and per row, nothing else on stdout
     --reps N  timed repetitions per row (3..101, default 11)

   Exit status 1, with a message on stderr, if any llmkv call fails or a
   loop finds the cache in a state other than the one it measures. Targets
   are printed PASS/MISS and never change the exit status. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200112L /* clock_gettime under -std=c99 */
#endif
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LLMKV_IMPLEMENTATION
#include "../llmkv.h"
#include "bench_util.h"

#define N_LAYERS 32u
#define N_KV_HEADS 8u
#define HEAD_DIM 128u
#define PAGE_SIZE 16u
#define MAX_REPS 101

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

/* llmkv_cache_stats takes a non-const cache: it counts in the cache's scratch. */
static llmkv_desc model_desc(llmkv_storage storage, uint32_t n_pages, uint32_t max_seqs,
                             uint32_t max_seq_len) {
    llmkv_desc d;
    memset(&d, 0, sizeof d);
    d.n_layers = N_LAYERS;
    d.n_kv_heads = N_KV_HEADS;
    d.head_dim = HEAD_DIM;
    d.page_size = PAGE_SIZE;
    d.k_dtype = LLMKV_DTYPE_F16;
    d.v_dtype = LLMKV_DTYPE_F16;
    d.storage = storage;
    d.n_pages = n_pages;
    d.max_seqs = max_seqs;
    d.max_seq_len = max_seq_len;
    return d;
}

/* ------------------------------------------------------------------------ */
/* Timings and output                                                       */
/* ------------------------------------------------------------------------ */

typedef struct timing {
    double ns[MAX_REPS]; /* average ns per call of each timed repetition */
    int n;
} timing;

static void timing_add(timing* t, int rep, uint64_t elapsed_ns, uint64_t calls) {
    if (rep >= 0) t->ns[t->n++] = (double)elapsed_ns / (double)calls; /* rep -1: warm-up */
}

typedef struct bench {
    int json;
    int reps;
    int n_pass, n_miss;
} bench;

typedef struct row {
    const char* op;     /* identifier for JSON */
    const char* label;  /* what the table shows */
    int meta;           /* 1: metadata-only cache, 0: host pages */
    uint64_t calls;     /* timed calls per repetition */
    double target_ns;   /* 0: no target */
    double bytes;       /* bytes read + written per call (STREAM counting); 0: none */
} row;

static void emit(bench* b, const row* r, timing* t) {
    double median, min;
    int met;
    char notes[128];
    median = median_of(t->ns, t->n);
    min = t->ns[0];
    met = target_met(median, r->target_ns, &b->n_pass, &b->n_miss);
    if (b->json) {
        printf("{\"bench\":\"cache_ops\",\"op\":\"%s\",\"mode\":\"%s\",\"ns_median\":%.2f,"
               "\"ns_min\":%.2f,\"reps\":%d,\"calls_per_rep\":%llu",
               r->op, r->meta ? "metadata_only" : "host", median, min, t->n,
               (unsigned long long)r->calls);
        if (r->target_ns > 0)
            printf(",\"target_ns\":%.0f,\"target_met\":%s", r->target_ns, met ? "true" : "false");
        if (r->bytes > 0)
            printf(",\"bytes_per_op\":%.0f,\"gb_per_s\":%.2f", r->bytes, r->bytes / median);
        printf("}\n");
        return;
    }
    notes[0] = '\0';
    if (r->target_ns > 0) {
        if (r->target_ns >= 1000)
            snprintf(notes, sizeof notes, "target < %.0f us: %s", r->target_ns / 1000,
                     met ? "PASS" : "MISS");
        else
            snprintf(notes, sizeof notes, "target < %.0f ns: %s", r->target_ns,
                     met ? "PASS" : "MISS");
    } else if (r->bytes > 0) {
        if (r->bytes >= 1024.0 * 1024.0)
            snprintf(notes, sizeof notes, "%.2f GB/s (%.1f MiB moved per call)", r->bytes / median,
                     r->bytes / (1024.0 * 1024.0));
        else
            snprintf(notes, sizeof notes, "%.2f GB/s (%.0f KiB moved per call)", r->bytes / median,
                     r->bytes / 1024.0);
    }
    printf("%-44s %-4s %12.1f %12.1f %5d  %s\n", r->label, r->meta ? "meta" : "host", median,
           min, t->n, notes);
}

static void section(const bench* b, const char* title) {
    if (!b->json) printf("\n%s\n", title);
}

/* ------------------------------------------------------------------------ */
/* reserve and truncate by one token (metadata-only)                        */
/* ------------------------------------------------------------------------ */

enum { STEP_SEQS = 256, STEP_ROUNDS = 8 };

/* STEP_SEQS sequences grow together, one token per call, as in decoding. A
   pass over all of them where each is at a page boundary times reserves
   that take a page; the 15 passes after it time reserves that stay inside
   the page. Truncate walks back the same way: 15 passes of one token that
   keep the page, then one pass that gives a page back. */
static void bench_step_ops(bench* b) {
    const uint32_t S = STEP_SEQS, R = STEP_ROUNDS, P = PAGE_SIZE;
    llmkv_desc d = model_desc(LLMKV_STORAGE_METADATA_ONLY, S * (R + 2), S, P * (R + 2));
    llmkv_cache* kv;
    llmkv_seq seqs[STEP_SEQS];
    timing within, cross, trunc_keep, trunc_free;
    uint32_t i, k, r;
    int rep;
    memset(&within, 0, sizeof within);
    memset(&cross, 0, sizeof cross);
    memset(&trunc_keep, 0, sizeof trunc_keep);
    memset(&trunc_free, 0, sizeof trunc_free);
    CHECK(llmkv_cache_create(&d, &kv));

    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t_within = 0, t_cross = 0, t_keep = 0, t_free = 0, t0;
        uint32_t used;
        for (i = 0; i < S; ++i) {
            CHECK(llmkv_seq_create(kv, &seqs[i]));
            CHECK(llmkv_reserve(kv, seqs[i], P)); /* one full page each */
        }
        used = stats_of(kv).n_pages_used;
        EXPECT(used, S);
        for (r = 0; r < R; ++r) {
            t0 = now_ns();
            for (i = 0; i < S; ++i) CHECK(llmkv_reserve(kv, seqs[i], 1));
            t_cross += now_ns() - t0;
            used += S;
            EXPECT(stats_of(kv).n_pages_used, used);
            t0 = now_ns();
            for (k = 1; k < P; ++k)
                for (i = 0; i < S; ++i) CHECK(llmkv_reserve(kv, seqs[i], 1));
            t_within += now_ns() - t0;
            EXPECT(stats_of(kv).n_pages_used, used);
        }
        /* Every sequence now holds R + 1 full pages. */
        for (r = R + 1; r > 1; --r) {
            t0 = now_ns();
            for (k = 1; k < P; ++k)
                for (i = 0; i < S; ++i) CHECK(llmkv_truncate(kv, seqs[i], r * P - k));
            t_keep += now_ns() - t0;
            EXPECT(stats_of(kv).n_pages_used, used);
            t0 = now_ns();
            for (i = 0; i < S; ++i) CHECK(llmkv_truncate(kv, seqs[i], (r - 1) * P));
            t_free += now_ns() - t0;
            used -= S;
            EXPECT(stats_of(kv).n_pages_used, used);
        }
        for (i = 0; i < S; ++i) CHECK(llmkv_seq_free(kv, seqs[i]));
        EXPECT(stats_of(kv).n_pages_used, 0);
        timing_add(&within, rep, t_within, (uint64_t)S * R * (P - 1));
        timing_add(&cross, rep, t_cross, (uint64_t)S * R);
        timing_add(&trunc_keep, rep, t_keep, (uint64_t)S * R * (P - 1));
        timing_add(&trunc_free, rep, t_free, (uint64_t)S * R);
    }
    CHECK(llmkv_cache_check(kv, NULL, 0));
    llmkv_cache_destroy(kv);

    {
        row r1 = {"reserve_1_within_page", "reserve 1 token, within page (no new page)", 1,
                  (uint64_t)S * R * (P - 1), 50, 0};
        row r2 = {"reserve_1_new_page", "reserve 1 token, crossing (takes a page)", 1,
                  (uint64_t)S * R, 150, 0};
        row r3 = {"truncate_1_within_page", "truncate by 1 token, page kept", 1,
                  (uint64_t)S * R * (P - 1), 0, 0};
        row r4 = {"truncate_1_frees_page", "truncate by 1 token, page freed", 1,
                  (uint64_t)S * R, 0, 0};
        emit(b, &r1, &within);
        emit(b, &r2, &cross);
        emit(b, &r3, &trunc_keep);
        emit(b, &r4, &trunc_free);
    }
}

/* ------------------------------------------------------------------------ */
/* 32k-token sequences: reserve, fork, free, truncate (metadata-only)       */
/* ------------------------------------------------------------------------ */

enum { LONG_LEN = 32768, LONG_SEQS = 16 };

static void bench_long_ops(bench* b) {
    const uint32_t K = LONG_SEQS, pp = LONG_LEN / PAGE_SIZE; /* pages per sequence */
    llmkv_desc d = model_desc(LLMKV_STORAGE_METADATA_ONLY, pp * (K + 1), 2 * K + 1, LONG_LEN);
    llmkv_cache* kv;
    llmkv_seq src, seqs[LONG_SEQS];
    timing t_res, t_fork, t_free_fork, t_free_last, t_half;
    uint32_t i;
    int rep;
    memset(&t_res, 0, sizeof t_res);
    memset(&t_fork, 0, sizeof t_fork);
    memset(&t_free_fork, 0, sizeof t_free_fork);
    memset(&t_free_last, 0, sizeof t_free_last);
    memset(&t_half, 0, sizeof t_half);
    CHECK(llmkv_cache_create(&d, &kv));
    CHECK(llmkv_seq_create(kv, &src));
    CHECK(llmkv_reserve(kv, src, LONG_LEN));

    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t0, dt;
        llmkv_stats st;

        /* K fresh sequences of 32k tokens, then freed: each is its pages' only owner. */
        for (i = 0; i < K; ++i) CHECK(llmkv_seq_create(kv, &seqs[i]));
        t0 = now_ns();
        for (i = 0; i < K; ++i) CHECK(llmkv_reserve(kv, seqs[i], LONG_LEN));
        dt = now_ns() - t0;
        timing_add(&t_res, rep, dt, K);
        EXPECT(stats_of(kv).n_pages_used, pp * (K + 1));
        t0 = now_ns();
        for (i = 0; i < K; ++i) CHECK(llmkv_seq_free(kv, seqs[i]));
        dt = now_ns() - t0;
        timing_add(&t_free_last, rep, dt, K);
        EXPECT(stats_of(kv).n_pages_used, pp);

        /* K forks of the 32k source, then freed: no page reaches zero. */
        t0 = now_ns();
        for (i = 0; i < K; ++i) CHECK(llmkv_fork(kv, src, &seqs[i]));
        dt = now_ns() - t0;
        timing_add(&t_fork, rep, dt, K);
        st = stats_of(kv);
        EXPECT(st.n_pages_used, pp);
        EXPECT(st.n_pages_shared, pp);
        t0 = now_ns();
        for (i = 0; i < K; ++i) CHECK(llmkv_seq_free(kv, seqs[i]));
        dt = now_ns() - t0;
        timing_add(&t_free_fork, rep, dt, K);
        st = stats_of(kv);
        EXPECT(st.n_pages_used, pp);
        EXPECT(st.n_pages_shared, 0);

        /* K private 32k sequences cut to half: 1024 pages back each. */
        for (i = 0; i < K; ++i) {
            CHECK(llmkv_seq_create(kv, &seqs[i]));
            CHECK(llmkv_reserve(kv, seqs[i], LONG_LEN));
        }
        t0 = now_ns();
        for (i = 0; i < K; ++i) CHECK(llmkv_truncate(kv, seqs[i], LONG_LEN / 2));
        dt = now_ns() - t0;
        timing_add(&t_half, rep, dt, K);
        EXPECT(stats_of(kv).n_pages_used, pp + K * pp / 2);
        for (i = 0; i < K; ++i) CHECK(llmkv_seq_free(kv, seqs[i]));
    }
    CHECK(llmkv_seq_free(kv, src));
    CHECK(llmkv_cache_check(kv, NULL, 0));
    llmkv_cache_destroy(kv);

    {
        row r1 = {"reserve_32k", "reserve 32768 tokens at once (2048 pages)", 1, K, 0, 0};
        row r2 = {"fork_32k", "fork a 32768-token sequence", 1, K, 10000, 0};
        row r3 = {"free_32k_fork", "free a 32k fork (pages stay shared)", 1, K, 10000, 0};
        row r4 = {"free_32k_last_owner", "free a 32k sequence, last owner", 1, K, 10000, 0};
        row r5 = {"truncate_32k_to_half", "truncate 32k -> 16k (1024 pages freed)", 1, K, 0, 0};
        emit(b, &r1, &t_res);
        emit(b, &r2, &t_fork);
        emit(b, &r3, &t_free_fork);
        emit(b, &r4, &t_free_last);
        emit(b, &r5, &t_half);
    }
}

/* ------------------------------------------------------------------------ */
/* put (host pages, F32 in, F16 stored)                                     */
/* ------------------------------------------------------------------------ */

enum { PUT_DECODE_TOKENS = 256, PUT_CHUNK = 16, PUT_CHUNKS = 48 };

/* The engine's pattern: reserve the step's tokens (untimed here), then one
   put per layer. Every timed call writes one layer of fresh positions. */
static void bench_put(bench* b) {
    const uint32_t total = PUT_DECODE_TOKENS + PUT_CHUNK * PUT_CHUNKS;
    const size_t row_floats = (size_t)N_KV_HEADS * HEAD_DIM;
    llmkv_desc d = model_desc(LLMKV_STORAGE_DEFAULT, total / PAGE_SIZE + 1, 1, total);
    llmkv_cache* kv;
    llmkv_seq s;
    float* k = (float*)xmalloc(PUT_CHUNK * row_floats * sizeof(float));
    float* v = (float*)xmalloc(PUT_CHUNK * row_floats * sizeof(float));
    void* pool;
    uint64_t pool_bytes, seed = 42;
    timing t1, t16;
    size_t j;
    uint32_t i, l;
    int rep;
    memset(&t1, 0, sizeof t1);
    memset(&t16, 0, sizeof t16);
    for (j = 0; j < PUT_CHUNK * row_floats; ++j) {
        k[j] = rng_float(&seed);
        v[j] = rng_float(&seed);
    }
    CHECK(llmkv_cache_create(&d, &kv));
    /* Fault the pool in: the first repetition must not time page faults. */
    CHECK(llmkv_cache_pool(kv, &pool, &pool_bytes));
    memset(pool, 0, (size_t)pool_bytes);

    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t el1 = 0, el16 = 0, t0;
        CHECK(llmkv_seq_create(kv, &s));
        for (i = 0; i < PUT_DECODE_TOKENS; ++i) {
            CHECK(llmkv_reserve(kv, s, 1));
            t0 = now_ns();
            for (l = 0; l < N_LAYERS; ++l)
                CHECK(llmkv_put(kv, s, l, 1, k, 0, v, 0, LLMKV_DTYPE_F32));
            el1 += now_ns() - t0;
        }
        for (i = 0; i < PUT_CHUNKS; ++i) {
            CHECK(llmkv_reserve(kv, s, PUT_CHUNK));
            t0 = now_ns();
            for (l = 0; l < N_LAYERS; ++l)
                CHECK(llmkv_put(kv, s, l, PUT_CHUNK, k, 0, v, 0, LLMKV_DTYPE_F32));
            el16 += now_ns() - t0;
        }
        CHECK(llmkv_seq_free(kv, s));
        timing_add(&t1, rep, el1, (uint64_t)PUT_DECODE_TOKENS * N_LAYERS);
        timing_add(&t16, rep, el16, (uint64_t)PUT_CHUNKS * N_LAYERS);
    }
    llmkv_cache_destroy(kv);
    free(k);
    free(v);

    {
        /* Per token and layer: K and V read as F32 (8 KiB), written as F16 (4 KiB). */
        double bytes1 = (double)(row_floats * 2 * (4 + 2));
        row r1 = {"put_1_token_1_layer", "put 1 token, 1 layer (F32 -> F16)", 0,
                  (uint64_t)PUT_DECODE_TOKENS * N_LAYERS, 0, bytes1};
        row r2 = {"put_16_tokens_1_layer", "put 16 tokens, 1 layer (F32 -> F16)", 0,
                  (uint64_t)PUT_CHUNKS * N_LAYERS, 0, bytes1 * (double)PUT_CHUNK};
        emit(b, &r1, &t1);
        emit(b, &r2, &t16);
    }
}

/* ------------------------------------------------------------------------ */
/* gather (host pages)                                                      */
/* ------------------------------------------------------------------------ */

enum { GATHER_LEN = 4096, GATHER_CALLS = 4 };

static void bench_gather(bench* b) {
    const size_t n_elems = (size_t)GATHER_LEN * N_KV_HEADS * HEAD_DIM; /* per part */
    llmkv_desc d = model_desc(LLMKV_STORAGE_DEFAULT, GATHER_LEN / PAGE_SIZE, 1, GATHER_LEN);
    llmkv_cache* kv;
    llmkv_seq s;
    float* k32 = (float*)xmalloc(n_elems * sizeof(float));
    float* v32 = (float*)xmalloc(n_elems * sizeof(float));
    uint16_t* k16 = (uint16_t*)xmalloc(n_elems * sizeof(uint16_t));
    uint16_t* v16 = (uint16_t*)xmalloc(n_elems * sizeof(uint16_t));
    uint64_t seed = 7;
    timing tf16, tf32;
    size_t j;
    int rep, c;
    memset(&tf16, 0, sizeof tf16);
    memset(&tf32, 0, sizeof tf32);
    for (j = 0; j < n_elems; ++j) {
        k32[j] = rng_float(&seed);
        v32[j] = rng_float(&seed);
    }
    CHECK(llmkv_cache_create(&d, &kv));
    CHECK(llmkv_seq_create(kv, &s));
    CHECK(llmkv_reserve(kv, s, GATHER_LEN));
    CHECK(llmkv_put(kv, s, 0, GATHER_LEN, k32, 0, v32, 0, LLMKV_DTYPE_F32));

    /* The source is layer 0: it must come back exactly as F16-rounded. */
    CHECK(llmkv_gather(kv, s, 0, 0, GATHER_LEN, k16, 0, v16, 0, LLMKV_DTYPE_DEFAULT));
    for (j = 0; j < n_elems; j += 4099) {
        if (k16[j] != llmkv_f32_to_f16(k32[j]) || v16[j] != llmkv_f32_to_f16(v32[j])) {
            fprintf(stderr, "bench_cache_ops: gather returned wrong data at element %lu\n",
                    (unsigned long)j);
            exit(1);
        }
    }

    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t0 = now_ns();
        for (c = 0; c < GATHER_CALLS; ++c)
            CHECK(llmkv_gather(kv, s, 0, 0, GATHER_LEN, k16, 0, v16, 0, LLMKV_DTYPE_DEFAULT));
        timing_add(&tf16, rep, now_ns() - t0, GATHER_CALLS);
        t0 = now_ns();
        for (c = 0; c < GATHER_CALLS; ++c)
            CHECK(llmkv_gather(kv, s, 0, 0, GATHER_LEN, k32, 0, v32, 0, LLMKV_DTYPE_F32));
        timing_add(&tf32, rep, now_ns() - t0, GATHER_CALLS);
    }
    CHECK(llmkv_seq_free(kv, s));
    llmkv_cache_destroy(kv);
    free(k32);
    free(v32);
    free(k16);
    free(v16);

    {
        /* K and V: read n_elems F16 each; write F16 or F32. */
        double in = (double)(2 * n_elems * 2);
        row r1 = {"gather_4096_f16_raw", "gather 1 layer, 4096 tokens -> F16 (raw)", 0,
                  GATHER_CALLS, 0, in + in};
        row r2 = {"gather_4096_f32", "gather 1 layer, 4096 tokens -> F32", 0, GATHER_CALLS, 0,
                  in + 2 * in};
        emit(b, &r1, &tf16);
        emit(b, &r2, &tf32);
    }
}

/* ------------------------------------------------------------------------ */
/* batch build (metadata-only)                                              */
/* ------------------------------------------------------------------------ */

enum { BATCH_SEQS = 16, BATCH_LEN = 4096, BATCH_BUILDS = 64 };

static void bench_batch(bench* b) {
    const uint32_t pp = BATCH_LEN / PAGE_SIZE;
    llmkv_desc d = model_desc(LLMKV_STORAGE_METADATA_ONLY, BATCH_SEQS * pp, BATCH_SEQS, BATCH_LEN);
    llmkv_cache* kv;
    llmkv_batch* batch;
    llmkv_batch_info info;
    llmkv_seq seqs[BATCH_SEQS];
    uint32_t q_lens[BATCH_SEQS];
    timing t;
    uint32_t i;
    int rep, c;
    memset(&t, 0, sizeof t);
    CHECK(llmkv_cache_create(&d, &kv));
    for (i = 0; i < BATCH_SEQS; ++i) {
        CHECK(llmkv_seq_create(kv, &seqs[i]));
        CHECK(llmkv_reserve(kv, seqs[i], BATCH_LEN));
        q_lens[i] = 1; /* a decode step: the newest token of each is the query */
    }
    CHECK(llmkv_batch_create(kv, BATCH_SEQS, BATCH_SEQS, &batch));
    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t0 = now_ns();
        for (c = 0; c < BATCH_BUILDS; ++c) CHECK(llmkv_batch_build(batch, seqs, q_lens, BATCH_SEQS));
        timing_add(&t, rep, now_ns() - t0, BATCH_BUILDS);
    }
    CHECK(llmkv_batch_get(batch, &info));
    EXPECT(info.n_seqs, BATCH_SEQS);
    EXPECT(info.n_tokens, BATCH_SEQS);
    EXPECT(info.kv_indptr[BATCH_SEQS], BATCH_SEQS * pp);
    EXPECT(info.kv_last_page_len[0], PAGE_SIZE);
    EXPECT(info.seq_lens[BATCH_SEQS - 1], BATCH_LEN);
    llmkv_batch_destroy(batch);
    for (i = 0; i < BATCH_SEQS; ++i) CHECK(llmkv_seq_free(kv, seqs[i]));
    llmkv_cache_destroy(kv);

    {
        row r = {"batch_build_16x4096", "batch build, 16 seqs x 4096 tokens (decode)", 1,
                 BATCH_BUILDS, 0, 0};
        emit(b, &r, &t);
    }
}

/* ------------------------------------------------------------------------ */
/* Memory: paged against contiguous preallocation (metadata-only)           */
/* ------------------------------------------------------------------------ */

enum { MEM_REQUESTS = 256, MEM_MIN_LEN = 100, MEM_MAX_LEN = 8192 };
#define MEM_SEED 20240601ull

static double gib(uint64_t bytes) { return (double)bytes / (1024.0 * 1024.0 * 1024.0); }

/* Request-length mixes over [MEM_MIN_LEN, MEM_MAX_LEN]. Uniform is the
   least favourable realistic case; log-uniform (as many requests between
   100 and 1000 tokens as between 1000 and 8192) is closer to real chat and
   API traffic, where most requests are short and a few are long. */
typedef enum mem_mix { MIX_UNIFORM, MIX_LOG_UNIFORM } mem_mix;

static uint32_t mix_length(mem_mix mix, uint64_t* seed) {
    if (mix == MIX_UNIFORM)
        return MEM_MIN_LEN + (uint32_t)(rng_next(seed) % (MEM_MAX_LEN - MEM_MIN_LEN + 1));
    {
        double u = (double)(rng_next(seed) >> 11) / 9007199254740992.0;
        double len = exp(log((double)MEM_MIN_LEN) + u * (log((double)MEM_MAX_LEN) - log((double)MEM_MIN_LEN)));
        return (uint32_t)(len + 0.5);
    }
}

static void bench_memory(bench* b, mem_mix mix) {
    const char* mix_name = mix == MIX_UNIFORM ? "uniform" : "log-uniform";
    const uint64_t token_bytes = (uint64_t)N_LAYERS * 2 * N_KV_HEADS * HEAD_DIM * 2; /* F16 K+V */
    const uint32_t max_pages = MEM_MAX_LEN / PAGE_SIZE;
    llmkv_desc d = model_desc(LLMKV_STORAGE_METADATA_ONLY, MEM_REQUESTS * max_pages, MEM_REQUESTS,
                              MEM_MAX_LEN);
    llmkv_cache* kv;
    llmkv_seq seqs[MEM_REQUESTS];
    llmkv_stats st;
    uint64_t seed = MEM_SEED, n_tokens = 0, want_pages = 0, paged, contiguous;
    double waste_pages;
    uint32_t i;

    CHECK(llmkv_cache_create(&d, &kv));
    for (i = 0; i < MEM_REQUESTS; ++i) {
        uint32_t len = mix_length(mix, &seed);
        CHECK(llmkv_seq_create(kv, &seqs[i]));
        CHECK(llmkv_reserve(kv, seqs[i], len));
        n_tokens += len;
        want_pages += (len + PAGE_SIZE - 1) / PAGE_SIZE;
    }
    st = stats_of(kv);
    /* Independent accounting: whole pages per sequence, nothing more. */
    EXPECT(st.n_tokens, n_tokens);
    EXPECT(st.n_pages_used, want_pages);
    EXPECT(st.n_slots_unused, want_pages * PAGE_SIZE - n_tokens);
    EXPECT(st.page_bytes, token_bytes * PAGE_SIZE);
    paged = st.used_bytes + st.metadata_bytes;
    contiguous = (uint64_t)MEM_REQUESTS * MEM_MAX_LEN * token_bytes;
    waste_pages = (double)st.n_slots_unused / (double)MEM_REQUESTS / (double)PAGE_SIZE;
    for (i = 0; i < MEM_REQUESTS; ++i) CHECK(llmkv_seq_free(kv, seqs[i]));
    llmkv_cache_destroy(kv);

    if (b->json) {
        printf("{\"bench\":\"cache_ops\",\"op\":\"memory_paged_vs_contiguous\","
               "\"mode\":\"metadata_only\",\"ns_median\":null,\"ns_min\":null,\"reps\":1,"
               "\"mix\":\"%s\",\"n_requests\":%d,\"min_len\":%d,\"max_len\":%d,\"seed\":%llu,\"tokens\":%llu,"
               "\"token_bytes\":%llu,\"paged_bytes\":%llu,\"paged_page_bytes\":%llu,"
               "\"paged_metadata_bytes\":%llu,\"contiguous_bytes\":%llu,"
               "\"contiguous_over_paged\":%.3f,\"waste_pages_per_seq\":%.3f}\n",
               mix_name, MEM_REQUESTS, MEM_MIN_LEN, MEM_MAX_LEN, (unsigned long long)MEM_SEED,
               (unsigned long long)n_tokens, (unsigned long long)(n_tokens * token_bytes),
               (unsigned long long)paged, (unsigned long long)st.used_bytes,
               (unsigned long long)st.metadata_bytes, (unsigned long long)contiguous,
               (double)contiguous / (double)paged, waste_pages);
    } else {
        printf("%d requests, lengths %s in [%d, %d] (seed %llu), %llu tokens in all:\n",
               MEM_REQUESTS, mix_name, MEM_MIN_LEN, MEM_MAX_LEN, (unsigned long long)MEM_SEED,
               (unsigned long long)n_tokens);
        printf("  K/V bytes of the tokens themselves   %9.2f GiB\n", gib(n_tokens * token_bytes));
        printf("  paged (pages used + metadata)        %9.2f GiB  (%.2f GiB pages + %.2f MiB "
               "metadata)\n",
               gib(paged), gib(st.used_bytes), (double)st.metadata_bytes / (1024.0 * 1024.0));
        printf("  contiguous, %d tokens per request  %9.2f GiB\n", MEM_MAX_LEN, gib(contiguous));
        printf("  contiguous / paged                   %9.2fx  (paged holds %.1f%% of contiguous)\n",
               (double)contiguous / (double)paged, 100.0 * (double)paged / (double)contiguous);
        printf("  contiguous / tokens' own bytes       %9.2fx  (the most any allocator can save)\n",
               (double)contiguous / (double)(n_tokens * token_bytes));
        if (mix == MIX_LOG_UNIFORM)
            printf("  target contiguous / paged >= 3x      %s\n",
                   (double)contiguous / (double)paged >= 3.0 ? "PASS" : "MISS");
        printf("  unused slots per sequence            %9.3f pages  (must be < 1: %s)\n",
               waste_pages, waste_pages < 1.0 ? "PASS" : "MISS");
    }
    if (waste_pages < 1.0) b->n_pass++;
    else b->n_miss++;
    if (mix == MIX_LOG_UNIFORM) {
        if ((double)contiguous / (double)paged >= 3.0) b->n_pass++;
        else b->n_miss++;
    }
}

/* Metadata of a realistically sized pool: 16 GiB of pages, every other
   field at its default (max_seqs 256, max_seq_len = the whole pool). */
static void bench_metadata_overhead(bench* b) {
    llmkv_desc d = model_desc(LLMKV_STORAGE_METADATA_ONLY, 0, 0, 0);
    llmkv_cache* kv;
    llmkv_stats st;
    d.capacity_bytes = (uint64_t)16 << 30;
    CHECK(llmkv_cache_create(&d, &kv));
    st = stats_of(kv);
    llmkv_cache_destroy(kv);
    if (b->json) {
        printf("{\"bench\":\"cache_ops\",\"op\":\"metadata_overhead\",\"mode\":\"metadata_only\","
               "\"ns_median\":null,\"ns_min\":null,\"reps\":1,\"capacity_bytes\":%llu,"
               "\"page_size\":%u,\"n_pages\":%u,\"pool_bytes\":%llu,\"metadata_bytes\":%llu,"
               "\"metadata_percent\":%.4f}\n",
               (unsigned long long)d.capacity_bytes, PAGE_SIZE, st.n_pages_total,
               (unsigned long long)st.pool_bytes, (unsigned long long)st.metadata_bytes,
               100.0 * (double)st.metadata_bytes / (double)st.pool_bytes);
    } else {
        printf("16 GiB pool (capacity_bytes), page 16: %u pages, metadata %.1f KiB = %.4f%% of "
               "page bytes\n",
               st.n_pages_total, (double)st.metadata_bytes / 1024.0,
               100.0 * (double)st.metadata_bytes / (double)st.pool_bytes);
    }
}

/* ------------------------------------------------------------------------ */

int main(int argc, char** argv) {
    bench b;
    int i;
    uint64_t t_start = now_ns();
    memset(&b, 0, sizeof b);
    b.reps = 11;
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--json") == 0) {
            b.json = 1;
        } else if (strcmp(argv[i], "--quick") == 0) {
            b.reps = 3; /* a smoke run: every row once, figures not meant to be reported */
        } else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
            b.reps = atoi(argv[++i]);
            if (b.reps < 3 || b.reps > MAX_REPS) {
                fprintf(stderr, "bench_cache_ops: --reps takes 3..%d\n", MAX_REPS);
                return 2;
            }
        } else {
            fprintf(stderr, "usage: %s [--json] [--quick] [--reps N]\n", argv[0]);
            return 2;
        }
    }
    if (!b.json) {
        llmkv_desc d = model_desc(LLMKV_STORAGE_METADATA_ONLY, 1, 0, 0);
        llmkv_layout lay;
        CHECK(llmkv_layout_for(&d, &lay));
        printf("llmkv %s cache-ops benchmark: %u layers, %u KV heads, head_dim %u, page %u, "
               "F16 K/V\n",
               llmkv_version(), N_LAYERS, N_KV_HEADS, HEAD_DIM, PAGE_SIZE);
        printf("page_bytes %llu (%llu per token); %d timed repetitions per row after a warm-up\n",
               (unsigned long long)lay.page_bytes,
               (unsigned long long)(lay.page_bytes / PAGE_SIZE), b.reps);
        printf("mode: meta = metadata-only cache (no page bytes), host = pages in host memory\n");
        printf("GB/s counts bytes read + bytes written (STREAM convention)\n\n");
        printf("%-44s %-4s %12s %12s %5s  %s\n", "op", "mode", "median ns/op", "min ns/op",
               "reps", "notes");
    }
    section(&b, "-- per-step metadata operations");
    bench_step_ops(&b);
    section(&b, "-- 32k-token sequences");
    bench_long_ops(&b);
    section(&b, "-- data movement");
    bench_put(&b);
    bench_gather(&b);
    section(&b, "-- batch");
    bench_batch(&b);
    section(&b, "-- memory");
    bench_memory(&b, MIX_UNIFORM);
    bench_memory(&b, MIX_LOG_UNIFORM);
    bench_metadata_overhead(&b);
    if (!b.json)
        printf("\ntargets: %d PASS, %d MISS; %.1f s\n", b.n_pass, b.n_miss,
               (double)(now_ns() - t_start) / 1e9);
    return 0;
}
