/* Many threads driving one thread-safe cache (desc.thread_safe).

   Four threads share one cache with a prefix index and a pool too small for
   all of them, so they constantly share prompt pages, publish, evict and
   copy on write under each other. Each thread owns its sequences and pins
   (the header's rule: calls on one sequence do not overlap) and keeps a
   plain model of them: the token ids of every position. The K/V written
   for a position is a function of its namespace, layer and every token up
   to it, so whatever page a sequence ends up on (its own, one another
   thread published, a deduplicated twin, an imported copy of its own
   export), gather must return exactly that function. After the threads join, the invariant checker must pass and
   every page must come back. Run under ThreadSanitizer by CI. */
#include "test_util.h"

#ifndef LLMKV_NO_THREADS
#include <pthread.h>

#define T_THREADS 4
#define T_SEQS 4       /* sequences per thread */
#define T_MAX_LEN 48
#define T_LAYERS 2
#define T_HEADS 2
#define T_DIM 8
#define T_ROW (T_HEADS * T_DIM)

typedef struct tseq {
    llmkv_seq h;
    int live;
    uint64_t ns;
    uint32_t len;
    llmkv_token tok[T_MAX_LEN];
} tseq;

typedef struct tctx {
    llmkv_cache* kv;
    uint32_t id;
    unsigned iters;
    tst_rng rng;
    tseq s[T_SEQS];
    llmkv_pin pins[2];
    int pinned[2];
    int fails;            /* checks that failed in this thread */
    char why[200];        /* the first one */
    unsigned n_ops, n_hits, n_capacity;
} tctx;

/* Three prompt families every thread draws from, so prefixes repeat. */
static llmkv_token t_family(uint32_t f, uint32_t i) { return (llmkv_token)(i < 10 ? i % 7 : (i * 31u + f * 17u) % 5u); }

/* The value stored for (ns, tokens[0..pos], layer, part, element): small
   multiples of 1/16, exact in F16. */
static float t_value(uint64_t ns, const llmkv_token* tok, uint32_t pos, uint32_t layer, int part, uint32_t e) {
    uint64_t h = ns * 0x9E3779B97F4A7C15ull + 1;
    uint32_t i;
    for (i = 0; i <= pos; ++i) h = (h ^ (uint64_t)(uint32_t)tok[i]) * 0xff51afd7ed558ccdull;
    h ^= ((uint64_t)layer << 40) ^ ((uint64_t)part << 48) ^ e;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return (float)((int)(h % 2001u) - 1000) / 16.0f;
}

static void t_fail(tctx* c, const char* what, llmkv_result r) {
    if (!c->fails) snprintf(c->why, sizeof c->why, "thread %u op %u: %s (%s)", c->id, c->n_ops, what, llmkv_result_string(r));
    c->fails++;
}

static int t_capacity(llmkv_result r) {
    return r == LLMKV_ERR_OUT_OF_PAGES || r == LLMKV_ERR_TOO_MANY_SEQUENCES || r == LLMKV_ERR_TOO_MANY_PINS;
}

/* Writes positions [from, len) of every layer, K and V. */
static llmkv_result t_put(tctx* c, tseq* s, uint32_t from) {
    float k[T_MAX_LEN * T_ROW], v[T_MAX_LEN * T_ROW];
    uint32_t layer, p, e, n = s->len - from;
    llmkv_result r;
    if (!n) return LLMKV_OK;
    for (layer = 0; layer < T_LAYERS; ++layer) {
        for (p = 0; p < n; ++p)
            for (e = 0; e < T_ROW; ++e) {
                k[p * T_ROW + e] = t_value(s->ns, s->tok, from + p, layer, 0, e);
                v[p * T_ROW + e] = t_value(s->ns, s->tok, from + p, layer, 1, e);
            }
        r = llmkv_put(c->kv, s->h, layer, n, k, 0, v, 0, LLMKV_DTYPE_F32);
        if (r != LLMKV_OK) return r;
    }
    return LLMKV_OK;
}

/* Gathers the whole sequence and compares it with the value function. */
static void t_verify(tctx* c, tseq* s) {
    float k[T_MAX_LEN * T_ROW], v[T_MAX_LEN * T_ROW];
    llmkv_token tok[T_MAX_LEN];
    uint32_t layer, p, e;
    llmkv_result r;
    if (!s->len) return;
    r = llmkv_seq_tokens(c->kv, s->h, 0, s->len, tok);
    if (r != LLMKV_OK || memcmp(tok, s->tok, s->len * sizeof tok[0]) != 0) t_fail(c, "token ids differ", r);
    for (layer = 0; layer < T_LAYERS; ++layer) {
        r = llmkv_gather(c->kv, s->h, layer, 0, s->len, k, 0, v, 0, LLMKV_DTYPE_F32);
        if (r != LLMKV_OK) {
            t_fail(c, "gather", r);
            return;
        }
        for (p = 0; p < s->len; ++p)
            for (e = 0; e < T_ROW; ++e)
                if (k[p * T_ROW + e] != t_value(s->ns, s->tok, p, layer, 0, e) ||
                    v[p * T_ROW + e] != t_value(s->ns, s->tok, p, layer, 1, e)) {
                    t_fail(c, "gathered K/V differ from what was written for those tokens", LLMKV_OK);
                    return;
                }
    }
}

static void t_op(tctx* c) {
    uint32_t i = tst_below(&c->rng, T_SEQS), o = tst_below(&c->rng, 11), n, j;
    tseq* s = &c->s[i];
    llmkv_result r;
    c->n_ops++;
    if (!s->live && o < 7) o = 0;
    switch (o) {
    case 0: { /* a prompt from a family, created from the prefix index */
        uint32_t f = tst_below(&c->rng, 3), len = 4 + tst_below(&c->rng, 28), hit = 0;
        llmkv_token p[T_MAX_LEN];
        if (s->live) break;
        for (j = 0; j < len; ++j) p[j] = t_family(f, j);
        if (tst_below(&c->rng, 3) == 0) p[len - 1] = (llmkv_token)(100 + c->id);
        s->ns = tst_below(&c->rng, 4) == 0 ? 1 + c->id % 2 : 0;
        r = llmkv_seq_create_prefix(c->kv, s->ns, p, len, &s->h, &hit);
        if (r != LLMKV_OK) {
            if (!t_capacity(r)) t_fail(c, "create_prefix", r);
            break;
        }
        s->live = 1;
        s->len = hit;
        memcpy(s->tok, p, len * sizeof p[0]);
        c->n_hits += hit > 0;
        t_verify(c, s); /* the shared part already holds the right values */
        r = llmkv_reserve_tokens(c->kv, s->h, p + hit, len - hit);
        if (r != LLMKV_OK) {
            if (!t_capacity(r)) t_fail(c, "reserve prompt", r);
            break;
        }
        s->len = len;
        r = t_put(c, s, hit);
        if (r != LLMKV_OK && !t_capacity(r)) t_fail(c, "put prompt", r);
        if (r != LLMKV_OK) { /* a copy-on-write found no page: drop the unwritten tail */
            s->len = hit;
            if ((r = llmkv_truncate(c->kv, s->h, hit)) != LLMKV_OK) t_fail(c, "truncate after put", r);
        }
        break;
    }
    case 1:
    case 2: { /* decode a few tokens */
        llmkv_token add[4];
        uint32_t from = s->len;
        n = 1 + tst_below(&c->rng, 4);
        if (s->len + n > T_MAX_LEN) break;
        for (j = 0; j < n; ++j) add[j] = (llmkv_token)tst_below(&c->rng, 3);
        r = llmkv_reserve_tokens(c->kv, s->h, add, n);
        if (r != LLMKV_OK) {
            if (!t_capacity(r)) t_fail(c, "reserve", r);
            break;
        }
        memcpy(s->tok + s->len, add, n * sizeof add[0]);
        s->len += n;
        r = t_put(c, s, from);
        if (r != LLMKV_OK) {
            if (!t_capacity(r)) t_fail(c, "put", r);
            s->len = from;
            if ((r = llmkv_truncate(c->kv, s->h, from)) != LLMKV_OK) t_fail(c, "truncate after put", r);
        }
        break;
    }
    case 3:
        t_verify(c, s);
        break;
    case 4: { /* fork into a free slot of this thread */
        for (j = 0; j < T_SEQS && c->s[j].live; ++j) {}
        if (j == T_SEQS) break;
        r = llmkv_fork(c->kv, s->h, &c->s[j].h);
        if (r != LLMKV_OK) {
            if (!t_capacity(r)) t_fail(c, "fork", r);
            break;
        }
        c->s[j].live = 1;
        c->s[j].ns = s->ns;
        c->s[j].len = s->len;
        memcpy(c->s[j].tok, s->tok, sizeof s->tok);
        break;
    }
    case 5:
        n = tst_below(&c->rng, s->len + 1);
        if ((r = llmkv_truncate(c->kv, s->h, n)) != LLMKV_OK) t_fail(c, "truncate", r);
        else s->len = n;
        break;
    case 6:
        if ((r = llmkv_seq_publish(c->kv, s->h, (int)tst_below(&c->rng, 2))) != LLMKV_OK) t_fail(c, "publish", r);
        break;
    case 7:
        if (!s->live) break;
        if ((r = llmkv_seq_free(c->kv, s->h)) != LLMKV_OK) t_fail(c, "free", r);
        s->live = 0;
        s->len = 0;
        break;
    case 8: { /* pin or unpin a family's prefix */
        uint32_t k = tst_below(&c->rng, 2), got;
        llmkv_token p[16];
        if (c->pinned[k]) {
            if ((r = llmkv_prefix_unpin(c->kv, c->pins[k])) != LLMKV_OK) t_fail(c, "unpin", r);
            c->pinned[k] = 0;
            break;
        }
        for (j = 0; j < 16; ++j) p[j] = t_family(k, j);
        r = llmkv_prefix_pin(c->kv, 0, p, 16, &c->pins[k], &got);
        if (r == LLMKV_OK) c->pinned[k] = 1;
        else if (!t_capacity(r)) t_fail(c, "pin", r);
        break;
    }
    case 9: { /* export, and import into a free slot of this thread (puts of
                 other threads run meanwhile; the import shares what is cached) */
        uint64_t bytes = 0;
        void* buf;
        uint32_t shared = 0;
        for (j = 0; j < T_SEQS && c->s[j].live; ++j) {}
        if (!s->live || j == T_SEQS) break;
        if ((r = llmkv_seq_export_size(c->kv, s->h, &bytes)) != LLMKV_OK) {
            t_fail(c, "export_size", r);
            break;
        }
        buf = malloc((size_t)bytes);
        if (!buf) break;
        if ((r = llmkv_seq_export(c->kv, s->h, buf, (size_t)bytes, NULL)) != LLMKV_OK) t_fail(c, "export", r);
        else if ((r = llmkv_seq_import(c->kv, buf, (size_t)bytes, &c->s[j].h, &shared)) != LLMKV_OK) {
            if (!t_capacity(r)) t_fail(c, "import", r);
        } else {
            c->s[j].live = 1;
            c->s[j].ns = s->ns;
            c->s[j].len = s->len;
            memcpy(c->s[j].tok, s->tok, sizeof s->tok);
            if (shared > s->len) t_fail(c, "import shared more than the sequence holds", LLMKV_OK);
            t_verify(c, &c->s[j]);
        }
        free(buf);
        break;
    }
    default: { /* read-only and global calls */
        llmkv_stats st;
        llmkv_token p[24];
        uint32_t got;
        for (j = 0; j < 24; ++j) p[j] = t_family(c->id % 3, j);
        if ((r = llmkv_prefix_match(c->kv, 0, p, 24, &got)) != LLMKV_OK) t_fail(c, "prefix_match", r);
        if ((r = llmkv_cache_stats(c->kv, &st)) != LLMKV_OK) t_fail(c, "stats", r);
        else if (st.n_pages_free + st.n_pages_used > st.n_pages_total) t_fail(c, "stats: free + used > total", r);
        if (tst_below(&c->rng, 8) == 0 && (r = llmkv_prefix_evict(c->kv, 2, NULL)) != LLMKV_OK) t_fail(c, "evict", r);
        break;
    }
    }
}

static void* t_thread(void* arg) {
    tctx* c = (tctx*)arg;
    unsigned i;
    uint32_t j;
    for (i = 0; i < c->iters && !c->fails; ++i) t_op(c);
    for (j = 0; j < T_SEQS; ++j) {
        if (!c->s[j].live) continue;
        t_verify(c, &c->s[j]);
        llmkv_seq_free(c->kv, c->s[j].h);
        c->s[j].live = 0;
    }
    for (j = 0; j < 2; ++j)
        if (c->pinned[j]) llmkv_prefix_unpin(c->kv, c->pins[j]);
    return NULL;
}

static void test_threads_shared_cache(tst* t) {
    llmkv_desc d;
    llmkv_cache* kv = NULL;
    tctx* c;
    pthread_t th[T_THREADS];
    uint32_t i, evicted = 0;
    unsigned ops = 0, hits = 0;
    llmkv_stats st;
    char msg[256];
    const char* scale = getenv("LLMKV_TEST_SCALE");
    double sc = scale ? atof(scale) : 1.0;
    memset(&d, 0, sizeof d);
    d.n_layers = T_LAYERS;
    d.n_kv_heads = T_HEADS;
    d.head_dim = T_DIM;
    d.page_size = 4;
    d.n_pages = 90; /* four threads' 16 sequences need up to 192 pages */
    d.max_seqs = T_THREADS * T_SEQS;
    d.max_seq_len = T_MAX_LEN;
    d.prefix_index = 1;
    d.max_pins = 6; /* fewer than the threads want: TOO_MANY_PINS happens */
    d.thread_safe = 1;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    c = (tctx*)calloc(T_THREADS, sizeof *c);
    TST_REQUIRE(t, c != NULL);
    for (i = 0; i < T_THREADS; ++i) {
        c[i].kv = kv;
        c[i].id = i;
        c[i].iters = (unsigned)(4000 * (sc > 0 ? sc : 1.0));
        c[i].rng.s = 0xabc0ull + i;
        TST_REQUIRE(t, pthread_create(&th[i], NULL, t_thread, &c[i]) == 0);
    }
    for (i = 0; i < T_THREADS; ++i) pthread_join(th[i], NULL);
    for (i = 0; i < T_THREADS; ++i) {
        if (c[i].fails) fprintf(stderr, "  %s\n", c[i].why);
        TST_EQ(t, c[i].fails, 0);
        ops += c[i].n_ops;
        hits += c[i].n_hits;
    }
    TST_EQ(t, llmkv_cache_check(kv, msg, sizeof msg), LLMKV_OK);
    TST_EQ(t, llmkv_cache_stats(kv, &st), LLMKV_OK);
    TST_EQ(t, st.n_seqs, 0);
    TST_EQ(t, st.n_pins, 0);
    TST_EQ(t, st.n_pages_used, 0);
    TST_CHECK(t, hits > 0 && st.n_evictions > 0); /* the threads did share and evict */
    TST_EQ(t, llmkv_prefix_evict(kv, UINT32_MAX, &evicted), LLMKV_OK);
    TST_EQ(t, llmkv_cache_stats(kv, &st), LLMKV_OK);
    TST_EQ(t, st.n_pages_free, d.n_pages);
    if (getenv("LLMKV_TEST_VERBOSE"))
        fprintf(stderr, "  threads: %u ops, %u prompts hit the cache, %llu evictions\n", ops, hits,
                (unsigned long long)st.n_evictions);
    free(c);
    llmkv_cache_destroy(kv);
}

void suite_threads(tst* t) { TST_RUN(t, test_threads_shared_cache); }

#else

static void test_threads_unsupported(tst* t) {
    llmkv_desc d;
    llmkv_cache* kv = NULL;
    memset(&d, 0, sizeof d);
    d.n_layers = 1;
    d.n_kv_heads = 1;
    d.head_dim = 4;
    d.n_pages = 4;
    d.thread_safe = 1;
    TST_EQ(t, llmkv_cache_create(&d, &kv), LLMKV_ERR_UNSUPPORTED); /* no mutex without threads */
}

void suite_threads(tst* t) { TST_RUN(t, test_threads_unsupported); }

#endif
