/* bench_prefix.c - what the llmkv prefix index costs, and how many prompt
   tokens its eviction keeps compared with an exact LRU.

   Four parts, all on metadata-only caches (LLMKV_STORAGE_METADATA_ONLY:
   no page bytes, so the figures are the index alone) of a Llama-3-8B-class
   shape (32 layers, 8 KV heads, head_dim 128; the shape changes nothing in
   metadata-only mode but the per-sequence watermarks):

   a. Matching. A cache holds thousands of finished conversations that share
      a 1000-token system prompt (not a whole number of pages: every
      conversation's page after it starts with the prompt's last tokens) and
      then diverge, plus a few 4096-token sequences. Times llmkv_prefix_match
      and llmkv_seq_create_prefix + llmkv_seq_free for 4096-token prompts of
      four kinds: wholly cached ("hit"), the system prompt then new tokens
      ("system"), a cached conversation then new tokens ("conversation"),
      and nothing cached ("miss"). Reported per prompt token (4096), page
      sizes 16 and 1. Target: < 5 ns per token.

   b. Eviction. Every page of the pool is cached and evictable (chains of
      64 pages under a shared 8-page prefix, as finished requests leave
      them). Times llmkv_prefix_evict, and llmkv_reserve taking pages that
      it must evict (one call for many pages, and one page per call as
      decoding does); the same reserves served from the free list are shown
      for comparison. Reported per page. Target: < 200 ns per page.

   c. A chat workload: conversations in two namespaces that start with one
      of four pinned system prompts, take turns (user message, then a
      reply decoded in chunks), several requests in flight in random
      interleaving, each turn's partly filled last page published, the pool
      a fraction of what the conversations would need. The same operations
      run, in lockstep, on an independent simulator in this file: an exact
      page-granular LRU over the publish / match rules of the prefix index
      (docs: "Prefix index" in llmkv.h), simple lists and linear scans.
      Reports the prompt tokens each served from cache and their ratio
      (target: within 1%), and what an unbounded cache would serve. Any
      request where llmkv and the simulator differ is reported on stderr.

   d. Context: what a decode step (one token reserved per sequence and
      call) costs with the index off and on; no target.

   Timing: one untimed warm-up, then `reps` repetitions; a row reports the
   median and the minimum over repetitions. The machine is shared and noisy:
   trust the median, read the minimum as the floor.

   Usage: bench_prefix [--json] [--quick] [--reps N]
     --json    one JSON object per line and per figure, nothing else on stdout
     --quick   a short run (smaller caches, 3 repetitions): a smoke test
     --reps N  timed repetitions per row (3..101, default 11)

   Exit status 1, with a message on stderr, if an llmkv call fails or a
   cache is found in a state other than the one measured. Targets are
   printed PASS/MISS and never change the exit status. */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200112L /* clock_gettime under -std=c99 */
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LLMKV_IMPLEMENTATION
#include "../llmkv.h"
#include "bench_util.h"

#define MAX_REPS 101

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

/* A metadata-only cache with the prefix index. */
static llmkv_desc index_desc(uint32_t page_size, uint32_t n_pages, uint32_t max_seqs,
                             uint32_t max_seq_len) {
    llmkv_desc d;
    memset(&d, 0, sizeof d);
    d.n_layers = 32;
    d.n_kv_heads = 8;
    d.head_dim = 128;
    d.page_size = page_size;
    d.storage = LLMKV_STORAGE_METADATA_ONLY;
    d.n_pages = n_pages;
    d.max_seqs = max_seqs;
    d.max_seq_len = max_seq_len;
    d.prefix_index = 1;
    d.max_pins = 64;
    return d;
}

/* Metadata-only caches queue the copies they decide (a partly matched page
   is copied at the first write); a device would run them. Drop them. */
static void drain_copies(llmkv_cache* kv) {
    llmkv_copy_cmd cmds[64];
    uint32_t n;
    do CHECK(llmkv_copy_cmds_take(kv, cmds, 64, &n));
    while (n == 64);
}

/* A finished request: starts from the cached prefix of t[0, n), "computes"
   the rest (metadata-only: declares it written), frees, which publishes
   its full pages. Returns the tokens it found cached. */
static uint32_t publish_request(llmkv_cache* kv, uint64_t ns, const llmkv_token* t, uint32_t n) {
    llmkv_seq s;
    uint32_t cached;
    CHECK(llmkv_seq_create_prefix(kv, ns, t, n, &s, &cached));
    CHECK(llmkv_reserve_tokens(kv, s, t + cached, n - cached));
    CHECK(llmkv_seq_mark_written(kv, s, n));
    CHECK(llmkv_seq_free(kv, s));
    drain_copies(kv);
    return cached;
}

static void fresh_tokens(llmkv_token* t, uint32_t n, uint64_t* seed) {
    uint32_t i;
    for (i = 0; i < n; ++i) t[i] = (llmkv_token)(rng_next(seed) >> 34); /* [0, 2^30) */
}

/* ------------------------------------------------------------------------ */
/* Timings and output                                                       */
/* ------------------------------------------------------------------------ */

typedef struct timing {
    double ns[MAX_REPS]; /* ns per unit (token or page) of each timed repetition */
    int n;
} timing;

static void timing_add(timing* t, int rep, uint64_t elapsed_ns, uint64_t units) {
    if (rep >= 0) t->ns[t->n++] = (double)elapsed_ns / (double)units; /* rep -1: warm-up */
}

typedef struct bench {
    int json, quick, reps;
    int n_pass, n_miss;
} bench;

typedef struct row {
    const char* op;      /* identifier for JSON */
    const char* label;   /* what the table shows */
    uint32_t page_size;
    const char* unit;    /* "token" or "page" */
    uint64_t units;      /* timed units per repetition */
    double target_ns;    /* per unit; 0: no target */
    const char* extra;   /* more JSON fields (",\"k\":v..."), or "" */
    const char* note;    /* more words for the table, or "" */
} row;

static void emit(bench* b, const row* r, timing* t) {
    double median, min;
    int met;
    char notes[64];
    median = median_of(t->ns, t->n);
    min = t->ns[0];
    met = target_met(median, r->target_ns, &b->n_pass, &b->n_miss);
    if (b->json) {
        printf("{\"bench\":\"prefix\",\"op\":\"%s\",\"mode\":\"metadata_only\",\"page_size\":%u,"
               "\"unit\":\"%s\",\"ns_median\":%.3f,\"ns_min\":%.3f,\"reps\":%d,\"units_per_rep\":%llu",
               r->op, r->page_size, r->unit, median, min, t->n, (unsigned long long)r->units);
        if (r->target_ns > 0)
            printf(",\"target_ns\":%.0f,\"target_met\":%s", r->target_ns, met ? "true" : "false");
        printf("%s}\n", r->extra);
        return;
    }
    notes[0] = '\0';
    if (r->target_ns > 0)
        snprintf(notes, sizeof notes, "target < %.0f ns/%s: %s%s", r->target_ns, r->unit,
                 met ? "PASS" : "MISS", *r->note ? "; " : "");
    printf("%-52s %4u %10.2f %10.2f %5d  %s%s\n", r->label, r->page_size, median, min, t->n, notes,
           r->note);
}

static void section(const bench* b, const char* title) {
    if (!b->json) printf("\n%s\n", title);
}

/* ------------------------------------------------------------------------ */
/* a. Matching 4096-token prompts against thousands of cached sequences     */
/* ------------------------------------------------------------------------ */

enum { SYS_LEN = 1000, PROMPT_LEN = 4096, N_QUERIES = 16, N_LONG = N_QUERIES, TAIL_MIN = 128,
       TAIL_SPAN = 257 };

typedef struct query_set {
    const char* op;
    const char* label;
    llmkv_token* prompts[N_QUERIES]; /* PROMPT_LEN tokens each */
    uint32_t match[N_QUERIES];       /* what llmkv_prefix_match must return */
} query_set;

static void time_match(bench* b, llmkv_cache* kv, query_set* q, uint32_t ps, uint32_t n_convs) {
    const int passes = 4; /* calls per repetition: passes * N_QUERIES */
    timing tm, tc;
    uint64_t matched = 0;
    uint32_t i, n;
    int rep, pass;
    char extra[160], note[48], op_m[64], op_c[64], label_m[80], label_c[80];
    row r;
    memset(&tm, 0, sizeof tm);
    memset(&tc, 0, sizeof tc);
    /* Check what is timed: the read-only match and the sequence's length. */
    for (i = 0; i < N_QUERIES; ++i) {
        llmkv_seq s;
        CHECK(llmkv_prefix_match(kv, 0, q->prompts[i], PROMPT_LEN, &n));
        EXPECT(n, q->match[i]);
        matched += n;
        CHECK(llmkv_seq_create_prefix(kv, 0, q->prompts[i], PROMPT_LEN, &s, &n));
        EXPECT(n, q->match[i] < PROMPT_LEN ? q->match[i] : PROMPT_LEN - 1);
        CHECK(llmkv_seq_free(kv, s));
    }
    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t0 = now_ns();
        for (pass = 0; pass < passes; ++pass)
            for (i = 0; i < N_QUERIES; ++i)
                CHECK(llmkv_prefix_match(kv, 0, q->prompts[i], PROMPT_LEN, &n));
        timing_add(&tm, rep, now_ns() - t0, (uint64_t)passes * N_QUERIES * PROMPT_LEN);
        t0 = now_ns();
        for (pass = 0; pass < passes; ++pass)
            for (i = 0; i < N_QUERIES; ++i) {
                llmkv_seq s;
                CHECK(llmkv_seq_create_prefix(kv, 0, q->prompts[i], PROMPT_LEN, &s, &n));
                CHECK(llmkv_seq_free(kv, s));
            }
        timing_add(&tc, rep, now_ns() - t0, (uint64_t)passes * N_QUERIES * PROMPT_LEN);
    }
    snprintf(extra, sizeof extra, ",\"prompt_tokens\":%d,\"matched_avg\":%.1f,\"cached_seqs\":%u",
             PROMPT_LEN, (double)matched / N_QUERIES, n_convs + N_LONG);
    snprintf(note, sizeof note, "%.0f matched", (double)matched / N_QUERIES);
    snprintf(op_m, sizeof op_m, "match_%s", q->op);
    snprintf(op_c, sizeof op_c, "create_free_%s", q->op);
    snprintf(label_m, sizeof label_m, "prefix_match: %s", q->label);
    snprintf(label_c, sizeof label_c, "create_prefix+free: %s", q->label);
    r.op = op_m;
    r.label = label_m;
    r.page_size = ps;
    r.unit = "token";
    r.units = (uint64_t)passes * N_QUERIES * PROMPT_LEN;
    r.target_ns = 5;
    r.extra = extra;
    r.note = note;
    emit(b, &r, &tm);
    r.op = op_c;
    r.label = label_c;
    emit(b, &r, &tc);
}

static void bench_match(bench* b, uint32_t ps) {
    const uint32_t n_convs = b->quick ? 300 : 2000;
    uint64_t seed = 11 + ps;
    llmkv_token* sys = (llmkv_token*)xmalloc(SYS_LEN * sizeof(llmkv_token));
    llmkv_token* buf = (llmkv_token*)xmalloc(PROMPT_LEN * sizeof(llmkv_token));
    query_set qs[4];
    uint32_t* tails = (uint32_t*)xmalloc(n_convs * sizeof(uint32_t));
    llmkv_token* conv_tail[N_QUERIES]; /* a few cached conversations, then new tokens */
    uint32_t conv_len[N_QUERIES];
    uint64_t n_pages;
    llmkv_desc d;
    llmkv_cache* kv;
    llmkv_stats st;
    uint32_t i, j, k;

    fresh_tokens(sys, SYS_LEN, &seed);
    n_pages = (SYS_LEN + ps - 1) / ps;
    for (i = 0; i < n_convs; ++i) {
        tails[i] = TAIL_MIN + (uint32_t)(rng_next(&seed) % TAIL_SPAN);
        n_pages += tails[i] / ps + 2;
    }
    n_pages += (uint64_t)N_LONG * (PROMPT_LEN / ps + 2) + 64;
    d = index_desc(ps, (uint32_t)n_pages, 4, PROMPT_LEN);
    CHECK(llmkv_cache_create(&d, &kv));

    /* The cached conversations: system prompt, then their own tokens. */
    memcpy(buf, sys, SYS_LEN * sizeof(llmkv_token));
    for (i = 0, k = 0; i < n_convs; ++i) {
        fresh_tokens(buf + SYS_LEN, tails[i], &seed);
        publish_request(kv, 0, buf, SYS_LEN + tails[i]);
        if (k < N_QUERIES && i == k * (n_convs / N_QUERIES)) { /* remember a few */
            conv_len[k] = SYS_LEN + tails[i];
            conv_tail[k] = (llmkv_token*)xmalloc(PROMPT_LEN * sizeof(llmkv_token));
            memcpy(conv_tail[k], buf, conv_len[k] * sizeof(llmkv_token));
            fresh_tokens(conv_tail[k] + conv_len[k], PROMPT_LEN - conv_len[k], &seed);
            ++k;
        }
    }
    /* The queries. */
    qs[0].op = "hit";
    qs[0].label = "all 4096 tokens cached";
    qs[1].op = "system";
    qs[1].label = "system prompt, then new";
    qs[2].op = "conversation";
    qs[2].label = "cached conversation, then new";
    qs[3].op = "miss";
    qs[3].label = "nothing cached";
    for (j = 0; j < N_QUERIES; ++j) {
        for (i = 0; i < 4; ++i) qs[i].prompts[j] = (llmkv_token*)xmalloc(PROMPT_LEN * sizeof(llmkv_token));
        memcpy(qs[0].prompts[j], sys, SYS_LEN * sizeof(llmkv_token));
        fresh_tokens(qs[0].prompts[j] + SYS_LEN, PROMPT_LEN - SYS_LEN, &seed);
        qs[0].match[j] = PROMPT_LEN;
        memcpy(qs[1].prompts[j], sys, SYS_LEN * sizeof(llmkv_token));
        fresh_tokens(qs[1].prompts[j] + SYS_LEN, PROMPT_LEN - SYS_LEN, &seed);
        qs[1].match[j] = SYS_LEN;
        memcpy(qs[2].prompts[j], conv_tail[j], PROMPT_LEN * sizeof(llmkv_token));
        /* only whole pages are published when a request ends */
        qs[2].match[j] = conv_len[j] / ps * ps;
        fresh_tokens(qs[3].prompts[j], PROMPT_LEN, &seed);
        qs[3].match[j] = 0;
    }
    /* The long sequences, wholly cached: the "hit" prompts. */
    for (j = 0; j < N_LONG; ++j) publish_request(kv, 0, qs[0].prompts[j], PROMPT_LEN);
    st = stats_of(kv);
    EXPECT(st.n_pages_cached, st.n_pages_evictable); /* all finished: nothing held */
    EXPECT(st.n_seqs, 0);
    if (!b->json)
        printf("page %u: %u conversations (system prompt %d + %d..%d tokens) and %d 4096-token "
               "sequences cached in %u pages\n",
               ps, n_convs, SYS_LEN, TAIL_MIN, TAIL_MIN + TAIL_SPAN - 1, N_LONG, st.n_pages_cached);
    check_cache(kv, "matching, after building");
    for (i = 0; i < 4; ++i) time_match(b, kv, &qs[i], ps, n_convs);
    check_cache(kv, "matching, at the end");
    llmkv_cache_destroy(kv);
    for (j = 0; j < N_QUERIES; ++j) {
        for (i = 0; i < 4; ++i) free(qs[i].prompts[j]);
        free(conv_tail[j]);
    }
    free(tails);
    free(buf);
    free(sys);
}

/* ------------------------------------------------------------------------ */
/* b. Eviction                                                              */
/* ------------------------------------------------------------------------ */

enum { EV_SHARED = 8, EV_OWN = 56 }; /* pages per chain: 8 shared + 56 its own */

/* Caches `n_chains` new chains of EV_SHARED + EV_OWN pages (the shared
   part is cached already after the first). */
static void ev_fill(llmkv_cache* kv, uint32_t ps, const llmkv_token* shared, llmkv_token* buf,
                    uint32_t n_chains, uint64_t* seed) {
    uint32_t i, n = (EV_SHARED + EV_OWN) * ps;
    memcpy(buf, shared, (size_t)EV_SHARED * ps * sizeof(llmkv_token));
    for (i = 0; i < n_chains; ++i) {
        fresh_tokens(buf + EV_SHARED * ps, EV_OWN * ps, seed);
        publish_request(kv, 0, buf, n);
    }
}

static void bench_evict(bench* b, uint32_t ps) {
    const uint32_t chunk_chains = b->quick ? 64 : 256;  /* chains evicted per repetition */
    const uint32_t n_chains = b->quick ? 512 : 2048;    /* chains in the pool */
    const uint32_t chunk = chunk_chains * EV_OWN;        /* pages timed per repetition */
    const uint32_t n_pages = EV_SHARED + n_chains * EV_OWN;
    llmkv_desc d = index_desc(ps, n_pages, 4, chunk * ps);
    llmkv_cache* kv;
    llmkv_token* shared = (llmkv_token*)xmalloc((size_t)EV_SHARED * ps * sizeof(llmkv_token));
    llmkv_token* buf = (llmkv_token*)xmalloc((size_t)(EV_SHARED + EV_OWN) * ps * sizeof(llmkv_token));
    uint64_t seed = 99 + ps;
    timing t_evict, t_bulk, t_bulk_free, t_step, t_step_free;
    llmkv_stats st;
    int rep;
    uint32_t i, n;
    memset(&t_evict, 0, sizeof t_evict);
    memset(&t_bulk, 0, sizeof t_bulk);
    memset(&t_bulk_free, 0, sizeof t_bulk_free);
    memset(&t_step, 0, sizeof t_step);
    memset(&t_step_free, 0, sizeof t_step_free);
    fresh_tokens(shared, EV_SHARED * ps, &seed);
    CHECK(llmkv_cache_create(&d, &kv));
    ev_fill(kv, ps, shared, buf, n_chains, &seed);
    st = stats_of(kv);
    EXPECT(st.n_pages_free, 0);
    EXPECT(st.n_pages_evictable, n_pages);

    for (rep = -1; rep < b->reps; ++rep) {
        llmkv_seq s;
        uint64_t t0, dt, ev0;

        /* llmkv_prefix_evict: chunk pages, oldest first. */
        t0 = now_ns();
        CHECK(llmkv_prefix_evict(kv, chunk, &n));
        dt = now_ns() - t0;
        EXPECT(n, chunk);
        timing_add(&t_evict, rep, dt, chunk);

        /* For comparison: one reserve of chunk pages from the free list. */
        ev0 = stats_of(kv).n_evictions;
        CHECK(llmkv_seq_create(kv, &s));
        t0 = now_ns();
        CHECK(llmkv_reserve(kv, s, chunk * ps));
        dt = now_ns() - t0;
        EXPECT(stats_of(kv).n_evictions, ev0);
        timing_add(&t_bulk_free, rep, dt, chunk);
        CHECK(llmkv_seq_free(kv, s)); /* unknown tokens: nothing published */
        ev_fill(kv, ps, shared, buf, chunk_chains, &seed);

        /* One reserve of chunk pages, every one of them evicted first. */
        EXPECT(stats_of(kv).n_pages_free, 0);
        CHECK(llmkv_seq_create(kv, &s));
        t0 = now_ns();
        CHECK(llmkv_reserve(kv, s, chunk * ps));
        dt = now_ns() - t0;
        EXPECT(stats_of(kv).n_evictions, ev0 + chunk);
        timing_add(&t_bulk, rep, dt, chunk);
        CHECK(llmkv_seq_free(kv, s));
        ev_fill(kv, ps, shared, buf, chunk_chains, &seed);

        /* Decoding: one page per reserve, each evicting one. */
        CHECK(llmkv_seq_create(kv, &s));
        t0 = now_ns();
        for (i = 0; i < chunk; ++i) CHECK(llmkv_reserve(kv, s, ps));
        dt = now_ns() - t0;
        EXPECT(stats_of(kv).n_evictions, ev0 + 2 * (uint64_t)chunk);
        timing_add(&t_step, rep, dt, chunk);
        CHECK(llmkv_seq_free(kv, s));
        ev_fill(kv, ps, shared, buf, chunk_chains, &seed);

        /* For comparison: the same from the free list. */
        CHECK(llmkv_prefix_evict(kv, chunk, &n));
        CHECK(llmkv_seq_create(kv, &s));
        t0 = now_ns();
        for (i = 0; i < chunk; ++i) CHECK(llmkv_reserve(kv, s, ps));
        dt = now_ns() - t0;
        timing_add(&t_step_free, rep, dt, chunk);
        CHECK(llmkv_seq_free(kv, s));
        ev_fill(kv, ps, shared, buf, chunk_chains, &seed);
        st = stats_of(kv);
        EXPECT(st.n_pages_free, 0);
        EXPECT(st.n_pages_evictable, n_pages);
    }
    check_cache(kv, "eviction");
    llmkv_cache_destroy(kv);
    free(shared);
    free(buf);
    {
        char extra[96];
        row r;
        snprintf(extra, sizeof extra, ",\"pool_pages\":%u,\"evictable_pages\":%u", n_pages, n_pages);
        r.page_size = ps;
        r.unit = "page";
        r.units = chunk;
        r.extra = extra;
        r.note = "";
        r.op = "prefix_evict";
        r.label = "llmkv_prefix_evict";
        r.target_ns = 200;
        emit(b, &r, &t_evict);
        r.op = "reserve_bulk_evicting";
        r.label = "reserve many pages in one call, each evicted";
        emit(b, &r, &t_bulk);
        r.op = "reserve_bulk_free_list";
        r.label = "  the same from the free list (no eviction)";
        r.target_ns = 0;
        emit(b, &r, &t_bulk_free);
        r.op = "reserve_page_evicting";
        r.label = "reserve 1 page per call, each evicted";
        r.target_ns = 200;
        emit(b, &r, &t_step);
        r.op = "reserve_page_free_list";
        r.label = "  the same from the free list (no eviction)";
        r.target_ns = 0;
        emit(b, &r, &t_step_free);
    }
}

/* ------------------------------------------------------------------------ */
/* d. A decode step with the index on (context for b)                        */
/* ------------------------------------------------------------------------ */

enum { STEP_SEQS = 256, STEP_TOKENS = 256 };

/* STEP_SEQS sequences grow by one token per call, as decoding does: the
   same cache shape with the index off, with it on (reserve_tokens), and
   with it on and each token declared written (a full page is published by
   the reserve after it fills). Per token, page-crossing calls included. */
static void bench_step(bench* b) {
    timing t[3];
    const char* ops[3] = {"step_reserve_index_off", "step_reserve_tokens", "step_reserve_tokens_written"};
    const char* labels[3] = {"decode: reserve 1 token, index off",
                             "decode: reserve_tokens 1 token, index on",
                             "  + mark_written (publishes each full page)"};
    int mode, rep;
    memset(t, 0, sizeof t);
    for (mode = 0; mode < 3; ++mode) {
        llmkv_desc d = index_desc(16, STEP_SEQS * (STEP_TOKENS / 16 + 1), STEP_SEQS, STEP_TOKENS);
        llmkv_cache* kv;
        llmkv_seq seqs[STEP_SEQS];
        llmkv_token tok = 7;
        uint32_t i, k;
        d.prefix_index = mode > 0;
        CHECK(llmkv_cache_create(&d, &kv));
        for (rep = -1; rep < b->reps; ++rep) {
            uint64_t t0;
            for (i = 0; i < STEP_SEQS; ++i) CHECK(llmkv_seq_create(kv, &seqs[i]));
            t0 = now_ns();
            for (k = 1; k <= STEP_TOKENS; ++k)
                for (i = 0; i < STEP_SEQS; ++i) {
                    if (mode == 0) {
                        CHECK(llmkv_reserve(kv, seqs[i], 1));
                    } else {
                        CHECK(llmkv_reserve_tokens(kv, seqs[i], &tok, 1));
                        if (mode == 2) CHECK(llmkv_seq_mark_written(kv, seqs[i], k));
                    }
                }
            timing_add(&t[mode], rep, now_ns() - t0, (uint64_t)STEP_TOKENS * STEP_SEQS);
            for (i = 0; i < STEP_SEQS; ++i) CHECK(llmkv_seq_free(kv, seqs[i]));
            if (mode) CHECK(llmkv_prefix_evict(kv, UINT32_MAX, NULL)); /* free list as before */
        }
        check_cache(kv, "decode steps");
        llmkv_cache_destroy(kv);
    }
    for (mode = 0; mode < 3; ++mode) {
        row r;
        r.op = ops[mode];
        r.label = labels[mode];
        r.page_size = 16;
        r.unit = "token";
        r.units = (uint64_t)STEP_TOKENS * STEP_SEQS;
        r.target_ns = 0;
        r.extra = mode ? ",\"prefix_index\":true,\"n_layers\":32" : ",\"prefix_index\":false,\"n_layers\":32";
        r.note = "";
        emit(b, &r, &t[mode]);
    }
}

/* ------------------------------------------------------------------------ */
/* c. Chat workload against an exact LRU simulator                          */
/* ------------------------------------------------------------------------ */

/* The simulator: nodes, references, pins, LRU and free list exactly as
   "Prefix index" in llmkv.h describes them, written for clarity (linked
   lists, linear scans over a parent's children), sharing no code with the
   library. Page ids are its own; nothing in this workload depends on
   them (see chat_run: no two siblings can tie in a match). */

enum { SIM_PS = 16, SIM_MAX_SEQS = 16 };
#define SIM_NONE (-1)

typedef struct spage {
    llmkv_token tok[SIM_PS];  /* token of every slot written */
    uint64_t ns;
    uint32_t ntok;            /* tokens of the node; 0: not in the index */
    uint32_t ref;             /* sequence table entries + 1 if a node */
    uint32_t pins;
    int32_t parent;           /* parent node, SIM_NONE: root */
    int32_t child, next, prev;/* children list */
    int32_t lru_prev, lru_next;
    int in_lru;
} spage;

typedef struct sseq {
    int live;
    uint64_t ns;
    int32_t* table;
    uint32_t n_pages, len, n_pub, w;
} sseq;

typedef struct sim {
    spage* pg;
    int32_t* free_stack;
    uint32_t n_pg, cap_pg, n_free;
    int unbounded;            /* never evicts: takes a new page instead */
    int32_t root_child;
    int32_t lru_head, lru_tail;
    uint32_t n_lru, n_cached, max_table;
    uint64_t evictions, matched, missed, ties;
    sseq seqs[SIM_MAX_SEQS];
} sim;

static void sim_init(sim* sm, uint32_t n_pages, int unbounded, uint32_t max_table) {
    uint32_t i;
    memset(sm, 0, sizeof *sm);
    sm->cap_pg = n_pages;
    sm->n_pg = n_pages;
    sm->unbounded = unbounded;
    sm->pg = (spage*)xmalloc(n_pages * sizeof(spage));
    sm->free_stack = (int32_t*)xmalloc(n_pages * sizeof(int32_t));
    for (i = 0; i < n_pages; ++i) sm->free_stack[sm->n_free++] = (int32_t)(n_pages - 1 - i);
    sm->root_child = sm->lru_head = sm->lru_tail = SIM_NONE;
    sm->max_table = max_table;
    for (i = 0; i < SIM_MAX_SEQS; ++i) sm->seqs[i].table = (int32_t*)xmalloc(max_table * sizeof(int32_t));
}

static void sim_destroy(sim* sm) {
    uint32_t i;
    for (i = 0; i < SIM_MAX_SEQS; ++i) free(sm->seqs[i].table);
    free(sm->pg);
    free(sm->free_stack);
}

static int32_t* sim_children(sim* sm, int32_t parent) {
    return parent == SIM_NONE ? &sm->root_child : &sm->pg[parent].child;
}

static int sim_evictable(const sim* sm, int32_t p) {
    const spage* g = &sm->pg[p];
    return g->ntok && g->ref == 1 && g->pins == 0;
}

static void sim_lru_push(sim* sm, int32_t p) {
    spage* g = &sm->pg[p];
    g->lru_prev = sm->lru_tail;
    g->lru_next = SIM_NONE;
    if (sm->lru_tail == SIM_NONE) sm->lru_head = p;
    else sm->pg[sm->lru_tail].lru_next = p;
    sm->lru_tail = p;
    g->in_lru = 1;
    sm->n_lru++;
}

static void sim_lru_remove(sim* sm, int32_t p) {
    spage* g = &sm->pg[p];
    if (g->lru_prev == SIM_NONE) sm->lru_head = g->lru_next;
    else sm->pg[g->lru_prev].lru_next = g->lru_next;
    if (g->lru_next == SIM_NONE) sm->lru_tail = g->lru_prev;
    else sm->pg[g->lru_next].lru_prev = g->lru_prev;
    g->in_lru = 0;
    sm->n_lru--;
}

static void sim_fail(const char* what) {
    fprintf(stderr, "bench_prefix: simulator: %s\n", what);
    exit(1);
}

static void sim_evict_one(sim* sm) {
    int32_t p = sm->lru_head, *head;
    spage* g;
    if (p == SIM_NONE) sim_fail("evicting from an empty LRU");
    g = &sm->pg[p];
    if (g->child != SIM_NONE) sim_fail("the LRU head has children");
    sim_lru_remove(sm, p);
    head = sim_children(sm, g->parent);
    if (g->prev == SIM_NONE) *head = g->next;
    else sm->pg[g->prev].next = g->next;
    if (g->next != SIM_NONE) sm->pg[g->next].prev = g->prev;
    g->ntok = 0;
    g->ref = 0;
    sm->free_stack[sm->n_free++] = p;
    sm->n_cached--;
    sm->evictions++;
}

static int32_t sim_take(sim* sm) {
    int32_t p;
    if (sm->n_free == 0) {
        if (sm->unbounded) { /* grow the pool */
            uint32_t i, old = sm->cap_pg;
            sm->cap_pg *= 2;
            sm->pg = (spage*)realloc(sm->pg, sm->cap_pg * sizeof(spage));
            sm->free_stack = (int32_t*)realloc(sm->free_stack, sm->cap_pg * sizeof(int32_t));
            if (!sm->pg || !sm->free_stack) sim_fail("out of memory");
            memset(sm->pg + old, 0, (sm->cap_pg - old) * sizeof(spage));
            for (i = sm->cap_pg; i-- > old;) sm->free_stack[sm->n_free++] = (int32_t)i;
            sm->n_pg = sm->cap_pg;
        } else {
            sim_evict_one(sm);
        }
    }
    p = sm->free_stack[--sm->n_free];
    sm->pg[p].ref = 1;
    sm->pg[p].ntok = 0;
    sm->pg[p].pins = 0;
    sm->pg[p].child = SIM_NONE;
    return p;
}

static void sim_hold(sim* sm, int32_t p) {
    if (sm->pg[p].in_lru) sim_lru_remove(sm, p);
    sm->pg[p].ref++;
}

static void sim_release(sim* sm, int32_t p) {
    if (--sm->pg[p].ref == 0) sm->free_stack[sm->n_free++] = p;
    else if (sim_evictable(sm, p)) sim_lru_push(sm, p);
}

static void sim_make_node(sim* sm, int32_t p, int32_t parent, uint64_t ns, uint32_t ntok) {
    spage* g = &sm->pg[p];
    int32_t* head = sim_children(sm, parent);
    g->parent = parent;
    g->ns = ns;
    g->ntok = ntok;
    g->child = SIM_NONE;
    g->prev = SIM_NONE;
    g->next = *head;
    if (*head != SIM_NONE) sm->pg[*head].prev = p;
    *head = p;
    g->ref++;
    sm->n_cached++;
}

/* The full node (parent, ns, t[0, SIM_PS)), or SIM_NONE. */
static int32_t sim_find_full(sim* sm, int32_t parent, uint64_t ns, const llmkv_token* t) {
    int32_t c;
    for (c = *sim_children(sm, parent); c != SIM_NONE; c = sm->pg[c].next)
        if (sm->pg[c].ntok == SIM_PS && sm->pg[c].ns == ns &&
            memcmp(sm->pg[c].tok, t, SIM_PS * sizeof(llmkv_token)) == 0)
            return c;
    return SIM_NONE;
}

/* Among the children of parent in ns, the one sharing the longest prefix
   (> 0) with t[0, limit); counts a tie (the library takes the lowest page
   id, which this simulator does not model). */
static int32_t sim_best_child(sim* sm, int32_t parent, uint64_t ns, const llmkv_token* t, uint32_t limit,
                              uint32_t* lcp) {
    int32_t c, best = SIM_NONE;
    uint32_t bl = 0;
    int tie = 0;
    for (c = *sim_children(sm, parent); c != SIM_NONE; c = sm->pg[c].next) {
        const spage* g = &sm->pg[c];
        uint32_t m = g->ntok < limit ? g->ntok : limit, k = 0;
        if (g->ns != ns) continue;
        while (k < m && g->tok[k] == t[k]) ++k;
        if (k > bl) {
            bl = k;
            best = c;
            tie = 0;
        } else if (k == bl && k > 0) {
            tie = 1;
        }
    }
    if (tie) sm->ties++;
    *lcp = bl;
    return best;
}

/* walk(ns, t, limit): full pages into path[], then the partial candidate. */
static uint32_t sim_walk(sim* sm, uint64_t ns, const llmkv_token* t, uint32_t limit, int32_t* path,
                         uint32_t* d_out, int32_t* cand, uint32_t* lcp) {
    int32_t node = SIM_NONE;
    uint32_t d = 0;
    while ((d + 1) * SIM_PS <= limit) {
        int32_t p = sim_find_full(sm, node, ns, t + d * SIM_PS);
        if (p == SIM_NONE) break;
        path[d++] = p;
        node = p;
    }
    *cand = SIM_NONE;
    *lcp = 0;
    if (d * SIM_PS < limit) *cand = sim_best_child(sm, node, ns, t + d * SIM_PS, limit - d * SIM_PS, lcp);
    *d_out = d;
    return d * SIM_PS + *lcp;
}

static int sim_tokens_known(const llmkv_token* t, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; ++i)
        if (t[i] < 0) return 0;
    return 1;
}

static void sim_publish(sim* sm, int si, int partial) {
    sseq* s = &sm->seqs[si];
    uint32_t end = s->w < s->len ? s->w : s->len, k = s->n_pub;
    while ((k + 1) * SIM_PS <= end && sim_tokens_known(sm->pg[s->table[k]].tok, SIM_PS)) {
        int32_t p = s->table[k], parent = k ? s->table[k - 1] : SIM_NONE, n;
        if (sm->pg[p].ntok == 0) {
            n = sim_find_full(sm, parent, s->ns, sm->pg[p].tok);
            if (n != SIM_NONE && n != p) { /* dedupe: switch to the cached page */
                sim_hold(sm, n);
                s->table[k] = n;
                sim_release(sm, p);
            } else {
                sim_make_node(sm, p, parent, s->ns, SIM_PS);
            }
        }
        s->n_pub = ++k;
    }
    if (partial && k + 1 == s->n_pages && s->len % SIM_PS && end >= s->len) {
        int32_t p = s->table[k], parent = k ? s->table[k - 1] : SIM_NONE;
        uint32_t ntok = s->len - k * SIM_PS, lcp;
        if (sm->pg[p].ntok == 0 && sim_tokens_known(sm->pg[p].tok, ntok)) {
            sim_best_child(sm, parent, s->ns, sm->pg[p].tok, ntok, &lcp);
            if (lcp < ntok) sim_make_node(sm, p, parent, s->ns, ntok);
        }
    }
}

static int sim_create_prefix(sim* sm, uint64_t ns, const llmkv_token* t, uint32_t n, uint32_t* cached) {
    int si;
    sseq* s;
    uint32_t d = 0, lcp = 0, k, match = 0;
    int32_t cand = SIM_NONE;
    for (si = 0; si < SIM_MAX_SEQS && sm->seqs[si].live; ++si) {}
    if (si == SIM_MAX_SEQS) sim_fail("too many sequences");
    s = &sm->seqs[si];
    if (n) match = sim_walk(sm, ns, t, n - 1, s->table, &d, &cand, &lcp);
    for (k = 0; k < d; ++k) sim_hold(sm, s->table[k]);
    if (cand != SIM_NONE) {
        s->table[d] = cand;
        sim_hold(sm, cand);
    }
    s->live = 1;
    s->ns = ns;
    s->len = match;
    s->n_pages = d + (cand != SIM_NONE);
    s->n_pub = d;
    s->w = match;
    sm->matched += match;
    sm->missed += n - match;
    *cached = match;
    return si;
}

/* 0 (and no change) when the pages do not fit. */
static int sim_reserve(sim* sm, int si, const llmkv_token* t, uint32_t n) {
    sseq* s = &sm->seqs[si];
    uint32_t new_len = s->len + n, want = (new_len + SIM_PS - 1) / SIM_PS, i;
    int cow;
    if (n == 0) return 1;
    if (want > sm->max_table) sim_fail("sequence too long");
    cow = s->len % SIM_PS && sm->pg[s->table[s->n_pages - 1]].ref > 1;
    if (!sm->unbounded && want - s->n_pages + (uint32_t)cow > sm->n_free + sm->n_lru) return 0;
    sim_publish(sm, si, 0);
    if (cow) { /* copy-on-write of the tail page */
        uint32_t last = s->n_pages - 1;
        int32_t old = s->table[last], fresh = sim_take(sm);
        memcpy(sm->pg[fresh].tok, sm->pg[old].tok, (s->len % SIM_PS) * sizeof(llmkv_token));
        s->table[last] = fresh;
        sim_release(sm, old);
        if (s->n_pub > last) s->n_pub = last;
    }
    while (s->n_pages < want) s->table[s->n_pages++] = sim_take(sm);
    for (i = s->len; i < new_len; ++i)
        sm->pg[s->table[i / SIM_PS]].tok[i % SIM_PS] = t ? t[i - s->len] : -1;
    s->len = new_len;
    return 1;
}

static void sim_mark_written(sim* sm, int si, uint32_t n) {
    sseq* s = &sm->seqs[si];
    if (n > s->len) n = s->len;
    if (n > s->w) s->w = n;
}

static void sim_free(sim* sm, int si) {
    sseq* s = &sm->seqs[si];
    sim_publish(sm, si, 0);
    while (s->n_pages) sim_release(sm, s->table[--s->n_pages]);
    s->live = 0;
}

static uint32_t sim_pin(sim* sm, uint64_t ns, const llmkv_token* t, uint32_t n) {
    int32_t path[4096], cand, p;
    uint32_t d = 0, lcp, pinned;
    if (n > 4096 * SIM_PS) sim_fail("pin too long");
    sim_walk(sm, ns, t, n, path, &d, &cand, &lcp);
    pinned = d * SIM_PS;
    p = d ? path[d - 1] : SIM_NONE;
    if (cand != SIM_NONE && lcp == sm->pg[cand].ntok) {
        p = cand;
        pinned += lcp;
    }
    for (; p != SIM_NONE; p = sm->pg[p].parent) {
        if (sm->pg[p].in_lru) sim_lru_remove(sm, p);
        sm->pg[p].pins++;
    }
    return pinned;
}

/* The workload. Every decision comes from its own seed, never from what a
   cache returns, so every run sees the same requests. */

enum { N_SYS = 4, N_NS = 2, MAX_LIVE = 16 };
static const uint32_t sys_len[N_SYS] = {256, 384, 512, 768}; /* whole pages: see chat_run */
static const uint64_t ns_ids[N_NS] = {0, 0x7e4a47ull};

typedef struct chat_cfg {
    uint32_t n_convs;   /* conversations in all */
    uint32_t open;      /* conversations open at once */
    uint32_t live;      /* requests in flight at once */
    uint32_t max_hist;  /* tokens a conversation may reach */
    uint32_t n_pages;   /* the cache's capacity */
} chat_cfg;

typedef struct chat_conv {
    llmkv_token* hist;
    uint32_t n, turns_left;
    int in_flight;
    uint64_t ns;
} chat_conv;

typedef struct chat_req {
    uint32_t conv, reply_left;
    llmkv_seq seq;
    int sim_seq;
} chat_req;

typedef struct chat_result {
    uint64_t turns, prompt_tokens, served_llmkv, served_sim, decode_tokens;
    uint64_t mismatched_requests, state_mismatches, evictions_llmkv, evictions_sim, ties;
    uint64_t llmkv_ns, max_cached_pages;
} chat_result;

enum { USER_MAX = 1200, REPLY_MAX = 216 };

static uint32_t user_len(uint64_t* seed) {
    if (rng_next(seed) % 10 == 0) return 400 + (uint32_t)(rng_next(seed) % 801); /* a pasted document */
    return 8 + (uint32_t)(rng_next(seed) % 121);
}

/* Compares the state both report; prints the first difference. */
static void chat_compare_state(llmkv_cache* kv, const sim* sm, chat_result* res) {
    llmkv_stats st = stats_of(kv);
    if (st.n_pages_cached != sm->n_cached || st.n_pages_evictable != sm->n_lru ||
        st.n_pages_free != sm->n_free || st.n_evictions != sm->evictions) {
        if (res->state_mismatches++ == 0)
            fprintf(stderr, "bench_prefix: chat turn %llu: llmkv cached %u evictable %u free %u "
                    "evictions %llu; LRU simulator %u %u %u %llu\n",
                    (unsigned long long)res->turns, st.n_pages_cached, st.n_pages_evictable,
                    st.n_pages_free, (unsigned long long)st.n_evictions, sm->n_cached, sm->n_lru,
                    sm->n_free, (unsigned long long)sm->evictions);
    }
}

/* Runs the workload on the simulator and, when kv is not NULL, on llmkv in
   lockstep. Conversation c is in namespace c % 2 and starts with system
   prompt (c / 2) % 4 (page-aligned) and then a token no other conversation
   has: two siblings in the index never share a first token unless they
   belong to one conversation, so a match never ties between pages (the one
   rule whose outcome depends on page ids). */
static void chat_run(const chat_cfg* cfg, llmkv_cache* kv, sim* sm, chat_result* res) {
    uint64_t seed = 424242;
    llmkv_token* sys[N_SYS];
    chat_conv* convs = (chat_conv*)xmalloc(cfg->n_convs * sizeof(chat_conv));
    chat_req reqs[MAX_LIVE];
    llmkv_token chunk_tok[16];
    uint32_t n_live = 0, next_conv = 0, n_open = 0, done = 0, i, j;
    uint32_t* open_list = (uint32_t*)xmalloc(cfg->open * sizeof(uint32_t));
    memset(res, 0, sizeof *res);

    /* System prompts, computed once per namespace and pinned. */
    for (i = 0; i < N_SYS; ++i) {
        sys[i] = (llmkv_token*)xmalloc(sys_len[i] * sizeof(llmkv_token));
        fresh_tokens(sys[i], sys_len[i], &seed);
    }
    for (j = 0; j < N_NS; ++j)
        for (i = 0; i < N_SYS; ++i) {
            uint32_t cached, pinned;
            int si = sim_create_prefix(sm, ns_ids[j], sys[i], sys_len[i], &cached);
            if (!sim_reserve(sm, si, sys[i] + cached, sys_len[i] - cached)) sim_fail("no room");
            sim_mark_written(sm, si, sys_len[i]);
            sim_free(sm, si);
            if (sim_pin(sm, ns_ids[j], sys[i], sys_len[i]) != sys_len[i]) sim_fail("pin");
            if (kv) {
                llmkv_pin pin;
                publish_request(kv, ns_ids[j], sys[i], sys_len[i]);
                CHECK(llmkv_prefix_pin(kv, ns_ids[j], sys[i], sys_len[i], &pin, &pinned));
                EXPECT(pinned, sys_len[i]);
            }
        }

    while (done < cfg->n_convs) {
        /* Open conversations up to cfg->open. */
        while (n_open < cfg->open && next_conv < cfg->n_convs) {
            chat_conv* c = &convs[next_conv];
            uint32_t s = (next_conv / N_NS) % N_SYS;
            c->hist = (llmkv_token*)xmalloc(cfg->max_hist * sizeof(llmkv_token));
            memcpy(c->hist, sys[s], sys_len[s] * sizeof(llmkv_token));
            c->n = sys_len[s];
            c->hist[c->n++] = (llmkv_token)((1 << 30) + (int32_t)next_conv); /* its own first token */
            c->turns_left = 1 + (uint32_t)(rng_next(&seed) % 8);
            c->ns = ns_ids[next_conv % N_NS];
            if (c->n + USER_MAX + REPLY_MAX > cfg->max_hist) sim_fail("max_hist too small");
            open_list[n_open++] = next_conv++;
        }
        /* Start turns while there is room in flight. */
        while (n_live < cfg->live) {
            uint32_t cand[64], n_cand = 0, ci, u, cached_k = 0, cached_s;
            chat_conv* c;
            chat_req* r;
            for (i = 0; i < n_open && n_cand < 64; ++i)
                if (!convs[open_list[i]].in_flight) cand[n_cand++] = open_list[i];
            if (n_cand == 0) break;
            ci = cand[rng_next(&seed) % n_cand];
            c = &convs[ci];
            u = user_len(&seed);
            fresh_tokens(c->hist + c->n, u, &seed);
            c->n += u;
            r = &reqs[n_live++];
            r->conv = ci;
            r->reply_left = 16 + (uint32_t)(rng_next(&seed) % (REPLY_MAX - 15));
            c->in_flight = 1;
            r->sim_seq = sim_create_prefix(sm, c->ns, c->hist, c->n, &cached_s);
            if (!sim_reserve(sm, r->sim_seq, c->hist + cached_s, c->n - cached_s)) sim_fail("no room");
            sim_mark_written(sm, r->sim_seq, c->n);
            if (kv) {
                uint64_t t0 = now_ns();
                CHECK(llmkv_seq_create_prefix(kv, c->ns, c->hist, c->n, &r->seq, &cached_k));
                CHECK(llmkv_reserve_tokens(kv, r->seq, c->hist + cached_k, c->n - cached_k));
                CHECK(llmkv_seq_mark_written(kv, r->seq, c->n));
                res->llmkv_ns += now_ns() - t0;
                drain_copies(kv);
                if (cached_k != cached_s && res->mismatched_requests++ == 0)
                    fprintf(stderr, "bench_prefix: chat turn %llu (conversation %u, %u-token prompt): "
                            "llmkv matched %u tokens, the LRU simulator %u\n",
                            (unsigned long long)res->turns, ci, c->n, cached_k, cached_s);
            }
            res->turns++;
            res->prompt_tokens += c->n;
            res->served_llmkv += cached_k;
            res->served_sim += cached_s;
        }
        if (n_live == 0) continue;
        /* Advance one request in flight by a chunk of its reply. */
        {
            uint32_t ri = (uint32_t)(rng_next(&seed) % n_live), n;
            chat_req* r = &reqs[ri];
            chat_conv* c = &convs[r->conv];
            n = 1 + (uint32_t)(rng_next(&seed) % 16);
            if (n > r->reply_left) n = r->reply_left;
            fresh_tokens(chunk_tok, n, &seed);
            memcpy(c->hist + c->n, chunk_tok, n * sizeof(llmkv_token));
            c->n += n;
            r->reply_left -= n;
            res->decode_tokens += n;
            if (!sim_reserve(sm, r->sim_seq, chunk_tok, n)) sim_fail("no room");
            sim_mark_written(sm, r->sim_seq, c->n);
            if (kv) {
                uint64_t t0 = now_ns();
                CHECK(llmkv_reserve_tokens(kv, r->seq, chunk_tok, n));
                CHECK(llmkv_seq_mark_written(kv, r->seq, c->n));
                res->llmkv_ns += now_ns() - t0;
                drain_copies(kv);
            }
            if (r->reply_left == 0) { /* the turn ends: publish all, free */
                sim_publish(sm, r->sim_seq, 1);
                sim_free(sm, r->sim_seq);
                if (kv) {
                    uint64_t t0 = now_ns();
                    CHECK(llmkv_seq_publish(kv, r->seq, 1));
                    CHECK(llmkv_seq_free(kv, r->seq));
                    res->llmkv_ns += now_ns() - t0;
                    chat_compare_state(kv, sm, res);
                    if (res->turns % 256 == 0) check_cache(kv, "chat workload");
                }
                if (sm->n_cached > res->max_cached_pages) res->max_cached_pages = sm->n_cached;
                c->in_flight = 0;
                if (--c->turns_left == 0 || c->n + USER_MAX + REPLY_MAX > cfg->max_hist) {
                    for (i = 0; i < n_open && open_list[i] != r->conv; ++i) {}
                    open_list[i] = open_list[--n_open];
                    free(c->hist);
                    c->hist = NULL;
                    done++;
                }
                *r = reqs[--n_live];
            }
        }
    }
    res->evictions_sim = sm->evictions;
    res->ties = sm->ties;
    if (kv) res->evictions_llmkv = stats_of(kv).n_evictions;
    for (i = 0; i < N_SYS; ++i) free(sys[i]);
    free(open_list);
    free(convs);
}

static void bench_chat(bench* b) {
    chat_cfg cfg;
    chat_result res, inf;
    llmkv_desc d;
    llmkv_cache* kv;
    sim sm, sm_inf;
    double ratio, frac;
    int met;
    if (b->quick) {
        cfg.n_convs = 150;
        cfg.open = 24;
        cfg.live = 6;
        cfg.max_hist = 2560;
        cfg.n_pages = 1536;
    } else {
        cfg.n_convs = 1000;
        cfg.open = 64;
        cfg.live = 8;
        cfg.max_hist = 4096;
        cfg.n_pages = 4096;
    }
    /* In flight at most live * max_hist / 16 pages, plus the pinned system
       prompts (240 pages): the rest of the pool is the cache. */
    d = index_desc(SIM_PS, cfg.n_pages, MAX_LIVE, cfg.max_hist);
    CHECK(llmkv_cache_create(&d, &kv));
    sim_init(&sm, cfg.n_pages, 0, cfg.max_hist / SIM_PS);
    chat_run(&cfg, kv, &sm, &res);
    check_cache(kv, "chat workload, at the end");
    llmkv_cache_destroy(kv);
    sim_destroy(&sm);
    /* What an unbounded cache would serve: the most any eviction can. */
    sim_init(&sm_inf, 1024, 1, cfg.max_hist / SIM_PS);
    chat_run(&cfg, NULL, &sm_inf, &inf);
    sim_destroy(&sm_inf);

    ratio = res.served_sim ? (double)res.served_llmkv / (double)res.served_sim : 1.0;
    frac = (double)cfg.n_pages / (double)inf.max_cached_pages;
    met = ratio >= 0.99 && ratio <= 1.01;
    if (met) b->n_pass++;
    else b->n_miss++;
    if (b->json) {
        printf("{\"bench\":\"prefix\",\"op\":\"chat_vs_lru\",\"mode\":\"metadata_only\",\"page_size\":%d,"
               "\"conversations\":%u,\"open\":%u,\"in_flight\":%u,\"turns\":%llu,\"capacity_pages\":%u,"
               "\"unbounded_cached_pages\":%llu,\"prompt_tokens\":%llu,\"decode_tokens\":%llu,"
               "\"served_llmkv\":%llu,\"served_lru_sim\":%llu,\"served_unbounded\":%llu,"
               "\"ratio\":%.6f,\"evictions_llmkv\":%llu,\"evictions_sim\":%llu,"
               "\"mismatched_requests\":%llu,\"state_mismatches\":%llu,\"ties\":%llu,"
               "\"llmkv_us_per_turn\":%.2f,\"target_ratio_tolerance\":0.01,\"target_met\":%s}\n",
               SIM_PS, cfg.n_convs, cfg.open, cfg.live, (unsigned long long)res.turns, cfg.n_pages,
               (unsigned long long)inf.max_cached_pages, (unsigned long long)res.prompt_tokens,
               (unsigned long long)res.decode_tokens, (unsigned long long)res.served_llmkv,
               (unsigned long long)res.served_sim, (unsigned long long)inf.served_sim, ratio,
               (unsigned long long)res.evictions_llmkv, (unsigned long long)res.evictions_sim,
               (unsigned long long)res.mismatched_requests, (unsigned long long)res.state_mismatches,
               (unsigned long long)res.ties, (double)res.llmkv_ns / 1000.0 / (double)res.turns,
               met ? "true" : "false");
        return;
    }
    printf("%u conversations (2 namespaces, 4 pinned system prompts), %u open, %u requests in "
           "flight, %llu turns;\n"
           "pool %u pages of %d tokens = %.0f%% of the %llu pages an unbounded cache ends up "
           "holding\n",
           cfg.n_convs, cfg.open, cfg.live, (unsigned long long)res.turns, cfg.n_pages, SIM_PS,
           100.0 * frac, (unsigned long long)inf.max_cached_pages);
    printf("  prompt tokens                                %12llu\n",
           (unsigned long long)res.prompt_tokens);
    printf("  served from cache, llmkv                     %12llu  (hit rate %.1f%%)\n",
           (unsigned long long)res.served_llmkv,
           100.0 * (double)res.served_llmkv / (double)res.prompt_tokens);
    printf("  served from cache, exact LRU simulator       %12llu  (hit rate %.1f%%)\n",
           (unsigned long long)res.served_sim,
           100.0 * (double)res.served_sim / (double)res.prompt_tokens);
    printf("  served from cache, unbounded cache           %12llu  (hit rate %.1f%%)\n",
           (unsigned long long)inf.served_sim,
           100.0 * (double)inf.served_sim / (double)res.prompt_tokens);
    printf("  llmkv / LRU                                  %12.4f  target within 1%%: %s\n", ratio,
           met ? "PASS" : "MISS");
    printf("  evictions, llmkv / simulator                 %6llu / %llu\n",
           (unsigned long long)res.evictions_llmkv, (unsigned long long)res.evictions_sim);
    printf("  requests matched differently; state diffs   %6llu ; %llu  (ties: %llu)\n",
           (unsigned long long)res.mismatched_requests, (unsigned long long)res.state_mismatches,
           (unsigned long long)res.ties);
    printf("  llmkv time per turn (all its calls)          %9.2f us\n",
           (double)res.llmkv_ns / 1000.0 / (double)res.turns);
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
            b.quick = 1;
            b.reps = 3;
        } else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
            b.reps = atoi(argv[++i]);
            if (b.reps < 3 || b.reps > MAX_REPS) {
                fprintf(stderr, "bench_prefix: --reps takes 3..%d\n", MAX_REPS);
                return 2;
            }
        } else {
            fprintf(stderr, "usage: %s [--json] [--quick] [--reps N]\n", argv[0]);
            return 2;
        }
    }
    if (!b.json) {
        printf("llmkv %s prefix-index benchmark: metadata-only caches, 32 layers x 8 KV heads x "
               "128 dims;\n%d timed repetitions per row after a warm-up%s\n",
               llmkv_version(), b.reps, b.quick ? " (--quick: smaller caches)" : "");
        printf("\n%-52s %4s %10s %10s %5s  %s\n", "op", "page", "median ns", "min ns", "reps",
               "per prompt token / per page");
    }
    section(&b, "-- a. matching a 4096-token prompt (ns per prompt token)");
    bench_match(&b, 16);
    bench_match(&b, 1);
    section(&b, "-- b. eviction (ns per page)");
    bench_evict(&b, 16);
    bench_evict(&b, 1);
    section(&b, "-- c. chat workload: tokens served from cache, llmkv against an exact LRU");
    bench_chat(&b);
    section(&b, "-- d. context: a decode step with the index off and on (ns per token)");
    bench_step(&b);
    if (!b.json)
        printf("\ntargets: %d PASS, %d MISS; %.1f s\n", b.n_pass, b.n_miss,
               (double)(now_ns() - t_start) / 1e9);
    return 0;
}
